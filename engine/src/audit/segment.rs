//! Segment files as their plaintext lines: plain segments as they are, sealed segments
//! (encryption at rest) decrypted line by line. [`SegmentLines`] (every line, for
//! `verify`, `walk` and `export`) and [`tail`] (the last line, for the writer's recovery)
//! are the only readers of segment files; the writer starts sealed segments with
//! [`key_line`] and seals each line with [`seal_line`].
//!
//! # Sealed segments
//!
//! The first line of a sealed segment is its key line
//!
//! ```text
//! {"sealed":1,"key":"<lower-case hex of the segment's key header>"}\n
//! ```
//!
//! (the key header holds the KEK id and the data key wrapped by the KEK, never the data
//! key: see [`crate::atrest`]). Every line after it is one plaintext line (the exact bytes
//! `{"hash":…,"rec":…}`, without the newline) sealed with the segment's data key, written
//! as the lower-case hex of `ciphertext || tag` and a newline. The nonce of the `i`-th
//! record line (1 for the segment head, the line after the key line) is `i`; the aad is
//! [`aad`] of the segment number.
//!
//! Invariants: a plaintext line only ever leaves here authenticated (GCM tag checked
//! under its own nonce and segment); a key line is recognised by its first bytes
//! `{"sealed":`, which no plaintext audit line starts with; nothing here keeps a data key
//! beyond the [`SegmentKey`] it opened.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::atrest::{KeyHeader, SealError, Sealer, SegmentKey, TAG_LEN};

/// How a key line starts (and so tells a sealed segment from a plain one).
pub(crate) const KEY_LINE_START: &[u8] = b"{\"sealed\":";
const KEY_LINE_PREFIX: &[u8] = b"{\"sealed\":1,\"key\":\"";
const KEY_LINE_SUFFIX: &[u8] = b"\"}";
/// Longest key line accepted (a key header is a few hundred bytes).
const MAX_KEY_LINE: u64 = 16 * 1024;
const AAD_DOMAIN: &[u8; 12] = b"engine-audit";

/// The aad of every sealed line of segment `segment`: `engine-audit` followed by the
/// segment number as 8 bytes big-endian.
pub(crate) fn aad(segment: u64) -> [u8; 20] {
    let mut a = [0u8; 20];
    a[..12].copy_from_slice(AAD_DOMAIN);
    a[12..].copy_from_slice(&segment.to_be_bytes());
    a
}

/// The key line (with its newline) of a sealed segment whose data key is `key`.
pub(crate) fn key_line(key: &SegmentKey) -> Vec<u8> {
    let header = key.header();
    let mut out = Vec::with_capacity(KEY_LINE_PREFIX.len() + 2 * header.len() + 3);
    out.extend_from_slice(KEY_LINE_PREFIX);
    out.extend_from_slice(hex::encode(header).as_bytes());
    out.extend_from_slice(KEY_LINE_SUFFIX);
    out.push(b'\n');
    out
}

/// The key header in a key line (without its newline).
fn parse_key_line(line: &[u8]) -> Result<Vec<u8>, &'static str> {
    let hex_part = line
        .strip_prefix(KEY_LINE_PREFIX)
        .and_then(|r| r.strip_suffix(KEY_LINE_SUFFIX))
        .ok_or("it is not {\"sealed\":1,\"key\":\"<hex>\"}")?;
    if hex_part.iter().any(u8::is_ascii_uppercase) {
        return Err("its key is not lower-case hex");
    }
    hex::decode(hex_part).map_err(|_| "its key is not hex")
}

/// Seals `plain` (one line without its newline) as record line `index` of `segment`:
/// `out` becomes the hex of `ciphertext || tag` and a newline. `plain` is encrypted in
/// place.
pub(crate) fn seal_line(
    key: &SegmentKey,
    segment: u64,
    index: u64,
    plain: &mut [u8],
    out: &mut Vec<u8>,
) {
    let tag = key.seal(index, &aad(segment), plain);
    let n = plain.len();
    out.clear();
    out.resize(2 * (n + TAG_LEN) + 1, 0);
    let (body, rest) = out.split_at_mut(2 * n);
    // Both slices are exactly twice the length of their input.
    let _ = hex::encode_to_slice(&*plain, body);
    let _ = hex::encode_to_slice(tag, &mut rest[..2 * TAG_LEN]);
    rest[2 * TAG_LEN] = b'\n';
}

