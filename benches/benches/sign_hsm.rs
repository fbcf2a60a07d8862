//! The PKCS#11 signer against a real SoftHSM2 token (Debian `softhsm2`, installed by
//! `scripts/setup.d/20-softhsm.sh`), in a token store of its own in a temporary directory:
//!
//! - criterion: a bare `C_Sign` (cryptoki `Session::sign` with `CKM_ECDSA` on a logged-in
//!   session, same key), `HsmSigner::sign_hash` (the same call through the session pool plus
//!   low-s normalisation and the recovery id from the cached public key), and that local
//!   post-processing alone;
//! - a latency run: N sequential calls of the bare call and of ours, interleaved, into
//!   HdrHistograms; p50/p99 and our/bare ratios printed and written to
//!   `latency-reports/<UTC date-time>-sign-hsm/summary.md`.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once when the library is initialised, so the bench re-runs
//! itself as a child process with the variable pointing at a fresh store (no environment
//! changes inside a running process).
//!
//! `cargo bench -p benches --bench sign_hsm`

#[path = "../../signers/tests/support/softhsm.rs"]
mod softhsm;

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use alloy_primitives::{B256, keccak256};
use criterion::Criterion;
use hdrhistogram::Histogram;
use pipeline::report;
use signers::Signer;
use signers::hsm::cryptoki::mechanism::Mechanism;
use signers::hsm::cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use signers::hsm::cryptoki::session::Session;
use signers::hsm::{HsmSigner, recoverable_from_raw};

const ITERATIONS: usize = 5_000;
const KEY_LABEL: &str = "bench-key";

struct Setup {
    _token: softhsm::Token,
    signer: HsmSigner,
    bare: Session,
    key: ObjectHandle,
}

impl Setup {
    fn new() -> Self {
        let token = softhsm::Token::init("bench");
        let cfg = token.config(KEY_LABEL, 1);
        HsmSigner::generate_key(&cfg).unwrap();
        let signer = HsmSigner::open(&cfg).unwrap();
        let bare = token.ctx.open_ro_session(token.slot()).unwrap();
        softhsm::login_user(&bare);
        let key = bare
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
                Attribute::Label(KEY_LABEL.as_bytes().to_vec()),
            ])
            .unwrap()[0];
        Self {
            _token: token,
            signer,
            bare,
            key,
        }
    }

    fn bare(&self, hash: &B256) -> Vec<u8> {
        self.bare
            .sign(&Mechanism::Ecdsa, self.key, hash.as_slice())
            .unwrap()
    }

    fn ours(&self, hash: &B256) {
        black_box(self.signer.sign_hash(hash).unwrap());
    }
}

fn criterion_benches(c: &mut Criterion, setup: &Setup) {
    let mut g = c.benchmark_group("sign_hsm");
    let mut i = 0u64;
    g.bench_function("bare_c_sign", |b| {
        b.iter(|| {
            i += 1;
            black_box(setup.bare(&keccak256(i.to_be_bytes())))
        })
    });
    g.bench_function("hsm_signer_sign_hash", |b| {
        b.iter(|| {
            i += 1;
            setup.ours(&keccak256(i.to_be_bytes()))
        })
    });
    let hash = keccak256(b"post-processing");
    let raw = setup.bare(&hash);
    let public = setup.signer.recovery_key();
    g.bench_function("recovery_id_and_low_s_local_only", |b| {
        b.iter(|| recoverable_from_raw(public, black_box(&hash), black_box(&raw)).unwrap())
    });
    g.finish();
}

fn latency_run(setup: &Setup) {
    let mut rows: Vec<(&str, Histogram<u64>)> = vec![
        (
            "bare `C_Sign` (cryptoki `Session::sign`)",
            report::ns_histogram(),
        ),
        ("`HsmSigner::sign_hash`", report::ns_histogram()),
    ];
    let mut seq = 1_000_000u64;
    // Interleaved so that drift of the shared machine hits both alike.
    for i in 0..ITERATIONS {
        for (k, (_, h)) in rows.iter_mut().enumerate() {
            seq += 1;
            let hash = keccak256(seq.to_be_bytes());
            let t = Instant::now();
            if k == 0 {
                black_box(setup.bare(&hash));
            } else {
                setup.ours(&hash);
            }
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if i >= ITERATIONS / 10 {
                // The first 10 % warm caches and the token up.
                h.record(ns.max(1)).unwrap();
            }
        }
    }
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64;
    let (bare, ours) = (&rows[0].1, &rows[1].1);
    let ratio50 = q(ours, 0.5) / q(bare, 0.5);
    let ratio99 = q(ours, 0.99) / q(bare, 0.99);

    let mut summary = String::new();
    let _ = writeln!(summary, "# PKCS#11 signer against SoftHSM2\n");
    let _ = writeln!(
        summary,
        "{ITERATIONS} sequential calls of each, interleaved, first 10 % dropped as warm-up; one \
         secp256k1 key generated in a fresh SoftHSM2 2.6 token (file object store in a \
         temporary directory), `CKM_ECDSA` on 32-byte hashes, one thread. Ours adds the session \
         pool, low-s normalisation and the recovery id (the nonce point from fixed-base \
         tables of G and of the key, k256) to the same call.\n"
    );
    let _ = writeln!(summary, "{}", report::SUMMARY_HEADER);
    for (name, h) in &rows {
        let _ = writeln!(summary, "{}", report::summary_row(name, h));
    }
    let _ = writeln!(
        summary,
        "\nRatio ours / bare: p50 {ratio50:.3}, p99 {ratio99:.3} (target: at most 1.2).\n"
    );
    let _ = writeln!(
        summary,
        "Command: `cargo bench -p benches --bench sign_hsm`\n\nMachine:\n\n{}",
        report::machine_description()
    );
    for (name, h) in &rows {
        println!(
            "sign_hsm latency {name}: p50 {:.1} µs, p99 {:.1} µs (n = {})",
            q(h, 0.5) / 1e3,
            q(h, 0.99) / 1e3,
            h.len()
        );
    }
    println!("sign_hsm ratio ours/bare: p50 {ratio50:.3}, p99 {ratio99:.3}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../latency-reports");
    let dir = report::run_dir(&root, "sign-hsm").unwrap();
    std::fs::write(dir.join("summary.md"), &summary).unwrap();
    for (i, (_, h)) in rows.iter().enumerate() {
        let name = ["bare-c-sign", "hsm-signer"][i];
        std::fs::write(dir.join(format!("{name}.hgrm")), report::hgrm(h)).unwrap();
    }
    println!("sign_hsm: wrote {}", dir.join("summary.md").display());
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    if filters.iter().any(|f| !"sign_hsm".contains(f.as_str())) {
        return;
    }
    if std::env::var_os(softhsm::STORE_ENV).is_none() {
        // Parent: make a fresh token store and run the bench in a child pointed at it.
        softhsm::module_path();
        let dir = tempfile::tempdir().unwrap();
        let conf = softhsm::write_store(dir.path());
        let status = Command::new(std::env::current_exe().unwrap())
            .args(&args)
            .env(softhsm::CONF_ENV, &conf)
            .env(softhsm::STORE_ENV, dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "sign_hsm child failed: {status}");
        return;
    }
    let setup = Setup::new();
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &setup);
    c.final_summary();
    latency_run(&setup);
}
