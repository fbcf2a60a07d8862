//! The AWS KMS backend against a real moto KMS server (see `support/moto.rs` for how it is
//! started and why `scripts/moto_kms_server.py` corrects moto's `MessageType=DIGEST`), and the
//! [`AsyncWorker`] that drives async signers beside a synchronous stage.
#![cfg(feature = "kms")]

#[path = "support/moto.rs"]
mod moto;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use alloy_consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy_eips::eip2718::Encodable2718;
use alloy_primitives::{Address, B256, Signature, TxKind, U256, keccak256};
use alloy_signer::SignerSync;
use alloy_signer_local::PrivateKeySigner;
use k256::ecdsa::VerifyingKey;
use k256::ecdsa::signature::hazmat::PrehashVerifier;
use k256::pkcs8::DecodePublicKey;
use moto::Moto;
use signers::kms::aws_sdk_kms::primitives::Blob;
use signers::kms::aws_sdk_kms::types::{KeySpec, KeyUsageType, MessageType, SigningAlgorithmSpec};
use signers::kms::{KmsConfig, KmsSigner};
use signers::worker::{AsyncWorker, AsyncWorkerConfig, Completion, SubmitError};
use signers::{AsyncSigner, Backend, LocalCurve, LocalSigner, SignFuture, Signer, SignerError};

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(60);

fn half_n() -> U256 {
    U256::from_str("0x7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0").unwrap()
}

fn hash_of(i: u64) -> B256 {
    keccak256(i.to_be_bytes())
}

