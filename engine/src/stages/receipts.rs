//! Receipts: follows the chain head over a `newHeads` subscription, fetches each new
//! block's receipts in one call, and reports `included` and then `confirmed` for the
//! transactions it watches. Driven by the subscription and mio readiness; no polling timer.
//!
//! # What survives
//!
//! - **A lost subscription.** The follower is handed to a redial thread, which resumes
//!   it on the node or, failing that, on the next provider in turn, with backoff (never
//!   on this thread). The resumed follower keeps the chain it reported: the first head on
//!   the new subscription links to it and every block missed meanwhile is fetched and
//!   reported in order, and receipts asked for but not answered are asked for again. So
//!   no receipt is missed; `included` may only come later.
//! - **A reorg.** The follower reports which reported blocks left the canonical chain
//!   (parent-hash mismatch). Every transaction included in one of them gets `reorged`,
//!   leaves the confirmation queue, and is sent again byte for byte through the broadcast
//!   stage (a node that still has it answers "already known", which counts as accepted);
//!   its next inclusion is reported as usual. The raw bytes of every transaction are kept
//!   here until it is confirmed, for exactly that.
//! - **"nonce too low" for one of its transactions.** The transaction may be the one that
//!   used the nonce (sent before a restart, or mined while a resend was on its way), and a
//!   node can refuse the nonce a moment before that block's receipts are readable. So it
//!   is asked for by hash, and counted as not on chain (the intent failed, its nonce taken
//!   by another transaction) only when the answer was asked at a head after the one of
//!   the refusal; an intent with another transaction watched on that nonce does not fail
//!   on it.
//! - **A private send that the relays did not include** by its last block: sent again on
//!   the public path if the intent allows a public fall-back, else privately again with a
//!   new window.
//!
//! # Invariants
//!
//! - `included` and `confirmed` come at most once per inclusion; after `reorged` the next
//!   `included` is for the new canonical block.
//! - A raw-transaction slot that comes in with a hash is released here, exactly once;
//!   a resend claims a new one and hands it to the broadcast stage.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use alloy_primitives::B256;
use crossbeam_channel::{Receiver, Sender};
use pipeline::{Emit, Hops, NoMessage, Recorder, Signal, Stage, Waker, now_raw, ticks_to_ns};
use venues::{FeeView, HeadEvent, HeadFollower, ReceiptSummary};

use crate::blob::BlobPool;
use crate::msg::{AccountIdx, Origin, Route, State, StatusMsg, TxMsg, TxPurpose};
use crate::stages::StatusSink;
use crate::stages::broadcast::Resend;
use crate::stages::signing::{NonceNotice, Notices};

const SOCKET: mio::Token = mio::Token(0);
const WAKE: mio::Token = mio::Token(1);

/// How many recent blocks' receipts are remembered for hashes that arrive late.
const RECENT_BLOCKS: usize = 64;

