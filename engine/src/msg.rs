//! The fixed-size messages that travel through the engine's rings.
//!
//! Every message is `Copy`, has no heap pointer, and carries its hop timestamps
//! ([`Hops`]). Variable-length bytes (calldata, the raw signed transaction) live in the
//! [`BlobPool`](crate::blob::BlobPool) and travel as a [`BlobRef`].

use alloy_primitives::{Address, B256, U256};
use pipeline::{Hops, Message, assert_message_size};

use crate::blob::BlobRef;

/// Longest desk idempotency key (`id`) the engine accepts, in bytes.
pub const MAX_INTENT_ID: usize = 64;

/// A desk's intent id, inline and fixed-size.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IntentId {
    len: u8,
    bytes: [u8; MAX_INTENT_ID],
}

impl IntentId {
    /// Copies `s` in; `None` if it is empty or longer than [`MAX_INTENT_ID`] bytes.
    pub fn new(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.is_empty() || b.len() > MAX_INTENT_ID {
            return None;
        }
        let mut bytes = [0u8; MAX_INTENT_ID];
        bytes[..b.len()].copy_from_slice(b);
        Some(Self {
            len: b.len() as u8,
            bytes,
        })
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Built only from a `&str` in `new`, so always valid UTF-8; fall back defensively.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

impl Default for IntentId {
    fn default() -> Self {
        Self {
            len: 0,
            bytes: [0; MAX_INTENT_ID],
        }
    }
}

impl std::fmt::Debug for IntentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// What an intent asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum IntentKind {
    /// Plain value transfer.
    #[default]
    Transfer,
    /// Contract call with calldata.
    Call,
    /// Validator deposits: entries in the deposit CLI's format, validated by policy
    /// (BLS signature, SSZ roots, withdrawal credentials, amounts) before signing; the
    /// calldata blob holds them packed ([`crate::staking::DEPOSIT_ENTRY_BYTES`] each).
    StakeDeposit,
    /// EIP-7002 withdrawal request (full exit when the amount is 0); the calldata blob
    /// holds the system contract's 56-byte input.
    StakeExit,
    /// EIP-7251 consolidation request; the calldata blob holds the system contract's
    /// 96-byte input (source ++ target pubkey).
    StakeConsolidate,
}

impl IntentKind {
    /// Protocol name.
    pub const fn as_str(self) -> &'static str {
        match self {
            IntentKind::Transfer => "transfer",
            IntentKind::Call => "call",
            IntentKind::StakeDeposit => "stake_deposit",
            IntentKind::StakeExit => "stake_exit",
            IntentKind::StakeConsolidate => "stake_consolidate",
        }
    }

    /// A staking kind (deposit, exit, consolidation).
    pub const fn is_staking(self) -> bool {
        matches!(
            self,
            IntentKind::StakeDeposit | IntentKind::StakeExit | IntentKind::StakeConsolidate
        )
    }
}

/// Where the transaction may be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Route {
    /// Policy decides.
    #[default]
    Auto,
    /// Public mempool through RPC providers.
    Public,
    /// Private relays only.
    Private,
}

impl Route {
    /// Protocol name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Route::Auto => "auto",
            Route::Public => "public",
            Route::Private => "private",
        }
    }
}

/// Index of a configured account; [`AccountIdx::UNKNOWN`] when the desk named none we know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AccountIdx(pub u16);

impl AccountIdx {
    /// The desk named an account that is not configured; policy rejects it.
    pub const UNKNOWN: AccountIdx = AccountIdx(u16::MAX);
}

/// Identifies a desk connection (for routing replies) and its principal (for idempotency).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Origin {
    /// Connection id, unique for the process lifetime.
    pub conn: u32,
    /// Interned principal (`sub` of the JWT).
    pub principal: u32,
}

