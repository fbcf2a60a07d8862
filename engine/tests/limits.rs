//! Abuse limits at the desk edge, through the real WebSocket protocol against a real
//! anvil: frame rates per connection and per principal (refused frames are named and not
//! processed; everything accepted still lands), connections per principal, and the JWT
//! checks of the upgrade (expiry, not-before, key rotation).

mod common;

use std::time::Duration;

use common::*;
use engine::auth::{JwtAuth, Roles};
use engine::config::Layout;
use engine::desk::{Desk, DeskError};
use engine::limits::LimitsConfig;
use serde_json::{Value, json};

fn limits(tweak: impl FnOnce(&mut LimitsConfig)) -> LimitsConfig {
    let mut l = LimitsConfig::default();
    tweak(&mut l);
    l
}

#[test]
fn frames_over_a_connections_rate_are_refused_by_name_and_nothing_accepted_is_lost() {
    let h = Harness::start_with(Layout::Auto, |cfg| {
        cfg.limits = limits(|l| {
            l.frames_per_sec_per_connection = 2; // one token per 500 ms
            l.burst_per_connection = 4;
        });
    });
    let mut desk = h.desk();
    let ids: Vec<String> = (0..8).map(|i| format!("rl-{i}")).collect();
    let frames = h.rt.block_on(async {
        for (i, id) in ids.iter().enumerate() {
            desk.send(&submit(transfer(id, "dev0", 5 + i % 5, 1_000)))
                .await
                .unwrap();
        }
        collect_until_final(&mut desk, &ids, Duration::from_secs(60)).await
    });
    let mut refused = Vec::new();
    let mut landed = Vec::new();
    for id in &ids {
        let last = frames[id].last().unwrap();
        if last["op"] == "error" {
            assert_eq!(last["code"], "rate_limited", "{last}");
            assert_eq!(
                last["req"],
                id.as_str(),
                "the refused frame is named: {last}"
            );
            let m = last["message"].as_str().unwrap();
            assert!(
                m.contains("2 frames/s") && m.contains("not processed"),
                "{m}"
            );
            assert!(
                !frames[id].iter().any(|f| f["op"] == "ack"),
                "a refused frame is not processed: {:?}",
                frames[id]
            );
            refused.push(id.clone());
        } else {
            assert_eq!(last["state"], "confirmed", "{:?}", frames[id]);
            landed.push(id.clone());
        }
    }
    assert!(
        (4..=5).contains(&landed.len()),
        "the burst of 4 (plus at most one refill) went through: {landed:?}"
    );
    assert_eq!(landed.len() + refused.len(), 8);
    assert!(metric(&h, "engine_rate_limited_total") >= refused.len() as f64);

    // The engine kept serving this desk: after a pause the refused ones go through.
    std::thread::sleep(Duration::from_millis(2_200));
    let frames = h.rt.block_on(async {
        for id in &refused {
            let i: usize = id[3..].parse().unwrap();
            desk.send(&submit(transfer(id, "dev0", 5 + i % 5, 1_000)))
                .await
                .unwrap();
        }
        collect_until_final(&mut desk, &refused, Duration::from_secs(60)).await
    });
    for id in &refused {
        assert_eq!(
            frames[id].last().unwrap()["state"],
            "confirmed",
            "{:?}",
            frames[id]
        );
    }
    // Each accepted transfer was sent once: dev0's nonce is exactly the count.
    let mut rpc = venues::RpcClient::connect(&h.anvil.ws_url()).unwrap();
    assert_eq!(
        rpc.transaction_count(venues::DEV_ADDRESSES[0], "latest")
            .unwrap(),
        8
    );
}

/// Sends `n` pings on `desk` and returns the replies.
async fn pings(desk: &mut Desk, tag: &str, n: usize) -> Vec<Value> {
    for i in 0..n {
        desk.send(&json!({"op": "ping", "req": format!("{tag}-{i}")}))
            .await
            .unwrap();
    }
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            tokio::time::timeout(Duration::from_secs(10), desk.recv())
                .await
                .expect("a reply to every ping")
                .unwrap(),
        );
    }
    out
}

