//! A tokio-only baseline of the engine's pipeline, for comparison only.
//!
//! This is the simplest design a desk could build on its own for the same job: one
//! multi-threaded tokio runtime (default worker threads) and plain tasks joined by bounded
//! `tokio::sync::mpsc` channels:
//!
//! ```text
//! desk ──WS──▶ connection task (serde_json decode) ──▶ intake/policy task (seq, idempotency,
//!   the engine's own risk rules) ──▶ signing task (nonce per account, EIP-1559 with alloy,
//!   libsecp256k1) ──▶ broadcast task (eth_sendRawTransaction over one node WebSocket)
//!   ──▶ reply task (the node's answers) ──▶ receipts task (newHeads subscription,
//!   eth_getBlockReceipts per head: included, confirmed)
//! ```
//!
//! It speaks the subset of the desk protocol the load generator uses (`submit`, `ping`;
//! `ack`, `event` with `accepted`, `rejected`, `signed`, `broadcast`, `included`,
//! `confirmed`, `failed`, and `error`), with the engine's field names and reason strings:
//! frames are decoded by the engine's own decoder (`engine::protocol::decode`), tokens
//! checked by its JWT verifier, and intents decided by its risk engine
//! (`engine::risk::rules::Risk::decide` over the same configuration), so the work per
//! intent is the engine's. Each task sends the events it makes straight to the desk's
//! connection (an unbounded channel per connection, drained by its writer task).
//!
//! What it deliberately lacks, because these are what the engine's design adds and the
//! comparison is meant to price: no pinned stage threads or core map, no lock-free rings
//! (tokio channels and the runtime's work-stealing scheduler instead), no spin-then-yield
//! wait strategies (tasks park on the runtime), no mio-driven broadcast (the node socket
//! is a tokio-tungstenite stream split into a writer and a reader task), no journal, no
//! audit trail, no hedging over several providers, no kill-switch hold, no replacements,
//! cancels, reorg handling, stuck detection or nonce repair, no rate limits or slow-reader
//! protection, no `status` op and no four-eyes approvals. There are no artificial delays
//! and no copies beyond what the idiomatic code makes.
//!
//! It exists only so that `loadgen --baseline` can measure the engine against it, under
//! the same load, in the same run. Nothing else uses it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alloy_consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy_eips::eip2718::Encodable2718;
use alloy_primitives::{Address, B256, TxKind, U64, U128, hex};
use alloy_signer::SignerSync;
use alloy_signer_local::Secp256k1Signer;
use engine::Config;
use engine::auth::{JwtAuth, Principals, Role};
use engine::config::KeyConfig;
use engine::msg::{IntentId, Reason, Route};
use engine::protocol::{self, DecodedIntent, ErrorCode, Request, RequestError};
use engine::risk::kill::KillSwitch;
use engine::risk::rules::{CompileCtx, Outcome, Policy, Risk};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as HttpRequest, Response,
};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Capacity of each channel between two stages.
const CHANNEL: usize = 4096;
/// Blocks of receipts kept for hashes that reach the receipts task after their block.
const RECENT_BLOCKS: u64 = 64;

type NodeWs = WebSocketStream<MaybeTlsStream<TcpStream>>;
/// A desk connection's outgoing frames.
type Out = mpsc::UnboundedSender<Message>;

/// The running baseline server: its runtime, its tasks, its listener.
#[derive(Debug)]
pub struct Baseline {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    workers: usize,
}

impl Baseline {
    /// Starts the baseline for `cfg` (the engine's configuration: listen address, JWT
    /// secret, node URL, accounts with local keys, confirmations): reads the chain id,
    /// every account's pending nonce and the fees from the node, subscribes to its heads
    /// and starts listening.
    pub fn start(cfg: &Config) -> Result<Baseline, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("baseline")
            .build()
            .map_err(|e| format!("baseline runtime: {e}"))?;
        let addr = rt.block_on(start_tasks(cfg))?;
        let workers = rt.metrics().num_workers();
        Ok(Baseline { rt, addr, workers })
    }

    /// The desk listener's address (`ws://ADDR/v1/ws`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// One line for reports: what ran.
    pub fn describe(&self) -> String {
        format!(
            "`benches::baseline`: one multi-threaded tokio runtime with {} worker \
             threads, stages as tasks joined by tokio mpsc channels, one node WebSocket \
             for sends and one for newHeads and receipts; no pinning, rings, spinning or \
             journal",
            self.workers
        )
    }

    /// Stops every task and the runtime.
    pub fn shutdown(self) {
        self.rt.shutdown_timeout(Duration::from_secs(2));
    }
}

