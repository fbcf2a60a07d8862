//! The staking contracts: the deposit contract, the batch deposit contract and the EIP-7002
//! / EIP-7251 request contracts, as compiled from `contracts/*.sol` into
//! `contracts/build/*.json` (npm `solc`, see `scripts/compile-contracts.js`), with the
//! helpers that put them on a dev chain and read what they log.
//!
//! - [`deploy_staking`]: deploys the deposit and batch contracts by transaction from an
//!   account the node holds unlocked (anvil's dev accounts).
//! - [`install_system_contracts`]: puts the two request contracts' runtime code at their
//!   EIP addresses where a chain has none there (anvil's Prague), with `anvil_setCode`.
//! - [`request_fee`]: a request contract's current fee (an `eth_call` with empty input).
//! - [`decode_deposit_event`], [`deposit_event_index`]: the deposit contract's
//!   `DepositEvent` log data; both check every offset and length and never panic.

use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, Bytes, U256, address, b256};
use serde_json::{Value, json};

use crate::{RpcClient, VenueError};

/// EIP-7002 withdrawal request contract.
pub const WITHDRAWAL_REQUEST_CONTRACT: Address =
    address!("00000961Ef480Eb55e80D19ad83579A64c007002");
/// EIP-7251 consolidation request contract.
pub const CONSOLIDATION_REQUEST_CONTRACT: Address =
    address!("0000BBdDc7CE488642fb579F8B00f3a590007251");
/// `keccak256("DepositEvent(bytes,bytes,bytes,bytes,bytes)")`.
pub const DEPOSIT_EVENT_TOPIC: B256 =
    b256!("649bbc62d0e31342afea4e5cd82d4049e7e1ee912fc0889aa790803be39038c5");

/// One of the compiled contracts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contract {
    /// `contracts/DepositContract.sol`.
    Deposit,
    /// `contracts/BatchDeposit.sol` (constructor: the deposit contract's address).
    Batch,
    /// `contracts/WithdrawalRequests.sol` (EIP-7002).
    WithdrawalRequests,
    /// `contracts/ConsolidationRequests.sol` (EIP-7251).
    ConsolidationRequests,
}

impl Contract {
    /// Its name in `contracts/build/`.
    pub const fn name(self) -> &'static str {
        match self {
            Contract::Deposit => "DepositContract",
            Contract::Batch => "BatchDeposit",
            Contract::WithdrawalRequests => "WithdrawalRequests",
            Contract::ConsolidationRequests => "ConsolidationRequests",
        }
    }

    /// The compiled JSON (`abi`, `bytecode`, `deployedBytecode`).
    pub const fn build_json(self) -> &'static str {
        match self {
            Contract::Deposit => include_str!("../../contracts/build/DepositContract.json"),
            Contract::Batch => include_str!("../../contracts/build/BatchDeposit.json"),
            Contract::WithdrawalRequests => {
                include_str!("../../contracts/build/WithdrawalRequests.json")
            }
            Contract::ConsolidationRequests => {
                include_str!("../../contracts/build/ConsolidationRequests.json")
            }
        }
    }

    fn code(self, key: &str) -> Result<Bytes, VenueError> {
        let v: Value = serde_json::from_str(self.build_json())?;
        v[key]
            .as_str()
            .and_then(|s| s.parse::<Bytes>().ok())
            .filter(|b| !b.is_empty())
            .ok_or_else(|| VenueError::Contract {
                name: self.name(),
                what: format!("contracts/build has no `{key}`"),
            })
    }

    /// Creation code (constructor arguments go after it).
    pub fn creation_code(self) -> Result<Bytes, VenueError> {
        self.code("bytecode")
    }

    /// Runtime code.
    pub fn runtime_code(self) -> Result<Bytes, VenueError> {
        self.code("deployedBytecode")
    }
}

/// Where [`deploy_staking`] put the contracts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StakingContracts {
    /// The deposit contract.
    pub deposit: Address,
    /// The batch contract (calling `deposit`).
    pub batch: Address,
}

