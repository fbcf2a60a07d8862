//! Lanes: one writer each, positions, durability watches.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};

use rkyv::util::AlignedVec;

use super::error::JournalError;
use super::frame;
use super::record::{DoneRec, IntentRec, OwnedRecord, PrincipalRec, Record, SignedRec, StateRec};
use super::segment::{Segment, file_name};
use super::{Shared, lock};

const OFFSET_BITS: u32 = 40;

/// A position in a lane: `(segment number << 40) | end offset of the frame`. Monotone per
/// lane (segment numbers only grow, also across restarts and compactions); comparing two
/// positions of one lane tells which frame was appended first. `Pos(0)` is before every
/// frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos(pub u64);

impl Pos {
    /// The position `end` bytes into segment `segno`.
    pub const fn new(segno: u64, end: u64) -> Pos {
        Pos((segno << OFFSET_BITS) | end)
    }

    /// Segment number.
    pub const fn segno(self) -> u64 {
        self.0 >> OFFSET_BITS
    }

    /// Byte offset in the segment (the end of the frame).
    pub const fn offset(self) -> u64 {
        self.0 & ((1 << OFFSET_BITS) - 1)
    }
}

/// Segments of a lane the flusher still has to sync, and the next one, pre-created.
#[derive(Debug, Default)]
pub(crate) struct LaneSegs {
    /// Oldest first; the last is the writer's current segment.
    pub unsynced: VecDeque<Arc<Segment>>,
    /// Created by the flusher for the writer's next rotation.
    pub next: Option<Arc<Segment>>,
    /// A segment the writer created itself, for the flusher to prefault.
    pub prefault: Option<Arc<Segment>>,
}

/// What a lane's writer, the flusher and the durability watches share.
#[derive(Debug)]
pub(crate) struct LaneShared {
    pub name: &'static str,
    /// Position after the last published frame (release-stored by the writer).
    pub written: AtomicU64,
    /// Position up to which frames are synced (release-stored by the flusher).
    pub durable: AtomicU64,
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    /// The writer's current segment number.
    pub segno: AtomicU64,
    /// Segment files of this lane on disk.
    pub segments: AtomicU64,
    /// The writer passed half of its segment: the flusher should pre-create the next.
    pub want_next: AtomicBool,
    pub segs: Mutex<LaneSegs>,
}

impl LaneShared {
    pub(crate) fn new(name: &'static str, seg: Arc<Segment>, off: u64, segments: u64) -> Self {
        let at = Pos::new(seg.segno, off).0;
        LaneShared {
            name,
            written: AtomicU64::new(at),
            durable: AtomicU64::new(at),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            segno: AtomicU64::new(seg.segno),
            segments: AtomicU64::new(segments),
            want_next: AtomicBool::new(false),
            segs: Mutex::new(LaneSegs {
                unsynced: VecDeque::from([seg]),
                next: None,
                prefault: None,
            }),
        }
    }
}

/// Tells whether a lane's frames are durable under the journal's sync policy. Cheap to
/// clone; reading it is one atomic load.
#[derive(Clone)]
pub struct DurableWatch {
    lane: Arc<LaneShared>,
    waits: bool,
}

impl DurableWatch {
    /// Whether the frame ending at `pos` is durable: synced to disk under
    /// [`super::SyncPolicy::Group`]; always true under `None` and `Interval`, where nothing
    /// waits for a sync. `Pos(0)` is always durable.
    #[inline]
    pub fn is_durable(&self, pos: Pos) -> bool {
        !self.waits || self.lane.durable.load(Ordering::Acquire) >= pos.0
    }

    /// Whether positions have to wait for the flusher (group commit).
    pub fn waits(&self) -> bool {
        self.waits
    }

    /// The position up to which the lane is synced.
    pub fn synced(&self) -> Pos {
        Pos(self.lane.durable.load(Ordering::Acquire))
    }
}

impl fmt::Debug for DurableWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableWatch")
            .field("lane", &self.lane.name)
            .field("waits", &self.waits)
            .field("synced", &self.synced())
            .finish()
    }
}

/// The single writer of one lane. `Send` (hand it to its stage's thread) but not `Sync`.
///
/// An append encodes the record straight into the mapped segment (rkyv's low-level API
/// over a fixed buffer: no allocation), checksums it, stores the header last, and
/// publishes the new end with a release store. No lock, no system call, no allocation;
/// a rotation to the next segment (every `segment_bytes`) is the exception, normally
/// with a segment the flusher already created.
pub struct LaneWriter {
    lane: Arc<LaneShared>,
    shared: Arc<Shared>,
    seg: Arc<Segment>,
    segno: u64,
    off: u64,
    cap: u64,
    asked_next: bool,
    group: bool,
    /// Where a sealed frame is encoded and encrypted before its ciphertext is copied into
    /// the mapping; sized at start for the largest frame expected (empty when the
    /// journal is not sealed).
    scratch: AlignedVec<16>,
    _not_sync: PhantomData<Cell<()>>,
}

