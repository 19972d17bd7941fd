//! Dev: `keycard dev`, a playground that needs nothing but the binary.
//!
//! It starts a built-in echo upstream on a loopback port, generates a random secret, uses the
//! embedded `memory://` store, and prints curl lines that walk through register, login, a
//! protected request, logout and the rejected request after it. Nothing here is used by
//! `keycard run`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::{self, Body};
use crate::config::{AuthMode, Config, RouteConfig, Secret, Upstream};

/// Why `keycard dev` could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// A listener could not be bound (port in use?).
    #[error("cannot listen on {addr}: {source} (pass --listen/--admin to pick other ports)")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The echo upstream's URL did not parse (a bug).
    #[error("dev config: {0}")]
    Config(String),
    /// The gateway failed to start.
    #[error("{0}")]
    Run(#[from] crate::server::RunError),
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, DevError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DevError::Bind { addr, source })
}

/// Runs the playground until `shutdown` resolves.
pub async fn run(
    listen: SocketAddr,
    admin: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DevError> {
    let echo = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let echo_addr = echo.local_addr().map_err(|source| DevError::Bind {
        addr: listen,
        source,
    })?;
    tokio::spawn(serve_echo(echo));

    let mut secret = [0u8; 32];
    // Without a CSPRNG there is no safe secret; getrandom failing is not recoverable.
    getrandom::fill(&mut secret).map_err(|e| DevError::Bind {
        addr: listen,
        source: std::io::Error::other(e.to_string()),
    })?;
    let upstream: Upstream = format!("http://{echo_addr}")
        .parse()
        .map_err(DevError::Config)?;
    let route = |path: &str, auth| RouteConfig {
        path: path.to_owned(),
        upstream: upstream.clone(),
        auth,
        ..RouteConfig::default()
    };
    let mut config = Config::default();
    config.server.listen = listen;
    config.admin.listen = admin;
    config.tokens.secret = Secret::from(secret.to_vec());
    // Nothing balances traffic to a playground: Ctrl-C stops it at once.
    config.server.shutdown_delay = std::time::Duration::ZERO;
    config.routes = vec![
        route("/", AuthMode::Required),
        route("/public", AuthMode::Public),
    ];
    let listeners = crate::Listeners {
        server: bind(listen).await?,
        admin: bind(admin).await?,
    };
    println!("{}", instructions(listen, admin, echo_addr));
    crate::run(config, listeners, shutdown).await?;
    Ok(())
}

fn instructions(listen: SocketAddr, admin: SocketAddr, echo: SocketAddr) -> String {
    let base = format!("http://{listen}");
    let creds = r#"{"username":"alice","password":"correct horse battery"}"#;
    format!(
        r#"
keycard dev is running: gateway {base}, admin http://{admin}, echo upstream http://{echo}
(memory store and a random secret: everything is forgotten on exit). Try, in another shell:

  curl -i -X POST {base}/register -H 'Content-Type: application/json' -d '{creds}'
  TOKEN=$(curl -s -X POST {base}/login -H 'Content-Type: application/json' -d '{creds}' | sed -E 's/.*"access_token":"([^"]+)".*/\1/')
  curl -i {base}/hello -H "Authorization: Bearer $TOKEN"
  curl -i -X DELETE {base}/logout -H "Authorization: Bearer $TOKEN"
  curl -i {base}/hello -H "Authorization: Bearer $TOKEN"

The first protected request is answered by the echo upstream with the headers it received
(note x-auth-user); after logout the same token gets 401 "Token has been revoked".
{base}/public/... needs no token. Health: curl http://{admin}/readyz. Stop with Ctrl-C.
"#
    )
}

/// The built-in upstream: answers every request with JSON describing what it received, so a
/// newcomer can see exactly which headers keycard forwards.
async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let service =
                service_fn(|request| async move { Ok::<_, Infallible>(echo(request).await) });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn echo(request: Request<Incoming>) -> Response<Body> {
    let (parts, incoming) = request.into_parts();
    let body = incoming
        .collect()
        .await
        .map(|c| String::from_utf8_lossy(&c.to_bytes()).into_owned())
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes())
                    .into_owned()
                    .into(),
            )
        })
        .collect();
    let mut response = body::json(
        StatusCode::OK,
        &serde_json::json!({
            "upstream": "keycard dev echo",
            "method": parts.method.as_str(),
            "path": parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
            "headers": headers,
            "body": body,
        }),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
