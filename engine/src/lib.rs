//! The execution engine: desk intents in over WebSocket, signed Ethereum transactions out,
//! every state change streamed back.
//!
//! ```text
//! desk ──WS──▶ intake ─ring─▶ policy ─ring─▶ signing ─ring─▶ broadcast ─ring─▶ receipts
//!  ▲                                                                              │
//!  └──────────── status fan-out ◀── every stage (many-to-one ring) ◀──────────────┘
//! ```
//!
//! # Design
//!
//! - [`server`]: the desk side. One port serves `/v1/ws` (JWT bearer auth on the upgrade)
//!   and the HTTP endpoints. Connection tasks decode JSON ([`protocol`]) off the hot path
//!   into a fixed-size [`msg::IntentMsg`] and `try_push` it into the intake ring; a full
//!   ring is answered with `overloaded`.
//! - [`stages`]: the pipeline stages, each the single owner of its state: intake
//!   (sequence numbers, idempotency keys), policy (allowlists, caps), signing (nonces,
//!   EIP-1559 build, [`signers::Signer`]), broadcast (node connection), receipts (head
//!   subscription), status (latest state per intent, routing to desks). They run on the
//!   `pipeline` crate's runner; the CPU stages run fused on one thread when cores are
//!   scarce, one thread each otherwise ([`config::Layout`]).
//! - [`blob`]: fixed slots for calldata and raw transactions, so ring messages stay small
//!   and `Copy`.
//! - [`txbuild`]: EIP-1559 encoding into a caller's buffer, byte-identical to alloy's.
//! - [`journal`]: the write-ahead intent journal's storage: lanes of memory-mapped,
//!   checksummed segments with one writer each, group commit, replay and compaction;
//!   [`recovery`]: what a restarted engine makes of it (replay, chain check, plan).
//! - [`audit`]: the tamper-evident audit log (a hash chain of JSON lines) and its
//!   `verify` and `export`.
//! - [`engine`]: assembly and lifecycle; [`dev`] and [`demo`]: the dev chain and the
//!   built-in desk.
//!
//! # Invariants
//!
//! - An intent id is used at most once per principal: a resubmission is answered from
//!   state and never reaches policy or signing (intake owns the table).
//! - Nonces are assigned only by the signing stage, consecutively per account, and only
//!   to transactions it signed; a failure before signing consumes no nonce.
//! - Every state change of an accepted intent reaches the status thread, in order: stages
//!   wait for room in the status ring rather than drop an event.
//! - Nothing on the path from the intake ring to the node socket allocates, locks, or
//!   formats text in steady state (see `tests/hot_path_alloc.rs`).
//! - A blob slot has exactly one owner: the holder of the message that refers to it.
//! - With a journal, an intent is recorded before its `ack` and a transaction before any
//!   node sees it; after a restart a transaction is only sent again with its recorded
//!   bytes.
#![deny(missing_docs)]

pub mod atrest;
pub mod audit;
pub mod auth;
pub mod blob;
pub mod config;
pub mod custody;
pub mod demo;
pub mod desk;
pub mod dev;
pub mod engine;
pub mod error;
pub mod journal;
pub mod limits;
pub mod metrics;
pub mod msg;
pub mod protocol;
pub mod recovery;
pub mod risk;
pub mod server;
pub mod stages;
pub mod staking;
pub mod tls;
pub mod txbuild;

pub use config::Config;

/// The engine's log filter: `spec` (`RUST_LOG` syntax; `info` when unset or invalid),
/// with the libraries' request dumps always off, whatever `spec` asks: tungstenite's
/// handshake logs each request whole at TRACE, `Authorization` header (the desk's token)
/// included, so its handshake logs are capped at INFO (the default level, so nothing is
/// added to a default log).
pub fn log_filter(spec: Option<&str>) -> tracing_subscriber::EnvFilter {
    let base = spec
        .and_then(|s| tracing_subscriber::EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    match "tungstenite::handshake=info".parse() {
        Ok(d) => base.add_directive(d),
        Err(_) => base,
    }
}
pub use engine::Engine;
pub use error::EngineError;
