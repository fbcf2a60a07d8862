//! Broadcast: writes each signed transaction to the RPC providers over persistent
//! WebSockets (`eth_sendRawTransaction`), hedged across providers, reads their answers, and
//! hands every accepted hash to the receipt watcher.
//!
//! An I/O stage: it waits in `mio::Poll` on every provider socket and on a `mio::Waker`
//! that the input ring's producer (only when this stage is asleep) and the reconnect
//! thread trigger, with a timeout no later than its next timer (hedge, heartbeat, venue
//! wait), so neither a message nor a reply nor a timer waits for anything else.
//!
//! # Providers and hedging
//!
//! - Providers are ranked on every send: connected and not demoted first, then by the
//!   smoothed round trip of their answers (configuration order breaks ties). A transaction
//!   goes to the best one; if it is not accepted within the hedge delay it goes to the next
//!   one too, and so on (an urgent intent goes to every connected provider at once). A
//!   provider still silent when a hedge fires has its round trip raised to the time it
//!   has kept the transaction waiting, so one that never answers ranks itself down.
//! - Sending is idempotent by transaction hash: the same raw bytes may reach every
//!   provider. The first acceptance (a hash, or "already known") makes the `broadcast`
//!   event; later answers for the same transaction only measure their provider.
//! - A provider's refusal is not final while another provider may still accept: the
//!   transaction is tried on providers it has not reached before it fails. A provider
//!   that refused what another one accepted, or answered later than the latency budget, is
//!   demoted for a while (ranked last, still used if nothing else is there).
//! - A provider whose connection breaks, or whose heartbeat (`eth_blockNumber`, sent when
//!   it has answered nothing for a while) goes unanswered past its timeout, is closed; a
//!   reconnect thread dials it again with exponential backoff (blocking connects never
//!   run on this thread) and hands the new connection back. Transactions that were
//!   waiting only on the lost provider are sent again to the next one at once. With no
//!   provider connected at all, transactions wait (up to `venue_wait`) for one to come
//!   back, then fail with `venue_unavailable`.
//!
//! # The private route
//!
//! - A transaction routed `private` goes to every connected private relay at once
//!   (`eth_sendPrivateTransaction` over each relay's persistent HTTP/1.1 connection, signed
//!   by the relay-auth key), never to a provider, with `maxBlockNumber` = the head in the
//!   [`FeeView`] + `private_max_blocks`. Relays are few and each decides on its own, so
//!   sending to all is the normal practice; there is no hedge.
//! - The first relay that answers with a hash makes the `broadcast` event (`route:
//!   private`, `venues`: every relay it was written to), and the transaction goes on to the
//!   receipt watcher with `route` private, its `max_block` and `public_fallback`.
//! - A relay's refusal is not final while another relay may still accept. When every
//!   connected relay refused it fails with `node_rejected` and the last relay's message,
//!   or, when the intent allows `public_fallback`, goes to the providers at once (public
//!   route from then on).
//! - Relays are dialled at start; one that cannot be reached, or whose connection breaks
//!   (an error, the relay closing it), is redialled by the reconnect thread like a
//!   provider. A relay's liveness is its answers: a request it has left unanswered past
//!   the heartbeat timeout (a stalled relay, a black-holed path: the connection itself
//!   stays open) drops the connection and redials it. An idle relay gets no request of
//!   its own: HTTP keep-alive connections are closed by the relay when idle, and that
//!   close (seen on the next readiness event or write) triggers the redial. What was
//!   unanswered on a lost relay goes to the relays it has not reached; with no relay
//!   connected it waits (up to `venue_wait`), then fails with `venue_unavailable`, or
//!   goes public with `public_fallback`. A private transaction whose relay connections
//!   broke five times goes public with `public_fallback`, else fails
//!   (`venue_unavailable`).
//! - Venue bits: provider `i` is bit `i` of the venue masks, relay `j` is bit
//!   `providers + j`; the status stage names them from the provider names followed by the
//!   relay names. Providers and relays together are at most [`MAX_VENUES`].
//!
//! # Invariants
//!
//! - One `broadcast` event per transaction at most, and only after some provider (or, on
//!   the private route, some relay) accepted it; the hash reaches the receipt watcher
//!   only after that event.
//! - The raw bytes stay in their blob slot until the transaction is accepted or has
//!   failed, so a hedge or a resend after a lost connection sends the very same bytes.
//!   On acceptance the slot goes on to the receipt watcher with the hash; on failure it
//!   is released here. Either way it is released exactly once.
//! - Nothing here re-signs: a resend is the same transaction.
//! - A transaction is on one route at a time (`InFlight::private`); its venue masks hold
//!   only that route's bits. Falling back to public clears them first.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use crossbeam_channel::{Receiver, Sender};
use pipeline::{Emit, Hops, Recorder, Signal, Stage, Waker, now_raw, ticks_to_ns};
use venues::{BroadcastConnection, FeeView, RelayAuth, RelayConnection, RelayReply, RpcErrorInfo};

use crate::blob::{BlobPool, BlobRef};
use crate::msg::{Origin, Reason, Route, State, StatusMsg, TxMsg, TxPurpose};
use crate::risk::kill::KillSwitch;
use crate::stages::StatusSink;

const WAKE: mio::Token = mio::Token(0);
/// Broken connections under one transaction before it fails instead of being resent.
const MAX_LOST: u8 = 5;
/// Provider `i` polls under token `FIRST_PROVIDER + i`.
const FIRST_PROVIDER: usize = 1;
/// Relay `j` polls under token `FIRST_RELAY + j`.
const FIRST_RELAY: usize = FIRST_PROVIDER + MAX_VENUES;
/// Most providers and relays together a stage drives (venue bit masks are `u32`).
pub const MAX_VENUES: usize = 32;
/// Most providers a stage drives (when it has no relay).
pub const MAX_PROVIDERS: usize = MAX_VENUES;

/// One RPC provider as configured.
#[derive(Clone, Debug)]
pub struct ProviderSpec {
    /// Name in `broadcast` events, metrics and the kill switch's venue scope.
    pub name: String,
    /// WebSocket URL.
    pub ws_url: String,
    /// Kill-switch venue slot of this provider.
    pub venue: u8,
}

/// One private relay as configured.
#[derive(Clone, Debug)]
pub struct RelaySpec {
    /// Name in `broadcast` events, metrics and the kill switch's venue scope.
    pub name: String,
    /// HTTP endpoint (`http://host:port[/path]`).
    pub url: String,
    /// Kill-switch venue slot of this relay.
    pub venue: u8,
}

/// Timing of hedging, demotion, heartbeats and reconnection.
#[derive(Clone, Copy, Debug)]
pub struct BroadcastTuning {
    /// A transaction not accepted this long after its last send goes to the next provider.
    pub hedge_delay: Duration,
    /// An answer slower than this demotes the provider.
    pub latency_budget: Duration,
    /// How long a demoted provider stays ranked last.
    pub demote_for: Duration,
    /// A provider that answered nothing for this long gets a heartbeat.
    pub heartbeat_every: Duration,
    /// A heartbeat unanswered this long closes the connection (and reconnects).
    pub heartbeat_timeout: Duration,
    /// First reconnect delay; doubled per failed attempt up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// How long a transaction waits for any provider to be connected before it fails.
    pub venue_wait: Duration,
    /// Bound on one redial (TCP connect plus WebSocket handshake) of a provider; a relay
    /// redial is bounded by the relay connection's own dial timeout.
    pub connect_timeout: Duration,
    /// A private transaction's `maxBlockNumber` is the head + this.
    pub private_max_blocks: u64,
}

impl Default for BroadcastTuning {
    fn default() -> Self {
        Self {
            hedge_delay: Duration::from_millis(2),
            latency_budget: Duration::from_millis(50),
            demote_for: Duration::from_secs(10),
            heartbeat_every: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(5),
            venue_wait: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            private_max_blocks: 25,
        }
    }
}