/// Why a sealed line does not open.
#[derive(Debug)]
enum LineError {
    NotHex,
    Auth,
}

/// Opens record line `index` of `segment` (`sealed`: its hex, without the newline) into
/// `plain`.
fn open_line(
    key: &SegmentKey,
    segment: u64,
    index: u64,
    sealed: &[u8],
    plain: &mut Vec<u8>,
) -> Result<(), LineError> {
    if !sealed.len().is_multiple_of(2)
        || sealed.len() < 2 * TAG_LEN
        || sealed.iter().any(u8::is_ascii_uppercase)
    {
        return Err(LineError::NotHex);
    }
    plain.clear();
    plain.resize(sealed.len() / 2, 0);
    hex::decode_to_slice(sealed, plain).map_err(|_| LineError::NotHex)?;
    let n = plain.len() - TAG_LEN;
    let (text, tag) = plain.split_at_mut(n);
    key.open(index, &aad(segment), text, tag)
        .map_err(|_| LineError::Auth)?;
    plain.truncate(n);
    Ok(())
}

/// What is wrong with a segment file, as read.
#[derive(Debug)]
pub(crate) enum ReadProblem {
    /// The file cannot be read.
    Io(std::io::Error),
    /// The key line does not parse.
    KeyLine(&'static str),
    /// The segment's data key cannot be opened (no KEK, another KEK, the KEK failed, a bad
    /// key header).
    Key(SealError),
    /// A line of a sealed segment is not hex of at least a tag.
    NotHex,
    /// A line of a sealed segment does not authenticate.
    Auth,
}

/// A [`ReadProblem`] at a line of the file.
#[derive(Debug)]
pub(crate) struct ReadError {
    /// The line, from 1 (0: the file as a whole).
    pub line: u64,
    /// What is wrong.
    pub problem: ReadProblem,
}

impl ReadError {
    fn io(line: u64, e: std::io::Error) -> ReadError {
        ReadError {
            line,
            problem: ReadProblem::Io(e),
        }
    }

    fn at(line: u64, e: LineError) -> ReadError {
        ReadError {
            line,
            problem: match e {
                LineError::NotHex => ReadProblem::NotHex,
                LineError::Auth => ReadProblem::Auth,
            },
        }
    }
}

/// Reads and checks a complete key line (`line`, without its newline) and opens its
/// data key.
fn open_key_line(line: &[u8], sealer: Option<&Sealer>) -> Result<SegmentKey, ReadError> {
    let at1 = |problem| ReadError { line: 1, problem };
    let header = parse_key_line(line).map_err(|w| at1(ReadProblem::KeyLine(w)))?;
    let h = KeyHeader::parse(&header).map_err(|e| at1(ReadProblem::Key(e)))?;
    crate::atrest::open_key(sealer, &h).map_err(|e| at1(ReadProblem::Key(e)))
}

/// One line of a segment, as [`SegmentLines::next`] hands it out.
#[derive(Debug)]
pub(crate) enum Line<'a> {
    /// A complete record line: its plaintext, without the newline.
    Record {
        /// Its line in the file, from 1.
        line: u64,
        /// The plaintext line `{"hash":…,"rec":…}`.
        bytes: &'a [u8],
    },
    /// An incomplete last line (no newline at its end); nothing follows it.
    Torn {
        /// Its line in the file, from 1.
        line: u64,
        /// Its length.
        bytes: u64,
    },
}

/// The plaintext lines of one segment file, in order.
#[derive(Debug)]
pub(crate) struct SegmentLines {
    reader: BufReader<File>,
    segment: u64,
    key: Option<SegmentKey>,
    line: u64,
    records: u64,
    raw: Vec<u8>,
    plain: Vec<u8>,
    pending: bool,
}

