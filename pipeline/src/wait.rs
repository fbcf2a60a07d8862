//! How a stage thread waits when it found no work: a small trait and three strategies.
//!
//! Measured on the 2-core development VM with 6 stage threads (see `design.md` §5): busy-spin
//! gives 20 ms p50 end to end (a spinning thread gives its core up only at the 4 ms timer
//! tick), spin-then-yield 11 µs p50 / 14 µs p99 at 100 % CPU, spin-yield-park about 45 µs p50
//! at 1.5 cores. Busy-spin is right only when a stage owns its core; see
//! [`CoreBudget::default_wait`](crate::runner::CoreBudget::default_wait).

use std::time::Duration;

use crate::ring::Signal;
use crate::sync;

/// What a wait strategy needs from the stage thread while it is idle.
pub trait Idle {
    /// Re-check: is input (or I/O, or a stop request) pending?
    fn ready(&mut self) -> bool;
    /// Block until woken or `timeout` (the runner's default is `std::thread::park_timeout`;
    /// I/O stages block in their poller instead).
    fn park(&mut self, timeout: Option<Duration>);
}

/// How a stage thread waits when it found no work. Chosen per stage ([`WaitKind`]).
pub trait WaitStrategy: Send {
    /// Work was found: start the next idle period from the beginning.
    fn reset(&mut self);
    /// One idle step: spin, yield, or do the park handshake on `signal`.
    fn idle(&mut self, signal: &Signal, idle: &mut dyn Idle);
}

/// Spin with a pause hint, never give the core up. Only for a thread that owns its core.
#[derive(Clone, Copy, Debug, Default)]
pub struct BusySpin;

impl WaitStrategy for BusySpin {
    #[inline]
    fn reset(&mut self) {}

    #[inline]
    fn idle(&mut self, _signal: &Signal, _idle: &mut dyn Idle) {
        sync::spin_loop();
    }
}

/// Spin `spins` steps, then yield the core on every further step (never parks: 100 % CPU,
/// but other threads on the same core get to run within a yield).
#[derive(Clone, Copy, Debug)]
pub struct SpinThenYield {
    spins: u32,
    /// Idle steps taken since the last `reset`. Invariant: only grows until `reset`.
    count: u32,
}

impl SpinThenYield {
    /// Spin `spins` steps, then yield.
    pub fn new(spins: u32) -> Self {
        Self { spins, count: 0 }
    }
}

impl Default for SpinThenYield {
    fn default() -> Self {
        Self::new(100)
    }
}

impl WaitStrategy for SpinThenYield {
    #[inline]
    fn reset(&mut self) {
        self.count = 0;
    }

    #[inline]
    fn idle(&mut self, _signal: &Signal, _idle: &mut dyn Idle) {
        if self.count < self.spins {
            self.count += 1;
            sync::spin_loop();
        } else {
            sync::yield_now();
        }
    }
}

/// Spin `spins` steps, yield `yields` steps, then park with the [`Signal`] handshake (the
/// producer wakes us only when our sleeping flag is set). The park timeout is a safety net
/// only; wakeups come from the signal.
#[derive(Clone, Copy, Debug)]
pub struct SpinYieldPark {
    spins: u32,
    yields: u32,
    park_timeout: Duration,
    /// Idle steps taken since the last `reset`; saturates at `spins + yields`.
    count: u32,
}

impl SpinYieldPark {
    /// Default number of spin steps (a few hundred ns).
    pub const DEFAULT_SPINS: u32 = 100;
    /// Default number of yield steps before parking. A yield costs about 0.3-1 µs when no
    /// other thread is runnable, so this keeps a stage awake for roughly 1-2 ms after its last
    /// message: a stream of 1k msg/s or faster never pays the ~20 µs wake-up, while an idle
    /// pipeline parks after a few ms and costs next to no CPU.
    pub const DEFAULT_YIELDS: u32 = 2000;
    /// Default park timeout: a safety net, not the wake-up mechanism.
    pub const DEFAULT_PARK_TIMEOUT: Duration = Duration::from_millis(5);

    /// Spin `spins` steps, yield `yields` steps, then park for at most `park_timeout`.
    pub fn new(spins: u32, yields: u32, park_timeout: Duration) -> Self {
        Self {
            spins,
            yields,
            park_timeout,
            count: 0,
        }
    }
}

impl Default for SpinYieldPark {
    fn default() -> Self {
        Self::new(
            Self::DEFAULT_SPINS,
            Self::DEFAULT_YIELDS,
            Self::DEFAULT_PARK_TIMEOUT,
        )
    }
}

impl WaitStrategy for SpinYieldPark {
    #[inline]
    fn reset(&mut self) {
        self.count = 0;
    }

    fn idle(&mut self, signal: &Signal, idle: &mut dyn Idle) {
        if self.count < self.spins {
            self.count += 1;
            sync::spin_loop();
        } else if self.count - self.spins < self.yields {
            self.count += 1;
            sync::yield_now();
        } else {
            signal.sleep(idle, Some(self.park_timeout));
        }
    }
}

/// Which wait strategy a stage thread uses (configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitKind {
    /// [`BusySpin`].
    BusySpin,
    /// [`SpinThenYield`] with its defaults.
    SpinThenYield,
    /// [`SpinYieldPark`] with its defaults.
    SpinYieldPark,
}

impl WaitKind {
    /// Builds the strategy (boxed once, at thread start).
    pub fn build(self) -> Box<dyn WaitStrategy> {
        match self {
            WaitKind::BusySpin => Box::new(BusySpin),
            WaitKind::SpinThenYield => Box::new(SpinThenYield::default()),
            WaitKind::SpinYieldPark => Box::new(SpinYieldPark::default()),
        }
    }

    /// A short name for reports (`busy-spin`, `spin-yield`, `spin-yield-park`).
    pub fn as_str(self) -> &'static str {
        match self {
            WaitKind::BusySpin => "busy-spin",
            WaitKind::SpinThenYield => "spin-yield",
            WaitKind::SpinYieldPark => "spin-yield-park",
        }
    }
}

impl std::fmt::Display for WaitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
