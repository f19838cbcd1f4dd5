//! One task per connection: the CONNECT handshake, then a loop that reads packets, hands them
//! to the session's state machines and the router, and writes whatever they produce.

use crate::config::Limits;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::session::{Connection, Session, SessionState, SubOptions};
use bytes::BytesMut;
use qosmos_mqtt::state::{
    AckMode, Incoming, IncomingConfig, KeepAlive, KeepAliveAction, Outgoing, OutgoingConfig,
    StateError,
};
use qosmos_mqtt::{
    ConnAck, Connect, DecodeError, Decoder, Disconnect, Encoder, LastWill, MqttStr, Packet,
    Properties, PropertyId, ProtocolVersion, PubRel, Publish, ReasonCode, RetainHandling, Role,
    SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, watch};

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// DISCONNECT without will (normal disconnection).
    Normal,
    /// DISCONNECT 0x04: publish the will.
    NormalWithWill,
    /// The socket closed or failed without DISCONNECT: publish the will.
    Lost,
    /// A protocol violation; DISCONNECT with this code (5.0) was sent.
    ProtocolError(ReasonCode),
    /// Keep alive expired.
    KeepAlive,
    /// Another connection took the session over.
    TakenOver,
    /// The broker is shutting down.
    Shutdown,
}

impl End {
    fn publishes_will(self) -> bool {
        !matches!(self, End::Normal)
    }
}

enum ReadError {
    Closed,
    Io,
    Decode(DecodeError),
}

/// Reads until `decoder` yields one packet.
async fn read_packet(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    decoder: &mut Decoder,
) -> Result<Packet, ReadError> {
    loop {
        if let Some(p) = decoder.decode(buf).map_err(ReadError::Decode)? {
            return Ok(p);
        }
        buf.reserve(4096);
        match rd.read_buf(buf).await {
            Ok(0) => return Err(ReadError::Closed),
            Ok(_) => {}
            Err(_) => return Err(ReadError::Io),
        }
    }
}

/// Reads the first packet, like [`read_packet`], and also returns the protocol level of the
/// CONNECT at the front of the buffer if it was seen: the decoder consumes a packet it rejects,
/// so the level must be taken before decoding to answer a bad 5.0 CONNECT with a CONNACK.
async fn read_connect(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    decoder: &mut Decoder,
) -> (Result<Packet, ReadError>, Option<u8>) {
    let mut level = None;
    loop {
        level = level.or_else(|| sniff_level(buf));
        match decoder.decode(buf) {
            Ok(Some(p)) => return (Ok(p), level),
            Ok(None) => {}
            Err(e) => return (Err(ReadError::Decode(e)), level),
        }
        buf.reserve(4096);
        match rd.read_buf(buf).await {
            Ok(0) => return (Err(ReadError::Closed), level),
            Ok(_) => {}
            Err(_) => return (Err(ReadError::Io), level),
        }
    }
}

/// The protocol level of a CONNECT at the front of `buf`, if that many bytes are there.
fn sniff_level(buf: &[u8]) -> Option<u8> {
    let mut i = 1;
    while *buf.get(i)? & 0x80 != 0 {
        i += 1;
    }
    let name_len = u16::from_be_bytes([*buf.get(i + 1)?, *buf.get(i + 2)?]) as usize;
    buf.get(i + 3 + name_len).copied()
}

