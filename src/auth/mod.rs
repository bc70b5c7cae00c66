//! Bearer-token authentication: who is calling, from a JWT only.
//!
//! [`Authenticator::verify`] checks a token in this order, refusing at the first failure:
//! size and shape (three base64url parts, at most [`MAX_TOKEN_BYTES`]); the header (an
//! algorithm from `auth.algorithms`, no `crit`, a sane `kid`; `jku`, `x5u`, `x5c` and
//! embedded `jwk` are ignored); a key for that algorithm and kid; the signature; `exp`
//! (required), `nbf`, `iss` and `aud` (when configured) with `auth.leeway_secs` of skew;
//! the lifetime cap; then the identity claims. The username comes from the token alone
//! and passes the same rules as a dev-mode username.

pub mod keys;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat::model::{ChannelName, Username};
use crate::config::AuthConfig;
use keys::{Jwks, JwksSettings, PublicKey};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// Longest `kid` accepted, in bytes.
const MAX_KID_BYTES: usize = 256;
/// The WebSocket subprotocol a client offers beside its token; the server selects it.
pub const SUBPROTOCOL: &str = "chatgate.v1";
/// Prefix of the subprotocol entry that carries a token: `bearer.<jwt>`.
pub const SUBPROTOCOL_TOKEN_PREFIX: &str = "bearer.";

/// `auth.algorithms` names, as in JWT headers.
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    name.parse::<Algorithm>().ok()
}

pub fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// Which channels a user may join and post to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelAccess {
    All,
    Only(HashSet<String>),
}

/// A verified caller.
#[derive(Debug, Clone)]
pub struct Identity {
    pub username: Username,
    pub roles: Vec<String>,
    /// Holds one of `auth.admin_roles`: may delete any message.
    pub admin: bool,
    pub channels: ChannelAccess,
    /// `exp`, seconds since the epoch.
    pub expires_at: u64,
}

impl Identity {
    pub fn may_use(&self, channel: &ChannelName) -> bool {
        match &self.channels {
            ChannelAccess::All => true,
            ChannelAccess::Only(set) => set.contains(channel.as_str()),
        }
    }

    /// Time left before the token expires (zero if it already has).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.expires_at.saturating_sub(unix_now()))
    }
}

/// Why a request is not authenticated. Every variant is a 401 except
/// [`AuthError::KeysUnavailable`] (503: the issuer's keys were never loaded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token at all.
    #[error("a bearer token is required")]
    Missing,
    /// Tokens in several places that differ, or several Authorization headers.
    #[error("{0}")]
    InvalidRequest(&'static str),
    /// The token is malformed, forged, expired or otherwise unacceptable. The reason is
    /// safe to show: it never includes the token or key material.
    #[error("{0}")]
    InvalidToken(&'static str),
    #[error("the issuer's signing keys are not loaded yet")]
    KeysUnavailable,
}

impl AuthError {
    /// The `WWW-Authenticate` challenge for this failure (RFC 6750).
    pub fn challenge(&self) -> HeaderValue {
        let value = match self {
            Self::Missing | Self::KeysUnavailable => "Bearer realm=\"chatgate\"".to_string(),
            Self::InvalidRequest(why) => {
                format!(
                    "Bearer realm=\"chatgate\", error=\"invalid_request\", error_description=\"{why}\""
                )
            }
            Self::InvalidToken(why) => {
                format!(
                    "Bearer realm=\"chatgate\", error=\"invalid_token\", error_description=\"{why}\""
                )
            }
        };
        HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("Bearer"))
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidToken(_) => "invalid_token",
            Self::KeysUnavailable => "auth_unavailable",
        }
    }
}

fn invalid(why: &'static str) -> AuthError {
    AuthError::InvalidToken(why)
}

/// Where tokens may come from on one request.
#[derive(Debug, Clone, Copy)]
pub enum Surface {
    /// REST: the Authorization header only.
    Rest,
    /// A WebSocket upgrade: also `Sec-WebSocket-Protocol` and the query parameter.
    WebSocket,
}