/// Live counters of one provider or relay, read by `/metrics` and `/health` (a relay is
/// never demoted and has no heartbeat: those stay at zero).
#[derive(Debug)]
pub struct ProviderStats {
    /// Provider name.
    pub name: String,
    /// Connected now.
    pub up: AtomicBool,
    /// Demoted now.
    pub demoted: AtomicBool,
    /// Transactions written to it.
    pub sent: AtomicU64,
    /// Transactions it accepted first (the answer that made the `broadcast` event).
    pub first_accepts: AtomicU64,
    /// Refusals and malformed answers.
    pub errors: AtomicU64,
    /// Times it was demoted.
    pub demotions: AtomicU64,
    /// Connections lost (broken, or heartbeat unanswered).
    pub disconnects: AtomicU64,
    /// Successful reconnects.
    pub reconnects: AtomicU64,
    /// Smoothed answer round trip (ns; 0 before the first answer).
    pub rtt_ns: AtomicU64,
    /// Set by the SLO monitor to have the stage demote this provider on its next send
    /// (an automatic action); the stage clears it when it demotes.
    pub demote_requested: AtomicBool,
}

impl ProviderStats {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            up: AtomicBool::new(false),
            demoted: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            first_accepts: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            demotions: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            rtt_ns: AtomicU64::new(0),
            demote_requested: AtomicBool::new(false),
        }
    }
}

/// Counters of the broadcast stage as a whole, with one entry per provider and relay.
#[derive(Debug)]
pub struct BroadcastStats {
    /// Per provider, in configuration order.
    pub providers: Vec<ProviderStats>,
    /// Per private relay, in configuration order.
    pub relays: Vec<ProviderStats>,
    /// Private transactions that no relay took and that went public at once
    /// (`public_fallback`).
    pub private_fallbacks: AtomicU64,
    /// Hedged sends (a transaction written to one more provider because the earlier ones
    /// had not accepted it within the hedge delay).
    pub hedges: AtomicU64,
    /// Sends repeated on another provider because the one holding it was lost.
    pub resends: AtomicU64,
    /// Transactions accepted through the public route.
    pub public_routed: AtomicU64,
    /// Transactions accepted through a private relay.
    pub private_routed: AtomicU64,
}

impl BroadcastStats {
    /// Counters for these providers (and no relay).
    pub fn new(names: &[String]) -> Self {
        Self::with_relays(names, &[])
    }

    /// Counters for these providers and relays.
    pub fn with_relays(providers: &[String], relays: &[String]) -> Self {
        Self {
            providers: providers.iter().map(|n| ProviderStats::new(n)).collect(),
            relays: relays.iter().map(|n| ProviderStats::new(n)).collect(),
            private_fallbacks: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
            resends: AtomicU64::new(0),
            public_routed: AtomicU64::new(0),
            private_routed: AtomicU64::new(0),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    origin: Origin,
    tx_hash: B256,
    account: crate::msg::AccountIdx,
    nonce: u64,
    first_raw: u64,
    /// First write to any venue of its current route (raw ticks; 0 before).
    sent_raw: u64,
    /// The raw transaction, kept until accepted or failed.
    raw: BlobRef,
    /// Venues it was written to (bits: see the module docs).
    sent: u32,
    /// Venues it was written to that have not answered (on a live connection).
    pending: u32,
    /// Venues that refused it.
    refused: u32,
    urgent: bool,
    asset: u8,
    /// On the private route now (relays only).
    private: bool,
    /// May go public when no relay takes it.
    public_fallback: bool,
    /// `maxBlockNumber` given to the relays (0 before the first relay write).
    max_block: u64,
    /// `ws_to_wire` was recorded (once per transaction, whatever the route).
    wired: bool,
    /// When it started waiting for any venue of its route to be connected.
    waiting_since: Option<Instant>,
    /// Why it was signed (a filler makes no desk event).
    purpose: TxPurpose,
    /// Replacements of the intent's transaction before this one.
    generation: u16,
    /// Times a venue's connection broke while it waited there for an answer.
    lost: u8,
}

#[derive(Debug)]
enum Health {
    /// Connected.
    Up(Box<BroadcastConnection>),
    /// Being dialled by the reconnect thread.
    Reconnecting,
}

#[derive(Debug)]
struct Provider {
    spec: ProviderSpec,
    health: Health,
    demoted_until: Option<Instant>,
    /// Smoothed answer round trip (ns), 0 before the first.
    rtt_ns: u64,
    /// Last time it answered anything (or was connected).
    last_activity: Instant,
    /// Transactions accepted elsewhere while still unanswered here: seq -> first send
    /// (raw ticks), so a late answer still measures this provider's latency.
    late: HashMap<u64, u64>,
}

#[derive(Debug)]
enum RelayHealth {
    /// Connected.
    Up(Box<RelayConnection>),
    /// Being dialled by the reconnect thread.
    Reconnecting,
}

#[derive(Debug)]
struct Relay {
    spec: RelaySpec,
    health: RelayHealth,
    /// A readiness event arrived since its socket was last read (an idle close shows up
    /// this way).
    ready: bool,
    /// Smoothed answer round trip (ns), 0 before the first.
    rtt_ns: u64,
}

/// What the private path did with a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PrivateStep {
    /// Written to at least one more relay, or still pending on one.
    Going,
    /// No relay connected: waiting for one (bounded).
    Waiting,
    /// Every connected relay refused it; nothing left to try.
    Exhausted,
    /// No longer in flight.
    Gone,
}

/// Latency recorders owned by the broadcast stage.
#[derive(Debug)]
pub struct BroadcastRecorders {
    /// Desk frame read → request bytes handed to the kernel.
    pub ws_to_wire: Recorder,
    /// Desk frame read → node's acceptance read back (the end-to-end budget).
    pub ws_to_node: Recorder,
    /// Request written → node's answer read (the node's round trip).
    pub node_rtt: Recorder,
    /// The kernel's part of a transaction's first write: the socket write call alone
    /// (the request already encoded and framed). The stage's own work is its service
    /// time less this.
    pub socket_write: Recorder,
}

impl BroadcastRecorders {
    /// The recorders under their standard names (`e2e.ws_to_wire`, `e2e.ws_to_node`,
    /// `broadcast.node_rtt`, `broadcast.socket_write`) in `registry`.
    pub fn standard(registry: &pipeline::LatencyRegistry) -> Self {
        Self {
            ws_to_wire: registry.recorder("e2e.ws_to_wire"),
            ws_to_node: registry.recorder("e2e.ws_to_node"),
            node_rtt: registry.recorder("broadcast.node_rtt"),
            socket_write: registry.recorder("broadcast.socket_write"),
        }
    }
}

/// The way back into the broadcast stage for a transaction that was signed and sent
/// before: the receipt watcher sends again, byte for byte, what a reorg dropped. The
/// message owns a blob slot holding the raw transaction; the stage treats it like a new
/// signed transaction (hedging, idempotency by hash, one `broadcast` event per send).
#[derive(Clone, Debug)]
pub struct Resend {
    tx: Sender<TxMsg>,
    waker: Arc<mio::Waker>,
}

impl Resend {
    /// Queues `msg` and wakes the stage. `false` if the stage is gone: the blob was not
    /// taken then, and the caller must release it.
    pub fn send(&self, msg: TxMsg) -> bool {
        if self.tx.send(msg).is_err() {
            return false;
        }
        let _ = self.waker.wake();
        true
    }
}

/// A venue for the reconnect thread to dial.
#[derive(Clone, Debug)]
enum Dial {
    /// Provider `i` at this WebSocket URL.
    Provider(usize, String),
    /// Relay `j` at this HTTP URL, signing with this key.
    Relay(usize, String, RelayAuth),
}

impl Dial {
    /// Identifies the venue (one redial per venue at a time).
    fn key(&self) -> (bool, usize) {
        match self {
            Dial::Provider(i, _) => (false, *i),
            Dial::Relay(j, ..) => (true, *j),
        }
    }
}

/// A connection the reconnect thread made.
#[derive(Debug)]
enum Dialled {
    Provider(usize, BroadcastConnection),
    Relay(usize, RelayConnection),
}

/// The reconnect thread: dials providers and relays with backoff, off the hot path.
#[derive(Debug)]
struct Reconnector {
    requests: Sender<Dial>,
    done: Receiver<Dialled>,
}

impl Reconnector {
    fn spawn(waker: Arc<mio::Waker>, tuning: BroadcastTuning) -> std::io::Result<Self> {
        let (req_tx, req_rx) = crossbeam_channel::unbounded::<Dial>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("broadcast-reconnect".into())
            .spawn(move || {
                // (venue, next attempt, current delay)
                let mut queue: Vec<(Dial, Instant, Duration)> = Vec::new();
                loop {
                    let next = queue.iter().map(|q| q.1).min();
                    let got = match next {
                        None => match req_rx.recv() {
                            Ok(r) => Some(r),
                            Err(_) => return,
                        },
                        Some(at) => {
                            match req_rx.recv_timeout(at.saturating_duration_since(Instant::now()))
                            {
                                Ok(r) => Some(r),
                                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                            }
                        }
                    };
                    if let Some(d) = got
                        && !queue.iter().any(|q| q.0.key() == d.key())
                    {
                        let at = Instant::now() + tuning.reconnect_min;
                        queue.push((d, at, tuning.reconnect_min));
                    }
                    let now = Instant::now();
                    let mut k = 0;
                    while k < queue.len() {
                        if queue[k].1 > now {
                            k += 1;
                            continue;
                        }
                        let dialled = match &queue[k].0 {
                            Dial::Provider(i, url) => {
                                BroadcastConnection::connect_timeout(url, tuning.connect_timeout)
                                    .map(|c| Dialled::Provider(*i, c))
                            }
                            Dial::Relay(j, url, auth) => RelayConnection::connect(url, auth.clone())
                                .map(|c| Dialled::Relay(*j, c)),
                        };
                        match dialled {
                            Ok(conn) => {
                                queue.swap_remove(k);
                                if done_tx.send(conn).is_err() {
                                    return;
                                }
                                let _ = waker.wake();
                            }
                            Err(e) => {
                                let q = &mut queue[k];
                                let (relay, index) = q.0.key();
                                tracing::warn!(venue = index, relay, error = %e, "venue redial failed");
                                q.2 = (q.2 * 2).min(tuning.reconnect_max);
                                q.1 = Instant::now() + q.2;
                                k += 1;
                            }
                        }
                    }
                }
            })?;
        Ok(Self {
            requests: req_tx,
            done: done_rx,
        })
    }
}

/// The broadcast stage.
#[derive(Debug)]
pub struct BroadcastStage {
    providers: Vec<Provider>,
    poll: mio::Poll,
    events: mio::Events,
    waker: Arc<mio::Waker>,
    reconnect: Reconnector,
    tuning: BroadcastTuning,
    in_flight: HashMap<u64, InFlight>,
    /// `(due, seq)` in send order: when a transaction goes to one more provider.
    hedges: VecDeque<(Instant, u64)>,
    /// Transactions waiting for any provider to be connected, oldest first.
    waiting: VecDeque<u64>,
    /// Private relays, in configuration order (venue bit `providers.len() + j`).
    relays: Vec<Relay>,
    /// Private transactions waiting for any relay to be connected, oldest first.
    waiting_private: VecDeque<u64>,
    /// Relay replies parked by `poll_responses` until they can be handled.
    relay_replies: Vec<(u64, RelayReply)>,
    /// The head's block number (for `maxBlockNumber`); `None` without relays.
    fees: Option<Arc<FeeView>>,
    /// The relay-auth key (for redials); `None` without relays.
    relay_auth: Option<RelayAuth>,
    /// Scratch for failure messages.
    detail: String,
    blobs: Arc<BlobPool>,
    status: StatusSink,
    rec: BroadcastRecorders,
    stats: Arc<BroadcastStats>,
    /// Answers parked by `poll_responses` until they can be handled.
    answers: Vec<(u64, Result<B256, RpcErrorInfo>)>,
    /// Intent transactions a node answered "nonce too low" for: handed to the receipt
    /// watcher to check by hash whether this very transaction is on chain.
    to_verify: Vec<(u64, InFlight)>,
    /// Scratch: usable providers in rank order.
    order: Vec<usize>,
    kill: Arc<KillSwitch>,
    /// Signed transactions held by a kill switch, in arrival order (sent on unkill).
    held: VecDeque<TxMsg>,
    held_epoch: u64,
    /// Under group commit: whether a transaction's journal record is synced yet (it is
    /// held here until then, like a kill switch hold).
    journal: Option<crate::journal::DurableWatch>,
    /// Scratch for the release pass: accounts with an earlier transaction still held.
    blocked: Vec<bool>,
    /// Next time to look at heartbeats.
    next_heartbeat_check: Instant,
    resend_tx: Sender<TxMsg>,
    resend_rx: Receiver<TxMsg>,
    /// The signing stage, told of signed transactions no venue took.
    notices: Option<crate::stages::signing::Notices>,
}

impl BroadcastStage {
    /// Holds each transaction until `signed` says its journal record is synced (group
    /// commit); the journal's flusher wakes the stage through [`Self::waker`].
    pub fn set_journal(&mut self, signed: crate::journal::DurableWatch) {
        self.journal = Some(signed);
    }

