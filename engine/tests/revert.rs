//! A reverted transaction's `included` event carries the revert reason the node gives
//! (a replay with `eth_call` on the reasons thread, off the stages).

mod common;

use std::time::Duration;

use common::{Harness, collect_until_final, submit};
use engine::config::Layout;
use serde_json::json;
use venues::DEV_ADDRESSES;

/// Runtime code that always reverts with `Error("nope")`.
fn reverting_code() -> String {
    let mut c = String::from("0x");
    // mem[0..32] = 0x08c379a0 followed by zeros (the Error(string) selector)
    c += "7f08c379a0";
    c += &"00".repeat(28);
    c += "600052";
    // mem[4..36] = 0x20 (offset of the string)
    c += "6020600452";
    // mem[36..68] = 4 (its length)
    c += "6004602452";
    // mem[68..100] = "nope"
    c += "7f6e6f7065";
    c += &"00".repeat(28);
    c += "604452";
    // revert(0, 100)
    c += "60646000fd";
    c
}

#[test]
fn a_reverted_call_is_included_with_its_revert_reason() {
    let h = Harness::start(Layout::Fused);
    let mut rpc = h.anvil.rpc().unwrap();
    let target = DEV_ADDRESSES[6];
    let _: serde_json::Value = rpc
        .call("anvil_setCode", json!([target, reverting_code()]))
        .unwrap();
    let mut desk = h.desk();
    let ids = vec!["rv-1".to_owned(), "ok-1".to_owned()];
    let frames = h.rt.block_on(async {
        desk.send(&submit(
            json!({"id": "rv-1", "account": "dev0", "kind": "call",
            "to": target, "data": "0x12345678", "gas_limit": 100000}),
        ))
        .await
        .unwrap();
        desk.send(&submit(
            json!({"id": "ok-1", "account": "dev1", "kind": "transfer",
            "to": DEV_ADDRESSES[5], "value_wei": "5"}),
        ))
        .await
        .unwrap();
        collect_until_final(&mut desk, &ids, Duration::from_secs(30)).await
    });
    let included = |id: &str| {
        frames[id]
            .iter()
            .find(|f| f["state"] == "included")
            .cloned()
            .unwrap_or_else(|| panic!("{id} included: {:?}", frames[id]))
    };
    let rv = included("rv-1");
    assert_eq!(rv["success"], false, "{rv}");
    assert_eq!(rv["revert_reason"], "nope", "{rv}");
    assert!(rv["gas_used"].as_u64().unwrap() > 21_000, "{rv}");
    // It still runs to `confirmed`: a revert is an outcome, not a failure of the engine.
    assert_eq!(frames["rv-1"].last().unwrap()["state"], "confirmed");
    let ok = included("ok-1");
    assert_eq!(ok["success"], true);
    assert!(ok.get("revert_reason").is_none(), "{ok}");
}
