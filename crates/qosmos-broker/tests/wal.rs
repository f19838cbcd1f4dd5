//! The write-ahead log against its file: round trips, torn and corrupt tails, refused formats,
//! compaction, and group commit.
#![allow(clippy::unwrap_used, missing_docs)]

use bytes::Bytes;
use qosmos_broker::store::wal::{FORMAT_VERSION, HEADER_LEN, LOG_FILE, MAGIC, TMP_FILE};
use qosmos_broker::store::{
    DurableState, FsyncPolicy, Record, Snapshotter, StoreError, Wal, WalConfig,
};
use qosmos_mqtt::{PacketId, Publish, QoS, SubscriptionOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn rec(i: usize) -> Bytes {
    // Sizes vary so frames do not line up on any boundary.
    Bytes::from(format!("record {i} {}", "x".repeat(i % 17)))
}

fn open(dir: &Path) -> (Wal, qosmos_broker::store::Recovered) {
    Wal::open(WalConfig::new(dir)).unwrap()
}

fn log_path(dir: &Path) -> std::path::PathBuf {
    dir.join(LOG_FILE)
}

/// How many bytes of `tail` recovery counts as torn: up to its last non-zero byte (zeros
/// after it are indistinguishable from the space kept ahead of the log).
fn torn_len(tail: &[u8]) -> u64 {
    tail.iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1)
}

/// The log's bytes up to `len` (its logical end), after checking that the file goes on past
/// it with zeros only: the space written ahead of the records.
fn logical_bytes(dir: &Path, len: u64) -> Vec<u8> {
    let mut bytes = std::fs::read(log_path(dir)).unwrap();
    let len = usize::try_from(len).unwrap();
    assert!(bytes.len() >= len, "file of {} < log of {len}", bytes.len());
    assert!(
        bytes[len..].iter().all(|&b| b == 0),
        "the file after the log's end is not all zeros"
    );
    bytes.truncate(len);
    bytes
}

#[test]
fn records_survive_reopen_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, recovered) = open(dir.path());
    assert!(recovered.records.is_empty());
    assert_eq!(recovered.generation, 1);
    assert_eq!(wal.len_bytes(), HEADER_LEN as u64);
    for i in 0..10 {
        wal.append_blocking(vec![rec(i)]).unwrap();
    }
    wal.append_blocking(vec![rec(10), rec(11), Bytes::new()])
        .unwrap();
    let len = wal.len_bytes();
    let file_len = std::fs::metadata(log_path(dir.path())).unwrap().len();
    assert!(
        file_len > len,
        "space is kept ahead: file {file_len}, log {len}"
    );
    logical_bytes(dir.path(), len);
    drop(wal);

    let (wal, recovered) = open(dir.path());
    let mut expected: Vec<Bytes> = (0..12).map(rec).collect();
    expected.push(Bytes::new());
    assert_eq!(recovered.records, expected);
    assert_eq!(recovered.truncated_bytes, 0);
    assert_eq!(wal.len_bytes(), len);
    // Appending continues after the recovered records.
    wal.append_blocking(vec![rec(99)]).unwrap();
    drop(wal);
    let (_wal, recovered) = open(dir.path());
    assert_eq!(recovered.records.len(), 14);
    assert_eq!(recovered.records[13], rec(99));
}

/// Writes five records and returns the file's bytes and where the last record's frame starts.
fn five_records(dir: &Path) -> (Vec<u8>, usize) {
    let (wal, _) = open(dir);
    for i in 0..4 {
        wal.append_blocking(vec![rec(i)]).unwrap();
    }
    let before_last = wal.len_bytes() as usize;
    wal.append_blocking(vec![rec(4)]).unwrap();
    let len = wal.len_bytes();
    drop(wal);
    (logical_bytes(dir, len), before_last)
}

