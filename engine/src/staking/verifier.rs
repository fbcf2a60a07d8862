//! The deposit verifier: the thread that checks each deposit entry's signature and SSZ
//! roots for the policy stage, so that a BLS pairing (about a millisecond) never runs on
//! a stage thread.
//!
//! The policy stage sends a deposit here once every other rule has passed (bounded
//! channel; the stage never waits on it: when it is full the deposit is `rejected` with
//! `overloaded`, so a burst of deposits cannot stall the other intents). Each entry is checked with
//! [`super::verify_entry`] for the configured fork version. All good: the intent goes back
//! into the intake ring marked `deposit_verified` (intake lets sequenced intents through)
//! and the policy stage decides it again under the policy then in force. One bad: the
//! intent is `rejected` with `invalid_deposit` and a message naming the entry and the
//! check, and its calldata slot is released. Either way the outcome is in the audit log.
//!
//! Invariants: an intent leaves this thread exactly once; `deposit_verified` is set here
//! and nowhere else; a full intake ring delays the intent, never loses it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use pipeline::{Full, ManyToOneProducer, now_raw};

use super::{unpack, verify_entries};
use crate::blob::BlobPool;
use crate::msg::{Detail, IntentMsg, Reason, State, StatusMsg};
use crate::risk::audit::{AuditKind, AuditRecord, AuditSink};
use crate::risk::rules::Outcome;
use crate::stages::StatusSink;

/// Counters of the verifier.
#[derive(Debug, Default)]
pub struct VerifierStats {
    /// Deposits whose entries all verified.
    pub verified: AtomicU64,
    /// Deposits refused (one entry failed a check).
    pub invalid: AtomicU64,
    /// Entries checked.
    pub entries: AtomicU64,
}

/// The verifier thread's inputs.
#[derive(Debug)]
pub struct DepositVerifier {
    /// Deposits from the policy stage.
    pub inbox: Receiver<IntentMsg>,
    /// Where verified deposits go back in.
    pub intake: ManyToOneProducer<IntentMsg>,
    /// Events.
    pub status: StatusSink,
    /// Calldata slots (the packed entries).
    pub blobs: Arc<BlobPool>,
    /// Audit trail.
    pub audit: AuditSink,
    /// The network's genesis fork version (deposit domain).
    pub fork_version: [u8; 4],
    /// Counters.
    pub stats: Arc<VerifierStats>,
}

/// Why one entry failed, as the desk reads it.
fn refusal_text(index: usize, check: super::CryptoCheck) -> Detail {
    Detail::new(&format!("deposits[{index}]: {}", check.message()))
}

impl DepositVerifier {
    /// Starts the `deposit-verify` thread; it runs until `stop` is set and the inbox is
    /// drained (or every sender is gone).
    pub fn spawn(self, stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("deposit-verify".into())
            .spawn(move || self.run(&stop))
    }

    fn run(self, stop: &AtomicBool) {
        loop {
            match self.inbox.recv_timeout(Duration::from_millis(100)) {
                Ok(msg) => self.check(msg, stop),
                Err(RecvTimeoutError::Timeout) if stop.load(Ordering::Acquire) => return,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Checks one deposit intent and sends it on (intake) or refuses it.
    pub fn check(&self, mut msg: IntentMsg, stop: &AtomicBool) {
        let failed = {
            let data: &[u8] = if msg.data.is_some() {
                // SAFETY: this thread holds the message, hence owns its calldata slot
                // until it hands the message on; the slot is only read here.
                unsafe { self.blobs.bytes(msg.data) }
            } else {
                &[]
            };
            match unpack(data) {
                None => Some(Detail::new("entries: malformed deposit entries")),
                Some((entries, n)) => {
                    self.stats.entries.fetch_add(n as u64, Ordering::Relaxed);
                    verify_entries(&entries[..n], self.fork_version)
                        .err()
                        .map(|(i, check)| refusal_text(i, check))
                }
            }
        };
        match failed {
            Some(detail) => {
                self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                self.audit.record(AuditRecord {
                    kind: AuditKind::DepositCheck,
                    outcome: Some(Outcome::Deny(Reason::InvalidDeposit, "")),
                    reason: Reason::InvalidDeposit,
                    detail,
                    policy_version: msg.policy_version,
                    ..AuditRecord::decision_free(&msg)
                });
                self.blobs.release(msg.data);
                self.status.send(StatusMsg {
                    policy_version: msg.policy_version,
                    reason: Reason::InvalidDeposit,
                    detail,
                    ..StatusMsg::event(msg.seq, msg.origin, State::Rejected, now_raw())
                });
            }
            None => {
                self.stats.verified.fetch_add(1, Ordering::Relaxed);
                self.audit.record(AuditRecord {
                    kind: AuditKind::DepositCheck,
                    outcome: Some(Outcome::Allow),
                    policy_version: msg.policy_version,
                    ..AuditRecord::decision_free(&msg)
                });
                msg.deposit_verified = true;
                // A full intake ring: wait for room (the intent is acked and journaled;
                // it must not be lost), but give up only when the engine stops.
                let mut m = msg;
                loop {
                    match self.intake.try_push(m) {
                        Ok(()) => break,
                        Err(Full(back)) => {
                            if stop.load(Ordering::Acquire) {
                                return;
                            }
                            m = back;
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                }
            }
        }
    }
}
