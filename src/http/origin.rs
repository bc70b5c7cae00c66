//! Origins: one normalized form for the CORS allow-list and the WebSocket Origin check.
//!
//! CORS only stops a browser from *reading* responses; it does not apply to WebSocket
//! upgrades at all. A page on any site can open a WebSocket to chatgate, so the upgrade
//! checks `Origin` itself (cross-site WebSocket hijacking, CWE-1385).

use std::collections::HashSet;

use axum::http::{HeaderMap, header};

use crate::config::CorsConfig;

/// `scheme://host[:port]` lowercased, without a default port (`:80` for http, `:443` for
/// https) or a trailing slash; `None` for anything else (paths, credentials, `null`).
pub fn normalize(origin: &str) -> Option<String> {
    let origin = origin.trim().trim_end_matches('/');
    let (scheme, authority) = origin.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return None,
    };
    if authority.is_empty()
        || authority.chars().any(|c| {
            matches!(c, '/' | '@' | '?' | '#' | '\\') || c.is_whitespace() || c.is_control()
        })
    {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let authority = authority.strip_suffix(default_port).unwrap_or(&authority);
    Some(format!("{scheme}://{authority}"))
}

/// The WebSocket Origin rule, from `[cors]` config.
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    /// `--dev`: any origin, as the original.
    any: bool,
    allowed: HashSet<String>,
    same_origin: bool,
    missing: bool,
}

impl OriginPolicy {
    pub fn new(config: &CorsConfig, dev: bool) -> Self {
        Self {
            any: dev,
            allowed: config
                .allowed_origins
                .iter()
                .filter_map(|o| normalize(o))
                .collect(),
            same_origin: config.allow_same_origin,
            missing: config.allow_missing_origin,
        }
    }

    /// The allow-list, normalized (for the CORS layer).
    pub fn allowed(&self) -> impl Iterator<Item = &str> {
        self.allowed.iter().map(String::as_str)
    }

    /// Whether an upgrade with these headers may proceed.
    ///
    /// # Errors
    /// A reason, safe to show the client.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        if self.any {
            return Ok(());
        }
        let mut origins = headers.get_all(header::ORIGIN).iter();
        let Some(origin) = origins.next() else {
            return if self.missing {
                Ok(())
            } else {
                Err("an Origin header is required")
            };
        };
        if origins.next().is_some() {
            return Err("several Origin headers");
        }
        let origin = origin
            .to_str()
            .ok()
            .and_then(normalize)
            .ok_or("origin not allowed")?;
        if self.allowed.contains(&origin) {
            return Ok(());
        }
        if self.same_origin
            && let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok())
            && let Some((scheme, _)) = origin.split_once("://")
            && normalize(&format!("{scheme}://{host}")).as_deref() == Some(origin.as_str())
        {
            return Ok(());
        }
        Err("origin not allowed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn policy(origins: &[&str], same_origin: bool, missing: bool) -> OriginPolicy {
        OriginPolicy::new(
            &CorsConfig {
                allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
                allow_credentials: false,
                allow_same_origin: same_origin,
                allow_missing_origin: missing,
            },
            false,
        )
    }

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(origin) = origin {
            map.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        map
    }

    #[test]
    fn normalization() {
        assert_eq!(
            normalize("HTTPS://App.Example.com:443/").as_deref(),
            Some("https://app.example.com")
        );
        assert_eq!(normalize("http://x:80").as_deref(), Some("http://x"));
        assert_eq!(normalize("http://x:8080").as_deref(), Some("http://x:8080"));
        assert_eq!(normalize("https://x:80").as_deref(), Some("https://x:80"));
        for bad in [
            "null",
            "*",
            "ftp://x",
            "https://x/path",
            "https://u@x",
            "https://",
            "x.com",
        ] {
            assert_eq!(normalize(bad), None, "{bad}");
        }
    }

    #[test]
    fn exact_origins_only() {
        let p = policy(&["https://app.example.com"], false, false);
        let host = "chat.example.com";
        assert!(
            p.check(&headers(Some("https://app.example.com"), host))
                .is_ok()
        );
        assert!(
            p.check(&headers(Some("https://APP.example.com:443"), host))
                .is_ok()
        );
        for evil in [
            "https://evil.test",
            "https://app.example.com.evil.test",
            "https://evilapp.example.com",
            "http://app.example.com",
            "https://app.example.com:8443",
            "null",
        ] {
            assert!(p.check(&headers(Some(evil), host)).is_err(), "{evil}");
        }
    }

    #[test]
    fn same_origin_and_missing_origin_are_switches() {
        let on = policy(&[], true, true);
        let off = policy(&[], false, false);
        let same = headers(Some("http://127.0.0.1:8000"), "127.0.0.1:8000");
        assert!(on.check(&same).is_ok());
        assert!(off.check(&same).is_err());
        let https_same = headers(Some("https://chat.example.com"), "chat.example.com");
        assert!(on.check(&https_same).is_ok());
        let other_port = headers(Some("http://127.0.0.1:9000"), "127.0.0.1:8000");
        assert!(on.check(&other_port).is_err());
        let missing = headers(None, "127.0.0.1:8000");
        assert!(on.check(&missing).is_ok());
        assert!(off.check(&missing).is_err());
    }

    #[test]
    fn dev_allows_anything() {
        let p = OriginPolicy::new(
            &CorsConfig {
                allowed_origins: vec![],
                allow_credentials: false,
                allow_same_origin: false,
                allow_missing_origin: false,
            },
            true,
        );
        assert!(p.check(&headers(Some("https://evil.test"), "x")).is_ok());
    }
}
