//! Accounts whose keys are in a PKCS#11 token (a real SoftHSM2 token store per test, each
//! test in a child process of its own: see `signers/tests/support/softhsm.rs`), end to end
//! through the engine and a real anvil; the standby taking over when the token vanishes;
//! and start-up errors for a wrong PIN and a missing token.
#![cfg(feature = "hsm")]

mod common;
#[path = "../../signers/tests/support/softhsm.rs"]
mod softhsm;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Harness, collect_until_final, custody_account, fund, submit, transfer, transfers_confirm,
};
use engine::config::{KeyConfig, Layout};
use k256::elliptic_curve::sec1::ToEncodedPoint;
use signers::hsm::cryptoki::object::{Attribute, KeyType, ObjectClass};
use signers::hsm::{HsmSigner, SECP256K1_EC_PARAMS};
use signers::{LocalCurve, LocalSigner, Signer};
use softhsm::{Token, isolated};

fn key_config(key_label: &str, pin_file: &Path) -> KeyConfig {
    KeyConfig::Hsm {
        module: softhsm::module_path(),
        token_label: softhsm::TOKEN_LABEL.into(),
        key_label: key_label.into(),
        pin_file: Some(pin_file.to_path_buf()),
        pin_env: None,
        sessions: 2,
    }
}

fn pin_file(dir: &Path, pin: &str) -> PathBuf {
    let p = dir.join("hsm-pin");
    std::fs::write(&p, format!("{pin}\n")).unwrap();
    p
}

#[test]
fn hsm_account_signs_and_anvil_mines_it() {
    isolated("hsm_account_signs_and_anvil_mines_it", || {
        let token = Token::init(softhsm::TOKEN_LABEL);
        let address = HsmSigner::generate_key(&token.config("desk-hot", 1)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pin = pin_file(dir.path(), softhsm::USER_PIN);
        let h = Harness::start_with(Layout::Auto, |c| {
            c.accounts
                .push(custody_account("hsm", key_config("desk-hot", &pin)));
        });
        fund(&h, address);
        transfers_confirm(&h, "hsm", address, "hsm", 6);
    });
}

/// Imports a known secp256k1 key into the token, as an HSM cluster replicates one key to
/// its members (test only: generated keys never leave the token).
fn import_key(token: &Token, label: &str, secret_hex: &str) {
    let secret = hex::decode(secret_hex).unwrap();
    let sk = k256::SecretKey::from_slice(&secret).unwrap();
    let point = sk.public_key().to_encoded_point(false);
    let mut ec_point = vec![0x04, 65];
    ec_point.extend_from_slice(point.as_bytes());
    let session = token.ctx.open_rw_session(token.slot()).unwrap();
    softhsm::login_user(&session);
    let id = label.as_bytes().to_vec();
    session
        .create_object(&[
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(SECP256K1_EC_PARAMS.to_vec()),
            Attribute::EcPoint(ec_point),
            Attribute::Label(id.clone()),
            Attribute::Id(id.clone()),
        ])
        .unwrap();
    session
        .create_object(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(KeyType::EC),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::EcParams(SECP256K1_EC_PARAMS.to_vec()),
            Attribute::Value(secret),
            Attribute::Label(id.clone()),
            Attribute::Id(id),
        ])
        .unwrap();
}

#[test]
fn standby_signs_when_the_token_vanishes() {
    isolated("standby_signs_when_the_token_vanishes", || {
        // A throwaway key held by the token (primary) and by the standby.
        const KEY: &str = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";
        let token = Token::init(softhsm::TOKEN_LABEL);
        import_key(&token, "replicated", KEY);
        let address = LocalSigner::from_hex("x", KEY, LocalCurve::K256)
            .unwrap()
            .address();
        let dir = tempfile::tempdir().unwrap();
        let pin = pin_file(dir.path(), softhsm::USER_PIN);
        let h = Harness::start_with(Layout::Auto, |c| {
            let mut a = custody_account("replicated", key_config("replicated", &pin));
            a.standby = Some(KeyConfig::Local {
                secret_hex: KEY.into(),
            });
            c.accounts.push(a);
            c.failover_retry_ms = 60_000;
        });
        fund(&h, address);
        transfers_confirm(&h, "replicated", address, "before", 2);

        // The token's files disappear: the HSM answers that the key is gone. The standby
        // signs on the same nonces' sequence; nothing fails.
        let tokens = softhsm::store_dir().join("tokens");
        for entry in std::fs::read_dir(&tokens).unwrap() {
            std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
        }
        let direct = HsmSigner::open(&token.config("replicated", 1));
        assert!(direct.is_err(), "the token really is gone");
        transfers_confirm(&h, "replicated", address, "after", 3);

        // SREs see it: the standby's signatures are counted, and /health names both.
        let metrics = common::http_get(h.addr(), "/metrics");
        let line = metrics
            .lines()
            .find(|l| l.starts_with("engine_signer_failovers_total{account=\"replicated\"}"))
            .unwrap_or_else(|| panic!("no fail-over counter in:\n{metrics}"));
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 1, "{line}");
        let health = common::http_get(h.addr(), "/health");
        assert!(
            health.contains(r#""backend":"hsm""#) && health.contains(r#""standby":"local""#),
            "{health}"
        );
    });
}

