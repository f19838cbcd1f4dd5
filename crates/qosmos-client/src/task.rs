//! The connection task: owns the socket and the protocol state, serves the handles' commands.
//!
//! One task per client. It connects (with backoff), and while connected runs one `select!`
//! over: writing the pending output, reading the socket (paused while the handlers are behind),
//! the handles' commands, the handlers' acknowledgements and the keep-alive timer. The
//! protocol itself lives in `qosmos-mqtt`: `Outgoing` for our publishes, `Incoming` for the
//! broker's, and the [`Registry`] of subscriptions here.

use crate::backoff::Backoff;
use crate::error::ClientError;
use crate::event::{ClientEvent, StatsCell};
use crate::message::{AckRequest, Message};
use crate::options::ClientOptions;
use crate::outbox::Outbox;
use crate::registry::{Registry, SubscribeOptions, SubscribeOutcome, SubscriptionInfo};
use bytes::BytesMut;
use qosmos_mqtt::state::{
    AckMode, Completed, Incoming, IncomingConfig, KeepAlive, KeepAliveAction, Orphan, Outgoing,
    OutgoingConfig, QueueLimit, SessionLoss, StateError, Ticket,
};
use qosmos_mqtt::{
    ConnAck, Connect, Decoder, Disconnect, Encoder, Packet, PacketId, Properties, ProtocolVersion,
    Publish, QoS, ReasonCode, Role, SubAck, Subscribe, Subscription, UnsubAck, Unsubscribe, topic,
};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;

/// How many bytes are read ahead of the handlers while they are behind.
const READ_AHEAD: usize = 64 * 1024;

/// The most commands taken from the handles in one turn of the connection loop.
const COMMAND_BATCH: usize = 64;

/// What the broker said about a message we published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The QoS the message was sent at.
    pub qos: QoS,
    /// The reason code of the PUBACK (QoS 1) or PUBCOMP (QoS 2); success for QoS 0 (written to
    /// the socket) and under 3.1.1.
    pub reason_code: ReasonCode,
}

type Reply<T> = oneshot::Sender<Result<T, ClientError>>;

/// A request from a [`crate::Client`] handle.
#[derive(Debug)]
pub(crate) enum Command {
    Publish(Publish, Reply<PublishOutcome>),
    Subscribe(String, SubscribeOptions, Reply<SubscribeOutcome>),
    Unsubscribe(String, Reply<()>),
    Subscriptions(oneshot::Sender<Vec<SubscriptionInfo>>),
    Disconnect(oneshot::Sender<()>),
}

/// What the task shares with the handles.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) stats: Arc<StatsCell>,
    pub(crate) events: broadcast::Sender<ClientEvent>,
    pub(crate) connected: watch::Sender<bool>,
}

impl Shared {
    fn emit(&self, event: ClientEvent) {
        // No receiver is fine: events are for those who listen.
        let _ = self.events.send(event);
    }
}

/// One SUBSCRIBE awaiting its SUBACK.
#[derive(Debug)]
struct SubInflight {
    entries: Vec<(String, SubscribeOptions)>,
    restored: bool,
}

/// A QoS 0 message not yet handed to the socket, recognised by topic and payload buffer.
#[derive(Debug)]
struct Qos0Unsent {
    ticket: Ticket,
    topic: String,
    payload: (usize, usize),
}

/// Why a connection ended.
enum End {
    Lost(String),
    Closed,
}

/// One live connection.
struct Conn {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Bytes ever put in `wbuf` / written from it: a QoS 0 publish is done when `written`
    /// passes the end of its bytes.
    queued: u64,
    written: u64,
    decoder: Decoder,
    encoder: Encoder,
    keep_alive: KeepAlive,
}

impl Conn {
    fn encode(&mut self, packet: &Packet) -> Result<(), String> {
        let n = self
            .encoder
            .encode(packet, &mut self.wbuf)
            .map_err(|e| format!("cannot encode {}: {e}", packet.packet_type()))?;
        self.queued += n as u64;
        Ok(())
    }
}

/// The task's receiving ends, kept apart from [`Task`] so that `select!` can wait on them while
/// the branches borrow the task.
pub(crate) struct Inbox {
    cmd_rx: mpsc::Receiver<Command>,
    ack_rx: mpsc::UnboundedReceiver<AckRequest>,
}

pub(crate) struct Task {
    opts: ClientOptions,
    ack_tx: mpsc::UnboundedSender<AckRequest>,
    deliver_tx: mpsc::Sender<Message>,
    shared: Arc<Shared>,
    outgoing: Outgoing,
    incoming: Incoming,
    /// Incremented whenever the session is lost: acknowledgements of older messages are void.
    epoch: u64,
    registry: Registry,
    backoff: Backoff,
    /// The broker's Maximum Packet Size on the last connection.
    max_packet_size: u32,
    pub_waiters: HashMap<Ticket, Reply<PublishOutcome>>,
    qos0_unsent: Vec<Qos0Unsent>,
    qos0_marks: VecDeque<(u64, Ticket)>,
    sub_waiters: HashMap<String, Vec<(SubscribeOptions, Reply<SubscribeOutcome>)>>,
    sub_inflight: HashMap<PacketId, SubInflight>,
    unsub_inflight: HashMap<PacketId, (Vec<String>, Option<Reply<()>>)>,
    /// A message the handlers had no room for: reading stops until it is handed over. It is
    /// kept across a reconnection (dropping it would acknowledge a message nobody handled).
    stalled: Option<Message>,
    /// The durable outbox, and the outbox id of each message in it.
    outbox: Option<Outbox>,
    outbox_ids: HashMap<Ticket, u64>,
    /// The highest QoS the broker accepts from us (5.0 Maximum QoS).
    server_max_qos: QoS,
    /// QoS 1 and 2 messages handed to the application and not acknowledged yet.
    unacked_deliveries: usize,
    closing: Option<(Option<oneshot::Sender<()>>, Instant)>,
}

