//! The policy stage's staking checks: what a validator deposit, exit or consolidation
//! must satisfy before any key signs it. Reads memory only: no I/O, no lock, no
//! allocation per decision (the known validators are a map filled off the decision path).
//!
//! - Deposits: entries well formed and at most one per pubkey; withdrawal credentials of
//!   type 0x01 or 0x02 pointing to an address allowlisted for the account; amounts (at
//!   least 1 ETH; exactly 32 ETH for a new 0x01 validator; at most 2048 ETH for 0x02); a
//!   pubkey that already has a deposit (on chain, or sent by this engine) is a top-up and
//!   passes only where the account allows top-ups. The BLS signature and the SSZ roots
//!   are checked by the deposit verifier thread ([`crate::staking::verifier`]) before the
//!   intent comes back here to be decided for good.
//! - Exits (EIP-7002) and consolidations (EIP-7251): the validator is known (a deposit
//!   was seen for it), its withdrawal credentials are 0x01/0x02 and point to the signing
//!   account's own address; a partial withdrawal needs 0x02 credentials; a
//!   consolidation's target (when it is another validator) has 0x02 credentials. The
//!   value is the system contract's current fee, read off the hot path.
//!
//! Invariant: a staking intent that passes here leaves with the contract, value and gas
//! limit the engine chose ([`StakeTx`]); the desk never sets them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use alloy_primitives::{Address, U256};

use crate::msg::{IntentKind, IntentMsg, Reason};
use crate::staking::{self, DEPOSIT_ENTRY_BYTES, DepositEntry, MAX_DEPOSITS_PER_INTENT};

/// An account's staking rules.
#[derive(Debug, Clone, Default)]
pub struct StakingRules {
    /// Withdrawal addresses its deposits may point to (empty: no deposits).
    pub withdrawal: HashSet<Address>,
    /// Top-ups (a deposit for a pubkey that already has one) are allowed.
    pub top_up: bool,
}

/// The request fees of the EIP-7002 and EIP-7251 contracts, as last read (wei; written by
/// the staking refresher thread, read by policy with one atomic load each).
#[derive(Debug, Default)]
pub struct RequestFees {
    /// Withdrawal request fee (`u64::MAX` = not read yet).
    pub withdrawal: AtomicU64,
    /// Consolidation request fee (`u64::MAX` = not read yet).
    pub consolidation: AtomicU64,
}

impl RequestFees {
    /// Fees not read yet.
    pub fn unknown() -> Self {
        Self {
            withdrawal: AtomicU64::new(u64::MAX),
            consolidation: AtomicU64::new(u64::MAX),
        }
    }
}

/// The network side of staking, fixed at start.
#[derive(Debug, Clone)]
pub struct StakingNet {
    /// Genesis fork version of the deposit domain.
    pub fork_version: [u8; 4],
    /// The deposit contract.
    pub deposit_contract: Address,
    /// The batch deposit contract, if any.
    pub batch_contract: Option<Address>,
    /// EIP-7002 contract.
    pub withdrawal_contract: Address,
    /// EIP-7251 contract.
    pub consolidation_contract: Address,
    /// Default gas of a deposit (per entry).
    pub deposit_gas: u64,
    /// Default gas of a request.
    pub request_gas: u64,
    /// Current request fees.
    pub fees: Arc<RequestFees>,
}

impl StakingNet {
    /// From the `[staking]` configuration.
    pub fn from_config(
        c: &crate::config::StakingConfig,
        fees: Arc<RequestFees>,
    ) -> Result<Self, crate::error::EngineError> {
        Ok(Self {
            fork_version: c.fork_version()?,
            deposit_contract: c.deposit_contract,
            batch_contract: c.batch_contract,
            withdrawal_contract: c.withdrawal_request_contract,
            consolidation_contract: c.consolidation_request_contract,
            deposit_gas: c.deposit_gas,
            request_gas: c.request_gas,
            fees,
        })
    }
}

/// Validators the chain has deposits for: pubkey → withdrawal credentials of the first
/// deposit (the ones the beacon chain keeps). Built whole by the staking refresher and
/// swapped into the policy stage.
#[derive(Debug, Clone, Default)]
pub struct ValidatorSet {
    /// pubkey → credentials.
    pub map: HashMap<[u8; 48], [u8; 32]>,
}

/// What the policy stage knows of validators: the chain's set, and the deposits it
/// allowed itself since (so an exit right after a deposit, or a second deposit for the
/// same pubkey while the first is in flight, is judged by what was sent).
#[derive(Debug)]
pub struct Validators {
    chain: Box<ValidatorSet>,
    local: HashMap<[u8; 48], [u8; 32]>,
}

/// Deposits the policy stage can remember without growing its map on the decision path.
const LOCAL_CAPACITY: usize = 4096;

impl Default for Validators {
    fn default() -> Self {
        Self {
            chain: Box::default(),
            local: HashMap::with_capacity(LOCAL_CAPACITY),
        }
    }
}

