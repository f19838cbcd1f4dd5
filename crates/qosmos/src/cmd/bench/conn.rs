//! A minimal load-generation MQTT connection: one TCP stream, a receive buffer decoded with
//! `qosmos-mqtt`, and a send buffer that collects packets until [`Conn::flush`] writes them
//! in one go. No session state beyond what the publisher and subscriber loops keep.

use crate::url::BrokerUrl;
use bytes::BytesMut;
use qosmos_mqtt::{
    ConnAck, Connect, Decoder, Disconnect, Packet, ProtocolVersion, ReasonCode, Role, encode_packet,
};
use std::fmt;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Keep alive sent in CONNECT; the loops send PINGREQ after half of it without sending.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Why a bench connection failed.
#[derive(Debug)]
pub(crate) enum ConnError {
    /// TCP connect, read or write failed.
    Io(std::io::Error),
    /// The broker did not answer in time.
    Timeout(&'static str),
    /// The broker closed the connection.
    Closed,
    /// The broker sent bytes that are not valid MQTT.
    Decode(qosmos_mqtt::DecodeError),
    /// A packet could not be encoded (too large).
    Encode(qosmos_mqtt::EncodeError),
    /// CONNACK refused the connection.
    Refused(ReasonCode),
    /// SUBACK refused the subscription.
    SubscribeRefused(ReasonCode),
    /// The broker disconnected us (MQTT 5 DISCONNECT).
    Disconnected(ReasonCode),
    /// The broker sent something out of order.
    Protocol(String),
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "{e}"),
            ConnError::Timeout(what) => write!(f, "timed out waiting for {what}"),
            ConnError::Closed => f.write_str("the broker closed the connection"),
            ConnError::Decode(e) => write!(f, "malformed packet from the broker: {e}"),
            ConnError::Encode(e) => write!(f, "cannot encode a packet: {e}"),
            ConnError::Refused(r) => write!(f, "the broker refused the connection: {r}"),
            ConnError::SubscribeRefused(r) => write!(f, "the broker refused the subscription: {r}"),
            ConnError::Disconnected(r) => write!(f, "the broker disconnected: {r}"),
            ConnError::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

impl From<std::io::Error> for ConnError {
    fn from(e: std::io::Error) -> Self {
        ConnError::Io(e)
    }
}

/// One connection to the broker.
pub(crate) struct Conn {
    stream: TcpStream,
    decoder: Decoder,
    rbuf: BytesMut,
    wbuf: BytesMut,
    version: ProtocolVersion,
}

impl Conn {
    /// Connects, sends CONNECT and waits for a successful CONNACK.
    pub(crate) async fn connect(
        url: &BrokerUrl,
        client_id: &str,
        version: ProtocolVersion,
        timeout: Duration,
        session_expiry: Option<u32>,
    ) -> Result<(Conn, ConnAck), ConnError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(url.authority()))
            .await
            .map_err(|_| ConnError::Timeout("the TCP connection"))??;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            decoder: Decoder::new(Role::Client, Some(version)),
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            version,
        };
        let mut connect = Connect::new(version, client_id);
        connect.keep_alive = KEEP_ALIVE.as_secs() as u16;
        if let Some(secs) = session_expiry {
            connect.clean_start = false;
            if version == ProtocolVersion::V5 {
                connect.properties.set_session_expiry_interval(secs);
            }
        }
        connect.username = url.username.as_deref().map(Into::into);
        connect.password = url
            .password
            .as_ref()
            .map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()));
        conn.queue(&Packet::Connect(Box::new(connect)))?;
        conn.flush().await?;
        let packet = tokio::time::timeout(timeout, conn.next_packet())
            .await
            .map_err(|_| ConnError::Timeout("CONNACK"))??;
        match packet {
            Packet::ConnAck(ack) if ack.reason_code.is_success() => Ok((conn, ack)),
            Packet::ConnAck(ack) => Err(ConnError::Refused(ack.reason_code)),
            other => Err(ConnError::Protocol(format!(
                "expected CONNACK, got {}",
                other.packet_type()
            ))),
        }
    }

    /// Appends a packet to the send buffer.
    pub(crate) fn queue(&mut self, packet: &Packet) -> Result<(), ConnError> {
        encode_packet(packet, self.version, &mut self.wbuf).map_err(ConnError::Encode)?;
        Ok(())
    }

    /// Bytes waiting in the send buffer.
    pub(crate) fn queued(&self) -> usize {
        self.wbuf.len()
    }

    /// Writes the send buffer out.
    pub(crate) async fn flush(&mut self) -> Result<(), ConnError> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// Waits for more bytes from the broker. Cancel safe: bytes read are kept in the buffer.
    pub(crate) async fn read_more(&mut self) -> Result<(), ConnError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(64 * 1024);
        }
        match self.stream.read_buf(&mut self.rbuf).await? {
            0 => Err(ConnError::Closed),
            _ => Ok(()),
        }
    }

    /// Reads what has already arrived without waiting; `false` when there was nothing.
    pub(crate) fn try_read_more(&mut self) -> Result<bool, ConnError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(64 * 1024);
        }
        match self.stream.try_read_buf(&mut self.rbuf) {
            Ok(0) => Err(ConnError::Closed),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The next complete packet already buffered, if any. A DISCONNECT from the broker is
    /// returned as an error.
    pub(crate) fn decode(&mut self) -> Result<Option<Packet>, ConnError> {
        match self
            .decoder
            .decode(&mut self.rbuf)
            .map_err(ConnError::Decode)?
        {
            Some(Packet::Disconnect(d)) => Err(ConnError::Disconnected(d.reason_code)),
            other => Ok(other),
        }
    }

    /// Waits for the next packet.
    pub(crate) async fn next_packet(&mut self) -> Result<Packet, ConnError> {
        loop {
            if let Some(p) = self.decode()? {
                return Ok(p);
            }
            self.read_more().await?;
        }
    }

    /// Sends DISCONNECT and closes the stream; errors are ignored, the run is over.
    pub(crate) async fn close(mut self) {
        let _ = self.queue(&Packet::Disconnect(Disconnect::new(
            ReasonCode::NORMAL_DISCONNECTION,
        )));
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}
