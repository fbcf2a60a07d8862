//! Validation of validator deposit data: the entries the staking deposit CLI writes to
//! `deposit_data.json`, checked before the engine builds a deposit transaction from them.
//!
//! Flow: [`parse_entries`] turns the desk's JSON into [`DepositEntry`] values (shape checks
//! only), [`verify_entry`] checks each one against the consensus specs (phase0 + electra) for
//! the configured network, and [`encode_deposit_call`] / [`encode_batch_call`] build the
//! calldata. [`DepositEntry::encode`] / [`DepositEntry::decode`] give a packed 256-byte form.
//!
//! Invariants:
//! - an entry that passes [`verify_entry`] for a fork version has: the fork version it states
//!   (if any) equal to that one; the deposit message root it states (if any) and its deposit
//!   data root equal to the SSZ roots recomputed from its fields; a public key that is a
//!   subgroup G1 point other than infinity; and a BLS signature by that key over
//!   `signing_root(deposit_message_root, deposit_domain(fork_version))`. That is what the
//!   beacon chain checks, so a verified deposit cannot be lost to a bad signature and the
//!   deposit contract will accept its `deposit_data_root`;
//! - nothing in this module panics on any input, and nothing uses `unsafe`;
//! - [`testkeys`] derives keys from caller-given bytes and is meant for tests and devnets only.
//!
//! Around that core, the engine's staking machinery: [`calls`] turns the packed entries an
//! intent carries into the transaction's calldata, [`verifier`] is the thread that runs
//! [`verify_entry`] for the policy stage, [`chain`] the thread that reads request fees and
//! deposit logs, and [`watch`] the validator watch on a beacon node. See docs/staking.md.

mod abi;
mod bls;
pub mod calls;
pub mod chain;
mod entry;
mod ssz;
pub mod testkeys;
pub mod verifier;
pub mod watch;

pub use calls::{MAX_PACKED_BYTES, entries_to_calldata, unpack};

/// The staking threads' counters and the request fees, for `/metrics`.
#[derive(Debug, Clone)]
pub struct StakingStats {
    /// The `staking-refresh` thread (logs, validators, errors, alerts).
    pub refresh: std::sync::Arc<chain::RefreshStats>,
    /// The `deposit-verify` thread.
    pub verifier: std::sync::Arc<verifier::VerifierStats>,
    /// The request fees in force.
    pub fees: std::sync::Arc<crate::risk::staking::RequestFees>,
}

pub use abi::{
    BATCH_DEPOSIT_SELECTOR, DEPOSIT_CALL_BYTES, DEPOSIT_SELECTOR, batch_call_len, batch_value_wei,
    deposit_value_wei, encode_batch_call, encode_deposit_call,
};
pub use bls::{DST, pubkey_is_valid};
pub use entry::{
    DEPOSIT_ENTRY_BYTES, DepositEntry, EntryError, max_effective_balance_gwei, parse_entries,
};
pub use ssz::{
    DOMAIN_DEPOSIT, deposit_data_root, deposit_domain, deposit_message_root, signing_root,
};

/// Most deposits one intent (and so one transaction) may carry.
pub const MAX_DEPOSITS_PER_INTENT: usize = 12;
/// Smallest deposit the deposit contract accepts: 1 ETH.
pub const MIN_DEPOSIT_GWEI: u64 = 1_000_000_000;
/// Maximum effective balance of a validator with `0x00`/`0x01` credentials: 32 ETH.
pub const MAX_EFFECTIVE_BALANCE_0X01_GWEI: u64 = 32_000_000_000;
/// Maximum effective balance of a validator with compounding `0x02` credentials: 2048 ETH.
pub const MAX_EFFECTIVE_BALANCE_0X02_GWEI: u64 = 2_048_000_000_000;

/// Genesis fork versions of the public networks, as the deposit CLI uses them.
pub mod fork_versions {
    /// Ethereum mainnet.
    pub const MAINNET: [u8; 4] = [0x00, 0x00, 0x00, 0x00];
    /// Sepolia testnet.
    pub const SEPOLIA: [u8; 4] = [0x90, 0x00, 0x00, 0x69];
    /// Holesky testnet.
    pub const HOLESKY: [u8; 4] = [0x01, 0x01, 0x70, 0x00];
    /// Hoodi testnet.
    pub const HOODI: [u8; 4] = [0x10, 0x00, 0x09, 0x10];
}

