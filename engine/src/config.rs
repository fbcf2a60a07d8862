//! Engine configuration: accounts and their policy, the node, the thread layout.
//!
//! Loaded from a TOML file (`engine run --config FILE`) or built by dev mode.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use alloy_primitives::{Address, U256};
use serde::Deserialize;

use crate::error::EngineError;

/// How the CPU-bound stages (intake, policy, signing) map onto threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Decide from the cores this process may use: fused below
    /// [`Layout::PER_STAGE_MIN_CORES`], one thread per stage otherwise.
    #[default]
    Auto,
    /// Intake, policy and signing fused on one thread as direct calls.
    Fused,
    /// One thread per stage, joined by rings.
    PerStage,
}

impl Layout {
    /// Cores needed before `auto` gives each stage its own thread: the five pipeline
    /// threads, the status thread and the desk I/O threads.
    pub const PER_STAGE_MIN_CORES: usize = 8;
}

/// `hot_core`: the fused CPU chain (intake → policy → signing → broadcast write) gets a core
/// of its own and busy-spins there; every other thread of the process (and, in dev mode,
/// the dev chain) is confined to the other cores (`pipeline::coremap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotCore {
    /// The highest core of the affinity mask.
    Auto,
    /// This core.
    Core(usize),
}

impl HotCore {
    /// `auto` or a core number.
    pub fn parse(s: &str) -> Option<HotCore> {
        match s {
            "auto" => Some(HotCore::Auto),
            n => n.parse().ok().map(HotCore::Core),
        }
    }

    /// The core asked for (`None`: chosen from the mask).
    pub fn core(self) -> Option<usize> {
        match self {
            HotCore::Auto => None,
            HotCore::Core(c) => Some(c),
        }
    }
}

impl<'de> Deserialize<'de> for HotCore {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Core(usize),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Core(c) => Ok(HotCore::Core(c)),
            Raw::Name(n) => HotCore::parse(&n).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "hot_core: expected \"auto\" or a core number, got `{n}`"
                ))
            }),
        }
    }
}

/// How stage threads wait when idle (configuration names of `pipeline::WaitKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WaitChoice {
    /// Chosen from the cores this process may use (`pipeline::CoreBudget::default_wait`).
    #[default]
    Auto,
    /// Spin without pause: only when each stage thread has a core to itself.
    BusySpin,
    /// Spin, then yield forever: lowest latency on shared cores, 100% CPU even idle.
    SpinYield,
    /// Spin, yield, then park with the sleeping-flag handshake.
    SpinYieldPark,
}

impl WaitChoice {
    /// Parses a configuration name.
    pub fn parse(s: &str) -> Option<WaitChoice> {
        match s {
            "auto" => Some(WaitChoice::Auto),
            "busy-spin" => Some(WaitChoice::BusySpin),
            "spin-yield" => Some(WaitChoice::SpinYield),
            "spin-yield-park" => Some(WaitChoice::SpinYieldPark),
            _ => None,
        }
    }
}

impl Layout {
    /// Parses a configuration name.
    pub fn parse(s: &str) -> Option<Layout> {
        match s {
            "auto" => Some(Layout::Auto),
            "fused" => Some(Layout::Fused),
            "per-stage" => Some(Layout::PerStage),
            _ => None,
        }
    }
}

/// Where an account's key lives. Secrets (PINs, share files, AWS secret keys) are read from
/// files or the environment named here, never written in this file.
#[derive(Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "kebab-case", deny_unknown_fields)]
pub enum KeyConfig {
    /// A key in process memory (hex), for development and hot wallets.
    Local {
        /// 32-byte secret, hex.
        secret_hex: String,
    },
    /// A secp256k1 key generated inside a PKCS#11 token (feature `hsm`).
    Hsm {
        /// PKCS#11 module (`.so`).
        module: PathBuf,
        /// Label of the token holding the key.
        token_label: String,
        /// `CKA_LABEL` of the key pair.
        key_label: String,
        /// File holding the user PIN (first line).
        #[serde(default)]
        pin_file: Option<PathBuf>,
        /// Environment variable holding the user PIN (when there is no `pin_file`).
        #[serde(default)]
        pin_env: Option<String>,
        /// Sessions opened and logged in at start.
        #[serde(default = "default_hsm_sessions")]
        sessions: usize,
    },
    /// An AWS KMS key, `ECC_SECG_P256K1` (feature `kms`).
    Kms {
        /// Key id, ARN or alias.
        key_id: String,
        /// AWS region.
        region: String,
        /// Endpoint override (a KMS-compatible server); default: AWS's endpoint.
        #[serde(default)]
        endpoint_url: Option<String>,
        /// Access key id; with `secret_access_key_file`. Default: the environment.
        #[serde(default)]
        access_key_id: Option<String>,
        /// File holding the secret access key (first line).
        #[serde(default)]
        secret_access_key_file: Option<PathBuf>,
        /// Whole-call timeout, retries included (ms).
        #[serde(default = "default_kms_timeout_ms")]
        operation_timeout_ms: u64,
    },
    /// A threshold ECDSA key held as shares by `t` parties (feature `mpc`).
    Mpc {
        /// The parties' share files (written by `mpc-ceremony`).
        share_files: Vec<PathBuf>,
        /// Keygen indices of the `t` parties that sign.
        parties: Vec<u16>,
        /// Folder of the durable run counter (presignatures are never reused across runs).
        state_dir: PathBuf,
        /// Presignatures kept ready.
        #[serde(default = "default_mpc_pool")]
        pool_depth: usize,
        /// Refill below this many.
        #[serde(default = "default_mpc_low_water")]
        low_water: usize,
        /// How long a request waits for a presignature before it fails (ms).
        #[serde(default = "default_mpc_wait_ms")]
        wait_timeout_ms: u64,
        /// Party spin window (µs): how long each party polls its socket for the next
        /// request before blocking, so that signatures in a burst reach the parties
        /// without thread wake-ups. 0 blocks at once.
        #[serde(default = "default_mpc_spin_us")]
        spin_us: u64,
        /// Coordinator spin window (µs): how long the signing thread polls for the
        /// parties' answers before blocking. 0 (default) suits machines with few cores.
        #[serde(default)]
        coordinator_spin_us: u64,
    },
}

