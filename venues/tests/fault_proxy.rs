//! The fault-injection proxy in front of a real anvil (and, for the framing
//! checks, in front of a recording fake node): each fault as the broadcast
//! connection and the RPC client see it.
#![cfg(feature = "testkit")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use common::{spawn_anvil, transfer};
use mio::{Events, Poll, Token};
use serde_json::{Value, json};
use venues::fault::{Fault, FaultProxy};
use venues::{
    Anvil, AnvilConfig, BroadcastConnection, RpcClient, RpcErrorInfo, VenueError, dev_address,
};

/// Bound on every wait below.
const LIMIT: Duration = Duration::from_secs(5);

type Reply = (u64, Result<B256, RpcErrorInfo>);

fn proxy_for(anvil: &Anvil) -> FaultProxy {
    FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], anvil.port()))).unwrap()
}

fn broadcast_via(proxy: &FaultProxy) -> (BroadcastConnection, Poll) {
    let poll = Poll::new().unwrap();
    let mut conn = BroadcastConnection::connect(&proxy.ws_url()).unwrap();
    conn.register(poll.registry(), Token(0)).unwrap();
    (conn, poll)
}

/// Polls `conn` for `window`, collecting replies; `Err` as soon as the
/// connection reports one.
fn poll_for(
    conn: &mut BroadcastConnection,
    poll: &mut Poll,
    window: Duration,
) -> Result<Vec<Reply>, VenueError> {
    let mut out = Vec::new();
    let mut events = Events::with_capacity(16);
    let deadline = Instant::now() + window;
    loop {
        conn.poll_responses(|tag, r| out.push((tag, r)))?;
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Ok(out);
        };
        poll.poll(&mut events, Some(left)).unwrap();
    }
}

/// Waits (bounded by [`LIMIT`]) until `conn` has handled `n` replies.
fn replies(conn: &mut BroadcastConnection, poll: &mut Poll, n: usize) -> Vec<Reply> {
    let mut out = Vec::new();
    let mut events = Events::with_capacity(16);
    let deadline = Instant::now() + LIMIT;
    loop {
        conn.poll_responses(|tag, r| out.push((tag, r))).unwrap();
        if out.len() >= n {
            return out;
        }
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("{} of {n} replies within {LIMIT:?}: {out:?}", out.len()));
        poll.poll(&mut events, Some(left)).unwrap();
    }
}

/// Polls (bounded by [`LIMIT`]) until `conn` reports an error.
fn error_within_limit(conn: &mut BroadcastConnection, poll: &mut Poll) -> VenueError {
    match poll_for(conn, poll, LIMIT) {
        Ok(got) => panic!("no error within {LIMIT:?}; replies {got:?}"),
        Err(e) => e,
    }
}

fn is_closed(e: &VenueError) -> bool {
    matches!(e, VenueError::Closed | VenueError::Io(_))
}

/// Waits (bounded by [`LIMIT`]) for `cond`.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pass_relays_the_rpc_client_and_the_broadcast_connection() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let proxy = proxy_for(&anvil);
    assert_eq!(proxy.fault(), Fault::Pass);
    assert_eq!(
        proxy.ws_url(),
        format!("ws://127.0.0.1:{}", proxy.addr().port())
    );
    assert_eq!(
        proxy.http_url(),
        format!("http://127.0.0.1:{}", proxy.addr().port())
    );

    let mut rpc = RpcClient::connect(&proxy.ws_url()).unwrap();
    assert_eq!(rpc.chain_id().unwrap(), 31337);
    let fees = rpc.fee_estimate().unwrap();
    let (mut conn, mut poll) = broadcast_via(&proxy);
    assert_eq!((proxy.accepted(), proxy.live_connections()), (2, 2));

    let (raw, hash) = transfer(0, 31337, 0, dev_address(1), 1, fees);
    conn.send_raw_transaction(&raw, 9).unwrap();
    assert_eq!(replies(&mut conn, &mut poll, 1), vec![(9, Ok(hash))]);
    let deadline = Instant::now() + LIMIT;
    let receipt = loop {
        if let Some(r) = rpc.receipt(hash).unwrap() {
            break r;
        }
        assert!(Instant::now() < deadline, "no receipt within {LIMIT:?}");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(receipt.success);
    assert_eq!(proxy.injected_errors(), 0);

    drop(rpc);
    eventually("closed client unregistered", || {
        proxy.live_connections() == 1
    });
}

