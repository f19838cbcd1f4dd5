//! The axum integration (feature `axum`): configuration from Flask-MQTT's `MQTT_*` keys, and
//! the [`Client`] handle as an extractor from axum state.

use crate::client::Client;
use crate::error::{ClientError, OptionsError};
use crate::options::{ClientOptions, Will};
use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use qosmos_mqtt::{ProtocolVersion, QoS};

/// Client configuration read from environment variables with Flask-MQTT's names.
///
/// | key (with prefix `MQTT_`) | meaning | default |
/// |---|---|---|
/// | `MQTT_BROKER_URL` | host name, or a full `mqtt://user:pass@host:port` URL | `localhost` |
/// | `MQTT_BROKER_PORT` | port | 1883 |
/// | `MQTT_USERNAME`, `MQTT_PASSWORD` | credentials | none |
/// | `MQTT_CLIENT_ID` | client identifier | generated |
/// | `MQTT_KEEPALIVE` | keep alive, seconds | 60 |
/// | `MQTT_CLEAN_SESSION` | `true` / `false` (also `1`/`0`, `yes`/`no`) | true |
/// | `MQTT_PROTOCOL_VERSION` | `4` (3.1.1) or `5`, as Flask-MQTT's `MQTTv311` / `MQTTv5` | 4 |
/// | `MQTT_LAST_WILL_TOPIC`, `_MESSAGE`, `_QOS`, `_RETAIN` | the will | none |
/// | `MQTT_TLS_ENABLED` | must be false: TLS is not supported yet | false |
///
/// ```
/// use qosmos_client::MqttConfig;
/// let env = [("MQTT_BROKER_URL", "broker.local"), ("MQTT_BROKER_PORT", "1993"),
///            ("MQTT_KEEPALIVE", "30")];
/// let cfg = MqttConfig::from_lookup("MQTT_", |k| {
///     env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
/// })?;
/// assert_eq!(cfg.options().get_port(), 1993);
///
/// let bad = MqttConfig::from_lookup("MQTT_", |k| (k == "MQTT_KEEPALIVE").then(|| "soon".into()));
/// assert!(bad.unwrap_err().to_string().contains("MQTT_KEEPALIVE"));
/// # Ok::<(), qosmos_client::OptionsError>(())
/// ```
#[derive(Debug, Clone)]
pub struct MqttConfig {
    options: ClientOptions,
}

impl MqttConfig {
    /// Reads `{prefix}BROKER_URL`, `{prefix}BROKER_PORT`, … from the environment.
    ///
    /// # Errors
    ///
    /// [`OptionsError::Value`] naming the key whose value is bad.
    pub fn from_env_prefixed(prefix: &str) -> Result<MqttConfig, OptionsError> {
        MqttConfig::from_lookup(prefix, |k| std::env::var(k).ok())
    }

    /// The same from any lookup function (a config map, a test table).
    ///
    /// # Errors
    ///
    /// [`OptionsError::Value`] naming the key whose value is bad.
    pub fn from_lookup(
        prefix: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<MqttConfig, OptionsError> {
        let get = |name: &str| {
            let key = format!("{prefix}{name}");
            let value = lookup(&key)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty());
            (key, value)
        };
        let bad = |key: String, value: String, reason: &str| OptionsError::Value {
            key,
            value,
            reason: reason.to_owned(),
        };

        let (url_key, url) = get("BROKER_URL");
        let mut opts = match url {
            Some(u) if u.contains("://") => ClientOptions::from_url(&u)
                .map_err(|e| bad(url_key.clone(), u.clone(), &e.to_string()))?,
            Some(host) => ClientOptions::new(host, 1883),
            None => ClientOptions::new("localhost", 1883),
        };
        if let (key, Some(v)) = get("BROKER_PORT") {
            let port = v
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad(key, v.clone(), "expected a port number, 1 to 65535"))?;
            opts = opts.port(port);
        }
        if let (_, Some(user)) = get("USERNAME") {
            opts = opts.username(user);
        }
        if let (_, Some(pass)) = get("PASSWORD") {
            opts.password = Some(pass.into_bytes().into());
        }
        if let (_, Some(id)) = get("CLIENT_ID") {
            opts = opts.client_id(id);
        }
        if let (key, Some(v)) = get("KEEPALIVE") {
            let ka = v
                .parse::<u16>()
                .map_err(|_| bad(key, v.clone(), "expected seconds, 0 to 65535"))?;
            opts = opts.keep_alive(ka);
        }
        if let (key, Some(v)) = get("CLEAN_SESSION") {
            opts = opts.clean_start(parse_bool(&key, &v)?);
        }
        if let (key, Some(v)) = get("PROTOCOL_VERSION") {
            let version = match v.as_str() {
                "4" | "3.1.1" | "MQTTv311" => ProtocolVersion::V311,
                "5" | "5.0" | "MQTTv5" => ProtocolVersion::V5,
                _ => return Err(bad(key, v, "expected 4 (MQTT 3.1.1) or 5 (MQTT 5.0)")),
            };
            opts = opts.protocol(version);
        }
        if let (key, Some(v)) = get("TLS_ENABLED") {
            if parse_bool(&key, &v)? {
                return Err(bad(key, v, "TLS is not supported yet"));
            }
        }
        if let (_, Some(topic)) = get("LAST_WILL_TOPIC") {
            let mut will = Will::new(topic, get("LAST_WILL_MESSAGE").1.unwrap_or_default());
            if let (key, Some(v)) = get("LAST_WILL_QOS") {
                let qos = v
                    .parse::<u8>()
                    .ok()
                    .and_then(QoS::from_u8)
                    .ok_or_else(|| bad(key, v.clone(), "expected 0, 1 or 2"))?;
                will = will.qos(qos);
            }
            if let (key, Some(v)) = get("LAST_WILL_RETAIN") {
                will = will.retain(parse_bool(&key, &v)?);
            }
            opts = opts.will(will);
        }
        Ok(MqttConfig { options: opts })
    }

    /// The client options read.
    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// The client options, to adjust further.
    pub fn into_options(self) -> ClientOptions {
        self.options
    }

    /// Starts a client with these options (Flask-MQTT's `Mqtt(app)`).
    ///
    /// # Errors
    ///
    /// See [`Client::connect`].
    pub async fn connect(self) -> Result<Client, ClientError> {
        Client::connect(self.options).await
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, OptionsError> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(OptionsError::Value {
            key: key.to_owned(),
            value: v.to_owned(),
            reason: "expected true or false".to_owned(),
        }),
    }
}

