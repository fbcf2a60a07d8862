//! What travels through a ring: fixed-size `Copy` messages that carry their hop timestamps.

/// How many hop timestamps a message carries. A pipeline longer than this keeps overwriting
/// the last slot, so the first stamp (the origin) and the last one (the latest hop) stay right.
pub const MAX_HOPS: usize = 8;

/// Raw quanta tick stamps, one per hop, in order (see [`crate::clock::now_raw`]).
///
/// `Copy`, `repr(C)` and of fixed size (72 bytes), so it can sit inside every ring message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Hops {
    /// `stamps[..len]` are valid, in the order they were taken.
    stamps: [u64; MAX_HOPS],
    /// Invariant: `len as usize <= MAX_HOPS`.
    len: u8,
}

impl Hops {
    /// Hops with a single stamp: the message's origin.
    #[inline]
    pub fn starting_at(raw_ticks: u64) -> Self {
        let mut hops = Self::default();
        hops.stamp(raw_ticks);
        hops
    }

    /// Appends a stamp. If all [`MAX_HOPS`] slots are taken, overwrites the last one (never
    /// panics): the first and the latest stamp are always kept.
    #[inline]
    pub fn stamp(&mut self, raw_ticks: u64) {
        debug_assert!(self.len as usize <= MAX_HOPS, "Hops::len out of range");
        let len = self.len as usize;
        if len < MAX_HOPS {
            self.stamps[len] = raw_ticks;
            self.len += 1;
        } else {
            self.stamps[MAX_HOPS - 1] = raw_ticks;
        }
    }

    /// Number of stamps.
    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// No stamp yet.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`-th stamp, if taken.
    #[inline]
    pub fn get(&self, i: usize) -> Option<u64> {
        self.as_slice().get(i).copied()
    }

    /// The origin stamp.
    #[inline]
    pub fn first(&self) -> Option<u64> {
        self.as_slice().first().copied()
    }

    /// The latest stamp.
    #[inline]
    pub fn last(&self) -> Option<u64> {
        self.as_slice().last().copied()
    }

    /// The stamps taken so far.
    #[inline]
    pub fn as_slice(&self) -> &[u64] {
        &self.stamps[..(self.len as usize).min(MAX_HOPS)]
    }

    /// Forgets every stamp.
    #[inline]
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// Everything that travels through a ring: a plain `Copy` value that carries its [`Hops`].
///
/// Declare its size bound with [`assert_message_size!`](crate::assert_message_size).
pub trait Message: Copy + Send + 'static {
    /// The hop stamps.
    fn hops(&self) -> &Hops;
    /// The hop stamps, to stamp or copy them.
    fn hops_mut(&mut self) -> &mut Hops;
}

/// Compile-time size bound of a message type: `assert_message_size!(MyMsg, 256);` fails to
/// compile if `size_of::<MyMsg>() > 256`.
///
/// ```
/// # use pipeline::{assert_message_size, Hops, Message};
/// #[derive(Clone, Copy)]
/// struct Tick { hops: Hops, price: u64 }
/// impl Message for Tick {
///     fn hops(&self) -> &Hops { &self.hops }
///     fn hops_mut(&mut self) -> &mut Hops { &mut self.hops }
/// }
/// assert_message_size!(Tick, 128);
/// ```
///
/// ```compile_fail
/// # use pipeline::assert_message_size;
/// struct Big([u8; 300]);
/// assert_message_size!(Big, 256);
/// ```
#[macro_export]
macro_rules! assert_message_size {
    ($ty:ty, $max:expr) => {
        const _: () = ::core::assert!(
            ::core::mem::size_of::<$ty>() <= $max,
            concat!(
                "message type `",
                stringify!($ty),
                "` is larger than ",
                stringify!($max),
                " bytes"
            )
        );
    };
}

/// The output type of a stage that produces nothing (a terminal stage).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoMessage {
    hops: Hops,
}

impl Message for NoMessage {
    #[inline]
    fn hops(&self) -> &Hops {
        &self.hops
    }
    #[inline]
    fn hops_mut(&mut self) -> &mut Hops {
        &mut self.hops
    }
}

assert_message_size!(Hops, 72);
assert_message_size!(NoMessage, 72);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_in_order_and_overwrites_the_last_when_full() {
        let mut h = Hops::default();
        assert!(h.is_empty());
        assert_eq!(h.first(), None);
        for i in 0..MAX_HOPS as u64 {
            h.stamp(i);
        }
        assert_eq!(h.len(), MAX_HOPS);
        h.stamp(100);
        h.stamp(101);
        assert_eq!(h.len(), MAX_HOPS);
        assert_eq!(h.first(), Some(0));
        assert_eq!(h.last(), Some(101));
        assert_eq!(h.get(MAX_HOPS - 2), Some(MAX_HOPS as u64 - 2));
        assert_eq!(h.get(MAX_HOPS), None);
        h.clear();
        assert!(h.is_empty());
        assert_eq!(std::mem::size_of::<Hops>(), 72);
    }
}