/// Counters of the receipts stage, read by `/metrics` and `/health`.
#[derive(Debug, Default)]
pub struct ReceiptsStats {
    /// The head subscription is live now.
    pub subscribed: AtomicBool,
    /// Subscriptions resumed after a loss.
    pub resubscribes: AtomicU64,
    /// Reorgs seen.
    pub reorgs: AtomicU64,
    /// Transactions whose block left the canonical chain.
    pub reorged: AtomicU64,
    /// Transactions sent again (after a reorg or a private window that passed).
    pub resent: AtomicU64,
    /// Private sends that fell back to the public path.
    pub private_fallbacks: AtomicU64,
    /// Newest head seen.
    pub head: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct Watch {
    seq: u64,
    origin: Origin,
    first_raw: u64,
    /// Last block a private send may be included in (0: public).
    max_block: u64,
    purpose: TxPurpose,
    /// Head when it was sent (or last reported stuck).
    since_head: u64,
}

#[derive(Clone, Copy, Debug)]
struct Included {
    seq: u64,
    origin: Origin,
    tx_hash: B256,
    block_number: u64,
    block_hash: B256,
}

/// A transaction a node answered "nonce too low" for, whose receipt was not there yet.
/// A node can refuse the nonce a moment before the block that used it is readable, so
/// "not on chain" counts only when asked at a head after the one of the refusal.
#[derive(Clone, Copy, Debug)]
struct Verifying {
    /// Head when the refusal was seen (0: before any head; set by the first one).
    since: u64,
    /// Head its receipt was last asked at; `None`: to ask at the next head after `since`.
    asked: Option<u64>,
}

/// What the lookup thread found for a hash.
#[derive(Clone, Copy, Debug)]
enum Looked {
    /// Its receipt.
    Found(ReceiptSummary),
    /// The node has no receipt for it.
    Absent,
    /// No provider answered.
    Unknown,
}

/// What is needed to send a transaction again, kept until it is confirmed.
#[derive(Debug)]
struct Kept {
    origin: Origin,
    account: AccountIdx,
    nonce: u64,
    tx_hash: B256,
    asset: u8,
    route: Route,
    public_fallback: bool,
    first_raw: u64,
    purpose: TxPurpose,
    generation: u16,
    raw: Vec<u8>,
}

/// The receipts stage.
#[derive(Debug)]
pub struct ReceiptsStage {
    /// `None` while the redial thread holds it.
    heads: Option<HeadFollower>,
    redial_tx: Sender<HeadFollower>,
    redial_rx: Receiver<HeadFollower>,
    poll: mio::Poll,
    events: mio::Events,
    waker: Arc<mio::Waker>,
    watching: HashMap<B256, Watch>,
    /// Receipts of the last [`RECENT_BLOCKS`] blocks, by hash.
    recent: HashMap<B256, ReceiptSummary>,
    recent_blocks: VecDeque<(u64, Vec<B256>)>,
    /// Included, waiting for depth; in inclusion order (non-decreasing block number).
    included: VecDeque<Included>,
    /// Raw transactions by sequence number, until confirmed.
    kept: HashMap<u64, Kept>,
    head: u64,
    depth: u32,
    status: StatusSink,
    ws_to_included: Recorder,
    /// The deposit contract whose `DepositEvent` indices `included` reports.
    deposit_contract: Option<alloy_primitives::Address>,
    /// Transactions found on chain at a restart whose `included` is sent on start.
    announce: Vec<(u64, Origin, ReceiptSummary)>,
    pending_events: Vec<HeadEvent>,
    blobs: Arc<BlobPool>,
    resend: Option<Resend>,
    stats: Arc<ReceiptsStats>,
    /// The signing stage: stuck transactions to replace, settled ones to forget.
    notices: Option<Notices>,
    /// Blocks without inclusion after which a public transaction counts as stuck.
    stuck_blocks: u64,
    /// Receipts asked for by hash, off this thread.
    lookup: Lookup,
    /// Intents with more than one transaction watched (replaced on the same nonce).
    replaced: std::collections::HashSet<u64>,
    /// Transactions a node answered "nonce too low" for, asked about by hash.
    verifying: HashMap<B256, Verifying>,
    /// Reverted transactions whose `included` waits for the revert reason.
    reverting: HashMap<B256, (Watch, ReceiptSummary)>,
    /// Asks a node why a transaction reverted, off this thread.
    reasons: Reasons,
}

impl ReceiptsStage {
    /// Subscribes to the heads of `urls[0]`; the others are where a lost subscription is
    /// resumed if the first cannot be reached. `depth` is the number of blocks on top of
    /// the inclusion block before `confirmed`.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        urls: Vec<String>,
        fees: Arc<FeeView>,
        depth: u32,
        status: StatusSink,
        ws_to_included: Recorder,
        capacity: usize,
        blobs: Arc<BlobPool>,
        stats: Arc<ReceiptsStats>,
    ) -> Result<Self, venues::VenueError> {
        assert!(!urls.is_empty(), "at least one node URL");
        let mut heads = HeadFollower::connect(&urls[0], fees)?;
        let poll = mio::Poll::new()?;
        heads.register(poll.registry(), SOCKET)?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKE)?);
        let lookup = Lookup::spawn(urls.clone(), Arc::clone(&waker))?;
        let reasons = Reasons::spawn(urls.clone(), Arc::clone(&waker))?;
        let (redial_tx, redial_rx) = spawn_redial(urls, Arc::clone(&waker))?;
        stats.subscribed.store(true, Ordering::Relaxed);
        Ok(Self {
            heads: Some(heads),
            redial_tx,
            redial_rx,
            poll,
            events: mio::Events::with_capacity(64),
            waker,
            watching: HashMap::with_capacity(capacity),
            recent: HashMap::with_capacity(capacity),
            recent_blocks: VecDeque::with_capacity(RECENT_BLOCKS + 1),
            included: VecDeque::with_capacity(capacity),
            kept: HashMap::with_capacity(capacity),
            head: 0,
            depth,
            status,
            ws_to_included,
            deposit_contract: None,
            announce: Vec::new(),
            pending_events: Vec::with_capacity(16),
            blobs,
            resend: None,
            stats,
            notices: None,
            lookup,
            stuck_blocks: 0,
            replaced: std::collections::HashSet::with_capacity(64),
            verifying: HashMap::with_capacity(64),
            reverting: HashMap::with_capacity(64),
            reasons,
        })
    }

    /// Where stuck and settled transactions are reported (the signing stage), and after
    /// how many blocks without inclusion a public transaction is stuck (0: never).
    pub fn set_notices(&mut self, notices: Notices, stuck_blocks: u64) {
        self.notices = Some(notices);
        self.stuck_blocks = stuck_blocks;
    }

    fn notify(&self, n: NonceNotice) {
        if let Some(s) = &self.notices {
            s.send(n);
        }
    }

    /// Reports the deposit index of transactions that deposit through `contract`.
    pub fn set_deposit_contract(&mut self, contract: alloy_primitives::Address) {
        self.deposit_contract = Some(contract);
    }

    /// Takes over a transaction found in block `block_number` when the engine restarted
    /// (from the journal and the chain): it is confirmed at depth like one seen in this
    /// run, and sent again if its block is reorged away. `announce`: its receipt, when the
    /// journal does not have its `included` yet; the stage sends that first thing on its own
    /// thread, so it always comes before the `confirmed` (a separate sender could be
    /// overtaken, leaving `included` as the intent's latest state). Call in block order,
    /// before the stage starts.
    #[allow(clippy::too_many_arguments)]
    pub fn recover_included(
        &mut self,
        seq: u64,
        origin: Origin,
        account: AccountIdx,
        nonce: u64,
        tx_hash: B256,
        block_number: u64,
        block_hash: B256,
        raw: Vec<u8>,
        announce: Option<ReceiptSummary>,
    ) {
        self.announce.extend(announce.map(|r| (seq, origin, r)));
        self.kept.insert(
            seq,
            Kept {
                origin,
                account,
                nonce,
                tx_hash,
                asset: 0,
                route: Route::Public,
                public_fallback: false,
                first_raw: 0,
                purpose: TxPurpose::Intent,
                generation: 0,
                raw,
            },
        );
        self.included.push_back(Included {
            seq,
            origin,
            tx_hash,
            block_number,
            block_hash,
        });
    }

    /// Takes over a transaction the node holds but has not included (sent again at a
    /// restart): watched for its receipt like one handed over by broadcast. Before the
    /// stage starts.
    #[allow(clippy::too_many_arguments)]
    pub fn recover_watch(
        &mut self,
        seq: u64,
        origin: Origin,
        account: AccountIdx,
        nonce: u64,
        tx_hash: B256,
        purpose: TxPurpose,
        generation: u16,
        raw: Vec<u8>,
    ) {
        self.kept.insert(
            seq,
            Kept {
                origin,
                account,
                nonce,
                tx_hash,
                asset: 0,
                route: Route::Public,
                public_fallback: false,
                first_raw: 0,
                purpose,
                generation,
                raw,
            },
        );
        if generation > 0 {
            self.replaced.insert(seq);
        }
        self.watching.insert(
            tx_hash,
            Watch {
                seq,
                origin,
                first_raw: 0,
                max_block: 0,
                purpose,
                since_head: 0,
            },
        );
    }

    /// Where transactions are sent again (the broadcast stage's [`Resend`] handle).
    pub fn set_resend(&mut self, resend: Resend) {
        self.resend = Some(resend);
    }

    fn include(&mut self, w: Watch, r: &ReceiptSummary) {
        self.verifying.remove(&r.tx_hash);
        // One transaction of the intent is in: its other ones (same nonce) never will be.
        if self.replaced.remove(&w.seq) {
            self.watching.retain(|_, x| x.seq != w.seq);
        }
        let now = now_raw();
        match w.purpose {
            TxPurpose::Filler => {
                // The nonce gap is filled; the intent had already failed.
                self.kept.remove(&w.seq);
                self.notify(NonceNotice::Settled { seq: w.seq });
                return;
            }
            TxPurpose::Cancel => {
                self.kept.remove(&w.seq);
                self.status.send(StatusMsg {
                    tx_hash: r.tx_hash,
                    block_number: r.block_number,
                    block_hash: r.block_hash,
                    ..StatusMsg::event(w.seq, w.origin, State::Cancelled, now)
                });
                self.notify(NonceNotice::Settled { seq: w.seq });
                return;
            }
            TxPurpose::Intent | TxPurpose::Replacement => {}
        }
        if !r.success
            && let Some(k) = self.kept.get(&w.seq)
            && k.tx_hash == r.tx_hash
            && self
                .reasons
                .ask
                .send((r.tx_hash, k.raw.clone(), r.from, r.block_number))
                .is_ok()
        {
            // Reverted: `included` goes out with the node's revert reason, once the
            // replay on the reasons thread answers.
            self.reverting.insert(r.tx_hash, (w, *r));
            return;
        }
        self.announce_included(w, r, "");
    }

    /// The `included` event of intent `seq` for receipt `r`.
    fn included_event(
        &self,
        seq: u64,
        origin: Origin,
        r: &ReceiptSummary,
        revert_reason: &str,
        at: u64,
    ) -> StatusMsg {
        StatusMsg {
            tx_hash: r.tx_hash,
            block_number: r.block_number,
            block_hash: r.block_hash,
            success: r.success,
            gas_used: r.gas_used,
            detail: crate::msg::Detail::new(revert_reason),
            // A validator deposit: the deposit contract's index (from its DepositEvent).
            deposit_index: r.deposits.first_index,
            deposit_count: if Some(r.deposits.emitter) == self.deposit_contract {
                r.deposits.count
            } else {
                0
            },
            ..StatusMsg::event(seq, origin, State::Included, at)
        }
    }

    /// Sends `included` for `w` (with the revert reason, if it reverted and the node gave
    /// one) and queues it for `confirmed`.
    fn announce_included(&mut self, w: Watch, r: &ReceiptSummary, revert_reason: &str) {
        let now = now_raw();
        if w.first_raw != 0 {
            self.ws_to_included.record(ticks_to_ns(w.first_raw, now));
        }
        let event = self.included_event(w.seq, w.origin, r, revert_reason, now);
        self.status.send(event);
        self.included.push_back(Included {
            seq: w.seq,
            origin: w.origin,
            tx_hash: r.tx_hash,
            block_number: r.block_number,
            block_hash: r.block_hash,
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
            self.kept.remove(&i.seq);
            self.notify(NonceNotice::Settled { seq: i.seq });
            self.status.send(StatusMsg {
                depth,
                block_number: i.block_number,
                ..StatusMsg::event(i.seq, i.origin, State::Confirmed, now_raw())
            });
        }
    }

    /// Sends transaction `seq` again through the broadcast stage on `route`.
    fn send_again(&mut self, seq: u64, route: Route) {
        let (Some(resend), Some(k)) = (&self.resend, self.kept.get(&seq)) else {
            return;
        };
        let Some(raw) = self.blobs.claim_with(&k.raw) else {
            tracing::warn!(seq, "no blob slot free to send a transaction again");
            return;
        };
        let msg = TxMsg {
            seq,
            origin: k.origin,
            account: k.account,
            nonce: k.nonce,
            tx_hash: k.tx_hash,
            raw,
            asset: k.asset,
            route,
            public_fallback: k.public_fallback,
            purpose: k.purpose,
            generation: k.generation,
            hops: Hops::starting_at(k.first_raw),
            ..TxMsg::default()
        };
        if resend.send(msg) {
            self.stats.resent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.blobs.release(raw);
        }
    }

    /// Blocks above `common_ancestor` left the canonical chain.
    fn reorg(&mut self, common_ancestor: u64) {
        self.stats.reorgs.fetch_add(1, Ordering::Relaxed);
        while let Some((n, _)) = self.recent_blocks.back() {
            if *n <= common_ancestor {
                break;
            }
            if let Some((_, hashes)) = self.recent_blocks.pop_back() {
                for h in hashes {
                    self.recent.remove(&h);
                }
            }
        }
        // `included` is in inclusion order, so the affected ones are at the back.
        let mut dropped = Vec::new();
        while let Some(back) = self.included.back() {
            if back.block_number <= common_ancestor {
                break;
            }
            if let Some(i) = self.included.pop_back() {
                dropped.push(i);
            }
        }
        let now = now_raw();
        for i in dropped.into_iter().rev() {
            self.stats.reorged.fetch_add(1, Ordering::Relaxed);
            self.status.send(StatusMsg {
                tx_hash: i.tx_hash,
                block_number: i.block_number,
                block_hash: i.block_hash,
                ..StatusMsg::event(i.seq, i.origin, State::Reorged, now)
            });
            let route = self.kept.get(&i.seq).map_or(Route::Public, |k| k.route);
            self.send_again(i.seq, route);
        }
        self.head = common_ancestor;
    }

    /// Public transactions not included for `stuck_blocks` blocks: the signing stage
    /// replaces them with higher fees (once per window).
    fn stuck(&mut self, head: u64) {
        if self.stuck_blocks == 0 || self.notices.is_none() {
            return;
        }
        let mut due: Vec<(u64, B256)> = Vec::new();
        for (hash, w) in self.watching.iter_mut() {
            if w.since_head == 0 {
                // Handed over before the first head arrived (just after start): its wait
                // counts from this head.
                w.since_head = head;
                continue;
            }
            if w.max_block == 0
                && w.purpose != TxPurpose::Filler
                && head >= w.since_head + self.stuck_blocks
            {
                w.since_head = head;
                due.push((w.seq, *hash));
            }
        }
        // Before anything is replaced, the node is asked directly whether the transaction
        // is in a block already (a receipt this stage missed is found this way too); the
        // answer comes back through `on_lookups`.
        for (seq, hash) in due {
            if self.lookup.ask.send((seq, hash)).is_err() {
                self.notify(NonceNotice::Stuck { seq });
            }
        }
    }

    /// Answers of the lookup thread: a receipt found is an inclusion; none, and the
    /// intent is still waiting, is a stuck transaction for the signing stage.
    /// Revert reasons the reasons thread found: the waiting `included` goes out.
    fn on_reasons(&mut self) -> usize {
        let mut n = 0;
        while let Ok((hash, reason)) = self.reasons.answers.try_recv() {
            n += 1;
            if let Some((w, r)) = self.reverting.remove(&hash) {
                self.announce_included(w, &r, reason.as_deref().unwrap_or(""));
            }
        }
        n
    }

    fn on_lookups(&mut self) -> usize {
        let mut n = 0;
        let mut stuck: Vec<u64> = Vec::new();
        while let Ok((seq, hash, found)) = self.lookup.answers.try_recv() {
            n += 1;
            match (found, self.verifying.get(&hash).copied()) {
                (Looked::Found(r), _) => {
                    self.verifying.remove(&hash);
                    if let Some(w) = self.watching.remove(&hash) {
                        self.include(w, &r);
                    }
                }
                (Looked::Absent, Some(v)) if v.asked.is_some_and(|a| a > v.since) => {
                    self.verifying.remove(&hash);
                    self.nonce_taken(hash);
                }
                (_, Some(v)) => {
                    // Asked too early to tell, or not answered: again at a later head.
                    self.verifying.insert(hash, Verifying { asked: None, ..v });
                }
                (_, None) => {
                    if self.watching.values().any(|w| w.seq == seq) && !stuck.contains(&seq) {
                        stuck.push(seq);
                    }
                }
            }
        }
        for seq in stuck {
            self.notify(NonceNotice::Stuck { seq });
        }
        n
    }

    /// `hash` is not on chain, asked a block after its nonce was refused: another
    /// transaction took the nonce. The intent fails, unless it has another transaction
    /// watched on that nonce (a replacement's original may be the one included; it is
    /// found by its receipt or, when stuck, by the lookup).
    fn nonce_taken(&mut self, hash: B256) {
        let Some(w) = self.watching.remove(&hash) else {
            return;
        };
        if self.replaced.contains(&w.seq) && self.watching.values().any(|x| x.seq == w.seq) {
            return;
        }
        self.kept.remove(&w.seq);
        self.notify(NonceNotice::Behind { seq: w.seq });
        self.status.send(StatusMsg::refusal(
            w.seq,
            w.origin,
            State::Failed,
            crate::msg::Reason::NodeRejected,
            "nonce too low: the account's nonce was used by another transaction",
            now_raw(),
        ));
    }

    /// At each new head: "nonce too low" transactions not settled yet are asked about
    /// again, once the head is past the one of their refusal.
    fn reverify(&mut self, head: u64) {
        if self.verifying.is_empty() {
            return;
        }
        let watching = &self.watching;
        self.verifying.retain(|h, _| watching.contains_key(h));
        for (hash, v) in self.verifying.iter_mut() {
            if v.since == 0 {
                v.since = head;
            } else if v.asked.is_none() && head > v.since {
                let seq = self.watching.get(hash).map_or(0, |w| w.seq);
                if self.lookup.ask.send((seq, *hash)).is_ok() {
                    v.asked = Some(head);
                }
            }
        }
    }

    /// Recovery: a transaction sent again at the start that the node refused with "nonce
    /// too low", and whose receipt was not found: watched (see [`Self::recover_watch`])
    /// and settled by the same rule as a refusal seen while running. Before the stage
    /// starts.
    pub fn recover_verify(&mut self, tx_hash: B256) {
        self.verifying.insert(
            tx_hash,
            Verifying {
                since: 0,
                asked: None,
            },
        );
    }

    /// Private sends whose window passed without inclusion go again.
    fn private_windows(&mut self, head: u64) {
        let due: Vec<(B256, u64)> = self
            .watching
            .iter()
            .filter(|(_, w)| w.max_block != 0 && head > w.max_block)
            .map(|(h, w)| (*h, w.seq))
            .collect();
        for (hash, seq) in due {
            self.watching.remove(&hash);
            let fallback = self.kept.get(&seq).is_some_and(|k| k.public_fallback);
            if fallback {
                self.stats.private_fallbacks.fetch_add(1, Ordering::Relaxed);
            }
            self.send_again(
                seq,
                if fallback {
                    Route::Public
                } else {
                    Route::Private
                },
            );
        }
    }

    fn on_head_event(&mut self, ev: HeadEvent) {
        match ev {
            HeadEvent::NewHead { number, .. } => {
                self.head = self.head.max(number);
                self.stats.head.store(self.head, Ordering::Relaxed);
                self.private_windows(number);
                self.stuck(number);
                self.reverify(number);
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
            HeadEvent::Reorg {
                common_ancestor, ..
            } => self.reorg(common_ancestor),
        }
    }

    /// A resumed follower came back from the redial thread.
    fn on_redialled(&mut self) -> usize {
        let Ok(mut heads) = self.redial_rx.try_recv() else {
            return 0;
        };
        if let Err(e) = heads.register(self.poll.registry(), SOCKET) {
            tracing::warn!(error = %e, "cannot register the resumed head subscription");
            let _ = self.redial_tx.send(heads);
            return 0;
        }
        tracing::info!("head subscription resumed");
        self.stats.subscribed.store(true, Ordering::Relaxed);
        self.stats.resubscribes.fetch_add(1, Ordering::Relaxed);
        self.heads = Some(heads);
        1
    }
}

/// The `revert-reason` thread: replays a reverted transaction with `eth_call` at its
/// block and reads the node's error (`execution reverted: <reason>`). `(hash, raw, from,
/// block)` in, `(hash, reason)` out (`None`: the node gave none), then the stage is woken.
#[derive(Debug)]
struct Reasons {
    ask: Sender<(B256, Vec<u8>, alloy_primitives::Address, u64)>,
    answers: Receiver<(B256, Option<String>)>,
}

impl Reasons {
    fn spawn(urls: Vec<String>, waker: Arc<mio::Waker>) -> std::io::Result<Self> {
        let (ask, asked) =
            crossbeam_channel::unbounded::<(B256, Vec<u8>, alloy_primitives::Address, u64)>();
        let (tell, answers) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("revert-reason".into())
            .spawn(move || {
                let mut rpc: Option<venues::RpcClient> = None;
                let mut next = 0usize;
                while let Ok((hash, raw, from, block)) = asked.recv() {
                    let mut reason = None;
                    for _ in 0..urls.len() {
                        if rpc.is_none() {
                            rpc = venues::RpcClient::connect(&urls[next % urls.len()]).ok();
                        }
                        let Some(c) = rpc.as_mut() else {
                            next += 1;
                            continue;
                        };
                        match replay(c, &raw, from, block) {
                            Ok(r) => {
                                reason = r;
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "revert reason lookup failed");
                                rpc = None;
                                next += 1;
                            }
                        }
                    }
                    if tell.send((hash, reason)).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
            })?;
        Ok(Self { ask, answers })
    }
}

/// Replays `raw` (sent by `from`, included in `block`) with `eth_call` on the state it
/// ran on; the revert reason the node reports, if any. A connection error is `Err`.
fn replay(
    rpc: &mut venues::RpcClient,
    raw: &[u8],
    from: alloy_primitives::Address,
    block: u64,
) -> Result<Option<String>, venues::VenueError> {
    use alloy_consensus::Transaction;
    use alloy_eips::eip2718::Decodable2718;
    let Ok(tx) = alloy_consensus::TxEnvelope::decode_2718(&mut &raw[..]) else {
        return Ok(None);
    };
    let call = serde_json::json!({
        "from": from,
        "to": tx.to(),
        "gas": format!("0x{:x}", tx.gas_limit()),
        "value": tx.value(),
        "input": tx.input(),
    });
    // The state before the block: the transaction ran on it (earlier transactions of the
    // same block aside).
    let at = format!("0x{:x}", block.saturating_sub(1));
    match rpc.call::<serde_json::Value>("eth_call", serde_json::json!([call, at])) {
        Ok(_) => Ok(None),
        Err(venues::VenueError::Rpc { message, .. }) => Ok(Some(
            message
                .strip_prefix("execution reverted: ")
                .unwrap_or(&message)
                .to_owned(),
        )),
        Err(e) => Err(e),
    }
}

/// Receipt lookups by hash on their own thread (a blocking RPC round trip never runs on
/// the stage): `(seq, hash)` in, `(seq, hash, receipt)` out, then the stage is woken.
#[derive(Debug)]
struct Lookup {
    ask: Sender<(u64, B256)>,
    answers: Receiver<(u64, B256, Looked)>,
}

impl Lookup {
    /// Asks on `urls[0]`, and on the next URL in turn whenever one fails.
    fn spawn(urls: Vec<String>, waker: Arc<mio::Waker>) -> std::io::Result<Self> {
        let (ask, asked) = crossbeam_channel::unbounded::<(u64, B256)>();
        let (tell, answers) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("receipt-lookup".into())
            .spawn(move || {
                let mut rpc: Option<venues::RpcClient> = None;
                let mut next = 0usize;
                while let Ok((seq, hash)) = asked.recv() {
                    let mut found = Looked::Unknown;
                    for _ in 0..urls.len() {
                        if rpc.is_none() {
                            rpc = venues::RpcClient::connect(&urls[next % urls.len()]).ok();
                        }
                        match rpc.as_mut().map(|r| r.receipt(hash)) {
                            Some(Ok(r)) => {
                                found = r.map_or(Looked::Absent, Looked::Found);
                                break;
                            }
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "receipt lookup failed");
                                rpc = None;
                            }
                            None => {}
                        }
                        next += 1;
                    }
                    if tell.send((seq, hash, found)).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
            })?;
        Ok(Self { ask, answers })
    }
}

