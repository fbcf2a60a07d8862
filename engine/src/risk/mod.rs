//! The risk engine: the gatekeeper before any key is touched.
//!
//! - [`rules`]: the compiled policy and the decision function, run by the policy stage
//!   from memory only (allowlists and groups, per-asset caps, contract-call rules,
//!   gas and fee maxima, business hours with time zones, KYT, travel rule, velocity, and
//!   four-eyes thresholds), deny by default; it also resolves `route: auto` to public or
//!   private (`[routing]`).
//! - [`file`]: policy files (TOML), validated with errors naming file, line and rule.
//! - [`velocity`]: O(1) rolling windows. [`kyt`]: address-risk snapshots and their
//!   refresher. [`travel`]: travel-rule data. [`kill`]: the kill switch.
//!   [`approvals`]: the four-eyes pending set. [`audit`]: the audit trail's records and
//!   its writer thread (the hash-chained log itself is [`crate::audit`]).
//! - [`RiskControl`]: the admin side: (re)loads policy files and hands the compiled
//!   policy to the stage whole, so no intent is ever decided by a half-loaded policy.
//!
//! Invariants: the policy stage never blocks on this module's locks (it receives new
//! policies and KYT snapshots through a channel it polls between decisions); every
//! decision carries the version of the policy that made it, and goes to the audit trail.

pub mod approvals;
pub mod audit;
pub mod file;
pub mod fixture;
pub mod kill;
pub mod kyt;
pub mod rules;
pub mod staking;
pub mod travel;
pub mod velocity;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::auth::Principals;
use crate::risk::audit::{AuditKind, AuditRecord, AuditSink};
use crate::risk::file::PolicyError;
use crate::risk::kill::KillSwitch;
use crate::risk::kyt::{KytRefresher, KytSnapshot, KytSource, KytStats};
use crate::risk::rules::{CompileCtx, Policy};

/// Wall-clock time in unix nanoseconds (policy time: windows, hours, KYT ages).
#[inline]
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What the policy stage receives between decisions.
#[derive(Debug)]
pub enum RiskUpdate {
    /// A new policy, whole.
    Policy(Box<Policy>),
    /// A new KYT snapshot.
    Kyt(Box<KytSnapshot>),
    /// The validators the chain has deposits for, whole.
    Validators(Box<staking::ValidatorSet>),
}

/// What the stage hands back to be dropped off its thread.
#[derive(Debug)]
pub enum Retired {
    /// A replaced policy.
    Policy(Box<Policy>),
    /// A replaced snapshot.
    Kyt(Box<KytSnapshot>),
    /// A replaced validator set.
    Validators(Box<staking::ValidatorSet>),
}

/// The channels between [`RiskControl`] and the policy stage.
#[derive(Debug)]
pub struct StageLink {
    /// Updates to apply before the next decision.
    pub updates: Receiver<RiskUpdate>,
    /// Where replaced state goes.
    pub retired: Sender<Retired>,
    /// The version the stage has in force (set by the stage).
    pub active_version: Arc<AtomicU32>,
}

/// Loads policies and KYT feeds off the hot path and hands them to the policy stage.
#[derive(Debug)]
pub struct RiskControl {
    path: Option<PathBuf>,
    accounts: HashMap<String, u16>,
    kill: Arc<KillSwitch>,
    principals: Arc<Principals>,
    venue: String,
    next_version: AtomicU32,
    updates: Sender<RiskUpdate>,
    retired: Receiver<Retired>,
    active_version: Arc<AtomicU32>,
    audit: AuditSink,
    kyt: Mutex<Option<(KytSource, std::time::Duration, KytRefresher)>>,
    /// KYT refresher counters.
    pub kyt_stats: Arc<KytStats>,
    reload_lock: Mutex<()>,
}

/// A successful (re)load.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// New version number.
    pub version: u32,
    /// Label from the file.
    pub label: String,
    /// keccak256 of the file.
    pub digest: alloy_primitives::B256,
}

impl RiskControl {
    /// Compiles the first policy (the file, or the configuration's rules when there is
    /// none) and returns it with the control side and the stage's end of the link.
    pub fn start(
        path: Option<PathBuf>,
        cfg: &crate::config::Config,
        kill: Arc<KillSwitch>,
        principals: Arc<Principals>,
        audit: AuditSink,
    ) -> Result<(Arc<RiskControl>, Box<Policy>, StageLink), PolicyError> {
        let accounts = cfg.account_indices();
        let (utx, urx) = crossbeam_channel::bounded(16);
        let (rtx, rrx) = crossbeam_channel::bounded(16);
        let active = Arc::new(AtomicU32::new(1));
        let ctl = Arc::new(RiskControl {
            path,
            accounts,
            kill,
            principals,
            venue: cfg.provider_name.clone(),
            next_version: AtomicU32::new(1),
            updates: utx,
            retired: rrx,
            active_version: Arc::clone(&active),
            audit,
            kyt: Mutex::new(None),
            kyt_stats: Arc::default(),
            reload_lock: Mutex::new(()),
        });
        let first = ctl.compile(cfg)?;
        ctl.configure_kyt(&first);
        ctl.record_reload(&first);
        Ok((
            Arc::clone(&ctl),
            Box::new(first),
            StageLink {
                updates: urx,
                retired: rtx,
                active_version: active,
            },
        ))
    }

