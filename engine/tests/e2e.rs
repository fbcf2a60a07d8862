//! End to end: desks over the real WebSocket protocol, the real engine, a real anvil, and
//! every on-chain fact checked through the node (never the engine's memory).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use alloy_primitives::{B256, U256};
use common::*;
use engine::auth::{Role, Roles};
use engine::config::Layout;
use engine::desk::{Desk, DeskError};
use serde_json::{Value, json};
use venues::{DEV_ADDRESSES, RpcClient};

/// A normal life as the desk sees it: the ack, then each state in order.
const FULL_LIFE: [&str; 6] = [
    "ack",
    "accepted",
    "signed",
    "broadcast",
    "included",
    "confirmed",
];

fn full_life() -> Vec<String> {
    FULL_LIFE.iter().map(|s| s.to_string()).collect()
}

fn lifecycle(layout: Layout) {
    let h = Harness::start(layout);
    let mut desk = h.desk();
    let call_data = "0xa9059cbb0000000000000000000000000000000000000000000000000000000000000001";
    let intents = vec![
        transfer("t-1", "dev0", 5, 1_500_000_000_000_000_000),
        json!({"id": "c-1", "account": "dev1", "kind": "call", "to": DEV_ADDRESSES[6],
               "data": call_data, "gas_limit": 50000, "value_wei": "7"}),
        transfer("t-2", "dev0", 7, 42),
    ];
    let ids: Vec<String> = intents
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    let frames = h.rt.block_on(async {
        for i in &intents {
            desk.send(&submit(i.clone())).await.unwrap();
        }
        collect_until_final(&mut desk, &ids, Duration::from_secs(30)).await
    });
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let mut dev0_nonces = Vec::new();
    for (intent, id) in intents.iter().zip(&ids) {
        let f = &frames[id];
        assert_eq!(states(f), full_life(), "{id}: {f:#?}");
        assert_eq!(f[0]["req"], json!(id), "ack echoes req");
        let hash: B256 = f[2]["tx_hash"].as_str().unwrap().parse().unwrap();
        for ev in &f[3..5] {
            assert_eq!(
                ev["tx_hash"].as_str().unwrap().parse::<B256>().unwrap(),
                hash
            );
        }
        assert_eq!(f[3]["route"], "public");
        assert_eq!(f[4]["success"], true);
        assert!(f[5]["depth"].as_u64().unwrap() >= 2);
        for w in f[1..].windows(2) {
            assert!(
                w[0]["ts_us"].as_u64() <= w[1]["ts_us"].as_u64(),
                "ts_us ordered"
            );
        }
        // The chain, not the engine, is the judge.
        let tx = rpc.transaction_by_hash(hash).unwrap().expect("tx on chain");
        let from: alloy_primitives::Address = f[2]["from"].as_str().unwrap().parse().unwrap();
        let acct_idx: usize = intent["account"].as_str().unwrap()[3..].parse().unwrap();
        assert_eq!(tx.from, DEV_ADDRESSES[acct_idx]);
        assert_eq!(from, tx.from);
        assert_eq!(
            tx.to.unwrap(),
            intent["to"]
                .as_str()
                .unwrap()
                .parse::<alloy_primitives::Address>()
                .unwrap()
        );
        assert_eq!(
            tx.value,
            U256::from_str_radix(intent["value_wei"].as_str().unwrap(), 10).unwrap()
        );
        assert_eq!(tx.nonce, f[2]["nonce"].as_u64().unwrap());
        assert_eq!(tx.chain_id, Some(31337));
        assert_eq!(tx.tx_type, 2);
        let receipt = rpc.receipt(hash).unwrap().expect("receipt");
        assert_eq!(receipt.block_number, f[4]["block_number"].as_u64().unwrap());
        assert_eq!(receipt.gas_used, f[4]["gas_used"].as_u64().unwrap());
        if intent["kind"] == "call" {
            assert_eq!(format!("{}", tx.input), call_data);
            assert_eq!(tx.gas_limit, 50000);
        } else {
            assert_eq!(receipt.gas_used, 21000);
        }
        if acct_idx == 0 {
            dev0_nonces.push(tx.nonce);
        }
    }
    assert_eq!(
        dev0_nonces,
        vec![0, 1],
        "consecutive nonces in submission order"
    );
}

#[test]
fn lifecycle_reaches_the_chain_in_order_fused() {
    lifecycle(Layout::Fused);
}

#[test]
fn lifecycle_reaches_the_chain_in_order_per_stage() {
    lifecycle(Layout::PerStage);
}

