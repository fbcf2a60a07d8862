//! The hot path's connection: `eth_sendRawTransaction` over one persistent,
//! non-blocking WebSocket owned by the broadcast stage's thread.
//!
//! Steady state allocates nothing (checked by `tests/broadcast_alloc.rs`):
//! the request JSON is assembled by hand into a reused `BytesMut` whose
//! allocation comes back once tungstenite has copied the frame into its
//! write buffer; replies are decoded from borrowed JSON; the id → tag table
//! is a preallocated ring.

use std::collections::VecDeque;

use alloy_primitives::B256;
use bytes::BytesMut;
use serde::Deserialize;
use tungstenite::{Message, Utf8Bytes};

use crate::error::VenueError;
use crate::ws::{self, Flush, Ws};

/// A JSON-RPC error the node returned for one request (e.g. "nonce too
/// low", "already known"). The connection stays usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcErrorInfo {
    /// JSON-RPC error code.
    pub code: i64,
    /// The node's message, verbatim.
    pub message: String,
}

/// Code reported in [`RpcErrorInfo`] when a reply carried neither a
/// decodable `result` nor an `error` (JSON-RPC "internal error").
pub const MALFORMED_REPLY_CODE: i64 = -32603;

/// Requests in flight that fit without reallocation.
const IN_FLIGHT_CAPACITY: usize = 4096;

/// Initial size of the request buffer; a request needs
/// `2 * raw_tx.len() + ~80` bytes and the buffer grows once if needed.
const REQUEST_BUFFER: usize = 16 * 1024;

/// Replies are ~110 bytes; a small read buffer keeps tungstenite's per-read
/// zero-fill of its spare capacity cheap.
const READ_BUFFER: usize = 8 * 1024;

/// Bound on the blocking connect + handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const REQ_HEAD: &[u8] = br#"{"jsonrpc":"2.0","id":"#;
const REQ_METHOD: &[u8] = br#","method":"eth_sendRawTransaction","params":["0x"#;
const REQ_TAIL: &[u8] = br#""]}"#;
const HEARTBEAT_METHOD: &[u8] = br#","method":"eth_blockNumber","params":[]}"#;

/// Tag of heartbeat requests in the in-flight table; their replies are consumed here.
const HEARTBEAT_TAG: u64 = u64::MAX;

/// One persistent WebSocket to a node, for `eth_sendRawTransaction`.
///
/// Connects blocking (handshake, bounded by 10 s), then switches the socket
/// to non-blocking. Owned by one thread; nothing here blocks after
/// [`BroadcastConnection::connect`].
#[derive(Debug)]
pub struct BroadcastConnection {
    ws: Ws,
    /// Reused request buffer. Invariant: empty between calls.
    request: BytesMut,
    next_id: u64,
    /// `(request id, caller tag)` in send order. anvil serves the requests
    /// of one connection concurrently, so replies can overtake each other,
    /// but only by a little: the lookup scans from the front and the removal
    /// shifts the short side, so both cost the reply's displacement.
    in_flight: VecDeque<(u64, u64)>,
    /// Bytes are queued in the WebSocket that the kernel did not take yet.
    write_pending: bool,
    /// Set after a fatal error; every later call returns `Closed`.
    closed: bool,
    /// When the outstanding heartbeat was sent, if one is.
    heartbeat_sent: Option<std::time::Instant>,
    /// Round trip of the last answered heartbeat.
    heartbeat_rtt: Option<std::time::Duration>,
}

/// A reply to `eth_sendRawTransaction` (a hash) or to a heartbeat (a quantity), decoded
/// without allocating: the result is borrowed and parsed by what the request was.
#[derive(Deserialize)]
struct SendReply<'a> {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, borrow)]
    result: Option<&'a str>,
    #[serde(default)]
    error: Option<ws::ErrorObject>,
    /// Present on notifications, which this connection never subscribes to.
    #[serde(default)]
    method: Option<serde::de::IgnoredAny>,
}

impl BroadcastConnection {
    /// Connects and performs the WebSocket handshake (blocking, bounded),
    /// then makes the socket non-blocking.
    pub fn connect(ws_url: &str) -> Result<Self, VenueError> {
        Self::connect_timeout(ws_url, HANDSHAKE_TIMEOUT)
    }

