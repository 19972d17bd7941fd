//! Regression tests for the outside security review (issue 6), one section per finding. Each
//! test sends what the reviewer sent, over real sockets, against a real redis-server and a
//! real upstream, and fails if the protection it checks is removed.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

// ============================================================================================
// An upstream that really upgrades
// ============================================================================================

/// One request as the upgrade upstream saw it, over HTTP/1.1 or (after an h2c upgrade) HTTP/2.
#[derive(Debug, Clone)]
struct Seen {
    version: &'static str,
    path: String,
    headers: Vec<(String, String)>,
}

/// How [`UpgradeUpstream`] answers an HTTP/1.1 request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// 101 to whatever protocol the request asks for (then HTTP/2 for `h2c`, an echo for any
    /// other); 200 `plain` to a request without `Upgrade`.
    Honest,
    /// 101 `Upgrade: h2c` to every request, asked or not.
    AlwaysH2c,
}

/// A back end that accepts upgrades the way Hypercorn does: `Upgrade: h2c` gets a 101 and the
/// connection then speaks HTTP/2 (served by hyper's HTTP/2 server, recording every request);
/// any other protocol gets a 101 and a byte echo. It ignores `HTTP2-Settings` entirely, as
/// Hypercorn does.
struct UpgradeUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl UpgradeUpstream {
    async fn start(mode: Mode) -> UpgradeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let recorded = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_upgrades(stream, mode, recorded.clone()));
            }
        });
        UpgradeUpstream { addr, seen, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for UpgradeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP/1.1 head byte by byte (so nothing after it is consumed).
async fn read_head<R: AsyncRead + Unpin>(stream: &mut R) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 || head.len() > 64 * 1024 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
}

/// (status, lowercased header pairs) of a response head.
fn parse_response_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    response.parse(head).expect("response head parses");
    (
        response.code.unwrap_or(0),
        lowercase_pairs(response.headers),
    )
}

/// Parsed header fields as (lowercase name, value) pairs.
fn lowercase_pairs(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

async fn serve_upgrades(mut stream: TcpStream, mode: Mode, seen: Arc<Mutex<Vec<Seen>>>) {
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    if request.parse(&head).is_err() {
        return;
    }
    let pairs = lowercase_pairs(request.headers);
    let path = request.path.unwrap_or("").to_owned();
    let upgrade = pairs.iter().find(|(n, _)| n == "upgrade").map(|(_, v)| {
        v.split(',')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    });
    seen.lock().unwrap().push(Seen {
        version: "HTTP/1.1",
        path,
        headers: pairs,
    });
    let protocol = match (mode, upgrade) {
        (Mode::AlwaysH2c, _) => "h2c".to_owned(),
        (Mode::Honest, Some(p)) => p,
        (Mode::Honest, None) => {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nplain",
                )
                .await;
            return;
        }
    };
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
    );
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    if protocol == "h2c" {
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(Seen {
                        version: "HTTP/2",
                        path: req.uri().path().to_owned(),
                        headers: req
                            .headers()
                            .iter()
                            .map(|(n, v)| {
                                (
                                    n.as_str().to_owned(),
                                    String::from_utf8_lossy(v.as_bytes()).into(),
                                )
                            })
                            .collect(),
                    });
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        "secret admin page",
                    ))))
                }
            });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    } else {
        let (mut read, mut write) = stream.into_split();
        let _ = tokio::io::copy(&mut read, &mut write).await;
    }
}

/// The reviewer's h2c request line and headers for `path`, with the `Connection` value given.
fn h2c_upgrade(path: &str, connection: &str, extra: &[&str]) -> Vec<u8> {
    let mut lines = vec![
        "Upgrade: h2c".to_owned(),
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA".to_owned(),
        format!("Connection: {connection}"),
    ];
    lines.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    raw_get(path, &refs)
}

