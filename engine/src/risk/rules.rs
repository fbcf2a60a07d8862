//! The compiled policy and the decision function.
//!
//! A [`Policy`] is built off the hot path from a file ([`Policy::load`]) or from the
//! engine configuration ([`Policy::from_config`]) and is immutable afterwards. [`Risk`]
//! is the policy stage's state: the current policy, the velocity windows, the KYT snapshot
//! and the kill switch. [`Risk::decide`] reads only memory: no I/O, no lock, no allocation.
//!
//! Routing: a decision also resolves the intent's route. `public` and `private` asked by
//! the desk are kept (`private` is refused with `route_unavailable` when the engine has no
//! private relay, [`Risk::set_private_relay`]); `auto` becomes `private` when a `[routing]`
//! rule asks for it and a relay exists, else `public`. Every allowed intent therefore
//! leaves the policy stage with `Public` or `Private`, never `Auto`.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::{Address, B256, U256, keccak256};
use chrono::{Datelike, TimeZone, Timelike};

use crate::auth::Principals;
use crate::config::Config;
use crate::msg::{IntentKind, IntentMsg, Reason, Route};
use crate::risk::file::{self, Action, Locator, PolicyError};
use crate::risk::kill::{KillSwitch, NATIVE_ASSET};
use crate::risk::kyt::{KytLookup, KytSnapshot, KytSource};
use crate::risk::staking::{self, StakeTx, StakingNet, StakingRules, ValidatorSet, Validators};
use crate::risk::travel::vasp_key;
use crate::risk::velocity::{Exceeded, Window};

/// ERC-20 `transfer(address,uint256)`.
pub const ERC20_TRANSFER: [u8; 4] = [0xa9, 0x05, 0x9c, 0xbb];

/// Resolves names in a policy to the engine's indices.
#[derive(Debug, Clone, Copy)]
pub struct CompileCtx<'a> {
    /// Account name → index (from the engine configuration).
    pub accounts: &'a HashMap<String, u16>,
    /// The kill switch (asset and venue slots).
    pub kill: &'a KillSwitch,
    /// The principal interner (desk names in velocity rules).
    pub principals: &'a Principals,
    /// The public venue's name.
    pub venue: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    Account(u16),
    Desk(u32),
}

#[derive(Debug, Clone)]
struct VelocityRule {
    scope: Scope,
    asset: u8,
    window_secs: u64,
    max_value: Option<u128>,
    max_count: Option<u64>,
}

#[derive(Debug, Clone)]
struct Hours {
    tz: chrono_tz::Tz,
    days: u8,
    start: u16,
    end: u16,
}

impl Hours {
    fn is_open(&self, now_ns: u64) -> bool {
        let dt = self.tz.timestamp_nanos(now_ns as i64);
        let wd = dt.weekday().num_days_from_monday() as u8;
        let m = (dt.hour() * 60 + dt.minute()) as u16;
        let day = |d: u8| self.days & (1 << d) != 0;
        if self.start == self.end {
            day(wd)
        } else if self.start < self.end {
            day(wd) && m >= self.start && m < self.end
        } else {
            // Overnight: opens on a listed day and runs past midnight into the next.
            (day(wd) && m >= self.start) || (day((wd + 6) % 7) && m < self.end)
        }
    }
}

#[derive(Debug, Clone, Default)]
struct AccountRules {
    allow: HashSet<Address>,
    /// Per asset slot; `None` = no cap configured (then only allowlisted flows pass, uncapped).
    caps: Vec<(u8, u128)>,
    max_gas: Option<u64>,
    max_fee: Option<u128>,
    approval_above: Option<u128>,
    calls: HashSet<(Address, [u8; 4])>,
    hours: Option<Hours>,
    kyt: bool,
    velocity: Vec<u16>,
    /// First-cut policy from the engine configuration: any call to an allowlisted
    /// destination is allowed (no selector rules there).
    any_call_to_allowed: bool,
    /// Validator deposits: allowlisted withdrawal addresses, top-ups.
    staking: StakingRules,
}

#[derive(Debug, Clone)]
struct KytRules {
    ttl_ns: u64,
    deny_score: u8,
    approval_score: Option<u8>,
    on_missing: Action,
    on_expired: Action,
}

#[derive(Debug, Clone)]
struct TravelRules {
    threshold: u128,
    asset_thresholds: Vec<(u8, u128)>,
    internal: HashSet<Address>,
    known_vasps: HashSet<u64>,
    on_unknown_vasp: Action,
}

#[derive(Debug, Clone)]
struct AssetRule {
    slot: u8,
}

