//! The load generator: desks over the real WebSocket protocol, open loop.
//!
//! ```text
//! cargo run -p benches --release --bin loadgen -- --rates 200,500,1000 --duration 20
//! cargo run -p benches --release --bin loadgen -- compare latency-reports/A latency-reports/B
//! ```
//!
//! For each offered rate it starts a fresh dev chain and engine (or uses `--url` and
//! `--token` for a running one), opens `--connections` desk connections and sends the
//! engine's demo mix (transfers, calls, and about one in seven intents that policy must
//! reject) on a fixed schedule: intent `k` is due at its *intended* time, set before the run
//! from the rate profile (`constant`, `ramp:FROM:TO`, `step:FROM:BY:EVERY_S`). Each
//! connection has a writer thread that sends every intent at its intended time (sleeping
//! with 1 ns timer slack, then spinning the last 50 µs) and a reader thread.
//!
//! Latency is measured from each intent's intended send time (coordinated-omission
//! correction as wrk2 does it): a writer held back by a slow engine does not send less
//! and hide the wait, the wait is charged to the intents that were due. How late the
//! writers were is its own histogram (`loadgen.send_lag`), so the generator's own floor
//! stays visible.
//!
//! Per state the desk sees (`ack`, `accepted`, `signed`, `broadcast`, `included`,
//! `confirmed`, `rejected`, and `error` for a frame refused as a whole, e.g. `overloaded`) the run records an HdrHistogram, written as an interval log
//! (`<state>.hlog`, one-second intervals, the standard HdrHistogram format) and a
//! percentile table (`<state>.hgrm`, µs); the engine's own per-stage histograms (an
//! embedded engine's registry) go beside them. Each run folder holds `machine.md`,
//! `config.md`, `summary.md` (p50, p90, p99, p99.9, max and throughput per row),
//! `summary.json` (for `compare`) and `percentiles.svg` (the HdrHistogram plotter's
//! "nines" axis). A sweep adds `curve.md` and `curve.svg`: p99 against offered load, and the
//! highest rate whose intent-to-broadcast p99 stayed under `--budget-us` (1 ms).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use clap::{Parser, Subcommand};
use engine::auth::{JwtAuth, Roles};
use engine::{Config, Engine, dev};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use pipeline::report;
use serde_json::{Value, json};
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::{Role, WebSocket};
use tungstenite::{Message, Utf8Bytes};

