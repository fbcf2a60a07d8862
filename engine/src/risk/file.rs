//! Policy files: TOML, validated at load. Every error names the file, the line and the
//! rule it is about (`policy.toml:14: account "treasury-1": allow[2]: not an address`).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A policy file that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {rule}: {message}", file.display())]
pub struct PolicyError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line of the offending rule or value.
    pub line: usize,
    /// The rule (`account "x"`, `velocity[3]`, `kyt`, …) or `file` for syntax errors.
    pub rule: String,
    /// What is wrong.
    pub message: String,
}

/// What to do with an intent when a check cannot clear it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Refuse it.
    Deny,
    /// Send it for four-eyes approval.
    Approval,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub groups: BTreeMap<String, Spanned<Vec<Spanned<String>>>>,
    #[serde(default, rename = "asset")]
    pub assets: Vec<Spanned<AssetDef>>,
    #[serde(default)]
    pub kyt: Option<Spanned<KytDef>>,
    #[serde(default)]
    pub travel_rule: Option<Spanned<TravelDef>>,
    #[serde(default)]
    pub approvals: Option<Spanned<ApprovalsDef>>,
    #[serde(default, rename = "account")]
    pub accounts: Vec<Spanned<AccountDef>>,
    #[serde(default)]
    pub velocity: Vec<Spanned<VelocityDef>>,
    #[serde(default)]
    pub routing: Option<Spanned<RoutingDef>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AssetDef {
    pub symbol: String,
    pub contract: Spanned<String>,
    #[serde(default)]
    pub travel_rule_threshold: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KytDef {
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default = "default_refresh")]
    pub refresh: Spanned<String>,
    #[serde(default = "default_kyt_ttl")]
    pub ttl: Spanned<String>,
    pub deny_score: u8,
    #[serde(default)]
    pub approval_score: Option<u8>,
    #[serde(default = "default_deny")]
    pub on_missing: Action,
    #[serde(default = "default_deny")]
    pub on_expired: Action,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TravelDef {
    pub threshold_wei: Spanned<String>,
    #[serde(default)]
    pub internal: Vec<Spanned<String>>,
    #[serde(default)]
    pub known_vasps: Vec<String>,
    #[serde(default = "default_deny")]
    pub on_unknown_vasp: Action,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApprovalsDef {
    #[serde(default = "default_approval_ttl")]
    pub ttl: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AccountDef {
    pub name: String,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub max_value_wei: Option<Spanned<String>>,
    /// Per-asset caps in the asset's base units, by symbol.
    #[serde(default)]
    pub asset_caps: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub max_gas: Option<u64>,
    #[serde(default)]
    pub max_fee_per_gas_wei: Option<Spanned<String>>,
    #[serde(default)]
    pub approval_above_wei: Option<Spanned<String>>,
    #[serde(default)]
    pub calls: Vec<Spanned<CallDef>>,
    #[serde(default)]
    pub business_hours: Option<Spanned<HoursDef>>,
    #[serde(default)]
    pub kyt: Option<bool>,
    /// Withdrawal addresses (or `group:` names) validator deposits may point to.
    #[serde(default)]
    pub staking_withdrawal: Vec<Spanned<String>>,
    /// A deposit for a pubkey that already has one (a top-up) is allowed.
    #[serde(default)]
    pub staking_top_up: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CallDef {
    pub target: String,
    pub selectors: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HoursDef {
    pub tz: String,
    pub days: Vec<String>,
    pub start: String,
    pub end: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct VelocityDef {
    #[serde(default)]
    pub account: Option<String>,
    #[serde(default)]
    pub desk: Option<String>,
    #[serde(default)]
    pub asset: Option<String>,
    pub window: Spanned<String>,
    #[serde(default)]
    pub max_value_wei: Option<Spanned<String>>,
    #[serde(default)]
    pub max_count: Option<u64>,
}

/// `[routing]`: how `route: auto` resolves.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoutingDef {
    /// Native value (wei) at or above which an intent goes private.
    #[serde(default)]
    pub private_above_wei: Option<Spanned<String>>,
    /// Accounts whose intents always go private.
    #[serde(default)]
    pub private_accounts: Vec<Spanned<String>>,
    /// Destinations (addresses or `group:NAME`) whose intents go private.
    #[serde(default)]
    pub private_contracts: Vec<Spanned<String>>,
    /// `public` (the default) or `private`.
    #[serde(default)]
    pub default: Option<Spanned<String>>,
}

fn default_refresh() -> Spanned<String> {
    Spanned::new(0..0, "30s".into())
}
fn default_kyt_ttl() -> Spanned<String> {
    Spanned::new(0..0, "5m".into())
}
fn default_approval_ttl() -> Spanned<String> {
    Spanned::new(0..0, "15m".into())
}
fn default_deny() -> Action {
    Action::Deny
}

/// Turns byte spans into errors with line numbers.
pub(crate) struct Locator<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl Locator<'_> {
    pub fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub fn err(
        &self,
        span: &Range<usize>,
        rule: impl Into<String>,
        message: impl Into<String>,
    ) -> PolicyError {
        PolicyError {
            file: self.file.to_owned(),
            line: self.line(span),
            rule: rule.into(),
            message: message.into(),
        }
    }
}

/// Parses the TOML (syntax and shape only).
pub(crate) fn parse(file: &Path, text: &str) -> Result<PolicyFile, PolicyError> {
    toml::from_str::<PolicyFile>(text).map_err(|e| {
        let loc = Locator { file, text };
        let span = e.span().unwrap_or(0..0);
        PolicyError {
            file: file.to_owned(),
            line: loc.line(&span),
            rule: "file".into(),
            message: e.message().to_owned(),
        }
    })
}

/// `30s`, `5m`, `1h`, `24h`, `1d`.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// `HH:MM` → minutes after midnight.
pub(crate) fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}
