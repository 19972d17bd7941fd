//! Test harness shared by every integration test binary.
//!
//! - [`RedisServer`]: a real `redis-server` on a free loopback port, killed on drop; it can be
//!   stopped and started again on the same port to simulate an outage.
//! - [`Upstream`]: an echo server (hyper 1.x) that answers every request with a JSON
//!   description of what it received and records each request, so tests can prove the
//!   upstream was *not* reached.
//! - [`Gateway`]: keycard itself, run in-process on listeners bound to port 0.
//! - Token helpers (mint, forge, `alg: none`, decode claims) and a raw-socket client for
//!   requests reqwest cannot express.
//!
//! Everything talks to 127.0.0.1 only and every wait is bounded.

#![allow(dead_code)]

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The HS* secret every test gateway uses (from `${KEYCARD_SECRET}`); 32+ bytes.
pub const SECRET: &str = "keycard-test-secret-0123456789-abcdefghij";
/// A password that satisfies the 8–1024 byte rule.
pub const PASSWORD: &str = "correct horse battery staple";

/// How long any single HTTP exchange in a test may take.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Seconds since the epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A port that was free a moment ago (bind port 0, read it back, release it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback address nothing listens on (for "upstream refused" tests).
pub fn closed_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// A real `redis-server` on a loopback port; killed on drop.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a fresh server on a free port and waits until it answers PING.
    pub fn new() -> RedisServer {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer { port, child: None };
            match server.try_start() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("could not start redis-server: {last}");
    }

    /// The port it listens on (stable across `stop`/`start`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0`, for the gateway config and for direct clients.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it: an outage.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Bounded wait until the port no longer answers.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && ping(self.port) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts it again on the same port (empty: it keeps no data).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let mut last = String::new();
        // The port may linger briefly after a kill; retry a few times.
        for _ in 0..10 {
            match self.try_start() {
                Ok(()) => return,
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        panic!(
            "could not restart redis-server on port {}: {last}",
            self.port
        );
    }

    fn try_start(&mut self) -> Result<(), String> {
        let spawned = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("redis-server not found: run scripts/test.sh, which installs it")
            }
            Err(e) => panic!("cannot spawn redis-server: {e}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server exited early: {status}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("redis-server did not answer PING within 10s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client for writing keys directly, as another process would.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis url")
    }

    /// Runs one command on a fresh connection, bounded to 5 s.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let client = self.client();
        tokio::time::timeout(Duration::from_secs(5), async move {
            let mut con = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to test redis");
            cmd.query_async::<T>(&mut con).await.expect("redis command")
        })
        .await
        .expect("redis command timed out")
    }
}

