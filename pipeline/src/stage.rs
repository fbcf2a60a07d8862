//! The stage trait, the emit side, and fusion of stages into one thread.
//!
//! A stage is plain code: it gets a message and an [`Emit`] to put its output into. Whether
//! that output goes into a ring to another thread or, fused, straight into the next stage's
//! `on_message` is decided by configuration ([`fuse`], [`crate::runner`]), not by the stage.
//!
//! # Instrumentation
//! The runner calls [`Stage::process`] (a provided method; only [`Fused`] overrides it) with the
//! time the message was taken off the input ring. Each emitted message is stamped once
//! (one clock read: [`crate::clock::now_raw`]) and that same stamp ends the stage's service
//! time, so a stage's service time is "input taken → first output emitted" (or → return, if it
//! emitted nothing). Inside a fused chain the next stage starts at that stamp: its queue wait is
//! recorded as 0 and no further clock read is needed.
//!
//! Output messages whose [`Hops`](crate::Hops) are empty inherit the input's hops before they
//! are stamped, so a stage that builds a new output type from its input keeps the trail without
//! copying it by hand; a stage that sets hops itself keeps its own.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{now_raw, ticks_to_ns};
use crate::latency::Recorder;
use crate::message::{Hops, Message};
use crate::ring::Signal;

/// Where a stage puts its output.
pub trait Emit<T> {
    /// Hands `msg` on (to the next ring, or to the next fused stage directly).
    fn emit(&mut self, msg: T);
}

/// The recorders of one stage: `"<stage>.queue_wait"` and `"<stage>.service"`.
#[derive(Debug)]
pub struct StageMeter {
    /// Time from the previous hop's stamp to this stage taking the message.
    pub queue_wait: Recorder,
    /// Time from taking the message to emitting its first output (or finishing).
    pub service: Recorder,
}

thread_local! {
    /// The stage currently running on this thread, for panic reports.
    static CURRENT_STAGE: Cell<&'static str> = const { Cell::new("") };
}

/// The name of the stage running on this thread (`""` outside any stage). Used by the runner
/// to name the stage that panicked, also inside a fused chain.
pub fn current_stage() -> &'static str {
    CURRENT_STAGE.with(Cell::get)
}

#[inline(always)]
fn set_current_stage(name: &'static str) -> &'static str {
    CURRENT_STAGE.with(|c| c.replace(name))
}

/// A processing step. One value of it lives on one thread and owns its state outright.
pub trait Stage: Send + 'static {
    /// What it consumes.
    type In: Message;
    /// What it produces ([`NoMessage`](crate::NoMessage) for a terminal stage).
    type Out: Message;

    /// Stage name, used for recorder names (`"<name>.service"`) and panic reports.
    fn name(&self) -> &'static str;

    /// Handle one message. Output goes to `out` (the next ring, or the next fused stage).
    fn on_message<E: Emit<Self::Out>>(&mut self, msg: Self::In, out: &mut E);

    /// Work besides the input ring (sockets, timers). Returns the number of items done (0 =
    /// nothing).
    fn poll_extra<E: Emit<Self::Out>>(&mut self, _out: &mut E) -> usize {
        0
    }

    /// Is there extra (non-ring) work pending? Used by the park re-check.
    fn extra_ready(&mut self) -> bool {
        false
    }

    /// Whether this stage parks on a readiness source of its own (overrides
    /// [`park`](Self::park)). A fused chain parks on the stage that does; at most one
    /// stage of a chain may. Default `false`.
    fn owns_park(&self) -> bool {
        false
    }

    /// Block until woken or `timeout`. Default: `std::thread::park_timeout` / `park`. I/O
    /// stages override it with their poller (e.g. `mio::Poll::poll`), set a matching
    /// `Waker::Custom` on their input signal in [`on_start`](Self::on_start), and return
    /// `true` from [`owns_park`](Self::owns_park).
    fn park(&mut self, timeout: Option<Duration>) {
        match timeout {
            Some(t) => std::thread::park_timeout(t),
            None => std::thread::park(),
        }
    }

    /// Called once on the stage's own thread before its loop, with the input ring's signal.
    fn on_start(&mut self, _input_signal: &Arc<Signal>) {}

    /// Called once after the input is drained at shutdown.
    fn on_shutdown<E: Emit<Self::Out>>(&mut self, _out: &mut E) {}

    /// How many stages this is: 1, or the length of a fused chain. (Provided; only
    /// [`Fused`] overrides it.)
    fn depth(&self) -> usize {
        1
    }

    /// Calls `f` with the name of every stage inside, in chain order. (Provided.)
    fn for_each_name(&self, f: &mut dyn FnMut(&'static str)) {
        f(self.name());
    }

    /// Runs one message with instrumentation: `t_in` is when it was taken off the ring,
    /// `meters[..self.depth()]` are this stage's (chain's) recorders. Outputs are stamped and
    /// inherit the input's hops if they have none. (Provided; only [`Fused`] overrides it.)
    #[inline]
    fn process<E: Emit<Self::Out>>(
        &mut self,
        msg: Self::In,
        t_in: u64,
        meters: &mut [StageMeter],
        out: &mut E,
    ) {
        let previous = set_current_stage(self.name());
        match meters.first_mut() {
            Some(meter) => {
                let mut emit = Stamping {
                    out,
                    service: Some(&mut meter.service),
                    t_in,
                    inherit: *msg.hops(),
                };
                self.on_message(msg, &mut emit);
                if let Some(service) = emit.service {
                    service.record(ticks_to_ns(t_in, now_raw()));
                }
            }
            None => {
                let mut emit = Stamping {
                    out,
                    service: None,
                    t_in,
                    inherit: *msg.hops(),
                };
                self.on_message(msg, &mut emit);
            }
        }
        set_current_stage(previous);
    }

    /// Runs [`poll_extra`](Self::poll_extra) with outputs stamped. (Provided.)
    #[inline]
    fn process_extra<E: Emit<Self::Out>>(
        &mut self,
        _meters: &mut [StageMeter],
        out: &mut E,
    ) -> usize {
        let previous = set_current_stage(self.name());
        let mut emit = Stamping {
            out,
            service: None,
            t_in: 0,
            inherit: Hops::default(),
        };
        let n = self.poll_extra(&mut emit);
        set_current_stage(previous);
        n
    }

    /// Runs [`on_shutdown`](Self::on_shutdown) with outputs stamped. (Provided.)
    fn process_shutdown<E: Emit<Self::Out>>(&mut self, _meters: &mut [StageMeter], out: &mut E) {
        let previous = set_current_stage(self.name());
        let mut emit = Stamping {
            out,
            service: None,
            t_in: 0,
            inherit: Hops::default(),
        };
        self.on_shutdown(&mut emit);
        set_current_stage(previous);
    }
}

/// The emitter a stage sees inside [`Stage::process`]: stamps, ends the service time on the
/// first output, then hands on.
struct Stamping<'a, E> {
    out: &'a mut E,
    /// `Some` until the service time has been recorded.
    service: Option<&'a mut Recorder>,
    t_in: u64,
    inherit: Hops,
}

