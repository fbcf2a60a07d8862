//! PKCS#11 HSM backend (feature `hsm`): a secp256k1 key generated inside a token, signed
//! with through a warm pool of logged-in sessions.
//!
//! # How it works
//!
//! - [`HsmSigner::open`] loads the PKCS#11 module, finds the token **by label** (slot ids
//!   change when tokens are initialised or re-plugged), opens [`HsmConfig::sessions`]
//!   read-only sessions, logs the user in once, finds the private key by label in each
//!   session and reads the public key (`CKA_EC_POINT`) once; the address is derived from it
//!   once. A probe signature made at start proves that the private and the public key with
//!   that label belong together.
//! - [`Signer::sign_hash`] pops a session from a lock-free queue
//!   (`crossbeam_queue::ArrayQueue`), calls `C_Sign` with `CKM_ECDSA` on the 32-byte hash,
//!   gets raw `r || s`, normalises `s` to low-s (EIP-2) and computes the recovery id from the
//!   cached public key (see [`recoverable_from_raw`]: the nonce point from the verification
//!   equation, evaluated with fixed-base tables of `G` and of the key built at start), then
//!   pushes the session back. There is no mutex on this path; if every pooled session is
//!   busy, an extra session is opened for the call and closed afterwards if the pool is full.
//! - [`HsmSigner::generate_key`] makes a key pair inside the token with
//!   `CKM_EC_KEY_PAIR_GEN` on secp256k1: the private key is a token object with
//!   `CKA_SENSITIVE=true`, `CKA_EXTRACTABLE=false`, `CKA_SIGN=true`, so it never leaves the
//!   token.
//!
//! # Faults and recovery
//!
//! When `C_Sign` reports that the session is gone (`CKR_SESSION_HANDLE_INVALID`,
//! `CKR_SESSION_CLOSED`), the user is logged out (`CKR_USER_NOT_LOGGED_IN`), the library was
//! finalised (`CKR_CRYPTOKI_NOT_INITIALIZED`), the token went away (`CKR_TOKEN_NOT_PRESENT`,
//! `CKR_DEVICE_REMOVED`) or the key handle is stale (`CKR_KEY_HANDLE_INVALID`,
//! `CKR_OBJECT_HANDLE_INVALID`), the signer repairs what is broken - re-initialises the
//! library, re-finds the token by label, opens a new session, logs in again, re-finds the key
//! and checks that its public key is still the one the address was derived from - and retries
//! once. If the repair fails (the token is gone, the PIN is no longer accepted, the key was
//! deleted) the call returns [`SignerError::Unavailable`] naming the token and what failed.
//!
//! # Invariants
//!
//! - The PIN is held only as a [`AuthPin`] (zeroised on drop, redacted in `Debug`); no `Debug`
//!   output or error contains it.
//! - [`Signer::address`] never changes: a repaired session whose key has a different public
//!   key is refused.
//! - Sessions belong to an *epoch*, bumped whenever a fault shows that every session of the
//!   library may be gone (finalised library, invalid session handle, token removed). Sessions
//!   of an older epoch are dropped **without** `C_CloseSession`: after a re-initialisation
//!   the module may hand out the same handle numbers again, and closing a stale handle could
//!   close somebody else's new session.
//! - The module is never finalised by a signer: several signers (and other code) may share it
//!   in one process.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use alloy_primitives::{Address, B256, Signature, U256};
use crossbeam_queue::ArrayQueue;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use k256::elliptic_curve::Group;
use k256::elliptic_curve::PrimeField;
use k256::elliptic_curve::ops::{Invert, Reduce};
use k256::elliptic_curve::point::AffineCoordinates;
use k256::elliptic_curve::scalar::IsHigh;
use k256::elliptic_curve::sec1::ToEncodedPoint;
use k256::{AffinePoint, FieldBytes, ProjectivePoint, Scalar};

use crate::{Backend, Signer, SignerError};

/// The `cryptoki` crate this backend is built on, for callers that need the same version
/// (token set-up, benchmarks of bare `C_Sign`).
pub use cryptoki;
/// A PIN: a secret string, zeroised on drop and redacted in `Debug`.
pub use cryptoki::types::AuthPin;

/// `CKA_EC_PARAMS` of secp256k1 keys: the DER encoding of the named-curve OID 1.3.132.0.10.
pub const SECP256K1_EC_PARAMS: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x0a];

/// Where Debian's `softhsm2` package installs its PKCS#11 module.
pub const SOFTHSM2_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Default size of the session pool.
pub const DEFAULT_SESSIONS: usize = 4;

/// How to reach one key in one PKCS#11 token.
#[derive(Clone)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module (`.so`) to load.
    pub module_path: PathBuf,
    /// Label of the token holding the key (tokens are found by label, never by slot id).
    pub token_label: String,
    /// The token's user PIN. Secret: never printed.
    pub user_pin: AuthPin,
    /// Label (`CKA_LABEL`) of the key pair; also the signer's [`Signer::key_id`].
    pub key_label: String,
    /// Number of sessions opened and logged in at start (at least 1). About the number of
    /// threads that sign at the same time.
    pub sessions: usize,
}

impl HsmConfig {
    /// A config with [`DEFAULT_SESSIONS`] sessions.
    pub fn new(
        module_path: impl Into<PathBuf>,
        token_label: impl Into<String>,
        user_pin: AuthPin,
        key_label: impl Into<String>,
    ) -> Self {
        Self {
            module_path: module_path.into(),
            token_label: token_label.into(),
            user_pin,
            key_label: key_label.into(),
            sessions: DEFAULT_SESSIONS,
        }
    }
}

