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
}