#[test]
fn a_torn_tail_at_every_offset_of_the_last_record_is_cut_off() {
    let src = tempfile::tempdir().unwrap();
    let (bytes, last_start) = five_records(src.path());
    let expected: Vec<Bytes> = (0..4).map(rec).collect();
    for cut in last_start..bytes.len() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(log_path(dir.path()), &bytes[..cut]).unwrap();
        let (wal, recovered) = open(dir.path());
        assert_eq!(recovered.records, expected, "cut at {cut}");
        assert_eq!(recovered.truncated_bytes, torn_len(&bytes[last_start..cut]));
        assert_eq!(wal.len_bytes(), last_start as u64);
        // The torn bytes are zeroed (the file keeps its length, as space ahead).
        assert_eq!(
            logical_bytes(dir.path(), last_start as u64),
            bytes[..last_start]
        );
        // The log goes on from the cut, and the next open finds no tail.
        wal.append_blocking(vec![rec(7)]).unwrap();
        drop(wal);
        let (_wal, again) = open(dir.path());
        assert_eq!(again.truncated_bytes, 0);
        assert_eq!(again.records.len(), 5);
        assert_eq!(again.records[4], rec(7));
    }
    // Every cut inside the earlier records keeps exactly the whole records before it.
    for cut in HEADER_LEN..last_start {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(log_path(dir.path()), &bytes[..cut]).unwrap();
        let (_wal, recovered) = open(dir.path());
        let n = recovered.records.len();
        assert_eq!(recovered.records[..], expected[..n], "cut at {cut}");
        assert!(recovered.truncated_bytes < 64);
    }
}

#[test]
fn a_flipped_bit_in_the_last_payload_is_caught_by_the_checksum() {
    let src = tempfile::tempdir().unwrap();
    let (bytes, last_start) = five_records(src.path());
    for at in last_start..bytes.len() {
        for bit in [0u8, 3, 7] {
            let dir = tempfile::tempdir().unwrap();
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 1 << bit;
            std::fs::write(log_path(dir.path()), &corrupt).unwrap();
            let (_wal, recovered) = open(dir.path());
            assert_eq!(recovered.records, (0..4).map(rec).collect::<Vec<_>>());
            assert_eq!(recovered.truncated_bytes, (bytes.len() - last_start) as u64);
        }
    }
}

#[test]
fn corruption_in_the_middle_drops_everything_after_it() {
    let src = tempfile::tempdir().unwrap();
    let (mut bytes, _) = five_records(src.path());
    // The payload of the second record.
    let second = HEADER_LEN + 8 + rec(0).len() + 8;
    bytes[second] ^= 0x40;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(log_path(dir.path()), &bytes).unwrap();
    let (_wal, recovered) = open(dir.path());
    assert_eq!(recovered.records, vec![rec(0)]);
    assert_eq!(
        recovered.truncated_bytes,
        (bytes.len() - (HEADER_LEN + 8 + rec(0).len())) as u64
    );
}

