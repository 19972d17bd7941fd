//! Endpoints: `/register`, `/login`, `/logout` and `/refresh`, answered by the gateway itself.
//!
//! These paths belong to keycard whatever the method and are never forwarded. Bodies are the
//! only ones keycard ever reads, and they are capped at `server.max_auth_body_bytes` (and
//! `server.body_read_timeout`) before parsing. Responses keep the Flask-JWT-Extended
//! tutorial's shapes and messages so existing clients work unchanged.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;
use tracing::Instrument;

use super::store::Store;
use super::store::{Attempt, Reservation, Subject, UserRecord};
use super::token::{IssuedPair, Session, TokenType};
use super::{Auth, bearer_token, is_revoked, verify_any, verify_bearer};
use crate::audit::Trail;
use crate::body::{self, Body};
use crate::config::ThrottleConfig;
use crate::error::RequestError;
use crate::policy::Policy;
use crate::proxy::headers::X_REQUEST_ID;

/// The endpoints keycard answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /register`.
    Register,
    /// `POST /login`.
    Login,
    /// `DELETE` or `POST /logout`.
    Logout,
    /// `POST /refresh`.
    Refresh,
    /// `GET /.well-known/jwks.json`: the public verification keys (RFC 7517).
    Jwks,
}

impl Endpoint {
    /// The endpoint a canonical path names, if any. A trailing slash still names it, so
    /// `/login/` can never slip past to an upstream.
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path.strip_suffix('/').unwrap_or(path) {
            "/register" => Some(Endpoint::Register),
            "/login" => Some(Endpoint::Login),
            "/logout" => Some(Endpoint::Logout),
            "/refresh" => Some(Endpoint::Refresh),
            "/.well-known/jwks.json" => Some(Endpoint::Jwks),
            _ => None,
        }
    }

    /// Short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Register => "register",
            Endpoint::Login => "login",
            Endpoint::Logout => "logout",
            Endpoint::Refresh => "refresh",
            Endpoint::Jwks => "jwks",
        }
    }

    /// The `Allow` header value, and whether `method` is in it.
    fn allows(self, method: &Method) -> Result<(), RequestError> {
        let (allow, ok) = match self {
            Endpoint::Logout => (
                "DELETE, POST",
                method == Method::DELETE || method == Method::POST,
            ),
            Endpoint::Jwks => ("GET", method == Method::GET),
            _ => ("POST", method == Method::POST),
        };
        if ok {
            Ok(())
        } else {
            Err(RequestError::MethodNotAllowed { allow })
        }
    }
}

/// `username` and `password` from a register or login body, already validated.
struct Credentials {
    /// Lowercased: usernames are case-insensitive.
    username: String,
    password: String,
}

impl Auth {
    /// Answers one auth endpoint request. The user (if any) is returned for the access log.
    ///
    /// `client` is the caller's address as far as it can be trusted (see
    /// [`crate::proxy::headers::client_ip`]); login failures are counted against it.
    ///
    /// Each answer but the JWKS document writes one audit event (see [`crate::audit`]).
    pub async fn endpoint(
        &self,
        policy: &Policy,
        endpoint: Endpoint,
        request: Request<Incoming>,
        client: IpAddr,
    ) -> Result<(Response<Body>, Option<String>), RequestError> {
        let mut trail = Trail::new(match endpoint {
            Endpoint::Register => Some("register"),
            Endpoint::Login => Some("login"),
            Endpoint::Logout => Some("logout"),
            Endpoint::Refresh => Some("refresh"),
            Endpoint::Jwks => None,
        });
        // The gateway has set it (the client's, if acceptable, or its own).
        let request_id = request
            .headers()
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let result = self
            .answer(policy, endpoint, request, client, &mut trail)
            .await;
        trail.record(&result, client, &request_id);
        result
    }

