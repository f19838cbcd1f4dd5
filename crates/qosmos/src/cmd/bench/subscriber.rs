//! One subscribing connection: subscribes, answers every QoS 1/2 delivery (PUBACK; or PUBREC
//! then PUBCOMP on PUBREL), and counts what arrives per (publisher, seq).

use super::args::Plan;
use super::conn::{Conn, ConnError, KEEP_ALIVE};
use super::histogram::Histogram;
use super::payload::Header;
use super::stats::Counters;
use qosmos_mqtt::{
    Packet, PacketId, Properties, PubAck, PubComp, PubRec, Publish, QoS, Subscribe, Subscription,
    SubscriptionOptions,
};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;
use tokio::time::Instant;

/// What one subscriber saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct SubscriberReport {
    /// PUBLISH packets delivered (duplicates included, QoS 2 redeliveries before PUBREL not).
    pub(crate) received: u64,
    /// Distinct (publisher, seq) received.
    pub(crate) distinct: u64,
    /// Deliveries of a (publisher, seq) already received.
    pub(crate) duplicated: u64,
    /// Deliveries that are not this run's messages for this subscriber.
    pub(crate) unexpected: u64,
    /// What this subscriber should receive.
    pub(crate) expected: u64,
    /// Receive time minus send time, in nanoseconds.
    pub(crate) latency: Histogram,
    /// When the last message arrived (ns on the bench clock).
    pub(crate) last_ns: u64,
    /// Why it stopped early, if it did.
    pub(crate) error: Option<String>,
}

/// Subscribes to `filter` at `qos` and waits for the SUBACK; returns the QoS granted.
pub(crate) async fn subscribe(conn: &mut Conn, filter: &str, qos: QoS) -> Result<QoS, ConnError> {
    let packet_id = PacketId::MIN;
    conn.queue(&Packet::Subscribe(Subscribe {
        packet_id,
        subscriptions: vec![Subscription {
            filter: filter.into(),
            options: SubscriptionOptions::with_qos(qos),
        }],
        properties: Properties::new(),
    }))?;
    conn.flush().await?;
    loop {
        match conn.next_packet().await? {
            Packet::SubAck(ack) if ack.packet_id == packet_id => {
                let code = ack.reason_codes.first().copied().unwrap_or_default();
                return match QoS::from_u8(code.0) {
                    Some(granted) => Ok(granted),
                    None => Err(ConnError::SubscribeRefused(code)),
                };
            }
            Packet::PingResp => {}
            other => {
                return Err(ConnError::Protocol(format!(
                    "expected SUBACK, got {}",
                    other.packet_type()
                )));
            }
        }
    }
}

struct Subscriber {
    id: u32,
    plan: Arc<Plan>,
    /// One bit per (publisher, seq), allocated when the publisher's first message arrives.
    seen: Vec<Vec<u64>>,
    /// QoS 2 packet identifiers received and not yet released (PUBREL).
    awaiting_rel: Vec<u64>,
    report: SubscriberReport,
}

impl Subscriber {
    /// Counts one delivery; returns whether it was new.
    fn count(&mut self, publish: &Publish, now_ns: u64) -> bool {
        self.report.received += 1;
        let Some(h) = Header::parse(&publish.payload) else {
            self.report.unexpected += 1;
            return false;
        };
        if h.publisher >= self.plan.publishers
            || h.seq >= self.plan.messages
            || !self.plan.receives(self.id, h.publisher)
        {
            self.report.unexpected += 1;
            return false;
        }
        let words = (self.plan.messages as usize).div_ceil(64);
        let bits = &mut self.seen[h.publisher as usize];
        if bits.is_empty() {
            bits.resize(words, 0);
        }
        let (w, b) = ((h.seq / 64) as usize, h.seq % 64);
        if bits[w] & (1 << b) != 0 {
            self.report.duplicated += 1;
            return false;
        }
        bits[w] |= 1 << b;
        self.report.distinct += 1;
        self.report.latency.record(now_ns.saturating_sub(h.sent_ns));
        true
    }