impl Task {
    pub(crate) fn new(
        opts: ClientOptions,
        cmd_rx: mpsc::Receiver<Command>,
        deliver_tx: mpsc::Sender<Message>,
        shared: Arc<Shared>,
        outbox: Option<(Outbox, Vec<(u64, Publish)>)>,
    ) -> (Task, Inbox) {
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let (outbox, replay) = match outbox {
            Some((o, replay)) => (Some(o), replay),
            None => (None, Vec::new()),
        };
        let mut outgoing = Outgoing::new(
            OutgoingConfig::default()
                .max_pending(opts.offline_queue.saturating_add(replay.len()))
                .max_pending_bytes(opts.offline_queue_bytes)
                .session_loss(SessionLoss::Requeue),
        );
        let receive_maximum = match opts.protocol {
            // 3.1.1 cannot announce a limit, so none can be enforced.
            ProtocolVersion::V311 => u16::MAX,
            ProtocolVersion::V5 => opts.receive_maximum,
        };
        let incoming = Incoming::new(
            opts.protocol,
            IncomingConfig::default()
                .receive_maximum(receive_maximum)
                .ack_mode(AckMode::Manual)
                // A broker that sends PUBREL before our PUBREC would otherwise meet the same
                // protocol error on every reconnect, and the subscriber would never recover.
                .accept_early_pubrel(true),
        );
        let mut outbox_ids = HashMap::new();
        let replayed = replay.len();
        for (id, msg) in replay {
            match outgoing.publish(msg) {
                Ok(ticket) => {
                    outbox_ids.insert(ticket, id);
                }
                Err(e) => tracing::error!(error = %e, "outbox: cannot queue a stored message"),
            }
        }
        if replayed > 0 {
            StatsCell::add(&shared.stats.republished, replayed as u64);
            tracing::warn!(
                count = replayed,
                "outbox: resending messages a previous client never had acknowledged"
            );
        }
        let task = Task {
            outbox,
            outbox_ids,
            backoff: opts.backoff.clone(),
            opts,
            ack_tx,
            deliver_tx,
            shared,
            outgoing,
            incoming,
            epoch: 0,
            registry: Registry::default(),
            max_packet_size: qosmos_mqtt::codec::MAX_PACKET_SIZE,
            pub_waiters: HashMap::new(),
            qos0_unsent: Vec::new(),
            qos0_marks: VecDeque::new(),
            sub_waiters: HashMap::new(),
            sub_inflight: HashMap::new(),
            unsub_inflight: HashMap::new(),
            unacked_deliveries: 0,
            stalled: None,
            server_max_qos: QoS::ExactlyOnce,
            closing: None,
        };
        (task, Inbox { cmd_rx, ack_rx })
    }

