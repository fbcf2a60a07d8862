//! SSZ `hash_tree_root` of the few fixed-size consensus containers a deposit needs:
//! `DepositMessage`, `DepositData`, `ForkData` and `SigningData` (consensus specs, phase0).
//!
//! Invariants:
//! - every root is SHA-256 merkleization of 32-byte chunks, the chunk count padded to the next
//!   power of two with zero chunks, exactly as the spec's `merkleize`;
//! - `Bytes48` is 2 chunks (zero-padded to 64 bytes), `Bytes96` is 3 chunks padded to 4,
//!   `Bytes4` is 1 zero-padded chunk, `uint64` is its little-endian bytes zero-padded to 32;
//! - the genesis validators root of the deposit domain is always 32 zero bytes, as
//!   `compute_domain(DOMAIN_DEPOSIT, fork_version)` prescribes for deposits on every network.
//!
//! All functions are total: fixed-size inputs, no allocation, no panics.

use sha2::{Digest, Sha256};

/// The deposit domain type, `DOMAIN_DEPOSIT` in the consensus specs.
pub const DOMAIN_DEPOSIT: [u8; 4] = [0x03, 0x00, 0x00, 0x00];

const ZERO_CHUNK: [u8; 32] = [0u8; 32];

/// SHA-256 of the 64-byte concatenation `left || right`: one merkle node.
fn hash_pair(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// Copies up to 32 bytes of `bytes` into a zero-padded chunk.
fn chunk(bytes: &[u8]) -> [u8; 32] {
    let mut out = ZERO_CHUNK;
    for (dst, src) in out.iter_mut().zip(bytes) {
        *dst = *src;
    }
    out
}

/// `hash_tree_root` of a `uint64`: little-endian bytes in one zero-padded chunk.
fn uint64_root(value: u64) -> [u8; 32] {
    chunk(&value.to_le_bytes())
}

/// `hash_tree_root` of a `Bytes48` (a BLS public key): two chunks, the second zero-padded.
pub fn pubkey_root(pubkey: &[u8; 48]) -> [u8; 32] {
    let (first, second) = pubkey.split_at(32);
    hash_pair(&chunk(first), &chunk(second))
}

/// `hash_tree_root` of a `Bytes96` (a BLS signature): three chunks padded to four.
pub fn signature_root(signature: &[u8; 96]) -> [u8; 32] {
    let (first, rest) = signature.split_at(32);
    let (second, third) = rest.split_at(32);
    hash_pair(
        &hash_pair(&chunk(first), &chunk(second)),
        &hash_pair(&chunk(third), &ZERO_CHUNK),
    )
}

/// `hash_tree_root(DepositMessage{pubkey, withdrawal_credentials, amount})`, the object the
/// deposit signature signs. Three fields, padded to four leaves.
pub fn deposit_message_root(
    pubkey: &[u8; 48],
    withdrawal_credentials: &[u8; 32],
    amount_gwei: u64,
) -> [u8; 32] {
    hash_pair(
        &hash_pair(&pubkey_root(pubkey), withdrawal_credentials),
        &hash_pair(&uint64_root(amount_gwei), &ZERO_CHUNK),
    )
}

/// `hash_tree_root(DepositData{pubkey, withdrawal_credentials, amount, signature})`, the
/// `deposit_data_root` argument the deposit contract checks. Four fields, four leaves.
pub fn deposit_data_root(
    pubkey: &[u8; 48],
    withdrawal_credentials: &[u8; 32],
    amount_gwei: u64,
    signature: &[u8; 96],
) -> [u8; 32] {
    hash_pair(
        &hash_pair(&pubkey_root(pubkey), withdrawal_credentials),
        &hash_pair(&uint64_root(amount_gwei), &signature_root(signature)),
    )
}

/// `compute_domain(DOMAIN_DEPOSIT, fork_version, genesis_validators_root = 0x00..00)`:
/// the domain type followed by the first 28 bytes of
/// `hash_tree_root(ForkData{current_version: fork_version, genesis_validators_root})`.
pub fn deposit_domain(fork_version: [u8; 4]) -> [u8; 32] {
    let fork_data_root = hash_pair(&chunk(&fork_version), &ZERO_CHUNK);
    let mut domain = ZERO_CHUNK;
    let (domain_type, rest) = domain.split_at_mut(4);
    domain_type.copy_from_slice(&DOMAIN_DEPOSIT);
    for (dst, src) in rest.iter_mut().zip(fork_data_root.iter()) {
        *dst = *src;
    }
    domain
}

/// `compute_signing_root`: `hash_tree_root(SigningData{object_root, domain})`.
pub fn signing_root(object_root: &[u8; 32], domain: &[u8; 32]) -> [u8; 32] {
    hash_pair(object_root, domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h32(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).unwrap();
        out
    }

    #[test]
    fn mainnet_deposit_domain_is_the_well_known_constant() {
        // sha256(64 zero bytes) = f5a5fd42…, so the mainnet deposit domain is 03000000 ++ its
        // first 28 bytes.
        assert_eq!(
            deposit_domain([0, 0, 0, 0]),
            h32("03000000f5a5fd42d16a20302798ef6ed309979b43003d2320d9f0e8ea9831a9")
        );
    }

    #[test]
    fn domain_depends_on_fork_version() {
        let mainnet = deposit_domain([0, 0, 0, 0]);
        let hoodi = deposit_domain([0x10, 0x00, 0x09, 0x10]);
        assert_ne!(mainnet, hoodi);
        assert_eq!(&hoodi[..4], &DOMAIN_DEPOSIT);
    }

    #[test]
    fn uint64_chunk_is_little_endian() {
        let root = uint64_root(32_000_000_000);
        assert_eq!(&root[..8], &32_000_000_000u64.to_le_bytes());
        assert!(root[8..].iter().all(|b| *b == 0));
    }

    #[test]
    fn signature_root_pads_third_chunk_with_a_zero_chunk() {
        let mut sig = [0u8; 96];
        for (i, b) in sig.iter_mut().enumerate() {
            *b = i as u8;
        }
        let c0: [u8; 32] = sig[..32].try_into().unwrap();
        let c1: [u8; 32] = sig[32..64].try_into().unwrap();
        let c2: [u8; 32] = sig[64..].try_into().unwrap();
        let expected = hash_pair(&hash_pair(&c0, &c1), &hash_pair(&c2, &[0u8; 32]));
        assert_eq!(signature_root(&sig), expected);
    }

    #[test]
    fn data_root_differs_from_message_root_even_for_a_zero_signature() {
        let pk = [7u8; 48];
        let wc = [1u8; 32];
        let zero_sig = [0u8; 96];
        // With an all-zero signature the signature leaf is hash(hash(0,0), hash(0,0)), not the
        // zero chunk, so the two roots must differ.
        assert_ne!(
            deposit_message_root(&pk, &wc, 1),
            deposit_data_root(&pk, &wc, 1, &zero_sig)
        );
    }
}
