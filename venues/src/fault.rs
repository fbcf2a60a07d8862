//! A fault-injection TCP proxy for tests (cargo feature `testkit`).
//!
//! [`FaultProxy`] listens on `127.0.0.1` and relays every accepted connection
//! to one upstream node (anvil serves HTTP and WebSocket on the same port),
//! applying the current [`Fault`] as bytes flow: added latency, silence,
//! refusal, a cut, or a JSON-RPC error answered by the proxy itself for one
//! method. Tests of multi-provider broadcast put a proxy in front of each
//! provider and change its fault while connections are live.
//!
//! ## How it relays
//!
//! Each connection has four threads: per direction, a reader that splits the
//! byte stream into *units* and a writer that delivers them when they are
//! due. Faults act on whole units:
//!
//! - client → server: an HTTP request (head plus `Content-Length` body); after
//!   a WebSocket upgrade request, one RFC 6455 frame each (client frames are
//!   masked; a frame may arrive split across reads, or several in one read);
//! - server → client: the `101 Switching Protocols` head, then one frame
//!   each; for plain HTTP, the first response head and then bytes as read.
//!
//! A direction the splitter cannot follow (a chunked request body, a frame or
//! body over 64 MiB, a head over 64 KiB) falls back to relaying raw reads.
//!
//! ## Invariants
//!
//! - Forwarded bytes are forwarded unchanged and in order. A fault drops or
//!   answers whole units, never part of one, so a connection that was
//!   blackholed is still well framed once the fault is lifted.
//! - The fault in force when the read that completes a unit returns decides
//!   that unit's fate; [`FaultProxy::set`] therefore acts on live connections
//!   from their next read on.
//! - [`Fault::Delay`]: a unit read at `t` is written at `t + d`. The reader
//!   keeps reading meanwhile, so the delay adds latency without limiting
//!   throughput.
//! - Answers the proxy makes up are queued on the server → client writer
//!   between whole frames, never inside one.
//! - Bounded: dropping the proxy wakes the accept loop, shuts every socket
//!   down (which unblocks blocked reads and writes) and joins every thread.
//!   No thread polls: each blocks on a socket, a channel or a condition
//!   variable.
//!
//! ## Limits
//!
//! - An injected HTTP answer is queued as soon as its request has been read.
//!   That is correct for clients that wait for each response before sending
//!   the next request (all common ones), not for HTTP pipelining.
//! - JSON-RPC batches (JSON arrays) and fragmented WebSocket messages are
//!   never answered by the proxy; they pass as they are.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Bound on dialling the upstream for each accepted connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes asked for per read.
const READ_CHUNK: usize = 16 * 1024;

/// An HTTP head longer than this is not parsed; the direction goes raw.
const MAX_HEAD: usize = 64 * 1024;

/// A frame or body longer than this is not buffered; the direction goes raw.
const MAX_UNIT: u64 = 64 * 1024 * 1024;

/// Bound on the connect that wakes the accept loop on drop.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause after a failed `accept` (e.g. out of file descriptors), so a
/// persistent failure does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// What the proxy does to the traffic it relays. Set with [`FaultProxy::set`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward both ways untouched.
    Pass,
    /// Deliver every unit in both directions this much later than it was
    /// read. Order is kept; throughput is not limited.
    Delay(Duration),
    /// Accept and read, forward nothing, answer nothing. Connections stay
    /// open (the client's reads just never return data).
    Blackhole,
    /// Accept new connections and close them at once; setting this also
    /// cuts every live connection.
    Refuse,
    /// Answer requests for `method` with a JSON-RPC error instead of
    /// forwarding them; everything else passes.
    ///
    /// Applies to client WebSocket text frames and plain HTTP request bodies
    /// whose JSON object has `"method": method`. The answer is
    /// `{"jsonrpc":"2.0","id":<the request's id, or null>,"error":{"code":code,"message":message}}`,
    /// in a server text frame or an `HTTP/1.1 200 OK` response.
    RpcError {
        /// The JSON-RPC method to answer, e.g. `eth_sendRawTransaction`.
        method: String,
        /// The error code to answer with, e.g. `-32000`.
        code: i64,
        /// The error message to answer with.
        message: String,
    },
}

