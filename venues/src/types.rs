//! What the node tells us, decoded: receipts, headers, transactions.
//!
//! The wire structs use alloy-primitives' quantity types (`U64`, `U128`,
//! `U256`), which decode `0x`-prefixed hex quantities; the public views are
//! plain integers.

use alloy_primitives::{Address, B256, Bytes, U8, U64, U128, U256};
use serde::Deserialize;

/// The fee inputs a signer needs: the latest base fee and the node's priority
/// fee suggestion, both in wei per gas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FeeEstimate {
    /// `baseFeePerGas` of the latest block.
    pub base_fee_per_gas: u128,
    /// `eth_maxPriorityFeePerGas`.
    pub max_priority_fee_per_gas: u128,
}

impl FeeEstimate {
    /// The usual EIP-1559 cap: twice the base fee plus the tip (survives six
    /// consecutive full blocks of base-fee growth).
    pub fn suggested_max_fee_per_gas(&self) -> u128 {
        self.base_fee_per_gas
            .saturating_mul(2)
            .saturating_add(self.max_priority_fee_per_gas)
    }
}

/// A transaction as `eth_getTransactionByHash` returns it.
#[derive(Clone, Debug)]
pub struct TxView {
    /// Transaction hash.
    pub hash: B256,
    /// Sender.
    pub from: Address,
    /// Recipient; `None` for contract creation.
    pub to: Option<Address>,
    /// Value in wei.
    pub value: U256,
    /// Sender nonce.
    pub nonce: u64,
    /// Call data.
    pub input: Bytes,
    /// Block it was included in; `None` while pending.
    pub block_number: Option<u64>,
    /// Gas limit.
    pub gas_limit: u64,
    /// EIP-1559 fee cap; `None` for legacy transactions.
    pub max_fee_per_gas: Option<u128>,
    /// Chain id; `None` for pre-EIP-155 legacy transactions.
    pub chain_id: Option<u64>,
    /// EIP-2718 type (0 legacy, 1 access list, 2 EIP-1559, 3 blob, 4 set-code).
    pub tx_type: u8,
}

/// The part of a receipt the engine acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiptSummary {
    /// Transaction hash.
    pub tx_hash: B256,
    /// Block it was included in.
    pub block_number: u64,
    /// Hash of that block.
    pub block_hash: B256,
    /// `status == 0x1`.
    pub success: bool,
    /// Gas used by this transaction alone.
    pub gas_used: u64,
    /// Sender.
    pub from: Address,
    /// Recipient; `None` for contract creation.
    pub to: Option<Address>,
    /// The `DepositEvent` logs the transaction emitted (a validator deposit).
    pub deposits: DepositLogs,
}

/// What a receipt says of validator deposits: the `DepositEvent` logs of one emitter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DepositLogs {
    /// The contract that emitted them (the first `DepositEvent`'s address).
    pub emitter: Address,
    /// Deposit index of the first.
    pub first_index: u64,
    /// How many (0: none).
    pub count: u16,
}

