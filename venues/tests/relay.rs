//! Private-relay support: the `X-Flashbots-Signature` header, the pipelined
//! HTTP/1.1 relay connection, and the loopback relay (`RelaySim`) in front of
//! a real anvil.
#![cfg(feature = "testkit")]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, b256, keccak256};
use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use common::{WAIT, spawn_anvil, transfer, wait_receipt};
use mio::{Events, Poll, Token};
use serde_json::{Value, json};
use venues::relay::FLASHBOTS_SIGNATURE_HEADER;
use venues::relay_sim::{RelaySim, RelaySimConfig};
use venues::{
    Anvil, AnvilConfig, RelayAuth, RelayConnection, RelayReply, RpcClient, VenueError, dev_address,
    verify_flashbots_signature,
};

const BLOCK_TIME: Duration = Duration::from_secs(1);

fn anvil_1s() -> Anvil {
    spawn_anvil(&AnvilConfig::with_block_time(BLOCK_TIME))
}

fn sim(anvil: &Anvil, cfg: RelaySimConfig) -> RelaySim {
    RelaySim::start(&anvil.http_url(), cfg).unwrap()
}

fn delay(include_delay: Duration) -> RelaySimConfig {
    RelaySimConfig {
        include_delay,
        ..RelaySimConfig::default()
    }
}

/// A registered relay connection and its poll.
fn relay(url: &str, auth: RelayAuth) -> (RelayConnection, Poll) {
    let poll = Poll::new().unwrap();
    let mut conn = RelayConnection::connect(url, auth).unwrap();
    conn.register(poll.registry(), Token(0)).unwrap();
    (conn, poll)
}

/// Drives `conn` on `poll` until `n` replies arrived (bounded by [`WAIT`]).
fn await_replies(conn: &mut RelayConnection, poll: &mut Poll, n: usize) -> Vec<(u64, RelayReply)> {
    let mut out = Vec::with_capacity(n);
    let mut events = Events::with_capacity(16);
    let deadline = Instant::now() + WAIT;
    loop {
        conn.poll_responses(|tag, r| out.push((tag, r))).unwrap();
        if out.len() >= n {
            assert_eq!(out.len(), n, "more replies than requests: {out:?}");
            return out;
        }
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("timed out after {WAIT:?}: {out:?}"));
        poll.poll(&mut events, Some(left.min(Duration::from_millis(200))))
            .unwrap();
    }
}

/// Waits (bounded by `limit`) until `cond` holds.
fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sleeps long enough for a forwarded transaction to be mined: the include
/// delay plus two and a half block times.
fn outlast(include_delay: Duration) {
    std::thread::sleep(include_delay + BLOCK_TIME * 5 / 2);
}

fn auth(i: u8) -> RelayAuth {
    RelayAuth::new(PrivateKeySigner::from_bytes(&B256::repeat_byte(i)).unwrap())
}

fn never_seen(rpc: &mut RpcClient, hash: B256) {
    assert!(
        rpc.transaction_by_hash(hash).unwrap().is_none(),
        "the node knows {hash}"
    );
    assert!(rpc.receipt(hash).unwrap().is_none(), "{hash} was mined");
}

// ---------------------------------------------------------------------------
// The header
// ---------------------------------------------------------------------------

