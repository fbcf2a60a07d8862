//! Five-stage pipeline latency run under `cargo bench` (see `benches::pipeline_latency`):
//! 10k msg/s, 3 s per layout and wait strategy, report in `latency-reports/<date>-pipeline/`.
//!
//! `cargo bench -p benches --bench pipeline`

fn main() {
    // `cargo bench` passes `--bench` and maybe a filter; a filter that names neither this run
    // nor "pipeline" skips it.
    if benches::filtered_out("pipeline") {
        return;
    }
    benches::pipeline_latency::run_all(10_000, 3.0);
}
