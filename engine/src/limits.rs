//! Abuse limits at the desk edge: frame rates per connection and per principal, and open
//! connections per principal.
//!
//! Rates are GCRA token buckets (the generic cell rate algorithm: one theoretical arrival
//! time per bucket, in an `AtomicU64`), so a frame is checked with a few atomic operations
//! and no lock, from any connection task. A principal's bucket and connection count are
//! found once per connection (under a mutex, at the WebSocket upgrade), never per frame.
//!
//! Invariants:
//! - A refused frame is not processed at all: it gets an `error` with code
//!   `rate_limited` (its `req` and intent id echoed when they can be read) and nothing
//!   else happens, so the desk knows exactly what to send again. Frames accepted before
//!   are unaffected.
//! - A principal's open connections never exceed `max_connections_per_principal`: the
//!   count is taken at the upgrade (refused with HTTP 429 `too_many_connections`) and
//!   given back when the session ends ([`ConnectionSlot`] on drop).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The limits as configured (`[limits]`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Frames per second one connection may send, sustained.
    pub frames_per_sec_per_connection: u32,
    /// Frames one connection may send at once above the sustained rate.
    pub burst_per_connection: u32,
    /// Frames per second all of a principal's connections together may send, sustained.
    pub frames_per_sec_per_principal: u32,
    /// Frames a principal may send at once above the sustained rate.
    pub burst_per_principal: u32,
    /// Open desk connections per principal.
    pub max_connections_per_principal: u32,
    /// Replies queued for one connection before the desk is deemed not reading and is
    /// closed (1008).
    pub outbound_queue: u32,
    /// How long a connection's socket may take no bytes while a reply waits before the
    /// desk is closed (1008), in ms.
    pub write_stall_ms: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            frames_per_sec_per_connection: 5_000,
            burst_per_connection: 1_000,
            frames_per_sec_per_principal: 20_000,
            burst_per_principal: 4_000,
            max_connections_per_principal: 256,
            outbound_queue: crate::server::OUTBOUND_QUEUE as u32,
            write_stall_ms: crate::server::WRITE_STALL.as_millis() as u32,
        }
    }
}

impl LimitsConfig {
    /// Every value must be at least 1.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            (
                "frames_per_sec_per_connection",
                self.frames_per_sec_per_connection,
            ),
            ("burst_per_connection", self.burst_per_connection),
            (
                "frames_per_sec_per_principal",
                self.frames_per_sec_per_principal,
            ),
            ("burst_per_principal", self.burst_per_principal),
            (
                "max_connections_per_principal",
                self.max_connections_per_principal,
            ),
            ("outbound_queue", self.outbound_queue),
            ("write_stall_ms", self.write_stall_ms),
        ] {
            if v == 0 {
                return Err(format!("limits.{name}: must be at least 1"));
            }
        }
        Ok(())
    }
}

/// Nanoseconds since the first call (a process-wide monotonic origin).
fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    Instant::now().duration_since(origin).as_nanos() as u64
}

/// A GCRA token bucket: `rate` per second sustained, `burst` at once.
#[derive(Debug)]
pub struct RateLimit {
    /// Nanoseconds per token.
    interval_ns: u64,
    /// How far the theoretical arrival time may run ahead of now: (burst − 1) intervals.
    tolerance_ns: u64,
    /// Theoretical arrival time of the next conforming frame (ns, [`now_ns`] clock).
    tat: AtomicU64,
}

impl RateLimit {
    /// A full bucket.
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        let interval_ns = 1_000_000_000 / u64::from(rate_per_sec.max(1));
        Self {
            interval_ns: interval_ns.max(1),
            tolerance_ns: interval_ns * u64::from(burst.max(1) - 1),
            tat: AtomicU64::new(0),
        }
    }

    /// Takes one token at `now_ns`; `Err(wait)` (how long until one is free) if none.
    pub fn check_at(&self, now_ns: u64) -> Result<(), Duration> {
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let base = tat.max(now_ns);
            if base - now_ns > self.tolerance_ns {
                return Err(Duration::from_nanos(base - now_ns - self.tolerance_ns));
            }
            match self.tat.compare_exchange_weak(
                tat,
                base + self.interval_ns,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(t) => tat = t,
            }
        }
    }

    /// Gives back a token taken by [`RateLimit::check_at`] (another limit refused the
    /// frame, so it should not count here).
    pub fn refund(&self) {
        self.tat.fetch_sub(self.interval_ns, Ordering::Relaxed);
    }
}

/// What a principal shares across its connections.
#[derive(Debug)]
struct PrincipalLimit {
    frames: RateLimit,
    connections: AtomicU32,
}

/// The desk edge's limits.
#[derive(Debug)]
pub struct Limits {
    cfg: LimitsConfig,
    principals: Mutex<HashMap<String, Arc<PrincipalLimit>>>,
    /// Frames refused for a rate (for `/metrics`).
    pub rate_limited: AtomicU64,
    /// Upgrades refused for the connection cap (for `/metrics`).
    pub connections_refused: AtomicU64,
}