async fn start_tasks(cfg: &Config) -> Result<SocketAddr, String> {
    let gate = Gate::new(cfg);
    let mut keys = Vec::with_capacity(cfg.accounts.len());
    for a in &cfg.accounts {
        let KeyConfig::Local { secret_hex } = &a.key else {
            return Err(format!(
                "account {}: the baseline signs with local keys only",
                a.name
            ));
        };
        let secret: B256 = secret_hex
            .parse()
            .map_err(|e| format!("account {}: key: {e}", a.name))?;
        keys.push(
            Secp256k1Signer::from_bytes(&secret)
                .map_err(|e| format!("account {}: key: {e}", a.name))?,
        );
    }
    let mut heads = node(&cfg.node_ws_url).await?;
    let chain_id: U64 = call(&mut heads, "eth_chainId", json!([])).await?;
    let mut nonces = Vec::with_capacity(keys.len());
    for k in &keys {
        let n: U64 = call(
            &mut heads,
            "eth_getTransactionCount",
            json!([k.address(), "pending"]),
        )
        .await?;
        nonces.push(n.to::<u64>());
    }
    let latest: Head = call(&mut heads, "eth_getBlockByNumber", json!(["latest", false])).await?;
    let tip: U128 = call(&mut heads, "eth_maxPriorityFeePerGas", json!([])).await?;
    let _sub: String = call(&mut heads, "eth_subscribe", json!(["newHeads"])).await?;
    let (fees_tx, fees_rx) = watch::channel(Fees {
        base: latest.base_fee_per_gas.map_or(0, |b| b.to()),
        tip: tip.to(),
    });
    let (sink, stream) = node(&cfg.node_ws_url).await?.split();
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("baseline listen {}: {e}", cfg.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("baseline listen: {e}"))?;

    let (intake_tx, intake_rx) = mpsc::channel(CHANNEL);
    let (sign_tx, sign_rx) = mpsc::channel(CHANNEL);
    let (send_tx, send_rx) = mpsc::channel(CHANNEL);
    let (pending_tx, pending_rx) = mpsc::unbounded_channel();
    let (watch_tx, watch_rx) = mpsc::channel(CHANNEL);
    let signing = Signing {
        chain_id: chain_id.to(),
        keys,
        nonces,
        fees: fees_rx,
    };
    let venue = cfg.provider_name.clone();
    tokio::spawn(intake(intake_rx, gate, sign_tx));
    tokio::spawn(signing.run(sign_rx, send_tx));
    tokio::spawn(broadcast(send_rx, sink, pending_tx));
    tokio::spawn(node_replies(stream, pending_rx, watch_tx, venue));
    tokio::spawn(receipts(
        heads,
        watch_rx,
        fees_tx,
        u64::from(cfg.confirmations),
    ));
    let auth = Arc::new(JwtAuth::new(cfg.jwt_secret.0.as_bytes()));
    tokio::spawn(serve(listener, auth, intake_tx));
    Ok(addr)
}

/// The intake/policy stage's decisions: the engine's risk engine over `cfg`'s accounts.
#[derive(Debug)]
pub struct Gate {
    risk: Risk,
    accounts: HashMap<String, u16>,
}

/// What the policy allowed: the account, the route and the fee cap to sign with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// Account index in the configuration.
    pub account: u16,
    /// The route the policy resolved.
    pub route: Route,
    /// Fee cap per gas (0 = none).
    pub max_fee_cap: u128,
}

