//! Status fan-out: the one place that knows every intent's latest state. Consumes the
//! many-to-one status ring fed by every stage and by the desk connections (queries),
//! renders protocol events and routes them to the connection that submitted the intent.
//!
//! Off the hot path by design: rendering JSON and handing it to a connection task happen
//! here, after the transaction has left for the node.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::Receiver;
use pipeline::{Emit, NoMessage, Stage, ticks_to_ns};
use serde_json::json;
use tokio::sync::mpsc::{Sender, error::TrySendError};

use crate::msg::{IntentId, Reason, State, StatusKind, StatusMsg};

/// What the status thread sends to a connection task.
#[derive(Debug)]
pub enum Outbound {
    /// The intent is in the pipeline under `seq`.
    Ack {
        /// Intent id.
        id: IntentId,
        /// Engine sequence.
        seq: u64,
    },
    /// A rendered `event` frame.
    Event(String),
    /// The desk reused an id: the existing intent's sequence and latest event.
    Duplicate {
        /// Intent id.
        id: IntentId,
        /// Existing sequence.
        seq: u64,
        /// Latest event, rendered, if any yet.
        latest: Option<String>,
    },
    /// Answer to `cancel`: `Ok(seq)` if it was passed on to signing, or why not.
    CancelReply {
        /// Intent id.
        id: IntentId,
        /// The intent's sequence, or the reason it cannot be cancelled (and whether it
        /// is unknown).
        outcome: Result<u64, (bool, &'static str)>,
    },
    /// The intent was not accepted: the journal could not record it.
    Refused {
        /// Intent id.
        id: IntentId,
        /// Why.
        message: crate::msg::Detail,
    },
    /// Answer to `status`.
    StatusReply {
        /// Intent id asked about.
        id: IntentId,
        /// Latest event, rendered; `None` if no such intent for this principal.
        latest: Option<String>,
        /// Whether the intent exists (acked but no event yet still counts).
        known: bool,
        /// Engine sequence if known.
        seq: u64,
    },
}

/// Connection lifecycle notices for the status thread (rare; off the ring).
#[derive(Debug)]
pub enum ConnControl {
    /// A desk connected.
    Open {
        /// Connection id.
        conn: u32,
        /// Where to send its replies.
        tx: Sender<Outbound>,
    },
    /// A desk disconnected.
    Close {
        /// Connection id.
        conn: u32,
    },
    /// A rendered frame for every connected desk (validator status changes and alerts).
    Notice {
        /// The frame.
        frame: String,
    },
}

/// Counters for `/metrics`, written by the status thread (and `slow_desks` also by the
/// connection tasks).
#[derive(Debug, Default)]
pub struct Counters {
    /// Events per state, indexed by `State as usize`.
    pub events: [AtomicU64; State::COUNT],
    /// Refusals per reason, indexed by `Reason as usize`.
    pub reasons: [AtomicU64; Reason::COUNT],
    /// Acks.
    pub acks: AtomicU64,
    /// Submissions received from desks, before any check (written by the connection
    /// tasks).
    pub received: AtomicU64,
    /// Duplicate submissions answered from state.
    pub duplicates: AtomicU64,
    /// Desk connections closed for not reading their replies: counted by the status
    /// thread when a connection's outbound queue is full, by the connection task when its
    /// socket stalls.
    pub slow_desks: AtomicU64,
}

#[derive(Debug)]
struct Record {
    conn: u32,
    id: IntentId,
    latest: Option<String>,
    /// Latest state (`None`: acked, no event yet).
    state: Option<State>,
}

/// The status stage.
#[derive(Debug)]
pub struct StatusStage {
    intents: HashMap<u64, Record>,
    by_key: HashMap<(u32, IntentId), u64>,
    conns: HashMap<u32, Sender<Outbound>>,
    control: Receiver<ConnControl>,
    base_raw: u64,
    base_unix_us: u64,
    providers: Vec<String>,
    counters: Arc<Counters>,
    notices: Option<crate::stages::signing::Notices>,
    journal: Option<StatusJournal>,
    audit: Option<crate::risk::audit::StatusAudit>,
}

/// The status thread's side of the journal: it records every state change (the `events`
/// lane) and, under group commit, holds each `ack` until the intent's record is synced.
#[derive(Debug)]
pub struct StatusJournal {
    /// The `events` lane.
    pub lane: crate::journal::LaneWriter,
    /// Whether the intake lane's records are synced yet (always true unless group commit).
    pub intake: crate::journal::DurableWatch,
    /// Under group commit: replies waiting, in order, behind an ack whose intent's record
    /// is not synced yet (connection, reply, journal position; 0 for anything but an
    /// ack). Holding everything behind the first unsynced ack keeps each desk's order:
    /// `ack` before the intent's events.
    pub held: std::collections::VecDeque<(u32, Outbound, u64)>,
    /// Where the journal's flusher wakes this thread.
    pub wake: crate::stages::signing::WakeCell,
}

impl StatusStage {
    /// A status stage; `providers` names the venues of `broadcast` events (bit `i` of an
    /// event's venue mask is `providers[i]`).
    pub fn new(
        control: Receiver<ConnControl>,
        providers: Vec<String>,
        counters: Arc<Counters>,
    ) -> Self {
        let base_raw = pipeline::now_raw();
        let base_unix_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Self {
            intents: HashMap::with_capacity(1 << 16),
            by_key: HashMap::with_capacity(1 << 16),
            conns: HashMap::new(),
            control,
            base_raw,
            base_unix_us,
            providers,
            counters,
            notices: None,
            journal: None,
            audit: None,
        }
    }