impl fmt::Debug for HsmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmConfig")
            .field("module_path", &self.module_path)
            .field("token_label", &self.token_label)
            .field("user_pin", &"<redacted>")
            .field("key_label", &self.key_label)
            .field("sessions", &self.sessions)
            .finish()
    }
}

/// A pooled session with the key handle found in it and the epoch it was opened in.
struct Pooled {
    session: Session,
    key: ObjectHandle,
    epoch: u64,
}

/// What a PKCS#11 error says about the state of the session, library or token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// The user is logged out; the session itself is fine.
    NotLoggedIn,
    /// The key handle is stale; the session is fine.
    KeyHandle,
    /// This session (and possibly all) is gone.
    SessionGone,
    /// The library was finalised.
    NotInitialized,
    /// The token is not (or no longer) present.
    TokenGone,
}

impl Fault {
    fn of(e: &CkError) -> Option<Fault> {
        match e {
            CkError::Pkcs11(rv, _) => match rv {
                RvError::UserNotLoggedIn => Some(Fault::NotLoggedIn),
                RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid => Some(Fault::KeyHandle),
                RvError::SessionHandleInvalid | RvError::SessionClosed => Some(Fault::SessionGone),
                RvError::CryptokiNotInitialized => Some(Fault::NotInitialized),
                RvError::TokenNotPresent
                | RvError::DeviceRemoved
                | RvError::TokenNotRecognized
                | RvError::SlotIdInvalid => Some(Fault::TokenGone),
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether this fault means every session of the library may be gone.
    fn kills_sessions(self) -> bool {
        matches!(
            self,
            Fault::SessionGone | Fault::NotInitialized | Fault::TokenGone
        )
    }
}

/// A secp256k1 key inside a PKCS#11 token, signed with through a pool of logged-in sessions.
pub struct HsmSigner {
    ctx: Pkcs11,
    module_path: PathBuf,
    token_label: String,
    key_label: String,
    pin: AuthPin,
    public: RecoveryKey,
    address: Address,
    pool: ArrayQueue<Pooled>,
    epoch: AtomicU64,
    /// Serialises repairs and extra sessions; holds the token's current slot.
    cold: Mutex<Slot>,
}

impl fmt::Debug for HsmSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmSigner")
            .field("module_path", &self.module_path)
            .field("token_label", &self.token_label)
            .field("key_id", &self.key_label)
            .field("address", &self.address)
            .field("sessions", &self.pool.capacity())
            .finish_non_exhaustive()
    }
}

/// Initialises the library for this process; a library another handle initialised already
/// is fine (the PKCS#11 state is per process, shared by every handle on the same module).
fn initialize(ctx: &Pkcs11) -> Result<(), CkError> {
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Logs the user in; a user already logged in (login state is per token and process) is fine.
fn login(session: &Session, pin: &AuthPin) -> Result<(), CkError> {
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Slots whose initialised token carries `label`, and the labels of all tokens present.
fn find_token(ctx: &Pkcs11, label: &str) -> Result<(Vec<Slot>, Vec<String>), CkError> {
    let mut found = Vec::new();
    let mut labels = Vec::new();
    for slot in ctx.get_slots_with_token()? {
        let info = ctx.get_token_info(slot)?;
        if !info.token_initialized() {
            continue;
        }
        if info.label() == label {
            found.push(slot);
        }
        labels.push(info.label().to_owned());
    }
    Ok((found, labels))
}

/// EC keys of `class` labelled `label`.
fn find_keys(
    session: &Session,
    class: ObjectClass,
    label: &str,
) -> Result<Vec<ObjectHandle>, CkError> {
    session.find_objects(&[
        Attribute::Class(class),
        Attribute::KeyType(KeyType::EC),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
}

/// Parses `CKA_EC_POINT`: PKCS#11 says it is the DER encoding of an OCTET STRING wrapping the
/// SEC1 point (SoftHSM does this); some modules return the bare point. Both are accepted.
pub fn parse_ec_point(bytes: &[u8]) -> Result<AffinePoint, &'static str> {
    // A SEC1 point is 33 (compressed) or 65 (uncompressed) bytes; an OCTET STRING around it
    // is `04 len point` (or `04 81 len point`). A bare uncompressed point also starts with
    // 0x04, but its second byte would have to equal its remaining length (63), which is not
    // a point length, so the two forms cannot be confused.
    let point_len = |n: usize| n == 33 || n == 65;
    let inner = match bytes {
        [0x04, len, rest @ ..] if usize::from(*len) == rest.len() && point_len(rest.len()) => rest,
        [0x04, 0x81, len, rest @ ..]
            if usize::from(*len) == rest.len() && point_len(rest.len()) =>
        {
            rest
        }
        _ => bytes,
    };
    let key = k256::PublicKey::from_sec1_bytes(inner)
        .map_err(|_| "CKA_EC_POINT is not a secp256k1 point")?;
    Ok(*key.as_affine())
}

/// The Ethereum address of a public key.
fn address_of(point: &AffinePoint) -> Address {
    let encoded = point.to_encoded_point(false);
    Address::from_raw_public_key(&encoded.as_bytes()[1..])
}

/// Multiples of one fixed point for fast variable-time multiplication by public scalars:
/// `rows[i][j] = (j + 1)·16^i·P` for the 64 four-bit windows of a scalar, so `k·P` is at most
/// 64 mixed additions and no doublings. About 84 KiB; built with 960 additions and affine
/// conversions (a few milliseconds).
struct FixedBase {
    rows: Vec<[AffinePoint; 15]>,
}

impl FixedBase {
    fn new(p: ProjectivePoint) -> Self {
        let mut rows = Vec::with_capacity(64);
        let mut base = p;
        for _ in 0..64 {
            let mut row = [AffinePoint::IDENTITY; 15];
            let mut acc = base;
            for slot in row.iter_mut() {
                *slot = acc.to_affine();
                acc += base;
            }
            // acc = 16·base: the base of the next window.
            base = acc;
            rows.push(row);
        }
        Self { rows }
    }

    /// `k·P` in variable time: only for public scalars (here: values derived from a
    /// signature, a hash and a public key).
    fn mul_vartime(&self, k: &Scalar) -> ProjectivePoint {
        let bytes = k.to_bytes();
        let mut acc = ProjectivePoint::IDENTITY;
        for (i, row) in self.rows.iter().enumerate() {
            let byte = bytes[31 - i / 2];
            let digit = if i % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            if digit != 0 {
                acc += row[usize::from(digit) - 1];
            }
        }
        acc
    }
}

/// The generator's table, built once per process.
fn generator_table() -> &'static FixedBase {
    static TABLE: OnceLock<FixedBase> = OnceLock::new();
    TABLE.get_or_init(|| FixedBase::new(ProjectivePoint::GENERATOR))
}

/// A public key prepared for [`recoverable_from_raw`]: the point and a table of its multiples
/// (about 84 KiB), so the nonce point of a signature costs table additions only.
pub struct RecoveryKey {
    point: ProjectivePoint,
    table: FixedBase,
}

impl fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecoveryKey")
            .field("address", &address_of(&self.point.to_affine()))
            .finish_non_exhaustive()
    }
}

impl RecoveryKey {
    /// Builds the tables for `public` (a few milliseconds).
    pub fn new(public: &AffinePoint) -> Self {
        generator_table();
        let point = ProjectivePoint::from(*public);
        Self {
            point,
            table: FixedBase::new(point),
        }
    }

