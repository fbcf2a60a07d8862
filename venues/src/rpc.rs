//! A blocking JSON-RPC client over one WebSocket, for start-up, tests and
//! slow paths (nonce and fee seeding, reconciliation). Not the hot path: it
//! allocates per call and blocks until the reply or the timeout.

use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, U64, U128, U256};
use serde::de::DeserializeOwned;
use serde_json::json;
use tungstenite::Message;

use crate::error::VenueError;
pub use crate::types::{FeeEstimate, ReceiptSummary, TxView};
use crate::types::{HeaderJson, ReceiptJson, TxJson};
use crate::ws::{self, Envelope, Ws};

/// Default bound on one call (send + reply).
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// Read buffer for the blocking client: replies can be whole blocks.
const READ_BUFFER: usize = 64 * 1024;

/// A blocking JSON-RPC client: a tungstenite WebSocket over a `std` TCP
/// stream with `TCP_NODELAY` and a read timeout.
///
/// One call at a time; frames that are not the awaited reply (subscription
/// notifications, stale replies) are skipped. Owned by one thread.
#[derive(Debug)]
pub struct RpcClient {
    ws: Ws,
    next_id: u64,
    timeout: Duration,
}

impl RpcClient {
    /// Connects with [`DEFAULT_RPC_TIMEOUT`].
    pub fn connect(ws_url: &str) -> Result<RpcClient, VenueError> {
        Self::connect_with_timeout(ws_url, DEFAULT_RPC_TIMEOUT)
    }

    /// Connects; `timeout` bounds the handshake and every later call.
    pub fn connect_with_timeout(ws_url: &str, timeout: Duration) -> Result<RpcClient, VenueError> {
        let ws = ws::connect_blocking(ws_url, READ_BUFFER, timeout)?;
        Ok(RpcClient {
            ws,
            next_id: 1,
            timeout,
        })
    }

    /// Changes the per-call timeout.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), VenueError> {
        self.ws.get_ref().set_read_timeout(Some(timeout))?;
        self.ws.get_ref().set_write_timeout(Some(timeout))?;
        self.timeout = timeout;
        Ok(())
    }

    /// Calls `method` with `params` (a JSON array) and decodes the result.
    ///
    /// A JSON-RPC error becomes [`VenueError::Rpc`]; a `null` result decodes
    /// into `R` as JSON `null` (so `Option<T>` gets `None`).
    pub fn call<R: DeserializeOwned>(
        &mut self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<R, VenueError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        self.ws
            .send(Message::Text(req.to_string().into()))
            .map_err(|e| {
                if ws::is_would_block(&e) {
                    VenueError::Timeout("rpc request write")
                } else {
                    e.into()
                }
            })?;

        let deadline = Instant::now() + self.timeout;
        loop {
            let msg = match self.ws.read() {
                Ok(m) => m,
                Err(e) if ws::is_would_block(&e) => return Err(VenueError::Timeout("rpc reply")),
                Err(e) => return Err(e.into()),
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Binary(b) => match String::from_utf8(b.to_vec()) {
                    Ok(s) => s.into(),
                    Err(_) => return Err(VenueError::Protocol("non-UTF-8 binary frame")),
                },
                Message::Close(_) => return Err(VenueError::Closed),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            let env: Envelope<'_> = serde_json::from_str(&text)?;
            if env.id == Some(id) {
                if let Some(err) = env.error {
                    return Err(VenueError::Rpc {
                        code: err.code,
                        message: err.message,
                    });
                }
                let raw = env.result.map_or("null", |r| r.get());
                return Ok(serde_json::from_str(raw)?);
            }
            // Not ours (a notification or a stale reply): keep waiting, but
            // not past the deadline.
            if Instant::now() >= deadline {
                return Err(VenueError::Timeout("rpc reply"));
            }
        }
    }

    /// `eth_chainId`.
    pub fn chain_id(&mut self) -> Result<u64, VenueError> {
        Ok(self.call::<U64>("eth_chainId", json!([]))?.to())
    }

    /// `eth_getTransactionCount` at `block` (`"pending"`, `"latest"`, or a hex number).
    pub fn transaction_count(&mut self, addr: Address, block: &str) -> Result<u64, VenueError> {
        Ok(self
            .call::<U64>("eth_getTransactionCount", json!([addr, block]))?
            .to())
    }

    /// `eth_getBalance` at `latest`, in wei.
    pub fn balance(&mut self, addr: Address) -> Result<U256, VenueError> {
        self.call("eth_getBalance", json!([addr, "latest"]))
    }

    /// `eth_blockNumber`.
    pub fn block_number(&mut self) -> Result<u64, VenueError> {
        Ok(self.call::<U64>("eth_blockNumber", json!([]))?.to())
    }

    /// The latest block's base fee plus `eth_maxPriorityFeePerGas`.
    pub fn fee_estimate(&mut self) -> Result<FeeEstimate, VenueError> {
        let head: Option<HeaderJson> =
            self.call("eth_getBlockByNumber", json!(["latest", false]))?;
        let head = head.ok_or(VenueError::Protocol("node has no latest block"))?;
        let tip: U128 = self.call("eth_maxPriorityFeePerGas", json!([]))?;
        Ok(FeeEstimate {
            base_fee_per_gas: head.base_fee_per_gas.map_or(0, |b| b.to()),
            max_priority_fee_per_gas: tip.to(),
        })
    }

    /// `eth_getTransactionByHash`; `None` if the node does not know it.
    pub fn transaction_by_hash(&mut self, h: B256) -> Result<Option<TxView>, VenueError> {
        let tx: Option<TxJson> = self.call("eth_getTransactionByHash", json!([h]))?;
        Ok(tx.map(Into::into))
    }

    /// `eth_getTransactionReceipt`; `None` while the transaction is not mined.
    pub fn receipt(&mut self, h: B256) -> Result<Option<ReceiptSummary>, VenueError> {
        let r: Option<ReceiptJson> = self.call("eth_getTransactionReceipt", json!([h]))?;
        Ok(r.map(Into::into))
    }

    /// `eth_getBlockReceipts` for a block number; `None` if the block is unknown.
    pub fn block_receipts(
        &mut self,
        number: u64,
    ) -> Result<Option<Vec<ReceiptSummary>>, VenueError> {
        let r: Option<Vec<ReceiptJson>> =
            self.call("eth_getBlockReceipts", json!([U64::from(number)]))?;
        Ok(r.map(|v| v.into_iter().map(Into::into).collect()))
    }

    /// `eth_sendRawTransaction` with EIP-2718 encoded bytes; returns the hash
    /// the node computed.
    pub fn send_raw_transaction(&mut self, raw: &[u8]) -> Result<B256, VenueError> {
        self.call(
            "eth_sendRawTransaction",
            json!([alloy_primitives::hex::encode_prefixed(raw)]),
        )
    }
}