    /// Records every event in the journal's `events` lane; holds acks as `j.intake` says.
    pub fn set_journal(&mut self, j: StatusJournal) {
        self.journal = Some(j);
    }

    /// An unfinished intent from before a restart, for the audit trail (after
    /// [`Self::set_audit`]; see [`crate::risk::audit::StatusAudit::recover`]).
    pub fn recover_audit(
        &mut self,
        seq: u64,
        id: IntentId,
        principal: u32,
        account: crate::msg::AccountIdx,
        tx_hash: alloy_primitives::B256,
    ) {
        if let Some(a) = &mut self.audit {
            a.recover(seq, id, principal, account, tx_hash);
        }
    }

    /// Knows an intent from before a restart: `latest` is its last recorded event (if any),
    /// rendered with its recorded time. Its events go to no connection (the desk that sent
    /// it is gone); `status` and a resubmission of the id answer from here.
    pub fn recover(
        &mut self,
        seq: u64,
        principal: u32,
        id: IntentId,
        latest: Option<(StatusMsg, u64)>,
    ) {
        let (text, state) = match latest {
            Some((m, at_unix_us)) => {
                let mut v: serde_json::Value =
                    serde_json::from_str(&self.render(&id, &m)).unwrap_or_default();
                v["ts_us"] = json!(at_unix_us);
                (Some(v.to_string()), Some(m.state))
            }
            None => (None, None),
        };
        self.intents.insert(
            seq,
            Record {
                conn: 0,
                id,
                latest: text,
                state,
            },
        );
        self.by_key.insert((principal, id), seq);
    }

    /// Sends the acks whose intents' records are synced now.
    fn release_acks(&mut self) -> usize {
        let mut n = 0;
        loop {
            let Some(j) = &mut self.journal else {
                return n;
            };
            let Some(&(_, _, pos)) = j.held.front() else {
                return n;
            };
            if !j.intake.is_durable(crate::journal::Pos(pos)) {
                return n;
            }
            let Some((conn, out, _)) = j.held.pop_front() else {
                return n;
            };
            n += 1;
            self.deliver(conn, out);
        }
    }

    /// Appends an event to the `events` lane (a failure is logged: the event still goes
    /// out; recovery then sees an older state and re-checks against the chain).
    fn journal_event(&mut self, m: &StatusMsg) {
        let at_us = self.ts_us(m.at_raw);
        if let Some(j) = &mut self.journal
            && let Err(e) = crate::recovery::append_state(&mut j.lane, m, at_us)
        {
            tracing::error!(seq = m.seq, error = %e, "journal append of an event failed");
        }
    }

    /// Where `cancel` requests go (the signing stage).
    pub fn set_notices(&mut self, n: crate::stages::signing::Notices) {
        self.notices = Some(n);
    }

    /// Hands every request, signature, broadcast and receipt event to the audit trail.
    pub fn set_audit(&mut self, a: crate::risk::audit::StatusAudit) {
        self.audit = Some(a);
    }

