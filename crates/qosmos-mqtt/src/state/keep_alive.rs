//! Keep alive timers for either side of a connection.

use std::time::{Duration, Instant};

/// What [`KeepAlive::handle_timeout`] asks the caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAliveAction {
    /// Nothing is due.
    Nothing,
    /// Client: send PINGREQ now (and report it with [`KeepAlive::handle_sent`]).
    SendPing,
    /// The peer is gone: close the connection. A server sends DISCONNECT with Keep Alive timeout
    /// (0x8D) under 5.0 first, if it can.
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Ping after `interval` without sending or without receiving; expire `ping_timeout` after
    /// a ping with nothing received.
    Client { ping_timeout: Duration },
    /// Expire after one and a half `interval` without receiving ([MQTT-3.1.2-22] in 5.0,
    /// [MQTT-3.1.2-24] in 3.1.1).
    Server,
}

/// The keep alive timer of one connection.
///
/// # Calling contract
///
/// Report every packet written with [`KeepAlive::handle_sent`] and every packet read with
/// [`KeepAlive::handle_received`]. Arm a timer for [`KeepAlive::poll_timeout`] (re-read it after
/// each call) and when it fires call [`KeepAlive::handle_timeout`], which says what to do. A keep
/// alive of 0 disables it: `poll_timeout` is `None` and `handle_timeout` does nothing.
///
/// # Example
///
/// ```
/// use qosmos_mqtt::state::{KeepAlive, KeepAliveAction};
/// use std::time::{Duration, Instant};
///
/// let start = Instant::now();
/// let mut ka = KeepAlive::client(10, start);
/// assert_eq!(ka.poll_timeout(), Some(start + Duration::from_secs(10)));
/// assert_eq!(ka.handle_timeout(start + Duration::from_secs(10)), KeepAliveAction::SendPing);
/// ka.handle_sent(start + Duration::from_secs(10));
/// ka.handle_received(start + Duration::from_secs(11)); // PINGRESP
/// assert_eq!(ka.poll_timeout(), Some(start + Duration::from_secs(20)));
/// ```
#[derive(Debug, Clone)]
pub struct KeepAlive {
    role: Role,
    /// `None` when keep alive is 0.
    interval: Option<Duration>,
    last_sent: Instant,
    last_received: Instant,
    /// When the client's unanswered PINGREQ was asked for.
    ping_sent: Option<Instant>,
}

impl KeepAlive {
    /// A client's timer for a keep alive of `seconds` (the CONNECT value, or the CONNACK's Server
    /// Keep Alive when present), started at `now` (CONNECT sent).
    ///
    /// It asks for a PINGREQ when nothing was sent for the interval (the client must not stay
    /// silent longer than the keep alive), and also
    /// when nothing was received for it, so that a connection that only sends still notices a
    /// dead peer. A PINGREQ not answered (by any packet) within the keep alive interval means
    /// the connection is dead; see [`KeepAlive::with_ping_timeout`].
    pub fn client(seconds: u16, now: Instant) -> KeepAlive {
        let interval = Self::interval(seconds);
        KeepAlive {
            role: Role::Client {
                ping_timeout: interval.unwrap_or_default(),
            },
            interval,
            last_sent: now,
            last_received: now,
            ping_sent: None,
        }
    }

    /// A server's timer for the keep alive `seconds` in force (the CONNECT value, or the Server
    /// Keep Alive it sent), started at `now` (CONNECT received).
    pub fn server(seconds: u16, now: Instant) -> KeepAlive {
        KeepAlive {
            role: Role::Server,
            interval: Self::interval(seconds),
            last_sent: now,
            last_received: now,
            ping_sent: None,
        }
    }

    /// Client: how long to wait for any packet after a PINGREQ before [`KeepAliveAction::Expired`].
    /// No effect on a server's timer.
    pub fn with_ping_timeout(mut self, timeout: Duration) -> KeepAlive {
        if let Role::Client { ping_timeout } = &mut self.role {
            *ping_timeout = timeout;
        }
        self
    }

    /// The keep alive interval, `None` when disabled.
    pub fn keep_alive(&self) -> Option<Duration> {
        self.interval
    }

    /// A packet was written.
    pub fn handle_sent(&mut self, now: Instant) {
        self.last_sent = self.last_sent.max(now);
    }

    /// A packet was read. Any packet answers a PINGREQ: it shows the peer is there.
    pub fn handle_received(&mut self, now: Instant) {
        self.last_received = self.last_received.max(now);
        if self.ping_sent.is_some_and(|sent| now >= sent) {
            self.ping_sent = None;
        }
    }

    /// When [`KeepAlive::handle_timeout`] should next be called; `None` when disabled.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let interval = self.interval?;
        Some(match self.role {
            Role::Server => self.last_received + interval + interval / 2,
            Role::Client { ping_timeout } => match self.ping_sent {
                Some(sent) => sent + ping_timeout,
                None => self.last_sent.min(self.last_received) + interval,
            },
        })
    }

    /// Checks the timer at `now`. [`KeepAliveAction::SendPing`] is returned once per ping: the
    /// next one is due a keep alive interval after the last packet sent, once this one is
    /// answered.
    pub fn handle_timeout(&mut self, now: Instant) -> KeepAliveAction {
        let Some(deadline) = self.poll_timeout() else {
            return KeepAliveAction::Nothing;
        };
        if now < deadline {
            return KeepAliveAction::Nothing;
        }
        match (self.role, self.ping_sent) {
            (Role::Server, _) | (Role::Client { .. }, Some(_)) => KeepAliveAction::Expired,
            (Role::Client { .. }, None) => {
                self.ping_sent = Some(now);
                KeepAliveAction::SendPing
            }
        }
    }

    fn interval(seconds: u16) -> Option<Duration> {
        (seconds > 0).then(|| Duration::from_secs(u64::from(seconds)))
    }
}
