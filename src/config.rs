//! Config: the TOML file, read once into typed, validated structs.
//!
//! serde reads the file straight into the typed structs below. Each field's type or
//! `deserialize_with` function carries its rule (a socket address, a duration with a unit and
//! bounds, an `http://` upstream), so no request ever re-parses a string, and the defaults
//! live in one place, the `Default` impls. What needs more than one key (required sections,
//! the secret, duplicate routes) is checked afterwards in [`Reader::validate`]. This module is
//! pure: no hyper server, no redis, no tokio.
//!
//! serde stops at the first error, but an operator wants every problem in one pass. So
//! [`Config::parse`] records the error, removes the offending key or array item from the
//! document, and reads again until the rest reads clean. Each error names its dotted key and,
//! from the TOML spans, its line and column.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::auth::keys;
use toml::de::{DeArray, DeTable, DeValue};

/// Re-exported so users of [`Secret`] need no direct secrecy dependency.
pub use secrecy::ExposeSecret;

/// The token signing key. secrecy keeps it out of `Debug` and zeroes it on drop.
pub type Secret = secrecy::SecretSlice<u8>;

/// The whole validated configuration. Built by [`Config::load`] or [`Config::parse`], or in
/// code from `Config::default()` (tests, `keycard dev`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The public listener and its connection limits.
    pub server: ServerConfig,
    /// The operator listener (health, readiness, metrics), kept apart from user traffic.
    pub admin: AdminConfig,
    /// Where users and revocations live.
    pub store: StoreConfig,
    /// How tokens are signed and checked.
    pub tokens: TokenConfig,
    /// Which headers carry the caller's identity upstream.
    pub identity: IdentityConfig,
    /// argon2id cost and how much hashing may run at once.
    pub passwords: PasswordConfig,
    /// Brute-force protection for `/login`.
    pub throttle: ThrottleConfig,
    /// Who may create users through `/register`.
    pub registration: RegistrationConfig,
    /// The endpoint an nginx, Traefik or Envoy in front asks before forwarding.
    pub forward_auth: ForwardAuthConfig,
    /// `[[issuers]]`: identity providers whose tokens are accepted too.
    pub issuers: Vec<IssuerConfig>,
    /// Routes in file order; the router sorts them for matching.
    pub routes: Vec<RouteConfig>,
}

/// `[server]`. Durations below are written with a unit (`"10s"`, `"1h30m"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// `server.listen` (required in a file).
    #[serde(deserialize_with = "parsed")]
    pub listen: SocketAddr,
    /// `server.trusted_proxies`: peers whose `X-Forwarded-*` we extend instead of replace.
    #[serde(deserialize_with = "list::<_, IpNet>")]
    pub trusted_proxies: Vec<IpNet>,
    /// `server.header_read_timeout`: slowloris protection.
    #[serde(deserialize_with = "duration::<_, 1, NO_MAX>")]
    pub header_read_timeout: Duration,
    /// `server.shutdown_delay`: after SIGTERM, how long `/readyz` answers 503 while the
    /// listener keeps serving, so load balancers (a Kubernetes Service's endpoints) stop
    /// sending new traffic before keycard stops accepting it. Read when the signal arrives, so
    /// a reload changes it.
    #[serde(deserialize_with = "duration::<_, 0, NO_MAX>")]
    pub shutdown_delay: Duration,
    /// `server.shutdown_timeout`: after the delay, how long in-flight requests may drain.
    #[serde(deserialize_with = "duration::<_, 0, NO_MAX>")]
    pub shutdown_timeout: Duration,
    /// `server.workers` (default: the number of CPUs): the runtime's worker threads, so a
    /// benchmark can give keycard as many as nginx has worker processes. Needs a restart.
    #[serde(deserialize_with = "int::<_, _, 1, 1024>")]
    pub workers: usize,
    /// `server.max_connections`: accepted connections beyond this wait.
    #[serde(deserialize_with = "int::<_, _, 1, U32>")]
    pub max_connections: usize,
    /// `server.max_header_bytes`: request headers adding up to more are 431. hyper's read
    /// buffer (and so the largest head) is at least 8 KiB; a limit below a few KiB would
    /// refuse ordinary browsers.
    #[serde(deserialize_with = "int::<_, _, 4096, MIB>")]
    pub max_header_bytes: usize,
    /// `server.max_target_bytes`: a longer request target is 414.
    #[serde(deserialize_with = "int::<_, _, 256, MIB>")]
    pub max_target_bytes: usize,
    /// `server.max_auth_body_bytes`: a larger auth endpoint body is 413.
    #[serde(deserialize_with = "int::<_, _, 256, MIB>")]
    pub max_auth_body_bytes: usize,
    /// `server.upgrade_recheck`: how often an upgraded (WebSocket) connection's token is
    /// checked again for revocation; it is also closed the moment the token expires.
    #[serde(deserialize_with = "duration::<_, 1, NO_MAX>")]
    pub upgrade_recheck: Duration,
    /// `server.upgrade_protocols` (lowercased): the only `Upgrade` protocols tunnelled. Any
    /// other is dropped and the request served as plain HTTP/1.1; `h2c` is refused here,
    /// since a tunnelled h2c connection would carry requests past every route and identity
    /// rule.
    #[serde(deserialize_with = "protocols")]
    pub upgrade_protocols: Vec<String>,
    /// `server.body_read_timeout`: an auth endpoint's whole body must arrive within this,
    /// else 408 and the connection is closed.
    #[serde(deserialize_with = "duration::<_, 1, NO_MAX>")]
    pub body_read_timeout: Duration,
    /// `server.body_idle_timeout`: a proxied request body that makes no progress for this
    /// long is cut and the connection closed.
    #[serde(deserialize_with = "duration::<_, 1, NO_MAX>")]
    pub body_idle_timeout: Duration,
    /// `server.h2_idle_timeout`: an HTTP/2 connection with no open stream for this long gets
    /// GOAWAY; keep-alive pings every half of it find dead peers.
    #[serde(deserialize_with = "duration::<_, 1, NO_MAX>")]
    pub h2_idle_timeout: Duration,
    /// `[server.tls]`: when present, the public listener speaks only TLS. Whether it is
    /// present needs a restart; its files are reloaded.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: the public listener's certificate. Both keys are required.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// `server.tls.cert_file`: the certificate chain in PEM, leaf first.
    pub cert_file: PathBuf,
    /// `server.tls.key_file`: its private key in PEM (PKCS#8, RSA or SEC1).
    pub key_file: PathBuf,
    /// After validation: both files, parsed and checked to belong together.
    #[serde(skip)]
    pub cert: Option<crate::tls::ServerCert>,
}

impl TlsConfig {
    /// Reads and checks `cert_file` and `key_file` (configs built in code; a file's are
    /// checked by [`Config::parse`]). The error names the key at fault.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<TlsConfig, ConfigError> {
        let mut tls = TlsConfig {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            cert: None,
        };
        tls.cert = Some(tls.read().map_err(|(key, message)| ConfigError {
            key: key.to_owned(),
            position: None,
            message,
        })?);
        Ok(tls)
    }

    /// Both files, parsed: or the key at fault and what is wrong.
    fn read(&self) -> Result<crate::tls::ServerCert, (&'static str, String)> {
        const CERT: &str = "server.tls.cert_file";
        const KEY: &str = "server.tls.key_file";
        let cert = read_small_file(&self.cert_file, MAX_PEM_FILE_BYTES).map_err(|e| {
            (
                CERT,
                format!("cannot read {}: {e}", self.cert_file.display()),
            )
        })?;
        let key = read_small_file(&self.key_file, MAX_SECRET_FILE_BYTES)
            .map(Secret::from)
            .map_err(|e| (KEY, format!("cannot read {}: {e}", self.key_file.display())))?;
        crate::tls::ServerCert::from_pem(&cert, key.expose_secret()).map_err(|(file, message)| {
            match file {
                crate::tls::TlsFile::Cert => {
                    (CERT, format!("{}: {message}", self.cert_file.display()))
                }
                crate::tls::TlsFile::Key => {
                    (KEY, format!("{}: {message}", self.key_file.display()))
                }
            }
        })
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: LOOPBACK_ANY_PORT,
            trusted_proxies: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            shutdown_delay: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(30),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_connections: 10_000,
            max_header_bytes: 32 * 1024,
            max_target_bytes: 8 * 1024,
            max_auth_body_bytes: 16 * 1024,
            upgrade_recheck: Duration::from_secs(10),
            upgrade_protocols: vec!["websocket".to_owned()],
            body_read_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            h2_idle_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// `admin.listen` (required in a file).
    #[serde(deserialize_with = "parsed")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: LOOPBACK_ANY_PORT,
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `store.url` (required in a file): which backend.
    #[serde(deserialize_with = "parsed")]
    pub url: StoreUrl,
    /// `store.prefix`, put before every key.
    pub prefix: String,
    /// `store.timeout`, the command timeout: the longest any one store operation may take,
    /// waiting for a connection included, before the request fails closed (503). A hung
    /// store must not hang requests.
    #[serde(deserialize_with = "duration::<_, 1, NO_MAX>")]
    pub timeout: Duration,
    /// `store.connect_timeout`: how long one attempt to open a connection (TCP, TLS
    /// handshake, `AUTH`/`HELLO`) may take. Separate from `timeout` because a TLS handshake
    /// to a distant Redis may need longer than a command, and a silent address must not hold
    /// a reconnect forever.
    #[serde(deserialize_with = "duration::<_, 1, NO_MAX>")]
    pub connect_timeout: Duration,
    /// `store.ca_file`: a PEM file of CA certificates that a `rediss://` server's
    /// certificate must chain to, instead of the built-in public roots (for a private CA).
    pub ca_file: Option<PathBuf>,
    /// The PEM read from `ca_file` by validation (certificates, not secret).
    #[serde(skip)]
    pub ca: Option<Vec<u8>>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: StoreUrl::Memory,
            prefix: "keycard:".to_owned(),
            timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            ca_file: None,
            ca: None,
        }
    }
}

/// The parsed `store.url`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory://`: embedded, single instance.
    Memory,
    /// `redis://…` or `rediss://…` (TLS), kept as written (it may carry a password, so
    /// `Debug` hides it).
    Redis(String),
    /// `redis+cluster://host:port,host:port,…` (or `rediss+cluster://`, TLS): a Redis
    /// Cluster, as the seed nodes' URLs (`redis://[user:password@]host:port`, `rediss://` for
    /// TLS), each with the credentials written on it or, failing that, the first node's. Any
    /// node that answers is enough to find the others.
    Cluster(Vec<String>),
}

impl StoreUrl {
    /// Whether the store is reached over TLS (`rediss://`, `rediss+cluster://`): what
    /// `store.ca_file` needs, and what the logs may say about the store.
    pub fn is_tls(&self) -> bool {
        match self {
            StoreUrl::Memory => false,
            StoreUrl::Redis(url) => url.starts_with("rediss://"),
            StoreUrl::Cluster(nodes) => nodes.iter().all(|n| n.starts_with("rediss://")),
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = if self.is_tls() { "s" } else { "" };
        match self {
            StoreUrl::Memory => f.write_str("memory://"),
            StoreUrl::Redis(_) => write!(f, "redis{s}://<redacted>"),
            StoreUrl::Cluster(nodes) => {
                write!(f, "redis{s}+cluster://<{} nodes redacted>", nodes.len())
            }
        }
    }
}

/// `[tokens]`. Token times are whole seconds, so a TTL under one second would issue tokens
/// that are already expired. A year at most: a revocation entry lives as long as its token,
/// and a token that outlives any sane entry could not be revoked. Leeway is clock skew, not a
/// policy knob: more than five minutes is a misconfiguration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// `tokens.algorithm`: HS256, HS384, HS512, RS256, ES256 or EdDSA; the current key signs
    /// with it and is accepted only with it.
    #[serde(deserialize_with = "parsed")]
    pub algorithm: jsonwebtoken::Algorithm,
    /// `tokens.secret` (HS*), or after validation the contents of `tokens.secret_file`.
    #[serde(deserialize_with = "secret")]
    pub secret: Secret,
    /// `tokens.secret_file`: where the secret was read from, if not inline.
    pub secret_file: Option<PathBuf>,
    /// `tokens.private_key_file` (RS256, ES256, EdDSA): a PEM private key.
    pub private_key_file: Option<PathBuf>,
    /// The PEM read from `private_key_file` by validation.
    #[serde(skip)]
    pub private_key: Secret,
    /// `tokens.kid`: the key id put in every token's header.
    #[serde(deserialize_with = "non_empty")]
    pub kid: String,
    /// `tokens.audience`: put in every token's `aud`, and required there on verification.
    #[serde(deserialize_with = "non_empty_some")]
    pub audience: Option<String>,
    /// `[[tokens.previous_keys]]`: keys that still verify, never sign.
    pub previous_keys: Vec<PreviousKey>,
    /// `tokens.issuer`.
    #[serde(deserialize_with = "non_empty")]
    pub issuer: String,
    /// `tokens.access_ttl`.
    #[serde(deserialize_with = "duration::<_, SECOND, YEAR>")]
    pub access_ttl: Duration,
    /// `tokens.refresh_ttl`.
    #[serde(deserialize_with = "duration::<_, SECOND, YEAR>")]
    pub refresh_ttl: Duration,
    /// `tokens.leeway`: clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(deserialize_with = "duration::<_, 0, FIVE_MINUTES>")]
    pub leeway: Duration,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            algorithm: jsonwebtoken::Algorithm::HS256,
            secret: Secret::default(),
            secret_file: None,
            private_key_file: None,
            private_key: Secret::default(),
            kid: "default".to_owned(),
            audience: None,
            previous_keys: Vec::new(),
            issuer: "keycard".to_owned(),
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(7 * 24 * 3600),
            leeway: Duration::ZERO,
        }
    }
}

/// One `[[tokens.previous_keys]]` entry: a retired signing key that still verifies.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreviousKey {
    /// `kid` (required): tokens whose header names it are checked with this key.
    #[serde(deserialize_with = "non_empty")]
    pub kid: String,
    /// `algorithm`: by default `tokens.algorithm` for a secret (HS256 if that is not HS*),
    /// and the key's own type for a key file. Set by validation.
    #[serde(deserialize_with = "parsed_some")]
    pub algorithm: Option<jsonwebtoken::Algorithm>,
    /// `public_key_file`: a PEM public key (RS256, ES256, EdDSA).
    pub public_key_file: Option<PathBuf>,
    /// The PEM read from `public_key_file` by validation.
    #[serde(skip)]
    pub public_key: Vec<u8>,
    /// `secret` (HS*), or after validation the contents of `secret_file`.
    #[serde(deserialize_with = "secret")]
    pub secret: Secret,
    /// `secret_file`.
    pub secret_file: Option<PathBuf>,
}