#[test]
fn delay_adds_latency_both_ways_without_limiting_throughput() {
    let anvil = spawn_anvil(&AnvilConfig::with_block_time(Duration::from_secs(1)));
    let proxy = proxy_for(&anvil);
    let mut rpc = RpcClient::connect(&proxy.ws_url()).unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let (mut conn, mut poll) = broadcast_via(&proxy);

    const D: Duration = Duration::from_millis(50);
    proxy.set(Fault::Delay(D));
    assert_eq!(proxy.fault(), Fault::Delay(D));
    let t = Instant::now();
    assert_eq!(rpc.chain_id().unwrap(), 31337);
    let rtt = t.elapsed();
    // The request and the reply are each held back by D.
    assert!(rtt >= 2 * D, "round trip {rtt:?} under Delay({D:?})");

    // One send every 10 ms under a longer delay L. A delay queue answers
    // each ~2L after it was sent, however many are in flight. A relay that
    // slept L per chunk would make chunks wait for each other: the median
    // reply would be late by about L/2 per direction, and one sleep per
    // frame would need N·L in all.
    const L: Duration = Duration::from_millis(100);
    proxy.set(Fault::Delay(L));
    const N: u64 = 20;
    const SPACING: Duration = Duration::from_millis(10);
    let txs: Vec<_> = (0..N)
        .map(|nonce| transfer(2, 31337, nonce, dev_address(3), 1, fees))
        .collect();
    let start = Instant::now();
    let mut sent_at = Vec::new();
    let mut latencies = Vec::new();
    let mut events = Events::with_capacity(16);
    loop {
        let now = Instant::now();
        assert!(now < start + LIMIT, "{} of {N} replies", latencies.len());
        let next_send = start + SPACING * sent_at.len() as u32;
        if sent_at.len() < N as usize && now >= next_send {
            let i = sent_at.len();
            conn.send_raw_transaction(&txs[i].0, i as u64).unwrap();
            sent_at.push(now);
            continue;
        }
        conn.poll_responses(|tag, r| {
            assert_eq!(r, Ok(txs[tag as usize].1), "tag {tag}");
            latencies.push(sent_at[tag as usize].elapsed());
        })
        .unwrap();
        if latencies.len() == N as usize {
            break;
        }
        let wake = if sent_at.len() < N as usize {
            next_send.saturating_duration_since(Instant::now())
        } else {
            LIMIT
        };
        poll.poll(&mut events, Some(wake)).unwrap();
    }
    let total = start.elapsed();
    latencies.sort();
    assert!(latencies[0] >= 2 * L, "a reply came early: {latencies:?}");
    let median = latencies[latencies.len() / 2];
    assert!(
        median < 2 * L + L / 2,
        "median reply {median:?} under Delay({L:?}): chunks wait for each other; {latencies:?}"
    );
    assert!(
        total < L * N as u32,
        "{N} spaced sends took {total:?}: the delay limits throughput"
    );

    proxy.set(Fault::Pass);
    let t = Instant::now();
    assert_eq!(rpc.chain_id().unwrap(), 31337);
    assert!(t.elapsed() < rtt, "Pass is not faster than Delay");
}

