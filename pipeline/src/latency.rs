//! Per-stage latency recording without locks or allocation on the hot path.
//!
//! A [`Recorder`] is owned by one thread. It keeps HdrHistogram-compatible bucket counters
//! (same bucketing as `hdrhistogram::Histogram::new_with_bounds(1, MAX_TRACKABLE_NS, 3)`) in a
//! preallocated array of atomics. [`Recorder::record`] computes the bucket index (a
//! `leading_zeros` and two shifts) and bumps one counter with a relaxed load + store: no lock,
//! no read-modify-write, no allocation, never blocks and never fails (values above the range
//! saturate to [`MAX_TRACKABLE_NS`]).
//!
//! The reporter ([`LatencyRegistry::snapshot`], off the hot path) reads each counter array,
//! subtracts what it read last time and turns the difference into an interval
//! `hdrhistogram::Histogram`, which it also adds to a cumulative one. Counters only grow and
//! only their owner writes them, so a value recorded while the reporter scans lands in this
//! interval or the next, never in both and never nowhere. The writer never waits for the
//! reporter and the reporter never needs the writer's cooperation (an idle stage's last values
//! are still reported).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use hdrhistogram::Histogram;

/// Highest value a recorder tracks, in ns (10 s); larger values are recorded as this.
pub const MAX_TRACKABLE_NS: u64 = 10_000_000_000;
/// Significant decimal digits kept (relative error below 0.1 %).
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// HdrHistogram bucketing for `lowest = 1`, 3 significant digits: 2048 sub-buckets.
const SUB_BUCKET_COUNT_MAGNITUDE: u32 = 11;
const SUB_BUCKET_HALF_COUNT_MAGNITUDE: u32 = SUB_BUCKET_COUNT_MAGNITUDE - 1;
const SUB_BUCKET_HALF_COUNT: u64 = 1 << SUB_BUCKET_HALF_COUNT_MAGNITUDE;
const SUB_BUCKET_MASK: u64 = (1 << SUB_BUCKET_COUNT_MAGNITUDE) - 1;
const LEADING_ZERO_COUNT_BASE: u32 = 64 - SUB_BUCKET_COUNT_MAGNITUDE;

/// Number of counters needed to cover `0..=MAX_TRACKABLE_NS`.
const fn counts_len() -> usize {
    let mut smallest_untrackable: u64 = 1 << SUB_BUCKET_COUNT_MAGNITUDE;
    let mut buckets: u64 = 1;
    while smallest_untrackable <= MAX_TRACKABLE_NS {
        smallest_untrackable <<= 1;
        buckets += 1;
    }
    ((buckets + 1) << SUB_BUCKET_HALF_COUNT_MAGNITUDE) as usize
}

const COUNTS_LEN: usize = counts_len();

/// Counter index of `value` (`value <= MAX_TRACKABLE_NS`), as in HdrHistogram.
#[inline(always)]
fn index_of(value: u64) -> usize {
    let bucket = LEADING_ZERO_COUNT_BASE - (value | SUB_BUCKET_MASK).leading_zeros();
    let sub_bucket = value >> bucket;
    ((u64::from(bucket) << SUB_BUCKET_HALF_COUNT_MAGNITUDE) + sub_bucket) as usize
}

/// Lowest value that falls in counter `index`.
fn value_of(index: usize) -> u64 {
    let index = index as u64;
    let mut bucket = (index >> SUB_BUCKET_HALF_COUNT_MAGNITUDE) as i64 - 1;
    let mut sub_bucket = (index & (SUB_BUCKET_HALF_COUNT - 1)) + SUB_BUCKET_HALF_COUNT;
    if bucket < 0 {
        sub_bucket -= SUB_BUCKET_HALF_COUNT;
        bucket = 0;
    }
    sub_bucket << bucket
}

/// A new, empty histogram with the recorders' bounds.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKABLE_NS, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds are valid")
}

/// The counters one recorder writes.
struct Counters {
    /// Invariant: `counts.len() == COUNTS_LEN`; only the owning `Recorder` stores to them.
    counts: Box<[AtomicU64]>,
}

