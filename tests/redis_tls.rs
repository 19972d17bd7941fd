//! Redis in production: `rediss://` with a private CA (`store.ca_file`), certificates that
//! must be refused, an ACL user that may only touch keycard's prefix, the revocation cache
//! over TLS, and connect/command timeouts against an address that never answers.
//!
//! A real `redis-server` with TLS (Debian's is built with it) on a loopback port and no
//! plaintext port, certificates made per test with rcgen, a real upstream and the gateway,
//! over HTTP. Operators' writes go through `redis-cli --tls`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Instant;

use support::*;

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A temporary folder with a CA, certificates it signed, and a second CA nobody uses.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("keycard-tls-{}", random_jti()));
        std::fs::create_dir_all(&dir).unwrap();
        let (pem, ca) = Pki::authority();
        std::fs::write(dir.join("ca.pem"), pem).unwrap();
        let (other, _) = Pki::authority();
        std::fs::write(dir.join("other-ca.pem"), other).unwrap();
        Pki { dir, ca }
    }

    fn authority() -> (String, rcgen::Issuer<'static, rcgen::KeyPair>) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keycard test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        (pem, rcgen::Issuer::new(params, key))
    }

    /// A server certificate for `names` (DNS names or IPs), signed by the CA; returns the
    /// (certificate, key) files named after `name`.
    fn server(&self, name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (cert_file, key_file) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn other_ca_file(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// A TLS-only redis-server
// ---------------------------------------------------------------------------------------------

/// The ACL recommended in the README: keycard's prefix only, and only the commands keycard
/// sends (the throttle scripts' too: a script's `redis.call` is checked against the ACL).
const KEYCARD_ACL: &str = "resetkeys ~keycard:* resetchannels -@all +ping +get +set +mget \
                           +incr +decr +del +pttl +pexpire +eval +scan +client|tracking";

/// A `redis-server` with `--port 0` (no plaintext) and TLS on a loopback port; killed on
/// drop. Extra config lines (ACL `user <name> ...` lines, cluster settings) go into its
/// config file.
struct TlsRedis {
    port: u16,
    child: Child,
    cli_auth: Vec<String>,
    ca_file: PathBuf,
}

impl TlsRedis {
    /// With `cert` for its certificate and no ACL (the default user, no password).
    fn start(pki: &Pki, cert: &(PathBuf, PathBuf)) -> TlsRedis {
        TlsRedis::start_with_users(pki, cert, &[], &[])
    }

    /// With extra config `lines` (such as ACL users); `cli_auth` is what `redis-cli` needs to
    /// log in (`--user`, `--pass`).
    fn start_with_users(
        pki: &Pki,
        cert: &(PathBuf, PathBuf),
        lines: &[&str],
        cli_auth: &[&str],
    ) -> TlsRedis {
        let mut last = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let conf = pki.dir.join(format!("redis-{port}-{attempt}.conf"));
            let mut text = format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\nsave \"\"\nappendonly no\n\
                 tls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                 tls-auth-clients no\n",
                cert.0.display(),
                cert.1.display(),
                pki.ca_file().display(),
            );
            for line in lines {
                text.push_str(&line.replace("{port}", &port.to_string()));
                text.push('\n');
            }
            std::fs::write(&conf, text).unwrap();
            let mut child = spawn_redis_server([&conf]);
            let server = TlsRedis {
                port,
                child: match child.try_wait() {
                    Ok(None) => child,
                    status => {
                        last = format!("redis-server exited at once: {status:?}");
                        continue;
                    }
                },
                cli_auth: cli_auth.iter().map(|s| s.to_string()).collect(),
                ca_file: pki.ca_file(),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut server = server;
            loop {
                let (ok, out, err) = server.try_cli(&["PING"]);
                if ok && out.trim() == "PONG" {
                    return server;
                }
                if let Ok(Some(status)) = server.child.try_wait() {
                    last = format!("redis-server (TLS) exited early: {status}: {err}");
                    break;
                }
                if Instant::now() > deadline {
                    last = format!("redis-server (TLS) did not answer PING within 10s: {out}{err}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start redis-server with TLS: {last}");
    }

    fn try_cli(&self, args: &[&str]) -> (bool, String, String) {
        self.try_cli_as(&self.cli_auth, args)
    }

    /// `redis-cli --tls` logged in with `auth` (`--user U --pass P`, or nothing).
    fn try_cli_as(&self, auth: &[String], args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["--tls", "--cacert"])
            .arg(&self.ca_file)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(auth)
            .arg("--no-auth-warning")
            .args(args);
        run_within(&mut cmd, Duration::from_secs(10))
    }

    /// `redis-cli --tls ... ARGS`, asserting success; its output.
    fn cli(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.try_cli(args);
        assert!(
            ok && !out.starts_with("ERR") && !out.starts_with("NOPERM"),
            "redis-cli {args:?}: {out}{err}"
        );
        out
    }

    /// `rediss://[credentials@]127.0.0.1:PORT/0`.
    fn url(&self, credentials: &str) -> String {
        format!("rediss://{credentials}127.0.0.1:{}/0", self.port)
    }

    /// `rediss://[credentials@]localhost:PORT/0`: the name in the certificate.
    fn url_by_name(&self, credentials: &str) -> String {
        format!("rediss://{credentials}localhost:{}/0", self.port)
    }

    /// The id of the gateway's tracking connection (`CLIENT LIST` flag `t`), waiting
    /// (bounded) until there is one.
    fn tracking_client(&self) -> String {
        for _ in 0..100 {
            let list = self.cli(&["CLIENT", "LIST"]);
            let tracking = tracking_client_id(&list);
            if let Some(id) = tracking {
                return id;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the gateway never enabled client tracking over TLS");
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn jti(token: &str) -> String {
    decode_claims(token)["jti"].as_str().unwrap().to_owned()
}

/// Gateway options for `url` against `upstream`, with `ca_file` if given.
fn opts(url: &str, upstream: &Upstream, ca_file: Option<&Path>) -> GatewayOpts {
    let mut opts = GatewayOpts::new(url, &upstream.url());
    opts.store.ca_file = ca_file.map(Path::to_path_buf);
    opts.store.ca = ca_file.map(|f| std::fs::read(f).unwrap());
    opts
}

async fn readyz(gw: &Gateway) -> u16 {
    gw.client
        .get(gw.admin_url("/readyz"))
        .send()
        .await
        .expect("GET /readyz")
        .status()
        .as_u16()
}

/// The contract flow, asserting every step: register, login, a proxied request, logout (the
/// token is revoked), and a refresh of another session's token.
async fn contract_flow(gw: &Gateway, user: &str) {
    assert_eq!(gw.register(user, PASSWORD).await.status(), 201, "register");
    let (access, refresh) = gw.login(user, PASSWORD).await;
    assert_eq!(gw.get("/private/x", Some(&access)).await.status(), 200);
    let (status, body) = json_body(gw.refresh(&refresh).await).await;
    assert_eq!(status, 200, "refresh: {body}");
    let fresh = body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(gw.get("/private/x", Some(&fresh)).await.status(), 200);
    assert_eq!(gw.logout(&fresh).await.status(), 200, "logout");
    assert_revoked(gw.get("/private/x", Some(&fresh)).await, "after logout").await;
    // The rotated refresh token is single-use.
    assert_revoked(gw.refresh(&refresh).await, "reused refresh token").await;
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_flow_runs_over_tls_with_a_private_ca() {
    let pki = Pki::new();
    let cert = pki.server("redis", &["localhost", "127.0.0.1"]);
    let redis = TlsRedis::start(&pki, &cert);
    let upstream = Upstream::start().await;
    // By IP (the certificate names 127.0.0.1) and by name (localhost).
    for (i, url) in [redis.url(""), redis.url_by_name("")].iter().enumerate() {
        let gw = Gateway::start(opts(url, &upstream, Some(&pki.ca_file()))).await;
        assert_eq!(readyz(&gw).await, 200);
        contract_flow(&gw, &format!("tls{i}")).await;
    }
    // What keycard wrote is in the TLS server (there is no other).
    let user = redis.cli(&["GET", "keycard:user:tls0"]);
    assert!(user.contains("argon2id"), "{user}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revocation_cache_runs_over_tls_and_sees_an_operators_revoke_at_once() {
    let pki = Pki::new();
    let cert = pki.server("redis", &["127.0.0.1"]);
    let redis = TlsRedis::start(&pki, &cert);
    let upstream = Upstream::start().await;
    let gw = Gateway::start(opts(&redis.url(""), &upstream, Some(&pki.ca_file()))).await;
    // Tracking is on over TLS: the cache's connection is a TLS client of this server.
    redis.tracking_client();
    for round in 0..5 {
        let (access, _) = gw.user(&format!("cache{round}")).await;
        for _ in 0..3 {
            assert_eq!(gw.get("/private/x", Some(&access)).await.status(), 200);
        }
        redis.cli(&["CONFIG", "RESETSTAT"]);
        assert_eq!(gw.get("/private/x", Some(&access)).await.status(), 200);
        let stats = redis.cli(&["INFO", "commandstats"]);
        assert!(
            !stats.contains("cmdstat_mget:"),
            "round {round}: the answer came from the cache: {stats}"
        );
        let key = format!("keycard:revoked:{}", jti(&access));
        redis.cli(&["SET", &key, "1"]);
        assert_revoked(
            gw.get("/private/x", Some(&access)).await,
            "revoked by redis-cli --tls",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_keycard_does_not_trust_are_refused_and_never_downgraded() {
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    // A certificate for another name: right CA, wrong host.
    let wrong_name = pki.server("elsewhere", &["redis.example.com"]);
    let elsewhere = TlsRedis::start(&pki, &wrong_name);
    let good = pki.server("redis", &["127.0.0.1", "localhost"]);
    let redis = TlsRedis::start(&pki, &good);
    // A plaintext Redis behind a rediss:// URL: no silent fallback to plaintext.
    let plain = RedisServer::new();
    let cases = [
        (
            elsewhere.url(""),
            Some(pki.ca_file()),
            "a certificate for another host",
        ),
        (
            redis.url(""),
            Some(pki.other_ca_file()),
            "a CA other than store.ca_file",
        ),
        (redis.url(""), None, "a private CA without store.ca_file"),
        (
            format!("rediss://127.0.0.1:{}/0", plain.port()),
            Some(pki.ca_file()),
            "a server that does not speak TLS",
        ),
    ];
    for (url, ca, what) in cases {
        let gw = Gateway::start(opts(&url, &upstream, ca.as_deref())).await;
        assert_eq!(readyz(&gw).await, 503, "{what}: /readyz");
        let f = failure(gw.register("mallory", PASSWORD).await).await;
        assert_eq!(
            (f.status, f.msg.as_str()),
            (503, "Authentication store unavailable"),
            "{what}: register"
        );
        let f = failure(gw.login_raw("mallory", PASSWORD).await).await;
        assert_eq!(f.status, 503, "{what}: login");
        // A well-signed token still needs the store: refused, not forwarded.
        let token = mint_valid(&claims("mallory", "access"));
        let hits = upstream.hits();
        let f = failure(gw.get("/private/x", Some(&token)).await).await;
        assert_eq!(f.status, 503, "{what}: proxied request");
        assert_eq!(upstream.hits(), hits, "{what}: forwarded without a store");
    }
    // Nothing reached either server in plaintext or otherwise.
    assert_eq!(elsewhere.cli(&["DBSIZE"]).trim(), "0");
    assert_eq!(redis.cli(&["DBSIZE"]).trim(), "0");
    let keys: Vec<String> = plain.query(redis::cmd("KEYS").arg("*")).await;
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_limited_to_keycards_prefix_runs_the_whole_flow() {
    let pki = Pki::new();
    let cert = pki.server("redis", &["127.0.0.1"]);
    // The default user is off: whatever works below works as `keycard`.
    let users = [
        "user default off".to_owned(),
        format!("user keycard on >acl-s3cret {KEYCARD_ACL}"),
        "user operator on >op-pw ~* &* +@all".to_owned(),
    ];
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    let redis = TlsRedis::start_with_users(
        &pki,
        &cert,
        &users,
        &["--user", "operator", "--pass", "op-pw"],
    );
    let upstream = Upstream::start().await;
    let url = redis.url("keycard:acl-s3cret@");
    let mut o = opts(&url, &upstream, Some(&pki.ca_file()));
    o.throttle.user_limit = 3;
    let gw = Gateway::start(o).await;
    assert_eq!(readyz(&gw).await, 200);
    contract_flow(&gw, "aclu").await;
    // The throttle's scripts run under the ACL too (a script's commands are checked against
    // it): failures count, and the lockout reads the window's TTL.
    for _ in 0..3 {
        assert_eq!(
            gw.login_raw("nobody", "wrong password!").await.status(),
            401
        );
    }
    let f = failure(gw.login_raw("nobody", "wrong password!").await).await;
    assert_eq!(f.status, 429, "{f:?}");
    // The revocation cache's connection logs in as the same user and tracks.
    redis.tracking_client();
    let (access, _) = gw.login("aclu", PASSWORD).await;
    assert_eq!(gw.get("/private/x", Some(&access)).await.status(), 200);
    redis.cli(&["SET", &format!("keycard:revoked:{}", jti(&access)), "1"]);
    assert_revoked(gw.get("/private/x", Some(&access)).await, "ACL + cache").await;
    // Every connection is the ACL user's; nothing failed a permission check.
    let list = redis.cli(&["CLIENT", "LIST"]);
    let gateway_users: Vec<&str> = list
        .lines()
        .filter(|l| !l.contains("cmd=client|list"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("user=")))
        .collect();
    assert!(
        !gateway_users.is_empty() && gateway_users.iter().all(|u| *u == "keycard"),
        "{list}"
    );
    let denied = redis.cli(&["ACL", "LOG"]);
    assert!(denied.trim().is_empty(), "ACL denials: {denied}");

    // The ACL holds: this user cannot read or write outside the prefix, nor flush.
    let as_keycard = ["--user", "keycard", "--pass", "acl-s3cret"].map(str::to_owned);
    for args in [
        &["SET", "other:x", "1"][..],
        &["GET", "other:x"],
        &["FLUSHALL"],
        &["CONFIG", "GET", "*"],
        &["KEYS", "*"],
    ] {
        let (_, out, err) = redis.try_cli_as(&as_keycard, args);
        assert!(
            out.contains("NOPERM") || err.contains("NOPERM"),
            "{args:?}: {out}{err}"
        );
    }
    // `keycard user list` (SCAN) works as the ACL user too.
    let file = pki.dir.join("keycard.toml");
    std::fs::write(&file, gw.opts.to_toml()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keycard"))
        .arg("--config")
        .arg(&file)
        .args(["user", "list"])
        .env_remove("KEYCARD_CONFIG")
        .env("KEYCARD_SECRET", SECRET)
        .env("KEYCARD_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("aclu"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_password_never_reaches_logs_or_error_messages() {
    let pki = Pki::new();
    let cert = pki.server("redis", &["127.0.0.1"]);
    let redis = TlsRedis::start(&pki, &cert);
    let upstream = Upstream::start().await;
    // The wrong CA: connecting fails, and the failure is logged at every level.
    let url = redis.url("keycard:Pa55-in-url@");
    let gw_opts = opts(&url, &upstream, Some(&pki.other_ca_file()));
    let file = pki.dir.join("keycard.toml");
    std::fs::write(&file, gw_opts.to_toml()).unwrap();
    for args in [&["user", "list"][..], &["check"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_keycard"))
            .arg("--config")
            .arg(&file)
            .args(args)
            .env_remove("KEYCARD_CONFIG")
            .env("KEYCARD_SECRET", SECRET)
            .env("KEYCARD_LOG", "trace")
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains("Pa55-in-url"), "{args:?}: {all}");
        if args[0] == "user" {
            assert!(
                !out.status.success() && all.contains("store unavailable"),
                "{all}"
            );
        }
    }
    assert!(!format!("{gw_opts:?}").contains("Pa55-in-url"));
}

/// A TCP listener that accepts and reads but never answers: a hung Redis, a black-holing
/// proxy, a TLS port behind a broken load balancer.
async fn silent_listener() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            held.push(tokio::spawn(async move {
                let mut sink = [0u8; 1024];
                use tokio::io::AsyncReadExt;
                while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
            }));
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_store_fails_closed_within_the_configured_timeouts() {
    let (addr, task) = silent_listener().await;
    let upstream = Upstream::start().await;
    // Plain: the connection's setup is never answered, nor is a command.
    // TLS: the handshake is never answered; only connect_timeout bounds it, so a long
    // command timeout must not hold the request.
    let pki = Pki::new();
    let cases = [
        (format!("redis://{addr}/0"), None, 300, 300, 1500),
        (
            format!("rediss://{addr}/0"),
            Some(pki.ca_file()),
            200,
            10_000,
            3000,
        ),
    ];
    for (url, ca, connect_ms, command_ms, within_ms) in cases {
        let mut o = opts(&url, &upstream, ca.as_deref());
        o.store.connect_timeout = Duration::from_millis(connect_ms);
        o.store.timeout = Duration::from_millis(command_ms);
        let gw = Gateway::start(o).await;
        let within = Duration::from_millis(within_ms);
        for attempt in 0..3 {
            let started = Instant::now();
            let f = failure(gw.register("sam", PASSWORD).await).await;
            let took = started.elapsed();
            assert_eq!(
                (f.status, f.msg.as_str()),
                (503, "Authentication store unavailable"),
                "{url} #{attempt}"
            );
            assert!(took < within, "{url} #{attempt}: 503 after {took:?}");
            let started = Instant::now();
            assert_eq!(readyz(&gw).await, 503, "{url}");
            let took = started.elapsed();
            assert!(took < within, "{url} #{attempt}: /readyz after {took:?}");
        }
    }
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_over_tls_runs_the_contract_flow() {
    // The smallest cluster: one master over TLS (its bus too) owning every slot. The client
    // learns the node's address from CLUSTER SLOTS and connects to it over TLS, verified
    // against store.ca_file. As the ACL user, whose cluster ACL adds `cluster|slots`.
    let pki = Pki::new();
    let cert = pki.server("redis", &["127.0.0.1"]);
    let nodes = pki.dir.join("nodes-{port}.conf");
    let lines = [
        "cluster-enabled yes".to_owned(),
        "tls-cluster yes".to_owned(),
        format!("cluster-config-file {}", nodes.display()),
        "user default off".to_owned(),
        format!("user keycard on >acl-s3cret {KEYCARD_ACL} +cluster|slots"),
        "user operator on >op-pw ~* &* +@all".to_owned(),
    ];
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let operator = ["--user", "operator", "--pass", "op-pw"];
    let redis = TlsRedis::start_with_users(&pki, &cert, &lines, &operator);
    redis.cli(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
        assert!(
            Instant::now() < deadline,
            "the one-node cluster never became ok"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let upstream = Upstream::start().await;
    let url = format!(
        "rediss+cluster://keycard:acl-s3cret@127.0.0.1:{}",
        redis.port
    );
    let gw = Gateway::start(opts(&url, &upstream, Some(&pki.ca_file()))).await;
    assert_eq!(readyz(&gw).await, 200);
    contract_flow(&gw, "clu").await;
    let user = redis.cli(&["GET", "keycard:user:{clu}"]);
    assert!(user.contains("argon2id"), "{user}");
    let denied = redis.cli(&["ACL", "LOG"]);
    assert!(denied.trim().is_empty(), "ACL denials: {denied}");
    // The wrong CA: refused.
    let gw = Gateway::start(opts(&url, &upstream, Some(&pki.other_ca_file()))).await;
    assert_eq!(readyz(&gw).await, 503);
    assert_eq!(gw.register("mallory", PASSWORD).await.status(), 503);
}
