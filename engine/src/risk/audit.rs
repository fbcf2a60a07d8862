//! The audit trail: every risk decision (allow, deny, approval request), approval,
//! rejection, expiry, kill, unkill and policy reload with the inputs that decided it, and
//! every intent's life after intake: `request` (acked), `signed` (with the key that signs
//! for the account), `broadcast`, `included`, `confirmed`, `reorged`, `replaced`,
//! `cancelled`, `failed`.
//!
//! Stages and the status thread hand fixed-size [`AuditRecord`]s to a bounded channel (no
//! allocation on the sending side, and no wake-up: the writer polls); the writer thread
//! renders them as JSON and appends them to the hash-chained log in `audit_dir`
//! ([`crate::audit`]) within a few milliseconds, syncing it every `audit_fsync_ms`, at
//! each segment rotation and at shutdown. When the channel is full the sender waits: a
//! decision is never made without its record. The status thread's side is
//! [`StatusAudit`]: it turns the status messages it sees into records (off the hot path).
//!
//! Invariants: records reach the log in the order the channel received them; the records
//! of one intent made by one thread are in that thread's order; at start, before the
//! pipeline runs, the log gets one `account_key` record per account (its address and key
//! description, never key material).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use serde_json::{Map, Value, json};

use crate::audit::{AuditError, AuditKey, ChainWriter, KeyFileError, WriterOptions};
use crate::auth::Principals;
use crate::config::{Config, KeyConfig};
use crate::msg::{
    Detail, IntentId, IntentKind, Reason, Route, State, StatusKind, StatusMsg, TravelInfo,
};
use crate::risk::kyt::KytLookup;
use crate::risk::rules::{Outcome, Verdict};

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AuditKind {
    /// The policy stage decided an intent.
    #[default]
    Decision,
    /// An approver approved a pending intent.
    Approved,
    /// An approver refused a pending intent.
    Rejected,
    /// A pending intent's approval time ran out.
    Expired,
    /// A kill switch was turned on.
    Kill,
    /// A kill switch was turned off.
    Unkill,
    /// A new policy was loaded.
    Reload,
    /// A policy file was refused.
    ReloadFailed,
    /// Intake acked an intent.
    Request,
    /// The intent's transaction was signed.
    Signed,
    /// A venue accepted the transaction.
    Broadcast,
    /// The transaction is in a block.
    Included,
    /// Enough blocks on top.
    Confirmed,
    /// Its block left the canonical chain.
    Reorged,
    /// Replaced on the same nonce.
    Replaced,
    /// Cancelled by the desk.
    Cancelled,
    /// Could not be completed.
    Failed,
    /// At start: an account, its address and the key that signs for it.
    AccountKey,
    /// The deposit verifier checked a deposit's signatures and roots (`outcome` allow or
    /// deny with `invalid_deposit` and the check that failed).
    DepositCheck,
}

impl AuditKind {
    /// The `kind` of the record in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Decision => "decision",
            AuditKind::Approved => "approved",
            AuditKind::Rejected => "rejected",
            AuditKind::Expired => "approval_expired",
            AuditKind::Kill => "kill",
            AuditKind::Unkill => "unkill",
            AuditKind::Reload => "policy_reload",
            AuditKind::ReloadFailed => "policy_reload_failed",
            AuditKind::Request => "request",
            AuditKind::Signed => "signed",
            AuditKind::Broadcast => "broadcast",
            AuditKind::Included => "included",
            AuditKind::Confirmed => "confirmed",
            AuditKind::Reorged => "reorged",
            AuditKind::Replaced => "replaced",
            AuditKind::Cancelled => "cancelled",
            AuditKind::Failed => "failed",
            AuditKind::AccountKey => "account_key",
            AuditKind::DepositCheck => "deposit_check",
        }
    }

    /// Whether the record is one of the risk engine's (rendered with the intent's terms).
    fn is_risk(self) -> bool {
        matches!(
            self,
            AuditKind::Decision
                | AuditKind::Approved
                | AuditKind::Rejected
                | AuditKind::Expired
                | AuditKind::Kill
                | AuditKind::Unkill
                | AuditKind::Reload
                | AuditKind::ReloadFailed
                | AuditKind::DepositCheck
        )
    }
}

