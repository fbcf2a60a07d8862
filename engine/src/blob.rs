//! Fixed-size byte slots for the variable-length parts of an intent.
//!
//! Ring messages are small and `Copy`, so calldata and the raw signed transaction live
//! here and travel as a [`BlobRef`] (slot index + length).
//!
//! # Invariants
//!
//! - Ownership follows the message: exactly one holder (a connection task that filled it,
//!   then whichever stage holds the message carrying the ref) may read or write a claimed
//!   slot; handing the message through a ring transfers the slot with it (the ring's
//!   release/acquire orders the bytes).
//! - A slot is released exactly once, by its last holder; releasing returns it to the
//!   free list, after which the ref must not be used. Debug builds check both with a
//!   per-slot claimed flag.
//! - No allocation after construction: claim and release are a lock-free queue pop/push.

use std::cell::UnsafeCell;
#[cfg(debug_assertions)]
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_queue::ArrayQueue;

/// Size of one slot in bytes.
pub const BLOB_SIZE: usize = 4096;

/// Longest calldata accepted from a desk: a slot minus room for the transaction envelope,
/// so the signed transaction always fits in the same slot size.
pub const MAX_CALLDATA: usize = BLOB_SIZE - 512;

/// A claimed slot and how many of its bytes are used. `len == 0` with `slot == NONE` means
/// "no bytes".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRef {
    /// Slot index, or [`BlobRef::NONE_SLOT`].
    pub slot: u32,
    /// Bytes used.
    pub len: u32,
}

impl BlobRef {
    /// Slot index meaning "no slot".
    pub const NONE_SLOT: u32 = u32::MAX;
    /// No bytes.
    pub const NONE: BlobRef = BlobRef {
        slot: Self::NONE_SLOT,
        len: 0,
    };

    /// Whether this refers to a slot.
    pub fn is_some(&self) -> bool {
        self.slot != Self::NONE_SLOT
    }
}

impl Default for BlobRef {
    fn default() -> Self {
        Self::NONE
    }
}

/// A fixed pool of [`BLOB_SIZE`]-byte slots.
pub struct BlobPool {
    slots: Box<[UnsafeCell<[u8; BLOB_SIZE]>]>,
    free: ArrayQueue<u32>,
    #[cfg(debug_assertions)]
    claimed: Box<[AtomicBool]>,
}

// SAFETY: slots are only accessed by the single owner of a claimed index (module
// invariants); the free list is a thread-safe queue. Sharing the pool is therefore sound.
unsafe impl Sync for BlobPool {}
// SAFETY: as above; the pool owns plain bytes.
unsafe impl Send for BlobPool {}

impl std::fmt::Debug for BlobPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobPool")
            .field("slots", &self.slots.len())
            .field("free", &self.free.len())
            .finish()
    }
}

impl BlobPool {
    /// A pool of `count` slots, all free.
    pub fn new(count: usize) -> Self {
        assert!(count > 0 && count < u32::MAX as usize, "blob pool size");
        let slots = (0..count)
            .map(|_| UnsafeCell::new([0u8; BLOB_SIZE]))
            .collect::<Vec<_>>()
            .into_boxed_slice();
        let free = ArrayQueue::new(count);
        for i in 0..count as u32 {
            let _ = free.push(i);
        }
        Self {
            slots,
            free,
            #[cfg(debug_assertions)]
            claimed: (0..count).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Slots currently free.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Claims a free slot and copies `bytes` into it. `None` if the pool is exhausted or
    /// `bytes` does not fit.
    pub fn claim_with(&self, bytes: &[u8]) -> Option<BlobRef> {
        if bytes.len() > BLOB_SIZE {
            return None;
        }
        let mut r = self.claim()?;
        // SAFETY: `r` was just claimed by this caller, who is its only owner.
        let slot = unsafe { self.slot_mut(r) };
        slot[..bytes.len()].copy_from_slice(bytes);
        r.len = bytes.len() as u32;
        Some(r)
    }

    /// Claims a free slot (length 0). `None` if the pool is exhausted.
    pub fn claim(&self) -> Option<BlobRef> {
        let slot = self.free.pop()?;
        #[cfg(debug_assertions)]
        debug_assert!(
            !self.claimed[slot as usize].swap(true, Ordering::AcqRel),
            "slot {slot} handed out twice"
        );
        Some(BlobRef { slot, len: 0 })
    }

    /// The used bytes of a slot.
    ///
    /// # Safety
    ///
    /// The caller must be the current owner of `r` (see the module invariants): no other
    /// thread may write the slot while the returned slice lives.
    pub unsafe fn bytes(&self, r: BlobRef) -> &[u8] {
        debug_assert!(r.is_some() && (r.len as usize) <= BLOB_SIZE);
        // SAFETY: index in range (claimed from this pool); exclusive ownership per the
        // caller's contract means no concurrent writer.
        let slot = unsafe { &*self.slots[r.slot as usize].get() };
        &slot[..r.len as usize]
    }

    /// The whole slot, for writing.
    ///
    /// # Safety
    ///
    /// The caller must be the current owner of `r`, and must not hold any other reference
    /// into the same slot while the returned one lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_mut(&self, r: BlobRef) -> &mut [u8; BLOB_SIZE] {
        debug_assert!(r.is_some());
        #[cfg(debug_assertions)]
        debug_assert!(self.claimed[r.slot as usize].load(Ordering::Acquire));
        // SAFETY: exclusive ownership of the claimed slot per the caller's contract.
        unsafe { &mut *self.slots[r.slot as usize].get() }
    }

    /// Returns a slot to the free list. Releasing [`BlobRef::NONE`] is a no-op.
    pub fn release(&self, r: BlobRef) {
        if !r.is_some() {
            return;
        }
        #[cfg(debug_assertions)]
        debug_assert!(
            self.claimed[r.slot as usize].swap(false, Ordering::AcqRel),
            "slot {} released twice",
            r.slot
        );
        // Cannot fail: every index is either in the queue or claimed, and the queue holds
        // all of them.
        let pushed = self.free.push(r.slot);
        debug_assert!(pushed.is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_release_round_trip_and_exhaustion() {
        let pool = BlobPool::new(2);
        let a = pool.claim_with(b"hello").unwrap();
        let b = pool.claim().unwrap();
        assert!(pool.claim().is_none(), "exhausted pool must say so");
        // SAFETY: this test owns `a`.
        assert_eq!(unsafe { pool.bytes(a) }, b"hello");
        pool.release(a);
        pool.release(b);
        pool.release(BlobRef::NONE);
        assert_eq!(pool.available(), 2);
        assert!(pool.claim_with(&[0u8; BLOB_SIZE + 1]).is_none());
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "released twice")]
    fn double_release_is_caught() {
        let pool = BlobPool::new(1);
        let a = pool.claim().unwrap();
        pool.release(a);
        pool.release(a);
    }
}
