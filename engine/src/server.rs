//! The desk-facing side: one port for the WebSocket protocol (`/v1/ws`, JWT on the
//! upgrade) and the HTTP endpoints (`/health`, `/metrics`, `/v1/latency`).
//!
//! Each desk connection is a task on the desk I/O runtime. It decodes frames (off the hot
//! path), places calldata in a blob slot, and pushes a fixed-size intent into the intake
//! ring with `try_push`: a full ring is answered with `overloaded`, never queued.
//!
//! Replies go out through a bounded queue per connection (filled by the status thread
//! with `try_send`, so a desk never holds up the fan-out). A desk that stops reading is
//! disconnected with close code 1008 when its queue is full or when its socket takes no
//! bytes for [`WRITE_STALL`] while a reply waits; its intents go on in the pipeline.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Sink, SinkExt, StreamExt};
use http_body_util::Full as Body;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use hyper_util::rt::TokioIo;
use pipeline::{Full, Hops, LatencyRegistry, ManyToOneProducer, now_raw};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role as WsRole, WebSocketConfig};

use crate::auth::{JwtAuth, Principal, Principals, Role};
use crate::blob::{BlobPool, BlobRef};
use crate::limits::{ConnectionSlot, Limits};
use crate::msg::{IntentId, IntentMsg, Origin, StatusKind, StatusMsg};
use crate::protocol::{self, ErrorCode, Request, RequestError};
use crate::risk::RiskAdmin;
use crate::risk::approvals::ApprovalError;
use crate::stages::StatusSink;
use crate::stages::status::{ConnControl, Counters, Outbound};

/// Largest desk frame accepted.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Replies queued per connection before the desk counts as not reading.
pub const OUTBOUND_QUEUE: usize = 16 * 1024;
/// How long a desk's socket may take no bytes while a reply waits to be written before
/// the desk counts as not reading.
pub const WRITE_STALL: Duration = Duration::from_secs(10);
/// How long a close frame may wait for the socket before the connection is dropped.
const CLOSE_WAIT: Duration = Duration::from_millis(500);

/// Bounds on what a desk that does not read its replies may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowReader {
    /// Replies queued per connection; the status thread disconnects a desk whose queue
    /// is full.
    pub queue: usize,
    /// How long the socket may take no bytes while a reply waits to be written.
    pub stall: Duration,
}

impl Default for SlowReader {
    fn default() -> Self {
        Self {
            queue: OUTBOUND_QUEUE,
            stall: WRITE_STALL,
        }
    }
}

/// Liveness as `/health` reports it.
#[derive(Debug, Default)]
pub struct Health {
    /// Set once the pipeline failed; holds why.
    pub failure: Mutex<Option<String>>,
    /// Chain id of the node.
    pub chain_id: u64,
    /// Set when the engine is stopping.
    pub stopping: AtomicBool,
    /// The broadcast stage's provider counters.
    pub broadcast: Option<Arc<crate::stages::broadcast::BroadcastStats>>,
    /// The receipts stage's counters (head subscription, reorgs).
    pub receipts: Option<Arc<crate::stages::receipts::ReceiptsStats>>,
    /// The write-ahead journal, when configured.
    pub journal: Option<crate::journal::Journal>,
    /// The staking threads' counters, when `[staking]` is configured.
    pub staking: Option<crate::staking::StakingStats>,
    /// The pipeline's rings, named after the stage that consumes each, for the
    /// `engine_queue_depth` gauges.
    pub rings: Vec<(&'static str, pipeline::RingProbe)>,
}

/// Everything a connection task needs; shared read-only (plus lock-free handles).
pub struct ServerCtx {
    /// Token verifier.
    pub auth: JwtAuth,
    /// Frame rates and connection caps per connection and principal.
    pub limits: Arc<Limits>,
    /// TLS handshakes that failed (wrong version, no or a wrong client certificate).
    pub tls_handshake_failures: std::sync::atomic::AtomicU64,
    /// Producer side of the intake ring.
    pub intake: ManyToOneProducer<IntentMsg>,
    /// Producer side of the status ring (for `status` queries).
    pub status: StatusSink,
    /// Connection notices for the status thread.
    pub control: crossbeam_channel::Sender<ConnControl>,
    /// Calldata slots.
    pub blobs: Arc<BlobPool>,
    /// Account name → index.
    pub accounts: HashMap<String, u16>,
    /// Latency histograms.
    pub latency: LatencyRegistry,
    /// Event counters.
    pub counters: Arc<Counters>,
    /// Health.
    pub health: Arc<Health>,
    /// Principal interner (shared with the risk engine and the audit writer).
    pub principals: Arc<Principals>,
    /// The risk engine's admin side (policy reloads, kill switch, approvals).
    pub risk: Arc<RiskAdmin>,
    /// Custody of each account, for `/metrics` and `/health`.
    pub custody: Arc<crate::custody::CustodyView>,
    /// Outbound queue size and write stall limit of every desk connection.
    pub slow_reader: SlowReader,
    /// The SLO monitor's feed and state (`/dashboard`, `/v1/slo`).
    pub monitor: Arc<crate::monitor::MonitorShared>,
    next_conn: AtomicU32,
}

impl std::fmt::Debug for ServerCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCtx").finish_non_exhaustive()
    }
}

