//! The errors of the client: one enum for the operations, one for the options.

use qosmos_mqtt::{QoS, ReasonCode};

/// Why a client operation failed.
///
/// Every failure reaches the caller: a message that cannot be queued, a refusal by the broker,
/// a client that was shut down. Nothing is dropped silently.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The broker could not be reached at start-up and [`crate::ClientOptions::fail_fast`] was
    /// set (or a connection attempt failed in a way reported to the caller).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The `host:port` tried.
        addr: String,
        /// What went wrong (I/O error, timeout).
        reason: String,
    },
    /// The broker answered CONNECT with a failure reason code.
    #[error("the broker refused the connection: {0}")]
    ConnectRefused(ReasonCode),
    /// The broker refused a PUBLISH (PUBACK or PUBREC with a reason code of 0x80 or more).
    #[error("the broker refused the message: {0}")]
    PublishRefused(ReasonCode),
    /// The broker refused a subscription (SUBACK reason code of 0x80 or more).
    #[error("the broker refused the subscription to {filter:?}: {reason}")]
    SubscribeRefused {
        /// The topic filter.
        filter: String,
        /// The SUBACK reason code.
        reason: ReasonCode,
    },
    /// The broker refused to remove a subscription (UNSUBACK, 5.0).
    #[error("the broker refused to unsubscribe {filter:?}: {reason}")]
    UnsubscribeRefused {
        /// The topic filter.
        filter: String,
        /// The UNSUBACK reason code.
        reason: ReasonCode,
    },
    /// The offline queue (messages waiting for a connection or for room in the inflight
    /// window) is full: the message was not taken.
    #[error("the outgoing queue is full ({limit}); the message was not queued")]
    QueueFull {
        /// The bound that was hit, in words.
        limit: String,
    },
    /// A topic name or filter is not valid.
    #[error("invalid topic {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic name or filter.
        topic: String,
        /// Why.
        reason: String,
    },
    /// The broker accepts messages up to a lower QoS (5.0 Maximum QoS): the message was not
    /// sent rather than sent at a lower QoS.
    #[error("the broker accepts QoS {maximum} at most, the message asks for QoS {requested}")]
    QosNotSupported {
        /// The message's QoS.
        requested: QoS,
        /// The broker's Maximum QoS.
        maximum: QoS,
    },
    /// A QoS 0 message was not written because the connection ended first.
    #[error("the connection ended before the QoS 0 message was written")]
    NotSent,
    /// The request was withdrawn before the broker answered it (a subscribe made offline and
    /// unsubscribed before it could be sent).
    #[error("cancelled before the broker answered")]
    Cancelled,
    /// The durable outbox could not be read or written: the message was not accepted.
    #[error("durable outbox: {0}")]
    Outbox(String),
    /// The client was shut down (or its task ended): the operation cannot complete. With a
    /// durable outbox, a QoS 1 / 2 message that fails with this is still in the outbox and is
    /// sent by the next client started on it.
    #[error("the client is shut down")]
    Closed,
    /// The message cannot be encoded (too large for the broker's Maximum Packet Size, …).
    #[error("cannot encode the packet: {0}")]
    Encode(String),
    /// The broker granted less QoS than requested and the caller asked for an error in that case.
    #[error("the broker granted QoS {granted} for {filter:?}, QoS {requested} was requested")]
    Downgraded {
        /// The topic filter.
        filter: String,
        /// The QoS asked for.
        requested: QoS,
        /// The QoS granted.
        granted: QoS,
    },
}

/// A bad value in [`crate::ClientOptions`] or in a broker URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// The URL is not `mqtt://[user[:password]@]host[:port]`.
    #[error("invalid broker URL {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration key has a bad value.
    #[error("invalid value {value:?} for {key}: {reason}")]
    Value {
        /// The key (an environment variable name for [`crate::ClientOptions`] built from one).
        key: String,
        /// The value found.
        value: String,
        /// What was expected.
        reason: String,
    },
}
