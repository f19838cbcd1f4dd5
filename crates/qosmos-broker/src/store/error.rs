//! The store's error type.

use std::io;
use std::path::{Path, PathBuf};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "sync".
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The data directory holds a log this build cannot read.
    #[error(
        "{} holds {found}, but this qosmos reads write-ahead log format version {expected}. \
         Run the qosmos release that wrote it, or move the data directory away to start with \
         empty state",
        path.display()
    )]
    IncompatibleVersion {
        /// What the header says, in words.
        found: String,
        /// The format version this build reads.
        expected: u32,
        /// The log file.
        path: PathBuf,
    },
    /// Another [`Wal`](super::Wal), in this process or another, has the data directory open.
    #[error(
        "the data directory {} is in use by another qosmos (its LOCK file is locked); \
         stop that one or choose another --data-dir",
        path.display()
    )]
    Locked {
        /// The data directory.
        path: PathBuf,
    },
    /// The log was closed before the operation completed.
    #[error("the write-ahead log is closed")]
    Closed,
    /// A record is larger than [`MAX_RECORD_LEN`](super::wal::MAX_RECORD_LEN).
    #[error("a record of {len} bytes exceeds the limit of {max}")]
    RecordTooLarge {
        /// The record's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An earlier write or sync failed; after a failed sync the state of the file is unknown,
    /// so the log accepts nothing more. Reopening recovers the synced prefix.
    #[error("the write-ahead log stopped after an earlier failure ({reason}); restart to recover")]
    Failed {
        /// The earlier error.
        reason: String,
    },
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A copy for another waiter of the same failed commit.
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Io { op, path, source } => StoreError::Io {
                op,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            StoreError::IncompatibleVersion {
                found,
                expected,
                path,
            } => StoreError::IncompatibleVersion {
                found: found.clone(),
                expected: *expected,
                path: path.clone(),
            },
            StoreError::Locked { path } => StoreError::Locked { path: path.clone() },
            StoreError::Closed => StoreError::Closed,
            StoreError::RecordTooLarge { len, max } => StoreError::RecordTooLarge {
                len: *len,
                max: *max,
            },
            StoreError::Failed { reason } => StoreError::Failed {
                reason: reason.clone(),
            },
        }
    }
}