impl ServerCtx {
    /// Builds the context.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        auth: JwtAuth,
        limits: Arc<Limits>,
        intake: ManyToOneProducer<IntentMsg>,
        status: StatusSink,
        control: crossbeam_channel::Sender<ConnControl>,
        blobs: Arc<BlobPool>,
        accounts: HashMap<String, u16>,
        latency: LatencyRegistry,
        counters: Arc<Counters>,
        health: Arc<Health>,
        principals: Arc<Principals>,
        risk: Arc<RiskAdmin>,
        custody: Arc<crate::custody::CustodyView>,
    ) -> Self {
        Self {
            auth,
            limits,
            tls_handshake_failures: std::sync::atomic::AtomicU64::new(0),
            intake,
            status,
            control,
            blobs,
            accounts,
            latency,
            counters,
            health,
            principals,
            risk,
            custody,
            slow_reader: SlowReader::default(),
            monitor: crate::monitor::MonitorShared::new(&crate::monitor::SloConfig::default()),
            next_conn: AtomicU32::new(1),
        }
    }

    /// Interns a principal name (once per connection, never per message).
    fn principal_id(&self, sub: &str) -> u32 {
        self.principals.intern(sub)
    }
}

/// Accepts connections until `stop` flips; with `tls`, each one does its TLS handshake
/// first (on its own task), and one that fails it is closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Arc<ServerCtx>,
    tls: Option<Arc<crate::tls::TlsReloader>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let ctx = Arc::clone(&ctx);
                let stop = stop.clone();
                match &tls {
                    None => {
                        tokio::spawn(serve_connection(stream, ctx, stop));
                    }
                    Some(tls) => {
                        let acceptor = tls.acceptor();
                        tokio::spawn(async move {
                            match acceptor.accept(stream).await {
                                Ok(s) => serve_connection(s, ctx, stop).await,
                                Err(e) => {
                                    ctx.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
                                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                                }
                            }
                        });
                    }
                }
            }
        }
    }
}

/// HTTP/1.1 (with the WebSocket upgrade) on one accepted connection, plain or TLS.
async fn serve_connection<IO>(io: IO, ctx: Arc<ServerCtx>, stop: watch::Receiver<bool>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        let stop = stop.clone();
        async move { Ok::<_, Infallible>(route(req, ctx, stop)) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await;
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Body<Bytes>> {
    let mut r = Response::new(Body::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, v: Value) -> Response<Body<Bytes>> {
    respond(status, "application/json", v.to_string())
}

fn route(
    req: HttpRequest<Incoming>,
    ctx: Arc<ServerCtx>,
    stop: watch::Receiver<bool>,
) -> Response<Body<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => health(&ctx),
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::metrics::prometheus(&ctx.latency, &ctx.counters)
                + &crate::metrics::queues_prometheus(&queue_depths(&ctx))
                + &crate::metrics::limits_prometheus(&ctx.limits, &ctx.tls_handshake_failures)
                + &crate::metrics::risk_prometheus(&ctx.risk)
                + &ctx.custody.prometheus()
                + &ctx
                    .health
                    .broadcast
                    .as_deref()
                    .map(crate::metrics::broadcast_prometheus)
                    .unwrap_or_default()
                + &ctx
                    .health
                    .receipts
                    .as_deref()
                    .map(crate::metrics::receipts_prometheus)
                    .unwrap_or_default()
                + &ctx
                    .health
                    .journal
                    .as_ref()
                    .map(|j| crate::metrics::journal_prometheus(&j.stats()))
                    .unwrap_or_default()
                + &ctx
                    .health
                    .staking
                    .as_ref()
                    .map(crate::metrics::staking_prometheus)
                    .unwrap_or_default()
                + &ctx.monitor.prometheus(),
        ),
        (&Method::GET, "/v1/slo") => json_response(StatusCode::OK, ctx.monitor.slo_json()),
        (&Method::GET, "/dashboard") => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            DASHBOARD_HTML.to_owned(),
        ),
        (&Method::GET, "/v1/dashboard/feed") => dashboard_feed(req, ctx, stop),
        (&Method::GET, "/v1/latency") => {
            json_response(StatusCode::OK, crate::metrics::latency_json(&ctx.latency))
        }
        (&Method::GET, "/v1/ws") => upgrade(req, ctx, stop),
        (
            _,
            "/health" | "/metrics" | "/v1/latency" | "/v1/ws" | "/v1/slo" | "/dashboard"
            | "/v1/dashboard/feed",
        ) => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method not allowed"}),
        ),
        _ => json_response(StatusCode::NOT_FOUND, json!({"error": "not found"})),
    }
}

/// `(queue, depth, capacity)` of every queue `/metrics` reports: the pipeline's rings,
/// the audit channel, the async signers' outstanding requests.
pub(crate) fn queue_depths(ctx: &ServerCtx) -> Vec<(&'static str, usize, usize)> {
    let mut q: Vec<_> = ctx
        .health
        .rings
        .iter()
        .map(|(name, p)| (*name, p.len(), p.capacity()))
        .collect();
    q.push(("audit", ctx.risk.audit.queued(), ctx.risk.audit.capacity()));
    if let Some(w) = &ctx.custody.worker {
        q.push(("async_sign", w.outstanding(), w.capacity()));
    }
    q
}

fn health(ctx: &ServerCtx) -> Response<Body<Bytes>> {
    let failure = ctx
        .health
        .failure
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let stopping = ctx.health.stopping.load(Ordering::Relaxed);
    let (code, status) = match (&failure, stopping) {
        (Some(_), _) => (StatusCode::SERVICE_UNAVAILABLE, "failed"),
        (None, true) => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
        (None, false) => (StatusCode::OK, "ok"),
    };
    json_response(
        code,
        json!({
            "status": status,
            "failure": failure,
            "chain_id": ctx.health.chain_id,
            "intake_capacity": ctx.intake.capacity(),
            "policy_version": ctx.risk.control.active_version(),
            "kill_switches": ctx.risk.kill.active(&ctx.risk.account_names),
            "pending_approvals": ctx.risk.approvals.pending().len(),
            "blob_slots_free": ctx.blobs.available(),
            "signers": ctx.custody.health_json(),
            "providers": ctx.health.broadcast.as_deref().map(crate::metrics::broadcast_json),
            "relays": ctx.health.broadcast.as_deref().map(crate::metrics::relays_json),
            "head": ctx.health.receipts.as_deref().map(|r| json!({
                "subscribed": r.subscribed.load(Ordering::Relaxed),
                "number": r.head.load(Ordering::Relaxed),
                "resubscribes": r.resubscribes.load(Ordering::Relaxed),
                "reorgs": r.reorgs.load(Ordering::Relaxed),
            })),
        }),
    )
}

