//! Staking through the desk WebSocket on anvil: validated deposits (one entry, and a batch),
//! EIP-7002 exits (full and partial) and an EIP-7251 consolidation reach the chain; every
//! deposit rule broken once is `rejected` with `invalid_deposit` (or the exit and
//! consolidation reasons) and nothing of it reaches the chain.
//!
//! The deposit and batch contracts are deployed from `contracts/` (compiled with solc,
//! checked in), and the two system contracts, which anvil's Prague lacks, are installed
//! at their EIP addresses. Deposit data is made here with BLS keys (blst).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use alloy_primitives::{Address, B256};
use common::{Harness, collect_until_final, states, submit};

use engine::staking::{DepositEntry, testkeys};
use serde_json::{Value, json};
use venues::contracts::{self, StakingContracts};
use venues::{DEV_ADDRESSES, RpcClient};

const FORK: [u8; 4] = common::STAKING_FORK;
const ETH_GWEI: u64 = 1_000_000_000;

fn wc(kind: u8, addr: Address) -> [u8; 32] {
    let mut w = [0u8; 32];
    w[0] = kind;
    w[12..].copy_from_slice(addr.as_slice());
    w
}

fn ikm(n: u8) -> [u8; 32] {
    [n; 32]
}

fn entry_json(e: &DepositEntry) -> Value {
    let mut v = json!({
        "pubkey": hex::encode(e.pubkey),
        "withdrawal_credentials": hex::encode(e.withdrawal_credentials),
        "amount": e.amount_gwei,
        "signature": hex::encode(e.signature),
        "deposit_data_root": hex::encode(e.deposit_data_root),
    });
    if let Some(r) = e.deposit_message_root {
        v["deposit_message_root"] = json!(hex::encode(r));
    }
    if let Some(f) = e.fork_version {
        v["fork_version"] = json!(hex::encode(f));
    }
    v
}

fn deposit(id: &str, account: &str, entries: &[DepositEntry]) -> Value {
    json!({"id": id, "account": account, "kind": "stake_deposit",
           "deposits": entries.iter().map(entry_json).collect::<Vec<_>>()})
}

fn pk_hex(pk: &[u8; 48]) -> String {
    format!("0x{}", hex::encode(pk))
}

/// Chain, contracts, and an engine with `[staking]`; dev0 and dev1 stake to their own
/// addresses (dev1 may top up), `batch`: whether the batch contract is configured.
/// `before` runs on the chain before the engine starts.
fn start(
    batch: bool,
    before: impl FnOnce(&mut RpcClient, &StakingContracts),
) -> (Harness, StakingContracts) {
    start_with(batch, None, before)
}

/// As [`start`], with the validator watch on the beacon node at `beacon_url`.
fn start_with(
    batch: bool,
    beacon_url: Option<String>,
    before: impl FnOnce(&mut RpcClient, &StakingContracts),
) -> (Harness, StakingContracts) {
    common::start_staking(batch, beacon_url, |rpc, c, _| before(rpc, c))
}

fn run(h: &Harness, intents: &[Value]) -> HashMap<String, Vec<Value>> {
    let mut desk = h.desk();
    let ids: Vec<String> = intents
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    h.rt.block_on(async {
        for i in intents {
            desk.send(&submit(i.clone())).await.unwrap();
        }
        collect_until_final(&mut desk, &ids, Duration::from_secs(60)).await
    })
}

fn included(frames: &[Value]) -> &Value {
    frames
        .iter()
        .find(|f| f["state"] == "included")
        .unwrap_or_else(|| panic!("no included: {frames:#?}"))
}

/// Logs of `address` in the whole chain: (topics[0] or zero, data).
fn logs(rpc: &mut RpcClient, address: Address) -> Vec<(B256, Vec<u8>)> {
    let v: Vec<Value> = rpc
        .call(
            "eth_getLogs",
            json!([{"fromBlock": "0x0", "toBlock": "latest", "address": address}]),
        )
        .unwrap();
    v.iter()
        .map(|l| {
            let t = l["topics"]
                .get(0)
                .and_then(|t| t.as_str())
                .map(|t| t.parse().unwrap())
                .unwrap_or_default();
            let d = hex::decode(l["data"].as_str().unwrap().trim_start_matches("0x")).unwrap();
            (t, d)
        })
        .collect()
}

