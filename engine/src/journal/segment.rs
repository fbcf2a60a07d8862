//! Segment files: naming, creation (preallocated, zero-filled), and their shared
//! memory mappings.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Advice, MmapMut, MmapOptions};

use super::error::JournalError;
use super::frame;
use crate::atrest::{Sealer, SegmentKey};

/// Largest segment size: a [`super::Pos`] keeps the offset in 40 bits.
pub(crate) const MAX_SEGMENT_BYTES: u64 = 1 << 40;
/// Largest segment number: a [`super::Pos`] keeps it in the 24 bits above the offset.
pub(crate) const MAX_SEGNO: u64 = (1 << 24) - 1;

/// `<lane>-<segno:010>.seg`.
pub(crate) fn file_name(lane: &str, segno: u64) -> String {
    format!("{lane}-{segno:010}.seg")
}

/// Whether `lane` is a valid lane name: 1 to 32 letters a-z.
pub(crate) fn valid_lane(lane: &str) -> bool {
    (1..=32).contains(&lane.len()) && lane.bytes().all(|b| b.is_ascii_lowercase())
}

/// Parses `<lane>-<segno:010>.seg` (exactly ten digits).
pub(crate) fn parse_name(name: &str) -> Option<(&str, u64)> {
    let stem = name.strip_suffix(".seg")?;
    let (lane, digits) = stem.rsplit_once('-')?;
    if !valid_lane(lane) || digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((lane, digits.parse().ok()?))
}

/// fsyncs a directory, so entries created, renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| JournalError::io("syncing directory", dir, e))
}

/// One segment file and its shared, writable mapping.
///
/// Writing goes through raw pointers into the mapping (never through a `&[u8]` of the
/// whole mapping), so the lane's writer can fill bytes past its published end while the
/// flusher `msync`s the bytes before it.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Segment number (from the journal-wide counter).
    pub segno: u64,
    /// The file.
    pub path: PathBuf,
    file: File,
    map: MmapMut,
    /// The data key of a segment this process created sealed (records are encrypted
    /// with it); `None` for a plain segment and for segments opened, never appended to
    /// with a key.
    pub key: Option<SegmentKey>,
    /// Offset of the first record: after the key frame of a sealed segment, else 0.
    pub start: u64,
}

