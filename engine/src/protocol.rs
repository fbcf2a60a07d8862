//! Desk protocol v1: decoding desk frames and encoding replies.
//!
//! Decoding happens on the connection's task, before anything enters a ring. Each field is
//! decoded on its own so that a bad frame gets a `bad_request` naming the field.

use std::collections::BTreeMap;

use alloy_primitives::{Address, U256};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::blob::MAX_CALLDATA;
use crate::msg::{IntentId, IntentKind, MAX_INTENT_ID, Route, TravelInfo};
use crate::risk::travel::TravelRuleData;
use crate::staking;

/// Error codes of the protocol's `error` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is malformed; `field` names what is wrong.
    BadRequest,
    /// Authentication failed.
    Unauthorized,
    /// The principal lacks the role for the op.
    Forbidden,
    /// The engine has no room for the request right now; retry later.
    Overloaded,
    /// No such intent.
    NotFound,
    /// The op exists in the protocol but this engine does not offer it yet.
    NotSupported,
    /// The intent is in a state where the op cannot apply (e.g. `cancel` after inclusion).
    Conflict,
    /// The engine could not make the intent durable (its journal write failed): nothing
    /// was done and the id is still free; retry.
    Unavailable,
    /// The connection or its principal sent faster than its limit: the frame was not
    /// processed; send it again after the time the message names.
    RateLimited,
}

impl ErrorCode {
    /// Protocol name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotSupported => "not_supported",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

/// A request that could not be accepted, with everything the `error` reply needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestError {
    /// Error code.
    pub code: ErrorCode,
    /// The offending field, dotted (`intent.value_wei`), when one is to blame.
    pub field: Option<&'static str>,
    /// Human-readable explanation.
    pub message: String,
    /// The request's `req`, echoed.
    pub req: Option<String>,
    /// The intent id, when the request concerned one and it could be read.
    pub id: Option<String>,
}

impl RequestError {
    fn bad(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::BadRequest,
            field: Some(field),
            message: format!("{field}: {}", message.into()),
            req: None,
            id: None,
        }
    }

    /// An error of the given code without a field.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            field: None,
            message: message.into(),
            req: None,
            id: None,
        }
    }

    /// Attaches the request's `req` and intent id.
    pub fn with_context(mut self, req: Option<&str>, id: Option<&str>) -> Self {
        self.req = req.map(str::to_owned);
        if self.id.is_none() {
            self.id = id.map(str::to_owned);
        }
        self
    }

    /// The `error` reply as JSON text.
    pub fn to_json(&self) -> String {
        let mut v = json!({ "op": "error", "code": self.code.as_str(), "message": self.message });
        if let Some(f) = self.field {
            v["field"] = json!(f);
        }
        if let Some(id) = &self.id {
            v["id"] = json!(id);
        }
        if let Some(r) = &self.req {
            v["req"] = json!(r);
        }
        v.to_string()
    }
}

/// An intent as decoded from a `submit` frame, before account lookup and blob placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedIntent {
    /// Desk idempotency key.
    pub id: IntentId,
    /// Account name as the desk wrote it.
    pub account: String,
    /// Kind.
    pub kind: IntentKind,
    /// Destination.
    pub to: Address,
    /// Value in wei.
    pub value: U256,
    /// Calldata.
    pub data: Vec<u8>,
    /// Gas limit.
    pub gas_limit: u64,
    /// Desk's fee cap (0 = none).
    pub max_fee_cap: u128,
    /// Route.
    pub route: Route,
    /// Send to every provider at once (`"urgent": true`).
    pub urgent: bool,
    /// A private send no relay takes goes public instead of failing
    /// (`"public_fallback": true`).
    pub public_fallback: bool,
    /// Travel-rule data summary (`present == false` when none was attached).
    pub travel: TravelInfo,
}

impl DecodedIntent {
    /// The intake message for this intent (account resolved through `accounts`, the
    /// index every ring message uses; unknown names get [`crate::msg::AccountIdx::UNKNOWN`]
    /// for policy to refuse). Sequence, origin, calldata slot and hops are left for the
    /// caller.
    pub fn to_msg(
        &self,
        accounts: &std::collections::HashMap<String, u16>,
    ) -> crate::msg::IntentMsg {
        use crate::msg::AccountIdx;
        crate::msg::IntentMsg {
            id: self.id,
            account: accounts
                .get(&self.account)
                .map_or(AccountIdx::UNKNOWN, |&i| AccountIdx(i)),
            kind: self.kind,
            route: self.route,
            urgent: self.urgent,
            public_fallback: self.public_fallback,
            to: self.to,
            value: self.value,
            gas_limit: self.gas_limit,
            max_fee_cap: self.max_fee_cap,
            travel: self.travel,
            ..crate::msg::IntentMsg::default()
        }
    }
}

