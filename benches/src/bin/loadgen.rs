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
//!
//! `--baseline`: after each rate's engine run, the identical schedule and mix goes through
//! the tokio-only baseline (`benches::baseline`, the simplest async design without pinned
//! stages) on a fresh dev chain; its reports go to `baseline/` beside the engine's, and
//! `summary.md` (and a sweep's `curve.md`) get a table "engine vs tokio-only baseline":
//! p50 and p99 of `ack`, `broadcast` and `confirmed`, with baseline / engine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use benches::baseline::Baseline;
use clap::{Parser, Subcommand};
use engine::{Config, Engine};
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
const CONFIRMED: usize = 5;
/// The states the engine-vs-baseline table compares.
const VERSUS: [usize; 3] = [0, BROADCAST, CONFIRMED];

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
    /// After each rate's engine run, send the same schedule through the tokio-only
    /// baseline (`benches::baseline`) on a fresh dev chain; reports in `baseline/`.
    #[arg(long)]
    baseline: bool,
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
    /// What served the desks: `engine` or `baseline`.
    server: &'static str,
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
    let mut bases = Vec::new();
    for (i, &rate) in args.rates.iter().enumerate() {
        let sub = if args.rates.len() == 1 {
            dir.clone()
        } else {
            dir.join(format!("rate-{rate}"))
        };
        let step = measure(args, rate, i, false, &sub)?;
        let base = if args.baseline {
            Some(measure(args, rate, i, true, &sub.join("baseline"))?)
        } else {
            None
        };
        write_step(&sub, args, &step, base.as_ref())?;
        if let Some(b) = &base {
            write_step(&sub.join("baseline"), args, b, None)?;
        }
        steps.push(step);
        bases.push(base);
    }
    std::fs::write(dir.join("machine.md"), machine(args, &steps, &bases))
        .map_err(|e| format!("machine.md: {e}"))?;
    if steps.len() > 1 {
        write_curve(&dir, args, &steps, &bases)?;
    }
    println!("{}", dir.display());
    Ok(())
}

