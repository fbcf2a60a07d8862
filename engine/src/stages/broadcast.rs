//! Broadcast: writes each signed transaction to the node over a persistent WebSocket
//! (`eth_sendRawTransaction`), reads the node's answers, and hands every hash to the
//! receipt watcher.
//!
//! An I/O stage: it waits in `mio::Poll` on the node socket and on a `mio::Waker` that the
//! input ring's producer triggers (only when this stage is asleep), so neither a message
//! nor a reply waits for a timer.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::B256;
use pipeline::{Emit, Hops, Recorder, Signal, Stage, Waker, now_raw, ticks_to_ns};
use venues::{BroadcastConnection, RpcErrorInfo};

use crate::blob::BlobPool;
use crate::msg::{Origin, Reason, Route, State, StatusMsg, TxMsg};
use crate::risk::kill::KillSwitch;
use crate::stages::StatusSink;

const SOCKET: mio::Token = mio::Token(0);
const WAKE: mio::Token = mio::Token(1);

#[derive(Clone, Copy, Debug)]
struct InFlight {
    origin: Origin,
    tx_hash: B256,
    account: crate::msg::AccountIdx,
    nonce: u64,
    first_raw: u64,
    sent_raw: u64,
}

/// Latency recorders owned by the broadcast stage.
#[derive(Debug)]
pub struct BroadcastRecorders {
    /// Desk frame read → request bytes handed to the kernel.
    pub ws_to_wire: Recorder,
    /// Desk frame read → node's acceptance read back (the end-to-end budget).
    pub ws_to_node: Recorder,
    /// Request written → node's answer read (the node's round trip).
    pub node_rtt: Recorder,
}

/// The broadcast stage.
#[derive(Debug)]
pub struct BroadcastStage {
    conn: BroadcastConnection,
    poll: mio::Poll,
    events: mio::Events,
    waker: Arc<mio::Waker>,
    in_flight: HashMap<u64, InFlight>,
    blobs: Arc<BlobPool>,
    status: StatusSink,
    rec: BroadcastRecorders,
    lost: bool,
    /// Answers parked by `poll_responses` until they can be emitted.
    answers: Vec<(u64, Result<B256, RpcErrorInfo>)>,
    kill: Arc<KillSwitch>,
    venue: u8,
    /// Signed transactions held by a kill switch, in arrival order (sent on unkill).
    held: VecDeque<TxMsg>,
    held_epoch: u64,
    /// Scratch for the release pass: accounts with an earlier transaction still held.
    blocked: Vec<bool>,
}

impl BroadcastStage {
    /// Connects to the node.
    pub fn connect(
        node_ws_url: &str,
        blobs: Arc<BlobPool>,
        status: StatusSink,
        rec: BroadcastRecorders,
        capacity: usize,
        kill: Arc<KillSwitch>,
        venue: u8,
    ) -> Result<Self, venues::VenueError> {
        let mut conn = BroadcastConnection::connect(node_ws_url)?;
        let poll = mio::Poll::new()?;
        conn.register(poll.registry(), SOCKET)?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKE)?);
        Ok(Self {
            conn,
            poll,
            events: mio::Events::with_capacity(64),
            waker,
            in_flight: HashMap::with_capacity(capacity),
            blobs,
            status,
            rec,
            lost: false,
            answers: Vec::with_capacity(capacity),
            kill,
            venue,
            held: VecDeque::with_capacity(capacity),
            held_epoch: 0,
            blocked: vec![false; u16::MAX as usize + 1],
        })
    }

    /// Transactions held by a kill switch right now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Sends what the kill switch no longer holds, keeping each account's order: a
    /// transaction stays held while an earlier one of its account is.
    fn release(&mut self) -> usize {
        self.held_epoch = self.kill.epoch();
        let mut sent = 0;
        let mut keep = self.held.len();
        while keep > 0 {
            keep -= 1;
            let Some(m) = self.held.pop_front() else {
                break;
            };
            let a = m.account.0 as usize;
            if self.blocked[a]
                || self
                    .kill
                    .check(m.account.0, m.asset, Some(self.venue))
                    .is_some()
            {
                self.blocked[a] = true;
                self.held.push_back(m);
            } else {
                self.send(m);
                sent += 1;
            }
        }
        for m in &self.held {
            self.blocked[m.account.0 as usize] = false;
        }
        sent
    }

    fn handle_answer<E: Emit<TxMsg>>(
        &mut self,
        tag: u64,
        res: Result<B256, RpcErrorInfo>,
        now: u64,
        out: &mut E,
    ) {
        let Some(f) = self.in_flight.remove(&tag) else {
            return;
        };
        match res {
            Ok(_) => self.accepted(tag, f, now, out),
            Err(e) if is_already_known(&e) => self.accepted(tag, f, now, out),
            Err(e) => {
                self.status.send(StatusMsg::refusal(
                    tag,
                    f.origin,
                    State::Failed,
                    Reason::NodeRejected,
                    &e.message,
                    now,
                ));
            }
        }
    }

    /// The node took the transaction: `broadcast` goes to the status ring first, then the
    /// hash to the receipt watcher, so `included` can never overtake `broadcast`. (A block
    /// holding the transaction may be announced before the node's answer arrives; the
    /// watcher keeps recent blocks' receipts for exactly that race.)
    fn accepted<E: Emit<TxMsg>>(&mut self, seq: u64, f: InFlight, now: u64, out: &mut E) {
        self.rec.ws_to_node.record(ticks_to_ns(f.first_raw, now));
        self.rec.node_rtt.record(ticks_to_ns(f.sent_raw, now));
        self.status.send(StatusMsg {
            tx_hash: f.tx_hash,
            route: Route::Public,
            ..StatusMsg::event(seq, f.origin, State::Broadcast, now)
        });
        // Hops: the intent's first stamp (for end-to-end time to inclusion) and when it was
        // written to the node.
        let mut hops = Hops::starting_at(f.first_raw);
        hops.stamp(f.sent_raw);
        out.emit(TxMsg {
            seq,
            origin: f.origin,
            account: f.account,
            nonce: f.nonce,
            tx_hash: f.tx_hash,
            hops,
            ..TxMsg::default()
        });
    }

    fn fail_all_in_flight(&mut self, detail: &str) {
        let now = now_raw();
        for (seq, f) in self.in_flight.drain() {
            self.status.send(StatusMsg::refusal(
                seq,
                f.origin,
                State::Failed,
                Reason::VenueUnavailable,
                detail,
                now,
            ));
        }
    }
}

