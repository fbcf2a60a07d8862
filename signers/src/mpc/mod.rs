//! Threshold ECDSA backend (feature `mpc`): a secp256k1 key that exists only as `n` shares
//! (cggmp21, t-of-n), signed by `t` parties that talk to each other only over loopback TCP.
//!
//! # Pieces
//!
//! - [`run_ceremony`] (and the `mpc-ceremony` command that wraps it): the offline, slow
//!   step. `n` parties, each in its own thread, pregenerate their safe primes, run
//!   aux-info generation and threshold key generation through a message hub on loopback
//!   TCP, and each writes its own share file with mode 0600. Prints/returns the public key
//!   and Ethereum address only.
//! - [`MpcSigner`]: the online side. [`MpcSigner::start`] loads the `t` participating
//!   shares, spawns each party as two threads (offline: presignature generation; online:
//!   partial signatures) that reach the coordinator only through loopback sockets, and starts
//!   a background task that fills a pool of presignatures to [`MpcConfig::pool_depth`] and
//!   refills it whenever it drops below [`MpcConfig::low_water`].
//! - Signing ([`AsyncSigner::sign_hash_async`]) takes one presignature from the pool; the
//!   coordinator sends the hash to each party, each party issues its partial signature, the
//!   coordinator combines them, normalises `s` to the low half and **verifies** the result
//!   by recovering the public key with libsecp256k1: recovering the cached key proves the
//!   signature valid and names its recovery id. The parties report the parity of the
//!   presignature's nonce point `R` (public), so the right recovery id is usually tried
//!   first; the report only orders the attempts and is never trusted.
//!   If the pool is empty the request waits for the next presignature (up to
//!   [`MpcConfig::wait_timeout`]); [`MpcSigner::try_sign_hash_async`] instead reports
//!   [`PoolEmpty`] at once so the caller can emit an event, and
//!   [`MpcSigner::pool_empty_waits`] counts requests that had to wait.
//!
//! # Presignatures are never reused
//!
//! A presignature used for two different hashes leaks the key. The design makes reuse
//! impossible rather than detected:
//! - Each party's share of a presignature lives **only in that party's memory**, in a table
//!   keyed by the presignature's id. It is never serialised, never written to disk and never
//!   sent anywhere.
//! - A party *removes* the presignature from its table before it issues the partial
//!   signature (the cggmp21 call consumes it by value). A second request for the same id,
//!   whatever its hash, is refused by every party: "unknown or already used".
//! - After a restart the tables are empty: no presignature of an earlier run exists
//!   anywhere, so none can be used again. There is nothing to journal, and no fsync on the
//!   signing path.
//! - What *is* durable is the run number (`epoch`) in `state_dir`: [`MpcSigner::start`]
//!   increments it and fsyncs it (write, fsync, rename, fsync the folder) before any
//!   presignature is generated. Presignature ids are `epoch << 32 | sequence`, and every
//!   protocol execution id includes the address, epoch and sequence, so ids and execution
//!   ids never repeat across restarts (cggmp21 requires unique execution ids). An exclusive
//!   lock on `state_dir/lock`, held while the signer lives, keeps two signers from sharing
//!   one state folder.
//!
//! The cost of this choice: presignatures are lost on restart and the pool is refilled
//! (each takes on the order of a second of CPU here).
//!
//! # Share files
//!
//! A share file whose permissions grant any access to group or others is **refused** at
//! start with [`SignerError::Config`] naming the file and its mode; so is a missing or
//! unreadable one. Errors and `Debug` output never include share contents.
//!
//! # Trust boundary
//!
//! The parties run in this process (threads), so this backend demonstrates and exercises the
//! protocol and its message passing, not physical separation: running each party in its own
//! host is a deployment of the same frames over authenticated, encrypted links.

mod ceremony;
mod net;
mod party;
mod share;
mod wire;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use alloy_primitives::{Address, B256, Signature, U256};
use cggmp21::PartialSignature;
use cggmp21::supported_curves::Secp256k1;
use k256::elliptic_curve::scalar::IsHigh;
use k256::elliptic_curve::sec1::FromEncodedPoint;
use k256::{AffinePoint, EncodedPoint, ProjectivePoint};

pub use ceremony::{CeremonyConfig, CeremonyOutput, run_ceremony, share_path};
/// The cggmp21 crate this backend is built on (for benchmarks comparing against it).
pub use cggmp21;

