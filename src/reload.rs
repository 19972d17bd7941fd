//! Reload: puts a changed config file in force without a restart.
//!
//! A reload is triggered by a change of the file (polled, so that the Kubernetes ConfigMap
//! pattern, where a `..data` symlink is swapped, is seen like an edit in place) or by an
//! explicit trigger such as SIGHUP, which reloads even when nothing changed. The file is read,
//! validated and compiled into a [`Policy`] on this task, off the request path, and swapped in
//! whole: requests in flight finish on the policy they started with, new ones see the new one.
//! An invalid file is rejected with each error logged, and the old policy stays. Keys that
//! only a restart can change (listen addresses, the store, the password hasher, the
//! listener's own limits) are logged as "needs a restart" and keep their running values,
//! while the rest of the reload applies.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::policy::Policy;

/// Resolves `${VAR}` in the config file: the process environment in production, a closure in
/// tests.
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Where a reloadable gateway reads its config from, and what else may trigger a reload.
pub struct ReloadSource {
    /// The config file.
    pub path: PathBuf,
    /// How `${VAR}` is resolved.
    pub env: Env,
    /// How often the file is checked for a change.
    pub poll_every: Duration,
    /// Each message reloads at once, changed or not (the binary sends one per SIGHUP).
    pub triggers: mpsc::Receiver<()>,
}

impl std::fmt::Debug for ReloadSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadSource")
            .field("path", &self.path)
            .field("poll_every", &self.poll_every)
            .finish_non_exhaustive()
    }
}

/// What identifies one version of the file: a replaced file (a new inode, as an editor's
/// save-and-rename or a ConfigMap's symlink swap makes) or a rewritten one (new length,
/// modification time, or change time: `touch -r` can put `mtime` back, never `ctime`) all
/// count as a change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    inode: (u64, u64),
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
}

/// The file's fingerprint, following symlinks; `None` while it cannot be read (a swap in
/// progress), which is not a change by itself.
fn fingerprint(path: &std::path::Path) -> Option<Fingerprint> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Fingerprint {
        inode: (meta.dev(), meta.ino()),
        len: meta.len(),
        modified: meta.modified().ok(),
        changed: (meta.ctime(), meta.ctime_nsec()),
    })
}

/// Watches `source` and reloads `gateway` until `stop` turns true.
pub(crate) async fn watch(
    mut source: ReloadSource,
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = fingerprint(&source.path);
    // A change is loaded once the file has stayed the same for a whole poll: a file rewritten
    // in place, in pieces, is not read half-written (writing a new file and renaming it over
    // the old one is still the safe way).
    let mut settling: Option<Fingerprint> = None;
    let mut ticks = tokio::time::interval(source.poll_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            trigger = source.triggers.recv() => match trigger {
                Some(()) => "signal",
                // The trigger's sender is gone: keep watching the file.
                None => {
                    source.triggers = mpsc::channel(1).1;
                    continue;
                }
            },
            _ = ticks.tick() => {
                let now = fingerprint(&source.path);
                if now.is_none() && seen.is_some() {
                    // Logged once; the running config stays, and the file is loaded when it
                    // comes back.
                    tracing::warn!(path = %source.path.display(), "config file is gone; keeping the running config");
                    seen = None;
                }
                if now.is_none() || now == seen {
                    settling = None;
                    continue;
                }
                if settling != now {
                    settling = now;
                    continue;
                }
                "file changed"
            }
        };
        settling = None;
        seen = fingerprint(&source.path);
        let ok = reload(&source, &gateway, why).await;
        metrics.config_reload(ok);
    }
}

/// One reload: read, validate, compile and swap; false (with every error logged) when the
/// file is rejected.
async fn reload(source: &ReloadSource, gateway: &Gateway, why: &str) -> bool {
    let (path, env) = (source.path.clone(), Arc::clone(&source.env));
    // Reading and validating touch the file system (the file, `secret_file`): the blocking
    // pool, never an async worker.
    let loaded =
        tokio::task::spawn_blocking(move || Config::load_with(&path, &|name| env(name))).await;
    let mut config = match loaded {
        Ok(Ok(config)) => config,
        Ok(Err(errors)) => {
            for error in &errors.errors {
                tracing::error!(file = %errors.file.display(), %error, "config reload rejected");
            }
            return false;
        }
        Err(error) => {
            tracing::error!(%error, "config reload failed");
            return false;
        }
    };
    let current = gateway.policy();
    for key in keep_restart_keys(&current.config, &mut config) {
        tracing::warn!(
            key,
            "config change needs a restart; keeping the running value"
        );
    }
    let routes = config.routes.len();
    gateway.swap_policy(Policy::compile(config, Some(&current)));
    tracing::info!(reason = why, routes, "config reloaded");
    true
}

/// Puts the running values back into `new` for every key that only a restart can change, and
/// names the ones that differed.
fn keep_restart_keys(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($key:literal, $($field:ident).+) => {
            if new.$($field).+ != running.$($field).+ {
                changed.push($key);
                new.$($field).+ = running.$($field).+.clone();
            }
        };
    }
    keep!("server.listen", server.listen);
    keep!("admin.listen", admin.listen);
    keep!("store", store);
    keep!("passwords", passwords);
    keep!("server.max_connections", server.max_connections);
    keep!("server.workers", server.workers);
    keep!("server.header_read_timeout", server.header_read_timeout);
    keep!("server.h2_idle_timeout", server.h2_idle_timeout);
    keep!("server.shutdown_delay", server.shutdown_delay);
    keep!("server.shutdown_timeout", server.shutdown_timeout);
    keep!("server.max_header_bytes", server.max_header_bytes);
    changed
}