fn unauthorized(message: String) -> Response<Body<Bytes>> {
    let mut r = json_response(
        StatusCode::UNAUTHORIZED,
        json!({"error": "unauthorized", "message": message}),
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// The dashboard page (self-contained: no asset is fetched from anywhere else).
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// The checks of a WebSocket upgrade request: the `Sec-WebSocket-Accept` value, or what
/// is wrong with it.
fn websocket_accept(h: &hyper::HeaderMap) -> Result<String, &'static str> {
    let is_upgrade = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version_ok = h
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let Some(key) = h.get(header::SEC_WEBSOCKET_KEY) else {
        return Err("missing Sec-WebSocket-Key");
    };
    if !is_upgrade || !version_ok {
        return Err("expected a WebSocket (version 13) upgrade");
    }
    Ok(derive_accept_key(key.as_bytes()))
}

fn bad_upgrade(message: &str) -> Response<Body<Bytes>> {
    json_response(
        StatusCode::BAD_REQUEST,
        json!({"error": "bad_request", "message": message}),
    )
}

fn switching_protocols(accept: &str) -> Response<Body<Bytes>> {
    let mut r = Response::new(Body::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let hs = r.headers_mut();
    hs.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    hs.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(accept) {
        hs.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// `/v1/dashboard/feed`: the monitor's ticks and SLO events as WebSocket text frames
/// (read-only; the same data as `/metrics`, so no token, like `/metrics`). At most
/// [`crate::monitor::MAX_FEED_CLIENTS`] at once.
fn dashboard_feed(
    mut req: HttpRequest<Incoming>,
    ctx: Arc<ServerCtx>,
    mut stop: watch::Receiver<bool>,
) -> Response<Body<Bytes>> {
    let accept = match websocket_accept(req.headers()) {
        Ok(a) => a,
        Err(m) => return bad_upgrade(m),
    };
    let clients = &ctx.monitor.feed_clients;
    if clients.fetch_add(1, Ordering::Relaxed) >= crate::monitor::MAX_FEED_CLIENTS {
        clients.fetch_sub(1, Ordering::Relaxed);
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "too_many_connections", "message": format!("at most {} dashboard feeds at once", crate::monitor::MAX_FEED_CLIENTS)}),
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let mut ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), WsRole::Server, None)
                    .await;
            let (hello, mut rx) = ctx.monitor.subscribe();
            if ws.send(Message::text(hello)).await.is_ok() {
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        got = rx.recv() => match got {
                            Ok(frame) => {
                                if ws.send(Message::text(frame.to_string())).await.is_err() {
                                    break;
                                }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                let note = json!({"type": "lagged", "missed": n}).to_string();
                                if ws.send(Message::text(note)).await.is_err() {
                                    break;
                                }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                        },
                        incoming = ws.next() => match incoming {
                            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                            Some(Ok(_)) => {}
                        },
                    }
                }
                let _ = ws.close(None).await;
            }
        }
        ctx.monitor.feed_clients.fetch_sub(1, Ordering::Relaxed);
    });
    switching_protocols(&accept)
}

fn upgrade(
    mut req: HttpRequest<Incoming>,
    ctx: Arc<ServerCtx>,
    stop: watch::Receiver<bool>,
) -> Response<Body<Bytes>> {
    let h = req.headers();
    let principal = match ctx
        .auth
        .verify_header(h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))
    {
        Ok(p) => p,
        Err(e) => return unauthorized(e.to_string()),
    };
    let accept = match websocket_accept(h) {
        Ok(a) => a,
        Err(m) => return bad_upgrade(m),
    };
    let slot = match ctx.limits.open(&principal.sub) {
        Ok(s) => s,
        Err(e) => {
            return json_response(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"error": "too_many_connections", "message": e.to_string()}),
            );
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        session(TokioIo::new(upgraded), principal, slot, ctx, stop).await;
    });
    switching_protocols(&accept)
}

/// `req` tokens waiting for the reply to a submit or a status query, per intent id.
#[derive(Default)]
struct PendingReqs {
    submit: HashMap<IntentId, VecDeque<Option<String>>>,
    status: HashMap<IntentId, VecDeque<Option<String>>>,
    cancel: HashMap<IntentId, VecDeque<Option<String>>>,
}

impl PendingReqs {
    fn push(
        map: &mut HashMap<IntentId, VecDeque<Option<String>>>,
        id: IntentId,
        req: Option<String>,
    ) {
        map.entry(id).or_default().push_back(req);
    }
    fn pop(map: &mut HashMap<IntentId, VecDeque<Option<String>>>, id: &IntentId) -> Option<String> {
        let q = map.get_mut(id)?;
        let r = q.pop_front().flatten();
        if q.is_empty() {
            map.remove(id);
        }
        r
    }
    fn unpush(map: &mut HashMap<IntentId, VecDeque<Option<String>>>, id: &IntentId) {
        if let Some(q) = map.get_mut(id) {
            q.pop_back();
            if q.is_empty() {
                map.remove(id);
            }
        }
    }
}

