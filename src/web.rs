//! The browser chat client, embedded in the binary and served at `/app/`.
//!
//! Three static files from `web/` (no build step, no third-party code) plus
//! `/app/config.json`, which tells the page whether to ask for a bearer token (auth on)
//! or a username (auth off, dev mode). The page talks to the same REST API and WebSocket
//! as any other client; nothing here reads state, so the router is generic over it.
//!
//! Every response carries `Cache-Control: no-cache` (the files change with the binary and
//! have no versioned names). The HTML page carries its own Content-Security-Policy, which
//! the middleware's default (`default-src 'none'`) would otherwise replace: scripts, styles
//! and connections from this origin only, images and audio also from `data:` URLs (chat
//! media), and no inline script or style, so injected markup could not run even if the
//! client ever inserted it.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// The page's policy. In CSP Level 3, `connect-src 'self'` also matches the page's own
/// origin with `ws:`/`wss:`, so the WebSocket needs no extra source (tests/e2e opens it
/// from the page in Chromium under this policy).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; media-src 'self' data:; connect-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Revalidate on every load: the files have fixed names, and a stale script after an
/// upgrade would speak an older protocol.
const NO_CACHE: &str = "no-cache";

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const APP_CSS: &str = include_str!("../web/app.css");

/// Routes of the web client. `auth_enabled` tells the page whether to ask for a token.
pub fn router<S: Clone + Send + Sync + 'static>(auth_enabled: bool) -> Router<S> {
    let config = if auth_enabled {
        r#"{"auth":true}"#
    } else {
        r#"{"auth":false}"#
    };
    Router::new()
        .route("/app", get(redirect_to_app))
        .route("/app/", get(index_html))
        .route("/app/app.js", get(app_js))
        .route("/app/app.css", get(app_css))
        .route(
            "/app/config.json",
            get(move || async move { asset("application/json", config) }),
        )
}

/// `/app` → `/app/`, so the page's relative URLs resolve under `/app/`.
async fn redirect_to_app() -> Redirect {
    Redirect::permanent("/app/")
}

async fn index_html() -> Response {
    let mut response = asset("text/html; charset=utf-8", INDEX_HTML);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    // The page never needs to tell other sites where it was loaded from.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, HeaderValue); 2] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static(NO_CACHE)),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::{Body, to_bytes};
    use axum::http::{Method, Request, StatusCode, header};
    use tower::ServiceExt;

    use super::*;

    async fn get(auth: bool, path: &str) -> Response {
        router::<()>(auth)
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    fn header_str(response: &Response, name: header::HeaderName) -> &str {
        response
            .headers()
            .get(&name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }

    async fn body(response: Response) -> String {
        let bytes = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn app_without_slash_redirects() {
        let response = get(false, "/app").await;
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(header_str(&response, header::LOCATION), "/app/");
    }

    #[tokio::test]
    async fn page_has_strict_csp_and_no_cache() {
        let response = get(false, "/app/").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header_str(&response, header::CONTENT_TYPE),
            "text/html; charset=utf-8"
        );
        assert_eq!(header_str(&response, header::CACHE_CONTROL), "no-cache");
        let csp = header_str(&response, header::CONTENT_SECURITY_POLICY);
        assert_eq!(csp, CONTENT_SECURITY_POLICY);
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{csp} lacks {directive}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        let html = body(response).await;
        assert!(html.contains(r#"src="/app/app.js""#), "{html}");
        assert!(html.contains(r#"href="/app/app.css""#), "{html}");
    }

    #[tokio::test]
    async fn page_has_no_inline_script_or_style() {
        let html = body(get(false, "/app/").await).await;
        // Every <script> loads a file; no style element or attribute, no event handler.
        assert_eq!(
            html.matches("<script").count(),
            html.matches("<script type=\"module\" src=").count(),
            "{html}"
        );
        for forbidden in ["<style", "style=", " onclick", " onload", "javascript:"] {
            assert!(!html.contains(forbidden), "page contains {forbidden}");
        }
    }

    #[tokio::test]
    async fn script_and_style_have_their_types() {
        let js = get(false, "/app/app.js").await;
        assert_eq!(js.status(), StatusCode::OK);
        assert_eq!(
            header_str(&js, header::CONTENT_TYPE),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(header_str(&js, header::CACHE_CONTROL), "no-cache");
        assert!(body(js).await.contains("WebSocket"));

        let css = get(false, "/app/app.css").await;
        assert_eq!(css.status(), StatusCode::OK);
        assert_eq!(
            header_str(&css, header::CONTENT_TYPE),
            "text/css; charset=utf-8"
        );
        assert_eq!(header_str(&css, header::CACHE_CONTROL), "no-cache");
    }

    #[tokio::test]
    async fn config_reports_auth() {
        for auth in [false, true] {
            let response = get(auth, "/app/config.json").await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                header_str(&response, header::CONTENT_TYPE),
                "application/json"
            );
            assert_eq!(header_str(&response, header::CACHE_CONTROL), "no-cache");
            let json: serde_json::Value = serde_json::from_str(&body(response).await).unwrap();
            assert_eq!(json, serde_json::json!({ "auth": auth }));
        }
    }

    #[tokio::test]
    async fn head_works_and_unknown_files_are_404() {
        let response = router::<()>(false)
            .oneshot(
                Request::builder()
                    .method(Method::HEAD)
                    .uri("/app/")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response
                .headers()
                .contains_key(header::CONTENT_SECURITY_POLICY)
        );
        assert_eq!(
            get(false, "/app/other.js").await.status(),
            StatusCode::NOT_FOUND
        );
    }
}
