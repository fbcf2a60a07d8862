//! The signing orchestrator: for every account, which custody boundary and key signs, the
//! standby that takes over when it is unavailable, and how many approvals its intents need.
//!
//! [`Custody::build`] turns the accounts' [`KeyConfig`]s into [`AnySigner`]s at start-up:
//! local keys and HSM keys sign inline on the signing stage's thread; KMS and MPC keys
//! (and any pair with a standby where one side is async) are registered with one
//! [`AsyncWorker`] that runs beside the stage. Every start-up failure names the account and
//! what is wrong (wrong PIN, missing token, unknown KMS key, missing share file, a standby
//! with a different address, a backend this binary was built without).
//!
//! Invariants: an account's primary and standby have the same address; secrets (PINs,
//! share contents, AWS secret keys) are read here from their files or the environment and
//! never logged or kept in the configuration.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use signers::worker::{AsyncWorker, AsyncWorkerConfig, WakeFn};
use signers::{AnySigner, Backend, LocalCurve, LocalSigner, SignerError};

use crate::config::{AccountConfig, Config, KeyConfig};
use crate::error::EngineError;
use crate::stages::signing::{AsyncSigning, WakeCell};

/// One account's signing set-up.
#[derive(Debug)]
pub struct CustodyAccount {
    /// The key, with its standby when configured.
    pub signer: AnySigner,
    /// Index at the async worker (async keys only).
    pub worker_index: Option<u16>,
    /// Backend of the primary key.
    pub backend: Backend,
    /// Backend of the standby, if any.
    pub standby: Option<Backend>,
    /// Approvals by distinct approvers its intents need (0 = as the policy says).
    pub approvals: u8,
}

/// Every account's signing set-up and the async worker they share.
#[derive(Debug)]
pub struct Custody {
    /// In configuration order.
    pub accounts: Vec<CustodyAccount>,
    /// Present when any key is async.
    pub asynced: Option<AsyncSigning>,
}

fn err(account: &str, source: SignerError) -> EngineError {
    EngineError::Signer {
        account: account.to_owned(),
        source,
    }
}

fn cfg_err(what: impl Into<String>, reason: impl Into<String>) -> SignerError {
    SignerError::Config {
        what: what.into(),
        reason: reason.into(),
    }
}

/// First line of a secret file (trailing newline removed).
#[cfg_attr(not(any(feature = "hsm", feature = "kms")), allow(dead_code))]
fn read_secret(path: &Path, what: &str) -> Result<String, SignerError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| cfg_err(what, format!("cannot read {}: {e}", path.display())))?;
    let line = text.lines().next().unwrap_or("").trim_end().to_owned();
    if line.is_empty() {
        return Err(cfg_err(what, format!("{} is empty", path.display())));
    }
    Ok(line)
}

/// Lazily started worker (only when some key is async).
struct WorkerSlot {
    worker: Option<AsyncWorker>,
    wake: WakeCell,
    capacity: usize,
}

impl WorkerSlot {
    fn get(&mut self) -> Result<&mut AsyncWorker, SignerError> {
        if self.worker.is_none() {
            let cell = Arc::clone(&self.wake);
            let wake: WakeFn = Box::new(move || {
                if let Some(signal) = cell.get() {
                    signal.notify();
                }
            });
            let cfg = AsyncWorkerConfig {
                capacity: self.capacity,
                thread_name: "signers-async".into(),
            };
            self.worker = Some(AsyncWorker::start(&cfg, Some(wake))?);
        }
        Ok(self.worker.as_mut().expect("started above"))
    }
}

impl Custody {
    /// Builds every account's signer; fails on the first account that cannot sign.
    pub fn build(cfg: &Config) -> Result<Custody, EngineError> {
        let mut slot = WorkerSlot {
            worker: None,
            wake: Arc::new(OnceLock::new()),
            capacity: cfg.async_sign_capacity.max(1),
        };
        let retry = Duration::from_millis(cfg.failover_retry_ms);
        let mut built = Vec::with_capacity(cfg.accounts.len());
        for a in &cfg.accounts {
            built.push(Self::account(a, &mut slot, retry)?);
        }
        let mut accounts = Vec::with_capacity(built.len());
        for (a, (signer, backend, standby)) in cfg.accounts.iter().zip(built) {
            let worker_index = match &signer {
                AnySigner::Async(s) => Some(
                    slot.get()
                        .map_err(|e| err(&a.name, e))?
                        .register(Arc::clone(s)),
                ),
                AnySigner::Sync(_) => None,
            };
            tracing::info!(
                account = %a.name,
                address = %signer.address(),
                backend = backend.as_str(),
                standby = standby.map(Backend::as_str),
                key_id = signer.key_id(),
                "custody"
            );
            accounts.push(CustodyAccount {
                signer,
                worker_index,
                backend,
                standby,
                approvals: a.approvals,
            });
        }
        let asynced = slot.worker.map(|w| AsyncSigning {
            worker: Arc::new(w),
            wake: slot.wake,
            queue_limit: cfg.async_sign_capacity.max(1),
        });
        Ok(Custody { accounts, asynced })
    }

