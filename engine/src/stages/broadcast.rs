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
//! # Invariants
//!
//! - One `broadcast` event per transaction at most, and only after some provider accepted
//!   it; the hash reaches the receipt watcher only after that event.
//! - The raw bytes stay in their blob slot until the transaction is accepted or has
//!   failed, so a hedge or a resend after a lost connection sends the very same bytes.
//!   On acceptance the slot goes on to the receipt watcher with the hash; on failure it
//!   is released here. Either way it is released exactly once.
//! - Nothing here re-signs: a resend is the same transaction.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy_primitives::B256;
use crossbeam_channel::{Receiver, Sender};
use pipeline::{Emit, Hops, Recorder, Signal, Stage, Waker, now_raw, ticks_to_ns};
use venues::{BroadcastConnection, RpcErrorInfo};

use crate::blob::{BlobPool, BlobRef};
use crate::msg::{Origin, Reason, Route, State, StatusMsg, TxMsg};
use crate::risk::kill::KillSwitch;
use crate::stages::StatusSink;

const WAKE: mio::Token = mio::Token(0);
/// Provider `i` polls under token `FIRST_PROVIDER + i`.
const FIRST_PROVIDER: usize = 1;
/// Most providers a stage drives (bit masks are `u32`).
pub const MAX_PROVIDERS: usize = 32;

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
    /// Bound on one redial (TCP connect plus WebSocket handshake).
    pub connect_timeout: Duration,
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
        }
    }
}

/// Live counters of one provider, read by `/metrics` and `/health`.
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
        }
    }
}

/// Counters of the broadcast stage as a whole, with one entry per provider.
#[derive(Debug)]
pub struct BroadcastStats {
    /// Per provider, in configuration order.
    pub providers: Vec<ProviderStats>,
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
    /// Counters for these providers.
    pub fn new(names: &[String]) -> Self {
        Self {
            providers: names.iter().map(|n| ProviderStats::new(n)).collect(),
            hedges: AtomicU64::new(0),
            resends: AtomicU64::new(0),
            public_routed: AtomicU64::new(0),
            private_routed: AtomicU64::new(0),
        }
    }

