//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong on the network side.
///
/// Messages from the node (JSON-RPC error objects) are carried verbatim in
/// [`VenueError::Rpc`]; every other variant is typed.
#[derive(Debug, thiserror::Error)]
pub enum VenueError {
    /// No anvil binary was found. `searched` lists every path that was tried,
    /// in the order they were tried.
    #[error("anvil not found; searched: {}", display_paths(.searched))]
    AnvilNotFound {
        /// Every candidate path that was checked.
        searched: Vec<PathBuf>,
    },
    /// The anvil process could not be started.
    #[error("failed to start anvil: {0}")]
    AnvilSpawn(#[source] std::io::Error),
    /// The anvil process exited (before it was ready, or while supervised).
    #[error("anvil exited ({status}); last output:\n{output}")]
    AnvilExited {
        /// The exit status, as the OS reports it.
        status: String,
        /// The last lines anvil wrote to stdout/stderr.
        output: String,
    },
    /// A WebSocket URL this crate cannot use (not `ws://host:port[/path]`).
    #[error("invalid WebSocket URL {0:?} (expected ws://host:port[/path]; TLS is not supported)")]
    InvalidUrl(String),
    /// The TCP connection to a node could not be made.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL that was dialled.
        url: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// A WebSocket protocol or handshake failure.
    #[error("websocket: {0}")]
    WebSocket(#[source] Box<tungstenite::Error>),
    /// A socket or process I/O failure.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The node answered with a JSON-RPC error object.
    #[error("node returned JSON-RPC error {code}: {message}")]
    Rpc {
        /// The JSON-RPC error code.
        code: i64,
        /// The node's message, verbatim.
        message: String,
    },
    /// A frame from the node could not be decoded as the expected JSON.
    #[error("cannot decode node reply: {0}")]
    Decode(#[from] serde_json::Error),
    /// The node sent something the JSON-RPC protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    /// A bounded wait ran out; the payload names what was awaited.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A contract deployment or installation failed (`name`: which contract; `what`: the
    /// node's receipt status or the check that failed).
    #[error("contract {name}: {what}")]
    Contract {
        /// The contract.
        name: &'static str,
        /// What went wrong.
        what: String,
    },
    /// The connection is closed (by the node, or after an earlier fatal error).
    #[error("connection closed")]
    Closed,
    /// A relay URL this crate cannot use (not `http://host:port[/path]`).
    #[error("invalid relay URL {0:?} (expected http://host:port[/path]; TLS is not supported)")]
    InvalidRelayUrl(String),
    /// An `X-Flashbots-Signature` header that cannot be checked (malformed),
    /// or a relay-auth key that failed to sign.
    #[error("X-Flashbots-Signature: {0}")]
    RelaySignature(&'static str),
    /// An `X-Flashbots-Signature` whose signature recovers to another address
    /// than the one the header claims.
    #[error("X-Flashbots-Signature claims {claimed} but was signed by {recovered}")]
    RelaySignatureMismatch {
        /// The address written in the header.
        claimed: alloy_primitives::Address,
        /// The address the signature recovers to.
        recovered: alloy_primitives::Address,
    },
    /// A Beacon API URL this crate cannot use (not `http://host:port[/path]`,
    /// or one with a query).
    #[error(
        "invalid Beacon API URL {0:?} (expected http://host:port[/path]; TLS is not supported)"
    )]
    InvalidBeaconUrl(String),
    /// The Beacon API answered with an HTTP status outside 2xx.
    #[error("beacon API {endpoint}: HTTP {status}{}", display_message(.message))]
    BeaconHttp {
        /// The route, e.g. `/eth/v1/beacon/headers/head`.
        endpoint: &'static str,
        /// The HTTP status code.
        status: u16,
        /// The `message` field of the node's error body, verbatim, when the
        /// body has one.
        message: Option<String>,
    },
    /// A Beacon API reply that is not the JSON its route defines.
    #[error("beacon API {endpoint}: malformed reply: {detail}")]
    BeaconDecode {
        /// The route, e.g. `/eth/v1/beacon/states/{state_id}/validators`.
        endpoint: &'static str,
        /// What is wrong, with the position in the body.
        detail: String,
    },
}

impl From<tungstenite::Error> for VenueError {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ) => VenueError::Closed,
            tungstenite::Error::Io(io) => VenueError::Io(io),
            other => VenueError::WebSocket(Box::new(other)),
        }
    }
}

fn display_message(message: &Option<String>) -> String {
    match message {
        Some(m) => format!(": {m}"),
        None => String::new(),
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "(nothing)".to_owned();
    }
    let mut s = String::new();
    for p in paths {
        s.push_str("\n  ");
        s.push_str(&p.display().to_string());
    }
    s
}
