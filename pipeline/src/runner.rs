//! The stage runner: threads (named, optionally pinned), the stage loop, back-pressure,
//! graceful shutdown, panic reporting, and the core budget that picks default layouts.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::clock::{now_raw, ticks_to_ns};
use crate::latency::LatencyRegistry;
use crate::message::Message;
use crate::ring::{
    Full, ManyToOneConsumer, ManyToOneProducer, OneToOneConsumer, OneToOneProducer, Signal, Waker,
};
use crate::stage::{Emit, Stage, StageMeter, current_stage};
use crate::wait::{Idle, WaitKind};

/// How many messages a stage takes off its input ring per batch.
pub const BATCH: usize = 32;

/// How long a stage that was asked to stop keeps waiting for space in a full output ring
/// before it drops the message (so shutdown can never hang on a consumer that stopped reading).
pub const SHUTDOWN_STALL_LIMIT: Duration = Duration::from_secs(1);

/// A stage thread's input.
#[derive(Debug)]
pub enum Input<T> {
    /// From one producer.
    OneToOne(OneToOneConsumer<T>),
    /// From several producers.
    ManyToOne(ManyToOneConsumer<T>),
}

impl<T: Copy + Send> Input<T> {
    /// Pops up to `max` values into `f`.
    #[inline]
    pub fn pop_batch(&mut self, max: usize, f: impl FnMut(T)) -> usize {
        match self {
            Input::OneToOne(c) => c.pop_batch(max, f),
            Input::ManyToOne(c) => c.pop_batch(max, f),
        }
    }

    /// Whether nothing is ready.
    #[inline]
    pub fn is_empty(&self) -> bool {
        match self {
            Input::OneToOne(c) => c.is_empty(),
            Input::ManyToOne(c) => c.is_empty(),
        }
    }

    /// The ring's signal.
    pub fn signal(&self) -> &Arc<Signal> {
        match self {
            Input::OneToOne(c) => c.signal(),
            Input::ManyToOne(c) => c.signal(),
        }
    }
}

impl<T> From<OneToOneConsumer<T>> for Input<T> {
    fn from(c: OneToOneConsumer<T>) -> Self {
        Input::OneToOne(c)
    }
}

impl<T> From<ManyToOneConsumer<T>> for Input<T> {
    fn from(c: ManyToOneConsumer<T>) -> Self {
        Input::ManyToOne(c)
    }
}

/// A stage thread's output.
///
/// Emitting into a full ring inside the pipeline waits (spin, then yield) until there is space,
/// checking the failure flag, whether the consumer is gone, and (once stopping) a time limit, so
/// it never hangs forever; each such stall is counted ([`ThreadStats::stalls`]). Only the
/// pipeline's edge (the engine's intake) uses `try_push` and reports overload.
#[derive(Debug)]
pub enum Output<T> {
    /// Into a single-producer ring.
    OneToOne(OneToOneProducer<T>),
    /// Into a single-producer ring without waking its consumer: for a consumer that is
    /// woken by its own readiness source (an I/O stage's socket) and drains this ring on
    /// every wake, and that does not need each message promptly. Saves the wake-up, and on
    /// shared cores the preemption of this thread by the woken one. If the ring is full,
    /// the consumer is woken.
    OneToOneLazy(OneToOneProducer<T>),
    /// Into a ring shared with other producers.
    ManyToOne(ManyToOneProducer<T>),
    /// Dropped (terminal stages).
    Discard,
}

impl<T> From<OneToOneProducer<T>> for Output<T> {
    fn from(p: OneToOneProducer<T>) -> Self {
        Output::OneToOne(p)
    }
}

impl<T> From<ManyToOneProducer<T>> for Output<T> {
    fn from(p: ManyToOneProducer<T>) -> Self {
        Output::ManyToOne(p)
    }
}

