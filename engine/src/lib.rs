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
pub mod monitor;
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
/// How the binary writes its log lines (`--log-format`, `ENGINE_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (the message
    /// and the event's fields), `span`/`spans` when inside spans.
    Json,
}

impl LogFormat {
    /// `text` or `json`.
    pub fn parse(s: &str) -> Option<LogFormat> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// The binary's log subscriber: `format`, filtered by [`log_filter`] of `spec`, writing to
/// `writer`.
pub fn log_subscriber<W>(
    format: LogFormat,
    spec: Option<&str>,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter(spec))
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().with_ansi(false).finish()),
    }
}

pub use engine::Engine;
pub use error::EngineError;

#[cfg(test)]
mod log_tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::{LogFormat, log_subscriber};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(format: LogFormat, spec: Option<&str>) -> Vec<String> {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = log_subscriber(format, spec, move || out.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::info!(account = "dev0", seq = 7u64, "custody");
            tracing::debug!("hidden at info");
            tracing::info!(target: "tungstenite::handshake", "kept");
            tracing::trace!(target: "tungstenite::handshake", "GET /v1/ws authorization: secret");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn log_format_json_lines_parse() {
        let l = lines(LogFormat::Json, Some("trace"));
        assert_eq!(l.len(), 3, "{l:?}");
        let v: serde_json::Value = serde_json::from_str(&l[0]).unwrap();
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["message"], "custody");
        assert_eq!(v["fields"]["account"], "dev0");
        assert_eq!(v["fields"]["seq"], 7);
        assert!(v["timestamp"].is_string());
        for line in &l {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            // `log_filter` still caps the handshake's dumps at INFO.
            assert_ne!(v["level"], "TRACE", "{line}");
        }
        assert!(!l.iter().any(|x| x.contains("secret")));
    }

    #[test]
    fn log_format_text_is_not_json() {
        let l = lines(LogFormat::Text, None);
        assert_eq!(l.len(), 2, "{l:?}");
        assert!(
            l[0].contains("custody") && l[0].contains("\"dev0\""),
            "{l:?}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(&l[0]).is_err());
        assert_eq!(LogFormat::parse("json"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Some(LogFormat::Text));
        assert_eq!(LogFormat::parse("JSON"), None);
    }
}
