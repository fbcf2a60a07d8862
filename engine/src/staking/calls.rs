//! From packed deposit entries (what a `stake_deposit` intent carries through the rings)
//! to the transaction's calldata: one entry is a `deposit(...)` call on the deposit
//! contract, several a `batchDeposit(...)` call on the batch contract. Writes into the
//! caller's buffer; allocates nothing.

use super::{
    DEPOSIT_ENTRY_BYTES, DepositEntry, MAX_DEPOSITS_PER_INTENT, encode_batch_call,
    encode_deposit_call,
};

/// Largest packed form of one intent's entries.
pub const MAX_PACKED_BYTES: usize = MAX_DEPOSITS_PER_INTENT * DEPOSIT_ENTRY_BYTES;

/// The entries of an intent's packed form, decoded (`entries[..n]`), without allocating;
/// `None` if it is empty, malformed or holds too many.
pub fn unpack(packed: &[u8]) -> Option<([DepositEntry; MAX_DEPOSITS_PER_INTENT], usize)> {
    let n = packed.len() / DEPOSIT_ENTRY_BYTES;
    if n == 0 || n > MAX_DEPOSITS_PER_INTENT || !packed.len().is_multiple_of(DEPOSIT_ENTRY_BYTES) {
        return None;
    }
    let first = DepositEntry::decode(&packed[..DEPOSIT_ENTRY_BYTES])?;
    let mut entries = [first; MAX_DEPOSITS_PER_INTENT];
    for (slot, chunk) in entries
        .iter_mut()
        .zip(packed.chunks_exact(DEPOSIT_ENTRY_BYTES))
        .skip(1)
    {
        *slot = DepositEntry::decode(chunk)?;
    }
    Some((entries, n))
}

/// Encodes the call for `packed` entries into `out`; the bytes written, or `None` if the
/// entries are malformed, too many, or the call does not fit.
pub fn entries_to_calldata(packed: &[u8], out: &mut [u8]) -> Option<usize> {
    match unpack(packed)? {
        (entries, 1) => encode_deposit_call(&entries[0], out),
        (entries, n) => encode_batch_call(&entries[..n], out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staking::testkeys;

    fn packed(entries: &[DepositEntry]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in entries {
            let mut b = [0u8; DEPOSIT_ENTRY_BYTES];
            e.encode(&mut b);
            out.extend_from_slice(&b);
        }
        out
    }

    #[test]
    fn one_entry_is_a_deposit_call_several_a_batch() {
        let mut wc = [0u8; 32];
        wc[0] = 1;
        let a = testkeys::make_entry(&[1; 32], wc, 32_000_000_000, [0; 4]);
        let b = testkeys::make_entry(&[2; 32], wc, 32_000_000_000, [0; 4]);
        let mut out = [0u8; 4096];
        let mut want = [0u8; 4096];
        let n = entries_to_calldata(&packed(&[a]), &mut out).unwrap();
        let m = encode_deposit_call(&a, &mut want).unwrap();
        assert_eq!(out[..n], want[..m]);
        let n = entries_to_calldata(&packed(&[a, b]), &mut out).unwrap();
        let m = encode_batch_call(&[a, b], &mut want).unwrap();
        assert_eq!(out[..n], want[..m]);
        assert_eq!(entries_to_calldata(&[], &mut out), None);
        assert_eq!(entries_to_calldata(&[0u8; 100], &mut out), None);
        assert_eq!(entries_to_calldata(&packed(&[a]), &mut out[..10]), None);
    }
}
