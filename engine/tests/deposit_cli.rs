//! End-to-end check against the real staking deposit CLI (PyPI `ethstaker-deposit`, installed
//! into `.tools/venv` by `scripts/setup.d/50-deposit-cli.sh`): it generates deposit data for a
//! fixed mnemonic, and the staking module must parse it, verify every entry for the CLI's
//! network, and read back the withdrawal address it was given.
//!
//! The CLI is `$DEPOSIT_CLI` if set, else `<repo root>/.tools/venv/bin/deposit` (the repo root
//! being the parent of this crate's directory). A missing CLI fails the tests with a message
//! saying how to install it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use engine::staking::{
    CryptoCheck, DepositEntry, fork_versions, parse_entries, verify_entry, withdrawal_address,
};

/// The mnemonic Lighthouse's validator_manager test vectors were generated from.
const MNEMONIC: &str = "test test test test test test test test test test test waste";
/// EIP-55 form of the address (the CLI rejects an unchecksummed mixed/lower-case one).
const ADDRESS_CHECKSUMMED: &str = "0x0f51bb10119727a7e5eA3538074fb341F56B09Ad";
const ADDRESS: [u8; 20] = [
    0x0f, 0x51, 0xbb, 0x10, 0x11, 0x97, 0x27, 0xa7, 0xe5, 0xea, 0x35, 0x38, 0x07, 0x4f, 0xb3, 0x41,
    0xf5, 0x6b, 0x09, 0xad,
];
const KEYSTORE_PASSWORD: &str = "deposit-cli-test-password";

fn deposit_cli() -> PathBuf {
    let path = match std::env::var_os("DEPOSIT_CLI") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new(env!("CARGO_MANIFEST_DIR")))
            .join(".tools/venv/bin/deposit"),
    };
    assert!(
        path.is_file(),
        "staking deposit CLI not found at {}: run scripts/setup.d/50-deposit-cli.sh \
         (installs ethstaker-deposit into .tools/venv) or set DEPOSIT_CLI to its `deposit` launcher",
        path.display()
    );
    path
}

/// A fresh empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir =
            std::env::temp_dir().join(format!("deposit-cli-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `deposit --language English --non_interactive existing-mnemonic …` with `args`
/// appended and returns the raw deposit_data JSON it wrote.
fn run_existing_mnemonic(tag: &str, args: &[&str]) -> String {
    let out = TempDir::new(tag);
    let cli = deposit_cli();
    let mut cmd = Command::new(&cli);
    cmd.args([
        "--language",
        "English",
        "--non_interactive",
        "existing-mnemonic",
    ])
    .args(["--mnemonic", MNEMONIC])
    .args(["--keystore_password", KEYSTORE_PASSWORD])
    .args(args)
    .arg("--folder")
    .arg(&out.0)
    .stdin(Stdio::null())
    .env("TERM", "dumb");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cli.display()));
    assert!(
        output.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let keys = out.0.join("validator_keys");
    let files: Vec<PathBuf> = std::fs::read_dir(&keys)
        .unwrap_or_else(|e| panic!("no {}: {e}", keys.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("deposit_data-") && n.ends_with(".json"))
        })
        .collect();
    assert_eq!(
        files.len(),
        1,
        "expected one deposit_data-*.json in {keys:?}: {files:?}"
    );
    std::fs::read_to_string(&files[0]).expect("read deposit data")
}

fn parse(json: &str) -> Vec<DepositEntry> {
    parse_entries(json).unwrap_or_else(|e| panic!("parse_entries failed: {e}\n{json}"))
}