/// A desk intent on its way from intake to signing.
#[derive(Clone, Copy, Debug, Default)]
pub struct IntentMsg {
    /// Engine sequence number, assigned by the intake stage (0 before that).
    pub seq: u64,
    /// Who sent it.
    pub origin: Origin,
    /// Desk idempotency key.
    pub id: IntentId,
    /// Signing account.
    pub account: AccountIdx,
    /// What it asks for.
    pub kind: IntentKind,
    /// Requested route.
    pub route: Route,
    /// Send to every RPC provider at once instead of hedging after a delay.
    pub urgent: bool,
    /// A private transaction that no relay takes goes to the public mempool instead of
    /// failing.
    pub public_fallback: bool,
    /// Destination.
    pub to: Address,
    /// Value in wei.
    pub value: U256,
    /// Gas limit.
    pub gas_limit: u64,
    /// Desk's cap on `max_fee_per_gas` (0 = none).
    pub max_fee_cap: u128,
    /// Calldata, if any.
    pub data: BlobRef,
    /// Travel-rule data the desk attached (IVMS101 subset), as evidence hash and VASP key.
    pub travel: TravelInfo,
    /// Principal that approved this intent under four-eyes (0 = not approved yet).
    pub approved_by: u32,
    /// Asset slot of the kill switch (set by policy; 0 = the chain's native asset).
    pub asset: u8,
    /// Version of the policy that decided this intent (set by policy).
    pub policy_version: u32,
    /// The deposit entries' signatures and roots were verified (set only by the
    /// deposit verifier when it puts the intent back into intake; never by a desk).
    pub deposit_verified: bool,
    /// Hop timestamps; the first is when the desk frame was read.
    pub hops: Hops,
}

/// What the engine keeps of an intent's travel-rule data on the hot path: whether it was
/// given, a key of the beneficiary VASP, and the hash of the canonical data (the evidence
/// recorded in the audit trail).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TravelInfo {
    /// The desk attached originator and beneficiary data.
    pub present: bool,
    /// Key of the normalised beneficiary VASP identifier (0 = none: a self-hosted wallet).
    pub vasp_key: u64,
    /// keccak256 of the canonical JSON of the data.
    pub hash: B256,
}

impl Message for IntentMsg {
    fn hops(&self) -> &Hops {
        &self.hops
    }
    fn hops_mut(&mut self) -> &mut Hops {
        &mut self.hops
    }
}
// Five cache lines: the intent, its travel-rule evidence and its hop stamps.
assert_message_size!(IntentMsg, 320);

/// Why a signed transaction was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum TxPurpose {
    /// The intent's transaction.
    #[default]
    Intent,
    /// The same transaction with higher fees, on the same nonce.
    Replacement,
    /// A zero-value transfer to itself on the intent's nonce, to cancel it.
    Cancel,
    /// A zero-value transfer to itself on a nonce whose transaction no provider took, so
    /// the account's later transactions are not stuck behind a gap.
    Filler,
}

/// A signed transaction on its way to the network and the receipt watcher.
#[derive(Clone, Copy, Debug, Default)]
pub struct TxMsg {
    /// Engine sequence number of the intent.
    pub seq: u64,
    /// Who sent the intent.
    pub origin: Origin,
    /// Signing account.
    pub account: AccountIdx,
    /// Nonce used.
    pub nonce: u64,
    /// Hash of the signed transaction.
    pub tx_hash: B256,
    /// The raw EIP-2718 bytes (owned by this message until broadcast releases them).
    pub raw: BlobRef,
    /// Asset slot of the kill switch (copied from the intent).
    pub asset: u8,
    /// Send to every RPC provider at once (copied from the intent).
    pub urgent: bool,
    /// Route requested (copied from the intent).
    pub route: Route,
    /// A private send may fall back to the public path (copied from the intent).
    pub public_fallback: bool,
    /// Last block a private send may be included in (0 unless sent privately).
    pub max_block: u64,
    /// Why this transaction exists: the intent's own, a fee replacement, a cancellation,
    /// or a filler for a nonce no provider took.
    pub purpose: TxPurpose,
    /// How many times the intent's transaction was replaced before this one (0 for the
    /// first): with `seq`, it tells the transactions of one intent apart.
    pub generation: u16,
    /// Journal position of this message's record (0: none): what a stage that must not
    /// act before the record is synced (group commit) waits for.
    pub jpos: u64,
    /// A node answered "nonce too low": the receipt watcher asks for this very
    /// transaction's receipt before anything is concluded (found: it is included; not
    /// found: another transaction used the nonce, and the intent fails).
    pub verify: bool,
    /// Hop timestamps carried over from the intent.
    pub hops: Hops,
}

