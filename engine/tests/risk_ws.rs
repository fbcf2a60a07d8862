//! The risk engine over the real WebSocket, with a real anvil: four-eyes with two
//! principals, the kill switch during a stream of intents, policy reloads under load, and
//! the audit trail those leave.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use engine::auth::{Role, Roles};
use engine::config::Layout;
use engine::desk::Desk;
use serde_json::{Value, json};
use venues::{DEV_ADDRESSES, RpcClient};

const ETH: u128 = 1_000_000_000_000_000_000;

/// dev0..dev4 may send to the dev chain's accounts 5..9; `cap` per intent; four-eyes above
/// `approval_above` on dev0 and dev1.
fn policy_text(label: &str, cap: &str, approval_above: &str) -> String {
    let allow: Vec<String> = (5..10)
        .map(|i| format!("\"{}\"", DEV_ADDRESSES[i]))
        .collect();
    let mut s = format!(
        "label = \"{label}\"\n[groups]\ndesk-targets = [{}]\n[approvals]\nttl = \"2s\"\n",
        allow.join(", ")
    );
    for i in 0..5 {
        s.push_str(&format!(
            "[[account]]\nname = \"dev{i}\"\nallow = [\"group:desk-targets\"]\nmax_value_wei = \"{cap}\"\n"
        ));
        if i < 2 {
            s.push_str(&format!("approval_above_wei = \"{approval_above}\"\n"));
        }
    }
    s
}

struct Setup {
    h: Harness,
    _dir: tempfile::TempDir,
    policy: PathBuf,
    audit: PathBuf,
}

fn start(text: &str, layout: Layout) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let audit = dir.path().join("audit");
    std::fs::write(&policy, text).unwrap();
    let (p, a) = (policy.clone(), audit.clone());
    let h = Harness::start_with(layout, move |c| {
        c.policy_file = Some(p);
        c.audit_dir = Some(a);
    });
    Setup {
        h,
        _dir: dir,
        policy,
        audit,
    }
}

fn connect(h: &Harness, sub: &str, roles: Roles) -> Desk {
    let t = h.token_for(sub, roles);
    h.rt.block_on(Desk::connect(&h.url, Some(&t))).unwrap()
}

