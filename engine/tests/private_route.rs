//! The private route against a real anvil: a loopback Flashbots relay
//! (`venues::relay_sim::RelaySim`) checks every request's `X-Flashbots-Signature` and
//! forwards the transactions it accepts to the harness's anvil over HTTP, the way a builder
//! would include them. The chain is the judge of what landed.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256};
use alloy_signer_local::PrivateKeySigner;
use common::*;
use engine::config::{Layout, RelayConfig};
use serde_json::{Value, json};
use venues::relay_sim::{RelaySim, RelaySimConfig};
use venues::{DEV_ADDRESSES, RpcClient};

/// A harness whose engine has one relay, `relay-a`, in front of its anvil.
struct WithRelay {
    h: Harness,
    sim: RelaySim,
    /// The relay-auth address the engine signs with.
    auth: Address,
    _dir: tempfile::TempDir,
}

/// Writes a fresh relay-auth key (mode 0600) into `dir`; returns its file and address.
fn relay_key(dir: &Path) -> (PathBuf, Address) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let signer = PrivateKeySigner::random();
    let path = dir.join("relay-auth.key");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap()
        .write_all(hex::encode(signer.to_bytes()).as_bytes())
        .unwrap();
    (path, signer.address())
}

/// The anvil behind `cfg` over HTTP (it serves both on one port).
fn node_http(cfg: &engine::Config) -> String {
    cfg.node_ws_url.replacen("ws://", "http://", 1)
}

/// Starts the harness with relay `relay-a`. `allow`: the relay's allow list given the
/// engine's relay-auth address (`None`: any valid signature).
fn with_relay(
    allow: impl FnOnce(Address) -> Option<Vec<Address>>,
    sim_cfg: RelaySimConfig,
    tweak: impl FnOnce(&mut engine::Config),
) -> WithRelay {
    let dir = tempfile::tempdir().unwrap();
    let (key, auth) = relay_key(dir.path());
    let allowed_auth = allow(auth);
    let mut sim = None;
    let h = Harness::start_with(Layout::Auto, |cfg| {
        let s = RelaySim::start(
            &node_http(cfg),
            RelaySimConfig {
                allowed_auth,
                ..sim_cfg
            },
        )
        .unwrap();
        cfg.relays = vec![RelayConfig {
            name: "relay-a".into(),
            url: s.url(),
        }];
        cfg.relay_auth_key_file = Some(key);
        tweak(cfg);
        sim = Some(s);
    });
    WithRelay {
        h,
        sim: sim.unwrap(),
        auth,
        _dir: dir,
    }
}

/// The value of one sample line of `/metrics`, e.g. `engine_relay_up{relay="relay-a"}`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn intent(id: &str, account: &str, to: usize, wei: u128, extra: Value) -> Value {
    let mut v = transfer(id, account, to, wei);
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// Submits `intents` on one desk and waits until each is final.
fn run(h: &Harness, intents: &[Value]) -> std::collections::HashMap<String, Vec<Value>> {
    let mut desk = h.desk();
    let ids: Vec<String> = intents
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    h.rt.block_on(async {
        for i in intents {
            desk.send(&submit(i.clone())).await.unwrap();
        }
        collect_until_final(&mut desk, &ids, Duration::from_secs(30)).await
    })
}

fn event<'a>(frames: &'a [Value], state: &str) -> &'a Value {
    frames
        .iter()
        .find(|f| f["state"] == state)
        .unwrap_or_else(|| panic!("no {state} event in {frames:#?}"))
}

