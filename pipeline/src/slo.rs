//! Per-stage latency budgets (SLOs) over fixed windows, and how much error budget is burnt.
//!
//! A budget sets optional p50 / p95 / p99 / p99.9 targets for one recorder name and a window
//! length.
//! [`SloTracker::observe`] is fed the reporter's snapshots; it accumulates each name's interval
//! histograms until a window has elapsed, then judges the window: *inside* if every set target
//! holds, otherwise a bad window. The error budget is the fraction of windows allowed to be
//! bad; `error_budget_burnt = bad / (error_budget * windows)` (1.0 = exhausted) and the burn
//! rate is the bad fraction of the last [`BURN_RATE_WINDOWS`] windows over the error budget
//! (1.0 = burning exactly as fast as allowed). [`SloTracker::burn_over`] gives the same rate
//! over any number of recent windows up to the budget's `history`, for multi-window burn-rate
//! alerts (a long and a short window per alert, as in the SRE workbook).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::latency::{HistogramSnapshot, Percentiles, new_histogram};

/// How many recent windows the burn rate looks at.
pub const BURN_RATE_WINDOWS: usize = 12;

/// Latency targets for one recorder.
#[derive(Clone, Debug)]
pub struct SloBudget {
    /// Median target, ns.
    pub p50_ns: Option<u64>,
    /// 95th percentile target, ns.
    pub p95_ns: Option<u64>,
    /// 99th percentile target, ns.
    pub p99_ns: Option<u64>,
    /// 99.9th percentile target, ns.
    pub p999_ns: Option<u64>,
    /// Window over which the percentiles are judged.
    pub window: Duration,
    /// Fraction of windows allowed to be out of budget, e.g. 0.01.
    pub error_budget: f64,
    /// Window outcomes kept for [`SloTracker::burn_over`] (at least [`BURN_RATE_WINDOWS`]).
    pub history: usize,
}

impl SloBudget {
    /// Whether `p` meets every target set.
    pub fn is_met_by(&self, p: &Percentiles) -> bool {
        self.p50_ns.is_none_or(|t| p.p50_ns <= t)
            && self.p95_ns.is_none_or(|t| p.p95_ns <= t)
            && self.p99_ns.is_none_or(|t| p.p99_ns <= t)
            && self.p999_ns.is_none_or(|t| p.p999_ns <= t)
    }
}

/// Where one recorder stands against its budget.
#[derive(Clone, Debug)]
pub struct SloState {
    /// Recorder name.
    pub name: String,
    /// The last completed window met every target (true until a window completes, unless
    /// the window in progress already breaks a target).
    pub inside: bool,
    /// Median of the last completed window (or of the window in progress before any completed).
    pub window_p50_ns: u64,
    /// 95th percentile of that window.
    pub window_p95_ns: u64,
    /// 99th percentile of that window.
    pub window_p99_ns: u64,
    /// 99.9th percentile of that window.
    pub window_p999_ns: u64,
    /// Fraction of the error budget used so far; 1.0 = exhausted.
    pub error_budget_burnt: f64,
    /// Bad fraction of the recent windows divided by the error budget.
    pub burn_rate: f64,
    /// Windows judged so far.
    pub windows: u64,
    /// Windows out of budget so far.
    pub bad_windows: u64,
}

struct Track {
    budget: SloBudget,
    window_start: Option<Instant>,
    current: Histogram<u64>,
    last: Option<Percentiles>,
    windows: u64,
    bad: u64,
    /// Outcomes of the last `budget.history` windows (true = bad), newest last.
    recent: VecDeque<bool>,
}

impl Track {
    fn state(&self, name: &str) -> SloState {
        let (inside, p) = match self.last {
            Some(p) => (self.budget.is_met_by(&p), p),
            None => {
                let p = Percentiles::of(&self.current);
                (p.count == 0 || self.budget.is_met_by(&p), p)
            }
        };
        let allowed = self.budget.error_budget;
        let burnt = if self.windows == 0 {
            0.0
        } else if allowed > 0.0 {
            self.bad as f64 / (allowed * self.windows as f64)
        } else if self.bad > 0 {
            f64::INFINITY
        } else {
            0.0
        };
        let burn_rate = self.burn_over(BURN_RATE_WINDOWS);
        SloState {
            name: name.to_owned(),
            inside,
            window_p50_ns: p.p50_ns,
            window_p95_ns: p.p95_ns,
            window_p99_ns: p.p99_ns,
            window_p999_ns: p.p999_ns,
            error_budget_burnt: burnt,
            burn_rate,
            windows: self.windows,
            bad_windows: self.bad,
        }
    }
}

impl Track {
    /// Bad fraction of the last `n` judged windows (fewer if fewer were judged) over the
    /// error budget; 0 before any window was judged.
    fn burn_over(&self, n: usize) -> f64 {
        let n = n.min(self.recent.len());
        if n == 0 {
            return 0.0;
        }
        let bad = self.recent.iter().rev().take(n).filter(|b| **b).count();
        let allowed = self.budget.error_budget;
        if allowed > 0.0 {
            (bad as f64 / n as f64) / allowed
        } else if bad > 0 {
            f64::INFINITY
        } else {
            0.0
        }
    }
}

