//! A loopback private relay for tests (feature `testkit`): it speaks the
//! Flashbots JSON-RPC dialect over HTTP/1.1 and behaves like a builder in
//! front of a dev node.
//!
//! - Every request must carry a valid `X-Flashbots-Signature` (and, with an
//!   allow list, one from an allowed relay-auth address); otherwise it is
//!   answered `403` with a JSON-RPC error and counted in
//!   [`RelaySim::rejected_signatures`]. Nothing in a refused request is acted on.
//! - `eth_sendPrivateTransaction` is answered at once with the transaction
//!   hash; the transaction is held for [`RelaySimConfig::include_delay`] and
//!   then "included" by forwarding it to the node with
//!   `eth_sendRawTransaction` over HTTP.
//! - `eth_cancelPrivateTransaction` removes a transaction that is still held
//!   and answers `true`; `false` if it was already forwarded (or dropped) or
//!   is unknown.
//! - `maxBlockNumber` is the last block the transaction may land in. When it
//!   is due, a held transaction is dropped instead of forwarded if its
//!   `maxBlockNumber` is not above the node's current block
//!   (`eth_blockNumber`): the earliest block it could still land in is
//!   current + 1.
//! - With `drop_all` on ([`RelaySim::set_drop_all`]), transactions are
//!   accepted and answered as usual but never forwarded: any transaction
//!   received while it is on, or due while it is on, is dropped. This is the
//!   relay that silently fails, for testing fall-back to the public mempool.
//!
//! Threads: one accepts connections (loopback, `127.0.0.1:0`), one serves
//! each connection (keep-alive, pipelined requests answered in order), one
//! forwards due transactions in the order they were received. All of them
//! stop, and are joined, when the [`RelaySim`] drops.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, keccak256};
use serde_json::{Value, json};

use crate::relay::{
    BodyAt, HttpTarget, MessageKind, parse_http_url, parse_message, verify_flashbots_signature,
};

/// How often idle threads look at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Bound on one call to the node (connect, request, reply).
const NODE_TIMEOUT: Duration = Duration::from_secs(5);

/// JSON-RPC "invalid request": refused authentication, wrong HTTP method.
const CODE_INVALID_REQUEST: i64 = -32600;
/// JSON-RPC "parse error".
const CODE_PARSE: i64 = -32700;
/// JSON-RPC "method not found".
const CODE_NO_METHOD: i64 = -32601;
/// JSON-RPC "invalid params".
const CODE_PARAMS: i64 = -32602;

/// How the simulated relay behaves.
#[derive(Clone, Debug, Default)]
pub struct RelaySimConfig {
    /// How long a private transaction is held before it is forwarded to the
    /// node (zero: as soon as the forwarding thread gets to it).
    pub include_delay: Duration,
    /// `Some`: only these relay-auth addresses are served; others get `403`.
    pub allowed_auth: Option<Vec<Address>>,
    /// Accept every transaction but never forward any (settable later with
    /// [`RelaySim::set_drop_all`]).
    pub drop_all: bool,
}

/// A running loopback relay; its threads stop when it drops.
pub struct RelaySim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    includer: Option<JoinHandle<()>>,
}

impl fmt::Debug for RelaySim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelaySim")
            .field("addr", &self.addr)
            .field("received", &self.received())
            .field("forwarded", &self.forwarded())
            .field("cancelled", &self.cancelled())
            .field("rejected_signatures", &self.rejected_signatures())
            .field("dropped", &self.dropped())
            .field("forward_errors", &self.forward_errors())
            .finish_non_exhaustive()
    }
}

/// A private transaction waiting for its include time.
struct Held {
    hash: B256,
    raw: Vec<u8>,
    max_block: Option<u64>,
    due: Instant,
    /// `drop_all` was on when it arrived.
    doomed: bool,
}

/// The node the relay forwards to.
struct Node {
    addrs: Vec<SocketAddr>,
    target: HttpTarget,
}

