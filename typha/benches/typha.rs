//! `make bench` figures for Typha, written to `target/bench/typha.json`: one `caracal-typha` process
//! (the real binary, fed by the real API server) and 1,000 lightweight clients on loopback (in this
//! process, mutual TLS each):
//! - fan-out latency: from an API write to the last of the 1,000 clients receiving it, p50 / p99;
//! - Typha's memory per connected client (its RSS before and after the clients connect);
//! - Typha's CPU time during a burst of 1,000 pod updates;
//! - the watches the API server holds, by resource, whatever the client count.
//!
//! Timings are reported, never asserted.

#![expect(
    clippy::expect_used,
    reason = "a benchmark that cannot go on stops with the reason"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use caracal_datastore::Update;
use caracal_datastore::typha::{client, tls};
use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::measure::summary_ms as summary;
use serde_json::json;
use tokio::sync::mpsc;

const CLIENTS: usize = 1000;

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Watches the API server holds now, by resource (its own `apiserver_longrunning_requests`).
async fn watches(kc: &kube::Client) -> std::collections::BTreeMap<String, f64> {
    let metrics = kc
        .request_text(http::Request::get("/metrics").body(Vec::new()).expect("req"))
        .await
        .expect("metrics");
    let mut out = std::collections::BTreeMap::new();
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_longrunning_requests{") && l.contains("verb=\"WATCH\""))
    {
        let resource = l
            .split("resource=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("?")
            .to_owned();
        let n: f64 = l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        *out.entry(resource).or_insert(0.0) += n;
    }
    out
}

#[tokio::main]
async fn main() {
    let (cp, kc) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    // PKI for Typha, in its own directory.
    let dir = cp.dir().join("typha-pki");
    let pki = caracal_e2e::pki::TyphaPki::generate().expect("pki");
    let [ca_path, tcrt, tkey, _, _] = pki.write(&dir).expect("write pki");
    let baseline = watches(&kc).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let mut typha = std::process::Command::new(workspace_root().join("target/release/caracal-typha"))
        .env("KUBECONFIG", cp.kubeconfig())
        .env("CARACAL_TYPHA_LISTEN_HOST", "127.0.0.1")
        .env("CARACAL_TYPHA_PORT", port.to_string())
        .env("CARACAL_TYPHA_HEALTH_PORT", "0")
        .env("CARACAL_TYPHA_METRICS_PORT", "0")
        .env("CARACAL_TYPHA_CA_FILE", &ca_path)
        .env("CARACAL_TYPHA_CERT_FILE", &tcrt)
        .env("CARACAL_TYPHA_KEY_FILE", &tkey)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("caracal-typha (cargo build --release --bin caracal-typha first; make bench does)");
    let pid = typha.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = proc_status(pid, "VmRSS:");

    // 1,000 clients; each forwards the names of namespaces it sees to a shared collector.
    let tls_cfg = tls::client_config(&pki.ca, &pki.node.0, &pki.node.1).expect("tls");
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    for i in 0..CLIENTS {
        let (tx, mut rx) = mpsc::channel::<Update>(1024);
        let cfg = client::Config::new(vec![addr.clone()], &format!("bench-{i}"));
        tokio::spawn(client::run(cfg, tls_cfg.clone(), tx));
        let seen = seen_tx.clone();
        tokio::spawn(async move {
            while let Some(u) = rx.recv().await {
                if let Update::Upsert { kind, key, .. } = u
                    && kind == "v1/Namespace"
                    && key.starts_with("mark-")
                {
                    let _ = seen.send((key, Instant::now()));
                }
            }
        });
    }
    // Wait until every client is connected (each sees the first marker).
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(kc.clone());
    let mut latencies = Vec::new();
    for round in 0..21 {
        let name = format!("mark-{round}");
        let t = Instant::now();
        namespaces
            .create(
                &Default::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns"),
            )
            .await
            .expect("create");
        let mut got = 0;
        let mut last = t;
        let deadline = Instant::now() + Duration::from_secs(if round == 0 { 120 } else { 30 });
        while got < CLIENTS && Instant::now() < deadline {
            if let Ok(Some((key, at))) = tokio::time::timeout(Duration::from_secs(1), seen_rx.recv()).await
                && key == name
            {
                got += 1;
                last = at;
            }
        }
        assert_eq!(got, CLIENTS, "round {round}: only {got} clients saw the write");
        // Round 0 includes connecting 1,000 clients; it is not a fan-out sample.
        if round > 0 {
            latencies.push((last - t).as_secs_f64() * 1e3);
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    let rss_after = proc_status(pid, "VmRSS:");

    // A burst of 1,000 pod updates (label edits on 50 pods), 20 at a time.
    caracal_e2e::objects::namespace(&kc, "burst", json!({}))
        .await
        .expect("ns");
    for i in 0..50 {
        caracal_e2e::objects::pod(
            &kc,
            "burst",
            &format!("p{i}"),
            json!({}),
            "n1",
            &format!("10.99.0.{}", i + 1),
        )
        .await
        .expect("pod");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(kc.clone(), "burst");
    let cpu0 = cpu_seconds(pid);
    let t = Instant::now();
    let pods = Arc::new(pods);
    for chunk in (0..1000).collect::<Vec<usize>>().chunks(20) {
        let mut set = tokio::task::JoinSet::new();
        for i in chunk {
            let pods = pods.clone();
            let i = *i;
            set.spawn(async move {
                let patch = json!({"metadata": {"labels": {"gen": i.to_string()}}});
                pods.patch(
                    &format!("p{}", i % 50),
                    &Default::default(),
                    &kube::api::Patch::Merge(&patch),
                )
                .await
                .map(|_| ())
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("task").expect("patch");
        }
    }
    let burst_s = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = cpu_seconds(pid) - cpu0;

    // Watches Typha added on the API server, by resource: one each, whatever the client count.
    let now = watches(&kc).await;
    let added: serde_json::Map<String, serde_json::Value> = now
        .iter()
        .filter_map(|(r, n)| {
            let d = n - baseline.get(r).copied().unwrap_or(0.0);
            (d != 0.0).then(|| (r.clone(), json!(d)))
        })
        .collect();
    let _ = typha.kill();
    let _ = typha.wait();
    let report = json!({
        "benchmark": "typha",
        "machine": "2 cores, 24 GiB; Typha, kube-apiserver and the 1,000 clients share the machine",
        "clients": CLIENTS,
        "connect_all_and_first_delivery_s": connect_s,
        "fanout_write_to_last_client": summary(latencies),
        "typha_rss_kib": {"before_clients": rss_before, "with_clients": rss_after, "per_client_kib": (rss_after.saturating_sub(rss_before)) as f64 / CLIENTS as f64},
        "burst_1000_pod_updates": {"api_seconds": burst_s, "typha_cpu_seconds": cpu},
        "watches_added_by_typha_by_resource": added,
    });
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    let text = serde_json::to_string_pretty(&report).expect("json");
    std::fs::write(out.join("typha.json"), &text).expect("write");
    println!("{text}");
}