/// The compiled `[routing]` section: which `auto` intents go private. Deciding is a few
/// comparisons: a threshold, a bit of an account bitmap and a binary search of a sorted
/// address slice.
#[derive(Debug, Clone, Default)]
struct Routing {
    /// Native value at or above which an intent goes private.
    private_above: Option<U256>,
    /// One bit per account index: that account's intents go private.
    private_accounts: Box<[u64]>,
    /// Sorted destinations whose intents go private.
    private_contracts: Box<[Address]>,
    /// With no rule matching: private (else public).
    default_private: bool,
}

impl Routing {
    /// Whether an `auto` intent should go private.
    #[inline]
    fn wants_private(&self, msg: &IntentMsg) -> bool {
        let acct = msg.account.0 as usize;
        self.default_private
            || self.private_above.is_some_and(|t| msg.value >= t)
            || self
                .private_accounts
                .get(acct / 64)
                .is_some_and(|w| (w >> (acct % 64)) & 1 == 1)
            || self.private_contracts.binary_search(&msg.to).is_ok()
    }
}

/// A compiled, immutable policy.
#[derive(Debug)]
pub struct Policy {
    /// Version number, increasing with every load in this process.
    pub version: u32,
    /// Free-text label from the file.
    pub label: String,
    /// keccak256 of the file's bytes (or of the configuration's rules).
    pub digest: B256,
    /// Where it came from.
    pub origin: String,
    accounts: Vec<Option<AccountRules>>,
    assets: HashMap<Address, AssetRule>,
    kyt: Option<KytRules>,
    /// KYT feed and refresh interval, if the policy names one.
    pub kyt_source: Option<(KytSource, Duration)>,
    travel: Option<TravelRules>,
    /// How long an intent may wait for approval.
    pub approval_ttl: Duration,
    velocity: Vec<VelocityRule>,
    desk_velocity: HashMap<u32, Vec<u16>>,
    fresh_windows: Vec<Window>,
    venue: u8,
    routing: Routing,
}

fn parse_u128(s: &str) -> Option<u128> {
    let v: U256 = s.trim().parse().ok()?;
    u128::try_from(v).ok()
}

impl Policy {
    /// The first-cut policy of the engine configuration: per account an allowlist and an
    /// inclusive cap on the native asset; nothing else.
    pub fn from_config(cfg: &Config, ctx: CompileCtx<'_>, version: u32) -> Policy {
        let mut accounts = vec![None; cfg.accounts.len()];
        let mut digest_src = String::new();
        for a in &cfg.accounts {
            let Some(&i) = ctx.accounts.get(&a.name) else {
                continue;
            };
            digest_src.push_str(&format!(
                "{}:{:?}:{}:{:?}:{};",
                a.name, a.allowlist, a.max_value_wei, a.staking_withdrawal, a.staking_top_up
            ));
            accounts[i as usize] = Some(AccountRules {
                allow: a.allowlist.iter().copied().collect(),
                caps: vec![(0, u128::try_from(a.max_value_wei).unwrap_or(u128::MAX))],
                any_call_to_allowed: true,
                staking: StakingRules {
                    withdrawal: a.staking_withdrawal.iter().copied().collect(),
                    top_up: a.staking_top_up,
                },
                ..AccountRules::default()
            });
        }
        Policy {
            version,
            label: "engine configuration".into(),
            digest: keccak256(digest_src.as_bytes()),
            origin: "config".into(),
            accounts,
            assets: HashMap::new(),
            kyt: None,
            kyt_source: None,
            travel: None,
            approval_ttl: Duration::from_secs(900),
            velocity: Vec::new(),
            desk_velocity: HashMap::new(),
            fresh_windows: Vec::new(),
            venue: ctx.kill.venue_slot(ctx.venue).unwrap_or(0),
            routing: Routing::default(),
        }
    }

    /// Reads, validates and compiles a policy file.
    pub fn load(path: &Path, ctx: CompileCtx<'_>, version: u32) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: path.to_owned(),
            line: 0,
            rule: "file".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::compile(path, &text, ctx, version)
    }

