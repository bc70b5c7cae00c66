//! Frames a client sends, parsed with the original's leniency where it is harmless and
//! an error frame where the original went silent.
//!
//! - `type` absent means `message` (as in the original); `message`, `typing_start` and
//!   `typing_stop` are known; anything else is `unknown_type`.
//! - `sender` and `channel` in a frame are ignored: the connection's identity and channel
//!   are used (the original ignored `channel` too, but trusted `sender`).
//! - `message_type` defaults to `text`; `content` must be a string.
//! - `client_id` (optional, at most [`MAX_CLIENT_ID_BYTES`]) is copied into the echo.
//!
//! Parsing is typed and borrows from the frame's text: fields that are not read (a
//! `sender`, a `pad` of ten million `{}`) are skipped without allocating, so what a frame
//! costs is its own bytes, never a tree built from them. Each kind has its size cap: only
//! `image` and `audio` messages may be larger than [`FrameCaps::small`] (see
//! docs/protocol.md, "What a frame may weigh").

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::chat::model::ValidationError;

/// Longest `client_id` accepted, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 128;

/// A parsed client frame; its strings borrow from the frame's text where they can.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    Message {
        content: Cow<'a, str>,
        message_type: Cow<'a, str>,
        client_id: Option<Cow<'a, str>>,
    },
    TypingStart,
    TypingStop,
}

/// Size caps by kind, in bytes of the frame's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCaps {
    /// Every frame but an image or audio message: control frames, typing, text messages.
    pub small: usize,
}

/// One field of a frame, as sent: absent, `null`, a string, or anything else (skipped
/// without allocating).
#[derive(Debug, Default)]
enum Field<'a> {
    #[default]
    Absent,
    Null,
    Str(Cow<'a, str>),
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for FieldVisitor<'a> {
            type Value = Field<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Field::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Field::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
        }

        deserializer.deserialize_any(FieldVisitor(std::marker::PhantomData))
    }
}

/// The frame as sent. Fields not named here are skipped (`IgnoredAny`).
#[derive(Debug, Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Field<'a>,
    #[serde(default, borrow)]
    content: Field<'a>,
    #[serde(default, borrow)]
    message_type: Field<'a>,
    #[serde(default, borrow)]
    client_id: Field<'a>,
}

fn invalid(code: &'static str, detail: impl Into<String>) -> ValidationError {
    ValidationError::new(code, detail)
}

/// An optional string field: absent and `null` are `None`.
fn optional<'a>(field: Field<'a>, name: &str) -> Result<Option<Cow<'a, str>>, ValidationError> {
    match field {
        Field::Absent | Field::Null => Ok(None),
        Field::Str(s) => Ok(Some(s)),
        Field::Other => Err(invalid("invalid_frame", format!("{name} must be a string"))),
    }
}

/// The only shape a payload over the small cap may have: an image or audio message is an
/// object of string fields (`null` allowed), the documented ones only. Checked before the
/// real parse of such a payload, it fails at the first other key or the first value that
/// is not a string, so padding (`"pad":[{},{},...]`, 13 MB of it) costs a few bytes of
/// parsing instead of millions of skipped values on a worker thread; the content itself
/// is one string, scanned at memory speed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LargeShape {
    #[serde(rename = "type", default)]
    _kind: Option<Text>,
    #[serde(rename = "sender", default)]
    _sender: Option<Text>,
    #[serde(rename = "content", default)]
    _content: Option<Text>,
    #[serde(rename = "channel", default)]
    _channel: Option<Text>,
    #[serde(rename = "message_type", default)]
    _message_type: Option<Text>,
    #[serde(rename = "client_id", default)]
    _client_id: Option<Text>,
}

/// A string value, checked and dropped: anything else fails at its first byte.
struct Text;

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl Visitor<'_> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Text, E> {
                Ok(Text)
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

