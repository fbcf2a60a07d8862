//! Four-eyes: intents that need an approval wait here, outside the rings, until another
//! principal with the `approver` role approves or rejects them, or their time runs out.
//!
//! The policy stage hands a waiting intent over a bounded channel (no lock on its side).
//! `approve` puts the intent back into the intake ring marked with its approver; intake
//! lets it through with its sequence number and the policy stage decides it again under
//! the policy then in force (kill switch, velocity, …), skipping only the approval.
//!
//! Invariants: the submitter can never approve or reject their own intent; an intent
//! leaves this set exactly once (approved, rejected or expired); a refused or expired
//! intent's calldata slot goes back to the pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use pipeline::{Full, ManyToOneProducer, now_raw};

use crate::blob::BlobPool;
use crate::msg::{IntentId, IntentMsg, Reason, State, StatusMsg};
use crate::risk::audit::{AuditKind, AuditRecord, AuditSink};
use crate::risk::unix_now_ns;
use crate::stages::StatusSink;

/// Most approvals an intent can be made to need (an account's custody quorum).
pub const MAX_QUORUM: usize = 4;

/// An intent waiting for approval.
#[derive(Clone, Copy, Debug)]
pub struct PendingIntent {
    /// The intent (sequenced; owns its calldata slot while it waits).
    pub msg: IntentMsg,
    /// When it expires.
    pub deadline: Instant,
    /// Why it needs an approval.
    pub why: &'static str,
    /// Approvals by distinct approvers it needs (1 to [`MAX_QUORUM`]).
    pub needed: u8,
    /// Approvers so far (`approvers[..got]`).
    pub approvers: [u32; MAX_QUORUM],
    /// How many approved so far.
    pub got: u8,
}

impl PendingIntent {
    /// An intent that needs `needed` approvals (clamped to 1..=[`MAX_QUORUM`]).
    pub fn new(msg: IntentMsg, deadline: Instant, why: &'static str, needed: u8) -> Self {
        Self {
            msg,
            deadline,
            why,
            needed: needed.clamp(1, MAX_QUORUM as u8),
            approvers: [0; MAX_QUORUM],
            got: 0,
        }
    }
}

/// What an accepted approval did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Approved {
    /// The intent's sequence number.
    pub seq: u64,
    /// Approvals still needed (0: the intent went on to signing).
    pub remaining: u8,
}

/// Why an approval op was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    /// No intent with that id waits for approval.
    #[error("no intent with this id is waiting for approval")]
    NotFound,
    /// The approver submitted the intent.
    #[error("the submitter of an intent cannot approve or reject it")]
    SelfApproval,
    /// Several principals have a waiting intent with this id.
    #[error("several submitters have a waiting intent with this id; name the `submitter`")]
    Ambiguous,
    /// This approver has already approved the intent (a quorum needs distinct approvers).
    #[error("this approver has already approved the intent; another approver must")]
    AlreadyApproved,
    /// The intake ring is full; the intent still waits.
    #[error("the engine is overloaded; the intent still waits, retry the approval")]
    Overloaded,
}

/// One row of the `pending` listing.
#[derive(Clone, Debug)]
pub struct PendingRow {
    /// The waiting intent.
    pub msg: IntentMsg,
    /// Time left.
    pub expires_in: Duration,
    /// Why it waits.
    pub why: &'static str,
}

/// The pending set.
#[derive(Debug)]
pub struct Approvals {
    inbox: Receiver<PendingIntent>,
    waiting: Mutex<HashMap<(u32, IntentId), PendingIntent>>,
    intake: ManyToOneProducer<IntentMsg>,
    status: StatusSink,
    blobs: Arc<BlobPool>,
    audit: AuditSink,
}