    /// The public key.
    pub fn point(&self) -> &ProjectivePoint {
        &self.point
    }
}

/// Turns a raw PKCS#11 ECDSA signature (`r || s`, 32 bytes each) of `hash` by the key whose
/// public key is `public` into a recoverable, low-s Ethereum signature.
///
/// The recovery id is computed, not guessed. ECDSA signs with a nonce `k`, publishes
/// `r = (k·G).x mod n` and `s = k⁻¹(z + r·d) mod n`. Knowing the public key `Q = d·G`, the
/// nonce point itself is `R = k·G = (z·s⁻¹)·G + (r·s⁻¹)·Q` - the verification equation, here
/// evaluated with the fixed-base tables of `G` and `Q` (everything in it is public, so
/// variable time is fine). Its `x` reduced mod `n` must equal `r` (otherwise the signature is
/// not by this key over this hash, and it is rejected), and the recovery id is the parity of
/// `R.y`. Normalising to low-s replaces `s` by `n - s`, which is the signature made with nonce
/// `-k`, whose nonce point is `-R`: same `x`, `y` replaced by `p - y`, opposite parity - so
/// the parity is flipped exactly when `s` was flipped. The rare case `R.x ≥ n`
/// (`R.x = r + n`, probability about 2⁻¹²⁸) cannot be expressed by Ethereum's parity-only `v`
/// and is rejected too.
pub fn recoverable_from_raw(
    public: &RecoveryKey,
    hash: &B256,
    raw: &[u8],
) -> Result<Signature, &'static str> {
    if raw.len() != 64 {
        return Err("expected a 64-byte r || s signature from CKM_ECDSA");
    }
    let scalar = |b: &[u8]| -> Option<Scalar> {
        let bytes: [u8; 32] = b.try_into().ok()?;
        let s: Option<Scalar> = Scalar::from_repr(bytes.into()).into();
        s.filter(|s| !bool::from(s.is_zero()))
    };
    let r = scalar(&raw[..32]).ok_or("r is zero or not below the group order")?;
    let s = scalar(&raw[32..]).ok_or("s is zero or not below the group order")?;
    let z = <Scalar as Reduce<k256::U256>>::reduce_bytes(&FieldBytes::from(hash.0));
    // `s` is non-zero, so it has an inverse modulo the prime n; it is public: variable time.
    let s_inv = Option::<Scalar>::from(s.invert_vartime()).ok_or("s has no inverse")?;
    let big_r =
        generator_table().mul_vartime(&(z * s_inv)) + public.table.mul_vartime(&(r * s_inv));
    if bool::from(big_r.is_identity()) {
        return Err("signature does not verify against the key's public key");
    }
    let big_r = big_r.to_affine();
    let x = big_r.x();
    if <Scalar as Reduce<k256::U256>>::reduce_bytes(&x) != r {
        return Err("signature does not verify against the key's public key");
    }
    if x != r.to_bytes() {
        return Err("nonce point x is above the group order: no Ethereum recovery id");
    }
    let high = bool::from(s.is_high());
    let s = if high { -s } else { s };
    let y_parity = bool::from(big_r.y_is_odd()) ^ high;
    Ok(Signature::new(
        U256::from_be_slice(&r.to_bytes()),
        U256::from_be_slice(&s.to_bytes()),
        y_parity,
    ))
}

/// Reads the public key with `label` and checks it is on secp256k1.
fn read_public(session: &Session, label: &str) -> Result<AffinePoint, String> {
    let handles = find_keys(session, ObjectClass::PUBLIC_KEY, label).map_err(|e| e.to_string())?;
    let handle = match handles.as_slice() {
        [h] => *h,
        [] => return Err("no EC public key with this label".into()),
        _ => return Err(format!("{} EC public keys carry this label", handles.len())),
    };
    let attrs = session
        .get_attributes(handle, &[AttributeType::EcParams, AttributeType::EcPoint])
        .map_err(|e| e.to_string())?;
    let mut params = None;
    let mut point = None;
    for a in attrs {
        match a {
            Attribute::EcParams(p) => params = Some(p),
            Attribute::EcPoint(p) => point = Some(p),
            _ => {}
        }
    }
    match params {
        Some(p) if p == SECP256K1_EC_PARAMS => {}
        Some(_) => return Err("the key is not on secp256k1 (CKA_EC_PARAMS)".into()),
        None => return Err("the public key has no CKA_EC_PARAMS".into()),
    }
    let point = point.ok_or("the public key has no CKA_EC_POINT")?;
    parse_ec_point(&point).map_err(str::to_owned)
}

