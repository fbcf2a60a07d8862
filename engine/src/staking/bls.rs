//! BLS12-381 checks for deposits, on `blst`'s minimal-pubkey-size variant: public keys are
//! compressed G1 points (48 bytes), signatures compressed G2 points (96 bytes), hashed to the
//! curve with the proof-of-possession ciphersuite tag [`DST`] the consensus specs use.
//!
//! Invariants:
//! - a public key is accepted only if it decompresses to a point on the curve, lies in the
//!   prime-order subgroup and is not the point at infinity;
//! - a signature is accepted only if it decompresses, lies in the G2 subgroup, and verifies
//!   against such a key for the exact 32-byte message given;
//! - nothing here panics or allocates on behalf of the caller; malformed bytes are `false`/`None`.

use blst::BLST_ERROR;
use blst::min_pk::{PublicKey, SecretKey, Signature};

/// Domain separation tag of the Ethereum consensus BLS signature scheme (proof of possession).
pub const DST: &[u8] = b"BLS_SIG_BLS12381G2_XMD:SHA-256_SSWU_RO_POP_";

/// Decodes a compressed public key, requiring a subgroup point other than infinity.
fn decode_pubkey(pubkey: &[u8; 48]) -> Option<PublicKey> {
    let pk = PublicKey::uncompress(pubkey).ok()?;
    pk.validate().ok()?;
    Some(pk)
}

/// True if `pubkey` is a valid deposit public key: a compressed G1 point on the curve, in the
/// prime-order subgroup, and not the point at infinity.
pub fn pubkey_is_valid(pubkey: &[u8; 48]) -> bool {
    decode_pubkey(pubkey).is_some()
}

/// True if `signature` is a valid BLS signature by `pubkey` over `message`, with subgroup
/// checks on both points. An invalid public key makes this false.
pub fn verify(pubkey: &[u8; 48], message: &[u8; 32], signature: &[u8; 96]) -> bool {
    let Some(pk) = decode_pubkey(pubkey) else {
        return false;
    };
    let Ok(sig) = Signature::uncompress(signature) else {
        return false;
    };
    sig.verify(true, message, DST, &[], &pk, true) == BLST_ERROR::BLST_SUCCESS
}

/// A secret key derived from 32 bytes of input keying material with the standard BLS `KeyGen`.
pub(crate) fn keygen(ikm: &[u8; 32]) -> SecretKey {
    // `key_gen` fails only for input keying material shorter than 32 bytes, which the array
    // type rules out; the zero key is a total fallback for that impossible branch.
    SecretKey::key_gen(ikm, &[]).unwrap_or_default()
}

/// The compressed public key of `sk`.
pub(crate) fn public_key(sk: &SecretKey) -> [u8; 48] {
    sk.sk_to_pk().compress()
}

/// The compressed signature of `sk` over `message`.
pub(crate) fn sign(sk: &SecretKey, message: &[u8; 32]) -> [u8; 96] {
    sk.sign(message, DST, &[]).compress()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip() {
        let sk = keygen(&[3u8; 32]);
        let pk = public_key(&sk);
        let msg = [9u8; 32];
        let sig = sign(&sk, &msg);
        assert!(pubkey_is_valid(&pk));
        assert!(verify(&pk, &msg, &sig));
        assert!(!verify(&pk, &[8u8; 32], &sig));
    }

    #[test]
    fn infinity_pubkey_is_rejected() {
        let mut inf = [0u8; 48];
        inf[0] = 0xc0;
        assert!(PublicKey::uncompress(&inf).is_ok(), "infinity must decode");
        assert!(!pubkey_is_valid(&inf));
    }

    #[test]
    fn garbage_is_rejected_without_panicking() {
        assert!(!pubkey_is_valid(&[0u8; 48]));
        assert!(!pubkey_is_valid(&[0xffu8; 48]));
        let pk = public_key(&keygen(&[1u8; 32]));
        assert!(!verify(&pk, &[0u8; 32], &[0u8; 96]));
        assert!(!verify(&pk, &[0u8; 32], &[0xffu8; 96]));
        let mut inf_sig = [0u8; 96];
        inf_sig[0] = 0xc0;
        assert!(!verify(&pk, &[0u8; 32], &inf_sig));
    }

    #[test]
    fn keygen_is_deterministic() {
        assert_eq!(
            public_key(&keygen(&[5u8; 32])),
            public_key(&keygen(&[5u8; 32]))
        );
        assert_ne!(
            public_key(&keygen(&[5u8; 32])),
            public_key(&keygen(&[6u8; 32]))
        );
    }
}
