//! The PKCS#11 backend against a real SoftHSM2 token (see `support/softhsm.rs`: every test runs
//! in a child process of its own with a fresh token store in a temporary directory).
#![cfg(feature = "hsm")]

#[path = "support/softhsm.rs"]
mod softhsm;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy_consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy_eips::eip2718::Encodable2718;
use alloy_primitives::{Address, B256, TxKind, U256, keccak256};
use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use k256::elliptic_curve::sec1::ToEncodedPoint;
use signers::hsm::cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass};
use signers::hsm::{AuthPin, HsmConfig, HsmSigner, parse_ec_point};
use signers::{Backend, Signer, SignerError};
use softhsm::{Token, USER_PIN, isolated};

fn half_n() -> U256 {
    U256::from_str("0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0").unwrap()
}

fn hash_of(i: u64) -> B256 {
    keccak256(i.to_be_bytes())
}

/// A token with one generated key, and a signer on it.
fn token_with_key(key_label: &str, sessions: usize) -> (Token, HsmSigner) {
    let token = Token::init(softhsm::TOKEN_LABEL);
    let address = HsmSigner::generate_key(&token.config(key_label, sessions)).unwrap();
    let signer = HsmSigner::open(&token.config(key_label, sessions)).unwrap();
    assert_eq!(signer.address(), address);
    (token, signer)
}

