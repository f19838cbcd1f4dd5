//! The order as the contract defines it, and validation of what clients send.
//!
//! Validation is strict: unknown fields are rejected (a misspelt `"notes"` would
//! otherwise silently drop the customer's note), and every error names the field it is
//! about, e.g. `items[1].qty: must be a positive integer`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::id::OrderId;
use crate::time::Timestamp;

/// The longest `store_id`, in characters.
pub const MAX_STORE_ID_LEN: usize = 64;
/// The longest `sku`, in characters.
pub const MAX_SKU_LEN: usize = 128;
/// The longest `note`, in characters.
pub const MAX_NOTE_LEN: usize = 1000;

/// A store's id: 1 to 64 characters from `[A-Za-z0-9_-]`.
///
/// That alphabet keeps `orders/{store_id}` a valid MQTT topic name with no wildcard or
/// level separator in it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StoreId(String);

impl StoreId {
    /// Checks and wraps `s`.
    pub fn parse(s: &str) -> Result<Self, InvalidStoreId> {
        if Self::is_valid(s) {
            Ok(StoreId(s.to_owned()))
        } else {
            Err(InvalidStoreId)
        }
    }

    /// Whether `s` is a valid store id.
    pub fn is_valid(s: &str) -> bool {
        (1..=MAX_STORE_ID_LEN).contains(&s.len())
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for StoreId {
    type Error = InvalidStoreId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if Self::is_valid(&s) {
            Ok(StoreId(s))
        } else {
            Err(InvalidStoreId)
        }
    }
}

impl From<StoreId> for String {
    fn from(s: StoreId) -> String {
        s.0
    }
}

/// A string that is not a valid [`StoreId`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be 1 to 64 characters from [A-Za-z0-9_-]")]
pub struct InvalidStoreId;

/// Where an order is in its life.
///
/// `received` (stored) → `dispatched` (the broker has it: PUBCOMP) → `accepted` or
/// `rejected` (the store's ack). `accepted` and `rejected` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Durably stored, not yet confirmed by the broker.
    Received,
    /// The broker has it (PUBCOMP received).
    Dispatched,
    /// The store accepted it.
    Accepted,
    /// The store rejected it.
    Rejected,
}

impl Status {
    /// Every status, in lifecycle order.
    pub const ALL: [Status; 4] = [
        Status::Received,
        Status::Dispatched,
        Status::Accepted,
        Status::Rejected,
    ];

    /// The name used in JSON, in the database and in query strings.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Received => "received",
            Status::Dispatched => "dispatched",
            Status::Accepted => "accepted",
            Status::Rejected => "rejected",
        }
    }

    /// Whether no further transition is allowed.
    pub const fn is_final(self) -> bool {
        matches!(self, Status::Accepted | Status::Rejected)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or(UnknownStatus)
    }
}

/// A string that is not one of the four statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be one of received, dispatched, accepted, rejected")]
pub struct UnknownStatus;

/// The outcome a store reports in its ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckOutcome {
    /// The store will fulfil the order.
    Accepted,
    /// The store will not.
    Rejected,
}

impl From<AckOutcome> for Status {
    fn from(o: AckOutcome) -> Status {
        match o {
            AckOutcome::Accepted => Status::Accepted,
            AckOutcome::Rejected => Status::Rejected,
        }
    }
}

/// The ack payload a store agent publishes on `acks/{store_id}`:
/// `{"order_id", "status": "accepted"|"rejected", "reason"?}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The order acknowledged.
    pub order_id: OrderId,
    /// Accepted or rejected.
    pub status: AckOutcome,
    /// Why, usually only on a rejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One line of an order: a SKU and a positive quantity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The product code, 1 to 128 characters.
    pub sku: String,
    /// How many, at least 1.
    pub qty: u32,
}