impl SegmentLines {
    /// Opens segment file `path` of segment number `segment`. A sealed segment's key is
    /// opened here with `sealer` (one KEK call); without one that is
    /// [`SealError::NoKek`].
    pub fn open(
        path: &Path,
        segment: u64,
        sealer: Option<&Sealer>,
    ) -> Result<SegmentLines, ReadError> {
        let f = File::open(path).map_err(|e| ReadError::io(0, e))?;
        let mut s = SegmentLines {
            reader: BufReader::with_capacity(64 * 1024, f),
            segment,
            key: None,
            line: 0,
            records: 0,
            raw: Vec::with_capacity(4096),
            plain: Vec::with_capacity(4096),
            pending: false,
        };
        let got = s
            .reader
            .read_until(b'\n', &mut s.raw)
            .map_err(|e| ReadError::io(1, e))?;
        if let Some(line) = s.raw.strip_suffix(b"\n")
            && line.starts_with(KEY_LINE_START)
        {
            s.key = Some(open_key_line(line, sealer)?);
            s.line = 1;
            s.raw.clear();
        } else {
            s.pending = got > 0;
        }
        Ok(s)
    }

    /// The next line (`None`: the end of the file).
    pub fn next_line(&mut self) -> Result<Option<Line<'_>>, ReadError> {
        if !self.pending {
            self.raw.clear();
            let got = self
                .reader
                .read_until(b'\n', &mut self.raw)
                .map_err(|e| ReadError::io(self.line + 1, e))?;
            if got == 0 {
                return Ok(None);
            }
        }
        self.pending = false;
        self.line += 1;
        let Some(text) = self.raw.strip_suffix(b"\n") else {
            return Ok(Some(Line::Torn {
                line: self.line,
                bytes: self.raw.len() as u64,
            }));
        };
        match &self.key {
            None => Ok(Some(Line::Record {
                line: self.line,
                bytes: text,
            })),
            Some(key) => {
                self.records += 1;
                open_line(key, self.segment, self.records, text, &mut self.plain)
                    .map_err(|e| ReadError::at(self.line, e))?;
                Ok(Some(Line::Record {
                    line: self.line,
                    bytes: &self.plain,
                }))
            }
        }
    }
}

/// The end of a segment file, for the writer to continue from.
#[derive(Debug)]
pub(crate) struct Tail {
    /// The file's length.
    pub len: u64,
    /// Bytes up to and including the last newline (what follows is a torn line).
    pub complete: u64,
    /// Whether the file starts with a complete key line.
    pub sealed: bool,
    /// The plaintext of the last complete record line (without its newline), if any.
    pub last: Option<Vec<u8>>,
}