/// Account index of a record whose account is not known.
pub const NO_ACCOUNT: u16 = u16::MAX;
// An intent's unknown account index is the audit's "no account" as it is.
const _: () = assert!(NO_ACCOUNT == crate::msg::AccountIdx::UNKNOWN.0);

/// One audit record (fixed size, `Copy`).
#[derive(Clone, Copy, Debug, Default)]
pub struct AuditRecord {
    /// What happened.
    pub kind: AuditKind,
    /// When (unix ns).
    pub at_ns: u64,
    /// Intent sequence (0 when not about an intent).
    pub seq: u64,
    /// The desk's id of the intent (empty when not known).
    pub intent: IntentId,
    /// Submitting principal.
    pub principal: u32,
    /// Acting principal (approver, admin).
    pub actor: u32,
    /// Account index ([`NO_ACCOUNT`]: not known).
    pub account: u16,
    /// Intent kind.
    pub intent_kind: IntentKind,
    /// Route: for a decision, the one it resolved (`public` or `private`); for a
    /// broadcast, the one taken; otherwise the intent's route as it stood.
    pub route: Route,
    /// For a decision, the route the desk asked for (`auto`, `public` or `private`).
    pub route_requested: Option<Route>,
    /// Transaction destination.
    pub to: Address,
    /// Beneficiary (token recipient for a token transfer).
    pub beneficiary: Address,
    /// Amount in the asset's base units.
    pub amount: u128,
    /// Asset slot.
    pub asset: u8,
    /// Allow / deny / approval, for decisions.
    pub outcome: Option<Outcome>,
    /// Reason (deny, rejection, expiry, failure).
    pub reason: Reason,
    /// Free text: why, scope, file.
    pub detail: Detail,
    /// Version of the policy that decided.
    pub policy_version: u32,
    /// KYT input.
    pub kyt: Option<KytLookup>,
    /// Velocity input: (rule, used value, used count).
    pub velocity: Option<(u16, u128, u64)>,
    /// Travel-rule evidence.
    pub travel: TravelInfo,
    /// Approver, if approved.
    pub approved_by: u32,
    /// Transaction hash (signed onwards; the replacement's for `replaced`).
    pub tx_hash: B256,
    /// Signing address (`signed`; the account's address for `account_key`).
    pub from: Address,
    /// Nonce (`signed`, `replaced`).
    pub nonce: u64,
    /// Block number (`included`, `confirmed`, `reorged`, `cancelled`).
    pub block_number: u64,
    /// Block hash (`included`, `reorged`, `cancelled`).
    pub block_hash: B256,
    /// Gas used (`included`).
    pub gas_used: u64,
    /// Execution success (`included`).
    pub success: bool,
    /// Blocks on top (`confirmed`).
    pub depth: u32,
    /// Venue bit mask (`broadcast`): bit `i` is venue `i` of the writer's list.
    pub venues: u32,
}

impl AuditRecord {
    /// The record of a policy decision on intent `msg`.
    pub fn decision(msg: &crate::msg::IntentMsg, v: &Verdict, at_ns: u64) -> Self {
        let (reason, detail) = match v.outcome {
            Outcome::Allow => (Reason::None, ""),
            Outcome::Deny(r, m) => (r, m),
            Outcome::Approval(m) => (Reason::None, m),
            Outcome::Verify => (
                Reason::None,
                "deposit signatures and roots sent to the verifier",
            ),
        };
        Self {
            kind: AuditKind::Decision,
            at_ns,
            seq: msg.seq,
            intent: msg.id,
            principal: msg.origin.principal,
            account: msg.account.0,
            intent_kind: msg.kind,
            route: v.route,
            route_requested: Some(msg.route),
            to: msg.to,
            beneficiary: v.beneficiary,
            amount: v.amount,
            asset: v.asset,
            outcome: Some(v.outcome),
            reason,
            detail: Detail::new(detail),
            policy_version: v.policy_version,
            kyt: v.kyt,
            velocity: v.velocity,
            travel: msg.travel,
            approved_by: msg.approved_by,
            ..Self::default()
        }
    }
}

/// Sending side (cloneable).
#[derive(Clone, Debug)]
pub struct AuditSink {
    tx: Sender<AuditRecord>,
}

