//! Reloading the config without a restart: under traffic, public to required, invalid files,
//! restart-only keys, SIGHUP-style triggers, the Kubernetes ConfigMap symlink swap, and SIGHUP
//! on the real binary.

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::*;

/// `keycard_config_reloads_total{result}` as the admin listener reports it.
async fn reloads(admin_url: &str, result: &str) -> u64 {
    let text = http_client()
        .get(admin_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let needle = format!("keycard_config_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Waits (bounded) until the reload counter for `result` reaches `n`.
async fn wait_reloads(gw: &Gateway, result: &str, n: u64) {
    let url = gw.admin_url("/metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = reloads(&url, result).await;
        if seen >= n {
            assert_eq!(seen, n, "more {result} reloads than expected");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{result} reloads: {seen}, waited for {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A reloadable gateway with one public route, `/docs`, to an echo upstream: (Redis, the
/// upstream, the options its config file was written from, the gateway, the file).
async fn docs_stack() -> (RedisServer, Upstream, GatewayOpts, Gateway, ConfigFile) {
    let redis = RedisServer::new();
    let up = Upstream::start().await;
    let opts = opts_with(&redis, vec![route("/docs", &up.url(), "public")]);
    let (gw, file) = Gateway::start_reloadable(opts.clone()).await;
    (redis, up, opts, gw, file)
}

fn opts_with(redis: &RedisServer, routes: Vec<RouteConfig>) -> GatewayOpts {
    let mut opts = GatewayOpts::new(&redis.url(), "http://127.0.0.1:9");
    opts.routes = routes;
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_an_upstream_under_traffic_fails_no_request() {
    let redis = RedisServer::new();
    let (a, b) = (Upstream::start().await, Upstream::start().await);
    let mut opts = opts_with(&redis, vec![route("/api", &a.url(), "required")]);
    let (gw, file) = Gateway::start_reloadable(opts.clone()).await;
    let (token, _) = gw.user("alice").await;

    // Four clients, each at most 2,000 requests or until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let gw = Arc::new(gw);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (gw, token, stop) = (gw.clone(), token.clone(), stop.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..2000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    statuses.push(gw.get("/api/x", Some(&token)).await.status().as_u16());
                }
                statuses
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    opts.routes = vec![route("/api", &b.url(), "required")];
    file.write(&opts.to_toml());
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.hits() == 0 {
        assert!(
            Instant::now() < deadline,
            "the new upstream never got traffic"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for client in clients {
        statuses.extend(client.await.unwrap());
    }
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert_eq!(failed, 0, "{failed} of {} requests failed", statuses.len());
    let before = a.hits();
    assert!(before > 0 && b.hits() > 0, "a {before}, b {}", b.hits());
    // Everything after the swap goes to the new upstream.
    assert_eq!(gw.get("/api/y", Some(&token)).await.status(), 200);
    assert_eq!(a.hits(), before);
    wait_reloads(&gw, "ok", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_changed_from_public_to_required_needs_a_token_on_the_next_request() {
    let (_redis, up, mut opts, gw, file) = docs_stack().await;
    assert_eq!(gw.get("/docs/x", None).await.status(), 200);
    opts.routes = vec![route("/docs", &up.url(), "required")];
    file.write(&opts.to_toml());
    wait_reloads(&gw, "ok", 1).await;
    let f = failure(gw.get("/docs/x", None).await).await;
    assert_eq!(
        (f.status, f.msg.as_str()),
        (401, "Missing Authorization Header")
    );
    let (token, _) = gw.user("bob").await;
    let echo = Echo::from_response(gw.get("/docs/x", Some(&token)).await).await;
    assert_eq!(echo.values("x-auth-user"), ["bob"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_rejected_and_the_running_config_stays() {
    let (_redis, up, mut opts, gw, file) = docs_stack().await;
    let stamp = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("keycard_config_last_reload_success_timestamp_seconds "))
            .map(|v| v.trim().to_owned())
    };
    let before = stamp(&gw.metrics().await);
    assert!(before.is_some(), "the timestamp is set at startup");

    // Two errors in one file (an unknown key and a bad auth mode): both are rejected at once.
    opts.routes = vec![route("/docs", &up.url(), "required")];
    let text = opts
        .to_toml()
        .replace("auth = \"required\"", "auth = \"sometimes\"");
    file.write(&format!("bogus_key = 1\n{text}"));
    wait_reloads(&gw, "error", 1).await;
    assert_eq!(
        gw.get("/docs/x", None).await.status(),
        200,
        "old config still in force"
    );
    let after = stamp(&gw.metrics().await);
    assert_eq!(before, after);

    // Not TOML at all.
    file.write("[[routes]\npath = ");
    wait_reloads(&gw, "error", 2).await;
    assert_eq!(gw.get("/docs/x", None).await.status(), 200);

    // A good file again applies.
    opts.routes = vec![route("/docs", &up.url(), "required")];
    file.write(&opts.to_toml());
    wait_reloads(&gw, "ok", 1).await;
    assert_eq!(gw.get("/docs/x", None).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_only_keys_are_kept_while_the_rest_of_the_reload_applies() {
    let (store, up, mut opts, gw, file) = docs_stack().await;
    // A new listen address, store prefix and connection cap, and a route change.
    opts.store.prefix = "other:".into();
    opts.server.max_connections = 1;
    opts.routes = vec![route("/docs", &up.url(), "required")];
    let text = opts
        .to_toml()
        .replace("listen = \"127.0.0.1:1\"", "listen = \"127.0.0.1:3\"");
    file.write(&text);
    wait_reloads(&gw, "ok", 1).await;
    // The route change applied, on the listener keycard already had...
    assert_eq!(gw.get("/docs/x", None).await.status(), 401);
    // ...the store prefix did not change (a new user still goes under the running one)...
    gw.register("carol", PASSWORD).await;
    let exists: bool = store
        .query(redis::cmd("EXISTS").arg("keycard:user:carol"))
        .await;
    assert!(exists, "users still go to the running prefix");
    // ...and max_connections = 1 did not apply: two connections at once are both served.
    let both = async { tokio::join!(gw.get("/docs/x", None), gw.get("/docs/y", None)) };
    let (r1, r2) = tokio::time::timeout(Duration::from_secs(3), both)
        .await
        .expect("a second connection waited: max_connections changed without a restart");
    assert_eq!((r1.status().as_u16(), r2.status().as_u16()), (401, 401));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_counters_start_at_zero_and_a_file_written_in_pieces_is_loaded_once() {
    let (_redis, up, mut opts, gw, file) = docs_stack().await;
    // Both series exist from the start, so an alert on their increase sees the first error.
    let text = gw.metrics().await;
    for result in ["ok", "error"] {
        let line = format!("keycard_config_reloads_total{{result=\"{result}\"}} 0");
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    // Rewritten in place, in two writes: the first is valid TOML on its own (everything
    // public), the second adds the protected route. Only the finished file is loaded.
    opts.routes = vec![
        route("/docs", &up.url(), "public"),
        route("/secret", &up.url(), "required"),
    ];
    let full = opts.to_toml();
    let cut = full.find("\n[[routes]]\npath = \"/secret\"").unwrap();
    std::fs::write(&file.path, &full[..cut]).unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    std::fs::write(&file.path, &full).unwrap();
    wait_reloads(&gw, "ok", 1).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    wait_reloads(&gw, "ok", 1).await;
    assert_eq!(gw.get("/secret/x", None).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_reloads_even_when_the_file_did_not_change() {
    // The upstream and Redis must live to the end too, so bind them.
    let (_redis, _up, _, gw, file) = docs_stack().await;
    file.hup().await;
    wait_reloads(&gw, "ok", 1).await;
    file.hup().await;
    wait_reloads(&gw, "ok", 2).await;
    assert_eq!(gw.get("/docs/x", None).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_symlink_swap_is_picked_up() {
    // Kubernetes mounts a ConfigMap as dir/keycard.toml -> ..data/keycard.toml, with
    // ..data -> ..<timestamp>/; an update writes a new timestamped folder and swaps ..data.
    use std::os::unix::fs::symlink;
    let (_redis, up, mut opts, gw, file) = docs_stack().await;
    let dir = &file.dir;
    let v1 = dir.join("..2026_11_30_v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("keycard.toml"), opts.to_toml()).unwrap();
    symlink("..2026_11_30_v1", dir.join("..data")).unwrap();
    std::fs::remove_file(&file.path).unwrap();
    symlink("..data/keycard.toml", &file.path).unwrap();
    // Same content behind a new inode: one reload, nothing changes.
    wait_reloads(&gw, "ok", 1).await;
    assert_eq!(gw.get("/docs/x", None).await.status(), 200);

    let v2 = dir.join("..2026_11_30_v2");
    std::fs::create_dir(&v2).unwrap();
    opts.routes = vec![route("/docs", &up.url(), "required")];
    std::fs::write(v2.join("keycard.toml"), opts.to_toml()).unwrap();
    symlink("..2026_11_30_v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    wait_reloads(&gw, "ok", 2).await;
    assert_eq!(gw.get("/docs/x", None).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reloads_on_sighup_and_on_a_file_change() {
    let up = Upstream::start().await;
    let dir = std::env::temp_dir().join(format!("keycard-bin-reload-{}", random_jti()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keycard.toml");
    let mut opts = GatewayOpts::new("memory://", &up.url());
    opts.routes = vec![route("/docs", &up.url(), "public")];
    let (port, admin_port) = (free_port(), free_port());
    let write = |opts: &GatewayOpts| {
        let text = opts
            .to_toml()
            .replace("127.0.0.1:1\"", &format!("127.0.0.1:{port}\""))
            .replace("127.0.0.1:2\"", &format!("127.0.0.1:{admin_port}\""));
        let tmp = dir.join("tmp.toml");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    write(&opts);
    let mut child = Command::new(env!("CARGO_BIN_EXE_keycard"))
        .arg("--config")
        .arg(&path)
        .env("KEYCARD_SECRET", SECRET)
        .env("KEYCARD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(self.0.to_string())
                .status();
        }
    }
    let _kill = Kill(child.id());
    let client = http_client();
    let admin = format!("http://127.0.0.1:{admin_port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.get(&admin).send().await.is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "keycard exited (port taken?)"
        );
        assert!(Instant::now() < deadline, "binary never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sighup = || {
        let ok = Command::new("kill")
            .arg("-HUP")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    };
    let wait_ok = |n: u64| {
        let admin = admin.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            while reloads(&admin, "ok").await < n {
                assert!(Instant::now() < deadline, "no reload {n}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    sighup();
    wait_ok(1).await;
    let docs = format!("http://127.0.0.1:{port}/docs/x");
    assert_eq!(client.get(&docs).send().await.unwrap().status(), 200);
    // A file change alone (the binary polls every 2 s).
    opts.routes = vec![route("/docs", &up.url(), "required")];
    write(&opts);
    wait_ok(2).await;
    assert_eq!(client.get(&docs).send().await.unwrap().status(), 401);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
