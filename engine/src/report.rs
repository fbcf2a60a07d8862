//! Latency report files: HdrHistogram percentile distributions (`.hgrm`), a summary table,
//! and the machine they were measured on.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

/// Percentile distribution in HdrHistogram's text format (`.hgrm`), values in
/// microseconds, from a histogram recorded in nanoseconds.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let value_us = v.value_iterated_to() as f64 / 1e3;
        if q < 1.0 {
            let _ = writeln!(
                s,
                "{value_us:>12.3} {q:>14.12} {:>10} {:>14.2}",
                v.count_since_last_iteration(),
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(
                s,
                "{value_us:>12.3} {q:>14.12} {:>10}",
                v.count_since_last_iteration()
            );
        }
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1e3,
        h.stdev() / 1e3
    );
    let _ = writeln!(
        s,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1e3,
        h.len()
    );
    s
}

/// One row of a summary table, in microseconds.
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

/// Header of [`summary_row`] tables.
pub const SUMMARY_HEADER: &str = "| what | count | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |\n|---|---:|---:|---:|---:|---:|---:|";

/// What machine this is: CPU model, usable cores, kernel, build profile.
pub fn machine_description(extra: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let budget = pipeline::CoreBudget::detect();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    format!(
        "cpu: {cpu}\ncores in affinity mask: {:?}\nusable cores (mask and cgroup quota): {}\nkernel: {kernel}\nbuild profile: {profile}\n{extra}",
        budget.core_ids(),
        budget.usable_cores()
    )
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat`.
pub fn process_cpu_time() -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; _SC_CLK_TCK is a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(std::time::Duration::from_micros(
        (utime + stime) * 1_000_000 / hz,
    ))
}

/// Share of one core this process used while idle for `window`.
pub fn idle_cpu_share(window: std::time::Duration) -> Option<f64> {
    let a = process_cpu_time()?;
    std::thread::sleep(window);
    let b = process_cpu_time()?;
    Some((b - a).as_secs_f64() / window.as_secs_f64())
}

/// A new run folder `latency-reports/<UTC time>-<kind>` under `root`.
pub fn run_dir(root: &Path, kind: &str) -> std::io::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, mo, d, h, mi, s) = civil(secs);
    let dir = root.join(format!("{y:04}-{mo:02}-{d:02}T{h:02}{mi:02}{s:02}Z-{kind}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// UTC civil time from unix seconds (Howard Hinnant's days-from-civil inverse).
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(1_795_000_000), (2026, 11, 18, 11, 6, 40));
    }

    #[test]
    fn hgrm_has_the_standard_columns_and_totals() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let text = hgrm(&h);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
        assert!(text.contains("Total count    =         1000"));
    }
}