impl Approvals {
    /// The set, fed by the policy stage through `inbox`.
    pub fn new(
        inbox: Receiver<PendingIntent>,
        intake: ManyToOneProducer<IntentMsg>,
        status: StatusSink,
        blobs: Arc<BlobPool>,
        audit: AuditSink,
    ) -> Self {
        Self {
            inbox,
            waiting: Mutex::new(HashMap::new()),
            intake,
            status,
            blobs,
            audit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u32, IntentId), PendingIntent>> {
        let mut g = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in self.inbox.try_iter() {
            g.insert((p.msg.origin.principal, p.msg.id), p);
        }
        g
    }

    fn find(
        map: &HashMap<(u32, IntentId), PendingIntent>,
        id: &IntentId,
        submitter: Option<u32>,
    ) -> Result<(u32, IntentId), ApprovalError> {
        if let Some(s) = submitter {
            return map
                .contains_key(&(s, *id))
                .then_some((s, *id))
                .ok_or(ApprovalError::NotFound);
        }
        let mut hits = map.keys().filter(|(_, i)| i == id);
        match (hits.next(), hits.next()) {
            (Some(k), None) => Ok(*k),
            (None, _) => Err(ApprovalError::NotFound),
            (Some(_), Some(_)) => Err(ApprovalError::Ambiguous),
        }
    }

    /// Approves. When the intent has all the approvals it needs it goes back to intake
    /// (then `remaining` is 0); otherwise it keeps waiting for other approvers.
    pub fn approve(
        &self,
        id: &IntentId,
        submitter: Option<u32>,
        approver: u32,
    ) -> Result<Approved, ApprovalError> {
        let mut map = self.lock();
        let key = Self::find(&map, id, submitter)?;
        if key.0 == approver {
            return Err(ApprovalError::SelfApproval);
        }
        let Some(p) = map.get_mut(&key) else {
            return Err(ApprovalError::NotFound);
        };
        if p.approvers[..usize::from(p.got)].contains(&approver) {
            return Err(ApprovalError::AlreadyApproved);
        }
        let seq = p.msg.seq;
        if p.got + 1 < p.needed {
            p.approvers[usize::from(p.got)] = approver;
            p.got += 1;
            let remaining = p.needed - p.got;
            let record = AuditRecord {
                kind: AuditKind::Approved,
                actor: approver,
                ..AuditRecord::decision_free(&p.msg)
            };
            drop(map);
            self.audit.record(record);
            return Ok(Approved { seq, remaining });
        }
        let msg = IntentMsg {
            approved_by: approver,
            ..p.msg
        };
        if let Err(Full(_)) = self.intake.try_push(msg) {
            return Err(ApprovalError::Overloaded);
        }
        let p = map.remove(&key).expect("found above");
        drop(map);
        self.audit.record(AuditRecord {
            kind: AuditKind::Approved,
            actor: approver,
            ..AuditRecord::decision_free(&p.msg)
        });
        Ok(Approved { seq, remaining: 0 })
    }

    /// Rejects; returns the intent's sequence number.
    pub fn reject(
        &self,
        id: &IntentId,
        submitter: Option<u32>,
        rejecter: u32,
        reason: &str,
    ) -> Result<u64, ApprovalError> {
        let mut map = self.lock();
        let key = Self::find(&map, id, submitter)?;
        if key.0 == rejecter {
            return Err(ApprovalError::SelfApproval);
        }
        let Some(p) = map.remove(&key) else {
            return Err(ApprovalError::NotFound);
        };
        drop(map);
        let text = if reason.is_empty() {
            "refused by an approver".to_owned()
        } else {
            format!("refused by an approver: {reason}")
        };
        self.finish(&p, State::Rejected, Reason::ApprovalRejected, &text);
        self.audit.record(AuditRecord {
            kind: AuditKind::Rejected,
            actor: rejecter,
            reason: Reason::ApprovalRejected,
            detail: crate::msg::Detail::new(reason),
            ..AuditRecord::decision_free(&p.msg)
        });
        Ok(p.msg.seq)
    }

    fn finish(&self, p: &PendingIntent, state: State, reason: Reason, text: &str) {
        self.blobs.release(p.msg.data);
        self.status.send(StatusMsg {
            policy_version: p.msg.policy_version,
            ..StatusMsg::refusal(p.msg.seq, p.msg.origin, state, reason, text, now_raw())
        });
    }

    /// Fails every intent whose time ran out; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let expired: Vec<PendingIntent> = {
            let mut map = self.lock();
            let keys: Vec<_> = map
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for p in &expired {
            self.finish(
                p,
                State::Failed,
                Reason::ApprovalExpired,
                "no approval arrived in time",
            );
            self.audit.record(AuditRecord {
                kind: AuditKind::Expired,
                reason: Reason::ApprovalExpired,
                ..AuditRecord::decision_free(&p.msg)
            });
        }
        expired.len()
    }

    /// What waits, oldest deadline first.
    pub fn pending(&self) -> Vec<PendingRow> {
        let now = Instant::now();
        let map = self.lock();
        let mut rows: Vec<PendingRow> = map
            .values()
            .map(|p| PendingRow {
                msg: p.msg,
                expires_in: p.deadline.saturating_duration_since(now),
                why: p.why,
            })
            .collect();
        rows.sort_by_key(|r| r.expires_in);
        rows
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.lock().values().map(|p| p.deadline).min()
    }

    /// Runs the expiry clock on its own thread until `stop`.
    pub fn spawn_sweeper(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("approvals".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let now = Instant::now();
                    let wait = me
                        .next_deadline()
                        .map_or(Duration::from_millis(100), |d| {
                            d.saturating_duration_since(now)
                        })
                        .min(Duration::from_millis(100));
                    match me.inbox.recv_timeout(wait) {
                        Ok(p) => {
                            me.waiting
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .insert((p.msg.origin.principal, p.msg.id), p);
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => {
                            std::thread::sleep(wait);
                        }
                    }
                    me.sweep(Instant::now());
                }
            })
    }
}

impl AuditRecord {
    /// A record about intent `msg` that is not a policy decision.
    pub fn decision_free(msg: &IntentMsg) -> Self {
        Self {
            at_ns: unix_now_ns(),
            seq: msg.seq,
            intent: msg.id,
            principal: msg.origin.principal,
            account: msg.account.0,
            intent_kind: msg.kind,
            route: msg.route,
            to: msg.to,
            beneficiary: msg.to,
            amount: u128::try_from(msg.value).unwrap_or(u128::MAX),
            asset: msg.asset,
            policy_version: msg.policy_version,
            travel: msg.travel,
            ..Self::default()
        }
    }
}