pub struct Authenticator {
    allowed: Vec<Algorithm>,
    hmac: Option<DecodingKey>,
    pem_keys: Vec<PublicKey>,
    jwks: Option<Arc<Jwks>>,
    issuer: Option<String>,
    audience: Vec<String>,
    leeway: u64,
    max_lifetime: u64,
    username_claim: String,
    roles_claim: String,
    admin_roles: Vec<String>,
    channels_claim: String,
    query_param: String,
}

impl Authenticator {
    /// Loads keys; with a JWKS URL, fetches it once (a failure is logged and retried in
    /// the background: until it succeeds, tokens get 503 and `/readyz` says so) and
    /// keeps it fresh on `tasks` until `stop`.
    ///
    /// # Errors
    /// A PEM file that cannot be used, or no HTTP client for the JWKS.
    pub async fn start(
        config: &AuthConfig,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Self, String> {
        let allowed: Vec<Algorithm> = config
            .algorithms
            .iter()
            .filter_map(|a| parse_algorithm(a))
            .collect();
        let hmac = allowed
            .iter()
            .any(|a| is_hmac(*a))
            .then(|| DecodingKey::from_secret(config.hmac_secret.expose().as_bytes()));
        let pem_keys = keys::load_pem_files(&config.public_key_files)?;
        let jwks = if config.jwks_url.is_empty() {
            None
        } else {
            let jwks = Arc::new(Jwks::new(
                JwksSettings {
                    url: config.jwks_url.clone(),
                    refresh: Duration::from_secs(config.jwks_refresh_secs),
                    min_refetch: Duration::from_secs(config.jwks_min_refetch_secs),
                    timeout: Duration::from_millis(config.jwks_timeout_ms),
                },
                tasks.clone(),
            )?);
            jwks.refresh().await;
            tasks.spawn(jwks.clone().keep_fresh(stop));
            Some(jwks)
        };
        Ok(Self {
            allowed,
            hmac,
            pem_keys,
            jwks,
            issuer: (!config.issuer.is_empty()).then(|| config.issuer.clone()),
            audience: config.audience.clone(),
            leeway: config.leeway_secs,
            max_lifetime: config.max_token_lifetime_secs,
            username_claim: config.username_claim.clone(),
            roles_claim: config.roles_claim.clone(),
            admin_roles: config.admin_roles.clone(),
            channels_claim: config.channels_claim.clone(),
            query_param: config.query_token_param.clone(),
        })
    }

    /// Whether tokens can be verified now (false while a JWKS-only setup has no keys).
    pub fn is_ready(&self) -> bool {
        self.hmac.is_some()
            || !self.pem_keys.is_empty()
            || self.jwks.as_ref().is_some_and(|j| j.is_loaded())
    }

    /// JWKS fetches so far (0 without a JWKS URL).
    pub fn jwks_fetches(&self) -> u64 {
        self.jwks.as_ref().map_or(0, |j| j.fetch_count())
    }

    /// The token of a request. Several places holding different tokens are refused
    /// (a proxy and a client disagreeing about who is calling is never resolved by
    /// guessing); the same token in several places is fine. On REST a token in the query
    /// string is refused outright: it would end up in access logs and browser history.
    ///
    /// # Errors
    /// [`AuthError::Missing`] or [`AuthError::InvalidRequest`].
    pub fn token<'a>(
        &self,
        headers: &'a HeaderMap,
        query: Option<&'a str>,
        surface: Surface,
    ) -> Result<String, AuthError> {
        let mut found: Vec<String> = Vec::new();
        let mut authorization = headers.get_all(header::AUTHORIZATION).iter();
        if let Some(value) = authorization.next() {
            if authorization.next().is_some() {
                return Err(AuthError::InvalidRequest("several Authorization headers"));
            }
            let value = value
                .to_str()
                .map_err(|_| invalid("the Authorization header is not ASCII"))?;
            let token = value
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim())
                .ok_or(AuthError::InvalidRequest(
                    "the Authorization header must be: Bearer <token>",
                ))?;
            found.push(token.to_string());
        }
        let query_tokens: Vec<String> = match query {
            Some(query) if !self.query_param.is_empty() => form_urlencoded::parse(query.as_bytes())
                .filter(|(k, _)| *k == self.query_param)
                .map(|(_, v)| v.into_owned())
                .collect(),
            _ => Vec::new(),
        };
        if matches!(surface, Surface::Rest) && !query_tokens.is_empty() {
            return Err(AuthError::InvalidRequest(
                "tokens in the query string are accepted only on the WebSocket upgrade",
            ));
        }
        if matches!(surface, Surface::WebSocket) {
            found.extend(query_tokens);
            for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
                let Ok(value) = value.to_str() else { continue };
                found.extend(
                    value
                        .split(',')
                        .filter_map(|p| p.trim().strip_prefix(SUBPROTOCOL_TOKEN_PREFIX))
                        .map(str::to_string),
                );
            }
        }
        let first = found.first().cloned().ok_or(AuthError::Missing)?;
        if found.iter().any(|t| *t != first) {
            return Err(AuthError::InvalidRequest("several different tokens"));
        }
        Ok(first)
    }

    /// Verifies `token` and returns who it names.
    ///
    /// # Errors
    /// [`AuthError::InvalidToken`] with the reason, or [`AuthError::KeysUnavailable`].
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("token too long"));
        }
        let mut parts = token.split('.');
        let (Some(head), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not a JWT (three base64url parts)"));
        };
        let (alg, kid) = self.check_header(head)?;
        let validation = self.validation(alg);
        let claims = self
            .verify_signature(token, alg, kid.as_deref(), &validation)
            .await?;
        self.identity(&claims)
    }

    /// Reads the header ourselves, before the library does, to enforce what it does
    /// not: `crit` refused, the algorithm allow-list, a bounded plain `kid`.
    fn check_header(&self, head: &str) -> Result<(Algorithm, Option<String>), AuthError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(head)
            .map_err(|_| invalid("the header is not base64url"))?;
        let header: Map<String, Value> = serde_json::from_slice(&bytes)
            .map_err(|_| invalid("the header is not a JSON object"))?;
        if header.contains_key("crit") {
            return Err(invalid(
                "critical header extensions (crit) are not supported",
            ));
        }
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .and_then(|name| name.parse::<Algorithm>().ok())
            .filter(|alg| self.allowed.contains(alg))
            .ok_or(invalid("algorithm not allowed"))?;
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(kid))
                if !kid.is_empty()
                    && kid.len() <= MAX_KID_BYTES
                    && kid.chars().all(|c| c.is_ascii_graphic()) =>
            {
                Some(kid.clone())
            }
            Some(_) => return Err(invalid("unusable kid")),
        };
        Ok((alg, kid))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if self.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audience);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    async fn verify_signature(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
        validation: &Validation,
    ) -> Result<Map<String, Value>, AuthError> {
        let decode =
            |key: &DecodingKey| jsonwebtoken::decode::<Map<String, Value>>(token, key, validation);
        if is_hmac(alg) {
            let key = self.hmac.as_ref().ok_or(invalid("algorithm not allowed"))?;
            return decode(key).map(|t| t.claims).map_err(reason);
        }
        // Candidates: the JWKS key with this kid (refetching once on a miss), else every
        // key that may sign with this algorithm.
        let mut candidates: Vec<PublicKey> = Vec::new();
        if let Some(jwks) = &self.jwks {
            let set = jwks.current();
            match kid {
                Some(kid) => match set.by_kid.get(kid) {
                    Some(key) => candidates.push(key.clone()),
                    None => {
                        if let Some(key) = jwks.find_after_miss(kid).await {
                            candidates.push(key);
                        }
                    }
                },
                None => candidates.extend(set.without_kid.iter().cloned()),
            }
            if candidates.is_empty() && !jwks.is_loaded() && self.pem_keys.is_empty() {
                return Err(AuthError::KeysUnavailable);
            }
        }
        candidates.extend(self.pem_keys.iter().cloned());
        candidates.retain(|k| k.accepts(alg));
        if candidates.is_empty() {
            return Err(invalid("no key for this kid and algorithm"));
        }
        let mut last = invalid("invalid signature");
        for key in &candidates {
            match decode(&key.key) {
                Ok(data) => return Ok(data.claims),
                // Another key may still match; claim errors are final (the signature was good).
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidSignature
                            | ErrorKind::InvalidEcdsaKey
                            | ErrorKind::InvalidRsaKey(_)
                            | ErrorKind::InvalidEddsaKey
                            | ErrorKind::InvalidKeyFormat
                    ) =>
                {
                    last = reason(e);
                }
                Err(e) => return Err(reason(e)),
            }
        }
        Err(last)
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<Identity, AuthError> {
        let now = unix_now();
        let exp = claims
            .get("exp")
            .and_then(as_seconds)
            .ok_or(invalid("exp is not a number"))?;
        if exp.saturating_sub(now) > self.max_lifetime {
            return Err(invalid("token lifetime exceeds the allowed maximum"));
        }
        match claims.get("iat") {
            None => {}
            Some(iat) => {
                let iat = as_seconds(iat).ok_or(invalid("iat is not a number"))?;
                if exp.saturating_sub(iat) > self.max_lifetime {
                    return Err(invalid("token lifetime exceeds the allowed maximum"));
                }
                if iat > now + self.leeway {
                    return Err(invalid("token issued in the future"));
                }
            }
        }
        let username = claim(claims, &self.username_claim)
            .and_then(Value::as_str)
            .or_else(|| claims.get("sub").and_then(Value::as_str))
            .ok_or(invalid("no username claim"))?;
        let username = Username::parse(username)
            .map_err(|_| invalid("the username claim is not a valid username"))?;
        let roles = strings(claim(claims, &self.roles_claim));
        let admin = roles.iter().any(|r| self.admin_roles.contains(r));
        let channels = if self.channels_claim.is_empty() {
            ChannelAccess::All
        } else {
            match claim(claims, &self.channels_claim) {
                // Configured but absent (an identity-provider mapper that leaves empty
                // attributes out): no channel, rather than every channel.
                None => ChannelAccess::Only(HashSet::new()),
                Some(value) => {
                    let list = strings(Some(value));
                    if list.iter().any(|c| c == "*") {
                        ChannelAccess::All
                    } else {
                        ChannelAccess::Only(list.into_iter().collect())
                    }
                }
            }
        };
        Ok(Identity {
            username,
            roles,
            admin,
            channels,
            expires_at: exp,
        })
    }
}