/// The states the desk sees, in order; the latency of each is from the intended send time.
/// `error`: a frame the engine answered with an error (`overloaded`, `rate_limited`, …).
const STATES: [&str; 8] = [
    "ack",
    "accepted",
    "signed",
    "broadcast",
    "included",
    "confirmed",
    "rejected",
    "error",
];
const BROADCAST: usize = 3;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Open-loop desk load over the WebSocket protocol, with latency reports"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Two run folders side by side, with ratios (B / A).
    Compare {
        /// The baseline run folder.
        a: PathBuf,
        /// The run folder to compare with it.
        b: PathBuf,
    },
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// Offered rates, intents per second over all connections (several: a sweep).
    #[arg(long, value_delimiter = ',', default_value = "500")]
    rates: Vec<f64>,
    /// Rate profile: `constant`, `ramp:FROM:TO` (rates in multiples of each offered rate,
    /// e.g. ramp:0.1:1), `step:FROM:BY:EVERY_S` (e.g. step:0.25:0.25:5).
    #[arg(long, default_value = "constant")]
    profile: String,
    /// Seconds of load per rate.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Desk connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds to wait after the last send for every intent to finish.
    #[arg(long, default_value_t = 60.0)]
    settle: f64,
    /// The p99 budget of intent to broadcast that a rate must hold (µs).
    #[arg(long, default_value_t = 1000.0)]
    budget_us: f64,
    /// Dev chain block time (ms).
    #[arg(long, default_value_t = 250)]
    block_ms: u64,
    /// The engine's `hot_core` (`auto` or a core number) for an embedded engine.
    #[arg(long)]
    hot_core: Option<String>,
    /// A running engine's desk URL (`ws://…/v1/ws`) instead of an embedded one.
    #[arg(long)]
    url: Option<String>,
    /// Token for `--url`.
    #[arg(long)]
    token: Option<String>,
    /// Where run folders go.
    #[arg(long, default_value = "latency-reports")]
    report_dir: PathBuf,
    /// A word added to the run folder's name.
    #[arg(long, default_value = "loadgen")]
    label: String,
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Some(Cmd::Compare { a, b }) => compare(&a, &b).map(|t| print!("{t}")),
        None => sweep(&cli.run),
    };
    if let Err(e) = res {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, String>;

/// What one rate measured.
struct Step {
    rate: f64,
    sent: u64,
    /// Per state, latency from the intended send time (ns).
    states: Vec<Histogram<u64>>,
    /// Per state, one-second intervals (start offset, histogram).
    intervals: Vec<Vec<(Duration, Histogram<u64>)>>,
    send_lag: Histogram<u64>,
    /// Seconds from the first intended send to the last ack.
    span_s: f64,
    /// Intents that reached no final state.
    unfinished: u64,
    engine_stages: Vec<(String, Histogram<u64>)>,
    engine_described: String,
}

fn sweep(args: &RunArgs) -> Res<()> {
    if args.rates.is_empty() || args.rates.iter().any(|r| *r <= 0.0) {
        return Err("--rates: positive rates".into());
    }
    if args.connections == 0 {
        return Err("--connections: at least 1".into());
    }
    Profile::parse(&args.profile)?;
    let dir = report::run_dir(&args.report_dir, &args.label)
        .map_err(|e| format!("report folder: {e}"))?;
    let mut steps = Vec::new();
    for (i, &rate) in args.rates.iter().enumerate() {
        eprintln!(
            "loadgen: {rate}/s for {} s over {} connections",
            args.duration, args.connections
        );
        let step = run_rate(args, rate, i)?;
        let sub = if args.rates.len() == 1 {
            dir.clone()
        } else {
            dir.join(format!("rate-{rate}"))
        };
        write_step(&sub, args, &step)?;
        eprintln!(
            "loadgen: {rate}/s: broadcast p99 {:.0} µs, ack p99 {:.0} µs, {} unfinished; {}",
            step.states[BROADCAST].value_at_quantile(0.99) as f64 / 1e3,
            step.states[0].value_at_quantile(0.99) as f64 / 1e3,
            step.unfinished,
            sub.display()
        );
        steps.push(step);
    }
    std::fs::write(dir.join("machine.md"), machine(args, &steps))
        .map_err(|e| format!("machine.md: {e}"))?;
    if steps.len() > 1 {
        write_curve(&dir, args, &steps)?;
    }
    println!("{}", dir.display());
    Ok(())
}

/// The rate profile: the rate at time `t` of the run, as a multiple of the offered rate.
#[derive(Clone, Copy, Debug)]
enum Profile {
    Constant,
    Ramp { from: f64, to: f64 },
    Step { from: f64, by: f64, every_s: f64 },
}

impl Profile {
    fn parse(s: &str) -> Res<Profile> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str| {
            p.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("--profile {s}: {p:?} is not a number"))
        };
        match parts.as_slice() {
            ["constant"] => Ok(Profile::Constant),
            ["ramp", a, b] => Ok(Profile::Ramp {
                from: num(a)?,
                to: num(b)?,
            }),
            ["step", a, b, c] => Ok(Profile::Step {
                from: num(a)?,
                by: num(b)?,
                every_s: num(c)?.max(0.001),
            }),
            _ => Err(format!(
                "--profile {s}: constant, ramp:FROM:TO or step:FROM:BY:EVERY_S"
            )),
        }
    }

    fn factor(self, t: f64, duration: f64) -> f64 {
        match self {
            Profile::Constant => 1.0,
            Profile::Ramp { from, to } => from + (to - from) * (t / duration).min(1.0),
            Profile::Step { from, by, every_s } => from + by * (t / every_s).floor(),
        }
    }
}

