//! The engine's pipeline stages. Each owns its state outright (single writer) and talks to
//! the others only through rings or, when fused, direct calls.

pub mod broadcast;
pub mod intake;
pub mod policy;
pub mod receipts;
pub mod signing;
pub mod status;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pipeline::{Full, ManyToOneProducer};

use crate::msg::StatusMsg;

/// Where every stage reports state changes: the many-to-one ring into the status thread.
///
/// A status event is never dropped: if the ring is full the stage waits for space
/// (spinning briefly, then yielding), which is back-pressure on the stage. The wait ends
/// only if the engine is going down (`dead`), so a dead status thread cannot hang a stage.
#[derive(Clone, Debug)]
pub struct StatusSink {
    ring: ManyToOneProducer<StatusMsg>,
    dead: Arc<AtomicBool>,
}

impl StatusSink {
    /// Wraps the producer side of the status ring.
    pub fn new(ring: ManyToOneProducer<StatusMsg>, dead: Arc<AtomicBool>) -> Self {
        Self { ring, dead }
    }

    /// Sends one event, waiting for room if the ring is full.
    #[inline]
    pub fn send(&self, mut msg: StatusMsg) {
        let mut spins = 0u32;
        loop {
            match self.ring.try_push(msg) {
                Ok(()) => return,
                Err(Full(m)) => {
                    msg = m;
                    if self.dead.load(Ordering::Relaxed) {
                        return;
                    }
                    spins += 1;
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                }
            }
        }
    }

    /// Tries once; `false` if the ring is full (for the desk edge, which answers
    /// `overloaded` instead of waiting).
    pub fn try_send(&self, msg: StatusMsg) -> bool {
        self.ring.try_push(msg).is_ok()
    }
}