    /// The stage link's send side and the retired-state receiver, for another thread that
    /// hands the policy stage whole state (the staking refresher's validator sets); it
    /// drains the receiver so replaced state is dropped off the stage's thread.
    pub fn update_handles(&self) -> (Sender<RiskUpdate>, Receiver<Retired>) {
        (self.updates.clone(), self.retired.clone())
    }

    fn compile(&self, cfg: &crate::config::Config) -> Result<Policy, PolicyError> {
        let version = self.next_version.fetch_add(1, Ordering::SeqCst);
        let ctx = CompileCtx {
            accounts: &self.accounts,
            kill: &self.kill,
            principals: &self.principals,
            venue: &self.venue,
        };
        match &self.path {
            Some(p) => Policy::load(p, ctx, version),
            None => Ok(Policy::from_config(cfg, ctx, version)),
        }
    }

    fn record_reload(&self, p: &Policy) {
        self.audit.record(AuditRecord {
            kind: AuditKind::Reload,
            at_ns: unix_now_ns(),
            policy_version: p.version,
            detail: crate::msg::Detail::new(&format!("{} {}", p.origin, p.digest)),
            ..AuditRecord::default()
        });
    }

    fn configure_kyt(&self, p: &Policy) {
        let mut cur = self
            .kyt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let same = match (&*cur, &p.kyt_source) {
            (Some((s, i, _)), Some((ns, ni))) => s == ns && i == ni,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        *cur = None; // stops the old refresher
        if let Some((src, interval)) = &p.kyt_source {
            let tx = self.updates.clone();
            let retired = self.retired.clone();
            let r = KytRefresher::spawn(
                src.clone(),
                *interval,
                Arc::clone(&self.kyt_stats),
                move |snap| {
                    // Drop what the stage handed back (old snapshots) here, off its thread.
                    while retired.try_recv().is_ok() {}
                    if let Err(TrySendError::Full(_)) = tx.try_send(RiskUpdate::Kyt(snap)) {
                        tracing::warn!(
                            "policy stage has not taken the previous KYT snapshot yet; skipped one"
                        );
                    }
                },
            );
            *cur = Some((src.clone(), *interval, r));
        }
    }

    /// Re-reads the policy file and hands it to the stage. A file that does not validate
    /// changes nothing and says why.
    pub fn reload(&self, cfg: &crate::config::Config) -> Result<Loaded, PolicyError> {
        let _g = self
            .reload_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while self.retired.try_recv().is_ok() {}
        let p = match self.compile(cfg) {
            Ok(p) => p,
            Err(e) => {
                self.audit.record(AuditRecord {
                    kind: AuditKind::ReloadFailed,
                    at_ns: unix_now_ns(),
                    detail: crate::msg::Detail::new(&e.to_string()),
                    ..AuditRecord::default()
                });
                return Err(e);
            }
        };
        self.configure_kyt(&p);
        self.record_reload(&p);
        let loaded = Loaded {
            version: p.version,
            label: p.label.clone(),
            digest: p.digest,
        };
        if self.updates.send(RiskUpdate::Policy(Box::new(p))).is_err() {
            return Err(PolicyError {
                file: self.path.clone().unwrap_or_default(),
                line: 0,
                rule: "engine".into(),
                message: "the policy stage is not running".into(),
            });
        }
        Ok(loaded)
    }

    /// The version the policy stage has in force.
    pub fn active_version(&self) -> u32 {
        self.active_version.load(Ordering::Acquire)
    }

    /// The kill switch.
    pub fn kill(&self) -> &Arc<KillSwitch> {
        &self.kill
    }

    /// Where the policy comes from: the file, or the engine configuration.
    pub fn policy_origin(&self) -> String {
        self.path.as_ref().map_or_else(
            || "the accounts' allowlists and caps in the configuration".to_owned(),
            |p| p.display().to_string(),
        )
    }

    /// Whether a policy file is configured (else the configuration's rules apply).
    pub fn has_file(&self) -> bool {
        self.path.is_some()
    }
}

/// Everything the desk side needs for the risk ops (`approve`, `reject`, `pending`,
/// `kill`, `unkill`, `reload_policy`).
#[derive(Debug)]
pub struct RiskAdmin {
    /// Policy loading.
    pub control: Arc<RiskControl>,
    /// The four-eyes pending set.
    pub approvals: Arc<approvals::Approvals>,
    /// The kill switch.
    pub kill: Arc<KillSwitch>,
    /// The audit trail.
    pub audit: AuditSink,
    /// Account names, by index.
    pub account_names: Vec<String>,
    /// The engine configuration (for policies derived from it).
    pub cfg: crate::config::Config,
    /// The audit writer thread: stopped (after writing what is queued, and syncing the
    /// log) when this is dropped.
    _audit_writer: audit::AuditWriter,
}

impl RiskAdmin {
    /// Turns a kill switch on or off and records it.
    pub fn set_kill(
        &self,
        scope: &crate::protocol::ScopeSpec,
        on: bool,
        actor: u32,
    ) -> Result<Vec<String>, String> {
        use crate::protocol::ScopeSpec;
        let s = match scope {
            ScopeSpec::All => kill::KillScope::All,
            ScopeSpec::Account(a) => kill::KillScope::Account(
                self.account_names
                    .iter()
                    .position(|n| n == a)
                    .ok_or_else(|| format!("no account `{a}`"))? as u16,
            ),
            ScopeSpec::Asset(a) => kill::KillScope::Asset(a.clone()),
            ScopeSpec::Venue(v) => kill::KillScope::Venue(v.clone()),
        };
        self.kill.set(&s, on).map_err(|e| e.to_string())?;
        self.audit.record(AuditRecord {
            kind: if on {
                AuditKind::Kill
            } else {
                AuditKind::Unkill
            },
            at_ns: unix_now_ns(),
            actor,
            detail: crate::msg::Detail::new(&format!("{s:?}")),
            ..AuditRecord::default()
        });
        Ok(self.kill.active(&self.account_names))
    }

