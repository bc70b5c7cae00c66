//! Observability: traces exported over OTLP (to a receiver inside the test) across two
//! replicas, Prometheus metrics on the admin listener, and an OTLP endpoint that is down.
//!
//! Tracing is process-wide, so the trace tests run the real binary, two processes on one
//! Redis, each with its own `service.instance.id`.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message as _;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{Process, RedisServer, TestApp, WsClient, free_port, http_client, metric};

const SECRET: &str = "telemetry-test-hmac-secret-of-32-bytes-at-least";
const CONTENT_WS: &str = "secret-content-ws-7f3a";
const CONTENT_REST: &str = "secret-content-rest-91bc";

/// An HS256 token for `user`, valid for ten minutes.
fn token(user: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        json!({"sub": user, "preferred_username": user, "iat": now, "exp": now + 600}).to_string(),
    );
    let message = format!("{header}.{claims}");
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
            .unwrap();
    format!("{message}.{signature}")
}

/// One exported span with the resource attributes of the process that made it.
#[derive(Debug, Clone)]
struct Exported {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: Vec<KeyValue>,
    resource: Vec<KeyValue>,
    /// Every string anywhere in the span (name, attributes, events), for leak checks.
    strings: Vec<String>,
}

impl Exported {
    fn attr(&self, key: &str) -> Option<String> {
        find(&self.attributes, key)
    }

    fn instance(&self) -> String {
        find(&self.resource, "service.instance.id").unwrap_or_default()
    }
}

fn text(value: &Option<AnyValue>) -> Option<String> {
    match value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        _ => None,
    }
}

fn find(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| text(&kv.value))
}

/// An OTLP/HTTP (protobuf) trace receiver.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<Exported>>>,
}

