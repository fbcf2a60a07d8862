//! The AWS KMS signer against a real moto KMS server on loopback (started from the project's
//! virtualenv, `scripts/setup.d/30-moto.sh`, with `scripts/moto_kms_server.py`):
//!
//! - criterion: a bare `Sign` call through the SDK, `KmsSigner::sign_hash_async` (the same
//!   call plus DER parsing, low-s normalisation and the recovery id), one request through the
//!   `AsyncWorker` (submit, the worker's runtime, in-order release, poll; the bench thread parks
//!   until the worker's wake callback unparks it, as a stage would), and the local
//!   post-processing alone;
//! - a latency run: N sequential calls of each into HdrHistograms, p50/p99 printed and
//!   written to `latency-reports/<UTC date-time>-sign-kms/summary.md`.
//!
//! moto is Python and dominates every number; what matters is the difference between the bare
//! call and ours.
//!
//! `cargo bench -p benches --bench sign_kms`

#[path = "../../signers/tests/support/moto.rs"]
mod moto;

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_primitives::{B256, keccak256};
use criterion::Criterion;
use hdrhistogram::Histogram;
use pipeline::report;
use signers::AsyncSigner;
use signers::kms::KmsSigner;
use signers::kms::aws_sdk_kms::primitives::Blob;
use signers::kms::aws_sdk_kms::types::{MessageType, SigningAlgorithmSpec};
use signers::worker::{AsyncWorker, AsyncWorkerConfig, WakeFn};

const ITERATIONS: usize = 500;

struct Setup {
    worker: AsyncWorker,
    signer: KmsSigner,
}

impl Setup {
    fn new(moto: &moto::Moto) -> Self {
        // The bench thread parks while waiting, the way a stage would; the worker unparks it.
        let me = std::thread::current();
        let wake: WakeFn = Box::new(move || me.unpark());
        let mut worker = AsyncWorker::start(&AsyncWorkerConfig::default(), Some(wake)).unwrap();
        let signer = worker
            .block_on(KmsSigner::create(&moto.config(""), "bench"))
            .unwrap();
        assert_eq!(worker.register(Arc::new(signer.clone())), 0);
        Self { worker, signer }
    }

    fn bare(&self, hash: B256) {
        let out = self
            .worker
            .block_on(
                self.signer
                    .client()
                    .sign()
                    .key_id(self.signer.key_id())
                    .message(Blob::new(hash.as_slice()))
                    .message_type(MessageType::Digest)
                    .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
                    .send(),
            )
            .unwrap();
        black_box(out);
    }

    fn signer(&self, hash: B256) {
        let sig = self
            .worker
            .block_on(self.signer.sign_hash_async(hash))
            .unwrap();
        black_box(sig);
    }

    fn through_worker(&self, seq: u64, hash: B256) {
        self.worker.try_submit(0, seq, hash).unwrap();
        let mut got = None;
        loop {
            self.worker.poll(&mut |c| got = Some(c));
            if got.is_some() {
                break;
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
        black_box(got.unwrap().result.unwrap());
    }
}

fn criterion_benches(c: &mut Criterion, setup: &Setup) {
    let mut g = c.benchmark_group("sign_kms");
    g.sample_size(30)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    let mut i = 0u64;
    let mut next = || {
        i += 1;
        (i, keccak256(i.to_be_bytes()))
    };
    g.bench_function("bare_sdk_sign", |b| b.iter(|| setup.bare(next().1)));
    g.bench_function("kms_signer_sign_hash_async", |b| {
        b.iter(|| setup.signer(next().1))
    });
    g.bench_function("kms_worker_submit_to_poll", |b| {
        b.iter(|| {
            let (seq, hash) = next();
            setup.through_worker(seq, hash)
        })
    });
    // Our local work on a KMS answer: DER parse, low-s, recovery id (one double-scalar mul).
    let hash = keccak256(b"post");
    let der = setup
        .worker
        .block_on(
            setup
                .signer
                .client()
                .sign()
                .key_id(setup.signer.key_id())
                .message(Blob::new(hash.as_slice()))
                .message_type(MessageType::Digest)
                .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
                .send(),
        )
        .unwrap()
        .signature()
        .unwrap()
        .as_ref()
        .to_vec();
    let public = setup.signer.public_key().to_projective();
    g.bench_function("der_to_recoverable_local_only", |b| {
        b.iter(|| signers::kms::recoverable_from_der(&public, black_box(&hash), &der).unwrap())
    });
    g.finish();
}

fn latency_run(setup: &Setup) {
    let mut rows: Vec<(&str, Histogram<u64>)> = vec![
        ("bare SDK `Sign` (DIGEST)", report::ns_histogram()),
        ("`KmsSigner::sign_hash_async`", report::ns_histogram()),
        ("`AsyncWorker` submit → poll", report::ns_histogram()),
    ];
    let mut seq = 1_000_000u64;
    // Interleaved so that drift of the shared machine hits all three alike.
    for i in 0..ITERATIONS {
        for (k, (_, h)) in rows.iter_mut().enumerate() {
            seq += 1;
            let hash = keccak256(seq.to_be_bytes());
            let t = Instant::now();
            match k {
                0 => setup.bare(hash),
                1 => setup.signer(hash),
                _ => setup.through_worker(seq, hash),
            }
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if i >= ITERATIONS / 10 {
                // The first 10 % warm connections and moto up.
                h.record(ns.max(1)).unwrap();
            }
        }
    }
    let mut summary = String::new();
    let _ = writeln!(summary, "# AWS KMS signer against moto on loopback\n");
    let _ = writeln!(
        summary,
        "{} sequential calls of each, interleaved, first 10 % dropped as warm-up; one key \
         (`ECC_SECG_P256K1`), `Sign` with `MessageType=DIGEST`, moto 5.2.5 with the DIGEST \
         correction of `scripts/moto_kms_server.py`, over plain HTTP on 127.0.0.1.\n",
        ITERATIONS
    );
    let _ = writeln!(summary, "{}", report::SUMMARY_HEADER);
    for (name, h) in &rows {
        let _ = writeln!(summary, "{}", report::summary_row(name, h));
        println!(
            "sign_kms latency {name}: p50 {:.1} µs, p99 {:.1} µs (n = {})",
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3,
            h.len()
        );
    }
    let _ = writeln!(
        summary,
        "\nCommand: `cargo bench -p benches --bench sign_kms`\n\nMachine:\n\n{}",
        report::machine_description()
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../latency-reports");
    let dir = report::run_dir(&root, "sign-kms").unwrap();
    std::fs::write(dir.join("summary.md"), &summary).unwrap();
    for (i, (_, h)) in rows.iter().enumerate() {
        let name = ["bare-sdk", "kms-signer", "kms-worker"][i];
        std::fs::write(dir.join(format!("{name}.hgrm")), report::hgrm(h)).unwrap();
    }
    println!("sign_kms: wrote {}", dir.join("summary.md").display());
}

fn main() {
    if benches::filtered_out("sign_kms") {
        return;
    }
    let moto = moto::Moto::spawn();
    let setup = Setup::new(&moto);
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &setup);
    c.final_summary();
    latency_run(&setup);
}