/// Submits one intent and waits for it to settle.
fn one(h: &Harness, intent: Value) -> Vec<Value> {
    let id = intent["id"].as_str().unwrap().to_owned();
    run(h, &[intent]).remove(&id).unwrap()
}

#[test]
fn a_desk_stakes_exits_and_consolidates_through_the_websocket() {
    let (h, c) = start(true, |_, _| {});
    let dev0 = DEV_ADDRESSES[0];
    let a = testkeys::make_entry(&ikm(1), wc(0x01, dev0), 32 * ETH_GWEI, FORK);
    let b = testkeys::make_entry(&ikm(2), wc(0x02, dev0), 40 * ETH_GWEI, FORK);
    let cc = testkeys::make_entry(&ikm(3), wc(0x02, dev0), 33 * ETH_GWEI, FORK);

    // One entry: a direct deposit() call; the included event carries its index.
    let f = one(&h, deposit("dep-a", "dev0", &[a]));
    assert_eq!(
        states(&f),
        [
            "ack",
            "accepted",
            "signed",
            "broadcast",
            "included",
            "confirmed"
        ],
        "{f:#?}"
    );
    let inc = included(&f);
    assert_eq!(inc["success"], true, "{inc}");
    assert_eq!(inc["deposit_index"], 0, "{inc}");

    // Two entries: one batch call, two deposit indices.
    let f = one(&h, deposit("dep-bc", "dev0", &[b, cc]));
    let inc = included(&f);
    assert_eq!(inc["success"], true, "{f:#?}");
    assert_eq!(inc["deposit_index"], 1, "{inc}");
    assert_eq!(inc["deposit_indices"], json!([1, 2]), "{inc}");

    let mut rpc = h.anvil.rpc().unwrap();
    let seen: Vec<_> = logs(&mut rpc, c.deposit)
        .into_iter()
        .filter(|(t, _)| *t == contracts::DEPOSIT_EVENT_TOPIC)
        .map(|(_, d)| contracts::decode_deposit_event(&d).unwrap())
        .collect();
    assert_eq!(seen.len(), 3);
    for (got, want) in seen.iter().zip([a, b, cc]) {
        assert_eq!(got.pubkey, want.pubkey);
        assert_eq!(got.withdrawal_credentials, want.withdrawal_credentials);
        assert_eq!(got.amount_gwei, want.amount_gwei);
    }

    // Exits (EIP-7002): a full exit of the 0x01 validator, a partial one of a 0x02.
    // A consolidation (EIP-7251) of b into cc.
    let frames = run(
        &h,
        &[
            json!({"id": "exit-a", "account": "dev0", "kind": "stake_exit",
                   "validator_pubkey": pk_hex(&a.pubkey), "amount_gwei": "0"}),
            json!({"id": "part-b", "account": "dev0", "kind": "stake_exit",
                   "validator_pubkey": pk_hex(&b.pubkey), "amount_gwei": "1000000000"}),
            json!({"id": "cons-bc", "account": "dev0", "kind": "stake_consolidate",
                   "source_pubkey": pk_hex(&b.pubkey), "target_pubkey": pk_hex(&cc.pubkey)}),
        ],
    );
    for id in ["exit-a", "part-b", "cons-bc"] {
        let f = &frames[id];
        assert_eq!(states(f).last().unwrap(), "confirmed", "{id}: {f:#?}");
        assert_eq!(included(f)["success"], true, "{id}: {f:#?}");
    }
    let w = logs(&mut rpc, contracts::WITHDRAWAL_REQUEST_CONTRACT);
    assert_eq!(w.len(), 2, "{w:?}");
    let mut expect = dev0.to_vec();
    expect.extend_from_slice(&a.pubkey);
    expect.extend_from_slice(&0u64.to_be_bytes());
    assert_eq!(w[0].1, expect);
    let mut expect = dev0.to_vec();
    expect.extend_from_slice(&b.pubkey);
    expect.extend_from_slice(&ETH_GWEI.to_be_bytes());
    assert_eq!(w[1].1, expect);
    let k = logs(&mut rpc, contracts::CONSOLIDATION_REQUEST_CONTRACT);
    let mut expect = dev0.to_vec();
    expect.extend_from_slice(&b.pubkey);
    expect.extend_from_slice(&cc.pubkey);
    assert_eq!(k.len(), 1);
    assert_eq!(k[0].1, expect);
}

