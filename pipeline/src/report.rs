//! Latency report files, shared by the benchmarks and the engine's latency runs:
//! HdrHistogram percentile distributions (`.hgrm`), summary tables, the machine a run
//! was measured on, CPU-time accounting, and run folders under `latency-reports/`.
//!
//! Everything here runs off the hot path (it formats text and allocates freely).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use crate::runner::CoreBudget;

/// A histogram for nanosecond latencies from 1 ns up to 10 minutes, 3 significant digits.
pub fn ns_histogram() -> Histogram<u64> {
    match Histogram::new_with_bounds(1, 600_000_000_000, 3) {
        Ok(h) => h,
        // Bounds and precision above are constants that `new_with_bounds` accepts.
        Err(_) => unreachable!("constant histogram bounds are valid"),
    }
}

/// HdrHistogram's classic percentile distribution text (`.hgrm`), values in µs, from a
/// histogram recorded in nanoseconds.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            format!("{:>14.2}", 1.0 / (1.0 - q))
        } else {
            format!("{:>14}", "")
        };
        let _ = writeln!(
            out,
            "{:>12.3} {:>14.12} {:>10} {}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inv
        );
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    out
}

/// Header of [`summary_row`] tables (markdown).
pub const SUMMARY_HEADER: &str = "| what | count | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |\n|---|---:|---:|---:|---:|---:|---:|";

/// One markdown row: count and percentiles in µs of a nanosecond histogram.
pub fn summary_row(name: &str, h: &Histogram<u64>) -> String {
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1e3;
    format!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        h.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        h.max() as f64 / 1e3
    )
}

/// A markdown description of the machine: CPU model, cores usable, kernel, build profile.
pub fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".to_owned(), |s| s.trim().to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".to_owned(), |s| s.trim().to_owned());
    let budget = CoreBudget::detect();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release (opt-level 3, thin LTO)"
    };
    let mut s = String::new();
    let _ = writeln!(s, "- CPU: {model}");
    let _ = writeln!(
        s,
        "- cores usable: {} (affinity {:?}, cgroup quota {})",
        budget.usable_cores(),
        budget.core_ids(),
        budget
            .quota_cores()
            .map_or("none".to_owned(), |q| format!("{q:.2} cores"))
    );
    let _ = writeln!(s, "- kernel: {kernel}");
    let _ = writeln!(s, "- build: {profile}");
    s
}

/// CPU time (user + system) this process has used, all threads.
pub fn process_cpu_time() -> Duration {
    // SAFETY: `rusage` is plain data; all-zeros is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `rusage`; RUSAGE_SELF is always a valid target.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Share of one core this process uses over `window` (sleeps for `window`).
pub fn cpu_share_over(window: Duration) -> f64 {
    let a = process_cpu_time();
    std::thread::sleep(window);
    let b = process_cpu_time();
    b.saturating_sub(a).as_secs_f64() / window.as_secs_f64()
}

/// UTC civil date and time `(year, month, day, hour, minute, second)` of unix seconds
/// (Howard Hinnant's civil-from-days).
pub fn civil_utc(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (
        if m <= 2 { y + 1 } else { y },
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Today's date (UTC) as `YYYY-MM-DD`.
pub fn today() -> String {
    let (y, m, d, ..) = civil_utc(unix_now());
    format!("{y:04}-{m:02}-{d:02}")
}

/// Creates and returns a run folder `<root>/<YYYY-MM-DD>T<HHMMSS>Z-<kind>`.
pub fn run_dir(root: &Path, kind: &str) -> std::io::Result<PathBuf> {
    let (y, mo, d, h, mi, s) = civil_utc(unix_now());
    let dir = root.join(format!("{y:04}-{mo:02}-{d:02}T{h:02}{mi:02}{s:02}Z-{kind}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_utc(0), (1970, 1, 1, 0, 0, 0));
        // 2026-11-18T11:06:40Z, checked with Python's datetime.
        assert_eq!(civil_utc(1_795_000_000), (2026, 11, 18, 11, 6, 40));
        // 2000-02-29 (leap day of a century leap year).
        assert_eq!(civil_utc(951_782_400), (2000, 2, 29, 0, 0, 0));
    }

    #[test]
    fn hgrm_has_the_standard_columns_and_totals() {
        let mut h = ns_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let text = hgrm(&h);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
        assert!(text.contains("Total count    =         1000"), "{text}");
        let row = summary_row("x", &h);
        assert!(row.starts_with("| x | 1000 | 500."), "{row}");
    }

    #[test]
    fn cpu_time_moves_when_working() {
        let a = process_cpu_time();
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        assert!(process_cpu_time() > a);
    }
}
