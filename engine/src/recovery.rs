//! Crash recovery: what the journal says each stage starts with after a restart.
//!
//! The journal ([`crate::journal`]) has three lanes, each written by one thread:
//! `intake` (principal names, every acked intent with its calldata), `signing` (every
//! signed transaction with its nonce and raw bytes, replacements included) and `events`
//! (every state change the status thread saw). On start, [`Recovered::from_replay`]
//! merges them per intent, and [`Recovered::plan`] checks the chain for every transaction
//! signed but not known to be final:
//!
//! - acked, never signed, not final: processed again from the policy stage on (same
//!   sequence number, same id; no nonce was used);
//! - signed and found on chain (any of its transactions, by hash): included; it is
//!   confirmed at depth by the receipt watcher like any other;
//! - signed and not on chain: the newest transaction for its nonce is sent to the node
//!   again, byte for byte, before the pipeline starts and in nonce order
//!   ([`Plan::send_again`]; never re-signed with a new nonce), then watched;
//! - final (rejected, failed, cancelled, confirmed): kept only as its idempotency key and
//!   last state.
//!
//! The merge does not depend on which copy of a record comes first: a crash in the middle
//! of a compaction's deletions can leave an older base cut at its start ahead of the newer
//! one. A principal number is resolved by the nearest record naming it before the intent,
//! else the next one after it; an end (`Done`) recorded in any copy is the intent's end.
//!
//! Invariants: a recovered intent keeps its sequence number and `(principal, id)` key, so a
//! desk resubmitting after a crash gets the existing intent; no transaction is signed
//! twice for one intent except as a replacement on the same nonce; a transaction is only
//! ever sent again with the exact bytes the journal recorded.

use std::collections::BTreeMap;

use alloy_primitives::{Address, B256, U256};

use crate::auth::Principals;
use crate::journal::{
    DoneRec, IntentRec, JournalError, LaneWriter, OwnedRecord, Pos, PrincipalRec, Replay,
    SignedRec, StateRec,
};
use crate::msg::{
    AccountIdx, Detail, IntentId, IntentKind, IntentMsg, Origin, Reason, Route, State, StatusMsg,
    TravelInfo, TxMsg, TxPurpose,
};

// ---------------------------------------------------------------------------------------
// Writing: the stages' records.

/// Appends principal `idx`'s name.
pub fn append_principal(lane: &mut LaneWriter, idx: u32, name: &str) -> Result<Pos, JournalError> {
    lane.append_principal(&PrincipalRec::new(idx, name))
}

/// Appends intent `msg` under sequence `seq`, with its account's address and calldata.
pub fn append_intent(
    lane: &mut LaneWriter,
    msg: &IntentMsg,
    seq: u64,
    account: Address,
    calldata: &[u8],
) -> Result<Pos, JournalError> {
    let r = IntentRec {
        seq,
        principal: msg.origin.principal,
        id: IntentRec::id_bytes(msg.id.as_str()),
        account: account.into_array(),
        account_idx: msg.account.0,
        kind: msg.kind as u8,
        route: msg.route as u8,
        urgent: msg.urgent,
        public_fallback: msg.public_fallback,
        to: msg.to.into_array(),
        value: msg.value.to_be_bytes(),
        gas_limit: msg.gas_limit,
        max_fee_cap: msg.max_fee_cap.to_le_bytes(),
        travel_present: msg.travel.present,
        travel_vasp_key: msg.travel.vasp_key,
        travel_hash: msg.travel.hash.0,
        approved_by: msg.approved_by,
        at_unix_ns: unix_ns(),
        ..IntentRec::default()
    };
    lane.append_intent(&r, calldata)
}

/// Appends signed transaction `tx` (raw bytes `raw`) of account `from`.
pub fn append_signed(
    lane: &mut LaneWriter,
    tx: &TxMsg,
    from: Address,
    max_fee: u128,
    tip: u128,
    raw: &[u8],
) -> Result<Pos, JournalError> {
    let r = SignedRec {
        seq: tx.seq,
        account: from.into_array(),
        account_idx: tx.account.0,
        nonce: tx.nonce,
        generation: tx.generation,
        purpose: tx.purpose as u8,
        max_fee: max_fee.to_le_bytes(),
        priority_fee: tip.to_le_bytes(),
        tx_hash: tx.tx_hash.0,
        route: tx.route as u8,
        urgent: tx.urgent,
        public_fallback: tx.public_fallback,
        max_block: tx.max_block,
        at_unix_ns: unix_ns(),
        ..SignedRec::default()
    };
    lane.append_signed(&r, raw)
}

