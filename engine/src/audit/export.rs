//! Export of an audit log for a SIEM or an auditor: JSON lines, each a record's body with
//! its `hash` added, filtered by time, account, intent and principal.
//!
//! Invariants: the chain is verified before anything is written (a first pass), so a log
//! that does not check out exports nothing and fails with the same
//! [`super::AuditBreak`] as `verify`; the second pass, which writes, verifies again and
//! stops at the records the first pass saw (a log still being written is exported as it
//! was then). A line written is the record's body exactly as in the log with
//! `,"hash":"…"` inserted before its closing brace (field order kept).
//!
//! Matching: a record matches a filter when it carries the value itself (`intent`,
//! `principal` or, for `--principal`, `actor`/`approved_by`; `account`, `address` or
//! `from`), or when another record of the same intent does: the same sequence number in
//! the same run of the engine (runs are separated by `log_open` records). So a decision
//! (which names the account but not its address) matches `--account 0x…`, and
//! `confirmed` (which names no principal) matches `--principal`. Account names are tied
//! to addresses by the `account_key` records the engine writes at start.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use alloy_primitives::Address;
use serde_json::Value;

use super::verify::{AuditBreak, VerifiedRecord, VerifySummary, WalkError, walk};
use super::{LOG_OPEN, hex_hash, parse_at};
use crate::atrest::Sealer;

/// The account filter: an address (`0x…`) or an account name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountMatch {
    /// The account's address.
    Address(Address),
    /// The account's configured name.
    Name(String),
}

impl FromStr for AccountMatch {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("0x") || s.starts_with("0X") {
            s.parse::<Address>()
                .map(AccountMatch::Address)
                .map_err(|e| format!("`{s}` is not an address: {e}"))
        } else if s.is_empty() {
            Err("an empty account".into())
        } else {
            Ok(AccountMatch::Name(s.to_owned()))
        }
    }
}

/// Which records to export (every field set must match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportFilter {
    /// Records at or after this time (unix ns).
    pub since_ns: Option<i128>,
    /// Records before this time (unix ns).
    pub until_ns: Option<i128>,
    /// Records about this account.
    pub account: Option<AccountMatch>,
    /// Records about the intent with this desk id.
    pub intent: Option<String>,
    /// Records submitted, approved or acted on by this principal.
    pub principal: Option<String>,
}

/// An export that went through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Lines written.
    pub exported: u64,
    /// The log, verified.
    pub log: VerifySummary,
}

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The log does not check out (the lines before the problem were written).
    #[error("{0}")]
    Break(AuditBreak),
    /// The output could not be written.
    #[error("cannot write the export: {0}")]
    Write(std::io::Error),
}

/// A time given as RFC 3339 (`2026-12-01T06:00:00Z`) or unix seconds (`1764568800`, or
/// with a fraction), as unix nanoseconds.
pub fn parse_time(s: &str) -> Result<i128, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
        if frac.len() > 9 || frac.contains('.') || secs.is_empty() {
            return Err(format!("`{s}`: unix seconds with at most 9 decimals"));
        }
        let secs: i128 = secs.parse().map_err(|e| format!("`{s}`: {e}"))?;
        let mut ns: i128 = 0;
        if !frac.is_empty() {
            ns = format!("{frac:0<9}")
                .parse()
                .map_err(|e| format!("`{s}`: {e}"))?;
        }
        return Ok(secs * 1_000_000_000 + ns);
    }
    parse_at(s)
        .ok_or_else(|| format!("`{s}`: expected RFC 3339 (2026-12-01T06:00:00Z) or unix seconds"))
}

fn text<'a>(rec: &'a serde_json::Map<String, Value>, k: &str) -> Option<&'a str> {
    rec.get(k).and_then(Value::as_str)
}

fn address(rec: &serde_json::Map<String, Value>, k: &str) -> Option<Address> {
    text(rec, k).and_then(|s| s.parse().ok())
}

/// A (run, sequence number) pair: one intent.
type IntentKey = (u64, u64);

/// What the two passes share: the run, the account addresses, and the intents that some
/// record ties to each filter value.
#[derive(Debug, Default)]
struct Matcher {
    run: u64,
    addresses: HashMap<String, Address>,
    by_intent: HashSet<IntentKey>,
    by_principal: HashSet<IntentKey>,
    by_account: HashSet<IntentKey>,
}

/// Which filters a record matches by itself.
struct Direct {
    intent: bool,
    principal: bool,
    principal_acted: bool,
    account: bool,
}

impl Matcher {
    /// Follows runs and account addresses; the intent of `rec`, if it is about one.
    fn learn(&mut self, rec: &serde_json::Map<String, Value>) -> Option<IntentKey> {
        match text(rec, "kind") {
            Some(LOG_OPEN) => self.run += 1,
            Some("account_key") => {
                if let (Some(name), Some(a)) = (text(rec, "account"), address(rec, "address")) {
                    self.addresses.insert(name.to_owned(), a);
                }
            }
            _ => {}
        }
        rec.get("seq")
            .and_then(Value::as_u64)
            .filter(|s| *s != 0)
            .map(|s| (self.run, s))
    }

