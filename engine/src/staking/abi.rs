//! Solidity ABI calldata for the deposit transactions: the deposit contract's
//! `deposit(bytes,bytes,bytes,bytes32)` and a batch contract's
//! `batchDeposit(bytes,bytes,bytes,bytes32[],uint64[])`.
//!
//! Invariants:
//! - standard head/tail encoding: dynamic arguments are referenced by 32-byte big-endian
//!   offsets from the start of the arguments, each tail is a length word followed by the data
//!   zero-padded to a multiple of 32 bytes;
//! - the builders write into the caller's buffer without allocating and return the number of
//!   bytes written, or `None` (writing nothing) when the buffer is too small;
//! - the ether sent with a call is not calldata: it is [`deposit_value_wei`] of the amount (or
//!   the sum over the batch, [`batch_value_wei`]).

use super::DepositEntry;

/// Selector of `deposit(bytes,bytes,bytes,bytes32)`.
pub const DEPOSIT_SELECTOR: [u8; 4] = [0x22, 0x89, 0x51, 0x18];

/// Selector of `batchDeposit(bytes,bytes,bytes,bytes32[],uint64[])`.
pub const BATCH_DEPOSIT_SELECTOR: [u8; 4] = [0x48, 0x5b, 0xbf, 0x8c];

/// Length of the calldata [`encode_deposit_call`] writes.
pub const DEPOSIT_CALL_BYTES: usize = 420;

const WORD: usize = 32;
const GWEI_IN_WEI: u128 = 1_000_000_000;

/// `n` rounded up to a whole number of 32-byte words.
fn padded(n: usize) -> Option<usize> {
    n.div_ceil(WORD).checked_mul(WORD)
}

/// Sequential writer over the caller's buffer; every write is bounds-checked.
struct Cursor<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn bytes(&mut self, src: &[u8]) -> Option<()> {
        let end = self.pos.checked_add(src.len())?;
        self.out.get_mut(self.pos..end)?.copy_from_slice(src);
        self.pos = end;
        Some(())
    }

    fn zeros(&mut self, n: usize) -> Option<()> {
        let end = self.pos.checked_add(n)?;
        self.out.get_mut(self.pos..end)?.fill(0);
        self.pos = end;
        Some(())
    }

    /// A `uint256` word holding `value`.
    fn word(&mut self, value: usize) -> Option<()> {
        let value = u64::try_from(value).ok()?;
        self.zeros(WORD - 8)?;
        self.bytes(&value.to_be_bytes())
    }

    /// Zero padding after `len` data bytes up to the next word boundary.
    fn pad_after(&mut self, len: usize) -> Option<()> {
        self.zeros(padded(len)?.checked_sub(len)?)
    }
}

/// Calldata of `deposit(pubkey, withdrawal_credentials, signature, deposit_data_root)` for
/// `e`, always [`DEPOSIT_CALL_BYTES`] long: selector, the three offsets `0x80`, `0xe0`,
/// `0x120`, the root, then the three length-prefixed, zero-padded byte strings.
/// `None` if `out` is shorter than that.
pub fn encode_deposit_call(e: &DepositEntry, out: &mut [u8]) -> Option<usize> {
    let out = out.get_mut(..DEPOSIT_CALL_BYTES)?;
    let mut c = Cursor { out, pos: 0 };
    c.bytes(&DEPOSIT_SELECTOR)?;
    let pubkey_at = 4 * WORD;
    let wc_at = pubkey_at + WORD + padded(48)?;
    let signature_at = wc_at + WORD + padded(32)?;
    c.word(pubkey_at)?;
    c.word(wc_at)?;
    c.word(signature_at)?;
    c.bytes(&e.deposit_data_root)?;
    for field in [
        &e.pubkey[..],
        &e.withdrawal_credentials[..],
        &e.signature[..],
    ] {
        c.word(field.len())?;
        c.bytes(field)?;
        c.pad_after(field.len())?;
    }
    Some(c.pos)
}

/// Length of the calldata [`encode_batch_call`] writes for `n` entries, or `None` if it
/// overflows.
pub fn batch_call_len(n: usize) -> Option<usize> {
    let pubkeys = WORD.checked_add(padded(n.checked_mul(48)?)?)?;
    let per_word = WORD.checked_add(n.checked_mul(WORD)?)?;
    let signatures = WORD.checked_add(n.checked_mul(96)?)?;
    [pubkeys, per_word, signatures, per_word, per_word]
        .into_iter()
        .try_fold(4 + 5 * WORD, usize::checked_add)
}