/// Reads until a frame matches `pred`, returning every frame read.
async fn read_until(desk: &mut Desk, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let f = tokio::time::timeout(Duration::from_secs(30), desk.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out; frames so far: {seen:#?}"))
            .unwrap();
        let done = pred(&f);
        seen.push(f);
        if done {
            return seen;
        }
    }
}

/// The records (bodies) of the audit log in `dir`, once `want` holds of them (or after
/// 10 s); the chain verifies.
fn audit_lines(dir: &Path, want: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut lines: Vec<Value> = Vec::new();
        for (_, path) in engine::audit::list_segments(dir).unwrap_or_default() {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            // Only whole lines: the writer may be in the middle of one.
            let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            lines.extend(whole.lines().map(|l| {
                let v: Value = serde_json::from_str(l).expect("audit lines are JSON");
                v["rec"].clone()
            }));
        }
        if want(&lines) || std::time::Instant::now() > deadline {
            engine::audit::verify(dir, None, None).expect("the audit chain verifies");
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn four_eyes_over_the_websocket_with_two_principals() {
    let s = start(
        &policy_text("4eyes", &(100 * ETH).to_string(), &ETH.to_string()),
        Layout::Auto,
    );
    let h = &s.h;
    let trader_roles = Roles::default().with(Role::Trader).with(Role::Approver);
    let mut maker = connect(h, "maker", trader_roles);
    let mut checker = connect(h, "checker", Roles::default().with(Role::Approver));
    let mut plain = connect(h, "plain-trader", Roles::default().with(Role::Trader));
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let nonce0 = rpc.transaction_count(DEV_ADDRESSES[0], "latest").unwrap();

    h.rt.block_on(async {
        // Small intents pass; a large one waits for an approval.
        maker
            .send(&submit(transfer("small", "dev0", 5, ETH)))
            .await
            .unwrap();
        maker
            .send(&submit(transfer("big", "dev0", 6, 2 * ETH)))
            .await
            .unwrap();
        let frames = read_until(&mut maker, |f| {
            f["id"] == "big" && f["state"] == "pending_approval"
        })
        .await;
        let big: Vec<&Value> = frames.iter().filter(|f| f["id"] == "big").collect();
        assert_eq!(
            big.iter()
                .map(|f| f["state"].as_str().unwrap_or(f["op"].as_str().unwrap()))
                .collect::<Vec<_>>(),
            vec!["ack", "accepted", "pending_approval"]
        );
        assert_eq!(big[2]["policy_version"], 1);
        assert!(big[2]["message"].as_str().unwrap().contains("four-eyes"));

        // The submitter cannot approve their own intent, even with the approver role.
        maker
            .send(&json!({"op": "approve", "id": "big", "req": "self"}))
            .await
            .unwrap();
        let r = read_until(&mut maker, |f| f["req"] == "self").await;
        let r = r.last().unwrap();
        assert_eq!(r["op"], "error");
        assert_eq!(r["code"], "forbidden");
        assert!(r["message"].as_str().unwrap().contains("submitter"), "{r}");

        // A principal without the approver role cannot approve.
        plain
            .send(&json!({"op": "approve", "id": "big", "req": "p"}))
            .await
            .unwrap();
        let r = plain.recv().await.unwrap();
        assert_eq!(
            (r["code"].as_str(), r["req"].as_str()),
            (Some("forbidden"), Some("p"))
        );

        // The approver sees it waiting, approves it, and the submitter sees it go on.
        checker
            .send(&json!({"op": "pending", "req": "l"}))
            .await
            .unwrap();
        let list = checker.recv().await.unwrap();
        assert_eq!(list["op"], "pending");
        let row = &list["intents"][0];
        assert_eq!(
            (row["id"].as_str(), row["submitter"].as_str()),
            (Some("big"), Some("maker"))
        );
        assert_eq!(row["value_wei"], (2 * ETH).to_string());
        checker
            .send(&json!({"op": "approve", "id": "big", "submitter": "maker", "req": "ok"}))
            .await
            .unwrap();
        let r = checker.recv().await.unwrap();
        assert_eq!(
            (r["op"].as_str(), r["of"].as_str(), r["req"].as_str()),
            (Some("ok"), Some("approve"), Some("ok")),
            "{r}"
        );
        // Approving twice: it no longer waits.
        checker
            .send(&json!({"op": "approve", "id": "big"}))
            .await
            .unwrap();
        assert_eq!(checker.recv().await.unwrap()["code"], "not_found");

        let ids = vec!["small".to_owned(), "big".to_owned()];
        let frames = collect_until_final(&mut maker, &ids, Duration::from_secs(30)).await;
        assert_eq!(
            states(&frames["big"]),
            vec!["approved", "signed", "broadcast", "included", "confirmed"]
        );

        // A rejection by the approver ends the intent with the approver's reason.
        maker
            .send(&submit(transfer("refused", "dev1", 7, 3 * ETH)))
            .await
            .unwrap();
        read_until(&mut maker, |f| {
            f["id"] == "refused" && f["state"] == "pending_approval"
        })
        .await;
        checker
            .send(&json!({"op": "reject", "id": "refused", "reason": "counterparty not confirmed"}))
            .await
            .unwrap();
        assert_eq!(checker.recv().await.unwrap()["of"], "reject");
        let f = read_until(&mut maker, |f| f["id"] == "refused" && f["op"] == "event").await;
        let last = f.last().unwrap();
        assert_eq!(
            (last["state"].as_str(), last["reason"].as_str()),
            (Some("rejected"), Some("approval_rejected"))
        );
        assert!(
            last["message"]
                .as_str()
                .unwrap()
                .contains("counterparty not confirmed")
        );

        // Nobody approves: it expires after the policy's 2 s.
        maker
            .send(&submit(transfer("late", "dev1", 8, 3 * ETH)))
            .await
            .unwrap();
        read_until(&mut maker, |f| {
            f["id"] == "late" && f["state"] == "pending_approval"
        })
        .await;
        let f = read_until(&mut maker, |f| {
            f["id"] == "late" && (f["state"] == "failed")
        })
        .await;
        assert_eq!(f.last().unwrap()["reason"], "approval_expired");
        checker
            .send(&json!({"op": "approve", "id": "late"}))
            .await
            .unwrap();
        assert_eq!(checker.recv().await.unwrap()["code"], "not_found");
    });

    // The chain: exactly the small and the approved transfer left dev0; nothing from dev1.
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[0], "latest").unwrap(),
        nonce0 + 2
    );
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[1], "pending").unwrap(),
        0
    );

    // The audit trail has each step with the inputs that decided it.
    let lines = audit_lines(&s.audit, |l| {
        l.iter().any(|r| r["kind"] == "approval_expired")
    });
    let find = |kind: &str, outcome: Option<&str>| {
        lines
            .iter()
            .filter(|r| r["kind"] == kind && outcome.is_none_or(|o| r["outcome"] == o))
            .cloned()
            .collect::<Vec<_>>()
    };
    let asks = find("decision", Some("approval_required"));
    assert_eq!(asks.len(), 3, "{lines:#?}");
    assert_eq!(asks[0]["principal"], "maker");
    assert_eq!(asks[0]["account"], "dev0");
    assert_eq!(asks[0]["amount"], (2 * ETH).to_string());
    assert_eq!(asks[0]["policy_version"], 1);
    let approved = find("approved", None);
    assert_eq!(approved.len(), 1);
    assert_eq!(approved[0]["actor"], "checker");
    let allowed_after: Vec<_> = find("decision", Some("allow"))
        .into_iter()
        .filter(|r| r["approved_by"] == "checker")
        .collect();
    assert_eq!(
        allowed_after.len(),
        1,
        "the approved intent was decided again"
    );
    assert_eq!(find("rejected", None)[0]["actor"], "checker");
    assert_eq!(find("approval_expired", None).len(), 1);
    assert_eq!(
        find("policy_reload", None).len(),
        1,
        "the first load is recorded"
    );
}