#[test]
fn zeroed_space_after_the_log_is_not_read_as_records() {
    let src = tempfile::tempdir().unwrap();
    let (mut bytes, _) = five_records(src.path());
    let len = bytes.len();
    bytes.extend_from_slice(&[0u8; 4096]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(log_path(dir.path()), &bytes).unwrap();
    let (wal, recovered) = open(dir.path());
    assert_eq!(recovered.records.len(), 5);
    // Zeros to the end of the file are space ahead of the log, not a torn tail.
    assert_eq!(recovered.truncated_bytes, 0);
    assert_eq!(wal.len_bytes(), len as u64);
    assert_eq!(logical_bytes(dir.path(), len as u64), bytes[..len]);
    // The next record goes over the zeros, right after the last one.
    wal.append_blocking(vec![rec(5)]).unwrap();
    drop(wal);
    let (_wal, recovered) = open(dir.path());
    assert_eq!(recovered.records.len(), 6);
    assert_eq!(recovered.records[5], rec(5));
    assert_eq!(recovered.truncated_bytes, 0);
}

/// A torn tail is zeroed, not only skipped: a stale valid frame after the torn bytes must not
/// come back once new records end exactly where it starts.
#[test]
fn a_stale_frame_after_a_torn_tail_is_never_replayed() {
    let src = tempfile::tempdir().unwrap();
    let (bytes, _) = five_records(src.path());
    let stale = Bytes::from_static(b"a stale record from before the crash");
    let mut stale_frame = (stale.len() as u32).to_le_bytes().to_vec();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&stale_frame);
    crc.update(&stale);
    stale_frame.extend_from_slice(&crc.finalize().to_le_bytes());
    stale_frame.extend_from_slice(&stale);
    // What lies between the last good record and the stale frame: garbage, or garbage then
    // zeros (a page that reached the disk, one that did not), or zeros only.
    let next = rec(9);
    let gap = 8 + next.len();
    let mut garbage_then_zeros = vec![0xA5u8; gap / 2];
    garbage_then_zeros.resize(gap, 0);
    for (name, between) in [
        ("garbage", vec![0xA5u8; gap]),
        ("garbage then zeros", garbage_then_zeros),
        ("zeros", vec![0u8; gap]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut torn = bytes.clone();
        torn.extend_from_slice(&between);
        torn.extend_from_slice(&stale_frame);
        torn.extend_from_slice(&[0u8; 100]);
        std::fs::write(log_path(dir.path()), &torn).unwrap();
        let (wal, recovered) = open(dir.path());
        assert_eq!(recovered.records.len(), 5, "{name}");
        assert_eq!(
            recovered.truncated_bytes,
            (between.len() + stale_frame.len()) as u64,
            "{name}: everything up to the last non-zero byte is the torn tail"
        );
        assert_eq!(wal.len_bytes(), bytes.len() as u64);
        // A record whose frame ends exactly where the stale frame starts.
        wal.append_blocking(vec![next.clone()]).unwrap();
        assert_eq!(wal.len_bytes(), (bytes.len() + gap) as u64);
        drop(wal);
        let (_wal, recovered) = open(dir.path());
        let mut expected: Vec<Bytes> = (0..5).map(rec).collect();
        expected.push(next.clone());
        assert_eq!(
            recovered.records, expected,
            "{name}: the stale frame came back"
        );
        assert_eq!(recovered.truncated_bytes, 0, "{name}");
    }
}

/// The grower keeps space ahead as the log grows; a log reopened after several steps has every
/// record, no tail, and goes on where its records end.
#[test]
fn a_log_reopened_after_growing_goes_on_after_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    let big = |i: usize| Bytes::from(format!("{i:08} {}", "g".repeat(64 * 1024)));
    // 6 MiB: past the first steps (1, 2 and 4 MiB).
    for i in 0..96 {
        wal.append_blocking(vec![big(i)]).unwrap();
    }
    let stats = wal.stats();
    assert!(stats.grows >= 2, "{stats:?}");
    let len = wal.len_bytes();
    drop(wal);
    let file_len = std::fs::metadata(log_path(dir.path())).unwrap().len();
    assert!(file_len > len, "file {file_len}, log {len}");
    logical_bytes(dir.path(), len);

    let (wal, recovered) = open(dir.path());
    assert_eq!(recovered.truncated_bytes, 0);
    assert_eq!(recovered.records, (0..96).map(big).collect::<Vec<_>>());
    assert_eq!(wal.len_bytes(), len);
    wal.append_blocking(vec![rec(1)]).unwrap();
    let len = wal.len_bytes();
    drop(wal);
    logical_bytes(dir.path(), len);
    let (_wal, recovered) = open(dir.path());
    assert_eq!(recovered.records.len(), 97);
    assert_eq!(recovered.records[96], rec(1));
}

/// A log written without space ahead (by a build before it, or cut by one: an older build
/// reads a log with space ahead as records then a tail of zeros, and truncates the zeros) is
/// read whole, and gets space ahead from then on.
#[test]
fn a_log_without_space_ahead_opens_and_grows() {
    let src = tempfile::tempdir().unwrap();
    let (bytes, _) = five_records(src.path());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(log_path(dir.path()), &bytes).unwrap();
    let (wal, recovered) = open(dir.path());
    assert_eq!(recovered.records, (0..5).map(rec).collect::<Vec<_>>());
    assert_eq!(recovered.truncated_bytes, 0);
    wal.append_blocking(vec![rec(5)]).unwrap();
    let len = wal.len_bytes();
    assert_eq!(len as usize, bytes.len() + 8 + rec(5).len());
    drop(wal);
    // The grower was asked at open; it finished (or was stopped) by the close.
    logical_bytes(dir.path(), len);
    let (_wal, recovered) = open(dir.path());
    assert_eq!(recovered.records.len(), 6);
}

