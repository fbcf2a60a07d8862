//! The bounded multi-producer, single-consumer ring (Vyukov's bounded queue with per-slot
//! sequence numbers, restricted to one consumer so the consumer side needs no CAS).

use std::mem::MaybeUninit;
use std::sync::Arc;

use crossbeam_utils::CachePadded;

use super::{Full, Occupancy, RingProbe, Signal, check_capacity};
use crate::sync::{AtomicBool, AtomicUsize, Ordering, UnsafeCell};

/// One slot: its sequence number says whose turn it is.
///
/// For the slot at ring index `i` in lap `k` (position `p = k * capacity + i`):
/// `seq == p` means free for the producer that claims position `p`;
/// `seq == p + 1` means written, ready for the consumer at position `p`;
/// after the consumer read it, `seq == p + capacity` (free for the next lap).
struct Slot<T> {
    seq: AtomicUsize,
    value: UnsafeCell<MaybeUninit<T>>,
}

struct Shared<T> {
    /// Next position to claim; producers CAS it forward.
    tail: CachePadded<AtomicUsize>,
    /// Invariant: `slots.len() == mask + 1`, a power of two, at least 2.
    slots: Box<[Slot<T>]>,
    mask: usize,
    consumer_gone: AtomicBool,
    signal: Arc<Signal>,
}

// SAFETY: a slot's value is written only by the one producer whose CAS claimed its position
// while `seq == position`, and read only by the consumer after an Acquire load sees
// `seq == position + 1` (the producer's Release store after writing). The consumer's Release
// store of `seq = position + capacity` orders its read before the next lap's write.
unsafe impl<T: Send> Sync for Shared<T> {}
// SAFETY: `Shared` owns `T: Send` values only.
unsafe impl<T: Send> Send for Shared<T> {}

impl<T> Shared<T> {
    #[inline(always)]
    fn capacity(&self) -> usize {
        self.mask + 1
    }

    #[inline(always)]
    fn slot(&self, position: usize) -> &Slot<T> {
        debug_assert_eq!(self.slots.len(), self.mask + 1);
        // SAFETY: `slots.len() == mask + 1` (fixed at construction), so the index is in bounds.
        unsafe { self.slots.get_unchecked(position & self.mask) }
    }
}

impl<T: Send> Occupancy for Shared<T> {
    /// The consumer's position is private to it, so it is found from the slots: of the
    /// `capacity` positions below `tail`, those the consumer already read have
    /// `seq == position + capacity` and come first; the rest (written, or claimed and being
    /// written) hold values. A binary search over them takes `log2(capacity)` loads.
    fn occupancy(&self) -> usize {
        let cap = Shared::capacity(self);
        let tail = self.tail.load(Ordering::Acquire);
        let first = tail.wrapping_sub(cap);
        let read = |k: usize| {
            let position = first.wrapping_add(k);
            self.slot(position).seq.load(Ordering::Acquire) == position.wrapping_add(cap)
        };
        // Smallest `k` in `0..=cap` whose position is not read yet (`cap`: all read).
        let (mut lo, mut hi) = (0, cap);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if read(mid) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        cap - lo
    }

    fn capacity(&self) -> usize {
        Shared::capacity(self)
    }
}

/// Creates a bounded multi-producer, single-consumer ring of `capacity` slots.
///
/// A capacity of 1 is rounded up to 2: with one slot the sequence numbers could not tell
/// "written" (`p + 1`) from "free for the next lap" (`p + capacity`).
///
/// # Panics
/// If `capacity` is 0 or not a power of two.
pub fn many_to_one<T: Copy + Send>(
    capacity: usize,
) -> (ManyToOneProducer<T>, ManyToOneConsumer<T>) {
    check_capacity(capacity);
    let capacity = capacity.max(2);
    let slots = (0..capacity)
        .map(|i| Slot {
            seq: AtomicUsize::new(i),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        })
        .collect();
    let shared = Arc::new(Shared {
        tail: CachePadded::new(AtomicUsize::new(0)),
        slots,
        mask: capacity - 1,
        consumer_gone: AtomicBool::new(false),
        signal: Arc::new(Signal::new()),
    });
    (
        ManyToOneProducer {
            shared: Arc::clone(&shared),
        },
        ManyToOneConsumer { shared, head: 0 },
    )
}

