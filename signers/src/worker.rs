//! Drives [`AsyncSigner`]s (KMS now; any backend whose call crosses a network or process
//! boundary) beside a synchronous pipeline stage, so that the stage never waits on the
//! network.
//!
//! # How it works
//!
//! - [`AsyncWorker`] owns a tokio runtime with one worker thread (`signers-async`). The stage
//!   submits `(account, seq, hash)` with [`AsyncWorker::try_submit`]: a `try_send` into a
//!   bounded crossbeam channel plus a wake-up of the dispatcher task; it never blocks and
//!   fails with [`SubmitError::Full`] when `capacity` requests are outstanding.
//! - The dispatcher starts every request at once (one task each), so requests run
//!   concurrently, and keeps per account a queue of outstanding requests in submission order.
//!   A finished request's result is released only when every earlier request of the same
//!   account has been released: results are delivered IN ORDER PER ACCOUNT even when the
//!   service answers out of order. Accounts do not wait for each other.
//! - Released results go to a completion queue the stage drains with [`AsyncWorker::poll`]
//!   (never blocks); the optional wake callback runs after each batch of releases so that a
//!   parked stage can be unparked.
//!
//! # Invariants
//!
//! - For each account, completions come out in exactly the order of the successful
//!   `try_submit` calls, one per request, errors included.
//! - At most `capacity` requests are outstanding (submitted and not yet polled).
//! - Signers whose client does I/O should be connected on this worker's runtime
//!   ([`AsyncWorker::block_on`]), so that their pooled connections are driven by it.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use alloy_primitives::{B256, Signature};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::{AsyncSigner, SignerError};

/// Callback run on the worker's thread when completions are ready (e.g. unpark the stage).
pub type WakeFn = Box<dyn Fn() + Send + Sync>;

/// Settings of a [`AsyncWorker`].
#[derive(Clone, Debug)]
pub struct AsyncWorkerConfig {
    /// Outstanding requests (submitted, not yet polled) at most; `try_submit` fails beyond.
    pub capacity: usize,
    /// Name of the runtime's thread.
    pub thread_name: String,
}

impl Default for AsyncWorkerConfig {
    fn default() -> Self {
        Self {
            capacity: 1024,
            thread_name: "signers-async".into(),
        }
    }
}

/// Why a request was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// `capacity` requests are outstanding; poll completions and retry.
    #[error("signing worker is full")]
    Full,
    /// No signer was registered under this account index.
    #[error("no signer registered for account {0}")]
    UnknownAccount(u16),
    /// The worker's runtime has stopped.
    #[error("signing worker has stopped")]
    Stopped,
}

/// The result of one request, released in order per account.
#[derive(Debug)]
pub struct Completion {
    /// Account index given at submission (the index [`AsyncWorker::register`] returned).
    pub account_index: u16,
    /// The caller's sequence number given at submission.
    pub seq: u64,
    /// The hash that was signed.
    pub hash: B256,
    /// The checked, low-s signature, or why there is none.
    pub result: Result<Signature, SignerError>,
}

struct Request {
    account: u16,
    seq: u64,
    hash: B256,
}

struct Shared {
    notify: Notify,
    stop: AtomicBool,
    outstanding: AtomicUsize,
    accounts: AtomicUsize,
    wake: Option<WakeFn>,
}

/// Runs [`AsyncSigner`] requests on a small runtime of its own and hands results back in
/// order per account. See the module docs.
pub struct AsyncWorker {
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
    requests: Sender<Request>,
    registrations: Sender<Arc<dyn AsyncSigner>>,
    completions: Receiver<Completion>,
    capacity: usize,
}

impl fmt::Debug for AsyncWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncWorker")
            .field("capacity", &self.capacity)
            .field("accounts", &self.shared.accounts.load(Ordering::Relaxed))
            .field("outstanding", &self.outstanding())
            .finish_non_exhaustive()
    }
}