impl<T: Message, E: Emit<T>> Emit<T> for Stamping<'_, E> {
    #[inline]
    fn emit(&mut self, mut msg: T) {
        let t = now_raw();
        if let Some(service) = self.service.take() {
            service.record(ticks_to_ns(self.t_in, t));
        }
        let hops = msg.hops_mut();
        if hops.is_empty() {
            *hops = self.inherit;
        }
        hops.stamp(t);
        self.out.emit(msg);
    }
}

/// Two stages run as one: `A`'s output is handed to `B` by a direct call, no ring. Nestable:
/// `Fused<Fused<A, B>, C>`. Each inner stage keeps its own recorders and stamps its own hop.
///
/// Delegation: `poll_extra` and `on_start`, `on_shutdown` run on both (A first);
/// `extra_ready` is either's; `park` is `A`'s (put an I/O stage first in a chain, if at all).
#[derive(Debug, Clone)]
pub struct Fused<A, B> {
    a: A,
    b: B,
    name: &'static str,
}

/// Fuses `a` and `b` into one stage (named `"fused"`; see [`Fused::named`]).
pub fn fuse<A: Stage, B: Stage<In = A::Out>>(a: A, b: B) -> Fused<A, B> {
    Fused {
        a,
        b,
        name: "fused",
    }
}

impl<A, B> Fused<A, B> {
    /// Renames the fused stage (the inner stages keep their own names for recorders).
    pub fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// The first stage.
    pub fn first(&self) -> &A {
        &self.a
    }

    /// The second stage.
    pub fn second(&self) -> &B {
        &self.b
    }

    /// Takes the two stages apart again.
    pub fn into_inner(self) -> (A, B) {
        (self.a, self.b)
    }
}

/// Uninstrumented hand-over from `A` to `B` (used by `on_message`, `poll_extra`).
struct Direct<'a, B, E> {
    b: &'a mut B,
    out: &'a mut E,
}

impl<B: Stage, E: Emit<B::Out>> Emit<B::In> for Direct<'_, B, E> {
    #[inline]
    fn emit(&mut self, msg: B::In) {
        self.b.on_message(msg, self.out);
    }
}

/// Instrumented hand-over: `B` starts at `A`'s emit stamp.
struct Bridge<'a, B, E> {
    b: &'a mut B,
    meters: &'a mut [StageMeter],
    out: &'a mut E,
}

impl<B: Stage, E: Emit<B::Out>> Emit<B::In> for Bridge<'_, B, E> {
    #[inline]
    fn emit(&mut self, msg: B::In) {
        let t_in = match msg.hops().last() {
            Some(t) => t,
            None => now_raw(),
        };
        if let Some(meter) = self.meters.first_mut() {
            meter.queue_wait.record(0);
        }
        let previous = current_stage();
        self.b.process(msg, t_in, self.meters, self.out);
        set_current_stage(previous);
    }
}

