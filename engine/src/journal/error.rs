//! The journal's errors.

use std::path::PathBuf;

/// What went wrong in the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A file operation failed.
    #[error("journal I/O error: {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A segment holds a bad frame that is not a torn last record: start-up must stop.
    #[error(
        "journal segment {} is corrupt at byte offset {offset}: {what}; refusing to start (restore the segment or move it aside)",
        file.display()
    )]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte offset of the bad frame in the file.
        offset: u64,
        /// What is wrong with it.
        what: String,
    },
    /// Another process (or another `Journal` in this one) has the directory open.
    #[error("journal directory {} is in use by another journal (lock file {} is held)", dir.display(), dir.join(super::LOCK_FILE).display())]
    Locked {
        /// The journal directory.
        dir: PathBuf,
    },
    /// The configuration cannot be used.
    #[error("journal configuration: {0}")]
    Config(String),
    /// A lane name is not `[a-z]+` (at most 32 letters), or is reserved.
    #[error(
        "journal lane name {0:?} is not allowed: lane names are 1 to 32 letters a-z, and `base` is reserved for compaction"
    )]
    BadLane(String),
    /// A lane's writer was already taken.
    #[error("journal lane {0:?} already has a writer")]
    LaneTaken(&'static str),
    /// A record does not fit in one segment.
    #[error("journal record of {frame} bytes does not fit in a segment of {segment_bytes} bytes")]
    TooLarge {
        /// Frame size (header, payload, padding).
        frame: u64,
        /// Configured segment size.
        segment_bytes: u64,
    },
    /// A record could not be encoded (cannot happen with the record types of this module).
    #[error("journal record of kind {0} could not be encoded")]
    Encode(u8),
    /// `compact` was called after a lane writer was taken.
    #[error("journal compaction runs at start-up only, before any lane writer is taken")]
    CompactAfterWriters,
    /// A sealed segment's key could not be made or opened (no `[at_rest]` KEK, another
    /// KEK, the KEK unreachable, a damaged key frame).
    #[error("journal segment {}: {source}", file.display())]
    Seal {
        /// The segment file.
        file: PathBuf,
        /// What went wrong.
        #[source]
        source: crate::atrest::SealError,
    },
    /// The journal was shut down.
    #[error("the journal is shut down")]
    Closed,
}

impl JournalError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        JournalError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
