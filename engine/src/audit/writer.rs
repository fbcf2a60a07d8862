//! [`ChainWriter`]: appends records to the hash chain, one segment file at a time.
//!
//! Invariants: the writer is the only one appending to its directory (one engine per audit
//! directory); it keeps the number and hash of the last record written, so each append
//! is one `sha256` and one buffered write; it never rewrites a complete line (a torn last
//! line is cut on [`ChainWriter::open`], and the cut is recorded in the `log_open` record
//! that open appends); a segment is synced before the next one is created.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::key::AuditKey;
use super::{
    LOG_OPEN, SEGMENT_HEAD, ZERO_HASH, format_at, format_line, hex_hash, list_segments, parse_body,
    record_hash, segment_file_name, split_line,
};

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
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            segment_bytes: super::DEFAULT_SEGMENT_BYTES,
            key: None,
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
}

impl ChainWriter {
    /// Opens (or creates) the log in `dir`: continues the chain from the last record of
    /// the newest segment, after cutting off a torn last line (logged as a warning and
    /// counted in [`ChainWriter::recovery`]), then appends a `log_open` record.
    pub fn open(dir: &Path, opts: WriterOptions) -> Result<ChainWriter, AuditError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuditError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let segments = list_segments(dir).map_err(io(dir))?;
        let mut recovery = Recovery::default();
        let mut w = match segments.last() {
            None => {
                let path = dir.join(segment_file_name(1));
                let file = create_segment(dir, &path)?;
                let mut w = Self::with_file(dir, opts, file, 1, 0, 0, ZERO_HASH);
                w.write_head()?;
                w
            }
            Some((segment, path)) => {
                let mut f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io(path))?;
                let len = f.metadata().map_err(io(path))?.len();
                let (complete, last) = last_line(&mut f, len).map_err(io(path))?;
                if complete < len {
                    recovery.torn_bytes = len - complete;
                    recovery.torn_lines = 1;
                    tracing::warn!(
                        file = %path.display(),
                        bytes = len - complete,
                        "audit log: the last line was torn (no newline at its end: the process stopped mid-write); cut it off"
                    );
                    f.set_len(complete).map_err(io(path))?;
                    f.sync_all().map_err(io(path))?;
                }
                f.seek(SeekFrom::End(0)).map_err(io(path))?;
                match last {
                    Some(line) => {
                        let (n, hash) = check_last(path, &line)?;
                        Self::with_file(dir, opts, f, *segment, complete, n + 1, hash)
                    }
                    None => {
                        // Nothing complete in the newest segment (it was created, then the
                        // process stopped): continue from the segment before and write
                        // this one's head again.
                        let (next_n, hash) = match segments.len().checked_sub(2) {
                            Some(i) => {
                                let prev = &segments[i].1;
                                let mut pf = File::open(prev).map_err(io(prev))?;
                                let plen = pf.metadata().map_err(io(prev))?.len();
                                match last_line(&mut pf, plen).map_err(io(prev))? {
                                    (c, Some(line)) if c == plen => {
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
                        let mut w = Self::with_file(dir, opts, f, *segment, 0, next_n, hash);
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
        w.append_unchecked(crate::risk::unix_now_ns(), LOG_OPEN, &fields)?;
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
        if self.segment_len >= self.opts.segment_bytes {
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
        let path = self.segment_path();
        self.file
            .write_all(line.as_bytes())
            .map_err(|source| AuditError::Io { path, source })?;
        self.segment_len += line.len() as u64;
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

    /// Closes the current segment (synced) and starts the next one with its head.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.sync()?;
        let next = self.segment + 1;
        let path = self.dir.join(segment_file_name(next));
        let file = create_segment(&self.dir, &path)?;
        self.file = BufWriter::with_capacity(64 * 1024, file);
        self.segment = next;
        self.segment_len = 0;
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

/// Creates a new segment file and syncs the directory entry.
fn create_segment(dir: &Path, path: &Path) -> Result<File, AuditError> {
    let io = |p: &Path| {
        let path = p.to_path_buf();
        move |source| AuditError::Io { path, source }
    };
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(path)
        .map_err(io(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(file)
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