#[test]
fn blackhole_swallows_requests_and_keeps_the_connection_open() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let fees = anvil.rpc().unwrap().fee_estimate().unwrap();
    let proxy = proxy_for(&anvil);
    let (mut conn, mut poll) = broadcast_via(&proxy);

    proxy.set(Fault::Blackhole);
    let (raw, hash) = transfer(0, 31337, 0, dev_address(1), 1, fees);
    conn.send_raw_transaction(&raw, 1).unwrap();
    let got = poll_for(&mut conn, &mut poll, Duration::from_millis(300)).unwrap();
    assert!(got.is_empty(), "answers through a blackhole: {got:?}");
    assert_eq!(conn.in_flight(), 1);
    assert_eq!(proxy.live_connections(), 1);

    // A new connection is accepted, but its handshake is never answered.
    let err = RpcClient::connect_with_timeout(&proxy.ws_url(), Duration::from_millis(300))
        .expect_err("handshake through a blackhole");
    assert!(matches!(err, VenueError::Timeout(_)), "{err:?}");
    assert_eq!(proxy.accepted(), 2);

    // Lifted: the same connection is still well framed and works; the
    // swallowed request never reached the node.
    proxy.set(Fault::Pass);
    assert!(
        anvil
            .rpc()
            .unwrap()
            .transaction_by_hash(hash)
            .unwrap()
            .is_none()
    );
    conn.send_raw_transaction(&raw, 2).unwrap();
    assert_eq!(replies(&mut conn, &mut poll, 1), vec![(2, Ok(hash))]);
    assert_eq!(conn.in_flight(), 1, "tag 1 is never answered");
}

#[test]
fn close_all_cuts_live_connections_and_keeps_listening() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let proxy = proxy_for(&anvil);
    let mut rpc = RpcClient::connect(&proxy.ws_url()).unwrap();
    let (mut conn, mut poll) = broadcast_via(&proxy);
    assert_eq!(proxy.live_connections(), 2);

    proxy.close_all();
    assert_eq!(proxy.live_connections(), 0);
    let err = error_within_limit(&mut conn, &mut poll);
    assert!(is_closed(&err), "{err:?}");
    assert!(matches!(
        conn.poll_responses(|_, _| {}),
        Err(VenueError::Closed)
    ));
    assert!(rpc.chain_id().is_err());

    let mut again = RpcClient::connect(&proxy.ws_url()).unwrap();
    assert_eq!(again.chain_id().unwrap(), 31337);
    assert_eq!((proxy.accepted(), proxy.live_connections()), (3, 1));
}

#[test]
fn refuse_cuts_existing_connections_and_closes_new_ones() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let proxy = proxy_for(&anvil);
    let (mut conn, mut poll) = broadcast_via(&proxy);

    proxy.set(Fault::Refuse);
    let err = error_within_limit(&mut conn, &mut poll);
    assert!(is_closed(&err), "{err:?}");
    assert_eq!(proxy.live_connections(), 0);

    let err = BroadcastConnection::connect(&proxy.ws_url()).expect_err("refused");
    assert!(!matches!(err, VenueError::Timeout(_)), "{err:?}");
    assert!(RpcClient::connect(&proxy.ws_url()).is_err());
    // Accepted (the TCP connect succeeds) and closed at once.
    assert_eq!(proxy.accepted(), 3);
    assert_eq!(proxy.live_connections(), 0);

    proxy.set(Fault::Pass);
    let mut rpc = RpcClient::connect(&proxy.ws_url()).unwrap();
    assert_eq!(rpc.chain_id().unwrap(), 31337);
}

