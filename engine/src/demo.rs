//! The built-in desk of `engine demo`: drives a few hundred mixed intents through the
//! real WebSocket protocol, waits for their outcomes, and reports latency per stage (from
//! the engine's histograms) and per state (as the desk saw it).
//!
//! Sending is paced at a fixed rate. Latency is measured from the moment each frame was
//! handed to the socket; how far each send lagged behind its scheduled time is reported as
//! its own row (`desk send lag`), so a stall that holds the desk back (coordinated
//! omission) stays visible instead of being hidden by the desk sending less. (tokio's
//! timer has millisecond granularity, so measuring from the scheduled time would charge up
//! to a millisecond of the desk's own timer to the engine.)
//!
//! The report opens with the broadcast path: the broadcast stage's own service time (ring
//! in, or the signing stage's hand-over in the fused chain, to the return after the socket
//! write), `e2e.ws_to_wire` and `e2e.ws_to_node`, checked against their targets, with the
//! providers, the hedge delay and each provider's counters (from `/metrics`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use alloy_primitives::{Address, U256};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use venues::DEV_ADDRESSES;

use crate::config::Config;
use crate::desk::{Desk, DeskError};
use crate::engine::Engine;
use pipeline::report;

/// What the demo does.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Intents in all.
    pub intents: usize,
    /// Desk connections sending in parallel.
    pub desks: usize,
    /// Total send rate, intents per second.
    pub rate_per_sec: u32,
    /// How long to wait for every intent to reach a final state.
    pub settle_timeout: Duration,
    /// Where to write the report folder (`None`: print only).
    pub report_root: Option<PathBuf>,
    /// How broadcast is set up, for the report (`None`: not described).
    pub broadcast: Option<BroadcastSetup>,
}

/// The broadcast side of the engine's configuration, as the report describes it.
#[derive(Clone, Debug, Default)]
pub struct BroadcastSetup {
    /// Provider names, in configuration order.
    pub providers: Vec<String>,
    /// Distinct node URLs behind the providers.
    pub endpoints: usize,
    /// Hedge delay (µs).
    pub hedge_delay_us: u64,
    /// The journal's sync policy (`None`: no journal).
    pub journal: Option<crate::config::JournalSync>,
}

impl BroadcastSetup {
    /// What `cfg` configures.
    pub fn of(cfg: &Config) -> Self {
        let list = cfg.provider_list();
        let mut urls: Vec<&str> = list.iter().map(|(_, u)| u.as_str()).collect();
        urls.sort_unstable();
        urls.dedup();
        Self {
            providers: list.iter().map(|(n, _)| n.clone()).collect(),
            endpoints: urls.len(),
            hedge_delay_us: cfg.broadcast.hedge_delay_us,
            journal: cfg.journal.as_ref().map(|j| j.sync),
        }
    }

    /// One line: whether intents are journaled, and how durably.
    pub fn describe_journal(&self) -> String {
        match self.journal {
            None => "no journal".into(),
            Some(s) => format!("journal on, sync `{}`", s.as_str()),
        }
    }

    /// One line: how many providers, their names, the node URLs behind them, the hedge delay.
    pub fn describe(&self) -> String {
        let n = self.providers.len();
        let hedging = if n > 1 {
            format!("hedging on, hedge delay {} µs", self.hedge_delay_us)
        } else {
            format!(
                "no hedging (one provider; hedge delay {} µs unused)",
                self.hedge_delay_us
            )
        };
        let plural = |k: usize| if k == 1 { "" } else { "s" };
        format!(
            "{n} provider{} ({}) over {n} WebSocket connection{} to {} node endpoint{}, {hedging}",
            plural(n),
            self.providers.join(", "),
            plural(n),
            self.endpoints,
            plural(self.endpoints),
        )
    }
}

