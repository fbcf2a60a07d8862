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

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use alloy_primitives::{Address, U256};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use venues::DEV_ADDRESSES;

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
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            intents: 400,
            desks: 4,
            rate_per_sec: 200,
            settle_timeout: Duration::from_secs(60),
            report_root: Some(PathBuf::from("latency-reports")),
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
        "layout: {} usable cores, {} CPU stages, wait {:?}, threads {:?}\n",
        layout.usable_cores,
        if layout.fused { "fused" } else { "per-stage" },
        layout.wait,
        layout.threads
    );
    if let Some(share) = idle {
        let _ = writeln!(
            text,
            "idle engine: {:.2}% of one core over 3 s (all engine threads)\n",
            share * 100.0
        );
    }
    let _ = writeln!(
        text,
        "Engine, per stage and end to end (engine clock):\n{}",
        report::SUMMARY_HEADER
    );
    let snaps = engine.latency().snapshot();
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

    if let Some(root) = &opts.report_root
        && let Ok(dir) = report::run_dir(root, "demo")
    {
        let machine = format!(
            "{}- layout: CPU stages {}, wait {}, threads {:?}\n- demo: {} intents, {} desks, {}/s\n",
            report::machine_description(),
            if layout.fused { "fused" } else { "per-stage" },
            layout.wait,
            layout.threads,
            opts.intents,
            opts.desks,
            opts.rate_per_sec
        );
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