#[test]
fn kill_switch_during_a_stream_signs_nothing_after_it() {
    let s = start(
        &policy_text("kill", &(100 * ETH).to_string(), &(100 * ETH).to_string()),
        Layout::PerStage,
    );
    let h = &s.h;
    let mut trader = connect(h, "trader", Roles::default().with(Role::Trader));
    let mut admin = connect(h, "admin", Roles::default().with(Role::Admin));
    let mut rpc = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let before = rpc.transaction_count(DEV_ADDRESSES[2], "latest").unwrap();
    const N: usize = 200;
    const KILL_AT: usize = 80;
    let ids: Vec<String> = (0..N).map(|i| format!("k-{i}")).collect();
    let mut early: Vec<Value> = Vec::new();
    let frames = h.rt.block_on(async {
        // A trader cannot pull the switch.
        trader
            .send(&json!({"op": "kill", "scope": "all", "req": "t"}))
            .await
            .unwrap();
        assert_eq!(trader.recv().await.unwrap()["code"], "forbidden");
        for (i, id) in ids.iter().enumerate() {
            if i == KILL_AT {
                // Let the stream get going: the intent before the switch was decided.
                let before = format!("k-{}", KILL_AT - 1);
                early = read_until(&mut trader, |f| {
                    f["id"] == before.as_str() && f["op"] == "event"
                })
                .await;
                admin
                    .send(&json!({"op": "kill", "scope": {"account": "dev2"}, "req": "k"}))
                    .await
                    .unwrap();
                let r = admin.recv().await.unwrap();
                assert_eq!(
                    (r["op"].as_str(), r["req"].as_str()),
                    (Some("ok"), Some("k")),
                    "{r}"
                );
                assert_eq!(r["active"], json!(["account:dev2"]));
            }
            trader
                .send(&submit(transfer(id, "dev2", 5 + i % 5, 1 + i as u128)))
                .await
                .unwrap();
            if i % 8 == 0 {
                tokio::task::yield_now().await;
            }
        }
        // Read until every intent after the switch is refused and every one before it is
        // signed or finished. A transaction signed just before the switch but not yet
        // written to the node is held by broadcast (it stays `signed`) until the unkill.
        let mut frames: HashMap<String, Vec<Value>> = HashMap::new();
        for f in early.drain(..) {
            if let Some(id) = f["id"].as_str() {
                frames.entry(id.to_owned()).or_default().push(f);
            }
        }
        let settled = |frames: &HashMap<String, Vec<Value>>| {
            ids.iter().enumerate().all(|(i, id)| {
                frames.get(id).is_some_and(|fs| {
                    fs.iter().any(|f| {
                        matches!(
                            f["state"].as_str(),
                            Some("confirmed" | "rejected" | "failed")
                        ) || (i < KILL_AT && f["state"] == "signed")
                    })
                })
            })
        };
        while !settled(&frames) {
            let f = tokio::time::timeout(Duration::from_secs(30), trader.recv())
                .await
                .expect("stream settles")
                .unwrap();
            if let Some(id) = f["id"].as_str() {
                frames.entry(id.to_owned()).or_default().push(f);
            }
        }
        // Let anything in flight land, then look at what is still only signed: held.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while let Ok(Ok(f)) = tokio::time::timeout(Duration::from_millis(50), trader.recv()).await {
            if let Some(id) = f["id"].as_str() {
                frames.entry(id.to_owned()).or_default().push(f);
            }
        }
        frames
    });
    let mut signed = 0;
    let mut held = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let st = states(&frames[id]);
        if st.contains(&"signed".to_owned()) {
            assert!(i < KILL_AT, "{id} was signed after the kill switch: {st:?}");
            signed += 1;
            if st.last().map(String::as_str) == Some("signed") {
                held.push(id.clone());
            }
        }
        if i >= KILL_AT {
            let last = frames[id].last().unwrap();
            assert_eq!(last["state"], "rejected", "{id}: {st:?}");
            assert_eq!(last["reason"], "kill_switch", "{id}");
        }
    }
    assert!(signed > 0, "intents before the switch went through");
    let mut rpc2 = RpcClient::connect(&h.anvil.ws_url()).unwrap();
    assert_eq!(
        rpc2.transaction_count(DEV_ADDRESSES[2], "pending").unwrap(),
        before + (signed - held.len()) as u64,
        "held transactions ({held:?}) were not sent while the switch was on"
    );
    h.rt.block_on(async {
        admin
            .send(&json!({"op": "unkill", "scope": {"account": "dev2"}}))
            .await
            .unwrap();
        assert_eq!(admin.recv().await.unwrap()["active"], json!([]));
        let f = collect_until_final(&mut trader, &held, Duration::from_secs(30)).await;
        for id in &held {
            assert_eq!(
                states(&f[id]),
                vec!["broadcast", "included", "confirmed"],
                "{id} was sent after the unkill"
            );
        }
    });
    // The chain agrees: exactly the signed ones left dev2.
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[2], "pending").unwrap(),
        before + signed as u64
    );
    // Thawed, the account works again.
    h.rt.block_on(async {
        trader
            .send(&submit(transfer("after", "dev2", 5, 1)))
            .await
            .unwrap();
        let f =
            collect_until_final(&mut trader, &["after".to_owned()], Duration::from_secs(30)).await;
        assert_eq!(f["after"].last().unwrap()["state"], "confirmed");
        // Bad scopes are named.
        admin
            .send(&json!({"op": "kill", "scope": {"account": "nope"}}))
            .await
            .unwrap();
        let r = admin.recv().await.unwrap();
        assert_eq!(r["code"], "bad_request");
        assert!(r["message"].as_str().unwrap().contains("nope"));
    });
    let lines = audit_lines(&s.audit, |l| l.iter().any(|r| r["kind"] == "unkill"));
    let kills: Vec<_> = lines.iter().filter(|r| r["kind"] == "kill").collect();
    assert_eq!(kills.len(), 1);
    assert_eq!(kills[0]["actor"], "admin");
    let denied = lines
        .iter()
        .filter(|r| r["kind"] == "decision" && r["reason"] == "kill_switch")
        .count();
    assert!(denied >= N - KILL_AT, "every refusal is audited ({denied})");
}

