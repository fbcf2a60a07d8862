//! AWS KMS backend (feature `kms`): a secp256k1 key (`ECC_SECG_P256K1`) held by AWS KMS, or an
//! API-compatible service, signed with `Sign` / `MessageType=DIGEST`.
//!
//! # How it works
//!
//! - [`KmsSigner::connect`] calls `GetPublicKey` once, checks the key is `ECC_SECG_P256K1` with
//!   usage `SIGN_VERIFY`, parses the DER `SubjectPublicKeyInfo` with k256, derives the Ethereum
//!   address and caches both. It never calls `GetPublicKey` again.
//! - [`AsyncSigner::sign_hash_async`] sends the 32-byte hash with `MessageType=DIGEST` and
//!   `ECDSA_SHA_256`, so KMS signs the hash itself as the prehash (with `RAW` it would hash it
//!   again). KMS answers with a DER ECDSA signature without a recovery id; the signer
//!   normalises `s` to the low half (EIP-2) and computes the recovery id from the cached
//!   public key `Q`: `R = (z/s)·G + (r/s)·Q`; `R.x == r` proves the signature valid for `Q`,
//!   and `R`'s y parity is the recovery id that makes `ecrecover` return `Q`. No candidate is
//!   tried and no public key is recovered.
//! - The call crosses the network, so it is never made on a pipeline stage's thread:
//!   [`crate::worker::AsyncWorker`] runs requests on its own small runtime and hands results back in order per
//!   account.
//!
//! # Invariants
//!
//! - Every signature this module returns is low-s and has been checked to recover to
//!   [`AsyncSigner::address`] (the `R.x == r` check above).
//! - Credentials never appear in `Debug`, logs or errors; errors name the key id, the region
//!   and the endpoint.
//! - Errors at start-up ([`KmsSigner::connect`]) are [`SignerError::Config`] naming the key id
//!   or the endpoint; failures to reach KMS while signing are [`SignerError::Unavailable`],
//!   refusals by KMS are [`SignerError::Signing`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::{Address, B256, Signature, U256};
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, KeyUsageType, MessageType, SigningAlgorithmSpec};
use k256::elliptic_curve::ops::{LinearCombination, Reduce};
use k256::elliptic_curve::point::AffineCoordinates;
use k256::elliptic_curve::sec1::ToEncodedPoint;
use k256::pkcs8::DecodePublicKey;
use k256::{ProjectivePoint, Scalar};

use crate::{AsyncSigner, Backend, SignFuture, SignerError};

pub use aws_sdk_kms;

/// Static AWS credentials (an access key pair). For tests against a local KMS-compatible
/// server; real deployments leave [`KmsConfig::credentials`] empty.
#[derive(Clone)]
pub struct KmsCredentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
}

impl fmt::Debug for KmsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KmsCredentials(<redacted>)")
    }
}

/// Where the key is and how to reach it.
#[derive(Clone, Debug)]
pub struct KmsConfig {
    /// Endpoint override (`http://127.0.0.1:PORT` for a local server); `None` uses the AWS
    /// endpoint of [`KmsConfig::region`].
    pub endpoint_url: Option<String>,
    /// AWS region, e.g. `eu-west-1`.
    pub region: String,
    /// Key id, key ARN, alias name or alias ARN of an `ECC_SECG_P256K1` / `SIGN_VERIFY` key.
    pub key_id: String,
    /// Static credentials; `None` reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
    /// `AWS_SESSION_TOKEN` from the environment at connect time (the part of the AWS default
    /// chain this crate carries without pulling in `aws-config`).
    pub credentials: Option<KmsCredentials>,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Whole-operation timeout for one call, retries included.
    pub operation_timeout: Duration,
    /// Attempts per call (1 = no retry). Retries cover throttling and transient errors.
    pub max_attempts: u32,
}