/// The redial thread: resumes a lost follower on the first URL that answers, trying them
/// in turn with a growing pause (50 ms doubling to 2 s), and sends it back.
fn spawn_redial(
    urls: Vec<String>,
    waker: Arc<mio::Waker>,
) -> std::io::Result<(Sender<HeadFollower>, Receiver<HeadFollower>)> {
    let (lost_tx, lost_rx) = crossbeam_channel::bounded::<HeadFollower>(1);
    let (back_tx, back_rx) = crossbeam_channel::bounded::<HeadFollower>(1);
    std::thread::Builder::new()
        .name("receipts-redial".into())
        .spawn(move || {
            let mut next_url = 0;
            while let Ok(mut lost) = lost_rx.recv() {
                let mut pause = Duration::from_millis(50);
                loop {
                    std::thread::sleep(pause);
                    let url = &urls[next_url % urls.len()];
                    match HeadFollower::resume(url, lost) {
                        Ok(f) => {
                            if back_tx.send(f).is_err() {
                                return;
                            }
                            let _ = waker.wake();
                            break;
                        }
                        Err(failed) => {
                            let (e, prev) = *failed;
                            tracing::warn!(url = %url, error = %e, "head subscription redial failed");
                            lost = prev;
                            next_url += 1;
                            pause = (pause * 2).min(Duration::from_secs(2));
                        }
                    }
                }
            }
        })?;
    Ok((lost_tx, back_rx))
}

