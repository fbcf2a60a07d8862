//! The hot path allocates nothing in steady state: a desk intent pushed into the intake
//! ring, journaled, decided by policy, signed, encoded and journaled again by the signing
//! stage (the three CPU stages fused as the 2-core layout runs them), with every status
//! event going through the status ring. Checked with a counting global allocator, plain and with the journal sealed
//! (encryption at rest). The counter is process-wide: the tests rely on running in a
//! process each (cargo-nextest, as `./x test` runs them; the sealed one in a child
//! process of its own besides).

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use alloy_primitives::U256;
use engine::auth::Principals;
use engine::blob::{BlobPool, BlobRef};
use engine::journal::{Journal, JournalConfig, SyncPolicy};
use engine::msg::{AccountIdx, IntentId, IntentKind, IntentMsg, Origin, Route, StatusMsg, TxMsg};
use engine::risk::RiskControl;
use engine::risk::kill::KillSwitch;
use engine::risk::rules::Risk;
use engine::stages::StatusSink;
use engine::stages::intake::{IntakeJournal, IntakeStage};
use engine::stages::policy::PolicyStage;
use engine::stages::signing::{NonceNotice, SigningAccount, SigningStage};
use pipeline::{Emit, Hops, LatencyRegistry, Stage, fuse, many_to_one, now_raw};
use signers::{AnySigner, LocalCurve, LocalSigner, Signer};

#[cfg(feature = "hsm")]
#[path = "../../signers/tests/support/softhsm.rs"]
mod softhsm;
use venues::{DEV_ADDRESSES, DEV_PRIVATE_KEYS, FeeEstimate, FeeView};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: AllocLayout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: AllocLayout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: AllocLayout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct Collect<'a> {
    out: &'a mut Vec<TxMsg>,
}

impl Emit<TxMsg> for Collect<'_> {
    fn emit(&mut self, msg: TxMsg) {
        self.out.push(msg);
    }
}

#[test]
fn intake_policy_signing_allocate_nothing_in_steady_state() {
    steady_state(None);
}

/// The same with the journal sealed (encryption at rest), its KEK in a real SoftHSM2 token:
/// sealing a record is AES-GCM in a scratch buffer the writer keeps, no allocation.
#[cfg(feature = "hsm")]
#[test]
fn with_the_journal_sealed_under_an_hsm_kek_the_hot_path_still_allocates_nothing() {
    softhsm::isolated(
        "with_the_journal_sealed_under_an_hsm_kek_the_hot_path_still_allocates_nothing",
        || {
            let token = softhsm::Token::init(softhsm::TOKEN_LABEL);
            let cfg = token.config("hot-path-kek", 1);
            signers::hsm::HsmKek::generate(&cfg).unwrap();
            let kek = signers::hsm::HsmKek::open(&cfg).unwrap();
            steady_state(Some(engine::atrest::Sealer::new(Arc::new(kek))));
        },
    );
}