#[test]
fn generates_the_key_inside_the_token_and_it_cannot_be_read_out() {
    isolated(
        "generates_the_key_inside_the_token_and_it_cannot_be_read_out",
        || {
            let (token, signer) = token_with_key("hot-1", 2);
            assert_eq!(signer.backend(), Backend::Hsm);
            assert_eq!(signer.key_id(), "hot-1");
            assert_eq!(signer.token_label(), softhsm::TOKEN_LABEL);
            assert_eq!(signer.pool_size(), 2);

            // Look at the objects through a session of our own.
            let session = token.ctx.open_ro_session(token.slot()).unwrap();
            softhsm::login_user(&session);
            let find = |class| {
                session
                    .find_objects(&[
                        Attribute::Class(class),
                        Attribute::KeyType(KeyType::EC),
                        Attribute::Label(b"hot-1".to_vec()),
                    ])
                    .unwrap()
            };
            let private = find(ObjectClass::PRIVATE_KEY);
            let public = find(ObjectClass::PUBLIC_KEY);
            assert_eq!((private.len(), public.len()), (1, 1));

            let attrs = session
                .get_attributes(
                    private[0],
                    &[
                        AttributeType::Token,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::Sign,
                        AttributeType::EcParams,
                    ],
                )
                .unwrap();
            for expected in [
                Attribute::Token(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::EcParams(signers::hsm::SECP256K1_EC_PARAMS.to_vec()),
            ] {
                assert!(attrs.contains(&expected), "{expected:?} not in {attrs:?}");
            }
            // CKA_VALUE of a sensitive key is unavailable: the module answers
            // CKR_ATTRIBUTE_SENSITIVE and cryptoki leaves the attribute out.
            let value = session
                .get_attributes(private[0], &[AttributeType::Value])
                .unwrap();
            assert!(
                value.is_empty(),
                "the private scalar was readable: {} attribute(s)",
                value.len()
            );
            let info = session
                .get_attribute_info(private[0], &[AttributeType::Value])
                .unwrap();
            assert!(
                format!("{info:?}").contains("Sensitive"),
                "CKA_VALUE is not reported sensitive: {info:?}"
            );

            // The address is that of the public key object.
            let point = session
                .get_attributes(public[0], &[AttributeType::EcPoint])
                .unwrap();
            let Some(Attribute::EcPoint(point)) = point.into_iter().next() else {
                panic!("no CKA_EC_POINT");
            };
            assert_eq!(
                point.len(),
                67,
                "SoftHSM wraps the point in an OCTET STRING"
            );
            let public = parse_ec_point(&point).unwrap();
            let encoded = public.to_encoded_point(false);
            assert_eq!(
                signer.address(),
                Address::from_raw_public_key(&encoded.as_bytes()[1..])
            );

            // A second key with the same label is refused.
            let err = HsmSigner::generate_key(&token.config("hot-1", 1)).unwrap_err();
            assert!(
                matches!(&err, SignerError::Config { what, .. } if what.contains("hot-1")),
                "{err}"
            );
        },
    );
}

#[test]
fn recovery_id_is_right_for_many_hashes() {
    isolated("recovery_id_is_right_for_many_hashes", || {
        let (_token, signer) = token_with_key("hot-2", 1);
        let mut parity = [0usize; 2];
        for i in 0..400u64 {
            let hash = hash_of(i);
            let sig = signer.sign_hash_checked(&hash).unwrap();
            assert!(sig.s() <= half_n(), "high s for hash {i}");
            parity[usize::from(sig.v())] += 1;
            // And independently of our own check: alloy's recovery agrees.
            assert_eq!(
                sig.recover_address_from_prehash(&hash).unwrap(),
                signer.address()
            );
        }
        assert!(parity[0] > 120 && parity[1] > 120, "{parity:?}");
    });
}

#[test]
fn signs_from_many_threads_through_a_small_pool() {
    isolated("signs_from_many_threads_through_a_small_pool", || {
        let (_token, signer) = token_with_key("hot-3", 2);
        let signer = Arc::new(signer);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let signer = Arc::clone(&signer);
                std::thread::spawn(move || {
                    for i in 0..100u64 {
                        signer.sign_hash_checked(&hash_of(t * 1_000 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    });
}

#[test]
fn recovers_when_logged_out_behind_its_back() {
    isolated("recovers_when_logged_out_behind_its_back", || {
        let (token, signer) = token_with_key("hot-4", 2);
        signer.sign_hash_checked(&hash_of(1)).unwrap();
        // Login state is per token and process: a logout in any session logs out all.
        let session = token.ctx.open_ro_session(token.slot()).unwrap();
        session.logout().unwrap();
        for i in 0..10 {
            signer.sign_hash_checked(&hash_of(100 + i)).unwrap();
        }
        // And again, once the pool has been repaired.
        session.logout().unwrap();
        signer.sign_hash_checked(&hash_of(200)).unwrap();
    });
}

#[test]
fn recovers_when_the_library_is_finalised_behind_its_back() {
    isolated(
        "recovers_when_the_library_is_finalised_behind_its_back",
        || {
            let (token, signer) = token_with_key("hot-5", 3);
            let address = signer.address();
            signer.sign_hash_checked(&hash_of(1)).unwrap();

            // C_Finalize through a second handle on the same module closes every session of the
            // process: the signer then sees CKR_CRYPTOKI_NOT_INITIALIZED.
            token.ctx.clone().finalize().unwrap();
            for i in 0..6 {
                signer.sign_hash_checked(&hash_of(10 + i)).unwrap();
            }

            // C_Finalize and C_Initialize again: old session handles are invalid
            // (CKR_SESSION_HANDLE_INVALID) and every pooled session has to be replaced.
            token.ctx.clone().finalize().unwrap();
            softhsm::initialize(&token.ctx).unwrap();
            for i in 0..6 {
                signer.sign_hash_checked(&hash_of(20 + i)).unwrap();
            }
            assert_eq!(signer.address(), address);
        },
    );
}

#[test]
fn a_vanished_token_is_reported_unavailable() {
    isolated("a_vanished_token_is_reported_unavailable", || {
        let (token, signer) = token_with_key("hot-6", 2);
        signer.sign_hash_checked(&hash_of(1)).unwrap();

        // Delete the token's files from the store. SoftHSM notices on the next call: the
        // objects are gone (the key handle is invalid and the key cannot be found again).
        let tokens = softhsm::store_dir().join("tokens");
        for entry in std::fs::read_dir(&tokens).unwrap() {
            std::fs::remove_dir_all(entry.unwrap().path()).unwrap();
        }
        let err = signer.sign_hash(&hash_of(2)).unwrap_err();
        assert!(
            matches!(&err, SignerError::Unavailable { key_id, reason }
                if key_id == "hot-6" && reason.contains(softhsm::TOKEN_LABEL)
                    && reason.contains("hot-6")),
            "{err}"
        );

        // Then make the module rescan (SoftHSM reads the token directory at C_Initialize):
        // to the signer the HSM has restarted without the token.
        token.ctx.clone().finalize().unwrap();
        softhsm::initialize(&token.ctx).unwrap();

        let err = signer.sign_hash(&hash_of(3)).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, SignerError::Unavailable { key_id, reason }
                if key_id == "hot-6" && reason.contains(softhsm::TOKEN_LABEL)
                    && reason.contains("no longer present")),
            "{text}"
        );
        assert!(!text.contains(USER_PIN), "{text}");
        // It stays a clear error, call after call.
        let again = signer.sign_hash(&hash_of(4)).unwrap_err();
        assert!(matches!(again, SignerError::Unavailable { .. }), "{again}");
    });
}

#[test]
fn a_deleted_key_is_reported_unavailable() {
    isolated("a_deleted_key_is_reported_unavailable", || {
        let (token, signer) = token_with_key("hot-7", 1);
        signer.sign_hash_checked(&hash_of(1)).unwrap();
        let session = token.ctx.open_rw_session(token.slot()).unwrap();
        softhsm::login_user(&session);
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            for h in session
                .find_objects(&[Attribute::Class(class), Attribute::Label(b"hot-7".to_vec())])
                .unwrap()
            {
                session.destroy_object(h).unwrap();
            }
        }
        let err = signer.sign_hash(&hash_of(2)).unwrap_err();
        assert!(
            matches!(&err, SignerError::Unavailable { reason, .. } if reason.contains("hot-7")),
            "{err}"
        );
    });
}

#[test]
fn bad_configuration_names_what_is_wrong() {
    isolated("bad_configuration_names_what_is_wrong", || {
        let token = Token::init(softhsm::TOKEN_LABEL);
        let good = token.config("cold-1", 2);
        HsmSigner::generate_key(&good).unwrap();

        let config_err = |cfg: &HsmConfig| -> (String, String) {
            match HsmSigner::open(cfg) {
                Err(SignerError::Config { what, reason }) => (what, reason),
                Err(e) => panic!("expected a configuration error, got {e}"),
                Ok(s) => panic!("opened with a bad config: {s:?}"),
            }
        };

        // Wrong PIN (nobody in this process is logged in to the token, so it is checked).
        let wrong_pin = HsmConfig {
            user_pin: AuthPin::from("not-the-pin-5551"),
            ..good.clone()
        };
        let (what, reason) = config_err(&wrong_pin);
        assert!(
            what.contains("PIN") && what.contains(softhsm::TOKEN_LABEL),
            "{what}: {reason}"
        );
        assert!(reason.contains("incorrect"), "{what}: {reason}");
        let text = HsmSigner::open(&wrong_pin).unwrap_err().to_string();
        assert!(
            !text.contains("not-the-pin") && !text.contains(USER_PIN),
            "{text}"
        );

        // Missing token label.
        let (what, reason) = config_err(&HsmConfig {
            token_label: "no-such-token".into(),
            ..good.clone()
        });
        assert!(what.contains("no-such-token"), "{what}: {reason}");
        assert!(
            reason.contains(softhsm::TOKEN_LABEL),
            "lists tokens present: {reason}"
        );

        // Missing key label.
        let (what, reason) = config_err(&HsmConfig {
            key_label: "no-such-key".into(),
            ..good.clone()
        });
        assert!(
            what.contains("no-such-key") && what.contains(softhsm::TOKEN_LABEL),
            "{what}: {reason}"
        );

        // Wrong module path, and a module path that is not a PKCS#11 library.
        let (what, reason) = config_err(&HsmConfig {
            module_path: "/nonexistent/libpkcs11.so".into(),
            ..good.clone()
        });
        assert!(
            what.contains("/nonexistent/libpkcs11.so"),
            "{what}: {reason}"
        );
        let not_a_module = softhsm::store_dir().join("softhsm2.conf");
        let (what, reason) = config_err(&HsmConfig {
            module_path: not_a_module.clone(),
            ..good.clone()
        });
        assert!(
            what.contains(&not_a_module.display().to_string()) && reason.contains("load"),
            "{what}: {reason}"
        );

        // An empty pool.
        let (what, _) = config_err(&HsmConfig {
            sessions: 0,
            ..good.clone()
        });
        assert_eq!(what, "sessions");

        // And the good config still works after all that.
        let signer = HsmSigner::open(&good).unwrap();
        signer.sign_hash_checked(&hash_of(1)).unwrap();
    });
}

#[test]
fn debug_output_never_contains_the_pin() {
    isolated("debug_output_never_contains_the_pin", || {
        let (token, signer) = token_with_key("hot-8", 1);
        let cfg = token.config("hot-8", 1);
        for text in [format!("{cfg:?}"), format!("{signer:?}")] {
            assert!(!text.contains(USER_PIN), "{text}");
            assert!(text.contains("hot-8"), "{text}");
        }
    });
}

#[test]
fn an_hsm_signed_eip1559_transfer_is_mined_by_anvil() {
    isolated("an_hsm_signed_eip1559_transfer_is_mined_by_anvil", || {
        let (_token, signer) = token_with_key("hot-9", 1);
        let anvil = venues::Anvil::spawn(&venues::AnvilConfig::default())
            .unwrap_or_else(|e| panic!("cannot start anvil (did scripts/setup.sh run?): {e}"));
        let mut rpc = anvil.rpc().unwrap();
        let chain_id = anvil.chain_id();
        let fees = rpc.fee_estimate().unwrap();
        let wait_receipt = |rpc: &mut venues::RpcClient, hash: B256| {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(r) = rpc.receipt(hash).unwrap() {
                    return r;
                }
                assert!(Instant::now() < deadline, "no receipt for {hash}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let transfer = |nonce: u64, to: Address, value: U256| TxEip1559 {
            chain_id,
            nonce,
            gas_limit: 21_000,
            max_fee_per_gas: fees.suggested_max_fee_per_gas(),
            max_priority_fee_per_gas: fees.max_priority_fee_per_gas,
            to: TxKind::Call(to),
            value,
            access_list: Default::default(),
            input: Default::default(),
        };

        // Fund the HSM's address from dev account 0.
        let dev = PrivateKeySigner::from_str(venues::DEV_PRIVATE_KEYS[0]).unwrap();
        let one_eth = U256::from(10u64).pow(U256::from(18));
        let fund = transfer(0, signer.address(), one_eth);
        let sig = dev.sign_hash_sync(&fund.signature_hash()).unwrap();
        let envelope: TxEnvelope = fund.into_signed(sig).into();
        let hash = rpc.send_raw_transaction(&envelope.encoded_2718()).unwrap();
        assert!(wait_receipt(&mut rpc, hash).success);
        assert_eq!(rpc.balance(signer.address()).unwrap(), one_eth);

        // Send from the HSM's address, signed inside the token.
        let to = venues::DEV_ADDRESSES[1];
        let before = rpc.balance(to).unwrap();
        let value = U256::from(12_345_678_900u64);
        let tx = transfer(0, to, value);
        let sig = signer.sign_hash(&tx.signature_hash()).unwrap();
        let envelope: TxEnvelope = tx.into_signed(sig).into();
        let raw = envelope.encoded_2718();
        let hash = rpc.send_raw_transaction(&raw).unwrap();
        assert_eq!(hash, *envelope.tx_hash());
        let receipt = wait_receipt(&mut rpc, hash);
        assert!(receipt.success, "{receipt:?}");
        assert_eq!(receipt.from, signer.address());
        assert_eq!(receipt.to, Some(to));
        assert_eq!(rpc.balance(to).unwrap(), before + value);
        assert_eq!(
            rpc.transaction_count(signer.address(), "latest").unwrap(),
            1
        );
    });
}