impl HsmSigner {
    /// Loads the module, finds the token and key by label, opens and logs in the session
    /// pool, reads the public key and derives the address.
    ///
    /// Errors are [`SignerError::Config`] naming what is wrong: the module path, the token
    /// label, the user PIN of the token (never its value), the key label, or the pool size.
    ///
    /// If this process is already logged in to the token (another signer on the same token),
    /// PKCS#11 does not check the PIN again: login state is per token and process.
    pub fn open(cfg: &HsmConfig) -> Result<HsmSigner, SignerError> {
        if cfg.sessions == 0 {
            return Err(SignerError::Config {
                what: "sessions".into(),
                reason: "the session pool needs at least one session".into(),
            });
        }
        let ctx = load_module(cfg)?;
        let slot = token_slot(&ctx, cfg)?;
        let token = |reason: String| SignerError::Config {
            what: format!("token `{}`", cfg.token_label),
            reason,
        };
        let key_err = |reason: String| SignerError::Config {
            what: format!(
                "key label `{}` on token `{}`",
                cfg.key_label, cfg.token_label
            ),
            reason,
        };

        let first = ctx
            .open_ro_session_no_drop(slot)
            .map_err(|e| token(format!("cannot open a session: {e}")))?;
        let pooled = ArrayQueue::new(cfg.sessions);
        // From here on, sessions are closed by `HsmSigner`'s Drop or by `close_all` below.
        let close_all = |first: Session, pool: &ArrayQueue<Pooled>| {
            let _ = first.close();
            while let Some(p) = pool.pop() {
                let _ = p.session.close();
            }
        };
        if let Err(e) = login(&first, &cfg.user_pin) {
            let _ = first.close();
            return Err(pin_error(cfg, &e));
        }
        let public = match read_public(&first, &cfg.key_label) {
            Ok(p) => p,
            Err(reason) => {
                close_all(first, &pooled);
                return Err(key_err(reason));
            }
        };
        let key = match private_key(&first, &cfg.key_label) {
            Ok(k) => k,
            Err(reason) => {
                close_all(first, &pooled);
                return Err(key_err(reason));
            }
        };
        let _ = pooled.push(Pooled {
            session: first,
            key,
            epoch: 0,
        });
        for _ in 1..cfg.sessions {
            let opened = ctx
                .open_ro_session_no_drop(slot)
                .map_err(|e| token(format!("cannot open a session: {e}")))
                .and_then(|s| {
                    let key = match private_key(&s, &cfg.key_label) {
                        Ok(k) => k,
                        Err(reason) => {
                            let _ = s.close();
                            return Err(key_err(reason));
                        }
                    };
                    Ok(Pooled {
                        session: s,
                        key,
                        epoch: 0,
                    })
                });
            match opened {
                Ok(p) => {
                    let _ = pooled.push(p);
                }
                Err(e) => {
                    while let Some(p) = pooled.pop() {
                        let _ = p.session.close();
                    }
                    return Err(e);
                }
            }
        }
        let signer = HsmSigner {
            ctx,
            module_path: cfg.module_path.clone(),
            token_label: cfg.token_label.clone(),
            key_label: cfg.key_label.clone(),
            pin: cfg.user_pin.clone(),
            public: RecoveryKey::new(&public),
            address: address_of(&public),
            pool: pooled,
            epoch: AtomicU64::new(0),
            cold: Mutex::new(slot),
        };
        // Probe: the private key with this label must match the public key with this label.
        let probe = alloy_primitives::keccak256(b"hsm signer start-up probe");
        signer.sign_hash(&probe).map_err(|e| {
            key_err(format!(
                "a probe signature does not match the public key with the same label: {e}"
            ))
        })?;
        Ok(signer)
    }