    fn drain_control(&mut self) -> usize {
        let mut n = 0;
        while let Ok(c) = self.control.try_recv() {
            n += 1;
            match c {
                ConnControl::Open { conn, tx } => {
                    self.conns.insert(conn, tx);
                }
                ConnControl::Close { conn } => {
                    self.conns.remove(&conn);
                }
                ConnControl::Notice { frame } => {
                    let conns: Vec<u32> = self.conns.keys().copied().collect();
                    for conn in conns {
                        self.send(conn, Outbound::Event(frame.clone()));
                    }
                }
            }
        }
        n
    }

    fn send(&mut self, conn: u32, out: Outbound) {
        if let Some(j) = &mut self.journal
            && !j.held.is_empty()
        {
            // Behind an ack that waits for its sync (group commit).
            j.held.push_back((conn, out, 0));
            return;
        }
        self.deliver(conn, out);
    }

    fn deliver(&mut self, conn: u32, out: Outbound) {
        if !self.conns.contains_key(&conn) {
            self.drain_control();
        }
        let Some(tx) = self.conns.get(&conn) else {
            return; // the desk is gone; the state stays queryable with `status`
        };
        match tx.try_send(out) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                // The desk stopped reading: drop its queue rather than wait or queue
                // without bound. The connection task sees the queue closed and disconnects
                // with 1008; the intents go on, and the desk can reconnect and ask with
                // `status`.
                self.conns.remove(&conn);
                self.counters.slow_desks.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Closed(_)) => {
                self.conns.remove(&conn);
            }
        }
    }

    fn ts_us(&self, at_raw: u64) -> u64 {
        self.base_unix_us + ticks_to_ns(self.base_raw, at_raw) / 1000
    }

    /// Renders an `event` frame.
    pub fn render(&self, id: &IntentId, m: &StatusMsg) -> String {
        let mut v = json!({
            "op": "event",
            "id": id.as_str(),
            "seq": m.seq,
            "state": m.state.as_str(),
            "ts_us": self.ts_us(m.at_raw),
        });
        if m.policy_version != 0 {
            v["policy_version"] = json!(m.policy_version);
        }
        match m.state {
            State::Accepted | State::Approved => {
                v["route"] = json!(m.route.as_str());
            }
            State::PendingApproval | State::SigningWait => {
                v["message"] = json!(m.detail.as_str());
            }
            State::Rejected | State::Failed => {
                v["reason"] = json!(m.reason.as_str());
                v["message"] = json!(m.detail.as_str());
            }
            State::Signed => {
                v["tx_hash"] = json!(m.tx_hash);
                v["nonce"] = json!(m.nonce);
                v["from"] = json!(m.from);
            }
            State::Broadcast => {
                v["tx_hash"] = json!(m.tx_hash);
                v["route"] = json!(m.route.as_str());
                let venues: Vec<&str> = self
                    .providers
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| m.venues & (1u32 << i) != 0)
                    .map(|(_, n)| n.as_str())
                    .collect();
                v["venues"] = json!(venues);
            }
            State::Included => {
                v["tx_hash"] = json!(m.tx_hash);
                v["block_number"] = json!(m.block_number);
                v["block_hash"] = json!(m.block_hash);
                v["success"] = json!(m.success);
                v["gas_used"] = json!(m.gas_used);
                if !m.success && !m.detail.as_str().is_empty() {
                    v["revert_reason"] = json!(m.detail.as_str());
                }
                if m.deposit_count > 0 {
                    v["deposit_index"] = json!(m.deposit_index);
                    if m.deposit_count > 1 {
                        let last = m.deposit_index + u64::from(m.deposit_count);
                        v["deposit_indices"] = json!((m.deposit_index..last).collect::<Vec<_>>());
                    }
                }
            }
            State::Confirmed => {
                v["depth"] = json!(m.depth);
                v["block_number"] = json!(m.block_number);
            }
            State::Replaced => {
                // The replacement's hash, on the same nonce.
                v["tx_hash"] = json!(m.tx_hash);
                v["nonce"] = json!(m.nonce);
            }
            State::Cancelled => {}
            State::FeeWait => {
                v["message"] = json!(m.detail.as_str());
                v["nonce"] = json!(m.nonce);
            }
            State::Reorged => {
                // The block it was in, now off the canonical chain.
                v["tx_hash"] = json!(m.tx_hash);
                v["block_number"] = json!(m.block_number);
                v["block_hash"] = json!(m.block_hash);
            }
        }
        v.to_string()
    }
}

