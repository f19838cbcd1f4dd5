//! `qosmos bench` flags and the topic plan they describe.

use crate::cli::{ProtocolArg, parse_qos};
use crate::error::CliError;
use crate::url::BrokerUrl;
use qosmos_mqtt::QoS;

use super::payload::HEADER_LEN;

/// Flags of `qosmos bench`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
TOPICS AND SCENARIOS
  Publisher i publishes to qosmos-bench/{run}/{i mod T}; subscriber j subscribes to
  qosmos-bench/{run}/{j mod T}, or to qosmos-bench/{run}/# with --wildcard ({run} is
  unique per run). Every subscriber expects --messages from every publisher whose topic
  it matches, so expected = messages x publishers x subscribers-per-topic.

  fan-in 20->1:     --publishers 20 --subscribers 1 --topics 20 --wildcard
  fan-out 1->100:   --publishers 1 --subscribers 100
  100 pairs:        --publishers 100 --subscribers 100 --topics 100
  idle connections: --idle-connections 10000 --hold 10

OUTPUT
  Progress on stderr every second; then sent, received, lost (expected minus distinct
  received), duplicated (a (publisher, seq) seen again by the same subscriber), msgs/s
  (received per second, from the first publish to the last receive) and latency
  percentiles. With --json, stdout holds only one JSON object (the summary goes to stderr).
  Exit 0 when the run completes, even with losses; 1 when a connection fails.")]
pub(crate) struct BenchArgs {
    /// Broker to load: mqtt://[user[:password]@]host[:port].
    #[arg(
        long,
        env = "QOSMOS_BROKER",
        value_name = "URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub(crate) broker: BrokerUrl,

    /// Publishing connections.
    #[arg(long, env = "QOSMOS_PUBLISHERS", value_name = "N", default_value_t = 1)]
    pub(crate) publishers: u32,

    /// Subscribing connections.
    #[arg(
        long,
        env = "QOSMOS_SUBSCRIBERS",
        value_name = "M",
        default_value_t = 1
    )]
    pub(crate) subscribers: u32,

    /// QoS of publishes and subscriptions: 0, 1 or 2.
    #[arg(long, env = "QOSMOS_QOS", value_name = "Q", default_value = "0",
          value_parser = parse_qos)]
    pub(crate) qos: QoS,

    /// Messages per publisher.
    #[arg(
        long,
        env = "QOSMOS_MESSAGES",
        value_name = "K",
        default_value_t = 1000
    )]
    pub(crate) messages: u32,

    /// Payload size in bytes (at least 16: sequence number and timestamp).
    #[arg(
        long,
        env = "QOSMOS_PAYLOAD",
        value_name = "BYTES",
        default_value_t = 64
    )]
    pub(crate) payload: usize,

    /// Number of topics; publisher i uses topic i mod T.
    #[arg(long, env = "QOSMOS_TOPICS", value_name = "T", default_value_t = 1)]
    pub(crate) topics: u32,

    /// Subscribers subscribe to every topic of the run (qosmos-bench/{run}/#).
    #[arg(long, env = "QOSMOS_WILDCARD", value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) wildcard: bool,

    /// Limit the total publish rate to R messages per second (spread over publishers).
    #[arg(long, env = "QOSMOS_RATE", value_name = "R")]
    pub(crate) rate: Option<u64>,

    /// Most unacknowledged QoS 1/2 publishes per publisher (capped by the broker's
    /// Receive Maximum).
    #[arg(long, env = "QOSMOS_INFLIGHT", value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) inflight: u16,

    /// MQTT protocol version.
    #[arg(
        long,
        env = "QOSMOS_PROTOCOL",
        value_name = "VERSION",
        default_value = "5"
    )]
    pub(crate) protocol: ProtocolArg,

    /// Seconds without progress (nothing sent, acknowledged or received) before giving up
    /// waiting; also the connect timeout.
    #[arg(
        long,
        env = "QOSMOS_TIMEOUT",
        value_name = "SECS",
        default_value_t = 30.0
    )]
    pub(crate) timeout: f64,

    /// Connect every publisher and subscriber with a persistent session that outlives its
    /// connection by SECS seconds (3.1.1: clean session false), so that a durable broker
    /// stores their messages; clean sessions when omitted.
    #[arg(long, env = "QOSMOS_SESSION_EXPIRY", value_name = "SECS")]
    pub(crate) session_expiry: Option<u32>,

    /// Print the result as one JSON object on stdout.
    #[arg(long, env = "QOSMOS_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) json: bool,

    /// Instead of a load run, open N idle connections, hold them for --hold seconds, and
    /// report how many opened.
    #[arg(long, env = "QOSMOS_IDLE_CONNECTIONS", value_name = "N")]
    pub(crate) idle_connections: Option<u32>,

    /// Seconds to hold idle connections open.
    #[arg(long, env = "QOSMOS_HOLD", value_name = "SECS", default_value_t = 10.0)]
    pub(crate) hold: f64,
}

