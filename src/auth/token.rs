//! Tokens: issuing and verifying the gateway's JWTs.
//!
//! This module owns the token format (the claim set in [`Claims`]), the signing and
//! verification keys, and every rule a token must pass before the gateway believes it. It does
//! no I/O: revocation lives in the store, which the caller consults *after* [`Tokens::verify`]
//! succeeded, using the `jti` it returns.
//!
//! Keys, the header and the `jsonwebtoken` [`Validation`] are built once in [`Tokens::new`],
//! because [`Tokens::verify`] runs on every proxied request.
//!
//! Verification order matters for what a client is told. `jsonwebtoken` checks, in this order:
//! the header parses, its `alg` is the configured one, the signature, the claims parse, then
//! required claims, `exp`, `nbf` and `iss`. So [`TokenError::Expired`] is only ever returned for
//! a token whose signature is valid; a forged token is always just "invalid". On top of that we
//! check what `jsonwebtoken` does not: `exp` strictly per RFC 7519 (expired *at* `exp`), `iat`
//! not in the future, `jti` and `type` present, and `type` being the one the caller expects.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::keys::{self, Material, VerifyingKey};
use crate::config::TokenConfig;

/// Largest clock leeway honoured, in seconds (one year).
///
/// `jsonwebtoken` computes `now - leeway` in unsigned arithmetic, so an absurd leeway would
/// overflow; no sane deployment needs more than minutes.
const MAX_LEEWAY_SECS: u64 = 365 * 24 * 60 * 60;

/// What a token may be used for, carried in the `type` claim.
///
/// Access and refresh tokens are signed with the same key, so without this claim a long-lived
/// refresh token could be replayed as an access token (and vice versa).
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    /// Short-lived; presented on proxied requests and `/logout`.
    Access,
    /// Long-lived; presented only to `/refresh`, which rotates it.
    Refresh,
}

/// The claim set of every token keycard issues. All fields are required on verification.
///
/// This is the contract between keycard instances (and with anyone reading the tokens), which
/// is why it is a fixed struct rather than a free-form map.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Claims {
    /// The lowercased username; becomes the identity header upstream.
    pub sub: String,
    /// Issued at (unix seconds).
    pub iat: u64,
    /// Not before (unix seconds); equal to `iat` for tokens we issue.
    pub nbf: u64,
    /// Expiry (unix seconds); also bounds how long a revocation must be remembered.
    pub exp: u64,
    /// 128 random bits as 32 lowercase hex characters; the revocation key.
    pub jti: String,
    /// The configured issuer, so tokens from another deployment sharing a secret are refused.
    pub iss: String,
    /// Access or refresh, see [`TokenType`].
    #[serde(rename = "type")]
    pub token_type: TokenType,
    /// `tokens.audience`, when configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// The user's roles when the token was issued; routes may require one of them.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The user's session generation when issued; a later `/logout?all=true` moves it on.
    #[serde(default)]
    pub generation: u64,
    /// The refresh family: one id for the tokens descended from one login (RFC 9700 §4.14).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub family: String,
    /// Verified as another issuer's token (`[[issuers]]`), not one keycard issued.
    #[serde(skip)]
    pub external: bool,
}

/// The claims as they arrive, before we know they are all there.
///
/// Decoding into this (instead of [`Claims`]) lets a missing claim be reported as
/// "Missing claim" rather than being indistinguishable from a garbled token.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    iat: Option<u64>,
    nbf: Option<u64>,
    exp: Option<u64>,
    jti: Option<String>,
    iss: Option<String>,
    #[serde(rename = "type")]
    token_type: Option<TokenType>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    generation: u64,
    #[serde(default)]
    family: String,
}

/// Why a token was not accepted (or could not be made).
///
/// The messages are shown to clients as `{"msg": ...}`, so they are short, fixed strings and
/// never contain any part of the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Signature valid, but `exp` has passed. Kept apart because clients react differently
    /// (refresh instead of re-login), and the contract answers it without `invalid_token`.
    #[error("Token has expired")]
    Expired,
    /// Anything else wrong with a presented token; the reason is safe to show the client.
    #[error("{0}")]
    Invalid(&'static str),
    /// Issuing failed (no randomness, clock before 1970, key/algorithm mismatch): a server
    /// fault, never the client's.
    #[error("signing failed: {0}")]
    Signing(String),
}