#[test]
fn a_reload_under_load_never_decides_with_a_half_loaded_policy() {
    // Policy A allows 2 wei (cap 10); policy B refuses it (cap 1).
    let a = policy_text("A", "10", &(100 * ETH).to_string());
    let b = policy_text("B", "1", &(100 * ETH).to_string());
    let s = start(&a, Layout::Auto);
    let h = &s.h;
    let mut trader = connect(h, "trader", Roles::default().with(Role::Trader));
    let mut admin = connect(h, "admin", Roles::default().with(Role::Admin));
    const N: usize = 300;
    let ids: Vec<String> = (0..N).map(|i| format!("r-{i}")).collect();
    let mut label_of: HashMap<u64, String> = HashMap::from([(1, "A".to_owned())]);
    let frames = h.rt.block_on(async {
        for (i, id) in ids.iter().enumerate() {
            trader
                .send(&submit(transfer(id, "dev3", 5 + i % 5, 2)))
                .await
                .unwrap();
            if i % 25 == 24 {
                let next = if (i / 25) % 2 == 0 { &b } else { &a };
                std::fs::write(&s.policy, next).unwrap();
                admin
                    .send(&json!({"op": "reload_policy", "req": id}))
                    .await
                    .unwrap();
                let r = admin.recv().await.unwrap();
                assert_eq!(r["of"], "reload_policy", "{r}");
                label_of.insert(
                    r["policy_version"].as_u64().unwrap(),
                    r["label"].as_str().unwrap().to_owned(),
                );
            }
        }
        // A file that does not validate is refused with its line, and changes nothing.
        std::fs::write(
            &s.policy,
            a.replace("max_value_wei = \"10\"", "max_value_wei = \"ten\""),
        )
        .unwrap();
        admin
            .send(&json!({"op": "reload_policy", "req": "bad"}))
            .await
            .unwrap();
        let r = admin.recv().await.unwrap();
        assert_eq!(r["code"], "bad_request");
        let msg = r["message"].as_str().unwrap();
        assert!(
            msg.contains("policy.toml:")
                && msg.contains("account \"dev0\"")
                && msg.contains("max_value_wei"),
            "{msg}"
        );
        collect_until_final(&mut trader, &ids, Duration::from_secs(90)).await
    });
    assert!(label_of.len() >= 12, "{label_of:?}");
    let mut last_version = 0;
    let (mut allowed, mut refused) = (0, 0);
    for id in &ids {
        let decided = frames[id]
            .iter()
            .find(|f| f["state"] == "accepted" || f["state"] == "rejected")
            .unwrap_or_else(|| panic!("{id}: {:?}", frames[id]));
        let v = decided["policy_version"]
            .as_u64()
            .expect("decisions carry the policy version");
        assert!(
            v >= last_version,
            "decided in order, versions never go back"
        );
        last_version = v;
        match label_of[&v].as_str() {
            "A" => {
                assert_eq!(decided["state"], "accepted", "{id} under A: {decided}");
                allowed += 1;
            }
            "B" => {
                assert_eq!(decided["reason"], "value_cap", "{id} under B: {decided}");
                refused += 1;
            }
            other => panic!("unknown label {other}"),
        }
    }
    assert!(
        allowed > 0 && refused > 0,
        "both policies decided ({allowed}/{refused})"
    );
    let lines = audit_lines(&s.audit, |l| {
        l.iter().any(|r| r["kind"] == "policy_reload_failed")
    });
    assert!(lines.iter().any(|r| r["kind"] == "policy_reload_failed"));
    assert!(
        lines
            .iter()
            .filter(|r| r["kind"] == "decision")
            .all(|r| r["policy_version"].as_u64().is_some()),
        "every decision records its policy version"
    );
}

