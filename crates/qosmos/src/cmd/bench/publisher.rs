//! One publishing connection: sends `--messages` PUBLISH packets to its topic, keeping up to
//! a window of QoS 1/2 exchanges in flight (PUBACK; or PUBREC, PUBREL, PUBCOMP).

use super::conn::{Conn, ConnError, KEEP_ALIVE};
use super::payload::Header;
use super::stats::Counters;
use qosmos_mqtt::{MqttStr, Packet, PacketId, PubAck, PubComp, PubRec, PubRel, Publish, QoS};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Packets are collected up to this many bytes before one write.
const BATCH_BYTES: usize = 64 * 1024;

/// What one publisher is to do.
#[derive(Debug, Clone)]
pub(crate) struct PublisherSpec {
    /// Index, carried in every payload.
    pub(crate) id: u32,
    /// Where to publish.
    pub(crate) topic: MqttStr,
    /// QoS of every PUBLISH.
    pub(crate) qos: QoS,
    /// How many messages.
    pub(crate) messages: u32,
    /// Payload size in bytes.
    pub(crate) payload: usize,
    /// Most QoS 1/2 exchanges in flight.
    pub(crate) window: u16,
    /// Messages per second for this publisher, if limited.
    pub(crate) rate: Option<f64>,
    /// The bench's clock: payload timestamps are nanoseconds since it.
    pub(crate) clock: Instant,
}

/// What one publisher did.
#[derive(Debug, Default, Clone)]
pub(crate) struct PublisherReport {
    /// PUBLISH packets written.
    pub(crate) sent: u64,
    /// Exchanges completed (PUBACK, or PUBCOMP), including refused ones.
    pub(crate) acked: u64,
    /// Exchanges the broker refused (reason code 0x80 or above).
    pub(crate) rejected: u64,
    /// When the last exchange completed (ns on the bench clock).
    pub(crate) finished_ns: u64,
    /// Why it stopped early, if it did.
    pub(crate) error: Option<String>,
}

/// Where a packet identifier stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitingAck,
    /// PUBREL sent; waiting for PUBCOMP.
    AwaitingComp,
}

struct Publisher {
    spec: PublisherSpec,
    free: Vec<u16>,
    slots: Vec<Slot>,
    report: PublisherReport,
}

impl Publisher {
    fn inflight(&self) -> usize {
        usize::from(self.spec.window) - self.free.len()
    }

    fn complete(&mut self, id: PacketId, refused: bool) {
        self.slots[usize::from(id.get())] = Slot::Free;
        self.free.push(id.get());
        self.report.acked += 1;
        if refused {
            self.report.rejected += 1;
        }
    }

    fn slot(&self, id: PacketId) -> Slot {
        self.slots
            .get(usize::from(id.get()))
            .copied()
            .unwrap_or(Slot::Free)
    }

    /// Handles one packet from the broker; returns how many exchanges it completed.
    fn handle(&mut self, conn: &mut Conn, packet: Packet) -> Result<u64, ConnError> {
        match packet {
            Packet::PubAck(a) if self.slot(a.packet_id) == Slot::AwaitingAck => {
                self.complete(a.packet_id, !a.reason_code.is_success());
                return Ok(1);
            }
            Packet::PubRec(r) if self.slot(r.packet_id) == Slot::AwaitingAck => {
                if r.reason_code.is_success() {
                    self.slots[usize::from(r.packet_id.get())] = Slot::AwaitingComp;
                    conn.queue(&Packet::PubRel(PubRel::new(r.packet_id)))?;
                } else {
                    self.complete(r.packet_id, true);
                    return Ok(1);
                }
            }
            // A PUBREC repeated after our PUBREL was sent: answer it again.
            Packet::PubRec(r) if self.slot(r.packet_id) == Slot::AwaitingComp => {
                conn.queue(&Packet::PubRel(PubRel::new(r.packet_id)))?;
            }
            Packet::PubComp(c) if self.slot(c.packet_id) == Slot::AwaitingComp => {
                self.complete(c.packet_id, !c.reason_code.is_success());
                return Ok(1);
            }
            // Publishers subscribe to nothing, but a conformant client still answers.
            Packet::Publish(p) => match (p.qos, p.packet_id) {
                (QoS::AtLeastOnce, Some(id)) => conn.queue(&Packet::PubAck(PubAck::new(id)))?,
                (QoS::ExactlyOnce, Some(id)) => conn.queue(&Packet::PubRec(PubRec::new(id)))?,
                _ => {}
            },
            Packet::PubRel(r) => conn.queue(&Packet::PubComp(PubComp::new(r.packet_id)))?,
            Packet::PingResp => {}
            other => {
                tracing::debug!(publisher = self.spec.id, packet = %other.packet_type(), "ignored");
            }
        }
        Ok(0)
    }

