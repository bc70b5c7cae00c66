//! Events: the frames the server sends to WebSocket clients, and the envelope that carries
//! them between replicas over the bus.
//!
//! A frame is serialized once, when it is published; every replica forwards those bytes
//! unchanged to each local member (the envelope keeps the frame as raw JSON). Only the echo
//! to the sending connection differs: it gains the client's `client_id`.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::model::{ChatMessage, Timestamp};

/// A frame sent by the server to a WebSocket client, tagged by `type` as in the original.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// A chat message, also echoed to its sender (with `client_id` when the sender gave one).
    Message(ChatMessage),
    UserJoined {
        username: String,
        channel: String,
        timestamp: Timestamp,
    },
    UserLeft {
        username: String,
        channel: String,
        timestamp: Timestamp,
    },
    TypingStatus {
        username: String,
        channel: String,
        is_typing: bool,
        timestamp: Timestamp,
    },
    MessageDeleted {
        message_id: String,
        channel: String,
        timestamp: Timestamp,
    },
    /// Sent only to the connection concerned, never over the bus. `client_id` is the
    /// one of the message frame that failed, when it had one.
    Error {
        code: &'static str,
        detail: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
    },
    /// Ends the replay a connection asked for with `since=`: `replayed` messages newer
    /// than `since` came before it, oldest first. `complete: false` means the gap could
    /// not be filled (`since` is no longer in the history): reload the history instead.
    /// Sent only to the connection concerned.
    Resumed {
        since: String,
        replayed: usize,
        complete: bool,
    },
}

impl ServerFrame {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("frames always serialize")
    }

    pub fn error(code: &'static str, detail: impl Into<String>) -> Self {
        Self::Error {
            code,
            detail: detail.into(),
            retry_after_ms: None,
            client_id: None,
        }
    }

    /// Ties an error frame to the client's message; other frames are unchanged.
    pub fn for_client(mut self, id: Option<String>) -> Self {
        if let Self::Error { client_id, .. } = &mut self {
            *client_id = id;
        }
        self
    }
}

/// The connection an event came from: which replica, and which connection on it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Origin<'a> {
    #[serde(rename = "r", borrow)]
    pub replica: Cow<'a, str>,
    #[serde(rename = "c")]
    pub conn: u64,
}

/// How an event is delivered to the connection it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Echo {
    /// Everyone gets it, the origin included (chat messages: the echo is the ack).
    All,
    /// Everyone but the origin connection (joins, leaves, typing; as the original does).
    Others,
    /// Nobody: a join marker, which only tells the hub where the origin's stream begins.
    Nobody,
}

/// The bus payload: a frame plus how to deliver it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// Payload version, so a rolling upgrade can tell old envelopes from new ones.
    pub v: u8,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin<'a>>,
    pub echo: Echo,
    /// Copied into the origin's echo only.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<Cow<'a, str>>,
    /// Ephemeral events (typing) are the first dropped for a slow client.
    #[serde(default)]
    pub ephemeral: bool,
    /// Published by the origin connection's join, in the same atomic step that records
    /// it: events before this one in the bus stream were published before the connection
    /// joined, so the hub does not deliver them to it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
    /// W3C `traceparent` of the span that published it (tracing on), so every replica's
    /// delivery joins the sender's trace.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Cow<'a, str>>,
    /// Publication time, milliseconds since the epoch (for the pub/sub lag metric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_ms: Option<u64>,
    #[serde(borrow)]
    pub frame: &'a RawValue,
}

/// Current envelope version.
pub const ENVELOPE_VERSION: u8 = 1;

impl<'a> Envelope<'a> {
    /// Serializes a frame into a bus payload.
    pub fn encode(
        frame: &ServerFrame,
        origin: Option<Origin<'_>>,
        echo: Echo,
        client_id: Option<&str>,
        ephemeral: bool,
    ) -> Vec<u8> {
        Self::build(
            &frame.to_json(),
            origin,
            echo,
            client_id,
            ephemeral,
            false,
            None,
        )
    }

    /// The bus event of a chat message, without the message: everything before the
    /// stored entry's first field. The event is [`message_event`]`(head, entry)`: the
    /// envelope (with the publishing span's trace context when tracing is on, and the
    /// publication time) whose frame is the entry with `"type":"message"` in front. The
    /// store joins the two where it publishes (inside Redis, for the Redis store), so this
    /// process never holds a second copy of a message's content.
    pub fn message_head(
        origin: Option<Origin<'_>>,
        client_id: Option<&str>,
        traceparent: Option<&str>,
    ) -> Vec<u8> {
        let sent_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        Self::head(origin, client_id, Some((traceparent, sent_ms)))
    }

    fn head(
        origin: Option<Origin<'_>>,
        client_id: Option<&str>,
        traced: Option<(Option<&str>, u64)>,
    ) -> Vec<u8> {
        // The frame is the envelope's last field: serialize a one-byte stand-in and cut it.
        let mut head = Self::build("0", origin, Echo::All, client_id, false, false, traced);
        let cut = head.len() - b"0}".len();
        debug_assert_eq!(&head[cut..], b"0}");
        head.truncate(cut);
        head.extend_from_slice(MESSAGE_FRAME_START);
        head
    }

    /// The `user_joined` a connection's join publishes when it is the user's first.
    pub fn joined(frame: &ServerFrame, origin: Origin<'_>) -> Vec<u8> {
        Self::build(
            &frame.to_json(),
            Some(origin),
            Echo::Others,
            None,
            false,
            true,
            None,
        )
    }

