//! Policy decision latency with a production-sized policy: 10,000 allowlisted addresses,
//! 1,000 KYT entries, 100 velocity windows (plus business hours with a time zone, travel
//! rule and four-eyes thresholds). Target: p99 under 2 µs.
//!
//! First a timed run of 5 × 200,000 decisions into an HDR histogram (each decision timed
//! on its own with the TSC clock), written to `latency-reports/<time>-policy/`; then
//! criterion's estimate of the mean.
//!
//! `cargo bench -p benches --bench policy`

use std::fmt::Write as _;
use std::hint::black_box;

use benches::{fmt_ns, ns_histogram, reports_root};
use criterion::Criterion;
use engine::risk::fixture::{Sizes, large};
use engine::risk::unix_now_ns;

const RUNS: usize = 5;
const PER_RUN: usize = 200_000;

fn timed_runs() {
    let clock = quanta::Clock::new();
    let now = unix_now_ns();
    let (mut risk, intents) = large(Sizes::default(), now);
    let mut all = ns_histogram();
    let mut rows = String::new();
    let mut outcomes = [0usize; 3];
    for run in 0..RUNS {
        let mut h = ns_histogram();
        for i in 0..PER_RUN {
            let k = run * PER_RUN + i;
            let m = &intents[k % intents.len()];
            let t0 = clock.raw();
            let v = risk.decide(black_box(m), &[], now + k as u64 * 1_000);
            let t1 = clock.raw();
            black_box(&v);
            outcomes[match v.outcome {
                engine::risk::rules::Outcome::Allow => 0,
                engine::risk::rules::Outcome::Deny(..) => 1,
                engine::risk::rules::Outcome::Approval(_)
                | engine::risk::rules::Outcome::Verify => 2,
            }] += 1;
            let ns = clock.delta_as_nanos(t0, t1).max(1);
            let _ = h.record(ns);
        }
        let _ = writeln!(
            rows,
            "{}",
            pipeline::report::summary_row(&format!("run {}", run + 1), &h)
        );
        println!(
            "policy decision run {}: p50 {} p99 {} p99.9 {} max {}",
            run + 1,
            fmt_ns(h.value_at_quantile(0.5)),
            fmt_ns(h.value_at_quantile(0.99)),
            fmt_ns(h.value_at_quantile(0.999)),
            fmt_ns(h.max())
        );
        all.add(&h).ok();
    }
    let _ = writeln!(rows, "{}", pipeline::report::summary_row("all runs", &all));
    let summary = format!(
        "# Policy decision latency\n\n\
         Policy: 10,000 allowlisted addresses, 1,000 KYT entries, 100 velocity windows \
         (1 h and 24 h on 50 accounts), business hours (Europe/Zurich), travel rule, four-eyes \
         threshold. Each decision timed alone (TSC). Outcomes: {} allow, {} deny, {} approval.\n\n\
         Target: p99 < 2 µs.\n\n{}\n{rows}\n## Machine\n\n{}\n\nCommand: `cargo bench -p benches --bench policy`\n",
        outcomes[0],
        outcomes[1],
        outcomes[2],
        pipeline::report::SUMMARY_HEADER,
        pipeline::report::machine_description()
    );
    match pipeline::report::run_dir(&reports_root(), "policy") {
        Ok(dir) => {
            let _ = std::fs::write(dir.join("summary.md"), &summary);
            let _ = std::fs::write(dir.join("policy.decide.hgrm"), pipeline::report::hgrm(&all));
            println!("wrote {}", dir.display());
        }
        Err(e) => eprintln!("could not write the report: {e}"),
    }
}

fn criterion_bench(c: &mut Criterion) {
    let now = unix_now_ns();
    let (mut risk, intents) = large(Sizes::default(), now);
    let mut k = 0usize;
    c.bench_function("policy/decide (10k allowlist, 1k KYT, 100 windows)", |b| {
        b.iter(|| {
            k += 1;
            let m = &intents[k % intents.len()];
            black_box(risk.decide(black_box(m), &[], now + k as u64 * 1_000))
        })
    });
}

fn main() {
    if benches::filtered_out("policy") {
        return;
    }
    timed_runs();
    let mut c = Criterion::default().configure_from_args();
    criterion_bench(&mut c);
    c.final_summary();
}