/// A handler can take the [`Client`] directly as an argument when the router's state holds
/// one (`Router::with_state(client)`, or a state struct with `impl FromRef<AppState> for
/// Client`).
impl<S> FromRequestParts<S> for Client
where
    Client: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(Client::from_ref(state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<MqttConfig, OptionsError> {
        MqttConfig::from_lookup("MQTT_", |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn flask_mqtt_keys() -> Result<(), OptionsError> {
        let c = cfg(&[
            ("MQTT_BROKER_URL", "localhost"),
            ("MQTT_BROKER_PORT", "1993"),
            ("MQTT_KEEPALIVE", "30"),
            ("MQTT_USERNAME", "u"),
            ("MQTT_PASSWORD", "p"),
            ("MQTT_CLIENT_ID", "web-1"),
            ("MQTT_CLEAN_SESSION", "False"),
            ("MQTT_PROTOCOL_VERSION", "5"),
            ("MQTT_LAST_WILL_TOPIC", "status/web-1"),
            ("MQTT_LAST_WILL_MESSAGE", "gone"),
            ("MQTT_LAST_WILL_QOS", "1"),
            ("MQTT_LAST_WILL_RETAIN", "true"),
        ])?;
        let o = c.options();
        assert_eq!((o.get_host(), o.get_port()), ("localhost", 1993));
        assert_eq!(o.keep_alive, 30);
        assert_eq!(o.get_username(), Some("u"));
        assert_eq!(o.get_client_id(), "web-1");
        assert!(!o.clean_start);
        assert_eq!(o.get_protocol(), ProtocolVersion::V5);
        let will = o.will.clone().expect("a will");
        assert_eq!(
            (will.topic.as_str(), will.qos, will.retain),
            ("status/web-1", QoS::AtLeastOnce, true)
        );
        Ok(())
    }

    #[test]
    fn a_bad_value_names_its_key() {
        for (key, value) in [
            ("MQTT_BROKER_PORT", "eighty"),
            ("MQTT_KEEPALIVE", "-1"),
            ("MQTT_CLEAN_SESSION", "maybe"),
            ("MQTT_PROTOCOL_VERSION", "3"),
            ("MQTT_TLS_ENABLED", "true"),
        ] {
            let err = cfg(&[(key, value)]).expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        }
        let err = cfg(&[("MQTT_LAST_WILL_TOPIC", "t"), ("MQTT_LAST_WILL_QOS", "3")])
            .expect_err("qos 3")
            .to_string();
        assert!(err.contains("MQTT_LAST_WILL_QOS"), "{err}");
    }

    #[test]
    fn defaults_like_flask_mqtt() -> Result<(), OptionsError> {
        let c = cfg(&[])?;
        let o = c.options();
        assert_eq!((o.get_host(), o.get_port()), ("localhost", 1883));
        assert_eq!(o.get_protocol(), ProtocolVersion::V311);
        assert!(o.clean_start);
        Ok(())
    }
}
