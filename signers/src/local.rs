//! Keys in process memory.

use alloy_primitives::{Address, B256, Signature};
use alloy_signer::SignerSync;
use alloy_signer_local::{PrivateKeySigner, Secp256k1Signer};

use crate::{Backend, Signer, SignerError};

/// Which implementation of secp256k1 a [`LocalSigner`] signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LocalCurve {
    /// libsecp256k1 (C, constant time), through alloy's `Secp256k1Signer`. The default.
    #[default]
    Secp256k1,
    /// RustCrypto's k256, through alloy's `PrivateKeySigner`.
    K256,
}

#[derive(Clone)]
enum Inner {
    Secp256k1(Secp256k1Signer),
    K256(PrivateKeySigner),
}

/// A signer whose key is held in this process's memory.
///
/// Suitable for development and for hot wallets whose policy allows it; every custody
/// account with real value belongs in an HSM, KMS or MPC backend.
#[derive(Clone)]
pub struct LocalSigner {
    inner: Inner,
    address: Address,
    key_id: String,
}

impl std::fmt::Debug for LocalSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSigner")
            .field("key_id", &self.key_id)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl LocalSigner {
    /// Builds a signer from a 32-byte secret scalar.
    pub fn from_bytes(
        key_id: impl Into<String>,
        secret: &B256,
        curve: LocalCurve,
    ) -> Result<Self, SignerError> {
        let key_id = key_id.into();
        let invalid = |key_id: String| SignerError::InvalidKey {
            key_id,
            reason: "not a valid secp256k1 secret scalar",
        };
        let inner = match curve {
            LocalCurve::Secp256k1 => Inner::Secp256k1(
                Secp256k1Signer::from_bytes(secret).map_err(|_| invalid(key_id.clone()))?,
            ),
            LocalCurve::K256 => Inner::K256(
                PrivateKeySigner::from_bytes(secret).map_err(|_| invalid(key_id.clone()))?,
            ),
        };
        let address = match &inner {
            Inner::Secp256k1(s) => s.address(),
            Inner::K256(s) => s.address(),
        };
        Ok(Self {
            inner,
            address,
            key_id,
        })
    }

    /// Builds a signer from a hex secret (64 hex digits, `0x` optional).
    pub fn from_hex(
        key_id: impl Into<String>,
        secret_hex: &str,
        curve: LocalCurve,
    ) -> Result<Self, SignerError> {
        let key_id = key_id.into();
        let digits = secret_hex.strip_prefix("0x").unwrap_or(secret_hex);
        let secret: B256 = digits.parse().map_err(|_| SignerError::InvalidKey {
            key_id: key_id.clone(),
            reason: "expected 64 hex digits",
        })?;
        Self::from_bytes(key_id, &secret, curve)
    }

    /// Which curve implementation this signer uses.
    pub fn curve(&self) -> LocalCurve {
        match self.inner {
            Inner::Secp256k1(_) => LocalCurve::Secp256k1,
            Inner::K256(_) => LocalCurve::K256,
        }
    }
}

impl Signer for LocalSigner {
    fn address(&self) -> Address {
        self.address
    }

    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn backend(&self) -> Backend {
        Backend::Local
    }

    #[inline]
    fn sign_hash(&self, hash: &B256) -> Result<Signature, SignerError> {
        let res = match &self.inner {
            Inner::Secp256k1(s) => s.sign_hash_sync(hash),
            Inner::K256(s) => s.sign_hash_sync(hash),
        };
        res.map_err(|e| SignerError::Signing {
            key_id: self.key_id.clone(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // anvil's first well-known dev key and its address.
    const DEV0: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
    const DEV0_ADDR: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";

    #[test]
    fn derives_the_well_known_address_with_both_curves() {
        for curve in [LocalCurve::Secp256k1, LocalCurve::K256] {
            let s = LocalSigner::from_hex("dev0", DEV0, curve).unwrap();
            assert_eq!(s.address(), DEV0_ADDR.parse::<Address>().unwrap());
            assert_eq!(s.curve(), curve);
        }
    }

    #[test]
    fn bad_key_names_the_key_not_the_secret() {
        let err = LocalSigner::from_hex("hot-7", "0x1234", LocalCurve::K256).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("hot-7"), "{text}");
        assert!(!text.contains("1234"), "{text}");
        let zero = format!("{:064x}", 0);
        let err = LocalSigner::from_hex("zero", &zero, LocalCurve::Secp256k1).unwrap_err();
        assert!(matches!(err, SignerError::InvalidKey { .. }));
    }

    #[test]
    fn debug_never_prints_key_material() {
        let s = LocalSigner::from_hex("dev0", DEV0, LocalCurve::Secp256k1).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains(&DEV0[..16]), "{dbg}");
    }

    proptest! {
        #[test]
        fn signatures_recover_low_s_and_agree_between_curves(hash in any::<[u8; 32]>()) {
            let hash = B256::from(hash);
            let a = LocalSigner::from_hex("a", DEV0, LocalCurve::Secp256k1).unwrap();
            let b = LocalSigner::from_hex("b", DEV0, LocalCurve::K256).unwrap();
            let sa = a.sign_hash_checked(&hash).unwrap();
            let sb = b.sign_hash_checked(&hash).unwrap();
            // RFC 6979 deterministic nonces: both implementations give the same signature.
            prop_assert_eq!(sa, sb);
            let half_n = alloy_primitives::U256::from_be_slice(&[
                0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0xff, 0xff, 0xff, 0x5d, 0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9,
                0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
            ]);
            prop_assert!(sa.s() <= half_n, "high s");
        }
    }
}
