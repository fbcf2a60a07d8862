//! Signing: the single owner of every account's nonce. Builds the EIP-1559 transaction
//! from the cached chain id and fee view, signs its hash with the account's key, and
//! writes the raw bytes into a blob slot for broadcast.
//!
//! Two ways to sign, chosen per account by its custody ([`crate::custody`]):
//!
//! - **Inline** ([`AnySigner::Sync`]: local key, warm HSM session): signed on this thread.
//! - **Through the async worker** ([`AnySigner::Async`]: KMS, MPC, or a pair with a
//!   standby): the stage assigns the nonce, submits `(account, seq, hash)` to the
//!   [`AsyncWorker`] without blocking, and keeps the unsigned transaction in the account's
//!   in-flight queue. The worker releases results in submission order per account; the
//!   stage takes them in [`Stage::poll_extra`] (the worker wakes the stage's thread),
//!   encodes the signed transaction and emits it. Intents of one account therefore leave
//!   in the order they came in; other accounts and inline accounts do not wait for them.
//!
//! When an async signer fails for nonce `n`, nonce `n` must not stay a gap: the account's
//! later requests still in flight (built on `n+1`, `n+2`, …) are set aside and resubmitted
//! on `n`, `n+1`, … in their original order; their old results are discarded.
//!
//! When an account's signer has nothing ready (an MPC pool with fewer presignatures than
//! requests in flight), the intent gets a `signing_wait` event and is signed when one is.
//!
//! # After signing: replacements, cancellations, gaps
//!
//! The stage keeps every transaction it signed ([`Live`]) until the receipt watcher says
//! it is settled, and takes [`NonceNotice`]s from the later stages and the desk edge
//! through a channel polled between messages (the sender wakes the stage):
//! - `Stuck`: not included for a while: the same transaction is signed again on the same
//!   nonce with both fees raised by at least 10 % (what nodes require of a replacement)
//!   and at least to the current fees; the desk gets `replaced` with the new hash. If that
//!   would pass the intent's fee cap, the desk gets `fee_wait` once and the transaction
//!   stays as it is (it is included when fees fall).
//! - `Cancel`: before signing, the intent is dropped when it reaches this stage
//!   (`cancelled`); after signing, a zero-value transfer to itself takes the nonce with
//!   raised fees (`replaced`, then `cancelled` when it is included).
//! - `Void`: no provider took the signed transaction (it failed): if it was the account's
//!   newest nonce, the nonce is simply used again; otherwise a zero-value transfer to
//!   itself fills it, so the account's later transactions are not stuck behind a gap.
//! - `Settled`: confirmed: forgotten, its calldata slot released.
//! - `Behind`: the node answered "nonce too low" (the key was used outside the engine):
//!   nothing is filled; a reconcile thread reads the account's `pending` count from the
//!   chain and the stage moves the account's next nonce forward to it. Start-up reads the
//!   same count.
//!
//! Two different transactions on one nonce exist only as such intended replacements.
//! Inline keys sign replacements at once; async keys (KMS, MPC) get them queued at the
//! worker behind the account's earlier requests (in order, on their fixed nonce: a
//! rewind after a failed signature never renumbers them), emitted on completion.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, Signature, U256};
use pipeline::{Emit, Recorder, Signal, Stage, now_raw, ticks_to_ns};
use signers::AnySigner;
use signers::worker::{AsyncWorker, Completion, SubmitError};
use venues::FeeView;

use crate::blob::{BLOB_SIZE, BlobPool, BlobRef};
use crate::msg::{IntentMsg, Reason, State, StatusMsg, TxMsg, TxPurpose};
use crate::risk::kill::KillSwitch;
use crate::stages::StatusSink;
use crate::txbuild::Eip1559;

/// Where the async worker finds the stage's wake-up (set when the stage's thread starts).
pub type WakeCell = Arc<OnceLock<Arc<Signal>>>;

/// What later stages and the desk edge tell the signing stage about an intent it signed
/// (or will sign), by sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonceNotice {
    /// No provider took the signed transaction: its nonce must not stay a gap.
    Void {
        /// Intent.
        seq: u64,
    },
    /// Not included for a while: replace it with higher fees.
    Stuck {
        /// Intent.
        seq: u64,
    },
    /// The desk cancels it.
    Cancel {
        /// Intent.
        seq: u64,
    },
    /// Confirmed: forget it.
    Settled {
        /// Intent.
        seq: u64,
    },
    /// The node said "nonce too low": the chain is ahead of the account's nonce here
    /// (the key was used outside the engine). Reconcile with the chain.
    Behind {
        /// Intent.
        seq: u64,
    },
}

/// Reads accounts' nonces from the chain for the signing stage, on its own thread (a
/// blocking RPC round trip never runs on the stage). Answers `(account, pending count)`
/// and wakes the stage.
#[derive(Debug)]
struct Reconciler {
    ask: crossbeam_channel::Sender<(u16, Address)>,
    answers: crossbeam_channel::Receiver<(u16, u64)>,
}

