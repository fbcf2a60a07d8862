//! The receipts side: one persistent, non-blocking WebSocket subscribed to
//! `newHeads`, owned by one stage thread.
//!
//! For each new head the follower asks, on the same connection,
//! `eth_getBlockReceipts` (one call per block, by block hash so a reorg
//! cannot hand us another block's receipts) and `eth_maxPriorityFeePerGas`,
//! and keeps the shared [`FeeView`] current: the base fee from the header
//! before the head is reported, the tip when its reply arrives. Everything is
//! driven by the subscription and mio readiness: no timers, no sleeps, no
//! polling of the node.
//!
//! # Reorganisations
//!
//! The follower keeps the `(number, hash)` of the last [`REORG_WINDOW`]
//! blocks it reported, a contiguous chain ending at the newest, in a ring
//! indexed by block number (fixed size: nothing is allocated per block). A
//! head *links* when its `parent_hash` is the hash held for `number - 1`.
//!
//! - A head that links is reported. If the follower had reported blocks at
//!   or above its number, those are no longer canonical: a
//!   [`HeadEvent::Reorg`] naming them comes first.
//! - A head whose parent is not held (a fork below the head, or a node that
//!   skipped headers) starts a *walk*: the follower asks for the missing
//!   headers by number, `eth_getBlockByNumber(n, false)`, one at a time on
//!   the same connection (driven by [`HeadFollower::poll`] like every other
//!   request), down from the head until a header's parent is a hash it holds.
//!   That block is the common ancestor. Held blocks above it are reported
//!   dropped (if there are any: a gap on an unchanged chain is no reorg), then
//!   every new block from the ancestor up to the head, in ascending order.
//! - If the walk goes below the oldest held block, or collects [`MAX_WALK`]
//!   headers without linking, the fork is deeper than the window (or the gap
//!   too long to check): every held block is reported dropped, with
//!   `beyond_window: true`, and the fetched headers are reported as the new
//!   chain.
//! - A head the follower reported before, below its newest (the node went
//!   back to it): the blocks above it are reported dropped; no `NewHead`. The
//!   newest head again: ignored.
//! - Heads that arrive during a walk wait until it ends (the newest
//!   [`MAX_DEFERRED`]; older ones are fetched by the next walk if needed).
//!   If the node's chain changes under a walk (a fetched header is not the
//!   parent it was fetched for, or the node no longer has it), the walk is
//!   abandoned and the next head starts a new one.
//!
//! # Invariants
//!
//! - Per block, [`HeadEvent::NewHead`] comes before its
//!   [`HeadEvent::BlockReceipts`], and the [`FeeView`] holds the block's base
//!   fee before its `NewHead` is reported.
//! - Reported heads form a chain: each `NewHead`'s `parent_hash` is the hash
//!   of the previously reported head, or, right after a `Reorg`, of the block
//!   `common_ancestor` (which was reported earlier). Exceptions: the first
//!   head, and the first after a `Reorg` with `beyond_window`.
//! - A `Reorg` comes before the `NewHead` of every block that replaces the
//!   dropped ones. `dropped` lists only blocks reported as `NewHead` and not
//!   dropped since, oldest first; a block never reported is never dropped.
//! - No `BlockReceipts` is reported for a dropped block after its `Reorg`
//!   (the outstanding request is discarded).
//! - During a walk nothing about the new blocks is reported: no `NewHead`, no
//!   [`FeeView`] update.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_primitives::{B256, U128};
use serde::Deserialize;
use serde_json::value::RawValue;
use tungstenite::Message;

use crate::error::VenueError;
use crate::fees::FeeView;
use crate::types::{HeaderJson, ReceiptJson, ReceiptSummary};
use crate::ws::{self, Envelope, Flush, Ws};

/// Replies can be whole blocks of receipts (about 1 MB for a full block of
/// transfers); read in 64 KiB steps.
const READ_BUFFER: usize = 64 * 1024;

/// Bound on the blocking connect, handshake and subscription.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Id of the `eth_subscribe` request; later requests count up from 2.
const SUBSCRIBE_ID: u64 = 1;

/// How many reported blocks the follower remembers to detect reorgs: a fork
/// whose common ancestor is older than this is reported with
/// `beyond_window: true`.
pub const REORG_WINDOW: usize = 64;

/// The most headers one walk collects (the head included) before it gives up
/// linking and reports `beyond_window`: room for a fork as deep as the window
/// plus as many skipped headers again.
pub const MAX_WALK: usize = 2 * REORG_WINDOW;

/// How many heads that arrive during a walk are kept for after it.
pub const MAX_DEFERRED: usize = 16;

