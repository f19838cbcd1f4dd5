//! [`ClientOptions`]: where to connect and how to behave, as a builder.

use crate::backoff::Backoff;
use crate::error::OptionsError;
use bytes::Bytes;
use qosmos_mqtt::{LastWill, Properties, ProtocolVersion, QoS};
use std::path::PathBuf;
use std::time::Duration;

/// The will message: published by the broker if the connection ends without DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Where the will is published.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// Its QoS.
    pub qos: QoS,
    /// Whether it is retained.
    pub retain: bool,
    /// Will properties (5.0; ignored under 3.1.1).
    pub properties: Properties,
}

impl Will {
    /// A will at QoS 0, not retained.
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Will {
        Will {
            topic: topic.into(),
            payload: payload.into(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::new(),
        }
    }

    /// Sets the QoS.
    pub fn qos(mut self, qos: QoS) -> Will {
        self.qos = qos;
        self
    }

    /// Sets the retain flag.
    pub fn retain(mut self, retain: bool) -> Will {
        self.retain = retain;
        self
    }

    pub(crate) fn to_last_will(&self) -> LastWill {
        LastWill {
            topic: self.topic.as_str().into(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            properties: self.properties.clone(),
        }
    }
}

/// How to connect, and how the client behaves when the broker is away.
///
/// ```
/// use qosmos_client::ClientOptions;
/// use qosmos_mqtt::ProtocolVersion;
/// use std::time::Duration;
///
/// let opts = ClientOptions::new("localhost", 1883)
///     .client_id("store-42")
///     .protocol(ProtocolVersion::V5)
///     .clean_start(false)
///     .session_expiry(3600)
///     .keep_alive(30)
///     .connect_timeout(Duration::from_secs(5));
/// assert_eq!(opts.get_client_id(), "store-42");
/// ```
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) client_id: String,
    pub(crate) protocol: ProtocolVersion,
    pub(crate) clean_start: bool,
    pub(crate) keep_alive: u16,
    pub(crate) session_expiry: Option<u32>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<Bytes>,
    pub(crate) will: Option<Will>,
    pub(crate) receive_maximum: u16,
    pub(crate) backoff: Backoff,
    pub(crate) connect_timeout: Duration,
    pub(crate) offline_queue: usize,
    pub(crate) offline_queue_bytes: usize,
    pub(crate) fail_fast: bool,
    pub(crate) command_capacity: usize,
    pub(crate) delivery_capacity: usize,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) outbox: Option<PathBuf>,
}

impl ClientOptions {
    /// Options for `host:port` with the defaults: a generated client id, MQTT 3.1.1, clean
    /// start, keep alive 60 s, receive maximum 100, backoff 100 ms → 5 s with jitter, connect
    /// timeout 10 s, offline queue of 1000 messages (16 MiB), no fail fast.
    pub fn new(host: impl Into<String>, port: u16) -> ClientOptions {
        ClientOptions {
            host: host.into(),
            port,
            client_id: generated_client_id(),
            protocol: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: 60,
            session_expiry: None,
            username: None,
            password: None,
            will: None,
            receive_maximum: 100,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            connect_timeout: Duration::from_secs(10),
            offline_queue: 1000,
            offline_queue_bytes: 16 << 20,
            fail_fast: false,
            command_capacity: 64,
            delivery_capacity: 64,
            shutdown_timeout: Duration::from_secs(10),
            outbox: None,
        }
    }

    /// Options from a broker URL: `mqtt://[user[:password]@]host[:port]` (port 1883 when
    /// absent; `tcp://` is accepted as a synonym). User and password may be percent-encoded.
    ///
    /// ```
    /// use qosmos_client::ClientOptions;
    /// let opts = ClientOptions::from_url("mqtt://alice:s%40cret@broker.local:1884")?;
    /// assert_eq!(opts.get_host(), "broker.local");
    /// assert_eq!(opts.get_port(), 1884);
    /// # Ok::<(), qosmos_client::OptionsError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`OptionsError::Url`] for another scheme (`mqtts`, `ws` are not supported yet), a missing
    /// host or a bad port.
    pub fn from_url(url: &str) -> Result<ClientOptions, OptionsError> {
        let bad = |reason: &str| OptionsError::Url {
            url: redact(url),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected mqtt://host[:port]"))?;
        match scheme.to_ascii_lowercase().as_str() {
            "mqtt" | "tcp" => {}
            "mqtts" | "ssl" | "ws" | "wss" => return Err(bad("only mqtt:// is supported so far")),
            _ => return Err(bad("the scheme must be mqtt://")),
        }
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('?') {
            return Err(bad("a broker URL has no path or query"));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport).map_err(|r| bad(&r))?;
        let mut opts = ClientOptions::new(host, port.unwrap_or(1883));
        if let Some(userinfo) = userinfo {
            let (user, pass) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            let user = percent_decode(user).ok_or_else(|| bad("bad percent-encoding"))?;
            opts.username = Some(user);
            if let Some(p) = pass {
                let p = percent_decode(p).ok_or_else(|| bad("bad percent-encoding"))?;
                opts.password = Some(Bytes::from(p));
            }
        }
        Ok(opts)
    }

    /// Sets the broker host.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = host.into();
        self
    }

    /// Sets the broker port.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Sets the client identifier. A persistent session (clean start off) needs a stable one.
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// Sets the protocol version (3.1.1 by default).
    pub fn protocol(mut self, version: ProtocolVersion) -> Self {
        self.protocol = version;
        self
    }

