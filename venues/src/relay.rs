//! Private relays: sending a signed transaction to a block builder instead of
//! the public mempool, in the Flashbots JSON-RPC dialect
//! (`eth_sendPrivateTransaction`, `eth_cancelPrivateTransaction`) over one
//! persistent HTTP/1.1 connection.
//!
//! ## Authentication
//!
//! Every request carries an `X-Flashbots-Signature: <address>:<signature>`
//! header. The signature is an EIP-191 personal-message signature, by a
//! dedicated relay-auth key ([`RelayAuth`]), of the ASCII text `0x` +
//! lowercase hex of `keccak256(body)` — what the Flashbots docs write as
//! `wallet.signMessage(ethers.utils.id(body))`. The relay-auth key only
//! builds the searcher's reputation with the relay; it holds no funds and is
//! never a custody key. [`verify_flashbots_signature`] is the relay's side of
//! the check.
//!
//! ## The connection
//!
//! [`RelayConnection`] mirrors [`crate::BroadcastConnection`]: it dials
//! blocking (bounded by 5 s), then switches the socket to non-blocking and is
//! driven by the caller's [`mio::Poll`]. Requests are pipelined: HTTP/1.1
//! answers the requests of one connection in order, so the reply at the head
//! of the stream always belongs to the oldest request in flight.
//!
//! ## Invariants
//!
//! - Every reply is reported exactly once, with the caller's tag, in request
//!   order. A reply whose JSON-RPC id is a number other than the one sent is
//!   a protocol violation and closes the connection rather than being
//!   misattributed.
//! - Bytes the kernel did not accept stay queued, in order, and are sent by
//!   the next `send_*`, `cancel_*` or `poll_responses`; nothing is dropped.
//! - After any error (transport, framing, a relay that closes), the
//!   connection is closed and every later call returns
//!   [`VenueError::Closed`]. Requests still in flight then have an unknown
//!   outcome; the owner reconnects and decides whether to resend.
//! - Steady state reuses its buffers: the request body, the outgoing queue
//!   and the read buffer grow to the largest message seen and stay there;
//!   the signature header is written straight into the outgoing queue.
//!
//! ## Limits
//!
//! Plain `http://` only (no TLS). Responses must be framed by
//! `Content-Length` or `Transfer-Encoding: chunked`; a body delimited by the
//! relay closing the connection is refused as a protocol violation.

use std::collections::VecDeque;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, Keccak256, Signature, keccak256};
use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::broadcast::{MALFORMED_REPLY_CODE, RpcErrorInfo};
use crate::error::VenueError;
use crate::ws::{CONNECT_TIMEOUT, ErrorObject, push_decimal};

/// The name of the authentication header.
pub const FLASHBOTS_SIGNATURE_HEADER: &str = "X-Flashbots-Signature";

/// EIP-191 prefix for a 66-byte message (`0x` + 64 hex digits): the signed
/// text always has this length, so the prefix is a constant.
const EIP191_PREFIX_66: &[u8] = b"\x19Ethereum Signed Message:\n66";

/// Requests in flight that fit without reallocation.
const IN_FLIGHT_CAPACITY: usize = 4096;

/// Initial size of the request body and outgoing queue; a send needs
/// `2 * raw_tx.len() + ~400` bytes and the buffers grow if needed.
const REQUEST_BUFFER: usize = 16 * 1024;

/// Initial size of the read buffer. Replies are ~100 bytes plus headers.
const READ_BUFFER: usize = 8 * 1024;

/// A response head larger than this is refused.
const MAX_HEAD: usize = 64 * 1024;

/// A message body larger than this is refused.
const MAX_BODY: usize = 16 * 1024 * 1024;

// ---------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------

/// The relay-auth identity: a dedicated secp256k1 key that signs every
/// request's body for the `X-Flashbots-Signature` header.
///
/// Not a custody key: it should hold no funds and is only the searcher's
/// identity towards relays. `Debug` shows the address, never the key.
#[derive(Clone)]
pub struct RelayAuth {
    signer: PrivateKeySigner,
    /// The EIP-55 checksummed address, formatted once.
    address_text: String,
}

