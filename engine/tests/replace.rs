//! After signing, against a real anvil: a transaction stuck under a base-fee spike is
//! replaced with higher fees and the replacement is included; a desk's `cancel` takes the
//! nonce with a zero-value transfer (after broadcast) or drops the intent (before
//! signing); and a transaction the node refuses leaves no gap behind it. The chain is the
//! judge of every nonce.

mod common;

use std::str::FromStr;
use std::time::Duration;

use alloy_primitives::{B256, U256};
use common::*;
use engine::auth::{Role, Roles};
use engine::config::{KeyConfig, Layout};
use engine::desk::Desk;
use serde_json::{Value, json};
use venues::{AnvilConfig, RpcClient};

fn hash_of(f: &Value) -> B256 {
    f["tx_hash"].as_str().unwrap().parse().unwrap()
}

fn event<'a>(frames: &'a [Value], state: &str) -> &'a Value {
    frames
        .iter()
        .find(|f| f["state"] == state)
        .unwrap_or_else(|| panic!("no {state} in {frames:#?}"))
}

/// Waits for `state` of `id`, keeping every frame read.
async fn until_state(desk: &mut Desk, id: &str, state: &str, seen: &mut Vec<Value>) {
    while !seen.iter().any(|f| f["id"] == id && f["state"] == state) {
        let f = tokio::time::timeout(Duration::from_secs(60), desk.recv())
            .await
            .unwrap_or_else(|_| panic!("no {state} for {id}; seen {seen:#?}"))
            .unwrap();
        seen.push(f);
    }
}

fn slow_chain() -> AnvilConfig {
    AnvilConfig::with_block_time(Duration::from_secs(2))
}

#[test]
fn a_transaction_stuck_under_a_fee_spike_is_replaced_and_the_replacement_included() {
    let h = Harness::start_on(&slow_chain(), Layout::Auto, |cfg| {
        cfg.broadcast.stuck_blocks = 1;
        cfg.confirmations = 1;
    });
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let mut desk = h.desk();
    let mut seen = Vec::new();
    h.rt.block_on(async {
        desk.send(&submit(transfer("spike", "dev0", 5, 777)))
            .await
            .unwrap();
        until_state(&mut desk, "spike", "broadcast", &mut seen).await;
    });
    // In the node's pool now, priced for the current base fee (twice it plus the tip).
    // The next block's base fee jumps far above that: the transaction is stuck (anvil
    // refuses such a transaction when it is sent, so the spike comes after it).
    let _: Value = rpc
        .call("anvil_setNextBlockBaseFeePerGas", json!(["0x174876e800"])) // 100 gwei
        .unwrap();
    let mut frames = h.rt.block_on(async {
        collect_until_final(&mut desk, &["spike".into()], Duration::from_secs(90)).await
    });
    let mut f: Vec<Value> = seen;
    f.append(frames.get_mut("spike").unwrap());
    let f = &f;
    let st = states(f);
    assert_eq!(st.last().map(String::as_str), Some("confirmed"), "{st:?}");
    let original = hash_of(event(f, "signed"));
    let replaced = event(f, "replaced");
    let replacement = hash_of(replaced);
    assert_ne!(original, replacement);
    assert_eq!(replaced["nonce"], event(f, "signed")["nonce"], "same nonce");
    let included = f.iter().rev().find(|x| x["state"] == "included").unwrap();
    // The transaction in the block is one of the intent's (the last replacement, usually).
    let got = hash_of(included);
    let r = rpc.receipt(got).unwrap().expect("mined");
    assert!(r.success);
    assert!(
        rpc.receipt(original).unwrap().is_none() || got == original,
        "never both"
    );
    assert_eq!(
        rpc.transaction_count(venues::DEV_ADDRESSES[0], "latest")
            .unwrap(),
        1,
        "one nonce used"
    );
}

#[test]
fn cancel_after_broadcast_takes_the_nonce_with_a_zero_value_transfer() {
    let h = Harness::start_on(&slow_chain(), Layout::Auto, |cfg| cfg.confirmations = 1);
    let mut desk = h.desk();
    let mut seen = Vec::new();
    let ok = h.rt.block_on(async {
        desk.send(&submit(transfer("c1", "dev1", 5, 12_345)))
            .await
            .unwrap();
        until_state(&mut desk, "c1", "broadcast", &mut seen).await;
        desk.send(&json!({"op": "cancel", "id": "c1", "req": "x"}))
            .await
            .unwrap();
        let ok = reply(&mut desk, "x").await;
        until_state(&mut desk, "c1", "cancelled", &mut seen).await;
        ok
    });
    assert_eq!(ok["op"], "ok", "{ok}");
    assert_eq!(ok["of"], "cancel");
    let f: Vec<Value> = seen.into_iter().filter(|x| x["id"] == "c1").collect();
    let st = states(&f);
    let pos = |s: &str| st.iter().position(|x| x == s).unwrap();
    assert!(pos("replaced") < pos("cancelled"), "{st:?}");
    assert!(!st.contains(&"included".to_string()), "{st:?}");
    let cancel_hash = hash_of(event(&f, "replaced"));
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let r = rpc.receipt(cancel_hash).unwrap().expect("cancel mined");
    let from = venues::DEV_ADDRESSES[1];
    assert_eq!(r.from, from);
    assert_eq!(r.to, Some(from), "a transfer to itself");
    assert!(
        rpc.receipt(hash_of(event(&f, "signed"))).unwrap().is_none(),
        "the original never lands"
    );
    // Cancelling again, or something ended, is refused clearly.
    let again = h.rt.block_on(async {
        desk.send(&json!({"op": "cancel", "id": "c1", "req": "y"}))
            .await
            .unwrap();
        reply(&mut desk, "y").await
    });
    assert_eq!(again["op"], "error");
    assert_eq!(again["code"], "conflict");
    let unknown = h.rt.block_on(async {
        desk.send(&json!({"op": "cancel", "id": "nope", "req": "z"}))
            .await
            .unwrap();
        reply(&mut desk, "z").await
    });
    assert_eq!(unknown["code"], "not_found");
}