impl KmsConfig {
    /// A configuration for `key_id` in `region` with default timeouts (connect 2 s, operation
    /// 5 s, 2 attempts), the AWS endpoint and credentials from the environment.
    pub fn new(region: impl Into<String>, key_id: impl Into<String>) -> Self {
        Self {
            endpoint_url: None,
            region: region.into(),
            key_id: key_id.into(),
            credentials: None,
            connect_timeout: Duration::from_secs(2),
            operation_timeout: Duration::from_secs(5),
            max_attempts: 2,
        }
    }

    fn endpoint_name(&self) -> String {
        match &self.endpoint_url {
            Some(url) => url.clone(),
            None => format!("AWS KMS in {}", self.region),
        }
    }
}

/// Builds a KMS client from `cfg` (its `key_id` is not used): rustls over ring for HTTPS,
/// plain HTTP for `http://` endpoints, the configured timeouts and retries.
pub fn client(cfg: &KmsConfig) -> Result<aws_sdk_kms::Client, SignerError> {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};

    let credentials = match &cfg.credentials {
        Some(c) => Credentials::new(
            c.access_key_id.clone(),
            c.secret_access_key.clone(),
            None,
            None,
            "signers-kms-static",
        ),
        None => {
            let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
            match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
                (Some(id), Some(secret)) => Credentials::new(
                    id,
                    secret,
                    var("AWS_SESSION_TOKEN"),
                    None,
                    "signers-kms-environment",
                ),
                _ => {
                    return Err(SignerError::Config {
                        what: "AWS credentials".into(),
                        reason: "none configured and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY \
                                 are not set"
                            .into(),
                    });
                }
            }
        }
    };
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut builder = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(cfg.region.clone()))
        .credentials_provider(credentials)
        .http_client(http)
        .retry_config(RetryConfig::standard().with_max_attempts(cfg.max_attempts.max(1)))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(cfg.connect_timeout)
                .operation_timeout(cfg.operation_timeout)
                .build(),
        );
    if let Some(url) = &cfg.endpoint_url {
        builder = builder.endpoint_url(url.clone());
    }
    Ok(aws_sdk_kms::Client::from_conf(builder.build()))
}

/// True when the SDK error means the service was not reached or did not answer (as opposed
/// to answering with an error).
fn is_unreachable<E, R>(err: &SdkError<E, R>) -> bool {
    matches!(
        err,
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_)
    )
}

/// One line describing an SDK error: the service's code and message when it answered, the
/// whole source chain otherwise.
fn describe<E, R>(err: &SdkError<E, R>) -> String
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
    R: fmt::Debug,
{
    match err.as_service_error() {
        Some(e) => format!(
            "{}: {}",
            e.code().unwrap_or("service error"),
            e.message().unwrap_or("(no message)")
        ),
        None => DisplayErrorContext(err).to_string(),
    }
}

/// Creates a new `ECC_SECG_P256K1` / `SIGN_VERIFY` key and returns its key id (for tests and
/// development environments; production keys are created by the custodian's key ceremony).
/// `cfg.key_id` is not used.
pub async fn create_key(cfg: &KmsConfig, description: &str) -> Result<String, SignerError> {
    let out = client(cfg)?
        .create_key()
        .key_spec(KeySpec::EccSecgP256K1)
        .key_usage(KeyUsageType::SignVerify)
        .description(description)
        .send()
        .await
        .map_err(|e| SignerError::Config {
            what: format!("KMS endpoint `{}`", cfg.endpoint_name()),
            reason: format!("CreateKey failed: {}", describe(&e)),
        })?;
    out.key_metadata()
        .map(|m| m.key_id().to_owned())
        .ok_or_else(|| SignerError::Config {
            what: format!("KMS endpoint `{}`", cfg.endpoint_name()),
            reason: "CreateKey returned no key metadata".into(),
        })
}

struct Inner {
    client: aws_sdk_kms::Client,
    key_id: String,
    address: Address,
    /// The key's public point, cached from `GetPublicKey`.
    public: ProjectivePoint,
}

