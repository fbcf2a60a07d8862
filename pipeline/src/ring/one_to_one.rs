//! The single-producer, single-consumer ring.

use std::mem::MaybeUninit;
use std::sync::Arc;

use crossbeam_utils::CachePadded;

use super::{Full, Occupancy, RingProbe, Signal, check_capacity};
use crate::sync::{AtomicBool, AtomicUsize, Ordering, UnsafeCell};

/// One slot, aligned to a cache line: a 64-byte message occupies exactly one line (the
/// allocator would otherwise only align it to 8, so most slots would straddle two lines and
/// every push and pop would move two), and neighbouring slots never share a line, so the
/// producer filling slot `i + 1` does not steal the line the consumer is reading slot `i` from.
#[repr(C, align(64))]
struct Slot<T>(UnsafeCell<MaybeUninit<T>>);

/// State shared by the two ends.
///
/// Indices run freely (wrapping `usize`) and are reduced with `mask` only to address a slot.
struct Shared<T> {
    /// Next index the consumer will read. Written only by the consumer (`Release`, after it
    /// finished reading the slots below it), read by the producer (`Acquire`).
    /// Invariant: `head <= tail` and `tail - head <= capacity` (wrapping arithmetic).
    head: CachePadded<AtomicUsize>,
    /// Next index the producer will write. Written only by the producer (`Release`, after it
    /// wrote the slots below it), read by the consumer (`Acquire`).
    tail: CachePadded<AtomicUsize>,
    /// Slots `head..tail` (mod capacity) hold initialised values owned by the consumer; the
    /// others belong to the producer. `T: Copy`, so nothing is ever dropped in place.
    slots: Box<[Slot<T>]>,
    /// `capacity - 1`; capacity is a power of two.
    mask: usize,
    /// Set when the consumer is dropped, so a producer waiting for space can give up.
    consumer_gone: AtomicBool,
    /// Shared with both ends: the consumer's sleeping flag and waker.
    signal: Arc<Signal>,
}

// SAFETY: the slots are accessed by at most one thread each at a time (the producer writes only
// slots outside `head..tail`, the consumer reads only slots inside), ordered by the Release
// stores / Acquire loads of `head` and `tail`. Values of type `T: Send` are moved across.
unsafe impl<T: Send> Sync for Shared<T> {}
// SAFETY: as above; `Shared` owns `T` values, which are `Send`.
unsafe impl<T: Send> Send for Shared<T> {}

impl<T> Shared<T> {
    #[inline(always)]
    fn capacity(&self) -> usize {
        self.mask + 1
    }

    #[inline(always)]
    fn slot(&self, index: usize) -> &UnsafeCell<MaybeUninit<T>> {
        debug_assert_eq!(self.slots.len(), self.mask + 1);
        // SAFETY: `slots.len() == mask + 1` (set once in `one_to_one`, never changed), so
        // `index & mask < slots.len()`.
        unsafe { &self.slots.get_unchecked(index & self.mask).0 }
    }
}

impl<T: Send> Occupancy for Shared<T> {
    fn occupancy(&self) -> usize {
        // `head` first: the `tail` read after it is at least the `head` read (the consumer
        // never passes the producer), so the difference never wraps below zero; it can
        // exceed the capacity only if both moved in between, hence the clamp.
        let head = self.head.load(Ordering::Acquire);
        let tail = self.tail.load(Ordering::Acquire);
        tail.wrapping_sub(head).min(self.capacity())
    }

    fn capacity(&self) -> usize {
        Shared::capacity(self)
    }
}

/// Creates a single-producer, single-consumer ring of `capacity` slots.
///
/// # Panics
/// If `capacity` is 0 or not a power of two.
pub fn one_to_one<T: Copy + Send>(capacity: usize) -> (OneToOneProducer<T>, OneToOneConsumer<T>) {
    check_capacity(capacity);
    let slots = (0..capacity)
        .map(|_| Slot(UnsafeCell::new(MaybeUninit::uninit())))
        .collect();
    let shared = Arc::new(Shared {
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        slots,
        mask: capacity - 1,
        consumer_gone: AtomicBool::new(false),
        signal: Arc::new(Signal::new()),
    });
    (
        OneToOneProducer {
            shared: Arc::clone(&shared),
            tail: 0,
            cached_head: 0,
        },
        OneToOneConsumer {
            shared,
            head: 0,
            cached_tail: 0,
        },
    )
}

