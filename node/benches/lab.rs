//! `make bench` figures for the lab, written to `target/bench/lab.json` (warm build, the whole system as
//! `caracal-lab up` runs it, 3 nodes):
//! - time from start to the first connectivity table (control plane, operator, agents, demo, probe);
//! - policy write -> enforced: a NetworkPolicy isolating a pod on another node is created and deleted 50
//!   times; each time, from the API write until a real connection sees the change, p50 / p99;
//! - memory (RSS) of each component with 60 pods.
//!
//! Timings are reported, never asserted.

#![expect(
    clippy::expect_used,
    reason = "a benchmark that cannot go on stops with the reason"
)]

use std::time::{Duration, Instant};

use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::lab::{self, Lab, LabOptions};
use caracal_e2e::measure::percentile;
use caracal_e2e::netns::NetNs;
use caracal_e2e::probe;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let start = Instant::now();
    let lab = Lab::up(&LabOptions::new(
        3,
        workspace_root().join("examples/installation-vxlan.yaml"),
    ))
    .await
    .expect("lab up (make bench builds the workspace first)");
    lab.apply(&workspace_root().join("e2e/lab/demo.yaml"))
        .expect("demo");
    lab.wait_pods(&["frontend", "backend", "data"])
        .await
        .expect("demo pods");
    let pods = lab.record_pods().await.expect("record");
    let mut first_table = None;
    while first_table.is_none() {
        let cells = lab::probe(&pods, Duration::from_millis(500));
        // The demo allows web -> api:8080 once policy is programmed: the first complete table.
        if cells
            .iter()
            .any(|c| c["from"] == "frontend/web" && c["port"] == 8080 && c["allowed"] == true)
        {
            first_table = Some(start.elapsed().as_secs_f64());
        }
    }

    // Two pods on different nodes; a policy isolating the server is written and removed 50 times.
    let pinned = lab.cp.dir().join("bench-pods.yaml");
    let mut text = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n");
    for (name, node) in [("client", 0), ("server", 1)] {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {{app: {name}}}}}\nspec:\n  nodeName: lab-node-{node}\n  containers: [{{name: c, image: lab/echo, ports: [{{containerPort: 7000}}]}}]\n"
        ));
    }
    std::fs::write(&pinned, text).expect("write");
    lab.apply(&pinned).expect("bench pods");
    lab.wait_pods(&["bench"]).await.expect("bench pods");
    let recorded = lab.record_pods().await.expect("record");
    let find = |name: &str| {
        recorded
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["pod"] == name)
            .cloned()
            .expect("pod")
    };
    let client_ns = NetNs::existing(find("bench/client")["netns"].as_str().expect("netns"));
    let server_ip: std::net::Ipv4Addr = find("bench/server")["ip"]
        .as_str()
        .expect("ip")
        .parse()
        .expect("ip");
    // An allowed connection answers in well under a millisecond here, so 30 ms without an answer means the
    // SYN was dropped.
    let connects = || {
        probe::tcp_echo(&client_ns, server_ip, 7000, Duration::from_millis(30)).is_ok_and(|o| o.connected())
    };
    // Probes until a connection shows `want`; returns when the first probe that showed it started (the change
    // was in effect by then), so the figure does not include the probe's own timeout.
    let wait_for = |want: bool| -> Instant {
        let t = Instant::now();
        loop {
            let started = Instant::now();
            if connects() == want {
                return started;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "policy never took effect");
        }
    };
    wait_for(true);
    let api: Api<NetworkPolicy> = Api::namespaced(lab.client.clone(), "bench");
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "isolate"},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"]}
    }))
    .expect("np");
    let mut latencies = Vec::new();
    for _ in 0..25 {
        let t = Instant::now();
        api.create(&PostParams::default(), &np).await.expect("create");
        latencies.push(wait_for(false).duration_since(t).as_secs_f64() * 1e3);
        let t = Instant::now();
        api.delete("isolate", &DeleteParams::default())
            .await
            .expect("delete");
        latencies.push(wait_for(true).duration_since(t).as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);

    // 60 pods (20 per node), then every component's memory.
    let many = lab.cp.dir().join("bench-many.yaml");
    let mut text = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: many}\n");
    for i in 0..60 {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: m{i}, namespace: many, labels: {{app: m{}}}}}\nspec:\n  nodeName: lab-node-{}\n  containers: [{{name: c, image: lab/echo, ports: [{{containerPort: 80}}]}}]\n",
            i % 5,
            i % 3
        ));
    }
    std::fs::write(&many, text).expect("write");
    lab.apply(&many).expect("60 pods");
    lab.wait_pods(&["many"]).await.expect("60 pods");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut memory = serde_json::Map::new();
    for (i, h) in lab.host_pods.iter().enumerate() {
        let m = h.lock().expect("lock");
        for pod in m.values() {
            for (name, pid) in pod.named_pids() {
                memory.insert(
                    format!("{name} on lab-node-{i}"),
                    json!(caracal_e2e::measure::rss_kib(&pid.to_string())),
                );
            }
        }
    }
    if let Some(pid) = lab.operator_pid() {
        memory.insert(
            "caracal-operator".into(),
            json!(caracal_e2e::measure::rss_kib(&pid.to_string())),
        );
    }
    let figures = json!({
        "nodes": 3,
        "first_connectivity_table_seconds": first_table,
        "policy_write_to_enforced_ms": {
            "n": latencies.len(),
            "p50": percentile(&latencies, 0.5),
            "p99": percentile(&latencies, 0.99),
            "max": latencies.last().copied().unwrap_or(0.0),
        },
        "rss_kib_with_60_pods": memory,
        "note": "warm build; policy latency from the API write until a real TCP connection between pods on two nodes sees the change: back-to-back probes (30 ms timeout), the time is when the first probe that showed the change started",
    });
    println!("{}", serde_json::to_string_pretty(&figures).expect("json"));
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(
        out.join("lab.json"),
        serde_json::to_string_pretty(&figures).expect("json"),
    )
    .expect("write");
    lab.down();
}