impl<A, B> Stage for Fused<A, B>
where
    A: Stage,
    B: Stage<In = A::Out>,
{
    type In = A::In;
    type Out = B::Out;

    fn name(&self) -> &'static str {
        self.name
    }

    #[inline]
    fn on_message<E: Emit<Self::Out>>(&mut self, msg: Self::In, out: &mut E) {
        self.a.on_message(
            msg,
            &mut Direct {
                b: &mut self.b,
                out,
            },
        );
    }

    fn poll_extra<E: Emit<Self::Out>>(&mut self, out: &mut E) -> usize {
        let n = self.a.poll_extra(&mut Direct {
            b: &mut self.b,
            out,
        });
        n + self.b.poll_extra(out)
    }

    fn extra_ready(&mut self) -> bool {
        self.a.extra_ready() || self.b.extra_ready()
    }

    fn park(&mut self, timeout: Option<Duration>) {
        // Park on the stage that waits on its own readiness source (an I/O poller), if
        // either does; its `on_start` has made the input ring wake that poller too.
        if self.b.owns_park() && !self.a.owns_park() {
            self.b.park(timeout);
        } else {
            self.a.park(timeout);
        }
    }

    fn owns_park(&self) -> bool {
        self.a.owns_park() || self.b.owns_park()
    }

    fn on_start(&mut self, input_signal: &Arc<Signal>) {
        self.a.on_start(input_signal);
        self.b.on_start(input_signal);
    }

    fn on_shutdown<E: Emit<Self::Out>>(&mut self, out: &mut E) {
        self.a.on_shutdown(&mut Direct {
            b: &mut self.b,
            out,
        });
        self.b.on_shutdown(out);
    }

    fn depth(&self) -> usize {
        self.a.depth() + self.b.depth()
    }

    fn for_each_name(&self, f: &mut dyn FnMut(&'static str)) {
        self.a.for_each_name(f);
        self.b.for_each_name(f);
    }

    #[inline]
    fn process<E: Emit<Self::Out>>(
        &mut self,
        msg: Self::In,
        t_in: u64,
        meters: &mut [StageMeter],
        out: &mut E,
    ) {
        let split = self.a.depth().min(meters.len());
        let (ma, mb) = meters.split_at_mut(split);
        self.a.process(
            msg,
            t_in,
            ma,
            &mut Bridge {
                b: &mut self.b,
                meters: mb,
                out,
            },
        );
    }

    fn process_extra<E: Emit<Self::Out>>(
        &mut self,
        meters: &mut [StageMeter],
        out: &mut E,
    ) -> usize {
        let split = self.a.depth().min(meters.len());
        let (ma, mb) = meters.split_at_mut(split);
        let n = self.a.process_extra(
            ma,
            &mut Bridge {
                b: &mut self.b,
                meters: &mut *mb,
                out,
            },
        );
        n + self.b.process_extra(mb, out)
    }

    fn process_shutdown<E: Emit<Self::Out>>(&mut self, meters: &mut [StageMeter], out: &mut E) {
        let split = self.a.depth().min(meters.len());
        let (ma, mb) = meters.split_at_mut(split);
        self.a.process_shutdown(
            ma,
            &mut Bridge {
                b: &mut self.b,
                meters: &mut *mb,
                out,
            },
        );
        self.b.process_shutdown(mb, out);
    }
}

#[cfg(test)]
mod park_delegation_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::message::NoMessage;

    struct Plain;
    impl Stage for Plain {
        type In = NoMessage;
        type Out = NoMessage;
        fn name(&self) -> &'static str {
            "plain"
        }
        fn on_message<E: Emit<NoMessage>>(&mut self, msg: NoMessage, out: &mut E) {
            out.emit(msg);
        }
    }

    struct Io(Arc<AtomicUsize>);
    impl Stage for Io {
        type In = NoMessage;
        type Out = NoMessage;
        fn name(&self) -> &'static str {
            "io"
        }
        fn on_message<E: Emit<NoMessage>>(&mut self, msg: NoMessage, out: &mut E) {
            out.emit(msg);
        }
        fn owns_park(&self) -> bool {
            true
        }
        fn park(&mut self, _timeout: Option<Duration>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_fused_chain_parks_on_its_io_stage_wherever_it_stands() {
        let parked = Arc::new(AtomicUsize::new(0));
        let mut tail = fuse(fuse(Plain, Plain), Io(Arc::clone(&parked)));
        assert!(tail.owns_park());
        tail.park(Some(Duration::from_millis(1)));
        assert_eq!(parked.load(Ordering::Relaxed), 1);
        let mut head = fuse(Io(Arc::clone(&parked)), Plain);
        head.park(Some(Duration::from_millis(1)));
        assert_eq!(parked.load(Ordering::Relaxed), 2);
        let mut none = fuse(Plain, Plain);
        assert!(!none.owns_park());
        none.park(Some(Duration::from_millis(1))); // thread park with timeout: returns
        assert_eq!(parked.load(Ordering::Relaxed), 2);
    }
}
