//! The kill switch: freezes signing and sending per account, per asset, per venue, or for
//! everything, at once.
//!
//! State is a set of atomic flags read with one load each on the hot path (policy,
//! signing and broadcast all check it); flipping a flag is an admin action on the desk
//! I/O side. A stage that sees a flag set refuses (policy, signing) or holds (broadcast)
//! the next intent it handles.
//!
//! Invariant: asset and venue names map to fixed slots for the process lifetime (slot 0
//! is the chain's native asset), so a compiled policy can carry slot numbers and a kill
//! survives policy reloads.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Most distinct assets the switch can name (slot 0 is the native asset).
pub const MAX_ASSETS: usize = 64;
/// Most distinct venues the switch can name.
pub const MAX_VENUES: usize = 16;
/// Symbol of the native asset.
pub const NATIVE_ASSET: &str = "ETH";

/// What a kill or unkill applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KillScope {
    /// Everything.
    All,
    /// One account, by index.
    Account(u16),
    /// One asset, by symbol.
    Asset(String),
    /// One venue, by name.
    Venue(String),
}

/// Which flag stopped an intent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Killed {
    /// The global switch.
    All,
    /// The account's switch.
    Account,
    /// The asset's switch.
    Asset,
    /// The venue's switch.
    Venue,
}

impl Killed {
    /// Message for the desk.
    pub const fn message(self) -> &'static str {
        match self {
            Killed::All => "the global kill switch is on",
            Killed::Account => "the kill switch is on for this account",
            Killed::Asset => "the kill switch is on for this asset",
            Killed::Venue => "the kill switch is on for the venue of this route",
        }
    }
}

/// The errors of [`KillSwitch::set`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KillError {
    /// The account index is not configured.
    #[error("no such account")]
    UnknownAccount,
    /// No slot left for another asset or venue name.
    #[error("too many distinct {0} names")]
    Full(&'static str),
}

/// The switch. Shared (`Arc`) by the desk side and the stages.
#[derive(Debug)]
pub struct KillSwitch {
    all: AtomicBool,
    accounts: Box<[AtomicBool]>,
    assets: [AtomicBool; MAX_ASSETS],
    venues: [AtomicBool; MAX_VENUES],
    names: Mutex<Names>,
    /// Bumped on every change, so holders of held work can notice an unkill cheaply.
    epoch: AtomicU64,
}

#[derive(Debug, Default)]
struct Names {
    assets: Vec<String>,
    venues: Vec<String>,
}

impl KillSwitch {
    /// A switch for `accounts` accounts, everything running.
    pub fn new(accounts: usize) -> Self {
        Self {
            all: AtomicBool::new(false),
            accounts: (0..accounts).map(|_| AtomicBool::new(false)).collect(),
            assets: std::array::from_fn(|_| AtomicBool::new(false)),
            venues: std::array::from_fn(|_| AtomicBool::new(false)),
            names: Mutex::new(Names {
                assets: vec![NATIVE_ASSET.to_owned()],
                venues: Vec::new(),
            }),
            epoch: AtomicU64::new(0),
        }
    }

    fn slot(
        list: &mut Vec<String>,
        name: &str,
        max: usize,
        what: &'static str,
    ) -> Result<u8, KillError> {
        let key = name.trim().to_ascii_uppercase();
        if let Some(i) = list.iter().position(|n| *n == key) {
            return Ok(i as u8);
        }
        if list.len() >= max {
            return Err(KillError::Full(what));
        }
        list.push(key);
        Ok((list.len() - 1) as u8)
    }

    /// The slot of an asset symbol (case-insensitive), assigned on first use.
    pub fn asset_slot(&self, symbol: &str) -> Result<u8, KillError> {
        let mut n = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::slot(&mut n.assets, symbol, MAX_ASSETS, "asset")
    }

    /// The slot of a venue name (case-insensitive), assigned on first use.
    pub fn venue_slot(&self, venue: &str) -> Result<u8, KillError> {
        let mut n = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::slot(&mut n.venues, venue, MAX_VENUES, "venue")
    }

