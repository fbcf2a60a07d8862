//! Ring tests. Kept small enough to run under Miri (`cargo +nightly miri test -p pipeline --lib
//! ring`), where the iteration counts shrink further.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use proptest::prelude::*;

use super::*;

const N: u64 = if cfg!(miri) { 300 } else { 200_000 };

#[test]
#[should_panic(expected = "power of two")]
fn capacity_must_be_a_power_of_two() {
    let _ = one_to_one::<u64>(3);
}

#[test]
#[should_panic(expected = "power of two")]
fn capacity_must_not_be_zero() {
    let _ = many_to_one::<u64>(0);
}

#[test]
fn full_ring_hands_the_value_back() {
    let (mut p, mut c) = one_to_one::<u32>(2);
    assert_eq!(p.capacity(), 2);
    assert_eq!(p.free_slots(), 2);
    p.try_push(1).unwrap();
    p.try_push(2).unwrap();
    assert_eq!(p.try_push(3), Err(Full(3)));
    assert_eq!(p.free_slots(), 0);
    assert_eq!(c.len(), 2);
    assert_eq!(c.pop(), Some(1));
    p.try_push(3).unwrap();
    assert_eq!(c.pop(), Some(2));
    assert_eq!(c.pop(), Some(3));
    assert_eq!(c.pop(), None);
    assert!(c.is_empty());

    let (mp, mut mc) = many_to_one::<u32>(2);
    mp.try_push(1).unwrap();
    mp.clone().try_push(2).unwrap();
    assert_eq!(mp.try_push(3), Err(Full(3)));
    assert_eq!(mc.len(), 2);
    assert_eq!(mc.pop(), Some(1));
    mp.try_push(3).unwrap();
    assert_eq!(mc.pop_batch(8, |_| {}), 2);
    assert!(mc.is_empty());
}

#[test]
fn batch_push_takes_a_prefix() {
    let (mut p, mut c) = one_to_one::<u8>(4);
    assert_eq!(p.try_push_batch(&[1, 2, 3]), 3);
    assert_eq!(p.try_push_batch(&[4, 5, 6]), 1);
    assert_eq!(p.try_push_batch(&[7]), 0);
    let mut got = Vec::new();
    assert_eq!(c.pop_batch(2, |v| got.push(v)), 2);
    assert_eq!(c.pop_batch(10, |v| got.push(v)), 2);
    assert_eq!(got, [1, 2, 3, 4]);
    assert_eq!(c.pop_batch(10, |_| {}), 0);
}

#[test]
fn consumer_gone_is_visible_to_producers() {
    let (p, c) = one_to_one::<u8>(4);
    assert!(!p.is_consumer_gone());
    drop(c);
    assert!(p.is_consumer_gone());
    let (p, c) = many_to_one::<u8>(4);
    drop(c);
    assert!(p.is_consumer_gone());
}

#[test]
fn a_panicking_batch_callback_does_not_redeliver() {
    let (mut p, mut c) = one_to_one::<u32>(8);
    assert_eq!(p.try_push_batch(&[1, 2, 3, 4]), 4);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.pop_batch(8, |v| assert!(v < 2, "boom"));
    }));
    assert!(r.is_err());
    assert_eq!(c.pop(), Some(3));
    assert_eq!(p.free_slots(), 7);
}

#[test]
fn one_to_one_two_threads_in_order() {
    for cap in [1usize, 2, 8, 64] {
        let (mut p, mut c) = one_to_one::<u64>(cap);
        let producer = thread::spawn(move || {
            let mut i = 0;
            let mut batch = [0u64; 5];
            while i < N {
                if i % 3 == 0 {
                    let k = (N - i).min(5) as usize;
                    for (j, slot) in batch[..k].iter_mut().enumerate() {
                        *slot = i + j as u64;
                    }
                    i += p.try_push_batch(&batch[..k]) as u64;
                } else if p.try_push(i).is_ok() {
                    i += 1;
                }
                if cfg!(miri) {
                    thread::yield_now();
                }
            }
        });
        let mut next = 0;
        while next < N {
            let n = c.pop_batch(7, |v| {
                assert_eq!(v, next);
                next += 1;
            });
            if n == 0 {
                thread::yield_now();
            }
        }
        producer.join().unwrap();
        assert_eq!(c.pop(), None);
    }
}

#[test]
fn many_to_one_no_loss_no_duplication_per_producer_order() {
    for cap in [2usize, 16] {
        many_to_one_three_producers(cap);
    }
}

