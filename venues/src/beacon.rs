//! The consensus side of a staking operation: a blocking Beacon API client
//! for the two routes an operator watches (the head, and the validators of a
//! state), and [`ValidatorWatch`], which turns successive reads into status
//! events, per-epoch balances and alerts.
//!
//! ## The client
//!
//! [`BeaconClient`] sends `GET` requests over one persistent HTTP/1.1
//! keep-alive connection (`http://` only; the framing is the relay's, see
//! [`crate::relay`]). Every call blocks for one round trip per request,
//! bounded by the client's timeout. Replies are decoded into typed values;
//! the Beacon API writes numbers as decimal strings and byte strings as
//! `0x`-prefixed hex, and anything else is [`VenueError::BeaconDecode`].
//! A status outside 2xx is [`VenueError::BeaconHttp`] with the node's
//! `message` field.
//!
//! Validator ids are sent at most [`MAX_IDS_PER_REQUEST`] per request by
//! default (64 pubkeys make a request line of about 6.4 KB, under the usual
//! 8 KB limit of HTTP servers). An empty id list is never sent: to the
//! Beacon API it means "every validator".
//!
//! ## The watcher
//!
//! [`ValidatorWatch::poll`] reads the head, derives the epoch
//! (`slot / slots_per_epoch`), reads every watched validator at the head
//! slot and compares with what it saw before. Balances are sampled once per
//! epoch: the first poll in a new epoch takes the sample, later polls in the
//! same epoch do not look at the balance.
//!
//! ## Invariants
//!
//! - A failed call leaves no half state. After a transport or framing
//!   error (timeout, reset, malformed HTTP, a node that closes) the
//!   connection is dropped and the next call dials afresh; an HTTP error
//!   status or an undecodable body keeps the connection, which is still in
//!   step. A request on a reused connection that fails before any byte of
//!   the reply arrived (the node closed an idle connection) is sent once
//!   more on a fresh connection: both routes are `GET`s, safe to repeat.
//! - [`ValidatorWatch::poll`] is all-or-nothing: if any request fails it
//!   returns the error and changes nothing, so the next successful poll
//!   reports everything that changed since the last successful one.
//! - [`WatchEvent::Status`] comes on first sight and on every change of
//!   status, never twice in a row for the same status. A validator the node
//!   does not know (a fresh deposit) is reported once as
//!   [`ValidatorStatus::NotFound`], then nothing until it appears.
//! - [`WatchEvent::Balance`] comes at most once per epoch per validator, only
//!   when the balance differs from the previous epoch's sample.
//! - [`AlertKind::Slashed`] comes once per watched validator, the first time
//!   its `slashed` flag is seen true (on first sight too).
//!   [`AlertKind::UnexpectedExit`] comes when a status that was not
//!   exiting or exited is followed by one that is, the validator is not
//!   slashed (the slashing alert covers that exit), and no exit was
//!   registered with [`ValidatorWatch::expect_exit`].
//!   [`AlertKind::BalanceFalling`] comes once per streak of falling epoch
//!   samples; a sample that does not fall ends the streak.
//! - Nothing a node sends makes this module panic.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use crate::error::VenueError;
use crate::relay::{BodyAt, HttpTarget, MessageKind, dial, parse_http_url, parse_message};

/// Default bound on one request (send + reply).
pub const DEFAULT_BEACON_TIMEOUT: Duration = Duration::from_secs(10);

/// Default number of validator ids per request.
pub const MAX_IDS_PER_REQUEST: usize = 64;

/// Slots per epoch on mainnet and every public testnet.
pub const DEFAULT_SLOTS_PER_EPOCH: u64 = 32;

/// Default length of a streak of falling balances that raises
/// [`AlertKind::BalanceFalling`].
pub const DEFAULT_FALLING_EPOCHS: u32 = 3;

/// The epoch the Beacon API writes for "not scheduled" (`2^64 - 1`).
pub const FAR_FUTURE_EPOCH: u64 = u64::MAX;

/// The head route.
pub const HEAD_ROUTE: &str = "/eth/v1/beacon/headers/head";

/// The validators route (`{state_id}` is a [`StateId`]).
pub const VALIDATORS_ROUTE: &str = "/eth/v1/beacon/states/{state_id}/validators";

/// A BLS12-381 public key, compressed (48 bytes).
pub type BlsPubkey = [u8; 48];

/// Bytes of a reply shown in a decode error, at most.
const SNIPPET: usize = 120;

// ---------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------

