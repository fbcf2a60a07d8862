//! The process-wide quanta clock: calibrated once, then a raw counter read (TSC on x86) per
//! stamp, scaled to nanoseconds only when a delta is recorded.

use std::sync::OnceLock;

static CLOCK: OnceLock<quanta::Clock> = OnceLock::new();

/// The process-wide clock. The first call calibrates it (up to a few ms); call it at setup.
#[inline]
pub fn clock() -> &'static quanta::Clock {
    CLOCK.get_or_init(quanta::Clock::new)
}

/// A raw tick stamp (`clock().raw()`), for [`crate::Hops::stamp`].
#[inline]
pub fn now_raw() -> u64 {
    clock().raw()
}

/// Nanoseconds from `start_raw` to `end_raw`; 0 if `end_raw <= start_raw` (saturating).
#[inline]
pub fn ticks_to_ns(start_raw: u64, end_raw: u64) -> u64 {
    if end_raw <= start_raw {
        return 0;
    }
    clock().delta_as_nanos(start_raw, end_raw)
}

#[cfg(all(test, not(miri)))]
mod tests {
    use super::*;

    #[test]
    fn deltas_are_nanoseconds_and_saturate() {
        let a = now_raw();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = now_raw();
        let ns = ticks_to_ns(a, b);
        assert!((4_000_000..500_000_000).contains(&ns), "{ns}");
        assert_eq!(ticks_to_ns(b, a), 0);
    }
}