impl AsyncWorker {
    /// Starts the runtime and its dispatcher. `wake` runs (on the worker's thread) after
    /// completions were released.
    pub fn start(cfg: &AsyncWorkerConfig, wake: Option<WakeFn>) -> Result<Self, SignerError> {
        let capacity = cfg.capacity.max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .thread_name(cfg.thread_name.clone())
            .enable_all()
            .build()
            .map_err(|e| SignerError::Config {
                what: "signing worker runtime".into(),
                reason: e.to_string(),
            })?;
        let shared = Arc::new(Shared {
            notify: Notify::new(),
            stop: AtomicBool::new(false),
            outstanding: AtomicUsize::new(0),
            accounts: AtomicUsize::new(0),
            wake,
        });
        let (requests, request_rx) = crossbeam_channel::bounded(capacity);
        let (registrations, registration_rx) = crossbeam_channel::unbounded();
        // Bounded (array-backed): at most `capacity` results are ever outstanding, and the
        // polling side then never frees channel blocks (no deallocation on a stage's thread).
        let (completion_tx, completions) = crossbeam_channel::bounded(capacity);
        runtime.spawn(dispatch(
            Arc::clone(&shared),
            request_rx,
            registration_rx,
            completion_tx,
        ));
        Ok(Self {
            runtime: Some(runtime),
            shared,
            requests,
            registrations,
            completions,
            capacity,
        })
    }

    /// Registers a signer and returns its account index (0, 1, 2, … in call order).
    ///
    /// # Panics
    ///
    /// Beyond 65,536 accounts.
    pub fn register(&mut self, signer: Arc<dyn AsyncSigner>) -> u16 {
        let index = self.shared.accounts.load(Ordering::Relaxed);
        let index = u16::try_from(index).expect("at most 65,536 accounts per worker");
        // Sent before the count is published: a request for this index can only be
        // submitted after the registration is in the channel, and the dispatcher drains
        // registrations before requests.
        self.registrations
            .send(signer)
            .expect("the dispatcher holds the receiver while the worker lives");
        self.shared
            .accounts
            .store(usize::from(index) + 1, Ordering::Release);
        self.shared.notify.notify_one();
        index
    }

    /// Submits a request without blocking. The result comes back through [`AsyncWorker::poll`]
    /// after the results of every earlier request of the same account.
    pub fn try_submit(&self, account_index: u16, seq: u64, hash: B256) -> Result<(), SubmitError> {
        if usize::from(account_index) >= self.shared.accounts.load(Ordering::Acquire) {
            return Err(SubmitError::UnknownAccount(account_index));
        }
        if self.shared.stop.load(Ordering::Relaxed) {
            return Err(SubmitError::Stopped);
        }
        self.shared
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .map_err(|_| SubmitError::Full)?;
        let req = Request {
            account: account_index,
            seq,
            hash,
        };
        match self.requests.try_send(req) {
            Ok(()) => {
                self.shared.notify.notify_one();
                Ok(())
            }
            Err(e) => {
                self.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::Full,
                    TrySendError::Disconnected(_) => SubmitError::Stopped,
                })
            }
        }
    }

    /// Hands every released completion to `f`, without blocking; returns how many.
    pub fn poll(&self, f: &mut impl FnMut(Completion)) -> usize {
        let mut n = 0;
        while let Ok(c) = self.completions.try_recv() {
            self.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
            f(c);
            n += 1;
        }
        n
    }

    /// Whether released results wait to be polled (an atomic read; for a stage's park
    /// re-check).
    pub fn has_completions(&self) -> bool {
        !self.completions.is_empty()
    }

    /// Most requests outstanding at once (`try_submit` fails with `Full` beyond it).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Requests submitted and not yet handed out by [`AsyncWorker::poll`].
    pub fn outstanding(&self) -> usize {
        self.shared.outstanding.load(Ordering::Acquire)
    }

    /// Runs `fut` to completion on the worker's runtime, from a thread outside any runtime
    /// (start-up: connect signers here so that their connections live on this runtime).
    ///
    /// # Panics
    ///
    /// When called from inside an async context.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.runtime
            .as_ref()
            .expect("runtime lives until drop")
            .block_on(fut)
    }

    /// A handle to the worker's runtime (to spawn work beside the dispatcher).
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.runtime
            .as_ref()
            .expect("runtime lives until drop")
            .handle()
            .clone()
    }
}

