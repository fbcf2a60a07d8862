//! `SIGHUP` reloads the policy file. In a test binary of its own: the signal goes to the
//! whole process, and every engine in it would reload.

mod common;

use std::time::Duration;

use common::*;
use engine::auth::{Role, Roles};
use engine::config::Layout;
use engine::desk::Desk;
use serde_json::Value;
use venues::DEV_ADDRESSES;

fn policy_text(label: &str, cap: &str) -> String {
    let allow: Vec<String> = (5..10)
        .map(|i| format!("\"{}\"", DEV_ADDRESSES[i]))
        .collect();
    format!(
        "label = \"{label}\"\n[[account]]\nname = \"dev0\"\nallow = [{}]\nmax_value_wei = \"{cap}\"\n",
        allow.join(", ")
    )
}

#[test]
fn sighup_reloads_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, policy_text("A", "10")).unwrap();
    let p = policy.clone();
    let h = &Harness::start_with(Layout::Auto, move |c| c.policy_file = Some(p));
    let t = h.token_for("trader", Roles::default().with(Role::Trader));
    let mut trader = h.rt.block_on(Desk::connect(&h.url, Some(&t))).unwrap();
    std::fs::write(&policy, policy_text("B", "1")).unwrap();
    // SAFETY: sends SIGHUP to this test process, whose engine installed a handler for it
    // at start (nextest runs each test in its own process).
    assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
    let health = |h: &Harness| -> Value {
        let mut rpc = std::net::TcpStream::connect(h.addr()).unwrap();
        use std::io::{Read, Write};
        write!(
            rpc,
            "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        rpc.read_to_string(&mut body).unwrap();
        serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while health(h)["policy_version"] != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload: {}",
            health(h)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    h.rt.block_on(async {
        trader
            .send(&submit(transfer("after-hup", "dev0", 5, 2)))
            .await
            .unwrap();
        let f = collect_until_final(
            &mut trader,
            &["after-hup".to_owned()],
            Duration::from_secs(30),
        )
        .await;
        let last = f["after-hup"].last().unwrap();
        assert_eq!(
            (last["reason"].as_str(), last["policy_version"].as_u64()),
            (Some("value_cap"), Some(2))
        );
    });
}
