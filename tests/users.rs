//! `keycard user add|roles|delete|revoke|list`: the binary against a real redis-server, with
//! a gateway on the same store to show the effect over HTTP.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use support::*;

/// Runs `keycard --config <file> user <args>` with `stdin` as standard input.
fn keycard_user(config: &std::path::Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keycard"))
        .arg("--config")
        .arg(config)
        .arg("user")
        .args(args)
        .env_remove("KEYCARD_CONFIG")
        .env("KEYCARD_SECRET", SECRET)
        // Errors, and the audit events (one JSON line each) `operator_cli_actions_are_audited`
        // reads.
        .env("KEYCARD_LOG", "error,keycard::audit=info")
        .env("KEYCARD_LOG_FORMAT", "json")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> (bool, String, String) {
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config_file(opts: &GatewayOpts) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("keycard-users-{}", random_jti()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keycard.toml");
    std::fs::write(&path, opts.to_toml()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_users_and_the_gateway_sees_it() {
    let s = Stack::start_with(|o| o.registration.enabled = false).await;
    let file = config_file(&s.gw.opts);
    let user = |args: &[&str], stdin: &str| text(&keycard_user(&file, args, stdin));

    let (ok, out, err) = user(
        &["add", "Alice", "--roles", "admin,ops"],
        &format!("{PASSWORD}\n"),
    );
    assert!(ok, "{err}");
    assert!(out.contains("added alice"), "{out}");
    let (access, _) = s.gw.login("alice", PASSWORD).await;
    assert_eq!(
        decode_claims(&access)["roles"],
        serde_json::json!(["admin", "ops"])
    );

    let (ok, _, err) = user(&["add", "alice"], &format!("{PASSWORD}\n"));
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = user(&["add", "bob"], "short\n");
    assert!(!ok && err.contains("8 to 1024 bytes"), "{err}");
    let (ok, _, err) = user(&["add", "bob"], "");
    assert!(!ok && err.contains("no password"), "{err}");
    // A password is never taken from argv.
    let (ok, _, err) = user(&["add", "bob", PASSWORD], "");
    assert!(!ok, "{err}");

    let (ok, _, err) = user(&["roles", "alice", "reader"], "");
    assert!(ok, "{err}");
    let (ok, out, err) = user(&["list"], "");
    assert!(ok, "{err}");
    assert_eq!(out, "alice\treader\n");
    let (_, refreshed) = s.gw.login("alice", PASSWORD).await;
    assert_eq!(
        decode_claims(&refreshed)["roles"],
        serde_json::json!(["reader"])
    );

    let (ok, _, err) = user(&["revoke", "alice"], "");
    assert!(ok, "{err}");
    let f = failure(s.gw.get("/private/x", Some(&access)).await).await;
    assert_eq!((f.status, f.msg.as_str()), (401, "Token has been revoked"));
    let (after, _) = s.gw.login("alice", PASSWORD).await;
    assert_eq!(s.gw.get("/private/x", Some(&after)).await.status(), 200);

    let (ok, _, err) = user(&["delete", "alice"], "");
    assert!(ok, "{err}");
    assert_eq!(s.gw.login_raw("alice", PASSWORD).await.status(), 401);
    assert_eq!(s.gw.get("/private/x", Some(&after)).await.status(), 401);
    for args in [
        &["delete", "alice"][..],
        &["roles", "alice", "x"],
        &["revoke", "alice"],
    ] {
        let (ok, _, err) = user(args, "");
        assert!(!ok && err.contains("no user"), "{args:?}: {err}");
    }
    let (ok, _, err) = user(&["roles", "bob", "bad role"], "");
    assert!(!ok && err.contains("invalid role"), "{err}");
    let many: Vec<String> = (0..33).map(|i| format!("r{i}")).collect();
    let mut args = vec!["roles", "bob"];
    args.extend(many.iter().map(String::as_str));
    let (ok, _, err) = user(&args, "");
    assert!(!ok && err.contains("at most 32 roles"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_commands_fail_clearly_without_a_reachable_store() {
    let down = GatewayOpts::new(
        &format!("redis://{}/0", closed_addr()),
        "http://127.0.0.1:9",
    );
    let mut down = down;
    down.store.timeout = Duration::from_millis(500);
    let (ok, _, err) = text(&keycard_user(&config_file(&down), &["list"], ""));
    assert!(!ok && err.contains("store unavailable"), "{err}");

    let memory = GatewayOpts::new("memory://", "http://127.0.0.1:9");
    let (ok, _, err) = text(&keycard_user(&config_file(&memory), &["list"], ""));
    assert!(!ok && err.contains("memory://"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_cli_actions_are_audited() {
    let redis = RedisServer::new();
    let file = config_file(&GatewayOpts::new(&redis.url(), "http://127.0.0.1:9"));
    let uid = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    let client = format!("cli:uid={}", uid.trim());
    let add = format!("{PASSWORD}\n");
    for (args, stdin, event, outcome) in [
        (
            &["add", "carol", "--roles", "ops"][..],
            &add[..],
            "cli_user_add",
            "success",
        ),
        (&["add", "carol"][..], &add[..], "cli_user_add", "failure"),
        (
            &["roles", "carol", "admin"][..],
            "",
            "cli_user_roles",
            "success",
        ),
        (&["revoke", "carol"][..], "", "cli_user_revoke", "success"),
        (&["delete", "carol"][..], "", "cli_user_delete", "success"),
        (&["delete", "carol"][..], "", "cli_user_delete", "failure"),
    ] {
        let (ok, _, stderr) = text(&keycard_user(&file, args, stdin));
        assert_eq!(ok, outcome == "success", "{args:?}: {stderr}");
        assert!(!stderr.contains(PASSWORD), "{args:?} logged the password");
        let events: Vec<serde_json::Value> = stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["target"] == "keycard::audit")
            .collect();
        assert_eq!(events.len(), 1, "{args:?}: {stderr}");
        let e = &events[0];
        let field = |name: &str| e[name].as_str().unwrap_or("?").to_owned();
        assert_eq!(
            [
                field("event"),
                field("outcome"),
                field("user"),
                field("client")
            ],
            [event, outcome, "carol", client.as_str()],
            "{args:?}: {e}"
        );
    }
}
