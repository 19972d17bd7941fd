//! Auth: everything that decides who the caller is.
//!
//! - [`token`]: issuing and verifying JWTs. No I/O.
//! - [`password`]: argon2id hashing on the blocking pool.
//! - [`store`]: users and revocations (Redis or memory).
//! - [`endpoints`]: `/register`, `/login`, `/logout`, `/refresh`.
//!
//! [`Auth`] ties them together; the gateway holds one and asks it either to answer an auth
//! endpoint or, through [`Auth::authorize`], to decide a request's [`Identity`].

pub mod endpoints;
pub mod issuers;
pub mod keys;
pub mod password;
pub mod store;
pub mod token;
pub mod tracking;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use http::{HeaderMap, header};

use crate::config::{AuthMode, Config};
use crate::error::RequestError;
use crate::metrics::{AuthOutcome, Metrics};
use crate::policy::{Policy, Route};
use crate::proxy::headers::IdentityHeaders;
use password::Passwords;
use store::Store;
use token::{Claims, TokenType, Tokens};

/// The hasher and the store: built once at startup, shared by every request and kept across
/// reloads. What the config decides (keys, throttle limits, body limits) comes with each call
/// from the current [`Policy`].
#[derive(Debug)]
pub struct Auth {
    /// Bounded argon2id hashing.
    pub passwords: Passwords,
    /// Users, revocations and throttle counters.
    pub store: Store,
    /// Where decisions and endpoint outcomes are counted.
    pub metrics: Arc<Metrics>,
}

/// Who a request is, as decided by [`Auth::authorize`].
#[derive(Debug)]
pub enum Identity {
    /// Nobody: a public route. No identity header is written.
    Anonymous,
    /// A verified, unrevoked access token.
    User(Claims),
}

impl Identity {
    /// The user name, for the identity header and the access log.
    pub fn user(&self) -> Option<&str> {
        match self {
            Identity::Anonymous => None,
            Identity::User(claims) => Some(&claims.sub),
        }
    }

    /// Writes this identity into a request about to be forwarded, by `rules`: the user header
    /// for a user, nothing for anonymous. Runs after the client's identity headers were
    /// stripped (see [`crate::proxy::headers`] for the order).
    pub fn write_headers(
        &self,
        rules: &IdentityHeaders,
        headers: &mut HeaderMap,
    ) -> Result<(), RequestError> {
        match self {
            Identity::User(claims) => {
                let injected = if claims.external {
                    rules.inject_external(headers, &claims.sub)
                } else {
                    rules.inject(headers, &claims.sub)
                };
                injected.map_err(|e| RequestError::Internal(format!("identity header: {e}")))?;
                rules.inject_claims(headers, claims);
                Ok(())
            }
            Identity::Anonymous => Ok(()),
        }
    }
}

impl Auth {
    /// Builds the hasher around an already-opened store; decisions are counted in `metrics`.
    pub fn new(
        config: &Config,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Auth, password::PasswordError> {
        Ok(Auth {
            passwords: Passwords::new(&config.passwords)?,
            store,
            metrics,
        })
    }

    /// Decides who may pass `route`: the one place that says "who is this, and may they pass",
    /// for the proxy path (and, later, a forward-auth endpoint). Public routes pass anyone
    /// as [`Identity::Anonymous`]; required ones need a valid, unrevoked access token with
    /// one of the route's roles (if it names any: else 403); optional ones pass without a
    /// token, and check one that is presented like required ones.
    ///
    /// Every check of a token is counted in `keycard_auth_decisions_total` (passing a public
    /// route, or an optional one without a token, checks nothing and is not).
    pub async fn authorize(
        &self,
        policy: &Policy,
        route: &Route,
        headers: &HeaderMap,
    ) -> Result<Identity, RequestError> {
        let claims = match route.policy {
            AuthMode::Public => return Ok(Identity::Anonymous),
            // Flask-JWT-Extended's `optional=True`: no bearer token is no identity; another
            // scheme (`Basic`, meant for someone else) is not a token either.
            AuthMode::Optional if !has_bearer(headers) => return Ok(Identity::Anonymous),
            AuthMode::Optional | AuthMode::Required => {
                self.authenticate(policy, headers, TokenType::Access).await
            }
        };
        // Any one of the route's roles; checked after revocation, so a revoked token is 401.
        let decided = claims.and_then(|claims| match has_a_role(route, &claims) {
            true => Ok(Identity::User(claims)),
            false => Err(RequestError::Forbidden("Forbidden")),
        });
        self.metrics.auth_decision(decision(&decided));
        decided
    }

    /// Forward-auth (nginx `auth_request`, Traefik ForwardAuth, Envoy `ext_authz`): decides
    /// for the request a proxy in front is about to forward, named by `X-Forwarded-Uri` or
    /// `X-Original-URI`, which are believed only from `server.trusted_proxies`. The same
    /// [`Auth::authorize`] as the proxy path; no route, or no trusted original URI, is 403
    /// (fail closed: an `auth_request` only understands 2xx, 401 and 403), and counts as a
    /// `forbidden` decision.
    pub async fn forward_auth<'p>(
        &self,
        policy: &'p Policy,
        headers: &HeaderMap,
        trusted: bool,
    ) -> Result<(Identity, &'p Route), RequestError> {
        let route = Self::forward_auth_route(policy, headers, trusted).inspect_err(|_| {
            self.metrics.auth_decision(AuthOutcome::Forbidden);
        })?;
        let identity = self.authorize(policy, route, headers).await?;
        Ok((identity, route))
    }

