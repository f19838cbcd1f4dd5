//! A UTF-8 string that shares the packet's buffer.

use bytes::Bytes;
use std::borrow::Borrow;
use std::ops::Deref;

/// An immutable UTF-8 string backed by [`Bytes`], so that decoding a topic name or a client
/// identifier does not copy it out of the packet buffer.
///
/// The contents are always valid UTF-8; the codec additionally rejects U+0000 on decode.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct MqttStr(Bytes);

// Hash as `str` does, so that `Borrow<str>` lookups in hash maps find the same entries.
impl std::hash::Hash for MqttStr {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl MqttStr {
    /// An empty string.
    pub const fn new() -> MqttStr {
        MqttStr(Bytes::new())
    }

    /// A string from a `&'static str`, without copying.
    pub const fn from_static(s: &'static str) -> MqttStr {
        MqttStr(Bytes::from_static(s.as_bytes()))
    }

    /// Wraps bytes that are valid UTF-8, or gives them back.
    pub fn from_utf8(b: Bytes) -> Result<MqttStr, Bytes> {
        match std::str::from_utf8(&b) {
            Ok(_) => Ok(MqttStr(b)),
            Err(_) => Err(b),
        }
    }

    /// The string.
    #[allow(unsafe_code)]
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checks (or takes from a `str`) that the bytes are UTF-8, and
        // `Bytes` is immutable. Checking again on every access cost a fifth of decode time.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The underlying bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Takes the underlying bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl Deref for MqttStr {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for MqttStr {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for MqttStr {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for MqttStr {
    fn from(s: &str) -> Self {
        MqttStr(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for MqttStr {
    fn from(s: String) -> Self {
        MqttStr(Bytes::from(s))
    }
}

impl From<&String> for MqttStr {
    fn from(s: &String) -> Self {
        MqttStr::from(s.as_str())
    }
}

impl From<MqttStr> for String {
    fn from(s: MqttStr) -> Self {
        s.as_str().to_owned()
    }
}

impl PartialEq<str> for MqttStr {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for MqttStr {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Debug for MqttStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for MqttStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::MqttStr;
    use std::collections::HashSet;

    #[test]
    fn borrow_str_lookups_agree_with_hash() {
        let set: HashSet<MqttStr> = ["orders/1", "a/b"].into_iter().map(MqttStr::from).collect();
        assert!(set.contains("orders/1"));
        assert!(!set.contains("orders/2"));
    }
}