#[test]
fn hoodi_0x01_deposits_from_the_cli_verify() {
    let json = run_existing_mnemonic(
        "hoodi",
        &[
            "--validator_start_index",
            "0",
            "--num_validators",
            "2",
            "--chain",
            "hoodi",
            "--withdrawal_address",
            ADDRESS_CHECKSUMMED,
            "--regular_withdrawal",
        ],
    );
    let entries = parse(&json);
    assert_eq!(entries.len(), 2);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(verify_entry(e, fork_versions::HOODI), Ok(()), "entry {i}");
        assert_eq!(e.fork_version, Some(fork_versions::HOODI), "entry {i}");
        assert_eq!(e.amount_gwei, 32_000_000_000, "entry {i}");
        assert_eq!(
            withdrawal_address(&e.withdrawal_credentials),
            Some((0x01, ADDRESS)),
            "entry {i}"
        );
        assert_eq!(
            verify_entry(e, fork_versions::MAINNET),
            Err(CryptoCheck::ForkVersion)
        );
    }
    // Same mnemonic, indices, network and address as Lighthouse's
    // hoodi_first_0_count_2_prefix_0x01_eth1_true vector, so the same deterministic output.
    let expected_data_roots = [
        "8224b6bcce0d2c0b34cca87ecb0bb0ff1e2c865ac6c5d6c0c3e5cd17affe45ad",
        "17af8437273f96e340cf569e122fb20b044a2be699fff7ff4633ac6e203aaea5",
    ];
    for (e, root) in entries.iter().zip(expected_data_roots) {
        assert_eq!(hex::encode(e.deposit_data_root), root);
    }
}

#[test]
fn mainnet_0x02_deposit_with_amount_from_the_cli_verifies() {
    let json = run_existing_mnemonic(
        "mainnet",
        &[
            "--validator_start_index",
            "5",
            "--num_validators",
            "1",
            "--chain",
            "mainnet",
            "--withdrawal_address",
            ADDRESS_CHECKSUMMED,
            "--compounding",
            "--amount",
            "40.5",
        ],
    );
    let entries = parse(&json);
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(verify_entry(e, fork_versions::MAINNET), Ok(()));
    assert_eq!(e.amount_gwei, 40_500_000_000);
    assert_eq!(
        withdrawal_address(&e.withdrawal_credentials),
        Some((0x02, ADDRESS))
    );
    let mut unstated = *e;
    unstated.fork_version = None;
    assert_eq!(
        verify_entry(&unstated, fork_versions::HOODI),
        Err(CryptoCheck::Signature)
    );
}

/// One entry the CLI made goes through the desk WebSocket to the deposit contract on anvil:
/// the engine's policy and verifier accept it for the network's fork version, and the
/// contract (which recomputes the deposit_data_root) takes it.
#[test]
fn a_cli_entry_is_deposited_through_the_websocket() {
    let json = run_existing_mnemonic(
        "e2e",
        &[
            "--validator_start_index",
            "5",
            "--num_validators",
            "1",
            "--chain",
            "hoodi",
            "--withdrawal_address",
            ADDRESS_CHECKSUMMED,
            "--regular_withdrawal",
        ],
    );
    assert_eq!(fork_versions::HOODI, common::STAKING_FORK);
    let entry = parse(&json)[0];
    let (h, c) = common::start_staking(false, None, |_, _, cfg| {
        cfg.accounts[0].staking_withdrawal = vec![ADDRESS.into()];
    });
    let entries: serde_json::Value = serde_json::from_str(&json).unwrap();
    let intent = serde_json::json!({"id": "cli-1", "account": "dev0",
        "kind": "stake_deposit", "deposits": entries});
    let mut desk = h.desk();
    let ids = vec!["cli-1".to_owned()];
    let frames = h.rt.block_on(async {
        desk.send(&common::submit(intent)).await.unwrap();
        common::collect_until_final(&mut desk, &ids, std::time::Duration::from_secs(60)).await
    });
    let f = &frames["cli-1"];
    assert_eq!(
        common::states(f),
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
    let inc = f.iter().find(|x| x["state"] == "included").unwrap();
    assert_eq!(inc["success"], true, "{inc}");
    assert_eq!(inc["deposit_index"], 0, "{inc}");
    let mut rpc = h.anvil.rpc().unwrap();
    let logs: Vec<serde_json::Value> = rpc
        .call(
            "eth_getLogs",
            serde_json::json!([{"fromBlock": "0x0", "toBlock": "latest", "address": c.deposit}]),
        )
        .unwrap();
    assert_eq!(logs.len(), 1);
    let data = hex::decode(logs[0]["data"].as_str().unwrap().trim_start_matches("0x")).unwrap();
    let seen = venues::contracts::decode_deposit_event(&data).unwrap();
    assert_eq!(seen.pubkey, entry.pubkey);
    assert_eq!(seen.withdrawal_credentials, entry.withdrawal_credentials);
    assert_eq!(seen.signature, entry.signature);
}