/// What ties tokens to a login: the user's session generation and the refresh family.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// The user's generation in the store when the tokens are issued.
    pub generation: u64,
    /// The refresh family id; empty for a new one.
    pub family: String,
}

/// The tokens `/login` and `/refresh` hand out together.
#[derive(Debug, Clone)]
pub struct IssuedPair {
    /// The access token for `Authorization: Bearer`.
    pub access_token: String,
    /// The refresh token for `/refresh`.
    pub refresh_token: String,
    /// Access token lifetime in seconds, for the response's `expires_in`.
    pub expires_in: u64,
    /// The access token's `jti`, for the audit log (the token itself is never logged).
    pub access_jti: String,
}

/// Issues and verifies tokens with keys built once from [`TokenConfig`].
///
/// Shared by every request (wrap it in an `Arc`); all methods take `&self` and do no I/O.
#[derive(Clone)]
pub struct Tokens {
    /// The current key's private half; `None` only when the configured material was unusable
    /// (then nothing is issued and nothing verifies).
    signing: Option<EncodingKey>,
    header: Header,
    /// The current key first, then the previous ones; each with the validation rules for its
    /// own algorithm.
    keys: Vec<(VerifyingKey, Validation)>,
    jwks: Arc<str>,
    issuer: String,
    audience: Option<String>,
    access_ttl: u64,
    refresh_ttl: u64,
    leeway: u64,
}