/// The key's public key and address, read with a raw `GetPublicKey` and derived here
/// independently of the signer.
async fn raw_public_key(signer: &KmsSigner) -> (VerifyingKey, Address) {
    let out = signer
        .client()
        .get_public_key()
        .key_id(signer.key_id())
        .send()
        .await
        .unwrap();
    let vk = VerifyingKey::from_public_key_der(out.public_key().unwrap().as_ref()).unwrap();
    let point = vk.to_encoded_point(false);
    let digest = keccak256(&point.as_bytes()[1..]);
    (vk, Address::from_slice(&digest[12..]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_recover_to_the_address_from_get_public_key() {
    let moto = Moto::spawn();
    let signer = KmsSigner::create(&moto.config(""), "recover test")
        .await
        .unwrap();
    assert_eq!(signer.backend(), Backend::Kms);
    let (vk, address) = raw_public_key(&signer).await;
    assert_eq!(signer.address(), address);
    assert_eq!(signer.public_key(), k256::PublicKey::from(&vk));

    let mut parities = [0usize; 2];
    for i in 0..64 {
        let hash = hash_of(i);
        let sig = signer.sign_hash_async(hash).await.unwrap();
        assert_eq!(
            sig.recover_address_from_prehash(&hash).unwrap(),
            address,
            "hash {i}"
        );
        assert!(sig.s() <= half_n(), "high s for hash {i}");
        let k = k256::ecdsa::Signature::from_scalars(sig.r().to_be_bytes(), sig.s().to_be_bytes())
            .unwrap();
        vk.verify_prehash(hash.as_slice(), &k).unwrap();
        parities[usize::from(sig.v())] += 1;
    }
    // Both recovery ids occur: the parity is computed, not assumed.
    assert!(parities[0] > 0 && parities[1] > 0, "{parities:?}");
    // Debug names the key, never the credentials.
    let dbg = format!("{signer:?}");
    assert!(
        dbg.contains(signer.key_id()) && !dbg.contains("testing"),
        "{dbg}"
    );
}

/// The fixture's server-side correction matters: with `MessageType=DIGEST` the signature is
/// over the digest as the prehash (what AWS does), not over SHA-256 of it (what moto 5.2.5
/// does unpatched, and what `RAW` means).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_fixture_signs_digests_as_the_prehash_like_aws() {
    let moto = Moto::spawn();
    let signer = KmsSigner::create(&moto.config(""), "digest test")
        .await
        .unwrap();
    let (vk, _) = raw_public_key(&signer).await;
    let client = signer.client();
    let digest = hash_of(42);
    let sha_of_digest = sha256(digest.as_slice());

    let sign = |message_type: MessageType| {
        client
            .sign()
            .key_id(signer.key_id())
            .message(Blob::new(digest.as_slice()))
            .message_type(message_type)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
    };
    let der = sign(MessageType::Digest).await.unwrap();
    let sig = low_s(der.signature().unwrap().as_ref());
    vk.verify_prehash(digest.as_slice(), &sig)
        .expect("DIGEST signs the message itself as the prehash");
    assert!(
        vk.verify_prehash(&sha_of_digest, &sig).is_err(),
        "DIGEST must not hash the digest again (unpatched moto does)"
    );

    let raw = sign(MessageType::Raw).await.unwrap();
    let raw_sig = low_s(raw.signature().unwrap().as_ref());
    vk.verify_prehash(&sha_of_digest, &raw_sig)
        .expect("RAW hashes the message with SHA-256");

    // Verify with DIGEST agrees with Sign with DIGEST, and rejects the RAW signature.
    let verify = |signature: Vec<u8>| {
        client
            .verify()
            .key_id(signer.key_id())
            .message(Blob::new(digest.as_slice()))
            .message_type(MessageType::Digest)
            .signature(Blob::new(signature))
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
    };
    let ok = verify(der.signature().unwrap().as_ref().to_vec())
        .await
        .unwrap();
    assert!(ok.signature_valid());
    let not_ok = verify(raw.signature().unwrap().as_ref().to_vec())
        .await
        .unwrap();
    assert!(!not_ok.signature_valid());

    // AWS rejects a DIGEST whose length is not the algorithm's digest length; so does the fixture.
    let short = client
        .sign()
        .key_id(signer.key_id())
        .message(Blob::new(&b"short"[..]))
        .message_type(MessageType::Digest)
        .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
        .send()
        .await;
    assert!(short.is_err(), "a 5-byte DIGEST must be rejected");
}

/// The other half of the proof: moto as released signs SHA-256(digest) even with
/// `MessageType=DIGEST`, and the signer's own check refuses such a signature instead of
/// handing out one that recovers to a random address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpatched_moto_signs_the_wrong_hash_and_the_signer_refuses_it() {
    let moto = Moto::spawn_unpatched();
    let signer = KmsSigner::create(&moto.config(""), "unpatched")
        .await
        .unwrap();
    let (vk, _) = raw_public_key(&signer).await;
    let digest = hash_of(7);
    let out = signer
        .client()
        .sign()
        .key_id(signer.key_id())
        .message(Blob::new(digest.as_slice()))
        .message_type(MessageType::Digest)
        .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
        .send()
        .await
        .unwrap();
    let sig = low_s(out.signature().unwrap().as_ref());
    vk.verify_prehash(&sha256(digest.as_slice()), &sig)
        .expect("moto 5.2.5 hashes the DIGEST again");
    assert!(vk.verify_prehash(digest.as_slice(), &sig).is_err());
    match signer.sign_hash_async(digest).await {
        Err(SignerError::Recovery { key_id, reason }) => {
            assert_eq!(key_id, signer.key_id());
            assert!(reason.contains("does not verify"), "{reason}");
        }
        other => panic!("expected SignerError::Recovery, got {other:?}"),
    }
}

/// A DER signature as k256 verifies it (k256 rejects high-s signatures).
fn low_s(der: &[u8]) -> k256::ecdsa::Signature {
    let sig = k256::ecdsa::Signature::from_der(der).unwrap();
    sig.normalize_s().unwrap_or(sig)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use k256::sha2::{Digest, Sha256};
    Sha256::digest(data).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_key_id_is_a_config_error_naming_the_key() {
    let moto = Moto::spawn();
    let key_id = "00000000-0000-4000-8000-00000000dead";
    match KmsSigner::connect(&moto.config(key_id)).await {
        Err(SignerError::Config { what, reason }) => {
            assert!(what.contains(key_id), "{what}: {reason}");
            assert!(reason.contains("not found"), "{what}: {reason}");
            assert!(!reason.contains("testing"), "credentials leaked: {reason}");
        }
        other => panic!("expected SignerError::Config, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_secp256k1_is_refused_at_connect() {
    let moto = Moto::spawn();
    let cfg = moto.config("");
    let client = signers::kms::client(&cfg).unwrap();
    let p256 = client
        .create_key()
        .key_spec(KeySpec::EccNistP256)
        .key_usage(KeyUsageType::SignVerify)
        .send()
        .await
        .unwrap();
    let key_id = p256.key_metadata().unwrap().key_id().to_owned();
    match KmsSigner::connect(&moto.config(&key_id)).await {
        Err(SignerError::Config { what, reason }) => {
            assert!(what.contains(&key_id), "{what}");
            assert!(reason.contains("ECC_NIST_P256"), "{reason}");
        }
        other => panic!("expected SignerError::Config, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_a_clear_config_error() {
    let endpoint = format!("http://127.0.0.1:{}", moto::free_port());
    let cfg = KmsConfig {
        endpoint_url: Some(endpoint.clone()),
        credentials: Some(signers::kms::KmsCredentials {
            access_key_id: "testing".into(),
            secret_access_key: "testing".into(),
        }),
        ..KmsConfig::new(moto::REGION, "some-key")
    };
    let started = Instant::now();
    match KmsSigner::connect(&cfg).await {
        Err(e @ SignerError::Config { .. }) => {
            let text = e.to_string();
            assert!(text.contains(&endpoint), "{text}");
            assert!(text.contains("unreachable"), "{text}");
        }
        other => panic!("expected SignerError::Config, got {other:?}"),
    }
    assert!(
        started.elapsed() < cfg.operation_timeout + Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_after_the_service_went_away_is_unavailable() {
    let moto = Moto::spawn();
    let signer = KmsSigner::create(&moto.config(""), "gone").await.unwrap();
    drop(moto);
    match signer.sign_hash_async(hash_of(1)).await {
        Err(SignerError::Unavailable { key_id, reason }) => {
            assert_eq!(key_id, signer.key_id());
            assert!(!reason.is_empty());
        }
        other => panic!("expected SignerError::Unavailable, got {other:?}"),
    }
}

fn drain(worker: &AsyncWorker, n: usize) -> Vec<Completion> {
    let mut out = Vec::with_capacity(n);
    let deadline = Instant::now() + WAIT;
    while out.len() < n {
        worker.poll(&mut |c| out.push(c));
        assert!(
            Instant::now() < deadline,
            "timed out with {} of {n} completions",
            out.len()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

#[test]
fn worker_signs_through_moto_concurrently_in_order_per_account() {
    let moto = Moto::spawn();
    let wakes = Arc::new(AtomicUsize::new(0));
    let w = Arc::clone(&wakes);
    let mut worker = AsyncWorker::start(
        &AsyncWorkerConfig {
            capacity: 256,
            ..AsyncWorkerConfig::default()
        },
        Some(Box::new(move || {
            w.fetch_add(1, Ordering::Relaxed);
        })),
    )
    .unwrap();
    let signers: Vec<KmsSigner> = (0..3)
        .map(|i| {
            worker
                .block_on(KmsSigner::create(&moto.config(""), &format!("acct {i}")))
                .unwrap()
        })
        .collect();
    for (i, s) in signers.iter().enumerate() {
        assert_eq!(usize::from(worker.register(Arc::new(s.clone()))), i);
    }
    assert_eq!(
        worker.try_submit(3, 0, hash_of(0)),
        Err(SubmitError::UnknownAccount(3))
    );

    let per_account = 40u64;
    let started = Instant::now();
    for seq in 0..per_account {
        for account in 0..3u16 {
            let hash = hash_of(u64::from(account) * 1000 + seq);
            worker.try_submit(account, seq, hash).unwrap();
        }
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "submitting must not wait on the network: {:?}",
        started.elapsed()
    );
    let total = usize::try_from(per_account).unwrap() * 3;
    let done = drain(&worker, total);
    assert_eq!(worker.outstanding(), 0);
    assert!(wakes.load(Ordering::Relaxed) > 0, "wake callback never ran");

    let mut next: HashMap<u16, u64> = HashMap::new();
    for c in done {
        let expected = next.entry(c.account_index).or_insert(0);
        assert_eq!(c.seq, *expected, "account {} out of order", c.account_index);
        *expected += 1;
        assert_eq!(c.hash, hash_of(u64::from(c.account_index) * 1000 + c.seq));
        let sig = c.result.unwrap();
        let signer = &signers[usize::from(c.account_index)];
        assert_eq!(
            sig.recover_address_from_prehash(&c.hash).unwrap(),
            signer.address()
        );
        assert!(sig.s() <= half_n());
    }
    assert!(next.values().all(|&n| n == per_account), "{next:?}");
    drop(worker);
    drop(moto);
}

/// A stand-in [`AsyncSigner`] for the worker's ORDERING test only (the worker is under test
/// here, not KMS): signs with a local key after a delay chosen per hash, so that later
/// requests finish first.
#[derive(Debug)]
struct DelayedSigner {
    inner: LocalSigner,
    delay_of: fn(&B256) -> Duration,
    started: Arc<AtomicUsize>,
}

impl AsyncSigner for DelayedSigner {
    fn address(&self) -> Address {
        Signer::address(&self.inner)
    }
    fn key_id(&self) -> &str {
        Signer::key_id(&self.inner)
    }
    fn backend(&self) -> Backend {
        Backend::Local
    }
    fn sign_hash_async(&self, hash: B256) -> SignFuture {
        let inner = self.inner.clone();
        let delay = (self.delay_of)(&hash);
        let started = Arc::clone(&self.started);
        Box::pin(async move {
            started.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            if hash == B256::ZERO {
                return Err(SignerError::Signing {
                    key_id: "delayed".into(),
                    reason: "refused on purpose".into(),
                });
            }
            inner.sign_hash_checked(&hash)
        })
    }
}

#[test]
fn worker_releases_results_in_order_when_later_requests_finish_first() {
    const DEV0: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
    const DEV1: &str = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
    let started = Arc::new(AtomicUsize::new(0));
    let mut worker = AsyncWorker::start(
        &AsyncWorkerConfig {
            capacity: 8,
            ..AsyncWorkerConfig::default()
        },
        None,
    )
    .unwrap();
    // The hash's first byte is the request's position; earlier positions sleep longer.
    let slow_first: fn(&B256) -> Duration = |h| Duration::from_millis(20 * (8 - u64::from(h[0])));
    let fast: fn(&B256) -> Duration = |_| Duration::from_millis(1);
    let a = worker.register(Arc::new(DelayedSigner {
        inner: LocalSigner::from_hex("a", DEV0, LocalCurve::K256).unwrap(),
        delay_of: slow_first,
        started: Arc::clone(&started),
    }));
    let b = worker.register(Arc::new(DelayedSigner {
        inner: LocalSigner::from_hex("b", DEV1, LocalCurve::K256).unwrap(),
        delay_of: fast,
        started: Arc::clone(&started),
    }));

    let hash = |pos: u8| {
        let mut h = [0xabu8; 32];
        h[0] = pos;
        B256::from(h)
    };
    // Account a: 6 requests, the first (position 0 is an error on purpose) slowest.
    worker.try_submit(a, 100, B256::ZERO).unwrap();
    for pos in 1..6u8 {
        worker
            .try_submit(a, 100 + u64::from(pos), hash(pos))
            .unwrap();
    }
    // Account b: fast, must not wait behind account a.
    worker.try_submit(b, 7, hash(9)).unwrap();
    worker.try_submit(b, 8, hash(10)).unwrap();
    assert_eq!(worker.outstanding(), 8);
    assert_eq!(worker.try_submit(b, 9, hash(11)), Err(SubmitError::Full));

    let done = drain(&worker, 8);
    assert_eq!(
        started.load(Ordering::SeqCst),
        8,
        "all requests ran concurrently"
    );
    // b's results come out before a's first (slow) one is released.
    let first_a = done.iter().position(|c| c.account_index == a).unwrap();
    let last_b = done.iter().rposition(|c| c.account_index == b).unwrap();
    assert!(last_b < first_a, "account b waited behind account a");
    let a_seqs: Vec<u64> = done
        .iter()
        .filter(|c| c.account_index == a)
        .map(|c| c.seq)
        .collect();
    assert_eq!(a_seqs, vec![100, 101, 102, 103, 104, 105]);
    let b_seqs: Vec<u64> = done
        .iter()
        .filter(|c| c.account_index == b)
        .map(|c| c.seq)
        .collect();
    assert_eq!(b_seqs, vec![7, 8]);
    for c in &done {
        if c.seq == 100 {
            assert!(
                matches!(&c.result, Err(SignerError::Signing { reason, .. }) if reason.contains("on purpose"))
            );
        } else {
            let sig: &Signature = c.result.as_ref().unwrap();
            let expect = if c.account_index == a { DEV0 } else { DEV1 };
            let addr = PrivateKeySigner::from_str(expect).unwrap().address();
            assert_eq!(sig.recover_address_from_prehash(&c.hash).unwrap(), addr);
        }
    }
    // Capacity is free again.
    worker.try_submit(b, 9, hash(11)).unwrap();
    assert_eq!(drain(&worker, 1)[0].seq, 9);
}

#[test]
fn eip1559_transaction_signed_by_kms_is_mined_by_anvil() {
    let moto = Moto::spawn();
    let anvil = venues::Anvil::spawn(&venues::AnvilConfig::default())
        .unwrap_or_else(|e| panic!("cannot start anvil (did scripts/setup.sh run?): {e}"));
    let mut rpc = anvil.rpc().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kms = rt
        .block_on(KmsSigner::create(&moto.config(""), "anvil test"))
        .unwrap();
    let chain_id = anvil.chain_id();
    let fees = rpc.fee_estimate().unwrap();
    let wait_receipt = |rpc: &mut venues::RpcClient, h: B256| {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(r) = rpc.receipt(h).unwrap() {
                return r;
            }
            assert!(Instant::now() < deadline, "no receipt for {h}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let send = |rpc: &mut venues::RpcClient, tx: TxEip1559, sig: Signature| {
        let envelope: TxEnvelope = tx.into_signed(sig).into();
        let h = rpc.send_raw_transaction(&envelope.encoded_2718()).unwrap();
        assert_eq!(h, *envelope.tx_hash());
        h
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

    // Fund the KMS address from dev account 0.
    let funder = PrivateKeySigner::from_str(venues::DEV_PRIVATE_KEYS[0]).unwrap();
    let funder_nonce = rpc.transaction_count(funder.address(), "pending").unwrap();
    let fund = transfer(funder_nonce, kms.address(), U256::from(10u128.pow(18)));
    let sig = funder.sign_hash_sync(&fund.signature_hash()).unwrap();
    let h = send(&mut rpc, fund, sig);
    assert!(wait_receipt(&mut rpc, h).success);

    // A transfer from the KMS address, signed by KMS.
    let to = venues::dev_address(1);
    let before = rpc.balance(to).unwrap();
    let tx = transfer(0, to, U256::from(12_345u64));
    let sig = rt
        .block_on(kms.sign_hash_async(tx.signature_hash()))
        .unwrap();
    let h = send(&mut rpc, tx, sig);
    let receipt = wait_receipt(&mut rpc, h);
    assert!(receipt.success, "{receipt:?}");
    assert_eq!(receipt.from, kms.address());
    assert_eq!(receipt.to, Some(to));
    assert_eq!(rpc.balance(to).unwrap(), before + U256::from(12_345u64));
    assert_eq!(rpc.transaction_count(kms.address(), "latest").unwrap(), 1);
}
