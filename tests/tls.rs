//! TLS: the public listener with `[server.tls]` (HTTP/1.1 and HTTP/2 by ALPN, the scheme told
//! upstream, what a non-TLS or stalling client gets, certificates swapped by reload), https://
//! upstreams (a route's `ca_file`, and the failures that must be 502), and the config errors.
//! Every certificate is made here, by a CA made here.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use keycard::config::TlsConfig;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A certificate authority made for one test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// A leaf for `names` (IP addresses or DNS names), its CN `cn`.
    fn leaf(&self, names: &[&str], cn: &str) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    fn reqwest_root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap()
    }

    fn rustls_roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        let der = CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap();
        roots.add(der).unwrap();
        roots
    }
}

/// A leaf certificate and its key, in PEM, and the certificate in DER to compare with what a
/// server presents.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

/// A folder of PEM files, removed on drop.
struct Files(PathBuf);

impl Files {
    fn new() -> Files {
        let dir = std::env::temp_dir().join(format!("keycard-tls-{}", random_jti()));
        std::fs::create_dir_all(&dir).unwrap();
        Files(dir)
    }

    /// Writes `text` to `name` the safe way (a new file renamed over the old one).
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        let tmp = self.0.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// `cert.pem` and `key.pem` of `leaf`.
    fn leaf(&self, leaf: &Leaf) -> (PathBuf, PathBuf) {
        (
            self.write("cert.pem", &leaf.cert_pem),
            self.write("key.pem", &leaf.key_pem),
        )
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Clients and servers
// ---------------------------------------------------------------------------------------------

/// An https client trusting `ca` alone.
fn https_client(ca: &Ca, http1_only: bool) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca.reqwest_root())
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(CLIENT_TIMEOUT);
    if http1_only {
        builder = builder.http1_only();
    }
    builder.build().unwrap()
}

/// A TLS handshake with `addr` offering `alpn`, trusting `ca`: the connection, bounded.
async fn tls_connect(
    addr: SocketAddr,
    ca: &Ca,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(ca.rustls_roots())
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// Sends `GET path` over an open TLS connection (`Connection: close`) and asserts the answer
/// is an HTTP/1.1 200.
async fn assert_get_200(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, path: &str) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{path}: {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// The leaf certificate `addr` presents to a new connection.
async fn served_cert(addr: SocketAddr, ca: &Ca) -> CertificateDer<'static> {
    let tls = tls_connect(addr, ca, &[]).await.expect("TLS handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// Reads until the peer closes, at most `limit`: what it sent, and how long that took.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("connection still open after {limit:?}; got {got:?}"),
        }
    }
}