/// What the follower reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadEvent {
    /// Blocks reported earlier as [`HeadEvent::NewHead`] are no longer
    /// canonical. Reported before the `NewHead` of the first block that
    /// replaces them; the new canonical blocks follow in ascending order.
    Reorg {
        /// The newest block both chains share; the next `NewHead` is its
        /// child. With `beyond_window` no shared block was found: this is
        /// then the number below every dropped block and every new one.
        common_ancestor: u64,
        /// How many reported blocks were dropped: `dropped.len()`.
        /// [`REORG_WINDOW`] for a deep fork once the window is full.
        depth: u64,
        /// `(number, hash)` of every reported block that is no longer
        /// canonical, oldest first. Allocated once per reorg, at its size.
        dropped: Vec<(u64, B256)>,
        /// The fork is deeper than the blocks the follower holds (or the node
        /// skipped more than [`MAX_WALK`] headers): `dropped` then lists every
        /// block it held, since none could be shown to be still canonical.
        beyond_window: bool,
    },
    /// A new head arrived (from the subscription, or fetched while linking a
    /// reorg or a gap). The [`FeeView`] already holds its base fee when this
    /// is reported.
    NewHead {
        /// Block number.
        number: u64,
        /// Block hash.
        hash: B256,
        /// Parent hash: the previously reported head's hash, or right after
        /// a [`HeadEvent::Reorg`], the hash of its `common_ancestor` (no
        /// guarantee for the first head, nor after a `beyond_window` reorg).
        parent_hash: B256,
        /// `baseFeePerGas`; `None` before London.
        base_fee_per_gas: Option<u128>,
        /// Block timestamp, seconds.
        timestamp: u64,
    },
    /// The receipts of a block reported earlier as [`HeadEvent::NewHead`],
    /// in transaction order. Not reported if the node no longer knows the
    /// block (it was reorganised away before the request reached it), nor
    /// after the block was reported dropped.
    BlockReceipts {
        /// Block number.
        number: u64,
        /// Block hash.
        hash: B256,
        /// One per transaction.
        receipts: Vec<ReceiptSummary>,
    },
}

/// A request the follower sent and awaits.
#[derive(Clone, Copy, Debug)]
enum Pending {
    Receipts {
        number: u64,
        hash: B256,
    },
    PriorityFee,
    /// A header a walk asked for.
    Header {
        number: u64,
    },
    /// Receipts of a block reported dropped since: the reply is ignored.
    Discarded,
}

#[derive(Deserialize)]
struct SubscriptionParams<'a> {
    #[serde(borrow)]
    subscription: &'a str,
    #[serde(borrow)]
    result: &'a RawValue,
}

/// The slot of block `n` in the ring.
fn slot(n: u64) -> usize {
    (n % REORG_WINDOW as u64) as usize
}

/// The last [`REORG_WINDOW`] reported blocks: a contiguous chain ending at
/// `tip`, `len` long.
#[derive(Debug)]
struct Chain {
    ring: [(u64, B256); REORG_WINDOW],
    tip: u64,
    len: usize,
}

impl Chain {
    fn new() -> Self {
        Chain {
            ring: [(0, B256::ZERO); REORG_WINDOW],
            tip: 0,
            len: 0,
        }
    }

    fn oldest(&self) -> Option<u64> {
        (self.len > 0).then(|| self.tip + 1 - self.len as u64)
    }

    fn hash_at(&self, n: u64) -> Option<B256> {
        let oldest = self.oldest()?;
        if n < oldest || n > self.tip {
            return None;
        }
        let (number, hash) = self.ring[slot(n)];
        debug_assert_eq!(number, n);
        Some(hash)
    }

    /// Appends block `n`; it must be `tip + 1` unless the chain is empty
    /// (anything else restarts the chain at `n`).
    fn push(&mut self, n: u64, hash: B256) {
        if self.len > 0 && Some(n) != self.tip.checked_add(1) {
            self.len = 0;
        }
        self.ring[slot(n)] = (n, hash);
        self.tip = n;
        self.len = (self.len + 1).min(REORG_WINDOW);
    }

    /// Forgets every block above `keep`.
    fn truncate(&mut self, keep: u64) {
        let Some(oldest) = self.oldest() else { return };
        if keep < oldest {
            self.len = 0;
        } else if keep < self.tip {
            self.len -= (self.tip - keep) as usize;
            self.tip = keep;
        }
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    /// The held blocks numbered `from` and up, oldest first (allocates only
    /// if there are any).
    fn from(&self, from: u64) -> Vec<(u64, B256)> {
        let Some(oldest) = self.oldest() else {
            return Vec::new();
        };
        (from.max(oldest)..=self.tip)
            .map(|k| self.ring[slot(k)])
            .collect()
    }

    /// The held blocks above `n`, oldest first.
    fn above(&self, n: u64) -> Vec<(u64, B256)> {
        n.checked_add(1).map_or_else(Vec::new, |k| self.from(k))
    }
}

/// What the [`Tracker`] asks the follower to do, in order.
#[derive(Debug)]
enum Step {
    /// Report a [`HeadEvent::Reorg`].
    Reorg {
        common_ancestor: u64,
        dropped: Vec<(u64, B256)>,
        beyond_window: bool,
    },
    /// Report this block as canonical (fee view, `NewHead`, receipts).
    Report(HeaderJson),
    /// Ask the node for the header at this number.
    Fetch(u64),
}

/// The reorg logic, without I/O: fed heads and fetched headers, it queues
/// [`Step`]s in `out`.
#[derive(Debug)]
struct Tracker {
    chain: Chain,
    /// Headers of the chain being linked, ascending; the lowest is the next
    /// to link. Empty unless a walk is in progress.
    walk: VecDeque<HeaderJson>,
    /// The header number a walk awaits.
    fetching: Option<u64>,
    /// Heads that arrived during a walk.
    deferred: VecDeque<HeaderJson>,
    out: VecDeque<Step>,
}

impl Tracker {
    fn new() -> Self {
        Tracker {
            chain: Chain::new(),
            walk: VecDeque::with_capacity(MAX_WALK),
            fetching: None,
            deferred: VecDeque::with_capacity(MAX_DEFERRED),
            out: VecDeque::with_capacity(MAX_WALK + 2),
        }
    }