    /// Wakes the stage's poller from another thread.
    pub fn waker(&self) -> Arc<mio::Waker> {
        Arc::clone(&self.waker)
    }

    /// A handle for sending already-signed transactions again, same bytes (see
    /// [`Resend`]): reorged, and recovered after a restart.
    pub fn resend_handle(&self) -> Resend {
        Resend {
            tx: self.resend_tx.clone(),
            waker: Arc::clone(&self.waker),
        }
    }

    /// Connects to every provider (at least one must answer now; the others are dialled
    /// again in the background until they do).
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        providers: &[ProviderSpec],
        tuning: BroadcastTuning,
        blobs: Arc<BlobPool>,
        status: StatusSink,
        rec: BroadcastRecorders,
        capacity: usize,
        kill: Arc<KillSwitch>,
        stats: Arc<BroadcastStats>,
    ) -> Result<Self, venues::VenueError> {
        assert!(
            !providers.is_empty() && providers.len() <= MAX_PROVIDERS,
            "1..={MAX_PROVIDERS} providers"
        );
        let poll = mio::Poll::new()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKE)?);
        let reconnect = Reconnector::spawn(Arc::clone(&waker), tuning)?;
        let mut list = Vec::with_capacity(providers.len());
        let mut first_err = None;
        for (i, spec) in providers.iter().enumerate() {
            let health = match BroadcastConnection::connect(&spec.ws_url) {
                Ok(mut conn) => {
                    conn.register(poll.registry(), mio::Token(FIRST_PROVIDER + i))?;
                    stats.providers[i].up.store(true, Ordering::Relaxed);
                    Health::Up(Box::new(conn))
                }
                Err(e) => {
                    tracing::warn!(provider = %spec.name, error = %e, "provider unreachable at start; dialling it in the background");
                    let _ = reconnect
                        .requests
                        .send(Dial::Provider(i, spec.ws_url.clone()));
                    first_err.get_or_insert(e);
                    Health::Reconnecting
                }
            };
            list.push(Provider {
                spec: spec.clone(),
                health,
                demoted_until: None,
                rtt_ns: 0,
                last_activity: Instant::now(),
                late: HashMap::with_capacity(capacity),
            });
        }
        if let Some(e) = first_err
            && !list.iter().any(|p| matches!(p.health, Health::Up(_)))
        {
            return Err(e);
        }
        let (resend_tx, resend_rx) = crossbeam_channel::unbounded();
        Ok(Self {
            resend_tx,
            resend_rx,
            notices: None,
            providers: list,
            poll,
            events: mio::Events::with_capacity(64),
            waker,
            reconnect,
            tuning,
            in_flight: HashMap::with_capacity(capacity),
            hedges: VecDeque::with_capacity(capacity),
            waiting: VecDeque::with_capacity(capacity),
            relays: Vec::new(),
            waiting_private: VecDeque::new(),
            relay_replies: Vec::new(),
            fees: None,
            relay_auth: None,
            detail: String::new(),
            blobs,
            status,
            rec,
            stats,
            answers: Vec::with_capacity(capacity),
            to_verify: Vec::with_capacity(64),
            order: Vec::with_capacity(MAX_PROVIDERS),
            kill,
            held: VecDeque::with_capacity(capacity),
            held_epoch: 0,
            journal: None,
            blocked: vec![false; u16::MAX as usize + 1],
            next_heartbeat_check: Instant::now() + tuning.heartbeat_every,
        })
    }

    /// Adds the private relays: dials each now (blocking, bounded by the relay
    /// connection's dial timeout; not on the stage thread, which has not started) and has
    /// the ones that cannot be reached dialled again in the background. `fees` supplies
    /// the head's block number for `maxBlockNumber`. Every request is signed by `auth`.
    ///
    /// # Panics
    ///
    /// If providers and relays together are more than [`MAX_VENUES`], or if the stats were
    /// not made for these relays ([`BroadcastStats::with_relays`]).
    pub fn with_relays(
        mut self,
        relays: &[RelaySpec],
        auth: &RelayAuth,
        fees: Arc<FeeView>,
    ) -> Result<Self, venues::VenueError> {
        assert!(
            self.providers.len() + relays.len() <= MAX_VENUES,
            "at most {MAX_VENUES} providers and relays"
        );
        assert_eq!(
            self.stats.relays.len(),
            relays.len(),
            "stats for every relay"
        );
        for (j, spec) in relays.iter().enumerate() {
            let health = match RelayConnection::connect(&spec.url, auth.clone()) {
                Ok(mut conn) => {
                    conn.register(self.poll.registry(), mio::Token(FIRST_RELAY + j))?;
                    self.stats.relays[j].up.store(true, Ordering::Relaxed);
                    RelayHealth::Up(Box::new(conn))
                }
                Err(e) => {
                    tracing::warn!(relay = %spec.name, error = %e, "relay unreachable at start; dialling it in the background");
                    let _ = self.reconnect.requests.send(Dial::Relay(
                        j,
                        spec.url.clone(),
                        auth.clone(),
                    ));
                    RelayHealth::Reconnecting
                }
            };
            self.relays.push(Relay {
                spec: spec.clone(),
                health,
                ready: false,
                rtt_ns: 0,
            });
        }
        let capacity = self.in_flight.capacity();
        self.waiting_private = VecDeque::with_capacity(capacity);
        self.relay_replies = Vec::with_capacity(capacity);
        self.detail = String::with_capacity(256);
        self.fees = Some(fees);
        self.relay_auth = Some(auth.clone());
        Ok(self)
    }

    /// Transactions held by a kill switch right now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether every venue of the route `m` takes is killed (nothing may be sent).
    fn all_venues_killed(&self, m: &TxMsg) -> bool {
        if self.goes_private(m) {
            self.relays
                .iter()
                .all(|r| self.kill.venue_killed(r.spec.venue))
        } else {
            self.providers
                .iter()
                .all(|p| self.kill.venue_killed(p.spec.venue))
        }
    }

    /// Whether `m` takes the private route here.
    fn goes_private(&self, m: &TxMsg) -> bool {
        m.route == Route::Private && !self.relays.is_empty()
    }

    fn must_hold(&self, m: &TxMsg) -> bool {
        self.kill.check(m.account.0, m.asset, None).is_some()
            || self.all_venues_killed(m)
            || self
                .journal
                .as_ref()
                .is_some_and(|j| !j.is_durable(crate::journal::Pos(m.jpos)))
    }

    /// Whether the oldest held transaction's journal record was synced since it was held.
    fn front_durable(&self) -> bool {
        match (&self.journal, self.held.front()) {
            (Some(j), Some(m)) => j.is_durable(crate::journal::Pos(m.jpos)),
            _ => false,
        }
    }

    /// Venue bit of relay `j`.
    fn relay_bit(&self, j: usize) -> u32 {
        1u32 << (self.providers.len() + j)
    }

    /// The newest head's block number, as the head follower last stored it.
    fn head(&self) -> u64 {
        self.fees.as_ref().map_or(0, |f| f.updated_block())
    }

    /// Sends what the kill switch no longer holds, keeping each account's order: a
    /// transaction stays held while an earlier one of its account is.
    fn release(&mut self) -> usize {
        self.held_epoch = self.kill.epoch();
        let mut sent = 0;
        let mut keep = self.held.len();
        while keep > 0 {
            keep -= 1;
            let Some(m) = self.held.pop_front() else {
                break;
            };
            let a = m.account.0 as usize;
            if self.blocked[a] || self.must_hold(&m) {
                self.blocked[a] = true;
                self.held.push_back(m);
            } else {
                self.start(m);
                sent += 1;
            }
        }
        for m in &self.held {
            self.blocked[m.account.0 as usize] = false;
        }
        sent
    }

    /// Fills `self.order` with usable providers, best first: connected and venue not
    /// killed; not demoted before demoted; then by smoothed round trip, then
    /// configuration order.
    fn rank(&mut self, now: Instant) {
        self.order.clear();
        for i in 0..self.providers.len() {
            // A plain load while nothing is asked; the swap only when the monitor asked.
            let asked = &self.stats.providers[i].demote_requested;
            if asked.load(Ordering::Relaxed) && asked.swap(false, Ordering::Relaxed) {
                self.demote(i);
            }
        }
        for (i, p) in self.providers.iter_mut().enumerate() {
            if p.demoted_until.is_some_and(|t| t <= now) {
                p.demoted_until = None;
                self.stats.providers[i]
                    .demoted
                    .store(false, Ordering::Relaxed);
            }
            if matches!(p.health, Health::Up(_)) && !self.kill.venue_killed(p.spec.venue) {
                self.order.push(i);
            }
        }
        let providers = &self.providers;
        self.order.sort_unstable_by_key(|&i| {
            let p = &providers[i];
            (p.demoted_until.is_some(), p.rtt_ns, i)
        });
    }

    /// First handling of a signed transaction: private, to every relay; public, to the
    /// best provider, or to all of them if urgent, with a hedge timer for the rest.
    fn start(&mut self, msg: TxMsg) {
        let private = self.goes_private(&msg);
        let f = InFlight {
            origin: msg.origin,
            tx_hash: msg.tx_hash,
            account: msg.account,
            nonce: msg.nonce,
            first_raw: msg.hops.first().unwrap_or(0),
            sent_raw: 0,
            raw: msg.raw,
            sent: 0,
            pending: 0,
            refused: 0,
            urgent: msg.urgent,
            asset: msg.asset,
            private,
            public_fallback: msg.public_fallback,
            max_block: 0,
            wired: false,
            waiting_since: None,
            purpose: msg.purpose,
            generation: msg.generation,
            lost: 0,
        };
        // A replacement (same nonce) supersedes an earlier transaction of the intent that
        // no venue has accepted yet: its slot is released and it is not sent further.
        if let Some(old) = self.in_flight.insert(msg.seq, f) {
            self.blobs.release(old.raw);
        }
        if private {
            self.advance_private_settle(msg.seq);
        } else if msg.route == Route::Private && !msg.public_fallback {
            // The policy refuses `private` without a relay; this is a resend or a direct
            // caller.
            self.finish_failed(
                msg.seq,
                f,
                Reason::RouteUnavailable,
                "no private relay is configured; the transaction was not sent",
            );
        } else {
            self.advance(msg.seq, false);
        }
    }

    /// Writes transaction `seq` to the next provider(s) it has not reached: one, or every
    /// one if urgent. With no provider connected it waits for one (bounded by the venue
    /// wait). `hedge`: this send is a hedge.
    fn advance(&mut self, seq: u64, hedge: bool) {
        let now = Instant::now();
        self.rank(now);
        let Some(mut f) = self.in_flight.get(&seq).copied() else {
            return;
        };
        if f.private {
            self.advance_private_settle(seq);
            return;
        }
        let mut wrote = 0;
        let mut k = 0;
        while k < self.order.len() {
            let i = self.order[k];
            k += 1;
            let bit = 1u32 << i;
            if f.sent & bit != 0 {
                continue;
            }
            // SAFETY: this stage holds the in-flight entry, hence owns its raw slot.
            let bytes = unsafe { self.blobs.bytes(f.raw) };
            let Health::Up(conn) = &mut self.providers[i].health else {
                continue;
            };
            match conn.send_raw_transaction_stamped(bytes, seq, now_raw) {
                Ok(w) => {
                    let at = w.after_write;
                    if f.sent_raw == 0 {
                        f.sent_raw = at;
                    }
                    if !f.wired {
                        f.wired = true;
                        self.rec.ws_to_wire.record(ticks_to_ns(f.first_raw, at));
                        self.rec
                            .socket_write
                            .record(ticks_to_ns(w.before_write, w.after_write));
                    }
                    f.sent |= bit;
                    f.pending |= bit;
                    f.waiting_since = None;
                    self.stats.providers[i].sent.fetch_add(1, Ordering::Relaxed);
                    if hedge {
                        self.stats.hedges.fetch_add(1, Ordering::Relaxed);
                    }
                    wrote += 1;
                    if !f.urgent {
                        break;
                    }
                }
                Err(e) => {
                    self.in_flight.insert(seq, f);
                    self.lose(i, &e.to_string());
                    // `lose` may have moved this very transaction on already.
                    match self.in_flight.get(&seq) {
                        Some(g) => f = *g,
                        None => return,
                    }
                    if f.pending != 0 {
                        return;
                    }
                    // `lose` re-ranked: start over on the new order.
                    k = 0;
                }
            }
        }
        if wrote > 0 {
            self.in_flight.insert(seq, f);
            // Another provider is left to hedge to.
            if (f.sent.count_ones() as usize) < self.providers.len() {
                self.hedges.push_back((now + self.tuning.hedge_delay, seq));
            }
            return;
        }
        if f.pending == 0 && (self.order.is_empty() || f.sent == 0) && f.waiting_since.is_none() {
            // No provider connected: wait for one (bounded).
            f.waiting_since = Some(now);
            self.waiting.push_back(seq);
        }
        self.in_flight.insert(seq, f);
    }

    /// Writes private transaction `seq` to every connected relay (venue not killed) it has
    /// not reached yet. The first write fixes its `maxBlockNumber`.
    fn advance_private(&mut self, seq: u64) -> PrivateStep {
        let now = Instant::now();
        let Some(mut f) = self.in_flight.get(&seq).copied() else {
            return PrivateStep::Gone;
        };
        debug_assert!(f.private);
        let mut wrote = 0;
        let mut usable = 0;
        for j in 0..self.relays.len() {
            if self.kill.venue_killed(self.relays[j].spec.venue)
                || !matches!(self.relays[j].health, RelayHealth::Up(_))
            {
                continue;
            }
            usable += 1;
            let bit = self.relay_bit(j);
            if f.sent & bit != 0 {
                continue;
            }
            if f.max_block == 0 {
                f.max_block = self.head() + self.tuning.private_max_blocks;
            }
            // SAFETY: this stage holds the in-flight entry, hence owns its raw slot.
            let bytes = unsafe { self.blobs.bytes(f.raw) };
            let RelayHealth::Up(conn) = &mut self.relays[j].health else {
                continue;
            };
            match conn.send_private_transaction(bytes, Some(f.max_block), seq) {
                Ok(()) => {
                    let at = now_raw();
                    if f.sent_raw == 0 {
                        f.sent_raw = at;
                    }
                    if !f.wired {
                        f.wired = true;
                        self.rec.ws_to_wire.record(ticks_to_ns(f.first_raw, at));
                    }
                    f.sent |= bit;
                    f.pending |= bit;
                    f.waiting_since = None;
                    self.stats.relays[j].sent.fetch_add(1, Ordering::Relaxed);
                    wrote += 1;
                }
                Err(e) => {
                    usable -= 1;
                    self.in_flight.insert(seq, f);
                    self.lose_relay(j, &e.to_string());
                    // `lose_relay` moves on what waited on that relay: maybe this one.
                    match self.in_flight.get(&seq) {
                        Some(g) if g.private => f = *g,
                        _ => return PrivateStep::Gone,
                    }
                }
            }
        }
        self.in_flight.insert(seq, f);
        if wrote > 0 || f.pending != 0 {
            return PrivateStep::Going;
        }
        if usable == 0 {
            // No relay connected: wait for one (bounded).
            if f.waiting_since.is_none() {
                if let Some(g) = self.in_flight.get_mut(&seq) {
                    g.waiting_since = Some(now);
                }
                self.waiting_private.push_back(seq);
            }
            return PrivateStep::Waiting;
        }
        PrivateStep::Exhausted
    }

    /// [`Self::advance_private`], settling a transaction every connected relay refused.
    fn advance_private_settle(&mut self, seq: u64) {
        if self.advance_private(seq) == PrivateStep::Exhausted {
            self.private_exhausted(seq, None, "every connected relay refused it");
        }
    }

    /// No relay takes private transaction `seq`: public at once with `public_fallback`,
    /// else failed with the relay's refusal (`relay`: which one, if known).
    fn private_exhausted(&mut self, seq: u64, relay: Option<usize>, message: &str) {
        let Some(f) = self.in_flight.get(&seq).copied() else {
            return;
        };
        if f.public_fallback {
            self.go_public(seq);
            return;
        }
        use std::fmt::Write as _;
        let mut detail = std::mem::take(&mut self.detail);
        detail.clear();
        match relay {
            Some(j) => {
                let _ = write!(
                    detail,
                    "relay {} refused: {message}",
                    self.relays[j].spec.name
                );
            }
            None => detail.push_str(message),
        }
        self.finish_failed(seq, f, Reason::NodeRejected, &detail);
        self.detail = detail;
    }

    /// Moves private transaction `seq` to the public route (`public_fallback`): written
    /// to the providers at once, as if it had arrived public.
    fn go_public(&mut self, seq: u64) {
        let Some(f) = self.in_flight.get_mut(&seq) else {
            return;
        };
        tracing::info!(
            seq,
            "no private relay took the transaction; sending it publicly"
        );
        f.private = false;
        f.sent = 0;
        f.pending = 0;
        f.refused = 0;
        f.sent_raw = 0;
        f.max_block = 0;
        f.waiting_since = None;
        self.stats.private_fallbacks.fetch_add(1, Ordering::Relaxed);
        self.advance(seq, false);
    }

    /// Relay `j` answered for `tag`.
    fn handle_relay_reply<E: Emit<TxMsg>>(
        &mut self,
        j: usize,
        tag: u64,
        reply: RelayReply,
        now: u64,
        out: &mut E,
    ) {
        let bit = self.relay_bit(j);
        let refusal = match reply {
            RelayReply::Sent(_) => None,
            RelayReply::Error(e) if is_already_known(&e) => None,
            RelayReply::Error(e) => {
                self.stats.relays[j].errors.fetch_add(1, Ordering::Relaxed);
                Some(e)
            }
            // Cancellation is not sent by this stage.
            RelayReply::Cancelled(_) => return,
        };
        let Some(f) = self.in_flight.get_mut(&tag) else {
            // Already accepted (by another relay) or settled: a late answer.
            return;
        };
        if !f.private || f.pending & bit == 0 {
            return;
        }
        f.pending &= !bit;
        let rtt = ticks_to_ns(f.sent_raw, now);
        let r = &mut self.relays[j];
        r.rtt_ns = if r.rtt_ns == 0 {
            rtt
        } else {
            (r.rtt_ns * 7 + rtt) / 8
        };
        self.stats.relays[j]
            .rtt_ns
            .store(r.rtt_ns, Ordering::Relaxed);
        let Some(e) = refusal else {
            self.accepted_private(j, tag, now, out);
            return;
        };
        f.refused |= bit;
        if f.pending != 0 {
            // Another relay may still accept.
            return;
        }
        if self.advance_private(tag) == PrivateStep::Exhausted {
            self.private_exhausted(tag, Some(j), &e.message);
        }
    }

    /// Relay `j` accepted private transaction `seq`: the `broadcast` event, then the
    /// transaction to the receipt watcher (route private, with its `max_block`).
    fn accepted_private<E: Emit<TxMsg>>(&mut self, j: usize, seq: u64, now: u64, out: &mut E) {
        let Some(f) = self.in_flight.remove(&seq) else {
            return;
        };
        self.stats.relays[j]
            .first_accepts
            .fetch_add(1, Ordering::Relaxed);
        self.stats.private_routed.fetch_add(1, Ordering::Relaxed);
        self.hand_on(seq, &f, Route::Private, now, out);
    }

    /// Relay `j`'s connection is gone: have it dialled again, and move what waited only
    /// on it to the other relays (or wait for one).
    fn lose_relay(&mut self, j: usize, why: &str) {
        if !matches!(self.relays[j].health, RelayHealth::Up(_)) {
            return;
        }
        tracing::warn!(relay = %self.relays[j].spec.name, reason = why, "relay connection lost");
        self.relays[j].health = RelayHealth::Reconnecting;
        self.relays[j].ready = false;
        self.stats.relays[j].up.store(false, Ordering::Relaxed);
        self.stats.relays[j]
            .disconnects
            .fetch_add(1, Ordering::Relaxed);
        if let Some(auth) = &self.relay_auth {
            let _ = self.reconnect.requests.send(Dial::Relay(
                j,
                self.relays[j].spec.url.clone(),
                auth.clone(),
            ));
        }
        let bit = self.relay_bit(j);
        for seq in self.orphans(bit, true) {
            self.advance_private_settle(seq);
        }
    }

    /// A venue (bit `bit`) lost its connection: transactions waiting on it forget it
    /// (unanswered, they may still reach the chain through it, and may be sent there
    /// again after the redial: idempotent by hash). Returns those that now wait on no
    /// venue at all and are to be sent again; one that lost too many connections fails
    /// instead. `private`: only transactions on the private route.
    fn orphans(&mut self, bit: u32, private: bool) -> Vec<u64> {
        let mut orphans: Vec<u64> = Vec::new();
        for (seq, f) in &mut self.in_flight {
            if f.pending & bit != 0 && (!private || f.private) {
                f.pending &= !bit;
                f.sent &= !bit;
                if f.pending == 0 {
                    orphans.push(*seq);
                }
            }
        }
        orphans.retain(|&seq| !self.too_often_lost(seq));
        self.stats
            .resends
            .fetch_add(orphans.len() as u64, Ordering::Relaxed);
        orphans
    }

    /// Counts one more broken connection under transaction `seq`; past [`MAX_LOST`] it
    /// fails (`venue_unavailable`) instead of being sent again, so a venue that takes
    /// connections and drops them unanswered cannot keep a transaction cycling forever.
    fn too_often_lost(&mut self, seq: u64) -> bool {
        let Some(f) = self.in_flight.get_mut(&seq) else {
            return true;
        };
        f.lost = f.lost.saturating_add(1);
        if f.lost < MAX_LOST {
            return false;
        }
        let f = *f;
        if f.private && f.public_fallback {
            // The relays keep losing it; the intent allows the public route.
            self.go_public(seq);
            return true;
        }
        self.finish_failed(
            seq,
            f,
            Reason::VenueUnavailable,
            "the venues' connections broke repeatedly before any answered; the transaction may still be included",
        );
        true
    }

    /// Provider `i` answered after `rtt_ns`: smooth it in, demote if over budget.
    fn observe(&mut self, i: usize, rtt_ns: u64) {
        let p = &mut self.providers[i];
        p.rtt_ns = if p.rtt_ns == 0 {
            rtt_ns
        } else {
            (p.rtt_ns * 7 + rtt_ns) / 8
        };
        self.stats.providers[i]
            .rtt_ns
            .store(p.rtt_ns, Ordering::Relaxed);
        if rtt_ns > self.tuning.latency_budget.as_nanos() as u64 {
            self.demote(i);
        }
    }

    fn handle_answer<E: Emit<TxMsg>>(
        &mut self,
        i: usize,
        tag: u64,
        res: Result<B256, RpcErrorInfo>,
        now: u64,
        out: &mut E,
    ) {
        let bit = 1u32 << i;
        let Some(f) = self.in_flight.get_mut(&tag) else {
            // Already accepted elsewhere or failed: a late answer, which still tells how
            // fast this provider is.
            if let Some(sent) = self.providers[i].late.remove(&tag) {
                self.observe(i, ticks_to_ns(sent, now));
            }
            return;
        };
        if f.pending & bit == 0 {
            return;
        }
        f.pending &= !bit;
        let rtt = ticks_to_ns(f.sent_raw, now);
        self.observe(i, rtt);
        match res {
            Ok(_) => self.accepted(i, tag, now, out),
            Err(e) if is_already_known(&e) => self.accepted(i, tag, now, out),
            Err(e) => {
                self.stats.providers[i]
                    .errors
                    .fetch_add(1, Ordering::Relaxed);
                let Some(f) = self.in_flight.get_mut(&tag) else {
                    return;
                };
                f.refused |= bit;
                if f.pending != 0 {
                    // Another provider may still accept it.
                    return;
                }
                // Try the providers it has not reached; fail if there are none.
                let before = f.sent;
                self.advance(tag, false);
                if let Some(g) = self.in_flight.get(&tag).copied()
                    && g.sent == before
                    && g.pending == 0
                    && g.waiting_since.is_none()
                {
                    self.finish_failed(tag, g, Reason::NodeRejected, &e.message);
                }
            }
        }
    }

    fn demote(&mut self, i: usize) {
        let p = &mut self.providers[i];
        if p.demoted_until.is_none() {
            self.stats.providers[i]
                .demotions
                .fetch_add(1, Ordering::Relaxed);
            self.stats.providers[i]
                .demoted
                .store(true, Ordering::Relaxed);
            tracing::warn!(provider = %p.spec.name, "provider demoted");
        }
        p.demoted_until = Some(Instant::now() + self.tuning.demote_for);
    }

    /// Provider `i` accepted transaction `seq`: `broadcast` goes to the status ring first,
    /// then the hash to the receipt watcher, so `included` can never overtake `broadcast`.
    /// (A block holding the transaction may be announced before the answer arrives; the
    /// watcher keeps recent blocks' receipts for exactly that race.)
    fn accepted<E: Emit<TxMsg>>(&mut self, i: usize, seq: u64, now: u64, out: &mut E) {
        let Some(f) = self.in_flight.remove(&seq) else {
            return;
        };
        self.stats.providers[i]
            .first_accepts
            .fetch_add(1, Ordering::Relaxed);
        self.stats.public_routed.fetch_add(1, Ordering::Relaxed);
        // Providers that refused what this one took were wrong about it.
        let mut refused = f.refused;
        while refused != 0 {
            let j = refused.trailing_zeros() as usize;
            refused &= refused - 1;
            self.demote(j);
        }
        // Providers still silent on it: their answer will still be measured.
        let mut pending = f.pending;
        while pending != 0 {
            let j = pending.trailing_zeros() as usize;
            pending &= pending - 1;
            self.providers[j].late.insert(seq, f.sent_raw);
        }
        self.rec.ws_to_node.record(ticks_to_ns(f.first_raw, now));
        self.rec.node_rtt.record(ticks_to_ns(f.sent_raw, now));
        self.hand_on(seq, &f, Route::Public, now, out);
    }

    /// An accepted transaction: the `broadcast` event (none for a filler: its intent has
    /// ended), then the transaction to the receipt watcher. Hops: the intent's first stamp
    /// (for end-to-end time to inclusion) and when it was first written to a venue. The
    /// raw transaction's slot goes along: the watcher keeps the bytes (to send them again
    /// if a reorg drops the transaction) and releases the slot.
    fn hand_on<E: Emit<TxMsg>>(
        &mut self,
        seq: u64,
        f: &InFlight,
        route: Route,
        now: u64,
        out: &mut E,
    ) {
        if f.purpose != TxPurpose::Filler {
            self.status.send(StatusMsg {
                tx_hash: f.tx_hash,
                route,
                venues: f.sent,
                ..StatusMsg::event(seq, f.origin, State::Broadcast, now)
            });
        }
        let mut hops = Hops::starting_at(f.first_raw);
        hops.stamp(f.sent_raw);
        out.emit(TxMsg {
            seq,
            origin: f.origin,
            account: f.account,
            nonce: f.nonce,
            tx_hash: f.tx_hash,
            raw: f.raw,
            asset: f.asset,
            urgent: f.urgent,
            route,
            public_fallback: f.public_fallback,
            max_block: if route == Route::Private {
                f.max_block
            } else {
                0
            },
            hops,
            purpose: f.purpose,
            generation: f.generation,
            jpos: 0,
            verify: false,
        });
    }

    /// Where a signed transaction that no venue took is reported, so its nonce is not
    /// left a gap (the signing stage).
    pub fn set_notices(&mut self, n: crate::stages::signing::Notices) {
        self.notices = Some(n);
    }

    fn finish_failed(&mut self, seq: u64, f: InFlight, reason: Reason, detail: &str) {
        self.in_flight.remove(&seq);
        if f.purpose == TxPurpose::Intent && detail.to_ascii_lowercase().contains("nonce too low") {
            // The nonce is used on chain: perhaps by this very transaction (sent before a
            // restart, or mined while a resend was on its way). The receipt watcher
            // checks by hash before the intent is called failed.
            self.to_verify.push((seq, f));
            return;
        }
        self.blobs.release(f.raw);
        match f.purpose {
            TxPurpose::Replacement | TxPurpose::Cancel => {
                // The intent's earlier transaction holds the nonce and may still be
                // included (or already is: "nonce too low"); nothing ends here.
                tracing::warn!(seq, ?f.purpose, detail, "a replacement was not taken");
                return;
            }
            TxPurpose::Filler | TxPurpose::Intent => {
                if let Some(n) = &self.notices {
                    // "nonce too low": the chain used this nonce already (another sender
                    // with the same key): nothing to fill, the account's nonce is behind.
                    let behind = detail.to_ascii_lowercase().contains("nonce too low");
                    n.send(if behind {
                        crate::stages::signing::NonceNotice::Behind { seq }
                    } else {
                        crate::stages::signing::NonceNotice::Void { seq }
                    });
                }
            }
        }
        if f.purpose == TxPurpose::Filler {
            // The intent already ended; its nonce is the signing stage's to fill again.
            return;
        }
        self.status.send(StatusMsg::refusal(
            seq,
            f.origin,
            State::Failed,
            reason,
            detail,
            now_raw(),
        ));
    }

    /// Provider `i`'s connection is gone: close it, have it dialled again, and move what
    /// waited only on it to the next provider.
    fn lose(&mut self, i: usize, why: &str) {
        if !matches!(self.providers[i].health, Health::Up(_)) {
            return;
        }
        tracing::warn!(provider = %self.providers[i].spec.name, reason = why, "provider connection lost");
        self.providers[i].health = Health::Reconnecting;
        self.providers[i].late.clear();
        self.stats.providers[i].up.store(false, Ordering::Relaxed);
        self.stats.providers[i]
            .disconnects
            .fetch_add(1, Ordering::Relaxed);
        let _ = self
            .reconnect
            .requests
            .send(Dial::Provider(i, self.providers[i].spec.ws_url.clone()));
        for seq in self.orphans(1u32 << i, false) {
            self.advance(seq, false);
        }
    }

    fn on_reconnected(&mut self) -> usize {
        let mut n = 0;
        let mut relays = 0;
        while let Ok(dialled) = self.reconnect.done.try_recv() {
            let (i, mut conn) = match dialled {
                Dialled::Provider(i, conn) => (i, conn),
                Dialled::Relay(j, conn) => {
                    relays += self.relay_reconnected(j, conn);
                    continue;
                }
            };
            if conn
                .register(self.poll.registry(), mio::Token(FIRST_PROVIDER + i))
                .is_err()
            {
                let _ = self
                    .reconnect
                    .requests
                    .send(Dial::Provider(i, self.providers[i].spec.ws_url.clone()));
                continue;
            }
            tracing::info!(provider = %self.providers[i].spec.name, "provider reconnected");
            self.providers[i].health = Health::Up(Box::new(conn));
            self.providers[i].last_activity = Instant::now();
            self.stats.providers[i].up.store(true, Ordering::Relaxed);
            self.stats.providers[i]
                .reconnects
                .fetch_add(1, Ordering::Relaxed);
            n += 1;
        }
        if n > 0 {
            // Whatever waited for a provider goes now.
            let waiting: Vec<u64> = self.waiting.drain(..).collect();
            for seq in waiting {
                if let Some(f) = self.in_flight.get_mut(&seq)
                    && !f.private
                {
                    f.waiting_since = None;
                    self.advance(seq, false);
                }
            }
        }
        if relays > 0 {
            // Whatever waited for a relay goes now (keeping its wait deadline if the
            // relay cannot take it either).
            let waiting: Vec<u64> = self.waiting_private.drain(..).collect();
            for seq in waiting {
                if let Some(f) = self.in_flight.get(&seq).copied()
                    && f.private
                {
                    match self.advance_private(seq) {
                        PrivateStep::Exhausted => {
                            self.private_exhausted(seq, None, "every connected relay refused it");
                        }
                        PrivateStep::Waiting
                            if f.waiting_since.is_some()
                                && !self.waiting_private.contains(&seq) =>
                        {
                            // Still waiting: `advance_private` kept its start time.
                            self.waiting_private.push_back(seq);
                        }
                        _ => {}
                    }
                }
            }
            n += relays;
        }
        n
    }

    /// The reconnect thread dialled relay `j` again: 1 if it is usable now.
    fn relay_reconnected(&mut self, j: usize, mut conn: RelayConnection) -> usize {
        if conn
            .register(self.poll.registry(), mio::Token(FIRST_RELAY + j))
            .is_err()
        {
            if let Some(auth) = &self.relay_auth {
                let _ = self.reconnect.requests.send(Dial::Relay(
                    j,
                    self.relays[j].spec.url.clone(),
                    auth.clone(),
                ));
            }
            return 0;
        }
        tracing::info!(relay = %self.relays[j].spec.name, "relay reconnected");
        self.relays[j].health = RelayHealth::Up(Box::new(conn));
        self.relays[j].ready = false;
        self.stats.relays[j].up.store(true, Ordering::Relaxed);
        self.stats.relays[j]
            .reconnects
            .fetch_add(1, Ordering::Relaxed);
        1
    }

    /// Due hedges, waiting transactions past their deadline, heartbeats.
    fn timers(&mut self) -> usize {
        let now = Instant::now();
        let mut n = 0;
        while let Some(&(due, seq)) = self.hedges.front() {
            if due > now {
                break;
            }
            self.hedges.pop_front();
            let Some(f) = self.in_flight.get(&seq).copied() else {
                continue;
            };
            if f.pending == 0 || f.private {
                continue;
            }
            // The providers holding it are slower than the hedge delay: that is observed
            // latency (it ranks them down even if they never answer); one more gets it.
            let waited = ticks_to_ns(f.sent_raw, now_raw());
            let mut pending = f.pending;
            while pending != 0 {
                let i = pending.trailing_zeros() as usize;
                pending &= pending - 1;
                let p = &mut self.providers[i];
                if waited > p.rtt_ns {
                    p.rtt_ns = waited;
                    self.stats.providers[i]
                        .rtt_ns
                        .store(waited, Ordering::Relaxed);
                }
            }
            self.advance(seq, true);
            n += 1;
        }
        while let Some(&seq) = self.waiting.front() {
            let Some(f) = self.in_flight.get(&seq).copied() else {
                self.waiting.pop_front();
                continue;
            };
            if f.private {
                self.waiting.pop_front();
                continue;
            }
            match f.waiting_since {
                Some(t) if now.duration_since(t) >= self.tuning.venue_wait => {
                    self.waiting.pop_front();
                    self.finish_failed(
                        seq,
                        f,
                        Reason::VenueUnavailable,
                        "no RPC provider was reachable in time; the transaction was not sent",
                    );
                    n += 1;
                }
                Some(_) => break,
                None => {
                    self.waiting.pop_front();
                }
            }
        }
        while let Some(&seq) = self.waiting_private.front() {
            let Some(f) = self.in_flight.get(&seq).copied() else {
                self.waiting_private.pop_front();
                continue;
            };
            if !f.private {
                self.waiting_private.pop_front();
                continue;
            }
            match f.waiting_since {
                Some(t) if now.duration_since(t) >= self.tuning.venue_wait => {
                    self.waiting_private.pop_front();
                    if f.public_fallback {
                        self.go_public(seq);
                    } else {
                        self.finish_failed(
                            seq,
                            f,
                            Reason::VenueUnavailable,
                            "no private relay was reachable in time; the transaction was not sent",
                        );
                    }
                    n += 1;
                }
                Some(_) => break,
                None => {
                    self.waiting_private.pop_front();
                }
            }
        }
        if now >= self.next_heartbeat_check {
            self.next_heartbeat_check = now + self.tuning.heartbeat_every / 4;
            for i in 0..self.providers.len() {
                let p = &mut self.providers[i];
                let Health::Up(conn) = &mut p.health else {
                    continue;
                };
                if conn
                    .heartbeat_waiting()
                    .is_some_and(|w| w >= self.tuning.heartbeat_timeout)
                {
                    self.lose(i, "heartbeat unanswered");
                    n += 1;
                    continue;
                }
                // Quiet for a while (or answering nothing): ask whether it is alive.
                if now.duration_since(p.last_activity) >= self.tuning.heartbeat_every
                    && let Err(e) = conn.send_heartbeat()
                {
                    self.lose(i, &e.to_string());
                }
            }
            // A relay has no heartbeat request of its own; what it has not answered is
            // the test: a request unanswered past the heartbeat timeout drops the
            // connection, and what waited on it moves on as after any lost relay.
            for j in 0..self.relays.len() {
                let RelayHealth::Up(conn) = &self.relays[j].health else {
                    continue;
                };
                if conn
                    .oldest_unanswered()
                    .is_some_and(|w| w >= self.tuning.heartbeat_timeout)
                {
                    self.lose_relay(j, "relay request unanswered");
                    n += 1;
                }
            }
        }
        n
    }

    /// The earliest timer, for the park timeout.
    fn next_timer(&self) -> Instant {
        let mut t = self.next_heartbeat_check;
        if let Some(&(due, _)) = self.hedges.front() {
            t = t.min(due);
        }
        for queue in [&self.waiting, &self.waiting_private] {
            if let Some(f) = queue.front().and_then(|s| self.in_flight.get(s))
                && let Some(since) = f.waiting_since
            {
                t = t.min(since + self.tuning.venue_wait);
            }
        }
        t
    }

    fn poll_answers<E: Emit<TxMsg>>(&mut self, out: &mut E) -> usize {
        let mut handled = 0;
        for i in 0..self.providers.len() {
            let Health::Up(conn) = &mut self.providers[i].health else {
                continue;
            };
            if conn.in_flight() == 0 && !conn.write_pending() {
                continue;
            }
            let heartbeat_was_out = conn.heartbeat_waiting().is_some();
            let mut answers = std::mem::take(&mut self.answers);
            let res = conn.poll_responses(|tag, r| answers.push((tag, r)));
            let heartbeat_rtt = (heartbeat_was_out && conn.heartbeat_waiting().is_none())
                .then(|| conn.heartbeat_rtt())
                .flatten();
            if !answers.is_empty() || heartbeat_rtt.is_some() {
                self.providers[i].last_activity = Instant::now();
            }
            // A quiet provider's latency is measured by its heartbeats.
            if let Some(rtt) = heartbeat_rtt {
                self.observe(i, rtt.as_nanos() as u64);
            }
            let now = now_raw();
            handled += answers.len();
            for (tag, r) in answers.drain(..) {
                self.handle_answer(i, tag, r, now, out);
            }
            self.answers = answers;
            if let Err(e) = res {
                self.lose(i, &e.to_string());
            }
        }
        for j in 0..self.relays.len() {
            let r = &mut self.relays[j];
            let RelayHealth::Up(conn) = &mut r.health else {
                continue;
            };
            // An idle connection is read only after a readiness event: that is how a
            // relay closing it is noticed.
            if conn.in_flight() == 0 && !conn.write_pending() && !r.ready {
                continue;
            }
            r.ready = false;
            let mut replies = std::mem::take(&mut self.relay_replies);
            let res = conn.poll_responses(|tag, reply| replies.push((tag, reply)));
            let now = now_raw();
            handled += replies.len();
            for (tag, reply) in replies.drain(..) {
                self.handle_relay_reply(j, tag, reply, now, out);
            }
            self.relay_replies = replies;
            if let Err(e) = res {
                self.lose_relay(j, &e.to_string());
            }
        }
        handled
    }

    fn fail_all_in_flight(&mut self, detail: &str) {
        let seqs: Vec<u64> = self.in_flight.keys().copied().collect();
        for seq in seqs {
            if let Some(f) = self.in_flight.get(&seq).copied() {
                self.finish_failed(seq, f, Reason::VenueUnavailable, detail);
            }
        }
    }
}

