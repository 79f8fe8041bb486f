//! The agent's health and metrics endpoints: `/healthz` (the process runs), `/readyz` (the data plane has
//! been programmed from a complete datastore view), `/metrics` (Prometheus text).

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

use crate::agent::Status;

async fn readyz(State(s): State<Arc<Status>>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not programmed yet")
    }
}

/// The metrics text for `status`.
pub fn metrics_text(s: &Status) -> String {
    let mut r = Registry::with_prefix("caracal_node");
    r.register(
        "ready",
        "1 once the data plane is programmed",
        ConstGauge::new(i64::from(s.ready.load(Ordering::Relaxed))),
    );
    r.register(
        "dataplane_programs",
        "Data plane programs",
        ConstCounter::new(s.programs.load(Ordering::Relaxed)),
    );
    r.register(
        "dataplane_repairs",
        "Full read-backs that repaired drift",
        ConstCounter::new(s.repairs.load(Ordering::Relaxed)),
    );
    r.register(
        "dataplane_failures",
        "Data plane programs that failed",
        ConstCounter::new(s.failures.load(Ordering::Relaxed)),
    );
    let mut text = String::new();
    let _ = encode(&mut text, &r);
    text
}

async fn metrics(State(s): State<Arc<Status>>) -> String {
    metrics_text(&s)
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `addr`.
pub async fn serve(addr: SocketAddr, status: Arc<Status>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(status);
    axum::serve(tokio::net::TcpListener::bind(addr).await?, app).await
}