/// One stage thread's configuration.
#[derive(Clone, Debug)]
pub struct ThreadConfig {
    /// Thread name (Linux shows the first 15 bytes).
    pub name: String,
    /// Core to pin to, if any (must be one of [`CoreBudget::core_ids`]).
    pub core: Option<usize>,
    /// How the thread waits when idle.
    pub wait: WaitKind,
}

impl ThreadConfig {
    /// An unpinned thread.
    pub fn new(name: impl Into<String>, wait: WaitKind) -> Self {
        Self {
            name: name.into(),
            core: None,
            wait,
        }
    }

    /// An unpinned thread with the wait strategy `budget` picks for a layout of
    /// `threads_wanting_cores` stage threads ([`CoreBudget::default_wait`]).
    pub fn with_default_wait(
        name: impl Into<String>,
        budget: &CoreBudget,
        threads_wanting_cores: usize,
    ) -> Self {
        Self::new(name, budget.default_wait(threads_wanting_cores))
    }

    /// Pinned to `core`.
    pub fn pinned(mut self, core: usize) -> Self {
        self.core = Some(core);
        self
    }
}

/// What is wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The core is not in this process's affinity mask.
    #[error("thread {thread}: core {core} is not usable (usable: {usable:?})")]
    CoreUnavailable {
        /// Thread name.
        thread: String,
        /// Requested core.
        core: usize,
        /// Cores this process may use.
        usable: Vec<usize>,
    },
    /// Thread names must not be empty.
    #[error("thread name is empty")]
    EmptyName,
}