/// A decision: allowed, or refused with the engine's reason and message; with the version
/// of the policy that made it.
pub type Decision = (Result<Allowed, (Reason, &'static str)>, u32);

impl Gate {
    /// The engine configuration's policy (version 1, as the engine's first one).
    pub fn new(cfg: &Config) -> Gate {
        let accounts = cfg.account_indices();
        let kill = Arc::new(KillSwitch::new(cfg.accounts.len()));
        let principals = Principals::default();
        let policy = Policy::from_config(
            cfg,
            CompileCtx {
                accounts: &accounts,
                kill: &kill,
                principals: &principals,
                venue: &cfg.provider_name,
            },
            1,
        );
        Gate {
            risk: Risk::new(Box::new(policy), kill),
            accounts,
        }
    }

    /// Decides one decoded intent.
    pub fn decide(&mut self, intent: &DecodedIntent) -> Decision {
        let msg = intent.to_msg(&self.accounts);
        let account = msg.account;
        let v = self
            .risk
            .decide(&msg, &intent.data, engine::risk::unix_now_ns());
        let outcome = match v.outcome {
            Outcome::Allow => Ok(Allowed {
                account: account.0,
                route: v.route,
                max_fee_cap: if intent.max_fee_cap != 0 {
                    intent.max_fee_cap
                } else {
                    v.max_fee
                },
            }),
            Outcome::Deny(r, m) => Err((r, m)),
            Outcome::Approval(_) | Outcome::Verify => Err((
                Reason::UnsupportedKind,
                "approvals and deposit verification are not part of the baseline",
            )),
        };
        (outcome, v.policy_version)
    }
}

/// Where an intent's events go.
struct Desk {
    out: Out,
    id: IntentId,
    seq: u64,
}

impl Desk {
    fn event(&self, state: &str, fields: Value) {
        let mut v = json!({
            "op": "event",
            "id": self.id.as_str(),
            "seq": self.seq,
            "state": state,
            "ts_us": unix_us(),
        });
        if let (Value::Object(m), Value::Object(f)) = (&mut v, fields) {
            m.extend(f);
        }
        let _ = self.out.send(Message::Text(v.to_string().into()));
    }

    fn failed(&self, reason: Reason, message: &str) {
        self.event(
            "failed",
            json!({"reason": reason.as_str(), "message": message}),
        );
    }
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A decoded `submit`, on its way to intake.
struct Submitted {
    out: Out,
    principal: Arc<str>,
    req: Option<String>,
    intent: Box<DecodedIntent>,
}

/// An accepted intent, on its way to signing.
struct Accepted {
    desk: Desk,
    allowed: Allowed,
    intent: Box<DecodedIntent>,
}

/// A signed transaction, on its way to the node.
struct SignedTx {
    desk: Desk,
    hash: B256,
    raw: Vec<u8>,
}

/// A transaction the node accepted, on its way to the receipts task.
struct Sent {
    desk: Desk,
    hash: B256,
}

async fn serve(listener: TcpListener, auth: Arc<JwtAuth>, intake: mpsc::Sender<Submitted>) {
    while let Ok((tcp, _)) = listener.accept().await {
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(tcp, Arc::clone(&auth), intake.clone()));
    }
}

async fn connection(tcp: TcpStream, auth: Arc<JwtAuth>, intake: mpsc::Sender<Submitted>) {
    let mut principal = None;
    // The shape of tungstenite's handshake callback, whose error is an HTTP response.
    #[allow(clippy::result_large_err)]
    let check = |req: &HttpRequest, resp: Response| -> Result<Response, ErrorResponse> {
        let header = req
            .headers()
            .get("authorization")
            .and_then(|h| h.to_str().ok());
        match auth.verify_header(header) {
            Ok(p) => {
                principal = Some(p);
                Ok(resp)
            }
            Err(e) => {
                let mut r = ErrorResponse::new(Some(e.to_string()));
                *r.status_mut() = StatusCode::UNAUTHORIZED;
                Err(r)
            }
        }
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
        return;
    };
    let Some(principal) = principal else { return };
    let sub: Arc<str> = principal.sub.into();
    let (mut sink, mut stream) = ws.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(msg)) = stream.next().await {
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => break,
            _ => continue,
        };
        let reply = match protocol::decode(text.as_str()) {
            Ok(Request::Submit { req, intent }) => {
                if !principal.roles.has(Role::Trader) {
                    RequestError::new(
                        ErrorCode::Forbidden,
                        "op `submit` needs a role this principal does not have",
                    )
                    .with_context(req.as_deref(), Some(intent.id.as_str()))
                    .to_json()
                } else {
                    let s = Submitted {
                        out: out.clone(),
                        principal: Arc::clone(&sub),
                        req,
                        intent,
                    };
                    if intake.send(s).await.is_err() {
                        break;
                    }
                    continue;
                }
            }
            Ok(Request::Ping { req }) => protocol::pong(req.as_deref()),
            Ok(_) => RequestError::new(
                ErrorCode::NotSupported,
                "the baseline serves submit and ping only",
            )
            .to_json(),
            Err(e) => e.to_json(),
        };
        let _ = out.send(Message::Text(reply.into()));
    }
}