/// A producing end of a [`many_to_one`] ring: `Clone`, `Send` and `Sync`.
pub struct ManyToOneProducer<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for ManyToOneProducer<T> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T: Copy + Send> ManyToOneProducer<T> {
    /// Pushes one value, or hands it back if the ring is full; then wakes the consumer only if
    /// its sleeping flag is set.
    #[inline]
    pub fn try_push(&self, value: T) -> Result<(), Full<T>> {
        self.try_push_quiet(value)?;
        self.shared.signal.notify();
        Ok(())
    }

    /// Like [`try_push`](Self::try_push) without the wake check (call `signal().notify()`
    /// after the burst).
    #[inline]
    pub fn try_push_quiet(&self, value: T) -> Result<(), Full<T>> {
        let shared = &*self.shared;
        let mut pos = shared.tail.load(Ordering::Relaxed);
        loop {
            let slot = shared.slot(pos);
            let seq = slot.seq.load(Ordering::Acquire);
            let diff = seq.wrapping_sub(pos) as isize;
            if diff == 0 {
                match shared.tail.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        slot.value.with_mut(|v| {
                            // SAFETY: our CAS claimed `pos` while `seq == pos`: the consumer
                            // released this slot (its Release store of `seq`, seen by our
                            // Acquire load) and no other producer can claim `pos` again.
                            unsafe { v.write(MaybeUninit::new(value)) }
                        });
                        slot.seq.store(pos.wrapping_add(1), Ordering::Release);
                        return Ok(());
                    }
                    Err(current) => pos = current,
                }
            } else if diff < 0 {
                // The slot still holds the value from the previous lap: full.
                return Err(Full(value));
            } else {
                // Another producer claimed `pos` already (and we saw it publish): catch up.
                crate::sync::spin_loop();
                pos = shared.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// The ring's capacity.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// The consumer's sleeping flag and waker.
    pub fn signal(&self) -> &Arc<Signal> {
        &self.shared.signal
    }

    /// Whether the consumer end was dropped.
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

impl<T> std::fmt::Debug for ManyToOneProducer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManyToOneProducer")
            .field("capacity", &self.shared.capacity())
            .finish_non_exhaustive()
    }
}

/// The consuming end of a [`many_to_one`] ring. `Send`, not `Clone`.
pub struct ManyToOneConsumer<T> {
    shared: Arc<Shared<T>>,
    /// Next position to read (private: no producer needs it, they look at `seq`).
    head: usize,
}

impl<T: Copy + Send> ManyToOneConsumer<T> {
    /// Takes the value at `head` if it is published.
    #[inline(always)]
    fn take(&mut self) -> Option<T> {
        let shared = &*self.shared;
        let head = self.head;
        let slot = shared.slot(head);
        if slot.seq.load(Ordering::Acquire) != head.wrapping_add(1) {
            return None;
        }
        let value = slot.value.with(|v| {
            // SAFETY: no producer writes the slot until we store `head + capacity` below.
            unsafe { v.read() }
        });
        // SAFETY: `seq == head + 1`: the producer that claimed `head` wrote the value and then
        // stored `seq` with Release, which our Acquire load saw. `T: Copy`: nothing to drop.
        let value = unsafe { value.assume_init() };
        slot.seq
            .store(head.wrapping_add(shared.capacity()), Ordering::Release);
        self.head = head.wrapping_add(1);
        Some(value)
    }

    /// Pops one value.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        self.take()
    }

    /// Pops up to `max` values, calling `f` on each in order; returns how many. (Each slot
    /// has its own sequence number, so this is one Acquire load and one Release store per
    /// value, not per batch.)
    #[inline]
    pub fn pop_batch(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let mut n = 0;
        while n < max {
            match self.take() {
                Some(v) => {
                    n += 1;
                    f(v);
                }
                None => break,
            }
        }
        n
    }

    /// Values claimed by producers and not yet popped (includes values being written).
    #[inline]
    pub fn len(&self) -> usize {
        let tail = self.shared.tail.load(Ordering::Acquire);
        tail.wrapping_sub(self.head).min(self.shared.capacity())
    }

    /// Whether the next value is not yet published.
    #[inline]
    pub fn is_empty(&self) -> bool {
        let slot = self.shared.slot(self.head);
        slot.seq.load(Ordering::Acquire) != self.head.wrapping_add(1)
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

impl<T> Drop for ManyToOneConsumer<T> {
    fn drop(&mut self) {
        self.shared.consumer_gone.store(true, Ordering::Release);
    }
}

impl<T> std::fmt::Debug for ManyToOneConsumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManyToOneConsumer")
            .field("capacity", &self.shared.capacity())
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}
