//! The write-ahead intent journal: the storage layer.
//!
//! An `ack` to a desk has to mean "recorded": the stages append what they decide (intake:
//! principals and intents with calldata; signing: signed transactions with their raw
//! bytes; the status thread: state changes) to the journal before acting on it, and a
//! restarted engine replays it. This module stores and reads back records; what they mean
//! and how a restart uses them is `crate::recovery`'s business.
//!
//! # Layout
//!
//! A journal is a directory of *lanes*, each a series of segment files
//! `<dir>/<lane>-<segno:010>.seg` written by exactly one [`LaneWriter`] (one stage thread:
//! no lock). Lane names are `[a-z]+`; `base` is reserved for compaction. Segment numbers
//! come from one counter for the whole directory, so they grow across lanes, restarts and
//! compactions, and a [`Pos`] — `(segno << 40) | end offset of the frame` — is monotone
//! per lane. A `journal.lock` file, held with `flock`, keeps a second journal (in this
//! process or another) out of the directory.
//!
//! Segments are preallocated to `segment_bytes` (`fallocate`: zero-filled, and writes
//! through the mapping cannot run out of disk) and memory-mapped shared. An append
//! encodes the frame into the mapping and publishes the lane's new end with a release
//! store: no system call, no lock, no allocation. When a frame does not fit, the writer
//! moves to the next segment, which the flusher thread pre-creates (and prefaults) once
//! the current one is half full; if it is not ready the writer creates it (cold path).
//!
//! # Frame format
//!
//! Little endian, 8-byte aligned: `u32 len` (payload bytes), `u32 crc32c` (of the
//! payload), the payload, zero padding to 8. A `len` of 0 (an all-zero header) marks the
//! end of the written part. Payload: `u8 kind`, 7 zero bytes, the rkyv archive of a
//! fixed-size record ([`record`]: integers and arrays only, so encoding needs no
//! allocator), then a variable tail (calldata, a raw signed transaction) whose length is a
//! field of the record. Reading validates the archive (bytecheck): a bad record is an
//! error, never undefined behaviour. The header is stored last, in one 8-byte release
//! store, so a process killed mid-append leaves a whole frame or an unpublished one.
//!
//! # Sync policies and what survives
//!
//! - [`SyncPolicy::None`]: a frame is in the kernel's page cache when `append` returns.
//!   It survives the process being killed (SIGKILL, panic, OOM), not a kernel crash or a
//!   power loss. Nothing waits.
//! - [`SyncPolicy::Group`]: the flusher thread `msync`s (`MS_SYNC`) the newly written
//!   ranges of every lane as soon as there is something new, at most once every
//!   `max_delay_us` (group commit: one sync covers every frame appended meanwhile), then
//!   publishes each lane's durable position and calls the [`Journal::on_durable`]
//!   callbacks. The engine holds acks and sends until [`DurableWatch::is_durable`] says
//!   their frame is synced; such a frame survives a power loss.
//! - [`SyncPolicy::Interval`]: the flusher syncs every `ms`; nobody waits; a power loss
//!   may lose up to `ms` of records (a process crash loses none).
//!
//! [`Journal::shutdown`] syncs everything under every policy.
//!
//! Cost on the writer: under `None` an append takes no page fault (segments are
//! prefaulted for writing) and no system call. A sync (`Group`, `Interval`) cleans the
//! pages it writes, which the kernel write-protects for its dirty tracking: the next
//! append into the page being filled takes a page fault, and the write-protection
//! interrupts the writer's core (TLB shootdown). The journal bench
//! (`benches/benches/journal.rs`) measures both.
//!
//! # Recovery ([`Journal::open`])
//!
//! Every lane's segments are read in order. Segments that are entirely zero (pre-created,
//! never written) are deleted. A frame whose length runs past the segment end, whose
//! checksum does not match, or whose record fails its check — or nonzero bytes after an
//! all-zero header (an append that was never published) — is a *torn last record* when it
//! is in the lane's last segment, every byte past where it claims to end is zero, and no
//! valid frame starts anywhere after it in the segment: its bytes are zeroed in the file,
//! it is reported in [`Replay::truncated`], and appending resumes at its offset.
//! Otherwise it is corruption and `open` fails with [`JournalError::Corrupt`], naming the
//! file and the frame's byte offset.
//!
//! # Compaction ([`Journal::compact`])
//!
//! At start-up, after replay and before any writer is taken, the records to keep are
//! written to new segments of the `base` lane (as `*.seg.tmp`, synced, renamed, directory
//! synced), then every older segment of every lane is deleted. A crash before the renames
//! leaves the old journal (the temporary files are removed at the next open); a crash
//! after them leaves the new `base` and possibly some old segments: replay may then see a
//! record twice (in `base` and in its old lane), and the consumer keeps one per sequence
//! number. No record is lost at any point.
//!
//! # Invariants
//!
//! - One writer per lane; bytes past a lane's published end are zero (segments start
//!   zeroed, recovery zeroes torn tails), so an append never has to clear anything.
//! - A lane's `written` and `durable` positions only grow; `durable <= written`.
//! - A frame is never split across segments, and never bigger than `segment_bytes`.
//! - Appending allocates nothing and takes no lock except when rotating segments.

