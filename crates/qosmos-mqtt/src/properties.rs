//! MQTT 5.0 properties (section 2.2.2).
//!
//! Properties are kept as a small list in wire order: a packet without properties costs no
//! allocation, and a property this crate does not model cannot appear (an unknown identifier is
//! a malformed packet). Typed accessors read and write the list.

use crate::string::MqttStr;
use bytes::Bytes;

/// A property identifier (the wire byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum PropertyId {
    /// Payload Format Indicator (0x01).
    PayloadFormatIndicator = 0x01,
    /// Message Expiry Interval (0x02).
    MessageExpiryInterval = 0x02,
    /// Content Type (0x03).
    ContentType = 0x03,
    /// Response Topic (0x08).
    ResponseTopic = 0x08,
    /// Correlation Data (0x09).
    CorrelationData = 0x09,
    /// Subscription Identifier (0x0B).
    SubscriptionIdentifier = 0x0B,
    /// Session Expiry Interval (0x11).
    SessionExpiryInterval = 0x11,
    /// Assigned Client Identifier (0x12).
    AssignedClientIdentifier = 0x12,
    /// Server Keep Alive (0x13).
    ServerKeepAlive = 0x13,
    /// Authentication Method (0x15).
    AuthenticationMethod = 0x15,
    /// Authentication Data (0x16).
    AuthenticationData = 0x16,
    /// Request Problem Information (0x17).
    RequestProblemInformation = 0x17,
    /// Will Delay Interval (0x18).
    WillDelayInterval = 0x18,
    /// Request Response Information (0x19).
    RequestResponseInformation = 0x19,
    /// Response Information (0x1A).
    ResponseInformation = 0x1A,
    /// Server Reference (0x1C).
    ServerReference = 0x1C,
    /// Reason String (0x1F).
    ReasonString = 0x1F,
    /// Receive Maximum (0x21).
    ReceiveMaximum = 0x21,
    /// Topic Alias Maximum (0x22).
    TopicAliasMaximum = 0x22,
    /// Topic Alias (0x23).
    TopicAlias = 0x23,
    /// Maximum QoS (0x24).
    MaximumQoS = 0x24,
    /// Retain Available (0x25).
    RetainAvailable = 0x25,
    /// User Property (0x26).
    UserProperty = 0x26,
    /// Maximum Packet Size (0x27).
    MaximumPacketSize = 0x27,
    /// Wildcard Subscription Available (0x28).
    WildcardSubscriptionAvailable = 0x28,
    /// Subscription Identifier Available (0x29).
    SubscriptionIdentifierAvailable = 0x29,
    /// Shared Subscription Available (0x2A).
    SharedSubscriptionAvailable = 0x2A,
}

/// Where a property list appears: each packet type, and the will properties in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PropertyContext {
    /// CONNECT.
    Connect,
    /// The will properties inside CONNECT.
    Will,
    /// CONNACK.
    ConnAck,
    /// PUBLISH.
    Publish,
    /// PUBACK, PUBREC, PUBREL and PUBCOMP.
    PubResponse,
    /// SUBSCRIBE.
    Subscribe,
    /// SUBACK.
    SubAck,
    /// UNSUBSCRIBE.
    Unsubscribe,
    /// UNSUBACK.
    UnsubAck,
    /// DISCONNECT.
    Disconnect,
    /// AUTH.
    Auth,
}

impl PropertyId {
    /// The identifier for a wire byte, `None` for an unknown one.
    pub const fn from_u8(v: u8) -> Option<PropertyId> {
        use PropertyId::*;
        Some(match v {
            0x01 => PayloadFormatIndicator,
            0x02 => MessageExpiryInterval,
            0x03 => ContentType,
            0x08 => ResponseTopic,
            0x09 => CorrelationData,
            0x0B => SubscriptionIdentifier,
            0x11 => SessionExpiryInterval,
            0x12 => AssignedClientIdentifier,
            0x13 => ServerKeepAlive,
            0x15 => AuthenticationMethod,
            0x16 => AuthenticationData,
            0x17 => RequestProblemInformation,
            0x18 => WillDelayInterval,
            0x19 => RequestResponseInformation,
            0x1A => ResponseInformation,
            0x1C => ServerReference,
            0x1F => ReasonString,
            0x21 => ReceiveMaximum,
            0x22 => TopicAliasMaximum,
            0x23 => TopicAlias,
            0x24 => MaximumQoS,
            0x25 => RetainAvailable,
            0x26 => UserProperty,
            0x27 => MaximumPacketSize,
            0x28 => WildcardSubscriptionAvailable,
            0x29 => SubscriptionIdentifierAvailable,
            0x2A => SharedSubscriptionAvailable,
            _ => return None,
        })
    }