fn many_to_one_three_producers(cap: usize) {
    const PRODUCERS: u64 = 3;
    let per = N / PRODUCERS;
    let (p, mut c) = many_to_one::<(u64, u64)>(cap);
    let handles: Vec<_> = (0..PRODUCERS)
        .map(|id| {
            let p = p.clone();
            thread::spawn(move || {
                for i in 0..per {
                    let mut v = (id, i);
                    while let Err(Full(back)) = p.try_push(v) {
                        v = back;
                        thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let mut next = [0u64; PRODUCERS as usize];
    let mut total = 0;
    while total < per * PRODUCERS {
        let n = c.pop_batch(5, |(id, i)| {
            assert_eq!(next[id as usize], i, "producer {id} out of order");
            next[id as usize] += 1;
        });
        total += n as u64;
        if n == 0 {
            thread::yield_now();
        }
    }
    for h in handles {
        h.join().unwrap();
    }
    assert!(c.is_empty());
    assert_eq!(next, [per; PRODUCERS as usize]);
}

#[test]
fn notify_wakes_only_a_sleeping_consumer() {
    struct Never;
    impl crate::wait::Idle for Never {
        fn ready(&mut self) -> bool {
            false
        }
        fn park(&mut self, _: Option<std::time::Duration>) {}
    }
    let (mut p, _c) = one_to_one::<u8>(4);
    let wakes = Arc::new(AtomicUsize::new(0));
    let w = Arc::clone(&wakes);
    p.signal().set_waker(Waker::Custom(Arc::new(move || {
        w.fetch_add(1, Ordering::Relaxed);
    })));
    // A second waker is ignored: the first one wins.
    p.signal()
        .set_waker(Waker::Custom(Arc::new(|| panic!("second waker used"))));
    p.try_push(1).unwrap();
    assert_eq!(wakes.load(Ordering::Relaxed), 0);
    assert!(!p.signal().is_sleeping());
    // While "asleep" (inside the park callback) a push must wake.
    struct PushWhileParked<'a>(&'a mut OneToOneProducer<u8>, bool);
    impl crate::wait::Idle for PushWhileParked<'_> {
        fn ready(&mut self) -> bool {
            false
        }
        fn park(&mut self, _: Option<std::time::Duration>) {
            assert!(self.0.signal().is_sleeping());
            self.1 = self.0.try_push(2).is_ok();
        }
    }
    let signal = Arc::clone(p.signal());
    let mut idle = PushWhileParked(&mut p, false);
    assert!(signal.sleep(&mut idle, None));
    assert!(idle.1);
    assert_eq!(wakes.load(Ordering::Relaxed), 1);
    assert!(!signal.sleep(&mut Never, None) || !signal.is_sleeping());
}

#[derive(Debug, Clone)]
enum Op {
    Push(u8),
    Pop(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![(1u8..20).prop_map(Op::Push), (1u8..20).prop_map(Op::Pop)]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if cfg!(miri) { 4 } else { 256 },
        ..ProptestConfig::default()
    })]

    /// Against a VecDeque model: any interleaving of batch pushes and pops, across many
    /// wrap-arounds, keeps order and neither loses nor duplicates.
    #[test]
    fn one_to_one_matches_a_queue(cap_log in 0u32..5, ops in prop::collection::vec(op(), 1..200)) {
        let cap = 1usize << cap_log;
        let (mut p, mut c) = one_to_one::<u64>(cap);
        let mut model = VecDeque::new();
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Push(k) => {
                    let batch: Vec<u64> = (next..next + u64::from(k)).collect();
                    let pushed = if k == 1 {
                        usize::from(p.try_push(batch[0]).is_ok())
                    } else {
                        p.try_push_batch(&batch)
                    };
                    prop_assert_eq!(pushed, (cap - model.len()).min(k as usize));
                    model.extend(&batch[..pushed]);
                    next += pushed as u64;
                    prop_assert_eq!(p.free_slots(), cap - model.len());
                }
                Op::Pop(k) => {
                    let mut got = Vec::new();
                    let n = c.pop_batch(k as usize, |v| got.push(v));
                    let want: Vec<u64> = model.drain(..(k as usize).min(model.len())).collect();
                    prop_assert_eq!(n, want.len());
                    prop_assert_eq!(got, want);
                }
            }
            prop_assert_eq!(c.len(), model.len());
        }
    }

    #[test]
    fn many_to_one_matches_a_queue(cap_log in 0u32..5, ops in prop::collection::vec(op(), 1..200)) {
        let (p, mut c) = many_to_one::<u64>(1usize << cap_log);
        let cap = c.capacity();
        let p2 = p.clone();
        let mut model = VecDeque::new();
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Push(k) => {
                    for _ in 0..k {
                        let producer = if next.is_multiple_of(2) { &p } else { &p2 };
                        match producer.try_push(next) {
                            Ok(()) => { model.push_back(next); next += 1; }
                            Err(Full(v)) => { prop_assert_eq!(v, next); prop_assert_eq!(model.len(), cap); }
                        }
                    }
                }
                Op::Pop(k) => {
                    let mut got = Vec::new();
                    let n = c.pop_batch(k as usize, |v| got.push(v));
                    let want: Vec<u64> = model.drain(..(k as usize).min(model.len())).collect();
                    prop_assert_eq!(n, want.len());
                    prop_assert_eq!(got, want);
                }
            }
            prop_assert_eq!(c.len(), model.len());
        }
    }

    /// Two threads, random batch sizes on both sides, capacity from 1 to 16.
    #[test]
    fn one_to_one_threads_random_batches(
        cap_log in 0u32..5,
        push_sizes in prop::collection::vec(1usize..9, 1..16),
        pop_sizes in prop::collection::vec(1usize..9, 1..16),
    ) {
        let total: u64 = if cfg!(miri) { 50 } else { 5_000 };
        let (mut p, mut c) = one_to_one::<u64>(1 << cap_log);
        let producer = thread::spawn(move || {
            let mut i = 0u64;
            let mut k = 0;
            let mut buf = Vec::new();
            while i < total {
                let size = push_sizes[k % push_sizes.len()].min((total - i) as usize);
                k += 1;
                buf.clear();
                buf.extend(i..i + size as u64);
                i += p.try_push_batch(&buf) as u64;
                thread::yield_now();
            }
        });
        let mut next = 0u64;
        let mut k = 0;
        let mut ok = true;
        while next < total {
            let n = c.pop_batch(pop_sizes[k % pop_sizes.len()], |v| {
                ok &= v == next;
                next += 1;
            });
            k += 1;
            if n == 0 { thread::yield_now(); }
        }
        producer.join().unwrap();
        prop_assert!(ok);
        prop_assert!(c.is_empty());
    }
}