mod error;
mod flusher;
mod frame;
mod lane;
pub mod record;
mod segment;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, Thread};

pub use error::JournalError;
pub use lane::{DurableWatch, LaneWriter, Pos};
pub use record::{
    DoneRec, IntentRec, KIND_DONE, KIND_INTENT, KIND_PRINCIPAL, KIND_SIGNED, KIND_STATE,
    OwnedRecord, PrincipalRec, Record, SignedRec, StateRec, Text,
};

use lane::LaneShared;
use segment::{MAX_SEGMENT_BYTES, MAX_SEGNO, Segment, file_name, parse_name, sync_dir, valid_lane};

/// The lane compaction writes; no writer can take it.
pub const BASE_LANE: &str = "base";
/// The lock file in a journal directory.
pub const LOCK_FILE: &str = "journal.lock";
/// Default segment size: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Smallest segment size accepted.
pub const MIN_SEGMENT_BYTES: u64 = 4096;

/// When appended frames reach the disk (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Never synced while running (page cache only): survives a process crash, not a
    /// power loss.
    None,
    /// Group commit: the flusher syncs new frames as soon as there are some, at most once
    /// every `max_delay_us`, and [`DurableWatch::is_durable`] tells when a frame is synced.
    Group {
        /// Shortest time between two syncs (µs): the longest a frame waits for its sync
        /// to start once the previous one is done.
        max_delay_us: u64,
    },
    /// Synced every `ms`; nobody waits.
    Interval {
        /// Sync period (ms).
        ms: u64,
    },
}

/// Where the journal lives and how it syncs.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// The journal directory (created if missing).
    pub dir: PathBuf,
    /// Size of each segment file: a multiple of 8, at least [`MIN_SEGMENT_BYTES`]
    /// (default [`DEFAULT_SEGMENT_BYTES`]).
    pub segment_bytes: u64,
    /// Sync policy.
    pub sync: SyncPolicy,
    /// Encryption at rest: every segment created gets its own data key wrapped by this
    /// sealer's KEK, and its records are AES-256-GCM sealed (see `frame`). Needed to
    /// read sealed segments back. `None`: new segments are written in clear.
    pub sealer: Option<crate::atrest::Sealer>,
}

impl JournalConfig {
    /// `dir` with 64 MiB segments and group commit every 200 µs at most.
    pub fn new(dir: impl Into<PathBuf>) -> JournalConfig {
        JournalConfig {
            dir: dir.into(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            sync: SyncPolicy::Group { max_delay_us: 200 },
            sealer: None,
        }
    }

    fn check(&self) -> Result<(), JournalError> {
        let b = self.segment_bytes;
        if !(MIN_SEGMENT_BYTES..MAX_SEGMENT_BYTES).contains(&b) || !b.is_multiple_of(8) {
            return Err(JournalError::Config(format!(
                "segment_bytes = {b}: must be a multiple of 8 from {MIN_SEGMENT_BYTES} to 2^40"
            )));
        }
        if let SyncPolicy::Interval { ms: 0 } = self.sync {
            return Err(JournalError::Config("sync interval of 0 ms".into()));
        }
        Ok(())
    }
}

/// A torn last record cut off at open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    /// Its lane.
    pub lane: String,
    /// Its segment file.
    pub file: PathBuf,
    /// Byte offset of its frame (where appending resumed).
    pub offset: u64,
    /// Bytes zeroed.
    pub bytes: u64,
    /// What was wrong with it.
    pub what: String,
}

/// What [`Journal::open`] read back.
#[derive(Debug, Default)]
pub struct Replay {
    /// Per lane (`base` included, after a compaction), the records in append order with
    /// the position of their frame's end.
    pub lanes: BTreeMap<String, Vec<(Pos, OwnedRecord)>>,
    /// Torn last records cut off.
    pub truncated: Vec<TornTail>,
}

impl Replay {
    /// The records of `lane` (empty if it has none).
    pub fn lane(&self, lane: &str) -> &[(Pos, OwnedRecord)] {
        self.lanes.get(lane).map_or(&[], Vec::as_slice)
    }

    /// Number of records over all lanes.
    pub fn len(&self) -> usize {
        self.lanes.values().map(Vec::len).sum()
    }

    /// Whether there is no record at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters of one lane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaneStats {
    /// Lane name.
    pub lane: &'static str,
    /// Frames appended in this run.
    pub frames: u64,
    /// Bytes appended in this run (headers and padding included).
    pub bytes: u64,
    /// Position after the last frame.
    pub written: Pos,
    /// Position up to which frames are synced.
    pub durable: Pos,
    /// The writer's current segment number.
    pub segment: u64,
    /// Segment files of the lane on disk.
    pub segments: u64,
}