/// The `scope` of a `kill` / `unkill`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopeSpec {
    /// `"all"`.
    All,
    /// `{"account": NAME}`.
    Account(String),
    /// `{"asset": SYMBOL}`.
    Asset(String),
    /// `{"venue": NAME}`.
    Venue(String),
}

/// A decoded desk request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `submit`.
    Submit {
        /// Echo token.
        req: Option<String>,
        /// The intent.
        intent: Box<DecodedIntent>,
    },
    /// `cancel`.
    Cancel {
        /// Echo token.
        req: Option<String>,
        /// Intent to cancel.
        id: IntentId,
    },
    /// `status`.
    Status {
        /// Echo token.
        req: Option<String>,
        /// Intent id asked about.
        id: IntentId,
    },
    /// `ping`.
    Ping {
        /// Echo token.
        req: Option<String>,
    },
    /// `approve`: four-eyes approval of a waiting intent.
    Approve {
        /// Echo token.
        req: Option<String>,
        /// The intent's id.
        id: IntentId,
        /// The submitting principal, when several have a waiting intent with this id.
        submitter: Option<String>,
    },
    /// `reject`: refuse a waiting intent.
    Reject {
        /// Echo token.
        req: Option<String>,
        /// The intent's id.
        id: IntentId,
        /// Why (free text, recorded and shown to the desk).
        reason: String,
        /// The submitting principal, when several have a waiting intent with this id.
        submitter: Option<String>,
    },
    /// `kill` (`on`) or `unkill`.
    Kill {
        /// Echo token.
        req: Option<String>,
        /// What to freeze or thaw.
        scope: ScopeSpec,
        /// `true` for kill.
        on: bool,
    },
    /// `reload_policy`: re-read the policy file (role `admin`).
    ReloadPolicy {
        /// Echo token.
        req: Option<String>,
    },
    /// `pending`: the intents waiting for approval (roles `approver`, `admin`, `auditor`).
    Pending {
        /// Echo token.
        req: Option<String>,
    },
    /// A protocol op this engine does not offer yet (`cancel`).
    NotSupported {
        /// Echo token.
        req: Option<String>,
        /// The op.
        op: &'static str,
    },
}

/// Gas limit applied to a transfer that does not name one.
pub const TRANSFER_GAS: u64 = 21_000;
/// Highest gas limit an intent may ask for.
pub const MAX_GAS_LIMIT: u64 = 30_000_000;

type Fields<'a> = BTreeMap<&'a str, &'a RawValue>;

/// The `req` and the intent id of a frame (`intent.id` of a submit, `id` of the other
/// ops), as far as they can be read, without decoding the rest: for an error about a
/// frame that is not processed (over a rate limit).
pub fn peek_context(frame: &str) -> (Option<String>, Option<String>) {
    let Ok(fields) = serde_json::from_str::<Fields<'_>>(frame) else {
        return (None, None);
    };
    let string =
        |raw: Option<&&RawValue>| raw.and_then(|r| serde_json::from_str::<String>(r.get()).ok());
    let req = string(fields.get("req"));
    let id = string(fields.get("id")).or_else(|| {
        let intent: Fields<'_> = serde_json::from_str(fields.get("intent")?.get()).ok()?;
        string(intent.get("id"))
    });
    (req, id)
}

/// Decodes one text frame.
pub fn decode(frame: &str) -> Result<Request, RequestError> {
    let fields: Fields<'_> = serde_json::from_str(frame).map_err(|e| {
        RequestError::bad("frame", format!("not a JSON object with plain keys ({e})"))
    })?;
    let req = match fields.get("req") {
        None => None,
        Some(raw) => Some(
            serde_json::from_str::<String>(raw.get())
                .map_err(|_| RequestError::bad("req", "must be a string"))?,
        ),
    };
    decode_op(&fields, req.as_deref()).map_err(|e| e.with_context(req.as_deref(), None))
}