    /// A head from the subscription.
    fn on_head(&mut self, head: HeaderJson) {
        if self.fetching.is_some() {
            if self.deferred.len() == MAX_DEFERRED {
                self.deferred.pop_front();
            }
            self.deferred.push_back(head);
            return;
        }
        self.consider(head);
        self.run_deferred();
    }

    /// The reply to `Step::Fetch(number)`: the header, or `None` if the node
    /// does not have that block.
    fn on_header(&mut self, number: u64, header: Option<HeaderJson>) {
        if self.fetching != Some(number) {
            return;
        }
        let expected = self.walk.front().map(|low| low.parent_hash);
        match header {
            Some(h) if h.number.to::<u64>() == number && Some(h.hash) == expected => {
                self.fetching = None;
                self.walk.push_front(h);
                self.link();
                self.run_deferred();
            }
            // The node's chain changed under the walk; the next head redoes it.
            _ => self.abandon(),
        }
    }

    /// Gives up the walk in progress (its request failed, or the chain moved).
    fn abandon(&mut self) {
        self.fetching = None;
        self.walk.clear();
        self.run_deferred();
    }

    fn run_deferred(&mut self) {
        while self.fetching.is_none() {
            let Some(head) = self.deferred.pop_front() else {
                return;
            };
            self.consider(head);
        }
    }

    fn consider(&mut self, head: HeaderJson) {
        let n: u64 = head.number.to();
        if self.chain.hash_at(n) == Some(head.hash) {
            if n < self.chain.tip {
                // The node went back to a block already reported.
                let dropped = self.chain.above(n);
                self.chain.truncate(n);
                self.out.push_back(Step::Reorg {
                    common_ancestor: n,
                    dropped,
                    beyond_window: false,
                });
            }
            return;
        }
        self.walk.clear();
        self.walk.push_back(head);
        self.link();
    }

    /// Links the lowest header of the walk to the chain, or asks for its
    /// parent, or gives up.
    fn link(&mut self) {
        let Some(low) = self.walk.front() else { return };
        let n: u64 = low.number.to();
        let Some(oldest) = self.chain.oldest() else {
            // Nothing reported yet: nothing to link to, nothing dropped.
            return self.finish(n.saturating_sub(1), false);
        };
        if n > 0 && self.chain.hash_at(n - 1) == Some(low.parent_hash) {
            return self.finish(n - 1, false);
        }
        if n == 0 || n - 1 < oldest || self.walk.len() >= MAX_WALK {
            return self.finish(n.min(oldest).saturating_sub(1), true);
        }
        self.fetching = Some(n - 1);
        self.out.push_back(Step::Fetch(n - 1));
    }

    /// Ends the walk at `common_ancestor`: reports what it drops, then the
    /// walk's headers.
    fn finish(&mut self, common_ancestor: u64, beyond_window: bool) {
        self.fetching = None;
        let dropped = if beyond_window {
            self.chain.from(0)
        } else {
            self.chain.above(common_ancestor)
        };
        if beyond_window {
            self.chain.clear();
        } else {
            self.chain.truncate(common_ancestor);
        }
        if !dropped.is_empty() {
            self.out.push_back(Step::Reorg {
                common_ancestor,
                dropped,
                beyond_window,
            });
        }
        while let Some(h) = self.walk.pop_front() {
            self.chain.push(h.number.to(), h.hash);
            self.out.push_back(Step::Report(h));
        }
    }
}

/// Follows the chain head over one WebSocket, keeps a [`FeeView`] warm and
/// detects reorganisations (see the [module docs](self)).
///
/// `connect` blocks (bounded) until the subscription is confirmed, so no head
/// produced after `connect` returns is missed. After that nothing blocks.
#[derive(Debug)]
pub struct HeadFollower {
    ws: Ws,
    fees: Arc<FeeView>,
    subscription: String,
    next_id: u64,
    /// Requests awaiting a reply, in send order.
    pending: VecDeque<(u64, Pending)>,
    tracker: Tracker,
    write_pending: bool,
    closed: bool,
}

impl HeadFollower {
    /// Connects, subscribes to `newHeads` and waits for the subscription id
    /// (blocking, at most 10 s), then makes the socket non-blocking.
    pub fn connect(ws_url: &str, fees: Arc<FeeView>) -> Result<Self, VenueError> {
        let mut ws = ws::connect_blocking(ws_url, READ_BUFFER, CONNECT_TIMEOUT)?;
        let req = format!(
            r#"{{"jsonrpc":"2.0","id":{SUBSCRIBE_ID},"method":"eth_subscribe","params":["newHeads"]}}"#
        );
        ws.send(Message::Text(req.into())).map_err(|e| {
            if ws::is_would_block(&e) {
                VenueError::Timeout("eth_subscribe write")
            } else {
                e.into()
            }
        })?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let subscription = loop {
            let msg = match ws.read() {
                Ok(m) => m,
                Err(e) if ws::is_would_block(&e) => {
                    return Err(VenueError::Timeout("eth_subscribe reply"));
                }
                Err(e) => return Err(e.into()),
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(_) => return Err(VenueError::Closed),
                _ => continue,
            };
            let env: Envelope<'_> = serde_json::from_str(&text)?;
            if env.id == Some(SUBSCRIBE_ID) {
                if let Some(err) = env.error {
                    return Err(VenueError::Rpc {
                        code: err.code,
                        message: err.message,
                    });
                }
                let raw = env
                    .result
                    .ok_or(VenueError::Protocol("eth_subscribe returned null"))?;
                break serde_json::from_str::<String>(raw.get())?;
            }
            if Instant::now() >= deadline {
                return Err(VenueError::Timeout("eth_subscribe reply"));
            }
        };
        ws::set_nonblocking(&ws)?;
        Ok(HeadFollower {
            ws,
            fees,
            subscription,
            next_id: SUBSCRIBE_ID + 1,
            pending: VecDeque::with_capacity(64),
            tracker: Tracker::new(),
            write_pending: false,
            closed: false,
        })
    }