/// A signer whose secp256k1 key is held by AWS KMS. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct KmsSigner {
    inner: Arc<Inner>,
}

impl fmt::Debug for KmsSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsSigner")
            .field("key_id", &self.inner.key_id)
            .field("address", &self.inner.address)
            .finish_non_exhaustive()
    }
}

impl KmsSigner {
    /// Reads the key's public key (`GetPublicKey`, once), checks its spec and usage, and
    /// derives its address.
    ///
    /// Errors: [`SignerError::Config`] naming the key id when the key does not exist, is not
    /// `ECC_SECG_P256K1` / `SIGN_VERIFY` or its public key does not parse; naming the endpoint
    /// when KMS cannot be reached; naming the credentials when none are configured.
    pub async fn connect(cfg: &KmsConfig) -> Result<Self, SignerError> {
        let client = client(cfg)?;
        let key_err = |reason: String| SignerError::Config {
            what: format!("KMS key `{}`", cfg.key_id),
            reason,
        };
        let out = match client.get_public_key().key_id(&cfg.key_id).send().await {
            Ok(out) => out,
            Err(e) if is_unreachable(&e) => {
                return Err(SignerError::Config {
                    what: format!("KMS endpoint `{}`", cfg.endpoint_name()),
                    reason: format!("unreachable: {}", describe(&e)),
                });
            }
            Err(e) => {
                let not_found = e
                    .as_service_error()
                    .is_some_and(|s| s.is_not_found_exception());
                let what = if not_found {
                    "not found"
                } else {
                    "GetPublicKey failed"
                };
                return Err(key_err(format!(
                    "{what} in region {} at {}: {}",
                    cfg.region,
                    cfg.endpoint_name(),
                    describe(&e)
                )));
            }
        };
        // `KeySpec`, or its deprecated twin `CustomerMasterKeySpec` (AWS sends both; some
        // compatible servers, moto among them, only the latter).
        let spec = out.key_spec().map(KeySpec::as_str).or_else(|| {
            #[allow(deprecated)] // read only when `KeySpec` is absent
            out.customer_master_key_spec().map(|s| s.as_str())
        });
        if spec != Some(KeySpec::EccSecgP256K1.as_str()) {
            return Err(key_err(format!(
                "key spec is {}, expected ECC_SECG_P256K1",
                spec.unwrap_or("not reported")
            )));
        }
        if out.key_usage() != Some(&KeyUsageType::SignVerify) {
            return Err(key_err(format!(
                "key usage is {}, expected SIGN_VERIFY",
                out.key_usage().map_or("unknown", |s| s.as_str())
            )));
        }
        let der = out
            .public_key()
            .ok_or_else(|| key_err("GetPublicKey returned no public key".into()))?;
        let public = k256::PublicKey::from_public_key_der(der.as_ref())
            .map_err(|e| key_err(format!("public key is not a secp256k1 SPKI: {e}")))?;
        let uncompressed = public.to_encoded_point(false);
        let address = Address::from_raw_public_key(&uncompressed.as_bytes()[1..]);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                key_id: cfg.key_id.clone(),
                address,
                public: public.to_projective(),
            }),
        })
    }

    /// Creates a fresh `ECC_SECG_P256K1` key with [`create_key`] and connects to it
    /// (`cfg.key_id` is replaced by the new key's id). For tests and development.
    pub async fn create(cfg: &KmsConfig, description: &str) -> Result<Self, SignerError> {
        let key_id = create_key(cfg, description).await?;
        Self::connect(&KmsConfig {
            key_id,
            ..cfg.clone()
        })
        .await
    }

    /// The SDK client this signer uses (for raw calls in tests and benches).
    pub fn client(&self) -> &aws_sdk_kms::Client {
        &self.inner.client
    }

    /// The key's public key, as read from `GetPublicKey` at connect.
    pub fn public_key(&self) -> k256::PublicKey {
        // The point came from a parsed, valid public key: never the identity.
        k256::PublicKey::from_affine(self.inner.public.to_affine())
            .expect("cached public key is a valid curve point")
    }
}

