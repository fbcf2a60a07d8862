//! Receipts: follows the chain head over a `newHeads` subscription, fetches each new
//! block's receipts in one call, and reports `included` and then `confirmed` for the
//! transactions it watches. Driven by the subscription and mio readiness; no polling timer.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::B256;
use pipeline::{Emit, NoMessage, Recorder, Signal, Stage, Waker, now_raw, ticks_to_ns};
use venues::{FeeView, HeadEvent, HeadFollower, ReceiptSummary};

use crate::msg::{Origin, State, StatusMsg, TxMsg};
use crate::stages::StatusSink;

const SOCKET: mio::Token = mio::Token(0);
const WAKE: mio::Token = mio::Token(1);

/// How many recent blocks' receipts are remembered for hashes that arrive late.
const RECENT_BLOCKS: usize = 64;

#[derive(Clone, Copy, Debug)]
struct Watch {
    seq: u64,
    origin: Origin,
    first_raw: u64,
}

#[derive(Clone, Copy, Debug)]
struct Included {
    seq: u64,
    origin: Origin,
    block_number: u64,
}

/// The receipts stage.
#[derive(Debug)]
pub struct ReceiptsStage {
    heads: HeadFollower,
    poll: mio::Poll,
    events: mio::Events,
    waker: Arc<mio::Waker>,
    watching: HashMap<B256, Watch>,
    /// Receipts of the last [`RECENT_BLOCKS`] blocks, by hash.
    recent: HashMap<B256, ReceiptSummary>,
    recent_blocks: VecDeque<(u64, Vec<B256>)>,
    /// Included, waiting for depth; in inclusion order (non-decreasing block number).
    included: VecDeque<Included>,
    head: u64,
    depth: u32,
    status: StatusSink,
    ws_to_included: Recorder,
    pending_events: Vec<HeadEvent>,
    blobs: Arc<crate::blob::BlobPool>,
}

impl ReceiptsStage {
    /// Subscribes to the node's heads; `depth` is the number of blocks on top of the
    /// inclusion block before `confirmed`.
    pub fn connect(
        node_ws_url: &str,
        fees: Arc<FeeView>,
        depth: u32,
        status: StatusSink,
        ws_to_included: Recorder,
        capacity: usize,
        blobs: Arc<crate::blob::BlobPool>,
    ) -> Result<Self, venues::VenueError> {
        let mut heads = HeadFollower::connect(node_ws_url, fees)?;
        let poll = mio::Poll::new()?;
        heads.register(poll.registry(), SOCKET)?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKE)?);
        Ok(Self {
            heads,
            poll,
            events: mio::Events::with_capacity(64),
            waker,
            watching: HashMap::with_capacity(capacity),
            recent: HashMap::with_capacity(capacity),
            recent_blocks: VecDeque::with_capacity(RECENT_BLOCKS + 1),
            included: VecDeque::with_capacity(capacity),
            head: 0,
            depth,
            status,
            ws_to_included,
            pending_events: Vec::with_capacity(16),
            blobs,
        })
    }

    fn include(&mut self, w: Watch, r: &ReceiptSummary) {
        let now = now_raw();
        if w.first_raw != 0 {
            self.ws_to_included.record(ticks_to_ns(w.first_raw, now));
        }
        self.status.send(StatusMsg {
            tx_hash: r.tx_hash,
            block_number: r.block_number,
            block_hash: r.block_hash,
            success: r.success,
            gas_used: r.gas_used,
            ..StatusMsg::event(w.seq, w.origin, State::Included, now)
        });
        self.included.push_back(Included {
            seq: w.seq,
            origin: w.origin,
            block_number: r.block_number,
        });
        self.confirm();
    }

    fn confirm(&mut self) {
        while let Some(front) = self.included.front() {
            if self.head < front.block_number + u64::from(self.depth) {
                break;
            }
            let depth = (self.head - front.block_number) as u32;
            let i = *front;
            self.included.pop_front();
            self.status.send(StatusMsg {
                depth,
                block_number: i.block_number,
                ..StatusMsg::event(i.seq, i.origin, State::Confirmed, now_raw())
            });
        }
    }

    fn on_head_event(&mut self, ev: HeadEvent) {
        match ev {
            HeadEvent::NewHead { number, .. } => {
                self.head = self.head.max(number);
                self.confirm();
            }
            HeadEvent::BlockReceipts {
                number, receipts, ..
            } => {
                self.head = self.head.max(number);
                let mut hashes = Vec::with_capacity(receipts.len());
                for r in &receipts {
                    hashes.push(r.tx_hash);
                    self.recent.insert(r.tx_hash, *r);
                    if let Some(w) = self.watching.remove(&r.tx_hash) {
                        self.include(w, r);
                    }
                }
                self.recent_blocks.push_back((number, hashes));
                while self.recent_blocks.len() > RECENT_BLOCKS {
                    if let Some((_, old)) = self.recent_blocks.pop_front() {
                        for h in old {
                            self.recent.remove(&h);
                        }
                    }
                }
                self.confirm();
            }
            // handled by the receipts stage's reorg path
            HeadEvent::Reorg { .. } => {}
        }
    }
}

impl Stage for ReceiptsStage {
    type In = TxMsg;
    type Out = NoMessage;

    fn name(&self) -> &'static str {
        "receipts"
    }

    fn on_start(&mut self, input: &Arc<Signal>) {
        let w = Arc::clone(&self.waker);
        input.set_waker(Waker::Custom(Arc::new(move || {
            let _ = w.wake();
        })));
    }

    fn on_message<E: Emit<NoMessage>>(&mut self, msg: TxMsg, _out: &mut E) {
        // The raw transaction's slot came along from broadcast (release is a no-op for
        // an empty reference).
        self.blobs.release(msg.raw);
        let w = Watch {
            seq: msg.seq,
            origin: msg.origin,
            first_raw: msg.hops.first().unwrap_or(0),
        };
        if let Some(r) = self.recent.get(&msg.tx_hash).copied() {
            self.include(w, &r);
        } else {
            self.watching.insert(msg.tx_hash, w);
        }
    }

    fn poll_extra<E: Emit<NoMessage>>(&mut self, _out: &mut E) -> usize {
        let mut evs = std::mem::take(&mut self.pending_events);
        let res = self.heads.poll(|ev| evs.push(ev));
        let n = evs.len();
        for ev in evs.drain(..) {
            self.on_head_event(ev);
        }
        self.pending_events = evs;
        if let Err(e) = res {
            // Reconnection and resubscription belong to the multi-provider work; until
            // then a lost subscription is fatal for the receipts stage, loudly.
            panic!("head subscription lost: {e}");
        }
        n
    }

    fn owns_park(&self) -> bool {
        true
    }

    fn park(&mut self, timeout: Option<Duration>) {
        let _ = self.poll.poll(&mut self.events, timeout);
    }
}
