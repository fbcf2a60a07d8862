//! The threshold-ECDSA (cggmp21, 2-of-3) online signing step, with presignatures ready:
//!
//! - criterion: the bare cggmp21 online step (the two parties' `issue_partial_signature`
//!   plus `PartialSignature::combine`, in one thread) against our
//!   `MpcSigner::sign_hash_async` (coordinator -> two party threads over loopback TCP and
//!   back, combine, verification against the public key, low-s, recovery id);
//! - a latency run: N sequential calls of each into HdrHistograms, p50/p99 printed and
//!   written to `latency-reports/<UTC date-time>-sign-mpc/summary.md`.
//!
//! Setup: a 2-of-3 ceremony into a temporary folder with the tests' pregenerated safe primes
//! (`signers/tests/data/mpc-test-primes.json`; throwaway keys), so the setup takes tens of
//! seconds rather than minutes. Our signer consumes a fresh presignature per signature, so
//! its pool is refilled between batches, outside the timed calls (the last presignature of
//! a batch, whose use starts the refill, is used untimed): the numbers are the online step
//! "with a presignature ready" and no presignature generation competing for the 2 cores. The bare step signs one fixed message with
//! clones of one presignature set (same message, so nothing leaks; the arithmetic is the
//! same as with fresh ones).
//!
//! `cargo bench -p benches --bench sign_mpc` (`MPC_BENCH_N` sets N, default 200)

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use alloy_primitives::{B256, keccak256};
use criterion::{Criterion, SamplingMode};
use futures::executor::block_on;
use hdrhistogram::Histogram;
use pipeline::report;
use signers::AsyncSigner;
use signers::mpc::cggmp21::generic_ec::Scalar;
use signers::mpc::cggmp21::supported_curves::Secp256k1;
use signers::mpc::cggmp21::{self, DataToSign, KeyShare, PartialSignature, Presignature};
use signers::mpc::{CeremonyConfig, MpcConfig, MpcSigner, load_key_share, run_ceremony};

/// Presignatures the signer keeps ready; batches of our calls are this long.
const POOL: usize = 50;

struct Setup {
    _dir: tempfile::TempDir,
    presigs: Vec<Presignature<Secp256k1>>,
    public_key: cggmp21::generic_ec::Point<Secp256k1>,
    signer: MpcSigner,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let primes = serde_json::from_str(include_str!(
        "../../signers/tests/data/mpc-test-primes.json"
    ))
    .unwrap();
    let t0 = Instant::now();
    let out = run_ceremony(&CeremonyConfig {
        primes,
        ..CeremonyConfig::new(3, 2, dir.path().join("shares"))
    })
    .unwrap();
    println!("sign_mpc: 2-of-3 ceremony took {:?}", t0.elapsed());

    // Bare: one presignature set for parties 0 and 1, made with round-based's simulator.
    let parties = [0u16, 1];
    let shares: Vec<KeyShare<Secp256k1>> = parties
        .iter()
        .map(|&p| load_key_share(&out.share_files[p as usize]).unwrap())
        .collect();
    let public_key = *shares[0].shared_public_key;
    let presigs = round_based::sim::run(2, |i, party| {
        let share = &shares[i as usize];
        async move {
            let eid = cggmp21::ExecutionId::new(b"sign_mpc bench presignature");
            cggmp21::signing(eid, i, &parties, share)
                .generate_presignature(&mut rand::rngs::OsRng, party)
                .await
        }
    })
    .unwrap()
    .expect_ok()
    .into_vec();

    let state = dir.path().join("state");
    let signer = MpcSigner::start(&MpcConfig {
        pool_depth: POOL,
        low_water: 0,
        ..MpcConfig::new(out.share_files.clone(), parties.to_vec(), state)
    })
    .unwrap();
    Setup {
        _dir: dir,
        presigs,
        public_key,
        signer,
    }
}

/// The bare cggmp21 online step: both partial signatures and the combination.
fn bare_step(
    presigs: &[Presignature<Secp256k1>],
    msg: DataToSign<Secp256k1>,
) -> cggmp21::Signature<Secp256k1> {
    let partials = [
        presigs[0].clone().issue_partial_signature(msg),
        presigs[1].clone().issue_partial_signature(msg),
    ];
    PartialSignature::combine(&partials).unwrap()
}

