//! Broadcast over several RPC providers, with faults injected between the engine and a
//! real anvil: each provider is a loopback fault proxy (`venues::fault`) in front of the
//! same node, so a provider can be cut, slowed, blackholed or made to refuse while the
//! chain stays the judge of what landed. The head subscription and start-up reads go to
//! anvil directly.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use common::*;
use engine::config::{Layout, ProviderConfig};
use serde_json::Value;
use venues::fault::{Fault, FaultProxy};
use venues::{DEV_ADDRESSES, RpcClient};

/// Two providers, `a` (first in configuration order) and `b`, both in front of the
/// harness's anvil.
struct Two {
    h: Harness,
    a: FaultProxy,
    b: FaultProxy,
}

fn two_providers(tweak: impl FnOnce(&mut engine::Config)) -> Two {
    let mut proxies = None;
    let h = Harness::start_with(Layout::Auto, |cfg| {
        let port: u16 = cfg
            .node_ws_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("anvil url has a port");
        let upstream = SocketAddr::from(([127, 0, 0, 1], port));
        let a = FaultProxy::start(upstream).unwrap();
        let b = FaultProxy::start(upstream).unwrap();
        cfg.providers = vec![
            ProviderConfig {
                name: "prov-a".into(),
                ws_url: a.ws_url(),
            },
            ProviderConfig {
                name: "prov-b".into(),
                ws_url: b.ws_url(),
            },
        ];
        cfg.broadcast.hedge_delay_us = 2_000;
        cfg.broadcast.heartbeat_ms = 200;
        cfg.broadcast.heartbeat_timeout_ms = 500;
        cfg.broadcast.reconnect_min_ms = 20;
        cfg.broadcast.reconnect_max_ms = 200;
        tweak(cfg);
        proxies = Some((a, b));
    });
    let (a, b) = proxies.unwrap();
    Two { h, a, b }
}

