//! The desk frame decoder (`protocol::decode`) and the context peek used for refused
//! frames, on arbitrary text: never a panic, and an error always names a code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = engine::protocol::decode(text) {
        assert!(!e.message.is_empty());
        let _ = e.to_json();
    }
    let _ = engine::protocol::peek_context(text);
});