#[test]
fn cancel_before_signing_drops_the_intent_without_using_a_nonce() {
    let h = Harness::start_with(Layout::Auto, |cfg| cfg.accounts[2].approvals = 1);
    let trader = Roles::default().with(Role::Trader);
    let t = h.token_for("maker", trader);
    let mut maker = h.rt.block_on(Desk::connect(&h.url, Some(&t))).unwrap();
    let t = h.token_for("checker", Roles::default().with(Role::Approver));
    let mut checker = h.rt.block_on(Desk::connect(&h.url, Some(&t))).unwrap();
    let mut seen = Vec::new();
    h.rt.block_on(async {
        maker
            .send(&submit(transfer("w1", "dev2", 5, 1)))
            .await
            .unwrap();
        until_state(&mut maker, "w1", "pending_approval", &mut seen).await;
        maker
            .send(&json!({"op": "cancel", "id": "w1", "req": "c"}))
            .await
            .unwrap();
        let ok = reply(&mut maker, "c").await;
        assert_eq!(ok["op"], "ok", "{ok}");
        // Approved after the cancel: it reaches signing and is dropped there.
        checker
            .send(&json!({"op": "approve", "id": "w1", "submitter": "maker", "req": "a"}))
            .await
            .unwrap();
        until_state(&mut maker, "w1", "cancelled", &mut seen).await;
    });
    let st = states(&seen);
    assert!(!st.contains(&"signed".to_string()), "{st:?}");
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    assert_eq!(
        rpc.transaction_count(venues::DEV_ADDRESSES[2], "pending")
            .unwrap(),
        0,
        "no nonce used"
    );
}

#[test]
fn a_refused_transaction_leaves_no_nonce_gap() {
    // An account with little ETH: its second intent asks for more than it has, the node
    // refuses it after the third was already signed on the next nonce.
    let key = "4c0883a69102937d6231471b5dbb6204fe512961708279f22a82e1e0e3d0b3c5";
    let addr = alloy_signer_local::PrivateKeySigner::from_str(key)
        .unwrap()
        .address();
    let h = Harness::start_with(Layout::Auto, |cfg| {
        let mut a = custody_account(
            "poor",
            KeyConfig::Local {
                secret_hex: key.into(),
            },
        );
        a.max_value_wei = U256::from(10u128.pow(19));
        cfg.accounts.push(a);
    });
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let _: Value = rpc
        .call("anvil_setBalance", json!([addr, "0xde0b6b3a7640000"])) // 1 ETH
        .unwrap();
    let mut desk = h.desk();
    let ids: Vec<String> = ["g-a", "g-b", "g-c"].map(String::from).to_vec();
    let frames = h.rt.block_on(async {
        desk.send(&submit(transfer("g-a", "poor", 5, 10u128.pow(17))))
            .await
            .unwrap();
        desk.send(&submit(transfer("g-b", "poor", 5, 5 * 10u128.pow(18))))
            .await
            .unwrap();
        desk.send(&submit(transfer("g-c", "poor", 6, 10u128.pow(17))))
            .await
            .unwrap();
        collect_until_final(&mut desk, &ids, Duration::from_secs(60)).await
    });
    let last = |id: &str| states(&frames[id]).last().cloned().unwrap();
    assert_eq!(last("g-a"), "confirmed", "{frames:#?}");
    assert_eq!(last("g-b"), "failed", "{frames:#?}");
    assert_eq!(last("g-c"), "confirmed", "{frames:#?}");
    let nonce = |id: &str| event(&frames[id], "signed")["nonce"].as_u64().unwrap();
    // Whether g-c was signed before or after g-b's refusal came back, nothing is stuck:
    // either it reused g-b's nonce, or a zero-value transfer filled g-b's.
    let used = rpc.transaction_count(addr, "latest").unwrap();
    if nonce("g-c") == nonce("g-b") {
        assert_eq!(used, 2);
    } else {
        assert_eq!(nonce("g-c"), nonce("g-b") + 1);
        assert_eq!(used, 3, "g-b's nonce filled");
    }
}