#[test]
fn each_deposit_rule_broken_once_is_rejected_and_nothing_reaches_the_chain() {
    let dev0 = DEV_ADDRESSES[0];
    // A validator with a deposit made outside the engine before it started: a top-up.
    let outside = testkeys::make_entry(&ikm(40), wc(0x01, dev0), 32 * ETH_GWEI, FORK);
    let (h, c) = start(true, |rpc, c| {
        let mut data = vec![0u8; 512];
        let n = engine::staking::encode_deposit_call(&outside, &mut data).unwrap();
        let tx: B256 = rpc
            .call(
                "eth_sendTransaction",
                json!([{"from": DEV_ADDRESSES[9], "to": c.deposit,
                        "value": format!("0x{:x}", 32u128 * 1_000_000_000_000_000_000),
                        "data": format!("0x{}", hex::encode(&data[..n])), "gas": "0x30d40"}]),
            )
            .unwrap();
        for _ in 0..100 {
            let r: Option<Value> = rpc.call("eth_getTransactionReceipt", json!([tx])).unwrap();
            if let Some(r) = r {
                assert_eq!(r["status"], "0x1");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("outside deposit not mined");
    });
    let good = |n: u8| testkeys::make_entry(&ikm(n), wc(0x01, dev0), 32 * ETH_GWEI, FORK);
    // Roots recomputed after each change, so that only the named check fails.
    let reroot = |mut e: DepositEntry| {
        e.deposit_message_root = None;
        e.deposit_data_root = engine::staking::deposit_data_root(
            &e.pubkey,
            &e.withdrawal_credentials,
            e.amount_gwei,
            &e.signature,
        );
        e
    };
    let mut other_signer = good(10);
    other_signer.signature = good(11).signature;
    let other_signer = reroot(other_signer);
    let mut wrong_fork = testkeys::make_entry(&ikm(12), wc(0x01, dev0), 32 * ETH_GWEI, [0; 4]);
    wrong_fork.fork_version = None;
    let mut fork_field = good(13);
    fork_field.fork_version = Some([0, 0, 0, 1]);
    let mut msg_root = good(14);
    msg_root.deposit_message_root = Some([7; 32]);
    let mut data_root = good(15);
    data_root.deposit_data_root[0] ^= 1;
    let mut bad_pubkey = good(16);
    bad_pubkey.pubkey = [0xab; 48];
    let bad_pubkey = reroot(bad_pubkey);
    let bls_creds = testkeys::make_entry(&ikm(17), [0; 32], 32 * ETH_GWEI, FORK);
    let not_allowed =
        testkeys::make_entry(&ikm(18), wc(0x01, DEV_ADDRESSES[7]), 32 * ETH_GWEI, FORK);
    let below_min = testkeys::make_entry(&ikm(19), wc(0x02, dev0), ETH_GWEI / 2, FORK);
    let not_32 = testkeys::make_entry(&ikm(20), wc(0x01, dev0), 31 * ETH_GWEI, FORK);
    let over_2048 = testkeys::make_entry(&ikm(21), wc(0x02, dev0), 2049 * ETH_GWEI, FORK);
    let twice = good(22);
    let cases: Vec<(Value, &str)> = vec![
        (deposit("bad-sig", "dev0", &[other_signer]), "signature"),
        (deposit("bad-fork", "dev0", &[wrong_fork]), "signature"),
        (
            deposit("bad-fork-field", "dev0", &[fork_field]),
            "fork_version",
        ),
        (
            deposit("bad-msg-root", "dev0", &[msg_root]),
            "deposit_message_root",
        ),
        (
            deposit("bad-data-root", "dev0", &[data_root]),
            "deposit_data_root",
        ),
        (deposit("bad-pubkey", "dev0", &[bad_pubkey]), "pubkey"),
        (
            deposit("bls-creds", "dev0", &[bls_creds]),
            "withdrawal_credentials",
        ),
        (
            deposit("not-allowed", "dev0", &[not_allowed]),
            "withdrawal_credentials",
        ),
        (deposit("below-min", "dev0", &[below_min]), "amount"),
        (deposit("not-32", "dev0", &[not_32]), "amount"),
        (deposit("over-2048", "dev0", &[over_2048]), "amount"),
        (deposit("top-up", "dev0", &[outside]), "pubkey"),
        (deposit("twice", "dev0", &[twice, twice]), "pubkey"),
    ];
    let before_nonce = h
        .anvil
        .rpc()
        .unwrap()
        .transaction_count(dev0, "latest")
        .unwrap();
    let intents: Vec<Value> = cases.iter().map(|(i, _)| i.clone()).collect();
    let frames = run(&h, &intents);
    for (intent, check) in &cases {
        let id = intent["id"].as_str().unwrap();
        let f = &frames[id];
        assert_eq!(states(f), ["ack", "rejected"], "{id}: {f:#?}");
        assert_eq!(f[1]["reason"], "invalid_deposit", "{id}: {f:#?}");
        let m = f[1]["message"].as_str().unwrap();
        assert!(m.contains(check), "{id}: message {m:?} should name {check}");
    }
    // The six refused by the verifier (signature, fork, roots, pubkey) are counted for SREs.
    assert_eq!(common::metric(&h, "engine_deposits_invalid_total"), 6.0);
    assert_eq!(
        common::metric(&h, "engine_request_fee_wei{kind=\"withdrawal\"}"),
        1.0
    );
    assert_eq!(common::metric(&h, "engine_validators_known"), 1.0);
    // A fractional gwei amount is not deposit data at all: refused at decode, naming it.
    let mut desk = h.desk();
    let mut frac = entry_json(&good(23));
    frac["amount"] = json!(32_000_000_000.5);
    let e = h.rt.block_on(async {
        desk.send(&submit(
            json!({"id": "frac", "account": "dev0", "kind": "stake_deposit",
            "deposits": [frac]}),
        ))
        .await
        .unwrap();
        desk.recv().await.unwrap()
    });
    assert_eq!(e["op"], "error", "{e}");
    assert_eq!(e["code"], "bad_request", "{e}");
    assert!(e["message"].as_str().unwrap().contains("amount"), "{e}");
    // Nothing reached the chain: dev0 signed nothing, the contract saw one deposit (the
    // outside one).
    let mut rpc = h.anvil.rpc().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(rpc.transaction_count(dev0, "latest").unwrap(), before_nonce);
    assert_eq!(
        rpc.transaction_count(dev0, "pending").unwrap(),
        before_nonce
    );
    let deposits = logs(&mut rpc, c.deposit)
        .into_iter()
        .filter(|(t, _)| *t == contracts::DEPOSIT_EVENT_TOPIC)
        .count();
    assert_eq!(deposits, 1);

    // dev1 may top up: the same outside validator is a top-up it is allowed to make,
    // but only if the credentials point to its own allowlisted address — they do not.
    let f = one(&h, deposit("topup-dev1", "dev1", &[outside]));
    assert_eq!(f[1]["reason"], "invalid_deposit", "{f:#?}");
    assert!(
        f[1]["message"]
            .as_str()
            .unwrap()
            .contains("withdrawal_credentials")
    );
}

#[test]
fn exits_and_consolidations_only_from_the_withdrawal_address() {
    let (h, _) = start(false, |_, _| {});
    let dev0 = DEV_ADDRESSES[0];
    let a = testkeys::make_entry(&ikm(50), wc(0x01, dev0), 32 * ETH_GWEI, FORK);
    let b = testkeys::make_entry(&ikm(51), wc(0x02, dev0), 32 * ETH_GWEI, FORK);
    // Without a batch contract, several entries are refused.
    let f = one(&h, deposit("two-no-batch", "dev0", &[a, b]));
    assert_eq!(f[1]["reason"], "invalid_deposit", "{f:#?}");
    assert!(
        f[1]["message"].as_str().unwrap().contains("batch"),
        "{f:#?}"
    );
    for (id, e) in [("dep-a", a), ("dep-b", b)] {
        let f = one(&h, deposit(id, "dev0", &[e]));
        assert_eq!(states(&f).last().unwrap(), "confirmed", "{f:#?}");
    }
    let unknown = testkeys::pubkey(&ikm(99));
    let cases = [
        (
            json!({"id": "x-unknown", "account": "dev0", "kind": "stake_exit",
                   "validator_pubkey": pk_hex(&unknown), "amount_gwei": "0"}),
            "unknown_validator",
        ),
        (
            json!({"id": "x-other", "account": "dev1", "kind": "stake_exit",
                   "validator_pubkey": pk_hex(&a.pubkey), "amount_gwei": "0"}),
            "not_withdrawal_address",
        ),
        (
            json!({"id": "x-partial-01", "account": "dev0", "kind": "stake_exit",
                   "validator_pubkey": pk_hex(&a.pubkey), "amount_gwei": "5"}),
            "not_withdrawal_address",
        ),
        (
            json!({"id": "c-other", "account": "dev1", "kind": "stake_consolidate",
                   "source_pubkey": pk_hex(&b.pubkey), "target_pubkey": pk_hex(&b.pubkey)}),
            "not_withdrawal_address",
        ),
        (
            json!({"id": "c-target-01", "account": "dev0", "kind": "stake_consolidate",
                   "source_pubkey": pk_hex(&b.pubkey), "target_pubkey": pk_hex(&a.pubkey)}),
            "not_withdrawal_address",
        ),
        (
            json!({"id": "c-unknown-target", "account": "dev0", "kind": "stake_consolidate",
                   "source_pubkey": pk_hex(&b.pubkey), "target_pubkey": pk_hex(&unknown)}),
            "unknown_validator",
        ),
    ];
    let intents: Vec<Value> = cases.iter().map(|(i, _)| i.clone()).collect();
    let frames = run(&h, &intents);
    for (intent, reason) in &cases {
        let id = intent["id"].as_str().unwrap();
        let f = &frames[id];
        assert_eq!(states(f), ["ack", "rejected"], "{id}: {f:#?}");
        assert_eq!(f[1]["reason"], *reason, "{id}: {f:#?}");
    }
    // Switching b to itself (source == target) is allowed from its withdrawal address.
    let f = one(
        &h,
        json!({"id": "c-self", "account": "dev0", "kind": "stake_consolidate",
               "source_pubkey": pk_hex(&b.pubkey), "target_pubkey": pk_hex(&b.pubkey)}),
    );
    assert_eq!(states(&f).last().unwrap(), "confirmed", "{f:#?}");
}

/// Reads desk frames until one satisfies `want` (or panics after `secs`).
fn wait_frame(
    h: &Harness,
    desk: &mut engine::desk::Desk,
    secs: u64,
    want: impl Fn(&Value) -> bool,
) -> Value {
    h.rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let f = tokio::time::timeout_at(deadline, desk.recv())
                .await
                .expect("timed out waiting for a frame")
                .expect("frame");
            if want(&f) {
                return f;
            }
        }
    })
}

