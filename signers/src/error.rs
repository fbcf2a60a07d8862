use alloy_primitives::Address;

/// Everything that can go wrong in a signer. Errors name the key by its id, never by its
/// material.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    /// The configured key could not be read or is not a valid secp256k1 scalar.
    #[error("key `{key_id}` is invalid: {reason}")]
    InvalidKey {
        /// Key identifier from configuration.
        key_id: String,
        /// What is wrong with it (never the key itself).
        reason: &'static str,
    },
    /// The backend refused or failed to sign.
    #[error("signing with key `{key_id}` failed: {reason}")]
    Signing {
        /// Key identifier.
        key_id: String,
        /// Backend's description of the failure.
        reason: String,
    },
    /// A signature could not be recovered to a public key.
    #[error("signature from key `{key_id}` does not recover: {reason}")]
    Recovery {
        /// Key identifier.
        key_id: String,
        /// Why recovery failed.
        reason: String,
    },
    /// A signature recovered to a different address than the key's.
    #[error("signature from key `{key_id}` recovers to {recovered}, expected {expected}")]
    AddressMismatch {
        /// Key identifier.
        key_id: String,
        /// Address of the configured key.
        expected: Address,
        /// Address the signature recovered to.
        recovered: Address,
    },
    /// The backend is configured wrongly or cannot be reached at start-up; `what` names the
    /// setting or resource (a token label, a PIN, a KMS key id, a share file).
    #[error("signer configuration: {what}: {reason}")]
    Config {
        /// The setting or resource that is wrong.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The backend was reachable and is not any more (HSM removed, service down).
    #[error("signer for key `{key_id}` is unavailable: {reason}")]
    Unavailable {
        /// Key identifier.
        key_id: String,
        /// What failed.
        reason: String,
    },
}
