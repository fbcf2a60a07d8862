//! The fee view kept warm off the hot path.
//!
//! Written by the head follower's thread once per block, read by the signing
//! stage once per transaction. Atomics only; no lock, no allocation.
//!
//! # How it works
//!
//! Two slots, each guarded by its own sequence number (a seqlock), and an
//! index naming the slot that was published last. A writer always fills the
//! slot that is *not* published, then publishes it. A reader reads the
//! published slot and checks its sequence number did not move. So a writer
//! that is preempted half-way through a store never stalls a reader: the
//! reader is looking at the other slot. A reader retries only if two complete
//! stores happened while it was reading one slot, which takes the reader
//! being descheduled, and its retry then reads the newer slot.
//!
//! Writers exclude each other with a flag (expected: one writer per view).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};

use crate::types::FeeEstimate;

#[derive(Debug, Default)]
struct Slot {
    /// Even: stable. Odd: a write is in progress.
    seq: AtomicU64,
    base_lo: AtomicU64,
    base_hi: AtomicU64,
    tip_lo: AtomicU64,
    tip_hi: AtomicU64,
    block: AtomicU64,
}

/// A consistent reading of a [`FeeView`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeeSnapshot {
    /// The fees.
    pub fees: FeeEstimate,
    /// The block the base fee was taken from (0 before the first head).
    pub block: u64,
}

/// The fee view: the latest base fee and priority fee, lock-free.
#[derive(Default)]
pub struct FeeView {
    /// Index (0 or 1) of the slot published last.
    current: AtomicUsize,
    slots: [Slot; 2],
    /// Held by a writer for the duration of a store.
    writing: AtomicBool,
}

impl std::fmt::Debug for FeeView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot();
        f.debug_struct("FeeView")
            .field("fees", &s.fees)
            .field("block", &s.block)
            .finish()
    }
}

impl FeeView {
    /// A view holding `initial`, attributed to block 0.
    pub fn new(initial: FeeEstimate) -> Self {
        let v = Self::default();
        v.store_at(initial, 0);
        v
    }

    /// The latest fees. Never blocks.
    pub fn load(&self) -> FeeEstimate {
        self.snapshot().fees
    }

    /// The block number the fees were last updated from.
    pub fn updated_block(&self) -> u64 {
        self.snapshot().block
    }

    /// Fees and block number from the same update. Never blocks.
    pub fn snapshot(&self) -> FeeSnapshot {
        loop {
            let slot = &self.slots[self.current.load(Ordering::Acquire)];
            let s1 = slot.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                // Only possible if the writer lapped us: re-read `current`.
                std::hint::spin_loop();
                continue;
            }
            let base = join(
                slot.base_lo.load(Ordering::Relaxed),
                slot.base_hi.load(Ordering::Relaxed),
            );
            let tip = join(
                slot.tip_lo.load(Ordering::Relaxed),
                slot.tip_hi.load(Ordering::Relaxed),
            );
            let block = slot.block.load(Ordering::Relaxed);
            // Orders the data loads above before the re-check below.
            fence(Ordering::Acquire);
            if slot.seq.load(Ordering::Relaxed) == s1 {
                return FeeSnapshot {
                    fees: FeeEstimate {
                        base_fee_per_gas: base,
                        max_priority_fee_per_gas: tip,
                    },
                    block,
                };
            }
        }
    }

    /// Replaces the fees, keeping the block number.
    pub fn store(&self, f: FeeEstimate) {
        self.update(|s| s.fees = f);
    }

    /// Replaces the fees and the block number they came from.
    pub fn store_at(&self, f: FeeEstimate, block: u64) {
        self.update(|s| *s = FeeSnapshot { fees: f, block });
    }

    /// Sets the base fee from the header of `block`, keeping the tip.
    pub fn update_base_fee(&self, base_fee_per_gas: u128, block: u64) {
        self.update(|s| {
            s.fees.base_fee_per_gas = base_fee_per_gas;
            s.block = block;
        });
    }

    /// Sets the priority fee, keeping the base fee and block.
    pub fn update_priority_fee(&self, max_priority_fee_per_gas: u128) {
        self.update(|s| s.fees.max_priority_fee_per_gas = max_priority_fee_per_gas);
    }

    /// Read-modify-write of the published value into the spare slot.
    fn update(&self, f: impl FnOnce(&mut FeeSnapshot)) {
        while self
            .writing
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // We are the only writer now, so the published slot is stable.
        let mut value = self.snapshot();
        f(&mut value);

        let next = 1 - self.current.load(Ordering::Relaxed);
        let slot = &self.slots[next];
        let seq = slot.seq.load(Ordering::Relaxed);
        debug_assert!(seq & 1 == 0, "only one writer at a time");
        slot.seq.store(seq + 1, Ordering::Relaxed);
        // Orders the odd sequence number before the data stores below.
        fence(Ordering::Release);
        let (lo, hi) = split(value.fees.base_fee_per_gas);
        slot.base_lo.store(lo, Ordering::Relaxed);
        slot.base_hi.store(hi, Ordering::Relaxed);
        let (lo, hi) = split(value.fees.max_priority_fee_per_gas);
        slot.tip_lo.store(lo, Ordering::Relaxed);
        slot.tip_hi.store(hi, Ordering::Relaxed);
        slot.block.store(value.block, Ordering::Relaxed);
        slot.seq.store(seq + 2, Ordering::Release);
        self.current.store(next, Ordering::Release);

        self.writing.store(false, Ordering::Release);
    }
}