/// A validator's status as the Beacon API names it, plus
/// [`ValidatorStatus::NotFound`] for a validator the node does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValidatorStatus {
    /// Deposit processed, not yet eligible for activation.
    PendingInitialized,
    /// Eligible, waiting in the activation queue.
    PendingQueued,
    /// Active, no exit scheduled.
    ActiveOngoing,
    /// Active, exit scheduled (voluntary or forced, not slashed).
    ActiveExiting,
    /// Active, slashed, exit scheduled.
    ActiveSlashed,
    /// Exited, not slashed; not yet withdrawable.
    ExitedUnslashed,
    /// Exited after a slashing; not yet withdrawable.
    ExitedSlashed,
    /// Withdrawable, balance not yet withdrawn.
    WithdrawalPossible,
    /// Balance withdrawn.
    WithdrawalDone,
    /// Not a Beacon API status: the node has no validator with this key
    /// (the deposit is not processed yet, or never happened).
    NotFound,
}

/// The nine statuses the Beacon API defines, in lifecycle order.
const API_STATUSES: [ValidatorStatus; 9] = [
    ValidatorStatus::PendingInitialized,
    ValidatorStatus::PendingQueued,
    ValidatorStatus::ActiveOngoing,
    ValidatorStatus::ActiveExiting,
    ValidatorStatus::ActiveSlashed,
    ValidatorStatus::ExitedUnslashed,
    ValidatorStatus::ExitedSlashed,
    ValidatorStatus::WithdrawalPossible,
    ValidatorStatus::WithdrawalDone,
];

const API_STATUS_NAMES: &[&str] = &[
    "pending_initialized",
    "pending_queued",
    "active_ongoing",
    "active_exiting",
    "active_slashed",
    "exited_unslashed",
    "exited_slashed",
    "withdrawal_possible",
    "withdrawal_done",
];

impl ValidatorStatus {
    /// The Beacon API name (`active_ongoing`, …); `not_found` for
    /// [`ValidatorStatus::NotFound`].
    pub const fn as_str(self) -> &'static str {
        match self {
            ValidatorStatus::PendingInitialized => "pending_initialized",
            ValidatorStatus::PendingQueued => "pending_queued",
            ValidatorStatus::ActiveOngoing => "active_ongoing",
            ValidatorStatus::ActiveExiting => "active_exiting",
            ValidatorStatus::ActiveSlashed => "active_slashed",
            ValidatorStatus::ExitedUnslashed => "exited_unslashed",
            ValidatorStatus::ExitedSlashed => "exited_slashed",
            ValidatorStatus::WithdrawalPossible => "withdrawal_possible",
            ValidatorStatus::WithdrawalDone => "withdrawal_done",
            ValidatorStatus::NotFound => "not_found",
        }
    }

    /// The status for a Beacon API name; `None` for anything else
    /// (`not_found` included: it is never sent by a node).
    pub fn from_api(name: &str) -> Option<ValidatorStatus> {
        API_STATUS_NAMES
            .iter()
            .position(|n| *n == name)
            .map(|i| API_STATUSES[i])
    }

    /// Attesting: `active_ongoing`, `active_exiting`, `active_slashed`.
    pub const fn is_active(self) -> bool {
        matches!(
            self,
            ValidatorStatus::ActiveOngoing
                | ValidatorStatus::ActiveExiting
                | ValidatorStatus::ActiveSlashed
        )
    }

    /// An exit is scheduled or done: every status from `active_exiting` on.
    pub const fn is_exiting_or_exited(self) -> bool {
        matches!(
            self,
            ValidatorStatus::ActiveExiting
                | ValidatorStatus::ActiveSlashed
                | ValidatorStatus::ExitedUnslashed
                | ValidatorStatus::ExitedSlashed
                | ValidatorStatus::WithdrawalPossible
                | ValidatorStatus::WithdrawalDone
        )
    }
}

impl fmt::Display for ValidatorStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validator as the validators route reports it. Amounts are in gwei;
/// epochs not scheduled are [`FAR_FUTURE_EPOCH`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatorInfo {
    /// Position in the validator registry.
    pub index: u64,
    /// The validator's BLS public key.
    pub pubkey: BlsPubkey,
    /// Where withdrawals go: `0x00` + BLS key hash, or `0x01`/`0x02` + 11
    /// zero bytes + an execution address.
    pub withdrawal_credentials: [u8; 32],
    /// The actual balance.
    pub balance_gwei: u64,
    /// The balance rewards and duties are computed from.
    pub effective_balance_gwei: u64,
    /// The status at the state read.
    pub status: ValidatorStatus,
    /// Whether the validator was slashed.
    pub slashed: bool,
    /// When the validator became eligible for activation.
    pub activation_eligibility_epoch: u64,
    /// When the validator became (or becomes) active.
    pub activation_epoch: u64,
    /// When the validator exits.
    pub exit_epoch: u64,
    /// When the balance becomes withdrawable.
    pub withdrawable_epoch: u64,
}