impl Default for RedisServer {
    fn default() -> Self {
        RedisServer::new()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// True when something on the port answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

// ---------------------------------------------------------------------------------------------
// Upstream echo server
// ---------------------------------------------------------------------------------------------

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query exactly as received.
    pub path: String,
    /// Every header in order, names lowercase.
    pub headers: Vec<(String, String)>,
}

/// An echo server. Every request is answered 200 with JSON
/// `{"method","path","headers":[[name,value],...],"body"}`, except:
/// - a path with a `slow` segment sleeps 3 s first;
/// - a path with a `stream` segment answers `chunk-1`, `chunk-2`, `chunk-3` 400 ms apart.
pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let recorded = recorded.clone();
                        async move { Ok::<_, Infallible>(echo(req, recorded).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            requests,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, for route configs.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests reached the upstream.
    pub fn hits(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type EchoBody = BoxBody<Bytes, Infallible>;

async fn echo(req: Request<Incoming>, recorded: Arc<Mutex<Vec<Recorded>>>) -> Response<EchoBody> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| req.uri().to_string());
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    recorded.lock().unwrap().push(Recorded {
        method: method.clone(),
        path: path.clone(),
        headers: headers.clone(),
    });
    let segments: Vec<&str> = req.uri().path().split('/').collect();
    if segments.contains(&"stream") {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for i in 1..=3 {
                if tx.send(Bytes::from(format!("chunk-{i}\n"))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        });
        return Response::builder()
            .header("content-type", "text/plain")
            .body(ChannelBody(rx).boxed())
            .unwrap();
    }
    if segments.contains(&"slow") {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let body = match req.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let headers_json: Vec<Value> = headers.iter().map(|(n, v)| json!([n, v])).collect();
    let out = json!({ "method": method, "path": path, "headers": headers_json, "body": body });
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(out.to_string())).boxed())
        .unwrap()
}

/// A response body fed from a channel, one frame per message.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// What the echo upstream reported, parsed from a forwarded response.
#[derive(Debug, Clone)]
pub struct Echo {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Echo {
    pub fn parse(v: &Value) -> Echo {
        let headers = v["headers"]
            .as_array()
            .unwrap_or_else(|| panic!("not an echo response: {v}"))
            .iter()
            .map(|pair| {
                (
                    pair[0].as_str().unwrap().to_owned(),
                    pair[1].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        Echo {
            method: v["method"].as_str().unwrap_or_default().to_owned(),
            path: v["path"].as_str().unwrap_or_default().to_owned(),
            headers,
            body: v["body"].as_str().unwrap_or_default().to_owned(),
        }
    }

    /// Reads a response through the gateway, asserting it is a 200 from the echo upstream.
    pub async fn from_response(resp: reqwest::Response) -> Echo {
        let status = resp.status();
        let text = resp.text().await.expect("read body");
        assert_eq!(
            status, 200,
            "expected the upstream's 200, got {status}: {text}"
        );
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("upstream body is not JSON ({e}): {text}"));
        Echo::parse(&v)
    }

    /// Every value of the header `name` (compared case-insensitively).
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn has(&self, name: &str) -> bool {
        !self.values(name).is_empty()
    }

    /// Headers whose name, lowercased with `_` and `.` folded to `-`, starts with `prefix`.
    pub fn identity_like(&self, prefix: &str) -> Vec<(String, String)> {
        let prefix = prefix.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| fold(n).starts_with(&prefix))
            .cloned()
            .collect()
    }
}

/// Lowercase with `_` and `.` treated as `-`, the contract's identity-header comparison.
pub fn fold(name: &str) -> String {
    name.to_ascii_lowercase().replace(['_', '.'], "-")
}

// ---------------------------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------------------------

/// One `[[routes]]` entry.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    pub path: String,
    pub upstream: String,
    pub auth: &'static str,
    pub strip_prefix: bool,
    pub forward_token: bool,
    pub timeout: Option<String>,
    pub connect_timeout: Option<String>,
}

impl RouteSpec {
    pub fn new(path: &str, upstream: &str, auth: &'static str) -> RouteSpec {
        RouteSpec {
            path: path.into(),
            upstream: upstream.into(),
            auth,
            strip_prefix: false,
            forward_token: false,
            timeout: None,
            connect_timeout: None,
        }
    }

    pub fn strip(mut self) -> Self {
        self.strip_prefix = true;
        self
    }

    pub fn forward_token(mut self) -> Self {
        self.forward_token = true;
        self
    }

    pub fn timeout(mut self, t: &str) -> Self {
        self.timeout = Some(t.into());
        self
    }