    /// Connects, serves, reconnects, until shut down. With `first`, the outcome of the first
    /// attempt is reported there (fail fast) and a failure ends the task.
    pub(crate) async fn run(
        mut self,
        mut inbox: Inbox,
        mut first: Option<oneshot::Sender<Result<(), ClientError>>>,
    ) {
        loop {
            if self.close_due() {
                break;
            }
            match self.connect().await {
                Ok((conn, connack)) => {
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Ok(()));
                    }
                    self.backoff.reset();
                    let end = self.serve(&mut inbox, conn, connack).await;
                    self.on_connection_end(&end);
                    if matches!(end, End::Closed) {
                        break;
                    }
                    // A broker that accepts and drops at once must not make us spin.
                    let delay = self.backoff.next_delay();
                    self.offline(&mut inbox, delay).await;
                }
                Err(e) => {
                    StatsCell::add(&self.shared.stats.connect_failures, 1);
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Err(e));
                        break;
                    }
                    let delay = self.backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "MQTT connection attempt failed");
                    self.shared.emit(ClientEvent::ConnectFailed {
                        reason: e.to_string(),
                        retry_in: delay,
                    });
                    self.offline(&mut inbox, delay).await;
                }
            }
        }
        self.finish(inbox);
    }

    fn close_due(&self) -> bool {
        match &self.closing {
            None => false,
            Some((_, deadline)) => Instant::now() >= *deadline || self.outgoing.is_idle(),
        }
    }

    /// Serves commands and acknowledgements while disconnected, for `delay`.
    async fn offline(&mut self, inbox: &mut Inbox, delay: Duration) {
        let wake = Instant::now() + delay;
        loop {
            if self.close_due() {
                return;
            }
            let close_at = self.closing.as_ref().map(|(_, d)| *d);
            let deliver = self.deliver_tx.clone();
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => return,
                permit = deliver.reserve(), if self.stalled.is_some() => self.unstall(permit),
                _ = sleep_opt(close_at) => return,
                ack = inbox.ack_rx.recv() => {
                    if let Some(ack) = ack {
                        self.handle_ack(ack);
                    }
                }
                cmd = inbox.cmd_rx.recv(), if self.closing.is_none() => {
                    self.handle_command(cmd, None);
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<(Conn, ConnAck), ClientError> {
        let addr = self.opts.addr();
        let fail = |reason: String| ClientError::Connect {
            addr: addr.clone(),
            reason,
        };
        match tokio::time::timeout(self.opts.connect_timeout, self.handshake(&addr)).await {
            Ok(Ok(x)) => Ok(x),
            Ok(Err(HandshakeError::Refused(code))) => Err(ClientError::ConnectRefused(code)),
            Ok(Err(HandshakeError::Other(reason))) => Err(fail(reason)),
            Err(_) => Err(fail(format!(
                "no CONNACK within {:?}",
                self.opts.connect_timeout
            ))),
        }
    }

    async fn handshake(&mut self, addr: &str) -> Result<(Conn, ConnAck), HandshakeError> {
        let stream = TcpStream::connect(addr).await.map_err(HandshakeError::io)?;
        // Small control packets must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        let version = self.opts.protocol;
        let mut conn = Conn {
            reader,
            writer,
            rbuf: BytesMut::with_capacity(8 * 1024),
            wbuf: BytesMut::with_capacity(8 * 1024),
            queued: 0,
            written: 0,
            decoder: Decoder::new(Role::Client, Some(version)),
            encoder: Encoder::new(version),
            keep_alive: KeepAlive::client(self.opts.keep_alive, Instant::now().into_std()),
        };
        conn.encode(&Packet::Connect(Box::new(self.connect_packet())))
            .map_err(HandshakeError::Other)?;
        conn.writer
            .write_all_buf(&mut conn.wbuf)
            .await
            .map_err(HandshakeError::io)?;
        conn.written = conn.queued;
        loop {
            match conn.decoder.decode(&mut conn.rbuf) {
                Ok(Some(Packet::ConnAck(ack))) => {
                    if !ack.reason_code.is_success() {
                        return Err(HandshakeError::Refused(ack.reason_code));
                    }
                    return Ok((conn, ack));
                }
                Ok(Some(p)) => {
                    return Err(HandshakeError::Other(format!(
                        "expected CONNACK, got {}",
                        p.packet_type()
                    )));
                }
                Ok(None) => {}
                Err(e) => return Err(HandshakeError::Other(format!("bad CONNACK: {e}"))),
            }
            let n = conn
                .reader
                .read_buf(&mut conn.rbuf)
                .await
                .map_err(HandshakeError::io)?;
            if n == 0 {
                return Err(HandshakeError::Other(
                    "connection closed before CONNACK".to_owned(),
                ));
            }
        }
    }

    fn connect_packet(&self) -> Connect {
        let o = &self.opts;
        let mut c = Connect::new(o.protocol, o.client_id.as_str());
        c.clean_start = o.clean_start;
        c.keep_alive = o.keep_alive;
        c.username = o.username.as_deref().map(Into::into);
        c.password = o.password.clone();
        c.will = o.will.as_ref().map(|w| w.to_last_will());
        if o.protocol == ProtocolVersion::V5 {
            if let Some(expiry) = o.session_expiry.filter(|&s| s > 0) {
                c.properties.set_session_expiry_interval(expiry);
            }
            if o.receive_maximum != u16::MAX {
                c.properties.set_receive_maximum(o.receive_maximum);
            }
        } else {
            c.will = c.will.map(|mut w| {
                w.properties = Properties::new();
                w
            });
        }
        c
    }

    /// Runs one connection until it ends.
    async fn serve(&mut self, inbox: &mut Inbox, mut conn: Conn, connack: ConnAck) -> End {
        if let Err(reason) = self.on_connected(&mut conn, &connack) {
            return End::Lost(reason);
        }
        // Packets that came in the same read as CONNACK.
        let first = self.read_packets(&mut conn);
        let result = match first {
            Ok(()) => self.serve_loop(inbox, &mut conn).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                // Acknowledgements made before `disconnect()` was called travel on their own
                // channel and may not have been seen yet: send them before saying goodbye, or
                // the broker redelivers messages the application already handled.
                while let Ok(ack) = inbox.ack_rx.try_recv() {
                    self.handle_ack(ack);
                }
                let _ = self.drain(&mut conn);
                // Closing: say goodbye so the broker drops the will, and flush.
                let _ = conn.encode(&Packet::Disconnect(Disconnect::new(
                    ReasonCode::NORMAL_DISCONNECTION,
                )));
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    conn.writer.write_all_buf(&mut conn.wbuf),
                )
                .await;
                let _ = conn.writer.shutdown().await;
                End::Closed
            }
            Err(reason) => {
                if self.opts.protocol == ProtocolVersion::V5
                    && let Some(code) = reason.1
                {
                    let _ = conn.encode(&Packet::Disconnect(Disconnect::new(code)));
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        conn.writer.write_all_buf(&mut conn.wbuf),
                    )
                    .await;
                }
                End::Lost(reason.0)
            }
        }
    }

    fn on_connected(&mut self, conn: &mut Conn, connack: &ConnAck) -> Result<(), String> {
        let sp = connack.session_present;
        let props = &connack.properties;
        if self.opts.protocol == ProtocolVersion::V5 {
            self.outgoing
                .set_receive_maximum(props.receive_maximum().unwrap_or(u16::MAX));
            if let Some(max) = props.maximum_packet_size() {
                conn.encoder.max_packet_size = max;
            }
            if let Some(ka) = props.server_keep_alive() {
                conn.keep_alive = KeepAlive::client(ka, Instant::now().into_std());
            }
            self.server_max_qos = props
                .maximum_qos()
                .and_then(QoS::from_u8)
                .unwrap_or(QoS::ExactlyOnce);
            if props.maximum_qos().is_some_and(|q| q < 2) {
                tracing::warn!(
                    maximum_qos = ?props.maximum_qos(),
                    "the broker supports less than QoS 2"
                );
            }
        }
        self.max_packet_size = conn.encoder.max_packet_size;
        StatsCell::add(&self.shared.stats.connects, 1);
        let mut republished = 0;
        for orphan in self.outgoing.resume(sp) {
            match orphan {
                Orphan::Requeued { .. } => republished += 1,
                Orphan::Released { ticket, .. } => {
                    self.outbox_done(ticket);
                    // The broker took it (PUBREC) before losing the session.
                    self.resolve_ok(ticket, QoS::ExactlyOnce, ReasonCode::SUCCESS);
                }
                Orphan::Unacknowledged { ticket, .. } => {
                    // Not produced under SessionLoss::Requeue; fail it rather than lose it.
                    if let Some(w) = self.pub_waiters.remove(&ticket) {
                        let _ = w.send(Err(ClientError::NotSent));
                    }
                }
            }
        }
        self.incoming.resume(sp);
        if !sp {
            self.epoch += 1;
        }
        tracing::info!(session_present = sp, "MQTT connected");
        let _ = self.shared.connected.send(true);
        self.shared.emit(ClientEvent::Connected {
            session_present: sp,
        });
        if republished > 0 {
            StatsCell::add(&self.shared.stats.republished, republished as u64);
            tracing::warn!(
                count = republished,
                "the broker lost our session: resending unacknowledged messages (subscribers may see them twice)"
            );
            self.shared
                .emit(ClientEvent::Republished { count: republished });
        }
        let (batches, stale) = self.registry.on_connect(sp);
        let restored: usize = batches.iter().map(Vec::len).sum();
        if !sp && restored > 0 {
            StatsCell::add(&self.shared.stats.subscriptions_restored, restored as u64);
            tracing::info!(
                count = restored,
                "restoring subscriptions with their own options"
            );
        }
        for batch in batches {
            self.send_subscribe(conn, batch, !sp)?;
        }
        if !stale.is_empty() {
            self.send_unsubscribe(conn, stale, None)?;
        }
        Ok(())
    }

    async fn serve_loop(
        &mut self,
        inbox: &mut Inbox,
        conn: &mut Conn,
    ) -> Result<(), (String, Option<ReasonCode>)> {
        loop {
            self.drain(conn).map_err(|e| (e, None))?;
            if let Some((_, deadline)) = &self.closing {
                let quiet = self.outgoing.is_idle() && self.unacked_deliveries == 0;
                if (quiet || Instant::now() >= *deadline) && conn.wbuf.is_empty() {
                    return Ok(());
                }
            }
            let ka = conn.keep_alive.poll_timeout().map(Instant::from_std);
            let close_at = self.closing.as_ref().map(|(_, d)| *d);
            let deliver = self.deliver_tx.clone();
            tokio::select! {
                res = conn.writer.write_buf(&mut conn.wbuf), if !conn.wbuf.is_empty() => {
                    match res {
                        Ok(0) | Err(_) => return Err(("write failed".to_owned(), None)),
                        Ok(n) => {
                            conn.written += n as u64;
                            conn.keep_alive.handle_sent(Instant::now().into_std());
                            self.qos0_written(conn.written);
                        }
                    }
                }
                permit = deliver.reserve(), if self.stalled.is_some() => {
                    self.unstall(permit);
                    self.read_packets(conn)?;
                }
                ack = inbox.ack_rx.recv() => {
                    if let Some(ack) = ack {
                        self.handle_ack(ack);
                    }
                }
                cmd = inbox.cmd_rx.recv(), if self.closing.is_none() => {
                    self.handle_command(cmd, Some(conn));
                    // Take the commands already waiting too, so that one write carries them
                    // all instead of one system call per small packet.
                    for _ in 0..COMMAND_BATCH {
                        if self.closing.is_some() {
                            break;
                        }
                        match inbox.cmd_rx.try_recv() {
                            Ok(cmd) => self.handle_command(Some(cmd), Some(conn)),
                            Err(_) => break,
                        }
                    }
                }
                // While the handlers are behind, read only a little ahead: enough to notice the
                // connection closing, not enough to buffer without bound.
                res = conn.reader.read_buf(&mut conn.rbuf),
                    if self.stalled.is_none() || conn.rbuf.len() < READ_AHEAD => {
                    match res {
                        Ok(0) => return Err(("the broker closed the connection".to_owned(), None)),
                        Err(e) => return Err((format!("read failed: {e}"), None)),
                        Ok(_) => {
                            conn.keep_alive.handle_received(Instant::now().into_std());
                            self.read_packets(conn)?;
                        }
                    }
                }
                _ = sleep_opt(ka) => {
                    let now = Instant::now().into_std();
                    if self.stalled.is_some() && conn.rbuf.len() >= READ_AHEAD {
                        // We stopped reading on purpose: silence is ours, not the broker's.
                        conn.keep_alive.handle_received(now);
                    }
                    match conn.keep_alive.handle_timeout(now) {
                        KeepAliveAction::SendPing => {
                            conn.encode(&Packet::PingReq).map_err(|e| (e, None))?;
                        }
                        KeepAliveAction::Expired => {
                            return Err((
                                "keep alive: no answer from the broker".to_owned(),
                                Some(ReasonCode::KEEP_ALIVE_TIMEOUT),
                            ));
                        }
                        KeepAliveAction::Nothing => {}
                    }
                }
                _ = sleep_opt(close_at) => {}
            }
        }
    }

    /// Moves the state machines' output into the write buffer.
    fn drain(&mut self, conn: &mut Conn) -> Result<(), String> {
        while let Some(packet) = self.outgoing.poll_transmit() {
            if let Packet::Publish(p) = &packet
                && p.qos == QoS::AtMostOnce
            {
                let ticket = self.take_qos0(p);
                if let Err(e) = conn.encode(&packet) {
                    if let Some(w) = ticket.and_then(|t| self.pub_waiters.remove(&t)) {
                        let _ = w.send(Err(ClientError::Encode(e)));
                    }
                    continue;
                }
                if let Some(t) = ticket {
                    self.qos0_marks.push_back((conn.queued, t));
                }
                continue;
            }
            if let Err(e) = conn.encode(&packet) {
                // Checked against the broker's limit when published; only a lowered limit on a
                // new connection gets here.
                tracing::error!(error = %e, "cannot send a packet");
            }
        }
        while let Some(packet) = self.incoming.poll_transmit() {
            conn.encode(&packet)?;
        }
        Ok(())
    }

    fn take_qos0(&mut self, p: &Publish) -> Option<Ticket> {
        let key = (p.payload.as_ptr() as usize, p.payload.len());
        let pos = self
            .qos0_unsent
            .iter()
            .position(|u| u.payload == key && u.topic == p.topic.as_str())
            .or_else(|| {
                self.qos0_unsent
                    .iter()
                    .position(|u| u.topic == p.topic.as_str())
            })?;
        Some(self.qos0_unsent.remove(pos).ticket)
    }

    fn qos0_written(&mut self, written: u64) {
        while let Some(&(end, ticket)) = self.qos0_marks.front() {
            if end > written {
                break;
            }
            self.qos0_marks.pop_front();
            self.resolve_ok(ticket, QoS::AtMostOnce, ReasonCode::SUCCESS);
        }
    }

    fn read_packets(&mut self, conn: &mut Conn) -> Result<(), (String, Option<ReasonCode>)> {
        while self.stalled.is_none() {
            match conn.decoder.decode(&mut conn.rbuf) {
                Ok(Some(packet)) => self.handle_packet(packet)?,
                Ok(None) => break,
                Err(e) => {
                    return Err((
                        format!("bad packet from the broker: {e}"),
                        Some(e.reason_code()),
                    ));
                }
            }
        }
        Ok(())
    }

    fn handle_packet(&mut self, packet: Packet) -> Result<(), (String, Option<ReasonCode>)> {
        let protocol = |e: StateError| {
            (
                format!("protocol error from the broker: {e}"),
                Some(e.disconnect_reason_code()),
            )
        };
        match packet {
            Packet::Publish(p) => match self.incoming.handle_publish(p) {
                Ok(Some(p)) => self.deliver(p),
                Ok(None) => {
                    StatsCell::add(&self.shared.stats.duplicates_dropped, 1);
                    tracing::debug!("resent PUBLISH recognised, not handed over again");
                }
                Err(e) => return Err(protocol(e)),
            },
            Packet::PubAck(ack) => match self.outgoing.handle_puback(&ack) {
                Ok(done) => self.complete(done),
                Err(e) => ignore_or(e).map_err(protocol)?,
            },
            Packet::PubRec(rec) => match self.outgoing.handle_pubrec(&rec) {
                Ok(Some(done)) => self.complete(done),
                Ok(None) => {}
                Err(e) => ignore_or(e).map_err(protocol)?,
            },
            Packet::PubComp(comp) => match self.outgoing.handle_pubcomp(&comp) {
                Ok(done) => self.complete(done),
                Err(e) => ignore_or(e).map_err(protocol)?,
            },
            Packet::PubRel(rel) => {
                let early = self.incoming.stats().early_pubrel;
                self.incoming.handle_pubrel(&rel).map_err(protocol)?;
                if self.incoming.stats().early_pubrel > early {
                    tracing::warn!(
                        packet_id = rel.packet_id.get(),
                        "the broker sent PUBREL before our PUBREC (a broker bug); \
                         the message is completed once handled"
                    );
                }
            }
            Packet::SubAck(ack) => self.handle_suback(ack),
            Packet::UnsubAck(ack) => self.handle_unsuback(ack),
            Packet::PingResp => {}
            Packet::Disconnect(d) => {
                let reason = d.properties.reason_string().map(|s| s.to_string());
                return Err((
                    format!(
                        "the broker sent DISCONNECT: {}{}",
                        d.reason_code,
                        reason.map(|r| format!(" ({r})")).unwrap_or_default()
                    ),
                    None,
                ));
            }
            other => {
                return Err((
                    format!("unexpected {} from the broker", other.packet_type()),
                    Some(ReasonCode::PROTOCOL_ERROR),
                ));
            }
        }
        Ok(())
    }

    fn unstall(&mut self, permit: Result<mpsc::Permit<'_, Message>, mpsc::error::SendError<()>>) {
        match (permit, self.stalled.take()) {
            (Ok(permit), Some(msg)) => permit.send(msg),
            // The dispatcher is gone (shutting down): dropping acknowledges.
            (Err(_), _) | (_, None) => {}
        }
    }

    fn deliver(&mut self, p: Publish) {
        StatsCell::add(&self.shared.stats.received, 1);
        let ack = match (p.qos, p.packet_id) {
            (QoS::AtMostOnce, _) | (_, None) => None,
            (_, Some(packet_id)) => {
                self.unacked_deliveries += 1;
                Some((
                    AckRequest {
                        packet_id,
                        epoch: self.epoch,
                    },
                    self.ack_tx.clone(),
                ))
            }
        };
        let msg = Message::new(p, ack);
        match self.deliver_tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => self.stalled = Some(msg),
            // The dispatcher is gone (shutting down): dropping acknowledges.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn handle_ack(&mut self, ack: AckRequest) {
        self.unacked_deliveries = self.unacked_deliveries.saturating_sub(1);
        if ack.epoch != self.epoch {
            tracing::debug!(
                packet_id = ack.packet_id,
                "acknowledgement for a lost session dropped"
            );
            return;
        }
        if let Err(e) = self.incoming.ack(ack.packet_id) {
            tracing::debug!(error = %e, "acknowledgement not needed");
        }
    }

    fn outbox_done(&mut self, ticket: Ticket) {
        if let (Some(outbox), Some(id)) = (self.outbox.as_mut(), self.outbox_ids.remove(&ticket))
            && let Err(e) = outbox.done(id)
        {
            tracing::error!(error = %e, path = %outbox.path().display(), "outbox: cannot mark a message done");
        }
    }

    fn complete(&mut self, done: Completed) {
        self.outbox_done(done.ticket);
        if done.accepted {
            StatsCell::add(&self.shared.stats.publish_acked, 1);
            self.resolve_ok(done.ticket, done.qos, done.reason_code);
        } else {
            StatsCell::add(&self.shared.stats.publish_refused, 1);
            tracing::warn!(reason = %done.reason_code, "the broker refused a message");
            if let Some(w) = self.pub_waiters.remove(&done.ticket) {
                let _ = w.send(Err(ClientError::PublishRefused(done.reason_code)));
            }
        }
    }

    fn resolve_ok(&mut self, ticket: Ticket, qos: QoS, reason_code: ReasonCode) {
        if let Some(w) = self.pub_waiters.remove(&ticket) {
            let _ = w.send(Ok(PublishOutcome { qos, reason_code }));
        }
    }

    fn handle_suback(&mut self, ack: SubAck) {
        self.outgoing.release_packet_id(ack.packet_id);
        let Some(inflight) = self.sub_inflight.remove(&ack.packet_id) else {
            tracing::warn!(packet_id = ack.packet_id, "SUBACK for no SUBSCRIBE");
            return;
        };
        let restored = inflight.restored;
        for (i, (filter, options)) in inflight.entries.into_iter().enumerate() {
            let code = ack
                .reason_codes
                .get(i)
                .copied()
                .unwrap_or(ReasonCode::UNSPECIFIED_ERROR);
            let result = SubscribeOutcome::from_suback(options.qos, code);
            // A caller still waits for this exact subscription: a refusal goes to them.
            let awaited = self
                .sub_waiters
                .get(&filter)
                .is_some_and(|ws| ws.iter().any(|(o, _)| *o == options));
            self.registry.confirm(&filter, &options, result);
            let stats = &self.shared.stats;
            match result {
                Ok(outcome) => {
                    if let SubscribeOutcome::Downgraded { requested, granted } = outcome {
                        StatsCell::add(&stats.downgrades, 1);
                        tracing::warn!(
                            %filter, %requested, %granted,
                            "the broker granted less QoS than asked for"
                        );
                        self.shared.emit(ClientEvent::Downgraded {
                            filter: filter.clone(),
                            requested,
                            granted,
                            restored,
                        });
                    } else {
                        tracing::debug!(%filter, granted = %outcome.granted(), "subscribed");
                    }
                    self.shared.emit(ClientEvent::Subscribed {
                        filter: filter.clone(),
                        outcome,
                        restored,
                    });
                }
                Err(reason) => {
                    StatsCell::add(&stats.subscribe_refusals, 1);
                    tracing::warn!(%filter, %reason, restored, "the broker refused a subscription");
                    if !restored || awaited {
                        self.registry.forget_if(&filter, &options);
                    }
                    self.shared.emit(ClientEvent::SubscribeRefused {
                        filter: filter.clone(),
                        reason,
                        restored,
                    });
                }
            }
            if let Some(waiters) = self.sub_waiters.get_mut(&filter) {
                let (done, keep): (Vec<_>, Vec<_>) =
                    waiters.drain(..).partition(|(o, _)| *o == options);
                *waiters = keep;
                if waiters.is_empty() {
                    self.sub_waiters.remove(&filter);
                }
                for (_, w) in done {
                    let _ = w.send(result.map_err(|reason| ClientError::SubscribeRefused {
                        filter: filter.clone(),
                        reason,
                    }));
                }
            }
        }
    }

    fn handle_unsuback(&mut self, ack: UnsubAck) {
        self.outgoing.release_packet_id(ack.packet_id);
        let Some((filters, reply)) = self.unsub_inflight.remove(&ack.packet_id) else {
            tracing::warn!(packet_id = ack.packet_id, "UNSUBACK for no UNSUBSCRIBE");
            return;
        };
        let refused = filters
            .iter()
            .zip(&ack.reason_codes)
            .find(|(_, c)| !c.is_success());
        if let Some((filter, code)) = refused {
            tracing::warn!(%filter, reason = %code, "the broker refused to unsubscribe");
        }
        if let Some(reply) = reply {
            let _ = reply.send(match refused {
                Some((filter, code)) => Err(ClientError::UnsubscribeRefused {
                    filter: filter.clone(),
                    reason: *code,
                }),
                None => Ok(()),
            });
        }
    }

    fn send_subscribe(
        &mut self,
        conn: &mut Conn,
        entries: Vec<(String, SubscribeOptions)>,
        restored: bool,
    ) -> Result<(), String> {
        let Some(packet_id) = self.outgoing.reserve_packet_id() else {
            return Err("no free packet identifier for SUBSCRIBE".to_owned());
        };
        let mut properties = Properties::new();
        if self.opts.protocol == ProtocolVersion::V5
            && let Some(id) = entries.first().and_then(|(_, o)| o.subscription_identifier)
        {
            properties.add_subscription_identifier(id);
        }
        let packet = Packet::Subscribe(Subscribe {
            packet_id,
            subscriptions: entries
                .iter()
                .map(|(f, o)| Subscription {
                    filter: f.as_str().into(),
                    options: o.wire_options(),
                })
                .collect(),
            properties,
        });
        if let Err(e) = conn.encode(&packet) {
            self.outgoing.release_packet_id(packet_id);
            return Err(e);
        }
        StatsCell::add(&self.shared.stats.subscribe_packets, 1);
        self.sub_inflight
            .insert(packet_id, SubInflight { entries, restored });
        Ok(())
    }

    fn send_unsubscribe(
        &mut self,
        conn: &mut Conn,
        filters: Vec<String>,
        reply: Option<Reply<()>>,
    ) -> Result<(), String> {
        let fail = |task: &mut Task, filters: Vec<String>, reply: Option<Reply<()>>| {
            // Not sent: told to the broker on the next resumed session instead.
            for f in &filters {
                task.registry.mark_stale(f);
            }
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
        };
        let Some(packet_id) = self.outgoing.reserve_packet_id() else {
            fail(self, filters, reply);
            return Err("no free packet identifier for UNSUBSCRIBE".to_owned());
        };
        let packet = Packet::Unsubscribe(Unsubscribe {
            packet_id,
            filters: filters.iter().map(|f| f.as_str().into()).collect(),
            properties: Properties::new(),
        });
        if let Err(e) = conn.encode(&packet) {
            self.outgoing.release_packet_id(packet_id);
            fail(self, filters, reply);
            return Err(e);
        }
        self.unsub_inflight.insert(packet_id, (filters, reply));
        Ok(())
    }

    fn handle_command(&mut self, cmd: Option<Command>, conn: Option<&mut Conn>) {
        let Some(cmd) = cmd else {
            // Every handle is gone: nobody can ask for anything more. Finish what is in flight.
            self.closing = Some((None, Instant::now() + self.opts.shutdown_timeout));
            return;
        };
        match cmd {
            Command::Publish(msg, reply) => self.publish(msg, reply),
            Command::Subscribe(filter, options, reply) => {
                if let Err(e) = topic::validate_topic_filter(&filter) {
                    let _ = reply.send(Err(ClientError::InvalidTopic {
                        topic: filter,
                        reason: e.to_string(),
                    }));
                    return;
                }
                self.registry.insert(&filter, options);
                if conn.is_none() {
                    self.cancel_replaced_waiters();
                }
                self.sub_waiters
                    .entry(filter.clone())
                    .or_default()
                    .push((options, reply));
                if let Some(conn) = conn
                    && let Err(e) = self.send_subscribe(conn, vec![(filter, options)], false)
                {
                    tracing::error!(error = %e, "cannot send SUBSCRIBE now; sent on reconnect");
                }
            }
            Command::Unsubscribe(filter, reply) => {
                self.registry.remove(&filter);
                match conn {
                    Some(conn) => {
                        // On failure the filter is marked stale and the reply answered.
                        if let Err(e) = self.send_unsubscribe(conn, vec![filter], Some(reply)) {
                            tracing::error!(error = %e, "cannot send UNSUBSCRIBE now");
                        }
                    }
                    None => {
                        // Told to the broker when a session resumes; a lost session has none.
                        self.registry.mark_stale(&filter);
                        if let Some(waiters) = self.sub_waiters.remove(&filter) {
                            for (_, w) in waiters {
                                let _ = w.send(Err(ClientError::Cancelled));
                            }
                        }
                        let _ = reply.send(Ok(()));
                    }
                }
            }
            Command::Subscriptions(reply) => {
                let _ = reply.send(self.registry.list());
            }
            Command::Disconnect(reply) => {
                self.closing = Some((Some(reply), Instant::now() + self.opts.shutdown_timeout));
            }
        }
    }

    fn publish(&mut self, msg: Publish, reply: Reply<PublishOutcome>) {
        if let Err(e) = topic::validate_topic_name(&msg.topic) {
            let _ = reply.send(Err(ClientError::InvalidTopic {
                topic: msg.topic.to_string(),
                reason: e.to_string(),
            }));
            return;
        }
        if msg.qos > self.server_max_qos {
            let _ = reply.send(Err(ClientError::QosNotSupported {
                requested: msg.qos,
                maximum: self.server_max_qos,
            }));
            return;
        }
        let encoder = Encoder {
            version: self.opts.protocol,
            max_packet_size: self.max_packet_size,
        };
        let mut probe = msg.clone();
        if probe.qos != QoS::AtMostOnce {
            probe.packet_id = PacketId::new(1);
        }
        if let Err(e) = qosmos_mqtt::encoded_len(&Packet::Publish(probe), encoder.version)
            .map_err(|e| e.to_string())
            .and_then(|len| {
                if len > encoder.max_packet_size as usize {
                    Err(format!(
                        "{len} bytes, the broker accepts {}",
                        encoder.max_packet_size
                    ))
                } else {
                    Ok(())
                }
            })
        {
            let _ = reply.send(Err(ClientError::Encode(e)));
            return;
        }
        let qos0 = (msg.qos == QoS::AtMostOnce).then(|| {
            (
                msg.topic.to_string(),
                (msg.payload.as_ptr() as usize, msg.payload.len()),
            )
        });
        let mut stored = None;
        if msg.qos != QoS::AtMostOnce
            && let Some(outbox) = self.outbox.as_mut()
        {
            match outbox.append(&msg) {
                Ok(id) => stored = Some(id),
                Err(e) => {
                    tracing::error!(error = %e, path = %outbox.path().display(), "outbox: cannot store a message");
                    let _ = reply.send(Err(ClientError::Outbox(e.to_string())));
                    return;
                }
            }
        }
        let result = self.outgoing.publish(msg);
        if let (Some(outbox), Some(id)) = (self.outbox.as_mut(), stored) {
            match &result {
                Ok(ticket) => {
                    self.outbox_ids.insert(*ticket, id);
                }
                Err(_) => {
                    // Not accepted after all: take it out again.
                    let _ = outbox.done(id);
                }
            }
        }
        match result {
            Ok(ticket) => {
                StatsCell::add(&self.shared.stats.published, 1);
                if let Some((topic, payload)) = qos0 {
                    self.qos0_unsent.push(Qos0Unsent {
                        ticket,
                        topic,
                        payload,
                    });
                }
                self.pub_waiters.insert(ticket, reply);
            }
            Err(full) => {
                StatsCell::add(&self.shared.stats.queue_full, 1);
                let limit = match full.limit {
                    QueueLimit::Count(n) => format!("{n} messages"),
                    QueueLimit::Bytes(n) => format!("{n} bytes"),
                    other => format!("{other:?}"),
                };
                let _ = reply.send(Err(ClientError::QueueFull { limit }));
            }
        }
    }

    /// Subscribe callers whose options were replaced (or unsubscribed) before their SUBSCRIBE
    /// was answered: no SUBACK will come for what they asked.
    fn cancel_replaced_waiters(&mut self) {
        let registry = &self.registry;
        let mut cancelled = Vec::new();
        for (filter, waiters) in self.sub_waiters.iter_mut() {
            let current = registry.options(filter);
            let (keep, gone): (Vec<_>, Vec<_>) =
                waiters.drain(..).partition(|(o, _)| Some(*o) == current);
            *waiters = keep;
            cancelled.extend(gone);
        }
        self.sub_waiters.retain(|_, w| !w.is_empty());
        for (_, w) in cancelled {
            let _ = w.send(Err(ClientError::Cancelled));
        }
    }

    fn on_connection_end(&mut self, end: &End) {
        self.outgoing.on_disconnect();
        self.incoming.on_disconnect();
        for (packet_id, _) in std::mem::take(&mut self.sub_inflight) {
            // The entries stay unconfirmed in the registry: sent again on the next connection.
            self.outgoing.release_packet_id(packet_id);
        }
        for (packet_id, (filters, reply)) in std::mem::take(&mut self.unsub_inflight) {
            self.outgoing.release_packet_id(packet_id);
            for f in &filters {
                self.registry.mark_stale(f);
            }
            if let Some(reply) = reply {
                let _ = reply.send(Ok(()));
            }
        }
        self.cancel_replaced_waiters();
        for (_, ticket) in std::mem::take(&mut self.qos0_marks) {
            if let Some(w) = self.pub_waiters.remove(&ticket) {
                let _ = w.send(Err(ClientError::NotSent));
            }
        }
        let _ = self.shared.connected.send(false);
        if let End::Lost(reason) = end {
            StatsCell::add(&self.shared.stats.connection_losses, 1);
            tracing::warn!(%reason, "MQTT connection lost");
            self.shared.emit(ClientEvent::Disconnected {
                reason: reason.clone(),
            });
        } else {
            self.shared.emit(ClientEvent::Disconnected {
                reason: "shut down".to_owned(),
            });
        }
    }

    /// The task ends: everything still waiting gets an answer.
    fn finish(mut self, mut inbox: Inbox) {
        for (_, w) in self.pub_waiters.drain() {
            let _ = w.send(Err(ClientError::Closed));
        }
        for (_, ws) in self.sub_waiters.drain() {
            for (_, w) in ws {
                let _ = w.send(Err(ClientError::Closed));
            }
        }
        let _ = self.shared.connected.send(false);
        self.shared.emit(ClientEvent::Closed);
        if let Some((Some(reply), _)) = self.closing.take() {
            let _ = reply.send(());
        }
        inbox.cmd_rx.close();
        while let Ok(cmd) = inbox.cmd_rx.try_recv() {
            drop(cmd);
        }
    }
}

enum HandshakeError {
    Refused(ReasonCode),
    Other(String),
}

impl HandshakeError {
    fn io(e: std::io::Error) -> HandshakeError {
        HandshakeError::Other(e.to_string())
    }
}

/// A PUBACK / PUBREC / PUBCOMP naming an identifier not in flight loses nothing: log it.
fn ignore_or(e: StateError) -> Result<(), StateError> {
    match e {
        StateError::PacketIdNotFound { .. } => {
            tracing::warn!(error = %e, "ignoring acknowledgement");
            Ok(())
        }
        e => Err(e),
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
