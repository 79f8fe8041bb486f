//! Kernel + cluster tier: the lab kubelet's workload side on two nodes. Pods written to the API server are
//! given a namespace and an address through the real plugin, serve TCP and UDP echo on their declared
//! ports, and have `status.podIP` reported; a pod on one node reaches the other's servers over VXLAN; a
//! NetworkPolicy written to the API denies it; deleting a pod calls DEL, releases its address, and the pod
//! object goes away. Needs root.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use caracal_crds::ippool::EncapMode;
use caracal_e2e::cluster::TestCluster;
use caracal_e2e::kubelet::{KubeletConfig, Pods};
use caracal_e2e::probe::{self, Outcome};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

const T: Duration = Duration::from_millis(700);

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_lab_kubelet_runs_workload_pods_through_the_plugin_and_tears_them_down() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let mut c = TestCluster::with_underlay(
        2,
        Path::new(env!("CARGO_BIN_EXE_caracal-node")),
        &caracal_e2e::controlplane::workspace_bin("caracal-cni"),
        "10.95.30.0/24",
    )
    .await
    .expect("cluster");
    caracal_e2e::objects::ippool(
        &c.client,
        "lab-pool",
        "10.247.0.0/16",
        EncapMode::Always,
        EncapMode::Never,
        false,
    )
    .await
    .expect("pool");
    caracal_e2e::objects::namespace(&c.client, "shop", json!({}))
        .await
        .expect("namespace");
    c.start_agents().await.expect("agents");

    let mut kubelets = Vec::new();
    let mut pods: Vec<Pods> = Vec::new();
    for n in &c.nodes {
        let cfg = KubeletConfig {
            node: n.name.clone(),
            node_ns: n.ns.name().to_owned(),
            host_ip: n.ip,
            plugin: c.plugin_bin.clone(),
            conf: caracal_e2e::cni::caracal_conf(&n.socket),
            host: None,
        };
        let running = Pods::default();
        pods.push(running.clone());
        kubelets.push(tokio::spawn(cfg.run(
            c.client.clone(),
            running,
            Default::default(),
        )));
    }
    let api: Api<Pod> = Api::namespaced(c.client.clone(), "shop");
    for (name, node, labels, ports) in [
        (
            "web",
            "node-0",
            json!({"app": "web"}),
            json!([{"containerPort": 80}]),
        ),
        (
            "db",
            "node-1",
            json!({"app": "db"}),
            json!([{"containerPort": 5432}, {"containerPort": 5353, "protocol": "UDP"}]),
        ),
    ] {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "lab/echo", "ports": ports}]}
        }))
        .expect("pod");
        api.create(&PostParams::default(), &pod)
            .await
            .expect("create pod");
    }
    let running = |i: usize, key: &str| pods[i].lock().map(|m| m.contains_key(key)).unwrap_or(false);
    until("both pods running", || {
        running(0, "shop/web") && running(1, "shop/db")
    })
    .await;
    let db = api.get("db").await.expect("db");
    let db_ip: std::net::Ipv4Addr = db
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .expect("status.podIP reported");
    assert_eq!(
        db.status.as_ref().and_then(|s| s.host_ip.as_deref()),
        Some("10.95.30.3")
    );
    let web_probe = |f: &dyn Fn(&caracal_e2e::netns::NetNs) -> bool| {
        let m = pods[0].lock().expect("lock");
        f(&m["shop/web"].ns)
    };

    // web (node-0) reaches db's servers (node-1) over TCP and UDP.
    until("web -> db over TCP and UDP", || {
        web_probe(&|ns| {
            probe::tcp_echo(ns, db_ip, 5432, T).is_ok_and(|o| o.connected())
                && probe::udp_echo(ns, db_ip, 5353, T).is_ok_and(|o| o.connected())
        })
    })
    .await;

    // A NetworkPolicy selecting db with no ingress rule denies it.
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "db-deny"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"]}
    }))
    .expect("np");
    Api::<NetworkPolicy>::namespaced(c.client.clone(), "shop")
        .create(&PostParams::default(), &np)
        .await
        .expect("create policy");
    until("db denied", || {
        web_probe(&|ns| probe::tcp_echo(ns, db_ip, 5432, T).is_ok_and(|o| o == Outcome::NoAnswer))
    })
    .await;

    // Deleting db: DEL, namespace removed, address released, object gone.
    api.delete("db", &DeleteParams::default()).await.expect("delete");
    until("db stopped", || !running(1, "shop/db")).await;
    let start = Instant::now();
    while api.get_opt("db").await.expect("get").is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the pod object never went away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::wait_released(&c.client, std::net::IpAddr::V4(db_ip), Duration::from_secs(30)).await;
    for k in kubelets {
        k.abort();
    }
}
