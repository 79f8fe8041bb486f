//! `caracal-typha`: one watch per kind on the API server, fanned out to node agents over mutual TLS.
//!
//! Configuration (environment, as the operator renders the Deployment): `CARACAL_TYPHA_PORT` (5473),
//! `CARACAL_TYPHA_LISTEN_HOST` (0.0.0.0), `CARACAL_TYPHA_HEALTH_PORT` (9098) and `CARACAL_TYPHA_METRICS_PORT`
//! (9093) on `CARACAL_TYPHA_HEALTH_HOST` (127.0.0.1), `CARACAL_TYPHA_CA_FILE`, `CARACAL_TYPHA_CERT_FILE`,
//! `CARACAL_TYPHA_KEY_FILE`, `CARACAL_TYPHA_CLIENT_NAME` (caracal-node). SIGTERM sheds clients gradually.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use caracal_datastore::api;
use caracal_datastore::typha::tls;
use caracal_typha::server;
use tokio::sync::mpsc;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn file(var: &str) -> anyhow::Result<String> {
    let path =
        std::env::var(var).with_context(|| format!("{var} must name a PEM file (the operator mounts it)"))?;
    std::fs::read_to_string(&path).with_context(|| format!("{var}: reading {path}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("caracal-typha v{}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cfg = tls::server_config(
        &file("CARACAL_TYPHA_CA_FILE")?,
        &file("CARACAL_TYPHA_CERT_FILE")?,
        &file("CARACAL_TYPHA_KEY_FILE")?,
    )?;
    let host = env("CARACAL_TYPHA_HEALTH_HOST", "127.0.0.1");
    let health: std::net::SocketAddr = format!("{host}:{}", env("CARACAL_TYPHA_HEALTH_PORT", "9098"))
        .parse()
        .context("health address")?;
    let metrics: std::net::SocketAddr = format!("{host}:{}", env("CARACAL_TYPHA_METRICS_PORT", "9093"))
        .parse()
        .context("metrics address")?;
    let listen = format!(
        "{}:{}",
        env("CARACAL_TYPHA_LISTEN_HOST", "0.0.0.0"),
        env("CARACAL_TYPHA_PORT", "5473")
    );
    let srv = server::Server::new(server::Config {
        client_identity: env("CARACAL_TYPHA_CLIENT_NAME", "caracal-node"),
        ..Default::default()
    });
    let client = kube::Client::try_default()
        .await
        .context("connecting to the API server (in-cluster or KUBECONFIG)")?;
    let (tx, mut rx) = mpsc::channel(8192);
    let watches = api::watch(client, tx);
    let feeder = srv.clone();
    tokio::spawn(async move {
        while let Some(u) = rx.recv().await {
            feeder.push(u).await;
        }
    });
    tokio::spawn(caracal_datastore::http::serve(health, srv.clone()));
    tokio::spawn(caracal_datastore::http::serve(metrics, srv.clone()));
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let serving = tokio::spawn(srv.clone().serve(listener, cfg));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Shed clients over the window, then go.
    srv.shutdown();
    tokio::time::sleep(Duration::from_secs(5) + Duration::from_millis(200)).await;
    serving.abort();
    watches.iter().for_each(tokio::task::JoinHandle::abort);
    let _: Arc<server::Server> = srv;
    Ok(())
}