    /// [`Auth::endpoint`]'s work, telling `trail` what it learns as it goes.
    async fn answer(
        &self,
        policy: &Policy,
        endpoint: Endpoint,
        request: Request<Incoming>,
        client: IpAddr,
        trail: &mut Trail,
    ) -> Result<(Response<Body>, Option<String>), RequestError> {
        endpoint.allows(request.method())?;
        let (tokens, throttle, limits) = (&policy.tokens, &policy.throttle, &policy.limits);
        match endpoint {
            Endpoint::Jwks => {
                let mut response = Response::new(body::full(tokens.jwks().to_owned()));
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                // Keys change only on a reload; verifiers may cache them for a while, and
                // fetch again on a `kid` they do not know.
                headers.insert(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=300"),
                );
                Ok((response, None))
            }
            Endpoint::Register => {
                let registration = &policy.config.registration;
                if !registration.enabled {
                    return Err(RequestError::Forbidden("Registration is disabled"));
                }
                let roles = registration.default_roles.clone();
                let creds =
                    read_credentials(request, limits.max_auth_body, limits.body_read_timeout)
                        .await?;
                trail.user = Some(creds.username.clone());
                // Throttled per address like /login: a 409 answers "does this name exist?",
                // so each one counts as a failed attempt.
                let subjects = vec![address_subject(&self.store, throttle, client)];
                let (passwords, store) = (self.passwords.clone(), self.store.clone());
                let username = creds.username.clone();
                let created = decide(async move {
                    let (_, reservation) = begin(&store, subjects, None).await?;
                    let phc = passwords.hash(&creds.password).await?;
                    let created = store
                        .create_user(&username, &UserRecord { phc, roles })
                        .await?;
                    reservation.end(created).await?;
                    Ok(created)
                })
                .await?;
                if !created {
                    return Err(RequestError::UserExists);
                }
                let response = body::json_msg(StatusCode::CREATED, "User created successfully");
                Ok((response, Some(creds.username)))
            }
            Endpoint::Login => {
                let creds =
                    read_credentials(request, limits.max_auth_body, limits.body_read_timeout)
                        .await?;
                trail.user = Some(creds.username.clone());
                // The address first: a throttled address counts nothing, not even against
                // the names it tries, so it can neither fill the store nor lock users out.
                let subjects = vec![
                    address_subject(&self.store, throttle, client),
                    self.store.subject(
                        "user",
                        &creds.username,
                        throttle.user_limit,
                        throttle.user_window,
                        true,
                    ),
                ];
                let (passwords, store) = (self.passwords.clone(), self.store.clone());
                let (username, password) = (creds.username.clone(), creds.password);
                let user = decide(async move {
                    // Checked before the password: while a throttle is active even the right
                    // password gets 429, or the throttle would be an oracle for guesses.
                    let (stored, reservation) = begin(&store, subjects, Some(&username)).await?;
                    let user = stored.as_deref().and_then(UserRecord::decode);
                    // An unknown user is verified against a dummy hash: the same work, the
                    // same answer and the same count as a wrong password, so neither timing
                    // nor throttling reveals which names exist.
                    let phc = user.as_ref().map(|u| u.phc.as_str());
                    let valid = passwords.verify(&password, phc).await?;
                    reservation.end(valid).await?;
                    Ok(user.filter(|_| valid))
                })
                .await?;
                let Some(user) = user else {
                    return Err(RequestError::BadCredentials);
                };
                let session = Session {
                    generation: self.store.generation(&creds.username).await?,
                    family: String::new(),
                };
                let pair = tokens.issue_pair(&creds.username, &user.roles, &session)?;
                trail.jti = Some(pair.access_jti.clone());
                Ok((token_response(&pair), Some(creds.username)))
            }
            Endpoint::Logout => {
                let all = request.uri().query().is_some_and(|q| {
                    q.split('&')
                        .any(|p| p.eq_ignore_ascii_case("all=true") || p == "all=1")
                });
                if all {
                    trail.event = Some("logout_all");
                }
                // `authenticate`'s two steps, apart: the user and jti of a revoked token's
                // logout are known, and audited, once its signature holds.
                let token = bearer_token(request.headers())?;
                let claims = verify_any(policy, token, TokenType::Access).await?;
                trail.user = Some(claims.sub.clone());
                trail.jti = Some(claims.jti.clone());
                if is_revoked(&self.store, &claims)
                    .await
                    .map_err(RequestError::StoreUnavailable)?
                {
                    return Err(RequestError::Revoked);
                }
                if claims.external {
                    // Another issuer's sessions end at that issuer; keycard can only refuse
                    // this one token, and only by its `jti`.
                    if all {
                        return Err(RequestError::BadRequest(
                            "all=true is for keycard's own users; end other sessions at their issuer".into(),
                        ));
                    }
                    if claims.jti.is_empty() {
                        return Err(RequestError::BadRequest(
                            "This token has no jti, so it cannot be revoked".into(),
                        ));
                    }
                }
                self.store
                    .revoke(&claims.jti, tokens.revocation_ttl(&claims))
                    .await?;
                if all {
                    self.store.end_all_sessions(&claims.sub).await?;
                }
                // A refresh token named in the body (`refresh_token`, JSON or form) goes too,
                // so the client cannot mint new access tokens after logging out. Anything else
                // in the body (another user's token, a malformed body) is ignored: the logout
                // itself has happened.
                if let Some(refresh) = read_refresh_token(request, limits).await
                    && let Ok(refresh) = tokens.verify(&refresh, TokenType::Refresh)
                    && refresh.sub == claims.sub
                {
                    self.store
                        .revoke(&refresh.jti, tokens.revocation_ttl(&refresh))
                        .await?;
                }
                Ok((
                    body::json_msg(StatusCode::OK, "Token revoked"),
                    Some(claims.sub),
                ))
            }
            Endpoint::Refresh => {
                let claims = verify_bearer(tokens, request.headers(), TokenType::Refresh)?;
                trail.user = Some(claims.sub.clone());
                trail.jti = Some(claims.jti.clone());
                // Revoking with SET NX both checks and rotates in one round trip: of two
                // racing uses of one refresh token, exactly one gets a new pair. A refresh
                // token already rotated and used again was stolen or replayed: its whole
                // family goes (RFC 9700 §4.14), the thief's tokens and the user's alike. A
                // rotation whose answer is lost is taken back (see `Store::rotate`), so the
                // client's retry of our 503 is not mistaken for that.
                if !self
                    .store
                    .rotate(&claims.jti, tokens.revocation_ttl(&claims))
                    .await?
                {
                    self.store
                        .revoke_family(&claims.family, tokens.family_ttl())
                        .await?;
                    return Err(RequestError::Reused);
                }
                let (sub, generation, family) = (&claims.sub, claims.generation, &claims.family);
                if self.store.is_revoked(None, sub, generation, family).await? {
                    return Err(RequestError::Revoked);
                }
                // The roles as stored now, so a role change applies at the next refresh; a
                // deleted user gets no new tokens.
                let user = self
                    .store
                    .get_user(&claims.sub)
                    .await?
                    .ok_or(RequestError::InvalidToken("User not found"))?;
                // The token's own generation, not the store's: a refresh racing
                // `/logout?all=true` must not mint a pair that outlives it.
                let session = Session {
                    generation: claims.generation,
                    family: claims.family.clone(),
                };
                let pair = tokens.issue_pair(&claims.sub, &user.roles, &session)?;
                trail.jti = Some(pair.access_jti.clone());
                Ok((token_response(&pair), Some(claims.sub)))
            }
        }
    }
}