/// A short, safe reason for a library error: never the token or key material.
fn reason(e: jsonwebtoken::errors::Error) -> AuthError {
    invalid(match e.kind() {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidSubject => "wrong subject",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing (exp, sub, iss or aud)",
        ErrorKind::InvalidClaimFormat(_) => "a claim has the wrong type",
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => "algorithm not allowed",
        ErrorKind::InvalidSignature => "invalid signature",
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => "invalid signature",
        ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidToken => "malformed token",
        _ => "invalid token",
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `exp`, `nbf` and `iat` may be integers or floats (RFC 7519 NumericDate).
fn as_seconds(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        _ => None,
    }
}

/// A claim by dotted path (`realm_access.roles`); a top-level claim whose own name has a
/// dot is found first.
fn claim<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return None;
    }
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    let mut parts = path.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

/// A list of strings, or one string (space-separated, as OAuth scopes are).
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_by_dotted_path() {
        let claims: Map<String, Value> = serde_json::from_str(
            r#"{"realm_access":{"roles":["a","b"]},"x.y":1,"scope":"read write"}"#,
        )
        .unwrap();
        assert_eq!(strings(claim(&claims, "realm_access.roles")), ["a", "b"]);
        assert_eq!(claim(&claims, "x.y"), Some(&Value::from(1)));
        assert_eq!(strings(claim(&claims, "scope")), ["read", "write"]);
        assert_eq!(claim(&claims, "realm_access.missing"), None);
        assert_eq!(claim(&claims, ""), None);
    }

    #[test]
    fn numeric_dates() {
        assert_eq!(as_seconds(&serde_json::json!(10)), Some(10));
        assert_eq!(as_seconds(&serde_json::json!(10.7)), Some(10));
        assert_eq!(as_seconds(&serde_json::json!("10")), None);
        assert_eq!(as_seconds(&serde_json::json!(-1)), None);
    }

    #[test]
    fn algorithm_names() {
        assert_eq!(parse_algorithm("ES256"), Some(Algorithm::ES256));
        assert_eq!(parse_algorithm("EdDSA"), Some(Algorithm::EdDSA));
        assert_eq!(parse_algorithm("none"), None);
        assert!(is_hmac(Algorithm::HS384));
        assert!(!is_hmac(Algorithm::PS256));
    }
}
