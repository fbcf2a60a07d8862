//! Policy (first cut): account known, destination allowlisted (deny by default), value
//! within the account's per-intent cap, kind and route executable. Decides from memory
//! only; no I/O.

use std::collections::HashSet;
use std::sync::Arc;

use alloy_primitives::{Address, U256};
use pipeline::{Emit, Stage, now_raw};

use crate::blob::BlobPool;
use crate::config::Config;
use crate::msg::{IntentKind, IntentMsg, Reason, Route, State, StatusMsg};
use crate::stages::StatusSink;

#[derive(Debug)]
struct AccountPolicy {
    allow: HashSet<Address>,
    max_value: U256,
}

/// The policy stage.
#[derive(Debug)]
pub struct PolicyStage {
    accounts: Vec<AccountPolicy>,
    status: StatusSink,
    blobs: Arc<BlobPool>,
}

/// A policy decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Go on to signing.
    Allow,
    /// Refused, with the protocol reason and a message for the desk.
    Deny(Reason, &'static str),
}

impl PolicyStage {
    /// Builds the rules from configuration.
    pub fn new(cfg: &Config, status: StatusSink, blobs: Arc<BlobPool>) -> Self {
        let accounts = cfg
            .accounts
            .iter()
            .map(|a| AccountPolicy {
                allow: a.allowlist.iter().copied().collect(),
                max_value: a.max_value_wei,
            })
            .collect();
        Self {
            accounts,
            status,
            blobs,
        }
    }

    /// Decides one intent.
    #[inline]
    pub fn decide(&self, msg: &IntentMsg) -> Decision {
        let Some(acct) = self.accounts.get(msg.account.0 as usize) else {
            return Decision::Deny(Reason::UnknownAccount, "account is not configured");
        };
        match msg.kind {
            IntentKind::Transfer | IntentKind::Call => {}
            IntentKind::StakeDeposit | IntentKind::StakeExit => {
                return Decision::Deny(
                    Reason::UnsupportedKind,
                    "staking intents are not enabled on this engine",
                );
            }
        }
        if msg.route == Route::Private {
            return Decision::Deny(
                Reason::RouteUnavailable,
                "no private relay is configured; use route public or auto",
            );
        }
        if !acct.allow.contains(&msg.to) {
            return Decision::Deny(
                Reason::NotAllowlisted,
                "destination is not on the account's allowlist",
            );
        }
        if msg.value > acct.max_value {
            return Decision::Deny(
                Reason::ValueCap,
                "value exceeds the account's per-intent cap",
            );
        }
        Decision::Allow
    }
}

impl Stage for PolicyStage {
    type In = IntentMsg;
    type Out = IntentMsg;

    fn name(&self) -> &'static str {
        "policy"
    }

    #[inline]
    fn on_message<E: Emit<IntentMsg>>(&mut self, msg: IntentMsg, out: &mut E) {
        match self.decide(&msg) {
            Decision::Allow => {
                self.status.send(StatusMsg::event(
                    msg.seq,
                    msg.origin,
                    State::Accepted,
                    now_raw(),
                ));
                out.emit(msg);
            }
            Decision::Deny(reason, message) => {
                self.blobs.release(msg.data);
                self.status.send(StatusMsg::refusal(
                    msg.seq,
                    msg.origin,
                    State::Rejected,
                    reason,
                    message,
                    now_raw(),
                ));
            }
        }
    }
}