/// The 429 message while a subject's attempts in flight are at the limit (rather than its
/// failures); the audit log tells the two apart by it.
pub(crate) const BUSY: &str = "Too many login attempts in progress, try again shortly";

/// The client address as a throttle subject (`throttle.address_*`).
fn address_subject(store: &Store, throttle: &ThrottleConfig, client: IpAddr) -> Subject {
    store.subject(
        "addr",
        &client.to_string(),
        throttle.address_limit,
        throttle.address_window,
        false,
    )
}

/// Begins a throttled attempt: its reservation (and the user's hash, when `user` is given),
/// or 429. A 429 counts nothing. It says which kind it is: failures at the limit last until
/// the window ends; attempts in flight at the limit clear by themselves.
async fn begin(
    store: &Store,
    subjects: Vec<Subject>,
    user: Option<&str>,
) -> Result<(Option<String>, Reservation), RequestError> {
    match store.begin_attempt(subjects, user).await? {
        Attempt::Go { hash, reservation } => Ok((hash, reservation)),
        Attempt::Throttled { retry_after } => Err(RequestError::TooManyRequests {
            msg: "Too many failed login attempts, try again later",
            retry_after,
        }),
        Attempt::Busy => Err(RequestError::TooManyRequests {
            msg: BUSY,
            retry_after: Duration::from_secs(1),
        }),
    }
}