#[test]
fn a_principals_rate_is_shared_by_its_connections_and_other_principals_are_unaffected() {
    let h = Harness::start_with(Layout::Auto, |cfg| {
        cfg.limits = limits(|l| {
            l.frames_per_sec_per_principal = 1;
            l.burst_per_principal = 6;
        });
    });
    let mut a = h.desk();
    let mut b = h.desk();
    let (ra, rb) =
        h.rt.block_on(async { (pings(&mut a, "a", 5).await, pings(&mut b, "b", 5).await) });
    let all: Vec<&Value> = ra.iter().chain(rb.iter()).collect();
    let pongs = all.iter().filter(|f| f["op"] == "pong").count();
    assert_eq!(pongs, 6, "six of ten over both connections: {all:?}");
    for f in all.iter().filter(|f| f["op"] == "error") {
        assert_eq!(f["code"], "rate_limited");
        assert!(
            f["message"]
                .as_str()
                .unwrap()
                .contains("principal `desk-a`"),
            "{f}"
        );
        assert!(f["req"].as_str().is_some_and(|r| r.starts_with('b')), "{f}");
    }
    // Another principal has its own budget.
    let other = h.token_for("desk-b", Roles::all());
    let mut c = h.rt.block_on(Desk::connect(&h.url, Some(&other))).unwrap();
    let rc = h.rt.block_on(pings(&mut c, "c", 3));
    assert!(rc.iter().all(|f| f["op"] == "pong"), "{rc:?}");
}

#[test]
fn a_principal_gets_at_most_its_connection_cap_and_a_closed_one_frees_a_slot() {
    let h = Harness::start_with(Layout::Auto, |cfg| {
        cfg.limits = limits(|l| l.max_connections_per_principal = 2);
    });
    let first = h.desk();
    let _second = h.desk();
    match h.rt.block_on(Desk::connect(&h.url, Some(&h.token))) {
        Err(DeskError::Refused(429)) => {}
        other => panic!("expected HTTP 429, got {other:?}"),
    }
    assert_eq!(metric(&h, "engine_connections_refused_total"), 1.0);
    // Another principal is not counted against desk-a.
    let other = h.token_for("desk-b", Roles::all());
    h.rt.block_on(Desk::connect(&h.url, Some(&other)))
        .expect("desk-b connects");
    h.rt.block_on(first.close());
    let mut again = None;
    for _ in 0..50 {
        match h.rt.block_on(Desk::connect(&h.url, Some(&h.token))) {
            Ok(d) => {
                again = Some(d);
                break;
            }
            Err(DeskError::Refused(429)) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    }
    let mut again = again.expect("the closed connection's slot is given back");
    let r = h.rt.block_on(pings(&mut again, "x", 1));
    assert_eq!(r[0]["op"], "pong");
}

#[test]
fn the_upgrade_checks_expiry_not_before_and_accepts_a_previous_key_while_rotating() {
    const NEW: &str = "rotated-secret-0123456789abcdef";
    let h = Harness::start_with(Layout::Auto, |cfg| {
        cfg.jwt_secret = NEW.into();
        cfg.jwt_previous_secrets = vec![engine::config::SecretString(SECRET.into())];
    });
    // The harness's token is signed with the previous secret: still accepted.
    let mut d = h.desk();
    assert_eq!(h.rt.block_on(pings(&mut d, "p", 1))[0]["op"], "pong");
    // One signed with the new secret, too.
    let fresh = JwtAuth::new(NEW.as_bytes()).issue("desk-n", Roles::all(), 60);
    h.rt.block_on(Desk::connect(&h.url, Some(&fresh)))
        .expect("new key");
    // A key that is neither: 401.
    let stranger = JwtAuth::new(b"some-other-secret-0123456789").issue("eve", Roles::all(), 60);
    assert!(matches!(
        h.rt.block_on(Desk::connect(&h.url, Some(&stranger))),
        Err(DeskError::Refused(401))
    ));
    // Expired, and not yet valid: 401 with the reason in the body.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let key = jsonwebtoken::EncodingKey::from_secret(NEW.as_bytes());
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    for (claims, why) in [
        (
            json!({"sub": "late", "roles": ["trader"], "exp": now - 120}),
            "token expired",
        ),
        (
            json!({"sub": "early", "roles": ["trader"], "exp": now + 600, "nbf": now + 300}),
            "not valid yet",
        ),
    ] {
        let t = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        assert!(matches!(
            h.rt.block_on(Desk::connect(&h.url, Some(&t))),
            Err(DeskError::Refused(401))
        ));
        let body = upgrade_body(h.addr(), &t);
        assert!(body.contains(why), "{body}");
    }
}

/// The HTTP response to a WebSocket upgrade with bearer token `t`.
fn upgrade_body(addr: std::net::SocketAddr, t: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {t}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