/// How a session's outgoing queue is limited.
fn outgoing_config(limits: &Limits) -> OutgoingConfig {
    OutgoingConfig::default()
        .max_pending(limits.max_queued_messages)
        .max_pending_bytes(limits.max_queued_bytes)
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(
    hub: Arc<Hub>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut rbuf = BytesMut::with_capacity(4096);
    let mut decoder = Decoder::new(Role::Server, None);
    decoder.set_max_packet_size(hub.limits.max_packet_size);

    let first = tokio::time::timeout(
        hub.limits.connect_timeout,
        read_connect(&mut rd, &mut rbuf, &mut decoder),
    )
    .await;
    let (first, level) = match first {
        Ok((r, level)) => (Ok(r), level),
        Err(e) => (Err(e), None),
    };
    let connect = match first {
        Err(_) => {
            Metrics::inc(&hub.metrics.connect_timeouts);
            tracing::debug!(%peer, "no CONNECT in time");
            return;
        }
        Ok(Err(ReadError::Decode(e))) => {
            Metrics::inc(&hub.metrics.protocol_errors);
            tracing::info!(%peer, error = %e, "refused CONNECT");
            let (version, code) = match e {
                DecodeError::UnsupportedProtocolVersion(_) => {
                    (ProtocolVersion::V311, e.reason_code())
                }
                _ if level == Some(5) => (ProtocolVersion::V5, e.reason_code()),
                _ => return,
            };
            let ack = ConnAck {
                session_present: false,
                reason_code: code,
                properties: Properties::new(),
            };
            let _ = write_packet(&mut wr, version, &Packet::ConnAck(ack)).await;
            return;
        }
        Ok(Err(_)) => return,
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(_)) => return, // the decoder accepts only CONNECT first
    };
    let mut conn = match Conn::accept(hub.clone(), connect, peer, &mut wr).await {
        Some(c) => c,
        None => return,
    };
    Metrics::inc(&hub.metrics.clients_connected);
    let end = conn.run(&mut rd, &mut wr, rbuf, decoder, shutdown).await;
    Metrics::dec(&hub.metrics.clients_connected);
    // Counted here, once per connection, so that every way of ending with a protocol error
    // (bad packet, state error, AUTH, bad topic alias, ...) shows in the metric.
    if let End::ProtocolError(_) = end {
        Metrics::inc(&hub.metrics.protocol_errors);
    }
    conn.finish(end, &mut wr).await;
}

async fn write_packet(
    wr: &mut OwnedWriteHalf,
    version: ProtocolVersion,
    p: &Packet,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    if qosmos_mqtt::encode_packet(p, version, &mut buf).is_ok() {
        wr.write_all(&buf).await?;
    }
    Ok(())
}

/// A connection past its CONNECT.
struct Conn {
    hub: Arc<Hub>,
    id: u64,
    session: Arc<Session>,
    client_id: Arc<str>,
    version: ProtocolVersion,
    encoder: Encoder,
    waker: Arc<Notify>,
    will: Option<LastWill>,
    keep_alive: KeepAlive,
    /// Topic aliases the client set (5.0), alias → topic.
    aliases: HashMap<u16, MqttStr>,
    /// Session expiry from CONNECT; 0 there forbids a non-zero value at DISCONNECT.
    connect_expiry: u32,
    wbuf: BytesMut,
}

impl Conn {
    /// Checks the CONNECT, attaches (or creates) the session, taking it over from another
    /// connection if needed, and sends CONNACK. `None` when the connection was refused.
    async fn accept(
        hub: Arc<Hub>,
        c: Connect,
        peer: SocketAddr,
        wr: &mut OwnedWriteHalf,
    ) -> Option<Conn> {
        let v = c.protocol;
        let refuse = |code: ReasonCode| {
            Packet::ConnAck(ConnAck {
                session_present: false,
                reason_code: code,
                properties: Properties::new(),
            })
        };
        if c.properties.authentication_method().is_some() {
            // No extended authentication methods are configured.
            let _ = write_packet(wr, v, &refuse(ReasonCode::BAD_AUTHENTICATION_METHOD)).await;
            return None;
        }
        let id = hub.next_connection_id();
        let mut assigned = None;
        let client_id: Arc<str> = if c.client_id.is_empty() {
            if v == ProtocolVersion::V311 && !c.clean_start {
                // [MQTT-3.1.3-8]
                let _ = write_packet(wr, v, &refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID)).await;
                return None;
            }
            let name = format!(
                "qosmos-{:x}-{id:x}",
                hub.started.elapsed().as_nanos() & 0xFFFF_FFFF
            );
            assigned = Some(name.clone());
            Arc::from(name)
        } else {
            Arc::from(c.client_id.as_str())
        };
        let limits = &hub.limits;
        let expiry = match v {
            ProtocolVersion::V5 => c.properties.session_expiry_interval().unwrap_or(0),
            ProtocolVersion::V311 => {
                if c.clean_start {
                    0
                } else {
                    u32::MAX
                }
            }
        }
        .min(limits.max_session_expiry);
        let mut keep_alive = c.keep_alive;
        let mut server_keep_alive = None;
        if let (ProtocolVersion::V5, Some(max)) = (v, limits.max_keep_alive) {
            if keep_alive == 0 || keep_alive > max {
                keep_alive = max;
                server_keep_alive = Some(max);
            }
        }
        let client_receive_maximum = c.properties.receive_maximum().unwrap_or(u16::MAX);
        let client_max_packet_size = c.properties.maximum_packet_size().unwrap_or(u32::MAX);
        let waker = Arc::new(Notify::new());
        let connection = Connection {
            id,
            waker: waker.clone(),
            peer: peer.to_string(),
        };

