//! An account whose key is in AWS KMS (a real moto server with its DIGEST correction, see
//! `signers/tests/support/moto.rs`), end to end through the engine: signing runs on the
//! async worker beside the signing stage, results come back in order per account, and the
//! transactions are mined by a real anvil. Bad KMS configuration stops the start with an
//! error naming the account and the key.
#![cfg(feature = "kms")]

mod common;
#[path = "../../signers/tests/support/moto.rs"]
mod moto;

use std::time::Duration;

use common::{
    Harness, collect_until_final, custody_account, fund, submit, transfer, transfers_confirm,
};
use engine::config::{KeyConfig, Layout};
use moto::Moto;
use signers::kms::{KmsSigner, create_key};

fn key_config(moto: &Moto, key_id: &str, secret_file: &std::path::Path) -> KeyConfig {
    KeyConfig::Kms {
        key_id: key_id.into(),
        region: moto::REGION.into(),
        endpoint_url: Some(moto.endpoint()),
        access_key_id: Some("testing".into()),
        secret_access_key_file: Some(secret_file.to_path_buf()),
        operation_timeout_ms: 5_000,
    }
}

fn new_key(moto: &Moto) -> (String, alloy_primitives::Address) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let key_id = create_key(&moto.config(""), "engine custody test")
            .await
            .unwrap();
        let signer = KmsSigner::connect(&moto.config(&key_id)).await.unwrap();
        (key_id, signers::AsyncSigner::address(&signer))
    })
}

#[test]
fn kms_account_signs_in_order_and_anvil_mines_it() {
    for layout in [Layout::Fused, Layout::PerStage] {
        let moto = Moto::spawn();
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("aws-secret");
        std::fs::write(&secret, "testing\n").unwrap();
        let (key_id, address) = new_key(&moto);
        let h = Harness::start_with(layout, |c| {
            c.accounts
                .push(custody_account("kms", key_config(&moto, &key_id, &secret)));
        });
        fund(&h, address);

        // A burst from the KMS account: every request is in flight at KMS at once, and the
        // results come back in submission order (consecutive nonces, all mined).
        transfers_confirm(&h, "kms", address, &format!("kms-{layout:?}"), 12);

        // A local account is not held up by the KMS account's requests.
        let mut desk = h.desk();
        let ids = vec!["local-1".to_string(), "kms-after".to_string()];
        let frames = h.rt.block_on(async {
            desk.send(&submit(transfer("kms-after", "kms", 6, 7)))
                .await
                .unwrap();
            desk.send(&submit(transfer("local-1", "dev0", 6, 7)))
                .await
                .unwrap();
            collect_until_final(&mut desk, &ids, Duration::from_secs(60)).await
        });
        for id in &ids {
            assert_eq!(
                common::states(&frames[id]).last().map(String::as_str),
                Some("confirmed"),
                "{id}: {:?}",
                frames[id]
            );
        }
    }
}

#[test]
fn unknown_kms_key_stops_the_start_naming_account_and_key() {
    let moto = Moto::spawn();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("aws-secret");
    std::fs::write(&secret, "testing\n").unwrap();
    let anvil = venues::Anvil::spawn(&venues::AnvilConfig::default()).unwrap();
    let mut cfg = engine::dev::dev_config(
        &anvil.ws_url(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        common::SECRET.into(),
    );
    let missing = "6f0c4e5a-0000-4000-8000-000000000000";
    cfg.accounts
        .push(custody_account("kms", key_config(&moto, missing, &secret)));
    let err = engine::Engine::start(cfg).expect_err("refused").to_string();
    assert!(err.contains("account `kms`"), "{err}");
    assert!(err.contains(missing), "{err}");
    assert!(
        !err.contains("testing"),
        "no credential in the error: {err}"
    );

    // A missing secret file is named too.
    let mut cfg = engine::dev::dev_config(
        &anvil.ws_url(),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        common::SECRET.into(),
    );
    let gone = dir.path().join("no-such-secret");
    cfg.accounts
        .push(custody_account("kms", key_config(&moto, missing, &gone)));
    let err = engine::Engine::start(cfg).expect_err("refused").to_string();
    assert!(
        err.contains("account `kms`") && err.contains("no-such-secret"),
        "{err}"
    );
}

/// A key across a network boundary makes replacements too: a cancel after broadcast is a
/// zero-value transfer to itself signed by KMS, queued at the async worker, included in
/// place of the original.
#[test]
fn kms_account_cancel_after_broadcast_is_signed_by_kms_and_takes_the_nonce() {
    let moto = Moto::spawn();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("aws-secret");
    std::fs::write(&secret, "testing\n").unwrap();
    let (key_id, address) = new_key(&moto);
    let h = Harness::start_on(
        &venues::AnvilConfig::with_block_time(Duration::from_secs(2)),
        Layout::Auto,
        |c| {
            c.confirmations = 1;
            c.accounts
                .push(custody_account("kms", key_config(&moto, &key_id, &secret)));
        },
    );
    fund(&h, address);
    let mut desk = h.desk();
    let mut seen: Vec<serde_json::Value> = Vec::new();
    h.rt.block_on(async {
        desk.send(&submit(transfer("kc", "kms", 5, 4_321)))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut asked = false;
        while !seen.iter().any(|f| f["state"] == "cancelled") {
            let f = tokio::time::timeout_at(deadline, desk.recv())
                .await
                .unwrap_or_else(|_| panic!("no cancelled: {seen:#?}"))
                .unwrap();
            let broadcast = f["state"] == "broadcast";
            seen.push(f);
            if broadcast && !asked {
                asked = true;
                desk.send(&serde_json::json!({"op": "cancel", "id": "kc", "req": "c"}))
                    .await
                    .unwrap();
            }
        }
    });
    let st = common::states(&seen);
    assert!(st.contains(&"replaced".to_string()), "{st:?}");
    assert!(!st.contains(&"included".to_string()), "{st:?}");
    let replaced = seen.iter().find(|f| f["state"] == "replaced").unwrap();
    let hash: alloy_primitives::B256 = replaced["tx_hash"].as_str().unwrap().parse().unwrap();
    let mut rpc = venues::RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let r = rpc
        .receipt(hash)
        .unwrap()
        .expect("the cancellation is mined");
    assert_eq!(r.from, address, "signed by the KMS key");
    assert_eq!(r.to, Some(address), "a transfer to itself");
}