struct Shared {
    node: Node,
    include_delay: Duration,
    allowed_auth: Option<Vec<Address>>,
    stop: AtomicBool,
    drop_all: AtomicBool,
    received: AtomicU64,
    forwarded: AtomicU64,
    cancelled: AtomicU64,
    rejected: AtomicU64,
    dropped: AtomicU64,
    forward_errors: AtomicU64,
    last_forward_error: Mutex<Option<String>>,
    held: Mutex<Vec<Held>>,
    wake: Condvar,
    /// Each served connection: a handle on its socket (to shut it down on
    /// drop) and its thread.
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

/// Locks, ignoring poison: a panicking test thread must not hide the state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RelaySim {
    /// Starts the relay in front of the node at `node_http_url`
    /// (`http://host:port`), listening on `127.0.0.1:0`.
    pub fn start(node_http_url: &str, cfg: RelaySimConfig) -> std::io::Result<RelaySim> {
        let target = parse_http_url(node_http_url)
            .map_err(|e| std::io::Error::new(ErrorKind::InvalidInput, e.to_string()))?;
        let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
            .to_socket_addrs()?
            .collect();
        if addrs.is_empty() {
            return Err(std::io::Error::new(
                ErrorKind::NotFound,
                "node host resolved to no address",
            ));
        }
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            node: Node { addrs, target },
            include_delay: cfg.include_delay,
            allowed_auth: cfg.allowed_auth,
            stop: AtomicBool::new(false),
            drop_all: AtomicBool::new(cfg.drop_all),
            received: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            forward_errors: AtomicU64::new(0),
            last_forward_error: Mutex::new(None),
            held: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            conns: Mutex::new(Vec::new()),
        });
        let mut sim = RelaySim {
            addr,
            shared: Arc::clone(&shared),
            acceptor: None,
            includer: None,
        };
        // Assigned one at a time so a failed spawn still stops the other
        // thread through `Drop`.
        let s = Arc::clone(&shared);
        sim.includer = Some(
            std::thread::Builder::new()
                .name("relay-sim-include".into())
                .spawn(move || include_loop(&s))?,
        );
        let s = Arc::clone(&shared);
        sim.acceptor = Some(
            std::thread::Builder::new()
                .name("relay-sim-accept".into())
                .spawn(move || accept_loop(&s, listener))?,
        );
        Ok(sim)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Authenticated `eth_sendPrivateTransaction` requests accepted.
    pub fn received(&self) -> u64 {
        self.shared.received.load(Ordering::SeqCst)
    }

    /// Transactions forwarded to the node and accepted by it.
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Cancellations answered `true`.
    pub fn cancelled(&self) -> u64 {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// Requests refused with `403`: signature missing, malformed, not
    /// matching the body or the claimed address, or not on the allow list.
    pub fn rejected_signatures(&self) -> u64 {
        self.shared.rejected.load(Ordering::SeqCst)
    }

    /// Held transactions discarded without forwarding (`maxBlockNumber`
    /// passed, or `drop_all`).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::SeqCst)
    }

    /// Forwards the node refused or that could not reach it.
    pub fn forward_errors(&self) -> u64 {
        self.shared.forward_errors.load(Ordering::SeqCst)
    }

    /// The last forwarding failure, for diagnostics.
    pub fn last_forward_error(&self) -> Option<String> {
        lock(&self.shared.last_forward_error).clone()
    }

    /// Transactions currently held (received, not yet due).
    pub fn held(&self) -> usize {
        lock(&self.shared.held).len()
    }

    /// Turns "accept and never forward" on or off.
    pub fn set_drop_all(&self, on: bool) {
        self.shared.drop_all.store(on, Ordering::SeqCst);
    }
}

impl Drop for RelaySim {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            // Under the lock: the includer either sees `stop` before it
            // waits or is already waiting and gets this notification.
            let _held = lock(&self.shared.held);
            self.shared.wake.notify_all();
        }
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        // The acceptor is gone: no connection is added after this.
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for (stream, _) in &conns {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, h) in conns {
            let _ = h.join();
        }
        if let Some(h) = self.includer.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let Ok(handle) = stream.try_clone() else {
                    continue;
                };
                let s = Arc::clone(shared);
                let spawned = std::thread::Builder::new()
                    .name("relay-sim-conn".into())
                    .spawn(move || serve(&s, stream));
                if let Ok(thread) = spawned {
                    lock(&shared.conns).push((handle, thread));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL_INTERVAL / 4),
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