    /// The route a forward-auth request asks about, from a trusted proxy's headers.
    fn forward_auth_route<'p>(
        policy: &'p Policy,
        headers: &HeaderMap,
        trusted: bool,
    ) -> Result<&'p Route, RequestError> {
        // Every value of both headers must agree: a proxy sets one, but passes the client's
        // copy of the other along, and that copy must never be the one that counts.
        let mut values = ["x-forwarded-uri", "x-original-uri"]
            .iter()
            .flat_map(|name| headers.get_all(*name).iter());
        let first = values
            .next()
            .filter(|_| trusted)
            .ok_or(RequestError::Forbidden(
                "Missing or untrusted X-Forwarded-Uri",
            ))?;
        if values.any(|v| v != first) {
            return Err(RequestError::Forbidden(
                "Conflicting X-Forwarded-Uri and X-Original-URI",
            ));
        }
        let original = (first.to_str().ok())
            .and_then(|uri| uri.parse::<http::Uri>().ok())
            .ok_or(RequestError::Forbidden("Invalid X-Forwarded-Uri"))?;
        let path = crate::routes::canonicalize(original.path())
            .map_err(|_| RequestError::Forbidden("Invalid path"))?;
        policy
            .routes
            .find(&path)
            .ok_or(RequestError::Forbidden("No route"))
    }

    /// Verifies the bearer token in `headers` and checks it is not revoked: the whole
    /// per-request cost of authentication, one store round trip at most.
    pub async fn authenticate(
        &self,
        policy: &Policy,
        headers: &HeaderMap,
        expected: TokenType,
    ) -> Result<Claims, RequestError> {
        let claims = verify_any(policy, bearer_token(headers)?, expected).await?;
        if is_revoked(&self.store, &claims)
            .await
            .map_err(RequestError::StoreUnavailable)?
        {
            return Err(RequestError::Revoked);
        }
        Ok(claims)
    }
}

/// Verifies a token as keycard's own, or, when its (unverified) `iss` names one of the
/// `[[issuers]]`, as that issuer's (access tokens only: keycard issues no refresh tokens for
/// them). Nothing is believed from the unverified `iss` but which keys to check against.
pub async fn verify_any(
    policy: &Policy,
    token: &str,
    expected: TokenType,
) -> Result<Claims, token::TokenError> {
    // Without `[[issuers]]` (the common case) the payload is not decoded twice per request.
    if expected == TokenType::Access
        && !policy.issuers.is_empty()
        && let Some(iss) = unverified_issuer(token)
        && iss != policy.tokens.issuer()
        && policy.issuers.knows(&iss)
    {
        return policy
            .issuers
            .verify(token, &iss, policy.tokens.leeway())
            .await;
    }
    policy.tokens.verify(token, expected)
}