    /// Reloads the policy and records it.
    pub fn reload(&self, actor: u32) -> Result<Loaded, PolicyError> {
        let r = self.control.reload(&self.cfg);
        if r.is_ok() {
            let _ = actor;
        }
        r
    }
}

/// The risk engine's parts, assembled: the admin side for the desk listener and the
/// pieces of the policy stage.
#[derive(Debug)]
pub struct RiskParts {
    /// Admin side.
    pub admin: Arc<RiskAdmin>,
    /// Decision state for the policy stage. It assumes no private relay: whoever gives
    /// broadcast one turns routing to it on with [`rules::Risk::set_private_relay`].
    pub risk: rules::Risk,
    /// Update channel for the policy stage.
    pub link: StageLink,
    /// Where the policy stage sends intents that need an approval.
    pub pending: Sender<approvals::PendingIntent>,
    /// Audit trail.
    pub audit: AuditSink,
    /// Audit writer counters.
    pub audit_stats: Arc<audit::AuditStats>,
    /// Stops the approvals clock.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Builds the risk engine for `cfg`: audit writer (its segments sealed by `sealer`, the
/// `[at_rest]` KEK, when there is one), kill switch, first policy (the file, or the
/// configuration's rules), four-eyes pending set and its clock.
pub fn assemble(
    cfg: &crate::config::Config,
    intake: pipeline::ManyToOneProducer<crate::msg::IntentMsg>,
    status: crate::stages::StatusSink,
    blobs: Arc<crate::blob::BlobPool>,
    principals: Arc<Principals>,
    sealer: Option<crate::atrest::Sealer>,
) -> Result<RiskParts, crate::error::EngineError> {
    let kill = Arc::new(KillSwitch::new(cfg.accounts.len()));
    let account_names: Vec<String> = cfg.accounts.iter().map(|a| a.name.clone()).collect();
    let (audit, audit_rx) = audit::channel(1 << 16);
    let audit_stats = Arc::new(audit::AuditStats::default());
    // A key file that others may read refuses the start, naming the file.
    let mut writer_cfg =
        audit::WriterConfig::from_config(cfg).map_err(|e| crate::error::EngineError::Config {
            what: e.to_string(),
        })?;
    writer_cfg.sealer = sealer;
    let audit_writer = audit::spawn_writer(
        writer_cfg,
        audit_rx,
        audit::AuditContext::from_config(cfg, Arc::clone(&principals)),
        Arc::clone(&audit_stats),
    )
    .map_err(|e| crate::error::EngineError::Config {
        what: format!("audit_dir: {e}"),
    })?;
    let (control, first, link) = RiskControl::start(
        cfg.policy_file.clone(),
        cfg,
        Arc::clone(&kill),
        principals,
        audit.clone(),
    )?;
    let (pending_tx, pending_rx) = crossbeam_channel::bounded(4096);
    let approvals = Arc::new(approvals::Approvals::new(
        pending_rx,
        intake,
        status,
        blobs,
        audit.clone(),
    ));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    approvals.spawn_sweeper(Arc::clone(&stop))?;
    Ok(RiskParts {
        admin: Arc::new(RiskAdmin {
            control,
            approvals,
            kill: Arc::clone(&kill),
            audit: audit.clone(),
            account_names,
            cfg: cfg.clone(),
            _audit_writer: audit_writer,
        }),
        risk: rules::Risk::new(first, kill),
        link,
        pending: pending_tx,
        audit,
        audit_stats,
        stop,
    })
}
