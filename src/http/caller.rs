//! Who is calling a REST endpoint: the [`Caller`] extractor.
//!
//! With auth on, every `/api/` handler takes a `Caller` as its first extractor, so a
//! request without a valid bearer token is answered 401 before anything else is looked
//! at. With auth off (`--dev`, or `auth.enabled = false` behind an authenticating proxy)
//! the caller is anonymous and the original's rules apply: the body names the sender.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::auth::{Identity, Surface};
use crate::chat::model::{ChannelName, Username, ValidationError};
use crate::error::{ApiError, AppResult};
use crate::http::client_ip::ClientIp;
use crate::state::AppState;

pub enum Caller {
    Anonymous,
    User(Identity),
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> AppResult<Self> {
        let Some(auth) = &state.auth else {
            return Ok(Self::Anonymous);
        };
        let verified = match auth.token(&parts.headers, parts.uri.query(), Surface::Rest) {
            Ok(token) => auth.verify(&token).await,
            Err(e) => Err(e),
        };
        match verified {
            Ok(identity) => {
                tracing::Span::current().record("user", identity.username.as_str());
                Ok(Self::User(identity))
            }
            Err(e) => {
                let client_ip = parts.extensions.get::<ClientIp>().map(|ip| ip.0);
                tracing::warn!(reason = %e, code = e.code(), client_ip = ?client_ip, "authentication failed");
                crate::metrics::auth_rejected(e.code());
                Err(ApiError::Unauthorized(e))
            }
        }
    }
}

impl Caller {
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Self::Anonymous => None,
            Self::User(identity) => Some(identity),
        }
    }

    /// 403 unless the token allows this channel.
    pub fn check_channel(&self, channel: &ChannelName) -> AppResult<()> {
        match self.identity() {
            Some(identity) if !identity.may_use(channel) => Err(ApiError::forbidden(
                "channel_forbidden",
                format!("your token does not allow channel {channel}"),
            )),
            _ => Ok(()),
        }
    }

    /// The sender of a message: the token's user (a `sender` naming anyone else is
    /// refused with 403), or, when anonymous, the `sender` given.
    pub fn sender(&self, claimed: Option<&str>) -> AppResult<Username> {
        claimed_user(self.identity(), claimed).map_err(|e| match e {
            ClaimedUser::Mismatch => ApiError::forbidden(
                "sender_mismatch",
                "sender must be the token's user (or be left out)",
            ),
            ClaimedUser::Invalid(e) => ApiError::Unprocessable {
                code: e.code,
                detail: e.detail,
            },
            ClaimedUser::Missing => ApiError::bad_request(
                "invalid_request",
                "Invalid request format: missing field `sender`",
            ),
        })
    }
}

/// Why a claimed username (a WebSocket `username` parameter, a REST `sender`) was not
/// accepted.
pub enum ClaimedUser {
    /// Authenticated, and the claim names someone else.
    Mismatch,
    /// Anonymous, and no name was given.
    Missing,
    /// Anonymous, and the name breaks the username rule.
    Invalid(ValidationError),
}

/// The user a request acts as: the token's, which a claimed name may repeat but never
/// change; or, without authentication, the claimed name (the original's behaviour).
///
/// # Errors
/// See [`ClaimedUser`].
pub fn claimed_user(
    identity: Option<&Identity>,
    claimed: Option<&str>,
) -> Result<Username, ClaimedUser> {
    match (identity, claimed) {
        (Some(identity), Some(claimed)) if claimed != identity.username.as_str() => {
            Err(ClaimedUser::Mismatch)
        }
        (Some(identity), _) => Ok(identity.username.clone()),
        (None, Some(claimed)) => Username::parse(claimed).map_err(ClaimedUser::Invalid),
        (None, None) => Err(ClaimedUser::Missing),
    }
}