/// `[identity]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// `identity.user_header`: where the username goes.
    #[serde(deserialize_with = "parsed")]
    pub user_header: HeaderName,
    /// `identity.prefix`, lowercased with `_` and `.` folded to `-`: every client header whose
    /// folded name starts with it is removed.
    #[serde(deserialize_with = "identity_prefix")]
    pub prefix: String,
    /// `[identity.claims]`: token claims sent upstream, claim name → header name (for
    /// example `roles = "X-Auth-Roles"`). Arrays become comma-separated values.
    #[serde(deserialize_with = "claim_headers")]
    pub claims: Vec<(String, HeaderName)>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            user_header: HeaderName::from_static("x-auth-user"),
            prefix: "x-auth-".to_owned(),
            claims: Vec::new(),
        }
    }
}

/// `[passwords]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PasswordConfig {
    /// `passwords.memory_kib` (OWASP's 19 MiB by default, 1 GiB at most: each hash running
    /// allocates this much, and an allocation that fails aborts the process).
    #[serde(deserialize_with = "int::<_, _, 8, GIB_IN_KIB>")]
    pub memory_kib: u32,
    /// `passwords.iterations`.
    #[serde(deserialize_with = "int::<_, _, 1, U32>")]
    pub iterations: u32,
    /// `passwords.parallelism` (argon2 caps lanes at 2^24 - 1).
    #[serde(deserialize_with = "int::<_, _, 1, 0x00FF_FFFF>")]
    pub parallelism: u32,
    /// `passwords.max_concurrent` (default: number of CPUs): hashes running at once.
    #[serde(deserialize_with = "int::<_, _, 1, U32>")]
    pub max_concurrent: usize,
    /// `passwords.queue_timeout`: how long a login may wait for a hashing slot before it is
    /// answered 503 with `Retry-After`.
    #[serde(deserialize_with = "duration::<_, 0, NO_MAX>")]
    pub queue_timeout: Duration,
    /// `passwords.max_queue`: logins and registrations waiting for a slot beyond this are
    /// answered 503 at once, so a login storm cannot pile up unbounded work.
    #[serde(deserialize_with = "int::<_, _, 0, U32>")]
    pub max_queue: usize,
}

impl Default for PasswordConfig {
    fn default() -> Self {
        PasswordConfig {
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
            max_concurrent: std::thread::available_parallelism().map_or(1, |n| n.get()),
            queue_timeout: Duration::from_secs(5),
            max_queue: 64,
        }
    }
}

/// `[throttle]`: failed-login limits, counted in the store so every replica shares them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleConfig {
    /// `throttle.user_limit` (0 disables): failed logins per username per window.
    #[serde(deserialize_with = "int::<_, _, 0, U32>")]
    pub user_limit: u64,
    /// `throttle.user_window` (a year at most: the store's expiry must be representable).
    #[serde(deserialize_with = "duration::<_, SECOND, YEAR>")]
    pub user_window: Duration,
    /// `throttle.address_limit` (0 disables): failed logins per client address per window.
    #[serde(deserialize_with = "int::<_, _, 0, U32>")]
    pub address_limit: u64,
    /// `throttle.address_window` (a year at most).
    #[serde(deserialize_with = "duration::<_, SECOND, YEAR>")]
    pub address_window: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            user_limit: 5,
            user_window: Duration::from_secs(15 * 60),
            address_limit: 50,
            address_window: Duration::from_secs(15 * 60),
        }
    }
}

/// `[registration]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationConfig {
    /// `registration.enabled`: false answers `/register` with 403, so only operators create
    /// users (`keycard user add`).
    pub enabled: bool,
    /// `registration.default_roles`: the roles of self-registered users.
    #[serde(deserialize_with = "roles")]
    pub default_roles: Vec<String>,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        RegistrationConfig {
            enabled: true,
            default_roles: Vec::new(),
        }
    }
}

/// One `[[issuers]]` entry: an identity provider whose tokens keycard accepts (it never
/// issues tokens for it).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IssuerConfig {
    /// `issuer` (required): the `iss` its tokens carry; picks this entry.
    #[serde(deserialize_with = "non_empty")]
    pub issuer: String,
    /// `jwks_url` (required): where its public keys are, `https://` (or `http://`).
    #[serde(deserialize_with = "parsed")]
    pub jwks_url: JwksUrl,
    /// `audience`: required in `aud` when set.
    #[serde(deserialize_with = "non_empty_some")]
    pub audience: Option<String>,
    /// `algorithms` (default `["RS256"]`): RS256, ES256, EdDSA.
    #[serde(deserialize_with = "list")]
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// `user_claim` (default `sub`): the claim that names the user.
    #[serde(deserialize_with = "non_empty")]
    pub user_claim: String,
    /// `cache_ttl` (default 5m): how long a fetched key set is used before it is fetched again.
    #[serde(deserialize_with = "duration::<_, SECOND, YEAR>")]
    pub cache_ttl: Duration,
    /// `refetch_interval` (default 30s): a token with an unknown `kid` fetches the set again,
    /// at most this often.
    #[serde(deserialize_with = "duration::<_, SECOND, YEAR>")]
    pub refetch_interval: Duration,
}

impl Default for IssuerConfig {
    fn default() -> Self {
        IssuerConfig {
            issuer: String::new(),
            jwks_url: JwksUrl(http::Uri::from_static("http://127.0.0.1/jwks.json")),
            audience: None,
            algorithms: vec![jsonwebtoken::Algorithm::RS256],
            user_claim: "sub".to_owned(),
            cache_ttl: Duration::from_secs(300),
            refetch_interval: Duration::from_secs(30),
        }
    }
}

/// The `https://` (or `http://`) URL of a JWKS document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksUrl(pub http::Uri);

impl Parse for JwksUrl {
    fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s.parse().map_err(|_| "not a URL".to_owned())?;
        let scheme_ok = matches!(uri.scheme_str(), Some("https" | "http"));
        if !scheme_ok
            || uri.host().is_none_or(str::is_empty)
            || uri.authority().is_some_and(|a| a.as_str().contains('@'))
        {
            return Err(
                "expected https://host[:port]/path (or http:// on a trusted network)".to_owned(),
            );
        }
        Ok(JwksUrl(uri))
    }
}

/// `[forward_auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardAuthConfig {
    /// `forward_auth.enabled`: false leaves `path` to the routes like any other path.
    pub enabled: bool,
    /// `forward_auth.path` (default `/_keycard/verify`), on `server.listen`.
    #[serde(deserialize_with = "route_path")]
    pub path: String,
}

impl Default for ForwardAuthConfig {
    fn default() -> Self {
        ForwardAuthConfig {
            enabled: true,
            path: "/_keycard/verify".to_owned(),
        }
    }
}

/// Whether a route needs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A valid, unrevoked access token is required.
    Required,
    /// Forwarded without a token; identity headers are still stripped.
    Public,
    /// No token: forwarded with no identity. A valid token: its identity is injected. An
    /// invalid one: 401 (Flask-JWT-Extended's `optional=True`).
    Optional,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// `path` (required in a file): a canonical prefix such as `/` or `/api` (no trailing
    /// slash except `/`), matched on whole segments.
    #[serde(deserialize_with = "route_path")]
    pub path: String,
    /// `upstream` (required in a file): where matching requests go.
    #[serde(deserialize_with = "parsed")]
    pub upstream: Upstream,
    /// `auth`.
    #[serde(deserialize_with = "parsed")]
    pub auth: AuthMode,
    /// `roles`: with `auth = "required"`, the token must carry one of them, else 403.
    #[serde(deserialize_with = "roles")]
    pub roles: Vec<String>,
    /// `strip_prefix`: remove `path` before forwarding.
    pub strip_prefix: bool,
    /// `forward_token`: pass the client's `Authorization` upstream.
    pub forward_token: bool,
    /// `connect_timeout`.
    #[serde(deserialize_with = "duration::<_, 1, NO_MAX>")]
    pub connect_timeout: Duration,
    /// `timeout`: until the upstream's response headers arrive.
    #[serde(deserialize_with = "duration::<_, 1, NO_MAX>")]
    pub timeout: Duration,
    /// `ca_file`: for an `https://` upstream, the PEM file of the only CAs its certificate
    /// may chain to (default: the Mozilla roots compiled in).
    pub ca_file: Option<PathBuf>,
    /// After validation: the certificates of `ca_file`.
    #[serde(skip)]
    pub ca: Option<crate::tls::UpstreamCa>,
}

impl RouteConfig {
    /// Reads `path` as this route's `ca_file` (configs built in code; a file's is read by
    /// [`Config::parse`]).
    pub fn with_ca_file(mut self, path: &Path) -> Result<RouteConfig, String> {
        let pem = read_small_file(path, MAX_PEM_FILE_BYTES)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let ca = crate::tls::UpstreamCa::from_pem(&pem)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        self.ca_file = Some(path.to_path_buf());
        self.ca = Some(ca);
        Ok(self)
    }
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            path: "/".to_owned(),
            upstream: Upstream {
                scheme: http::uri::Scheme::HTTP,
                authority: http::uri::Authority::from_static("127.0.0.1:80"),
                base_path: String::new(),
            },
            auth: AuthMode::Required,
            roles: Vec::new(),
            strip_prefix: false,
            forward_token: false,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
            ca_file: None,
            ca: None,
        }
    }
}

/// A parsed `http://host:port[/base]` or `https://host:port[/base]` upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http` or `https` (then verified: see `ca_file`).
    pub scheme: http::uri::Scheme,
    /// `host:port`.
    pub authority: http::uri::Authority,
    /// Path prefix put before the forwarded path; empty or `/x` without trailing slash.
    pub base_path: String,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key such as `tokens.secret` or `routes[1].upstream`; empty for syntax errors.
    pub key: String,
    /// 1-based line and column when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some((line, col)) = self.position {
            write!(f, "line {line}, column {col}: ")?;
        }
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in one file, so they can all be fixed at once.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    /// The file the errors are in (or `<string>`).
    pub file: PathBuf,
    /// At least one error.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {e}", self.file.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads and validates the file at `path`, resolving `${VAR}` from the process
    /// environment and `secret_file` relative to the working directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Config::load_with(path, &|name| std::env::var(name).ok())
    }

    /// Reads and validates the file at `path`, resolving `${VAR}` with `env` (the reloader
    /// and tests pass their own).
    pub fn load_with(
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let text = read_small_file(path, MAX_CONFIG_BYTES)
            .and_then(|bytes| String::from_utf8(bytes).map_err(|e| e.to_string()))
            .map_err(|e| ConfigErrors {
                file: path.to_path_buf(),
                errors: vec![ConfigError {
                    key: String::new(),
                    position: None,
                    message: format!("cannot read file: {e}"),
                }],
            })?;
        Config::parse(&text, path, env)
    }

    /// Validates TOML text. `env` resolves `${VAR}`; tests pass a closure instead of touching
    /// the process environment. Every problem is collected before failing, so one run of
    /// `keycard check` lists them all, in file order.
    pub fn parse(
        text: &str,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut reader = Reader {
            text,
            keys: Vec::new(),
            by_name: HashMap::new(),
            errors: Vec::new(),
        };
        let config = reader.read(env).map(|c| reader.validate(c));
        let mut errors = reader.errors;
        // Those without a position (missing sections) go last; the sort is stable.
        errors.sort_by_key(|e| e.position.unwrap_or((usize::MAX, usize::MAX)));
        match config {
            Some(config) if errors.is_empty() => Ok(config),
            _ => Err(ConfigErrors {
                file: file.to_path_buf(),
                errors,
            }),
        }
    }

    /// Settings that are valid but risky, for `keycard check` to warn about: each line names
    /// the key and why. (The file still runs; these are judgement calls for the operator.)
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if matches!(self.store.url, StoreUrl::Memory) {
            warnings.push(
                "store.url is memory://: users and revocations live in one process, are not \
                 shared with replicas and are lost on restart"
                    .to_owned(),
            );
        }
        if self.registration.enabled {
            warnings.push(
                "registration.enabled is true: anyone who can reach keycard can create an \
                 account (and successful sign-ups are not rate-limited)"
                    .to_owned(),
            );
        }
        if self.server.tls.is_none() && self.server.trusted_proxies.is_empty() {
            warnings.push(
                "no TLS and no trusted proxy in front: [server.tls] is absent and \
                 server.trusted_proxies is empty, so tokens and passwords cross the network in \
                 clear unless keycard only listens on a private network; set [server.tls], or \
                 put a TLS-terminating proxy in front and list it in server.trusted_proxies"
                    .to_owned(),
            );
        }
        // keycard's own tokens and the `[[issuers]]`' are accepted side by side; with an HS*
        // key, every party that checks keycard's tokens (the issuers' side of a federation,
        // services beside it) must hold the very secret that mints them.
        if is_hmac(self.tokens.algorithm) && !self.issuers.is_empty() {
            warnings.push(format!(
                "tokens.algorithm is {:?} with [[issuers]] configured: an HS key must be shared                  with whoever verifies keycard's tokens, and anyone holding it can mint them for                  any user; an asymmetric key (RS256, ES256, EdDSA) lets others verify with the                  public JWKS instead",
                self.tokens.algorithm
            ));
        }
        if self.tokens.access_ttl > Duration::from_secs(3600) {
            warnings.push(format!(
                "tokens.access_ttl is {}: a copied access token is good that long unless it is \
                 revoked; 15m to 1h is usual",
                humantime::format_duration(self.tokens.access_ttl)
            ));
        }
        warnings
    }

    /// A table of the resolved routes for `keycard check`: what an operator needs to see to
    /// trust the file does what they meant. Routes are listed longest path first, the order
    /// they are matched in. Never shows the secret or a store URL (it may carry a password).
    pub fn describe_routes(&self) -> String {
        let store = match &self.store.url {
            StoreUrl::Memory => "memory (embedded, single instance)",
            StoreUrl::Redis(_) if self.store.url.is_tls() => "redis (TLS)",
            StoreUrl::Redis(_) => "redis",
            StoreUrl::Cluster(_) if self.store.url.is_tls() => "redis cluster (TLS)",
            StoreUrl::Cluster(_) => "redis cluster",
        };
        let plural = if self.routes.len() == 1 { "" } else { "s" };
        let tls = if self.server.tls.is_some() {
            " (TLS)"
        } else {
            ""
        };
        let mut out = format!(
            "listen {}{tls}, admin {}, store {store}, {} route{plural}\n",
            self.server.listen,
            self.admin.listen,
            self.routes.len(),
        );
        let mut routes: Vec<&RouteConfig> = self.routes.iter().collect();
        routes.sort_by(|a, b| b.path.len().cmp(&a.path.len()).then(a.path.cmp(&b.path)));
        let mut rows = vec![["PATH", "AUTH", "UPSTREAM", "FLAGS"].map(String::from)];
        rows.extend(routes.iter().map(|r| {
            let flags = [
                ("strip_prefix", r.strip_prefix),
                ("forward_token", r.forward_token),
                ("ca_file", r.ca_file.is_some()),
            ]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(",");
            let mut auth = format!("{:?}", r.auth).to_lowercase();
            if !r.roles.is_empty() {
                auth = format!("{auth} (roles {})", r.roles.join(","));
            }
            let flags = if flags.is_empty() { "-".into() } else { flags };
            [r.path.clone(), auth, r.upstream.to_string(), flags]
        }));
        let width = |i: usize| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0);
        let (w0, w1, w2) = (width(0), width(1), width(2));
        for [path, auth, upstream, flags] in &rows {
            let line = format!("  {path:<w0$}  {auth:<w1$}  {upstream:<w2$}  {flags}");
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Reading: every error in one pass.

type Span = std::ops::Range<usize>;

/// A key present in the file: its dotted name (`routes[1].path`) and where its key and value
/// are. Names come from the file as written, so they stay right while failed keys are removed.
struct Key {
    name: String,
    key_span: Span,
    value_span: Span,
}

/// One read of one file: the source (for positions), the keys in it, the errors so far.
struct Reader<'a> {
    text: &'a str,
    keys: Vec<Key>,
    /// `keys` by name.
    by_name: HashMap<String, usize>,
    errors: Vec<ConfigError>,
}