impl Counters {
    fn new() -> Self {
        Self {
            counts: (0..COUNTS_LEN).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// A single-writer latency histogram owned by one thread. `record` never locks, allocates,
/// panics or fails.
pub struct Recorder {
    name: Arc<str>,
    counters: Arc<Counters>,
}

impl Recorder {
    /// Records one value in nanoseconds (saturating at [`MAX_TRACKABLE_NS`]).
    #[inline]
    pub fn record(&mut self, value_ns: u64) {
        let index = index_of(value_ns.min(MAX_TRACKABLE_NS));
        debug_assert!(index < COUNTS_LEN);
        if let Some(counter) = self.counters.counts.get(index) {
            // Single writer (`&mut self`): a relaxed load + store is an exact increment.
            counter.store(
                counter.load(Ordering::Relaxed).wrapping_add(1),
                Ordering::Relaxed,
            );
        }
    }

    /// The name this recorder was registered under.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What the reporter keeps per recorder.
struct Source {
    counters: Arc<Counters>,
    /// Counter values read at the previous snapshot.
    previous: Box<[u64]>,
}

/// Everything recorded under one name.
struct Series {
    name: Arc<str>,
    sources: Vec<Source>,
    cumulative: Histogram<u64>,
}

/// Registry of all recorders: per stage `"<stage>.queue_wait"` and `"<stage>.service"`, plus
/// any the engine adds (e.g. `"e2e.ws_to_node"`). Cheap to clone, `Send + Sync`.
#[derive(Clone, Default)]
pub struct LatencyRegistry {
    series: Arc<Mutex<Vec<Series>>>,
}

impl LatencyRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new recorder named `name` (allocates: call at setup). Several recorders may share a
    /// name; their values are merged in snapshots.
    pub fn recorder(&self, name: &str) -> Recorder {
        let counters = Arc::new(Counters::new());
        let mut all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let source = Source {
            counters: Arc::clone(&counters),
            previous: vec![0; COUNTS_LEN].into_boxed_slice(),
        };
        let name = match all.iter_mut().find(|s| &*s.name == name) {
            Some(series) => {
                series.sources.push(source);
                Arc::clone(&series.name)
            }
            None => {
                let name: Arc<str> = Arc::from(name);
                all.push(Series {
                    name: Arc::clone(&name),
                    sources: vec![source],
                    cumulative: new_histogram(),
                });
                name
            }
        };
        Recorder { name, counters }
    }

    /// Names registered so far, in registration order.
    pub fn names(&self) -> Vec<String> {
        let all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        all.iter().map(|s| s.name.to_string()).collect()
    }

    /// Off the hot path: gathers what each recorder recorded since the last snapshot, merges
    /// it into the cumulative histogram and returns both, one entry per name.
    pub fn snapshot(&self) -> Vec<HistogramSnapshot> {
        let mut all = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        all.iter_mut()
            .map(|series| {
                let mut interval = new_histogram();
                for source in &mut series.sources {
                    for (index, (counter, previous)) in source
                        .counters
                        .counts
                        .iter()
                        .zip(source.previous.iter_mut())
                        .enumerate()
                    {
                        let now = counter.load(Ordering::Relaxed);
                        let delta = now.wrapping_sub(*previous);
                        if delta != 0 {
                            *previous = now;
                            interval.saturating_record_n(value_of(index), delta);
                        }
                    }
                }
                // Same bounds on both sides: adding cannot fail.
                let _ = series.cumulative.add(&interval);
                HistogramSnapshot {
                    name: series.name.to_string(),
                    interval,
                    cumulative: series.cumulative.clone(),
                }
            })
            .collect()
    }
}

impl std::fmt::Debug for LatencyRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyRegistry")
            .field("names", &self.names())
            .finish()
    }
}

/// One name's histograms at a snapshot.
#[derive(Clone, Debug)]
pub struct HistogramSnapshot {
    /// The recorder name.
    pub name: String,
    /// What was recorded since the previous snapshot.
    pub interval: Histogram<u64>,
    /// Everything recorded so far.
    pub cumulative: Histogram<u64>,
}

impl HistogramSnapshot {
    /// Percentiles of the cumulative histogram.
    pub fn percentiles(&self) -> Percentiles {
        Percentiles::of(&self.cumulative)
    }

    /// Percentiles of the interval histogram.
    pub fn interval_percentiles(&self) -> Percentiles {
        Percentiles::of(&self.interval)
    }

    /// Cumulative bucket counts of the cumulative histogram, as Prometheus histograms count
    /// them: for each bound (ns, ascending) the number of values at or below it, written to
    /// `counts` (one per bound; extra entries on either side are left alone). To the
    /// histogram's resolution: a value counts under a bound when the lowest value of its
    /// HdrHistogram bucket is at or below the bound, so a value up to 0.1 % above a bound
    /// can count under it. One pass over the recorded buckets, whatever the number of bounds.
    pub fn cumulative_counts_at_or_below(&self, bounds_ns: &[u64], counts: &mut [u64]) {
        counts_at_or_below(&self.cumulative, bounds_ns, counts);
    }

