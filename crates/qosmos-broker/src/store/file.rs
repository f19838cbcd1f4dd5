//! The log file on disk: header, record frames, recovery of the valid prefix (trailing zeros
//! are the space kept ahead of the records, a torn tail is zeroed), and atomic replacement
//! (temporary file with its own space ahead, sync, rename, sync directory).

use super::error::StoreError;
use super::grow::{round_up, write_zeros};
use super::wal::Recovered;
use bytes::Bytes;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The first bytes of every log file.
pub const MAGIC: &[u8; 9] = b"QOSMOSWAL";
/// The log format this build writes. Version 2 added the packed records
/// ([`Record::SessionOps`](super::Record::SessionOps), [`Record::Composite`](super::Record::Composite));
/// a version 1 log (a subset of it) is still read, and rewritten as version 2 when opened.
/// The zeros kept after the records (see the `wal` module docs) did not change it: an older
/// version 2 reader takes them for a torn tail and truncates them, losing nothing.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest log format this build reads.
const OLDEST_FORMAT_VERSION: u32 = 1;
/// The size of the file header: magic, version, generation.
pub const HEADER_LEN: usize = MAGIC.len() + 4 + 8;
/// The largest record accepted: an MQTT packet of the maximum size plus room for the
/// record's own fields.
pub const MAX_RECORD_LEN: usize = 268_435_460 + 64 * 1024;

pub(crate) const FRAME_HEADER_LEN: usize = 8;
/// The log's file name in the data directory.
pub const LOG_FILE: &str = "wal.log";
/// The file a compaction writes before renaming it over [`LOG_FILE`]; removed at open.
pub const TMP_FILE: &str = "wal.log.tmp";
/// The file whose exclusive lock marks the data directory as in use by a process.
pub const LOCK_FILE: &str = "LOCK";

/// Appends one framed record to `buf`.
pub(crate) fn put_frame(buf: &mut Vec<u8>, payload: &[u8]) -> Result<(), StoreError> {
    let len = frame_len(payload)?;
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&frame_crc(len, payload).to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(())
}

/// Fills in the frame header at the start of `frame`, whose payload follows it (written after
/// [`FRAME_HEADER_LEN`] placeholder bytes): the same bytes as [`put_frame`], without a copy.
pub(crate) fn frame_in_place(frame: &mut [u8]) -> Result<(), StoreError> {
    let Some((head, payload)) = frame.split_at_mut_checked(FRAME_HEADER_LEN) else {
        return Err(StoreError::Failed {
            reason: "a frame without room for its header".into(),
        });
    };
    let len = frame_len(payload)?;
    head[..4].copy_from_slice(&len);
    head[4..].copy_from_slice(&frame_crc(len, payload).to_le_bytes());
    Ok(())
}

/// A frame's length field, refusing a payload over [`MAX_RECORD_LEN`].
fn frame_len(payload: &[u8]) -> Result<[u8; 4], StoreError> {
    u32::try_from(payload.len())
        .ok()
        .filter(|&l| l as usize <= MAX_RECORD_LEN)
        .map(u32::to_le_bytes)
        .ok_or(StoreError::RecordTooLarge {
            len: payload.len(),
            max: MAX_RECORD_LEN,
        })
}

pub(crate) fn frame_crc(len: [u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(payload);
    h.finalize()
}

pub(crate) fn header(generation: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..MAGIC.len()].copy_from_slice(MAGIC);
    h[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[MAGIC.len() + 4..].copy_from_slice(&generation.to_le_bytes());
    h
}

/// Reads the header: the generation and format version, or why the file is not ours.
pub(crate) fn read_header(path: &Path, data: &[u8]) -> Result<(u64, u32), StoreError> {
    let refuse = |found: String| StoreError::IncompatibleVersion {
        found,
        expected: FORMAT_VERSION,
        path: path.to_path_buf(),
    };
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        let head: Vec<String> = data.iter().take(9).map(|b| format!("{b:02x}")).collect();
        return Err(refuse(format!(
            "a file that is not a qosmos write-ahead log (first bytes: [{}])",
            head.join(" ")
        )));
    }
    let Some(rest) = data.get(MAGIC.len()..HEADER_LEN) else {
        return Err(refuse("a write-ahead log with a truncated header".into()));
    };
    let mut version = [0u8; 4];
    version.copy_from_slice(&rest[..4]);
    let version = u32::from_le_bytes(version);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(refuse(format!("write-ahead log format version {version}")));
    }
    let mut generation = [0u8; 8];
    generation.copy_from_slice(&rest[4..]);
    Ok((u64::from_le_bytes(generation), version))
}