/// Intended send times (ns from the start) of every intent of a run.
fn schedule(rate: f64, duration: f64, profile: Profile) -> Vec<u64> {
    let mut out = Vec::with_capacity((rate * duration * 1.1) as usize + 16);
    let mut t = 0.0f64;
    while t < duration {
        out.push((t * 1e9) as u64);
        // At least 1/10 of the offered rate, so a ramp from 0 starts.
        let r = (rate * profile.factor(t, duration)).max(rate / 10.0);
        t += 1.0 / r;
    }
    out
}

/// A desk connection: the writer's socket and the reader's (the same TCP stream).
fn connect(url: &str, token: &str) -> Res<(WebSocket<TcpStream>, WebSocket<TcpStream>)> {
    let mut req = url
        .into_client_request()
        .map_err(|e| format!("{url}: {e}"))?;
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|e| format!("token: {e}"))?,
    );
    let host = req.uri().host().unwrap_or("127.0.0.1").to_owned();
    let port = req.uri().port_u16().unwrap_or(80);
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("{url}: {e}"))?;
    let stream = TcpStream::connect(addr).map_err(|e| format!("{url}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let (ws, _) = tungstenite::client(req, stream).map_err(|e| format!("{url}: {e}"))?;
    // The engine sends nothing unasked (no ping), so after the handshake the reader can
    // take over the read side with its own protocol state.
    let read = ws
        .get_ref()
        .try_clone()
        .map_err(|e| format!("clone: {e}"))?;
    Ok((ws, WebSocket::from_raw_socket(read, Role::Client, None)))
}

/// One received state: which intent, which state, when (ns from the run's start).
#[derive(Clone, Copy)]
struct Seen {
    k: u32,
    state: u8,
    at_ns: u64,
}

fn run_rate(args: &RunArgs, rate: f64, index: usize) -> Res<Step> {
    let profile = Profile::parse(&args.profile)?;
    let sched = Arc::new(schedule(rate, args.duration, profile));
    let total = sched.len();
    // An embedded engine on its own dev chain, fresh per rate so its histograms hold this
    // rate only.
    let embedded = match &args.url {
        Some(_) => None,
        None => Some(start_engine(args)?),
    };
    let (url, token) = match (&embedded, &args.url) {
        (Some((_, e, token)), _) => (format!("ws://{}/v1/ws", e.local_addr()), token.clone()),
        (None, Some(u)) => (u.clone(), args.token.clone().ok_or("--url needs --token")?),
        (None, None) => unreachable!("embedded when no --url"),
    };
    let prefix = format!("lg{index}{}", std::process::id() % 10_000);
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        conns.push(connect(&url, &token)?);
    }
    // Every frame is rendered before the clock starts: a writer's timed loop only waits
    // and writes.
    let n = args.connections;
    let frames: Vec<Vec<(usize, Utf8Bytes)>> = (0..n)
        .map(|c| {
            (c..total)
                .step_by(n)
                .map(|k| {
                    let (intent, _) = engine::demo::intent(k, &prefix);
                    let id = intent["id"].as_str().unwrap_or_default().to_owned();
                    let frame = json!({"op": "submit", "req": id, "intent": intent}).to_string();
                    (k, Utf8Bytes::from(frame))
                })
                .collect()
        })
        .collect();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now() + Duration::from_millis(300);
    let deadline = start + Duration::from_secs_f64(args.duration + args.settle);
    let mut handles = Vec::new();
    for (c, ((mut w, mut r), mine)) in conns.into_iter().zip(frames).enumerate() {
        let sched_w = Arc::clone(&sched);
        let writer = std::thread::Builder::new()
            .name(format!("lg-write-{c}"))
            .spawn(move || -> Res<Histogram<u64>> {
                benches::tight_timer_slack();
                let mut lag = report::ns_histogram();
                for (k, frame) in mine {
                    let due = start + Duration::from_nanos(sched_w[k]);
                    loop {
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        let left = due - now;
                        if left > Duration::from_micros(50) {
                            std::thread::sleep(left - Duration::from_micros(50));
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                    let late = Instant::now().saturating_duration_since(due);
                    let _ = lag.record(late.as_nanos().max(1) as u64);
                    w.send(Message::Text(frame))
                        .map_err(|e| format!("send: {e}"))?;
                }
                Ok(lag)
            })
            .map_err(|e| e.to_string())?;
        let done_r = Arc::clone(&done);
        let stop_r = Arc::clone(&stop);
        let prefix_r = format!("{prefix}-");
        let reader = std::thread::Builder::new()
            .name(format!("lg-read-{c}"))
            .spawn(move || -> Res<Vec<Seen>> {
                let mut seen = Vec::with_capacity(8 * (total / n + 16));
                // A read timeout lets the reader give up at the deadline.
                let _ = r
                    .get_ref()
                    .set_read_timeout(Some(Duration::from_millis(200)));
                while Instant::now() < deadline && !stop_r.load(Ordering::Relaxed) {
                    let msg = match r.read() {
                        Ok(m) => m,
                        Err(tungstenite::Error::Io(e))
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            continue;
                        }
                        Err(e) => return Err(format!("read: {e}")),
                    };
                    let at = Instant::now().saturating_duration_since(start).as_nanos() as u64;
                    let Message::Text(text) = msg else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    let (state, id) = match v["op"].as_str() {
                        Some("ack") => ("ack", v["req"].as_str().or(v["id"].as_str())),
                        Some("error") => ("error", v["req"].as_str().or(v["id"].as_str())),
                        Some("event") => (v["state"].as_str().unwrap_or(""), v["id"].as_str()),
                        _ => continue,
                    };
                    let Some(k) = id
                        .and_then(|i| i.strip_prefix(&prefix_r))
                        .and_then(|n| n.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    let Some(s) = STATES.iter().position(|x| *x == state) else {
                        if state == "failed" {
                            done_r.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    };
                    if matches!(state, "confirmed" | "rejected" | "error") {
                        done_r.fetch_add(1, Ordering::Relaxed);
                    }
                    seen.push(Seen {
                        k,
                        state: s as u8,
                        at_ns: at,
                    });
                }
                Ok(seen)
            })
            .map_err(|e| e.to_string())?;
        handles.push((writer, reader));
    }
    // Wait for every intent to finish (or the deadline), then stop the readers.
    while (done.load(Ordering::Relaxed) as usize) < total && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    let mut states: Vec<Histogram<u64>> = STATES.iter().map(|_| report::ns_histogram()).collect();
    let mut send_lag = report::ns_histogram();
    let mut all = Vec::new();
    // Readers stop within one read timeout of `stop`.
    for (w, r) in handles {
        let lag = w
            .join()
            .map_err(|_| "a writer panicked".to_owned())?
            .map_err(|e| format!("writer: {e}"))?;
        send_lag.add(&lag).map_err(|e| e.to_string())?;
        let seen = r
            .join()
            .map_err(|_| "a reader panicked".to_owned())?
            .map_err(|e| format!("reader: {e}"))?;
        all.extend(seen);
    }
    let interval = Duration::from_secs(1);
    let slots = ((args.duration + args.settle) as usize) + 2;
    let mut intervals: Vec<Vec<(Duration, Histogram<u64>)>> = STATES
        .iter()
        .map(|_| {
            (0..slots)
                .map(|i| (interval * i as u32, report::ns_histogram()))
                .collect()
        })
        .collect();
    let mut last_ack = 0u64;
    for s in &all {
        let intended = sched[s.k as usize];
        let lat = s.at_ns.saturating_sub(intended).max(1);
        let st = s.state as usize;
        let _ = states[st].record(lat);
        let slot = ((s.at_ns / 1_000_000_000) as usize).min(slots - 1);
        let _ = intervals[st][slot].1.record(lat);
        if st == 0 {
            last_ack = last_ack.max(s.at_ns);
        }
    }
    for iv in &mut intervals {
        iv.retain(|(_, h)| !h.is_empty());
    }
    let unfinished = total.saturating_sub(done.load(Ordering::Relaxed) as usize) as u64;
    let (engine_stages, engine_described) = match &embedded {
        Some((_, e, _)) => (
            e.latency()
                .snapshot()
                .into_iter()
                .map(|s| (s.name, s.cumulative))
                .collect(),
            e.layout().describe(),
        ),
        None => (Vec::new(), format!("a running engine at {url}")),
    };
    if let Some((anvil, e, _)) = embedded {
        e.shutdown().map_err(|e| format!("engine shutdown: {e}"))?;
        drop(anvil);
    }
    Ok(Step {
        rate,
        sent: total as u64,
        states,
        intervals,
        send_lag,
        span_s: (last_ack as f64 / 1e9).max(1e-3),
        unfinished,
        engine_stages,
        engine_described,
    })
}

fn start_engine(args: &RunArgs) -> Res<(venues::Anvil, Engine, String)> {
    let anvil = dev::start_chain(None, Duration::from_millis(args.block_ms))
        .map_err(|e| format!("dev chain: {e}"))?;
    let secret = "loadgen-secret-0123456789abcdef".to_owned();
    let mut cfg: Config = dev::dev_config(
        &anvil.ws_url(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        secret.clone(),
    );
    cfg.confirmations = 1;
    // The generator is one principal over several connections at rates far above a
    // desk's default limits.
    cfg.limits.frames_per_sec_per_connection = 1_000_000;
    cfg.limits.burst_per_connection = 1_000_000;
    cfg.limits.frames_per_sec_per_principal = 1_000_000;
    cfg.limits.burst_per_principal = 1_000_000;
    if let Some(h) = &args.hot_core {
        cfg.hot_core =
            Some(engine::config::HotCore::parse(h).ok_or_else(|| format!("--hot-core {h}"))?);
    }
    let e = Engine::start(cfg).map_err(|e| format!("engine: {e}"))?;
    let token = JwtAuth::new(secret.as_bytes()).issue("loadgen", Roles::all(), 3600);
    Ok((anvil, e, token))
}

fn q(h: &Histogram<u64>, p: f64) -> f64 {
    if h.is_empty() {
        return 0.0;
    }
    h.value_at_quantile(p) as f64 / 1e3
}

/// One summary row: name, count, p50, p90, p99, p99.9, max (µs), throughput (/s).
fn row(name: &str, h: &Histogram<u64>, span_s: f64) -> Value {
    json!({
        "name": name,
        "count": h.len(),
        "p50_us": q(h, 0.5),
        "p90_us": q(h, 0.9),
        "p99_us": q(h, 0.99),
        "p999_us": q(h, 0.999),
        "max_us": if h.is_empty() { 0.0 } else { h.max() as f64 / 1e3 },
        "per_s": h.len() as f64 / span_s,
    })
}

fn write_step(dir: &Path, args: &RunArgs, s: &Step) -> Res<()> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let w = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).map_err(|e| format!("{name}: {e}"))
    };
    let mut rows = Vec::new();
    for (i, name) in STATES.iter().enumerate() {
        let h = &s.states[i];
        if h.is_empty() {
            continue;
        }
        rows.push(row(&format!("desk.{name}"), h, s.span_s));
        w(&format!("desk.{name}.hgrm"), report::hgrm(h))?;
        write_hlog(
            &dir.join(format!("desk.{name}.hlog")),
            name,
            &s.intervals[i],
        )?;
    }
    rows.push(row("loadgen.send_lag", &s.send_lag, s.span_s));
    w("loadgen.send_lag.hgrm", report::hgrm(&s.send_lag))?;
    for (name, h) in &s.engine_stages {
        if h.is_empty() {
            continue;
        }
        rows.push(row(&format!("engine.{name}"), h, s.span_s));
        w(&format!("engine.{name}.hgrm"), report::hgrm(h))?;
    }
    let summary = json!({
        "rate": s.rate,
        "sent": s.sent,
        "unfinished": s.unfinished,
        "duration_s": args.duration,
        "connections": args.connections,
        "profile": args.profile,
        "rows": rows,
    });
    w(
        "summary.json",
        serde_json::to_string_pretty(&summary).unwrap_or_default(),
    )?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Load generator: {} intents/s offered ({} profile), {} s, {} connections\n",
        s.rate, args.profile, args.duration, args.connections
    );
    let _ = writeln!(
        md,
        "Sent {} intents; {} reached no final state. `desk.*`: latency from each intent's \
         intended send time to the frame the desk received (coordinated omission corrected); \
         `loadgen.send_lag`: how late the generator's writers were; `engine.*`: the engine's \
         own per-stage histograms. Values in µs; throughput over the {:.1} s from the first \
         intended send to the last ack.\n",
        s.sent, s.unfinished, s.span_s
    );
    md.push_str(&table(&rows));
    w("summary.md", md)?;
    w(
        "config.md",
        format!(
            "# Configuration\n\n- loadgen: `{}`\n- engine: {}\n",
            std::env::args().collect::<Vec<_>>().join(" "),
            s.engine_described
        ),
    )?;
    let series: Vec<(String, &Histogram<u64>)> = STATES
        .iter()
        .enumerate()
        .filter(|(i, _)| !s.states[*i].is_empty())
        .map(|(i, n)| (format!("desk.{n}"), &s.states[i]))
        .collect();
    plot_percentiles(
        &dir.join("percentiles.svg"),
        &series,
        &format!("{} intents/s", s.rate),
    )
}