/// Appends event `m` (made at `at_unix_us`).
pub fn append_state(
    lane: &mut LaneWriter,
    m: &StatusMsg,
    at_unix_us: u64,
) -> Result<Pos, JournalError> {
    let r = StateRec {
        seq: m.seq,
        state: m.state as u8,
        reason: m.reason as u8,
        tx_hash: m.tx_hash.0,
        from: m.from.into_array(),
        nonce: m.nonce,
        block_number: m.block_number,
        block_hash: m.block_hash.0,
        gas_used: m.gas_used,
        success: m.success,
        depth: m.depth,
        route: m.route as u8,
        venues: m.venues,
        policy_version: m.policy_version,
        detail: StateRec::detail_bytes(m.detail.as_str()),
        at_unix_us,
    };
    lane.append_state(&r)
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Reading back.

/// One transaction the signing stage recorded.
#[derive(Clone, Debug)]
pub struct SignedTx {
    /// Account address.
    pub from: Address,
    /// Nonce.
    pub nonce: u64,
    /// 0 for the intent's first transaction, then one more per replacement.
    pub generation: u16,
    /// Why it was made.
    pub purpose: TxPurpose,
    /// Fees it was signed with.
    pub max_fee: u128,
    /// Priority fee it was signed with.
    pub tip: u128,
    /// Its hash.
    pub tx_hash: B256,
    /// Route it was sent on.
    pub route: Route,
    /// Sent to every provider at once.
    pub urgent: bool,
    /// Private with public fallback.
    pub public_fallback: bool,
    /// The signed bytes.
    pub raw: Vec<u8>,
}

/// Everything the journal holds about one intent.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Principal name (the `sub` of its JWT).
    pub principal: String,
    /// Desk id.
    pub id: IntentId,
    /// The intent as acked (`None` when only its final record survived a compaction), with
    /// its account's address and calldata.
    pub intent: Option<(IntentMsg, Address, Vec<u8>)>,
    /// Its transactions, in signing order.
    pub signed: Vec<SignedTx>,
    /// Its last recorded event and when it was made (unix µs).
    pub last: Option<(StatusMsg, u64)>,
    /// Its recorded end, from a compaction: state, reason, transaction, block.
    pub done: Option<(State, Reason, B256, u64)>,
}

impl Entry {
    /// The state it ended in, if it ended.
    pub fn final_state(&self) -> Option<State> {
        if let Some((s, ..)) = self.done {
            return Some(s);
        }
        self.last
            .as_ref()
            .map(|(m, _)| m.state)
            .filter(|s| s.is_terminal())
    }
}

/// The journal's content, merged per intent.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Intents by sequence number.
    pub entries: BTreeMap<u64, Entry>,
    /// Torn last records cut off at open.
    pub torn: usize,
    /// Every principal name recorded.
    pub names: std::collections::BTreeSet<String>,
    /// Transactions and events of intents whose intent record is not in what was read
    /// (while running, lanes rotate independently: the intent may still be in its lane's
    /// open segment). A compaction keeps them as they are.
    pub orphans: Vec<OwnedRecord>,
    /// Intents whose principal number no name record in what was read explains (kept,
    /// with an empty name: a status query by the desk cannot find them).
    pub unnamed: usize,
}

fn state_of(b: u8) -> State {
    State::ALL.get(b as usize).copied().unwrap_or(State::Failed)
}

fn reason_of(b: u8) -> Reason {
    Reason::ALL.get(b as usize).copied().unwrap_or(Reason::None)
}

fn route_of(b: u8) -> Route {
    match b {
        1 => Route::Public,
        2 => Route::Private,
        _ => Route::Auto,
    }
}

/// The destination, value, gas limit and calldata of a signed EIP-1559 transaction.
fn as_signed_call(raw: &[u8]) -> Option<(Address, U256, u64, Vec<u8>)> {
    use alloy_consensus::Transaction;
    use alloy_eips::eip2718::Decodable2718;
    let tx = alloy_consensus::TxEnvelope::decode_2718(&mut &raw[..]).ok()?;
    Some((tx.to()?, tx.value(), tx.gas_limit(), tx.input().to_vec()))
}

fn kind_of(b: u8) -> IntentKind {
    match b {
        1 => IntentKind::Call,
        2 => IntentKind::StakeDeposit,
        3 => IntentKind::StakeExit,
        4 => IntentKind::StakeConsolidate,
        _ => IntentKind::Transfer,
    }
}

fn purpose_of(b: u8) -> TxPurpose {
    match b {
        1 => TxPurpose::Replacement,
        2 => TxPurpose::Cancel,
        3 => TxPurpose::Filler,
        _ => TxPurpose::Intent,
    }
}