    /// Whether this property may appear in `ctx` (MQTT 5.0 table 2-4).
    pub const fn allowed_in(self, ctx: PropertyContext) -> bool {
        use PropertyContext as C;
        use PropertyId::*;
        match self {
            PayloadFormatIndicator
            | MessageExpiryInterval
            | ContentType
            | ResponseTopic
            | CorrelationData => matches!(ctx, C::Publish | C::Will),
            SubscriptionIdentifier => matches!(ctx, C::Publish | C::Subscribe),
            SessionExpiryInterval => matches!(ctx, C::Connect | C::ConnAck | C::Disconnect),
            AssignedClientIdentifier
            | ServerKeepAlive
            | ResponseInformation
            | MaximumQoS
            | RetainAvailable
            | WildcardSubscriptionAvailable
            | SubscriptionIdentifierAvailable
            | SharedSubscriptionAvailable => {
                matches!(ctx, C::ConnAck)
            }
            AuthenticationMethod | AuthenticationData => {
                matches!(ctx, C::Connect | C::ConnAck | C::Auth)
            }
            RequestProblemInformation | RequestResponseInformation => matches!(ctx, C::Connect),
            WillDelayInterval => matches!(ctx, C::Will),
            ServerReference => matches!(ctx, C::ConnAck | C::Disconnect),
            ReasonString => !matches!(
                ctx,
                C::Connect | C::Will | C::Publish | C::Subscribe | C::Unsubscribe
            ),
            ReceiveMaximum | TopicAliasMaximum | MaximumPacketSize => {
                matches!(ctx, C::Connect | C::ConnAck)
            }
            TopicAlias => matches!(ctx, C::Publish),
            UserProperty => true,
        }
    }

    /// Whether the property may appear more than once in one list. User Property always may;
    /// Subscription Identifier may in PUBLISH (one per matching subscription) but not in
    /// SUBSCRIBE.
    pub const fn repeatable_in(self, ctx: PropertyContext) -> bool {
        match self {
            PropertyId::UserProperty => true,
            PropertyId::SubscriptionIdentifier => matches!(ctx, PropertyContext::Publish),
            _ => false,
        }
    }
}

/// One property with its value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[allow(missing_docs)] // each variant is the property of the same name in the specification
pub enum Property {
    PayloadFormatIndicator(u8),
    MessageExpiryInterval(u32),
    ContentType(MqttStr),
    ResponseTopic(MqttStr),
    CorrelationData(Bytes),
    SubscriptionIdentifier(u32),
    SessionExpiryInterval(u32),
    AssignedClientIdentifier(MqttStr),
    ServerKeepAlive(u16),
    AuthenticationMethod(MqttStr),
    AuthenticationData(Bytes),
    RequestProblemInformation(u8),
    WillDelayInterval(u32),
    RequestResponseInformation(u8),
    ResponseInformation(MqttStr),
    ServerReference(MqttStr),
    ReasonString(MqttStr),
    ReceiveMaximum(u16),
    TopicAliasMaximum(u16),
    TopicAlias(u16),
    MaximumQoS(u8),
    RetainAvailable(u8),
    UserProperty(MqttStr, MqttStr),
    MaximumPacketSize(u32),
    WildcardSubscriptionAvailable(u8),
    SubscriptionIdentifierAvailable(u8),
    SharedSubscriptionAvailable(u8),
}