/// Calldata of `batchDeposit(pubkeys, withdrawal_credentials, signatures, deposit_data_roots,
/// amounts)`: the first three are the entries' fields concatenated in order, then the
/// `bytes32[]` of data roots and the `uint64[]` of amounts in gwei.
/// `None` if `entries` is empty or `out` is shorter than [`batch_call_len`].
pub fn encode_batch_call(entries: &[DepositEntry], out: &mut [u8]) -> Option<usize> {
    if entries.is_empty() {
        return None;
    }
    let n = entries.len();
    let total = batch_call_len(n)?;
    let out = out.get_mut(..total)?;
    let pubkeys_len = n.checked_mul(48)?;
    let wcs_len = n.checked_mul(32)?;
    let signatures_len = n.checked_mul(96)?;

    // Each tail starts after the previous one's length word and padded data.
    let after = |at: usize, data_len: usize| at.checked_add(WORD)?.checked_add(padded(data_len)?);
    let pubkeys_at = 5 * WORD;
    let wcs_at = after(pubkeys_at, pubkeys_len)?;
    let signatures_at = after(wcs_at, wcs_len)?;
    let roots_at = after(signatures_at, signatures_len)?;
    let amounts_at = after(roots_at, wcs_len)?;

    let mut c = Cursor { out, pos: 0 };
    c.bytes(&BATCH_DEPOSIT_SELECTOR)?;
    for offset in [pubkeys_at, wcs_at, signatures_at, roots_at, amounts_at] {
        c.word(offset)?;
    }
    c.word(pubkeys_len)?;
    for e in entries {
        c.bytes(&e.pubkey)?;
    }
    c.pad_after(pubkeys_len)?;
    c.word(wcs_len)?;
    for e in entries {
        c.bytes(&e.withdrawal_credentials)?;
    }
    c.word(signatures_len)?;
    for e in entries {
        c.bytes(&e.signature)?;
    }
    c.word(n)?;
    for e in entries {
        c.bytes(&e.deposit_data_root)?;
    }
    c.word(n)?;
    for e in entries {
        c.zeros(WORD - 8)?;
        c.bytes(&e.amount_gwei.to_be_bytes())?;
    }
    Some(c.pos)
}

/// The ether, in wei, to send with a deposit of `amount_gwei`.
pub fn deposit_value_wei(amount_gwei: u64) -> u128 {
    u128::from(amount_gwei) * GWEI_IN_WEI
}