    fn rel_bit(id: PacketId) -> (usize, u64) {
        let v = id.get();
        (usize::from(v / 64), 1 << (v % 64))
    }

    /// Handles one packet; returns (deliveries, new deliveries).
    fn handle(
        &mut self,
        conn: &mut Conn,
        packet: Packet,
        now_ns: u64,
    ) -> Result<(u64, u64), ConnError> {
        match packet {
            Packet::Publish(p) => {
                match (p.qos, p.packet_id) {
                    (QoS::AtMostOnce, _) => {}
                    (QoS::AtLeastOnce, Some(id)) => conn.queue(&Packet::PubAck(PubAck::new(id)))?,
                    (QoS::ExactlyOnce, Some(id)) => {
                        conn.queue(&Packet::PubRec(PubRec::new(id)))?;
                        let (w, m) = Self::rel_bit(id);
                        if self.awaiting_rel[w] & m != 0 {
                            // A redelivery of a message we hold and have not released: the
                            // QoS 2 exchange delivers it once.
                            return Ok((0, 0));
                        }
                        self.awaiting_rel[w] |= m;
                    }
                    _ => {
                        return Err(ConnError::Protocol(
                            "QoS 1/2 PUBLISH without a packet identifier".into(),
                        ));
                    }
                }
                let new = self.count(&p, now_ns);
                if new {
                    self.report.last_ns = now_ns;
                }
                Ok((1, u64::from(new)))
            }
            Packet::PubRel(r) => {
                let (w, m) = Self::rel_bit(r.packet_id);
                self.awaiting_rel[w] &= !m;
                conn.queue(&Packet::PubComp(PubComp::new(r.packet_id)))?;
                Ok((0, 0))
            }
            Packet::PingResp => Ok((0, 0)),
            other => {
                tracing::debug!(subscriber = self.id, packet = %other.packet_type(), "ignored");
                Ok((0, 0))
            }
        }
    }
}

/// Receives until `stop`, then disconnects. Never fails: an error ends this subscriber early
/// and is reported in [`SubscriberReport::error`].
pub(crate) async fn run(
    conn: Conn,
    id: u32,
    plan: Arc<Plan>,
    clock: Instant,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
) -> SubscriberReport {
    let mut s = Subscriber {
        id,
        seen: vec![Vec::new(); plan.publishers as usize],
        awaiting_rel: vec![0; 1024],
        report: SubscriberReport {
            expected: plan.expected_by(id),
            ..Default::default()
        },
        plan,
    };
    let mut conn = conn;
    if let Err(e) = receive(&mut s, &mut conn, clock, &counters, stop).await {
        s.report.error = Some(e.to_string());
    }
    conn.close().await;
    s.report
}

async fn receive(
    s: &mut Subscriber,
    conn: &mut Conn,
    clock: Instant,
    counters: &Counters,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let mut last_send = Instant::now();
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let ping_at = last_send + KEEP_ALIVE / 2;
        tokio::select! {
            biased;
            _ = stop.changed() => return Ok(()),
            r = conn.read_more() => {
                r?;
                // One timestamp per read: everything in it arrived together.
                let now_ns = clock.elapsed().as_nanos() as u64;
                let (mut got, mut new) = (0, 0);
                while let Some(p) = conn.decode()? {
                    let (g, n) = s.handle(conn, p, now_ns)?;
                    got += g;
                    new += n;
                }
                if got > 0 {
                    counters.received.fetch_add(got, Ordering::Relaxed);
                    counters.distinct.fetch_add(new, Ordering::Relaxed);
                }
                if conn.queued() > 0 {
                    conn.flush().await?;
                    last_send = Instant::now();
                }
            }
            () = tokio::time::sleep_until(ping_at) => {
                conn.queue(&Packet::PingReq)?;
                conn.flush().await?;
                last_send = Instant::now();
            }
        }
    }
}
