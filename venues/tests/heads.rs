//! The head follower against a real anvil: heads, block receipts, fee view,
//! and reorganisations (`anvil_reorg`, `evm_revert`, and headers the node
//! skipped, through a relay that swallows them).

mod common;

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use alloy_primitives::{B256, hex};
use common::{WAIT, spawn_anvil, transfer, wait_receipt};
use mio::{Events, Poll, Token};
use serde_json::{Value, json};
use tungstenite::Message;
use venues::{
    AnvilConfig, BroadcastConnection, FeeEstimate, FeeView, HeadEvent, HeadFollower, RpcClient,
    dev_address,
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

const CHAIN_ID: u64 = 31337;

/// A follower on `ws_url`, registered with a new poll.
fn follow(ws_url: &str) -> (HeadFollower, Poll) {
    let poll = Poll::new().unwrap();
    let fees = Arc::new(FeeView::default());
    let mut follower = HeadFollower::connect(ws_url, fees).unwrap();
    follower.register(poll.registry(), HEADS).unwrap();
    (follower, poll)
}

fn call(rpc: &mut RpcClient, method: &str, params: Value) -> Value {
    rpc.call(method, params)
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

/// `(number, hash)` of every `NewHead` in `seen`, by number (later wins).
fn heads(seen: &[HeadEvent]) -> BTreeMap<u64, B256> {
    seen.iter()
        .filter_map(|e| match e {
            HeadEvent::NewHead { number, hash, .. } => Some((*number, *hash)),
            _ => None,
        })
        .collect()
}

/// The receipts reported for block `hash`, if they were.
fn receipts_of(seen: &[HeadEvent], block: B256) -> Option<Vec<B256>> {
    seen.iter().find_map(|e| match e {
        HeadEvent::BlockReceipts { hash, receipts, .. } if *hash == block => {
            Some(receipts.iter().map(|r| r.tx_hash).collect())
        }
        _ => None,
    })
}

/// Has every `NewHead` in `seen` numbered `from..=to` got its receipts?
fn all_receipts_in(seen: &[HeadEvent], from: u64, to: u64) -> bool {
    let h = heads(seen);
    (from..=to).all(|n| h.get(&n).is_some_and(|&b| receipts_of(seen, b).is_some()))
}

/// On a fresh automining anvil: blocks 1 and 2 empty, 3 with a transfer from
/// dev account 0, 4 empty; waits until the follower has reported all four
/// with their receipts. Returns the reported hashes by number, and the
/// transfer's hash.
fn mine_four_blocks(
    rpc: &mut RpcClient,
    follower: &mut HeadFollower,
    poll: &mut Poll,
) -> (BTreeMap<u64, B256>, B256) {
    call(rpc, "evm_mine", json!([]));
    call(rpc, "evm_mine", json!([]));
    let (raw, tx) = transfer(
        0,
        CHAIN_ID,
        0,
        dev_address(1),
        5,
        rpc.fee_estimate().unwrap(),
    );
    rpc.send_raw_transaction(&raw).unwrap();
    assert_eq!(wait_receipt(rpc, tx).block_number, 3);
    call(rpc, "evm_mine", json!([]));
    let seen = follow_until(follower, poll, |seen| all_receipts_in(seen, 1, 4));
    assert!(
        !seen.iter().any(|e| matches!(e, HeadEvent::Reorg { .. })),
        "{seen:#?}"
    );
    let old = heads(&seen);
    assert_eq!(old.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(receipts_of(&seen, old[&3]), Some(vec![tx]));
    (old, tx)
}

/// Checks the events after a reorg: first `reorg` (if any), then the new
/// chain: `NewHead`s in ascending order, each the child of the one before,
/// the first the child of `from`; every `BlockReceipts` after its block's
/// `NewHead`; nothing else. Returns the new heads.
fn assert_reorg_then_chain(
    after: &[HeadEvent],
    reorg: Option<HeadEvent>,
    from: (u64, B256),
) -> Vec<(u64, B256)> {
    let rest = match reorg {
        Some(r) => {
            assert_eq!(after.first(), Some(&r), "Reorg first: {after:#?}");
            &after[1..]
        }
        None => after,
    };
    let mut prev = from;
    let mut new = Vec::new();
    for e in rest {
        match e {
            HeadEvent::NewHead {
                number,
                hash,
                parent_hash,
                ..
            } => {
                assert_eq!(
                    (*number, *parent_hash),
                    (prev.0 + 1, prev.1),
                    "heads chain up from {from:?}: {after:#?}"
                );
                prev = (*number, *hash);
                new.push(prev);
            }
            HeadEvent::BlockReceipts { number, hash, .. } => assert!(
                new.contains(&(*number, *hash)),
                "receipts of block {number} {hash} before its NewHead, or of a dropped block: {after:#?}"
            ),
            HeadEvent::Reorg { .. } => panic!("unexpected Reorg: {after:#?}"),
        }
    }
    new
}

/// What anvil 1.7.1 does on `anvil_reorg` (observed with a `newHeads`
/// subscriber, `eth_getBlockByNumber`, `txpool_status` and nonce queries;
/// the facts the follower and the engine rely on are asserted below):
///
/// - `anvil_reorg [depth, [[tx, offset], ...]]` removes the newest `depth`
///   blocks and mines `depth` new ones at the same heights at once (the head
///   number does not change). Each gets a `newHeads` notification, in order;
///   the first new header's parent is the block `depth` below the old head.
///   So a subscriber sees a number it already saw, with another hash and a
///   parent it knows. On the connection that called `anvil_reorg` the
///   notifications arrive before the (`null`) reply.
/// - Each listed transaction (a raw signed transaction as hex, or a
///   transaction request object, both work) goes into new block
///   `common ancestor + 1 + offset`.
/// - Transactions of the dropped blocks are lost: they do not return to the
///   pool (`txpool_status` is 0 pending, 0 queued), are not re-included by
///   the replacement blocks or by blocks mined later, and
///   `eth_getTransactionByHash` and `eth_getTransactionReceipt` return `null`;
///   the sender's nonce (`latest` and `pending`) is back to what it was
///   before them. The engine must re-send them itself.
/// - `evm_snapshot` / `evm_revert` behave the same way for transactions, but
///   the revert sends no header: the chain just goes back, and the next
///   `evm_mine` sends a head at the reverted-to height + 1 (see
///   `evm_revert_then_mine_is_a_reorg_at_the_next_head`).
#[test]
fn anvil_reorg_is_reported_before_the_new_heads_and_their_receipts() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let (mut follower, mut poll) = follow(&anvil.ws_url());
    let mut rpc = anvil.rpc().unwrap();
    let (old, lost) = mine_four_blocks(&mut rpc, &mut follower, &mut poll);

    // Replace blocks 3 and 4; the new block 4 carries another transfer.
    let (raw, replacement) = transfer(
        2,
        CHAIN_ID,
        0,
        dev_address(3),
        7,
        rpc.fee_estimate().unwrap(),
    );
    let reply = call(
        &mut rpc,
        "anvil_reorg",
        json!([2, [[hex::encode_prefixed(&raw), 1]]]),
    );
    assert_eq!(reply, Value::Null);

    let after = follow_until(&mut follower, &mut poll, |seen| {
        all_receipts_in(seen, 3, 4) && heads(seen).get(&4).is_some_and(|h| *h != old[&4])
    });
    let new = assert_reorg_then_chain(
        &after,
        Some(HeadEvent::Reorg {
            common_ancestor: 2,
            depth: 2,
            dropped: vec![(3, old[&3]), (4, old[&4])],
            beyond_window: false,
        }),
        (2, old[&2]),
    );
    assert_eq!(new.iter().map(|b| b.0).collect::<Vec<_>>(), [3, 4]);
    assert!(new.iter().all(|b| !old.values().any(|h| *h == b.1)));
    assert_eq!(receipts_of(&after, new[0].1), Some(vec![]));
    assert_eq!(receipts_of(&after, new[1].1), Some(vec![replacement]));

    // The node agrees, and the dropped transfer is gone, not pending.
    assert_eq!(rpc.block_number().unwrap(), 4);
    let r = rpc
        .receipt(replacement)
        .unwrap()
        .expect("replacement mined");
    assert_eq!((r.block_number, r.block_hash), new[1]);
    assert_eq!(rpc.receipt(lost).unwrap(), None);
    assert!(rpc.transaction_by_hash(lost).unwrap().is_none());
    assert_eq!(rpc.transaction_count(dev_address(0), "pending").unwrap(), 0);

    // The follower goes on from the new chain.
    call(&mut rpc, "evm_mine", json!([]));
    let next = follow_until(&mut follower, &mut poll, |seen| all_receipts_in(seen, 5, 5));
    assert_reorg_then_chain(&next, None, new[1]);
    assert!(!follower.is_linking());
}

/// `evm_revert` sends no header; the next mined block's header has a number
/// the follower already reported and, as parent, the snapshot's block.
#[test]
fn evm_revert_then_mine_is_a_reorg_at_the_next_head() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let (mut follower, mut poll) = follow(&anvil.ws_url());
    let mut rpc = anvil.rpc().unwrap();
    call(&mut rpc, "evm_mine", json!([]));
    call(&mut rpc, "evm_mine", json!([]));
    let snapshot = call(&mut rpc, "evm_snapshot", json!([]));
    let (raw, lost) = transfer(
        0,
        CHAIN_ID,
        0,
        dev_address(1),
        5,
        rpc.fee_estimate().unwrap(),
    );
    rpc.send_raw_transaction(&raw).unwrap();
    assert_eq!(wait_receipt(&mut rpc, lost).block_number, 3);
    call(&mut rpc, "evm_mine", json!([]));
    let seen = follow_until(&mut follower, &mut poll, |seen| all_receipts_in(seen, 1, 4));
    let old = heads(&seen);

    assert_eq!(
        call(&mut rpc, "evm_revert", json!([snapshot])),
        Value::Bool(true)
    );
    assert_eq!(rpc.block_number().unwrap(), 2);
    // No header for the revert itself.
    let mut quiet = Vec::new();
    let mut events = Events::with_capacity(4);
    let until = Instant::now() + Duration::from_millis(300);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        poll.poll(&mut events, Some(left)).unwrap();
        follower.poll(|e| quiet.push(e)).unwrap();
    }
    assert_eq!(quiet, vec![], "evm_revert sent something");

    call(&mut rpc, "evm_mine", json!([]));
    let after = follow_until(&mut follower, &mut poll, |seen| {
        heads(seen)
            .get(&3)
            .is_some_and(|&h| receipts_of(seen, h).is_some())
    });
    let new = assert_reorg_then_chain(
        &after,
        Some(HeadEvent::Reorg {
            common_ancestor: 2,
            depth: 2,
            dropped: vec![(3, old[&3]), (4, old[&4])],
            beyond_window: false,
        }),
        (2, old[&2]),
    );
    assert_eq!(new.len(), 1);
    assert_eq!(receipts_of(&after, new[0].1), Some(vec![]));
    assert_eq!(rpc.receipt(lost).unwrap(), None);
    assert_eq!(rpc.transaction_count(dev_address(0), "pending").unwrap(), 0);
}