/// Intake and policy: sequence numbers, the idempotency table, the risk decision.
async fn intake(
    mut rx: mpsc::Receiver<Submitted>,
    mut gate: Gate,
    signing: mpsc::Sender<Accepted>,
) {
    let mut seq = 0u64;
    let mut keys: HashMap<(Arc<str>, IntentId), u64> = HashMap::new();
    while let Some(s) = rx.recv().await {
        let id = s.intent.id;
        let req = s.req.as_deref();
        if let Some(&old) = keys.get(&(Arc::clone(&s.principal), id)) {
            let ack = json!({"op": "ack", "id": id.as_str(), "seq": old, "duplicate": true});
            let _ = s
                .out
                .send(Message::Text(protocol::with_req(ack, req).into()));
            continue;
        }
        seq += 1;
        keys.insert((s.principal, id), seq);
        let _ = s
            .out
            .send(Message::Text(protocol::ack(id.as_str(), seq, req).into()));
        let desk = Desk {
            out: s.out,
            id,
            seq,
        };
        match gate.decide(&s.intent) {
            (Ok(allowed), version) => {
                desk.event(
                    "accepted",
                    json!({"policy_version": version, "route": allowed.route.as_str()}),
                );
                let a = Accepted {
                    desk,
                    allowed,
                    intent: s.intent,
                };
                if signing.send(a).await.is_err() {
                    return;
                }
            }
            (Err((reason, message)), version) => desk.event(
                "rejected",
                json!({"policy_version": version, "reason": reason.as_str(), "message": message}),
            ),
        }
    }
}

/// The fee inputs: the latest base fee and the node's priority fee.
#[derive(Clone, Copy, Debug)]
struct Fees {
    base: u128,
    tip: u128,
}

struct Signing {
    chain_id: u64,
    keys: Vec<Secp256k1Signer>,
    nonces: Vec<u64>,
    fees: watch::Receiver<Fees>,
}

impl Signing {
    async fn run(mut self, mut rx: mpsc::Receiver<Accepted>, send: mpsc::Sender<SignedTx>) {
        while let Some(a) = rx.recv().await {
            let i = usize::from(a.allowed.account);
            let f = *self.fees.borrow();
            let (max_fee, tip) =
                engine::stages::signing::fees_for(f.base, f.tip, a.allowed.max_fee_cap);
            let nonce = self.nonces[i];
            let tx = TxEip1559 {
                chain_id: self.chain_id,
                nonce,
                gas_limit: a.intent.gas_limit,
                max_fee_per_gas: max_fee,
                max_priority_fee_per_gas: tip,
                to: TxKind::Call(a.intent.to),
                value: a.intent.value,
                input: a.intent.data.into(),
                ..TxEip1559::default()
            };
            let key = &self.keys[i];
            let sig = match key.sign_hash_sync(&tx.signature_hash()) {
                Ok(s) => s,
                Err(e) => {
                    a.desk.failed(Reason::SignerError, &e.to_string());
                    continue;
                }
            };
            self.nonces[i] += 1;
            let env: TxEnvelope = tx.into_signed(sig).into();
            let hash = *env.tx_hash();
            let from: Address = key.address();
            a.desk.event(
                "signed",
                json!({"tx_hash": hash, "nonce": nonce, "from": from}),
            );
            let s = SignedTx {
                desk: a.desk,
                hash,
                raw: env.encoded_2718(),
            };
            if send.send(s).await.is_err() {
                return;
            }
        }
    }
}

/// Writes each signed transaction to the node and hands it to the reply task.
async fn broadcast(
    mut rx: mpsc::Receiver<SignedTx>,
    mut sink: SplitSink<NodeWs, Message>,
    pending: mpsc::UnboundedSender<(u64, Sent)>,
) {
    let mut next = 1u64;
    while let Some(s) = rx.recv().await {
        let id = next;
        next += 1;
        let frame = json!({
            "jsonrpc": "2.0",
            "id": id,
            "method": "eth_sendRawTransaction",
            "params": [hex::encode_prefixed(&s.raw)],
        })
        .to_string();
        let sent = Sent {
            desk: s.desk,
            hash: s.hash,
        };
        // Registered before the write, so the answer always finds it.
        let _ = pending.send((id, sent));
        if sink.send(Message::Text(frame.into())).await.is_err() {
            return;
        }
    }
}