impl fmt::Debug for RelayAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayAuth")
            .field("address", &self.address_text)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl RelayAuth {
    /// Wraps a dedicated relay-auth key.
    pub fn new(signer: PrivateKeySigner) -> Self {
        let address_text = signer.address().to_checksum(None);
        RelayAuth {
            signer,
            address_text,
        }
    }

    /// A fresh random relay-auth key (a new, reputation-less identity).
    pub fn random() -> Self {
        Self::new(PrivateKeySigner::random())
    }

    /// The address relays see as the sender of every request.
    pub fn address(&self) -> Address {
        self.signer.address()
    }

    /// The value of the `X-Flashbots-Signature` header for a request with
    /// this exact `body`: `0x<checksummed address>:0x<65-byte signature>`,
    /// with `v` as 27 or 28.
    ///
    /// # Panics
    ///
    /// If the signing backend fails, which for a local secp256k1 key happens
    /// only with negligible probability (a degenerate RFC 6979 nonce).
    pub fn header(&self, body: &[u8]) -> String {
        let mut out = Vec::with_capacity(42 + 1 + 132);
        self.write_header(body, &mut out)
            .expect("local secp256k1 signing does not fail");
        String::from_utf8(out).expect("the header is ASCII")
    }

    /// Appends the header value for `body` to `out` without allocating
    /// (beyond `out`'s own growth).
    pub(crate) fn write_header(&self, body: &[u8], out: &mut Vec<u8>) -> Result<(), VenueError> {
        let digest = auth_digest(body);
        let sig = self
            .signer
            .sign_hash_sync(&digest)
            .map_err(|_| VenueError::RelaySignature("the relay-auth key failed to sign"))?;
        let mut hex_sig = [0u8; 130];
        hex::encode_to_slice(sig.as_bytes(), &mut hex_sig)
            .expect("the slice is exactly twice the input");
        out.extend_from_slice(self.address_text.as_bytes());
        out.extend_from_slice(b":0x");
        out.extend_from_slice(&hex_sig);
        Ok(())
    }
}

/// The EIP-191 digest of the text `0x` + lowercase hex of `keccak256(body)`.
fn auth_digest(body: &[u8]) -> B256 {
    let mut text = [0u8; 66];
    text[..2].copy_from_slice(b"0x");
    hex::encode_to_slice(keccak256(body), &mut text[2..])
        .expect("the slice is exactly twice the input");
    let mut hasher = Keccak256::new();
    hasher.update(EIP191_PREFIX_66);
    hasher.update(text);
    hasher.finalize()
}

/// Checks an `X-Flashbots-Signature` header value against the request
/// `body` and returns the authenticated address.
///
/// The header is `<address>:<0x-hex 65-byte signature>`; the address may be
/// checksummed or lowercase, `v` may be 0/1 or 27/28. The signer recovered
/// from the signature must equal the address the header claims.
pub fn verify_flashbots_signature(header: &str, body: &[u8]) -> Result<Address, VenueError> {
    let (addr_text, sig_text) = header
        .trim()
        .split_once(':')
        .ok_or(VenueError::RelaySignature("expected <address>:<signature>"))?;
    let claimed: Address = addr_text
        .trim()
        .parse()
        .map_err(|_| VenueError::RelaySignature("the address is not 20 hex bytes"))?;
    let sig_hex = sig_text.trim();
    let sig_hex = sig_hex.strip_prefix("0x").unwrap_or(sig_hex);
    let mut raw = [0u8; 65];
    hex::decode_to_slice(sig_hex, &mut raw)
        .map_err(|_| VenueError::RelaySignature("the signature is not 65 hex bytes"))?;
    let sig = Signature::from_raw_array(&raw)
        .map_err(|_| VenueError::RelaySignature("the signature has an invalid v"))?;
    let recovered = sig
        .recover_address_from_prehash(&auth_digest(body))
        .map_err(|_| VenueError::RelaySignature("no public key recovers from the signature"))?;
    if recovered != claimed {
        return Err(VenueError::RelaySignatureMismatch { claimed, recovered });
    }
    Ok(recovered)
}

// ---------------------------------------------------------------------------
// URLs
// ---------------------------------------------------------------------------

/// The parts of an `http://host[:port][/path]` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HttpTarget {
    /// The host to dial (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
    /// The request target; `/` when the URL has none.
    pub path: String,
}

/// Splits `http://host[:port][/path]`. `https` is refused: the crate is
/// built without TLS.
pub(crate) fn parse_http_url(url: &str) -> Result<HttpTarget, VenueError> {
    let bad = || VenueError::InvalidRelayUrl(url.to_owned());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => 80,
            None => return Err(bad()),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().map_err(|_| bad())?),
            None => (authority, 80),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    let path = if path.is_empty() {
        "/".to_owned()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad());
    }
    Ok(HttpTarget {
        host: host.to_owned(),
        port,
        authority: authority.to_owned(),
        path,
    })
}

