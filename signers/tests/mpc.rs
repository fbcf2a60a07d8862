//! The threshold-ECDSA backend against the real cggmp21 protocol: one 2-of-3 ceremony per
//! test binary (its parties talking over loopback TCP), then signers whose parties talk
//! over loopback TCP, and a transaction signed that way mined by a real anvil.
#![cfg(feature = "mpc")]

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use alloy_consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy_eips::eip2718::Encodable2718;
use alloy_primitives::{Address, B256, TxKind, U256, keccak256};
use futures::executor::block_on;
use signers::mpc::{CeremonyConfig, CeremonyOutput, MpcConfig, MpcSigner, run_ceremony};
use signers::{AsyncSigner, Backend, LocalCurve, LocalSigner, Signer, SignerError};

/// Bound on waiting for presignatures in these tests.
const POOL_WAIT: Duration = Duration::from_secs(120);

struct Ceremony {
    _dir: tempfile::TempDir,
    out: CeremonyOutput,
}

/// The 2-of-3 ceremony, run once per test binary.
fn ceremony() -> &'static CeremonyOutput {
    static CEREMONY: OnceLock<Ceremony> = OnceLock::new();
    &CEREMONY
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("mpc-ceremony-")
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .unwrap();
            // Safe primes for the parties' Paillier keys, generated once and kept with the
            // tests (generating them is most of a ceremony's time: up to a minute per
            // party here). Aux-info and key generation still run in full.
            let primes = serde_json::from_str(include_str!("data/mpc-test-primes.json"))
                .expect("test primes parse");
            let out = run_ceremony(&CeremonyConfig {
                primes,
                ..CeremonyConfig::new(3, 2, dir.path().join("shares"))
            })
            .unwrap_or_else(|e| panic!("ceremony failed: {e}"));
            eprintln!("2-of-3 ceremony took {:?}", out.elapsed);
            Ceremony { _dir: dir, out }
        })
        .out
}

fn config(parties: &[u16], pool_depth: usize, low_water: usize, state: &Path) -> MpcConfig {
    MpcConfig {
        pool_depth,
        low_water,
        ..MpcConfig::new(
            ceremony().share_files.clone(),
            parties.to_vec(),
            state.to_path_buf(),
        )
    }
}

fn start(cfg: &MpcConfig) -> MpcSigner {
    MpcSigner::start(cfg).unwrap_or_else(|e| panic!("mpc signer did not start: {e}"))
}

fn wait_pool(s: &MpcSigner, n: usize) {
    assert!(
        s.wait_for_pool(n, POOL_WAIT),
        "pool did not reach {n} within {POOL_WAIT:?} (has {}, last error {:?})",
        s.pool_depth(),
        s.last_error()
    );
}

fn hash(tag: &str) -> B256 {
    keccak256(tag.as_bytes())
}