#[test]
fn a_log_of_another_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    header.extend_from_slice(&1u64.to_le_bytes());
    std::fs::write(log_path(dir.path()), &header).unwrap();
    let err = Wal::open(WalConfig::new(dir.path())).unwrap_err();
    match &err {
        StoreError::IncompatibleVersion {
            found,
            expected,
            path,
        } => {
            assert_eq!(*expected, FORMAT_VERSION);
            assert!(
                found.contains(&format!("version {}", FORMAT_VERSION + 1)),
                "{found}"
            );
            assert!(path.ends_with(LOG_FILE));
        }
        other => panic!("unexpected error {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("move the data directory away"),
        "{message}"
    );
    // The refused file is left as it was.
    assert_eq!(std::fs::read(log_path(dir.path())).unwrap(), header);
}

#[test]
fn a_file_that_is_not_a_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(log_path(dir.path()), b"SQLite format 3\0").unwrap();
    let err = Wal::open(WalConfig::new(dir.path())).unwrap_err();
    assert!(
        matches!(&err, StoreError::IncompatibleVersion { found, .. } if found.contains("not a qosmos")),
        "{err}"
    );
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    let err = Wal::open(WalConfig::new(dir.path())).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    // Through another spelling of the same path, too.
    let other = dir
        .path()
        .join(".")
        .join("..")
        .join(dir.path().file_name().unwrap());
    assert!(matches!(
        Wal::open(WalConfig::new(other)),
        Err(StoreError::Locked { .. })
    ));
    drop(wal);
    let (_wal, _) = open(dir.path());
}

#[test]
fn a_leftover_compaction_file_is_ignored_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    wal.append_blocking(vec![rec(1)]).unwrap();
    drop(wal);
    std::fs::write(dir.path().join(TMP_FILE), b"QOSMOSWAL half a compaction").unwrap();
    let (_wal, recovered) = open(dir.path());
    assert_eq!(recovered.records, vec![rec(1)]);
    assert!(!dir.path().join(TMP_FILE).exists());
}

#[test]
fn compaction_replaces_the_log_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    for i in 0..100 {
        wal.append_blocking(vec![rec(i)]).unwrap();
    }
    let before = wal.len_bytes();
    wal.compact_blocking(vec![Bytes::from_static(b"snapshot")])
        .unwrap();
    assert_eq!(wal.generation(), 2);
    assert_eq!(wal.stats().compactions, 1);
    assert!(wal.len_bytes() < before);
    // The new file has space ahead too.
    let file_len = std::fs::metadata(log_path(dir.path())).unwrap().len();
    assert!(file_len > wal.len_bytes(), "file {file_len}");
    logical_bytes(dir.path(), wal.len_bytes());
    wal.append_blocking(vec![rec(1000)]).unwrap();
    drop(wal);
    let (_wal, recovered) = open(dir.path());
    assert_eq!(
        recovered.records,
        vec![Bytes::from_static(b"snapshot"), rec(1000)]
    );
    assert_eq!(recovered.generation, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_the_records_appended_after_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    let wal = Arc::new(wal);
    for i in 0..50 {
        wal.append(vec![rec(i)]).await.unwrap();
    }
    // A large snapshot, so the compaction is still writing while the appends below commit to
    // the old log.
    let snapshot: Vec<Bytes> = (0..4000)
        .map(|i| Bytes::from(format!("live {i} {}", "s".repeat(500))))
        .collect();
    let compaction = wal.reserve().await.unwrap().compact(snapshot.clone());
    // Submitted after the compaction, in this order.
    let mut after = Vec::new();
    for i in 100..300 {
        let permit = wal.reserve().await.unwrap();
        after.push(permit.append(vec![rec(i)]));
    }
    for commit in after {
        commit.await.unwrap();
    }
    compaction.await.unwrap();
    for i in 300..310 {
        wal.append(vec![rec(i)]).await.unwrap();
    }
    assert_eq!(wal.generation(), 2);
    drop(wal);

    let (_wal, recovered) = open(dir.path());
    let mut expected = snapshot;
    expected.extend((100..310).map(rec));
    assert_eq!(recovered.records.len(), expected.len());
    assert_eq!(recovered.records, expected);
    assert_eq!(recovered.truncated_bytes, 0);
}