/// Dials `target` (every resolved address in turn, each bounded by
/// [`CONNECT_TIMEOUT`]) and sets `TCP_NODELAY`. The socket is blocking.
pub(crate) fn dial(url: &str, target: &HttpTarget) -> Result<TcpStream, VenueError> {
    let connect_err = |source| VenueError::Connect {
        url: url.to_owned(),
        source,
    };
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(connect_err)?
        .collect();
    let mut last = std::io::Error::new(ErrorKind::NotFound, "host resolved to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(connect_err(last))
}

// ---------------------------------------------------------------------------
// HTTP/1.1 framing (shared with the test relay)
// ---------------------------------------------------------------------------

/// Which side of the exchange a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MessageKind {
    Request,
    Response,
}

/// Where a parsed message's body is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BodyAt {
    /// In the parsed buffer, at this range.
    Inline(Range<usize>),
    /// Chunked: decoded into the caller's scratch buffer.
    Decoded,
}

/// One complete HTTP/1.x message at the front of a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The request line or status line, without CRLF.
    pub start_line: Range<usize>,
    /// The status code (responses; 0 for requests).
    pub status: u16,
    /// The peer will close after this message.
    pub close: bool,
    /// The `X-Flashbots-Signature` value, if present.
    pub signature: Option<Range<usize>>,
    pub body: BodyAt,
    /// Bytes of the buffer the message occupies.
    pub consumed: usize,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn trim_range(buf: &[u8], mut r: Range<usize>) -> Range<usize> {
    while r.start < r.end && buf[r.start].is_ascii_whitespace() {
        r.start += 1;
    }
    while r.end > r.start && buf[r.end - 1].is_ascii_whitespace() {
        r.end -= 1;
    }
    r
}

fn parse_usize(digits: &[u8], radix: u32) -> Option<usize> {
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let mut n: usize = 0;
    for &d in digits {
        let v = (d as char).to_digit(radix)? as usize;
        n = n.checked_mul(radix as usize)?.checked_add(v)?;
    }
    Some(n)
}

/// Parses one complete message from the front of `buf`. `Ok(None)` means
/// more bytes are needed. A chunked body is decoded into `decoded` (cleared
/// first); an inline body is left in `buf`.
pub(crate) fn parse_message(
    buf: &[u8],
    kind: MessageKind,
    decoded: &mut Vec<u8>,
) -> Result<Option<Parsed>, VenueError> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(VenueError::Protocol("HTTP head too large"));
        }
        return Ok(None);
    };
    if head_end > MAX_HEAD {
        return Err(VenueError::Protocol("HTTP head too large"));
    }
    let body_start = head_end + 4;

    let first_end = find(&buf[..head_end + 2], b"\r\n").unwrap_or(head_end);
    let start_line = 0..first_end;
    let line = &buf[start_line.clone()];
    let (status, http10) = match kind {
        MessageKind::Response => {
            if line.len() < 12 || !line.starts_with(b"HTTP/1.") || line[8] != b' ' {
                return Err(VenueError::Protocol("malformed HTTP status line"));
            }
            let status = parse_usize(&line[9..12], 10)
                .filter(|s| (100..=999).contains(s))
                .ok_or(VenueError::Protocol("malformed HTTP status code"))?;
            (status as u16, line[7] == b'0')
        }
        MessageKind::Request => {
            let mut parts = line.split(|&b| b == b' ');
            let (Some(method), Some(target), Some(version), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(VenueError::Protocol("malformed HTTP request line"));
            };
            if method.is_empty() || target.is_empty() || !version.starts_with(b"HTTP/1.") {
                return Err(VenueError::Protocol("malformed HTTP request line"));
            }
            (0, version == b"HTTP/1.0")
        }
    };

    let mut close = http10;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut signature = None;
    let mut pos = first_end + 2;
    while pos < head_end {
        let end = pos + find(&buf[pos..head_end + 2], b"\r\n").unwrap_or(head_end - pos);
        let header = pos..end;
        pos = end + 2;
        let Some(colon) = buf[header.clone()].iter().position(|&b| b == b':') else {
            return Err(VenueError::Protocol("malformed HTTP header"));
        };
        let name = &buf[header.start..header.start + colon];
        let value = trim_range(buf, header.start + colon + 1..header.end);
        let v = &buf[value.clone()];
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_usize(v, 10).ok_or(VenueError::Protocol("malformed Content-Length"))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(VenueError::Protocol("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = v.rsplit(|&b| b == b',').next().unwrap_or_default();
            if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(VenueError::Protocol("unsupported Transfer-Encoding"));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in v.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && http10 {
                    close = false;
                }
            }
        } else if name.eq_ignore_ascii_case(FLASHBOTS_SIGNATURE_HEADER.as_bytes()) {
            signature = Some(value);
        }
    }

    let bodyless =
        kind == MessageKind::Response && (status < 200 || status == 204 || status == 304);
    let (body, consumed) = if bodyless {
        (BodyAt::Inline(body_start..body_start), body_start)
    } else if chunked {
        match decode_chunked(buf, body_start, decoded)? {
            Some(end) => (BodyAt::Decoded, end),
            None => return Ok(None),
        }
    } else if let Some(len) = content_length {
        if len > MAX_BODY {
            return Err(VenueError::Protocol("HTTP body too large"));
        }
        if buf.len() < body_start + len {
            return Ok(None);
        }
        (
            BodyAt::Inline(body_start..body_start + len),
            body_start + len,
        )
    } else if kind == MessageKind::Request {
        (BodyAt::Inline(body_start..body_start), body_start)
    } else {
        return Err(VenueError::Protocol(
            "response has neither Content-Length nor chunked encoding",
        ));
    };
    Ok(Some(Parsed {
        start_line,
        status,
        close,
        signature,
        body,
        consumed,
    }))
}

