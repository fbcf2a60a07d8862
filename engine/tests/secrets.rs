//! The secret-leak sweep: a full run of the engine (journal and audit log sealed under a
//! key-encryption key in a SoftHSM2 token, audit signing key, private relay with its auth
//! key, local custody keys, an account in the HSM (user PIN) and one in moto's KMS (AWS
//! secret key), accepted, rejected and malformed intents, refused tokens), then everything
//! it wrote or said is searched for
//! the secrets it was given: every log line at TRACE level (through the binary's filter), every reply frame, the HTTP
//! bodies of `/metrics`, `/health`, `/v1/latency` and of refused upgrades, the `Debug`
//! form of its configuration, and every byte of its journal and audit files.
#![cfg(all(feature = "hsm", feature = "kms"))]

mod common;
#[path = "../../signers/tests/support/moto.rs"]
mod moto;
#[path = "../../signers/tests/support/softhsm.rs"]
mod softhsm;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use engine::config::{AtRestConfig, JournalSettings, KeyConfig, Layout, RelayConfig};
use engine::desk::Desk;
use serde_json::json;
use venues::relay_sim::{RelaySim, RelaySimConfig};

/// Everything the tracing subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn private_file(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn every_file(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            every_file(&p, out);
        } else {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
}

#[test]
fn no_secret_the_engine_was_given_appears_in_anything_it_writes_or_says() {
    // The SoftHSM2 token store is per process: the sweep runs in a child of its own.
    softhsm::isolated(
        "no_secret_the_engine_was_given_appears_in_anything_it_writes_or_says",
        sweep,
    );
}

