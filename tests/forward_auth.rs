//! Forward-auth: `/_keycard/verify` behind a real nginx (`auth_request`), from Debian's
//! package (scripts/test.sh installs it). nginx, keycard, redis-server and the upstream all
//! run on loopback; the test fails, never skips, without nginx.

mod support;

use std::process::{Child, Command, Stdio};

use support::*;

/// nginx in the foreground with its own prefix directory; killed on drop.
struct Nginx {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Nginx {
    async fn start(keycard: std::net::SocketAddr, upstream: std::net::SocketAddr) -> Nginx {
        let dir = std::env::temp_dir().join(format!("keycard-nginx-{}", random_jti()));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let port = free_port();
        let d = dir.display();
        // The README's example, with paths and ports for the test.
        let conf = format!(
            r#"
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /_keycard_auth {{
            internal;
            proxy_pass http://{keycard}/_keycard/verify;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Forwarded-Uri $request_uri;
            proxy_set_header X-Forwarded-Method $request_method;
        }}
        location / {{
            auth_request /_keycard_auth;
            auth_request_set $keycard_user $upstream_http_x_auth_user;
            proxy_set_header X-Auth-User $keycard_user;
            proxy_pass http://{upstream};
        }}
    }}
}}
"#
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let nginx = ["/usr/sbin/nginx", "nginx"]
            .into_iter()
            .find(|p| Command::new(p).arg("-v").output().is_ok())
            .expect("nginx is not installed (scripts/test.sh installs it: apt-get install nginx)");
        let child = Command::new(nginx)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nginx did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Nginx { child, port, dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_asks_keycard_before_forwarding() {
    let upstream = Upstream::start().await;
    let redis = RedisServer::new();
    let mut opts = GatewayOpts::new(&redis.url(), &upstream.url());
    // nginx connects from loopback: only then are its X-Original-URI headers believed.
    opts.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    opts.routes.push(RouteConfig {
        roles: vec!["admin".into()],
        ..route("/admin", &upstream.url(), "required")
    });
    let gw = Gateway::start(opts).await;
    let nginx = Nginx::start(gw.addr, upstream.addr).await;
    let client = http_client();
    let (access, _) = gw.user("nell").await;

    // No token on a required route: nginx answers keycard's 401, nothing is forwarded.
    let resp = client.get(nginx.url("/private/x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(upstream.hits(), 0);

    // A valid token: forwarded, with the identity keycard returned (a client's own
    // X-Auth-User replaced).
    let resp = client
        .get(nginx.url("/private/x?q=1"))
        .bearer_auth(&access)
        .header("x-auth-user", "admin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo = Echo::from_response(resp).await;
    assert_eq!(echo.path, "/private/x?q=1");
    assert_eq!(echo.values("x-auth-user"), ["nell"]);

    // Roles: 403 from keycard becomes nginx's 403.
    let resp = client
        .get(nginx.url("/admin/panel"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // A public route passes without a token, and with no identity.
    let resp = client
        .get(nginx.url("/public/x"))
        .header("x-auth-user", "admin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo = Echo::from_response(resp).await;
    assert!(echo.values("x-auth-user").is_empty(), "{echo:?}");

    // Found by review: nginx passes the client's own headers to the auth request; a client's
    // X-Forwarded-Uri must never decide (the README config sets it, keycard refuses any
    // disagreement between the two).
    for spoof in ["x-forwarded-uri", "x-original-uri"] {
        let resp = client
            .get(nginx.url("/admin/panel"))
            .bearer_auth(&access)
            .header(spoof, "/public/x")
            .send()
            .await
            .unwrap();
        assert!(
            matches!(resp.status().as_u16(), 401 | 403),
            "{spoof}: {}",
            resp.status()
        );
    }

    // A revoked token is refused at once.
    let logout = gw.logout(&access).await;
    assert_eq!(logout.status(), 200);
    let resp = client
        .get(nginx.url("/private/x"))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        upstream
            .requests()
            .iter()
            .filter(|r| r.path.starts_with("/admin"))
            .count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verify_endpoint_trusts_original_uri_only_from_trusted_proxies() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("otto").await;
    let verify = |uri: &'static str| {
        s.gw.client
            .get(s.gw.url("/_keycard/verify"))
            .header("x-forwarded-uri", uri)
            .bearer_auth(&access)
    };
    // The test client is not a trusted proxy here: its X-Forwarded-Uri is not believed.
    let f = failure(verify("/private/x").send().await.unwrap()).await;
    assert_eq!(
        (f.status, f.msg.as_str()),
        (403, "Missing or untrusted X-Forwarded-Uri")
    );

    let t = Stack::start_with(|o| o.server.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()])
        .await;
    let (access, _) = t.gw.user("otto").await;
    let ask = |uri: &str, token: Option<&str>| {
        let mut r =
            t.gw.client
                .get(t.gw.url("/_keycard/verify"))
                .header("x-forwarded-uri", uri);
        if let Some(token) = token {
            r = r.bearer_auth(token);
        }
        r.send()
    };
    let resp = ask("/private/x", Some(&access)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-auth-user"], "otto");
    assert_eq!(ask("/private/x", None).await.unwrap().status(), 401);
    let both =
        t.gw.client
            .get(t.gw.url("/_keycard/verify"))
            .header("x-original-uri", "/private/x")
            .header("x-forwarded-uri", "/public/x")
            .send()
            .await
            .unwrap();
    let f = failure(both).await;
    assert_eq!(
        (f.status, f.msg.as_str()),
        (403, "Conflicting X-Forwarded-Uri and X-Original-URI")
    );
    let f = failure(ask("/nowhere", Some(&access)).await.unwrap()).await;
    assert_eq!((f.status, f.msg.as_str()), (403, "No route"));
    assert_eq!(ask("/public/x", None).await.unwrap().status(), 200);
    // Encoded tricks are canonicalised like proxied paths: /public/../private is /private.
    assert_eq!(
        ask("/public/%2e%2e/private/x", None)
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(t.upstream.hits(), 0, "the verify endpoint forwards nothing");

    // Turned off, the path is routed like any other.
    let u = Stack::start_with(|o| o.forward_auth.enabled = false).await;
    let resp =
        u.gw.client
            .get(u.gw.url("/_keycard/verify"))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 404);
}