        // Take the session over from another connection, or end it for a clean start.
        let existing = hub.sessions().get(&client_id).cloned();
        let mut resumed = None;
        if let Some(s) = existing {
            let mut st = s.lock();
            if let Some(old) = st.connection.take() {
                Metrics::inc(&hub.metrics.session_takeovers);
                tracing::info!(client = %client_id, old = %old.peer, new = %peer, "session taken over");
                old.waker.notify_one();
                st.outgoing.on_disconnect();
                st.incoming.on_disconnect();
            }
            let expired = match (st.disconnected_at, st.expiry_interval) {
                (_, u32::MAX) | (None, _) => false,
                (Some(at), secs) => at.elapsed() >= Duration::from_secs(u64::from(secs)),
            };
            let reuse = !c.clean_start && !expired;
            drop(st);
            if reuse {
                resumed = Some(s);
            } else {
                hub.discard_session(&s);
            }
        }
        let session_present = resumed.is_some();
        let session = match resumed {
            Some(s) => s,
            None => {
                let state = SessionState {
                    version: v,
                    outgoing: Outgoing::new(outgoing_config(limits)),
                    incoming: Incoming::new(
                        v,
                        IncomingConfig::default()
                            .receive_maximum(limits.receive_maximum)
                            .ack_mode(AckMode::Manual),
                    ),
                    subscriptions: Default::default(),
                    connection: None,
                    expiry_interval: expiry,
                    disconnected_at: None,
                    client_max_packet_size,
                    dropped: 0,
                    keep_alive,
                    clean_start: c.clean_start,
                    expiring: Default::default(),
                };
                let s = Arc::new(Session::new(client_id.clone(), state));
                hub.sessions().insert(client_id.clone(), s.clone());
                s
            }
        };
        {
            let mut st = session.lock();
            st.version = v;
            st.expiry_interval = expiry;
            st.disconnected_at = None;
            st.client_max_packet_size = client_max_packet_size;
            st.keep_alive = keep_alive;
            st.clean_start = c.clean_start;
            st.connection = Some(connection);
            st.outgoing.set_receive_maximum(client_receive_maximum);
            let expired = st.expire_pending(outgoing_config(limits), Instant::now());
            hub.metrics
                .messages_expired
                .fetch_add(expired, std::sync::atomic::Ordering::Relaxed);
            // Redelivery of unacknowledged messages happens here, with DUP [MQTT-4.4.0-1].
            let _ = st.outgoing.resume(session_present);
            st.incoming.resume(session_present);
        }