/// Keeps what it is given, and gives it back with a marker in front: a snapshot that shows
/// exactly which records the log read back.
struct Echo {
    seen: Vec<Bytes>,
    fail_at: Option<usize>,
}

impl Snapshotter for Echo {
    fn record(&mut self, record: Bytes) -> Result<(), StoreError> {
        if self.fail_at == Some(self.seen.len()) {
            return Err(StoreError::Failed {
                reason: "refused by the test".into(),
            });
        }
        self.seen.push(record);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Vec<Bytes>, StoreError> {
        let mut out = vec![Bytes::from_static(b"snapshot of")];
        out.extend(self.seen);
        Ok(out)
    }
}

/// A compaction from the log reads back exactly the records appended before it was submitted
/// (here, more than its read buffer holds), in order, while appends go on; the new log holds
/// its snapshot, then those later appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_from_the_log_reads_back_what_came_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    let big = |i: usize| Bytes::from(format!("before {i} {}", "b".repeat(700 + i % 13)));
    for chunk in (0..3000).collect::<Vec<_>>().chunks(100) {
        wal.append(chunk.iter().map(|&i| big(i)).collect())
            .await
            .unwrap();
    }
    assert!(wal.len_bytes() > 2 << 20, "past the 1 MiB read buffer");
    assert_eq!(wal.last_snapshot_bytes(), None);
    let compaction = wal
        .reserve()
        .await
        .unwrap()
        .compact_from_log(Box::new(Echo {
            seen: Vec::new(),
            fail_at: None,
        }));
    let mut after = Vec::new();
    for i in 100..300 {
        after.push(wal.reserve().await.unwrap().append(vec![rec(i)]));
    }
    for commit in after {
        commit.await.unwrap();
    }
    compaction.await.unwrap();
    assert_eq!(wal.generation(), 2);
    let snapshot_bytes: u64 = std::iter::once(11)
        .chain((0..3000).map(|i| big(i).len()))
        .map(|n| n as u64 + 8)
        .sum();
    assert_eq!(wal.last_snapshot_bytes(), Some(snapshot_bytes));
    drop(wal);

    let (_wal, recovered) = open(dir.path());
    let mut expected = vec![Bytes::from_static(b"snapshot of")];
    expected.extend((0..3000).map(big));
    expected.extend((100..300).map(rec));
    assert_eq!(recovered.records.len(), expected.len());
    assert!(
        recovered.records == expected,
        "snapshot, then the later appends"
    );
}

/// A snapshot that cannot be made (a record the replay refuses) abandons the compaction: the
/// old log stays in use, whole, and takes appends as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_compaction_from_the_log_keeps_the_old_log() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    for i in 0..20 {
        wal.append(vec![rec(i)]).await.unwrap();
    }
    let err = wal
        .reserve()
        .await
        .unwrap()
        .compact_from_log(Box::new(Echo {
            seen: Vec::new(),
            fail_at: Some(7),
        }))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refused by the test"), "{err}");
    assert!(!dir.path().join(TMP_FILE).exists(), "the new file removed");
    for i in 20..30 {
        wal.append(vec![rec(i)]).await.unwrap();
    }
    assert_eq!(wal.generation(), 1);
    assert_eq!(wal.last_snapshot_bytes(), None);
    drop(wal);

    let (_wal, recovered) = open(dir.path());
    assert_eq!(recovered.records, (0..30).map(rec).collect::<Vec<_>>());
}