/// A loopback TCP proxy in front of one upstream node that injects a
/// [`Fault`] into the traffic it relays.
///
/// Dropping it stops the listener, closes every connection and joins every
/// thread it started.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// State shared by the handle, the accept loop and the connections.
struct Shared {
    upstream: SocketAddr,
    fault: Mutex<Fault>,
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Threads of every connection, joined on drop; pruned as they finish.
    threads: Mutex<Vec<JoinHandle<()>>>,
    accepted: AtomicU64,
    injected: AtomicU64,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and relays each accepted connection to
    /// `upstream`, starting with [`Fault::Pass`].
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            fault: Mutex::new(Fault::Pass),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        });
        let acceptor = thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn({
                let shared = Arc::clone(&shared);
                move || accept_loop(&listener, &shared)
            })?;
        Ok(FaultProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are relayed to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// `ws://127.0.0.1:PORT`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the fault. It applies to live connections from their next read
    /// on, and to new connections. [`Fault::Refuse`] also cuts every live
    /// connection.
    pub fn set(&self, fault: Fault) {
        let refuse = fault == Fault::Refuse;
        *lock(&self.shared.fault) = fault;
        if refuse {
            self.close_all();
        }
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        self.shared.fault()
    }

    /// Cuts every live connection now: both the client and the upstream see
    /// end-of-stream. The listener keeps accepting.
    pub fn close_all(&self) {
        let conns: Vec<Arc<Conn>> = lock(&self.shared.conns).drain().map(|(_, c)| c).collect();
        for conn in conns {
            conn.cut();
        }
    }

    /// Connections being relayed now.
    pub fn live_connections(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Connections accepted so far, including refused ones.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Requests answered by [`Fault::RpcError`] so far.
    pub fn injected_errors(&self) -> u64 {
        self.shared.injected.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            // Wakes the blocking `accept`; the loop sees `stop` and returns.
            // If even that connect fails the thread is left detached rather
            // than joined forever.
            if TcpStream::connect_timeout(&self.addr, WAKE_TIMEOUT).is_ok() {
                let _ = acceptor.join();
            }
        }
        // The accept loop is gone, so no connection can appear after this.
        self.close_all();
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.shared.upstream)
            .field("fault", &self.fault())
            .field("live_connections", &self.live_connections())
            .field("accepted", &self.accepted())
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn fault(&self) -> Fault {
        lock(&self.fault).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else {
            thread::sleep(ACCEPT_RETRY);
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if *lock(&shared.fault) == Fault::Refuse {
            // Dropping the stream closes it.
            continue;
        }
        next_id += 1;
        // On failure (upstream down, no threads) the client is closed,
        // which is what a dead upstream looks like anyway.
        let _ = spawn_connection(shared, next_id, client);
    }
}

/// One relayed connection: the two sockets and the cut flag.
struct Conn {
    id: u64,
    client: TcpStream,
    upstream: TcpStream,
    cut: Mutex<bool>,
    cut_changed: Condvar,
    /// Writers still running; the last one to finish unregisters the
    /// connection.
    writers_left: AtomicUsize,
}

impl Conn {
    /// Shuts both sockets down (both peers see end-of-stream; blocked reads
    /// and writes return) and wakes writers waiting for a due time.
    /// Idempotent.
    fn cut(&self) {
        *lock(&self.cut) = true;
        self.cut_changed.notify_all();
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }

    /// Waits until `due`; `false` if the connection was cut first.
    fn wait_until(&self, due: Instant) -> bool {
        let mut cut = lock(&self.cut);
        loop {
            if *cut {
                return false;
            }
            let now = Instant::now();
            if now >= due {
                return true;
            }
            cut = self
                .cut_changed
                .wait_timeout(cut, due - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn writer_finished(&self, shared: &Shared) {
        if self.writers_left.fetch_sub(1, Ordering::AcqRel) == 1 {
            lock(&shared.conns).remove(&self.id);
            self.cut();
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, id: u64, client: TcpStream) -> io::Result<()> {
    let upstream = TcpStream::connect_timeout(&shared.upstream, UPSTREAM_CONNECT_TIMEOUT)?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let conn = Arc::new(Conn {
        id,
        client,
        upstream,
        cut: Mutex::new(false),
        cut_changed: Condvar::new(),
        writers_left: AtomicUsize::new(2),
    });
    lock(&shared.conns).insert(id, Arc::clone(&conn));

    let mut handles = Vec::with_capacity(4);
    let spawned = spawn_relays(shared, &conn, &mut handles);
    if spawned.is_err() {
        // The threads that did start exit once the connection is cut.
        lock(&shared.conns).remove(&id);
        conn.cut();
    }
    let mut threads = lock(&shared.threads);
    threads.retain(|t| !t.is_finished());
    threads.extend(handles);
    spawned
}

/// Starts the connection's four threads, pushing each handle as it starts.
fn spawn_relays(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    handles: &mut Vec<JoinHandle<()>>,
) -> io::Result<()> {
    let (to_upstream, upstream_queue) = mpsc::channel();
    let (to_client, client_queue) = mpsc::channel();
    let answers = to_client.clone();
    handles.push(spawn_relay(shared, conn, "c2s", move |s, c| {
        let splitter = Splitter::RequestHead;
        relay_reader(s, c, &c.client, splitter, &to_upstream, Some(&answers));
    })?);
    handles.push(spawn_relay(shared, conn, "c2s-out", move |s, c| {
        relay_writer(s, c, &c.upstream, &upstream_queue);
    })?);
    handles.push(spawn_relay(shared, conn, "s2c", move |s, c| {
        relay_reader(s, c, &c.upstream, Splitter::ResponseHead, &to_client, None);
    })?);
    handles.push(spawn_relay(shared, conn, "s2c-out", move |s, c| {
        relay_writer(s, c, &c.client, &client_queue);
    })?);
    Ok(())
}

fn spawn_relay(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    role: &str,
    f: impl FnOnce(&Shared, &Conn) + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let (s, c) = (Arc::clone(shared), Arc::clone(conn));
    thread::Builder::new()
        .name(format!("fault-proxy-{}-{role}", conn.id))
        .spawn(move || f(&s, &c))
}

/// What a reader hands its writer.
enum Item {
    /// Bytes to write at `due`.
    Data { due: Instant, bytes: Vec<u8> },
    /// The reader saw end-of-stream: half-close the output.
    Eof,
}

/// Reads `input`, splits it into units and forwards, drops or answers each
/// according to the fault in force. `answers` is the queue towards the
/// client (set for the client → server direction only).
fn relay_reader(
    shared: &Shared,
    conn: &Conn,
    mut input: &TcpStream,
    mut splitter: Splitter,
    forward: &Sender<Item>,
    answers: Option<&Sender<Item>>,
) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut fault = Fault::Pass;
    let mut due = Instant::now();
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                conn.cut();
                return;
            }
        };
        fault = shared.fault();
        due = Instant::now();
        match &fault {
            Fault::Refuse => {
                conn.cut();
                return;
            }
            Fault::Delay(d) => due += *d,
            _ => {}
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Some(piece) = splitter.next(&buf[at..]) {
            let unit = &buf[at..at + piece.len];
            at += piece.len;
            let answer = match (&fault, answers) {
                (Fault::Blackhole, _) => continue,
                (
                    Fault::RpcError {
                        method,
                        code,
                        message,
                    },
                    Some(answers),
                ) => injected_answer(unit, &piece.body, method, *code, message)
                    .map(|bytes| (answers, bytes)),
                _ => None,
            };
            let sent = match answer {
                Some((answers, bytes)) => {
                    shared.injected.fetch_add(1, Ordering::Relaxed);
                    answers.send(Item::Data { due, bytes })
                }
                None => forward.send(Item::Data {
                    due,
                    bytes: unit.to_vec(),
                }),
            };
            if sent.is_err() {
                // The writer is gone: the connection was cut, or the answer's
                // direction has already ended. Either way this one is over.
                conn.cut();
                return;
            }
        }
        buf.drain(..at);
    }
    // End of stream: a partial unit is forwarded as it is, then the
    // half-close.
    if !buf.is_empty() && fault != Fault::Blackhole {
        let _ = forward.send(Item::Data { due, bytes: buf });
    }
    let _ = forward.send(Item::Eof);
}

/// Writes what the queue delivers, each item when it is due.
fn relay_writer(shared: &Shared, conn: &Conn, mut output: &TcpStream, queue: &Receiver<Item>) {
    for item in queue {
        match item {
            Item::Data { due, bytes } => {
                if !conn.wait_until(due) {
                    break;
                }
                if output.write_all(&bytes).is_err() {
                    conn.cut();
                    break;
                }
            }
            Item::Eof => {
                let _ = output.shutdown(Shutdown::Write);
                break;
            }
        }
    }
    conn.writer_finished(shared);
}

/// Where a reader is in its byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Splitter {
    /// Client → server: before an HTTP request head (plain HTTP stays here
    /// between keep-alive requests).
    RequestHead,
    /// Server → client: before the first response head.
    ResponseHead,
    /// WebSocket frames, either direction.
    Frames,
    /// Not followed: every read is one unit.
    Raw,
}

/// One unit at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
struct Piece {
    len: usize,
    body: Body,
}

/// The part of a unit that may hold a JSON-RPC request.
#[derive(Debug, PartialEq, Eq)]
enum Body {
    /// Nothing to inspect.
    Opaque,
    /// An HTTP request body, at this range of the unit.
    Http(Range<usize>),
    /// A complete WebSocket text frame's payload, at this range of the unit,
    /// masked with `mask` if set.
    Text {
        payload: Range<usize>,
        mask: Option<[u8; 4]>,
    },
}

impl Piece {
    fn opaque(len: usize) -> Piece {
        Piece {
            len,
            body: Body::Opaque,
        }
    }
}

impl Splitter {
    /// The next complete unit at the front of `buf`, or `None` if more bytes
    /// are needed.
    fn next(&mut self, buf: &[u8]) -> Option<Piece> {
        if buf.is_empty() {
            return None;
        }
        match *self {
            Splitter::Raw => Some(Piece::opaque(buf.len())),
            Splitter::RequestHead => {
                let Some(head_len) = head_len(buf) else {
                    return self.head_incomplete(buf);
                };
                let head = RequestHead::parse(&buf[..head_len]);
                if head.upgrade {
                    *self = Splitter::Frames;
                    return Some(Piece::opaque(head_len));
                }
                let body_len = match head.body {
                    BodyLength::Known(n) if n <= MAX_UNIT => n as usize,
                    BodyLength::Known(_) | BodyLength::Unknown => {
                        *self = Splitter::Raw;
                        return Some(Piece::opaque(buf.len()));
                    }
                };
                let len = head_len + body_len;
                (buf.len() >= len).then_some(Piece {
                    len,
                    body: Body::Http(head_len..len),
                })
            }
            Splitter::ResponseHead => {
                let Some(head_len) = head_len(buf) else {
                    return self.head_incomplete(buf);
                };
                if buf.starts_with(b"HTTP/1.1 101 ") {
                    *self = Splitter::Frames;
                    Some(Piece::opaque(head_len))
                } else {
                    *self = Splitter::Raw;
                    Some(Piece::opaque(buf.len()))
                }
            }
            Splitter::Frames => match Frame::parse(buf) {
                Ok(Some(f)) => Some(Piece {
                    len: f.len,
                    body: if f.fin && f.opcode == OPCODE_TEXT {
                        Body::Text {
                            payload: f.payload,
                            mask: f.mask,
                        }
                    } else {
                        Body::Opaque
                    },
                }),
                Ok(None) => None,
                Err(TooLarge) => {
                    *self = Splitter::Raw;
                    Some(Piece::opaque(buf.len()))
                }
            },
        }
    }

    /// No complete head yet: wait, unless it is too long to be one.
    fn head_incomplete(&mut self, buf: &[u8]) -> Option<Piece> {
        if buf.len() > MAX_HEAD {
            *self = Splitter::Raw;
            Some(Piece::opaque(buf.len()))
        } else {
            None
        }
    }
}

/// Length of the HTTP head at the front of `buf`, through the blank line.
fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// How long an HTTP request body is.
#[derive(Debug, PartialEq, Eq)]
enum BodyLength {
    Known(u64),
    /// `Transfer-Encoding` or an unparsable `Content-Length`.
    Unknown,
}

/// What the splitter needs from a request head.
#[derive(Debug, PartialEq, Eq)]
struct RequestHead {
    upgrade: bool,
    body: BodyLength,
}

impl RequestHead {
    fn parse(head: &[u8]) -> RequestHead {
        let mut parsed = RequestHead {
            upgrade: false,
            body: BodyLength::Known(0),
        };
        let text = String::from_utf8_lossy(head);
        for line in text.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("upgrade") {
                parsed.upgrade |= value.eq_ignore_ascii_case("websocket");
            } else if name.eq_ignore_ascii_case("content-length") {
                parsed.body = value.parse().map_or(BodyLength::Unknown, BodyLength::Known);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                parsed.body = BodyLength::Unknown;
            }
        }
        parsed
    }
}

const OPCODE_TEXT: u8 = 0x1;

/// A frame (or body) longer than [`MAX_UNIT`].
#[derive(Debug, PartialEq, Eq)]
struct TooLarge;

/// A complete WebSocket frame at the front of a buffer (RFC 6455 §5.2).
#[derive(Debug, PartialEq, Eq)]
struct Frame {
    /// Header, mask key and payload.
    len: usize,
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: Range<usize>,
}

impl Frame {
    /// `Ok(None)` while the frame is incomplete.
    fn parse(buf: &[u8]) -> Result<Option<Frame>, TooLarge> {
        let [b0, b1, rest @ ..] = buf else {
            return Ok(None);
        };
        let (payload_len, rest) = match b1 & 0x7f {
            126 => match rest.split_first_chunk::<2>() {
                Some((n, rest)) => (u64::from(u16::from_be_bytes(*n)), rest),
                None => return Ok(None),
            },
            127 => match rest.split_first_chunk::<8>() {
                Some((n, rest)) => (u64::from_be_bytes(*n), rest),
                None => return Ok(None),
            },
            n => (u64::from(n), rest),
        };
        if payload_len > MAX_UNIT {
            return Err(TooLarge);
        }
        let (mask, rest) = if b1 & 0x80 != 0 {
            match rest.split_first_chunk::<4>() {
                Some((m, rest)) => (Some(*m), rest),
                None => return Ok(None),
            }
        } else {
            (None, rest)
        };
        let start = buf.len() - rest.len();
        let end = start + payload_len as usize;
        Ok((buf.len() >= end).then_some(Frame {
            len: end,
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0f,
            mask,
            payload: start..end,
        }))
    }
}

/// An unmasked, final server text frame carrying `payload`.
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x80 | OPCODE_TEXT);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// The fields of a request the proxy looks at.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(default, borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct ErrorReply<'a> {
    jsonrpc: &'static str,
    id: &'a RawValue,
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    code: i64,
    message: &'a str,
}