#[test]
fn rejected_intents_never_reach_the_chain() {
    let h = Harness::start(Layout::Auto);
    let mut desk = h.desk();
    let cases = vec![
        (
            json!({"id": "r-allow", "account": "dev2", "kind": "transfer",
                "to": "0x000000000000000000000000000000000000dead", "value_wei": "1"}),
            "not_allowlisted",
        ),
        (
            json!({"id": "r-cap", "account": "dev2", "kind": "transfer", "to": DEV_ADDRESSES[5],
                "value_wei": "100000000000000000001"}),
            "value_cap",
        ),
        (
            json!({"id": "r-acct", "account": "treasury-9", "kind": "transfer", "to": DEV_ADDRESSES[5],
                "value_wei": "1"}),
            "unknown_account",
        ),
        (
            json!({"id": "r-route", "account": "dev2", "kind": "transfer", "to": DEV_ADDRESSES[5],
                "value_wei": "1", "route": "private"}),
            "route_unavailable",
        ),
        (
            json!({"id": "r-stake", "account": "dev2", "kind": "stake_exit",
                "validator_pubkey": format!("0x{}", "ab".repeat(48)), "amount_gwei": "0"}),
            "unsupported_kind",
        ),
    ];
    let mut ids: Vec<String> = cases
        .iter()
        .map(|(i, _)| i["id"].as_str().unwrap().to_owned())
        .collect();
    // Exactly 100 ETH is allowed (the cap is inclusive); it follows the rejections.
    let ok = transfer("r-ok", "dev2", 5, 100_000_000_000_000_000_000);
    ids.push("r-ok".into());
    let frames = h.rt.block_on(async {
        for (i, _) in &cases {
            desk.send(&submit(i.clone())).await.unwrap();
        }
        desk.send(&submit(ok)).await.unwrap();
        collect_until_final(&mut desk, &ids, Duration::from_secs(30)).await
    });
    for (intent, reason) in &cases {
        let f = &frames[intent["id"].as_str().unwrap()];
        assert_eq!(states(f), vec!["ack", "rejected"], "{f:#?}");
        assert_eq!(f[1]["reason"], *reason);
        assert!(!f[1]["message"].as_str().unwrap().is_empty());
    }
    let okf = &frames["r-ok"];
    assert_eq!(states(okf), full_life());
    // No nonce went to a rejected intent: the first allowed one has nonce 0 and the
    // account sent exactly one transaction.
    assert_eq!(okf[2]["nonce"], 0);
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[2], "latest").unwrap(),
        1
    );
    let dead: alloy_primitives::Address = "0x000000000000000000000000000000000000dead"
        .parse()
        .unwrap();
    assert_eq!(rpc.balance(dead).unwrap(), U256::ZERO);
}

#[test]
fn bad_tokens_get_401_and_no_socket() {
    let h = Harness::start(Layout::Auto);
    let wrong =
        engine::auth::JwtAuth::new(b"another-secret-entirely-0123").issue("x", Roles::all(), 60);
    let expired = engine::auth::JwtAuth::new(SECRET.as_bytes()).issue("x", Roles::all(), 0);
    std::thread::sleep(Duration::from_secs(7)); // past exp plus the verifier's 5 s leeway
    h.rt.block_on(async {
        for token in [
            None,
            Some("not-a-jwt"),
            Some(wrong.as_str()),
            Some(expired.as_str()),
        ] {
            match Desk::connect(&h.url, token).await {
                Err(DeskError::Refused(401)) => {}
                other => panic!("token {token:?}: expected 401, got {other:?}"),
            }
        }
        // A good token still works, and /health answers.
        let mut d = Desk::connect(&h.url, Some(&h.token)).await.unwrap();
        d.send(&json!({"op": "ping", "req": "p1"})).await.unwrap();
        let pong = d.recv().await.unwrap();
        assert_eq!(pong, json!({"op": "pong", "req": "p1"}));
    });
    let body = http_get(h.addr(), "/health");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
}