/// Which check failed, with a stable name for messages ("fork_version",
/// "deposit_message_root", "deposit_data_root", "pubkey", "signature").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("{}", self.message())]
pub enum CryptoCheck {
    /// The entry's `fork_version` is not the configured network's.
    ForkVersion,
    /// The entry's `deposit_message_root` is not the SSZ root of its fields.
    DepositMessageRoot,
    /// The entry's `deposit_data_root` is not the SSZ root of its fields.
    DepositDataRoot,
    /// The public key is not a usable BLS12-381 G1 point.
    Pubkey,
    /// The signature does not verify.
    Signature,
}

impl CryptoCheck {
    /// The stable name of the checked field.
    pub fn name(&self) -> &'static str {
        match self {
            Self::ForkVersion => "fork_version",
            Self::DepositMessageRoot => "deposit_message_root",
            Self::DepositDataRoot => "deposit_data_root",
            Self::Pubkey => "pubkey",
            Self::Signature => "signature",
        }
    }

    /// A full sentence saying what failed.
    pub fn message(&self) -> &'static str {
        match self {
            Self::ForkVersion => {
                "fork_version does not match the genesis fork version of the configured network"
            }
            Self::DepositMessageRoot => {
                "deposit_message_root does not match the recomputed SSZ root"
            }
            Self::DepositDataRoot => "deposit_data_root does not match the recomputed SSZ root",
            Self::Pubkey => {
                "pubkey is not a compressed BLS12-381 G1 point in the subgroup other than infinity"
            }
            Self::Signature => {
                "signature does not verify for pubkey over the deposit signing root of this network"
            }
        }
    }
}

/// Verifies, in this order: `fork_version` (if given) equals `fork_version`;
/// `deposit_message_root` (if given) equals the recomputed one; `deposit_data_root` equals the
/// recomputed one; the pubkey decodes to a valid G1 point in the subgroup and not infinity;
/// the BLS signature over `signing_root(deposit_message_root, deposit_domain(fork_version))`
/// verifies. The first failing check is returned.
pub fn verify_entry(e: &DepositEntry, fork_version: [u8; 4]) -> Result<(), CryptoCheck> {
    if e.fork_version.is_some_and(|stated| stated != fork_version) {
        return Err(CryptoCheck::ForkVersion);
    }
    let message_root = deposit_message_root(&e.pubkey, &e.withdrawal_credentials, e.amount_gwei);
    if e.deposit_message_root
        .is_some_and(|stated| stated != message_root)
    {
        return Err(CryptoCheck::DepositMessageRoot);
    }
    let data_root = deposit_data_root(
        &e.pubkey,
        &e.withdrawal_credentials,
        e.amount_gwei,
        &e.signature,
    );
    if e.deposit_data_root != data_root {
        return Err(CryptoCheck::DepositDataRoot);
    }
    if !bls::pubkey_is_valid(&e.pubkey) {
        return Err(CryptoCheck::Pubkey);
    }
    let message = signing_root(&message_root, &deposit_domain(fork_version));
    if !bls::verify(&e.pubkey, &message, &e.signature) {
        return Err(CryptoCheck::Signature);
    }
    Ok(())
}

/// [`verify_entry`] over a list: the index and check of the first entry that fails.
pub fn verify_entries(
    entries: &[DepositEntry],
    fork_version: [u8; 4],
) -> Result<(), (usize, CryptoCheck)> {
    entries
        .iter()
        .enumerate()
        .try_for_each(|(i, e)| verify_entry(e, fork_version).map_err(|check| (i, check)))
}

