//! Key custody for the engine: one [`Signer`] trait, one backend per custody boundary.
//!
//! The signing stage holds an `Arc<dyn Signer>` per account and calls
//! [`Signer::sign_hash`] with the 32-byte EIP-1559 signing hash of a transaction it built.
//! The signer returns a recoverable secp256k1 signature (`r`, `s`, `y_parity`), which the
//! stage attaches to the transaction.
//!
//! # Design
//!
//! - A small trait with one required signing method, [`Signer::sign_hash`], plus identity
//!   ([`Signer::address`], [`Signer::key_id`]) and default methods built on top
//!   ([`Signer::sign_hash_checked`]), in the manner of alloy's `SignerSync`.
//! - The trait is synchronous: it is meant for *warm* backends whose call completes in
//!   microseconds on the stage's own thread (a local key; a PKCS#11 session that is
//!   already open and logged in). Backends that go over the network are driven beside the
//!   stage and are not called through this trait on the hot path.
//! - Backends:
//!   - [`LocalSigner`]: a key in process memory, signed with libsecp256k1
//!     ([`LocalCurve::Secp256k1`], about 2.5x faster than k256 here) or with the pure-Rust
//!     k256 ([`LocalCurve::K256`]). For development and for hot wallets whose policy allows
//!     keys in memory.
//!   - `hsm::HsmSigner` (feature `hsm`): a secp256k1 key generated inside a PKCS#11 token,
//!     signed through a warm pool of logged-in sessions ([`Signer`]).
//!   - `kms::KmsSigner` (feature `kms`): an AWS KMS key, `Sign` with `MessageType=DIGEST`
//!     ([`AsyncSigner`]).
//!   - `mpc::MpcSigner` (feature `mpc`): threshold ECDSA (cggmp21); parties talk over
//!     loopback, a presignature pool is kept filled, each presignature is used once
//!     ([`AsyncSigner`]).
//!
//!   `signers/README.md` has each backend's design, tests and measured latency.
//! - `worker::AsyncWorker` (feature `async`, on with `kms` and `mpc`) drives any
//!   [`AsyncSigner`] on a small runtime of its own and hands results back in order per
//!   account without blocking the caller.
//! - [`failover`]: one account's primary key and a standby for the same address in
//!   another boundary ([`AnySigner`], [`failover::FailoverSigner`],
//!   [`failover::FailoverAsync`]); the standby signs while the primary is unavailable.
//!
//! # Invariants
//!
//! - A signer never exposes key material: no method returns it, `Debug` never prints it,
//!   and errors carry the key id, never the key.
//! - [`Signer::address`] is derived from the key once at construction and is the address
//!   every signature of this signer recovers to ([`Signer::sign_hash_checked`] verifies it).
//! - Signatures are low-s normalised (EIP-2): both curve back ends produce low-s values.
//! - `sign_hash` does not allocate (libsecp256k1 uses its static context; k256 signs on
//!   the stack).
#![deny(missing_docs)]

mod error;
pub mod failover;
#[cfg(feature = "hsm")]
pub mod hsm;
pub mod kek;
#[cfg(feature = "kms")]
pub mod kms;
mod local;
#[cfg(feature = "mpc")]
pub mod mpc;
#[cfg(feature = "async")]
pub mod worker;

pub use alloy_primitives::{Address, B256, Signature};
pub use error::SignerError;
pub use failover::AnySigner;
pub use local::{LocalCurve, LocalSigner};

/// A boxed future returned by [`AsyncSigner::sign_hash_async`].
pub type SignFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Signature, SignerError>> + Send + 'static>,
>;

/// Which custody boundary a signer's key lives in. Reported in events and audit records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Key held in this process's memory.
    Local,
    /// Key generated inside a PKCS#11 token (HSM); never exported.
    Hsm,
    /// Key held by AWS KMS (or an API-compatible service); signed with `Sign`/`DIGEST`.
    Kms,
    /// Threshold ECDSA (cggmp21): the key exists only as shares held by separate parties.
    Mpc,
}

