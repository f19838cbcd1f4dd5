//! One task per connection: the CONNECT handshake, then a loop that reads packets, hands them
//! to the session's state machines and the router, and writes whatever they produce.

use crate::config::Limits;
use crate::durable::{StoreGuard, storable, unix_ms_of};
use crate::hub::{Hub, Routed};
use crate::metrics::Metrics;
use crate::park::Parker;
use crate::session::{Connection, Session, SessionState, SmallMap, SubOptions, Wake};
use crate::store::{Record, SessionOp};
use bytes::{Bytes, BytesMut};
use qosmos_mqtt::state::{AckMode, Incoming, IncomingConfig, Outgoing, OutgoingConfig, StateError};
use qosmos_mqtt::{
    ConnAck, Connect, DecodeError, Decoder, Disconnect, Encoder, LastWill, MqttStr, Packet,
    PacketId, Properties, Property, PropertyId, ProtocolVersion, PubRel, Publish, QoS, ReasonCode,
    RetainHandling, Role, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

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

/// What one read's packets change and promise: the records to make durable, then the replies
/// and deliveries that may go out only once they are.
#[derive(Default)]
struct Batch {
    /// Records that must be durable before any of `post` runs.
    records: Vec<Record>,
    /// Messages whose delivery completed: their `Delivered`, whose loss costs at most a
    /// resend, goes in one `SessionOps` (the client named once), appended, not awaited.
    delivered: Vec<u64>,
    /// What to do once `records` are durable, in packet order.
    post: Vec<Post>,
}

/// One step of a [`Batch`] after its commit.
enum Post {
    /// Send a packet (after the replies queued before it).
    Send(Packet),
    /// Hand a routed message to its subscribers, then acknowledge it.
    Publish {
        routed: Routed,
        ack: Option<(PacketId, ReasonCode)>,
    },
    /// Acknowledge a PUBLISH with this code.
    Ack(PacketId, ReasonCode),
    /// Deliver retained messages after a SUBACK: message, QoS, durable id.
    Retained {
        messages: Vec<(Publish, QoS, Option<u64>)>,
        ids: Vec<u32>,
    },
}

/// A copy of a string that is a slice of a read buffer, for what is kept longer than the
/// packet: the slice would keep the whole buffer allocated.
fn owned_str(s: &MqttStr) -> MqttStr {
    MqttStr::from(s.as_str())
}

/// A copy of properties whose strings and bytes are slices of a read buffer (see
/// [`owned_str`]).
fn owned_properties(props: &Properties) -> Properties {
    props
        .iter()
        .map(|p| match p {
            Property::ContentType(s) => Property::ContentType(owned_str(s)),
            Property::ResponseTopic(s) => Property::ResponseTopic(owned_str(s)),
            Property::CorrelationData(b) => Property::CorrelationData(Bytes::copy_from_slice(b)),
            Property::UserProperty(k, v) => Property::UserProperty(owned_str(k), owned_str(v)),
            Property::ReasonString(s) => Property::ReasonString(owned_str(s)),
            other => other.clone(),
        })
        .collect()
}

/// The protocol level byte of a version, as the store records it.
pub(crate) fn protocol_level(v: ProtocolVersion) -> u8 {
    match v {
        ProtocolVersion::V311 => 4,
        ProtocolVersion::V5 => 5,
    }
}

enum ReadError {
    Closed,
    Io,
    Decode(DecodeError),
}

/// Reads until `decoder` yields one packet.
async fn read_packet(
    rd: &mut (impl AsyncRead + Unpin),
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
    rd: &mut TcpStream,
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
        buf.reserve(CONNECT_READ);
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
pub(crate) fn outgoing_config(limits: &Limits) -> OutgoingConfig {
    OutgoingConfig::default()
        .max_pending(limits.max_queued_messages)
        .max_pending_bytes(limits.max_queued_bytes)
}

/// A new session's state, disconnected and empty.
pub(crate) fn new_session_state(limits: &Limits, v: ProtocolVersion, expiry: u32) -> SessionState {
    SessionState {
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
        left_at: None,
        client_max_packet_size: u32::MAX,
        dropped: 0,
        keep_alive: 0,
        clean_start: false,
        expiring: Default::default(),
        message_ids: Default::default(),
    }
}

/// How much is read at a time before the CONNECT is whole: most CONNECTs are far smaller, and
/// a bigger one grows the buffer.
const CONNECT_READ: usize = 1024;

/// What woke an idle connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// Just connected: packets may have come behind the CONNECT, the CONNACK is to be sent.
    Start,
    /// The socket is readable (or closed).
    Readable,
    /// The socket failed.
    Lost,
    /// Its [`Wake`]: packets to send, taken over, or the keep alive is due; `readable` when
    /// the socket is readable too (a connection woken for every delivery must still read its
    /// client's PINGREQs and acknowledgements).
    Woken { readable: bool },
    /// The broker is shutting down.
    Shutdown,
    /// Bytes were read into the read buffer (when a parked connection is resumed).
    Data,
    /// Nothing to do, and the connection is to park (not handled by `step`).
    Park,
}

/// A connection's place under the connection limit, given back when the connection ends (or
/// its task is dropped). The limit's semaphore is closed when the broker shuts down: that is
/// the connection's shutdown signal, which costs it no more than this pointer.
#[derive(Debug)]
pub(crate) struct Slot(Arc<Semaphore>);

impl Slot {
    /// Takes a place, if one is left.
    pub(crate) fn take(permits: &Arc<Semaphore>) -> Option<Slot> {
        let permit = permits.try_acquire().ok()?;
        permit.forget();
        Some(Slot(permits.clone()))
    }

    fn shutting_down(&self) -> bool {
        self.0.is_closed()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// Serves one accepted connection to its end (or until it is parked, see [`crate::park`]).
///
/// Memory per idle connection is a measured goal (BENCHMARKS.md), and a task's memory is the
/// size of its future, which is that of its largest state. So the task holds little while it
/// waits: the connection, its socket and a [`Wake`] polled in place, no timer (the keep-alive
/// sweep wakes it when due). The CONNECT handshake, the handling of what was read or woken,
/// and the end each run in a future boxed for the time they take. An idle connection holds no
/// task at all: it is parked whenever it was idle for a whole keep-alive sweep period, and
/// right after its CONNACK if nothing else came and the broker has many connections
/// ([`PARK_AT_CONNECT_FROM`]).
pub(crate) fn serve(
    hub: Arc<Hub>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    parker: Arc<Parker>,
) -> impl Future<Output = ()> + Send {
    // Boxed before the task's future is made, so that its arguments are not part of it.
    let handshake = Box::pin(handshake(hub, stream, peer));
    async move {
        let Some((conn, io, rbuf, decoder)) = handshake.await else {
            return;
        };
        Metrics::inc(&conn.hub.metrics.clients_connected);
        run(conn, io, rbuf, decoder, slot, parker, Some(Event::Start)).await;
    }
}

/// From how many connected clients a new connection is parked right after its CONNACK when
/// nothing else came with its CONNECT, instead of at the first keep-alive sweep that finds it
/// idle (0.5–1 s later). Resuming costs a connection's first packet two thread hand-offs (the
/// poller thread, then a tokio worker): measured, 9% of the QoS 2 `pairs` benchmark's
/// throughput, whose 100 publishers connect and then all start at once. Below this many
/// connections, what parking at once saves (about 0.7 kB each, for under a second) does not
/// matter; above it, it keeps a burst of connections from holding a task each.
const PARK_AT_CONNECT_FROM: u64 = 256;

/// An idle connection without a task: what its task held while it waited, with its socket
/// taken back from tokio. Lives in the [`Parker`]'s slab.
pub(crate) struct Parked {
    conn: Conn,
    socket: std::net::TcpStream,
    decoder: Decoder,
    slot: Slot,
}

impl Parked {
    /// The connection's socket.
    pub(crate) fn socket(&self) -> &std::net::TcpStream {
        &self.socket
    }

    /// What wakes the connection (a routed message, a takeover, its keep alive, shutdown).
    pub(crate) fn wake(&self) -> &crate::session::Wake {
        &self.conn.waker
    }
}

/// A parked connection's task again: its socket registered with tokio again, waiting for
/// what woke it.
///
/// What the socket holds is read first, before it is registered with tokio again: a client
/// that sent DISCONNECT or closed is then done with in one go, without waiting for tokio to
/// report the socket readable (thousands of clients closing at once would otherwise hold a
/// task and a registration each meanwhile). The loop is boxed, so that a resumed task waiting
/// to run holds only the parked state.
pub(crate) async fn resume(parked: Parked, parker: Arc<Parker>) {
    let Parked {
        mut conn,
        mut socket,
        decoder,
        slot,
    } = parked;
    let mut rbuf = BytesMut::new();
    let first = match read_parked(&mut socket, &mut rbuf) {
        Ok(true) => {
            conn.keep_alive_received();
            Some(Event::Data)
        }
        Ok(false) => None,
        Err(()) => {
            Metrics::dec(&conn.hub.metrics.clients_connected);
            Box::pin(conn.finish(End::Lost, None)).await;
            return;
        }
    };
    match TcpStream::from_std(socket) {
        Ok(io) => Box::pin(run(conn, io, rbuf, decoder, slot, parker, first)).await,
        Err(e) => {
            tracing::warn!(client = %conn.session.client_id(), error = %e, "cannot resume a parked connection");
            Metrics::dec(&conn.hub.metrics.clients_connected);
            Box::pin(conn.finish(End::Lost, None)).await;
        }
    }
}

/// Reads what a parked connection's socket holds (it is non-blocking): `Ok(true)` when
/// something was read, `Ok(false)` when nothing was there, `Err` when the socket is closed or
/// failed.
fn read_parked(socket: &mut std::net::TcpStream, rbuf: &mut BytesMut) -> Result<bool, ()> {
    use std::io::Read;
    let mut buf = [0u8; 2048];
    loop {
        return match socket.read(&mut buf) {
            Ok(0) => Err(()),
            Ok(n) => {
                rbuf.extend_from_slice(buf.get(..n).unwrap_or_default());
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => Err(()),
        };
    }
}

/// The connection's loop: handles `first`, then waits for events and handles them, until
/// the connection ends or is parked.
///
/// Not an `async fn`: that would move its arguments into locals of the future, which would
/// then hold both (the future is the task's size); an `async move` block uses them in place.
#[allow(clippy::manual_async_fn)]
fn run(
    mut conn: Conn,
    mut io: TcpStream,
    mut rbuf: BytesMut,
    mut decoder: Decoder,
    mut slot: Slot,
    parker: Arc<Parker>,
    first: Option<Event>,
) -> impl Future<Output = ()> + Send {
    async move {
        // Written out here rather than in a method, so that the wait holds no more than it
        // needs: each event is handled in a boxed `step`, the wait itself is three references.
        let mut next = first;
        // A new connection parks at once if nothing else came with its CONNECT and the broker
        // has many connections (see [`PARK_AT_CONNECT_FROM`]); a resumed one only when the
        // sweep finds it idle (else a socket that tokio reports readable a moment after
        // registering it would park again at once).
        let mut park_now = first == Some(Event::Start)
            && conn.hub.metrics.clients_connected.load(Ordering::Relaxed) >= PARK_AT_CONNECT_FROM;
        let end = loop {
            if let Some(event) = next.take()
                && let Some(end) =
                    Box::pin(conn.step(event, &mut io, &mut rbuf, &mut decoder)).await
            {
                break end;
            }
            match conn.wait(&io, &slot, park_now).await {
                Event::Park => {
                    park_now = false;
                    if rbuf.is_empty() && conn.wbuf.is_empty() {
                        match park(conn, io, decoder, slot, &parker) {
                            Ok(()) => return,
                            Err(Some(back)) => (conn, io, decoder, slot) = back,
                            Err(None) => return,
                        }
                    }
                }
                event => next = Some(event),
            }
        };
        Metrics::dec(&conn.hub.metrics.clients_connected);
        // Counted here, once per connection, so that every way of ending with a protocol error
        // (bad packet, state error, AUTH, bad topic alias, ...) shows in the metric.
        if let End::ProtocolError(_) = end {
            Metrics::inc(&conn.hub.metrics.protocol_errors);
        }
        Box::pin(conn.finish(end, Some(&mut io))).await;
    }
}

/// What [`park`] gives back when the connection could not be parked.
type Unparked = (Conn, TcpStream, Decoder, Slot);

/// Parks an idle connection: its task ends, its socket leaves tokio for the [`Parker`]'s
/// poller. `Err(Some)` gives the connection back when it cannot be parked or was woken while
/// parking; `Err(None)` when it ended (its socket lost).
#[allow(clippy::result_large_err)] // moved once per parking, which is rare
fn park(
    mut conn: Conn,
    io: TcpStream,
    decoder: Decoder,
    slot: Slot,
    parker: &Arc<Parker>,
) -> Result<(), Option<Unparked>> {
    conn.wbuf.free();
    let socket = match io.into_std() {
        Ok(s) => s,
        Err(e) => {
            // Deregistering failed: nothing more can be done with this socket.
            tracing::warn!(client = %conn.session.client_id(), error = %e, "cannot park a connection");
            Metrics::dec(&conn.hub.metrics.clients_connected);
            tokio::spawn(conn.finish(End::Lost, None));
            return Err(None);
        }
    };
    let wake = conn.waker.clone();
    let permits = slot.0.clone();
    match parker.park(Parked {
        conn,
        socket,
        decoder,
        slot,
    }) {
        Ok(key) => {
            // A wake-up (or the shutdown) that came before the parker recorded the key found
            // no one to resume: resume now. The shutdown closes the permits before it drains.
            if wake.is_woken() || permits.is_closed() {
                parker.unpark(key);
            }
            Ok(())
        }
        Err(p) => match TcpStream::from_std(p.socket) {
            Ok(io) => Err(Some((p.conn, io, p.decoder, p.slot))),
            Err(_) => {
                Metrics::dec(&p.conn.hub.metrics.clients_connected);
                tokio::spawn(p.conn.finish(End::Lost, None));
                Err(None)
            }
        },
    }
}

/// Reads the CONNECT and accepts (or refuses) it; `None` when the connection is over.
async fn handshake(
    hub: Arc<Hub>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<(Conn, TcpStream, BytesMut, Decoder)> {
    let _ = stream.set_nodelay(true);
    let mut rbuf = BytesMut::with_capacity(CONNECT_READ);
    let mut decoder = Decoder::new(Role::Server, None);
    decoder.set_max_packet_size(hub.limits.max_packet_size);

    let first = tokio::time::timeout(
        hub.limits.connect_timeout,
        read_connect(&mut stream, &mut rbuf, &mut decoder),
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
            return None;
        }
        Ok(Err(ReadError::Decode(e))) => {
            Metrics::inc(&hub.metrics.protocol_errors);
            tracing::info!(%peer, error = %e, "refused CONNECT");
            let (version, code) = match e {
                DecodeError::UnsupportedProtocolVersion(_) => {
                    (ProtocolVersion::V311, e.reason_code())
                }
                _ if level == Some(5) => (ProtocolVersion::V5, e.reason_code()),
                _ => return None,
            };
            let ack = ConnAck {
                session_present: false,
                reason_code: code,
                properties: Properties::new(),
            };
            let _ = write_packet(&mut stream, version, &Packet::ConnAck(ack)).await;
            return None;
        }
        Ok(Err(_)) => return None,
        Ok(Ok(Packet::Connect(c))) => *c,
        Ok(Ok(_)) => return None, // the decoder accepts only CONNECT first
    };
    let conn = Conn::accept(hub, connect, peer, &mut stream).await?;
    if rbuf.is_empty() {
        // An idle connection holds no read buffer.
        rbuf = BytesMut::new();
    }
    Some((conn, stream, rbuf, decoder))
}

async fn write_packet(
    wr: &mut (impl AsyncWrite + Unpin),
    version: ProtocolVersion,
    p: &Packet,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    if qosmos_mqtt::encode_packet(p, version, &mut buf).is_ok() {
        wr.write_all(&buf).await?;
    }
    Ok(())
}

/// The server's keep-alive timer: a client silent for 1.5 times its keep alive is closed
/// ([MQTT-3.1.2-24] in 3.1.1, [MQTT-3.1.2-22] in 5.0). What `qosmos_mqtt::state::KeepAlive` does for a server, in 16 bytes
/// instead of 80: every idle connection holds one.
#[derive(Debug, Clone, Copy)]
struct KeepAliveTimer {
    /// When the last packet came, in milliseconds since the hub started (the `epoch` of every
    /// method).
    last_received_ms: u64,
    /// 1.5 times the keep alive, in milliseconds; 0 when there is no keep alive.
    grace_ms: u32,
}

impl KeepAliveTimer {
    fn new(seconds: u16, epoch: Instant) -> KeepAliveTimer {
        let mut timer = KeepAliveTimer {
            last_received_ms: 0,
            grace_ms: u32::from(seconds) * 1500,
        };
        timer.received(epoch);
        timer
    }

    fn received(&mut self, epoch: Instant) {
        self.last_received_ms = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
    }

    /// When the client is to be closed if nothing comes before.
    fn deadline(&self, epoch: Instant) -> Option<Instant> {
        (self.grace_ms > 0).then(|| {
            epoch
                + Duration::from_millis(
                    self.last_received_ms
                        .saturating_add(u64::from(self.grace_ms)),
                )
        })
    }

    fn expired(&self, epoch: Instant) -> bool {
        self.deadline(epoch).is_some_and(|d| Instant::now() >= d)
    }
}

/// A connection past its CONNECT. What an idle one holds while parked (its client id is its
/// session's, not a copy).
struct Conn {
    hub: Arc<Hub>,
    id: u64,
    session: Arc<Session>,
    version: ProtocolVersion,
    encoder: Encoder,
    waker: Arc<Wake>,
    /// Boxed: most connections have none, and every idle one holds this field.
    will: Option<Box<LastWill>>,
    keep_alive: KeepAliveTimer,
    /// Topic aliases the client set (5.0), alias → topic; allocated at the first one (an
    /// empty `HashMap` is 48 bytes that every idle connection would hold).
    aliases: SmallMap<u16, MqttStr>,
    /// Session expiry from CONNECT; 0 there forbids a non-zero value at DISCONNECT.
    connect_expiry: u32,
    wbuf: WriteBuf,
}

/// A connection's write buffer: one pointer, null while there is nothing to write. Every idle
/// connection holds one (a `Vec` is 24 bytes, a `BytesMut` 32); the box is allocated at the
/// first packet encoded after the connection was resumed, and freed when it parks.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)] // the point: 8 bytes held, where a `Vec` is 24
struct WriteBuf(Option<Box<Vec<u8>>>);

impl WriteBuf {
    /// The buffer, to encode into.
    fn get(&mut self) -> &mut Vec<u8> {
        self.0.get_or_insert_default()
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    /// Empties it and frees what it held, keeping the box.
    fn release(&mut self) {
        if let Some(b) = &mut self.0 {
            **b = Vec::new();
        }
    }

    /// Frees it altogether (the connection parks).
    fn free(&mut self) {
        self.0 = None;
    }
}

impl Conn {
    /// Checks the CONNECT, attaches (or creates) the session, taking it over from another
    /// connection if needed, and sends CONNACK. `None` when the connection was refused.
    async fn accept(
        hub: Arc<Hub>,
        c: Connect,
        peer: SocketAddr,
        wr: &mut TcpStream,
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
        // Copied out of the read buffer (which it would otherwise keep): the session's one copy.
        let client_id = if c.client_id.is_empty() {
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
            MqttStr::from(name)
        } else {
            MqttStr::from(c.client_id.as_str())
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
        if let (ProtocolVersion::V5, Some(max)) = (v, limits.max_keep_alive)
            && (keep_alive == 0 || keep_alive > max)
        {
            keep_alive = max;
            server_keep_alive = Some(max);
        }
        let client_receive_maximum = c.properties.receive_maximum().unwrap_or(u16::MAX);
        let client_max_packet_size = c.properties.maximum_packet_size().unwrap_or(u32::MAX);
        let waker = Arc::new(Wake::new());
        let connection = Connection {
            id,
            waker: waker.clone(),
            peer,
        };

        // Take the session over from another connection, or end it for a clean start; under
        // the store lock, so that the records say the same in the same order.
        let (session, session_present, commit) = {
            let mut guard = hub.store.as_ref().map(|s| s.lock());
            let mut records = Vec::new();
            let existing = hub.sessions().get(client_id.as_str()).cloned();
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
                let expired = match (st.disconnected_at(), st.expiry_interval) {
                    (_, u32::MAX) | (None, _) => false,
                    (Some(at), secs) => at.elapsed() >= Duration::from_secs(u64::from(secs)),
                };
                let reuse = !c.clean_start && !expired;
                drop(st);
                if reuse {
                    resumed = Some(s);
                } else {
                    hub.discard_session_locked(&s, guard.as_mut(), &mut records);
                }
            }
            let session_present = resumed.is_some();
            let session = match resumed {
                Some(s) => s,
                None => {
                    let state = new_session_state(limits, v, expiry);
                    let s = Arc::new(Session::new(client_id, state));
                    hub.sessions().insert(s.clone());
                    s
                }
            };
            {
                let mut st = session.lock();
                st.version = v;
                st.expiry_interval = expiry;
                st.set_disconnected_at(None);
                st.client_max_packet_size = client_max_packet_size;
                st.keep_alive = keep_alive;
                st.clean_start = c.clean_start;
                st.connection = Some(connection);
                st.outgoing.set_receive_maximum(client_receive_maximum);
                let (expired, expired_ids) =
                    st.expire_pending(outgoing_config(limits), Instant::now());
                hub.metrics
                    .messages_expired
                    .fetch_add(expired, std::sync::atomic::Ordering::Relaxed);
                for message_id in expired_ids {
                    records.push(Record::Delivered {
                        client_id: session.client.clone(),
                        message_id,
                    });
                }
                // Redelivery of unacknowledged messages happens here, with DUP [MQTT-4.4.0-1].
                let _ = st.outgoing.resume(session_present);
                st.incoming.resume(session_present);
            }
            if let Some(g) = guard.as_mut() {
                if expiry > 0 {
                    // Also a barrier: everything submitted before (the `Sent` and `Released`
                    // records of the redeliveries just queued) is durable once it is.
                    records.push(Record::SessionUpsert {
                        client_id: session.client.clone(),
                        protocol_level: protocol_level(v),
                        expiry_interval: expiry,
                    });
                }
                if g.has_will(session.client_id()) {
                    // A delayed will is cancelled by the client coming back [MQTT-3.1.3-9].
                    records.push(Record::WillDone {
                        client_id: session.client.clone(),
                    });
                }
            }
            let commit = guard.as_mut().and_then(|g| g.submit(records));
            (session, session_present, commit)
        };
        if let Some(commit) = commit
            && let Err(e) = commit.await
        {
            tracing::error!(client = %session.client_id(), error = %e, "the write-ahead log failed: refusing the connection");
            let _ = write_packet(wr, v, &refuse(ReasonCode::SERVER_UNAVAILABLE)).await;
            return None;
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
        let mut wbuf = WriteBuf::default();
        if encoder.encode(&Packet::ConnAck(ack), wbuf.get()).is_err() {
            return None;
        }
        Metrics::inc(&hub.metrics.connections_total);
        tracing::debug!(client = %session.client_id(), %peer, version = %v, session_present, "connected");
        Some(Conn {
            keep_alive: KeepAliveTimer::new(keep_alive, hub.started),
            hub,
            id,
            session,
            version: v,
            encoder,
            waker,
            // Copied: the CONNECT's will is a slice of the CONNECT's read buffer.
            will: c.will.map(|w| {
                Box::new(LastWill {
                    topic: owned_str(&w.topic),
                    payload: Bytes::copy_from_slice(&w.payload),
                    qos: w.qos,
                    retain: w.retain,
                    properties: owned_properties(&w.properties),
                })
            }),
            aliases: SmallMap::default(),
            connect_expiry: expiry,
            wbuf,
        })
    }

    /// Notes that the client sent something (for the keep alive).
    fn keep_alive_received(&mut self) {
        self.keep_alive.received(self.hub.started);
    }

    /// Waits for the next event (what a connection does between two, and holds while it
    /// does); [`Event::Park`] when there is none and `park_now` or the keep-alive sweep asked
    /// it to park.
    fn wait<'a>(
        &'a self,
        io: &'a TcpStream,
        slot: &'a Slot,
        park_now: bool,
    ) -> impl Future<Output = Event> + 'a {
        self.waker
            .set_deadline(self.keep_alive.deadline(self.hub.started), self.hub.started);
        let waker = &self.waker;
        std::future::poll_fn(move |cx| {
            // Registered before the shutdown flag is read: the broker sets the flag, then wakes
            // every connection.
            let woken = waker.poll_woken(cx);
            if slot.shutting_down() {
                return Poll::Ready(Event::Shutdown);
            }
            if woken {
                let readable = io.poll_read_ready(cx).is_ready();
                return Poll::Ready(Event::Woken { readable });
            }
            match io.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Event::Readable),
                Poll::Ready(Err(_)) => Poll::Ready(Event::Lost),
                Poll::Pending if park_now || waker.take_park_request() => Poll::Ready(Event::Park),
                Poll::Pending => Poll::Pending,
            }
        })
    }

    /// Handles one event: reads and handles what came, checks the keep alive, and writes
    /// whatever is to be sent. `Some` ends the connection.
    async fn step(
        &mut self,
        event: Event,
        io: &mut TcpStream,
        rbuf: &mut BytesMut,
        decoder: &mut Decoder,
    ) -> Option<End> {
        let mut read = false;
        let mut readable = false;
        self.waker.active();
        match event {
            // Packets a client sent right behind its CONNECT, in the same read.
            Event::Start => read = !rbuf.is_empty(),
            Event::Data => read = true,
            Event::Readable => readable = true,
            Event::Lost => return Some(End::Lost),
            Event::Woken { readable: r } => {
                readable = r;
                if self.keep_alive.expired(self.hub.started) {
                    Metrics::inc(&self.hub.metrics.keep_alive_timeouts);
                    tracing::info!(client = %self.session.client_id(), "keep alive expired");
                    self.encode_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT);
                    let _ = io.write_all(self.wbuf.bytes()).await;
                    return Some(End::KeepAlive);
                }
            }
            Event::Shutdown => {
                self.encode_disconnect(ReasonCode::SERVER_SHUTTING_DOWN);
                let _ = io.write_all(self.wbuf.bytes()).await;
                return Some(End::Shutdown);
            }
            Event::Park => {}
        }
        if readable {
            // The read buffer exists only while there is something to read: an idle
            // connection holds none.
            rbuf.reserve(8192);
            match io.try_read_buf(rbuf) {
                Ok(0) => return Some(End::Lost),
                Ok(_) => {
                    read = true;
                    self.keep_alive.received(self.hub.started);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Some(End::Lost),
            }
        }
        if read && let Some(end) = self.handle_read(rbuf, decoder).await {
            // The acknowledgements of what was handled before the end still go out before
            // any DISCONNECT (else the client would send them again).
            let _ = self.flush(io).await;
            return Some(end);
        }
        if rbuf.is_empty() && rbuf.capacity() > 0 {
            *rbuf = BytesMut::new();
        }
        self.flush(io).await.err()
    }

    /// Handles every packet of one read as one batch: each packet's state change and records
    /// under the store lock, one append for them all, and once it is durable the replies and
    /// deliveries in packet order. `Some` ends the connection.
    ///
    /// The packets are decoded before the lock is taken, and a read of nothing but
    /// acknowledgements of deliveries (PUBACK, PUBREC, PUBCOMP) and PINGREQ is handled without
    /// it: those change only this session's outgoing state, under the session's own lock
    /// (which is also what a takeover takes), and their only records are `Delivered`, which
    /// follow in the log what they acknowledge anyway (the message's records were durable
    /// before it was delivered, its `Sent`/`Released` before the packet went out). The lock
    /// is then taken only to hand those records over.
    async fn handle_read(&mut self, rbuf: &mut BytesMut, decoder: &mut Decoder) -> Option<End> {
        let mut batch = Batch::default();
        let hub = self.hub.clone();
        let mut packets = Vec::new();
        let mut bad = None;
        loop {
            match decoder.decode(rbuf) {
                Ok(Some(p)) => packets.push(p),
                Ok(None) => break,
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            }
        }
        // Sized up front: a read of many PUBLISHes (a busy publisher) would otherwise grow
        // it by doubling, copying each time (a `Record` is 136 bytes). A message's records
        // are usually two: the message and its one `Enqueue`.
        if hub.store.is_some() {
            let publishes = packets
                .iter()
                .filter(|p| matches!(p, Packet::Publish(_)))
                .count();
            batch.records.reserve(publishes * 2);
        }
        let needs_lock = hub.store.is_some()
            && !packets.iter().all(|p| {
                matches!(
                    p,
                    Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) | Packet::PingReq
                )
            });
        let (end, commit) = {
            let mut guard = if needs_lock {
                hub.store.as_ref().map(|s| s.lock())
            } else {
                None
            };
            let mut end = None;
            for p in packets {
                if let Some(e) = self.handle(p, guard.as_mut(), &mut batch) {
                    end = Some(e);
                    break;
                }
            }
            if end.is_none()
                && let Some(e) = bad
            {
                tracing::info!(client = %self.session.client_id(), error = %e, "closing connection: bad packet");
                self.send_disconnect(&mut batch, e.reason_code());
                end = Some(End::ProtocolError(e.reason_code()));
            }
            let must_wait = !batch.records.is_empty();
            let mut records = std::mem::take(&mut batch.records);
            if !batch.delivered.is_empty() {
                records.push(Record::SessionOps {
                    client_id: self.session.client.clone(),
                    ops: batch
                        .delivered
                        .iter()
                        .map(|&message_id| SessionOp::Delivered { message_id })
                        .collect(),
                });
            }
            // Only records whose loss costs a resend (`Delivered`): they ride with a later append.
            // Without the lock (acknowledgements only), they are encoded before it is taken.
            let commit = match (guard.as_mut(), &hub.store) {
                (Some(g), _) if must_wait => g.submit(records),
                (Some(g), _) => {
                    g.submit_lazy(records);
                    None
                }
                (None, Some(store)) if must_wait => store.submit(records),
                (None, Some(store)) => {
                    store.submit_lazy(records);
                    None
                }
                (None, None) => None,
            };
            (end, commit)
        };
        if let Some(commit) = commit
            && let Err(e) = commit.await
        {
            tracing::error!(client = %self.session.client_id(), error = %e, "the write-ahead log failed: closing the connection unacknowledged");
            self.encode_disconnect(ReasonCode::UNSPECIFIED_ERROR);
            return Some(End::ProtocolError(ReasonCode::UNSPECIFIED_ERROR));
        }
        for post in batch.post {
            self.run_post(post);
        }
        end
    }

    /// What a batch does once its records are durable.
    fn run_post(&mut self, post: Post) {
        match post {
            Post::Send(p) => {
                self.drain_incoming();
                self.encode(&p);
            }
            Post::Publish { routed, ack } => {
                self.hub.dispatch(routed);
                if let Some((id, code)) = ack {
                    self.ack(id, code);
                }
            }
            Post::Ack(id, code) => self.ack(id, code),
            Post::Retained { messages, ids } => {
                for (m, qos, message_id) in messages {
                    self.hub
                        .deliver(&self.session, &m, qos, true, &ids, message_id);
                }
            }
        }
    }

    /// Moves pending output into the write buffer, makes durable what it promises (QoS 2
    /// PUBLISH: `Sent`; PUBREL: `Released`), and writes it. Errs with the connection's end.
    async fn flush(&mut self, wr: &mut TcpStream) -> Result<(), End> {
        let (owned, records) = self.collect_output();
        if let (Some(store), false) = (&self.hub.store, records.is_empty())
            && let Some(commit) = store.submit(records)
            && let Err(e) = commit.await
        {
            tracing::error!(client = %self.session.client_id(), error = %e, "the write-ahead log failed: closing the connection");
            return Err(End::Lost);
        }
        if !self.wbuf.is_empty() {
            if wr.write_all(self.wbuf.bytes()).await.is_err() {
                return Err(End::Lost);
            }
            // Released rather than cleared, so that an idle connection holds no write buffer.
            self.wbuf.release();
        }
        if owned { Ok(()) } else { Err(End::TakenOver) }
    }

    /// Moves what the session's state machines want to send into the write buffer, with the
    /// records that must be durable before it is written. False when the session belongs to
    /// another connection now (then nothing is moved).
    fn collect_output(&mut self) -> (bool, Vec<Record>) {
        let session = self.session.clone();
        let mut st = session.lock();
        let mut records = Vec::new();
        if st.connection.as_ref().map(|c| c.id) != Some(self.id) {
            return (false, records);
        }
        while let Some(p) = st.incoming.poll_transmit() {
            self.encode(&p);
        }
        if st.outgoing.pending_len() == 0 && !st.expiring.is_empty() {
            st.expiring.clear(); // nothing queued can expire any more
        }
        // One `SessionOps` for them all: the client named once, not once per packet.
        let mut ops = Vec::new();
        while let Some(p) = st.outgoing.poll_transmit() {
            let durable = match &p {
                // A resend (DUP) reuses the packet id its `Sent` record already holds.
                // One given its packet id when routed has its `Sent` in the message's record.
                Packet::Publish(pb) if pb.qos == QoS::ExactlyOnce && !pb.dup => pb
                    .packet_id
                    .filter(|&pid| !st.outgoing.was_reserved(pid))
                    .map(|pid| (pid, false)),
                Packet::PubRel(r) => Some((r.packet_id, true)),
                _ => None,
            };
            if let Some((packet_id, released)) = durable {
                let id = st
                    .outgoing
                    .ticket_of(packet_id)
                    .and_then(|t| st.message_ids.get(&t).copied());
                if let Some(message_id) = id {
                    ops.push(if released {
                        SessionOp::Released {
                            message_id,
                            packet_id,
                        }
                    } else {
                        SessionOp::Sent {
                            message_id,
                            packet_id,
                        }
                    });
                }
            }
            if let Packet::Publish(pb) = &p
                && !pb.dup
            {
                Metrics::inc(&self.hub.metrics.messages_sent);
            }
            self.encode(&p);
        }
        if !ops.is_empty() {
            records.push(Record::SessionOps {
                client_id: self.session.client.clone(),
                ops,
            });
        }
        (true, records)
    }

    /// Moves the incoming side's replies (PUBACK, PUBREC, PUBCOMP) into the write buffer, so
    /// that what follows them is written after them.
    fn drain_incoming(&mut self) {
        let session = self.session.clone();
        let mut st = session.lock();
        if st.connection.as_ref().map(|c| c.id) != Some(self.id) {
            return;
        }
        while let Some(p) = st.incoming.poll_transmit() {
            self.encode(&p);
        }
    }

    fn encode(&mut self, p: &Packet) {
        if let Err(e) = self.encoder.encode(p, self.wbuf.get()) {
            tracing::warn!(client = %self.session.client_id(), error = %e, packet = %p.packet_type(), "packet not sent");
        }
    }

    /// A DISCONNECT (5.0) straight into the write buffer.
    fn encode_disconnect(&mut self, code: ReasonCode) {
        if self.version == ProtocolVersion::V5 {
            self.encode(&Packet::Disconnect(Disconnect::new(code)));
        }
    }

    /// A DISCONNECT (5.0) after the batch's other replies.
    fn send_disconnect(&mut self, batch: &mut Batch, code: ReasonCode) {
        if self.version == ProtocolVersion::V5 {
            batch
                .post
                .push(Post::Send(Packet::Disconnect(Disconnect::new(code))));
        }
    }

    /// Whether this session's state is in the durable store.
    fn durable(&self, guard: Option<&StoreGuard<'_>>) -> bool {
        guard.is_some_and(|g| g.has_session(self.session.client_id()))
            && self.session.lock().expiry_interval > 0
    }

    /// The `Delivered` record for a completed outgoing exchange, if the store knows it.
    /// `id` is taken from the session's `message_ids` under the same lock that applied the
    /// acknowledgement: between two locks a takeover could renumber the tickets.
    fn completed(&self, batch: &mut Batch, id: Option<u64>) {
        if let Some(message_id) = id {
            batch.delivered.push(message_id);
        }
    }

    /// The session's state while this connection owns it; `None` once another connection
    /// took the session over. What the old connection still had unread must not touch the
    /// session the new one drives: a PUBREC applied after the new connection resent that
    /// PUBLISH would send PUBREL before the client's PUBREC. Those packets are dropped, as
    /// if they had been lost with the connection; the client resends after reconnecting.
    fn owned_session(&self) -> Option<MutexGuard<'_, SessionState>> {
        let st = self.session.lock();
        (st.connection.as_ref().map(|c| c.id) == Some(self.id)).then_some(st)
    }

    /// Handles one packet; `Some` ends the connection.
    fn handle(
        &mut self,
        p: Packet,
        guard: Option<&mut StoreGuard<'_>>,
        batch: &mut Batch,
    ) -> Option<End> {
        if self.owned_session().is_none() {
            return Some(End::TakenOver);
        }
        // Acknowledgements check again under the lock that applies them.
        match p {
            Packet::Publish(p) => return self.handle_publish(p, guard, batch),
            Packet::PubAck(a) => {
                let Some(mut st) = self.owned_session() else {
                    return Some(End::TakenOver);
                };
                let r = st
                    .outgoing
                    .handle_puback(&a)
                    .map(|c| st.message_ids.remove(&c.ticket));
                drop(st);
                let r = r.map(|id| self.completed(batch, id));
                return self.state_result(batch, r);
            }
            Packet::PubRec(r) => {
                let Some(mut st) = self.owned_session() else {
                    return Some(End::TakenOver);
                };
                let res = st
                    .outgoing
                    .handle_pubrec(&r)
                    .map(|c| c.and_then(|c| st.message_ids.remove(&c.ticket)));
                drop(st);
                if let Err(StateError::PacketIdNotFound { .. }) = res {
                    let mut rel = PubRel::new(r.packet_id);
                    rel.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                    batch.post.push(Post::Send(Packet::PubRel(rel)));
                    return None;
                }
                let res = res.map(|id| self.completed(batch, id));
                return self.state_result(batch, res);
            }
            Packet::PubRel(r) => {
                // The PUBCOMP waits in `incoming` until the batch's records are durable: were
                // it sent before `ReleaseDone`, a crash would make the client's next message
                // with this packet id look like a resend, and it would be lost.
                let Some(mut st) = self.owned_session() else {
                    return Some(End::TakenOver);
                };
                let res = st.incoming.handle_pubrel(&r);
                drop(st);
                if res.is_ok() && self.durable(guard.as_deref()) {
                    batch.records.push(Record::ReleaseDone {
                        client_id: self.session.client.clone(),
                        packet_id: r.packet_id,
                    });
                }
                return self.state_result(batch, res);
            }
            Packet::PubComp(c) => {
                let Some(mut st) = self.owned_session() else {
                    return Some(End::TakenOver);
                };
                let r = st
                    .outgoing
                    .handle_pubcomp(&c)
                    .map(|c| st.message_ids.remove(&c.ticket));
                drop(st);
                let r = r.map(|id| self.completed(batch, id));
                return self.state_result(batch, r);
            }
            Packet::Subscribe(s) => self.handle_subscribe(s, guard, batch),
            Packet::Unsubscribe(u) => self.handle_unsubscribe(u, guard, batch),
            Packet::PingReq => batch.post.push(Post::Send(Packet::PingResp)),
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry_interval() {
                    if self.connect_expiry == 0 && e != 0 {
                        // [MQTT-3.14.2-2]
                        self.send_disconnect(batch, ReasonCode::PROTOCOL_ERROR);
                        return Some(End::ProtocolError(ReasonCode::PROTOCOL_ERROR));
                    }
                    let e = e.min(self.hub.limits.max_session_expiry);
                    let durable = self.durable(guard.as_deref());
                    let mut st = self.session.lock();
                    st.expiry_interval = e;
                    if durable && e > 0 {
                        batch.records.push(Record::SessionUpsert {
                            client_id: self.session.client.clone(),
                            protocol_level: protocol_level(st.version),
                            expiry_interval: e,
                        });
                    }
                }
                return Some(if d.reason_code == ReasonCode::DISCONNECT_WITH_WILL {
                    End::NormalWithWill
                } else {
                    End::Normal
                });
            }
            Packet::Auth(_) => {
                self.send_disconnect(batch, ReasonCode::PROTOCOL_ERROR);
                return Some(End::ProtocolError(ReasonCode::PROTOCOL_ERROR));
            }
            other => {
                // The decoder refuses packets a client may not send; keep the match total.
                tracing::warn!(packet = %other.packet_type(), "unexpected packet");
                self.send_disconnect(batch, ReasonCode::PROTOCOL_ERROR);
                return Some(End::ProtocolError(ReasonCode::PROTOCOL_ERROR));
            }
        }
        None
    }

    /// Acknowledgements for unknown packet identifiers are ignored (a resent PUBACK after a
    /// reconnect is harmless); any other state error closes the connection.
    fn state_result(&mut self, batch: &mut Batch, r: Result<(), StateError>) -> Option<End> {
        match r {
            Ok(()) | Err(StateError::PacketIdNotFound { .. }) => None,
            Err(e) => {
                tracing::info!(client = %self.session.client_id(), error = %e, "closing connection: protocol error");
                self.send_disconnect(batch, e.reason_code());
                Some(End::ProtocolError(e.reason_code()))
            }
        }
    }

    fn handle_publish(
        &mut self,
        mut p: Publish,
        guard: Option<&mut StoreGuard<'_>>,
        batch: &mut Batch,
    ) -> Option<End> {
        Metrics::inc(&self.hub.metrics.messages_received);
        self.hub
            .metrics
            .bytes_received
            .fetch_add(p.payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(alias) = p.properties.topic_alias() {
            if alias > self.hub.limits.topic_alias_maximum {
                self.send_disconnect(batch, ReasonCode::TOPIC_ALIAS_INVALID);
                return Some(End::ProtocolError(ReasonCode::TOPIC_ALIAS_INVALID));
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        self.send_disconnect(batch, ReasonCode::PROTOCOL_ERROR);
                        return Some(End::ProtocolError(ReasonCode::PROTOCOL_ERROR));
                    }
                }
            } else {
                // A copy: the topic is a slice of the read buffer.
                self.aliases.insert(alias, owned_str(&p.topic));
            }
            p.properties.remove(PropertyId::TopicAlias);
        }
        let packet_id = p.packet_id;
        let qos = p.qos;
        let accepted = self.session.lock().incoming.handle_publish(p);
        let mut msg = match accepted {
            Ok(Some(m)) => m,
            Ok(None) => return None, // a QoS 2 resend: already routed once
            Err(e) => return self.state_result(batch, Err(e)),
        };
        if msg.retain {
            // Kept by the broker until replaced: copied out of the read buffer (8 kB) that
            // its slices would keep allocated.
            msg.topic = owned_str(&msg.topic);
            msg.payload = Bytes::copy_from_slice(&msg.payload);
            msg.properties = owned_properties(&msg.properties);
        }
        if msg.topic.starts_with("$SYS") {
            // Clients may not publish into the broker's own statistics.
            if let Some(id) = packet_id {
                batch.post.push(Post::Ack(id, ReasonCode::NOT_AUTHORIZED));
            }
            return None;
        }
        if let (QoS::ExactlyOnce, Some(id)) = (qos, packet_id)
            && self.durable(guard.as_deref())
        {
            // Remembered durably before PUBREC: a resend after a crash is not a new message.
            batch.records.push(Record::AwaitingRelease {
                client_id: self.session.client.clone(),
                packet_id: id,
            });
        }
        let routed = self.hub.prepare(
            msg,
            Some(self.session.client_id()),
            guard,
            &mut batch.records,
        );
        let code = if routed.len() == 0 {
            Metrics::inc(&self.hub.metrics.messages_unrouted);
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        batch.post.push(Post::Publish {
            routed,
            ack: packet_id.map(|id| (id, code)),
        });
        None
    }

    /// Acknowledges a QoS 1 or 2 PUBLISH once it has been handled (and is durable). Queued in
    /// `incoming`, then moved to the write buffer so that later replies follow it.
    fn ack(&mut self, id: qosmos_mqtt::PacketId, code: ReasonCode) {
        let code = if self.version == ProtocolVersion::V5 {
            code
        } else {
            ReasonCode::SUCCESS
        };
        let session = self.session.clone();
        let mut st = session.lock();
        // Forgotten (the session was taken over and ended) or a state error: nothing to send,
        // and the message is routed; a resend is then a new message, as the client sees it.
        let _ = st.incoming.ack_with(id, code);
        if st.connection.as_ref().map(|c| c.id) != Some(self.id) {
            st.wake();
            return;
        }
        while let Some(p) = st.incoming.poll_transmit() {
            self.encode(&p);
        }
    }

    fn handle_subscribe(
        &mut self,
        s: Subscribe,
        mut guard: Option<&mut StoreGuard<'_>>,
        batch: &mut Batch,
    ) {
        let id = s.properties.subscription_identifiers().next();
        let durable = self.durable(guard.as_deref());
        let mut codes = Vec::with_capacity(s.subscriptions.len());
        let mut retained = Vec::new();
        let now = Instant::now();
        for sub in &s.subscriptions {
            let granted = sub.options.qos; // every QoS is supported
            let opts = SubOptions {
                options: sub.options,
                id,
            };
            // A copy: the packet's filter is a slice of the read buffer, which it would keep
            // allocated (8 kB) for as long as the subscription lasts.
            let filter = owned_str(&sub.filter);
            let existed = self.hub.subscribe(&self.session, &filter, opts);
            self.session
                .lock()
                .subscriptions
                .insert(filter.clone(), opts);
            if durable {
                batch.records.push(Record::Subscribe {
                    client_id: self.session.client.clone(),
                    filter,
                    options: sub.options,
                    subscription_id: id,
                });
            }
            codes.push(ReasonCode(granted.as_u8()));
            let shared = sub.filter.starts_with("$share/");
            let send = match sub.options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNew => !existed,
                RetainHandling::DoNotSend => false,
            };
            if send && !shared {
                for (m, message_id) in self.hub.retained_for(&sub.filter, now) {
                    let qos = m.qos.min(granted);
                    retained.push((m, qos, message_id));
                }
            }
        }
        let mut messages = Vec::with_capacity(retained.len());
        for (m, qos, message_id) in retained {
            // Owed durably like any routed message, as a stored message of its own: the
            // retained one may already be owed to this session (routed to it a moment ago, or
            // sent at an earlier SUBSCRIBE and not yet acknowledged), and a session owes at
            // most one delivery per stored message (a second `Enqueue` is ignored on replay).
            // A copy costs one more record per retained message sent at SUBSCRIBE, and keeps
            // every delivery durable without asking the durable state what it owes.
            let message_id = match (guard.as_deref_mut(), message_id) {
                (Some(g), Some(_)) if durable && qos != QoS::AtMostOnce => {
                    let copy = g.message_id();
                    batch.records.push(Record::Message {
                        id: copy,
                        publish: storable(&m),
                        expires_at_unix_ms: m
                            .properties
                            .message_expiry_interval()
                            .map(|s| unix_ms_of(now + Duration::from_secs(u64::from(s)))),
                    });
                    batch.records.push(Record::Enqueue {
                        client_id: self.session.client.clone(),
                        message_id: copy,
                        qos,
                        retain: true,
                        subscription_ids: id.into_iter().collect(),
                    });
                    Some(copy)
                }
                _ => None,
            };
            messages.push((m, qos, message_id));
        }
        batch.post.push(Post::Send(Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            reason_codes: codes,
            properties: Properties::new(),
        })));
        if !messages.is_empty() {
            batch.post.push(Post::Retained {
                messages,
                ids: id.into_iter().collect(),
            });
        }
    }

    fn handle_unsubscribe(
        &mut self,
        u: Unsubscribe,
        guard: Option<&mut StoreGuard<'_>>,
        batch: &mut Batch,
    ) {
        let durable = self.durable(guard.as_deref());
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let existed = self.hub.unsubscribe(&self.session.client, f);
            self.session.lock().subscriptions.remove(f);
            if durable && existed {
                batch.records.push(Record::Unsubscribe {
                    client_id: self.session.client.clone(),
                    filter: f.clone(),
                });
            }
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
        batch.post.push(Post::Send(Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            reason_codes: codes,
            properties: Properties::new(),
        })));
    }

    /// Detaches from the session (unless it was taken over), expires it as configured, and
    /// publishes the will when the connection did not end normally.
    /// `wr` is `None` when the socket was lost on the way (it could not be parked or resumed).
    async fn finish(self, end: End, wr: Option<&mut TcpStream>) {
        if let Some(wr) = wr {
            if end == End::TakenOver && self.version == ProtocolVersion::V5 {
                let _ = write_packet(
                    wr,
                    self.version,
                    &Packet::Disconnect(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER)),
                )
                .await;
            }
            let _ = wr.shutdown().await;
        }
        tracing::debug!(client = %self.session.client_id(), ?end, "disconnected");
        let hub = &self.hub;
        let mut expiry = 0;
        let detached = if end == End::TakenOver {
            None
        } else {
            let mut st = self.session.lock();
            if st.connection.as_ref().map(|c| c.id) == Some(self.id) {
                st.connection = None;
                st.outgoing.on_disconnect();
                st.incoming.on_disconnect();
                let at = Instant::now();
                st.set_disconnected_at(Some(at));
                Some((at, st.expiry_interval))
            } else {
                None
            }
        };
        if let Some((at, e)) = detached {
            expiry = e;
            {
                if expiry == 0 {
                    if let Some(commit) = hub.discard_session(&self.session) {
                        let _ = commit.await;
                    }
                } else {
                    schedule_expiry(hub.clone(), self.session.clone(), at, expiry);
                }
            }
        }
        if let (true, Some(will)) = (end.publishes_will(), self.will) {
            let delay = will
                .properties
                .will_delay_interval()
                .unwrap_or(0)
                .min(expiry);
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
            if delay == 0 {
                publish_will(hub, p, self.session.client_id(), false).await;
            } else {
                let due = Instant::now() + Duration::from_secs(u64::from(delay));
                if let Some(store) = &hub.store {
                    // Owed durably: a restart re-arms it (a persistent session only; a will
                    // cannot outlive its session, see the `min(expiry)` above).
                    let commit = store.submit(vec![Record::WillPending {
                        client_id: self.session.client.clone(),
                        publish: storable(&p),
                        due_unix_ms: unix_ms_of(due),
                    }]);
                    if let Some(commit) = commit {
                        let _ = commit.await;
                    }
                }
                schedule_will(hub.clone(), self.session.clone(), p, due);
            }
        }
    }
}

