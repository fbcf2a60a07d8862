//! An account whose key exists only as cggmp21 shares (2-of-3, parties talking over
//! loopback), end to end through the engine: with a pool of one presignature a burst of
//! intents waits visibly (`signing_wait`) instead of failing or blocking the stage, every
//! intent is signed in order as presignatures arrive, and anvil mines the transactions. A
//! missing share file stops the start with an error naming it.
#![cfg(feature = "mpc")]

mod common;

use std::path::Path;

use common::{Harness, custody_account, fund, transfers_confirm};
use engine::config::{KeyConfig, Layout};
use signers::mpc::{CeremonyConfig, CeremonyOutput, run_ceremony};

fn ceremony(dir: &Path) -> CeremonyOutput {
    // Pregenerated safe primes for the parties' Paillier keys (throwaway test keys; see
    // signers/tests/mpc.rs); aux info and key generation run in full.
    let primes = serde_json::from_str(include_str!(
        "../../signers/tests/data/mpc-test-primes.json"
    ))
    .expect("test primes parse");
    run_ceremony(&CeremonyConfig {
        primes,
        ..CeremonyConfig::new(3, 2, dir.join("shares"))
    })
    .unwrap_or_else(|e| panic!("ceremony failed: {e}"))
}

fn key_config(out: &CeremonyOutput, state: &Path) -> KeyConfig {
    KeyConfig::Mpc {
        share_files: out.share_files.clone(),
        parties: vec![0, 2],
        state_dir: state.to_path_buf(),
        pool_depth: 1,
        low_water: 1,
        wait_timeout_ms: 60_000,
        spin_us: 500,
        coordinator_spin_us: 0,
    }
}

#[test]
fn mpc_account_waits_visibly_for_presignatures_and_anvil_mines_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = ceremony(dir.path());
    let state = dir.path().join("state");
    let h = Harness::start_with(Layout::Auto, |c| {
        c.accounts
            .push(custody_account("mpc", key_config(&out, &state)));
    });
    fund(&h, out.address);

    let frames = transfers_confirm(&h, "mpc", out.address, "mpc", 4);
    // The pool holds one presignature: at least three of the four waited for one, and said
    // so before they were signed.
    let waited = frames
        .iter()
        .filter(|f| {
            let st = common::states(f);
            let w = st.iter().position(|s| s == "signing_wait");
            let s = st.iter().position(|s| s == "signed");
            matches!((w, s), (Some(w), Some(s)) if w < s)
        })
        .count();
    assert!(
        waited >= 3,
        "intents that waited visibly: {waited} of 4: {frames:?}"
    );
    let wait_event = frames
        .iter()
        .flatten()
        .find(|f| f["state"] == "signing_wait")
        .unwrap();
    assert!(
        wait_event["message"]
            .as_str()
            .unwrap()
            .contains("presignature"),
        "{wait_event}"
    );

    // The pool's state is on /metrics.
    let metrics = common::http_get(h.addr(), "/metrics");
    assert!(
        metrics.contains("engine_signer_ready{account=\"mpc\"}")
            && metrics.contains("engine_async_sign_outstanding"),
        "{metrics}"
    );

    // The engine kept serving the other accounts meanwhile.
    transfers_confirm(&h, "dev1", venues::DEV_ADDRESSES[1], "local", 2);
}

#[test]
fn missing_share_file_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let anvil = venues::Anvil::spawn(&venues::AnvilConfig::default()).unwrap();
    let mut cfg = engine::dev::dev_config(
        &anvil.ws_url(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        common::SECRET.into(),
    );
    let missing = dir.path().join("party-0.share");
    cfg.accounts.push(custody_account(
        "mpc",
        KeyConfig::Mpc {
            share_files: vec![missing, dir.path().join("party-1.share")],
            parties: vec![0, 1],
            state_dir: dir.path().join("state"),
            pool_depth: 1,
            low_water: 1,
            wait_timeout_ms: 1_000,
            spin_us: 500,
            coordinator_spin_us: 0,
        },
    ));
    let err = engine::Engine::start(cfg).expect_err("refused").to_string();
    assert!(err.contains("account `mpc`"), "{err}");
    assert!(err.contains("party-0.share"), "{err}");
}