/// A desk's byte stream, counting the bytes the socket took (the session's measure of
/// write progress).
struct Metered<S> {
    io: S,
    written: Arc<AtomicU64>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The desk closed the connection, or the socket failed.
    Gone,
    /// The engine is stopping.
    Stopping,
    /// The status thread found the outbound queue full and dropped its side of it.
    QueueFull,
    /// The socket took no bytes for the stall limit while a reply waited.
    Stalled,
}

/// The write side of a session: every frame goes out through [`Writer::write`], which
/// gives up when the socket stops taking bytes.
struct Writer<K> {
    sink: K,
    written: Arc<AtomicU64>,
    stall: Duration,
}

impl<K: Sink<Message> + Unpin> Writer<K> {
    /// Writes and flushes `frames`. Every `stall / 4` (at most 250 ms) of waiting it
    /// looks at the socket's byte count, the outbound queue and `stop`: `Stalled` when no
    /// byte was taken for `stall`, `QueueFull` when the status thread dropped the queue,
    /// `Stopping` when the engine stops, `Gone` when the socket failed.
    async fn write(
        &mut self,
        frames: Vec<String>,
        rx: &mpsc::Receiver<Outbound>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), End> {
        let tick = (self.stall / 4).min(Duration::from_millis(250));
        let stall = self.stall;
        let written = Arc::clone(&self.written);
        let sink = &mut self.sink;
        let io = async move {
            for text in frames {
                sink.feed(Message::text(text)).await?;
            }
            sink.flush().await
        };
        tokio::pin!(io);
        let mut seen = written.load(Ordering::Relaxed);
        let mut progressed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                r = &mut io => return r.map_err(|_| End::Gone),
                _ = stop.changed() => return Err(End::Stopping),
                () = tokio::time::sleep(tick) => {
                    let now = written.load(Ordering::Relaxed);
                    if now != seen {
                        seen = now;
                        progressed = tokio::time::Instant::now();
                    } else if progressed.elapsed() >= stall {
                        return Err(End::Stalled);
                    }
                    if rx.is_closed() {
                        return Err(End::QueueFull);
                    }
                }
            }
        }
    }

    /// Sends a close frame, waiting at most [`CLOSE_WAIT`] for the socket.
    async fn close(&mut self, code: u16, reason: String) {
        let frame = Message::Close(Some(CloseFrame {
            code: code.into(),
            reason: reason.into(),
        }));
        let _ = tokio::time::timeout(CLOSE_WAIT, self.sink.send(frame)).await;
    }
}

async fn session<S>(
    io: S,
    principal: Principal,
    slot: ConnectionSlot,
    ctx: Arc<ServerCtx>,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let conn = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let origin = Origin {
        conn,
        principal: ctx.principal_id(&principal.sub),
    };
    let written = Arc::new(AtomicU64::new(0));
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    let io = Metered {
        io,
        written: Arc::clone(&written),
    };
    let ws = WebSocketStream::from_raw_socket(io, WsRole::Server, Some(cfg)).await;
    let limits = ctx.slow_reader;
    let (tx, mut rx) = mpsc::channel(limits.queue.max(1));
    if ctx.control.send(ConnControl::Open { conn, tx }).is_err() {
        return;
    }
    let (sink, mut stream) = ws.split();
    let mut out = Writer {
        sink,
        written,
        stall: limits.stall,
    };
    let mut reqs = PendingReqs::default();
    let end = loop {
        if *stop.borrow() {
            break End::Stopping;
        }
        if rx.is_closed() {
            // Dropped by the status thread: the queue was full.
            break End::QueueFull;
        }
        let frames = tokio::select! {
            biased;
            _ = stop.changed() => break End::Stopping,
            out = rx.recv() => {
                let Some(out) = out else { break End::QueueFull };
                render(out, &mut reqs)
            }
            frame = stream.next() => {
                let t_raw = now_raw();
                // Over a rate: the frame is not processed; the desk is told which one.
                let limited = match &frame {
                    Some(Ok(Message::Text(_) | Message::Binary(_))) => slot.check_frame().err(),
                    _ => None,
                };
                let reply = if let Some(e) = limited {
                    let (req, id) = match &frame {
                        Some(Ok(Message::Text(t))) => protocol::peek_context(t.as_str()),
                        _ => (None, None),
                    };
                    Some(RequestError::new(ErrorCode::RateLimited, e.to_string())
                        .with_context(req.as_deref(), id.as_deref())
                        .to_json())
                } else { match frame {
                    Some(Ok(Message::Text(t))) => handle_text(t.as_str(), t_raw, origin, &principal, &ctx, &mut reqs),
                    Some(Ok(Message::Binary(_))) => Some(RequestError::new(
                        ErrorCode::BadRequest,
                        "frame: binary frames are not accepted; send one JSON object per text frame",
                    ).to_json()),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break End::Gone,
                    Some(Ok(_)) => None, // ping/pong are answered by the WebSocket layer
                } };
                reply.into_iter().collect()
            }
        };
        if frames.is_empty() {
            continue;
        }
        if let Err(end) = out.write(frames, &rx, &mut stop).await {
            break end;
        }
    };
    // The status thread stops routing to this connection before its queue is dropped.
    let _ = ctx.control.send(ConnControl::Close { conn });
    match end {
        End::Gone => {}
        End::Stopping => out.close(1001, "engine stopping".into()).await,
        End::QueueFull => {
            tracing::info!(
                conn,
                principal = %principal.sub,
                queued = limits.queue,
                "desk disconnected: its outbound queue is full"
            );
            out.close(
                1008,
                format!(
                    "replies not read fast enough ({} queued); reconnect and use status",
                    limits.queue
                ),
            )
            .await;
        }
        End::Stalled => {
            // The status thread counts the queue-full case; this one is counted here.
            ctx.counters.slow_desks.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                conn,
                principal = %principal.sub,
                stall_ms = limits.stall.as_millis() as u64,
                "desk disconnected: its socket took no bytes while replies waited"
            );
            out.close(
                1008,
                format!(
                    "replies not read: the socket took no bytes for {} ms; reconnect and use status",
                    limits.stall.as_millis()
                ),
            )
            .await;
        }
    }
}