fn decode_op(fields: &Fields<'_>, req: Option<&str>) -> Result<Request, RequestError> {
    let op: String = required(fields, "op", "op")?;
    let req_owned = req.map(str::to_owned);
    match op.as_str() {
        "submit" => {
            let raw = fields
                .get("intent")
                .ok_or_else(|| RequestError::bad("intent", "required for op submit"))?;
            let intent: Fields<'_> = serde_json::from_str(raw.get())
                .map_err(|_| RequestError::bad("intent", "must be a JSON object"))?;
            let id_text = intent
                .get("id")
                .and_then(|r| serde_json::from_str::<String>(r.get()).ok());
            let decoded =
                decode_intent(&intent).map_err(|e| e.with_context(req, id_text.as_deref()))?;
            Ok(Request::Submit {
                req: req_owned,
                intent: Box::new(decoded),
            })
        }
        "status" => {
            let id: String = required(fields, "id", "id")?;
            let id = intent_id(&id, "id")?;
            Ok(Request::Status { req: req_owned, id })
        }
        "ping" => Ok(Request::Ping { req: req_owned }),
        "approve" | "reject" => {
            let id: String = required(fields, "id", "id")?;
            let id = intent_id(&id, "id")?;
            let submitter: Option<String> = optional(fields, "submitter", "submitter")?;
            if op == "approve" {
                Ok(Request::Approve {
                    req: req_owned,
                    id,
                    submitter,
                })
            } else {
                let reason: String = required(fields, "reason", "reason")?;
                if reason.len() > 256 {
                    return Err(RequestError::bad("reason", "at most 256 bytes"));
                }
                Ok(Request::Reject {
                    req: req_owned,
                    id,
                    reason,
                    submitter,
                })
            }
        }
        "kill" | "unkill" => Ok(Request::Kill {
            req: req_owned,
            scope: decode_scope(fields)?,
            on: op == "kill",
        }),
        "reload_policy" => Ok(Request::ReloadPolicy { req: req_owned }),
        "pending" => Ok(Request::Pending { req: req_owned }),
        "cancel" => {
            let id: String = required(fields, "id", "id")?;
            let id = intent_id(&id, "id")?;
            Ok(Request::Cancel { req: req_owned, id })
        }
        other => Err(RequestError::bad(
            "op",
            format!(
                "unknown op `{}`; expected one of submit, status, ping, approve, reject, cancel, kill, unkill, reload_policy, pending",
                truncate(other, 32)
            ),
        )),
    }
}

fn decode_scope(fields: &Fields<'_>) -> Result<ScopeSpec, RequestError> {
    let raw = fields
        .get("scope")
        .ok_or_else(|| RequestError::bad("scope", "required"))?;
    if let Ok(s) = serde_json::from_str::<String>(raw.get()) {
        return match s.as_str() {
            "all" => Ok(ScopeSpec::All),
            _ => Err(RequestError::bad(
                "scope",
                "a string scope must be \"all\"; else {\"account\": …}, {\"asset\": …} or {\"venue\": …}",
            )),
        };
    }
    let obj: BTreeMap<String, String> = serde_json::from_str(raw.get()).map_err(|_| {
        RequestError::bad(
            "scope",
            "must be \"all\" or an object with one of account, asset, venue",
        )
    })?;
    let mut it = obj.into_iter();
    let (Some((k, v)), None) = (it.next(), it.next()) else {
        return Err(RequestError::bad(
            "scope",
            "name exactly one of account, asset, venue",
        ));
    };
    if v.is_empty() || v.len() > 64 {
        return Err(RequestError::bad(
            "scope",
            "the name must be 1 to 64 characters",
        ));
    }
    match k.as_str() {
        "account" => Ok(ScopeSpec::Account(v)),
        "asset" => Ok(ScopeSpec::Asset(v)),
        "venue" => Ok(ScopeSpec::Venue(v)),
        _ => Err(RequestError::bad(
            "scope",
            "name exactly one of account, asset, venue",
        )),
    }
}

fn decode_travel(raw: &RawValue) -> Result<TravelInfo, RequestError> {
    let data: TravelRuleData = serde_json::from_str(raw.get()).map_err(|e| {
        RequestError::bad(
            "intent.travel_rule",
            format!("not valid travel-rule data: {e}"),
        )
    })?;
    data.validate()
        .map_err(|(field, message)| RequestError::bad(field, message))?;
    Ok(data.summary())
}

