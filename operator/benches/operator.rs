//! `make bench` figures for the operator, written to `target/bench/operator.json`:
//! - compute + render time of each example Installation (pure, in-process);
//! - first full render + apply: from writing the Installation to every object applied and status written;
//! - steady-state reconcile cost: duration, and read and write requests the API server served per reconcile;
//! - drift repair: time from deleting the Typha Service / editing the DaemonSet to the operator restoring it.
//!
//! Real kube-apiserver on loopback; timings are reported, never asserted.

#![expect(
    clippy::expect_used,
    reason = "a benchmark that cannot go on stops with the reason"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use caracal_crds::installation::Installation;
use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::measure::summary_ms as summary;
use caracal_operator::controller::{self, Context};
use caracal_operator::metrics::Metrics;
use caracal_operator::render::{ClusterFacts, compute, render};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn render_times() -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for name in ["installation-vxlan.yaml", "installation-bgp.yaml"] {
        let text = std::fs::read_to_string(workspace_root().join("examples").join(name)).expect("example");
        let inst: Installation = serde_yaml::from_str(&text).expect("installation");
        let facts = ClusterFacts {
            node_count: 500,
            ..Default::default()
        };
        let n = 2000;
        let start = Instant::now();
        let mut objects = 0;
        for _ in 0..n {
            let computed = compute(&inst.spec, &facts).expect("valid");
            objects = render(&computed, &facts).objects.len();
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        out.insert(name.into(), json!({"compute_render_us": us, "objects": objects}));
    }
    serde_json::Value::Object(out)
}

/// (reads, writes) the API server has served, from its own `apiserver_request_total`.
async fn requests(client: &Client) -> (f64, f64) {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new()).expect("req"))
        .await
        .expect("metrics");
    let (mut reads, mut writes) = (0.0, 0.0);
    for l in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        if l.contains("resource=\"nodes\"")
            || l.contains("resource=\"leases\"")
            || l.contains("resource=\"events\"")
        {
            continue;
        }
        let v: f64 = l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        if ["GET", "LIST"]
            .iter()
            .any(|x| l.contains(&format!("verb=\"{x}\"")))
        {
            reads += v;
        } else if ["APPLY", "PATCH", "POST", "PUT", "DELETE"]
            .iter()
            .any(|x| l.contains(&format!("verb=\"{x}\"")))
        {
            writes += v;
        }
    }
    (reads, writes)
}

fn reconciles(ctx: &Context) -> (f64, f64) {
    let mut registry = prometheus_client::registry::Registry::default();
    ctx.metrics.register(&mut registry);
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    let get = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        get("caracal_operator_reconcile_duration_seconds_count"),
        get("caracal_operator_reconcile_duration_seconds_sum"),
    )
}

async fn wait<F, Fut>(mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < Duration::from_secs(60), "timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

async fn cluster_run() -> serde_json::Value {
    let (_cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..3 {
        let node = serde_json::from_value(json!({"metadata": {"name": format!("n{i}")}})).expect("node");
        nodes.create(&PostParams::default(), &node).await.expect("node");
    }
    let ctx = Arc::new(Context::new(client.clone(), Arc::new(Metrics::default())));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(ctx.clone(), async move {
        let _ = rx.await;
    }));
    let inst: Api<Installation> = Api::all(client.clone());
    let body = json!({"apiVersion": "operator.caracal.dev/v1", "kind": "Installation", "metadata": {"name": "default"}, "spec": {}});
    let start = Instant::now();
    inst.patch("default", &PatchParams::apply("bench"), &Patch::Apply(&body))
        .await
        .expect("installation");
    wait(|| {
        let inst = inst.clone();
        async move {
            inst.get("default")
                .await
                .ok()
                .and_then(|i| i.status)
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Progressing"))
        }
    })
    .await;
    let first_apply_ms = start.elapsed().as_secs_f64() * 1e3;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Steady state: node label edits trigger reconciles whose inputs do not change.
    let (r0, w0) = requests(&client).await;
    let (c0, s0) = reconciles(&ctx);
    for i in 0..20 {
        let patch = json!({"metadata": {"labels": {"bench": i.to_string()}}});
        nodes
            .patch("n0", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("touch");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (r1, w1) = requests(&client).await;
    let (c1, s1) = reconciles(&ctx);
    let n = (c1 - c0).max(1.0);
    let steady = json!({
        "reconciles": c1 - c0,
        "mean_ms": (s1 - s0) * 1e3 / n,
        "reads_per_reconcile": (r1 - r0 - 2.0) / n,
        "writes_total": w1 - w0,
    });

    // Drift repair.
    let services: Api<Service> = Api::namespaced(client.clone(), "caracal-system");
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), "caracal-system");
    let (mut svc, mut ds) = (Vec::new(), Vec::new());
    for i in 0..5 {
        let old = services.get("caracal-typha").await.expect("svc").metadata.uid;
        services
            .delete("caracal-typha", &DeleteParams::default())
            .await
            .expect("delete");
        let t = wait(|| {
            let s = services.clone();
            let old = old.clone();
            async move {
                s.get_opt("caracal-typha")
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|x| x.metadata.uid != old)
            }
        })
        .await;
        svc.push(t.as_secs_f64() * 1e3);
        let edit = json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "spec": {"template": {"spec": {"containers": [{"name": "caracal-node", "image": format!("evil:{i}")}]}}}});
        daemonsets
            .patch(
                "caracal-node",
                &PatchParams::apply("drift").force(),
                &Patch::Apply(&edit),
            )
            .await
            .expect("edit");
        let t = wait(|| {
            let d = daemonsets.clone();
            async move {
                d.get("caracal-node")
                    .await
                    .ok()
                    .and_then(|x| x.spec?.template.spec?.containers.first()?.image.clone())
                    .is_some_and(|img| img.starts_with("caracal/node:"))
            }
        })
        .await;
        ds.push(t.as_secs_f64() * 1e3);
    }
    let _ = tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    json!({"first_render_apply_ms": first_apply_ms, "steady_state": steady, "repair_deleted_service": summary(svc), "repair_edited_daemonset": summary(ds)})
}

#[tokio::main]
async fn main() {
    let pure = render_times();
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(cluster_run().await);
    }
    let firsts: Vec<f64> = runs
        .iter()
        .filter_map(|r| r["first_render_apply_ms"].as_f64())
        .collect();
    let report = json!({
        "benchmark": "operator",
        "machine": "2 cores, 24 GiB; kube-apiserver v1.34.4 + etcd 3.6.4 on loopback",
        "compute_render": pure,
        "first_render_apply": summary(firsts),
        "runs": runs,
    });
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let text = serde_json::to_string_pretty(&report).expect("json");
    std::fs::write(dir.join("operator.json"), &text).expect("write");
    println!("{text}");
}