impl Reconciler {
    fn spawn(node_ws_url: String, wake: WakeCell) -> std::io::Result<Self> {
        let (ask, asked) = crossbeam_channel::unbounded::<(u16, Address)>();
        let (tell, answers) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("nonce-reconcile".into())
            .spawn(move || {
                let mut rpc: Option<venues::RpcClient> = None;
                while let Ok((a, addr)) = asked.recv() {
                    if rpc.is_none() {
                        rpc = venues::RpcClient::connect(&node_ws_url).ok();
                    }
                    let count = rpc.as_mut().map(|r| r.transaction_count(addr, "pending"));
                    match count {
                        Some(Ok(n)) => {
                            if tell.send((a, n)).is_err() {
                                return;
                            }
                            if let Some(s) = wake.get() {
                                s.notify();
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "nonce reconcile failed");
                            rpc = None;
                        }
                        None => tracing::warn!("nonce reconcile: node unreachable"),
                    }
                }
            })?;
        Ok(Self { ask, answers })
    }
}

/// The sending side of the signing stage's notice channel; wakes the stage.
#[derive(Clone, Debug)]
pub struct Notices {
    tx: crossbeam_channel::Sender<NonceNotice>,
    wake: WakeCell,
}

impl Notices {
    /// Hands `n` to the signing stage and wakes it if it sleeps.
    pub fn send(&self, n: NonceNotice) {
        if self.tx.send(n).is_ok()
            && let Some(s) = self.wake.get()
        {
            s.notify();
        }
    }
}

/// Attempts at filling one nonce before the stage gives up (and says so in the log).
const MAX_FILLS: u16 = 3;

/// A transaction the stage signed, kept until settled: enough to replace it.
#[derive(Clone, Copy, Debug)]
struct Live {
    /// The intent (its calldata slot is held until settled).
    msg: IntentMsg,
    nonce: u64,
    max_fee: u128,
    tip: u128,
    generation: u16,
    /// A cancellation took its nonce.
    cancelling: bool,
    /// `fee_wait` was reported (once).
    fee_wait: bool,
}

/// Raised fees for a replacement: at least +10 % (and one wei) on both, and at least the
/// current market, the tip never above the cap.
pub fn bumped_fees(max_fee: u128, tip: u128, now_max: u128, now_tip: u128) -> (u128, u128) {
    let tip2 = (tip + tip / 10 + 1).max(now_tip);
    let max2 = (max_fee + max_fee / 10 + 1).max(now_max).max(tip2);
    (max2, tip2)
}

/// How long shutdown waits for requests still at an async signer.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// One account as the signing stage sees it.
#[derive(Debug)]
pub struct SigningAccount {
    /// The key (with its standby, when it has one).
    pub signer: AnySigner,
    /// Index of the key at the async worker (`Some` exactly for async keys).
    pub worker_index: Option<u16>,
    /// Its address (cached from the signer).
    pub from: Address,
    /// Next nonce to assign (read from the chain at start, then owned here).
    pub next_nonce: u64,
}

/// A transaction handed to the async worker and not yet back.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    msg: IntentMsg,
    raw: BlobRef,
    nonce: u64,
    max_fee: u128,
    tip: u128,
    /// Superseded by a resubmission after an earlier failure: its result is discarded.
    stale: bool,
    /// An intent's own transaction, or a replacement of one already signed (fixed
    /// nonce: never renumbered by a rewind).
    purpose: TxPurpose,
}

/// Per-account state of async signing.
#[derive(Debug, Default)]
struct AsyncState {
    in_flight: VecDeque<InFlight>,
}

/// The signing stage.
#[derive(Debug)]
pub struct SigningStage {
    accounts: Vec<SigningAccount>,
    queues: Vec<AsyncState>,
    /// Worker index → account index.
    by_worker: Vec<u16>,
    worker: Option<Arc<AsyncWorker>>,
    wake: WakeCell,
    done: Vec<Completion>,
    queue_limit: usize,
    chain_id: u64,
    fees: Arc<FeeView>,
    blobs: Arc<BlobPool>,
    status: StatusSink,
    sign_time: Recorder,
    kill: Arc<KillSwitch>,
    scratch: Box<[u8; BLOB_SIZE]>,
    live: std::collections::HashMap<u64, Live>,
    /// Intents cancelled before they reached this stage.
    cancels: std::collections::HashSet<u64>,
    notices_tx: crossbeam_channel::Sender<NonceNotice>,
    notices_rx: crossbeam_channel::Receiver<NonceNotice>,
    reconciler: Option<Reconciler>,
    /// The journal's `signing` lane: every transaction is recorded (nonce and raw bytes)
    /// before it leaves this stage.
    journal: Option<crate::journal::LaneWriter>,
}

/// The async side of the stage: the worker, where it wakes the stage, and how many
/// requests one account may have in flight.
#[derive(Debug, Clone)]
pub struct AsyncSigning {
    /// The worker the async keys are registered with.
    pub worker: Arc<AsyncWorker>,
    /// Filled by the stage on its thread; read by the worker's wake callback.
    pub wake: WakeCell,
    /// In-flight requests per account at most (beyond: `overloaded`).
    pub queue_limit: usize,
}