fn decode_intent(f: &Fields<'_>) -> Result<DecodedIntent, RequestError> {
    let id: String = required(f, "id", "intent.id")?;
    let id = intent_id(&id, "intent.id")?;
    let account: String = required(f, "account", "intent.account")?;
    if account.is_empty() || account.len() > 64 {
        return Err(RequestError::bad(
            "intent.account",
            "must be 1 to 64 characters",
        ));
    }
    let kind_s: String = required(f, "kind", "intent.kind")?;
    let kind = match kind_s.as_str() {
        "transfer" => IntentKind::Transfer,
        "call" => IntentKind::Call,
        "stake_deposit" => IntentKind::StakeDeposit,
        "stake_exit" => IntentKind::StakeExit,
        "stake_consolidate" => IntentKind::StakeConsolidate,
        other => {
            return Err(RequestError::bad(
                "intent.kind",
                format!(
                    "unknown kind `{}`; expected transfer, call, stake_deposit, stake_exit or stake_consolidate",
                    truncate(other, 32)
                ),
            ));
        }
    };
    let route = match optional::<String>(f, "route", "intent.route")?.as_deref() {
        None | Some("auto") => Route::Auto,
        Some("public") => Route::Public,
        Some("private") => Route::Private,
        Some(other) => {
            return Err(RequestError::bad(
                "intent.route",
                format!(
                    "unknown route `{}`; expected auto, public or private",
                    truncate(other, 32)
                ),
            ));
        }
    };
    let travel = match f.get("travel_rule") {
        Some(raw) if !raw.get().trim_start().starts_with('{') => {
            return Err(RequestError::bad("intent.travel_rule", "must be an object"));
        }
        Some(raw) => decode_travel(raw)?,
        None => TravelInfo::default(),
    };
    let (to, value, data, gas_limit) = if kind.is_staking() {
        let (data, gas_limit) = decode_staking(f, kind)?;
        (Address::ZERO, U256::ZERO, data, gas_limit)
    } else {
        decode_payment(f, kind)?
    };
    Ok(DecodedIntent {
        id,
        account,
        kind,
        to,
        value,
        data,
        gas_limit,
        max_fee_cap: fee_cap(f)?,
        route,
        urgent: optional::<bool>(f, "urgent", "intent.urgent")?.unwrap_or(false),
        public_fallback: optional::<bool>(f, "public_fallback", "intent.public_fallback")?
            .unwrap_or(false),
        travel,
    })
}

/// `to`, `value_wei`, `data` and `gas_limit` of a transfer or a call.
fn decode_payment(
    f: &Fields<'_>,
    kind: IntentKind,
) -> Result<(Address, U256, Vec<u8>, u64), RequestError> {
    let needs_to = matches!(kind, IntentKind::Transfer | IntentKind::Call);
    let to = match optional::<String>(f, "to", "intent.to")? {
        Some(s) => parse_address(&s, "intent.to")?,
        None if needs_to => {
            return Err(RequestError::bad(
                "intent.to",
                format!("required for kind {}", kind.as_str()),
            ));
        }
        None => Address::ZERO,
    };
    let value = match optional_decimal(f, "value_wei", "intent.value_wei")? {
        Some(v) => v,
        None if kind == IntentKind::Transfer => {
            return Err(RequestError::bad(
                "intent.value_wei",
                "required for kind transfer",
            ));
        }
        None => U256::ZERO,
    };
    let data = match optional::<String>(f, "data", "intent.data")? {
        Some(s) => parse_hex_bytes(&s, "intent.data")?,
        None => Vec::new(),
    };
    if kind == IntentKind::Call && data.is_empty() {
        return Err(RequestError::bad(
            "intent.data",
            "required (non-empty) for kind call",
        ));
    }
    if kind == IntentKind::Transfer && !data.is_empty() {
        return Err(RequestError::bad(
            "intent.data",
            "not allowed for kind transfer; use kind call",
        ));
    }
    if data.len() > MAX_CALLDATA {
        return Err(RequestError::bad(
            "intent.data",
            format!(
                "{} bytes is longer than the {MAX_CALLDATA}-byte limit",
                data.len()
            ),
        ));
    }
    let gas_limit = match f.get("gas_limit") {
        Some(raw) => serde_json::from_str::<u64>(raw.get())
            .map_err(|_| RequestError::bad("intent.gas_limit", "must be a non-negative integer"))?,
        None if kind == IntentKind::Transfer => TRANSFER_GAS,
        None if kind == IntentKind::Call => {
            return Err(RequestError::bad(
                "intent.gas_limit",
                "required for kind call (the engine does not estimate gas on the hot path)",
            ));
        }
        None => 0,
    };
    if needs_to && !(TRANSFER_GAS..=MAX_GAS_LIMIT).contains(&gas_limit) {
        return Err(RequestError::bad(
            "intent.gas_limit",
            format!("must be between {TRANSFER_GAS} and {MAX_GAS_LIMIT}"),
        ));
    }
    Ok((to, value, data, gas_limit))
}