#[test]
fn a_bad_policy_file_stops_the_engine_at_start_with_its_line() {
    let anvil = venues::Anvil::spawn(&venues::AnvilConfig::with_block_time(
        Duration::from_millis(250),
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("policy.toml");
    std::fs::write(
        &p,
        "[[account]]\nname = \"dev0\"\nallow = [\"group:missing\"]\n",
    )
    .unwrap();
    let mut cfg = engine::dev::dev_config(
        &anvil.ws_url(),
        "127.0.0.1:0".parse().unwrap(),
        SECRET.into(),
    );
    cfg.policy_file = Some(p);
    let e = engine::Engine::start(cfg).expect_err("refused").to_string();
    assert!(
        e.contains("policy.toml:3: account \"dev0\": allow[0]: no group named `missing`"),
        "{e}"
    );
}

/// Serves `body()` over HTTP on a loopback port (a KYT provider's endpoint).
fn serve_feed(body: std::sync::Arc<std::sync::Mutex<String>>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let b = body.lock().unwrap().clone();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            );
        }
    });
    format!("http://{addr}/v1/risk-feed")
}

fn feed(entries: &[(usize, u8, bool)]) -> String {
    let e: Vec<Value> = entries
        .iter()
        .map(|(i, score, sanctioned)| json!({"address": DEV_ADDRESSES[*i], "score": score, "sanctioned": sanctioned}))
        .collect();
    json!({ "entries": e }).to_string()
}