#[test]
fn the_validator_watch_reports_status_changes_and_alerts_to_desks() {
    use venues::beacon_sim::BeaconSim;
    use venues::{ValidatorInfo, ValidatorStatus};
    let sim = BeaconSim::start().unwrap();
    sim.set_head_slot(64);
    let (h, _) = start_with(false, Some(sim.url()), |_, _| {});
    let dev0 = DEV_ADDRESSES[0];
    let a = testkeys::make_entry(&ikm(70), wc(0x01, dev0), 32 * ETH_GWEI, FORK);
    let mut desk = h.desk();
    let f = one(&h, deposit("watch-dep", "dev0", &[a]));
    assert_eq!(states(&f).last().unwrap(), "confirmed", "{f:#?}");
    let pk = pk_hex(&a.pubkey);
    // Deposited, not on the beacon chain yet: reported once as not found.
    let first = wait_frame(&h, &mut desk, 30, |f| {
        f["op"] == "validator" && f["pubkey"] == pk
    });
    assert_eq!(first["status"], "not_found", "{first}");
    let info = ValidatorInfo {
        index: 7,
        pubkey: a.pubkey,
        withdrawal_credentials: a.withdrawal_credentials,
        balance_gwei: 32 * ETH_GWEI,
        effective_balance_gwei: 32 * ETH_GWEI,
        status: ValidatorStatus::PendingQueued,
        slashed: false,
        activation_eligibility_epoch: 2,
        activation_epoch: venues::beacon::FAR_FUTURE_EPOCH,
        exit_epoch: venues::beacon::FAR_FUTURE_EPOCH,
        withdrawable_epoch: venues::beacon::FAR_FUTURE_EPOCH,
    };
    sim.upsert_validator(info);
    let f = wait_frame(&h, &mut desk, 10, |f| {
        f["op"] == "validator" && f["pubkey"] == pk && f["status"] == "pending_queued"
    });
    assert_eq!(f["index"], "7", "{f}");
    sim.set_status(&a.pubkey, ValidatorStatus::ActiveOngoing);
    let f = wait_frame(&h, &mut desk, 10, |f| {
        f["op"] == "validator" && f["pubkey"] == pk && f["status"] == "active_ongoing"
    });
    assert_eq!(f["from"], "pending_queued", "{f}");
    // An exit the engine did not send is an alert; so is a slashing.
    sim.set_status(&a.pubkey, ValidatorStatus::ActiveExiting);
    let f = wait_frame(&h, &mut desk, 10, |f| {
        f["op"] == "alert" && f["pubkey"] == pk
    });
    assert_eq!(f["kind"], "unexpected_exit", "{f}");
    sim.slash(&a.pubkey);
    let f = wait_frame(&h, &mut desk, 10, |f| {
        f["op"] == "alert" && f["pubkey"] == pk && f["kind"] == "slashed"
    });
    assert!(!f["message"].as_str().unwrap().is_empty(), "{f}");
}