/// The end of segment file `path` (segment number `segment`): only its last complete
/// line is decrypted and returned. A sealed segment's key is opened with `sealer` (one KEK
/// call; without one: [`SealError::NoKek`]).
pub(crate) fn tail(path: &Path, segment: u64, sealer: Option<&Sealer>) -> Result<Tail, ReadError> {
    let mut f = File::open(path).map_err(|e| ReadError::io(0, e))?;
    let len = f.metadata().map_err(|e| ReadError::io(0, e))?.len();
    let mut start = [0u8; KEY_LINE_START.len()];
    let n = read_up_to(&mut f, &mut start).map_err(|e| ReadError::io(1, e))?;
    if &start[..n] != KEY_LINE_START {
        let (complete, last) = last_line(&mut f, len).map_err(|e| ReadError::io(0, e))?;
        return Ok(Tail {
            len,
            complete,
            sealed: false,
            last,
        });
    }
    f.seek(SeekFrom::Start(0))
        .map_err(|e| ReadError::io(1, e))?;
    let mut first = Vec::new();
    BufReader::new((&mut f).take(MAX_KEY_LINE))
        .read_until(b'\n', &mut first)
        .map_err(|e| ReadError::io(1, e))?;
    let Some(key_text) = first.strip_suffix(b"\n") else {
        if first.len() as u64 == len {
            // A key line cut short: the segment was being created.
            return Ok(Tail {
                len,
                complete: 0,
                sealed: false,
                last: None,
            });
        }
        return Err(ReadError {
            line: 1,
            problem: ReadProblem::KeyLine("it is too long"),
        });
    };
    let key = open_key_line(key_text, sealer)?;
    let key_end = first.len() as u64;
    // Count the record lines (the last one's nonce is its index) and find the last two
    // newlines.
    f.seek(SeekFrom::Start(key_end))
        .map_err(|e| ReadError::io(0, e))?;
    let mut reader = BufReader::with_capacity(64 * 1024, &mut f);
    let (mut records, mut pos) = (0u64, key_end);
    let (mut last_end, mut before_last_end) = (key_end, key_end);
    loop {
        let buf = reader.fill_buf().map_err(|e| ReadError::io(0, e))?;
        if buf.is_empty() {
            break;
        }
        for (i, _) in buf.iter().enumerate().filter(|(_, b)| **b == b'\n') {
            records += 1;
            before_last_end = last_end;
            last_end = pos + i as u64 + 1;
        }
        let used = buf.len();
        pos += used as u64;
        reader.consume(used);
    }
    drop(reader);
    let last = if records == 0 {
        None
    } else {
        let mut sealed = vec![0u8; (last_end - 1 - before_last_end) as usize];
        f.seek(SeekFrom::Start(before_last_end))
            .map_err(|e| ReadError::io(records + 1, e))?;
        f.read_exact(&mut sealed)
            .map_err(|e| ReadError::io(records + 1, e))?;
        let mut plain = Vec::new();
        open_line(&key, segment, records, &sealed, &mut plain)
            .map_err(|e| ReadError::at(records + 1, e))?;
        Some(plain)
    };
    Ok(Tail {
        len,
        complete: last_end,
        sealed: true,
        last,
    })
}

