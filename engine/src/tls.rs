//! TLS on the desk listener: `wss://` and `https://` on the one port, TLS 1.3 only
//! (rustls with ring), the certificate chain and key from PEM files, and optional client
//! certificates (mTLS) checked against a CA file, on top of the JWT.
//!
//! Invariants:
//! - Nothing but TLS 1.3 is offered: a client that cannot speak it fails the handshake.
//! - With `client_ca_file`, a connection without a client certificate issued by that CA
//!   fails the handshake, before any HTTP is read.
//! - The key file must not be readable by group or others; no error carries its content.
//! - [`TlsReloader::reload`] swaps the configuration for connections accepted after it;
//!   live sessions keep theirs. A reload that fails leaves the previous one in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use serde::Deserialize;

/// `[tls]` in the configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1); group and others must have no access.
    pub key_file: PathBuf,
    /// PEM CA certificates: when set, every desk must present a client certificate
    /// issued by one of them (mTLS), besides its JWT.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// Why the TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("tls.{field}: {path}: {why}")]
    File {
        /// The setting (`cert_file`, `key_file`, `client_ca_file`).
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong (never the file's content).
        why: String,
    },
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("tls: {0}")]
    Rustls(String),
}

fn file_error(field: &'static str, path: &Path, why: impl ToString) -> TlsError {
    TlsError::File {
        field,
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn read_certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(field, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(field, path, e))?;
    if certs.is_empty() {
        return Err(file_error(field, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

/// Builds a TLS 1.3 server configuration from `s`.
pub fn server_config(s: &TlsSettings) -> Result<ServerConfig, TlsError> {
    let certs = read_certs("cert_file", &s.cert_file)?;
    crate::audit::key::check_private_file(&s.key_file)
        .map_err(|why| file_error("key_file", &s.key_file, why))?;
    let key = PrivateKeyDer::from_pem_file(&s.key_file)
        .map_err(|_| file_error("key_file", &s.key_file, "no PEM private key in it"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match &s.client_ca_file {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs("client_ca_file", ca)? {
                roots
                    .add(c)
                    .map_err(|e| file_error("client_ca_file", ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The listener's TLS configuration, reloadable.
#[derive(Debug)]
pub struct TlsReloader {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
}

impl TlsReloader {
    /// Loads the files named by `settings`.
    pub fn load(settings: TlsSettings) -> Result<Self, TlsError> {
        let cfg = server_config(&settings)?;
        Ok(Self {
            settings,
            current: RwLock::new(Arc::new(cfg)),
        })
    }

    /// Reads the files again (a renewed certificate); connections accepted from now on
    /// use them, live ones keep theirs. On error the previous configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cfg = Arc::new(server_config(&self.settings)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = cfg;
        Ok(())
    }

    /// The acceptor for the next connection (once per connection, never per message).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let cfg = Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()));
        tokio_rustls::TlsAcceptor::from(cfg)
    }
}