use crate::{AsyncSigner, Backend, SignFuture, SignerError};
use share::ShareFile;
use wire::{Frame, ProtoKind, read_frame_sync, write_frame_sync};

/// Reads a share file with the same checks as [`MpcSigner::start`] and returns the cggmp21
/// key share inside (secret: for benchmarks and tools that drive cggmp21 directly).
pub fn load_key_share(path: &Path) -> Result<cggmp21::KeyShare<Secp256k1>, SignerError> {
    Ok(ShareFile::load(path)?.key_share)
}

/// Configuration of [`MpcSigner::start`].
#[derive(Clone, Debug)]
pub struct MpcConfig {
    /// Share files to choose from (e.g. all `n` files of the ceremony); the file of every
    /// index in [`MpcConfig::parties`] must be among them.
    pub share_files: Vec<PathBuf>,
    /// Keygen indices of the participating parties: exactly `t` distinct indices.
    pub parties: Vec<u16>,
    /// Number of presignatures the pool is filled to (at least 1).
    pub pool_depth: usize,
    /// The pool is refilled to `pool_depth` whenever it holds fewer than this (at most
    /// `pool_depth`); an empty pool is always refilled.
    pub low_water: usize,
    /// Folder for the durable run counter and the lock (created if missing).
    pub state_dir: PathBuf,
    /// How long a signing request waits for a presignature when the pool is empty.
    pub wait_timeout: Duration,
    /// Party spin window: how long a party keeps polling its socket for the next request
    /// after answering one before its thread blocks in the kernel (spin, then yield, then
    /// park). Within a burst a request then reaches the parties without a thread wake-up;
    /// an idle signer blocks and uses no CPU. Zero blocks at once.
    pub spin: Duration,
    /// Coordinator spin window: how long the signing thread polls for the parties'
    /// answers before it blocks. Zero (the default) blocks at once, which leaves the
    /// cores to the parties: on two cores a spinning coordinator only delays them
    /// (measured with the parties spinning: p50 178 µs with the coordinator spinning
    /// against 88 µs with it blocking, instrumented runs). Worth setting where every
    /// party and the coordinator have a core of their own.
    pub coordinator_spin: Duration,
}

impl MpcConfig {
    /// A configuration with pool depth 8, low-water mark 4, a 60 s wait limit, a 500 µs
    /// party spin window and a coordinator that blocks at once.
    pub fn new(share_files: Vec<PathBuf>, parties: Vec<u16>, state_dir: PathBuf) -> Self {
        Self {
            share_files,
            parties,
            pool_depth: 8,
            low_water: 4,
            state_dir,
            wait_timeout: Duration::from_secs(60),
            spin: DEFAULT_SPIN,
            coordinator_spin: Duration::ZERO,
        }
    }
}

/// Default [`MpcConfig::spin`] (parties).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(500);

/// Identifies one presignature: `epoch << 32 | sequence` (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PresignatureId(pub u64);

impl PresignatureId {
    /// The signer run (epoch) that generated it.
    pub const fn epoch(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Its sequence number within the run.
    pub const fn sequence(self) -> u32 {
        self.0 as u32
    }
}

impl std::fmt::Display for PresignatureId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch(), self.sequence())
    }
}

/// Returned by [`MpcSigner::try_sign_hash_async`] when no presignature is ready.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("mpc signer `{key_id}`: presignature pool is empty")]
pub struct PoolEmpty {
    /// The signer's key id.
    pub key_id: String,
}

struct Job {
    hash: B256,
    id: Option<u64>,
    reply: tokio::sync::oneshot::Sender<Result<Signature, SignerError>>,
}

/// State shared by the signer handle and its coordinator threads.
struct Shared {
    pool: Mutex<VecDeque<u64>>,
    /// `pool.len()`, kept beside it so that readers on a hot path take no lock.
    ready: AtomicUsize,
    pool_cv: Condvar,
    refill: tokio::sync::Notify,
    stop: AtomicBool,
    waits: AtomicU64,
    generated: AtomicU64,
    low_water: usize,
    pool_depth: usize,
    last_error: Mutex<Option<String>>,
}

impl Shared {
    fn pool(&self) -> std::sync::MutexGuard<'_, VecDeque<u64>> {
        self.pool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the oldest ready presignature, asking for a refill below the low-water mark
    /// (or when the pool is empty).
    fn try_pop(&self) -> Option<u64> {
        let mut pool = self.pool();
        let id = pool.pop_front();
        self.ready.store(pool.len(), Ordering::Release);
        let below = pool.len() < self.low_water.max(1);
        drop(pool);
        if below {
            self.refill.notify_one();
        }
        id
    }