fn default_hsm_sessions() -> usize {
    4
}
fn default_kms_timeout_ms() -> u64 {
    5_000
}
fn default_mpc_pool() -> usize {
    8
}
fn default_mpc_low_water() -> usize {
    4
}
fn default_mpc_wait_ms() -> u64 {
    60_000
}
fn default_mpc_spin_us() -> u64 {
    500
}

impl KeyConfig {
    /// Backend name as written in the file.
    pub fn backend(&self) -> &'static str {
        match self {
            KeyConfig::Local { .. } => "local",
            KeyConfig::Hsm { .. } => "hsm",
            KeyConfig::Kms { .. } => "kms",
            KeyConfig::Mpc { .. } => "mpc",
        }
    }

    /// Makes relative paths relative to `base`.
    fn rebase(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match self {
            KeyConfig::Local { .. } => {}
            KeyConfig::Hsm { pin_file, .. } => pin_file.iter_mut().for_each(fix),
            KeyConfig::Kms {
                secret_access_key_file,
                ..
            } => secret_access_key_file.iter_mut().for_each(fix),
            KeyConfig::Mpc {
                share_files,
                state_dir,
                ..
            } => {
                share_files.iter_mut().for_each(fix);
                fix(state_dir);
            }
        }
    }
}

impl std::fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyConfig::Local { .. } => f.write_str("Local { secret_hex: <redacted> }"),
            KeyConfig::Hsm {
                module,
                token_label,
                key_label,
                ..
            } => f
                .debug_struct("Hsm")
                .field("module", module)
                .field("token_label", token_label)
                .field("key_label", key_label)
                .finish_non_exhaustive(),
            KeyConfig::Kms {
                key_id,
                region,
                endpoint_url,
                ..
            } => f
                .debug_struct("Kms")
                .field("key_id", key_id)
                .field("region", region)
                .field("endpoint_url", endpoint_url)
                .finish_non_exhaustive(),
            KeyConfig::Mpc {
                parties, state_dir, ..
            } => f
                .debug_struct("Mpc")
                .field("parties", parties)
                .field("state_dir", state_dir)
                .finish_non_exhaustive(),
        }
    }
}

/// One signing account and its first-cut policy.
#[derive(Clone, Debug, Deserialize)]
pub struct AccountConfig {
    /// Name desks use (`account` field).
    pub name: String,
    /// Key custody.
    pub key: KeyConfig,
    /// A standby for the same key (same address) in another boundary; it signs while the
    /// primary is unavailable.
    #[serde(default)]
    pub standby: Option<KeyConfig>,
    /// Approvals by distinct `approver` principals (never the submitter) every intent of
    /// this account needs before it is signed (0 = as the policy says; at most 4).
    #[serde(default)]
    pub approvals: u8,
    /// Destinations allowed (deny by default: an empty list allows nothing).
    #[serde(default)]
    pub allowlist: Vec<Address>,
    /// Largest `value_wei` of one intent.
    pub max_value_wei: U256,
    /// Withdrawal addresses this account's validator deposits may point to (0x01 or 0x02
    /// credentials); empty: the account may not deposit. Used when no policy file is set.
    #[serde(default)]
    pub staking_withdrawal: Vec<Address>,
    /// A deposit for a pubkey that already has one (a top-up) is allowed.
    #[serde(default)]
    pub staking_top_up: bool,
}

/// `[staking]`: the network's deposit domain and contracts. Without it, staking intents
/// are refused (`unsupported_kind`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StakingConfig {
    /// The network's genesis fork version (4 bytes hex), part of the deposit signature's
    /// domain: mainnet `0x00000000`, hoodi `0x10000910`, …
    pub genesis_fork_version: String,
    /// The deposit contract.
    pub deposit_contract: Address,
    /// A batch contract (`batchDeposit(bytes,bytes,bytes,bytes32[],uint64[])`) that takes
    /// several entries in one transaction; without it an intent carries one entry.
    #[serde(default)]
    pub batch_contract: Option<Address>,
    /// EIP-7002 withdrawal request contract.
    #[serde(default = "default_withdrawal_contract")]
    pub withdrawal_request_contract: Address,
    /// EIP-7251 consolidation request contract.
    #[serde(default = "default_consolidation_contract")]
    pub consolidation_request_contract: Address,
    /// Gas limit of a deposit transaction (per entry for a batch) when the desk gives none.
    #[serde(default = "default_deposit_gas")]
    pub deposit_gas: u64,
    /// Gas limit of an exit or consolidation request when the desk gives none.
    #[serde(default = "default_request_gas")]
    pub request_gas: u64,
    /// How often the request fees and the deposit contract's logs are read (ms).
    #[serde(default = "default_staking_refresh_ms")]
    pub refresh_ms: u64,
    /// First block to read `DepositEvent` logs from (the contract's deployment block).
    #[serde(default)]
    pub deposit_contract_block: u64,
    /// Beacon API base URL (`http://host:port`) for the validator watch; none: no watch.
    #[serde(default)]
    pub beacon_url: Option<String>,
    /// How often the validator watch polls the beacon node (ms).
    #[serde(default = "default_beacon_poll_ms")]
    pub beacon_poll_ms: u64,
    /// Alert when a validator's balance fell in this many consecutive epochs.
    #[serde(default = "default_balance_falling_epochs")]
    pub balance_falling_epochs: u32,
}