    pub fn connect_timeout(mut self, t: &str) -> Self {
        self.connect_timeout = Some(t.into());
        self
    }
}

/// Options that become the gateway's TOML config.
#[derive(Debug, Clone)]
pub struct GatewayOpts {
    pub store_url: String,
    pub prefix: Option<String>,
    pub store_timeout: Option<String>,
    pub routes: Vec<RouteSpec>,
    pub algorithm: String,
    pub access_ttl: Option<String>,
    pub refresh_ttl: Option<String>,
    pub leeway: Option<String>,
    pub trusted_proxies: Vec<String>,
    pub header_read_timeout: Option<String>,
    pub shutdown_timeout: Option<String>,
    /// Tiny argon2 parameters (64 KiB, 1 iteration) unless false.
    pub fast_passwords: bool,
    /// `identity.user_header` (default `X-Auth-User`).
    pub user_header: String,
    /// `identity.prefix`, when set.
    pub identity_prefix: Option<String>,
    /// Extra raw `key = value` lines for `[server]` (e.g. `max_connections = 2`).
    pub server_extra: Vec<String>,
    /// Extra raw lines for `[passwords]` (after the fast parameters, which they may not
    /// repeat; set `fast_passwords = false` to choose the cost yourself).
    pub passwords_extra: Vec<String>,
    /// Raw lines for a `[throttle]` section, emitted only when non-empty.
    pub throttle: Vec<String>,
}

impl GatewayOpts {
    /// Standard routes against `upstream`:
    /// `/api` required, `/api/open` public, `/public` public, `/private` required,
    /// `/token` required + forward_token, `/strip` public + strip_prefix. No `/` route.
    pub fn new(store_url: &str, upstream: &str) -> GatewayOpts {
        GatewayOpts {
            store_url: store_url.into(),
            prefix: None,
            store_timeout: Some("1s".into()),
            routes: vec![
                RouteSpec::new("/api", upstream, "required"),
                RouteSpec::new("/api/open", upstream, "public"),
                RouteSpec::new("/public", upstream, "public"),
                RouteSpec::new("/private", upstream, "required"),
                RouteSpec::new("/token", upstream, "required").forward_token(),
                RouteSpec::new("/strip", upstream, "public").strip(),
            ],
            algorithm: "HS256".into(),
            access_ttl: None,
            refresh_ttl: None,
            leeway: None,
            trusted_proxies: vec![],
            header_read_timeout: None,
            shutdown_timeout: None,
            fast_passwords: true,
            user_header: "X-Auth-User".into(),
            identity_prefix: None,
            server_extra: vec![],
            passwords_extra: vec![],
            throttle: vec![],
        }
    }

    pub fn to_toml(&self) -> String {
        fn q(s: &str) -> String {
            serde_json::to_string(s).unwrap() // a JSON string is a valid TOML basic string
        }
        let mut t = String::new();
        t.push_str("[server]\nlisten = \"127.0.0.1:1\"\n");
        if !self.trusted_proxies.is_empty() {
            let list: Vec<String> = self.trusted_proxies.iter().map(|p| q(p)).collect();
            t.push_str(&format!("trusted_proxies = [{}]\n", list.join(", ")));
        }
        if let Some(v) = &self.header_read_timeout {
            t.push_str(&format!("header_read_timeout = {}\n", q(v)));
        }
        if let Some(v) = &self.shutdown_timeout {
            t.push_str(&format!("shutdown_timeout = {}\n", q(v)));
        }
        for line in &self.server_extra {
            t.push_str(line);
            t.push('\n');
        }
        t.push_str("\n[admin]\nlisten = \"127.0.0.1:2\"\n");
        t.push_str(&format!("\n[store]\nurl = {}\n", q(&self.store_url)));
        if let Some(v) = &self.prefix {
            t.push_str(&format!("prefix = {}\n", q(v)));
        }
        if let Some(v) = &self.store_timeout {
            t.push_str(&format!("timeout = {}\n", q(v)));
        }
        t.push_str(&format!(
            "\n[tokens]\nalgorithm = {}\nsecret = \"${{KEYCARD_SECRET}}\"\nissuer = \"keycard\"\n",
            q(&self.algorithm)
        ));
        for (k, v) in [
            ("access_ttl", &self.access_ttl),
            ("refresh_ttl", &self.refresh_ttl),
            ("leeway", &self.leeway),
        ] {
            if let Some(v) = v {
                t.push_str(&format!("{k} = {}\n", q(v)));
            }
        }
        t.push_str(&format!(
            "\n[identity]\nuser_header = {}\n",
            q(&self.user_header)
        ));
        if let Some(v) = &self.identity_prefix {
            t.push_str(&format!("prefix = {}\n", q(v)));
        }
        if self.fast_passwords || !self.passwords_extra.is_empty() {
            t.push_str("\n[passwords]\n");
        }
        if self.fast_passwords {
            t.push_str("memory_kib = 64\niterations = 1\nparallelism = 1\n");
        }
        for line in &self.passwords_extra {
            t.push_str(line);
            t.push('\n');
        }
        if !self.throttle.is_empty() {
            t.push_str("\n[throttle]\n");
            for line in &self.throttle {
                t.push_str(line);
                t.push('\n');
            }
        }
        for r in &self.routes {
            t.push_str(&format!(
                "\n[[routes]]\npath = {}\nupstream = {}\nauth = {}\n",
                q(&r.path),
                q(&r.upstream),
                q(r.auth)
            ));
            if r.strip_prefix {
                t.push_str("strip_prefix = true\n");
            }
            if r.forward_token {
                t.push_str("forward_token = true\n");
            }
            if let Some(v) = &r.timeout {
                t.push_str(&format!("timeout = {}\n", q(v)));
            }
            if let Some(v) = &r.connect_timeout {
                t.push_str(&format!("connect_timeout = {}\n", q(v)));
            }
        }
        t
    }