/// The node skipped both headers of a depth-2 reorg: the follower learns of
/// it from the next head, fetches the two missing headers, and reports the
/// reorg and all three new blocks in order.
#[test]
fn a_reorg_whose_headers_were_skipped_is_found_by_fetching_them() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let relay = HeadDropper::start(anvil.ws_url());
    let (mut follower, mut poll) = follow(&relay.url);
    let mut rpc = anvil.rpc().unwrap();
    let (old, _lost) = mine_four_blocks(&mut rpc, &mut follower, &mut poll);

    relay.skip(2);
    let (raw, replacement) = transfer(
        2,
        CHAIN_ID,
        0,
        dev_address(3),
        7,
        rpc.fee_estimate().unwrap(),
    );
    call(
        &mut rpc,
        "anvil_reorg",
        json!([2, [[hex::encode_prefixed(&raw), 0]]]),
    );
    call(&mut rpc, "evm_mine", json!([]));
    let after = follow_until(&mut follower, &mut poll, |seen| all_receipts_in(seen, 3, 5));
    assert!(relay.skipped_all());
    let new = assert_reorg_then_chain(
        &after,
        Some(HeadEvent::Reorg {
            common_ancestor: 2,
            depth: 2,
            dropped: vec![(3, old[&3]), (4, old[&4])],
            beyond_window: false,
        }),
        (2, old[&2]),
    );
    assert_eq!(new.iter().map(|b| b.0).collect::<Vec<_>>(), [3, 4, 5]);
    assert_eq!(receipts_of(&after, new[0].1), Some(vec![replacement]));
    assert_eq!(receipts_of(&after, new[1].1), Some(vec![]));
    assert!(!follower.is_linking());
    // Every request (receipts, headers, tips) was answered.
    let deadline = Instant::now() + WAIT;
    let mut events = Events::with_capacity(4);
    while follower.pending_requests() > 0 {
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("requests still pending");
        poll.poll(&mut events, Some(left)).unwrap();
        follower.poll(|e| panic!("unexpected {e:?}")).unwrap();
    }
}