fn split(v: u128) -> (u64, u64) {
    (v as u64, (v >> 64) as u64)
}

fn join(lo: u64, hi: u64) -> u128 {
    (u128::from(hi) << 64) | u128::from(lo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn store_and_partial_updates() {
        let v = FeeView::new(FeeEstimate {
            base_fee_per_gas: 7,
            max_priority_fee_per_gas: 1,
        });
        assert_eq!(v.updated_block(), 0);
        v.update_base_fee(u128::MAX - 3, 12);
        assert_eq!(
            v.load(),
            FeeEstimate {
                base_fee_per_gas: u128::MAX - 3,
                max_priority_fee_per_gas: 1
            }
        );
        assert_eq!(v.updated_block(), 12);
        v.update_priority_fee(1 << 70);
        assert_eq!(v.load().max_priority_fee_per_gas, 1 << 70);
        assert_eq!(v.updated_block(), 12);
        v.store(FeeEstimate::default());
        assert_eq!(
            v.snapshot(),
            FeeSnapshot {
                fees: FeeEstimate::default(),
                block: 12
            }
        );
        v.store_at(
            FeeEstimate {
                base_fee_per_gas: 3,
                max_priority_fee_per_gas: 4,
            },
            13,
        );
        assert_eq!(v.updated_block(), 13);
        assert!(format!("{v:?}").contains("block: 13"));
    }

    /// Readers must never see a torn value: the writer stores (n, n, block n)
    /// with both halves of each u128 set, readers check they agree.
    #[test]
    fn readers_never_see_torn_values() {
        let v = Arc::new(FeeView::default());
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (v, stop) = (Arc::clone(&v), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    let mut last = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let s = v.snapshot();
                        let n = s.block;
                        let expect = (u128::from(n) << 64) | u128::from(n);
                        assert_eq!(s.fees.base_fee_per_gas, expect);
                        assert_eq!(s.fees.max_priority_fee_per_gas, expect);
                        assert!(n >= last, "went backwards: {last} -> {n}");
                        last = n;
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for n in 1..=200_000u64 {
            let x = (u128::from(n) << 64) | u128::from(n);
            v.store_at(
                FeeEstimate {
                    base_fee_per_gas: x,
                    max_priority_fee_per_gas: x,
                },
                n,
            );
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            assert!(r.join().unwrap() > 0);
        }
    }
}