impl AsyncSigner for KmsSigner {
    fn address(&self) -> Address {
        self.inner.address
    }

    fn key_id(&self) -> &str {
        &self.inner.key_id
    }

    fn backend(&self) -> Backend {
        Backend::Kms
    }

    fn sign_hash_async(&self, hash: B256) -> SignFuture {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.sign(hash).await })
    }
}

impl Inner {
    async fn sign(&self, hash: B256) -> Result<Signature, SignerError> {
        let out = self
            .client
            .sign()
            .key_id(&self.key_id)
            .message(Blob::new(hash.as_slice()))
            .message_type(MessageType::Digest)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
            .await
            .map_err(|e| {
                if is_unreachable(&e) {
                    SignerError::Unavailable {
                        key_id: self.key_id.clone(),
                        reason: describe(&e),
                    }
                } else {
                    SignerError::Signing {
                        key_id: self.key_id.clone(),
                        reason: describe(&e),
                    }
                }
            })?;
        let der = out.signature().ok_or_else(|| SignerError::Signing {
            key_id: self.key_id.clone(),
            reason: "Sign returned no signature".into(),
        })?;
        recoverable_from_der(&self.public, &hash, der.as_ref()).map_err(|reason| {
            SignerError::Recovery {
                key_id: self.key_id.clone(),
                reason: reason.into(),
            }
        })
    }
}

/// Turns a DER ECDSA signature of `hash` by `public` into a low-s signature with the recovery
/// id (y parity) that makes it recover to `public`.
///
/// Computes `R = (z/s)·G + (r/s)·Q` with the low-s `s`; `R.x == r` is the ECDSA verification
/// equation (so a wrong key, hash or signature is rejected here) and `R`'s y parity is the
/// recovery id. A signature whose `R.x` exceeds the group order (probability about 2^-128) has
/// no Ethereum encoding and is rejected too.
pub fn recoverable_from_der(
    public: &ProjectivePoint,
    hash: &B256,
    der: &[u8],
) -> Result<Signature, &'static str> {
    let sig = k256::ecdsa::Signature::from_der(der).map_err(|_| "not a DER ECDSA signature")?;
    let sig = sig.normalize_s().unwrap_or(sig);
    let (r, s) = sig.split_scalars();
    let z = <Scalar as Reduce<k256::U256>>::reduce_bytes(&hash.0.into());
    // `s` is a NonZeroScalar: its inverse exists.
    let s_inv = Option::<Scalar>::from(s.invert()).ok_or("s has no inverse")?;
    let u1 = z * s_inv;
    let u2 = *r * s_inv;
    let big_r = ProjectivePoint::lincomb(&ProjectivePoint::GENERATOR, &u1, public, &u2).to_affine();
    let r_bytes = r.to_bytes();
    if big_r.x() != r_bytes {
        return Err("signature does not verify against the key's public key");
    }
    let y_parity = bool::from(big_r.y_is_odd());
    Ok(Signature::new(
        U256::from_be_slice(&r_bytes),
        U256::from_be_slice(&s.to_bytes()),
        y_parity,
    ))
}

/// The encryption context every wrap and unwrap carries, so a ciphertext made with the
/// same KMS key for another purpose does not unwrap as a data key.
const KEK_CONTEXT: (&str, &str) = ("purpose", "engine at-rest data key v1");

/// A key-encryption key held by KMS: a `SYMMETRIC_DEFAULT` / `ENCRYPT_DECRYPT` key.
/// Wrapping is KMS `Encrypt` of the data key, unwrapping `Decrypt`, both with a fixed
/// encryption context. The calls cross the network; they are made on a small runtime of
/// this value's own, from a scoped thread, so they may be called from any thread
/// (including one inside another tokio runtime) and never on a stage's hot path.
pub struct KmsKek {
    client: aws_sdk_kms::Client,
    key_id: String,
    id: String,
    rt: tokio::runtime::Runtime,
}