/// Target of the broadcast stage's own service time, p99 (ns).
pub const BROADCAST_SERVICE_P99_TARGET_NS: u64 = 20_000;
/// Target of desk frame read → node acceptance, p99, with two providers and hedging on (ns).
pub const WS_TO_NODE_P99_TARGET_NS: u64 = 1_000_000;

/// The rows of the broadcast-path table, in order.
const BROADCAST_PATH: [&str; 5] = [
    "broadcast.service",
    "broadcast.socket_write",
    "e2e.ws_to_wire",
    "e2e.ws_to_node",
    "broadcast.node_rtt",
];

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            intents: 400,
            desks: 4,
            rate_per_sec: 200,
            settle_timeout: Duration::from_secs(60),
            report_root: Some(PathBuf::from("latency-reports")),
            broadcast: None,
        }
    }
}

/// What the demo saw.
#[derive(Debug, Default)]
pub struct DemoOutcome {
    /// Intents sent.
    pub sent: usize,
    /// Reached `confirmed`.
    pub confirmed: usize,
    /// Reached `rejected`.
    pub rejected: usize,
    /// Reached `failed` or got an `error`.
    pub failed: usize,
    /// Never reached a final state within the timeout.
    pub unsettled: usize,
    /// The printed report.
    pub text: String,
    /// The report folder, if written.
    pub dir: Option<PathBuf>,
}

const STATES: [&str; 6] = [
    "ack",
    "accepted",
    "signed",
    "broadcast",
    "included",
    "confirmed",
];

fn hist() -> Histogram<u64> {
    report::ns_histogram()
}

/// The `i`-th intent of the mix: mostly transfers and calls that policy allows, and about
/// one in seven that it must reject (destination not allowlisted, value over the cap,
/// unknown account).
pub fn intent(i: usize, prefix: &str) -> (Value, &'static str) {
    let account = format!("dev{}", i % 5);
    let to = DEV_ADDRESSES[5 + (i / 5) % 5];
    let id = format!("{prefix}-{i:06}");
    let milli_eth = U256::from(1_000_000_000_000_000u64);
    match i % 14 {
        5 => (
            json!({"id": id, "account": account, "kind": "transfer",
                   "to": Address::repeat_byte(0xde), "value_wei": "1"}),
            "rejected",
        ),
        9 => (
            json!({"id": id, "account": account, "kind": "transfer", "to": to,
                   "value_wei": (crate::dev::dev_cap() + U256::from(1u8)).to_string()}),
            "rejected",
        ),
        12 => (
            json!({"id": id, "account": "nobody", "kind": "transfer", "to": to, "value_wei": "1"}),
            "rejected",
        ),
        3 | 10 => (
            json!({"id": id, "account": account, "kind": "call", "to": to,
                   "data": "0xa9059cbb00000000000000000000000000000000000000000000000000000000000000010000000000000000000000000000000000000000000000000000000000000002",
                   "gas_limit": 60000, "value_wei": "0", "route": "public"}),
            "confirmed",
        ),
        _ => (
            json!({"id": id, "account": account, "kind": "transfer", "to": to,
                   "value_wei": (milli_eth * U256::from(1 + i % 7)).to_string()}),
            "confirmed",
        ),
    }
}

#[derive(Default)]
struct Track {
    intended: Option<Instant>,
    sent: Option<Instant>,
    expect: &'static str,
    done: Option<String>,
}

