//! Topic names and filters (MQTT 3.1.1 and 5.0, section 4.7; shared subscriptions, 5.0
//! section 4.8.2).
//!
//! A *topic name* is what a PUBLISH is sent to; it has no wildcards. A *topic filter* is what
//! a SUBSCRIBE asks for; it may use `+` (exactly one level) and `#` (the parent level and any
//! number of children, last level only). Both are split into levels on `/`, and an empty level
//! is a real level: `a//b` has three levels and `/a` has two.
//!
//! Validation and matching are pure functions over `&str`. The functions here assume the
//! string already passed the UTF-8 checks of the codec; they add the topic rules on top.
//!
//! ```
//! use qosmos_mqtt::topic::{matches, validate_topic_filter, validate_topic_name};
//!
//! validate_topic_name("sport/tennis/player1")?;
//! validate_topic_filter("sport/tennis/+")?;
//! assert!(matches("sport/tennis/+", "sport/tennis/player1"));
//! assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
//! # Ok::<(), qosmos_mqtt::topic::TopicError>(())
//! ```

/// The longest topic name or filter, in bytes: both are UTF-8 strings with a two-byte length.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// The prefix that marks an MQTT 5 shared subscription: `$share/{ShareName}/{filter}`.
pub const SHARE_PREFIX: &str = "$share/";

/// Why a topic name or topic filter was rejected.
///
/// The reason code it is sent as depends on where the string came from (a PUBLISH topic name
/// is answered with `Topic Name invalid`, a SUBSCRIBE filter with `Topic Filter invalid`), so
/// the caller that knows the packet does that mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The string is empty; topic names and filters are at least one character long
    /// [MQTT-4.7.3-1].
    #[error("topic is empty")]
    Empty,
    /// The string is longer than [`MAX_TOPIC_LEN`] bytes [MQTT-4.7.3-3].
    #[error("topic is {len} bytes long, more than 65535")]
    TooLong {
        /// The length that was seen, in bytes.
        len: usize,
    },
    /// The string contains U+0000 [MQTT-4.7.3-2].
    #[error("topic contains the null character U+0000")]
    NullCharacter,
    /// A topic name contains `+` or `#` [MQTT-3.3.2-2].
    #[error("topic name contains a wildcard character")]
    WildcardInName,
    /// `#` is not a whole level, or not the last level [MQTT-4.7.1-1].
    #[error("'#' must be the whole last level of a topic filter")]
    MisplacedMultiLevelWildcard,
    /// `+` is not a whole level [MQTT-4.7.1-2].
    #[error("'+' must occupy a whole level of a topic filter")]
    MisplacedSingleLevelWildcard,
    /// A `$share/` filter has an empty ShareName, or one containing `+` or `#`
    /// [MQTT-4.8.2-1], [MQTT-4.8.2-2].
    #[error("shared subscription has an empty or invalid share name")]
    InvalidShareName,
    /// A `$share/{ShareName}` filter is not followed by `/` and a non-empty topic filter
    /// [MQTT-4.8.2-2].
    #[error("shared subscription has no topic filter after the share name")]
    EmptySharedFilter,
}

