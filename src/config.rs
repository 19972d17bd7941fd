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
use toml::Spanned;
use toml::de::{DeTable, DeValue};

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
    /// Brute-force protection for `/login`.
    pub throttle: ThrottleConfig,
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
    /// `server.max_header_bytes` (default 32768): request headers adding up to more are 431.
    pub max_header_bytes: usize,
    /// `server.max_target_bytes` (default 8192): a longer request target is 414.
    pub max_target_bytes: usize,
    /// `server.max_auth_body_bytes` (default 16384): a larger auth endpoint body is 413.
    pub max_auth_body_bytes: usize,
    /// `server.upgrade_recheck` (default 10s): how often an upgraded (WebSocket) connection's
    /// token is checked again for revocation; it is also closed the moment the token expires.
    pub upgrade_recheck: Duration,
    /// `server.upgrade_protocols` (default `["websocket"]`, lowercased): the only `Upgrade`
    /// protocols tunnelled. Any other is dropped and the request served as plain HTTP/1.1;
    /// `h2c` is refused in the config, since a tunnelled h2c connection would carry requests
    /// past every route and identity rule.
    pub upgrade_protocols: Vec<String>,
    /// `server.body_read_timeout` (default 10s): an auth endpoint's whole body must arrive
    /// within this, else 408 and the connection is closed.
    pub body_read_timeout: Duration,
    /// `server.body_idle_timeout` (default 30s): a proxied request body that makes no
    /// progress for this long is cut and the connection closed.
    pub body_idle_timeout: Duration,
    /// `server.h2_idle_timeout` (default 60s): an HTTP/2 connection with no open stream for
    /// this long gets GOAWAY; keep-alive pings every half of it find dead peers.
    pub h2_idle_timeout: Duration,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `admin.listen`.
    pub listen: SocketAddr,
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq)]
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
    /// `redis://…`, kept as written (it may carry a password, so `Debug`
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
    /// `tokens.access_ttl` (default 15m, at most 365d).
    pub access_ttl: Duration,
    /// `tokens.refresh_ttl` (default 7d, at most 365d).
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
#[derive(Debug, Clone, PartialEq)]
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
    /// `passwords.max_queue` (default 64): logins and registrations waiting for a slot beyond
    /// this are answered 503 at once, so a login storm cannot pile up unbounded work.
    pub max_queue: usize,
}

