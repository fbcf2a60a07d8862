//! A loopback Beacon API node for tests (feature `testkit`): it serves
//! `GET /eth/v1/beacon/headers/head` and
//! `GET /eth/v1/beacon/states/{state_id}/validators?id=…` in the standard
//! format, from state the test sets.
//!
//! - The chain is one state: a head slot ([`BeaconSim::set_head_slot`]) and
//!   a validator registry ([`BeaconSim::upsert_validator`] and the setters).
//!   Every state id the Beacon API allows (`head`, `genesis`, `finalized`,
//!   `justified`, a slot, a `0x` state root) reads that one state, except a
//!   slot after the head, which is `404` as on a real node. A malformed
//!   state id is `400`.
//! - `id` lists (comma-separated, `%2C` too, and repeated `id=`) hold
//!   pubkeys or indices; a malformed id is `400`. A validator the registry
//!   does not hold, or whose status is [`ValidatorStatus::NotFound`], is
//!   absent from `data`, as real nodes do. Without `id`, every validator is
//!   served. `data` is in index order.
//! - Errors use the standard body `{"code":N,"message":"…"}`: `404` for an
//!   unknown route, `405` for a method other than `GET`, and, while
//!   [`BeaconSim::set_fail`] holds a status, that status for every request
//!   with [`SIM_FAILURE_MESSAGE`].
//! - [`BeaconSim::set_raw_body`] answers one route `200` with any body (for
//!   malformed replies); [`BeaconSim::set_stall`] reads requests and answers
//!   none until it is cleared (for timeouts); [`BeaconSim::disconnect_all`]
//!   closes every open connection (for reconnects).
//!
//! Threads: one accepts connections (loopback, `127.0.0.1:0`), one serves
//! each connection (keep-alive, requests answered in order). All of them stop,
//! and are joined, when the [`BeaconSim`] drops.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use alloy_primitives::{B256, keccak256};
use serde_json::{Value, json};

use crate::beacon::{BlsPubkey, ValidatorInfo, ValidatorStatus};
use crate::relay::{MessageKind, parse_message};

/// How often idle threads look at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The `message` of every reply while [`BeaconSim::set_fail`] is set.
pub const SIM_FAILURE_MESSAGE: &str = "Internal server error: simulated failure";

const HEAD_PATH: &str = "/eth/v1/beacon/headers/head";
const STATES_PREFIX: &str = "/eth/v1/beacon/states/";

/// A route whose reply [`BeaconSim::set_raw_body`] can replace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimRoute {
    /// `GET /eth/v1/beacon/headers/head`.
    Head,
    /// `GET /eth/v1/beacon/states/{state_id}/validators`.
    Validators,
}

/// The root the sim reports for the head block at `slot`.
pub fn block_root(slot: u64) -> B256 {
    let mut seed = *b"block-root\0\0\0\0\0\0\0\0";
    seed[10..].copy_from_slice(&slot.to_be_bytes());
    keccak256(seed)
}

/// The state root the sim reports for the head block at `slot`.
pub fn state_root(slot: u64) -> B256 {
    let mut seed = *b"state-root\0\0\0\0\0\0\0\0";
    seed[10..].copy_from_slice(&slot.to_be_bytes());
    keccak256(seed)
}

/// A running loopback Beacon API node; its threads stop when it drops.
pub struct BeaconSim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl fmt::Debug for BeaconSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BeaconSim")
            .field("addr", &self.addr)
            .field("requests", &self.request_count())
            .field("connections", &self.connection_count())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct ChainState {
    head_slot: u64,
    /// Sorted by index; pubkeys unique.
    validators: Vec<ValidatorInfo>,
    fail: Option<u16>,
    raw_head: Option<String>,
    raw_validators: Option<String>,
}

