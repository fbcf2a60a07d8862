//! The deposit-data decoders: the deposit CLI's JSON (`parse_entries`) on arbitrary text,
//! and the packed entry (`DepositEntry::decode`) on arbitrary bytes, which must encode back
//! to exactly those bytes whenever it decodes.
#![no_main]

use engine::staking::{DEPOSIT_ENTRY_BYTES, DepositEntry, parse_entries};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_entries(text);
    }
    if let Some(entry) = DepositEntry::decode(data) {
        let mut out = [0u8; DEPOSIT_ENTRY_BYTES];
        entry.encode(&mut out);
        assert_eq!(&out[..], data, "decode then encode is the identity");
    }
});