impl Backend {
    /// Stable lower-case name for configuration, logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Hsm => "hsm",
            Backend::Kms => "kms",
            Backend::Mpc => "mpc",
        }
    }
}

/// Signs 32-byte hashes with one secp256k1 key that never leaves its custody boundary.
///
/// Implementations must be cheap to call from a pipeline stage: no blocking network round
/// trip, no lock held across the signing operation by the caller's thread beyond what the
/// backend itself needs.
pub trait Signer: Send + Sync + std::fmt::Debug {
    /// The Ethereum address of the key (derived once from its public key).
    fn address(&self) -> Address;

    /// A stable, non-secret identifier of the key (a label, a KMS key id, …) for logs and audit.
    fn key_id(&self) -> &str;

    /// The custody boundary this key lives in.
    fn backend(&self) -> Backend;

    /// Signs a 32-byte prehash, returning a recoverable, low-s signature.
    fn sign_hash(&self, hash: &B256) -> Result<Signature, SignerError>;

    /// How many times a standby signed because this signer's primary was unavailable
    /// (fail-over pairs only; 0 otherwise). For metrics.
    fn failovers(&self) -> u64 {
        0
    }

    /// Moves signing to the standby for the pair's retry period, as if the primary had
    /// reported itself unavailable (an automatic action of the engine's SLO monitor).
    /// Returns whether it moved: false without a standby or when the standby signs already.
    fn fail_over(&self) -> bool {
        false
    }

    /// Signs and verifies that the signature recovers to [`Signer::address`].
    ///
    /// Costs one public-key recovery on top of the signature; used where a backend's output
    /// crosses a boundary we do not control, and in tests.
    fn sign_hash_checked(&self, hash: &B256) -> Result<Signature, SignerError> {
        let sig = self.sign_hash(hash)?;
        let recovered =
            sig.recover_address_from_prehash(hash)
                .map_err(|e| SignerError::Recovery {
                    key_id: self.key_id().to_owned(),
                    reason: e.to_string(),
                })?;
        if recovered != self.address() {
            return Err(SignerError::AddressMismatch {
                key_id: self.key_id().to_owned(),
                expected: self.address(),
                recovered,
            });
        }
        Ok(sig)
    }
}

/// A signer whose call crosses a network or process boundary (KMS over HTTP, MPC parties
/// over loopback): the request is started and completes later, on an async worker beside
/// the signing stage, never on the stage's thread.
pub trait AsyncSigner: Send + Sync + std::fmt::Debug {
    /// The Ethereum address of the key (derived once from its public key, read at start).
    fn address(&self) -> Address;

    /// A stable, non-secret identifier of the key for logs and audit.
    fn key_id(&self) -> &str;

    /// The custody boundary this key lives in.
    fn backend(&self) -> Backend;

    /// Starts signing a 32-byte prehash; the future yields a recoverable, low-s signature
    /// that has been checked to recover to [`AsyncSigner::address`].
    fn sign_hash_async(&self, hash: B256) -> SignFuture;

    /// How many requests started now would be served without waiting for a resource the
    /// backend prepares ahead (an MPC presignature), or `None` when the backend has no such
    /// resource. The signing stage compares it with its own requests in flight to tell a
    /// desk that an intent waits (`signing_wait`).
    fn available(&self) -> Option<usize> {
        None
    }

    /// How many times a standby signed because the primary was unavailable (fail-over
    /// pairs only; 0 otherwise). For metrics.
    fn failovers(&self) -> u64 {
        0
    }

    /// Moves signing to the standby for the pair's retry period, as if the primary had
    /// reported itself unavailable (an automatic action of the engine's SLO monitor).
    /// Returns whether it moved: false without a standby or when the standby signs already.
    fn fail_over(&self) -> bool {
        false
    }
}