/// A deposit signed and sent before a restart, still in the mempool: after the restart the
/// journal gives it back (the transaction the policy chose, not the desk's entries), it is
/// included once and confirmed, and its id answers with that state.
#[test]
fn a_deposit_sent_before_a_restart_lands_once() {
    use engine::config::{JournalSettings, JournalSync};
    use engine::{Engine, dev};
    let anvil = venues::Anvil::spawn(&venues::AnvilConfig::default()).unwrap();
    let mut rpc = anvil.rpc().unwrap();
    let c = contracts::deploy_staking(&mut rpc, DEV_ADDRESSES[9]).unwrap();
    contracts::install_system_contracts(&mut rpc).unwrap();
    let _: Value = rpc.call("evm_setAutomine", json!([false])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut cfg = dev::dev_config(
            &anvil.ws_url(),
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            common::SECRET.into(),
        );
        cfg.confirmations = 2;
        cfg.journal = Some(JournalSettings {
            dir: dir.path().to_path_buf(),
            segment_bytes: 1 << 20,
            sync: JournalSync::None,
            group_commit_us: 200,
            interval_ms: 10,
            compact_every_ms: 0,
        });
        common::set_staking(&mut cfg, &c, false, None);
        cfg
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let desk = |e: &Engine| {
        let url = format!("ws://{}/v1/ws", e.local_addr());
        let token = engine::auth::JwtAuth::new(common::SECRET.as_bytes()).issue(
            "desk-a",
            engine::auth::Roles::all(),
            3600,
        );
        rt.block_on(engine::desk::Desk::connect(&url, Some(&token)))
            .unwrap()
    };
    let a = testkeys::make_entry(&ikm(80), wc(0x01, DEV_ADDRESSES[0]), 32 * ETH_GWEI, FORK);
    let intent = deposit("restart-dep", "dev0", &[a]);

    let e = Engine::start(config()).unwrap();
    let mut d = desk(&e);
    rt.block_on(async {
        d.send(&submit(intent.clone())).await.unwrap();
        loop {
            let f = tokio::time::timeout(Duration::from_secs(30), d.recv())
                .await
                .expect("broadcast in time")
                .unwrap();
            assert_ne!(f["state"], "rejected", "{f}");
            if f["state"] == "broadcast" {
                break;
            }
        }
    });
    drop(d);
    e.shutdown().unwrap();

    let e = Engine::start(config()).unwrap();
    for _ in 0..4 {
        let _: Value = rpc.call("evm_mine", json!([])).unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut d = desk(&e);
    let latest = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            d.send(&json!({"op": "status", "req": "s", "id": "restart-dep"}))
                .await
                .unwrap();
            let r = common::reply(&mut d, "s").await;
            if r["state"] == "confirmed" || tokio::time::Instant::now() > deadline {
                return r;
            }
            let _: Value = rpc.call("evm_mine", json!([])).unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert_eq!(latest["state"], "confirmed", "{latest}");
    e.shutdown().unwrap();
    let deposits: Vec<_> = logs(&mut rpc, c.deposit)
        .into_iter()
        .filter(|(t, _)| *t == contracts::DEPOSIT_EVENT_TOPIC)
        .map(|(_, d)| contracts::decode_deposit_event(&d).unwrap())
        .collect();
    assert_eq!(deposits.len(), 1, "exactly once");
    assert_eq!(deposits[0].pubkey, a.pubkey);
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[0], "latest").unwrap(),
        1
    );
}