    /// Connects to `ws_url` (blocking, like [`HeadFollower::connect`]) and
    /// carries on where `previous` stopped, so that a lost connection loses
    /// nothing: the chain it reported is kept, so the first head on the new
    /// subscription links to it and every block missed in between is fetched
    /// and reported in order (the reorg walk); receipts that were requested
    /// but not answered on the old connection are requested again, and a walk
    /// in progress starts over.
    ///
    /// On failure the error comes back with `previous`, untouched, to try again.
    pub fn resume(
        ws_url: &str,
        previous: HeadFollower,
    ) -> Result<Self, Box<(VenueError, HeadFollower)>> {
        let mut next = match Self::connect(ws_url, Arc::clone(&previous.fees)) {
            Ok(n) => n,
            Err(e) => return Err(Box::new((e, previous))),
        };
        next.tracker = previous.tracker;
        next.tracker.fetching = None;
        next.tracker.walk.clear();
        for (_, p) in previous.pending {
            if let Pending::Receipts { number, hash } = p {
                let req = format!(
                    r#"{{"jsonrpc":"2.0","id":{},"method":"eth_getBlockReceipts","params":["{hash}"]}}"#,
                    next.next_id
                );
                // A write can only be refused by a socket that just failed: the next
                // poll reports it and the owner redials again.
                let _ = next.queue(req, Pending::Receipts { number, hash });
            }
        }
        Ok(next)
    }

    /// Registers the socket with `registry` for read and write readiness
    /// (edge-triggered). Call [`HeadFollower::poll`] once right after
    /// registering (frames may already be buffered from `connect`), then on
    /// every event for `token`.
    pub fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
    ) -> Result<(), VenueError> {
        ws::register(&self.ws, registry, token)
    }

    /// The node's id for our `newHeads` subscription.
    pub fn subscription_id(&self) -> &str {
        &self.subscription
    }

    /// The shared fee view this follower writes.
    pub fn fees(&self) -> &Arc<FeeView> {
        &self.fees
    }

    /// Requests sent (receipts, tips, headers for a walk) whose reply has not
    /// arrived.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Whether a walk (fetching headers to link a reorg or a gap) is in
    /// progress.
    pub fn is_linking(&self) -> bool {
        self.tracker.fetching.is_some()
    }

