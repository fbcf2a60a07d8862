//! [`ChainWriter`]: appends records to the hash chain, one segment file at a time.
//!
//! Invariants: the writer is the only one appending to its directory (one engine per audit
//! directory); it keeps the number and hash of the last record written, so each append
//! is one `sha256`, one buffered write and, in a sealed segment, one AES-GCM pass; it
//! never rewrites a complete record line (a torn last line is cut on
//! [`ChainWriter::open`], and the cut is recorded in the `log_open` record that open
//! appends); a segment is synced before the next one is created. With a sealer, every
//! segment it creates is sealed, and a sealed segment is only ever written by the writer
//! that created it: open starts a new segment rather than append to a sealed one (or to
//! a plain one when sealing is configured), so a nonce is never used twice under one data
//! key.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::key::AuditKey;
use super::segment::{self, ReadError, ReadProblem, Tail};
use super::{
    LOG_OPEN, SEGMENT_HEAD, ZERO_HASH, format_at, format_line, hex_hash, list_segments, parse_body,
    record_hash, segment_file_name, split_line,
};
use crate::atrest::{SealError, Sealer, SegmentKey};

/// Why the log cannot be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file of the log could not be read or written.
    #[error("audit log {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The last complete record of the log does not check out, so the chain cannot be
    /// continued from it.
    #[error(
        "audit log {}: the last record cannot be continued from ({why}); check the log with `engine audit verify`",
        path.display()
    )]
    Damaged {
        /// The segment file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A sealed segment's data key cannot be opened (no KEK configured, another KEK, the
    /// KEK failed), or a new one cannot be made.
    #[error(
        "audit log {}: {source}; the [at_rest] key-encryption key that sealed the audit log is needed",
        path.display()
    )]
    Sealed {
        /// The segment file.
        path: PathBuf,
        /// What the sealer said.
        source: SealError,
    },
    /// The audit key could not sign a segment head.
    #[error("audit key: {0}")]
    Sign(String),
}

/// How a [`ChainWriter`] writes.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// A segment is closed once it holds this many bytes (its last record may cross it).
    pub segment_bytes: u64,
    /// Signs every segment head when set.
    pub key: Option<AuditKey>,
    /// Seals every new segment when set (encryption at rest), and opens sealed segments
    /// on recovery.
    pub sealer: Option<Sealer>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            segment_bytes: super::DEFAULT_SEGMENT_BYTES,
            key: None,
            sealer: None,
        }
    }
}

/// What [`ChainWriter::open`] found and repaired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes of a torn last line cut off (0: none).
    pub torn_bytes: u64,
    /// Torn lines cut off (0 or 1).
    pub torn_lines: u64,
    /// Records in the log when it was opened (the number of the next one).
    pub records_before: u64,
}

/// One record written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Its number.
    pub n: u64,
    /// Its hash.
    pub hash: [u8; 32],
    /// The segment it is in.
    pub segment: u64,
}

/// The appending end of an audit log directory.
#[derive(Debug)]
pub struct ChainWriter {
    dir: PathBuf,
    opts: WriterOptions,
    file: BufWriter<File>,
    segment: u64,
    segment_len: u64,
    next_n: u64,
    last_hash: [u8; 32],
    recovery: Recovery,
    unsynced: bool,
    /// The current segment's data key, when it is sealed.
    seal: Option<SegmentKey>,
    /// Nonces used in the current sealed segment (the index of its last record line).
    sealed_lines: u64,
    /// A sealed write failed: the next append starts a new segment.
    rotate_next: bool,
    /// The plaintext line being sealed, then its ciphertext.
    scratch: Vec<u8>,
    /// The sealed line as written.
    sealed_out: Vec<u8>,
}

/// Maps what reading a segment found to why the writer cannot continue from it.
fn read_error(path: &Path, e: ReadError) -> AuditError {
    let path = path.to_path_buf();
    match e.problem {
        ReadProblem::Io(source) => AuditError::Io { path, source },
        ReadProblem::Key(source) => AuditError::Sealed { path, source },
        ReadProblem::KeyLine(why) => AuditError::Damaged {
            path,
            why: format!("its key line does not parse: {why}"),
        },
        ReadProblem::NotHex | ReadProblem::Auth => AuditError::Damaged {
            path,
            why: format!("sealed line {} does not authenticate", e.line),
        },
    }
}