impl Recovered {
    /// Merges the lanes of `replay`. Principal numbers in intent records are the ones of
    /// the run that wrote them; names resolve them (each run records a name before its
    /// first use). `accounts` are the configured account addresses: an intent's account is
    /// found again by address.
    pub fn from_replay(replay: &Replay, accounts: &[Address]) -> Recovered {
        let mut out = Recovered {
            torn: replay.truncated.len(),
            ..Recovered::default()
        };
        let account_idx = |a: Address| {
            accounts
                .iter()
                .position(|x| *x == a)
                .map_or(AccountIdx::UNKNOWN, |i| AccountIdx(i as u16))
        };
        // The compacted base first (older; where a record is in both, the base's wins),
        // then intake: together they define the intents. One run numbers principals one
        // way, and a compaction writes them with the numbers of the run that made it, so
        // one map serves both.
        //
        // A name is normally recorded before the intents that use its number. A crash while
        // a compaction deletes the segments it replaced can leave an older base's later
        // segments without its first one (where its names are), ahead of the newer base
        // in segment order: such an intent takes the next record of its number instead.
        let chain: Vec<&OwnedRecord> = replay
            .lane("base")
            .iter()
            .chain(replay.lane("intake").iter())
            .map(|(_, r)| r)
            .collect();
        let recorded: Vec<(usize, u32, &str)> = chain
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r {
                OwnedRecord::Principal(p) => Some((i, p.idx, p.name())),
                _ => None,
            })
            .collect();
        let mut names: std::collections::HashMap<u32, String> = std::collections::HashMap::new();
        for (i, rec) in chain.iter().enumerate() {
            match rec {
                OwnedRecord::Principal(p) => {
                    out.names.insert(p.name().to_owned());
                    names.insert(p.idx, p.name().to_owned());
                }
                OwnedRecord::Intent(r, data) => {
                    let principal = names
                        .get(&r.principal)
                        .cloned()
                        .or_else(|| {
                            recorded
                                .iter()
                                .find(|(at, idx, _)| *at > i && *idx == r.principal)
                                .map(|(_, _, name)| (*name).to_owned())
                        })
                        .unwrap_or_default();
                    let id = IntentId::new(r.id()).unwrap_or_default();
                    let from = Address::from(r.account);
                    let msg = IntentMsg {
                        seq: r.seq,
                        origin: Origin::default(),
                        id,
                        account: account_idx(from),
                        kind: kind_of(r.kind),
                        route: route_of(r.route),
                        urgent: r.urgent,
                        public_fallback: r.public_fallback,
                        to: Address::from(r.to),
                        value: U256::from_be_bytes(r.value),
                        gas_limit: r.gas_limit,
                        max_fee_cap: u128::from_le_bytes(r.max_fee_cap),
                        travel: TravelInfo {
                            present: r.travel_present,
                            vasp_key: r.travel_vasp_key,
                            hash: B256::from(r.travel_hash),
                        },
                        approved_by: 0,
                        ..IntentMsg::default()
                    };
                    let e = out.entries.entry(r.seq).or_insert_with(|| Entry {
                        principal: String::new(),
                        id,
                        intent: Some((msg, from, data.clone())),
                        signed: Vec::new(),
                        last: None,
                        done: None,
                    });
                    if e.principal.is_empty() {
                        e.principal = principal;
                    }
                }
                OwnedRecord::Done(d) => {
                    let id = IntentId::new(d.id()).unwrap_or_default();
                    // Its last event, as far as the compact record tells it.
                    let last = StatusMsg {
                        kind: crate::msg::StatusKind::Event,
                        state: state_of(d.state),
                        reason: reason_of(d.reason),
                        seq: d.seq,
                        id,
                        tx_hash: B256::from(d.tx_hash),
                        block_number: d.block_number,
                        ..StatusMsg::default()
                    };
                    let done = (
                        state_of(d.state),
                        reason_of(d.reason),
                        B256::from(d.tx_hash),
                        d.block_number,
                    );
                    let e = out.entries.entry(d.seq).or_insert(Entry {
                        principal: d.principal_name().to_owned(),
                        id,
                        intent: None,
                        signed: Vec::new(),
                        last: None,
                        done: None,
                    });
                    // An end recorded anywhere is the end, whichever copy came first (an
                    // older base left by a crash mid-compaction may still hold the intent
                    // unfinished, ahead of the newer base that ended it).
                    if e.done.is_none() {
                        e.done = Some(done);
                        e.last = Some((last, d.at_unix_us));
                    }
                    if e.principal.is_empty() {
                        e.principal = d.principal_name().to_owned();
                    }
                }
                _ => {}
            }
        }
        out.unnamed = out
            .entries
            .values()
            .filter(|e| e.principal.is_empty())
            .count();
        for (_, rec) in replay
            .lane("base")
            .iter()
            .chain(replay.lane("signing").iter())
        {
            let OwnedRecord::Signed(r, raw) = rec else {
                continue;
            };
            let Some(e) = out.entries.get_mut(&r.seq) else {
                out.orphans.push(rec.clone());
                continue;
            };
            if !e.signed.iter().any(|s| s.tx_hash.0 == r.tx_hash) {
                e.signed.push(SignedTx {
                    from: Address::from(r.account),
                    nonce: r.nonce,
                    generation: r.generation,
                    purpose: purpose_of(r.purpose),
                    max_fee: u128::from_le_bytes(r.max_fee),
                    tip: u128::from_le_bytes(r.priority_fee),
                    tx_hash: B256::from(r.tx_hash),
                    route: route_of(r.route),
                    urgent: r.urgent,
                    public_fallback: r.public_fallback,
                    raw: raw.clone(),
                });
            }
        }
        for (_, rec) in replay
            .lane("base")
            .iter()
            .chain(replay.lane("events").iter())
        {
            let OwnedRecord::State(r) = rec else {
                continue;
            };
            let Some(e) = out.entries.get_mut(&r.seq) else {
                out.orphans.push(rec.clone());
                continue;
            };
            {
                // A terminal state is never overwritten by a late event of the same intent.
                if e.final_state().is_some() {
                    continue;
                }
                let m = StatusMsg {
                    kind: crate::msg::StatusKind::Event,
                    state: state_of(r.state),
                    reason: reason_of(r.reason),
                    seq: r.seq,
                    id: e.id,
                    tx_hash: B256::from(r.tx_hash),
                    from: Address::from(r.from),
                    nonce: r.nonce,
                    block_number: r.block_number,
                    block_hash: B256::from(r.block_hash),
                    gas_used: r.gas_used,
                    success: r.success,
                    depth: r.depth,
                    route: route_of(r.route),
                    venues: r.venues,
                    policy_version: r.policy_version,
                    detail: Detail::new(r.detail()),
                    ..StatusMsg::default()
                };
                e.last = Some((m, r.at_unix_us));
            }
        }
        out
    }

    /// The first sequence number free for new intents.
    pub fn next_seq(&self) -> u64 {
        self.entries.keys().next_back().map_or(1, |s| s + 1)
    }

    /// What survives a compaction: every unfinished intent whole (names, intent, its
    /// transactions, its last event) and each finished one as its idempotency key and end.
    /// Principals are recorded under the numbers `number` gives their names: the running
    /// engine's own (its intake lane goes on using them), so one name map reads the base
    /// and the open segments alike. Transactions and events whose intent was not read
    /// are kept as they are.
    pub fn keep_records(&self, mut number: impl FnMut(&str) -> u32) -> Vec<OwnedRecord> {
        let mut out = Vec::new();
        let mut names: std::collections::BTreeSet<&str> =
            self.names.iter().map(String::as_str).collect();
        names.extend(self.entries.values().map(|e| e.principal.as_str()));
        for name in names {
            out.push(OwnedRecord::Principal(PrincipalRec::new(
                number(name),
                name,
            )));
        }
        for (&seq, e) in &self.entries {
            if let Some(s) = e.final_state() {
                let (reason, tx, block) = match (&e.done, &e.last) {
                    (Some((_, r, h, b)), _) => (*r, *h, *b),
                    (None, Some((m, _))) => (m.reason, m.tx_hash, m.block_number),
                    (None, None) => (Reason::None, B256::ZERO, 0),
                };
                let mut d = DoneRec::new(
                    seq,
                    &e.principal,
                    e.id.as_str(),
                    s as u8,
                    reason as u8,
                    tx.0,
                    block,
                );
                d.at_unix_us = e.last.as_ref().map_or(0, |(_, at)| *at);
                out.push(OwnedRecord::Done(d));
                continue;
            }
            let Some((msg, from, data)) = &e.intent else {
                continue;
            };
            let idx = number(&e.principal);
            let mut m = *msg;
            m.origin.principal = idx;
            let r = IntentRec {
                seq,
                principal: idx,
                id: IntentRec::id_bytes(e.id.as_str()),
                account: from.into_array(),
                account_idx: m.account.0,
                kind: m.kind as u8,
                route: m.route as u8,
                urgent: m.urgent,
                public_fallback: m.public_fallback,
                to: m.to.into_array(),
                value: m.value.to_be_bytes(),
                gas_limit: m.gas_limit,
                max_fee_cap: m.max_fee_cap.to_le_bytes(),
                travel_present: m.travel.present,
                travel_vasp_key: m.travel.vasp_key,
                travel_hash: m.travel.hash.0,
                ..IntentRec::default()
            };
            out.push(OwnedRecord::Intent(r, data.clone()));
            for s in &e.signed {
                let r = SignedRec {
                    seq,
                    account: s.from.into_array(),
                    account_idx: m.account.0,
                    nonce: s.nonce,
                    generation: s.generation,
                    purpose: s.purpose as u8,
                    max_fee: s.max_fee.to_le_bytes(),
                    priority_fee: s.tip.to_le_bytes(),
                    tx_hash: s.tx_hash.0,
                    route: s.route as u8,
                    urgent: s.urgent,
                    public_fallback: s.public_fallback,
                    ..SignedRec::default()
                };
                out.push(OwnedRecord::Signed(r, s.raw.clone()));
            }
            if let Some((m, at)) = &e.last {
                let r = StateRec {
                    seq,
                    state: m.state as u8,
                    reason: m.reason as u8,
                    tx_hash: m.tx_hash.0,
                    from: m.from.into_array(),
                    nonce: m.nonce,
                    block_number: m.block_number,
                    block_hash: m.block_hash.0,
                    gas_used: m.gas_used,
                    success: m.success,
                    depth: m.depth,
                    route: m.route as u8,
                    venues: m.venues,
                    policy_version: m.policy_version,
                    detail: StateRec::detail_bytes(m.detail.as_str()),
                    at_unix_us: *at,
                };
                out.push(OwnedRecord::State(r));
            }
        }
        out.extend(self.orphans.iter().cloned());
        out
    }

    /// Decides, with the chain's help, what becomes of every unfinished intent. `chain`
    /// answers receipts by hash and takes nothing else; `principals` interns the names
    /// (the numbers this run uses).
    pub fn plan(
        &self,
        principals: &Principals,
        mut receipt: impl FnMut(B256) -> Result<Option<venues::ReceiptSummary>, String>,
    ) -> Result<Plan, String> {
        let mut plan = Plan::default();
        // For each (account, nonce), the newest transaction recorded: only it may be sent
        // again (an older one on that nonce was replaced, cancelled or its nonce reused).
        let mut newest: BTreeMap<(Address, u64), (u64, B256)> = BTreeMap::new();
        for (&seq, e) in &self.entries {
            for s in &e.signed {
                newest.insert((s.from, s.nonce), (seq, s.tx_hash));
            }
        }
        for (&seq, e) in &self.entries {
            let principal = principals.intern(&e.principal);
            plan.keys.push(((principal, e.id), seq));
            let origin = Origin { conn: 0, principal };
            plan.known.push((seq, principal, e.id, e.last));
            if e.final_state().is_some() {
                continue;
            }
            let Some((msg, _, data)) = &e.intent else {
                continue;
            };
            let mut msg = *msg;
            msg.origin = origin;
            if e.signed.is_empty() {
                if matches!(
                    e.last.as_ref().map(|(m, _)| m.state),
                    Some(State::PendingApproval)
                ) {
                    tracing::warn!(seq, "intent was waiting for approval; it is decided again");
                }
                plan.reinject.push((msg, data.clone()));
                continue;
            }
            if msg.account == AccountIdx::UNKNOWN {
                plan.fail.push((
                    seq,
                    origin,
                    "the intent's account is no longer configured; its transaction was not sent again".into(),
                ));
                continue;
            }
            // On chain already? Any of its transactions, newest first.
            let mut found = None;
            for s in e.signed.iter().rev() {
                if let Some(r) = receipt(s.tx_hash)? {
                    found = Some((s.clone(), r));
                    break;
                }
            }
            let Some(latest) = e.signed.last().cloned() else {
                continue;
            };
            let newest_here =
                newest.get(&(latest.from, latest.nonce)) == Some(&(seq, latest.tx_hash));
            match found {
                Some((s, r)) => {
                    let already = e.last.as_ref().is_some_and(|(m, _)| {
                        matches!(m.state, State::Included) && m.tx_hash == r.tx_hash
                    });
                    plan.included.push(RecoveredInclusion {
                        msg,
                        tx: s,
                        receipt: r,
                        announce: !already,
                    });
                }
                None if newest_here && latest.purpose != TxPurpose::Filler => {
                    // What the intent's transaction is, as signed: the policy may have
                    // chosen it (a staking intent's contract, value, gas and calldata), and
                    // the signing stage replaces it from these.
                    let (msg, data) = match e
                        .signed
                        .iter()
                        .rev()
                        .filter(|s| matches!(s.purpose, TxPurpose::Intent | TxPurpose::Replacement))
                        .find_map(|s| as_signed_call(&s.raw))
                    {
                        Some((to, value, gas_limit, input)) => (
                            IntentMsg {
                                to,
                                value,
                                gas_limit,
                                ..msg
                            },
                            input,
                        ),
                        None => (msg, data.clone()),
                    };
                    plan.live.push((msg, data, latest.clone()));
                    let earlier: Vec<SignedTx> = e
                        .signed
                        .iter()
                        .filter(|s| s.nonce == latest.nonce && s.tx_hash != latest.tx_hash)
                        .cloned()
                        .collect();
                    if !earlier.is_empty() {
                        plan.earlier.insert(seq, earlier);
                    }
                    plan.resend.push((msg, latest));
                }
                None => plan.fail.push((
                    seq,
                    origin,
                    "the intent's nonce was taken by a later transaction before the restart; its transaction is not on chain".into(),
                )),
            }
        }
        plan.included
            .sort_by_key(|i| (i.receipt.block_number, i.msg.seq));
        plan.resend.sort_by_key(|(_, s)| (s.from, s.nonce));
        Ok(plan)
    }
}