/// Decodes a chunked body starting at `pos` into `out`; returns the offset
/// just past the message, or `None` if it is incomplete.
fn decode_chunked(
    buf: &[u8],
    mut pos: usize,
    out: &mut Vec<u8>,
) -> Result<Option<usize>, VenueError> {
    out.clear();
    loop {
        let Some(line_len) = find(&buf[pos..], b"\r\n") else {
            if buf.len() - pos > 1024 {
                return Err(VenueError::Protocol("malformed chunk size line"));
            }
            return Ok(None);
        };
        let line = &buf[pos..pos + line_len];
        let size_text = line
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        let size =
            parse_usize(size_text, 16).ok_or(VenueError::Protocol("malformed chunk size"))?;
        pos += line_len + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(len) = find(&buf[pos..], b"\r\n") else {
                    return Ok(None);
                };
                pos += len + 2;
                if len == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        if out.len() + size > MAX_BODY {
            return Err(VenueError::Protocol("HTTP body too large"));
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(VenueError::Protocol("chunk not followed by CRLF"));
        }
        out.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
    }
}

// ---------------------------------------------------------------------------
// The connection
// ---------------------------------------------------------------------------

/// The outcome of one request to a relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayReply {
    /// `eth_sendPrivateTransaction` was accepted; the relay's transaction hash.
    Sent(B256),
    /// `eth_cancelPrivateTransaction` answered: `true` if the relay stopped
    /// the transaction, `false` if it was already sent on, unknown, or not
    /// cancellable.
    Cancelled(bool),
    /// The relay refused the request: its JSON-RPC error verbatim, or, for
    /// a reply without one, [`MALFORMED_REPLY_CODE`] and a description
    /// (`HTTP 403`, an unreadable body). The connection stays usable.
    Error(RpcErrorInfo),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestKind {
    Send,
    Cancel,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    id: u64,
    tag: u64,
    kind: RequestKind,
    /// When it was queued.
    sent: Instant,
}

/// A JSON-RPC reply body, decoded from borrowed JSON.
#[derive(Deserialize)]
struct ReplyBody<'a> {
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<ErrorObject>,
}

/// One persistent HTTP/1.1 keep-alive connection to a private relay
/// (`http://host:port[/path]`), for `eth_sendPrivateTransaction` and
/// `eth_cancelPrivateTransaction`, every request signed by a [`RelayAuth`].
///
/// Connects blocking (bounded by 5 s), then switches the socket to
/// non-blocking. Owned by one thread; nothing here blocks after
/// [`RelayConnection::connect`].
pub struct RelayConnection {
    stream: TcpStream,
    auth: RelayAuth,
    /// `POST <path> HTTP/1.1\r\nHost: …\r\nContent-Type: application/json\r\nContent-Length: `
    request_head: Vec<u8>,
    /// Reused JSON body buffer. Invariant: only meaningful inside a send.
    body: Vec<u8>,
    /// Outgoing bytes; `out[out_pos..]` is not yet accepted by the kernel.
    out: Vec<u8>,
    out_pos: usize,
    /// Read buffer; `input[in_start..in_end]` is received and unparsed.
    /// Its length is its usable size (never shrinks).
    input: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// Decoded chunked bodies.
    chunked: Vec<u8>,
    next_id: u64,
    /// Requests in send order; HTTP/1.1 answers them in this order.
    in_flight: VecDeque<Pending>,
    write_pending: bool,
    /// Set after a fatal error; every later call returns `Closed`.
    closed: bool,
}

