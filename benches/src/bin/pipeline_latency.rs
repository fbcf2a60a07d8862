//! Five-stage pipeline latency run (see `benches::pipeline_latency`).
//!
//! `cargo run -p benches --release --bin pipeline-latency [-- --seconds 3 --rate 10000]`

use benches::pipeline_latency::{arg, run_all};

fn main() {
    run_all(arg("--rate", 10_000.0) as u64, arg("--seconds", 3.0));
}