/// The head block header, as the head route reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BeaconHead {
    /// The head block's slot.
    pub slot: u64,
    /// The head block's root.
    pub root: B256,
    /// The post-state root of the head block.
    pub state_root: B256,
    /// The node has not yet verified the head's execution payload.
    pub execution_optimistic: bool,
    /// The head is finalized.
    pub finalized: bool,
}

/// Which state to read validators from (the route's `{state_id}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateId {
    /// The canonical head.
    Head,
    /// The genesis state.
    Genesis,
    /// The latest finalized state.
    Finalized,
    /// The latest justified state.
    Justified,
    /// The canonical state at a slot.
    Slot(u64),
    /// The state with this state root.
    Root(B256),
}

impl fmt::Display for StateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateId::Head => f.write_str("head"),
            StateId::Genesis => f.write_str("genesis"),
            StateId::Finalized => f.write_str("finalized"),
            StateId::Justified => f.write_str("justified"),
            StateId::Slot(s) => write!(f, "{s}"),
            StateId::Root(r) => write!(f, "{r}"),
        }
    }
}

/// A validator as the `id` query names it: by registry index or by key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValidatorId {
    /// By registry index.
    Index(u64),
    /// By BLS public key.
    Pubkey(BlsPubkey),
}

impl From<u64> for ValidatorId {
    fn from(i: u64) -> Self {
        ValidatorId::Index(i)
    }
}

impl From<BlsPubkey> for ValidatorId {
    fn from(k: BlsPubkey) -> Self {
        ValidatorId::Pubkey(k)
    }
}

impl fmt::Display for ValidatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValidatorId::Index(i) => write!(f, "{i}"),
            ValidatorId::Pubkey(k) => write!(f, "0x{}", hex::encode(k)),
        }
    }
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

/// A decimal string (the Beacon API's number encoding); a JSON number is
/// accepted too.
struct Dec(u64);

impl<'de> Deserialize<'de> for Dec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal string fitting in 64 bits")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Dec, E> {
                Ok(Dec(n))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dec, E> {
                if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(E::invalid_value(de::Unexpected::Str(snippet(s)), &self));
                }
                s.parse()
                    .map(Dec)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(s), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// `0x` + exactly `2 * N` hex digits.
struct Hex<const N: usize>([u8; N]);

impl<'de, const N: usize> Deserialize<'de> for Hex<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const N: usize>;
        impl<const N: usize> Visitor<'_> for V<N> {
            type Value = Hex<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "0x and {} hex digits ({N} bytes)", 2 * N)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Hex<N>, E> {
                let mut out = [0u8; N];
                match s.strip_prefix("0x") {
                    Some(h) if h.len() == 2 * N && hex::decode_to_slice(h, &mut out).is_ok() => {
                        Ok(Hex(out))
                    }
                    _ => Err(E::invalid_value(de::Unexpected::Str(snippet(s)), &self)),
                }
            }
        }
        d.deserialize_str(V::<N>)
    }
}

impl<'de> Deserialize<'de> for ValidatorStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ValidatorStatus;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a validator status")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ValidatorStatus, E> {
                ValidatorStatus::from_api(s)
                    .ok_or_else(|| E::unknown_variant(snippet(s), API_STATUS_NAMES))
            }
        }
        d.deserialize_str(V)
    }
}