impl AuditSink {
    /// Records; waits if the writer is behind (never drops).
    #[inline]
    pub fn record(&self, r: AuditRecord) {
        let _ = self.tx.send(r);
    }

    /// Records waiting for the writer right now.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// The channel's capacity.
    pub fn capacity(&self) -> usize {
        self.tx.capacity().unwrap_or(usize::MAX)
    }
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct AuditStats {
    /// Records written.
    pub written: AtomicU64,
    /// Write errors.
    pub errors: AtomicU64,
    /// Bytes of a torn last line cut off when the log was opened.
    pub torn_bytes_cut: AtomicU64,
}

/// A bounded audit channel.
pub fn channel(capacity: usize) -> (AuditSink, Receiver<AuditRecord>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    (AuditSink { tx }, rx)
}

/// What the log says about one account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountInfo {
    /// Configured name.
    pub name: String,
    /// The primary key's description ([`key_id`]).
    pub key_id: String,
    /// The standby key's description, if the account has one.
    pub standby_key_id: Option<String>,
    /// Address (learned from the account's `account_key` record).
    pub address: Option<Address>,
}

/// A key's description for the audit trail, never key material: `local`,
/// `hsm:<key label>`, `kms:<key id>`, `mpc:<state folder name>`.
pub fn key_id(k: &KeyConfig) -> String {
    match k {
        KeyConfig::Local { .. } => "local".into(),
        KeyConfig::Hsm { key_label, .. } => format!("hsm:{key_label}"),
        KeyConfig::Kms { key_id, .. } => format!("kms:{key_id}"),
        KeyConfig::Mpc { state_dir, .. } => format!(
            "mpc:{}",
            state_dir.file_name().map_or_else(
                || state_dir.display().to_string(),
                |n| n.to_string_lossy().into_owned()
            )
        ),
    }
}

/// What the writer needs to render records: names for principals, accounts and venues.
#[derive(Debug, Clone)]
pub struct AuditContext {
    /// Principal names.
    pub principals: Arc<Principals>,
    /// Accounts by index.
    pub accounts: Vec<AccountInfo>,
    /// Venue names by bit of a broadcast's venue mask: the providers, then the relays.
    pub venues: Vec<String>,
}

impl AuditContext {
    /// The context of the engine configured by `cfg`.
    pub fn from_config(cfg: &Config, principals: Arc<Principals>) -> Self {
        Self {
            principals,
            accounts: cfg
                .accounts
                .iter()
                .map(|a| AccountInfo {
                    name: a.name.clone(),
                    key_id: key_id(&a.key),
                    standby_key_id: a.standby.as_ref().map(key_id),
                    address: None,
                })
                .collect(),
            venues: cfg
                .provider_list()
                .into_iter()
                .map(|(n, _)| n)
                .chain(cfg.relays.iter().map(|r| r.name.clone()))
                .collect(),
        }
    }
}

/// Renders one record as a JSON object: `kind`, `at` (RFC 3339) and its fields, with
/// account names only (no key descriptions, addresses or venue names).
pub fn render(r: &AuditRecord, principals: &Principals, accounts: &[String]) -> Value {
    let accounts: Vec<AccountInfo> = accounts
        .iter()
        .map(|n| AccountInfo {
            name: n.clone(),
            ..AccountInfo::default()
        })
        .collect();
    let mut fields = render_fields(r, principals, &accounts, &[]);
    fields.insert("kind".into(), json!(r.kind.as_str()));
    fields.insert("at".into(), json!(crate::audit::format_at(r.at_ns)));
    Value::Object(fields)
}

/// Renders one record's fields in `ctx` (everything but `kind` and `at`).
pub fn render_in(r: &AuditRecord, ctx: &AuditContext) -> Map<String, Value> {
    render_fields(r, &ctx.principals, &ctx.accounts, &ctx.venues)
}