    /// Generates a secp256k1 key pair inside the token, labelled [`HsmConfig::key_label`]:
    /// the private key is a token object that is sensitive, not extractable and may sign;
    /// the public key is a token object that may verify. Returns the key's address.
    ///
    /// Refuses ([`SignerError::Config`]) if a key with that label exists already.
    pub fn generate_key(cfg: &HsmConfig) -> Result<Address, SignerError> {
        let key_err = |reason: String| SignerError::Config {
            what: format!(
                "key label `{}` on token `{}`",
                cfg.key_label, cfg.token_label
            ),
            reason,
        };
        let session = rw_session(cfg)?;
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            let existing =
                find_keys(&session, class, &cfg.key_label).map_err(|e| key_err(e.to_string()))?;
            if !existing.is_empty() {
                return Err(key_err("a key with this label exists already".into()));
            }
        }
        let label = cfg.key_label.as_bytes().to_vec();
        let public_template = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(SECP256K1_EC_PARAMS.to_vec()),
            Attribute::Label(label.clone()),
            Attribute::Id(label.clone()),
        ];
        let private_template = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(label.clone()),
            Attribute::Id(label),
        ];
        session
            .generate_key_pair(
                &Mechanism::EccKeyPairGen,
                &public_template,
                &private_template,
            )
            .map_err(|e| key_err(format!("key generation failed: {e}")))?;
        let public = read_public(&session, &cfg.key_label).map_err(key_err)?;
        Ok(address_of(&public))
    }

    /// The key's public key (read once at start).
    pub fn public_key(&self) -> k256::PublicKey {
        // Parsed and checked on the curve at start; the identity is not a valid SEC1 point.
        k256::PublicKey::from_affine(self.public.point.to_affine())
            .unwrap_or_else(|_| unreachable!("the public key was parsed from SEC1 bytes at start"))
    }

    /// The public key with its tables, as [`recoverable_from_raw`] takes it.
    pub fn recovery_key(&self) -> &RecoveryKey {
        &self.public
    }

    /// Label of the token the key lives in.
    pub fn token_label(&self) -> &str {
        &self.token_label
    }

    /// Number of sessions in the warm pool.
    pub fn pool_size(&self) -> usize {
        self.pool.capacity()
    }

    fn unavailable(&self, reason: impl fmt::Display) -> SignerError {
        SignerError::Unavailable {
            key_id: self.key_label.clone(),
            reason: format!(
                "token `{}` in module `{}`: {reason}",
                self.token_label,
                self.module_path.display()
            ),
        }
    }

    fn signing(&self, reason: impl fmt::Display) -> SignerError {
        SignerError::Signing {
            key_id: self.key_label.clone(),
            reason: reason.to_string(),
        }
    }

    /// A session of the current epoch: from the pool, or a new one if the pool is empty.
    fn checkout(&self) -> Result<Pooled, SignerError> {
        loop {
            match self.pool.pop() {
                Some(p) if p.epoch == self.epoch.load(Ordering::Acquire) => return Ok(p),
                // Stale: dropped without C_CloseSession (the handle may belong to someone
                // else by now; see the module docs).
                Some(_stale) => continue,
                None => {
                    let slot = self.cold.lock().unwrap_or_else(|p| p.into_inner());
                    return self.reopen(*slot);
                }
            }
        }
    }

    /// Returns a session to the pool, or closes it if the pool is full.
    fn checkin(&self, p: Pooled) {
        if p.epoch != self.epoch.load(Ordering::Acquire) {
            return;
        }
        if let Err(extra) = self.pool.push(p) {
            let _ = extra.session.close();
        }
    }

    /// Opens a session on `slot`, logs in, finds the key and checks its public key.
    fn reopen(&self, slot: Slot) -> Result<Pooled, SignerError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let session = self
            .ctx
            .open_ro_session_no_drop(slot)
            .map_err(|e| self.unavailable(format!("cannot open a session: {e}")))?;
        let fail = |session: Session, reason: String| {
            let _ = session.close();
            Err(self.unavailable(reason))
        };
        if let Err(e) = login(&session, &self.pin) {
            let reason = match e {
                CkError::Pkcs11(RvError::PinIncorrect, _) => {
                    "the user PIN is no longer accepted".to_owned()
                }
                e => format!("login failed: {e}"),
            };
            return fail(session, reason);
        }
        let key = match private_key(&session, &self.key_label) {
            Ok(k) => k,
            Err(reason) => return fail(session, format!("key `{}`: {reason}", self.key_label)),
        };
        match read_public(&session, &self.key_label) {
            Ok(p) if ProjectivePoint::from(p) == self.public.point => {}
            Ok(_) => {
                return fail(
                    session,
                    format!("key `{}` has a different public key now", self.key_label),
                );
            }
            Err(reason) => return fail(session, format!("key `{}`: {reason}", self.key_label)),
        }
        Ok(Pooled {
            session,
            key,
            epoch,
        })
    }

    /// Repairs what `fault` says is broken. Returns a session to retry with.
    fn repair(&self, mut p: Pooled, fault: Fault) -> Result<Pooled, SignerError> {
        let mut slot = self.cold.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(fault, Fault::NotLoggedIn | Fault::KeyHandle) {
            // The session is alive. Log in again (a logged-out user also makes private keys
            // invisible, which some modules report as an invalid key handle) and find the key
            // again; its public key is checked again below only when the session is replaced.
            let relogin = login(&p.session, &self.pin);
            match relogin {
                Ok(()) => match private_key(&p.session, &self.key_label) {
                    Ok(k) => {
                        p.key = k;
                        return Ok(p);
                    }
                    Err(reason) => {
                        self.checkin(p);
                        return Err(self.unavailable(format!("key `{}`: {reason}", self.key_label)));
                    }
                },
                Err(e) if Fault::of(&e).is_some_and(Fault::kills_sessions) => {}
                Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                    self.checkin(p);
                    return Err(self.unavailable("the user PIN is no longer accepted"));
                }
                Err(e) => {
                    self.checkin(p);
                    return Err(self.unavailable(format!("login failed: {e}")));
                }
            }
        }
        // Every session may be gone: start a new epoch (once per incident) and rebuild.
        let _ =
            self.epoch
                .compare_exchange(p.epoch, p.epoch + 1, Ordering::AcqRel, Ordering::Acquire);
        drop(p); // stale: not closed, see the module docs
        if let Err(e) = initialize(&self.ctx) {
            return Err(self.unavailable(format!("cannot re-initialise the module: {e}")));
        }
        let (slots, present) = find_token(&self.ctx, &self.token_label)
            .map_err(|e| self.unavailable(format!("cannot list tokens: {e}")))?;
        match slots.as_slice() {
            [s] => *slot = *s,
            [] => {
                return Err(self.unavailable(format!(
                    "the token is no longer present (tokens present: {present:?})"
                )));
            }
            _ => return Err(self.unavailable("several tokens carry this label now")),
        }
        self.reopen(*slot)
    }
}

