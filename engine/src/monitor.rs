//! The SLO monitor: per-stage latency budgets, multi-window burn-rate alerts, automatic
//! actions, and the feed behind `/dashboard`.
//!
//! One thread (`slo-monitor`, off the hot path and off the desk I/O runtime) wakes every
//! `[slo] tick_ms`. Each tick it reads every latency recorder's cumulative histogram and
//! takes the difference with the previous tick's (so what it sees does not depend on who
//! else reads the registry), the queue depths, the event counters and the providers'
//! health, and:
//!
//! - renders one tick of the feed (per-stage p50 / p99 / p99.9 of what was recorded during
//!   the tick, queue depths, throughput, SLO state, providers), keeps the last
//!   `history_ticks` of them for new dashboard clients and sends it to the connected ones;
//! - judges each `[[slo.budgets]]` entry window by window ([`pipeline::SloTracker`]: a
//!   window is *bad* when a p95 / p99 target is broken; the error budget is the fraction
//!   of windows allowed to be bad);
//! - raises and clears burn-rate alerts as the SRE workbook's multi-window rule does: an
//!   alert fires while the burn rate over both its long and its short window is at or
//!   above its threshold (`fast`: page, default 1 h / 5 min at 14.4; `slow`: ticket,
//!   6 h / 30 min at 6) and resolves as soon as either drops below. Each change is an
//!   `slo_alert` event on the feed and a log line (`warn` firing, `info` resolved);
//! - on a fast-burn alert of a budget with an `action`, acts where an alternative exists,
//!   again at most every `action_cooldown_s` while it keeps firing, and says what it did
//!   and why in an `slo_action` event and a log line: `demote_provider` demotes the
//!   connected provider with the slowest smoothed round trip when another connected one
//!   can take its traffic (the broadcast stage demotes it on its next send, exactly as
//!   it demotes a provider over its latency budget); `fail_over_signer` moves every
//!   account that has a standby to it for `failover_retry_ms` (as an unavailable primary
//!   does). Without an alternative the event says so and nothing changes.
//!
//! # Invariants
//!
//! - Nothing here runs on a stage thread or adds work per message: recorders are read
//!   with loads only, the broadcast stage sees a demotion request as one relaxed load per
//!   send, and the signers' fail-over is the same flag an unavailable primary sets.
//! - A feed client that does not keep up misses ticks (it is told how many); it never
//!   slows the monitor or another client.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use pipeline::{HistogramSnapshot, Percentiles, SloBudget, SloTracker};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::msg::State;
use crate::server::ServerCtx;

/// `[slo]`: the monitor's tick, the dashboard's history, the alert windows and the budgets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloConfig {
    /// How often the monitor samples (ms, at least 100); also the dashboard feed's interval.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Ticks the dashboard feed keeps for a client that connects (at least 1).
    #[serde(default = "default_history_ticks")]
    pub history_ticks: usize,
    /// The fast-burn (page) alert.
    #[serde(default = "BurnAlert::fast")]
    pub fast: BurnAlert,
    /// The slow-burn (ticket) alert.
    #[serde(default = "BurnAlert::slow")]
    pub slow: BurnAlert,
    /// Least time between two automatic actions of one budget while its fast alert fires (s).
    #[serde(default = "default_action_cooldown_s")]
    pub action_cooldown_s: u64,
    /// Per-stage budgets.
    #[serde(default)]
    pub budgets: Vec<StageBudget>,
}

fn default_tick_ms() -> u64 {
    1000
}
fn default_history_ticks() -> usize {
    300
}
fn default_action_cooldown_s() -> u64 {
    60
}
fn default_window_s() -> u64 {
    10
}
fn default_error_budget() -> f64 {
    0.01
}

impl Default for SloConfig {
    fn default() -> Self {
        Self {
            tick_ms: default_tick_ms(),
            history_ticks: default_history_ticks(),
            fast: BurnAlert::fast(),
            slow: BurnAlert::slow(),
            action_cooldown_s: default_action_cooldown_s(),
            budgets: Vec::new(),
        }
    }
}

