//! The receipts side: one persistent, non-blocking WebSocket subscribed to
//! `newHeads`, owned by one stage thread.
//!
//! For each new head the follower asks, on the same connection,
//! `eth_getBlockReceipts` (one call per block, by block hash so a reorg
//! cannot hand us another block's receipts) and `eth_maxPriorityFeePerGas`,
//! and keeps the shared [`FeeView`] current: the base fee from the header as
//! soon as it arrives, the tip when its reply does. Everything is driven by
//! the subscription and mio readiness: no timers, no sleeps, no polling of
//! the node.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_primitives::{B256, U128};
use serde::Deserialize;
use serde_json::value::RawValue;
use tungstenite::Message;

use crate::error::VenueError;
use crate::fees::FeeView;
use crate::types::{HeaderJson, ReceiptJson, ReceiptSummary};
use crate::ws::{self, Envelope, Flush, Ws};

/// Replies can be whole blocks of receipts (about 1 MB for a full block of
/// transfers); read in 64 KiB steps.
const READ_BUFFER: usize = 64 * 1024;

/// Bound on the blocking connect, handshake and subscription.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Id of the `eth_subscribe` request; later requests count up from 2.
const SUBSCRIBE_ID: u64 = 1;

/// What the follower reports.
#[derive(Clone, Debug)]
pub enum HeadEvent {
    /// A new head arrived (from the subscription). The [`FeeView`] already
    /// holds its base fee when this is reported.
    NewHead {
        /// Block number.
        number: u64,
        /// Block hash.
        hash: B256,
        /// Parent hash; a parent that is not the previous head's hash is a reorg.
        parent_hash: B256,
        /// `baseFeePerGas`; `None` before London.
        base_fee_per_gas: Option<u128>,
        /// Block timestamp, seconds.
        timestamp: u64,
    },
    /// The receipts of a block reported earlier as [`HeadEvent::NewHead`],
    /// in transaction order. Not reported if the node no longer knows the
    /// block (it was reorganised away before the request reached it).
    BlockReceipts {
        /// Block number.
        number: u64,
        /// Block hash.
        hash: B256,
        /// One per transaction.
        receipts: Vec<ReceiptSummary>,
    },
}

/// A request the follower sent and awaits.
#[derive(Clone, Copy, Debug)]
enum Pending {
    Receipts { number: u64, hash: B256 },
    PriorityFee,
}

#[derive(Deserialize)]
struct SubscriptionParams<'a> {
    #[serde(borrow)]
    subscription: &'a str,
    #[serde(borrow)]
    result: &'a RawValue,
}

/// Follows the chain head over one WebSocket and keeps a [`FeeView`] warm.
///
/// `connect` blocks (bounded) until the subscription is confirmed, so no head
/// produced after `connect` returns is missed. After that nothing blocks.
#[derive(Debug)]
pub struct HeadFollower {
    ws: Ws,
    fees: Arc<FeeView>,
    subscription: String,
    next_id: u64,
    /// Requests awaiting a reply, in send order.
    pending: VecDeque<(u64, Pending)>,
    write_pending: bool,
    closed: bool,
}

