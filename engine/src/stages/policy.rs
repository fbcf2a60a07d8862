//! Policy: decides every intent before any key is touched, from state held in memory
//! ([`Risk`]): no I/O, no lock, no allocation per decision.
//!
//! Between two decisions the stage takes whole new policies and KYT snapshots from its
//! update channel (so no intent is decided by a half-loaded policy) and hands the
//! replaced ones back to be dropped elsewhere. Intents that need a four-eyes approval
//! leave the rings for the pending set; approved ones come back through intake marked with
//! their approver and are decided again. Every decision goes to the audit trail.
//!
//! Routing: an allowed intent leaves with the route the decision resolved (`Public` or
//! `Private`, never `Auto`), which signing copies into the transaction for broadcast. An
//! intent sent for approval keeps the route the desk asked for, so that its second
//! decision resolves it under the policy then in force.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crossbeam_channel::Sender;
use pipeline::{Emit, Stage, now_raw};

use crate::blob::BlobPool;
use crate::msg::{IntentMsg, State, StatusMsg};
use crate::risk::approvals::PendingIntent;
use crate::risk::audit::{AuditRecord, AuditSink};
use crate::risk::rules::{Outcome, Risk};
use crate::risk::{Retired, RiskUpdate, StageLink, unix_now_ns};
use crate::stages::StatusSink;

/// Why an intent of an account with a custody quorum waits.
const CUSTODY_QUORUM: &str = "the account's custody requires approvals by distinct approvers";

/// The policy stage.
#[derive(Debug)]
pub struct PolicyStage {
    risk: Risk,
    link: StageLink,
    pending: Sender<PendingIntent>,
    audit: AuditSink,
    status: StatusSink,
    blobs: Arc<BlobPool>,
    /// Approvals each account's custody requires (index = account; 0 = as the policy says).
    quorum: Box<[u8]>,
    /// Where deposits go to have their signatures and roots checked (none: staking off).
    verifier: Option<Sender<IntentMsg>>,
    /// Where allowed full exits (and consolidation sources) are announced, so the
    /// validator watch expects them.
    exits: Option<Sender<[u8; 48]>>,
}

impl PolicyStage {
    /// The stage, deciding with `risk` and updated through `link`.
    pub fn new(
        risk: Risk,
        link: StageLink,
        pending: Sender<PendingIntent>,
        audit: AuditSink,
        status: StatusSink,
        blobs: Arc<BlobPool>,
        quorum: Vec<u8>,
    ) -> Self {
        link.active_version
            .store(risk.policy().version, Ordering::Release);
        Self {
            risk,
            link,
            pending,
            audit,
            status,
            blobs,
            quorum: quorum.into_boxed_slice(),
            verifier: None,
            exits: None,
        }
    }

    /// Announces allowed full exits and consolidation sources on `exits` (never waits:
    /// a full channel loses the notice, and the watch then reports the exit as
    /// unexpected, the safe side).
    pub fn set_exit_notices(&mut self, exits: Sender<[u8; 48]>) {
        self.exits = Some(exits);
    }

    /// Sends deposits that passed every other check to the deposit verifier.
    pub fn set_verifier(&mut self, verifier: Sender<IntentMsg>) {
        self.verifier = Some(verifier);
    }

    /// Applies queued policy and KYT updates; returns how many.
    #[inline]
    fn apply_updates(&mut self) -> usize {
        let mut n = 0;
        while let Ok(u) = self.link.updates.try_recv() {
            n += 1;
            let old = match u {
                RiskUpdate::Policy(p) => {
                    let v = p.version;
                    let old = self.risk.swap_policy(p);
                    self.link.active_version.store(v, Ordering::Release);
                    Retired::Policy(old)
                }
                RiskUpdate::Kyt(k) => Retired::Kyt(self.risk.swap_kyt(k)),
                RiskUpdate::Validators(set) => Retired::Validators(self.risk.swap_validators(set)),
            };
            // Dropped by the control side; if it is not draining, drop here (rare).
            let _ = self.link.retired.try_send(old);
        }
        n
    }
}

impl Stage for PolicyStage {
    type In = IntentMsg;
    type Out = IntentMsg;