/// `[throttle]`: failed-login limits, counted in the store so every replica shares them.
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    /// `throttle.user_limit` (default 5; 0 disables): failed logins per username per window.
    pub user_limit: u64,
    /// `throttle.user_window` (default 15m).
    pub user_window: Duration,
    /// `throttle.address_limit` (default 50; 0 disables): failed logins per client address
    /// per window.
    pub address_limit: u64,
    /// `throttle.address_window` (default 15m).
    pub address_window: Duration,
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
    /// `keycard check` lists them all.
    pub fn parse(
        text: &str,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut cx = Ctx {
            text,
            env,
            errors: Vec::new(),
        };
        let config = match DeTable::parse(text) {
            Ok(doc) => Some(cx.config(doc.get_ref())),
            Err(e) => {
                let position = e.span().map(|s| line_col(text, s.start));
                cx.errors.push(ConfigError {
                    key: String::new(),
                    position,
                    message: format!("invalid TOML: {}", e.message().trim_end()),
                });
                None
            }
        };
        // In file order, so they read top to bottom; those without a position (missing
        // sections) go last. The sort is stable, so ties keep the order they were found in.
        cx.errors
            .sort_by_key(|e| e.position.unwrap_or((usize::MAX, usize::MAX)));
        match config {
            Some(config) if cx.errors.is_empty() => Ok(config),
            _ => Err(ConfigErrors {
                file: file.to_path_buf(),
                errors: cx.errors,
            }),
        }
    }

    /// A table of the resolved routes for `keycard check`: what an operator needs to see to
    /// trust the file does what they meant. Routes are listed longest path first, the order
    /// they are matched in. Never shows the secret or a store URL (it may carry a password).
    pub fn describe_routes(&self) -> String {
        let store = match &self.store.url {
            StoreUrl::Memory => "memory (embedded, single instance)",
            StoreUrl::Redis(_) => "redis",
        };
        let mut out = format!(
            "listen {}, admin {}, store {}, {} route{}\n",
            self.server.listen,
            self.admin.listen,
            store,
            self.routes.len(),
            if self.routes.len() == 1 { "" } else { "s" },
        );
        let mut routes: Vec<&RouteConfig> = self.routes.iter().collect();
        routes.sort_by(|a, b| b.path.len().cmp(&a.path.len()).then(a.path.cmp(&b.path)));
        let rows: Vec<[String; 4]> = routes
            .iter()
            .map(|r| {
                let auth = match r.auth {
                    AuthMode::Required => "required",
                    AuthMode::Public => "public",
                };
                let mut flags = Vec::new();
                if r.strip_prefix {
                    flags.push("strip_prefix");
                }
                if r.forward_token {
                    flags.push("forward_token");
                }
                let flags = if flags.is_empty() {
                    "-".to_string()
                } else {
                    flags.join(",")
                };
                [
                    r.path.clone(),
                    auth.to_string(),
                    r.upstream.to_string(),
                    flags,
                ]
            })
            .collect();
        let header = ["PATH", "AUTH", "UPSTREAM", "FLAGS"].map(String::from);
        let mut widths = [0usize; 4];
        for row in std::iter::once(&header).chain(rows.iter()) {
            for (w, cell) in widths.iter_mut().zip(row.iter()) {
                *w = (*w).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&header).chain(rows.iter()) {
            let line = format!(
                "  {:<w0$}  {:<w1$}  {:<w2$}  {}",
                row[0],
                row[1],
                row[2],
                row[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
            );
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing internals.

type Span = std::ops::Range<usize>;
type Val<'i> = Spanned<DeValue<'i>>;

const TOP_KEYS: &[&str] = &[
    "server",
    "admin",
    "store",
    "tokens",
    "identity",
    "passwords",
    "throttle",
    "routes",
];
const SERVER_KEYS: &[&str] = &[
    "listen",
    "trusted_proxies",
    "header_read_timeout",
    "shutdown_timeout",
    "max_connections",
    "max_header_bytes",
    "max_target_bytes",
    "max_auth_body_bytes",
    "upgrade_recheck",
    "upgrade_protocols",
    "body_read_timeout",
    "body_idle_timeout",
    "h2_idle_timeout",
];
const ADMIN_KEYS: &[&str] = &["listen"];
const STORE_KEYS: &[&str] = &["url", "prefix", "timeout"];
const TOKEN_KEYS: &[&str] = &[
    "algorithm",
    "secret",
    "secret_file",
    "issuer",
    "access_ttl",
    "refresh_ttl",
    "leeway",
];
const IDENTITY_KEYS: &[&str] = &["user_header", "prefix"];
const PASSWORD_KEYS: &[&str] = &[
    "memory_kib",
    "iterations",
    "parallelism",
    "max_concurrent",
    "queue_timeout",
    "max_queue",
];
const THROTTLE_KEYS: &[&str] = &[
    "user_limit",
    "user_window",
    "address_limit",
    "address_window",
];
const ROUTE_KEYS: &[&str] = &[
    "path",
    "upstream",
    "auth",
    "strip_prefix",
    "forward_token",
    "connect_timeout",
    "timeout",
];

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
];

/// The minimum HS* key length: shorter keys make brute-forcing the signature realistic.
const MIN_SECRET_BYTES: usize = 32;

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

/// One table being read: its dotted name, its contents (`None` when it is absent or not a
/// table), where its header is, and whether a missing required key should be reported (not
/// when the whole section was already reported missing or mistyped).
struct Section<'t, 'i> {
    name: String,
    table: Option<&'t DeTable<'i>>,
    span: Option<Span>,
    report_missing: bool,
}

impl<'t, 'i> Section<'t, 'i> {
    fn key(&self, key: &str) -> String {
        format!("{}.{}", self.name, key)
    }

    fn get(&self, key: &str) -> Option<&'t Val<'i>> {
        self.table.and_then(|t| t.get(key))
    }

    fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// Parsing state: the source (for positions), the environment, and the errors so far.
struct Ctx<'a> {
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    fn error(&mut self, key: impl Into<String>, span: Option<Span>, message: impl Into<String>) {
        let position = span.map(|s| line_col(self.text, s.start));
        self.errors.push(ConfigError {
            key: key.into(),
            position,
            message: message.into(),
        });
    }

    /// Reports every key of `table` not in `known`.
    fn unknown_keys(&mut self, prefix: &str, table: &DeTable<'_>, known: &[&str]) {
        for (k, _) in table.iter() {
            let name: &str = k.get_ref();
            if !known.contains(&name) {
                let key = if prefix.is_empty() {
                    name.to_string()
                } else {
                    format!("{prefix}.{name}")
                };
                let what = if prefix.is_empty() {
                    format!(
                        "unknown section or key (expected one of: {})",
                        known.join(", ")
                    )
                } else {
                    format!("unknown key (expected one of: {})", known.join(", "))
                };
                self.error(key, Some(k.span()), what);
            }
        }
    }

    /// Opens the top-level table `name`, checking its keys against `known`.
    fn section<'t, 'i>(
        &mut self,
        root: &'t DeTable<'i>,
        name: &str,
        known: &[&str],
        required: bool,
    ) -> Section<'t, 'i> {
        match root.get(name) {
            None => {
                if required {
                    self.error(name, None, format!("missing required section [{name}]"));
                }
                Section {
                    name: name.to_string(),
                    table: None,
                    span: None,
                    report_missing: !required,
                }
            }
            Some(v) => match v.get_ref() {
                DeValue::Table(t) => {
                    self.unknown_keys(name, t, known);
                    Section {
                        name: name.to_string(),
                        table: Some(t),
                        span: Some(v.span()),
                        report_missing: true,
                    }
                }
                other => {
                    self.error(
                        name,
                        Some(v.span()),
                        format!("expected a table [{name}], found {}", other.type_str()),
                    );
                    Section {
                        name: name.to_string(),
                        table: None,
                        span: None,
                        report_missing: false,
                    }
                }
            },
        }
    }

    /// Looks up `key`, reporting it when it is required and absent.
    fn lookup<'t, 'i>(
        &mut self,
        sec: &Section<'t, 'i>,
        key: &str,
        required: bool,
    ) -> Option<&'t Val<'i>> {
        let v = sec.get(key);
        if v.is_none() && required && sec.report_missing {
            self.error(sec.key(key), sec.span.clone(), "missing required key");
        }
        v
    }

    /// Replaces every `${VAR}` in `s` from the environment; a missing or malformed variable
    /// is an error (never an empty string).
    fn interpolate(&mut self, key: &str, span: Span, s: &str) -> Option<String> {
        let mut out = String::with_capacity(s.len());
        let mut missing = Vec::new();
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                self.error(key, Some(span), "unterminated `${` (expected `${NAME}`)");
                return None;
            };
            let name = &after[..end];
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                self.error(
                    key,
                    Some(span),
                    format!(
                        "invalid variable name `${{{name}}}` (letters, digits and `_`, not starting with a digit)"
                    ),
                );
                return None;
            }
            match (self.env)(name) {
                Some(value) => out.push_str(&value),
                None => missing.push(name),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        if missing.is_empty() {
            Some(out)
        } else {
            let names: Vec<String> = missing.iter().map(|n| format!("${{{n}}}")).collect();
            let plural = if missing.len() == 1 { "" } else { "s" };
            self.error(
                key,
                Some(span),
                format!("environment variable{plural} {} not set", names.join(", ")),
            );
            None
        }
    }

    /// A string value (interpolated), or an error naming the key.
    fn string_of(&mut self, key: &str, v: &Val<'_>) -> Option<String> {
        match v.get_ref() {
            DeValue::String(s) => self.interpolate(key, v.span(), s),
            other => {
                self.error(
                    key,
                    Some(v.span()),
                    format!("expected a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// A string value converted by `f`; `f`'s error message is reported against the key.
    fn convert<T>(
        &mut self,
        key: &str,
        v: &Val<'_>,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.string_of(key, v)?;
        match f(&s) {
            Ok(t) => Some(t),
            Err(msg) => {
                self.error(key, Some(v.span()), msg);
                None
            }
        }
    }

    /// `sec.key` as a string converted by `f`; `None` when absent or invalid (then reported).
    fn get<T>(
        &mut self,
        sec: &Section<'_, '_>,
        key: &str,
        required: bool,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let v = self.lookup(sec, key, required)?;
        self.convert(&sec.key(key), v, f)
    }

    /// `sec.key` as a duration, `default` when absent; `positive` rejects zero.
    fn duration(
        &mut self,
        sec: &Section<'_, '_>,
        key: &str,
        default: Duration,
        positive: bool,
    ) -> Duration {
        let min = if positive {
            Duration::from_millis(1)
        } else {
            Duration::ZERO
        };
        self.duration_in(sec, key, default, min, Duration::MAX)
    }

    /// `sec.key` as a duration within `min..=max`, `default` when absent.
    fn duration_in(
        &mut self,
        sec: &Section<'_, '_>,
        key: &str,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let Some(v) = self.lookup(sec, key, false) else {
            return default;
        };
        let full = sec.key(key);
        if let DeValue::Integer(i) = v.get_ref() {
            self.error(
                &full,
                Some(v.span()),
                format!(
                    "a duration needs a unit: write \"{}s\" (units: ms, s, m, h, d)",
                    i.as_str()
                ),
            );
            return default;
        }
        self.convert(&full, v, |s| {
            let d = parse_duration(s)?;
            if d < min {
                return Err(if min == Duration::from_millis(1) {
                    "must be greater than zero".to_string()
                } else {
                    format!("must be at least {}s", min.as_secs())
                });
            }
            if d > max {
                return Err(format!("must be at most {}s", max.as_secs()));
            }
            Ok(d)
        })
        .unwrap_or(default)
    }

    /// `sec.key` as a boolean, `default` when absent.
    fn boolean(&mut self, sec: &Section<'_, '_>, key: &str, default: bool) -> bool {
        let Some(v) = self.lookup(sec, key, false) else {
            return default;
        };
        match v.get_ref() {
            DeValue::Boolean(b) => *b,
            other => {
                self.error(
                    sec.key(key),
                    Some(v.span()),
                    format!("expected true or false, found {}", other.type_str()),
                );
                default
            }
        }
    }

    /// `sec.key` as an integer in `min..=max`, `default` when absent.
    fn integer(
        &mut self,
        sec: &Section<'_, '_>,
        key: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> u64 {
        let Some(v) = self.lookup(sec, key, false) else {
            return default;
        };
        let full = sec.key(key);
        let DeValue::Integer(i) = v.get_ref() else {
            self.error(
                full,
                Some(v.span()),
                format!("expected an integer, found {}", v.get_ref().type_str()),
            );
            return default;
        };
        match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) if n >= 0 && (n as u64) >= min && (n as u64) <= max => n as u64,
            _ => {
                self.error(
                    full,
                    Some(v.span()),
                    format!("must be an integer between {min} and {max}, got {i}"),
                );
                default
            }
        }
    }

    // --- sections -----------------------------------------------------------------------

    fn config(&mut self, root: &DeTable<'_>) -> Config {
        self.unknown_keys("", root, TOP_KEYS);
        let server = self.server(root);
        let admin = self.admin(root);
        let store = self.store(root);
        let tokens = self.tokens(root);
        let identity = self.identity(root);
        let passwords = self.passwords(root);
        let throttle = self.throttle(root);
        let routes = self.routes(root);
        Config {
            server,
            admin,
            store,
            tokens,
            identity,
            passwords,
            throttle,
            routes,
        }
    }

    fn throttle(&mut self, root: &DeTable<'_>) -> ThrottleConfig {
        let sec = self.section(root, "throttle", THROTTLE_KEYS, false);
        let fifteen = Duration::from_secs(15 * 60);
        ThrottleConfig {
            user_limit: self.integer(&sec, "user_limit", 5, 0, u32::MAX.into()),
            user_window: self.duration_in(
                &sec,
                "user_window",
                fifteen,
                Duration::from_secs(1),
                Duration::MAX,
            ),
            address_limit: self.integer(&sec, "address_limit", 50, 0, u32::MAX.into()),
            address_window: self.duration_in(
                &sec,
                "address_window",
                fifteen,
                Duration::from_secs(1),
                Duration::MAX,
            ),
        }
    }

    fn server(&mut self, root: &DeTable<'_>) -> ServerConfig {
        let sec = self.section(root, "server", SERVER_KEYS, true);
        let listen = self
            .get(&sec, "listen", true, parse_socket_addr)
            .unwrap_or(UNSPECIFIED_ADDR);
        let mut trusted_proxies = Vec::new();
        if let Some(v) = self.lookup(&sec, "trusted_proxies", false) {
            let key = sec.key("trusted_proxies");
            match v.get_ref() {
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let item_key = format!("{key}[{i}]");
                        if let Some(net) = self.convert(&item_key, item, parse_ip_net) {
                            trusted_proxies.push(net);
                        }
                    }
                }
                other => self.error(
                    key,
                    Some(v.span()),
                    format!(
                        "expected an array of CIDR strings such as [\"10.0.0.0/8\"], found {}",
                        other.type_str()
                    ),
                ),
            }
        }
        let header_read_timeout =
            self.duration(&sec, "header_read_timeout", Duration::from_secs(10), true);
        let shutdown_timeout =
            self.duration(&sec, "shutdown_timeout", Duration::from_secs(30), false);
        let max_connections =
            self.integer(&sec, "max_connections", 10_000, 1, u32::MAX.into()) as usize;
        // hyper's read buffer (and so the largest head) is at least 8 KiB; a limit below a
        // few KiB would refuse ordinary browsers.
        let max_header_bytes =
            self.integer(&sec, "max_header_bytes", 32 * 1024, 4096, 1 << 20) as usize;
        let max_target_bytes =
            self.integer(&sec, "max_target_bytes", 8 * 1024, 256, 1 << 20) as usize;
        let max_auth_body_bytes =
            self.integer(&sec, "max_auth_body_bytes", 16 * 1024, 256, 1 << 20) as usize;
        let upgrade_recheck = self.duration(&sec, "upgrade_recheck", Duration::from_secs(10), true);
        let upgrade_protocols = self.upgrade_protocols(&sec);
        let body_read_timeout =
            self.duration(&sec, "body_read_timeout", Duration::from_secs(10), true);
        let body_idle_timeout =
            self.duration(&sec, "body_idle_timeout", Duration::from_secs(30), true);
        let h2_idle_timeout = self.duration(&sec, "h2_idle_timeout", Duration::from_secs(60), true);
        ServerConfig {
            listen,
            trusted_proxies,
            header_read_timeout,
            shutdown_timeout,
            max_connections,
            max_header_bytes,
            max_target_bytes,
            max_auth_body_bytes,
            upgrade_recheck,
            upgrade_protocols,
            body_read_timeout,
            body_idle_timeout,
            h2_idle_timeout,
        }
    }

    /// `server.upgrade_protocols`: an array of protocol tokens (RFC 9110 §7.8), lowercased.
    /// `h2c` is an error: tunnelling it would hand the client a raw HTTP/2 connection to the
    /// upstream, past every route and identity rule.
    fn upgrade_protocols(&mut self, sec: &Section<'_, '_>) -> Vec<String> {
        let Some(v) = self.lookup(sec, "upgrade_protocols", false) else {
            return vec!["websocket".to_owned()];
        };
        let key = sec.key("upgrade_protocols");
        let DeValue::Array(items) = v.get_ref() else {
            let found = v.get_ref().type_str();
            self.error(
                key,
                Some(v.span()),
                format!(
                    "expected an array of protocol names such as [\"websocket\"], found {found}"
                ),
            );
            return Vec::new();
        };
        let mut protocols = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            let name = match item.get_ref() {
                DeValue::String(name) => name.to_ascii_lowercase(),
                other => {
                    let found = other.type_str();
                    self.error(
                        item_key,
                        Some(item.span()),
                        format!("expected a string, found {found}"),
                    );
                    continue;
                }
            };
            let token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
            if !token {
                self.error(
                    item_key,
                    Some(item.span()),
                    format!("{name:?} is not a protocol token"),
                );
            } else if ["h2c", "h2", "http/2"].iter().any(|h2| {
                name == *h2 || name.starts_with(&format!("{h2}/")) || name.starts_with("http/2")
            }) {
                self.error(
                    item_key,
                    Some(item.span()),
                    "HTTP/2 (h2c) is never tunnelled: an upgraded HTTP/2 connection would bypass every route and identity rule".to_owned(),
                );
            } else {
                protocols.push(name);
            }
        }
        protocols
    }

    fn admin(&mut self, root: &DeTable<'_>) -> AdminConfig {
        let sec = self.section(root, "admin", ADMIN_KEYS, true);
        let listen = self
            .get(&sec, "listen", true, parse_socket_addr)
            .unwrap_or(UNSPECIFIED_ADDR);
        AdminConfig { listen }
    }

    fn store(&mut self, root: &DeTable<'_>) -> StoreConfig {
        let sec = self.section(root, "store", STORE_KEYS, true);
        let url = self
            .get(&sec, "url", true, parse_store_url)
            .unwrap_or(StoreUrl::Memory);
        let prefix = self
            .get(&sec, "prefix", false, |s| Ok(s.to_string()))
            .unwrap_or_else(|| "keycard:".to_string());
        let timeout = self.duration(&sec, "timeout", Duration::from_secs(2), true);
        StoreConfig {
            url,
            prefix,
            timeout,
        }
    }

    fn tokens(&mut self, root: &DeTable<'_>) -> TokenConfig {
        let sec = self.section(root, "tokens", TOKEN_KEYS, false);
        let algorithm = self
            .get(&sec, "algorithm", false, parse_algorithm)
            .unwrap_or(jsonwebtoken::Algorithm::HS256);
        let secret = self.secret(&sec);
        let issuer = self
            .get(&sec, "issuer", false, |s| {
                if s.is_empty() {
                    Err("must not be empty".to_string())
                } else {
                    Ok(s.to_string())
                }
            })
            .unwrap_or_else(|| "keycard".to_string());
        // Token times are whole seconds, so a TTL under one second would issue tokens that
        // are already expired. A year at most: a revocation entry lives as long as its token,
        // and a token that outlives any sane entry could not be revoked.
        let second = Duration::from_secs(1);
        let year = Duration::from_secs(365 * 24 * 3600);
        let access_ttl = self.duration_in(
            &sec,
            "access_ttl",
            Duration::from_secs(15 * 60),
            second,
            year,
        );
        let refresh_ttl = self.duration_in(
            &sec,
            "refresh_ttl",
            Duration::from_secs(7 * 24 * 3600),
            second,
            year,
        );
        // Leeway is clock skew, not a policy knob: more than five minutes is a misconfiguration.
        let leeway = self.duration_in(
            &sec,
            "leeway",
            Duration::ZERO,
            Duration::ZERO,
            Duration::from_secs(300),
        );
        TokenConfig {
            algorithm,
            secret,
            issuer,
            access_ttl,
            refresh_ttl,
            leeway,
        }
    }

    /// `tokens.secret` or `tokens.secret_file`: exactly one, at least 32 bytes. No message
    /// ever contains the secret itself.
    fn secret(&mut self, sec: &Section<'_, '_>) -> Secret {
        let empty = Secret::new(Vec::new());
        let (has_secret, has_file) = (sec.has("secret"), sec.has("secret_file"));
        if has_secret && has_file {
            let span = sec.get("secret_file").map(|v| v.span());
            self.error(
                sec.key("secret_file"),
                span,
                "set either tokens.secret or tokens.secret_file, not both",
            );
            return empty;
        }
        if !has_secret && !has_file {
            if sec.report_missing {
                self.error(
                    sec.key("secret"),
                    sec.span.clone(),
                    "missing required key (set tokens.secret or tokens.secret_file)",
                );
            }
            return empty;
        }
        let (key, bytes) = if has_file {
            let Some(v) = sec.get("secret_file") else {
                return empty;
            };
            let key = sec.key("secret_file");
            let Some(path) = self.string_of(&key, v) else {
                return empty;
            };
            match read_small_file(Path::new(&path), MAX_SECRET_FILE_BYTES) {
                Ok(mut bytes) => {
                    if bytes.ends_with(b"\r\n") {
                        bytes.truncate(bytes.len() - 2);
                    } else if bytes.ends_with(b"\n") {
                        bytes.truncate(bytes.len() - 1);
                    }
                    (key, (bytes, v.span()))
                }
                Err(e) => {
                    self.error(key, Some(v.span()), format!("cannot read {path}: {e}"));
                    return empty;
                }
            }
        } else {
            let Some(v) = sec.get("secret") else {
                return empty;
            };
            let key = sec.key("secret");
            let Some(s) = self.string_of(&key, v) else {
                return empty;
            };
            (key, (s.into_bytes(), v.span()))
        };
        let (bytes, span) = bytes;
        if bytes.len() < MIN_SECRET_BYTES {
            self.error(
                key,
                Some(span),
                format!(
                    "secret is {} bytes; HS* needs at least {MIN_SECRET_BYTES} (generate one with `openssl rand -base64 48`)",
                    bytes.len()
                ),
            );
            return empty;
        }
        Secret::new(bytes)
    }

    fn identity(&mut self, root: &DeTable<'_>) -> IdentityConfig {
        let sec = self.section(root, "identity", IDENTITY_KEYS, false);
        let default_header = HeaderName::from_static("x-auth-user");
        let user_header = self
            .get(&sec, "user_header", false, parse_user_header)
            .unwrap_or(default_header);
        let prefix = self
            .get(&sec, "prefix", false, parse_identity_prefix)
            .unwrap_or_else(|| "x-auth-".to_string());
        IdentityConfig {
            user_header,
            prefix,
        }
    }

    fn passwords(&mut self, root: &DeTable<'_>) -> PasswordConfig {
        let sec = self.section(root, "passwords", PASSWORD_KEYS, false);
        let max_u32 = u64::from(u32::MAX);
        let memory_kib = self.integer(&sec, "memory_kib", 19_456, 8, max_u32) as u32;
        let iterations = self.integer(&sec, "iterations", 2, 1, max_u32) as u32;
        // argon2 caps lanes at 2^24 - 1.
        let parallelism = self.integer(&sec, "parallelism", 1, 1, 0x00FF_FFFF) as u32;
        if u64::from(memory_kib) < 8 * u64::from(parallelism) {
            let span = sec.get("memory_kib").map(|v| v.span());
            self.error(
                sec.key("memory_kib"),
                span,
                format!(
                    "must be at least 8 × parallelism = {} (argon2 needs 8 KiB per lane)",
                    8 * u64::from(parallelism)
                ),
            );
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max_concurrent =
            self.integer(&sec, "max_concurrent", cpus as u64, 1, u32::MAX.into()) as usize;
        let queue_timeout = self.duration(&sec, "queue_timeout", Duration::from_secs(5), false);
        let max_queue = self.integer(&sec, "max_queue", 64, 0, u32::MAX.into()) as usize;
        PasswordConfig {
            memory_kib,
            iterations,
            parallelism,
            max_concurrent,
            queue_timeout,
            max_queue,
        }
    }

    fn routes(&mut self, root: &DeTable<'_>) -> Vec<RouteConfig> {
        let Some(v) = root.get("routes") else {
            self.error("routes", None, "at least one [[routes]] entry is required");
            return Vec::new();
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.error(
                "routes",
                Some(v.span()),
                format!(
                    "expected an array of tables (write [[routes]], not [routes]), found {}",
                    v.get_ref().type_str()
                ),
            );
            return Vec::new();
        };
        if items.is_empty() {
            self.error(
                "routes",
                Some(v.span()),
                "at least one [[routes]] entry is required",
            );
        }
        let mut routes = Vec::new();
        let mut seen: Vec<(String, usize)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let name = format!("routes[{i}]");
            let DeValue::Table(t) = item.get_ref() else {
                self.error(
                    name,
                    Some(item.span()),
                    format!("expected a table, found {}", item.get_ref().type_str()),
                );
                continue;
            };
            self.unknown_keys(&name, t, ROUTE_KEYS);
            let sec = Section {
                name,
                table: Some(t),
                span: Some(item.span()),
                report_missing: true,
            };
            let path = self.get(&sec, "path", true, parse_route_path);
            if let Some(p) = &path {
                if let Some((_, first)) = seen.iter().find(|(q, _)| q == p) {
                    let span = sec.get("path").map(|v| v.span());
                    self.error(
                        sec.key("path"),
                        span,
                        format!("duplicate route path {p:?} (already used by routes[{first}])"),
                    );
                } else {
                    seen.push((p.clone(), i));
                }
            }
            let upstream = self.get(&sec, "upstream", true, parse_upstream);
            let auth = self
                .get(&sec, "auth", false, |s| match s {
                    "required" => Ok(AuthMode::Required),
                    "public" => Ok(AuthMode::Public),
                    other => Err(format!("must be \"required\" or \"public\", got {other:?}")),
                })
                .unwrap_or(AuthMode::Required);
            let strip_prefix = self.boolean(&sec, "strip_prefix", false);
            let forward_token = self.boolean(&sec, "forward_token", false);
            let connect_timeout =
                self.duration(&sec, "connect_timeout", Duration::from_secs(5), true);
            let timeout = self.duration(&sec, "timeout", Duration::from_secs(60), true);
            if let (Some(path), Some(upstream)) = (path, upstream) {
                routes.push(RouteConfig {
                    path,
                    upstream,
                    auth,
                    strip_prefix,
                    forward_token,
                    connect_timeout,
                    timeout,
                });
            }
        }
        routes
    }
}

/// Placeholder for a listen address that failed to parse; never returned in a `Config`.
const UNSPECIFIED_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// The largest config file keycard reads.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The largest `secret_file` keycard reads.
const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;

/// Reads a regular file of at most `max` bytes. Anything else is refused before it is opened
/// or read: a FIFO would block (at startup, or a reloader for ever), `/dev/zero` would never
/// end, a huge file would fill memory.
fn read_small_file(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > max {
        return Err(format!("larger than {max} bytes"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(max + 1).read_to_end(&mut bytes))
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(bytes)
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("invalid listen address {s:?}: expected IP:port such as \"0.0.0.0:8080\" or \"[::]:8080\"")
    })
}

/// A CIDR, or a bare IP meaning just that address (/32 or /128).
fn parse_ip_net(s: &str) -> Result<IpNet, String> {
    if s.contains('/') {
        s.parse::<IpNet>()
            .map(|n| n.trunc())
            .map_err(|_| format!("invalid CIDR {s:?}: expected e.g. \"10.0.0.0/8\" or \"::1/128\""))
    } else {
        s.parse::<std::net::IpAddr>().map(IpNet::from).map_err(|_| {
            format!("invalid IP address {s:?}: expected e.g. \"10.0.0.1\" or \"10.0.0.0/8\"")
        })
    }
}

/// Parses durations such as `500ms`, `10s`, `15m`, `2h`, `7d` or combinations (`1h30m`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    const HINT: &str =
        "expected a duration such as \"500ms\", \"10s\", \"15m\", \"2h\", \"7d\" or \"1h30m\"";
    if s.is_empty() {
        return Err(format!("empty duration: {HINT}"));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "duration {s:?} has no unit: add one, e.g. \"{s}s\" (units: ms, s, m, h, d)"
        ));
    }
    let bad = || format!("invalid duration {s:?}: {HINT}");
    let mut total_ms: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => {
                return Err(format!(
                    "invalid duration {s:?}: every number needs a unit (ms, s, m, h, d)"
                ));
            }
            unit => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
                ));
            }
        };
        rest = &rest[unit_len..];
        total_ms = n
            .checked_mul(unit_ms)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| format!("duration {s:?} is too large"))?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// `memory://`, or a `redis://` URL kept as written. Messages never echo the URL: it may