/// One burn-rate alert: it fires while the burn rate over both windows is at or above `burn`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BurnAlert {
    /// Long window (s).
    pub long_s: u64,
    /// Short window (s), at most the long one; it makes the alert clear soon after the
    /// burn stops.
    pub short_s: u64,
    /// Burn-rate threshold (1.0 = using the error budget exactly as fast as allowed).
    pub burn: f64,
}

impl BurnAlert {
    /// The workbook's page: 2 % of a 30-day budget in an hour (1 h / 5 min at 14.4).
    pub fn fast() -> Self {
        Self {
            long_s: 3600,
            short_s: 300,
            burn: 14.4,
        }
    }

    /// The workbook's ticket: 5 % of a 30-day budget in 6 hours (6 h / 30 min at 6).
    pub fn slow() -> Self {
        Self {
            long_s: 6 * 3600,
            short_s: 1800,
            burn: 6.0,
        }
    }
}

/// What the monitor may do when a budget's fast alert fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SloAction {
    /// Demote the connected RPC provider with the slowest smoothed round trip.
    DemoteProvider,
    /// Move accounts with a standby custody backend to it.
    FailOverSigner,
}

impl SloAction {
    /// Name in events and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            SloAction::DemoteProvider => "demote_provider",
            SloAction::FailOverSigner => "fail_over_signer",
        }
    }
}

/// `[[slo.budgets]]`: latency targets for one stage recorder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageBudget {
    /// Recorder name, as `/v1/latency` lists them (e.g. `e2e.ws_to_wire`, `signing.service`).
    pub stage: String,
    /// 95th percentile target over a window (µs).
    #[serde(default)]
    pub p95_us: Option<f64>,
    /// 99th percentile target over a window (µs).
    #[serde(default)]
    pub p99_us: Option<f64>,
    /// Window over which the percentiles are judged (s; a multiple of the tick is best).
    #[serde(default = "default_window_s")]
    pub window_s: u64,
    /// Fraction of windows allowed to break a target (0 < x ≤ 1).
    #[serde(default = "default_error_budget")]
    pub error_budget: f64,
    /// Automatic action on a fast-burn alert.
    #[serde(default)]
    pub action: Option<SloAction>,
}

impl SloConfig {
    /// Checks the settings that do not need the running engine (names are checked at start).
    pub fn validate(&self) -> Result<(), String> {
        if self.tick_ms < 100 {
            return Err("slo.tick_ms: must be at least 100".into());
        }
        if self.history_ticks == 0 {
            return Err("slo.history_ticks: must be at least 1".into());
        }
        for (name, a) in [("fast", &self.fast), ("slow", &self.slow)] {
            if a.short_s == 0 || a.short_s > a.long_s {
                return Err(format!(
                    "slo.{name}: short_s must be at least 1 and at most long_s"
                ));
            }
            if !(a.burn.is_finite() && a.burn > 0.0) {
                return Err(format!("slo.{name}.burn: must be a positive number"));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, b) in self.budgets.iter().enumerate() {
            let at = format!("slo.budgets[{i}] ({})", b.stage);
            if !seen.insert(b.stage.as_str()) {
                return Err(format!("{at}: a second budget for the same stage"));
            }
            if b.p95_us.is_none() && b.p99_us.is_none() {
                return Err(format!("{at}: set p95_us, p99_us or both"));
            }
            for t in [b.p95_us, b.p99_us].into_iter().flatten() {
                if !(t.is_finite() && t > 0.0) {
                    return Err(format!("{at}: targets must be positive numbers of µs"));
                }
            }
            if b.window_s == 0 || b.window_s * 1000 < self.tick_ms {
                return Err(format!("{at}: window_s must be at least one tick"));
            }
            if b.window_s > self.fast.short_s.min(self.slow.short_s) {
                return Err(format!(
                    "{at}: window_s must not be longer than the alerts' short windows"
                ));
            }
            if !(b.error_budget > 0.0 && b.error_budget <= 1.0) {
                return Err(format!("{at}: error_budget must be in (0, 1]"));
            }
        }
        Ok(())
    }
}

/// Where one budget stands, as `/v1/slo`, `/metrics` and the feed show it.
#[derive(Debug, Clone)]
pub struct BudgetView {
    /// Recorder name.
    pub stage: String,
    /// The last window met every target.
    pub inside: bool,
    /// p95 of the last window (µs).
    pub window_p95_us: f64,
    /// p99 of the last window (µs).
    pub window_p99_us: f64,
    /// Target p95 (µs).
    pub target_p95_us: Option<f64>,
    /// Target p99 (µs).
    pub target_p99_us: Option<f64>,
    /// Fraction of windows allowed bad.
    pub error_budget: f64,
    /// Share of the error budget used since start (1.0 = exhausted).
    pub budget_burnt: f64,
    /// Burn rate over the fast alert's long and short windows.
    pub burn_fast: (f64, f64),
    /// Burn rate over the slow alert's long and short windows.
    pub burn_slow: (f64, f64),
    /// The fast alert fires.
    pub fast_firing: bool,
    /// The slow alert fires.
    pub slow_firing: bool,
    /// Windows judged, and how many were bad.
    pub windows: (u64, u64),
}

impl BudgetView {
    fn alert(&self) -> &'static str {
        if self.fast_firing {
            "fast"
        } else if self.slow_firing {
            "slow"
        } else {
            "none"
        }
    }

