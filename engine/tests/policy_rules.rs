//! The policy rules, case by case, at their boundaries: exact caps, window edges, KYT
//! TTL expiry, time zones across midnight and daylight saving, contract-call selectors,
//! token transfers, travel rule, four-eyes thresholds, kill switch, how `route: auto`
//! resolves; and policy files that must be refused with the file, line and rule named.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use alloy_primitives::{Address, U256};
use engine::auth::Principals;
use engine::msg::{AccountIdx, IntentKind, IntentMsg, Origin, Reason, Route, TravelInfo};
use engine::risk::kill::{KillScope, KillSwitch};
use engine::risk::kyt::{KytEntry, KytSnapshot};
use engine::risk::rules::{CompileCtx, Outcome, Policy, Risk};
use engine::risk::travel::vasp_key;

const S: u64 = 1_000_000_000;
const ETH: u128 = 1_000_000_000_000_000_000;
/// Monday 2026-01-12 15:00 UTC (10:00 in New York, EST).
const T0: u64 = 1_768_230_000 * S;

fn a(n: u8) -> Address {
    let mut b = [0u8; 20];
    b[19] = n;
    Address::from(b)
}

struct World {
    risk: Risk,
    kill: Arc<KillSwitch>,
    principals: Arc<Principals>,
}

fn accounts() -> HashMap<String, u16> {
    HashMap::from([
        ("hot".to_owned(), 0),
        ("night".to_owned(), 1),
        ("plain".to_owned(), 2),
    ])
}

fn compile(
    text: &str,
    kill: &KillSwitch,
    principals: &Principals,
    version: u32,
) -> Result<Policy, engine::risk::file::PolicyError> {
    let accts = accounts();
    Policy::compile(
        Path::new("policy.toml"),
        text,
        CompileCtx {
            accounts: &accts,
            kill,
            principals,
            venue: "node-0",
        },
        version,
    )
}

fn world() -> World {
    world_with(include_str!("policy/table.toml"))
}

fn world_with(text: &str) -> World {
    let kill = Arc::new(KillSwitch::new(3));
    let principals = Arc::new(Principals::default());
    let p = compile(text, &kill, &principals, 1).expect("the table policy compiles");
    let mut risk = Risk::new(Box::new(p), Arc::clone(&kill));
    let fresh = |score| KytEntry {
        score,
        sanctioned: false,
        observed_ns: T0,
    };
    let snap = KytSnapshot::from_entries(
        [
            (a(1), fresh(10)),
            (a(2), fresh(60)),
            (a(0x0a), fresh(0)),
            (a(0x0b), fresh(90)),
            (
                a(0x0c),
                KytEntry {
                    score: 0,
                    sanctioned: true,
                    observed_ns: T0,
                },
            ),
            (
                a(0x0d),
                KytEntry {
                    score: 5,
                    sanctioned: false,
                    observed_ns: T0 - 600 * S,
                },
            ),
            (a(0x0f), fresh(5)),
        ],
        T0,
    );
    risk.swap_kyt(Box::new(snap));
    World {
        risk,
        kill,
        principals,
    }
}

fn transfer(account: u16, to: Address, value: u128) -> IntentMsg {
    IntentMsg {
        seq: 1,
        origin: Origin {
            conn: 1,
            principal: 999,
        },
        account: AccountIdx(account),
        kind: IntentKind::Transfer,
        route: Route::Auto,
        to,
        value: U256::from(value),
        gas_limit: 21_000,
        ..IntentMsg::default()
    }
}

fn call(to: Address, gas: u64) -> IntentMsg {
    IntentMsg {
        kind: IntentKind::Call,
        gas_limit: gas,
        ..transfer(0, to, 0)
    }
}

fn erc20_transfer(recipient: Address, amount: u128) -> Vec<u8> {
    let mut d = vec![0xa9, 0x05, 0x9c, 0xbb];
    d.extend_from_slice(&[0u8; 12]);
    d.extend_from_slice(recipient.as_slice());
    d.extend_from_slice(&U256::from(amount).to_be_bytes::<32>());
    d
}

