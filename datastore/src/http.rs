//! Health and metrics endpoints of the node-side binaries (agent, Typha): `/healthz` (the process runs),
//! `/readyz` (see [`Health::ready`]), `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// What a binary reports.
pub trait Health: Send + Sync + 'static {
    /// Ready to serve its purpose.
    fn ready(&self) -> bool;
    /// Its metrics, registered under its prefix.
    fn register(&self, registry: &mut Registry);
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