/// The staking kinds: the engine chooses the contract, the value and the calldata, so the
/// desk sends the validator data instead of `to`, `value_wei` and `data`. The calldata
/// blob carries that data for the policy stage: deposit entries packed
/// ([`staking::DEPOSIT_ENTRY_BYTES`] each), or the system contract's exact input for an
/// exit (pubkey ++ amount in gwei, big-endian) or a consolidation (source ++ target).
/// Returns the calldata blob and the desk's gas limit (0: the engine's default).
fn decode_staking(f: &Fields<'_>, kind: IntentKind) -> Result<(Vec<u8>, u64), RequestError> {
    for (key, field) in [
        ("to", "intent.to"),
        ("value_wei", "intent.value_wei"),
        ("data", "intent.data"),
    ] {
        if f.get(key).is_some() {
            return Err(RequestError::bad(
                field,
                format!(
                    "not allowed for kind {}; the engine sets the contract, value and calldata",
                    kind.as_str()
                ),
            ));
        }
    }
    let data = match kind {
        IntentKind::StakeDeposit => {
            let raw = f.get("deposits").ok_or_else(|| {
                RequestError::bad("intent.deposits", "required for kind stake_deposit")
            })?;
            let entries = staking::parse_entries(raw.get()).map_err(|e| {
                RequestError::bad("intent.deposits", format!("{}: {}", e.field, e.message))
            })?;
            let mut data = vec![0u8; entries.len() * staking::DEPOSIT_ENTRY_BYTES];
            for (e, chunk) in entries
                .iter()
                .zip(data.chunks_exact_mut(staking::DEPOSIT_ENTRY_BYTES))
            {
                let mut buf = [0u8; staking::DEPOSIT_ENTRY_BYTES];
                e.encode(&mut buf);
                chunk.copy_from_slice(&buf);
            }
            data
        }
        IntentKind::StakeExit => {
            let pubkey: String = required(f, "validator_pubkey", "intent.validator_pubkey")?;
            let pubkey = parse_fixed_hex::<48>(&pubkey, "intent.validator_pubkey")?;
            let amount = match optional_decimal(f, "amount_gwei", "intent.amount_gwei")? {
                Some(a) => u64::try_from(a).map_err(|_| {
                    RequestError::bad("intent.amount_gwei", "out of range (above 2^64-1 gwei)")
                })?,
                None => {
                    return Err(RequestError::bad(
                        "intent.amount_gwei",
                        "required for kind stake_exit (\"0\" is a full exit)",
                    ));
                }
            };
            let mut data = pubkey.to_vec();
            data.extend_from_slice(&amount.to_be_bytes());
            data
        }
        _ => {
            let source: String = required(f, "source_pubkey", "intent.source_pubkey")?;
            let target: String = required(f, "target_pubkey", "intent.target_pubkey")?;
            let mut data = parse_fixed_hex::<48>(&source, "intent.source_pubkey")?.to_vec();
            data.extend_from_slice(&parse_fixed_hex::<48>(&target, "intent.target_pubkey")?);
            data
        }
    };
    let gas_limit = match f.get("gas_limit") {
        Some(raw) => {
            let g = serde_json::from_str::<u64>(raw.get()).map_err(|_| {
                RequestError::bad("intent.gas_limit", "must be a non-negative integer")
            })?;
            if !(TRANSFER_GAS..=MAX_GAS_LIMIT).contains(&g) {
                return Err(RequestError::bad(
                    "intent.gas_limit",
                    format!("must be between {TRANSFER_GAS} and {MAX_GAS_LIMIT}"),
                ));
            }
            g
        }
        // The engine's default for the kind (`[staking]`).
        None => 0,
    };
    Ok((data, gas_limit))
}

