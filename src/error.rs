//! Errors: the one enum of per-request failures, and the one place that turns it into a
//! response.
//!
//! Handlers return `Err(RequestError)` and never build error responses themselves, so every
//! status, `{"msg"}` body and `WWW-Authenticate` header is decided here. 5xx bodies stay
//! generic; their detail goes to the log.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, Body};

/// Everything that can end a request before or instead of the upstream's answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No `Authorization` header on a protected route.
    #[error("Missing Authorization Header")]
    MissingAuth,
    /// A token was presented but is malformed, mis-signed or of the wrong kind.
    #[error("{0}")]
    InvalidToken(&'static str),
    /// The token's `exp` has passed.
    #[error("Token has expired")]
    Expired,
    /// The token's `jti` is in the store's revocation list.
    #[error("Token has been revoked")]
    Revoked,
    /// A refresh token presented again after it was rotated (or revoked at logout): replayed
    /// or stolen, so its whole family was revoked (RFC 9700 §4.14). The client sees exactly
    /// what [`RequestError::Revoked`] shows; only metrics tell them apart.
    #[error("Token has been revoked")]
    Reused,
    /// Authenticated, but not allowed: the route's roles, or self-registration turned off.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The store did not answer (or not in time); we fail closed.
    #[error("Authentication store unavailable")]
    StoreUnavailable(#[source] crate::auth::store::StoreError),
    /// No route matches the path.
    #[error("No route")]
    NoRoute,
    /// The path has dot-segments, encoded separators, NUL or `;` parameters.
    #[error("Invalid path")]
    InvalidPath,
    /// A malformed request: bad body, bad field, two `Authorization` headers.
    #[error("{0}")]
    BadRequest(String),
    /// `/register` for a name that exists.
    #[error("User already exists")]
    UserExists,
    /// `/login` with a wrong password or unknown user (indistinguishable on purpose).
    #[error("Bad username or password")]
    BadCredentials,
    /// An auth endpoint with a method it does not answer.
    #[error("Method not allowed")]
    MethodNotAllowed {
        /// The `Allow` header value.
        allow: &'static str,
    },
    /// The request target is longer than `server.max_target_bytes`.
    #[error("URI too long")]
    UriTooLong,
    /// The request headers add up to more than `server.max_header_bytes`.
    #[error("Request header fields too large")]
    HeadersTooLarge,
    /// The client did not send its body in time: an auth endpoint's within
    /// `server.body_read_timeout`, or a proxied one that stalled for `server.body_idle_timeout`.
    #[error("Request body not received in time")]
    RequestTimeout,
    /// The client's body could not be read: malformed framing (a bad chunk-size line, say), or
    /// the client reset the connection mid-body. The client's fault, never the upstream's.
    #[error("Malformed request body")]
    BrokenBody,
    /// An auth endpoint body over the limit.
    #[error("Request body too large")]
    PayloadTooLarge,
    /// An auth endpoint body that is neither JSON nor a form.
    #[error("Unsupported content type")]
    UnsupportedMediaType,
    /// Throttled (brute force or saturated hashing); the client may retry after the delay.
    #[error("{msg}")]
    TooManyRequests {
        /// The message to show.
        msg: &'static str,
        /// Sent as `Retry-After` in whole seconds.
        retry_after: Duration,
    },
    /// Password hashing is saturated; the client may retry soon.
    #[error("Server busy")]
    Busy {
        /// Sent as `Retry-After` in whole seconds.
        retry_after: Duration,
    },
    /// The request uses something keycard does not implement (a transfer coding other than
    /// `chunked`).
    #[error("{0}")]
    NotImplemented(&'static str),
    /// The upstream refused the connection or failed mid-request.
    #[error("Upstream unavailable")]
    BadGateway(String),
    /// The upstream did not answer in time.
    #[error("Upstream timed out")]
    GatewayTimeout,
    /// A bug or an unexpected failure inside keycard.
    #[error("Internal server error")]
    Internal(String),
}

impl RequestError {
    /// The status code this error is answered with.
    pub fn status(&self) -> StatusCode {
        use RequestError::*;
        match self {
            MissingAuth | InvalidToken(_) | Expired | Revoked | Reused | BadCredentials => {
                StatusCode::UNAUTHORIZED
            }
            StoreUnavailable(_) | Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            NoRoute => StatusCode::NOT_FOUND,
            InvalidPath | BadRequest(_) | BrokenBody => StatusCode::BAD_REQUEST,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            UserExists => StatusCode::CONFLICT,
            Forbidden(_) => StatusCode::FORBIDDEN,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UriTooLong => StatusCode::URI_TOO_LONG,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            BadGateway(_) => StatusCode::BAD_GATEWAY,
            GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the connection must close after this answer: the client's body was cut short
    /// or broken, so whatever it sends next cannot be trusted to start a request.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            RequestError::RequestTimeout | RequestError::BrokenBody
        )
    }

    /// The one mapping from an error to what the client sees.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let mut response = body::json_msg(status, &self.to_string());
        let headers = response.headers_mut();
        use RequestError::*;
        match &self {
            MissingAuth | BadCredentials => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            InvalidToken(_) | Expired | Revoked | Reused => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            TooManyRequests { retry_after, .. } | Busy { retry_after } => {
                // Rounded up: retrying a fraction of a second early would just be refused again.
                let secs = retry_after.as_millis().div_ceil(1000).max(1) as u64;
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            _ => {}
        }
        response
    }
}

impl From<crate::auth::token::TokenError> for RequestError {
    fn from(e: crate::auth::token::TokenError) -> Self {
        use crate::auth::token::TokenError;
        match e {
            TokenError::Expired => RequestError::Expired,
            TokenError::Invalid(reason) => RequestError::InvalidToken(reason),
            TokenError::Signing(detail) => RequestError::Internal(detail),
        }
    }
}

impl From<crate::auth::password::PasswordError> for RequestError {
    fn from(e: crate::auth::password::PasswordError) -> Self {
        use crate::auth::password::PasswordError;
        match e {
            PasswordError::Busy => RequestError::Busy {
                retry_after: Duration::from_secs(1),
            },
            PasswordError::Internal(detail) => RequestError::Internal(detail),
        }
    }
}

impl From<crate::auth::store::StoreError> for RequestError {
    fn from(e: crate::auth::store::StoreError) -> Self {
        RequestError::StoreUnavailable(e)
    }
}