impl ChainWriter {
    /// Opens (or creates) the log in `dir`: continues the chain from the last record of
    /// the newest segment, after cutting off a torn last line (logged as a warning and
    /// counted in [`ChainWriter::recovery`]), then appends a `log_open` record. The chain
    /// goes on in the newest segment when it is plain and no sealer is configured, and in
    /// a new segment otherwise. A sealed segment without a sealer is refused
    /// ([`AuditError::Sealed`] with [`SealError::NoKek`]).
    pub fn open(dir: &Path, opts: WriterOptions) -> Result<ChainWriter, AuditError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuditError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let segments = list_segments(dir).map_err(io(dir))?;
        let mut recovery = Recovery::default();
        let sealer = opts.sealer.clone();
        let mut w = match segments.last() {
            None => Self::start_segment(dir, opts, 1, 0, ZERO_HASH)?,
            Some((segment, path)) => {
                let t: Tail = segment::tail(path, *segment, sealer.as_ref())
                    .map_err(|e| read_error(path, e))?;
                let mut f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io(path))?;
                if t.complete < t.len {
                    recovery.torn_bytes = t.len - t.complete;
                    recovery.torn_lines = 1;
                    tracing::warn!(
                        file = %path.display(),
                        bytes = t.len - t.complete,
                        "audit log: the last line was torn (no newline at its end: the process stopped mid-write); cut it off"
                    );
                    f.set_len(t.complete).map_err(io(path))?;
                    f.sync_all().map_err(io(path))?;
                }
                match t.last {
                    Some(line) => {
                        let (n, hash) = check_last(path, &line)?;
                        if t.sealed || sealer.is_some() {
                            // The newest segment is closed as it is: a sealed one is
                            // never appended to again, and a plain one stays plain.
                            drop(f);
                            Self::start_segment(dir, opts, *segment + 1, n + 1, hash)?
                        } else {
                            f.seek(SeekFrom::End(0)).map_err(io(path))?;
                            Self::with_file(dir, opts, f, *segment, t.complete, n + 1, hash)
                        }
                    }
                    None => {
                        // Nothing complete in the newest segment (it was created, then the
                        // process stopped): continue from the segment before and start
                        // this one over (a key line without records is replaced by a
                        // fresh one).
                        let (next_n, hash) = match segments.len().checked_sub(2) {
                            Some(i) => {
                                let (pseg, prev) = &segments[i];
                                let pt = segment::tail(prev, *pseg, sealer.as_ref())
                                    .map_err(|e| read_error(prev, e))?;
                                match pt.last {
                                    Some(line) if pt.complete == pt.len => {
                                        let (n, hash) = check_last(prev, &line)?;
                                        (n + 1, hash)
                                    }
                                    _ => {
                                        return Err(AuditError::Damaged {
                                            path: prev.clone(),
                                            why: "it does not end with a complete record".into(),
                                        });
                                    }
                                }
                            }
                            None => (0, ZERO_HASH),
                        };
                        f.set_len(0).map_err(io(path))?;
                        f.seek(SeekFrom::Start(0)).map_err(io(path))?;
                        let key = new_key(path, sealer.as_ref())?;
                        let len = begin_segment(&mut f, path, key.as_ref())?;
                        let mut w = Self::with_file(dir, opts, f, *segment, len, next_n, hash);
                        w.seal = key;
                        w.write_head()?;
                        w
                    }
                }
            }
        };
        recovery.records_before = w.next_n;
        w.recovery = recovery;
        let mut fields = serde_json::Map::new();
        fields.insert("segment".into(), Value::from(w.segment));
        fields.insert("torn_bytes_cut".into(), Value::from(recovery.torn_bytes));
        if let Some(k) = &w.opts.key {
            fields.insert("signer".into(), serde_json::json!(k.address()));
        }
        if let Some(s) = &w.opts.sealer {
            fields.insert("kek".into(), Value::from(s.kek_id()));
        }
        w.append_unchecked(crate::risk::unix_now_ns(), LOG_OPEN, &fields)?;
        Ok(w)
    }

    /// Creates segment `segment` (sealed when a sealer is configured) and writes its
    /// head, continuing the chain at record `next_n` after `last_hash`.
    fn start_segment(
        dir: &Path,
        opts: WriterOptions,
        segment: u64,
        next_n: u64,
        last_hash: [u8; 32],
    ) -> Result<ChainWriter, AuditError> {
        let path = dir.join(segment_file_name(segment));
        let key = new_key(&path, opts.sealer.as_ref())?;
        let (file, len) = create_segment(dir, &path, key.as_ref())?;
        let mut w = Self::with_file(dir, opts, file, segment, len, next_n, last_hash);
        w.seal = key;
        w.write_head()?;
        Ok(w)
    }

    fn with_file(
        dir: &Path,
        opts: WriterOptions,
        file: File,
        segment: u64,
        segment_len: u64,
        next_n: u64,
        last_hash: [u8; 32],
    ) -> ChainWriter {
        ChainWriter {
            dir: dir.to_path_buf(),
            opts,
            file: BufWriter::with_capacity(64 * 1024, file),
            segment,
            segment_len,
            next_n,
            last_hash,
            recovery: Recovery::default(),
            unsynced: false,
            seal: None,
            sealed_lines: 0,
            rotate_next: false,
            scratch: Vec::new(),
            sealed_out: Vec::new(),
        }
    }

    /// What opening found and repaired.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// Number of the next record.
    pub fn next_n(&self) -> u64 {
        self.next_n
    }

    /// Hash of the last record written.
    pub fn last_hash(&self) -> [u8; 32] {
        self.last_hash
    }

    /// The segment being written.
    pub fn segment(&self) -> u64 {
        self.segment
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one record of `kind` with `fields` (a JSON object; its `n`, `prev`, `at`
    /// and `kind` keys, if any, are ignored: the writer sets them). `at_ns` is the time
    /// of the event (unix ns; 0: now). Moves to a new segment first when the current one
    /// is full.
    pub fn append(
        &mut self,
        at_ns: u64,
        kind: &str,
        fields: &serde_json::Map<String, Value>,
    ) -> Result<Appended, AuditError> {
        if self.segment_len >= self.opts.segment_bytes || self.rotate_next {
            self.rotate()?;
        }
        self.append_unchecked(at_ns, kind, fields)
    }

    fn append_unchecked(
        &mut self,
        at_ns: u64,
        kind: &str,
        fields: &serde_json::Map<String, Value>,
    ) -> Result<Appended, AuditError> {
        let at_ns = if at_ns == 0 {
            crate::risk::unix_now_ns()
        } else {
            at_ns
        };
        let n = self.next_n;
        let mut body = String::with_capacity(256);
        body.push_str("{\"n\":");
        body.push_str(&n.to_string());
        body.push_str(",\"prev\":\"");
        body.push_str(&hex_hash(&self.last_hash));
        body.push_str("\",\"at\":\"");
        body.push_str(&format_at(at_ns));
        body.push_str("\",\"kind\":");
        body.push_str(&Value::from(kind).to_string());
        for (k, v) in fields {
            if matches!(k.as_str(), "n" | "prev" | "at" | "kind") {
                continue;
            }
            body.push(',');
            body.push_str(&Value::from(k.as_str()).to_string());
            body.push(':');
            body.push_str(&v.to_string());
        }
        body.push('}');
        let hash = record_hash(&self.last_hash, body.as_bytes());
        let line = format_line(&hash, &body);
        let written = match &self.seal {
            None => {
                self.file
                    .write_all(line.as_bytes())
                    .map_err(|source| AuditError::Io {
                        path: self.dir.join(segment_file_name(self.segment)),
                        source,
                    })?;
                line.len()
            }
            Some(key) => {
                // The nonce is spent whether or not the write goes through.
                self.sealed_lines += 1;
                self.scratch.clear();
                self.scratch
                    .extend_from_slice(&line.as_bytes()[..line.len() - 1]);
                segment::seal_line(
                    key,
                    self.segment,
                    self.sealed_lines,
                    &mut self.scratch,
                    &mut self.sealed_out,
                );
                if let Err(source) = self.file.write_all(&self.sealed_out) {
                    self.rotate_next = true;
                    return Err(AuditError::Io {
                        path: self.dir.join(segment_file_name(self.segment)),
                        source,
                    });
                }
                self.sealed_out.len()
            }
        };
        self.segment_len += written as u64;
        self.next_n += 1;
        self.last_hash = hash;
        self.unsynced = true;
        Ok(Appended {
            n,
            hash,
            segment: self.segment,
        })
    }

    fn segment_path(&self) -> PathBuf {
        self.dir.join(segment_file_name(self.segment))
    }

    /// Writes the head of the current (empty) segment.
    fn write_head(&mut self) -> Result<(), AuditError> {
        let mut fields = serde_json::Map::new();
        fields.insert("segment".into(), Value::from(self.segment));
        fields.insert(
            "prev_segment_last_hash".into(),
            Value::from(hex_hash(&self.last_hash)),
        );
        if let Some(k) = &self.opts.key {
            let sig = k
                .sign_head(&self.last_hash, self.segment)
                .map_err(|e| AuditError::Sign(e.to_string()))?;
            fields.insert("signer".into(), serde_json::json!(k.address()));
            fields.insert("sig".into(), Value::from(format!("0x{}", hex::encode(sig))));
        }
        self.append_unchecked(0, SEGMENT_HEAD, &fields)?;
        Ok(())
    }

    /// Closes the current segment (synced) and starts the next one with its head
    /// (sealed, with a fresh data key, when a sealer is configured).
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.sync()?;
        let next = self.segment + 1;
        let path = self.dir.join(segment_file_name(next));
        let key = new_key(&path, self.opts.sealer.as_ref())?;
        let (file, len) = create_segment(&self.dir, &path, key.as_ref())?;
        self.file = BufWriter::with_capacity(64 * 1024, file);
        self.segment = next;
        self.segment_len = len;
        self.seal = key;
        self.sealed_lines = 0;
        self.rotate_next = false;
        self.write_head()
    }

    /// Hands buffered lines to the OS (readers see them; a crash of the process no longer
    /// loses them).
    pub fn flush(&mut self) -> Result<(), AuditError> {
        let path = self.segment_path();
        self.file
            .flush()
            .map_err(|source| AuditError::Io { path, source })
    }

    /// Flushes and syncs the current segment to disk.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        self.flush()?;
        if self.unsynced {
            let path = self.segment_path();
            self.file
                .get_ref()
                .sync_data()
                .map_err(|source| AuditError::Io { path, source })?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Whether the segment being written is sealed.
    pub fn sealed(&self) -> bool {
        self.seal.is_some()
    }

    /// Whether lines were written since the last sync.
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }
}

