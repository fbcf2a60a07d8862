//! `Output::OneToOneLazy` delivers every message, in order, without waking the consumer per
//! message; a parked consumer picks them up at its next wake (here: its park timeout).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pipeline::{
    Emit, Hops, Input, Message, NoMessage, Output, PipelineBuilder, Stage, ThreadConfig, WaitKind,
    one_to_one,
};

#[derive(Clone, Copy, Debug, Default)]
struct Num {
    n: u64,
    hops: Hops,
}

impl Message for Num {
    fn hops(&self) -> &Hops {
        &self.hops
    }
    fn hops_mut(&mut self) -> &mut Hops {
        &mut self.hops
    }
}

struct Forward;
impl Stage for Forward {
    type In = Num;
    type Out = Num;
    fn name(&self) -> &'static str {
        "forward"
    }
    fn on_message<E: Emit<Num>>(&mut self, msg: Num, out: &mut E) {
        out.emit(msg);
    }
}

struct Collect(Arc<Mutex<Vec<u64>>>);
impl Stage for Collect {
    type In = Num;
    type Out = NoMessage;
    fn name(&self) -> &'static str {
        "collect"
    }
    fn on_message<E: Emit<NoMessage>>(&mut self, msg: Num, _out: &mut E) {
        self.0.lock().unwrap().push(msg.n);
    }
}

#[test]
fn lazy_output_delivers_everything_in_order() {
    let (mut src, src_rx) = one_to_one::<Num>(64);
    let (lazy_tx, lazy_rx) = one_to_one::<Num>(16);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut b = PipelineBuilder::new();
    b.spawn(
        ThreadConfig::new("forward", WaitKind::SpinYieldPark),
        Input::OneToOne(src_rx),
        Forward,
        Output::OneToOneLazy(lazy_tx),
    )
    .unwrap();
    b.spawn(
        ThreadConfig::new("collect", WaitKind::SpinYieldPark),
        Input::OneToOne(lazy_rx),
        Collect(Arc::clone(&seen)),
        Output::Discard,
    )
    .unwrap();
    let p = b.start();
    // More than the lazy ring holds, so the full-ring path (which does wake) is taken too.
    for n in 0..200u64 {
        let mut m = Num {
            n,
            ..Num::default()
        };
        loop {
            match src.try_push(m) {
                Ok(()) => break,
                Err(pipeline::Full(back)) => {
                    m = back;
                    std::thread::yield_now();
                }
            }
        }
    }
    // Delivered without any explicit wake of the collector: it finds them on its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    p.shutdown().unwrap();
    assert_eq!(*seen.lock().unwrap(), (0..200).collect::<Vec<_>>());
}