/// The execution address in withdrawal credentials: `Some((prefix, address))` for `0x01` and
/// `0x02` credentials whose bytes 1..12 are zero, `None` for any other prefix or padding.
pub fn withdrawal_address(wc: &[u8; 32]) -> Option<(u8, [u8; 20])> {
    let (&prefix, rest) = wc.split_first()?;
    let (padding, address) = rest.split_at(11);
    if !matches!(prefix, 0x01 | 0x02) || padding.iter().any(|b| *b != 0) {
        return None;
    }
    Some((prefix, address.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors: deposit_data files produced by the staking deposit CLIs, as
    /// committed to Lighthouse's validator_manager test vectors (mnemonic
    /// "test test test test test test test test test test test waste", validator index 0).
    struct Vector {
        json: &'static str,
        fork: [u8; 4],
    }

    /// `mainnet_first_0_count_1_eth1_false` (staking-deposit-cli 2.3.0, 0x00 credentials).
    const MAINNET_BLS: Vector = Vector {
        json: r#"[{"pubkey": "88b6b3a9b391fa5593e8bce8d06102df1a56248368086929709fbb4a8570dc6a560febeef8159b19789e9c1fd13572f0", "withdrawal_credentials": "0049b6188ed20314309f617dd4030b8ddfac3c6e65759a03c226a13b2fe4cc72", "amount": 32000000000, "signature": "8ac88247c1b431a2d1eb2c5f00e7b8467bc21d6dc267f1af9ef727a12e32b4299e3b289ae5734a328b3202478dd746a80bf9e15a2217240dca1fc1b91a6b7ff7a0f5830d9a2610c1c30f19912346271357c21bd9af35a74097ebbdda2ddaf491", "deposit_message_root": "a9bc1d21cc009d9b10782a07213e37592c0d235463ed0117dec755758da90d51", "deposit_data_root": "807a20b2801eabfd9065c1b74ed6ae3e991a1ab770e4eaf268f30b37cfd2cbd7", "fork_version": "00000000", "network_name": "mainnet", "deposit_cli_version": "2.3.0"}]"#,
        fork: fork_versions::MAINNET,
    };

    /// `hoodi_first_0_count_2_prefix_0x01_eth1_true`, first entry (ethstaker-deposit-cli
    /// 1.3.0, 0x01 credentials to 0x0f51bb10119727a7e5ea3538074fb341f56b09ad).
    const HOODI_0X01: Vector = Vector {
        json: r#"[{"pubkey": "88b6b3a9b391fa5593e8bce8d06102df1a56248368086929709fbb4a8570dc6a560febeef8159b19789e9c1fd13572f0", "withdrawal_credentials": "0100000000000000000000000f51bb10119727a7e5ea3538074fb341f56b09ad", "amount": 32000000000, "signature": "95db3dcba68c61c0a934e1cb36bb093867d92fc5c62f2c9f45fbacef290bb491fa0589cf356680f61a7b0ba06b7e776311eb0e96841f053c05f7ee41d32731001f9def95078b2e8d293e1b6d38d1d231245def298c480861beee891a3b314743", "deposit_message_root": "62967565d11471da4af7769911926cd1826124048036b25616216f99bc320f13", "deposit_data_root": "8224b6bcce0d2c0b34cca87ecb0bb0ff1e2c865ac6c5d6c0c3e5cd17affe45ad", "fork_version": "10000910", "network_name": "hoodi", "deposit_cli_version": "1.3.0"}]"#,
        fork: fork_versions::HOODI,
    };

    /// `mainnet_first_0_count_2_prefix_0x02_eth1_true`, first entry (ethstaker-deposit-cli
    /// 1.3.0, compounding 0x02 credentials).
    const MAINNET_0X02: Vector = Vector {
        json: r#"[{"pubkey": "88b6b3a9b391fa5593e8bce8d06102df1a56248368086929709fbb4a8570dc6a560febeef8159b19789e9c1fd13572f0", "withdrawal_credentials": "0200000000000000000000000f51bb10119727a7e5ea3538074fb341f56b09ad", "amount": 32000000000, "signature": "875a333c3043137d8964344ccfb20a84fbb7c47de4b8363fe32ff73a4dcd0c03aa11fc3f972760cd8e7b9c5e7a66c4f80963c6cfe63a3a5e02a26fa7c4c774d72c7c9cb3e872349ebf6bb63c2072519c943c583bd7cf44728345427707267a70", "deposit_message_root": "aaf9657acb2afbf35942a2d9086564e48ef8a78b9697eed2810cf80de1452b40", "deposit_data_root": "56abc02a8a4af5369cfb4a84b3596d279432cec74c30527dc56eb4fedc1b970c", "fork_version": "00000000", "network_name": "mainnet", "deposit_cli_version": "1.3.0"}]"#,
        fork: fork_versions::MAINNET,
    };

    const ADDRESS: [u8; 20] = [
        0x0f, 0x51, 0xbb, 0x10, 0x11, 0x97, 0x27, 0xa7, 0xe5, 0xea, 0x35, 0x38, 0x07, 0x4f, 0xb3,
        0x41, 0xf5, 0x6b, 0x09, 0xad,
    ];

    fn only(v: &Vector) -> DepositEntry {
        let entries = parse_entries(v.json).unwrap();
        assert_eq!(entries.len(), 1);
        entries[0]
    }

    #[test]
    fn known_answer_vectors_recompute_and_verify() {
        for v in [&MAINNET_BLS, &HOODI_0X01, &MAINNET_0X02] {
            let e = only(v);
            assert_eq!(
                Some(deposit_message_root(
                    &e.pubkey,
                    &e.withdrawal_credentials,
                    e.amount_gwei
                )),
                e.deposit_message_root
            );
            assert_eq!(
                deposit_data_root(
                    &e.pubkey,
                    &e.withdrawal_credentials,
                    e.amount_gwei,
                    &e.signature
                ),
                e.deposit_data_root
            );
            assert_eq!(e.fork_version, Some(v.fork));
            assert_eq!(verify_entry(&e, v.fork), Ok(()));
        }
    }

    #[test]
    fn known_answer_vectors_withdrawal_addresses() {
        assert_eq!(
            withdrawal_address(&only(&MAINNET_BLS).withdrawal_credentials),
            None
        );
        assert_eq!(
            withdrawal_address(&only(&HOODI_0X01).withdrawal_credentials),
            Some((0x01, ADDRESS))
        );
        assert_eq!(
            withdrawal_address(&only(&MAINNET_0X02).withdrawal_credentials),
            Some((0x02, ADDRESS))
        );
    }

    #[test]
    fn known_answer_signature_is_bound_to_its_network() {
        let mut e = only(&HOODI_0X01);
        assert_eq!(
            verify_entry(&e, fork_versions::MAINNET),
            Err(CryptoCheck::ForkVersion)
        );
        e.fork_version = None;
        assert_eq!(
            verify_entry(&e, fork_versions::MAINNET),
            Err(CryptoCheck::Signature)
        );
        assert_eq!(verify_entry(&e, fork_versions::HOODI), Ok(()));
    }

    fn valid() -> DepositEntry {
        let mut wc = [0u8; 32];
        wc[0] = 0x01;
        wc[12..].copy_from_slice(&ADDRESS);
        testkeys::make_entry(&[0x5a; 32], wc, 32_000_000_000, fork_versions::HOODI)
    }

    /// Recomputes both roots so that only the later checks can fail.
    fn reroot(mut e: DepositEntry) -> DepositEntry {
        e.deposit_message_root = Some(deposit_message_root(
            &e.pubkey,
            &e.withdrawal_credentials,
            e.amount_gwei,
        ));
        e.deposit_data_root = deposit_data_root(
            &e.pubkey,
            &e.withdrawal_credentials,
            e.amount_gwei,
            &e.signature,
        );
        e
    }

    #[test]
    fn make_entry_verifies() {
        let e = valid();
        assert_eq!(verify_entry(&e, fork_versions::HOODI), Ok(()));
        assert_eq!(e.pubkey, testkeys::pubkey(&[0x5a; 32]));
        assert_eq!(
            withdrawal_address(&e.withdrawal_credentials),
            Some((1, ADDRESS))
        );
        assert_eq!(verify_entries(&[e, e], fork_versions::HOODI), Ok(()));
    }

    #[test]
    fn each_broken_field_fails_its_own_check() {
        let hoodi = fork_versions::HOODI;
        let good = valid();

        let mut e = good;
        e.fork_version = Some(fork_versions::MAINNET);
        assert_eq!(verify_entry(&e, hoodi), Err(CryptoCheck::ForkVersion));
        assert_eq!(
            verify_entry(&good, fork_versions::SEPOLIA),
            Err(CryptoCheck::ForkVersion)
        );

        let mut e = good;
        if let Some(root) = e.deposit_message_root.as_mut() {
            root[7] ^= 0x01;
        }
        assert_eq!(
            verify_entry(&e, hoodi),
            Err(CryptoCheck::DepositMessageRoot)
        );

        let mut e = good;
        e.deposit_data_root[31] ^= 0x80;
        assert_eq!(verify_entry(&e, hoodi), Err(CryptoCheck::DepositDataRoot));

        // A different amount than the roots were computed for.
        let mut e = good;
        e.amount_gwei += 1;
        assert_eq!(
            verify_entry(&e, hoodi),
            Err(CryptoCheck::DepositMessageRoot)
        );
        e.deposit_message_root = None;
        assert_eq!(verify_entry(&e, hoodi), Err(CryptoCheck::DepositDataRoot));
        // With both roots matching the new amount, the signature no longer covers it.
        assert_eq!(verify_entry(&reroot(e), hoodi), Err(CryptoCheck::Signature));

        // Another network, with no fork version stated: only the signature can tell.
        let mut e = good;
        e.fork_version = None;
        assert_eq!(
            verify_entry(&e, fork_versions::MAINNET),
            Err(CryptoCheck::Signature)
        );

        // A signature over the same message by another key.
        let other = testkeys::make_entry(
            &[0x77; 32],
            good.withdrawal_credentials,
            32_000_000_000,
            hoodi,
        );
        let mut e = good;
        e.signature = other.signature;
        assert_eq!(verify_entry(&e, hoodi), Err(CryptoCheck::DepositDataRoot));
        assert_eq!(verify_entry(&reroot(e), hoodi), Err(CryptoCheck::Signature));

        // Signature bytes that do not decode.
        let mut e = good;
        e.signature = [0u8; 96];
        assert_eq!(verify_entry(&reroot(e), hoodi), Err(CryptoCheck::Signature));
    }

    /// Variants of a valid key with the last byte changed, sorted by how `blst` sees them.
    fn altered_pubkeys() -> (Option<[u8; 48]>, Option<[u8; 48]>) {
        let base = valid().pubkey;
        let (mut off_curve, mut off_subgroup) = (None, None);
        for last in 0..=u8::MAX {
            let mut pk = base;
            pk[47] = last;
            match blst::min_pk::PublicKey::uncompress(&pk) {
                Err(_) => off_curve = off_curve.or(Some(pk)),
                Ok(p) if p.validate().is_err() => off_subgroup = off_subgroup.or(Some(pk)),
                Ok(_) => {}
            }
        }
        (off_curve, off_subgroup)
    }

    #[test]
    fn bad_pubkeys_fail_the_pubkey_check() {
        let (off_curve, off_subgroup) = altered_pubkeys();
        let mut infinity = [0u8; 48];
        infinity[0] = 0xc0;
        let uncompressed_flag_missing = {
            let mut pk = valid().pubkey;
            pk[0] &= 0x7f;
            pk
        };
        let cases = [
            off_curve.expect("some last byte gives an x with no curve point"),
            off_subgroup.expect("some last byte gives a point outside the subgroup"),
            infinity,
            uncompressed_flag_missing,
            [0u8; 48],
        ];
        for pubkey in cases {
            let mut e = valid();
            e.pubkey = pubkey;
            assert_eq!(
                verify_entry(&reroot(e), fork_versions::HOODI),
                Err(CryptoCheck::Pubkey),
                "{}",
                hex::encode(pubkey)
            );
            assert!(!pubkey_is_valid(&pubkey));
        }
    }

    #[test]
    fn verify_entries_reports_the_first_failing_index() {
        let good = valid();
        let mut bad = good;
        bad.deposit_data_root = [0u8; 32];
        assert_eq!(
            verify_entries(&[good, bad, bad], fork_versions::HOODI),
            Err((1, CryptoCheck::DepositDataRoot))
        );
    }

    #[test]
    fn check_names_and_messages() {
        let all = [
            CryptoCheck::ForkVersion,
            CryptoCheck::DepositMessageRoot,
            CryptoCheck::DepositDataRoot,
            CryptoCheck::Pubkey,
            CryptoCheck::Signature,
        ];
        let names = [
            "fork_version",
            "deposit_message_root",
            "deposit_data_root",
            "pubkey",
            "signature",
        ];
        for (check, name) in all.into_iter().zip(names) {
            assert_eq!(check.name(), name);
            assert!(check.message().starts_with(name), "{}", check.message());
            assert_eq!(check.to_string(), check.message());
        }
        assert_eq!(
            CryptoCheck::DepositDataRoot.message(),
            "deposit_data_root does not match the recomputed SSZ root"
        );
    }

    #[test]
    fn withdrawal_address_rules() {
        let mut wc = [0u8; 32];
        wc[12..].copy_from_slice(&ADDRESS);
        for (prefix, expected) in [
            (0x00, None),
            (0x01, Some((0x01, ADDRESS))),
            (0x02, Some((0x02, ADDRESS))),
            (0x03, None),
            (0xff, None),
        ] {
            wc[0] = prefix;
            assert_eq!(withdrawal_address(&wc), expected, "prefix {prefix:#04x}");
        }
        for i in 1..12 {
            let mut bad = wc;
            bad[0] = 0x01;
            bad[i] = 1;
            assert_eq!(withdrawal_address(&bad), None, "padding byte {i}");
        }
    }
}
