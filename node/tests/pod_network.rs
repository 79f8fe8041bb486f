//! Kernel + cluster tier: three nodes as namespaces on an underlay bridge, each running the real
//! `caracal-node`, pods created through the real `caracal-cni` plugin. With a VXLAN pool, pods on all nodes
//! reach each other over TCP, UDP and ICMP; a pod reaches an "outside" namespace through natOutgoing
//! (the outside sees the node's address); nodes publish their addresses; pods get the MTU minus VXLAN's
//! overhead; a deleted route and a deleted FDB entry come back; CHECK and STATUS answer; a DEL for another
//! sandbox of a pod leaves the pod's interface; DEL after the pod's namespace is gone succeeds and the address
//! is released. All of it with the iptables data plane and again
//! with the BPF data plane, where also: a restarted agent keeps an established TCP connection between pods on
//! two nodes (and the programs keep enforcing while it is down), and a deleted pod's endpoint entry leaves
//! the maps. Needs root.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

mod common;
#[path = "common/established.rs"]
mod established;

use established::Established;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use caracal_crds::ippool::EncapMode;
use caracal_e2e::cluster::TestCluster;
use caracal_e2e::cni::Invocation;
use caracal_e2e::netns::NetNs;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use serde_json::json;

const PROBE: Duration = Duration::from_millis(700);

async fn pool(client: &kube::Client, cidr: &str, vxlan: EncapMode) {
    caracal_e2e::objects::ippool(client, "default-ipv4", cidr, vxlan, EncapMode::Never, true)
        .await
        .expect("pool");
}

/// Retries a probe until it connects or the deadline passes (routes and policy program asynchronously).
async fn connects(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} never connected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn pods_on_three_nodes_reach_each_other_over_vxlan_and_the_outside_through_nat() {
    three_nodes("Iptables").await;
}

#[tokio::test]
async fn pods_on_three_nodes_reach_each_other_over_vxlan_and_the_outside_through_nat_in_bpf_mode() {
    three_nodes("BPF").await;
}

/// The endpoint entries the BPF data plane of node `i` holds (its pinned maps, read in its namespace).
fn bpf_endpoints(c: &TestCluster, i: usize) -> usize {
    let pins = caracal_node::dataplane::bpf::backend::pin_dir(&c.nodes[i].ns.exec_prefix());
    c.nodes[i]
        .ns
        .enter(move || {
            caracal_node::dataplane::bpf::Loaded::load(&pins)
                .and_then(|mut l| l.endpoint_entries())
                .map(|e| e.len())
                .expect("the BPF maps")
        })
        .expect("enter")
}