impl SigningStage {
    /// A stage for `accounts` on chain `chain_id`; `asynced` is required when any account's
    /// key is async.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        accounts: Vec<SigningAccount>,
        asynced: Option<AsyncSigning>,
        chain_id: u64,
        fees: Arc<FeeView>,
        blobs: Arc<BlobPool>,
        status: StatusSink,
        sign_time: Recorder,
        kill: Arc<KillSwitch>,
    ) -> Self {
        let queue_limit = asynced.as_ref().map_or(0, |a| a.queue_limit.max(1));
        let mut by_worker = Vec::new();
        let queues = accounts
            .iter()
            .enumerate()
            .map(|(i, a)| match a.worker_index {
                Some(w) => {
                    let w = usize::from(w);
                    if by_worker.len() <= w {
                        by_worker.resize(w + 1, u16::MAX);
                    }
                    by_worker[w] = u16::try_from(i).unwrap_or(u16::MAX);
                    AsyncState {
                        in_flight: VecDeque::with_capacity(queue_limit),
                    }
                }
                None => AsyncState::default(),
            })
            .collect();
        let (worker, wake) = match asynced {
            Some(a) => (Some(a.worker), a.wake),
            None => (None, Arc::new(OnceLock::new())),
        };
        let done_cap = if worker.is_some() { 1024 } else { 0 };
        // Bounded (preallocated): neither side allocates; a sender waits only if the stage
        // is this far behind.
        let (notices_tx, notices_rx) = crossbeam_channel::bounded(1 << 16);
        Self {
            live: std::collections::HashMap::with_capacity(1 << 16),
            cancels: std::collections::HashSet::with_capacity(64),
            notices_tx,
            notices_rx,
            reconciler: None,
            journal: None,
            accounts,
            queues,
            by_worker,
            worker,
            wake,
            done: Vec::with_capacity(done_cap),
            queue_limit,
            chain_id,
            fees,
            blobs,
            status,
            sign_time,
            kill,
            scratch: Box::new([0u8; BLOB_SIZE]),
        }
    }

    /// Records every signed transaction in `lane` before handing it on.
    pub fn set_journal(&mut self, lane: crate::journal::LaneWriter) {
        self.journal = Some(lane);
    }

    /// Takes back a transaction signed before a restart and not settled yet (from the
    /// journal): it can be replaced, cancelled and filled like one signed in this run.
    /// `msg.data` must hold its calldata (a slot this stage now owns).
    pub fn recover(
        &mut self,
        msg: IntentMsg,
        nonce: u64,
        max_fee: u128,
        tip: u128,
        generation: u16,
    ) {
        let a = msg.account.0 as usize;
        if let Some(acc) = self.accounts.get_mut(a) {
            acc.next_nonce = acc.next_nonce.max(nonce + 1);
        }
        self.live.insert(
            msg.seq,
            Live {
                msg,
                nonce,
                max_fee,
                tip,
                generation,
                cancelling: false,
                fee_wait: false,
            },
        );
    }

    /// Records a signed transaction; its journal position (0 without a journal).
    #[allow(clippy::too_many_arguments)]
    fn journal_signed(
        &mut self,
        msg: &IntentMsg,
        tx: &TxMsg,
        max_fee: u128,
        tip: u128,
    ) -> Result<u64, crate::journal::JournalError> {
        let Some(lane) = &mut self.journal else {
            return Ok(0);
        };
        let from = self.accounts[msg.account.0 as usize].from;
        // SAFETY: this stage claimed `tx.raw` and wrote it; nothing else holds it yet.
        let raw = unsafe { self.blobs.bytes(tx.raw) };
        crate::recovery::append_signed(lane, tx, from, max_fee, tip, raw).map(|p| p.0)
    }

    /// The handle later stages and the desk edge use to reach this stage.
    pub fn notices(&self) -> Notices {
        Notices {
            tx: self.notices_tx.clone(),
            wake: Arc::clone(&self.wake),
        }
    }

    /// Reads nonces from the chain at `node_ws_url` when a node says an account's nonce is
    /// behind (see [`NonceNotice::Behind`]).
    pub fn set_reconcile(&mut self, node_ws_url: String) -> std::io::Result<()> {
        self.reconciler = Some(Reconciler::spawn(node_ws_url, Arc::clone(&self.wake))?);
        Ok(())
    }

    fn drain_notices<E: Emit<TxMsg>>(&mut self, out: &mut E) -> usize {
        let mut n = 0;
        if let Some(r) = &self.reconciler {
            while let Ok((a, chain)) = r.answers.try_recv() {
                n += 1;
                let acct = &mut self.accounts[a as usize];
                // Only forward: nonces this stage assigned and the node has not seen yet
                // are counted by `pending` as soon as they reach it.
                if chain > acct.next_nonce {
                    tracing::warn!(
                        account = a,
                        from = acct.next_nonce,
                        to = chain,
                        "account nonce behind the chain; moved forward"
                    );
                    acct.next_nonce = chain;
                }
            }
        }
        while let Ok(notice) = self.notices_rx.try_recv() {
            n += 1;
            match notice {
                NonceNotice::Settled { seq } => {
                    if let Some(l) = self.live.remove(&seq) {
                        self.blobs.release(l.msg.data);
                    }
                }
                NonceNotice::Stuck { seq } => self.on_stuck(seq, out),
                NonceNotice::Cancel { seq } => self.on_cancel(seq, out),
                NonceNotice::Void { seq } => self.on_void(seq, out),
                NonceNotice::Behind { seq } => {
                    if let Some(l) = self.live.remove(&seq) {
                        self.blobs.release(l.msg.data);
                        let a = l.msg.account.0;
                        if let Some(r) = &self.reconciler {
                            let _ = r.ask.send((a, self.accounts[a as usize].from));
                        }
                    }
                }
            }
        }
        n
    }

    fn on_stuck<E: Emit<TxMsg>>(&mut self, seq: u64, out: &mut E) {
        let Some(l) = self.live.get(&seq).copied() else {
            return;
        };
        let fee = self.fees.load();
        let (now_max, now_tip) = fees_for(fee.base_fee_per_gas, fee.max_priority_fee_per_gas, 0);
        let (max_fee, tip) = bumped_fees(l.max_fee, l.tip, now_max, now_tip);
        let cap = l.msg.max_fee_cap;
        if !l.cancelling && cap != 0 && max_fee > cap {
            if !l.fee_wait {
                if let Some(e) = self.live.get_mut(&seq) {
                    e.fee_wait = true;
                }
                self.status.send(StatusMsg {
                    nonce: l.nonce,
                    ..StatusMsg::refusal(
                        seq,
                        l.msg.origin,
                        State::FeeWait,
                        Reason::None,
                        "not included yet, and a replacement would pass the intent's fee cap; waiting for fees to fall",
                        now_raw(),
                    )
                });
            }
            return;
        }
        let purpose = if l.cancelling {
            TxPurpose::Cancel
        } else {
            TxPurpose::Replacement
        };
        self.replace(seq, purpose, max_fee, tip, out);
    }

    fn on_cancel<E: Emit<TxMsg>>(&mut self, seq: u64, out: &mut E) {
        let Some(l) = self.live.get(&seq).copied() else {
            // Not signed yet: dropped when it gets here.
            self.cancels.insert(seq);
            return;
        };
        if l.cancelling {
            return;
        }
        let fee = self.fees.load();
        let (now_max, now_tip) = fees_for(fee.base_fee_per_gas, fee.max_priority_fee_per_gas, 0);
        let (max_fee, tip) = bumped_fees(l.max_fee, l.tip, now_max, now_tip);
        self.replace(seq, TxPurpose::Cancel, max_fee, tip, out);
    }

    fn on_void<E: Emit<TxMsg>>(&mut self, seq: u64, out: &mut E) {
        let Some(l) = self.live.get(&seq).copied() else {
            return;
        };
        let a = l.msg.account.0 as usize;
        if self.accounts[a].next_nonce == l.nonce + 1 && self.queues[a].in_flight.is_empty() {
            // The newest nonce: nothing came after it, so it is simply used again.
            self.accounts[a].next_nonce = l.nonce;
            if let Some(l) = self.live.remove(&seq) {
                self.blobs.release(l.msg.data);
            }
            return;
        }
        if l.generation >= MAX_FILLS {
            tracing::error!(
                seq,
                nonce = l.nonce,
                "the nonce could not be filled; the account's later transactions wait behind it"
            );
            return;
        }
        let fee = self.fees.load();
        let (now_max, now_tip) = fees_for(fee.base_fee_per_gas, fee.max_priority_fee_per_gas, 0);
        let (max_fee, tip) = bumped_fees(l.max_fee, l.tip, now_max, now_tip);
        tracing::warn!(
            seq,
            nonce = l.nonce,
            "filling the nonce of a transaction no provider took with a zero-value transfer"
        );
        self.replace(seq, TxPurpose::Filler, max_fee, tip, out);
    }

    /// The transaction a replacement of `purpose` makes for `msg` on `nonce`: the same
    /// one (`Replacement`), or a zero-value transfer to `from` (`Cancel`, `Filler`).
    fn replacement_tx<'b>(
        &self,
        blobs: &'b BlobPool,
        msg: &IntentMsg,
        purpose: TxPurpose,
        nonce: u64,
        max_fee: u128,
        tip: u128,
    ) -> Eip1559<'b> {
        let own = matches!(purpose, TxPurpose::Intent | TxPurpose::Replacement);
        let from = self.accounts[msg.account.0 as usize].from;
        Eip1559 {
            chain_id: self.chain_id,
            nonce,
            max_priority_fee_per_gas: tip,
            max_fee_per_gas: max_fee,
            gas_limit: if own { msg.gas_limit } else { 21_000 },
            to: if own { msg.to } else { from },
            value: if own { msg.value } else { U256::ZERO },
            input: if own { Self::input(blobs, msg) } else { &[] },
        }
    }

    /// Signs a new transaction on `seq`'s nonce: the same transaction with other fees
    /// (`Replacement`), or a zero-value transfer to itself (`Cancel`, `Filler`). Inline
    /// keys sign it here and it is emitted at once; async keys get it queued at the
    /// worker behind the account's earlier requests, and it is emitted on completion.
    fn replace<E: Emit<TxMsg>>(
        &mut self,
        seq: u64,
        purpose: TxPurpose,
        max_fee: u128,
        tip: u128,
        out: &mut E,
    ) {
        let Some(l) = self.live.get(&seq).copied() else {
            return;
        };
        let a = l.msg.account.0 as usize;
        let blobs = Arc::clone(&self.blobs);
        let tx = self.replacement_tx(&blobs, &l.msg, purpose, l.nonce, max_fee, tip);
        let Some(hash) = tx.signing_hash(&mut self.scratch[..]) else {
            return;
        };
        let Some(raw) = self.blobs.claim() else {
            tracing::warn!(seq, ?purpose, "no buffer for a replacement");
            return;
        };
        let signer = match &self.accounts[a].signer {
            AnySigner::Sync(s) => Arc::clone(s),
            AnySigner::Async(_) => {
                let f = InFlight {
                    msg: l.msg,
                    raw,
                    nonce: l.nonce,
                    max_fee,
                    tip,
                    stale: false,
                    purpose,
                };
                if self.queues[a].in_flight.len() >= self.queue_limit
                    || !self.submit_hash(a, f, hash)
                {
                    self.blobs.release(raw);
                    tracing::warn!(
                        seq,
                        ?purpose,
                        "the account's signer could not take a replacement now"
                    );
                }
                return;
            }
        };
        let Ok(sig) = signer.sign_hash(&hash) else {
            self.blobs.release(raw);
            tracing::warn!(seq, ?purpose, "replacement could not be signed");
            return;
        };
        self.emit_replacement(seq, purpose, raw, max_fee, tip, &sig, out);
    }

    /// Encodes a signed replacement into `raw`, reports it and emits it for broadcast.
    #[allow(clippy::too_many_arguments)]
    fn emit_replacement<E: Emit<TxMsg>>(
        &mut self,
        seq: u64,
        purpose: TxPurpose,
        raw: BlobRef,
        max_fee: u128,
        tip: u128,
        sig: &Signature,
        out: &mut E,
    ) {
        let Some(l) = self.live.get(&seq).copied() else {
            self.blobs.release(raw);
            return;
        };
        let blobs = Arc::clone(&self.blobs);
        let tx = self.replacement_tx(&blobs, &l.msg, purpose, l.nonce, max_fee, tip);
        // SAFETY: `raw` was claimed by this stage for this replacement and is not shared.
        let slot = unsafe { self.blobs.slot_mut(raw) };
        let Some((len, tx_hash)) = tx.encode_signed(sig, &mut slot[..]) else {
            self.blobs.release(raw);
            return;
        };
        let from = self.accounts[l.msg.account.0 as usize].from;
        let generation = l.generation.saturating_add(1);
        if let Some(e) = self.live.get_mut(&seq) {
            e.max_fee = max_fee;
            e.tip = tip;
            e.generation = generation;
            e.cancelling |= purpose == TxPurpose::Cancel;
        }
        let now = now_raw();
        if purpose != TxPurpose::Filler {
            self.status.send(StatusMsg {
                tx_hash,
                from,
                nonce: l.nonce,
                ..StatusMsg::event(seq, l.msg.origin, State::Replaced, now)
            });
        }
        let own = purpose == TxPurpose::Replacement;
        let mut tx = TxMsg {
            seq,
            origin: l.msg.origin,
            account: l.msg.account,
            nonce: l.nonce,
            tx_hash,
            raw: BlobRef {
                slot: raw.slot,
                len: len as u32,
            },
            asset: l.msg.asset,
            urgent: true,
            route: if l.msg.route == crate::msg::Route::Private && own {
                crate::msg::Route::Private
            } else {
                crate::msg::Route::Public
            },
            purpose,
            generation,
            hops: pipeline::Hops::starting_at(now),
            ..TxMsg::default()
        };
        match self.journal_signed(&l.msg, &tx, max_fee, tip) {
            Ok(p) => tx.jpos = p,
            Err(e) => {
                // Not recorded, so not sent: the transaction it would replace stands.
                tracing::error!(seq, error = %e, "journal append failed; replacement not sent");
                self.blobs.release(tx.raw);
                return;
            }
        }
        out.emit(tx);
    }

    fn fail(&self, msg: &IntentMsg, reason: Reason, detail: &str) {
        self.blobs.release(msg.data);
        self.status.send(StatusMsg::refusal(
            msg.seq,
            msg.origin,
            State::Failed,
            reason,
            detail,
            now_raw(),
        ));
    }

    fn input<'a>(blobs: &'a BlobPool, msg: &IntentMsg) -> &'a [u8] {
        if msg.data.is_some() {
            // SAFETY: the signing stage holds the message (in the ring hand-off or in its
            // in-flight queue), hence owns its calldata slot; the slot is only read here.
            unsafe { blobs.bytes(msg.data) }
        } else {
            &[]
        }
    }

    /// The signing hash of `msg` on `nonce` with the given fees.
    fn hash_of(&mut self, msg: &IntentMsg, nonce: u64, max_fee: u128, tip: u128) -> Option<B256> {
        let tx = Eip1559 {
            chain_id: self.chain_id,
            nonce,
            max_priority_fee_per_gas: tip,
            max_fee_per_gas: max_fee,
            gas_limit: msg.gas_limit,
            to: msg.to,
            value: msg.value,
            input: Self::input(&self.blobs, msg),
        };
        tx.signing_hash(&mut self.scratch[..])
    }

    /// Encodes the signed transaction into `raw`, reports `signed` and emits it. On a
    /// buffer overflow the intent fails and `false` is returned (its nonce stays unused).
    #[allow(clippy::too_many_arguments)]
    fn finish<E: Emit<TxMsg>>(
        &mut self,
        msg: &IntentMsg,
        raw: BlobRef,
        nonce: u64,
        max_fee: u128,
        tip: u128,
        sig: &Signature,
        at: u64,
        out: &mut E,
    ) -> bool {
        let tx = Eip1559 {
            chain_id: self.chain_id,
            nonce,
            max_priority_fee_per_gas: tip,
            max_fee_per_gas: max_fee,
            gas_limit: msg.gas_limit,
            to: msg.to,
            value: msg.value,
            input: Self::input(&self.blobs, msg),
        };
        // SAFETY: `raw` was claimed by this stage for this intent and is not shared.
        let slot = unsafe { self.blobs.slot_mut(raw) };
        let Some((len, tx_hash)) = tx.encode_signed(sig, &mut slot[..]) else {
            self.blobs.release(raw);
            self.fail(msg, Reason::Overloaded, "transaction larger than a buffer");
            return false;
        };
        let mut tx = TxMsg {
            seq: msg.seq,
            origin: msg.origin,
            account: msg.account,
            nonce,
            tx_hash,
            raw: BlobRef {
                slot: raw.slot,
                len: len as u32,
            },
            asset: msg.asset,
            urgent: msg.urgent,
            route: msg.route,
            public_fallback: msg.public_fallback,
            hops: msg.hops,
            ..TxMsg::default()
        };
        match self.journal_signed(msg, &tx, max_fee, tip) {
            Ok(p) => tx.jpos = p,
            Err(e) => {
                // Not recorded, so never sent: the intent fails and its nonce stays unused.
                tracing::error!(seq = msg.seq, error = %e, "journal append failed; transaction not sent");
                self.blobs.release(raw);
                self.fail(
                    msg,
                    Reason::JournalUnavailable,
                    "the signed transaction could not be journaled; it was not sent",
                );
                return false;
            }
        }
        let from = self.accounts[msg.account.0 as usize].from;
        // Kept (calldata slot included) until settled, to replace or cancel it.
        self.live.insert(
            msg.seq,
            Live {
                msg: *msg,
                nonce,
                max_fee,
                tip,
                generation: 0,
                cancelling: false,
                fee_wait: false,
            },
        );
        self.status.send(StatusMsg {
            tx_hash,
            from,
            nonce,
            ..StatusMsg::event(msg.seq, msg.origin, State::Signed, at)
        });
        out.emit(tx);
        // Cancelled while it was at an async signer: signed now, so its nonce is taken
        // by a cancellation right away.
        if !self.cancels.is_empty() && self.cancels.remove(&msg.seq) {
            self.on_cancel(msg.seq, out);
        }
        true
    }

    /// Submits one in-flight request to the worker; on refusal the intent fails.
    fn submit(&mut self, a: usize, f: InFlight) -> bool {
        let Some(hash) = self.hash_of(&f.msg, f.nonce, f.max_fee, f.tip) else {
            self.blobs.release(f.raw);
            self.fail(
                &f.msg,
                Reason::Overloaded,
                "transaction larger than a buffer",
            );
            return false;
        };
        if self.submit_hash(a, f, hash) {
            return true;
        }
        false
    }

    /// Hands `hash` to the worker for account `a` and queues `f` behind the account's
    /// earlier requests. On refusal an intent fails (a replacement is only dropped).
    fn submit_hash(&mut self, a: usize, f: InFlight, hash: B256) -> bool {
        let Some(worker_index) = self.accounts[a].worker_index else {
            return false;
        };
        let Some(worker) = self.worker.as_ref() else {
            return false;
        };
        if f.purpose != TxPurpose::Intent {
            return match worker.try_submit(worker_index, f.msg.seq, hash) {
                Ok(()) => {
                    self.queues[a].in_flight.push_back(f);
                    true
                }
                Err(_) => false,
            };
        }
        match worker.try_submit(worker_index, f.msg.seq, hash) {
            Ok(()) => {
                self.queues[a].in_flight.push_back(f);
                true
            }
            Err(e) => {
                self.blobs.release(f.raw);
                let (reason, text) = match e {
                    SubmitError::Full => (Reason::Overloaded, "the signing worker is full"),
                    SubmitError::UnknownAccount(_) | SubmitError::Stopped => {
                        (Reason::SignerError, "the signing worker has stopped")
                    }
                };
                self.fail(&f.msg, reason, text);
                false
            }
        }
    }

    fn on_async(
        &mut self,
        a: usize,
        msg: IntentMsg,
        raw: BlobRef,
        max_fee: u128,
        tip: u128,
        at: u64,
    ) {
        if self.queues[a].in_flight.len() >= self.queue_limit {
            self.blobs.release(raw);
            self.fail(
                &msg,
                Reason::Overloaded,
                "too many transactions of this account are at its signer",
            );
            return;
        }
        let nonce = self.accounts[a].next_nonce;
        let f = InFlight {
            msg,
            raw,
            nonce,
            max_fee,
            tip,
            stale: false,
            purpose: TxPurpose::Intent,
        };
        if !self.submit(a, f) {
            return;
        }
        self.accounts[a].next_nonce += 1;
        // Tell the desk when its intent waits on the signer (an empty presignature pool).
        if let AnySigner::Async(s) = &self.accounts[a].signer
            && let Some(ready) = s.available()
        {
            let waiting = self.queues[a].in_flight.iter().filter(|f| !f.stale).count();
            if waiting > ready {
                self.status.send(StatusMsg {
                    detail: crate::msg::Detail::new(
                        "the account's signer has no presignature ready; signed when one is",
                    ),
                    ..StatusMsg::event(msg.seq, msg.origin, State::SigningWait, at)
                });
            }
        }
    }

    /// Takes the worker's released results and finishes their transactions.
    fn drain_completions<E: Emit<TxMsg>>(&mut self, out: &mut E) -> usize {
        let Some(worker) = self.worker.as_ref() else {
            return 0;
        };
        let done = &mut self.done;
        let n = worker.poll(&mut |c| done.push(c));
        if n == 0 {
            return 0;
        }
        let mut done = std::mem::take(&mut self.done);
        for c in done.drain(..) {
            self.complete(c, out);
        }
        self.done = done;
        n
    }

    fn complete<E: Emit<TxMsg>>(&mut self, c: Completion, out: &mut E) {
        let Some(&a) = self.by_worker.get(usize::from(c.account_index)) else {
            return;
        };
        let a = usize::from(a);
        let Some(f) = self.queues[a].in_flight.pop_front() else {
            return;
        };
        debug_assert_eq!(f.msg.seq, c.seq, "the worker releases in submission order");
        if f.stale {
            return;
        }
        if f.purpose != TxPurpose::Intent {
            // A replacement of a transaction already out: emitted, or dropped with a log
            // line (the transaction it would have replaced stays as it is).
            match c.result {
                Ok(sig) => {
                    self.emit_replacement(f.msg.seq, f.purpose, f.raw, f.max_fee, f.tip, &sig, out)
                }
                Err(e) => {
                    self.blobs.release(f.raw);
                    tracing::warn!(seq = f.msg.seq, purpose = ?f.purpose, error = %e, "replacement signing failed");
                }
            }
            return;
        }
        let at = now_raw();
        match c.result {
            Ok(sig) => {
                if !self.finish(&f.msg, f.raw, f.nonce, f.max_fee, f.tip, &sig, at, out) {
                    self.rewind(a, f.nonce);
                }
            }
            Err(e) => {
                self.blobs.release(f.raw);
                let (reason, text) = match &e {
                    signers::SignerError::Unavailable { .. } => (
                        Reason::SignerError,
                        format!("the account's signer is unavailable: {e}"),
                    ),
                    _ => (
                        Reason::SignerError,
                        format!("the account's signer failed: {e}"),
                    ),
                };
                tracing::warn!(seq = f.msg.seq, error = %e, "async signing failed");
                self.fail(&f.msg, reason, &text);
                self.rewind(a, f.nonce);
            }
        }
    }

    /// Nonce `nonce` of account `a` will not be used: the requests behind it are set aside
    /// and resubmitted on `nonce`, `nonce + 1`, … in their order, so no gap is left.
    fn rewind(&mut self, a: usize, nonce: u64) {
        self.accounts[a].next_nonce = nonce;
        let behind = self.queues[a].in_flight.len();
        for i in 0..behind {
            let f = self.queues[a].in_flight[i];
            if f.stale || f.purpose != TxPurpose::Intent {
                continue;
            }
            self.queues[a].in_flight[i].stale = true;
            let again = InFlight {
                nonce: self.accounts[a].next_nonce,
                stale: false,
                ..f
            };
            if self.submit(a, again) {
                self.accounts[a].next_nonce += 1;
            }
        }
    }
}