fn render_fields(
    r: &AuditRecord,
    principals: &Principals,
    accounts: &[AccountInfo],
    venues: &[String],
) -> Map<String, Value> {
    let name = |p: u32| (p != 0).then(|| principals.name(p)).flatten();
    let mut v = Map::new();
    let account = accounts.get(usize::from(r.account));
    if r.seq != 0 {
        v.insert("seq".into(), json!(r.seq));
        if !r.intent.as_str().is_empty() {
            v.insert("intent".into(), json!(r.intent.as_str()));
        }
        if r.principal != 0 {
            v.insert("principal".into(), json!(name(r.principal)));
        }
        if r.kind.is_risk() || account.is_some() {
            v.insert("account".into(), json!(account.map(|a| &a.name)));
        }
        if let Some(a) = account.and_then(|a| a.address) {
            v.insert("address".into(), json!(a));
        }
    }
    let h = |b: &B256| json!(b);
    match r.kind {
        k if k.is_risk() => render_risk(&mut v, r, &name),
        AuditKind::Request if account.is_some() => {
            v.insert("intent_kind".into(), json!(r.intent_kind.as_str()));
        }
        AuditKind::Signed => {
            v.insert("tx_hash".into(), h(&r.tx_hash));
            v.insert("nonce".into(), json!(r.nonce));
            v.insert("from".into(), json!(r.from));
            if let Some(a) = account {
                v.insert("key_id".into(), json!(a.key_id));
                if let Some(s) = &a.standby_key_id {
                    v.insert("standby_key_id".into(), json!(s));
                }
            }
        }
        AuditKind::Broadcast => {
            v.insert("tx_hash".into(), h(&r.tx_hash));
            v.insert("route".into(), json!(r.route.as_str()));
            let names: Vec<Value> = (0..32)
                .filter(|i| r.venues & (1u32 << i) != 0)
                .map(|i| {
                    venues
                        .get(i)
                        .map_or_else(|| json!(format!("venue-{i}")), |n| json!(n))
                })
                .collect();
            v.insert("venues".into(), Value::Array(names));
        }
        AuditKind::Included => {
            v.insert("tx_hash".into(), h(&r.tx_hash));
            v.insert("block_number".into(), json!(r.block_number));
            v.insert("block_hash".into(), h(&r.block_hash));
            v.insert("success".into(), json!(r.success));
            v.insert("gas_used".into(), json!(r.gas_used));
        }
        AuditKind::Confirmed => {
            if r.tx_hash != B256::ZERO {
                v.insert("tx_hash".into(), h(&r.tx_hash));
            }
            v.insert("block_number".into(), json!(r.block_number));
            v.insert("depth".into(), json!(r.depth));
        }
        AuditKind::Reorged => {
            v.insert("tx_hash".into(), h(&r.tx_hash));
            v.insert("block_number".into(), json!(r.block_number));
            v.insert("block_hash".into(), h(&r.block_hash));
        }
        AuditKind::Replaced => {
            v.insert("tx_hash".into(), h(&r.tx_hash));
            v.insert("nonce".into(), json!(r.nonce));
        }
        AuditKind::Cancelled => {
            if r.tx_hash != B256::ZERO {
                v.insert("tx_hash".into(), h(&r.tx_hash));
            }
            if r.block_number != 0 {
                v.insert("block_number".into(), json!(r.block_number));
                v.insert("block_hash".into(), h(&r.block_hash));
            }
        }
        AuditKind::Failed => {
            v.insert("reason".into(), json!(r.reason.as_str()));
            v.insert("detail".into(), json!(r.detail.as_str()));
        }
        AuditKind::AccountKey => {
            if let Some(a) = account {
                v.insert("account".into(), json!(a.name));
                v.insert("key_id".into(), json!(a.key_id));
                if let Some(s) = &a.standby_key_id {
                    v.insert("standby_key_id".into(), json!(s));
                }
            }
            v.insert("address".into(), json!(r.from));
        }
        _ => {}
    }
    v
}

