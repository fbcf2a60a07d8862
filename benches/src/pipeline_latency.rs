//! Five-stage pipeline latency run: end-to-end latency (from the hop stamps) of a pipeline paced
//! at 10k msg/s, for each core map (all five stages fused on one thread; one thread per stage,
//! pinned where the machine has a core per stage) and each wait strategy, plus the idle CPU use
//! of the default layout. Writes a percentile table and `.hgrm` distributions to
//! `latency-reports/<date>-pipeline/`.
//!
//! Run by `cargo bench -p benches --bench pipeline` and by
//! `cargo run -p benches --release --bin pipeline-latency [-- --seconds 3 --rate 10000]`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{
    fmt_ns, hgrm, machine_description, process_cpu_time, reports_root, tight_timer_slack, today,
};
use hdrhistogram::Histogram;
use pipeline::{
    CoreBudget, Emit, Full, Hops, Message, NoMessage, Output, PipelineBuilder, Recorder, Stage,
    ThreadConfig, WaitKind, assert_message_size, fuse, now_raw, one_to_one, ticks_to_ns,
};

/// A message of realistic size (an intent plus its trail).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Order {
    hops: Hops,
    seq: u64,
    payload: [u64; 14],
}

assert_message_size!(Order, 256);

impl Message for Order {
    fn hops(&self) -> &Hops {
        &self.hops
    }
    fn hops_mut(&mut self) -> &mut Hops {
        &mut self.hops
    }
}

/// A CPU-bound stage doing a little arithmetic (a few tens of ns).
struct Work {
    name: &'static str,
}

impl Stage for Work {
    type In = Order;
    type Out = Order;
    fn name(&self) -> &'static str {
        self.name
    }
    #[inline]
    fn on_message<E: Emit<Order>>(&mut self, mut msg: Order, out: &mut E) {
        let mut x = msg.seq ^ 0x9e37_79b9_7f4a_7c15;
        for v in msg.payload.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *v = v.wrapping_add(x);
        }
        out.emit(msg);
    }
}

/// The last stage: records end-to-end latency (origin stamp → now) and counts.
struct Sink {
    e2e: Recorder,
    done: Arc<AtomicU64>,
}

impl Stage for Sink {
    type In = Order;
    type Out = NoMessage;
    fn name(&self) -> &'static str {
        "s5"
    }
    #[inline]
    fn on_message<E: Emit<NoMessage>>(&mut self, msg: Order, _out: &mut E) {
        if let Some(origin) = msg.hops.first() {
            self.e2e.record(ticks_to_ns(origin, now_raw()));
        }
        self.done.fetch_add(1, Ordering::Release);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// All five stages on one thread.
    Fused,
    /// One thread per stage; pinned to its own core if `pinned`.
    PerStage { pinned: bool },
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Fused => "fused (1 thread)",
            Layout::PerStage { pinned: false } => "thread per stage (5 threads, shared cores)",
            Layout::PerStage { pinned: true } => "thread per stage (5 threads, pinned)",
        }
    }
    fn slug(self) -> &'static str {
        match self {
            Layout::Fused => "fused",
            Layout::PerStage { pinned: false } => "per-stage-shared",
            Layout::PerStage { pinned: true } => "per-stage-pinned",
        }
    }
    fn threads(self) -> usize {
        match self {
            Layout::Fused => 1,
            Layout::PerStage { .. } => 5,
        }
    }
}

struct Running {
    pipeline: pipeline::Pipeline,
    src: pipeline::OneToOneProducer<Order>,
    done: Arc<AtomicU64>,
    sent: u64,
}