/// Skipped headers on an unchanged chain are fetched and reported in order,
/// and are no reorg.
#[test]
fn skipped_headers_without_a_reorg_are_filled_in() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let relay = HeadDropper::start(anvil.ws_url());
    let (mut follower, mut poll) = follow(&relay.url);
    let mut rpc = anvil.rpc().unwrap();
    call(&mut rpc, "evm_mine", json!([]));
    let seen = follow_until(&mut follower, &mut poll, |seen| all_receipts_in(seen, 1, 1));
    let first = heads(&seen)[&1];

    relay.skip(3);
    for _ in 0..4 {
        call(&mut rpc, "evm_mine", json!([]));
    }
    let after = follow_until(&mut follower, &mut poll, |seen| all_receipts_in(seen, 2, 5));
    assert!(relay.skipped_all());
    let new = assert_reorg_then_chain(&after, None, (1, first));
    assert_eq!(new.iter().map(|b| b.0).collect::<Vec<_>>(), [2, 3, 4, 5]);
    for n in 2..=5u64 {
        let block: Value = call(
            &mut rpc,
            "eth_getBlockByNumber",
            json!([format!("{n:#x}"), false]),
        );
        assert_eq!(
            block["hash"].as_str().unwrap().parse::<B256>().unwrap(),
            new[n as usize - 2].1
        );
    }
}