/// After an upgrade answer, speaks HTTP/2 on `stream` and asks for `/admin/secret` posing as
/// `admin`. Ok(status) when something answered over HTTP/2; Err when HTTP/2 never got going.
async fn h2_admin_request(stream: TcpStream) -> Result<u16, String> {
    let attempt = async move {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let request = hyper::Request::builder()
            .uri("http://127.0.0.1/admin/secret")
            .header("x-auth-user", "admin")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        Ok(response.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// Sends an upgrade request for `protocol` to `path` on `addr` and reads the response head,
/// leaving the stream right after it: (status, stream).
async fn upgrade(addr: SocketAddr, path: &str, protocol: &str) -> (u16, TcpStream) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let upgrade = format!("Upgrade: {protocol}");
    stream
        .write_all(&raw_get(path, &["Connection: Upgrade", &upgrade]))
        .await
        .unwrap();
    let head = read_head(&mut stream).await.expect("a response head");
    (parse_response_head(&head).0, stream)
}

/// A stack whose routes all go to `upstream`: `/pub2` public, `/api` required.
async fn upgrade_stack(
    upstream: &str,
    adjust: impl FnOnce(&mut GatewayOpts),
) -> (RedisServer, Gateway) {
    let redis = RedisServer::new();
    let mut opts = GatewayOpts::new(&redis.url(), upstream);
    opts.routes = vec![
        route("/pub2", upstream, "public"),
        route("/api", upstream, "required"),
    ];
    adjust(&mut opts);
    let gw = Gateway::start(opts).await;
    (redis, gw)
}

// ============================================================================================
// Finding 1: h2c is never tunnelled; only allow-listed upgrades are
// ============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_upstream_really_accepts_h2c_upgrades() {
    // The control: straight to the back end, the reviewer's exchange reaches /admin/secret
    // with a forged identity. Without this, the tests below could pass against a back end
    // that never upgrades.
    let upstream = UpgradeUpstream::start(Mode::Honest).await;
    let mut stream = TcpStream::connect(upstream.addr).await.unwrap();
    stream
        .write_all(&h2c_upgrade("/pub2", "Upgrade", &[]))
        .await
        .unwrap();
    let head = read_head(&mut stream).await.expect("a response head");
    assert_eq!(parse_response_head(&head).0, 101);
    assert_eq!(h2_admin_request(stream).await, Ok(200));
    let seen = upstream.seen();
    assert!(
        seen.iter()
            .any(|s| s.version == "HTTP/2" && s.path == "/admin/secret"),
        "{seen:?}"
    );
}

/// Sends the reviewer's h2c exchange to `path` on the gateway and checks it went nowhere.
async fn assert_h2c_is_not_tunnelled(
    gw: &Gateway,
    upstream: &UpgradeUpstream,
    path: &str,
    extra: &[&str],
) {
    for connection in ["Upgrade", "Upgrade, HTTP2-Settings"] {
        let before = upstream.seen().len();
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream
            .write_all(&h2c_upgrade(path, connection, extra))
            .await
            .unwrap();
        let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream))
            .await
            .expect("an answer within 5 s")
            .expect("a response head");
        let (status, headers) = parse_response_head(&head);
        assert_ne!(status, 101, "h2c must never be switched to ({connection})");
        assert_eq!(status, 200, "served as plain HTTP/1.1");
        assert!(!headers.iter().any(|(n, _)| n == "upgrade"), "{headers:?}");
        // Skip the plain body, then try to talk HTTP/2 on the same connection anyway.
        let mut body = [0u8; 5];
        stream.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"plain");
        assert!(
            h2_admin_request(stream).await.is_err(),
            "HTTP/2 after a plain answer"
        );

        let seen = upstream.seen();
        let new = &seen[before..];
        assert_eq!(new.len(), 1, "exactly the one plain request: {new:?}");
        assert_eq!(new[0].version, "HTTP/1.1");
        for name in ["upgrade", "http2-settings"] {
            assert!(
                !new[0].headers.iter().any(|(n, _)| n == name),
                "{name} forwarded ({connection}): {:?}",
                new[0].headers
            );
        }
        assert!(!seen.iter().any(|s| s.path.contains("admin")), "{seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_on_a_public_route_is_served_as_plain_http1_and_never_tunnelled() {
    let upstream = UpgradeUpstream::start(Mode::Honest).await;
    let (_redis, gw) = upgrade_stack(&upstream.url(), |_| {}).await;
    assert_h2c_is_not_tunnelled(&gw, &upstream, "/pub2", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_with_a_valid_token_on_a_required_route_is_never_tunnelled() {
    let upstream = UpgradeUpstream::start(Mode::Honest).await;
    let (_redis, gw) = upgrade_stack(&upstream.url(), |_| {}).await;
    let (token, _) = gw.user("mallory").await;
    let auth = format!("Authorization: Bearer {token}");
    assert_h2c_is_not_tunnelled(&gw, &upstream, "/api/x", &[&auth]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_listed_upgrades_still_tunnel_and_others_are_dropped() {
    let upstream = UpgradeUpstream::start(Mode::Honest).await;
    let (_redis, gw) = upgrade_stack(&upstream.url(), |o| {
        o.server.upgrade_protocols = vec!["websocket".into(), "x-custom".into()];
    })
    .await;
    for protocol in ["websocket", "X-Custom"] {
        let (status, mut stream) = upgrade(gw.addr, "/pub2/t", protocol).await;
        assert_eq!(status, 101, "{protocol}");
        stream.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(3), stream.read_exact(&mut echoed))
            .await
            .expect("echo within 3 s")
            .unwrap();
        assert_eq!(&echoed, b"ping");
    }
    // A protocol not on the list: the Upgrade is dropped, the request served plainly.
    let response = raw_request(
        gw.addr,
        &raw_get("/pub2/t", &["Connection: Upgrade", "Upgrade: irc/6.9"]),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(response.body_text(), "plain");
    // Offered alongside an allowed one, only the allowed one is forwarded.
    let before = upstream.seen().len();
    let (status, _stream) = upgrade(gw.addr, "/pub2/t", "h2c, websocket").await;
    assert_eq!(status, 101);
    let seen = upstream.seen();
    let upgrade: Vec<&String> = seen[before]
        .headers
        .iter()
        .filter(|(n, _)| n == "upgrade")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(upgrade, ["websocket"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_101_to_a_protocol_the_client_did_not_ask_for_is_502() {
    let upstream = UpgradeUpstream::start(Mode::AlwaysH2c).await;
    let (_redis, gw) = upgrade_stack(&upstream.url(), |_| {}).await;
    // Asked for websocket, offered h2c: no tunnel.
    let response = raw_request(
        gw.addr,
        &raw_get("/pub2/ws", &["Connection: Upgrade", "Upgrade: websocket"]),
    )
    .await;
    assert_eq!(response.status, 502, "{}", response.head);
    // Asked for nothing (h2c was dropped), offered h2c: no tunnel.
    let response = raw_request(gw.addr, &h2c_upgrade("/pub2/x", "Upgrade", &[])).await;
    assert_eq!(response.status, 502, "{}", response.head);
    assert!(!upstream.seen().iter().any(|s| s.version == "HTTP/2"));
}

/// GET /public/x with `extra` header lines over a raw socket: the response and what the echo
/// upstream received.
async fn raw_echo(gw: &Gateway, extra: &[&str]) -> (RawResponse, Echo) {
    let r = raw_request(gw.addr, &raw_get("/public/x", extra)).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    (r, echo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_settings_is_removed_from_every_forwarded_request() {
    let s = Stack::start().await;
    let (_, echo) = raw_echo(&s.gw, &["HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"]).await;
    assert!(!echo.has("http2-settings"), "{:?}", echo.headers);
}

// ============================================================================================
// Finding 2: slow bodies and idle HTTP/2 connections are cut off
// ============================================================================================

/// Writes `request`, then reads one response (bounded) and whether the connection closed.
async fn send_and_wait(
    addr: SocketAddr,
    request: &[u8],
    limit: Duration,
) -> (RawResponse, bool, Duration) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = read_response(stream, limit).await;
    let took = started.elapsed();
    let closed = response.closed_within(Duration::from_secs(2)).await;
    (response, closed, took)
}

fn timeouts(o: &mut GatewayOpts) {
    o.server.body_read_timeout = Duration::from_secs(1);
    o.server.body_idle_timeout = Duration::from_secs(1);
    o.server.h2_idle_timeout = Duration::from_secs(1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_body_shorter_than_its_content_length_gets_408_and_close() {
    let s = Stack::start_with(timeouts).await;
    let request = b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{";
    let (response, closed, took) = send_and_wait(s.gw.addr, request, Duration::from_secs(5)).await;
    assert_eq!(response.status, 408, "{}", response.head);
    assert_eq!(
        response.msg().as_deref(),
        Some("Request body not received in time")
    );
    assert!(closed, "connection must close after a 408");
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_register_that_stops_mid_chunk_gets_408_and_close() {
    let s = Stack::start_with(timeouts).await;
    let request = b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n{\"username\":";
    let (response, closed, _) = send_and_wait(s.gw.addr, request, Duration::from_secs(5)).await;
    assert_eq!(response.status, 408, "{}", response.head);
    assert!(closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_body_that_stalls_is_cut_with_408_but_a_slow_steady_one_passes() {
    let s = Stack::start_with(timeouts).await;
    let request =
        b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789";
    let (response, closed, took) = send_and_wait(s.gw.addr, request, Duration::from_secs(6)).await;
    assert_eq!(response.status, 408, "{}", response.head);
    assert!(closed);
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // 12 bytes, one every 300 ms (3.6 s in all, each gap under the 1 s idle limit): it is
    // the lack of progress that is cut, not a slow upload.
    let mut stream = TcpStream::connect(s.gw.addr).await.unwrap();
    stream
        .write_all(b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n")
        .await
        .unwrap();
    for byte in b"steady-bytes" {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.write_all(&[*byte]).await.unwrap();
    }
    let response = read_response(stream, Duration::from_secs(5)).await;
    assert_eq!(response.status, 200, "{}", response.head);
    let echo = Echo::parse(&serde_json::from_slice(&response.body).unwrap());
    assert_eq!(echo.body, "steady-bytes");
}

/// An HTTP/2 client connection (prior knowledge) to the gateway.
async fn h2_connect(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<
        http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>,
    >,
    JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    (sender, tokio::spawn(conn))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connection_gets_goaway_after_h2_idle_timeout() {
    let s = Stack::start_with(timeouts).await;
    let (mut sender, conn) = h2_connect(s.gw.addr).await;
    // One request, then nothing: the idle clock starts when its stream ends.
    let request = hyper::Request::builder()
        .uri(format!("http://{}/public/x", s.gw.addr))
        .body(http_body_util::Empty::new().boxed())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "idle HTTP/2 connection still open after 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "closed too early"
    );

    // A connection that never opens a stream (preface + SETTINGS only) is closed too.
    let mut raw = TcpStream::connect(s.gw.addr).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (bytes, closed) = read_to_close(&mut raw, Duration::from_secs(5)).await;
    assert!(closed, "preface-only connection still open after 5 s");
    // A GOAWAY frame (type 7) was sent before the close.
    let mut frames = &bytes[..];
    let mut kinds = Vec::new();
    while frames.len() >= 9 {
        let len = u32::from_be_bytes([0, frames[0], frames[1], frames[2]]) as usize;
        kinds.push(frames[3]);
        frames = &frames[(9 + len).min(frames.len())..];
    }
    assert!(kinds.contains(&7), "no GOAWAY among frame types {kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_login_headers_without_data_get_408() {
    let s = Stack::start_with(timeouts).await;
    let (mut sender, _conn) = h2_connect(s.gw.addr).await;
    let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
    let body = StreamBody::new(tokio_stream_from(rx)).boxed();
    let request = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{}/login", s.gw.addr))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("answer within 5 s")
        .unwrap();
    assert_eq!(response.status(), 408);
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// An mpsc receiver as a `Stream`, without a tokio-stream dependency.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_filling_max_connections_only_lock_clients_out_until_body_read_timeout() {
    // The review's lock-out: every slot taken by a login whose body never completes.
    let s = Stack::start_with(|o| {
        timeouts(o);
        o.server.max_connections = 4;
    })
    .await;
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(s.gw.addr).await.unwrap();
        stream
            .write_all(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            .await
            .unwrap();
        slow.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(6), s.gw.get("/public/x", None))
        .await
        .expect("a legitimate client is served once the slow bodies are cut");
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "slots were not all taken"
    );
}

// ============================================================================================
// Finding 3: tunnels count against max_connections and are drained at shutdown
// ============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_keep_their_connection_slot_until_they_close() {
    let upstream = UpgradeUpstream::start(Mode::Honest).await;
    let (_redis, gw) = upgrade_stack(&upstream.url(), |o| {
        o.server.max_connections = 3;
    })
    .await;
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let (status, stream) = upgrade(gw.addr, "/pub2/ws", "websocket").await;
        assert_eq!(status, 101);
        tunnels.push(stream);
    }
    // All three slots are held by tunnels: a fourth client waits.
    let waiting = tokio::spawn({
        let addr = gw.addr;
        async move { raw_request(addr, &raw_get("/pub2/plain", &[])).await.status }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !waiting.is_finished(),
        "a fourth connection was served while 3 tunnels held every slot"
    );
    // One tunnel closes: its slot goes to the waiting client.
    drop(tunnels.pop());
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a tunnel closed")
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_open_tunnels_and_waits_for_them() {
    let upstream = UpgradeUpstream::start(Mode::Honest).await;
    let (_redis, mut gw) = upgrade_stack(&upstream.url(), |_| {}).await;
    let (status, mut stream) = upgrade(gw.addr, "/pub2/ws", "websocket").await;
    assert_eq!(status, 101);
    gw.begin_shutdown();
    let (_, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "tunnel left open at shutdown");
    gw.wait_stopped(Duration::from_secs(5)).await.unwrap();
}

// ============================================================================================
// Finding 5: header hygiene
// ============================================================================================

const CLIENT_DESCRIBING: [&str; 38] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-forwarded-uri",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-envoy-original-path",
    "x-original-host",
    "x-host",
    // Named by the second review.
    "client-ip",
    "x-forwarded",
    "forwarded-for",
    "x-scheme",
    "x-forwarded-client-cert",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-remote-user",
    "remote-user",
    "x-original-forwarded-for",
    "x-envoy-external-address",
    "x-goog-authenticated-user-email",
    // Other spellings CGI-style back ends read as the same variables.
    "x_original_url",
    "X.Rewrite.URL",
    "x_forwarded_for",
    "x_real_ip",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_describing_headers_from_untrusted_peers_never_reach_the_upstream() {
    let s = Stack::start().await;
    let mut request = s.gw.client.get(s.gw.url("/public/x"));
    for name in CLIENT_DESCRIBING {
        request = request.header(name, "/admin/secret");
    }
    let echo = Echo::from_response(request.send().await.unwrap()).await;
    for name in CLIENT_DESCRIBING {
        let name = name.to_ascii_lowercase();
        let name = name.as_str();
        assert!(
            !echo.values(name).contains(&"/admin/secret"),
            "{name} passed through: {:?}",
            echo.headers
        );
    }
    // Only the gateway's own forwarding headers are there.
    assert_eq!(echo.values("x-forwarded-for"), ["127.0.0.1"]);
    let own = ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"];
    // Nor do the other spellings of framing headers and the request id.
    let r = raw_request(
        s.gw.addr,
        b"POST /public/x HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\nContent_Length: 99\r\nKeep_Alive: 1\r\nX_Request_Id: forged\r\nHTTP2_Settings: AAAA\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let framing = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    for name in [
        "transfer_encoding",
        "content_length",
        "keep_alive",
        "x_request_id",
        "http2_settings",
    ] {
        assert!(!framing.has(name), "{name}: {:?}", framing.headers);
    }
    assert_eq!(framing.body, "hello");
    for name in CLIENT_DESCRIBING {
        let name = name.to_ascii_lowercase();
        assert!(own.contains(&name.as_str()) || !echo.has(&name), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_may_set_client_describing_headers() {
    let s = Stack::start_with(|o| o.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()])
        .await;
    let echo = Echo::from_response(
        s.gw.client
            .get(s.gw.url("/public/x"))
            .header("x-real-ip", "198.51.100.9")
            .header("x-forwarded-prefix", "/app")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(echo.values("x-real-ip"), ["198.51.100.9"]);
    assert_eq!(echo.values("x-forwarded-prefix"), ["/app"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_request_id_is_kept_and_any_other_replaced() {
    let s = Stack::start().await;
    let (r, echo) = raw_echo(&s.gw, &["X-Request-Id: trace-7f.A_1"]).await;
    assert_eq!(echo.values("x-request-id"), ["trace-7f.A_1"]);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("x-request-id: trace-7f.a_1")
    );
    for bad in ["x-request-id: has space", "X-Request-Id: a/b"] {
        let (r, echo) = raw_echo(&s.gw, &[bad]).await;
        let sent = echo.values("x-request-id");
        assert_eq!(sent.len(), 1, "{bad}: {:?}", echo.headers);
        assert!(
            sent[0].len() == 20 && sent[0].bytes().all(|b| b.is_ascii_hexdigit()),
            "{bad}: {sent:?}"
        );
        assert!(r.head.contains(sent[0]), "{bad}: returned on the response");
    }
    let long = format!("X-Request-Id: {}", "a".repeat(129));
    let (_, echo) = raw_echo(&s.gw, &[long.as_str()]).await;
    assert_ne!(echo.values("x-request-id"), ["a".repeat(129)]);
    let (_, echo) = raw_echo(&s.gw, &["X-Request-Id: one", "X-Request-Id: two"]).await;
    let sent = echo.values("x-request-id");
    assert_eq!(sent.len(), 1);
    assert!(sent[0] != "one" && sent[0] != "two", "{sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_remove_the_request_id() {
    let s = Stack::start().await;
    let (r, echo) = raw_echo(&s.gw, &["Connection: keep-alive, X-Request-Id"]).await;
    let sent = echo.values("x-request-id");
    assert_eq!(sent.len(), 1, "{:?}", echo.headers);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains(&format!("x-request-id: {}", sent[0]))
    );
}

// ============================================================================================
// Finding 7: a signed token whose sub cannot be a header value is 401
// ============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_subjects_in_correctly_signed_tokens_are_401_invalid_token() {
    let s = Stack::start().await;
    for sub in [
        "ALICE",
        "alice\r\nx-auth-user: admin",
        "alice\n",
        "al\0ice",
        &"a".repeat(65),
        "a b",
        "",
    ] {
        let token = mint_valid(&claims(sub, "access"));
        let f = failure(s.gw.get("/api/x", Some(&token)).await).await;
        assert_invalid_token(&f, &format!("sub {sub:?}"));
    }
    assert_eq!(s.upstream.hits(), 0);
}

// ============================================================================================
// Finding 8: a client's broken body is the client's fault
// ============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_body_on_a_proxied_route_is_400_and_close_not_502() {
    let s = Stack::start().await;
    for body in [
        // A chunk-size line that is not hex.
        "zz\r\nhello\r\n0\r\n\r\n",
        // A chunk longer than its size says.
        "2\r\nhello\r\n0\r\n\r\n",
    ] {
        let request = format!(
            "POST /public/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let (response, closed, _) =
            send_and_wait(s.gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert!(
            response.status == 400 || response.status == 0,
            "{body:?}: {} {}",
            response.head,
            response.body_text()
        );
        assert!(closed, "{body:?}: connection left open");
    }
    let text = s.gw.metrics().await;
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("keycard_http_requests_total")
                && l.contains("status_class=\"5xx\"")),
        "counted as upstream failure:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_mid_body_is_not_counted_as_an_upstream_failure() {
    let s = Stack::start().await;
    for _ in 0..3 {
        let mut stream = TcpStream::connect(s.gw.addr).await.unwrap();
        stream
            .write_all(
                b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nhalf",
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // RST instead of FIN.
        stream.set_zero_linger().unwrap();
        drop(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = s.gw.metrics().await;
    let requests = |class: &str| {
        text.lines()
            .filter(|l| l.starts_with("keycard_http_requests_total{"))
            .filter(|l| l.contains("route=\"/public\"") && l.contains(class))
            .count()
    };
    assert_eq!(requests("status_class=\"5xx\""), 0, "{text}");
    assert!(
        requests("status_class=\"4xx\"") > 0,
        "a client error is counted for the route:\n{text}"
    );
    // And the gateway keeps serving.
    assert_eq!(s.gw.get("/public/x", None).await.status(), 200);
}

// ============================================================================================
// Second review: a login cancelled mid-check still counts, and is still logged
// ============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_whose_clients_hang_up_mid_check_are_still_counted_and_logged() {
    // A wrong-password login, the connection reset right after sending: had the attempt been
    // given back unjudged, one address could keep argon2 busy forever without being throttled.
    let s = Stack::start_with(|o| {
        o.passwords = PasswordConfig {
            memory_kib: 8192,
            iterations: 8,
            ..Default::default()
        };
        o.throttle.address_limit = 5;
        o.throttle.user_limit = 0;
    })
    .await;
    for i in 0..5 {
        let body = format!(r#"{{"username":"ghost{i}","password":"wrong password!"}}"#);
        let request = format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut stream = TcpStream::connect(s.gw.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        // Hang up only once keycard has the request and has begun the check (an RST that
        // arrives first discards the request unread, and then nothing is owed).
        let begun = Instant::now() + Duration::from_secs(10);
        loop {
            let (pending, failed): (Option<u64>, Option<u64>) = s
                .redis
                .query(
                    redis::cmd("MGET")
                        .arg("keycard:throttle:pending:addr:127.0.0.1")
                        .arg("keycard:throttle:addr:127.0.0.1"),
                )
                .await;
            if pending.unwrap_or(0) + failed.unwrap_or(0) > i {
                break;
            }
            assert!(Instant::now() < begun, "attempt {i} never began");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stream.set_zero_linger().unwrap();
        drop(stream);
    }
    // Each check finishes on its own and counts as the failure it is.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let count: Option<String> = s
            .redis
            .query(redis::cmd("GET").arg("keycard:throttle:addr:127.0.0.1"))
            .await;
        if count.as_deref() == Some("5") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "abandoned attempts counted: {count:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And no reservation is left behind.
    let gone = Instant::now() + Duration::from_secs(5);
    loop {
        let left: bool = s
            .redis
            .query(redis::cmd("EXISTS").arg("keycard:throttle:pending:addr:127.0.0.1"))
            .await;
        if !left {
            break;
        }
        assert!(Instant::now() < gone, "a reservation was left behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = s.gw.login_raw("ghost9", "wrong password!").await;
    assert_eq!(resp.status(), 429);
    // Every cancelled request still got its access-log line and metric (as 499, a 4xx): five
    // of them, and the 429.
    let text = s.gw.metrics().await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("keycard_http_requests_total{")
                && l.contains("route=\"login\"")
                && l.contains("status_class=\"4xx\"")
                && l.ends_with(" 6")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_an_absurd_exp_can_still_be_revoked() {
    // Only mintable with the key, but then it must not be beyond revocation: its entry's TTL
    // is bounded instead of being an expiry Redis refuses (which answered 503 and left the
    // token valid).
    let s = Stack::start().await;
    let mut c = claims("alice", "access");
    c["exp"] = serde_json::json!(10_000_000_000_000_000u64);
    let token = mint_valid(&c);
    assert_eq!(s.gw.get("/api/x", Some(&token)).await.status(), 200);
    let logout =
        s.gw.client
            .delete(s.gw.url("/logout"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
    assert_eq!(logout.status(), 200);
    let f = failure(s.gw.get("/api/x", Some(&token)).await).await;
    assert_eq!((f.status, f.msg.as_str()), (401, "Token has been revoked"));
}

// ============================================================================================
// Second review: Host, cookies and transfer codings as the RFCs have them
// ============================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_host_must_be_present_and_valid_and_absolute_form_wins() {
    let s = Stack::start().await;
    let r = raw_request(s.gw.addr, b"GET /public/x HTTP/1.1\r\nAccept: */*\r\n\r\n").await;
    assert_eq!(
        (r.status, r.msg().as_deref()),
        (400, Some("Missing Host header"))
    );
    for bad in [
        "GET /public/x HTTP/1.1\r\nHost: a b\r\n\r\n",
        "GET /public/x HTTP/1.1\r\nHost: user@evil.example\r\n\r\n",
        "GET /public/x HTTP/1.1\r\nHost: example.com:abc\r\n\r\n",
        "GET http://good.example@evil.example/public/x HTTP/1.1\r\nHost: good.example\r\n\r\n",
        "GET http://user:pw@abs.example/public/x HTTP/1.1\r\nHost: abs.example\r\n\r\n",
    ] {
        let r = raw_request(s.gw.addr, bad.as_bytes()).await;
        assert_eq!(
            (r.status, r.msg().as_deref()),
            (400, Some("Invalid Host header")),
            "{bad:?}"
        );
    }
    // HTTP/1.0 needs no Host.
    let r = raw_request(s.gw.addr, b"GET /public/x HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status, 200, "{}", r.head);
    // An absolute-form target's authority replaces Host (RFC 9112 §3.2.2).
    let r = raw_request(
        s.gw.addr,
        b"GET http://named.example/public/x HTTP/1.1\r\nHost: other.example\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    assert_eq!(echo.values("host"), ["named.example"]);
    assert_eq!(echo.values("x-forwarded-host"), ["named.example"]);
    assert_eq!(s.upstream.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_host_must_match_authority_and_cookies_are_joined() {
    let s = Stack::start().await;
    let (mut sender, _conn) = h2_connect(s.gw.addr).await;
    let request = hyper::Request::builder()
        .uri(format!("http://{}/public/x", s.gw.addr))
        .header("host", "evil.example")
        .body(http_body_util::Empty::new().boxed())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 400);

    let request = hyper::Request::builder()
        .uri(format!("http://{}/public/x", s.gw.addr))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(http_body_util::Empty::new().boxed())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let echo = Echo::parse(&serde_json::from_slice(&body).unwrap());
    assert_eq!(echo.values("cookie"), ["a=1; b=2"]);
    assert_eq!(s.upstream.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_chunked_are_501_and_never_forwarded() {
    let s = Stack::start().await;
    for coding in [
        "gzip, chunked",
        "deflate,chunked",
        "x-custom, chunked",
        "chunked, chunked",
    ] {
        let request = format!(
            "POST /public/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {coding}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let r = raw_request(s.gw.addr, request.as_bytes()).await;
        assert_eq!(r.status, 501, "{coding}: {}", r.head);
    }
    assert_eq!(s.upstream.hits(), 0);
    // Plain chunked still works.
    let r = raw_request(
        s.gw.addr,
        b"POST /public/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_is_forwarded_whatever_the_method() {
    // hyper's client sends no body for a GET or HEAD of unknown length unless told to: the
    // body must be forwarded (re-framed as chunked), never silently dropped.
    let s = Stack::start().await;
    for method in ["GET", "DELETE", "POST"] {
        let request = format!(
            "{method} /public/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let r = raw_request(s.gw.addr, request.as_bytes()).await;
        assert_eq!(r.status, 200, "{method}: {}", r.head);
        let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
        assert_eq!(echo.body, "hello", "{method}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_are_rechecked_against_the_reloaded_policy() {
    // A reload that rotates the key, or makes a public route require a token, closes the
    // tunnels it would no longer let in; one that changes nothing for them keeps them.
    let upstream = UpgradeUpstream::start(Mode::Honest).await;
    let redis = RedisServer::new();
    let mut opts = GatewayOpts::new(&redis.url(), &upstream.url());
    opts.routes = vec![
        route("/pub2", &upstream.url(), "public"),
        route("/api", &upstream.url(), "required"),
    ];
    opts.server.upgrade_recheck = Duration::from_millis(500);
    let (gw, file) = Gateway::start_reloadable(opts.clone()).await;
    let (token, _) = gw.user("tess").await;

    let open = |path: &'static str, token: Option<String>| {
        let addr = gw.addr;
        async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let auth = token.map(|t| format!("Authorization: Bearer {t}"));
            let mut extra = vec!["Connection: Upgrade", "Upgrade: websocket"];
            extra.extend(auth.as_deref());
            stream.write_all(&raw_get(path, &extra)).await.unwrap();
            let head = read_head(&mut stream).await.expect("head");
            assert_eq!(parse_response_head(&head).0, 101, "{path}");
            stream
        }
    };
    async fn echoes(stream: &mut TcpStream) -> bool {
        if stream.write_all(b"ping").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut buf)).await,
            Ok(Ok(_))
        )
    }
    let mut public = open("/pub2/ws", None).await;
    let mut private = open("/api/ws", Some(token.clone())).await;

    // An unrelated change: both stay open across several rechecks.
    opts.routes.push(route("/extra", &upstream.url(), "public"));
    file.write(&opts.to_toml());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        echoes(&mut public).await,
        "public tunnel closed by an unrelated reload"
    );
    assert!(
        echoes(&mut private).await,
        "private tunnel closed by an unrelated reload"
    );

    // A new key, and the public route now requires a token.
    opts.routes[0] = route("/pub2", &upstream.url(), "required");
    let rotated = opts.to_toml().replace(
        "secret = \"${KEYCARD_SECRET}\"",
        "secret = \"a-brand-new-secret-0123456789-abcdefghijkl\"",
    );
    file.write(&rotated);
    for (name, stream) in [("public", &mut public), ("private", &mut private)] {
        let (_, closed) = read_to_close(stream, Duration::from_secs(5)).await;
        assert!(closed, "{name} tunnel still open after the reload");
    }
    // And new requests follow the new policy too.
    assert_eq!(gw.get("/api/x", Some(&token)).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_open_tunnels_whatever_the_old_recheck_interval() {
    // Found by the issue 7 review: a tunnel opened under `upgrade_recheck = "1h"` slept the
    // whole hour, so a reload that made its route require a token (and shortened the
    // interval) did not reach it.
    let upstream = UpgradeUpstream::start(Mode::Honest).await;
    let redis = RedisServer::new();
    let mut opts = GatewayOpts::new(&redis.url(), &upstream.url());
    opts.routes = vec![route("/pub2", &upstream.url(), "public")];
    opts.server.upgrade_recheck = Duration::from_secs(3600);
    let (gw, file) = Gateway::start_reloadable(opts.clone()).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let upgrade = raw_get("/pub2/ws", &["Connection: Upgrade", "Upgrade: websocket"]);
    stream.write_all(&upgrade).await.unwrap();
    let head = read_head(&mut stream).await.expect("head");
    assert_eq!(parse_response_head(&head).0, 101);

    opts.routes = vec![route("/pub2", &upstream.url(), "required")];
    opts.server.upgrade_recheck = Duration::from_secs(1);
    file.write(&opts.to_toml());
    let (_, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(
        closed,
        "anonymous tunnel still open after its route began requiring a token"
    );
}