/// A frame's header, `[len: u32 LE][crc: u32 LE]`, as read (recovery and compaction both).
struct FrameHeader {
    len: [u8; 4],
    payload_len: usize,
    crc: u32,
}

impl FrameHeader {
    /// The header at the start of `head` (at least [`FRAME_HEADER_LEN`] bytes); `None` for a
    /// length over [`MAX_RECORD_LEN`], which no writer of ours produces.
    fn parse(head: &[u8]) -> Option<FrameHeader> {
        let mut len = [0u8; 4];
        len.copy_from_slice(head.get(..4)?);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(head.get(4..FRAME_HEADER_LEN)?);
        let payload_len = u32::from_le_bytes(len) as usize;
        (payload_len <= MAX_RECORD_LEN).then_some(FrameHeader {
            len,
            payload_len,
            crc: u32::from_le_bytes(crc),
        })
    }

    /// Whether `payload` is the one this header's checksum covers.
    fn checks(&self, payload: &[u8]) -> bool {
        frame_crc(self.len, payload) == self.crc
    }
}

/// Splits the records after the header; returns them and the length of the valid prefix.
pub(crate) fn parse_records(data: &Bytes) -> (Vec<Bytes>, usize) {
    let mut records = Vec::new();
    let mut pos = HEADER_LEN;
    while let Some(head) = data.get(pos..pos + FRAME_HEADER_LEN) {
        let Some(frame) = FrameHeader::parse(head) else {
            break;
        };
        let n = frame.payload_len;
        let start = pos + FRAME_HEADER_LEN;
        let Some(payload) = data.get(start..start + n) else {
            break;
        };
        if !frame.checks(payload) {
            break;
        }
        records.push(data.slice(start..start + n));
        pos = start + n;
    }
    (records, pos)
}

/// Reads the records of the log `file` back, in order, from its header up to `end`, handing
/// each to `each`: what a compaction replays. `end` is a length the writer committed, so
/// every frame below it was written whole and checks out; one that does not is an error (the
/// compaction is then abandoned and the log stays), not a tail to cut. Reads through a buffer
/// with positioned reads, so the writer may go on appending past `end` meanwhile, and memory
/// holds one record at a time, not the log.
pub(crate) fn read_back(
    file: &File,
    path: &Path,
    end: u64,
    mut each: impl FnMut(Bytes) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    /// `file` from `pos` to `end` as a reader.
    struct Range<'a> {
        file: &'a File,
        pos: u64,
        end: u64,
    }
    impl Read for Range<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let want = self.end.saturating_sub(self.pos).min(buf.len() as u64) as usize;
            if want == 0 {
                return Ok(0);
            }
            let n = self.file.read_at(&mut buf[..want], self.pos)?;
            self.pos += n as u64;
            Ok(n)
        }
    }
    let read_err = |e| StoreError::io("read back", path, e);
    let mut r = BufReader::with_capacity(1 << 20, Range { file, pos: 0, end });
    let mut head = [0u8; HEADER_LEN];
    r.read_exact(&mut head).map_err(read_err)?;
    read_header(path, &head)?;
    let mut pos = HEADER_LEN as u64;
    while pos < end {
        let mut head = [0u8; FRAME_HEADER_LEN];
        r.read_exact(&mut head).map_err(read_err)?;
        let bad = || StoreError::Failed {
            reason: format!(
                "the record at byte {pos} of {} does not check out on reading it back",
                path.display()
            ),
        };
        let frame = FrameHeader::parse(&head).ok_or_else(bad)?;
        let n = frame.payload_len;
        let mut payload = vec![0u8; n];
        r.read_exact(&mut payload).map_err(read_err)?;
        if !frame.checks(&payload) {
            return Err(bad());
        }
        each(Bytes::from(payload))?;
        pos += (FRAME_HEADER_LEN + n) as u64;
    }
    Ok(())
}