struct Shared {
    stop: AtomicBool,
    stall: AtomicBool,
    requests: AtomicU64,
    connections: AtomicU64,
    state: Mutex<ChainState>,
    /// Each served connection: a handle on its socket (to shut it down) and
    /// its thread.
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

/// Locks, ignoring poison: a panicking test thread must not hide the state.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BeaconSim {
    /// Starts the node on `127.0.0.1:0` with head slot 0 and no validators.
    pub fn start() -> std::io::Result<BeaconSim> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            stall: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            state: Mutex::new(ChainState::default()),
            conns: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name("beacon-sim-accept".into())
            .spawn(move || accept_loop(&s, listener))?;
        Ok(BeaconSim {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered, failures included.
    pub fn request_count(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connection_count(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Moves the head to `slot`.
    pub fn set_head_slot(&self, slot: u64) {
        lock(&self.shared.state).head_slot = slot;
    }

    /// The head slot.
    pub fn head_slot(&self) -> u64 {
        lock(&self.shared.state).head_slot
    }

    /// Adds `v`, or replaces the validator with its pubkey. A status of
    /// [`ValidatorStatus::NotFound`] keeps it out of every reply.
    pub fn upsert_validator(&self, v: ValidatorInfo) {
        let mut st = lock(&self.shared.state);
        st.validators.retain(|o| o.pubkey != v.pubkey);
        let at = st.validators.partition_point(|o| o.index <= v.index);
        st.validators.insert(at, v);
    }

    /// The validator with `pubkey`, as served (or hidden).
    pub fn validator(&self, pubkey: &BlsPubkey) -> Option<ValidatorInfo> {
        lock(&self.shared.state)
            .validators
            .iter()
            .find(|v| v.pubkey == *pubkey)
            .cloned()
    }

    fn update(&self, pubkey: &BlsPubkey, f: impl FnOnce(&mut ValidatorInfo)) -> bool {
        let mut st = lock(&self.shared.state);
        match st.validators.iter_mut().find(|v| v.pubkey == *pubkey) {
            Some(v) => {
                f(v);
                true
            }
            None => false,
        }
    }

    /// Sets the balance of `pubkey`; `false` if the registry lacks it.
    pub fn set_balance(&self, pubkey: &BlsPubkey, gwei: u64) -> bool {
        self.update(pubkey, |v| v.balance_gwei = gwei)
    }

    /// Sets the status of `pubkey` (nothing else changes); `false` if the
    /// registry lacks it. [`ValidatorStatus::NotFound`] hides it.
    pub fn set_status(&self, pubkey: &BlsPubkey, status: ValidatorStatus) -> bool {
        self.update(pubkey, |v| v.status = status)
    }

    /// Sets the `slashed` flag of `pubkey` and moves an active validator to
    /// `active_slashed`, an exited one to `exited_slashed`; `false` if the
    /// registry lacks it.
    pub fn slash(&self, pubkey: &BlsPubkey) -> bool {
        self.update(pubkey, |v| {
            v.slashed = true;
            v.status = match v.status {
                ValidatorStatus::ActiveOngoing | ValidatorStatus::ActiveExiting => {
                    ValidatorStatus::ActiveSlashed
                }
                ValidatorStatus::ExitedUnslashed => ValidatorStatus::ExitedSlashed,
                other => other,
            };
        })
    }

    /// `Some(status)`: answer every request with that HTTP status and the
    /// standard error body (message [`SIM_FAILURE_MESSAGE`]); `None`: serve
    /// normally again.
    pub fn set_fail(&self, status: Option<u16>) {
        lock(&self.shared.state).fail = status;
    }

    /// `Some(body)`: answer `route` with `200` and exactly `body` (not
    /// checked); `None`: serve it normally again.
    pub fn set_raw_body(&self, route: SimRoute, body: Option<String>) {
        let mut st = lock(&self.shared.state);
        match route {
            SimRoute::Head => st.raw_head = body,
            SimRoute::Validators => st.raw_validators = body,
        }
    }

    /// `true`: read requests but answer none until it is turned off (the
    /// held requests are then answered, on connections still open).
    pub fn set_stall(&self, on: bool) {
        self.shared.stall.store(on, Ordering::SeqCst);
    }

    /// Closes every open connection (clients see a reset or an end of
    /// stream) and waits for their threads.
    pub fn disconnect_all(&self) {
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        close_all(conns);
    }
}

fn close_all(conns: Vec<(TcpStream, JoinHandle<()>)>) {
    for (stream, _) in &conns {
        let _ = stream.shutdown(Shutdown::Both);
    }
    for (_, h) in conns {
        let _ = h.join();
    }
}

impl Drop for BeaconSim {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        // The acceptor is gone: no connection is added after this.
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        close_all(conns);
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let Ok(handle) = stream.try_clone() else {
                    continue;
                };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let s = Arc::clone(shared);
                let spawned = std::thread::Builder::new()
                    .name("beacon-sim-conn".into())
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
        // While stalled, requests are read and held, not answered.
        while !shared.stall.load(Ordering::SeqCst) {
            let parsed = match parse_message(&input, MessageKind::Request, &mut decoded) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    write_response(&mut out, 400, &error_body(400, &e.to_string()), true);
                    close = true;
                    break;
                }
            };
            shared.requests.fetch_add(1, Ordering::SeqCst);
            let (status, body) = shared.handle(&input[parsed.start_line.clone()]);
            write_response(&mut out, status, &body, parsed.close);
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
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
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

/// The standard Beacon API error body.
fn error_body(code: u16, message: &str) -> String {
    json!({"code": code, "message": message, "stacktraces": []}).to_string()
}

fn hex0x(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

fn validator_json(v: &ValidatorInfo) -> Value {
    json!({
        "index": v.index.to_string(),
        "balance": v.balance_gwei.to_string(),
        "status": v.status.as_str(),
        "validator": {
            "pubkey": hex0x(&v.pubkey),
            "withdrawal_credentials": hex0x(&v.withdrawal_credentials),
            "effective_balance": v.effective_balance_gwei.to_string(),
            "slashed": v.slashed,
            "activation_eligibility_epoch": v.activation_eligibility_epoch.to_string(),
            "activation_epoch": v.activation_epoch.to_string(),
            "exit_epoch": v.exit_epoch.to_string(),
            "withdrawable_epoch": v.withdrawable_epoch.to_string(),
        }
    })
}

/// A validator id from the `id` query.
enum Id {
    Index(u64),
    Pubkey(BlsPubkey),
}

fn parse_id(text: &str) -> Option<Id> {
    if let Some(h) = text.strip_prefix("0x") {
        let mut k = [0u8; 48];
        hex::decode_to_slice(h, &mut k).ok()?;
        return Some(Id::Pubkey(k));
    }
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().map(Id::Index)
}

/// Whether `id` is a state id the Beacon API allows; `Some(slot)` for a slot.
fn parse_state_id(id: &str) -> Result<Option<u64>, ()> {
    match id {
        "head" | "genesis" | "finalized" | "justified" => Ok(None),
        _ if id.len() == 66
            && id.starts_with("0x")
            && id[2..].bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(None)
        }
        _ if !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit()) => {
            id.parse().map(Some).map_err(|_| ())
        }
        _ => Err(()),
    }
}

impl Shared {
    /// Answers one request: `(HTTP status, JSON body)`.
    fn handle(&self, start_line: &[u8]) -> (u16, String) {
        let st = lock(&self.state);
        if let Some(code) = st.fail {
            return (code, error_body(code, SIM_FAILURE_MESSAGE));
        }
        let line = String::from_utf8_lossy(start_line);
        let mut parts = line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if method != "GET" {
            return (
                405,
                error_body(405, &format!("method {method} is not allowed")),
            );
        }
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if path == HEAD_PATH {
            if let Some(raw) = &st.raw_head {
                return (200, raw.clone());
            }
            return (200, head_json(st.head_slot).to_string());
        }
        if let Some(state_id) = path
            .strip_prefix(STATES_PREFIX)
            .and_then(|r| r.strip_suffix("/validators"))
            .filter(|s| !s.contains('/'))
        {
            if let Some(raw) = &st.raw_validators {
                return (200, raw.clone());
            }
            return validators_reply(&st, state_id, query);
        }
        (
            404,
            error_body(404, &format!("NOT_FOUND: no route for {path}")),
        )
    }
}

fn head_json(slot: u64) -> Value {
    let parent = if slot == 0 {
        B256::ZERO
    } else {
        block_root(slot - 1)
    };
    json!({
        "execution_optimistic": false,
        "finalized": false,
        "data": {
            "root": block_root(slot).to_string(),
            "canonical": true,
            "header": {
                "message": {
                    "slot": slot.to_string(),
                    "proposer_index": (slot % 64).to_string(),
                    "parent_root": parent.to_string(),
                    "state_root": state_root(slot).to_string(),
                    "body_root": keccak256(block_root(slot)).to_string(),
                },
                "signature": hex0x(&[0u8; 96]),
            }
        }
    })
}

fn validators_reply(st: &ChainState, state_id: &str, query: &str) -> (u16, String) {
    match parse_state_id(state_id) {
        Err(()) => {
            return (
                400,
                error_body(400, &format!("Invalid state ID: {state_id}")),
            );
        }
        Ok(Some(slot)) if slot > st.head_slot => {
            return (
                404,
                error_body(404, &format!("NOT_FOUND: beacon state at slot {slot}")),
            );
        }
        Ok(_) => {}
    }
    let mut ids = Vec::new();
    let mut filtered = false;
    for pair in query.split('&') {
        let Some(list) = pair.strip_prefix("id=") else {
            continue;
        };
        filtered = true;
        let list = list.replace("%2C", ",").replace("%2c", ",");
        for text in list.split(',').filter(|t| !t.is_empty()) {
            match parse_id(text) {
                Some(id) => ids.push(id),
                None => {
                    return (
                        400,
                        error_body(400, &format!("Invalid validator ID: {text}")),
                    );
                }
            }
        }
    }
    let data: Vec<Value> = st
        .validators
        .iter()
        .filter(|v| v.status != ValidatorStatus::NotFound)
        .filter(|v| {
            !filtered
                || ids.iter().any(|id| match id {
                    Id::Index(i) => *i == v.index,
                    Id::Pubkey(k) => *k == v.pubkey,
                })
        })
        .map(validator_json)
        .collect();
    (
        200,
        json!({"execution_optimistic": false, "finalized": false, "data": data}).to_string(),
    )
}