/// A `newHeads` notification / block header, as far as we need it.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HeaderJson {
    pub number: U64,
    pub hash: B256,
    pub parent_hash: B256,
    #[serde(default)]
    pub base_fee_per_gas: Option<U128>,
    pub timestamp: U64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReceiptJson {
    pub transaction_hash: B256,
    pub block_number: U64,
    pub block_hash: B256,
    #[serde(default)]
    pub status: Option<U64>,
    pub gas_used: U64,
    pub from: Address,
    #[serde(default)]
    pub to: Option<Address>,
    #[serde(default)]
    pub logs: Vec<LogJson>,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct LogJson {
    pub address: Address,
    #[serde(default)]
    pub topics: Vec<B256>,
    #[serde(default)]
    pub data: Bytes,
}

impl From<ReceiptJson> for ReceiptSummary {
    fn from(r: ReceiptJson) -> Self {
        let mut deposits = DepositLogs::default();
        for l in &r.logs {
            if l.topics.first() != Some(&crate::contracts::DEPOSIT_EVENT_TOPIC)
                || (deposits.count > 0 && l.address != deposits.emitter)
            {
                continue;
            }
            let Some(index) = crate::contracts::deposit_event_index(&l.data) else {
                continue;
            };
            if deposits.count == 0 {
                deposits = DepositLogs {
                    emitter: l.address,
                    first_index: index,
                    count: 0,
                };
            }
            deposits.count = deposits.count.saturating_add(1);
        }
        ReceiptSummary {
            tx_hash: r.transaction_hash,
            block_number: r.block_number.to(),
            block_hash: r.block_hash,
            success: r.status == Some(U64::from(1)),
            gas_used: r.gas_used.to(),
            from: r.from,
            to: r.to,
            deposits,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TxJson {
    pub hash: B256,
    pub from: Address,
    #[serde(default)]
    pub to: Option<Address>,
    pub value: U256,
    pub nonce: U64,
    pub input: Bytes,
    #[serde(default)]
    pub block_number: Option<U64>,
    pub gas: U64,
    #[serde(default)]
    pub max_fee_per_gas: Option<U128>,
    #[serde(default)]
    pub chain_id: Option<U64>,
    #[serde(rename = "type", default)]
    pub tx_type: Option<U8>,
}

impl From<TxJson> for TxView {
    fn from(t: TxJson) -> Self {
        TxView {
            hash: t.hash,
            from: t.from,
            to: t.to,
            value: t.value,
            nonce: t.nonce.to(),
            input: t.input,
            block_number: t.block_number.map(|n| n.to()),
            gas_limit: t.gas.to(),
            max_fee_per_gas: t.max_fee_per_gas.map(|f| f.to()),
            chain_id: t.chain_id.map(|c| c.to()),
            tx_type: t.tx_type.map_or(0, |t| t.to()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_anvil_receipt() {
        let json = r#"{"type":"0x2","status":"0x1","cumulativeGasUsed":"0x5208","logs":[],
            "transactionHash":"0x82f0a8d78349d967f1a8ee9bf10538b6ccc51a3a92b642238500f26cc37a6ecf",
            "transactionIndex":"0x0",
            "blockHash":"0xd4bf4eb989af98bb243a8d36946c0759264c468615b9b710d2ccdf06e7ddf5cf",
            "blockNumber":"0xa","gasUsed":"0x5208","effectiveGasPrice":"0x11ebac8c",
            "from":"0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266",
            "to":"0x70997970c51812dc3a010c7d01b50e0d17dc79c8","contractAddress":null}"#;
        let r: ReceiptSummary = serde_json::from_str::<ReceiptJson>(json).unwrap().into();
        assert!(r.success);
        assert_eq!((r.block_number, r.gas_used), (10, 21_000));
        assert_eq!(r.from, crate::anvil::DEV_ADDRESSES[0]);
        assert_eq!(r.to, Some(crate::anvil::DEV_ADDRESSES[1]));

        let failed = json
            .replace(r#""status":"0x1""#, r#""status":"0x0""#)
            .replace(
                r#""to":"0x70997970c51812dc3a010c7d01b50e0d17dc79c8""#,
                r#""to":null"#,
            );
        let r: ReceiptSummary = serde_json::from_str::<ReceiptJson>(&failed).unwrap().into();
        assert!(!r.success);
        assert_eq!(r.to, None);
    }

    #[test]
    fn decodes_header_with_and_without_base_fee() {
        let json = r#"{"hash":"0x8a55a4c6c93f320b811f09f14bbd420ff55e37d0d6c139e4126c38e383e2d939",
            "parentHash":"0xd4bf4eb989af98bb243a8d36946c0759264c468615b9b710d2ccdf06e7ddf5cf",
            "number":"0xb","gasLimit":"0x1c9c380","timestamp":"0x6b019596","baseFeePerGas":"0xfaf0481"}"#;
        let h: HeaderJson = serde_json::from_str(json).unwrap();
        assert_eq!(h.number.to::<u64>(), 11);
        assert_eq!(h.base_fee_per_gas.map(|b| b.to::<u128>()), Some(0xfaf0481));
        let h: HeaderJson =
            serde_json::from_str(&json.replace(r#","baseFeePerGas":"0xfaf0481""#, "")).unwrap();
        assert_eq!(h.base_fee_per_gas, None);
    }

    #[test]
    fn suggested_cap() {
        let f = FeeEstimate {
            base_fee_per_gas: 10,
            max_priority_fee_per_gas: 3,
        };
        assert_eq!(f.suggested_max_fee_per_gas(), 23);
    }
}
