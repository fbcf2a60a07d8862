//! Shared set-up for the engine's integration tests: a real anvil and a real engine.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use engine::auth::{JwtAuth, Roles};
use engine::config::Layout;
use engine::desk::Desk;
use engine::{Config, Engine, dev};
use serde_json::{Value, json};
use venues::{Anvil, AnvilConfig};

pub const SECRET: &str = "integration-test-secret-0123456789";

pub struct Harness {
    pub anvil: Anvil,
    pub engine: Option<Engine>,
    pub url: String,
    pub token: String,
    pub rt: tokio::runtime::Runtime,
}

impl Harness {
    pub fn start(layout: Layout) -> Harness {
        Self::start_with(layout, |_| {})
    }

    pub fn start_with(layout: Layout, tweak: impl FnOnce(&mut Config)) -> Harness {
        Self::start_on(
            &AnvilConfig::with_block_time(Duration::from_millis(250)),
            layout,
            tweak,
        )
    }

    /// As [`Harness::start_with`], on an anvil configured by `anvil_cfg`.
    pub fn start_on(
        anvil_cfg: &AnvilConfig,
        layout: Layout,
        tweak: impl FnOnce(&mut Config),
    ) -> Harness {
        Self::start_prepared(anvil_cfg, layout, |_, c| tweak(c))
    }

    /// As [`Harness::start_on`]; `prepare` gets the running chain (to deploy contracts)
    /// before the engine starts.
    pub fn start_prepared(
        anvil_cfg: &AnvilConfig,
        layout: Layout,
        prepare: impl FnOnce(&Anvil, &mut Config),
    ) -> Harness {
        let anvil = Anvil::spawn(anvil_cfg).expect("anvil starts (run scripts/setup.sh)");
        let mut cfg = dev::dev_config(
            &anvil.ws_url(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SECRET.into(),
        );
        cfg.layout = layout;
        cfg.confirmations = 2;
        prepare(&anvil, &mut cfg);
        let engine = Engine::start(cfg).expect("engine starts");
        let url = format!("ws://{}/v1/ws", engine.local_addr());
        let token = JwtAuth::new(SECRET.as_bytes()).issue("desk-a", Roles::all(), 3600);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Harness {
            anvil,
            engine: Some(engine),
            url,
            token,
            rt,
        }
    }

    pub fn engine(&self) -> &Engine {
        self.engine.as_ref().unwrap()
    }

    pub fn token_for(&self, sub: &str, roles: Roles) -> String {
        JwtAuth::new(SECRET.as_bytes()).issue(sub, roles, 3600)
    }

    pub fn desk(&self) -> Desk {
        self.rt
            .block_on(Desk::connect(&self.url, Some(&self.token)))
            .expect("desk connects")
    }

    pub fn addr(&self) -> SocketAddr {
        self.engine().local_addr()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(e) = self.engine.take() {
            let failure = e.failure();
            let res = e.shutdown();
            if !std::thread::panicking() {
                assert!(failure.is_none(), "pipeline failed: {failure:?}");
                res.expect("clean shutdown");
            }
        }
    }
}

pub fn submit(intent: Value) -> Value {
    let id = intent["id"].clone();
    json!({"op": "submit", "req": id, "intent": intent})
}

pub fn transfer(id: &str, account: &str, to_index: usize, wei: u128) -> Value {
    json!({"id": id, "account": account, "kind": "transfer",
           "to": venues::DEV_ADDRESSES[to_index], "value_wei": wei.to_string()})
}

/// Reads frames until every id in `ids` reached a final state (or `timeout`); returns each
/// id's frames in arrival order.
pub async fn collect_until_final(
    desk: &mut Desk,
    ids: &[String],
    timeout: Duration,
) -> HashMap<String, Vec<Value>> {
    let mut frames: HashMap<String, Vec<Value>> = HashMap::new();
    let mut done = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while done.len() < ids.len() {
        let f = tokio::time::timeout_at(deadline, desk.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out: {} of {} final; pending e.g. {:?}",
                    done.len(),
                    ids.len(),
                    ids.iter()
                        .find(|i| !done.contains(*i))
                        .map(|i| frames.get(i))
                )
            })
            .expect("frame");
        let id = f["id"].as_str().unwrap_or_default().to_owned();
        let fin = f["op"] == "error"
            || matches!(
                f["state"].as_str(),
                Some("confirmed" | "rejected" | "failed")
            );
        if fin && ids.contains(&id) {
            done.insert(id.clone());
        }
        frames.entry(id).or_default().push(f);
    }
    frames
}

/// The sequence of (op or state) names of an intent's frames.
pub fn states(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| match f["op"].as_str() {
            Some("event") => f["state"].as_str().unwrap_or("?").to_owned(),
            Some(op) => op.to_owned(),
            None => "?".into(),
        })
        .collect()
}

/// Gives `addr` 100 ETH on the harness's anvil (`anvil_setBalance`).
pub fn fund(h: &Harness, addr: alloy_primitives::Address) {
    let mut rpc = venues::RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let _: Value = rpc
        .call(
            "anvil_setBalance",
            json!([addr, "0x56bc75e2d63100000"]), // 100 ETH
        )
        .unwrap();
}

/// An account signing with `key`, allowed to send to the dev addresses 5–9.
pub fn custody_account(
    name: &str,
    key: engine::config::KeyConfig,
) -> engine::config::AccountConfig {
    engine::config::AccountConfig {
        name: name.into(),
        key,
        standby: None,
        approvals: 0,
        allowlist: venues::DEV_ADDRESSES[5..10].to_vec(),
        max_value_wei: dev::dev_cap(),
        staking_withdrawal: Vec::new(),
        staking_top_up: false,
    }
}

