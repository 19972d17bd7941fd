//! Forwarding: identity and hop-by-hop headers, X-Forwarded-*, route matching, canonical
//! paths, upstream failures, streaming, and HTTP/1 request limits and smuggling defences.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Asserts the upstream saw exactly the gateway's identity: one `X-Auth-User` with `user` on a
/// protected route (`Some`), none at all on a public one (`None`), and no other identity-like
/// header in any spelling.
fn assert_identity(echo: &Echo, user: Option<&str>) {
    let identity = echo.identity_like("x-auth-");
    match user {
        Some(u) => assert_eq!(
            identity,
            vec![("x-auth-user".to_owned(), u.to_owned())],
            "upstream must see only the gateway's identity; all headers: {:?}",
            echo.headers
        ),
        None => assert!(
            identity.is_empty(),
            "public route must inject no identity: {:?}",
            echo.headers
        ),
    }
}

const SPOOFS: &[&str] = &[
    "X-Auth-User: admin",
    "x-auth-user: root",
    "X-AUTH-USER: root2",
    "X_Auth_User: admin_underscore",
    "x.auth.user: admin_dot",
    "X-Auth-Role: superuser",
    "x_auth_groups: wheel",
    "X-Auth-User: second-copy",
];

// ----------------------------------------------------------------------------- identity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_are_replaced_on_protected_routes() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("alice").await;
    let auth = format!("Authorization: Bearer {access}");
    let mut headers: Vec<&str> = SPOOFS.to_vec();
    headers.push(&auth);
    let r = raw_request(s.gw.addr, &raw_get("/private/x", &headers)).await;
    assert_eq!(r.status, 200, "{}\n{}", r.head, r.body_text());
    let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    assert_identity(&echo, Some("alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_are_stripped_on_public_routes() {
    let s = Stack::start().await;
    for path in ["/public/x", "/api/open/y", "/strip/z"] {
        let r = raw_request(s.gw.addr, &raw_get(path, SPOOFS)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
        assert_identity(&echo, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_are_stripped_for_options_and_other_methods() {
    let s = Stack::start().await;
    for method in ["OPTIONS", "POST", "PUT", "DELETE", "PATCH"] {
        let mut req = format!("{method} /public/m HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        for h in SPOOFS {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("Content-Length: 0\r\n\r\n");
        let r = raw_request(s.gw.addr, req.as_bytes()).await;
        assert_eq!(r.status, 200, "{method}: {}", r.head);
        let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
        assert_eq!(echo.method, method);
        assert_identity(&echo, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_header_naming_x_auth_user_cannot_remove_the_injected_identity() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("bob").await;
    let auth = format!("Authorization: Bearer {access}");
    for conn in [
        "Connection: X-Auth-User",
        "Connection: keep-alive, x-auth-user",
        "Connection: X_Auth_User",
    ] {
        let r = raw_request(
            s.gw.addr,
            &raw_get("/private/c", &[&auth, conn, "X-Auth-User: admin"]),
        )
        .await;
        assert_eq!(r.status, 200, "{conn}: {}", r.head);
        let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
        assert_identity(&echo, Some("bob"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let s = Stack::start().await;
    let r = raw_request(
        s.gw.addr,
        &raw_get(
            "/public/hop",
            &[
                "Connection: keep-alive, X-Custom-Hop, x-other-hop",
                "X-Custom-Hop: secret1",
                "X-OTHER-HOP: secret2",
                "Keep-Alive: timeout=5, max=100",
                "TE: deflate",
                "Upgrade: websocket",
                "Proxy-Authorization: Basic Zm9vOmJhcg==",
                "Proxy-Connection: keep-alive",
                "X-End-To-End: kept",
            ],
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.head);
    let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    for name in [
        "x-custom-hop",
        "x-other-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(!echo.has(name), "{name} was forwarded: {:?}", echo.headers);
    }
    for v in echo.values("connection") {
        assert!(
            !v.to_ascii_lowercase().contains("hop"),
            "client Connection forwarded: {v}"
        );
    }
    assert_eq!(echo.values("x-end-to-end"), vec!["kept"]);
}

// ----------------------------------------------------------------------------- forwarding

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_x_forwarded_headers_are_replaced_when_peer_is_untrusted() {
    let s = Stack::start().await;
    let r = raw_request(
        s.gw.addr,
        &raw_get(
            "/public/xff",
            &[
                "X-Forwarded-For: 1.2.3.4",
                "X-Forwarded-Proto: https",
                "X-Forwarded-Host: evil.example",
                "Forwarded: for=1.2.3.4;proto=https;host=evil.example",
            ],
        ),
    )
    .await
    .body;
    let echo = Echo::parse(&serde_json::from_slice(&r).unwrap());
    assert_eq!(echo.values("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(echo.values("x-forwarded-proto"), vec!["http"]);
    assert_eq!(echo.values("x-forwarded-host"), vec!["127.0.0.1"]);
    for v in echo.values("forwarded") {
        assert!(
            !v.contains("1.2.3.4") && !v.contains("evil"),
            "client Forwarded kept: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_headers_are_added_without_client_values() {
    let s = Stack::start().await;
    let echo = Echo::from_response(s.gw.get("/public/plain", None).await).await;
    assert_eq!(echo.values("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(echo.values("x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        echo.values("x-forwarded-host"),
        vec![s.gw.addr.to_string()],
        "X-Forwarded-Host = the Host the client sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxy_chain_is_appended_to() {
    let s = Stack::start_with(|o| o.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()])
        .await;
    let r = raw_request(
        s.gw.addr,
        &raw_get("/public/xff", &["X-Forwarded-For: 1.2.3.4, 10.0.0.1"]),
    )
    .await;
    let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    let chain: Vec<String> = echo
        .values("x-forwarded-for")
        .join(",")
        .split(',')
        .map(|p| p.trim().to_owned())
        .collect();
    assert_eq!(chain, vec!["1.2.3.4", "10.0.0.1", "127.0.0.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_and_method_are_forwarded() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("carol").await;
    let resp =
        s.gw.client
            .put(s.gw.url("/private/doc?v=2"))
            .bearer_auth(&access)
            .header("content-type", "text/plain")
            .body("hello upstream")
            .send()
            .await
            .unwrap();
    let echo = Echo::from_response(resp).await;
    assert_eq!(echo.method, "PUT");
    assert_eq!(echo.path, "/private/doc?v=2");
    assert_eq!(echo.body, "hello upstream");
    assert_eq!(echo.values("content-type"), vec!["text/plain"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_streamed_request_body_is_forwarded_intact() {
    // Proxied bodies are not subject to the 16 KiB auth-endpoint limit.
    let s = Stack::start().await;
    let body = "0123456789abcdef".repeat(64 * 1024); // 1 MiB
    let resp =
        s.gw.client
            .post(s.gw.url("/public/upload"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
    let echo = Echo::from_response(resp).await;
    assert_eq!(echo.body.len(), body.len());
    assert!(echo.body == body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_body_is_streamed_not_buffered() {
    let s = Stack::start().await;
    let started = Instant::now();
    let mut resp = s.gw.get("/public/stream", None).await;
    assert_eq!(resp.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
        .await
        .expect("first chunk in time")
        .unwrap()
        .expect("a first chunk");
    let first_at = started.elapsed();
    assert!(
        String::from_utf8_lossy(&first).starts_with("chunk-1"),
        "{first:?}"
    );
    let mut all = first.to_vec();
    while let Some(c) = resp.chunk().await.unwrap() {
        all.extend_from_slice(&c);
    }
    let total = started.elapsed();
    assert_eq!(String::from_utf8_lossy(&all), "chunk-1\nchunk-2\nchunk-3\n");
    // The upstream takes ~1.2 s in all; the first chunk must not wait for the last.
    assert!(
        first_at + Duration::from_millis(600) < total,
        "first chunk after {first_at:?}, whole body after {total:?}: buffered?"
    );
}

// ----------------------------------------------------------------------------- routing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_prefix_wins_on_whole_segments() {
    let s = Stack::start().await;
    // /api/open is public although /api requires a token.
    let echo = Echo::from_response(s.gw.get("/api/open/x", None).await).await;
    assert_eq!(echo.path, "/api/open/x");
    assert_eq!(s.gw.get("/api/open", None).await.status(), 200);
    // /api/opener is not under /api/open: it falls back to /api (required).
    assert_eq!(
        failure(s.gw.get("/api/opener", None).await).await.status,
        401
    );
    assert_eq!(failure(s.gw.get("/api/x", None).await).await.status, 401);
    assert_eq!(failure(s.gw.get("/api", None).await).await.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_does_not_match_inside_a_segment_and_unmatched_is_404() {
    let s = Stack::start().await;
    for path in ["/apix", "/publicity", "/", "/nothing/here", "/privateer"] {
        let f = failure(s.gw.get(path, None).await).await;
        assert_eq!(f.status, 404, "{path}: {f:?}");
        assert_eq!(f.msg, "No route");
    }
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_prefix_removes_the_route_path() {
    let s = Stack::start().await;
    let echo = Echo::from_response(s.gw.get("/strip/foo/bar?q=1", None).await).await;
    assert_eq!(echo.path, "/foo/bar?q=1");
    let echo = Echo::from_response(s.gw.get("/strip", None).await).await;
    assert!(echo.path == "/" || echo.path.is_empty(), "{}", echo.path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_string_is_forwarded_unchanged() {
    let s = Stack::start().await;
    let r = raw_request(s.gw.addr, &raw_get("/public/q?a=%2F..%2F&b=x;y&c", &[])).await;
    let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    assert_eq!(echo.path, "/public/q?a=%2F..%2F&b=x;y&c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_are_400_invalid_path_and_never_forwarded() {
    let s = Stack::start().await;
    for target in [
        "/public/../private",
        "/public/./x",
        "/public/..",
        "/public/%2e%2e/private",
        "/public/%2E%2E/private",
        "/public/.%2e/private",
        "/public/%2e/x",
        "/public%2fprivate",
        "/public/a%2Fb",
        "/a%5cb",
        "/public/a%5Cb",
        "/a;b",
        "/public/x;jsessionid=1",
        "/x%00",
        "/public/a%00b",
    ] {
        let r = raw_request(s.gw.addr, &raw_get(target, &[])).await;
        assert_eq!(
            (r.status, r.msg().as_deref()),
            (400, Some("Invalid path")),
            "{target}: {}\n{}",
            r.head,
            r.body_text()
        );
    }
    assert_eq!(s.upstream.hits(), 0, "{:?}", s.upstream.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_unreserved_characters_match_their_decoded_route() {
    let s = Stack::start().await;
    // /%70rivate is /private: a protected route, so no token means 401, not 404 or a forward.
    let r = raw_request(s.gw.addr, &raw_get("/%70rivate", &[])).await;
    assert_eq!(r.status, 401, "{}\n{}", r.head, r.body_text());
    let r = raw_request(s.gw.addr, &raw_get("/%70rivate/x", &[])).await;
    assert_eq!(r.status, 401, "{}", r.head);
    assert_eq!(s.upstream.hits(), 0);
    // With a token, the upstream sees the same canonical path the router matched.
    let (access, _) = s.gw.user("dora").await;
    let auth = format!("Authorization: Bearer {access}");
    let r = raw_request(s.gw.addr, &raw_get("/%70rivate/x", &[&auth])).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    assert_eq!(echo.path, "/private/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_and_asterisk_targets_cannot_bypass_routing() {
    let s = Stack::start().await;
    let r = raw_request(
        s.gw.addr,
        &raw_get("http://127.0.0.1/public/../private", &[]),
    )
    .await;
    assert!(
        r.status == 400 || r.status == 401 || r.status == 404,
        "{}",
        r.head
    );
    assert_eq!(s.upstream.hits(), 0);
}

// ----------------------------------------------------------------------------- upstream failures

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusing_connections_is_502() {
    let redis = RedisServer::new();
    let upstream = Upstream::start().await;
    let mut opts = GatewayOpts::new(&redis.url(), &upstream.url());
    let dead = format!("http://{}", closed_addr());
    opts.routes.push(route("/dead", &dead, "public"));
    let gw = Gateway::start(opts).await;
    let started = Instant::now();
    let f = failure(gw.get("/dead/x", None).await).await;
    assert_eq!(f.status, 502, "{f:?}");
    assert!(!f.msg.is_empty());
    assert!(started.elapsed() < Duration::from_secs(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_beyond_route_timeout_is_504() {
    let redis = RedisServer::new();
    let upstream = Upstream::start().await;
    let mut opts = GatewayOpts::new(&redis.url(), &upstream.url());
    opts.routes.push(RouteConfig {
        timeout: Duration::from_millis(500),
        ..route("/hurry", &upstream.url(), "public")
    });
    let gw = Gateway::start(opts).await;
    let started = Instant::now();
    let f = failure(gw.get("/hurry/slow", None).await).await;
    assert_eq!(f.status, 504, "{f:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "504 after {:?}",
        started.elapsed()
    );
    // A route with the default timeout waits for the same slow upstream.
    let echo = Echo::from_response(gw.get("/public/slow", None).await).await;
    assert_eq!(echo.path, "/public/slow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_accepts_is_504_after_the_route_connect_timeout() {
    // A listener whose accept queue is full: the kernel drops further SYNs, so a connect
    // hangs (on loopback, with no packet leaving the machine) until the route's
    // connect_timeout, which must be answered 504 like nginx's proxy_connect_timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fill the queue with connections nobody accepts (each attempt bounded).
    let mut held = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(stream)) => held.push(stream),
            _ => break,
        }
    }
    let redis = RedisServer::new();
    let upstream = Upstream::start().await;
    let mut opts = GatewayOpts::new(&redis.url(), &upstream.url());
    opts.routes.push(RouteConfig {
        connect_timeout: Duration::from_millis(300),
        ..route("/stuck", &format!("http://{addr}"), "public")
    });
    let gw = Gateway::start(opts).await;
    let started = Instant::now();
    let f = failure(gw.get("/stuck/x", None).await).await;
    assert_eq!(f.status, 504, "{f:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "504 after {:?}",
        started.elapsed()
    );
    drop(held);
}

// ----------------------------------------------------------------------------- HTTP/1 limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_headers_over_32_kib_are_431() {
    let s = Stack::start().await;
    let big = format!("X-Big: {}", "a".repeat(33 * 1024));
    let r = raw_request(s.gw.addr, &raw_get("/public/h", &[&big])).await;
    assert_eq!(r.status, 431, "one big header: {}", r.head);

    let many: Vec<String> = (0..40)
        .map(|i| format!("X-Many-{i}: {}", "b".repeat(1000)))
        .collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let r = raw_request(s.gw.addr, &raw_get("/public/h", &refs)).await;
    assert_eq!(r.status, 431, "40 x 1 KiB headers: {}", r.head);
    assert_eq!(s.upstream.hits(), 0);

    // Under the limit is fine.
    let ok = format!("X-Big: {}", "a".repeat(16 * 1024));
    let r = raw_request(s.gw.addr, &raw_get("/public/h", &[&ok])).await;
    assert_eq!(r.status, 200, "16 KiB header: {}", r.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_target_over_8_kib_is_414() {
    let s = Stack::start().await;
    let long = format!("/public/{}", "a".repeat(9 * 1024));
    let r = raw_request(s.gw.addr, &raw_get(&long, &[])).await;
    assert_eq!(r.status, 414, "{}", r.head);
    let long_query = format!("/public/q?{}", "a".repeat(9 * 1024));
    let r = raw_request(s.gw.addr, &raw_get(&long_query, &[])).await;
    assert_eq!(r.status, 414, "{}", r.head);
    assert_eq!(s.upstream.hits(), 0);
    let ok = format!("/public/{}", "a".repeat(4 * 1024));
    let r = raw_request(s.gw.addr, &raw_get(&ok, &[])).await;
    assert_eq!(r.status, 200, "{}", r.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_read_as_chunked_and_closes() {
    // The contract's CL+TE row: 400 and close, or (RFC 9112 §6.1, what hyper 1.11+ does) the
    // length ignored, the body read as chunked, the connection closed after the response;
    // never forwarded with both, and nothing behind it parsed.
    let s = Stack::start().await;
    let req = b"POST /public/smuggle HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n\
                Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /public/second HTTP/1.1\r\n\
                Host: 127.0.0.1\r\n\r\n";
    let mut r = raw_request(s.gw.addr, req).await;
    assert!(
        r.closed_within(Duration::from_secs(3)).await,
        "connection must be closed"
    );
    let seen = s.upstream.requests();
    match r.status {
        400 => assert!(seen.is_empty(), "{seen:?}"),
        200 => {
            assert_eq!(seen.len(), 1, "{seen:?}");
            assert_eq!(seen[0].path, "/public/smuggle");
            assert!(
                !seen[0].headers.iter().any(|(n, _)| n == "content-length"),
                "forwarded with both: {:?}",
                seen[0].headers
            );
        }
        other => panic!("{other}: {}", r.head),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_content_lengths_are_400() {
    let s = Stack::start().await;
    let req = b"POST /public/cl HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\
                Content-Length: 5\r\n\r\nhello";
    let mut r = raw_request(s.gw.addr, req).await;
    assert_eq!(r.status, 400, "{}", r.head);
    assert!(r.closed_within(Duration::from_secs(3)).await);
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_transfer_encoding_is_400() {
    let s = Stack::start().await;
    for te in ["xchunked", "chunked, gzip", "gzip"] {
        let req = format!(
            "POST /public/te HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: {te}\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        );
        let mut r = raw_request(s.gw.addr, req.as_bytes()).await;
        assert_eq!(r.status, 400, "{te}: {}", r.head);
        assert!(r.closed_within(Duration::from_secs(3)).await, "{te}");
    }
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incomplete_headers_are_closed_after_header_read_timeout() {
    let s = Stack::start_with(|o| o.server.header_read_timeout = Duration::from_secs(1)).await;
    let mut stream = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    stream
        .write_all(b"GET /public/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    // Anything (a 408 or nothing) then EOF; but never a forwarded request.
    let (_, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "connection still open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert_eq!(s.upstream.hits(), 0);
}

// ----------------------------------------------------------------------------- more identity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_route_with_a_valid_token_still_injects_no_identity() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("pat").await;
    let echo = Echo::from_response(s.gw.get("/public/who", Some(&access)).await).await;
    assert_identity(&echo, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_user_header_outside_the_prefix_is_stripped_and_injected() {
    // The header the gateway may inject is the gateway's alone even when it does not start
    // with identity.prefix.
    let s = Stack::start_with(|o| {
        o.identity.user_header = http::HeaderName::from_static("x-remote-user");
        o.identity.prefix = "x-ident-".into();
    })
    .await;
    let spoofs = [
        "X-Remote-User: admin",
        "x_remote_user: admin2",
        "X.Remote.User: admin3",
        "X-Ident-Role: boss",
        "X_IDENT_GROUPS: wheel",
    ];
    let r = raw_request(s.gw.addr, &raw_get("/public/c", &spoofs)).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    assert!(
        echo.identity_like("x-remote-user").is_empty(),
        "{:?}",
        echo.headers
    );
    assert!(
        echo.identity_like("x-ident-").is_empty(),
        "{:?}",
        echo.headers
    );

    let (access, _) = s.gw.user("quinn").await;
    let auth = format!("Authorization: Bearer {access}");
    let mut headers = spoofs.to_vec();
    headers.push(&auth);
    let r = raw_request(s.gw.addr, &raw_get("/private/c", &headers)).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    assert_eq!(
        echo.identity_like("x-remote-user"),
        vec![("x-remote-user".to_owned(), "quinn".to_owned())]
    );
    assert!(
        echo.identity_like("x-ident-").is_empty(),
        "{:?}",
        echo.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_are_stripped_even_when_auth_fails_on_other_routes() {
    // A rejected request never reaches the upstream at all, whatever it carried.
    let s = Stack::start().await;
    let r = raw_request(
        s.gw.addr,
        &raw_get(
            "/private/x",
            &["X-Auth-User: admin", "Authorization: Bearer junk"],
        ),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.head);
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_written_errors_are_json_msg_bodies() {
    let s = Stack::start().await;
    let long = format!("/public/{}", "a".repeat(9 * 1024));
    let big = format!("X-Big: {}", "a".repeat(33 * 1024));
    for (req, status) in [
        (raw_get("/nope", &[]), 404),
        (raw_get("/public/%2e%2e/x", &[]), 400),
        (raw_get(&long, &[]), 414),
        (raw_get("/public/h", &[&big]), 431),
    ] {
        let r = raw_request(s.gw.addr, &req).await;
        assert_eq!(r.status, status, "{}", r.head);
        assert!(
            r.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{status}: {}",
            r.head
        );
        assert!(r.msg().is_some(), "{status}: body {:?}", r.body_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_is_streamed_to_the_upstream() {
    use tokio::io::AsyncWriteExt;
    let s = Stack::start().await;
    let mut stream = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    stream
        .write_all(
            b"POST /public/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n\
              Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
    // The upstream records a request when its head arrives; the body is not finished yet.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.upstream.hits() == 0 {
        assert!(
            Instant::now() < deadline,
            "upstream not reached before the request body was complete: buffered?"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stream.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
    let r = read_response(stream, Duration::from_secs(10)).await;
    assert_eq!(r.status, 200, "{}", r.head);
    let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    assert_eq!(echo.body, "hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_after_header_read_timeout() {
    // A client that connects and sends nothing has not completed its headers either.
    let s = Stack::start_with(|o| o.server.header_read_timeout = Duration::from_secs(1)).await;
    let mut stream = tokio::net::TcpStream::connect(s.gw.addr).await.unwrap();
    let (_, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert!(closed, "idle connection still open after 5 s");
}

// ----------------------------------------------------------------------------- harness checks

/// The identity assertions above would see a leak: the echo upstream reports every spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_echo_reports_spoofed_identity_headers_when_nothing_strips_them() {
    let upstream = Upstream::start().await;
    let r = raw_request(upstream.addr, &raw_get("/direct", SPOOFS)).await;
    assert_eq!(r.status, 200);
    let echo = Echo::parse(&serde_json::from_slice(&r.body).unwrap());
    assert_eq!(echo.identity_like("x-auth-").len(), SPOOFS.len());
    assert_eq!(upstream.hits(), 1);
}

/// `closed_within` is not vacuous: a keep-alive connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_raw_client_tells_open_from_closed_connections() {
    let upstream = Upstream::start().await;
    let mut r = raw_request(upstream.addr, &raw_get("/keepalive", &[])).await;
    assert_eq!(r.status, 200);
    assert!(!r.closed_within(Duration::from_millis(500)).await);
    let mut r = raw_request(upstream.addr, &raw_get("/close", &["Connection: close"])).await;
    assert_eq!(r.status, 200);
    assert!(r.closed_within(Duration::from_secs(2)).await);
}

#[test]
fn harness_base64url_round_trips_and_forges_alg_none() {
    for input in [&b""[..], b"f", b"fo", b"foo", b"foob", b"\xff\xfe\xfd"] {
        assert_eq!(b64url_decode(&b64url(input)).unwrap(), input);
    }
    assert_eq!(b64url(b"{\"alg\":\"none\"}"), "eyJhbGciOiJub25lIn0");
    let c = claims("x", "access");
    let t = alg_none(&c);
    assert!(t.ends_with('.'));
    assert_eq!(decode_claims(&t), c);
    assert_eq!(decode_claims(&mint_valid(&c)), c);
}