/// carry a password. `rediss://` is refused here rather than at the first connection: this
/// build has no Redis TLS, and `keycard check` must not pass a config `run` cannot use.
fn parse_store_url(s: &str) -> Result<StoreUrl, String> {
    if s == "memory://" {
        return Ok(StoreUrl::Memory);
    }
    if s.starts_with("rediss://") {
        return Err(
            "rediss:// (Redis over TLS) is not supported by this build; use redis:// on a \
             trusted network or a local TLS tunnel"
                .to_string(),
        );
    }
    if s.starts_with("redis://") {
        let uri: http::Uri = s.parse().map_err(|_| {
            "invalid redis URL (expected redis://[:password@]host[:port][/db])".to_string()
        })?;
        if uri.host().is_none_or(str::is_empty) {
            return Err("redis URL has no host (expected redis://host[:port][/db])".to_string());
        }
        if !port_is_valid(&uri) {
            return Err("redis URL has an invalid port (expected 1-65535)".to_string());
        }
        return Ok(StoreUrl::Redis(s.to_string()));
    }
    Err("unsupported store URL: expected \"memory://\" or \"redis://…\"".to_string())
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

fn parse_algorithm(s: &str) -> Result<jsonwebtoken::Algorithm, String> {
    match s {
        "HS256" => Ok(jsonwebtoken::Algorithm::HS256),
        "HS384" => Ok(jsonwebtoken::Algorithm::HS384),
        "HS512" => Ok(jsonwebtoken::Algorithm::HS512),
        other => Err(format!(
            "unsupported algorithm {other:?}: only HS256, HS384 and HS512 are supported"
        )),
    }
}

/// Lowercases and folds `_` and `.` to `-`, the way CGI-style back ends read header names.
fn fold_header_name(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '_' | '.' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

fn parse_user_header(s: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(s.as_bytes())
        .map_err(|_| format!("{s:?} is not a valid HTTP header name"))?;
    let folded = fold_header_name(name.as_str());
    if RESERVED_IDENTITY_HEADERS.contains(&folded.as_str()) {
        return Err(format!(
            "{s:?} is a header the proxy itself handles (hop-by-hop, framing, routing or credentials); pick another name such as \"X-Auth-User\""
        ));
    }
    Ok(name)
}

fn parse_identity_prefix(s: &str) -> Result<String, String> {
    let folded = fold_header_name(s);
    if folded.is_empty() {
        return Err("must not be empty".to_string());
    }
    if HeaderName::from_bytes(folded.as_bytes()).is_err() {
        return Err(format!("{s:?} is not a valid header name prefix"));
    }
    Ok(folded)
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

fn parse_route_path(p: &str) -> Result<String, String> {
    check_path(p)?;
    if p.len() > 1 && p.ends_with('/') {
        return Err(format!(
            "path {p:?} must not end with \"/\" (write {:?}; it matches whole segments)",
            p.trim_end_matches('/')
        ));
    }
    Ok(p.to_string())
}

/// `http://host[:port][/base]`. The port defaults to 80 and is always written into the
/// authority, so consumers can rely on `authority.port_u16()` being `Some`.
fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let (scheme, rest) = s.split_once("://").ok_or_else(|| {
        format!("upstream {s:?} must be an absolute URL such as \"http://127.0.0.1:3000\"")
    })?;
    match scheme.to_ascii_lowercase().as_str() {
        "http" => {}
        "https" => {
            return Err(format!(
                "upstream {s:?}: https upstreams are not supported yet; use http://"
            ));
        }
        other => {
            return Err(format!(
                "upstream {s:?}: scheme {other:?} is not supported; use http://"
            ));
        }
    }
    let authority_part = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority_part.contains('@') {
        return Err(format!(
            "upstream {s:?} must not contain user info (user@host)"
        ));
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
        None => format!("{host}:80").parse().ok(),
    }
    .ok_or_else(|| format!("invalid upstream authority in {s:?}"))?;
    let path = uri.path();
    let base_path = path.trim_end_matches('/');
    if !base_path.is_empty() {
        check_path(base_path).map_err(|e| format!("upstream base {e}"))?;
    }
    Ok(Upstream {
        scheme: http::uri::Scheme::HTTP,
        authority,
        base_path: base_path.to_string(),
    })
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
        assert_eq!(c.tokens.secret.expose(), SECRET.as_bytes());
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
            ("https://h:1", "https upstreams are not supported"),
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
        for alg in ["RS256", "ES256", "none", "hs256"] {
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
            "rediss://h:6380",
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
algorithm = "RS256"
secret = "${NOT_SET}"
[[routes]]
path = "/api/"
upstream = "https://x"
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
        assert_eq!(c.tokens.secret.expose(), SECRET.as_bytes());
        // Only one trailing newline is stripped.
        let c = parse(&with_file(&lf2)).unwrap();
        assert_eq!(c.tokens.secret.expose(), format!("{SECRET}\n").as_bytes());

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
            assert_eq!(c.tokens.secret.expose(), SECRET.as_bytes(), "{name}");
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
