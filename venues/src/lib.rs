//! # venues — the network side of the execution engine
//!
//! Everything that talks to an Ethereum node: starting the dev chain
//! ([`anvil`]), blocking JSON-RPC for start-up and slow paths ([`rpc`]), the
//! hot path's broadcast connection ([`broadcast`]), the head and receipt
//! subscription ([`heads`]) and the fee view it keeps warm ([`fees`]).
//! Private order flow goes to a builder's relay instead ([`relay`]): signed
//! `eth_sendPrivateTransaction` over one persistent HTTP/1.1 connection.
//! The consensus side is read through the Beacon API ([`beacon`]): a blocking
//! client for the head and validator routes, and [`ValidatorWatch`], which
//! turns its reads into status events, epoch balances and alerts; tests run
//! it against a loopback node (`beacon_sim`, feature `testkit`).
//!
//! ## Design
//!
//! - **One WebSocket per role, persistent.** The broadcast stage owns a
//!   [`BroadcastConnection`]; the receipts stage owns a [`HeadFollower`];
//!   start-up code and tests use an [`RpcClient`]. No connection is shared
//!   between threads, so none needs a lock.
//! - **Blocking only where it is cheap to reason about.** `connect` on every
//!   type dials and does the WebSocket handshake on a blocking socket with
//!   timeouts (at most a few seconds, once). [`RpcClient`] stays blocking:
//!   it is for start-up (chain id, nonces, balances) and slow paths.
//!   [`BroadcastConnection`] and [`HeadFollower`] switch their socket to
//!   non-blocking after the handshake and are driven by the caller's
//!   [`mio::Poll`]: `register` once, then call `poll_responses` / `poll` on
//!   each readiness event. Those calls never block, never sleep, and drain
//!   the socket until it would block (mio is edge-triggered).
//! - **The hot path allocates nothing in steady state.** A send hand-writes
//!   `{"jsonrpc":"2.0","id":N,"method":"eth_sendRawTransaction","params":["0x…"]}`
//!   into a reused buffer with a hex encoder; replies are decoded from
//!   borrowed JSON; the id → tag table is a preallocated ring. A counting
//!   allocator test (`tests/broadcast_alloc.rs`) holds this.
//! - **Fees are read, not fetched.** [`HeadFollower`] updates a shared
//!   [`FeeView`] once per block; the signing stage reads it with a few atomic
//!   loads ([`FeeView::load`]), never an RPC round trip.
//! - **One typed error**, [`VenueError`]. Node error messages are carried
//!   verbatim ([`VenueError::Rpc`], [`RpcErrorInfo`]); nothing else is a string.
//!
//! ## Invariants
//!
//! - A [`BroadcastConnection`] reports every reply exactly once, with the
//!   caller's tag; a reply whose id it did not send is ignored, never
//!   misattributed. Bytes the kernel did not accept stay queued and are sent
//!   by the next `send_raw_transaction` or `poll_responses`; nothing is dropped.
//! - After any error other than [`VenueError::Rpc`] from
//!   [`HeadFollower::poll`], and after any error from the broadcast
//!   connection, the connection is closed and every later call returns
//!   [`VenueError::Closed`]; the owner reconnects.
//! - [`FeeView`] readers never wait for a writer (two slots, see [`fees`]).
//! - [`HeadEvent::NewHead`] for a block is reported before its
//!   [`HeadEvent::BlockReceipts`], and the [`FeeView`] holds the head's base
//!   fee before `NewHead` is reported.
//! - [`HeadFollower`] reports reorganisations: a [`HeadEvent::Reorg`] comes
//!   before the `NewHead` of the first block replacing the dropped ones, and
//!   the new canonical blocks follow in ascending order, each the child of the
//!   one before (the first, of `common_ancestor`). `dropped` holds only blocks
//!   reported as `NewHead`, and no `BlockReceipts` for a dropped block follows
//!   its `Reorg`. Missing headers (a deep fork, skipped heads) are fetched on
//!   the same connection, without blocking; a fork deeper than
//!   [`heads::REORG_WINDOW`] blocks is reported with `beyond_window`.
//! - An [`Anvil`] owns its child process: the child is killed and reaped when
//!   the value drops, and its output pipes are always drained.
//!
//! ## What blocks
//!
//! | call | blocks? |
//! |---|---|
//! | [`Anvil::spawn`] | yes, until anvil answers (≤ 30 s) |
//! | every `connect` | yes, dial + handshake (≤ 10 s) |
//! | [`RpcClient`] methods | yes, one round trip (≤ its timeout, 10 s default) |
//! | [`BroadcastConnection::send_raw_transaction`], [`BroadcastConnection::poll_responses`] | no |
//! | [`HeadFollower::poll`] | no |
//! | [`RelayConnection::connect`] | yes, dial only (≤ 5 s per address) |
//! | [`RelayConnection::send_private_transaction`], [`RelayConnection::cancel_private_transaction`], [`RelayConnection::poll_responses`] | no |
//! | [`FeeView::load`], [`FeeView::store`] | no |
//! | [`BeaconClient::connect`] | yes, dial only (≤ 5 s per address) |
//! | [`BeaconClient`] methods, [`ValidatorWatch::poll`] | yes, one round trip per request (≤ its timeout, 10 s default) |

#![deny(missing_docs)]

pub mod anvil;
pub mod beacon;
#[cfg(feature = "testkit")]
pub mod beacon_sim;
pub mod broadcast;
pub mod contracts;
pub mod error;
#[cfg(feature = "testkit")]
pub mod fault;
pub mod fees;
pub mod heads;
pub mod relay;
#[cfg(feature = "testkit")]
pub mod relay_sim;
pub mod rpc;
mod types;
mod ws;

pub use anvil::{
    ANVIL_VERSION, Anvil, AnvilConfig, DEV_ADDRESSES, DEV_PRIVATE_KEYS, dev_address, locate_anvil,
};
pub use beacon::{
    AlertKind, BeaconClient, BeaconHead, BlsPubkey, StateId, ValidatorId, ValidatorInfo,
    ValidatorStatus, ValidatorWatch, WatchConfig, WatchEvent,
};
pub use broadcast::{BroadcastConnection, RpcErrorInfo, WriteStamps};
pub use error::VenueError;
pub use fees::{FeeSnapshot, FeeView};
pub use heads::{HeadEvent, HeadFollower};
pub use relay::{RelayAuth, RelayConnection, RelayReply, verify_flashbots_signature};
pub use rpc::{FeeEstimate, ReceiptSummary, RpcClient, TxView};
pub use types::DepositLogs;