/// The most errors reported for one file.
const MAX_ERRORS: usize = 50;

impl Reader<'_> {
    /// Parses the TOML, resolves `${VAR}`, and deserializes, removing each key that fails
    /// and reading again, so one pass reports every bad value. `None` when even that fails.
    fn read(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Option<Config> {
        let (mut doc, syntax) = DeTable::parse_recoverable(self.text);
        for (k, v) in doc.get_ref().iter() {
            index(k.get_ref().to_string(), k.span(), v, &mut self.keys);
        }
        self.by_name = (self.keys.iter().enumerate())
            .map(|(i, k)| (k.name.clone(), i))
            .collect();
        if !syntax.is_empty() {
            let mut last_line = 0;
            for e in syntax.iter().take(MAX_ERRORS) {
                let span = e.span().unwrap_or_default();
                // One per line: what follows a syntax error on its line is mostly its echo.
                let line = line_col(self.text, span.start).0;
                if std::mem::replace(&mut last_line, line) == line {
                    continue;
                }
                let key = self.section_before(span.start).unwrap_or_default();
                let written = self.text.get(span.clone()).unwrap_or_default();
                let key = match e.message().contains("duplicate key") {
                    true if key.is_empty() => written.to_owned(),
                    true => format!("{key}.{written}"),
                    false => String::new(),
                };
                let message = format!("invalid TOML: {}", e.message().trim_end());
                self.error(key, e.span(), message);
            }
            // A duplicate is dropped and the first one kept, so the rest of the document is
            // sound and can still be checked; after any other syntax error it may not be.
            if syntax
                .iter()
                .any(|e| !e.message().contains("duplicate key"))
            {
                return None;
            }
        }
        let mut unresolved = Vec::new();
        for (_, v) in doc.get_mut().iter_mut() {
            interpolate_all(v, env, &mut unresolved);
        }
        for (span, message) in unresolved.into_iter().take(MAX_ERRORS) {
            self.error_at(&span, message);
            remove_at(doc.get_mut(), &span);
        }
        // Each failed read costs a pass over the file: bounded, so a file of thousands of bad
        // keys is reported in part, quickly, rather than in full after minutes.
        while self.errors.len() < MAX_ERRORS {
            match Config::deserialize(toml::de::Deserializer::from(doc.clone())) {
                Ok(config) => return Some(config),
                Err(e) => {
                    let span = e.span().unwrap_or_default();
                    let key = self.error_at(&span, e.message().to_owned());
                    if key.is_empty() || !remove_at(doc.get_mut(), &span) {
                        return None;
                    }
                }
            }
        }
        let message = format!("more than {MAX_ERRORS} errors; fix these and check again");
        self.error("", None, message);
        None
    }

    /// The table whose header (`[name]` or `[[name]]`, whose span holds its key) is the last
    /// one before `offset`: where a key written there belongs.
    fn section_before(&self, offset: usize) -> Option<String> {
        let header = |k: &&Key| {
            k.value_span.start <= k.key_span.start
                && k.key_span.end <= k.value_span.end
                && k.value_span.end <= offset
        };
        let last = self.keys.iter().filter(header);
        let last = last.max_by_key(|k| (k.value_span.start, k.name.len()))?;
        Some(last.name.clone())
    }

    /// The checks that need more than one key, or the file rather than the values.
    fn validate(&mut self, mut c: Config) -> Config {
        self.require("server", &["listen"]);
        self.require("admin", &["listen"]);
        self.require("store", &["url"]);
        // Hash tags (`{alice}`) pin a user's keys to one cluster slot; a brace in the prefix
        // would become the tag instead and put every key of every user in one slot.
        if matches!(c.store.url, StoreUrl::Cluster(_)) && c.store.prefix.contains(['{', '}']) {
            let message =
                "must not contain { or } with a redis+cluster:// store (they would be the hash tag)"
                    .to_owned();
            self.error_key("store.prefix", message);
        }
        self.ca_file(&mut c.store);
        if c.server.listen == c.admin.listen && self.value_span("admin.listen").is_some() {
            let message = "must differ from server.listen (they are two listeners)".to_owned();
            self.error_key("admin.listen", message);
        }
        self.keys(&mut c.tokens);
        self.tls(&mut c.server);
        for (i, route) in c.routes.iter_mut().enumerate() {
            self.route_ca(i, route);
        }
        let passwords = &c.passwords;
        if u64::from(passwords.memory_kib) < 8 * u64::from(passwords.parallelism) {
            let least = 8 * u64::from(passwords.parallelism);
            let message =
                format!("must be at least 8 × parallelism = {least} (argon2 needs 8 KiB per lane)");
            self.error_key("passwords.memory_kib", message);
        }
        let required = "at least one [[routes]] entry is required";
        match self.value_span("routes") {
            None => self.error("routes", None, required),
            Some(_) if self.has_error("routes") => {}
            Some(span) if c.routes.is_empty() => self.error("routes", Some(span), required),
            Some(_) => {}
        }
        for (i, route) in c.routes.iter().enumerate() {
            if !route.roles.is_empty() && route.auth != AuthMode::Required {
                let message = "roles need auth = \"required\"".to_owned();
                self.error_key(&format!("routes[{i}].roles"), message);
            }
        }
        let mut headers = vec![c.identity.user_header.clone()];
        for (claim, header) in &c.identity.claims {
            if headers.contains(header) {
                let message = format!("{header} is already the user header or another claim's");
                self.error_key(&format!("identity.claims.{claim}"), message);
            }
            headers.push(header.clone());
        }
        let mut seen = vec![c.tokens.issuer.as_str()];
        for (i, issuer) in c.issuers.iter().enumerate() {
            let name = format!("issuers[{i}]");
            self.require(&name, &["issuer", "jwks_url"]);
            if seen.contains(&issuer.issuer.as_str())
                && self.value_span(&format!("{name}.issuer")).is_some()
            {
                let message = "already used by tokens.issuer or another [[issuers]]".to_owned();
                self.error_key(&format!("{name}.issuer"), message);
            }
            seen.push(&issuer.issuer);
            if issuer.algorithms.iter().any(|a| is_hmac(*a)) || issuer.algorithms.is_empty() {
                let message =
                    "RS256, ES256 or EdDSA: another issuer's keys are public keys".to_owned();
                self.error_key(&format!("{name}.algorithms"), message);
            }
        }
        let mut i = 0;
        while self.value_span(&format!("routes[{i}]")).is_some() {
            self.require(&format!("routes[{i}]"), &["path", "upstream"]);
            i += 1;
        }
        if i == c.routes.len() {
            let mut seen: HashMap<&str, usize> = HashMap::new();
            for (i, route) in c.routes.iter().enumerate() {
                let key = format!("routes[{i}].path");
                let first = *seen.entry(route.path.as_str()).or_insert(i);
                if first != i && self.value_span(&key).is_some() {
                    let message = format!(
                        "duplicate route path {:?} (already used by routes[{first}])",
                        route.path
                    );
                    self.error_key(&key, message);
                }
            }
        }
        c
    }

    /// The signing key and the previous keys: the right kind of material for each algorithm,
    /// read from its file, and loaded once to prove it is a key. No message ever contains key
    /// material.
    fn keys(&mut self, t: &mut TokenConfig) {
        if self.has_error("tokens") || self.has_error("tokens.algorithm") {
            return;
        }
        let alg = t.algorithm;
        let material = if is_hmac(alg) {
            self.forbid(
                "tokens",
                "private_key_file",
                "tokens.secret or tokens.secret_file",
            );
            self.secret("tokens", &mut t.secret, &t.secret_file)
                .map(|key| (key, keys::Material::Secret(t.secret.expose_secret())))
        } else {
            self.forbid("tokens", "secret", "tokens.private_key_file");
            self.forbid("tokens", "secret_file", "tokens.private_key_file");
            self.key_file("tokens", "private_key_file", &t.private_key_file)
                .map(|pem| {
                    t.private_key = Secret::from(pem);
                    let pem = keys::Material::PrivatePem(t.private_key.expose_secret());
                    ("tokens.private_key_file".to_owned(), pem)
                })
        };
        if let Some((key, material)) = material
            && let Err(message) = keys::load(&t.kid, alg, material)
        {
            self.error_key(&key, message);
        }
        let mut kids = vec![t.kid.clone()];
        for (i, p) in t.previous_keys.iter_mut().enumerate() {
            let name = format!("tokens.previous_keys[{i}]");
            self.require(&name, &["kid"]);
            if kids.contains(&p.kid) && self.value_span(&format!("{name}.kid")).is_some() {
                let message = format!("kid {:?} is already used by another key", p.kid);
                self.error_key(&format!("{name}.kid"), message);
            }
            kids.push(p.kid.clone());
            let file = self
                .value_span(&format!("{name}.public_key_file"))
                .is_some();
            let material = if file {
                self.forbid(&name, "secret", "public_key_file");
                self.forbid(&name, "secret_file", "public_key_file");
                let pem = self.key_file(&name, "public_key_file", &p.public_key_file);
                pem.map(|pem| {
                    p.public_key = pem;
                    (
                        format!("{name}.public_key_file"),
                        keys::Material::PublicPem(&p.public_key),
                    )
                })
            } else {
                let key = self.secret(&name, &mut p.secret, &p.secret_file);
                key.map(|key| (key, keys::Material::Secret(p.secret.expose_secret())))
            };
            let Some((key, material)) = material else {
                continue;
            };
            let guesses = match (p.algorithm, &material) {
                (Some(alg), _) => vec![alg],
                (None, keys::Material::Secret(_)) if is_hmac(alg) => vec![alg],
                (None, keys::Material::Secret(_)) => vec![jsonwebtoken::Algorithm::HS256],
                (None, _) => keys::ALGORITHMS
                    .iter()
                    .copied()
                    .filter(|a| !is_hmac(*a))
                    .collect(),
            };
            let loaded = guesses
                .iter()
                .find_map(|a| keys::load(&p.kid, *a, material).ok().map(|_| *a));
            match loaded {
                Some(alg) => p.algorithm = Some(alg),
                None => {
                    let message = match guesses.as_slice() {
                        [alg] => keys::load(&p.kid, *alg, material).err().unwrap_or_default(),
                        _ => "not an RSA, P-256 or Ed25519 public key in PEM".to_owned(),
                    };
                    self.error_key(&key, message);
                }
            }
        }
    }

    /// `section.secret` or `section.secret_file` (read into `secret`): exactly one. Returns
    /// the key it came from.
    fn secret(
        &mut self,
        section: &str,
        secret: &mut Secret,
        file: &Option<PathBuf>,
    ) -> Option<String> {
        let (inline, from_file) = (
            format!("{section}.secret"),
            format!("{section}.secret_file"),
        );
        if self.has_error(&inline) || self.has_error(&from_file) {
            return None;
        }
        match (self.value_span(&inline).is_some(), file) {
            (true, Some(_)) => {
                let message = format!("set either {inline} or {from_file}, not both");
                self.error_key(&from_file, message);
                None
            }
            (false, None) => {
                let span = self.value_span(section);
                let message = format!("missing required key (set {inline} or {from_file})");
                self.error(inline, span, message);
                None
            }
            (true, None) => Some(inline),
            (false, Some(path)) => match read_small_file(path, MAX_SECRET_FILE_BYTES) {
                Ok(mut bytes) => {
                    let end = bytes.strip_suffix(b"\r\n").or(bytes.strip_suffix(b"\n"));
                    bytes.truncate(end.map_or(bytes.len(), <[u8]>::len));
                    *secret = Secret::from(bytes);
                    Some(from_file)
                }
                Err(e) => {
                    let message = format!("cannot read {}: {e}", path.display());
                    self.error_key(&from_file, message);
                    None
                }
            },
        }
    }

    /// `[server.tls]`: both files present, readable, and a certificate with its key.
    fn tls(&mut self, server: &mut ServerConfig) {
        let Some(tls) = &mut server.tls else {
            return;
        };
        self.require("server.tls", &["cert_file", "key_file"]);
        let keys = ["server.tls", "server.tls.cert_file", "server.tls.key_file"];
        if keys.iter().any(|k| self.has_error(k)) {
            return;
        }
        match tls.read() {
            Ok(cert) => tls.cert = Some(cert),
            Err((key, message)) => self.error_key(key, message),
        }
    }

    /// A route's `ca_file`: only with an `https://` upstream, and a PEM file of CAs.
    fn route_ca(&mut self, i: usize, route: &mut RouteConfig) {
        let key = format!("routes[{i}].ca_file");
        let Some(path) = route.ca_file.clone() else {
            return;
        };
        if self.has_error(&key) || self.has_error(&format!("routes[{i}].upstream")) {
            return;
        }
        if route.upstream.scheme != http::uri::Scheme::HTTPS {
            let message = format!(
                "only for an https:// upstream (routes[{i}].upstream is {})",
                route.upstream
            );
            return self.error_key(&key, message);
        }
        match route.clone().with_ca_file(&path) {
            Ok(with_ca) => route.ca = with_ca.ca,
            Err(message) => self.error_key(&key, message),
        }
    }

    /// Reports `section.key` as not belonging with this kind of key.
    fn forbid(&mut self, section: &str, key: &str, instead: &str) {
        let key = format!("{section}.{key}");
        if self.value_span(&key).is_some() {
            self.error_key(&key, format!("not used with this algorithm; set {instead}"));
        }
    }

    /// `store.ca_file`: only with a TLS store URL (anywhere else it would be silently
    /// unused, and the operator would believe the connection is verified against it), read
    /// into `store.ca` and proved to hold at least one usable CA certificate, so a wrong file
    /// is a config error rather than every connection failing.
    fn ca_file(&mut self, store: &mut StoreConfig) {
        const KEY: &str = "store.ca_file";
        let Some(path) = &store.ca_file else {
            return;
        };
        if self.has_error(KEY) || self.has_error("store.url") {
            return;
        }
        if !store.url.is_tls() {
            let message = "needs a TLS store.url (rediss:// or rediss+cluster://): with this \
                           URL the connection is not encrypted and the CA would not be used"
                .to_owned();
            return self.error_key(KEY, message);
        }
        let pem = match read_small_file(path, MAX_SECRET_FILE_BYTES) {
            Ok(pem) => pem,
            Err(e) => return self.error_key(KEY, format!("cannot read {}: {e}", path.display())),
        };
        match ca_certificates(&pem) {
            Ok(()) => store.ca = Some(pem),
            Err(e) => self.error_key(KEY, format!("{}: {e}", path.display())),
        }
    }

    /// Reads the PEM file at `section.key`, which is required.
    fn key_file(&mut self, section: &str, key: &str, path: &Option<PathBuf>) -> Option<Vec<u8>> {
        let key = format!("{section}.{key}");
        if self.has_error(&key) {
            return None;
        }
        let Some(path) = path else {
            let span = self.value_span(section);
            self.error(key, span, "missing required key (a PEM key file)");
            return None;
        };
        read_small_file(path, MAX_SECRET_FILE_BYTES)
            .map_err(|e| self.error_key(&key, format!("cannot read {}: {e}", path.display())))
            .ok()
    }
    /// Reports `keys` of `section` that the file lacks (at the section's header), or the
    /// section itself when it is missing; keys that already have an error are not repeated.
    fn require(&mut self, section: &str, keys: &[&str]) {
        let Some(span) = self.value_span(section) else {
            let message = format!("missing required section [{section}]");
            return self.error(section, None, message);
        };
        for key in keys {
            let key = format!("{section}.{key}");
            if self.value_span(&key).is_none() && !self.has_error(section) && !self.has_error(&key)
            {
                self.error(key, Some(span.clone()), "missing required key");
            }
        }
    }

    fn value_span(&self, name: &str) -> Option<Span> {
        let key = &self.keys[*self.by_name.get(name)?];
        Some(key.value_span.clone())
    }

    fn has_error(&self, key: &str) -> bool {
        self.errors.iter().any(|e| e.key == key)
    }

    fn error(&mut self, key: impl Into<String>, span: Option<Span>, message: impl Into<String>) {
        let position = span.map(|s| line_col(self.text, s.start));
        self.errors.push(ConfigError {
            key: key.into(),
            position,
            message: message.into(),
        });
    }

    /// An error on `key`, at its value when the file has it.
    fn error_key(&mut self, key: &str, message: String) {
        let span = self.value_span(key);
        self.error(key, span, message);
    }

    /// An error at `span`, named after the innermost key there (empty when none is); returns
    /// that key. serde's wording is put in the file's terms.
    fn error_at(&mut self, span: &Span, message: String) -> String {
        let exact = self
            .keys
            .iter()
            .filter(|k| k.key_span == *span || k.value_span == *span);
        let key = exact
            .max_by_key(|k| k.name.len())
            .map(|k| k.name.clone())
            .unwrap_or_default();
        let message = reword(&key, &message);
        self.error(key.clone(), Some(span.clone()), message);
        key
    }
}