/// Fee cap and tip for a transaction: twice the current base fee plus the tip (room for
/// six blocks of maximal base-fee growth), capped by the desk's own cap when it gave one.
#[inline]
pub fn fees_for(base_fee: u128, tip: u128, desk_cap: u128) -> (u128, u128) {
    let mut max_fee = base_fee.saturating_mul(2).saturating_add(tip);
    if desk_cap != 0 && desk_cap < max_fee {
        max_fee = desk_cap;
    }
    (max_fee, tip.min(max_fee))
}

impl Stage for SigningStage {
    type In = IntentMsg;
    type Out = TxMsg;

    fn name(&self) -> &'static str {
        "signing"
    }

    #[inline]
    fn on_message<E: Emit<TxMsg>>(&mut self, msg: IntentMsg, out: &mut E) {
        // Notices sent before this intent arrived are seen before it (a cancel, above all).
        if !self.notices_rx.is_empty() {
            self.drain_notices(out);
        }
        // Cancelled by the desk before it got here: dropped, no nonce used.
        if !self.cancels.is_empty() && self.cancels.remove(&msg.seq) {
            self.blobs.release(msg.data);
            self.status.send(StatusMsg::event(
                msg.seq,
                msg.origin,
                State::Cancelled,
                now_raw(),
            ));
            return;
        }
        // The kill switch freezes signing at once, also for intents policy let through
        // just before it was turned on (no nonce is used).
        if let Some(k) = self.kill.check(msg.account.0, msg.asset, None) {
            self.fail(&msg, Reason::KillSwitch, k.message());
            return;
        }
        let a = msg.account.0 as usize;
        if a >= self.accounts.len() {
            // Policy lets no unknown account through; kept as a hard guard.
            self.fail(&msg, Reason::UnknownAccount, "account is not configured");
            return;
        }
        let Some(raw) = self.blobs.claim() else {
            self.fail(
                &msg,
                Reason::Overloaded,
                "no buffer for the raw transaction",
            );
            return;
        };
        let fee = self.fees.load();
        let (max_fee, tip) = fees_for(
            fee.base_fee_per_gas,
            fee.max_priority_fee_per_gas,
            msg.max_fee_cap,
        );
        let signer = match &self.accounts[a].signer {
            AnySigner::Sync(s) => Arc::clone(s),
            AnySigner::Async(_) => {
                self.on_async(a, msg, raw, max_fee, tip, now_raw());
                return;
            }
        };
        let nonce = self.accounts[a].next_nonce;
        let Some(hash) = self.hash_of(&msg, nonce, max_fee, tip) else {
            self.blobs.release(raw);
            self.fail(&msg, Reason::Overloaded, "transaction larger than a buffer");
            return;
        };
        let t0 = now_raw();
        let sig = match signer.sign_hash(&hash) {
            Ok(s) => s,
            Err(e) => {
                self.blobs.release(raw);
                let text = match e {
                    signers::SignerError::Unavailable { .. } => {
                        "the account's signer is unavailable"
                    }
                    _ => "the account's signer failed",
                };
                tracing::warn!(seq = msg.seq, error = %e, "signing failed");
                self.fail(&msg, Reason::SignerError, text);
                return;
            }
        };
        let t1 = now_raw();
        self.sign_time.record(ticks_to_ns(t0, t1));
        if self.finish(&msg, raw, nonce, max_fee, tip, &sig, t1, out) {
            self.accounts[a].next_nonce += 1;
        }
    }

    fn poll_extra<E: Emit<TxMsg>>(&mut self, out: &mut E) -> usize {
        self.drain_completions(out) + self.drain_notices(out)
    }

    fn extra_ready(&mut self) -> bool {
        !self.notices_rx.is_empty()
            || self
                .reconciler
                .as_ref()
                .is_some_and(|r| !r.answers.is_empty())
            || self.worker.as_ref().is_some_and(|w| w.has_completions())
    }

    fn on_start(&mut self, input_signal: &Arc<Signal>) {
        let _ = self.wake.set(Arc::clone(input_signal));
    }

    fn on_shutdown<E: Emit<TxMsg>>(&mut self, out: &mut E) {
        // Intents already at an async signer are finished (or failed), never dropped.
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while self.queues.iter().any(|q| !q.in_flight.is_empty()) && Instant::now() < deadline {
            if self.drain_completions(out) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for a in 0..self.queues.len() {
            while let Some(f) = self.queues[a].in_flight.pop_front() {
                if !f.stale {
                    self.blobs.release(f.raw);
                    self.fail(
                        &f.msg,
                        Reason::SignerError,
                        "the engine stopped before the signer answered",
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fees_for;

    #[test]
    fn fee_rules() {
        assert_eq!(fees_for(10, 2, 0), (22, 2));
        assert_eq!(fees_for(10, 2, 15), (15, 2));
        assert_eq!(fees_for(10, 20, 15), (15, 15));
        assert_eq!(fees_for(u128::MAX, 1, 0), (u128::MAX, 1));
    }
}
