//! Test harness shared by every integration test binary.
//!
//! - [`RedisServer`]: a real `redis-server` on a free loopback port, killed on drop; it can be
//!   stopped and started again on the same port to simulate an outage.
//! - [`RedisCluster`]: a real Redis Cluster (3 masters, optionally a replica each) of
//!   `redis-server --cluster-enabled yes` processes on loopback ports, killed on drop.
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
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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

/// What tests need to build configs, re-exported so `use support::*` brings it (not every
/// test binary uses all of it).
#[allow(unused_imports)]
pub use keycard::config::{
    AuthMode, Config, ExposeSecret, PasswordConfig, PreviousKey, RouteConfig, Secret, StoreUrl,
    ThrottleConfig, TokenConfig,
};
#[allow(unused_imports)]
pub use std::time::Duration;

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

/// Starts `redis-server` with `args`, its output discarded. Panics, never skips, when it is not
/// installed: the tests that need it must fail loudly.
pub fn spawn_redis_server<I, S>(args: I) -> std::process::Child
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let spawned = Command::new("redis-server")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("redis-server not found: run scripts/test.sh, which installs it")
        }
        Err(e) => panic!("cannot spawn redis-server: {e}"),
    }
}

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
        let mut child = spawn_redis_server([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]);
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

/// Runs `cmd` to completion within `limit`, killing it if it takes longer; (success, stdout,
/// stderr). Panics when the program is missing: the tests need it, they never skip.
pub fn run_within(cmd: &mut Command, limit: Duration) -> (bool, String, String) {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{program} not found: run scripts/test.sh, which installs redis")
        }
        Err(e) => panic!("cannot spawn {program}: {e}"),
    };
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{program} {:?} did not finish within {limit:?}",
                    cmd.get_args()
                );
            }
        }
    }
    let out = child.wait_with_output().expect("collect output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `redis-cli -p PORT ARGS...` (with `-c`, cluster mode: it follows `MOVED`), bounded to 10 s;
/// its output, or a panic with it when it fails.
pub fn redis_cli(port: u16, cluster: bool, args: &[&str]) -> String {
    let mut cmd = Command::new("redis-cli");
    if cluster {
        cmd.arg("-c");
    }
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args);
    let (ok, out, err) = run_within(&mut cmd, Duration::from_secs(10));
    assert!(ok, "redis-cli -p {port} {args:?} failed: {out}{err}");
    out
}

/// One node of a [`RedisCluster`].
struct ClusterNode {
    port: u16,
    child: Option<Child>,
}

/// A Redis Cluster of `redis-server --cluster-enabled yes` processes on loopback ports, in a
/// temporary folder (their `nodes-PORT.conf`), joined with `redis-cli --cluster create`;
/// every process is killed and the folder removed on drop.
pub struct RedisCluster {
    dir: std::path::PathBuf,
    nodes: Vec<ClusterNode>,
}

impl RedisCluster {
    /// 3 masters and `replicas` replicas of each; returns once every node reports
    /// `cluster_state:ok` (and every replica is in sync). `node_timeout_ms` is
    /// `cluster-node-timeout`: how soon a silent master is failed over.
    pub fn new(replicas: usize, node_timeout_ms: u64) -> RedisCluster {
        let cluster = RedisCluster::unjoined(3 * (1 + replicas), node_timeout_ms);
        cluster.join(replicas);
        cluster
    }

    /// `nodes` cluster-enabled servers, running but not yet joined: no slot is served, as
    /// while a cluster is being set up. [`RedisCluster::join`] makes them a cluster.
    pub fn unjoined(nodes: usize, node_timeout_ms: u64) -> RedisCluster {
        let dir = std::env::temp_dir().join(format!("keycard-cluster-{}", random_jti()));
        std::fs::create_dir_all(&dir).expect("create the cluster's folder");
        let mut cluster = RedisCluster {
            dir,
            nodes: Vec::new(),
        };
        for _ in 0..nodes {
            let node = cluster.start_node(node_timeout_ms);
            cluster.nodes.push(node);
        }
        cluster
    }

