//! Rolling velocity windows: value and count spent over the last hour, day, … in O(1).
//!
//! A window of length `W` is cut into [`SLOTS`]` - 1` equal buckets of width `W / 60`
//! plus one, and keeps running sums. Advancing time clears only the buckets that fell out
//! (at most [`SLOTS`] per call, usually none), so a check is O(1) and allocation-free.
//!
//! Invariant (conservative): an amount spent at time `t` is counted for at least `W` and
//! at most `W + W/60` after `t`. A limit is therefore never exceeded inside any window of
//! length `W`; the price is that capacity returns up to one bucket width late.

/// Buckets per window: 60 of width `W/60`, plus one so nothing leaves the window early.
pub const SLOTS: usize = 61;

/// One rolling window's state.
#[derive(Clone, Debug)]
pub struct Window {
    width_ns: u64,
    head: u64,
    sum_value: u128,
    sum_count: u64,
    value: [u128; SLOTS],
    count: [u32; SLOTS],
}

/// Which of a window's limits an intent would break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    /// Value sum.
    Value {
        /// Already spent in the window.
        used: u128,
        /// The limit.
        limit: u128,
    },
    /// Count of intents.
    Count {
        /// Already counted in the window.
        used: u64,
        /// The limit.
        limit: u64,
    },
}

impl Window {
    /// An empty window of length `window_secs` (a multiple of 60).
    pub fn new(window_secs: u64) -> Self {
        Self {
            width_ns: window_secs.max(60) * 1_000_000_000 / 60,
            head: 0,
            sum_value: 0,
            sum_count: 0,
            value: [0; SLOTS],
            count: [0; SLOTS],
        }
    }

    /// Length of the window in seconds.
    pub fn window_secs(&self) -> u64 {
        self.width_ns * 60 / 1_000_000_000
    }

    #[inline]
    fn advance(&mut self, now_ns: u64) {
        let b = now_ns / self.width_ns;
        if b <= self.head {
            // Same bucket, or the clock stepped back: charge the newest bucket.
            return;
        }
        let steps = (b - self.head).min(SLOTS as u64);
        for i in 1..=steps {
            let idx = ((self.head + i) % SLOTS as u64) as usize;
            self.sum_value -= self.value[idx];
            self.sum_count -= u64::from(self.count[idx]);
            self.value[idx] = 0;
            self.count[idx] = 0;
        }
        self.head = b;
    }

    /// Would one more intent of `value` stay within `max_value` and `max_count`?
    #[inline]
    pub fn check(
        &mut self,
        now_ns: u64,
        value: u128,
        max_value: Option<u128>,
        max_count: Option<u64>,
    ) -> Result<(), Exceeded> {
        self.advance(now_ns);
        if let Some(limit) = max_value
            && self.sum_value.saturating_add(value) > limit
        {
            return Err(Exceeded::Value {
                used: self.sum_value,
                limit,
            });
        }
        if let Some(limit) = max_count
            && self.sum_count + 1 > limit
        {
            return Err(Exceeded::Count {
                used: self.sum_count,
                limit,
            });
        }
        Ok(())
    }

    /// Records one intent of `value` at `now_ns` (after a successful [`Window::check`]).
    #[inline]
    pub fn commit(&mut self, now_ns: u64, value: u128) {
        self.advance(now_ns);
        let idx = (self.head % SLOTS as u64) as usize;
        self.value[idx] = self.value[idx].saturating_add(value);
        self.count[idx] += 1;
        self.sum_value = self.sum_value.saturating_add(value);
        self.sum_count += 1;
    }

    /// Value and count currently in the window.
    pub fn used(&mut self, now_ns: u64) -> (u128, u64) {
        self.advance(now_ns);
        (self.sum_value, self.sum_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn value_limit_is_inclusive_and_rolls_off_after_the_window() {
        let mut w = Window::new(3600);
        let t0 = 1_700_000_000 * S + 17 * S; // not on a bucket edge
        assert!(w.check(t0, 60, Some(100), None).is_ok());
        w.commit(t0, 60);
        assert!(
            w.check(t0 + S, 40, Some(100), None).is_ok(),
            "exactly the cap"
        );
        w.commit(t0 + S, 40);
        assert_eq!(
            w.check(t0 + 2 * S, 1, Some(100), None),
            Err(Exceeded::Value {
                used: 100,
                limit: 100
            })
        );
        // Just before a full window has passed since the first spend: still counted.
        assert!(w.check(t0 + 3600 * S - 1, 1, Some(100), None).is_err());
        // A full window plus one bucket later, both spends are gone.
        assert!(w.check(t0 + S + 3660 * S, 100, Some(100), None).is_ok());
        assert_eq!(w.used(t0 + S + 3660 * S), (0, 0));
    }

    #[test]
    fn count_limit_and_partial_roll_off() {
        let mut w = Window::new(60);
        let t0 = 10_000 * S;
        for i in 0..3 {
            assert!(w.check(t0 + i * 20 * S, 0, None, Some(3)).is_ok());
            w.commit(t0 + i * 20 * S, 0);
        }
        assert!(matches!(
            w.check(t0 + 50 * S, 0, None, Some(3)),
            Err(Exceeded::Count { used: 3, limit: 3 })
        ));
        // The first left after 60 s (+1 s bucket); the other two remain.
        assert_eq!(w.used(t0 + 62 * S).1, 2);
    }

    #[test]
    fn a_long_gap_clears_everything_and_a_clock_step_back_is_charged() {
        let mut w = Window::new(86_400);
        w.commit(5 * 86_400 * S, 7);
        assert_eq!(w.used(50 * 86_400 * S), (0, 0));
        w.commit(50 * 86_400 * S, 3);
        w.commit(49 * 86_400 * S, 4); // clock went back: still counted
        assert_eq!(w.used(50 * 86_400 * S), (7, 2));
    }
}