/// Loads and initialises the module named in `cfg`.
fn load_module(cfg: &HsmConfig) -> Result<Pkcs11, SignerError> {
    let what = || format!("PKCS#11 module `{}`", cfg.module_path.display());
    if !cfg.module_path.is_file() {
        return Err(SignerError::Config {
            what: what(),
            reason: "no such file".into(),
        });
    }
    let ctx = Pkcs11::new(&cfg.module_path).map_err(|e| SignerError::Config {
        what: what(),
        reason: format!("cannot load it: {e}"),
    })?;
    initialize(&ctx).map_err(|e| SignerError::Config {
        what: what(),
        reason: format!("C_Initialize failed: {e}"),
    })?;
    Ok(ctx)
}

/// The one slot holding the token labelled `cfg.token_label`.
fn token_slot(ctx: &Pkcs11, cfg: &HsmConfig) -> Result<Slot, SignerError> {
    let what = || format!("token label `{}`", cfg.token_label);
    let (slots, present) = find_token(ctx, &cfg.token_label).map_err(|e| SignerError::Config {
        what: what(),
        reason: format!("cannot list tokens: {e}"),
    })?;
    match slots.as_slice() {
        [s] => Ok(*s),
        [] => Err(SignerError::Config {
            what: what(),
            reason: format!(
                "no initialised token with this label in module `{}` (tokens present: {present:?})",
                cfg.module_path.display()
            ),
        }),
        _ => Err(SignerError::Config {
            what: what(),
            reason: format!("{} tokens carry this label", slots.len()),
        }),
    }
}

/// A read-write session on the token of `cfg`, logged in as the user, for creating keys.
/// The session closes when dropped (on every path of the caller).
fn rw_session(cfg: &HsmConfig) -> Result<Session, SignerError> {
    let ctx = load_module(cfg)?;
    let slot = token_slot(&ctx, cfg)?;
    let session = ctx.open_rw_session(slot).map_err(|e| SignerError::Config {
        what: format!("token `{}`", cfg.token_label),
        reason: format!("cannot open a read-write session: {e}"),
    })?;
    login(&session, &cfg.user_pin).map_err(|e| pin_error(cfg, &e))?;
    Ok(session)
}

/// The error for a failed login, naming the token's PIN but never its value.
fn pin_error(cfg: &HsmConfig, e: &CkError) -> SignerError {
    let reason = match e {
        CkError::Pkcs11(RvError::PinIncorrect, _) => "incorrect (CKR_PIN_INCORRECT)".to_owned(),
        CkError::Pkcs11(RvError::PinLocked, _) => "locked (CKR_PIN_LOCKED)".to_owned(),
        e => format!("login failed: {e}"),
    };
    SignerError::Config {
        what: format!("user PIN of token `{}`", cfg.token_label),
        reason,
    }
}

/// The one EC private key labelled `label` that may sign.
fn private_key(session: &Session, label: &str) -> Result<ObjectHandle, String> {
    let handles = find_keys(session, ObjectClass::PRIVATE_KEY, label).map_err(|e| e.to_string())?;
    let key = match handles.as_slice() {
        [h] => *h,
        [] => return Err("no EC private key with this label".into()),
        _ => {
            return Err(format!(
                "{} EC private keys carry this label",
                handles.len()
            ));
        }
    };
    let attrs = session
        .get_attributes(key, &[AttributeType::Sign])
        .map_err(|e| e.to_string())?;
    if !attrs.iter().any(|a| matches!(a, Attribute::Sign(true))) {
        return Err("the private key may not sign (CKA_SIGN is false)".into());
    }
    Ok(key)
}

impl Signer for HsmSigner {
    fn address(&self) -> Address {
        self.address
    }

    fn key_id(&self) -> &str {
        &self.key_label
    }

    fn backend(&self) -> Backend {
        Backend::Hsm
    }

    fn sign_hash(&self, hash: &B256) -> Result<Signature, SignerError> {
        let p = self.checkout()?;
        let first = p.session.sign(&Mechanism::Ecdsa, p.key, hash.as_slice());
        let raw = match first {
            Ok(raw) => {
                self.checkin(p);
                raw
            }
            Err(e) => {
                let Some(fault) = Fault::of(&e) else {
                    self.checkin(p);
                    return Err(self.signing(e));
                };
                // Repair once, retry once.
                let p = self.repair(p, fault)?;
                match p.session.sign(&Mechanism::Ecdsa, p.key, hash.as_slice()) {
                    Ok(raw) => {
                        self.checkin(p);
                        raw
                    }
                    Err(e) if Fault::of(&e).is_some() => {
                        self.checkin(p);
                        return Err(self.unavailable(format!("still failing after repair: {e}")));
                    }
                    Err(e) => {
                        self.checkin(p);
                        return Err(self.signing(e));
                    }
                }
            }
        };
        recoverable_from_raw(&self.public, hash, &raw).map_err(|r| self.signing(r))
    }
}

impl Drop for HsmSigner {
    fn drop(&mut self) {
        let epoch = self.epoch.load(Ordering::Acquire);
        while let Some(p) = self.pool.pop() {
            if p.epoch == epoch {
                let _ = p.session.close();
            }
        }
    }
}

/// A key-encryption key inside a PKCS#11 token: an AES-256 secret key labelled
/// [`HsmConfig::key_label`], sensitive and not extractable. Wrapping is `C_Encrypt` with
/// `CKM_AES_GCM` (random 96-bit IV, 128-bit tag); a wrapped key is `IV || ciphertext ||
/// tag` (60 bytes). One logged-in session serves every call: they are rare (one per
/// segment created or opened).
pub struct HsmKek {
    // Field order is drop order: the session closes before the module handle goes.
    session: Mutex<Session>,
    key: ObjectHandle,
    id: String,
    _ctx: Pkcs11,
}

