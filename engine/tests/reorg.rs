//! The receipts side under faults, against a real anvil: a chain reorganisation
//! (`anvil_reorg`) drops blocks holding the engine's transactions, and the head
//! subscription is cut mid-flight. The chain is the judge: every intent ends confirmed,
//! on chain once, on its own nonce.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use common::*;
use engine::config::{Layout, ProviderConfig};
use serde_json::{Value, json};
use venues::RpcClient;
use venues::fault::{Fault, FaultProxy};

fn signed_hash(frames: &[Value]) -> B256 {
    frames
        .iter()
        .find(|f| f["state"] == "signed")
        .and_then(|f| f["tx_hash"].as_str())
        .and_then(|h| h.parse().ok())
        .expect("signed event with tx_hash")
}

/// Reads frames until `pred` holds for the collected frames of every id (or panics).
fn read_until(
    h: &Harness,
    desk: &mut engine::desk::Desk,
    ids: &[String],
    frames: &mut std::collections::HashMap<String, Vec<Value>>,
    pred: impl Fn(&[Value]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    h.rt.block_on(async {
        while !ids.iter().all(|id| frames.get(id).is_some_and(|f| pred(f))) {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = tokio::time::timeout(left, desk.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out; frames so far: {frames:#?}"))
                .expect("frame");
            let id = f["id"].as_str().unwrap_or_default().to_owned();
            frames.entry(id).or_default().push(f);
        }
    });
}

#[test]
fn reorged_transactions_are_reported_sent_again_and_confirmed_once() {
    // Deep confirmations, so the intents are still waiting when their block is dropped.
    let h = Harness::start_with(Layout::Auto, |cfg| cfg.confirmations = 12);
    let mut desk = h.desk();
    let ids: Vec<String> = (0..3).map(|i| format!("rg-{i}")).collect();
    h.rt.block_on(async {
        for (i, id) in ids.iter().enumerate() {
            desk.send(&submit(transfer(id, "dev0", 5 + i, 1_000 + i as u128)))
                .await
                .unwrap();
        }
    });
    let mut frames = std::collections::HashMap::new();
    let has = |f: &[Value], s: &str| f.iter().any(|x| x["state"] == s);
    read_until(&h, &mut desk, &ids, &mut frames, |f| has(f, "included"));
    let first_block = ids
        .iter()
        .filter_map(|id| {
            frames[id]
                .iter()
                .find(|x| x["state"] == "included")
                .and_then(|x| x["block_number"].as_u64())
        })
        .min()
        .unwrap();

    // Drop every block from the first inclusion up: anvil loses their transactions.
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let head: String = rpc.call("eth_blockNumber", json!([])).unwrap();
    let head = u64::from_str_radix(head.trim_start_matches("0x"), 16).unwrap();
    let depth = head - first_block + 1;
    let _: Value = rpc.call("anvil_reorg", json!([depth, []])).unwrap();

    // Each intent: reorged, then broadcast again, included again, confirmed.
    read_until(&h, &mut desk, &ids, &mut frames, |f| has(f, "confirmed"));
    for id in &ids {
        let st = states(&frames[id]);
        let reorged = st
            .iter()
            .position(|s| s == "reorged")
            .unwrap_or_else(|| panic!("{id}: no reorged in {st:?}"));
        let after: Vec<&str> = st[reorged + 1..].iter().map(String::as_str).collect();
        assert_eq!(
            after,
            vec!["broadcast", "included", "confirmed"],
            "{id}: {st:?}"
        );
        // The same transaction (hash) is on chain, once, in a block after the fork point.
        let hash = signed_hash(&frames[id]);
        let r = rpc.receipt(hash).unwrap().expect("mined again");
        assert!(r.block_number >= first_block, "{id} re-included");
        let last_included = frames[id]
            .iter()
            .rev()
            .find(|x| x["state"] == "included")
            .unwrap();
        assert_eq!(last_included["block_number"], json!(r.block_number));
    }
    assert_eq!(
        rpc.transaction_count(venues::DEV_ADDRESSES[0], "latest")
            .unwrap(),
        3,
        "three nonces used, each once"
    );
    assert!(metric(&h, "engine_reorgs_total") >= 1.0);
    assert!(metric(&h, "engine_reorged_total") >= 3.0);
}

#[test]
fn a_cut_head_subscription_is_resumed_and_no_receipt_is_missed() {
    let mut proxy = None;
    let h = Harness::start_with(Layout::Auto, |cfg| {
        let port: u16 = cfg
            .node_ws_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap();
        let direct = cfg.node_ws_url.clone();
        let p = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
        // Start-up reads and the head subscription go through the proxy; broadcast and
        // the fall-back for the subscription go to anvil directly.
        cfg.node_ws_url = p.ws_url();
        cfg.providers = vec![ProviderConfig {
            name: "direct".into(),
            ws_url: direct,
        }];
        proxy = Some(p);
    });
    let proxy = proxy.unwrap();
    let mut desk = h.desk();
    let ids: Vec<String> = (0..10).map(|i| format!("cut-{i}")).collect();
    h.rt.block_on(async {
        for (i, id) in ids.iter().take(5).enumerate() {
            desk.send(&submit(transfer(id, "dev1", 5 + i % 5, 100 + i as u128)))
                .await
                .unwrap();
        }
    });
    // Mid-flight: the subscription's connection is cut and the node refuses it for a
    // while; meanwhile more intents arrive and blocks are mined.
    proxy.set(Fault::Refuse);
    h.rt.block_on(async {
        for (i, id) in ids.iter().enumerate().skip(5) {
            desk.send(&submit(transfer(id, "dev1", 5 + i % 5, 100 + i as u128)))
                .await
                .unwrap();
        }
    });
    std::thread::sleep(Duration::from_millis(1_200));
    let frames = h.rt.block_on(collect_until_final(
        &mut desk,
        &ids,
        Duration::from_secs(60),
    ));
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    for id in &ids {
        let st = states(&frames[id]);
        assert_eq!(
            st.last().map(String::as_str),
            Some("confirmed"),
            "{id}: {st:?}"
        );
        let r = rpc
            .receipt(signed_hash(&frames[id]))
            .unwrap()
            .expect("mined");
        let inc = frames[id]
            .iter()
            .find(|x| x["state"] == "included")
            .unwrap();
        assert_eq!(inc["block_number"], json!(r.block_number), "{id}");
    }
    assert!(metric(&h, "engine_head_resubscribes_total") >= 1.0);
    assert_eq!(metric(&h, "engine_head_subscribed"), 1.0);
}