    /// Validates and compiles policy text (`path` is for messages).
    pub fn compile(
        path: &Path,
        text: &str,
        ctx: CompileCtx<'_>,
        version: u32,
    ) -> Result<Policy, PolicyError> {
        let f = file::parse(path, text)?;
        let loc = Locator { file: path, text };

        let addr = |s: &str, span: &std::ops::Range<usize>, rule: &str, what: &str| {
            s.trim()
                .parse::<Address>()
                .map_err(|_| loc.err(span, rule, format!("{what}: `{s}` is not an address")))
        };
        let amount = |s: &str, span: &std::ops::Range<usize>, rule: &str, what: &str| {
            parse_u128(s).ok_or_else(|| {
                loc.err(
                    span,
                    rule,
                    format!("{what}: `{s}` is not a decimal amount in base units"),
                )
            })
        };

        // Groups.
        let mut groups: HashMap<&str, HashSet<Address>> = HashMap::new();
        for (name, list) in &f.groups {
            let rule = format!("group \"{name}\"");
            let mut set = HashSet::with_capacity(list.get_ref().len());
            for (i, a) in list.get_ref().iter().enumerate() {
                set.insert(addr(a.get_ref(), &a.span(), &rule, &format!("[{i}]"))?);
            }
            groups.insert(name.as_str(), set);
        }
        let resolve_list = |list: &[toml::Spanned<String>], rule: &str, what: &str| {
            let mut out = HashSet::new();
            for (i, s) in list.iter().enumerate() {
                let v = s.get_ref().trim();
                if let Some(g) = v.strip_prefix("group:") {
                    let set = groups.get(g).ok_or_else(|| {
                        loc.err(
                            &s.span(),
                            rule,
                            format!("{what}[{i}]: no group named `{g}`"),
                        )
                    })?;
                    out.extend(set.iter().copied());
                } else {
                    out.insert(addr(v, &s.span(), rule, &format!("{what}[{i}]"))?);
                }
            }
            Ok::<_, PolicyError>(out)
        };

        // Assets.
        let mut assets = HashMap::new();
        let mut asset_slots: HashMap<String, u8> = HashMap::new();
        asset_slots.insert(NATIVE_ASSET.to_owned(), 0);
        let mut asset_thresholds = Vec::new();
        for a in &f.assets {
            let (span, def) = (a.span(), a.get_ref());
            let rule = format!("asset \"{}\"", def.symbol);
            let sym = def.symbol.trim().to_ascii_uppercase();
            if sym.is_empty() || sym == NATIVE_ASSET {
                return Err(loc.err(
                    &span,
                    rule,
                    "symbol must be non-empty and not the native asset",
                ));
            }
            let contract = addr(
                def.contract.get_ref(),
                &def.contract.span(),
                &rule,
                "contract",
            )?;
            let slot = ctx
                .kill
                .asset_slot(&sym)
                .map_err(|e| loc.err(&span, &rule, e.to_string()))?;
            if asset_slots.insert(sym, slot).is_some() {
                return Err(loc.err(&span, rule, "asset defined twice"));
            }
            if let Some(t) = &def.travel_rule_threshold {
                asset_thresholds.push((
                    slot,
                    amount(t.get_ref(), &t.span(), &rule, "travel_rule_threshold")?,
                ));
            }
            assets.insert(contract, AssetRule { slot });
        }

        // KYT.
        let mut kyt = None;
        let mut kyt_source = None;
        if let Some(k) = &f.kyt {
            let (span, d) = (k.span(), k.get_ref());
            let ttl = file::parse_duration(d.ttl.get_ref())
                .ok_or_else(|| loc.err(&d.ttl.span(), "kyt", "ttl: expected a duration like 5m"))?;
            if ttl > Duration::from_secs(3600) {
                return Err(loc.err(
                    &d.ttl.span(),
                    "kyt",
                    "ttl: at most 1h (scores must stay current)",
                ));
            }
            let refresh = file::parse_duration(d.refresh.get_ref()).ok_or_else(|| {
                loc.err(
                    &d.refresh.span(),
                    "kyt",
                    "refresh: expected a duration like 30s",
                )
            })?;
            if refresh >= ttl {
                return Err(loc.err(
                    &span,
                    "kyt",
                    "refresh must be shorter than ttl, or entries expire between refreshes",
                ));
            }
            if d.deny_score > 100
                || d.approval_score
                    .is_some_and(|a| a > 100 || a >= d.deny_score)
            {
                return Err(loc.err(
                    &span,
                    "kyt",
                    "scores are 0..=100 and approval_score must be below deny_score",
                ));
            }
            kyt = Some(KytRules {
                ttl_ns: ttl.as_nanos() as u64,
                deny_score: d.deny_score,
                approval_score: d.approval_score,
                on_missing: d.on_missing,
                on_expired: d.on_expired,
            });
            kyt_source = d.source.as_deref().map(|s| {
                let rel = KytSource::parse(s);
                let src = match rel {
                    KytSource::File(p) if p.is_relative() => {
                        KytSource::File(path.parent().unwrap_or(Path::new(".")).join(p))
                    }
                    other => other,
                };
                (src, refresh)
            });
        }

        // Travel rule.
        let mut travel = None;
        if let Some(t) = &f.travel_rule {
            let d = t.get_ref();
            travel = Some(TravelRules {
                threshold: amount(
                    d.threshold_wei.get_ref(),
                    &d.threshold_wei.span(),
                    "travel_rule",
                    "threshold_wei",
                )?,
                asset_thresholds,
                internal: resolve_list(&d.internal, "travel_rule", "internal")?,
                known_vasps: d.known_vasps.iter().map(|v| vasp_key(v)).collect(),
                on_unknown_vasp: d.on_unknown_vasp,
            });
        }

        let approval_ttl = match &f.approvals {
            Some(a) => file::parse_duration(a.get_ref().ttl.get_ref()).ok_or_else(|| {
                loc.err(
                    &a.get_ref().ttl.span(),
                    "approvals",
                    "ttl: expected a duration like 15m",
                )
            })?,
            None => Duration::from_secs(900),
        };

        // Accounts.
        let mut accounts: Vec<Option<AccountRules>> = vec![None; ctx.accounts.len()];
        for a in &f.accounts {
            let (span, d) = (a.span(), a.get_ref());
            let rule = format!("account \"{}\"", d.name);
            let Some(&idx) = ctx.accounts.get(&d.name) else {
                return Err(loc.err(&span, rule, "no such account in the engine configuration"));
            };
            if accounts[idx as usize].is_some() {
                return Err(loc.err(&span, rule, "account defined twice"));
            }
            let mut r = AccountRules {
                allow: resolve_list(&d.allow, &rule, "allow")?,
                kyt: d.kyt.unwrap_or(kyt.is_some()),
                max_gas: d.max_gas,
                staking: StakingRules {
                    withdrawal: resolve_list(&d.staking_withdrawal, &rule, "staking_withdrawal")?,
                    top_up: d.staking_top_up.unwrap_or(false),
                },
                ..AccountRules::default()
            };
            if r.kyt && kyt.is_none() {
                return Err(loc.err(&span, rule, "kyt = true needs a [kyt] section"));
            }
            if let Some(v) = &d.max_value_wei {
                r.caps
                    .push((0, amount(v.get_ref(), &v.span(), &rule, "max_value_wei")?));
            }
            for (sym, v) in &d.asset_caps {
                let key = sym.trim().to_ascii_uppercase();
                let Some(&slot) = asset_slots.get(&key) else {
                    return Err(loc.err(
                        &v.span(),
                        rule,
                        format!("asset_caps: no asset `{sym}` (define it with [[asset]])"),
                    ));
                };
                r.caps.push((
                    slot,
                    amount(v.get_ref(), &v.span(), &rule, &format!("asset_caps.{sym}"))?,
                ));
            }
            if let Some(v) = &d.max_fee_per_gas_wei {
                r.max_fee = Some(amount(
                    v.get_ref(),
                    &v.span(),
                    &rule,
                    "max_fee_per_gas_wei",
                )?);
            }
            if let Some(v) = &d.approval_above_wei {
                r.approval_above =
                    Some(amount(v.get_ref(), &v.span(), &rule, "approval_above_wei")?);
            }
            for (i, c) in d.calls.iter().enumerate() {
                let cd = c.get_ref();
                let target = addr(&cd.target, &c.span(), &rule, &format!("calls[{i}].target"))?;
                if cd.selectors.is_empty() {
                    return Err(loc.err(
                        &c.span(),
                        rule,
                        format!("calls[{i}]: list at least one selector"),
                    ));
                }
                for s in &cd.selectors {
                    let b = s
                        .trim()
                        .strip_prefix("0x")
                        .and_then(|h| hex::decode(h).ok())
                        .filter(|b| b.len() == 4)
                        .ok_or_else(|| {
                            loc.err(
                                &c.span(),
                                &rule,
                                format!("calls[{i}]: selector `{s}` is not 0x + 8 hex digits"),
                            )
                        })?;
                    r.calls.insert((target, [b[0], b[1], b[2], b[3]]));
                }
            }
            if let Some(h) = &d.business_hours {
                let hd = h.get_ref();
                let tz: chrono_tz::Tz = hd.tz.parse().map_err(|_| {
                    loc.err(
                        &h.span(),
                        &rule,
                        format!("business_hours.tz: unknown time zone `{}`", hd.tz),
                    )
                })?;
                let mut days = 0u8;
                for day in &hd.days {
                    let d = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
                        .iter()
                        .position(|n| day.eq_ignore_ascii_case(n))
                        .ok_or_else(|| {
                            loc.err(
                                &h.span(),
                                &rule,
                                format!("business_hours.days: `{day}` is not mon..sun"),
                            )
                        })?;
                    days |= 1 << d;
                }
                let hm = |s: &str, what: &str| {
                    file::parse_hhmm(s).ok_or_else(|| {
                        loc.err(
                            &h.span(),
                            &rule,
                            format!("business_hours.{what}: `{s}` is not HH:MM"),
                        )
                    })
                };
                r.hours = Some(Hours {
                    tz,
                    days,
                    start: hm(&hd.start, "start")?,
                    end: hm(&hd.end, "end")?,
                });
            }
            accounts[idx as usize] = Some(r);
        }

        // Velocity.
        let mut velocity = Vec::with_capacity(f.velocity.len());
        let mut desk_velocity: HashMap<u32, Vec<u16>> = HashMap::new();
        let mut seen_keys = HashSet::new();
        for (i, v) in f.velocity.iter().enumerate() {
            let (span, d) = (v.span(), v.get_ref());
            let rule = format!("velocity[{i}]");
            let window = file::parse_duration(d.window.get_ref())
                .filter(|w| w.as_secs() % 60 == 0)
                .ok_or_else(|| {
                    loc.err(
                        &d.window.span(),
                        &rule,
                        "window: expected whole minutes, like 1h or 24h",
                    )
                })?;
            let asset = match &d.asset {
                None => 0,
                Some(s) => *asset_slots
                    .get(&s.trim().to_ascii_uppercase())
                    .ok_or_else(|| loc.err(&span, &rule, format!("asset: no asset `{s}`")))?,
            };
            let scope =
                match (&d.account, &d.desk) {
                    (Some(a), None) => Scope::Account(*ctx.accounts.get(a).ok_or_else(|| {
                        loc.err(&span, &rule, format!("account: no account `{a}`"))
                    })?),
                    (None, Some(desk)) => Scope::Desk(ctx.principals.intern(desk)),
                    _ => return Err(loc.err(&span, rule, "name exactly one of account or desk")),
                };
            let max_value = match &d.max_value_wei {
                Some(m) => Some(amount(m.get_ref(), &m.span(), &rule, "max_value_wei")?),
                None => None,
            };
            if max_value.is_none() && d.max_count.is_none() {
                return Err(loc.err(&span, rule, "set max_value_wei, max_count or both"));
            }
            if !seen_keys.insert((scope.clone(), asset, window.as_secs())) {
                return Err(loc.err(
                    &span,
                    rule,
                    "a window of this length for this scope and asset is already defined",
                ));
            }
            let n = velocity.len() as u16;
            match &scope {
                Scope::Account(a) => {
                    let Some(Some(acct)) = accounts.get_mut(*a as usize) else {
                        return Err(loc.err(
                            &span,
                            rule,
                            "the account has no [[account]] rules in this policy",
                        ));
                    };
                    acct.velocity.push(n);
                }
                Scope::Desk(p) => desk_velocity.entry(*p).or_default().push(n),
            }
            velocity.push(VelocityRule {
                scope,
                asset,
                window_secs: window.as_secs(),
                max_value,
                max_count: d.max_count,
            });
        }
        let fresh_windows = velocity
            .iter()
            .map(|r| Window::new(r.window_secs))
            .collect();

        // Routing.
        let mut routing = Routing::default();
        if let Some(r) = &f.routing {
            let d = r.get_ref();
            if let Some(t) = &d.private_above_wei {
                routing.private_above = Some(U256::from(amount(
                    t.get_ref(),
                    &t.span(),
                    "routing",
                    "private_above_wei",
                )?));
            }
            let mut bits = vec![0u64; ctx.accounts.len().div_ceil(64)];
            for (i, name) in d.private_accounts.iter().enumerate() {
                let Some(&idx) = ctx.accounts.get(name.get_ref().trim()) else {
                    return Err(loc.err(
                        &name.span(),
                        "routing",
                        format!(
                            "private_accounts[{i}]: no account `{}` in the engine configuration",
                            name.get_ref()
                        ),
                    ));
                };
                let idx = idx as usize;
                if idx / 64 >= bits.len() {
                    bits.resize(idx / 64 + 1, 0);
                }
                bits[idx / 64] |= 1 << (idx % 64);
            }
            routing.private_accounts = bits.into_boxed_slice();
            let mut contracts: Vec<Address> =
                resolve_list(&d.private_contracts, "routing", "private_contracts")?
                    .into_iter()
                    .collect();
            contracts.sort_unstable();
            routing.private_contracts = contracts.into_boxed_slice();
            if let Some(def) = &d.default {
                routing.default_private = match def.get_ref().trim() {
                    "public" => false,
                    "private" => true,
                    other => {
                        return Err(loc.err(
                            &def.span(),
                            "routing",
                            format!("default: `{other}` is not public or private"),
                        ));
                    }
                };
            }
        }

        Ok(Policy {
            version,
            label: f.label.unwrap_or_default(),
            digest: keccak256(text.as_bytes()),
            origin: path.display().to_string(),
            accounts,
            assets,
            kyt,
            kyt_source,
            travel,
            approval_ttl,
            velocity,
            desk_velocity,
            fresh_windows,
            venue: ctx.kill.venue_slot(ctx.venue).unwrap_or(0),
            routing,
        })
    }
}