/// The journal's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Lanes with a writer.
    pub lanes: Vec<LaneStats>,
    /// Sync rounds that synced something.
    pub syncs: u64,
    /// Duration of the last sync round (ns).
    pub last_sync_ns: u64,
    /// Longest sync round (ns).
    pub max_sync_ns: u64,
    /// Failed syncs (retried).
    pub sync_errors: u64,
    /// Online compactions done ([`Journal::compact_closed`]).
    pub compactions: u64,
}

/// Where a lane's writer resumes: after the last good frame of its last segment.
#[derive(Debug)]
struct Resume {
    segno: u64,
    path: PathBuf,
    off: u64,
    segments: u64,
}

/// State shared by the journal handle, the writers and the flusher.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) segment_bytes: u64,
    pub(crate) sync: SyncPolicy,
    next_segno: AtomicU64,
    pub(crate) lanes: Mutex<Vec<Arc<LaneShared>>>,
    flusher: OnceLock<Thread>,
    pub(crate) flusher_sleeping: AtomicBool,
    pub(crate) stop: AtomicBool,
    pub(crate) wakes: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
    pub(crate) syncs: AtomicU64,
    pub(crate) last_sync_ns: AtomicU64,
    pub(crate) max_sync_ns: AtomicU64,
    pub(crate) sync_errors: AtomicU64,
    pub(crate) compactions: AtomicU64,
    pub(crate) sealer: Option<crate::atrest::Sealer>,
    writers_taken: AtomicBool,
    resume: Mutex<HashMap<String, Resume>>,
    lock_file: Mutex<Option<File>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("dir", &self.dir)
            .field("segment_bytes", &self.segment_bytes)
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Whether new segment files are synced at creation (every policy but `None`).
    pub(crate) fn syncs(&self) -> bool {
        self.sync != SyncPolicy::None
    }

    /// The next segment number.
    pub(crate) fn alloc_segno(&self) -> Result<u64, JournalError> {
        let n = self.next_segno.fetch_add(1, Ordering::Relaxed);
        if n > MAX_SEGNO {
            return Err(JournalError::Config(format!(
                "segment numbers exhausted (more than {MAX_SEGNO})"
            )));
        }
        Ok(n)
    }

    /// Unparks the flusher thread.
    pub(crate) fn wake_flusher(&self) {
        if let Some(t) = self.flusher.get() {
            t.unpark();
        }
    }
}

/// Locks `m`, recovering from a poisoned lock (the data it guards stays consistent: each
/// critical section is a single push, pop or take).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    compacting: Mutex<()>,
}

impl Inner {
    fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake_flusher();
        if let Some(h) = lock(&self.flusher).take() {
            if h.thread().id() == std::thread::current().id() {
                // Dropped from a wake callback: the thread ends on its own.
                return;
            }
            let _ = h.join();
        }
        lock(&self.shared.lock_file).take();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A segment file no writer appends to any more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedSegment {
    /// Its lane.
    pub lane: String,
    /// Its number.
    pub segno: u64,
    /// The file.
    pub path: PathBuf,
}

/// A journal directory, open. Cheap to clone; the last clone dropped shuts it down.
#[derive(Clone, Debug)]
pub struct Journal {
    inner: Arc<Inner>,
}

impl Journal {
    /// Opens (creating if missing) the journal in `cfg.dir`: locks it, replays every
    /// lane (cutting off torn last records, failing on corruption; see the module docs),
    /// and starts the flusher thread.
    pub fn open(cfg: JournalConfig) -> Result<(Journal, Replay), JournalError> {
        cfg.check()?;
        let dir = cfg.dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| JournalError::io("creating journal directory", &dir, e))?;
        let lock_file = take_lock(&dir)?;
        let mut by_lane: BTreeMap<String, Vec<(u64, PathBuf)>> = BTreeMap::new();
        let mut max_segno = 0;
        let entries =
            std::fs::read_dir(&dir).map_err(|e| JournalError::io("listing journal", &dir, e))?;
        let mut removed = false;
        for entry in entries {
            let entry = entry.map_err(|e| JournalError::io("listing journal", &dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".seg.tmp") {
                // An unfinished compaction's output: the old segments are all there.
                let p = entry.path();
                std::fs::remove_file(&p)
                    .map_err(|e| JournalError::io("removing unfinished compaction file", &p, e))?;
                removed = true;
                continue;
            }
            if let Some((lane, segno)) = parse_name(name) {
                max_segno = max_segno.max(segno);
                by_lane
                    .entry(lane.to_owned())
                    .or_default()
                    .push((segno, entry.path()));
            }
        }
        let mut replay = Replay::default();
        let mut resume = HashMap::new();
        for (lane, mut segs) in by_lane {
            segs.sort_unstable();
            let r = recover_lane(&lane, segs, &cfg, &mut replay)?;
            removed |= r.removed;
            if let Some(res) = r.resume {
                resume.insert(lane, res);
            }
        }
        if removed {
            sync_dir(&dir)?;
        }
        let shared = Arc::new(Shared {
            dir,
            segment_bytes: cfg.segment_bytes,
            sync: cfg.sync,
            next_segno: AtomicU64::new(max_segno + 1),
            lanes: Mutex::new(Vec::new()),
            flusher: OnceLock::new(),
            flusher_sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            wakes: Mutex::new(Vec::new()),
            syncs: AtomicU64::new(0),
            last_sync_ns: AtomicU64::new(0),
            max_sync_ns: AtomicU64::new(0),
            sync_errors: AtomicU64::new(0),
            compactions: AtomicU64::new(0),
            sealer: cfg.sealer.clone(),
            writers_taken: AtomicBool::new(false),
            resume: Mutex::new(resume),
            lock_file: Mutex::new(Some(lock_file)),
        });
        let for_thread = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("journal-flush".into())
            .spawn(move || flusher::run(for_thread))
            .map_err(|e| JournalError::io("starting the flusher thread", &shared.dir, e))?;
        let _ = shared.flusher.set(handle.thread().clone());
        let journal = Journal {
            inner: Arc::new(Inner {
                shared,
                flusher: Mutex::new(Some(handle)),
                compacting: Mutex::new(()),
            }),
        };
        Ok((journal, replay))
    }