#[test]
fn probes_read_the_fill_level() {
    let (mut p, mut c) = one_to_one::<u64>(8);
    let probe = p.probe();
    let from_consumer = c.probe();
    assert_eq!((probe.len(), probe.capacity()), (0, 8));
    assert!(probe.is_empty());
    for i in 0..8 {
        p.try_push(i).unwrap();
        assert_eq!(probe.len(), i as usize + 1);
    }
    assert_eq!(from_consumer.len(), 8);
    for i in 0..8 {
        c.pop().unwrap();
        assert_eq!(probe.len(), 7 - i);
    }
    // Many laps, so the free-running indices pass the capacity many times.
    for i in 0..40u64 {
        p.try_push(i).unwrap();
        p.try_push(i).unwrap();
        c.pop().unwrap();
        assert_eq!(probe.len(), 1);
        c.pop().unwrap();
        assert!(probe.is_empty());
    }

    let (mp, mut mc) = many_to_one::<u64>(8);
    let probe = mp.probe();
    assert_eq!((probe.len(), probe.capacity()), (0, 8));
    assert_eq!(mc.probe().capacity(), 8);
    for i in 0..8 {
        mp.try_push(i).unwrap();
        assert_eq!(probe.len(), i as usize + 1);
    }
    assert!(mp.try_push(99).is_err());
    assert_eq!(probe.len(), 8);
    for i in 0..8 {
        mc.pop().unwrap();
        assert_eq!(probe.len(), 7 - i);
    }
    for lap in 0..40u64 {
        let n = (lap % 8) as usize + 1;
        for i in 0..n {
            mp.try_push(i as u64).unwrap();
        }
        assert_eq!(probe.len(), n);
        for i in 0..n {
            mc.pop().unwrap();
            assert_eq!(probe.len(), n - i - 1);
        }
    }
}

#[test]
fn probe_stays_in_range_while_both_ends_run() {
    let (mp, mut mc) = many_to_one::<u64>(16);
    let probe = mp.probe();
    let producers: Vec<_> = (0..2)
        .map(|_| {
            let mp = mp.clone();
            thread::spawn(move || {
                let mut sent = 0;
                while sent < N / 4 {
                    if mp.try_push(sent).is_ok() {
                        sent += 1;
                    }
                }
            })
        })
        .collect();
    let watcher = thread::spawn(move || {
        for _ in 0..N / 4 {
            assert!(probe.len() <= probe.capacity());
        }
    });
    let mut got = 0;
    while got < N / 2 {
        if mc.pop().is_some() {
            got += 1;
        }
    }
    for p in producers {
        p.join().unwrap();
    }
    watcher.join().unwrap();
    assert_eq!(mc.probe().len(), 0);
}