/// Checks that a payload over the small cap has the only shape a large payload may have
/// (see [`LargeShape`]).
///
/// # Errors
/// Why it does not: the serde error, for the detail.
pub fn check_large_shape(payload: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<LargeShape>(payload)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Whether a message of this `message_type` may be larger than the small cap.
pub fn is_media_type(message_type: &str) -> bool {
    matches!(message_type, "image" | "audio")
}

impl<'a> ClientFrame<'a> {
    /// Parses a frame and applies its kind's size cap.
    ///
    /// # Errors
    /// `invalid_json` (not JSON), `invalid_frame` (not an object, a duplicated field, or a
    /// field of the wrong type), `unknown_type`, or `frame_too_large` (a frame other than
    /// an image or audio message over `caps.small` bytes).
    pub fn parse(text: &'a str, caps: FrameCaps) -> Result<Self, ValidationError> {
        if !text.trim_start().starts_with('{') {
            // Valid JSON that is not an object is a frame error; anything else is not JSON.
            // Either way nothing is built: `IgnoredAny` only checks the syntax.
            return Err(match serde_json::from_str::<IgnoredAny>(text) {
                Ok(_) => invalid("invalid_frame", "frame must be a JSON object"),
                Err(e) => invalid("invalid_json", format!("frame is not valid JSON: {e}")),
            });
        }
        if text.len() > caps.small
            && let Err(why) = check_large_shape(text.as_bytes())
        {
            return Err(invalid(
                "frame_too_large",
                format!(
                    "this frame is {} bytes; only image and audio messages may exceed {} \
                     bytes, with string fields only ({why})",
                    text.len(),
                    caps.small
                ),
            ));
        }
        let wire: Wire<'a> = serde_json::from_str(text).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                invalid("invalid_frame", format!("invalid frame: {e}"))
            }
            _ => invalid("invalid_json", format!("frame is not valid JSON: {e}")),
        })?;
        let kind = match wire.kind {
            Field::Absent => Cow::Borrowed("message"),
            Field::Str(kind) => kind,
            Field::Null | Field::Other => {
                return Err(invalid("unknown_type", "type must be a string"));
            }
        };
        let frame = match kind.as_ref() {
            "message" => {
                let content = optional(wire.content, "content")?
                    .ok_or_else(|| invalid("invalid_frame", "content is required"))?;
                let message_type =
                    optional(wire.message_type, "message_type")?.unwrap_or(Cow::Borrowed("text"));
                let client_id = optional(wire.client_id, "client_id")?;
                if client_id
                    .as_ref()
                    .is_some_and(|id| id.len() > MAX_CLIENT_ID_BYTES)
                {
                    return Err(invalid(
                        "invalid_frame",
                        format!("client_id must be at most {MAX_CLIENT_ID_BYTES} bytes"),
                    ));
                }
                Self::Message {
                    content,
                    message_type,
                    client_id,
                }
            }
            "typing_start" => Self::TypingStart,
            "typing_stop" => Self::TypingStop,
            other => {
                return Err(invalid(
                    "unknown_type",
                    format!(
                        "unknown frame type {:?}; expected message, typing_start or typing_stop",
                        other.chars().take(40).collect::<String>()
                    ),
                ));
            }
        };
        if text.len() > caps.small && !frame.may_be_large() {
            return Err(invalid(
                "frame_too_large",
                format!(
                    "this frame is {} bytes; only image and audio messages may exceed {} bytes",
                    text.len(),
                    caps.small
                ),
            ));
        }
        Ok(frame)
    }

    /// The frame with every string owned, so it can outlive the frame's text.
    pub fn into_owned(self) -> ClientFrame<'static> {
        match self {
            Self::Message {
                content,
                message_type,
                client_id,
            } => ClientFrame::Message {
                content: Cow::Owned(content.into_owned()),
                message_type: Cow::Owned(message_type.into_owned()),
                client_id: client_id.map(|id| Cow::Owned(id.into_owned())),
            },
            Self::TypingStart => ClientFrame::TypingStart,
            Self::TypingStop => ClientFrame::TypingStop,
        }
    }

    /// Image and audio messages are the only frames that may exceed the small cap.
    fn may_be_large(&self) -> bool {
        matches!(self, Self::Message { message_type, .. } if is_media_type(message_type))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_payloads_must_be_string_fields_and_fail_fast() {
        let media = r#"{"type":"message","sender":"a","channel":"c","content":"data:x","message_type":"audio","client_id":null}"#;
        assert!(check_large_shape(media.as_bytes()).is_ok());
        let rest = r#"{"sender":"a","content":"x","message_type":"image"}"#;
        assert!(check_large_shape(rest.as_bytes()).is_ok());
        // Padding under any other key, or as a value of a known one, fails at once: the
        // error points at the start of the padding, not past it.
        let pad = format!("[{}{{}}]", "{},".repeat(100_000));
        for bad in [
            format!(r#"{{"type":"typing_start","pad":{pad}}}"#),
            format!(r#"{{"type":"message","content":{pad}}}"#),
            format!(
                r#"{{"type":"message","content":"x","message_type":"audio","client_id":{pad}}}"#
            ),
        ] {
            let why = check_large_shape(bad.as_bytes()).unwrap_err();
            let column: usize = why.rsplit("column ").next().unwrap().parse().unwrap();
            assert!(column < 100, "{why}");
        }
        let frame = format!(r#"{{"type":"typing_start","pad":{pad}}}"#);
        let caps = FrameCaps { small: 1024 };
        assert_eq!(
            ClientFrame::parse(&frame, caps).unwrap_err().code,
            "frame_too_large"
        );
    }

    const CAPS: FrameCaps = FrameCaps { small: 1024 };

    fn parse(text: &str) -> Result<ClientFrame<'_>, ValidationError> {
        ClientFrame::parse(text, CAPS)
    }

    fn code(text: &str) -> &'static str {
        parse(text).unwrap_err().code
    }

    fn message<'a>(
        content: &'a str,
        message_type: &'a str,
        client_id: Option<&'a str>,
    ) -> ClientFrame<'a> {
        ClientFrame::Message {
            content: content.into(),
            message_type: message_type.into(),
            client_id: client_id.map(Cow::Borrowed),
        }
    }

    #[test]
    fn the_originals_frames_parse() {
        assert_eq!(
            parse(
                r#"{"type":"message","sender":"x","content":"hi","channel":"other","message_type":"text"}"#
            )
            .unwrap(),
            message("hi", "text", None)
        );
        // No type: a message; no message_type: text.
        assert_eq!(
            parse(r#"{"content":"hi","client_id":"c1"}"#).unwrap(),
            message("hi", "text", Some("c1"))
        );
        assert_eq!(
            parse(r#"{"type":"typing_start","sender":"x"}"#).unwrap(),
            ClientFrame::TypingStart
        );
        assert_eq!(
            parse(r#"{"type":"typing_stop"}"#).unwrap(),
            ClientFrame::TypingStop
        );
    }

    #[test]
    fn bad_frames_get_codes() {
        assert_eq!(code("hello"), "invalid_json");
        assert_eq!(code("[1,2]"), "invalid_frame");
        assert_eq!(code("123"), "invalid_frame");
        assert_eq!(code(r#""x""#), "invalid_frame");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":null}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"message","content":123}"#), "invalid_frame");
        assert_eq!(code(r#"{"type":"message"}"#), "invalid_frame");
        let long = format!(r#"{{"content":"x","client_id":"{}"}}"#, "a".repeat(129));
        assert_eq!(code(&long), "invalid_frame");
    }

    /// The inputs of the review that found the parser amplifying memory: each is refused by
    /// its kind's cap, and a padded frame under the cap parses without building its padding.
    #[test]
    fn padded_frames_are_capped_by_kind() {
        let pad = |n: usize| vec!["{}"; n].join(",");
        let typing = format!(r#"{{"type":"typing_start","pad":[{}]}}"#, pad(2000));
        assert!(typing.len() > CAPS.small);
        assert_eq!(code(&typing), "frame_too_large");
        let text = format!(r#"{{"content":"x","pad":[{}]}}"#, pad(2000));
        assert_eq!(code(&text), "frame_too_large");
        let stop = format!(r#"{{"pad":[{}],"type":"typing_stop"}}"#, pad(2000));
        assert_eq!(code(&stop), "frame_too_large");
        // Media may be large, but only as documented string fields: padding beside it is
        // refused too.
        let media = format!(
            r#"{{"type":"message","content":"data:x","message_type":"audio","pad":[{}]}}"#,
            pad(2000)
        );
        assert_eq!(code(&media), "frame_too_large");
        let media = format!(
            r#"{{"type":"message","sender":"s","channel":"c","content":"data:{}","message_type":"audio"}}"#,
            "x".repeat(2000)
        );
        assert!(matches!(
            parse(&media).unwrap(),
            ClientFrame::Message { .. }
        ));
        // Under the cap, padding is skipped.
        let small = format!(r#"{{"type":"typing_start","pad":[{}]}}"#, pad(100));
        assert_eq!(parse(&small).unwrap(), ClientFrame::TypingStart);
        // Deep nesting in a skipped field is skipped too, without building anything.
        let deep = format!(
            r#"{{"content":"x","pad":{}{}}}"#,
            "[".repeat(400),
            "]".repeat(400)
        );
        assert_eq!(parse(&deep).unwrap(), message("x", "text", None));
    }

    #[test]
    fn strings_borrow_from_the_frame_unless_escaped() {
        let frame = parse(r#"{"content":"plain","client_id":"c\u0031"}"#).unwrap();
        let ClientFrame::Message {
            content, client_id, ..
        } = frame
        else {
            panic!("a message");
        };
        assert!(matches!(content, Cow::Borrowed("plain")));
        assert_eq!(client_id.as_deref(), Some("c1"));
    }

    #[test]
    fn duplicated_and_mistyped_fields_are_frame_errors() {
        assert_eq!(code(r#"{"content":"a","content":"b"}"#), "invalid_frame");
        assert_eq!(code(r#"{"content":"a","message_type":7}"#), "invalid_frame");
        assert_eq!(code(r#"{"content":"a","client_id":{}}"#), "invalid_frame");
        assert_eq!(code(r#"{"content":"a""#), "invalid_json");
        // Whitespace around the object is JSON too.
        assert_eq!(
            parse(" \n{\"type\":\"typing_stop\"} ").unwrap(),
            ClientFrame::TypingStop
        );
    }

    /// Property tests: the parser is total (never panics) and what it accepts is what the
    /// frame said, with `client_id` within its cap.
    mod properties {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngSeed};
        use serde_json::{Map, Value};

        use std::borrow::Cow;

        use crate::ws::protocol::{ClientFrame, FrameCaps, MAX_CLIENT_ID_BYTES};

        /// Large enough for every generated frame: the size cap has tests of its own.
        const CAPS: FrameCaps = FrameCaps { small: 1 << 20 };

        /// A fixed seed keeps runs reproducible; no regression files in the tree.
        fn config() -> Config {
            Config {
                cases: 256,
                rng_seed: RngSeed::Fixed(0x5EED_F4A3),
                failure_persistence: None,
                ..Config::default()
            }
        }

        /// Any JSON value, nested a few levels.
        fn json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                ".{0,40}".prop_map(Value::String),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::vec((".{0,8}", inner), 0..4)
                        .prop_map(|entries| Value::Object(entries.into_iter().collect())),
                ]
            })
        }

        /// `type`: mostly a known one, sometimes anything.
        fn kind() -> impl Strategy<Value = Option<Value>> {
            prop::option::of(prop_oneof![
                3 => prop_oneof![
                    Just("message"),
                    Just("typing_start"),
                    Just("typing_stop"),
                    Just("Message"),
                ]
                .prop_map(Value::from),
                1 => json(),
            ])
        }

        /// `client_id`: often a string near the byte cap (multi-byte characters included).
        fn client_id() -> impl Strategy<Value = Option<Value>> {
            prop::option::of(prop_oneof![
                2 => "[a-z0-9-]{120,136}".prop_map(Value::String),
                2 => ".{0,70}".prop_map(Value::String),
                1 => json(),
            ])
        }

        fn string_or_any() -> impl Strategy<Value = Option<Value>> {
            prop::option::of(prop_oneof![
                3 => ".{0,40}".prop_map(Value::String),
                1 => json(),
            ])
        }

        /// A frame object with each field absent or present with any JSON type, plus noise.
        fn frame() -> impl Strategy<Value = Map<String, Value>> {
            (
                kind(),
                string_or_any(),
                string_or_any(),
                client_id(),
                prop::collection::vec(("[a-z_]{1,10}", json()), 0..3),
            )
                .prop_map(|(kind, content, message_type, client_id, extra)| {
                    let mut object: Map<String, Value> = extra.into_iter().collect();
                    for (key, value) in [
                        ("type", kind),
                        ("content", content),
                        ("message_type", message_type),
                        ("client_id", client_id),
                    ] {
                        match value {
                            Some(value) => object.insert(key.to_string(), value),
                            None => object.remove(key),
                        };
                    }
                    object
                })
        }

        /// A field the parser treats as an optional string: absent and null mean `None`.
        fn optional_string(object: &Map<String, Value>, key: &str) -> Result<Option<String>, ()> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(()),
            }
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn arbitrary_text_never_panics(text in any::<String>()) {
                if let Err(error) = ClientFrame::parse(&text, FrameCaps { small: 64 }) {
                    prop_assert!(matches!(
                        error.code,
                        "invalid_json" | "invalid_frame" | "unknown_type" | "frame_too_large"
                    ));
                }
            }

            #[test]
            fn frames_parse_to_what_they_say(object in frame()) {
                let text = serde_json::to_string(&object).unwrap();
                let kind = match object.get("type") {
                    None => Some("message"),
                    Some(Value::String(kind)) => Some(kind.as_str()),
                    Some(_) => None,
                };
                let expected = match kind {
                    Some("message") => {
                        let content = optional_string(&object, "content");
                        let message_type = optional_string(&object, "message_type");
                        let client_id = optional_string(&object, "client_id");
                        match (content, message_type, client_id) {
                            (Ok(Some(content)), Ok(message_type), Ok(client_id))
                                if client_id.as_ref().is_none_or(|id| id.len() <= MAX_CLIENT_ID_BYTES) =>
                            {
                                Ok(ClientFrame::Message {
                                    content: Cow::Owned(content),
                                    message_type: Cow::Owned(message_type.unwrap_or_else(|| "text".into())),
                                    client_id: client_id.map(Cow::Owned),
                                })
                            }
                            _ => Err("invalid_frame"),
                        }
                    }
                    Some("typing_start") => Ok(ClientFrame::TypingStart),
                    Some("typing_stop") => Ok(ClientFrame::TypingStop),
                    _ => Err("unknown_type"),
                };
                let parsed = ClientFrame::parse(&text, CAPS).map_err(|error| error.code);
                if let Ok(ClientFrame::Message { client_id: Some(id), .. }) = &parsed {
                    prop_assert!(id.len() <= MAX_CLIENT_ID_BYTES);
                }
                prop_assert_eq!(parsed, expected, "{}", text);
            }
        }
    }
}
