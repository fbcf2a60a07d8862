//! The low-latency mechanism the engine's stages run on: bounded lock-free rings, wait
//! strategies, a stage runner (threads, pinning, fusion, shutdown, panics) and per-stage latency
//! recording with SLO budgets. It knows nothing of Ethereum.
//!
//! ```
//! use pipeline::*;
//!
//! #[derive(Clone, Copy, Debug, Default)]
//! struct Tick { hops: Hops, n: u64 }
//! impl Message for Tick {
//!     fn hops(&self) -> &Hops { &self.hops }
//!     fn hops_mut(&mut self) -> &mut Hops { &mut self.hops }
//! }
//! assert_message_size!(Tick, 128);
//!
//! struct Double;
//! impl Stage for Double {
//!     type In = Tick;
//!     type Out = Tick;
//!     fn name(&self) -> &'static str { "double" }
//!     fn on_message<E: Emit<Tick>>(&mut self, mut t: Tick, out: &mut E) { t.n *= 2; out.emit(t); }
//! }
//! struct Print;
//! impl Stage for Print {
//!     type In = Tick;
//!     type Out = NoMessage;
//!     fn name(&self) -> &'static str { "print" }
//!     fn on_message<E: Emit<NoMessage>>(&mut self, t: Tick, _: &mut E) { assert_eq!(t.n % 2, 0); }
//! }
//!
//! let budget = CoreBudget::detect();
//! let (mut intake, input) = one_to_one::<Tick>(1024);
//! let mut builder = PipelineBuilder::new();
//! // Two CPU-bound stages, fused on one thread: a direct call between them, no ring.
//! let cfg = ThreadConfig::new("cpu", budget.default_wait(1));
//! builder.spawn(cfg, input.into(), fuse(Double, Print), Output::Discard)?;
//! let pipeline = builder.start();
//! for n in 0..100 {
//!     // The edge reports overload instead of blocking.
//!     if intake.try_push(Tick { hops: Hops::starting_at(now_raw()), n }).is_err() { break; }
//! }
//! pipeline.shutdown()?; // drains the rings, then joins
//! # Ok::<(), PipelineError>(())
//! ```
//!
//! # Design
//!
//! - **Rings** ([`ring`]). [`one_to_one`] is a hand-written bounded SPSC ring: power-of-two
//!   capacity, `head` and `tail` on their own cache lines, each side keeping a private copy of
//!   its own index and a cached copy of the other's, slots aligned to a cache line, batch push
//!   and pop that publish once per batch. It exists (rather than wrapping `rtrb` or
//!   `disruptor`) because it integrates the park/unpark handshake of the wait strategy and batch
//!   claim, and it matches or beats both on the same bench (see the README). [`many_to_one`] is
//!   a bounded MPSC ring (Vyukov's per-slot sequence numbers) for the places where several
//!   producers feed one stage. Both carry fixed-size `Copy` messages and hand the message back
//!   when full ([`Full`]): nothing is silently dropped or blocked on forever.
//! - **Signal** ([`Signal`]). One per ring: the consumer's sleeping flag and its [`Waker`]. A
//!   producer pays a load of the flag per push and a syscall only when the consumer is parked.
//!   The store→load barrier the handshake needs is asymmetric on Linux ([`barrier`]): nothing
//!   on the producer side, `membarrier` on the consumer side as it goes to sleep.
//! - **Wait strategies** ([`wait`]). [`BusySpin`], [`SpinThenYield`], [`SpinYieldPark`], chosen
//!   per thread ([`WaitKind`]); [`CoreBudget`] picks defaults from the cores the process may
//!   really use (affinity mask ∩ cgroup quota): spin only when a stage owns its core.
//! - **Stages and fusion** ([`stage`]). A [`Stage`] gets a message and an [`Emit`]. Whether the
//!   output goes to a ring or straight into the next stage ([`fuse`]) is configuration; the
//!   stage code is the same either way.
//! - **Runner** ([`runner`]). One named, optionally pinned thread per [`PipelineBuilder::spawn`];
//!   the loop pops a batch, stamps, records, calls the stage, emits (waiting on a full ring
//!   inside the pipeline, counting stalls), polls extra work, and idles through its wait
//!   strategy. Graceful [`Pipeline::shutdown`] stops threads upstream first, each draining its
//!   input; a panicking stage is caught, reported ([`PipelineError::StagePanicked`]) and stops
//!   every thread, including one stuck on a full ring.
//! - **Latency** ([`latency`], [`slo`]). Every message carries [`Hops`] (raw quanta ticks, one
//!   per hop). Each stage records queue wait and service time into its own [`Recorder`]
//!   (single writer, HdrHistogram bucketing, no lock, no allocation); a reporter gathers
//!   interval and cumulative histograms off the hot path ([`LatencyRegistry::snapshot`]) and
//!   judges them against per-stage budgets ([`SloTracker`]).
//!
//! # Invariants
//!
//! - A ring's capacity is a non-zero power of two (`ManyToOne`: at least 2); indices run
//!   freely and are masked only to address a slot; `0 <= tail - head <= capacity` at all times.
//! - Only the producer writes `tail` and the slots outside `head..tail`; only the consumer
//!   writes `head` and reads the slots inside. Publication is a `Release` store, observation an
//!   `Acquire` load; a cached index only ever lags the real one, so it can under-report space or
//!   data, never over-report it.
//! - A consumer parks only after setting its sleeping flag, a store→load barrier and a re-check
//!   of its input that found nothing; a producer checks the flag after publishing behind the
//!   matching barrier. So a published message is either seen by the re-check or wakes the
//!   consumer (model-checked with loom).
//! - Messages are `Copy` and never dropped in place; a ring never blocks and never drops.
//! - The hot path (push, pop, record, stage call, emit) takes no lock and allocates nothing
//!   (`tests/alloc.rs` counts allocations with a global allocator).
//! - A recorder has one writer; its counters only grow; the reporter computes intervals as
//!   differences, so no value is lost or counted twice.
//! - After a failure every stage thread stops within one loop iteration, one idle step or one
//!   park timeout; shutdown never waits on a full ring for longer than
//!   [`runner::SHUTDOWN_STALL_LIMIT`].
//!
//! # Testing
//!
//! `cargo test -p pipeline` runs unit, property (proptest) and runner tests and the
//! zero-allocation test. The rings and the park handshake are model-checked with loom
//! (`RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target-loom cargo test -p pipeline --release --test
//! loom`) and the ring tests run under Miri (`cargo +nightly miri test -p pipeline --lib ring`,
//! with `MIRIFLAGS=-Zmiri-disable-isolation` for proptest).
#![deny(missing_docs)]

mod sync;

pub mod barrier;

pub mod clock;
pub mod coremap;
pub mod latency;
pub mod message;
pub mod report;
pub mod ring;
pub mod runner;
pub mod slo;
pub mod stage;
pub mod wait;

pub use clock::{clock, now_raw, ticks_to_ns};
pub use coremap::{CoreMap, CoreMapError, confine_threads};
pub use latency::{HistogramSnapshot, LatencyRegistry, Percentiles, Recorder};
pub use message::{Hops, MAX_HOPS, Message, NoMessage};
pub use ring::{
    Full, ManyToOneConsumer, ManyToOneProducer, OneToOneConsumer, OneToOneProducer, RingProbe,
    Signal, Waker, many_to_one, one_to_one,
};
pub use runner::{
    ConfigError, CoreBudget, Input, Output, Pipeline, PipelineBuilder, PipelineError, ThreadConfig,
    ThreadStats,
};
pub use slo::{SloBudget, SloState, SloTracker};
pub use stage::{Emit, Fused, Stage, StageMeter, fuse};
pub use wait::{BusySpin, Idle, SpinThenYield, SpinYieldPark, WaitKind, WaitStrategy};