    /// Waits up to `timeout` for a presignature.
    fn pop_wait(&self, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        let mut pool = self.pool();
        loop {
            if let Some(id) = pool.pop_front() {
                self.ready.store(pool.len(), Ordering::Release);
                let below = pool.len() < self.low_water.max(1);
                drop(pool);
                if below {
                    self.refill.notify_one();
                }
                return Some(id);
            }
            self.refill.notify_one();
            let now = Instant::now();
            if now >= deadline || self.stop.load(Ordering::Acquire) {
                return None;
            }
            pool = self
                .pool_cv
                .wait_timeout(pool, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A threshold-ECDSA signer: `t` parties over loopback TCP with a presignature pool.
///
/// Dropping it stops the parties; their presignatures are gone with them (see the module
/// docs on reuse).
pub struct MpcSigner {
    key_id: String,
    address: Address,
    public_key: String,
    epoch: u32,
    shared: Arc<Shared>,
    /// The online connections, used by one signing at a time: on the calling thread when
    /// a presignature is ready, on the coordinator thread when the request has to wait.
    online: Arc<Mutex<Online>>,
    jobs: Option<mpsc::Sender<Job>>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    _lock: File,
}

impl std::fmt::Debug for MpcSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpcSigner")
            .field("key_id", &self.key_id)
            .field("address", &self.address)
            .field("epoch", &self.epoch)
            .field("pool_depth", &self.pool_depth())
            .finish_non_exhaustive()
    }
}

fn cfg_err(what: impl Into<String>, reason: impl Into<String>) -> SignerError {
    SignerError::Config {
        what: what.into(),
        reason: reason.into(),
    }
}

const PROTOCOL_TIMEOUT: Duration = Duration::from_secs(120);
const ONLINE_IO_TIMEOUT: Duration = Duration::from_secs(10);

impl MpcSigner {
    /// Loads the shares, starts the parties and the pool filler. Returns once the parties
    /// are connected; the pool fills in the background (see [`MpcSigner::ready`]).
    ///
    /// Errors ([`SignerError::Config`]): a missing, unreadable, too-open or malformed share
    /// file (named); parties that are not `t` distinct indices with a share file each;
    /// shares of different keys; a bad pool configuration; a state folder that cannot be
    /// written or is locked by another signer; a party that fails to connect.
    pub fn start(cfg: &MpcConfig) -> Result<MpcSigner, SignerError> {
        if cfg.pool_depth == 0 || cfg.low_water > cfg.pool_depth {
            return Err(cfg_err(
                "mpc pool_depth/low_water",
                format!(
                    "need 1 <= pool_depth and low_water <= pool_depth, got {} and {}",
                    cfg.pool_depth, cfg.low_water
                ),
            ));
        }
        let mut files = Vec::with_capacity(cfg.share_files.len());
        for path in &cfg.share_files {
            files.push(ShareFile::load(path)?);
        }
        let first = files
            .first()
            .ok_or_else(|| cfg_err("mpc share_files", "no share file configured"))?;
        let (public_key, address, threshold) =
            (first.public_key.clone(), first.address, first.threshold);
        if let Some((i, _)) = files
            .iter()
            .enumerate()
            .find(|(_, f)| f.public_key != public_key)
        {
            return Err(cfg_err(
                format!("mpc share file {}", cfg.share_files[i].display()),
                "holds a share of a different key than the first file",
            ));
        }
        let mut sorted = cfg.parties.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != cfg.parties.len() || cfg.parties.len() != threshold as usize {
            return Err(cfg_err(
                "mpc parties",
                format!(
                    "need exactly {threshold} distinct keygen indices, got {:?}",
                    cfg.parties
                ),
            ));
        }
        let mut shares = Vec::with_capacity(cfg.parties.len());
        for &p in &cfg.parties {
            let pos = files.iter().position(|f| f.index == p).ok_or_else(|| {
                cfg_err(
                    "mpc parties",
                    format!("no share file for party {p} among share_files"),
                )
            })?;
            shares.push(files.swap_remove(pos).key_share);
        }
        drop(files);
        let q = decode_public_key(&public_key)?;

        let (lock, epoch) = state::open(&cfg.state_dir)?;
        let key_id = format!("mpc:{address}");

        let net_err = |e: std::io::Error| cfg_err("mpc loopback sockets", e.to_string());
        let online_listener = TcpListener::bind(("127.0.0.1", 0)).map_err(net_err)?;
        let online_addr = online_listener.local_addr().map_err(net_err)?;
        let hub_listener = TcpListener::bind(("127.0.0.1", 0)).map_err(net_err)?;
        let hub_addr = hub_listener.local_addr().map_err(net_err)?;
        hub_listener.set_nonblocking(true).map_err(net_err)?;

        let t = cfg.parties.len() as u16;
        let mut threads = Vec::new();
        for (i, share) in shares.into_iter().enumerate() {
            let handles = party::spawn(
                i as u16,
                cfg.parties.clone(),
                share,
                hub_addr,
                online_addr,
                cfg.spin,
            )
            .map_err(|e| cfg_err("mpc party threads", e.to_string()))?;
            threads.extend(handles);
        }
        let conns = accept_online(&online_listener, t, Duration::from_secs(10))?;

        let shared = Arc::new(Shared {
            pool: Mutex::new(VecDeque::with_capacity(cfg.pool_depth)),
            ready: AtomicUsize::new(0),
            pool_cv: Condvar::new(),
            refill: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
            waits: AtomicU64::new(0),
            generated: AtomicU64::new(0),
            low_water: cfg.low_water,
            pool_depth: cfg.pool_depth,
            last_error: Mutex::new(None),
        });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

        let filler = {
            let shared = Arc::clone(&shared);
            let eid_prefix = format!("cggmp21-presign/{address}/{epoch}");
            std::thread::Builder::new()
                .name("mpc-coordinator-offline".into())
                .spawn(move || filler(hub_listener, t, epoch, &eid_prefix, &shared, stop_rx))
                .map_err(|e| cfg_err("mpc coordinator thread", e.to_string()))?
        };
        threads.push(filler);

        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let online = Arc::new(Mutex::new(Online {
            partials: Vec::with_capacity(conns.len()),
            conns,
            buf: Vec::with_capacity(256),
            r_odd: None,
            broken: None,
            q: uncompressed(&q),
            key_id: key_id.clone(),
            spin: cfg.coordinator_spin,
        }));
        let coordinator = {
            let shared = Arc::clone(&shared);
            let online = Arc::clone(&online);
            let key_id = key_id.clone();
            let wait = cfg.wait_timeout;
            std::thread::Builder::new()
                .name("mpc-coordinator-online".into())
                .spawn(move || online_loop(&online, &jobs_rx, &shared, &key_id, wait))
                .map_err(|e| cfg_err("mpc coordinator thread", e.to_string()))?
        };
        threads.push(coordinator);

        Ok(MpcSigner {
            key_id,
            address,
            public_key,
            epoch,
            shared,
            online,
            jobs: Some(jobs_tx),
            stop_tx,
            threads,
            _lock: lock,
        })
    }

    /// Presignatures ready now.
    pub fn pool_depth(&self) -> usize {
        self.shared.pool().len()
    }

    /// Whether a signing request would find a presignature ready.
    pub fn ready(&self) -> bool {
        self.pool_depth() > 0
    }

    /// Ids of the presignatures ready now, oldest first (for audit and tests).
    pub fn ready_ids(&self) -> Vec<PresignatureId> {
        self.shared
            .pool()
            .iter()
            .map(|&id| PresignatureId(id))
            .collect()
    }

    /// Signing requests so far that found the pool empty and had to wait.
    pub fn pool_empty_waits(&self) -> u64 {
        self.shared.waits.load(Ordering::Relaxed)
    }

    /// Presignatures generated since start.
    pub fn presignatures_generated(&self) -> u64 {
        self.shared.generated.load(Ordering::Relaxed)
    }

    /// The last background (presignature generation) error, if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The run number of this signer (incremented durably at every start).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Compressed SEC1 public key, hex.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// Blocks until at least `n` presignatures are ready or `timeout` passes; returns
    /// whether they are.
    pub fn wait_for_pool(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut pool = self.shared.pool();
        while pool.len() < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            pool = self
                .shared
                .pool_cv
                .wait_timeout(pool, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Like [`AsyncSigner::sign_hash_async`], but fails at once with [`PoolEmpty`] instead of
    /// waiting when no presignature is ready (the presignature is reserved before this
    /// returns).
    pub fn try_sign_hash_async(&self, hash: B256) -> Result<SignFuture, PoolEmpty> {
        match self.shared.try_pop() {
            Some(id) => Ok(self.submit(hash, Some(id))),
            None => Err(PoolEmpty {
                key_id: self.key_id.clone(),
            }),
        }
    }

    /// Signs with a named presignature (for audit and tests). The presignature is taken out
    /// of the pool if it is there; if it was already used, or belongs to an earlier run, the
    /// parties refuse and the future fails with [`SignerError::Signing`].
    pub fn sign_hash_with(&self, id: PresignatureId, hash: B256) -> SignFuture {
        {
            let mut pool = self.shared.pool();
            pool.retain(|&x| x != id.0);
            self.shared.ready.store(pool.len(), Ordering::Release);
        }
        self.sign_inline(id.0, hash)
    }

    /// Signs with presignature `id` on the thread that polls the future: sends the hash to
    /// the parties and waits for their partial signatures itself (no coordinator hand-off).
    fn sign_inline(&self, id: u64, hash: B256) -> SignFuture {
        let online = Arc::clone(&self.online);
        Box::pin(async move {
            online
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .sign(id, hash)
        })
    }

    fn submit(&self, hash: B256, id: Option<u64>) -> SignFuture {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let stopped = || SignerError::Unavailable {
            key_id: self.key_id.clone(),
            reason: "mpc coordinator stopped".into(),
        };
        let sent = self
            .jobs
            .as_ref()
            .map(|tx| tx.send(Job { hash, id, reply }).is_ok());
        if sent != Some(true) {
            let err = stopped();
            return Box::pin(async move { Err(err) });
        }
        let err = stopped();
        Box::pin(async move { rx.await.unwrap_or(Err(err)) })
    }
}

impl AsyncSigner for MpcSigner {
    fn address(&self) -> Address {
        self.address
    }

    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn backend(&self) -> Backend {
        Backend::Mpc
    }

    /// Takes a presignature (waiting for one if the pool is empty, counted by
    /// [`MpcSigner::pool_empty_waits`]) and signs over loopback.
    fn sign_hash_async(&self, hash: B256) -> SignFuture {
        match self.shared.try_pop() {
            // A presignature is ready: the round runs on the polling thread.
            Some(id) => self.sign_inline(id, hash),
            // None: the coordinator thread waits for the pool, then signs.
            None => {
                self.shared.waits.fetch_add(1, Ordering::Relaxed);
                self.submit(hash, None)
            }
        }
    }

    /// Presignatures ready in the pool (an atomic read, no lock).
    fn available(&self) -> Option<usize> {
        Some(self.shared.ready.load(Ordering::Acquire))
    }
}

impl Drop for MpcSigner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.pool_cv.notify_all();
        let _ = self.stop_tx.send(true);
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn decode_public_key(hex_key: &str) -> Result<ProjectivePoint, SignerError> {
    let bad = || cfg_err("mpc share public key", "not a valid secp256k1 point");
    let bytes = (0..hex_key.len())
        .step_by(2)
        .map(|i| {
            hex_key
                .get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    let ep = EncodedPoint::from_bytes(&bytes).map_err(|_| bad())?;
    Option::<AffinePoint>::from(AffinePoint::from_encoded_point(&ep))
        .map(ProjectivePoint::from)
        .ok_or_else(bad)
}

fn accept_online(
    listener: &TcpListener,
    t: u16,
    timeout: Duration,
) -> Result<Vec<Conn>, SignerError> {
    let err = |reason: String| cfg_err("mpc party connections", reason);
    listener
        .set_nonblocking(true)
        .map_err(|e| err(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    let mut slots: Vec<Option<Conn>> = (0..t).map(|_| None).collect();
    let mut buf = Vec::new();
    let mut connected = 0;
    while connected < t {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| err(e.to_string()))?;
                s.set_nodelay(true).map_err(|e| err(e.to_string()))?;
                s.set_read_timeout(Some(ONLINE_IO_TIMEOUT))
                    .map_err(|e| err(e.to_string()))?;
                s.set_write_timeout(Some(ONLINE_IO_TIMEOUT))
                    .map_err(|e| err(e.to_string()))?;
                let mut r = BufReader::new(s.try_clone().map_err(|e| err(e.to_string()))?);
                match read_frame_sync(&mut r, &mut buf) {
                    Ok(Frame::Hello { party }) if party < t && slots[party as usize].is_none() => {
                        slots[party as usize] = Some((r, BufWriter::new(s)));
                        connected += 1;
                    }
                    _ => return Err(err("a party introduced itself wrongly".into())),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(err(format!("{connected} of {t} parties connected in time")));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(err(e.to_string())),
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

/// The pool filler: accepts the parties' protocol connections, then generates
/// presignatures one at a time: up to `pool_depth` at start, and again whenever woken with
/// fewer than `low_water` ready.
fn filler(
    listener: TcpListener,
    t: u16,
    epoch: u32,
    eid_prefix: &str,
    shared: &Shared,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let record = |e: String| {
        *shared
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(e);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return record(format!("tokio runtime: {e}")),
    };
    rt.block_on(async {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => return record(format!("hub listener: {e}")),
        };
        let mut hub = tokio::select! {
            h = net::Hub::accept(&listener, t, Duration::from_secs(10)) => match h {
                Ok(h) => h,
                Err(e) => return record(e),
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut seq: u32 = 0;
        let mut filling = true;
        loop {
            if *stop.borrow() {
                break;
            }
            let ready = shared.pool().len();
            if ready >= shared.pool_depth {
                filling = false;
            } else if ready < shared.low_water || ready == 0 {
                filling = true;
            }
            if !filling {
                tokio::select! {
                    _ = shared.refill.notified() => continue,
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            let exec = (u64::from(epoch) << 32) | u64::from(seq);
            let eid = format!("{eid_prefix}/{seq}");
            seq = seq.wrapping_add(1);
            let res = tokio::select! {
                r = hub.run(exec, ProtoKind::Presign, &eid, PROTOCOL_TIMEOUT) => r,
                _ = stop.wait_for(|s| *s) => break,
            };
            match res {
                Ok(_) => {
                    shared.generated.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut pool = shared.pool();
                        pool.push_back(exec);
                        shared.ready.store(pool.len(), Ordering::Release);
                    }
                    shared.pool_cv.notify_all();
                }
                Err(e) => {
                    record(e);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
            }
        }
        hub.shutdown().await;
    });
}

type Conn = (BufReader<TcpStream>, BufWriter<TcpStream>);

/// The online connections and scratch space of one signer.
struct Online {
    conns: Vec<Conn>,
    buf: Vec<u8>,
    partials: Vec<PartialSignature<Secp256k1>>,
    r_odd: Option<bool>,
    /// Set when a connection failed: every later request is refused as unavailable.
    broken: Option<String>,
    /// The public key, uncompressed SEC1.
    q: [u8; 65],
    key_id: String,
    /// [`MpcConfig::coordinator_spin`].
    spin: Duration,
}

impl Online {
    /// Parity of the recovery id the parties' report of `R` implies for `sig`.
    fn parity_hint(&self, sig: &cggmp21::Signature<Secp256k1>) -> Option<bool> {
        let raw_s = self.partials.iter().fold(
            cggmp21::generic_ec::Scalar::<Secp256k1>::zero(),
            |acc, p| acc + p.sigma,
        );
        self.r_odd.map(|odd| odd != (raw_s != sig.s))
    }

    /// One online signing round with presignature `id`, over all `t` connections, then
    /// combination and verification.
    fn sign(&mut self, id: u64, hash: B256) -> Result<Signature, SignerError> {
        let key_id = &self.key_id;
        if let Some(reason) = &self.broken {
            return Err(SignerError::Unavailable {
                key_id: key_id.clone(),
                reason: reason.clone(),
            });
        }
        match sign_round(
            &mut self.conns,
            &mut self.buf,
            &mut self.partials,
            &mut self.r_odd,
            id,
            hash,
            self.spin,
        ) {
            Ok(Ok(())) => match PartialSignature::combine(&self.partials) {
                // `combine` returns `s` normalised to the low half; when that negated the sum
                // of the partial signatures, the recovery id is the opposite of `R`'s parity.
                Some(sig) => {
                    finish(&hash, &sig, &self.q, self.parity_hint(&sig)).map_err(|reason| {
                        SignerError::Signing {
                            key_id: key_id.clone(),
                            reason,
                        }
                    })
                }
                None => Err(SignerError::Signing {
                    key_id: key_id.clone(),
                    reason: "partial signatures do not combine".into(),
                }),
            },
            Ok(Err(refused)) => Err(SignerError::Signing {
                key_id: key_id.clone(),
                reason: refused,
            }),
            Err(io) => {
                let reason = format!("party connection failed: {io}");
                self.broken = Some(reason.clone());
                Err(SignerError::Unavailable {
                    key_id: key_id.clone(),
                    reason,
                })
            }
        }
    }
}

/// The coordinator: serves requests that found the pool empty (waiting for a presignature,
/// then signing), and at the end tells the parties to stop.
fn online_loop(
    online: &Mutex<Online>,
    jobs: &mpsc::Receiver<Job>,
    shared: &Shared,
    key_id: &str,
    wait: Duration,
) {
    let lock = || online.lock().unwrap_or_else(PoisonError::into_inner);
    while let Ok(job) = jobs.recv() {
        let id = match job.id {
            Some(id) => id,
            None => match shared.pop_wait(wait) {
                Some(id) => id,
                None => {
                    let _ = job.reply.send(Err(SignerError::Unavailable {
                        key_id: key_id.to_owned(),
                        reason: format!("no presignature became ready within {wait:?}"),
                    }));
                    continue;
                }
            },
        };
        let res = lock().sign(id, job.hash);
        let _ = job.reply.send(res);
    }
    for (_, w) in &mut lock().conns {
        let _ = write_frame_sync(w, &Frame::Shutdown);
        let _ = w.flush();
    }
}

/// Sends `Sign` to every party, then reads every reply. The outer error is a broken
/// connection; the inner one a party's refusal.
fn sign_round(
    conns: &mut [Conn],
    buf: &mut Vec<u8>,
    partials: &mut Vec<PartialSignature<Secp256k1>>,
    r_odd: &mut Option<bool>,
    id: u64,
    hash: B256,
    spin: Duration,
) -> std::io::Result<Result<(), String>> {
    partials.clear();
    *r_odd = None;
    let mut first = true;
    let req = Frame::Sign { id, hash };
    for (_, w) in conns.iter_mut() {
        write_frame_sync(w, &req)?;
        w.flush()?;
    }
    let mut refused = None;
    for (r, _) in conns.iter_mut() {
        wire::spin_until_readable(r, spin);
        match read_frame_sync(r, buf)? {
            Frame::Partial {
                id: got,
                partial: Ok(p),
                r_odd: odd,
            } if got == id => {
                partials.push(p);
                // A hint only when every party gives the same one.
                if first {
                    *r_odd = odd;
                } else if *r_odd != odd {
                    *r_odd = None;
                }
                first = false;
            }
            Frame::Partial {
                id: got,
                partial: Err(e),
                ..
            } if got == id => {
                refused.get_or_insert(e);
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unexpected {} from a party", net::frame_name(&other)),
                ));
            }
        }
    }
    Ok(match refused {
        Some(e) => Err(e),
        None => Ok(()),
    })
}

/// Verifies a combined signature against the public key `q` (uncompressed SEC1) and returns
/// it low-s with its recovery id. libsecp256k1 recovers the public key from `(r, s, v)`:
/// recovering `q` proves the signature valid for `q` and names its recovery id. `r_odd`, the
/// parties' report of the nonce point's parity, says which `v` to try first (flipped when
/// `s` is normalised), so one recovery (about 30 µs here, against about 70 µs for k256's
/// `R = (z/s)·G + (r/s)·Q`) usually suffices; the hint is only an ordering, never trusted.
fn finish(
    hash: &B256,
    sig: &cggmp21::Signature<Secp256k1>,
    q: &[u8; 65],
    r_odd: Option<bool>,
) -> Result<Signature, String> {
    let r_bytes: [u8; 32] = sig
        .r
        .to_be_bytes()
        .as_bytes()
        .try_into()
        .map_err(|_| "r is not 32 bytes")?;
    let s_bytes: [u8; 32] = sig
        .s
        .to_be_bytes()
        .as_bytes()
        .try_into()
        .map_err(|_| "s is not 32 bytes")?;
    scalar(&r_bytes).ok_or("r is not a canonical scalar")?;
    let mut s = scalar(&s_bytes).ok_or("s is not a canonical scalar")?;
    let negated = bool::from(s.is_high());
    if negated {
        s = -s;
    }
    let r = U256::from_be_bytes(r_bytes);
    let s = U256::from_be_bytes(s.to_bytes().into());
    let first = r_odd.is_some_and(|odd| odd != negated);
    for parity in [first, !first] {
        let candidate = Signature::new(r, s, parity);
        if let Ok(pk) = candidate.recover_from_prehash_secp256k1(hash)
            && pk.serialize_uncompressed() == *q
        {
            return Ok(candidate);
        }
    }
    Err("combined signature does not verify against the public key".into())
}

fn uncompressed(q: &ProjectivePoint) -> [u8; 65] {
    use k256::elliptic_curve::sec1::ToEncodedPoint;
    let mut out = [0u8; 65];
    out.copy_from_slice(q.to_affine().to_encoded_point(false).as_bytes());
    out
}

fn scalar(bytes: &[u8; 32]) -> Option<k256::Scalar> {
    use k256::elliptic_curve::PrimeField;
    Option::from(k256::Scalar::from_repr((*bytes).into()))
}

/// The durable run counter and the state-folder lock.
mod state {
    use super::*;

    /// Locks `dir/lock`, then reads, increments and durably stores `dir/epoch`.
    pub(super) fn open(dir: &Path) -> Result<(File, u32), SignerError> {
        let err = |reason: String| cfg_err(format!("mpc state_dir {}", dir.display()), reason);
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(|e| err(format!("lock file: {e}")))?;
        lock.try_lock()
            .map_err(|e| err(format!("locked by another signer ({e})")))?;
        let path = dir.join("epoch");
        let prev = match File::open(&path) {
            Ok(mut f) => {
                let mut s = String::new();
                f.read_to_string(&mut s)
                    .map_err(|e| err(format!("epoch: {e}")))?;
                s.trim()
                    .parse::<u32>()
                    .map_err(|_| err("epoch file is corrupt".into()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(err(format!("epoch: {e}"))),
        };
        let epoch = prev
            .checked_add(1)
            .ok_or_else(|| err("epoch exhausted".into()))?;
        let tmp = dir.join("epoch.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            writeln!(f, "{epoch}")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(dir)?.sync_all()
        };
        write().map_err(|e| err(format!("storing epoch: {e}")))?;
        Ok((lock, epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k256::ecdsa::SigningKey;

    #[test]
    fn finish_verifies_normalises_and_finds_the_recovery_id() {
        let sk = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let q = ProjectivePoint::from(*sk.verifying_key().as_affine());
        let address = Address::from_public_key(sk.verifying_key());
        for i in 0..32u8 {
            let hash = B256::repeat_byte(i.wrapping_mul(37).wrapping_add(1));
            let (sig, _) = sk.sign_prehash_recoverable(hash.as_slice()).unwrap();
            let (r, s) = sig.split_bytes();
            // Feed the high-s twin half of the time: `finish` must normalise it.
            let s = if i % 2 == 0 {
                s
            } else {
                (-*sig.s()).to_bytes()
            };
            let to_generic = |b: &[u8]| {
                cggmp21::generic_ec::NonZero::from_scalar(
                    cggmp21::generic_ec::Scalar::<Secp256k1>::from_be_bytes(b).unwrap(),
                )
                .unwrap()
            };
            let generic = cggmp21::Signature::from_raw_parts(to_generic(&r), to_generic(&s));
            let out = finish(&hash, &generic, &uncompressed(&q), None).unwrap();
            // A hint only orders the attempts: right or wrong, the result is the same.
            for hint in [Some(true), Some(false)] {
                assert_eq!(
                    finish(&hash, &generic, &uncompressed(&q), hint).unwrap(),
                    out
                );
            }
            assert!(out.normalize_s().is_none(), "low-s");
            assert_eq!(out.recover_address_from_prehash(&hash).unwrap(), address);
            // A different hash must not verify.
            let other = B256::repeat_byte(0xee);
            assert!(finish(&other, &generic, &uncompressed(&q), None).is_err());
        }
    }

    #[test]
    fn epoch_increments_and_the_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let (lock, e1) = state::open(dir.path()).unwrap();
        assert_eq!(e1, 1);
        let err = state::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("locked"), "{err}");
        drop(lock);
        let (_lock, e2) = state::open(dir.path()).unwrap();
        assert_eq!(e2, 2);
    }

    #[test]
    fn presignature_ids_split_into_epoch_and_sequence() {
        let id = PresignatureId((7 << 32) | 42);
        assert_eq!((id.epoch(), id.sequence()), (7, 42));
        assert_eq!(id.to_string(), "7:42");
    }
}