impl Property {
    /// The property's identifier.
    pub const fn id(&self) -> PropertyId {
        use Property as P;
        use PropertyId as I;
        match self {
            P::PayloadFormatIndicator(_) => I::PayloadFormatIndicator,
            P::MessageExpiryInterval(_) => I::MessageExpiryInterval,
            P::ContentType(_) => I::ContentType,
            P::ResponseTopic(_) => I::ResponseTopic,
            P::CorrelationData(_) => I::CorrelationData,
            P::SubscriptionIdentifier(_) => I::SubscriptionIdentifier,
            P::SessionExpiryInterval(_) => I::SessionExpiryInterval,
            P::AssignedClientIdentifier(_) => I::AssignedClientIdentifier,
            P::ServerKeepAlive(_) => I::ServerKeepAlive,
            P::AuthenticationMethod(_) => I::AuthenticationMethod,
            P::AuthenticationData(_) => I::AuthenticationData,
            P::RequestProblemInformation(_) => I::RequestProblemInformation,
            P::WillDelayInterval(_) => I::WillDelayInterval,
            P::RequestResponseInformation(_) => I::RequestResponseInformation,
            P::ResponseInformation(_) => I::ResponseInformation,
            P::ServerReference(_) => I::ServerReference,
            P::ReasonString(_) => I::ReasonString,
            P::ReceiveMaximum(_) => I::ReceiveMaximum,
            P::TopicAliasMaximum(_) => I::TopicAliasMaximum,
            P::TopicAlias(_) => I::TopicAlias,
            P::MaximumQoS(_) => I::MaximumQoS,
            P::RetainAvailable(_) => I::RetainAvailable,
            P::UserProperty(..) => I::UserProperty,
            P::MaximumPacketSize(_) => I::MaximumPacketSize,
            P::WildcardSubscriptionAvailable(_) => I::WildcardSubscriptionAvailable,
            P::SubscriptionIdentifierAvailable(_) => I::SubscriptionIdentifierAvailable,
            P::SharedSubscriptionAvailable(_) => I::SharedSubscriptionAvailable,
        }
    }
}

/// The property list of one packet (or of a will), in wire order.
///
/// ```
/// use qosmos_mqtt::Properties;
/// let mut p = Properties::new();
/// p.set_content_type("application/json");
/// p.add_user_property("tenant", "eu-1");
/// assert_eq!(p.content_type().map(|s| s.as_str()), Some("application/json"));
/// assert_eq!(p.user_properties().count(), 1);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties(Vec<Property>);

macro_rules! scalar {
    ($get:ident, $set:ident, $var:ident, $ty:ty) => {
        #[doc = concat!("The `", stringify!($var), "` property, if present.")]
        pub fn $get(&self) -> Option<$ty> {
            self.0.iter().find_map(|p| match p {
                Property::$var(v) => Some(*v),
                _ => None,
            })
        }
        #[doc = concat!("Sets (replaces) the `", stringify!($var), "` property.")]
        pub fn $set(&mut self, v: $ty) {
            self.set(Property::$var(v));
        }
    };
}

macro_rules! string {
    ($get:ident, $set:ident, $var:ident) => {
        #[doc = concat!("The `", stringify!($var), "` property, if present.")]
        pub fn $get(&self) -> Option<&MqttStr> {
            self.0.iter().find_map(|p| match p {
                Property::$var(v) => Some(v),
                _ => None,
            })
        }
        #[doc = concat!("Sets (replaces) the `", stringify!($var), "` property.")]
        pub fn $set(&mut self, v: impl Into<MqttStr>) {
            self.set(Property::$var(v.into()));
        }
    };
}

macro_rules! binary {
    ($get:ident, $set:ident, $var:ident) => {
        #[doc = concat!("The `", stringify!($var), "` property, if present.")]
        pub fn $get(&self) -> Option<&Bytes> {
            self.0.iter().find_map(|p| match p {
                Property::$var(v) => Some(v),
                _ => None,
            })
        }
        #[doc = concat!("Sets (replaces) the `", stringify!($var), "` property.")]
        pub fn $set(&mut self, v: impl Into<Bytes>) {
            self.set(Property::$var(v.into()));
        }
    };
}

impl Properties {
    /// An empty list.
    pub const fn new() -> Properties {
        Properties(Vec::new())
    }