    /// The writer of lane `name` (`[a-z]+`, not `base`), resuming after its last good
    /// frame or starting a new segment. At most one writer per lane per `Journal`: a
    /// second call for the same lane is [`JournalError::LaneTaken`].
    pub fn lane(&self, name: &'static str) -> Result<LaneWriter, JournalError> {
        let shared = &self.inner.shared;
        if !valid_lane(name) || name == BASE_LANE {
            return Err(JournalError::BadLane(name.to_owned()));
        }
        if shared.stop.load(Ordering::Acquire) {
            return Err(JournalError::Closed);
        }
        let mut lanes = lock(&shared.lanes);
        if lanes.iter().any(|l| l.name == name) {
            return Err(JournalError::LaneTaken(name));
        }
        let resumed = lock(&shared.resume).remove(name);
        let (seg, off, segments) = match resumed {
            Some(r) => (
                Segment::open(r.path, r.segno, shared.segment_bytes)?,
                r.off,
                r.segments,
            ),
            None => {
                let segno = shared.alloc_segno()?;
                let path = shared.dir.join(file_name(name, segno));
                let seg = Segment::create(
                    path,
                    segno,
                    shared.segment_bytes,
                    shared.syncs(),
                    false,
                    shared.sealer.as_ref(),
                )?;
                let start = seg.start;
                (seg, start, 1)
            }
        };
        seg.prefault(off);
        let seg = Arc::new(seg);
        let lane = Arc::new(LaneShared::new(name, Arc::clone(&seg), off, segments));
        lanes.push(Arc::clone(&lane));
        shared.writers_taken.store(true, Ordering::Release);
        Ok(LaneWriter::new(lane, Arc::clone(shared), seg, off))
    }

    /// Registers a callback the flusher calls after each sync that advanced some lane's
    /// durable position (group commit: wake the threads holding acks and sends). Called
    /// on the flusher thread: it must be quick, must not block, and must not call back
    /// into the journal.
    pub fn on_durable(&self, wake: Box<dyn Fn() + Send + Sync>) {
        lock(&self.inner.shared.wakes).push(wake);
    }

    /// Replaces the whole journal with `keep`: writes them to new `base` segments, syncs
    /// those and the directory, then deletes every older segment (see the module docs for
    /// what a crash at any point leaves). Only at start-up, before any lane writer is
    /// taken ([`JournalError::CompactAfterWriters`] otherwise). Records keep their
    /// order.
    pub fn compact(&self, keep: impl IntoIterator<Item = OwnedRecord>) -> Result<(), JournalError> {
        let shared = &self.inner.shared;
        let _one = lock(&self.inner.compacting);
        if shared.writers_taken.load(Ordering::Acquire) {
            return Err(JournalError::CompactAfterWriters);
        }
        if shared.stop.load(Ordering::Acquire) {
            return Err(JournalError::Closed);
        }
        let old = segment_files(&shared.dir)?;
        let written = match write_base(shared, keep) {
            Ok(w) => w,
            Err((e, tmps)) => {
                for t in tmps {
                    let _ = std::fs::remove_file(t);
                }
                return Err(e);
            }
        };
        for (tmp, fin) in &written {
            std::fs::rename(tmp, fin)
                .map_err(|e| JournalError::io("renaming compacted segment", fin, e))?;
        }
        sync_dir(&shared.dir)?;
        // Oldest first, so a crash meanwhile leaves a suffix of each lane.
        for (_, path) in &old {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(JournalError::io("removing compacted segment", path, e)),
            }
        }
        sync_dir(&shared.dir)?;
        lock(&shared.resume).clear();
        Ok(())
    }