impl Drop for AsyncWorker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.notify.notify_one();
        if let Some(rt) = self.runtime.take() {
            // Requests still in flight are abandoned; their results are never delivered.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
        }
    }
}

/// `(seq, hash, result once finished)` of one outstanding request.
type Slot = (u64, B256, Option<Result<Signature, SignerError>>);

/// Per-account queue of outstanding requests in submission order.
#[derive(Default)]
struct AccountQueue {
    /// Ticket of the request at the front of `slots`.
    front_ticket: u64,
    /// Next ticket to hand out.
    next_ticket: u64,
    /// Outstanding requests, oldest first.
    slots: VecDeque<Slot>,
}

async fn dispatch(
    shared: Arc<Shared>,
    requests: Receiver<Request>,
    registrations: Receiver<Arc<dyn AsyncSigner>>,
    completions: Sender<Completion>,
) {
    let mut signers: Vec<Arc<dyn AsyncSigner>> = Vec::new();
    let mut queues: Vec<AccountQueue> = Vec::new();
    let mut running: JoinSet<Result<Signature, SignerError>> = JoinSet::new();
    // Which request each running task serves.
    let mut tasks: HashMap<tokio::task::Id, (u16, u64)> = HashMap::new();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        while let Ok(s) = registrations.try_recv() {
            signers.push(s);
            queues.push(AccountQueue::default());
        }
        while let Ok(req) = requests.try_recv() {
            let account = usize::from(req.account);
            let q = &mut queues[account];
            let ticket = q.next_ticket;
            q.next_ticket += 1;
            q.slots.push_back((req.seq, req.hash, None));
            let fut = signers[account].sign_hash_async(req.hash);
            let task = running.spawn(fut);
            tasks.insert(task.id(), (req.account, ticket));
        }
        tokio::select! {
            () = shared.notify.notified() => {}
            Some(joined) = running.join_next_with_id(), if !running.is_empty() => {
                let mut released = 0;
                let mut next = Some(joined);
                // Take every task that has already finished before waking the caller once.
                while let Some(joined) = next {
                    let (id, result) = match joined {
                        Ok((id, result)) => (id, Ok(result)),
                        Err(e) => (e.id(), Err(e.to_string())),
                    };
                    let (account, ticket) = tasks.remove(&id).expect("every task is recorded");
                    let account_queue = &mut queues[usize::from(account)];
                    // A panicking signer fails its own request; the account goes on.
                    let result = result.unwrap_or_else(|reason| {
                        Err(SignerError::Signing {
                            key_id: signers[usize::from(account)].key_id().to_owned(),
                            reason: format!("signing task failed: {reason}"),
                        })
                    });
                    released += finish(account_queue, account, ticket, result, &completions);
                    next = running.try_join_next_with_id();
                }
                if released > 0
                    && let Some(wake) = &shared.wake
                {
                    wake();
                }
            }
        }
    }
}

/// Records a finished request and releases the account's results that are now in order.
fn finish(
    q: &mut AccountQueue,
    account: u16,
    ticket: u64,
    result: Result<Signature, SignerError>,
    completions: &Sender<Completion>,
) -> usize {
    let index = usize::try_from(ticket - q.front_ticket).expect("queue fits in memory");
    q.slots[index].2 = Some(result);
    let mut released = 0;
    while q.slots.front().is_some_and(|s| s.2.is_some()) {
        let (seq, hash, result) = q.slots.pop_front().expect("front checked");
        q.front_ticket += 1;
        let completion = Completion {
            account_index: account,
            seq,
            hash,
            result: result.expect("front checked"),
        };
        // The receiver lives in the AsyncWorker, which outlives the runtime.
        let _ = completions.send(completion);
        released += 1;
    }
    released
}