/// A validated `POST /api/orders` body: `{"store_id", "items", "note"?}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NewOrder {
    /// Whose order it is.
    pub store_id: StoreId,
    /// At least one item.
    pub items: Vec<Item>,
    /// Free text for the store, up to 1000 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl NewOrder {
    /// Parses and validates a request body.
    ///
    /// `Err(InputError::Malformed)` when the bytes are not JSON (HTTP 400),
    /// `Err(InputError::Invalid)` when they are JSON but not a valid order (HTTP 422).
    /// `"note": null` counts as no note.
    pub fn from_json(body: &[u8]) -> Result<Self, InputError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| InputError::Malformed(e.to_string()))?;
        Self::from_value(value)
    }

    /// Validates an already parsed body. See [`NewOrder::from_json`].
    pub fn from_value(value: Value) -> Result<Self, InputError> {
        let Value::Object(mut obj) = value else {
            return Err(InputError::invalid("body", "must be a JSON object"));
        };
        let store_id = match obj.remove("store_id") {
            None | Some(Value::Null) => return Err(InputError::invalid("store_id", "is required")),
            Some(Value::String(s)) => {
                StoreId::try_from(s).map_err(|e| InputError::invalid("store_id", e.to_string()))?
            }
            Some(_) => return Err(InputError::invalid("store_id", "must be a string")),
        };
        let items = match obj.remove("items") {
            None | Some(Value::Null) => return Err(InputError::invalid("items", "is required")),
            Some(Value::Array(a)) if a.is_empty() => {
                return Err(InputError::invalid(
                    "items",
                    "must contain at least one item",
                ));
            }
            Some(Value::Array(a)) => a
                .into_iter()
                .enumerate()
                .map(|(i, v)| parse_item(i, v))
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(InputError::invalid("items", "must be an array")),
        };
        let note = match obj.remove("note") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.chars().count() > MAX_NOTE_LEN => {
                return Err(InputError::invalid(
                    "note",
                    format!("must be at most {MAX_NOTE_LEN} characters"),
                ));
            }
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err(InputError::invalid("note", "must be a string")),
        };
        reject_unknown("", &obj)?;
        Ok(NewOrder {
            store_id,
            items,
            note,
        })
    }

    /// A digest of the validated content (hex SHA-256 of its canonical JSON), used to
    /// tell an idempotent retry (same content) from a reused key (different content).
    /// Formatting differences in the original body do not change it.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&canonical);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn parse_item(i: usize, v: Value) -> Result<Item, InputError> {
    let Value::Object(mut obj) = v else {
        return Err(InputError::invalid(
            format!("items[{i}]"),
            "must be an object",
        ));
    };
    let sku = match obj.remove("sku") {
        None | Some(Value::Null) => {
            return Err(InputError::invalid(
                format!("items[{i}].sku"),
                "is required",
            ));
        }
        Some(Value::String(s)) if s.is_empty() => {
            return Err(InputError::invalid(
                format!("items[{i}].sku"),
                "must not be empty",
            ));
        }
        Some(Value::String(s)) if s.chars().count() > MAX_SKU_LEN => {
            return Err(InputError::invalid(
                format!("items[{i}].sku"),
                format!("must be at most {MAX_SKU_LEN} characters"),
            ));
        }
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(InputError::invalid(
                format!("items[{i}].sku"),
                "must be a string",
            ));
        }
    };
    let qty = match obj.remove("qty") {
        None | Some(Value::Null) => {
            return Err(InputError::invalid(
                format!("items[{i}].qty"),
                "is required",
            ));
        }
        Some(Value::Number(n)) => match n.as_u64() {
            Some(q) if q >= 1 => u32::try_from(q).map_err(|_| {
                InputError::invalid(
                    format!("items[{i}].qty"),
                    format!("must be at most {}", u32::MAX),
                )
            })?,
            _ => {
                return Err(InputError::invalid(
                    format!("items[{i}].qty"),
                    "must be a positive integer",
                ));
            }
        },
        Some(_) => {
            return Err(InputError::invalid(
                format!("items[{i}].qty"),
                "must be a positive integer",
            ));
        }
    };
    reject_unknown(&format!("items[{i}]."), &obj)?;
    Ok(Item { sku, qty })
}

fn reject_unknown(prefix: &str, rest: &Map<String, Value>) -> Result<(), InputError> {
    match rest.keys().next() {
        Some(k) => Err(InputError::invalid(format!("{prefix}{k}"), "unknown field")),
        None => Ok(()),
    }
}

/// Why a request body is not a valid order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// Not JSON at all (HTTP 400).
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// JSON, but a field is missing, of the wrong type or out of range (HTTP 422).
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as a path: `store_id`, `items[1].qty`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl InputError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        InputError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An order, exactly as published on `orders/{store_id}`:
/// `{"id", "store_id", "items": [{"sku", "qty"}], "note"?, "created_at"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Time-ordered unique id.
    pub id: OrderId,
    /// The store it is for.
    pub store_id: StoreId,
    /// At least one item.
    pub items: Vec<Item>,
    /// Free text for the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// When it was stored.
    pub created_at: Timestamp,
}

impl Order {
    /// The MQTT payload: the order JSON.
    pub fn to_payload(&self) -> Vec<u8> {
        // Serialising plain strings, integers and a timestamp cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The topic the order is published on: `orders/{store_id}`.
    pub fn topic(&self) -> String {
        format!("orders/{}", self.store_id)
    }
}

/// An order and its current status: what `POST /api/orders` and the list return.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrderSummary {
    /// The order JSON.
    #[serde(flatten)]
    pub order: Order,
    /// Where it is now.
    pub status: Status,
}