fn table(rows: &[Value]) -> String {
    let mut md = String::new();
    md.push_str("| row | count | p50 | p90 | p99 | p99.9 | max | per s |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
            r["name"].as_str().unwrap_or(""),
            r["count"],
            f("p50_us"),
            f("p90_us"),
            f("p99_us"),
            f("p999_us"),
            f("max_us"),
            f("per_s")
        );
    }
    md
}

fn write_hlog(path: &Path, tag: &str, intervals: &[(Duration, Histogram<u64>)]) -> Res<()> {
    let mut out = Vec::new();
    {
        let mut ser = V2DeflateSerializer::new();
        let mut log = IntervalLogWriterBuilder::new()
            .add_comment(&format!(
                "loadgen {tag}: latency from intended send time, ns"
            ))
            .with_start_time(SystemTime::now())
            .with_max_value_divisor(1e3)
            .begin_log_with(&mut out, &mut ser)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        for (start, h) in intervals {
            log.write_histogram(h, *start, Duration::from_secs(1), Tag::new(tag))
                .map_err(|e| format!("{}: {e:?}", path.display()))?;
        }
    }
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(&out))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Percentile distributions on the "nines" axis: x = 1 / (1 - p), logarithmic.
fn plot_percentiles(path: &Path, series: &[(String, &Histogram<u64>)], title: &str) -> Res<()> {
    use plotters::prelude::*;
    let mut ymax = 1.0f64;
    let mut lines = Vec::new();
    for (name, h) in series {
        let mut pts = Vec::new();
        for v in h.iter_quantiles(2) {
            let p = v.quantile_iterated_to();
            if p >= 1.0 {
                break;
            }
            let x = 1.0 / (1.0 - p);
            let y = v.value_iterated_to() as f64 / 1e3;
            ymax = ymax.max(y);
            pts.push((x.clamp(1.0, 1e6), y.max(0.1)));
        }
        lines.push((name.clone(), pts));
    }
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Latency by percentile, {title}"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0f64..1e6).log_scale(), (0.1f64..ymax * 1.5).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_label_formatter(&|x| {
            let p = format!("{:.4}", 100.0 * (1.0 - 1.0 / x));
            format!("{}%", p.trim_end_matches('0').trim_end_matches('.'))
        })
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, pts)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