/// Judges recorders against their budgets, window by window. Runs on the reporter thread.
#[derive(Default)]
pub struct SloTracker {
    tracks: HashMap<String, Track>,
}

impl SloTracker {
    /// No budgets yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (or replaces) the budget of `recorder_name`, starting its windows afresh.
    pub fn set_budget(&mut self, recorder_name: &str, b: SloBudget) {
        let keep = b.history.max(BURN_RATE_WINDOWS);
        self.tracks.insert(
            recorder_name.to_owned(),
            Track {
                budget: b,
                window_start: None,
                current: new_histogram(),
                last: None,
                windows: 0,
                bad: 0,
                recent: VecDeque::with_capacity(keep),
            },
        );
    }

    /// Feeds one round of snapshots (their interval histograms) and returns the state of every
    /// budgeted name present in `snaps`.
    pub fn observe(&mut self, snaps: &[HistogramSnapshot], now: Instant) -> Vec<SloState> {
        let mut out = Vec::new();
        for snap in snaps {
            let Some(track) = self.tracks.get_mut(&snap.name) else {
                continue;
            };
            let start = *track.window_start.get_or_insert(now);
            let _ = track.current.add(&snap.interval);
            if now.duration_since(start) >= track.budget.window {
                let p = Percentiles::of(&track.current);
                let bad = !track.budget.is_met_by(&p);
                if track.recent.len() == track.budget.history.max(BURN_RATE_WINDOWS) {
                    track.recent.pop_front();
                }
                track.recent.push_back(bad);
                track.windows += 1;
                track.bad += u64::from(bad);
                track.last = Some(p);
                track.current.reset();
                track.window_start = Some(now);
            }
            out.push(track.state(&snap.name));
        }
        out
    }

    /// Burn rate of `recorder_name` over its last `windows` judged windows (see the module
    /// docs); `None` for a name without a budget.
    pub fn burn_over(&self, recorder_name: &str, windows: usize) -> Option<f64> {
        self.tracks.get(recorder_name).map(|t| t.burn_over(windows))
    }
}

impl std::fmt::Debug for SloTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SloTracker")
            .field("names", &self.tracks.keys())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::latency::LatencyRegistry;

    #[test]
    fn windows_are_judged_and_budget_burns() {
        let reg = LatencyRegistry::new();
        let mut r = reg.recorder("policy.service");
        let mut slo = SloTracker::new();
        slo.set_budget(
            "policy.service",
            SloBudget {
                p50_ns: Some(1_000),
                p95_ns: None,
                p99_ns: Some(2_000),
                p999_ns: None,
                window: Duration::from_secs(1),
                error_budget: 0.25,
                history: 100,
            },
        );
        let t0 = Instant::now();
        // Window 1: good.
        for _ in 0..100 {
            r.record(500);
        }
        let s = slo.observe(&reg.snapshot(), t0);
        assert_eq!(s.len(), 1);
        assert!(s[0].inside);
        assert_eq!(s[0].windows, 0);
        let s = slo.observe(&reg.snapshot(), t0 + Duration::from_secs(1));
        assert!(s[0].inside);
        assert_eq!((s[0].windows, s[0].bad_windows), (1, 0));
        // Window 2: p99 broken.
        for _ in 0..90 {
            r.record(500);
        }
        for _ in 0..10 {
            r.record(50_000);
        }
        let s = slo.observe(&reg.snapshot(), t0 + Duration::from_secs(2));
        assert!(!s[0].inside);
        assert!(s[0].window_p99_ns >= 49_000, "{:?}", s[0]);
        assert_eq!((s[0].windows, s[0].bad_windows), (2, 1));
        // 1 bad of 2 with 25 % allowed: 0.5 / 0.25 = 2x the budget.
        assert!((s[0].error_budget_burnt - 2.0).abs() < 1e-9, "{:?}", s[0]);
        assert!((s[0].burn_rate - 2.0).abs() < 1e-9);
        // Over the last window only: 1 bad of 1 = 4x; over 100 windows, the 2 judged count.
        assert!((slo.burn_over("policy.service", 1).unwrap() - 4.0).abs() < 1e-9);
        assert!((slo.burn_over("policy.service", 100).unwrap() - 2.0).abs() < 1e-9);
        assert!(slo.burn_over("intake.service", 1).is_none());
        // A p95 target alone judges the 95th percentile: 10 % slow values break it.
        slo.set_budget(
            "policy.service",
            SloBudget {
                p50_ns: None,
                p95_ns: Some(2_000),
                p99_ns: None,
                p999_ns: None,
                window: Duration::from_secs(1),
                error_budget: 0.5,
                history: 100,
            },
        );
        let t1 = t0 + Duration::from_secs(10);
        slo.observe(&reg.snapshot(), t1);
        for _ in 0..90 {
            r.record(500);
        }
        for _ in 0..10 {
            r.record(50_000);
        }
        let s = slo.observe(&reg.snapshot(), t1 + Duration::from_secs(1));
        assert!(!s[0].inside, "{:?}", s[0]);
        assert!(s[0].window_p95_ns >= 49_000, "{:?}", s[0]);
    }
}