    fn account(
        a: &AccountConfig,
        slot: &mut WorkerSlot,
        retry: Duration,
    ) -> Result<(AnySigner, Backend, Option<Backend>), EngineError> {
        let primary = key(&a.name, &a.key, slot).map_err(|e| err(&a.name, e))?;
        let backend = primary.backend();
        let Some(standby_cfg) = &a.standby else {
            return Ok((primary, backend, None));
        };
        let standby =
            key(&format!("{}-standby", a.name), standby_cfg, slot).map_err(|e| err(&a.name, e))?;
        let sb = standby.backend();
        let pair = primary
            .with_standby(standby, retry)
            .map_err(|e| err(&a.name, e))?;
        Ok((pair, backend, Some(sb)))
    }
}

/// Builds one key.
#[allow(unused_variables)]
fn key(name: &str, k: &KeyConfig, slot: &mut WorkerSlot) -> Result<AnySigner, SignerError> {
    match k {
        KeyConfig::Local { secret_hex } => Ok(AnySigner::Sync(Arc::new(LocalSigner::from_hex(
            name,
            secret_hex,
            LocalCurve::Secp256k1,
        )?))),
        KeyConfig::Hsm {
            module,
            token_label,
            key_label,
            pin_file,
            pin_env,
            sessions,
        } => {
            #[cfg(feature = "hsm")]
            {
                let cfg = hsm_config(module, token_label, key_label, pin_file, pin_env, *sessions)?;
                Ok(AnySigner::Sync(Arc::new(signers::hsm::HsmSigner::open(
                    &cfg,
                )?)))
            }
            #[cfg(not(feature = "hsm"))]
            Err(not_built("hsm"))
        }
        KeyConfig::Kms {
            key_id,
            region,
            endpoint_url,
            access_key_id,
            secret_access_key_file,
            operation_timeout_ms,
        } => {
            #[cfg(feature = "kms")]
            {
                use signers::kms::KmsSigner;
                let cfg = kms_config(
                    key_id,
                    region,
                    endpoint_url,
                    access_key_id,
                    secret_access_key_file,
                    *operation_timeout_ms,
                )?;
                let worker = slot.get()?;
                // Connected on the worker's runtime so its connections are driven there.
                let signer = worker.block_on(KmsSigner::connect(&cfg))?;
                Ok(AnySigner::Async(Arc::new(signer)))
            }
            #[cfg(not(feature = "kms"))]
            Err(not_built("kms"))
        }
        KeyConfig::Mpc {
            share_files,
            parties,
            state_dir,
            pool_depth,
            low_water,
            wait_timeout_ms,
            spin_us,
            coordinator_spin_us,
        } => {
            #[cfg(feature = "mpc")]
            {
                use signers::mpc::{MpcConfig, MpcSigner};
                let cfg = MpcConfig {
                    pool_depth: *pool_depth,
                    low_water: *low_water,
                    wait_timeout: Duration::from_millis(*wait_timeout_ms),
                    spin: Duration::from_micros(*spin_us),
                    coordinator_spin: Duration::from_micros(*coordinator_spin_us),
                    ..MpcConfig::new(share_files.clone(), parties.clone(), state_dir.clone())
                };
                Ok(AnySigner::Async(Arc::new(MpcSigner::start(&cfg)?)))
            }
            #[cfg(not(feature = "mpc"))]
            Err(not_built("mpc"))
        }
    }
}

/// The PKCS#11 settings of an `hsm` key, with its PIN read.
#[cfg(feature = "hsm")]
fn hsm_config(
    module: &Path,
    token_label: &str,
    key_label: &str,
    pin_file: &Option<std::path::PathBuf>,
    pin_env: &Option<String>,
    sessions: usize,
) -> Result<signers::hsm::HsmConfig, SignerError> {
    use signers::hsm::{AuthPin, HsmConfig};
    let pin = match (pin_file, pin_env) {
        (Some(f), _) => read_secret(f, "hsm pin_file")?,
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            cfg_err(
                "hsm pin_env",
                format!("environment variable {var} is not set"),
            )
        })?,
        (None, None) => {
            return Err(cfg_err("hsm", "pin_file or pin_env is required"));
        }
    };
    Ok(HsmConfig {
        sessions: sessions.max(1),
        ..HsmConfig::new(module, token_label, AuthPin::from(pin), key_label)
    })
}

