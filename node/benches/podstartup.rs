//! `make bench` figures for pod startup on real nodes, written to `target/bench/podstartup.json`: two nodes
//! running the real kubelet, containerd and runc (`caracal-lab up --runtime containerd`), Caracal from the
//! images `make images` built (the release binaries).
//!
//! - 50 pods of the echo image created through the API server back to back (25 bound to each node); for each,
//!   from the create call to the watch seeing it Running with its address: p50 / p99 / max (the
//!   sig-scalability pod-startup SLO is p99 <= 5 s at cluster scale, for pods whose image is present);
//! - then 10 more created one at a time (each once the one before runs): p50 / max, the latency without a
//!   burst's queue on this 2-core machine;
//! - the CNI's share: the agents' `caracal_node_cni_add_seconds` histogram over the same pods (what ADD took in
//!   the agent: the address and the wiring) over all 60, its mean and the bucket its p99 falls in;
//! - the images' sizes (`target/images/images.json`).
//!
//! Timings are reported, never asserted.

#![expect(
    clippy::expect_used,
    reason = "a benchmark that cannot go on stops with the reason"
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::lab::{Lab, LabOptions, Runtime};
use caracal_e2e::measure::percentile;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use serde_json::json;

const PODS: usize = 50;
/// Pods then created one at a time.
const SEQUENTIAL: usize = 10;

/// A pod of the echo image bound to `lab-node-<node>`.
fn pod(name: &str, node: usize) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "startup"}},
        "spec": {
            "nodeName": format!("lab-node-{node}"),
            "containers": [{"name": "c", "image": concat!("caracal/echo:v", env!("CARGO_PKG_VERSION")), "args": ["8080/TCP"],
                            "ports": [{"containerPort": 8080}]}]
        }
    }))
    .expect("pod")
}

