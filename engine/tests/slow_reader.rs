//! Slow-reader protection, through the real WebSocket protocol against a real engine and a
//! real anvil: a desk that stops reading its socket is disconnected within a bounded time
//! while another desk keeps being served, and after reconnecting it finds every intent it
//! had sent on the chain exactly once, on gap-free nonces.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use engine::auth::{Role, Roles};
use engine::config::Layout;
use engine::desk::{Desk, DeskError, DeskSender};
use engine::server::WRITE_STALL;
use serde_json::{Value, json};
use venues::{DEV_ADDRESSES, RpcClient};

/// Intents the slow desk submits before it only asks `status`.
const SLOW_INTENTS: usize = 200;
/// Intents the other desk submits, one every 250 ms, at least and at most.
const BUSY_MIN: usize = 8;
const BUSY_MAX: usize = 200;
/// Value of the slow desk's intent `i` is `VALUE_BASE + i` wei (finds it on the chain).
const VALUE_BASE: u128 = 1_000_000;
/// How long a send may wait before the desk counts the engine as no longer reading it.
const SEND_BLOCKED: Duration = Duration::from_secs(3);

fn slow_account(i: usize) -> &'static str {
    if i.is_multiple_of(2) { "dev1" } else { "dev2" }
}

fn slow_intent(ids: &[String], i: usize) -> Value {
    submit(transfer(
        &ids[i],
        slow_account(i),
        5 + i % 5,
        VALUE_BASE + i as u128,
    ))
}

/// How a send went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Yes,
    /// Not finished within [`SEND_BLOCKED`]: the engine stopped reading this connection.
    Blocked,
    /// The connection is gone.
    Closed,
}

async fn send_or_blocked(tx: &mut DeskSender, v: &Value) -> Sent {
    match tokio::time::timeout(SEND_BLOCKED, tx.send(v)).await {
        Ok(Ok(())) => Sent::Yes,
        Ok(Err(_)) => Sent::Closed,
        Err(_) => Sent::Blocked,
    }
}

/// The value of one sample line of `/metrics`, read without blocking the runtime.
async fn metric_async(addr: std::net::SocketAddr, line: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .expect("/metrics answers")
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {line} in:\n{body}"))
}

/// Connects a desk whose socket has small kernel buffers, so that a desk that does not read
/// fills them after a few kilobytes.
async fn connect_small_buffers(h: &Harness, token: &str) -> Desk {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.set_send_buffer_size(4096).unwrap();
    let tcp = sock.connect(h.addr()).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    Desk::connect_over(&h.url, Some(token), Box::new(tcp))
        .await
        .expect("desk connects")
}

fn final_state(s: &str) -> bool {
    matches!(s, "confirmed" | "rejected" | "failed" | "cancelled")
}