/// One status change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// The status entered.
    pub status: Status,
    /// When, with microseconds; strictly increasing within an order.
    pub at: Timestamp,
    /// The store's reason, on an ack that gave one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An order with everything known about it: what `GET /api/orders/{id}` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrderDetail {
    /// The order JSON.
    #[serde(flatten)]
    pub order: Order,
    /// Where it is now.
    pub status: Status,
    /// When the status last changed.
    pub updated_at: Timestamp,
    /// How many times the broker confirmed it (PUBCOMP), redispatches included.
    pub dispatch_attempts: u32,
    /// The last such confirmation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_dispatched_at: Option<Timestamp>,
    /// Every status change, oldest first.
    pub history: Vec<HistoryEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        match NewOrder::from_json(body.as_bytes()) {
            Ok(o) => panic!("accepted {body}: {o:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn accepts_a_valid_order() {
        let o = NewOrder::from_json(
            br#"{"store_id":"s-1_A","items":[{"sku":"tea","qty":2}],"note":null}"#,
        );
        let o = o.expect("valid");
        assert_eq!(o.store_id.as_str(), "s-1_A");
        assert_eq!(
            o.items,
            vec![Item {
                sku: "tea".into(),
                qty: 2
            }]
        );
        assert_eq!(o.note, None);
    }

    #[test]
    fn names_the_field() {
        assert!(err("{").starts_with("malformed JSON"));
        assert_eq!(err("[]"), "body: must be a JSON object");
        assert_eq!(
            err(r#"{"items":[{"sku":"a","qty":1}]}"#),
            "store_id: is required"
        );
        assert_eq!(
            err(r#"{"store_id":"a/b","items":[{"sku":"a","qty":1}]}"#),
            "store_id: must be 1 to 64 characters from [A-Za-z0-9_-]"
        );
        assert_eq!(
            err(r#"{"store_id":"a","items":[]}"#),
            "items: must contain at least one item"
        );
        assert_eq!(
            err(r#"{"store_id":"a","items":[{"sku":"a","qty":1},{"sku":"b","qty":0}]}"#),
            "items[1].qty: must be a positive integer"
        );
        assert_eq!(
            err(r#"{"store_id":"a","items":[{"sku":"a","qty":1.5}]}"#),
            "items[0].qty: must be a positive integer"
        );
        assert_eq!(
            err(r#"{"store_id":"a","items":[{"sku":"","qty":1}]}"#),
            "items[0].sku: must not be empty"
        );
        assert_eq!(
            err(r#"{"store_id":"a","items":[{"sku":"a","qty":1,"price":3}]}"#),
            "items[0].price: unknown field"
        );
        assert_eq!(
            err(r#"{"store_id":"a","items":[{"sku":"a","qty":1}],"notes":"x"}"#),
            "notes: unknown field"
        );
        let long = "x".repeat(MAX_NOTE_LEN + 1);
        assert_eq!(
            err(&format!(
                r#"{{"store_id":"a","items":[{{"sku":"a","qty":1}}],"note":"{long}"}}"#
            )),
            "note: must be at most 1000 characters"
        );
    }

    #[test]
    fn fingerprint_ignores_formatting_but_not_content() {
        let a = NewOrder::from_json(br#"{"store_id":"a","items":[{"sku":"a","qty":1}]}"#);
        let b = NewOrder::from_json(br#"{ "items" : [ {"qty":1, "sku":"a"} ], "store_id":"a" }"#);
        let c = NewOrder::from_json(br#"{"store_id":"a","items":[{"sku":"a","qty":2}]}"#);
        let (a, b, c) = (a.expect("a"), b.expect("b"), c.expect("c"));
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn order_json_has_the_contract_shape() {
        let o = Order {
            id: OrderId::from_string("01ARYZ6S41TSV4RRFFQ69G5FAV".into()),
            store_id: StoreId::parse("s1").expect("valid"),
            items: vec![Item {
                sku: "tea".into(),
                qty: 1,
            }],
            note: None,
            created_at: Timestamp::from_micros(1_795_798_623_123_456),
        };
        let v: Value = serde_json::from_slice(&o.to_payload()).expect("json");
        assert_eq!(
            v,
            serde_json::json!({
                "id": "01ARYZ6S41TSV4RRFFQ69G5FAV",
                "store_id": "s1",
                "items": [{"sku": "tea", "qty": 1}],
                "created_at": "2026-11-27T16:57:03.123456Z"
            })
        );
        let back: Order = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, o);
        assert_eq!(o.topic(), "orders/s1");
    }
}
