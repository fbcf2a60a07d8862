//! The frame format and the scan of a segment's bytes.
//!
//! ```text
//! offset 0        4          8                          8 + len     next multiple of 8
//!        | len u32 | crc32c u32 | payload (len bytes)     | zero padding |
//! payload: kind u8 | 7 zero bytes | rkyv archive (fixed size per kind) | tail
//! ```
//!
//! All integers little endian; frames start at multiples of 8. A header of eight zero
//! bytes marks the end of the written part (segments are zero-filled). The header is
//! stored last, in one 8-byte release store, after the payload it covers.
//!
//! A sealed segment (encryption at rest, `crate::atrest`) starts with a *key frame*: kind
//! [`KIND_KEY`], then the segment's key header (the KEK id and the wrapped data key, never
//! the key). In every later frame of it the kind header stays in clear and is bound as
//! additional data; the archive and tail are AES-256-GCM ciphertext under the segment's
//! data key with the frame's byte offset as nonce, followed by the 16-byte tag:
//!
//! ```text
//! payload: kind u8 | 7 zero bytes | ciphertext (archive | tail) | tag (16 bytes)
//! ```
//!
//! The CRC covers the payload as stored (ciphertext and tag), so torn-write detection
//! works the same on sealed segments.

use rkyv::util::AlignedVec;

use super::record::{self, KIND_HEADER, OwnedRecord, Record};
use crate::atrest::{KeyHeader, SealError, Sealer, SegmentKey, TAG_LEN};

/// Kind byte of a sealed segment's first frame: its key header.
pub(crate) const KIND_KEY: u8 = 0x4b;

/// Header bytes: `u32` payload length, `u32` CRC-32C of the payload.
pub(crate) const HEADER: u64 = 8;

/// Bytes a frame with a `payload`-byte payload occupies (header and padding included).
pub(crate) const fn frame_len(payload: u64) -> u64 {
    HEADER + payload.next_multiple_of(8)
}

/// Payload length of a record of type `R` with a `tail`-byte tail; a sealed frame adds
/// its tag.
pub(crate) const fn payload_len<R: Record>(tail: u64, sealed: bool) -> u64 {
    KIND_HEADER as u64 + R::ARCHIVED_SIZE as u64 + tail + if sealed { TAG_LEN as u64 } else { 0 }
}

/// Length of the key frame holding a `header_len`-byte key header.
pub(crate) const fn key_frame_len(header_len: usize) -> u64 {
    frame_len((KIND_HEADER + header_len) as u64)
}

/// Writes the payload of a key frame into `frame` (exactly `key_frame_len` bytes, zero)
/// and returns the header to store at its start.
pub(crate) fn encode_key(frame: &mut [u8], key_header: &[u8]) -> u64 {
    let h = HEADER as usize;
    let plen = KIND_HEADER + key_header.len();
    frame[h] = KIND_KEY;
    frame[h + KIND_HEADER..h + plen].copy_from_slice(key_header);
    header(plen as u32, crc32c::crc32c(&frame[h..h + plen]))
}

/// The 8 header bytes as the native `u64` that stores them little endian.
pub(crate) fn header(len: u32, crc: u32) -> u64 {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&len.to_le_bytes());
    b[4..].copy_from_slice(&crc.to_le_bytes());
    u64::from_ne_bytes(b)
}

/// Writes the payload of a frame for `rec` and `tail` into `frame` (exactly
/// `frame_len(payload_len)` bytes, all zero on entry) and returns the header to store at
/// its start. Allocates nothing. On error the bytes are zero again.
pub(crate) fn encode<R: Record>(frame: &mut [u8], rec: &R, tail: &[u8]) -> Result<u64, u8> {
    let plen = payload_len::<R>(tail.len() as u64, false) as usize;
    debug_assert_eq!(frame.len() as u64, frame_len(plen as u64));
    let h = HEADER as usize;
    let mut r = *rec;
    r.set_tail_len(tail.len() as u32);
    frame[h] = R::KIND;
    let fixed = h + KIND_HEADER;
    if r.encode(&mut frame[fixed..fixed + R::ARCHIVED_SIZE])
        .is_err()
    {
        frame.fill(0);
        return Err(R::KIND);
    }
    frame[fixed + R::ARCHIVED_SIZE..h + plen].copy_from_slice(tail);
    let crc = crc32c::crc32c(&frame[h..h + plen]);
    Ok(header(plen as u32, crc))
}

