//! EIP-1559 transaction encoding into a caller's buffer, without allocating.
//!
//! alloy's `TxEip1559` owns its calldata as `Bytes` and encodes into a `Vec`, which costs
//! allocations per transaction. The signing stage instead encodes the same fields, in the
//! same order, with alloy_rlp's encoders, straight into a stack buffer (signing payload)
//! and into the raw-transaction slot. The tests check byte-for-byte equality with alloy's
//! `TxEip1559` for random transactions.

use alloy_primitives::{Address, B256, Signature, U256, keccak256};
use alloy_rlp::{BufMut, Encodable, Header};

/// EIP-2718 type byte of EIP-1559 transactions.
pub const EIP1559_TYPE: u8 = 0x02;

/// An EIP-1559 transaction whose calldata is borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Eip1559<'a> {
    /// Chain id.
    pub chain_id: u64,
    /// Nonce.
    pub nonce: u64,
    /// Priority fee per gas (tip).
    pub max_priority_fee_per_gas: u128,
    /// Fee cap per gas.
    pub max_fee_per_gas: u128,
    /// Gas limit.
    pub gas_limit: u64,
    /// Recipient.
    pub to: Address,
    /// Value in wei.
    pub value: U256,
    /// Calldata.
    pub input: &'a [u8],
}

/// RLP of an empty access list.
const EMPTY_LIST: u8 = 0xc0;

impl Eip1559<'_> {
    fn fields_len(&self) -> usize {
        self.chain_id.length()
            + self.nonce.length()
            + self.max_priority_fee_per_gas.length()
            + self.max_fee_per_gas.length()
            + self.gas_limit.length()
            + self.to.length()
            + self.value.length()
            + self.input.length()
            + 1 // empty access list
    }

    fn encode_fields(&self, out: &mut dyn BufMut) {
        self.chain_id.encode(out);
        self.nonce.encode(out);
        self.max_priority_fee_per_gas.encode(out);
        self.max_fee_per_gas.encode(out);
        self.gas_limit.encode(out);
        self.to.encode(out);
        self.value.encode(out);
        self.input.encode(out);
        out.put_u8(EMPTY_LIST);
    }

    /// Bytes of the signing payload (`0x02 || rlp([fields…])`).
    pub fn signing_len(&self) -> usize {
        let payload = self.fields_len();
        1 + Header {
            list: true,
            payload_length: payload,
        }
        .length()
            + payload
    }

    /// Writes the signing payload into `buf` and returns its keccak256 (the hash to sign).
    ///
    /// Returns `None` if `buf` is too small.
    pub fn signing_hash(&self, buf: &mut [u8]) -> Option<B256> {
        let n = self.signing_len();
        if buf.len() < n {
            return None;
        }
        let mut out = &mut buf[..n];
        out.put_u8(EIP1559_TYPE);
        Header {
            list: true,
            payload_length: self.fields_len(),
        }
        .encode(&mut out);
        self.encode_fields(&mut out);
        debug_assert!(out.is_empty());
        Some(keccak256(&buf[..n]))
    }

    fn signed_payload_len(&self, sig: &Signature) -> usize {
        self.fields_len() + sig.v().length() + sig.r().length() + sig.s().length()
    }

    /// Bytes of the signed EIP-2718 encoding.
    pub fn signed_len(&self, sig: &Signature) -> usize {
        let payload = self.signed_payload_len(sig);
        1 + Header {
            list: true,
            payload_length: payload,
        }
        .length()
            + payload
    }

    /// Writes the signed transaction (`0x02 || rlp([fields…, y_parity, r, s])`) into
    /// `buf`; returns the number of bytes written and the transaction hash, or `None` if
    /// `buf` is too small.
    pub fn encode_signed(&self, sig: &Signature, buf: &mut [u8]) -> Option<(usize, B256)> {
        let n = self.signed_len(sig);
        if buf.len() < n {
            return None;
        }
        let mut out = &mut buf[..n];
        out.put_u8(EIP1559_TYPE);
        Header {
            list: true,
            payload_length: self.signed_payload_len(sig),
        }
        .encode(&mut out);
        self.encode_fields(&mut out);
        sig.v().encode(&mut out);
        sig.r().encode(&mut out);
        sig.s().encode(&mut out);
        debug_assert!(out.is_empty());
        Some((n, keccak256(&buf[..n])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_consensus::{SignableTransaction, TxEip1559};
    use alloy_eips::eip2718::Encodable2718;
    use alloy_primitives::{Bytes, TxKind};
    use proptest::prelude::*;
    use signers::{LocalCurve, LocalSigner, Signer};

    const DEV0: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

    proptest! {
        #[test]
        fn byte_identical_to_alloy(
            chain_id in 1u64..u64::MAX,
            nonce in any::<u64>(),
            tip in any::<u128>(),
            cap in any::<u128>(),
            gas in any::<u64>(),
            to in any::<[u8; 20]>(),
            value in any::<[u8; 32]>(),
            input in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let ours = Eip1559 {
                chain_id, nonce, max_priority_fee_per_gas: tip, max_fee_per_gas: cap,
                gas_limit: gas, to: Address::from(to), value: U256::from_be_bytes(value),
                input: &input,
            };
            let theirs = TxEip1559 {
                chain_id, nonce, max_priority_fee_per_gas: tip, max_fee_per_gas: cap,
                gas_limit: gas, to: TxKind::Call(Address::from(to)),
                value: U256::from_be_bytes(value), input: Bytes::from(input.clone()),
                access_list: Default::default(),
            };
            let mut buf = vec![0u8; 1024];
            let hash = ours.signing_hash(&mut buf).unwrap();
            prop_assert_eq!(hash, theirs.signature_hash());

            let signer = LocalSigner::from_hex("dev0", DEV0, LocalCurve::Secp256k1).unwrap();
            let sig = signer.sign_hash(&hash).unwrap();
            let (n, tx_hash) = ours.encode_signed(&sig, &mut buf).unwrap();
            let signed = theirs.into_signed(sig);
            let expected = signed.encoded_2718();
            prop_assert_eq!(&buf[..n], &expected[..]);
            prop_assert_eq!(tx_hash, *signed.hash());
        }
    }

    #[test]
    fn short_buffers_are_refused() {
        let tx = Eip1559 {
            chain_id: 1,
            nonce: 0,
            max_priority_fee_per_gas: 1,
            max_fee_per_gas: 2,
            gas_limit: 21_000,
            to: Address::ZERO,
            value: U256::ZERO,
            input: &[],
        };
        assert!(tx.signing_hash(&mut [0u8; 8]).is_none());
        let sig = Signature::test_signature();
        assert!(tx.encode_signed(&sig, &mut [0u8; 8]).is_none());
    }
}