/// Lists every key under `name` with its spans, depth first.
fn index(name: String, key_span: Span, value: &Spanned<DeValue<'_>>, out: &mut Vec<Key>) {
    match value.get_ref() {
        DeValue::Table(table) => {
            for (k, v) in table.iter() {
                index(format!("{name}.{}", k.get_ref()), k.span(), v, out);
            }
        }
        DeValue::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                index(format!("{name}[{i}]"), v.span(), v, out);
            }
        }
        _ => {}
    }
    out.push(Key {
        name,
        key_span,
        value_span: value.span(),
    });
}

/// Removes the key or array item whose key or value is at `span`.
fn remove_at(table: &mut DeTable<'_>, span: &Span) -> bool {
    let hit = table
        .iter()
        .find(|(k, v)| k.span() == *span || v.span() == *span);
    if let Some(name) = hit.map(|(k, _)| k.get_ref().to_string()) {
        return table.remove(name.as_str()).is_some();
    }
    table.iter_mut().any(|(_, v)| match v.get_mut() {
        DeValue::Table(t) => remove_at(t, span),
        DeValue::Array(items) if items.iter().any(|item| item.span() == *span) => {
            let kept = std::mem::replace(items, DeArray::new()).into_iter();
            *items = kept.filter(|item| item.span() != *span).collect();
            true
        }
        DeValue::Array(items) => items.iter_mut().any(|item| match item.get_mut() {
            DeValue::Table(t) => remove_at(t, span),
            _ => false,
        }),
        _ => false,
    })
}

/// Replaces every `${VAR}` in every string from the environment; a string with a missing or
/// malformed variable is reported (never silently emptied).
fn interpolate_all(
    value: &mut Spanned<DeValue<'_>>,
    env: &dyn Fn(&str) -> Option<String>,
    unresolved: &mut Vec<(Span, String)>,
) {
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) if s.contains("${") => match interpolate(s, env) {
            Ok(resolved) => *s = Cow::Owned(resolved),
            Err(message) => unresolved.push((span, message)),
        },
        DeValue::Array(items) => items
            .iter_mut()
            .for_each(|v| interpolate_all(v, env, unresolved)),
        DeValue::Table(table) => table
            .iter_mut()
            .for_each(|(_, v)| interpolate_all(v, env, unresolved)),
        _ => {}
    }
}

fn interpolate(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut missing = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or("unterminated `${` (expected `${NAME}`)")?;
        let name = &after[..end];
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            // Not echoed: a value that merely contains `${` may be a secret.
            return Err(
                "invalid `${...}` variable name (letters, digits and `_`, not starting with a digit)"
                    .to_owned(),
            );
        }
        match env(name) {
            Some(value) => out.push_str(&value),
            None => missing.push(format!("${{{name}}}")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    match missing.len() {
        0 => Ok(out),
        1 => Err(format!("environment variable {} not set", missing[0])),
        _ => Err(format!(
            "environment variables {} not set",
            missing.join(", ")
        )),
    }
}

/// serde's messages, in the file's words: `invalid type: integer `3`, expected a string`
/// becomes `expected a string, found integer`, and an unknown field an unknown key.
fn reword(key: &str, message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let expected = rest.split_once(", expected ").map_or("", |(_, e)| e);
        let expected = expected.trim_start_matches("one of ").replace('`', "");
        return format!("unknown key (expected one of: {expected})");
    }
    if let Some((got, expected)) = message
        .strip_prefix("unknown variant ")
        .and_then(|rest| rest.split_once(", expected "))
    {
        return format!(
            "must be {}, got {}",
            expected.replace('`', "\""),
            got.replace('`', "\"")
        );
    }
    let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.split_once(", expected "))
    else {
        return message.to_owned();
    };
    let found = match found.split(' ').next().unwrap_or(found) {
        "map" => "table",
        "sequence" => "array",
        "floating" => "float",
        other => other,
    };
    match expected {
        "a sequence" if key == "routes" => {
            format!("expected an array of tables (write [[routes]], not [routes]), found {found}")
        }
        "a sequence" => format!("expected an array, found {found}"),
        e if e.starts_with("struct ") => format!("expected a table, found {found}"),
        e => format!("expected {e}, found {found}"),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// The largest config file keycard reads.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The largest `secret_file` (or TLS key file) keycard reads.
const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;
/// The largest certificate file keycard reads (a CA bundle can be a few hundred KiB).
const MAX_PEM_FILE_BYTES: u64 = 1 << 20;

/// Reads a regular file of at most `max` bytes. Anything else is refused: a FIFO would block
/// (at startup, or a reloader for ever), `/dev/zero` would never end, a huge file would fill
/// memory. The type is checked on the opened file, not the path, and the open itself never
/// waits (`O_NONBLOCK`), so a path swapped for a FIFO between the two cannot hang us.
fn read_small_file(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > max {
        return Err(format!("larger than {max} bytes"));
    }
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(bytes)
}

/// For configs built in code (tests, `keycard dev`): the same rules as in a file.
impl std::str::FromStr for Upstream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Upstream as Parse>::parse(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Values: each field's rule, as a serde `deserialize_with` function.

/// Bounds for durations (milliseconds) and integers, as const generic arguments.
const NO_MAX: u64 = u64::MAX;
const SECOND: u64 = 1_000;
const FIVE_MINUTES: u64 = 300 * SECOND;
const YEAR: u64 = 365 * 86_400 * SECOND;
const U32: u64 = u32::MAX as u64;
const MIB: u64 = 1 << 20;
const GIB_IN_KIB: u64 = 1 << 20;

/// A config file's listen address when the file has none is an error; this default only
/// serves configs built in code (tests), which want a free port.
const LOOPBACK_ANY_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// A value written in the file as a string and parsed by its own rule.
trait Parse: Sized {
    fn parse(s: &str) -> Result<Self, String>;
}

/// A string, parsed by `parse`, whose message becomes the key's error. Parsing inside the
/// visitor lets toml attach the value's own span, even for an array item.
fn checked<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    struct Checked<F>(F);
    impl<T, F: FnOnce(&str) -> Result<T, String>> serde::de::Visitor<'_> for Checked<F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
            (self.0)(s).map_err(E::custom)
        }
    }
    d.deserialize_str(Checked(parse))
}

fn parsed<'de, D: Deserializer<'de>, T: Parse>(d: D) -> Result<T, D::Error> {
    checked(d, T::parse)
}

/// One array item, parsed on its own so that an error names the item (`key[2]`).
struct Item<T>(T);

impl<'de, T: Parse> Deserialize<'de> for Item<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parsed(d).map(Item)
    }
}

fn list<'de, D: Deserializer<'de>, T: Parse>(d: D) -> Result<Vec<T>, D::Error> {
    let items = Vec::<Item<T>>::deserialize(d)?;
    Ok(items.into_iter().map(|Item(t)| t).collect())
}

/// A duration with a unit, within `MIN_MS..=MAX_MS`. A bare number is an error: `10` could
/// mean seconds or milliseconds.
fn duration<'de, D: Deserializer<'de>, const MIN_MS: u64, const MAX_MS: u64>(
    d: D,
) -> Result<Duration, D::Error> {
    let text = match toml::Value::deserialize(d)? {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => {
            let message =
                format!("a duration needs a unit: write \"{i}s\" (units: ms, s, m, h, d)");
            return Err(D::Error::custom(message));
        }
        other => {
            let message = format!(
                "expected a duration such as \"10s\", found {}",
                other.type_str()
            );
            return Err(D::Error::custom(message));
        }
    };
    let value = parse_duration(&text).map_err(D::Error::custom)?;
    let (min, max) = (Duration::from_millis(MIN_MS), Duration::from_millis(MAX_MS));
    if value < min {
        return Err(D::Error::custom(match MIN_MS {
            1 => "must be greater than zero".to_owned(),
            _ => format!("must be at least {}s", min.as_secs()),
        }));
    }
    if value > max {
        return Err(D::Error::custom(format!(
            "must be at most {}s",
            max.as_secs()
        )));
    }
    Ok(value)
}

/// An integer within `MIN..=MAX`.
fn int<'de, D: Deserializer<'de>, T: TryFrom<u64>, const MIN: u64, const MAX: u64>(
    d: D,
) -> Result<T, D::Error> {
    let n = match toml::Value::deserialize(d)? {
        toml::Value::Integer(n) => n,
        other => {
            let message = format!("expected an integer, found {}", other.type_str());
            return Err(D::Error::custom(message));
        }
    };
    u64::try_from(n)
        .ok()
        .filter(|n| (MIN..=MAX).contains(n))
        .and_then(|n| T::try_from(n).ok())
        .ok_or_else(|| {
            D::Error::custom(format!(
                "must be an integer between {MIN} and {MAX}, got {n}"
            ))
        })
}

fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
    String::deserialize(d).map(|s| Secret::from(s.into_bytes()))
}

fn parsed_some<'de, D: Deserializer<'de>, T: Parse>(d: D) -> Result<Option<T>, D::Error> {
    parsed(d).map(Some)
}

fn non_empty_some<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    non_empty(d).map(Some)
}

/// A role name: 1–64 characters of `A-Z a-z 0-9 . _ : -`, so that a list of them is a plain
/// comma-separated header value.
pub fn is_valid_role(role: &str) -> bool {
    (1..=64).contains(&role.len())
        && role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".:_-".contains(&b))
}

struct Role(String);

impl Parse for Role {
    fn parse(s: &str) -> Result<Self, String> {
        if is_valid_role(s) {
            Ok(Role(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a role name (1 to 64 of A-Z a-z 0-9 . _ : -)"
            ))
        }
    }
}

fn roles<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(list(d)?.into_iter().map(|Role(r)| r).collect())
}

/// The claims `[identity.claims]` may send upstream: those keycard's own tokens carry.
const MAPPABLE_CLAIMS: &[&str] = &["sub", "roles", "iss", "aud", "jti"];

fn claim_headers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, HeaderName)>, D::Error> {
    let map = std::collections::BTreeMap::<String, String>::deserialize(d)?;
    map.into_iter()
        .map(|(claim, header)| {
            if !MAPPABLE_CLAIMS.contains(&claim.as_str()) {
                let known = MAPPABLE_CLAIMS.join(", ");
                return Err(D::Error::custom(format!(
                    "{claim:?}: claims that can be sent are {known}"
                )));
            }
            let name = <HeaderName as Parse>::parse(&header).map_err(D::Error::custom)?;
            Ok((claim, name))
        })
        .collect()
}

/// HS256, HS384, HS512: signed with a shared secret.
pub fn is_hmac(alg: jsonwebtoken::Algorithm) -> bool {
    use jsonwebtoken::Algorithm::{HS256, HS384, HS512};
    matches!(alg, HS256 | HS384 | HS512)
}

fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked(d, |s| match s {
        "" => Err("must not be empty".to_owned()),
        s => Ok(s.to_owned()),
    })
}

/// Parses durations with humantime (`500ms`, `10s`, `15m`, `2h`, `7d`, `1h30m`), with a unit
/// always and without spaces.
fn parse_duration(s: &str) -> Result<Duration, String> {
    use humantime::DurationError;
    const HINT: &str =
        "expected a duration such as \"500ms\", \"10s\", \"15m\", \"2h\", \"7d\" or \"1h30m\"";
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "duration {s:?} has no unit: add one, e.g. \"{s}s\" (units: ms, s, m, h, d)"
        ));
    }
    if s.contains(char::is_whitespace) {
        return Err(format!("invalid duration {s:?}: {HINT}, without spaces"));
    }
    // humantime reads `M` as months: `"10M"` meant as minutes would be a 10-month timeout.
    if s.contains(|c: char| c.is_ascii_uppercase()) {
        return Err(format!(
            "invalid duration {s:?}: units are lower case ({HINT})"
        ));
    }
    humantime::parse_duration(s).map_err(|e| match e {
        DurationError::Empty => format!("empty duration: {HINT}"),
        DurationError::UnknownUnit { unit, .. } => {
            format!("invalid duration {s:?}: unknown unit {unit:?} (use ms, s, m, h or d)")
        }
        DurationError::NumberOverflow => format!("invalid duration {s:?}: too large"),
        _ => format!("invalid duration {s:?}: {HINT}"),
    })
}