    /// True when there are no properties.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The properties in wire order.
    pub fn iter(&self) -> std::slice::Iter<'_, Property> {
        self.0.iter()
    }

    /// Appends a property as it is, even one already present (the decoder checks repeats).
    pub fn push(&mut self, p: Property) {
        self.0.push(p);
    }

    /// Replaces every property with `p`'s identifier by `p`.
    pub fn set(&mut self, p: Property) {
        let id = p.id();
        self.0.retain(|q| q.id() != id);
        self.0.push(p);
    }

    /// Removes every property with this identifier.
    pub fn remove(&mut self, id: PropertyId) {
        self.0.retain(|q| q.id() != id);
    }

    /// Keeps only the properties for which `f` is true.
    pub fn retain(&mut self, f: impl FnMut(&Property) -> bool) {
        self.0.retain(f);
    }

    /// Whether a property with this identifier is present.
    pub fn contains(&self, id: PropertyId) -> bool {
        self.0.iter().any(|p| p.id() == id)
    }

    scalar!(
        payload_format_indicator,
        set_payload_format_indicator,
        PayloadFormatIndicator,
        u8
    );
    scalar!(
        message_expiry_interval,
        set_message_expiry_interval,
        MessageExpiryInterval,
        u32
    );
    scalar!(
        session_expiry_interval,
        set_session_expiry_interval,
        SessionExpiryInterval,
        u32
    );
    scalar!(
        server_keep_alive,
        set_server_keep_alive,
        ServerKeepAlive,
        u16
    );
    scalar!(
        request_problem_information,
        set_request_problem_information,
        RequestProblemInformation,
        u8
    );
    scalar!(
        will_delay_interval,
        set_will_delay_interval,
        WillDelayInterval,
        u32
    );
    scalar!(
        request_response_information,
        set_request_response_information,
        RequestResponseInformation,
        u8
    );
    scalar!(receive_maximum, set_receive_maximum, ReceiveMaximum, u16);
    scalar!(
        topic_alias_maximum,
        set_topic_alias_maximum,
        TopicAliasMaximum,
        u16
    );
    scalar!(topic_alias, set_topic_alias, TopicAlias, u16);
    scalar!(maximum_qos, set_maximum_qos, MaximumQoS, u8);
    scalar!(retain_available, set_retain_available, RetainAvailable, u8);
    scalar!(
        maximum_packet_size,
        set_maximum_packet_size,
        MaximumPacketSize,
        u32
    );
    scalar!(
        wildcard_subscription_available,
        set_wildcard_subscription_available,
        WildcardSubscriptionAvailable,
        u8
    );
    scalar!(
        subscription_identifier_available,
        set_subscription_identifier_available,
        SubscriptionIdentifierAvailable,
        u8
    );
    scalar!(
        shared_subscription_available,
        set_shared_subscription_available,
        SharedSubscriptionAvailable,
        u8
    );
    string!(content_type, set_content_type, ContentType);
    string!(response_topic, set_response_topic, ResponseTopic);
    string!(
        assigned_client_identifier,
        set_assigned_client_identifier,
        AssignedClientIdentifier
    );
    string!(
        authentication_method,
        set_authentication_method,
        AuthenticationMethod
    );
    string!(
        response_information,
        set_response_information,
        ResponseInformation
    );
    string!(server_reference, set_server_reference, ServerReference);
    string!(reason_string, set_reason_string, ReasonString);
    binary!(correlation_data, set_correlation_data, CorrelationData);
    binary!(
        authentication_data,
        set_authentication_data,
        AuthenticationData
    );

    /// Every Subscription Identifier, in order (PUBLISH may carry several).
    pub fn subscription_identifiers(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().filter_map(|p| match p {
            Property::SubscriptionIdentifier(v) => Some(*v),
            _ => None,
        })
    }

    /// Appends a Subscription Identifier.
    pub fn add_subscription_identifier(&mut self, id: u32) {
        self.0.push(Property::SubscriptionIdentifier(id));
    }

    /// Every User Property as a (name, value) pair, in order.
    pub fn user_properties(&self) -> impl Iterator<Item = (&MqttStr, &MqttStr)> + '_ {
        self.0.iter().filter_map(|p| match p {
            Property::UserProperty(k, v) => Some((k, v)),
            _ => None,
        })
    }

    /// Appends a User Property (names may repeat, order is kept).
    pub fn add_user_property(&mut self, name: impl Into<MqttStr>, value: impl Into<MqttStr>) {
        self.0
            .push(Property::UserProperty(name.into(), value.into()));
    }
}

impl FromIterator<Property> for Properties {
    fn from_iter<T: IntoIterator<Item = Property>>(iter: T) -> Self {
        Properties(iter.into_iter().collect())
    }
}

impl<'a> IntoIterator for &'a Properties {
    type Item = &'a Property;
    type IntoIter = std::slice::Iter<'a, Property>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}