/// Sends `eth_sendTransaction` from `from` (unlocked on the node) and waits up to 30 s for
/// its receipt; the receipt, checked for success.
fn send_and_wait(rpc: &mut RpcClient, name: &'static str, tx: Value) -> Result<Value, VenueError> {
    let hash: B256 = rpc.call("eth_sendTransaction", json!([tx]))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r: Option<Value> = rpc.call("eth_getTransactionReceipt", json!([hash]))?;
        if let Some(r) = r {
            if r["status"] != "0x1" {
                return Err(VenueError::Contract {
                    name,
                    what: format!("transaction {hash} reverted"),
                });
            }
            return Ok(r);
        }
        if Instant::now() >= deadline {
            return Err(VenueError::Timeout("contract deployment receipt"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deploys `contract` from `from` (an account the node holds unlocked), with
/// `ctor_args` ABI-encoded after the creation code; returns its address.
pub fn deploy(
    rpc: &mut RpcClient,
    from: Address,
    contract: Contract,
    ctor_args: &[u8],
) -> Result<Address, VenueError> {
    let mut data = contract.creation_code()?.to_vec();
    data.extend_from_slice(ctor_args);
    let r = send_and_wait(
        rpc,
        contract.name(),
        json!({"from": from, "data": Bytes::from(data), "gas": "0x4c4b40"}),
    )?;
    r["contractAddress"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| VenueError::Contract {
            name: contract.name(),
            what: "the receipt names no contract address".into(),
        })
}

/// Deploys the deposit contract and the batch contract that calls it.
pub fn deploy_staking(rpc: &mut RpcClient, from: Address) -> Result<StakingContracts, VenueError> {
    let deposit = deploy(rpc, from, Contract::Deposit, &[])?;
    let mut arg = [0u8; 32];
    arg[12..].copy_from_slice(deposit.as_slice());
    let batch = deploy(rpc, from, Contract::Batch, &arg)?;
    Ok(StakingContracts { deposit, batch })
}

/// Installs the EIP-7002 and EIP-7251 request contracts at their addresses where the chain
/// has no code there (`anvil_setCode`); a chain that has them is left alone.
pub fn install_system_contracts(rpc: &mut RpcClient) -> Result<(), VenueError> {
    for (at, c) in [
        (WITHDRAWAL_REQUEST_CONTRACT, Contract::WithdrawalRequests),
        (
            CONSOLIDATION_REQUEST_CONTRACT,
            Contract::ConsolidationRequests,
        ),
    ] {
        let code: Bytes = rpc.call("eth_getCode", json!([at, "latest"]))?;
        if code.is_empty() {
            let _: Value = rpc.call("anvil_setCode", json!([at, c.runtime_code()?]))?;
        }
    }
    Ok(())
}

/// The current fee of a request contract (EIP-7002 / EIP-7251): an `eth_call` with empty
/// input.
pub fn request_fee(rpc: &mut RpcClient, contract: Address) -> Result<U256, VenueError> {
    let out: Bytes = rpc.call(
        "eth_call",
        json!([{"to": contract, "data": "0x"}, "latest"]),
    )?;
    if out.len() != 32 {
        return Err(VenueError::Protocol(
            "a request contract's fee is not a 32-byte word",
        ));
    }
    Ok(U256::from_be_slice(&out))
}

/// A decoded `DepositEvent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepositEventLog {
    /// Validator pubkey.
    pub pubkey: [u8; 48],
    /// Withdrawal credentials.
    pub withdrawal_credentials: [u8; 32],
    /// Amount in gwei.
    pub amount_gwei: u64,
    /// BLS signature.
    pub signature: [u8; 96],
    /// The deposit's index in the contract.
    pub index: u64,
}

/// The `i`-th dynamic `bytes` of an ABI tuple in `data`, if it is exactly `len` long.
fn abi_bytes(data: &[u8], i: usize, len: usize) -> Option<&[u8]> {
    let word = |at: usize| -> Option<usize> {
        let w = data.get(at..at.checked_add(32)?)?;
        if w[..24].iter().any(|&b| b != 0) {
            return None;
        }
        usize::try_from(u64::from_be_bytes(w[24..].try_into().ok()?)).ok()
    };
    let offset = word(i.checked_mul(32)?)?;
    if word(offset)? != len {
        return None;
    }
    let start = offset.checked_add(32)?;
    data.get(start..start.checked_add(len)?)
}

fn le64(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// Decodes a `DepositEvent`'s data; `None` unless every field has its length.
pub fn decode_deposit_event(data: &[u8]) -> Option<DepositEventLog> {
    Some(DepositEventLog {
        pubkey: abi_bytes(data, 0, 48)?.try_into().ok()?,
        withdrawal_credentials: abi_bytes(data, 1, 32)?.try_into().ok()?,
        amount_gwei: le64(abi_bytes(data, 2, 8)?)?,
        signature: abi_bytes(data, 3, 96)?.try_into().ok()?,
        index: le64(abi_bytes(data, 4, 8)?)?,
    })
}

/// Only the deposit index of a `DepositEvent`'s data (no allocation).
pub fn deposit_event_index(data: &[u8]) -> Option<u64> {
    le64(abi_bytes(data, 4, 8)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(index: u64) -> Vec<u8> {
        let fields: [Vec<u8>; 5] = [
            vec![1; 48],
            vec![2; 32],
            32_000_000_000u64.to_le_bytes().to_vec(),
            vec![3; 96],
            index.to_le_bytes().to_vec(),
        ];
        let mut head = Vec::new();
        let mut tail = Vec::new();
        for f in &fields {
            let mut w = [0u8; 32];
            w[24..].copy_from_slice(&((5 * 32 + tail.len()) as u64).to_be_bytes());
            head.extend_from_slice(&w);
            let mut l = [0u8; 32];
            l[24..].copy_from_slice(&(f.len() as u64).to_be_bytes());
            tail.extend_from_slice(&l);
            tail.extend_from_slice(f);
            tail.resize(tail.len().div_ceil(32) * 32, 0);
        }
        head.extend_from_slice(&tail);
        head
    }

    #[test]
    fn deposit_events_decode_and_bad_data_does_not() {
        let d = event(7);
        let e = decode_deposit_event(&d).unwrap();
        assert_eq!(
            (e.pubkey, e.amount_gwei, e.index),
            ([1; 48], 32_000_000_000, 7)
        );
        assert_eq!(deposit_event_index(&d), Some(7));
        for cut in [0, 31, 100, d.len() - 25] {
            assert_eq!(decode_deposit_event(&d[..cut]), None);
        }
        let mut bad = d.clone();
        bad[31] = 0xff; // the first offset points past the end
        assert_eq!(decode_deposit_event(&bad), None);
        let mut huge = d;
        huge[0] = 1; // an offset beyond 64 bits
        assert_eq!(decode_deposit_event(&huge), None);
    }

    #[test]
    fn every_contract_has_its_code() {
        for c in [
            Contract::Deposit,
            Contract::Batch,
            Contract::WithdrawalRequests,
            Contract::ConsolidationRequests,
        ] {
            assert!(c.creation_code().unwrap().len() > 100, "{}", c.name());
            assert!(c.runtime_code().unwrap().len() > 100, "{}", c.name());
        }
    }
}
