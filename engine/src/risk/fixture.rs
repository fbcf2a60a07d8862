//! A large, realistic policy for benchmarks and the allocation test: 10,000 allowlisted
//! addresses, 1,000 KYT entries, 100 velocity windows (and the other rule types), plus a
//! stream of intents that exercises allow, deny and approval paths, and routing: with a
//! private relay configured, `auto` intents resolve to either route (by value, account and
//! destination).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use alloy_primitives::{Address, U256};

use crate::auth::Principals;
use crate::msg::{AccountIdx, IntentKind, IntentMsg, Origin, Route};
use crate::risk::kill::KillSwitch;
use crate::risk::kyt::{KytEntry, KytSnapshot};
use crate::risk::rules::{CompileCtx, Policy, Risk};

/// The sizes of the fixture.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Addresses in the shared allowlist group.
    pub allowlisted: usize,
    /// KYT entries.
    pub kyt_entries: usize,
    /// Accounts; each gets a 1 h and a 24 h velocity window.
    pub accounts: usize,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            allowlisted: 10_000,
            kyt_entries: 1_000,
            accounts: 50,
        }
    }
}

fn addr(i: usize) -> Address {
    let mut b = [0u8; 20];
    b[0] = 0xaa;
    b[12..20].copy_from_slice(&(i as u64).to_be_bytes());
    Address::from(b)
}

/// Builds the policy text, compiles it and loads the KYT snapshot; returns the decision
/// state and a stream of intents (mostly allowed; some refused or sent for approval).
pub fn large(sizes: Sizes, now_ns: u64) -> (Risk, Vec<IntentMsg>) {
    let mut text = String::from("label = \"large\"\n[groups]\ncounterparties = [\n");
    for i in 0..sizes.allowlisted {
        text.push_str(&format!("  \"{}\",\n", addr(i)));
    }
    text.push_str("]\n[kyt]\ndeny_score = 80\napproval_score = 60\nttl = \"10m\"\nrefresh = \"1m\"\non_missing = \"approval\"\non_expired = \"deny\"\n");
    text.push_str("[travel_rule]\nthreshold_wei = \"1000000000000000000\"\nknown_vasps = [\"LEI:5493001KJTIIGC8Y1R12\"]\n");
    // Routing: half the values go private, two accounts always do, and so do 32 of the
    // destinations.
    text.push_str("[routing]\nprivate_above_wei = \"500000000000\"\ndefault = \"public\"\n");
    text.push_str("private_accounts = [\"acct-3\", \"acct-7\"]\nprivate_contracts = [\n");
    for i in 0..32 {
        text.push_str(&format!("  \"{}\",\n", addr(i * 31)));
    }
    text.push_str("]\n");
    let mut accounts = HashMap::new();
    for a in 0..sizes.accounts {
        let name = format!("acct-{a}");
        accounts.insert(name.clone(), a as u16);
        text.push_str(&format!(
            "[[account]]\nname = \"{name}\"\nallow = [\"group:counterparties\"]\nmax_value_wei = \"100000000000000000000\"\n\
             max_gas = 1000000\napproval_above_wei = \"50000000000000000000\"\n\
             business_hours = {{ tz = \"Europe/Zurich\", days = [\"mon\",\"tue\",\"wed\",\"thu\",\"fri\",\"sat\",\"sun\"], start = \"00:00\", end = \"00:00\" }}\n\
             [[velocity]]\naccount = \"{name}\"\nwindow = \"1h\"\nmax_value_wei = \"1000000000000000000000000\"\nmax_count = 100000000\n\
             [[velocity]]\naccount = \"{name}\"\nwindow = \"24h\"\nmax_value_wei = \"1000000000000000000000000\"\nmax_count = 1000000000\n"
        ));
    }
    let kill = Arc::new(KillSwitch::new(sizes.accounts));
    let principals = Principals::default();
    let policy = Policy::compile(
        Path::new("large.toml"),
        &text,
        CompileCtx {
            accounts: &accounts,
            kill: &kill,
            principals: &principals,
            venue: "node-0",
        },
        1,
    )
    .unwrap_or_else(|e| panic!("the large fixture compiles: {e}"));
    let mut risk = Risk::new(Box::new(policy), kill);
    risk.set_private_relay(true);
    let entries = (0..sizes.kyt_entries).map(|i| {
        (
            addr(i),
            KytEntry {
                score: if i % 97 == 0 { 90 } else { (i % 50) as u8 },
                sanctioned: i % 499 == 0 && i > 0,
                observed_ns: now_ns,
            },
        )
    });
    risk.swap_kyt(Box::new(KytSnapshot::from_entries(entries, now_ns)));
    let intents = (0..4096usize)
        .map(|i| {
            // Mostly destinations with a fresh clean score; every 16th one is not on the
            // allowlist, every 64th has no score (approval), some are risky or sanctioned.
            let to = match i % 64 {
                0 => addr(sizes.allowlisted + i),
                1 => addr(sizes.kyt_entries + i % (sizes.allowlisted - sizes.kyt_entries)),
                _ => addr((i * 7) % sizes.kyt_entries),
            };
            IntentMsg {
                seq: i as u64 + 1,
                origin: Origin {
                    conn: 1,
                    principal: 1 + (i % 4) as u32,
                },
                account: AccountIdx((i % sizes.accounts) as u16),
                kind: IntentKind::Transfer,
                route: Route::Auto,
                to,
                value: U256::from(1_000_000_000u64 * (1 + i as u64 % 1000)),
                gas_limit: 21_000,
                ..IntentMsg::default()
            }
        })
        .collect();
    (risk, intents)
}
