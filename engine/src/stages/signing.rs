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

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, Signature};
use pipeline::{Emit, Recorder, Signal, Stage, now_raw, ticks_to_ns};
use signers::AnySigner;
use signers::worker::{AsyncWorker, Completion, SubmitError};
use venues::FeeView;

use crate::blob::{BLOB_SIZE, BlobPool, BlobRef};
use crate::msg::{IntentMsg, Reason, State, StatusMsg, TxMsg};
use crate::risk::kill::KillSwitch;
use crate::stages::StatusSink;
use crate::txbuild::Eip1559;

/// Where the async worker finds the stage's wake-up (set when the stage's thread starts).
pub type WakeCell = Arc<OnceLock<Arc<Signal>>>;

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
        Self {
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
        let from = self.accounts[msg.account.0 as usize].from;
        self.blobs.release(msg.data);
        self.status.send(StatusMsg {
            tx_hash,
            from,
            nonce,
            ..StatusMsg::event(msg.seq, msg.origin, State::Signed, at)
        });
        out.emit(TxMsg {
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
            hops: msg.hops,
        });
        true
    }

    /// Submits one in-flight request to the worker; on refusal the intent fails.
    fn submit(&mut self, a: usize, f: InFlight) -> bool {
        let Some(worker_index) = self.accounts[a].worker_index else {
            return false;
        };
        let Some(hash) = self.hash_of(&f.msg, f.nonce, f.max_fee, f.tip) else {
            self.blobs.release(f.raw);
            self.fail(
                &f.msg,
                Reason::Overloaded,
                "transaction larger than a buffer",
            );
            return false;
        };
        let Some(worker) = self.worker.as_ref() else {
            return false;
        };
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
            if f.stale {
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
        self.drain_completions(out)
    }

    fn extra_ready(&mut self) -> bool {
        self.worker.as_ref().is_some_and(|w| w.has_completions())
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