/// The KMS settings of a `kms` key, with its secret read.
#[cfg(feature = "kms")]
fn kms_config(
    key_id: &str,
    region: &str,
    endpoint_url: &Option<String>,
    access_key_id: &Option<String>,
    secret_access_key_file: &Option<std::path::PathBuf>,
    operation_timeout_ms: u64,
) -> Result<signers::kms::KmsConfig, SignerError> {
    use signers::kms::{KmsConfig, KmsCredentials};
    let credentials = match (access_key_id, secret_access_key_file) {
        (Some(id), Some(f)) => Some(KmsCredentials {
            access_key_id: id.clone(),
            secret_access_key: read_secret(f, "kms secret_access_key_file")?,
        }),
        (None, None) => None,
        _ => {
            return Err(cfg_err(
                "kms",
                "access_key_id and secret_access_key_file go together",
            ));
        }
    };
    Ok(KmsConfig {
        endpoint_url: endpoint_url.clone(),
        credentials,
        operation_timeout: Duration::from_millis(operation_timeout_ms),
        ..KmsConfig::new(region, key_id)
    })
}

/// Where a key-encryption key lives, with its settings and secrets read.
enum KekTarget {
    #[cfg(feature = "hsm")]
    Hsm(signers::hsm::HsmConfig),
    #[cfg(feature = "kms")]
    Kms(signers::kms::KmsConfig),
}

/// The KEK settings of `k`: an AES key in a PKCS#11 token, or a symmetric KMS key.
#[allow(unused_variables)]
fn kek_target(k: &KeyConfig) -> Result<KekTarget, SignerError> {
    match k {
        KeyConfig::Hsm {
            module,
            token_label,
            key_label,
            pin_file,
            pin_env,
            ..
        } => {
            #[cfg(feature = "hsm")]
            {
                let cfg = hsm_config(module, token_label, key_label, pin_file, pin_env, 1)?;
                Ok(KekTarget::Hsm(cfg))
            }
            #[cfg(not(feature = "hsm"))]
            Err(not_built("hsm"))
        }
        KeyConfig::Kms {
            key_id,
            region,
            endpoint_url,
            access_key_id,
            secret_access_key_file,
            operation_timeout_ms,
        } => {
            #[cfg(feature = "kms")]
            {
                let cfg = kms_config(
                    key_id,
                    region,
                    endpoint_url,
                    access_key_id,
                    secret_access_key_file,
                    *operation_timeout_ms,
                )?;
                Ok(KekTarget::Kms(cfg))
            }
            #[cfg(not(feature = "kms"))]
            Err(not_built("kms"))
        }
        KeyConfig::Local { .. } | KeyConfig::Mpc { .. } => Err(cfg_err(
            format!("at_rest.kek backend `{}`", k.backend()),
            "cannot hold a key-encryption key (use hsm or kms)",
        )),
    }
}

/// The key-encryption key of `[at_rest]` (see `crate::atrest`), opened and probed.
pub fn kek(k: &KeyConfig) -> Result<Arc<dyn signers::kek::KeyWrap>, SignerError> {
    match kek_target(k)? {
        #[cfg(feature = "hsm")]
        KekTarget::Hsm(cfg) => Ok(Arc::new(signers::hsm::HsmKek::open(&cfg)?)),
        #[cfg(feature = "kms")]
        KekTarget::Kms(cfg) => Ok(Arc::new(signers::kms::KmsKek::connect(&cfg)?)),
    }
}

/// Makes the key-encryption key `k` names, for `engine kek generate`: an AES-256 secret key
/// inside the token (refused if the label is taken), or a new symmetric KMS key (its id is
/// returned, for the configuration's `key_id`). Returns what was made, in words.
pub fn generate_kek(k: &KeyConfig) -> Result<String, SignerError> {
    match kek_target(k)? {
        #[cfg(feature = "hsm")]
        KekTarget::Hsm(cfg) => {
            signers::hsm::HsmKek::generate(&cfg)?;
            let kek = signers::hsm::HsmKek::open(&cfg)?;
            Ok(format!(
                "created the AES-256 key-encryption key {} (sensitive, not extractable)",
                signers::kek::KeyWrap::id(&kek)
            ))
        }
        #[cfg(feature = "kms")]
        KekTarget::Kms(cfg) => {
            let id = signers::kms::KmsKek::create_key(&cfg, "engine at-rest key-encryption key")?;
            Ok(format!(
                "created the KMS key {id} (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT); set at_rest.kek.key_id = \"{id}\""
            ))
        }
    }
}

