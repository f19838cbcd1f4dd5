//! `qosmos bench`: a load generator for any MQTT 3.1.1 / 5.0 broker.
//!
//! Built straight on tokio and the `qosmos-mqtt` codec, not on the qosmos client, so that it
//! measures the broker and not a client library's queues: each connection is one task with
//! one receive buffer and one send buffer written in batches.
//!
//! A run: connect and subscribe every subscriber (waiting for every SUBACK), connect every
//! publisher, then publish; wait until every expected message arrived or nothing happened for
//! `--timeout`; stop everyone and add up their reports.

mod args;
mod conn;
mod histogram;
mod idle;
mod payload;
mod publisher;
mod report;
mod stats;
mod subscriber;

pub(crate) use args::BenchArgs;

use crate::error::CliError;
use args::Plan;
use conn::{Conn, ConnError};
use publisher::PublisherSpec;
use qosmos_mqtt::{ProtocolVersion, QoS};
use report::RunInfo;
use stats::Counters;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Connections being opened at once.
const CONNECT_CONCURRENCY: usize = 64;

/// Runs the bench.
pub(crate) async fn run(args: BenchArgs) -> Result<(), CliError> {
    args.validate()?;
    let version = ProtocolVersion::from(args.protocol);
    let timeout = Duration::from_secs_f64(args.timeout);
    let run_id = run_id();
    if let Some(n) = args.idle_connections {
        let hold = Duration::from_secs_f64(args.hold);
        let r = idle::run(&args.broker, version, n, hold, timeout, &run_id).await?;
        let json = serde_json::to_string(&r).map_err(|e| CliError::runtime(e.to_string()))?;
        println!("{json}");
        return Ok(());
    }
    let plan = Arc::new(Plan::new(&args, run_id));
    let clock = Instant::now();
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);

    // Subscribers first: every SUBACK is in before the first publish.
    let subs = connect_all(&args, version, timeout, args.subscribers, |j| {
        format!("qb{}s{j}", plan.run_id)
    })
    .await?;
    let mut tasks = JoinSet::new();
    for (j, (conn, _)) in subs.into_iter().enumerate() {
        let filter = plan.subscriber_filter(j as u32);
        let qos = args.qos;
        tasks.spawn(async move {
            let mut conn = conn;
            match tokio::time::timeout(timeout, subscriber::subscribe(&mut conn, &filter, qos))
                .await
            {
                Ok(r) => r.map(|granted| (j, conn, granted)),
                Err(_) => Err(ConnError::Timeout("SUBACK")),
            }
        });
    }
    let mut subscribed: Vec<Option<Conn>> = (0..args.subscribers).map(|_| None).collect();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok((j, conn, granted))) => {
                if granted < args.qos {
                    eprintln!(
                        "qosmos bench: warning: the broker granted QoS {granted} for subscriber {j}, not QoS {}",
                        args.qos
                    );
                }
                subscribed[j] = Some(conn);
            }
            Ok(Err(e)) => return Err(connect_error(&args, &e)),
            Err(e) => {
                return Err(CliError::runtime(format!(
                    "bench: subscriber task failed: {e}"
                )));
            }
        }
    }
    let mut sub_tasks = JoinSet::new();
    for (j, conn) in subscribed.into_iter().enumerate() {
        let Some(conn) = conn else { continue };
        sub_tasks.spawn(subscriber::run(
            conn,
            j as u32,
            plan.clone(),
            clock,
            counters.clone(),
            stop_rx.clone(),
        ));
    }

    let pubs = match connect_all(&args, version, timeout, args.publishers, |i| {
        format!("qb{}p{i}", plan.run_id)
    })
    .await
    {
        Ok(p) => p,
        Err(e) => {
            let _ = stop_tx.send(true);
            while sub_tasks.join_next().await.is_some() {}
            return Err(e);
        }
    };
    let rate = args.rate.map(|r| r as f64 / f64::from(args.publishers));
    let start_ns = clock.elapsed().as_nanos() as u64;
    let mut pub_tasks = JoinSet::new();
    for (i, (conn, window)) in pubs.into_iter().enumerate() {
        let spec = PublisherSpec {
            id: i as u32,
            topic: plan.publisher_topic(i as u32).into(),
            qos: args.qos,
            messages: args.messages,
            payload: args.payload,
            window: window.min(args.inflight),
            rate,
            clock,
        };
        pub_tasks.spawn(publisher::run(
            conn,
            spec,
            counters.clone(),
            stop_rx.clone(),
        ));
    }

    let timed_out = monitor(&args, &plan, &counters, clock, timeout).await;
    let _ = stop_tx.send(true);
    let mut pub_reports = Vec::new();
    while let Some(r) = pub_tasks.join_next().await {
        if let Ok(r) = r {
            pub_reports.push(r);
        }
    }
    let mut sub_reports = Vec::new();
    while let Some(r) = sub_tasks.join_next().await {
        if let Ok(r) = r {
            sub_reports.push(r);
        }
    }
    for e in pub_reports.iter().filter_map(|p| p.error.as_ref()) {
        eprintln!("qosmos bench: a publisher stopped early: {e}");
    }
    for e in sub_reports.iter().filter_map(|s| s.error.as_ref()) {
        eprintln!("qosmos bench: a subscriber stopped early: {e}");
    }
    let info = RunInfo {
        broker: args.broker.to_string(),
        protocol: version.to_string(),
        qos: args.qos.as_u8(),
        publishers: args.publishers,
        subscribers: args.subscribers,
        topics: plan.topics,
        messages: args.messages,
        payload: args.payload,
    };
    let summary = report::summarize(info, &pub_reports, &sub_reports, start_ns, timed_out);
    if args.json {
        eprintln!("{}", summary.human());
        let json = serde_json::to_string(&summary).map_err(|e| CliError::runtime(e.to_string()))?;
        println!("{json}");
    } else {
        println!("{}", summary.human());
    }
    Ok(())
}

