//! Gateway security (JWT auth on REST and WebSocket, identity, Origin, CORS, HTTP hygiene)
//! against the real app with real signed tokens: keys are generated here, and a JWKS is
//! served by a small HTTP server inside the test.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::helpers::{RedisServer, Socket, TestApp, WAIT, secure_config};

const ISSUER: &str = "https://issuer.test/realms/chat";
const AUDIENCE: &str = "chatgate";
const HMAC_SECRET: &str = "test-only-hmac-secret-of-at-least-32-bytes!";
const LEEWAY: u64 = 10;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A signing key with its public forms (JWK and PEM).
struct Signer {
    alg: Algorithm,
    key: EncodingKey,
    public_pem: String,
    kid: String,
    /// The public JWK parameters (kty, crv, x, y / n, e), without kid, alg and use.
    public_jwk: Value,
}

impl Signer {
    fn alg_name(&self) -> String {
        serde_json::to_value(self.alg)
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    fn jwk(&self) -> Value {
        let mut jwk = self.public_jwk.clone();
        jwk["kid"] = json!(self.kid);
        jwk["alg"] = json!(self.alg_name());
        jwk["use"] = json!("sig");
        jwk
    }

    fn header(&self) -> Value {
        json!({"alg": self.alg_name(), "typ": "JWT", "kid": self.kid})
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_raw(&self.header(), claims)
    }

    /// Signs exactly the header and claims given (for malformed and hostile tokens).
    fn sign_raw(&self, header: &Value, claims: &Value) -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &self.key, self.alg).unwrap();
        format!("{message}.{signature}")
    }
}

struct Kit {
    es256: Signer,
    es384: Signer,
    rs256: Signer,
    ps256: Signer,
    eddsa: Signer,
    /// An ES256 key the server never learns about (an attacker's).
    rogue: Signer,
}

fn es256(kid: &str) -> Signer {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let pem = secret.to_pkcs8_pem(LineEnding::LF).unwrap();
    let point =
        p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&secret.public_key(), false);
    Signer {
        alg: Algorithm::ES256,
        key: EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        public_pem: secret
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
        kid: kid.into(),
        public_jwk: json!({
            "kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
            "y": URL_SAFE_NO_PAD.encode(point.y().unwrap()),
        }),
    }
}

/// Keys are generated once per test run (RSA generation is slow).
fn kit() -> &'static Kit {
    static KIT: OnceLock<Kit> = OnceLock::new();
    KIT.get_or_init(|| {
        use p384::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
        use rsa::pkcs1::EncodeRsaPrivateKey;
        let mut rng = rand::rngs::OsRng;

        let p384_secret = p384::SecretKey::random(&mut rng);
        let point = p384::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(
            &p384_secret.public_key(),
            false,
        );
        let es384 = Signer {
            public_jwk: json!({
                "kty": "EC", "crv": "P-384",
                "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
                "y": URL_SAFE_NO_PAD.encode(point.y().unwrap()),
            }),
            alg: Algorithm::ES384,
            key: EncodingKey::from_ec_pem(
                p384_secret.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes(),
            )
            .unwrap(),
            public_pem: p384_secret
                .public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
            kid: "es384-1".into(),
        };

        let rsa_key = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
        let rsa_pem = rsa_key.to_pkcs1_pem(LineEnding::LF).unwrap();
        let rsa_public = rsa::RsaPublicKey::from(&rsa_key)
            .to_public_key_pem(LineEnding::LF)
            .unwrap();
        let rsa_jwk = {
            use rsa::traits::PublicKeyParts;
            let public = rsa::RsaPublicKey::from(&rsa_key);
            json!({
                "kty": "RSA",
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            })
        };
        let rsa_signer = |alg, kid: &str| Signer {
            public_jwk: rsa_jwk.clone(),
            alg,
            key: EncodingKey::from_rsa_pem(rsa_pem.as_bytes()).unwrap(),
            public_pem: rsa_public.clone(),
            kid: kid.into(),
        };

        let ed = ed25519_dalek::SigningKey::generate(&mut rng);
        let eddsa = Signer {
            public_jwk: json!({
                "kty": "OKP", "crv": "Ed25519",
                "x": URL_SAFE_NO_PAD.encode(ed.verifying_key().as_bytes()),
            }),
            alg: Algorithm::EdDSA,
            key: EncodingKey::from_ed_pem(ed.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes())
                .unwrap(),
            public_pem: ed
                .verifying_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
            kid: "ed-1".into(),
        };

        Kit {
            es256: es256("es256-1"),
            es384,
            rs256: rsa_signer(Algorithm::RS256, "rsa-1"),
            ps256: rsa_signer(Algorithm::PS256, "rsa-ps-1"),
            eddsa,
            rogue: es256("es256-1"),
        }
    })
}

fn hmac_signer(secret: &[u8]) -> Signer {
    Signer {
        alg: Algorithm::HS256,
        key: EncodingKey::from_secret(secret),
        public_pem: String::new(),
        kid: "hs-1".into(),
        public_jwk: Value::Null,
    }
}