        let mut props = Properties::new();
        if v == ProtocolVersion::V5 {
            if let Some(name) = assigned {
                props.set_assigned_client_identifier(name);
            }
            if let Some(ka) = server_keep_alive {
                props.set_server_keep_alive(ka);
            }
            if expiry != c.properties.session_expiry_interval().unwrap_or(0) {
                props.set_session_expiry_interval(expiry);
            }
            props.set_receive_maximum(limits.receive_maximum);
            props.set_maximum_packet_size(limits.max_packet_size);
            props.set_topic_alias_maximum(limits.topic_alias_maximum);
            props.set_retain_available(1);
            props.set_wildcard_subscription_available(1);
            props.set_subscription_identifier_available(1);
            props.set_shared_subscription_available(1);
        }
        let ack = ConnAck {
            session_present,
            reason_code: ReasonCode::SUCCESS,
            properties: props,
        };
        let mut encoder = Encoder::new(v);
        encoder.max_packet_size = client_max_packet_size;
        let mut wbuf = BytesMut::with_capacity(4096);
        if encoder.encode(&Packet::ConnAck(ack), &mut wbuf).is_err() {
            return None;
        }
        Metrics::inc(&hub.metrics.connections_total);
        tracing::debug!(client = %client_id, %peer, version = %v, session_present, "connected");
        Some(Conn {
            hub,
            id,
            session,
            client_id,
            version: v,
            encoder,
            waker,
            will: c.will,
            keep_alive: KeepAlive::server(keep_alive, Instant::now()),
            aliases: HashMap::new(),
            connect_expiry: expiry,
            wbuf,
        })
    }

    async fn run(
        &mut self,
        rd: &mut OwnedReadHalf,
        wr: &mut OwnedWriteHalf,
        mut rbuf: BytesMut,
        mut decoder: Decoder,
        mut shutdown: watch::Receiver<bool>,
    ) -> End {
        loop {
            if !self.collect_output() {
                return End::TakenOver;
            }
            if !self.wbuf.is_empty() {
                if wr.write_all(&self.wbuf).await.is_err() {
                    return End::Lost;
                }
                self.wbuf.clear();
            }
            let deadline = self.keep_alive.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            rbuf.reserve(8192);
            tokio::select! {
                _ = shutdown.changed() => {
                    self.send_disconnect(ReasonCode::SERVER_SHUTTING_DOWN);
                    let _ = wr.write_all(&self.wbuf).await;
                    return End::Shutdown;
                }
                r = rd.read_buf(&mut rbuf) => {
                    match r {
                        Ok(0) | Err(_) => return End::Lost,
                        Ok(_) => {}
                    }
                    self.keep_alive.handle_received(Instant::now());
                    loop {
                        match decoder.decode(&mut rbuf) {
                            Ok(Some(p)) => {
                                if let Some(end) = self.handle(p) {
                                    let _ = wr.write_all(&self.wbuf).await;
                                    return end;
                                }
                                // Queue this packet's acknowledgement now, so that if a later
                                // packet in the same read ends the connection, the PUBACK /
                                // PUBREC for the messages already routed still goes out before
                                // the DISCONNECT (else the client would send them again).
                                if !self.collect_output() {
                                    return End::TakenOver;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::info!(client = %self.client_id, error = %e, "closing connection: bad packet");
                                self.send_disconnect(e.reason_code());
                                let _ = wr.write_all(&self.wbuf).await;
                                return End::ProtocolError(e.reason_code());
                            }
                        }
                    }
                }
                _ = self.waker.notified() => {}
                _ = sleep => {
                    if self.keep_alive.handle_timeout(Instant::now()) == KeepAliveAction::Expired {
                        Metrics::inc(&self.hub.metrics.keep_alive_timeouts);
                        tracing::info!(client = %self.client_id, "keep alive expired");
                        self.send_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT);
                        let _ = wr.write_all(&self.wbuf).await;
                        return End::KeepAlive;
                    }
                }
            }
        }
    }

    /// Moves what the session's state machines want to send into the write buffer. False when
    /// the session belongs to another connection now.
    fn collect_output(&mut self) -> bool {
        let session = self.session.clone();
        let mut st = session.lock();
        if st.connection.as_ref().map(|c| c.id) != Some(self.id) {
            return false;
        }
        while let Some(p) = st.incoming.poll_transmit() {
            self.encode(&p);
        }
        if st.outgoing.pending_len() == 0 && !st.expiring.is_empty() {
            st.expiring.clear(); // nothing queued can expire any more
        }
        while let Some(p) = st.outgoing.poll_transmit() {
            if let Packet::Publish(pb) = &p {
                if !pb.dup {
                    Metrics::inc(&self.hub.metrics.messages_sent);
                }
            }
            self.encode(&p);
        }
        true
    }

    fn encode(&mut self, p: &Packet) {
        if let Err(e) = self.encoder.encode(p, &mut self.wbuf) {
            tracing::warn!(client = %self.client_id, error = %e, packet = %p.packet_type(), "packet not sent");
        }
    }

    fn send_disconnect(&mut self, code: ReasonCode) {
        if self.version == ProtocolVersion::V5 {
            self.encode(&Packet::Disconnect(Disconnect::new(code)));
        }
    }

    /// Handles one packet; `Some` ends the connection.
    fn handle(&mut self, p: Packet) -> Option<End> {
        match p {
            Packet::Publish(p) => return self.handle_publish(p),
            Packet::PubAck(a) => {
                let r = self.session.lock().outgoing.handle_puback(&a).map(|_| ());
                return self.state_result(r);
            }
            Packet::PubRec(r) => {
                let res = self.session.lock().outgoing.handle_pubrec(&r).map(|_| ());
                if let Err(StateError::PacketIdNotFound { .. }) = res {
                    let mut rel = PubRel::new(r.packet_id);
                    rel.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                    self.encode(&Packet::PubRel(rel));
                    return None;
                }
                return self.state_result(res);
            }
            Packet::PubRel(r) => {
                let res = self.session.lock().incoming.handle_pubrel(&r);
                return self.state_result(res);
            }
            Packet::PubComp(c) => {
                let r = self.session.lock().outgoing.handle_pubcomp(&c).map(|_| ());
                return self.state_result(r);
            }
            Packet::Subscribe(s) => self.handle_subscribe(s),
            Packet::Unsubscribe(u) => self.handle_unsubscribe(u),
            Packet::PingReq => self.encode(&Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry_interval() {
                    if self.connect_expiry == 0 && e != 0 {
                        // [MQTT-3.14.2-2]
                        self.send_disconnect(ReasonCode::PROTOCOL_ERROR);
                        return Some(End::ProtocolError(ReasonCode::PROTOCOL_ERROR));
                    }
                    self.session.lock().expiry_interval = e.min(self.hub.limits.max_session_expiry);
                }
                return Some(if d.reason_code == ReasonCode::DISCONNECT_WITH_WILL {
                    End::NormalWithWill
                } else {
                    End::Normal
                });
            }
            Packet::Auth(_) => {
                self.send_disconnect(ReasonCode::PROTOCOL_ERROR);
                return Some(End::ProtocolError(ReasonCode::PROTOCOL_ERROR));
            }
            other => {
                // The decoder refuses packets a client may not send; keep the match total.
                tracing::warn!(packet = %other.packet_type(), "unexpected packet");
                self.send_disconnect(ReasonCode::PROTOCOL_ERROR);
                return Some(End::ProtocolError(ReasonCode::PROTOCOL_ERROR));
            }
        }
        None
    }

    /// Acknowledgements for unknown packet identifiers are ignored (a resent PUBACK after a
    /// reconnect is harmless); any other state error closes the connection.
    fn state_result(&mut self, r: Result<(), StateError>) -> Option<End> {
        match r {
            Ok(()) | Err(StateError::PacketIdNotFound { .. }) => None,
            Err(e) => {
                tracing::info!(client = %self.client_id, error = %e, "closing connection: protocol error");
                self.send_disconnect(e.reason_code());
                Some(End::ProtocolError(e.reason_code()))
            }
        }
    }

    fn handle_publish(&mut self, mut p: Publish) -> Option<End> {
        Metrics::inc(&self.hub.metrics.messages_received);
        self.hub
            .metrics
            .bytes_received
            .fetch_add(p.payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(alias) = p.properties.topic_alias() {
            if alias > self.hub.limits.topic_alias_maximum {
                self.send_disconnect(ReasonCode::TOPIC_ALIAS_INVALID);
                return Some(End::ProtocolError(ReasonCode::TOPIC_ALIAS_INVALID));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        self.send_disconnect(ReasonCode::PROTOCOL_ERROR);
                        return Some(End::ProtocolError(ReasonCode::PROTOCOL_ERROR));
                    }
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
            p.properties.remove(PropertyId::TopicAlias);
        }
        let packet_id = p.packet_id;
        let accepted = self.session.lock().incoming.handle_publish(p);
        let msg = match accepted {
            Ok(Some(m)) => m,
            Ok(None) => return None, // a QoS 2 resend: already routed once
            Err(e) => return self.state_result(Err(e)),
        };
        if msg.topic.starts_with("$SYS") {
            // Clients may not publish into the broker's own statistics.
            return self.ack(packet_id, ReasonCode::NOT_AUTHORIZED);
        }
        let expires_at = msg
            .properties
            .message_expiry_interval()
            .map(|s| Instant::now() + Duration::from_secs(u64::from(s)));
        if msg.retain {
            self.hub.retain(&msg, expires_at);
        }
        let mut routed = msg;
        routed.dup = false;
        routed.packet_id = None;
        let n = self.hub.route(&routed, Some(&self.client_id));
        if n == 0 {
            Metrics::inc(&self.hub.metrics.messages_unrouted);
        }
        let code = if n == 0 {
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        self.ack(packet_id, code)
    }

    /// Acknowledges a QoS 1 or 2 PUBLISH once it has been handled.
    fn ack(&mut self, packet_id: Option<qosmos_mqtt::PacketId>, code: ReasonCode) -> Option<End> {
        let id = packet_id?;
        let code = if self.version == ProtocolVersion::V5 {
            code
        } else {
            ReasonCode::SUCCESS
        };
        let r = self.session.lock().incoming.ack_with(id, code);
        self.state_result(r)
    }

    fn handle_subscribe(&mut self, s: Subscribe) {
        let id = s.properties.subscription_identifiers().next();
        let mut codes = Vec::with_capacity(s.subscriptions.len());
        let mut retained = Vec::new();
        let now = Instant::now();
        for sub in &s.subscriptions {
            let granted = sub.options.qos; // every QoS is supported
            let opts = SubOptions {
                options: sub.options,
                id,
            };
            let existed = self.hub.subscribe(&self.session, &sub.filter, opts);
            self.session
                .lock()
                .subscriptions
                .insert(sub.filter.clone(), opts);
            codes.push(ReasonCode(granted.as_u8()));
            let shared = sub.filter.starts_with("$share/");
            let send = match sub.options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNew => !existed,
                RetainHandling::DoNotSend => false,
            };
            if send && !shared {
                for m in self.hub.retained_for(&sub.filter, now) {
                    let qos = m.qos.min(granted);
                    retained.push((m, qos));
                }
            }
        }
        self.encode(&Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            reason_codes: codes,
            properties: Properties::new(),
        }));
        let ids: Vec<u32> = id.into_iter().collect();
        for (m, qos) in retained {
            self.hub.deliver(&self.session, &m, qos, true, &ids);
        }
    }

    fn handle_unsubscribe(&mut self, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let existed = self.hub.unsubscribe(&self.client_id, f);
            self.session.lock().subscriptions.remove(f);
            codes.push(if existed {
                ReasonCode::SUCCESS
            } else {
                ReasonCode::NO_SUBSCRIPTION_EXISTED
            });
        }
        let codes = if self.version == ProtocolVersion::V5 {
            codes
        } else {
            Vec::new()
        };
        self.encode(&Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reason_codes: codes,
            properties: Properties::new(),
        }));
    }

    /// Detaches from the session (unless it was taken over), expires it as configured, and
    /// publishes the will when the connection did not end normally.
    async fn finish(self, end: End, wr: &mut OwnedWriteHalf) {
        if end == End::TakenOver && self.version == ProtocolVersion::V5 {
            let _ = write_packet(
                wr,
                self.version,
                &Packet::Disconnect(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER)),
            )
            .await;
        }
        let _ = wr.shutdown().await;
        tracing::debug!(client = %self.client_id, ?end, "disconnected");
        let hub = &self.hub;
        let mut expiry = 0;
        if end != End::TakenOver {
            let mut st = self.session.lock();
            if st.connection.as_ref().map(|c| c.id) == Some(self.id) {
                st.connection = None;
                st.outgoing.on_disconnect();
                st.incoming.on_disconnect();
                let at = Instant::now();
                st.disconnected_at = Some(at);
                expiry = st.expiry_interval;
                drop(st);
                if expiry == 0 {
                    hub.discard_session(&self.session);
                } else if expiry != u32::MAX {
                    let hub = hub.clone();
                    let session = self.session.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(u64::from(expiry))).await;
                        let ended = {
                            let st = session.lock();
                            st.connection.is_none() && st.disconnected_at == Some(at)
                        };
                        if ended {
                            Metrics::inc(&hub.metrics.sessions_expired);
                            hub.discard_session(&session);
                        }
                    });
                }
            }
        }
        if let (true, Some(will)) = (end.publishes_will(), self.will) {
            let delay = will
                .properties
                .will_delay_interval()
                .unwrap_or(0)
                .min(expiry);
            let will_hub = hub.clone();
            let client = self.client_id.clone();
            let publish = move || {
                let mut properties = will.properties.clone();
                properties.remove(PropertyId::WillDelayInterval);
                let p = Publish {
                    dup: false,
                    qos: will.qos,
                    retain: will.retain,
                    topic: will.topic.clone(),
                    packet_id: None,
                    payload: will.payload.clone(),
                    properties,
                };
                publish_will(&will_hub, &p, &client);
            };
            if delay == 0 {
                publish();
            } else {
                let hub = hub.clone();
                let session = self.session.clone();
                // Which disconnection this will belongs to: any later connection to the session
                // (even one that has ended again since) changes it.
                let left_at = session.lock().disconnected_at;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
                    // Not sent if a new connection was made to this same session in time
                    // [MQTT-3.1.3-9], whether or not that connection is still there.
                    let registered = hub
                        .sessions()
                        .get(&session.client_id)
                        .is_some_and(|s| Arc::ptr_eq(s, &session));
                    let back = registered && {
                        let st = session.lock();
                        st.is_online() || st.disconnected_at != left_at
                    };
                    if !back {
                        publish();
                    }
                });
            }
        }
    }
}

