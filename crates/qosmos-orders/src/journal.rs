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
//!
//! **Preallocated.** The file is extended [`PREALLOCATE`] bytes at a time with zeros, and
//! the lines are written over the zeros. A sync then writes the new lines only: appending
//! past the end of the file changed its size, so every `fdatasync` also wrote the inode
//! (on ext4 one more synchronous write per sync). The data ends at the first NUL byte
//! (a line never holds one: JSON escapes it); what follows the last complete line before it
//! (a line cut off by a crash, or lines written after a hole that was never written back,
//! none of them synced) is zeroed when the file is opened. An older qosmos opening such a
//! file takes the zeros for a cut-off line and truncates them, which is harmless.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::id::OrderId;
use crate::model::AckOutcome;

/// The journal's file name inside the agent's data directory.
pub const FILE_NAME: &str = "handled.jsonl";

/// How far the file is extended with zeros at a time (about 18,000 orders' lines).
pub const PREALLOCATE: u64 = 1 << 20;

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
    /// Where the data ends (the next line goes here).
    end: u64,
    /// The file's size: zeros from `end` to here.
    allocated: u64,
    /// Lines appended but not yet written to the file.
    pending: Vec<u8>,
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
            .write(true)
            .create(true)
            .truncate(false)
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
        // The data ends at the first NUL (the preallocated zeros) and its last complete line.
        let data = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        let complete = text[..data]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        if let Some(last) = text.iter().rposition(|&b| b != 0)
            && last >= complete
        {
            tracing::warn!(path = %path.display(), bytes = last + 1 - complete,
                "dropping a journal line cut off by a crash");
            file.write_all_at(&vec![0; last + 1 - complete], complete as u64)?;
            file.sync_data()?;
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
            end: complete as u64,
            allocated: text.len() as u64,
            pending: Vec::new(),
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

    /// Appends `h` for `id` in memory: [`Journal::write_out`] puts it in the file (from
    /// then on it survives the death of the process: it is in the kernel's page cache),
    /// [`Journal::sync`] on disk.
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
        serde_json::to_writer(&mut self.pending, &line).map_err(io::Error::other)?;
        self.pending.push(b'\n');
        self.entries.insert(id.clone(), h);
        Ok(())
    }

    /// Writes the lines appended since the last call to the file (one write), first
    /// extending the file with zeros when they would not fit.
    ///
    /// # Errors
    ///
    /// I/O errors; then nothing may be assumed recorded.
    pub fn write_out(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let need = self.end + self.pending.len() as u64;
        if need > self.allocated {
            let size = need.div_ceil(PREALLOCATE) * PREALLOCATE;
            let zeros = usize::try_from(size - self.allocated).map_err(io::Error::other)?;
            self.file.write_all_at(&vec![0; zeros], self.allocated)?;
            self.allocated = size;
        }
        self.file.write_all_at(&self.pending, self.end)?;
        self.end = need;
        self.pending.clear();
        Ok(())
    }

    /// Syncs what was appended to disk.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub fn sync(&mut self) -> io::Result<()> {
        self.write_out()?;
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
        // A crash mid-write leaves half a line where the data ends.
        let path = dir.path().join(FILE_NAME);
        write_at_data_end(&path, br#"{"order_id":"C","sta"#);
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

    /// Writes `bytes` over the zeros, where the next line would go.
    fn write_at_data_end(path: &Path, bytes: &[u8]) {
        let text = std::fs::read(path).expect("read");
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        let f = OpenOptions::new().write(true).open(path).expect("open");
        f.write_all_at(bytes, end as u64).expect("write");
    }

    fn done() -> Handled {
        Handled::Done {
            status: AckOutcome::Accepted,
            reason: None,
        }
    }

    #[test]
    fn the_file_is_preallocated_so_a_sync_does_not_change_its_size() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(FILE_NAME);
        let mut j = Journal::open(dir.path()).expect("open");
        j.record(&OrderId::from_string("A".into()), done())
            .expect("record");
        let size = std::fs::metadata(&path).expect("stat").len();
        assert_eq!(size, PREALLOCATE);
        for i in 0..100 {
            j.record(&OrderId::from_string(format!("B{i}")), done())
                .expect("record");
        }
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), size);
        // Past the preallocated bytes, the file grows by another chunk.
        let long = "x".repeat(usize::try_from(PREALLOCATE).expect("fits"));
        j.record(
            &OrderId::from_string("C".into()),
            Handled::Done {
                status: AckOutcome::Rejected,
                reason: Some(long.clone()),
            },
        )
        .expect("record");
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            2 * PREALLOCATE
        );
        drop(j);
        let j = Journal::open(dir.path()).expect("reopen");
        assert_eq!(j.len(), 102);
        assert_eq!(
            j.get(&OrderId::from_string("C".into())),
            Some(&Handled::Done {
                status: AckOutcome::Rejected,
                reason: Some(long)
            })
        );
    }

    #[test]
    fn lines_after_a_hole_were_never_synced_and_are_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(FILE_NAME);
        let mut j = Journal::open(dir.path()).expect("open");
        j.record(&OrderId::from_string("A".into()), done())
            .expect("record");
        drop(j);
        // A crash before the sync wrote back a later page but not the one before it.
        let text = std::fs::read(&path).expect("read");
        let end = text.iter().position(|&b| b == 0).expect("zeros");
        let f = OpenOptions::new().write(true).open(&path).expect("open");
        f.write_all_at(
            b"{\"order_id\":\"Z\",\"status\":\"accepted\"}\n",
            (end + 100) as u64,
        )
        .expect("write");
        drop(f);
        let mut j = Journal::open(dir.path()).expect("reopen");
        assert_eq!(j.len(), 1);
        assert!(j.get(&OrderId::from_string("Z".into())).is_none());
        // The leftovers were zeroed: what is written next is all that follows A.
        j.record(&OrderId::from_string("B".into()), done())
            .expect("record");
        drop(j);
        let text = std::fs::read(&path).expect("read");
        let data: Vec<u8> = text.into_iter().filter(|&b| b != 0).collect();
        assert_eq!(
            String::from_utf8(data).expect("utf-8"),
            "{\"order_id\":\"A\",\"status\":\"accepted\"}\n{\"order_id\":\"B\",\"status\":\"accepted\"}\n"
        );
    }

    #[test]
    fn a_journal_written_by_an_older_build_is_read_and_continued() {
        // Before preallocation: lines up to the end of the file, the last one possibly cut.
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(FILE_NAME);
        std::fs::write(
            &path,
            "{\"order_id\":\"A\",\"status\":\"accepted\"}\n{\"order_id\":\"B\",\"st",
        )
        .expect("write");
        let mut j = Journal::open(dir.path()).expect("open");
        assert_eq!(j.len(), 1);
        j.record(&OrderId::from_string("C".into()), done())
            .expect("record");
        drop(j);
        let j = Journal::open(dir.path()).expect("reopen");
        assert_eq!(j.len(), 2);
        assert!(j.get(&OrderId::from_string("C".into())).is_some());
    }

    #[test]
    fn refuses_a_corrupt_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(FILE_NAME), "garbage\n").expect("write");
        let e = Journal::open(dir.path()).expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
