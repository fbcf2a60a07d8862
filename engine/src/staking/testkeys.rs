//! Deterministic deposit keys for tests and devnets: a BLS secret key from 32 bytes of input
//! keying material (the standard `KeyGen`), and fully valid deposit entries signed with it.
//!
//! Invariants: the same inputs always give the same key, pubkey and entry; every entry from
//! [`make_entry`] passes [`verify_entry`](super::verify_entry) for the fork version it was made
//! for. Keys derived from guessable bytes are public: never use them for real funds.

use super::{
    DepositEntry, bls, deposit_data_root, deposit_domain, deposit_message_root, signing_root,
};

/// The compressed public key of the secret key derived from `ikm`.
pub fn pubkey(ikm: &[u8; 32]) -> [u8; 48] {
    bls::public_key(&bls::keygen(ikm))
}

/// A valid deposit for the key derived from `ikm`, signed for `fork_version`, with both roots
/// and the fork version filled in.
pub fn make_entry(
    ikm: &[u8; 32],
    withdrawal_credentials: [u8; 32],
    amount_gwei: u64,
    fork_version: [u8; 4],
) -> DepositEntry {
    let sk = bls::keygen(ikm);
    let pubkey = bls::public_key(&sk);
    let message_root = deposit_message_root(&pubkey, &withdrawal_credentials, amount_gwei);
    let signature = bls::sign(
        &sk,
        &signing_root(&message_root, &deposit_domain(fork_version)),
    );
    DepositEntry {
        pubkey,
        withdrawal_credentials,
        amount_gwei,
        signature,
        deposit_message_root: Some(message_root),
        deposit_data_root: deposit_data_root(
            &pubkey,
            &withdrawal_credentials,
            amount_gwei,
            &signature,
        ),
        fork_version: Some(fork_version),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CryptoCheck, fork_versions, verify_entry};
    use super::*;

    #[test]
    fn entries_verify_for_their_own_fork_only() {
        let e = make_entry(&[1u8; 32], [0u8; 32], 1_000_000_000, fork_versions::SEPOLIA);
        assert_eq!(verify_entry(&e, fork_versions::SEPOLIA), Ok(()));
        let mut unstated = e;
        unstated.fork_version = None;
        assert_eq!(
            verify_entry(&unstated, fork_versions::HOLESKY),
            Err(CryptoCheck::Signature)
        );
    }

    #[test]
    fn deterministic() {
        let a = make_entry(&[2u8; 32], [3u8; 32], 2_000_000_000, fork_versions::MAINNET);
        let b = make_entry(&[2u8; 32], [3u8; 32], 2_000_000_000, fork_versions::MAINNET);
        assert_eq!(a, b);
        assert_eq!(a.pubkey, pubkey(&[2u8; 32]));
    }
}