/// An HTTPS upstream presenting `leaf`: answers every request 200 with
/// `{"path", "proto"}` (its `X-Forwarded-Proto`) and counts the requests it got.
struct TlsUpstream {
    addr: SocketAddr,
    hits: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsUpstream {
    async fn start(leaf: &Leaf) -> TlsUpstream {
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())
            .expect("leaf key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der.clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let proto = req
                            .headers()
                            .get("x-forwarded-proto")
                            .map(|v| v.to_str().unwrap_or("?").to_owned());
                        let body = json!({ "path": req.uri().path(), "proto": proto }).to_string();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TlsUpstream { addr, hits, task }
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Options for a TLS gateway on `store` in front of `upstream`, presenting `files`' leaf.
fn tls_opts(store: &str, upstream: &str, cert: &Path, key: &Path) -> GatewayOpts {
    let mut opts = GatewayOpts::new(store, upstream);
    opts.server.tls = Some(TlsConfig::load(cert, key).expect("test certificate loads"));
    opts
}

fn https(gw: &Gateway, path: &str) -> String {
    format!("https://{}{}", gw.addr, path)
}

// ---------------------------------------------------------------------------------------------
// The listener
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn http1_over_tls_logs_in_and_proxies_and_says_https_upstream() {
    let (redis, upstream, files, ca) = (
        RedisServer::new(),
        Upstream::start().await,
        Files::new(),
        Ca::new("test CA"),
    );
    let (cert, key) = files.leaf(&ca.leaf(&["127.0.0.1"], "gateway"));
    let gw = Gateway::start(tls_opts(&redis.url(), &upstream.url(), &cert, &key)).await;
    let client = https_client(&ca, true);

    let credentials = json!({ "username": "alice", "password": PASSWORD });
    let registered = client
        .post(https(&gw, "/register"))
        .json(&credentials)
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    assert_eq!(registered.version(), reqwest::Version::HTTP_11);
    let login = client
        .post(https(&gw, "/login"))
        .json(&credentials)
        .send()
        .await
        .unwrap();
    let (status, body) = json_body(login).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();

    // A client claiming plain http (or anything) is not believed: it is not a trusted proxy.
    let resp = client
        .get(https(&gw, "/api/orders"))
        .bearer_auth(token)
        .header("X-Forwarded-Proto", "http")
        .header("X-Forwarded-Proto", "gopher")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo = Echo::from_response(resp).await;
    assert_eq!(echo.values("x-forwarded-proto"), ["https"]);
    assert_eq!(echo.values("x-auth-user"), ["alice"]);
    // Without a token, the same route is 401 over TLS too.
    let resp = client.get(https(&gw, "/api/orders")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn alpn_offers_h2_and_http1_1_and_both_are_served() {
    let (upstream, files, ca) = (Upstream::start().await, Files::new(), Ca::new("test CA"));
    let (cert, key) = files.leaf(&ca.leaf(&["127.0.0.1"], "gateway"));
    let gw = Gateway::start(tls_opts("memory://", &upstream.url(), &cert, &key)).await;

    for (offer, agreed) in [
        (&[&b"h2"[..], b"http/1.1"][..], Some(&b"h2"[..])),
        (&[&b"http/1.1"[..]][..], Some(&b"http/1.1"[..])),
        (&[&b"h2"[..]][..], Some(&b"h2"[..])),
        (&[][..], None),
    ] {
        let tls = tls_connect(gw.addr, &ca, offer).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), agreed, "offered {offer:?}");
    }
    // A client that offers only a protocol keycard does not speak is refused.
    assert!(tls_connect(gw.addr, &ca, &[b"spdy/3"]).await.is_err());

    // reqwest offers both; the request then goes over HTTP/2, and upstream still says https.
    let resp = https_client(&ca, false)
        .get(https(&gw, "/public/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let echo = Echo::from_response(resp).await;
    assert_eq!(echo.values("x-forwarded-proto"), ["https"]);

    // ALPN http/1.1: an HTTP/1.1 request is answered in HTTP/1.1.
    let mut tls = tls_connect(gw.addr, &ca, &[b"http/1.1"]).await.unwrap();
    assert_get_200(&mut tls, "/public/h1").await;
}

#[tokio::test]
async fn plain_http_to_the_tls_port_is_served_nothing() {
    let (upstream, files, ca) = (Upstream::start().await, Files::new(), Ca::new("test CA"));
    let (cert, key) = files.leaf(&ca.leaf(&["127.0.0.1"], "gateway"));
    let gw = Gateway::start(tls_opts("memory://", &upstream.url(), &cert, &key)).await;

    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"GET /public/x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = read_to_close(&mut tcp, Duration::from_secs(5)).await;
    assert!(
        !got.windows(5).any(|w| w == b"HTTP/"),
        "a plain-text request got an HTTP answer: {:?}",
        String::from_utf8_lossy(&got)
    );
    // The same through reqwest over http://: an error, never a response.
    assert!(http_client().get(gw.url("/public/x")).send().await.is_err());
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn a_client_stalling_in_the_handshake_is_cut_within_header_read_timeout() {
    let (upstream, files, ca) = (Upstream::start().await, Files::new(), Ca::new("test CA"));
    let (cert, key) = files.leaf(&ca.leaf(&["127.0.0.1"], "gateway"));
    let mut opts = tls_opts("memory://", &upstream.url(), &cert, &key);
    opts.server.header_read_timeout = Duration::from_secs(1);
    // One slot: a staller holding it would lock everyone out.
    opts.server.max_connections = 1;
    opts.server.workers = 1;
    let gw = Gateway::start(opts).await;

    // Sends nothing at all.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let (_, took) = read_to_close(&mut silent, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(800), "cut after {took:?}");
    assert!(took < Duration::from_secs(3), "cut after {took:?}");

    // Half a ClientHello: a TLS record header announcing 512 bytes, then a few of them.
    let mut half = TcpStream::connect(gw.addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .await
        .unwrap();
    let (_, took) = read_to_close(&mut half, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(3), "cut after {took:?}");

    // A finished handshake, then no request: the header deadline cuts it as on plain HTTP.
    let mut quiet = tls_connect(gw.addr, &ca, &[b"http/1.1"]).await.unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), quiet.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "still open after 5 s");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "cut after {:?}",
        start.elapsed()
    );
    assert!(!got.starts_with(b"HTTP/1.1 2"), "{got:?}");

    // The slot is free again: a real client gets in and is served.
    let resp = https_client(&ca, true)
        .get(https(&gw, "/public/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_certificate_for_new_connections_and_refuses_a_bad_one() {
    let (upstream, files, ca) = (Upstream::start().await, Files::new(), Ca::new("test CA"));
    let first = ca.leaf(&["127.0.0.1"], "first");
    let (cert, key) = files.leaf(&first);
    let (gw, file) =
        Gateway::start_reloadable(tls_opts("memory://", &upstream.url(), &cert, &key)).await;
    assert_eq!(served_cert(gw.addr, &ca).await, first.der);

    // A connection made before the swap.
    let mut old = tls_connect(gw.addr, &ca, &[b"http/1.1"]).await.unwrap();

    // The certificate is renewed in place; the config file is not touched (a Secret rotated).
    let second = ca.leaf(&["127.0.0.1"], "second");
    files.leaf(&second);
    wait_metric(&gw, "keycard_config_reloads_total{result=\"ok\"}", 1).await;
    assert_eq!(served_cert(gw.addr, &ca).await, second.der);

    // The old connection still has the first certificate and is still served.
    assert_eq!(old.get_ref().1.peer_certificates().unwrap()[0], first.der);
    assert_get_200(&mut old, "/public/old").await;

    // A key that is not the certificate's: rejected, counted, and the second one stays.
    let stranger = ca.leaf(&["127.0.0.1"], "stranger");
    files.write("key.pem", &stranger.key_pem);
    wait_metric(&gw, "keycard_config_reloads_total{result=\"error\"}", 1).await;
    assert_eq!(served_cert(gw.addr, &ca).await, second.der);
    // A certificate file with no certificate in it: the same.
    files.write("cert.pem", "not a certificate\n");
    wait_metric(&gw, "keycard_config_reloads_total{result=\"error\"}", 2).await;
    assert_eq!(served_cert(gw.addr, &ca).await, second.der);

    // The config file names other files: they are read and watched from then on.
    let third = ca.leaf(&["127.0.0.1"], "third");
    let (cert3, key3) = (
        files.write("third.pem", &third.cert_pem),
        files.write("third.key", &third.key_pem),
    );
    file.write(&tls_opts("memory://", &upstream.url(), &cert3, &key3).to_toml());
    wait_metric(&gw, "keycard_config_reloads_total{result=\"ok\"}", 2).await;
    assert_eq!(served_cert(gw.addr, &ca).await, third.der);
    let fourth = ca.leaf(&["127.0.0.1"], "fourth");
    files.write("third.pem", &fourth.cert_pem);
    files.write("third.key", &fourth.key_pem);
    wait_metric(&gw, "keycard_config_reloads_total{result=\"ok\"}", 3).await;
    assert_eq!(served_cert(gw.addr, &ca).await, fourth.der);

    // Turning TLS off needs a restart: the listener keeps TLS and its certificate.
    let mut plain = GatewayOpts::new("memory://", &upstream.url());
    plain.server.listen = gw.opts.server.listen;
    file.write(&plain.to_toml());
    wait_metric(&gw, "keycard_config_reloads_total{result=\"ok\"}", 4).await;
    assert_eq!(served_cert(gw.addr, &ca).await, fourth.der);
}

/// Waits (bounded) until the metric line `name` reads `n`.
async fn wait_metric(gw: &Gateway, name: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = gw.metrics().await;
        let seen = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or(0, |v| v.trim().parse().unwrap());
        if seen >= n {
            assert_eq!(seen, n, "{name}: more than {n}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {seen}, waited for {n}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// https:// upstreams
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_https_upstream_is_verified_against_its_ca_file() {
    let (files, ca, other_ca) = (Files::new(), Ca::new("upstream CA"), Ca::new("other CA"));
    let good = TlsUpstream::start(&ca.leaf(&["127.0.0.1"], "upstream")).await;
    let wrong_name = TlsUpstream::start(&ca.leaf(&["other.example"], "upstream")).await;
    let untrusted = TlsUpstream::start(&other_ca.leaf(&["127.0.0.1"], "upstream")).await;
    let ca_file = files.write("ca.pem", &ca.pem);

    let https_route = |path: &str, up: &TlsUpstream, ca_file: Option<&Path>| {
        let route = route(path, &format!("https://{}", up.addr), "public");
        match ca_file {
            Some(file) => route.with_ca_file(file).unwrap(),
            None => route,
        }
    };
    let mut opts = GatewayOpts::new("memory://", "http://127.0.0.1:9");
    opts.routes = vec![
        https_route("/good", &good, Some(&ca_file)),
        https_route("/wrong-name", &wrong_name, Some(&ca_file)),
        https_route("/untrusted", &untrusted, Some(&ca_file)),
        // Without ca_file only the public roots count: a private CA is not among them.
        https_route("/no-ca-file", &good, None),
    ];
    let gw = Gateway::start(opts).await;

    let resp = gw.get("/good/x", None).await;
    assert_eq!(resp.status(), 200);
    let (_, body) = json_body(resp).await;
    assert_eq!(body["path"], "/good/x");
    // keycard's listener is plain http here: it says so.
    assert_eq!(body["proto"], "http");
    assert_eq!(good.hits(), 1);

    for path in ["/wrong-name/x", "/untrusted/x", "/no-ca-file/x"] {
        let resp = gw.get(path, None).await;
        assert_eq!(resp.status(), 502, "{path}");
    }
    assert_eq!(wrong_name.hits(), 0);
    assert_eq!(untrusted.hits(), 0);
    assert_eq!(good.hits(), 1, "/no-ca-file must not have reached it");
}

#[tokio::test]
async fn an_http_client_of_an_https_upstream_and_the_reverse_fail_cleanly() {
    let (files, ca) = (Files::new(), Ca::new("upstream CA"));
    let tls_up = TlsUpstream::start(&ca.leaf(&["127.0.0.1"], "upstream")).await;
    let plain_up = Upstream::start().await;
    let ca_file = files.write("ca.pem", &ca.pem);
    let mut opts = GatewayOpts::new("memory://", "http://127.0.0.1:9");
    opts.routes = vec![
        // http:// to a TLS server, https:// to a plain one: neither may "work".
        route(
            "/plain-to-tls",
            &format!("http://{}", tls_up.addr),
            "public",
        ),
        route(
            "/tls-to-plain",
            &format!("https://{}", plain_up.addr),
            "public",
        )
        .with_ca_file(&ca_file)
        .unwrap(),
    ];
    let gw = Gateway::start(opts).await;
    assert_eq!(gw.get("/plain-to-tls/x", None).await.status(), 502);
    assert_eq!(gw.get("/tls-to-plain/x", None).await.status(), 502);
    assert_eq!(tls_up.hits(), 0);
    assert_eq!(plain_up.hits(), 0);
}

// ---------------------------------------------------------------------------------------------
// The config
// ---------------------------------------------------------------------------------------------

/// The smallest config, plus `extra` after `[server]`'s keys and `route_extra` in the route.
fn config_text(extra: &str, upstream: &str, route_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:8443\"\n{extra}\n[admin]\nlisten = \"127.0.0.1:9901\"\n\
         [store]\nurl = \"memory://\"\n[tokens]\nsecret = \"{SECRET}\"\n\
         [[routes]]\npath = \"/\"\nupstream = \"{upstream}\"\n{route_extra}\n"
    )
}

fn parse(text: &str) -> Result<Config, Vec<keycard::config::ConfigError>> {
    Config::parse(text, Path::new("keycard.toml"), &env).map_err(|e| e.errors)
}

fn one_error(text: &str) -> keycard::config::ConfigError {
    let errors = parse(text).expect_err("the config must be refused");
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors.into_iter().next().unwrap()
}

fn tls_section(cert: &Path, key: &Path) -> String {
    format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {:?}",
        cert.display().to_string(),
        key.display().to_string()
    )
}

#[test]
fn config_errors_name_the_key_and_say_what_is_wrong() {
    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let leaf = ca.leaf(&["127.0.0.1"], "gateway");
    let other = ca.leaf(&["127.0.0.1"], "other");
    let (cert, key) = files.leaf(&leaf);
    let other_key = files.write("other.key", &other.key_pem);
    let missing = files.0.join("missing.pem");
    let empty = files.write("empty.pem", "");
    let upstream = "http://127.0.0.1:3000";

    let ok = parse(&config_text(&tls_section(&cert, &key), upstream, "")).unwrap();
    assert!(ok.server.tls.as_ref().unwrap().cert.is_some());
    // The key never shows in Debug.
    let key_body: String = leaf.key_pem.lines().nth(1).unwrap().to_owned();
    assert!(!format!("{ok:?}").contains(&key_body));

    let key_material = |e: &keycard::config::ConfigError| {
        for pem in [&leaf.key_pem, &other.key_pem] {
            for line in pem.lines().filter(|l| !l.starts_with("-----")) {
                assert!(!e.message.contains(line), "key material in {e}");
            }
        }
    };
    for (cert_file, key_file, key, needle) in [
        (&missing, &key, "server.tls.cert_file", "cannot read"),
        (&cert, &missing, "server.tls.key_file", "cannot read"),
        (&empty, &key, "server.tls.cert_file", "no certificate"),
        // The key where the certificate should be, and the reverse.
        (&key, &key, "server.tls.cert_file", "no certificate"),
        (&cert, &cert, "server.tls.key_file", "no private key"),
        (
            &cert,
            &other_key,
            "server.tls.key_file",
            "does not match the certificate",
        ),
        (&files.0, &key, "server.tls.cert_file", "not a regular file"),
    ] {
        let e = one_error(&config_text(
            &tls_section(cert_file, key_file),
            upstream,
            "",
        ));
        assert_eq!(e.key, key, "{e}");
        assert!(e.message.contains(needle), "{e}");
        assert!(e.position.is_some(), "{e}");
        key_material(&e);
    }
    let e = one_error(&config_text(
        "[server.tls]\nkey_file = \"/k.pem\"",
        upstream,
        "",
    ));
    assert_eq!(e.key, "server.tls.cert_file");
    assert!(e.message.contains("missing required key"), "{e}");

    // A route's ca_file: only with https://, and a readable file of certificates.
    let ca_file = files.write("ca.pem", &ca.pem);
    let with_ca = format!("ca_file = {:?}", ca_file.display().to_string());
    let e = one_error(&config_text("", upstream, &with_ca));
    assert_eq!(e.key, "routes[0].ca_file");
    assert!(e.message.contains("only for an https:// upstream"), "{e}");
    let ok = parse(&config_text("", "https://127.0.0.1:3000", &with_ca)).unwrap();
    assert!(ok.routes[0].ca.is_some());
    for (file, needle) in [
        (&missing, "cannot read"),
        (&empty, "no certificate"),
        (&key, "no certificate"),
    ] {
        let line = format!("ca_file = {:?}", file.display().to_string());
        let e = one_error(&config_text("", "https://127.0.0.1:3000", &line));
        assert_eq!(e.key, "routes[0].ca_file", "{e}");
        assert!(e.message.contains(needle), "{e}");
    }

    // keycard check: "no TLS and no trusted proxy" only when both are missing.
    let warns = |c: &Config| {
        c.warnings()
            .iter()
            .any(|w| w.contains("no TLS and no trusted proxy"))
    };
    assert!(warns(&parse(&config_text("", upstream, "")).unwrap()));
    assert!(!warns(
        &parse(&config_text(&tls_section(&cert, &key), upstream, "")).unwrap()
    ));
}

#[test]
fn pkcs8_rsa_and_sec1_keys_all_load() {
    use p256::pkcs8::DecodePrivateKey as _;
    use rsa::pkcs1::EncodeRsaPrivateKey as _;

    let (files, ca) = (Files::new(), Ca::new("test CA"));
    let rsa_pkcs8 = std::fs::read_to_string(key_path("rs256.pem")).unwrap();
    let ec_pkcs8 = std::fs::read_to_string(key_path("es256.pem")).unwrap();
    let rsa_pkcs1 = rsa::RsaPrivateKey::from_pkcs8_pem(&rsa_pkcs8)
        .unwrap()
        .to_pkcs1_pem(Default::default())
        .unwrap()
        .to_string();
    let ec_sec1 = p256::SecretKey::from_pkcs8_pem(&ec_pkcs8)
        .unwrap()
        .to_sec1_pem(Default::default())
        .unwrap()
        .to_string();
    assert!(rsa_pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    assert!(ec_sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"));

    for (name, pkcs8, written) in [
        ("rsa-pkcs8", &rsa_pkcs8, &rsa_pkcs8),
        ("rsa-pkcs1", &rsa_pkcs8, &rsa_pkcs1),
        ("ec-sec1", &ec_pkcs8, &ec_sec1),
    ] {
        let key = KeyPair::from_pem(pkcs8).unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        let cert_file = files.write(&format!("{name}.crt"), &cert.pem());
        let key_file = files.write(&format!("{name}.key"), written);
        TlsConfig::load(&cert_file, &key_file).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