    /// Providers connected now.
    pub fn providers_up(&self) -> usize {
        self.providers
            .iter()
            .filter(|p| p.up.load(Ordering::Relaxed))
            .count()
    }
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    origin: Origin,
    tx_hash: B256,
    account: crate::msg::AccountIdx,
    nonce: u64,
    first_raw: u64,
    /// First write to any provider (raw ticks; 0 before).
    sent_raw: u64,
    /// The raw transaction, kept until accepted or failed.
    raw: BlobRef,
    /// Providers it was written to.
    sent: u32,
    /// Providers it was written to that have not answered (on a live connection).
    pending: u32,
    /// Providers that refused it.
    refused: u32,
    urgent: bool,
    /// When it started waiting for any provider to be connected.
    waiting_since: Option<Instant>,
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

/// Latency recorders owned by the broadcast stage.
#[derive(Debug)]
pub struct BroadcastRecorders {
    /// Desk frame read → request bytes handed to the kernel.
    pub ws_to_wire: Recorder,
    /// Desk frame read → node's acceptance read back (the end-to-end budget).
    pub ws_to_node: Recorder,
    /// Request written → node's answer read (the node's round trip).
    pub node_rtt: Recorder,
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

/// The reconnect thread: dials providers with backoff, off the hot path.
#[derive(Debug)]
struct Reconnector {
    requests: Sender<(usize, String)>,
    done: Receiver<(usize, BroadcastConnection)>,
}

impl Reconnector {
    fn spawn(waker: Arc<mio::Waker>, tuning: BroadcastTuning) -> std::io::Result<Self> {
        let (req_tx, req_rx) = crossbeam_channel::unbounded::<(usize, String)>();
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("broadcast-reconnect".into())
            .spawn(move || {
                // (provider, url, next attempt, current delay)
                let mut queue: Vec<(usize, String, Instant, Duration)> = Vec::new();
                loop {
                    let next = queue.iter().map(|q| q.2).min();
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
                    if let Some((i, url)) = got
                        && !queue.iter().any(|q| q.0 == i)
                    {
                        let at = Instant::now() + tuning.reconnect_min;
                        queue.push((i, url, at, tuning.reconnect_min));
                    }
                    let now = Instant::now();
                    let mut k = 0;
                    while k < queue.len() {
                        if queue[k].2 > now {
                            k += 1;
                            continue;
                        }
                        match BroadcastConnection::connect_timeout(
                            &queue[k].1,
                            tuning.connect_timeout,
                        ) {
                            Ok(conn) => {
                                let (i, ..) = queue.swap_remove(k);
                                if done_tx.send((i, conn)).is_err() {
                                    return;
                                }
                                let _ = waker.wake();
                            }
                            Err(e) => {
                                let q = &mut queue[k];
                                tracing::warn!(provider = q.0, error = %e, "provider redial failed");
                                q.3 = (q.3 * 2).min(tuning.reconnect_max);
                                q.2 = Instant::now() + q.3;
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
    blobs: Arc<BlobPool>,
    status: StatusSink,
    rec: BroadcastRecorders,
    stats: Arc<BroadcastStats>,
    /// Answers parked by `poll_responses` until they can be handled.
    answers: Vec<(u64, Result<B256, RpcErrorInfo>)>,
    /// Scratch: usable providers in rank order.
    order: Vec<usize>,
    kill: Arc<KillSwitch>,
    /// Signed transactions held by a kill switch, in arrival order (sent on unkill).
    held: VecDeque<TxMsg>,
    held_epoch: u64,
    /// Scratch for the release pass: accounts with an earlier transaction still held.
    blocked: Vec<bool>,
    /// Next time to look at heartbeats.
    next_heartbeat_check: Instant,
    resend_tx: Sender<TxMsg>,
    resend_rx: Receiver<TxMsg>,
}

impl BroadcastStage {
    /// A handle for sending already-signed transactions again (see [`Resend`]).
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
                    let _ = reconnect.requests.send((i, spec.ws_url.clone()));
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
            providers: list,
            poll,
            events: mio::Events::with_capacity(64),
            waker,
            reconnect,
            tuning,
            in_flight: HashMap::with_capacity(capacity),
            hedges: VecDeque::with_capacity(capacity),
            waiting: VecDeque::with_capacity(capacity),
            blobs,
            status,
            rec,
            stats,
            answers: Vec::with_capacity(capacity),
            order: Vec::with_capacity(MAX_PROVIDERS),
            kill,
            held: VecDeque::with_capacity(capacity),
            held_epoch: 0,
            blocked: vec![false; u16::MAX as usize + 1],
            next_heartbeat_check: Instant::now() + tuning.heartbeat_every,
        })
    }

    /// Transactions held by a kill switch right now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether every provider's venue is killed (nothing may be sent anywhere).
    fn all_venues_killed(&self) -> bool {
        self.providers
            .iter()
            .all(|p| self.kill.venue_killed(p.spec.venue))
    }

    fn must_hold(&self, m: &TxMsg) -> bool {
        self.kill.check(m.account.0, m.asset, None).is_some() || self.all_venues_killed()
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

    /// First handling of a signed transaction: to the best provider, or to all of them if
    /// urgent; a hedge timer for the rest.
    fn start(&mut self, msg: TxMsg) {
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
            waiting_since: None,
        };
        self.in_flight.insert(msg.seq, f);
        self.advance(msg.seq, false);
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
            match conn.send_raw_transaction(bytes, seq) {
                Ok(()) => {
                    let at = now_raw();
                    if f.sent_raw == 0 {
                        f.sent_raw = at;
                        self.rec.ws_to_wire.record(ticks_to_ns(f.first_raw, at));
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
        self.status.send(StatusMsg {
            tx_hash: f.tx_hash,
            route: Route::Public,
            venues: f.sent,
            ..StatusMsg::event(seq, f.origin, State::Broadcast, now)
        });
        // Hops: the intent's first stamp (for end-to-end time to inclusion) and when it was
        // first written to a provider. The raw transaction's slot goes along: the receipt
        // watcher keeps the bytes (to send them again if a reorg drops the transaction)
        // and releases the slot.
        let mut hops = Hops::starting_at(f.first_raw);
        hops.stamp(f.sent_raw);
        out.emit(TxMsg {
            seq,
            origin: f.origin,
            account: f.account,
            nonce: f.nonce,
            tx_hash: f.tx_hash,
            raw: f.raw,
            hops,
            ..TxMsg::default()
        });
    }

    fn finish_failed(&mut self, seq: u64, f: InFlight, reason: Reason, detail: &str) {
        self.in_flight.remove(&seq);
        self.blobs.release(f.raw);
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
            .send((i, self.providers[i].spec.ws_url.clone()));
        let bit = 1u32 << i;
        let mut orphans: Vec<u64> = Vec::new();
        for (seq, f) in &mut self.in_flight {
            if f.pending & bit != 0 {
                f.pending &= !bit;
                // Sent there but unanswered: it may still reach the chain through it, and
                // may be sent there again after the redial (idempotent by hash).
                f.sent &= !bit;
                if f.pending == 0 {
                    orphans.push(*seq);
                }
            }
        }
        for seq in orphans {
            self.stats.resends.fetch_add(1, Ordering::Relaxed);
            self.advance(seq, false);
        }
    }

    fn on_reconnected(&mut self) -> usize {
        let mut n = 0;
        while let Ok((i, mut conn)) = self.reconnect.done.try_recv() {
            if conn
                .register(self.poll.registry(), mio::Token(FIRST_PROVIDER + i))
                .is_err()
            {
                let _ = self
                    .reconnect
                    .requests
                    .send((i, self.providers[i].spec.ws_url.clone()));
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
                if let Some(f) = self.in_flight.get_mut(&seq) {
                    f.waiting_since = None;
                    self.advance(seq, false);
                }
            }
        }
        n
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
            if f.pending == 0 {
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
        }
        n
    }

    /// The earliest timer, for the park timeout.
    fn next_timer(&self) -> Instant {
        let mut t = self.next_heartbeat_check;
        if let Some(&(due, _)) = self.hedges.front() {
            t = t.min(due);
        }
        if let Some(f) = self.waiting.front().and_then(|s| self.in_flight.get(s))
            && let Some(since) = f.waiting_since
        {
            t = t.min(since + self.tuning.venue_wait);
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
            let heartbeat_answered = heartbeat_was_out && conn.heartbeat_waiting().is_none();
            if !answers.is_empty() || heartbeat_answered {
                self.providers[i].last_activity = Instant::now();
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
        let released = if !self.held.is_empty() && self.kill.epoch() != self.held_epoch {
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
        released + reconnected + resent + self.poll_answers(out) + self.timers()
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
