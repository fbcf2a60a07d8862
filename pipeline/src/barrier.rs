//! The two halves of the park handshake's store→load barrier, made asymmetric so the producer
//! side (run after every push) costs nothing.
//!
//! The handshake is a Dekker pair: the producer stores `tail` then loads `sleeping`, the
//! consumer stores `sleeping` then loads `tail`; each side needs a store→load barrier between
//! the two, or both can miss the other's store (a lost wakeup). A `fence(SeqCst)` on each side
//! is correct, but on x86 the producer's fence drains its store buffer, which waits for the
//! cache line of `tail` to come back from the consumer's core: measured here it halved the
//! ring's streaming throughput.
//!
//! So on Linux the barrier is split the way folly's `asymmetricLightBarrier` /
//! `asymmetricHeavyBarrier` and liburcu do it: the producer (fast, frequent side) issues only a
//! compiler fence, and the consumer (slow side, about to park anyway) issues
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every running thread of this
//! process execute a full memory barrier before it returns. Either the producer's load of
//! `sleeping` comes after that barrier on its core (and sees `true`), or its store of `tail` was
//! made visible by it (and the consumer's re-check sees the message).
//!
//! The light side may skip the fence only once registration for expedited membarrier has
//! succeeded (the mode then never changes); until then, and wherever membarrier is unavailable
//! (other OSes, seccomp, Miri, loom), both sides use `fence(SeqCst)`. Loom model-checks that
//! fence form (`tests/loom.rs`); the membarrier form substitutes the kernel's guarantee for the
//! consumer's fence and the producer's fence.

#[cfg(not(all(target_os = "linux", not(loom), not(miri))))]
use crate::sync::{Ordering, fence};

#[cfg(all(target_os = "linux", not(loom), not(miri)))]
mod imp {
    use std::sync::atomic::{AtomicU8, Ordering, compiler_fence, fence};

    const UNKNOWN: u8 = 0;
    const EXPEDITED: u8 = 1;
    const FENCE_ONLY: u8 = 2;

    /// `UNKNOWN` until `init` ran once, then `EXPEDITED` or `FENCE_ONLY` for good.
    static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);

    const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    fn membarrier(cmd: libc::c_long) -> libc::c_long {
        // SAFETY: membarrier takes (cmd, flags, cpu_id) by value and touches no user memory.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_long,
                0 as libc::c_long,
            )
        }
    }

    /// Registers for expedited membarrier once; returns the mode.
    #[cold]
    fn init() -> u8 {
        let supported = membarrier(MEMBARRIER_CMD_QUERY);
        let mode = if supported >= 0
            && supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED != 0
            && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
        {
            EXPEDITED
        } else {
            FENCE_ONLY
        };
        match MODE.compare_exchange(UNKNOWN, mode, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => mode,
            Err(current) => current,
        }
    }

    #[inline]
    pub(super) fn mode_is_expedited() -> bool {
        match MODE.load(Ordering::Relaxed) {
            UNKNOWN => init() == EXPEDITED,
            m => m == EXPEDITED,
        }
    }

    #[inline(always)]
    pub(super) fn light() {
        if MODE.load(Ordering::Relaxed) == EXPEDITED {
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
    }

    pub(super) fn heavy() {
        fence(Ordering::SeqCst);
        if mode_is_expedited() && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0 {
            // Cannot fail once registered. If it ever did, producers that skip their fence
            // could lose a wakeup: abort rather than hang silently.
            std::process::abort();
        }
    }
}

/// Called at ring creation: settles the barrier mode early, so producers take the cheap path
/// from their first push.
#[inline]
pub(crate) fn init() {
    #[cfg(all(target_os = "linux", not(loom), not(miri)))]
    let _ = imp::mode_is_expedited();
}

/// Producer side, between publishing and loading the sleeping flag.
#[inline(always)]
pub(crate) fn light() {
    #[cfg(all(target_os = "linux", not(loom), not(miri)))]
    imp::light();
    #[cfg(not(all(target_os = "linux", not(loom), not(miri))))]
    fence(Ordering::SeqCst);
}

/// Consumer side, between storing the sleeping flag and re-checking for work.
#[inline]
pub(crate) fn heavy() {
    #[cfg(all(target_os = "linux", not(loom), not(miri)))]
    imp::heavy();
    #[cfg(not(all(target_os = "linux", not(loom), not(miri))))]
    fence(Ordering::SeqCst);
}

/// Whether the cheap producer side is in use (expedited membarrier registered).
pub fn is_asymmetric() -> bool {
    #[cfg(all(target_os = "linux", not(loom), not(miri)))]
    return imp::mode_is_expedited();
    #[cfg(not(all(target_os = "linux", not(loom), not(miri))))]
    false
}
