//! One account's key as the signing stage holds it, and fail-over from a primary custody
//! boundary to a standby one holding the same key (the same address).
//!
//! - [`AnySigner`]: a key the stage signs with inline ([`Signer`]: local, HSM) or hands to
//!   the async worker ([`AsyncSigner`]: KMS, MPC).
//! - [`FailoverSigner`]: both inline. [`FailoverAsync`]: at least one of them async (an
//!   inline one is then called from the worker's thread, never the stage's).
//!
//! Fail-over happens on [`SignerError::Unavailable`] only (the boundary cannot be reached:
//! HSM gone, KMS unreachable, MPC parties down). A refusal by a reachable backend
//! ([`SignerError::Signing`], a wrong signature) is final: another boundary is not asked to
//! sign what one refused. After a fail-over the primary is skipped for `retry_after`, then
//! tried again on the next request.
//!
//! # Invariants
//!
//! - Primary and standby have the same address (checked at construction), so a signature
//!   from either recovers to the account's address.
//! - Every request is signed by at most one boundary successfully; the standby is asked
//!   only after the primary reported itself unavailable or while it is marked down.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, Signature};

use crate::{AsyncSigner, Backend, SignFuture, Signer, SignerError};

/// A key the signing stage uses: inline or through the async worker.
#[derive(Clone, Debug)]
pub enum AnySigner {
    /// Signed on the stage's thread (local key, warm HSM session).
    Sync(Arc<dyn Signer>),
    /// Signed on the async worker beside the stage (KMS, MPC).
    Async(Arc<dyn AsyncSigner>),
}

impl AnySigner {
    /// The key's address.
    pub fn address(&self) -> Address {
        match self {
            AnySigner::Sync(s) => s.address(),
            AnySigner::Async(s) => s.address(),
        }
    }

    /// The key's id.
    pub fn key_id(&self) -> &str {
        match self {
            AnySigner::Sync(s) => s.key_id(),
            AnySigner::Async(s) => s.key_id(),
        }
    }

    /// The key's boundary.
    pub fn backend(&self) -> Backend {
        match self {
            AnySigner::Sync(s) => s.backend(),
            AnySigner::Async(s) => s.backend(),
        }
    }

    /// Times a standby signed instead of the primary (0 without a standby).
    pub fn failovers(&self) -> u64 {
        match self {
            AnySigner::Sync(s) => s.failovers(),
            AnySigner::Async(s) => s.failovers(),
        }
    }

    /// Moves signing to the standby for the retry period (see [`Signer::fail_over`]).
    pub fn fail_over(&self) -> bool {
        match self {
            AnySigner::Sync(s) => s.fail_over(),
            AnySigner::Async(s) => s.fail_over(),
        }
    }

    /// Presignatures (or similar) ready, for async signers that prepare ahead.
    pub fn available(&self) -> Option<usize> {
        match self {
            AnySigner::Sync(_) => None,
            AnySigner::Async(s) => s.available(),
        }
    }

    /// Whether the stage must hand requests to the async worker.
    pub fn is_async(&self) -> bool {
        matches!(self, AnySigner::Async(_))
    }

    /// Pairs this key with a standby for the same address: inline when both are inline,
    /// otherwise async.
    pub fn with_standby(
        self,
        standby: AnySigner,
        retry_after: Duration,
    ) -> Result<AnySigner, SignerError> {
        Ok(match (self, standby) {
            (AnySigner::Sync(p), AnySigner::Sync(s)) => {
                AnySigner::Sync(Arc::new(FailoverSigner::new(p, s, retry_after)?))
            }
            (p, s) => AnySigner::Async(Arc::new(FailoverAsync::new(p, s, retry_after)?)),
        })
    }

    fn sign_future(&self, hash: B256) -> SignFuture {
        match self {
            AnySigner::Sync(s) => {
                let r = s.sign_hash(&hash);
                Box::pin(async move { r })
            }
            AnySigner::Async(s) => s.sign_hash_async(hash),
        }
    }
}

/// When the primary may be tried again, and how often the standby took over.
#[derive(Debug)]
struct Health {
    /// Monotonic ns (since `origin`) before which the primary is skipped; 0 = up.
    down_until_ns: AtomicU64,
    failovers: AtomicU64,
    origin: Instant,
    retry_after: Duration,
}