impl Message for TxMsg {
    fn hops(&self) -> &Hops {
        &self.hops
    }
    fn hops_mut(&mut self) -> &mut Hops {
        &mut self.hops
    }
}
assert_message_size!(TxMsg, 192);

/// Lifecycle states of an intent, as named by the desk protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum State {
    /// Passed policy.
    #[default]
    Accepted,
    /// Refused by policy.
    Rejected,
    /// Waits for a four-eyes approval by another principal.
    PendingApproval,
    /// Approved by another principal; goes on to signing.
    Approved,
    /// Handed to its signer, which has nothing ready for it yet (an MPC account whose
    /// presignature pool is empty); it is signed, in order, when the signer can.
    SigningWait,
    /// Signed; nonce assigned.
    Signed,
    /// Accepted by a venue.
    Broadcast,
    /// In a block.
    Included,
    /// Enough blocks on top.
    Confirmed,
    /// Could not be completed.
    Failed,
    /// Its block left the canonical chain; it is tracked (and sent) again.
    Reorged,
    /// Its transaction was replaced on the same nonce (higher fees, or a cancellation);
    /// `tx_hash` is the replacement's.
    Replaced,
    /// Cancelled by the desk: dropped before signing, or its nonce taken by a zero-value
    /// replacement that was included.
    Cancelled,
    /// Not included, and a replacement would have to pay more than the intent's fee cap:
    /// it waits for fees to fall (it is still valid and may be included any time).
    FeeWait,
}

impl State {
    /// Number of states (for per-state counters).
    pub const COUNT: usize = 14;
    /// Every state, in declaration order (`ALL[s as usize] == s`).
    pub const ALL: [State; State::COUNT] = [
        State::Accepted,
        State::Rejected,
        State::PendingApproval,
        State::Approved,
        State::SigningWait,
        State::Signed,
        State::Broadcast,
        State::Included,
        State::Confirmed,
        State::Failed,
        State::Reorged,
        State::Replaced,
        State::Cancelled,
        State::FeeWait,
    ];

    /// Protocol name.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Accepted => "accepted",
            State::Rejected => "rejected",
            State::PendingApproval => "pending_approval",
            State::Approved => "approved",
            State::SigningWait => "signing_wait",
            State::Signed => "signed",
            State::Broadcast => "broadcast",
            State::Included => "included",
            State::Confirmed => "confirmed",
            State::Failed => "failed",
            State::Reorged => "reorged",
            State::Replaced => "replaced",
            State::Cancelled => "cancelled",
            State::FeeWait => "fee_wait",
        }
    }

    /// No further event follows.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Rejected | State::Confirmed | State::Failed | State::Cancelled
        )
    }
}

/// Machine-readable reason attached to `rejected` and `failed` events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Reason {
    /// No reason (non-error states).
    #[default]
    None,
    /// The account is not configured.
    UnknownAccount,
    /// Destination not on the account's allowlist.
    NotAllowlisted,
    /// Value above the account's per-intent cap.
    ValueCap,
    /// Intent kind not executable by this engine's configuration.
    UnsupportedKind,
    /// No venue for the requested route.
    RouteUnavailable,
    /// The signer failed.
    SignerError,
    /// The engine has no buffer space to build the transaction.
    Overloaded,
    /// The node refused the transaction.
    NodeRejected,
    /// The connection to the node was lost before it answered.
    VenueUnavailable,
    /// A rolling velocity limit (value or count per window) would be exceeded.
    VelocityLimit,
    /// Address risk (KYT): sanctioned, too risky, or no fresh score where that denies.
    KytRisk,
    /// Travel-rule data is required and missing.
    TravelRuleMissing,
    /// The beneficiary VASP is not a known counterparty.
    UnknownVasp,
    /// Outside the account's business hours.
    OutsideBusinessHours,
    /// A kill switch covers the account, asset or venue (or all).
    KillSwitch,
    /// Contract call to a target or selector the account may not call.
    CallNotAllowed,
    /// Gas limit above the account's maximum.
    GasCap,
    /// Fee cap above the account's maximum fee per gas.
    FeeCap,
    /// An approver refused the intent.
    ApprovalRejected,
    /// No approval arrived in time.
    ApprovalExpired,
    /// The journal could not record the signed transaction, so it was not sent.
    JournalUnavailable,
    /// A deposit entry failed a check (signature, roots, credentials, amount, top-up).
    InvalidDeposit,
    /// An exit or consolidation names a validator the engine knows no deposit for.
    UnknownValidator,
    /// An exit or consolidation sent by an account that is not the validator's
    /// withdrawal address (or credentials that allow no such request).
    NotWithdrawalAddress,
}

