//! Write-ahead log appends per second: 100-byte records from 1, 8 and 64 concurrent appenders,
//! under `FsyncPolicy::Always` (group commit: one fdatasync per batch) and `Never`.
#![allow(missing_docs, clippy::unwrap_used)]

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qosmos_broker::store::{FsyncPolicy, Wal, WalConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let record = Bytes::from(vec![0x5Au8; 100]);
    for (name, policy) in [
        ("always", FsyncPolicy::Always),
        ("never", FsyncPolicy::Never),
    ] {
        let mut g = c.benchmark_group(format!("wal_append_100B_{name}"));
        g.throughput(Throughput::Elements(1));
        g.sample_size(10);
        g.warm_up_time(Duration::from_secs(1));
        g.measurement_time(Duration::from_secs(4));
        for appenders in [1usize, 8, 64] {
            let dir = tempfile::tempdir().unwrap();
            let (wal, _) = Wal::open(WalConfig::new(dir.path()).with_fsync(policy)).unwrap();
            let wal = Arc::new(wal);
            g.bench_function(format!("{appenders}_appenders"), |b| {
                // Each iteration is one append; the appenders split the iterations between
                // them and each awaits its own appends one after another.
                b.iter_custom(|iters| {
                    let wal = wal.clone();
                    let record = record.clone();
                    rt.block_on(async move {
                        let start = Instant::now();
                        let mut tasks = Vec::new();
                        for a in 0..appenders as u64 {
                            let n =
                                iters / appenders as u64 + u64::from(a < iters % appenders as u64);
                            let wal = wal.clone();
                            let record = record.clone();
                            tasks.push(tokio::spawn(async move {
                                for _ in 0..n {
                                    wal.append(vec![record.clone()]).await.unwrap();
                                }
                            }));
                        }
                        for t in tasks {
                            t.await.unwrap();
                        }
                        start.elapsed()
                    })
                })
            });
            let s = wal.stats();
            eprintln!(
                "{name}/{appenders}: {} appends in {} fsyncs ({:.1} per fsync)",
                s.appends,
                s.fsyncs,
                s.appends as f64 / s.fsyncs.max(1) as f64
            );
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