    /// Clean Session (3.1.1) / Clean Start (5.0). With `false` the broker keeps the session
    /// (under 5.0 only if [`ClientOptions::session_expiry`] is above 0), and the client does not
    /// resubscribe when the broker says the session is present.
    pub fn clean_start(mut self, clean: bool) -> Self {
        self.clean_start = clean;
        self
    }

    /// Keep alive in seconds (0 turns it off).
    pub fn keep_alive(mut self, seconds: u16) -> Self {
        self.keep_alive = seconds;
        self
    }

    /// Session Expiry Interval in seconds (5.0 only; `u32::MAX` never expires).
    pub fn session_expiry(mut self, seconds: u32) -> Self {
        self.session_expiry = Some(seconds);
        self
    }

    /// Sets user name and password.
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<Bytes>) -> Self {
        self.username = Some(username.into());
        self.password = Some(password.into());
        self
    }

    /// Sets the user name alone.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    /// Sets the will message.
    pub fn will(mut self, will: Will) -> Self {
        self.will = Some(will);
        self
    }

    /// Our Receive Maximum (5.0): the most QoS 1 and 2 messages the broker may have
    /// unacknowledged with us. At least 1.
    pub fn receive_maximum(mut self, n: u16) -> Self {
        self.receive_maximum = n.max(1);
        self
    }

    /// Reconnect backoff: starts at `initial`, doubles up to `max`, with jitter.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(initial, max);
        self
    }

    /// How long a TCP connect plus CONNECT / CONNACK may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The most messages waiting for a connection or for room in the inflight window; beyond
    /// it [`crate::Client::publish`] fails with [`crate::ClientError::QueueFull`].
    pub fn offline_queue(mut self, messages: usize) -> Self {
        self.offline_queue = messages;
        self
    }

    /// The most payload bytes, summed, waiting in the offline queue.
    pub fn offline_queue_bytes(mut self, bytes: usize) -> Self {
        self.offline_queue_bytes = bytes;
        self
    }

    /// With `true`, [`crate::Client::connect`] fails when the first connection attempt fails.
    /// With `false` (the default) it returns at once and the client keeps retrying in the
    /// background; everything asked for meanwhile is queued.
    pub fn fail_fast(mut self, fail_fast: bool) -> Self {
        self.fail_fast = fail_fast;
        self
    }

    /// The capacity of the channel from the handles to the connection task.
    pub fn command_capacity(mut self, n: usize) -> Self {
        self.command_capacity = n.max(1);
        self
    }

    /// How many received messages may wait for the handlers before the client stops reading
    /// from the socket (backpressure).
    pub fn delivery_capacity(mut self, n: usize) -> Self {
        self.delivery_capacity = n.max(1);
        self
    }

    /// How long [`crate::Client::disconnect`] waits for inflight acknowledgements.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Keeps QoS 1 and 2 messages in a file until the broker acknowledges them: `publish`
    /// accepts a message only once it is on disk, and a client started later on the same file
    /// sends again whatever was never acknowledged (at least once: a message the broker had but
    /// had not acknowledged may be sent twice). One client per file. Writes are synchronous
    /// (an fsync per message), so this bounds the publish rate by the disk.
    pub fn durable_outbox(mut self, path: impl Into<PathBuf>) -> Self {
        self.outbox = Some(path.into());
        self
    }

    /// The broker host.
    pub fn get_host(&self) -> &str {
        &self.host
    }

    /// The broker port.
    pub fn get_port(&self) -> u16 {
        self.port
    }

    /// The client identifier.
    pub fn get_client_id(&self) -> &str {
        &self.client_id
    }

    /// The protocol version.
    pub fn get_protocol(&self) -> ProtocolVersion {
        self.protocol
    }

    /// The user name, if any.
    pub fn get_username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    pub(crate) fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `qosmos-` and 12 hex digits from the clock: unique enough for a clean-start client.
fn generated_client_id() -> String {
    let mut rng = crate::backoff::XorShift::from_clock();
    format!("qosmos-{:012x}", rng.next_u64() & 0xffff_ffff_ffff)
}

fn split_host_port(s: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| "unclosed [ in host".to_owned())?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err("unexpected text after the host".to_owned()),
        };
        (h.to_owned(), port)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (s.to_owned(), None),
        }
    };
    if host.is_empty() {
        return Err("the host is missing".to_owned());
    }
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("bad port {p:?}"))?,
        ),
        None => None,
    };
    Ok((host, port))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The URL with any password replaced, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_with_everything() -> Result<(), OptionsError> {
        let o = ClientOptions::from_url("mqtt://user:p%3Ass@example.com:1999")?;
        assert_eq!(o.host, "example.com");
        assert_eq!(o.port, 1999);
        assert_eq!(o.username.as_deref(), Some("user"));
        assert_eq!(o.password.as_deref(), Some(&b"p:ss"[..]));
        Ok(())
    }

    #[test]
    fn url_defaults_and_ipv6() -> Result<(), OptionsError> {
        let o = ClientOptions::from_url("mqtt://localhost")?;
        assert_eq!((o.host.as_str(), o.port), ("localhost", 1883));
        let o = ClientOptions::from_url("mqtt://[::1]:1884/")?;
        assert_eq!((o.host.as_str(), o.port), ("::1", 1884));
        assert_eq!(o.addr(), "[::1]:1884");
        Ok(())
    }

    #[test]
    fn bad_urls_are_refused_without_leaking_the_password() {
        for url in [
            "localhost:1883",
            "http://x",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtts://h",
            "mqtt://h/path",
        ] {
            assert!(ClientOptions::from_url(url).is_err(), "{url}");
        }
        let Err(e) = ClientOptions::from_url("mqtt://u:secret@h:x") else {
            panic!("bad port accepted");
        };
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