impl Validators {
    /// Puts the chain's newest set in force; returns the old one (dropped elsewhere).
    pub fn swap_chain(&mut self, new: Box<ValidatorSet>) -> Box<ValidatorSet> {
        let old = std::mem::replace(&mut self.chain, new);
        // What the chain has now needs no local copy.
        if self.local.len() > LOCAL_CAPACITY / 2 {
            let chain = &self.chain.map;
            self.local.retain(|k, _| !chain.contains_key(k));
        }
        old
    }

    /// Credentials of a validator: the chain's, else those of a deposit this engine sent.
    pub fn credentials(&self, pubkey: &[u8; 48]) -> Option<[u8; 32]> {
        self.chain
            .map
            .get(pubkey)
            .or_else(|| self.local.get(pubkey))
            .copied()
    }

    /// Remembers deposits this engine allowed (first credentials win, as on chain).
    pub fn record_sent(&mut self, data: &[u8]) {
        for chunk in data.chunks_exact(DEPOSIT_ENTRY_BYTES) {
            if let Some(e) = DepositEntry::decode(chunk)
                && !self.chain.map.contains_key(&e.pubkey)
                && (self.local.len() < self.local.capacity() || self.local.contains_key(&e.pubkey))
            {
                self.local
                    .entry(e.pubkey)
                    .or_insert(e.withdrawal_credentials);
            }
        }
    }
}

/// The transaction a staking intent becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StakeTx {
    /// Contract called.
    pub to: Address,
    /// Value sent (deposits: the amounts; requests: the fee).
    pub value: U256,
    /// Gas limit.
    pub gas: u64,
}