/// Runs an attempt from its reservation to its recorded outcome ([`begin`], the password check
/// or hash, [`Reservation::end`]) as its own task, and waits for it.
///
/// Why a task: if it ran inside the request, a client that hangs up right after sending would
/// cancel it part-way: a reservation made in the store but never seen (left until its TTL), or
/// one given back unjudged, so a wrong guess would never count and one address could keep
/// argon2 busy at full rate without ever being throttled. As a task the attempt is decided and
/// counted whatever the client does.
async fn decide<T: Send + 'static>(
    attempt: impl Future<Output = Result<T, RequestError>> + Send + 'static,
) -> Result<T, RequestError> {
    tokio::spawn(attempt.in_current_span())
        .await
        .map_err(|e| RequestError::Internal(format!("login attempt task failed: {e}")))?
}

/// The login and refresh answer. `Cache-Control: no-store` because it carries credentials
/// (RFC 6749 §5.1).
fn token_response(pair: &IssuedPair) -> Response<Body> {
    let mut response = body::json(
        StatusCode::OK,
        &json!({
            "access_token": pair.access_token,
            "refresh_token": pair.refresh_token,
            "token_type": "Bearer",
            "expires_in": pair.expires_in,
        }),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The two body formats the endpoints accept.
enum Format {
    Json,
    Form,
}

/// Picks the body format from `Content-Type`; anything else (or nothing) is 415.
fn format(headers: &HeaderMap) -> Result<Format, RequestError> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(RequestError::UnsupportedMediaType)?;
    let media_type = value.split(';').next().unwrap_or("").trim();
    if media_type.eq_ignore_ascii_case("application/json") {
        Ok(Format::Json)
    } else if media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Ok(Format::Form)
    } else {
        Err(RequestError::UnsupportedMediaType)
    }
}

/// Reads at most `max` bytes (`server.max_auth_body_bytes`), all of them within `deadline`
/// (`server.body_read_timeout`: a client that trickles or stops gets 408 and the connection
/// closes). A declared `Content-Length` over the cap is refused before a byte is read.
async fn read_body(
    request: Request<Incoming>,
    max: usize,
    deadline: Duration,
) -> Result<Bytes, RequestError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(RequestError::PayloadTooLarge);
    }
    let collect = Limited::new(request.into_body(), max).collect();
    match tokio::time::timeout(deadline, collect).await {
        Err(_) => Err(RequestError::RequestTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(RequestError::PayloadTooLarge)
        }
        Ok(Err(_)) => Err(RequestError::BrokenBody),
    }
}

/// Reads, parses and validates `username` and `password`.
async fn read_credentials(
    request: Request<Incoming>,
    max_body: usize,
    deadline: Duration,
) -> Result<Credentials, RequestError> {
    let format = format(request.headers())?;
    let bytes = read_body(request, max_body, deadline).await?;
    let (username, password) = match format {
        Format::Json => parse_json(&bytes)?,
        Format::Form => parse_form(&bytes)?,
    };
    let username = username.ok_or_else(|| bad("Missing username"))?;
    let password = password.ok_or_else(|| bad("Missing password"))?;
    Ok(Credentials {
        username: validate_username(&username)?,
        password: validate_password(password)?,
    })
}

/// `refresh_token` from a `/logout` body (JSON or form), if there is one and it can be read
/// within the auth-body limits; `None` for anything else.
async fn read_refresh_token(
    request: Request<Incoming>,
    limits: &crate::policy::Limits,
) -> Option<String> {
    let format = format(request.headers()).ok()?;
    let bytes = read_body(request, limits.max_auth_body, limits.body_read_timeout)
        .await
        .ok()?;
    match format {
        Format::Json => {
            let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            value.get("refresh_token")?.as_str().map(str::to_owned)
        }
        Format::Form => serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .ok()?
            .into_iter()
            .find(|(k, _)| k == "refresh_token")
            .map(|(_, v)| v),
    }
}