    /// What a connection's join publishes otherwise: a marker delivered to nobody.
    pub fn join_marker(origin: Origin<'_>) -> Vec<u8> {
        Self::build("{}", Some(origin), Echo::Nobody, None, false, true, None)
    }

    fn build(
        frame: &str,
        origin: Option<Origin<'_>>,
        echo: Echo,
        client_id: Option<&str>,
        ephemeral: bool,
        join: bool,
        traced: Option<(Option<&str>, u64)>,
    ) -> Vec<u8> {
        let frame = RawValue::from_string(frame.to_string()).expect("frame is JSON");
        let envelope = Envelope {
            v: ENVELOPE_VERSION,
            origin,
            echo,
            client_id: client_id.map(Cow::Borrowed),
            ephemeral,
            join,
            trace: traced.and_then(|(trace, _)| trace).map(Cow::Borrowed),
            sent_ms: traced.map(|(_, ms)| ms),
            frame: &frame,
        };
        serde_json::to_vec(&envelope).expect("envelopes always serialize")
    }

    /// # Errors
    /// When the payload is not an envelope (another publisher on the same channel).
    pub fn decode(payload: &'a [u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(payload)
    }
}

/// How a message frame starts; the stored entry's fields follow (the frame is the entry
/// with its `type` in front).
const MESSAGE_FRAME_START: &[u8] = b"{\"type\":\"message\",";

/// A chat message's bus event: `head` (from [`Envelope::message_head`]) joined to the
/// stored entry (a JSON object): `head`, the entry without its opening `{`, and the
/// envelope's closing `}`.
pub fn message_event(head: &[u8], entry: &str) -> Vec<u8> {
    let parts = message_event_parts(head, entry);
    let mut event = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    parts.iter().for_each(|part| event.extend_from_slice(part));
    event
}

/// The pieces of [`message_event`], for a writer that joins them where they go.
pub fn message_event_parts<'a>(head: &'a [u8], entry: &'a str) -> [&'a [u8]; 3] {
    let fields = entry.strip_prefix('{').unwrap_or(entry);
    [head, fields.as_bytes(), b"}"]
}

/// Adds `"client_id":<id>` to a serialized frame (a JSON object).
pub fn with_client_id(frame: &str, client_id: &str) -> String {
    let body = frame.trim_end();
    let body = body.strip_suffix('}').unwrap_or(body);
    let id = serde_json::to_string(client_id).expect("strings serialize");
    format!("{body},\"client_id\":{id}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> ChatMessage {
        ChatMessage {
            sender: "alice".into(),
            content: "hi".into(),
            channel: "general".into(),
            message_type: "text".into(),
            timestamp: Timestamp::parse("2024-01-01T12:00:00").unwrap(),
            message_id: "m1".into(),
        }
    }

    #[test]
    fn frames_have_the_original_shapes() {
        let json = ServerFrame::Message(message()).to_json();
        assert_eq!(
            json,
            r#"{"type":"message","sender":"alice","content":"hi","channel":"general","message_type":"text","timestamp":"2024-01-01T12:00:00.000000Z","message_id":"m1"}"#
        );
        let json = ServerFrame::TypingStatus {
            username: "bob".into(),
            channel: "general".into(),
            is_typing: true,
            timestamp: Timestamp::parse("2024-01-01T12:00:00").unwrap(),
        }
        .to_json();
        assert_eq!(
            json,
            r#"{"type":"typing_status","username":"bob","channel":"general","is_typing":true,"timestamp":"2024-01-01T12:00:00.000000Z"}"#
        );
        let json = ServerFrame::error("invalid_json", "nope").to_json();
        assert_eq!(
            json,
            r#"{"type":"error","code":"invalid_json","detail":"nope"}"#
        );
    }

    #[test]
    fn envelopes_round_trip_and_keep_the_frame_bytes() {
        let frame = ServerFrame::Message(message());
        let origin = Origin {
            replica: "r1".into(),
            conn: 7,
        };
        let bytes = Envelope::encode(&frame, Some(origin.clone()), Echo::All, Some("c-1"), false);
        let env = Envelope::decode(&bytes).unwrap();
        assert_eq!(env.origin, Some(origin));
        assert_eq!(env.echo, Echo::All);
        assert_eq!(env.client_id.as_deref(), Some("c-1"));
        assert_eq!(env.frame.get(), frame.to_json());
    }

    #[test]
    fn a_message_event_joined_from_its_head_is_the_encoded_envelope() {
        let frame = ServerFrame::Message(message());
        let origin = Origin {
            replica: "r1".into(),
            conn: 7,
        };
        let traced = Some((Some("00-abc-def-01"), 5));
        let whole = Envelope::build(
            &frame.to_json(),
            Some(origin.clone()),
            Echo::All,
            Some("c\"1"),
            false,
            false,
            traced,
        );
        let entry = serde_json::to_string(&message()).unwrap();
        let head = Envelope::head(Some(origin), Some("c\"1"), traced);
        assert_eq!(
            String::from_utf8(message_event(&head, &entry)).unwrap(),
            String::from_utf8(whole).unwrap()
        );
        let untraced = Envelope::head(None, None, None);
        let event = message_event(&untraced, &entry);
        let env = Envelope::decode(&event).unwrap();
        assert_eq!(env.frame.get(), frame.to_json());
        assert_eq!(env.echo, Echo::All);
    }

    #[test]
    fn client_id_is_appended_as_json() {
        let echoed = with_client_id(r#"{"type":"message","a":1}"#, "x\"y");
        let v: serde_json::Value = serde_json::from_str(&echoed).unwrap();
        assert_eq!(v["client_id"], "x\"y");
        assert_eq!(v["a"], 1);
    }
}
