//! Intake: the first stage. Assigns sequence numbers, enforces idempotency keys, journals
//! each new intent, acks. Approved and recovered intents re-enter here with their sequence
//! number and pass straight through.
//!
//! With a journal, an intent is appended to the `intake` lane before its `ack` is sent
//! (the status thread may hold the ack further, until the record is synced, under
//! group commit). A failed append acks nothing: the desk gets `error unavailable` and the
//! id stays free.

use std::collections::HashMap;
use std::sync::Arc;

use pipeline::{Emit, Stage, now_raw};

use crate::auth::Principals;
use crate::blob::BlobPool;
use crate::journal::{JournalError, LaneWriter};
use crate::msg::{IntentId, IntentMsg, StatusKind, StatusMsg};
use crate::recovery;
use crate::stages::StatusSink;

/// The intake lane of the journal and what intake needs to fill its records.
#[derive(Debug)]
pub struct IntakeJournal {
    /// The `intake` lane.
    pub lane: LaneWriter,
    /// Principal names, for the first record of each principal in this run.
    pub principals: Arc<Principals>,
    /// Account addresses by index (a record names the account by address too).
    pub accounts: Vec<alloy_primitives::Address>,
    /// Principals whose name record is already in the journal in this run.
    pub named: std::collections::HashSet<u32>,
}

/// Owns the idempotency table: `(principal, id)` → engine sequence number.
#[derive(Debug)]
pub struct IntakeStage {
    seen: HashMap<(u32, IntentId), u64>,
    next_seq: u64,
    status: StatusSink,
    blobs: Arc<BlobPool>,
    journal: Option<IntakeJournal>,
}

impl IntakeStage {
    /// A stage whose table starts with room for `capacity` intents (it grows past that,
    /// amortised, until the journal can compact finished intents away).
    pub fn new(status: StatusSink, blobs: Arc<BlobPool>, capacity: usize) -> Self {
        Self {
            seen: HashMap::with_capacity(capacity),
            next_seq: 1,
            status,
            blobs,
            journal: None,
        }
    }

    /// Journals every new intent before its ack.
    pub fn set_journal(&mut self, j: IntakeJournal) {
        self.journal = Some(j);
    }

    /// Seeds the idempotency table with intents recovered from the journal; new intents
    /// are numbered after `next_seq - 1`.
    pub fn recover(
        &mut self,
        keys: impl IntoIterator<Item = ((u32, IntentId), u64)>,
        next_seq: u64,
    ) {
        self.seen.extend(keys);
        self.next_seq = self.next_seq.max(next_seq);
    }

    /// Appends `msg` (numbered `seq`) to the journal; the position of its record (0
    /// without a journal), or why it could not be written.
    fn journal(&mut self, msg: &IntentMsg, seq: u64) -> Result<u64, JournalError> {
        let Some(j) = &mut self.journal else {
            return Ok(0);
        };
        let principal = msg.origin.principal;
        if !j.named.contains(&principal) {
            // First intent of this principal in this run: its name goes first (cold).
            let name = j.principals.name(principal).unwrap_or_default();
            recovery::append_principal(&mut j.lane, principal, &name)?;
            j.named.insert(principal);
        }
        let data = if msg.data.is_some() {
            // SAFETY: intake holds the message, hence owns its calldata slot; read only.
            unsafe { self.blobs.bytes(msg.data) }
        } else {
            &[]
        };
        let from = j
            .accounts
            .get(msg.account.0 as usize)
            .copied()
            .unwrap_or_default();
        recovery::append_intent(&mut j.lane, msg, seq, from, data).map(|p| p.0)
    }
}

impl Stage for IntakeStage {
    type In = IntentMsg;
    type Out = IntentMsg;

    fn name(&self) -> &'static str {
        "intake"
    }

    #[inline]
    fn on_message<E: Emit<IntentMsg>>(&mut self, mut msg: IntentMsg, out: &mut E) {
        if msg.seq != 0 {
            // Already sequenced: an intent coming back from the four-eyes pending set
            // with its approval. Its id is in the table; it goes on as it is.
            out.emit(msg);
            return;
        }
        let key = (msg.origin.principal, msg.id);
        if let Some(&seq) = self.seen.get(&key) {
            // Same id again: never a second transaction. The status thread answers with
            // the existing intent's state.
            self.blobs.release(msg.data);
            self.status.send(StatusMsg {
                kind: StatusKind::Duplicate,
                seq,
                origin: msg.origin,
                id: msg.id,
                at_raw: now_raw(),
                ..StatusMsg::default()
            });
            return;
        }
        let seq = self.next_seq;
        let jpos = match self.journal(&msg, seq) {
            Ok(p) => p,
            Err(e) => {
                // Not durable, so not accepted: the desk may retry the same id.
                tracing::error!(error = %e, "journal append failed; intent refused");
                self.blobs.release(msg.data);
                self.status.send(StatusMsg {
                    kind: StatusKind::Refused,
                    origin: msg.origin,
                    id: msg.id,
                    at_raw: now_raw(),
                    detail: crate::msg::Detail::new(
                        "the intent could not be journaled; nothing was done, retry",
                    ),
                    ..StatusMsg::default()
                });
                return;
            }
        };
        self.next_seq += 1;
        self.seen.insert(key, seq);
        msg.seq = seq;
        self.status.send(StatusMsg {
            kind: StatusKind::Ack,
            seq,
            origin: msg.origin,
            id: msg.id,
            at_raw: now_raw(),
            // Under group commit the status thread holds the ack until this is synced.
            jpos,
            account: msg.account,
            intent_kind: msg.kind,
            hops: msg.hops,
            ..StatusMsg::default()
        });
        out.emit(msg);
    }
}