/// The outcome of one decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Go on to signing.
    Allow,
    /// Refused.
    Deny(Reason, &'static str),
    /// Needs a four-eyes approval; why.
    Approval(&'static str),
    /// A deposit that passed every other check; its signatures and roots go to the
    /// deposit verifier, which puts it back into intake marked verified.
    Verify,
}

/// A decision with the inputs that made it (for the audit trail).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// What was decided.
    pub outcome: Outcome,
    /// Version of the policy that decided.
    pub policy_version: u32,
    /// Asset slot (0 = native).
    pub asset: u8,
    /// Who receives the value (the token recipient for an ERC-20 transfer).
    pub beneficiary: Address,
    /// Amount in the asset's base units.
    pub amount: u128,
    /// What KYT said, if it was consulted.
    pub kyt: Option<KytLookup>,
    /// The velocity window that decided or came closest: (rule, used value, used count).
    pub velocity: Option<(u16, u128, u64)>,
    /// Fee cap the policy imposes when the desk gave none (0 = none).
    pub max_fee: u128,
    /// The route the intent takes: the desk's `public` or `private`, or what `auto`
    /// resolved to. Only a refusal before the route is resolved (unknown account) leaves
    /// the requested route here.
    pub route: Route,
    /// A staking intent's transaction (contract, value, gas), chosen by the engine.
    pub stake: Option<StakeTx>,
}