impl StakingConfig {
    /// The genesis fork version as bytes.
    pub fn fork_version(&self) -> Result<[u8; 4], EngineError> {
        let s = self.genesis_fork_version.trim();
        let digits = s.strip_prefix("0x").unwrap_or(s);
        let mut out = [0u8; 4];
        hex::decode_to_slice(digits, &mut out).map_err(|_| EngineError::Config {
            what: format!(
                "staking.genesis_fork_version: expected 4 bytes of hex (e.g. 0x00000000), got `{s}`"
            ),
        })?;
        Ok(out)
    }
}

fn default_withdrawal_contract() -> Address {
    venues::contracts::WITHDRAWAL_REQUEST_CONTRACT
}
fn default_consolidation_contract() -> Address {
    venues::contracts::CONSOLIDATION_REQUEST_CONTRACT
}
fn default_deposit_gas() -> u64 {
    150_000
}
fn default_request_gas() -> u64 {
    250_000
}
fn default_staking_refresh_ms() -> u64 {
    1_000
}
fn default_beacon_poll_ms() -> u64 {
    6_000
}
fn default_balance_falling_epochs() -> u32 {
    3
}

/// A secret from the configuration: redacted in `Debug`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretString(pub String);

impl From<String> for SecretString {
    fn from(s: String) -> Self {
        SecretString(s)
    }
}

impl From<&str> for SecretString {
    fn from(s: &str) -> Self {
        SecretString(s.to_owned())
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Desk listener (WebSocket and HTTP on one port).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// HS256 secret for desk JWTs (tokens are issued with it).
    pub jwt_secret: SecretString,
    /// Earlier JWT secrets still accepted for verification while tokens signed with them
    /// are in use (key rotation: put the old secret here, the new one in `jwt_secret`,
    /// and remove the old one once its tokens have expired).
    #[serde(default)]
    pub jwt_previous_secrets: Vec<SecretString>,
    /// `[limits]`: frame rates per connection and per principal, connections per principal.
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
    /// `[tls]`: TLS 1.3 on the desk listener (`wss://`, `https://`), optionally with client
    /// certificates. Without it the listener must be a loopback address.
    #[serde(default)]
    pub tls: Option<crate::tls::TlsSettings>,
    /// Node WebSocket URL (`ws://…`).
    pub node_ws_url: String,
    /// Name of the node provider in `broadcast` events.
    #[serde(default = "default_provider_name")]
    pub provider_name: String,
    /// The RPC providers broadcast sends to, best first when nothing is measured yet.
    /// Empty: `node_ws_url` is the one provider, named `provider_name`. `node_ws_url`
    /// serves the start-up reads and the head subscription either way.
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    /// Private relays (Flashbots `eth_sendPrivateTransaction`) for intents routed
    /// `private`. Empty: no private route (the policy refuses `private` and resolves `auto`
    /// to `public`).
    #[serde(default)]
    pub relays: Vec<RelayConfig>,
    /// File holding the hex secret of the dedicated relay-auth key that signs every relay
    /// request (`X-Flashbots-Signature`). Not a custody key: it holds no funds. Required
    /// with `relays`; the file must not be readable by group or others.
    #[serde(default)]
    pub relay_auth_key_file: Option<PathBuf>,
    /// Hedging, demotion, heartbeats and reconnection of the providers; the private
    /// route's inclusion window.
    #[serde(default)]
    pub broadcast: BroadcastConfig,
    /// Blocks on top of the inclusion block before `confirmed`.
    #[serde(default = "default_confirmations")]
    pub confirmations: u32,
    /// `[journal]`: the write-ahead intent journal. Without it nothing survives a
    /// restart: an `ack` means only that the intent is in the pipeline.
    #[serde(default)]
    pub journal: Option<JournalSettings>,
    /// `[at_rest]`: encrypt journal and audit segments (AES-256-GCM, a data key per
    /// segment wrapped by a key-encryption key in an HSM or KMS). Without it both are
    /// written in clear.
    #[serde(default)]
    pub at_rest: Option<AtRestConfig>,
    /// Signing accounts.
    pub accounts: Vec<AccountConfig>,
    /// `[staking]`: validator deposits, exits and consolidations.
    #[serde(default)]
    pub staking: Option<StakingConfig>,
    /// Thread layout.
    #[serde(default)]
    pub layout: Layout,
    /// Wait strategy of the stage threads.
    #[serde(default)]
    pub wait: WaitChoice,
    /// Capacity of each ring (power of two).
    #[serde(default = "default_ring")]
    pub ring_capacity: usize,
    /// Capacity of the status fan-out ring (power of two).
    #[serde(default = "default_status_ring")]
    pub status_ring_capacity: usize,
    /// Byte slots for calldata and raw transactions.
    #[serde(default = "default_blobs")]
    pub blob_slots: usize,
    /// Threads of the desk I/O runtime (WebSocket connections, HTTP).
    #[serde(default = "default_io_threads")]
    pub io_threads: usize,
    /// Pin pipeline threads to these cores, in thread order (empty = no pinning).
    #[serde(default)]
    pub pin_cores: Vec<usize>,
    /// Give the fused CPU chain a core of its own (`"auto"` or a core number; absent: no
    /// core map). It busy-spins there, and every other thread of the process is confined
    /// to the remaining cores. Needs the fused layout, at least 2 usable cores, and no
    /// `pin_cores`.
    #[serde(default)]
    pub hot_core: Option<HotCore>,
    /// Policy file (TOML; see docs/policy.md). Without one, each account's `allowlist`
    /// and `max_value_wei` are the whole policy. Reloaded on SIGHUP and `reload_policy`.
    #[serde(default)]
    pub policy_file: Option<PathBuf>,
    /// Directory of the hash-chained audit log (segment files `audit-NNNNNNNN.jsonl`,
    /// created if missing; see docs/audit.md). Without one, records go to the process log,
    /// unchained.
    #[serde(default)]
    pub audit_dir: Option<PathBuf>,
    /// Size at which the audit log moves to a new segment file (bytes, at least 1024).
    #[serde(default = "default_audit_segment_bytes")]
    pub audit_segment_bytes: u64,
    /// Longest time audit records stay written but not synced to disk (ms; 0: synced
    /// whenever the writer has caught up).
    #[serde(default = "default_audit_fsync_ms")]
    pub audit_fsync_ms: u64,
    /// File holding the hex secret of the key that signs every audit segment head (not a
    /// custody key); the file must not be readable by group or others.
    #[serde(default)]
    pub audit_key_file: Option<PathBuf>,
    /// Requests the async signers (KMS, MPC) may have outstanding, all accounts together.
    #[serde(default = "default_async_capacity")]
    pub async_sign_capacity: usize,
    /// After a primary key was unavailable, its standby signs for this long before the
    /// primary is tried again (ms).
    #[serde(default = "default_failover_retry_ms")]
    pub failover_retry_ms: u64,
    /// `[slo]`: per-stage latency budgets, burn-rate alerts, automatic actions and the
    /// `/dashboard` feed's tick (see `engine::monitor`).
    #[serde(default)]
    pub slo: crate::monitor::SloConfig,
}

/// One more RPC provider.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name in `broadcast` events, metrics and the kill switch's `venue` scope.
    pub name: String,
    /// WebSocket URL (`ws://…`).
    pub ws_url: String,
}