/// Never prints keys: this struct ends up in `Debug` output of whatever holds it.
impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|(k, _)| k.kid.as_str()).collect();
        f.debug_struct("Tokens")
            .field("algorithm", &self.header.alg)
            .field("kids", &kids)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("access_ttl", &self.access_ttl)
            .field("refresh_ttl", &self.refresh_ttl)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    /// Builds keys, header and validation rules once, so verification does no setup per call.
    ///
    /// The config was validated, so the key material loads. If it does not (a config built in
    /// code with bad material), the error is logged and the result fails closed: every `issue`
    /// fails with [`TokenError::Signing`] and every `verify` as invalid, none accepts.
    pub fn new(config: &TokenConfig) -> Tokens {
        let leeway = config.leeway.as_secs().min(MAX_LEEWAY_SECS);
        if leeway < config.leeway.as_secs() {
            tracing::warn!(
                configured = config.leeway.as_secs(),
                used = leeway,
                "tokens.leeway is implausibly large; clamped"
            );
        }
        let validation = |alg: Algorithm| {
            let mut validation = Validation::new(alg);
            validation.algorithms = vec![alg];
            validation.set_issuer(&[config.issuer.as_str()]);
            let mut required = vec!["exp", "nbf", "iss", "sub"];
            match &config.audience {
                Some(aud) => {
                    validation.set_audience(&[aud]);
                    required.push("aud");
                }
                None => validation.validate_aud = false,
            }
            validation.set_required_spec_claims(&required);
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.leeway = leeway;
            validation
        };
        let current = if crate::config::is_hmac(config.algorithm) {
            Material::Secret(config.secret.expose_secret())
        } else {
            Material::PrivatePem(config.private_key.expose_secret())
        };
        let mut signing = None;
        let mut keys = Vec::new();
        match keys::load(&config.kid, config.algorithm, current) {
            Ok((key, encoding)) => {
                signing = encoding;
                keys.push((key, validation(config.algorithm)));
            }
            Err(e) => tracing::error!(kid = %config.kid, error = %e, "signing key unusable"),
        }
        for previous in &config.previous_keys {
            let material = if previous.public_key.is_empty() {
                Material::Secret(previous.secret.expose_secret())
            } else {
                Material::PublicPem(&previous.public_key)
            };
            let alg = previous.algorithm.unwrap_or(config.algorithm);
            match keys::load(&previous.kid, alg, material) {
                Ok((key, _)) => keys.push((key, validation(alg))),
                Err(e) => tracing::error!(kid = %previous.kid, error = %e, "previous key unusable"),
            }
        }
        let mut header = Header::new(config.algorithm);
        header.kid = Some(config.kid.clone());
        Tokens {
            signing,
            header,
            jwks: Arc::from(keys::jwks(keys.iter().map(|(k, _)| k))),
            keys,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            access_ttl: config.access_ttl.as_secs(),
            refresh_ttl: config.refresh_ttl.as_secs(),
            leeway,
        }
    }

    /// `tokens.issuer`.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The clock leeway in seconds.
    pub fn leeway(&self) -> u64 {
        self.leeway
    }

    /// The JWKS document (RFC 7517) of the public verification keys, for
    /// `GET /.well-known/jwks.json`; `{"keys":[]}` when every key is an HMAC secret.
    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// Signs a new token for `sub` of the given type; returns the token and its claims (the
    /// caller may need `jti`/`exp`, e.g. for logging, without decoding its own token).
    pub fn issue(
        &self,
        sub: &str,
        roles: &[String],
        token_type: TokenType,
    ) -> Result<(String, Claims), TokenError> {
        self.issue_in(&Session::default(), sub, roles, token_type)
    }

    /// [`Tokens::issue`] within a session: its generation and refresh family.
    pub fn issue_in(
        &self,
        session: &Session,
        sub: &str,
        roles: &[String],
        token_type: TokenType,
    ) -> Result<(String, Claims), TokenError> {
        let now =
            now_secs().ok_or_else(|| TokenError::Signing("system clock is before 1970".into()))?;
        let ttl = match token_type {
            TokenType::Access => self.access_ttl,
            TokenType::Refresh => self.refresh_ttl,
        };
        let claims = Claims {
            sub: sub.to_owned(),
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl),
            jti: new_jti()?,
            iss: self.issuer.clone(),
            token_type,
            aud: self.audience.clone(),
            roles: roles.to_vec(),
            generation: session.generation,
            family: session.family.clone(),
            external: false,
        };
        let key = self
            .signing
            .as_ref()
            .ok_or_else(|| TokenError::Signing("no usable signing key".into()))?;
        let token = jsonwebtoken::encode(&self.header, &claims, key)
            .map_err(|e| TokenError::Signing(e.to_string()))?;
        Ok((token, claims))
    }

    /// Issues the access + refresh pair that `/login` and `/refresh` return.
    /// `session.family` empty starts a new family (a login); a refresh passes its own.
    pub fn issue_pair(
        &self,
        sub: &str,
        roles: &[String],
        session: &Session,
    ) -> Result<IssuedPair, TokenError> {
        let mut session = session.clone();
        if session.family.is_empty() {
            session.family = new_jti()?;
        }
        let (access_token, access) = self.issue_in(&session, sub, roles, TokenType::Access)?;
        let (refresh_token, _) = self.issue_in(&session, sub, roles, TokenType::Refresh)?;
        Ok(IssuedPair {
            access_token,
            refresh_token,
            expires_in: self.access_ttl,
            access_jti: access.jti,
        })
    }

    /// How long a revocation entry for `claims` must live: until the token would stop being
    /// accepted, which is `exp` plus the clock leeway. A shorter entry would let a revoked
    /// token work again for the leeway's length.
    pub fn revocation_ttl(&self, claims: &Claims) -> Duration {
        (remaining(claims) + Duration::from_secs(self.leeway)).min(MAX_REVOCATION_TTL)
    }

    /// How long a refresh family's revocation must last: the longest any of its tokens can
    /// still be accepted.
    pub fn family_ttl(&self) -> Duration {
        Duration::from_secs(self.refresh_ttl.max(self.access_ttl) + self.leeway)
    }

    /// Unix second from which `claims`' token is no longer accepted: `exp` plus the leeway.
    pub fn accepted_until(&self, claims: &Claims) -> u64 {
        claims.exp.saturating_add(self.leeway)
    }

    /// Checks a presented token completely (except revocation, which needs the store) and
    /// returns its claims.
    ///
    /// The key is the one the header's `kid` names; a token without `kid` (minted before
    /// keys had ids, or by a tool) is tried against the current key only. Accepts only that
    /// key's algorithm, a valid signature, the configured issuer (and audience, when set), all
    /// claims present, `nbf`/`iat` not later than now + leeway, not expired (now + leeway
    /// before `exp`), and `type == expected`.
    pub fn verify(&self, token: &str, expected: TokenType) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| map_decode_error(e.kind()))?;
        let (key, validation) = match header.kid.as_deref() {
            None => self.keys.first(),
            Some(kid) => self.keys.iter().find(|(k, _)| k.kid == kid),
        }
        // An unknown `kid` (a retired key, another deployment's) is a signature that no key
        // of ours can verify.
        .ok_or(TokenError::Invalid("Signature verification failed"))?;
        let data = jsonwebtoken::decode::<RawClaims>(token, &key.decoding, validation)
            .map_err(|e| map_decode_error(e.kind()))?;

        // We never issue `crit`; if a token carries one we cannot honour it (RFC 7515 §4.1.11).
        if data.header.crit.is_some() {
            return Err(TokenError::Invalid("Invalid token"));
        }

        let raw = data.claims;
        // Roles become a header value and are compared with route rules: only plain names.
        if !raw.roles.iter().all(|r| crate::config::is_valid_role(r)) {
            return Err(TokenError::Invalid("Invalid roles"));
        }
        let (Some(sub), Some(iat), Some(nbf), Some(exp), Some(jti), Some(iss), Some(token_type)) = (
            raw.sub,
            raw.iat,
            raw.nbf,
            raw.exp,
            raw.jti,
            raw.iss,
            raw.token_type,
        ) else {
            return Err(TokenError::Invalid("Missing claim"));
        };

        // The subject becomes the identity header: a name that could not be one (CR, LF, NUL,
        // too long) is a token we refuse, not a request we fail on later. Names are issued
        // lowercased; an upper-case one would reach a case-sensitive back end as another user.
        if !super::is_valid_username(&sub) || sub.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(TokenError::Invalid("Invalid subject"));
        }

        let now = now_secs().ok_or(TokenError::Invalid("Invalid token"))?;
        // jsonwebtoken still accepts a token during the second `exp` itself; RFC 7519 §4.1.4
        // says the current time must be *before* `exp`.
        if now >= exp.saturating_add(self.leeway) {
            return Err(TokenError::Expired);
        }
        if iat > now.saturating_add(self.leeway) {
            return Err(TokenError::Invalid("Token issued in the future"));
        }
        // Already checked by jsonwebtoken; repeated so this function's guarantees do not hinge
        // on a dependency's defaults.
        if nbf > now.saturating_add(self.leeway) {
            return Err(TokenError::Invalid("Token not yet valid"));
        }
        if iss != self.issuer {
            return Err(TokenError::Invalid("Invalid issuer"));
        }
        if token_type != expected {
            return Err(TokenError::Invalid(match expected {
                TokenType::Access => "Only access tokens are allowed",
                TokenType::Refresh => "Only refresh tokens are allowed",
            }));
        }

        Ok(Claims {
            sub,
            iat,
            nbf,
            exp,
            jti,
            iss,
            token_type,
            aud: self.audience.clone(),
            roles: raw.roles,
            generation: raw.generation,
            family: raw.family,
            external: false,
        })
    }
}