async fn three_nodes(dataplane: &str) {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let bpf = dataplane == "BPF";
    let mut c = TestCluster::new(
        3,
        Path::new(env!("CARGO_BIN_EXE_caracal-node")),
        &caracal_e2e::controlplane::workspace_bin("caracal-cni"),
    )
    .await
    .expect("cluster");
    c.agent_env.push(("CARACAL_REFRESH_SECONDS".into(), "2".into()));
    c.agent_env.push(("CARACAL_DATAPLANE".into(), dataplane.into()));
    pool(&c.client, "10.244.0.0/16", EncapMode::Always).await;
    c.start_agents().await.expect("agents");

    let mut pods = c
        .pod_on_each_node("demo", "p", json!({"app": "x"}))
        .await
        .expect("ADD");
    // Every pod has its own address from the pool, and an MTU of the underlay's 1500 minus VXLAN's 50.
    let mut ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3);
    assert!(pods.iter().all(|p| {
        "10.244.0.0/16"
            .parse::<ipnet::Ipv4Net>()
            .expect("net")
            .contains(&p.ip)
    }));
    let link = pods[0].ns.ip(&["-o", "link", "show", "eth0"]).expect("link");
    assert!(link.contains("mtu 1450"), "{link}");

    // Nodes publish their underlay address and VTEP; the VXLAN device has Felix's defaults.
    let nodes = Api::<Node>::all(c.client.clone());
    let n0 = nodes.get("node-0").await.expect("node");
    let ann = n0.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        ann.get("caracal.dev/IPv4Address").map(String::as_str),
        Some("10.97.0.2/24")
    );
    assert!(ann.contains_key("caracal.dev/IPv4VXLANTunnelAddr"), "{ann:?}");
    let dev = c.nodes[0]
        .ns
        .ip(&["-d", "link", "show", "vxlan.caracal"])
        .expect("vxlan device");
    assert!(
        dev.contains("vxlan id 4096") && dev.contains("dstport 4789"),
        "{dev}"
    );

    connects("every pod pair over TCP, UDP and ICMP", || {
        let failed = caracal_e2e::cluster::unreachable_pairs(&pods, PROBE);
        if !failed.is_empty() {
            eprintln!("not yet: {failed:?}");
        }
        failed.is_empty()
    })
    .await;

    if bpf {
        // One endpoint entry per local pod; a restarted agent keeps an established connection between
        // nodes, and the programs keep enforcing while it is down.
        for i in 0..3 {
            assert_eq!(bpf_endpoints(&c, i), 1, "node-{i}");
        }
        let mut conn = Established::open(&pods[0].ns, &pods[1].ns, pods[1].ip, 7070);
        conn.roundtrip("before the restart");
        if let Some(mut a) = c.nodes[1].agent.take() {
            a.stop(Duration::from_secs(10));
        }
        conn.roundtrip("while node-1's agent is down");
        c.start_agent(1).expect("restart");
        c.wait_ready(1).await.expect("ready again");
        conn.roundtrip("after node-1's agent restarted");
        assert_eq!(bpf_endpoints(&c, 1), 1);
    }

    // natOutgoing: a namespace on the underlay outside every pool sees the node's address.
    let outside = NetNs::new("out").expect("outside");
    c.underlay
        .attach(&outside, "eth0", Ipv4Addr::new(10, 97, 0, 200))
        .expect("attach");
    let peer = caracal_e2e::probe::source_seen_by(
        &pods[1].ns,
        &outside,
        "10.97.0.200:9000".parse().expect("addr"),
        Duration::from_secs(3),
    )
    .expect("pod -> outside");
    assert_eq!(
        peer,
        std::net::IpAddr::V4(c.nodes[1].ip),
        "masqueraded to node-1's address"
    );

    // Drift: a deleted remote-block route and a deleted FDB entry come back within the refresh interval.
    let routes = c.nodes[0]
        .ns
        .ip(&["route", "show", "proto", "80"])
        .expect("routes");
    let remote = routes
        .lines()
        .find(|l| l.contains("dev vxlan.caracal"))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .expect("a route through the VXLAN device");
    c.nodes[0]
        .ns
        .ip(&["route", "del", &remote])
        .expect("delete route");
    let fdb = c.nodes[0]
        .ns
        .exec(&["bridge", "fdb", "show", "dev", "vxlan.caracal"])
        .expect("fdb");
    let entry = fdb
        .lines()
        .find(|l| l.contains("dst"))
        .expect("an FDB entry")
        .to_owned();
    let mac = entry.split_whitespace().next().expect("mac").to_owned();
    let dst = entry
        .split_whitespace()
        .skip_while(|w| *w != "dst")
        .nth(1)
        .expect("dst")
        .to_owned();
    c.nodes[0]
        .ns
        .exec(&["bridge", "fdb", "del", &mac, "dev", "vxlan.caracal", "dst", &dst])
        .expect("delete fdb");
    // An entry for a peer that does not exist is removed.
    c.nodes[0]
        .ns
        .exec(&[
            "bridge",
            "fdb",
            "append",
            "66:00:00:00:00:99",
            "dev",
            "vxlan.caracal",
            "dst",
            "10.97.0.99",
        ])
        .expect("stray fdb");
    connects(
        "the deleted route and FDB entry restored, the stray one removed",
        || {
            let r = c.nodes[0]
                .ns
                .ip(&["route", "show", "proto", "80"])
                .unwrap_or_default();
            let f = c.nodes[0]
                .ns
                .exec(&["bridge", "fdb", "show", "dev", "vxlan.caracal"])
                .unwrap_or_default();
            r.lines().any(|l| l.starts_with(&format!("{remote} ")))
                && f.contains(&mac)
                && !f.contains("66:00:00:00:00:99")
        },
    )
    .await;

    // CHECK and STATUS answer success.
    let path0 = format!("/run/netns/{}", pods[0].ns.name());
    let check_p0 = |when: &str| {
        let (code, out) = c
            .cni(
                0,
                &Invocation {
                    command: "CHECK",
                    container_id: &pods[0].container_id,
                    netns: &path0,
                    ifname: "eth0",
                    pod: Some(("demo", "p0")),
                },
            )
            .expect("CHECK");
        assert_eq!(code, 0, "CHECK {when}: {out}");
    };
    check_p0("of a wired pod");
    let status = c
        .cni(
            0,
            &Invocation {
                command: "STATUS",
                container_id: "",
                netns: "",
                ifname: "",
                pod: None,
            },
        )
        .expect("STATUS");
    assert_eq!(status.0, 0, "STATUS: {}", status.1);

    // A DEL for another sandbox of the same pod (the kubelet removes a sandbox whose ADD failed after the
    // pod's next one is wired) succeeds and leaves the live sandbox's interface: CHECK still passes.
    let (code, out) = c
        .cni(
            0,
            &Invocation {
                command: "DEL",
                container_id: "an-earlier-sandbox-of-p0",
                netns: "",
                ifname: "eth0",
                pod: Some(("demo", "p0")),
            },
        )
        .expect("DEL of another sandbox");
    assert_eq!(code, 0, "DEL of another sandbox: {out}");
    check_p0("after a DEL for another sandbox of the pod");

    // DEL after the pod's namespace is gone succeeds, twice, and the address goes back to the pool.
    let gone = pods.pop().expect("pod");
    let gone_ip = gone.ip;
    let (node, cid) = (gone.node, gone.container_id.clone());
    drop(gone.ns);
    for _ in 0..2 {
        let (code, out) = c
            .cni(
                node,
                &Invocation {
                    command: "DEL",
                    container_id: &cid,
                    netns: "",
                    ifname: "eth0",
                    pod: Some(("demo", "p2")),
                },
            )
            .expect("DEL");
        assert_eq!(code, 0, "DEL: {out}");
    }
    common::wait_released(&c.client, std::net::IpAddr::V4(gone_ip), Duration::from_secs(20)).await;
    if bpf {
        // The deleted pod's endpoint entry leaves the maps of its node.
        connects("the deleted pod's endpoint entry removed", || {
            bpf_endpoints(&c, node) == 0
        })
        .await;
    }
    for i in 0..3 {
        assert!(
            c.nodes[i].agent.as_mut().expect("agent").check_running().is_ok(),
            "{}",
            c.agent_log(i, 30)
        );
    }
}