impl fmt::Debug for HsmKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HsmKek")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// AES secret keys labelled `label`.
fn find_secret_keys(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, CkError> {
    session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
}

const KEK_IV: usize = 12;
const KEK_TAG_BITS: u64 = 128;
/// The additional data bound to every wrapped key, so a ciphertext made with this KEK
/// for another purpose does not unwrap as a data key.
const KEK_AAD: &[u8] = b"engine at-rest data key v1";

impl HsmKek {
    /// Generates the AES-256 KEK inside the token (a token object, sensitive, never
    /// extractable, encrypt and decrypt only). Refuses if a secret key with that label
    /// exists already.
    pub fn generate(cfg: &HsmConfig) -> Result<(), SignerError> {
        let key_err = |reason: String| SignerError::Config {
            what: format!(
                "key-encryption key `{}` on token `{}`",
                cfg.key_label, cfg.token_label
            ),
            reason,
        };
        let session = rw_session(cfg)?;
        if !find_secret_keys(&session, &cfg.key_label)
            .map_err(|e| key_err(e.to_string()))?
            .is_empty()
        {
            return Err(key_err(
                "a secret key with this label exists already".into(),
            ));
        }
        let label = cfg.key_label.as_bytes().to_vec();
        session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32u64.into()),
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::Label(label.clone()),
                    Attribute::Id(label),
                ],
            )
            .map_err(|e| key_err(format!("key generation failed: {e}")))?;
        Ok(())
    }

    /// Opens the token, logs in and finds the KEK by label; a probe wraps and unwraps a
    /// throwaway key to prove the key can do both.
    pub fn open(cfg: &HsmConfig) -> Result<HsmKek, SignerError> {
        let ctx = load_module(cfg)?;
        let slot = token_slot(&ctx, cfg)?;
        let key_err = |reason: String| SignerError::Config {
            what: format!(
                "key-encryption key `{}` on token `{}`",
                cfg.key_label, cfg.token_label
            ),
            reason,
        };
        let session = ctx.open_ro_session(slot).map_err(|e| SignerError::Config {
            what: format!("token `{}`", cfg.token_label),
            reason: format!("cannot open a session: {e}"),
        })?;
        login(&session, &cfg.user_pin).map_err(|e| pin_error(cfg, &e))?;
        let found =
            find_secret_keys(&session, &cfg.key_label).map_err(|e| key_err(e.to_string()))?;
        let key = match found.as_slice() {
            [k] => *k,
            [] => return Err(key_err("no AES secret key with this label".into())),
            more => return Err(key_err(format!("{} AES keys carry this label", more.len()))),
        };
        let kek = HsmKek {
            session: Mutex::new(session),
            key,
            id: format!("hsm:{}/{}", cfg.token_label, cfg.key_label),
            _ctx: ctx,
        };
        let probe = crate::kek::DataKey::new([0x5a; crate::kek::DATA_KEY_LEN]);
        let back = crate::kek::KeyWrap::wrap(&kek, &probe)
            .and_then(|w| crate::kek::KeyWrap::unwrap(&kek, &w))
            .map_err(|e| key_err(format!("probe wrap and unwrap failed: {e}")))?;
        if back.bytes() != probe.bytes() {
            return Err(key_err("probe unwrap returned other bytes".into()));
        }
        Ok(kek)
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, what: &str, e: CkError) -> SignerError {
        SignerError::Signing {
            key_id: self.id.clone(),
            reason: format!("{what}: {e}"),
        }
    }
}

impl crate::kek::KeyWrap for HsmKek {
    fn id(&self) -> &str {
        &self.id
    }