/// One private relay.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Name in `broadcast` events, metrics and the kill switch's `venue` scope (distinct
    /// from every provider's name).
    pub name: String,
    /// HTTP endpoint (`http://host:port[/path]`; TLS is not supported).
    pub url: String,
}

/// `[broadcast]`: how transactions are spread over the providers and relays.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BroadcastConfig {
    /// A public transaction not included after this many blocks is replaced with fees
    /// raised by at least 10 % (up to the intent's fee cap); 0 never replaces.
    pub stuck_blocks: u64,
    /// A transaction not accepted this long after its last send also goes to the next
    /// provider (µs).
    pub hedge_delay_us: u64,
    /// An answer slower than this demotes the provider (µs).
    pub latency_budget_us: u64,
    /// How long a demoted provider is ranked last (ms).
    pub demote_ms: u64,
    /// A provider that answered nothing for this long gets a heartbeat (ms).
    pub heartbeat_ms: u64,
    /// A heartbeat unanswered this long drops the connection and redials it (ms).
    pub heartbeat_timeout_ms: u64,
    /// First redial delay, doubled per failure (ms).
    pub reconnect_min_ms: u64,
    /// Longest redial delay (ms).
    pub reconnect_max_ms: u64,
    /// How long a transaction waits for any provider to be connected before it fails
    /// with `venue_unavailable` (ms).
    pub venue_wait_ms: u64,
    /// Bound on one redial of a provider: TCP connect plus WebSocket handshake (ms).
    pub connect_timeout_ms: u64,
    /// A private transaction may be included up to this many blocks after the head it
    /// was sent at (its `maxBlockNumber` is head + this).
    pub private_max_blocks: u64,
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        Self {
            hedge_delay_us: 2_000,
            latency_budget_us: 50_000,
            demote_ms: 10_000,
            heartbeat_ms: 1_000,
            heartbeat_timeout_ms: 2_000,
            reconnect_min_ms: 50,
            reconnect_max_ms: 5_000,
            venue_wait_ms: 10_000,
            connect_timeout_ms: 2_000,
            stuck_blocks: 3,
            private_max_blocks: 25,
        }
    }
}

/// `[at_rest]`: the key-encryption key (KEK) that wraps the per-segment data keys of the
/// journal and the audit log.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtRestConfig {
    /// Where the KEK lives: `backend = "hsm"` (an AES-256 secret key in a PKCS#11 token,
    /// `key_label` naming it; `engine kek generate` makes one) or `backend = "kms"` (a
    /// `SYMMETRIC_DEFAULT` KMS key). Same fields as an account's `key`; `local` and `mpc`
    /// are refused: a KEK must sit in a boundary that never lets it out.
    pub kek: KeyConfig,
}