/// Why a frame or a connection was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The connection sends faster than its limit.
    #[error(
        "rate limit: this connection may send {rate} frames/s (burst {burst}); frame not processed, send it again in {retry_ms} ms"
    )]
    Connection {
        /// Sustained rate.
        rate: u32,
        /// Burst.
        burst: u32,
        /// When a token is free again (ms, rounded up).
        retry_ms: u64,
    },
    /// The principal's connections together send faster than its limit.
    #[error(
        "rate limit: principal `{principal}` may send {rate} frames/s over all its connections (burst {burst}); frame not processed, send it again in {retry_ms} ms"
    )]
    Principal {
        /// The principal.
        principal: String,
        /// Sustained rate.
        rate: u32,
        /// Burst.
        burst: u32,
        /// When a token is free again (ms, rounded up).
        retry_ms: u64,
    },
    /// The principal has as many connections open as allowed.
    #[error(
        "principal `{principal}` already has {max} desk connections open (max_connections_per_principal); close one first"
    )]
    TooManyConnections {
        /// The principal.
        principal: String,
        /// The cap.
        max: u32,
    },
}

/// One open connection's share of the limits; gives its principal's connection slot back
/// on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    principal: Arc<PrincipalLimit>,
    sub: String,
    own: RateLimit,
    limits: Arc<Limits>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.principal.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

fn ceil_ms(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000) as u64
}

impl ConnectionSlot {
    /// Checks one incoming frame against the connection's and the principal's rates.
    pub fn check_frame(&self) -> Result<(), LimitError> {
        let now = now_ns();
        let cfg = &self.limits.cfg;
        if let Err(wait) = self.own.check_at(now) {
            self.limits.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(LimitError::Connection {
                rate: cfg.frames_per_sec_per_connection,
                burst: cfg.burst_per_connection,
                retry_ms: ceil_ms(wait),
            });
        }
        if let Err(wait) = self.principal.frames.check_at(now) {
            self.own.refund();
            self.limits.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(LimitError::Principal {
                principal: self.sub.clone(),
                rate: cfg.frames_per_sec_per_principal,
                burst: cfg.burst_per_principal,
                retry_ms: ceil_ms(wait),
            });
        }
        Ok(())
    }
}

impl Limits {
    /// Limits as configured.
    pub fn new(cfg: LimitsConfig) -> Self {
        Self {
            cfg,
            principals: Mutex::new(HashMap::new()),
            rate_limited: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LimitsConfig {
        &self.cfg
    }

    /// Takes a connection slot for principal `sub` (at the upgrade), or refuses it.
    pub fn open(self: &Arc<Self>, sub: &str) -> Result<ConnectionSlot, LimitError> {
        let p = {
            let mut map = self.principals.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(map.entry(sub.to_owned()).or_insert_with(|| {
                Arc::new(PrincipalLimit {
                    frames: RateLimit::new(
                        self.cfg.frames_per_sec_per_principal,
                        self.cfg.burst_per_principal,
                    ),
                    connections: AtomicU32::new(0),
                })
            }))
        };
        let max = self.cfg.max_connections_per_principal;
        let taken = p
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        if taken.is_err() {
            self.connections_refused.fetch_add(1, Ordering::Relaxed);
            return Err(LimitError::TooManyConnections {
                principal: sub.to_owned(),
                max,
            });
        }
        Ok(ConnectionSlot {
            principal: p,
            sub: sub.to_owned(),
            own: RateLimit::new(
                self.cfg.frames_per_sec_per_connection,
                self.cfg.burst_per_connection,
            ),
            limits: Arc::clone(self),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let b = RateLimit::new(10, 3); // 100 ms per token
        let t0 = 1_000_000_000;
        for _ in 0..3 {
            assert!(b.check_at(t0).is_ok());
        }
        let wait = b.check_at(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(b.check_at(t0 + 99_000_000).is_err());
        assert!(b.check_at(t0 + 100_000_000).is_ok());
        assert!(b.check_at(t0 + 100_000_000).is_err());
        // Idle for long: full again, never more than the burst.
        let later = t0 + 10_000_000_000;
        for _ in 0..3 {
            assert!(b.check_at(later).is_ok());
        }
        assert!(b.check_at(later).is_err());
    }

    #[test]
    fn connections_per_principal_are_capped_and_given_back() {
        let l = Arc::new(Limits::new(LimitsConfig {
            max_connections_per_principal: 2,
            ..LimitsConfig::default()
        }));
        let a = l.open("alice").unwrap();
        let _b = l.open("alice").unwrap();
        let e = l.open("alice").unwrap_err();
        assert!(
            matches!(e, LimitError::TooManyConnections { max: 2, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("alice"));
        let _other = l.open("bob").expect("another principal has its own count");
        drop(a);
        let _c = l
            .open("alice")
            .expect("a closed connection gives its slot back");
        assert_eq!(l.connections_refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_principal_rate_is_shared_and_a_refusal_there_costs_the_connection_nothing() {
        let l = Arc::new(Limits::new(LimitsConfig {
            frames_per_sec_per_connection: 1,
            burst_per_connection: 3,
            frames_per_sec_per_principal: 1,
            burst_per_principal: 4,
            max_connections_per_principal: 8,
            ..LimitsConfig::default()
        }));
        let a = l.open("p").unwrap();
        let b = l.open("p").unwrap();
        for _ in 0..3 {
            a.check_frame().unwrap();
        }
        assert!(matches!(
            a.check_frame(),
            Err(LimitError::Connection { .. })
        ));
        b.check_frame().unwrap();
        let e = b.check_frame().unwrap_err();
        assert!(matches!(e, LimitError::Principal { .. }), "{e}");
        // b's own token for the refused frame was given back: two of its three are left.
        let now = now_ns();
        assert!(b.own.check_at(now).is_ok());
        assert!(b.own.check_at(now).is_ok());
        assert!(b.own.check_at(now).is_err());
        assert_eq!(l.rate_limited.load(Ordering::Relaxed), 2);
        let bad = LimitsConfig {
            burst_per_principal: 0,
            ..LimitsConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("burst_per_principal"));
    }
}