impl fmt::Debug for RelayConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayConnection")
            .field("peer", &self.stream.peer_addr().ok())
            .field("auth", &self.auth)
            .field("in_flight", &self.in_flight.len())
            .field("write_pending", &self.write_pending)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl RelayConnection {
    /// Dials `url` (`http://host:port[/path]`; blocking, bounded by 5 s per
    /// resolved address), then makes the socket non-blocking. Every request
    /// on this connection is signed by `auth`.
    pub fn connect(url: &str, auth: RelayAuth) -> Result<Self, VenueError> {
        let target = parse_http_url(url)?;
        let stream = dial(url, &target)?;
        stream.set_nonblocking(true)?;
        let mut request_head = Vec::with_capacity(128 + target.path.len());
        request_head.extend_from_slice(b"POST ");
        request_head.extend_from_slice(target.path.as_bytes());
        request_head.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        request_head.extend_from_slice(target.authority.as_bytes());
        request_head.extend_from_slice(b"\r\nContent-Type: application/json\r\nContent-Length: ");
        Ok(RelayConnection {
            stream,
            auth,
            request_head,
            body: Vec::with_capacity(REQUEST_BUFFER),
            out: Vec::with_capacity(REQUEST_BUFFER),
            out_pos: 0,
            input: vec![0; READ_BUFFER],
            in_start: 0,
            in_end: 0,
            chunked: Vec::new(),
            next_id: 1,
            in_flight: VecDeque::with_capacity(IN_FLIGHT_CAPACITY),
            write_pending: false,
            closed: false,
        })
    }

    /// Registers the socket with `registry` for read and write readiness
    /// (edge-triggered). On each event for `token`, call
    /// [`RelayConnection::poll_responses`] (it drains the socket).
    pub fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
    ) -> Result<(), VenueError> {
        let fd = self.stream.as_raw_fd();
        registry.register(
            &mut mio::unix::SourceFd(&fd),
            token,
            mio::Interest::READABLE | mio::Interest::WRITABLE,
        )?;
        Ok(())
    }

    /// The relay-auth identity that signs this connection's requests.
    pub fn auth(&self) -> &RelayAuth {
        &self.auth
    }

    /// Sends `raw_tx` (EIP-2718 bytes) as `eth_sendPrivateTransaction` with
    /// `"preferences":{"fast":true}` and, if given, `maxBlockNumber` (the
    /// last block the relay may include it in). `tag` comes back with the
    /// reply. Never blocks: what the socket does not take stays queued.
    pub fn send_private_transaction(
        &mut self,
        raw_tx: &[u8],
        max_block_number: Option<u64>,
        tag: u64,
    ) -> Result<(), VenueError> {
        if self.closed {
            return Err(VenueError::Closed);
        }
        let id = self.take_id();
        let body = &mut self.body;
        body.clear();
        body.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
        push_decimal(body, id);
        body.extend_from_slice(br#","method":"eth_sendPrivateTransaction","params":[{"tx":"0x"#);
        let start = body.len();
        body.resize(start + 2 * raw_tx.len(), 0);
        hex::encode_to_slice(raw_tx, &mut body[start..])
            .expect("the slice is exactly twice the input");
        body.push(b'"');
        if let Some(max) = max_block_number {
            body.extend_from_slice(br#","maxBlockNumber":"0x"#);
            push_hex_quantity(body, max);
            body.push(b'"');
        }
        body.extend_from_slice(br#","preferences":{"fast":true}}]}"#);
        self.queue_request(id, tag, RequestKind::Send)
    }

    /// Asks the relay to stop a transaction sent with
    /// [`RelayConnection::send_private_transaction`]
    /// (`eth_cancelPrivateTransaction`); the reply is
    /// [`RelayReply::Cancelled`]. Never blocks.
    pub fn cancel_private_transaction(
        &mut self,
        tx_hash: B256,
        tag: u64,
    ) -> Result<(), VenueError> {
        if self.closed {
            return Err(VenueError::Closed);
        }
        let id = self.take_id();
        let body = &mut self.body;
        body.clear();
        body.extend_from_slice(br#"{"jsonrpc":"2.0","id":"#);
        push_decimal(body, id);
        body.extend_from_slice(
            br#","method":"eth_cancelPrivateTransaction","params":[{"txHash":"0x"#,
        );
        let start = body.len();
        body.resize(start + 64, 0);
        hex::encode_to_slice(tx_hash, &mut body[start..])
            .expect("the slice is exactly twice the input");
        body.extend_from_slice(br#""}]}"#);
        self.queue_request(id, tag, RequestKind::Cancel)
    }

    /// Reads every complete response available without blocking and reports
    /// each as `f(tag, reply)`, in request order. Also flushes queued
    /// writes. Returns how many replies were handled.
    ///
    /// Drains until the socket would block, as edge-triggered readiness
    /// requires. `Err(Closed)` (or another error) means the connection is
    /// gone — the relay closed it (idle timeout, `Connection: close`) or it
    /// failed: requests still in flight have an unknown outcome.
    pub fn poll_responses(
        &mut self,
        mut f: impl FnMut(u64, RelayReply),
    ) -> Result<usize, VenueError> {
        if self.closed {
            return Err(VenueError::Closed);
        }
        if self.write_pending {
            self.flush()?;
        }
        let mut handled = 0;
        loop {
            handled += self.deliver_parsed(&mut f)?;
            if self.in_end == self.input.len() {
                if self.in_start > 0 {
                    self.input.copy_within(self.in_start..self.in_end, 0);
                    self.in_end -= self.in_start;
                    self.in_start = 0;
                } else if self.input.len() < MAX_HEAD + MAX_BODY {
                    let grown = (self.input.len() * 2).min(MAX_HEAD + MAX_BODY);
                    self.input.resize(grown, 0);
                } else {
                    return Err(self.fail(VenueError::Protocol("HTTP response too large")));
                }
            }
            match self.stream.read(&mut self.input[self.in_end..]) {
                Ok(0) => return Err(self.fail(VenueError::Closed)),
                Ok(n) => self.in_end += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(e.into())),
            }
        }
        Ok(handled)
    }

    /// Requests sent whose reply has not been handled yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// How long the oldest unanswered request has waited (HTTP/1.1 answers in order, so
    /// no answer at all has come for that long); `None` with nothing outstanding. A relay
    /// that accepts requests and never answers (a stalled process, a black-holed path) is
    /// found by this, since the connection itself stays open.
    pub fn oldest_unanswered(&self) -> Option<Duration> {
        self.in_flight.front().map(|p| p.sent.elapsed())
    }

    /// Whether bytes are queued that the kernel has not accepted yet.
    pub fn write_pending(&self) -> bool {
        self.write_pending
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Frames `self.body` as a signed POST, queues it and tries to flush.
    fn queue_request(&mut self, id: u64, tag: u64, kind: RequestKind) -> Result<(), VenueError> {
        if self.out_pos > 0 {
            // Keep the unsent tail at the front so the queue never grows
            // from bytes already sent.
            self.out.copy_within(self.out_pos.., 0);
            self.out.truncate(self.out.len() - self.out_pos);
            self.out_pos = 0;
        }
        let mark = self.out.len();
        self.out.extend_from_slice(&self.request_head);
        push_decimal(&mut self.out, self.body.len() as u64);
        self.out.extend_from_slice(b"\r\nX-Flashbots-Signature: ");
        if let Err(e) = self.auth.write_header(&self.body, &mut self.out) {
            self.out.truncate(mark);
            return Err(e);
        }
        self.out.extend_from_slice(b"\r\n\r\n");
        self.out.extend_from_slice(&self.body);
        self.in_flight.push_back(Pending {
            id,
            tag,
            kind,
            sent: Instant::now(),
        });
        self.flush()
    }

    /// Writes queued bytes until done or the socket is full.
    fn flush(&mut self) -> Result<(), VenueError> {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(self.fail(VenueError::Closed)),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.write_pending = true;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(e.into())),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        self.write_pending = false;
        Ok(())
    }

    /// Reports every complete response in the read buffer.
    fn deliver_parsed(&mut self, f: &mut impl FnMut(u64, RelayReply)) -> Result<usize, VenueError> {
        let mut handled = 0;
        while self.in_start < self.in_end {
            let buf = &self.input[self.in_start..self.in_end];
            let parsed = match parse_message(buf, MessageKind::Response, &mut self.chunked) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return Err(self.fail(e)),
            };
            if parsed.status < 200 {
                // An interim response (100 Continue): not the answer.
                self.in_start += parsed.consumed;
                continue;
            }
            let Some(pending) = self.in_flight.pop_front() else {
                return Err(self.fail(VenueError::Protocol("response to no request")));
            };
            let body = match &parsed.body {
                BodyAt::Inline(r) => &buf[r.clone()],
                BodyAt::Decoded => &self.chunked[..],
            };
            let reply = match decode_reply(pending, parsed.status, body) {
                Ok(r) => r,
                Err(e) => return Err(self.fail(e)),
            };
            self.in_start += parsed.consumed;
            f(pending.tag, reply);
            handled += 1;
            if parsed.close {
                return Err(self.fail(VenueError::Closed));
            }
        }
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        }
        Ok(handled)
    }

    fn fail(&mut self, e: VenueError) -> VenueError {
        self.closed = true;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        e
    }
}

/// Turns one response into the reply for `pending`. `Err` only for a
/// JSON-RPC id that contradicts the request order.
fn decode_reply(pending: Pending, status: u16, body: &[u8]) -> Result<RelayReply, VenueError> {
    let malformed = |message: String| {
        RelayReply::Error(RpcErrorInfo {
            code: MALFORMED_REPLY_CODE,
            message,
        })
    };
    let ok_status = (200..300).contains(&status);
    let reply: ReplyBody<'_> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(_) if !ok_status => return Ok(malformed(format!("HTTP {status}"))),
        Err(e) => {
            return Ok(malformed(format!(
                "HTTP {status} with a body that is not JSON-RPC: {e}"
            )));
        }
    };
    if let Some(id) = reply.id
        && let Ok(n) = id.get().trim_matches('"').parse::<u64>()
        && n != pending.id
    {
        return Err(VenueError::Protocol(
            "relay reply id does not match the request order",
        ));
    }
    if let Some(err) = reply.error {
        return Ok(RelayReply::Error(RpcErrorInfo {
            code: err.code,
            message: err.message,
        }));
    }
    if !ok_status {
        return Ok(malformed(format!("HTTP {status}")));
    }
    let Some(result) = reply.result else {
        return Ok(malformed(
            "reply carried neither a result nor an error".to_owned(),
        ));
    };
    Ok(match pending.kind {
        RequestKind::Send => match serde_json::from_str::<B256>(result.get()) {
            Ok(hash) => RelayReply::Sent(hash),
            Err(_) => malformed(format!(
                "result is not a transaction hash: {}",
                result.get()
            )),
        },
        RequestKind::Cancel => match serde_json::from_str::<bool>(result.get()) {
            Ok(done) => RelayReply::Cancelled(done),
            Err(_) => malformed(format!("result is not a boolean: {}", result.get())),
        },
    })
}