/// The desk's `max_fee_per_gas_wei` (0: none).
fn fee_cap(f: &Fields<'_>) -> Result<u128, RequestError> {
    match optional_decimal(f, "max_fee_per_gas_wei", "intent.max_fee_per_gas_wei")? {
        None => Ok(0),
        Some(v) => u128::try_from(v).map_err(|_| {
            RequestError::bad("intent.max_fee_per_gas_wei", "out of range (above 2^128-1)")
        }),
    }
}

/// Exactly `N` bytes of hex, `0x` optional (the deposit CLI writes none).
fn parse_fixed_hex<const N: usize>(s: &str, field: &'static str) -> Result<[u8; N], RequestError> {
    let digits = s.strip_prefix("0x").unwrap_or(s);
    let mut out = [0u8; N];
    if digits.len() != 2 * N {
        return Err(RequestError::bad(
            field,
            format!("must be {N} bytes of hex ({} digits)", 2 * N),
        ));
    }
    hex::decode_to_slice(digits, &mut out)
        .map_err(|_| RequestError::bad(field, "must be hex digits"))?;
    Ok(out)
}

fn required<T: serde::de::DeserializeOwned>(
    f: &Fields<'_>,
    key: &str,
    field: &'static str,
) -> Result<T, RequestError> {
    optional(f, key, field)?.ok_or_else(|| RequestError::bad(field, "required"))
}

fn optional<T: serde::de::DeserializeOwned>(
    f: &Fields<'_>,
    key: &str,
    field: &'static str,
) -> Result<Option<T>, RequestError> {
    match f.get(key) {
        None => Ok(None),
        Some(raw) if raw.get() == "null" => Ok(None),
        Some(raw) => serde_json::from_str(raw.get())
            .map(Some)
            .map_err(|_| RequestError::bad(field, format!("must be {}", type_name::<T>()))),
    }
}

fn type_name<T>() -> &'static str {
    let n = std::any::type_name::<T>();
    if n.ends_with("String") {
        "a string"
    } else {
        "a number"
    }
}

fn optional_decimal(
    f: &Fields<'_>,
    key: &str,
    field: &'static str,
) -> Result<Option<U256>, RequestError> {
    let Some(raw) = f.get(key) else {
        return Ok(None);
    };
    let s: String = serde_json::from_str(raw.get()).map_err(|_| {
        RequestError::bad(
            field,
            "must be a decimal string (amounts are never JSON numbers)",
        )
    })?;
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RequestError::bad(
            field,
            "must be a non-negative decimal integer string",
        ));
    }
    U256::from_str_radix(&s, 10)
        .map(Some)
        .map_err(|_| RequestError::bad(field, "out of range (above 2^256-1)"))
}

fn intent_id(s: &str, field: &'static str) -> Result<IntentId, RequestError> {
    IntentId::new(s)
        .ok_or_else(|| RequestError::bad(field, format!("must be 1 to {MAX_INTENT_ID} bytes")))
}

fn parse_address(s: &str, field: &'static str) -> Result<Address, RequestError> {
    let digits = s
        .strip_prefix("0x")
        .ok_or_else(|| RequestError::bad(field, "must be a 0x-prefixed 20-byte hex address"))?;
    if digits.len() != 40 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RequestError::bad(
            field,
            "must be a 0x-prefixed 20-byte hex address",
        ));
    }
    let mixed = digits.bytes().any(|b| b.is_ascii_lowercase())
        && digits.bytes().any(|b| b.is_ascii_uppercase());
    if mixed {
        Address::parse_checksummed(s, None)
            .map_err(|_| RequestError::bad(field, "mixed-case address with a bad EIP-55 checksum"))
    } else {
        s.parse()
            .map_err(|_| RequestError::bad(field, "must be a 0x-prefixed 20-byte hex address"))
    }
}