/// The `caracal_node_cni_add_seconds` histogram of one agent: (sum, count, buckets by upper bound).
fn cni_histogram(lab: &Lab, node: usize) -> (f64, f64, BTreeMap<String, f64>) {
    let text = lab.nodes[node]
        .1
        .enter(|| caracal_e2e::probe::http_get(9091, "/metrics"))
        .expect("enter the node")
        .expect("the agent's /metrics")
        .1;
    let (mut sum, mut count, mut buckets) = (0.0, 0.0, BTreeMap::new());
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let v: f64 = value.parse().unwrap_or(0.0);
        if name == "caracal_node_cni_add_seconds_sum" {
            sum = v;
        } else if name == "caracal_node_cni_add_seconds_count" {
            count = v;
        } else if let Some(le) = name
            .strip_prefix("caracal_node_cni_add_seconds_bucket{le=\"")
            .and_then(|r| r.strip_suffix("\"}"))
        {
            buckets.insert(le.to_owned(), v);
        }
    }
    (sum, count, buckets)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let mut opts = LabOptions::new(2, workspace_root().join("examples/installation-vxlan.yaml"));
    opts.runtime = Runtime::Containerd;
    let lab = Lab::up(&opts)
        .await
        .expect("real-node lab up (make bench builds the runtime and the images first)");
    let before: Vec<_> = (0..2).map(|i| cni_histogram(&lab, i)).collect();

    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(json!({"metadata": {"name": "startup"}})).expect("namespace");
    Api::<k8s_openapi::api::core::v1::Namespace>::all(lab.client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let api: Api<Pod> = Api::namespaced(lab.client.clone(), "startup");
    // Watch first, so no transition is missed.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let watch = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
            while let Some(Ok(ev)) = stream.next().await {
                let pods = match ev {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => vec![p],
                    _ => continue,
                };
                for p in pods {
                    let st = p.status.clone().unwrap_or_default();
                    if st.phase.as_deref() == Some("Running") && st.pod_ip.is_some() {
                        let _ = tx.send((p.metadata.name.clone().unwrap_or_default(), Instant::now()));
                    }
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut created = BTreeMap::new();
    let started = Instant::now();
    for i in 0..PODS {
        let name = format!("s{i}");
        let t = Instant::now();
        api.create(&PostParams::default(), &pod(&name, i % 2))
            .await
            .expect("create pod");
        created.insert(name, t);
    }
    let mut running: BTreeMap<String, Instant> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while running.len() < PODS {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((name, t))) => {
                running.entry(name).or_insert(t);
            }
            _ => panic!("{} of {PODS} pods Running after 300 s", running.len()),
        }
    }
    let all_running = started.elapsed().as_secs_f64();
    // One at a time: each pod created once the one before runs (the latency without a burst's queue).
    let mut alone = Vec::new();
    for i in 0..SEQUENTIAL {
        let name = format!("q{i}");
        let t = Instant::now();
        api.create(&PostParams::default(), &pod(&name, i % 2))
            .await
            .expect("create pod");
        loop {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some((n, at))) if n == name => {
                    alone.push(at.duration_since(t).as_secs_f64());
                    break;
                }
                Ok(Some(_)) => {}
                _ => panic!("{name} not Running after 60 s"),
            }
        }
    }
    alone.sort_by(f64::total_cmp);
    watch.abort();
    let mut startup: Vec<f64> = running
        .iter()
        .map(|(n, t)| t.duration_since(created[n]).as_secs_f64())
        .collect();
    startup.sort_by(f64::total_cmp);

    let after: Vec<_> = (0..2).map(|i| cni_histogram(&lab, i)).collect();
    let (mut sum, mut count) = (0.0, 0.0);
    let mut buckets: BTreeMap<String, f64> = BTreeMap::new();
    for (b, a) in before.iter().zip(&after) {
        sum += a.0 - b.0;
        count += a.1 - b.1;
        for (le, v) in &a.2 {
            *buckets.entry(le.clone()).or_default() += v - b.2.get(le).copied().unwrap_or(0.0);
        }
    }
    // The smallest bucket holding 99 % of the ADDs.
    let mut bounds: Vec<(f64, f64)> = buckets
        .iter()
        .map(|(le, v)| {
            (
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::INFINITY)
                },
                *v,
            )
        })
        .collect();
    bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let p99_bucket = bounds
        .iter()
        .find(|(_, v)| *v >= 0.99 * count)
        .map_or(f64::NAN, |(le, _)| *le);

    let images: serde_json::Value =
        std::fs::read_to_string(workspace_root().join("target/images/images.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
    let sizes: BTreeMap<String, serde_json::Value> = images
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            (
                k.clone(),
                json!({"compressed_bytes": v["compressed_bytes"], "uncompressed_bytes": v["uncompressed_bytes"]}),
            )
        })
        .collect();
    let report = json!({
        "nodes": 2,
        "runtime": "kubelet v1.34.4, containerd 2.3.7, runc 1.4.4",
        "pods": PODS,
        "pod_create_to_running_seconds": {
            "p50": percentile(&startup, 0.5),
            "p99": percentile(&startup, 0.99),
            "max": startup.last().copied().unwrap_or(f64::NAN),
        },
        "all_pods_running_after_seconds": all_running,
        "one_at_a_time": {
            "pods": SEQUENTIAL,
            "p50": percentile(&alone, 0.5),
            "max": alone.last().copied().unwrap_or(f64::NAN),
        },
        "cni_add_in_agent": {
            "adds": count,
            "mean_seconds": if count > 0.0 { sum / count } else { f64::NAN },
            "p99_at_most_seconds": p99_bucket,
            "share_of_mean_startup": if count > 0.0 {
                (sum / count) / (startup.iter().sum::<f64>() / startup.len() as f64)
            } else { f64::NAN },
        },
        "images": sizes,
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(
        out.join("podstartup.json"),
        serde_json::to_vec_pretty(&report).expect("json"),
    )
    .expect("write podstartup.json");
    lab.down();
}
