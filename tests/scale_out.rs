//! Scale-out (issue 9): keycard on a Redis Cluster (`redis+cluster://`), a cluster master
//! failing over under it, and several keycard processes sharing one Redis.
//!
//! Real redis-server processes (cluster mode or not), real upstream, real gateways (in-process
//! or the binary), over HTTP on 127.0.0.1 only. Every wait is bounded.

mod support;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde_json::json;
use support::*;

/// The `keycard` binary as its own process, on its own config file and free loopback ports;
/// killed (SIGKILL) and its folder removed on drop. For what one process cannot show: several
/// gateways sharing a store. (Here, not in the kit: `examples/` include the kit, and only
/// integration tests know where the binary is.)
struct KeycardProcess {
    addr: SocketAddr,
    admin: SocketAddr,
    client: reqwest::Client,
    child: Child,
    dir: std::path::PathBuf,
}

impl KeycardProcess {
    /// Starts `keycard --config FILE` with `opts` and waits (bounded) for `/healthz`. A port
    /// that was free a moment ago may be taken before keycard binds it; then it tries again
    /// with new ones.
    async fn start(opts: &GatewayOpts) -> KeycardProcess {
        let dir = std::env::temp_dir().join(format!("keycard-proc-{}", random_jti()));
        std::fs::create_dir_all(&dir).expect("create the process's folder");
        let path = dir.join("keycard.toml");
        let client = http_client();
        for attempt in 1..=5 {
            let (port, admin_port) = (free_port(), free_port());
            let toml = opts
                .to_toml()
                .replace("127.0.0.1:1\"", &format!("127.0.0.1:{port}\""))
                .replace("127.0.0.1:2\"", &format!("127.0.0.1:{admin_port}\""));
            std::fs::write(&path, toml).expect("write the config");
            let mut child = Command::new(env!("CARGO_BIN_EXE_keycard"))
                .arg("--config")
                .arg(&path)
                .env_remove("KEYCARD_CONFIG")
                .env_remove("KEYCARD_LOG_FORMAT")
                .env("KEYCARD_SECRET", SECRET)
                .env("KEYCARD_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn keycard");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let r = client
                    .get(format!("http://127.0.0.1:{admin_port}/healthz"))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                if matches!(&r, Ok(resp) if resp.status() == 200) {
                    return KeycardProcess {
                        addr: ([127, 0, 0, 1], port).into(),
                        admin: ([127, 0, 0, 1], admin_port).into(),
                        client,
                        child,
                        dir,
                    };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut stderr) = child.stderr.take() {
                        let _ = stderr.read_to_string(&mut err);
                    }
                    if err.contains("cannot listen") && attempt < 5 {
                        break;
                    }
                    panic!("keycard exited early ({status}):\n{err}");
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("keycard never answered /healthz within 15s: {r:?}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("keycard could not bind free ports in 5 attempts");
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for KeycardProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A gateway's base URL and a client: the same calls for an in-process [`Gateway`] and a
/// [`KeycardProcess`].
struct Http {
    client: reqwest::Client,
    base: String,
}

impl Http {
    fn of(gw: &Gateway) -> Http {
        Http {
            client: gw.client.clone(),
            base: gw.url(""),
        }
    }

    fn of_process(p: &KeycardProcess) -> Http {
        Http {
            client: p.client.clone(),
            base: p.url(""),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> reqwest::Response {
        req.send()
            .await
            .unwrap_or_else(|e| panic!("{what} on {}: {e}", self.base))
    }

    async fn register(&self, user: &str) -> u16 {
        let req = self.client.post(format!("{}/register", self.base));
        let body = json!({ "username": user, "password": PASSWORD });
        self.send(req.json(&body), "POST /register")
            .await
            .status()
            .as_u16()
    }

    async fn login_raw(&self, user: &str, password: &str) -> reqwest::Response {
        let req = self.client.post(format!("{}/login", self.base));
        let body = json!({ "username": user, "password": password });
        self.send(req.json(&body), "POST /login").await
    }

    /// Logs in, asserting 200: (access, refresh).
    async fn login(&self, user: &str) -> (String, String) {
        let (status, body) = json_body(self.login_raw(user, PASSWORD).await).await;
        assert_eq!(status, 200, "login {user} on {}: {body}", self.base);
        let field = |k: &str| body[k].as_str().unwrap_or_default().to_owned();
        (field("access_token"), field("refresh_token"))
    }

    async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        let req = self.client.get(format!("{}{path}", self.base));
        self.send(req.bearer_auth(token), "GET").await
    }

    async fn logout(&self, token: &str, all: bool) -> u16 {
        let path = if all { "/logout?all=true" } else { "/logout" };
        let req = self.client.delete(format!("{}{path}", self.base));
        self.send(req.bearer_auth(token), "DELETE /logout")
            .await
            .status()
            .as_u16()
    }

    async fn refresh(&self, token: &str) -> reqwest::Response {
        let req = self.client.post(format!("{}/refresh", self.base));
        self.send(req.bearer_auth(token), "POST /refresh").await
    }
}

/// A proxied request with `token` reaches the upstream as `user`.
async fn assert_passes(gw: &Http, token: &str, user: &str) {
    let resp = gw.get("/api/scale", token).await;
    assert_eq!(resp.status(), 200, "proxied request as {user}");
    let echo = Echo::from_response(resp).await;
    assert_eq!(echo.values("x-auth-user"), [user], "identity header");
}

fn jti(token: &str) -> String {
    decode_claims(token)["jti"]
        .as_str()
        .expect("token has a jti")
        .to_owned()
}

/// The whole contract flow against a 3-master Redis Cluster, the key layout as the cluster
/// sees it (user keys in the slot of their `{user}` tag), an operator's `redis-cli -c`
/// revocation, and `keycard user list` scanning every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_flow_runs_on_a_redis_cluster() {
    let cluster = RedisCluster::new(0, 5000);
    let upstream = Upstream::start().await;
    let mut opts = GatewayOpts::new(&cluster.url(), &upstream.url());
    opts.throttle.user_limit = 3;
    opts.throttle.address_limit = 1000;
    let gw = Gateway::start(opts).await;
    let http = Http::of(&gw);

    let ready = gw.client.get(gw.admin_url("/readyz")).send().await;
    assert_eq!(
        ready.map(|r| r.status().as_u16()).ok(),
        Some(200),
        "/readyz"
    );

    // Register (and a name taken), log in, a proxied request as alice.
    assert_eq!(http.register("alice").await, 201);
    assert_eq!(
        http.register("Alice").await,
        409,
        "names are case-insensitive"
    );
    let (access, refresh) = http.login("alice").await;
    assert_passes(&http, &access, "alice").await;

    // A wrong password is 401; a user's limit of failures throttles even the right one.
    assert_eq!(http.register("bob").await, 201);
    for _ in 0..3 {
        let f = failure(http.login_raw("bob", "wrong password!").await).await;
        assert_eq!(
            (f.status, f.msg.as_str()),
            (401, "Bad username or password")
        );
    }
    let resp = http.login_raw("bob", PASSWORD).await;
    assert_eq!(resp.status(), 429, "throttled after the limit");
    assert!(resp.headers().contains_key("retry-after"));
    // bob's refusal gave back the address's reservation (a separate call on a cluster):
    // nothing is left in flight for this address.
    let pending = cluster.cli(&["GET", "keycard:throttle:pending:addr:{127.0.0.1}"]);
    assert_eq!(pending.trim(), "", "address reservation given back");
    http.login("alice").await;

    // Refresh rotates; the used refresh token is refused.
    let (status, body) = json_body(http.refresh(&refresh).await).await;
    assert_eq!(status, 200, "{body}");
    let refreshed = body["access_token"].as_str().unwrap_or_default().to_owned();
    assert_passes(&http, &refreshed, "alice").await;
    assert_revoked(http.refresh(&refresh).await, "a rotated refresh token").await;

    // Logout: the token is refused at once.
    let (access, _) = http.login("alice").await;
    assert_eq!(http.logout(&access, false).await, 200);
    assert_revoked(http.get("/api/scale", &access).await, "after logout").await;

    // /logout?all=true ends the other sessions; a new login works at once.
    let (one, _) = http.login("alice").await;
    let (two, _) = http.login("alice").await;
    assert_eq!(http.logout(&one, true).await, 200);
    assert_revoked(http.get("/api/scale", &two).await, "other session").await;
    let (fresh, _) = http.login("alice").await;
    assert_passes(&http, &fresh, "alice").await;

    // An operator revokes by hand with redis-cli in cluster mode: the next request is 401.
    let key = format!("keycard:revoked:{}", jti(&fresh));
    assert_eq!(cluster.cli(&["SET", &key, "1", "EX", "600"]).trim(), "OK");
    assert_revoked(
        http.get("/api/scale", &fresh).await,
        "revoked with redis-cli",
    )
    .await;

    // The layout: each of alice's keys exists under its `{alice}` tag, in alice's slot; the
    // untagged (standalone) names do not exist here.
    let slot = cluster.keyslot("alice");
    for key in [
        "keycard:user:{alice}",
        "keycard:generation:{alice}",
        "keycard:throttle:user:{bob}",
    ] {
        assert_eq!(cluster.cli(&["EXISTS", key]).trim(), "1", "{key} exists");
        let tag = if key.contains("bob") { "bob" } else { "alice" };
        assert_eq!(
            cluster.keyslot(key),
            cluster.keyslot(tag),
            "{key} in its tag's slot"
        );
    }
    assert_eq!(cluster.keyslot("keycard:user:{alice}"), slot);
    assert_eq!(cluster.cli(&["EXISTS", "keycard:user:alice"]).trim(), "0");

    // Users on every master: `keycard user list` scans them all.
    let names: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    for name in &names {
        assert_eq!(http.register(name).await, 201, "{name}");
    }
    let masters: std::collections::HashSet<u16> = names
        .iter()
        .filter_map(|n| cluster.master_of(cluster.keyslot(n)))
        .collect();
    assert_eq!(masters.len(), 3, "the users are spread over all 3 masters");
    let dir = std::env::temp_dir().join(format!("keycard-scale-{}", random_jti()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("keycard.toml");
    std::fs::write(&config, gw.opts.to_toml()).expect("write config");
    let mut list = Command::new(env!("CARGO_BIN_EXE_keycard"));
    list.arg("--config")
        .arg(&config)
        .args(["user", "list"])
        .env_remove("KEYCARD_CONFIG")
        .env("KEYCARD_SECRET", SECRET)
        .env("KEYCARD_LOG", "error");
    let (ok, out, err) = run_within(&mut list, Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "keycard user list failed:\n{out}\n{err}");
    let listed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in names.iter().map(String::as_str).chain(["alice", "bob"]) {
        assert!(listed.contains(&name), "{name} not listed:\n{out}");
    }
    assert_eq!(listed.len(), names.len() + 2, "each user once:\n{out}");
}

/// Two keycard processes on one Redis: a token issued by one is honoured by the other, and a
/// logout on one is refused by the other on the very next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_redis() {
    let redis = RedisServer::new();
    let upstream = Upstream::start().await;
    let opts = GatewayOpts::new(&redis.url(), &upstream.url());
    let a = KeycardProcess::start(&opts).await;
    let b = KeycardProcess::start(&opts).await;
    for p in [&a, &b] {
        let ready = p
            .client
            .get(format!("http://{}/readyz", p.admin))
            .send()
            .await;
        assert_eq!(
            ready.map(|r| r.status().as_u16()).ok(),
            Some(200),
            "/readyz"
        );
    }
    let (a, b) = (Http::of_process(&a), Http::of_process(&b));

    assert_eq!(a.register("carol").await, 201);
    assert_eq!(b.register("carol").await, 409, "B sees A's user");
    let (access, refresh) = b.login("carol").await;
    assert_passes(&a, &access, "carol").await;
    assert_passes(&b, &access, "carol").await;

    assert_eq!(b.logout(&access, false).await, 200);
    assert_revoked(
        a.get("/api/scale", &access).await,
        "A, right after B's logout",
    )
    .await;

    // A session ended everywhere from one of them: `/logout?all=true` on A ends B's refresh.
    let (other, _) = a.login("carol").await;
    assert_eq!(a.logout(&other, true).await, 200);
    assert_revoked(
        b.refresh(&refresh).await,
        "B's refresh after A's logout all",
    )
    .await;
    let (fresh, _) = b.login("carol").await;
    assert_passes(&a, &fresh, "carol").await;

    // With both revocation caches on (two tracking connections), and A's answer for the
    // token cached: B's logout still reaches A's very next request, round after round.
    for _ in 0..100 {
        let list = redis_cli(redis.port(), false, &["CLIENT", "LIST"]);
        if list.lines().filter(|l| l.contains(" flags=t")).count() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for round in 0..20 {
        let (access, _) = b.login("carol").await;
        assert_passes(&a, &access, "carol").await;
        assert_passes(&a, &access, "carol").await;
        assert_eq!(b.logout(&access, false).await, 200);
        assert_revoked(
            a.get("/api/scale", &access).await,
            &format!("round {round}"),
        )
        .await;
    }
}

/// A master of a 3+3 cluster dies: its replica is promoted (`cluster-node-timeout` 1 s) and
/// the flow works again for a user whose keys lived on it; a revocation written before the
/// failover still holds after it. Requests during the failover may get 503, never a pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_fails_over_and_the_flow_resumes() {
    let mut cluster = RedisCluster::new(1, 1000);
    let upstream = Upstream::start().await;
    let opts = GatewayOpts::new(&cluster.url(), &upstream.url());
    let gw = Gateway::start(opts).await;
    let http = Http::of(&gw);

    assert_eq!(http.register("dave").await, 201);
    let (before, _) = http.login("dave").await;
    let (ended, _) = http.login("dave").await;
    // Ends `before` through dave's generation key, which lives on the master that dies.
    assert_eq!(http.logout(&ended, true).await, 200);
    assert_revoked(http.get("/api/scale", &before).await, "before the failover").await;

    let slot = cluster.keyslot("keycard:user:{dave}");
    let master = cluster.master_of(slot).expect("dave's slot has a master");
    // Replication is asynchronous: make sure the replica has dave's keys before the master
    // dies, as a failover test of keycard (not of Redis's durability) needs.
    let acked = redis_cli(master, false, &["WAIT", "1", "5000"]);
    assert_eq!(acked.trim(), "1", "the replica acknowledged the writes");
    cluster.kill(master);

    let deadline = Instant::now() + Duration::from_secs(30);
    let promoted = loop {
        match cluster.master_of(slot) {
            Some(port) if port != master => break port,
            _ => {}
        }
        assert!(Instant::now() < deadline, "no replica promoted within 30s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    cluster.wait_ok(&cluster.ports(), Duration::from_secs(20));

    // Until keycard's cluster client has caught up a request may fail (503), never pass.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (access, _) = loop {
        let resp = http.login_raw("dave", PASSWORD).await;
        let status = resp.status().as_u16();
        if status == 200 {
            let (_, body) = json_body(resp).await;
            let field = |k: &str| body[k].as_str().unwrap_or_default().to_owned();
            break (field("access_token"), field("refresh_token"));
        }
        assert_eq!(status, 503, "during the failover: only 503");
        assert!(
            Instant::now() < deadline,
            "login never worked after the failover to {promoted}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_passes(&http, &access, "dave").await;
    assert_revoked(http.get("/api/scale", &before).await, "after the failover").await;
    assert_eq!(http.logout(&access, false).await, 200);
    assert_revoked(
        http.get("/api/scale", &access).await,
        "logout after failover",
    )
    .await;
    let ready = gw.client.get(gw.admin_url("/readyz")).send().await;
    assert_eq!(
        ready.map(|r| r.status().as_u16()).ok(),
        Some(200),
        "/readyz"
    );
}

/// keycard starts while its cluster is still being set up (nodes up, no slots served): it
/// answers 503 for anything that needs the store, and works once the cluster is joined,
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_before_its_cluster_works_once_the_cluster_is_up() {
    let cluster = RedisCluster::unjoined(3, 5000);
    let upstream = Upstream::start().await;
    let gw = Gateway::start(GatewayOpts::new(&cluster.url(), &upstream.url())).await;
    let http = Http::of(&gw);
    let ready = gw.client.get(gw.admin_url("/readyz")).send().await;
    assert_eq!(
        ready.map(|r| r.status().as_u16()).ok(),
        Some(503),
        "/readyz"
    );
    let f = failure(http.login_raw("erin", PASSWORD).await).await;
    assert_eq!(
        (f.status, f.msg.as_str()),
        (503, "Authentication store unavailable")
    );

    cluster.join(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = gw.client.get(gw.admin_url("/readyz")).send().await;
        if ready.map(|r| r.status().as_u16()).ok() == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never 200 after the join"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http.register("erin").await, 201);
    let (access, _) = http.login("erin").await;
    assert_passes(&http, &access, "erin").await;
}