fn parse_hex_bytes(s: &str, field: &'static str) -> Result<Vec<u8>, RequestError> {
    let digits = s
        .strip_prefix("0x")
        .ok_or_else(|| RequestError::bad(field, "must be 0x-prefixed hex"))?;
    hex::decode(digits).map_err(|_| {
        RequestError::bad(
            field,
            "must be 0x-prefixed hex with an even number of digits",
        )
    })
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `pong` reply.
pub fn pong(req: Option<&str>) -> String {
    with_req(json!({ "op": "pong" }), req)
}

/// `ack` reply.
pub fn ack(id: &str, seq: u64, req: Option<&str>) -> String {
    with_req(json!({ "op": "ack", "id": id, "seq": seq }), req)
}

/// Adds `req` to a reply object, if any, and renders it.
pub fn with_req(mut v: Value, req: Option<&str>) -> String {
    if let Some(r) = req {
        v["req"] = json!(r);
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(frame: &str) -> RequestError {
        decode(frame).expect_err(frame)
    }

    const TO: &str = "0x9965507d1a55bcc2695c58ba16fb37d819b0a4dc";

    #[test]
    fn staking_kinds_carry_the_system_contract_input() {
        let pk = "ab".repeat(48);
        let f = format!(
            r#"{{"op":"submit","intent":{{"id":"x","account":"a","kind":"stake_exit","validator_pubkey":"0x{pk}","amount_gwei":"5"}}}}"#
        );
        let Request::Submit { intent, .. } = decode(&f).unwrap() else {
            panic!()
        };
        assert_eq!(intent.kind, IntentKind::StakeExit);
        assert_eq!(intent.data.len(), 56);
        assert_eq!(intent.data[48..], 5u64.to_be_bytes());
        assert_eq!(intent.gas_limit, 0, "the engine's default");
        let f = format!(
            r#"{{"op":"submit","intent":{{"id":"c","account":"a","kind":"stake_consolidate","source_pubkey":"{pk}","target_pubkey":"0x{}"}}}}"#,
            "cd".repeat(48)
        );
        let Request::Submit { intent, .. } = decode(&f).unwrap() else {
            panic!()
        };
        assert_eq!(intent.data.len(), 96);
        assert_eq!(intent.data[95], 0xcd);
        for (frame, field) in [
            (
                r#"{"op":"submit","intent":{"id":"x","account":"a","kind":"stake_exit","validator_pubkey":"0xab","amount_gwei":"0"}}"#.to_owned(),
                "intent.validator_pubkey",
            ),
            (
                format!(r#"{{"op":"submit","intent":{{"id":"x","account":"a","kind":"stake_exit","validator_pubkey":"{pk}"}}}}"#),
                "intent.amount_gwei",
            ),
            (
                format!(r#"{{"op":"submit","intent":{{"id":"x","account":"a","kind":"stake_exit","validator_pubkey":"{pk}","amount_gwei":"0","to":"{TO}"}}}}"#),
                "intent.to",
            ),
            (
                r#"{"op":"submit","intent":{"id":"x","account":"a","kind":"stake_deposit"}}"#.to_owned(),
                "intent.deposits",
            ),
            (
                r#"{"op":"submit","intent":{"id":"x","account":"a","kind":"stake_deposit","deposits":[]}}"#.to_owned(),
                "intent.deposits",
            ),
            (
                format!(r#"{{"op":"submit","intent":{{"id":"x","account":"a","kind":"stake_consolidate","source_pubkey":"{pk}"}}}}"#),
                "intent.target_pubkey",
            ),
        ] {
            assert_eq!(err(&frame).field, Some(field), "{frame}");
        }
    }

    #[test]
    fn decodes_a_transfer_with_defaults() {
        let f = format!(
            r#"{{"op":"submit","req":"r1","intent":{{"id":"d-1","account":"dev0","kind":"transfer","to":"{TO}","value_wei":"1500000000000000000"}}}}"#
        );
        let Request::Submit { req, intent } = decode(&f).unwrap() else {
            panic!()
        };
        assert_eq!(req.as_deref(), Some("r1"));
        assert_eq!(intent.id.as_str(), "d-1");
        assert_eq!(intent.gas_limit, TRANSFER_GAS);
        assert_eq!(intent.route, Route::Auto);
        assert_eq!(intent.value, U256::from(1_500_000_000_000_000_000u128));
    }

    #[test]
    fn every_bad_field_is_named() {
        let base = |extra: &str| {
            format!(
                r#"{{"op":"submit","req":"q","intent":{{"id":"x","account":"dev0","kind":"transfer","to":"{TO}","value_wei":"1"{extra}}}}}"#
            )
        };
        let cases: &[(&str, &str)] = &[
            ("not json", "frame"),
            ("[1,2]", "frame"),
            (r#"{"req":"a"}"#, "op"),
            (r#"{"op":5}"#, "op"),
            (r#"{"op":"fly"}"#, "op"),
            (r#"{"op":"submit","req":7}"#, "req"),
            (r#"{"op":"submit"}"#, "intent"),
            (r#"{"op":"submit","intent":"x"}"#, "intent"),
            (r#"{"op":"status"}"#, "id"),
            (
                r#"{"op":"submit","intent":{"account":"dev0","kind":"transfer"}}"#,
                "intent.id",
            ),
        ];
        for (frame, field) in cases {
            assert_eq!(err(frame).field, Some(*field), "{frame}");
        }
        let long_id = "x".repeat(65);
        let more: Vec<(String, &str)> = vec![
            (base(r#","value_wei":1"#), "intent.value_wei"),
            (base(r#","value_wei":"-1""#), "intent.value_wei"),
            (base(r#","value_wei":"1e18""#), "intent.value_wei"),
            (
                base(&format!(r#","value_wei":"1{}""#, "0".repeat(80))),
                "intent.value_wei",
            ),
            (base(r#","to":"0x1234""#), "intent.to"),
            (
                base(r#","to":"0x9965507d1A55bcC2695C58ba16FB37d819B0A4dc""#),
                "intent.to",
            ),
            (base(r#","kind":"swap""#), "intent.kind"),
            (base(r#","route":"dark""#), "intent.route"),
            (base(r#","gas_limit":"21000""#), "intent.gas_limit"),
            (base(r#","gas_limit":100"#), "intent.gas_limit"),
            (base(r#","data":"0xabc""#), "intent.data"),
            (base(r#","data":"0xab""#), "intent.data"),
            (base(r#","max_fee_per_gas_wei":"1"#), "frame"),
            (
                base(r#","max_fee_per_gas_wei":"340282366920938463463374607431768211456""#),
                "intent.max_fee_per_gas_wei",
            ),
            (base(r#","travel_rule":[1]"#), "intent.travel_rule"),
            (base(&format!(r#","id":"{long_id}""#)), "intent.id"),
            (base(r#","account":"""#), "intent.account"),
        ];
        for (frame, field) in &more {
            let e = err(frame);
            assert_eq!(e.field, Some(*field), "{frame} -> {e:?}");
            assert_eq!(e.code, ErrorCode::BadRequest);
        }
        // The id and req of a bad submit are echoed so the desk can correlate.
        let e = err(&base(r#","value_wei":"x""#));
        assert_eq!(e.id.as_deref(), Some("x"));
        assert_eq!(e.req.as_deref(), Some("q"));
        let json: Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(json["code"], "bad_request");
        assert_eq!(json["field"], "intent.value_wei");
    }

    #[test]
    fn call_needs_data_and_gas() {
        let call = |extra: &str| {
            format!(
                r#"{{"op":"submit","intent":{{"id":"c","account":"a","kind":"call","to":"{TO}"{extra}}}}}"#
            )
        };
        assert_eq!(err(&call("")).field, Some("intent.data"));
        assert_eq!(
            err(&call(r#","data":"0x01""#)).field,
            Some("intent.gas_limit")
        );
        let Request::Submit { intent, .. } =
            decode(&call(r#","data":"0xa9059cbb","gas_limit":60000"#)).unwrap()
        else {
            panic!()
        };
        assert_eq!(intent.data, vec![0xa9, 0x05, 0x9c, 0xbb]);
        assert_eq!(intent.value, U256::ZERO);
        let big = format!("0x{}", "00".repeat(MAX_CALLDATA + 1));
        assert_eq!(
            err(&call(&format!(r#","data":"{big}","gas_limit":60000"#))).field,
            Some("intent.data")
        );
    }

    #[test]
    fn checksummed_addresses_are_accepted() {
        let f = r#"{"op":"submit","intent":{"id":"c","account":"a","kind":"transfer","to":"0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc","value_wei":"0"}}"#;
        assert!(decode(f).is_ok());
    }

    #[test]
    fn other_ops() {
        assert_eq!(
            decode(r#"{"op":"ping","req":"p"}"#).unwrap(),
            Request::Ping {
                req: Some("p".into())
            }
        );
        assert!(matches!(
            decode(r#"{"op":"cancel","id":"x"}"#).unwrap(),
            Request::Cancel { .. }
        ));
        assert!(matches!(
            decode(r#"{"op":"status","id":"abc"}"#).unwrap(),
            Request::Status { .. }
        ));
    }
}