/// `[journal]`: where and how durably intents and their transactions are recorded.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalSettings {
    /// Directory of the journal's segment files (created if missing).
    pub dir: PathBuf,
    /// Size of one segment file; a lane moves to a new segment when one is full.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// `none`: a record is in the OS page cache when its stage goes on (survives a crash
    /// of the process, not of the machine). `group`: acks and broadcasts wait until their
    /// record is synced to disk; one sync covers every record written meanwhile, at most
    /// `group_commit_us` apart. `interval`: synced every `interval_ms`, nobody waits (a
    /// machine crash loses at most that much).
    #[serde(default)]
    pub sync: JournalSync,
    /// Longest wait between two group-commit syncs (µs).
    #[serde(default = "default_group_commit_us")]
    pub group_commit_us: u64,
    /// Sync period of `sync = "interval"` (ms).
    #[serde(default = "default_sync_interval_ms")]
    pub interval_ms: u64,
    /// How often the running engine looks for full segments to compact: finished intents
    /// become small `Done` records in the `base` lane and the segments are deleted (ms;
    /// 0: only at start-up).
    #[serde(default = "default_compact_every_ms")]
    pub compact_every_ms: u64,
}

fn default_compact_every_ms() -> u64 {
    10_000
}

/// The journal's sync policy (see [`JournalSettings::sync`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalSync {
    /// Page cache only.
    #[default]
    None,
    /// Group commit: acks and broadcasts wait for the sync.
    Group,
    /// Periodic sync; nobody waits.
    Interval,
}

impl JournalSync {
    /// Configuration name.
    pub const fn as_str(self) -> &'static str {
        match self {
            JournalSync::None => "none",
            JournalSync::Group => "group",
            JournalSync::Interval => "interval",
        }
    }
}

fn default_segment_bytes() -> u64 {
    64 << 20
}
fn default_group_commit_us() -> u64 {
    200
}
fn default_sync_interval_ms() -> u64 {
    10
}

impl BroadcastConfig {
    /// As the broadcast stage takes it.
    pub fn tuning(&self) -> crate::stages::broadcast::BroadcastTuning {
        use std::time::Duration;
        crate::stages::broadcast::BroadcastTuning {
            hedge_delay: Duration::from_micros(self.hedge_delay_us),
            latency_budget: Duration::from_micros(self.latency_budget_us),
            demote_for: Duration::from_millis(self.demote_ms),
            heartbeat_every: Duration::from_millis(self.heartbeat_ms),
            heartbeat_timeout: Duration::from_millis(self.heartbeat_timeout_ms),
            reconnect_min: Duration::from_millis(self.reconnect_min_ms),
            reconnect_max: Duration::from_millis(self.reconnect_max_ms),
            venue_wait: Duration::from_millis(self.venue_wait_ms),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            private_max_blocks: self.private_max_blocks,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7300))
}
fn default_provider_name() -> String {
    "node-0".into()
}
fn default_confirmations() -> u32 {
    2
}
fn default_ring() -> usize {
    4096
}
fn default_status_ring() -> usize {
    65536
}
fn default_blobs() -> usize {
    4 * 4096 + 1024
}
fn default_io_threads() -> usize {
    1
}
fn default_async_capacity() -> usize {
    1024
}
fn default_failover_retry_ms() -> u64 {
    5_000
}
fn default_audit_segment_bytes() -> u64 {
    crate::audit::DEFAULT_SEGMENT_BYTES
}
fn default_audit_fsync_ms() -> u64 {
    crate::audit::DEFAULT_FSYNC_MS
}