/// Runs the demo against a running engine.
pub fn run(engine: &Engine, token: &str, opts: &DemoOptions) -> Result<DemoOutcome, DeskError> {
    let url = format!("ws://{}/v1/ws", engine.local_addr());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| DeskError::Ws(e.into()))?;
    let per_desk: Vec<Vec<usize>> = (0..opts.desks.max(1))
        .map(|d| {
            (0..opts.intents)
                .filter(|i| i % opts.desks.max(1) == d)
                .collect()
        })
        .collect();
    let period = Duration::from_secs_f64(1.0 / f64::from(opts.rate_per_sec.max(1)));
    let timeout = opts.settle_timeout;
    let prefix = format!("demo{}", std::process::id());
    // What the engine costs while no desk sends anything (all its threads, this process).
    let idle = Some(report::cpu_share_over(Duration::from_secs(3)));
    let started = Instant::now();
    let results = rt.block_on(async {
        let mut handles = Vec::new();
        for ids in per_desk {
            let url = url.clone();
            let token = token.to_owned();
            let prefix = prefix.clone();
            handles.push(tokio::spawn(async move {
                desk_run(&url, &token, &prefix, ids, period, started, timeout).await
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            match h.await {
                Ok(r) => all.push(r?),
                Err(e) => return Err(DeskError::Ws(std::io::Error::other(e.to_string()).into())),
            }
        }
        Ok::<_, DeskError>(all)
    })?;

    let mut desk_h: HashMap<&str, Histogram<u64>> = STATES.iter().map(|s| (*s, hist())).collect();
    let mut out = DemoOutcome::default();
    let mut mismatched = 0;
    let mut lag = hist();
    for (tracks, arrivals) in &results {
        for (id, t) in tracks {
            out.sent += 1;
            match t.done.as_deref() {
                Some("confirmed") => out.confirmed += 1,
                Some("rejected") => out.rejected += 1,
                Some(_) => out.failed += 1,
                None => out.unsettled += 1,
            }
            if t.done.as_deref().is_some_and(|d| d != t.expect) {
                mismatched += 1;
            }
            if let (Some(plan), Some(sent)) = (t.intended, t.sent) {
                let _ = lag.record(sent.saturating_duration_since(plan).as_nanos() as u64);
            }
            if let (Some(start), Some(arr)) = (t.sent, arrivals.get(id)) {
                for (state, at) in arr {
                    if let Some(h) = desk_h.get_mut(state.as_str()) {
                        let _ = h.record(at.saturating_duration_since(start).as_nanos() as u64);
                    }
                }
            }
        }
    }

    let mut text = String::new();
    let layout = engine.layout();
    let _ = writeln!(
        text,
        "demo: {} intents from {} desks at {}/s: {} confirmed, {} rejected (policy), {} failed, {} unsettled, {} not as expected",
        out.sent,
        opts.desks,
        opts.rate_per_sec,
        out.confirmed,
        out.rejected,
        out.failed,
        out.unsettled,
        mismatched
    );
    let _ = writeln!(
        text,
        "layout: {}, threads {:?}",
        layout.describe(),
        layout.threads
    );
    if let Some(b) = &opts.broadcast {
        let _ = writeln!(text, "broadcast: {}", b.describe());
        let _ = writeln!(text, "journal: {}", b.describe_journal());
    }
    let _ = writeln!(text);
    if let Some(share) = idle {
        let _ = writeln!(
            text,
            "idle engine: {:.2}% of one core over 3 s (all engine threads)\n",
            share * 100.0
        );
    }
    let snaps = engine.latency().snapshot();
    let counters = fetch_metrics(engine.local_addr()).map(|m| BroadcastCounters::parse(&m));
    broadcast_section(
        &mut text,
        &snaps,
        opts.broadcast.as_ref(),
        counters.as_ref(),
        layout.fused,
    );
    let _ = writeln!(
        text,
        "Engine, per stage and end to end (engine clock):\n{}",
        report::SUMMARY_HEADER
    );
    for s in &snaps {
        let _ = writeln!(text, "{}", report::summary_row(&s.name, &s.cumulative));
    }
    let _ = writeln!(
        text,
        "\nDesk view, from each frame's send to the event's arrival:\n{}",
        report::SUMMARY_HEADER
    );
    for s in STATES {
        let _ = writeln!(
            text,
            "{}",
            report::summary_row(&format!("desk → {s}"), &desk_h[s])
        );
    }

    let providers = opts.broadcast.as_ref().map_or(1, |b| b.providers.len());
    let mut kind = if providers > 1 {
        format!("demo-{providers}providers")
    } else {
        "demo".to_owned()
    };
    // A run whose acks wait for the disk says so in its folder name.
    match opts.broadcast.as_ref().map(|b| b.journal) {
        Some(Some(crate::config::JournalSync::Group)) => kind.push_str("-group-commit"),
        Some(None) => kind.push_str("-no-journal"),
        _ => {}
    }
    if layout.core_map.is_some() {
        kind.push_str("-hotcore");
    }
    if let Some(root) = &opts.report_root
        && let Ok(dir) = report::run_dir(root, &kind)
    {
        let mut machine = format!(
            "{}- layout: {}, threads {:?}\n- demo: {} intents, {} desks, {}/s\n",
            report::machine_description(),
            layout.describe(),
            layout.threads,
            opts.intents,
            opts.desks,
            opts.rate_per_sec
        );
        if let Some(b) = &opts.broadcast {
            let _ = writeln!(machine, "- broadcast: {}", b.describe());
            let _ = writeln!(machine, "- journal: {}", b.describe_journal());
        }
        let args: Vec<String> = std::env::args().collect();
        let _ = writeln!(machine, "- command: `{}`", args.join(" "));
        let _ = std::fs::write(dir.join("machine.md"), machine);
        let _ = std::fs::write(dir.join("summary.md"), &text);
        for s in &snaps {
            let _ = std::fs::write(
                dir.join(format!("{}.hgrm", s.name)),
                report::hgrm(&s.cumulative),
            );
        }
        for s in STATES {
            let _ = std::fs::write(dir.join(format!("desk.{s}.hgrm")), report::hgrm(&desk_h[s]));
        }
        let _ = writeln!(text, "\nreport written to {}", dir.display());
        out.dir = Some(dir);
    }
    out.failed += mismatched;
    out.text = text;
    Ok(out)
}

/// The broadcast-path table (broadcast service time, WS in → wire, WS in → node, node
/// round trip), the targets, and the providers' counters.
fn broadcast_section(
    text: &mut String,
    snaps: &[pipeline::HistogramSnapshot],
    setup: Option<&BroadcastSetup>,
    counters: Option<&BroadcastCounters>,
    fused: bool,
) {
    let _ = writeln!(
        text,
        "Broadcast path (engine clock):\n{}",
        report::SUMMARY_HEADER
    );
    let find = |name: &str| snaps.iter().find(|s| s.name == name).map(|s| &s.cumulative);
    for name in BROADCAST_PATH {
        match find(name) {
            Some(h) => {
                let _ = writeln!(text, "{}", report::summary_row(name, h));
            }
            None => {
                let _ = writeln!(text, "| {name} | not recorded | | | | | |");
            }
        }
    }
    let _ = writeln!(
        text,
        "\n`broadcast.service`: the broadcast stage's own time per transaction, from taking it \
         ({}) to returning after the write to the first provider's socket; hedged sends \
         happen later, on the stage's timer, and are not in it. `broadcast.socket_write`: the \
         kernel's part of it, the socket write call alone (the request already encoded and \
         framed).",
        if fused {
            "fused layout: the signing stage's hand-over stamp; the chain records each inner \
             stage's service time separately, so this is broadcast's alone"
        } else {
            "off its input ring"
        }
    );
    let providers = setup.map_or(1, |b| b.providers.len());
    let check = |name: &str, target_ns: u64, note: &str| -> String {
        match find(name) {
            Some(h) if !h.is_empty() => {
                let p99 = h.value_at_quantile(0.99);
                format!(
                    "- {name} p99 {:.1} µs, target under {:.0} µs{note}: {}",
                    p99 as f64 / 1e3,
                    target_ns as f64 / 1e3,
                    if p99 < target_ns { "met" } else { "missed" }
                )
            }
            _ => format!("- {name}: nothing recorded, target not checked"),
        }
    };
    let ws_note = if providers >= 2 {
        format!(" ({providers} providers, hedging on)")
    } else {
        " (stated for two providers with hedging; this run has one)".to_owned()
    };
    let _ = writeln!(
        text,
        "\nTargets:\n{}\n{}",
        check("broadcast.service", BROADCAST_SERVICE_P99_TARGET_NS, ""),
        check("e2e.ws_to_node", WS_TO_NODE_P99_TARGET_NS, &ws_note)
    );
    match counters {
        Some(c) => {
            let _ = writeln!(
                text,
                "\nProviders (from /metrics at the end of the run): hedged sends {}, resends after a lost provider {}\n\
                 | provider | sent | first accepts | errors | demotions | disconnects | smoothed rtt µs |\n\
                 |---|---:|---:|---:|---:|---:|---:|",
                c.hedges.map_or("?".to_owned(), |v| v.to_string()),
                c.resends.map_or("?".to_owned(), |v| v.to_string()),
            );
            for (name, m) in &c.providers {
                let v = |k: &str| m.get(k).map_or("?".to_owned(), |x| format!("{x:.0}"));
                let rtt = m
                    .get("engine_provider_rtt_seconds")
                    .map_or("?".to_owned(), |x| format!("{:.1}", x * 1e6));
                let _ = writeln!(
                    text,
                    "| {name} | {} | {} | {} | {} | {} | {rtt} |",
                    v("engine_provider_sent_total"),
                    v("engine_provider_first_accepts_total"),
                    v("engine_provider_errors_total"),
                    v("engine_provider_demotions_total"),
                    v("engine_provider_disconnects_total"),
                );
            }
        }
        None => {
            let _ = writeln!(text, "\nProviders: /metrics could not be read");
        }
    }
    let _ = writeln!(text);
}

/// Broadcast counters out of the engine's Prometheus text.
#[derive(Debug, Default)]
struct BroadcastCounters {
    hedges: Option<u64>,
    resends: Option<u64>,
    /// Per provider, in the order `/metrics` lists them: metric name → value.
    providers: Vec<(String, HashMap<String, f64>)>,
}

impl BroadcastCounters {
    fn parse(body: &str) -> Self {
        let mut c = Self::default();
        for line in body.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            match key {
                "engine_broadcast_hedges_total" => c.hedges = Some(value as u64),
                "engine_broadcast_resends_total" => c.resends = Some(value as u64),
                _ => {
                    let Some((metric, rest)) = key.split_once("{provider=\"") else {
                        continue;
                    };
                    let Some(name) = rest.strip_suffix("\"}") else {
                        continue;
                    };
                    let i = match c.providers.iter().position(|(n, _)| n == name) {
                        Some(i) => i,
                        None => {
                            c.providers.push((name.to_owned(), HashMap::new()));
                            c.providers.len() - 1
                        }
                    };
                    c.providers[i].1.insert(metric.to_owned(), value);
                }
            }
        }
        c
    }
}

/// `GET /metrics` on the engine's own listener (plain HTTP/1.1, after the run).
fn fetch_metrics(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut buf = Vec::new();
    // The server closes after answering; a read timeout keeps what arrived.
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

type Arrivals = HashMap<String, Vec<(String, Instant)>>;

async fn desk_run(
    url: &str,
    token: &str,
    prefix: &str,
    ids: Vec<usize>,
    period: Duration,
    started: Instant,
    timeout: Duration,
) -> Result<(HashMap<String, Track>, Arrivals), DeskError> {
    let desk = Desk::connect(url, Some(token)).await?;
    let (mut tx, mut rx) = desk.split();
    let mut tracks: HashMap<String, Track> = HashMap::new();
    let mut plan = Vec::new();
    for &i in &ids {
        let (v, expect) = intent(i, prefix);
        let id = v["id"].as_str().unwrap_or_default().to_owned();
        let intended = started + period * i as u32;
        tracks.insert(
            id.clone(),
            Track {
                intended: Some(intended),
                sent: None,
                expect,
                done: None,
            },
        );
        plan.push((intended, json!({"op": "submit", "req": id, "intent": v})));
    }
    let total = plan.len();
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let sender = tokio::spawn(async move {
        for (at, frame) in plan {
            tokio::time::sleep_until(at.into()).await;
            let id = frame["req"].as_str().unwrap_or_default().to_owned();
            let t = Instant::now();
            tx.send(&frame).await?;
            let _ = sent_tx.send((id, t));
        }
        Ok::<_, DeskError>(tx)
    });
    let mut arrivals: Arrivals = HashMap::new();
    let mut settled = 0;
    let deadline = tokio::time::Instant::now() + timeout + period * (ids.len() as u32 * 2);
    while settled < total {
        let frame = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(f) => f?,
            Err(_) => break,
        };
        let now = Instant::now();
        let id = frame["id"].as_str().unwrap_or_default().to_owned();
        let op = frame["op"].as_str().unwrap_or_default();
        let state = match op {
            "ack" => "ack".to_owned(),
            "event" => frame["state"].as_str().unwrap_or_default().to_owned(),
            "error" => "error".to_owned(),
            _ => continue,
        };
        arrivals
            .entry(id.clone())
            .or_default()
            .push((state.clone(), now));
        if matches!(
            state.as_str(),
            "confirmed" | "rejected" | "failed" | "error"
        ) && let Some(t) = tracks.get_mut(&id)
            && t.done.is_none()
        {
            t.done = Some(state);
            settled += 1;
        }
    }
    if let Ok(Ok(tx)) = sender.await {
        drop(tx);
    }
    while let Ok((id, t)) = sent_rx.try_recv() {
        if let Some(track) = tracks.get_mut(&id) {
            track.sent = Some(t);
        }
    }
    Ok((tracks, arrivals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_counters_come_out_of_prometheus_text() {
        let body = "# HELP engine_broadcast_hedges_total x\n\
                    # TYPE engine_broadcast_hedges_total counter\n\
                    engine_broadcast_hedges_total 7\n\
                    engine_broadcast_resends_total 0\n\
                    engine_provider_sent_total{provider=\"anvil-0\"} 1990\n\
                    engine_provider_sent_total{provider=\"anvil-1\"} 17\n\
                    engine_provider_rtt_seconds{provider=\"anvil-1\"} 0.000412000\n\
                    engine_relay_sent_total{relay=\"r\"} 3\n";
        let c = BroadcastCounters::parse(body);
        assert_eq!(c.hedges, Some(7));
        assert_eq!(c.resends, Some(0));
        assert_eq!(c.providers.len(), 2);
        assert_eq!(c.providers[0].0, "anvil-0");
        assert_eq!(c.providers[0].1["engine_provider_sent_total"], 1990.0);
        assert!((c.providers[1].1["engine_provider_rtt_seconds"] - 0.000412).abs() < 1e-12);
    }

    #[test]
    fn setup_line_names_the_providers_and_the_hedge_delay() {
        let two = BroadcastSetup {
            providers: vec!["anvil-0".into(), "anvil-1".into()],
            endpoints: 1,
            hedge_delay_us: 500,
            journal: None,
        };
        assert_eq!(
            two.describe(),
            "2 providers (anvil-0, anvil-1) over 2 WebSocket connections to 1 node endpoint, hedging on, hedge delay 500 µs"
        );
        let one = BroadcastSetup {
            providers: vec!["anvil".into()],
            endpoints: 1,
            hedge_delay_us: 2000,
            journal: Some(crate::config::JournalSync::Group),
        };
        assert!(
            one.describe()
                .starts_with("1 provider (anvil) over 1 WebSocket connection to")
        );
        assert_eq!(two.describe_journal(), "no journal");
        assert_eq!(one.describe_journal(), "journal on, sync `group`");
    }
}