#[test]
fn rpc_error_answers_one_method_and_passes_the_rest() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let mut direct = anvil.rpc().unwrap();
    let fees = direct.fee_estimate().unwrap();
    let proxy = proxy_for(&anvil);
    let (mut conn, mut poll) = broadcast_via(&proxy);
    let mut rpc = RpcClient::connect(&proxy.ws_url()).unwrap();

    let injected = Fault::RpcError {
        method: "eth_sendRawTransaction".into(),
        code: -32000,
        message: "injected".into(),
    };
    proxy.set(injected.clone());
    assert_eq!(proxy.fault(), injected);
    let (raw, hash) = transfer(0, 31337, 0, dev_address(1), 1, fees);
    conn.send_raw_transaction(&raw, 7).unwrap();
    let expected = RpcErrorInfo {
        code: -32000,
        message: "injected".into(),
    };
    assert_eq!(
        replies(&mut conn, &mut poll, 1),
        vec![(7, Err(expected.clone()))]
    );

    // Other methods pass, on another connection and on the same one.
    assert_eq!(rpc.chain_id().unwrap(), 31337);
    match rpc.send_raw_transaction(&raw) {
        Err(VenueError::Rpc { code, message }) => {
            assert_eq!((code, message.as_str()), (-32000, "injected"));
        }
        other => panic!("expected the injected error, got {other:?}"),
    }
    assert_eq!(rpc.chain_id().unwrap(), 31337);
    assert_eq!(rpc.transaction_count(dev_address(0), "pending").unwrap(), 0);
    assert_eq!(proxy.injected_errors(), 2);
    // Answered by the proxy, never forwarded.
    assert!(direct.transaction_by_hash(hash).unwrap().is_none());

    proxy.set(Fault::Pass);
    conn.send_raw_transaction(&raw, 8).unwrap();
    assert_eq!(replies(&mut conn, &mut poll, 1), vec![(8, Ok(hash))]);
    assert_eq!(proxy.injected_errors(), 2);
}

/// One HTTP/1.1 request on `stream` (kept alive); returns the status line
/// and the JSON body.
fn http_post(stream: &mut TcpStream, body: &Value) -> (String, Value) {
    let body = body.to_string();
    write!(
        stream,
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "EOF in the head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    let status = head.lines().next().unwrap().to_owned();
    (status, serde_json::from_slice(&body).unwrap())
}

#[test]
fn rpc_error_over_plain_http_keeps_keep_alive_working() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let proxy = proxy_for(&anvil);
    proxy.set(Fault::RpcError {
        method: "eth_sendRawTransaction".into(),
        code: -32000,
        message: "injected".into(),
    });
    let mut http = TcpStream::connect(proxy.addr()).unwrap();
    http.set_read_timeout(Some(LIMIT)).unwrap();

    let send = |id: Value| json!({"jsonrpc":"2.0","id":id,"method":"eth_sendRawTransaction","params":["0x00"]});
    let (status, reply) = http_post(&mut http, &send(json!("h-1")));
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        reply,
        json!({"jsonrpc":"2.0","id":"h-1","error":{"code":-32000,"message":"injected"}})
    );
    let (status, reply) = http_post(
        &mut http,
        &json!({"jsonrpc":"2.0","id":2,"method":"eth_chainId","params":[]}),
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(reply["id"], json!(2));
    assert_eq!(reply["result"], json!("0x7a69"));
    let (_, reply) = http_post(&mut http, &send(json!(3)));
    assert_eq!(reply["id"], json!(3));
    assert_eq!(reply["error"]["message"], json!("injected"));

    assert_eq!((proxy.accepted(), proxy.injected_errors()), (1, 2));
}

/// A masked client frame (RFC 6455 §5.2) with a final bit and `opcode`.
fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    f
}