/// The producing end of a [`one_to_one`] ring. `Send`, not `Clone`.
pub struct OneToOneProducer<T> {
    shared: Arc<Shared<T>>,
    /// Private copy of `shared.tail` (only this end writes it).
    tail: usize,
    /// Last `shared.head` seen. Invariant: `cached_head <= head` (it only lags), so
    /// `tail - cached_head` over-estimates the fill level and never lets us overwrite.
    cached_head: usize,
}

impl<T: Copy + Send> OneToOneProducer<T> {
    /// Pushes one value, or hands it back if the ring is full. Then wakes the consumer, only
    /// if its sleeping flag is set (a fence and a load otherwise, no syscall).
    #[inline]
    pub fn try_push(&mut self, value: T) -> Result<(), Full<T>> {
        self.try_push_quiet(value)?;
        self.shared.signal.notify();
        Ok(())
    }

    /// Like [`try_push`](Self::try_push) but without the wake check: the caller must call
    /// `signal().notify()` after the last push of a burst, or a parked consumer may sleep
    /// until its park timeout.
    #[inline]
    pub fn try_push_quiet(&mut self, value: T) -> Result<(), Full<T>> {
        let shared = &*self.shared;
        let tail = self.tail;
        debug_assert!(tail.wrapping_sub(self.cached_head) <= shared.capacity());
        if tail.wrapping_sub(self.cached_head) == shared.capacity() {
            self.cached_head = shared.head.load(Ordering::Acquire);
            if tail.wrapping_sub(self.cached_head) == shared.capacity() {
                return Err(Full(value));
            }
        }
        shared.slot(tail).with_mut(|slot| {
            // SAFETY: `tail - head < capacity`, so slot `tail` is outside `head..tail`: the
            // consumer finished reading it (its Release store of `head` happened-before our
            // Acquire load of it) and will not touch it until we publish `tail + 1`.
            unsafe { slot.write(MaybeUninit::new(value)) }
        });
        self.tail = tail.wrapping_add(1);
        shared.tail.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Pushes the longest prefix of `values` that fits and returns how many were pushed: one
    /// `Release` store and one wake check for the whole batch.
    #[inline]
    pub fn try_push_batch(&mut self, values: &[T]) -> usize {
        let shared = &*self.shared;
        let cap = shared.capacity();
        let tail = self.tail;
        let mut free = cap - tail.wrapping_sub(self.cached_head);
        if free < values.len() {
            self.cached_head = shared.head.load(Ordering::Acquire);
            free = cap - tail.wrapping_sub(self.cached_head);
        }
        let n = free.min(values.len());
        if n == 0 {
            return 0;
        }
        for (i, value) in values[..n].iter().enumerate() {
            shared.slot(tail.wrapping_add(i)).with_mut(|slot| {
                // SAFETY: `i < free`, so slot `tail + i` is outside `head..tail` (see
                // `try_push_quiet`); the consumer cannot see it before the store below.
                unsafe { slot.write(MaybeUninit::new(*value)) }
            });
        }
        self.tail = tail.wrapping_add(n);
        shared.tail.store(self.tail, Ordering::Release);
        shared.signal.notify();
        n
    }

    /// Slots free right now (reads the consumer's index).
    pub fn free_slots(&self) -> usize {
        let head = self.shared.head.load(Ordering::Acquire);
        self.shared.capacity() - self.tail.wrapping_sub(head)
    }

    /// The ring's capacity.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// The consumer's sleeping flag and waker.
    pub fn signal(&self) -> &Arc<Signal> {
        &self.shared.signal
    }

    /// Whether the consumer end was dropped (nothing will ever make space again).
    pub fn is_consumer_gone(&self) -> bool {
        self.shared.consumer_gone.load(Ordering::Acquire)
    }

    /// A read-only view of this ring's fill level, for gauges on other threads.
    pub fn probe(&self) -> RingProbe
    where
        T: 'static,
    {
        RingProbe {
            ring: Arc::clone(&self.shared) as Arc<dyn Occupancy>,
        }
    }
}

impl<T> std::fmt::Debug for OneToOneProducer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneToOneProducer")
            .field("capacity", &self.shared.capacity())
            .field("tail", &self.tail)
            .finish_non_exhaustive()
    }
}

