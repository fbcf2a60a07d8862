//! The steady-state hot path allocates nothing: ring push/pop (single and batch), latency
//! recording, a fused stage call chain, and the runner's pop → stage → emit → ring path.
//!
//! One test only, so no other test thread allocates while we count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pipeline::{
    Emit, Full, Hops, LatencyRegistry, Message, NoMessage, Output, PipelineBuilder, Stage,
    StageMeter, ThreadConfig, WaitKind, fuse, many_to_one, now_raw, one_to_one,
};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.load(Ordering::SeqCst)
}

#[derive(Clone, Copy, Debug, Default)]
struct Msg {
    hops: Hops,
    payload: [u64; 4],
}

impl Message for Msg {
    fn hops(&self) -> &Hops {
        &self.hops
    }
    fn hops_mut(&mut self) -> &mut Hops {
        &mut self.hops
    }
}

struct Add(&'static str);

impl Stage for Add {
    type In = Msg;
    type Out = Msg;
    fn name(&self) -> &'static str {
        self.0
    }
    fn on_message<E: Emit<Msg>>(&mut self, mut msg: Msg, out: &mut E) {
        msg.payload[0] += 1;
        out.emit(msg);
    }
}

struct Count(Arc<AtomicUsize>);

impl Stage for Count {
    type In = Msg;
    type Out = NoMessage;
    fn name(&self) -> &'static str {
        "count"
    }
    fn on_message<E: Emit<NoMessage>>(&mut self, msg: Msg, _out: &mut E) {
        assert!(msg.payload[0] > 0);
        self.0.fetch_add(1, Ordering::Release);
    }
}

struct Sum(u64);

impl Emit<Msg> for Sum {
    fn emit(&mut self, msg: Msg) {
        self.0 += msg.payload[0];
    }
}

const N: usize = 100_000;

#[test]
fn steady_state_hot_path_allocates_nothing() {
    // The counter sees allocations at all.
    let before = allocations();
    let probe = std::hint::black_box(Box::new(1u64));
    assert!(allocations() > before);
    drop(probe);

    // --- rings and recorders, one thread ---
    let registry = LatencyRegistry::new();
    let mut rec = registry.recorder("x.service");
    let (mut p, mut c) = one_to_one::<Msg>(64);
    let (mp, mut mc) = many_to_one::<Msg>(64);
    let batch = [Msg::default(); 8];
    let _ = now_raw();
    let before = allocations();
    let mut popped = 0usize;
    for i in 0..N {
        let t = now_raw();
        p.try_push(Msg::default()).unwrap();
        assert_eq!(p.try_push_batch(&batch), 8);
        popped += c.pop_batch(16, |m| rec.record(m.payload[0]));
        mp.try_push(Msg::default()).unwrap();
        popped += usize::from(mc.pop().is_some());
        rec.record(pipeline::ticks_to_ns(t, now_raw()) + i as u64);
    }
    assert_eq!(popped, N * 10);
    assert_eq!(allocations() - before, 0, "ring push/pop/record allocated");

    // --- a fused chain called directly, with its recorders ---
    let mut chain = fuse(fuse(Add("a"), Add("b")), Add("c"));
    let mut meters: Vec<StageMeter> = ["a", "b", "c"]
        .iter()
        .map(|n| StageMeter {
            queue_wait: registry.recorder(&format!("{n}.queue_wait")),
            service: registry.recorder(&format!("{n}.service")),
        })
        .collect();
    let mut sum = Sum(0);
    let before = allocations();
    for _ in 0..N {
        let mut m = Msg::default();
        m.hops.stamp(now_raw());
        chain.process(m, now_raw(), &mut meters, &mut sum);
    }
    assert_eq!(sum.0, 3 * N as u64);
    assert_eq!(allocations() - before, 0, "fused stage path allocated");

    // --- the runner: two threads, rings in between ---
    let count = Arc::new(AtomicUsize::new(0));
    let (mut src, input) = one_to_one::<Msg>(1024);
    let (mid_out, mid_in) = one_to_one::<Msg>(256);
    let mut b = PipelineBuilder::new();
    let w = WaitKind::SpinYieldPark;
    b.spawn(
        ThreadConfig::new("add", w),
        input.into(),
        fuse(Add("a"), Add("b")),
        mid_out.into(),
    )
    .unwrap();
    b.spawn(
        ThreadConfig::new("count", w),
        mid_in.into(),
        Count(Arc::clone(&count)),
        Output::Discard,
    )
    .unwrap();
    let pipeline = b.start();
    let mut send = |n: usize| {
        for _ in 0..n {
            let mut m = Msg {
                hops: Hops::starting_at(now_raw()),
                payload: [0; 4],
            };
            while let Err(Full(back)) = src.try_push(m) {
                m = back;
                std::hint::spin_loop();
            }
        }
    };
    let wait_for = |target: usize| {
        let start = Instant::now();
        while count.load(Ordering::Acquire) < target {
            assert!(start.elapsed() < Duration::from_secs(30), "pipeline stuck");
            std::thread::yield_now();
        }
    };
    // Warm up (thread-locals, first park/unpark), then count.
    send(10_000);
    wait_for(10_000);
    let before = allocations();
    send(N);
    wait_for(10_000 + N);
    // Let the threads go idle and park too.
    std::thread::sleep(Duration::from_millis(20));
    let during = allocations() - before;
    pipeline.shutdown().unwrap();
    assert_eq!(during, 0, "runner hot path allocated");
}