#[test]
fn a_desk_that_stops_reading_is_disconnected_and_none_of_its_intents_is_lost() {
    let h = Harness::start(Layout::Auto);
    let slow_token = h.token_for("slow-desk", Roles::default().with(Role::Trader));
    let busy_token = h.token_for("busy-desk", Roles::default().with(Role::Trader));
    let ids: Vec<String> = (0..SLOW_INTENTS).map(|i| format!("slow-{i:03}")).collect();

    // The slow desk submits its intents, then asks `status` about them over and over and
    // never reads a reply. Meanwhile another desk submits an intent every 250 ms and reads
    // everything, and the engine's slow-desk counter is watched.
    let slow = h.rt.block_on(connect_small_buffers(&h, &slow_token));
    let (mut slow_tx, mut slow_rx) = slow.split();
    let started = Instant::now();
    let bound = WRITE_STALL + Duration::from_secs(90);
    let disconnected: Arc<Mutex<Option<Instant>>> = Arc::default();
    let addr = h.addr();
    let (sending, busy) = h.rt.block_on(async {
        let watch = async {
            loop {
                if metric_async(addr, "engine_slow_desk_disconnects_total").await >= 1.0 {
                    *disconnected.lock().unwrap() = Some(Instant::now());
                    return;
                }
                assert!(
                    started.elapsed() < bound,
                    "the desk that stopped reading was not disconnected within {bound:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let slow_sends = async {
            let mut sent = 0usize;
            let mut j = 0usize;
            loop {
                let frame = if j < SLOW_INTENTS {
                    slow_intent(&ids, j)
                } else {
                    json!({"op": "status", "id": ids[j % SLOW_INTENTS], "req": format!("q{j}")})
                };
                j += 1;
                let outcome = send_or_blocked(&mut slow_tx, &frame).await;
                if outcome != Sent::Yes || disconnected.lock().unwrap().is_some() {
                    return (sent, outcome);
                }
                sent += 1;
                if sent.is_multiple_of(50) {
                    // 2,500 frames/s: under the per-connection rate limit.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let busy = async {
            let (mut tx, mut rx) = Desk::connect(&h.url, Some(&busy_token))
                .await
                .unwrap()
                .split();
            let ids: Arc<Mutex<Vec<String>>> = Arc::default();
            let sends = async {
                for i in 0..BUSY_MAX {
                    if i >= BUSY_MIN && disconnected.lock().unwrap().is_some() {
                        break;
                    }
                    let id = format!("busy-{i:02}");
                    ids.lock().unwrap().push(id.clone());
                    tx.send(&submit(transfer(&id, "dev0", 5 + i % 5, 1_000 + i as u128)))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            };
            let reads = async {
                let mut frames: HashMap<String, Vec<(Instant, Value)>> = HashMap::new();
                let deadline = started + bound + Duration::from_secs(60);
                loop {
                    let done = {
                        let ids = ids.lock().unwrap();
                        ids.len() >= BUSY_MIN
                            && ids.iter().all(|id| {
                                frames.get(id).is_some_and(|f| {
                                    f.last().is_some_and(|(_, v)| {
                                        v["state"].as_str().is_some_and(final_state)
                                    })
                                })
                            })
                    };
                    if done && disconnected.lock().unwrap().is_some() {
                        return frames;
                    }
                    let f = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
                    assert!(Instant::now() < deadline, "the other desk was not served");
                    if let Ok(f) = f {
                        let f = f.expect("the other desk is served");
                        let id = f["id"].as_str().unwrap_or_default().to_owned();
                        frames.entry(id).or_default().push((Instant::now(), f));
                    }
                }
            };
            let ((), frames) = tokio::join!(sends, reads);
            frames
        };
        let ((), sending, busy) = tokio::join!(watch, slow_sends, busy);
        (sending, busy)
    });
    let disconnected_at = disconnected.lock().unwrap().expect("disconnected");

    // The other desk was served while the slow one was stuck: acked before the slow desk
    // was disconnected, and every intent confirmed.
    assert!(busy.len() >= BUSY_MIN, "{busy:?}");
    let mut acked_meanwhile = 0;
    for (id, f) in &busy {
        let st: Vec<String> = states(&f.iter().map(|(_, v)| v.clone()).collect::<Vec<_>>());
        assert_eq!(st.first().map(String::as_str), Some("ack"), "{id}: {st:?}");
        assert_eq!(
            st.last().map(String::as_str),
            Some("confirmed"),
            "{id}: {st:?}"
        );
        if f[0].0 < disconnected_at {
            acked_meanwhile += 1;
        }
    }
    assert!(
        acked_meanwhile >= 1,
        "the other desk got acks while the slow desk was stuck"
    );
    let busy_count = busy.len();

    // The slow desk's socket ends: what the kernel buffered is readable, then the
    // connection is over (reset or closed).
    let (buffered, end) = h.rt.block_on(async {
        let mut n = 0usize;
        let end = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match slow_rx.recv().await {
                    Ok(_) => n += 1,
                    Err(e) => return e,
                }
            }
        })
        .await
        .expect("the slow desk's connection was closed by the engine");
        (n, end)
    });
    assert!(
        matches!(end, DeskError::Closed | DeskError::Ws(_)),
        "closed: {end:?}"
    );
    drop((slow_tx, slow_rx));
    eprintln!(
        "slow desk: {} frames sent ({:?} at the end), disconnected {:?} after connecting, \
         {buffered} frames left in its socket, then {end}; the other desk had {acked_meanwhile} \
         of {busy_count} intents acked meanwhile",
        sending.0,
        sending.1,
        disconnected_at - started
    );

    // The same principal reconnects and submits every id again: each is acked (a duplicate
    // for those the engine took before) and every one reaches `confirmed`.
    let (acks, seqs, latest) = h.rt.block_on(async {
        let mut desk = Desk::connect(&h.url, Some(&slow_token)).await.unwrap();
        for i in 0..SLOW_INTENTS {
            desk.send(&slow_intent(&ids, i)).await.unwrap();
            if (i + 1).is_multiple_of(50) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let mut acks: HashMap<String, Value> = HashMap::new();
        let mut seqs: HashMap<String, u64> = HashMap::new();
        let mut latest: HashMap<String, String> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut round = 0u64;
        loop {
            let open: Vec<&String> = ids
                .iter()
                .filter(|id| !latest.get(*id).is_some_and(|s| final_state(s)))
                .collect();
            if open.is_empty() && acks.len() == SLOW_INTENTS {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not final after reconnecting: {} of {SLOW_INTENTS}, {} acked; e.g. {:?}",
                open.len(),
                acks.len(),
                open.first().map(|id| latest.get(*id))
            );
            if round > 0 {
                for id in &open {
                    desk.send(&json!({"op": "status", "id": id, "req": format!("s{round}")}))
                        .await
                        .unwrap();
                }
            }
            round += 1;
            let window = tokio::time::Instant::now() + Duration::from_secs(1);
            while let Ok(f) = tokio::time::timeout_at(window, desk.recv()).await {
                let f = f.expect("the reconnected desk is served");
                let Some(id) = f["id"].as_str().map(str::to_owned) else {
                    continue;
                };
                match f["op"].as_str() {
                    // A `status` reply for an intent without an event yet.
                    Some("ack") if f["req"] != id.as_str() => {}
                    Some("ack") => {
                        assert!(
                            acks.insert(id.clone(), f.clone()).is_none(),
                            "{id}: one ack per submit: {f}"
                        );
                    }
                    Some("event") => {
                        latest.insert(id.clone(), f["state"].as_str().unwrap().to_owned());
                    }
                    _ => panic!("{id}: unexpected frame {f}"),
                }
                if let Some(seq) = f["seq"].as_u64() {
                    let prev = seqs.insert(id.clone(), seq);
                    assert!(
                        prev.is_none_or(|p| p == seq),
                        "{id}: one sequence number: {prev:?} then {f}"
                    );
                }
            }
        }
        (acks, seqs, latest)
    });
    for id in &ids {
        assert_eq!(latest[id], "confirmed", "{id}");
    }
    let duplicates = acks.values().filter(|a| a["duplicate"] == true).count();
    assert!(
        duplicates >= 1,
        "intents taken on the dead connection were kept ({duplicates} duplicates)"
    );
    let mut distinct: Vec<u64> = seqs.values().copied().collect();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        SLOW_INTENTS,
        "one sequence number per intent"
    );
    eprintln!("after reconnecting: {duplicates} of {SLOW_INTENTS} ids were already in the engine");

    // On the chain: every one of the slow desk's intents is exactly one transaction, and
    // each account's nonces have no gap.
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let head = rpc.block_number().unwrap();
    let slow_from: HashMap<String, &str> = [
        (DEV_ADDRESSES[1].to_string().to_lowercase(), "dev1"),
        (DEV_ADDRESSES[2].to_string().to_lowercase(), "dev2"),
    ]
    .into();
    let mut txs_of: BTreeMap<usize, Vec<(String, u64)>> = BTreeMap::new();
    let mut nonces: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for n in 0..=head {
        let block: Value = rpc
            .call("eth_getBlockByNumber", json!([format!("0x{n:x}"), true]))
            .unwrap();
        for tx in block["transactions"].as_array().into_iter().flatten() {
            let from = tx["from"].as_str().unwrap().to_lowercase();
            let Some(&account) = slow_from.get(&from) else {
                continue;
            };
            let hex_u128 = |v: &Value| {
                u128::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
            };
            let nonce = hex_u128(&tx["nonce"]) as u64;
            let value = hex_u128(&tx["value"]);
            nonces.entry(account).or_default().push(nonce);
            assert!(
                (VALUE_BASE..VALUE_BASE + SLOW_INTENTS as u128).contains(&value),
                "{account} nonce {nonce}: a transaction that is none of the intents: {tx}"
            );
            let i = (value - VALUE_BASE) as usize;
            assert_eq!(
                slow_account(i),
                account,
                "{}: signed by its account",
                ids[i]
            );
            txs_of
                .entry(i)
                .or_default()
                .push((tx["hash"].as_str().unwrap().to_owned(), nonce));
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let txs = txs_of.get(&i).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            txs.len(),
            1,
            "{id}: exactly one transaction on chain: {txs:?}"
        );
    }
    for (account, mut ns) in nonces {
        ns.sort_unstable();
        assert_eq!(
            ns,
            (0..SLOW_INTENTS as u64 / 2).collect::<Vec<_>>(),
            "{account}: nonces without gap or repeat"
        );
        let addr = if account == "dev1" {
            DEV_ADDRESSES[1]
        } else {
            DEV_ADDRESSES[2]
        };
        assert_eq!(
            rpc.transaction_count(addr, "latest").unwrap(),
            SLOW_INTENTS as u64 / 2
        );
    }
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[0], "latest").unwrap(),
        busy_count as u64
    );
    // Only the desk that stopped reading was disconnected.
    assert_eq!(metric(&h, "engine_slow_desk_disconnects_total"), 1.0);
}