/// A recovered transaction the chain already has.
#[derive(Clone, Debug)]
pub struct RecoveredInclusion {
    /// The intent (origin: no connection, this run's principal number).
    pub msg: IntentMsg,
    /// The transaction found.
    pub tx: SignedTx,
    /// Its receipt.
    pub receipt: venues::ReceiptSummary,
    /// `included` was not recorded before the restart: send it now.
    pub announce: bool,
}

/// An intent the status thread learns of at start: sequence, principal (this run's
/// number), id, last event and when it was made (unix µs).
pub type Known = (u64, u32, IntentId, Option<(StatusMsg, u64)>);

impl Plan {
    /// Sends every transaction of [`Plan::resend`] to the node again, byte for byte, in
    /// account and nonce order, before the pipeline starts (so no new transaction of the
    /// account can reach the node ahead of them). Taken (or already known): watched for
    /// its receipt. Refused: its receipt, or an earlier transaction's of the intent on
    /// that nonce, is asked for (mined meanwhile: included). "nonce too low" with no
    /// receipt yet: watched, and settled by the receipt watcher a block later
    /// ([`Plan::unsure`]; a node can refuse a nonce a moment before the block that used it
    /// is readable). Refused otherwise: failed with the node's message.
    pub fn send_again(
        &mut self,
        mut send: impl FnMut(&[u8]) -> Result<(), String>,
        mut receipt: impl FnMut(B256) -> Result<Option<venues::ReceiptSummary>, String>,
    ) -> Result<(), String> {
        for (msg, s) in std::mem::take(&mut self.resend) {
            let refusal = match send(&s.raw) {
                Ok(()) => None,
                Err(e) => {
                    let lower = e.to_ascii_lowercase();
                    if lower.contains("already known") || lower.contains("already imported") {
                        None
                    } else {
                        Some(e)
                    }
                }
            };
            let earlier = self.earlier.remove(&msg.seq).unwrap_or_default();
            if let Some(e) = refusal {
                let mut found = None;
                for t in std::iter::once(&s).chain(earlier.iter().rev()) {
                    if let Some(r) = receipt(t.tx_hash)? {
                        found = Some((t.clone(), r));
                        break;
                    }
                }
                if let Some((tx, r)) = found {
                    // Settled: the signing stage has nothing left to replace.
                    self.live.retain(|(m, _, _)| m.seq != msg.seq);
                    self.included.push(RecoveredInclusion {
                        msg,
                        tx,
                        receipt: r,
                        announce: true,
                    });
                    continue;
                }
                if !e.to_ascii_lowercase().contains("nonce too low") {
                    tracing::error!(seq = msg.seq, nonce = s.nonce, error = %e, "a recovered transaction was refused by the node");
                    self.live.retain(|(m, _, _)| m.seq != msg.seq);
                    self.fail.push((
                        msg.seq,
                        msg.origin,
                        format!("sent again after a restart, the node refused it: {e}"),
                    ));
                    continue;
                }
                tracing::warn!(
                    seq = msg.seq,
                    nonce = s.nonce,
                    "a recovered transaction's nonce is used and its receipt is not there yet; the receipt watcher decides"
                );
                self.unsure.push(s.tx_hash);
            }
            self.watch.extend(earlier.into_iter().map(|t| (msg, t)));
            self.watch.push((msg, s));
        }
        self.included
            .sort_by_key(|i| (i.receipt.block_number, i.msg.seq));
        Ok(())
    }
}