#[test]
fn header_is_address_colon_eip191_signature_and_verifies() {
    // Published vector (alloy-provider's `sign_flashbots_payload` test).
    let vector = RelayAuth::new(
        PrivateKeySigner::from_bytes(&b256!(
            "0x0000000000000000000000000000000000000000000000000000000000123456"
        ))
        .unwrap(),
    );
    assert_eq!(
        vector.header(b"sign this message"),
        "0xd5F5175D014F28c85F7D67A111C2c9335D7CD771:0x983dc7c520db0d287faff3cd0aef81d5a7f4ffd3473440d3f705da16299724271f660b6fe367f455b205bc014eff3e20defd011f92000f94d39365ca0bc786721b"
    );

    let key = PrivateKeySigner::random();
    let a = RelayAuth::new(key.clone());
    let body = br#"{"jsonrpc":"2.0","id":1,"method":"eth_sendPrivateTransaction","params":[{"tx":"0x02"}]}"#;
    let header = a.header(body);
    let (addr, sig) = header.split_once(':').unwrap();
    assert_eq!(addr, a.address().to_checksum(None));
    assert!(sig.starts_with("0x") && sig.len() == 132, "{sig}");
    assert!(
        sig.ends_with("1b") || sig.ends_with("1c"),
        "v is 27/28: {sig}"
    );

    // Independently: ethers' `wallet.signMessage(id(body))`.
    let text = format!("{}", keccak256(body));
    let expected = key.sign_message_sync(text.as_bytes()).unwrap();
    assert_eq!(sig, format!("0x{}", hex::encode(expected.as_bytes())));

    assert_eq!(
        verify_flashbots_signature(&header, body).unwrap(),
        a.address()
    );
    // Lowercase address, v as 0/1, no 0x on the signature: all accepted.
    let lower = format!("{}:{}", addr.to_lowercase(), sig);
    assert_eq!(
        verify_flashbots_signature(&lower, body).unwrap(),
        a.address()
    );
    let mut raw = expected.as_bytes();
    raw[64] -= 27;
    let v01 = format!("{addr}:{}", hex::encode(raw));
    assert_eq!(verify_flashbots_signature(&v01, body).unwrap(), a.address());

    // Another body, or another claimed address: a mismatch.
    let b = auth(7);
    assert!(matches!(
        verify_flashbots_signature(&header, b"{}"),
        Err(VenueError::RelaySignatureMismatch { claimed, .. }) if claimed == a.address()
    ));
    let forged = format!("{}:{sig}", b.address());
    assert!(matches!(
        verify_flashbots_signature(&forged, body),
        Err(VenueError::RelaySignatureMismatch { claimed, recovered })
            if claimed == b.address() && recovered == a.address()
    ));
    for bad in [
        "",
        "nocolon",
        &format!("{addr}:"),
        &format!("0x1234:{sig}"),
        &format!("{addr}:{}", &sig[..130]),
        &format!("{addr}:0x{}", "zz".repeat(65)),
    ] {
        assert!(
            matches!(
                verify_flashbots_signature(bad, body),
                Err(VenueError::RelaySignature(_))
            ),
            "{bad:?}"
        );
    }

    // Debug never shows the key.
    let shown = format!("{a:?}");
    assert!(shown.contains(&a.address().to_checksum(None)), "{shown}");
    assert!(!shown.contains(&hex::encode(key.to_bytes())), "{shown}");
}

#[test]
fn connect_refuses_bad_urls_and_reports_unreachable_relays() {
    for url in [
        "https://127.0.0.1:1",
        "ws://127.0.0.1:1",
        "127.0.0.1:1",
        "http://",
    ] {
        assert!(
            matches!(
                RelayConnection::connect(url, auth(1)),
                Err(VenueError::InvalidRelayUrl(_))
            ),
            "{url}"
        );
    }
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(matches!(
        RelayConnection::connect(&format!("http://127.0.0.1:{port}"), auth(1)),
        Err(VenueError::Connect { .. })
    ));
}

// ---------------------------------------------------------------------------
// Against the loopback relay and anvil
// ---------------------------------------------------------------------------

#[test]
fn private_send_is_forwarded_and_mined() {
    let anvil = anvil_1s();
    let mut rpc = anvil.rpc().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let sim = sim(&anvil, delay(Duration::from_millis(200)));
    let (mut conn, mut poll) = relay(&sim.url(), auth(1));

    let (raw, hash) = transfer(0, anvil.chain_id(), 0, dev_address(1), 1, fees);
    conn.send_private_transaction(&raw, None, 42).unwrap();
    assert_eq!(conn.in_flight(), 1);
    assert_eq!(
        await_replies(&mut conn, &mut poll, 1),
        vec![(42, RelayReply::Sent(hash))]
    );
    assert_eq!(conn.in_flight(), 0);
    assert!(!conn.write_pending());

    let receipt = wait_receipt(&mut rpc, hash);
    assert!(receipt.success);
    assert_eq!(
        (sim.received(), sim.forwarded(), sim.rejected_signatures()),
        (1, 1, 0),
        "{sim:?} {:?}",
        sim.last_forward_error()
    );

    // Already forwarded: too late to cancel.
    conn.cancel_private_transaction(hash, 43).unwrap();
    assert_eq!(
        await_replies(&mut conn, &mut poll, 1),
        vec![(43, RelayReply::Cancelled(false))]
    );
    assert_eq!(sim.cancelled(), 0);
}

