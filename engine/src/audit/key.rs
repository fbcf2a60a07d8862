//! The audit key: a dedicated secp256k1 key that signs every segment head, so that a log
//! rewritten from some point on (every hash recomputed) no longer carries valid heads.
//!
//! What is signed, exactly: the 32-byte digest
//!
//! ```text
//! keccak256( prev_segment_last_hash (32 bytes) || segment number (8 bytes, big-endian) )
//! ```
//!
//! signed as a prehash (no EIP-191 prefix), written as `"sig":"0x<r 32 bytes><s 32
//! bytes><v 1 byte, 27 or 28>"` (130 hex digits) next to `"signer":"0x<address>"`, the
//! Ethereum address of the key. Anyone can check a head with the address alone
//! ([`recover_head_signer`]).
//!
//! Invariants: the key is read from a file that group and others may not access (the
//! same rule as `relay_auth_key_file`); it holds no funds and signs nothing else; no error
//! or `Debug` output carries its secret.

use std::path::{Path, PathBuf};

use alloy_primitives::{Address, B256, Signature, keccak256};
use signers::Signer as _;

/// A key file that cannot be used; the message names the file and never its content.
#[derive(Debug, thiserror::Error)]
#[error("audit_key_file: {}: {why}", path.display())]
pub struct KeyFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub why: String,
}

/// The audit key (its secret never leaves this value; `Debug` shows the address only).
#[derive(Clone)]
pub struct AuditKey {
    signer: signers::LocalSigner,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("address", &self.address())
            .finish_non_exhaustive()
    }
}

/// Refuses a secret file that group or others may read or write (unix), naming its mode.
pub fn check_private_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "group or others may access it (mode {mode:04o}); make it 0600"
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    Ok(())
}

/// Reads a 32-byte secret in hex (`0x` optional, surrounding whitespace ignored) from a
/// file that group and others cannot access ([`check_private_file`]). The error never
/// carries the file's content.
pub fn read_private_secret(path: &Path) -> Result<[u8; 32], String> {
    check_private_file(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let t = text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    let mut secret = [0u8; 32];
    if hex::decode_to_slice(t, &mut secret).is_err() {
        return Err("expected the 32-byte secret in hex".into());
    }
    Ok(secret)
}

impl AuditKey {
    /// Reads the key from `path`: the 32-byte secret in hex (`0x` optional, surrounding
    /// whitespace ignored). A file that group or others may access is refused.
    pub fn load(path: &Path) -> Result<AuditKey, KeyFileError> {
        let bad = |why: String| KeyFileError {
            path: path.to_path_buf(),
            why,
        };
        let mut secret = read_private_secret(path).map_err(bad)?;
        let key = Self::from_secret(&B256::from(secret))
            .map_err(|_| bad("not a valid secp256k1 secret key".into()));
        secret.fill(0);
        key
    }

    /// A key from its 32-byte secret.
    pub fn from_secret(secret: &B256) -> Result<AuditKey, signers::SignerError> {
        Ok(AuditKey {
            signer: signers::LocalSigner::from_bytes("audit", secret, signers::LocalCurve::K256)?,
        })
    }

    /// The key's Ethereum address.
    pub fn address(&self) -> Address {
        self.signer.address()
    }

    /// Signs the head of `segment`, whose previous segment ended with `prev_last_hash`:
    /// 65 bytes `r || s || v` (v = 27 or 28).
    pub fn sign_head(
        &self,
        prev_last_hash: &[u8; 32],
        segment: u64,
    ) -> Result<[u8; 65], signers::SignerError> {
        let sig = self
            .signer
            .sign_hash(&head_digest(prev_last_hash, segment))?;
        Ok(sig.as_bytes())
    }
}

/// The digest a segment head's signature is over:
/// `keccak256(prev_last_hash || segment as 8 big-endian bytes)`.
pub fn head_digest(prev_last_hash: &[u8; 32], segment: u64) -> B256 {
    let mut m = [0u8; 40];
    m[..32].copy_from_slice(prev_last_hash);
    m[32..].copy_from_slice(&segment.to_be_bytes());
    keccak256(m)
}

/// The address that signed the head of `segment` (see [`head_digest`]), from its 65-byte
/// signature.
pub fn recover_head_signer(
    prev_last_hash: &[u8; 32],
    segment: u64,
    sig: &[u8; 65],
) -> Result<Address, String> {
    let s = Signature::from_raw_array(sig).map_err(|e| e.to_string())?;
    s.recover_address_from_prehash(&head_digest(prev_last_hash, segment))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_signature_recovers_to_the_key_and_only_for_its_segment() {
        let key = AuditKey::from_secret(&B256::repeat_byte(7)).unwrap();
        let prev = [9u8; 32];
        let sig = key.sign_head(&prev, 3).unwrap();
        assert_eq!(recover_head_signer(&prev, 3, &sig).unwrap(), key.address());
        assert_ne!(
            recover_head_signer(&prev, 4, &sig).ok(),
            Some(key.address())
        );
        assert!(!format!("{key:?}").contains("0707"));
    }
}
