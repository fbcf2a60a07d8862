//! Dev mode: a dev chain started and supervised by the engine, the well-known dev
//! accounts, and a JWT secret kept in a local state folder so that `engine token` signs
//! tokens this engine accepts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use alloy_primitives::U256;
use venues::{Anvil, AnvilConfig, DEV_ADDRESSES, DEV_PRIVATE_KEYS};

use crate::config::{AccountConfig, Config, KeyConfig, Layout, WaitChoice};
use crate::error::EngineError;

/// Per-intent cap of the dev accounts: 100 ETH.
pub fn dev_cap() -> U256 {
    U256::from(100u64) * U256::from(10u64).pow(U256::from(18u64))
}

/// The dev configuration for a node at `node_ws_url`: accounts `dev0`…`dev4` sign with the
/// chain's first five well-known keys and may send to its accounts 5–9 only, up to
/// 100 ETH per intent.
pub fn dev_config(node_ws_url: &str, listen: SocketAddr, jwt_secret: String) -> Config {
    let accounts = (0..5)
        .map(|i| AccountConfig {
            name: format!("dev{i}"),
            key: KeyConfig::Local {
                secret_hex: DEV_PRIVATE_KEYS[i].to_owned(),
            },
            standby: None,
            approvals: 0,
            allowlist: DEV_ADDRESSES[5..10].to_vec(),
            max_value_wei: dev_cap(),
            staking_withdrawal: vec![DEV_ADDRESSES[i]],
            staking_top_up: false,
        })
        .collect();
    Config {
        listen,
        jwt_secret: jwt_secret.into(),
        node_ws_url: node_ws_url.to_owned(),
        provider_name: "anvil".into(),
        providers: Vec::new(),
        relays: Vec::new(),
        relay_auth_key_file: None,
        broadcast: crate::config::BroadcastConfig::default(),
        confirmations: 2,
        journal: None,
        at_rest: None,
        accounts,
        layout: Layout::Auto,
        wait: WaitChoice::Auto,
        ring_capacity: 4096,
        status_ring_capacity: 65536,
        blob_slots: 4 * 4096 + 1024,
        io_threads: 1,
        pin_cores: Vec::new(),
        hot_core: None,
        jwt_previous_secrets: Vec::new(),
        limits: crate::limits::LimitsConfig::default(),
        tls: None,
        policy_file: None,
        audit_dir: None,
        audit_segment_bytes: crate::audit::DEFAULT_SEGMENT_BYTES,
        audit_fsync_ms: crate::audit::DEFAULT_FSYNC_MS,
        audit_key_file: None,
        async_sign_capacity: 1024,
        failover_retry_ms: 5_000,
        slo: dev_slo(),
        staking: None,
    }
}

/// Genesis fork version of the dev chain's deposit domain (hoodi's, so deposit data made
/// by the staking deposit CLI with `--chain hoodi` is valid on it).
pub const DEV_FORK_VERSION: &str = "0x10000910";

/// Staking on the dev chain: deploys the deposit and batch contracts (from anvil account 9,
/// which no dev account signs with) and installs the EIP-7002/7251 system contracts, which
/// anvil lacks; returns the `[staking]` section for them.
pub fn dev_staking(chain: &Anvil) -> Result<crate::config::StakingConfig, EngineError> {
    let mut rpc = chain.rpc()?;
    let c = venues::contracts::deploy_staking(&mut rpc, DEV_ADDRESSES[9])?;
    venues::contracts::install_system_contracts(&mut rpc)?;
    Ok(crate::config::StakingConfig {
        genesis_fork_version: DEV_FORK_VERSION.into(),
        deposit_contract: c.deposit,
        batch_contract: Some(c.batch),
        withdrawal_request_contract: venues::contracts::WITHDRAWAL_REQUEST_CONTRACT,
        consolidation_request_contract: venues::contracts::CONSOLIDATION_REQUEST_CONTRACT,
        deposit_gas: 150_000,
        request_gas: 250_000,
        refresh_ms: 1_000,
        deposit_contract_block: 0,
        beacon_url: None,
        beacon_poll_ms: 6_000,
        balance_falling_epochs: 3,
    })
}

/// Folder for dev-mode state (the JWT secret): `$ENGINE_DEV_DIR`, else `.engine-dev` in
/// the current directory.
pub fn dev_dir() -> PathBuf {
    std::env::var_os("ENGINE_DEV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".engine-dev"))
}

/// Reads the dev JWT secret, creating it (random, mode 0600) on first use.
pub fn dev_secret(dir: &Path) -> Result<String, EngineError> {
    let path = dir.join("jwt.secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_owned();
        if s.len() >= 16 {
            return Ok(s);
        }
    }
    std::fs::create_dir_all(dir)?;
    let secret: [u8; 32] = rand::random();
    let text = hex::encode(secret);
    {
        use std::io::Write;
        #[cfg(unix)]
        use std::os::unix::fs::OpenOptionsExt;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        opts.mode(0o600);
        opts.open(&path)?.write_all(text.as_bytes())?;
    }
    Ok(text)
}

/// Starts the dev chain: anvil on a free loopback port with a fixed one-second block time
/// (under automine, anvil stops mining under sustained load).
pub fn start_chain(anvil_path: Option<&Path>, block_time: Duration) -> Result<Anvil, EngineError> {
    let cfg = AnvilConfig {
        binary: anvil_path.map(Path::to_path_buf),
        block_time: Some(block_time),
        ..AnvilConfig::default()
    };
    Ok(Anvil::spawn(&cfg)?)
}

/// `n` broadcast providers `anvil-0`…, each its own WebSocket connection to the one dev
/// chain at `node_ws_url`, so that ranking and hedging run for real. One provider: none
/// listed (`node_ws_url` is the provider, named as in [`dev_config`]).
pub fn dev_providers(node_ws_url: &str, n: usize) -> Vec<crate::config::ProviderConfig> {
    if n <= 1 {
        return Vec::new();
    }
    (0..n)
        .map(|i| crate::config::ProviderConfig {
            name: format!("anvil-{i}"),
            ws_url: node_ws_url.to_owned(),
        })
        .collect()
}

/// Dev mode's SLO budgets: the engine's own part of intent to broadcast (WebSocket in to
/// the write towards the node) p99 under 1 ms, and the signer call p99 under 200 µs, each
/// judged over 10 s windows with 1 % of windows allowed out; the default alert windows.
pub fn dev_slo() -> crate::monitor::SloConfig {
    use crate::monitor::{SloAction, SloConfig, StageBudget};
    SloConfig {
        budgets: vec![
            StageBudget {
                stage: "e2e.ws_to_wire".into(),
                p95_us: None,
                p99_us: Some(1000.0),
                window_s: 10,
                error_budget: 0.01,
                action: Some(SloAction::DemoteProvider),
            },
            StageBudget {
                stage: "signing.sign_call".into(),
                p95_us: None,
                p99_us: Some(200.0),
                window_s: 10,
                error_budget: 0.01,
                action: Some(SloAction::FailOverSigner),
            },
        ],
        ..SloConfig::default()
    }
}
