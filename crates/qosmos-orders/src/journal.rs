//! The store agent's memory of what it handled: an append-only file, `handled.jsonl`.
//!
//! One JSON line per step, `{"order_id", "status", "reason"?}`, each written and synced to
//! disk (`fdatasync`) before the agent goes on, so that what the file says survives a
//! SIGKILL or a power cut. `status` is `started` (an `--exec` command is about to run),
//! `accepted` or `rejected` (the outcome, the ack the agent sends). The last line for an
//! id wins. A line cut off by a crash mid-write is dropped when the file is opened: it was
//! never synced, so nothing was done on its account.
//!
//! The file grows by one or two short lines per order and is never compacted (yet).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::id::OrderId;
use crate::model::AckOutcome;

/// The journal's file name inside the agent's data directory.
pub const FILE_NAME: &str = "handled.jsonl";

/// What the journal knows about one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// An `--exec` command was started for it and its outcome was not recorded: the agent
    /// stopped while it ran. Whether it did its work is unknown.
    Started,
    /// Handled, with this outcome (the ack sent for it).
    Done {
        /// Accepted or rejected.
        status: AckOutcome,
        /// The reason given with it.
        reason: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Line {
    order_id: OrderId,
    status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// The append-only record of handled orders. One process per file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    entries: HashMap<OrderId, Handled>,
}

impl Journal {
    /// Opens (creating) `dir/handled.jsonl` and reads it.
    ///
    /// # Errors
    ///
    /// I/O errors, and `InvalidData` for a line that is not a journal line (other than a
    /// cut-off last line): the agent refuses to guess what it handled.
    pub fn open(dir: &Path) -> io::Result<Journal> {
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        // Two agents on one journal would each think the other's orders new. The lock is
        // the operating system's: it goes with the process, even on SIGKILL.
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is in use by another qosmos store agent; stop it or choose another \
                         --data-dir",
                        path.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        if !existed || created_dir {
            // The new file's directory entry must be durable too.
            File::open(dir)?.sync_all()?;
        }
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            tracing::warn!(path = %path.display(), bytes = text.len() - complete,
                "dropping a journal line cut off by a crash");
            file.set_len(complete as u64)?;
            file.sync_all()?;
            file.seek(SeekFrom::End(0))?;
        }
        let mut entries = HashMap::new();
        for (n, line) in text[..complete].split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let bad = |what: String| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} line {}: {what}", path.display(), n + 1),
                )
            };
            let l: Line = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
            let h = match l.status.as_str() {
                "started" => Handled::Started,
                "accepted" => Handled::Done {
                    status: AckOutcome::Accepted,
                    reason: l.reason,
                },
                "rejected" => Handled::Done {
                    status: AckOutcome::Rejected,
                    reason: l.reason,
                },
                other => return Err(bad(format!("unknown status {other:?}"))),
            };
            entries.insert(l.order_id, h);
        }
        Ok(Journal {
            path,
            file,
            entries,
        })
    }

    /// What is recorded for `id`.
    pub fn get(&self, id: &OrderId) -> Option<&Handled> {
        self.entries.get(id)
    }

    /// How many orders the journal knows.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the journal knows no order.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `h` for `id` and syncs it to disk before returning.
    ///
    /// # Errors
    ///
    /// I/O errors; then nothing may be assumed recorded.
    pub fn record(&mut self, id: &OrderId, h: Handled) -> io::Result<()> {
        self.append(id, h)?;
        self.sync()
    }

    /// Appends `h` for `id` without syncing: once this returns, the line survives the death
    /// of the process (it is in the kernel's page cache) but not a power cut until
    /// [`Journal::sync`] returns.
    ///
    /// # Errors
    ///
    /// I/O errors; then nothing may be assumed recorded.
    pub fn append(&mut self, id: &OrderId, h: Handled) -> io::Result<()> {
        let line = match &h {
            Handled::Started => Line {
                order_id: id.clone(),
                status: "started".into(),
                reason: None,
            },
            Handled::Done { status, reason } => Line {
                order_id: id.clone(),
                status: match status {
                    AckOutcome::Accepted => "accepted".into(),
                    AckOutcome::Rejected => "rejected".into(),
                },
                reason: reason.clone(),
            },
        };
        let mut bytes = serde_json::to_vec(&line).map_err(io::Error::other)?;
        bytes.push(b'\n');
        self.file.write_all(&bytes)?;
        self.entries.insert(id.clone(), h);
        Ok(())
    }

    /// Syncs what was appended to disk.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_in_use_is_refused_until_its_holder_closes_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = Journal::open(dir.path()).expect("open");
        let err = Journal::open(dir.path()).expect_err("in use");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(err.to_string().contains("in use by another"), "{err}");
        drop(first);
        Journal::open(dir.path()).expect("free again");
    }

    #[test]
    fn survives_reopen_and_a_torn_tail() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = OrderId::from_string("A".into());
        let b = OrderId::from_string("B".into());
        {
            let mut j = Journal::open(dir.path()).expect("open");
            assert!(j.is_empty());
            j.record(&a, Handled::Started).expect("record");
            j.record(
                &a,
                Handled::Done {
                    status: AckOutcome::Rejected,
                    reason: Some("no stock".into()),
                },
            )
            .expect("record");
            j.record(&b, Handled::Started).expect("record");
        }
        // A crash mid-write leaves half a line.
        let path = dir.path().join(FILE_NAME);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(br#"{"order_id":"C","sta"#).expect("write");
        drop(f);
        let mut j = Journal::open(dir.path()).expect("reopen");
        assert_eq!(
            j.get(&a),
            Some(&Handled::Done {
                status: AckOutcome::Rejected,
                reason: Some("no stock".into())
            })
        );
        assert_eq!(j.get(&b), Some(&Handled::Started));
        assert_eq!(j.len(), 2);
        let c = OrderId::from_string("C".into());
        j.record(
            &c,
            Handled::Done {
                status: AckOutcome::Accepted,
                reason: None,
            },
        )
        .expect("record");
        drop(j);
        let j = Journal::open(dir.path()).expect("reopen");
        assert_eq!(j.len(), 3);
    }

    #[test]
    fn refuses_a_corrupt_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(FILE_NAME), "garbage\n").expect("write");
        let e = Journal::open(dir.path()).expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