/// The policy stage's decision state.
#[derive(Debug)]
pub struct Risk {
    policy: Box<Policy>,
    windows: Vec<Window>,
    kyt: Box<KytSnapshot>,
    kill: Arc<KillSwitch>,
    private_relay: bool,
    staking: Option<StakingNet>,
    validators: Validators,
    addresses: Vec<Address>,
}

impl Risk {
    /// State for a first policy, for an engine without a private relay (see
    /// [`Risk::set_private_relay`]).
    pub fn new(mut policy: Box<Policy>, kill: Arc<KillSwitch>) -> Self {
        let windows = std::mem::take(&mut policy.fresh_windows);
        Self {
            policy,
            windows,
            kyt: Box::default(),
            kill,
            private_relay: false,
            staking: None,
            validators: Validators::default(),
            addresses: Vec::new(),
        }
    }

    /// Turns staking on: the network's contracts and fork, and each account's address
    /// (index = account), which exits and consolidations must be sent from.
    pub fn set_staking(&mut self, net: StakingNet, addresses: Vec<Address>) {
        self.staking = Some(net);
        self.addresses = addresses;
    }

    /// The network's staking settings, if staking is on.
    pub fn staking(&self) -> Option<&StakingNet> {
        self.staking.as_ref()
    }

    /// Puts the chain's newest validator set in force; returns the old one.
    pub fn swap_validators(&mut self, new: Box<ValidatorSet>) -> Box<ValidatorSet> {
        self.validators.swap_chain(new)
    }

