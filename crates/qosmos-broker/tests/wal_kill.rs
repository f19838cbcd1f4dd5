//! SIGKILL at a random moment loses no acknowledged append.
//!
//! The test binary re-executes itself as a child (`child_writer`, selected by an environment
//! variable) that appends numbered records as fast as it can, keeping many appends in flight,
//! and prints each number only after its append resolved. The parent kills the child with
//! SIGKILL after a random number of acknowledgements (sometimes before it even opened the log),
//! reopens the log and checks that the records are exactly 0, 1, 2, … with every acknowledged
//! number present. Twenty cycles append to the same directory, so each child starts by
//! recovering what the previous one left. A kill cannot tear a `write` (the kernel finishes the
//! system call), so in some cycles the parent appends the start of a frame, as a power loss
//! could leave it, to exercise cutting a torn tail between kills.
#![allow(clippy::unwrap_used, missing_docs)]

use bytes::Bytes;
use qosmos_broker::store::wal::LOG_FILE;
use qosmos_broker::store::{Wal, WalConfig};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DIR_ENV: &str = "QOSMOS_WAL_KILL_DIR";
const CYCLES: usize = 20;
/// Appends the child keeps in flight, so that commits group several appends.
const IN_FLIGHT: usize = 32;

/// Record `n`: the number, then padding of varying length so frames end at varying offsets.
fn record(n: u64) -> Bytes {
    let mut b = n.to_le_bytes().to_vec();
    b.resize(8 + (n as usize * 7) % 300, b'p');
    Bytes::from(b)
}

fn number(record: &Bytes) -> u64 {
    let mut n = [0u8; 8];
    n.copy_from_slice(&record[..8]);
    u64::from_le_bytes(n)
}

/// The child: runs only when the parent set `DIR_ENV`.
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os(DIR_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (wal, recovered) = Wal::open(WalConfig::new(dir)).unwrap();
        let mut next = recovered.records.len() as u64;
        println!("ready {next}");
        let mut in_flight = VecDeque::new();
        loop {
            let permit = wal.reserve().await.unwrap();
            in_flight.push_back((next, permit.append(vec![record(next)])));
            next += 1;
            if in_flight.len() >= IN_FLIGHT {
                let (n, commit) = in_flight.pop_front().unwrap();
                commit.await.unwrap();
                println!("ack {n}");
            }
        }
    });
}

/// A small xorshift: the kill points need to vary, not to be good random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Checks the log holds exactly 0..n with n past every acknowledged number; returns n, the
/// bytes of torn tail cut, and where the records end (the file goes on with zeros).
fn check_log(dir: &Path, last_acked: Option<u64>) -> (u64, u64, u64) {
    let (wal, recovered) = Wal::open(WalConfig::new(dir)).unwrap();
    for (i, r) in recovered.records.iter().enumerate() {
        assert_eq!(number(r), i as u64, "record {i} out of order or missing");
        assert_eq!(*r, record(i as u64), "record {i} damaged");
    }
    let n = recovered.records.len() as u64;
    if let Some(acked) = last_acked {
        assert!(
            n > acked,
            "acknowledged record {acked} lost: the log holds only 0..{n}"
        );
    }
    let end = wal.len_bytes();
    drop(wal);
    (n, recovered.truncated_bytes, end)
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    if std::env::var_os(DIR_ENV).is_some() {
        return;
    }
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Rng(seed | 1);
    let mut last_acked: Option<u64> = None;
    let mut torn_tails = 0;

    for cycle in 0..CYCLES {
        let mut child = Command::new(&exe)
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env(DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Kept open until the child is dead: a closed pipe would make it fail on its own.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mode = rng.next() % 8;
        if mode == 0 {
            // Kill at once: the child may be opening, recovering or truncating the log.
            std::thread::sleep(Duration::from_micros(rng.next() % 5_000));
        } else {
            let kill_after = rng.next() % 3_000;
            let mut acks = 0;
            let mut first = None;
            for line in stdout.by_ref().lines() {
                let line = line.unwrap();
                // libtest may print "test child_writer ... " before the first line.
                if let Some((_, n)) = line.split_once("ready ") {
                    let n: u64 = n.parse().unwrap();
                    if let Some(acked) = last_acked {
                        assert!(n > acked, "the child recovered only 0..{n}");
                    }
                    first = Some(n);
                } else if let Some(n) = line.strip_prefix("ack ") {
                    let n: u64 = n.parse().unwrap();
                    let first = first.unwrap();
                    let expected = last_acked.map_or(first, |a| (a + 1).max(first));
                    assert_eq!(n, expected, "acks come in order");
                    last_acked = Some(n);
                    acks += 1;
                    if acks >= kill_after {
                        break;
                    }
                }
            }
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        drop(stdout);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "cycle {cycle}: the child was not killed by SIGKILL but ended with {status}"
        );
        let (n, torn, end) = check_log(dir.path(), last_acked);
        eprintln!(
            "cycle {cycle}: log holds 0..{n}, last acknowledged {last_acked:?}, cut {torn} bytes"
        );
        if rng.next().is_multiple_of(3) {
            // What a power loss could leave and a kill cannot: the start of a frame whose
            // payload never reached the disk. The next child must cut it off and go on.
            // It goes where the records end, over the zeros kept ahead of them.
            let log = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join(LOG_FILE))
                .unwrap();
            let garbage_len = 1 + rng.next() as usize % 40;
            let mut garbage = 200u32.to_le_bytes().to_vec();
            garbage.resize(garbage_len, 0xA5);
            std::os::unix::fs::FileExt::write_all_at(&log, &garbage, end).unwrap();
            torn_tails += 1;
        }
    }
    eprintln!(
        "{CYCLES} kills, {torn_tails} torn tails left for the next child, {:?}",
        started.elapsed()
    );
    assert!(last_acked.is_some(), "no cycle got an acknowledgement");
}