fn publish_will(hub: &Hub, p: &Publish, client: &str) {
    Metrics::inc(&hub.metrics.wills_published);
    tracing::debug!(%client, topic = %p.topic, "publishing will");
    if p.retain {
        let expires_at = p
            .properties
            .message_expiry_interval()
            .map(|s| Instant::now() + Duration::from_secs(u64::from(s)));
        hub.retain(p, expires_at);
    }
    hub.route(p, Some(client));
}

/// Answers a connection over the limit: CONNACK Server busy (5.0) or Server unavailable
/// (3.1.1) once its CONNECT arrives, then closes it.
pub(crate) async fn refuse_busy(hub: Arc<Hub>, stream: TcpStream) {
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::new();
    let mut decoder = Decoder::new(Role::Server, None);
    decoder.set_max_packet_size(hub.limits.max_packet_size);
    let wait = Duration::from_secs(2).min(hub.limits.connect_timeout);
    if let Ok(Ok(Packet::Connect(c))) =
        tokio::time::timeout(wait, read_packet(&mut rd, &mut buf, &mut decoder)).await
    {
        let code = match c.protocol {
            ProtocolVersion::V5 => ReasonCode::SERVER_BUSY,
            ProtocolVersion::V311 => ReasonCode::SERVER_UNAVAILABLE,
        };
        let ack = ConnAck {
            session_present: false,
            reason_code: code,
            properties: Properties::new(),
        };
        let _ = write_packet(&mut wr, c.protocol, &Packet::ConnAck(ack)).await;
    }
}