/// Appends `n` as a JSON-RPC quantity's digits (lowercase hex, no leading
/// zeros, `0` for zero), without the `0x`.
fn push_hex_quantity(out: &mut Vec<u8>, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = HEX[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(buf: &[u8], kind: MessageKind) -> Option<(Parsed, Vec<u8>)> {
        let mut scratch = Vec::new();
        parse_message(buf, kind, &mut scratch)
            .unwrap()
            .map(|p| (p, scratch))
    }

    #[test]
    fn auth_digest_is_eip191_of_the_hex_body_hash() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}"#;
        let text = format!("{}", keccak256(body));
        assert_eq!(text.len(), 66);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(
            auth_digest(body),
            alloy_primitives::eip191_hash_message(text.as_bytes())
        );
    }

    #[test]
    fn parses_http_urls() {
        let t = parse_http_url("http://127.0.0.1:8545").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.authority.as_str(),
                t.path.as_str()
            ),
            ("127.0.0.1", 8545, "127.0.0.1:8545", "/")
        );
        let t = parse_http_url("http://relay:1/a/b?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("relay", 1, "/a/b?x=1")
        );
        let t = parse_http_url("http://relay").unwrap();
        assert_eq!((t.port, t.authority.as_str()), (80, "relay"));
        let t = parse_http_url("http://[::1]:9000/").unwrap();
        assert_eq!(
            (t.host.as_str(), t.authority.as_str()),
            ("::1", "[::1]:9000")
        );
        for bad in [
            "https://relay:1",
            "ws://relay:1",
            "http://",
            "http://:80",
            "http://relay:port",
            "http://u@relay:1",
            "http://relay:1/a b",
        ] {
            assert!(
                matches!(parse_http_url(bad), Err(VenueError::InvalidRelayUrl(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn parses_content_length_responses_and_waits_for_the_rest() {
        let msg =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 5\r\n\r\nhello";
        for cut in 0..msg.len() {
            assert!(parse(&msg[..cut], MessageKind::Response).is_none(), "{cut}");
        }
        let mut two = msg.to_vec();
        two.extend_from_slice(
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        let (p, _) = parse(&two, MessageKind::Response).unwrap();
        assert_eq!((p.status, p.close, p.consumed), (200, false, msg.len()));
        assert_eq!(p.body, BodyAt::Inline(msg.len() - 5..msg.len()));
        let (p, _) = parse(&two[msg.len()..], MessageKind::Response).unwrap();
        assert_eq!((p.status, p.close), (403, true));
        assert_eq!(p.consumed, two.len() - msg.len());
    }

    #[test]
    fn parses_chunked_responses() {
        let msg = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let end = msg.len() - 4;
        for cut in 0..end {
            assert!(parse(&msg[..cut], MessageKind::Response).is_none(), "{cut}");
        }
        let (p, body) = parse(msg, MessageKind::Response).unwrap();
        assert_eq!((p.body, p.consumed), (BodyAt::Decoded, end));
        assert_eq!(body, b"{\"a\":1}");
    }

    #[test]
    fn parses_requests_with_the_signature_header() {
        let msg = b"POST / HTTP/1.1\r\nHost: x\r\nx-flashbots-signature:  0xab:0xcd \r\nContent-Length: 2\r\n\r\n{}";
        let (p, _) = parse(msg, MessageKind::Request).unwrap();
        assert_eq!(&msg[p.signature.unwrap()], b"0xab:0xcd");
        assert_eq!(&msg[p.start_line], b"POST / HTTP/1.1");
        assert_eq!(p.consumed, msg.len());
        let (p, _) = parse(b"GET / HTTP/1.0\r\n\r\n", MessageKind::Request).unwrap();
        assert!(p.close);
    }

    #[test]
    fn refuses_malformed_framing() {
        let mut s = Vec::new();
        for bad in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
            b"SMTP 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nNoColon\r\nContent-Length: 0\r\n\r\n",
        ] {
            assert!(
                parse_message(bad, MessageKind::Response, &mut s).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn quantities_and_decimals() {
        for n in [0u64, 1, 15, 16, 0xcd23a0, u64::MAX] {
            let mut b = Vec::new();
            push_hex_quantity(&mut b, n);
            assert_eq!(b, format!("{n:x}").into_bytes());
            b.clear();
            push_decimal(&mut b, n);
            assert_eq!(b, n.to_string().into_bytes());
        }
    }

    #[test]
    fn decodes_replies() {
        let send = Pending {
            id: 7,
            tag: 1,
            kind: RequestKind::Send,
            sent: Instant::now(),
        };
        let cancel = Pending {
            kind: RequestKind::Cancel,
            ..send
        };
        let h = B256::repeat_byte(0xab);
        let ok = format!(r#"{{"jsonrpc":"2.0","id":7,"result":"{h}"}}"#);
        assert_eq!(
            decode_reply(send, 200, ok.as_bytes()).unwrap(),
            RelayReply::Sent(h)
        );
        assert_eq!(
            decode_reply(cancel, 200, br#"{"id":"7","result":true}"#).unwrap(),
            RelayReply::Cancelled(true)
        );
        assert_eq!(
            decode_reply(
                send,
                403,
                br#"{"id":null,"error":{"code":-32600,"message":"bad sig"}}"#
            )
            .unwrap(),
            RelayReply::Error(RpcErrorInfo {
                code: -32600,
                message: "bad sig".into()
            })
        );
        assert!(matches!(
            decode_reply(send, 503, b"<html>"),
            Ok(RelayReply::Error(RpcErrorInfo { code: MALFORMED_REPLY_CODE, ref message })) if message == "HTTP 503"
        ));
        assert!(matches!(
            decode_reply(cancel, 200, br#"{"id":7,"result":"0x1"}"#),
            Ok(RelayReply::Error(_))
        ));
        assert!(matches!(
            decode_reply(send, 200, br#"{"id":8,"result":null}"#),
            Err(VenueError::Protocol(_))
        ));
    }
}