/// At most [`SNIPPET`] bytes of `s`, cut at a character boundary.
fn snippet(s: &str) -> &str {
    if s.len() <= SNIPPET {
        return s;
    }
    let mut end = SNIPPET;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[derive(Deserialize)]
struct HeadReply {
    #[serde(default)]
    execution_optimistic: Option<bool>,
    #[serde(default)]
    finalized: Option<bool>,
    data: HeadData,
}

#[derive(Deserialize)]
struct HeadData {
    root: Hex<32>,
    header: SignedHeader,
}

#[derive(Deserialize)]
struct SignedHeader {
    message: HeaderMessage,
}

#[derive(Deserialize)]
struct HeaderMessage {
    slot: Dec,
    state_root: Hex<32>,
}

#[derive(Deserialize)]
struct ValidatorsReply {
    data: Vec<ValidatorJson>,
}

#[derive(Deserialize)]
struct ValidatorJson {
    index: Dec,
    balance: Dec,
    status: ValidatorStatus,
    validator: RegistryEntry,
}

#[derive(Deserialize)]
struct RegistryEntry {
    pubkey: Hex<48>,
    withdrawal_credentials: Hex<32>,
    effective_balance: Dec,
    slashed: bool,
    activation_eligibility_epoch: Dec,
    activation_epoch: Dec,
    exit_epoch: Dec,
    withdrawable_epoch: Dec,
}

impl From<ValidatorJson> for ValidatorInfo {
    fn from(v: ValidatorJson) -> Self {
        let r = v.validator;
        ValidatorInfo {
            index: v.index.0,
            pubkey: r.pubkey.0,
            withdrawal_credentials: r.withdrawal_credentials.0,
            balance_gwei: v.balance.0,
            effective_balance_gwei: r.effective_balance.0,
            status: v.status,
            slashed: r.slashed,
            activation_eligibility_epoch: r.activation_eligibility_epoch.0,
            activation_epoch: r.activation_epoch.0,
            exit_epoch: r.exit_epoch.0,
            withdrawable_epoch: r.withdrawable_epoch.0,
        }
    }
}

/// The standard error body, `{"code":…,"message":"…"}`; only the message
/// is kept.
#[derive(Deserialize)]
struct ErrorBody {
    message: Option<String>,
}

fn decode<T: for<'de> Deserialize<'de>>(
    endpoint: &'static str,
    body: &[u8],
) -> Result<T, VenueError> {
    serde_json::from_slice(body).map_err(|e| VenueError::BeaconDecode {
        endpoint,
        detail: e.to_string(),
    })
}

// ---------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------

/// A transport failure, and whether it looks like a stale keep-alive
/// connection (nothing of the reply arrived; safe to send again).
struct Failed {
    error: VenueError,
    stale: bool,
}

impl Failed {
    fn fatal(error: VenueError) -> Failed {
        Failed {
            error,
            stale: false,
        }
    }

    fn io(e: std::io::Error, nothing_received: bool, what: &'static str) -> Failed {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => Failed::fatal(VenueError::Timeout(what)),
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof => Failed {
                error: VenueError::Io(e),
                stale: nothing_received,
            },
            _ => Failed::fatal(VenueError::Io(e)),
        }
    }
}

/// A blocking Beacon API client over one keep-alive HTTP/1.1 connection
/// (`http://host:port[/path]`; a path is a prefix for every route).
///
/// One request at a time, each bounded by the timeout. After a transport
/// error the connection is dropped and the next call dials again. Owned by
/// one thread.
pub struct BeaconClient {
    url: String,
    target: HttpTarget,
    /// The URL's path without its trailing `/`, prefixed to every route.
    base: String,
    timeout: Duration,
    batch_size: usize,
    stream: Option<TcpStream>,
    /// Reused request, read and chunked-body buffers.
    request: Vec<u8>,
    input: Vec<u8>,
    decoded: Vec<u8>,
}