    fn json(&self) -> Value {
        json!({
            "stage": self.stage,
            "inside": self.inside,
            "window_p95_us": round1(self.window_p95_us),
            "window_p99_us": round1(self.window_p99_us),
            "target_p95_us": self.target_p95_us,
            "target_p99_us": self.target_p99_us,
            "error_budget": self.error_budget,
            "budget_burnt": finite(self.budget_burnt),
            "burn_fast": finite(self.burn_fast.0),
            "burn_fast_short": finite(self.burn_fast.1),
            "burn_slow": finite(self.burn_slow.0),
            "burn_slow_short": finite(self.burn_slow.1),
            "alert": self.alert(),
            "windows": self.windows.0,
            "bad_windows": self.windows.1,
        })
    }
}

/// What the monitor shares with the HTTP side: the feed, its history, the SLO state.
#[derive(Debug)]
pub struct MonitorShared {
    /// Feed interval (ms).
    pub tick_ms: u64,
    feed: tokio::sync::broadcast::Sender<Arc<str>>,
    history: Mutex<VecDeque<Arc<str>>>,
    history_cap: usize,
    events: Mutex<VecDeque<Arc<str>>>,
    budgets: Mutex<Vec<BudgetView>>,
    /// Alerts raised (firing transitions).
    pub alerts_total: AtomicU64,
    /// Automatic actions taken (`done`), per [`SloAction`] in declaration order.
    pub actions_total: [AtomicU64; 2],
    /// Feed clients connected now.
    pub feed_clients: AtomicU64,
}

/// Events kept for `/v1/slo` and new feed clients.
const EVENTS_KEPT: usize = 100;
/// Ticks a slow feed client may fall behind before it misses some.
const FEED_QUEUE: usize = 64;
/// Most feed clients at once.
pub const MAX_FEED_CLIENTS: u64 = 32;

impl MonitorShared {
    /// Empty, for a monitor with `cfg`.
    pub fn new(cfg: &SloConfig) -> Arc<Self> {
        let (feed, _) = tokio::sync::broadcast::channel(FEED_QUEUE);
        Arc::new(Self {
            tick_ms: cfg.tick_ms,
            feed,
            history: Mutex::new(VecDeque::with_capacity(cfg.history_ticks)),
            history_cap: cfg.history_ticks,
            events: Mutex::new(VecDeque::with_capacity(EVENTS_KEPT)),
            budgets: Mutex::new(Vec::new()),
            alerts_total: AtomicU64::new(0),
            actions_total: [AtomicU64::new(0), AtomicU64::new(0)],
            feed_clients: AtomicU64::new(0),
        })
    }

    /// A new feed client: the `hello` frame (history and recent events) and the live
    /// receiver, subscribed before the hello is taken so no tick falls between them.
    pub fn subscribe(&self) -> (String, tokio::sync::broadcast::Receiver<Arc<str>>) {
        let rx = self.feed.subscribe();
        let history = lock(&self.history);
        let events = lock(&self.events);
        let mut hello = format!(
            "{{\"type\":\"hello\",\"interval_ms\":{},\"history\":[",
            self.tick_ms
        );
        join_into(&mut hello, history.iter());
        hello.push_str("],\"events\":[");
        join_into(&mut hello, events.iter());
        hello.push_str("]}");
        (hello, rx)
    }

