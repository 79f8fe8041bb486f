//! Kernel + cluster tier: with an IPIP pool, the agents create `tunl0`, route each remote block through it
//! to the node's underlay address, and pods on two nodes reach each other. This kernel has no ipip module:
//! the test probes for it first and reports `SKIP` when it is missing (the only skip the project allows).
//! On such a kernel the agent logs that IPIP cannot be programmed; the routing unit tests pin the routes.
//! Where it runs it also changes FelixConfiguration's `ipipMTU` (tunl0 takes it) and `ipipEnabled` (false
//! takes IPIP's routes away although the pool asks for it).

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use caracal_crds::ippool::EncapMode;
use caracal_e2e::cluster::{TestCluster, unreachable_pairs};
use caracal_e2e::netns::NetNs;
use serde_json::json;

/// Whether this kernel can create an IPIP device (it loads the module on demand when it has one).
fn ipip_supported() -> bool {
    let ns = NetNs::new("ipipprobe").expect("namespace");
    ns.ip(&[
        "link",
        "add",
        "probe0",
        "type",
        "ipip",
        "remote",
        "192.0.2.1",
        "local",
        "192.0.2.2",
    ])
    .is_ok()
}

#[tokio::test]
async fn ipip_routes_carry_pod_traffic_between_nodes() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    if !ipip_supported() {
        // Written to the stream directly: the test harness captures `println!`, and the SKIP line must show
        // in `make test`'s output.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIP ipip_routes_carry_pod_traffic_between_nodes: ipip kernel module missing\n",
        );
        return;
    }
    let mut c = TestCluster::with_underlay(
        2,
        Path::new(env!("CARGO_BIN_EXE_caracal-node")),
        &caracal_e2e::controlplane::workspace_bin("caracal-cni"),
        "10.95.20.0/24",
    )
    .await
    .expect("cluster");
    caracal_e2e::objects::ippool(
        &c.client,
        "ipip-pool",
        "10.246.0.0/16",
        EncapMode::Never,
        EncapMode::Always,
        false,
    )
    .await
    .expect("pool");
    c.start_agents().await.expect("agents");
    let pods = c.pod_on_each_node("demo", "t", json!({})).await.expect("ADD");
    let routes = c.nodes[0]
        .ns
        .ip(&["route", "show", "proto", "80"])
        .expect("routes");
    let start = Instant::now();
    loop {
        let failed = unreachable_pairs(&pods, Duration::from_millis(700));
        if failed.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "pods unreachable over IPIP: {failed:?}\n{routes}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let routes = c.nodes[0]
        .ns
        .ip(&["route", "show", "proto", "80"])
        .expect("routes");
    assert!(routes.contains("dev tunl0"), "{routes}");

    // FelixConfiguration: ipipMTU sets tunl0's MTU; ipipEnabled false takes IPIP's routes away although the
    // pool asks for it.
    let felix = kube::Api::<caracal_crds::felix::FelixConfiguration>::all(c.client.clone());
    let apply = |spec: serde_json::Value| {
        let felix = felix.clone();
        async move {
            felix
                .patch(
                    "default",
                    &kube::api::PatchParams::apply("ipip-test").force(),
                    &kube::api::Patch::Apply(json!({
                        "apiVersion": "caracal.dev/v1", "kind": "FelixConfiguration",
                        "metadata": {"name": "default"}, "spec": spec})),
                )
                .await
                .expect("FelixConfiguration");
        }
    };
    apply(json!({"ipipMTU": 1400})).await;
    let start = Instant::now();
    while !c.nodes[0]
        .ns
        .ip(&["link", "show", "tunl0"])
        .unwrap_or_default()
        .contains(" mtu 1400 ")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "tunl0 never took ipipMTU"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    apply(json!({"ipipEnabled": false})).await;
    let start = Instant::now();
    loop {
        let routes = c.nodes[0]
            .ns
            .ip(&["route", "show", "proto", "80"])
            .unwrap_or_default();
        if !routes.contains("dev tunl0") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "ipipEnabled false left IPIP routes:\n{routes}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