impl fmt::Debug for BeaconClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BeaconClient")
            .field("url", &self.url)
            .field("connected", &self.stream.is_some())
            .field("timeout", &self.timeout)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl BeaconClient {
    /// Connects with [`DEFAULT_BEACON_TIMEOUT`].
    pub fn connect(url: &str) -> Result<BeaconClient, VenueError> {
        Self::connect_with_timeout(url, DEFAULT_BEACON_TIMEOUT)
    }

    /// Dials `url` now (bounded by 5 s per resolved address), so a wrong
    /// address fails here; `timeout` bounds every later request.
    pub fn connect_with_timeout(url: &str, timeout: Duration) -> Result<BeaconClient, VenueError> {
        let target =
            parse_http_url(url).map_err(|_| VenueError::InvalidBeaconUrl(url.to_owned()))?;
        if target.path.contains('?') {
            return Err(VenueError::InvalidBeaconUrl(url.to_owned()));
        }
        let base = target.path.trim_end_matches('/').to_owned();
        let mut client = BeaconClient {
            url: url.to_owned(),
            target,
            base,
            timeout: timeout.max(Duration::from_millis(1)),
            batch_size: MAX_IDS_PER_REQUEST,
            stream: None,
            request: Vec::with_capacity(1024),
            input: Vec::with_capacity(16 * 1024),
            decoded: Vec::new(),
        };
        client.stream = Some(client.open()?);
        Ok(client)
    }

    /// The URL this client was made for.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bound on one request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the bound on one request (at least 1 ms).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.max(Duration::from_millis(1));
    }

    /// Validator ids per request.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Changes the ids per request (at least 1).
    pub fn set_batch_size(&mut self, n: usize) {
        self.batch_size = n.max(1);
    }

    /// Whether a connection is open (it is re-dialled on demand).
    pub fn is_connected(&self) -> bool {
        self.stream.is_some()
    }

    /// `GET /eth/v1/beacon/headers/head`.
    pub fn head(&mut self) -> Result<BeaconHead, VenueError> {
        let body = self.get(HEAD_ROUTE, HEAD_ROUTE)?;
        let reply: HeadReply = decode(HEAD_ROUTE, &body)?;
        Ok(BeaconHead {
            slot: reply.data.header.message.slot.0,
            root: B256::from(reply.data.root.0),
            state_root: B256::from(reply.data.header.message.state_root.0),
            execution_optimistic: reply.execution_optimistic.unwrap_or(false),
            finalized: reply.finalized.unwrap_or(false),
        })
    }

    /// `GET /eth/v1/beacon/states/{state}/validators?id=…` in batches of
    /// [`BeaconClient::batch_size`] ids, one request per batch, results in
    /// reply order. Validators the node does not know are absent from the
    /// result. No request is sent for an empty `ids`. A failed batch fails
    /// the call.
    pub fn validators(
        &mut self,
        state: StateId,
        ids: &[ValidatorId],
    ) -> Result<Vec<ValidatorInfo>, VenueError> {
        let mut out = Vec::with_capacity(ids.len());
        let mut path = String::new();
        for batch in ids.chunks(self.batch_size) {
            path.clear();
            let _ = write!(path, "/eth/v1/beacon/states/{state}/validators?id=");
            for (i, id) in batch.iter().enumerate() {
                if i > 0 {
                    path.push(',');
                }
                let _ = write!(path, "{id}");
            }
            let body = self.get(VALIDATORS_ROUTE, &path)?;
            let reply: ValidatorsReply = decode(VALIDATORS_ROUTE, &body)?;
            out.extend(reply.data.into_iter().map(ValidatorInfo::from));
        }
        Ok(out)
    }

    fn open(&self) -> Result<TcpStream, VenueError> {
        let stream = dial(&self.url, &self.target)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        Ok(stream)
    }

    /// One `GET` of `path` (below the base path): the body of a 2xx reply,
    /// [`VenueError::BeaconHttp`] for any other status.
    fn get(&mut self, endpoint: &'static str, path: &str) -> Result<Vec<u8>, VenueError> {
        let reused = self.stream.is_some();
        let (status, body) = match self.exchange(path) {
            Ok(reply) => reply,
            Err(Failed { stale: true, .. }) if reused => {
                self.exchange(path).map_err(|f| f.error)?
            }
            Err(f) => return Err(f.error),
        };
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .ok()
            .and_then(|b| b.message);
        Err(VenueError::BeaconHttp {
            endpoint,
            status,
            message,
        })
    }

    /// Sends one request and reads its reply; keeps the connection only if
    /// the exchange ended cleanly and the node did not ask to close.
    fn exchange(&mut self, path: &str) -> Result<(u16, Vec<u8>), Failed> {
        let mut stream = match self.stream.take() {
            Some(s) => s,
            None => self.open().map_err(Failed::fatal)?,
        };
        let (status, body, keep) = self.round_trip(&mut stream, path)?;
        if keep {
            self.stream = Some(stream);
        }
        Ok((status, body))
    }

    fn round_trip(
        &mut self,
        stream: &mut TcpStream,
        path: &str,
    ) -> Result<(u16, Vec<u8>, bool), Failed> {
        let deadline = Instant::now() + self.timeout;
        self.request.clear();
        self.request.extend_from_slice(b"GET ");
        self.request.extend_from_slice(self.base.as_bytes());
        self.request.extend_from_slice(path.as_bytes());
        self.request.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        self.request
            .extend_from_slice(self.target.authority.as_bytes());
        self.request
            .extend_from_slice(b"\r\nAccept: application/json\r\n\r\n");
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(|e| Failed::fatal(e.into()))?;
        stream
            .write_all(&self.request)
            .map_err(|e| Failed::io(e, true, "beacon API request write"))?;

        self.input.clear();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match parse_message(&self.input, MessageKind::Response, &mut self.decoded) {
                Ok(Some(p)) if p.status < 200 => {
                    // An interim response (100 Continue): not the answer.
                    self.input.drain(..p.consumed);
                    continue;
                }
                Ok(Some(p)) => {
                    let body = match p.body {
                        BodyAt::Inline(r) => self.input[r].to_vec(),
                        BodyAt::Decoded => std::mem::take(&mut self.decoded),
                    };
                    // Bytes past the reply answer nothing we sent: the
                    // connection is out of step.
                    let keep = !p.close && p.consumed == self.input.len();
                    return Ok((p.status, body, keep));
                }
                Ok(None) => {}
                Err(e) => return Err(Failed::fatal(e)),
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| Failed::fatal(VenueError::Timeout("beacon API reply")))?;
            stream
                .set_read_timeout(Some(left))
                .map_err(|e| Failed::fatal(e.into()))?;
            match stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(Failed {
                        error: VenueError::Closed,
                        stale: self.input.is_empty(),
                    });
                }
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Failed::io(e, self.input.is_empty(), "beacon API reply")),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The watcher
// ---------------------------------------------------------------------------

