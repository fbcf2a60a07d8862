//! The broadcast connection's steady state allocates nothing: send, wait for
//! readiness, read the reply, hand it to the caller. Counted by a global
//! allocator that only counts on the test's own thread while armed (anvil's
//! output drain threads allocate freely).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use common::{await_replies, broadcast, spawn_anvil, transfer};
use venues::{AnvilConfig, dev_address};

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator can run while thread-locals are torn down.
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = COUNT.try_with(|c| c.set(c.get() + 1));
        }
    });
}

// SAFETY: defers every operation to `System`, only counting on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_send_and_reply_do_not_allocate() {
    let anvil = spawn_anvil(&AnvilConfig::with_block_time(Duration::from_secs(1)));
    let fees = anvil.rpc().unwrap().fee_estimate().unwrap();
    let (mut conn, mut poll) = broadcast(&anvil);

    const WARMUP: u64 = 16;
    const MEASURED: u64 = 200;
    let txs: Vec<_> = (0..WARMUP + MEASURED)
        .map(|nonce| transfer(5, 31337, nonce, dev_address(6), 1, fees).0)
        .collect();

    // Warm-up: buffers reach their working size, lazy statics initialise.
    for (i, raw) in txs[..WARMUP as usize].iter().enumerate() {
        conn.send_raw_transaction(raw, i as u64).unwrap();
        let r = await_replies(&mut conn, &mut poll, 1);
        assert!(r[0].1.is_ok(), "{r:?}");
    }

    let mut events = mio::Events::with_capacity(16);
    let mut ok = 0u64;
    let mut failed = 0u64;
    let deadline = std::time::Instant::now() + common::WAIT;
    ARMED.with(|a| a.set(true));
    for raw in &txs[WARMUP as usize..] {
        conn.send_raw_transaction(raw, 0).unwrap();
        let before = ok + failed;
        while ok + failed == before {
            conn.poll_responses(|_, r| if r.is_ok() { ok += 1 } else { failed += 1 })
                .unwrap();
            if ok + failed == before {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no reply within the bound"
                );
                poll.poll(&mut events, Some(Duration::from_secs(1)))
                    .unwrap();
            }
        }
    }
    ARMED.with(|a| a.set(false));
    let allocations = COUNT.with(Cell::get);

    assert_eq!((ok, failed), (MEASURED, 0));
    assert_eq!(
        allocations, 0,
        "{allocations} allocations in {MEASURED} send/reply cycles"
    );
}
