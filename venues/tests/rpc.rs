//! The blocking RPC client against a real anvil.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use alloy_primitives::{B256, U256};
use common::{spawn_anvil, transfer, wait_receipt};
use venues::{AnvilConfig, FeeEstimate, RpcClient, VenueError, dev_address};

const GWEI: u128 = 1_000_000_000;

#[test]
fn reads_nonce_balance_block_and_fees() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let mut rpc = anvil.rpc().unwrap();
    assert_eq!(rpc.chain_id().unwrap(), 31337);
    assert_eq!(rpc.block_number().unwrap(), 0);
    assert_eq!(rpc.transaction_count(dev_address(0), "latest").unwrap(), 0);
    assert_eq!(rpc.transaction_count(dev_address(0), "pending").unwrap(), 0);
    let ten_thousand_eth = U256::from(10_000u64) * U256::from(10u64).pow(U256::from(18u64));
    assert_eq!(rpc.balance(dev_address(0)).unwrap(), ten_thousand_eth);
    // anvil's genesis base fee is 1 gwei and its tip suggestion 1 gwei.
    assert_eq!(
        rpc.fee_estimate().unwrap(),
        FeeEstimate {
            base_fee_per_gas: GWEI,
            max_priority_fee_per_gas: GWEI
        }
    );
}

#[test]
fn sends_a_transfer_and_reads_it_back() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let mut rpc = anvil.rpc().unwrap();
    let fees = rpc.fee_estimate().unwrap();
    let before = rpc.balance(dev_address(1)).unwrap();
    let (raw, hash) = transfer(0, 31337, 0, dev_address(1), 12_345, fees);
    assert_eq!(rpc.send_raw_transaction(&raw).unwrap(), hash);

    let receipt = wait_receipt(&mut rpc, hash);
    assert!(receipt.success);
    assert_eq!(receipt.gas_used, 21_000);
    assert_eq!(receipt.block_number, 1);
    assert_eq!(
        (receipt.from, receipt.to),
        (dev_address(0), Some(dev_address(1)))
    );

    let tx = rpc.transaction_by_hash(hash).unwrap().expect("known");
    assert_eq!(tx.hash, hash);
    assert_eq!((tx.from, tx.to), (dev_address(0), Some(dev_address(1))));
    assert_eq!(tx.value, U256::from(12_345u64));
    assert_eq!((tx.nonce, tx.gas_limit, tx.tx_type), (0, 21_000, 2));
    assert_eq!(tx.chain_id, Some(31337));
    assert_eq!(tx.max_fee_per_gas, Some(fees.suggested_max_fee_per_gas()));
    assert_eq!(tx.block_number, Some(1));
    assert!(tx.input.is_empty());

    assert_eq!(rpc.transaction_count(dev_address(0), "latest").unwrap(), 1);
    assert_eq!(
        rpc.balance(dev_address(1)).unwrap(),
        before + U256::from(12_345u64)
    );
    let block = rpc.block_receipts(1).unwrap().expect("block 1 exists");
    assert_eq!(block, vec![receipt]);
    assert_eq!(rpc.block_receipts(99).unwrap(), None);
}

#[test]
fn unknown_hashes_are_none_and_node_errors_are_typed() {
    let anvil = spawn_anvil(&AnvilConfig::default());
    let mut rpc = anvil.rpc().unwrap();
    assert!(rpc.receipt(B256::repeat_byte(7)).unwrap().is_none());
    assert!(
        rpc.transaction_by_hash(B256::repeat_byte(7))
            .unwrap()
            .is_none()
    );
    match rpc.call::<serde_json::Value>("eth_noSuchMethod", serde_json::json!([])) {
        Err(VenueError::Rpc { code, message }) => {
            assert_ne!(code, 0);
            assert!(!message.is_empty());
        }
        other => panic!("expected VenueError::Rpc, got {other:?}"),
    }
    match rpc.send_raw_transaction(&[0x02, 0xde, 0xad]) {
        Err(VenueError::Rpc { .. }) => {}
        other => panic!("expected VenueError::Rpc, got {other:?}"),
    }
    // The connection survives node errors.
    assert_eq!(rpc.chain_id().unwrap(), 31337);
}

#[test]
fn connect_to_a_closed_port_names_the_url() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("ws://127.0.0.1:{port}");
    match RpcClient::connect(&url) {
        Err(e @ VenueError::Connect { .. }) => assert!(e.to_string().contains(&url), "{e}"),
        other => panic!("expected VenueError::Connect, got {other:?}"),
    }
    assert!(matches!(
        RpcClient::connect("wss://127.0.0.1:1"),
        Err(VenueError::InvalidUrl(_))
    ));
}

#[test]
fn a_silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    // Accepts and then never answers the handshake.
    let holder = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    let started = Instant::now();
    match RpcClient::connect_with_timeout(&url, Duration::from_millis(200)) {
        Err(VenueError::Timeout(what)) => assert!(what.contains("handshake"), "{what}"),
        other => panic!("expected VenueError::Timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(holder.join().unwrap());
}