impl Parse for SocketAddr {
    fn parse(s: &str) -> Result<Self, String> {
        s.parse().map_err(|_| {
            format!("invalid listen address {s:?}: expected IP:port such as \"0.0.0.0:8080\" or \"[::]:8080\"")
        })
    }
}

/// A CIDR, or a bare IP meaning just that address (/32 or /128).
impl Parse for IpNet {
    fn parse(s: &str) -> Result<Self, String> {
        if s.contains('/') {
            s.parse::<IpNet>().map(|n| n.trunc()).map_err(|_| {
                format!("invalid CIDR {s:?}: expected e.g. \"10.0.0.0/8\" or \"::1/128\"")
            })
        } else {
            s.parse::<std::net::IpAddr>().map(IpNet::from).map_err(|_| {
                format!("invalid IP address {s:?}: expected e.g. \"10.0.0.1\" or \"10.0.0.0/8\"")
            })
        }
    }
}

/// `server.upgrade_protocols` items: protocol tokens (RFC 9110 §7.8), lowercased. HTTP/2 is
/// an error: tunnelling it would hand the client a raw HTTP/2 connection to the upstream,
/// past every route and identity rule.
struct Protocol(String);

impl Parse for Protocol {
    fn parse(s: &str) -> Result<Self, String> {
        let name = s.to_ascii_lowercase();
        let token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
        if !token {
            return Err(format!("{name:?} is not a protocol token"));
        }
        let h2 = ["h2c", "h2"]
            .iter()
            .any(|h2| name == *h2 || name.starts_with(&format!("{h2}/")));
        if h2 || name.starts_with("http/2") {
            return Err("HTTP/2 (h2c) is never tunnelled: an upgraded HTTP/2 connection would bypass every route and identity rule".to_owned());
        }
        Ok(Protocol(name))
    }
}

fn protocols<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(list(d)?.into_iter().map(|Protocol(p)| p).collect())
}

/// `memory://`, or a `redis://` / `rediss://` URL kept as written. Messages never echo the
/// URL: it may carry a password. A fragment is refused: redis-rs reads `#insecure` as "skip
/// certificate verification", which keycard never does.
impl Parse for StoreUrl {
    fn parse(s: &str) -> Result<Self, String> {
        if s == "memory://" {
            return Ok(StoreUrl::Memory);
        }
        if s.contains('#') {
            return Err("a store URL takes no #fragment (#insecure in particular: keycard always verifies the server's certificate; write a # in a password as %23)".to_owned());
        }
        if let Some(rest) = s.strip_prefix("redis+cluster://") {
            return cluster_nodes(rest, "redis").map(StoreUrl::Cluster);
        }
        if let Some(rest) = s.strip_prefix("rediss+cluster://") {
            return cluster_nodes(rest, "rediss").map(StoreUrl::Cluster);
        }
        if !s.starts_with("redis://") && !s.starts_with("rediss://") {
            return Err(
                "unsupported store URL: expected \"memory://\", \"redis://…\", \"rediss://…\" (TLS), \"redis+cluster://…\" or \"rediss+cluster://…\""
                    .to_owned(),
            );
        }
        let uri: http::Uri = s.parse().map_err(|_| {
            "invalid redis URL (expected redis[s]://[[user]:password@]host[:port][/db])".to_owned()
        })?;
        if uri.host().is_none_or(str::is_empty) {
            return Err("redis URL has no host (expected redis[s]://host[:port][/db])".to_owned());
        }
        if !port_is_valid(&uri) {
            return Err("redis URL has an invalid port (expected 1-65535)".to_owned());
        }
        let db = uri.path().trim_start_matches('/');
        if !db.is_empty() && db.parse::<u32>().is_err() {
            return Err(
                "redis URL has an invalid database number (expected /0, /1, ...)".to_owned(),
            );
        }
        Ok(StoreUrl::Redis(s.to_owned()))
    }
}

/// The seed nodes of `redis[s]+cluster://[user:password@]host[:port],…[/0]` (the part after
/// the scheme) as `scheme://` URLs. Credentials written on the first node apply to the others
/// that have none, so a password is written once. A cluster has only database 0: any other
/// number is refused here rather than failing every connection later.
fn cluster_nodes(rest: &str, scheme: &str) -> Result<Vec<String>, String> {
    const FORM: &str = "expected redis[s]+cluster://[user:password@]host:port,host:port,…";
    // The path starts at the first `/` after the last `@`: a password's `/` must be
    // percent-encoded in a URL anyway, but a literal one before the `@` is not the path.
    let after_credentials = rest.rfind('@').map_or(0, |at| at + 1);
    let (hosts, db) = match rest[after_credentials..].find('/') {
        Some(slash) => rest.split_at(after_credentials + slash),
        None => (rest, ""),
    };
    if !matches!(db, "" | "/" | "/0") {
        return Err(format!(
            "a Redis Cluster has only database 0 (write /0 or nothing); {FORM}"
        ));
    }
    let mut credentials: Option<&str> = None;
    let mut nodes = Vec::new();
    for (i, node) in hosts.split(',').enumerate() {
        let node = node.trim();
        let url = match (node.rsplit_once('@'), credentials) {
            (Some((user, _)), _) if i == 0 => {
                credentials = Some(user);
                format!("{scheme}://{node}")
            }
            (None, Some(user)) => format!("{scheme}://{user}@{node}"),
            _ => format!("{scheme}://{node}"),
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|_| format!("invalid cluster node #{} ({FORM})", i + 1))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("cluster node #{} has no host ({FORM})", i + 1));
        }
        if !port_is_valid(&uri) || uri.path() != "/" {
            return Err(format!(
                "cluster node #{} has an invalid port (expected 1-65535; {FORM})",
                i + 1
            ));
        }
        nodes.push(url);
    }
    Ok(nodes)
}

/// Checks that `pem` holds at least one CA certificate rustls accepts as a trust anchor, and
/// nothing unreadable.
fn ca_certificates(pem: &[u8]) -> Result<(), String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not a PEM certificate file ({e})"))?;
        roots
            .add(cert)
            .map_err(|e| format!("a certificate cannot be used as a CA ({e})"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)".to_owned());
    }
    Ok(())
}

/// For configs built in code (tests, `keycard dev`): the same rules as in a file.
impl std::str::FromStr for StoreUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <StoreUrl as Parse>::parse(s)
    }
}

/// `http::Uri` accepts `host:notaport` (its `port()` is then `None`); this rejects it, and
/// port 0, by looking at what follows the host in the authority.
fn port_is_valid(uri: &http::Uri) -> bool {
    let (Some(authority), Some(host)) = (uri.authority(), uri.host()) else {
        return true;
    };
    let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
    match host_port.strip_prefix(host) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|p| p.parse::<u16>().ok())
            .is_some_and(|p| p != 0),
        None => false,
    }
}

/// Only the words: serde's enum forms (`auth = { public = [] }`) would be accepted too.
impl Parse for AuthMode {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "required" => Ok(AuthMode::Required),
            "public" => Ok(AuthMode::Public),
            "optional" => Ok(AuthMode::Optional),
            other => Err(format!(
                "must be \"required\", \"public\" or \"optional\", got {other:?}"
            )),
        }
    }
}

impl Parse for jsonwebtoken::Algorithm {
    fn parse(s: &str) -> Result<Self, String> {
        keys::ALGORITHMS
            .into_iter()
            .find(|alg| format!("{alg:?}") == s)
            .ok_or_else(|| {
                format!(
                    "unsupported algorithm {s:?}: use HS256, HS384, HS512, RS256, ES256 or EdDSA"
                )
            })
    }
}

/// Headers that must never carry the user's identity: the proxy strips, rewrites or
/// interprets them itself, so an identity put there would be lost or would change framing,
/// routing or credentials. Compared after folding `_` and `.` to `-`.
const RESERVED_IDENTITY_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "content-length",
    "content-type",
    "cookie",
    "forwarded",
    "host",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "set-cookie",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-uri",
    "x-original-uri",
    "x-original-url",
    "x-real-ip",
    "x-request-id",
];

/// Lowercases and folds `_` and `.` to `-`, the way CGI-style back ends read header names.
fn fold_header_name(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '_' | '.' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// `identity.user_header`: any valid name but the reserved ones.
impl Parse for HeaderName {
    fn parse(s: &str) -> Result<Self, String> {
        let name = HeaderName::from_bytes(s.as_bytes())
            .map_err(|_| format!("{s:?} is not a valid HTTP header name"))?;
        if RESERVED_IDENTITY_HEADERS.contains(&fold_header_name(name.as_str()).as_str()) {
            return Err(format!(
                "{s:?} is a header the proxy itself handles (hop-by-hop, framing, routing or credentials); pick another name such as \"X-Auth-User\""
            ));
        }
        Ok(name)
    }
}

fn identity_prefix<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked(d, |s| {
        let folded = fold_header_name(s);
        if folded.is_empty() {
            return Err("must not be empty".to_owned());
        }
        if HeaderName::from_bytes(folded.as_bytes()).is_err() {
            return Err(format!("{s:?} is not a valid header name prefix"));
        }
        Ok(folded)
    })
}

/// Checks a canonical path: starts with `/`, only visible ASCII, none of `% ; ? # \`, no
/// empty segment (`//`) and no `.` or `..` segment. Trailing slashes are the caller's job.
fn check_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("path {p:?} must start with \"/\""));
    }
    if let Some(c) = p
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '%' | ';' | '?' | '#' | '\\'))
    {
        return Err(format!(
            "path {p:?} contains {c:?}; paths are written decoded, in visible ASCII, without % ; ? # \\ or whitespace"
        ));
    }
    if p.contains("//") {
        return Err(format!("path {p:?} contains an empty segment (\"//\")"));
    }
    if p.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!("path {p:?} contains a \".\" or \"..\" segment"));
    }
    Ok(())
}

fn route_path<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    checked(d, |p| {
        check_path(p)?;
        if p.len() > 1 && p.ends_with('/') {
            return Err(format!(
                "path {p:?} must not end with \"/\" (write {:?}; it matches whole segments)",
                p.trim_end_matches('/')
            ));
        }
        Ok(p.to_owned())
    })
}