/// As [`encode`], sealed with `key` under nonce `nonce` (the frame's offset in its
/// segment). The archive and tail are encoded and encrypted in `scratch` and only the
/// ciphertext is copied into `frame`, so no plaintext byte ever reaches the mapping (the
/// flusher may sync the page being filled). Allocates nothing while `scratch` has room
/// (the writer keeps it sized for its largest frame).
pub(crate) fn encode_sealed<R: Record>(
    frame: &mut [u8],
    rec: &R,
    tail: &[u8],
    key: &SegmentKey,
    nonce: u64,
    scratch: &mut AlignedVec<16>,
) -> Result<u64, u8> {
    let plen = payload_len::<R>(tail.len() as u64, true) as usize;
    debug_assert_eq!(frame.len() as u64, frame_len(plen as u64));
    let body = R::ARCHIVED_SIZE + tail.len();
    let mut r = *rec;
    r.set_tail_len(tail.len() as u32);
    scratch.clear();
    scratch.resize(body, 0);
    if r.encode(&mut scratch[..R::ARCHIVED_SIZE]).is_err() {
        scratch.fill(0);
        return Err(R::KIND);
    }
    scratch[R::ARCHIVED_SIZE..body].copy_from_slice(tail);
    let mut kind = [0u8; KIND_HEADER];
    kind[0] = R::KIND;
    let tag = key.seal(nonce, &kind, &mut scratch[..body]);
    let h = HEADER as usize;
    frame[h..h + KIND_HEADER].copy_from_slice(&kind);
    let c = h + KIND_HEADER;
    frame[c..c + body].copy_from_slice(&scratch[..body]);
    frame[c + body..h + plen].copy_from_slice(&tag);
    let crc = crc32c::crc32c(&frame[h..h + plen]);
    Ok(header(plen as u32, crc))
}

/// Decrypts a sealed payload (kind header, ciphertext, tag) read at `offset` into the
/// plain payload the record decoder reads.
fn open_payload(payload: &[u8], key: &SegmentKey, offset: u64) -> Result<AlignedVec<16>, String> {
    if payload.len() < KIND_HEADER + TAG_LEN {
        return Err("sealed payload shorter than its kind header and tag".into());
    }
    let (body, tag) = payload.split_at(payload.len() - TAG_LEN);
    let mut plain = AlignedVec::<16>::with_capacity(body.len());
    plain.extend_from_slice(body);
    key.open(
        offset,
        &payload[..KIND_HEADER],
        &mut plain[KIND_HEADER..],
        tag,
    )
    .map_err(|e| e.to_string())?;
    Ok(plain)
}

/// A frame the scan could not accept.
#[derive(Debug)]
pub(crate) struct BadFrame {
    /// Offset of its header.
    pub offset: u64,
    /// Where it claims to end (clamped to the segment).
    pub claimed_end: u64,
    /// The header was zero (nothing published) but bytes after it are not.
    pub unpublished: bool,
    /// What is wrong.
    pub what: String,
    /// A checksummed frame that is still wrong (a sealed frame that does not
    /// authenticate): changed on purpose or by corruption, never a torn write.
    pub never_torn: bool,
}

/// The frames of one segment.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Records with the end offset of their frame.
    pub records: Vec<(u64, OwnedRecord)>,
    /// Offset just past the last good frame.
    pub end: u64,
    /// The frame at `end` that stopped the scan, if it was not a clean end.
    pub bad: Option<BadFrame>,
    /// The segment's data key, when it is sealed.
    pub key: Option<SegmentKey>,
    /// Where its records start: after the key frame of a sealed segment, else 0.
    pub start: u64,
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Whether every byte of `b` is zero.
pub(crate) fn all_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    words
        .by_ref()
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

/// The key frame at the start of `bytes`, if the segment is sealed: its data key
/// (unwrapped with `sealer`'s KEK) and the offset after it.
fn key_frame(
    bytes: &[u8],
    sealer: Option<&Sealer>,
) -> Result<Option<(SegmentKey, u64)>, SealError> {
    let len = bytes.len() as u64;
    if len < HEADER + KIND_HEADER as u64 || bytes[HEADER as usize] != KIND_KEY {
        return Ok(None);
    }
    let plen = read_u32(bytes, 0) as u64;
    if plen < KIND_HEADER as u64 || HEADER + plen > len {
        return Err(SealError::Header(
            "the key frame's length runs past the segment end",
        ));
    }
    let payload = &bytes[HEADER as usize..(HEADER + plen) as usize];
    if crc32c::crc32c(payload) != read_u32(bytes, 4) {
        return Err(SealError::Header("the key frame's checksum does not match"));
    }
    let header = KeyHeader::parse(&payload[KIND_HEADER..])?;
    let key = crate::atrest::open_key(sealer, &header)?;
    Ok(Some((key, frame_len(plen))))
}

