//! What a validator deposit costs the engine (`engine::staking`), per entry:
//!
//! - `verify_entry`: the fork check, both SSZ roots and the BLS signature (a pairing): what
//!   the `deposit-verify` thread spends, off the stage threads;
//! - `deposit_data_root`: the SSZ root alone;
//! - `entries_to_calldata`: what the policy stage spends turning one allowed entry (and a
//!   batch of 12) into the transaction's calldata, allocation-free;
//! - `parse_entries`: decoding one entry of the desk's JSON on the desk-io runtime.
//!
//! `cargo bench -p benches --bench staking`

use std::hint::black_box;

use criterion::Criterion;
use engine::staking::{
    DEPOSIT_ENTRY_BYTES, deposit_data_root, entries_to_calldata, parse_entries, testkeys,
    verify_entry,
};

const FORK: [u8; 4] = [0x10, 0x00, 0x09, 0x10];

fn main() {
    let mut wc = [0u8; 32];
    wc[0] = 1;
    wc[12..].copy_from_slice(&[0x42; 20]);
    let e = testkeys::make_entry(&[7; 32], wc, 32_000_000_000, FORK);
    let mut c = Criterion::default().configure_from_args();
    c.bench_function("staking/verify_entry", |b| {
        b.iter(|| verify_entry(black_box(&e), FORK))
    });
    c.bench_function("staking/deposit_data_root", |b| {
        b.iter(|| {
            deposit_data_root(
                black_box(&e.pubkey),
                &e.withdrawal_credentials,
                e.amount_gwei,
                &e.signature,
            )
        })
    });
    let mut one = [0u8; DEPOSIT_ENTRY_BYTES];
    e.encode(&mut one);
    let twelve: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take(12 * DEPOSIT_ENTRY_BYTES)
        .collect();
    let mut out = [0u8; 4096];
    c.bench_function("staking/entries_to_calldata_1", |b| {
        b.iter(|| entries_to_calldata(black_box(&one), &mut out))
    });
    c.bench_function("staking/entries_to_calldata_12", |b| {
        b.iter(|| entries_to_calldata(black_box(&twelve), &mut out))
    });
    let json = format!(
        r#"[{{"pubkey":"{}","withdrawal_credentials":"{}","amount":32000000000,"signature":"{}","deposit_data_root":"{}","fork_version":"10000910"}}]"#,
        hex::encode(e.pubkey),
        hex::encode(e.withdrawal_credentials),
        hex::encode(e.signature),
        hex::encode(e.deposit_data_root)
    );
    c.bench_function("staking/parse_entries_1", |b| {
        b.iter(|| parse_entries(black_box(&json)))
    });
    c.final_summary();
}
