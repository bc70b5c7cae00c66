//! Content safety through the real app: the XSS corpus over REST and WebSocket is stored
//! and delivered without markup, and malformed media is refused with nothing stored.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use serde_json::{Value, json};

use crate::helpers::TestApp;

/// A real 1x1 PNG.
const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";
/// A real 1x1 GIF.
const GIF_1X1: &str = "R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7";

/// The payloads of the sanitizer's corpus, with its placeholders expanded.
fn corpus() -> Vec<String> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/content/xss.txt"),
    )
    .unwrap();
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with("# "))
        .map(|line| {
            line.replace("{NUL}", "\0")
                .replace("{CR}", "\r")
                .replace("{NL}", "\n")
        })
        .collect()
}

/// No element, no attribute quote: safe in any HTML context.
fn assert_inert(content: &str, payload: &str) {
    assert!(
        !content.contains(['<', '>', '"', '\'']),
        "{payload:?} was stored as {content:?}"
    );
}

#[tokio::test]
async fn the_xss_corpus_is_stored_and_delivered_without_markup() {
    let app = TestApp::spawn(None, &[]).await;
    let mut watcher = app.ws("watcher", "xss").await;
    let payloads = corpus();
    assert!(payloads.len() >= 100, "the corpus is there");
    let mut stored = 0;
    for payload in &payloads {
        let (status, body) = app
            .post(
                "/api/chat/message",
                &json!({"sender": "mallory", "channel": "xss", "content": payload}),
            )
            .await;
        match status {
            200 => {
                assert_inert(body["data"]["content"].as_str().unwrap(), payload);
                let delivered = watcher.next_of("message").await;
                assert_inert(delivered["content"].as_str().unwrap(), payload);
                stored += 1;
            }
            // Nothing visible left (only markup), or a control character.
            422 => assert!(
                ["empty_content", "invalid_content"].contains(&body["code"].as_str().unwrap()),
                "{payload:?}: {body}"
            ),
            other => panic!("{payload:?}: {other} {body}"),
        }
    }
    let history = app.history("xss").await;
    assert_eq!(history.len(), stored);
    for message in &history {
        assert_inert(message["content"].as_str().unwrap(), "history");
    }
    // The same over the WebSocket, for a few of them.
    let mut sender = app.ws("mallory", "xss").await;
    for (i, payload) in payloads.iter().take(20).enumerate() {
        sender.say(payload, &format!("c{i}")).await;
        loop {
            let frame = sender.next().await;
            if frame["client_id"] == format!("c{i}") {
                if frame["type"] == "message" {
                    assert_inert(frame["content"].as_str().unwrap(), payload);
                }
                break;
            }
        }
    }
    // Ordinary text survives in its documented form.
    let (_, body) = app
        .post(
            "/api/chat/message",
            &json!({"sender": "ann", "channel": "xss", "content": "a < b & c, <3 \"ok\" 🙂"}),
        )
        .await;
    assert_eq!(
        body["data"]["content"],
        "a &lt; b &amp; c, &lt;3 &quot;ok&quot; 🙂"
    );
}

/// A PNG signature and an IHDR chunk declaring `width` x `height` (CRC not checked by
/// header readers), then nothing: a pixel-flood header in a few bytes.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend_from_slice(&13u32.to_be_bytes());
    bytes.extend_from_slice(b"IHDR");
    bytes.extend_from_slice(&width.to_be_bytes());
    bytes.extend_from_slice(&height.to_be_bytes());
    bytes.extend_from_slice(&[8, 2, 0, 0, 0]);
    bytes.extend_from_slice(&[0, 0, 0, 0]);
    bytes
}