    /// The segments no writer appends to any more, oldest first per lane: every `base`
    /// segment, and each lane's segments below the one its writer is on (all of a lane
    /// with no writer). They are immutable, so they can be read and compacted while the
    /// writers go on (see [`Journal::compact_closed`]).
    pub fn closed_segments(&self) -> Result<Vec<ClosedSegment>, JournalError> {
        let shared = &self.inner.shared;
        let current: HashMap<&'static str, u64> = lock(&shared.lanes)
            .iter()
            .map(|l| (l.name, l.segno.load(Ordering::Acquire)))
            .collect();
        let mut out = Vec::new();
        for (segno, path) in segment_files(&shared.dir)? {
            let Some(lane) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_name)
                .map(|(lane, _)| lane.to_owned())
            else {
                continue;
            };
            let closed = lane == BASE_LANE
                || current
                    .get(lane.as_str())
                    .is_none_or(|&writing| segno < writing);
            if closed {
                out.push(ClosedSegment { lane, segno, path });
            }
        }
        out.sort_by(|a, b| (a.lane.as_str(), a.segno).cmp(&(b.lane.as_str(), b.segno)));
        Ok(out)
    }

    /// Reads closed segments back (from [`Journal::closed_segments`]). Any bad frame in
    /// them is [`JournalError::Corrupt`]: no writer can be cutting one short.
    pub fn read_closed(&self, segments: &[ClosedSegment]) -> Result<Replay, JournalError> {
        let mut replay = Replay::default();
        for c in segments {
            let seg = Segment::open(c.path.clone(), c.segno, 0)?;
            // SAFETY: a closed segment has no writer (it is below its lane's current
            // segment, or a base segment, which nothing appends to).
            let bytes = unsafe { seg.bytes() };
            let scan = frame::scan(bytes, self.inner.shared.sealer.as_ref()).map_err(|source| {
                JournalError::Seal {
                    file: c.path.clone(),
                    source,
                }
            })?;
            if let Some(bad) = scan.bad {
                return Err(JournalError::Corrupt {
                    file: c.path.clone(),
                    offset: bad.offset,
                    what: bad.what,
                });
            }
            replay.lanes.entry(c.lane.clone()).or_default().extend(
                scan.records
                    .into_iter()
                    .map(|(end, r)| (Pos::new(c.segno, end), r)),
            );
        }
        Ok(replay)
    }

    /// Online compaction: writes `keep` (what the caller made of [`Journal::read_closed`]
    /// of `segments`) to new `base` segments, syncs them and the directory, then deletes
    /// `segments`. The writers go on meanwhile. A crash before the renames leaves the old
    /// segments (the temporary files are removed at the next open); after them, replay
    /// may see a record both in the new base and in an old segment not deleted yet, and
    /// the consumer keeps one per sequence number. An old base may then be left without
    /// its first segments, ahead of the new one in segment order: the consumer must not
    /// rely on a base's first records (its names) preceding the rest. Nothing is lost at
    /// any point.
    pub fn compact_closed(
        &self,
        segments: &[ClosedSegment],
        keep: impl IntoIterator<Item = OwnedRecord>,
    ) -> Result<(), JournalError> {
        let shared = &self.inner.shared;
        let _one = lock(&self.inner.compacting);
        if shared.stop.load(Ordering::Acquire) {
            return Err(JournalError::Closed);
        }
        let written = match write_base(shared, keep) {
            Ok(w) => w,
            Err((e, tmps)) => {
                for t in tmps {
                    let _ = std::fs::remove_file(t);
                }
                return Err(e);
            }
        };
        for (tmp, fin) in &written {
            std::fs::rename(tmp, fin)
                .map_err(|e| JournalError::io("renaming compacted segment", fin, e))?;
        }
        sync_dir(&shared.dir)?;
        for c in segments {
            match std::fs::remove_file(&c.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(JournalError::io("removing compacted segment", &c.path, e)),
            }
        }
        sync_dir(&shared.dir)?;
        shared.compactions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Counters: per lane frames, bytes, positions and segments; syncs and their duration.
    pub fn stats(&self) -> JournalStats {
        let s = &self.inner.shared;
        let lanes = lock(&s.lanes)
            .iter()
            .map(|l| LaneStats {
                lane: l.name,
                frames: l.frames.load(Ordering::Relaxed),
                bytes: l.bytes.load(Ordering::Relaxed),
                written: Pos(l.written.load(Ordering::Acquire)),
                durable: Pos(l.durable.load(Ordering::Acquire)),
                segment: l.segno.load(Ordering::Relaxed),
                segments: l.segments.load(Ordering::Relaxed),
            })
            .collect();
        JournalStats {
            lanes,
            syncs: s.syncs.load(Ordering::Relaxed),
            last_sync_ns: s.last_sync_ns.load(Ordering::Relaxed),
            max_sync_ns: s.max_sync_ns.load(Ordering::Relaxed),
            sync_errors: s.sync_errors.load(Ordering::Relaxed),
            compactions: s.compactions.load(Ordering::Relaxed),
        }
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.inner.shared.dir
    }

    /// Syncs everything appended (under every policy), wakes the waiters, stops the
    /// flusher and releases the directory lock. Appends afterwards fail with
    /// [`JournalError::Closed`]. Idempotent.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

/// Takes the directory's lock file (`flock`, exclusive, non-blocking).
fn take_lock(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| JournalError::io("opening lock file", &path, e))?;
    // SAFETY: plain syscall on a valid open descriptor.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(JournalError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        return Err(JournalError::io("locking", &path, e));
    }
    Ok(f)
}