#[test]
fn ceremony_writes_one_0600_share_file_per_party() {
    let out = ceremony();
    assert_eq!(out.share_files.len(), 3);
    for (i, f) in out.share_files.iter().enumerate() {
        assert_eq!(
            f.file_name().unwrap().to_str().unwrap(),
            format!("party-{i}.share.json")
        );
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // The address is the keccak of the public key the ceremony reported.
    assert_eq!(out.public_key.len(), 66, "compressed SEC1 hex");
    assert_ne!(out.address, Address::ZERO);
    // A second ceremony into the same folder must not overwrite the shares.
    let err = run_ceremony(&CeremonyConfig::new(
        3,
        2,
        out.share_files[0].parent().unwrap().to_path_buf(),
    ))
    .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn signature_recovers_to_the_ceremony_address() {
    let out = ceremony();
    let state = tempfile::tempdir().unwrap();
    // Parties 0 and 2: the signing set need not be the first t indices.
    let s = start(&config(&[2, 0], 2, 1, state.path()));
    assert_eq!(s.address(), out.address);
    assert_eq!(s.backend(), Backend::Mpc);
    assert_eq!(s.public_key(), out.public_key);
    wait_pool(&s, 1);
    for tag in ["one", "two", "three"] {
        let h = hash(tag);
        let sig = block_on(s.sign_hash_async(h)).unwrap();
        assert!(sig.normalize_s().is_none(), "signature must be low-s");
        assert_eq!(sig.recover_address_from_prehash(&h).unwrap(), out.address);
    }
    assert!(s.last_error().is_none(), "{:?}", s.last_error());
}

#[test]
fn presignature_cannot_be_used_twice_even_after_restart() {
    let state = tempfile::tempdir().unwrap();
    let cfg = config(&[0, 1], 3, 0, state.path());
    let s = start(&cfg);
    wait_pool(&s, 3);
    let ids = s.ready_ids();
    assert_eq!(ids.len(), 3);
    assert!(ids.iter().all(|id| id.epoch() == s.epoch()));

    let first = block_on(s.sign_hash_with(ids[0], hash("first use"))).unwrap();
    assert_eq!(
        first
            .recover_address_from_prehash(&hash("first use"))
            .unwrap(),
        s.address()
    );
    assert!(!s.ready_ids().contains(&ids[0]));
    // The same presignature for another hash: every party refuses.
    let again = block_on(s.sign_hash_with(ids[0], hash("second use"))).unwrap_err();
    assert!(
        matches!(&again, SignerError::Signing { reason, .. } if reason.contains("unknown or already used")),
        "{again}"
    );
    // And for the same hash, too.
    assert!(block_on(s.sign_hash_with(ids[0], hash("first use"))).is_err());
    let mut old_r: HashSet<U256> = HashSet::from([first.r()]);
    // The pool path takes the oldest remaining one, ids[1]; ids[2] stays unused.
    old_r.insert(block_on(s.sign_hash_async(hash("pool"))).unwrap().r());
    assert_eq!(s.ready_ids(), vec![ids[2]]);
    let old_epoch = s.epoch();
    drop(s);

    // Restart on the same state folder: a new epoch, and nothing of the old run is usable,
    // not even the presignature that was ready and never used.
    let s = start(&cfg);
    assert!(s.epoch() > old_epoch, "{} > {old_epoch}", s.epoch());
    let err = block_on(s.sign_hash_with(ids[2], hash("old, never used"))).unwrap_err();
    assert!(err.to_string().contains("unknown or already used"), "{err}");
    for used in [ids[0], ids[1]] {
        let err = block_on(s.sign_hash_with(used, hash("old, used"))).unwrap_err();
        assert!(err.to_string().contains("unknown or already used"), "{err}");
    }
    wait_pool(&s, 2);
    assert!(s.ready_ids().iter().all(|id| id.epoch() == s.epoch()));
    for tag in ["after restart 1", "after restart 2"] {
        let sig = block_on(s.sign_hash_async(hash(tag))).unwrap();
        assert_eq!(
            sig.recover_address_from_prehash(&hash(tag)).unwrap(),
            s.address()
        );
        // A fresh presignature means a fresh nonce: r never repeats across runs.
        assert!(old_r.insert(sig.r()), "r reused across a restart");
    }

    // Two signers cannot share a state folder.
    let err = MpcSigner::start(&cfg).unwrap_err();
    assert!(
        matches!(&err, SignerError::Config { what, .. } if what.contains("state_dir")),
        "{err}"
    );
}

#[test]
fn pool_refills_below_the_low_water_mark() {
    let state = tempfile::tempdir().unwrap();
    let s = start(&config(&[1, 2], 3, 2, state.path()));
    wait_pool(&s, 3);
    assert_eq!(s.presignatures_generated(), 3);
    // 3 -> 2: not below the mark, no refill.
    block_on(s.sign_hash_async(hash("a"))).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.presignatures_generated(), 3);
    assert_eq!(s.pool_depth(), 2);
    // 2 -> 1: below the mark, refilled to the full depth.
    block_on(s.sign_hash_async(hash("b"))).unwrap();
    wait_pool(&s, 3);
    assert_eq!(s.presignatures_generated(), 5);
    assert_eq!(s.pool_empty_waits(), 0);
}

#[test]
fn empty_pool_waits_then_signs_after_refill() {
    let state = tempfile::tempdir().unwrap();
    let s = start(&config(&[0, 2], 1, 1, state.path()));
    wait_pool(&s, 1);
    assert!(s.ready());
    let fut = s
        .try_sign_hash_async(hash("x"))
        .expect("one presignature ready");
    block_on(fut).unwrap();
    // Generating a presignature takes far longer than this: the pool is empty now.
    let err = s
        .try_sign_hash_async(hash("y"))
        .err()
        .expect("pool is empty");
    assert!(err.to_string().contains("pool is empty"), "{err}");
    assert!(!s.ready());
    let t0 = Instant::now();
    let h = hash("y");
    let sig = block_on(s.sign_hash_async(h)).unwrap();
    assert_eq!(s.pool_empty_waits(), 1);
    assert_eq!(sig.recover_address_from_prehash(&h).unwrap(), s.address());
    eprintln!("waited {:?} for a presignature", t0.elapsed());
}

#[test]
fn missing_share_file_is_a_config_error_naming_it() {
    let out = ceremony();
    let state = tempfile::tempdir().unwrap();
    let missing = state.path().join("party-9.share.json");
    let mut cfg = config(&[0, 1], 1, 0, state.path());
    cfg.share_files = vec![out.share_files[0].clone(), missing.clone()];
    let err = MpcSigner::start(&cfg).unwrap_err();
    match &err {
        SignerError::Config { what, .. } => {
            assert!(what.contains(missing.to_str().unwrap()), "{err}")
        }
        other => panic!("expected Config, got {other}"),
    }
}

#[test]
fn share_file_readable_by_others_is_refused() {
    let out = ceremony();
    let dir = tempfile::tempdir().unwrap();
    let copy: PathBuf = dir.path().join("party-1.share.json");
    std::fs::copy(&out.share_files[1], &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cfg = config(&[0, 1], 1, 0, &dir.path().join("state"));
    cfg.share_files = vec![out.share_files[0].clone(), copy.clone()];
    let err = MpcSigner::start(&cfg).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, SignerError::Config { .. }) && text.contains("0644"),
        "{text}"
    );
    assert!(text.contains(copy.to_str().unwrap()), "{text}");
    // Errors never carry share contents.
    let content = std::fs::read_to_string(&copy).unwrap();
    let secret_field = content.split("\"x\":").nth(1).unwrap_or("");
    assert!(!text.contains(&secret_field[..secret_field.len().min(20)]));
}