/// Writes one POST with the given signature header (or none) on a raw
/// socket and reads the answer: `(status, JSON body)`.
fn raw_post(stream: &mut TcpStream, body: &[u8], signature: Option<&str>) -> (u16, Value) {
    let mut req = format!(
        "POST / HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(s) = signature {
        req.push_str(&format!("{FLASHBOTS_SIGNATURE_HEADER}: {s}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    stream.write_all(body).unwrap();

    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let status: u16 = head[9..12].parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .expect("the relay always sends Content-Length");
            if buf.len() >= end + 4 + len {
                let body = serde_json::from_slice(&buf[end + 4..end + 4 + len]).unwrap();
                return (status, body);
            }
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "relay closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn forged_or_missing_signatures_are_refused_with_403_and_never_forwarded() {
    let anvil = anvil_1s();
    let mut rpc = anvil.rpc().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let include_delay = Duration::from_millis(100);
    let sim = sim(&anvil, delay(include_delay));

    let (raw, hash) = transfer(0, anvil.chain_id(), 0, dev_address(1), 1, fees);
    let body = json!({
        "jsonrpc": "2.0",
        "id": 9,
        "method": "eth_sendPrivateTransaction",
        "params": [{"tx": format!("0x{}", hex::encode(&raw))}],
    })
    .to_string();
    let (signer, claimed) = (auth(1), auth(2));
    let mut stream = TcpStream::connect(sim.addr()).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();

    // Signed by one key, header claiming another address.
    let genuine = signer.header(body.as_bytes());
    let sig = genuine.split_once(':').unwrap().1;
    let forged = format!("{}:{sig}", claimed.address());
    // The right address, but the signature of another body.
    let stale = signer.header(b"{\"jsonrpc\":\"2.0\"}");
    for header in [
        Some(forged.as_str()),
        None,
        Some(stale.as_str()),
        Some("junk"),
    ] {
        let (status, reply) = raw_post(&mut stream, body.as_bytes(), header);
        assert_eq!(status, 403, "{header:?}: {reply}");
        assert_eq!(reply["error"]["code"], -32600, "{reply}");
        assert_eq!(reply["id"], 9, "{reply}");
    }
    assert_eq!(sim.rejected_signatures(), 4);
    assert_eq!((sim.received(), sim.held()), (0, 0));

    outlast(include_delay);
    assert_eq!(sim.forwarded(), 0);
    never_seen(&mut rpc, hash);

    // The same request with the genuine header on the same keep-alive
    // connection is served and the transaction is mined.
    let (status, reply) = raw_post(&mut stream, body.as_bytes(), Some(&genuine));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["result"], json!(hash), "{reply}");
    assert!(wait_receipt(&mut rpc, hash).success);
    assert_eq!((sim.received(), sim.rejected_signatures()), (1, 4));
}

#[test]
fn allow_list_refuses_other_relay_auth_keys_and_the_connection_survives() {
    let anvil = anvil_1s();
    let mut rpc = anvil.rpc().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let allowed = auth(1);
    let sim = sim(
        &anvil,
        RelaySimConfig {
            allowed_auth: Some(vec![allowed.address()]),
            ..RelaySimConfig::default()
        },
    );
    let (raw, hash) = transfer(0, anvil.chain_id(), 0, dev_address(1), 1, fees);

    let (mut outsider, mut poll) = relay(&sim.url(), auth(2));
    outsider.send_private_transaction(&raw, None, 1).unwrap();
    outsider.send_private_transaction(&raw, None, 2).unwrap();
    let replies = await_replies(&mut outsider, &mut poll, 2);
    for (i, (tag, reply)) in replies.iter().enumerate() {
        assert_eq!(*tag, i as u64 + 1);
        match reply {
            RelayReply::Error(e) => assert_eq!(e.code, -32600, "{e:?}"),
            other => panic!("not refused: {other:?}"),
        }
    }
    assert_eq!((sim.rejected_signatures(), sim.received()), (2, 0));

    let (mut member, mut poll) = relay(&sim.url(), allowed);
    member.send_private_transaction(&raw, None, 3).unwrap();
    assert_eq!(
        await_replies(&mut member, &mut poll, 1),
        vec![(3, RelayReply::Sent(hash))]
    );
    assert!(wait_receipt(&mut rpc, hash).success);
}

#[test]
fn cancel_before_the_include_delay_stops_the_transaction() {
    let anvil = anvil_1s();
    let mut rpc = anvil.rpc().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let include_delay = Duration::from_secs(2);
    let sim = sim(&anvil, delay(include_delay));
    let (mut conn, mut poll) = relay(&sim.url(), auth(1));

    let (raw, hash) = transfer(0, anvil.chain_id(), 0, dev_address(1), 1, fees);
    conn.send_private_transaction(&raw, None, 1).unwrap();
    conn.cancel_private_transaction(hash, 2).unwrap();
    assert_eq!(
        await_replies(&mut conn, &mut poll, 2),
        vec![
            (1, RelayReply::Sent(hash)),
            (2, RelayReply::Cancelled(true))
        ]
    );
    assert_eq!((sim.cancelled(), sim.held()), (1, 0));

    outlast(include_delay);
    assert_eq!((sim.forwarded(), sim.dropped()), (0, 0));
    never_seen(&mut rpc, hash);

    // Nothing left to cancel.
    conn.cancel_private_transaction(hash, 3).unwrap();
    assert_eq!(
        await_replies(&mut conn, &mut poll, 1),
        vec![(3, RelayReply::Cancelled(false))]
    );
    // Nonce 0 is still free: another transaction takes it.
    let (other, other_hash) = transfer(0, anvil.chain_id(), 0, dev_address(2), 2, fees);
    conn.send_private_transaction(&other, None, 4).unwrap();
    assert_eq!(
        await_replies(&mut conn, &mut poll, 1),
        vec![(4, RelayReply::Sent(other_hash))]
    );
    assert!(wait_receipt(&mut rpc, other_hash).success);
    never_seen(&mut rpc, hash);
}

#[test]
fn max_block_number_already_passed_is_dropped_not_forwarded() {
    let anvil = anvil_1s();
    let mut rpc = anvil.rpc().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    wait_until("block 2", WAIT, || rpc.block_number().unwrap() >= 2);
    let current = rpc.block_number().unwrap();
    let sim = sim(&anvil, delay(Duration::from_millis(100)));
    let (mut conn, mut poll) = relay(&sim.url(), auth(1));

    let chain = anvil.chain_id();
    let (past, past_hash) = transfer(0, chain, 0, dev_address(9), 1, fees);
    // The current block is sealed: a transaction can only land after it.
    let (sealed, sealed_hash) = transfer(1, chain, 0, dev_address(9), 1, fees);
    let (future, future_hash) = transfer(2, chain, 0, dev_address(9), 1, fees);
    conn.send_private_transaction(&past, Some(current - 1), 1)
        .unwrap();
    conn.send_private_transaction(&sealed, Some(current), 2)
        .unwrap();
    conn.send_private_transaction(&future, Some(current + 100), 3)
        .unwrap();
    assert_eq!(
        await_replies(&mut conn, &mut poll, 3),
        vec![
            (1, RelayReply::Sent(past_hash)),
            (2, RelayReply::Sent(sealed_hash)),
            (3, RelayReply::Sent(future_hash)),
        ]
    );

    assert!(wait_receipt(&mut rpc, future_hash).success);
    wait_until("two drops", WAIT, || sim.dropped() == 2);
    assert_eq!(
        (sim.forwarded(), sim.forward_errors()),
        (1, 0),
        "{:?}",
        sim.last_forward_error()
    );
    outlast(Duration::ZERO);
    never_seen(&mut rpc, past_hash);
    never_seen(&mut rpc, sealed_hash);
}

#[test]
fn drop_all_accepts_but_never_forwards_so_the_sender_can_fall_back() {
    let anvil = anvil_1s();
    let mut rpc = anvil.rpc().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let include_delay = Duration::from_millis(100);
    let sim = sim(&anvil, delay(include_delay));
    let (mut conn, mut poll) = relay(&sim.url(), auth(1));
    sim.set_drop_all(true);

    let (raw, hash) = transfer(0, anvil.chain_id(), 0, dev_address(1), 1, fees);
    conn.send_private_transaction(&raw, None, 1).unwrap();
    assert_eq!(
        await_replies(&mut conn, &mut poll, 1),
        vec![(1, RelayReply::Sent(hash))]
    );
    wait_until("the drop", WAIT, || sim.dropped() == 1);
    outlast(include_delay);
    assert_eq!(sim.forwarded(), 0);
    never_seen(&mut rpc, hash);

    // Fall back to the public mempool with the same bytes.
    assert_eq!(rpc.send_raw_transaction(&raw).unwrap(), hash);
    assert!(wait_receipt(&mut rpc, hash).success);

    // Switched back on, the relay forwards again.
    sim.set_drop_all(false);
    let (next, next_hash) = transfer(0, anvil.chain_id(), 1, dev_address(1), 1, fees);
    conn.send_private_transaction(&next, None, 2).unwrap();
    assert_eq!(
        await_replies(&mut conn, &mut poll, 1),
        vec![(2, RelayReply::Sent(next_hash))]
    );
    assert!(wait_receipt(&mut rpc, next_hash).success);
    assert_eq!((sim.forwarded(), sim.dropped()), (1, 1));
}

#[test]
fn twenty_pipelined_sends_get_twenty_replies_with_their_tags() {
    let anvil = anvil_1s();
    let mut rpc = anvil.rpc().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let sim = sim(&anvil, delay(Duration::from_millis(50)));
    let (mut conn, mut poll) = relay(&sim.url(), auth(1));

    let txs: Vec<_> = (0..20)
        .map(|nonce| transfer(0, anvil.chain_id(), nonce, dev_address(3), 1 + nonce, fees))
        .collect();
    for (i, (raw, _)) in txs.iter().enumerate() {
        conn.send_private_transaction(raw, None, 1000 + i as u64)
            .unwrap();
    }
    assert_eq!(conn.in_flight(), 20);
    let expected: Vec<_> = txs
        .iter()
        .enumerate()
        .map(|(i, (_, hash))| (1000 + i as u64, RelayReply::Sent(*hash)))
        .collect();
    assert_eq!(await_replies(&mut conn, &mut poll, 20), expected);
    assert_eq!(conn.in_flight(), 0);

    assert!(wait_receipt(&mut rpc, txs[19].1).success);
    wait_until("20 forwards", WAIT, || sim.forwarded() == 20);
    assert_eq!(sim.received(), 20);
}

#[test]
fn connection_reports_closed_when_the_relay_goes_away() {
    // The relay only needs a node to forward to; nothing is forwarded here.
    let sim = RelaySim::start("http://127.0.0.1:9", RelaySimConfig::default()).unwrap();
    let (mut conn, mut poll) = relay(&sim.url(), auth(1));
    conn.cancel_private_transaction(B256::repeat_byte(1), 5)
        .unwrap();
    assert_eq!(
        await_replies(&mut conn, &mut poll, 1),
        vec![(5, RelayReply::Cancelled(false))]
    );

    drop(sim);
    let mut events = Events::with_capacity(4);
    let deadline = Instant::now() + WAIT;
    let err = loop {
        match conn.poll_responses(|t, r| panic!("unexpected reply {t} {r:?}")) {
            Ok(_) => {
                assert!(Instant::now() < deadline, "the close was never noticed");
                poll.poll(&mut events, Some(Duration::from_millis(100)))
                    .unwrap();
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, VenueError::Closed | VenueError::Io(_)),
        "{err:?}"
    );
    assert!(matches!(
        conn.send_private_transaction(&[1, 2, 3], None, 6),
        Err(VenueError::Closed)
    ));
    assert!(matches!(
        conn.poll_responses(|_, _| {}),
        Err(VenueError::Closed)
    ));
}

// ---------------------------------------------------------------------------
// Steady-state allocations
// ---------------------------------------------------------------------------

/// Counts allocations made by the armed thread only (the relay's threads
/// allocate freely).
struct Counting;

thread_local! {
    static ARMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn note_alloc() {
    // `try_with`: the allocator can run while thread-locals are torn down.
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        }
    });
}

// SAFETY: defers every operation to `System`, only counting on the side.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        note_alloc();
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn steady_state_send_cancel_and_reply_do_not_allocate() {
    // `drop_all`: nothing is forwarded, so no node is needed.
    let cfg = RelaySimConfig {
        drop_all: true,
        ..RelaySimConfig::default()
    };
    let sim = RelaySim::start("http://127.0.0.1:9", cfg).unwrap();
    let (mut conn, mut poll) = relay(&sim.url(), auth(5));
    let raw = vec![0x02u8; 120];
    let hash = keccak256(&raw);
    let mut events = Events::with_capacity(16);
    let mut round = |tag: u64| {
        conn.send_private_transaction(&raw, Some(tag), tag).unwrap();
        conn.cancel_private_transaction(hash, tag + 1).unwrap();
        let mut got = 0;
        let mut ok = true;
        let deadline = Instant::now() + WAIT;
        while got < 2 {
            got += conn
                .poll_responses(|t, r| {
                    ok &= match r {
                        RelayReply::Sent(h) => t == tag && h == hash,
                        RelayReply::Cancelled(_) => t == tag + 1,
                        RelayReply::Error(_) => false,
                    }
                })
                .unwrap();
            assert!(Instant::now() < deadline, "no reply within {WAIT:?}");
            if got < 2 {
                poll.poll(&mut events, Some(Duration::from_millis(100)))
                    .unwrap();
            }
        }
        ok
    };
    for i in 0..20 {
        assert!(round(i * 2), "warm-up round {i}");
    }
    ARMED.with(|a| a.set(true));
    let mut all_ok = true;
    for i in 20..120 {
        all_ok &= round(i * 2);
    }
    ARMED.with(|a| a.set(false));
    assert!(all_ok, "a reply did not match its request");
    assert_eq!(ALLOCS.with(|c| c.get()), 0, "allocations in steady state");
    assert_eq!(sim.received(), 120);
}

// ---------------------------------------------------------------------------
// Against a hand-written relay: back-pressure and chunked replies
// ---------------------------------------------------------------------------

/// One request as the hand-written relay saw it.
struct SeenRequest {
    signer: Address,
    body: Value,
}

/// Reads `n` requests from `stream` (each checked for framing and a valid
/// signature), answering each with the keccak of its `tx`: odd ids with a
/// chunked body, even ids with Content-Length. The socket is handed back
/// (still open) so the client does not see the close before its replies.
fn serve_raw(mut stream: TcpStream, n: usize) -> (Vec<SeenRequest>, TcpStream) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut seen = Vec::new();
    while seen.len() < n {
        let parsed = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .and_then(|end| {
                let head = std::str::from_utf8(&buf[..end]).unwrap().to_owned();
                let mut len = None;
                let mut sig = None;
                for line in head.lines().skip(1) {
                    let (name, value) = line.split_once(':').unwrap();
                    if name.eq_ignore_ascii_case("content-length") {
                        len = Some(value.trim().parse::<usize>().unwrap());
                    } else if name.eq_ignore_ascii_case(FLASHBOTS_SIGNATURE_HEADER) {
                        sig = Some(value.trim().to_owned());
                    }
                }
                assert!(head.starts_with("POST /rpc HTTP/1.1\r\n"), "{head}");
                let len = len.expect("Content-Length");
                (buf.len() >= end + 4 + len).then(|| (end + 4, len, sig.expect("signature")))
            });
        let Some((start, len, sig)) = parsed else {
            let k = stream.read(&mut chunk).unwrap();
            assert!(k > 0, "client closed early");
            buf.extend_from_slice(&chunk[..k]);
            continue;
        };
        let body = &buf[start..start + len];
        let signer = verify_flashbots_signature(&sig, body).unwrap();
        let body: Value = serde_json::from_slice(body).unwrap();
        buf.drain(..start + len);
        let id = body["id"].as_u64().unwrap();
        let tx = hex::decode(&body["params"][0]["tx"].as_str().unwrap()[2..]).unwrap();
        let reply = json!({"jsonrpc": "2.0", "id": id, "result": keccak256(&tx)}).to_string();
        let response = if id % 2 == 1 {
            let (a, b) = reply.split_at(reply.len() / 2);
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            )
        } else {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{reply}",
                reply.len()
            )
        };
        stream.write_all(response.as_bytes()).unwrap();
        seen.push(SeenRequest { signer, body });
    }
    (seen, stream)
}