/// Serves one keep-alive connection: every complete request in the buffer
/// is answered, in order, before reading more.
fn serve(shared: &Shared, mut stream: TcpStream) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(POLL_INTERVAL)).is_err()
        || stream.set_nodelay(true).is_err()
    {
        return;
    }
    let mut input: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut decoded = Vec::new();
    let mut out = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let mut close = false;
        loop {
            let parsed = match parse_message(&input, MessageKind::Request, &mut decoded) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    let body = rpc_error(&Value::Null, CODE_PARSE, &e.to_string());
                    write_response(&mut out, 400, &body, true);
                    close = true;
                    break;
                }
            };
            let body = match &parsed.body {
                BodyAt::Inline(r) => &input[r.clone()],
                BodyAt::Decoded => &decoded[..],
            };
            let signature = parsed.signature.clone().map(|r| &input[r]);
            let (status, reply) = shared.handle(&input[parsed.start_line.clone()], signature, body);
            write_response(&mut out, status, &reply, parsed.close);
            input.drain(..parsed.consumed);
            if parsed.close {
                close = true;
                break;
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
        if close || shared.stop.load(Ordering::SeqCst) {
            let _ = stream.shutdown(Shutdown::Write);
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => input.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

fn write_response(out: &mut Vec<u8>, status: u16, body: &str, close: bool) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    );
    out.extend_from_slice(body.as_bytes());
}

fn rpc_error(id: &Value, code: i64, message: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}).to_string()
}

fn rpc_result(id: &Value, result: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "result": result}).to_string()
}

/// `0x`-prefixed hex quantity → u64.
fn parse_quantity(v: &Value) -> Option<u64> {
    let s = v.as_str()?.strip_prefix("0x")?;
    u64::from_str_radix(s, 16).ok()
}

impl Shared {
    /// Answers one request: `(HTTP status, JSON body)`.
    fn handle(&self, start_line: &[u8], signature: Option<&[u8]>, body: &[u8]) -> (u16, String) {
        // The id is echoed in every answer, refused or not, when readable.
        let request: Option<Value> = serde_json::from_slice(body).ok();
        let id = request
            .as_ref()
            .and_then(|v| v.get("id"))
            .cloned()
            .unwrap_or(Value::Null);
        if !start_line.starts_with(b"POST ") {
            return (
                405,
                rpc_error(&id, CODE_INVALID_REQUEST, "only POST is served"),
            );
        }
        let auth = match signature.map(std::str::from_utf8) {
            None => Err("missing X-Flashbots-Signature header".to_owned()),
            Some(Err(_)) => Err("X-Flashbots-Signature is not UTF-8".to_owned()),
            Some(Ok(h)) => verify_flashbots_signature(h, body).map_err(|e| e.to_string()),
        };
        let auth = auth.and_then(|addr| match &self.allowed_auth {
            Some(list) if !list.contains(&addr) => {
                Err(format!("relay-auth address {addr} is not allowed"))
            }
            _ => Ok(addr),
        });
        if let Err(why) = auth {
            self.rejected.fetch_add(1, Ordering::SeqCst);
            return (
                403,
                rpc_error(
                    &id,
                    CODE_INVALID_REQUEST,
                    &format!("signature check failed: {why}"),
                ),
            );
        }
        let Some(request) = request else {
            return (400, rpc_error(&id, CODE_PARSE, "body is not JSON"));
        };
        let param = &request["params"][0];
        match request["method"].as_str() {
            Some("eth_sendPrivateTransaction") => match self.hold(param) {
                Ok(hash) => (200, rpc_result(&id, json!(hash))),
                Err(why) => (200, rpc_error(&id, CODE_PARAMS, why)),
            },
            Some("eth_cancelPrivateTransaction") => {
                let Some(hash) = param["txHash"]
                    .as_str()
                    .and_then(|s| s.parse::<B256>().ok())
                else {
                    return (
                        200,
                        rpc_error(&id, CODE_PARAMS, "txHash must be a 32-byte hash"),
                    );
                };
                let removed = {
                    let mut held = lock(&self.held);
                    let before = held.len();
                    held.retain(|h| h.hash != hash);
                    before != held.len()
                };
                if removed {
                    self.cancelled.fetch_add(1, Ordering::SeqCst);
                }
                (200, rpc_result(&id, json!(removed)))
            }
            Some(other) => (
                200,
                rpc_error(&id, CODE_NO_METHOD, &format!("method {other} not found")),
            ),
            None => (200, rpc_error(&id, CODE_PARSE, "missing method")),
        }
    }