/// The sealer of `[at_rest]`, if configured.
pub fn sealer(cfg: &crate::config::Config) -> Result<Option<crate::atrest::Sealer>, EngineError> {
    let Some(r) = &cfg.at_rest else {
        return Ok(None);
    };
    let kek = kek(&r.kek).map_err(|source| EngineError::Signer {
        account: "at_rest.kek".into(),
        source,
    })?;
    tracing::info!(
        kek = kek.id(),
        "encryption at rest: journal and audit segments sealed"
    );
    Ok(Some(crate::atrest::Sealer::new(kek)))
}

#[allow(dead_code)]
fn not_built(backend: &str) -> SignerError {
    cfg_err(
        format!("backend `{backend}`"),
        format!("this engine was built without it (build with `--features {backend}`)"),
    )
}

/// What `/metrics` and `/health` show of custody: per account its backend, standby,
/// fail-overs and (MPC) presignatures ready; the async worker's outstanding requests.
#[derive(Debug, Clone)]
pub struct CustodyView {
    /// One row per account, in configuration order.
    pub accounts: Vec<CustodyRow>,
    /// The async worker, when any key is async.
    pub worker: Option<Arc<AsyncWorker>>,
}

/// One account in [`CustodyView`].
#[derive(Debug, Clone)]
pub struct CustodyRow {
    /// Account name.
    pub name: String,
    /// The account's signer (for its live counters).
    pub signer: AnySigner,
    /// Primary backend.
    pub backend: Backend,
    /// Standby backend.
    pub standby: Option<Backend>,
    /// Custody quorum.
    pub approvals: u8,
}

impl Custody {
    /// The view for metrics and health (clones handles; call before the accounts move on).
    pub fn view(&self, names: &[String]) -> CustodyView {
        CustodyView {
            accounts: self
                .accounts
                .iter()
                .zip(names)
                .map(|(a, name)| CustodyRow {
                    name: name.clone(),
                    signer: a.signer.clone(),
                    backend: a.backend,
                    standby: a.standby,
                    approvals: a.approvals,
                })
                .collect(),
            worker: self.asynced.as_ref().map(|a| Arc::clone(&a.worker)),
        }
    }
}

impl CustodyView {
    /// Prometheus text.
    pub fn prometheus(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::with_capacity(1024);
        s.push_str("# HELP engine_signer_info Custody of each account (value 1).\n# TYPE engine_signer_info gauge\n");
        for a in &self.accounts {
            let _ = writeln!(
                s,
                "engine_signer_info{{account=\"{}\",backend=\"{}\",standby=\"{}\",address=\"{}\",approvals=\"{}\"}} 1",
                a.name,
                a.backend.as_str(),
                a.standby.map_or("", Backend::as_str),
                a.signer.address(),
                a.approvals
            );
        }
        s.push_str("# HELP engine_signer_failovers_total Times signing moved to the standby: the primary was unavailable, or an SLO action moved it.\n# TYPE engine_signer_failovers_total counter\n");
        for a in self.accounts.iter().filter(|a| a.standby.is_some()) {
            let _ = writeln!(
                s,
                "engine_signer_failovers_total{{account=\"{}\"}} {}",
                a.name,
                a.signer.failovers()
            );
        }
        s.push_str("# HELP engine_signer_ready Requests the account's signer can serve without waiting (MPC: presignatures ready).\n# TYPE engine_signer_ready gauge\n");
        for a in &self.accounts {
            if let Some(n) = a.signer.available() {
                let _ = writeln!(s, "engine_signer_ready{{account=\"{}\"}} {n}", a.name);
            }
        }
        if let Some(w) = &self.worker {
            let _ = writeln!(
                s,
                "# HELP engine_async_sign_outstanding Signing requests at async signers (KMS, MPC).\n# TYPE engine_async_sign_outstanding gauge\nengine_async_sign_outstanding {}",
                w.outstanding()
            );
        }
        s
    }

    /// `/health` entries: one object per account.
    pub fn health_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.accounts
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "account": a.name,
                        "address": a.signer.address(),
                        "backend": a.backend.as_str(),
                        "standby": a.standby.map(Backend::as_str),
                        "failovers": a.signer.failovers(),
                        "ready": a.signer.available(),
                        "approvals": a.approvals,
                    })
                })
                .collect(),
        )
    }
}