/// The longest a revocation entry is kept. Tokens keycard issues live a year at most; this
/// only bounds a hand-made token with an absurd `exp`, whose entry would otherwise be an
/// expiry Redis refuses (so the token could never be revoked).
const MAX_REVOCATION_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Time left until `claims.exp`, at least one second.
pub fn remaining(claims: &Claims) -> Duration {
    let now = now_secs().unwrap_or(0);
    Duration::from_secs(claims.exp.saturating_sub(now).max(1))
}

/// Maps a `jsonwebtoken` failure to a client-safe reason. `ExpiredSignature` can only come
/// after the signature was verified (see the module docs), so it is safe to disclose.
fn map_decode_error(kind: &ErrorKind) -> TokenError {
    match kind {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::InvalidSignature => TokenError::Invalid("Signature verification failed"),
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            TokenError::Invalid("Invalid algorithm")
        }
        ErrorKind::InvalidIssuer => TokenError::Invalid("Invalid issuer"),
        ErrorKind::InvalidAudience => TokenError::Invalid("Invalid audience"),
        ErrorKind::ImmatureSignature => TokenError::Invalid("Token not yet valid"),
        ErrorKind::MissingRequiredClaim(_) => TokenError::Invalid("Missing claim"),
        _ => TokenError::Invalid("Invalid token"),
    }
}

