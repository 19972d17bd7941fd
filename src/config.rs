//! Config: the TOML file, parsed once into typed, validated structs.
//!
//! Everything the request path needs is resolved here (socket addresses, durations, header
//! names, compiled routes, the secret), so no request ever re-parses a string. This module is
//! pure: no hyper server, no redis, no tokio. Errors are collected, not returned at the first
//! one, so an operator fixes a file in one pass; each names the key and, where the TOML parser
//! knows it, the line and column.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderName;
use ipnet::IpNet;

/// The whole validated configuration. Built only by [`Config::load`] or [`Config::parse`].
#[derive(Debug, Clone)]
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
    /// Routes in file order; the router sorts them for matching.
    pub routes: Vec<RouteConfig>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `server.listen`.
    pub listen: SocketAddr,
    /// `server.trusted_proxies`: peers whose `X-Forwarded-*` we extend instead of replace.
    pub trusted_proxies: Vec<IpNet>,
    /// `server.header_read_timeout` (default 10s): slowloris protection.
    pub header_read_timeout: Duration,
    /// `server.shutdown_timeout` (default 30s): how long in-flight requests may drain.
    pub shutdown_timeout: Duration,
    /// `server.max_connections` (default 10000): accepted connections beyond this wait.
    pub max_connections: usize,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `admin.listen`.
    pub listen: SocketAddr,
}

/// `[store]`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `store.url`: which backend.
    pub url: StoreUrl,
    /// `store.prefix` (default `keycard:`), put before every key.
    pub prefix: String,
    /// `store.timeout` (default 2s): a hung store must not hang requests.
    pub timeout: Duration,
}

/// The parsed `store.url`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory://`: embedded, single instance.
    Memory,
    /// `redis://…` or `rediss://…`, kept as written (it may carry a password, so `Debug`
    /// hides it).
    Redis(String),
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Memory => f.write_str("memory://"),
            StoreUrl::Redis(_) => f.write_str("redis://<redacted>"),
        }
    }
}

/// `[tokens]`.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// `tokens.algorithm`: HS256, HS384 or HS512; the only one accepted on verification.
    pub algorithm: jsonwebtoken::Algorithm,
    /// `tokens.secret` or the contents of `tokens.secret_file`.
    pub secret: Secret,
    /// `tokens.issuer` (default `keycard`).
    pub issuer: String,
    /// `tokens.access_ttl` (default 15m).
    pub access_ttl: Duration,
    /// `tokens.refresh_ttl` (default 7d).
    pub refresh_ttl: Duration,
    /// `tokens.leeway` (default 0s): clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
}

/// `[identity]`.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// `identity.user_header` (default `X-Auth-User`): where the username goes.
    pub user_header: HeaderName,
    /// `identity.prefix` (default `X-Auth-`), lowercased with `_` and `.` folded to `-`:
    /// every client header whose folded name starts with it is removed.
    pub prefix: String,
}

/// `[passwords]`.
#[derive(Debug, Clone)]
pub struct PasswordConfig {
    /// `passwords.memory_kib` (default 19456, OWASP).
    pub memory_kib: u32,
    /// `passwords.iterations` (default 2).
    pub iterations: u32,
    /// `passwords.parallelism` (default 1).
    pub parallelism: u32,
    /// `passwords.max_concurrent` (default: number of CPUs): hashes running at once.
    pub max_concurrent: usize,
    /// `passwords.queue_timeout` (default 5s): how long a login may wait for a hashing slot
    /// before it is answered 503 with `Retry-After`.
    pub queue_timeout: Duration,
}

/// Whether a route needs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// A valid, unrevoked access token is required.
    Required,
    /// Forwarded without a token; identity headers are still stripped.
    Public,
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// `path`: a canonical prefix such as `/` or `/api` (no trailing slash except `/`).
    pub path: String,
    /// `upstream`: where matching requests go.
    pub upstream: Upstream,
    /// `auth` (default `required`).
    pub auth: AuthMode,
    /// `strip_prefix` (default false): remove `path` before forwarding.
    pub strip_prefix: bool,
    /// `forward_token` (default false): pass the client's `Authorization` upstream.
    pub forward_token: bool,
    /// `connect_timeout` (default 5s).
    pub connect_timeout: Duration,
    /// `timeout` (default 60s): until the upstream's response headers arrive.
    pub timeout: Duration,
}

/// A parsed `http://host:port[/base]` upstream.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http` (TLS upstreams are not supported yet).
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

/// Secret bytes whose `Debug` never shows them.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps raw secret bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }

    /// The bytes, for building keys. Never log them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
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
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: path.to_path_buf(),
            errors: vec![ConfigError {
                key: String::new(),
                position: None,
                message: format!("cannot read file: {e}"),
            }],
        })?;
        Config::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Validates TOML text. `env` resolves `${VAR}`; tests pass a closure instead of touching
    /// the process environment.
    pub fn parse(
        text: &str,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let _ = (text, env);
        Err(ConfigErrors {
            file: file.to_path_buf(),
            errors: vec![ConfigError {
                key: String::new(),
                position: None,
                message: "config parsing not implemented yet".into(),
            }],
        })
    }
}