    fn direct(&self, f: &ExportFilter, rec: &serde_json::Map<String, Value>) -> Direct {
        let is = |k: &str, want: &Option<String>| {
            want.as_deref().is_some_and(|w| text(rec, k) == Some(w))
        };
        let account = match &f.account {
            None => false,
            Some(AccountMatch::Name(n)) => text(rec, "account") == Some(n.as_str()),
            Some(AccountMatch::Address(a)) => {
                address(rec, "address") == Some(*a)
                    || address(rec, "from") == Some(*a)
                    || text(rec, "account").and_then(|n| self.addresses.get(n)) == Some(a)
            }
        };
        Direct {
            intent: is("intent", &f.intent),
            principal: is("principal", &f.principal),
            principal_acted: is("actor", &f.principal) || is("approved_by", &f.principal),
            account,
        }
    }

    /// First pass: ties intents to the filter values their records carry.
    fn collect(&mut self, f: &ExportFilter, rec: &serde_json::Map<String, Value>) {
        let Some(key) = self.learn(rec) else {
            return;
        };
        let d = self.direct(f, rec);
        if d.intent {
            self.by_intent.insert(key);
        }
        if d.principal {
            self.by_principal.insert(key);
        }
        if d.account {
            self.by_account.insert(key);
        }
    }

    /// Second pass: whether `rec` is exported.
    fn passes(&mut self, f: &ExportFilter, rec: &serde_json::Map<String, Value>) -> bool {
        let key = self.learn(rec);
        let d = self.direct(f, rec);
        let tied = |set: &HashSet<IntentKey>| key.is_some_and(|k| set.contains(&k));
        if f.since_ns.is_some() || f.until_ns.is_some() {
            let Some(at) = text(rec, "at").and_then(parse_at) else {
                return false;
            };
            if f.since_ns.is_some_and(|s| at < s) || f.until_ns.is_some_and(|u| at >= u) {
                return false;
            }
        }
        (f.intent.is_none() || d.intent || tied(&self.by_intent))
            && (f.principal.is_none()
                || d.principal
                || d.principal_acted
                || tied(&self.by_principal))
            && (f.account.is_none() || d.account || tied(&self.by_account))
    }
}

/// Writes the records of the log in `dir` that pass `filter` to `out`, one JSON line each
/// (the body with its `hash`). The whole chain is verified first (`signer` as for
/// [`super::verify`]): a log that does not check out writes nothing and fails with
/// [`ExportError::Break`]. Sealed segments are opened with `sealer` (as for
/// [`super::verify`]); what is written is the plaintext.
pub fn export(
    dir: &Path,
    filter: &ExportFilter,
    signer: Option<Address>,
    sealer: Option<&Sealer>,
    out: &mut dyn Write,
) -> Result<ExportSummary, ExportError> {
    let mut first = Matcher::default();
    let log = walk(dir, signer, sealer, |r: &VerifiedRecord<'_>| {
        first.collect(filter, r.rec);
        Ok::<(), std::convert::Infallible>(())
    })
    .map_err(|e| match e {
        WalkError::Break(b) => ExportError::Break(b),
        WalkError::Sink(never) => match never {},
    })?;
    let mut m = Matcher {
        run: 0,
        addresses: HashMap::new(),
        ..first
    };
    let mut exported = 0u64;
    let mut line = String::with_capacity(1024);
    let second = walk(dir, signer, sealer, |r: &VerifiedRecord<'_>| {
        if r.n >= log.records {
            return Err(Stop::Done);
        }
        if !m.passes(filter, r.rec) {
            return Ok(());
        }
        line.clear();
        // The body ends with `}`: the hash goes in before it.
        line.push_str(&r.body[..r.body.len() - 1]);
        line.push_str(",\"hash\":\"");
        line.push_str(&hex_hash(&r.hash));
        line.push_str("\"}\n");
        out.write_all(line.as_bytes()).map_err(Stop::Write)?;
        exported += 1;
        Ok(())
    });
    match second {
        Ok(_) | Err(WalkError::Sink(Stop::Done)) => {}
        Err(WalkError::Sink(Stop::Write(e))) => return Err(ExportError::Write(e)),
        Err(WalkError::Break(b)) => return Err(ExportError::Break(b)),
    }
    out.flush().map_err(ExportError::Write)?;
    Ok(ExportSummary { exported, log })
}

/// Why the writing pass stopped early.
enum Stop {
    /// Every record of the first pass was seen.
    Done,
    /// The output failed.
    Write(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_unix_seconds() {
        assert_eq!(parse_time("1700000000").unwrap(), 1_700_000_000_000_000_000);
        assert_eq!(
            parse_time("1700000000.5").unwrap(),
            1_700_000_000_500_000_000
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000_000_000
        );
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("1.2.3").is_err());
    }

    #[test]
    fn accounts_are_addresses_or_names() {
        assert!(matches!(
            "0x0000000000000000000000000000000000000001".parse(),
            Ok(AccountMatch::Address(_))
        ));
        assert_eq!("dev0".parse(), Ok(AccountMatch::Name("dev0".into())));
        assert!("0x12".parse::<AccountMatch>().is_err());
    }
}
