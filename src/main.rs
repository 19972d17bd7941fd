//! The `keycard` binary: command line, logging, config load, signals, then [`keycard::run`].
//! No gateway logic lives here.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keycard::config::Config;
use tokio::net::TcpListener;

/// EX_USAGE from sysexits.h: the config (the "usage") is wrong.
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "keycard", version = keycard::VERSION, about = "An authentication gateway")]
struct Cli {
    /// Path of the TOML config file.
    #[arg(
        long,
        env = "KEYCARD_CONFIG",
        default_value = "config/keycard.toml",
        global = true
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the config, print the resolved routes, and exit.
    Check,
    /// Try keycard locally: memory store, random secret, built-in echo upstream.
    Dev {
        /// Address of the gateway.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Address of the admin listener.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
    },
    /// Manage users in the configured (redis://) store.
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Add a user; the password is read from standard input (one line), never from argv.
    Add {
        name: String,
        /// Comma-separated roles.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
    },
    /// Replace a user's roles (none given: no roles).
    Roles { name: String, roles: Vec<String> },
    /// Delete a user and end its sessions.
    Delete { name: String },
    /// End every session of a user: all its tokens issued until now are refused.
    Revoke { name: String },
    /// List users and their roles.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    return_large_allocations_to_the_os();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&cli.config),
        Command::Run => {
            let config = match load(&cli.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            // What `keycard check` warns about, in the log where operators will see it.
            for warning in config.warnings() {
                tracing::warn!("{warning}");
            }
            block_on(async move {
                let listeners = keycard::Listeners {
                    server: bind_shared(config.server.listen)
                        .map_err(|e| listen_error("server.listen", config.server.listen, e))?,
                    admin: TcpListener::bind(config.admin.listen)
                        .await
                        .map_err(|e| listen_error("admin.listen", config.admin.listen, e))?,
                };
                let reload = keycard::reload::ReloadSource {
                    path: cli.config.clone(),
                    env: std::sync::Arc::new(|name: &str| std::env::var(name).ok()),
                    poll_every: RELOAD_POLL,
                    triggers: hangups(),
                };
                keycard::run_with_reload(config, listeners, shutdown_signal(), Some(reload))
                    .await
                    .map_err(|e| e.to_string())
            })
        }
        Command::User(command) => {
            let config = match load(&cli.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            user(config, command)
        }
        Command::Dev { listen, admin } => block_on(async move {
            keycard::dev::run(listen, admin, shutdown_signal())
                .await
                .map_err(|e| e.to_string())
        }),
    }
}

/// `keycard check`: every error at once, or the resolved routes.
fn check(path: &Path) -> ExitCode {
    match load(path) {
        Ok(config) => {
            use std::io::Write;
            // A closed pipe (`keycard check | head -1`) is not a failure of the check.
            let text = format!("{}: ok\n{}\n", path.display(), config.describe_routes());
            let _ = std::io::stdout().write_all(text.as_bytes());
            // Valid but risky: said on stderr, and the check still passes.
            for warning in config.warnings() {
                let _ = writeln!(std::io::stderr(), "warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `keycard user ...`: prints what it did, or the error (exit 1).
fn user(config: Config, command: UserCommand) -> ExitCode {
    let password = match &command {
        UserCommand::Add { .. } => match read_password() {
            Ok(password) => Some(password),
            Err(message) => {
                eprintln!("keycard: {message}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    block_on(async move {
        let users = keycard::users::Users::open(config).map_err(|e| e.to_string())?;
        let (action, name, done) = match command {
            UserCommand::Add { name, roles } => {
                let password = password.unwrap_or_default();
                let done = users.add(&name, &password, &roles).await;
                ("add", name, done)
            }
            UserCommand::Roles { name, roles } => {
                let done = users.roles(&name, &roles).await;
                ("roles", name, done)
            }
            UserCommand::Delete { name } => {
                let done = users.delete(&name).await;
                ("delete", name, done)
            }
            UserCommand::Revoke { name } => {
                let done = users.revoke(&name).await;
                ("revoke", name, done)
            }
            UserCommand::List => ("list", String::new(), users.list().await),
        };
        if action != "list" {
            keycard::audit::cli(action, &name, &done);
        }
        let text = done.map_err(|e| e.to_string())?;
        use std::io::Write;
        let _ = write!(
            std::io::stdout(),
            "{}",
            text.trim_end_matches('\n').to_owned() + "\n"
        );
        Ok(())
    })
}

/// The first line of standard input (without its line ending), at most 4 KiB: a password
/// never goes through argv, where `ps` and shell history would show it.
fn read_password() -> Result<String, String> {
    use std::io::{BufRead, Read};
    if std::io::stdin().is_terminal() {
        eprint!("Password (input is visible; pipe it in to avoid that): ");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .take(4096)
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password from standard input: {e}"))?;
    let line = line.strip_suffix('\n').unwrap_or(&line);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.is_empty() {
        return Err("no password on standard input".to_owned());
    }
    Ok(line.to_owned())
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!(
            "{}: {} error(s); keycard did not start",
            path.display(),
            errors.errors.len()
        );
        ExitCode::from(EXIT_CONFIG)
    })
}

fn listen_error(key: &str, addr: SocketAddr, e: std::io::Error) -> String {
    format!("{key} = \"{addr}\": cannot listen: {e}")
}

/// The public listener, with `SO_REUSEPORT` so that each worker's event loop can open its own
/// socket on the same address (see `keycard::server`).
///
/// `SO_REUSEPORT` alone would also let a second process of the same user (an old instance, a
/// double start) bind the address and silently take a share of the connections under its own
/// config. So the address is first bound the ordinary way, which fails while anyone listens
/// there; a later keycard's probe fails against ours the same way.
fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let addr = std::net::TcpListener::bind(addr)?.local_addr()?;
    TcpListener::from_std(keycard::server::reuseport_listener(addr)?)
}

/// Runs `task` on the calling thread's single-threaded runtime: the first event loop (the
/// gateway starts the other `server.workers - 1` itself), or a CLI command's.
fn block_on(task: impl std::future::Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keycard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("keycard: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `KEYCARD_LOG` (EnvFilter syntax, default `info`) and `KEYCARD_LOG_FORMAT=json`, to stderr.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYCARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in files or journald.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if std::env::var("KEYCARD_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or SIGINT; the gateway then drains and exits 0.
/// How often the config file is checked for a change (a stat call; see `keycard::reload`).
const RELOAD_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// One message per SIGHUP: reload the config, changed or not.
fn hangups() -> tokio::sync::mpsc::Receiver<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    match signal(SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the config");
                    // A reload already queued covers this one too.
                    let _ = tx.try_send(());
                }
            });
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; reload on file change only")
        }
    }
    rx
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT will stop keycard");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutdown signal received; draining");
}

/// Every argon2 hash allocates its whole working memory (19 MiB with the default cost) on a
/// blocking-pool thread. glibc's malloc raises its mmap threshold after the first such buffer
/// is freed and from then on serves them from per-thread arenas that it keeps: a few dozen
/// logins left the process holding 500-850 MiB for good (measured by `scripts/soak.sh`).
/// A fixed threshold makes every allocation of 1 MiB or more its own mapping, returned to the
/// OS when freed; the cost is a fresh mapping per hash, small next to the hash itself.
///
/// glibc, not mimalloc: `scripts/bench.sh --compare` measured mimalloc at about 4% more
/// requests/s and 4% less CPU per request, but 15 MiB more peak RSS with 1,000 keep-alive
/// connections (52 against 37 MiB), and it kept argon2's buffers while the hashing thread
/// lived. Memory per connection is what a sidecar is judged by.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_large_allocations_to_the_os() {
    // SAFETY: mallopt only changes allocator tuning; it is called once, before any other
    // thread exists, with a documented parameter and value.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    if ok != 1 {
        tracing::warn!("mallopt(M_MMAP_THRESHOLD) failed; memory use after logins may stay high");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_allocations_to_the_os() {}