impl Stage for ReceiptsStage {
    type In = TxMsg;
    type Out = NoMessage;

    fn name(&self) -> &'static str {
        "receipts"
    }

    fn on_start(&mut self, input: &Arc<Signal>) {
        // Before any head can confirm them: what a restart found included.
        let now = now_raw();
        for (seq, origin, r) in std::mem::take(&mut self.announce) {
            let event = self.included_event(seq, origin, &r, "", now);
            self.status.send(event);
        }
        let w = Arc::clone(&self.waker);
        input.set_waker(Waker::Custom(Arc::new(move || {
            let _ = w.wake();
        })));
    }

    fn on_message<E: Emit<NoMessage>>(&mut self, msg: TxMsg, _out: &mut E) {
        // The raw transaction's slot came along from broadcast: keep the bytes (to send
        // them again after a reorg) and release the slot.
        if msg.raw.is_some() {
            // The newest transaction of the intent is the one to send again.
            {
                // SAFETY: this stage holds the message, hence owns its raw slot until the
                // release just below.
                let bytes = unsafe { self.blobs.bytes(msg.raw) };
                self.kept.insert(
                    msg.seq,
                    Kept {
                        origin: msg.origin,
                        account: msg.account,
                        nonce: msg.nonce,
                        tx_hash: msg.tx_hash,
                        asset: msg.asset,
                        route: msg.route,
                        public_fallback: msg.public_fallback,
                        first_raw: msg.hops.first().unwrap_or(0),
                        purpose: msg.purpose,
                        generation: msg.generation,
                        raw: bytes.to_vec(),
                    },
                );
            }
            self.blobs.release(msg.raw);
        }
        let w = Watch {
            seq: msg.seq,
            origin: msg.origin,
            first_raw: msg.hops.first().unwrap_or(0),
            max_block: if msg.route == Route::Private {
                msg.max_block
            } else {
                0
            },
            purpose: msg.purpose,
            since_head: self.head,
        };
        if msg.generation > 0 {
            self.replaced.insert(msg.seq);
        }
        if msg.verify && !self.recent.contains_key(&msg.tx_hash) {
            // "nonce too low": on chain already, or the nonce went to another transaction.
            let asked = self.lookup.ask.send((msg.seq, msg.tx_hash)).is_ok();
            self.verifying.insert(
                msg.tx_hash,
                Verifying {
                    since: self.head,
                    asked: asked.then_some(self.head),
                },
            );
        }
        if let Some(r) = self.recent.get(&msg.tx_hash).copied() {
            self.include(w, &r);
        } else {
            self.watching.insert(msg.tx_hash, w);
        }
    }

    fn poll_extra<E: Emit<NoMessage>>(&mut self, _out: &mut E) -> usize {
        let mut n = self.on_lookups() + self.on_reasons();
        if self.heads.is_none() {
            n += self.on_redialled();
        }
        let Some(heads) = self.heads.as_mut() else {
            return n;
        };
        let mut evs = std::mem::take(&mut self.pending_events);
        let res = heads.poll(|ev| evs.push(ev));
        n += evs.len();
        for ev in evs.drain(..) {
            self.on_head_event(ev);
        }
        self.pending_events = evs;
        if let Err(e) = res
            && !matches!(e, venues::VenueError::Rpc { .. })
        {
            // The subscription is gone: the redial thread resumes it elsewhere.
            tracing::warn!(error = %e, "head subscription lost; resuming");
            self.stats.subscribed.store(false, Ordering::Relaxed);
            if let Some(lost) = self.heads.take() {
                // Its socket leaves the poller when the redial thread drops it.
                if self.redial_tx.send(lost).is_err() {
                    panic!("head subscription lost and the redial thread is gone: {e}");
                }
            }
        }
        n
    }

    fn owns_park(&self) -> bool {
        true
    }

    fn park(&mut self, timeout: Option<Duration>) {
        let t = if self.heads.is_none() {
            // Redialling: look again soon even if no wake-up comes.
            Some(timeout.map_or(Duration::from_millis(100), |t| {
                t.min(Duration::from_millis(100))
            }))
        } else {
            timeout
        };
        let _ = self.poll.poll(&mut self.events, t);
    }
}