/// Current unix time in seconds; `None` only if the clock is before 1970.
fn now_secs() -> Option<u64> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// 128 bits from the OS CSPRNG as 32 lowercase hex characters.
fn new_jti() -> Result<String, TokenError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| TokenError::Signing(format!("random source failed: {e}")))?;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut jti = String::with_capacity(32);
    for b in bytes {
        jti.push(char::from(HEX[usize::from(b >> 4)]));
        jti.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    Ok(jti)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn config(leeway: u64) -> TokenConfig {
        TokenConfig {
            secret: Secret::from(SECRET.to_vec()),
            leeway: Duration::from_secs(leeway),
            ..TokenConfig::default()
        }
    }

    fn tokens() -> Tokens {
        Tokens::new(&config(0))
    }

    fn now() -> u64 {
        now_secs().unwrap()
    }

    /// A claim set as we would issue it, as JSON, for tests to mutate.
    fn claims_json(token_type: &str) -> serde_json::Value {
        let now = now();
        json!({
            "sub": "alice", "iat": now, "nbf": now, "exp": now + 900,
            "jti": "0123456789abcdef0123456789abcdef", "iss": "keycard", "type": token_type,
        })
    }

    /// Signs arbitrary claims with the right key and algorithm.
    fn sign(claims: &serde_json::Value) -> String {
        sign_with(claims, Algorithm::HS256, SECRET)
    }

    fn sign_with(claims: &serde_json::Value, alg: Algorithm, secret: &[u8]) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn b64url(input: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
            for i in 0..=chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            }
        }
        out
    }

    fn invalid(result: Result<Claims, TokenError>) -> &'static str {
        match result {
            Err(TokenError::Invalid(reason)) => reason,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn roundtrip_access_and_refresh() {
        let t = tokens();
        for ty in [TokenType::Access, TokenType::Refresh] {
            let (token, issued) = t.issue("alice", &[], ty).unwrap();
            let claims = t.verify(&token, ty).unwrap();
            assert_eq!(claims.sub, "alice");
            assert_eq!(claims.jti, issued.jti);
            assert_eq!(claims.iss, "keycard");
            assert_eq!(claims.token_type, ty);
            assert_eq!(claims.iat, claims.nbf);
            let ttl = if ty == TokenType::Access {
                900
            } else {
                7 * 86400
            };
            assert_eq!(claims.exp, claims.iat + ttl);
        }
        let pair = t.issue_pair("bob", &[], &Session::default()).unwrap();
        assert_eq!(pair.expires_in, 900);
        assert_eq!(
            t.verify(&pair.access_token, TokenType::Access).unwrap().sub,
            "bob"
        );
        assert_eq!(
            t.verify(&pair.refresh_token, TokenType::Refresh)
                .unwrap()
                .sub,
            "bob"
        );
    }

    #[test]
    fn jti_is_unique_32_lowercase_hex() {
        let t = tokens();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let (_, claims) = t.issue("alice", &[], TokenType::Access).unwrap();
            assert_eq!(claims.jti.len(), 32);
            assert!(
                claims
                    .jti
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            );
            assert!(seen.insert(claims.jti));
        }
    }

    #[test]
    fn wrong_secret_is_rejected() {
        let token = sign_with(
            &claims_json("access"),
            Algorithm::HS256,
            b"another-secret-another-secret-xx",
        );
        assert_eq!(
            invalid(tokens().verify(&token, TokenType::Access)),
            "Signature verification failed"
        );
    }

    #[test]
    fn expired_with_wrong_secret_is_not_reported_as_expired() {
        let mut claims = claims_json("access");
        claims["exp"] = json!(now() - 3600);
        let token = sign_with(
            &claims,
            Algorithm::HS256,
            b"another-secret-another-secret-xx",
        );
        assert_eq!(
            invalid(tokens().verify(&token, TokenType::Access)),
            "Signature verification failed"
        );
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let t = tokens();
        let (token, _) = t.issue("alice", &[], TokenType::Access).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims = claims_json("access");
        claims["sub"] = json!("admin");
        let payload = b64url(claims.to_string().as_bytes());
        let forged = format!("{}.{}.{}", parts[0], payload, parts[2]);
        assert_eq!(
            invalid(t.verify(&forged, TokenType::Access)),
            "Signature verification failed"
        );
    }

    #[test]
    fn alg_none_is_rejected() {
        let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64url(claims_json("access").to_string().as_bytes());
        let t = tokens();
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
        ] {
            assert_eq!(
                invalid(t.verify(&token, TokenType::Access)),
                "Invalid token"
            );
        }
    }

    #[test]
    fn other_algorithms_are_rejected() {
        let t = tokens();
        let token = sign_with(&claims_json("access"), Algorithm::HS512, SECRET);
        assert_eq!(
            invalid(t.verify(&token, TokenType::Access)),
            "Invalid algorithm"
        );

        // An RS256 header over an HMAC signature made with the shared secret (the classic
        // key-confusion attack) must not get past the algorithm check.
        let header = b64url(br#"{"alg":"RS256","typ":"JWT"}"#);
        let payload = b64url(claims_json("access").to_string().as_bytes());
        let real = sign(&claims_json("access"));
        let sig = real.rsplit('.').next().unwrap();
        let token = format!("{header}.{payload}.{sig}");
        assert_eq!(
            invalid(t.verify(&token, TokenType::Access)),
            "Invalid algorithm"
        );
    }

    #[test]
    fn garbage_is_rejected() {
        let t = tokens();
        for token in [
            "",
            "abc",
            "a.b.c",
            "a.b",
            "....",
            "eyJ.eyJ.eyJ",
            "\u{0}.\u{0}.\u{0}",
        ] {
            assert_eq!(
                invalid(t.verify(token, TokenType::Access)),
                "Invalid token",
                "{token:?}"
            );
        }
        // Valid signature over a payload that is not a JSON object.
        let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = b64url(b"[1,2,3]");
        let message = format!("{header}.{payload}");
        let sig = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET),
            Algorithm::HS256,
        )
        .unwrap();
        assert_eq!(
            invalid(t.verify(&format!("{message}.{sig}"), TokenType::Access)),
            "Invalid token"
        );
    }

    #[test]
    fn wrong_issuer_is_rejected() {
        let mut claims = claims_json("access");
        claims["iss"] = json!("someone-else");
        assert_eq!(
            invalid(tokens().verify(&sign(&claims), TokenType::Access)),
            "Invalid issuer"
        );
        claims["iss"] = json!(["keycard", "someone-else"]);
        assert_eq!(
            invalid(tokens().verify(&sign(&claims), TokenType::Access)),
            "Invalid token"
        );
    }

    #[test]
    fn expired_is_distinguished() {
        let t = tokens();
        let mut claims = claims_json("access");
        claims["iat"] = json!(now() - 3600);
        claims["nbf"] = json!(now() - 3600);
        claims["exp"] = json!(now() - 60);
        assert!(matches!(
            t.verify(&sign(&claims), TokenType::Access),
            Err(TokenError::Expired)
        ));
        // Expired at exactly `exp` (RFC 7519: now must be before exp).
        claims["exp"] = json!(now());
        assert!(matches!(
            t.verify(&sign(&claims), TokenType::Access),
            Err(TokenError::Expired)
        ));
        assert_eq!(TokenError::Expired.to_string(), "Token has expired");
    }

    #[test]
    fn nbf_in_future_is_rejected() {
        let mut claims = claims_json("access");
        claims["nbf"] = json!(now() + 120);
        assert_eq!(
            invalid(tokens().verify(&sign(&claims), TokenType::Access)),
            "Token not yet valid"
        );
    }

    #[test]
    fn iat_in_future_is_rejected() {
        let mut claims = claims_json("access");
        claims["iat"] = json!(now() + 120);
        assert_eq!(
            invalid(tokens().verify(&sign(&claims), TokenType::Access)),
            "Token issued in the future"
        );
    }

    #[test]
    fn missing_claims_are_rejected() {
        let t = tokens();
        for claim in ["sub", "iat", "nbf", "exp", "jti", "iss", "type"] {
            let mut claims = claims_json("access");
            claims.as_object_mut().unwrap().remove(claim);
            assert_eq!(
                invalid(t.verify(&sign(&claims), TokenType::Access)),
                "Missing claim",
                "{claim}"
            );
        }
    }

    #[test]
    fn ill_typed_claims_are_rejected() {
        let t = tokens();
        for (claim, value) in [
            ("exp", json!("soon")),
            ("iat", json!(-1)),
            ("type", json!("admin")),
            ("sub", json!(42)),
        ] {
            let mut claims = claims_json("access");
            claims[claim] = value;
            assert!(
                t.verify(&sign(&claims), TokenType::Access).is_err(),
                "{claim}"
            );
        }
    }

    #[test]
    fn wrong_type_is_rejected() {
        let t = tokens();
        let (refresh, _) = t.issue("alice", &[], TokenType::Refresh).unwrap();
        assert_eq!(
            invalid(t.verify(&refresh, TokenType::Access)),
            "Only access tokens are allowed"
        );
        let (access, _) = t.issue("alice", &[], TokenType::Access).unwrap();
        assert_eq!(
            invalid(t.verify(&access, TokenType::Refresh)),
            "Only refresh tokens are allowed"
        );
    }

    #[test]
    fn crit_header_is_rejected() {
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp".into()]);
        let token = jsonwebtoken::encode(
            &header,
            &claims_json("access"),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(
            invalid(tokens().verify(&token, TokenType::Access)),
            "Invalid token"
        );
    }

    #[test]
    fn leeway_is_honoured() {
        let lenient = Tokens::new(&config(60));
        let strict = tokens();

        let mut expired = claims_json("access");
        expired["exp"] = json!(now() - 30);
        let token = sign(&expired);
        assert!(lenient.verify(&token, TokenType::Access).is_ok());
        assert!(matches!(
            strict.verify(&token, TokenType::Access),
            Err(TokenError::Expired)
        ));

        for claim in ["nbf", "iat"] {
            let mut early = claims_json("access");
            early[claim] = json!(now() + 30);
            let token = sign(&early);
            assert!(lenient.verify(&token, TokenType::Access).is_ok(), "{claim}");
            assert!(strict.verify(&token, TokenType::Access).is_err(), "{claim}");
        }

        let mut too_expired = claims_json("access");
        too_expired["exp"] = json!(now() - 120);
        assert!(matches!(
            lenient.verify(&sign(&too_expired), TokenType::Access),
            Err(TokenError::Expired)
        ));
    }

    #[test]
    fn remaining_is_time_to_exp_at_least_one_second() {
        let t = tokens();
        let (_, claims) = t.issue("alice", &[], TokenType::Access).unwrap();
        let left = remaining(&claims);
        assert!(left <= Duration::from_secs(900) && left >= Duration::from_secs(898));
        let mut past = claims.clone();
        past.exp = 0;
        assert_eq!(remaining(&past), Duration::from_secs(1));
    }

    #[test]
    fn debug_does_not_leak_secret() {
        let debug = format!("{:?}", tokens());
        assert!(!debug.contains("0123456789abcdef"));
        let bytes = format!("{:?}", SECRET.to_vec());
        assert!(!debug.contains(&bytes[1..20]));
        assert!(debug.contains("keycard"));
    }
}

#[cfg(test)]
mod revocation_tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn revocation_outlives_the_token_by_the_leeway() {
        let config = TokenConfig {
            secret: Secret::from(b"0123456789abcdef0123456789abcdef".to_vec()),
            access_ttl: Duration::from_secs(600),
            refresh_ttl: Duration::from_secs(3600),
            leeway: Duration::from_secs(30),
            ..TokenConfig::default()
        };
        let tokens = Tokens::new(&config);
        let (_, claims) = tokens.issue("alice", &[], TokenType::Access).unwrap();
        let ttl = tokens.revocation_ttl(&claims);
        assert!(
            ttl >= Duration::from_secs(629) && ttl <= Duration::from_secs(630),
            "{ttl:?}"
        );
    }
}