    /// Turns a switch on (`on`) or off.
    pub fn set(&self, scope: &KillScope, on: bool) -> Result<(), KillError> {
        match scope {
            KillScope::All => self.all.store(on, Ordering::SeqCst),
            KillScope::Account(i) => self
                .accounts
                .get(*i as usize)
                .ok_or(KillError::UnknownAccount)?
                .store(on, Ordering::SeqCst),
            KillScope::Asset(s) => {
                self.assets[self.asset_slot(s)? as usize].store(on, Ordering::SeqCst)
            }
            KillScope::Venue(v) => {
                self.venues[self.venue_slot(v)? as usize].store(on, Ordering::SeqCst)
            }
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Whether anything covers this account, asset slot and venue slot (`None` = no
    /// venue involved yet). A handful of atomic loads; no lock.
    #[inline]
    pub fn check(&self, account: u16, asset: u8, venue: Option<u8>) -> Option<Killed> {
        if self.all.load(Ordering::Acquire) {
            return Some(Killed::All);
        }
        if self
            .accounts
            .get(account as usize)
            .is_some_and(|a| a.load(Ordering::Acquire))
        {
            return Some(Killed::Account);
        }
        if self.assets[asset as usize % MAX_ASSETS].load(Ordering::Acquire) {
            return Some(Killed::Asset);
        }
        if let Some(v) = venue
            && self.venues[v as usize % MAX_VENUES].load(Ordering::Acquire)
        {
            return Some(Killed::Venue);
        }
        None
    }

    /// Whether the switch of venue slot `venue` is on (only that switch).
    #[inline]
    pub fn venue_killed(&self, venue: u8) -> bool {
        self.venues[venue as usize % MAX_VENUES].load(Ordering::Acquire)
    }

    /// Changes so far (compare two readings to notice a change).
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Every switch that is on, as scope descriptions (for `/health` and the admin reply).
    pub fn active(&self, account_names: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        if self.all.load(Ordering::Acquire) {
            out.push("all".to_owned());
        }
        for (i, a) in self.accounts.iter().enumerate() {
            if a.load(Ordering::Acquire) {
                out.push(format!(
                    "account:{}",
                    account_names.get(i).map_or("?", String::as_str)
                ));
            }
        }
        let n = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, s) in n.assets.iter().enumerate() {
            if self.assets[i].load(Ordering::Acquire) {
                out.push(format!("asset:{s}"));
            }
        }
        for (i, v) in n.venues.iter().enumerate() {
            if self.venues[i].load(Ordering::Acquire) {
                out.push(format!("venue:{v}"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_scope_stops_only_what_it_covers() {
        let k = KillSwitch::new(3);
        let usdc = k.asset_slot("usdc").unwrap();
        let node = k.venue_slot("node-0").unwrap();
        assert_eq!(k.check(1, 0, Some(node)), None);

        k.set(&KillScope::Account(1), true).unwrap();
        assert_eq!(k.check(1, 0, None), Some(Killed::Account));
        assert_eq!(k.check(2, 0, None), None);
        k.set(&KillScope::Account(1), false).unwrap();

        k.set(&KillScope::Asset("USDC".into()), true).unwrap();
        assert_eq!(k.check(0, usdc, None), Some(Killed::Asset));
        assert_eq!(k.check(0, 0, None), None);
        k.set(&KillScope::Asset("Usdc".into()), false).unwrap();

        k.set(&KillScope::Venue("node-0".into()), true).unwrap();
        assert_eq!(k.check(0, 0, Some(node)), Some(Killed::Venue));
        assert_eq!(k.check(0, 0, None), None);
        assert_eq!(k.active(&[]), vec!["venue:NODE-0".to_owned()]);
        k.set(&KillScope::Venue("node-0".into()), false).unwrap();

        let e = k.epoch();
        k.set(&KillScope::All, true).unwrap();
        assert!(k.epoch() > e);
        assert_eq!(k.check(2, usdc, Some(node)), Some(Killed::All));
        assert_eq!(
            k.set(&KillScope::Account(9), true),
            Err(KillError::UnknownAccount)
        );
    }
}
