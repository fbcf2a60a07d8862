//! Shared helpers of the benchmarks and latency runs: where reports go, what machine they ran
//! on, HdrHistogram percentile output, thread pinning, CPU-time accounting.

use std::path::PathBuf;

pub mod baseline;
pub mod pipeline_latency;

// Report files, machine description and CPU accounting are shared with the engine's
// latency runs.
pub use pipeline::report::{hgrm, machine_description, ns_histogram, process_cpu_time, today};

/// Whether `cargo bench`'s filter arguments (those not starting with `--`) leave out the
/// run called `name`: a filter that is not part of the name skips it.
pub fn filtered_out(name: &str) -> bool {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .any(|f| !name.contains(f.as_str()))
}

/// A fresh dev chain (`block_ms` blocks) and the engine's dev configuration for it, as load
/// runs use it: one confirmation, and the desk rate limits raised far above a desk's
/// defaults (a load generator is one principal over several connections); with a token
/// for `principal` signed by the configuration's secret.
pub fn load_setup(
    block_ms: u64,
    principal: &str,
) -> Result<(venues::Anvil, engine::Config, String), String> {
    let anvil = engine::dev::start_chain(None, std::time::Duration::from_millis(block_ms))
        .map_err(|e| format!("dev chain: {e}"))?;
    let secret = format!("{principal}-load-secret-0123456789abcdef");
    let mut cfg = engine::dev::dev_config(
        &anvil.ws_url(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        secret.clone(),
    );
    cfg.confirmations = 1;
    cfg.limits.frames_per_sec_per_connection = 1_000_000;
    cfg.limits.burst_per_connection = 1_000_000;
    cfg.limits.frames_per_sec_per_principal = 1_000_000;
    cfg.limits.burst_per_principal = 1_000_000;
    let token = engine::auth::JwtAuth::new(secret.as_bytes()).issue(
        principal,
        engine::auth::Roles::all(),
        3600,
    );
    Ok((anvil, cfg, token))
}

/// `latency-reports/` at the workspace root.
pub fn reports_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("latency-reports")
}

/// Pins the current thread to `core`; returns whether it worked. (Not checked against
/// `core_affinity::get_core_ids()`: that is the calling thread's mask, which a pinned parent
/// has already narrowed for its children.)
pub fn pin(core: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: core })
}

/// Sets this thread's timer slack to 1 ns, so short sleeps are not rounded up by 50 µs.
pub fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and affects only this thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// Formats nanoseconds for tables: `850 ns`, `12.3 µs`, `4.56 ms`.
pub fn fmt_ns(ns: u64) -> String {
    if ns < 10_000 {
        format!("{ns} ns")
    } else if ns < 10_000_000 {
        format!("{:.1} µs", ns as f64 / 1000.0)
    } else {
        format!("{:.2} ms", ns as f64 / 1e6)
    }
}
