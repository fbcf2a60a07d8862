//! Helpers shared by the integration tests: a spawned anvil, signed
//! transfers, and bounded mio-driven waits.
#![allow(dead_code)]

use std::str::FromStr;
use std::time::{Duration, Instant};

use alloy_consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy_eips::eip2718::Encodable2718;
use alloy_primitives::{Address, B256, TxKind, U256};
use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use mio::{Events, Poll, Token};
use venues::{
    Anvil, AnvilConfig, BroadcastConnection, DEV_PRIVATE_KEYS, FeeEstimate, RpcErrorInfo,
};

/// Bound on every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn spawn_anvil(cfg: &AnvilConfig) -> Anvil {
    Anvil::spawn(cfg)
        .unwrap_or_else(|e| panic!("cannot start anvil (did scripts/setup.sh run?): {e}"))
}

/// A signed EIP-1559 transfer of `value` wei from dev account `key` to `to`,
/// EIP-2718 encoded, with its hash.
pub fn transfer(
    key: usize,
    chain_id: u64,
    nonce: u64,
    to: Address,
    value: u64,
    fees: FeeEstimate,
) -> (Vec<u8>, B256) {
    let signer = PrivateKeySigner::from_str(DEV_PRIVATE_KEYS[key]).unwrap();
    let tx = TxEip1559 {
        chain_id,
        nonce,
        gas_limit: 21_000,
        max_fee_per_gas: fees.suggested_max_fee_per_gas(),
        max_priority_fee_per_gas: fees.max_priority_fee_per_gas,
        to: TxKind::Call(to),
        value: U256::from(value),
        access_list: Default::default(),
        input: Default::default(),
    };
    let sig = signer.sign_hash_sync(&tx.signature_hash()).unwrap();
    let envelope: TxEnvelope = tx.into_signed(sig).into();
    (envelope.encoded_2718(), *envelope.tx_hash())
}

/// Waits (bounded by [`WAIT`]) on `poll` until `conn` has handled `n` replies.
pub fn await_replies(
    conn: &mut BroadcastConnection,
    poll: &mut Poll,
    n: usize,
) -> Vec<(u64, Result<B256, RpcErrorInfo>)> {
    let mut out = Vec::with_capacity(n);
    let mut events = Events::with_capacity(16);
    let deadline = Instant::now() + WAIT;
    // Replies may already be readable before the first wait.
    conn.poll_responses(|tag, r| out.push((tag, r))).unwrap();
    while out.len() < n {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| {
                panic!(
                    "timed out after {WAIT:?}: {} of {n} replies, got {out:?}",
                    out.len()
                )
            });
        poll.poll(&mut events, Some(left)).unwrap();
        conn.poll_responses(|tag, r| out.push((tag, r))).unwrap();
    }
    out
}

/// A registered broadcast connection and its poll.
pub fn broadcast(anvil: &Anvil) -> (BroadcastConnection, Poll) {
    let poll = Poll::new().unwrap();
    let mut conn = BroadcastConnection::connect(&anvil.ws_url()).unwrap();
    conn.register(poll.registry(), Token(0)).unwrap();
    (conn, poll)
}

/// Asks for the receipt until it exists (bounded by [`WAIT`]): anvil answers
/// `eth_sendRawTransaction` before automine has sealed the block.
pub fn wait_receipt(rpc: &mut venues::RpcClient, hash: B256) -> venues::ReceiptSummary {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(r) = rpc.receipt(hash).unwrap() {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no receipt for {hash} within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
