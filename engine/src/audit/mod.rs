//! The tamper-evident audit log: a hash chain of JSON lines, kept in segment files.
//!
//! The audit writer thread (`risk::audit::spawn_writer`) turns every record it receives
//! into one line of the chain through a [`ChainWriter`]; [`verify`] checks a log and
//! [`export`] reads one out for a SIEM or an auditor, checking it on the way. The
//! `engine audit verify` and `engine audit export` commands are thin wrappers around them.
//! The format is described for readers outside this code base in `docs/audit.md`.
//!
//! # Format
//!
//! A log is a directory of segment files `audit-<segment:08>.jsonl`, numbered from 1.
//! Every line is exactly
//!
//! ```text
//! {"hash":"<64 hex>","rec":<body>}\n
//! ```
//!
//! where `<body>` is a JSON object that starts with `"n"` (the record number), `"prev"`
//! (the hash of record `n - 1`, 64 zeros for record 0), `"at"` (RFC 3339, UTC, with
//! nanoseconds) and `"kind"`, followed by the record's fields, and
//! `hash = sha256(prev hash as 32 bytes || body bytes exactly as written)`.
//!
//! # Sealed segments
//!
//! With a [`crate::atrest::Sealer`] ([`WriterOptions::sealer`], `[at_rest]`), every new
//! segment is sealed: same file name, a first line `{"sealed":1,"key":"<hex key
//! header>"}` (the KEK id and the segment's data key wrapped by the KEK), then every line
//! above, without its newline, AES-256-GCM sealed with the segment's data key (nonce: the
//! line's record index in the segment, from 1; aad: `engine-audit` and the segment number)
//! and written as the hex of `ciphertext || tag`. See `segment.rs` for the reading layer
//! every reader goes through.
//!
//! # Invariants
//!
//! - `n` is global: consecutive from 0 across segments and restarts.
//! - Every line's hash covers its body bytes exactly as they are in the file (in a sealed
//!   segment: in the decrypted line): readers slice the body out of the line and never
//!   re-serialise it. Sealing changes nothing in the chain; the hashes of a sealed log are
//!   those of the same lines in clear.
//! - Sealed lines exist only on disk: a data key is never written in clear (only wrapped
//!   by the KEK, which stays in its HSM or KMS), and every reader (`verify`, `walk`,
//!   `export`, the writer's recovery) decrypts and authenticates through one layer,
//!   `segment.rs`; a line that does not authenticate is a [`Problem`], never plaintext.
//! - A `(data key, nonce)` pair is used once: a sealed segment is appended to only by
//!   the writer that created it. [`ChainWriter::open`] never continues a sealed segment
//!   (nor a plain one once sealing is configured): it cuts a torn last line, then starts
//!   a new segment whose head continues the chain; a newest segment with no complete
//!   record is emptied and started over with a fresh key. A sealed segment without a
//!   sealer is refused ([`crate::atrest::SealError::NoKek`]).
//! - The first record of every segment is its `segment_head` (`segment`,
//!   `prev_segment_last_hash`, and with an audit key `signer` and `sig`: see [`key`]).
//! - Lines are only ever appended. The exceptions: a torn last line (no newline at its
//!   end, left by a crash mid-write) is cut off when the writer starts, and the number of
//!   bytes cut goes into the `log_open` record it then appends; the key line of a newest
//!   segment that holds no complete record is replaced.
//! - A segment is closed (and synced) once it holds `segment_bytes` or more; a new segment
//!   is synced, and so is the directory entry, before anything else is written to it.
//! - Nothing here runs on the hot path: the writer runs on the `audit` thread (sealing is
//!   one AES-GCM pass per line there; the KEK is called once per segment).

pub mod export;
pub mod key;
mod segment;
pub mod verify;
pub mod writer;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use export::{AccountMatch, ExportError, ExportFilter, ExportSummary, export, parse_time};
pub use key::{AuditKey, KeyFileError, head_digest, recover_head_signer};
pub use verify::{AuditBreak, Problem, VerifiedRecord, VerifySummary, WalkError, verify, walk};
pub use writer::{Appended, AuditError, ChainWriter, Recovery, WriterOptions};

/// The hash before record 0 (and `prev_segment_last_hash` of segment 1).
pub const ZERO_HASH: [u8; 32] = [0; 32];

/// Default size at which a segment is closed (64 MiB).
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Smallest accepted segment size.
pub const MIN_SEGMENT_BYTES: u64 = 1024;

/// Default period of the writer's fsync (ms).
pub const DEFAULT_FSYNC_MS: u64 = 100;

/// Record kind of a segment's first record.
pub const SEGMENT_HEAD: &str = "segment_head";

/// Record kind the writer appends each time it opens the log.
pub const LOG_OPEN: &str = "log_open";

const PREFIX: &[u8] = b"{\"hash\":\"";
const SEPARATOR: &[u8] = b"\",\"rec\":";

/// The name of segment file `segment`: `audit-00000001.jsonl` for 1.
pub fn segment_file_name(segment: u64) -> String {
    format!("audit-{segment:08}.jsonl")
}