#[derive(Deserialize)]
struct RpcError {
    message: String,
}

#[derive(Deserialize)]
struct Reply {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    result: Value,
    #[serde(default)]
    error: Option<RpcError>,
    #[serde(default)]
    params: Option<Notification>,
}

#[derive(Deserialize)]
struct Notification {
    result: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Head {
    number: U64,
    #[serde(default)]
    base_fee_per_gas: Option<U128>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Receipt {
    transaction_hash: B256,
    block_number: U64,
    block_hash: B256,
    #[serde(default)]
    status: Option<U64>,
    gas_used: U64,
}

/// The node's answers to the sends: `broadcast` (then the receipt watch) or `failed`.
async fn node_replies(
    mut stream: SplitStream<NodeWs>,
    mut pending: mpsc::UnboundedReceiver<(u64, Sent)>,
    watch: mpsc::Sender<Sent>,
    venue: String,
) {
    let mut waiting: HashMap<u64, Sent> = HashMap::new();
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(r) = serde_json::from_str::<Reply>(text.as_str()) else {
            continue;
        };
        while let Ok((id, s)) = pending.try_recv() {
            waiting.insert(id, s);
        }
        let Some(s) = r.id.and_then(|id| waiting.remove(&id)) else {
            continue;
        };
        match r.error {
            None => {
                s.desk.event(
                    "broadcast",
                    json!({"tx_hash": s.hash, "route": "public", "venues": [venue]}),
                );
                if watch.send(s).await.is_err() {
                    return;
                }
            }
            Some(e) => s.desk.failed(Reason::NodeRejected, &e.message),
        }
    }
}

/// An included transaction waiting for its confirmations.
struct Included {
    desk: Desk,
    block: u64,
}

/// The receipts task's state: watched hashes, recent receipts, inclusions to confirm.
struct Watcher {
    confirmations: u64,
    head: u64,
    watched: HashMap<B256, Sent>,
    recent: HashMap<B256, Receipt>,
    recent_blocks: VecDeque<(u64, Vec<B256>)>,
    awaiting: BTreeMap<u64, Vec<Included>>,
}

impl Watcher {
    fn included(&mut self, s: Sent, r: &Receipt) {
        let block = r.block_number.to::<u64>();
        s.desk.event(
            "included",
            json!({
                "tx_hash": s.hash,
                "block_number": block,
                "block_hash": r.block_hash,
                "success": r.status == Some(U64::from(1)),
                "gas_used": r.gas_used.to::<u64>(),
            }),
        );
        self.awaiting.entry(block).or_default().push(Included {
            desk: s.desk,
            block,
        });
    }

    fn confirm(&mut self) {
        let Some(upto) = self.head.checked_sub(self.confirmations) else {
            return;
        };
        let later = self.awaiting.split_off(&(upto + 1));
        for (_, list) in std::mem::replace(&mut self.awaiting, later) {
            for i in list {
                i.desk.event(
                    "confirmed",
                    json!({"depth": self.head - i.block, "block_number": i.block}),
                );
            }
        }
    }

    fn watch(&mut self, s: Sent) {
        match self.recent.remove(&s.hash) {
            Some(r) => {
                self.included(s, &r);
                self.confirm();
            }
            None => {
                self.watched.insert(s.hash, s);
            }
        }
    }

