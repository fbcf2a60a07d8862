//! The signing stage's side of async signing allocates nothing in steady state: building
//! the transaction, submitting it to the async worker, taking the released results and
//! encoding the signed transactions. The worker's own thread (boxed futures, the runtime) is
//! beside the hot path and is not counted: the counting allocator counts only on the thread
//! that runs the stage. This file holds one test.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, U256};
use engine::blob::{BlobPool, BlobRef};
use engine::msg::{AccountIdx, IntentId, IntentKind, IntentMsg, Origin, Route, StatusMsg, TxMsg};
use engine::risk::kill::KillSwitch;
use engine::stages::StatusSink;
use engine::stages::signing::{AsyncSigning, SigningAccount, SigningStage};
use pipeline::{Emit, LatencyRegistry, Stage, many_to_one};
use signers::worker::{AsyncWorker, AsyncWorkerConfig};
use signers::{AnySigner, AsyncSigner, Backend, LocalCurve, LocalSigner, SignFuture, Signer};
use venues::{DEV_ADDRESSES, DEV_PRIVATE_KEYS, FeeEstimate, FeeView};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
thread_local! {
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
}

fn counted() {
    if COUNT_HERE.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged; only counts calls made on the thread
// that set `COUNT_HERE`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: AllocLayout) -> *mut u8 {
        counted();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: AllocLayout) {
        counted();
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: AllocLayout, n: usize) -> *mut u8 {
        counted();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A local key behind the async interface (what a KMS or MPC key looks like to the stage).
#[derive(Debug)]
struct AsyncLocal(LocalSigner);

impl AsyncSigner for AsyncLocal {
    fn address(&self) -> Address {
        self.0.address()
    }
    fn key_id(&self) -> &str {
        self.0.key_id()
    }
    fn backend(&self) -> Backend {
        Backend::Kms
    }
    fn sign_hash_async(&self, hash: B256) -> SignFuture {
        let r = self.0.sign_hash(&hash);
        Box::pin(async move { r })
    }
}

struct Collect<'a> {
    out: &'a mut Vec<TxMsg>,
}

impl Emit<TxMsg> for Collect<'_> {
    fn emit(&mut self, msg: TxMsg) {
        self.out.push(msg);
    }
}

#[test]
fn async_signing_allocates_nothing_on_the_stage_thread() {
    const ROUND: usize = 200;
    const ACCOUNTS: usize = 4;
    let blobs = Arc::new(BlobPool::new(4 * ROUND));
    let (status_tx, mut status_rx) = many_to_one::<StatusMsg>(2048);
    let status = StatusSink::new(status_tx, Arc::new(AtomicBool::new(false)));
    let mut worker = AsyncWorker::start(
        &AsyncWorkerConfig {
            capacity: 2 * ROUND,
            ..AsyncWorkerConfig::default()
        },
        None,
    )
    .unwrap();
    let accounts = (0..ACCOUNTS)
        .map(|i| {
            let local =
                LocalSigner::from_hex(format!("a{i}"), DEV_PRIVATE_KEYS[i], LocalCurve::Secp256k1)
                    .unwrap();
            let from = local.address();
            let signer: Arc<dyn AsyncSigner> = Arc::new(AsyncLocal(local));
            let index = worker.register(Arc::clone(&signer));
            SigningAccount {
                signer: AnySigner::Async(signer),
                worker_index: Some(index),
                from,
                next_nonce: 0,
            }
        })
        .collect();
    let fees = Arc::new(FeeView::new(FeeEstimate {
        base_fee_per_gas: 1_000_000_000,
        max_priority_fee_per_gas: 1,
    }));
    let registry = LatencyRegistry::new();
    let mut stage = SigningStage::new(
        accounts,
        Some(AsyncSigning {
            worker: Arc::new(worker),
            wake: Arc::new(OnceLock::new()),
            queue_limit: ROUND,
        }),
        31337,
        fees,
        Arc::clone(&blobs),
        status,
        registry.recorder("sign"),
        Arc::new(KillSwitch::new(ACCOUNTS)),
    );
    let mut out = Vec::with_capacity(2 * ROUND);
    let mut seq = 0u64;
    let mut nonces = [0u64; ACCOUNTS];
    let mut round = |stage: &mut SigningStage, out: &mut Vec<TxMsg>| {
        for i in 0..ROUND {
            seq += 1;
            let msg = IntentMsg {
                seq,
                origin: Origin {
                    conn: 1,
                    principal: 1,
                },
                id: IntentId::new("x").unwrap(),
                account: AccountIdx((i % ACCOUNTS) as u16),
                kind: IntentKind::Transfer,
                route: Route::Auto,
                to: DEV_ADDRESSES[5],
                value: U256::from(i),
                gas_limit: 21_000,
                data: BlobRef::NONE,
                ..IntentMsg::default()
            };
            Stage::on_message(stage, msg, &mut Collect { out });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while out.len() < ROUND {
            assert!(
                Instant::now() < deadline,
                "results came back ({})",
                out.len()
            );
            if stage.poll_extra(&mut Collect { out }) == 0 {
                std::thread::yield_now();
            }
        }
        for tx in out.drain(..) {
            // In order per account: each account's nonces come out consecutively.
            let a = tx.account.0 as usize;
            assert_eq!(tx.nonce, nonces[a], "account {a} in order");
            nonces[a] += 1;
            blobs.release(tx.raw);
        }
        status_rx.pop_batch(usize::MAX, |_| {});
    };

    // Warm up: lazy statics, first-touch of queues.
    for _ in 0..3 {
        round(&mut stage, &mut out);
    }
    COUNT_HERE.with(|c| c.set(true));
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..20 {
        round(&mut stage, &mut out);
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    COUNT_HERE.with(|c| c.set(false));
    assert!(
        nonces
            .iter()
            .all(|&n| n == 23 * ROUND as u64 / ACCOUNTS as u64),
        "{nonces:?}"
    );
    assert_eq!(
        allocs,
        0,
        "allocations on the signing stage's thread over {} async signatures",
        20 * ROUND
    );
    assert_eq!(blobs.available(), blobs.capacity());
}