    /// Joins the nodes with `redis-cli --cluster create` (`replicas` per master) and waits
    /// until every node reports `cluster_state:ok` and every replica is in sync.
    pub fn join(&self, replicas: usize) {
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in self.ports() {
            create.arg(format!("127.0.0.1:{port}"));
        }
        create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .env("REDISCLI_CLUSTER_YES", "1");
        let (ok, out, err) = run_within(&mut create, Duration::from_secs(60));
        assert!(ok, "redis-cli --cluster create failed:\n{out}\n{err}");
        self.wait_ok(&self.ports(), Duration::from_secs(30));
        if replicas > 0 {
            let deadline = Instant::now() + Duration::from_secs(30);
            for port in self.ports() {
                loop {
                    let info = redis_cli(port, false, &["INFO", "replication"]);
                    if info.contains("role:master") || info.contains("master_link_status:up") {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "replica {port} never synced:\n{info}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Starts one node on free ports (the client port and `cluster-port`, its bus), waiting
    /// until it answers PING; tries new ports a few times if one was taken meanwhile.
    fn start_node(&self, node_timeout_ms: u64) -> ClusterNode {
        let mut last = String::new();
        for _ in 0..5 {
            let (port, bus) = (free_port(), free_port());
            if port == bus {
                continue;
            }
            let conf = self.dir.join(format!("nodes-{port}.conf"));
            let (port_text, bus_text) = (port.to_string(), bus.to_string());
            let node_timeout = node_timeout_ms.to_string();
            let mut child = spawn_redis_server([
                "--port".as_ref(),
                port_text.as_ref(),
                "--bind".as_ref(),
                "127.0.0.1".as_ref(),
                "--save".as_ref(),
                "".as_ref(),
                "--appendonly".as_ref(),
                "no".as_ref(),
                "--cluster-enabled".as_ref(),
                "yes".as_ref(),
                "--cluster-port".as_ref(),
                bus_text.as_ref(),
                "--cluster-config-file".as_ref(),
                conf.as_os_str(),
                "--cluster-node-timeout".as_ref(),
                node_timeout.as_ref(),
                "--dir".as_ref(),
                self.dir.as_os_str(),
            ]);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if ping(port) {
                    return ClusterNode {
                        port,
                        child: Some(child),
                    };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!("redis-server (cluster) exited early: {status}");
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = "redis-server (cluster) did not answer PING within 10s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start a cluster node: {last}");
    }

    /// Waits (bounded) until each of `ports` reports `cluster_state:ok`.
    pub fn wait_ok(&self, ports: &[u16], limit: Duration) {
        let deadline = Instant::now() + limit;
        for &port in ports {
            loop {
                let info = redis_cli(port, false, &["CLUSTER", "INFO"]);
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {port} not cluster_state:ok within {limit:?}:\n{info}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The client ports of every node still running.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }

    /// `redis+cluster://127.0.0.1:P1,…` over the running nodes, for the gateway config.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// `redis-cli -c` against a running node: what an operator types.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.ports()[0], true, args)
    }

    /// The slot of `key`, as the cluster computes it (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let out = self.cli(&["CLUSTER", "KEYSLOT", key]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key}: {out:?}"))
    }

    /// The port of the master serving `slot`, as a running node sees it (`CLUSTER NODES`),
    /// if one does.
    pub fn master_of(&self, slot: u16) -> Option<u16> {
        let nodes = self.cli(&["CLUSTER", "NODES"]);
        nodes.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let is_master =
                fields.get(2)?.split(',').any(|f| f == "master") && !fields[2].contains("fail");
            let serves = fields.iter().skip(8).any(|range| {
                let mut ends = range.splitn(2, '-').map(|n| n.parse::<u16>());
                match (ends.next(), ends.next()) {
                    (Some(Ok(start)), Some(Ok(end))) => (start..=end).contains(&slot),
                    (Some(Ok(only)), None) => only == slot,
                    _ => false,
                }
            });
            let port = fields.get(1)?.split('@').next()?.rsplit(':').next()?;
            (is_master && serves).then(|| port.parse().ok()).flatten()
        })
    }

    /// Kills the node on `port` (SIGKILL) and waits for it: a master's machine dying.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on {port}"));
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
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
    /// An echo server that records every request (see [`Upstream::requests`]).
    pub async fn start() -> Upstream {
        Upstream::serve(true).await
    }

    /// An echo server that records nothing, for load: memory stays flat however many
    /// requests it answers, and [`Upstream::hits`] stays 0.
    pub async fn start_unrecorded() -> Upstream {
        Upstream::serve(false).await
    }

    async fn serve(record: bool) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let recorded = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // EMFILE and friends under load: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let recorded = record.then(|| recorded.clone());
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

async fn echo(
    req: Request<Incoming>,
    recorded: Option<Arc<Mutex<Vec<Recorded>>>>,
) -> Response<EchoBody> {
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
    if let Some(recorded) = recorded {
        recorded.lock().unwrap().push(Recorded {
            method: method.clone(),
            path: path.clone(),
            headers: headers.clone(),
        });
    }
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

/// A route for test configs: `auth` is `"required"` or `"public"`.
pub fn route(path: &str, upstream: &str, auth: &str) -> RouteConfig {
    RouteConfig {
        path: path.into(),
        upstream: upstream
            .parse()
            .unwrap_or_else(|e| panic!("{upstream}: {e}")),
        auth: match auth {
            "public" => AuthMode::Public,
            "required" => AuthMode::Required,
            "optional" => AuthMode::Optional,
            other => panic!("auth {other:?}"),
        },
        ..RouteConfig::default()
    }
}

/// A gateway config built from keycard's typed defaults, never from TOML text: the standard
/// routes, a tiny argon2 cost, the test secret. It derefs to [`Config`], so a test writes
/// `o.server.max_connections = 2` or `o.throttle.address_limit = 3`. [`GatewayOpts::to_toml`]
/// renders it for the tests that need a file (reload, the binary, the load generator).
#[derive(Debug, Clone)]
pub struct GatewayOpts(pub Config);

impl std::ops::Deref for GatewayOpts {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.0
    }
}

impl std::ops::DerefMut for GatewayOpts {
    fn deref_mut(&mut self) -> &mut Config {
        &mut self.0
    }
}

impl GatewayOpts {
    /// Standard routes against `upstream`:
    /// `/api` required, `/api/open` public, `/public` public, `/private` required,
    /// `/token` required + forward_token, `/strip` public + strip_prefix. No `/` route.
    /// The listen addresses are placeholders (`127.0.0.1:1` and `:2`): in-process gateways
    /// bind their own listeners, and file-based tests replace them.
    pub fn new(store_url: &str, upstream: &str) -> GatewayOpts {
        let mut c = Config::default();
        c.server.listen = "127.0.0.1:1".parse().unwrap();
        c.admin.listen = "127.0.0.1:2".parse().unwrap();
        c.store.url = store_url
            .parse()
            .unwrap_or_else(|e| panic!("{store_url}: {e}"));
        c.store.timeout = Duration::from_secs(1);
        // No load balancer to tell: tests that stop a gateway want it stopped now.
        c.server.shutdown_delay = Duration::ZERO;
        c.store.connect_timeout = Duration::from_secs(1);
        c.tokens.secret = Secret::from(SECRET.as_bytes().to_vec());
        c.passwords.memory_kib = 64;
        c.passwords.iterations = 1;
        c.routes = vec![
            route("/api", upstream, "required"),
            route("/api/open", upstream, "public"),
            route("/public", upstream, "public"),
            route("/private", upstream, "required"),
            RouteConfig {
                forward_token: true,
                ..route("/token", upstream, "required")
            },
            RouteConfig {
                strip_prefix: true,
                ..route("/strip", upstream, "public")
            },
        ];
        GatewayOpts(c)
    }

    /// The typed config, as the in-process gateway gets it.
    pub fn config(&self) -> Config {
        self.0.clone()
    }

    /// The config as a TOML file, every key written out. The secret is written as
    /// `${KEYCARD_SECRET}` (see [`env`]) when it is the test secret, inline otherwise.
    pub fn to_toml(&self) -> String {
        let c = &self.0;
        let q = |s: &str| serde_json::to_string(s).unwrap(); // a JSON string is a TOML string
        // The largest unit that is exact, as a person would write it: "15m", "7d", "500ms".
        let ms = |d: Duration| {
            let n = d.as_millis();
            let unit = [
                (86_400_000, "d"),
                (3_600_000, "h"),
                (60_000, "m"),
                (1_000, "s"),
            ]
            .into_iter()
            .find(|(size, _)| n > 0 && n.is_multiple_of(*size));
            q(&match unit {
                Some((size, unit)) => format!("{}{unit}", n / size),
                None => format!("{n}ms"),
            })
        };
        let list = |items: Vec<String>| {
            let quoted: Vec<String> = items.iter().map(|s| q(s)).collect();
            format!("[{}]", quoted.join(", "))
        };
        let (s, p, t, th) = (&c.server, &c.passwords, &c.tokens, &c.throttle);
        let secret = |secret: &Secret, file: &Option<std::path::PathBuf>| match file {
            Some(path) => format!("secret_file = {}\n", q(&path.display().to_string())),
            None if secret.expose_secret() == SECRET.as_bytes() => {
                format!("secret = {}\n", q("${KEYCARD_SECRET}"))
            }
            None if secret.expose_secret().is_empty() => String::new(),
            None => {
                let text = std::str::from_utf8(secret.expose_secret()).expect("text secret");
                format!("secret = {}\n", q(text))
            }
        };
        let path = |p: &std::path::Path| q(&p.display().to_string());
        let mut identity_claims = String::new();
        if !c.identity.claims.is_empty() {
            identity_claims.push_str("[identity.claims]\n");
            for (claim, header) in &c.identity.claims {
                identity_claims.push_str(&format!("{claim} = {}\n", q(header.as_str())));
            }
        }
        let mut tokens = format!(
            "[tokens]\nalgorithm = {}\nkid = {}\nissuer = {}\naccess_ttl = {}\nrefresh_ttl = {}\n\
             leeway = {}\n{}",
            q(&format!("{:?}", t.algorithm)),
            q(&t.kid),
            q(&t.issuer),
            ms(t.access_ttl),
            ms(t.refresh_ttl),
            ms(t.leeway),
            secret(&t.secret, &t.secret_file),
        );
        if let Some(file) = &t.private_key_file {
            tokens.push_str(&format!("private_key_file = {}\n", path(file)));
        }
        if let Some(aud) = &t.audience {
            tokens.push_str(&format!("audience = {}\n", q(aud)));
        }
        for k in &t.previous_keys {
            tokens.push_str(&format!("[[tokens.previous_keys]]\nkid = {}\n", q(&k.kid)));
            if let Some(alg) = k.algorithm {
                tokens.push_str(&format!("algorithm = {}\n", q(&format!("{alg:?}"))));
            }
            match &k.public_key_file {
                Some(file) => tokens.push_str(&format!("public_key_file = {}\n", path(file))),
                None => tokens.push_str(&secret(&k.secret, &k.secret_file)),
            }
        }
        let store_url = match &c.store.url {
            StoreUrl::Memory => "memory://".to_owned(),
            StoreUrl::Redis(url) => url.clone(),
            // Each node carries its own credentials, so this reads back as the same nodes.
            StoreUrl::Cluster(nodes) => {
                let tls = c.store.url.is_tls();
                let hosts: Vec<&str> = nodes
                    .iter()
                    .map(|n| n.split_once("://").map_or(n.as_str(), |(_, rest)| rest))
                    .collect();
                let scheme = if tls { "rediss" } else { "redis" };
                format!("{scheme}+cluster://{}", hosts.join(","))
            }
        };
        let ca_file = match &c.store.ca_file {
            Some(file) => format!("ca_file = {}\n", path(file)),
            None => String::new(),
        };
        let mut out = format!(
            "[server]\nlisten = {}\ntrusted_proxies = {}\nheader_read_timeout = {}\n\
             shutdown_delay = {}\nshutdown_timeout = {}\nworkers = {}\nmax_connections = {}\nmax_header_bytes = {}\n\
             max_target_bytes = {}\nmax_auth_body_bytes = {}\nupgrade_recheck = {}\n\
             upgrade_protocols = {}\nbody_read_timeout = {}\nbody_idle_timeout = {}\n\
             h2_idle_timeout = {}\n\n[admin]\nlisten = {}\n\n\
             [store]\nurl = {}\nprefix = {}\ntimeout = {}\nconnect_timeout = {}\n{ca_file}\n\
             {tokens}\n\
             [identity]\nuser_header = {}\nprefix = {}\n{identity_claims}\n\
             [registration]\nenabled = {}\ndefault_roles = {}\n\n\
             [forward_auth]\nenabled = {}\npath = {}\n\n\
             [passwords]\nmemory_kib = {}\niterations = {}\nparallelism = {}\n\
             max_concurrent = {}\nqueue_timeout = {}\nmax_queue = {}\n\n\
             [throttle]\nuser_limit = {}\nuser_window = {}\naddress_limit = {}\n\
             address_window = {}\n",
            q(&s.listen.to_string()),
            list(s.trusted_proxies.iter().map(|n| n.to_string()).collect()),
            ms(s.header_read_timeout),
            ms(s.shutdown_delay),
            ms(s.shutdown_timeout),
            s.workers,
            s.max_connections,
            s.max_header_bytes,
            s.max_target_bytes,
            s.max_auth_body_bytes,
            ms(s.upgrade_recheck),
            list(s.upgrade_protocols.clone()),
            ms(s.body_read_timeout),
            ms(s.body_idle_timeout),
            ms(s.h2_idle_timeout),
            q(&c.admin.listen.to_string()),
            q(&store_url),
            q(&c.store.prefix),
            ms(c.store.timeout),
            ms(c.store.connect_timeout),
            q(c.identity.user_header.as_str()),
            q(&c.identity.prefix),
            c.registration.enabled,
            list(c.registration.default_roles.clone()),
            c.forward_auth.enabled,
            q(&c.forward_auth.path),
            p.memory_kib,
            p.iterations,
            p.parallelism,
            p.max_concurrent,
            ms(p.queue_timeout),
            p.max_queue,
            th.user_limit,
            ms(th.user_window),
            th.address_limit,
            ms(th.address_window),
        );
        if let Some(tls) = &s.tls {
            // After [throttle]'s keys: a new table, so nothing above is taken into it.
            out.push_str(&format!(
                "\n[server.tls]\ncert_file = {}\nkey_file = {}\n",
                path(&tls.cert_file),
                path(&tls.key_file),
            ));
        }
        for i in &c.issuers {
            let algs: Vec<String> = i.algorithms.iter().map(|a| format!("{a:?}")).collect();
            out.push_str(&format!(
                "\n[[issuers]]\nissuer = {}\njwks_url = {}\nalgorithms = {}\nuser_claim = {}\n\
                 cache_ttl = {}\nrefetch_interval = {}\n",
                q(&i.issuer),
                q(&i.jwks_url.0.to_string()),
                list(algs),
                q(&i.user_claim),
                ms(i.cache_ttl),
                ms(i.refetch_interval),
            ));
            if let Some(aud) = &i.audience {
                out.push_str(&format!("audience = {}\n", q(aud)));
            }
        }
        for r in &c.routes {
            out.push_str(&format!(
                "\n[[routes]]\npath = {}\nupstream = {}\nauth = {}\nroles = {}\nstrip_prefix = {}\n\
                 forward_token = {}\nconnect_timeout = {}\ntimeout = {}\n",
                q(&r.path),
                q(&r.upstream.to_string()),
                q(&format!("{:?}", r.auth).to_lowercase()),
                list(r.roles.clone()),
                r.strip_prefix,
                r.forward_token,
                ms(r.connect_timeout),
                ms(r.timeout),
            ));
            if let Some(file) = &r.ca_file {
                out.push_str(&format!("ca_file = {}\n", path(file)));
            }
        }
        out
    }
}

/// A test key under `tests/keys` (see its README).
pub fn key_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name)
}

/// Makes `tokens` sign with the PEM private key `name` (RS256, ES256 or EdDSA) under `kid`.
pub fn sign_with(tokens: &mut TokenConfig, alg: jsonwebtoken::Algorithm, name: &str, kid: &str) {
    let path = key_path(name);
    tokens.algorithm = alg;
    tokens.private_key = Secret::from(std::fs::read(&path).unwrap());
    tokens.private_key_file = Some(path);
    tokens.secret = Secret::default();
    tokens.secret_file = None;
    tokens.kid = kid.into();
}

/// A previous key that still verifies: the PEM public key `name` under `kid`.
pub fn previous_pem(alg: jsonwebtoken::Algorithm, name: &str, kid: &str) -> PreviousKey {
    let path = key_path(name);
    PreviousKey {
        kid: kid.into(),
        algorithm: Some(alg),
        public_key: std::fs::read(&path).unwrap(),
        public_key_file: Some(path),
        ..PreviousKey::default()
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

    /// `DELETE /logout` with `token`.
    pub async fn logout(&self, token: &str) -> reqwest::Response {
        (self
            .client
            .delete(self.url("/logout"))
            .bearer_auth(token)
            .send())
        .await
        .unwrap_or_else(|e| panic!("DELETE /logout: {e}"))
    }

    /// `POST /refresh` with the refresh token `token`.
    pub async fn refresh(&self, token: &str) -> reqwest::Response {
        (self
            .client
            .post(self.url("/refresh"))
            .bearer_auth(token)
            .send())
        .await
        .unwrap_or_else(|e| panic!("POST /refresh: {e}"))
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

/// Asserts the contract's answer for a revoked token: 401 `Token has been revoked`.
pub async fn assert_revoked(resp: reqwest::Response, what: &str) {
    let f = failure(resp).await;
    assert_eq!(
        (f.status, f.msg.as_str()),
        (401, "Token has been revoked"),
        "{what}"
    );
}

/// The id of the client with the `t` (tracking) flag in a `CLIENT LIST` reply: keycard's
/// revocation-cache connection.
pub fn tracking_client_id(list: &str) -> Option<String> {
    list.lines().find_map(|line| {
        let field = |name: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
        };
        field("flags")?
            .contains('t')
            .then(|| field("id").map(str::to_owned))?
    })
}