/// A staking refusal: reason and message.
pub type Refusal = (Reason, &'static str);

fn deny<T>(reason: Reason, message: &'static str) -> Result<T, Refusal> {
    Err((reason, message))
}

/// Checks a staking intent of an account with address `from` and rules `rules`;
/// `data` is its calldata blob. Returns the transaction it becomes.
pub fn check(
    net: &StakingNet,
    validators: &Validators,
    rules: Option<&StakingRules>,
    from: Address,
    msg: &IntentMsg,
    data: &[u8],
) -> Result<StakeTx, Refusal> {
    match msg.kind {
        IntentKind::StakeDeposit => check_deposit(net, validators, rules, msg, data),
        IntentKind::StakeExit => check_exit(net, validators, from, msg, data),
        IntentKind::StakeConsolidate => check_consolidation(net, validators, from, msg, data),
        _ => deny(Reason::UnsupportedKind, "not a staking intent"),
    }
}

fn check_deposit(
    net: &StakingNet,
    validators: &Validators,
    rules: Option<&StakingRules>,
    msg: &IntentMsg,
    data: &[u8],
) -> Result<StakeTx, Refusal> {
    use Reason::InvalidDeposit as Bad;
    let n = data.len() / DEPOSIT_ENTRY_BYTES;
    if n == 0 || n > MAX_DEPOSITS_PER_INTENT || !data.len().is_multiple_of(DEPOSIT_ENTRY_BYTES) {
        return deny(Bad, "entries: malformed deposit entries");
    }
    let to = if n == 1 {
        net.deposit_contract
    } else {
        match net.batch_contract {
            Some(b) => b,
            None => {
                return deny(
                    Bad,
                    "entries: several entries need a batch contract ([staking] batch_contract); send one entry per intent",
                );
            }
        }
    };
    let Some(rules) = rules.filter(|r| !r.withdrawal.is_empty()) else {
        return deny(
            Bad,
            "withdrawal_credentials: the account has no withdrawal addresses allowlisted for staking",
        );
    };
    let mut total_gwei: u64 = 0;
    for (i, chunk) in data.chunks_exact(DEPOSIT_ENTRY_BYTES).enumerate() {
        let Some(e) = DepositEntry::decode(chunk) else {
            return deny(Bad, "entries: malformed deposit entry");
        };
        // The same pubkey twice in one intent would be a deposit and its own top-up.
        if data[..i * DEPOSIT_ENTRY_BYTES]
            .chunks_exact(DEPOSIT_ENTRY_BYTES)
            .any(|c| c[..48] == e.pubkey)
        {
            return deny(
                Bad,
                "pubkey: the same validator appears twice in the intent",
            );
        }
        let Some((kind, addr)) = staking::withdrawal_address(&e.withdrawal_credentials) else {
            return deny(
                Bad,
                "withdrawal_credentials: must be of type 0x01 or 0x02 (an execution address)",
            );
        };
        if !rules.withdrawal.contains(&Address::from(addr)) {
            return deny(
                Bad,
                "withdrawal_credentials: the address is not allowlisted for this account",
            );
        }
        if e.amount_gwei < staking::MIN_DEPOSIT_GWEI {
            return deny(Bad, "amount: below the 1 ETH minimum deposit");
        }
        let top_up = validators.credentials(&e.pubkey).is_some();
        if top_up && !rules.top_up {
            return deny(
                Bad,
                "pubkey: already has a deposit (a top-up), and top-ups are not allowed for this account",
            );
        }
        match kind {
            0x01 if !top_up && e.amount_gwei != staking::MAX_EFFECTIVE_BALANCE_0X01_GWEI => {
                return deny(
                    Bad,
                    "amount: a new validator with 0x01 credentials takes exactly 32 ETH",
                );
            }
            0x01 if e.amount_gwei > staking::MAX_EFFECTIVE_BALANCE_0X01_GWEI => {
                return deny(Bad, "amount: above 32 ETH for 0x01 credentials");
            }
            0x02 if e.amount_gwei > staking::MAX_EFFECTIVE_BALANCE_0X02_GWEI => {
                return deny(Bad, "amount: above 2048 ETH for 0x02 credentials");
            }
            _ => {}
        }
        total_gwei = match total_gwei.checked_add(e.amount_gwei) {
            Some(t) => t,
            None => return deny(Bad, "amount: the entries' total is out of range"),
        };
    }
    let gas = or_default(msg.gas_limit, net.deposit_gas.saturating_mul(n as u64));
    Ok(StakeTx {
        to,
        value: U256::from(staking::deposit_value_wei(total_gwei)),
        gas,
    })
}

/// The validator's withdrawal address and credential type, which must be the signer's.
fn owner(
    validators: &Validators,
    from: Address,
    pubkey: &[u8; 48],
    who: &'static str,
) -> Result<u8, Refusal> {
    let Some(wc) = validators.credentials(pubkey) else {
        return deny(Reason::UnknownValidator, who);
    };
    let Some((kind, addr)) = staking::withdrawal_address(&wc) else {
        return deny(
            Reason::NotWithdrawalAddress,
            "the validator has BLS (0x00) withdrawal credentials: it cannot be asked from the execution layer",
        );
    };
    if Address::from(addr) != from {
        return deny(
            Reason::NotWithdrawalAddress,
            "the signing account is not the validator's withdrawal address",
        );
    }
    Ok(kind)
}

/// The desk's gas limit, or the engine's default when it gave none (0).
fn or_default(desk: u64, default: u64) -> u64 {
    if desk != 0 { desk } else { default }
}

fn fee(f: &AtomicU64) -> Result<U256, Refusal> {
    match f.load(Ordering::Acquire) {
        u64::MAX => deny(
            Reason::RouteUnavailable,
            "the system contract's request fee has not been read yet; retry shortly",
        ),
        v => Ok(U256::from(v)),
    }
}

fn pubkey_at(data: &[u8], at: usize) -> [u8; 48] {
    let mut pk = [0u8; 48];
    pk.copy_from_slice(&data[at..at + 48]);
    pk
}

fn check_exit(
    net: &StakingNet,
    validators: &Validators,
    from: Address,
    msg: &IntentMsg,
    data: &[u8],
) -> Result<StakeTx, Refusal> {
    if data.len() != 56 {
        return deny(
            Reason::InvalidDeposit,
            "request: malformed withdrawal request",
        );
    }
    let pk = pubkey_at(data, 0);
    let kind = owner(
        validators,
        from,
        &pk,
        "validator_pubkey: no deposit is known for this validator",
    )?;
    let amount = u64::from_be_bytes(data[48..56].try_into().unwrap_or([0; 8]));
    if amount != 0 && kind != 0x02 {
        return deny(
            Reason::NotWithdrawalAddress,
            "amount_gwei: a partial withdrawal needs 0x02 (compounding) credentials; use 0 for a full exit",
        );
    }
    Ok(StakeTx {
        to: net.withdrawal_contract,
        value: fee(&net.fees.withdrawal)?,
        gas: or_default(msg.gas_limit, net.request_gas),
    })
}

fn check_consolidation(
    net: &StakingNet,
    validators: &Validators,
    from: Address,
    msg: &IntentMsg,
    data: &[u8],
) -> Result<StakeTx, Refusal> {
    if data.len() != 96 {
        return deny(
            Reason::InvalidDeposit,
            "request: malformed consolidation request",
        );
    }
    let (source, target) = (pubkey_at(data, 0), pubkey_at(data, 48));
    owner(
        validators,
        from,
        &source,
        "source_pubkey: no deposit is known for this validator",
    )?;
    if source != target {
        let Some(wc) = validators.credentials(&target) else {
            return deny(
                Reason::UnknownValidator,
                "target_pubkey: no deposit is known for this validator",
            );
        };
        if wc[0] != 0x02 {
            return deny(
                Reason::NotWithdrawalAddress,
                "target_pubkey: the target validator needs 0x02 (compounding) credentials",
            );
        }
    }
    Ok(StakeTx {
        to: net.consolidation_contract,
        value: fee(&net.fees.consolidation)?,
        gas: or_default(msg.gas_limit, net.request_gas),
    })
}
