//! Key-encryption keys: the custody boundary that wraps the data keys of encrypted files.
//!
//! The engine encrypts its journal and audit segments with a fresh AES-256 data key per
//! segment and keeps only the *wrapped* data key beside the data. A [`KeyWrap`] holds the
//! key-encryption key (KEK) inside its boundary and turns a data key into its wrapped
//! form and back:
//!
//! - `hsm::HsmKek` (feature `hsm`): an AES-256 secret key generated inside a PKCS#11
//!   token (sensitive, never extractable); wrapping is `C_Encrypt` with `CKM_AES_GCM`
//!   under a random 96-bit IV.
//! - `kms::KmsKek` (feature `kms`): a `SYMMETRIC_DEFAULT` KMS key; wrapping is KMS
//!   `Encrypt` / `Decrypt` with an encryption context naming the purpose.
//!
//! # Invariants
//!
//! - The KEK never leaves its boundary: no method returns it.
//! - A data key is only ever returned to the caller that unwraps it, in a buffer zeroed
//!   on drop ([`DataKey`]); it is never logged, and no error quotes it.
//! - Wrapping is authenticated: an altered wrapped key fails to unwrap
//!   ([`SignerError::Signing`] naming the KEK), it never yields a wrong key.
//! - Calls cross into the HSM or the network: they are made when a segment is created or
//!   opened, never per record.

use std::fmt;

use crate::SignerError;

/// Length of a data key (AES-256).
pub const DATA_KEY_LEN: usize = 32;

/// A data key in the clear, zeroed when dropped. `Debug` prints nothing of it.
pub struct DataKey(Box<[u8; DATA_KEY_LEN]>);

impl DataKey {
    /// Wraps 32 key bytes (the caller zeroes its own copy).
    pub fn new(bytes: [u8; DATA_KEY_LEN]) -> DataKey {
        DataKey(Box::new(bytes))
    }

    /// The key bytes.
    pub fn bytes(&self) -> &[u8; DATA_KEY_LEN] {
        &self.0
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference into the box; a volatile
            // write keeps the compiler from eliding the zeroing of memory about to be freed.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// A key-encryption key held in a custody boundary.
pub trait KeyWrap: Send + Sync + fmt::Debug {
    /// A stable name of the KEK (`hsm:<token>/<label>`, `kms:<key id>`), stored beside
    /// each wrapped key so a reader knows which KEK to ask.
    fn id(&self) -> &str;

    /// Wraps `key`: the result may be stored anywhere.
    fn wrap(&self, key: &DataKey) -> Result<Vec<u8>, SignerError>;

    /// Unwraps what [`KeyWrap::wrap`] returned. An altered or foreign wrapped key is an
    /// error, never a wrong key.
    fn unwrap(&self, wrapped: &[u8]) -> Result<DataKey, SignerError>;
}

/// Checks an unwrapped byte string is a data key and moves it into a [`DataKey`], zeroing
/// the source.
#[cfg_attr(not(any(feature = "hsm", feature = "kms")), allow(dead_code))]
pub(crate) fn data_key_from(mut plain: Vec<u8>, kek: &str) -> Result<DataKey, SignerError> {
    let out = if plain.len() == DATA_KEY_LEN {
        let mut k = [0u8; DATA_KEY_LEN];
        k.copy_from_slice(&plain);
        let key = DataKey::new(k);
        k.iter_mut().for_each(|b| *b = 0);
        Ok(key)
    } else {
        Err(SignerError::Signing {
            key_id: kek.to_owned(),
            reason: format!(
                "the unwrapped data key is {} bytes, expected {DATA_KEY_LEN}",
                plain.len()
            ),
        })
    };
    plain.iter_mut().for_each(|b| *b = 0);
    out
}