/// The rules topic names and filters share: length and U+0000.
fn validate_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong { len: s.len() });
    }
    if s.as_bytes().contains(&0) {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

/// Checks a topic name, as sent in PUBLISH or a will: non-empty, at most 65535 bytes, no
/// U+0000 and no wildcard characters.
///
/// A PUBLISH in MQTT 5 may carry an empty topic name together with a Topic Alias; resolving the
/// alias is the caller's job, and the resolved name is what should be checked here.
///
/// ```
/// use qosmos_mqtt::topic::{validate_topic_name, TopicError};
///
/// assert_eq!(validate_topic_name("$SYS/broker/load"), Ok(()));
/// assert_eq!(validate_topic_name("a/+"), Err(TopicError::WildcardInName));
/// assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
/// ```
pub fn validate_topic_name(s: &str) -> Result<(), TopicError> {
    validate_common(s)?;
    if s.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter, as sent in SUBSCRIBE or UNSUBSCRIBE.
///
/// Besides the common rules, `#` must be the whole last level and `+` a whole level. A filter
/// that starts with `$share/` must be `$share/{ShareName}/{filter}` with a non-empty ShareName
/// free of `/`, `+` and `#`, and a non-empty, valid inner filter. (`$share` on its own, with no
/// slash, is an ordinary filter.)
///
/// ```
/// use qosmos_mqtt::topic::{validate_topic_filter, TopicError};
///
/// assert_eq!(validate_topic_filter("sport/+/player1/#"), Ok(()));
/// assert_eq!(validate_topic_filter("$share/workers/jobs/+"), Ok(()));
/// assert_eq!(validate_topic_filter("sport+"), Err(TopicError::MisplacedSingleLevelWildcard));
/// assert_eq!(validate_topic_filter("sport/#/x"), Err(TopicError::MisplacedMultiLevelWildcard));
/// assert_eq!(validate_topic_filter("$share/g"), Err(TopicError::EmptySharedFilter));
/// ```
pub fn validate_topic_filter(s: &str) -> Result<(), TopicError> {
    validate_common(s)?;
    match s.strip_prefix(SHARE_PREFIX) {
        Some(rest) => {
            let (group, inner) = rest.split_once('/').unwrap_or((rest, ""));
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(TopicError::InvalidShareName);
            }
            if inner.is_empty() {
                return Err(TopicError::EmptySharedFilter);
            }
            validate_filter_levels(inner)
        }
        None => validate_filter_levels(s),
    }
}

/// The wildcard placement rules, for a filter without its `$share/{group}/` prefix.
fn validate_filter_levels(s: &str) -> Result<(), TopicError> {
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return Err(TopicError::MisplacedMultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedSingleLevelWildcard);
        }
    }
    Ok(())
}

/// Whether `filter` matches `topic`, by the rules of section 4.7.
///
/// - `+` matches exactly one level, which may be empty: `sport/+` matches `sport/` but not
///   `sport`.
/// - `#` matches the parent level and any number of children: `sport/#` matches `sport`,
///   `sport/` and `sport/tennis/player1`.
/// - A topic that starts with `$` is not matched by a filter whose first level is `+` or `#`
///   [MQTT-4.7.2-1]; `$SYS/#` still matches `$SYS/uptime`.
///
/// Both arguments are assumed valid ([`validate_topic_filter`], [`validate_topic_name`]); for
/// other strings the result is unspecified but the function does not panic. A `$share/`
/// filter is not special here: match against [`SharedFilter::filter`] instead.
///
/// This compares one filter; to match a topic against many filters, use
/// [`SubscriptionIndex`](crate::index::SubscriptionIndex).
///
/// ```
/// use qosmos_mqtt::topic::matches;
///
/// assert!(matches("sport/#", "sport"));
/// assert!(matches("+/+", "/finance"));
/// assert!(!matches("+", "/finance"));
/// assert!(!matches("#", "$SYS/uptime"));
/// assert!(matches("$SYS/#", "$SYS/uptime"));
/// ```
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a topic filter contains a wildcard level (`+` or `#`).
///
/// For a valid filter this is the same as containing the characters, since a share name may
/// not contain them either.
///
/// ```
/// use qosmos_mqtt::topic::is_wildcard;
///
/// assert!(is_wildcard("orders/+"));
/// assert!(!is_wildcard("orders/store-1"));
/// ```
pub fn is_wildcard(filter: &str) -> bool {
    filter.bytes().any(|b| b == b'+' || b == b'#')
}

/// The parts of a shared subscription filter, `$share/{group}/{filter}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SharedFilter<'a> {
    /// The ShareName: subscribers with the same group and filter share the messages.
    pub group: &'a str,
    /// The topic filter that is matched against topics, without the `$share/{group}/` prefix.
    pub filter: &'a str,
}

/// Splits a shared subscription filter into its group and topic filter.
///
/// Returns `None` when `filter` does not start with `$share/` (an ordinary filter) or has no
/// `/` after the group. It assumes a filter that passed [`validate_topic_filter`]; it does not
/// check the group or the inner filter again.
///
/// ```
/// use qosmos_mqtt::topic::{parse_shared, SharedFilter};
///
/// assert_eq!(
///     parse_shared("$share/qosmos/acks/+"),
///     Some(SharedFilter { group: "qosmos", filter: "acks/+" }),
/// );
/// assert_eq!(parse_shared("acks/+"), None);
/// ```
pub fn parse_shared(filter: &str) -> Option<SharedFilter<'_>> {
    let rest = filter.strip_prefix(SHARE_PREFIX)?;
    let (group, filter) = rest.split_once('/')?;
    Some(SharedFilter { group, filter })
}