/// A WebSocket relay between a follower and anvil that can swallow `newHeads`
/// notifications, so the node looks as if it skipped headers. Everything else
/// passes through unchanged, in order.
struct HeadDropper {
    url: String,
    to_skip: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HeadDropper {
    /// Listens on a free local port and relays its first connection to
    /// `upstream`.
    fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let to_skip = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (to_skip, stop) = (Arc::clone(&to_skip), Arc::clone(&stop));
            thread::spawn(move || relay(&listener, &upstream, &to_skip, &stop))
        };
        HeadDropper {
            url,
            to_skip,
            stop,
            thread: Some(thread),
        }
    }

    /// Swallows the next `n` head notifications.
    fn skip(&self, n: usize) {
        self.to_skip.store(n, Ordering::SeqCst);
    }

    fn skipped_all(&self) -> bool {
        self.to_skip.load(Ordering::SeqCst) == 0
    }
}

impl Drop for HeadDropper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay(listener: &TcpListener, upstream: &str, to_skip: &AtomicUsize, stop: &AtomicBool) {
    let is_timeout = |e: &tungstenite::Error| {
        matches!(e, tungstenite::Error::Io(io)
            if matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
    };
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + WAIT;
    let client = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                    return;
                }
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("relay accept: {e}"),
        }
    };
    client.set_nonblocking(false).unwrap();
    let mut down = tungstenite::accept(client).expect("relay handshake with the follower");
    let host = upstream.strip_prefix("ws://").unwrap();
    let (mut up, _) = tungstenite::client(upstream, TcpStream::connect(host).unwrap())
        .expect("relay handshake with anvil");
    for s in [down.get_ref(), up.get_ref()] {
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
    }
    while !stop.load(Ordering::SeqCst) {
        match down.read() {
            Ok(Message::Text(t)) => {
                if up.send(Message::Text(t)).is_err() {
                    return;
                }
            }
            Ok(Message::Close(_)) => return,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
        match up.read() {
            Ok(Message::Text(t)) => {
                let head = t.as_str().contains(r#""method":"eth_subscription""#);
                if head
                    && to_skip
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                {
                    continue;
                }
                if down.send(Message::Text(t)).is_err() {
                    return;
                }
            }
            Ok(Message::Close(_)) => return,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}