/// Reads the frames of `bytes` (one segment) from the start until the end marker, the end
/// of the segment, or a bad frame. A sealed segment's records are decrypted with its data
/// key, unwrapped through `sealer`; a sealed segment without a sealer, or a key frame
/// that does not open, is an error.
pub(crate) fn scan(bytes: &[u8], sealer: Option<&Sealer>) -> Result<Scan, SealError> {
    let len = bytes.len() as u64;
    let mut out = Scan::default();
    if let Some((key, start)) = key_frame(bytes, sealer)? {
        out.key = Some(key);
        out.start = start;
    }
    let mut off = out.start;
    loop {
        out.end = off;
        if off + HEADER > len {
            return Ok(out);
        }
        let o = off as usize;
        let plen = read_u32(bytes, o) as u64;
        let crc = read_u32(bytes, o + 4);
        let bad = |what: String, claimed_end: u64, unpublished: bool| BadFrame {
            offset: off,
            claimed_end: claimed_end.min(len),
            unpublished,
            what,
            never_torn: false,
        };
        if plen == 0 {
            if crc != 0 {
                out.bad = Some(bad(
                    "a zero length with a nonzero checksum".into(),
                    off + HEADER,
                    false,
                ));
            } else if !all_zero(&bytes[o..]) {
                out.bad = Some(bad(
                    "bytes after the end of the written part (an append that was never \
                     published)"
                        .into(),
                    off + HEADER,
                    true,
                ));
            }
            return Ok(out);
        }
        if off + HEADER + plen > len {
            out.bad = Some(bad(
                format!("the frame's length ({plen} bytes) runs past the segment end"),
                len,
                false,
            ));
            return Ok(out);
        }
        let payload = &bytes[o + HEADER as usize..(off + HEADER + plen) as usize];
        let next = (off + frame_len(plen)).min(len);
        if crc32c::crc32c(payload) != crc {
            out.bad = Some(bad("checksum mismatch".into(), next, false));
            return Ok(out);
        }
        let decoded = match &out.key {
            None => record::decode_payload(payload),
            Some(key) => match open_payload(payload, key, off) {
                Ok(plain) => record::decode_payload(&plain),
                Err(what) => {
                    out.bad = Some(BadFrame {
                        never_torn: true,
                        ..bad(what, next, false)
                    });
                    return Ok(out);
                }
            },
        };
        match decoded {
            Ok(rec) => out.records.push((next, rec)),
            Err(what) => {
                out.bad = Some(bad(what, next, false));
                return Ok(out);
            }
        }
        off = next;
    }
}

/// Whether a plausible, checksummed frame starts at `off`: nonzero length that fits, a
/// known kind byte with zero padding, and a matching CRC.
pub(crate) fn valid_frame_at(bytes: &[u8], off: u64) -> bool {
    let len = bytes.len() as u64;
    if off + HEADER + KIND_HEADER as u64 > len {
        return false;
    }
    let o = off as usize;
    let plen = read_u32(bytes, o) as u64;
    if plen < KIND_HEADER as u64 || off + HEADER + plen > len {
        return false;
    }
    let p = o + HEADER as usize;
    if !record::is_known_kind(bytes[p]) || bytes[p + 1..p + KIND_HEADER].iter().any(|&b| b != 0) {
        return false;
    }
    crc32c::crc32c(&bytes[p..p + plen as usize]) == read_u32(bytes, o + 4)
}