    /// Handles every frame available without blocking, calling `f` for each
    /// event, and flushes queued requests. Returns the number of events.
    ///
    /// Drains until the socket would block, as edge-triggered readiness
    /// requires, even when a request failed: a JSON-RPC error for one of the
    /// follower's own requests is returned as `Err(VenueError::Rpc)` after
    /// the drain (events before and after it were already delivered; the
    /// connection stays usable; a walk whose header request failed is
    /// abandoned and the next head starts another). Any other error means the
    /// connection is gone.
    pub fn poll(&mut self, mut f: impl FnMut(HeadEvent)) -> Result<usize, VenueError> {
        if self.closed {
            return Err(VenueError::Closed);
        }
        if self.write_pending {
            self.flush()?;
        }
        let mut events = 0;
        let mut emit = |e: HeadEvent| {
            events += 1;
            f(e);
        };
        let mut rpc_error = None;
        loop {
            let msg = match self.ws.read() {
                Ok(m) => m,
                Err(e) if ws::is_would_block(&e) => break,
                Err(e) => return Err(self.fail(e.into())),
            };
            let text = match &msg {
                Message::Text(t) => t.as_str(),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                Message::Binary(_) => {
                    return Err(
                        self.fail(VenueError::Protocol("binary frame on a JSON-RPC socket"))
                    );
                }
                Message::Close(_) => return Err(self.fail(VenueError::Closed)),
            };
            match self.handle_frame(text, &mut emit) {
                Ok(()) => {}
                Err(e @ VenueError::Rpc { .. }) => {
                    rpc_error.get_or_insert(e);
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        self.flush()?;
        match rpc_error {
            Some(e) => Err(e),
            None => Ok(events),
        }
    }

    /// Handles one text frame, reporting its events to `f`.
    fn handle_frame(
        &mut self,
        text: &str,
        f: &mut impl FnMut(HeadEvent),
    ) -> Result<(), VenueError> {
        let env: Envelope<'_> = serde_json::from_str(text)?;
        if env.method == Some("eth_subscription") {
            let params = env
                .params
                .ok_or(VenueError::Protocol("notification without params"))?;
            let params: SubscriptionParams<'_> = serde_json::from_str(params.get())?;
            if params.subscription != self.subscription {
                return Ok(());
            }
            let head: HeaderJson = serde_json::from_str(params.result.get())?;
            self.tracker.on_head(head);
            return self.run_steps(f);
        }
        let Some(id) = env.id else { return Ok(()) };
        let Some(pending) = self.take_pending(id) else {
            return Ok(());
        };
        if let Some(err) = env.error {
            match pending {
                Pending::Discarded => return Ok(()),
                Pending::Header { .. } => {
                    // Deferred heads may now be reported (or start a walk).
                    self.tracker.abandon();
                    self.run_steps(f)?;
                }
                Pending::Receipts { .. } | Pending::PriorityFee => {}
            }
            return Err(VenueError::Rpc {
                code: err.code,
                message: err.message,
            });
        }
        match pending {
            Pending::Receipts { number, hash } => {
                let Some(raw) = env.result else { return Ok(()) };
                let receipts: Vec<ReceiptJson> = serde_json::from_str(raw.get())?;
                let receipts = receipts.into_iter().map(ReceiptSummary::from).collect();
                f(HeadEvent::BlockReceipts {
                    number,
                    hash,
                    receipts,
                });
                Ok(())
            }
            Pending::PriorityFee => {
                let raw = env
                    .result
                    .ok_or(VenueError::Protocol("eth_maxPriorityFeePerGas null"))?;
                let tip: U128 = serde_json::from_str(raw.get())?;
                self.fees.update_priority_fee(tip.to());
                Ok(())
            }
            Pending::Header { number } => {
                let header: Option<HeaderJson> = match env.result {
                    Some(raw) => serde_json::from_str(raw.get())?,
                    None => None,
                };
                self.tracker.on_header(number, header);
                self.run_steps(f)
            }
            Pending::Discarded => Ok(()),
        }
    }

    /// Carries out the tracker's steps in order.
    fn run_steps(&mut self, f: &mut impl FnMut(HeadEvent)) -> Result<(), VenueError> {
        let mut reported = false;
        while let Some(step) = self.tracker.out.pop_front() {
            match step {
                Step::Reorg {
                    common_ancestor,
                    dropped,
                    beyond_window,
                } => {
                    for (_, p) in &mut self.pending {
                        if let Pending::Receipts { hash, .. } = *p
                            && dropped.iter().any(|&(_, h)| h == hash)
                        {
                            *p = Pending::Discarded;
                        }
                    }
                    f(HeadEvent::Reorg {
                        common_ancestor,
                        depth: dropped.len() as u64,
                        dropped,
                        beyond_window,
                    });
                }
                Step::Report(head) => {
                    self.report(head, f)?;
                    reported = true;
                }
                Step::Fetch(number) => {
                    let req = format!(
                        r#"{{"jsonrpc":"2.0","id":{},"method":"eth_getBlockByNumber","params":["0x{number:x}",false]}}"#,
                        self.next_id
                    );
                    self.queue(req, Pending::Header { number })?;
                }
            }
        }
        if reported {
            let tip_req = format!(
                r#"{{"jsonrpc":"2.0","id":{},"method":"eth_maxPriorityFeePerGas","params":[]}}"#,
                self.next_id
            );
            self.queue(tip_req, Pending::PriorityFee)?;
        }
        Ok(())
    }

    /// Reports one canonical block: base fee into the view, receipts
    /// requested, then `NewHead`.
    fn report(
        &mut self,
        head: HeaderJson,
        f: &mut impl FnMut(HeadEvent),
    ) -> Result<(), VenueError> {
        let number: u64 = head.number.to();
        let base_fee = head.base_fee_per_gas.map(|b| b.to::<u128>());
        if let Some(base) = base_fee {
            self.fees.update_base_fee(base, number);
        }
        let receipts_req = format!(
            r#"{{"jsonrpc":"2.0","id":{},"method":"eth_getBlockReceipts","params":["{}"]}}"#,
            self.next_id, head.hash
        );
        self.queue(
            receipts_req,
            Pending::Receipts {
                number,
                hash: head.hash,
            },
        )?;
        f(HeadEvent::NewHead {
            number,
            hash: head.hash,
            parent_hash: head.parent_hash,
            base_fee_per_gas: base_fee,
            timestamp: head.timestamp.to(),
        });
        Ok(())
    }

    /// Queues a request with the id `self.next_id` (flushed by `poll`).
    fn queue(&mut self, req: String, what: Pending) -> Result<(), VenueError> {
        self.pending.push_back((self.next_id, what));
        self.next_id += 1;
        match self.ws.write(Message::Text(req.into())) {
            Ok(()) => Ok(()),
            Err(e) if ws::is_would_block(&e) => {
                self.write_pending = true;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn take_pending(&mut self, id: u64) -> Option<Pending> {
        let pos = self.pending.iter().position(|&(i, _)| i == id)?;
        self.pending.remove(pos).map(|(_, p)| p)
    }

    fn flush(&mut self) -> Result<(), VenueError> {
        match ws::flush(&mut self.ws) {
            Ok(Flush::Done) => {
                self.write_pending = false;
                Ok(())
            }
            Ok(Flush::Pending) => {
                self.write_pending = true;
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn fail(&mut self, e: VenueError) -> VenueError {
        self.closed = true;
        e
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use alloy_primitives::U64;

    use super::*;

    /// A synthetic block hash; `fork` tells blocks at the same height apart.
    fn hash(n: u64, fork: u64) -> B256 {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&n.to_be_bytes());
        b[8..16].copy_from_slice(&fork.to_be_bytes());
        b[31] = 1;
        B256::from(b)
    }

    /// Block `n` of fork `fork`, whose parent is block `n - 1` of `parent_fork`.
    fn header(n: u64, fork: u64, parent_fork: u64) -> HeaderJson {
        HeaderJson {
            number: U64::from(n),
            hash: hash(n, fork),
            parent_hash: if n == 0 {
                B256::ZERO
            } else {
                hash(n - 1, parent_fork)
            },
            base_fee_per_gas: None,
            timestamp: U64::from(n),
        }
    }

    /// A step in a comparable form.
    #[derive(Debug, PartialEq, Eq)]
    enum S {
        Reorg(u64, Vec<(u64, B256)>, bool),
        Report(u64, B256),
        Fetch(u64),
    }

    fn drain(t: &mut Tracker) -> Vec<S> {
        t.out
            .drain(..)
            .map(|s| match s {
                Step::Reorg {
                    common_ancestor,
                    dropped,
                    beyond_window,
                } => S::Reorg(common_ancestor, dropped, beyond_window),
                Step::Report(h) => S::Report(h.number.to(), h.hash),
                Step::Fetch(n) => S::Fetch(n),
            })
            .collect()
    }

    /// A tracker that has reported blocks `1..=tip` of fork 0.
    fn tracking(tip: u64) -> Tracker {
        let mut t = Tracker::new();
        for n in 1..=tip {
            t.on_head(header(n, 0, 0));
            assert_eq!(drain(&mut t), vec![S::Report(n, hash(n, 0))]);
        }
        t
    }

    fn blocks(range: std::ops::RangeInclusive<u64>, fork: u64) -> Vec<(u64, B256)> {
        range.map(|n| (n, hash(n, fork))).collect()
    }

    #[test]
    fn ring_holds_the_last_window_of_blocks() {
        let t = tracking(REORG_WINDOW as u64 + 10);
        let c = &t.chain;
        assert_eq!(c.oldest(), Some(11));
        assert_eq!(c.hash_at(10), None);
        assert_eq!(c.hash_at(11), Some(hash(11, 0)));
        assert_eq!(c.hash_at(c.tip), Some(hash(c.tip, 0)));
        assert_eq!(c.hash_at(c.tip + 1), None);
        assert_eq!(c.above(c.tip - 2), blocks(c.tip - 1..=c.tip, 0));
        assert_eq!(c.from(0).len(), REORG_WINDOW);
    }

    #[test]
    fn the_newest_head_again_is_ignored_and_an_older_one_rolls_back() {
        let mut t = tracking(5);
        t.on_head(header(5, 0, 0));
        assert_eq!(drain(&mut t), vec![]);
        t.on_head(header(3, 0, 0));
        assert_eq!(drain(&mut t), vec![S::Reorg(3, blocks(4..=5, 0), false)]);
        t.on_head(header(4, 2, 0));
        assert_eq!(drain(&mut t), vec![S::Report(4, hash(4, 2))]);
    }

    #[test]
    fn a_new_block_at_a_reported_height_with_a_held_parent_is_a_reorg() {
        let mut t = tracking(4);
        t.on_head(header(3, 1, 0));
        assert_eq!(
            drain(&mut t),
            vec![
                S::Reorg(2, blocks(3..=4, 0), false),
                S::Report(3, hash(3, 1))
            ]
        );
        t.on_head(header(4, 1, 1));
        t.on_head(header(5, 1, 1));
        assert_eq!(
            drain(&mut t),
            vec![S::Report(4, hash(4, 1)), S::Report(5, hash(5, 1))]
        );
        assert_eq!(t.chain.from(0), {
            let mut c = blocks(1..=2, 0);
            c.extend(blocks(3..=5, 1));
            c
        });
    }

    #[test]
    fn skipped_headers_on_the_same_chain_are_fetched_and_are_no_reorg() {
        let mut t = tracking(3);
        t.on_head(header(6, 0, 0));
        assert_eq!(drain(&mut t), vec![S::Fetch(5)]);
        t.on_header(5, Some(header(5, 0, 0)));
        assert_eq!(drain(&mut t), vec![S::Fetch(4)]);
        t.on_header(4, Some(header(4, 0, 0)));
        assert_eq!(
            drain(&mut t),
            vec![
                S::Report(4, hash(4, 0)),
                S::Report(5, hash(5, 0)),
                S::Report(6, hash(6, 0))
            ]
        );
        assert_eq!(t.fetching, None);
    }

    #[test]
    fn a_fork_below_the_head_is_walked_down_to_the_common_ancestor() {
        let mut t = tracking(5);
        // Fork 1 branches off after block 3; the node skipped 4' and 5'.
        t.on_head(header(6, 1, 1));
        assert_eq!(drain(&mut t), vec![S::Fetch(5)]);
        t.on_header(5, Some(header(5, 1, 1)));
        assert_eq!(drain(&mut t), vec![S::Fetch(4)]);
        t.on_header(4, Some(header(4, 1, 0)));
        assert_eq!(
            drain(&mut t),
            vec![
                S::Reorg(3, blocks(4..=5, 0), false),
                S::Report(4, hash(4, 1)),
                S::Report(5, hash(5, 1)),
                S::Report(6, hash(6, 1)),
            ]
        );
    }

    #[test]
    fn heads_during_a_walk_wait_for_it() {
        let mut t = tracking(3);
        t.on_head(header(5, 0, 0));
        assert_eq!(drain(&mut t), vec![S::Fetch(4)]);
        t.on_head(header(6, 0, 0));
        assert_eq!(drain(&mut t), vec![]);
        // A reply for another number is not the walk's.
        t.on_header(9, Some(header(9, 0, 0)));
        assert_eq!(drain(&mut t), vec![]);
        t.on_header(4, Some(header(4, 0, 0)));
        assert_eq!(
            drain(&mut t),
            vec![
                S::Report(4, hash(4, 0)),
                S::Report(5, hash(5, 0)),
                S::Report(6, hash(6, 0))
            ]
        );
    }

    #[test]
    fn a_chain_that_moves_under_the_walk_abandons_it() {
        let mut t = tracking(3);
        t.on_head(header(5, 0, 0));
        assert_eq!(drain(&mut t), vec![S::Fetch(4)]);
        // The node reorganised: block 4 is now fork 1's, and its head came.
        t.on_head(header(5, 1, 1));
        t.on_header(4, Some(header(4, 1, 0)));
        // Fork 0's block 5 is never reported; fork 1's head starts a new walk.
        assert_eq!(drain(&mut t), vec![S::Fetch(4)]);
        t.on_header(4, Some(header(4, 1, 0)));
        assert_eq!(
            drain(&mut t),
            vec![S::Report(4, hash(4, 1)), S::Report(5, hash(5, 1))]
        );

        // A block the node no longer has, or a failed request: the walk ends
        // and the next head starts another.
        t.on_head(header(7, 1, 1));
        assert_eq!(drain(&mut t), vec![S::Fetch(6)]);
        t.on_header(6, None);
        assert_eq!(drain(&mut t), vec![]);
        t.on_head(header(7, 1, 1));
        assert_eq!(drain(&mut t), vec![S::Fetch(6)]);
        t.abandon();
        assert_eq!((drain(&mut t), t.fetching), (vec![], None));
        t.on_head(header(6, 1, 1));
        assert_eq!(drain(&mut t), vec![S::Report(6, hash(6, 1))]);
    }

    #[test]
    fn a_fork_deeper_than_the_window_is_reported_beyond_it() {
        let w = REORG_WINDOW as u64;
        let tip = w + 36;
        let mut t = tracking(tip);
        let oldest = tip + 1 - w;
        // Fork 1 branches off at block 10, far below the window.
        t.on_head(header(tip + 1, 1, 1));
        for n in (oldest..=tip).rev() {
            assert_eq!(drain(&mut t), vec![S::Fetch(n)]);
            t.on_header(n, Some(header(n, 1, 1)));
        }
        let steps = drain(&mut t);
        assert_eq!(
            steps[0],
            S::Reorg(oldest - 1, blocks(oldest..=tip, 0), true)
        );
        let reported: Vec<_> = steps[1..].iter().collect();
        let expected: Vec<_> = (oldest..=tip + 1)
            .map(|n| S::Report(n, hash(n, 1)))
            .collect();
        assert_eq!(reported, expected.iter().collect::<Vec<_>>());
        // The follower tracks the new chain from there.
        t.on_head(header(tip + 2, 1, 1));
        assert_eq!(drain(&mut t), vec![S::Report(tip + 2, hash(tip + 2, 1))]);
    }

    #[test]
    fn a_gap_longer_than_a_walk_is_reported_beyond_the_window() {
        let mut t = tracking(3);
        let head = 3 + MAX_WALK as u64 + 5;
        t.on_head(header(head, 0, 0));
        let lowest = head + 1 - MAX_WALK as u64;
        for n in (lowest..head).rev() {
            assert_eq!(drain(&mut t), vec![S::Fetch(n)]);
            t.on_header(n, Some(header(n, 0, 0)));
        }
        let steps = drain(&mut t);
        // Nothing held could be checked: all of it is dropped, below the lowest.
        assert_eq!(steps[0], S::Reorg(0, blocks(1..=3, 0), true));
        assert_eq!(steps.len(), 1 + MAX_WALK);
        assert_eq!(steps[1], S::Report(lowest, hash(lowest, 0)));
        assert_eq!(steps[MAX_WALK], S::Report(head, hash(head, 0)));
    }

    /// A node whose chain grows, forks at random depths and skips heads at
    /// random, answering the tracker's fetches at random times, against a
    /// consumer that checks every invariant the module docs promise.
    #[test]
    fn random_forks_and_skipped_heads_keep_the_invariants() {
        struct Node {
            /// The canonical chain by number; block 0 is genesis.
            chain: Vec<HeaderJson>,
            /// The fork new blocks are mined on.
            fork: u64,
            next_fork: u64,
        }
        impl Node {
            /// Mines one block on the current fork.
            fn produce(&mut self) -> HeaderJson {
                let parent = *self.chain.last().unwrap();
                let n = parent.number.to::<u64>() + 1;
                let h = HeaderJson {
                    parent_hash: parent.hash,
                    ..header(n, self.fork, self.fork)
                };
                self.chain.push(h);
                h
            }
            /// Drops the newest `depth` blocks; later blocks are a new fork's.
            fn fork_off(&mut self, depth: usize) {
                self.chain.truncate(self.chain.len() - depth);
                self.fork = self.next_fork;
                self.next_fork += 1;
            }
            fn canonical(&self, n: u64, h: B256) -> bool {
                self.chain.get(n as usize).is_some_and(|b| b.hash == h)
            }
            fn answer(&self, n: u64) -> Option<HeaderJson> {
                self.chain.get(n as usize).copied()
            }
        }

        /// What a consumer of the events sees.
        #[derive(Default)]
        struct Consumer {
            view: BTreeMap<u64, B256>,
            /// The block the next reported head must be the child of.
            expect_parent: Option<(u64, B256)>,
            ever_dropped: Vec<(u64, B256)>,
            reorgs: usize,
            beyond: usize,
        }

        /// Applies the tracker's steps to the consumer, checking each.
        fn check(t: &mut Tracker, node: &Node, c: &mut Consumer, fetch: &mut Option<u64>) {
            for step in t.out.drain(..) {
                match step {
                    Step::Fetch(n) => {
                        assert_eq!(*fetch, None, "one fetch at a time");
                        *fetch = Some(n);
                    }
                    Step::Reorg {
                        common_ancestor,
                        dropped,
                        beyond_window,
                    } => {
                        c.reorgs += 1;
                        assert!(!dropped.is_empty());
                        assert!(dropped.windows(2).all(|w| w[1].0 == w[0].0 + 1));
                        for &(n, h) in &dropped {
                            assert_eq!(c.view.get(&n), Some(&h), "dropped unreported {n}");
                            // Beyond the window the follower cannot tell.
                            assert!(
                                beyond_window || !node.canonical(n, h),
                                "dropped canonical {n}"
                            );
                        }
                        if beyond_window {
                            c.beyond += 1;
                            c.view.clear();
                            c.expect_parent = None;
                        } else {
                            let above: Vec<_> = c
                                .view
                                .range(common_ancestor + 1..)
                                .map(|(&n, &h)| (n, h))
                                .collect();
                            assert_eq!(dropped, above);
                            c.view.retain(|&n, _| n <= common_ancestor);
                            let a = c.view.get(&common_ancestor).copied();
                            c.expect_parent =
                                Some((common_ancestor, a.expect("ancestor reported")));
                        }
                        if !beyond_window {
                            c.ever_dropped.extend(dropped);
                        }
                    }
                    Step::Report(h) => {
                        let n: u64 = h.number.to();
                        if let Some((pn, ph)) = c.expect_parent {
                            assert_eq!((n, h.parent_hash), (pn + 1, ph), "chained heads");
                        }
                        assert!(!c.view.contains_key(&n), "reported twice, no reorg");
                        c.view.insert(n, h.hash);
                        c.expect_parent = Some((n, h.hash));
                    }
                }
            }
            assert_eq!(*fetch, t.fetching);
        }

        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rand = move |m: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % m
        };

        let (mut reorgs, mut beyond) = (0, 0);
        for round in 0..20 {
            let mut node = Node {
                chain: vec![header(0, 0, 0)],
                fork: 0,
                next_fork: 1,
            };
            let mut t = Tracker::new();
            let mut c = Consumer::default();
            let mut fetch: Option<u64> = None;

            for _ in 0..300 {
                match rand(10) {
                    // Mine a block; the node sometimes skips its header.
                    0..=5 => {
                        let h = node.produce();
                        if rand(5) != 0 {
                            t.on_head(h);
                        }
                    }
                    // A reorg of 1..=6 blocks, replaced by as many or up to
                    // two more; some of their headers skipped.
                    6..=7 => {
                        let depth = 1 + rand(6) as usize;
                        if node.chain.len() > depth + 1 {
                            node.fork_off(depth);
                            for _ in 0..depth + rand(3) as usize {
                                let h = node.produce();
                                if rand(4) != 0 {
                                    t.on_head(h);
                                }
                            }
                        }
                    }
                    // The node answers the outstanding fetch, and maybe the
                    // next few.
                    _ => {
                        for _ in 0..1 + rand(4) {
                            let Some(n) = fetch.take() else { break };
                            t.on_header(n, node.answer(n));
                            check(&mut t, &node, &mut c, &mut fetch);
                        }
                    }
                }
                check(&mut t, &node, &mut c, &mut fetch);
            }

            // Settle: one more head, delivered, and every fetch answered.
            t.on_head(node.produce());
            check(&mut t, &node, &mut c, &mut fetch);
            for _ in 0..2 * MAX_WALK {
                let Some(n) = fetch.take() else { break };
                t.on_header(n, node.answer(n));
                check(&mut t, &node, &mut c, &mut fetch);
            }
            assert_eq!(fetch, None, "round {round}: walk never ended");
            let tip = node.chain.last().unwrap();
            assert_eq!(
                c.view.last_key_value(),
                Some((&tip.number.to::<u64>(), &tip.hash)),
                "round {round}"
            );
            for (&n, &h) in c.view.iter().rev().take(REORG_WINDOW) {
                assert!(
                    node.canonical(n, h),
                    "round {round}: block {n} not canonical"
                );
            }
            assert!(c.reorgs > c.beyond, "round {round}: no reorg linked");
            assert!(c.ever_dropped.iter().all(|&(n, h)| !node.canonical(n, h)));
            reorgs += c.reorgs;
            beyond += c.beyond;
        }
        // Forks are at most 6 deep: giving up is for the rare walk that fell
        // far behind the node.
        assert!(
            beyond * 20 <= reorgs,
            "{beyond} of {reorgs} reorgs beyond the window"
        );
    }
}
