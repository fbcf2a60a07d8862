//! Key share files: one per party, written by the ceremony, read by [`super::MpcSigner`].
//!
//! A file is JSON: a small public header (format version, party index, `n`, threshold,
//! shared public key, address) and the party's cggmp21 key share (secret share plus its
//! Paillier secret). Invariants:
//! - files are created with mode `0600` and never overwritten (`create_new`);
//! - loading refuses a file whose mode grants any access to group or others (the error
//!   names the file and its mode), so a share copied carelessly is noticed at start-up;
//! - the header is checked against the share itself (index, `n`, threshold, public key);
//! - share contents never appear in errors, logs or `Debug` output.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use alloy_primitives::Address;
use cggmp21::KeyShare;
use cggmp21::key_share::AnyKeyShare;
use cggmp21::supported_curves::Secp256k1;
use serde::{Deserialize, Serialize};

use crate::SignerError;

/// Current share file format version.
const FORMAT: u32 = 1;

/// The on-disk form of one party's share.
#[derive(Serialize, Deserialize)]
pub(crate) struct ShareFile {
    pub(crate) format: u32,
    /// Party index at key generation (0-based).
    pub(crate) index: u16,
    /// Number of parties sharing the key.
    pub(crate) parties: u16,
    /// Signers needed to sign.
    pub(crate) threshold: u16,
    /// Compressed SEC1 public key, hex.
    pub(crate) public_key: String,
    /// Ethereum address of the public key.
    pub(crate) address: Address,
    /// The cggmp21 key share (secret).
    pub(crate) key_share: KeyShare<Secp256k1>,
}

impl std::fmt::Debug for ShareFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareFile")
            .field("index", &self.index)
            .field("parties", &self.parties)
            .field("threshold", &self.threshold)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

fn config_err(path: &Path, reason: impl Into<String>) -> SignerError {
    SignerError::Config {
        what: format!("mpc share file {}", path.display()),
        reason: reason.into(),
    }
}

/// Compressed SEC1 hex of a public key.
pub(crate) fn public_key_hex(share: &KeyShare<Secp256k1>) -> String {
    hex_encode(&share.shared_public_key().to_bytes(true))
}

/// Ethereum address of a cggmp21 public key.
pub(crate) fn address_of(share: &KeyShare<Secp256k1>) -> Result<Address, String> {
    let uncompressed = share.shared_public_key().to_bytes(false);
    match uncompressed.as_bytes() {
        [0x04, xy @ ..] if xy.len() == 64 => Ok(Address::from_raw_public_key(xy)),
        _ => Err("public key is not an uncompressed SEC1 point".to_owned()),
    }
}

pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

impl ShareFile {
    /// Wraps a completed share with its header.
    pub(crate) fn new(key_share: KeyShare<Secp256k1>) -> Result<Self, String> {
        Ok(Self {
            format: FORMAT,
            index: key_share.core.i,
            parties: key_share.n(),
            threshold: key_share.min_signers(),
            public_key: public_key_hex(&key_share),
            address: address_of(&key_share)?,
            key_share,
        })
    }

    /// Writes the file with mode 0600; fails if it already exists. Syncs it to disk.
    pub(crate) fn write_new(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(&json)?;
        f.sync_all()
    }

    /// Reads and checks a share file (see the module docs for what is refused).
    pub(crate) fn load(path: &Path) -> Result<Self, SignerError> {
        let meta = fs::metadata(path).map_err(|e| config_err(path, e.to_string()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(config_err(
                path,
                format!("permissions {mode:04o} are too open; the file must be 0600 (chmod 600)"),
            ));
        }
        let bytes = fs::read(path).map_err(|e| config_err(path, e.to_string()))?;
        let file: ShareFile = serde_json::from_slice(&bytes).map_err(|e| {
            // serde_json's message names a line/column and the expected type, not content.
            config_err(
                path,
                format!(
                    "not a valid share file (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        if file.format != FORMAT {
            return Err(config_err(path, format!("unknown format {}", file.format)));
        }
        let ks = &file.key_share;
        if ks.core.i != file.index
            || ks.n() != file.parties
            || ks.min_signers() != file.threshold
            || public_key_hex(ks) != file.public_key
            || address_of(ks).ok() != Some(file.address)
        {
            return Err(config_err(
                path,
                "header does not match the key share inside",
            ));
        }
        Ok(file)
    }
}
