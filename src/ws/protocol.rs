//! Frames a client sends, parsed with the original's leniency where it is harmless and
//! an error frame where the original went silent.
//!
//! - `type` absent means `message` (as in the original); `message`, `typing_start` and
//!   `typing_stop` are known; anything else is `unknown_type`.
//! - `sender` and `channel` in a frame are ignored: the connection's identity and channel
//!   are used (the original ignored `channel` too, but trusted `sender`).
//! - `message_type` defaults to `text`; `content` must be a string.
//! - `client_id` (optional, at most [`MAX_CLIENT_ID_BYTES`]) is copied into the echo.

use serde_json::Value;

use crate::chat::model::ValidationError;

/// Longest `client_id` accepted, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 128;

/// A parsed client frame.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame {
    Message {
        content: String,
        message_type: String,
        client_id: Option<String>,
    },
    TypingStart,
    TypingStop,
}

fn invalid(code: &'static str, detail: impl Into<String>) -> ValidationError {
    ValidationError::new(code, detail)
}

fn take_string(
    object: &mut serde_json::Map<String, Value>,
    field: &str,
) -> Result<Option<String>, ValidationError> {
    match object.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(
            "invalid_frame",
            format!("{field} must be a string"),
        )),
    }
}

impl ClientFrame {
    /// # Errors
    /// `invalid_json` (not JSON), `invalid_frame` (not an object, or a field of the wrong
    /// type) or `unknown_type`.
    pub fn parse(text: &str) -> Result<Self, ValidationError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| invalid("invalid_json", format!("frame is not valid JSON: {e}")))?;
        let Value::Object(mut object) = value else {
            return Err(invalid("invalid_frame", "frame must be a JSON object"));
        };
        let kind = match object.remove("type") {
            None => "message".to_string(),
            Some(Value::String(kind)) => kind,
            Some(_) => return Err(invalid("unknown_type", "type must be a string")),
        };
        match kind.as_str() {
            "message" => {
                let content = take_string(&mut object, "content")?
                    .ok_or_else(|| invalid("invalid_frame", "content is required"))?;
                let message_type =
                    take_string(&mut object, "message_type")?.unwrap_or_else(|| "text".into());
                let client_id = take_string(&mut object, "client_id")?;
                if client_id
                    .as_ref()
                    .is_some_and(|id| id.len() > MAX_CLIENT_ID_BYTES)
                {
                    return Err(invalid(
                        "invalid_frame",
                        format!("client_id must be at most {MAX_CLIENT_ID_BYTES} bytes"),
                    ));
                }
                Ok(Self::Message {
                    content,
                    message_type,
                    client_id,
                })
            }
            "typing_start" => Ok(Self::TypingStart),
            "typing_stop" => Ok(Self::TypingStop),
            other => Err(invalid(
                "unknown_type",
                format!(
                    "unknown frame type {:?}; expected message, typing_start or typing_stop",
                    other.chars().take(40).collect::<String>()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> &'static str {
        ClientFrame::parse(text).unwrap_err().code
    }

    #[test]
    fn the_originals_frames_parse() {
        assert_eq!(
            ClientFrame::parse(
                r#"{"type":"message","sender":"x","content":"hi","channel":"other","message_type":"text"}"#
            )
            .unwrap(),
            ClientFrame::Message {
                content: "hi".into(),
                message_type: "text".into(),
                client_id: None
            }
        );
        // No type: a message; no message_type: text.
        assert_eq!(
            ClientFrame::parse(r#"{"content":"hi","client_id":"c1"}"#).unwrap(),
            ClientFrame::Message {
                content: "hi".into(),
                message_type: "text".into(),
                client_id: Some("c1".into())
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"typing_start","sender":"x"}"#).unwrap(),
            ClientFrame::TypingStart
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"typing_stop"}"#).unwrap(),
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

    /// Property tests: the parser is total (never panics) and what it accepts is what the
    /// frame said, with `client_id` within its cap.
    mod properties {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngSeed};
        use serde_json::{Map, Value};

        use crate::ws::protocol::{ClientFrame, MAX_CLIENT_ID_BYTES};

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
                if let Err(error) = ClientFrame::parse(&text) {
                    prop_assert!(matches!(error.code, "invalid_json" | "invalid_frame" | "unknown_type"));
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
                                    content,
                                    message_type: message_type.unwrap_or_else(|| "text".into()),
                                    client_id,
                                })
                            }
                            _ => Err("invalid_frame"),
                        }
                    }
                    Some("typing_start") => Ok(ClientFrame::TypingStart),
                    Some("typing_stop") => Ok(ClientFrame::TypingStop),
                    _ => Err("unknown_type"),
                };
                let parsed = ClientFrame::parse(&text).map_err(|error| error.code);
                if let Ok(ClientFrame::Message { client_id: Some(id), .. }) = &parsed {
                    prop_assert!(id.len() <= MAX_CLIENT_ID_BYTES);
                }
                prop_assert_eq!(parsed, expected, "{}", text);
            }
        }
    }
}