    /// [`BroadcastConnection::connect`] with its own bound on dial plus handshake.
    pub fn connect_timeout(ws_url: &str, timeout: std::time::Duration) -> Result<Self, VenueError> {
        let ws = ws::connect_blocking(ws_url, READ_BUFFER, timeout)?;
        ws::set_nonblocking(&ws)?;
        Ok(BroadcastConnection {
            ws,
            request: BytesMut::with_capacity(REQUEST_BUFFER),
            next_id: 1,
            in_flight: VecDeque::with_capacity(IN_FLIGHT_CAPACITY),
            write_pending: false,
            closed: false,
            heartbeat_sent: None,
            heartbeat_rtt: None,
        })
    }

    /// Sends a heartbeat (`eth_blockNumber`) unless one is outstanding; its answer is
    /// consumed by [`BroadcastConnection::poll_responses`] and its round trip read with
    /// [`BroadcastConnection::heartbeat_rtt`]. Returns whether a heartbeat was sent.
    pub fn send_heartbeat(&mut self) -> Result<bool, VenueError> {
        if self.closed {
            return Err(VenueError::Closed);
        }
        if self.heartbeat_sent.is_some() {
            return Ok(false);
        }
        let id = self.next_id;
        self.next_id += 1;
        debug_assert!(self.request.is_empty());
        self.request
            .reserve(REQ_HEAD.len() + 20 + HEARTBEAT_METHOD.len());
        self.request.extend_from_slice(REQ_HEAD);
        ws::push_decimal(&mut self.request, id);
        self.request.extend_from_slice(HEARTBEAT_METHOD);
        let text = Utf8Bytes::try_from(self.request.split().freeze())
            .map_err(|_| VenueError::Protocol("request is not UTF-8"))?;
        self.in_flight.push_back((id, HEARTBEAT_TAG));
        match self.ws.write(Message::Text(text)) {
            Ok(()) => {}
            Err(e) if ws::is_would_block(&e) => {}
            Err(e) => {
                self.in_flight.pop_back();
                return Err(self.fail(e.into()));
            }
        }
        self.heartbeat_sent = Some(std::time::Instant::now());
        self.flush()?;
        Ok(true)
    }

    /// How long the outstanding heartbeat has waited, if one is outstanding.
    pub fn heartbeat_waiting(&self) -> Option<std::time::Duration> {
        self.heartbeat_sent.map(|t| t.elapsed())
    }

    /// Round trip of the last answered heartbeat.
    pub fn heartbeat_rtt(&self) -> Option<std::time::Duration> {
        self.heartbeat_rtt
    }