impl Drop for ChainWriter {
    fn drop(&mut self) {
        if let Err(e) = self.sync() {
            tracing::error!(error = %e, "audit log: final sync failed");
        }
    }
}

/// A fresh data key for the segment file `path`, when `sealer` is set (one KEK call).
fn new_key(path: &Path, sealer: Option<&Sealer>) -> Result<Option<SegmentKey>, AuditError> {
    sealer
        .map(Sealer::new_key)
        .transpose()
        .map_err(|source| AuditError::Sealed {
            path: path.to_path_buf(),
            source,
        })
}

/// Writes the key line of a sealed segment into the empty file `f` and syncs it; the
/// bytes written (0 for a plain segment).
fn begin_segment(f: &mut File, path: &Path, key: Option<&SegmentKey>) -> Result<u64, AuditError> {
    let Some(key) = key else {
        return Ok(0);
    };
    let line = segment::key_line(key);
    f.write_all(&line)
        .and_then(|()| f.sync_all())
        .map_err(|source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(line.len() as u64)
}

/// Creates a new segment file (with its key line when `key` is set: sealed), syncs it
/// and its directory entry; the file and its length.
fn create_segment(
    dir: &Path,
    path: &Path,
    key: Option<&SegmentKey>,
) -> Result<(File, u64), AuditError> {
    let io = |p: &Path| {
        let path = p.to_path_buf();
        move |source| AuditError::Io { path, source }
    };
    let mut file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(path)
        .map_err(io(path))?;
    let len = begin_segment(&mut file, path, key)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok((file, len))
}

/// The number and hash of a complete last line, checked against its own body.
fn check_last(path: &Path, line: &[u8]) -> Result<(u64, [u8; 32]), AuditError> {
    let damaged = |why: &str| AuditError::Damaged {
        path: path.to_path_buf(),
        why: why.to_owned(),
    };
    let (hash, body) = split_line(line).ok_or_else(|| damaged("not an audit line"))?;
    let head = parse_body(body).map_err(|e| damaged(&e))?;
    if record_hash(&head.prev, body) != hash {
        return Err(damaged("its hash does not match its content"));
    }
    Ok((head.n, hash))
}