#[test]
fn above_the_intents_fee_cap_it_waits_visibly_and_lands_when_fees_fall() {
    let h = Harness::start_on(&slow_chain(), Layout::Auto, |cfg| {
        cfg.broadcast.stuck_blocks = 1;
        cfg.confirmations = 1;
    });
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let fee = rpc.fee_estimate().unwrap();
    // What the engine pays now (twice the base fee plus the tip), with room: the desk's cap.
    let engine_max = 2 * fee.base_fee_per_gas + fee.max_priority_fee_per_gas;
    let cap = engine_max * 12 / 10;
    let mut desk = h.desk();
    let mut seen = Vec::new();
    h.rt.block_on(async {
        let mut intent = transfer("capped", "dev3", 5, 99);
        intent["max_fee_per_gas_wei"] = json!(cap.to_string());
        desk.send(&submit(intent)).await.unwrap();
        until_state(&mut desk, "capped", "broadcast", &mut seen).await;
    });
    // The next base fee goes just above the cap: the transaction is stuck, and a
    // replacement (at least twice that base fee) would pass the cap.
    let spike = cap * 105 / 100;
    let _: Value = rpc
        .call(
            "anvil_setNextBlockBaseFeePerGas",
            json!([format!("0x{spike:x}")]),
        )
        .unwrap();
    // Empty blocks lower the base fee by 1/8 each: in a few blocks it is below what the
    // transaction pays, and it is included as it is.
    let mut frames = h.rt.block_on(async {
        collect_until_final(&mut desk, &["capped".into()], Duration::from_secs(90)).await
    });
    let mut f = seen;
    f.append(frames.get_mut("capped").unwrap());
    let st = states(&f);
    assert_eq!(st.last().map(String::as_str), Some("confirmed"), "{st:?}");
    let wait = event(&f, "fee_wait");
    assert!(
        wait["message"].as_str().unwrap().contains("fee cap"),
        "{wait}"
    );
    assert_eq!(st.iter().filter(|s| *s == "fee_wait").count(), 1, "{st:?}");
    // While the replacement would pass the cap nothing is replaced; once fees fall, the
    // original lands as it is, or a replacement that fits under the cap does.
    let wait_at = st.iter().position(|s| s == "fee_wait").unwrap();
    assert!(
        st.iter()
            .position(|s| s == "replaced")
            .is_none_or(|r| r > wait_at),
        "{st:?}"
    );
    let landed = hash_of(event(&f, "included"));
    let ours: Vec<B256> = f
        .iter()
        .filter(|x| x["state"] == "signed" || x["state"] == "replaced")
        .map(hash_of)
        .collect();
    assert!(ours.contains(&landed), "{landed} is one of {ours:?}");
    let r = rpc.receipt(landed).unwrap().expect("mined");
    assert!(r.success);
}

#[test]
fn a_nonce_used_outside_the_engine_is_reconciled_with_the_chain() {
    let h = Harness::start_with(Layout::Auto, |_| {});
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let from = venues::DEV_ADDRESSES[4];
    // The same key sends two transactions without the engine (anvil's accounts are
    // unlocked): nonces 0 and 1 are taken on chain, the engine still counts from 0.
    let mut outside = Vec::new();
    for _ in 0..2 {
        let h: B256 = rpc
            .call(
                "eth_sendTransaction",
                json!([{"from": from, "to": venues::DEV_ADDRESSES[9], "value": "0x1"}]),
            )
            .unwrap();
        outside.push(h);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while outside.iter().any(|h| rpc.receipt(*h).unwrap().is_none()) {
        assert!(std::time::Instant::now() < deadline, "outside txs mined");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut desk = h.desk();
    let first = h.rt.block_on(async {
        desk.send(&submit(transfer("behind-1", "dev4", 5, 1)))
            .await
            .unwrap();
        collect_until_final(&mut desk, &["behind-1".into()], Duration::from_secs(30)).await
    });
    let last = first["behind-1"].last().unwrap();
    assert_eq!(last["state"], "failed", "{first:?}");
    assert_eq!(last["reason"], "node_rejected");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("nonce"),
        "{last}"
    );
    // The engine reads the chain again (off the hot path): the next intent uses the next
    // free nonce, 2, rather than 1 (taken) or 0 again.
    std::thread::sleep(Duration::from_millis(500));
    let got = h.rt.block_on(async {
        desk.send(&submit(transfer("behind-2", "dev4", 5, 2)))
            .await
            .unwrap();
        collect_until_final(&mut desk, &["behind-2".into()], Duration::from_secs(30)).await
    });
    let frames = &got["behind-2"];
    assert_eq!(
        states(frames).last().map(String::as_str),
        Some("confirmed"),
        "{frames:?}"
    );
    assert_eq!(event(frames, "signed")["nonce"], json!(2), "{frames:?}");
    assert_eq!(rpc.transaction_count(from, "latest").unwrap(), 3);
}