/// The node already has this exact transaction: the send succeeded (idempotent by hash).
fn is_already_known(e: &RpcErrorInfo) -> bool {
    let m = e.message.to_ascii_lowercase();
    m.contains("already known") || m.contains("already imported")
}

impl Stage for BroadcastStage {
    type In = TxMsg;
    type Out = TxMsg;

    fn name(&self) -> &'static str {
        "broadcast"
    }

    fn on_start(&mut self, input: &Arc<Signal>) {
        let w = Arc::clone(&self.waker);
        input.set_waker(Waker::Custom(Arc::new(move || {
            let _ = w.wake();
        })));
    }

    #[inline]
    fn on_message<E: Emit<TxMsg>>(&mut self, msg: TxMsg, _out: &mut E) {
        // A kill switch holds signed transactions here, unsent, until it is turned off.
        if !self.held.is_empty() || self.must_hold(&msg) {
            self.held.push_back(msg);
            self.release();
            return;
        }
        self.start(msg);
    }

    fn poll_extra<E: Emit<TxMsg>>(&mut self, out: &mut E) -> usize {
        let verifying = self.to_verify.len();
        for (seq, f) in self.to_verify.drain(..) {
            out.emit(TxMsg {
                seq,
                origin: f.origin,
                account: f.account,
                nonce: f.nonce,
                tx_hash: f.tx_hash,
                raw: f.raw,
                asset: f.asset,
                urgent: f.urgent,
                route: Route::Public,
                public_fallback: f.public_fallback,
                hops: Hops::starting_at(f.first_raw),
                purpose: f.purpose,
                generation: f.generation,
                verify: true,
                ..TxMsg::default()
            });
        }
        let released = if !self.held.is_empty()
            && (self.kill.epoch() != self.held_epoch || self.front_durable())
        {
            self.release()
        } else {
            0
        };
        let reconnected = if self.reconnect.done.is_empty() {
            0
        } else {
            self.on_reconnected()
        };
        let mut resent = 0;
        while let Ok(m) = self.resend_rx.try_recv() {
            self.start(m);
            resent += 1;
        }
        verifying + released + reconnected + resent + self.poll_answers(out) + self.timers()
    }

    fn extra_ready(&mut self) -> bool {
        false
    }

    fn owns_park(&self) -> bool {
        true
    }

    fn park(&mut self, timeout: Option<Duration>) {
        // Woken by a provider socket, the input ring's waker or the reconnect thread; no
        // later than the next timer.
        let until_timer = self.next_timer().saturating_duration_since(Instant::now());
        let t = timeout.map_or(until_timer, |t| t.min(until_timer));
        let _ = self.poll.poll(&mut self.events, Some(t));
        for ev in self.events.iter() {
            if let Some(r) = ev
                .token()
                .0
                .checked_sub(FIRST_RELAY)
                .and_then(|j| self.relays.get_mut(j))
            {
                r.ready = true;
            }
        }
    }

    fn on_shutdown<E: Emit<TxMsg>>(&mut self, out: &mut E) {
        // Held transactions were signed but never sent: say so.
        let now = now_raw();
        while let Some(m) = self.held.pop_front() {
            self.blobs.release(m.raw);
            self.status.send(StatusMsg::refusal(
                m.seq,
                m.origin,
                State::Failed,
                Reason::KillSwitch,
                "held by a kill switch when the engine stopped; the transaction was not sent",
                now,
            ));
        }
        // Give answers already on their way a bounded time to arrive.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.in_flight.values().any(|f| f.pending != 0) && Instant::now() < deadline {
            let _ = self
                .poll
                .poll(&mut self.events, Some(Duration::from_millis(20)));
            self.poll_answers(out);
            self.timers();
        }
        if !self.in_flight.is_empty() {
            self.fail_all_in_flight(
                "the engine stopped before a provider accepted it; the transaction may still be included",
            );
        }
    }
}