/// Room the scratch buffer of a sealed lane starts with: a record with a 64 KiB tail (the
/// desk frame cap bounds calldata below that), so sealing allocates nothing.
const SEAL_SCRATCH: usize = 80 << 10;

impl fmt::Debug for LaneWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LaneWriter")
            .field("lane", &self.lane.name)
            .field("segment", &self.seg.path)
            .field("offset", &self.off)
            .finish()
    }
}

impl LaneWriter {
    pub(crate) fn new(
        lane: Arc<LaneShared>,
        shared: Arc<Shared>,
        seg: Arc<Segment>,
        off: u64,
    ) -> Self {
        let group = matches!(shared.sync, super::SyncPolicy::Group { .. });
        let scratch = if shared.sealer.is_some() {
            AlignedVec::with_capacity(SEAL_SCRATCH)
        } else {
            AlignedVec::new()
        };
        LaneWriter {
            scratch,
            segno: seg.segno,
            cap: seg.len(),
            asked_next: false,
            lane,
            shared,
            seg,
            off,
            group,
            _not_sync: PhantomData,
        }
    }

    /// The lane's name.
    pub fn name(&self) -> &'static str {
        self.lane.name
    }

    /// The position after the last frame appended.
    pub fn position(&self) -> Pos {
        Pos::new(self.segno, self.off)
    }

    /// A watch on this lane's durability, for the threads that hold acks or sends until
    /// their record is synced.
    pub fn durable(&self) -> DurableWatch {
        DurableWatch {
            lane: Arc::clone(&self.lane),
            waits: self.group,
        }
    }

    /// Appends a principal's name.
    #[inline]
    pub fn append_principal(&mut self, r: &PrincipalRec) -> Result<Pos, JournalError> {
        self.append(r, &[])
    }

    /// Appends an intent with its calldata (`r.calldata_len` is set from `calldata`).
    #[inline]
    pub fn append_intent(&mut self, r: &IntentRec, calldata: &[u8]) -> Result<Pos, JournalError> {
        self.append(r, calldata)
    }

    /// Appends a signed transaction with its raw bytes (`r.raw_len` is set from `raw`).
    #[inline]
    pub fn append_signed(&mut self, r: &SignedRec, raw: &[u8]) -> Result<Pos, JournalError> {
        self.append(r, raw)
    }

    /// Appends a state change.
    #[inline]
    pub fn append_state(&mut self, r: &StateRec) -> Result<Pos, JournalError> {
        self.append(r, &[])
    }

    /// Appends a finished intent's compact record.
    #[inline]
    pub fn append_done(&mut self, r: &DoneRec) -> Result<Pos, JournalError> {
        self.append(r, &[])
    }

    /// Appends an owned record (borrowed: no allocation either).
    pub fn append_record(&mut self, r: &OwnedRecord) -> Result<Pos, JournalError> {
        match r {
            OwnedRecord::Principal(p) => self.append(p, &[]),
            OwnedRecord::Intent(i, data) => self.append(i, data),
            OwnedRecord::Signed(s, raw) => self.append(s, raw),
            OwnedRecord::State(s) => self.append(s, &[]),
            OwnedRecord::Done(d) => self.append(d, &[]),
        }
    }

    /// Appends record `rec` followed by `tail` (empty for the kinds without a tail);
    /// returns the position of the frame's end. Once this returns, the frame is in the
    /// page cache (it survives a crash of the process); see [`LaneWriter::durable`] for
    /// when it is on disk.
    #[inline]
    pub fn append<R: Record>(&mut self, rec: &R, tail: &[u8]) -> Result<Pos, JournalError> {
        if !R::HAS_TAIL && !tail.is_empty() {
            return Err(JournalError::Encode(R::KIND));
        }
        if self.shared.stop.load(Ordering::Relaxed) {
            return Err(JournalError::Closed);
        }
        let plen = frame::payload_len::<R>(tail.len() as u64, self.seg.key.is_some());
        let flen = frame::frame_len(plen);
        if plen > u32::MAX as u64 {
            return Err(JournalError::TooLarge {
                frame: flen,
                segment_bytes: self.shared.segment_bytes,
            });
        }
        if self.off + flen > self.cap {
            self.rotate(flen)?;
        }
        // SAFETY: `[off, off + flen)` is past the published end of the current segment
        // and in bounds (checked above): only this writer touches it, and it is zero
        // (segments are zero-filled and recovery zeroes anything past the last frame).
        unsafe { write_frame(&self.seg, self.off, flen, rec, tail, &mut self.scratch)? };
        self.off += flen;
        let pos = Pos::new(self.segno, self.off);
        self.lane.written.store(pos.0, Ordering::Release);
        // Single writer: plain load + store instead of a locked read-modify-write.
        let l = &self.lane;
        l.frames
            .store(l.frames.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        l.bytes
            .store(l.bytes.load(Ordering::Relaxed) + flen, Ordering::Relaxed);
        if self.group {
            // Pairs with the flusher's fence between setting `flusher_sleeping` and
            // re-reading `written`: either it sees this frame or this sees it asleep.
            fence(Ordering::SeqCst);
            if self.shared.flusher_sleeping.load(Ordering::Relaxed)
                && self.shared.flusher_sleeping.swap(false, Ordering::AcqRel)
            {
                self.shared.wake_flusher();
            }
        }
        if !self.asked_next && self.off > self.cap / 2 {
            self.asked_next = true;
            self.lane.want_next.store(true, Ordering::Release);
            self.shared.wake_flusher();
        }
        Ok(pos)
    }

    /// Moves to the next segment: the one the flusher pre-created, or a new one.
    #[cold]
    #[inline(never)]
    fn rotate(&mut self, flen: u64) -> Result<(), JournalError> {
        let seg_bytes = self.shared.segment_bytes;
        if flen > seg_bytes {
            return Err(JournalError::TooLarge {
                frame: flen,
                segment_bytes: seg_bytes,
            });
        }
        let ready = lock(&self.lane.segs).next.take();
        let seg = match ready {
            Some(s) if s.segno > self.segno && s.len() >= flen => s,
            stale => {
                if let Some(s) = stale {
                    let _ = std::fs::remove_file(&s.path);
                }
                let segno = self.shared.alloc_segno()?;
                let path = self.shared.dir.join(file_name(self.lane.name, segno));
                let seg = Arc::new(Segment::create(
                    path,
                    segno,
                    seg_bytes,
                    self.shared.syncs(),
                    false,
                    self.shared.sealer.as_ref(),
                )?);
                lock(&self.lane.segs).prefault = Some(Arc::clone(&seg));
                self.shared.wake_flusher();
                seg
            }
        };
        lock(&self.lane.segs).unsynced.push_back(Arc::clone(&seg));
        self.lane.segno.store(seg.segno, Ordering::Relaxed);
        self.lane.segments.fetch_add(1, Ordering::Relaxed);
        self.segno = seg.segno;
        self.cap = seg.len();
        self.off = seg.start;
        self.asked_next = false;
        self.seg = seg;
        Ok(())
    }
}