    fn name(&self) -> &'static str {
        "policy"
    }

    #[inline]
    fn on_message<E: Emit<IntentMsg>>(&mut self, mut msg: IntentMsg, out: &mut E) {
        if !self.link.updates.is_empty() {
            self.apply_updates();
        }
        let now_ns = unix_now_ns();
        let data: &[u8] = if msg.data.is_some() {
            // SAFETY: this stage holds the message, hence owns its calldata slot; the
            // slot is only read here.
            unsafe { self.blobs.bytes(msg.data) }
        } else {
            &[]
        };
        let mut v = self.risk.decide(&msg, data, now_ns);
        // The account's custody quorum: approvals by distinct approvers on top of what the
        // policy asks (an approved re-entry has had them all).
        let quorum = self
            .quorum
            .get(msg.account.0 as usize)
            .copied()
            .unwrap_or(0);
        if quorum > 0 && msg.approved_by == 0 && v.outcome == Outcome::Allow {
            v.outcome = Outcome::Approval(CUSTODY_QUORUM);
        }
        msg.policy_version = v.policy_version;
        msg.asset = v.asset;
        // A staking intent becomes the transaction the engine chose for it.
        if let Some(t) = v.stake {
            msg.to = t.to;
            msg.value = t.value;
            msg.gas_limit = t.gas;
        }
        self.audit.record(AuditRecord::decision(&msg, &v, now_ns));
        let at = now_raw();
        match v.outcome {
            Outcome::Allow => {
                if msg.max_fee_cap == 0 {
                    msg.max_fee_cap = v.max_fee;
                }
                msg.route = v.route;
                if let Some(tx) = &self.exits {
                    let leaving = match msg.kind {
                        crate::msg::IntentKind::StakeExit if data.len() == 56 => {
                            data[48..56] == [0; 8]
                        }
                        crate::msg::IntentKind::StakeConsolidate if data.len() == 96 => {
                            data[..48] != data[48..]
                        }
                        _ => false,
                    };
                    if leaving {
                        let mut pk = [0u8; 48];
                        pk.copy_from_slice(&data[..48]);
                        let _ = tx.try_send(pk);
                    }
                }
                if msg.kind == crate::msg::IntentKind::StakeDeposit {
                    self.risk.record_deposits(data);
                    // The packed entries become the deposit (or batch) call itself.
                    let mut packed = [0u8; crate::staking::MAX_PACKED_BYTES];
                    let n = data.len().min(packed.len());
                    packed[..n].copy_from_slice(&data[..n]);
                    // SAFETY: this stage holds the message, hence owns its calldata slot;
                    // the borrow of its bytes above ended with the copy.
                    let slot = unsafe { self.blobs.slot_mut(msg.data) };
                    match crate::staking::entries_to_calldata(&packed[..n], &mut slot[..]) {
                        Some(len) => msg.data.len = len as u32,
                        None => {
                            self.blobs.release(msg.data);
                            self.status.send(StatusMsg::refusal(
                                msg.seq,
                                msg.origin,
                                State::Rejected,
                                crate::msg::Reason::InvalidDeposit,
                                "entries: the deposit call does not fit a transaction buffer",
                                at,
                            ));
                            return;
                        }
                    }
                }
                let state = if msg.approved_by != 0 {
                    State::Approved
                } else {
                    State::Accepted
                };
                self.status.send(StatusMsg {
                    policy_version: v.policy_version,
                    route: v.route,
                    ..StatusMsg::event(msg.seq, msg.origin, state, at)
                });
                out.emit(msg);
            }
            Outcome::Approval(why) => {
                self.status.send(StatusMsg {
                    policy_version: v.policy_version,
                    route: v.route,
                    ..StatusMsg::event(msg.seq, msg.origin, State::Accepted, at)
                });
                self.status.send(StatusMsg {
                    policy_version: v.policy_version,
                    detail: crate::msg::Detail::new(why),
                    ..StatusMsg::event(msg.seq, msg.origin, State::PendingApproval, at)
                });
                let p = PendingIntent::new(
                    msg,
                    Instant::now() + self.risk.policy().approval_ttl,
                    why,
                    quorum.max(1),
                );
                // The pending set drains this channel continuously; waiting here is
                // back-pressure, never a drop.
                let _ = self.pending.send(p);
            }
            Outcome::Verify => {
                // Never wait here: a verifier that is behind (each entry costs about a
                // millisecond) must not stall every other intent. A full queue refuses the
                // deposit with `overloaded`; the desk may send it again under a new id.
                let refused = match &self.verifier {
                    Some(tx) => match tx.try_send(msg) {
                        Ok(()) => None,
                        Err(crossbeam_channel::TrySendError::Full(_)) => Some((
                            crate::msg::Reason::Overloaded,
                            "the deposit verifier's queue is full; send the deposit again later",
                        )),
                        Err(crossbeam_channel::TrySendError::Disconnected(_)) => Some((
                            crate::msg::Reason::Overloaded,
                            "the deposit verifier is not running",
                        )),
                    },
                    None => Some((
                        crate::msg::Reason::UnsupportedKind,
                        "the deposit verifier is not running",
                    )),
                };
                if let Some((reason, message)) = refused {
                    self.blobs.release(msg.data);
                    self.status.send(StatusMsg {
                        policy_version: v.policy_version,
                        ..StatusMsg::refusal(
                            msg.seq,
                            msg.origin,
                            State::Rejected,
                            reason,
                            message,
                            at,
                        )
                    });
                }
            }
            Outcome::Deny(reason, message) => {
                self.blobs.release(msg.data);
                self.status.send(StatusMsg {
                    policy_version: v.policy_version,
                    ..StatusMsg::refusal(msg.seq, msg.origin, State::Rejected, reason, message, at)
                });
            }
        }
    }

    fn poll_extra<E: Emit<IntentMsg>>(&mut self, _out: &mut E) -> usize {
        if self.link.updates.is_empty() {
            0
        } else {
            self.apply_updates()
        }
    }
}
