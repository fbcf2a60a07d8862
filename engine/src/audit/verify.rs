//! Verification of an audit log: every segment in order, every line's hash, the `prev`
//! links, consecutive record numbers, and the segment heads (numbering, link to the
//! segment before, signature).
//!
//! Invariants: a body is checked as the bytes it is in the file (sliced out of the line,
//! never re-serialised); the walk stops at the first problem and names the segment file,
//! the line (from 1) and the record number. An incomplete last line of the newest segment
//! (a crash mid-write, or a write in progress) is left out and reported in the summary, as
//! is an empty newest segment: the writer repairs both on its next start. Sealed
//! segments are read through [`super::segment::SegmentLines`]: every check runs on the
//! decrypted lines, exactly as on a plain segment's, and a sealed line that does not
//! authenticate is a [`Problem`] at its file and line like any altered record. Line
//! numbers are the file's (in a sealed segment, line 1 is the key line and the segment
//! head is line 2).

use std::fmt;
use std::path::Path;

use alloy_primitives::Address;

use super::segment::{Line, ReadError, ReadProblem, SegmentLines};
use super::{
    BodyHead, SEGMENT_HEAD, ZERO_HASH, hex_hash, list_segments, parse_body, parse_hash,
    record_hash, segment_file_name, split_line,
};
use crate::atrest::{SealError, Sealer};

/// What is wrong at the point where a log stops checking out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A file or the directory could not be read.
    #[error("cannot read it: {0}")]
    Io(String),
    /// No segment file at all.
    #[error("no audit segment files (audit-NNNNNNNN.jsonl) in the directory")]
    NoSegments,
    /// The first segment file is not segment 1.
    #[error("the first segment file is segment {0}, not 1 (earlier segment files are missing)")]
    MissingStart(u64),
    /// A segment number is skipped.
    #[error("segment {found} follows segment {prev} (a segment file is missing)")]
    SegmentGap {
        /// The segment before.
        prev: u64,
        /// This segment.
        found: u64,
    },
    /// A segment other than the newest has no records.
    #[error("the segment file holds no record")]
    EmptySegment,
    /// The segment is sealed and no key-encryption key was given to open it.
    #[error(
        "the segment is encrypted (data key wrapped by `{kek}`) and no [at_rest] key-encryption key is configured"
    )]
    NoKek {
        /// The KEK id in the segment's key line.
        kek: String,
    },
    /// The segment is sealed and its data key cannot be opened (another KEK, the KEK
    /// failed, a damaged key header).
    #[error("the segment's data key cannot be opened: {0}")]
    Key(String),
    /// The key line of a sealed segment does not parse.
    #[error("the key line of the sealed segment does not parse: {0}")]
    KeyLine(String),
    /// A sealed line does not authenticate under its segment's key and its position.
    #[error(
        "the sealed line does not authenticate (the line was altered, moved or removed, or a line before it was removed)"
    )]
    Unauthentic,
    /// A segment other than the newest ends without a newline.
    #[error("incomplete line (no newline at its end) in a segment that is not the newest")]
    TornLine,
    /// Not `{"hash":"<64 hex>","rec":{…}}`.
    #[error("not an audit line (the record was altered)")]
    Malformed,
    /// The body is not a JSON object with `n` and `prev`.
    #[error("the record does not parse, {0} (the record was altered)")]
    BadBody(String),
    /// The line's hash is not `sha256(prev || body)`.
    #[error("hash mismatch (the record was altered)")]
    HashMismatch,
    /// A record number is skipped.
    #[error("record number {found} follows {prev} (a record was deleted)")]
    Deleted {
        /// The record before.
        prev: u64,
        /// This record.
        found: u64,
    },
    /// The records are out of order.
    #[error("record number {found} comes where {expected} belongs (records reordered)")]
    Reordered {
        /// The number due here.
        expected: u64,
        /// This record.
        found: u64,
    },
    /// A record number is repeated or goes back.
    #[error("record number {found} follows {prev} (a record was duplicated or moved)")]
    Backwards {
        /// The record before.
        prev: u64,
        /// This record.
        found: u64,
    },
    /// The first record of the log is not record 0.
    #[error("the log starts with record {0}, not 0 (records were removed from its start)")]
    NotFromZero(u64),
    /// `prev` is not the hash of the record before.
    #[error("prev does not match the hash of the record before (records reordered or removed)")]
    PrevMismatch,
    /// A segment's first record is not its head.
    #[error("the first record of the segment is not a segment_head (the head was removed)")]
    MissingHead,
    /// A head where there should be none.
    #[error("a segment_head that is not the first record of its segment")]
    StrayHead,
    /// The head names another segment.
    #[error("the segment_head says segment {found}, the file is segment {expected}")]
    HeadNumber {
        /// The file's segment number.
        expected: u64,
        /// The head's.
        found: u64,
    },
    /// The head's `prev_segment_last_hash` is not the last hash of the segment before.
    #[error("the segment_head's prev_segment_last_hash is not the last hash of the segment before")]
    HeadLink,
    /// `--signer` was given and the head carries no signature.
    #[error("the segment_head is not signed (expected a signature by {0})")]
    Unsigned(Address),
    /// The signature or signer field cannot be read.
    #[error("the segment_head's signature cannot be read: {0}")]
    BadSignature(String),
    /// The signature is not by its declared signer (so the head was altered or forged).
    #[error(
        "the segment_head's signature is by {recovered}, not by its signer {declared} (the head was altered)"
    )]
    SignatureMismatch {
        /// The `signer` field.
        declared: Address,
        /// Who signed.
        recovered: Address,
    },
    /// The head is signed by another key than `--signer`.
    #[error("the segment_head is signed by {found}, expected {expected}")]
    WrongSigner {
        /// `--signer`.
        expected: Address,
        /// The key that signed.
        found: Address,
    },
}