/// The bytes to send the client instead of forwarding `unit`, if `unit` is
/// a JSON-RPC request for `method`: a server text frame or an HTTP response
/// with the error object.
fn injected_answer(
    unit: &[u8],
    body: &Body,
    method: &str,
    code: i64,
    message: &str,
) -> Option<Vec<u8>> {
    let json: Cow<'_, [u8]> = match body {
        Body::Opaque => return None,
        Body::Http(range) => Cow::Borrowed(&unit[range.clone()]),
        Body::Text {
            payload,
            mask: None,
        } => Cow::Borrowed(&unit[payload.clone()]),
        Body::Text {
            payload,
            mask: Some(mask),
        } => Cow::Owned(
            unit[payload.clone()]
                .iter()
                .zip(mask.iter().cycle())
                .map(|(b, m)| b ^ m)
                .collect(),
        ),
    };
    let probe: Probe<'_> = serde_json::from_slice(&json).ok()?;
    if probe.method.as_deref() != Some(method) {
        return None;
    }
    let null = RawValue::NULL;
    let reply = serde_json::to_vec(&ErrorReply {
        jsonrpc: "2.0",
        id: probe.id.unwrap_or(null),
        error: ErrorObject { code, message },
    })
    .ok()?;
    Some(match body {
        Body::Http(_) => {
            let mut response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                reply.len()
            )
            .into_bytes();
            response.extend_from_slice(&reply);
            response
        }
        _ => text_frame(&reply),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client_frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = text_frame(payload);
        f[0] = if fin { 0x80 } else { 0 } | opcode;
        f[1] |= 0x80;
        let header = f.len() - payload.len();
        let masked: Vec<u8> = payload
            .iter()
            .zip(mask.iter().cycle())
            .map(|(b, m)| b ^ m)
            .collect();
        f.truncate(header);
        f.extend_from_slice(&mask);
        f.extend_from_slice(&masked);
        f
    }

    /// Feeds `stream` to a splitter in reads of `step` bytes, as the reader
    /// does, and returns the units with their decoded JSON, if any.
    fn split(stream: &[u8], step: usize) -> Vec<(Vec<u8>, Option<String>)> {
        let mut splitter = Splitter::RequestHead;
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for read in stream.chunks(step) {
            buf.extend_from_slice(read);
            let mut at = 0;
            while let Some(p) = splitter.next(&buf[at..]) {
                let unit = buf[at..at + p.len].to_vec();
                let json = injected_answer(&unit, &p.body, "m", 1, "x").map(|_| {
                    let answer = match &p.body {
                        Body::Http(r) => unit[r.clone()].to_vec(),
                        Body::Text { payload, mask } => unit[payload.clone()]
                            .iter()
                            .zip(mask.unwrap_or_default().iter().cycle())
                            .map(|(b, m)| b ^ m)
                            .collect(),
                        Body::Opaque => unreachable!(),
                    };
                    String::from_utf8(answer).unwrap()
                });
                out.push((unit, json));
                at += p.len;
            }
            buf.drain(..at);
        }
        assert!(buf.is_empty(), "{} bytes left over", buf.len());
        out
    }

    #[test]
    fn websocket_frames_split_at_every_read_size() {
        let upgrade =
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let long = format!(
            r#"{{"id":2,"method":"m","params":["{}"]}}"#,
            "ab".repeat(100)
        );
        let frames = [
            client_frame(1, true, br#"{"id":1,"method":"other"}"#, [1, 2, 3, 4]),
            client_frame(1, true, long.as_bytes(), [9, 8, 7, 6]),
            client_frame(2, true, br#"{"id":3,"method":"m"}"#, [5, 5, 5, 5]),
            client_frame(9, true, b"", [0, 0, 0, 0]),
            client_frame(1, false, br#"{"id":4,"method":"m"}"#, [1, 1, 1, 1]),
            client_frame(1, true, br#"{"id":5,"method":"m"}"#, [0xff, 0, 0xff, 0]),
        ];
        let mut stream = upgrade.to_vec();
        for f in &frames {
            stream.extend_from_slice(f);
        }
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let units = split(&stream, step);
            assert_eq!(units.len(), 1 + frames.len(), "step {step}");
            assert_eq!(units[0], (upgrade.to_vec(), None));
            for (i, f) in frames.iter().enumerate() {
                assert_eq!(&units[i + 1].0, f, "step {step}, frame {i}");
            }
            let matched: Vec<_> = units.iter().map(|u| u.1.is_some()).collect();
            // Only complete text frames are inspected.
            assert_eq!(matched, [false, false, true, false, false, false, true]);
            assert_eq!(units[6].1.as_deref(), Some(r#"{"id":5,"method":"m"}"#));
        }
    }

    #[test]
    fn http_keep_alive_requests_are_units() {
        let req = |body: &str| {
            format!(
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        let a = req(r#"{"jsonrpc":"2.0","id":"a","method":"m"}"#);
        let b = req(r#"{"jsonrpc":"2.0","id":1,"method":"n"}"#);
        let stream = format!("{a}{b}{a}");
        for step in [1, 5, stream.len()] {
            let units = split(stream.as_bytes(), step);
            let units: Vec<_> = units
                .into_iter()
                .map(|(u, json)| (String::from_utf8(u).unwrap(), json.is_some()))
                .collect();
            assert_eq!(
                units,
                [(a.clone(), true), (b.clone(), false), (a.clone(), true)]
            );
        }
    }

    #[test]
    fn unfollowable_streams_go_raw() {
        let mut s = Splitter::RequestHead;
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello";
        assert_eq!(s.next(chunked), Some(Piece::opaque(chunked.len())));
        assert_eq!(s, Splitter::Raw);

        let mut s = Splitter::Frames;
        let mut huge = vec![0x82, 0x7f];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(s.next(&huge), Some(Piece::opaque(huge.len())));
        assert_eq!(s, Splitter::Raw);

        let mut s = Splitter::ResponseHead;
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(s.next(ok), Some(Piece::opaque(ok.len())));
        assert_eq!(s, Splitter::Raw);
        let mut s = Splitter::ResponseHead;
        let switching = b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02{}";
        assert_eq!(s.next(switching), Some(Piece::opaque(switching.len() - 4)));
        assert_eq!(s, Splitter::Frames);
    }

    #[test]
    fn answers_carry_the_request_id_verbatim() {
        let body = br#"{"jsonrpc":"2.0","id":"x-1","method":"m","params":[]}"#;
        let unit = client_frame(1, true, body, [3, 1, 4, 1]);
        let Some(Piece { len, body: parsed }) = Splitter::Frames.next(&unit) else {
            panic!("complete frame")
        };
        assert_eq!(len, unit.len());
        let answer = injected_answer(&unit, &parsed, "m", -32000, "no \"way\"").unwrap();
        let frame = Frame::parse(&answer).unwrap().unwrap();
        assert_eq!((frame.fin, frame.opcode, frame.mask), (true, 1, None));
        assert_eq!(
            std::str::from_utf8(&answer[frame.payload]).unwrap(),
            r#"{"jsonrpc":"2.0","id":"x-1","error":{"code":-32000,"message":"no \"way\""}}"#
        );
        assert_eq!(injected_answer(&unit, &parsed, "other", 1, "x"), None);

        let long = text_frame(&[b' '; 70_000]);
        assert_eq!(&long[..2], &[0x81, 127]);
        let mid = text_frame(&[b' '; 300]);
        assert_eq!(&mid[..4], &[0x81, 126, 1, 44]);
    }
}