impl fmt::Debug for KmsKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsKek")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl KmsKek {
    /// Creates a new `SYMMETRIC_DEFAULT` key for wrapping data keys and returns its id (for
    /// tests and development; production keys come from the key ceremony).
    pub fn create_key(cfg: &KmsConfig, description: &str) -> Result<String, SignerError> {
        let client = client(cfg)?;
        let rt = kek_runtime()?;
        let description = description.to_owned();
        run(&rt, async move {
            let out = client
                .create_key()
                .key_spec(KeySpec::SymmetricDefault)
                .key_usage(KeyUsageType::EncryptDecrypt)
                .description(description)
                .send()
                .await
                .map_err(|e| SignerError::Config {
                    what: format!("KMS endpoint `{}`", cfg.endpoint_name()),
                    reason: format!("CreateKey failed: {}", describe(&e)),
                })?;
            out.key_metadata()
                .map(|m| m.key_id().to_owned())
                .ok_or_else(|| SignerError::Config {
                    what: format!("KMS endpoint `{}`", cfg.endpoint_name()),
                    reason: "CreateKey returned no key metadata".into(),
                })
        })
    }

    /// Connects and proves the key can wrap and unwrap (a probe key goes both ways).
    pub fn connect(cfg: &KmsConfig) -> Result<KmsKek, SignerError> {
        let kek = KmsKek {
            client: client(cfg)?,
            key_id: cfg.key_id.clone(),
            id: format!("kms:{}", cfg.key_id),
            rt: kek_runtime()?,
        };
        let probe = crate::kek::DataKey::new([0x5a; crate::kek::DATA_KEY_LEN]);
        let back = crate::kek::KeyWrap::wrap(&kek, &probe)
            .and_then(|w| crate::kek::KeyWrap::unwrap(&kek, &w))
            .map_err(|e| SignerError::Config {
                what: format!(
                    "KMS key-encryption key `{}` at {}",
                    cfg.key_id,
                    cfg.endpoint_name()
                ),
                reason: format!("probe wrap and unwrap failed: {e}"),
            })?;
        if back.bytes() != probe.bytes() {
            return Err(SignerError::Config {
                what: format!("KMS key-encryption key `{}`", cfg.key_id),
                reason: "probe unwrap returned other bytes".into(),
            });
        }
        Ok(kek)
    }

    fn fail<E, R>(&self, call: &str, e: &SdkError<E, R>) -> SignerError
    where
        E: std::error::Error + ProvideErrorMetadata + 'static,
        R: fmt::Debug,
    {
        if is_unreachable(e) {
            SignerError::Unavailable {
                key_id: self.id.clone(),
                reason: format!("{call}: {}", describe(e)),
            }
        } else {
            SignerError::Signing {
                key_id: self.id.clone(),
                reason: format!("{call}: {}", describe(e)),
            }
        }
    }
}

fn kek_runtime() -> Result<tokio::runtime::Runtime, SignerError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SignerError::Config {
            what: "KMS key-encryption key runtime".into(),
            reason: e.to_string(),
        })
}