impl Config {
    /// Every broadcast provider as `(name, ws_url)`: `providers`, or `node_ws_url` named
    /// `provider_name` when none are listed.
    pub fn provider_list(&self) -> Vec<(String, String)> {
        if self.providers.is_empty() {
            return vec![(self.provider_name.clone(), self.node_ws_url.clone())];
        }
        self.providers
            .iter()
            .map(|p| (p.name.clone(), p.ws_url.clone()))
            .collect()
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, EngineError> {
        // The file holds the JWT secret (and maybe keys): only its owner may read it.
        crate::audit::key::check_private_file(path).map_err(|why| EngineError::Config {
            what: format!("{}: {why}", path.display()),
        })?;
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::Config {
            what: format!("cannot read {}: {e}", path.display()),
        })?;
        // The parser's own message quotes the offending line, which may hold a secret:
        // only its position and the reason are reported.
        let mut cfg: Config = toml::from_str(&text).map_err(|e| {
            let at = e.span().map_or(String::new(), |sp| {
                let before = &text[..sp.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {col}: ")
            });
            EngineError::Config {
                what: format!("{}: {at}{}", path.display(), e.message()),
            }
        })?;
        // Relative paths in the file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.policy_file,
            &mut cfg.audit_dir,
            &mut cfg.audit_key_file,
            &mut cfg.relay_auth_key_file,
        ]
        .into_iter()
        .flatten()
        .chain(cfg.tls.iter_mut().flat_map(|t| {
            [&mut t.cert_file, &mut t.key_file]
                .into_iter()
                .chain(t.client_ca_file.as_mut())
        })) {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(r) = &mut cfg.at_rest {
            r.kek.rebase(base);
        }
        for a in &mut cfg.accounts {
            a.key.rebase(base);
            if let Some(k) = &mut a.standby {
                k.rebase(base);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Account name → index, in configuration order (the index every ring message uses).
    pub fn account_indices(&self) -> std::collections::HashMap<String, u16> {
        self.accounts
            .iter()
            .enumerate()
            .map(|(i, a)| (a.name.clone(), i as u16))
            .collect()
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |what: String| Err(EngineError::Config { what });
        if let Err(what) = self.slo.validate() {
            return bad(what);
        }
        if let Some(r) = &self.at_rest
            && matches!(r.kek, KeyConfig::Local { .. } | KeyConfig::Mpc { .. })
        {
            return bad(format!(
                "at_rest.kek: backend `{}` cannot hold a key-encryption key (use hsm or kms)",
                r.kek.backend()
            ));
        }
        if self.jwt_secret.0.len() < 16 {
            return bad("jwt_secret: must be at least 16 bytes".into());
        }
        if let Some(i) = self
            .jwt_previous_secrets
            .iter()
            .position(|s| s.0.len() < 16)
        {
            return bad(format!(
                "jwt_previous_secrets[{i}]: must be at least 16 bytes"
            ));
        }
        if let Err(what) = self.limits.validate() {
            return bad(what);
        }
        if self.tls.is_none() && !self.listen.ip().is_loopback() {
            return bad(format!(
                "listen: {} is not a loopback address; plain ws:// is served on loopback only, \
                 configure [tls] (cert_file, key_file) to listen there",
                self.listen
            ));
        }
        if self.accounts.is_empty() {
            return bad("accounts: at least one account is required".into());
        }
        if self.hot_core.is_some() {
            if self.layout == Layout::PerStage {
                return bad(
                    "hot_core: needs the fused layout (layout = \"fused\" or \"auto\")".into(),
                );
            }
            if !self.pin_cores.is_empty() {
                return bad("hot_core: cannot be combined with pin_cores".into());
            }
        }
        let max = crate::stages::broadcast::MAX_VENUES;
        if self.providers.len() > max {
            return bad(format!("providers: at most {max}"));
        }
        let provider_count = self.providers.len().max(1);
        if provider_count + self.relays.len() > max {
            return bad(format!(
                "relays: at most {max} providers and relays together, got {provider_count} and {}",
                self.relays.len()
            ));
        }
        let mut names: Vec<String> = Vec::new();
        for p in &self.providers {
            if names.contains(&p.name.to_ascii_lowercase()) {
                return bad(format!("providers.{}: the name is used twice", p.name));
            }
            if !p.ws_url.starts_with("ws://") && !p.ws_url.starts_with("wss://") {
                return bad(format!(
                    "providers.{}.ws_url: expected a ws:// URL, got `{}`",
                    p.name, p.ws_url
                ));
            }
            names.push(p.name.to_ascii_lowercase());
        }
        if self.providers.is_empty() {
            names.push(self.provider_name.to_ascii_lowercase());
        }
        for r in &self.relays {
            if r.name.is_empty() {
                return bad("relays.name: must not be empty".into());
            }
            if names.contains(&r.name.to_ascii_lowercase()) {
                return bad(format!(
                    "relays.{}: the name is used twice (relay and provider names share one namespace)",
                    r.name
                ));
            }
            if !r.url.starts_with("http://") {
                return bad(format!(
                    "relays.{}.url: expected an http:// URL (TLS is not supported), got `{}`",
                    r.name, r.url
                ));
            }
            names.push(r.name.to_ascii_lowercase());
        }
        if !self.relays.is_empty() && self.relay_auth_key_file.is_none() {
            return bad(
                "relay_auth_key_file: required when relays are configured (a file holding the hex secret of the relay-auth key)"
                    .into(),
            );
        }
        if self.broadcast.private_max_blocks == 0 {
            return bad("broadcast.private_max_blocks: must be at least 1".into());
        }
        if self.broadcast.heartbeat_timeout_ms == 0 || self.broadcast.heartbeat_ms == 0 {
            return bad("broadcast.heartbeat_ms and heartbeat_timeout_ms: must be above 0".into());
        }
        if self.accounts.len() >= u16::MAX as usize {
            return bad("accounts: too many".into());
        }
        let mut names = std::collections::HashSet::new();
        for a in &self.accounts {
            if a.name.is_empty() || a.name.len() > 64 {
                return bad(format!(
                    "accounts.{}: name must be 1 to 64 characters",
                    a.name
                ));
            }
            if !names.insert(a.name.as_str()) {
                return bad(format!("accounts.{}: duplicate name", a.name));
            }
            if usize::from(a.approvals) > crate::risk::approvals::MAX_QUORUM {
                return bad(format!(
                    "accounts.{}.approvals: at most {}, got {}",
                    a.name,
                    crate::risk::approvals::MAX_QUORUM,
                    a.approvals
                ));
            }
        }
        for (field, v) in [
            ("ring_capacity", self.ring_capacity),
            ("status_ring_capacity", self.status_ring_capacity),
        ] {
            if !v.is_power_of_two() || v < 2 {
                return bad(format!("{field}: must be a power of two >= 2, got {v}"));
            }
        }
        // Every in-flight intent holds at most one slot from intake to broadcast, and at
        // most two for the instant signing swaps calldata for the raw transaction.
        let need = 4 * self.ring_capacity + 64;
        if self.blob_slots < need {
            return bad(format!(
                "blob_slots: {} is too few for ring_capacity {}; need at least {need}",
                self.blob_slots, self.ring_capacity
            ));
        }
        if self.confirmations == 0 {
            return bad("confirmations: must be at least 1".into());
        }
        if self.audit_segment_bytes < crate::audit::MIN_SEGMENT_BYTES {
            return bad(format!(
                "audit_segment_bytes: at least {}, got {}",
                crate::audit::MIN_SEGMENT_BYTES,
                self.audit_segment_bytes
            ));
        }
        if self.io_threads == 0 {
            return bad("io_threads: must be at least 1".into());
        }
        if let Some(st) = &self.staking {
            st.fork_version()?;
            if st.refresh_ms == 0 || st.beacon_poll_ms == 0 {
                return bad("staking.refresh_ms and beacon_poll_ms: must be above 0".into());
            }
            for (field, g) in [
                ("deposit_gas", st.deposit_gas),
                ("request_gas", st.request_gas),
            ] {
                if !(21_000..=30_000_000).contains(&g) {
                    return bad(format!(
                        "staking.{field}: must be between 21000 and 30000000"
                    ));
                }
            }
            if let Some(u) = &st.beacon_url
                && !u.starts_with("http://")
            {
                return bad(format!(
                    "staking.beacon_url: expected an http:// URL, got `{u}`"
                ));
            }
        }
        Ok(())
    }

    /// The relay-auth identity read from `relay_auth_key_file`, or `None` when no relay is
    /// configured. The file holds the key's 32-byte secret in hex (`0x` optional,
    /// surrounding whitespace ignored). A file that group or others may read or write is
    /// refused, naming the file; no error ever carries the file's content.
    pub fn relay_auth(&self) -> Result<Option<venues::RelayAuth>, EngineError> {
        if self.relays.is_empty() {
            return Ok(None);
        }
        let Some(path) = &self.relay_auth_key_file else {
            return Err(EngineError::Config {
                what: "relay_auth_key_file: required when relays are configured".into(),
            });
        };
        let bad = |why: String| EngineError::Config {
            what: format!("relay_auth_key_file: {}: {why}", path.display()),
        };
        let mut secret = crate::audit::key::read_private_secret(path).map_err(bad)?;
        let signer = alloy_signer_local::PrivateKeySigner::from_bytes(&secret.into())
            .map_err(|_| bad("not a valid secp256k1 secret key".into()))?;
        secret.fill(0);
        Ok(Some(venues::RelayAuth::new(signer)))
    }

    /// Index of the account called `name`.
    pub fn account_index(&self, name: &str) -> Option<u16> {
        self.accounts
            .iter()
            .position(|a| a.name == name)
            .map(|i| i as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a configuration file only its owner may read, as `Config::load` requires.
    fn write_private(p: &Path, text: impl AsRef<[u8]>) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(p, text)?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
    }

    #[test]
    fn a_readable_config_is_refused_and_parse_errors_quote_no_secret() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("engine.toml");
        let text = "jwt_secret = \"sekrit-0123456789abcdef\"\nnode_ws_url = \"ws://127.0.0.1:1\"\naccounts = []\n";
        write_private(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("engine.toml") && e.contains("group or others"),
            "{e}"
        );
        // A syntax error on the secret's own line: position and reason, not the line.
        write_private(
            &p,
            "node_ws_url = \"ws://x\"\njwt_secret = \"sekrit-0123456789abcdef\" junk\n",
        )
        .unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains("sekrit"), "secret in the error: {e}");
    }

    #[test]
    fn loads_toml_and_validates() {
        let text = r#"
            jwt_secret = "0123456789abcdef0123"
            node_ws_url = "ws://127.0.0.1:8545"
            confirmations = 3
            [[accounts]]
            name = "treasury-1"
            max_value_wei = "100000000000000000000"
            allowlist = ["0x9965507d1a55bcc2695c58ba16fb37d819b0a4dc"]
            key = { backend = "local", secret_hex = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80" }
        "#;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("engine.toml");
        write_private(&p, text).unwrap();
        let cfg = Config::load(&p).unwrap();
        assert_eq!(cfg.confirmations, 3);
        assert_eq!(cfg.account_index("treasury-1"), Some(0));
        assert_eq!(cfg.layout, Layout::Auto);
        assert!(
            !format!("{cfg:?}").contains("ac0974"),
            "secret leaked into Debug"
        );

        // Key rotation and limits from the file; earlier secrets never shown.
        write_private(
            &p,
            text.replace(
                "confirmations = 3",
                "confirmations = 3\njwt_previous_secrets = [\"previous-secret-0123456789\"]\n\
                 [limits]\nframes_per_sec_per_connection = 7\nmax_connections_per_principal = 3",
            )
            .replace("[[accounts]]", "\n[[accounts]]"),
        )
        .unwrap();
        let rot = Config::load(&p).unwrap();
        assert_eq!(rot.jwt_previous_secrets.len(), 1);
        assert_eq!(rot.limits.frames_per_sec_per_connection, 7);
        assert_eq!(rot.limits.max_connections_per_principal, 3);
        assert_eq!(
            rot.limits.burst_per_connection,
            crate::limits::LimitsConfig::default().burst_per_connection
        );
        assert!(!format!("{rot:?}").contains("previous-secret"));
        write_private(
            &p,
            text.replace(
                "confirmations = 3",
                "confirmations = 3\n[limits]\nburst_per_principal = 0",
            )
            .replace("[[accounts]]", "\n[[accounts]]"),
        )
        .unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("limits.burst_per_principal"), "{e}");

        write_private(
            &p,
            text.replace("confirmations = 3", "confirmations = 3\nbogus = 1"),
        )
        .unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");

        write_private(&p, text.replace("0123456789abcdef0123", "short")).unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("jwt_secret"), "{e}");
    }

    #[test]
    fn custody_keys_parse_with_paths_relative_to_the_file() {
        let text = r#"
            jwt_secret = "0123456789abcdef0123"
            node_ws_url = "ws://127.0.0.1:8545"
            [[accounts]]
            name = "hot"
            max_value_wei = "1"
            key = { backend = "hsm", module = "/usr/lib/softhsm/libsofthsm2.so", token_label = "t", key_label = "k", pin_file = "secrets/pin" }
            standby = { backend = "kms", key_id = "alias/k", region = "eu-west-1" }
            approvals = 2
            [[accounts]]
            name = "cold"
            max_value_wei = "1"
            key = { backend = "mpc", share_files = ["s/p0.json", "/abs/p1.json"], parties = [0, 1], state_dir = "state" }
        "#;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("engine.toml");
        write_private(&p, text).unwrap();
        let cfg = Config::load(&p).unwrap();
        let hot = &cfg.accounts[0];
        assert_eq!(hot.approvals, 2);
        match &hot.key {
            KeyConfig::Hsm {
                pin_file, sessions, ..
            } => {
                assert_eq!(
                    pin_file.as_deref(),
                    Some(dir.path().join("secrets/pin").as_path())
                );
                assert_eq!(*sessions, 4);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(hot.standby.as_ref().map(KeyConfig::backend), Some("kms"));
        match &cfg.accounts[1].key {
            KeyConfig::Mpc {
                share_files,
                state_dir,
                pool_depth,
                ..
            } => {
                assert_eq!(share_files[0], dir.path().join("s/p0.json"));
                assert_eq!(share_files[1], PathBuf::from("/abs/p1.json"));
                assert_eq!(*state_dir, dir.path().join("state"));
                assert_eq!(*pool_depth, 8);
            }
            other => panic!("{other:?}"),
        }

        // A quorum above the most approvals an intent can collect is refused, naming it.
        write_private(&p, text.replace("approvals = 2", "approvals = 9")).unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("accounts.hot.approvals"), "{e}");
        // So is a misspelt key field.
        write_private(&p, text.replace("token_label", "token_lable")).unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("token_lable"), "{e}");
    }

    #[test]
    fn relays_are_validated_and_their_key_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let text = r#"
            jwt_secret = "0123456789abcdef0123"
            node_ws_url = "ws://127.0.0.1:8545"
            relay_auth_key_file = "secrets/relay.key"
            [[relays]]
            name = "fb"
            url = "http://127.0.0.1:9000"
            [broadcast]
            private_max_blocks = 10
            [[accounts]]
            name = "a"
            max_value_wei = "1"
            key = { backend = "local", secret_hex = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80" }
        "#;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("engine.toml");
        write_private(&p, text).unwrap();
        let cfg = Config::load(&p).unwrap();
        assert_eq!(cfg.relays.len(), 1);
        assert_eq!(cfg.broadcast.private_max_blocks, 10);
        let key_path = dir.path().join("secrets/relay.key");
        assert_eq!(cfg.relay_auth_key_file.as_deref(), Some(key_path.as_path()));

        // Missing file, then a file others may read, then a good one.
        let e = cfg.relay_auth().unwrap_err().to_string();
        assert!(
            e.contains("relay_auth_key_file") && e.contains("relay.key"),
            "{e}"
        );
        std::fs::create_dir_all(key_path.parent().unwrap()).unwrap();
        let secret = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
        std::fs::write(&key_path, format!("{secret}\n")).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = cfg.relay_auth().unwrap_err().to_string();
        assert!(e.contains("relay.key") && e.contains("0644"), "{e}");
        assert!(!e.contains(&secret[2..]), "the key leaked into the error");
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let auth = cfg.relay_auth().unwrap().expect("relays configured");
        assert_eq!(
            auth.address(),
            "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
                .parse::<Address>()
                .unwrap()
        );
        assert!(!format!("{auth:?}").contains(&secret[2..]));
        std::fs::write(&key_path, "not hex").unwrap();
        let e = cfg.relay_auth().unwrap_err().to_string();
        assert!(e.contains("32-byte secret"), "{e}");

        // Each mistake is named.
        for (from, to, field) in [
            ("http://127.0.0.1:9000", "https://relay", "relays.fb.url"),
            ("name = \"fb\"", "name = \"node-0\"", "relays.node-0"),
            (
                "relay_auth_key_file = \"secrets/relay.key\"",
                "",
                "relay_auth_key_file",
            ),
            (
                "private_max_blocks = 10",
                "private_max_blocks = 0",
                "broadcast.private_max_blocks",
            ),
        ] {
            write_private(&p, text.replace(from, to)).unwrap();
            let e = Config::load(&p).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }
}
