//! A policy decision allocates nothing: 10,000 allowlisted addresses, 1,000 KYT entries,
//! 100 velocity windows, business hours with a time zone, travel rule, four-eyes
//! thresholds, and a `[routing]` section that resolves `auto` intents to both routes.
//! Checked with a counting global allocator (one test in this binary, so no other test
//! thread allocates meanwhile).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use engine::msg::Route;
use engine::risk::fixture::{Sizes, large};
use engine::risk::rules::Outcome;

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_decision_allocates_nothing() {
    let now = engine::risk::unix_now_ns();
    let (mut risk, intents) = large(Sizes::default(), now);
    let mut tally = [0usize; 3];
    let mut routes = [0usize; 3];
    let mut run = |risk: &mut engine::risk::rules::Risk, from: usize, n: usize| {
        for i in from..from + n {
            let m = &intents[i % intents.len()];
            let v = risk.decide(m, &[], now + i as u64 * 1_000);
            tally[match v.outcome {
                Outcome::Allow => 0,
                Outcome::Deny(..) => 1,
                Outcome::Approval(_) | Outcome::Verify => 2,
            }] += 1;
            if v.outcome == Outcome::Allow {
                routes[v.route as usize] += 1;
            }
        }
    };
    run(&mut risk, 0, 10_000); // warm-up: time-zone tables, first touches
    let before = ALLOCS.load(Ordering::Relaxed);
    run(&mut risk, 10_000, 100_000);
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert!(tally.iter().all(|&n| n > 1000), "every path ran: {tally:?}");
    assert_eq!(routes[Route::Auto as usize], 0, "auto always resolves");
    assert!(
        routes[Route::Public as usize] > 1000 && routes[Route::Private as usize] > 1000,
        "both routes taken: {routes:?}"
    );
    assert_eq!(allocs, 0, "allocations over 100,000 decisions");
}