/// Errors of the pipeline runner.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PipelineError {
    /// A stage panicked; every stage thread was stopped.
    #[error("stage {stage} panicked: {message}")]
    StagePanicked {
        /// The stage that panicked (the inner stage, inside a fused chain).
        stage: String,
        /// The panic message.
        message: String,
    },
    /// The OS refused a thread.
    #[error("could not spawn thread {thread}: {source}")]
    Spawn {
        /// Thread name.
        thread: String,
        /// The OS error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The configuration cannot be run.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// Pinning a thread to its core failed.
    #[error("could not pin thread {thread} to core {core}")]
    PinFailed {
        /// Thread name.
        thread: String,
        /// Requested core.
        core: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// Core budget
// ---------------------------------------------------------------------------------------------

/// The cores this process may really use: its affinity mask (that of the main thread, so a
/// pinned caller does not narrow it), limited by its cgroup CPU quota
/// (v2 `cpu.max` along the cgroup path, or v1 `cpu.cfs_quota_us`), not `nproc`.
#[derive(Clone, Debug, PartialEq)]
pub struct CoreBudget {
    /// Invariant: sorted, non-empty.
    core_ids: Vec<usize>,
    /// CPU quota in cores, if a cgroup sets one.
    quota_cores: Option<f64>,
    /// Invariant: `1 <= usable <= core_ids.len()`.
    usable: usize,
}

impl CoreBudget {
    /// Cores kept free of spinning threads when choosing [`WaitKind::BusySpin`]: one for the OS
    /// and interrupts, one for the process's other threads (I/O runtime, reporter).
    pub const RESERVED_CORES: usize = 2;

    /// Detects the affinity mask and the cgroup quota.
    pub fn detect() -> CoreBudget {
        let ids = affinity_cores();
        Self::from_parts(ids, cgroup_quota_cores())
    }

    /// A budget from known parts (tests, or a config override).
    pub fn from_parts(mut core_ids: Vec<usize>, quota_cores: Option<f64>) -> CoreBudget {
        core_ids.sort_unstable();
        core_ids.dedup();
        if core_ids.is_empty() {
            core_ids.push(0);
        }
        let mut usable = core_ids.len();
        if let Some(q) = quota_cores.filter(|q| q.is_finite() && *q > 0.0) {
            usable = usable.min(q.ceil() as usize);
        }
        let usable = usable.max(1);
        debug_assert!(usable <= core_ids.len());
        CoreBudget {
            core_ids,
            quota_cores,
            usable,
        }
    }

    /// How many cores' worth of CPU this process may use.
    pub fn usable_cores(&self) -> usize {
        self.usable
    }

    /// The cores in the affinity mask (threads may be pinned to these).
    pub fn core_ids(&self) -> &[usize] {
        &self.core_ids
    }

    /// The cgroup quota in cores, if any.
    pub fn quota_cores(&self) -> Option<f64> {
        self.quota_cores
    }

    /// Default wait strategy for `threads_wanting_cores` stage threads.
    ///
    /// [`WaitKind::BusySpin`] only if every such thread gets a core to itself and
    /// [`Self::RESERVED_CORES`] are still left for the OS and the process's other threads
    /// (measured on 2 cores: busy-spinning threads that share cores give 20 ms p50, because a
    /// spinning thread gives its core up only at the timer tick). Otherwise
    /// [`WaitKind::SpinYieldPark`]: under load its spin/yield phase keeps the latency of
    /// spin-then-yield (11 µs p50 measured with 6 threads on 2 cores) while an idle pipeline
    /// parks and costs next to no CPU; spin-then-yield alone would keep every core at 100 %
    /// forever, even idle.
    pub fn default_wait(&self, threads_wanting_cores: usize) -> WaitKind {
        if threads_wanting_cores + Self::RESERVED_CORES <= self.usable {
            WaitKind::BusySpin
        } else {
            WaitKind::SpinYieldPark
        }
    }

    /// Whether `stages` CPU-bound stages should run fused on one thread: when there are fewer
    /// usable cores than stages (measured: 5 fused stages hop end to end in ~60 ns p50, while
    /// threads that share cores pay µs to ms per hop).
    pub fn should_fuse(&self, stages: usize) -> bool {
        stages > self.usable
    }
}

#[cfg(target_os = "linux")]
fn affinity_cores() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is a plain bit array for which all-zeros is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: we pass the size of `set` and a valid pointer to it; pid 0 is this thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return fallback_cores();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i < CPU_SETSIZE`, the number of bits in `set`.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

#[cfg(not(target_os = "linux"))]
fn affinity_cores() -> Vec<usize> {
    fallback_cores()
}

fn fallback_cores() -> Vec<usize> {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => ids.into_iter().map(|c| c.id).collect(),
        _ => (0..thread::available_parallelism().map_or(1, usize::from)).collect(),
    }
}

/// The tightest CPU quota (in cores) on this process's cgroup path, v2 or v1.
fn cgroup_quota_cores() -> Option<f64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut best: Option<f64> = None;
    let mut consider = |q: Option<f64>| {
        if let Some(q) = q {
            best = Some(best.map_or(q, |b| b.min(q)));
        }
    };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            // cgroup v2: cpu.max on the path and every ancestor.
            for dir in ancestors("/sys/fs/cgroup", path) {
                consider(read_cpu_max(&format!("{dir}/cpu.max")));
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            for root in ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"] {
                for dir in ancestors(root, path) {
                    consider(read_cfs_quota(&dir));
                }
            }
        }
    }
    best
}

/// `root + path`, then each parent up to `root`.
fn ancestors(root: &str, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut p = path.trim_end_matches('/').to_owned();
    loop {
        out.push(format!("{root}{p}"));
        match p.rfind('/') {
            Some(i) if !p.is_empty() => p.truncate(i),
            _ => break,
        }
    }
    out
}

/// Parses cgroup v2 `cpu.max` ("max 100000" or "150000 100000").
fn read_cpu_max(file: &str) -> Option<f64> {
    parse_cpu_max(&std::fs::read_to_string(file).ok()?)
}

fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota = it.next()?;
    let period: f64 = it.next()?.parse().ok()?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    Some(quota.parse::<f64>().ok()? / period)
}

fn read_cfs_quota(dir: &str) -> Option<f64> {
    let quota: f64 = std::fs::read_to_string(format!("{dir}/cpu.cfs_quota_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let period: f64 = std::fs::read_to_string(format!("{dir}/cpu.cfs_period_us"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

// ---------------------------------------------------------------------------------------------
// Control, stats
// ---------------------------------------------------------------------------------------------

/// Shared by every thread of one pipeline.
struct Control {
    /// Set once any stage failed; every thread then stops without draining.
    failed: AtomicBool,
    /// The first failure.
    failure: Mutex<Option<PipelineError>>,
    /// Set by `start`; threads wait for it before their loop.
    started: AtomicBool,
    /// Every stage thread's input signal, to wake them all on failure.
    signals: Mutex<Vec<Arc<Signal>>>,
}

impl Control {
    #[inline]
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    fn fail(&self, error: PipelineError) {
        {
            let mut first = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
            if first.is_none() {
                *first = Some(error);
            }
        }
        self.failed.store(true, Ordering::SeqCst);
        let signals = self.signals.lock().unwrap_or_else(PoisonError::into_inner);
        for s in signals.iter() {
            s.wake();
        }
    }
}

/// Counters of one stage thread (single writer: that thread).
#[derive(Debug, Default)]
struct Counters {
    stalls: AtomicU64,
    dropped: AtomicU64,
    messages: AtomicU64,
}

impl Counters {
    #[inline]
    fn bump(counter: &AtomicU64, n: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
}

/// What one stage thread has counted so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadStats {
    /// Thread name.
    pub name: String,
    /// Messages taken off its input ring.
    pub messages: u64,
    /// Times an emit found the output ring full and had to wait.
    pub stalls: u64,
    /// Messages dropped because the pipeline failed, the consumer was gone, or the shutdown
    /// stall limit passed while the output stayed full.
    pub dropped: u64,
}

/// Per-thread handle kept by the builder / pipeline.
struct ThreadHandle {
    name: String,
    stop: Arc<AtomicBool>,
    signal: Arc<Signal>,
    counters: Arc<Counters>,
    join: Option<JoinHandle<()>>,
}

// ---------------------------------------------------------------------------------------------
// The stage loop
// ---------------------------------------------------------------------------------------------

/// The runner's emitter into the thread's output ring.
struct OutputEmit<'a, T> {
    output: &'a mut Output<T>,
    ctl: &'a Control,
    stop: &'a AtomicBool,
    counters: &'a Counters,
}

impl<T: Copy + Send> OutputEmit<'_, T> {
    /// The slow path: wait for space.
    #[cold]
    fn stall(&mut self, mut value: T) {
        Counters::bump(&self.counters.stalls, 1);
        let mut spins = 0u32;
        let mut stop_seen: Option<Instant> = None;
        loop {
            if spins < 64 {
                spins += 1;
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
            let gone = match &*self.output {
                Output::OneToOne(p) => p.is_consumer_gone(),
                Output::OneToOneLazy(p) => {
                    p.signal().notify();
                    p.is_consumer_gone()
                }
                Output::ManyToOne(p) => p.is_consumer_gone(),
                Output::Discard => true,
            };
            let give_up = self.ctl.failed()
                || gone
                || (self.stop.load(Ordering::Relaxed)
                    && stop_seen.get_or_insert_with(Instant::now).elapsed() > SHUTDOWN_STALL_LIMIT);
            if give_up {
                Counters::bump(&self.counters.dropped, 1);
                return;
            }
            let pushed = match self.output {
                Output::OneToOne(p) => p.try_push(value),
                Output::OneToOneLazy(p) => p.try_push_quiet(value),
                Output::ManyToOne(p) => p.try_push(value),
                Output::Discard => Ok(()),
            };
            match pushed {
                Ok(()) => return,
                Err(Full(v)) => value = v,
            }
        }
    }
}

impl<T: Copy + Send> Emit<T> for OutputEmit<'_, T> {
    #[inline]
    fn emit(&mut self, msg: T) {
        let pushed = match self.output {
            Output::OneToOne(p) => p.try_push(msg),
            Output::OneToOneLazy(p) => p.try_push_quiet(msg),
            Output::ManyToOne(p) => p.try_push(msg),
            Output::Discard => Ok(()),
        };
        if let Err(Full(v)) = pushed {
            self.stall(v);
        }
    }
}

/// What the wait strategy sees while the stage thread is idle.
struct RunnerIdle<'a, S: Stage> {
    input: &'a Input<S::In>,
    stage: &'a mut S,
    stop: &'a AtomicBool,
    ctl: &'a Control,
}

impl<S: Stage> Idle for RunnerIdle<'_, S> {
    #[inline]
    fn ready(&mut self) -> bool {
        !self.input.is_empty()
            || self.stop.load(Ordering::Relaxed)
            || self.ctl.failed()
            || self.stage.extra_ready()
    }

    fn park(&mut self, timeout: Option<Duration>) {
        self.stage.park(timeout);
    }
}

/// Everything one stage thread owns.
struct StageThread<S: Stage> {
    stage: S,
    input: Input<S::In>,
    output: Output<S::Out>,
    meters: Vec<StageMeter>,
    cfg: ThreadConfig,
    ctl: Arc<Control>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl<S: Stage> StageThread<S> {
    /// Takes up to one batch off the input and runs it. Returns how many.
    #[inline]
    fn run_batch(&mut self) -> usize {
        let Self {
            stage,
            input,
            output,
            meters,
            ctl,
            stop,
            counters,
            ..
        } = self;
        let mut emit = OutputEmit {
            output,
            ctl,
            stop,
            counters,
        };
        let n = input.pop_batch(BATCH, |msg| {
            let t_in = now_raw();
            if let (Some(prev), Some(meter)) = (msg.hops().last(), meters.first_mut()) {
                meter.queue_wait.record(ticks_to_ns(prev, t_in));
            }
            stage.process(msg, t_in, meters, &mut emit);
        });
        if n > 0 {
            Counters::bump(&counters.messages, n as u64);
        }
        n
    }

    fn run_extra(&mut self) -> usize {
        let Self {
            stage,
            output,
            meters,
            ctl,
            stop,
            counters,
            ..
        } = self;
        let mut emit = OutputEmit {
            output,
            ctl,
            stop,
            counters,
        };
        stage.process_extra(meters, &mut emit)
    }

    fn run(mut self) {
        if let Some(core) = self.cfg.core
            && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
        {
            self.ctl.fail(PipelineError::PinFailed {
                thread: self.cfg.name.clone(),
                core,
            });
            return;
        }
        let signal = Arc::clone(self.input.signal());
        self.stage.on_start(&signal);
        if !signal.has_waker() {
            signal.set_waker(Waker::Thread(thread::current()));
        }
        while !self.ctl.started.load(Ordering::Acquire) && !self.ctl.failed() {
            thread::park_timeout(Duration::from_millis(1));
        }
        let mut wait = self.cfg.wait.build();
        loop {
            if self.ctl.failed() {
                return;
            }
            if self.stop.load(Ordering::Acquire) {
                // Graceful: upstream threads have exited; drain what is left, then finish.
                while self.run_batch() > 0 {
                    if self.ctl.failed() {
                        return;
                    }
                }
                let Self {
                    stage,
                    output,
                    meters,
                    ctl,
                    stop,
                    counters,
                    ..
                } = &mut self;
                let mut emit = OutputEmit {
                    output,
                    ctl,
                    stop,
                    counters,
                };
                stage.process_shutdown(meters, &mut emit);
                return;
            }
            let work = self.run_batch() + self.run_extra();
            if work > 0 {
                wait.reset();
                continue;
            }
            let mut idle = RunnerIdle {
                input: &self.input,
                stage: &mut self.stage,
                stop: &self.stop,
                ctl: &self.ctl,
            };
            wait.idle(&signal, &mut idle);
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Builder and pipeline
// ---------------------------------------------------------------------------------------------

/// Assembles a pipeline: one thread per [`spawn`](Self::spawn), started together by
/// [`start`](Self::start). Dropping the builder without starting stops and joins the threads.
pub struct PipelineBuilder {
    registry: LatencyRegistry,
    ctl: Arc<Control>,
    threads: Vec<ThreadHandle>,
    budget: CoreBudget,
}

impl Default for PipelineBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PipelineBuilder {
    /// An empty pipeline (detects the [`CoreBudget`] and calibrates the clock).
    pub fn new() -> Self {
        Self::with_core_budget(CoreBudget::detect())
    }

    /// An empty pipeline on a budget detected earlier: for a process that confined its
    /// threads to part of its mask ([`crate::coremap`]) after detecting it, so that a
    /// thread may still be pinned to the core kept apart. Calibrates the clock.
    pub fn with_core_budget(budget: CoreBudget) -> Self {
        let _ = crate::clock::clock();
        Self {
            registry: LatencyRegistry::new(),
            ctl: Arc::new(Control {
                failed: AtomicBool::new(false),
                failure: Mutex::new(None),
                started: AtomicBool::new(false),
                signals: Mutex::new(Vec::new()),
            }),
            threads: Vec::new(),
            budget,
        }
    }

    /// The latency registry (to create extra named recorders before start).
    pub fn latency(&self) -> &LatencyRegistry {
        &self.registry
    }

    /// The cores this pipeline may use.
    pub fn core_budget(&self) -> &CoreBudget {
        &self.budget
    }

    /// Spawns the stage's thread right away. It registers `"<stage>.queue_wait"` and
    /// `"<stage>.service"` recorders for the stage (each inner stage of a fused chain), calls
    /// `on_start`, then waits for [`start`](Self::start) and runs the stage loop: pop a batch,
    /// record queue wait and service time, call `on_message`, emit (stamped); `poll_extra`;
    /// when there is no work, one step of the wait strategy.
    pub fn spawn<S: Stage>(
        &mut self,
        cfg: ThreadConfig,
        input: Input<S::In>,
        stage: S,
        output: Output<S::Out>,
    ) -> Result<(), PipelineError> {
        if cfg.name.is_empty() {
            return Err(ConfigError::EmptyName.into());
        }
        if let Some(core) = cfg.core
            && !self.budget.core_ids().contains(&core)
        {
            return Err(ConfigError::CoreUnavailable {
                thread: cfg.name.clone(),
                core,
                usable: self.budget.core_ids().to_vec(),
            }
            .into());
        }
        let mut meters = Vec::with_capacity(stage.depth());
        stage.for_each_name(&mut |name| {
            meters.push(StageMeter {
                queue_wait: self.registry.recorder(&format!("{name}.queue_wait")),
                service: self.registry.recorder(&format!("{name}.service")),
            });
        });
        let signal = Arc::clone(input.signal());
        self.ctl
            .signals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&signal));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let fallback_name = stage.name();
        let worker = StageThread {
            stage,
            input,
            output,
            meters,
            cfg: cfg.clone(),
            ctl: Arc::clone(&self.ctl),
            stop: Arc::clone(&stop),
            counters: Arc::clone(&counters),
        };
        let ctl = Arc::clone(&self.ctl);
        let join = thread::Builder::new()
            .name(cfg.name.clone())
            .spawn(move || {
                if let Err(payload) = catch_unwind(AssertUnwindSafe(|| worker.run())) {
                    let stage = match current_stage() {
                        "" => fallback_name,
                        s => s,
                    };
                    ctl.fail(PipelineError::StagePanicked {
                        stage: stage.to_owned(),
                        message: panic_message(&*payload),
                    });
                }
            })
            .map_err(|e| PipelineError::Spawn {
                thread: cfg.name.clone(),
                source: Arc::new(e),
            })?;
        self.threads.push(ThreadHandle {
            name: cfg.name,
            stop,
            signal,
            counters,
            join: Some(join),
        });
        Ok(())
    }

    /// Lets every spawned thread enter its loop.
    pub fn start(mut self) -> Pipeline {
        self.ctl.started.store(true, Ordering::Release);
        for t in &self.threads {
            if let Some(j) = &t.join {
                j.thread().unpark();
            }
        }
        Pipeline {
            registry: self.registry.clone(),
            ctl: Arc::clone(&self.ctl),
            threads: std::mem::take(&mut self.threads),
            joined: false,
        }
    }
}

impl Drop for PipelineBuilder {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        for t in &self.threads {
            t.stop.store(true, Ordering::SeqCst);
        }
        self.ctl.started.store(true, Ordering::Release);
        let _ = stop_and_join(&self.ctl, &mut self.threads);
    }
}

impl std::fmt::Debug for PipelineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineBuilder")
            .field(
                "threads",
                &self.threads.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
            .field("budget", &self.budget)
            .finish()
    }
}

/// Stops the threads in spawn order (each drains its input, runs `on_shutdown`, exits) and
/// joins them. Returns the first failure.
fn stop_and_join(ctl: &Control, threads: &mut [ThreadHandle]) -> Result<(), PipelineError> {
    for t in threads.iter_mut() {
        t.stop.store(true, Ordering::SeqCst);
        t.signal.wake();
        if let Some(j) = &t.join {
            j.thread().unpark();
        }
        if let Some(join) = t.join.take()
            && let Err(payload) = join.join()
        {
            ctl.fail(PipelineError::StagePanicked {
                stage: t.name.clone(),
                message: panic_message(&*payload),
            });
        }
    }
    match ctl
        .failure
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A running pipeline. Dropping it shuts it down (gracefully) too.
pub struct Pipeline {
    registry: LatencyRegistry,
    ctl: Arc<Control>,
    threads: Vec<ThreadHandle>,
    joined: bool,
}

impl Pipeline {
    /// The latency registry: snapshot it from a reporter thread.
    pub fn latency(&self) -> &LatencyRegistry {
        &self.registry
    }

    /// `Some(StagePanicked {..})` once any stage panicked (all stages then stop).
    pub fn failure(&self) -> Option<PipelineError> {
        if !self.ctl.failed() {
            return None;
        }
        self.ctl
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Neither failed nor shut down.
    pub fn is_running(&self) -> bool {
        !self.joined && !self.ctl.failed()
    }

    /// Per-thread counters (messages, stalls on a full output, drops).
    pub fn stats(&self) -> Vec<ThreadStats> {
        self.threads
            .iter()
            .map(|t| ThreadStats {
                name: t.name.clone(),
                messages: t.counters.messages.load(Ordering::Relaxed),
                stalls: t.counters.stalls.load(Ordering::Relaxed),
                dropped: t.counters.dropped.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Graceful: stops threads in spawn order (upstream first); each drains its input ring
    /// completely, calls `on_shutdown`, exits; joins all. Returns the first failure if a stage
    /// panicked.
    pub fn shutdown(mut self) -> Result<(), PipelineError> {
        self.joined = true;
        stop_and_join(&self.ctl, &mut self.threads)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if !self.joined {
            let _ = stop_and_join(&self.ctl, &mut self.threads);
        }
    }
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field(
                "threads",
                &self.threads.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
            .field("running", &self.is_running())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_parsing() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(ancestors("/r", "/a/b"), vec!["/r/a/b", "/r/a", "/r"]);
        assert_eq!(ancestors("/r", "/"), vec!["/r"]);
    }

    #[test]
    fn budget_rules() {
        let two = CoreBudget::from_parts(vec![1, 0], None);
        assert_eq!(two.core_ids(), &[0, 1]);
        assert_eq!(two.default_wait(1), WaitKind::SpinYieldPark);
        assert!(two.should_fuse(5));
        let quota = CoreBudget::from_parts((0..16).collect(), Some(1.5));
        assert_eq!(quota.usable_cores(), 2);
        let big = CoreBudget::from_parts((0..16).collect(), None);
        assert_eq!(big.default_wait(6), WaitKind::BusySpin);
        assert!(!big.should_fuse(6));
        let detected = CoreBudget::detect();
        assert!(detected.usable_cores() >= 1);
    }
}