/// Handles one text frame; returns an immediate reply, if any (acks and events come later
/// from the status thread).
fn handle_text(
    text: &str,
    t_raw: u64,
    origin: Origin,
    principal: &Principal,
    ctx: &ServerCtx,
    reqs: &mut PendingReqs,
) -> Option<String> {
    let request = match protocol::decode(text) {
        Ok(r) => r,
        Err(e) => return Some(e.to_json()),
    };
    match request {
        Request::Ping { req } => Some(protocol::pong(req.as_deref())),
        Request::NotSupported { req, op } => Some(
            RequestError::new(
                ErrorCode::NotSupported,
                format!("op `{op}` is not offered by this engine yet"),
            )
            .with_context(req.as_deref(), None)
            .to_json(),
        ),
        Request::Approve { req, id, submitter } => {
            if !principal.roles.has(Role::Approver) {
                return Some(forbidden("approve", req.as_deref(), Some(id.as_str())));
            }
            let sub = match submitter.as_deref().map(|s| ctx.principals.lookup(s)) {
                Some(None) => {
                    return Some(approval_error(ApprovalError::NotFound, req.as_deref(), &id));
                }
                other => other.flatten(),
            };
            Some(
                match ctx.risk.approvals.approve(&id, sub, origin.principal) {
                    Ok(a) => protocol::with_req(
                        json!({"op": "ok", "of": "approve", "id": id.as_str(), "seq": a.seq,
                               "remaining": a.remaining}),
                        req.as_deref(),
                    ),
                    Err(e) => approval_error(e, req.as_deref(), &id),
                },
            )
        }
        Request::Reject {
            req,
            id,
            reason,
            submitter,
        } => {
            if !principal.roles.has(Role::Approver) {
                return Some(forbidden("reject", req.as_deref(), Some(id.as_str())));
            }
            let sub = match submitter.as_deref().map(|s| ctx.principals.lookup(s)) {
                Some(None) => {
                    return Some(approval_error(ApprovalError::NotFound, req.as_deref(), &id));
                }
                other => other.flatten(),
            };
            Some(
                match ctx
                    .risk
                    .approvals
                    .reject(&id, sub, origin.principal, &reason)
                {
                    Ok(seq) => protocol::with_req(
                        json!({"op": "ok", "of": "reject", "id": id.as_str(), "seq": seq}),
                        req.as_deref(),
                    ),
                    Err(e) => approval_error(e, req.as_deref(), &id),
                },
            )
        }
        Request::Pending { req } => {
            if !(principal.roles.has(Role::Approver)
                || principal.roles.has(Role::Admin)
                || principal.roles.has(Role::Auditor))
            {
                return Some(forbidden("pending", req.as_deref(), None));
            }
            let rows: Vec<Value> = ctx
                .risk
                .approvals
                .pending()
                .into_iter()
                .map(|r| {
                    json!({
                        "id": r.msg.id.as_str(),
                        "seq": r.msg.seq,
                        "submitter": ctx.principals.name(r.msg.origin.principal),
                        "account": ctx.risk.account_names.get(r.msg.account.0 as usize),
                        "to": r.msg.to,
                        "value_wei": r.msg.value.to_string(),
                        "why": r.why,
                        "policy_version": r.msg.policy_version,
                        "expires_in_ms": r.expires_in.as_millis() as u64,
                    })
                })
                .collect();
            Some(protocol::with_req(
                json!({"op": "pending", "intents": rows}),
                req.as_deref(),
            ))
        }
        Request::Kill { req, scope, on } => {
            let op = if on { "kill" } else { "unkill" };
            if !principal.roles.has(Role::Admin) {
                return Some(forbidden(op, req.as_deref(), None));
            }
            Some(match ctx.risk.set_kill(&scope, on, origin.principal) {
                Ok(active) => protocol::with_req(
                    json!({"op": "ok", "of": op, "active": active}),
                    req.as_deref(),
                ),
                Err(message) => {
                    RequestError::new(ErrorCode::BadRequest, format!("scope: {message}"))
                        .with_context(req.as_deref(), None)
                        .to_json()
                }
            })
        }
        Request::ReloadPolicy { req } => {
            if !principal.roles.has(Role::Admin) {
                return Some(forbidden("reload_policy", req.as_deref(), None));
            }
            Some(match ctx.risk.reload(origin.principal) {
                Ok(l) => protocol::with_req(
                    json!({"op": "ok", "of": "reload_policy", "policy_version": l.version,
                           "label": l.label, "digest": l.digest}),
                    req.as_deref(),
                ),
                Err(e) => RequestError::new(ErrorCode::BadRequest, format!("policy: {e}"))
                    .with_context(req.as_deref(), None)
                    .to_json(),
            })
        }
        Request::Cancel { req, id } => {
            if !principal.roles.has(Role::Trader) {
                return Some(forbidden("cancel", req.as_deref(), Some(id.as_str())));
            }
            ask_status(ctx, &mut reqs.cancel, StatusKind::Cancel, origin, id, req)
        }
        Request::Status { req, id } => {
            if !(principal.roles.has(Role::Trader)
                || principal.roles.has(Role::Auditor)
                || principal.roles.has(Role::Approver)
                || principal.roles.has(Role::Admin))
            {
                return Some(forbidden("status", req.as_deref(), Some(id.as_str())));
            }
            ask_status(ctx, &mut reqs.status, StatusKind::Query, origin, id, req)
        }
        Request::Submit { req, intent } => {
            ctx.counters.received.fetch_add(1, Ordering::Relaxed);
            let id_s = intent.id.as_str();
            if !principal.roles.has(Role::Trader) {
                return Some(forbidden("submit", req.as_deref(), Some(id_s)));
            }
            let data = if intent.data.is_empty() {
                BlobRef::NONE
            } else {
                match ctx.blobs.claim_with(&intent.data) {
                    Some(b) => b,
                    None => {
                        return Some(
                            RequestError::new(
                                ErrorCode::Overloaded,
                                "engine buffers are full; retry later",
                            )
                            .with_context(req.as_deref(), Some(id_s))
                            .to_json(),
                        );
                    }
                }
            };
            let mut hops = Hops::default();
            hops.stamp(t_raw);
            let msg = IntentMsg {
                seq: 0,
                origin,
                data,
                hops,
                ..intent.to_msg(&ctx.accounts)
            };
            PendingReqs::push(&mut reqs.submit, intent.id, req.clone());
            match ctx.intake.try_push(msg) {
                Ok(()) => None,
                Err(Full(m)) => {
                    ctx.blobs.release(m.data);
                    PendingReqs::unpush(&mut reqs.submit, &intent.id);
                    Some(
                        RequestError::new(
                            ErrorCode::Overloaded,
                            "intake ring is full; the intent was not accepted, retry later",
                        )
                        .with_context(req.as_deref(), Some(id_s))
                        .to_json(),
                    )
                }
            }
        }
    }
}