fn render_risk(v: &mut Map<String, Value>, r: &AuditRecord, name: &dyn Fn(u32) -> Option<String>) {
    if r.seq != 0 {
        v.insert("intent_kind".into(), json!(r.intent_kind.as_str()));
        v.insert("route".into(), json!(r.route.as_str()));
        if let Some(asked) = r.route_requested {
            v.insert("route_requested".into(), json!(asked.as_str()));
        }
        v.insert("to".into(), json!(r.to));
        v.insert("beneficiary".into(), json!(r.beneficiary));
        v.insert("amount".into(), json!(r.amount.to_string()));
        v.insert("asset_slot".into(), json!(r.asset));
    }
    if r.actor != 0 {
        v.insert("actor".into(), json!(name(r.actor)));
    }
    if let Some(o) = r.outcome {
        v.insert(
            "outcome".into(),
            json!(match o {
                Outcome::Allow => "allow",
                Outcome::Deny(..) => "deny",
                Outcome::Approval(_) => "approval_required",
                Outcome::Verify => "verify_deposit",
            }),
        );
    }
    if r.reason != Reason::None {
        v.insert("reason".into(), json!(r.reason.as_str()));
    }
    if !r.detail.as_str().is_empty() {
        v.insert("detail".into(), json!(r.detail.as_str()));
    }
    if r.policy_version != 0 {
        v.insert("policy_version".into(), json!(r.policy_version));
    }
    if let Some(k) = r.kyt {
        let kyt = match k {
            KytLookup::Sanctioned => json!({"result": "sanctioned"}),
            KytLookup::Fresh { score, age_ns } => {
                json!({"result": "fresh", "score": score, "age_ms": age_ns / 1_000_000})
            }
            KytLookup::Expired { score, age_ns } => {
                json!({"result": "expired", "score": score, "age_ms": age_ns / 1_000_000})
            }
            KytLookup::Missing => json!({"result": "missing"}),
        };
        v.insert("kyt".into(), kyt);
    }
    if let Some((rule, used_value, used_count)) = r.velocity {
        v.insert(
            "velocity".into(),
            json!({"rule": rule, "used_value": used_value.to_string(), "used_count": used_count}),
        );
    }
    if r.travel.present {
        v.insert("travel_rule_hash".into(), json!(r.travel.hash));
    }
    if r.approved_by != 0 {
        v.insert("approved_by".into(), json!(name(r.approved_by)));
    }
}

/// How the writer thread keeps the log.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// The log's directory; `None`: records go to the process log (target `audit`),
    /// unchained.
    pub dir: Option<PathBuf>,
    /// Segment size at which the writer moves to a new segment.
    pub segment_bytes: u64,
    /// Longest time written records stay unsynced (0: synced whenever the writer has
    /// caught up).
    pub fsync_every: Duration,
    /// Signs segment heads when set.
    pub key: Option<AuditKey>,
    /// Seals (encrypts at rest) every new segment when set, and opens sealed segments on
    /// recovery.
    pub sealer: Option<crate::atrest::Sealer>,
}

impl WriterConfig {
    /// The writer configuration of `cfg`, with its audit key read (and its file's
    /// permissions checked).
    pub fn from_config(cfg: &Config) -> Result<WriterConfig, KeyFileError> {
        Ok(WriterConfig {
            dir: cfg.audit_dir.clone(),
            segment_bytes: cfg.audit_segment_bytes,
            fsync_every: Duration::from_millis(cfg.audit_fsync_ms),
            key: cfg
                .audit_key_file
                .as_deref()
                .map(AuditKey::load)
                .transpose()?,
            sealer: None,
        })
    }
}