impl Health {
    fn new(retry_after: Duration) -> Self {
        Self {
            down_until_ns: AtomicU64::new(0),
            failovers: AtomicU64::new(0),
            origin: Instant::now(),
            retry_after,
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn primary_up(&self) -> bool {
        let until = self.down_until_ns.load(Ordering::Acquire);
        until == 0 || self.now_ns() >= until
    }

    fn mark_down(&self) {
        self.failovers.fetch_add(1, Ordering::Relaxed);
        let until = self.now_ns().saturating_add(
            u64::try_from(self.retry_after.as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        self.down_until_ns.store(until, Ordering::Release);
    }

    /// Marks the primary down unless it is down already; true when it changed.
    fn force_down(&self) -> bool {
        if self.primary_up() {
            self.mark_down();
            true
        } else {
            false
        }
    }

    fn mark_up(&self) {
        if self.down_until_ns.load(Ordering::Relaxed) != 0 {
            self.down_until_ns.store(0, Ordering::Release);
        }
    }
}

fn check_same_address(primary: Address, standby: Address, key: &str) -> Result<(), SignerError> {
    if primary == standby {
        Ok(())
    } else {
        Err(SignerError::Config {
            what: format!("standby of key `{key}`"),
            reason: format!("its address {standby} differs from the primary's {primary}"),
        })
    }
}

/// Primary and standby both signed inline.
pub struct FailoverSigner {
    primary: Arc<dyn Signer>,
    standby: Arc<dyn Signer>,
    health: Health,
}

impl fmt::Debug for FailoverSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverSigner")
            .field("primary", &self.primary)
            .field("standby", &self.standby)
            .field("failovers", &self.failovers())
            .finish()
    }
}

impl FailoverSigner {
    /// Pairs two inline signers of the same address.
    pub fn new(
        primary: Arc<dyn Signer>,
        standby: Arc<dyn Signer>,
        retry_after: Duration,
    ) -> Result<Self, SignerError> {
        check_same_address(primary.address(), standby.address(), primary.key_id())?;
        Ok(Self {
            primary,
            standby,
            health: Health::new(retry_after),
        })
    }
}

impl Signer for FailoverSigner {
    fn address(&self) -> Address {
        self.primary.address()
    }

    fn key_id(&self) -> &str {
        self.primary.key_id()
    }

    fn backend(&self) -> Backend {
        self.primary.backend()
    }

    fn failovers(&self) -> u64 {
        self.health.failovers.load(Ordering::Relaxed)
    }

    fn fail_over(&self) -> bool {
        self.health.force_down()
    }

    fn sign_hash(&self, hash: &B256) -> Result<Signature, SignerError> {
        if self.health.primary_up() {
            match self.primary.sign_hash(hash) {
                Ok(sig) => {
                    self.health.mark_up();
                    return Ok(sig);
                }
                Err(SignerError::Unavailable { .. }) => self.health.mark_down(),
                Err(e) => return Err(e),
            }
        }
        self.standby.sign_hash(hash)
    }
}

/// Primary and standby where at least one is async.
pub struct FailoverAsync {
    primary: AnySigner,
    standby: AnySigner,
    health: Arc<Health>,
    key_id: String,
}

impl fmt::Debug for FailoverAsync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FailoverAsync")
            .field("primary", &self.primary)
            .field("standby", &self.standby)
            .field("failovers", &self.failovers())
            .finish()
    }
}

impl FailoverAsync {
    /// Pairs two signers of the same address.
    pub fn new(
        primary: AnySigner,
        standby: AnySigner,
        retry_after: Duration,
    ) -> Result<Self, SignerError> {
        check_same_address(primary.address(), standby.address(), primary.key_id())?;
        Ok(Self {
            key_id: primary.key_id().to_owned(),
            primary,
            standby,
            health: Arc::new(Health::new(retry_after)),
        })
    }
}

impl AsyncSigner for FailoverAsync {
    fn address(&self) -> Address {
        self.primary.address()
    }

    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn backend(&self) -> Backend {
        self.primary.backend()
    }

    fn sign_hash_async(&self, hash: B256) -> SignFuture {
        let health = Arc::clone(&self.health);
        let standby = self.standby.clone();
        if !health.primary_up() {
            return standby.sign_future(hash);
        }
        let first = self.primary.sign_future(hash);
        Box::pin(async move {
            match first.await {
                Ok(sig) => {
                    health.mark_up();
                    Ok(sig)
                }
                Err(SignerError::Unavailable { .. }) => {
                    health.mark_down();
                    standby.sign_future(hash).await
                }
                Err(e) => Err(e),
            }
        })
    }

    fn failovers(&self) -> u64 {
        self.health.failovers.load(Ordering::Relaxed)
    }

    fn fail_over(&self) -> bool {
        self.health.force_down()
    }