impl Stage for StatusStage {
    type In = StatusMsg;
    type Out = NoMessage;

    fn name(&self) -> &'static str {
        "status"
    }

    fn on_message<E: Emit<NoMessage>>(&mut self, m: StatusMsg, _out: &mut E) {
        if let Some(a) = &mut self.audit {
            a.on_status(&m);
        }
        match m.kind {
            StatusKind::Ack => {
                self.counters.acks.fetch_add(1, Ordering::Relaxed);
                self.intents.insert(
                    m.seq,
                    Record {
                        conn: m.origin.conn,
                        id: m.id,
                        latest: None,
                        state: None,
                    },
                );
                self.by_key.insert((m.origin.principal, m.id), m.seq);
                if let Some(j) = &mut self.journal
                    && (!j.held.is_empty() || !j.intake.is_durable(crate::journal::Pos(m.jpos)))
                {
                    // Group commit: the ack waits until the intent's record is synced.
                    j.held.push_back((
                        m.origin.conn,
                        Outbound::Ack {
                            id: m.id,
                            seq: m.seq,
                        },
                        m.jpos,
                    ));
                    return;
                }
                self.send(
                    m.origin.conn,
                    Outbound::Ack {
                        id: m.id,
                        seq: m.seq,
                    },
                );
            }
            StatusKind::Event => {
                self.counters.events[m.state as usize].fetch_add(1, Ordering::Relaxed);
                if m.reason != Reason::None {
                    self.counters.reasons[m.reason as usize].fetch_add(1, Ordering::Relaxed);
                }
                let Some(rec) = self.intents.get(&m.seq) else {
                    return;
                };
                let id = rec.id;
                self.journal_event(&m);
                let text = self.render(&id, &m);
                let Some(rec) = self.intents.get(&m.seq) else {
                    return;
                };
                let conn = rec.conn;
                if let Some(rec) = self.intents.get_mut(&m.seq) {
                    rec.latest = Some(text.clone());
                    rec.state = Some(m.state);
                }
                self.send(conn, Outbound::Event(text));
            }
            StatusKind::Duplicate => {
                self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                let latest = self.intents.get(&m.seq).and_then(|r| r.latest.clone());
                self.send(
                    m.origin.conn,
                    Outbound::Duplicate {
                        id: m.id,
                        seq: m.seq,
                        latest,
                    },
                );
            }
            StatusKind::Cancel => {
                let seq = self.by_key.get(&(m.origin.principal, m.id)).copied();
                let state = seq.and_then(|s| self.intents.get(&s)).map(|r| r.state);
                let outcome = match (seq, state) {
                    (None, _) | (_, None) => Err((true, "no intent with this id")),
                    (Some(_), Some(Some(s))) if s.is_terminal() => {
                        Err((false, "the intent has already ended"))
                    }
                    (Some(_), Some(Some(State::Included))) => Err((
                        false,
                        "the transaction is already in a block; it cannot be cancelled",
                    )),
                    (Some(seq), Some(_)) => match &self.notices {
                        Some(n) => {
                            n.send(crate::stages::signing::NonceNotice::Cancel { seq });
                            Ok(seq)
                        }
                        None => Err((false, "cancellation is not available")),
                    },
                };
                self.send(m.origin.conn, Outbound::CancelReply { id: m.id, outcome });
            }
            StatusKind::Refused => {
                self.send(
                    m.origin.conn,
                    Outbound::Refused {
                        id: m.id,
                        message: m.detail,
                    },
                );
            }
            StatusKind::Query => {
                let seq = self.by_key.get(&(m.origin.principal, m.id)).copied();
                let latest = seq
                    .and_then(|s| self.intents.get(&s))
                    .and_then(|r| r.latest.clone());
                self.send(
                    m.origin.conn,
                    Outbound::StatusReply {
                        id: m.id,
                        latest,
                        known: seq.is_some(),
                        seq: seq.unwrap_or(0),
                    },
                );
            }
        }
    }

    fn poll_extra<E: Emit<NoMessage>>(&mut self, _out: &mut E) -> usize {
        let acks = match &self.journal {
            Some(j) if !j.held.is_empty() => self.release_acks(),
            _ => 0,
        };
        self.drain_control() + acks
    }

    fn on_start(&mut self, input: &Arc<pipeline::Signal>) {
        if let Some(j) = &self.journal {
            let _ = j.wake.set(Arc::clone(input));
        }
    }
}