impl BenchArgs {
    /// Checks what clap cannot: ranges that depend on each other.
    pub(crate) fn validate(&self) -> Result<(), CliError> {
        if !(self.timeout.is_finite() && self.timeout > 0.0) {
            return Err(CliError::usage(
                "bench: --timeout must be a positive number of seconds",
            ));
        }
        if !(self.hold.is_finite() && self.hold >= 0.0) {
            return Err(CliError::usage(
                "bench: --hold must be zero or more seconds",
            ));
        }
        if self.idle_connections.is_some() {
            return Ok(());
        }
        if self.publishers == 0 {
            return Err(CliError::usage("bench: --publishers must be at least 1"));
        }
        if self.messages == 0 {
            return Err(CliError::usage("bench: --messages must be at least 1"));
        }
        if self.topics == 0 {
            return Err(CliError::usage("bench: --topics must be at least 1"));
        }
        if self.payload < HEADER_LEN {
            return Err(CliError::usage(format!(
                "bench: --payload must be at least {HEADER_LEN} bytes (sequence number and timestamp)"
            )));
        }
        if self.rate == Some(0) {
            return Err(CliError::usage("bench: --rate must be at least 1"));
        }
        Ok(())
    }
}

/// Who publishes where and who receives what, for one run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Unique per run, so retained messages or other runs never mix in.
    pub(crate) run_id: String,
    /// Number of publishers.
    pub(crate) publishers: u32,
    /// Number of subscribers.
    pub(crate) subscribers: u32,
    /// Number of topics.
    pub(crate) topics: u32,
    /// Whether subscribers use `#`.
    pub(crate) wildcard: bool,
    /// Messages per publisher.
    pub(crate) messages: u32,
}

impl Plan {
    /// The plan for these flags and run id.
    pub(crate) fn new(args: &BenchArgs, run_id: String) -> Plan {
        Plan {
            run_id,
            publishers: args.publishers,
            subscribers: args.subscribers,
            topics: args.topics.max(1),
            wildcard: args.wildcard,
            messages: args.messages,
        }
    }

    /// The topic publisher `i` publishes to.
    pub(crate) fn publisher_topic(&self, i: u32) -> String {
        format!("qosmos-bench/{}/{}", self.run_id, i % self.topics)
    }

    /// The filter subscriber `j` subscribes to.
    pub(crate) fn subscriber_filter(&self, j: u32) -> String {
        if self.wildcard {
            format!("qosmos-bench/{}/#", self.run_id)
        } else {
            format!("qosmos-bench/{}/{}", self.run_id, j % self.topics)
        }
    }

    /// Whether subscriber `j` receives what publisher `i` sends.
    pub(crate) fn receives(&self, j: u32, i: u32) -> bool {
        self.wildcard || j % self.topics == i % self.topics
    }

    /// How many publishers subscriber `j` hears.
    pub(crate) fn publishers_heard_by(&self, j: u32) -> u32 {
        if self.wildcard {
            return self.publishers;
        }
        let t = j % self.topics;
        if t < self.publishers {
            (self.publishers - 1 - t) / self.topics + 1
        } else {
            0
        }
    }

    /// Messages subscriber `j` should receive.
    pub(crate) fn expected_by(&self, j: u32) -> u64 {
        u64::from(self.publishers_heard_by(j)) * u64::from(self.messages)
    }

    /// Messages all subscribers together should receive.
    pub(crate) fn expected_total(&self) -> u64 {
        (0..self.subscribers).map(|j| self.expected_by(j)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(p: u32, s: u32, t: u32, wildcard: bool) -> Plan {
        Plan {
            run_id: "r".into(),
            publishers: p,
            subscribers: s,
            topics: t,
            wildcard,
            messages: 10,
        }
    }

    fn brute_force(p: &Plan) -> u64 {
        let mut n = 0;
        for j in 0..p.subscribers {
            for i in 0..p.publishers {
                if p.receives(j, i) {
                    n += u64::from(p.messages);
                }
            }
        }
        n
    }

    #[test]
    fn scenario_shapes() {
        let fan_in = plan(20, 1, 20, true);
        assert_eq!(fan_in.subscriber_filter(0), "qosmos-bench/r/#");
        assert_eq!(fan_in.publisher_topic(7), "qosmos-bench/r/7");
        assert_eq!(fan_in.expected_total(), 200);
        let fan_out = plan(1, 100, 1, false);
        assert_eq!(fan_out.subscriber_filter(99), "qosmos-bench/r/0");
        assert_eq!(fan_out.expected_total(), 1000);
        let pairs = plan(100, 100, 100, false);
        assert_eq!(pairs.subscriber_filter(42), "qosmos-bench/r/42");
        assert!(pairs.receives(42, 42) && !pairs.receives(42, 43));
        assert_eq!(pairs.expected_total(), 1000);
    }

    #[test]
    fn expected_matches_brute_force() {
        for p in 1..7 {
            for s in 0..7 {
                for t in 1..9 {
                    for w in [false, true] {
                        let pl = plan(p, s, t, w);
                        assert_eq!(pl.expected_total(), brute_force(&pl), "{pl:?}");
                    }
                }
            }
        }
    }
}