/// Where a log stops checking out, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct AuditBreak {
    /// The segment file's name (or the directory, for problems with no file).
    pub file: String,
    /// The line, from 1 (0: the file as a whole).
    pub line: u64,
    /// The record number (as written, or as due there when it cannot be read).
    pub record: Option<u64>,
    /// What is wrong.
    pub problem: Problem,
}

impl fmt::Display for AuditBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if self.line > 0 {
            write!(f, " line {}", self.line)?;
        }
        if let Some(n) = self.record {
            write!(f, " (record {n})")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// An intact log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// Records checked.
    pub records: u64,
    /// Segment files checked.
    pub segments: u64,
    /// Hash of the last record.
    pub last_hash: [u8; 32],
    /// Segment heads with a valid signature.
    pub signed_heads: u64,
    /// The keys that signed heads, in order of first appearance.
    pub signers: Vec<Address>,
    /// Bytes of an incomplete last line left out (0: none).
    pub incomplete_tail_bytes: u64,
}

impl fmt::Display for VerifySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "audit log intact: {} records in {} segments, last hash {}",
            self.records,
            self.segments,
            hex_hash(&self.last_hash)
        )?;
        if self.signed_heads > 0 {
            let who: Vec<String> = self.signers.iter().map(ToString::to_string).collect();
            write!(
                f,
                "; {} segment heads signed by {}",
                self.signed_heads,
                who.join(", ")
            )?;
        }
        if self.incomplete_tail_bytes > 0 {
            write!(
                f,
                "; an incomplete last line ({} bytes, a crash or a write in progress) was left out",
                self.incomplete_tail_bytes
            )?;
        }
        Ok(())
    }
}

/// One record that checked out, as [`walk`] hands it on.
#[derive(Debug)]
pub struct VerifiedRecord<'a> {
    /// Its segment file's name.
    pub file: &'a str,
    /// Its line in that file, from 1.
    pub line: u64,
    /// Its number.
    pub n: u64,
    /// Its hash.
    pub hash: [u8; 32],
    /// The body bytes exactly as in the file.
    pub body: &'a str,
    /// The body, parsed.
    pub rec: &'a serde_json::Map<String, serde_json::Value>,
}