/// How a [`ValidatorWatch`] reads epochs and when it alerts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchConfig {
    /// Slots per epoch (32 on mainnet); 0 is taken as 1.
    pub slots_per_epoch: u64,
    /// A balance that fell in this many consecutive epoch samples raises
    /// [`AlertKind::BalanceFalling`]; 0 turns the alert off.
    pub falling_epochs: u32,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            slots_per_epoch: DEFAULT_SLOTS_PER_EPOCH,
            falling_epochs: DEFAULT_FALLING_EPOCHS,
        }
    }
}

/// What an [`AlertKind`] alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    /// The validator's `slashed` flag is set.
    Slashed,
    /// The validator started exiting (or exited) without a slashing and
    /// without [`ValidatorWatch::expect_exit`].
    UnexpectedExit,
    /// The balance fell in each of the last `epochs` epoch samples.
    BalanceFalling {
        /// The length of the streak when the alert was raised.
        epochs: u32,
    },
}

/// One thing a [`ValidatorWatch::poll`] noticed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// First sight of a validator, or a change of its status.
    Status {
        /// The validator.
        pubkey: BlsPubkey,
        /// Its registry index; `None` when the node does not know it.
        index: Option<u64>,
        /// The status reported before; `None` on first sight.
        from: Option<ValidatorStatus>,
        /// The status now.
        to: ValidatorStatus,
        /// The balance now (0 when not found).
        balance_gwei: u64,
        /// The `slashed` flag now (false when not found).
        slashed: bool,
    },
    /// The balance at a new epoch differs from the previous epoch's sample.
    Balance {
        /// The validator.
        pubkey: BlsPubkey,
        /// The epoch of the sample.
        epoch: u64,
        /// The balance sampled.
        balance_gwei: u64,
    },
    /// Something an operator must look at.
    Alert {
        /// The validator.
        pubkey: BlsPubkey,
        /// What happened.
        kind: AlertKind,
        /// A one-line description with the index, statuses, epochs and amounts.
        message: String,
    },
}

/// What the watcher remembers about one validator.
#[derive(Debug, Default)]
struct Tracked {
    /// The status last reported in a [`WatchEvent::Status`].
    reported: Option<ValidatorStatus>,
    /// The last status the node reported (never `NotFound`).
    last_known: Option<ValidatorStatus>,
    /// The validator as last read.
    info: Option<ValidatorInfo>,
    exit_expected: bool,
    slashed_alerted: bool,
    /// `(epoch, balance)` of the latest epoch sample.
    sample: Option<(u64, u64)>,
    /// Consecutive falling samples, and the balance before the first fall.
    falling: u32,
    streak_from: u64,
    falling_alerted: bool,
}

fn label(index: u64, pubkey: &BlsPubkey) -> String {
    format!("validator {index} (0x{}…)", hex::encode(&pubkey[..6]))
}