/// The node already has this exact transaction: the send succeeded (idempotent by hash).
fn is_already_known(e: &RpcErrorInfo) -> bool {
    let m = e.message.to_ascii_lowercase();
    m.contains("already known") || m.contains("already imported")
}

impl Stage for BroadcastStage {
    type In = TxMsg;
    type Out = TxMsg;

    fn name(&self) -> &'static str {
        "broadcast"
    }

    fn on_start(&mut self, input: &Arc<Signal>) {
        let w = Arc::clone(&self.waker);
        input.set_waker(Waker::Custom(Arc::new(move || {
            let _ = w.wake();
        })));
    }

    #[inline]
    fn on_message<E: Emit<TxMsg>>(&mut self, msg: TxMsg, _out: &mut E) {
        // A kill switch holds signed transactions here, unsent, until it is turned off.
        if !self.held.is_empty()
            || self
                .kill
                .check(msg.account.0, msg.asset, Some(self.venue))
                .is_some()
        {
            self.held.push_back(msg);
            self.release();
            return;
        }
        self.send(msg);
    }

    fn poll_extra<E: Emit<TxMsg>>(&mut self, out: &mut E) -> usize {
        let released = if !self.held.is_empty() && self.kill.epoch() != self.held_epoch {
            self.release()
        } else {
            0
        };
        released + self.poll_answers(out)
    }

    fn extra_ready(&mut self) -> bool {
        false
    }

    fn owns_park(&self) -> bool {
        true
    }

    fn park(&mut self, timeout: Option<Duration>) {
        // Woken by the node socket becoming readable or by the input ring's waker.
        let _ = self.poll.poll(&mut self.events, timeout);
    }

    fn on_shutdown<E: Emit<TxMsg>>(&mut self, out: &mut E) {
        // Held transactions were signed but never sent: say so.
        let now = now_raw();
        while let Some(m) = self.held.pop_front() {
            self.blobs.release(m.raw);
            self.status.send(StatusMsg::refusal(
                m.seq,
                m.origin,
                State::Failed,
                Reason::KillSwitch,
                "held by a kill switch when the engine stopped; the transaction was not sent",
                now,
            ));
        }
        // Give answers already on their way a bounded time to arrive.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !self.in_flight.is_empty() && !self.lost && std::time::Instant::now() < deadline {
            let _ = self
                .poll
                .poll(&mut self.events, Some(Duration::from_millis(20)));
            self.poll_answers(out);
        }
        if !self.in_flight.is_empty() {
            self.fail_all_in_flight("the engine stopped before the node answered; the transaction may still be included");
        }
    }
}

impl BroadcastStage {
    #[inline]
    fn send(&mut self, msg: TxMsg) {
        let first_raw = msg.hops.first().unwrap_or(0);
        let sent = if self.lost {
            Err(venues::VenueError::Closed)
        } else {
            // SAFETY: this stage holds the message, hence owns its raw-transaction slot.
            let bytes = unsafe { self.blobs.bytes(msg.raw) };
            self.conn.send_raw_transaction(bytes, msg.seq)
        };
        self.blobs.release(msg.raw);
        let now = now_raw();
        match sent {
            Ok(()) => {
                self.rec.ws_to_wire.record(ticks_to_ns(first_raw, now));
                self.in_flight.insert(
                    msg.seq,
                    InFlight {
                        origin: msg.origin,
                        tx_hash: msg.tx_hash,
                        account: msg.account,
                        nonce: msg.nonce,
                        first_raw,
                        sent_raw: now,
                    },
                );
            }
            Err(_) => {
                self.lost = true;
                self.status.send(StatusMsg::refusal(
                    msg.seq,
                    msg.origin,
                    State::Failed,
                    Reason::VenueUnavailable,
                    "the node connection is lost; the transaction was not sent",
                    now,
                ));
            }
        }
    }

    fn poll_answers<E: Emit<TxMsg>>(&mut self, out: &mut E) -> usize {
        if self.in_flight.is_empty() && !self.conn.write_pending() {
            return 0;
        }
        let mut answers = std::mem::take(&mut self.answers);
        let res = self.conn.poll_responses(|tag, r| answers.push((tag, r)));
        let now = now_raw();
        let n = answers.len();
        for (tag, r) in answers.drain(..) {
            self.handle_answer(tag, r, now, out);
        }
        self.answers = answers;
        if res.is_err() && !self.lost {
            self.lost = true;
            self.fail_all_in_flight("the node connection was lost before it answered; the transaction may still be included");
        }
        n
    }
}