/// The `keycard_auth_decisions_total` outcome of a token check.
fn decision(decided: &Result<Identity, RequestError>) -> AuthOutcome {
    match decided {
        Ok(_) => AuthOutcome::Ok,
        Err(RequestError::MissingAuth) => AuthOutcome::Missing,
        Err(RequestError::Expired) => AuthOutcome::Expired,
        Err(RequestError::Revoked | RequestError::Reused) => AuthOutcome::Revoked,
        Err(RequestError::Forbidden(_)) => AuthOutcome::Forbidden,
        Err(RequestError::StoreUnavailable(_)) => AuthOutcome::StoreError,
        // A malformed header, a bad token, or one that could not be checked at all: not let
        // in, for the token's sake.
        Err(_) => AuthOutcome::Invalid,
    }
}

/// Whether `claims` may pass `route`'s `roles`: any one of them, or none required.
fn has_a_role(route: &Route, claims: &Claims) -> bool {
    let roles = &route.config.roles;
    roles.is_empty() || claims.roles.iter().any(|r| roles.contains(r))
}

/// The token's revocation, its user's generation and its refresh family, in one store call.
async fn is_revoked(store: &Store, claims: &Claims) -> Result<bool, store::StoreError> {
    let (jti, sub, family) = (Some(claims.jti.as_str()), &claims.sub, &claims.family);
    store.is_revoked(jti, sub, claims.generation, family).await
}

/// Whether `headers` carry an `Authorization: Bearer ...` (scheme case-insensitive).
fn has_bearer(headers: &HeaderMap) -> bool {
    headers.get_all(header::AUTHORIZATION).iter().any(|v| {
        v.as_bytes()
            .get(..7)
            .is_some_and(|s| s.eq_ignore_ascii_case(b"bearer "))
    })
}

/// The `iss` of a JWT's payload, unverified.
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<Iss>(&bytes).ok()?.iss
}

/// Whether `user` may be written as an identity header: keycard's own user names, and what
/// other issuers use for subjects (`auth0|5f…`, UUIDs, e-mail addresses): 1–255 visible
/// ASCII characters without separators that a back end could split on (`,` `;` quotes).
pub fn is_safe_identity(user: &str) -> bool {
    (1..=255).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b",;\"'\\".contains(&b))
}

/// Checks the `Authorization` header's shape and the token's signature and claims, without
/// touching the store.
pub fn verify_bearer(
    tokens: &Tokens,
    headers: &HeaderMap,
    expected: TokenType,
) -> Result<Claims, RequestError> {
    let token = bearer_token(headers)?;
    Ok(tokens.verify(token, expected)?)
}

/// Watches a session that outlives its request (an upgraded, WebSocket connection) so it can
/// be closed when it would no longer be let in. Common gateways check only the handshake;
/// keycard keeps checking, against the policy in force at each check, so a reload that
/// rotates the key, changes the issuer, removes the route or makes it require a token closes
/// the tunnels it no longer allows.
#[derive(Debug)]
pub struct SessionWatch {
    store: Store,
    /// The gateway's current policy (swapped by reloads).
    policy: Arc<ArcSwap<Policy>>,
    /// The canonical path the tunnel was opened on.
    path: String,
    /// The bearer token it was opened with, on a route that required one.
    token: Option<String>,
    /// Unix seconds after which the token is expired (its `exp` plus the leeway).
    ends_at: Option<u64>,
}

/// How soon an open tunnel notices a reload.
const RELOAD_NOTICE: Duration = Duration::from_secs(1);

impl SessionWatch {
    /// A watch on a tunnel opened on `path` by `identity` (with `token`, when it needed
    /// one).
    pub fn new(
        store: &Store,
        policy: Arc<ArcSwap<Policy>>,
        path: &str,
        identity: &Identity,
        token: Option<&str>,
    ) -> SessionWatch {
        let ends_at = match identity {
            Identity::User(claims) => Some(policy.load().tokens.accepted_until(claims)),
            Identity::Anonymous => None,
        };
        SessionWatch {
            store: store.clone(),
            policy,
            path: path.to_owned(),
            token: token.filter(|_| ends_at.is_some()).map(str::to_owned),
            ends_at,
        }
    }