/// Appends gathered into the same commit as the news that the compaction's new file is written
/// (here: a batch window that outlasts the helper) go to the new log's tail too. They were
/// written only to the old log, which the rename then dropped: acknowledged records lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_gathered_while_a_compaction_finishes_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let config = WalConfig::new(dir.path()).with_fsync(FsyncPolicy::Batch {
        max_delay: Duration::from_millis(500),
    });
    let (wal, _) = Wal::open(config.clone()).unwrap();
    for i in 0..5 {
        wal.append(vec![rec(i)]).await.unwrap();
    }
    let snapshot = vec![Bytes::from_static(b"snapshot")];
    // The compaction opens a commit window; the appends join it at once, and the helper's
    // small file is written (and reported) well within it.
    let compaction = wal.reserve().await.unwrap().compact(snapshot.clone());
    let mut after = Vec::new();
    for i in 10..20 {
        after.push(wal.reserve().await.unwrap().append(vec![rec(i)]));
    }
    for commit in after {
        commit.await.unwrap();
    }
    compaction.await.unwrap();
    assert_eq!(wal.generation(), 2);
    drop(wal);

    let (_wal, recovered) = Wal::open(config).unwrap();
    let mut expected = snapshot;
    expected.extend((10..20).map(rec));
    assert_eq!(
        recovered.records, expected,
        "every acknowledged append kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    let wal = Arc::new(wal);
    let start = Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let wal = wal.clone();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            wal.append(vec![rec(i)]).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let stats = wal.stats();
    assert_eq!(stats.appends, 200);
    assert_eq!(stats.records, 200);
    assert_eq!(stats.fsyncs, stats.writes);
    assert!(
        stats.fsyncs <= 50,
        "200 concurrent appends took {} fsyncs",
        stats.fsyncs
    );
    drop(Arc::into_inner(wal).unwrap());
    let (_wal, recovered) = open(dir.path());
    let mut got: Vec<Bytes> = recovered.records;
    got.sort();
    let mut expected: Vec<Bytes> = (0..200).map(rec).collect();
    expected.sort();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_policy_gathers_appends_into_fewer_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let config = WalConfig::new(dir.path()).with_fsync(FsyncPolicy::Batch {
        max_delay: Duration::from_millis(20),
    });
    let (wal, _) = Wal::open(config).unwrap();
    let mut commits = Vec::new();
    for i in 0..100 {
        commits.push(wal.reserve().await.unwrap().append(vec![rec(i)]));
    }
    for c in commits {
        c.await.unwrap();
    }
    assert!(wal.stats().fsyncs <= 5, "{:?}", wal.stats());
}

#[test]
fn never_policy_writes_without_syncing() {
    let dir = tempfile::tempdir().unwrap();
    let config = WalConfig::new(dir.path()).with_fsync(FsyncPolicy::Never);
    let (wal, _) = Wal::open(config).unwrap();
    for i in 0..20 {
        wal.append_blocking(vec![rec(i)]).unwrap();
    }
    assert_eq!(wal.stats().fsyncs, 0);
    assert_eq!(wal.stats().writes, 20);
    // Without syncs there is no inode write to save: no space is grown ahead, and appends past
    // the new log's first zeros make the file longer, as they did before.
    let big = |i: usize| Bytes::from(format!("{i:08} {}", "n".repeat(64 * 1024)));
    for i in 0..24 {
        wal.append_blocking(vec![big(i)]).unwrap();
    }
    assert_eq!(wal.stats().grows, 0);
    let len = wal.len_bytes();
    assert!(len > 1 << 20);
    assert_eq!(std::fs::metadata(log_path(dir.path())).unwrap().len(), len);
    drop(wal);
    let (_wal, recovered) = open(dir.path());
    let mut expected: Vec<Bytes> = (0..20).map(rec).collect();
    expected.extend((0..24).map(big));
    assert_eq!(recovered.records, expected);
}

#[tokio::test]
async fn appends_after_close_fail_with_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    let pending = wal.append(vec![rec(1)]);
    wal.close();
    assert!(matches!(pending.await, Err(StoreError::Closed)));
}