fn travel_data(vasp: Option<&str>) -> Value {
    let mut v = json!({
        "originator": {"type": "legal", "primary_identifier": "Example Fund Ltd",
                       "account_number": "dev4", "country": "CH"},
        "beneficiary": {"type": "natural", "primary_identifier": "Doe",
                        "secondary_identifier": "Jane", "account_number": DEV_ADDRESSES[5]},
    });
    if let Some(x) = vasp {
        v["beneficiary_vasp"] = json!(x);
    }
    v
}

fn kyt_and_travel(source_of: impl FnOnce(&Path) -> String, update: impl FnOnce(&str)) {
    let dir = tempfile::tempdir().unwrap();
    let source = source_of(dir.path());
    let allow: Vec<String> = (5..10)
        .map(|i| format!("\"{}\"", DEV_ADDRESSES[i]))
        .collect();
    let text = format!(
        "label = \"kyt\"\n\
         [kyt]\nsource = \"{source}\"\nrefresh = \"1s\"\nttl = \"10s\"\ndeny_score = 80\non_missing = \"deny\"\non_expired = \"deny\"\n\
         [travel_rule]\nthreshold_wei = \"{ETH}\"\nknown_vasps = [\"LEI:5493001KJTIIGC8Y1R12\"]\non_unknown_vasp = \"deny\"\n\
         [[account]]\nname = \"dev4\"\nallow = [{}]\nmax_value_wei = \"{}\"\n",
        allow.join(", "),
        100 * ETH
    );
    let s = start(&text, Layout::Auto);
    let h = &s.h;
    let mut desk = connect(h, "trader", Roles::default().with(Role::Trader));
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // The refresher loads the feed once at start; give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    h.rt.block_on(async {
        let mut big = transfer("tr-ok", "dev4", 5, 2 * ETH);
        big["travel_rule"] = travel_data(Some("lei:5493001kjtiigc8y1r12"));
        let mut unknown = transfer("tr-vasp", "dev4", 5, 2 * ETH);
        unknown["travel_rule"] = travel_data(Some("Unknown Exchange Ltd"));
        let mut bad = transfer("tr-bad", "dev4", 5, 2 * ETH);
        bad["travel_rule"] = json!({"originator": {"type": "legal"}});
        for i in [
            transfer("clean", "dev4", 5, 1),
            transfer("sanctioned", "dev4", 6, 1),
            transfer("risky", "dev4", 7, 1),
            transfer("unscored", "dev4", 8, 1),
            transfer("tr-missing", "dev4", 5, 2 * ETH),
            big,
            unknown,
        ] {
            desk.send(&submit(i)).await.unwrap();
        }
        desk.send(&submit(bad)).await.unwrap();
        let f = collect_until_final(
            &mut desk,
            &ids(&[
                "clean",
                "sanctioned",
                "risky",
                "unscored",
                "tr-missing",
                "tr-ok",
                "tr-vasp",
                "tr-bad",
            ]),
            Duration::from_secs(30),
        )
        .await;
        let last = |id: &str| f[id].last().unwrap().clone();
        assert_eq!(last("clean")["state"], "confirmed");
        for (id, reason) in [
            ("sanctioned", "kyt_risk"),
            ("risky", "kyt_risk"),
            ("unscored", "kyt_risk"),
            ("tr-missing", "travel_rule_missing"),
            ("tr-vasp", "unknown_vasp"),
        ] {
            assert_eq!(
                (last(id)["state"].as_str(), last(id)["reason"].as_str()),
                (Some("rejected"), Some(reason)),
                "{id}"
            );
        }
        assert_eq!(last("tr-ok")["state"], "confirmed");
        assert_eq!(last("tr-bad")["code"], "bad_request");
        assert_eq!(last("tr-bad")["field"], "intent.travel_rule");

        // The feed changes: the refresher picks it up off the hot path.
        update(&feed(&[
            (5, 95, false),
            (6, 0, true),
            (7, 10, false),
            (8, 10, false),
        ]));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut n = 0;
        loop {
            n += 1;
            let id = format!("again-{n}");
            desk.send(&submit(transfer(&id, "dev4", 5, 1)))
                .await
                .unwrap();
            let f = collect_until_final(
                &mut desk,
                std::slice::from_ref(&id),
                Duration::from_secs(30),
            )
            .await;
            if f[&id].last().unwrap()["reason"] == "kyt_risk" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new feed was never applied"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        desk.send(&submit(transfer("now-scored", "dev4", 8, 1)))
            .await
            .unwrap();
        let f =
            collect_until_final(&mut desk, &ids(&["now-scored"]), Duration::from_secs(30)).await;
        assert_eq!(f["now-scored"].last().unwrap()["state"], "confirmed");
    });
    let lines = audit_lines(&s.audit, |l| {
        l.iter().filter(|r| r["kind"] == "decision").count() >= 9
    });
    let ok = lines.iter().find(|r| {
        r["kind"] == "decision" && r["outcome"] == "allow" && r["travel_rule_hash"].is_string()
    });
    assert!(
        ok.is_some(),
        "the travel-rule evidence hash is in the audit trail"
    );
    let sanctioned = lines
        .iter()
        .find(|r| r["kind"] == "decision" && r["kyt"]["result"] == "sanctioned")
        .expect("KYT input recorded");
    assert_eq!(sanctioned["reason"], "kyt_risk");
}

#[test]
fn kyt_from_a_feed_file_and_the_travel_rule() {
    let path = std::sync::Arc::new(std::sync::Mutex::new(PathBuf::new()));
    let p2 = std::sync::Arc::clone(&path);
    kyt_and_travel(
        move |dir| {
            let f = dir.join("feed.json");
            std::fs::write(&f, feed(&[(5, 10, false), (6, 0, true), (7, 85, false)])).unwrap();
            *p2.lock().unwrap() = f.clone();
            f.display().to_string()
        },
        move |text| {
            // Written whole and renamed, as a feed publisher should.
            let p = path.lock().unwrap().clone();
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &p).unwrap();
        },
    );
}

#[test]
fn kyt_from_an_http_endpoint() {
    let body = std::sync::Arc::new(std::sync::Mutex::new(feed(&[
        (5, 10, false),
        (6, 0, true),
        (7, 85, false),
    ])));
    let b2 = std::sync::Arc::clone(&body);
    kyt_and_travel(
        move |_| serve_feed(b2),
        move |text| *body.lock().unwrap() = text.to_owned(),
    );
}