/// How often the keep-alive sweep runs: a silent client is closed between 1.5 times its keep
/// alive and that plus this.
const KEEP_ALIVE_SWEEP: Duration = Duration::from_millis(500);

/// Wakes the connections whose keep alive is due, every [`KEEP_ALIVE_SWEEP`]: one sweep for
/// all of them instead of a timer held by every connection.
pub(crate) async fn keep_alive_sweep(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(KEEP_ALIVE_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now_ms = u64::try_from(hub.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Also asks the connections idle since the previous sweep to park.
        for_each_connection(&hub, |c| c.waker.sweep(now_ms));
    }
}

/// Wakes every connection, so that each sees the shutdown flag set before.
pub(crate) fn wake_all(hub: &Hub) {
    for_each_connection(hub, |c| c.waker.notify_one());
}

/// Calls `f` on the connection of each session that has one. The session map's lock is not
/// held while a session's is.
fn for_each_connection(hub: &Hub, mut f: impl FnMut(&Connection)) {
    let sessions: Vec<Arc<Session>> = hub.sessions().values().cloned().collect();
    for s in sessions {
        if let Some(c) = &s.lock().connection {
            f(c);
        }
    }
}

/// Ends a disconnected session `expiry` seconds after `at`, unless a connection came since.
pub(crate) fn schedule_expiry(hub: Arc<Hub>, session: Arc<Session>, at: Instant, expiry: u32) {
    if expiry == u32::MAX {
        return;
    }
    // A stopped broker must not be kept alive (its data directory open) by a timer.
    let hub = Arc::downgrade(&hub);
    tokio::spawn(async move {
        tokio::time::sleep_until((at + Duration::from_secs(u64::from(expiry))).into()).await;
        let Some(hub) = hub.upgrade() else {
            return;
        };
        let ended = {
            let st = session.lock();
            st.connection.is_none() && st.disconnected_at() == Some(at)
        };
        if ended {
            Metrics::inc(&hub.metrics.sessions_expired);
            // Not awaited: a session that comes back after a crash expires again.
            drop(hub.discard_session(&session));
        }
    });
}

/// Publishes a delayed will at `due`, unless a new connection was made to the session in time
/// [MQTT-3.1.3-9], whether or not that connection is still there.
pub(crate) fn schedule_will(hub: Arc<Hub>, session: Arc<Session>, will: Publish, due: Instant) {
    // Which disconnection this will belongs to: any later connection to the session (even one
    // that has ended again since) changes it.
    let left_at = session.lock().disconnected_at();
    let hub = Arc::downgrade(&hub);
    tokio::spawn(async move {
        tokio::time::sleep_until(due.into()).await;
        let Some(hub) = hub.upgrade() else {
            return;
        };
        let registered = hub
            .sessions()
            .get(session.client_id())
            .is_some_and(|s| Arc::ptr_eq(s, &session));
        let back = registered && {
            let st = session.lock();
            st.is_online() || st.disconnected_at() != left_at
        };
        if !back {
            publish_will(&hub, will, session.client_id(), true).await;
        }
    });
}

/// Publishes a will like any message (durably, with a store); `delayed` marks its pending
/// record done in the same append.
async fn publish_will(hub: &Hub, p: Publish, client: &str, delayed: bool) {
    Metrics::inc(&hub.metrics.wills_published);
    tracing::debug!(%client, topic = %p.topic, "publishing will");
    let mut extra = Vec::new();
    if delayed && hub.store.is_some() {
        extra.push(Record::WillDone {
            client_id: MqttStr::from(client),
        });
    }
    hub.publish_durably(p, Some(client), extra).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What is kept longer than its packet (a subscription's filter, a will, a topic alias, a
    /// retained message) is copied out of the read buffer: a slice would keep the whole
    /// buffer (8 kB) allocated, which made a subscribed idle connection cost 4 kB more.
    #[test]
    fn kept_strings_do_not_point_into_the_read_buffer() {
        let frame = Bytes::from_static(b"orders/store-1/new+ct+k+v");
        let within = |b: &[u8]| {
            let r = frame.as_ptr_range();
            r.contains(&b.as_ptr())
        };
        let topic = MqttStr::from_utf8(frame.slice(0..18)).expect("utf-8");
        assert!(within(topic.as_str().as_bytes()));
        let owned = owned_str(&topic);
        assert_eq!(owned, topic);
        assert!(!within(owned.as_str().as_bytes()));
        let mut props = Properties::new();
        props.push(Property::ContentType(
            MqttStr::from_utf8(frame.slice(19..21)).expect("utf-8"),
        ));
        props.push(Property::UserProperty(
            MqttStr::from_utf8(frame.slice(22..23)).expect("utf-8"),
            MqttStr::from_utf8(frame.slice(24..25)).expect("utf-8"),
        ));
        props.push(Property::CorrelationData(frame.slice(0..6)));
        let copy = owned_properties(&props);
        assert_eq!(copy, props);
        for p in copy.iter() {
            match p {
                Property::ContentType(s) => assert!(!within(s.as_str().as_bytes())),
                Property::UserProperty(k, v) => {
                    assert!(!within(k.as_str().as_bytes()));
                    assert!(!within(v.as_str().as_bytes()));
                }
                Property::CorrelationData(b) => assert!(!within(b)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// What an idle connection holds, in bytes, must not silently grow back (memory per idle
    /// connection is a measured goal: BENCHMARKS.md, `bench/compare.sh`). An idle connection
    /// is parked: its slab entry (`Parked`), its `Wake` and its session. The task's size (that
    /// of the `serve` future) is what a busy connection holds; the bounds hold for debug
    /// builds, release ones are smaller.
    #[tokio::test]
    async fn idle_connection_state_stays_small() {
        let hub = Arc::new(Hub::new(Limits::default(), None));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let permits = Arc::new(Semaphore::new(1));
        let slot = Slot::take(&permits).expect("a free slot");
        let parker = Parker::start(tokio::runtime::Handle::current(), &hub).expect("poller");
        let task = serve(hub, stream, peer, slot, parker.clone());
        let sizes = [
            ("Parked", std::mem::size_of::<Parked>(), 112),
            ("serve future", std::mem::size_of_val(&task), 344),
            ("Conn", std::mem::size_of::<Conn>(), 88),
            ("KeepAliveTimer", std::mem::size_of::<KeepAliveTimer>(), 16),
            ("Wake", std::mem::size_of::<Wake>(), 40),
            ("Connection", std::mem::size_of::<Connection>(), 48),
            ("SessionState", std::mem::size_of::<SessionState>(), 224),
        ];
        for (what, size, bound) in sizes {
            assert!(size <= bound, "{what} is {size} bytes, more than {bound}");
        }
    }
}
