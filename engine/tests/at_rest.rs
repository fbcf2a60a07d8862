//! Encryption at rest, end to end: a real engine on a real anvil with `[at_rest]` set,
//! its key-encryption key in a real SoftHSM2 token or a real moto KMS server. After a run,
//! every byte the journal and the audit log wrote is read raw: no intent id, principal,
//! address or record field may be in clear. The audit chain still verifies (decrypted with
//! the same KEK), a restart replays the sealed journal, and without the KEK the engine
//! and `engine audit verify` refuse, naming what is missing.
#![cfg(all(feature = "hsm", feature = "kms"))]

mod common;
#[path = "../../signers/tests/support/moto.rs"]
mod moto;
#[path = "../../signers/tests/support/softhsm.rs"]
mod softhsm;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{SECRET, collect_until_final, submit, transfer};
use engine::atrest::Sealer;
use engine::auth::{JwtAuth, Roles};
use engine::config::{AtRestConfig, JournalSettings, JournalSync, KeyConfig};
use engine::desk::Desk;
use engine::{Config, Engine, dev};
use signers::hsm::HsmKek;
use signers::kek::KeyWrap;
use signers::kms::KmsKek;
use venues::{Anvil, AnvilConfig, DEV_ADDRESSES};

const KEK_LABEL: &str = "engine-at-rest-kek";

