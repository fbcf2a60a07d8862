//! The validator watch as the engine runs it: on the `staking-refresh` thread, every
//! `beacon_poll_ms`, the validators whose credentials point to one of the engine's
//! withdrawal addresses are read from the beacon node ([`venues::ValidatorWatch`]); status
//! changes, epoch balances and alerts become frames sent to every connected desk (through
//! the status thread's control channel), and alerts are also logged and counted.
//!
//! Exits the engine sent itself (the policy stage announces every allowed full exit and
//! consolidation source) are expected: the watch reports those as status changes, and any
//! other exit as an `unexpected_exit` alert.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::json;
use venues::{AlertKind, BeaconClient, ValidatorWatch, WatchConfig, WatchEvent};

use super::chain::{OnTick, RefreshStats};
use crate::config::StakingConfig;
use crate::error::EngineError;
use crate::stages::status::ConnControl;

/// Microseconds since the Unix epoch.
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The desk frame for one watch event.
pub fn frame(e: &WatchEvent) -> String {
    let hex = |pk: &[u8; 48]| format!("0x{}", hex::encode(pk));
    match e {
        WatchEvent::Status {
            pubkey,
            index,
            from,
            to,
            balance_gwei,
            slashed,
        } => json!({
            "op": "validator",
            "pubkey": hex(pubkey),
            "index": index.map(|i| i.to_string()),
            "from": from.map(|f| f.as_str()),
            "status": to.as_str(),
            "balance_gwei": balance_gwei.to_string(),
            "slashed": slashed,
            "ts_us": now_us(),
        }),
        WatchEvent::Balance {
            pubkey,
            epoch,
            balance_gwei,
        } => json!({
            "op": "validator",
            "pubkey": hex(pubkey),
            "epoch": epoch.to_string(),
            "balance_gwei": balance_gwei.to_string(),
            "ts_us": now_us(),
        }),
        WatchEvent::Alert {
            pubkey,
            kind,
            message,
        } => {
            let mut v = json!({
                "op": "alert",
                "kind": match kind {
                    AlertKind::Slashed => "slashed",
                    AlertKind::UnexpectedExit => "unexpected_exit",
                    AlertKind::BalanceFalling { .. } => "balance_falling",
                },
                "pubkey": hex(pubkey),
                "message": message,
                "ts_us": now_us(),
            });
            if let AlertKind::BalanceFalling { epochs } = kind {
                v["epochs"] = json!(epochs);
            }
            v
        }
    }
    .to_string()
}

/// What the refresher runs after each refresh: nothing without `beacon_url`; else a poll of
/// the beacon node every `beacon_poll_ms`.
pub fn on_tick(
    st: &StakingConfig,
    control: Sender<ConnControl>,
    exits: Receiver<[u8; 48]>,
    stats: Arc<RefreshStats>,
) -> Result<OnTick, EngineError> {
    let Some(url) = st.beacon_url.clone() else {
        return Ok(Box::new(move |_| while exits.try_recv().is_ok() {}));
    };
    let cfg = WatchConfig {
        slots_per_epoch: venues::beacon::DEFAULT_SLOTS_PER_EPOCH,
        falling_epochs: st.balance_falling_epochs,
    };
    // A beacon node that is down at start is dialled again at the next poll; the engine
    // does not wait for it.
    let mut watch: Option<ValidatorWatch> = match BeaconClient::connect(&url) {
        Ok(c) => Some(ValidatorWatch::new(c, cfg)),
        Err(e) => {
            tracing::warn!(error = %e, %url, "beacon node unreachable; the validator watch retries");
            None
        }
    };
    let every = Duration::from_millis(st.beacon_poll_ms);
    let mut next = Instant::now();
    let mut expected: HashSet<[u8; 48]> = HashSet::new();
    Ok(Box::new(move |ours: &[[u8; 48]]| {
        while let Ok(pk) = exits.try_recv() {
            if !watch.as_mut().is_some_and(|w| w.expect_exit(&pk)) {
                expected.insert(pk);
            }
        }
        if Instant::now() < next {
            return;
        }
        next = Instant::now() + every;
        if watch.is_none() {
            match BeaconClient::connect(&url) {
                Ok(c) => watch = Some(ValidatorWatch::new(c, cfg)),
                Err(e) => {
                    stats.beacon_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "beacon node unreachable; retrying");
                    return;
                }
            }
        }
        let Some(watch) = watch.as_mut() else {
            return;
        };
        for pk in ours {
            if watch.watch(*pk) && expected.remove(pk) {
                watch.expect_exit(pk);
            }
        }
        match watch.poll() {
            Ok(events) => {
                for e in &events {
                    if let WatchEvent::Alert {
                        pubkey, message, ..
                    } = e
                    {
                        stats.alerts.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            pubkey = %format!("0x{}", hex::encode(pubkey)),
                            %message,
                            "validator alert"
                        );
                    }
                    let _ = control.send(ConnControl::Notice { frame: frame(e) });
                }
            }
            Err(e) => {
                stats.beacon_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "beacon poll failed; retrying");
            }
        }
    }))
}