#[test]
fn wrong_party_sets_are_config_errors() {
    let state = tempfile::tempdir().unwrap();
    for parties in [&[0u16][..], &[0, 0], &[0, 1, 2], &[0, 7]] {
        let err = MpcSigner::start(&config(parties, 1, 0, state.path())).unwrap_err();
        assert!(
            matches!(&err, SignerError::Config { what, .. } if what == "mpc parties"),
            "{parties:?}: {err}"
        );
    }
}

#[test]
fn mpc_signed_eip1559_transaction_is_mined_by_anvil() {
    let anvil = venues::Anvil::spawn(&venues::AnvilConfig::default())
        .unwrap_or_else(|e| panic!("cannot start anvil (did scripts/setup.sh run?): {e}"));
    let mut rpc = anvil.rpc().unwrap();
    let chain_id = rpc.chain_id().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mpc = start(&config(&[1, 2], 1, 1, state.path()));
    let mpc_addr = mpc.address();

    // Fund the MPC address from anvil's first dev account.
    let dev = LocalSigner::from_hex("dev0", venues::DEV_PRIVATE_KEYS[0], LocalCurve::K256).unwrap();
    let one_eth = U256::from(10u64).pow(U256::from(18u64));
    let fund = TxEip1559 {
        chain_id,
        nonce: rpc.transaction_count(dev.address(), "pending").unwrap(),
        gas_limit: 21_000,
        max_fee_per_gas: fees.suggested_max_fee_per_gas(),
        max_priority_fee_per_gas: fees.max_priority_fee_per_gas,
        to: TxKind::Call(mpc_addr),
        value: one_eth,
        access_list: Default::default(),
        input: Default::default(),
    };
    let sig = dev.sign_hash(&fund.signature_hash()).unwrap();
    let env: TxEnvelope = fund.into_signed(sig).into();
    let h = rpc.send_raw_transaction(&env.encoded_2718()).unwrap();
    assert!(wait_receipt(&mut rpc, h).success);
    assert_eq!(rpc.balance(mpc_addr).unwrap(), one_eth);

    // Spend from it with a transaction signed by the parties.
    let to = venues::dev_address(3);
    let before = rpc.balance(to).unwrap();
    let tx = TxEip1559 {
        chain_id,
        nonce: 0,
        gas_limit: 21_000,
        max_fee_per_gas: fees.suggested_max_fee_per_gas(),
        max_priority_fee_per_gas: fees.max_priority_fee_per_gas,
        to: TxKind::Call(to),
        value: U256::from(1_234_567u64),
        access_list: Default::default(),
        input: Default::default(),
    };
    let sig = block_on(mpc.sign_hash_async(tx.signature_hash())).unwrap();
    let env: TxEnvelope = tx.into_signed(sig).into();
    let h = rpc.send_raw_transaction(&env.encoded_2718()).unwrap();
    assert_eq!(h, *env.tx_hash());
    let receipt = wait_receipt(&mut rpc, h);
    assert!(receipt.success);
    assert_eq!(receipt.from, mpc_addr);
    assert_eq!(receipt.to, Some(to));
    assert_eq!(rpc.balance(to).unwrap(), before + U256::from(1_234_567u64));
}

fn wait_receipt(rpc: &mut venues::RpcClient, h: B256) -> venues::ReceiptSummary {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(r) = rpc.receipt(h).unwrap() {
            return r;
        }
        assert!(Instant::now() < deadline, "no receipt for {h}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