/// The running writer thread. Dropping it (or [`AuditWriter::close`]) stops the thread
/// once the records already in the channel are written, and syncs the log.
#[derive(Debug)]
pub struct AuditWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuditWriter {
    /// Writes what is queued, syncs and stops.
    pub fn close(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Opens the log (continuing its chain, see [`ChainWriter::open`]) and spawns the writer
/// thread that appends every record from `rx` to it.
pub fn spawn_writer(
    cfg: WriterConfig,
    rx: Receiver<AuditRecord>,
    mut ctx: AuditContext,
    stats: Arc<AuditStats>,
) -> Result<AuditWriter, AuditError> {
    let mut chain = match &cfg.dir {
        Some(dir) => {
            let c = ChainWriter::open(
                dir,
                WriterOptions {
                    segment_bytes: cfg.segment_bytes,
                    key: cfg.key.clone(),
                    sealer: cfg.sealer.clone(),
                },
            )?;
            stats
                .torn_bytes_cut
                .store(c.recovery().torn_bytes, Ordering::Relaxed);
            Some(c)
        }
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let fsync_every = cfg.fsync_every;
    let thread = std::thread::Builder::new()
        .name("audit".into())
        .spawn(move || {
            // The writer polls rather than blocking in `recv`: a sender that finds a
            // blocked receiver wakes it with a futex call, which would put a syscall
            // (several µs, and a thread competing for the deciding core) on every
            // decision. Polling keeps `record` a plain enqueue; records reach the file
            // within `IDLE_MAX` of being made.
            const IDLE_MIN: Duration = Duration::from_micros(200);
            const IDLE_MAX: Duration = Duration::from_millis(2);
            let mut idle = IDLE_MIN;
            let mut pending_flush = false;
            let mut last_sync = Instant::now();
            let sync = |chain: &mut Option<ChainWriter>, last_sync: &mut Instant| {
                if let Some(c) = chain
                    && c.unsynced()
                {
                    if let Err(e) = c.sync() {
                        write_error(&stats, &e);
                    }
                    *last_sync = Instant::now();
                }
            };
            loop {
                match rx.try_recv() {
                    Ok(r) => {
                        idle = IDLE_MIN;
                        pending_flush = true;
                        write_one(&mut chain, &mut ctx, &r, &stats);
                        if !fsync_every.is_zero() && last_sync.elapsed() >= fsync_every {
                            sync(&mut chain, &mut last_sync);
                        }
                    }
                    Err(e) => {
                        if pending_flush {
                            pending_flush = false;
                            if let Some(c) = &mut chain
                                && let Err(e) = c.flush()
                            {
                                write_error(&stats, &e);
                            }
                        }
                        if last_sync.elapsed() >= fsync_every {
                            sync(&mut chain, &mut last_sync);
                        }
                        if e == TryRecvError::Disconnected || stopping.load(Ordering::Acquire) {
                            while let Ok(r) = rx.try_recv() {
                                write_one(&mut chain, &mut ctx, &r, &stats);
                            }
                            sync(&mut chain, &mut last_sync);
                            break;
                        }
                        std::thread::sleep(idle);
                        idle = (idle * 2).min(IDLE_MAX);
                    }
                }
            }
        })
        .map_err(|source| AuditError::Io {
            path: cfg.dir.clone().unwrap_or_default(),
            source,
        })?;
    Ok(AuditWriter {
        stop,
        thread: Some(thread),
    })
}

fn write_error(stats: &AuditStats, e: &AuditError) {
    let n = stats.errors.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        tracing::error!(error = %e, errors = n, "audit log write failed");
    }
}

fn write_one(
    chain: &mut Option<ChainWriter>,
    ctx: &mut AuditContext,
    r: &AuditRecord,
    stats: &AuditStats,
) {
    if r.kind == AuditKind::AccountKey
        && let Some(a) = ctx.accounts.get_mut(usize::from(r.account))
    {
        a.address = Some(r.from);
    }
    let fields = render_in(r, ctx);
    match chain {
        Some(c) => {
            if let Err(e) = c.append(r.at_ns, r.kind.as_str(), &fields) {
                write_error(stats, &e);
                return;
            }
        }
        None => {
            let mut body = fields;
            body.insert("kind".into(), json!(r.kind.as_str()));
            body.insert("at".into(), json!(crate::audit::format_at(r.at_ns)));
            let line = Value::Object(body).to_string();
            tracing::info!(target: "audit", "{line}");
        }
    }
    stats.written.fetch_add(1, Ordering::Relaxed);
}

/// What the status thread remembers of an intent for its records.
#[derive(Debug, Clone, Copy)]
struct Known {
    id: IntentId,
    principal: u32,
    account: u16,
    tx_hash: B256,
}

/// The status thread's side of the audit trail: turns the status messages of the kinds
/// audited (`request` on an ack; `signed`, `broadcast`, `included`, `confirmed`,
/// `reorged`, `replaced`, `cancelled`, `failed` events) into records, with the intent's id,
/// principal and account, and sends them (waiting when the channel is full: the status
/// thread is off the hot path).
#[derive(Debug)]
pub struct StatusAudit {
    sink: AuditSink,
    by_address: HashMap<Address, u16>,
    intents: HashMap<u64, Known>,
    base_raw: u64,
    base_unix_ns: u64,
}

impl StatusAudit {
    /// Records one `account_key` record per account (`addresses` by account index) and
    /// returns the status thread's hand-off.
    pub fn new(sink: AuditSink, addresses: &[Address]) -> Self {
        let base_raw = pipeline::now_raw();
        let base_unix_ns = super::unix_now_ns();
        for (i, a) in addresses.iter().enumerate() {
            sink.record(AuditRecord {
                kind: AuditKind::AccountKey,
                at_ns: base_unix_ns,
                account: i as u16,
                from: *a,
                ..AuditRecord::default()
            });
        }
        Self {
            sink,
            by_address: addresses
                .iter()
                .enumerate()
                .map(|(i, a)| (*a, i as u16))
                .collect(),
            intents: HashMap::with_capacity(1 << 12),
            base_raw,
            base_unix_ns,
        }
    }

    /// An unfinished intent recovered from the journal at a start: its later records
    /// (`signed`, `included`, `confirmed`, ...) name it and its account as a live one's
    /// do. `account`: its account, if known; `tx_hash`: its newest transaction, if it was
    /// signed. Before the stage starts.
    pub fn recover(
        &mut self,
        seq: u64,
        id: IntentId,
        principal: u32,
        account: crate::msg::AccountIdx,
        tx_hash: B256,
    ) {
        self.intents.insert(
            seq,
            Known {
                id,
                principal,
                account: account.0,
                tx_hash,
            },
        );
    }

    /// Audits `m` if it is of a kind audited.
    pub fn on_status(&mut self, m: &StatusMsg) {
        let kind = match (m.kind, m.state) {
            (StatusKind::Ack, _) => {
                self.intents.insert(
                    m.seq,
                    Known {
                        id: m.id,
                        principal: m.origin.principal,
                        account: m.account.0,
                        tx_hash: B256::ZERO,
                    },
                );
                AuditKind::Request
            }
            (StatusKind::Event, State::Signed) => AuditKind::Signed,
            (StatusKind::Event, State::Broadcast) => AuditKind::Broadcast,
            (StatusKind::Event, State::Included) => AuditKind::Included,
            (StatusKind::Event, State::Confirmed) => AuditKind::Confirmed,
            (StatusKind::Event, State::Reorged) => AuditKind::Reorged,
            (StatusKind::Event, State::Replaced) => AuditKind::Replaced,
            (StatusKind::Event, State::Cancelled) => AuditKind::Cancelled,
            (StatusKind::Event, State::Failed) => AuditKind::Failed,
            (StatusKind::Event, s) => {
                if s.is_terminal() {
                    self.intents.remove(&m.seq);
                }
                return;
            }
            _ => return,
        };
        let at_ns = if m.at_raw == 0 {
            super::unix_now_ns()
        } else {
            self.base_unix_ns + pipeline::ticks_to_ns(self.base_raw, m.at_raw)
        };
        let mut known = self.intents.get(&m.seq).copied().unwrap_or(Known {
            id: IntentId::default(),
            principal: m.origin.principal,
            account: NO_ACCOUNT,
            tx_hash: B256::ZERO,
        });
        if kind == AuditKind::Signed
            && let Some(&i) = self.by_address.get(&m.from)
        {
            known.account = i;
        }
        if m.tx_hash != B256::ZERO && kind != AuditKind::Cancelled {
            known.tx_hash = m.tx_hash;
        }
        let tx_hash = if m.tx_hash == B256::ZERO && kind == AuditKind::Confirmed {
            known.tx_hash
        } else {
            m.tx_hash
        };
        self.sink.record(AuditRecord {
            kind,
            at_ns,
            seq: m.seq,
            intent: known.id,
            principal: known.principal,
            account: known.account,
            route: m.route,
            reason: m.reason,
            detail: m.detail,
            tx_hash,
            from: m.from,
            nonce: m.nonce,
            block_number: m.block_number,
            block_hash: m.block_hash,
            gas_used: m.gas_used,
            success: m.success,
            depth: m.depth,
            venues: m.venues,
            intent_kind: m.intent_kind,
            ..AuditRecord::default()
        });
        if m.state.is_terminal() && m.kind == StatusKind::Event {
            self.intents.remove(&m.seq);
        } else if let Some(k) = self.intents.get_mut(&m.seq) {
            *k = known;
        }
    }
}