fn sweep() {
    let logs = Captured::default();
    let writer = logs.clone();
    // The engine binary's filter, asked for everything.
    tracing_subscriber::fmt()
        .with_env_filter(engine::log_filter(Some("trace")))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    let audit_secret = "5a".repeat(32);
    let relay_secret = "3c".repeat(32);
    private_file(
        &dir.path().join("audit.key"),
        &format!("0x{audit_secret}\n"),
    );
    private_file(&dir.path().join("relay.key"), &relay_secret);
    // Custody and at-rest keys behind secrets the engine reads from files.
    let token_store = softhsm::Token::init(softhsm::TOKEN_LABEL);
    let hsm_address =
        signers::hsm::HsmSigner::generate_key(&token_store.config("desk-hsm", 1)).unwrap();
    signers::hsm::HsmKek::generate(&token_store.config("at-rest", 1)).unwrap();
    private_file(
        &dir.path().join("hsm-pin"),
        &format!("{}\n", softhsm::USER_PIN),
    );
    let hsm_key = |label: &str| KeyConfig::Hsm {
        module: softhsm::module_path(),
        token_label: softhsm::TOKEN_LABEL.into(),
        key_label: label.into(),
        pin_file: Some(dir.path().join("hsm-pin")),
        pin_env: None,
        sessions: 1,
    };
    let kms_secret = "kms-secret-7f3a9c2e1b5d8e4f6a0c";
    private_file(&dir.path().join("aws-secret"), &format!("{kms_secret}\n"));
    let moto = moto::Moto::spawn();
    let kms_cfg = signers::kms::KmsConfig {
        credentials: Some(signers::kms::KmsCredentials {
            access_key_id: "secrets-test".into(),
            secret_access_key: kms_secret.into(),
        }),
        ..moto.config("")
    };
    let (kms_key, kms_address) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let id = signers::kms::create_key(&kms_cfg, "secret sweep")
            .await
            .unwrap();
        let signer = signers::kms::KmsSigner::connect(&signers::kms::KmsConfig {
            key_id: id.clone(),
            ..kms_cfg.clone()
        })
        .await
        .unwrap();
        (id, signers::AsyncSigner::address(&signer))
    });
    let mut debug_cfg = String::new();
    let mut sim = None;
    let h = Harness::start_with(Layout::Auto, |cfg| {
        cfg.audit_dir = Some(dir.path().join("audit"));
        cfg.audit_key_file = Some(dir.path().join("audit.key"));
        cfg.journal = Some(JournalSettings {
            dir: dir.path().join("journal"),
            segment_bytes: 1 << 20,
            sync: Default::default(),
            group_commit_us: 200,
            interval_ms: 10,
            compact_every_ms: 0,
        });
        let s = RelaySim::start(
            &cfg.node_ws_url.replacen("ws://", "http://", 1),
            RelaySimConfig::default(),
        )
        .unwrap();
        cfg.relays = vec![RelayConfig {
            name: "relay-a".into(),
            url: s.url(),
        }];
        cfg.relay_auth_key_file = Some(dir.path().join("relay.key"));
        cfg.accounts
            .push(custody_account("hsm", hsm_key("desk-hsm")));
        cfg.accounts.push(custody_account(
            "kms",
            KeyConfig::Kms {
                key_id: kms_key.clone(),
                region: moto::REGION.into(),
                endpoint_url: Some(moto.endpoint()),
                access_key_id: Some("secrets-test".into()),
                secret_access_key_file: Some(dir.path().join("aws-secret")),
                operation_timeout_ms: 5_000,
            },
        ));
        cfg.at_rest = Some(AtRestConfig {
            kek: hsm_key("at-rest"),
        });
        debug_cfg = format!("{cfg:?} {:?}", cfg.accounts);
        sim = Some(s);
    });

    fund(&h, hsm_address);
    fund(&h, kms_address);
    // A mixed run: public and private transfers (from local, HSM and KMS keys), a
    // rejection, an unknown account, malformed frames, a status query.
    let mut desk = h.desk();
    let ids: Vec<String> = [
        "ok-1", "ok-2", "priv-1", "denied", "nobody", "hsm-1", "kms-1",
    ]
    .map(str::to_owned)
    .to_vec();
    let mut said = String::new();
    let frames = h.rt.block_on(async {
        desk.send(&submit(transfer("ok-1", "dev0", 5, 1_000)))
            .await
            .unwrap();
        desk.send(&submit(transfer("ok-2", "dev1", 6, 1_000)))
            .await
            .unwrap();
        let mut p = transfer("priv-1", "dev2", 7, 1_000);
        p["route"] = json!("private");
        desk.send(&submit(p)).await.unwrap();
        desk.send(&submit(transfer("denied", "dev0", 1, 1_000)))
            .await
            .unwrap();
        desk.send(&submit(transfer("nobody", "treasury-x", 5, 1_000)))
            .await
            .unwrap();
        desk.send(&submit(transfer("hsm-1", "hsm", 8, 1_000)))
            .await
            .unwrap();
        desk.send(&submit(transfer("kms-1", "kms", 9, 1_000)))
            .await
            .unwrap();
        desk.send_text("{not json".into()).await.unwrap();
        desk.send(
            &json!({"op": "submit", "req": "r", "intent": {"id": "bad", "account": "dev0",
            "kind": "transfer", "to": "0x12", "value_wei": "-1"}}),
        )
        .await
        .unwrap();
        collect_until_final(&mut desk, &ids, Duration::from_secs(60)).await
    });
    for f in frames.values().flatten() {
        said.push_str(&f.to_string());
    }
    assert_eq!(
        frames["ok-1"].last().unwrap()["state"],
        "confirmed",
        "{frames:?}"
    );
    for id in ["priv-1", "hsm-1", "kms-1"] {
        assert_eq!(
            frames[id].last().unwrap()["state"],
            "confirmed",
            "{id}: {frames:?}"
        );
    }
    let status = h.rt.block_on(async {
        desk.send(&json!({"op": "status", "req": "s", "id": "ok-1"}))
            .await
            .unwrap();
        reply(&mut desk, "s").await
    });
    said.push_str(&status.to_string());
    // Refused upgrades: a forged and an expired token; their bodies are kept.
    let forged = engine::auth::JwtAuth::new(b"forged-secret-0123456789").issue(
        "eve",
        engine::auth::Roles::all(),
        60,
    );
    assert!(h.rt.block_on(Desk::connect(&h.url, Some(&forged))).is_err());
    assert!(
        h.rt.block_on(Desk::connect(&h.url, Some("not.a.token")))
            .is_err()
    );
    for path in ["/metrics", "/health", "/v1/latency"] {
        said.push_str(&http_get(h.addr(), path));
    }
    let token = h.token.clone();
    drop(desk);
    drop(h); // flushes the journal and the audit log
    drop(sim);
    drop(moto);

    let mut written = Vec::new();
    every_file(dir.path(), &mut written);
    written.retain(|(p, _)| {
        !["audit.key", "relay.key", "hsm-pin", "aws-secret"]
            .iter()
            .any(|k| p.ends_with(k))
    });
    assert!(
        written.iter().any(|(p, _)| p.contains("journal"))
            && written.iter().any(|(p, _)| p.contains("audit")),
        "the run wrote its journal and audit log: {:?}",
        written.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    let log_text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(log_text.len() > 1_000, "the run logged: {log_text}");

    let mut secrets: Vec<(String, String)> = vec![
        ("JWT secret".into(), SECRET.into()),
        ("desk token".into(), token.clone()),
        (
            "desk token signature".into(),
            token.rsplit('.').next().unwrap().into(),
        ),
        ("audit key".into(), audit_secret.clone()),
        ("relay-auth key".into(), relay_secret.clone()),
        ("HSM user PIN".into(), softhsm::USER_PIN.into()),
        ("AWS secret access key".into(), kms_secret.into()),
    ];
    for (i, k) in venues::DEV_PRIVATE_KEYS[..5].iter().enumerate() {
        secrets.push((
            format!("custody key of dev{i}"),
            k.trim_start_matches("0x").to_lowercase(),
        ));
    }
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("log lines".into(), log_text.into_bytes()),
        ("desk frames and HTTP bodies".into(), said.into_bytes()),
        ("configuration Debug".into(), debug_cfg.into_bytes()),
    ];
    places.extend(written);
    for (place, bytes) in &places {
        let hay = String::from_utf8_lossy(bytes).to_lowercase();
        for (what, secret) in &secrets {
            if let Some(at) = hay.find(&secret.to_lowercase()) {
                let line_start = hay[..at].rfind('\n').map_or(0, |i| i + 1);
                let line_end = hay[at..].find('\n').map_or(hay.len(), |i| at + i);
                panic!(
                    "{what} found in {place}: {}",
                    &hay[line_start..line_end.min(line_start + 400)]
                );
            }
            // Raw bytes too (a key written in binary).
            if let Ok(raw) = hex::decode(secret) {
                assert!(
                    !bytes.windows(raw.len()).any(|w| w == raw.as_slice()),
                    "{what} found in binary in {place}"
                );
            }
        }
    }
}