fn approval_error(e: ApprovalError, req: Option<&str>, id: &IntentId) -> String {
    let code = match e {
        ApprovalError::NotFound => ErrorCode::NotFound,
        ApprovalError::SelfApproval | ApprovalError::AlreadyApproved => ErrorCode::Forbidden,
        ApprovalError::Ambiguous => ErrorCode::BadRequest,
        ApprovalError::Overloaded => ErrorCode::Overloaded,
    };
    RequestError::new(code, e.to_string())
        .with_context(req, Some(id.as_str()))
        .to_json()
}

fn forbidden(op: &str, req: Option<&str>, id: Option<&str>) -> String {
    RequestError::new(
        ErrorCode::Forbidden,
        format!("op `{op}` needs a role this principal does not have"),
    )
    .with_context(req, id)
    .to_json()
}

/// Hands a `status` or `cancel` request to the status thread, which answers on the
/// connection; `None` when it was taken, else the `overloaded` error frame.
fn ask_status(
    ctx: &ServerCtx,
    pending: &mut HashMap<IntentId, VecDeque<Option<String>>>,
    kind: StatusKind,
    origin: Origin,
    id: IntentId,
    req: Option<String>,
) -> Option<String> {
    PendingReqs::push(pending, id, req.clone());
    let q = StatusMsg {
        kind,
        origin,
        id,
        ..StatusMsg::default()
    };
    if ctx.status.try_send(q) {
        return None;
    }
    PendingReqs::unpush(pending, &id);
    Some(
        RequestError::new(ErrorCode::Overloaded, "status queue is full; retry")
            .with_context(req.as_deref(), Some(id.as_str()))
            .to_json(),
    )
}