    /// Resolves, with the reason, once the session must end: the token expired or was
    /// revoked, the current policy no longer lets it in, or the store could not say (fail
    /// closed). Checked every `server.upgrade_recheck` of the policy in force, and within
    /// [`RELOAD_NOTICE`] of a reload, so a reload that removes or closes the route, or
    /// shortens the interval, reaches tunnels that are already open.
    pub async fn ended(mut self) -> &'static str {
        let mut seen = self.policy.load_full();
        let mut checked = tokio::time::Instant::now();
        loop {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(u64::MAX, |d| d.as_secs());
            let due = checked + seen.limits.upgrade_recheck;
            let mut wait = due
                .saturating_duration_since(tokio::time::Instant::now())
                .min(RELOAD_NOTICE);
            if let Some(ends_at) = self.ends_at {
                if now >= ends_at {
                    return "token expired";
                }
                wait = wait.min(Duration::from_secs(ends_at - now));
            }
            tokio::time::sleep(wait).await;
            let current = self.policy.load_full();
            let reloaded = !Arc::ptr_eq(&current, &seen);
            if reloaded || tokio::time::Instant::now() >= checked + current.limits.upgrade_recheck {
                seen = current;
                checked = tokio::time::Instant::now();
                if let Some(reason) = self.still_allowed().await {
                    return reason;
                }
            }
        }
    }

    /// `None` while the current policy still lets this session in; else why not.
    async fn still_allowed(&mut self) -> Option<&'static str> {
        let policy = self.policy.load_full();
        let Some(route) = policy.routes.find(&self.path) else {
            return Some("route removed");
        };
        let Some(token) = &self.token else {
            return match route.policy {
                AuthMode::Public | AuthMode::Optional => None,
                AuthMode::Required => Some("route now requires a token"),
            };
        };
        if route.policy == AuthMode::Public {
            return None;
        }
        let claims = match verify_any(&policy, token, TokenType::Access).await {
            Ok(claims) => claims,
            Err(token::TokenError::Expired) => return Some("token expired"),
            Err(_) => return Some("token no longer valid"),
        };
        self.ends_at = Some(policy.tokens.accepted_until(&claims));
        if !has_a_role(route, &claims) {
            return Some("token lacks the route's roles");
        }
        match is_revoked(&self.store, &claims).await {
            Ok(false) => None,
            Ok(true) => Some("token revoked"),
            Err(error) => {
                tracing::warn!(%error, "cannot recheck an upgraded connection's token");
                Some("authentication store unavailable")
            }
        }
    }
}

/// Whether `name` is a user name by the contract's rules: 1–64 characters of
/// `A-Z a-z 0-9 . _ @ -`.
///
/// Why one function: `/register` admits names by it, token verification refuses a `sub`
/// that breaks it (a claim that cannot become a header value is an invalid token, not a
/// server error), and the identity header is written only with names that pass it.
pub fn is_valid_username(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

/// Extracts the token from `Authorization: Bearer <jwt>`. Two `Authorization` headers are a
/// client bug or an attack (which one would a back end read?), so they are refused outright.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<&str, RequestError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(RequestError::MissingAuth)?;
    if values.next().is_some() {
        return Err(RequestError::BadRequest(
            "Multiple Authorization headers".into(),
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| RequestError::InvalidToken("Invalid Authorization header"))?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(RequestError::InvalidToken(
        "Missing 'Bearer' type in 'Authorization' header. Expected 'Authorization: Bearer <JWT>'",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(RequestError::InvalidToken(
            "Missing 'Bearer' type in 'Authorization' header. Expected 'Authorization: Bearer <JWT>'",
        ));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(RequestError::InvalidToken("Invalid token"));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(header::AUTHORIZATION, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token(&headers(&["bearer abc"])).unwrap(), "abc");
        assert_eq!(bearer_token(&headers(&["BEARER  abc "])).unwrap(), "abc");
    }

    #[test]
    fn missing_two_and_wrong_scheme_are_refused() {
        assert!(matches!(
            bearer_token(&headers(&[])),
            Err(RequestError::MissingAuth)
        ));
        assert!(matches!(
            bearer_token(&headers(&["Bearer a", "Bearer b"])),
            Err(RequestError::BadRequest(_))
        ));
        assert!(matches!(
            bearer_token(&headers(&["Basic abc"])),
            Err(RequestError::InvalidToken(_))
        ));
        assert!(matches!(
            bearer_token(&headers(&["Bearer"])),
            Err(RequestError::InvalidToken(_))
        ));
    }
}