    /// Registers the socket with `registry` for read and write readiness
    /// (edge-triggered). On each event for `token`, call
    /// [`BroadcastConnection::poll_responses`] (it drains the socket).
    pub fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
    ) -> Result<(), VenueError> {
        ws::register(&self.ws, registry, token)
    }

    /// Sends `raw_tx` (EIP-2718 bytes) as `eth_sendRawTransaction`; `tag` comes
    /// back with the reply. Never blocks: if the socket is full, the rest of
    /// the frame stays queued and goes out on the next send or poll.
    pub fn send_raw_transaction(&mut self, raw_tx: &[u8], tag: u64) -> Result<(), VenueError> {
        self.send_raw_transaction_stamped(raw_tx, tag, || 0)
            .map(|_| ())
    }

    /// [`BroadcastConnection::send_raw_transaction`], reporting `stamp()` taken right
    /// before the socket write (the request encoded and framed, nothing handed to the
    /// kernel yet) and right after it, so a caller can tell its own work from the kernel's.
    pub fn send_raw_transaction_stamped(
        &mut self,
        raw_tx: &[u8],
        tag: u64,
        mut stamp: impl FnMut() -> u64,
    ) -> Result<WriteStamps, VenueError> {
        if self.closed {
            return Err(VenueError::Closed);
        }
        let id = self.next_id;
        self.next_id += 1;

        debug_assert!(self.request.is_empty());
        let needed = REQ_HEAD.len() + 20 + REQ_METHOD.len() + 2 * raw_tx.len() + REQ_TAIL.len();
        // Reclaims the whole buffer once the previous frame's bytes are dropped.
        self.request.reserve(needed);
        self.request.extend_from_slice(REQ_HEAD);
        ws::push_decimal(&mut self.request, id);
        self.request.extend_from_slice(REQ_METHOD);
        let start = self.request.len();
        self.request.resize(start + 2 * raw_tx.len(), 0);
        hex::encode_to_slice(raw_tx, &mut self.request[start..])
            .expect("the slice is exactly twice the input");
        self.request.extend_from_slice(REQ_TAIL);
        let payload = self.request.split().freeze();
        let text = Utf8Bytes::try_from(payload)
            .map_err(|_| VenueError::Protocol("request is not UTF-8"))?;

        self.in_flight.push_back((id, tag));
        match self.ws.write(Message::Text(text)) {
            Ok(()) => {}
            // The frame is queued; the flush below or a later poll sends it.
            Err(e) if ws::is_would_block(&e) => {}
            Err(e) => {
                self.in_flight.pop_back();
                return Err(self.fail(e.into()));
            }
        }
        // tungstenite's `write` only frames into its buffer; the flush is the syscall.
        let before_write = stamp();
        self.flush()?;
        Ok(WriteStamps {
            before_write,
            after_write: stamp(),
        })
    }

    /// Reads every complete frame available without blocking and reports
    /// each reply as `f(tag, Ok(tx_hash))` or `f(tag, Err(info))`. Also
    /// flushes queued writes. Returns how many replies were handled.
    ///
    /// Drains until the socket would block, as edge-triggered readiness
    /// requires. `Err(Closed)` (or another error) means the connection is
    /// gone: requests still in flight have unknown outcome and should be
    /// resent on a new connection (sending is idempotent by tx hash).
    pub fn poll_responses(
        &mut self,
        mut f: impl FnMut(u64, Result<B256, RpcErrorInfo>),
    ) -> Result<usize, VenueError> {
        if self.closed {
            return Err(VenueError::Closed);
        }
        if self.write_pending {
            self.flush()?;
        }
        let mut handled = 0;
        loop {
            let msg = match self.ws.read() {
                Ok(m) => m,
                Err(e) if ws::is_would_block(&e) => break,
                Err(e) => return Err(self.fail(e.into())),
            };
            let bytes: &[u8] = match &msg {
                Message::Text(t) => t.as_ref(),
                Message::Binary(b) => b,
                // tungstenite queues the pong itself; flushed below.
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                Message::Close(_) => return Err(self.fail(VenueError::Closed)),
            };
            let reply: SendReply = match serde_json::from_slice(bytes) {
                Ok(r) => r,
                Err(e) => return Err(self.fail(e.into())),
            };
            if reply.method.is_some() {
                continue;
            }
            let Some(tag) = reply.id.and_then(|id| self.take_tag(id)) else {
                // A reply to nothing we sent: ignore rather than misattribute.
                continue;
            };
            if tag == HEARTBEAT_TAG {
                // Any answer, result or error, shows the provider alive and how fast.
                if let Some(sent) = self.heartbeat_sent.take() {
                    self.heartbeat_rtt = Some(sent.elapsed());
                }
                continue;
            }
            let outcome = match (reply.result, reply.error) {
                (_, Some(err)) => Err(RpcErrorInfo {
                    code: err.code,
                    message: err.message,
                }),
                (Some(hash), None) => match parse_hash(hash) {
                    Some(hash) => Ok(hash),
                    None => Err(RpcErrorInfo {
                        code: MALFORMED_REPLY_CODE,
                        message: "reply's result is not a transaction hash".to_owned(),
                    }),
                },
                (None, None) => Err(RpcErrorInfo {
                    code: MALFORMED_REPLY_CODE,
                    message: "reply carried neither a result nor an error".to_owned(),
                }),
            };
            f(tag, outcome);
            handled += 1;
        }
        // Pong replies queued by reads, or bytes left from a full socket.
        // Costs no syscall when nothing is queued.
        self.flush()?;
        Ok(handled)
    }

    /// Requests sent whose reply has not been handled yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether bytes are queued that the kernel has not accepted yet.
    pub fn write_pending(&self) -> bool {
        self.write_pending
    }

    fn take_tag(&mut self, id: u64) -> Option<u64> {
        if let Some(&(front, tag)) = self.in_flight.front()
            && front == id
        {
            self.in_flight.pop_front();
            return Some(tag);
        }
        let pos = self.in_flight.iter().position(|&(i, _)| i == id)?;
        self.in_flight.remove(pos).map(|(_, tag)| tag)
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

/// When a request's bytes went to the kernel, in the caller's clock (see
/// [`BroadcastConnection::send_raw_transaction_stamped`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStamps {
    /// Taken with the request encoded and framed, before the socket write.
    pub before_write: u64,
    /// Taken when the socket write returned.
    pub after_write: u64,
}

/// A `0x`-prefixed 32-byte hex string, without allocating.
fn parse_hash(s: &str) -> Option<B256> {
    let hex_digits = s.strip_prefix("0x")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut out).ok()?;
    Some(B256::from(out))
}