/// What the engine does with the journal at start.
#[derive(Debug, Default)]
pub struct Plan {
    /// Idempotency keys (this run's principal numbers) → sequence.
    pub keys: Vec<((u32, IntentId), u64)>,
    /// Every intent, for the status thread: sequence, principal, id, last event.
    pub known: Vec<Known>,
    /// Acked, never signed: processed again.
    pub reinject: Vec<(IntentMsg, Vec<u8>)>,
    /// Signed and on chain: confirmed at depth from here.
    pub included: Vec<RecoveredInclusion>,
    /// Signed, not on chain: to send again, same bytes (sorted by account and nonce);
    /// emptied by [`Plan::send_again`].
    pub resend: Vec<(IntentMsg, SignedTx)>,
    /// Signed and not settled: the signing stage keeps them (to replace or cancel), with
    /// their calldata.
    pub live: Vec<(IntentMsg, Vec<u8>, SignedTx)>,
    /// Cannot go on: failed with this message.
    pub fail: Vec<(u64, Origin, String)>,
    /// Sent again at start and taken by the node: watched for their receipt (with the
    /// intent's earlier transactions on the same nonce, ahead of its newest).
    pub watch: Vec<(IntentMsg, SignedTx)>,
    /// Of [`Plan::resend`], each intent's earlier transactions on the same nonce
    /// (replaced; one of them may still be the one included), by sequence number.
    pub earlier: BTreeMap<u64, Vec<SignedTx>>,
    /// Watched transactions the node refused with "nonce too low" at start, with no
    /// receipt yet: the receipt watcher asks again a block later before failing them.
    pub unsure: Vec<B256>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy_consensus::{SignableTransaction, TxEip1559};
    use alloy_eips::eip2718::Encodable2718;
    use alloy_primitives::{Bytes, TxKind};
    use alloy_signer::SignerSync;
    use alloy_signer_local::PrivateKeySigner;