impl HeadFollower {
    /// Connects, subscribes to `newHeads` and waits for the subscription id
    /// (blocking, at most 10 s), then makes the socket non-blocking.
    pub fn connect(ws_url: &str, fees: Arc<FeeView>) -> Result<Self, VenueError> {
        let mut ws = ws::connect_blocking(ws_url, READ_BUFFER, CONNECT_TIMEOUT)?;
        let req = format!(
            r#"{{"jsonrpc":"2.0","id":{SUBSCRIBE_ID},"method":"eth_subscribe","params":["newHeads"]}}"#
        );
        ws.send(Message::Text(req.into())).map_err(|e| {
            if ws::is_would_block(&e) {
                VenueError::Timeout("eth_subscribe write")
            } else {
                e.into()
            }
        })?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let subscription = loop {
            let msg = match ws.read() {
                Ok(m) => m,
                Err(e) if ws::is_would_block(&e) => {
                    return Err(VenueError::Timeout("eth_subscribe reply"));
                }
                Err(e) => return Err(e.into()),
            };
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(_) => return Err(VenueError::Closed),
                _ => continue,
            };
            let env: Envelope<'_> = serde_json::from_str(&text)?;
            if env.id == Some(SUBSCRIBE_ID) {
                if let Some(err) = env.error {
                    return Err(VenueError::Rpc {
                        code: err.code,
                        message: err.message,
                    });
                }
                let raw = env
                    .result
                    .ok_or(VenueError::Protocol("eth_subscribe returned null"))?;
                break serde_json::from_str::<String>(raw.get())?;
            }
            if Instant::now() >= deadline {
                return Err(VenueError::Timeout("eth_subscribe reply"));
            }
        };
        ws::set_nonblocking(&ws)?;
        Ok(HeadFollower {
            ws,
            fees,
            subscription,
            next_id: SUBSCRIBE_ID + 1,
            pending: VecDeque::with_capacity(64),
            write_pending: false,
            closed: false,
        })
    }

    /// Registers the socket with `registry` for read and write readiness
    /// (edge-triggered). Call [`HeadFollower::poll`] once right after
    /// registering (frames may already be buffered from `connect`), then on
    /// every event for `token`.
    pub fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
    ) -> Result<(), VenueError> {
        ws::register(&self.ws, registry, token)
    }

    /// The node's id for our `newHeads` subscription.
    pub fn subscription_id(&self) -> &str {
        &self.subscription
    }

    /// The shared fee view this follower writes.
    pub fn fees(&self) -> &Arc<FeeView> {
        &self.fees
    }

    /// Requests sent (receipts, tips) whose reply has not arrived.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    /// Handles every frame available without blocking, calling `f` for each
    /// event, and flushes queued requests. Returns the number of events.
    ///
    /// Drains until the socket would block, as edge-triggered readiness
    /// requires, even when a request failed: a JSON-RPC error for one of the
    /// follower's own requests is returned as `Err(VenueError::Rpc)` after
    /// the drain (events before and after it were already delivered; the
    /// connection stays usable). Any other error means the connection is gone.
    pub fn poll(&mut self, mut f: impl FnMut(HeadEvent)) -> Result<usize, VenueError> {
        if self.closed {
            return Err(VenueError::Closed);
        }
        if self.write_pending {
            self.flush()?;
        }
        let mut events = 0;
        let mut rpc_error = None;
        loop {
            let msg = match self.ws.read() {
                Ok(m) => m,
                Err(e) if ws::is_would_block(&e) => break,
                Err(e) => return Err(self.fail(e.into())),
            };
            let text = match &msg {
                Message::Text(t) => t.as_str(),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                Message::Binary(_) => {
                    return Err(
                        self.fail(VenueError::Protocol("binary frame on a JSON-RPC socket"))
                    );
                }
                Message::Close(_) => return Err(self.fail(VenueError::Closed)),
            };
            match self.handle_frame(text, &mut f) {
                Ok(n) => events += n,
                Err(e @ VenueError::Rpc { .. }) => {
                    rpc_error.get_or_insert(e);
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        self.flush()?;
        match rpc_error {
            Some(e) => Err(e),
            None => Ok(events),
        }
    }

    /// Handles one text frame; returns how many events it produced.
    fn handle_frame(
        &mut self,
        text: &str,
        f: &mut impl FnMut(HeadEvent),
    ) -> Result<usize, VenueError> {
        let env: Envelope<'_> = serde_json::from_str(text)?;
        if env.method == Some("eth_subscription") {
            let params = env
                .params
                .ok_or(VenueError::Protocol("notification without params"))?;
            let params: SubscriptionParams<'_> = serde_json::from_str(params.get())?;
            if params.subscription != self.subscription {
                return Ok(0);
            }
            let head: HeaderJson = serde_json::from_str(params.result.get())?;
            return self.on_head(head, f).map(|()| 1);
        }
        let Some(id) = env.id else { return Ok(0) };
        let Some(pending) = self.take_pending(id) else {
            return Ok(0);
        };
        if let Some(err) = env.error {
            return Err(VenueError::Rpc {
                code: err.code,
                message: err.message,
            });
        }
        match pending {
            Pending::Receipts { number, hash } => {
                let Some(raw) = env.result else { return Ok(0) };
                let receipts: Vec<ReceiptJson> = serde_json::from_str(raw.get())?;
                let receipts = receipts.into_iter().map(ReceiptSummary::from).collect();
                f(HeadEvent::BlockReceipts {
                    number,
                    hash,
                    receipts,
                });
                Ok(1)
            }
            Pending::PriorityFee => {
                let raw = env
                    .result
                    .ok_or(VenueError::Protocol("eth_maxPriorityFeePerGas null"))?;
                let tip: U128 = serde_json::from_str(raw.get())?;
                self.fees.update_priority_fee(tip.to());
                Ok(0)
            }
        }
    }

    fn on_head(
        &mut self,
        head: HeaderJson,
        f: &mut impl FnMut(HeadEvent),
    ) -> Result<(), VenueError> {
        let number: u64 = head.number.to();
        let base_fee = head.base_fee_per_gas.map(|b| b.to::<u128>());
        if let Some(base) = base_fee {
            self.fees.update_base_fee(base, number);
        }
        let receipts_req = format!(
            r#"{{"jsonrpc":"2.0","id":{},"method":"eth_getBlockReceipts","params":["{}"]}}"#,
            self.next_id, head.hash
        );
        self.queue(
            receipts_req,
            Pending::Receipts {
                number,
                hash: head.hash,
            },
        )?;
        let tip_req = format!(
            r#"{{"jsonrpc":"2.0","id":{},"method":"eth_maxPriorityFeePerGas","params":[]}}"#,
            self.next_id
        );
        self.queue(tip_req, Pending::PriorityFee)?;
        f(HeadEvent::NewHead {
            number,
            hash: head.hash,
            parent_hash: head.parent_hash,
            base_fee_per_gas: base_fee,
            timestamp: head.timestamp.to(),
        });
        Ok(())
    }

    /// Queues a request with the id `self.next_id` (flushed by `poll`).
    fn queue(&mut self, req: String, what: Pending) -> Result<(), VenueError> {
        self.pending.push_back((self.next_id, what));
        self.next_id += 1;
        match self.ws.write(Message::Text(req.into())) {
            Ok(()) => Ok(()),
            Err(e) if ws::is_would_block(&e) => {
                self.write_pending = true;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn take_pending(&mut self, id: u64) -> Option<Pending> {
        let pos = self.pending.iter().position(|&(i, _)| i == id)?;
        self.pending.remove(pos).map(|(_, p)| p)
    }

    fn flush(&mut self) -> Result<(), VenueError> {
        match ws::flush(&mut self.ws) {
            Ok(Flush::Done) => {
                self.write_pending = false;
                Ok(())
            }
            Ok(Flush::Pending) => {
                self.write_pending = true;
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn fail(&mut self, e: VenueError) -> VenueError {
        self.closed = true;
        e
    }
}