    fn drain(&mut self, conn: &mut Conn, counters: &Counters) -> Result<(), ConnError> {
        let mut done = 0;
        while let Some(p) = conn.decode()? {
            done += self.handle(conn, p)?;
        }
        if done > 0 {
            counters.acked.fetch_add(done, Ordering::Relaxed);
            self.report.finished_ns = self.spec.clock.elapsed().as_nanos() as u64;
        }
        Ok(())
    }
}

/// Publishes everything, then disconnects. Never fails: an error ends the run early and is
/// reported in [`PublisherReport::error`].
pub(crate) async fn run(
    conn: Conn,
    spec: PublisherSpec,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
) -> PublisherReport {
    let window = spec.window.max(1);
    let mut p = Publisher {
        free: (1..=window).rev().collect(),
        slots: vec![Slot::Free; usize::from(window) + 1],
        report: PublisherReport::default(),
        spec,
    };
    let mut conn = conn;
    if let Err(e) = publish_all(&mut p, &mut conn, &counters, stop).await {
        p.report.error = Some(e.to_string());
    }
    counters.publishers_done.fetch_add(1, Ordering::Relaxed);
    conn.close().await;
    p.report
}

async fn publish_all(
    p: &mut Publisher,
    conn: &mut Conn,
    counters: &Counters,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let start = Instant::now();
    let total = p.spec.messages;
    let qos0 = p.spec.qos == QoS::AtMostOnce;
    let topic = p.spec.topic.clone();
    let mut seq: u32 = 0;
    let mut last_send = Instant::now();
    // How many messages the rate limit allows by now.
    let rate = p.spec.rate;
    let allowed = |now: Instant| -> u32 {
        match rate {
            None => total,
            Some(r) => {
                let n = (now.duration_since(start).as_secs_f64() * r).floor() as u64 + 1;
                n.min(u64::from(total)) as u32
            }
        }
    };
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let limit = allowed(Instant::now());
        let mut batch = 0;
        while seq < limit && conn.queued() < BATCH_BYTES {
            let packet_id = if qos0 {
                None
            } else {
                match p.free.pop() {
                    Some(id) => {
                        p.slots[usize::from(id)] = Slot::AwaitingAck;
                        PacketId::new(id)
                    }
                    None => break,
                }
            };
            let header = Header {
                publisher: p.spec.id,
                seq,
                sent_ns: p.spec.clock.elapsed().as_nanos() as u64,
            };
            let mut publish = Publish::new(topic.clone(), header.payload(p.spec.payload));
            publish.qos = p.spec.qos;
            publish.packet_id = packet_id;
            conn.queue(&Packet::Publish(publish))?;
            seq += 1;
            batch += 1;
        }
        if batch > 0 {
            p.report.sent += batch;
            counters.sent.fetch_add(batch, Ordering::Relaxed);
        }
        if conn.queued() > 0 {
            conn.flush().await?;
            last_send = Instant::now();
        }
        if qos0 && seq == total {
            p.report.finished_ns = p.spec.clock.elapsed().as_nanos() as u64;
            return Ok(());
        }
        if !qos0 {
            // Take in whatever acknowledgements have already arrived, without waiting.
            if conn.try_read_more()? {
                p.drain(conn, counters)?;
                conn.flush().await?;
            }
            if seq == total && p.inflight() == 0 {
                return Ok(());
            }
        }
        let window_open = qos0 || !p.free.is_empty();
        let now = Instant::now();
        if seq < total && window_open && seq < allowed(now) {
            tokio::task::yield_now().await;
            continue;
        }
        // Blocked: on acknowledgements, on the rate limit, or both.
        let next_slot = match p.spec.rate {
            Some(r) if seq < total && window_open => {
                Some(start + Duration::from_secs_f64(f64::from(seq) / r))
            }
            _ => None,
        };
        let ping_at = last_send + KEEP_ALIVE / 2;
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(()),
            r = conn.read_more(), if !qos0 && p.inflight() > 0 => {
                r?;
                p.drain(conn, counters)?;
                if conn.queued() > 0 {
                    conn.flush().await?;
                    last_send = Instant::now();
                }
            }
            () = tokio::time::sleep_until(next_slot.unwrap_or(now)), if next_slot.is_some() => {}
            () = tokio::time::sleep_until(ping_at) => {
                conn.queue(&Packet::PingReq)?;
                conn.flush().await?;
                last_send = Instant::now();
            }
        }
    }
}
