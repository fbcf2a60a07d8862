//! Bounded lock-free rings between stage threads, and the [`Signal`] that lets a parked
//! consumer be woken without a syscall per message.
//!
//! - [`one_to_one`]: single producer, single consumer. `head` and `tail` sit on separate cache
//!   lines; each side keeps a private copy of its own index and a cached copy of the other's,
//!   so in steady state a push or pop touches the shared line of the other side only when its
//!   cache says "full"/"empty". Batch push and pop publish once per batch.
//! - [`many_to_one`]: bounded multi-producer, single-consumer (Vyukov's per-slot sequence
//!   numbers). Producers claim a slot with one CAS on `tail`, publish through the slot's
//!   sequence; the consumer needs no atomic read-modify-write at all.
//!
//! Both rings hold `Copy` values of a fixed size, never drop or block: a full ring hands the
//! value back ([`Full`]), and what the caller does then is its policy (the runner waits, the
//! engine's intake answers `overloaded`).

mod many_to_one;
mod one_to_one;

pub use many_to_one::{ManyToOneConsumer, ManyToOneProducer, many_to_one};
pub use one_to_one::{OneToOneConsumer, OneToOneProducer, one_to_one};

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicBool, Ordering};
use crate::wait::Idle;

/// Returned by `try_push` when the ring is full: the value comes back to the producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full<T>(pub T);

impl<T> fmt::Display for Full<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ring is full")
    }
}

impl<T: fmt::Debug> std::error::Error for Full<T> {}

/// What a [`RingProbe`] reads of a ring: its fill level and capacity.
trait Occupancy: Send + Sync {
    /// Values in the ring right now (a racy snapshot, `0..=capacity`).
    fn occupancy(&self) -> usize;
    /// The ring's capacity.
    fn capacity(&self) -> usize;
}

/// A read-only view of a ring's fill level for gauges, usable from any thread while both
/// ends run: atomic loads only (never a store, a lock or an allocation), and the ring's
/// ends behave exactly as without it. The level is a snapshot that may be stale by the time
/// it is read, always within `0..=capacity`. Cheap to clone; keeps the ring's memory alive.
#[derive(Clone)]
pub struct RingProbe {
    ring: Arc<dyn Occupancy>,
}

impl RingProbe {
    /// Values in the ring right now (`0..=capacity`; includes values a producer of a
    /// [`many_to_one`] ring claimed and is still writing).
    pub fn len(&self) -> usize {
        self.ring.occupancy()
    }

    /// Whether the ring looked empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ring's capacity.
    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }
}

impl fmt::Debug for RingProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingProbe")
            .field("len", &self.len())
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// How to wake a ring's consumer once it parked.
pub enum Waker {
    /// Unpark this thread (the runner's default: the stage thread itself).
    Thread(std::thread::Thread),
    /// Run this closure, e.g. `mio::Waker::wake` for a stage that parks in `Poll::poll`.
    Custom(Arc<dyn Fn() + Send + Sync>),
}

impl Waker {
    /// Wakes the consumer (a syscall, or whatever the closure does).
    #[inline]
    pub fn wake(&self) {
        match self {
            Waker::Thread(thread) => thread.unpark(),
            Waker::Custom(f) => f(),
        }
    }
}

impl fmt::Debug for Waker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Waker::Thread(t) => f.debug_tuple("Thread").field(&t.name()).finish(),
            Waker::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// The consumer side's sleeping flag and how to wake it: one per ring, shared by both ends.
///
/// The handshake (a Dekker pair, so each side needs a store→load barrier):
///
/// ```text
/// consumer (Signal::sleep)             producer (after publishing, Signal::notify)
///   sleeping = true                      tail.store(Release)
///   heavy barrier                        light barrier
///   if !ready() { park }                 if sleeping { wake }
///   sleeping = false
/// ```
///
/// Either the producer sees `sleeping == true` and wakes the consumer, or the consumer's
/// re-check sees the published message and does not park: no lost wakeup, and no syscall on
/// the producer side while the consumer is awake. The barriers are `fence(SeqCst)` on both
/// sides (model-checked by `tests/loom.rs`), or on Linux an asymmetric pair: a compiler fence
/// for the producer and `membarrier(PRIVATE_EXPEDITED)` for the consumer about to park (see
/// [`crate::barrier`]), so a push costs no fence at all.
pub struct Signal {
    /// Set by the consumer, only between its last re-check and the end of its park.
    sleeping: CachePadded<AtomicBool>,
    /// Set once (first wins), read by producers only when `sleeping` is set.
    waker: OnceLock<Waker>,
}

impl Signal {
    /// A signal with no waker yet (a `notify` then wakes nobody; a parked consumer still
    /// returns at its park timeout).
    pub fn new() -> Self {
        crate::barrier::init();
        Self {
            sleeping: CachePadded::new(AtomicBool::new(false)),
            waker: OnceLock::new(),
        }
    }

    /// Sets how to wake the consumer. The first waker set wins and later calls are ignored:
    /// a stage sets a custom one in `on_start`, then the runner sets `Waker::Thread(current)`
    /// only if none is set (see [`Signal::has_waker`]).
    pub fn set_waker(&self, waker: Waker) {
        let _ = self.waker.set(waker);
    }

    /// Whether a waker has been set.
    pub fn has_waker(&self) -> bool {
        self.waker.get().is_some()
    }

    /// Producer side, after publishing: fence, then wake the consumer only if it is parked
    /// (or about to park). No syscall while the consumer is awake.
    #[inline]
    pub fn notify(&self) {
        crate::barrier::light();
        if self.sleeping.load(Ordering::Relaxed) {
            self.wake();
        }
    }

    /// Wakes the consumer unconditionally (shutdown, failure). A wake of a consumer that is
    /// not parked is harmless: its next park returns at once.
    pub fn wake(&self) {
        if let Some(waker) = self.waker.get() {
            waker.wake();
        }
    }

    /// Whether the consumer is parked or about to park.
    #[inline]
    pub fn is_sleeping(&self) -> bool {
        self.sleeping.load(Ordering::Relaxed)
    }

    /// Consumer side of the handshake: announce sleep, fence, re-check `idle.ready()`, park
    /// only if still nothing to do, then clear the flag. Returns whether it parked.
    pub fn sleep(&self, idle: &mut dyn Idle, timeout: Option<Duration>) -> bool {
        self.sleeping.store(true, Ordering::Relaxed);
        crate::barrier::heavy();
        let parked = !idle.ready();
        if parked {
            idle.park(timeout);
        }
        self.sleeping.store(false, Ordering::Relaxed);
        parked
    }
}

impl Default for Signal {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signal")
            .field("sleeping", &self.is_sleeping())
            .field("waker", &self.waker.get())
            .finish()
    }
}

/// Panics unless `capacity` is a non-zero power of two (the rings index with a mask).
fn check_capacity(capacity: usize) {
    assert!(
        capacity.is_power_of_two() && capacity <= isize::MAX as usize / 2,
        "ring capacity must be a non-zero power of two, got {capacity}"
    );
}

#[cfg(test)]
mod tests;