/// The whole path the broker takes: records encoded into the log, replayed into the state,
/// compacted from a snapshot, and replayed again to the same state.
#[test]
fn broker_records_replay_and_compact_to_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    let c = qosmos_mqtt::MqttStr::from("sensor-1");
    let pid = PacketId::new(5).unwrap();
    let mut publish = Publish::new("sensors/1", &b"21.5"[..]);
    publish.qos = QoS::ExactlyOnce;
    publish.packet_id = Some(pid);
    let log = vec![
        Record::SessionUpsert {
            client_id: c.clone(),
            protocol_level: 5,
            expiry_interval: 3600,
        },
        Record::Subscribe {
            client_id: c.clone(),
            filter: "sensors/#".into(),
            options: SubscriptionOptions::with_qos(QoS::ExactlyOnce),
            subscription_id: Some(3),
        },
        Record::Message {
            id: 1,
            publish: publish.clone(),
            expires_at_unix_ms: None,
        },
        Record::Message {
            id: 2,
            publish,
            expires_at_unix_ms: Some(1_900_000_000_000),
        },
        Record::Enqueue {
            client_id: c.clone(),
            message_id: 1,
            qos: QoS::ExactlyOnce,
            retain: false,
            subscription_ids: vec![3],
        },
        Record::Enqueue {
            client_id: c.clone(),
            message_id: 2,
            qos: QoS::ExactlyOnce,
            retain: false,
            subscription_ids: vec![3],
        },
        Record::Sent {
            client_id: c.clone(),
            message_id: 1,
            packet_id: pid,
        },
        Record::Released {
            client_id: c.clone(),
            message_id: 1,
            packet_id: pid,
        },
        Record::Delivered {
            client_id: c.clone(),
            message_id: 1,
        },
        Record::AwaitingRelease {
            client_id: c,
            packet_id: pid,
        },
    ];
    for r in &log {
        wal.append_blocking(vec![r.to_bytes().unwrap()]).unwrap();
    }
    drop(wal);

    let decode = |records: Vec<Bytes>| -> Vec<Record> {
        records.iter().map(|b| Record::decode(b).unwrap()).collect()
    };
    let (wal, recovered) = open(dir.path());
    let state = DurableState::replay(decode(recovered.records));
    assert_eq!(state, DurableState::replay(log));
    assert_eq!(
        state.messages.len(),
        1,
        "message 1 was delivered and dropped"
    );

    let snapshot = state
        .snapshot()
        .iter()
        .map(|r| r.to_bytes().unwrap())
        .collect();
    wal.compact_blocking(snapshot).unwrap();
    drop(wal);
    let (_wal, recovered) = open(dir.path());
    assert_eq!(DurableState::replay(decode(recovered.records)), state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_queued_behind_another_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    let big: Vec<Bytes> = (0..2000)
        .map(|i| Bytes::from(format!("first {i} {}", "s".repeat(300))))
        .collect();
    let first = wal.reserve().await.unwrap().compact(big);
    let between = wal.reserve().await.unwrap().append(vec![rec(1)]);
    let second = wal
        .reserve()
        .await
        .unwrap()
        .compact(vec![Bytes::from_static(b"second")]);
    let after = wal.reserve().await.unwrap().append(vec![rec(2)]);
    first.await.unwrap();
    between.await.unwrap();
    second.await.unwrap();
    after.await.unwrap();
    assert_eq!(wal.generation(), 3);
    assert_eq!(wal.stats().compactions, 2);
    drop(wal);
    let (_wal, recovered) = open(dir.path());
    assert_eq!(
        recovered.records,
        vec![Bytes::from_static(b"second"), rec(2)]
    );
    assert!(!dir.path().join(TMP_FILE).exists());
}

/// The records an incoming QoS 2 PUBLISH makes durable before its PUBREC, packed into one
/// append as the broker writes it.
fn incoming_qos2(publisher: &str, subscriber: &str, message_id: u64, pid: u16) -> Vec<Record> {
    let pid = PacketId::new(pid).unwrap();
    let mut publish = Publish::new("orders/1", &b"order"[..]);
    publish.qos = QoS::ExactlyOnce;
    publish.packet_id = Some(pid);
    vec![
        Record::AwaitingRelease {
            client_id: publisher.into(),
            packet_id: pid,
        },
        Record::Message {
            id: message_id,
            publish,
            expires_at_unix_ms: None,
        },
        Record::Enqueue {
            client_id: subscriber.into(),
            message_id,
            qos: QoS::ExactlyOnce,
            retain: false,
            subscription_ids: vec![],
        },
    ]
}