    fn available(&self) -> Option<usize> {
        if self.health.primary_up() {
            match &self.primary {
                AnySigner::Async(s) => s.available(),
                AnySigner::Sync(_) => None,
            }
        } else {
            match &self.standby {
                AnySigner::Async(s) => s.available(),
                AnySigner::Sync(_) => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::{LocalCurve, LocalSigner};

    const KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
    const OTHER: &str = "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

    /// A local key whose boundary can be switched off.
    #[derive(Debug)]
    struct Switchable {
        inner: LocalSigner,
        down: AtomicBool,
        refuse: AtomicBool,
        calls: AtomicU64,
    }

    impl Switchable {
        fn new(hex: &str) -> Arc<Self> {
            Arc::new(Self {
                inner: LocalSigner::from_hex("primary", hex, LocalCurve::K256).unwrap(),
                down: AtomicBool::new(false),
                refuse: AtomicBool::new(false),
                calls: AtomicU64::new(0),
            })
        }
    }

    impl Signer for Switchable {
        fn address(&self) -> Address {
            self.inner.address()
        }
        fn key_id(&self) -> &str {
            "primary"
        }
        fn backend(&self) -> Backend {
            Backend::Hsm
        }
        fn sign_hash(&self, hash: &B256) -> Result<Signature, SignerError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.down.load(Ordering::Relaxed) {
                return Err(SignerError::Unavailable {
                    key_id: "primary".into(),
                    reason: "token removed".into(),
                });
            }
            if self.refuse.load(Ordering::Relaxed) {
                return Err(SignerError::Signing {
                    key_id: "primary".into(),
                    reason: "refused".into(),
                });
            }
            self.inner.sign_hash(hash)
        }
    }

    fn standby(hex: &str) -> Arc<dyn Signer> {
        Arc::new(LocalSigner::from_hex("standby", hex, LocalCurve::Secp256k1).unwrap())
    }

    #[test]
    fn standby_must_hold_the_same_address() {
        let err = FailoverSigner::new(Switchable::new(KEY), standby(OTHER), Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(err.contains("differs from the primary"), "{err}");
    }

    #[test]
    fn unavailable_primary_fails_over_and_is_retried_later() {
        let primary = Switchable::new(KEY);
        let f = FailoverSigner::new(
            Arc::clone(&primary) as Arc<dyn Signer>,
            standby(KEY),
            Duration::from_millis(50),
        )
        .unwrap();
        let h = B256::repeat_byte(7);
        assert_eq!(
            f.sign_hash_checked(&h)
                .unwrap()
                .recover_address_from_prehash(&h)
                .unwrap(),
            f.address()
        );
        primary.down.store(true, Ordering::Relaxed);
        f.sign_hash_checked(&h).unwrap();
        assert_eq!(f.failovers(), 1);
        let calls = primary.calls.load(Ordering::Relaxed);
        // Marked down: the primary is not asked again until `retry_after` has passed.
        f.sign_hash_checked(&h).unwrap();
        assert_eq!(primary.calls.load(Ordering::Relaxed), calls);
        primary.down.store(false, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(60));
        f.sign_hash_checked(&h).unwrap();
        assert_eq!(primary.calls.load(Ordering::Relaxed), calls + 1);
        assert_eq!(f.failovers(), 1);
    }

    #[test]
    fn a_forced_fail_over_signs_on_the_standby_until_the_retry_period_ends() {
        let primary = Switchable::new(KEY);
        let any = AnySigner::Sync(Arc::clone(&primary) as Arc<dyn Signer>)
            .with_standby(AnySigner::Sync(standby(KEY)), Duration::from_millis(50))
            .unwrap();
        let AnySigner::Sync(f) = &any else {
            panic!("two inline signers stay inline")
        };
        let h = B256::repeat_byte(9);
        assert!(any.fail_over(), "the primary was up");
        assert!(!any.fail_over(), "already on the standby");
        assert_eq!(any.failovers(), 1);
        f.sign_hash_checked(&h).unwrap();
        assert_eq!(
            primary.calls.load(Ordering::Relaxed),
            0,
            "the standby signed"
        );
        std::thread::sleep(Duration::from_millis(60));
        f.sign_hash_checked(&h).unwrap();
        assert_eq!(
            primary.calls.load(Ordering::Relaxed),
            1,
            "back on the primary"
        );
        let lone = AnySigner::Sync(standby(KEY));
        assert!(!lone.fail_over(), "no standby: nothing to move to");
    }

    #[test]
    fn a_refusal_is_not_retried_elsewhere() {
        let primary = Switchable::new(KEY);
        primary.refuse.store(true, Ordering::Relaxed);
        let f = FailoverSigner::new(primary, standby(KEY), Duration::ZERO).unwrap();
        let err = f.sign_hash(&B256::ZERO).unwrap_err();
        assert!(matches!(err, SignerError::Signing { .. }), "{err}");
        assert_eq!(f.failovers(), 0);
    }

    #[test]
    fn mixed_pair_is_async_and_fails_over() {
        let primary = Switchable::new(KEY);
        primary.down.store(true, Ordering::Relaxed);
        let any = AnySigner::Sync(primary)
            .with_standby(AnySigner::Sync(standby(KEY)), Duration::from_secs(1))
            .unwrap();
        assert!(!any.is_async(), "two inline signers stay inline");

        let primary = Switchable::new(KEY);
        primary.down.store(true, Ordering::Relaxed);
        let asynced: Arc<dyn AsyncSigner> = Arc::new(
            FailoverAsync::new(
                AnySigner::Sync(primary),
                AnySigner::Sync(standby(KEY)),
                Duration::from_secs(1),
            )
            .unwrap(),
        );
        let h = B256::repeat_byte(1);
        let fut = asynced.sign_hash_async(h);
        let sig = futures_lite_block_on(fut).unwrap();
        assert_eq!(
            sig.recover_address_from_prehash(&h).unwrap(),
            asynced.address()
        );
    }

    /// Polls a future that completes without waking (every inner future here is ready).
    fn futures_lite_block_on(mut fut: SignFuture) -> Result<Signature, SignerError> {
        use std::task::{Context, Poll, Waker};
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                return r;
            }
        }
    }
}
