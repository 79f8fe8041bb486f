//! The Typha server: one upstream feed of [`Update`]s (one watch per kind), many node agents. A client
//! gets the snapshot, `InSync`, then every delta, as frames encoded once and shared. A client too slow to
//! keep up is dropped (it reconnects and takes a fresh snapshot); one that stops answering pings is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, broadcast};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use super::log::UpdateLog;
use caracal_datastore::Update;
use caracal_datastore::typha::protocol::{self, ClientMsg, Frame, ServerMsg};
use caracal_datastore::typha::tls;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The identity a client certificate must carry (`caracal-node`).
    pub client_identity: String,
    /// How often to ping a client.
    pub ping_interval: Duration,
    /// How long a client may leave a ping unanswered.
    pub ping_timeout: Duration,
    /// Frames buffered per client before it counts as too slow.
    pub client_buffer: usize,
    /// Deltas kept for catching up.
    pub retain: usize,
    /// On shutdown, clients are closed spread over this window, so they do not all reconnect at once.
    pub shed_window: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            client_identity: "caracal-node".into(),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(30),
            client_buffer: 4096,
            retain: 10_000,
            shed_window: Duration::from_secs(5),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug)]
pub struct Stats {
    /// Time from an update reaching Typha to its frame being written to a client.
    pub fanout: prometheus_client::metrics::histogram::Histogram,
    /// Clients connected now.
    pub connections: AtomicI64,
    /// Clients refused (identity, protocol).
    pub refused: AtomicU64,
    /// Clients dropped for being slow or silent.
    pub dropped: AtomicU64,
    /// Updates fanned out.
    pub updates: AtomicU64,
    /// Objects in the snapshot.
    pub snapshot: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            fanout: prometheus_client::metrics::histogram::Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            connections: AtomicI64::default(),
            refused: AtomicU64::default(),
            dropped: AtomicU64::default(),
            updates: AtomicU64::default(),
            snapshot: AtomicU64::default(),
        }
    }
}

/// The server state shared by the upstream feed and the connections.
pub struct Server {
    cfg: Config,
    log: Mutex<UpdateLog>,
    tx: broadcast::Sender<(u64, Frame, Instant)>,
    stop: tokio::sync::watch::Sender<bool>,
    accepted: AtomicU64,
    synced: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Counters.
    pub stats: Stats,
}

impl Server {
    /// A server with an empty snapshot.
    pub fn new(cfg: Config) -> Arc<Self> {
        let (tx, _) = broadcast::channel(cfg.client_buffer.max(16));
        let (stop, _) = tokio::sync::watch::channel(false);
        Arc::new(Server {
            log: Mutex::new(UpdateLog::new(cfg.retain)),
            tx,
            stop,
            accepted: AtomicU64::new(0),
            synced: Default::default(),
            stats: Stats::default(),
            cfg,
        })
    }

    /// Stops accepting and sheds every client, spread over the shed window.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// True once every watched kind has been listed upstream (the snapshot is complete).
    pub fn ready(&self) -> bool {
        let synced = self.synced.lock().map(|s| s.clone()).unwrap_or_default();
        caracal_datastore::KINDS
            .iter()
            .all(|(v, k, _, _)| synced.contains(&caracal_datastore::kind_id(v, k)))
    }

    /// Records an upstream update and fans it out (encoded once).
    pub async fn push(&self, update: Update) {
        if let Update::InSync { kind } = &update
            && let Ok(mut s) = self.synced.lock()
        {
            s.insert(kind.clone());
        }
        let mut log = self.log.lock().await;
        let pushed = log.push(update);
        self.stats.snapshot.store(log.len() as u64, Ordering::Relaxed);
        if let Some(frame) = pushed {
            self.stats.updates.fetch_add(1, Ordering::Relaxed);
            let _ = self.tx.send((log.seq(), frame, Instant::now()));
        }
    }

    /// Objects in the snapshot.
    pub async fn snapshot_len(&self) -> usize {
        self.log.lock().await.len()
    }