#[test]
fn hsm_without_standby_fails_clearly_and_the_engine_keeps_serving() {
    isolated(
        "hsm_without_standby_fails_clearly_and_the_engine_keeps_serving",
        || {
            let token = Token::init(softhsm::TOKEN_LABEL);
            let address = HsmSigner::generate_key(&token.config("lonely", 1)).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let pin = pin_file(dir.path(), softhsm::USER_PIN);
            let h = Harness::start_with(Layout::Auto, |c| {
                c.accounts
                    .push(custody_account("lonely", key_config("lonely", &pin)));
            });
            fund(&h, address);
            transfers_confirm(&h, "lonely", address, "ok", 1);
            let tokens = softhsm::store_dir().join("tokens");
            for entry in std::fs::read_dir(&tokens).unwrap() {
                std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
            }
            let mut desk = h.desk();
            let ids = vec!["gone".to_string(), "other".to_string()];
            let frames = h.rt.block_on(async {
                desk.send(&submit(transfer("gone", "lonely", 5, 1)))
                    .await
                    .unwrap();
                desk.send(&submit(transfer("other", "dev2", 5, 1)))
                    .await
                    .unwrap();
                collect_until_final(&mut desk, &ids, Duration::from_secs(60)).await
            });
            let last = frames["gone"].last().unwrap();
            assert_eq!(last["state"], "failed", "{last}");
            assert_eq!(last["reason"], "signer_error", "{last}");
            assert!(
                last["message"].as_str().unwrap().contains("unavailable"),
                "{last}"
            );
            assert_eq!(
                frames["other"].last().unwrap()["state"],
                "confirmed",
                "{:?}",
                frames["other"]
            );
            // The failed intent used no nonce: the next one (after the token is back would
            // use it); the account's chain nonce is still 1.
            let mut rpc = venues::RpcClient::connect(&h.anvil.ws_url()).unwrap();
            assert_eq!(rpc.transaction_count(address, "pending").unwrap(), 1);
        },
    );
}

#[test]
fn wrong_pin_and_missing_token_stop_the_start() {
    isolated("wrong_pin_and_missing_token_stop_the_start", || {
        let token = Token::init(softhsm::TOKEN_LABEL);
        HsmSigner::generate_key(&token.config("k", 1)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let anvil = venues::Anvil::spawn(&venues::AnvilConfig::default()).unwrap();
        let start = |key: KeyConfig| {
            let mut cfg = engine::dev::dev_config(
                &anvil.ws_url(),
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                common::SECRET.into(),
            );
            cfg.accounts.push(custody_account("vault", key));
            engine::Engine::start(cfg).expect_err("refused").to_string()
        };

        let wrong = pin_file(dir.path(), "not-the-pin-0000");
        let err = start(key_config("k", &wrong));
        assert!(err.contains("account `vault`"), "{err}");
        assert!(err.to_lowercase().contains("pin"), "{err}");
        assert!(
            !err.contains("not-the-pin-0000"),
            "the PIN is never printed: {err}"
        );

        let right = pin_file(dir.path(), softhsm::USER_PIN);
        let mut missing = key_config("k", &right);
        if let KeyConfig::Hsm { token_label, .. } = &mut missing {
            *token_label = "no-such-token".into();
        }
        let err = start(missing);
        assert!(
            err.contains("account `vault`") && err.contains("no-such-token"),
            "{err}"
        );

        let err = start(key_config("no-such-key", &right));
        assert!(err.contains("no-such-key"), "{err}");
    });
}