fn build(layout: Layout, wait: WaitKind, budget: &CoreBudget) -> Running {
    let mut b = PipelineBuilder::new();
    let done = Arc::new(AtomicU64::new(0));
    let sink = Sink {
        e2e: b.latency().recorder("e2e"),
        done: Arc::clone(&done),
    };
    let (src, input) = one_to_one::<Order>(1024);
    let cfg = |name: &str, i: usize| {
        let mut c = ThreadConfig::new(name, wait);
        if let Layout::PerStage { pinned: true } = layout {
            c.core = budget.core_ids().get(i + 1).copied();
        }
        c
    };
    match layout {
        Layout::Fused => {
            let chain = fuse(
                fuse(
                    fuse(
                        fuse(Work { name: "s1" }, Work { name: "s2" }),
                        Work { name: "s3" },
                    ),
                    Work { name: "s4" },
                ),
                sink,
            )
            .named("s1-s5");
            b.spawn(cfg("stages", 0), input.into(), chain, Output::Discard)
                .expect("spawn");
        }
        Layout::PerStage { .. } => {
            let (o1, i2) = one_to_one::<Order>(1024);
            let (o2, i3) = one_to_one::<Order>(1024);
            let (o3, i4) = one_to_one::<Order>(1024);
            let (o4, i5) = one_to_one::<Order>(1024);
            b.spawn(cfg("s1", 0), input.into(), Work { name: "s1" }, o1.into())
                .expect("spawn");
            b.spawn(cfg("s2", 1), i2.into(), Work { name: "s2" }, o2.into())
                .expect("spawn");
            b.spawn(cfg("s3", 2), i3.into(), Work { name: "s3" }, o3.into())
                .expect("spawn");
            b.spawn(cfg("s4", 3), i4.into(), Work { name: "s4" }, o4.into())
                .expect("spawn");
            b.spawn(cfg("s5", 4), i5.into(), sink, Output::Discard)
                .expect("spawn");
        }
    }
    Running {
        pipeline: b.start(),
        src,
        done,
        sent: 0,
    }
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    // SAFETY: `rusage` is plain data; all-zeros is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; RUSAGE_THREAD is valid on Linux.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Sends at `rate` msg/s for `duration` (absolute schedule, sleeping between sends; each
/// message is stamped when actually sent). Returns how many were refused (ring full).
fn pace(r: &mut Running, rate: u64, duration: Duration) -> u64 {
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let start = Instant::now();
    let mut next = start;
    let mut refused = 0;
    let mut seq = r.sent;
    while next.duration_since(start) < duration {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        let msg = Order {
            hops: Hops::starting_at(now_raw()),
            seq,
            payload: [seq; 14],
        };
        match r.src.try_push(msg) {
            Ok(()) => r.sent += 1,
            Err(Full(_)) => refused += 1,
        }
        seq += 1;
        next += period;
    }
    refused
}

fn wait_drained(r: &Running) {
    let start = Instant::now();
    while r.done.load(Ordering::Acquire) < r.sent && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

struct Outcome {
    layout: Layout,
    wait: WaitKind,
    seconds: f64,
    e2e: Histogram<u64>,
    refused: u64,
    cpu_cores: f64,
    per_stage: Vec<(String, pipeline::Percentiles)>,
}

fn run(layout: Layout, wait: WaitKind, budget: &CoreBudget, rate: u64, seconds: f64) -> Outcome {
    let mut r = build(layout, wait, budget);
    // Warm-up, then forget what it recorded.
    pace(&mut r, rate, Duration::from_millis(300));
    wait_drained(&r);
    let _ = r.pipeline.latency().snapshot();
    let (cpu0, gen0, t0) = (process_cpu_time(), thread_cpu_time(), Instant::now());
    let refused = pace(&mut r, rate, Duration::from_secs_f64(seconds));
    wait_drained(&r);
    let (cpu1, gen1, wall) = (process_cpu_time(), thread_cpu_time(), t0.elapsed());
    let snaps = r.pipeline.latency().snapshot();
    let pipeline_cpu = (cpu1 - cpu0).saturating_sub(gen1 - gen0);
    let e2e = snaps
        .iter()
        .find(|s| s.name == "e2e")
        .map(|s| s.interval.clone())
        .expect("e2e");
    let mut hist = crate::ns_histogram();
    let _ = hist.add(&e2e);
    let per_stage = snaps
        .iter()
        .filter(|s| s.name != "e2e")
        .map(|s| (s.name.clone(), s.interval_percentiles()))
        .collect();
    r.pipeline.shutdown().expect("clean shutdown");
    Outcome {
        layout,
        wait,
        seconds,
        e2e: hist,
        refused,
        cpu_cores: pipeline_cpu.as_secs_f64() / wall.as_secs_f64(),
        per_stage,
    }
}

/// CPU used by an idle pipeline of the default layout, in % of one core.
fn idle_cpu(layout: Layout, wait: WaitKind, budget: &CoreBudget, seconds: f64) -> f64 {
    let mut r = build(layout, wait, budget);
    pace(&mut r, 10_000, Duration::from_millis(200));
    wait_drained(&r);
    std::thread::sleep(Duration::from_millis(500));
    let (c0, t0) = (process_cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (c1, wall) = (process_cpu_time(), t0.elapsed());
    r.pipeline.shutdown().expect("clean shutdown");
    100.0 * (c1 - c0).as_secs_f64() / wall.as_secs_f64()
}

/// Reads `--name value` from the command line.
pub fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs every layout and wait strategy at `rate` msg/s for `seconds` each, measures the idle
/// CPU of the default layout, prints a summary and writes the report.
pub fn run_all(rate: u64, seconds: f64) {
    tight_timer_slack();
    let budget = CoreBudget::detect();
    let default_layout = if budget.should_fuse(5) {
        Layout::Fused
    } else {
        Layout::PerStage { pinned: true }
    };
    let default_wait = budget.default_wait(default_layout.threads());
    let per_stage_pinned = budget.core_ids().len() > 5;
    let per_stage = Layout::PerStage {
        pinned: per_stage_pinned,
    };
    println!(
        "cores usable {}, default layout: {} with {}",
        budget.usable_cores(),
        default_layout.name(),
        default_wait
    );

    let mut outcomes = Vec::new();
    for layout in [Layout::Fused, per_stage] {
        for wait in [
            WaitKind::SpinYieldPark,
            WaitKind::SpinThenYield,
            WaitKind::BusySpin,
        ] {
            // Busy-spinning threads that share cores only give a core up at the timer tick:
            // run that case briefly and report it as what it is.
            let oversubscribed = layout.threads() + 1 > budget.usable_cores();
            let secs = if wait == WaitKind::BusySpin && oversubscribed {
                seconds.min(1.0)
            } else {
                seconds
            };
            let o = run(layout, wait, &budget, rate, secs);
            println!(
                "{:<45} {:<16} p50 {:>9} p99 {:>9} p99.9 {:>9} max {:>9} cpu {:.2} cores{}",
                layout.name(),
                wait.as_str(),
                fmt_ns(o.e2e.value_at_quantile(0.5)),
                fmt_ns(o.e2e.value_at_quantile(0.99)),
                fmt_ns(o.e2e.value_at_quantile(0.999)),
                fmt_ns(o.e2e.max()),
                o.cpu_cores,
                if o.refused > 0 {
                    format!(" refused {}", o.refused)
                } else {
                    String::new()
                }
            );
            outcomes.push(o);
        }
    }
    let idle = idle_cpu(default_layout, default_wait, &budget, 3.0);
    println!(
        "idle CPU, default layout ({} / {}): {:.2}% of one core",
        default_layout.name(),
        default_wait,
        idle
    );

    // Report.
    let dir = reports_root().join(format!("{}-pipeline", today()));
    std::fs::create_dir_all(&dir).expect("create report dir");
    let mut md = String::new();
    let _ = writeln!(md, "# Five-stage pipeline latency ({})\n", today());
    let _ = writeln!(md, "{}", machine_description());
    let _ = writeln!(
        md,
        "Load: one generator thread, {rate} msg/s paced on an absolute schedule (sleeping between sends), \
         each message stamped when sent; 256-byte-class messages (`Order`, {} bytes); five CPU-bound stages \
         (a few tens of ns each). End to end = origin stamp → last stage. Warm-up 0.3 s, then {seconds} s \
         measured (busy-spin on shared cores: 1 s). CPU = process CPU time minus the generator thread's, \
         over wall time, in cores.\n",
        std::mem::size_of::<Order>()
    );
    let _ = writeln!(
        md,
        "Default layout here: **{}** with **{}** (CoreBudget: {} usable cores; `should_fuse(5)` = {}, `default_wait({})` = {}).\n",
        default_layout.name(),
        default_wait,
        budget.usable_cores(),
        budget.should_fuse(5),
        default_layout.threads(),
        default_wait
    );
    let _ = writeln!(
        md,
        "| core map | wait | measured | msgs | e2e p50 | p90 | p99 | p99.9 | max | CPU (cores) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for o in &outcomes {
        let default = o.layout == default_layout && o.wait == default_wait;
        let _ = writeln!(
            md,
            "| {}{} | {} | {:.1} s | {} | {} | {} | {} | {} | {} | {:.2} |",
            o.layout.name(),
            if default { " **(default)**" } else { "" },
            o.wait,
            o.seconds,
            o.e2e.len(),
            fmt_ns(o.e2e.value_at_quantile(0.5)),
            fmt_ns(o.e2e.value_at_quantile(0.9)),
            fmt_ns(o.e2e.value_at_quantile(0.99)),
            fmt_ns(o.e2e.value_at_quantile(0.999)),
            fmt_ns(o.e2e.max()),
            o.cpu_cores
        );
        let file = dir.join(format!("{}-{}.hgrm", o.layout.slug(), o.wait.as_str()));
        let _ = std::fs::write(file, hgrm(&o.e2e));
    }
    let default_run = outcomes
        .iter()
        .find(|o| o.layout == default_layout && o.wait == default_wait);
    if let Some(o) = default_run {
        let p99 = o.e2e.value_at_quantile(0.99);
        let _ = writeln!(
            md,
            "\nTargets (2-core machine, default layout): e2e p99 < 20 µs at {rate} msg/s: **{}** ({}); idle CPU < 5 % of a core: **{}** ({idle:.2} %, measured over 3 s idle after the threads parked).\n",
            if p99 < 20_000 { "met" } else { "missed" },
            fmt_ns(p99),
            if idle < 5.0 { "met" } else { "missed" },
        );
        let _ = writeln!(
            md,
            "Per-stage latency in the default run (interval histograms of the stage recorders):\n"
        );
        let _ = writeln!(md, "| recorder | count | p50 | p99 | p99.9 |");
        let _ = writeln!(md, "|---|---|---|---|---|");
        for (name, p) in &o.per_stage {
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} |",
                p.count,
                fmt_ns(p.p50_ns),
                fmt_ns(p.p99_ns),
                fmt_ns(p.p999_ns)
            );
        }
    }
    let _ = writeln!(
        md,
        "\n`.hgrm` files: HdrHistogram percentile distributions of the end-to-end latency (values in µs), one per row.\n\n\
         Command: `cargo bench -p benches --bench pipeline` (or `cargo run -p benches --release --bin pipeline-latency`)."
    );
    std::fs::write(dir.join("README.md"), md).expect("write report");
    println!("report written to {}", dir.display());
}
