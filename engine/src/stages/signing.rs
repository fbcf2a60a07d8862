//! Signing: the single owner of every account's nonce. Builds the EIP-1559 transaction
//! from the cached chain id and fee view, signs its hash with the account's signer, and
//! writes the raw bytes into a blob slot for broadcast.

use std::sync::Arc;

use alloy_primitives::Address;
use pipeline::{Emit, Recorder, Stage, now_raw, ticks_to_ns};
use signers::Signer;
use venues::FeeView;

use crate::blob::{BLOB_SIZE, BlobPool, BlobRef};
use crate::msg::{IntentMsg, Reason, State, StatusMsg, TxMsg};
use crate::risk::kill::KillSwitch;
use crate::stages::StatusSink;
use crate::txbuild::Eip1559;

/// One account as the signing stage sees it.
#[derive(Debug)]
pub struct SigningAccount {
    /// The key.
    pub signer: Arc<dyn Signer>,
    /// Its address (cached from the signer).
    pub from: Address,
    /// Next nonce to assign (read from the chain at start, then owned here).
    pub next_nonce: u64,
}

/// The signing stage.
#[derive(Debug)]
pub struct SigningStage {
    accounts: Vec<SigningAccount>,
    chain_id: u64,
    fees: Arc<FeeView>,
    blobs: Arc<BlobPool>,
    status: StatusSink,
    sign_time: Recorder,
    kill: Arc<KillSwitch>,
    scratch: Box<[u8; BLOB_SIZE]>,
}

impl SigningStage {
    /// A stage for `accounts` on chain `chain_id`.
    pub fn new(
        accounts: Vec<SigningAccount>,
        chain_id: u64,
        fees: Arc<FeeView>,
        blobs: Arc<BlobPool>,
        status: StatusSink,
        sign_time: Recorder,
        kill: Arc<KillSwitch>,
    ) -> Self {
        Self {
            accounts,
            chain_id,
            fees,
            blobs,
            status,
            sign_time,
            kill,
            scratch: Box::new([0u8; BLOB_SIZE]),
        }
    }

    fn fail(&self, msg: &IntentMsg, reason: Reason, detail: &str) {
        self.blobs.release(msg.data);
        self.status.send(StatusMsg::refusal(
            msg.seq,
            msg.origin,
            State::Failed,
            reason,
            detail,
            now_raw(),
        ));
    }
}

/// Fee cap and tip for a transaction: twice the current base fee plus the tip (room for
/// six blocks of maximal base-fee growth), capped by the desk's own cap when it gave one.
#[inline]
pub fn fees_for(base_fee: u128, tip: u128, desk_cap: u128) -> (u128, u128) {
    let mut max_fee = base_fee.saturating_mul(2).saturating_add(tip);
    if desk_cap != 0 && desk_cap < max_fee {
        max_fee = desk_cap;
    }
    (max_fee, tip.min(max_fee))
}

impl Stage for SigningStage {
    type In = IntentMsg;
    type Out = TxMsg;

    fn name(&self) -> &'static str {
        "signing"
    }

    #[inline]
    fn on_message<E: Emit<TxMsg>>(&mut self, msg: IntentMsg, out: &mut E) {
        // The kill switch freezes signing at once, also for intents policy let through
        // just before it was turned on (no nonce is used).
        if let Some(k) = self.kill.check(msg.account.0, msg.asset, None) {
            self.fail(&msg, Reason::KillSwitch, k.message());
            return;
        }
        let Some(raw) = self.blobs.claim() else {
            self.fail(
                &msg,
                Reason::Overloaded,
                "no buffer for the raw transaction",
            );
            return;
        };
        let Some(acct) = self.accounts.get(msg.account.0 as usize) else {
            // Policy lets no unknown account through; kept as a hard guard.
            self.blobs.release(raw);
            self.fail(&msg, Reason::UnknownAccount, "account is not configured");
            return;
        };
        let fee = self.fees.load();
        let (max_fee, tip) = fees_for(
            fee.base_fee_per_gas,
            fee.max_priority_fee_per_gas,
            msg.max_fee_cap,
        );
        let input: &[u8] = if msg.data.is_some() {
            // SAFETY: this stage holds the message, hence owns its calldata slot.
            unsafe { self.blobs.bytes(msg.data) }
        } else {
            &[]
        };
        let tx = Eip1559 {
            chain_id: self.chain_id,
            nonce: acct.next_nonce,
            max_priority_fee_per_gas: tip,
            max_fee_per_gas: max_fee,
            gas_limit: msg.gas_limit,
            to: msg.to,
            value: msg.value,
            input,
        };
        let Some(hash) = tx.signing_hash(&mut self.scratch[..]) else {
            self.blobs.release(raw);
            self.fail(&msg, Reason::Overloaded, "transaction larger than a buffer");
            return;
        };
        let t0 = now_raw();
        let sig = match acct.signer.sign_hash(&hash) {
            Ok(s) => s,
            Err(_) => {
                self.blobs.release(raw);
                self.fail(&msg, Reason::SignerError, "the account's signer failed");
                return;
            }
        };
        let t1 = now_raw();
        self.sign_time.record(ticks_to_ns(t0, t1));
        // SAFETY: `raw` was claimed above by this stage and not shared.
        let slot = unsafe { self.blobs.slot_mut(raw) };
        let Some((len, tx_hash)) = tx.encode_signed(&sig, &mut slot[..]) else {
            self.blobs.release(raw);
            self.fail(&msg, Reason::Overloaded, "transaction larger than a buffer");
            return;
        };
        let nonce = acct.next_nonce;
        let from = acct.from;
        self.blobs.release(msg.data);
        if let Some(a) = self.accounts.get_mut(msg.account.0 as usize) {
            a.next_nonce += 1;
        }
        self.status.send(StatusMsg {
            tx_hash,
            from,
            nonce,
            ..StatusMsg::event(msg.seq, msg.origin, State::Signed, t1)
        });
        out.emit(TxMsg {
            seq: msg.seq,
            origin: msg.origin,
            account: msg.account,
            nonce,
            tx_hash,
            raw: BlobRef {
                slot: raw.slot,
                len: len as u32,
            },
            asset: msg.asset,
            hops: msg.hops,
            ..TxMsg::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::fees_for;

    #[test]
    fn fee_rules() {
        assert_eq!(fees_for(10, 2, 0), (22, 2));
        assert_eq!(fees_for(10, 2, 15), (15, 2));
        assert_eq!(fees_for(10, 20, 15), (15, 15));
        assert_eq!(fees_for(u128::MAX, 1, 0), (u128::MAX, 1));
    }
}