fn bad(msg: &str) -> RequestError {
    RequestError::BadRequest(msg.to_owned())
}

type Fields = (Option<String>, Option<String>);

fn parse_json(bytes: &[u8]) -> Result<Fields, RequestError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|_| bad("Malformed JSON body"))?;
    let object = value
        .as_object()
        .ok_or_else(|| bad("Request body must be a JSON object"))?;
    let field = |name: &str| -> Result<Option<String>, RequestError> {
        match object.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(&format!("Field '{name}' must be a string"))),
        }
    };
    Ok((field("username")?, field("password")?))
}

fn parse_form(bytes: &[u8]) -> Result<Fields, RequestError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_bytes(bytes).map_err(|_| bad("Malformed form body"))?;
    let mut fields: Fields = (None, None);
    for (key, value) in pairs {
        let slot = match key.as_str() {
            "username" => &mut fields.0,
            "password" => &mut fields.1,
            _ => continue,
        };
        if slot.is_some() {
            return Err(bad(&format!("Field '{key}' given more than once")));
        }
        *slot = Some(value);
    }
    Ok(fields)
}

/// 1–64 characters of `A-Z a-z 0-9 . _ @ -`, returned lowercased.
fn validate_username(username: &str) -> Result<String, RequestError> {
    if super::is_valid_username(username) {
        Ok(username.to_ascii_lowercase())
    } else {
        Err(bad(
            "Invalid username: 1 to 64 characters of A-Z a-z 0-9 . _ @ -",
        ))
    }
}

/// 8–1024 bytes; the upper bound keeps one request from buying unbounded hashing input.
fn validate_password(password: String) -> Result<String, RequestError> {
    if (8..=1024).contains(&password.len()) {
        Ok(password)
    } else {
        Err(bad("Invalid password: 8 to 1024 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_paths_include_trailing_slash() {
        assert_eq!(Endpoint::from_path("/login"), Some(Endpoint::Login));
        assert_eq!(Endpoint::from_path("/login/"), Some(Endpoint::Login));
        assert_eq!(Endpoint::from_path("/loginx"), None);
        assert_eq!(Endpoint::from_path("/api/login"), None);
    }

    #[test]
    fn methods() {
        assert!(Endpoint::Logout.allows(&Method::DELETE).is_ok());
        assert!(Endpoint::Logout.allows(&Method::POST).is_ok());
        assert!(Endpoint::Login.allows(&Method::GET).is_err());
        assert!(Endpoint::Register.allows(&Method::PUT).is_err());
    }

    #[test]
    fn usernames() {
        assert_eq!(validate_username("Alice.B@x-y_z").unwrap(), "alice.b@x-y_z");
        assert!(validate_username("").is_err());
        assert!(validate_username(&"a".repeat(65)).is_err());
        assert!(validate_username(&"a".repeat(64)).is_ok());
        assert!(validate_username("a b").is_err());
        assert!(validate_username("é").is_err());
    }

    #[test]
    fn passwords() {
        assert!(validate_password("1234567".into()).is_err());
        assert!(validate_password("12345678".into()).is_ok());
        assert!(validate_password("x".repeat(1024)).is_ok());
        assert!(validate_password("x".repeat(1025)).is_err());
    }

    #[test]
    fn bodies() {
        let (u, p) = parse_json(br#"{"username":"a","password":"b"}"#).unwrap();
        assert_eq!((u.as_deref(), p.as_deref()), (Some("a"), Some("b")));
        assert!(parse_json(b"[1]").is_err());
        assert!(parse_json(b"{").is_err());
        assert!(parse_json(br#"{"username":1}"#).is_err());
        let (u, p) = parse_form(b"username=a%40b&password=x+y").unwrap();
        assert_eq!((u.as_deref(), p.as_deref()), (Some("a@b"), Some("x y")));
        assert!(parse_form(b"username=a&username=b").is_err());
    }
}