/// A torn packed append is lost whole: never the awaited release without its message (which
/// would make the publisher's resend look like a duplicate, and the message lost).
#[test]
fn a_torn_packed_append_is_recovered_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    let sessions: Vec<Record> = ["pub", "sub"]
        .iter()
        .map(|c| Record::SessionUpsert {
            client_id: (*c).into(),
            protocol_level: 5,
            expiry_interval: 60,
        })
        .collect();
    wal.append_blocking(vec![
        Record::pack(sessions.clone()).unwrap().to_bytes().unwrap(),
    ])
    .unwrap();
    let before_len = wal.len_bytes() as usize;
    let first = incoming_qos2("pub", "sub", 1, 1);
    let packed = Record::pack(first.clone()).unwrap();
    assert!(matches!(packed, Record::Composite(_)), "{packed:?}");
    wal.append_blocking(vec![packed.to_bytes().unwrap()])
        .unwrap();
    let len = wal.len_bytes();
    drop(wal);
    let whole = logical_bytes(dir.path(), len);
    let decode = |records: Vec<Bytes>| -> Vec<Record> {
        records.iter().map(|b| Record::decode(b).unwrap()).collect()
    };
    let without = DurableState::replay(sessions.clone());
    let with = DurableState::replay(sessions.iter().cloned().chain(first));
    assert_eq!(with.messages.len(), 1);
    assert_eq!(with.sessions["pub"].awaiting_release.len(), 1);
    for cut in before_len..=whole.len() {
        std::fs::write(log_path(dir.path()), &whole[..cut]).unwrap();
        let (wal, recovered) = open(dir.path());
        let state = DurableState::replay(decode(recovered.records));
        if cut == whole.len() {
            assert_eq!(state, with);
        } else {
            assert_eq!(state, without, "cut at {cut}");
            assert_eq!(recovered.truncated_bytes, torn_len(&whole[before_len..cut]));
        }
        drop(wal);
    }
}

/// A log written by the previous format (version 1: the same records, unpacked) is read, and
/// its header rewritten to this version, so that an older build refuses what this one adds.
#[test]
fn a_version_1_log_is_read_and_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let (wal, _) = open(dir.path());
    let mut log = vec![Record::SessionUpsert {
        client_id: "sub".into(),
        protocol_level: 5,
        expiry_interval: 60,
    }];
    log.extend(incoming_qos2("pub", "sub", 7, 3));
    for r in &log {
        wal.append_blocking(vec![r.to_bytes().unwrap()]).unwrap();
    }
    let len = wal.len_bytes();
    drop(wal);
    // Version 1 had no space ahead.
    let mut data = logical_bytes(dir.path(), len);
    data[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(log_path(dir.path()), &data).unwrap();

    let (wal, recovered) = open(dir.path());
    let records: Vec<Record> = recovered
        .records
        .iter()
        .map(|b| Record::decode(b).unwrap())
        .collect();
    assert_eq!(records, log);
    assert_eq!(wal.len_bytes(), len);
    let upgraded = logical_bytes(dir.path(), len);
    assert_eq!(
        &upgraded[MAGIC.len()..MAGIC.len() + 4],
        &FORMAT_VERSION.to_le_bytes()
    );
    assert_eq!(&upgraded[HEADER_LEN..], &data[HEADER_LEN..]);
    // Appends go on after the upgrade.
    wal.append_blocking(vec![
        Record::pack(incoming_qos2("pub", "sub", 8, 4))
            .unwrap()
            .to_bytes()
            .unwrap(),
    ])
    .unwrap();
    drop(wal);
    let (_wal, recovered) = open(dir.path());
    assert_eq!(recovered.records.len(), log.len() + 1);
    let state = DurableState::replay(recovered.records.iter().map(|b| Record::decode(b).unwrap()));
    assert_eq!(state.sessions["sub"].queue.len(), 2);
}