/// One rate against the engine or the baseline, with a line on stderr.
fn measure(args: &RunArgs, rate: f64, index: usize, baseline: bool, dir: &Path) -> Res<Step> {
    let who = if baseline { "baseline" } else { "engine" };
    eprintln!(
        "loadgen: {rate}/s for {} s over {} connections ({who})",
        args.duration, args.connections
    );
    let step = run_rate(args, rate, index, baseline)?;
    eprintln!(
        "loadgen: {rate}/s ({who}): broadcast p99 {:.0} µs, ack p99 {:.0} µs, {} unfinished; {}",
        q(&step.states[BROADCAST], 0.99),
        q(&step.states[0], 0.99),
        step.unfinished,
        dir.display()
    );
    Ok(step)
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

fn run_rate(args: &RunArgs, rate: f64, index: usize, baseline: bool) -> Res<Step> {
    let profile = Profile::parse(&args.profile)?;
    let sched = Arc::new(schedule(rate, args.duration, profile));
    let total = sched.len();
    // An embedded engine (or the baseline) on its own dev chain, fresh per rate so its
    // histograms hold this rate only.
    let (server, url, token) = Server::start(args, baseline)?;
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
    let engine_stages = server.stages();
    let engine_described = server.describe();
    server.stop()?;
    Ok(Step {
        rate,
        server: if baseline { "baseline" } else { "engine" },
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

/// What the desks of one run talk to.
enum Server {
    /// An engine in this process, on its own dev chain.
    Engine(venues::Anvil, Box<Engine>),
    /// The tokio-only baseline in this process, on its own dev chain.
    Baseline(venues::Anvil, Baseline),
    /// A running engine (`--url`).
    Remote(String),
}

impl Server {
    /// The server, its desk URL and a token it accepts.
    fn start(args: &RunArgs, baseline: bool) -> Res<(Server, String, String)> {
        if let (Some(u), false) = (&args.url, baseline) {
            let token = args.token.clone().ok_or("--url needs --token")?;
            return Ok((Server::Remote(u.clone()), u.clone(), token));
        }
        let (anvil, cfg, token) = dev_setup(args)?;
        let (server, addr) = if baseline {
            let b = Baseline::start(&cfg)?;
            let addr = b.local_addr();
            (Server::Baseline(anvil, b), addr)
        } else {
            let e = Engine::start(cfg).map_err(|e| format!("engine: {e}"))?;
            let addr = e.local_addr();
            (Server::Engine(anvil, Box::new(e)), addr)
        };
        Ok((server, format!("ws://{addr}/v1/ws"), token))
    }

    /// An embedded engine's own per-stage histograms.
    fn stages(&self) -> Vec<(String, Histogram<u64>)> {
        match self {
            Server::Engine(_, e) => e
                .latency()
                .snapshot()
                .into_iter()
                .map(|s| (s.name, s.cumulative))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Server::Engine(_, e) => e.layout().describe(),
            Server::Baseline(_, b) => b.describe(),
            Server::Remote(url) => format!("a running engine at {url}"),
        }
    }

    /// Stops the server, then its dev chain.
    fn stop(self) -> Res<()> {
        match self {
            Server::Engine(anvil, e) => {
                e.shutdown().map_err(|e| format!("engine shutdown: {e}"))?;
                drop(anvil);
            }
            Server::Baseline(anvil, b) => {
                b.shutdown();
                drop(anvil);
            }
            Server::Remote(_) => {}
        }
        Ok(())
    }
}

/// A fresh dev chain and the engine's dev configuration for it (which the baseline
/// reads too), with a token for the generator's principal.
fn dev_setup(args: &RunArgs) -> Res<(venues::Anvil, Config, String)> {
    let (anvil, mut cfg, token) = benches::load_setup(args.block_ms, "loadgen")?;
    if let Some(h) = &args.hot_core {
        cfg.hot_core =
            Some(engine::config::HotCore::parse(h).ok_or_else(|| format!("--hot-core {h}"))?);
    }
    Ok((anvil, cfg, token))
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

/// The summary row of state `i` of a run.
fn state_row(s: &Step, i: usize) -> Value {
    row(&format!("desk.{}", STATES[i]), &s.states[i], s.span_s)
}

/// `base`'s reports are in `baseline/` beside `s`'s: `summary.md` gets the table "engine
/// vs tokio-only baseline".
fn write_step(dir: &Path, args: &RunArgs, s: &Step, base: Option<&Step>) -> Res<()> {
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
        rows.push(state_row(s, i));
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
        "# Load generator{}: {} intents/s offered ({} profile), {} s, {} connections\n",
        if s.server == "baseline" {
            " against the tokio-only baseline"
        } else {
            ""
        },
        s.rate,
        args.profile,
        args.duration,
        args.connections
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
    if let Some(b) = base {
        let _ = writeln!(
            md,
            "\n## engine vs tokio-only baseline\n\nThe same schedule and mix, right after this \
             run, through the tokio-only baseline on a fresh dev chain (reports in \
             `baseline/`; it is {}). µs from the intended send time; baseline / engine above \
             1: the engine is faster. Unfinished: engine {}, baseline {}.\n",
            b.engine_described, s.unfinished, b.unfinished
        );
        md.push_str(&ratio_header(&["state"], "engine", "baseline", &P50_P99));
        md.push_str(&versus(&[], s, b));
    }
    w("summary.md", md)?;
    w(
        "config.md",
        format!(
            "# Configuration\n\n- loadgen: `{}`\n- {}: {}\n",
            std::env::args().collect::<Vec<_>>().join(" "),
            s.server,
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

/// Headings and summary keys of the quantiles a ratio table shows.
const P50_P99: [(&str, &str); 2] = [("p50", "p50_us"), ("p99", "p99_us")];
const P50_P99_P999: [(&str, &str); 3] =
    [("p50", "p50_us"), ("p99", "p99_us"), ("p99.9", "p999_us")];

/// The head of a table of two runs' rows side by side: the `lead` columns, then per
/// quantile `a`, `b` and `b`/`a`.
fn ratio_header(lead: &[&str], a: &str, b: &str, cols: &[(&str, &str)]) -> String {
    let mut md = String::from("|");
    for l in lead {
        let _ = write!(md, " {l} |");
    }
    for (q, _) in cols {
        let _ = write!(md, " {q} {a} | {q} {b} | {b}/{a} |");
    }
    md.push_str("\n|");
    md.push_str(&"---|".repeat(lead.len()));
    md.push_str(&"---:|---:|---:|".repeat(cols.len()));
    md.push('\n');
    md
}

/// One line of that table: summary rows `x` (A) and `y` (B).
fn ratio_line(lead: &[String], x: &Value, y: &Value, cols: &[(&str, &str)]) -> String {
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    let mut md = String::from("|");
    for l in lead {
        let _ = write!(md, " {l} |");
    }
    for (_, k) in cols {
        let (p, q) = (f(x, k), f(y, k));
        let ratio = if p > 0.0 {
            format!("{:.2}", q / p)
        } else {
            "–".into()
        };
        let _ = write!(md, " {p:.1} | {q:.1} | {ratio} |");
    }
    md.push('\n');
    md
}

/// The engine-vs-baseline lines (p50, p99) of the compared states, after `lead` cells.
fn versus(lead: &[String], engine: &Step, base: &Step) -> String {
    VERSUS
        .iter()
        .map(|&i| {
            let mut cells = lead.to_vec();
            cells.push(STATES[i].to_owned());
            ratio_line(&cells, &state_row(engine, i), &state_row(base, i), &P50_P99)
        })
        .collect()
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

fn write_curve(dir: &Path, args: &RunArgs, steps: &[Step], bases: &[Option<Step>]) -> Res<()> {
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
    let mut pts_base = Vec::new();
    let pairs: Vec<(&Step, &Step)> = steps
        .iter()
        .zip(bases)
        .filter_map(|(s, b)| Some((s, b.as_ref()?)))
        .collect();
    if !pairs.is_empty() {
        let _ = writeln!(
            md,
            "\n## engine vs tokio-only baseline\n\nThe same schedule and mix at each rate through \
             the tokio-only baseline (`benches::baseline`) on a fresh dev chain, right after \
             the engine's run (each rate's `baseline/`). µs from the intended send time; \
             baseline / engine above 1: the engine is faster.\n"
        );
        md.push_str(&ratio_header(
            &["offered /s", "state"],
            "engine",
            "baseline",
            &P50_P99,
        ));
        for (s, b) in &pairs {
            md.push_str(&versus(&[s.rate.to_string()], s, b));
            pts_base.push((b.rate, q(&b.states[BROADCAST], 0.99).max(0.1)));
        }
        let unfinished: Vec<String> = pairs
            .iter()
            .map(|(s, b)| format!("{}/s: {} / {}", s.rate, s.unfinished, b.unfinished))
            .collect();
        let _ = writeln!(
            md,
            "\nUnfinished intents, engine / baseline: {}.",
            unfinished.join(", ")
        );
    }
    std::fs::write(dir.join("curve.md"), md).map_err(|e| format!("curve.md: {e}"))?;
    use plotters::prelude::*;
    let path = dir.join("curve.svg");
    let err = |e: &dyn std::fmt::Display| format!("curve.svg: {e}");
    let xmax = steps.iter().map(|s| s.rate).fold(1.0, f64::max) * 1.1;
    let ymax = pts_b
        .iter()
        .chain(&pts_a)
        .chain(&pts_base)
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
    let mut series = vec![
        ("intent → broadcast p99", pts_b, RED),
        ("intent → ack p99", pts_a, BLUE),
    ];
    if !pts_base.is_empty() {
        series.push(("baseline: intent → broadcast p99", pts_base, MAGENTA));
    }
    for (name, pts, color) in series {
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

fn machine(args: &RunArgs, steps: &[Step], bases: &[Option<Step>]) -> String {
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
    if let Some(b) = bases.iter().flatten().next() {
        let _ = writeln!(
            s,
            "- baseline (`--baseline`): {}, in the same process, on its own dev chain, run \
             after the engine at each rate",
            b.engine_described
        );
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
    let mut md = format!("# {} (B) against {} (A)\n\n", b.display(), a.display());
    md.push_str(&ratio_header(&["row"], "A", "B", &P50_P99_P999));
    for (name, x) in &ra {
        let Some(y) = rb.get(name) else { continue };
        md.push_str(&ratio_line(std::slice::from_ref(name), x, y, &P50_P99_P999));
    }
    Ok(md)
}