/// Turns what the status thread sent into frames, echoing the `req` of the request that
/// caused it.
fn render(out: Outbound, reqs: &mut PendingReqs) -> Vec<String> {
    match out {
        Outbound::Ack { id, seq } => {
            let req = PendingReqs::pop(&mut reqs.submit, &id);
            vec![protocol::ack(id.as_str(), seq, req.as_deref())]
        }
        Outbound::Event(text) => vec![text],
        Outbound::Duplicate { id, seq, latest } => {
            let req = PendingReqs::pop(&mut reqs.submit, &id);
            let ack = protocol::with_req(
                json!({"op": "ack", "id": id.as_str(), "seq": seq, "duplicate": true}),
                req.as_deref(),
            );
            let mut v = vec![ack];
            v.extend(latest);
            v
        }
        Outbound::CancelReply { id, outcome } => {
            let req = PendingReqs::pop(&mut reqs.cancel, &id);
            match outcome {
                Ok(seq) => vec![protocol::with_req(
                    json!({"op": "ok", "of": "cancel", "id": id.as_str(), "seq": seq}),
                    req.as_deref(),
                )],
                Err((unknown, why)) => vec![
                    RequestError::new(
                        if unknown {
                            ErrorCode::NotFound
                        } else {
                            ErrorCode::Conflict
                        },
                        why,
                    )
                    .with_context(req.as_deref(), Some(id.as_str()))
                    .to_json(),
                ],
            }
        }
        Outbound::Refused { id, message } => {
            let req = PendingReqs::pop(&mut reqs.submit, &id);
            vec![
                RequestError::new(ErrorCode::Unavailable, message.as_str())
                    .with_context(req.as_deref(), Some(id.as_str()))
                    .to_json(),
            ]
        }
        Outbound::StatusReply {
            id,
            latest,
            known,
            seq,
        } => {
            let req = PendingReqs::pop(&mut reqs.status, &id);
            match (latest, known) {
                (Some(text), _) => {
                    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    vec![protocol::with_req(v, req.as_deref())]
                }
                (None, true) => vec![protocol::ack(id.as_str(), seq, req.as_deref())],
                (None, false) => vec![
                    RequestError::new(ErrorCode::NotFound, "no intent with this id")
                        .with_context(req.as_deref(), Some(id.as_str()))
                        .to_json(),
                ],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Roles;
    use pipeline::many_to_one;

    fn ctx(
        intake_capacity: usize,
        blobs: usize,
    ) -> (Arc<ServerCtx>, pipeline::ManyToOneConsumer<IntentMsg>) {
        let (ctx, intake_rx, _control_rx) = ctx_with(intake_capacity, blobs, SlowReader::default());
        (ctx, intake_rx)
    }

    /// A context whose connections have the bounds `slow`, with the receiving end of its
    /// connection notices.
    fn ctx_with(
        intake_capacity: usize,
        blobs: usize,
        slow: SlowReader,
    ) -> (
        Arc<ServerCtx>,
        pipeline::ManyToOneConsumer<IntentMsg>,
        crossbeam_channel::Receiver<ConnControl>,
    ) {
        let (intake, intake_rx) = many_to_one::<IntentMsg>(intake_capacity);
        let (status, _status_rx) = many_to_one::<StatusMsg>(4);
        let (control, control_rx) = crossbeam_channel::unbounded();
        let status = StatusSink::new(status, Arc::new(AtomicBool::new(false)));
        let blobs = Arc::new(BlobPool::new(blobs));
        let principals = Arc::new(Principals::default());
        let cfg = crate::dev::dev_config(
            "ws://127.0.0.1:1",
            "127.0.0.1:0".parse().unwrap(),
            "0123456789abcdef0123".into(),
        );
        let parts = crate::risk::assemble(
            &cfg,
            intake.clone(),
            status.clone(),
            Arc::clone(&blobs),
            Arc::clone(&principals),
            None,
        )
        .unwrap();
        let mut ctx = ServerCtx::new(
            JwtAuth::new(b"0123456789abcdef0123"),
            Arc::new(Limits::new(crate::limits::LimitsConfig::default())),
            intake,
            status,
            control,
            blobs,
            HashMap::from([("dev0".to_owned(), 0u16)]),
            LatencyRegistry::new(),
            Arc::new(Counters::default()),
            Arc::new(Health::default()),
            principals,
            parts.admin,
            Arc::new(crate::custody::CustodyView {
                accounts: Vec::new(),
                worker: None,
            }),
        );
        ctx.slow_reader = slow;
        (Arc::new(ctx), intake_rx, control_rx)
    }

    fn call(i: usize) -> String {
        format!(
            r#"{{"op":"submit","req":"r{i}","intent":{{"id":"o-{i}","account":"dev0","kind":"call","to":"0x9965507d1a55bcc2695c58ba16fb37d819b0a4dc","data":"0x01","gas_limit":50000}}}}"#
        )
    }

    #[test]
    fn a_full_intake_ring_is_answered_overloaded_and_nothing_leaks() {
        let (ctx, mut rx) = ctx(2, 8);
        let trader = Principal {
            sub: "t".into(),
            roles: Roles::all(),
        };
        let origin = Origin {
            conn: 1,
            principal: 1,
        };
        let mut reqs = PendingReqs::default();
        assert_eq!(
            handle_text(&call(0), 1, origin, &trader, &ctx, &mut reqs),
            None
        );
        assert_eq!(
            handle_text(&call(1), 1, origin, &trader, &ctx, &mut reqs),
            None
        );
        let reply = handle_text(&call(2), 1, origin, &trader, &ctx, &mut reqs).expect("a reply");
        let v: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(v["code"], "overloaded");
        assert_eq!(v["id"], "o-2");
        assert_eq!(v["req"], "r2");
        // The refused intent's calldata slot went back; the accepted two hold theirs.
        assert_eq!(ctx.blobs.available(), 8 - 2);
        // The two accepted ones are intact, in order, with their hop stamp.
        let a = rx.pop().unwrap();
        let b = rx.pop().unwrap();
        assert_eq!((a.id.as_str(), b.id.as_str()), ("o-0", "o-1"));
        assert_eq!(a.hops.len(), 1);
        assert!(rx.pop().is_none());
        // Once there is room, the same desk is served again.
        assert_eq!(
            handle_text(&call(3), 1, origin, &trader, &ctx, &mut reqs),
            None
        );
    }

    #[test]
    fn exhausted_calldata_slots_are_overloaded_and_roles_are_checked() {
        let (ctx, _rx) = ctx(8, 1);
        let origin = Origin {
            conn: 1,
            principal: 1,
        };
        let mut reqs = PendingReqs::default();
        let trader = Principal {
            sub: "t".into(),
            roles: Roles::all(),
        };
        assert_eq!(
            handle_text(&call(0), 1, origin, &trader, &ctx, &mut reqs),
            None
        );
        let v: Value = serde_json::from_str(
            &handle_text(&call(1), 1, origin, &trader, &ctx, &mut reqs).unwrap(),
        )
        .unwrap();
        assert_eq!(v["code"], "overloaded");
        let auditor = Principal {
            sub: "a".into(),
            roles: Roles::default().with(Role::Auditor),
        };
        let v: Value = serde_json::from_str(
            &handle_text(&call(2), 1, origin, &auditor, &ctx, &mut reqs).unwrap(),
        )
        .unwrap();
        assert_eq!(v["code"], "forbidden");
    }
    /// Starts a session on one end of an in-memory pipe of `pipe` bytes; returns the
    /// desk's end, the session task and its queue (from its `Open` notice).
    async fn start_session(
        ctx: &Arc<ServerCtx>,
        control: &crossbeam_channel::Receiver<ConnControl>,
        pipe: usize,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<()>,
        u32,
        mpsc::Sender<Outbound>,
        watch::Sender<bool>,
    ) {
        let (server_io, desk_io) = tokio::io::duplex(pipe);
        let slot = ctx.limits.open("t").unwrap();
        let principal = Principal {
            sub: "t".into(),
            roles: Roles::all(),
        };
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(session(server_io, principal, slot, Arc::clone(ctx), stop));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match control.try_recv() {
                Ok(ConnControl::Open { conn, tx }) => return (desk_io, task, conn, tx, stop_tx),
                Ok(other) => panic!("unexpected notice {other:?}"),
                Err(_) => {
                    assert!(std::time::Instant::now() < deadline, "no Open notice");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    /// Reads everything the desk's end still holds, until the session's end is gone.
    async fn drain(mut desk_io: tokio::io::DuplexStream) -> usize {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), desk_io.read_to_end(&mut buf))
            .await
            .expect("the session's end of the pipe is closed")
            .unwrap();
        buf.len()
    }

    fn closed_conn(control: &crossbeam_channel::Receiver<ConnControl>) -> Option<u32> {
        control.try_iter().find_map(|c| match c {
            ConnControl::Close { conn } => Some(conn),
            _ => None,
        })
    }

    #[tokio::test]
    async fn a_socket_that_takes_no_bytes_is_closed_after_the_stall_limit_and_counted() {
        let slow = SlowReader {
            queue: 1024,
            stall: Duration::from_millis(300),
        };
        let (ctx, _intake, control) = ctx_with(8, 8, slow);
        let (desk_io, task, conn, tx, _stop) = start_session(&ctx, &control, 4096).await;
        // 64 KiB of replies into a 4 KiB pipe nobody reads.
        for i in 0..64 {
            tx.try_send(Outbound::Event(format!("{i:01024}"))).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the session ends on its own")
            .unwrap();
        assert_eq!(ctx.counters.slow_desks.load(Ordering::Relaxed), 1);
        assert_eq!(closed_conn(&control), Some(conn));
        // The queue was dropped with the session: nothing more can be queued for it.
        assert!(tx.try_send(Outbound::Event("late".into())).is_err());
        // The pipe holds what was written before the stall, then ends.
        let n = drain(desk_io).await;
        assert!((4096..64 * 1024).contains(&n), "{n} bytes");
    }

    #[tokio::test]
    async fn a_desk_reading_slowly_but_steadily_stays_connected() {
        use tokio::io::AsyncReadExt;
        let slow = SlowReader {
            queue: 1024,
            stall: Duration::from_millis(1500),
        };
        let (ctx, _intake, control) = ctx_with(8, 8, slow);
        let (mut desk_io, task, _conn, tx, _stop) = start_session(&ctx, &control, 1024).await;
        // 400 KiB queued; the desk reads 512 bytes every 10 ms (about 50 KiB/s), so the
        // socket is always full but never stuck for the stall limit.
        for i in 0..400 {
            tx.try_send(Outbound::Event(format!("{i:01024}"))).unwrap();
        }
        let mut buf = [0u8; 512];
        let mut read = 0usize;
        let until = tokio::time::Instant::now() + Duration::from_secs(4);
        while tokio::time::Instant::now() < until {
            read += desk_io.read(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!task.is_finished(), "a desk that reads is not disconnected");
        assert_eq!(ctx.counters.slow_desks.load(Ordering::Relaxed), 0);
        assert!(read > 4096, "{read} bytes read");
        drop(desk_io);
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the session ends when the desk goes")
            .unwrap();
        assert_eq!(ctx.counters.slow_desks.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn the_status_thread_drops_a_full_queue_without_waiting_and_the_desk_is_closed() {
        use crate::stages::status::StatusStage;
        use pipeline::{Emit, NoMessage, Stage};
        struct Nowhere;
        impl Emit<NoMessage> for Nowhere {
            fn emit(&mut self, _: NoMessage) {}
        }
        let slow = SlowReader {
            queue: 8,
            stall: Duration::from_secs(3600),
        };
        let (ctx, _intake, control) = ctx_with(8, 8, slow);
        let (stage_tx, stage_rx) = crossbeam_channel::unbounded();
        let mut stage = StatusStage::new(stage_rx, Vec::new(), Arc::clone(&ctx.counters));
        let (desk_io, task, conn, tx, _stop) = start_session(&ctx, &control, 1024).await;
        stage_tx.send(ConnControl::Open { conn, tx }).unwrap();
        // A second desk of the same principal that reads everything.
        let (other_tx, mut other_rx) = mpsc::channel(100_000);
        stage_tx
            .send(ConnControl::Open {
                conn: 99,
                tx: other_tx,
            })
            .unwrap();
        let ack = |conn: u32, seq: u64| StatusMsg {
            kind: StatusKind::Ack,
            seq,
            origin: Origin { conn, principal: 1 },
            id: IntentId::new(&format!("i-{seq}")).unwrap(),
            ..StatusMsg::default()
        };
        let mut seq = 0u64;
        let mut other = 0usize;
        while ctx.counters.slow_desks.load(Ordering::Relaxed) == 0 {
            assert!(seq < 100_000, "the queue never filled");
            for _ in 0..8 {
                seq += 1;
                stage.on_message(ack(conn, seq), &mut Nowhere);
                seq += 1;
                stage.on_message(ack(99, seq), &mut Nowhere);
                other += 1;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The stage goes on at once: the slow desk's replies are dropped, the other desk's
        // are delivered.
        for _ in 0..1000 {
            seq += 1;
            stage.on_message(ack(conn, seq), &mut Nowhere);
            seq += 1;
            stage.on_message(ack(99, seq), &mut Nowhere);
            other += 1;
        }
        let mut got = 0usize;
        while let Ok(o) = other_rx.try_recv() {
            assert!(matches!(o, Outbound::Ack { .. }));
            got += 1;
        }
        assert_eq!(got, other, "every reply of the reading desk arrived");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the session sees its queue dropped and ends")
            .unwrap();
        assert_eq!(closed_conn(&control), Some(conn));
        assert_eq!(ctx.counters.slow_desks.load(Ordering::Relaxed), 1);
        drain(desk_io).await;
    }
}