    #[test]
    fn a_signed_transaction_gives_back_what_policy_chose() {
        let key = PrivateKeySigner::random();
        let to = Address::repeat_byte(0x42);
        let tx = TxEip1559 {
            chain_id: 1,
            nonce: 3,
            gas_limit: 150_000,
            max_fee_per_gas: 10,
            max_priority_fee_per_gas: 1,
            to: TxKind::Call(to),
            value: U256::from(32_000_000_000_000_000_000u128),
            input: Bytes::from(vec![0x22, 0x89, 0x51, 0x18, 7]),
            access_list: Default::default(),
        };
        let sig = key.sign_hash_sync(&tx.signature_hash()).unwrap();
        let raw = alloy_consensus::TxEnvelope::from(tx.into_signed(sig)).encoded_2718();
        let (t, v, g, input) = as_signed_call(&raw).unwrap();
        assert_eq!((t, g), (to, 150_000));
        assert_eq!(v, U256::from(32_000_000_000_000_000_000u128));
        assert_eq!(input, [0x22, 0x89, 0x51, 0x18, 7]);
        assert_eq!(as_signed_call(&raw[..raw.len() - 1]), None);
    }
}

#[cfg(test)]
mod send_again {
    //! What a start does with a recovered transaction the node refuses.
    use super::*;