/// The segment number in a segment file name, if it is one (exactly as
/// [`segment_file_name`] writes it).
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("audit-")?.strip_suffix(".jsonl")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    (segment_file_name(n) == name).then_some(n)
}

/// The segment files in `dir`, by segment number (other files are ignored).
pub fn list_segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(n) = entry.file_name().to_str().and_then(parse_segment_file_name)
            && entry.file_type()?.is_file()
        {
            out.push((n, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(n, _)| *n);
    Ok(out)
}

/// `sha256(prev || body)`: the hash of a record whose body bytes are `body`.
pub fn record_hash(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.finalize().into()
}

/// Splits a line (without its newline) into its hash and its body bytes; `None` when it
/// is not exactly `{"hash":"<64 hex>","rec":<body>}`.
pub fn split_line(line: &[u8]) -> Option<([u8; 32], &[u8])> {
    let rest = line.strip_prefix(PREFIX)?;
    if rest.len() < 64 {
        return None;
    }
    let (hex_part, rest) = rest.split_at(64);
    let mut hash = [0u8; 32];
    // Lower-case hex only: the writer never writes anything else.
    if hex_part.iter().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode_to_slice(hex_part, &mut hash).ok()?;
    let body = rest.strip_prefix(SEPARATOR)?.strip_suffix(b"}")?;
    if !body.starts_with(b"{") || !body.ends_with(b"}") {
        return None;
    }
    Some((hash, body))
}

/// A whole line (with its newline) for `body` and its `hash`.
pub fn format_line(hash: &[u8; 32], body: &str) -> String {
    let mut s = String::with_capacity(PREFIX.len() + 64 + SEPARATOR.len() + body.len() + 2);
    s.push_str("{\"hash\":\"");
    s.push_str(&hex::encode(hash));
    s.push_str("\",\"rec\":");
    s.push_str(body);
    s.push_str("}\n");
    s
}

/// Unix nanoseconds as RFC 3339 in UTC with nanoseconds (`2026-12-01T06:05:12.123456789Z`).
pub fn format_at(unix_ns: u64) -> String {
    let ns = i64::try_from(unix_ns).unwrap_or(i64::MAX);
    chrono::DateTime::<chrono::Utc>::from_timestamp_nanos(ns)
        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// An RFC 3339 time as unix nanoseconds.
pub fn parse_at(s: &str) -> Option<i128> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    Some(i128::from(t.timestamp()) * 1_000_000_000 + i128::from(t.timestamp_subsec_nanos()))
}

/// Lower-case hex of a hash.
pub fn hex_hash(h: &[u8; 32]) -> String {
    hex::encode(h)
}

/// Parses 64 hex digits.
pub(crate) fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let mut h = [0u8; 32];
    if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode_to_slice(s, &mut h).ok()?;
    Some(h)
}

/// The fields every record body starts with.
#[derive(Debug)]
pub(crate) struct BodyHead {
    /// Record number.
    pub n: u64,
    /// Hash of the record before.
    pub prev: [u8; 32],
    /// The whole body, parsed.
    pub value: serde_json::Map<String, serde_json::Value>,
}

impl BodyHead {
    /// The record kind (empty when missing).
    pub fn kind(&self) -> &str {
        self.value
            .get("kind")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
    }
}

/// Parses a body: a JSON object with a numeric `n` and a 64-hex `prev`.
pub(crate) fn parse_body(body: &[u8]) -> Result<BodyHead, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(value) = v else {
        return Err("the body is not a JSON object".into());
    };
    let n = value
        .get("n")
        .and_then(serde_json::Value::as_u64)
        .ok_or("no record number `n`")?;
    let prev = value
        .get("prev")
        .and_then(serde_json::Value::as_str)
        .and_then(parse_hash)
        .ok_or("no 64-hex-digit `prev`")?;
    Ok(BodyHead { n, prev, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_splits_back_into_its_hash_and_body() {
        let body = r#"{"n":0,"prev":"00","kind":"x"}"#;
        let h = record_hash(&ZERO_HASH, body.as_bytes());
        let line = format_line(&h, body);
        let (h2, b2) = split_line(line.trim_end_matches('\n').as_bytes()).unwrap();
        assert_eq!((h2, b2), (h, body.as_bytes()));
        assert!(split_line(b"{\"hash\":\"00\",\"rec\":{}}").is_none());
    }

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_file_name(1), "audit-00000001.jsonl");
        assert_eq!(parse_segment_file_name("audit-00000001.jsonl"), Some(1));
        assert_eq!(parse_segment_file_name("audit-1.jsonl"), None);
        assert_eq!(parse_segment_file_name("audit-000000001.jsonl"), None);
        assert_eq!(
            parse_segment_file_name("audit-123456789.jsonl"),
            Some(123_456_789)
        );
        assert_eq!(parse_segment_file_name("audit-00000001.jsonl.tmp"), None);
    }

    #[test]
    fn times_are_rfc3339_utc_with_nanoseconds() {
        let s = format_at(1_700_000_000_123_456_789);
        assert_eq!(s, "2023-11-14T22:13:20.123456789Z");
        assert_eq!(parse_at(&s), Some(1_700_000_000_123_456_789));
    }
}