/// The ether, in wei, to send with a batch of `entries`; `None` only on overflow.
pub fn batch_value_wei(entries: &[DepositEntry]) -> Option<u128> {
    entries.iter().try_fold(0u128, |sum, e| {
        sum.checked_add(deposit_value_wei(e.amount_gwei))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(signature: &str) -> [u8; 4] {
        let out = alloy_primitives::keccak256(signature.as_bytes());
        [out[0], out[1], out[2], out[3]]
    }

    fn entry(seed: u8) -> DepositEntry {
        DepositEntry {
            pubkey: [seed; 48],
            withdrawal_credentials: [seed.wrapping_add(1); 32],
            amount_gwei: 32_000_000_000 + u64::from(seed),
            signature: [seed.wrapping_add(2); 96],
            deposit_message_root: None,
            deposit_data_root: [seed.wrapping_add(3); 32],
            fork_version: None,
        }
    }

    fn word(v: u64) -> [u8; 32] {
        let mut w = [0u8; 32];
        w[24..].copy_from_slice(&v.to_be_bytes());
        w
    }

    #[test]
    fn selectors_are_keccak_of_the_signatures() {
        assert_eq!(
            selector("deposit(bytes,bytes,bytes,bytes32)"),
            DEPOSIT_SELECTOR
        );
        assert_eq!(
            selector("batchDeposit(bytes,bytes,bytes,bytes32[],uint64[])"),
            BATCH_DEPOSIT_SELECTOR
        );
    }

    #[test]
    fn deposit_call_layout() {
        let e = entry(0x11);
        let mut out = [0xeeu8; 512];
        assert_eq!(encode_deposit_call(&e, &mut out), Some(420));
        let args = &out[4..420];
        assert_eq!(&out[..4], &[0x22, 0x89, 0x51, 0x18]);
        assert_eq!(&args[0x00..0x20], &word(0x80));
        assert_eq!(&args[0x20..0x40], &word(0xe0));
        assert_eq!(&args[0x40..0x60], &word(0x120));
        assert_eq!(&args[0x60..0x80], &e.deposit_data_root);
        assert_eq!(&args[0x80..0xa0], &word(48));
        assert_eq!(&args[0xa0..0xd0], &e.pubkey);
        assert_eq!(&args[0xd0..0xe0], &[0u8; 16]);
        assert_eq!(&args[0xe0..0x100], &word(32));
        assert_eq!(&args[0x100..0x120], &e.withdrawal_credentials);
        assert_eq!(&args[0x120..0x140], &word(96));
        assert_eq!(&args[0x140..0x1a0], &e.signature);
        assert_eq!(args.len(), 0x1a0);
        assert!(out[420..].iter().all(|b| *b == 0xee), "wrote past the end");
    }

    #[test]
    fn deposit_call_needs_room() {
        let mut small = [0u8; DEPOSIT_CALL_BYTES - 1];
        assert_eq!(encode_deposit_call(&entry(1), &mut small), None);
        assert!(small.iter().all(|b| *b == 0));
        let mut exact = [0u8; DEPOSIT_CALL_BYTES];
        assert_eq!(encode_deposit_call(&entry(1), &mut exact), Some(420));
    }

    #[test]
    fn batch_call_layout_two_entries() {
        let (a, b) = (entry(0x21), entry(0x42));
        let mut out = vec![0u8; 1024];
        let n = encode_batch_call(&[a, b], &mut out).unwrap();
        assert_eq!(n, 804);
        assert_eq!(batch_call_len(2), Some(804));
        assert_eq!(&out[..4], &BATCH_DEPOSIT_SELECTOR);
        let args = &out[4..n];
        for (i, offset) in [0xa0u64, 0x120, 0x180, 0x260, 0x2c0]
            .into_iter()
            .enumerate()
        {
            assert_eq!(&args[i * 32..i * 32 + 32], &word(offset), "offset {i}");
        }
        // pubkeys: 96 bytes, exactly three words, no padding.
        assert_eq!(&args[0xa0..0xc0], &word(96));
        assert_eq!(&args[0xc0..0xf0], &a.pubkey);
        assert_eq!(&args[0xf0..0x120], &b.pubkey);
        assert_eq!(&args[0x120..0x140], &word(64));
        assert_eq!(&args[0x140..0x160], &a.withdrawal_credentials);
        assert_eq!(&args[0x160..0x180], &b.withdrawal_credentials);
        assert_eq!(&args[0x180..0x1a0], &word(192));
        assert_eq!(&args[0x1a0..0x200], &a.signature);
        assert_eq!(&args[0x200..0x260], &b.signature);
        assert_eq!(&args[0x260..0x280], &word(2));
        assert_eq!(&args[0x280..0x2a0], &a.deposit_data_root);
        assert_eq!(&args[0x2a0..0x2c0], &b.deposit_data_root);
        assert_eq!(&args[0x2c0..0x2e0], &word(2));
        assert_eq!(&args[0x2e0..0x300], &word(a.amount_gwei));
        assert_eq!(&args[0x300..0x320], &word(b.amount_gwei));
        assert_eq!(args.len(), 0x320);
    }

    #[test]
    fn batch_call_pads_an_odd_pubkey_blob() {
        let a = entry(7);
        let mut out = [0xffu8; 580];
        assert_eq!(encode_batch_call(&[a], &mut out), Some(580));
        let args = &out[4..];
        assert_eq!(&args[0x20..0x40], &word(0x100));
        assert_eq!(&args[0xa0..0xc0], &word(48));
        assert_eq!(&args[0xc0..0xf0], &a.pubkey);
        assert_eq!(&args[0xf0..0x100], &[0u8; 16]);
        assert_eq!(&args[0x100..0x120], &word(32));
    }

    #[test]
    fn batch_call_rejects_empty_and_short_buffers() {
        let mut out = [0u8; 2048];
        assert_eq!(encode_batch_call(&[], &mut out), None);
        let mut short = [0u8; 803];
        assert_eq!(encode_batch_call(&[entry(1), entry(2)], &mut short), None);
        assert!(short.iter().all(|b| *b == 0));
        assert_eq!(batch_call_len(usize::MAX), None);
    }

    #[test]
    fn values_in_wei() {
        assert_eq!(deposit_value_wei(32_000_000_000), 32 * 10u128.pow(18));
        assert_eq!(
            batch_value_wei(&[entry(0), entry(0)]),
            Some(64 * 10u128.pow(18))
        );
        assert_eq!(
            deposit_value_wei(u64::MAX),
            u128::from(u64::MAX) * 1_000_000_000
        );
    }
}