    fn tx(nonce: u64, generation: u16, h: u8) -> SignedTx {
        SignedTx {
            from: Address::repeat_byte(1),
            nonce,
            generation,
            purpose: if generation == 0 {
                TxPurpose::Intent
            } else {
                TxPurpose::Replacement
            },
            max_fee: 0,
            tip: 0,
            tx_hash: B256::repeat_byte(h),
            route: Route::Public,
            urgent: false,
            public_fallback: false,
            raw: vec![h],
        }
    }

    fn plan_for(seq: u64, latest: SignedTx, earlier: Vec<SignedTx>) -> Plan {
        let msg = IntentMsg {
            seq,
            ..IntentMsg::default()
        };
        let mut p = Plan::default();
        p.live.push((msg, Vec::new(), latest.clone()));
        p.resend.push((msg, latest));
        if !earlier.is_empty() {
            p.earlier.insert(seq, earlier);
        }
        p
    }

    fn mined(h: B256) -> venues::ReceiptSummary {
        venues::ReceiptSummary {
            tx_hash: h,
            block_number: 9,
            block_hash: B256::repeat_byte(9),
            success: true,
            gas_used: 21_000,
            from: Address::repeat_byte(1),
            to: None,
            deposits: venues::DepositLogs::default(),
        }
    }

    #[test]
    fn a_replacement_refused_because_its_original_was_mined_is_included() {
        let original = tx(4, 0, 0xa0);
        let mut p = plan_for(7, tx(4, 1, 0xa1), vec![original.clone()]);
        p.send_again(
            |_| Err("nonce too low".into()),
            |h| Ok((h == original.tx_hash).then(|| mined(h))),
        )
        .unwrap();
        assert!(p.fail.is_empty(), "{:?}", p.fail);
        assert_eq!(p.included.len(), 1);
        assert_eq!(p.included[0].tx.tx_hash, original.tx_hash);
        assert!(
            p.live.is_empty(),
            "an included intent is not the signing stage's"
        );
    }

    #[test]
    fn nonce_too_low_without_a_receipt_yet_is_watched_not_failed() {
        let original = tx(4, 0, 0xb0);
        let latest = tx(4, 1, 0xb1);
        let mut p = plan_for(8, latest.clone(), vec![original.clone()]);
        p.send_again(|_| Err("nonce too low: next nonce 5".into()), |_| Ok(None))
            .unwrap();
        assert!(p.fail.is_empty(), "{:?}", p.fail);
        assert_eq!(p.unsure, vec![latest.tx_hash]);
        // Both transactions on the nonce are watched, the newest last (it is the one
        // the watcher keeps to send again).
        let watched: Vec<B256> = p.watch.iter().map(|(_, t)| t.tx_hash).collect();
        assert_eq!(watched, vec![original.tx_hash, latest.tx_hash]);
        assert_eq!(p.live.len(), 1);
    }