/// Whether a bad frame is a torn last record rather than corruption, given that its
/// segment is its lane's last: nothing after it in the segment may be written — every
/// byte past where it claims to end is zero (for an unpublished append: past its header)
/// — and no valid frame starts anywhere after its header (so a length field damaged to
/// swallow good frames is still corruption).
pub(crate) fn is_torn(bytes: &[u8], bad: &BadFrame) -> bool {
    if bad.never_torn {
        return false;
    }
    let len = bytes.len() as u64;
    if !bad.unpublished && !all_zero(&bytes[bad.claimed_end as usize..]) {
        return false;
    }
    let mut p = bad.offset + HEADER;
    while p + HEADER <= len {
        if valid_frame_at(bytes, p) {
            return false;
        }
        p += 8;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::record::{IntentRec, PrincipalRec, StateRec};

    /// Frames `recs` into a zeroed buffer of `len` bytes (8-aligned storage).
    fn segment(len: usize, n: usize) -> (Vec<u64>, Vec<u64>) {
        let mut words = vec![0u64; len / 8];
        let mut offs = Vec::new();
        let mut off = 0u64;
        for i in 0..n {
            // SAFETY: viewing u64 storage as bytes.
            let bytes: &mut [u8] =
                unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) };
            let r = IntentRec {
                seq: i as u64,
                ..IntentRec::default()
            };
            let tail = vec![i as u8; 10 + i];
            let fl = frame_len(payload_len::<IntentRec>(tail.len() as u64, false));
            let h = encode(&mut bytes[off as usize..(off + fl) as usize], &r, &tail).unwrap();
            bytes[off as usize..off as usize + 8].copy_from_slice(&h.to_ne_bytes());
            offs.push(off);
            off += fl;
        }
        (words, offs)
    }

    fn as_bytes(w: &mut [u64]) -> &mut [u8] {
        // SAFETY: viewing u64 storage as bytes.
        unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast::<u8>(), w.len() * 8) }
    }

    #[test]
    fn scan_reads_every_frame_and_stops_at_the_end_marker() {
        let (mut w, offs) = segment(8192, 5);
        let b = as_bytes(&mut w);
        let s = scan(b, None).unwrap();
        assert!(s.bad.is_none(), "{:?}", s.bad);
        assert_eq!(s.records.len(), 5);
        assert_eq!(s.records[0].0, offs[1]);
        for (i, (_, r)) in s.records.iter().enumerate() {
            assert_eq!(r.seq(), Some(i as u64));
        }
    }

    #[test]
    fn a_cut_payload_at_the_end_is_torn_and_a_flip_in_the_middle_is_not() {
        let (mut w, offs) = segment(8192, 4);
        let b = as_bytes(&mut w);
        let last = offs[3] as usize;
        let plen = read_u32(b, last) as usize;
        // The tail (bytes of value 3) cut short.
        b[last + 8 + plen - 6..last + 8 + plen].fill(0);
        let s = scan(b, None).unwrap();
        let bad = s.bad.as_ref().unwrap();
        assert_eq!(bad.offset, offs[3]);
        assert_eq!(bad.what, "checksum mismatch");
        assert!(is_torn(b, bad));

        let (mut w, offs) = segment(8192, 4);
        let b = as_bytes(&mut w);
        b[offs[1] as usize + 30] ^= 1;
        let s = scan(b, None).unwrap();
        let bad = s.bad.as_ref().unwrap();
        assert_eq!(bad.offset, offs[1]);
        assert!(!is_torn(b, bad));
    }

    #[test]
    fn a_length_damaged_to_swallow_good_frames_is_not_torn() {
        let (mut w, offs) = segment(8192, 4);
        let b = as_bytes(&mut w);
        // Frame 1 claims to run to the end of frame 3: the bytes after it are zero, but
        // frames 2 and 3 are valid inside it.
        let claim = (offs[3] - offs[1]) as u32 + 40;
        b[offs[1] as usize..offs[1] as usize + 4].copy_from_slice(&claim.to_le_bytes());
        let s = scan(b, None).unwrap();
        let bad = s.bad.as_ref().unwrap();
        assert_eq!(bad.offset, offs[1]);
        assert!(!is_torn(b, bad));
        // Past the segment end, likewise.
        b[offs[1] as usize..offs[1] as usize + 4].copy_from_slice(&100_000u32.to_le_bytes());
        let s = scan(b, None).unwrap();
        assert!(s.bad.as_ref().unwrap().what.contains("runs past"));
        assert!(!is_torn(b, s.bad.as_ref().unwrap()));
    }

    #[test]
    fn an_unpublished_append_is_torn() {
        let (mut w, offs) = segment(8192, 3);
        let b = as_bytes(&mut w);
        b[offs[2] as usize..offs[2] as usize + 8].fill(0);
        let s = scan(b, None).unwrap();
        assert_eq!(s.records.len(), 2);
        let bad = s.bad.as_ref().unwrap();
        assert!(bad.unpublished);
        assert!(is_torn(b, bad));
    }

    #[test]
    fn headers_are_little_endian_len_then_crc() {
        let h = header(0x0102_0304, 0x0a0b_0c0d);
        assert_eq!(h.to_ne_bytes(), [4, 3, 2, 1, 0x0d, 0x0c, 0x0b, 0x0a]);
        let mut buf = vec![0u8; frame_len(payload_len::<PrincipalRec>(0, false)) as usize];
        let h = encode(&mut buf, &PrincipalRec::new(1, "a"), &[]).unwrap();
        let plen = u32::from_le_bytes(h.to_ne_bytes()[..4].try_into().unwrap());
        assert_eq!(plen as u64, payload_len::<PrincipalRec>(0, false));
        assert_eq!(buf[8], crate::journal::record::KIND_PRINCIPAL);
        let _ = StateRec::default();
    }
}