fn tx_hash(frames: &[Value]) -> B256 {
    event(frames, "signed")["tx_hash"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn mined(h: &Harness, hash: B256) -> bool {
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    rpc.receipt(hash).unwrap().is_some_and(|r| r.success)
}

fn confirmed(frames: &[Value]) -> bool {
    states(frames).last().map(String::as_str) == Some("confirmed")
}

/// A policy where dev0..dev4 may send to accounts 5..9 and `auto` goes private at or
/// above 1000 wei.
fn routing_policy(dir: &Path) -> PathBuf {
    let allow: Vec<String> = (5..10)
        .map(|i| format!("\"{}\"", DEV_ADDRESSES[i]))
        .collect();
    let mut s =
        String::from("label = \"private-route\"\n[routing]\nprivate_above_wei = \"1000\"\n");
    for i in 0..5 {
        s.push_str(&format!(
            "[[account]]\nname = \"dev{i}\"\nallow = [{}]\nmax_value_wei = \"100000000000000000000\"\n",
            allow.join(", ")
        ));
    }
    let p = dir.join("policy.toml");
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn private_intents_are_mined_through_the_relay_with_max_block_from_the_head() {
    let t = with_relay(|a| Some(vec![a]), RelaySimConfig::default(), |_| {});
    // Move the chain well past the start: a `maxBlockNumber` counted from a stale head
    // would be behind it, and the relay would drop the transactions.
    let mut rpc = RpcClient::connect(&t.h.anvil.ws_url()).unwrap();
    let _: Value = rpc.call("anvil_mine", json!(["0x64"])).unwrap();
    assert!(rpc.block_number().unwrap() >= 100);
    std::thread::sleep(Duration::from_millis(1_000));
    assert_eq!(
        metric(&t.h, r#"engine_relay_up{relay="relay-a"}"#),
        1.0,
        "connected at start"
    );

    let intents: Vec<Value> = (0..3)
        .map(|i| {
            intent(
                &format!("priv-{i}"),
                "dev0",
                5 + i,
                1_000 + i as u128,
                json!({"route": "private"}),
            )
        })
        .collect();
    let frames = run(&t.h, &intents);
    for i in 0..3 {
        let f = &frames[&format!("priv-{i}")];
        assert!(confirmed(f), "{f:#?}");
        assert_eq!(event(f, "accepted")["route"], "private");
        let b = event(f, "broadcast");
        assert_eq!(b["route"], "private", "{b}");
        assert_eq!(b["venues"], json!(["relay-a"]), "{b}");
        assert!(mined(&t.h, tx_hash(f)));
    }
    assert_eq!(t.sim.received(), 3);
    assert_eq!(t.sim.forwarded(), 3, "{:?}", t.sim.last_forward_error());
    assert_eq!(t.sim.dropped(), 0, "maxBlockNumber was behind the head");
    assert_eq!(t.sim.rejected_signatures(), 0, "signed by {}", t.auth);
    assert!(metric(&t.h, "engine_private_route_share") > 0.0);
    assert_eq!(
        metric(&t.h, r#"engine_relay_first_accepts_total{relay="relay-a"}"#),
        3.0
    );
    assert_eq!(
        metric(&t.h, r#"engine_broadcast_routed_total{route="private"}"#),
        3.0
    );
    let health = http_get(t.h.addr(), "/health");
    let body: Value = serde_json::from_str(health.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let relays = body["relays"].as_array().expect("relays in /health");
    assert_eq!(relays[0]["name"], "relay-a");
    assert_eq!(relays[0]["up"], true);
    assert_eq!(relays[0]["first_accepts"], 3);
}

#[test]
fn max_block_number_is_the_head_plus_the_configured_window() {
    // Two blocks of window, held by the relay for eight blocks: it must drop it.
    let t = with_relay(
        |_| None,
        RelaySimConfig {
            include_delay: Duration::from_secs(2),
            ..RelaySimConfig::default()
        },
        |cfg| cfg.broadcast.private_max_blocks = 2,
    );
    let mut desk = t.h.desk();
    t.h.rt.block_on(async {
        desk.send(&submit(intent(
            "window-1",
            "dev3",
            5,
            77,
            json!({"route": "private"}),
        )))
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let f = tokio::time::timeout_at(deadline, desk.recv())
                .await
                .expect("broadcast event in time")
                .unwrap();
            if f["state"] == "broadcast" {
                assert_eq!(f["route"], "private", "{f}");
                break;
            }
            assert!(
                !matches!(f["state"].as_str(), Some("failed" | "rejected")),
                "{f}"
            );
        }
    });
    wait_for("the relay to drop it past its maxBlockNumber", || {
        t.sim.dropped() == 1
    });
    assert_eq!(t.sim.forwarded(), 0);
}

#[test]
fn a_relay_refusing_the_auth_key_fails_the_intent_or_it_falls_back_to_public() {
    // The relay only serves another relay-auth address: every request gets 403.
    let other = PrivateKeySigner::random().address();
    let t = with_relay(
        move |_| Some(vec![other]),
        RelaySimConfig::default(),
        |_| {},
    );
    // Separate accounts: a failed transaction leaves its nonce unused on chain.
    let frames = run(
        &t.h,
        &[
            intent("refused", "dev1", 5, 10, json!({"route": "private"})),
            intent(
                "fallback",
                "dev2",
                6,
                11,
                json!({"route": "private", "public_fallback": true}),
            ),
        ],
    );
    let refused = &frames["refused"];
    let last = refused.last().unwrap();
    assert_eq!(last["state"], "failed", "{refused:#?}");
    assert_eq!(last["reason"], "node_rejected");
    let msg = last["message"].as_str().unwrap();
    assert!(
        msg.contains("relay-a") && msg.contains("signature check failed"),
        "{msg}"
    );
    assert!(!mined(&t.h, tx_hash(refused)), "never sent anywhere");

    let fallback = &frames["fallback"];
    assert!(confirmed(fallback), "{fallback:#?}");
    let b = event(fallback, "broadcast");
    assert_eq!(b["route"], "public", "{b}");
    assert_eq!(b["venues"], json!(["anvil"]), "{b}");
    assert!(mined(&t.h, tx_hash(fallback)));

    assert!(t.sim.rejected_signatures() >= 2);
    assert_eq!(t.sim.received(), 0);
    assert_eq!(t.sim.forwarded(), 0);
    assert_eq!(
        metric(&t.h, "engine_broadcast_private_fallbacks_total"),
        1.0
    );
    assert!(metric(&t.h, r#"engine_relay_errors_total{relay="relay-a"}"#) >= 2.0);
    assert_eq!(
        metric(&t.h, r#"engine_broadcast_routed_total{route="private"}"#),
        0.0
    );
}

#[test]
fn auto_goes_private_above_the_policy_threshold_when_a_relay_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let policy = routing_policy(dir.path());
    let t = with_relay(
        |a| Some(vec![a]),
        RelaySimConfig::default(),
        |cfg| cfg.policy_file = Some(policy),
    );
    let frames = run(
        &t.h,
        &[
            intent("big", "dev4", 5, 5_000, json!({"route": "auto"})),
            intent("small", "dev4", 6, 10, json!({})),
        ],
    );
    let big = &frames["big"];
    assert!(confirmed(big), "{big:#?}");
    assert_eq!(event(big, "accepted")["route"], "private");
    assert_eq!(event(big, "broadcast")["route"], "private");
    assert_eq!(event(big, "broadcast")["venues"], json!(["relay-a"]));
    let small = &frames["small"];
    assert!(confirmed(small), "{small:#?}");
    assert_eq!(event(small, "accepted")["route"], "public");
    assert_eq!(event(small, "broadcast")["route"], "public");
    assert_eq!(t.sim.forwarded(), 1);
    assert_eq!(t.sim.rejected_signatures(), 0);
}

#[test]
fn without_relays_auto_goes_public_and_private_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policy = routing_policy(dir.path());
    let h = Harness::start_with(Layout::Auto, |cfg| cfg.policy_file = Some(policy));
    let frames = run(
        &h,
        &[
            intent("big", "dev4", 5, 5_000, json!({"route": "auto"})),
            intent("forced", "dev3", 5, 5_000, json!({"route": "private"})),
        ],
    );
    let big = &frames["big"];
    assert!(confirmed(big), "{big:#?}");
    assert_eq!(event(big, "accepted")["route"], "public");
    assert_eq!(event(big, "broadcast")["route"], "public");
    let forced = frames["forced"].last().unwrap();
    assert_eq!(forced["state"], "rejected", "{:#?}", frames["forced"]);
    assert_eq!(forced["reason"], "route_unavailable");
    assert_eq!(metric(&h, "engine_private_route_share"), 0.0);
}

/// Accepts on `port` from now on and pipes each connection to `upstream` (a relay that
/// comes up after the engine started).
fn forward_from(port: u16, upstream: SocketAddr) {
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(upstream) else {
                continue;
            };
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
}

#[test]
fn a_relay_down_at_start_is_redialled_and_intents_wait_for_it_within_the_venue_wait() {
    // Nothing listens on the relay's port at start.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = relay_key(dir.path());
    let mut node = String::new();
    let h = Harness::start_with(Layout::Auto, |cfg| {
        node = node_http(cfg);
        cfg.relays = vec![RelayConfig {
            name: "relay-late".into(),
            url: format!("http://127.0.0.1:{port}"),
        }];
        cfg.relay_auth_key_file = Some(key);
        cfg.broadcast.venue_wait_ms = 2_000;
        cfg.broadcast.reconnect_min_ms = 20;
        cfg.broadcast.reconnect_max_ms = 200;
    });
    assert_eq!(metric(&h, r#"engine_relay_up{relay="relay-late"}"#), 0.0);

    // No relay for longer than the venue wait: failed, or public with the fallback.
    let frames = run(
        &h,
        &[
            intent("early", "dev1", 5, 10, json!({"route": "private"})),
            intent(
                "early-fb",
                "dev2",
                5,
                10,
                json!({"route": "private", "public_fallback": true}),
            ),
        ],
    );
    let early = frames["early"].last().unwrap();
    assert_eq!(early["state"], "failed", "{:#?}", frames["early"]);
    assert_eq!(early["reason"], "venue_unavailable");
    assert!(!mined(&h, tx_hash(&frames["early"])));
    assert!(confirmed(&frames["early-fb"]), "{:#?}", frames["early-fb"]);
    assert_eq!(event(&frames["early-fb"], "broadcast")["route"], "public");

    // The relay comes up: redialled in the background, and a waiting intent goes to it.
    let sim = RelaySim::start(&node, RelaySimConfig::default()).unwrap();
    let mut desk = h.desk();
    let ids = vec!["late".to_owned()];
    h.rt.block_on(async {
        desk.send(&submit(intent(
            "late",
            "dev3",
            5,
            12,
            json!({"route": "private"}),
        )))
        .await
        .unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    forward_from(port, sim.addr());
    let frames = h.rt.block_on(collect_until_final(
        &mut desk,
        &ids,
        Duration::from_secs(60),
    ));
    let late = &frames["late"];
    assert!(confirmed(late), "{late:#?}");
    assert_eq!(event(late, "broadcast")["venues"], json!(["relay-late"]));
    assert_eq!(sim.forwarded(), 1);
    assert_eq!(sim.rejected_signatures(), 0);
    wait_for("relay reported up", || {
        metric(&h, r#"engine_relay_up{relay="relay-late"}"#) == 1.0
    });
    assert!(metric(&h, r#"engine_relay_reconnects_total{relay="relay-late"}"#) >= 1.0);
}

#[test]
fn a_relay_that_never_answers_is_dropped_and_its_transactions_move_on() {
    // The relay's path black-holes: connections are accepted, requests read, nothing is
    // ever answered. The engine learns it only from the missing answers.
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = relay_key(dir.path());
    let mut sim = None;
    let mut proxy = None;
    let h = Harness::start_with(Layout::Auto, |cfg| {
        let s = RelaySim::start(&node_http(cfg), RelaySimConfig::default()).unwrap();
        let p = venues::fault::FaultProxy::start(s.addr()).unwrap();
        cfg.relays = vec![RelayConfig {
            name: "relay-bh".into(),
            url: p.http_url(),
        }];
        cfg.relay_auth_key_file = Some(key);
        cfg.broadcast.heartbeat_timeout_ms = 300;
        cfg.broadcast.reconnect_min_ms = 20;
        cfg.broadcast.reconnect_max_ms = 100;
        cfg.broadcast.venue_wait_ms = 10_000;
        sim = Some(s);
        proxy = Some(p);
    });
    let (sim, proxy) = (sim.unwrap(), proxy.unwrap());
    proxy.set(venues::fault::Fault::Blackhole);

    let started = Instant::now();
    let frames = run(
        &h,
        &[
            intent("bh", "dev1", 5, 10, json!({"route": "private"})),
            intent(
                "bh-fb",
                "dev2",
                5,
                10,
                json!({"route": "private", "public_fallback": true}),
            ),
        ],
    );
    // Without the fallback: failed, clearly, long before the venue wait (10 s) ran out.
    let bh = frames["bh"].last().unwrap();
    assert_eq!(bh["state"], "failed", "{:#?}", frames["bh"]);
    assert_eq!(bh["reason"], "venue_unavailable", "{bh}");
    assert!(
        bh["message"]
            .as_str()
            .is_some_and(|d| d.contains("broke repeatedly")),
        "{bh}"
    );
    assert!(!frames["bh"].iter().any(|f| f["state"] == "broadcast"));
    assert!(!mined(&h, tx_hash(&frames["bh"])));
    // With it: public, and mined.
    let fb = &frames["bh-fb"];
    assert!(confirmed(fb), "{fb:#?}");
    assert_eq!(event(fb, "broadcast")["route"], "public", "{fb:#?}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "decided by the missing answers, not by the venue wait: {:?}",
        started.elapsed()
    );
    assert_eq!(sim.forwarded(), 0, "nothing got through the black hole");
    assert!(metric(&h, r#"engine_relay_disconnects_total{relay="relay-bh"}"#) >= 5.0);

    // The path heals: the redialled relay takes the next private intent.
    proxy.set(venues::fault::Fault::Pass);
    let frames = run(
        &h,
        &[intent("healed", "dev3", 5, 12, json!({"route": "private"}))],
    );
    let healed = &frames["healed"];
    assert!(confirmed(healed), "{healed:#?}");
    assert_eq!(event(healed, "broadcast")["route"], "private");
    assert_eq!(event(healed, "broadcast")["venues"], json!(["relay-bh"]));
}