fn write_curve(dir: &Path, args: &RunArgs, steps: &[Step]) -> Res<()> {
    let mut md = String::from("# p99 against offered load\n\n");
    let _ = writeln!(
        md,
        "Latency from the intended send time (µs); budget: intent to broadcast p99 under {} µs.\n",
        args.budget_us
    );
    md.push_str("| offered /s | sent | ack p99 | broadcast p50 | broadcast p99 | broadcast p99.9 | engine ws→wire p99 | unfinished | holds |\n");
    md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    let mut best: Option<f64> = None;
    let mut best_wire: Option<f64> = None;
    let mut pts_b = Vec::new();
    let mut pts_a = Vec::new();
    for s in steps {
        let b = &s.states[BROADCAST];
        let wire = s
            .engine_stages
            .iter()
            .find(|(n, _)| n == "e2e.ws_to_wire")
            .map_or(0.0, |(_, h)| q(h, 0.99));
        let holds = !b.is_empty() && q(b, 0.99) < args.budget_us && s.unfinished == 0;
        if holds {
            best = Some(best.map_or(s.rate, |x: f64| x.max(s.rate)));
        }
        if wire > 0.0 && wire < args.budget_us && s.unfinished == 0 {
            best_wire = Some(best_wire.map_or(s.rate, |x: f64| x.max(s.rate)));
        }
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
            s.rate,
            s.sent,
            q(&s.states[0], 0.99),
            q(b, 0.5),
            q(b, 0.99),
            q(b, 0.999),
            wire,
            s.unfinished,
            if holds { "yes" } else { "no" }
        );
        pts_b.push((s.rate, q(b, 0.99).max(0.1)));
        pts_a.push((s.rate, q(&s.states[0], 0.99).max(0.1)));
    }
    let _ = writeln!(
        md,
        "\nHighest offered rate holding the budget, as the desk sees it (the `broadcast` \
         event follows the node's answer to the send, so the node's round trip is in it): \
         {}.\n\nHighest offered rate whose engine-side p99 from WebSocket in to the socket \
         write towards the node (`e2e.ws_to_wire`) held the budget: {}.",
        best.map_or("none of those run".to_owned(), |r| format!("{r} intents/s")),
        best_wire.map_or("none of those run".to_owned(), |r| format!("{r} intents/s"))
    );
    std::fs::write(dir.join("curve.md"), md).map_err(|e| format!("curve.md: {e}"))?;
    use plotters::prelude::*;
    let path = dir.join("curve.svg");
    let err = |e: &dyn std::fmt::Display| format!("curve.svg: {e}");
    let xmax = steps.iter().map(|s| s.rate).fold(1.0, f64::max) * 1.1;
    let ymax = pts_b
        .iter()
        .chain(&pts_a)
        .map(|p| p.1)
        .fold(args.budget_us, f64::max)
        * 2.0;
    let root = SVGBackend::new(&path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("p99 against offered load", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..xmax, (1.0f64..ymax).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("offered intents/s")
        .y_desc("p99 (µs)")
        .draw()
        .map_err(|e| err(&e))?;
    for (name, pts, color) in [
        ("intent → broadcast p99", pts_b, RED),
        ("intent → ack p99", pts_a, BLUE),
    ] {
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, args.budget_us), (xmax, args.budget_us)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label("budget")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

fn machine(args: &RunArgs, steps: &[Step]) -> String {
    let mut s = String::from("# Machine\n\n");
    s.push_str(&report::machine_description());
    let _ = writeln!(
        s,
        "- load generator: {} connections, a writer and a reader thread each, in the same \
         process as the engine{}",
        args.connections,
        if args.url.is_some() {
            " (no: a running engine by URL)"
        } else {
            ""
        }
    );
    if let Some(st) = steps.first() {
        let _ = writeln!(s, "- engine: {}", st.engine_described);
    }
    s
}

/// `compare A B`: every row present in both runs, with B / A.
fn compare(a: &Path, b: &Path) -> Res<String> {
    let load = |d: &Path| -> Res<BTreeMap<String, Value>> {
        let p = d.join("summary.json");
        let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(v["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| Some((r["name"].as_str()?.to_owned(), r.clone())))
            .collect())
    };
    let (ra, rb) = (load(a)?, load(b)?);
    let mut md = format!(
        "# {} (B) against {} (A)\n\n| row | p50 A | p50 B | B/A | p99 A | p99 B | B/A | p99.9 A | p99.9 B | B/A |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        b.display(),
        a.display()
    );
    for (name, x) in &ra {
        let Some(y) = rb.get(name) else { continue };
        let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(0.0);
        let ratio = |k: &str| {
            let (p, q) = (f(x, k), f(y, k));
            if p > 0.0 {
                format!("{:.2}", q / p)
            } else {
                "–".into()
            }
        };
        let _ = writeln!(
            md,
            "| {name} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} |",
            f(x, "p50_us"),
            f(y, "p50_us"),
            ratio("p50_us"),
            f(x, "p99_us"),
            f(y, "p99_us"),
            ratio("p99_us"),
            f(x, "p999_us"),
            f(y, "p999_us"),
            ratio("p999_us"),
        );
    }
    Ok(md)
}
