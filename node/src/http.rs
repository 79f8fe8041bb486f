//! Health and metrics endpoints of the node-side binaries (agent, Typha): `/healthz` (the process runs),
//! `/readyz` (see [`Health::ready`]), `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// What a binary reports.
pub trait Health: Send + Sync + 'static {
    /// Ready to serve its purpose.
    fn ready(&self) -> bool;
    /// Its metrics, registered under its prefix.
    fn register(&self, registry: &mut Registry);
}

impl Health for crate::agent::Status {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("caracal_node");
        r.register(
            "ready",
            "1 once the data plane is programmed",
            ConstGauge::new(i64::from(self.ready())),
        );
        r.register(
            "dataplane_programs",
            "Data plane programs",
            ConstCounter::new(self.programs.load(Ordering::Relaxed)),
        );
        r.register(
            "dataplane_repairs",
            "Full read-backs that repaired drift",
            ConstCounter::new(self.repairs.load(Ordering::Relaxed)),
        );
        r.register(
            "dataplane_failures",
            "Data plane programs that failed",
            ConstCounter::new(self.failures.load(Ordering::Relaxed)),
        );
    }
}

impl Health for crate::typha::server::Server {
    fn ready(&self) -> bool {
        crate::typha::server::Server::ready(self)
    }
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("caracal_typha");
        let s = &self.stats;
        r.register(
            "connections",
            "Connected node agents",
            ConstGauge::new(s.connections.load(Ordering::Relaxed)),
        );
        r.register(
            "refused",
            "Clients refused (identity, protocol version)",
            ConstCounter::new(s.refused.load(Ordering::Relaxed)),
        );
        r.register(
            "dropped_clients",
            "Clients dropped for being too slow or silent",
            ConstCounter::new(s.dropped.load(Ordering::Relaxed)),
        );
        r.register(
            "updates",
            "Updates fanned out",
            ConstCounter::new(s.updates.load(Ordering::Relaxed)),
        );
        r.register(
            "snapshot_size",
            "Objects in the snapshot",
            ConstGauge::new(i64::try_from(s.snapshot.load(Ordering::Relaxed)).unwrap_or(i64::MAX)),
        );
    }
}

/// The metrics text of `h`.
pub fn metrics_text(h: &dyn Health) -> String {
    let mut r = Registry::default();
    h.register(&mut r);
    let mut text = String::new();
    let _ = encode(&mut text, &r);
    text
}

async fn readyz(State(h): State<Arc<dyn Health>>) -> (StatusCode, &'static str) {
    if h.ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(h): State<Arc<dyn Health>>) -> String {
    metrics_text(h.as_ref())
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `addr`.
pub async fn serve(addr: SocketAddr, health: Arc<dyn Health>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    axum::serve(tokio::net::TcpListener::bind(addr).await?, app).await
}