    pub fn config(&self) -> keycard::config::Config {
        let toml = self.to_toml();
        keycard::config::Config::parse(&toml, Path::new("test.toml"), &env)
            .unwrap_or_else(|e| panic!("test config rejected:\n{e}\n--- config ---\n{toml}"))
    }
}

/// The environment test configs see: only `KEYCARD_SECRET`.
pub fn env(name: &str) -> Option<String> {
    (name == "KEYCARD_SECRET").then(|| SECRET.to_owned())
}

/// A reqwest client for loopback tests: no proxy from the environment, no redirects, bounded.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(CLIENT_TIMEOUT)
        .build()
        .unwrap()
}

/// keycard, running in-process on port-0 listeners; shut down on drop.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub client: reqwest::Client,
    pub opts: GatewayOpts,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), keycard::server::RunError>>>,
}

impl Gateway {
    /// Starts the gateway and waits (bounded) until its admin `/healthz` answers 200.
    pub async fn start(opts: GatewayOpts) -> Gateway {
        Gateway::start_with(opts, None).await
    }

    /// Starts the gateway with its config in a file it reloads from (polled every 100 ms,
    /// and on [`ConfigFile::hup`]).
    pub async fn start_reloadable(opts: GatewayOpts) -> (Gateway, ConfigFile) {
        let dir = std::env::temp_dir().join(format!("keycard-reload-{}", random_jti()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keycard.toml");
        std::fs::write(&path, opts.to_toml()).unwrap();
        let (trigger, triggers) = tokio::sync::mpsc::channel(1);
        let source = keycard::reload::ReloadSource {
            path: path.clone(),
            env: Arc::new(|name: &str| env(name)),
            poll_every: Duration::from_millis(100),
            triggers,
        };
        let gw = Gateway::start_with(opts, Some(source)).await;
        (gw, ConfigFile { dir, path, trigger })
    }

    async fn start_with(
        opts: GatewayOpts,
        reload: Option<keycard::reload::ReloadSource>,
    ) -> Gateway {
        let config = opts.config();
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(keycard::run_with_reload(
            config,
            keycard::Listeners { server, admin },
            async move {
                let _ = rx.await;
            },
            reload,
        ));
        let mut gw = Gateway {
            addr,
            admin: admin_addr,
            client: http_client(),
            opts,
            shutdown: Some(tx),
            handle: Some(handle),
        };
        gw.wait_healthy().await;
        gw
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                let result = self.handle.take().unwrap().await;
                panic!("keycard::run ended during startup: {result:?}");
            }
            let r = self
                .client
                .get(self.admin_url("/healthz"))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if matches!(&r, Ok(resp) if resp.status() == 200) {
                return;
            }
            if Instant::now() > deadline {
                panic!("gateway admin /healthz did not answer 200 within 10s: {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// POST /register with a JSON body.
    pub async fn register(&self, user: &str, password: &str) -> reqwest::Response {
        self.client
            .post(self.url("/register"))
            .json(&json!({ "username": user, "password": password }))
            .send()
            .await
            .expect("POST /register")
    }

    /// POST /login with a JSON body.
    pub async fn login_raw(&self, user: &str, password: &str) -> reqwest::Response {
        self.client
            .post(self.url("/login"))
            .json(&json!({ "username": user, "password": password }))
            .send()
            .await
            .expect("POST /login")
    }

    /// Logs in, asserting 200; returns (access, refresh).
    pub async fn login(&self, user: &str, password: &str) -> (String, String) {
        let resp = self.login_raw(user, password).await;
        let (status, body) = json_body(resp).await;
        assert_eq!(status, 200, "login {user}: {body}");
        (
            body["access_token"].as_str().expect("access_token").into(),
            body["refresh_token"]
                .as_str()
                .expect("refresh_token")
                .into(),
        )
    }

    /// Registers (asserting 201) and logs in; returns (access, refresh).
    pub async fn user(&self, user: &str) -> (String, String) {
        let (status, body) = json_body(self.register(user, PASSWORD).await).await;
        assert_eq!(status, 201, "register {user}: {body}");
        self.login(user, PASSWORD).await
    }

    /// GET `path` with an optional Bearer token.
    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Signals shutdown without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits (bounded) for `run` to return after shutdown.
    pub async fn wait_stopped(&mut self, limit: Duration) -> Result<(), keycard::server::RunError> {
        let handle = self.handle.take().expect("gateway already stopped");
        match tokio::time::timeout(limit, handle).await {
            Ok(joined) => joined.expect("keycard::run panicked"),
            Err(_) => panic!("keycard::run did not return within {limit:?} after shutdown"),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.begin_shutdown();
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// The config file of a reloadable gateway (see [`Gateway::start_reloadable`]); its folder is
/// removed on drop.
pub struct ConfigFile {
    pub dir: std::path::PathBuf,
    pub path: std::path::PathBuf,
    trigger: tokio::sync::mpsc::Sender<()>,
}

impl ConfigFile {
    /// Replaces the file the way editors and deploy tools do: write a new file, rename it
    /// over the old one.
    pub fn write(&self, text: &str) {
        let tmp = self.dir.join("keycard.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    /// What SIGHUP does in the binary: reload now, changed or not.
    pub async fn hup(&self) {
        self.trigger.send(()).await.unwrap();
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis server, an echo upstream and a gateway with the standard routes.
pub struct Stack {
    pub gw: Gateway,
    pub upstream: Upstream,
    pub redis: RedisServer,
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(|_| {}).await
    }

    /// Like `start`, letting the test adjust the options first.
    pub async fn start_with(adjust: impl FnOnce(&mut GatewayOpts)) -> Stack {
        let redis = RedisServer::new();
        let upstream = Upstream::start().await;
        let mut opts = GatewayOpts::new(&redis.url(), &upstream.url());
        adjust(&mut opts);
        let gw = Gateway::start(opts).await;
        Stack {
            gw,
            upstream,
            redis,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// Status and body parsed as JSON (panics if the body is not JSON).
pub async fn json_body(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let text = resp.text().await.expect("read body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("status {status}: body is not JSON ({e}; content-type {ct:?}): {text:?}")
    });
    assert!(
        ct.starts_with("application/json"),
        "status {status}: gateway JSON must say application/json, got {ct:?}"
    );
    (status, v)
}

/// A gateway-written error: status, `{"msg"}` and the `WWW-Authenticate` header.
#[derive(Debug)]
pub struct Failure {
    pub status: u16,
    pub msg: String,
    pub www_authenticate: Option<String>,
    pub headers: reqwest::header::HeaderMap,
}

pub async fn failure(resp: reqwest::Response) -> Failure {
    let headers = resp.headers().clone();
    let www_authenticate = headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned());
    let (status, body) = json_body(resp).await;
    let msg = body["msg"]
        .as_str()
        .unwrap_or_else(|| panic!("status {status}: no \"msg\" string in {body}"))
        .to_owned();
    Failure {
        status,
        msg,
        www_authenticate,
        headers,
    }
}

/// Asserts a 401 that says a token was presented but is not acceptable.
pub fn assert_invalid_token(f: &Failure, what: &str) {
    assert_eq!(f.status, 401, "{what}: {f:?}");
    assert_eq!(
        f.www_authenticate.as_deref(),
        Some("Bearer error=\"invalid_token\""),
        "{what}: {f:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

/// Standard claims for `sub`, valid now, of kind `typ` (`access`/`refresh`).
pub fn claims(sub: &str, typ: &str) -> Value {
    let now = now();
    json!({
        "sub": sub,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": random_jti(),
        "iss": "keycard",
        "type": typ,
    })
}

/// 128 random bits, hex.
pub fn random_jti() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Signs `claims` with `alg` and `secret`, as an attacker or another issuer could.
pub fn mint(alg: jsonwebtoken::Algorithm, secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// Signs with the gateway's own algorithm (HS256) and secret: a token keycard should accept.
pub fn mint_valid(claims: &Value) -> String {
    mint(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), claims)
}

/// An unsigned `alg: none` token.
pub fn alg_none(claims: &Value) -> String {
    let header = json!({ "alg": "none", "typ": "JWT" });
    format!(
        "{}.{}.",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    )
}

/// The payload of a JWT, without checking anything.
pub fn decode_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("JWT has a payload");
    let bytes = b64url_decode(payload).expect("payload is base64url");
    serde_json::from_slice(&bytes).expect("payload is JSON")
}

/// Replaces the payload of `token` by `claims`, keeping header and signature.
pub fn with_payload(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    format!(
        "{}.{}.{}",
        parts[0],
        b64url(claims.to_string().as_bytes()),
        parts[2]
    )
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding.
pub fn b64url(input: &[u8]) -> String {
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Decodes base64url (padding optional).
pub fn b64url_decode(input: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in input.trim_end_matches('=').bytes() {
        let v = B64.iter().position(|&x| x == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Raw sockets
// ---------------------------------------------------------------------------------------------

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    /// 0 when no status line could be read (connection closed or reset first).
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    pub body: Vec<u8>,
    /// The connection, for checking whether the server closed it.
    stream: Option<TcpStream>,
}

impl RawResponse {
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `{"msg"}` of a JSON body, if any.
    pub fn msg(&self) -> Option<String> {
        let v: Value = serde_json::from_slice(&self.body).ok()?;
        v["msg"].as_str().map(str::to_owned)
    }

    /// True when the server closes the connection within `limit` (EOF or reset).
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        match self.stream.as_mut() {
            Some(stream) => read_to_close(stream, limit).await.1,
            None => true,
        }
    }
}

/// Reads everything the peer sends until it closes (EOF or reset) or `limit` passes; returns
/// the bytes and whether it closed.
pub async fn read_to_close<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    limit: Duration,
) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes `request` verbatim to `addr` and reads one response (bounded to 10 s).
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    // The server may answer and close before reading everything (e.g. 431): ignore write errors.
    let _ = stream.write_all(request).await;
    read_response(stream, Duration::from_secs(10)).await
}

/// Reads one HTTP/1.1 response (Content-Length, chunked or until EOF).
pub async fn read_response(mut stream: TcpStream, limit: Duration) -> RawResponse {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut eof = false;
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break Some(i);
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                eof = true;
                break None;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!(
                "no complete response head within {limit:?}; got {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    };
    let Some(head_end) = head_end else {
        return RawResponse {
            status: 0,
            head: String::from_utf8_lossy(&buf).into_owned(),
            body: vec![],
            stream: None,
        };
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut body = buf[head_end + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let lower = head.to_ascii_lowercase();
    let content_length = lower.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    let chunked = lower
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    let complete = |body: &Vec<u8>| -> bool {
        if let Some(n) = content_length {
            body.len() >= n
        } else if chunked {
            find(body, b"0\r\n\r\n").is_some()
        } else {
            status == 204 || status == 304 || (100..200).contains(&status)
        }
    };
    while !eof && !complete(&body) {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => eof = true,
            Ok(Ok(n)) => body.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
    }
    if chunked {
        body = dechunk(&body);
    } else if let Some(n) = content_length {
        body.truncate(n);
    }
    RawResponse {
        status,
        head,
        body,
        stream: (!eof).then_some(stream),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(data, b"\r\n") {
        let size_str = String::from_utf8_lossy(&data[..eol]);
        let size_hex = size_str.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            break;
        };
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// A GET request as raw bytes, with extra header lines (each without CRLF).
pub fn raw_get(target: &str, extra: &[&str]) -> Vec<u8> {
    let mut s = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for h in extra {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}