impl Tracked {
    fn observe(
        &mut self,
        info: ValidatorInfo,
        epoch: u64,
        falling_epochs: u32,
        out: &mut Vec<WatchEvent>,
    ) {
        let pubkey = info.pubkey;
        let balance = info.balance_gwei;
        if self.reported != Some(info.status) {
            out.push(WatchEvent::Status {
                pubkey,
                index: Some(info.index),
                from: self.reported,
                to: info.status,
                balance_gwei: balance,
                slashed: info.slashed,
            });
        }

        let mut falling_alert = false;
        match self.sample {
            None => self.sample = Some((epoch, balance)),
            Some((last_epoch, last)) if epoch > last_epoch => {
                if balance != last {
                    out.push(WatchEvent::Balance {
                        pubkey,
                        epoch,
                        balance_gwei: balance,
                    });
                }
                if balance < last {
                    if self.falling == 0 {
                        self.streak_from = last;
                    }
                    self.falling = self.falling.saturating_add(1);
                } else {
                    self.falling = 0;
                    self.falling_alerted = false;
                }
                self.sample = Some((epoch, balance));
                if falling_epochs > 0 && self.falling >= falling_epochs && !self.falling_alerted {
                    self.falling_alerted = true;
                    falling_alert = true;
                }
            }
            // Same epoch (or a node behind the last one): no new sample.
            Some(_) => {}
        }

        if info.slashed && !self.slashed_alerted {
            self.slashed_alerted = true;
            out.push(WatchEvent::Alert {
                pubkey,
                kind: AlertKind::Slashed,
                message: format!(
                    "{} was slashed (status {}, exit epoch {}, withdrawable epoch {})",
                    label(info.index, &pubkey),
                    info.status,
                    info.exit_epoch,
                    info.withdrawable_epoch
                ),
            });
        }
        if let Some(prev) = self.last_known
            && !prev.is_exiting_or_exited()
            && info.status.is_exiting_or_exited()
            && !info.slashed
            && !self.exit_expected
        {
            out.push(WatchEvent::Alert {
                pubkey,
                kind: AlertKind::UnexpectedExit,
                message: format!(
                    "{} moved from {prev} to {} (exit epoch {}) but no exit was expected",
                    label(info.index, &pubkey),
                    info.status,
                    info.exit_epoch
                ),
            });
        }
        if falling_alert {
            out.push(WatchEvent::Alert {
                pubkey,
                kind: AlertKind::BalanceFalling {
                    epochs: self.falling,
                },
                message: format!(
                    "{}: balance fell in each of the last {} epochs, from {} to {balance} gwei at epoch {epoch}",
                    label(info.index, &pubkey),
                    self.falling,
                    self.streak_from
                ),
            });
        }

        self.reported = Some(info.status);
        self.last_known = Some(info.status);
        self.info = Some(info);
    }

    fn missing(&mut self, pubkey: &BlsPubkey, out: &mut Vec<WatchEvent>) {
        if self.reported != Some(ValidatorStatus::NotFound) {
            out.push(WatchEvent::Status {
                pubkey: *pubkey,
                index: None,
                from: self.reported,
                to: ValidatorStatus::NotFound,
                balance_gwei: 0,
                slashed: false,
            });
            self.reported = Some(ValidatorStatus::NotFound);
        }
    }
}

/// Watches a set of validators through a [`BeaconClient`]: call
/// [`ValidatorWatch::poll`] periodically (at least once per epoch for the
/// balance streaks to count epochs) and act on the events.
///
/// Events of one poll come in pubkey order; for one validator, its status
/// change first, then its balance, then its alerts.
#[derive(Debug)]
pub struct ValidatorWatch {
    client: BeaconClient,
    cfg: WatchConfig,
    watched: BTreeMap<BlsPubkey, Tracked>,
    head: Option<BeaconHead>,
}

impl ValidatorWatch {
    /// A watch over no validators yet.
    pub fn new(client: BeaconClient, cfg: WatchConfig) -> ValidatorWatch {
        ValidatorWatch {
            client,
            cfg: WatchConfig {
                slots_per_epoch: cfg.slots_per_epoch.max(1),
                ..cfg
            },
            watched: BTreeMap::new(),
            head: None,
        }
    }

    /// Starts watching `pubkey`; `false` if it already was. It is first
    /// reported by the next poll.
    pub fn watch(&mut self, pubkey: BlsPubkey) -> bool {
        if self.watched.contains_key(&pubkey) {
            return false;
        }
        self.watched.insert(pubkey, Tracked::default());
        true
    }

    /// Stops watching `pubkey` and forgets everything about it; `false` if
    /// it was not watched.
    pub fn unwatch(&mut self, pubkey: &BlsPubkey) -> bool {
        self.watched.remove(pubkey).is_some()
    }

    /// Registers that an exit of `pubkey` is intended, so its move to an
    /// exiting status raises no [`AlertKind::UnexpectedExit`]. `false` (and
    /// no effect) if `pubkey` is not watched.
    pub fn expect_exit(&mut self, pubkey: &BlsPubkey) -> bool {
        match self.watched.get_mut(pubkey) {
            Some(t) => {
                t.exit_expected = true;
                true
            }
            None => false,
        }
    }

    /// Whether `pubkey` is watched.
    pub fn is_watched(&self, pubkey: &BlsPubkey) -> bool {
        self.watched.contains_key(pubkey)
    }

