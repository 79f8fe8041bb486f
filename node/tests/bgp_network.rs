//! Kernel + cluster tier: three nodes with BGP and no encapsulation. Each agent renders BIRD's
//! configuration and runs Debian's `bird` in its node namespace; the node-to-node mesh comes up
//! (every session Established), each node's kernel learns the other nodes' blocks from BIRD, and pods on
//! all nodes reach each other over TCP, UDP and ICMP. Dual stack: the same BIRD also runs IPv6 sessions
//! between the nodes' IPv6 addresses and carries the IPv6 blocks, and pods reach each other over IPv6. Needs
//! root and bird2 (`make deps` installs it).

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use caracal_crds::ippool::EncapMode;
use caracal_e2e::cluster::{TestCluster, unreachable_pairs, unreachable_pairs_v6};
use serde_json::json;

fn birdc(state: &Path, args: &[&str]) -> String {
    let out = Command::new("birdc")
        .arg("-s")
        .arg(state.join("bird/bird.ctl"))
        .args(args)
        .output()
        .expect("birdc (Debian bird2; make deps installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn bgp_mesh_with_bird_carries_pod_routes_between_three_nodes() {
    mesh("10.95.10.0/24", None).await;
}

#[tokio::test]
async fn bgp_mesh_with_bird_carries_ipv6_pod_routes_between_three_dual_stack_nodes() {
    mesh("10.95.50.0/24", Some("fd00:95:50::/64")).await;
}

/// Three nodes on `underlay` (dual stack with `ipv6`), BGP on, pools without encapsulation: the mesh comes
/// up in every family, the kernels learn the other nodes' blocks from BIRD, and every pod pair connects.
async fn mesh(underlay: &str, ipv6: Option<&str>) {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let mut c = TestCluster::with_underlay(
        3,
        Path::new(env!("CARGO_BIN_EXE_caracal-node")),
        &caracal_e2e::controlplane::workspace_bin("caracal-cni"),
        underlay,
    )
    .await
    .expect("cluster");
    c.agent_env.push(("CARACAL_BGP".into(), "Enabled".into()));
    if let Some(net) = ipv6 {
        c.enable_ipv6(net).expect("IPv6 underlay");
        caracal_e2e::objects::ippool(
            &c.client,
            "bgp-pool-v6",
            "fd10:245::/48",
            EncapMode::Never,
            EncapMode::Never,
            false,
        )
        .await
        .expect("IPv6 pool");
    }
    let families = if ipv6.is_some() { 2 } else { 1 };
    caracal_e2e::objects::ippool(
        &c.client,
        "bgp-pool",
        "10.245.0.0/16",
        EncapMode::Never,
        EncapMode::Never,
        true,
    )
    .await
    .expect("pool");
    c.start_agents().await.expect("agents");
    let pods = c.pod_on_each_node("demo", "b", json!({})).await.expect("ADD");

    // Every node's BIRD has two Established sessions, and its kernel has the other nodes' blocks.
    let start = Instant::now();
    loop {
        let mut pending = Vec::new();
        for n in &c.nodes {
            let protocols = birdc(&n.state, &["show", "protocols"]);
            let established = protocols
                .lines()
                .filter(|l| l.contains("BGP") && l.contains("Established"))
                .count();
            let mut routes = n.ns.ip(&["route", "show", "proto", "bird"]).unwrap_or_default();
            let mut learned = routes.lines().filter(|l| l.starts_with("10.245.")).count();
            if ipv6.is_some() {
                let routes6 =
                    n.ns.ip(&["-6", "route", "show", "proto", "bird"])
                        .unwrap_or_default();
                // Each family must have learned both other nodes' blocks.
                learned = learned.min(routes6.lines().filter(|l| l.starts_with("fd10:245:")).count());
                routes.push_str(&routes6);
            }
            if established != 2 * families || learned < 2 {
                pending.push(format!(
                    "{}: {established} sessions, {learned} learned routes\n{protocols}\n{routes}",
                    n.name
                ));
            }
        }
        if pending.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "BGP never converged:\n{}",
            pending.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // No VXLAN device: BGP carries the routes.
    assert!(c.nodes[0].ns.ip(&["link", "show", "vxlan.caracal"]).is_err());

    let start = Instant::now();
    loop {
        let mut failed = unreachable_pairs(&pods, Duration::from_millis(700));
        if ipv6.is_some() {
            failed.extend(unreachable_pairs_v6(&pods, Duration::from_millis(700)));
        }
        if failed.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "pods unreachable over BGP routes: {failed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
