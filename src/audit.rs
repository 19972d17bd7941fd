//! Audit: the security events, one structured line each on their own tracing target,
//! `keycard::audit`, apart from the access log.
//!
//! Security teams read this trail to answer "who logged in from where, who was refused, who
//! ended which session". So every event has the same fields, whatever happened:
//!
//! | field | meaning |
//! |---|---|
//! | `event` | `register`, `login`, `logout`, `logout_all`, `refresh`, `refresh_reuse`, `throttle`, or a CLI action (`cli_user_add`, ...) |
//! | `outcome` | `success` or `failure` |
//! | `reason` | why it failed (a class, see [`reason`]), `-` on success |
//! | `user` | the username concerned, `-` when none is known |
//! | `client` | the caller's address (as far as `trusted_proxies` allow); `cli:uid=N` for the CLI |
//! | `request_id` | the request's `X-Request-Id`, `-` for the CLI |
//! | `jti` | the token concerned (see [`Trail`]), `-` when there is none |
//!
//! The password and the token are never fields: only the token's `jti`, which identifies it
//! without granting anything.

use std::net::IpAddr;

use crate::error::RequestError;

/// The tracing target of every audit event: `KEYCARD_LOG=keycard::audit=info` keeps them
/// alone, `keycard::audit=off` drops them.
pub const TARGET: &str = "keycard::audit";

/// What one auth endpoint request has learned for its audit event, filled in as it goes
/// (the username once the body is read, the `jti` once a token is verified or issued), and
/// written once, by [`Trail::record`], whatever the answer.
#[derive(Debug)]
pub struct Trail {
    /// The event; an endpoint may change it (`logout` → `logout_all`; a reused refresh token's
    /// error makes `refresh` `refresh_reuse`). `None`: nothing to audit (the JWKS document).
    pub event: Option<&'static str>,
    /// The user concerned, once known.
    pub user: Option<String>,
    /// For a login or refresh, the new access token's `jti` (the one the client now holds);
    /// for a logout, the revoked token's; for a reused refresh token, that token's.
    pub jti: Option<String>,
}

impl Trail {
    /// A trail for `event` (`None`: not audited).
    pub fn new(event: Option<&'static str>) -> Trail {
        Trail {
            event,
            user: None,
            jti: None,
        }
    }

    /// Writes the event for the request's `result`. A refused method is not an attempt and is
    /// not audited; a 429 is written as a `throttle` event, a reused refresh token as
    /// `refresh_reuse`.
    pub fn record<T>(&self, result: &Result<T, RequestError>, client: IpAddr, request_id: &str) {
        let Some(mut event) = self.event else { return };
        let (outcome, reason) = match result {
            Ok(_) => ("success", "-"),
            Err(RequestError::MethodNotAllowed { .. }) => return,
            Err(error) => {
                match error {
                    RequestError::TooManyRequests { .. } => event = "throttle",
                    RequestError::Reused => event = "refresh_reuse",
                    _ => {}
                }
                ("failure", reason(error))
            }
        };
        emit(
            event,
            outcome,
            reason,
            self.user.as_deref(),
            &client,
            request_id,
            self.jti.as_deref(),
        );
    }
}

/// An operator's `keycard user ...` command: `action` is `add`, `roles`, `delete` or
/// `revoke`, about `user`.
pub fn cli(action: &'static str, user: &str, result: &Result<String, impl std::fmt::Display>) {
    let event = match action {
        "add" => "cli_user_add",
        "roles" => "cli_user_roles",
        "delete" => "cli_user_delete",
        _ => "cli_user_revoke",
    };
    let (outcome, reason) = match result {
        Ok(_) => ("success", "-"),
        Err(_) => ("failure", "cli_error"),
    };
    emit(event, outcome, reason, Some(user), &Operator, "-", None);
}

/// The `client` of a CLI event: `cli:uid=N`, the operator's (real) user id.
struct Operator;

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(unix)]
        {
            // SAFETY: getuid takes nothing, cannot fail and touches no memory of ours.
            let uid = unsafe { libc::getuid() };
            write!(f, "cli:uid={uid}")
        }
        #[cfg(not(unix))]
        f.write_str("cli")
    }
}

/// The one place an audit line is written, so every event has every field.
fn emit(
    event: &'static str,
    outcome: &'static str,
    reason: &'static str,
    user: Option<&str>,
    client: &dyn std::fmt::Display,
    request_id: &str,
    jti: Option<&str>,
) {
    tracing::info!(
        target: TARGET,
        event,
        outcome,
        reason,
        user = user.unwrap_or("-"),
        client = %client,
        request_id,
        jti = jti.unwrap_or("-"),
        "audit"
    );
}

/// The failure class written as `reason`: coarse on purpose (a security team groups by it), and
/// never the error's own text, which may echo what the client sent.
pub fn reason(error: &RequestError) -> &'static str {
    match error {
        RequestError::BadCredentials => "bad_credentials",
        RequestError::UserExists => "user_exists",
        RequestError::Forbidden(_) => "forbidden",
        RequestError::MissingAuth => "missing_token",
        RequestError::InvalidToken(_) => "invalid_token",
        RequestError::Expired => "expired",
        RequestError::Revoked => "revoked",
        RequestError::Reused => "reused",
        RequestError::StoreUnavailable(_) => "store_error",
        RequestError::TooManyRequests { msg, .. } if *msg == crate::auth::endpoints::BUSY => {
            "too_many_in_progress"
        }
        RequestError::TooManyRequests { .. } => "too_many_failures",
        RequestError::Busy { .. } => "busy",
        RequestError::BadRequest(_)
        | RequestError::PayloadTooLarge
        | RequestError::UnsupportedMediaType
        | RequestError::RequestTimeout
        | RequestError::BrokenBody => "invalid_request",
        _ => "internal",
    }
}