/// Submits `n` transfers from `account` in one burst and waits for all to be confirmed;
/// checks each was signed by `from`, on consecutive nonces in submission order, and mined
/// by anvil with `from` as its sender. Returns each intent's frames in submission order.
pub fn transfers_confirm(
    h: &Harness,
    account: &str,
    from: alloy_primitives::Address,
    tag: &str,
    n: usize,
) -> Vec<Vec<Value>> {
    let mut desk = h.desk();
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
    let mut frames = h.rt.block_on(async {
        for (i, id) in ids.iter().enumerate() {
            desk.send(&submit(transfer(id, account, 5 + i % 5, 1_000 + i as u128)))
                .await
                .unwrap();
        }
        collect_until_final(&mut desk, &ids, Duration::from_secs(90)).await
    });
    let mut rpc = venues::RpcClient::connect(&h.anvil.ws_url()).unwrap();
    let mut nonces = Vec::new();
    let mut out = Vec::new();
    for id in &ids {
        let f = frames.remove(id).unwrap();
        let st = states(&f);
        assert_eq!(
            st.last().map(String::as_str),
            Some("confirmed"),
            "{id}: {f:?}"
        );
        let signed = f
            .iter()
            .find(|x| x["state"] == "signed")
            .expect("signed event");
        assert_eq!(
            signed["from"].as_str().unwrap().to_lowercase(),
            from.to_string().to_lowercase(),
            "{id} signed by the account's key"
        );
        nonces.push(signed["nonce"].as_u64().unwrap());
        let hash: alloy_primitives::B256 = signed["tx_hash"].as_str().unwrap().parse().unwrap();
        let r = rpc.receipt(hash).unwrap().expect("receipt");
        assert!(r.success, "{id} succeeded on chain");
        assert_eq!(r.from, from, "{id}: anvil recovered the signer's address");
        out.push(f);
    }
    let first = nonces[0];
    assert_eq!(
        nonces,
        (first..first + n as u64).collect::<Vec<_>>(),
        "nonces are consecutive in submission order"
    );
    out
}

/// A plain HTTP GET on the engine's port; the whole response, headers included.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of one sample line of the engine's `/metrics`, e.g.
/// `engine_provider_up{provider="prov-a"}`; panics, showing the page, if it is missing.
pub fn metric(h: &Harness, line: &str) -> f64 {
    let body = http_get(h.addr(), "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {line} in:\n{body}"))
}

/// Reads frames until the one that echoes `req` (at most 30 s); the frames before it
/// are dropped.
pub async fn reply(desk: &mut Desk, req: &str) -> Value {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(30), desk.recv())
            .await
            .expect("a reply")
            .unwrap();
        if f["req"] == req {
            return f;
        }
    }
}

/// Genesis fork version of the staking tests' network (hoodi's, so deposit data the staking
/// deposit CLI makes with `--chain hoodi` is valid on it).
pub const STAKING_FORK: [u8; 4] = [0x10, 0x00, 0x09, 0x10];

/// Chain, staking contracts (deposit, batch, the EIP-7002/7251 request contracts) and an
/// engine with `[staking]`: dev0 and dev1 stake to their own addresses (dev1 may top up);
/// `batch`: whether the batch contract is configured; `beacon_url`: the validator watch.
/// `before` runs on the chain, and may change the configuration, before the engine starts.
pub fn start_staking(
    batch: bool,
    beacon_url: Option<String>,
    before: impl FnOnce(&mut venues::RpcClient, &venues::contracts::StakingContracts, &mut Config),
) -> (Harness, venues::contracts::StakingContracts) {
    use venues::contracts;
    let mut deployed = None;
    let h = Harness::start_prepared(
        &AnvilConfig::with_block_time(Duration::from_millis(250)),
        Layout::Fused,
        |anvil, cfg| {
            let mut rpc = anvil.rpc().unwrap();
            let c = contracts::deploy_staking(&mut rpc, venues::DEV_ADDRESSES[9]).expect("deploy");
            contracts::install_system_contracts(&mut rpc).expect("system contracts");
            set_staking(cfg, &c, batch, beacon_url);
            before(&mut rpc, &c, cfg);
            deployed = Some(c);
        },
    );
    (h, deployed.unwrap())
}

/// Configures `[staking]` for contracts `c`: dev0 and dev1 stake to their own addresses
/// (dev1 may top up); `batch`: whether the batch contract is used; `beacon_url`: the
/// validator watch.
pub fn set_staking(
    cfg: &mut Config,
    c: &venues::contracts::StakingContracts,
    batch: bool,
    beacon_url: Option<String>,
) {
    use venues::contracts;
    let dev = venues::DEV_ADDRESSES;
    cfg.staking = Some(engine::config::StakingConfig {
        genesis_fork_version: format!("0x{}", hex::encode(STAKING_FORK)),
        deposit_contract: c.deposit,
        batch_contract: batch.then_some(c.batch),
        withdrawal_request_contract: contracts::WITHDRAWAL_REQUEST_CONTRACT,
        consolidation_request_contract: contracts::CONSOLIDATION_REQUEST_CONTRACT,
        deposit_gas: 150_000,
        request_gas: 250_000,
        refresh_ms: 200,
        deposit_contract_block: 0,
        beacon_url,
        beacon_poll_ms: 100,
        balance_falling_epochs: 3,
    });
    cfg.accounts[0].staking_withdrawal = vec![dev[0]];
    cfg.accounts[1].staking_withdrawal = vec![dev[1]];
    cfg.accounts[1].staking_top_up = true;
}
