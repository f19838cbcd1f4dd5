//! Broker URLs: `mqtt://[user[:password]@]host[:port]`.
//!
//! Shared by every command that connects to a broker (`serve --broker`, `store`, `pub`, `sub`,
//! `bench`). `mqtts://`, `ws://` and `wss://` are recognised and refused as not supported yet,
//! so that a user who asks for TLS never silently gets plain TCP.

use std::fmt;
use std::str::FromStr;

/// The port used when a URL names none.
pub(crate) const DEFAULT_PORT: u16 = 1883;

/// A parsed broker URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct BrokerUrl {
    /// Host name or IP address (IPv6 without the brackets).
    pub(crate) host: String,
    /// TCP port.
    pub(crate) port: u16,
    /// User name, if the URL has one.
    pub(crate) username: Option<String>,
    /// Password, if the URL has one (only with a user name).
    pub(crate) password: Option<String>,
}

impl BrokerUrl {
    /// `host:port` as accepted by `TcpStream::connect` (IPv6 hosts in brackets).
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

// The password never appears in logs or error messages.
impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mqtt://")?;
        if let Some(user) = &self.username {
            f.write_str(user)?;
            if self.password.is_some() {
                f.write_str(":***")?;
            }
            f.write_str("@")?;
        }
        f.write_str(&self.authority())
    }
}

/// Why a broker URL was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UrlError {
    /// No `scheme://` at the front.
    MissingScheme,
    /// A scheme qosmos will support later.
    Unsupported(String),
    /// A scheme that is not MQTT at all.
    UnknownScheme(String),
    /// No host after the scheme.
    MissingHost,
    /// A port that is not a number from 1 to 65535.
    BadPort(String),
    /// A path, query or fragment, which broker URLs do not have.
    TrailingPath,
    /// An IPv6 host without its closing bracket.
    BadIpv6,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::MissingScheme => f.write_str("expected mqtt://[user[:password]@]host[:port]"),
            UrlError::Unsupported(s) => write!(f, "{s}:// is not supported yet (use mqtt://)"),
            UrlError::UnknownScheme(s) => write!(f, "unknown scheme {s}:// (use mqtt://)"),
            UrlError::MissingHost => f.write_str("no host in the URL"),
            UrlError::BadPort(p) => write!(f, "invalid port {p:?}"),
            UrlError::TrailingPath => f.write_str("a broker URL has no path, query or fragment"),
            UrlError::BadIpv6 => f.write_str("unclosed [ in an IPv6 host"),
        }
    }
}

impl std::error::Error for UrlError {}

impl FromStr for BrokerUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<BrokerUrl, UrlError> {
        let (scheme, rest) = s.split_once("://").ok_or(UrlError::MissingScheme)?;
        match scheme.to_ascii_lowercase().as_str() {
            "mqtt" | "tcp" => {}
            "mqtts" | "ssl" | "tls" | "ws" | "wss" => {
                return Err(UrlError::Unsupported(scheme.to_owned()));
            }
            _ => return Err(UrlError::UnknownScheme(scheme.to_owned())),
        }
        // A single trailing slash is harmless; anything after it is not.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(UrlError::TrailingPath);
        }
        // The user info ends at the last '@': a password may contain '@'.
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (Some(user.to_owned()), Some(pass.to_owned())),
                None => (Some(u.to_owned()), None),
            },
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(UrlError::BadIpv6)?;
            match after {
                "" => (host, None),
                p => match p.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err(UrlError::BadIpv6),
                },
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(UrlError::MissingHost);
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(UrlError::BadPort(p.to_owned())),
            },
        };
        Ok(BrokerUrl {
            host: host.to_owned(),
            port,
            username,
            password,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<BrokerUrl, UrlError> {
        s.parse()
    }

    #[test]
    fn host_only_gets_the_default_port() {
        let u = parse("mqtt://broker.local").expect("valid");
        assert_eq!(u.host, "broker.local");
        assert_eq!(u.port, 1883);
        assert_eq!(u.username, None);
        assert_eq!(u.authority(), "broker.local:1883");
    }

    #[test]
    fn user_password_and_port() {
        let u = parse("mqtt://alice:s3cr@t@127.0.0.1:2883/").expect("valid");
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.port, 2883);
        assert_eq!(u.username.as_deref(), Some("alice"));
        assert_eq!(u.password.as_deref(), Some("s3cr@t"));
        assert_eq!(u.to_string(), "mqtt://alice:***@127.0.0.1:2883");
        assert!(!format!("{u:?}").contains("s3cr"));
    }

    #[test]
    fn user_without_password() {
        let u = parse("mqtt://bob@h").expect("valid");
        assert_eq!(u.username.as_deref(), Some("bob"));
        assert_eq!(u.password, None);
    }

    #[test]
    fn ipv6() {
        let u = parse("mqtt://[::1]:1884").expect("valid");
        assert_eq!(u.host, "::1");
        assert_eq!(u.authority(), "[::1]:1884");
        assert_eq!(parse("mqtt://[::1]").expect("valid").port, 1883);
        assert_eq!(parse("mqtt://[::1"), Err(UrlError::BadIpv6));
    }

    #[test]
    fn later_schemes_are_not_supported_yet() {
        for s in ["mqtts://h", "ws://h", "wss://h:443"] {
            let e = parse(s).expect_err(s);
            assert!(matches!(e, UrlError::Unsupported(_)), "{s}: {e:?}");
            assert!(e.to_string().contains("not supported yet"));
        }
    }

    #[test]
    fn malformed() {
        assert_eq!(parse("127.0.0.1:1883"), Err(UrlError::MissingScheme));
        assert_eq!(
            parse("http://h"),
            Err(UrlError::UnknownScheme("http".into()))
        );
        assert_eq!(parse("mqtt://"), Err(UrlError::MissingHost));
        assert_eq!(parse("mqtt://:1883"), Err(UrlError::MissingHost));
        assert_eq!(parse("mqtt://h:0"), Err(UrlError::BadPort("0".into())));
        assert_eq!(parse("mqtt://h:x"), Err(UrlError::BadPort("x".into())));
        assert_eq!(
            parse("mqtt://h:70000"),
            Err(UrlError::BadPort("70000".into()))
        );
        assert_eq!(parse("mqtt://h/topic"), Err(UrlError::TrailingPath));
    }
}