fn travel(vasp: Option<&str>) -> TravelInfo {
    TravelInfo {
        present: true,
        vasp_key: vasp.map_or(0, vasp_key),
        hash: alloy_primitives::B256::repeat_byte(7),
    }
}

fn outcome(w: &mut World, m: &IntentMsg, data: &[u8], now: u64) -> Outcome {
    w.risk.decide(m, data, now).outcome
}

fn deny(r: Reason) -> impl Fn(Outcome) -> bool {
    move |o| matches!(o, Outcome::Deny(x, _) if x == r)
}

fn is_allow(o: Outcome) -> bool {
    o == Outcome::Allow
}

fn is_approval(o: Outcome) -> bool {
    matches!(o, Outcome::Approval(_))
}

#[test]
fn table_of_single_decisions() {
    let ttl = 300 * S;
    let big = ETH + 1; // above the travel-rule threshold, below the four-eyes threshold
    type Case = (
        &'static str,
        IntentMsg,
        Vec<u8>,
        u64,
        Box<dyn Fn(Outcome) -> bool>,
    );
    let cases: Vec<Case> = vec![
        (
            "unknown account",
            transfer(9, a(1), 1),
            vec![],
            T0,
            Box::new(deny(Reason::UnknownAccount)),
        ),
        (
            "not allowlisted",
            transfer(0, a(0x99), 1),
            vec![],
            T0,
            Box::new(deny(Reason::NotAllowlisted)),
        ),
        (
            "group member",
            transfer(0, a(1), 1),
            vec![],
            T0,
            Box::new(is_allow),
        ),
        // Caps: inclusive; four-eyes strictly above 5 ETH.
        (
            "exactly the four-eyes threshold",
            IntentMsg {
                travel: travel(None),
                ..transfer(0, a(1), 5 * ETH)
            },
            vec![],
            T0,
            Box::new(is_allow),
        ),
        (
            "above the four-eyes threshold",
            IntentMsg {
                travel: travel(None),
                ..transfer(0, a(1), 5 * ETH + 1)
            },
            vec![],
            T0,
            Box::new(is_approval),
        ),
        (
            "exactly the cap, approved",
            IntentMsg {
                travel: travel(None),
                approved_by: 7,
                ..transfer(0, a(1), 10 * ETH)
            },
            vec![],
            T0,
            Box::new(is_allow),
        ),
        (
            "one wei over the cap",
            IntentMsg {
                travel: travel(None),
                approved_by: 7,
                ..transfer(0, a(1), 10 * ETH + 1)
            },
            vec![],
            T0,
            Box::new(deny(Reason::ValueCap)),
        ),
        // Travel rule.
        (
            "just below the travel threshold",
            transfer(0, a(1), ETH - 1),
            vec![],
            T0,
            Box::new(is_allow),
        ),
        (
            "at the travel threshold, no data",
            transfer(0, a(1), ETH),
            vec![],
            T0,
            Box::new(deny(Reason::TravelRuleMissing)),
        ),
        (
            "internal destination needs no data",
            transfer(0, a(0x0a), big),
            vec![],
            T0,
            Box::new(is_allow),
        ),
        (
            "unknown VASP",
            IntentMsg {
                travel: travel(Some("Some Exchange")),
                ..transfer(0, a(1), big)
            },
            vec![],
            T0,
            Box::new(deny(Reason::UnknownVasp)),
        ),
        (
            "known VASP, any case",
            IntentMsg {
                travel: travel(Some("lei:5493001kjtiigc8y1r12")),
                ..transfer(0, a(1), big)
            },
            vec![],
            T0,
            Box::new(is_allow),
        ),
        (
            "self-hosted wallet with data",
            IntentMsg {
                travel: travel(None),
                ..transfer(0, a(1), big)
            },
            vec![],
            T0,
            Box::new(is_allow),
        ),
        // KYT.
        (
            "risk score at the deny level",
            transfer(0, a(0x0b), 1),
            vec![],
            T0,
            Box::new(deny(Reason::KytRisk)),
        ),
        (
            "risk score needing approval",
            transfer(0, a(2), 1),
            vec![],
            T0,
            Box::new(is_approval),
        ),
        (
            "sanctioned",
            transfer(0, a(0x0c), 1),
            vec![],
            T0,
            Box::new(deny(Reason::KytRisk)),
        ),
        (
            "sanctioned long after",
            transfer(0, a(0x0c), 1),
            vec![],
            T0 + 10 * ttl,
            Box::new(deny(Reason::KytRisk)),
        ),
        (
            "expired score denies",
            transfer(0, a(0x0d), 1),
            vec![],
            T0,
            Box::new(deny(Reason::KytRisk)),
        ),
        (
            "fresh one ns before the TTL",
            transfer(0, a(1), 1),
            vec![],
            T0 + ttl - 1,
            Box::new(is_allow),
        ),
        (
            "expired at the TTL",
            transfer(0, a(1), 1),
            vec![],
            T0 + ttl,
            Box::new(deny(Reason::KytRisk)),
        ),
        (
            "no score asks for approval",
            transfer(0, a(0x0e), 1),
            vec![],
            T0,
            Box::new(is_approval),
        ),
        // Contract calls.
        (
            "allowed target and selector",
            call(a(0x0f), 100_000),
            vec![0x12, 0x34, 0x56, 0x78, 1],
            T0,
            Box::new(is_allow),
        ),
        (
            "allowed target, other selector",
            call(a(0x0f), 100_000),
            vec![0xde, 0xad, 0xbe, 0xef],
            T0,
            Box::new(deny(Reason::CallNotAllowed)),
        ),
        (
            "allowlisted but no call rule",
            call(a(1), 100_000),
            vec![0x12, 0x34, 0x56, 0x78],
            T0,
            Box::new(deny(Reason::CallNotAllowed)),
        ),
        (
            "token transfer below its travel threshold",
            call(a(0xc0), 60_000),
            erc20_transfer(a(1), 999_999_999),
            T0,
            Box::new(is_allow),
        ),
        (
            "token transfer at exactly the asset cap",
            IntentMsg {
                travel: travel(None),
                ..call(a(0xc0), 60_000)
            },
            erc20_transfer(a(1), 5_000_000_000),
            T0,
            Box::new(is_allow),
        ),
        (
            "token transfer over the asset cap",
            call(a(0xc0), 60_000),
            erc20_transfer(a(1), 5_000_000_001),
            T0,
            Box::new(deny(Reason::ValueCap)),
        ),
        (
            "token transfer to a stranger",
            call(a(0xc0), 60_000),
            erc20_transfer(a(0x99), 1),
            T0,
            Box::new(deny(Reason::NotAllowlisted)),
        ),
        (
            "token transfer at its travel threshold",
            call(a(0xc0), 60_000),
            erc20_transfer(a(1), 1_000_000_000),
            T0,
            Box::new(deny(Reason::TravelRuleMissing)),
        ),
        // Gas and fee.
        (
            "gas at the maximum",
            IntentMsg {
                gas_limit: 500_000,
                ..transfer(0, a(1), 1)
            },
            vec![],
            T0,
            Box::new(is_allow),
        ),
        (
            "gas above the maximum",
            IntentMsg {
                gas_limit: 500_001,
                ..transfer(0, a(1), 1)
            },
            vec![],
            T0,
            Box::new(deny(Reason::GasCap)),
        ),
        (
            "fee cap above the maximum",
            IntentMsg {
                max_fee_cap: 100_000_000_001,
                ..transfer(0, a(1), 1)
            },
            vec![],
            T0,
            Box::new(deny(Reason::FeeCap)),
        ),
        // Kinds and routes.
        (
            "staking is not enabled",
            IntentMsg {
                kind: IntentKind::StakeExit,
                ..transfer(0, a(1), 0)
            },
            vec![],
            T0,
            Box::new(deny(Reason::UnsupportedKind)),
        ),
        (
            "private route without relays",
            IntentMsg {
                route: Route::Private,
                ..transfer(0, a(1), 1)
            },
            vec![],
            T0,
            Box::new(deny(Reason::RouteUnavailable)),
        ),
    ];
    let mut failures = Vec::new();
    for (name, msg, data, now, check) in &cases {
        let mut w = world();
        let got = outcome(&mut w, msg, data, *now);
        if !check(got) {
            failures.push(format!("{name}: got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_policy_fee_maximum_caps_an_uncapped_intent() {
    let mut w = world();
    let v = w.risk.decide(&transfer(0, a(1), 1), &[], T0);
    assert_eq!(v.outcome, Outcome::Allow);
    assert_eq!(v.max_fee, 100_000_000_000);
    assert_eq!(v.policy_version, 1);
}

/// Local wall time in New York → unix ns (EST is UTC-5, EDT UTC-4).
fn ny(y: i32, mo: u32, d: u32, h: u32, mi: u32, utc_offset_h: i64) -> u64 {
    let date = chrono::NaiveDate::from_ymd_opt(y, mo, d).unwrap();
    let t = date.and_hms_opt(h, mi, 0).unwrap().and_utc().timestamp() - utc_offset_h * 3600;
    t as u64 * S
}

#[test]
fn business_hours_across_midnight_and_daylight_saving() {
    let night = |t: u64| {
        let mut w = world();
        outcome(&mut w, &transfer(1, a(1), 1), &[], t)
    };
    let closed = deny(Reason::OutsideBusinessHours);
    // Window 22:00-06:00 New York time, opening Monday to Friday.
    // Winter (EST, UTC-5). 2026-01-12 is a Monday.
    assert!(
        closed(night(ny(2026, 1, 12, 21, 59, -5))),
        "Mon 21:59 closed"
    );
    assert!(
        is_allow(night(ny(2026, 1, 12, 22, 0, -5))),
        "Mon 22:00 open"
    );
    assert!(
        is_allow(night(ny(2026, 1, 13, 5, 59, -5))),
        "Tue 05:59 open (Monday's night)"
    );
    assert!(closed(night(ny(2026, 1, 13, 6, 0, -5))), "Tue 06:00 closed");
    assert!(
        closed(night(ny(2026, 1, 12, 1, 0, -5))),
        "Mon 01:00 closed: Sunday does not open"
    );
    assert!(
        is_allow(night(ny(2026, 1, 17, 1, 0, -5))),
        "Sat 01:00 open: Friday's night"
    );
    assert!(
        closed(night(ny(2026, 1, 17, 23, 0, -5))),
        "Sat 23:00 closed"
    );
    // Summer (EDT, UTC-4): the same local times, one hour earlier in UTC.
    assert!(
        closed(night(ny(2026, 7, 15, 21, 59, -4))),
        "Wed 21:59 EDT closed"
    );
    assert!(
        is_allow(night(ny(2026, 7, 15, 22, 0, -4))),
        "Wed 22:00 EDT open"
    );
    // 22:00 EST expressed as EDT offset would be 21:00 local in summer: closed.
    assert!(closed(night(ny(2026, 7, 15, 22, 0, -5) - 2 * 3600 * S)));
}

#[test]
fn velocity_counts_and_values_roll_over_the_window() {
    // Count: 5 per hour on account `hot`.
    let mut w = world();
    let t = T0 + 17 * S;
    for i in 0..5 {
        assert!(
            is_allow(outcome(&mut w, &transfer(0, a(1), 1), &[], t + i * S)),
            "#{i}"
        );
    }
    assert!(deny(Reason::VelocityLimit)(outcome(
        &mut w,
        &transfer(0, a(1), 1),
        &[],
        t + 10 * S
    )));
    // KYT must still be fresh for the window-edge checks: reload the snapshot at the edge.
    let refresh = |w: &mut World, at: u64| {
        w.risk.swap_kyt(Box::new(KytSnapshot::from_entries(
            [(
                a(1),
                KytEntry {
                    score: 1,
                    sanctioned: false,
                    observed_ns: at,
                },
            )],
            at,
        )));
    };
    refresh(&mut w, t + 3600 * S - 1);
    assert!(
        deny(Reason::VelocityLimit)(outcome(
            &mut w,
            &transfer(0, a(1), 1),
            &[],
            t + 3600 * S - 1
        )),
        "one ns before a full hour after the first, still counted"
    );
    refresh(&mut w, t + 3664 * S);
    assert!(
        is_allow(outcome(&mut w, &transfer(0, a(1), 1), &[], t + 3664 * S)),
        "a window plus one bucket after the first four, there is room"
    );

    // Value: 20 ETH per hour; approved intents of 5 ETH each (travel data attached).
    let mut w = world();
    let five = IntentMsg {
        travel: travel(None),
        approved_by: 7,
        ..transfer(0, a(1), 5 * ETH)
    };
    for i in 0..4 {
        assert!(is_allow(outcome(&mut w, &five, &[], T0 + i)), "#{i}");
    }
    let v = w.risk.decide(&transfer(0, a(1), 1), &[], T0 + 5);
    assert!(deny(Reason::VelocityLimit)(v.outcome));
    assert_eq!(
        v.velocity,
        Some((0, 20 * ETH, 0)),
        "the deciding window is recorded"
    );

    // An intent that only asks for approval does not use up the window.
    let mut w = world();
    for _ in 0..10 {
        assert!(is_approval(outcome(&mut w, &transfer(0, a(2), 1), &[], T0)));
    }
    assert!(is_allow(outcome(&mut w, &transfer(0, a(1), 1), &[], T0)));
}

#[test]
fn desk_velocity_spans_accounts_and_only_that_desk() {
    let mut w = world();
    let desk_a = w.principals.intern("desk-a");
    let desk_b = w.principals.intern("desk-b");
    let from = |p: u32, acct: u16| IntentMsg {
        origin: Origin {
            conn: 1,
            principal: p,
        },
        ..transfer(acct, a(1), 1)
    };
    // The policy was compiled before these principals connected; the desk name was
    // interned then, so the numbers agree.
    assert!(is_allow(outcome(&mut w, &from(desk_a, 2), &[], T0)));
    assert!(is_allow(outcome(&mut w, &from(desk_a, 0), &[], T0)));
    assert!(is_allow(outcome(&mut w, &from(desk_a, 2), &[], T0)));
    assert!(deny(Reason::VelocityLimit)(outcome(
        &mut w,
        &from(desk_a, 2),
        &[],
        T0
    )));
    assert!(is_allow(outcome(&mut w, &from(desk_b, 2), &[], T0)));
    assert!(is_allow(outcome(
        &mut w,
        &from(desk_a, 2),
        &[],
        T0 + 86_400 * S + 1441 * S
    )));
}

#[test]
fn kill_switch_scopes() {
    let mut w = world();
    let token = erc20_transfer(a(1), 1);
    w.kill.set(&KillScope::Asset("usdc".into()), true).unwrap();
    assert!(deny(Reason::KillSwitch)(outcome(
        &mut w,
        &call(a(0xc0), 60_000),
        &token,
        T0
    )));
    assert!(
        is_allow(outcome(&mut w, &transfer(0, a(1), 1), &[], T0)),
        "ETH still moves"
    );
    w.kill.set(&KillScope::Asset("USDC".into()), false).unwrap();
    w.kill.set(&KillScope::Account(0), true).unwrap();
    assert!(deny(Reason::KillSwitch)(outcome(
        &mut w,
        &transfer(0, a(1), 1),
        &[],
        T0
    )));
    assert!(
        is_allow(outcome(&mut w, &transfer(2, a(1), 1), &[], T0)),
        "other accounts run"
    );
    w.kill.set(&KillScope::Account(0), false).unwrap();
    w.kill
        .set(&KillScope::Venue("node-0".into()), true)
        .unwrap();
    assert!(deny(Reason::KillSwitch)(outcome(
        &mut w,
        &transfer(2, a(1), 1),
        &[],
        T0
    )));
    w.kill
        .set(&KillScope::Venue("node-0".into()), false)
        .unwrap();
    w.kill.set(&KillScope::All, true).unwrap();
    assert!(deny(Reason::KillSwitch)(outcome(
        &mut w,
        &transfer(2, a(1), 1),
        &[],
        T0
    )));
    w.kill.set(&KillScope::All, false).unwrap();
    assert!(is_allow(outcome(&mut w, &transfer(2, a(1), 1), &[], T0)));
}

#[test]
fn a_reload_keeps_velocity_history_and_changes_the_version() {
    let mut w = world();
    for i in 0..5 {
        assert!(is_allow(outcome(
            &mut w,
            &transfer(0, a(1), 1),
            &[],
            T0 + i
        )));
    }
    let text = include_str!("policy/table.toml").replace("label = \"table\"", "label = \"v2\"");
    let p2 = compile(&text, &w.kill, &w.principals, 2).unwrap();
    let old = w.risk.swap_policy(Box::new(p2));
    assert_eq!(old.version, 1);
    let v = w.risk.decide(&transfer(0, a(1), 1), &[], T0 + 10);
    assert_eq!(v.policy_version, 2);
    assert!(
        deny(Reason::VelocityLimit)(v.outcome),
        "history carried over: {v:?}"
    );
    // A policy with a tighter cap decides the next intent.
    let text = include_str!("policy/table.toml")
        .replace(
            "max_value_wei = \"10000000000000000000\"",
            "max_value_wei = \"0\"",
        )
        .replace("max_count = 5", "max_count = 500");
    let p3 = compile(&text, &w.kill, &w.principals, 3).unwrap();
    w.risk.swap_policy(Box::new(p3));
    assert!(deny(Reason::ValueCap)(outcome(
        &mut w,
        &transfer(0, a(1), 1),
        &[],
        T0 + 11
    )));
}

#[test]
fn malformed_policy_files_are_refused_with_file_line_and_rule() {
    let kill = KillSwitch::new(3);
    let principals = Principals::default();
    let good = include_str!("policy/table.toml");
    let line_of = |needle: &str| {
        good.lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .unwrap()
    };
    let cases: Vec<(String, usize, &str, &str)> = vec![
        (
            good.replace(
                "\"0x000000000000000000000000000000000000000b\",",
                "\"0xnot-an-address\",",
            ),
            line_of("\"0x000000000000000000000000000000000000000b\","),
            "account \"hot\"",
            "allow[2]: `0xnot-an-address` is not an address",
        ),
        (
            good.replace("\"group:otc\"", "\"group:nope\""),
            line_of("\"group:otc\""),
            "account \"hot\"",
            "no group named `nope`",
        ),
        (
            good.replace("name = \"plain\"", "name = \"ghost\""),
            line_of("name = \"plain\"") - 1,
            "account \"ghost\"",
            "no such account",
        ),
        (
            good.replace("America/New_York", "Mars/Olympus"),
            line_of("America/New_York"),
            "account \"night\"",
            "unknown time zone `Mars/Olympus`",
        ),
        (
            good.replace("window = \"1h\"", "window = \"90s\""),
            line_of("window = \"1h\""),
            "velocity[0]",
            "whole minutes",
        ),
        (
            good.replace("ttl = \"5m\"", "ttl = \"2h\""),
            line_of("ttl = \"5m\""),
            "kyt",
            "at most 1h",
        ),
        (
            good.replace("max_gas = 500000", "max_gas = 500000\nmax_gass = 1"),
            line_of("max_gas = 500000") + 1,
            "file",
            "unknown field `max_gass`",
        ),
        (
            good.replace("deny_score = 80", "deny_score = 80 80"),
            line_of("deny_score = 80"),
            "file",
            "",
        ),
        (
            good.replace("\"0xa9059cbb\"", "\"0xa9059c\""),
            line_of("\"0xa9059cbb\""),
            "account \"hot\"",
            "selector `0xa9059c`",
        ),
        // Routing.
        (
            good.replace(
                "private_above_wei = \"3000000000000000000\"",
                "private_above_wei = \"3 ETH\"",
            ),
            line_of("private_above_wei = "),
            "routing",
            "private_above_wei: `3 ETH` is not a decimal amount in base units",
        ),
        (
            good.replace(
                "private_accounts = [\"plain\"]",
                "private_accounts = [\"plain\", \"ghost\"]",
            ),
            line_of("private_accounts = "),
            "routing",
            "private_accounts[1]: no account `ghost` in the engine configuration",
        ),
        (
            good.replace(
                "private_contracts = [\"0x000000000000000000000000000000000000000f\"]",
                "private_contracts = [\"0xrouter\"]",
            ),
            line_of("private_contracts = "),
            "routing",
            "private_contracts[0]: `0xrouter` is not an address",
        ),
        (
            good.replace("default = \"public\"", "default = \"dark\""),
            line_of("default = \"public\""),
            "routing",
            "default: `dark` is not public or private",
        ),
        (
            good.replace(
                "default = \"public\"",
                "default = \"public\"\nprivate_below_wei = \"1\"",
            ),
            line_of("default = \"public\"") + 1,
            "file",
            "unknown field `private_below_wei`",
        ),
    ];
    for (text, line, rule, needle) in cases {
        let e = compile(&text, &kill, &principals, 9).expect_err("must be refused");
        let shown = e.to_string();
        assert_eq!(e.line, line, "{shown}");
        assert_eq!(e.rule, rule, "{shown}");
        assert!(
            shown.starts_with(&format!("policy.toml:{line}: {rule}: ")),
            "{shown}"
        );
        assert!(shown.contains(needle), "{shown}");
    }
}

#[test]
fn the_shipped_example_policy_compiles_against_the_dev_accounts() {
    let kill = KillSwitch::new(5);
    let principals = Principals::default();
    let accts: HashMap<String, u16> = (0..5u16).map(|i| (format!("dev{i}"), i)).collect();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/dev-policy.toml");
    let p = Policy::load(
        &path,
        CompileCtx {
            accounts: &accts,
            kill: &kill,
            principals: &principals,
            venue: "anvil",
        },
        1,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.label, "dev example");
    let (src, _) = p.kyt_source.as_ref().expect("a KYT feed");
    let engine::risk::kyt::KytSource::File(f) = src else {
        panic!("a file feed")
    };
    let bytes = std::fs::read(f).expect("the feed sits next to the policy");
    assert_eq!(KytSnapshot::parse(&bytes, 0).unwrap().len(), 6);
}

/// Which policy a routing case runs under.
#[derive(Clone, Copy, Debug)]
enum Pol {
    /// `policy/table.toml`: `[routing]` with a 3 ETH threshold, account `plain` flagged,
    /// contract 0x…0f private, default public.
    Table,
    /// The same with `default = "private"`.
    DefaultPrivate,
}

#[test]
fn routing_resolves_auto_and_keeps_the_desks_choice() {
    let table = include_str!("policy/table.toml");
    let default_private = table.replace("default = \"public\"", "default = \"private\"");
    let threshold = 3 * ETH;
    let with_travel = |m: IntentMsg| IntentMsg {
        travel: travel(None),
        ..m
    };
    let routed = |r: Route, m: IntentMsg| IntentMsg { route: r, ..m };
    // (name, policy, private relay configured, intent, calldata, outcome, route)
    type Case = (
        &'static str,
        Pol,
        bool,
        IntentMsg,
        Vec<u8>,
        Box<dyn Fn(Outcome) -> bool>,
        Route,
    );
    let cases: Vec<Case> = vec![
        (
            "auto at exactly the value threshold goes private",
            Pol::Table,
            true,
            with_travel(transfer(0, a(1), threshold)),
            vec![],
            Box::new(is_allow),
            Route::Private,
        ),
        (
            "auto one wei below the value threshold goes public",
            Pol::Table,
            true,
            with_travel(transfer(0, a(1), threshold - 1)),
            vec![],
            Box::new(is_allow),
            Route::Public,
        ),
        (
            "auto from a flagged account goes private",
            Pol::Table,
            true,
            transfer(2, a(1), 1),
            vec![],
            Box::new(is_allow),
            Route::Private,
        ),
        (
            "auto call to a private contract goes private",
            Pol::Table,
            true,
            call(a(0x0f), 100_000),
            vec![0x12, 0x34, 0x56, 0x78],
            Box::new(is_allow),
            Route::Private,
        ),
        (
            "auto with no rule matching takes the default, public",
            Pol::Table,
            true,
            transfer(0, a(1), 1),
            vec![],
            Box::new(is_allow),
            Route::Public,
        ),
        (
            "a token amount does not count towards the native threshold",
            Pol::Table,
            true,
            call(a(0xc0), 60_000),
            erc20_transfer(a(1), 999_999_999),
            Box::new(is_allow),
            Route::Public,
        ),
        (
            "auto with no rule matching takes the default, private",
            Pol::DefaultPrivate,
            true,
            transfer(0, a(1), 1),
            vec![],
            Box::new(is_allow),
            Route::Private,
        ),
        (
            "desk public with a large value stays public",
            Pol::Table,
            true,
            routed(Route::Public, with_travel(transfer(0, a(1), threshold + 1))),
            vec![],
            Box::new(is_allow),
            Route::Public,
        ),
        (
            "desk public from a flagged account stays public",
            Pol::Table,
            true,
            routed(Route::Public, transfer(2, a(1), 1)),
            vec![],
            Box::new(is_allow),
            Route::Public,
        ),
        (
            "desk private with a small value stays private",
            Pol::Table,
            true,
            routed(Route::Private, transfer(0, a(1), 1)),
            vec![],
            Box::new(is_allow),
            Route::Private,
        ),
        (
            "auto that would go private without a relay goes public",
            Pol::Table,
            false,
            with_travel(transfer(0, a(1), threshold)),
            vec![],
            Box::new(is_allow),
            Route::Public,
        ),
        (
            "default private without a relay goes public",
            Pol::DefaultPrivate,
            false,
            transfer(2, a(1), 1),
            vec![],
            Box::new(is_allow),
            Route::Public,
        ),
        (
            "desk private without a relay is refused",
            Pol::Table,
            false,
            routed(Route::Private, transfer(0, a(1), 1)),
            vec![],
            Box::new(deny(Reason::RouteUnavailable)),
            Route::Private,
        ),
    ];
    let mut failures = Vec::new();
    for (name, pol, relay, msg, data, check, route) in &cases {
        let mut w = world_with(match pol {
            Pol::Table => table,
            Pol::DefaultPrivate => &default_private,
        });
        w.risk.set_private_relay(*relay);
        let v = w.risk.decide(msg, data, T0);
        if !check(v.outcome) || v.route != *route {
            failures.push(format!(
                "{name}: got {:?} via {:?}, want {route:?}",
                v.outcome, v.route
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_public_venue_kill_stops_only_what_goes_public() {
    let mut w = world();
    w.risk.set_private_relay(true);
    w.kill
        .set(&KillScope::Venue("node-0".into()), true)
        .unwrap();
    let big = IntentMsg {
        travel: travel(None),
        ..transfer(0, a(1), 3 * ETH)
    };
    let v = w.risk.decide(&big, &[], T0);
    assert_eq!((v.outcome, v.route), (Outcome::Allow, Route::Private));
    let v = w.risk.decide(&transfer(0, a(1), 1), &[], T0);
    assert!(deny(Reason::KillSwitch)(v.outcome), "{v:?}");
    assert_eq!(v.route, Route::Public);
}

#[test]
fn the_audit_record_and_the_accepted_event_carry_the_resolved_route() {
    let mut w = world();
    w.risk.set_private_relay(true);
    let msg = IntentMsg {
        travel: travel(None),
        ..transfer(0, a(1), 3 * ETH)
    };
    let v = w.risk.decide(&msg, &[], T0);
    assert_eq!(v.route, Route::Private);
    let rec = engine::risk::audit::AuditRecord::decision(&msg, &v, T0);
    let json = engine::risk::audit::render(&rec, &w.principals, &["hot".to_owned()]);
    assert_eq!(json["route"], "private", "{json}");
    assert_eq!(json["route_requested"], "auto", "{json}");

    let (_tx, control) = crossbeam_channel::bounded(1);
    let status = engine::stages::status::StatusStage::new(
        control,
        vec!["node-0".to_owned()],
        Arc::default(),
    );
    let id = engine::msg::IntentId::new("desk7-000123").unwrap();
    for (state, route) in [
        (engine::msg::State::Accepted, Route::Private),
        (engine::msg::State::Approved, Route::Public),
    ] {
        let ev = engine::msg::StatusMsg {
            route,
            policy_version: 1,
            ..engine::msg::StatusMsg::event(1, Origin::default(), state, pipeline::now_raw())
        };
        let text = status.render(&id, &ev);
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["state"], state.as_str(), "{text}");
        assert_eq!(json["route"], route.as_str(), "{text}");
    }
}
