//! Issuers: tokens from identity providers a team already runs (`[[issuers]]`).
//!
//! Each issuer's public keys come from its JWKS URL: fetched when the policy is built, used
//! for `cache_ttl`, fetched again when a token names an unknown `kid` (at most once per
//! `refetch_interval`), and kept when a fetch fails, so a flaky identity provider does not
//! log everyone out. Such tokens need `exp`, a signature by one of those keys with an allowed
//! algorithm, the issuer's `iss` (and `aud`, when set); they need not carry keycard's own
//! `nbf`, `type` or `jti`. keycard never issues tokens for these issuers.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tokio::time::Instant;

use super::token::{Claims, TokenError, TokenType};
use crate::config::{IssuerConfig, is_valid_role};

/// The largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Every configured issuer.
#[derive(Debug, Default)]
pub struct Issuers {
    issuers: Vec<Arc<Issuer>>,
}

/// One issuer, with its cached keys.
#[derive(Debug)]
struct Issuer {
    config: IssuerConfig,
    keys: ArcSwapOption<KeySet>,
    /// When the last fetch started; one fetch at a time.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

/// A fetched key set: `kid` → key.
struct KeySet {
    keys: Vec<(Option<String>, Algorithm, DecodingKey)>,
    fetched: Instant,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl Issuers {
    /// Builds the issuers and starts fetching their keys in the background.
    pub fn new(configs: &[IssuerConfig]) -> Issuers {
        let issuers: Vec<Arc<Issuer>> = configs
            .iter()
            .map(|config| {
                let mut http = HttpConnector::new();
                http.set_connect_timeout(Some(FETCH_TIMEOUT));
                http.enforce_http(false);
                // https:// against the Mozilla roots compiled in (the image has no system
                // store); http:// for a provider on a trusted network or a local proxy.
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_webpki_roots()
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http);
                Arc::new(Issuer {
                    config: config.clone(),
                    keys: ArcSwapOption::empty(),
                    fetching: tokio::sync::Mutex::new(None),
                    client: Client::builder(TokioExecutor::new()).build(connector),
                })
            })
            .collect();
        if tokio::runtime::Handle::try_current().is_ok() {
            for issuer in &issuers {
                let issuer = Arc::clone(issuer);
                tokio::spawn(async move { issuer.refresh(Duration::ZERO).await });
            }
        }
        Issuers { issuers }
    }

    /// Whether no `[[issuers]]` are configured (then no token's payload is looked at
    /// before verification).
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Whether `iss` is one of these issuers.
    pub fn knows(&self, iss: &str) -> bool {
        self.issuers.iter().any(|i| i.config.issuer == iss)
    }

