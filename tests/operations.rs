//! Operating keycard: store outages and timeouts (fail closed, recover without restart), the
//! admin listener, graceful shutdown, config validation, and the binary itself
//! (`keycard check`, `--config`/`KEYCARD_CONFIG`, SIGTERM, JSON logs).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keycard::config::{Config, ConfigErrors, ExposeSecret};
use support::*;

// ----------------------------------------------------------------------------- store

async fn poll_until_ok(gw: &Gateway, token: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let resp = gw
            .client
            .get(gw.url("/private/poll"))
            .bearer_auth(token)
            .timeout(Duration::from_secs(3))
            .send()
            .await;
        if matches!(&resp, Ok(r) if r.status() == 200) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "protected route did not recover within {limit:?}: {resp:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_with_503_and_recovers_without_restart() {
    let mut s = Stack::start().await;
    let (access, _) = s.gw.user("alice").await;
    assert_eq!(s.gw.get("/private/a", Some(&access)).await.status(), 200);
    let hits = s.upstream.hits();

    s.redis.stop();

    let started = Instant::now();
    let f = failure(s.gw.get("/private/a", Some(&access)).await).await;
    assert_eq!(f.status, 503, "{f:?}");
    assert_eq!(f.msg, "Authentication store unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "503 took {:?}",
        started.elapsed()
    );
    assert_eq!(
        s.upstream.hits(),
        hits,
        "never forwarded while the store is down"
    );

    let f = failure(s.gw.login_raw("alice", PASSWORD).await).await;
    assert_eq!(f.status, 503, "login: {f:?}");
    let f = failure(s.gw.register("newbie", PASSWORD).await).await;
    assert_eq!(f.status, 503, "register: {f:?}");
    let resp =
        s.gw.client
            .delete(s.gw.url("/logout"))
            .bearer_auth(&access)
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 503, "logout cannot revoke without the store");
    let ready =
        s.gw.client
            .get(s.gw.admin_url("/readyz"))
            .send()
            .await
            .unwrap();
    assert_eq!(ready.status(), 503);
    let health =
        s.gw.client
            .get(s.gw.admin_url("/healthz"))
            .send()
            .await
            .unwrap();
    assert_eq!(
        health.status(),
        200,
        "liveness does not depend on the store"
    );

    s.redis.start();

    poll_until_ok(&s.gw, &access, Duration::from_secs(10)).await;
    let ready =
        s.gw.client
            .get(s.gw.admin_url("/readyz"))
            .send()
            .await
            .unwrap();
    assert_eq!(ready.status(), 200);
    // The restarted Redis is empty: registering works again.
    assert_eq!(s.gw.register("alice", PASSWORD).await.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_store_answers_503_within_store_timeout() {
    let s = Stack::start_with(|o| o.store.timeout = Duration::from_millis(300)).await;
    let (access, _) = s.gw.user("bob").await;
    assert_eq!(s.gw.get("/private", Some(&access)).await.status(), 200);
    let hits = s.upstream.hits();

    // Redis stops answering every client for 3 s, as a hung server would.
    let () = s
        .redis
        .query(redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("ALL"))
        .await;
    let started = Instant::now();
    let f = failure(s.gw.get("/private", Some(&access)).await).await;
    let took = started.elapsed();
    assert_eq!(f.status, 503, "{f:?}");
    assert_eq!(f.msg, "Authentication store unavailable");
    assert!(took < Duration::from_millis(1500), "503 after {took:?}");
    assert_eq!(s.upstream.hits(), hits);

    poll_until_ok(&s.gw, &access, Duration::from_secs(10)).await;
}

// ----------------------------------------------------------------------------- admin

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_serves_health_readiness_and_metrics() {
    let s = Stack::start().await;
    let (access, _) = s.gw.user("carol").await;
    assert_eq!(s.gw.get("/private", Some(&access)).await.status(), 200);

    let resp =
        s.gw.client
            .get(s.gw.admin_url("/healthz"))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    let resp =
        s.gw.client
            .get(s.gw.admin_url("/readyz"))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);

    let resp =
        s.gw.client
            .get(s.gw.admin_url("/metrics"))
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(
        ct.starts_with("text/plain") || ct.starts_with("application/openmetrics-text"),
        "metrics content-type {ct:?}"
    );
    let text = resp.text().await.unwrap();
    assert!(text.contains("keycard_"), "no keycard_ metric in:\n{text}");
    let build_info = format!(
        "keycard_build_info{{version=\"{}\",revision=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        keycard::REVISION
    );
    assert!(text.contains(&build_info), "no {build_info} in:\n{text}");
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(
            value.parse::<f64>().is_ok() || line.split(' ').count() >= 3,
            "not Prometheus text: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_are_not_on_the_public_listener() {
    let s = Stack::start().await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let f = failure(s.gw.get(path, None).await).await;
        assert_eq!((f.status, f.msg.as_str()), (404, "No route"), "{path}");
    }
}

