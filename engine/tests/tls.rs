//! TLS 1.3 on the desk listener, with real rustls clients against the engine on a real
//! anvil: `wss://` serves desks (JWT still required), TLS 1.2 and plain `ws://` are
//! refused, client certificates (mTLS) are checked against the configured CA, and a
//! certificate reload keeps live sessions while new connections get the new certificate.
//! Every certificate is a throwaway made here (rcgen).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use engine::config::Layout;
use engine::desk::{Desk, DeskError};
use engine::tls::TlsSettings;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use serde_json::json;

/// A CA and what it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// A leaf for `usage`, valid for 127.0.0.1 and localhost.
    fn issue(&self, usage: ExtendedKeyUsagePurpose) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, "desk edge");
        p.extended_key_usages = vec![usage];
        (p.signed_by(&key, &self.cert, &self.key).unwrap(), key)
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

/// Writes a server certificate from `ca` into `dir`; returns the settings naming it.
fn server_files(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> TlsSettings {
    let (cert, key) = ca.issue(ExtendedKeyUsagePurpose::ServerAuth);
    let cert_file = dir.join("server.pem");
    let key_file = dir.join("server.key");
    std::fs::write(&cert_file, cert.pem()).unwrap();
    write_private(&key_file, &key.serialize_pem());
    let client_ca_file = client_ca.map(|c| {
        let f: PathBuf = dir.join("clients-ca.pem");
        std::fs::write(&f, c.cert.pem()).unwrap();
        f
    });
    TlsSettings {
        cert_file,
        key_file,
        client_ca_file,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client trusting `ca`, speaking `version`, presenting `client` if given.
fn client(
    ca: &Ca,
    version: &'static rustls::SupportedProtocolVersion,
    client: Option<&(rcgen::Certificate, KeyPair)>,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match client {
        Some((cert, key)) => b
            .with_client_auth_cert(
                vec![cert.der().clone()],
                PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

fn wss(h: &Harness) -> String {
    format!("wss://{}/v1/ws", h.addr())
}

/// A ping answered on `desk`.
fn pong(h: &Harness, desk: &mut Desk) {
    let r = h.rt.block_on(async {
        desk.send(&json!({"op": "ping", "req": "p"})).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), desk.recv()).await
    });
    assert_eq!(r.unwrap().unwrap()["op"], "pong");
}

/// A connection attempt, its outcome reduced to a word.
fn attempt(h: &Harness, cfg: Arc<rustls::ClientConfig>, token: Option<&str>) -> String {
    let res = h.rt.block_on(async {
        let mut d = Desk::connect_tls(&wss(h), token, cfg).await?;
        // With TLS 1.3 a refused client certificate may surface on the first read.
        d.send(&json!({"op": "ping"})).await?;
        d.recv().await
    });
    match res {
        Ok(v) if v["op"] == "pong" => "served".into(),
        Ok(v) => format!("answered {v}"),
        Err(DeskError::Refused(code)) => format!("http {code}"),
        Err(_) => "refused".into(),
    }
}

#[test]
fn wss_serves_desks_over_tls13_and_refuses_tls12_and_plain_ws() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let settings = server_files(dir.path(), &ca, None);
    let h = Harness::start_with(Layout::Auto, |cfg| cfg.tls = Some(settings));

    let tls13 = client(&ca, &rustls::version::TLS13, None);
    assert_eq!(attempt(&h, Arc::clone(&tls13), Some(&h.token)), "served");
    // A whole intent over TLS, to confirmation on the chain.
    let mut desk =
        h.rt.block_on(Desk::connect_tls(&wss(&h), Some(&h.token), tls13.clone()))
            .unwrap();
    let ids = vec!["tls-1".to_owned()];
    let frames = h.rt.block_on(async {
        desk.send(&submit(transfer("tls-1", "dev0", 5, 1_000)))
            .await
            .unwrap();
        collect_until_final(&mut desk, &ids, Duration::from_secs(60)).await
    });
    assert_eq!(
        frames["tls-1"].last().unwrap()["state"],
        "confirmed",
        "{frames:?}"
    );

    // JWT still required under TLS.
    assert_eq!(attempt(&h, Arc::clone(&tls13), None), "http 401");
    // TLS 1.2 and below: the handshake fails.
    assert_eq!(
        attempt(
            &h,
            client(&ca, &rustls::version::TLS12, None),
            Some(&h.token)
        ),
        "refused"
    );
    // A client that does not trust the server's CA refuses it (the certificate is real).
    let other = Ca::new("someone else");
    assert_eq!(
        attempt(
            &h,
            client(&other, &rustls::version::TLS13, None),
            Some(&h.token)
        ),
        "refused"
    );
    // Plain ws:// to the TLS port gets nowhere.
    let plain = h.rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            Desk::connect(&format!("ws://{}/v1/ws", h.addr()), Some(&h.token)),
        )
        .await
    });
    assert!(
        !matches!(plain, Ok(Ok(_))),
        "plain WebSocket on the TLS port"
    );
    // The engine kept serving through all of that.
    pong(&h, &mut desk);
}

