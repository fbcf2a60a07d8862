//! The hot path's connection against a real anvil, driven by mio readiness.

mod common;

use std::time::{Duration, Instant};

use common::{WAIT, await_replies, broadcast, spawn_anvil, transfer, wait_receipt};
use mio::Events;
use venues::{AnvilConfig, VenueError, dev_address};

#[test]
fn sends_a_signed_transfer_and_gets_its_hash_back() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let mut rpc = anvil.rpc().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let (mut conn, mut poll) = broadcast(&anvil);

    let (raw, hash) = transfer(0, 31337, 0, dev_address(1), 1, fees);
    conn.send_raw_transaction(&raw, 42).unwrap();
    assert_eq!(conn.in_flight(), 1);
    let replies = await_replies(&mut conn, &mut poll, 1);
    assert_eq!(replies, vec![(42, Ok(hash))]);
    assert_eq!(conn.in_flight(), 0);
    assert!(!conn.write_pending());

    let receipt = wait_receipt(&mut rpc, hash);
    assert!(receipt.success);
    assert_eq!(receipt.gas_used, 21_000);
}

#[test]
fn duplicate_and_bad_nonce_are_rpc_errors_and_the_connection_survives() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let mut rpc = anvil.rpc().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let (mut conn, mut poll) = broadcast(&anvil);

    let (raw, hash) = transfer(0, 31337, 0, dev_address(1), 1, fees);
    conn.send_raw_transaction(&raw, 1).unwrap();
    assert_eq!(await_replies(&mut conn, &mut poll, 1), vec![(1, Ok(hash))]);
    wait_receipt(&mut rpc, hash);

    // The same bytes again, and a different transaction reusing nonce 0.
    conn.send_raw_transaction(&raw, 2).unwrap();
    let (stale, _) = transfer(0, 31337, 0, dev_address(2), 7, fees);
    conn.send_raw_transaction(&stale, 3).unwrap();
    let mut replies = await_replies(&mut conn, &mut poll, 2);
    // anvil handles requests concurrently: replies can overtake each other.
    replies.sort_by_key(|r| r.0);
    assert_eq!(replies.iter().map(|r| r.0).collect::<Vec<_>>(), vec![2, 3]);
    for (tag, r) in &replies {
        let err = r.as_ref().expect_err("must be refused");
        assert_ne!(err.code, 0, "tag {tag}: {err:?}");
        assert!(!err.message.is_empty(), "tag {tag}: {err:?}");
    }
    assert!(
        replies[1]
            .1
            .as_ref()
            .unwrap_err()
            .message
            .to_lowercase()
            .contains("nonce"),
        "{replies:?}"
    );

    // Still usable.
    let (next, next_hash) = transfer(0, 31337, 1, dev_address(1), 1, fees);
    conn.send_raw_transaction(&next, 4).unwrap();
    assert_eq!(
        await_replies(&mut conn, &mut poll, 1),
        vec![(4, Ok(next_hash))]
    );
}

#[test]
fn pipelined_sends_each_come_back_with_their_own_tag() {
    // A fixed block time: under a burst, automine can stop mining.
    let anvil = spawn_anvil(&AnvilConfig::with_block_time(Duration::from_secs(1)));
    let mut rpc = anvil.rpc().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let (mut conn, mut poll) = broadcast(&anvil);

    const N: u64 = 200;
    let txs: Vec<_> = (0..N)
        .map(|nonce| transfer(3, 31337, nonce, dev_address(4), 1, fees))
        .collect();
    for (i, (raw, _)) in txs.iter().enumerate() {
        conn.send_raw_transaction(raw, 1000 + i as u64).unwrap();
    }
    let mut replies = await_replies(&mut conn, &mut poll, N as usize);
    assert_eq!(conn.in_flight(), 0);
    replies.sort_by_key(|r| r.0);
    for (i, (tag, r)) in replies.into_iter().enumerate() {
        assert_eq!(tag, 1000 + i as u64);
        assert_eq!(r, Ok(txs[i].1), "tag {tag}");
    }
    assert_eq!(rpc.transaction_count(dev_address(3), "pending").unwrap(), N);
}

#[test]
fn a_dead_node_is_reported_as_an_error_not_a_hang() {
    let mut anvil = spawn_anvil(&AnvilConfig::default());
    let (mut conn, mut poll) = broadcast(&anvil);
    anvil.kill();

    let mut events = Events::with_capacity(4);
    let deadline = Instant::now() + WAIT;
    let err = loop {
        match conn.poll_responses(|_, _| panic!("no reply expected")) {
            Ok(0) => {}
            Ok(n) => panic!("{n} unexpected replies"),
            Err(e) => break e,
        }
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("no error within 20 s");
        poll.poll(&mut events, Some(left)).unwrap();
    };
    // A reset without a closing handshake is reported as Closed too.
    assert!(
        matches!(err, VenueError::Closed | VenueError::Io(_)),
        "{err:?}"
    );
    assert!(matches!(
        conn.poll_responses(|_, _| {}),
        Err(VenueError::Closed)
    ));
    assert!(matches!(
        conn.send_raw_transaction(&[1, 2, 3], 0),
        Err(VenueError::Closed)
    ));
}
