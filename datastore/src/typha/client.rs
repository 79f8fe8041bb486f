//! The Typha client in the node agent: connects to any replica with mutual TLS, checks the server's
//! identity (not its address), and turns the stream into the same [`Update`]s a direct watch produces.
//! A lost connection reconnects with backoff, to the next replica, and starts over from a fresh snapshot
//! (a `Resync` of every kind), so nothing is missed.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use super::protocol::{self, ClientMsg, Frame, PROTOCOL_VERSIONS, ServerMsg};
use crate::{KINDS, Update, kind_id};

/// How the client connects.
#[derive(Clone, Debug)]
pub struct Config {
    /// Typha replicas, `host:port`.
    pub addrs: Vec<String>,
    /// The identity the server certificate must carry (`caracal-typha`).
    pub server_identity: String,
    /// This node's name.
    pub node_name: String,
    /// The protocol version to speak.
    pub protocol_version: u32,
}

impl Config {
    /// A client for `node_name` to `addrs`, expecting the server identity `caracal-typha`.
    pub fn new(addrs: Vec<String>, node_name: &str) -> Self {
        Config {
            addrs,
            server_identity: "caracal-typha".into(),
            node_name: node_name.into(),
            protocol_version: PROTOCOL_VERSIONS[0],
        }
    }
}

/// Why one session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The server refused (identity, protocol version): what it said.
    Refused(String),
    /// The connection failed or closed.
    Lost(String),
    /// The consumer went away.
    Closed,
}

/// One session with one replica: hello, then updates into `tx` until the connection ends.
pub async fn session(
    cfg: &Config,
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    tx: &mpsc::Sender<Update>,
) -> Ended {
    let tcp = match tokio::net::TcpStream::connect(addr).await {
        Ok(t) => t,
        Err(e) => return Ended::Lost(format!("connecting to {addr}: {e}")),
    };
    let Ok(name) = ServerName::try_from(cfg.server_identity.clone()) else {
        return Ended::Refused("invalid server identity".into());
    };
    let stream = match TlsConnector::from(tls).connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => return Ended::Lost(format!("TLS with {addr}: {e}")),
    };
    let (mut rd, mut wr) = tokio::io::split(stream);
    let hello = ClientMsg::Hello {
        protocol_version: cfg.protocol_version,
        node_name: cfg.node_name.clone(),
    };
    if let Err(e) = protocol::write(&mut wr, &Frame::encode(&hello)).await {
        return Ended::Lost(e.to_string());
    }
    match protocol::read::<ServerMsg>(&mut rd).await {
        Ok(ServerMsg::HelloAck { .. }) => {}
        Ok(ServerMsg::Error { message }) => return Ended::Refused(message),
        Ok(other) => return Ended::Lost(format!("unexpected first message {other:?}")),
        Err(e) => return Ended::Lost(e.to_string()),
    }
    // A fresh snapshot follows: every kind restarts.
    for (v, k, _, _) in KINDS {
        if tx.send(Update::Resync { kind: kind_id(v, k) }).await.is_err() {
            return Ended::Closed;
        }
    }
    loop {
        let msg = match protocol::read::<ServerMsg>(&mut rd).await {
            Ok(m) => m,
            Err(e) => return Ended::Lost(e.to_string()),
        };
        let sent = match msg {
            ServerMsg::Update { update, .. } => tx.send(update).await.is_ok(),
            ServerMsg::InSync { .. } => {
                let mut ok = true;
                for (v, k, _, _) in KINDS {
                    ok &= tx.send(Update::InSync { kind: kind_id(v, k) }).await.is_ok();
                }
                ok
            }
            ServerMsg::Ping { seq } => {
                if let Err(e) = protocol::write(&mut wr, &Frame::encode(&ClientMsg::Pong { seq })).await {
                    return Ended::Lost(e.to_string());
                }
                true
            }
            ServerMsg::Error { message } => return Ended::Refused(message),
            ServerMsg::HelloAck { .. } => true,
        };
        if !sent {
            return Ended::Closed;
        }
    }
}

/// Finds Typha's replicas (`host:port`) before each connection attempt: the addresses of the `caracal-typha`
/// Service's ready endpoints, read from the API server as Calico does (a DNS name is not resolvable from a
/// host-network pod, and a ClusterIP would need kube-proxy or the BPF data plane up first).
pub type Discover =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<Vec<String>, String>> + Send + Sync>;

/// Keeps a session open with some replica of `cfg.addrs` until `tx` closes: on a lost connection, waits
/// (backoff up to 10 s) and tries the next replica.
pub async fn run(cfg: Config, tls: Arc<rustls::ClientConfig>, tx: mpsc::Sender<Update>) {
    run_discovering(cfg, None, tls, tx).await;
}

/// [`run`], with the replicas found by `discover` (when given) before each attempt; `cfg.addrs` is used
/// when it finds none or fails.
pub async fn run_discovering(
    mut cfg: Config,
    discover: Option<Discover>,
    tls: Arc<rustls::ClientConfig>,
    tx: mpsc::Sender<Update>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut i = 0usize;
    loop {
        if let Some(d) = &discover {
            match d().await {
                Ok(found) if !found.is_empty() => {
                    if found != cfg.addrs {
                        info!(replicas = ?found, "Typha replicas from the API server");
                    }
                    cfg.addrs = found;
                }
                Ok(_) => warn!("the Typha Service has no ready endpoints yet"),
                Err(e) => warn!(error = %e, "finding Typha's endpoints"),
            }
        }
        if cfg.addrs.is_empty() {
            i += 1;
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
            continue;
        }
        let addr = cfg.addrs[i % cfg.addrs.len()].clone();
        let started = std::time::Instant::now();
        let ended = session(&cfg, &addr, tls.clone(), &tx).await;
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(100); // it was a healthy session: reconnect promptly
        }
        match ended {
            Ended::Closed => return,
            Ended::Refused(why) => warn!(%addr, %why, "Typha refused this agent"),
            Ended::Lost(why) => info!(%addr, %why, "Typha connection lost; trying the next replica"),
        }
        i += 1;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
