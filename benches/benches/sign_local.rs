//! Local (in-memory) key signing, the inline path of the signing stage:
//!
//! - criterion: the bare library call (alloy's `Secp256k1Signer::sign_hash_sync`, i.e.
//!   libsecp256k1) against our `LocalSigner::sign_hash` on libsecp256k1 and on k256;
//! - a latency run: N calls of each, interleaved in rounds, into HdrHistograms; p50/p99
//!   printed and written to `latency-reports/<UTC date-time>-sign-local/summary.md`.
//!
//! Target: local signing under 40 µs p99.
//!
//! `cargo bench -p benches --bench sign_local` (`LOCAL_BENCH_N` sets N per round, default
//! 20,000; 5 rounds)

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use alloy_primitives::{B256, keccak256};
use alloy_signer::SignerSync;
use alloy_signer_local::Secp256k1Signer;
use criterion::Criterion;
use hdrhistogram::Histogram;
use pipeline::report;
use signers::{LocalCurve, LocalSigner, Signer};

/// Anvil's first dev key (a public, throwaway test key).
const KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
const ROUNDS: usize = 5;

struct Setup {
    bare: Secp256k1Signer,
    ours: LocalSigner,
    ours_k256: LocalSigner,
}

fn setup() -> Setup {
    let bytes = B256::from_slice(&hex_decode(KEY));
    let s = Setup {
        bare: Secp256k1Signer::from_bytes(&bytes).unwrap(),
        ours: LocalSigner::from_hex("bench", KEY, LocalCurve::Secp256k1).unwrap(),
        ours_k256: LocalSigner::from_hex("bench-k256", KEY, LocalCurve::K256).unwrap(),
    };
    let h = keccak256(b"check");
    let a = s.bare.sign_hash_sync(&h).unwrap();
    assert_eq!(
        a,
        s.ours.sign_hash_checked(&h).unwrap(),
        "same signature as bare"
    );
    s.ours_k256.sign_hash_checked(&h).unwrap();
    s
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn criterion_benches(c: &mut Criterion, s: &Setup) {
    let h = keccak256(b"sign_local");
    let mut g = c.benchmark_group("sign_local");
    g.bench_function("bare libsecp256k1 (alloy Secp256k1Signer)", |b| {
        b.iter(|| s.bare.sign_hash_sync(black_box(&h)).unwrap())
    });
    g.bench_function("LocalSigner::sign_hash (libsecp256k1)", |b| {
        b.iter(|| s.ours.sign_hash(black_box(&h)).unwrap())
    });
    g.bench_function("LocalSigner::sign_hash (k256)", |b| {
        b.iter(|| s.ours_k256.sign_hash(black_box(&h)).unwrap())
    });
    g.finish();
}

fn latency_run(s: &Setup, n: usize) {
    let mut bare = report::ns_histogram();
    let mut ours = report::ns_histogram();
    let mut k256 = report::ns_histogram();
    let mut i = 0u64;
    for _ in 0..ROUNDS {
        for (hist, f) in [
            (
                &mut bare,
                &(|h: &B256| {
                    black_box(s.bare.sign_hash_sync(h).unwrap());
                }) as &dyn Fn(&B256),
            ),
            (&mut ours, &|h: &B256| {
                black_box(s.ours.sign_hash(h).unwrap());
            }),
            (&mut k256, &|h: &B256| {
                black_box(s.ours_k256.sign_hash(h).unwrap());
            }),
        ] {
            for _ in 0..n {
                i += 1;
                let h = keccak256(i.to_be_bytes());
                let t = Instant::now();
                f(black_box(&h));
                hist.record(t.elapsed().as_nanos() as u64).unwrap();
            }
        }
    }
    let rows: [(&str, &Histogram<u64>); 3] = [
        (
            "bare libsecp256k1 (alloy `Secp256k1Signer::sign_hash_sync`)",
            &bare,
        ),
        (
            "`LocalSigner::sign_hash`, libsecp256k1 (the default)",
            &ours,
        ),
        ("`LocalSigner::sign_hash`, k256", &k256),
    ];
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64 / 1e3;
    let mut summary = String::new();
    let _ = writeln!(
        summary,
        "# Local key signing (inline in the signing stage)\n"
    );
    let _ = writeln!(
        summary,
        "{ROUNDS} interleaved rounds of {n} calls each, one thread, a new hash per call.\n"
    );
    let _ = writeln!(summary, "{}", report::SUMMARY_HEADER);
    for (name, h) in rows {
        let _ = writeln!(summary, "{}", report::summary_row(name, h));
        println!(
            "sign_local: {name}: p50 {:.1} µs, p99 {:.1} µs",
            q(h, 0.5),
            q(h, 0.99)
        );
    }
    let _ = writeln!(
        summary,
        "\nTarget: local signing under 40 µs p99.\n\nMachine: {}\n\nCommand: `cargo bench -p benches --bench sign_local`",
        report::machine_description()
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../latency-reports");
    let dir = report::run_dir(&root, "sign-local").unwrap();
    std::fs::write(dir.join("summary.md"), &summary).unwrap();
    std::fs::write(dir.join("bare.hgrm"), report::hgrm(&bare)).unwrap();
    std::fs::write(dir.join("ours.hgrm"), report::hgrm(&ours)).unwrap();
    std::fs::write(dir.join("ours-k256.hgrm"), report::hgrm(&k256)).unwrap();
    println!("sign_local: wrote {}", dir.join("summary.md").display());
}

fn main() {
    if benches::filtered_out("sign_local") {
        return;
    }
    let n = std::env::var("LOCAL_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let s = setup();
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &s);
    c.final_summary();
    latency_run(&s, n);
}