    /// Validates an `eth_sendPrivateTransaction` parameter object and holds
    /// the transaction.
    fn hold(&self, param: &Value) -> Result<B256, &'static str> {
        let tx = param["tx"]
            .as_str()
            .and_then(|s| s.strip_prefix("0x"))
            .and_then(|s| hex::decode(s).ok())
            .filter(|raw| !raw.is_empty())
            .ok_or("tx must be 0x-prefixed, non-empty hex")?;
        let max_block = match &param["maxBlockNumber"] {
            Value::Null => None,
            v => Some(parse_quantity(v).ok_or("maxBlockNumber must be a hex quantity")?),
        };
        let hash = keccak256(&tx);
        let doomed = self.drop_all.load(Ordering::SeqCst);
        {
            let mut held = lock(&self.held);
            if !held.iter().any(|h| h.hash == hash) {
                held.push(Held {
                    hash,
                    raw: tx,
                    max_block,
                    due: Instant::now() + self.include_delay,
                    doomed,
                });
            }
            self.received.fetch_add(1, Ordering::SeqCst);
            self.wake.notify_all();
        }
        Ok(hash)
    }

    /// Forwards (or drops) transactions that are due, in arrival order.
    fn include(&self, due: Vec<Held>) {
        let mut head: Option<u64> = None;
        for tx in due {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if tx.doomed || self.drop_all.load(Ordering::SeqCst) {
                self.dropped.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            if let Some(max) = tx.max_block {
                let current = match head {
                    Some(b) => b,
                    None => match self
                        .node_call("eth_blockNumber", json!([]))
                        .and_then(|v| parse_quantity(&v).ok_or("bad eth_blockNumber".to_owned()))
                    {
                        Ok(b) => *head.insert(b),
                        Err(e) => {
                            self.forward_failed(e);
                            continue;
                        }
                    },
                };
                if max <= current {
                    self.dropped.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
            }
            let raw = format!("0x{}", hex::encode(&tx.raw));
            match self.node_call("eth_sendRawTransaction", json!([raw])) {
                Ok(_) => {
                    self.forwarded.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => self.forward_failed(e),
            }
        }
    }

    fn forward_failed(&self, e: String) {
        self.forward_errors.fetch_add(1, Ordering::SeqCst);
        *lock(&self.last_forward_error) = Some(e);
    }

    /// One blocking JSON-RPC call to the node over a fresh HTTP connection.
    fn node_call(&self, method: &str, params: Value) -> Result<Value, String> {
        let body =
            json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
        let mut last = "node resolved to no address".to_owned();
        let mut stream = None;
        for addr in &self.node.addrs {
            match TcpStream::connect_timeout(addr, NODE_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("connect {addr}: {e}"),
            }
        }
        let mut stream = stream.ok_or(last)?;
        let io = |e: std::io::Error| format!("{method}: {e}");
        stream.set_read_timeout(Some(NODE_TIMEOUT)).map_err(io)?;
        stream.set_write_timeout(Some(NODE_TIMEOUT)).map_err(io)?;
        let t = &self.node.target;
        let mut request = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            t.path,
            t.authority,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body.as_bytes());
        stream.write_all(&request).map_err(io)?;

        let deadline = Instant::now() + NODE_TIMEOUT;
        let mut input = Vec::new();
        let mut decoded = Vec::new();
        let mut chunk = [0u8; 8192];
        let parsed = loop {
            match parse_message(&input, MessageKind::Response, &mut decoded) {
                Ok(Some(p)) => break p,
                Ok(None) => {}
                Err(e) => return Err(format!("{method}: {e}")),
            }
            if Instant::now() >= deadline {
                return Err(format!("{method}: no reply within {NODE_TIMEOUT:?}"));
            }
            match stream.read(&mut chunk) {
                Ok(0) => return Err(format!("{method}: node closed before replying")),
                Ok(n) => input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        };
        let body = match &parsed.body {
            BodyAt::Inline(r) => &input[r.clone()],
            BodyAt::Decoded => &decoded[..],
        };
        let reply: Value = serde_json::from_slice(body)
            .map_err(|e| format!("{method}: HTTP {} with unreadable body: {e}", parsed.status))?;
        if let Some(err) = reply.get("error").filter(|e| !e.is_null()) {
            return Err(format!("{method}: node refused: {err}"));
        }
        Ok(reply.get("result").cloned().unwrap_or(Value::Null))
    }
}

/// Waits for the earliest due transaction and hands every due one to
/// [`Shared::include`], outside the lock (cancels and new sends go on
/// meanwhile).
fn include_loop(shared: &Shared) {
    let mut held = lock(&shared.held);
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        match held.iter().map(|h| h.due).min() {
            None => {
                held = shared.wake.wait(held).unwrap_or_else(|p| p.into_inner());
            }
            Some(due) if due > now => {
                held = shared
                    .wake
                    .wait_timeout(held, due - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            Some(_) => {
                let (due, keep): (Vec<Held>, Vec<Held>) =
                    held.drain(..).partition(|h| h.due <= now);
                *held = keep;
                drop(held);
                shared.include(due);
                held = lock(&shared.held);
            }
        }
    }
}