    /// `/v1/slo`: every budget's state and the recent alert and action events.
    pub fn slo_json(&self) -> Value {
        let budgets: Vec<Value> = lock(&self.budgets).iter().map(BudgetView::json).collect();
        let events: Vec<Value> = lock(&self.events)
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect();
        json!({"budgets": budgets, "events": events})
    }

    /// SLO gauges and counters for `/metrics`.
    pub fn prometheus(&self) -> String {
        let mut s = String::new();
        let budgets = lock(&self.budgets);
        s.push_str("# HELP engine_slo_inside Whether the stage's last window met its latency targets.\n# TYPE engine_slo_inside gauge\n");
        for b in budgets.iter() {
            let _ = writeln!(
                s,
                "engine_slo_inside{{stage=\"{}\"}} {}",
                b.stage,
                u8::from(b.inside)
            );
        }
        s.push_str("# HELP engine_slo_error_budget_burnt Share of the stage's error budget used since start (1 = exhausted).\n# TYPE engine_slo_error_budget_burnt gauge\n");
        for b in budgets.iter() {
            let _ = writeln!(
                s,
                "engine_slo_error_budget_burnt{{stage=\"{}\"}} {:.6}",
                b.stage,
                finite(b.budget_burnt)
            );
        }
        s.push_str("# HELP engine_slo_burn_rate Error-budget burn rate over each alert window.\n# TYPE engine_slo_burn_rate gauge\n");
        for b in budgets.iter() {
            for (w, v) in [
                ("fast_long", b.burn_fast.0),
                ("fast_short", b.burn_fast.1),
                ("slow_long", b.burn_slow.0),
                ("slow_short", b.burn_slow.1),
            ] {
                let _ = writeln!(
                    s,
                    "engine_slo_burn_rate{{stage=\"{}\",window=\"{w}\"}} {:.6}",
                    b.stage,
                    finite(v)
                );
            }
        }
        s.push_str("# HELP engine_slo_alert_firing Burn-rate alerts firing now.\n# TYPE engine_slo_alert_firing gauge\n");
        for b in budgets.iter() {
            for (sev, on) in [("fast", b.fast_firing), ("slow", b.slow_firing)] {
                let _ = writeln!(
                    s,
                    "engine_slo_alert_firing{{stage=\"{}\",severity=\"{sev}\"}} {}",
                    b.stage,
                    u8::from(on)
                );
            }
        }
        drop(budgets);
        let _ = writeln!(
            s,
            "# HELP engine_slo_alerts_total Burn-rate alerts raised.\n# TYPE engine_slo_alerts_total counter\nengine_slo_alerts_total {}",
            self.alerts_total.load(Ordering::Relaxed)
        );
        s.push_str("# HELP engine_slo_actions_total Automatic actions taken on fast-burn alerts.\n# TYPE engine_slo_actions_total counter\n");
        for (i, a) in [SloAction::DemoteProvider, SloAction::FailOverSigner]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                s,
                "engine_slo_actions_total{{action=\"{}\"}} {}",
                a.as_str(),
                self.actions_total[i].load(Ordering::Relaxed)
            );
        }
        s
    }

    fn publish_tick(&self, tick: String) {
        let tick: Arc<str> = Arc::from(tick);
        {
            let mut h = lock(&self.history);
            if h.len() == self.history_cap {
                h.pop_front();
            }
            h.push_back(Arc::clone(&tick));
        }
        // No client connected is not an error.
        let _ = self.feed.send(tick);
    }

    fn publish_event(&self, event: Value) {
        let event: Arc<str> = Arc::from(event.to_string());
        {
            let mut e = lock(&self.events);
            if e.len() == EVENTS_KEPT {
                e.pop_front();
            }
            e.push_back(Arc::clone(&event));
        }
        let _ = self.feed.send(event);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn join_into<'a>(out: &mut String, items: impl Iterator<Item = &'a Arc<str>>) {
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// JSON has no infinity: an error budget of zero burnt is reported as a large number.
fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { f64::MAX }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Windows of `window_s` in `span_s` (at least 1).
fn windows_in(span_s: u64, window_s: u64) -> usize {
    usize::try_from(span_s.div_ceil(window_s.max(1)))
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Per-budget alert and action state.
#[derive(Debug)]
struct Alerting {
    cfg: StageBudget,
    fast_firing: bool,
    slow_firing: bool,
    last_action: Option<Instant>,
}

/// The monitor thread's state.
struct Monitor {
    cfg: SloConfig,
    ctx: Arc<ServerCtx>,
    shared: Arc<MonitorShared>,
    tracker: SloTracker,
    alerting: Vec<Alerting>,
    previous: HashMap<String, Histogram<u64>>,
    prev_counters: Option<(Instant, u64, u64, [u64; State::COUNT])>,
    tick: u64,
    retry_after: Duration,
}

/// Checks the budgets' stage names against the recorders and starts the `slo-monitor`
/// thread; it stops when `stop` is set.
pub fn spawn(
    cfg: SloConfig,
    ctx: Arc<ServerCtx>,
    shared: Arc<MonitorShared>,
    failover_retry: Duration,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, crate::error::EngineError> {
    let names = ctx.latency.names();
    let mut tracker = SloTracker::new();
    for b in &cfg.budgets {
        if !names.iter().any(|n| n == &b.stage) {
            return Err(crate::error::EngineError::Config {
                what: format!(
                    "slo.budgets: no stage recorder named `{}` (there are: {})",
                    b.stage,
                    names.join(", ")
                ),
            });
        }
        let history = windows_in(cfg.fast.long_s.max(cfg.slow.long_s), b.window_s);
        tracker.set_budget(
            &b.stage,
            SloBudget {
                p50_ns: None,
                p95_ns: b.p95_us.map(|t| (t * 1e3) as u64),
                p99_ns: b.p99_us.map(|t| (t * 1e3) as u64),
                p999_ns: None,
                window: Duration::from_secs(b.window_s),
                error_budget: b.error_budget,
                history,
            },
        );
    }
    let alerting = cfg
        .budgets
        .iter()
        .map(|b| Alerting {
            cfg: b.clone(),
            fast_firing: false,
            slow_firing: false,
            last_action: None,
        })
        .collect();
    let mut m = Monitor {
        cfg,
        ctx,
        shared,
        tracker,
        alerting,
        previous: HashMap::new(),
        prev_counters: None,
        tick: 0,
        retry_after: failover_retry,
    };
    Ok(std::thread::Builder::new()
        .name("slo-monitor".into())
        .spawn(move || {
            let period = Duration::from_millis(m.cfg.tick_ms);
            let mut next = Instant::now() + period;
            while !stop.load(Ordering::Acquire) {
                let now = Instant::now();
                if now < next {
                    std::thread::park_timeout((next - now).min(Duration::from_millis(50)));
                    continue;
                }
                next += period;
                if next < now {
                    next = now + period;
                }
                m.step(now);
            }
        })?)
}

impl Monitor {
    fn step(&mut self, now: Instant) {
        self.tick += 1;
        let intervals = self.intervals();
        let states = self.tracker.observe(&intervals, now);
        let views = self.judge(&states);
        let tick = self.render_tick(&intervals, &views, now);
        *lock(&self.shared.budgets) = views;
        self.shared.publish_tick(tick);
    }

    /// What every recorder recorded since the previous tick (cumulative minus cumulative).
    fn intervals(&mut self) -> Vec<HistogramSnapshot> {
        self.ctx
            .latency
            .snapshot()
            .into_iter()
            .map(|s| {
                let mut interval = s.cumulative.clone();
                if let Some(prev) = self.previous.get(&s.name) {
                    // Counts only grow, so the previous cumulative is contained in this one.
                    let _ = interval.subtract(prev);
                }
                self.previous.insert(s.name.clone(), s.cumulative.clone());
                HistogramSnapshot {
                    name: s.name,
                    interval,
                    cumulative: s.cumulative,
                }
            })
            .collect()
    }

    fn judge(&mut self, states: &[pipeline::SloState]) -> Vec<BudgetView> {
        let cfg = &self.cfg;
        let mut views = Vec::with_capacity(self.alerting.len());
        let mut actions = Vec::new();
        let mut events = Vec::new();
        for a in &mut self.alerting {
            let Some(st) = states.iter().find(|s| s.name == a.cfg.stage) else {
                continue;
            };
            let w = a.cfg.window_s;
            let burn = |span: u64| {
                self.tracker
                    .burn_over(&a.cfg.stage, windows_in(span, w))
                    .unwrap_or(0.0)
            };
            let fast = (burn(cfg.fast.long_s), burn(cfg.fast.short_s));
            let slow = (burn(cfg.slow.long_s), burn(cfg.slow.short_s));
            let fast_on = fast.0 >= cfg.fast.burn && fast.1 >= cfg.fast.burn;
            let slow_on = slow.0 >= cfg.slow.burn && slow.1 >= cfg.slow.burn;
            let view = BudgetView {
                stage: a.cfg.stage.clone(),
                inside: st.inside,
                window_p95_us: us(st.window_p95_ns),
                window_p99_us: us(st.window_p99_ns),
                target_p95_us: a.cfg.p95_us,
                target_p99_us: a.cfg.p99_us,
                error_budget: a.cfg.error_budget,
                budget_burnt: st.error_budget_burnt,
                burn_fast: fast,
                burn_slow: slow,
                fast_firing: fast_on,
                slow_firing: slow_on,
                windows: (st.windows, st.bad_windows),
            };
            for (sev, was, on, burns, alert) in [
                ("fast", a.fast_firing, fast_on, fast, cfg.fast),
                ("slow", a.slow_firing, slow_on, slow, cfg.slow),
            ] {
                if was != on {
                    if on {
                        self.shared.alerts_total.fetch_add(1, Ordering::Relaxed);
                    }
                    events.push(alert_event(&view, sev, on, burns, alert));
                }
            }
            a.fast_firing = fast_on;
            a.slow_firing = slow_on;
            if let Some(action) = a.cfg.action
                && fast_on
                && a.last_action
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(cfg.action_cooldown_s))
            {
                a.last_action = Some(Instant::now());
                actions.push((action, view.clone()));
            }
            views.push(view);
        }
        for e in events {
            self.shared.publish_event(e);
        }
        for (action, view) in actions {
            let e = self.act(action, &view);
            self.shared.publish_event(e);
        }
        views
    }

    /// Takes `action` for `view`'s fast-burn alert where an alternative exists.
    fn act(&self, action: SloAction, view: &BudgetView) -> Value {
        let why = format!(
            "{} burns its error budget {:.1}x over {} s and {:.1}x over {} s (page at {}x): last window p99 {:.1} µs{}, p95 {:.1} µs{}",
            view.stage,
            finite(view.burn_fast.0),
            self.cfg.fast.long_s,
            finite(view.burn_fast.1),
            self.cfg.fast.short_s,
            self.cfg.fast.burn,
            view.window_p99_us,
            view.target_p99_us
                .map(|t| format!(" (target {t} µs)"))
                .unwrap_or_default(),
            view.window_p95_us,
            view.target_p95_us
                .map(|t| format!(" (target {t} µs)"))
                .unwrap_or_default(),
        );
        let (target, done, reason) = match action {
            SloAction::DemoteProvider => self.demote_slowest(&why),
            SloAction::FailOverSigner => self.fail_over_signers(&why),
        };
        if done {
            self.shared.actions_total[action as usize].fetch_add(1, Ordering::Relaxed);
            tracing::warn!(stage = %view.stage, action = action.as_str(), %target, %reason, "SLO automatic action");
        } else {
            tracing::warn!(stage = %view.stage, action = action.as_str(), %reason, "SLO automatic action not taken");
        }
        json!({
            "type": "slo_action",
            "t_ms": unix_ms(),
            "stage": view.stage,
            "action": action.as_str(),
            "target": target,
            "done": done,
            "reason": reason,
        })
    }

    fn demote_slowest(&self, why: &str) -> (String, bool, String) {
        let Some(b) = self.ctx.health.broadcast.as_deref() else {
            return (
                String::new(),
                false,
                format!("{why}; no broadcast stage runs"),
            );
        };
        let live: Vec<_> = b
            .providers
            .iter()
            .filter(|p| p.up.load(Ordering::Relaxed) && !p.demoted.load(Ordering::Relaxed))
            .collect();
        if live.len() < 2 {
            return (
                String::new(),
                false,
                format!(
                    "{why}; no provider demoted: {} connected and not demoted, so none could take the traffic",
                    live.len()
                ),
            );
        }
        let Some(worst) = live.iter().max_by_key(|p| p.rtt_ns.load(Ordering::Relaxed)) else {
            return (String::new(), false, why.to_owned());
        };
        worst.demote_requested.store(true, Ordering::Relaxed);
        (
            worst.name.clone(),
            true,
            format!(
                "{why}; {} has the slowest smoothed round trip ({:.1} µs) of {} connected providers and is demoted",
                worst.name,
                us(worst.rtt_ns.load(Ordering::Relaxed)),
                live.len()
            ),
        )
    }

    fn fail_over_signers(&self, why: &str) -> (String, bool, String) {
        let mut moved = Vec::new();
        let mut with_standby = 0usize;
        for row in &self.ctx.custody.accounts {
            if row.standby.is_some() {
                with_standby += 1;
                if row.signer.fail_over() {
                    moved.push(format!(
                        "{} ({} to {})",
                        row.name,
                        row.backend.as_str(),
                        row.standby.map(|b| b.as_str()).unwrap_or_default()
                    ));
                }
            }
        }
        if moved.is_empty() {
            let reason = if with_standby == 0 {
                format!("{why}; no account has a standby backend")
            } else {
                format!("{why}; every account with a standby signs on it already")
            };
            return (String::new(), false, reason);
        }
        (
            moved.join(", "),
            true,
            format!(
                "{why}; signing moved to the standby for {} ms: {}",
                self.retry_after.as_millis(),
                moved.join(", ")
            ),
        )
    }

    fn render_tick(
        &mut self,
        intervals: &[HistogramSnapshot],
        views: &[BudgetView],
        now: Instant,
    ) -> String {
        let stages: Vec<Value> = intervals
            .iter()
            .map(|s| {
                let p = Percentiles::of(&s.interval);
                json!({
                    "name": s.name,
                    "count": p.count,
                    "p50_us": round1(us(p.p50_ns)),
                    "p99_us": round1(us(p.p99_ns)),
                    "p999_us": round1(us(p.p999_ns)),
                    "max_us": round1(us(p.max_ns)),
                })
            })
            .collect();
        let queues: Vec<Value> = crate::server::queue_depths(&self.ctx)
            .into_iter()
            .map(|(name, depth, capacity)| json!({"name": name, "depth": depth, "capacity": capacity}))
            .collect();
        let c = &self.ctx.counters;
        let received = c.received.load(Ordering::Relaxed);
        let acks = c.acks.load(Ordering::Relaxed);
        let events: [u64; State::COUNT] =
            std::array::from_fn(|i| c.events[i].load(Ordering::Relaxed));
        let mut per_s = serde_json::Map::new();
        let mut received_per_s = 0.0;
        if let Some((t, r0, a0, e0)) = self.prev_counters {
            let dt = now.duration_since(t).as_secs_f64().max(1e-3);
            received_per_s = received.saturating_sub(r0) as f64 / dt;
            per_s.insert(
                "ack".into(),
                json!(round1(acks.saturating_sub(a0) as f64 / dt)),
            );
            for st in State::ALL {
                let i = st as usize;
                per_s.insert(
                    st.as_str().into(),
                    json!(round1(events[i].saturating_sub(e0[i]) as f64 / dt)),
                );
            }
        }
        self.prev_counters = Some((now, received, acks, events));
        let providers: Vec<Value> = self
            .ctx
            .health
            .broadcast
            .as_deref()
            .map(|b| {
                let row = |p: &crate::stages::broadcast::ProviderStats, relay: bool| {
                    json!({
                        "name": p.name,
                        "relay": relay,
                        "connected": p.up.load(Ordering::Relaxed),
                        "demoted": p.demoted.load(Ordering::Relaxed),
                        "rtt_us": round1(us(p.rtt_ns.load(Ordering::Relaxed))),
                    })
                };
                b.providers
                    .iter()
                    .map(|p| row(p, false))
                    .chain(b.relays.iter().map(|p| row(p, true)))
                    .collect()
            })
            .unwrap_or_default();
        json!({
            "type": "tick",
            "tick": self.tick,
            "t_ms": unix_ms(),
            "interval_ms": self.cfg.tick_ms,
            "stages": stages,
            "queues": queues,
            "throughput": {"received_per_s": round1(received_per_s), "events_per_s": per_s},
            "slo": views.iter().map(BudgetView::json).collect::<Vec<_>>(),
            "providers": providers,
        })
        .to_string()
    }
}

fn alert_event(view: &BudgetView, sev: &str, on: bool, burns: (f64, f64), a: BurnAlert) -> Value {
    let message = format!(
        "{} {} burn {}: {:.1}x over {} s and {:.1}x over {} s against {}x (error budget {} of windows; last window p99 {:.1} µs)",
        view.stage,
        sev,
        if on { "firing" } else { "resolved" },
        finite(burns.0),
        a.long_s,
        finite(burns.1),
        a.short_s,
        a.burn,
        view.error_budget,
        view.window_p99_us,
    );
    if on {
        tracing::warn!(stage = %view.stage, severity = sev, burn_long = burns.0, burn_short = burns.1, "{message}");
    } else {
        tracing::info!(stage = %view.stage, severity = sev, burn_long = burns.0, burn_short = burns.1, "{message}");
    }
    json!({
        "type": "slo_alert",
        "t_ms": unix_ms(),
        "stage": view.stage,
        "severity": sev,
        "state": if on { "firing" } else { "resolved" },
        "burn_long": round1(finite(burns.0)),
        "burn_short": round1(finite(burns.1)),
        "message": message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_checked_by_name_of_the_setting() {
        let ok: SloConfig = toml::from_str(
            r#"
            tick_ms = 250
            fast = { long_s = 8, short_s = 2, burn = 2.0 }
            slow = { long_s = 30, short_s = 4, burn = 1.5 }
            [[budgets]]
            stage = "e2e.ws_to_wire"
            p99_us = 1000
            window_s = 1
            error_budget = 0.1
            action = "demote_provider"
            "#,
        )
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.budgets[0].action, Some(SloAction::DemoteProvider));
        let bad = |edit: &dyn Fn(&mut SloConfig), want: &str| {
            let mut c = ok.clone();
            edit(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.contains(want), "{e} should name {want}");
        };
        bad(&|c| c.tick_ms = 10, "slo.tick_ms");
        bad(&|c| c.fast.short_s = 9, "slo.fast");
        bad(&|c| c.slow.burn = f64::NAN, "slo.slow.burn");
        bad(&|c| c.budgets[0].p99_us = None, "set p95_us, p99_us");
        bad(&|c| c.budgets[0].error_budget = 0.0, "error_budget");
        bad(&|c| c.budgets[0].window_s = 3, "short windows");
        bad(&|c| c.budgets.push(c.budgets[0].clone()), "same stage");
        assert!(
            toml::from_str::<SloConfig>(
                "[[budgets]]\nstage = \"x\"\np99_us = 1\naction = \"reboot\""
            )
            .is_err()
        );
    }

    #[test]
    fn hello_carries_history_and_events_then_ticks_follow() {
        let cfg = SloConfig {
            history_ticks: 2,
            ..SloConfig::default()
        };
        let shared = MonitorShared::new(&cfg);
        for i in 0..3 {
            shared.publish_tick(format!("{{\"type\":\"tick\",\"tick\":{i}}}"));
        }
        shared.publish_event(json!({"type": "slo_alert", "stage": "s"}));
        let (hello, mut rx) = shared.subscribe();
        let v: Value = serde_json::from_str(&hello).unwrap();
        assert_eq!(v["type"], "hello");
        let ticks: Vec<u64> = v["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tick"].as_u64().unwrap())
            .collect();
        assert_eq!(ticks, [1, 2], "only the last history_ticks are kept");
        assert_eq!(v["events"][0]["type"], "slo_alert");
        shared.publish_tick("{\"type\":\"tick\",\"tick\":3}".into());
        assert_eq!(&*rx.try_recv().unwrap(), "{\"type\":\"tick\",\"tick\":3}");
    }

    #[test]
    fn windows_in_rounds_up() {
        assert_eq!(windows_in(3600, 10), 360);
        assert_eq!(windows_in(5, 2), 3);
        assert_eq!(windows_in(0, 10), 1);
    }
}
