//! Deployment: the Kubernetes examples under deploy/kubernetes/ and the Grafana dashboard
//! under deploy/grafana/ against the real keycard (its config parser, its metric names), the
//! binary as the image runs it (uid 65532, read-only config, unwritable working directory),
//! and `server.shutdown_delay` (out of rotation first, then drain).
//!
//! `scripts/lint-deploy.sh` checks the same manifests against the Kubernetes schemas and the
//! Dockerfile with hadolint; this file checks what a schema cannot: that the pieces agree.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Deserialize;
use serde_json::Value;
use support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ----------------------------------------------------------------------------- dashboard

/// The metric families keycard exposes, as they appear in the exposition, with their labels.
/// A histogram is listed by its base name; `_bucket` (with `le`), `_sum` and `_count` follow.
const FAMILIES: &[(&str, bool, &[&str])] = &[
    (
        "keycard_http_requests_total",
        false,
        &["route", "method", "status_class"],
    ),
    ("keycard_http_request_duration_seconds", true, &["route"]),
    ("keycard_upstream_duration_seconds", true, &["route"]),
    ("keycard_store_duration_seconds", true, &["op"]),
    ("keycard_auth_decisions_total", false, &["outcome"]),
    ("keycard_logins_total", false, &["outcome"]),
    ("keycard_registrations_total", false, &["outcome"]),
    ("keycard_refreshes_total", false, &["outcome"]),
    ("keycard_throttle_hits_total", false, &["subject"]),
    ("keycard_requests_in_flight", false, &["listener"]),
    ("keycard_open_connections", false, &["listener", "kind"]),
    ("keycard_config_reloads_total", false, &["result"]),
    (
        "keycard_config_last_reload_success_timestamp_seconds",
        false,
        &[],
    ),
    ("keycard_build_info", false, &["version", "revision"]),
];

/// PromQL words the dashboard may use besides metric and label names.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "rate",
    "increase",
    "histogram_quantile",
    "count",
    "max",
    "min",
    "avg",
    "time",
    "by",
    "without",
    "on",
    "ignoring",
    "and",
    "or",
    "unless",
];

/// The family a series name belongs to, and the labels it may carry.
fn family_of(series: &str) -> Option<(&'static str, BTreeSet<&'static str>)> {
    for (name, histogram, labels) in FAMILIES {
        let mut allowed: BTreeSet<&str> = labels.iter().copied().collect();
        if series == *name && !histogram {
            return Some((name, allowed));
        }
        if *histogram {
            if series == format!("{name}_bucket") {
                allowed.insert("le");
                return Some((name, allowed));
            }
            if series == format!("{name}_sum") || series == format!("{name}_count") {
                return Some((name, allowed));
            }
        }
    }
    None
}

/// Every `expr` in the dashboard, with where it is.
fn exprs(value: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let here = match map.get("title").and_then(Value::as_str) {
                    Some(title) => format!("{at}/{title}"),
                    None => at.to_owned(),
                };
                if key == "expr" {
                    out.push((here, v.as_str().expect("expr is a string").to_owned()));
                } else {
                    exprs(v, &here, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs(v, at, out)),
        _ => {}
    }
}