    /// Accepts clients on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let acceptor = TlsAcceptor::from(tls);
        let mut stop = self.stop.subscribe();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = async { let _ = stop.wait_for(|s| *s).await; } => return,
            };
            let Ok((tcp, peer)) = accepted else { continue };
            let server = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                server.stats.connections.fetch_add(1, Ordering::Relaxed);
                if let Err(why) = server.handle(acceptor, tcp, peer).await {
                    info!(%peer, %why, "client connection ended");
                }
                server.stats.connections.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    async fn handle(
        &self,
        acceptor: TlsAcceptor,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
    ) -> Result<(), String> {
        let stream = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_owned())?
            .map_err(|e| {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                format!("TLS handshake: {e}")
            })?;
        let ids = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(tls::identities)
            .unwrap_or_default();
        let (mut rd, mut wr) = tokio::io::split(stream);
        if !ids.contains(&self.cfg.client_identity) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, ?ids, want = %self.cfg.client_identity, "refusing a client with the wrong identity");
            let msg = format!("client identity {ids:?} is not {:?}", self.cfg.client_identity);
            let _ = protocol::write(
                &mut wr,
                &Frame::encode(&ServerMsg::Error { message: msg.clone() }),
            )
            .await;
            let _ = wr.shutdown().await;
            return Err(msg);
        }
        let hello: ClientMsg = tokio::time::timeout(Duration::from_secs(10), protocol::read(&mut rd))
            .await
            .map_err(|_| "no hello".to_owned())?
            .map_err(|e| e.to_string())?;
        let version = match protocol::negotiate(&hello) {
            Ok(v) => v,
            Err(message) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                warn!(%peer, %message, "refusing a client");
                let _ = protocol::write(
                    &mut wr,
                    &Frame::encode(&ServerMsg::Error {
                        message: message.clone(),
                    }),
                )
                .await;
                let _ = wr.shutdown().await;
                return Err(message);
            }
        };
        // Never hand out a snapshot before every kind is listed upstream: a partial view marked complete
        // would let an agent program policy with objects missing.
        while !self.ready() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        protocol::write(
            &mut wr,
            &Frame::encode(&ServerMsg::HelloAck {
                protocol_version: version,
            }),
        )
        .await
        .map_err(|e| e.to_string())?;
        // Snapshot and subscription under one lock: no update falls between them.
        let (snapshot, at, mut rx) = {
            let log = self.log.lock().await;
            (log.snapshot(), log.seq(), self.tx.subscribe())
        };
        for f in &snapshot {
            protocol::write(&mut wr, f).await.map_err(|e| e.to_string())?;
        }
        let last_pong = Arc::new(std::sync::Mutex::new(Instant::now()));
        let pongs = last_pong.clone();
        let reader = tokio::spawn(async move {
            while let Ok(ClientMsg::Pong { .. }) = protocol::read::<ClientMsg>(&mut rd).await {
                if let Ok(mut t) = pongs.lock() {
                    *t = Instant::now();
                }
            }
        });
        let mut ping = tokio::time::interval(self.cfg.ping_interval);
        let mut ping_seq = 0u64;
        let mut stop = self.stop.subscribe();
        // This connection's place in the shed window, spread by arrival order.
        let n = self.accepted.fetch_add(1, Ordering::Relaxed);
        let shed_after = self.cfg.shed_window.mul_f64((n % 100) as f64 / 100.0);
        let result = loop {
            tokio::select! {
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    tokio::time::sleep(shed_after).await;
                    break Err("server shutting down".to_owned());
                }
                msg = rx.recv() => match msg {
                    Ok((seq, frame, pushed)) if seq > at => {
                        if let Err(e) = protocol::write(&mut wr, &frame).await {
                            break Err(e.to_string());
                        }
                        self.stats.fanout.observe(pushed.elapsed().as_secs_f64());
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        break Err(format!("too slow ({n} updates behind); dropped so it resyncs"));
                    }
                    Err(broadcast::error::RecvError::Closed) => break Ok(()),
                },
                _ = ping.tick() => {
                    let silent = last_pong.lock().map(|t| t.elapsed()).unwrap_or_default();
                    if silent > self.cfg.ping_timeout {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                        break Err(format!("no pong for {silent:?}"));
                    }
                    ping_seq += 1;
                    if let Err(e) = protocol::write(&mut wr, &Frame::encode(&ServerMsg::Ping { seq: ping_seq })).await {
                        break Err(e.to_string());
                    }
                }
            }
        };
        reader.abort();
        result
    }
}