#[test]
fn partial_writes_stay_queued_and_go_out_in_order() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/rpc", listener.local_addr().unwrap());
    let signer = auth(3);
    let (mut conn, mut poll) = relay(&url, signer.clone());
    let (stream, _) = listener.accept().unwrap();

    // Nobody reads yet: large requests fill the socket buffers.
    let payload = |i: usize| vec![i as u8; 256 * 1024];
    let mut sent = 0;
    while !conn.write_pending() {
        assert!(sent < 400, "the socket never filled up");
        conn.send_private_transaction(&payload(sent), Some(sent as u64), sent as u64)
            .unwrap();
        sent += 1;
    }
    // Two more behind the queued bytes.
    for _ in 0..2 {
        conn.send_private_transaction(&payload(sent), Some(sent as u64), sent as u64)
            .unwrap();
        sent += 1;
    }
    assert!(conn.write_pending());

    let (tx, rx) = mpsc::channel();
    let server = std::thread::spawn(move || tx.send(serve_raw(stream, sent)).unwrap());
    let replies = await_replies(&mut conn, &mut poll, sent);
    assert!(!conn.write_pending());
    let expected: Vec<_> = (0..sent)
        .map(|i| (i as u64, RelayReply::Sent(keccak256(payload(i)))))
        .collect();
    assert_eq!(replies, expected);

    let (seen, _stream) = rx.recv_timeout(WAIT).unwrap();
    server.join().unwrap();
    assert_eq!(seen.len(), sent);
    for (i, req) in seen.iter().enumerate() {
        assert_eq!(req.signer, signer.address());
        assert_eq!(req.body["id"], i as u64 + 1);
        assert_eq!(req.body["method"], "eth_sendPrivateTransaction");
        let p = &req.body["params"][0];
        assert_eq!(p["maxBlockNumber"], format!("{i:#x}"));
        assert_eq!(p["preferences"], json!({"fast": true}));
    }
}

#[test]
fn request_bodies_follow_the_documented_shape() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/rpc", listener.local_addr().unwrap());
    let (mut conn, mut poll) = relay(&url, auth(4));
    let (stream, _) = listener.accept().unwrap();
    conn.send_private_transaction(&[0x02, 0xab], None, 1)
        .unwrap();
    let server = std::thread::spawn(move || serve_raw(stream, 1));
    assert_eq!(
        await_replies(&mut conn, &mut poll, 1),
        vec![(1, RelayReply::Sent(keccak256([0x02, 0xab])))]
    );
    let (seen, _stream) = server.join().unwrap();
    assert_eq!(
        seen[0].body,
        json!({
            "jsonrpc": "2.0",
            "id": 1,
            "method": "eth_sendPrivateTransaction",
            "params": [{"tx": "0x02ab", "preferences": {"fast": true}}],
        })
    );
}