/// What is wrong with one PromQL expression: a metric outside [`FAMILIES`], a label its
/// families do not have, or a word that is neither.
fn check_expr(expr: &str, used: &mut BTreeSet<&'static str>) -> Vec<String> {
    let mut problems = Vec::new();
    let strings = regex::Regex::new(r#""[^"]*""#).unwrap();
    let ranges = regex::Regex::new(r"\[[^\]]*\]").unwrap();
    let variables = regex::Regex::new(r"\$\{?\w+\}?").unwrap();
    let bare = strings.replace_all(expr, "\"\"");
    let bare = ranges.replace_all(&bare, "");
    let bare = variables.replace_all(&bare, "");

    let series =
        regex::Regex::new(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\s*\{([^}]*)\}|\bkeycard_\w+").unwrap();
    let name = regex::Regex::new(r"^[a-zA-Z_:][a-zA-Z0-9_:]*").unwrap();
    let mut labels: BTreeSet<&str> = BTreeSet::new();
    let mut names: BTreeSet<String> = BTreeSet::new();
    for found in series.captures_iter(&bare) {
        let whole = found.get(0).unwrap().as_str();
        let metric = name.find(whole).unwrap().as_str();
        names.insert(metric.to_owned());
        let Some((family, allowed)) = family_of(metric) else {
            problems.push(format!("unknown metric {metric:?}"));
            continue;
        };
        used.insert(family);
        labels.extend(allowed.iter().copied());
        if let Some(matchers) = found.get(1) {
            for matcher in matchers
                .as_str()
                .split(',')
                .filter(|m| !m.trim().is_empty())
            {
                let label = matcher.split(['=', '!']).next().unwrap_or_default().trim();
                if !allowed.contains(label) {
                    problems.push(format!("{metric} has no label {label:?}"));
                }
            }
        }
    }
    if names.is_empty() {
        problems.push("no keycard metric".to_owned());
    }
    let words = regex::Regex::new(r"\b[a-zA-Z_][a-zA-Z0-9_]*\b").unwrap();
    let without_selectors = regex::Regex::new(r"\{[^}]*\}")
        .unwrap()
        .replace_all(&bare, "");
    for word in words.find_iter(&without_selectors) {
        let word = word.as_str();
        let known = names.contains(word)
            || PROMQL_WORDS.contains(&word)
            || labels.contains(word)
            || word == "le";
        if !known {
            problems.push(format!(
                "{word:?} is not a keycard metric, label or PromQL word"
            ));
        }
    }
    problems
}

#[test]
fn dashboard_parses_and_uses_only_keycard_metric_families() {
    let path = repo().join("deploy/grafana/keycard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("keycard.json is not JSON");

    let schema = dashboard["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    let inputs = dashboard["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "no DS_PROMETHEUS input: {inputs:?}"
    );
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    let route = variables
        .iter()
        .find(|v| v["name"] == "route")
        .expect("no route variable");
    assert!(
        route["definition"]
            .as_str()
            .unwrap_or_default()
            .contains("label_values(keycard_http_requests_total, route)"),
        "{route}"
    );

    let mut all = Vec::new();
    exprs(&dashboard, "", &mut all);
    assert!(all.len() >= FAMILIES.len(), "only {} queries", all.len());
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for (at, expr) in &all {
        for problem in check_expr(expr, &mut used) {
            problems.push(format!("{at}: {problem}\n    {expr}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let unused: Vec<&str> = FAMILIES
        .iter()
        .map(|(name, ..)| *name)
        .filter(|name| !used.contains(name))
        .collect();
    assert!(unused.is_empty(), "families no panel shows: {unused:?}");

    // Every query goes to the chosen Prometheus, so the dashboard imports anywhere.
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "{}",
            panel["title"]
        );
    }
}

/// The checker itself: it must refuse what the dashboard must not contain.
#[test]
fn dashboard_checker_refuses_unknown_metrics_and_labels() {
    let mut used = BTreeSet::new();
    for bad in [
        "rate(keycard_http_requests_total_total[5m])",
        "sum by (reason) (rate(keycard_auth_failures_total[5m]))",
        "rate(keycard_logins_total{reason=\"x\"}[5m])",
        "sum by (status) (rate(keycard_http_requests_total[5m]))",
        "rate(keycard_store_duration_seconds[5m])",
        "rate(http_requests_total[5m])",
        "up{job=\"keycard\"}",
    ] {
        assert!(!check_expr(bad, &mut used).is_empty(), "accepted {bad}");
    }
    let good = "histogram_quantile(0.99, sum by (le, route) \
                (rate(keycard_http_request_duration_seconds_bucket{route=~\"$route\"}[$__rate_interval])))";
    assert_eq!(check_expr(good, &mut used), Vec::<String>::new());
}

// ----------------------------------------------------------------------------- manifests

/// Every document of every manifest under deploy/kubernetes/, by file.
fn manifests() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let root = repo().join("deploy/kubernetes");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for doc in serde_norway::Deserializer::from_str(&text) {
                let value =
                    Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                if !value.is_null() {
                    out.push((file.clone(), value));
                }
            }
        }
    }
    out
}

#[test]
fn kustomizations_list_every_manifest_in_their_directory() {
    let root = repo().join("deploy/kubernetes");
    let docs = manifests();
    let kustomizations: Vec<&(PathBuf, Value)> = docs
        .iter()
        .filter(|(_, v)| v["kind"] == "Kustomization")
        .collect();
    assert!(kustomizations.len() >= 2, "{kustomizations:?}");
    for dir in ["sidecar", "standalone"] {
        assert!(root.join(dir).join("kustomization.yaml").is_file(), "{dir}");
    }
    for (file, k) in kustomizations {
        let dir = file.parent().unwrap();
        let listed: BTreeSet<String> = k["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .map(|r| r.as_str().unwrap().to_owned())
            .collect();
        for entry in &listed {
            let target = dir.join(entry);
            assert!(
                target.is_file() || target.join("kustomization.yaml").is_file(),
                "{}: {entry} does not exist",
                file.display()
            );
        }
        for other in std::fs::read_dir(dir).unwrap() {
            let name = other.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".yaml") && name != "kustomization.yaml" {
                assert!(
                    listed.contains(&name),
                    "{}: {name} not listed",
                    file.display()
                );
            }
        }
    }
}

/// The pod spec of a Deployment or StatefulSet.
fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

#[test]
fn every_workload_runs_as_nonroot_with_a_read_only_root_and_no_capabilities() {
    let docs = manifests();
    let workloads: Vec<&(PathBuf, Value)> = docs
        .iter()
        .filter(|(_, v)| v["kind"] == "Deployment" || v["kind"] == "StatefulSet")
        .collect();
    assert!(workloads.len() >= 4, "{}", workloads.len());
    for (file, w) in workloads {
        let at = format!("{} {}", file.display(), w["metadata"]["name"]);
        let pod = pod_spec(w);
        let security = &pod["securityContext"];
        assert_eq!(security["runAsNonRoot"], true, "{at}");
        assert_eq!(security["runAsUser"], 65532, "{at}");
        assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault", "{at}");
        assert_eq!(pod["automountServiceAccountToken"], false, "{at}");
        for c in pod["containers"].as_array().unwrap() {
            let at = format!("{at} container {}", c["name"]);
            let s = &c["securityContext"];
            assert_eq!(s["allowPrivilegeEscalation"], false, "{at}");
            assert_eq!(s["readOnlyRootFilesystem"], true, "{at}");
            assert_eq!(
                s["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{at}"
            );
            assert!(c["resources"]["requests"]["memory"].is_string(), "{at}");
            assert!(c["resources"]["limits"]["memory"].is_string(), "{at}");
            for mount in c["volumeMounts"].as_array().into_iter().flatten() {
                // A subPath mount of a ConfigMap or Secret is a copy the kubelet never updates.
                assert!(
                    mount.get("subPath").is_none(),
                    "{at}: subPath mount {mount}"
                );
            }
        }
    }
    let redis = docs
        .iter()
        .find(|(_, v)| v["kind"] == "StatefulSet" && v["metadata"]["name"] == "redis")
        .expect("a redis StatefulSet");
    let args: Vec<&str> = pod_spec(&redis.1)["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for pair in [
        ["--appendonly", "yes"],
        ["--appendfsync", "everysec"],
        ["--maxmemory-policy", "noeviction"],
    ] {
        assert!(
            args.windows(2).any(|w| w == pair),
            "redis args lack {pair:?}: {args:?}"
        );
    }
    assert!(redis.1["spec"]["volumeClaimTemplates"].is_array());
}

/// A duration the way the pod spec counts: whole seconds.
fn seconds(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("not a number of seconds: {v}"))
}

/// The signing key's Secret is made by the operator, never shipped: a Secret in a kustomization
/// would be written over the real key by every `kubectl apply -k` (the review found the
/// placeholder doing just that). So no manifest may be a Secret, and the directory's
/// kustomization.yaml must say how to create the one the pod reads, `name` with `key`.
fn assert_secret_documented(workload: &Path, name: &str, key: &str) {
    let docs = manifests();
    let shipped: Vec<&PathBuf> = docs
        .iter()
        .filter(|(_, v)| v["kind"] == "Secret")
        .map(|(f, _)| f)
        .collect();
    assert!(shipped.is_empty(), "Secrets shipped in {shipped:?}");
    let kustomization = workload.parent().unwrap().join("kustomization.yaml");
    let text = std::fs::read_to_string(&kustomization).unwrap();
    let create = format!("create secret generic {name} --from-literal={key}=");
    assert!(
        text.contains(&create),
        "{}: does not say `{create}...`",
        kustomization.display()
    );
}

/// Every keycard container: its ConfigMap's keycard.toml is a valid keycard config (through
/// keycard's own parser), its ports and probes match it, the grace period covers
/// shutdown_delay + shutdown_timeout, and the signing key reaches it.
#[test]
fn keycard_pods_agree_with_their_config() {
    let docs = manifests();
    let find = |kind: &str, name: &str| -> &Value {
        &docs
            .iter()
            .find(|(_, v)| v["kind"] == kind && v["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .1
    };
    let scratch = std::env::temp_dir().join(format!("keycard-deploy-{}", random_jti()));
    std::fs::create_dir_all(&scratch).unwrap();
    let secret_copy = scratch.join("secret");
    std::fs::write(&secret_copy, SECRET).unwrap();

    let mut checked = BTreeMap::new();
    for (file, w) in docs.iter().filter(|(_, v)| v["kind"] == "Deployment") {
        let pod = pod_spec(w);
        let containers = pod["containers"].as_array().unwrap();
        let Some(keycard) = containers
            .iter()
            .find(|c| c["image"].as_str().unwrap().starts_with("keycard"))
        else {
            continue;
        };
        let at = format!("{} {}", file.display(), w["metadata"]["name"]);
        let volumes = pod["volumes"].as_array().unwrap();
        let mount_of = |path: &str| -> &Value {
            let mount = keycard["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"] == path)
                .unwrap_or_else(|| panic!("{at}: nothing mounted at {path}"));
            volumes
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap_or_else(|| panic!("{at}: no volume {}", mount["name"]))
        };

        // The image reads $KEYCARD_CONFIG=/etc/keycard/keycard.toml: the ConfigMap's directory.
        let config_map = mount_of("/etc/keycard")["configMap"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("{at}: /etc/keycard is not a ConfigMap"));
        let text = find("ConfigMap", config_map)["data"]["keycard.toml"]
            .as_str()
            .unwrap_or_else(|| panic!("{at}: ConfigMap {config_map} has no keycard.toml"));

        // The signing key: a file from a Secret volume, or $KEYCARD_SECRET from a Secret.
        let raw: toml::Value = toml::from_str(text).unwrap();
        let mut local = text.to_owned();
        if let Some(path) = raw["tokens"].get("secret_file").and_then(|p| p.as_str()) {
            let dir = Path::new(path).parent().unwrap().to_str().unwrap();
            let volume = mount_of(dir);
            let secret = &volume["secret"];
            let name = secret["secretName"].as_str().unwrap();
            let key = Path::new(path).file_name().unwrap().to_str().unwrap();
            assert_secret_documented(file, name, key);
            // Readable by the pod's group (fsGroup) and nobody else: 0440.
            assert_eq!(secret["defaultMode"], 0o440, "{at}");
            assert_eq!(pod["securityContext"]["fsGroup"], 65532, "{at}");
            local = local.replace(path, secret_copy.to_str().unwrap());
        } else {
            assert!(text.contains("${KEYCARD_SECRET}"), "{at}: no secret");
            let env = keycard["env"].as_array().unwrap();
            let from = env
                .iter()
                .find(|e| e["name"] == "KEYCARD_SECRET")
                .unwrap_or_else(|| panic!("{at}: no KEYCARD_SECRET"));
            let secret = from["valueFrom"]["secretKeyRef"]["name"].as_str().unwrap();
            let key = from["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap();
            assert_secret_documented(file, secret, key);
        }
        let config = Config::parse(&local, Path::new("keycard.toml"), &|name: &str| {
            (name == "KEYCARD_SECRET").then(|| SECRET.to_owned())
        })
        .unwrap_or_else(|e| panic!("{at}: ConfigMap {config_map}: {e}"));

        let port = |name: &str| -> u64 {
            keycard["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .map(|p| seconds(&p["containerPort"]))
                .unwrap_or_else(|| panic!("{at}: no port {name}"))
        };
        assert_eq!(port("http"), u64::from(config.server.listen.port()), "{at}");
        assert_eq!(port("admin"), u64::from(config.admin.listen.port()), "{at}");
        assert_eq!(port("admin"), 9901, "{at}");
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            assert_eq!(keycard[probe]["httpGet"]["path"], path, "{at}");
            assert_eq!(keycard[probe]["httpGet"]["port"], "admin", "{at}");
            // /readyz may wait store.timeout for Redis; a shorter probe timeout marks a
            // replica unready while it still serves.
            if probe == "readinessProbe" {
                let timeout = keycard[probe]["timeoutSeconds"].as_u64().unwrap_or(1);
                assert!(
                    Duration::from_secs(timeout) > config.store.timeout,
                    "{at}: readiness timeoutSeconds {timeout} <= store.timeout"
                );
            }
        }

        // SIGTERM → out of rotation for shutdown_delay → drain for at most shutdown_timeout,
        // all inside the grace period, with a margin.
        let delay = config.server.shutdown_delay;
        let drain = config.server.shutdown_timeout;
        assert!(
            !delay.is_zero(),
            "{at}: set server.shutdown_delay explicitly"
        );
        assert!(
            text.contains("shutdown_delay") && text.contains("shutdown_timeout"),
            "{at}"
        );
        let grace = seconds(&pod["terminationGracePeriodSeconds"]);
        let needed = (delay + drain).as_secs();
        assert!(
            grace >= needed + 5,
            "{at}: grace {grace}s < {needed}s + margin"
        );
        // A container beside keycard (the sidecar's app) must outlive keycard's drain.
        for other in containers.iter().filter(|c| c["name"] != keycard["name"]) {
            let wait = seconds(&other["lifecycle"]["preStop"]["sleep"]["seconds"]);
            assert!(
                wait >= needed,
                "{at}: {} stops after {wait}s",
                other["name"]
            );
            assert!(grace > wait, "{at}");
            // And it is on loopback only: keycard's route goes there.
            let args = other["args"].to_string();
            assert!(
                args.contains("127.0.0.1:"),
                "{at}: app not on loopback: {args}"
            );
            assert!(
                config
                    .routes
                    .iter()
                    .all(|r| r.upstream.to_string().starts_with("http://127.0.0.1:")),
                "{at}"
            );
        }
        checked.insert(at, config_map.to_owned());
    }
    assert_eq!(checked.len(), 2, "{checked:?}");

    let pdb = find("PodDisruptionBudget", "keycard");
    assert!(pdb["spec"]["minAvailable"] == 1 || pdb["spec"]["maxUnavailable"] == 1);
    let gateway = find("Deployment", "keycard");
    assert!(seconds(&gateway["spec"]["replicas"]) >= 2);
    let _ = std::fs::remove_dir_all(scratch);
}

// ----------------------------------------------------------------------------- shutdown_delay

/// On the shutdown signal /readyz turns 503 at once while the public listener still serves
/// new connections for shutdown_delay; only then does keycard stop accepting and drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delay_turns_readyz_503_and_keeps_serving_before_the_drain() {
    let delay = Duration::from_secs(2);
    let mut s = Stack::start_with(|o| {
        o.server.shutdown_delay = delay;
        o.server.shutdown_timeout = Duration::from_secs(5);
    })
    .await;
    let (status, _) = json_body(
        s.gw.client
            .get(s.gw.admin_url("/readyz"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);

    let began = Instant::now();
    s.gw.begin_shutdown();
    // Bounded: the flag is set as soon as the signal resolves.
    let (status, body) = loop {
        let (status, body) = json_body(
            s.gw.client
                .get(s.gw.admin_url("/readyz"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        if status != 200 || began.elapsed() > delay / 2 {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "readyz during shutdown_delay: {body}");
    assert_eq!(body["status"], "draining", "{body}");

    // Still serving, on a new connection (a fresh client), while out of rotation; liveness
    // stays 200 so the kubelet does not restart a pod that is stopping anyway.
    let fresh = http_client();
    let resp = fresh.get(s.gw.url("/public/late")).send().await.unwrap();
    assert!(began.elapsed() < delay, "too slow to test the delay");
    Echo::from_response(resp).await;
    let healthz = fresh.get(s.gw.admin_url("/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);

    s.gw.wait_stopped(Duration::from_secs(15)).await.unwrap();
    let took = began.elapsed();
    assert!(
        took >= delay,
        "stopped after {took:?}, before shutdown_delay {delay:?}"
    );
    assert!(
        took < delay + Duration::from_secs(5),
        "stopped after {took:?}"
    );
    // Stopped: nothing accepts any more.
    assert!(
        tokio::net::TcpStream::connect(s.gw.addr).await.is_err(),
        "still accepting after the drain"
    );
}

// ----------------------------------------------------------------------------- the binary

/// The uid and gid of the distroless image's `nonroot` user.
const NONROOT: u32 = 65532;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Names, modes, owners, sizes and modification times of everything under `dir`.
fn listing(dir: &Path) -> BTreeMap<PathBuf, (u32, u32, u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let m = std::fs::symlink_metadata(&path).unwrap();
            out.insert(
                path.clone(),
                (m.mode(), m.uid(), m.size(), m.mtime(), m.mtime_nsec()),
            );
            if m.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Whether every directory above `path` can be searched, and `path` run, by other users.
fn reachable_by_others(path: &Path) -> bool {
    let runnable = std::fs::metadata(path).is_ok_and(|m| m.mode() & 0o005 == 0o005);
    runnable
        && path
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .all(|a| std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 != 0))
}

/// Kills a child by pid if the test fails before it exits.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects; the pid is our own child's.
        unsafe {
            libc::kill(self.0 as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// A directory tree laid out like the pod: the image's binary, a ConfigMap-like config
/// directory (0555, file 0444, root-owned), a Secret-like key file (0440, group 65532 as
/// fsGroup makes it) and an unwritable working directory. Removed on drop.
struct Pod {
    root: PathBuf,
    bin: PathBuf,
    config: PathBuf,
    secret: PathBuf,
    cwd: PathBuf,
}

impl Pod {
    fn new() -> Pod {
        let root = std::env::temp_dir().join(format!("keycard-nonroot-{}", random_jti()));
        for dir in ["etc/keycard", "secrets", "cwd"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        chmod(&root, 0o755);
        chmod(&root.join("etc"), 0o755);
        let built = PathBuf::from(env!("CARGO_BIN_EXE_keycard"));
        // uid 65532 must be able to reach the binary: target/ may sit under a 0700 directory.
        let bin = if reachable_by_others(&built) {
            built
        } else {
            let copy = root.join("keycard");
            std::fs::copy(&built, &copy).unwrap();
            chmod(&copy, 0o755);
            copy
        };
        Pod {
            config: root.join("etc/keycard/keycard.toml"),
            secret: root.join("secrets/secret"),
            cwd: root.join("cwd"),
            bin,
            root,
        }
    }

    /// Writes the config and the key, then takes every write bit away.
    fn seal(&self, config: &str, secret_mode: u32) {
        std::fs::write(&self.config, config).unwrap();
        std::fs::write(&self.secret, SECRET).unwrap();
        chmod(&self.config, 0o444);
        chmod(self.config.parent().unwrap(), 0o555);
        chmod(&self.secret, secret_mode);
        if is_root() {
            // Root-owned, group nonroot: what a Secret volume with fsGroup 65532 looks like.
            std::os::unix::fs::chown(&self.secret, Some(0), Some(NONROOT)).unwrap();
        }
        chmod(self.secret.parent().unwrap(), 0o555);
        chmod(&self.cwd, 0o555);
    }

    /// `keycard run` as the image starts it: config from $KEYCARD_CONFIG, uid/gid 65532 when
    /// the test runs as root, in the unwritable directory, with nothing else in the env.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .env_clear()
            .env("KEYCARD_CONFIG", &self.config)
            .env("KEYCARD_LOG", "info")
            .env("TMPDIR", &self.cwd)
            .env("HOME", &self.cwd)
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if is_root() {
            use std::os::unix::process::CommandExt;
            // std drops the supplementary groups too (setgroups(0)) when root changes uid.
            cmd.uid(NONROOT).gid(NONROOT);
        }
        cmd
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // Give the write bits back so the tree can be removed (when not root).
        for dir in [
            self.root.join("etc/keycard"),
            self.root.join("secrets"),
            self.cwd.clone(),
        ] {
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The config the pod test runs: the test's Redis and upstream, the key from a file, a short
/// shutdown_delay.
fn pod_config(pod: &Pod, redis: &RedisServer, upstream: &Upstream, ports: (u16, u16)) -> String {
    let mut opts = GatewayOpts::new(&redis.url(), &upstream.url());
    opts.tokens.secret = Secret::from(Vec::new());
    opts.tokens.secret_file = Some(pod.secret.clone());
    opts.server.shutdown_delay = Duration::from_secs(1);
    opts.server.shutdown_timeout = Duration::from_secs(5);
    opts.server.workers = 2;
    opts.to_toml()
        .replace("127.0.0.1:1\"", &format!("127.0.0.1:{}\"", ports.0))
        .replace("127.0.0.1:2\"", &format!("127.0.0.1:{}\"", ports.1))
}

/// The binary as the image runs it: uid/gid 65532 (when the test is root; otherwise it is
/// non-root already), the config in a read-only directory owned by root, the key readable
/// through its group only, an unwritable working directory. It serves logins and proxied
/// requests, is ready, leaves shutdown with readyz 503 then exit 0, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_runs_as_nonroot_with_a_read_only_config_and_writes_nothing() {
    let redis = RedisServer::new();
    let upstream = Upstream::start().await;
    if !is_root() {
        // Not root: the process already is what the image makes it, a non-root user.
        // SAFETY: geteuid has no preconditions.
        assert_ne!(unsafe { libc::geteuid() }, 0);
    }
    let client = http_client();
    let logs = std::env::temp_dir().join(format!("keycard-nonroot-log-{}", random_jti()));

    // free_port() was free a moment ago only: retry on "cannot listen".
    let mut attempt = 0;
    let (pod, mut child, guard, port, admin, before) = loop {
        attempt += 1;
        let ports = (free_port(), free_port());
        let pod = Pod::new();
        pod.seal(&pod_config(&pod, &redis, &upstream, ports), 0o440);
        let before = listing(&pod.root);
        let log = std::fs::File::create(&logs).unwrap();
        let mut child = pod.command().stderr(log).spawn().unwrap();
        let guard = KillOnDrop(child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        let ready = loop {
            let r = client
                .get(format!("http://127.0.0.1:{}/readyz", ports.1))
                .timeout(Duration::from_secs(1))
                .send()
                .await;
            if matches!(&r, Ok(resp) if resp.status() == 200) {
                break true;
            }
            if let Some(status) = child.try_wait().unwrap() {
                let err = std::fs::read_to_string(&logs).unwrap_or_default();
                if err.contains("cannot listen") && attempt < 5 {
                    break false;
                }
                panic!("keycard exited during startup ({status}):\n{err}");
            }
            assert!(Instant::now() < deadline, "not ready within 20 s: {r:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if ready {
            break (pod, child, guard, ports.0, ports.1, before);
        }
    };

    // It really runs as 65532 (when we could make it).
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    if is_root() {
        assert_eq!(ids("Uid:"), [NONROOT; 4], "{status}");
        assert_eq!(ids("Gid:"), [NONROOT; 4], "{status}");
        assert!(
            ids("Groups:").is_empty(),
            "supplementary groups kept: {status}"
        );
    } else {
        assert!(ids("Uid:").iter().all(|&u| u != 0), "{status}");
    }

    let base = format!("http://127.0.0.1:{port}");
    let creds = serde_json::json!({"username": "nonroot", "password": PASSWORD});
    let resp = client
        .post(format!("{base}/register"))
        .json(&creds)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let (status, body) = json_body(
        client
            .post(format!("{base}/login"))
            .json(&creds)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap();
    let resp = client
        .get(format!("{base}/api/through"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let echo = Echo::from_response(resp).await;
    assert_eq!(echo.values("x-auth-user"), ["nonroot"]);
    let resp = client
        .get(format!("{base}/api/through"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // SIGTERM: out of rotation during shutdown_delay, then a clean exit.
    // SAFETY: signalling our own child.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut saw_draining = false;
    let exit = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if !saw_draining {
            let r = client
                .get(format!("http://127.0.0.1:{admin}/readyz"))
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            saw_draining = matches!(&r, Ok(resp) if resp.status() == 503);
        }
        assert!(Instant::now() < deadline, "no exit within 15 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    std::mem::forget(guard);
    let err = std::fs::read_to_string(&logs).unwrap();
    let _ = std::fs::remove_file(&logs);
    assert_eq!(exit.code(), Some(0), "exit after SIGTERM:\n{err}");
    assert!(
        saw_draining,
        "readyz never answered 503 during shutdown_delay"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains(SECRET), "the key is in the logs");

    // Nothing written, created or touched anywhere in the pod's files.
    assert_eq!(listing(&pod.root), before, "keycard changed files");
}

/// What the brief warns about, shown: a key file that is root's alone (0400), as a Secret
/// volume without fsGroup would give, is unreadable for uid 65532, and keycard says which key
/// and refuses to start rather than run without it. Only meaningful when the test can drop
/// to 65532, so it needs root (CI runs as root); without root it checks that it is not root.
#[test]
fn a_key_file_only_root_can_read_is_a_startup_error_naming_the_key() {
    if !is_root() {
        // SAFETY: geteuid has no preconditions.
        assert_ne!(unsafe { libc::geteuid() }, 0);
        return;
    }
    let pod = Pod::new();
    let ports = (free_port(), free_port());
    let mut opts = GatewayOpts::new("memory://", "http://127.0.0.1:9");
    opts.tokens.secret = Secret::from(Vec::new());
    opts.tokens.secret_file = Some(pod.secret.clone());
    let toml = opts
        .to_toml()
        .replace("127.0.0.1:1\"", &format!("127.0.0.1:{}\"", ports.0))
        .replace("127.0.0.1:2\"", &format!("127.0.0.1:{}\"", ports.1));
    pod.seal(&toml, 0o400);
    // run_within panics if keycard is still running after 20 s, i.e. started anyway.
    let (ok, _, err) = run_within(&mut pod.command(), Duration::from_secs(20));
    assert!(!ok, "keycard exited 0 with a key it cannot read:\n{err}");
    assert!(err.contains("tokens.secret_file"), "{err}");
    assert!(!err.contains(SECRET), "{err}");
}

/// The families the dashboard may use are exactly what a running keycard exposes, with those
/// labels: a renamed metric or label fails here, not silently as an empty panel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_families_are_the_ones_a_running_keycard_exposes() {
    let s = Stack::start().await;
    // One proxied request, so the request series exist too.
    let (access, _) = s.gw.user("dashboard").await;
    assert_eq!(s.gw.get("/api/x", Some(&access)).await.status(), 200);
    let text = s.gw.metrics().await;
    let mut exposed = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let labels: BTreeSet<&str> = match line[name_end..].strip_prefix('{') {
            Some(rest) => rest[..rest.find('}').unwrap()]
                .split(',')
                .filter_map(|kv| kv.split('=').next())
                .filter(|k| !k.is_empty() && *k != "le")
                .collect(),
            None => BTreeSet::new(),
        };
        let family = ["_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|base| FAMILIES.iter().any(|(f, h, _)| *h && f == base))
            .unwrap_or(name);
        exposed.insert((
            family.to_owned(),
            labels.into_iter().map(str::to_owned).collect::<Vec<_>>(),
        ));
    }
    for (name, _, labels) in FAMILIES {
        let mut want: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        want.sort();
        assert!(
            exposed.iter().any(|(f, l)| f == name && *l == want),
            "{name}{{{}}} is not exposed; /metrics has:\n{text}",
            want.join(",")
        );
    }
}
