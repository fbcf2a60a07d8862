//! Model checks of the rings' synchronisation and the park/unpark handshake with loom.
//!
//! Run (own target dir: the whole crate is rebuilt against loom's atomics):
//! `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=/work/target-loom cargo test -p pipeline --release --test loom`
//! Optionally bound the search with `LOOM_MAX_PREEMPTIONS=3`.
#![cfg(loom)]

use std::sync::Arc;
use std::time::Duration;

use loom::thread;
use pipeline::{
    Full, Idle, ManyToOneConsumer, OneToOneConsumer, Signal, SpinYieldPark, WaitStrategy, Waker,
    many_to_one, one_to_one,
};

/// Parks with loom's park (no timeout: a lost wakeup is a deadlock, which loom reports).
struct LoomIdle<'a, C: Pending>(&'a C);

trait Pending {
    fn pending(&self) -> bool;
}

impl<T: Copy + Send> Pending for OneToOneConsumer<T> {
    fn pending(&self) -> bool {
        !self.is_empty()
    }
}

impl<T: Copy + Send> Pending for ManyToOneConsumer<T> {
    fn pending(&self) -> bool {
        !self.is_empty()
    }
}

impl<C: Pending> Idle for LoomIdle<'_, C> {
    fn ready(&mut self) -> bool {
        self.0.pending()
    }
    fn park(&mut self, _timeout: Option<Duration>) {
        thread::park();
    }
}

fn loom_waker(signal: &Signal) {
    let me = thread::current();
    signal.set_waker(Waker::Custom(Arc::new(move || me.unpark())));
}

/// The wait strategy under test: no spinning or yielding, straight to the park handshake.
fn park_at_once() -> SpinYieldPark {
    SpinYieldPark::new(0, 0, Duration::from_secs(3600))
}

#[test]
fn one_to_one_wraps_around_in_order() {
    loom::model(|| {
        let (mut p, mut c) = one_to_one::<u32>(2);
        let producer = thread::spawn(move || {
            for i in 0..3 {
                let mut v = i;
                while let Err(Full(back)) = p.try_push(v) {
                    v = back;
                    thread::yield_now();
                }
            }
        });
        let mut next = 0;
        while next < 3 {
            match c.pop() {
                Some(v) => {
                    assert_eq!(v, next);
                    next += 1;
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
    });
}

#[test]
fn one_to_one_batches() {
    loom::model(|| {
        let (mut p, mut c) = one_to_one::<u32>(2);
        let producer = thread::spawn(move || {
            let values = [0, 1, 2];
            let mut sent = 0;
            while sent < values.len() {
                let n = p.try_push_batch(&values[sent..]);
                if n == 0 {
                    thread::yield_now();
                }
                sent += n;
            }
        });
        let mut next = 0;
        while next < 3 {
            let n = c.pop_batch(2, |v| {
                assert_eq!(v, next);
                next += 1;
            });
            if n == 0 {
                thread::yield_now();
            }
        }
        producer.join().unwrap();
    });
}

/// Two producers, capacity 2, three values: wraps around. Every loop is bounded (loom does not
/// assume fairness, so "retry until it fits" would not end); the check is that whatever was
/// pushed successfully is popped exactly once, in each producer's order, and nothing else.
#[test]
fn many_to_one_two_producers_wrap_around() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound.get_or_insert(3);
    model.check(|| {
        let (p, mut c) = many_to_one::<(u32, u32)>(2);
        let producers: Vec<_> = (0..2u32)
            .map(|id| {
                let p = p.clone();
                thread::spawn(move || {
                    let mut pushed = 0u32;
                    for i in 0..(2 - id) {
                        let mut ok = false;
                        for _ in 0..2 {
                            if p.try_push((id, i)).is_ok() {
                                ok = true;
                                break;
                            }
                            thread::yield_now();
                        }
                        if !ok {
                            break;
                        }
                        pushed += 1;
                    }
                    pushed
                })
            })
            .collect();
        let mut next = [0u32; 2];
        let mut check = |(id, i): (u32, u32)| {
            assert_eq!(next[id as usize], i, "producer {id} out of order");
            next[id as usize] += 1;
        };
        for _ in 0..3 {
            match c.pop() {
                Some(v) => check(v),
                None => thread::yield_now(),
            }
        }
        let pushed: Vec<u32> = producers.into_iter().map(|h| h.join().unwrap()).collect();
        while let Some(v) = c.pop() {
            check(v);
        }
        assert_eq!(next.to_vec(), pushed);
    });
}

#[test]
fn one_to_one_park_handshake_loses_no_wakeup() {
    loom::model(|| {
        let (mut p, mut c) = one_to_one::<u32>(2);
        let consumer = thread::spawn(move || {
            let signal = Arc::clone(c.signal());
            loom_waker(&signal);
            let mut wait = park_at_once();
            loop {
                if let Some(v) = c.pop() {
                    assert_eq!(v, 7);
                    break;
                }
                wait.idle(&signal, &mut LoomIdle(&c));
            }
        });
        let producer = thread::spawn(move || {
            // Maybe before, maybe after the consumer set its waker: either way it must work
            // (without a waker the consumer cannot be asleep yet).
            p.try_push(7).unwrap();
        });
        consumer.join().unwrap();
        producer.join().unwrap();
    });
}

#[test]
fn one_to_one_batch_push_wakes_a_parked_consumer() {
    loom::model(|| {
        let (mut p, mut c) = one_to_one::<u32>(4);
        let consumer = thread::spawn(move || {
            let signal = Arc::clone(c.signal());
            loom_waker(&signal);
            let mut wait = park_at_once();
            let mut got = 0;
            while got < 2 {
                let n = c.pop_batch(4, |_| {});
                if n == 0 {
                    wait.idle(&signal, &mut LoomIdle(&c));
                } else {
                    wait.reset();
                    got += n;
                }
            }
        });
        let producer = thread::spawn(move || {
            assert_eq!(p.try_push_batch(&[1, 2]), 2);
        });
        consumer.join().unwrap();
        producer.join().unwrap();
    });
}

#[test]
fn many_to_one_park_handshake_loses_no_wakeup() {
    loom::model(|| {
        let (p, mut c) = many_to_one::<u32>(2);
        let consumer = thread::spawn(move || {
            let signal = Arc::clone(c.signal());
            loom_waker(&signal);
            let mut wait = park_at_once();
            let mut got = 0;
            while got < 2 {
                if c.pop().is_some() {
                    got += 1;
                    wait.reset();
                } else {
                    wait.idle(&signal, &mut LoomIdle(&c));
                }
            }
        });
        let p2 = p.clone();
        let producer = thread::spawn(move || {
            p2.try_push(1).unwrap();
        });
        p.try_push(2).unwrap();
        consumer.join().unwrap();
        producer.join().unwrap();
    });
}