// ----------------------------------------------------------------------------- shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests_and_refuses_new_ones() {
    let mut s = Stack::start_with(|o| o.server.shutdown_timeout = Duration::from_secs(10)).await;
    let client = s.gw.client.clone();
    let url = s.gw.url("/public/slow");
    let in_flight = tokio::spawn(async move { client.get(url).send().await });
    // Let the request reach the upstream (which holds it for 3 s).
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.upstream.hits() == 0 {
        assert!(
            Instant::now() < deadline,
            "slow request never reached upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.gw.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A new connection is not served while draining.
    let fresh = http_client();
    let late = fresh
        .get(s.gw.url("/public/late"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(
        !matches!(&late, Ok(r) if r.status().is_success()),
        "a new request was served after shutdown began: {late:?}"
    );

    let resp = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("in-flight request finished")
        .unwrap()
        .expect("in-flight request completed, not cut off");
    let echo = Echo::from_response(resp).await;
    assert_eq!(echo.path, "/public/slow");

    s.gw.wait_stopped(Duration::from_secs(10))
        .await
        .expect("run returns Ok after draining");
    let connect = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(s.gw.addr),
    )
    .await;
    assert!(
        !matches!(connect, Ok(Ok(_))),
        "listener still accepting after run returned"
    );
    assert!(
        s.upstream
            .requests()
            .iter()
            .all(|r| r.path != "/public/late")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drain_is_bounded_by_shutdown_timeout() {
    let mut s = Stack::start_with(|o| o.server.shutdown_timeout = Duration::from_secs(1)).await;
    let client = s.gw.client.clone();
    let url = s.gw.url("/public/slow");
    let _in_flight = tokio::spawn(async move { client.get(url).send().await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.upstream.hits() == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    s.gw.begin_shutdown();
    let _ = s.gw.wait_stopped(Duration::from_secs(10)).await;
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "drain took {:?} with a 1 s shutdown_timeout",
        started.elapsed()
    );
}

// ----------------------------------------------------------------------------- config

fn parse(toml: &str) -> Result<Config, ConfigErrors> {
    Config::parse(toml, Path::new("t.toml"), &env)
}

fn base_toml() -> String {
    GatewayOpts::new("memory://", "http://127.0.0.1:9").to_toml()
}

fn error_keys(e: &ConfigErrors) -> Vec<String> {
    e.errors.iter().map(|e| e.key.clone()).collect()
}

#[test]
fn config_parses_documented_keys_and_durations() {
    let mut opts = GatewayOpts::new("redis://127.0.0.1:6379/0", "http://127.0.0.1:3000");
    opts.store.prefix = "kc:".into();
    opts.store.timeout = Duration::from_millis(500);
    opts.tokens.access_ttl = Duration::from_secs(900);
    opts.tokens.refresh_ttl = Duration::from_secs(604800);
    opts.tokens.leeway = Duration::from_secs(2);
    opts.server.trusted_proxies = vec![
        "10.0.0.0/8".parse().unwrap(),
        "127.0.0.1/32".parse().unwrap(),
    ];
    opts.routes[0].timeout = Duration::from_millis(500);
    let c = parse(&opts.to_toml()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.store.prefix, "kc:");
    assert_eq!(c.store.timeout, Duration::from_millis(500));
    assert_eq!(c.tokens.access_ttl, Duration::from_secs(900));
    assert_eq!(c.tokens.refresh_ttl, Duration::from_secs(7 * 86400));
    assert_eq!(c.tokens.leeway, Duration::from_secs(2));
    assert_eq!(c.tokens.secret.expose_secret(), SECRET.as_bytes());
    assert_eq!(c.tokens.issuer, "keycard");
    assert_eq!(c.server.trusted_proxies.len(), 2);
    assert_eq!(c.passwords.memory_kib, 64);
    assert_eq!(c.routes.len(), 6);
    assert_eq!(c.routes[0].timeout, Duration::from_millis(500));
    assert!(c.routes[4].forward_token);
    assert!(c.routes[5].strip_prefix);
    assert_eq!(c.routes[1].auth, keycard::config::AuthMode::Public);
    assert_eq!(c.identity.user_header.as_str(), "x-auth-user");
    assert!(
        !format!("{c:?}").contains(SECRET),
        "Debug must not print the secret"
    );
}

#[test]
fn config_defaults_match_the_contract() {
    let toml = "[server]\nlisten = \"127.0.0.1:8080\"\n[admin]\nlisten = \"127.0.0.1:9901\"\n\
                [store]\nurl = \"memory://\"\n[tokens]\nsecret = \"${KEYCARD_SECRET}\"\n\
                [[routes]]\npath = \"/\"\nupstream = \"http://127.0.0.1:3000\"\n";
    let c = parse(toml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.store.prefix, "keycard:");
    assert_eq!(c.tokens.algorithm, jsonwebtoken::Algorithm::HS256);
    assert_eq!(c.tokens.issuer, "keycard");
    assert_eq!(c.tokens.access_ttl, Duration::from_secs(15 * 60));
    assert_eq!(c.tokens.refresh_ttl, Duration::from_secs(7 * 86400));
    assert_eq!(c.tokens.leeway, Duration::ZERO);
    assert_eq!(c.routes[0].auth, keycard::config::AuthMode::Required);
    assert!(!c.routes[0].strip_prefix && !c.routes[0].forward_token);
    assert!(c.server.trusted_proxies.is_empty());
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.identity.user_header.as_str(), "x-auth-user");
}

#[test]
fn config_missing_env_var_is_an_error_naming_the_key() {
    let e = Config::parse(&base_toml(), Path::new("t.toml"), &|_| None)
        .expect_err("missing ${KEYCARD_SECRET} must fail");
    assert!(error_keys(&e).iter().any(|k| k == "tokens.secret"), "{e}");
    assert!(e.to_string().contains("KEYCARD_SECRET"), "{e}");
}

#[test]
fn config_short_secret_is_an_error() {
    let toml = base_toml().replace("\"${KEYCARD_SECRET}\"", &format!("\"{}\"", "s".repeat(31)));
    let e = parse(&toml).expect_err("31-byte secret must fail");
    assert!(error_keys(&e).iter().any(|k| k == "tokens.secret"), "{e}");
    let toml = base_toml().replace("\"${KEYCARD_SECRET}\"", &format!("\"{}\"", "s".repeat(32)));
    parse(&toml).unwrap_or_else(|e| panic!("32-byte secret is enough: {e}"));
}

#[test]
fn config_unknown_keys_are_errors() {
    let toml = base_toml().replace("[server]\n", "[server]\nbogus_key = 1\n");
    let e = parse(&toml).expect_err("unknown key must fail");
    assert!(e.to_string().contains("bogus_key"), "{e}");
    let toml = format!("{}\n[mystery]\nx = 1\n", base_toml());
    let e = parse(&toml).expect_err("unknown table must fail");
    assert!(e.to_string().contains("mystery"), "{e}");
    let toml = base_toml().replace(
        "auth = \"required\"",
        "auth = \"required\"\ncolour = \"red\"",
    );
    let e = parse(&toml).expect_err("unknown route key must fail");
    assert!(e.to_string().contains("colour"), "{e}");
}

#[test]
fn config_bad_values_are_errors_naming_their_keys_all_at_once() {
    let toml = base_toml()
        .replace("[server]\n", "[server]\nbogus_key = 1\n")
        .replace("memory://", "ftp://127.0.0.1/")
        .replace("access_ttl = \"15m\"", "access_ttl = \"15 parsecs\"")
        .replacen("http://127.0.0.1:9", "not a url", 1)
        .replace("\"${KEYCARD_SECRET}\"", "\"too-short\"");
    let e = parse(&toml).expect_err("bad config");
    let text = e.to_string();
    for needle in [
        "bogus_key",
        "store.url",
        "tokens.access_ttl",
        "upstream",
        "tokens.secret",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    assert!(e.errors.len() >= 5, "{text}");
}

#[test]
fn config_rejects_bad_algorithm_and_route_values() {
    for (from, to, key) in [
        (
            "algorithm = \"HS256\"",
            "algorithm = \"none\"",
            "tokens.algorithm",
        ),
        (
            "algorithm = \"HS256\"",
            "algorithm = \"PS256\"",
            "tokens.algorithm",
        ),
        ("auth = \"required\"", "auth = \"maybe\"", "auth"),
        ("trusted_proxies", "trusted_proxies", "trusted_proxies"),
    ] {
        let toml = if key == "trusted_proxies" {
            base_toml().replace("trusted_proxies = []", "trusted_proxies = [\"not-a-cidr\"]")
        } else {
            base_toml().replacen(from, to, 1)
        };
        let e = parse(&toml).expect_err(key);
        assert!(e.to_string().contains(key), "{key}: {e}");
    }
}

// ----------------------------------------------------------------------------- binary

fn keycard_bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keycard"));
    cmd.env_remove("KEYCARD_CONFIG")
        .env_remove("KEYCARD_LOG")
        .env_remove("KEYCARD_LOG_FORMAT")
        .env("KEYCARD_SECRET", SECRET)
        .stdin(Stdio::null());
    cmd
}

#[test]
fn version_names_the_git_revision() {
    let out = keycard_bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    // Built from a git checkout (as CI is), the revision is HEAD's.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
    assert_eq!(
        text.trim(),
        format!("keycard {} ({head})", env!("CARGO_PKG_VERSION"))
    );
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keycard-test-{}", random_jti()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs a command to completion, bounded to 30 s.
fn run_bounded(cmd: &mut Command) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keycard");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("keycard did not exit within 30 s");
        }
    }
}

#[test]
fn check_accepts_the_shipped_config_and_prints_routes() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = run_bounded(keycard_bin().current_dir(root).args([
        "check",
        "--config",
        "config/keycard.toml",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("http://"),
        "routes (with upstreams) not printed:\n{stdout}"
    );
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "secret printed"
    );
}

#[test]
fn check_warns_about_valid_but_risky_settings() {
    let dir = temp_dir();
    // memory://, open registration, no TLS and no trusted proxy, a 2 h access token, an HS
    // key beside [[issuers]]: five warnings.
    let mut risky = GatewayOpts::new("memory://", "http://127.0.0.1:9");
    risky.tokens.access_ttl = Duration::from_secs(7200);
    risky.issuers = vec![keycard::config::IssuerConfig {
        issuer: "https://idp.example".to_owned(),
        ..Default::default()
    }];
    // A redis store, registration off, a trusted proxy, 15 m: none.
    let mut careful = GatewayOpts::new("redis://127.0.0.1:6379/0", "http://127.0.0.1:9");
    careful.registration.enabled = false;
    careful.server.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    // keycard terminating TLS itself, with no proxy in front: nothing to warn about either.
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let mut tls = careful.clone();
    tls.server.trusted_proxies.clear();
    tls.server.tls = Some(keycard::config::TlsConfig::load(&cert, &key).unwrap());
    for (name, opts, expected) in [
        (
            "risky",
            risky,
            &[
                "store.url",
                "registration.enabled",
                "server.trusted_proxies",
                "tokens.access_ttl = 2h",
                "tokens.algorithm = HS256 with [[issuers]]",
            ][..],
        ),
        ("careful", careful, &[][..]),
        ("tls", tls, &[][..]),
    ] {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, opts.to_toml()).unwrap();
        let out = run_bounded(keycard_bin().arg("check").arg("--config").arg(&path));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{name}: warnings do not fail the check: {stderr}"
        );
        let warnings: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("warning: "))
            .collect();
        assert_eq!(warnings.len(), expected.len(), "{name}: {stderr}");
        for key in expected {
            let key = key.replace(" = ", " is ");
            assert!(
                warnings.iter().any(|w| w.contains(&key)),
                "{name}: no {key} in {stderr}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_uses_config_keycard_toml_by_default() {
    let out = run_bounded(
        keycard_bin()
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .arg("check"),
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_prints_every_route_of_a_valid_config() {
    let dir = temp_dir();
    let path = dir.join("ok.toml");
    std::fs::write(&path, base_toml()).unwrap();
    let out = run_bounded(keycard_bin().arg("check").arg("--config").arg(&path));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for route in ["/api/open", "/public", "/private", "/token", "/strip"] {
        assert!(stdout.contains(route), "{route} not printed:\n{stdout}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_reports_every_error_with_its_key_and_fails() {
    let dir = temp_dir();
    let path = dir.join("bad.toml");
    let toml = base_toml()
        .replace("[server]\n", "[server]\nbogus_key = 1\n")
        .replace("\"${KEYCARD_SECRET}\"", "\"short\"");
    std::fs::write(&path, toml).unwrap();
    let out = run_bounded(keycard_bin().arg("check").arg("--config").arg(&path));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bad config accepted");
    assert!(
        stderr.contains("bogus_key"),
        "unknown key not named:\n{stderr}"
    );
    assert!(
        stderr.contains("tokens.secret"),
        "short secret not named:\n{stderr}"
    );
    assert!(
        stderr.contains("line"),
        "errors are printed with their location:\n{stderr}"
    );
    // Running (not just checking) the same file fails the same way.
    let out = run_bounded(keycard_bin().arg("--config").arg(&path));
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts the binary, waits for /healthz, makes one proxied request, sends SIGTERM and
/// expects a clean exit 0. Both `--config` and `KEYCARD_CONFIG`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_and_exits_zero_on_sigterm_or_sigint_with_json_logs() {
    let upstream = Upstream::start().await;
    for via_env in [false, true] {
        let dir = temp_dir();
        let path = dir.join("run.toml");
        let client = http_client();
        // free_port() is only free "a moment ago": another test may take it before keycard
        // binds it. keycard then exits with "cannot listen"; try again with new ports.
        let mut attempt = 0;
        let (mut child, guard, port, admin_port) = loop {
            attempt += 1;
            let (port, admin_port) = (free_port(), free_port());
            let mut opts = GatewayOpts::new("memory://", &upstream.url());
            // server.workers sizes the runtime (seen in /metrics below).
            opts.server.workers = 3;
            let toml = opts
                .to_toml()
                .replace("127.0.0.1:1\"", &format!("127.0.0.1:{port}\""))
                .replace("127.0.0.1:2\"", &format!("127.0.0.1:{admin_port}\""));
            std::fs::write(&path, toml).unwrap();
            let mut cmd = keycard_bin();
            if via_env {
                cmd.env("KEYCARD_CONFIG", &path);
            } else {
                cmd.arg("--config").arg(&path);
            }
            let mut child = cmd
                .env("KEYCARD_LOG", if via_env { "warn" } else { "info" })
                .env("KEYCARD_LOG_FORMAT", "json")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let guard = KillOnDrop(child.id());

            let deadline = Instant::now() + Duration::from_secs(15);
            let healthy = loop {
                let r = client
                    .get(format!("http://127.0.0.1:{admin_port}/healthz"))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                if matches!(&r, Ok(resp) if resp.status() == 200) {
                    let metrics = client
                        .get(format!("http://127.0.0.1:{admin_port}/metrics"))
                        .send()
                        .await
                        .unwrap()
                        .text()
                        .await
                        .unwrap();
                    assert!(metrics.contains("keycard_runtime_workers 3"), "{metrics}");
                    break true;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    let mut err = String::new();
                    use std::io::Read;
                    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                    if err.contains("cannot listen") && attempt < 5 {
                        break false;
                    }
                    panic!("keycard exited early ({status}):\n{err}");
                }
                assert!(
                    Instant::now() < deadline,
                    "binary never became healthy: {r:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if healthy {
                break (child, guard, port, admin_port);
            }
        };
        let resp = client
            .get(format!("http://127.0.0.1:{port}/public/bin"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);

        // Found in review: with SO_REUSEPORT on the public socket, a second process on the
        // same address started and took a share of the connections. It must refuse instead.
        let second = dir.join("second.toml");
        let toml = std::fs::read_to_string(&path).unwrap().replace(
            &format!("127.0.0.1:{admin_port}\""),
            &format!("127.0.0.1:{}\"", free_port()),
        );
        std::fs::write(&second, toml).unwrap();
        let out = keycard_bin()
            .arg("--config")
            .arg(&second)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "second process on the port: {err}"
        );
        assert!(
            err.contains("server.listen") && err.contains("cannot listen"),
            "{err}"
        );

        // SIGTERM for the --config run, SIGINT for the KEYCARD_CONFIG one.
        let term = Command::new("kill")
            .arg(if via_env { "-INT" } else { "-TERM" })
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(term.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "no exit within 15 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        std::mem::forget(guard);
        assert_eq!(status.code(), Some(0), "exit status after SIGTERM");

        let mut err = String::new();
        use std::io::Read;
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        // memory:// warns at startup, so even the `warn` run has a line.
        assert!(!lines.is_empty(), "no logs");
        let mut levels = Vec::new();
        let mut access_lines = 0;
        for line in lines {
            let json: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|_| {
                panic!("KEYCARD_LOG_FORMAT=json printed a non-JSON line: {line}")
            });
            levels.push(json["level"].as_str().unwrap_or("").to_owned());
            if json["target"] == "keycard::access" {
                access_lines += 1;
            }
        }
        // KEYCARD_LOG sets the level: the access log is INFO, so `warn` silences it.
        if via_env {
            assert!(
                levels.iter().all(|l| l != "INFO" && l != "DEBUG"),
                "KEYCARD_LOG=warn still logged {levels:?}"
            );
            assert_eq!(access_lines, 0);
        } else {
            assert!(access_lines >= 1, "no access log line at KEYCARD_LOG=info");
        }
        assert!(!err.contains(SECRET), "secret in logs");
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Kills a child process by pid if a test panics before it exits.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(self.0.to_string())
            .status();
    }
}

#[test]
fn config_secret_file_is_read_as_the_secret() {
    let dir = temp_dir();
    let secret_path = dir.join("secret");
    let secret = "file-secret-0123456789-0123456789-abcdef";
    std::fs::write(&secret_path, secret).unwrap();
    let toml = base_toml().replace(
        "secret = \"${KEYCARD_SECRET}\"",
        &format!(
            "secret_file = {}",
            serde_json::to_string(secret_path.to_str().unwrap()).unwrap()
        ),
    );
    let c = parse(&toml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.tokens.secret.expose_secret(), secret.as_bytes());
    let _ = std::fs::remove_dir_all(dir);
}
