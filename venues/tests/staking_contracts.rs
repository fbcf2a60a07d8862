//! The staking contracts on a real anvil: the checked-in build is what the sources compile
//! to; the deposit contract's on-chain checks, its `DepositEvent` and index; the batch
//! contract; the EIP-7002/7251 request contracts installed at their addresses (fee, input
//! lengths, logs, the system address's dequeue).

mod common;

use std::path::Path;
use std::time::Duration;

use alloy_primitives::{Address, B256, Bytes, U256};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use venues::contracts::{self, Contract};
use venues::{AnvilConfig, DEV_ADDRESSES, RpcClient};

const GWEI: u128 = 1_000_000_000;
const FROM: Address = DEV_ADDRESSES[3];

fn sha(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The deposit_data_root of (pubkey, wc, amount, signature), as the specs define it.
fn data_root(pk: &[u8; 48], wc: &[u8; 32], gwei: u64, sig: &[u8; 96]) -> [u8; 32] {
    let pk_root = sha(&[pk, &[0; 16]]);
    let sig_root = sha(&[&sha(&[&sig[..64]]), &sha(&[&sig[64..], &[0; 32]])]);
    sha(&[
        &sha(&[&pk_root, wc]),
        &sha(&[&gwei.to_le_bytes(), &[0; 24], &sig_root]),
    ])
}

fn word(v: usize) -> [u8; 32] {
    let mut w = [0u8; 32];
    w[24..].copy_from_slice(&(v as u64).to_be_bytes());
    w
}

/// ABI: `deposit(bytes,bytes,bytes,bytes32)` with raw field bytes of any length.
fn deposit_call(pk: &[u8], wc: &[u8], sig: &[u8], root: [u8; 32]) -> Vec<u8> {
    let mut out = vec![0x22, 0x89, 0x51, 0x18];
    let pad = |b: &[u8]| b.len().div_ceil(32) * 32;
    let o1 = 4 * 32;
    let o2 = o1 + 32 + pad(pk);
    let o3 = o2 + 32 + pad(wc);
    for w in [word(o1), word(o2), word(o3), root] {
        out.extend_from_slice(&w);
    }
    for b in [pk, wc, sig] {
        out.extend_from_slice(&word(b.len()));
        out.extend_from_slice(b);
        out.resize(out.len() + pad(b) - b.len(), 0);
    }
    out
}

/// Sends a transaction and returns its receipt (status checked by the caller).
fn send(rpc: &mut RpcClient, to: Address, value: u128, data: &[u8]) -> Value {
    let h: B256 = rpc
        .call(
            "eth_sendTransaction",
            json!([{"from": FROM, "to": to, "value": format!("0x{value:x}"),
                    "data": Bytes::copy_from_slice(data), "gas": "0x7a120"}]),
        )
        .unwrap();
    for _ in 0..200 {
        let r: Option<Value> = rpc.call("eth_getTransactionReceipt", json!([h])).unwrap();
        if let Some(r) = r {
            return r;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("no receipt for {h}");
}

fn ok(r: &Value) -> bool {
    r["status"] == "0x1"
}

fn log_data(l: &Value) -> Vec<u8> {
    hex::decode(l["data"].as_str().unwrap().trim_start_matches("0x")).unwrap()
}

#[test]
fn the_checked_in_build_is_what_the_sources_compile_to() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().unwrap();
    let run = std::process::Command::new("node")
        .arg(root.join("scripts/compile-contracts.js"))
        .arg(out.path())
        .output()
        .expect("node runs (installed with npm; scripts/setup.sh installs solc)");
    assert!(
        run.status.success(),
        "compile failed (run scripts/setup.sh for solc): {}",
        String::from_utf8_lossy(&run.stderr)
    );
    for c in [
        Contract::Deposit,
        Contract::Batch,
        Contract::WithdrawalRequests,
        Contract::ConsolidationRequests,
    ] {
        let fresh = std::fs::read_to_string(out.path().join(format!("{}.json", c.name()))).unwrap();
        assert_eq!(
            fresh,
            c.build_json(),
            "contracts/build/{}.json is stale: run node scripts/compile-contracts.js",
            c.name()
        );
    }
}

#[test]
fn the_deposit_contract_checks_what_the_chain_checks() {
    let anvil = common::spawn_anvil(&AnvilConfig::default());
    let mut rpc = anvil.rpc().unwrap();
    let c = contracts::deploy_staking(&mut rpc, DEV_ADDRESSES[9]).unwrap();
    let (pk, wc, sig) = ([0x11u8; 48], [0x01u8; 32], [0x22u8; 96]);
    let root = data_root(&pk, &wc, 32_000_000_000, &sig);
    let eth32 = 32 * GWEI * GWEI;
    for want_index in 0..2u64 {
        let r = send(
            &mut rpc,
            c.deposit,
            eth32,
            &deposit_call(&pk, &wc, &sig, root),
        );
        assert!(ok(&r), "{r}");
        let log = &r["logs"][0];
        assert_eq!(log["topics"][0], json!(contracts::DEPOSIT_EVENT_TOPIC));
        let e = contracts::decode_deposit_event(&log_data(log)).unwrap();
        assert_eq!((e.pubkey, e.withdrawal_credentials), (pk, wc));
        assert_eq!((e.amount_gwei, e.index), (32_000_000_000, want_index));
    }
    // Each on-chain check, broken once.
    let mut wrong = root;
    wrong[0] ^= 1;
    let short = [0x11u8; 47];
    let half = 16 * GWEI * GWEI / 32;
    let half_root = data_root(&pk, &wc, 500_000_000, &sig);
    for (what, value, data) in [
        ("wrong root", eth32, deposit_call(&pk, &wc, &sig, wrong)),
        (
            "47-byte pubkey",
            eth32,
            deposit_call(&short, &wc, &sig, root),
        ),
        ("0.5 ETH", half, deposit_call(&pk, &wc, &sig, half_root)),
        (
            "not whole gwei",
            eth32 + 1,
            deposit_call(&pk, &wc, &sig, root),
        ),
    ] {
        let r = send(&mut rpc, c.deposit, value, &data);
        assert!(!ok(&r), "{what} was accepted");
    }
    // A batch of two: two events, consecutive indices; a wrong value reverts.
    let pk2 = [0x33u8; 48];
    let root2 = data_root(&pk2, &wc, 40_000_000_000, &sig);
    let mut call = vec![0x48, 0x5b, 0xbf, 0x8c];
    let fields: [Vec<u8>; 3] = [
        [pk, pk2].concat(),
        [wc, wc].concat(),
        [sig.to_vec(), sig.to_vec()].concat(),
    ];
    // Heads: 3 bytes offsets, then the two arrays' offsets.
    let mut tail = Vec::new();
    let mut heads = Vec::new();
    for f in &fields {
        heads.push(word(5 * 32 + tail.len()));
        tail.extend_from_slice(&word(f.len()));
        tail.extend_from_slice(f);
    }
    heads.push(word(5 * 32 + tail.len()));
    tail.extend_from_slice(&word(2));
    tail.extend_from_slice(&root);
    tail.extend_from_slice(&root2);
    heads.push(word(5 * 32 + tail.len()));
    tail.extend_from_slice(&word(2));
    tail.extend_from_slice(&word(32_000_000_000));
    tail.extend_from_slice(&word(40_000_000_000));
    for h in heads {
        call.extend_from_slice(&h);
    }
    call.extend_from_slice(&tail);
    let r = send(&mut rpc, c.batch, 72 * GWEI * GWEI, &call);
    assert!(ok(&r), "{r}");
    let idx: Vec<u64> = r["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| contracts::deposit_event_index(&log_data(l)).unwrap())
        .collect();
    assert_eq!(idx, [2, 3]);
    let r = send(&mut rpc, c.batch, 71 * GWEI * GWEI, &call);
    assert!(!ok(&r), "a batch with the wrong value was accepted");
}

#[test]
fn the_request_contracts_take_fees_log_and_dequeue() {
    let anvil = common::spawn_anvil(&AnvilConfig::default());
    let mut rpc = anvil.rpc().unwrap();
    contracts::install_system_contracts(&mut rpc).unwrap();
    contracts::install_system_contracts(&mut rpc).unwrap(); // idempotent
    for (at, ok_len) in [
        (contracts::WITHDRAWAL_REQUEST_CONTRACT, 56usize),
        (contracts::CONSOLIDATION_REQUEST_CONTRACT, 96),
    ] {
        assert_eq!(contracts::request_fee(&mut rpc, at).unwrap(), U256::from(1));
        let input: Vec<u8> = (0..ok_len as u8).collect();
        let r = send(&mut rpc, at, 1, &input);
        assert!(ok(&r), "{r}");
        let mut expect = FROM.to_vec();
        expect.extend_from_slice(&input);
        assert_eq!(log_data(&r["logs"][0]), expect);
        assert!(
            r["logs"][0]["topics"].as_array().unwrap().is_empty(),
            "LOG0"
        );
        assert!(!ok(&send(&mut rpc, at, 0, &input)), "no fee paid");
        assert!(!ok(&send(&mut rpc, at, 1, &input[1..])), "short input");
        // The system address takes the queue: source ++ input (amount little-endian for
        // withdrawals, as the consensus layer reads it).
        let out: Bytes = rpc
            .call(
                "eth_call",
                json!([{"from": "0xfffffffffffffffffffffffffffffffffffffffe", "to": at,
                        "data": "0x"}, "latest"]),
            )
            .unwrap();
        let mut want = FROM.to_vec();
        if ok_len == 56 {
            want.extend_from_slice(&input[..48]);
            let mut amount = input[48..].to_vec();
            amount.reverse();
            want.extend_from_slice(&amount);
        } else {
            want.extend_from_slice(&input);
        }
        assert_eq!(out.to_vec(), want);
    }
}