/// Prints progress every second; returns when the run is complete (`false`) or stalled for
/// `timeout` (`true`).
async fn monitor(
    args: &BenchArgs,
    plan: &Plan,
    counters: &Counters,
    clock: Instant,
    timeout: Duration,
) -> bool {
    let expected = plan.expected_total();
    let qos0 = args.qos == QoS::AtMostOnce;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut last_progress = Instant::now();
    let mut last_total = 0;
    let mut last_print = Instant::now();
    let mut last_received = 0;
    loop {
        tick.tick().await;
        let sent = counters.sent.load(Ordering::Relaxed);
        let acked = counters.acked.load(Ordering::Relaxed);
        let received = counters.received.load(Ordering::Relaxed);
        let distinct = counters.distinct.load(Ordering::Relaxed);
        let done = counters.publishers_done.load(Ordering::Relaxed);
        let total = sent + acked + received;
        if total != last_total {
            last_total = total;
            last_progress = Instant::now();
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            let secs = last_print.elapsed().as_secs_f64();
            let rate = (received - last_received) as f64 / secs;
            let mut line = format!(
                "[{:6.1}s] sent {sent}  received {received}/{expected}  {rate:.0} msgs/s",
                clock.elapsed().as_secs_f64()
            );
            if !qos0 {
                line += &format!("  acked {acked}");
            }
            eprintln!("{line}");
            last_print = Instant::now();
            last_received = received;
        }
        if done >= u64::from(args.publishers) && distinct >= expected {
            return false;
        }
        if last_progress.elapsed() >= timeout {
            return true;
        }
    }
}

/// A short id that keeps this run's topics and client ids apart from any other run's.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:06x}",
        (nanos as u64 ^ u64::from(std::process::id()).rotate_left(24)) & 0xff_ffff
    )
}

/// Connects `n` clients, a bounded number at a time; returns each connection with its
/// usable window (the broker's Receive Maximum, or 65535 without one), in index order.
async fn connect_all(
    args: &BenchArgs,
    version: ProtocolVersion,
    timeout: Duration,
    n: u32,
    client_id: impl Fn(u32) -> String,
) -> Result<Vec<(Conn, u16)>, CliError> {
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut set = JoinSet::new();
    for k in 0..n {
        let url = args.broker.clone();
        let id = client_id(k);
        let permits = permits.clone();
        let expiry = args.session_expiry;
        set.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let r = Conn::connect(&url, &id, version, timeout, expiry).await;
            (k, r)
        });
    }
    let mut conns: Vec<Option<(Conn, u16)>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (k, r) =
            r.map_err(|e| CliError::runtime(format!("bench: connect task failed: {e}")))?;
        let (conn, ack) = r.map_err(|e| connect_error(args, &e))?;
        if let Some(max) = ack.properties.maximum_qos()
            && max < args.qos.as_u8()
        {
            return Err(CliError::runtime(format!(
                "{}: the broker supports at most QoS {max}",
                args.broker
            )));
        }
        let window = ack.properties.receive_maximum().unwrap_or(u16::MAX);
        if let Some(slot) = conns.get_mut(k as usize) {
            *slot = Some((conn, window));
        }
    }
    Ok(conns.into_iter().flatten().collect())
}

fn connect_error(args: &BenchArgs, e: &ConnError) -> CliError {
    CliError::runtime(format!("cannot connect to {}: {e}", args.broker))
}