    /// Remembers the deposits of an allowed intent (`data`: its packed entries).
    pub fn record_deposits(&mut self, data: &[u8]) {
        self.validators.record_sent(data);
    }

    /// Whether the engine's broadcast has a private relay, set once when the engine is
    /// assembled; it outlives policy reloads. Without one, `route: private` is refused with
    /// `route_unavailable` and `route: auto` always resolves to public.
    pub fn set_private_relay(&mut self, on: bool) {
        self.private_relay = on;
    }

    /// Whether a private relay is configured.
    pub fn private_relay(&self) -> bool {
        self.private_relay
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Puts a new policy in force between two decisions. Velocity windows with the same
    /// scope, asset and length carry their history over. Returns the old policy, to be
    /// dropped off the hot path.
    pub fn swap_policy(&mut self, mut new: Box<Policy>) -> Box<Policy> {
        let mut windows = std::mem::take(&mut new.fresh_windows);
        for (i, r) in new.velocity.iter().enumerate() {
            if let Some(j) = self.policy.velocity.iter().position(|o| {
                o.scope == r.scope && o.asset == r.asset && o.window_secs == r.window_secs
            }) {
                windows[i].clone_from(&self.windows[j]);
            }
        }
        let mut old = std::mem::replace(&mut self.policy, new);
        old.fresh_windows = std::mem::replace(&mut self.windows, windows);
        old
    }

    /// Puts a new KYT snapshot in force; returns the old one.
    pub fn swap_kyt(&mut self, new: Box<KytSnapshot>) -> Box<KytSnapshot> {
        std::mem::replace(&mut self.kyt, new)
    }

    /// Decides one intent at `now_ns` (unix). `data` is its calldata. On `Allow`, the
    /// velocity windows are charged.
    pub fn decide(&mut self, msg: &IntentMsg, data: &[u8], now_ns: u64) -> Verdict {
        let p = &*self.policy;
        let mut v = Verdict {
            outcome: Outcome::Allow,
            policy_version: p.version,
            asset: 0,
            beneficiary: msg.to,
            amount: u128::try_from(msg.value).unwrap_or(u128::MAX),
            kyt: None,
            velocity: None,
            max_fee: 0,
            route: msg.route,
            stake: None,
        };
        macro_rules! deny {
            ($r:expr, $m:expr) => {{
                v.outcome = Outcome::Deny($r, $m);
                return v;
            }};
        }
        let Some(Some(acct)) = p.accounts.get(msg.account.0 as usize) else {
            deny!(
                Reason::UnknownAccount,
                "account is not configured or has no policy"
            )
        };
        // Route: the desk's choice, or `auto` resolved by the routing rules; private only
        // when a relay can take it.
        v.route = match msg.route {
            Route::Auto if self.private_relay && p.routing.wants_private(msg) => Route::Private,
            Route::Auto => Route::Public,
            r => r,
        };
        // What moves: the native value, or an ERC-20 transfer of a configured asset.
        let selector: Option<[u8; 4]> = data.get(..4).map(|s| [s[0], s[1], s[2], s[3]]);
        if msg.kind == IntentKind::Call
            && let Some(a) = p.assets.get(&msg.to)
        {
            v.asset = a.slot;
            if selector == Some(ERC20_TRANSFER) && data.len() >= 68 {
                v.beneficiary = Address::from_slice(&data[16..36]);
                let amt = U256::from_be_slice(&data[36..68]);
                v.amount = u128::try_from(amt).unwrap_or(u128::MAX);
                if !msg.value.is_zero() {
                    deny!(
                        Reason::CallNotAllowed,
                        "a token transfer must not carry native value"
                    )
                }
            }
        }
        let venue = (v.route == Route::Public).then_some(p.venue);
        if let Some(k) = self.kill.check(msg.account.0, v.asset, venue) {
            deny!(Reason::KillSwitch, k.message())
        }
        let staking = msg.kind.is_staking();
        if staking {
            let Some(net) = &self.staking else {
                deny!(
                    Reason::UnsupportedKind,
                    "staking is not configured on this engine (no [staking] section)"
                )
            };
            let from = self
                .addresses
                .get(msg.account.0 as usize)
                .copied()
                .unwrap_or_default();
            match staking::check(net, &self.validators, Some(&acct.staking), from, msg, data) {
                Ok(t) => {
                    v.beneficiary = t.to;
                    v.amount = u128::try_from(t.value).unwrap_or(u128::MAX);
                    v.stake = Some(t);
                }
                Err((r, m)) => deny!(r, m),
            }
        }
        if v.route == Route::Private && !self.private_relay {
            deny!(
                Reason::RouteUnavailable,
                "no private relay is configured; use route public or auto"
            )
        }
        if msg.kind == IntentKind::Call {
            let Some(sel) = selector else {
                deny!(
                    Reason::CallNotAllowed,
                    "a call needs at least a 4-byte selector"
                )
            };
            if !(acct.any_call_to_allowed || acct.calls.contains(&(msg.to, sel))) {
                deny!(
                    Reason::CallNotAllowed,
                    "this contract and selector are not allowed for the account"
                )
            }
        }
        if !staking && !acct.allow.contains(&v.beneficiary) {
            deny!(
                Reason::NotAllowlisted,
                "destination is not on the account's allowlist"
            )
        }
        match acct.caps.iter().find(|(s, _)| *s == v.asset) {
            Some((_, cap)) if v.amount > *cap => {
                deny!(
                    Reason::ValueCap,
                    "value exceeds the account's per-intent cap"
                )
            }
            Some(_) => {}
            None if v.amount > 0 => {
                deny!(
                    Reason::ValueCap,
                    "the account has no cap for this asset, so it may not move it"
                )
            }
            None => {}
        }
        if let Some(g) = acct.max_gas
            && v.stake.map_or(msg.gas_limit, |t| t.gas) > g
        {
            deny!(Reason::GasCap, "gas_limit exceeds the account's maximum")
        }
        if let Some(f) = acct.max_fee {
            if msg.max_fee_cap > f {
                deny!(
                    Reason::FeeCap,
                    "max_fee_per_gas_wei exceeds the account's maximum fee"
                )
            }
            v.max_fee = f;
        }
        if let Some(h) = &acct.hours
            && !h.is_open(now_ns)
        {
            deny!(
                Reason::OutsideBusinessHours,
                "outside the account's business hours"
            )
        }
        let mut approval: Option<&'static str> = None;
        if acct.kyt
            && !staking
            && let Some(k) = &p.kyt
        {
            let seen = self.kyt.lookup(&v.beneficiary, now_ns, k.ttl_ns);
            v.kyt = Some(seen);
            match seen {
                KytLookup::Sanctioned => {
                    deny!(Reason::KytRisk, "destination is on a sanctions list")
                }
                KytLookup::Fresh { score, .. } if score >= k.deny_score => {
                    deny!(
                        Reason::KytRisk,
                        "destination's risk score is at or above the deny level"
                    )
                }
                KytLookup::Fresh { score, .. } => {
                    if k.approval_score.is_some_and(|a| score >= a) {
                        approval = Some("destination's risk score needs an approval");
                    }
                }
                KytLookup::Expired { .. } => match k.on_expired {
                    Action::Deny => deny!(Reason::KytRisk, "destination's risk score has expired"),
                    Action::Approval => approval = Some("destination's risk score has expired"),
                },
                KytLookup::Missing => match k.on_missing {
                    Action::Deny => deny!(Reason::KytRisk, "destination has no risk score"),
                    Action::Approval => approval = Some("destination has no risk score"),
                },
            }
        }
        if let Some(t) = p.travel.as_ref().filter(|_| !staking) {
            let threshold = if v.asset == 0 {
                Some(t.threshold)
            } else {
                t.asset_thresholds
                    .iter()
                    .find(|(s, _)| *s == v.asset)
                    .map(|x| x.1)
            };
            if let Some(th) = threshold
                && v.amount >= th
                && !t.internal.contains(&v.beneficiary)
            {
                if !msg.travel.present {
                    deny!(
                        Reason::TravelRuleMissing,
                        "travel-rule data (originator, beneficiary) is required above the threshold"
                    )
                }
                if msg.travel.vasp_key != 0 && !t.known_vasps.contains(&msg.travel.vasp_key) {
                    match t.on_unknown_vasp {
                        Action::Deny => deny!(
                            Reason::UnknownVasp,
                            "the beneficiary VASP is not a known counterparty"
                        ),
                        Action::Approval => {
                            approval = approval
                                .or(Some("the beneficiary VASP is not a known counterparty"))
                        }
                    }
                }
            }
        }
        // A deposit's signatures and roots are checked off this thread; it comes back
        // marked verified and is decided again.
        if msg.kind == IntentKind::StakeDeposit && !msg.deposit_verified {
            v.outcome = Outcome::Verify;
            return v;
        }
        // Velocity: the account's windows and the desk's windows for this asset.
        let desk = p.desk_velocity.get(&msg.origin.principal);
        let rules = acct.velocity.iter().chain(desk.into_iter().flatten());
        for &ri in rules.clone() {
            let r = &p.velocity[ri as usize];
            if r.asset != v.asset {
                continue;
            }
            let w = &mut self.windows[ri as usize];
            match w.check(now_ns, v.amount, r.max_value, r.max_count) {
                Ok(()) => {}
                Err(e) => {
                    v.velocity = Some(match e {
                        Exceeded::Value { used, .. } => (ri, used, 0),
                        Exceeded::Count { used, .. } => (ri, 0, used),
                    });
                    deny!(
                        Reason::VelocityLimit,
                        "a rolling velocity limit would be exceeded"
                    )
                }
            }
        }
        if msg.approved_by == 0 {
            if let Some(above) = acct.approval_above
                && v.amount > above
                && v.asset == 0
            {
                approval = approval.or(Some("value above the account's four-eyes threshold"));
            }
            if let Some(why) = approval {
                v.outcome = Outcome::Approval(why);
                return v;
            }
        }
        for &ri in rules {
            let r = &p.velocity[ri as usize];
            if r.asset == v.asset {
                self.windows[ri as usize].commit(now_ns, v.amount);
            }
        }
        v
    }
}