    /// Sum of the cumulative histogram's values in ns (each value taken as the middle of its
    /// HdrHistogram bucket, as its mean is).
    pub fn cumulative_sum_ns(&self) -> u128 {
        sum_ns(&self.cumulative)
    }
}

/// See [`HistogramSnapshot::cumulative_counts_at_or_below`].
fn counts_at_or_below(h: &Histogram<u64>, bounds_ns: &[u64], counts: &mut [u64]) {
    let n = bounds_ns.len().min(counts.len());
    let (bounds_ns, counts) = (&bounds_ns[..n], &mut counts[..n]);
    counts.fill(0);
    let mut below = 0u64;
    let mut next = 0;
    for v in h.iter_recorded() {
        let low = h.lowest_equivalent(v.value_iterated_to());
        while next < n && bounds_ns[next] < low {
            counts[next] = below;
            next += 1;
        }
        below += v.count_at_value();
    }
    for c in &mut counts[next..] {
        *c = below;
    }
}

/// See [`HistogramSnapshot::cumulative_sum_ns`].
fn sum_ns(h: &Histogram<u64>) -> u128 {
    h.iter_recorded()
        .map(|v| {
            u128::from(h.median_equivalent(v.value_iterated_to())) * u128::from(v.count_at_value())
        })
        .sum()
}

/// Summary of a histogram, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    /// Number of values.
    pub count: u64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 95th percentile.
    pub p95_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest value (to the histogram's precision).
    pub max_ns: u64,
    /// Mean.
    pub mean_ns: f64,
}

impl Percentiles {
    /// Summarises `h` (all zeros if empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.50),
            p90_ns: h.value_at_quantile(0.90),
            p95_ns: h.value_at_quantile(0.95),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
            mean_ns: h.mean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketing_matches_hdrhistogram() {
        let h = new_histogram();
        let mut values: Vec<u64> = (0..5000).collect();
        let mut v = 1u64;
        while v < MAX_TRACKABLE_NS {
            values.extend([v - 1, v, v + 1, v * 3 / 2]);
            v *= 2;
        }
        values.push(MAX_TRACKABLE_NS);
        for v in values.into_iter().filter(|&v| v <= MAX_TRACKABLE_NS) {
            let i = index_of(v);
            assert!(i < COUNTS_LEN, "{v}");
            assert_eq!(value_of(i), h.lowest_equivalent(v), "value {v}");
        }
    }

    #[test]
    fn counts_at_or_below_bounds() {
        let reg = LatencyRegistry::new();
        let mut r = reg.recorder("s.service");
        for v in [
            0,
            500,
            1_000,
            1_001,
            1_500,
            3_000,
            2_000_000,
            20_000_000_000,
        ] {
            r.record(v);
        }
        let snap = &reg.snapshot()[0];
        let bounds = [
            999,
            1_000,
            2_000,
            5_000,
            2_000_000,
            MAX_TRACKABLE_NS,
            u64::MAX,
        ];
        let mut counts = [u64::MAX; 8];
        snap.cumulative_counts_at_or_below(&bounds, &mut counts);
        assert_eq!(counts, [2, 3, 5, 6, 7, 8, 8, u64::MAX]);
        let mut none = [7u64; 3];
        snap.cumulative_counts_at_or_below(&[], &mut none);
        assert_eq!(none, [7; 3]);
        let empty = LatencyRegistry::new();
        let _ = empty.recorder("e");
        let snap_e = &empty.snapshot()[0];
        let mut counts = [9u64; 2];
        snap_e.cumulative_counts_at_or_below(&[1, 2], &mut counts);
        assert_eq!(counts, [0, 0]);
        assert_eq!(snap_e.cumulative_sum_ns(), 0);
        // Values below 2048 ns are exact; the two large ones are within 0.1 %.
        let sum = snap.cumulative_sum_ns();
        let exact: u128 = 500 + 1_000 + 1_001 + 1_500 + 3_000 + 2_000_000 + 10_000_000_000;
        assert!(sum.abs_diff(exact) * 1000 < exact, "{sum} vs {exact}");
    }

    #[test]
    fn intervals_and_cumulative() {
        let reg = LatencyRegistry::new();
        let mut a = reg.recorder("s.service");
        let mut b = reg.recorder("s.service");
        let mut c = reg.recorder("s.queue_wait");
        for v in 1..=1000 {
            a.record(v);
        }
        b.record(u64::MAX);
        c.record(0);
        let snaps = reg.snapshot();
        assert_eq!(snaps.len(), 2);
        let s = &snaps[0];
        assert_eq!(s.name, "s.service");
        assert_eq!(s.interval.len(), 1001);
        let p = s.percentiles();
        assert_eq!(p.count, 1001);
        assert!((499..=501).contains(&p.p50_ns), "{p:?}");
        assert!(p.max_ns >= MAX_TRACKABLE_NS);
        a.record(5);
        let snaps = reg.snapshot();
        assert_eq!(snaps[0].interval.len(), 1);
        assert_eq!(snaps[0].cumulative.len(), 1002);
        assert_eq!(snaps[1].interval.len(), 0);
        assert_eq!(snaps[1].cumulative.len(), 1);
        assert_eq!(a.name(), "s.service");
    }
}