fn steady_state(sealer: Option<engine::atrest::Sealer>) {
    const ROUND: usize = 256;
    let cfg = engine::dev::dev_config(
        "ws://unused",
        SocketAddr::from(([127, 0, 0, 1], 0)),
        "x".repeat(32),
    );
    let blobs = Arc::new(BlobPool::new(4 * ROUND));
    let (status_tx, mut status_rx) = many_to_one::<StatusMsg>(4 * ROUND);
    let status = StatusSink::new(status_tx, Arc::new(AtomicBool::new(false)));
    let (intake_tx, mut intake_rx) = many_to_one::<IntentMsg>(ROUND);
    let registry = LatencyRegistry::new();
    let accounts = (0..5)
        .map(|i| {
            let signer: Arc<dyn Signer> = Arc::new(
                LocalSigner::from_hex(
                    format!("dev{i}"),
                    DEV_PRIVATE_KEYS[i],
                    LocalCurve::Secp256k1,
                )
                .unwrap(),
            );
            SigningAccount {
                from: signer.address(),
                signer: AnySigner::Sync(signer),
                worker_index: None,
                next_nonce: 0,
            }
        })
        .collect();
    let fees = Arc::new(FeeView::new(FeeEstimate {
        base_fee_per_gas: 1_000_000_000,
        max_priority_fee_per_gas: 1,
    }));
    // The risk engine with the audit trail drained by this thread (the writer thread
    // renders JSON and would allocate beside the hot path).
    let kill = Arc::new(KillSwitch::new(cfg.accounts.len()));
    let (audit, audit_rx) = engine::risk::audit::channel(8 * ROUND);
    let (_control, first, link) = RiskControl::start(
        None,
        &cfg,
        Arc::clone(&kill),
        Arc::new(Principals::default()),
        audit.clone(),
    )
    .unwrap();
    let (pending_tx, _pending_rx) = crossbeam_channel::bounded(16);
    let signing = SigningStage::new(
        accounts,
        None,
        31337,
        fees,
        Arc::clone(&blobs),
        status.clone(),
        registry.recorder("sign"),
        kill.clone(),
    );
    // The receipt watcher's part: each transaction, once confirmed, is settled (the
    // signing stage then forgets it and frees its calldata slot).
    let notices = signing.notices();
    // The write-ahead journal, as the engine runs it: intake and signing append to their
    // own lanes of memory-mapped segments.
    let journal_dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(JournalConfig {
        dir: journal_dir.path().to_path_buf(),
        segment_bytes: 64 << 20,
        sync: SyncPolicy::None,
        sealer,
    })
    .unwrap();
    let mut signing = signing;
    signing.set_journal(journal.lane("signing").unwrap());
    let principals = Arc::new(Principals::default());
    principals.intern("desk-a");
    let mut intake = IntakeStage::new(status.clone(), Arc::clone(&blobs), 1 << 14);
    intake.set_journal(IntakeJournal {
        lane: journal.lane("intake").unwrap(),
        principals,
        accounts: DEV_ADDRESSES[..5].to_vec(),
        named: std::collections::HashSet::with_capacity(16),
    });
    let mut chain = fuse(
        fuse(
            intake,
            PolicyStage::new(
                Risk::new(first, Arc::clone(&kill)),
                link,
                pending_tx,
                audit,
                status.clone(),
                Arc::clone(&blobs),
                vec![0; 5],
            ),
        ),
        signing,
    );
    let mut audited = 0usize;
    let calldata = [0xa9u8, 0x05, 0x9c, 0xbb, 0, 0, 0, 1];
    let mut out = Vec::with_capacity(ROUND);
    let mut statuses = 0usize;
    let mut signed = 0usize;
    let mut seq = 0u64;

    let mut round = |chain: &mut _, out: &mut Vec<TxMsg>| {
        for i in 0..ROUND {
            seq += 1;
            let mut id_text = [b'0'; 12];
            let mut n = seq;
            for b in id_text.iter_mut().rev() {
                *b = b'0' + (n % 10) as u8;
                n /= 10;
            }
            // SAFETY-free: ASCII digits are valid UTF-8.
            let id = IntentId::new(std::str::from_utf8(&id_text).unwrap()).unwrap();
            let call = i % 4 == 0;
            let reject = i % 7 == 0;
            let mut hops = Hops::default();
            hops.stamp(now_raw());
            let msg = IntentMsg {
                origin: Origin {
                    conn: 1,
                    principal: 1,
                },
                id,
                account: AccountIdx((i % 5) as u16),
                kind: if call {
                    IntentKind::Call
                } else {
                    IntentKind::Transfer
                },
                route: Route::Auto,
                to: if reject {
                    alloy_primitives::Address::ZERO
                } else {
                    DEV_ADDRESSES[5 + i % 5]
                },
                value: U256::from(i),
                gas_limit: if call { 60_000 } else { 21_000 },
                data: if call {
                    blobs.claim_with(&calldata).unwrap()
                } else {
                    BlobRef::NONE
                },
                hops,
                ..IntentMsg::default()
            };
            assert!(intake_tx.try_push(msg).is_ok());
        }
        let mut collect = Collect { out };
        while let Some(m) = intake_rx.pop() {
            Stage::on_message(chain, m, &mut collect);
        }
        for tx in out.drain(..) {
            // What broadcast and the receipt watcher do with the raw bytes once written.
            blobs.release(tx.raw);
            notices.send(NonceNotice::Settled { seq: tx.seq });
            signed += 1;
        }
        Stage::poll_extra(chain, &mut Collect { out });
        statuses += status_rx.pop_batch(usize::MAX, |_| {});
        audited += audit_rx.try_iter().count();
    };

    // Warm up: first-touch growth of tables, lazy statics, the signer's context.
    for _ in 0..4 {
        round(&mut chain, &mut out);
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..20 {
        round(&mut chain, &mut out);
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert!(signed > 20 * ROUND / 2, "the path really signed ({signed})");
    assert!(statuses > 20 * ROUND * 2, "and reported ({statuses})");
    assert!(
        audited >= 24 * ROUND,
        "and audited every decision ({audited})"
    );
    assert_eq!(
        allocs,
        0,
        "allocations on the hot path over {} intents",
        20 * ROUND
    );
    assert_eq!(blobs.available(), blobs.capacity(), "every slot returned");
    let stats = journal.stats();
    let frames = |lane: &str| {
        stats
            .lanes
            .iter()
            .find(|l| l.lane == lane)
            .map_or(0, |l| l.frames)
    };
    assert!(
        frames("intake") >= (24 * ROUND) as u64,
        "every intent journaled ({:?})",
        stats
    );
    assert!(
        frames("signing") as usize >= signed,
        "every signed transaction journaled ({stats:?})"
    );
    journal.shutdown();
}