#[tokio::test]
async fn malformed_media_is_refused_and_nothing_is_stored() {
    let app = TestApp::spawn(None, &[("CHATGATE_CHAT__MAX_IMAGE_BYTES", "2048")]).await;
    let svg = STANDARD.encode(r#"<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>"#);
    let html = STANDARD.encode("<html><script>alert(1)</script></html>");
    let gif_bytes = STANDARD.decode(GIF_1X1).unwrap();
    let png_with_url_safe = URL_SAFE.encode([0xfb, 0xff, 0xfe].repeat(4));
    let flood = STANDARD.encode(png_header(50_000, 50_000));
    let oversized = STANDARD.encode(vec![0u8; 4096]);
    let cases: Vec<(String, &str, u16, &str)> = vec![
        (
            format!("data:image/svg+xml;base64,{svg}"),
            "image",
            422,
            "media_type_not_allowed",
        ),
        (
            format!("data:text/html;base64,{html}"),
            "image",
            422,
            "media_type_not_allowed",
        ),
        (
            format!("data:image/png;base64,{}", STANDARD.encode(&gif_bytes)),
            "image",
            422,
            "media_type_mismatch",
        ),
        (
            format!("data:image/png;base64,{PNG_1X1}="),
            "image",
            422,
            "invalid_media",
        ),
        (
            format!(
                "data:image/png;base64,{} {}",
                &PNG_1X1[..20],
                &PNG_1X1[20..]
            ),
            "image",
            422,
            "invalid_media",
        ),
        (
            format!("data:image/png;base64,{png_with_url_safe}"),
            "image",
            422,
            "invalid_media",
        ),
        (
            format!("data:image/png;base64,{}", PNG_1X1.trim_end_matches('=')),
            "image",
            422,
            "invalid_media",
        ),
        (
            format!("data:image/png;base64,{flood}"),
            "image",
            422,
            "media_dimensions_too_large",
        ),
        (
            format!("data:image/png;base64,{oversized}"),
            "image",
            413,
            "media_too_large",
        ),
        (
            format!("data:image/png;base64,{PNG_1X1}"),
            "audio",
            422,
            "media_type_not_allowed",
        ),
        (
            format!("data:image/png;charset=utf-8;base64,{PNG_1X1}"),
            "image",
            422,
            "invalid_media",
        ),
        (
            "https://evil.test/x.png".to_string(),
            "image",
            422,
            "invalid_media",
        ),
    ];
    for (content, kind, status, code) in &cases {
        let (got, body) = app
            .post(
                "/api/chat/message",
                &json!({"sender": "a", "channel": "media", "content": content, "message_type": kind}),
            )
            .await;
        assert_eq!(
            (got, body["code"].as_str()),
            (*status, Some(*code)),
            "{content:.80}"
        );
    }
    assert!(
        app.history("media").await.is_empty(),
        "nothing refused was stored"
    );

    // Over the WebSocket: an error frame, the socket stays usable, valid media goes out.
    let mut ws = app.ws("a", "media").await;
    ws.send_json(json!({
        "type": "message", "message_type": "image", "client_id": "svg",
        "content": format!("data:image/svg+xml;base64,{svg}"),
    }))
    .await;
    let error = ws.next_of("error").await;
    assert_eq!(
        (error["code"].as_str(), error["client_id"].as_str()),
        (Some("media_type_not_allowed"), Some("svg"))
    );
    let png = format!("data:image/png;base64,{PNG_1X1}");
    ws.send_json(
        json!({"type": "message", "message_type": "image", "content": png, "client_id": "png"}),
    )
    .await;
    let echo: Value = ws.next_of("message").await;
    assert_eq!(echo["content"], png, "valid media is stored as sent");
    assert_eq!(app.history("media").await.len(), 1);
}

#[tokio::test]
async fn a_history_answer_is_bounded_in_bytes() {
    let app = TestApp::spawn(None, &[("CHATGATE_CHAT__HISTORY_MAX_BYTES", "65536")]).await;
    // Three valid 1x1 PNGs padded to 20,000 bytes (about 27 KB as data URLs).
    let mut bytes = png_header(1, 1);
    bytes.resize(20_000, 0);
    let image = format!("data:image/png;base64,{}", STANDARD.encode(&bytes));
    for _ in 0..3 {
        let (status, body) = app
            .post(
                "/api/chat/message",
                &json!({"sender": "a", "channel": "big", "content": image, "message_type": "image"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = app.get("/api/chat/history/big?limit=3").await;
    assert_eq!(status, 200);
    assert_eq!(body["total_count"], 2, "only the newest two fit in 64 KiB");
    assert_eq!(body["truncated"], true);
    // Small answers keep the original's shape.
    app.send("a", "small", "hi").await;
    let (_, body) = app.get("/api/chat/history/small").await;
    assert!(body.get("truncated").is_none(), "{body}");
}