/// Valid claims for `user`: iss, aud, sub, iat, nbf and a 10-minute exp.
fn claims(user: &str) -> Value {
    let now = now();
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": format!("id-{user}"),
        "preferred_username": user, "iat": now, "nbf": now - 1, "exp": now + 600,
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

/// A JWKS endpoint the test controls: which keys it serves, whether it is up, and how
/// often it was asked.
struct Jwks {
    port: u16,
    state: Arc<Mutex<JwksState>>,
}

struct JwksState {
    keys: Vec<Value>,
    up: bool,
    fetches: usize,
}

impl Jwks {
    async fn start(keys: Vec<Value>) -> Self {
        let state = Arc::new(Mutex::new(JwksState {
            keys,
            up: true,
            fetches: 0,
        }));
        let served = state.clone();
        let router = Router::new().route(
            "/jwks.json",
            get(move || {
                let state = served.clone();
                async move {
                    let mut state = state.lock().unwrap();
                    state.fetches += 1;
                    if state.up {
                        Ok(axum::Json(json!({ "keys": state.keys })))
                    } else {
                        Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self { port, state }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/jwks.json", self.port)
    }

    fn fetches(&self) -> usize {
        self.state.lock().unwrap().fetches
    }

    fn set_up(&self, up: bool) {
        self.state.lock().unwrap().up = up;
    }

    fn set_keys(&self, keys: Vec<Value>) {
        self.state.lock().unwrap().keys = keys;
    }
}

const ALL_PUBLIC: &str = "ES256,ES384,RS256,PS256,EdDSA";

/// An app verifying public-key tokens from `jwks`, with issuer, audience and a 10 s leeway.
async fn jwks_app(jwks: &Jwks, extra: &[(&str, &str)]) -> TestApp {
    let url = jwks.url();
    let mut vars = vec![
        ("CHATGATE_AUTH__ALGORITHMS", ALL_PUBLIC),
        ("CHATGATE_AUTH__JWKS_URL", url.as_str()),
        ("CHATGATE_AUTH__ISSUER", ISSUER),
        ("CHATGATE_AUTH__AUDIENCE", AUDIENCE),
        ("CHATGATE_AUTH__LEEWAY_SECS", "10"),
        ("CHATGATE_AUTH__JWKS_MIN_REFETCH_SECS", "3600"),
        ("CHATGATE_CORS__ALLOWED_ORIGINS", "https://app.example.com"),
    ];
    vars.extend_from_slice(extra);
    TestApp::spawn_with(secure_config(None, &vars)).await
}

async fn standard_app() -> (Jwks, TestApp) {
    let kit = kit();
    let jwks = Jwks::start(vec![
        kit.es256.jwk(),
        kit.es384.jwk(),
        kit.rs256.jwk(),
        kit.ps256.jwk(),
        kit.eddsa.jwk(),
    ])
    .await;
    let app = jwks_app(&jwks, &[]).await;
    (jwks, app)
}

/// Status and `WWW-Authenticate` of an authenticated REST read.
async fn rest(app: &TestApp, token: Option<&str>) -> (u16, String) {
    let mut request = app.http.get(app.url("/api/chat/channels"));
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = request.send().await.unwrap();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (response.status().as_u16(), challenge)
}

async fn rest_status(app: &TestApp, token: &str) -> u16 {
    rest(app, Some(token)).await.0
}

/// A WebSocket upgrade with extra headers: the socket and the selected subprotocol, or
/// the HTTP status of the refusal.
async fn upgrade(
    app: &TestApp,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<(Socket, Option<String>), u16> {
    let mut request = format!("ws://127.0.0.1:{}/ws/chat?{query}", app.port)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().append(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, response)) => {
            assert_eq!(response.status().as_u16(), 101);
            let protocol = response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap().to_string());
            Ok((socket, protocol))
        }
        Err(WsError::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("unexpected upgrade failure: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// JWT / auth (gateway-security.md section 5, cases 1-13)

#[tokio::test]
async fn public_endpoints_stay_public_and_the_api_needs_a_token() {
    let (_jwks, app) = standard_app().await;
    for path in ["/", "/healthz", "/readyz"] {
        assert_eq!(app.get(path).await.0, 200, "{path}");
    }
    let (status, challenge) = rest(&app, None).await;
    assert_eq!(status, 401);
    assert!(challenge.starts_with("Bearer"), "{challenge}");
    assert!(
        !challenge.contains("error="),
        "no error code without a token: {challenge}"
    );
    for path in [
        "/api/chat/history/general",
        "/api/users/online/general",
        "/api/chat/channels",
        "/api/me",
    ] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(body["code"], "missing_token");
    }
    let (status, _) = app
        .post(
            "/api/chat/message",
            &json!({"sender": "alice", "content": "hi"}),
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = app.delete("/api/chat/message/abc?channel=general").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn every_allowed_algorithm_verifies_from_the_jwks() {
    let (_jwks, app) = standard_app().await;
    let kit = kit();
    for signer in [&kit.es256, &kit.es384, &kit.rs256, &kit.ps256, &kit.eddsa] {
        let token = signer.sign(&claims("alice"));
        assert_eq!(rest_status(&app, &token).await, 200, "{:?}", signer.alg);
    }
    // The identity is the token's.
    let response = app
        .http
        .get(app.url("/api/me"))
        .bearer_auth(
            kit.es256
                .sign(&with(claims("alice"), "roles", json!(["chat-admin"]))),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let me: Value = response.json().await.unwrap();
    assert_eq!(me["username"], "alice");
    assert_eq!(me["admin"], true);
    assert_eq!(me["roles"], json!(["chat-admin"]));
    assert!(me["expires_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn pem_keys_and_hmac_secrets_verify_without_a_jwks() {
    let kit = kit();
    let dir = std::env::temp_dir().join(format!("chatgate-keys-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let es = dir.join("es256.pem");
    let ed = dir.join("ed.pem");
    std::fs::write(&es, &kit.es256.public_pem).unwrap();
    std::fs::write(&ed, &kit.eddsa.public_pem).unwrap();
    let files = format!("{},{}", es.display(), ed.display());
    let app = TestApp::spawn_with(secure_config(
        None,
        &[
            ("CHATGATE_AUTH__ALGORITHMS", "ES256,EdDSA"),
            ("CHATGATE_AUTH__PUBLIC_KEY_FILES", &files),
        ],
    ))
    .await;
    let plain = without(without(claims("alice"), "iss"), "aud");
    assert_eq!(rest_status(&app, &kit.es256.sign(&plain)).await, 200);
    assert_eq!(rest_status(&app, &kit.eddsa.sign(&plain)).await, 200);
    assert_eq!(rest_status(&app, &kit.rogue.sign(&plain)).await, 401);
    std::fs::remove_dir_all(&dir).unwrap();

    let app = TestApp::spawn_with(secure_config(
        None,
        &[
            ("CHATGATE_AUTH__ALGORITHMS", "HS256"),
            ("CHATGATE_AUTH__HMAC_SECRET", HMAC_SECRET),
        ],
    ))
    .await;
    let good = hmac_signer(HMAC_SECRET.as_bytes());
    assert_eq!(rest_status(&app, &good.sign(&plain)).await, 200);
    let wrong = hmac_signer(b"another-secret-of-at-least-32-bytes-long");
    assert_eq!(rest_status(&app, &wrong.sign(&plain)).await, 401);
}

#[tokio::test]
async fn alg_none_confusion_and_algorithms_outside_the_list_are_refused() {
    let kit = kit();
    let jwks = Jwks::start(vec![kit.es256.jwk(), kit.rs256.jwk()]).await;
    // Only ES256 is allowed, although the JWKS also holds an RSA key.
    let app = jwks_app(&jwks, &[("CHATGATE_AUTH__ALGORITHMS", "ES256")]).await;
    let good = kit.es256.sign(&claims("alice"));
    assert_eq!(rest_status(&app, &good).await, 200);

    // alg none, in every spelling, with an empty signature.
    for none in ["none", "None", "NONE", "nOnE"] {
        let token = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(json!({"alg": none, "typ": "JWT"}).to_string()),
            URL_SAFE_NO_PAD.encode(claims("alice").to_string())
        );
        let (status, challenge) = rest(&app, Some(&token)).await;
        assert_eq!(status, 401, "{none}");
        assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    }
    // RS256 is a real key in the JWKS but not in the allow-list.
    assert_eq!(
        rest_status(&app, &kit.rs256.sign(&claims("alice"))).await,
        401
    );
    // Key confusion: HS256 with the public key (PEM, DER-ish bytes, JWK x) as the secret.
    let jwk = kit.es256.jwk();
    for secret in [
        kit.es256.public_pem.as_bytes().to_vec(),
        kit.rs256.public_pem.as_bytes().to_vec(),
        jwk["x"].as_str().unwrap().as_bytes().to_vec(),
    ] {
        let forged = hmac_signer(&secret);
        let header = json!({"alg": "HS256", "typ": "JWT", "kid": kit.es256.kid});
        let token = forged.sign_raw(&header, &claims("alice"));
        assert_eq!(rest_status(&app, &token).await, 401);
    }
}

#[tokio::test]
async fn time_claims_are_checked_with_the_configured_leeway() {
    let (_jwks, app) = standard_app().await;
    let es = &kit().es256;
    let now = now();
    // Three seconds of margin either side of the leeway edge absorb a second boundary.
    let expired_beyond = with(claims("a"), "exp", json!(now - LEEWAY - 3));
    let expired_within = with(claims("a"), "exp", json!(now - LEEWAY + 3));
    let nbf_beyond = with(claims("a"), "nbf", json!(now + LEEWAY + 3));
    let nbf_within = with(claims("a"), "nbf", json!(now + LEEWAY - 3));
    assert_eq!(rest_status(&app, &es.sign(&expired_beyond)).await, 401);
    assert_eq!(rest_status(&app, &es.sign(&expired_within)).await, 200);
    assert_eq!(rest_status(&app, &es.sign(&nbf_beyond)).await, 401);
    assert_eq!(rest_status(&app, &es.sign(&nbf_within)).await, 200);
    // Floats are NumericDates too.
    let float_exp = with(claims("a"), "exp", json!((now + 600) as f64 + 0.5));
    assert_eq!(rest_status(&app, &es.sign(&float_exp)).await, 200);
    // Strings are not (CVE-2026-25537 regression).
    for (claim, value) in [("exp", "9999999999"), ("nbf", "99999999999")] {
        let token = es.sign(&with(claims("a"), claim, json!(value)));
        assert_eq!(rest_status(&app, &token).await, 401, "{claim} as a string");
    }
    // Lifetime over auth.max_token_lifetime_secs (one day by default).
    let thirty_days = with(claims("a"), "exp", json!(now + 30 * 86400));
    assert_eq!(rest_status(&app, &es.sign(&thirty_days)).await, 401);
    let long_since_iat = with(
        with(claims("a"), "iat", json!(now - 2 * 86400)),
        "exp",
        json!(now + 60),
    );
    assert_eq!(rest_status(&app, &es.sign(&long_since_iat)).await, 401);
}

#[tokio::test]
async fn required_claims_issuer_and_audience() {
    let (_jwks, app) = standard_app().await;
    let es = &kit().es256;
    for claim in ["exp", "aud", "iss", "sub"] {
        let token = es.sign(&without(claims("alice"), claim));
        assert_eq!(rest_status(&app, &token).await, 401, "missing {claim}");
    }
    let cases = [
        ("aud", json!("someone-else")),
        ("aud", json!(["a", "b"])),
        ("iss", json!("https://evil.test")),
    ];
    for (claim, value) in cases {
        let token = es.sign(&with(claims("alice"), claim, value.clone()));
        assert_eq!(rest_status(&app, &token).await, 401, "{claim}={value}");
    }
    // An audience list that includes ours is fine.
    let token = es.sign(&with(claims("alice"), "aud", json!(["other", AUDIENCE])));
    assert_eq!(rest_status(&app, &token).await, 200);
    // A username claim that is not a valid username is refused, not "cleaned".
    let token = es.sign(&with(claims("x"), "preferred_username", json!("a:b*c")));
    assert_eq!(rest_status(&app, &token).await, 401);
    // Without preferred_username the username is sub.
    let token = es.sign(&without(
        with(claims("x"), "sub", json!("carol")),
        "preferred_username",
    ));
    let me: Value = app
        .http
        .get(app.url("/api/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["username"], "carol");
}

#[tokio::test]
async fn hostile_headers_and_tampering_are_refused() {
    let (jwks, app) = standard_app().await;
    let kit = kit();
    let es = &kit.es256;
    let fetches_before = jwks.fetches();

    // kid injection and oversized kids: refused, and no fetch anywhere else.
    for kid in [
        json!("../../etc/passwd"),
        json!("' OR 1=1--"),
        json!("k".repeat(10_000)),
        json!(""),
        json!(42),
        json!("tab\tkid"),
    ] {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": kid});
        let token = es.sign_raw(&header, &claims("alice"));
        assert_eq!(rest_status(&app, &token).await, 401, "kid {kid}");
    }
    // jku / x5u / embedded jwk pointing at the attacker's key: ignored, so the attacker's
    // signature does not verify.
    let rogue = &kit.rogue;
    let rogue_jwk = rogue.jwk();
    for extra in [
        json!({"jku": "http://127.0.0.1:1/evil.json"}),
        json!({"x5u": "http://127.0.0.1:1/evil.pem"}),
        json!({"jwk": rogue_jwk}),
    ] {
        let mut header = rogue.header();
        for (k, v) in extra.as_object().unwrap() {
            header[k] = v.clone();
        }
        let token = rogue.sign_raw(&header, &claims("alice"));
        assert_eq!(rest_status(&app, &token).await, 401, "{extra}");
    }
    // crit: we understand no extensions.
    let mut header = es.header();
    header["crit"] = json!(["exp"]);
    assert_eq!(
        rest_status(&app, &es.sign_raw(&header, &claims("alice"))).await,
        401
    );

    // Tampering with a good token.
    let good = es.sign(&claims("alice"));
    assert_eq!(rest_status(&app, &good).await, 200);
    let parts: Vec<&str> = good.split('.').collect();
    let mut payload = parts[1].to_string();
    let flipped = if payload.ends_with('A') { "B" } else { "A" };
    payload.replace_range(payload.len() - 1.., flipped);
    let forged_payload = URL_SAFE_NO_PAD.encode(claims("mallory").to_string());
    let variants = [
        format!("{}.{}.{}", parts[0], payload, parts[2]),
        format!("{}.{}.{}", parts[0], forged_payload, parts[2]),
        // Padded base64url and the standard alphabet.
        format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE.encode(claims("alice").to_string()),
            parts[2]
        ),
        format!(
            "{}.{}.{}",
            STANDARD.encode(es.header().to_string()),
            parts[1],
            parts[2]
        ),
        format!("{}.{}", parts[0], parts[1]),
        format!("{good}.extra"),
        "not-a-token".to_string(),
        "x".repeat(9000),
    ];
    for token in &variants {
        assert_eq!(rest_status(&app, token).await, 401, "{token:.60}");
    }
    // A plain unknown kid (the path-like one) may cost one rate-limited refetch from the
    // configured URL; nothing else fetches, and jku/x5u URLs are never contacted.
    assert!(jwks.fetches() <= fetches_before + 1);
}

#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let (jwks, app) = standard_app().await;
    let es = &kit().es256;
    let baseline = jwks.fetches();
    assert_eq!(baseline, 1, "one fetch at startup");
    for i in 0..100 {
        let mut header = es.header();
        header["kid"] = json!(format!("random-{i}"));
        let token = es.sign_raw(&header, &claims("alice"));
        assert_eq!(rest_status(&app, &token).await, 401);
    }
    assert_eq!(
        jwks.fetches(),
        baseline + 1,
        "100 unknown kids, one refetch"
    );
    // Known keys keep working meanwhile.
    assert_eq!(rest_status(&app, &es.sign(&claims("alice"))).await, 200);
}

#[tokio::test]
async fn key_rotation_works_without_restart_and_an_outage_keeps_the_last_keys() {
    let kit = kit();
    let jwks = Jwks::start(vec![kit.es256.jwk()]).await;
    let app = jwks_app(&jwks, &[]).await;
    let old = kit.es256.sign(&claims("alice"));
    assert_eq!(rest_status(&app, &old).await, 200);

    // The issuer rotates: a new key with a new kid appears in the JWKS.
    let rotated = es256("es256-2");
    jwks.set_keys(vec![kit.es256.jwk(), rotated.jwk()]);
    assert_eq!(rest_status(&app, &rotated.sign(&claims("bob"))).await, 200);
    let fetches = jwks.fetches();
    assert_eq!(fetches, 2, "the unknown kid caused exactly one fetch");

    // The JWKS endpoint goes down: cached keys keep working.
    jwks.set_up(false);
    assert_eq!(rest_status(&app, &old).await, 200);
    assert_eq!(rest_status(&app, &rotated.sign(&claims("bob"))).await, 200);
    assert_eq!(app.get("/readyz").await.0, 200);
}

#[tokio::test]
async fn a_jwks_down_at_startup_means_not_ready_until_it_loads() {
    let kit = kit();
    let jwks = Jwks::start(vec![kit.es256.jwk()]).await;
    jwks.set_up(false);
    let app = jwks_app(&jwks, &[("CHATGATE_AUTH__JWKS_MIN_REFETCH_SECS", "1")]).await;
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body["detail"], "auth keys not loaded");
    let response = app
        .http
        .get(app.url("/api/chat/channels"))
        .bearer_auth(kit.es256.sign(&claims("alice")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        503,
        "keys not loaded is not the caller's fault"
    );
    assert_eq!(response.headers()["retry-after"], "1");
    // The issuer comes back; the background retry loads the keys.
    jwks.set_up(true);
    app.wait_ready(200).await;
    assert_eq!(
        rest_status(&app, &kit.es256.sign(&claims("alice"))).await,
        200
    );
}

#[tokio::test]
async fn different_tokens_in_several_places_are_refused() {
    let (_jwks, app) = standard_app().await;
    let es = &kit().es256;
    let alice = es.sign(&claims("alice"));
    let bob = es.sign(&claims("bob"));
    // REST never takes a query token.
    let response = app
        .http
        .get(app.url(&format!("/api/chat/channels?access_token={alice}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // Two Authorization headers.
    let response = app
        .http
        .get(app.url("/api/chat/channels"))
        .header("authorization", format!("Bearer {alice}"))
        .header("authorization", format!("Bearer {bob}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // WebSocket: header and query disagree, or subprotocol and query disagree.
    let auth = format!("Bearer {alice}");
    let result = upgrade(
        &app,
        &format!("access_token={bob}"),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(result.err(), Some(401));
    let protocols = format!("chatgate.v1, bearer.{alice}");
    let result = upgrade(
        &app,
        &format!("access_token={bob}"),
        &[("sec-websocket-protocol", &protocols)],
    )
    .await;
    assert_eq!(result.err(), Some(401));
    // The same token twice is fine.
    let result = upgrade(
        &app,
        &format!("access_token={alice}"),
        &[("sec-websocket-protocol", &protocols)],
    )
    .await;
    assert!(result.is_ok());
}

// ---------------------------------------------------------------------------------------
// Identity: the token names the user; roles and channel restrictions.

#[tokio::test]
async fn the_token_names_the_sender_and_owners_delete_their_own() {
    let redis = RedisServer::start().await;
    let kit = kit();
    let jwks = Jwks::start(vec![kit.es256.jwk()]).await;
    let url = jwks.url();
    let app = TestApp::spawn_with(secure_config(
        Some(&redis),
        &[
            ("CHATGATE_AUTH__ALGORITHMS", "ES256"),
            ("CHATGATE_AUTH__JWKS_URL", &url),
            ("CHATGATE_AUTH__ROLES_CLAIM", "realm_access.roles"),
        ],
    ))
    .await;
    let token = |user: &str, roles: Value| {
        let claims = with(
            without(without(claims(user), "iss"), "aud"),
            "realm_access",
            json!({ "roles": roles }),
        );
        kit.es256.sign(&claims)
    };
    let alice = token("alice", json!([]));
    let bob = token("bob", json!(["user"]));
    let admin = token("root", json!(["chat-admin"]));
    let post = |token: String, body: Value| {
        let request = app
            .http
            .post(app.url("/api/chat/message"))
            .bearer_auth(token)
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    // No sender: the token's user. The same sender: fine. Anyone else: 403.
    let (status, body) = post(alice.clone(), json!({"content": "one"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["sender"], "alice");
    let first = body["data"]["message_id"].as_str().unwrap().to_string();
    let (status, body) = post(alice.clone(), json!({"sender": "alice", "content": "two"})).await;
    assert_eq!(status, 200);
    let second = body["data"]["message_id"].as_str().unwrap().to_string();
    let (status, body) = post(alice.clone(), json!({"sender": "bob", "content": "x"})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("sender_mismatch"))
    );

    let delete = |token: String, id: String| {
        let request = app
            .http
            .delete(app.url(&format!("/api/chat/message/{id}?channel=general")))
            .bearer_auth(token);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    // Bob cannot delete Alice's message; Alice can; an admin can delete anyone's.
    let (status, body) = delete(bob.clone(), first.clone()).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("not_owner")));
    let (status, _) = delete(alice.clone(), first.clone()).await;
    assert_eq!(status, 200);
    let (status, _) = delete(admin.clone(), second.clone()).await;
    assert_eq!(status, 200);
    let (status, _) = delete(admin, second).await;
    assert_eq!(status, 404);

    // A WebSocket identity comes from the token too; a username naming someone else is 403.
    let protocols = format!("chatgate.v1, bearer.{bob}");
    let result = upgrade(
        &app,
        "channel=general&username=alice",
        &[("sec-websocket-protocol", &protocols)],
    )
    .await;
    assert_eq!(result.err(), Some(403));
    let (mut socket, _) = upgrade(
        &app,
        "channel=general",
        &[("sec-websocket-protocol", &protocols)],
    )
    .await
    .unwrap();
    socket
        .send(Message::Text(
            json!({"type": "message", "sender": "alice", "content": "from bob"})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    let echo = next_of(&mut socket, "message").await;
    assert_eq!(echo["sender"], "bob", "a frame's sender is ignored");
}

#[tokio::test]
async fn a_channel_claim_restricts_joins_posts_and_reads() {
    let (_jwks, app) = {
        let kit = kit();
        let jwks = Jwks::start(vec![kit.es256.jwk()]).await;
        let app = jwks_app(&jwks, &[("CHATGATE_AUTH__CHANNELS_CLAIM", "chat_channels")]).await;
        (jwks, app)
    };
    let es = &kit().es256;
    let limited = es.sign(&with(claims("dana"), "chat_channels", json!(["support"])));
    let everything = es.sign(&with(claims("erin"), "chat_channels", json!(["*"])));
    let unclaimed = es.sign(&claims("frank"));
    // Seed two channels.
    for channel in ["support", "secret"] {
        let response = app
            .http
            .post(app.url("/api/chat/message"))
            .bearer_auth(&everything)
            .json(&json!({"content": "seed", "channel": channel}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let get = |token: &str, path: &str| {
        app.http
            .get(app.url(path))
            .bearer_auth(token.to_string())
            .send()
    };
    assert_eq!(
        get(&limited, "/api/chat/history/support")
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        get(&limited, "/api/chat/history/secret")
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        get(&limited, "/api/users/online/secret")
            .await
            .unwrap()
            .status(),
        403
    );
    let channels: Value = get(&limited, "/api/chat/channels")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(channels["channels"], json!(["support"]));
    // With the claim configured, a token without it gets no channel (an identity
    // provider that leaves an empty attribute out must not grant everything).
    let channels: Value = get(&unclaimed, "/api/chat/channels")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(channels["channels"], json!([]));
    let channels: Value = get(&everything, "/api/chat/channels")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(channels["channels"], json!(["secret", "support"]));
    let response = app
        .http
        .post(app.url("/api/chat/message"))
        .bearer_auth(&limited)
        .json(&json!({"content": "x", "channel": "secret"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let protocols = format!("chatgate.v1, bearer.{limited}");
    let header = [("sec-websocket-protocol", protocols.as_str())];
    assert_eq!(
        upgrade(&app, "channel=secret", &header).await.err(),
        Some(403)
    );
    assert!(upgrade(&app, "channel=support", &header).await.is_ok());
}

// ---------------------------------------------------------------------------------------
// WebSocket (cases 15, 16, 18)

#[tokio::test]
async fn websocket_upgrades_need_a_token_and_never_echo_it() {
    let (jwks, app) = standard_app().await;
    let token = kit().es256.sign(&claims("alice"));
    // No token: 401 and no 101.
    assert_eq!(upgrade(&app, "channel=general", &[]).await.err(), Some(401));
    let bad = format!("chatgate.v1, bearer.{}", kit().rogue.sign(&claims("alice")));
    assert_eq!(
        upgrade(&app, "channel=general", &[("sec-websocket-protocol", &bad)])
            .await
            .err(),
        Some(401)
    );
    // Token as a subprotocol: 101, and only chatgate.v1 comes back.
    let protocols = format!("chatgate.v1, bearer.{token}");
    let (socket, selected) = upgrade(
        &app,
        "channel=general",
        &[("sec-websocket-protocol", &protocols)],
    )
    .await
    .unwrap();
    assert_eq!(selected.as_deref(), Some("chatgate.v1"));
    drop(socket);
    // Token in the query, and in the Authorization header.
    assert!(
        upgrade(&app, &format!("channel=general&access_token={token}"), &[])
            .await
            .is_ok()
    );
    let auth = format!("Bearer {token}");
    let (_socket, selected) = upgrade(&app, "channel=general", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(selected, None, "nothing offered, nothing selected");
    // The query form can be switched off.
    let strict = jwks_app(&jwks, &[("CHATGATE_AUTH__QUERY_TOKEN_PARAM", "")]).await;
    assert_eq!(
        upgrade(
            &strict,
            &format!("channel=general&access_token={token}"),
            &[]
        )
        .await
        .err(),
        Some(401)
    );
}

#[tokio::test]
async fn foreign_origins_are_refused_before_the_upgrade() {
    let (jwks, app) = standard_app().await;
    let token = kit().es256.sign(&claims("alice"));
    let auth = format!("Bearer {token}");
    let host = format!("127.0.0.1:{}", app.port);
    for origin in [
        "https://evil.test",
        "https://app.example.com.evil.test",
        "https://evilapp.example.com",
        "http://app.example.com",
        "null",
    ] {
        let result = upgrade(
            &app,
            "channel=general",
            &[("authorization", &auth), ("origin", origin)],
        )
        .await;
        assert_eq!(result.err(), Some(403), "{origin}");
    }
    // The listed origin, the page's own origin (Origin matches Host), and no Origin at all
    // (a non-browser client) are allowed by default.
    let same = format!("http://{host}");
    for origin in [Some("https://app.example.com"), Some(same.as_str()), None] {
        let mut headers = vec![("authorization", auth.as_str())];
        if let Some(origin) = origin {
            headers.push(("origin", origin));
        }
        assert!(
            upgrade(&app, "channel=general", &headers).await.is_ok(),
            "{origin:?}"
        );
    }
    // Both switches off: only the list.
    let strict = jwks_app(
        &jwks,
        &[
            ("CHATGATE_CORS__ALLOW_SAME_ORIGIN", "false"),
            ("CHATGATE_CORS__ALLOW_MISSING_ORIGIN", "false"),
        ],
    )
    .await;
    let same = format!("http://127.0.0.1:{}", strict.port);
    assert_eq!(
        upgrade(
            &strict,
            "channel=general",
            &[("authorization", &auth), ("origin", &same)]
        )
        .await
        .err(),
        Some(403)
    );
    assert_eq!(
        upgrade(&strict, "channel=general", &[("authorization", &auth)])
            .await
            .err(),
        Some(403)
    );
}

#[tokio::test]
async fn a_session_ends_when_its_token_expires() {
    let (_jwks, app) = standard_app().await;
    // Expired but inside the leeway: REST accepts it, the WebSocket does not open a
    // session that would end at once.
    let stale = kit()
        .es256
        .sign(&with(claims("alice"), "exp", json!(now() - 3)));
    assert_eq!(rest_status(&app, &stale).await, 200);
    let protocols = format!("chatgate.v1, bearer.{stale}");
    assert_eq!(
        upgrade(
            &app,
            "channel=general",
            &[("sec-websocket-protocol", &protocols)]
        )
        .await
        .err(),
        Some(401)
    );
    let token = kit()
        .es256
        .sign(&with(claims("alice"), "exp", json!(now() + 2)));
    let protocols = format!("chatgate.v1, bearer.{token}");
    let (mut socket, _) = upgrade(
        &app,
        "channel=general",
        &[("sec-websocket-protocol", &protocols)],
    )
    .await
    .unwrap();
    let frame = next_of(&mut socket, "error").await;
    assert_eq!(frame["code"], "token_expired");
    let close = loop {
        match tokio::time::timeout(WAIT, socket.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.unwrap().code), 1008);
}

/// The next frame of `kind` (skipping others), within the wait.
async fn next_of(socket: &mut Socket, kind: &str) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a frame within the wait")
            .expect("socket open")
            .expect("no socket error");
        if let Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == kind {
                return frame;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// CORS and HTTP hygiene (cases 25-27)

#[tokio::test]
async fn cors_answers_only_listed_origins() {
    let (jwks, app) = standard_app().await;
    let preflight = |app: &TestApp, origin: &str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/api/chat/message"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let response = preflight(&app, "https://app.example.com").await.unwrap();
    let headers = response.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(
        headers.get_all("vary").iter().any(|v| v
            .to_str()
            .unwrap()
            .to_lowercase()
            .contains("origin"))
    );
    assert!(headers.get("access-control-allow-credentials").is_none());
    for evil in [
        "https://app.example.com.evil.test",
        "https://evilapp.example.com",
        "http://app.example.com",
        "https://app.example.com:8443",
        "null",
    ] {
        let response = preflight(&app, evil).await.unwrap();
        assert!(
            response
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
            "{evil}"
        );
    }
    // Credentials only when configured, and then only for the listed origin.
    let with_credentials = jwks_app(&jwks, &[("CHATGATE_CORS__ALLOW_CREDENTIALS", "true")]).await;
    let response = preflight(&with_credentials, "https://app.example.com")
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-credentials"],
        "true"
    );
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    // A simple request from an allowed origin also gets the exact origin back.
    let response = app
        .http
        .get(app.url("/healthz"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
}

/// Sends raw bytes and reads the response head (for bodies reqwest cannot produce).
async fn raw(port: u16, parts: &[&[u8]], pause_after_first: bool) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    for (i, part) in parts.iter().enumerate() {
        stream.write_all(part).await.unwrap();
        if i == 0 && pause_after_first {
            // Leave the body unfinished: the server's timeout must answer.
            break;
        }
    }
    let mut buffer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buffer))
        .await
        .expect("a response within the wait")
        .unwrap();
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

#[tokio::test]
async fn bodies_are_bounded_and_compressed_bodies_refused() {
    let app = TestApp::spawn(
        None,
        &[
            ("CHATGATE_SERVER__MAX_BODY_BYTES", "8192"),
            ("CHATGATE_CHAT__MAX_IMAGE_BYTES", "3000"),
            ("CHATGATE_CHAT__MAX_AUDIO_BYTES", "3000"),
            ("CHATGATE_CHAT__MAX_TEXT_BYTES", "1024"),
            ("CHATGATE_SERVER__REQUEST_TIMEOUT_SECS", "1"),
        ],
    )
    .await;
    // Declared too large.
    let big = json!({"sender": "a", "content": "x".repeat(10_000)}).to_string();
    let response = app
        .http
        .post(app.url("/api/chat/message"))
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    // Chunked, no length: still 413.
    let head = b"POST /api/chat/message HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    let chunk = format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len());
    let response = raw(app.port, &[head, chunk.as_bytes()], false).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    // gzip-encoded: 415.
    let response = app
        .http
        .post(app.url("/api/chat/message"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(vec![0x1f, 0x8b, 0x08, 0x00])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    // A body that trickles and never completes: the request timeout answers 408.
    let head = b"POST /api/chat/message HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"sender\":";
    let response = raw(app.port, &[head], true).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
}

async fn boom() -> &'static str {
    panic!("boom")
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_and_the_server_keeps_serving() {
    let config = crate::helpers::test_config(None, &[]);
    let router = Router::new()
        .route("/boom", get(boom))
        .route("/fine", get(|| async { "fine" }));
    let router = chatgate::http::middleware::apply(router, &config, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let http = crate::helpers::http_client();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let response = http.get(url("/boom")).send().await.unwrap();
    assert_eq!(response.status(), 500);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["detail"], "Internal server error");
    assert!(
        !body.to_string().contains("boom"),
        "no panic text in the body"
    );
    assert_eq!(http.get(url("/fine")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn api_responses_carry_security_headers() {
    let (_jwks, app) = standard_app().await;
    let token = kit().es256.sign(&claims("alice"));
    for response in [
        app.http
            .get(app.url("/api/chat/channels"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
        app.http
            .get(app.url("/api/chat/channels"))
            .send()
            .await
            .unwrap(),
    ] {
        let headers = response.headers();
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["cache-control"], "no-store");
        assert!(headers.contains_key("x-request-id"));
    }
    // A client's request id is returned as given.
    let response = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "trace-me-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-123");
}

#[tokio::test]
async fn tokens_and_secrets_never_reach_the_logs() {
    let log = std::env::temp_dir().join(format!("chatgate-log-{}.txt", uuid::Uuid::new_v4()));
    let vars: Vec<(String, String)> = [
        ("RUST_LOG", "debug"),
        ("CHATGATE_LOG__FORMAT", "json"),
        ("CHATGATE_STORE__BACKEND", "memory"),
        ("CHATGATE_AUTH__ALGORITHMS", "HS256"),
        ("CHATGATE_AUTH__HMAC_SECRET", HMAC_SECRET),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut process = crate::helpers::Process::start(false, &vars, Some(&log)).await;
    let port = process.port;
    let signer = hmac_signer(HMAC_SECRET.as_bytes());
    let good = signer.sign(&without(without(claims("alice"), "iss"), "aud"));
    let expired = signer.sign(&with(
        without(without(claims("alice"), "iss"), "aud"),
        "exp",
        json!(now() - 3600),
    ));
    let http = crate::helpers::http_client();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    // Accepted and refused tokens, in the header and in the query string.
    for token in [&good, &expired] {
        let _ = http
            .get(url("/api/chat/channels"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let _ = http
            .get(url(&format!(
                "/api/chat/history/general?access_token={token}"
            )))
            .send()
            .await
            .unwrap();
        let _ = http
            .post(url("/api/chat/message"))
            .bearer_auth(token)
            .json(&json!({"content": "hello"}))
            .send()
            .await
            .unwrap();
        for query in [format!("channel=general&access_token={token}")] {
            let request = format!("ws://127.0.0.1:{port}/ws/chat?{query}")
                .into_client_request()
                .unwrap();
            if let Ok((mut socket, _)) = tokio_tungstenite::connect_async(request).await {
                let _ = socket.close(None).await;
            }
        }
        let mut request = format!("ws://127.0.0.1:{port}/ws/chat?channel=general")
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            format!("chatgate.v1, bearer.{token}").parse().unwrap(),
        );
        if let Ok((mut socket, _)) = tokio_tungstenite::connect_async(request).await {
            let _ = socket.close(None).await;
        }
    }
    process.signal("TERM");
    process.wait_exit().await;
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::remove_file(&log).unwrap();
    assert!(
        text.contains("authentication failed"),
        "refusals are logged:\n{text}"
    );
    for secret in [good.as_str(), expired.as_str(), HMAC_SECRET] {
        // Any of the three parts would be a leak; the signature is the sensitive one.
        let signature = secret.rsplit('.').next().unwrap();
        assert!(
            !text.contains(signature),
            "a token or secret reached the logs"
        );
    }
}