/// Encodes a frame at `off` of `seg` (sealed with the segment's key, when it has one,
/// through `scratch`) and publishes its header.
///
/// # Safety
///
/// `[off, off + flen)` is in bounds, zero, and accessed by no one else meanwhile; `off` is
/// 8-aligned.
pub(crate) unsafe fn write_frame<R: Record>(
    seg: &Segment,
    off: u64,
    flen: u64,
    rec: &R,
    tail: &[u8],
    scratch: &mut AlignedVec<16>,
) -> Result<(), JournalError> {
    // SAFETY: the caller's contract.
    let bytes = unsafe { seg.bytes_mut(off, flen) };
    let header = match &seg.key {
        None => frame::encode(bytes, rec, tail),
        Some(key) => frame::encode_sealed(bytes, rec, tail, key, off, scratch),
    }
    .map_err(JournalError::Encode)?;
    // SAFETY: the caller's contract; the payload is written.
    unsafe { seg.store_header(off, header) };
    Ok(())
}

/// The frame size of an owned record, in a sealed segment or a plain one.
pub(crate) fn owned_frame_len(r: &OwnedRecord, sealed: bool) -> u64 {
    let f = |payload: u64| frame::frame_len(payload);
    match r {
        OwnedRecord::Principal(_) => f(frame::payload_len::<PrincipalRec>(0, sealed)),
        OwnedRecord::Intent(_, d) => f(frame::payload_len::<IntentRec>(d.len() as u64, sealed)),
        OwnedRecord::Signed(_, d) => f(frame::payload_len::<SignedRec>(d.len() as u64, sealed)),
        OwnedRecord::State(_) => f(frame::payload_len::<StateRec>(0, sealed)),
        OwnedRecord::Done(_) => f(frame::payload_len::<DoneRec>(0, sealed)),
    }
}

/// Writes an owned record as a frame at `off` of `seg`.
///
/// # Safety
///
/// As [`write_frame`], with `flen = owned_frame_len(r, seg.key.is_some())`.
pub(crate) unsafe fn write_owned(
    seg: &Segment,
    off: u64,
    r: &OwnedRecord,
    scratch: &mut AlignedVec<16>,
) -> Result<(), JournalError> {
    let flen = owned_frame_len(r, seg.key.is_some());
    match r {
        // SAFETY: the caller's contract (likewise in each arm).
        OwnedRecord::Principal(p) => unsafe { write_frame(seg, off, flen, p, &[], scratch) },
        // SAFETY: as above.
        OwnedRecord::Intent(i, d) => unsafe { write_frame(seg, off, flen, i, d, scratch) },
        // SAFETY: as above.
        OwnedRecord::Signed(s, d) => unsafe { write_frame(seg, off, flen, s, d, scratch) },
        // SAFETY: as above.
        OwnedRecord::State(s) => unsafe { write_frame(seg, off, flen, s, &[], scratch) },
        // SAFETY: as above.
        OwnedRecord::Done(d) => unsafe { write_frame(seg, off, flen, d, &[], scratch) },
    }
}