fn message(hash: &B256) -> DataToSign<Secp256k1> {
    DataToSign::from_scalar(Scalar::from_be_bytes_mod_order(hash))
}

/// One call of ours with a presignature ready and no refill running: the pool's last
/// presignature (whose use starts the refill) is consumed untimed, then the pool is
/// waited for until full again.
fn ours_timed(s: &Setup, i: u64) -> Duration {
    if s.signer.pool_depth() <= 1 {
        if s.signer.ready() {
            block_on(s.signer.sign_hash_async(keccak256(b"untimed"))).unwrap();
        }
        assert!(
            s.signer.wait_for_pool(POOL, Duration::from_secs(600)),
            "pool did not refill: {:?}",
            s.signer.last_error()
        );
    }
    let h = keccak256(i.to_be_bytes());
    let t = Instant::now();
    let sig = block_on(s.signer.sign_hash_async(h)).unwrap();
    let d = t.elapsed();
    black_box(sig);
    d
}

fn criterion_benches(c: &mut Criterion, s: &Setup) {
    let hash = keccak256(b"sign_mpc bare");
    let msg = message(&hash);
    // The bare step's output is valid for the key.
    bare_step(&s.presigs, msg)
        .verify(&s.public_key, &msg)
        .unwrap();

    let mut g = c.benchmark_group("sign_mpc");
    g.bench_function("bare cggmp21 issue x2 + combine", |b| {
        b.iter(|| bare_step(black_box(&s.presigs), black_box(msg)))
    });
    // Each call of ours consumes a presignature (about a second of CPU to make): few
    // samples, flat sampling, refills outside the timed calls.
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_millis(1));
    let mut i = 1_000_000u64;
    g.bench_function("MpcSigner::sign_hash_async (loopback)", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    i += 1;
                    ours_timed(s, i)
                })
                .sum()
        })
    });
    g.finish();
}

fn latency_run(s: &Setup, n: usize) {
    let mut bare = report::ns_histogram();
    let mut ours = report::ns_histogram();
    let hash = keccak256(b"sign_mpc bare");
    for _ in 0..n {
        let t = Instant::now();
        black_box(bare_step(black_box(&s.presigs), message(black_box(&hash))));
        bare.record(t.elapsed().as_nanos() as u64).unwrap();
    }
    for i in 0..n as u64 {
        ours.record(ours_timed(s, i).as_nanos() as u64).unwrap();
    }
    let rows: [(&str, &Histogram<u64>); 2] = [
        ("bare cggmp21: issue x2 + combine (one thread)", &bare),
        (
            "`MpcSigner::sign_hash_async`: loopback TCP, combine, verify, low-s, recovery id",
            &ours,
        ),
    ];
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1e3;
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "# Threshold ECDSA (cggmp21, 2-of-3) online signing step, presignature ready\n"
    );
    let _ = writeln!(
        summary,
        "{n} sequential calls each; ours refills its pool of {POOL} between batches, outside \
         the timed calls.\n"
    );
    let _ = writeln!(summary, "{}", report::SUMMARY_HEADER);
    for (name, h) in rows {
        let _ = writeln!(summary, "{}", report::summary_row(name, h));
        println!(
            "sign_mpc: {name}: p50 {:.1} µs, p99 {:.1} µs",
            q(h, 0.5),
            q(h, 0.99)
        );
    }
    let _ = writeln!(
        summary,
        "\nTarget: our online step under 100 µs p99.\n\nMachine: {}",
        report::machine_description()
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../latency-reports");
    let dir = report::run_dir(&root, "sign-mpc").unwrap();
    std::fs::write(dir.join("summary.md"), &summary).unwrap();
    std::fs::write(dir.join("bare.hgrm"), report::hgrm(&bare)).unwrap();
    std::fs::write(dir.join("ours.hgrm"), report::hgrm(&ours)).unwrap();
    println!("sign_mpc: wrote {}", dir.join("summary.md").display());
}

fn main() {
    if benches::filtered_out("sign_mpc") {
        return;
    }
    let n = std::env::var("MPC_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let s = setup();
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &s);
    c.final_summary();
    latency_run(&s, n);
}