/// The value of one sample line of `/metrics`, e.g. `engine_provider_up{provider="prov-a"}`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn venues_of(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .find(|f| f["state"] == "broadcast")
        .and_then(|f| f["venues"].as_array())
        .map(|v| v.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// Every transaction of `frames` exists on chain exactly once: its hash has a receipt, and
/// the sender's nonces are all distinct (no nonce used by two transactions).
fn on_chain_once(h: &Harness, all: &[Vec<Value>]) {
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let mut nonces = std::collections::HashSet::new();
    for f in all {
        let signed = f.iter().find(|x| x["state"] == "signed").unwrap();
        let hash: B256 = signed["tx_hash"].as_str().unwrap().parse().unwrap();
        assert!(rpc.receipt(hash).unwrap().is_some(), "{hash} mined");
        assert!(
            nonces.insert(signed["nonce"].as_u64().unwrap()),
            "nonce used twice"
        );
    }
}

#[test]
fn primary_down_intents_land_through_the_second_without_a_duplicate_nonce() {
    let t = two_providers(|_| {});
    let from = DEV_ADDRESSES[0];
    // Both up: the first in configuration order takes the first transactions.
    let before = transfers_confirm(&t.h, "dev0", from, "up", 3);
    on_chain_once(&t.h, &before);
    assert!(
        metric(
            &t.h,
            r#"engine_provider_first_accepts_total{provider="prov-a"}"#
        ) >= 1.0
    );

    // The primary goes down hard: live connections cut, new ones refused.
    t.a.set(Fault::Refuse);
    wait_for("prov-a reported down", || {
        metric(&t.h, r#"engine_provider_up{provider="prov-a"}"#) == 0.0
    });
    let b_before = metric(
        &t.h,
        r#"engine_provider_first_accepts_total{provider="prov-b"}"#,
    );
    let during = transfers_confirm(&t.h, "dev0", from, "down", 8);
    on_chain_once(&t.h, &during);
    for f in &during {
        assert_eq!(venues_of(f), vec!["prov-b"], "{f:?}");
    }
    let b_after = metric(
        &t.h,
        r#"engine_provider_first_accepts_total{provider="prov-b"}"#,
    );
    assert_eq!(b_after - b_before, 8.0, "prov-b took all eight");

    // It comes back: reconnected (with backoff) and used again.
    t.a.set(Fault::Pass);
    wait_for("prov-a reconnected", || {
        metric(&t.h, r#"engine_provider_up{provider="prov-a"}"#) == 1.0
    });
    assert!(
        metric(
            &t.h,
            r#"engine_provider_reconnects_total{provider="prov-a"}"#
        ) >= 1.0
    );
    let after = transfers_confirm(&t.h, "dev0", from, "back", 2);
    on_chain_once(&t.h, &after);
}

#[test]
fn slow_provider_loses_to_the_hedge_and_is_demoted() {
    let t = two_providers(|cfg| cfg.broadcast.latency_budget_us = 50_000);
    // prov-a answers 150 ms late each way; the hedge (2 ms) sends to prov-b, which wins.
    t.a.set(Fault::Delay(Duration::from_millis(150)));
    let started = Instant::now();
    let frames = transfers_confirm(&t.h, "dev1", DEV_ADDRESSES[1], "slow", 5);
    on_chain_once(&t.h, &frames);
    assert!(metric(&t.h, "engine_broadcast_hedges_total") >= 1.0);
    assert!(
        metric(
            &t.h,
            r#"engine_provider_first_accepts_total{provider="prov-b"}"#
        ) >= 4.0,
        "the hedge won"
    );
    // Some went to both (the hedge); the broadcast event names every provider written to.
    assert!(
        frames
            .iter()
            .any(|f| venues_of(f) == vec!["prov-a", "prov-b"]),
        "{frames:?}"
    );
    // prov-a's answers arrive past the 50 ms budget: demoted.
    wait_for("prov-a demoted", || {
        metric(&t.h, r#"engine_provider_demoted{provider="prov-a"}"#) == 1.0
    });
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn blackholed_provider_is_hedged_around_then_dropped_by_its_heartbeat() {
    let t = two_providers(|_| {});
    t.a.set(Fault::Blackhole);
    let frames = transfers_confirm(&t.h, "dev2", DEV_ADDRESSES[2], "bh", 4);
    on_chain_once(&t.h, &frames);
    // Nothing comes back from prov-a: its heartbeat goes unanswered and the connection is
    // dropped and redialled.
    wait_for("prov-a heartbeat timeout", || {
        metric(
            &t.h,
            r#"engine_provider_disconnects_total{provider="prov-a"}"#,
        ) >= 1.0
    });
    t.a.set(Fault::Pass);
    wait_for("prov-a back", || {
        metric(&t.h, r#"engine_provider_up{provider="prov-a"}"#) == 1.0
    });
}

#[test]
fn a_refusal_is_retried_on_the_other_provider_and_the_refuser_demoted() {
    let t = two_providers(|_| {});
    t.a.set(Fault::RpcError {
        method: "eth_sendRawTransaction".into(),
        code: -32000,
        message: "injected refusal".into(),
    });
    let frames = transfers_confirm(&t.h, "dev3", DEV_ADDRESSES[3], "refused", 3);
    on_chain_once(&t.h, &frames);
    assert!(t.a.injected_errors() >= 1);
    assert!(metric(&t.h, r#"engine_provider_errors_total{provider="prov-a"}"#) >= 1.0);
    assert_eq!(
        metric(&t.h, r#"engine_provider_demoted{provider="prov-a"}"#),
        1.0,
        "refused what prov-b accepted"
    );
}

#[test]
fn with_no_provider_reachable_intents_wait_then_go_or_fail_clearly() {
    let t = two_providers(|cfg| cfg.broadcast.venue_wait_ms = 3_000);
    t.a.set(Fault::Refuse);
    t.b.set(Fault::Refuse);
    wait_for("both down", || {
        metric(&t.h, r#"engine_provider_up{provider="prov-a"}"#) == 0.0
            && metric(&t.h, r#"engine_provider_up{provider="prov-b"}"#) == 0.0
    });
    // Waits for a provider, which comes back within the wait: sent then.
    let mut desk = t.h.desk();
    let ids = vec!["wait-1".to_owned()];
    t.h.rt.block_on(async {
        desk.send(&submit(transfer("wait-1", "dev4", 5, 10)))
            .await
            .unwrap();
    });
    std::thread::sleep(Duration::from_millis(500));
    t.b.set(Fault::Pass);
    let frames = t.h.rt.block_on(collect_until_final(
        &mut desk,
        &ids,
        Duration::from_secs(30),
    ));
    assert_eq!(
        states(&frames["wait-1"]).last().map(String::as_str),
        Some("confirmed"),
        "{frames:?}"
    );

    // Down for longer than the wait: failed, with the reason, and nothing on chain.
    t.b.set(Fault::Refuse);
    wait_for("b down again", || {
        metric(&t.h, r#"engine_provider_up{provider="prov-b"}"#) == 0.0
    });
    let ids = vec!["wait-2".to_owned()];
    let frames = t.h.rt.block_on(async {
        desk.send(&submit(transfer("wait-2", "dev4", 5, 11)))
            .await
            .unwrap();
        collect_until_final(&mut desk, &ids, Duration::from_secs(30)).await
    });
    let last = frames["wait-2"].last().unwrap();
    assert_eq!(last["state"], "failed", "{frames:?}");
    assert_eq!(last["reason"], "venue_unavailable");
    let signed = frames["wait-2"]
        .iter()
        .find(|x| x["state"] == "signed")
        .unwrap();
    let hash: B256 = signed["tx_hash"].as_str().unwrap().parse().unwrap();
    let mut rpc = RpcClient::connect(&t.h.anvil.ws_url()).unwrap();
    assert!(rpc.receipt(hash).unwrap().is_none(), "never sent");
}
