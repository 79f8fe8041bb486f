//! `caracal-node`: the per-node agent. Today it runs the policy loop (datastore watch -> calculation ->
//! iptables) and serves health and metrics; IPAM, the CNI server and routing arrive with their issues.
//!
//! Configuration (environment, as the operator renders the DaemonSet):
//! - `CARACAL_NODE_NAME` (required): this node's name.
//! - `CARACAL_DATAPLANE`: `Iptables` (default).
//! - `CARACAL_HEALTH_PORT` (9099) and `CARACAL_METRICS_PORT` (9091): `/healthz` `/readyz` and `/metrics`.
//! - `CARACAL_HEALTH_HOST` (127.0.0.1): the address both listen on.
//! - `CARACAL_NETNS`: program the data plane of this named network namespace instead of the agent's own
//!   (for a lab where agents reach the API server from the host).
//! - `CARACAL_LOG_FORMAT=json` for JSON logs; `KUBECONFIG` or the in-cluster service account for the API.
//! - Typha: `CARACAL_TYPHA_ADDRS` (`host:port,...`) or `CARACAL_TYPHA_SERVICE` (port 5473) with
//!   `CARACAL_TYPHA_CA_FILE`, `CARACAL_TYPHA_CERT_FILE`, `CARACAL_TYPHA_KEY_FILE` and
//!   `CARACAL_TYPHA_SERVER_NAME` (caracal-typha); without them the agent watches the API server directly.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use caracal_node::agent::{self, Config, Status};
use caracal_node::datastore::api;
use tokio::sync::mpsc;

/// Typha replicas: `CARACAL_TYPHA_ADDRS` (`host:port,...`), or the Service `CARACAL_TYPHA_SERVICE` on port 5473.
fn typha_addrs() -> Option<Vec<String>> {
    if let Ok(list) = std::env::var("CARACAL_TYPHA_ADDRS")
        && !list.is_empty()
    {
        return Some(list.split(',').map(str::to_owned).collect());
    }
    std::env::var("CARACAL_TYPHA_SERVICE")
        .ok()
        .filter(|s| !s.is_empty())
        .map(|s| vec![format!("{s}:5473")])
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if env("CARACAL_LOG_FORMAT", "text") == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    let node_name = std::env::var("CARACAL_NODE_NAME")
        .context("CARACAL_NODE_NAME must name this node (the DaemonSet sets it from spec.nodeName)")?;
    let host = env("CARACAL_HEALTH_HOST", "127.0.0.1");
    let health: std::net::SocketAddr = format!("{host}:{}", env("CARACAL_HEALTH_PORT", "9099"))
        .parse()
        .context("CARACAL_HEALTH_HOST / CARACAL_HEALTH_PORT")?;
    let metrics: std::net::SocketAddr = format!("{host}:{}", env("CARACAL_METRICS_PORT", "9091"))
        .parse()
        .context("CARACAL_HEALTH_HOST / CARACAL_METRICS_PORT")?;
    let exec_prefix = match std::env::var("CARACAL_NETNS") {
        Ok(ns) if !ns.is_empty() => vec!["ip".into(), "netns".into(), "exec".into(), ns],
        _ => Vec::new(),
    };
    let status = Arc::new(Status::default());
    let servers = [
        tokio::spawn(caracal_node::http::serve(health, status.clone())),
        tokio::spawn(caracal_node::http::serve(metrics, status.clone())),
    ];
    let (tx, rx) = mpsc::channel(4096);
    let watches = match typha_addrs() {
        // Through Typha when the configuration names it, directly otherwise: the same updates either way.
        Some(addrs) => {
            let read = |var: &str| -> anyhow::Result<String> {
                let path = std::env::var(var)
                    .with_context(|| format!("{var} must name a PEM file to talk to Typha"))?;
                std::fs::read_to_string(&path).with_context(|| format!("{var}: reading {path}"))
            };
            let tls = caracal_node::typha::tls::client_config(
                &read("CARACAL_TYPHA_CA_FILE")?,
                &read("CARACAL_TYPHA_CERT_FILE")?,
                &read("CARACAL_TYPHA_KEY_FILE")?,
            )?;
            let mut cfg = caracal_node::typha::client::Config::new(addrs, &node_name);
            cfg.server_identity = env("CARACAL_TYPHA_SERVER_NAME", "caracal-typha");
            vec![tokio::spawn(caracal_node::typha::client::run(cfg, tls, tx))]
        }
        None => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the API server (in-cluster or KUBECONFIG)")?;
            api::watch(client, tx)
        }
    };
    let cfg = Config {
        node_name,
        dataplane: env("CARACAL_DATAPLANE", "Iptables"),
        exec_prefix,
        debounce: Duration::from_millis(50),
        refresh: Duration::from_secs(90),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let result = agent::run(cfg, rx, status, shutdown).await;
    watches.iter().for_each(tokio::task::JoinHandle::abort);
    servers.iter().for_each(tokio::task::JoinHandle::abort);
    result.context("the policy data plane")
}