/// The consuming end of a [`one_to_one`] ring. `Send`, not `Clone`.
pub struct OneToOneConsumer<T> {
    shared: Arc<Shared<T>>,
    /// Private copy of `shared.head` (only this end writes it).
    head: usize,
    /// Last `shared.tail` seen. Invariant: `head <= cached_tail <= tail`.
    cached_tail: usize,
}

/// Publishes the consumer's progress when a batch ends, even if the callback panicked, so a
/// value handed out is never handed out again.
struct HeadGuard<'a> {
    head: &'a AtomicUsize,
    local: &'a mut usize,
}

impl Drop for HeadGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.head.store(*self.local, Ordering::Release);
    }
}

/// Reads slot `index`.
///
/// # Safety
/// `index` must be in the consumer's `head..cached_tail` (published by the producer, seen
/// through an Acquire load of `tail`, not yet released by a store of `head`).
#[inline(always)]
unsafe fn read<T: Copy>(shared: &Shared<T>, index: usize) -> T {
    let value = shared.slot(index).with(|slot| {
        // SAFETY: by the caller's contract no one writes the slot while we read it: the
        // producer will not touch it again until we publish a `head` past it.
        unsafe { slot.read() }
    });
    // SAFETY: the producer initialised the slot before its Release store of `tail`, which
    // happened-before our Acquire load. `T: Copy`: the copy left behind needs no drop.
    unsafe { value.assume_init() }
}

impl<T: Copy + Send> OneToOneConsumer<T> {
    /// Number of values available, refreshing the cached producer index.
    #[inline]
    fn available(&mut self, wanted: usize) -> usize {
        let mut avail = self.cached_tail.wrapping_sub(self.head);
        if avail < wanted {
            self.cached_tail = self.shared.tail.load(Ordering::Acquire);
            avail = self.cached_tail.wrapping_sub(self.head);
        }
        debug_assert!(
            avail <= self.shared.capacity(),
            "OneToOne: tail - head > capacity"
        );
        avail
    }

    /// Pops one value (one `Release` store; an `Acquire` load only when the cached producer
    /// index says empty).
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.available(1) == 0 {
            return None;
        }
        let head = self.head;
        // SAFETY: `available(1) > 0`, so `head < cached_tail`.
        let value = unsafe { read(&self.shared, head) };
        self.head = head.wrapping_add(1);
        self.shared.head.store(self.head, Ordering::Release);
        Some(value)
    }

    /// Pops up to `max` values, calling `f` on each in order; returns how many. One `Acquire`
    /// load (only if the cached count is short of `max`) and one `Release` store per batch. If
    /// `f` panics, the values already handed to it count as consumed.
    #[inline]
    pub fn pop_batch(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let n = self.available(max).min(max);
        if n == 0 {
            return 0;
        }
        let start = self.head;
        let shared = &*self.shared;
        let guard = HeadGuard {
            head: &shared.head,
            local: &mut self.head,
        };
        for i in 0..n {
            let index = start.wrapping_add(i);
            // SAFETY: `i < n <= cached_tail - head`, so `index` is in `head..cached_tail`.
            let value = unsafe { read(shared, index) };
            *guard.local = index.wrapping_add(1);
            f(value);
        }
        drop(guard);
        n
    }

    /// Values in the ring right now.
    #[inline]
    pub fn len(&self) -> usize {
        self.shared
            .tail
            .load(Ordering::Acquire)
            .wrapping_sub(self.head)
    }

    /// Whether the ring is empty right now.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ring's capacity.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// This ring's sleeping flag and waker.
    pub fn signal(&self) -> &Arc<Signal> {
        &self.shared.signal
    }

    /// A read-only view of this ring's fill level, for gauges on other threads.
    pub fn probe(&self) -> RingProbe
    where
        T: 'static,
    {
        RingProbe {
            ring: Arc::clone(&self.shared) as Arc<dyn Occupancy>,
        }
    }
}

impl<T> Drop for OneToOneConsumer<T> {
    fn drop(&mut self) {
        self.shared.consumer_gone.store(true, Ordering::Release);
    }
}

impl<T> std::fmt::Debug for OneToOneConsumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneToOneConsumer")
            .field("capacity", &self.shared.capacity())
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}
