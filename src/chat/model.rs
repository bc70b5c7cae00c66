//! Validated domain types. Their only constructors are `parse`, so the chat service never
//! sees a username, channel or message id that could break a Redis key or a client.
//!
//! Naming rules (documented in docs/protocol.md):
//! - usernames: 1 to 32 characters, letters and digits of any script plus `_`, `-`, `.`;
//! - channels: 1 to 64 characters, the same set;
//! - message ids: 1 to 64 characters of ASCII letters, digits and `-`.
//!
//! No `:`, `*`, braces, spaces, quotes or control characters can appear, so a name can
//! never reach into another key, a glob or a cluster hash tag.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest username, in characters.
pub const MAX_USERNAME_CHARS: usize = 32;
/// Longest channel name, in characters.
pub const MAX_CHANNEL_CHARS: usize = 64;
/// Longest message id accepted on delete, in characters (a UUID is 36).
pub const MAX_MESSAGE_ID_CHARS: usize = 64;
/// The channel used when a client names none, as in the original.
pub const DEFAULT_CHANNEL: &str = "general";

/// Why an input was refused. `code` is stable and machine-readable; `detail` is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub code: &'static str,
    pub detail: String,
}

impl ValidationError {
    pub fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

fn name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.')
}

fn parse_name(
    raw: &str,
    what: &str,
    code: &'static str,
    max: usize,
) -> Result<String, ValidationError> {
    let chars = raw.chars().count();
    if chars == 0 {
        return Err(ValidationError::new(
            code,
            format!("{what} must not be empty"),
        ));
    }
    if chars > max {
        return Err(ValidationError::new(
            code,
            format!("{what} must be at most {max} characters"),
        ));
    }
    if !raw.chars().all(name_char) {
        return Err(ValidationError::new(
            code,
            format!("{what} may contain only letters, digits, '_', '-' and '.'"),
        ));
    }
    Ok(raw.to_string())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A user's name: the identity shown to peers and used in presence keys.
    Username
);
name_type!(
    /// A channel's name: part of every key of that channel.
    ChannelName
);
name_type!(
    /// A message id as given by a client on delete (ours are UUIDs, the original's too).
    MessageId
);

impl Username {
    /// # Errors
    /// `invalid_username` when empty, too long, or with a character outside the set.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        parse_name(raw, "username", "invalid_username", MAX_USERNAME_CHARS).map(Self)
    }
}

impl ChannelName {
    /// # Errors
    /// `invalid_channel` when empty, too long, or with a character outside the set.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        parse_name(raw, "channel", "invalid_channel", MAX_CHANNEL_CHARS).map(Self)
    }

    /// The default channel, `general`.
    pub fn general() -> Self {
        Self(DEFAULT_CHANNEL.to_string())
    }
}

impl MessageId {
    /// # Errors
    /// `invalid_message_id` unless 1..=64 ASCII letters, digits or `-`.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let ok = !raw.is_empty()
            && raw.len() <= MAX_MESSAGE_ID_CHARS
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if ok {
            Ok(Self(raw.to_string()))
        } else {
            Err(ValidationError::new(
                "invalid_message_id",
                "message id must be 1 to 64 letters, digits or '-'",
            ))
        }
    }

    /// A new, time-ordered id (UUID v7), so ids sort by creation time.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }
}

/// The kinds of message content the API knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Text,
    Image,
    Audio,
}

impl MessageType {
    /// # Errors
    /// `invalid_message_type` for anything but `text`, `image` and `audio`.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        match raw {
            "text" => Ok(Self::Text),
            "image" => Ok(Self::Image),
            "audio" => Ok(Self::Audio),
            _ => Err(ValidationError::new(
                "invalid_message_type",
                "message_type must be one of text, image, audio",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Image => "image",
            Self::Audio => "audio",
        }
    }
}