fn config(anvil: &Anvil, dir: &Path, kek: Option<KeyConfig>) -> Config {
    let mut cfg = dev::dev_config(
        &anvil.ws_url(),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SECRET.into(),
    );
    cfg.confirmations = 1;
    cfg.journal = Some(JournalSettings {
        dir: dir.join("journal"),
        segment_bytes: 1 << 20,
        sync: JournalSync::Group,
        group_commit_us: 200,
        interval_ms: 10,
        compact_every_ms: 0,
    });
    cfg.audit_dir = Some(dir.join("audit"));
    cfg.at_rest = kek.map(|kek| AtRestConfig { kek });
    cfg
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn desk(rt: &tokio::runtime::Runtime, e: &Engine) -> Desk {
    let url = format!("ws://{}/v1/ws", e.local_addr());
    let token = JwtAuth::new(SECRET.as_bytes()).issue("desk-a", Roles::all(), 3600);
    rt.block_on(Desk::connect(&url, Some(&token))).unwrap()
}

/// Every file under `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            let b = std::fs::read(&p).unwrap();
            out.push((p, b));
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Runs intents through a sealed engine, then checks the files, the chain, a restart and
/// the refusals without the KEK. Returns the audit directory's parent (kept alive).
fn sealed_run(kek: KeyConfig, sealer: Sealer) -> tempfile::TempDir {
    let anvil = Anvil::spawn(&AnvilConfig::with_block_time(Duration::from_millis(100))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let e = Engine::start(config(&anvil, dir.path(), Some(kek.clone()))).unwrap();
    let ids: Vec<String> = (0..6).map(|i| format!("sealed-order-{i:04}")).collect();
    let mut d = desk(&rt, &e);
    let frames = rt.block_on(async {
        for (i, id) in ids.iter().enumerate() {
            d.send(&submit(transfer(id, "dev0", 5, 4_242_000 + i as u128)))
                .await
                .unwrap();
        }
        collect_until_final(&mut d, &ids, Duration::from_secs(60)).await
    });
    for id in &ids {
        assert_eq!(frames[id].last().unwrap()["state"], "confirmed", "{id}");
    }
    drop(d);
    e.shutdown().unwrap();

    // Raw bytes: nothing of the intents in clear.
    let to = DEV_ADDRESSES[5];
    let to_hex = format!("{to:x}");
    let to_hex = to_hex.trim_start_matches("0x");
    let written = files(dir.path());
    assert!(
        written
            .iter()
            .any(|(p, _)| p.starts_with(dir.path().join("journal")))
            && written
                .iter()
                .any(|(p, _)| p.starts_with(dir.path().join("audit"))),
        "both the journal and the audit log wrote files: {:?}",
        written.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for (path, bytes) in &written {
        let clear: [(&str, &[u8]); 7] = [
            ("an intent id", b"sealed-order-"),
            ("the principal", b"desk-a"),
            ("the account name", b"dev0"),
            ("the destination address (hex)", to_hex.as_bytes()),
            ("the destination address (bytes)", to.as_slice()),
            ("an audit field", b"\"kind\""),
            ("an audit field", b"\"prev\""),
        ];
        for (what, needle) in clear {
            assert!(
                !find(bytes, needle),
                "{what} is in clear in {}",
                path.display()
            );
        }
    }

    // The audit chain, over the plaintext, verifies once decrypted with the KEK …
    let audit_dir = dir.path().join("audit");
    let summary = engine::audit::verify(&audit_dir, None, Some(&sealer)).unwrap();
    assert!(summary.records > 6, "{summary:?}");
    // … and cannot be read without it.
    let refused = engine::audit::verify(&audit_dir, None, None).unwrap_err();
    assert!(
        refused.to_string().contains("key-encryption key"),
        "{refused}"
    );

    // A restart replays the sealed journal: the intents are known, with their last state.
    let e = Engine::start(config(&anvil, dir.path(), Some(kek))).unwrap();
    let mut d = desk(&rt, &e);
    rt.block_on(async {
        d.send(&submit(transfer(&ids[0], "dev0", 5, 4_242_000)))
            .await
            .unwrap();
        let ack = common::reply(&mut d, &ids[0]).await;
        assert_eq!(ack["op"], "ack", "{ack}");
        assert_eq!(ack["duplicate"], true, "{ack}");
    });
    drop(d);
    e.shutdown().unwrap();
    engine::audit::verify(&audit_dir, None, Some(&sealer)).unwrap();

    // Without the KEK the engine does not start on sealed files, and says why.
    let err = match Engine::start(config(&anvil, dir.path(), None)) {
        Ok(e) => {
            let _ = e.shutdown();
            panic!("an engine started on a sealed journal without its KEK")
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains("key-encryption key"), "{err}");

    // Six transfers on chain, each once.
    let mut rpc = anvil.rpc().unwrap();
    assert_eq!(
        rpc.transaction_count(DEV_ADDRESSES[0], "latest").unwrap(),
        6
    );
    dir
}

/// Runs the engine binary; its exit code and what it printed.
fn engine_cli(args: &[&str]) -> (Option<i32>, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_engine"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code(), text)
}

#[test]
fn sealed_under_an_hsm_kek_nothing_is_in_clear_and_the_chain_verifies() {
    softhsm::isolated(
        "sealed_under_an_hsm_kek_nothing_is_in_clear_and_the_chain_verifies",
        || {
            let token = softhsm::Token::init(softhsm::TOKEN_LABEL);
            let keys = tempfile::tempdir().unwrap();
            let pin = keys.path().join("hsm-pin");
            std::fs::write(&pin, format!("{}\n", softhsm::USER_PIN)).unwrap();
            // The operator's path: the KEK is made, and checked, by the engine's own
            // commands from the configuration file (this child process's SoftHSM store).
            let config = keys.path().join("engine.toml");
            std::fs::write(
                &config,
                format!(
                    "jwt_secret = \"{SECRET}\"\nnode_ws_url = \"ws://127.0.0.1:1\"\n\
                     listen = \"127.0.0.1:0\"\n[at_rest]\n\
                     kek = {{ backend = \"hsm\", module = \"{}\", token_label = \"{}\", \
                     key_label = \"{KEK_LABEL}\", pin_file = \"hsm-pin\" }}\n\
                     [[accounts]]\nname = \"dev0\"\nmax_value_wei = \"1\"\n\
                     key = {{ backend = \"local\", secret_hex = \"{}\" }}\n",
                    softhsm::module_path().display(),
                    softhsm::TOKEN_LABEL,
                    venues::DEV_PRIVATE_KEYS[0],
                ),
            )
            .unwrap();
            let mut perms = std::fs::metadata(&config).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
            std::fs::set_permissions(&config, perms).unwrap();
            let cfg_arg = config.to_str().unwrap();
            let (code, out) = engine_cli(&["kek", "check", "--config", cfg_arg]);
            assert_eq!(code, Some(1), "no KEK yet: {out}");
            assert!(out.contains("no AES secret key with this label"), "{out}");
            let (code, out) = engine_cli(&["kek", "generate", "--config", cfg_arg]);
            assert_eq!(code, Some(0), "{out}");
            assert!(
                out.contains(&format!("hsm:{}/{KEK_LABEL}", softhsm::TOKEN_LABEL)),
                "{out}"
            );
            let (code, out) = engine_cli(&["kek", "generate", "--config", cfg_arg]);
            assert_eq!(code, Some(1), "a second KEK under the same label: {out}");
            assert!(out.contains("exists already"), "{out}");
            let (code, out) = engine_cli(&["kek", "check", "--config", cfg_arg]);
            assert_eq!(code, Some(0), "{out}");
            let kek = KeyConfig::Hsm {
                module: softhsm::module_path(),
                token_label: softhsm::TOKEN_LABEL.into(),
                key_label: KEK_LABEL.into(),
                pin_file: Some(pin),
                pin_env: None,
                sessions: 1,
            };
            let hsm = HsmKek::open(&token.config(KEK_LABEL, 1)).unwrap();
            assert_eq!(
                hsm.id(),
                format!("hsm:{}/{KEK_LABEL}", softhsm::TOKEN_LABEL)
            );
            let run = sealed_run(kek, Sealer::new(Arc::new(hsm)));
            // `engine audit verify` reads the sealed log with the configuration's KEK.
            let audit = run.path().join("audit");
            let audit_arg = audit.to_str().unwrap();
            let (code, out) = engine_cli(&["audit", "verify", "--config", cfg_arg, audit_arg]);
            assert_eq!(code, Some(0), "{out}");
            let (code, out) = engine_cli(&["audit", "verify", audit_arg]);
            assert_eq!(code, Some(1), "{out}");
            assert!(out.contains("--config"), "{out}");
        },
    );
}

#[test]
fn sealed_under_a_kms_kek_nothing_is_in_clear_and_the_chain_verifies() {
    let moto = moto::Moto::spawn();
    let key_id = KmsKek::create_key(&moto.config(""), "engine at-rest KEK test").unwrap();
    let keys = tempfile::tempdir().unwrap();
    let secret = keys.path().join("aws-secret");
    std::fs::write(&secret, "testing\n").unwrap();
    let kek = KeyConfig::Kms {
        key_id: key_id.clone(),
        region: moto::REGION.into(),
        endpoint_url: Some(moto.endpoint()),
        access_key_id: Some("testing".into()),
        secret_access_key_file: Some(secret),
        operation_timeout_ms: 5_000,
    };
    let kms = KmsKek::connect(&moto.config(&key_id)).unwrap();
    sealed_run(kek, Sealer::new(Arc::new(kms)));
}

#[test]
fn a_wrapped_key_changed_by_one_bit_does_not_unwrap() {
    let moto = moto::Moto::spawn();
    let key_id = KmsKek::create_key(&moto.config(""), "engine at-rest KEK test").unwrap();
    let kms = KmsKek::connect(&moto.config(&key_id)).unwrap();
    let key = signers::kek::DataKey::new([9; 32]);
    let mut wrapped = kms.wrap(&key).unwrap();
    assert!(
        !find(&wrapped, &[9; 32]),
        "the data key is in its wrapped form"
    );
    assert_eq!(kms.unwrap(&wrapped).unwrap().bytes(), key.bytes());
    let last = wrapped.len() - 1;
    wrapped[last] ^= 1;
    assert!(kms.unwrap(&wrapped).is_err());
}
