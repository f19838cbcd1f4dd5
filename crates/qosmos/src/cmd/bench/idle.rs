//! `--idle-connections N`: open N MQTT connections that do nothing but keep alive, hold them,
//! and report. Used to measure a broker's memory per connection.

use super::conn::{Conn, KEEP_ALIVE};
use crate::error::CliError;
use crate::url::BrokerUrl;
use qosmos_mqtt::{Packet, ProtocolVersion};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Connection attempts in flight at once.
const CONNECT_CONCURRENCY: usize = 128;

/// The result of an idle-connections run.
#[derive(Debug, Serialize)]
pub(crate) struct IdleReport {
    /// Connections asked for.
    pub(crate) requested: u32,
    /// Connections that got a CONNACK.
    pub(crate) connected: u32,
    /// Connections that failed to open.
    pub(crate) failed: u32,
    /// Connections the broker closed while held.
    pub(crate) dropped: u32,
    /// Seconds it took to open them all.
    pub(crate) connect_s: f64,
    /// The first failure, if any.
    pub(crate) first_error: Option<String>,
}

/// Opens `n` idle connections, holds them for `hold`, closes them.
pub(crate) async fn run(
    url: &BrokerUrl,
    version: ProtocolVersion,
    n: u32,
    hold: Duration,
    timeout: Duration,
    run_id: &str,
) -> Result<IdleReport, CliError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(1024);
    let permits = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    // After one failure the rest are not tried: a broker that refuses or ignores one
    // connection would otherwise cost a --timeout per remaining batch.
    let give_up = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for k in 0..n {
        let url = url.clone();
        let client_id = format!("qb{run_id}i{k}");
        let permits = permits.clone();
        let ready = ready_tx.clone();
        let mut stop = stop_rx.clone();
        let give_up = give_up.clone();
        tasks.spawn(async move {
            let conn = {
                let Ok(_permit) = permits.acquire().await else {
                    return false;
                };
                if give_up.load(Ordering::Relaxed) {
                    let _ = ready
                        .send(Err("not tried after an earlier failure".into()))
                        .await;
                    return false;
                }
                Conn::connect(&url, &client_id, version, timeout, None).await
            };
            let mut conn = match conn {
                Ok((c, _)) => {
                    let _ = ready.send(Ok(())).await;
                    c
                }
                Err(e) => {
                    give_up.store(true, Ordering::Relaxed);
                    let _ = ready.send(Err(e.to_string())).await;
                    return false;
                }
            };
            drop(ready);
            // Idle: answer nothing but keep alive, until told to stop.
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    r = conn.read_more() => {
                        if r.is_err() {
                            return true;
                        }
                        while let Ok(Some(_)) = conn.decode() {}
                    }
                    () = tokio::time::sleep(KEEP_ALIVE / 2) => {
                        if conn.queue(&Packet::PingReq).is_err() || conn.flush().await.is_err() {
                            return true;
                        }
                    }
                }
            }
            conn.close().await;
            false
        });
    }
    drop(ready_tx);
    let (mut connected, mut failed, mut first_error) = (0u32, 0u32, None);
    let mut last_note = Instant::now();
    while let Some(r) = ready_rx.recv().await {
        match r {
            Ok(()) => connected += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
        if last_note.elapsed() >= Duration::from_secs(1) {
            eprintln!("idle: {connected} connected, {failed} failed");
            last_note = Instant::now();
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    eprintln!(
        "idle: {connected} connections open ({failed} failed) in {connect_s:.2} s; holding {:.1} s",
        hold.as_secs_f64()
    );
    if connected == 0 && n > 0 {
        let e = first_error.unwrap_or_default();
        return Err(CliError::runtime(format!("cannot connect to {url}: {e}")));
    }
    tokio::select! {
        () = tokio::time::sleep(hold) => {}
        () = super::super::shutdown::signal() => {}
    }
    let _ = stop_tx.send(true);
    let mut dropped = 0;
    while let Some(r) = tasks.join_next().await {
        if matches!(r, Ok(true)) {
            dropped += 1;
        }
    }
    Ok(IdleReport {
        requested: n,
        connected,
        failed,
        dropped,
        connect_s,
        first_error,
    })
}