/// Reads until `buf` is full or the file ends; the bytes read.
fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The last complete line of `f` (of length `len`): the length up to and including its
/// newline (what is after it is a torn line), and the line without its newline (`None`:
/// no complete line).
fn last_line(f: &mut File, len: u64) -> std::io::Result<(u64, Option<Vec<u8>>)> {
    let mut chunk = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(chunk);
        let mut buf = vec![0u8; (len - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf)?;
        match buf.iter().rposition(|&b| b == b'\n') {
            None if start == 0 => return Ok((0, None)),
            None => {}
            Some(end) => match buf[..end].iter().rposition(|&b| b == b'\n') {
                Some(begin) => {
                    return Ok((start + end as u64 + 1, Some(buf[begin + 1..end].to_vec())));
                }
                None if start == 0 => return Ok((end as u64 + 1, Some(buf[..end].to_vec()))),
                None => {}
            },
        }
        chunk *= 2;
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use serde_json::{Map, Value, json};

    use super::super::{
        ChainWriter, ExportFilter, Problem, WriterOptions, export, list_segments,
        segment_file_name, verify,
    };
    use super::*;
    use crate::atrest::testing;
    use crate::audit::AuditError;

    const SECRET_INTENT: &str = "INTENT-7f3a-secret";

    fn fields(i: u64) -> Map<String, Value> {
        let Value::Object(m) = json!({
            "i": i,
            "intent": SECRET_INTENT,
            "note": format!("record number {i}"),
        }) else {
            unreachable!()
        };
        m
    }

    fn sealed(sealer: &Sealer, segment_bytes: u64) -> WriterOptions {
        WriterOptions {
            segment_bytes,
            key: None,
            sealer: Some(sealer.clone()),
        }
    }

    /// `n` test records after the head and the `log_open` record; the writer's last hash.
    fn write_log(dir: &Path, opts: WriterOptions, n: u64) -> [u8; 32] {
        let mut w = ChainWriter::open(dir, opts).unwrap();
        for i in 0..n {
            w.append(1_700_000_000_000_000_000 + i, "test", &fields(i))
                .unwrap();
        }
        w.sync().unwrap();
        w.last_hash()
    }

    fn seg(dir: &Path, n: u64) -> PathBuf {
        dir.join(segment_file_name(n))
    }

    fn exported(dir: &Path, sealer: Option<&Sealer>) -> Vec<u8> {
        let mut out = Vec::new();
        export(dir, &ExportFilter::default(), None, sealer, &mut out).unwrap();
        out
    }

    /// Writes the plaintext of every segment of `from` into `to`, under the same names.
    fn decrypt_into(from: &Path, to: &Path, sealer: &Sealer) {
        for (n, path) in list_segments(from).unwrap() {
            let mut lines = SegmentLines::open(&path, n, Some(sealer)).unwrap();
            let mut text = Vec::new();
            while let Some(l) = lines.next_line().unwrap() {
                let Line::Record { bytes, .. } = l else {
                    panic!("torn line in {}", path.display());
                };
                text.extend_from_slice(bytes);
                text.push(b'\n');
            }
            std::fs::write(seg(to, n), text).unwrap();
        }
    }

    #[test]
    fn a_sealed_audit_log_verifies_reopens_in_a_new_segment_and_exports() {
        let dir = tempfile::tempdir().unwrap();
        let s = testing::sealer();
        let last = write_log(dir.path(), sealed(&s, 1 << 20), 30);
        let v = verify(dir.path(), None, Some(&s)).unwrap();
        assert_eq!((v.records, v.segments, v.last_hash), (32, 1, last));
        // The key line, then the head (nonce 1) on line 2.
        let raw = std::fs::read_to_string(seg(dir.path(), 1)).unwrap();
        assert!(raw.starts_with("{\"sealed\":1,\"key\":\""), "{raw}");
        assert_eq!(raw.lines().count(), 33);

        // A reopened sealed log goes on in a new segment, linked to the last hash.
        let mut w = ChainWriter::open(dir.path(), sealed(&s, 1 << 20)).unwrap();
        assert_eq!((w.segment(), w.next_n()), (2, 34));
        assert!(w.sealed());
        w.append(0, "test", &fields(99)).unwrap();
        let last2 = w.last_hash();
        drop(w);
        let v = verify(dir.path(), None, Some(&s)).unwrap();
        assert_eq!((v.records, v.segments, v.last_hash), (35, 2, last2));
        let mut lines = SegmentLines::open(&seg(dir.path(), 2), 2, Some(&s)).unwrap();
        let Some(Line::Record { line: 2, bytes }) = lines.next_line().unwrap() else {
            panic!("no head on line 2");
        };
        let (_, body) = split_line_owned(bytes);
        assert_eq!(body["kind"], "segment_head");
        assert_eq!(body["prev_segment_last_hash"], hex::encode(last));

        // Export writes the plaintext records.
        let out = exported(dir.path(), Some(&s));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 35);
        assert_eq!(text.matches(SECRET_INTENT).count(), 31);
        let open: Value = serde_json::from_str(text.lines().nth(33).unwrap()).unwrap();
        assert_eq!(open["kind"], "log_open");
        assert_eq!(open["kek"], "test:memory");
    }

    fn split_line_owned(line: &[u8]) -> ([u8; 32], Value) {
        let (h, b) = super::super::split_line(line).unwrap();
        (h, serde_json::from_slice(b).unwrap())
    }

    #[test]
    fn sealed_audit_segments_hold_no_record_field_in_clear() {
        let dir = tempfile::tempdir().unwrap();
        let s = testing::sealer();
        write_log(dir.path(), sealed(&s, 2048), 40);
        write_log(dir.path(), sealed(&s, 2048), 5);
        let segments = list_segments(dir.path()).unwrap();
        assert!(segments.len() >= 4, "{} segments", segments.len());
        for (_, path) in &segments {
            let raw = std::fs::read(path).unwrap();
            let text = String::from_utf8(raw).unwrap();
            for needle in [
                "\"kind\"",
                "\"hash\"",
                "\"rec\"",
                "segment_head",
                "log_open",
                "record number",
                SECRET_INTENT,
                "test:memory",
                "\"prev\"",
            ] {
                assert!(!text.contains(needle), "{needle} in {}", path.display());
            }
            let mut lines = text.lines();
            assert!(
                lines
                    .next()
                    .unwrap()
                    .starts_with("{\"sealed\":1,\"key\":\"")
            );
            for l in lines {
                assert!(l.bytes().all(|b| b.is_ascii_hexdigit()), "{l}");
            }
        }
    }

    #[test]
    fn a_flipped_byte_in_a_sealed_audit_line_is_named_by_verify() {
        let dir = tempfile::tempdir().unwrap();
        let s = testing::sealer();
        write_log(dir.path(), sealed(&s, 1 << 20), 20);
        let path = seg(dir.path(), 1);
        let clean = std::fs::read_to_string(&path).unwrap();
        let mut all: Vec<String> = clean.lines().map(str::to_owned).collect();
        // Line 9 of the file is record 7 (line 1 is the key line).
        let mut b = all[8].clone().into_bytes();
        b[40] = if b[40] == b'0' { b'1' } else { b'0' };
        all[8] = String::from_utf8(b).unwrap();
        std::fs::write(&path, all.join("\n") + "\n").unwrap();
        let e = verify(dir.path(), None, Some(&s)).unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.line, e.record, &e.problem),
            ("audit-00000001.jsonl", 9, Some(7), &Problem::Unauthentic)
        );
        assert!(
            e.to_string().starts_with(
                "audit-00000001.jsonl line 9 (record 7): the sealed line does not authenticate"
            ),
            "{e}"
        );
        let mut out = Vec::new();
        assert!(
            export(
                dir.path(),
                &ExportFilter::default(),
                None,
                Some(&s),
                &mut out
            )
            .is_err()
        );
        assert!(out.is_empty());

        // A line removed: the one after it no longer authenticates at its position.
        let mut all: Vec<String> = clean.lines().map(str::to_owned).collect();
        all.remove(5);
        std::fs::write(&path, all.join("\n") + "\n").unwrap();
        let e = verify(dir.path(), None, Some(&s)).unwrap_err();
        assert_eq!((e.line, &e.problem), (6, &Problem::Unauthentic));

        // A damaged key line is named too.
        let mut all: Vec<String> = clean.lines().map(str::to_owned).collect();
        all[0] = all[0].replace("\"key\":\"", "\"key\":\"zz");
        std::fs::write(&path, all.join("\n") + "\n").unwrap();
        let e = verify(dir.path(), None, Some(&s)).unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("audit-00000001.jsonl", 1));
        assert!(matches!(e.problem, Problem::KeyLine(_)), "{e}");
    }

    #[test]
    fn a_sealed_audit_log_without_its_kek_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = testing::sealer();
        write_log(dir.path(), sealed(&s, 1 << 20), 3);
        let e = ChainWriter::open(dir.path(), WriterOptions::default()).unwrap_err();
        assert!(
            matches!(
                &e,
                AuditError::Sealed {
                    source: SealError::NoKek { kek },
                    ..
                } if kek == "test:memory"
            ),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains("audit-00000001.jsonl"), "{msg}");
        assert!(
            msg.contains("no [at_rest] key-encryption key is configured"),
            "{msg}"
        );
        // Nothing was written: the segment is as it was.
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);

        let b = verify(dir.path(), None, None).unwrap_err();
        assert_eq!((b.file.as_str(), b.line), ("audit-00000001.jsonl", 1));
        assert_eq!(
            b.problem,
            Problem::NoKek {
                kek: "test:memory".into()
            }
        );
        let mut out = Vec::new();
        let e = export(dir.path(), &ExportFilter::default(), None, None, &mut out).unwrap_err();
        assert!(
            e.to_string().contains("no [at_rest] key-encryption key"),
            "{e}"
        );

        // Another KEK is refused as well, naming both.
        let other = Sealer::new(testing::MemoryKek::new("test:other"));
        let e = ChainWriter::open(dir.path(), sealed(&other, 1 << 20)).unwrap_err();
        assert!(
            matches!(
                &e,
                AuditError::Sealed {
                    source: SealError::OtherKek { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(matches!(
            verify(dir.path(), None, Some(&other)).unwrap_err().problem,
            Problem::Key(_)
        ));
    }

    #[test]
    fn a_plain_audit_log_then_sealed_segments_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let s = testing::sealer();
        let plain = WriterOptions {
            segment_bytes: 1024,
            ..WriterOptions::default()
        };
        write_log(dir.path(), plain, 20);
        let plain_segments = list_segments(dir.path()).unwrap().len() as u64;
        assert!(plain_segments >= 2);
        let last = write_log(dir.path(), sealed(&s, 1024), 20);
        let all = list_segments(dir.path()).unwrap();
        assert!(all.len() as u64 > plain_segments + 1);
        // The plain segments are left as they were; the sealed ones follow.
        for (n, path) in &all {
            let raw = std::fs::read_to_string(path).unwrap();
            assert_eq!(
                raw.starts_with("{\"sealed\":"),
                *n > plain_segments,
                "{}",
                path.display()
            );
        }
        let v = verify(dir.path(), None, Some(&s)).unwrap();
        assert_eq!((v.segments, v.last_hash), (all.len() as u64, last));
        assert_eq!(v.records, 2 + 20 + 2 + 20 + (all.len() as u64 - 2));
        // Without the KEK, the plain part checks out and the first sealed segment is named.
        let b = verify(dir.path(), None, None).unwrap_err();
        assert_eq!(b.file, segment_file_name(plain_segments + 1));
        assert!(matches!(b.problem, Problem::NoKek { .. }));
    }

    #[test]
    fn the_chain_of_a_sealed_audit_log_is_the_chain_of_its_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let s = testing::sealer();
        write_log(dir.path(), sealed(&s, 2048), 30);
        write_log(dir.path(), sealed(&s, 2048), 10);
        let sealed_sum = verify(dir.path(), None, Some(&s)).unwrap();
        let clear = tempfile::tempdir().unwrap();
        decrypt_into(dir.path(), clear.path(), &s);
        // The same lines in clear are a plain log with the same hashes.
        let plain_sum = verify(clear.path(), None, None).unwrap();
        assert_eq!(plain_sum, sealed_sum);
        assert_eq!(exported(dir.path(), Some(&s)), exported(clear.path(), None));
        for (n, path) in list_segments(clear.path()).unwrap() {
            for l in std::fs::read_to_string(&path).unwrap().lines() {
                let (h, b) = super::super::split_line(l.as_bytes()).unwrap();
                let head = super::super::parse_body(b).unwrap();
                assert_eq!(super::super::record_hash(&head.prev, b), h, "segment {n}");
            }
        }
    }

    #[test]
    fn a_torn_sealed_audit_line_is_cut_and_the_chain_goes_on_in_a_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let s = testing::sealer();
        write_log(dir.path(), sealed(&s, 1 << 20), 10);
        let path = seg(dir.path(), 1);
        let text = std::fs::read(&path).unwrap();
        let cut = text.len() - 20;
        std::fs::write(&path, &text[..cut]).unwrap();
        let torn = text[..cut].len() - text[..cut].iter().rposition(|&b| b == b'\n').unwrap() - 1;
        let v = verify(dir.path(), None, Some(&s)).unwrap();
        assert_eq!((v.records, v.incomplete_tail_bytes), (11, torn as u64));

        let mut w = ChainWriter::open(dir.path(), sealed(&s, 1 << 20)).unwrap();
        assert_eq!(w.recovery().torn_bytes, torn as u64);
        assert_eq!((w.segment(), w.next_n()), (2, 13));
        w.append(0, "test", &fields(1)).unwrap();
        drop(w);
        let v = verify(dir.path(), None, Some(&s)).unwrap();
        assert_eq!((v.records, v.segments, v.incomplete_tail_bytes), (14, 2, 0));
    }

    #[test]
    fn a_sealed_audit_segment_with_only_its_key_line_is_started_over() {
        let dir = tempfile::tempdir().unwrap();
        let s = testing::sealer();
        let last = write_log(dir.path(), sealed(&s, 1 << 20), 4);
        // Segment 2 was created (key line synced) and the process stopped, mid-way
        // through the head.
        let old = s.new_key().unwrap();
        let mut stale = key_line(&old);
        let stale_header = stale.clone();
        stale.extend_from_slice(b"0a1b2c");
        std::fs::write(seg(dir.path(), 2), &stale).unwrap();
        let v = verify(dir.path(), None, Some(&s)).unwrap();
        assert_eq!((v.records, v.segments, v.incomplete_tail_bytes), (6, 2, 6));

        let w = ChainWriter::open(dir.path(), sealed(&s, 1 << 20)).unwrap();
        assert_eq!((w.segment(), w.next_n()), (2, 8));
        drop(w);
        let raw = std::fs::read(seg(dir.path(), 2)).unwrap();
        // A fresh key: the old one's nonce 1 is never used again.
        assert!(!raw.starts_with(&stale_header));
        assert!(raw.starts_with(b"{\"sealed\":1,\"key\":\""));
        let v = verify(dir.path(), None, Some(&s)).unwrap();
        assert_eq!((v.records, v.segments), (8, 2));
        let mut lines = SegmentLines::open(&seg(dir.path(), 2), 2, Some(&s)).unwrap();
        let Some(Line::Record { bytes, .. }) = lines.next_line().unwrap() else {
            panic!("no head");
        };
        let (_, head) = split_line_owned(bytes);
        assert_eq!(head["prev_segment_last_hash"], hex::encode(last));
    }

    #[test]
    fn sealed_audit_segments_rotate_with_signed_heads_and_a_key_each() {
        let dir = tempfile::tempdir().unwrap();
        let s = testing::sealer();
        let key =
            crate::audit::AuditKey::from_secret(&alloy_primitives::B256::repeat_byte(7)).unwrap();
        let opts = WriterOptions {
            segment_bytes: 1024,
            key: Some(key.clone()),
            sealer: Some(s.clone()),
        };
        write_log(dir.path(), opts, 30);
        let v = verify(dir.path(), Some(key.address()), Some(&s)).unwrap();
        assert!(v.segments >= 4, "{v}");
        assert_eq!(v.signed_heads, v.segments);
        let mut keys = std::collections::HashSet::new();
        for (_, path) in list_segments(dir.path()).unwrap() {
            let raw = std::fs::read_to_string(&path).unwrap();
            assert!(keys.insert(raw.lines().next().unwrap().to_owned()));
            // Closed at the first record that reaches the size, key line included.
            assert!(raw.len() < 1024 + 2048, "{}", raw.len());
        }
    }

    #[test]
    fn a_sealed_line_round_trips_only_at_its_index_and_segment() {
        let s = testing::sealer();
        let k = s.new_key().unwrap();
        let line = br#"{"hash":"00","rec":{"n":0}}"#;
        let mut buf = line.to_vec();
        let mut out = Vec::new();
        seal_line(&k, 3, 5, &mut buf, &mut out);
        assert_eq!(out.len(), 2 * (line.len() + TAG_LEN) + 1);
        let hexed = &out[..out.len() - 1];
        let mut plain = Vec::new();
        open_line(&k, 3, 5, hexed, &mut plain).unwrap();
        assert_eq!(plain, line);
        assert!(matches!(
            open_line(&k, 3, 6, hexed, &mut plain),
            Err(LineError::Auth)
        ));
        assert!(matches!(
            open_line(&k, 4, 5, hexed, &mut plain),
            Err(LineError::Auth)
        ));
        assert!(matches!(
            open_line(&k, 3, 5, &hexed[1..], &mut plain),
            Err(LineError::NotHex)
        ));
        let header = parse_key_line(&key_line(&k)[..key_line(&k).len() - 1]).unwrap();
        assert_eq!(header, k.header());
    }
}