impl Reason {
    /// Number of reasons (for per-reason counters).
    pub const COUNT: usize = 25;
    /// Every reason, in declaration order (`ALL[r as usize] == r`).
    pub const ALL: [Reason; Reason::COUNT] = [
        Reason::None,
        Reason::UnknownAccount,
        Reason::NotAllowlisted,
        Reason::ValueCap,
        Reason::UnsupportedKind,
        Reason::RouteUnavailable,
        Reason::SignerError,
        Reason::Overloaded,
        Reason::NodeRejected,
        Reason::VenueUnavailable,
        Reason::VelocityLimit,
        Reason::KytRisk,
        Reason::TravelRuleMissing,
        Reason::UnknownVasp,
        Reason::OutsideBusinessHours,
        Reason::KillSwitch,
        Reason::CallNotAllowed,
        Reason::GasCap,
        Reason::FeeCap,
        Reason::ApprovalRejected,
        Reason::ApprovalExpired,
        Reason::JournalUnavailable,
        Reason::InvalidDeposit,
        Reason::UnknownValidator,
        Reason::NotWithdrawalAddress,
    ];

    /// Protocol name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::None => "",
            Reason::UnknownAccount => "unknown_account",
            Reason::NotAllowlisted => "not_allowlisted",
            Reason::ValueCap => "value_cap",
            Reason::UnsupportedKind => "unsupported_kind",
            Reason::RouteUnavailable => "route_unavailable",
            Reason::SignerError => "signer_error",
            Reason::Overloaded => "overloaded",
            Reason::NodeRejected => "node_rejected",
            Reason::VenueUnavailable => "venue_unavailable",
            Reason::VelocityLimit => "velocity_limit",
            Reason::KytRisk => "kyt_risk",
            Reason::TravelRuleMissing => "travel_rule_missing",
            Reason::UnknownVasp => "unknown_vasp",
            Reason::OutsideBusinessHours => "outside_business_hours",
            Reason::KillSwitch => "kill_switch",
            Reason::CallNotAllowed => "call_not_allowed",
            Reason::GasCap => "gas_cap",
            Reason::FeeCap => "fee_cap",
            Reason::ApprovalRejected => "approval_rejected",
            Reason::ApprovalExpired => "approval_expired",
            Reason::JournalUnavailable => "journal_unavailable",
            Reason::InvalidDeposit => "invalid_deposit",
            Reason::UnknownValidator => "unknown_validator",
            Reason::NotWithdrawalAddress => "not_withdrawal_address",
        }
    }
}

/// Longest free-text detail a status message carries inline (e.g. a node's error).
pub const MAX_DETAIL: usize = 96;

/// Short inline text, truncated at a character boundary.
#[derive(Clone, Copy)]
pub struct Detail {
    len: u8,
    bytes: [u8; MAX_DETAIL],
}

impl Detail {
    /// Copies at most [`MAX_DETAIL`] bytes of `s`, cut at a character boundary.
    pub fn new(s: &str) -> Self {
        let mut end = s.len().min(MAX_DETAIL);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; MAX_DETAIL];
        bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        Self {
            len: end as u8,
            bytes,
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("")
    }
}

