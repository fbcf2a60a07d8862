//! placeholder
#![deny(missing_docs)]

mod sync;

pub mod barrier;

pub mod clock;
pub mod latency;
pub mod message;
pub mod report;
pub mod ring;
pub mod runner;
pub mod slo;
pub mod stage;
pub mod wait;

pub use clock::{clock, now_raw, ticks_to_ns};
pub use latency::{HistogramSnapshot, LatencyRegistry, Percentiles, Recorder};
pub use message::{Hops, MAX_HOPS, Message, NoMessage};
pub use ring::{
    Full, ManyToOneConsumer, ManyToOneProducer, OneToOneConsumer, OneToOneProducer, Signal, Waker,
    many_to_one, one_to_one,
};
pub use runner::{
    ConfigError, CoreBudget, Input, Output, Pipeline, PipelineBuilder, PipelineError, ThreadConfig,
    ThreadStats,
};
pub use slo::{SloBudget, SloState, SloTracker};
pub use stage::{Emit, Fused, Stage, StageMeter, fuse};
pub use wait::{BusySpin, Idle, SpinThenYield, SpinYieldPark, WaitKind, WaitStrategy};