impl Segment {
    /// Creates `path` (which must not exist) with `len` zero bytes, allocated on disk
    /// (`fallocate`, so writing through the mapping cannot hit a full disk), and maps it.
    /// With `durable`, the file and its directory entry are synced before returning.
    /// With `prefault`, the mapping's page tables are populated for writing, so the
    /// appends that fill it do not take page faults. With `sealer`, the segment gets a
    /// fresh data key (one call to the KEK) and starts with its key frame (the wrapped
    /// key only).
    pub fn create(
        path: PathBuf,
        segno: u64,
        len: u64,
        durable: bool,
        prefault: bool,
        sealer: Option<&Sealer>,
    ) -> Result<Segment, JournalError> {
        let key = sealer
            .map(Sealer::new_key)
            .transpose()
            .map_err(|source| JournalError::Seal {
                file: path.clone(),
                source,
            })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| JournalError::io("creating segment", &path, e))?;
        allocate(&file, len).map_err(|e| JournalError::io("allocating segment", &path, e))?;
        let mut seg = Segment::map(path, segno, file, len)?;
        if let Some(key) = key {
            let header = key.header();
            let flen = frame::key_frame_len(header.len());
            if flen > len {
                return Err(JournalError::TooLarge {
                    frame: flen,
                    segment_bytes: len,
                });
            }
            // SAFETY: a segment just created, mapped only here: `[0, flen)` is in bounds
            // (checked above), zero, and nobody else accesses it.
            let h = frame::encode_key(unsafe { seg.bytes_mut(0, flen) }, &header);
            // SAFETY: offset 0 is 8-aligned and in bounds; only this function has the segment.
            unsafe { seg.store_header(0, h) };
            seg.key = Some(key);
            seg.start = flen;
        }
        if durable {
            seg.sync_range(0, seg.start)
                .and_then(|()| seg.file.sync_all())
                .map_err(|e| JournalError::io("syncing segment", &seg.path, e))?;
            if let Some(dir) = seg.path.parent() {
                sync_dir(dir)?;
            }
        }
        if prefault {
            seg.prefault(0);
        }
        Ok(seg)
    }

    /// Opens and maps an existing segment, first growing it with zeros to `min_len` if it
    /// is shorter.
    pub fn open(path: PathBuf, segno: u64, min_len: u64) -> Result<Segment, JournalError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| JournalError::io("opening segment", &path, e))?;
        let mut len = file
            .metadata()
            .map_err(|e| JournalError::io("reading segment size", &path, e))?
            .len();
        if len < min_len {
            allocate(&file, min_len).map_err(|e| JournalError::io("growing segment", &path, e))?;
            len = min_len;
        }
        Segment::map(path, segno, file, len)
    }

    fn map(path: PathBuf, segno: u64, file: File, len: u64) -> Result<Segment, JournalError> {
        if len == 0 {
            // mmap of zero bytes is an error; a one-byte file still maps one page.
            file.set_len(8)
                .map_err(|e| JournalError::io("growing empty segment", &path, e))?;
            return Segment::map(path, segno, file, 8);
        }
        // SAFETY: `MmapMut::map_mut` is unsafe because the mapping's bytes change if the
        // file is modified or truncated outside this mapping. The journal directory is
        // locked by this journal (flock on its lock file), only this module writes segment
        // files, and a mapped segment is never truncated (compaction and open remove
        // files, which keeps a mapped inode alive). Bytes are only ever read through
        // validated copies or raw pointers, never as typed values that could be
        // invalidated.
        let map = unsafe { MmapOptions::new().len(len as usize).map_mut(&file) }
            .map_err(|e| JournalError::io("mapping segment", &path, e))?;
        Ok(Segment {
            segno,
            path,
            file,
            map,
            key: None,
            start: 0,
        })
    }

    /// Mapped length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Populates the page tables from `from` to the end for writing (`MADV_POPULATE_WRITE`),
    /// best effort: where the kernel lacks it, the first write to each page faults instead.
    pub fn prefault(&self, from: u64) {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let start = from / page * page;
        if start < self.len() {
            let _ = self.map.advise_range(
                Advice::PopulateWrite,
                start as usize,
                (self.len() - start) as usize,
            );
        }
    }

    /// The whole mapping, to read.
    ///
    /// # Safety
    ///
    /// No one may write to the mapping while the slice lives: only at open and
    /// compaction, before any writer exists for this segment.
    pub unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` initialised bytes (a mapped file reads as its
        // contents, zero past them); nothing writes meanwhile (caller's contract).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.map.len()) }
    }

    /// `len` bytes at `off`, to write.
    ///
    /// # Safety
    ///
    /// The caller is the only one to access `[off, off + len)` while the slice lives (the
    /// lane's writer, past its published end), and the range is in bounds.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, off: u64, len: u64) -> &mut [u8] {
        debug_assert!(off + len <= self.len());
        // SAFETY: `off` is in bounds of the mapping (caller's contract).
        let start = unsafe { self.map.as_ptr().cast_mut().add(off as usize) };
        // SAFETY: `len` bytes from `start` are in bounds and exclusively accessed (caller's
        // contract); the pointer comes from the mmap call, so writing through it is allowed.
        unsafe { std::slice::from_raw_parts_mut(start, len as usize) }
    }

    /// Publishes a frame by storing its 8-byte header at `off` (8-aligned) with release
    /// ordering, after the payload bytes it covers.
    ///
    /// # Safety
    ///
    /// `off` is 8-aligned, in bounds, and only the caller accesses these 8 bytes.
    pub unsafe fn store_header(&self, off: u64, header: u64) {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= self.len());
        let ptr = self.map.as_ptr().cast_mut();
        // SAFETY: `off + 8` is in bounds (caller's contract).
        let at = unsafe { ptr.add(off as usize) }.cast::<u64>();
        // SAFETY: the mapping is page-aligned and `off` 8-aligned, so `at` is valid and
        // aligned for an `AtomicU64`; no other access to these bytes is concurrent
        // (caller's contract). The atomic release store keeps every payload byte written
        // before it ahead of the header, so a process killed mid-append leaves either a
        // whole frame or an unpublished one (zero header).
        let header_word = unsafe { AtomicU64::from_ptr(at) };
        header_word.store(header, Ordering::Release);
    }

    /// `msync(MS_SYNC)` of `[off, off + len)`.
    pub fn sync_range(&self, off: u64, len: u64) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.map.flush_range(off as usize, len as usize)
    }

    /// `msync` of the whole mapping, then `fsync` of the file.
    pub fn sync_all(&self) -> Result<(), JournalError> {
        self.map
            .flush()
            .and_then(|()| self.file.sync_all())
            .map_err(|e| JournalError::io("syncing segment", &self.path, e))
    }
}

/// Gives `file` `len` bytes, allocated (`fallocate`) where the filesystem can, zero-filled.
fn allocate(file: &File, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid open descriptor; mode 0 allocates and extends the
    // file size, zero-filled.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if r == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => file.set_len(len),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_ones_are_ignored() {
        assert_eq!(file_name("intake", 3), "intake-0000000003.seg");
        assert_eq!(parse_name("intake-0000000003.seg"), Some(("intake", 3)));
        assert_eq!(parse_name("events-0000001234.seg"), Some(("events", 1234)));
        assert_eq!(parse_name("Intake-0000000003.seg"), None);
        assert_eq!(parse_name("intake-3.seg"), None);
        assert_eq!(parse_name("intake-0000000003.seg.tmp"), None);
        assert_eq!(parse_name("in-take-0000000003.seg"), None);
        assert!(valid_lane("signing"));
        assert!(!valid_lane(""));
        assert!(!valid_lane("a1"));
    }

    #[test]
    fn a_created_segment_is_zero_filled_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(file_name("x", 1));
        let s = Segment::create(p.clone(), 1, 1 << 16, true, true, None).unwrap();
        assert_eq!(s.len(), 1 << 16);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 16);
        // SAFETY: no writer.
        assert!(unsafe { s.bytes() }.iter().all(|&b| b == 0));
        assert!(
            Segment::create(p, 1, 1 << 16, false, false, None).is_err(),
            "create_new"
        );
    }
}