    fn block_receipts(&mut self, number: u64, receipts: Vec<Receipt>) {
        let mut kept = Vec::new();
        for r in receipts {
            match self.watched.remove(&r.transaction_hash) {
                Some(s) => self.included(s, &r),
                None => {
                    kept.push(r.transaction_hash);
                    self.recent.insert(r.transaction_hash, r);
                }
            }
        }
        self.recent_blocks.push_back((number, kept));
        while let Some((n, hashes)) = self.recent_blocks.front()
            && n + RECENT_BLOCKS < self.head
        {
            for h in hashes {
                self.recent.remove(h);
            }
            self.recent_blocks.pop_front();
        }
        self.confirm();
    }
}

/// Follows the node's heads: the base fee, each block's receipts (`included`) and the
/// confirmations (`confirmed`).
async fn receipts(
    mut ws: NodeWs,
    mut rx: mpsc::Receiver<Sent>,
    fees: watch::Sender<Fees>,
    confirmations: u64,
) {
    let mut w = Watcher {
        confirmations,
        head: 0,
        watched: HashMap::new(),
        recent: HashMap::new(),
        recent_blocks: VecDeque::new(),
        awaiting: BTreeMap::new(),
    };
    // Request id → block number of the outstanding eth_getBlockReceipts.
    let mut asked: HashMap<u64, u64> = HashMap::new();
    let mut next = 1_000_000u64;
    loop {
        let text = tokio::select! {
            s = rx.recv() => {
                match s {
                    Some(s) => w.watch(s),
                    None => return,
                }
                continue;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue,
                _ => return,
            },
        };
        let Ok(r) = serde_json::from_str::<Reply>(text.as_str()) else {
            continue;
        };
        if let Some(n) = r.params {
            let Ok(h) = serde_json::from_value::<Head>(n.result) else {
                continue;
            };
            let number = h.number.to::<u64>();
            if let Some(b) = h.base_fee_per_gas {
                fees.send_modify(|f| f.base = b.to());
            }
            w.head = w.head.max(number);
            next += 1;
            asked.insert(next, number);
            let req = json!({
                "jsonrpc": "2.0",
                "id": next,
                "method": "eth_getBlockReceipts",
                "params": [U64::from(number)],
            });
            if ws
                .send(Message::Text(req.to_string().into()))
                .await
                .is_err()
            {
                return;
            }
            w.confirm();
        } else if let Some(number) = r.id.and_then(|id| asked.remove(&id)) {
            let list: Vec<Receipt> = serde_json::from_value(r.result).unwrap_or_default();
            w.block_receipts(number, list);
        }
    }
}

async fn node(url: &str) -> Result<NodeWs, String> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .map_err(|e| format!("node {url}: {e}"))?;
    Ok(ws)
}

/// One JSON-RPC call at start-up, before the connection is handed to its task.
async fn call<T: serde::de::DeserializeOwned>(
    ws: &mut NodeWs,
    method: &str,
    params: Value,
) -> Result<T, String> {
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    ws.send(Message::Text(req.to_string().into()))
        .await
        .map_err(|e| format!("{method}: {e}"))?;
    while let Some(msg) = ws.next().await {
        let Message::Text(text) = msg.map_err(|e| format!("{method}: {e}"))? else {
            continue;
        };
        let r: Reply = serde_json::from_str(text.as_str()).map_err(|e| format!("{method}: {e}"))?;
        if r.id != Some(1) {
            continue;
        }
        if let Some(e) = r.error {
            return Err(format!("{method}: {}", e.message));
        }
        return serde_json::from_value(r.result).map_err(|e| format!("{method}: {e}"));
    }
    Err(format!("{method}: the node closed the connection"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo mix's refusals get the engine's reasons; the rest is allowed on the
    /// public route.
    #[test]
    fn the_demo_mix_is_decided_as_the_engine_decides_it() {
        let cfg = engine::dev::dev_config(
            "ws://127.0.0.1:1",
            SocketAddr::from(([127, 0, 0, 1], 0)),
            "baseline-test-secret-0123456789".into(),
        );
        let mut gate = Gate::new(&cfg);
        let mut reasons = Vec::new();
        for i in 0..14 {
            let (intent, expect) = engine::demo::intent(i, "t");
            let frame = json!({"op": "submit", "intent": intent}).to_string();
            let Ok(Request::Submit { intent, .. }) = protocol::decode(&frame) else {
                panic!("{frame}");
            };
            let (d, version) = gate.decide(&intent);
            assert_eq!(version, 1);
            match (d, expect) {
                (Ok(a), "confirmed") => assert_eq!(a.route, Route::Public, "{i}"),
                (Err((r, _)), "rejected") => reasons.push(r.as_str()),
                (d, e) => panic!("intent {i}: {d:?}, expected {e}"),
            }
        }
        assert_eq!(reasons, ["not_allowlisted", "value_cap", "unknown_account"]);
    }
}