impl Default for Detail {
    fn default() -> Self {
        Self {
            len: 0,
            bytes: [0; MAX_DETAIL],
        }
    }
}

impl std::fmt::Debug for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// What a [`StatusMsg`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum StatusKind {
    /// The intent entered the pipeline under `seq` (the `ack`).
    #[default]
    Ack,
    /// The intent reached a new state.
    Event,
    /// A desk resubmitted an id it already used: answer with the existing intent.
    Duplicate,
    /// A desk asked for the latest state of `id` (`status` op).
    Query,
    /// A desk asked to cancel `id` (`cancel` op).
    Cancel,
    /// The intent was not accepted (the journal could not record it): `error unavailable`
    /// with `detail`, no sequence number used.
    Refused,
}

/// A status update for the fan-out thread: one per state change, from every stage.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatusMsg {
    /// What this is.
    pub kind: StatusKind,
    /// State reached (for [`StatusKind::Event`]).
    pub state: State,
    /// Reason for `rejected` / `failed`.
    pub reason: Reason,
    /// Engine sequence number of the intent (0 for a query).
    pub seq: u64,
    /// Who sent it (or who asks).
    pub origin: Origin,
    /// Desk idempotency key (set on `Ack`, `Duplicate` and `Query`).
    pub id: IntentId,
    /// When it happened (raw clock ticks).
    pub at_raw: u64,
    /// Transaction hash (signed onwards).
    pub tx_hash: B256,
    /// Sender address (signed).
    pub from: Address,
    /// Nonce (signed).
    pub nonce: u64,
    /// Block number (included).
    pub block_number: u64,
    /// Block hash (included).
    pub block_hash: B256,
    /// Gas used (included).
    pub gas_used: u64,
    /// Execution success (included).
    pub success: bool,
    /// Blocks on top of the inclusion block (confirmed).
    pub depth: u32,
    /// Route taken (broadcast).
    pub route: Route,
    /// Venues the transaction was written to (broadcast): bit `i` is provider `i` in
    /// configuration order, then bit `providers + j` is relay `j`.
    pub venues: u32,
    /// Version of the policy that decided (accepted, rejected, pending_approval).
    pub policy_version: u32,
    /// Free-text detail (rejection message, node error).
    pub detail: Detail,
    /// Journal position of this message's record (0: none): what a stage that must not
    /// act before the record is synced (group commit) waits for.
    pub jpos: u64,
    /// On an ack: the intent's account (for the audit trail's `request` record).
    pub account: AccountIdx,
    /// On an ack: what the intent asks for.
    pub intent_kind: IntentKind,
    /// Included: the deposit contract's index of the transaction's first deposit
    /// (its `DepositEvent` log); meaningful when `deposit_count > 0`.
    pub deposit_index: u64,
    /// Included: how many `DepositEvent` logs of the deposit contract the transaction
    /// emitted (consecutive indices from `deposit_index`).
    pub deposit_count: u16,
    /// Hop timestamps of the intent when the event was made.
    pub hops: Hops,
}

impl Message for StatusMsg {
    fn hops(&self) -> &Hops {
        &self.hops
    }
    fn hops_mut(&mut self) -> &mut Hops {
        &mut self.hops
    }
}
assert_message_size!(StatusMsg, 512);

impl StatusMsg {
    /// A state-change event for intent `seq`.
    pub fn event(seq: u64, origin: Origin, state: State, at_raw: u64) -> Self {
        Self {
            kind: StatusKind::Event,
            state,
            seq,
            origin,
            at_raw,
            ..Self::default()
        }
    }

    /// A `rejected` or `failed` event with a reason and message.
    pub fn refusal(
        seq: u64,
        origin: Origin,
        state: State,
        reason: Reason,
        detail: &str,
        at_raw: u64,
    ) -> Self {
        Self {
            reason,
            detail: Detail::new(detail),
            ..Self::event(seq, origin, state, at_raw)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_reason_tables_match_their_discriminants() {
        for (i, s) in State::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
        }
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }
}
