//! A received message, and its acknowledgement.

use bytes::Bytes;
use qosmos_mqtt::{PacketId, Properties, QoS};
use std::sync::Arc;
use tokio::sync::mpsc;

/// An acknowledgement travelling from the application back to the connection task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckRequest {
    pub(crate) packet_id: PacketId,
    /// The session the message belongs to: an acknowledgement for a lost session is dropped,
    /// so it cannot acknowledge a newer message that reuses the identifier.
    pub(crate) epoch: u64,
}

/// Sends the acknowledgement when the last holder lets go.
#[derive(Debug)]
struct AckGuard {
    request: AckRequest,
    // Unbounded on purpose: a send happens in `Drop`, which cannot wait, and there is at most
    // one per unacknowledged QoS 1 / 2 message, whose number Receive Maximum bounds.
    tx: mpsc::UnboundedSender<AckRequest>,
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        // The task may be gone (shut down): then there is no one to acknowledge to.
        let _ = self.tx.send(self.request);
    }
}

/// A message received from the broker.
///
/// A QoS 1 or 2 message is acknowledged to the broker (PUBACK / PUBREC) once every clone of it
/// and of its [`AckHandle`] has been dropped: a handler acknowledges by returning. To
/// acknowledge later, keep an [`AckHandle`] (from [`Message::ack_handle`]) and drop it, or call
/// [`AckHandle::ack`], when done.
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic it was published to.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// The QoS it was delivered at (the lower of the publisher's and the subscription's).
    pub qos: QoS,
    /// The retain flag.
    pub retain: bool,
    /// PUBLISH properties (5.0).
    pub properties: Properties,
    ack: Option<Arc<AckGuard>>,
}

impl Message {
    pub(crate) fn new(
        publish: qosmos_mqtt::Publish,
        ack: Option<(AckRequest, mpsc::UnboundedSender<AckRequest>)>,
    ) -> Message {
        Message {
            topic: publish.topic.as_str().to_owned(),
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: publish.properties,
            ack: ack.map(|(request, tx)| Arc::new(AckGuard { request, tx })),
        }
    }

    /// The payload as UTF-8 text, if it is.
    pub fn payload_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// A handle that delays the acknowledgement until it is dropped (or [`AckHandle::ack`]ed);
    /// `None` for QoS 0, which has none.
    pub fn ack_handle(&self) -> Option<AckHandle> {
        self.ack.clone().map(AckHandle)
    }
}

/// Holds back the acknowledgement of a received QoS 1 or 2 message until dropped.
#[derive(Debug, Clone)]
pub struct AckHandle(Arc<AckGuard>);

impl AckHandle {
    /// The packet identifier the broker gave the message.
    pub fn packet_id(&self) -> u16 {
        self.0.request.packet_id.get()
    }

    /// Lets go of the acknowledgement; it is sent when no other clone of the message or of
    /// this handle is left.
    pub fn ack(self) {
        drop(self);
    }
}
