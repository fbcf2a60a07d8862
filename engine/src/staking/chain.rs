//! The staking refresher: what the policy stage needs to know of the chain, read off the
//! hot path by the `staking-refresh` thread.
//!
//! Every `refresh_ms` it reads the EIP-7002 and EIP-7251 request fees (an `eth_call` with
//! empty input to each system contract) into [`RequestFees`] atomics, and the deposit
//! contract's new `DepositEvent` logs (`eth_getLogs`, in chunks) into the validator set
//! (pubkey → the first deposit's withdrawal credentials, as the beacon chain keeps them),
//! which it hands to the policy stage whole when it changed. The first read happens
//! synchronously at start ([`Refresher::prime`]) so that the first intent is decided with
//! the chain's state.
//!
//! When a beacon node is configured, the same thread polls it ([`venues::beacon`]) for
//! the validators whose credentials point to one of the engine's withdrawal addresses and
//! sends their status changes and alerts to every connected desk.
//!
//! Invariants: a log is counted once (the scan resumes after the last block read); a
//! failed read leaves the previous state in force and is retried at the next tick; the
//! set only grows (a deposit dropped by a reorg stays counted, so a later deposit for the
//! pubkey is judged a top-up: the safe side for an irreversible transfer).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use alloy_primitives::{Address, Bytes};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::Deserialize;
use serde_json::json;
use venues::{RpcClient, VenueError};

use crate::risk::staking::{RequestFees, ValidatorSet};
use crate::risk::{Retired, RiskUpdate};

/// What the refresher runs after each refresh, with the pubkeys of the engine's validators
/// (the validator watch).
pub type OnTick = Box<dyn FnMut(&[[u8; 48]]) + Send>;

/// Blocks per `eth_getLogs` request.
const LOG_CHUNK: u64 = 5_000;

/// Counters of the refresher.
#[derive(Debug, Default)]
pub struct RefreshStats {
    /// Deposit logs read.
    pub deposit_logs: AtomicU64,
    /// Validators known (pubkeys with a deposit).
    pub validators: AtomicU64,
    /// Reads that failed (node unreachable, bad answer).
    pub errors: AtomicU64,
    /// Beacon polls that failed.
    pub beacon_errors: AtomicU64,
    /// Alerts raised by the validator watch.
    pub alerts: AtomicU64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogJson {
    data: Bytes,
}

/// Reads request fees and deposit logs from a node.
#[derive(Debug)]
pub struct Refresher {
    node_ws_url: String,
    deposit_contract: Address,
    withdrawal_contract: Address,
    consolidation_contract: Address,
    fees: Arc<RequestFees>,
    /// Next block whose logs are unread.
    next_block: u64,
    set: ValidatorSet,
    /// Withdrawal addresses of the engine's accounts: their validators are watched.
    ours: HashSet<Address>,
    /// Pubkeys of validators the engine watches (credentials point to `ours`).
    watched: Vec<[u8; 48]>,
    stats: Arc<RefreshStats>,
}

impl Refresher {
    /// A refresher for `node_ws_url`; deposits are read from `first_block` on.
    pub fn new(
        node_ws_url: String,
        net: &crate::risk::staking::StakingNet,
        first_block: u64,
        ours: HashSet<Address>,
        stats: Arc<RefreshStats>,
    ) -> Self {
        Self {
            node_ws_url,
            deposit_contract: net.deposit_contract,
            withdrawal_contract: net.withdrawal_contract,
            consolidation_contract: net.consolidation_contract,
            fees: Arc::clone(&net.fees),
            next_block: first_block,
            set: ValidatorSet::default(),
            ours,
            watched: Vec::new(),
            stats,
        }
    }

    /// Reads the fees and every deposit log up to the head; returns whether the set grew.
    pub fn refresh(&mut self, rpc: &mut RpcClient) -> Result<bool, VenueError> {
        for (contract, slot) in [
            (self.withdrawal_contract, &self.fees.withdrawal),
            (self.consolidation_contract, &self.fees.consolidation),
        ] {
            let fee = venues::contracts::request_fee(rpc, contract)?;
            // A fee beyond u64 wei (18 ETH) is not payable here; keep it "unknown".
            slot.store(u64::try_from(fee).unwrap_or(u64::MAX), Ordering::Release);
        }
        let head = rpc.block_number()?;
        let mut grew = false;
        while self.next_block <= head {
            let to = head.min(self.next_block.saturating_add(LOG_CHUNK - 1));
            let logs: Vec<LogJson> = rpc.call(
                "eth_getLogs",
                json!([{
                    "fromBlock": format!("0x{:x}", self.next_block),
                    "toBlock": format!("0x{to:x}"),
                    "address": self.deposit_contract,
                    "topics": [venues::contracts::DEPOSIT_EVENT_TOPIC],
                }]),
            )?;
            for l in &logs {
                let Some(d) = venues::contracts::decode_deposit_event(&l.data) else {
                    continue;
                };
                self.stats.deposit_logs.fetch_add(1, Ordering::Relaxed);
                if let std::collections::hash_map::Entry::Vacant(v) = self.set.map.entry(d.pubkey) {
                    v.insert(d.withdrawal_credentials);
                    grew = true;
                    if let Some((_, a)) = super::withdrawal_address(&d.withdrawal_credentials)
                        && self.ours.contains(&Address::from(a))
                    {
                        self.watched.push(d.pubkey);
                    }
                }
            }
            self.next_block = to + 1;
        }
        self.stats
            .validators
            .store(self.set.map.len() as u64, Ordering::Relaxed);
        Ok(grew)
    }

    /// The first read, at start: the set to seed the policy stage with.
    pub fn prime(&mut self) -> Result<Box<ValidatorSet>, VenueError> {
        let mut rpc = RpcClient::connect(&self.node_ws_url)?;
        self.refresh(&mut rpc)?;
        Ok(Box::new(self.set.clone()))
    }

    /// Starts the `staking-refresh` thread: refreshes every `every`, hands grown sets to
    /// the policy stage over `updates` (dropping what comes back on `retired`), and runs
    /// `on_tick` (the validator watch) after each refresh. Runs until `stop`.
    pub fn spawn(
        mut self,
        every: Duration,
        updates: Sender<RiskUpdate>,
        retired: Receiver<Retired>,
        stop: Arc<AtomicBool>,
        mut on_tick: OnTick,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("staking-refresh".into())
            .spawn(move || {
                let mut rpc: Option<RpcClient> = None;
                let mut pending: Option<Box<ValidatorSet>> = None;
                let mut next = Instant::now() + every;
                while !stop.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now < next {
                        std::thread::sleep((next - now).min(Duration::from_millis(50)));
                        continue;
                    }
                    next = Instant::now() + every;
                    while retired.try_recv().is_ok() {}
                    if rpc.is_none() {
                        rpc = RpcClient::connect(&self.node_ws_url).ok();
                    }
                    if let Some(c) = rpc.as_mut() {
                        match self.refresh(c) {
                            Ok(true) => pending = Some(Box::new(self.set.clone())),
                            Ok(false) => {}
                            Err(e) => {
                                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(error = %e, "staking refresh failed; retrying");
                                rpc = None;
                            }
                        }
                    } else {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(set) = pending.take() {
                        match updates.try_send(RiskUpdate::Validators(set)) {
                            Ok(()) => {}
                            Err(TrySendError::Full(RiskUpdate::Validators(set))) => {
                                pending = Some(set);
                            }
                            Err(_) => {}
                        }
                    }
                    on_tick(&self.watched);
                }
            })
    }
}