/// An open log: the file, where its records end (the next commit goes there), and its
/// length (records, then zeros written and synced).
pub(crate) struct OpenLog {
    pub(crate) file: File,
    pub(crate) end: u64,
    pub(crate) file_len: u64,
}

/// Reads the log at `path`, zeroes a torn tail, and opens it for writing. `ahead` is the space
/// a rewritten (upgraded) log gets ahead of its records.
pub(crate) fn recover(path: &Path, ahead: u64) -> Result<(OpenLog, Recovered), StoreError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::io("open", path, e))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .map_err(|e| StoreError::io("read", path, e))?;
    let (generation, version) = read_header(path, &data)?;
    let data = Bytes::from(data);
    let (records, good) = parse_records(&data);
    // Zeros from the end of the records to the end of the file are the space written ahead
    // of the log (or never used), not a tail: the tail is what is not zero.
    let torn_end = data[good..]
        .iter()
        .rposition(|&b| b != 0)
        .map_or(good, |last| good + last + 1);
    let truncated = (torn_end - good) as u64;
    if truncated > 0 {
        tracing::warn!(
            path = %path.display(),
            valid_bytes = good,
            truncated_bytes = truncated,
            records = records.len(),
            "the write-ahead log ends in a torn or corrupt tail; cutting it off (zeroing it)"
        );
        // Zeroed, not truncated: the space stays ahead of the log. It must be zero before a
        // commit lands there, or a stale frame after the torn point could be read as a record
        // once new records end exactly where it starts.
        write_zeros(&file, good as u64, torn_end as u64)
            .map_err(|e| StoreError::io("write", path, e))?;
        file.sync_data()
            .map_err(|e| StoreError::io("sync", path, e))?;
    }
    let mut log = OpenLog {
        file,
        end: good as u64,
        file_len: data.len() as u64,
    };
    if version != FORMAT_VERSION {
        // An older format: its records are ours too; rewrite the header (atomically, as a
        // compaction would) so that an older build refuses the records this one will add.
        let dir = path.parent().unwrap_or(Path::new("."));
        tracing::info!(
            path = %path.display(),
            from = version,
            to = FORMAT_VERSION,
            "upgrading the write-ahead log format"
        );
        log = write_new_log(dir, generation, &data[HEADER_LEN..good], ahead)?;
    }
    let recovered = Recovered {
        records,
        truncated_bytes: truncated,
        generation,
    };
    Ok((log, recovered))
}

/// Writes a header and `body` to the temporary file, then zeros for at least `ahead` bytes
/// more, and syncs it. The caller renames it into place.
pub(crate) fn write_tmp_log(
    dir: &Path,
    generation: u64,
    body: &[u8],
    ahead: u64,
) -> Result<OpenLog, StoreError> {
    let tmp = dir.join(TMP_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&tmp)
        .map_err(|e| StoreError::io("create", &tmp, e))?;
    let mut head = Vec::with_capacity(HEADER_LEN + body.len());
    head.extend_from_slice(&header(generation));
    head.extend_from_slice(body);
    file.write_all(&head)
        .map_err(|e| StoreError::io("write", &tmp, e))?;
    let end = head.len() as u64;
    let file_len = round_up(end.saturating_add(ahead));
    write_zeros(&file, end, file_len).map_err(|e| StoreError::io("write", &tmp, e))?;
    file.sync_all()
        .map_err(|e| StoreError::io("sync", &tmp, e))?;
    Ok(OpenLog {
        file,
        end,
        file_len,
    })
}

/// Renames the temporary file over the log and syncs the directory so the rename is durable.
pub(crate) fn install_tmp_log(dir: &Path) -> Result<(), StoreError> {
    let tmp = dir.join(TMP_FILE);
    let log = dir.join(LOG_FILE);
    fs::rename(&tmp, &log).map_err(|e| StoreError::io("rename", &tmp, e))?;
    sync_dir(dir)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("sync directory", dir, e))
}

/// Creates a log holding `body` and `ahead` bytes of zeros atomically (temporary file, sync,
/// rename, sync directory).
pub(crate) fn write_new_log(
    dir: &Path,
    generation: u64,
    body: &[u8],
    ahead: u64,
) -> Result<OpenLog, StoreError> {
    let log = write_tmp_log(dir, generation, body, ahead)?;
    install_tmp_log(dir)?;
    Ok(log)
}
