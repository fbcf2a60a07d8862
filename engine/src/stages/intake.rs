//! Intake: the first stage. Assigns sequence numbers, enforces idempotency keys, acks.
//! Approved intents re-enter here with their sequence number and pass straight through.

use std::collections::HashMap;
use std::sync::Arc;

use pipeline::{Emit, Stage, now_raw};

use crate::blob::BlobPool;
use crate::msg::{IntentId, IntentMsg, StatusKind, StatusMsg};
use crate::stages::StatusSink;

/// Owns the idempotency table: `(principal, id)` → engine sequence number.
#[derive(Debug)]
pub struct IntakeStage {
    seen: HashMap<(u32, IntentId), u64>,
    next_seq: u64,
    status: StatusSink,
    blobs: Arc<BlobPool>,
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
        }
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
        self.next_seq += 1;
        self.seen.insert(key, seq);
        msg.seq = seq;
        self.status.send(StatusMsg {
            kind: StatusKind::Ack,
            seq,
            origin: msg.origin,
            id: msg.id,
            at_raw: now_raw(),
            hops: msg.hops,
            ..StatusMsg::default()
        });
        out.emit(msg);
    }
}