/// A UTC instant, written as RFC 3339 with microseconds and a `Z`
/// (`2024-01-01T12:00:00.123456Z`). Reads the original's naive timestamps
/// (`2024-01-01T12:00:00.123456`, UTC without an offset) too, so its history stays readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    pub fn now() -> Self {
        Self(Utc::now())
    }

    /// From milliseconds since the Unix epoch.
    pub fn from_millis(ms: i64) -> Self {
        Self(DateTime::from_timestamp_millis(ms).unwrap_or_default())
    }

    pub fn parse(raw: &str) -> Option<Self> {
        if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
            return Some(Self(t.with_timezone(&Utc)));
        }
        NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%.f")
            .ok()
            .map(|n| Self(n.and_utc()))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(SecondsFormat::Micros, true))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&raw)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid timestamp {raw:?}")))
    }
}

/// A stored chat message, with the original's fields in the original's order. This is both
/// the history entry in Redis and the `data`/`messages[]` object of the REST API.
///
/// `message_type` stays a string here: history written by the original may hold any value
/// there, and reading it back must not fail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub sender: String,
    pub content: String,
    pub channel: String,
    pub message_type: String,
    pub timestamp: Timestamp,
    pub message_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_the_safe_set() {
        for ok in ["alice", "Bob_2", "a.b-c", "José", "用户", "x"] {
            assert!(Username::parse(ok).is_ok(), "{ok}");
            assert!(ChannelName::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn names_refuse_key_breakers_and_control_characters() {
        for bad in [
            "",
            "a:b",
            "a*",
            "a b",
            "{tag}",
            "a\nb",
            "a\u{202e}b",
            "a\"b",
            "a/b",
            "\u{0}",
        ] {
            assert_eq!(
                Username::parse(bad).unwrap_err().code,
                "invalid_username",
                "{bad:?}"
            );
            assert_eq!(
                ChannelName::parse(bad).unwrap_err().code,
                "invalid_channel",
                "{bad:?}"
            );
        }
        assert!(Username::parse(&"a".repeat(32)).is_ok());
        assert!(Username::parse(&"a".repeat(33)).is_err());
        assert!(ChannelName::parse(&"c".repeat(64)).is_ok());
        assert!(ChannelName::parse(&"c".repeat(65)).is_err());
    }

    #[test]
    fn message_ids_are_uuid_like() {
        assert!(MessageId::parse("0190a4e2-7b1c-7def-8a00-1234567890ab").is_ok());
        for bad in ["", "a\"b", "a b", "x:y", &"a".repeat(65)] {
            assert!(MessageId::parse(bad).is_err(), "{bad:?}");
        }
        let a = MessageId::generate();
        assert!(MessageId::parse(a.as_str()).is_ok());
    }

    #[test]
    fn message_type_is_one_of_three() {
        assert_eq!(MessageType::parse("image").unwrap(), MessageType::Image);
        assert!(MessageType::parse("weird").is_err());
        assert!(MessageType::parse("Text").is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_z_and_read_naive_ones() {
        let t = Timestamp::parse("2025-11-23T15:14:18.123456").unwrap();
        assert_eq!(t.to_string(), "2025-11-23T15:14:18.123456Z");
        let t = Timestamp::parse("2025-11-23T15:14:18").unwrap();
        assert_eq!(t.to_string(), "2025-11-23T15:14:18.000000Z");
        let t = Timestamp::parse("2025-11-23T16:14:18.5+01:00").unwrap();
        assert_eq!(t.to_string(), "2025-11-23T15:14:18.500000Z");
        assert!(Timestamp::parse("yesterday").is_none());
    }

    #[test]
    fn original_history_entries_parse() {
        let raw = r#"{"sender":"bob","content":"hi","channel":"general","message_type":"weird","timestamp":"2025-11-23T15:14:18.123456","message_id":"6f1c"}"#;
        let m: ChatMessage = serde_json::from_str(raw).unwrap();
        assert_eq!(m.message_type, "weird");
        let back = serde_json::to_string(&m).unwrap();
        assert!(back.starts_with(r#"{"sender":"bob","content":"hi","channel":"general""#));
        assert!(back.contains(r#""timestamp":"2025-11-23T15:14:18.123456Z""#));
    }
}
