//! The policy file loader (`Policy::compile`: TOML, validation, compilation) on arbitrary
//! text, against two known accounts: never a panic; a refusal names file and rule.
#![no_main]

use std::collections::HashMap;
use std::path::Path;

use engine::auth::Principals;
use engine::risk::kill::KillSwitch;
use engine::risk::rules::{CompileCtx, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let accounts: HashMap<String, u16> = [("dev0".to_owned(), 0), ("dev1".to_owned(), 1)].into();
    let kill = KillSwitch::new(2);
    let principals = Principals::default();
    let ctx = CompileCtx {
        accounts: &accounts,
        kill: &kill,
        principals: &principals,
        venue: "node-0",
    };
    if let Err(e) = Policy::compile(Path::new("fuzz.toml"), text, ctx, 1) {
        assert!(!e.rule.is_empty());
    }
});
