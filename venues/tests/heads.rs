//! The head follower against a real anvil: heads, block receipts, fee view.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use common::{WAIT, spawn_anvil, transfer};
use mio::{Events, Poll, Token};
use venues::{
    AnvilConfig, BroadcastConnection, FeeEstimate, FeeView, HeadEvent, HeadFollower, dev_address,
};

const HEADS: Token = Token(1);
const BROADCAST: Token = Token(2);
const GWEI: u128 = 1_000_000_000;

/// Polls until `done` says so, collecting events; panics after [`WAIT`].
fn follow_until(
    follower: &mut HeadFollower,
    poll: &mut Poll,
    mut done: impl FnMut(&[HeadEvent]) -> bool,
) -> Vec<HeadEvent> {
    let mut seen = Vec::new();
    let mut events = Events::with_capacity(16);
    let deadline = Instant::now() + WAIT;
    loop {
        follower.poll(|e| seen.push(e)).unwrap();
        if done(&seen) {
            return seen;
        }
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("timed out after {WAIT:?}; events so far: {seen:#?}"));
        poll.poll(&mut events, Some(left)).unwrap();
    }
}

#[test]
fn a_broadcast_transfer_comes_back_as_a_head_and_its_receipt() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let fees = Arc::new(FeeView::new(FeeEstimate::default()));
    let mut poll = Poll::new().unwrap();
    let mut follower = HeadFollower::connect(&anvil.ws_url(), Arc::clone(&fees)).unwrap();
    follower.register(poll.registry(), HEADS).unwrap();
    assert!(follower.subscription_id().starts_with("0x"));
    let mut conn = BroadcastConnection::connect(&anvil.ws_url()).unwrap();
    conn.register(poll.registry(), BROADCAST).unwrap();

    let fee_now = anvil.rpc().unwrap().fee_estimate().unwrap();
    let (raw, hash) = transfer(0, 31337, 0, dev_address(1), 5, fee_now);
    conn.send_raw_transaction(&raw, 9).unwrap();

    let seen = follow_until(&mut follower, &mut poll, |seen| {
        seen.iter().any(|e| {
            matches!(e, HeadEvent::BlockReceipts { receipts, .. }
            if receipts.iter().any(|r| r.tx_hash == hash))
        })
    });
    let mut replies = Vec::new();
    conn.poll_responses(|tag, r| replies.push((tag, r)))
        .unwrap();
    assert_eq!(replies, vec![(9, Ok(hash))]);

    let HeadEvent::BlockReceipts {
        number,
        hash: block_hash,
        receipts,
    } = seen.last().unwrap()
    else {
        panic!("{seen:#?}")
    };
    let head_pos = seen
        .iter()
        .position(|e| matches!(e, HeadEvent::NewHead { hash, .. } if hash == block_hash))
        .expect("NewHead before its receipts");
    let HeadEvent::NewHead {
        number: head_number,
        base_fee_per_gas,
        parent_hash,
        timestamp,
        ..
    } = seen[head_pos].clone()
    else {
        unreachable!()
    };
    assert_eq!(head_number, *number);
    assert_ne!(parent_hash, B256::ZERO);
    assert!(timestamp > 0);
    let base_fee = base_fee_per_gas.expect("post-London header");

    assert_eq!(receipts.len(), 1);
    let r = receipts[0];
    assert_eq!(r.tx_hash, hash);
    assert!(r.success);
    assert_eq!(r.gas_used, 21_000);
    assert_eq!((r.block_number, r.block_hash), (*number, *block_hash));
    assert_eq!((r.from, r.to), (dev_address(0), Some(dev_address(1))));

    // The base fee is in the view before NewHead is reported; the tip comes
    // with its own reply, on the same connection.
    follow_until(&mut follower, &mut poll, |_| {
        fees.load().max_priority_fee_per_gas != 0
    });
    assert_eq!(fees.updated_block(), *number);
    assert_eq!(
        fees.load(),
        FeeEstimate {
            base_fee_per_gas: base_fee,
            max_priority_fee_per_gas: GWEI
        }
    );
    assert_eq!(follower.pending_requests(), 0);
}

#[test]
fn with_a_block_time_heads_chain_and_each_gets_its_receipts() {
    let anvil = spawn_anvil(&AnvilConfig::with_block_time(Duration::from_millis(300)));
    let fees = Arc::new(FeeView::default());
    let mut poll = Poll::new().unwrap();
    let mut follower = HeadFollower::connect(&anvil.ws_url(), Arc::clone(&fees)).unwrap();
    follower.register(poll.registry(), HEADS).unwrap();

    let receipts_of = |seen: &[HeadEvent]| {
        seen.iter()
            .filter(|e| matches!(e, HeadEvent::BlockReceipts { .. }))
            .count()
    };
    let seen = follow_until(&mut follower, &mut poll, |seen| receipts_of(seen) >= 3);

    let heads: Vec<_> = seen
        .iter()
        .filter_map(|e| match e {
            HeadEvent::NewHead {
                number,
                hash,
                parent_hash,
                ..
            } => Some((*number, *hash, *parent_hash)),
            _ => None,
        })
        .collect();
    assert!(heads.len() >= 3, "{seen:#?}");
    for pair in heads.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "consecutive numbers: {heads:?}");
        assert_eq!(pair[1].2, pair[0].1, "parent hash links: {heads:?}");
    }
    for e in &seen {
        if let HeadEvent::BlockReceipts {
            number,
            hash,
            receipts,
        } = e
        {
            assert!(receipts.is_empty(), "no transactions were sent");
            assert!(
                heads.iter().any(|h| h.0 == *number && h.1 == *hash),
                "{e:?} has no head"
            );
        }
    }
    assert!(fees.updated_block() >= heads[0].0);
    assert!(fees.load().base_fee_per_gas > 0);
}