/// Checks the log in `dir`; with `signer`, every segment head must be signed by it (a
/// head signature present is checked either way). Sealed segments are opened with
/// `sealer` (without one: [`Problem::NoKek`] at the first sealed segment).
pub fn verify(
    dir: &Path,
    signer: Option<Address>,
    sealer: Option<&Sealer>,
) -> Result<VerifySummary, AuditBreak> {
    walk(dir, signer, sealer, |_| {
        Ok::<(), std::convert::Infallible>(())
    })
    .map_err(|e| match e {
        WalkError::Break(b) => b,
        WalkError::Sink(never) => match never {},
    })
}

/// Why a [`walk`] stopped.
#[derive(Debug)]
pub enum WalkError<E> {
    /// The log does not check out.
    Break(AuditBreak),
    /// The callback failed.
    Sink(E),
}

/// Walks the log in `dir` as [`verify`] does, handing every record that checked out to
/// `each` (in order) before looking at the next one.
pub fn walk<E>(
    dir: &Path,
    signer: Option<Address>,
    sealer: Option<&Sealer>,
    mut each: impl FnMut(&VerifiedRecord<'_>) -> Result<(), E>,
) -> Result<VerifySummary, WalkError<E>> {
    let dir_name = dir.display().to_string();
    let brk = |file: &str, line: u64, record: Option<u64>, problem: Problem| {
        WalkError::Break(AuditBreak {
            file: file.to_owned(),
            line,
            record,
            problem,
        })
    };
    let segments =
        list_segments(dir).map_err(|e| brk(&dir_name, 0, None, Problem::Io(e.to_string())))?;
    let Some(&(first, _)) = segments.first() else {
        return Err(brk(&dir_name, 0, None, Problem::NoSegments));
    };
    if first != 1 {
        return Err(brk(
            &segment_file_name(first),
            0,
            None,
            Problem::MissingStart(first),
        ));
    }
    let mut sum = VerifySummary {
        records: 0,
        segments: 0,
        last_hash: ZERO_HASH,
        signed_heads: 0,
        signers: Vec::new(),
        incomplete_tail_bytes: 0,
    };
    let mut expected_n = 0u64;
    let mut prev_segment = 0u64;
    for (i, (segment, path)) in segments.iter().enumerate() {
        let newest = i + 1 == segments.len();
        let file = segment_file_name(*segment);
        if *segment != prev_segment + 1 {
            return Err(brk(
                &file,
                0,
                None,
                Problem::SegmentGap {
                    prev: prev_segment,
                    found: *segment,
                },
            ));
        }
        prev_segment = *segment;
        sum.segments += 1;
        let read_brk = |e: ReadError, record: Option<u64>| {
            let record = if e.line == 0 { None } else { record };
            brk(&file, e.line, record, read_problem(e.problem))
        };
        let mut lines =
            SegmentLines::open(path, *segment, sealer).map_err(|e| read_brk(e, None))?;
        let mut first_record = true;
        loop {
            let (line_no, line) = match lines
                .next_line()
                .map_err(|e| read_brk(e, Some(expected_n)))?
            {
                None => break,
                Some(Line::Torn { line, bytes }) => {
                    if newest {
                        sum.incomplete_tail_bytes = bytes;
                        break;
                    }
                    return Err(brk(&file, line, Some(expected_n), Problem::TornLine));
                }
                Some(Line::Record { line, bytes }) => (line, bytes),
            };
            let at = |record: u64, p: Problem| brk(&file, line_no, Some(record), p);
            let (hash, body) =
                split_line(line).ok_or_else(|| at(expected_n, Problem::Malformed))?;
            let head: BodyHead =
                parse_body(body).map_err(|e| at(expected_n, Problem::BadBody(e)))?;
            let n = head.n;
            if record_hash(&head.prev, body) != hash {
                return Err(at(n, Problem::HashMismatch));
            }
            if n != expected_n {
                let problem = if sum.records == 0 {
                    Problem::NotFromZero(n)
                } else if n > expected_n {
                    // One more line tells a deletion from a swap.
                    let swapped = matches!(
                        lines.next_line(),
                        Ok(Some(Line::Record { bytes, .. }))
                            if split_line(bytes)
                                .and_then(|(_, b)| parse_body(b).ok())
                                .is_some_and(|h| h.n == expected_n)
                    );
                    if swapped {
                        Problem::Reordered {
                            expected: expected_n,
                            found: n,
                        }
                    } else {
                        Problem::Deleted {
                            prev: expected_n - 1,
                            found: n,
                        }
                    }
                } else {
                    Problem::Backwards {
                        prev: expected_n - 1,
                        found: n,
                    }
                };
                return Err(at(n, problem));
            }
            if head.prev != sum.last_hash {
                return Err(at(n, Problem::PrevMismatch));
            }
            let is_head = head.kind() == SEGMENT_HEAD;
            if first_record {
                if !is_head {
                    return Err(at(n, Problem::MissingHead));
                }
                let last = sum.last_hash;
                check_head(&head, *segment, &last, signer, &mut sum).map_err(|p| at(n, p))?;
            } else if is_head {
                return Err(at(n, Problem::StrayHead));
            }
            first_record = false;
            let body_str =
                std::str::from_utf8(body).map_err(|e| at(n, Problem::BadBody(e.to_string())))?;
            each(&VerifiedRecord {
                file: &file,
                line: line_no,
                n,
                hash,
                body: body_str,
                rec: &head.value,
            })
            .map_err(WalkError::Sink)?;
            sum.records += 1;
            sum.last_hash = hash;
            expected_n = n + 1;
        }
        if first_record && !newest {
            return Err(brk(&file, 0, None, Problem::EmptySegment));
        }
    }
    Ok(sum)
}

/// The [`Problem`] of what reading a segment found.
fn read_problem(p: ReadProblem) -> Problem {
    match p {
        ReadProblem::Io(e) => Problem::Io(e.to_string()),
        ReadProblem::KeyLine(why) => Problem::KeyLine(why.to_owned()),
        ReadProblem::Key(SealError::NoKek { kek }) => Problem::NoKek { kek },
        ReadProblem::Key(e) => Problem::Key(e.to_string()),
        ReadProblem::NotHex => Problem::Malformed,
        ReadProblem::Auth => Problem::Unauthentic,
    }
}

/// Checks a segment head: its number, its link, its signature.
fn check_head(
    head: &BodyHead,
    segment: u64,
    last_hash: &[u8; 32],
    signer: Option<Address>,
    sum: &mut VerifySummary,
) -> Result<(), Problem> {
    let v = &head.value;
    let found = v
        .get("segment")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| Problem::BadBody("the segment_head has no `segment`".into()))?;
    if found != segment {
        return Err(Problem::HeadNumber {
            expected: segment,
            found,
        });
    }
    let link = v
        .get("prev_segment_last_hash")
        .and_then(serde_json::Value::as_str)
        .and_then(parse_hash)
        .ok_or_else(|| {
            Problem::BadBody("the segment_head has no 64-hex `prev_segment_last_hash`".into())
        })?;
    if &link != last_hash {
        return Err(Problem::HeadLink);
    }
    let sig = v.get("sig").and_then(serde_json::Value::as_str);
    let Some(sig) = sig else {
        return match signer {
            Some(s) => Err(Problem::Unsigned(s)),
            None => Ok(()),
        };
    };
    let mut raw = [0u8; 65];
    hex::decode_to_slice(sig.strip_prefix("0x").unwrap_or(sig), &mut raw)
        .map_err(|_| Problem::BadSignature("`sig` is not 65 bytes of hex".into()))?;
    let declared: Address = v
        .get("signer")
        .and_then(serde_json::Value::as_str)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Problem::BadSignature("no `signer` address next to `sig`".into()))?;
    let recovered =
        super::key::recover_head_signer(&link, segment, &raw).map_err(Problem::BadSignature)?;
    if recovered != declared {
        return Err(Problem::SignatureMismatch {
            declared,
            recovered,
        });
    }
    if let Some(expected) = signer
        && expected != recovered
    {
        return Err(Problem::WrongSigner {
            expected,
            found: recovered,
        });
    }
    sum.signed_heads += 1;
    if !sum.signers.contains(&recovered) {
        sum.signers.push(recovered);
    }
    Ok(())
}