/// Runs `fut` to completion on `rt` from a scoped thread (legal from inside a runtime).
fn run<T: Send>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = T> + Send,
) -> T {
    std::thread::scope(|s| match s.spawn(|| rt.block_on(fut)).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

impl crate::kek::KeyWrap for KmsKek {
    fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, key: &crate::kek::DataKey) -> Result<Vec<u8>, SignerError> {
        let call = self
            .client
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(Blob::new(key.bytes().to_vec()))
            .encryption_context(KEK_CONTEXT.0, KEK_CONTEXT.1);
        let out = run(&self.rt, call.send()).map_err(|e| self.fail("Encrypt", &e))?;
        out.ciphertext_blob()
            .map(|b| b.as_ref().to_vec())
            .ok_or_else(|| SignerError::Signing {
                key_id: self.id.clone(),
                reason: "Encrypt returned no ciphertext".into(),
            })
    }

    fn unwrap(&self, wrapped: &[u8]) -> Result<crate::kek::DataKey, SignerError> {
        let call = self
            .client
            .decrypt()
            .key_id(&self.key_id)
            .ciphertext_blob(Blob::new(wrapped.to_vec()))
            .encryption_context(KEK_CONTEXT.0, KEK_CONTEXT.1);
        let out = run(&self.rt, call.send()).map_err(|e| self.fail("Decrypt", &e))?;
        let plain = out.plaintext().ok_or_else(|| SignerError::Signing {
            key_id: self.id.clone(),
            reason: "Decrypt returned no plaintext".into(),
        })?;
        crate::kek::data_key_from(plain.as_ref().to_vec(), &self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::ecdsa::SigningKey;
    use k256::ecdsa::signature::hazmat::PrehashSigner;

    #[test]
    fn recovery_id_from_the_public_key_matches_k256_for_many_hashes() {
        let key = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let public = key.verifying_key().as_affine().into();
        let address = Address::from_raw_public_key(
            &key.verifying_key().to_encoded_point(false).as_bytes()[1..],
        );
        let mut parities = [0usize; 2];
        for i in 0u64..200 {
            let hash = alloy_primitives::keccak256(i.to_be_bytes());
            let (sig, recid) = key.sign_prehash_recoverable(hash.as_slice()).unwrap();
            // Hand the high-s twin to the converter half of the time: it must normalise.
            let given = if i % 2 == 0 {
                sig
            } else {
                k256::ecdsa::Signature::from_scalars(sig.r(), -*sig.s()).unwrap()
            };
            let out = recoverable_from_der(&public, &hash, given.to_der().as_bytes()).unwrap();
            let low = sig.normalize_s().unwrap_or(sig);
            assert_eq!(out.s(), U256::from_be_slice(&low.s().to_bytes()));
            // k256 signs low-s already, so its recovery id is the reference.
            assert_eq!(out.v(), recid.is_y_odd(), "hash {i}");
            assert_eq!(out.recover_address_from_prehash(&hash).unwrap(), address);
            parities[usize::from(out.v())] += 1;
        }
        assert!(parities[0] > 50 && parities[1] > 50, "{parities:?}");
    }

    #[test]
    fn rejects_a_signature_of_another_hash_or_key() {
        let key = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let other = SigningKey::from_slice(&[8u8; 32]).unwrap();
        let public: ProjectivePoint = key.verifying_key().as_affine().into();
        let hash = B256::repeat_byte(1);
        let sig: k256::ecdsa::Signature = other.sign_prehash(hash.as_slice()).unwrap();
        assert!(recoverable_from_der(&public, &hash, sig.to_der().as_bytes()).is_err());
        let sig: k256::ecdsa::Signature = key.sign_prehash(hash.as_slice()).unwrap();
        let wrong = B256::repeat_byte(2);
        assert!(recoverable_from_der(&public, &wrong, sig.to_der().as_bytes()).is_err());
        assert!(recoverable_from_der(&public, &hash, b"\x30\x02junk").is_err());
    }

    #[test]
    fn debug_redacts_credentials() {
        let cfg = KmsConfig {
            credentials: Some(KmsCredentials {
                access_key_id: "AKIAEXAMPLEID".into(),
                secret_access_key: "very-secret-value".into(),
            }),
            ..KmsConfig::new("us-east-1", "key-1")
        };
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("very-secret-value"), "{dbg}");
        assert!(!dbg.contains("AKIAEXAMPLEID"), "{dbg}");
        assert!(dbg.contains("key-1"), "{dbg}");
    }
}