impl Receiver {
    async fn start() -> Self {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        let router = Router::new().route(
            "/v1/traces",
            post(move |body: Bytes| {
                let sink = sink.clone();
                async move {
                    let request = ExportTraceServiceRequest::decode(body).unwrap();
                    let mut sink = sink.lock().unwrap();
                    for resource_spans in request.resource_spans {
                        let resource = resource_spans
                            .resource
                            .map(|r| r.attributes)
                            .unwrap_or_default();
                        for scope in resource_spans.scope_spans {
                            for span in scope.spans {
                                let mut strings = vec![span.name.clone()];
                                for kv in span
                                    .attributes
                                    .iter()
                                    .chain(span.events.iter().flat_map(|e| e.attributes.iter()))
                                {
                                    strings.push(kv.key.clone());
                                    strings.extend(text(&kv.value));
                                }
                                strings.extend(span.events.iter().map(|e| e.name.clone()));
                                sink.push(Exported {
                                    name: span.name,
                                    trace_id: span.trace_id,
                                    span_id: span.span_id,
                                    parent_span_id: span.parent_span_id,
                                    attributes: span.attributes,
                                    resource: resource.clone(),
                                    strings,
                                });
                            }
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { port, spans }
    }

    fn spans(&self) -> Vec<Exported> {
        self.spans.lock().unwrap().clone()
    }
}

fn vars(redis: &RedisServer, endpoint: &str) -> Vec<(String, String)> {
    [
        ("CHATGATE_STORE__BACKEND", "redis"),
        ("CHATGATE_REDIS__URL", redis.url().as_str()),
        ("CHATGATE_AUTH__ALGORITHMS", "HS256"),
        ("CHATGATE_AUTH__HMAC_SECRET", SECRET),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("RUST_LOG", "info"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

async fn ws(port: u16, token: &str, channel: &str) -> WsClient {
    let mut request = format!("ws://127.0.0.1:{port}/ws/chat?channel={channel}")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("chatgate.v1, bearer.{token}").parse().unwrap(),
    );
    let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    WsClient { socket }
}

#[tokio::test]
async fn one_message_is_one_trace_across_two_replicas() {
    let redis = RedisServer::start().await;
    let receiver = Receiver::start().await;
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let mut a = Process::start(false, &vars(&redis, &endpoint), None).await;
    let mut b = Process::start(false, &vars(&redis, &endpoint), None).await;

    // Bob listens on replica B; Alice sends on replica A.
    let (alice_token, bob_token) = (token("alice"), token("bob"));
    let mut bob = ws(b.port, &bob_token, "traced").await;
    let mut alice = ws(a.port, &alice_token, "traced").await;
    bob.next_of("user_joined").await;
    alice.say(CONTENT_WS, "c1").await;
    assert_eq!(alice.next_of("message").await["client_id"], "c1");
    assert_eq!(bob.next_of("message").await["content"], CONTENT_WS);

    // A REST send that continues the caller's trace.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = http_client()
        .post(format!("http://127.0.0.1:{}/api/chat/message", a.port))
        .bearer_auth(token("alice"))
        .header(
            "traceparent",
            format!("00-{caller_trace}-00f067aa0ba902b7-01"),
        )
        .json(&json!({"content": CONTENT_REST, "channel": "traced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(bob.next_of("message").await["content"], CONTENT_REST);
    drop((alice, bob));

    // A clean stop flushes every buffered span.
    for process in [&mut a, &mut b] {
        process.signal("TERM");
        assert!(process.wait_exit().await.success());
    }
    let spans = receiver.spans();

    // The WebSocket message: chat.send on A, with its Redis call as a child.
    let send = named(&spans, "chat.send")
        .find(|s| s.attr("transport").as_deref() == Some("ws"))
        .expect("a chat.send span for the WebSocket message");
    assert_eq!(send.attr("channel").as_deref(), Some("traced"));
    assert_eq!(send.attr("message_type").as_deref(), Some("text"));
    assert_eq!(send.attr("outcome").as_deref(), Some("sent"));
    let a_instance = send.instance();
    assert!(
        named(&spans, "redis.append").any(|s| s.parent_span_id == send.span_id),
        "redis.append is a child of chat.send"
    );
    let check = named(&spans, "ratelimit.check")
        .find(|s| s.parent_span_id == send.span_id)
        .expect("the rate-limit decision is a child of chat.send");
    assert_eq!(check.attr("allowed").as_deref(), Some("true"));
    assert_eq!(
        check.attr("decided").as_deref(),
        Some("shared"),
        "decided in Redis"
    );
    assert!(
        named(&spans, "chat.validate").any(|s| s.parent_span_id == send.span_id),
        "validation is a child of chat.send"
    );
    // Its delivery on both replicas, in the same trace, children of chat.send.
    let deliveries: Vec<&Exported> = named(&spans, "chat.deliver")
        .filter(|s| s.trace_id == send.trace_id)
        .collect();
    let instances: std::collections::HashSet<String> =
        deliveries.iter().map(|s| s.instance()).collect();
    assert_eq!(
        instances.len(),
        2,
        "delivered on both replicas: {deliveries:#?}"
    );
    assert!(instances.contains(&a_instance));
    for delivery in &deliveries {
        assert_eq!(delivery.parent_span_id, send.span_id);
        assert_eq!(delivery.attr("channel").as_deref(), Some("traced"));
    }

    // The REST send joined the caller's trace, under the HTTP span.
    let http = named(&spans, "POST /api/chat/message")
        .next()
        .expect("an HTTP span named by route template");
    assert_eq!(hex(&http.trace_id), caller_trace);
    assert_eq!(http.attr("route").as_deref(), Some("/api/chat/message"));
    assert_eq!(http.attr("status").as_deref(), Some("200"));
    assert!(http.attr("client_ip").is_some());
    let rest_send = named(&spans, "chat.send")
        .find(|s| s.attr("transport").as_deref() == Some("rest"))
        .unwrap();
    assert_eq!(rest_send.parent_span_id, http.span_id);
    assert!(
        named(&spans, "chat.deliver")
            .any(|s| s.trace_id == http.trace_id && s.instance() != a_instance),
        "the REST message's delivery on B is in the caller's trace"
    );
    assert!(named(&spans, "GET /ws/chat").next().is_some());
    assert!(named(&spans, "ws.session").next().is_some());

    // Resource attributes.
    for span in &spans {
        assert_eq!(
            find(&span.resource, "service.name").as_deref(),
            Some("chatgate")
        );
        assert!(find(&span.resource, "service.version").is_some());
        assert!(!span.instance().is_empty());
    }
    // No token and no message content anywhere.
    let secrets = [
        CONTENT_WS,
        CONTENT_REST,
        SECRET,
        alice_token.as_str(),
        bob_token.as_str(),
        alice_token.rsplit('.').next().unwrap(),
        bob_token.rsplit('.').next().unwrap(),
        "bearer.",
        "Bearer ",
    ];
    for span in &spans {
        for string in &span.strings {
            for secret in &secrets {
                assert!(!string.contains(secret), "{secret} leaked in {}", span.name);
            }
        }
    }
}

fn named<'a>(spans: &'a [Exported], name: &'a str) -> impl Iterator<Item = &'a Exported> {
    spans.iter().filter(move |s| s.name == name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn an_unreachable_collector_breaks_nothing() {
    let redis = RedisServer::start().await;
    // Nothing listens there.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let mut process = Process::start(false, &vars(&redis, &endpoint), None).await;
    let mut bob = ws(process.port, &token("bob"), "down").await;
    for i in 0..20 {
        bob.say(&format!("m{i}"), &format!("c{i}")).await;
        assert_eq!(bob.next_of("message").await["client_id"], format!("c{i}"));
    }
    let ready = http_client()
        .get(format!("http://127.0.0.1:{}/readyz", process.port))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    drop(bob);
    // Shutdown still completes (the exporter's flush is bounded).
    process.signal("TERM");
    assert!(process.wait_exit().await.success());
}

#[tokio::test]
async fn metrics_move_on_the_admin_listener_only() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[("CHATGATE_LIMITS__ENABLED", "true")]).await;
    let before = app.metrics().await;
    let mut ws = app.ws("meg", "metered").await;
    ws.say("hello", "c1").await;
    ws.next_of("message").await;
    app.send("meg", "metered", "over rest").await;
    ws.next_of("message").await;
    let refused = app
        .http
        .get(app.url("/api/chat/history/metered?limit=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    ws.close().await;
    // The session ends on its own task after the close handshake: wait for its count.
    let closed = r#"chatgate_connections_closed_total{reason="client_closed"}"#;
    let deadline = tokio::time::Instant::now() + crate::helpers::WAIT;
    let after = loop {
        let after = app.metrics().await;
        if metric(&after, closed) > metric(&before, closed) {
            break after;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the close was not counted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };

    for (series, at_least) in [
        (r#"chatgate_messages_received_total{transport="ws"}"#, 1.0),
        (r#"chatgate_messages_received_total{transport="rest"}"#, 1.0),
        ("chatgate_connections_opened_total", 1.0),
        ("chatgate_frames_delivered_total", 2.0),
        (
            r#"chatgate_redis_command_duration_seconds_count{op="append"}"#,
            2.0,
        ),
    ] {
        assert!(
            metric(&after, series) - metric(&before, series) >= at_least,
            "{series} did not move:\n{after}"
        );
    }
    assert!(after.contains(
        "chatgate_http_request_duration_seconds_bucket{method=\"GET\",route=\"/api/chat/history/{channel}\",status=\"400\""
    ));
    // Not on the public port.
    assert_eq!(app.get("/metrics").await.0, 404);
}