#[test]
fn with_a_client_ca_only_desks_holding_its_certificates_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let desks_ca = Ca::new("desks CA");
    let settings = server_files(dir.path(), &server_ca, Some(&desks_ca));
    let h = Harness::start_with(Layout::Auto, |cfg| cfg.tls = Some(settings));

    let good = desks_ca.issue(ExtendedKeyUsagePurpose::ClientAuth);
    let tls13 = &rustls::version::TLS13;
    assert_eq!(
        attempt(&h, client(&server_ca, tls13, Some(&good)), Some(&h.token)),
        "served"
    );
    // The certificate does not replace the token.
    assert_eq!(
        attempt(&h, client(&server_ca, tls13, Some(&good)), None),
        "http 401"
    );
    // No certificate, or one from another CA: refused in the handshake.
    assert_eq!(
        attempt(&h, client(&server_ca, tls13, None), Some(&h.token)),
        "refused"
    );
    let stranger = Ca::new("stranger CA").issue(ExtendedKeyUsagePurpose::ClientAuth);
    assert_eq!(
        attempt(
            &h,
            client(&server_ca, tls13, Some(&stranger)),
            Some(&h.token)
        ),
        "refused"
    );
}

#[test]
fn a_reload_keeps_live_sessions_and_new_connections_get_the_new_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old CA");
    let settings = server_files(dir.path(), &old_ca, None);
    let h = Harness::start_with(Layout::Auto, |cfg| cfg.tls = Some(settings));
    let tls13 = &rustls::version::TLS13;
    let mut live =
        h.rt.block_on(Desk::connect_tls(
            &wss(&h),
            Some(&h.token),
            client(&old_ca, tls13, None),
        ))
        .unwrap();
    pong(&h, &mut live);

    // The certificate is renewed under another CA and reloaded.
    let new_ca = Ca::new("new CA");
    server_files(dir.path(), &new_ca, None);
    h.engine().reload_tls().unwrap();
    pong(&h, &mut live);
    assert_eq!(
        attempt(&h, client(&old_ca, tls13, None), Some(&h.token)),
        "refused",
        "new connections get the new certificate"
    );
    assert_eq!(
        attempt(&h, client(&new_ca, tls13, None), Some(&h.token)),
        "served"
    );

    // A broken renewal is refused and the certificate in force stays.
    std::fs::write(dir.path().join("server.pem"), "not a certificate").unwrap();
    let e = h.engine().reload_tls().unwrap_err().to_string();
    assert!(e.contains("cert_file") && e.contains("server.pem"), "{e}");
    assert_eq!(
        attempt(&h, client(&new_ca, tls13, None), Some(&h.token)),
        "served"
    );
    pong(&h, &mut live);
}

#[test]
fn a_key_file_others_can_read_and_a_plain_listener_off_loopback_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let settings = server_files(dir.path(), &ca, None);
    assert!(engine::tls::server_config(&settings).is_ok());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&settings.key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = engine::tls::server_config(&settings)
        .unwrap_err()
        .to_string();
    assert!(e.contains("key_file") && e.contains("server.key"), "{e}");
    assert!(!e.contains("PRIVATE KEY"), "no key material in errors: {e}");

    let mut cfg = engine::dev::dev_config(
        "ws://127.0.0.1:1",
        "0.0.0.0:7300".parse().unwrap(),
        SECRET.into(),
    );
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("loopback") && e.contains("[tls]"), "{e}");
    std::fs::set_permissions(&settings.key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    cfg.tls = Some(settings);
    cfg.validate().expect("with [tls] any address may be used");
}