    /// The watched keys, in order.
    pub fn watched(&self) -> impl Iterator<Item = &BlsPubkey> {
        self.watched.keys()
    }

    /// The withdrawal credentials last read for `pubkey`; `None` if it is
    /// not watched or has not been seen on the beacon chain.
    pub fn credentials(&self, pubkey: &BlsPubkey) -> Option<[u8; 32]> {
        self.validator(pubkey).map(|v| v.withdrawal_credentials)
    }

    /// The validator as last read; `None` if it is not watched or has not
    /// been seen on the beacon chain.
    pub fn validator(&self, pubkey: &BlsPubkey) -> Option<&ValidatorInfo> {
        self.watched.get(pubkey).and_then(|t| t.info.as_ref())
    }

    /// The head read by the last successful poll.
    pub fn head(&self) -> Option<&BeaconHead> {
        self.head.as_ref()
    }

    /// The epoch of [`ValidatorWatch::head`].
    pub fn epoch(&self) -> Option<u64> {
        self.head.map(|h| h.slot / self.cfg.slots_per_epoch)
    }

    /// The configuration in use.
    pub fn config(&self) -> WatchConfig {
        self.cfg
    }

    /// The client, e.g. to change its timeout.
    pub fn client_mut(&mut self) -> &mut BeaconClient {
        &mut self.client
    }

    /// Reads the head and every watched validator at the head slot and
    /// reports what changed since the last successful poll. On error
    /// nothing is recorded; the next poll starts from the same point.
    pub fn poll(&mut self) -> Result<Vec<WatchEvent>, VenueError> {
        let head = self.client.head()?;
        let epoch = head.slot / self.cfg.slots_per_epoch;
        let mut seen: HashMap<BlsPubkey, ValidatorInfo> = HashMap::new();
        if !self.watched.is_empty() {
            let ids: Vec<ValidatorId> = self
                .watched
                .keys()
                .map(|k| ValidatorId::Pubkey(*k))
                .collect();
            for info in self.client.validators(StateId::Slot(head.slot), &ids)? {
                seen.insert(info.pubkey, info);
            }
        }
        self.head = Some(head);
        let mut events = Vec::new();
        for (pubkey, tracked) in &mut self.watched {
            match seen.remove(pubkey) {
                Some(info) => tracked.observe(info, epoch, self.cfg.falling_epochs, &mut events),
                None => tracked.missing(pubkey, &mut events),
            }
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_their_api_names() {
        for (s, name) in API_STATUSES.iter().zip(API_STATUS_NAMES) {
            assert_eq!(s.as_str(), *name);
            assert_eq!(ValidatorStatus::from_api(name), Some(*s));
        }
        assert_eq!(ValidatorStatus::from_api("not_found"), None);
        assert_eq!(ValidatorStatus::from_api("Active_Ongoing"), None);
    }

    #[test]
    fn ids_and_state_ids_print_as_the_route_wants() {
        assert_eq!(ValidatorId::Index(42).to_string(), "42");
        let k = ValidatorId::Pubkey([0xab; 48]).to_string();
        assert_eq!(k.len(), 98);
        assert!(k.starts_with("0xabab"));
        assert_eq!(StateId::Slot(7).to_string(), "7");
        assert_eq!(StateId::Finalized.to_string(), "finalized");
        assert_eq!(
            StateId::Root(B256::repeat_byte(1)).to_string(),
            format!("0x{}", "01".repeat(32))
        );
    }

    #[test]
    fn decodes_numbers_and_hex_strictly() {
        let d: Dec = serde_json::from_str(r#""18446744073709551615""#).unwrap();
        assert_eq!(d.0, FAR_FUTURE_EPOCH);
        for bad in [
            r#""""#,
            r#""-1""#,
            r#""+1""#,
            r#""1.5""#,
            r#""18446744073709551616""#,
            "null",
        ] {
            assert!(serde_json::from_str::<Dec>(bad).is_err(), "{bad}");
        }
        let h: Hex<2> = serde_json::from_str(r#""0xabCD""#).unwrap();
        assert_eq!(h.0, [0xab, 0xcd]);
        for bad in [
            r#""abcd""#,
            r#""0xabc""#,
            r#""0xabcdef""#,
            r#""0xzzzz""#,
            "12",
        ] {
            assert!(serde_json::from_str::<Hex<2>>(bad).is_err(), "{bad}");
        }
        let long = format!("\"{}\"", "é".repeat(500));
        let e = serde_json::from_str::<ValidatorStatus>(&long).unwrap_err();
        assert!(e.to_string().len() < 600, "{e}");
    }
}
