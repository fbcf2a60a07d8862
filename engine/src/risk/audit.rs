//! The audit trail of risk decisions: every allow, deny, approval request, approval,
//! rejection, expiry, kill, unkill and policy reload, with the inputs that decided it.
//!
//! Stages hand fixed-size [`AuditRecord`]s to a bounded channel (no allocation on the
//! sending side, and no wake-up: the writer polls); a writer thread renders them as JSON
//! lines and appends them to the audit file within a few milliseconds. When the channel
//! is full the sender waits: a decision is never made without its record.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use alloy_primitives::Address;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use serde_json::{Value, json};

use crate::auth::Principals;
use crate::msg::{Detail, IntentKind, Reason, Route, TravelInfo};
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
}

impl AuditKind {
    fn as_str(self) -> &'static str {
        match self {
            AuditKind::Decision => "decision",
            AuditKind::Approved => "approved",
            AuditKind::Rejected => "rejected",
            AuditKind::Expired => "approval_expired",
            AuditKind::Kill => "kill",
            AuditKind::Unkill => "unkill",
            AuditKind::Reload => "policy_reload",
            AuditKind::ReloadFailed => "policy_reload_failed",
        }
    }
}

/// One audit record (fixed size, `Copy`).
#[derive(Clone, Copy, Debug, Default)]
pub struct AuditRecord {
    /// What happened.
    pub kind: AuditKind,
    /// When (unix ns).
    pub at_ns: u64,
    /// Intent sequence (0 when not about an intent).
    pub seq: u64,
    /// Submitting principal.
    pub principal: u32,
    /// Acting principal (approver, admin).
    pub actor: u32,
    /// Account index.
    pub account: u16,
    /// Intent kind.
    pub intent_kind: IntentKind,
    /// Route: for a decision, the one it resolved (`public` or `private`); otherwise the
    /// intent's route as it stood.
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
    /// Reason (deny, rejection, expiry).
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
}

impl AuditRecord {
    /// The record of a policy decision on intent `msg`.
    pub fn decision(msg: &crate::msg::IntentMsg, v: &Verdict, at_ns: u64) -> Self {
        let (reason, detail) = match v.outcome {
            Outcome::Allow => (Reason::None, ""),
            Outcome::Deny(r, m) => (r, m),
            Outcome::Approval(m) => (Reason::None, m),
        };
        Self {
            kind: AuditKind::Decision,
            at_ns,
            seq: msg.seq,
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
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct AuditStats {
    /// Records written.
    pub written: AtomicU64,
    /// Write errors.
    pub errors: AtomicU64,
}

/// A bounded audit channel.
pub fn channel(capacity: usize) -> (AuditSink, Receiver<AuditRecord>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    (AuditSink { tx }, rx)
}

/// Renders one record as a JSON object.
pub fn render(r: &AuditRecord, principals: &Principals, accounts: &[String]) -> Value {
    let name = |p: u32| (p != 0).then(|| principals.name(p)).flatten();
    let mut v = json!({
        "kind": r.kind.as_str(),
        "at_ns": r.at_ns,
    });
    if r.seq != 0 {
        v["seq"] = json!(r.seq);
        v["principal"] = json!(name(r.principal));
        v["account"] = json!(accounts.get(r.account as usize));
        v["intent_kind"] = json!(r.intent_kind.as_str());
        v["route"] = json!(r.route.as_str());
        if let Some(asked) = r.route_requested {
            v["route_requested"] = json!(asked.as_str());
        }
        v["to"] = json!(r.to);
        v["beneficiary"] = json!(r.beneficiary);
        v["amount"] = json!(r.amount.to_string());
        v["asset_slot"] = json!(r.asset);
    }
    if r.actor != 0 {
        v["actor"] = json!(name(r.actor));
    }
    if let Some(o) = r.outcome {
        v["outcome"] = json!(match o {
            Outcome::Allow => "allow",
            Outcome::Deny(..) => "deny",
            Outcome::Approval(_) => "approval_required",
        });
    }
    if r.reason != Reason::None {
        v["reason"] = json!(r.reason.as_str());
    }
    if !r.detail.as_str().is_empty() {
        v["detail"] = json!(r.detail.as_str());
    }
    if r.policy_version != 0 {
        v["policy_version"] = json!(r.policy_version);
    }
    if let Some(k) = r.kyt {
        v["kyt"] = match k {
            KytLookup::Sanctioned => json!({"result": "sanctioned"}),
            KytLookup::Fresh { score, age_ns } => {
                json!({"result": "fresh", "score": score, "age_ms": age_ns / 1_000_000})
            }
            KytLookup::Expired { score, age_ns } => {
                json!({"result": "expired", "score": score, "age_ms": age_ns / 1_000_000})
            }
            KytLookup::Missing => json!({"result": "missing"}),
        };
    }
    if let Some((rule, used_value, used_count)) = r.velocity {
        v["velocity"] =
            json!({"rule": rule, "used_value": used_value.to_string(), "used_count": used_count});
    }
    if r.travel.present {
        v["travel_rule_hash"] = json!(r.travel.hash);
    }
    if r.approved_by != 0 {
        v["approved_by"] = json!(name(r.approved_by));
    }
    v
}

/// Spawns the writer: JSON lines appended to `path`, or to the log (target `audit`) when
/// no file is configured.
pub fn spawn_writer(
    path: Option<PathBuf>,
    rx: Receiver<AuditRecord>,
    principals: Arc<Principals>,
    accounts: Vec<String>,
    stats: Arc<AuditStats>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let mut file = match &path {
        Some(p) => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            Some(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ))
        }
        None => None,
    };
    std::thread::Builder::new()
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
            loop {
                match rx.try_recv() {
                    Ok(r) => {
                        idle = IDLE_MIN;
                        pending_flush = true;
                        let line = render(&r, &principals, &accounts).to_string();
                        match &mut file {
                            Some(f) => {
                                if writeln!(f, "{line}").is_err() {
                                    stats.errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            None => tracing::info!(target: "audit", "{line}"),
                        }
                        stats.written.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if pending_flush {
                            pending_flush = false;
                            if let Some(f) = &mut file
                                && f.flush().is_err()
                            {
                                stats.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if e == TryRecvError::Disconnected {
                            break;
                        }
                        std::thread::sleep(idle);
                        idle = (idle * 2).min(IDLE_MAX);
                    }
                }
            }
        })
}