#[test]
fn malformed_frames_get_bad_request_and_the_session_continues() {
    let h = Harness::start(Layout::Auto);
    let mut desk = h.desk();
    let bad: Vec<(String, &str)> = vec![
        ("{not json".into(), "frame"),
        (r#"{"op":"teleport"}"#.into(), "op"),
        (r#"{"op":"submit","req":"b1"}"#.into(), "intent"),
        (r#"{"op":"submit","intent":{"id":"m1","account":"dev0","kind":"transfer","to":"0x12","value_wei":"1"}}"#.into(), "intent.to"),
        (format!(r#"{{"op":"submit","intent":{{"id":"m2","account":"dev0","kind":"transfer","to":"{}","value_wei":1}}}}"#, DEV_ADDRESSES[5]), "intent.value_wei"),
        (format!(r#"{{"op":"submit","intent":{{"id":"m3","account":"dev0","kind":"transfer","to":"{}","value_wei":"{}"}}}}"#, DEV_ADDRESSES[5], "9".repeat(80)), "intent.value_wei"),
        (format!(r#"{{"op":"submit","intent":{{"id":"m4","account":"dev0","kind":"call","to":"{}","data":"0x00"}}}}"#, DEV_ADDRESSES[5]), "intent.gas_limit"),
    ];
    h.rt.block_on(async {
        for (frame, field) in &bad {
            desk.send_text(frame.clone()).await.unwrap();
            let e = desk.recv().await.unwrap();
            assert_eq!(e["op"], "error", "{frame}");
            assert_eq!(e["code"], "bad_request", "{frame}");
            assert_eq!(e["field"], *field, "{frame}: {e}");
        }
        desk.send_binary(vec![1, 2, 3]).await.unwrap();
        let e = desk.recv().await.unwrap();
        assert_eq!(
            (e["code"].as_str(), e["field"].as_str()),
            (Some("bad_request"), None)
        );
        // A cancel of an id this desk never used says so.
        desk.send(&json!({"op": "cancel", "id": "x", "req": "c"}))
            .await
            .unwrap();
        let e = desk.recv().await.unwrap();
        assert_eq!(e["code"], "not_found");
        assert_eq!(e["req"], "c");
        // The session is intact: ping, then a real intent goes all the way.
        desk.send(&json!({"op": "ping"})).await.unwrap();
        assert_eq!(desk.recv().await.unwrap()["op"], "pong");
        desk.send(&submit(transfer("m-ok", "dev3", 8, 5)))
            .await
            .unwrap();
        let f = collect_until_final(&mut desk, &["m-ok".into()], Duration::from_secs(30)).await;
        assert_eq!(states(&f["m-ok"]), full_life());
    });
    // None of the malformed intents consumed a nonce or reached the chain.
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[0], "latest").unwrap(),
        0
    );
}

#[test]
fn duplicate_ids_return_the_existing_intent_and_status_reports_it() {
    let h = Harness::start(Layout::Auto);
    let mut desk = h.desk();
    h.rt.block_on(async {
        desk.send(&submit(transfer("dup-1", "dev4", 9, 11)))
            .await
            .unwrap();
        let f = collect_until_final(&mut desk, &["dup-1".into()], Duration::from_secs(30)).await;
        let f = &f["dup-1"];
        assert_eq!(states(f), full_life());
        let seq = f[0]["seq"].clone();
        // Same id again, even with other fields: the existing intent, no new transaction.
        desk.send(&submit(transfer("dup-1", "dev4", 9, 999)))
            .await
            .unwrap();
        let ack = desk.recv().await.unwrap();
        assert_eq!(
            (ack["op"].as_str(), &ack["seq"], &ack["duplicate"]),
            (Some("ack"), &seq, &json!(true))
        );
        let latest = desk.recv().await.unwrap();
        assert_eq!(latest["state"], "confirmed");
        // status: latest event, with req echoed; unknown ids: not_found.
        desk.send(&json!({"op": "status", "id": "dup-1", "req": "s1"}))
            .await
            .unwrap();
        let s = desk.recv().await.unwrap();
        assert_eq!(
            (s["state"].as_str(), s["req"].as_str()),
            (Some("confirmed"), Some("s1"))
        );
        desk.send(&json!({"op": "status", "id": "nope", "req": "s2"}))
            .await
            .unwrap();
        let s = desk.recv().await.unwrap();
        assert_eq!(
            (s["code"].as_str(), s["req"].as_str()),
            (Some("not_found"), Some("s2"))
        );
    });
    // Another principal's ids are its own: the same id is a new intent for it, and it
    // cannot see the first principal's intent.
    let other = h.token_for("desk-b", Roles::default().with(Role::Trader));
    h.rt.block_on(async {
        let mut b = Desk::connect(&h.url, Some(&other)).await.unwrap();
        b.send(&json!({"op": "status", "id": "dup-1"}))
            .await
            .unwrap();
        assert_eq!(b.recv().await.unwrap()["code"], "not_found");
        b.send(&submit(transfer("dup-1", "dev4", 9, 12)))
            .await
            .unwrap();
        let f = collect_until_final(&mut b, &["dup-1".into()], Duration::from_secs(30)).await;
        assert_eq!(states(&f["dup-1"]), full_life());
        assert_eq!(f["dup-1"][2]["nonce"], 1);
        // Without the trader role, submit is forbidden.
        let auditor = h.token_for("aud", Roles::default().with(Role::Auditor));
        let mut a = Desk::connect(&h.url, Some(&auditor)).await.unwrap();
        a.send(&submit(transfer("a-1", "dev4", 9, 1)))
            .await
            .unwrap();
        let e = a.recv().await.unwrap();
        assert_eq!(
            (e["code"].as_str(), e["id"].as_str()),
            (Some("forbidden"), Some("a-1"))
        );
    });
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[4], "latest").unwrap(),
        2
    );
}

#[test]
fn five_hundred_intents_from_four_desks_land_with_gap_free_nonces() {
    let h = Harness::start(Layout::Auto);
    const DESKS: usize = 4;
    const PER_DESK: usize = 125;
    let url = h.url.clone();
    let tokens: Vec<String> = (0..DESKS)
        .map(|d| h.token_for(&format!("desk-{d}"), Roles::default().with(Role::Trader)))
        .collect();
    let results = h.rt.block_on(async {
        let mut tasks = Vec::new();
        for (d, token) in tokens.into_iter().enumerate() {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let mut desk = Desk::connect(&url, Some(&token)).await.unwrap();
                let mut ids = Vec::new();
                for i in 0..PER_DESK {
                    let id = format!("d{d}-{i:03}");
                    let account = format!("dev{}", (d + i) % 5);
                    desk.send(&submit(transfer(
                        &id,
                        &account,
                        5 + i % 5,
                        1_000 + i as u128,
                    )))
                    .await
                    .unwrap();
                    ids.push(id);
                }
                collect_until_final(&mut desk, &ids, Duration::from_secs(120)).await
            }));
        }
        let mut all = HashMap::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    assert_eq!(results.len(), DESKS * PER_DESK);
    let mut per_account: BTreeMap<String, Vec<(u64, B256)>> = BTreeMap::new();
    for (id, f) in &results {
        assert_eq!(states(f), full_life(), "{id}: {f:#?}");
        let from = f[2]["from"].as_str().unwrap().to_lowercase();
        let hash: B256 = f[2]["tx_hash"].as_str().unwrap().parse().unwrap();
        per_account
            .entry(from)
            .or_default()
            .push((f[2]["nonce"].as_u64().unwrap(), hash));
    }
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    assert_eq!(per_account.len(), 5);
    for (from, mut txs) in per_account {
        txs.sort();
        let nonces: Vec<u64> = txs.iter().map(|t| t.0).collect();
        assert_eq!(
            nonces,
            (0..txs.len() as u64).collect::<Vec<_>>(),
            "{from}: gap or duplicate"
        );
        let addr: alloy_primitives::Address = from.parse().unwrap();
        assert_eq!(
            rpc.transaction_count(addr, "latest").unwrap(),
            txs.len() as u64
        );
        for (nonce, hash) in txs {
            let tx = rpc.transaction_by_hash(hash).unwrap().expect("on chain");
            assert_eq!((tx.from, tx.nonce), (addr, nonce));
            assert!(tx.block_number.is_some());
        }
    }
    let failure = h.engine().failure();
    assert!(failure.is_none(), "{failure:?}");
}

#[test]
fn metrics_and_latency_endpoints_report_the_stages() {
    let h = Harness::start(Layout::Auto);
    let mut desk = h.desk();
    h.rt.block_on(async {
        desk.send(&submit(transfer("m-1", "dev1", 5, 1)))
            .await
            .unwrap();
        collect_until_final(&mut desk, &["m-1".into()], Duration::from_secs(30)).await;
    });
    let metrics = http_get(h.addr(), "/metrics");
    assert!(
        metrics.contains("engine_latency_seconds{recorder=\"e2e.ws_to_node\",quantile=\"0.99\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("engine_events_total{state=\"confirmed\"} 1"),
        "{metrics}"
    );
    let latency = http_get(h.addr(), "/v1/latency");
    let body = latency.split("\r\n\r\n").nth(1).unwrap();
    let v: Value = serde_json::from_str(body.trim()).unwrap_or_else(|_| {
        // chunked or not, the JSON object is the last line
        serde_json::from_str(body.lines().find(|l| l.starts_with('{')).unwrap()).unwrap()
    });
    assert_eq!(v["recorders"]["e2e.ws_to_node"]["count"], 1);
    assert_eq!(v["recorders"]["policy.service"]["count"], 1);
}