    fn wrap(&self, key: &crate::kek::DataKey) -> Result<Vec<u8>, SignerError> {
        let session = self.session();
        let mut iv = [0u8; KEK_IV];
        session
            .generate_random_slice(&mut iv)
            .map_err(|e| self.fail("C_GenerateRandom", e))?;
        let mut iv_param = iv;
        let params =
            cryptoki::mechanism::aead::GcmParams::new(&mut iv_param, KEK_AAD, KEK_TAG_BITS.into())
                .map_err(|e| self.fail("GCM parameters", e))?;
        let ct = session
            .encrypt(&Mechanism::AesGcm(params), self.key, key.bytes())
            .map_err(|e| self.fail("C_Encrypt (CKM_AES_GCM)", e))?;
        let mut out = Vec::with_capacity(KEK_IV + ct.len());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn unwrap(&self, wrapped: &[u8]) -> Result<crate::kek::DataKey, SignerError> {
        if wrapped.len() != KEK_IV + crate::kek::DATA_KEY_LEN + 16 {
            return Err(SignerError::Signing {
                key_id: self.id.clone(),
                reason: format!(
                    "a wrapped key of {} bytes; this KEK wraps to {}",
                    wrapped.len(),
                    KEK_IV + crate::kek::DATA_KEY_LEN + 16
                ),
            });
        }
        let mut iv = [0u8; KEK_IV];
        iv.copy_from_slice(&wrapped[..KEK_IV]);
        let params =
            cryptoki::mechanism::aead::GcmParams::new(&mut iv, KEK_AAD, KEK_TAG_BITS.into())
                .map_err(|e| self.fail("GCM parameters", e))?;
        let plain = self
            .session()
            .decrypt(&Mechanism::AesGcm(params), self.key, &wrapped[KEK_IV..])
            .map_err(|e| {
                self.fail(
                    "C_Decrypt (CKM_AES_GCM): the wrapped key does not authenticate",
                    e,
                )
            })?;
        crate::kek::data_key_from(plain, &self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Textbook ECDSA with a chosen nonce and no low-s normalisation, as an HSM returns it:
    /// `r = (k·G).x mod n`, `s = k⁻¹(z + r·d)`; `None` for the negligible degenerate cases.
    fn raw_ecdsa(d: &Scalar, k: &Scalar, hash: &B256) -> Option<Vec<u8>> {
        let z = <Scalar as Reduce<k256::U256>>::reduce_bytes(&FieldBytes::from(hash.0));
        let big_r = (ProjectivePoint::GENERATOR * k).to_affine();
        let r = <Scalar as Reduce<k256::U256>>::reduce_bytes(&big_r.x());
        let k_inv = Option::<Scalar>::from(k.invert())?;
        let s = k_inv * (z + r * d);
        if bool::from(r.is_zero()) || bool::from(s.is_zero()) {
            return None;
        }
        let mut out = r.to_bytes().to_vec();
        out.extend_from_slice(&s.to_bytes());
        Some(out)
    }

    fn scalar(b: [u8; 32]) -> Option<Scalar> {
        Option::<Scalar>::from(Scalar::from_repr(b.into())).filter(|s| !bool::from(s.is_zero()))
    }

    fn public_of(d: &Scalar) -> AffinePoint {
        (ProjectivePoint::GENERATOR * d).to_affine()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// For random keys, hashes and nonces - high-s outputs included, as an HSM gives
        /// them - the computed recovery id recovers the key's address and s is low.
        #[test]
        fn recovery_id_matches_recovery(d in any::<[u8; 32]>(), hash in any::<[u8; 32]>(), k in any::<[u8; 32]>()) {
            let (Some(d), Some(k)) = (scalar(d), scalar(k)) else { return Ok(()) };
            let hash = B256::from(hash);
            let Some(raw) = raw_ecdsa(&d, &k, &hash) else { return Ok(()) };
            let public = public_of(&d);
            let out = recoverable_from_raw(&RecoveryKey::new(&public), &hash, &raw).unwrap();
            let half_n = U256::from_be_slice(&(-Scalar::ONE).to_bytes()) >> 1;
            prop_assert!(out.s() <= half_n);
            prop_assert_eq!(out.r(), U256::from_be_slice(&raw[..32]));
            prop_assert_eq!(out.recover_address_from_prehash(&hash).unwrap(), address_of(&public));
        }
    }

    /// The fixed-base tables multiply like the generic scalar multiplication.
    #[test]
    fn fixed_base_tables_multiply_correctly() {
        let p = ProjectivePoint::GENERATOR * Scalar::from(0x1234_5678u64);
        let table = FixedBase::new(p);
        let mut ks = vec![Scalar::ZERO, Scalar::ONE, -Scalar::ONE, Scalar::from(16u64)];
        let mut k = Scalar::from(3u64);
        for _ in 0..100 {
            k = k * k + Scalar::from(7u64);
            ks.push(k);
        }
        for k in ks {
            assert_eq!(table.mul_vartime(&k), p * k);
            assert_eq!(
                generator_table().mul_vartime(&k),
                ProjectivePoint::GENERATOR * k
            );
        }
    }

    #[test]
    fn both_parities_and_both_s_halves_occur() {
        let d = Scalar::from(7u64);
        let public = public_of(&d);
        let key = RecoveryKey::new(&public);
        let (mut parity, mut flipped) = ([0usize; 2], 0usize);
        for i in 0u64..200 {
            let hash = alloy_primitives::keccak256(i.to_be_bytes());
            let raw = raw_ecdsa(&d, &Scalar::from(i + 1_000), &hash).unwrap();
            flipped += usize::from(raw[32] >= 0x80);
            let out = recoverable_from_raw(&key, &hash, &raw).unwrap();
            parity[usize::from(out.v())] += 1;
            assert_eq!(
                out.recover_address_from_prehash(&hash).unwrap(),
                address_of(&public)
            );
        }
        assert!(parity[0] > 50 && parity[1] > 50, "{parity:?}");
        assert!(flipped > 50 && flipped < 150, "{flipped}");
    }

    #[test]
    fn rejects_wrong_hash_wrong_key_and_malformed_input() {
        let d = Scalar::from(7u64);
        let public = RecoveryKey::new(&public_of(&d));
        let hash = B256::repeat_byte(1);
        let k = Scalar::from(99u64);
        let by_other = raw_ecdsa(&Scalar::from(8u64), &k, &hash).unwrap();
        assert!(recoverable_from_raw(&public, &hash, &by_other).is_err());
        let good = raw_ecdsa(&d, &k, &hash).unwrap();
        assert!(recoverable_from_raw(&public, &hash, &good).is_ok());
        assert!(recoverable_from_raw(&public, &B256::repeat_byte(2), &good).is_err());
        assert!(recoverable_from_raw(&public, &hash, &[0u8; 64]).is_err());
        assert!(recoverable_from_raw(&public, &hash, &good[..63]).is_err());
        assert!(recoverable_from_raw(&public, &hash, &[0xffu8; 64]).is_err());
    }

    #[test]
    fn ec_point_wrapped_or_bare() {
        let point = public_of(&Scalar::from(7u64));
        let bare = point.to_encoded_point(false).as_bytes().to_vec();
        let mut wrapped = vec![0x04, 65];
        wrapped.extend_from_slice(&bare);
        let compressed = point.to_encoded_point(true).as_bytes().to_vec();
        let mut wrapped_compressed = vec![0x04, 33];
        wrapped_compressed.extend_from_slice(&compressed);
        for bytes in [&bare, &wrapped, &compressed, &wrapped_compressed] {
            assert_eq!(parse_ec_point(bytes).unwrap(), point);
        }
        assert!(parse_ec_point(&wrapped[..66]).is_err());
        assert!(parse_ec_point(&[0x04, 0x00]).is_err());
    }

    #[test]
    fn config_debug_does_not_print_the_pin() {
        let cfg = HsmConfig::new("/x.so", "tok", AuthPin::from("s3cret-pin-9182"), "k");
        let text = format!("{cfg:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("tok") && text.contains("redacted"), "{text}");
    }
}