/// Every segment file of the directory, by segment number.
fn segment_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| JournalError::io("listing journal", dir, e))? {
        let entry = entry.map_err(|e| JournalError::io("listing journal", dir, e))?;
        if let Some((_, segno)) = entry.file_name().to_str().and_then(parse_name) {
            out.push((segno, entry.path()));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Writes `keep` into new `base` segments under temporary names, synced. Returns
/// (temporary, final) names; on error, the temporary files made so far.
#[allow(clippy::type_complexity)]
fn write_base(
    shared: &Shared,
    keep: impl IntoIterator<Item = OwnedRecord>,
) -> Result<Vec<(PathBuf, PathBuf)>, (JournalError, Vec<PathBuf>)> {
    let mut files: Vec<(PathBuf, PathBuf)> = Vec::new();
    let fail = |e: JournalError, files: &[(PathBuf, PathBuf)]| {
        (e, files.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>())
    };
    let mut cur: Option<(Segment, u64)> = None;
    let mut scratch = rkyv::util::AlignedVec::<16>::new();
    let sealed = shared.sealer.is_some();
    for rec in keep {
        let flen = lane::owned_frame_len(&rec, sealed);
        if flen > shared.segment_bytes {
            return Err(fail(
                JournalError::TooLarge {
                    frame: flen,
                    segment_bytes: shared.segment_bytes,
                },
                &files,
            ));
        }
        if cur.as_ref().is_none_or(|(s, off)| off + flen > s.len()) {
            if let Some((s, _)) = cur.take() {
                s.sync_all().map_err(|e| fail(e, &files))?;
            }
            let segno = shared.alloc_segno().map_err(|e| fail(e, &files))?;
            let fin = shared.dir.join(file_name(BASE_LANE, segno));
            let tmp = fin.with_extension("seg.tmp");
            files.push((tmp.clone(), fin));
            let s = Segment::create(
                tmp,
                segno,
                shared.segment_bytes,
                false,
                false,
                shared.sealer.as_ref(),
            )
            .map_err(|e| fail(e, &files))?;
            let start = s.start;
            cur = Some((s, start));
        }
        let Some((s, off)) = cur.as_mut() else {
            unreachable!("a segment was just made")
        };
        // SAFETY: a new segment nobody else maps; `[off, off + flen)` is in bounds
        // (checked above), zero, and 8-aligned.
        unsafe { lane::write_owned(s, *off, &rec, &mut scratch) }.map_err(|e| fail(e, &files))?;
        *off += flen;
    }
    if let Some((s, _)) = cur.take() {
        s.sync_all().map_err(|e| fail(e, &files))?;
    }
    Ok(files)
}

struct LaneRecovery {
    resume: Option<Resume>,
    removed: bool,
}

/// Replays one lane's segments (sorted by number) into `replay`.
fn recover_lane(
    lane: &str,
    segs: Vec<(u64, PathBuf)>,
    cfg: &JournalConfig,
    replay: &mut Replay,
) -> Result<LaneRecovery, JournalError> {
    let mut kept = Vec::new();
    let mut removed = false;
    for (segno, path) in segs {
        let seg = Segment::open(path, segno, 0)?;
        // SAFETY: no writer exists yet.
        if frame::all_zero(unsafe { seg.bytes() }) {
            // Pre-created and never written.
            let path = seg.path.clone();
            drop(seg);
            std::fs::remove_file(&path)
                .map_err(|e| JournalError::io("removing unused segment", &path, e))?;
            removed = true;
            continue;
        }
        kept.push(seg);
    }
    let Some(last) = kept.len().checked_sub(1) else {
        return Ok(LaneRecovery {
            resume: None,
            removed,
        });
    };
    let segments = kept.len() as u64;
    let records = replay.lanes.entry(lane.to_owned()).or_default();
    let mut resume = None;
    for (i, mut seg) in kept.into_iter().enumerate() {
        if i == last && seg.len() < cfg.segment_bytes {
            // A cut last segment: grow it back (zeros) so appending has its full size.
            let (segno, path) = (seg.segno, seg.path.clone());
            drop(seg);
            seg = Segment::open(path, segno, cfg.segment_bytes)?;
        }
        // SAFETY: no writer exists yet; the slice is dropped before the repair below.
        let bytes = unsafe { seg.bytes() };
        let scan =
            frame::scan(bytes, cfg.sealer.as_ref()).map_err(|source| JournalError::Seal {
                file: seg.path.clone(),
                source,
            })?;
        if scan.key.is_some() && scan.records.is_empty() && scan.bad.is_none() {
            // A sealed segment pre-created and never written: only its key frame.
            let path = seg.path.clone();
            drop(seg);
            std::fs::remove_file(&path)
                .map_err(|e| JournalError::io("removing unused segment", &path, e))?;
            removed = true;
            continue;
        }
        records.extend(
            scan.records
                .into_iter()
                .map(|(end, r)| (Pos::new(seg.segno, end), r)),
        );
        let mut end = scan.end;
        if let Some(bad) = scan.bad {
            if i != last || !frame::is_torn(bytes, &bad) {
                return Err(JournalError::Corrupt {
                    file: seg.path.clone(),
                    offset: bad.offset,
                    what: bad.what,
                });
            }
            let stop = bytes
                .iter()
                .rposition(|&b| b != 0)
                .map_or(0, |p| p as u64 + 1);
            let n = stop.saturating_sub(bad.offset);
            // SAFETY: no writer exists; `[bad.offset, stop)` is in bounds.
            unsafe { seg.bytes_mut(bad.offset, n) }.fill(0);
            seg.sync_all()?;
            tracing::warn!(
                lane,
                file = %seg.path.display(),
                offset = bad.offset,
                what = %bad.what,
                "journal: torn last record cut off"
            );
            replay.truncated.push(TornTail {
                lane: lane.to_owned(),
                file: seg.path.clone(),
                offset: bad.offset,
                bytes: n,
                what: bad.what,
            });
            end = bad.offset;
        }
        if i == last {
            if cfg.sync != SyncPolicy::None {
                // What a previous run left in the page cache is on disk before anything
                // new is acknowledged as durable after it.
                seg.sync_all()?;
            }
            if cfg.sealer.is_some() {
                // A sealed journal never appends to a segment of an earlier run: its
                // nonces (frame offsets) would repeat under that segment's key after a
                // torn tail was cut, and a plain segment must not take new records in
                // clear. The writer starts a new segment instead.
                continue;
            }
            resume = Some(Resume {
                segno: seg.segno,
                path: seg.path.clone(),
                off: end,
                segments,
            });
        }
    }
    Ok(LaneRecovery { resume, removed })
}

#[cfg(test)]
mod sealed_tests {
    use super::*;
    use crate::atrest::testing::{MemoryKek, sealer};

    fn intent(seq: u64) -> IntentRec {
        IntentRec {
            seq,
            principal: 1,
            id: IntentRec::id_bytes(&format!("secret-order-{seq}")),
            account: [0x42; 20],
            account_idx: 0,
            kind: 1,
            route: 2,
            urgent: false,
            public_fallback: false,
            to: [0xab; 20],
            value: [seq as u8; 32],
            gas_limit: 21_000,
            max_fee_cap: 7u128.to_le_bytes(),
            travel_present: false,
            travel_vasp_key: 0,
            travel_hash: [0; 32],
            approved_by: 0,
            at_unix_ns: 1_700_000_000_000_000_000 + seq,
            calldata_len: 0,
        }
    }

    const CALLDATA: &[u8] = b"CALLDATA-IN-CLEAR-WOULD-SHOW-HERE";

    fn cfg(dir: &Path, sealer: Option<crate::atrest::Sealer>) -> JournalConfig {
        JournalConfig {
            segment_bytes: 1 << 16,
            sync: SyncPolicy::None,
            sealer,
            ..JournalConfig::new(dir)
        }
    }

    fn raw_bytes(dir: &Path) -> Vec<u8> {
        let mut all = Vec::new();
        for (_, p) in segment_files(dir).unwrap() {
            all.extend(std::fs::read(p).unwrap());
        }
        all
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_sealed_journal_replays_and_its_files_hold_nothing_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let s = sealer();
        {
            let (j, replay) = Journal::open(cfg(dir.path(), Some(s.clone()))).unwrap();
            assert!(replay.is_empty());
            let mut w = j.lane("intake").unwrap();
            // Enough to rotate through several 64 KiB segments.
            for seq in 0..600 {
                w.append_intent(&intent(seq), CALLDATA).unwrap();
            }
            j.shutdown();
        }
        let raw = raw_bytes(dir.path());
        assert!(!contains(&raw, b"secret-order-"), "an intent id in clear");
        assert!(!contains(&raw, CALLDATA), "calldata in clear");
        assert!(segment_files(dir.path()).unwrap().len() > 2);

        let (j, replay) = Journal::open(cfg(dir.path(), Some(s.clone()))).unwrap();
        let got = replay.lane("intake");
        assert_eq!(got.len(), 600);
        for (seq, (_, r)) in got.iter().enumerate() {
            let OwnedRecord::Intent(i, data) = r else {
                panic!("not an intent")
            };
            assert_eq!(i.id(), format!("secret-order-{seq}"));
            assert_eq!(data, CALLDATA);
        }
        // The second run never appends to a segment of the first: a new segment, a new key.
        let before: Vec<u64> = segment_files(dir.path())
            .unwrap()
            .iter()
            .map(|s| s.0)
            .collect();
        let mut w = j.lane("intake").unwrap();
        let pos = w.append_intent(&intent(600), CALLDATA).unwrap();
        assert!(pos.segno() > *before.iter().max().unwrap());
        j.shutdown();
        drop(j);
        let (_j, replay) = Journal::open(cfg(dir.path(), Some(s))).unwrap();
        assert_eq!(replay.lane("intake").len(), 601);
    }

    #[test]
    fn a_sealed_journal_needs_its_kek_and_a_changed_byte_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let s = sealer();
        {
            let (j, _) = Journal::open(cfg(dir.path(), Some(s.clone()))).unwrap();
            let mut w = j.lane("intake").unwrap();
            for seq in 0..3 {
                w.append_intent(&intent(seq), CALLDATA).unwrap();
            }
            j.shutdown();
        }
        let e = Journal::open(cfg(dir.path(), None)).unwrap_err();
        assert!(
            matches!(
                &e,
                JournalError::Seal {
                    source: crate::atrest::SealError::NoKek { .. },
                    ..
                }
            ),
            "{e}"
        );
        let other = crate::atrest::Sealer::new(MemoryKek::new("test:other"));
        let e = Journal::open(cfg(dir.path(), Some(other))).unwrap_err();
        assert!(
            matches!(
                &e,
                JournalError::Seal {
                    source: crate::atrest::SealError::OtherKek { .. },
                    ..
                }
            ),
            "{e}"
        );
        // Flip a ciphertext byte of the LAST frame and fix its CRC: a torn write cannot do
        // that, so it must stop the start rather than be cut off.
        let (_, path) = segment_files(dir.path()).unwrap().pop().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let mut off = 0usize;
        let mut last = 0usize;
        loop {
            let len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            if len == 0 {
                break;
            }
            last = off;
            off += frame::frame_len(len as u64) as usize;
        }
        let plen = u32::from_le_bytes(bytes[last..last + 4].try_into().unwrap()) as usize;
        bytes[last + 8 + 20] ^= 0x01;
        let crc = crc32c::crc32c(&bytes[last + 8..last + 8 + plen]);
        bytes[last + 4..last + 8].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let e = Journal::open(cfg(dir.path(), Some(s))).unwrap_err();
        assert!(
            matches!(&e, JournalError::Corrupt { offset, .. } if *offset == last as u64),
            "{e}"
        );
    }

    #[test]
    fn compaction_of_a_sealed_journal_writes_sealed_base_segments() {
        let dir = tempfile::tempdir().unwrap();
        let s = sealer();
        let (j, _) = Journal::open(cfg(dir.path(), Some(s.clone()))).unwrap();
        j.compact((0..50).map(|seq| OwnedRecord::Intent(intent(seq), CALLDATA.to_vec())))
            .unwrap();
        j.shutdown();
        drop(j);
        let raw = raw_bytes(dir.path());
        assert!(!contains(&raw, b"secret-order-"));
        let (_j, replay) = Journal::open(cfg(dir.path(), Some(s))).unwrap();
        assert_eq!(replay.lane(BASE_LANE).len(), 50);
    }

    #[test]
    fn a_plain_journal_goes_on_sealed_once_a_kek_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(cfg(dir.path(), None)).unwrap();
            let mut w = j.lane("intake").unwrap();
            w.append_intent(&intent(0), CALLDATA).unwrap();
            j.shutdown();
        }
        let s = sealer();
        {
            let (j, replay) = Journal::open(cfg(dir.path(), Some(s.clone()))).unwrap();
            assert_eq!(replay.lane("intake").len(), 1);
            let mut w = j.lane("intake").unwrap();
            w.append_intent(&intent(1), CALLDATA).unwrap();
            j.shutdown();
        }
        let files = segment_files(dir.path()).unwrap();
        assert_eq!(files.len(), 2, "the plain segment is not appended to");
        let second = std::fs::read(&files[1].1).unwrap();
        assert!(!contains(&second, CALLDATA));
        let (_j, replay) = Journal::open(cfg(dir.path(), Some(s))).unwrap();
        assert_eq!(replay.lane("intake").len(), 2);
    }
}