/// `http://host[:port][/base]` or `https://…`. The port defaults to 80 (443) and is always written into the
/// authority, so consumers can rely on `authority.port_u16()` being `Some`.
impl Parse for Upstream {
    fn parse(s: &str) -> Result<Self, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("upstream {s:?} must be an absolute URL such as \"http://127.0.0.1:3000\"")
        })?;
        let (scheme, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "http" => (http::uri::Scheme::HTTP, 80),
            "https" => (http::uri::Scheme::HTTPS, 443),
            other => {
                return Err(format!(
                    "upstream {s:?}: scheme {other:?} is not supported; use http:// or https://"
                ));
            }
        };
        if rest
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default()
            .contains('@')
        {
            // Not echoed: it would be a password.
            return Err("upstream must not contain user info (user@host)".to_owned());
        }
        if s.contains('?') || s.contains('#') {
            return Err(format!(
                "upstream {s:?} must not contain a query or fragment"
            ));
        }
        let uri: http::Uri = s
            .parse()
            .map_err(|e| format!("invalid upstream URL {s:?}: {e}"))?;
        let host = uri.host().unwrap_or_default();
        if host.is_empty() {
            return Err(format!("upstream {s:?} has no host"));
        }
        if !port_is_valid(&uri) {
            return Err(format!(
                "upstream {s:?} has an invalid port (expected 1-65535)"
            ));
        }
        let authority = match uri.port_u16() {
            Some(_) => uri.authority().cloned(),
            None => format!("{host}:{default_port}").parse().ok(),
        }
        .ok_or_else(|| format!("invalid upstream authority in {s:?}"))?;
        let base_path = uri.path().trim_end_matches('/');
        if !base_path.is_empty() {
            check_path(base_path).map_err(|e| format!("upstream base {e}"))?;
        }
        Ok(Upstream {
            scheme,
            authority,
            base_path: base_path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

    /// The example from the external contract.
    const CONTRACT: &str = r#"
[server]
listen = "0.0.0.0:8080"

[admin]                      # separate listener: /healthz /readyz /metrics
listen = "0.0.0.0:9901"

[store]
url = "redis://127.0.0.1:6379/0"   # "memory://" = embedded, single instance, not shared
prefix = "keycard:"

[tokens]
algorithm = "HS256"
secret = "${KEYCARD_SECRET}"       # ${VAR} is read from the environment; or secret_file = "..."
issuer = "keycard"
access_ttl = "15m"
refresh_ttl = "7d"

[identity]
user_header = "X-Auth-User"

[[routes]]
path = "/"                         # path prefix, matched on whole segments, longest wins
upstream = "http://127.0.0.1:3000"
auth = "required"                  # or "public"
"#;

    /// The smallest valid file: only what is required.
    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8080"
[admin]
listen = "127.0.0.1:9901"
[store]
url = "memory://"
[tokens]
secret = "0123456789abcdef0123456789abcdef"
[[routes]]
path = "/"
upstream = "http://127.0.0.1:3000"
"#;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEYCARD_SECRET" => Some(SECRET.to_string()),
            "SHORT" => Some("short".to_string()),
            "HOST" => Some("10.1.2.3".to_string()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, Path::new("test.toml"), &env)
    }

    fn errors(text: &str) -> Vec<ConfigError> {
        match parse(text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => {
                assert_eq!(e.file, Path::new("test.toml"));
                assert!(!e.errors.is_empty());
                e.errors
            }
        }
    }

    /// The single error for `text`, asserting there is exactly one.
    fn one_error(text: &str) -> ConfigError {
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
        errs.into_iter().next().unwrap()
    }

    /// `MINIMAL` with `line` replaced by `with`.
    fn minimal_with(line: &str, with: &str) -> String {
        assert!(MINIMAL.contains(line), "{line} not in MINIMAL");
        MINIMAL.replacen(line, with, 1)
    }

    #[test]
    fn size_limits_and_throttle_are_configurable() {
        let server = "[server]\nmax_header_bytes = 8192\nmax_target_bytes = 1024\nmax_auth_body_bytes = 2048\nupgrade_recheck = \"1s\"";
        let text = format!(
            "{}\n[throttle]\nuser_limit = 0\naddress_window = \"1m\"\n[passwords]\nmax_queue = 3\n",
            minimal_with("[server]", server)
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.server.max_header_bytes, 8192);
        assert_eq!(c.server.max_target_bytes, 1024);
        assert_eq!(c.server.max_auth_body_bytes, 2048);
        assert_eq!(c.server.upgrade_recheck, Duration::from_secs(1));
        assert_eq!(c.throttle.user_limit, 0);
        assert_eq!(c.throttle.address_limit, 50);
        assert_eq!(c.throttle.address_window, Duration::from_secs(60));
        assert_eq!(c.passwords.max_queue, 3);
        let defaults = parse(MINIMAL).unwrap();
        assert_eq!(defaults.server.max_header_bytes, 32 * 1024);
        assert_eq!(defaults.server.max_target_bytes, 8 * 1024);
        assert_eq!(defaults.server.max_auth_body_bytes, 16 * 1024);
        assert_eq!(defaults.throttle.user_limit, 5);
        assert_eq!(defaults.throttle.user_window, Duration::from_secs(900));
        let e = one_error(&minimal_with("[server]", "[server]\nmax_header_bytes = 10"));
        assert_eq!(e.key, "server.max_header_bytes");
        let e = one_error(&format!("{MINIMAL}[throttle]\nuser_window = \"0s\"\n"));
        assert_eq!(e.key, "throttle.user_window");
    }

    #[test]
    fn contract_example_parses() {
        let c = parse(CONTRACT).unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.admin.listen, "0.0.0.0:9901".parse().unwrap());
        assert_eq!(
            c.store.url,
            StoreUrl::Redis("redis://127.0.0.1:6379/0".to_string())
        );
        assert_eq!(c.store.prefix, "keycard:");
        assert_eq!(c.tokens.algorithm, jsonwebtoken::Algorithm::HS256);
        assert_eq!(c.tokens.secret.expose_secret(), SECRET.as_bytes());
        assert_eq!(c.tokens.issuer, "keycard");
        assert_eq!(c.tokens.access_ttl, Duration::from_secs(900));
        assert_eq!(c.tokens.refresh_ttl, Duration::from_secs(7 * 86_400));
        assert_eq!(c.identity.user_header.as_str(), "x-auth-user");
        assert_eq!(c.routes.len(), 1);
        let r = &c.routes[0];
        assert_eq!(r.path, "/");
        assert_eq!(r.auth, AuthMode::Required);
        assert_eq!(r.upstream.scheme, http::uri::Scheme::HTTP);
        assert_eq!(r.upstream.authority.as_str(), "127.0.0.1:3000");
        assert_eq!(r.upstream.base_path, "");
        assert_eq!(r.upstream.to_string(), "http://127.0.0.1:3000");
    }

    #[test]
    fn defaults() {
        let c = parse(MINIMAL).unwrap();
        assert!(c.server.trusted_proxies.is_empty());
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.shutdown_delay, Duration::from_secs(5));
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.server.max_connections, 10_000);
        assert_eq!(c.server.upgrade_protocols, ["websocket"]);
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.body_idle_timeout, Duration::from_secs(30));
        assert_eq!(c.server.h2_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.store.url, StoreUrl::Memory);
        assert_eq!(c.store.prefix, "keycard:");
        assert_eq!(c.store.timeout, Duration::from_secs(2));
        assert_eq!(c.tokens.algorithm, jsonwebtoken::Algorithm::HS256);
        assert_eq!(c.tokens.issuer, "keycard");
        assert_eq!(c.tokens.access_ttl, Duration::from_secs(15 * 60));
        assert_eq!(c.tokens.refresh_ttl, Duration::from_secs(7 * 86_400));
        assert_eq!(c.tokens.leeway, Duration::ZERO);
        assert_eq!(c.identity.user_header.as_str(), "x-auth-user");
        assert_eq!(c.identity.prefix, "x-auth-");
        assert_eq!(c.passwords.memory_kib, 19_456);
        assert_eq!(c.passwords.iterations, 2);
        assert_eq!(c.passwords.parallelism, 1);
        assert!(c.passwords.max_concurrent >= 1);
        assert_eq!(c.passwords.queue_timeout, Duration::from_secs(5));
        let r = &c.routes[0];
        assert_eq!(r.auth, AuthMode::Required);
        assert!(!r.strip_prefix);
        assert!(!r.forward_token);
        assert_eq!(r.connect_timeout, Duration::from_secs(5));
        assert_eq!(r.timeout, Duration::from_secs(60));
    }

    #[test]
    fn every_key_set() {
        let text = r#"
[server]
listen = "[::]:8080"
trusted_proxies = ["10.0.0.0/8", "192.168.1.7", "::1", "fd00::/8", "${HOST}"]
header_read_timeout = "500ms"
shutdown_timeout = "1h30m"
max_connections = 5
[admin]
listen = "127.0.0.1:9901"
[store]
url = "redis://:pw@redis.internal:6380/2"
prefix = ""
timeout = "250ms"
[tokens]
algorithm = "HS512"
secret = "${KEYCARD_SECRET}"
issuer = "me"
access_ttl = "1m"
refresh_ttl = "1d"
leeway = "30s"
[identity]
user_header = "X-Remote-User"
prefix = "X_Remote.User-"
[passwords]
memory_kib = 65536
iterations = 3
parallelism = 4
max_concurrent = 2
queue_timeout = "0s"
[[routes]]
path = "/api/v1"
upstream = "http://api.internal/base/"
auth = "public"
strip_prefix = true
forward_token = true
connect_timeout = "1s"
timeout = "2m"
"#;
        let c = parse(text).unwrap();
        let nets: Vec<String> = c
            .server
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            nets,
            [
                "10.0.0.0/8",
                "192.168.1.7/32",
                "::1/128",
                "fd00::/8",
                "10.1.2.3/32"
            ]
        );
        assert_eq!(c.server.header_read_timeout, Duration::from_millis(500));
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(5400));
        assert_eq!(c.server.max_connections, 5);
        assert_eq!(
            c.store.url,
            StoreUrl::Redis("redis://:pw@redis.internal:6380/2".into())
        );
        assert_eq!(c.store.prefix, "");
        assert_eq!(c.tokens.algorithm, jsonwebtoken::Algorithm::HS512);
        assert_eq!(c.tokens.leeway, Duration::from_secs(30));
        assert_eq!(c.identity.user_header.as_str(), "x-remote-user");
        assert_eq!(c.identity.prefix, "x-remote-user-");
        assert_eq!(c.passwords.parallelism, 4);
        assert_eq!(c.passwords.max_concurrent, 2);
        assert_eq!(c.passwords.queue_timeout, Duration::ZERO);
        let r = &c.routes[0];
        assert_eq!(r.auth, AuthMode::Public);
        assert!(r.strip_prefix && r.forward_token);
        // No port given: 80 is written into the authority.
        assert_eq!(r.upstream.authority.as_str(), "api.internal:80");
        assert_eq!(r.upstream.authority.port_u16(), Some(80));
        assert_eq!(r.upstream.base_path, "/base");
        assert_eq!(r.timeout, Duration::from_secs(120));
        // The redis password never shows.
        assert!(!format!("{c:?}").contains("pw@"));
        assert!(!c.describe_routes().contains("pw@"));
    }

    #[test]
    fn unknown_top_level_key() {
        let e = one_error(&format!("{MINIMAL}\n[extra]\nx = 1\n"));
        assert_eq!(e.key, "extra");
        assert!(e.message.contains("unknown"), "{e}");
        assert_eq!(e.position, Some((14, 2)));
    }

    #[test]
    fn unknown_key_in_section_and_route() {
        let text = minimal_with("url = \"memory://\"", "url = \"memory://\"\nurls = 1");
        let e = one_error(&text);
        assert_eq!(e.key, "store.urls");
        assert!(e.message.contains("unknown key"), "{e}");

        let text = format!(
            "{MINIMAL}\n[[routes]]\npath = \"/x\"\nupstream = \"http://h:1\"\nstrip_prefx = true\n"
        );
        let e = one_error(&text);
        assert_eq!(e.key, "routes[1].strip_prefx");
        assert_eq!(e.position, Some((17, 1)));
    }

    #[test]
    fn missing_env_var() {
        let text = minimal_with(
            "secret = \"0123456789abcdef0123456789abcdef\"",
            "secret = \"${NOPE}${KEYCARD_SECRET}\"",
        );
        let e = one_error(&text);
        assert_eq!(e.key, "tokens.secret");
        assert!(e.message.contains("${NOPE}"), "{e}");
        assert!(e.message.contains("not set"), "{e}");
        // Any string value is interpolated, and the key is named.
        let text = minimal_with("path = \"/\"", "path = \"/${MISSING_PATH}\"");
        let e = one_error(&text);
        assert_eq!(e.key, "routes[0].path");
        assert!(e.message.contains("MISSING_PATH"), "{e}");
        // Malformed references are errors too.
        let text = minimal_with("path = \"/\"", "path = \"/${oops\"");
        assert!(one_error(&text).message.contains("unterminated"));
    }

    #[test]
    fn interpolation_works_anywhere() {
        let text = minimal_with(
            "upstream = \"http://127.0.0.1:3000\"",
            "upstream = \"http://${HOST}:3000\"",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.routes[0].upstream.authority.as_str(), "10.1.2.3:3000");
    }

    #[test]
    fn short_secret() {
        let text = minimal_with(
            "secret = \"0123456789abcdef0123456789abcdef\"",
            "secret = \"${SHORT}\"",
        );
        let e = one_error(&text);
        assert_eq!(e.key, "tokens.secret");
        assert!(e.message.contains("at least 32"), "{e}");
        assert!(!e.to_string().contains("short"), "secret leaked: {e}");
        // 31 bytes fails, 32 passes (MINIMAL).
        let text = minimal_with(
            "secret = \"0123456789abcdef0123456789abcdef\"",
            "secret = \"0123456789abcdef0123456789abcde\"",
        );
        assert_eq!(one_error(&text).key, "tokens.secret");
    }

    #[test]
    fn missing_secret() {
        let text = minimal_with("secret = \"0123456789abcdef0123456789abcdef\"", "");
        let e = one_error(&text);
        assert_eq!(e.key, "tokens.secret");
        let text = text.replace("[tokens]", "");
        assert_eq!(one_error(&text).key, "tokens.secret");
    }

    #[test]
    fn bad_durations() {
        for (value, needle) in [
            ("\"10\"", "no unit"),
            ("10", "needs a unit"),
            ("\"10 s\"", "invalid duration"),
            ("\"1x\"", "unknown unit"),
            ("\"s\"", "invalid duration"),
            ("\"\"", "empty"),
            ("\"0s\"", "at least 1s"),
            ("\"500ms\"", "at least 1s"),
            ("\"99999999999999999999d\"", "invalid duration"),
            ("\"999999999999999d\"", "too large"),
        ] {
            let text = minimal_with("[tokens]", &format!("[tokens]\naccess_ttl = {value}"));
            let e = one_error(&text);
            assert_eq!(e.key, "tokens.access_ttl", "{value}");
            assert!(e.message.contains(needle), "{value}: {e}");
        }
        for key in ["access_ttl", "refresh_ttl"] {
            let text = minimal_with("[tokens]", &format!("[tokens]\n{key} = \"366d\""));
            let e = one_error(&text);
            assert_eq!(e.key, format!("tokens.{key}"));
            assert!(e.message.contains("at most"), "{e}");
        }
        let text = minimal_with("[tokens]", "[tokens]\nleeway = \"10m\"");
        let e = one_error(&text);
        assert_eq!(e.key, "tokens.leeway");
        assert!(e.message.contains("at most 300s"), "{e}");
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("1s500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604_800));
    }

    #[test]
    fn bad_upstreams() {
        for (value, needle) in [
            ("ftp://h:1", "not supported"),
            ("127.0.0.1:3000", "absolute URL"),
            ("http://u:p@h:1", "user info"),
            ("http://h:1/?x=1", "query"),
            ("http://h:1/#f", "fragment"),
            ("http://:1", "no host"),
            ("http://h:", "port"),
            ("http://h:notaport", "invalid"),
            ("http://h:1/a/../b", "segment"),
        ] {
            let text = minimal_with(
                "upstream = \"http://127.0.0.1:3000\"",
                &format!("upstream = \"{value}\""),
            );
            let e = one_error(&text);
            assert_eq!(e.key, "routes[0].upstream", "{value}");
            assert!(e.message.contains(needle), "{value}: {e}");
            assert_eq!(e.position, Some((12, 12)), "{value}");
        }
    }

    #[test]
    fn https_upstreams_default_to_443_and_ca_file_needs_one() {
        let text = minimal_with(
            "upstream = \"http://127.0.0.1:3000\"",
            "upstream = \"https://api.internal/v1\"",
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.routes[0].upstream.scheme, http::uri::Scheme::HTTPS);
        assert_eq!(c.routes[0].upstream.authority.as_str(), "api.internal:443");
        assert_eq!(
            c.routes[0].upstream.to_string(),
            "https://api.internal:443/v1"
        );
        assert!(c.routes[0].ca.is_none());

        let text = minimal_with(
            "upstream = \"http://127.0.0.1:3000\"",
            "upstream = \"http://127.0.0.1:3000\"\nca_file = \"/nonexistent.pem\"",
        );
        let e = one_error(&text);
        assert_eq!(e.key, "routes[0].ca_file");
        assert!(e.message.contains("only for an https:// upstream"), "{e}");

        let text = minimal_with(
            "upstream = \"http://127.0.0.1:3000\"",
            "upstream = \"https://127.0.0.1:3000\"\nca_file = \"/nonexistent.pem\"",
        );
        let e = one_error(&text);
        assert_eq!(e.key, "routes[0].ca_file");
        assert!(e.message.contains("cannot read /nonexistent.pem"), "{e}");
    }

    #[test]
    fn server_tls_needs_both_files() {
        let text = minimal_with(
            "[admin]",
            "[server.tls]\ncert_file = \"/nonexistent.crt\"\n[admin]",
        );
        let e = one_error(&text);
        assert_eq!(e.key, "server.tls.key_file");
        assert!(e.message.contains("missing required key"), "{e}");

        let text = minimal_with(
            "[admin]",
            "[server.tls]\ncert_file = \"/nonexistent.crt\"\nkey_file = \"/nonexistent.key\"\n[admin]",
        );
        let e = one_error(&text);
        assert_eq!(e.key, "server.tls.cert_file");
        assert!(e.message.contains("cannot read /nonexistent.crt"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(5), "{e}");
    }

    #[test]
    fn bad_route_paths() {
        for value in [
            "", "api", "/api/", "//", "/a//b", "/a/./b", "/a/..", "/a%2f", "/a;b", "/a?b", "/a#b",
            "/a\\\\b", "/a b", "/a\\tb",
        ] {
            let text = minimal_with("path = \"/\"", &format!("path = \"{value}\""));
            let e = one_error(&text);
            assert_eq!(e.key, "routes[0].path", "{value}");
        }
    }

    #[test]
    fn duplicate_route_paths() {
        let text = format!("{MINIMAL}\n[[routes]]\npath = \"/\"\nupstream = \"http://h:1\"\n");
        let e = one_error(&text);
        assert_eq!(e.key, "routes[1].path");
        assert!(e.message.contains("routes[0]"), "{e}");
    }

    #[test]
    fn routes_required() {
        let text = MINIMAL.replace(
            "[[routes]]\npath = \"/\"\nupstream = \"http://127.0.0.1:3000\"\n",
            "",
        );
        assert_eq!(one_error(&text).key, "routes");
        let text = format!("routes = []\n{text}");
        assert_eq!(one_error(&text).key, "routes");
        let text = minimal_with("[[routes]]", "[routes]");
        assert!(one_error(&text).message.contains("[[routes]]"));
        let text = minimal_with("path = \"/\"\n", "");
        let e = one_error(&text);
        assert_eq!(e.key, "routes[0].path");
        assert!(e.message.contains("missing"), "{e}");
        assert_eq!(e.position, Some((10, 1)));
    }

    #[test]
    fn bad_algorithm() {
        // RS256, ES256 and EdDSA are supported since issue 8 (see `asymmetric_keys`).
        for alg in ["PS256", "RS512", "none", "hs256"] {
            let text = minimal_with("[tokens]", &format!("[tokens]\nalgorithm = \"{alg}\""));
            let e = one_error(&text);
            assert_eq!(e.key, "tokens.algorithm");
            assert!(e.message.contains("HS256"), "{e}");
        }
        let text = minimal_with("[tokens]", "[tokens]\nalgorithm = \"HS384\"");
        assert_eq!(
            parse(&text).unwrap().tokens.algorithm,
            jsonwebtoken::Algorithm::HS384
        );
    }

    #[test]
    fn bad_store_url() {
        for url in [
            "postgres://x",
            "memory",
            "redis://",
            "redis://h:port",
            "rediss://",
            "rediss://h:0",
            // redis-rs would read this as "do not verify the certificate".
            "rediss://h:6380/#insecure",
            "rediss://h:6380#insecure",
            "rediss+cluster://h:7000/#insecure",
            "redis://h:6379/0#x",
        ] {
            let text = minimal_with("url = \"memory://\"", &format!("url = \"{url}\""));
            let e = one_error(&text);
            assert_eq!(e.key, "store.url", "{url}");
        }
        // The URL (it may carry a password) is not echoed.
        let text = minimal_with("url = \"memory://\"", "url = \"redis://:hunter2@h:x\"");
        assert!(!one_error(&text).to_string().contains("hunter2"));
    }

    #[test]
    fn tls_store_urls() {
        let store = |lines: &str| parse(&minimal_with("url = \"memory://\"", lines));
        let c = store("url = \"rediss://keycard:s3cret@redis.internal:6380/2\"").unwrap();
        assert!(c.store.url.is_tls());
        assert_eq!(c.store.ca, None);
        // Debug (so every log line) says TLS but never shows the user's password.
        let debug = format!("{c:?} {:?}", c.store.url);
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("rediss://<redacted>"), "{debug}");
        assert!(c.describe_routes().contains("redis (TLS)"));
        assert!(!c.describe_routes().contains("s3cret"));
        let c = store("url = \"rediss+cluster://u:pw@a:7000,b:7001\"").unwrap();
        assert_eq!(
            c.store.url,
            StoreUrl::Cluster(vec![
                "rediss://u:pw@a:7000".into(),
                "rediss://u:pw@b:7001".into()
            ])
        );
        assert!(c.store.url.is_tls());
        assert!(!format!("{:?}", c.store.url).contains("pw"));
        assert!(c.describe_routes().contains("redis cluster (TLS)"));
        for plain in ["redis://h:6379/0", "redis+cluster://h:7000", "memory://"] {
            let c = store(&format!("url = \"{plain}\"")).unwrap();
            assert!(!c.store.url.is_tls(), "{plain}");
        }
    }

    /// A fresh CA certificate (PEM) in a file of its own; removed by the caller.
    fn ca_file(name: &str) -> (std::path::PathBuf, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let dir = std::env::temp_dir().join(format!("keycard-ca-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, &pem).unwrap();
        (path, pem)
    }

    #[test]
    fn store_ca_file_needs_tls_and_a_certificate() {
        let (path, pem) = ca_file("unit");
        let dir = path.parent().unwrap().to_path_buf();
        let store = |url: &str, file: &std::path::Path| {
            let lines = format!(
                "url = \"{url}\"\nca_file = {:?}",
                file.display().to_string()
            );
            parse(&minimal_with("url = \"memory://\"", &lines))
        };
        // With TLS: read into store.ca.
        let c = store("rediss://h:6380", &path).unwrap();
        assert_eq!(c.store.ca.as_deref(), Some(pem.as_bytes()));
        assert_eq!(c.store.ca_file.as_deref(), Some(path.as_path()));
        let c = store("rediss+cluster://h:7000,h:7001", &path).unwrap();
        assert!(c.store.ca.is_some());
        // Without TLS the CA would silently do nothing: an error naming the key.
        for url in ["redis://h:6379", "redis+cluster://h:7000", "memory://"] {
            let text = minimal_with(
                "url = \"memory://\"",
                &format!(
                    "url = \"{url}\"\nca_file = {:?}",
                    path.display().to_string()
                ),
            );
            let e = one_error(&text);
            assert_eq!(e.key, "store.ca_file", "{url}");
            assert!(e.message.contains("rediss://"), "{e}");
            assert!(e.position.is_some(), "{e}");
        }
        // A missing file, an empty one, a key instead of a certificate, garbage.
        let missing = dir.join("missing.pem");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let key = dir.join("key.pem");
        std::fs::write(&key, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        for (file, says) in [
            (&missing, "cannot read"),
            (&empty, "no PEM certificate"),
            (&key, "no PEM certificate"),
            (&garbage, "certificate"),
        ] {
            let text = minimal_with(
                "url = \"memory://\"",
                &format!(
                    "url = \"rediss://h\"\nca_file = {:?}",
                    file.display().to_string()
                ),
            );
            let e = one_error(&text);
            assert_eq!(e.key, "store.ca_file", "{}", file.display());
            assert!(e.message.contains(says), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn store_connect_timeout() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.store.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.store.timeout, Duration::from_secs(2));
        let store = |lines: &str| parse(&minimal_with("url = \"memory://\"", lines));
        let c =
            store("url = \"redis://h\"\nconnect_timeout = \"750ms\"\ntimeout = \"250ms\"").unwrap();
        assert_eq!(c.store.connect_timeout, Duration::from_millis(750));
        assert_eq!(c.store.timeout, Duration::from_millis(250));
        for bad in ["\"0s\"", "\"2\"", "5", "\"10M\""] {
            let text = minimal_with(
                "url = \"memory://\"",
                &format!("url = \"redis://h\"\nconnect_timeout = {bad}"),
            );
            assert_eq!(one_error(&text).key, "store.connect_timeout", "{bad}");
        }
    }

    #[test]
    fn cluster_store_url_lists_its_nodes() {
        let cluster = |url: &str| {
            let text = minimal_with("url = \"memory://\"", &format!("url = \"{url}\""));
            parse(&text).map(|c| c.store.url)
        };
        let nodes = |list: &[&str]| StoreUrl::Cluster(list.iter().map(|n| n.to_string()).collect());
        assert_eq!(
            cluster("redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002").unwrap(),
            nodes(&[
                "redis://127.0.0.1:7000",
                "redis://127.0.0.1:7001",
                "redis://127.0.0.1:7002"
            ])
        );
        for suffix in ["/", "/0"] {
            assert_eq!(
                cluster(&format!("redis+cluster://a:1,b{suffix}")).unwrap(),
                nodes(&["redis://a:1", "redis://b"])
            );
        }
        // The first node's credentials apply to the nodes without their own.
        let url = cluster("redis+cluster://u:pw@a:1,b:2,v:other@c:3").unwrap();
        assert_eq!(
            url,
            nodes(&[
                "redis://u:pw@a:1",
                "redis://u:pw@b:2",
                "redis://v:other@c:3"
            ])
        );
        // Debug (and so every log line) never shows a password.
        assert!(!format!("{url:?}").contains("pw"), "{url:?}");
        let text = minimal_with(
            "url = \"memory://\"",
            "url = \"redis+cluster://:pw@h:7000\"",
        );
        let c = parse(&text).unwrap();
        assert!(!format!("{c:?}").contains("pw@") && !c.describe_routes().contains("pw@"));
        assert!(c.describe_routes().contains("redis cluster"));
    }

    #[test]
    fn bad_cluster_store_url() {
        for url in [
            "redis+cluster://",
            "redis+cluster://h:7000,",
            "redis+cluster://h:7000,h:x",
            "redis+cluster://h:0",
            "redis+cluster://h:7000/1",
            "redis+cluster://h:7000/0/x",
            "redis+cluster://:hunter2@h:7000/2",
        ] {
            let text = minimal_with("url = \"memory://\"", &format!("url = \"{url}\""));
            let e = one_error(&text);
            assert_eq!(e.key, "store.url", "{url}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        let text = minimal_with("url = \"memory://\"", "url = \"redis+cluster://h:1/3\"");
        assert!(one_error(&text).message.contains("database 0"));
    }

    #[test]
    fn cluster_store_refuses_a_prefix_with_a_hash_tag() {
        for prefix in ["{kc}:", "kc}:", "k{c:"] {
            let store = format!("url = \"redis+cluster://h:7000\"\nprefix = \"{prefix}\"");
            let e = one_error(&minimal_with("url = \"memory://\"", &store));
            assert_eq!(e.key, "store.prefix", "{prefix}");
            assert!(e.message.contains('{'), "{e}");
            // Standalone Redis has no slots: the same prefix is fine there.
            let store = format!("url = \"redis://h:6379\"\nprefix = \"{prefix}\"");
            parse(&minimal_with("url = \"memory://\"", &store)).unwrap();
        }
    }

    #[test]
    fn both_secret_and_secret_file() {
        let text = minimal_with("[tokens]", "[tokens]\nsecret_file = \"/nonexistent\"");
        let e = one_error(&text);
        assert_eq!(e.key, "tokens.secret_file");
        assert!(e.message.contains("not both"), "{e}");
    }

    #[test]
    fn missing_required_sections() {
        let errs = errors("[[routes]]\npath = \"/\"\nupstream = \"http://h:1\"\n");
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["server", "admin", "store", "tokens.secret"]);
        assert!(
            errs[0]
                .message
                .contains("missing required section [server]")
        );
        // A present section with a missing required key names the key, at the header.
        let text = minimal_with("listen = \"127.0.0.1:9901\"", "");
        let e = one_error(&text);
        assert_eq!(e.key, "admin.listen");
        assert_eq!(e.position, Some((4, 1)));
    }

    #[test]
    fn wrong_types() {
        let text = minimal_with(
            "[[routes]]",
            "[[routes]]\nstrip_prefix = \"yes\"\ntimeout = 5",
        );
        let errs = errors(&text);
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["routes[0].strip_prefix", "routes[0].timeout"]);
        assert!(errs[0].message.contains("found string"));

        let text = minimal_with("listen = \"127.0.0.1:8080\"", "listen = 8080");
        let e = one_error(&text);
        assert_eq!(e.key, "server.listen");
        assert!(
            e.message.contains("expected a string, found integer"),
            "{e}"
        );

        let text = format!("identity = 3\n{MINIMAL}");
        assert_eq!(one_error(&text).key, "identity");

        let text = minimal_with(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\ntrusted_proxies = \"10.0.0.0/8\"",
        );
        assert_eq!(one_error(&text).key, "server.trusted_proxies");
        let text = minimal_with(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\ntrusted_proxies = [\"10.0.0.1\", \"nope\", 3]",
        );
        let keys: Vec<String> = errors(&text).into_iter().map(|e| e.key).collect();
        assert_eq!(
            keys,
            ["server.trusted_proxies[1]", "server.trusted_proxies[2]"]
        );
    }

    #[test]
    fn upgrade_protocols_are_tokens_lowercased_and_never_h2c() {
        let with = |list: &str| {
            minimal_with(
                "listen = \"127.0.0.1:8080\"",
                &format!("listen = \"127.0.0.1:8080\"\nupgrade_protocols = {list}"),
            )
        };
        let c = parse(&with("[\"WebSocket\", \"my-proto/2\"]")).unwrap();
        assert_eq!(c.server.upgrade_protocols, ["websocket", "my-proto/2"]);
        let c = parse(&with("[]")).unwrap();
        assert!(
            c.server.upgrade_protocols.is_empty(),
            "[] turns upgrades off"
        );
        for h2 in ["h2", "h2c/1", "HTTP/2.0"] {
            let e = one_error(&with(&format!("[\"{h2}\"]")));
            assert_eq!(e.key, "server.upgrade_protocols[0]", "{h2}");
        }
        let keys: Vec<String> = errors(&with("[\"websocket\", \"H2C\", \"a b\", 3]"))
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(
            keys,
            [
                "server.upgrade_protocols[1]",
                "server.upgrade_protocols[2]",
                "server.upgrade_protocols[3]"
            ]
        );
        assert_eq!(
            one_error(&with("\"websocket\"")).key,
            "server.upgrade_protocols"
        );
    }

    #[test]
    fn bad_numbers() {
        for (line, key) in [
            ("[server]\nmax_connections = 0", "server.max_connections"),
            ("[server]\nmax_connections = -1", "server.max_connections"),
            ("[passwords]\niterations = 0", "passwords.iterations"),
            ("[passwords]\nparallelism = 0", "passwords.parallelism"),
            ("[passwords]\nmemory_kib = 4", "passwords.memory_kib"),
            (
                "[passwords]\nmemory_kib = 16\nparallelism = 4",
                "passwords.memory_kib",
            ),
            (
                "[passwords]\nmax_concurrent = 0",
                "passwords.max_concurrent",
            ),
            (
                "[passwords]\nmemory_kib = 4294967296",
                "passwords.memory_kib",
            ),
        ] {
            let text = if line.starts_with("[server]") {
                minimal_with("[server]", line)
            } else {
                format!("{MINIMAL}{line}\n")
            };
            let e = one_error(&text);
            assert_eq!(e.key, key, "{line}");
        }
    }

    #[test]
    fn bad_identity() {
        for header in [
            "Host",
            "authorization",
            "Transfer_Encoding",
            "Cookie",
            "bad header",
            "",
        ] {
            let text = format!("{MINIMAL}\n[identity]\nuser_header = \"{header}\"\n");
            assert_eq!(one_error(&text).key, "identity.user_header", "{header}");
        }
        let text = format!("{MINIMAL}\n[identity]\nprefix = \"\"\n");
        assert_eq!(one_error(&text).key, "identity.prefix");
    }

    #[test]
    fn bad_listen() {
        let text = minimal_with("listen = \"127.0.0.1:8080\"", "listen = \"localhost:8080\"");
        let e = one_error(&text);
        assert_eq!(e.key, "server.listen");
        assert_eq!(e.position, Some((3, 10)));
    }

    #[test]
    fn all_errors_reported_at_once() {
        let text = r#"
bogus = 1
[server]
listen = "nope"
[admin]
listen = "127.0.0.1:9901"
[store]
url = "memory://"
timeout = "2"
[tokens]
algorithm = "PS256"
secret = "${NOT_SET}"
[[routes]]
path = "/api/"
upstream = "ftp://x"
unknown = true
"#;
        let errs = errors(text);
        // All of them, in file order.
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "bogus",
                "server.listen",
                "store.timeout",
                "tokens.algorithm",
                "tokens.secret",
                "routes[0].path",
                "routes[0].upstream",
                "routes[0].unknown",
            ]
        );
        assert!(errs.iter().all(|e| e.position.is_some()), "{errs:#?}");
        let shown = ConfigErrors {
            file: "k.toml".into(),
            errors: errs,
        }
        .to_string();
        assert_eq!(shown.lines().count(), 8);
        assert!(
            shown.lines().all(|l| l.starts_with("k.toml: line ")),
            "{shown}"
        );
    }

    #[test]
    fn asymmetric_keys() {
        let keyed = |tokens: &str| {
            minimal_with(
                "[tokens]\nsecret = \"0123456789abcdef0123456789abcdef\"",
                &format!("[tokens]\n{tokens}"),
            )
        };
        let text = keyed(
            "algorithm = \"ES256\"\nprivate_key_file = \"tests/keys/es256.pem\"\nkid = \"2026-11\"\n\
             audience = \"my-api\"\n\
             [[tokens.previous_keys]]\nkid = \"2026-10\"\npublic_key_file = \"tests/keys/es256-old.pub.pem\"\n\
             [[tokens.previous_keys]]\nkid = \"hs\"\nsecret = \"0123456789abcdef0123456789abcdef\"",
        );
        let c = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.tokens.kid, "2026-11");
        assert_eq!(c.tokens.audience.as_deref(), Some("my-api"));
        assert!(!c.tokens.private_key.expose_secret().is_empty());
        let algs: Vec<_> = c.tokens.previous_keys.iter().map(|p| p.algorithm).collect();
        assert_eq!(
            algs,
            [
                Some(jsonwebtoken::Algorithm::ES256),
                Some(jsonwebtoken::Algorithm::HS256)
            ]
        );
        assert_eq!(
            parse(&text.replace("kid = \"2026-11\"\n", ""))
                .unwrap()
                .tokens
                .kid,
            "default"
        );
        assert!(
            !format!("{c:?}").contains("PRIVATE"),
            "key material in Debug"
        );

        for (tokens, key) in [
            ("algorithm = \"ES256\"", "tokens.private_key_file"),
            (
                "algorithm = \"ES256\"\nprivate_key_file = \"tests/keys/es256.pem\"\nsecret = \"0123456789abcdef0123456789abcdef\"",
                "tokens.secret",
            ),
            (
                "algorithm = \"ES256\"\nprivate_key_file = \"tests/keys/rs256.pem\"",
                "tokens.private_key_file",
            ),
            (
                "algorithm = \"RS256\"\nprivate_key_file = \"tests/keys/rs256.pub.pem\"",
                "tokens.private_key_file",
            ),
            (
                "algorithm = \"EdDSA\"\nprivate_key_file = \"/nonexistent.pem\"",
                "tokens.private_key_file",
            ),
            (
                "secret = \"0123456789abcdef0123456789abcdef\"\nprivate_key_file = \"tests/keys/es256.pem\"",
                "tokens.private_key_file",
            ),
            (
                "secret = \"0123456789abcdef0123456789abcdef\"\n[[tokens.previous_keys]]\nkid = \"default\"\nsecret = \"0123456789abcdef0123456789abcdef\"",
                "tokens.previous_keys[0].kid",
            ),
            (
                "secret = \"0123456789abcdef0123456789abcdef\"\n[[tokens.previous_keys]]\nsecret = \"0123456789abcdef0123456789abcdef\"",
                "tokens.previous_keys[0].kid",
            ),
            (
                "secret = \"0123456789abcdef0123456789abcdef\"\n[[tokens.previous_keys]]\nkid = \"x\"\npublic_key_file = \"tests/keys/README.md\"",
                "tokens.previous_keys[0].public_key_file",
            ),
            (
                "secret = \"0123456789abcdef0123456789abcdef\"\n[[tokens.previous_keys]]\nkid = \"x\"\nsecret = \"short\"",
                "tokens.previous_keys[0].secret",
            ),
        ] {
            let e = one_error(&keyed(tokens));
            assert_eq!(e.key, key, "{tokens}");
            assert!(!e.message.contains("BEGIN"), "{e}");
        }
    }

    #[test]
    fn issuers() {
        let with = |issuer: &str| format!("{MINIMAL}\n[[issuers]]\n{issuer}\n");
        let c = parse(&with(
            "issuer = \"https://idp.example.com/\"\njwks_url = \"https://idp.example.com/.well-known/jwks.json\"\n\
             audience = \"my-api\"\nalgorithms = [\"RS256\", \"ES256\"]\nuser_claim = \"email\"",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.issuers[0].jwks_url.0.scheme_str(), Some("https"));
        assert_eq!(c.issuers[0].user_claim, "email");
        for (issuer, key) in [
            ("jwks_url = \"https://x/j\"", "issuers[0].issuer"),
            ("issuer = \"i\"", "issuers[0].jwks_url"),
            (
                "issuer = \"keycard\"\njwks_url = \"https://x/j\"",
                "issuers[0].issuer",
            ),
            (
                "issuer = \"i\"\njwks_url = \"ftp://x/j\"",
                "issuers[0].jwks_url",
            ),
            (
                "issuer = \"i\"\njwks_url = \"https://u:p@x/j\"",
                "issuers[0].jwks_url",
            ),
            (
                "issuer = \"i\"\njwks_url = \"https://x/j\"\nalgorithms = [\"HS256\"]",
                "issuers[0].algorithms",
            ),
        ] {
            assert_eq!(one_error(&with(issuer)).key, key, "{issuer}");
        }
    }

    #[test]
    fn claims_cannot_take_a_header_keycard_writes() {
        for mapping in [
            "jti = \"X-Request-Id\"",
            "sub = \"X-Real-IP\"",
            "roles = \"X-Auth-User\"",
            "roles = \"X-R\"\niss = \"x-r\"",
        ] {
            let text = format!("{MINIMAL}\n[identity.claims]\n{mapping}\n");
            assert!(
                one_error(&text).key.starts_with("identity.claims"),
                "{mapping}"
            );
        }
    }

    #[test]
    fn review_findings_check_refuses_what_run_could_not_do() {
        // Each passed `keycard check` and then failed or crashed `keycard run`.
        for (line, with, key) in [
            (
                "[server]",
                "[passwords]\nmemory_kib = 4294967295\n[server]",
                "passwords.memory_kib",
            ),
            (
                "url = \"memory://\"",
                "url = \"redis://u:pw@h:6379/abc\"",
                "store.url",
            ),
            (
                "listen = \"127.0.0.1:9901\"",
                "listen = \"127.0.0.1:8080\"",
                "admin.listen",
            ),
            (
                "[server]",
                "[throttle]\nuser_window = \"18446744073709551s\"\n[server]",
                "throttle.user_window",
            ),
            (
                "path = \"/\"",
                "path = \"/\"\nauth = { public = [] }",
                "routes[0].auth",
            ),
            (
                "path = \"/\"",
                "path = \"/\"\nauth.required = {}",
                "routes[0].auth",
            ),
            (
                "[server]",
                "[server]\nheader_read_timeout = \"10M\"",
                "server.header_read_timeout",
            ),
        ] {
            let e = one_error(&minimal_with(line, with));
            assert_eq!(e.key, key, "{with}");
        }
    }

    #[test]
    fn review_findings_duplicates_are_all_reported_with_their_keys() {
        let text = format!(
            "{}\n[[routes]]\npath = \"/a\"\npath = \"/b\"\nupstream = \"http://h:1\"\nbogus = 1\n",
            MINIMAL
                .replace(
                    "listen = \"127.0.0.1:8080\"",
                    "listen = \"127.0.0.1:8080\"\nlisten = \"x\""
                )
                .replace("url = \"memory://\"", "url = \"memory://\"\nurl = \"x\"")
        );
        let errs = errors(&text);
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "server.listen",
                "store.url",
                "routes[1].path",
                "routes[1].bogus"
            ],
            "{errs:#?}"
        );
        assert!(errs.iter().all(|e| e.position.is_some()));
    }

    #[test]
    fn review_findings_thousands_of_bad_keys_are_reported_in_part() {
        // Every error costs a read of the file: 30 000 of them took minutes. Now at most
        // MAX_ERRORS are reported, and a last line says there are more.
        let mut text = MINIMAL.to_owned();
        text.push_str("[identity]\n");
        for i in 0..30_000 {
            text.push_str(&format!("k{i} = 1\n"));
        }
        let errs = errors(&text);
        assert_eq!(errs.len(), MAX_ERRORS + 1);
        assert!(
            errs.last().unwrap().message.contains("more than"),
            "{errs:#?}"
        );
    }

    #[test]
    fn review_findings_no_secret_fragment_is_echoed() {
        let text = minimal_with(
            "secret = \"0123456789abcdef0123456789abcdef\"",
            "secret = \"Kq7${hunter2-TOPSECRET}zzzzzzzzzzzzzzzzzzzzzzzzzzzzzz\"",
        );
        let e = one_error(&text);
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let text = minimal_with("http://127.0.0.1:3000", "http://u:hunter2@h:1");
        let e = one_error(&text);
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        // The type is checked on the opened file, and the open does not wait: a path swapped
        // for a FIFO between a check and the open once hung the reloader for good.
        let fifo = std::env::temp_dir().join(format!("keycard-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || tx.send(read_small_file(&path, 1024)));
        let result = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("read_small_file blocked");
        assert_eq!(result.unwrap_err(), "not a regular file");
        let _ = std::fs::remove_file(&fifo);
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let e = one_error("[server]\nlisten = \"0.0.0.0:8080\"\nport = = 3\n");
        assert_eq!(e.key, "");
        let (line, col) = e.position.unwrap();
        assert_eq!(line, 3);
        assert!(col >= 6, "{col}");
        assert!(e.message.contains("TOML"), "{e}");
        assert!(e.to_string().starts_with("line 3, column "));

        let e = one_error(&format!("{MINIMAL}[admin]\n"));
        assert_eq!(e.position.map(|p| p.0), Some(13));

        assert_eq!(line_col("ab\ncé\nx", 7), (3, 1));
        assert_eq!(line_col("ab\ncé\nx", 6), (2, 3));
    }

    #[test]
    fn debug_never_shows_secret() {
        let c = parse(CONTRACT).unwrap();
        let debug = format!("{c:?} {c:#?}");
        assert!(!debug.contains(SECRET));
        assert!(!debug.contains("0123456789abcdef"));
        assert!(debug.contains("<redacted>"));
        assert!(!c.describe_routes().contains("0123456789abcdef"));
    }

    #[test]
    fn secret_file() {
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let crlf = dir.join(format!("keycard-test-secret-{pid}-crlf"));
        std::fs::write(&crlf, format!("{SECRET}\r\n")).unwrap();
        let lf2 = dir.join(format!("keycard-test-secret-{pid}-lf2"));
        std::fs::write(&lf2, format!("{SECRET}\n\n")).unwrap();
        let short = dir.join(format!("keycard-test-secret-{pid}-short"));
        std::fs::write(&short, "tiny\n").unwrap();

        let with_file = |p: &Path| {
            minimal_with(
                "secret = \"0123456789abcdef0123456789abcdef\"",
                &format!("secret_file = {:?}", p.display().to_string()),
            )
        };
        let c = parse(&with_file(&crlf)).unwrap();
        assert_eq!(c.tokens.secret.expose_secret(), SECRET.as_bytes());
        // Only one trailing newline is stripped.
        let c = parse(&with_file(&lf2)).unwrap();
        assert_eq!(
            c.tokens.secret.expose_secret(),
            format!("{SECRET}\n").as_bytes()
        );

        let e = one_error(&with_file(&short));
        assert_eq!(e.key, "tokens.secret_file");
        assert!(!e.to_string().contains("tiny"));

        let e = one_error(&with_file(&dir.join(format!("keycard-test-missing-{pid}"))));
        assert_eq!(e.key, "tokens.secret_file");
        assert!(e.message.contains("cannot read"), "{e}");

        // Never blocks on a FIFO, never reads /dev/zero or a directory, never a huge file.
        let fifo = dir.join(format!("keycard-test-secret-{pid}-fifo"));
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let huge = dir.join(format!("keycard-test-secret-{pid}-huge"));
        std::fs::write(&huge, vec![b'x'; 100 * 1024]).unwrap();
        for p in [&fifo, Path::new("/dev/zero"), dir.as_path(), &huge] {
            let e = one_error(&with_file(p));
            assert_eq!(e.key, "tokens.secret_file", "{}", p.display());
            assert!(
                e.message.contains("not a regular file") || e.message.contains("larger than"),
                "{e}"
            );
        }

        for p in [crlf, lf2, short, fifo, huge] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn a_config_path_that_is_not_a_small_regular_file_is_refused() {
        for p in ["/dev/zero", "/"] {
            let e = Config::load_with(Path::new(p), &env).unwrap_err();
            assert!(e.errors[0].message.contains("not a regular file"), "{e}");
        }
    }

    #[test]
    fn describe_routes_lists_longest_first() {
        let text = format!(
            "{MINIMAL}
[[routes]]
path = \"/api\"
upstream = \"http://127.0.0.1:3001/v1\"
strip_prefix = true
forward_token = true
[[routes]]
path = \"/api/public\"
upstream = \"http://127.0.0.1:3001\"
auth = \"public\"
"
        );
        let c = parse(&text).unwrap();
        let out = c.describe_routes();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert!(lines[0].contains("127.0.0.1:8080"));
        assert!(lines[0].contains("127.0.0.1:9901"));
        assert!(lines[0].contains("memory"));
        assert!(lines[1].contains("PATH"));
        assert!(lines[2].trim_start().starts_with("/api/public"));
        assert!(lines[2].contains("public"));
        assert!(lines[3].trim_start().starts_with("/api "));
        assert!(lines[3].contains("http://127.0.0.1:3001/v1"));
        assert!(lines[3].contains("strip_prefix,forward_token"));
        assert!(lines[4].trim_start().starts_with("/ "));
        assert!(lines[4].contains("required"));
    }

    #[test]
    fn shipped_configs_parse() {
        for (name, text) in [
            ("keycard.toml", include_str!("../config/keycard.toml")),
            (
                "multi-route.toml",
                include_str!("../config/multi-route.toml"),
            ),
        ] {
            let c = Config::parse(text, Path::new(name), &env)
                .unwrap_or_else(|e| panic!("{name}:\n{e}"));
            assert_eq!(c.tokens.secret.expose_secret(), SECRET.as_bytes(), "{name}");
            assert!(!c.routes.is_empty());
        }
        let sidecar = Config::parse(
            include_str!("../config/keycard.toml"),
            Path::new("keycard.toml"),
            &env,
        )
        .unwrap();
        assert_eq!(sidecar.routes.len(), 1);
        assert_eq!(sidecar.routes[0].path, "/");
        // Without the variable the shipped file refuses to start.
        let e = Config::parse(
            include_str!("../config/keycard.toml"),
            Path::new("keycard.toml"),
            &|_| None,
        )
        .unwrap_err();
        assert_eq!(e.errors.len(), 1);
        assert_eq!(e.errors[0].key, "tokens.secret");
    }
}