    /// Verifies a token whose unverified `iss` is one of these issuers, into keycard's
    /// [`Claims`] (the user from `user_claim`, `roles` if present, `type` access).
    pub async fn verify(&self, token: &str, iss: &str, leeway: u64) -> Result<Claims, TokenError> {
        let issuer = (self.issuers.iter())
            .find(|i| i.config.issuer == iss)
            .ok_or(TokenError::Invalid("Invalid issuer"))?;
        issuer.verify(token, leeway).await
    }
}

/// The JWK's `alg`, or, when it has none (many providers leave it out), the one algorithm
/// keycard accepts for its key type.
fn jwk_algorithm(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
    if let Some(alg) = jwk.common.key_algorithm {
        return alg.to_string().parse().ok();
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            Some(Algorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Some(Algorithm::EdDSA)
        }
        _ => None,
    }
}

impl Issuer {
    async fn verify(&self, token: &str, leeway: u64) -> Result<Claims, TokenError> {
        let invalid = TokenError::Invalid;
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("Invalid token"))?;
        if !self.config.algorithms.contains(&header.alg) {
            return Err(invalid("Invalid algorithm"));
        }
        let key = self.key(header.kid.as_deref(), header.alg).await?;
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.set_issuer(&[self.config.issuer.as_str()]);
        validation.leeway = leeway;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "iss"];
        match &self.config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    invalid("Signature verification failed")
                }
                jsonwebtoken::errors::ErrorKind::InvalidAudience => invalid("Invalid audience"),
                jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(_) => {
                    invalid("Missing claim")
                }
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                    invalid("Token not yet valid")
                }
                _ => invalid("Invalid token"),
            },
        )?;
        let claims = data.claims;
        let user = claims[self.config.user_claim.as_str()]
            .as_str()
            .filter(|u| super::is_safe_identity(u))
            .ok_or(invalid("Invalid subject"))?;
        let number = |name: &str| claims[name].as_u64().unwrap_or(0);
        let exp = number("exp");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now >= exp.saturating_add(leeway) {
            return Err(TokenError::Expired);
        }
        // `nbf` and `iat` when present: numbers, and not in the future.
        for name in ["nbf", "iat"] {
            match &claims[name] {
                serde_json::Value::Null => {}
                v if v.as_u64().is_some_and(|t| t <= now.saturating_add(leeway)) => {}
                serde_json::Value::Number(_) => return Err(invalid("Token not yet valid")),
                _ => return Err(invalid("Invalid token")),
            }
        }
        let roles = (claims["roles"].as_array().into_iter().flatten())
            .filter_map(|r| r.as_str())
            .filter(|r| is_valid_role(r))
            .map(str::to_owned)
            .collect();
        Ok(Claims {
            sub: user.to_owned(),
            iat: number("iat"),
            nbf: number("nbf"),
            exp,
            // Revocable through `<prefix>revoked:<jti>` when the token has one.
            jti: claims["jti"].as_str().unwrap_or_default().to_owned(),
            iss: self.config.issuer.clone(),
            token_type: TokenType::Access,
            aud: self.config.audience.clone(),
            roles,
            // keycard's session generations are for tokens it issued.
            generation: u64::MAX,
            family: String::new(),
            external: true,
        })
    }

    /// The key for `kid`: from the cache while fresh; fetched when stale, and once more (at
    /// most every `refetch_interval`) for a `kid` the cache does not have.
    async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, TokenError> {
        let stale = match self.keys.load().as_deref() {
            None => true,
            Some(set) => set.fetched.elapsed() >= self.config.cache_ttl,
        };
        if stale {
            self.refresh(self.config.refetch_interval.min(self.config.cache_ttl))
                .await;
        }
        if let Some(key) = self.find(kid, alg) {
            return Ok(key);
        }
        self.refresh(self.config.refetch_interval).await;
        self.find(kid, alg)
            .ok_or(TokenError::Invalid("Signature verification failed"))
    }

    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let set = self.keys.load_full()?;
        let matching = set
            .keys
            .iter()
            .filter(|(k, a, _)| *a == alg && (kid.is_none() || k.as_deref() == kid));
        let mut matching = matching.map(|(_, _, key)| key.clone());
        let first = matching.next()?;
        // Without a `kid`, only an unambiguous set will do.
        (kid.is_some() || matching.next().is_none()).then_some(first)
    }

    /// Fetches the key set unless another fetch started within `min_interval`; a failure
    /// keeps the last good set and is logged.
    async fn refresh(&self, min_interval: Duration) {
        let mut last = self.fetching.lock().await;
        if last.is_some_and(|t| t.elapsed() < min_interval) {
            return;
        }
        *last = Some(Instant::now());
        match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(Ok(set)) => {
                tracing::info!(issuer = %self.config.issuer, keys = set.keys.len(), "issuer keys fetched");
                self.keys.store(Some(Arc::new(set)));
            }
            Ok(Err(error)) => {
                tracing::warn!(issuer = %self.config.issuer, %error, "cannot fetch issuer keys; keeping the last good set");
            }
            Err(_) => {
                tracing::warn!(issuer = %self.config.issuer, "issuer keys fetch timed out; keeping the last good set");
            }
        }
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let request = http::Request::get(self.config.jwks_url.0.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        // Key by key: one key of a type keycard does not know (an encryption key, a new `kty`)
        // is skipped, not a reason to refuse the whole set (RFC 7517 §5).
        #[derive(serde::Deserialize)]
        struct RawSet {
            keys: Vec<serde_json::Value>,
        }
        let set: RawSet = serde_json::from_slice(&body).map_err(|e| format!("not a JWKS: {e}"))?;
        let jwks: Vec<jsonwebtoken::jwk::Jwk> = set
            .keys
            .into_iter()
            .filter(|k| k.get("use").is_none_or(|u| u == "sig"))
            .filter_map(|k| serde_json::from_value(k).ok())
            .collect();
        let keys = jwks
            .iter()
            .filter_map(|jwk| {
                let alg = jwk_algorithm(jwk)?;
                let key = DecodingKey::from_jwk(jwk).ok()?;
                Some((jwk.common.key_id.clone(), alg, key))
            })
            .filter(|(_, alg, _)| self.config.algorithms.contains(alg))
            .collect();
        Ok(KeySet {
            keys,
            fetched: Instant::now(),
        })
    }
}