    #[test]
    fn any_other_refusal_without_a_receipt_fails_with_the_nodes_words() {
        let mut p = plan_for(9, tx(4, 0, 0xc0), Vec::new());
        p.send_again(|_| Err("insufficient funds for gas".into()), |_| Ok(None))
            .unwrap();
        assert_eq!(p.fail.len(), 1);
        assert!(p.fail[0].2.contains("insufficient funds"), "{:?}", p.fail);
        assert!(p.watch.is_empty() && p.unsure.is_empty() && p.live.is_empty());
    }

    #[test]
    fn taken_or_already_known_is_watched_with_its_earlier_transactions() {
        let original = tx(4, 0, 0xd0);
        let latest = tx(4, 1, 0xd1);
        let mut p = plan_for(10, latest.clone(), vec![original.clone()]);
        p.send_again(|_| Err("already known".into()), |_| Ok(None))
            .unwrap();
        let watched: Vec<B256> = p.watch.iter().map(|(_, t)| t.tx_hash).collect();
        assert_eq!(watched, vec![original.tx_hash, latest.tx_hash]);
        assert!(p.fail.is_empty() && p.unsure.is_empty());
    }
}

#[cfg(test)]
mod compaction_crash {
    //! A crash while a compaction deletes the segments it replaced: an older base's later
    //! segments may survive without its first one, ahead of the newer base.
    use super::*;
    use crate::journal::{Journal, JournalConfig, SyncPolicy};

    fn cfg(dir: &std::path::Path) -> JournalConfig {
        JournalConfig {
            dir: dir.to_path_buf(),
            segment_bytes: 8192,
            sync: SyncPolicy::None,
            sealer: None,
        }
    }

    fn base_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("base-") && n.ends_with(".seg"))
            })
            .collect();
        v.sort();
        v
    }

    /// Opens, merges and compacts as a start does.
    fn start(dir: &std::path::Path, principals: &Principals) -> Recovered {
        let (j, replay) = Journal::open(cfg(dir)).unwrap();
        let r = Recovered::from_replay(&replay, &[]);
        j.compact(r.keep_records(|n| principals.intern(n))).unwrap();
        r
    }

    fn confirmed(seq: u64) -> StateRec {
        StateRec {
            seq,
            state: State::Confirmed as u8,
            depth: 1,
            ..StateRec::default()
        }
    }

    #[test]
    fn names_and_ends_survive_an_older_base_cut_at_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let n = 200u64;
        {
            let (j, _) = Journal::open(cfg(dir.path())).unwrap();
            let mut intake = j.lane("intake").unwrap();
            let mut events = j.lane("events").unwrap();
            intake
                .append_principal(&PrincipalRec::new(1, "desk-a"))
                .unwrap();
            for seq in 1..=n {
                let r = IntentRec {
                    seq,
                    principal: 1,
                    id: IntentRec::id_bytes(&format!("o{seq}")),
                    ..IntentRec::default()
                };
                intake.append_intent(&r, &[]).unwrap();
                if seq <= n / 2 {
                    events.append_state(&confirmed(seq)).unwrap();
                }
            }
        }
        // First start: half the intents are finished (Done), half are kept whole.
        let first = start(dir.path(), &Principals::default());
        assert_eq!(first.entries.len(), n as usize);
        let old_base = base_files(dir.path());
        assert!(
            old_base.len() >= 3,
            "the base spans several segments: {old_base:?}"
        );
        let saved = tempfile::tempdir().unwrap();
        for p in &old_base {
            std::fs::copy(p, saved.path().join(p.file_name().unwrap())).unwrap();
        }
        // The rest are confirmed; the next start makes a new base where all are Done.
        {
            let (j, _) = Journal::open(cfg(dir.path())).unwrap();
            let mut events = j.lane("events").unwrap();
            for seq in n / 2 + 1..=n {
                events.append_state(&confirmed(seq)).unwrap();
            }
        }
        let second = start(dir.path(), &Principals::default());
        assert!(second.entries.values().all(|e| e.final_state().is_some()));
        // The crash: the older base's first segment (its names) was deleted, the others
        // were not yet.
        for p in &old_base[1..] {
            std::fs::copy(saved.path().join(p.file_name().unwrap()), p).unwrap();
        }
        let (_j, replay) = Journal::open(cfg(dir.path())).unwrap();
        let r = Recovered::from_replay(&replay, &[]);
        assert_eq!(r.unnamed, 0);
        assert_eq!(r.entries.len(), n as usize);
        for (seq, e) in &r.entries {
            assert_eq!(e.principal, "desk-a", "intent {seq} lost its principal");
            assert_eq!(
                e.final_state(),
                Some(State::Confirmed),
                "intent {seq} lost its end"
            );
        }
    }
}