#[test]
fn websocket_frames_in_odd_reads_are_filtered_byte_for_byte() {
    // A fake node: answers the upgrade, then records everything it gets.
    let node = TcpListener::bind("127.0.0.1:0").unwrap();
    let node_addr = node.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let recorder = std::thread::spawn({
        let received = Arc::clone(&received);
        move || {
            let (mut s, _) = node.accept().unwrap();
            s.set_read_timeout(Some(LIMIT)).unwrap();
            let mut chunk = [0u8; 4096];
            let mut answered = false;
            loop {
                let n = s.read(&mut chunk).unwrap();
                if n == 0 {
                    return;
                }
                let mut r = received.lock().unwrap();
                r.extend_from_slice(&chunk[..n]);
                if !answered && r.windows(4).any(|w| w == b"\r\n\r\n") {
                    answered = true;
                    s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").unwrap();
                }
            }
        }
    });

    let proxy = FaultProxy::start(node_addr).unwrap();
    proxy.set(Fault::RpcError {
        method: "m".into(),
        code: 5,
        message: "no".into(),
    });
    let mut client = TcpStream::connect(proxy.addr()).unwrap();
    client.set_nodelay(true).unwrap();
    client.set_read_timeout(Some(LIMIT)).unwrap();
    let upgrade = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    client.write_all(upgrade).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(client.read(&mut byte).unwrap(), 1);
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "));

    let long = format!(
        r#"{{"id":1,"method":"other","params":["{}"]}}"#,
        "7".repeat(300)
    );
    let pass1 = client_frame(1, long.as_bytes(), [1, 2, 3, 4]);
    let hit = client_frame(
        1,
        br#"{"jsonrpc":"2.0","id":"q","method":"m"}"#,
        [9, 9, 9, 9],
    );
    let pass2 = client_frame(2, br#"{"id":2,"method":"m"}"#, [4, 3, 2, 1]);
    let pass3 = client_frame(1, br#"not json"#, [0, 1, 0, 1]);
    let mut stream = Vec::new();
    for f in [&pass1, &hit, &pass2, &pass3] {
        stream.extend_from_slice(f);
    }
    // Odd pieces, apart in time so they arrive as separate reads; the tail
    // goes in one write (several frames per read).
    let mut at = 0;
    for step in [1, 2, 3, 5, 8, 13, 21, 34, 55, 89] {
        client.write_all(&stream[at..at + step]).unwrap();
        at += step;
        std::thread::sleep(Duration::from_millis(3));
    }
    client.write_all(&stream[at..]).unwrap();

    // The matching frame is answered by the proxy with an unmasked text frame.
    let mut answer = [0u8; 2];
    client.read_exact(&mut answer).unwrap();
    assert_eq!(answer[0], 0x81);
    assert_eq!(answer[1] & 0x80, 0, "server frames are not masked");
    let mut payload = vec![0u8; usize::from(answer[1])];
    client.read_exact(&mut payload).unwrap();
    let payload: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        payload,
        json!({"jsonrpc":"2.0","id":"q","error":{"code":5,"message":"no"}})
    );

    // Everything else reached the node exactly as the client sent it.
    let mut expected = upgrade.to_vec();
    for f in [&pass1, &pass2, &pass3] {
        expected.extend_from_slice(f);
    }
    eventually("the node got every passed frame", || {
        received.lock().unwrap().len() >= expected.len()
    });
    assert_eq!(*received.lock().unwrap(), expected);
    assert_eq!(proxy.injected_errors(), 1);

    drop(client);
    recorder.join().unwrap();
}

#[test]
fn dropping_the_proxy_cuts_everything_promptly() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let fees = anvil.rpc().unwrap().fee_estimate().unwrap();
    let proxy = proxy_for(&anvil);
    let addr = proxy.addr();
    let mut rpc = RpcClient::connect(&proxy.ws_url()).unwrap();
    let (mut conn, mut poll) = broadcast_via(&proxy);

    // A request held back for far longer than the drop may take.
    proxy.set(Fault::Delay(Duration::from_secs(30)));
    let (raw, _) = transfer(0, 31337, 0, dev_address(1), 1, fees);
    conn.send_raw_transaction(&raw, 1).unwrap();
    std::thread::sleep(Duration::from_millis(20));

    let t = Instant::now();
    drop(proxy);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "drop took {:?}",
        t.elapsed()
    );

    let err = error_within_limit(&mut conn, &mut poll);
    assert!(is_closed(&err), "{err:?}");
    assert!(rpc.chain_id().is_err());
    assert!(TcpStream::connect(addr).is_err(), "still listening");
}
