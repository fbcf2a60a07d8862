//! An account whose custody requires a quorum of approvals: every intent waits until two
//! distinct approvers (never the submitter) approve it, over the real WebSocket, then is
//! signed and mined; the policy stage reads the requirement from the account's custody.

mod common;

use std::time::Duration;

use common::{Harness, collect_until_final, reply, states, submit, transfer};
use engine::auth::{Role, Roles};
use engine::config::Layout;
use engine::desk::Desk;
use serde_json::json;

fn connect(h: &Harness, sub: &str, roles: Roles) -> Desk {
    let t = h.token_for(sub, roles);
    h.rt.block_on(Desk::connect(&h.url, Some(&t))).unwrap()
}

#[test]
fn two_distinct_approvers_are_needed() {
    let h = Harness::start_with(Layout::Auto, |c| {
        c.accounts[0].approvals = 2;
    });
    let approver = Roles::default().with(Role::Trader).with(Role::Approver);
    let mut maker = connect(&h, "maker", approver);
    let mut alice = connect(&h, "alice", Roles::default().with(Role::Approver));
    let mut bob = connect(&h, "bob", Roles::default().with(Role::Approver));
    h.rt.block_on(async {
        maker
            .send(&submit(transfer("q1", "dev0", 5, 1_000)))
            .await
            .unwrap();
        maker
            .send(&submit(transfer("free", "dev1", 5, 1_000)))
            .await
            .unwrap();
        // The account without a quorum goes straight on.
        let free = collect_until_final(&mut maker, &["free".into()], Duration::from_secs(30)).await;
        assert_eq!(states(&free["free"]).last().unwrap(), "confirmed");
        let q1 = &free["q1"];
        assert!(
            states(q1).contains(&"pending_approval".to_string()),
            "q1 waits: {q1:?}"
        );
        let pending = q1
            .iter()
            .find(|f| f["state"] == "pending_approval")
            .unwrap();
        assert!(
            pending["message"].as_str().unwrap().contains("custody"),
            "{pending}"
        );

        // The submitter cannot approve, even with the approver role.
        maker
            .send(&json!({"op": "approve", "id": "q1", "req": "self"}))
            .await
            .unwrap();
        assert_eq!(reply(&mut maker, "self").await["code"], "forbidden");

        // First approval: accepted, one more needed; the same approver again is refused.
        alice
            .send(&json!({"op": "approve", "id": "q1", "req": "a1"}))
            .await
            .unwrap();
        let r = reply(&mut alice, "a1").await;
        assert_eq!(
            (r["op"].as_str(), r["remaining"].as_u64()),
            (Some("ok"), Some(1)),
            "{r}"
        );
        alice
            .send(&json!({"op": "approve", "id": "q1", "req": "a2"}))
            .await
            .unwrap();
        let r = reply(&mut alice, "a2").await;
        assert_eq!(r["code"], "forbidden", "{r}");
        assert!(
            r["message"].as_str().unwrap().contains("already approved"),
            "{r}"
        );

        // Second, distinct approver: it goes on to signing and the chain.
        bob.send(&json!({"op": "approve", "id": "q1", "req": "b1"}))
            .await
            .unwrap();
        let r = reply(&mut bob, "b1").await;
        assert_eq!(
            (r["op"].as_str(), r["remaining"].as_u64()),
            (Some("ok"), Some(0)),
            "{r}"
        );
        let done = collect_until_final(&mut maker, &["q1".into()], Duration::from_secs(30)).await;
        assert_eq!(
            states(&done["q1"]),
            vec!["approved", "signed", "broadcast", "included", "confirmed"]
        );
    });
}
