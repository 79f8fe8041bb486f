//! Lab tier: the whole system from `caracal-lab up` (control plane, operator from its manifest, three nodes
//! with lab kubelets and the real kube-proxy, the VXLAN Installation). The agents run inside their nodes'
//! namespaces. Pods pinned to the three nodes reach each other; the demo's policies are enforced, also on
//! its Services' traffic (pod -> ClusterIP over TCP and UDP reaches exactly the backends the policy allows,
//! affinity keeps a client on one, NodePorts answer from other nodes, scaling moves the backends); a
//! NetworkPolicy applied with kubectl
//! is enforced across nodes; and at every point the connectivity measured with real connections equals what
//! `caracalctl policy matrix` computes from the same objects read back from the API server. An invalid
//! Installation edit is Degraded and changes nothing; an edit from VXLAN to BGP with an explicit MTU rolls
//! the agents and connectivity comes back (BIRD's routes, new pods with the new MTU). A live switch to the
//! BPF data plane (`linuxDataplane: BPF`) keeps an established TCP connection between pods on two nodes and
//! leaves no iptables policy behind; in BPF mode connectivity equals the matrix, a NetworkPolicy applied with
//! kubectl is enforced across nodes, the Services work the same without kube-proxy (Caracal serves them and
//! removes the rules kube-proxy left), restarting a node agent keeps an established connection (pod to pod
//! and through a ClusterIP), and a deleted pod's endpoint entry leaves the maps; the switch back to iptables keeps the connection too and leaves no
//! BPF pin behind. Deleting a pod releases its address; deleting the Installation stops every agent and
//! Typha; tearing the lab down leaves no namespace behind. Needs root and the workspace's binaries
//! (`cargo test --workspace` builds them).

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

mod common;
#[path = "common/matrix.rs"]
mod matrix_probe;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::lab::{self, Lab, LabOptions};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use matrix_probe::{Echo, agrees, matrix_cells, recorded};
use serde_json::Value;

/// The demo's namespaces (where its Services are).
const DEMO: [&str; 3] = ["frontend", "backend", "data"];

/// Whether a measured Service cell is what the policy matrix implies: a ClusterIP cell reaches exactly the
/// backends the client may reach directly on the target port (a pod reaching itself included), or, with
/// `sessionAffinity: ClientIP`, exactly one of them; a NodePort cell from another node reaches every backend,
/// or with `externalTrafficPolicy: Local` exactly those on the node asked (the demo's NodePort Services are in
/// front of pods no policy selects).
fn service_cell_ok(cell: &Value, services: &Value, pods: &Value, matrix: &[Value]) -> Result<(), String> {
    let measured: BTreeSet<String> = cell["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b.as_str().map(str::to_owned))
        .collect();
    let to = cell["to"].as_str().unwrap_or("");
    let name = to
        .strip_prefix("svc:")
        .or_else(|| cell["service"].as_str())
        .unwrap_or("");
    let svc = services["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"] == name)
        .ok_or_else(|| format!("{to}: no recorded Service {name}"))?;
    let all: BTreeSet<String> = svc["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b.as_str().map(str::to_owned))
        .collect();
    if let Some(node) = to.strip_prefix("nodeport:") {
        // externalTrafficPolicy Local: only the backends on the node asked (none: no answer).
        let want: BTreeSet<String> = if svc["externalTrafficPolicy"] == "Local" {
            all.iter()
                .filter(|b| {
                    pods.as_array()
                        .into_iter()
                        .flatten()
                        .any(|p| p["ip"] == b.as_str() && p["node"] == node)
                })
                .cloned()
                .collect()
        } else {
            all.clone()
        };
        return if measured == want {
            Ok(())
        } else {
            Err(format!(
                "{cell}: reached {measured:?}, want {want:?} (externalTrafficPolicy {})",
                svc["externalTrafficPolicy"]
            ))
        };
    }
    let port = svc["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["port"] == cell["port"] && p["protocol"] == cell["protocol"])
        .ok_or_else(|| format!("{cell}: no such port"))?;
    let pod_of = |ip: &str| {
        pods.as_array()
            .into_iter()
            .flatten()
            .find(|p| p["ip"] == ip)
            .map(|p| p["pod"].clone())
    };
    let allowed: BTreeSet<String> = all
        .iter()
        .filter(|b| {
            pod_of(b).is_some_and(|pod| {
                matrix.iter().any(|m| {
                    m["from"] == cell["from"]
                        && m["to"] == pod
                        && m["port"] == port["targetPort"]
                        && m["protocol"] == cell["protocol"]
                        && m["allowed"] == true
                })
            })
        })
        .cloned()
        .collect();
    let ok = if svc["affinity"] == "ClientIP" && !allowed.is_empty() {
        measured.len() == 1 && measured.is_subset(&allowed)
    } else {
        measured == allowed
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{cell}: reached {measured:?}, the policy allows {allowed:?} (affinity {})",
            svc["affinity"]
        ))
    }
}

/// Probes every Service of the demo until each cell is what the policy matrix implies ([`service_cell_ok`]),
/// within a deadline; returns the cells.
async fn services_agree(lab: &Lab, what: &str) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let pods = lab.record_pods().await.expect("record");
        lab.wait_services(&DEMO).await.expect("Service endpoints");
        let services = lab.record_services(&DEMO).await.expect("record services");
        let matrix = matrix_cells(&lab.client, &pods).await;
        let (p, s) = (pods.clone(), services.clone());
        let measured =
            tokio::task::spawn_blocking(move || lab::probe_services(&p, &s, Duration::from_millis(800)))
                .await
                .expect("probe");
        let wrong: Vec<String> = measured
            .iter()
            .filter_map(|c| service_cell_ok(c, &services, &pods, &matrix).err())
            .collect();
        let kinds = ["svc:", "nodeport:"].map(|k| {
            measured
                .iter()
                .any(|c| c["to"].as_str().is_some_and(|t| t.starts_with(k)) && c["allowed"] == true)
        });
        if wrong.is_empty() && kinds == [true, true] {
            return measured;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{what}: Services disagree with the policy matrix ({} cells): {wrong:#?}",
            measured.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A third API pod joins the `api` Service and then leaves it: within the deadline, new connections use it,
/// then no longer do.
async fn scaling_moves_the_backends(lab: &Lab, what: &str) {
    let extra = lab.cp.dir().join("api-3.yaml");
    std::fs::write(
        &extra,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: api-3, namespace: backend, labels: {app: api}}\nspec:\n  containers: [{name: api, image: lab/echo, ports: [{containerPort: 8080}, {containerPort: 5353, protocol: UDP}]}]\n",
    )
    .expect("write");
    lab.apply(&extra).expect("api-3");
    lab.wait_pods(&["backend"]).await.expect("api-3 running");
    let ip = recorded(lab, "backend/api-3", "ip").await;
    let cells = services_agree(lab, &format!("{what}: scaled up")).await;
    assert!(
        cells.iter().any(|c| c["from"] == "frontend/web"
            && c["to"] == "svc:backend/api"
            && c["backends"]
                .as_array()
                .is_some_and(|b| b.iter().any(|x| x == ip.as_str()))),
        "{what}: the new backend {ip} is never used"
    );
    let out = lab
        .cp
        .kubectl()
        .args(["delete", "pod", "-n", "backend", "api-3", "--wait=true"])
        .output()
        .expect("kubectl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let start = Instant::now();
    loop {
        let cells = services_agree(lab, &format!("{what}: scaled down")).await;
        if !cells.iter().any(|c| {
            c["backends"]
                .as_array()
                .is_some_and(|b| b.iter().any(|x| x == ip.as_str()))
        }) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: the removed backend {ip} is still used"
        );
    }
}

/// The Services of the demo work in the data plane and proxy now running: [`services_agree`], then the cells
/// that show it plainly (web reaches both API pods over TCP and UDP, db reaches none, affinity keeps web on
/// one), then [`scaling_moves_the_backends`].
async fn services_work(lab: &Lab, what: &str) {
    let svc = services_agree(lab, what).await;
    let reached = |from: &str, to: &str, port: u64| {
        svc.iter()
            .find(|c| c["from"] == from && c["to"] == to && c["port"] == port)
            .and_then(|c| c["backends"].as_array().map(Vec::len))
    };
    for (from, to, port, want, why) in [
        (
            "frontend/web",
            "svc:backend/api",
            8080,
            2,
            "web reaches both API pods",
        ),
        (
            "frontend/web",
            "svc:backend/api",
            53,
            2,
            "web reaches both over UDP",
        ),
        (
            "data/db",
            "svc:backend/api",
            8080,
            0,
            "db is denied at the backends",
        ),
        (
            "frontend/web",
            "svc:backend/api-sticky",
            80,
            1,
            "affinity keeps web on one",
        ),
    ] {
        assert_eq!(reached(from, to, port), Some(want), "{what}: {why}");
    }
    scaling_moves_the_backends(lab, what).await;
}

/// The caracal-node DaemonSet's generation now.
async fn ds_generation(ds_api: &Api<k8s_openapi::api::apps::v1::DaemonSet>) -> Option<i64> {
    ds_api.get("caracal-node").await.expect("ds").metadata.generation
}

/// Waits until the caracal-node DaemonSet has a generation after `before` (the operator has applied the
/// edit) and has rolled it out to all three nodes.
async fn wait_rolled(ds_api: &Api<k8s_openapi::api::apps::v1::DaemonSet>, what: &str, before: Option<i64>) {
    let start = Instant::now();
    loop {
        let d = ds_api.get("caracal-node").await.expect("ds");
        let (generation, st) = (d.metadata.generation, d.status.unwrap_or_default());
        if generation > before
            && st.observed_generation == generation
            && st.updated_number_scheduled == Some(3)
            && st.number_ready == 3
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{what}: the agents never rolled: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The Node annotations node `i` has.
async fn node_annotations(lab: &Lab, i: usize) -> BTreeMap<String, String> {
    Api::<k8s_openapi::api::core::v1::Node>::all(lab.client.clone())
        .get(&lab.nodes[i].0)
        .await
        .expect("node")
        .metadata
        .annotations
        .unwrap_or_default()
}

/// WireGuard through the Installation, on the VXLAN lab: on, every node publishes a key and takes the others
/// as peers, and then a capture on the underlay sees only WireGuard's UDP between the nodes and never the
/// marker two pods exchange; policy is still what the matrix says; an established connection between pods on
/// two nodes survives on and off; a deleted key file makes a new key and the pods talk again; off, the
/// devices go and pod traffic is VXLAN again. The toggle never rolls the DaemonSet (the agents take it from
/// FelixConfiguration).
async fn wireguard_on_and_off(lab: &Lab, edit: &impl Fn(&str)) {
    use caracal_e2e::capture::{between, capture, carries};
    use caracal_node::routing::model::annotation;
    let ds_api: Api<k8s_openapi::api::apps::v1::DaemonSet> =
        Api::namespaced(lab.client.clone(), "caracal-system");
    let generation = ds_generation(&ds_api).await;
    let vxlan = |wireguard: &str| {
        format!(
            "  calicoNetwork:\n    linuxDataplane: Iptables\n    bgp: Disabled\n    wireguard: {wireguard}\n    ipPools: [{{name: default-ipv4-ippool, cidr: 10.244.0.0/16, encapsulation: VXLAN, natOutgoing: Enabled, nodeSelector: all(), blockSize: 26}}]\n    nodeAddressAutodetectionV4: {{firstFound: true}}\n  nodeUpdateStrategy: {{type: RollingUpdate, rollingUpdate: {{maxUnavailable: 1}}}}\n"
        )
    };
    let mut held = Echo::open(lab, "e2e/p2", "e2e/p0").await;
    edit(&vxlan("Enabled"));
    // Every node has a key and a device address, and nobody talks to anybody in the clear.
    let start = Instant::now();
    loop {
        let mut ready = 0;
        for i in 0..lab.nodes.len() {
            let a = node_annotations(lab, i).await;
            let device = lab.nodes[i].1.ip(&["link", "show", "wg.caracal"]).is_ok();
            if a.contains_key(annotation::WIREGUARD_PUBLIC_KEY)
                && a.contains_key(annotation::IPV4_WIREGUARD_INTERFACE_ADDR)
                && !a.contains_key(annotation::WIREGUARD_UNENCRYPTED_PEERS)
                && device
            {
                ready += 1;
            }
        }
        if ready == lab.nodes.len() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "WireGuard did not come up on every node ({ready} of {})",
            lab.nodes.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    held.check("after WireGuard on");
    let marker = "caracal-lab-wireguard-marker-5d1e";
    let (node0, node2) = (lab.nodes[0].2.into(), lab.nodes[2].2.into());
    let ((), frames) = capture(&lab.underlay.ns, || held.check(marker));
    // The matrix (policy enforced as before) measured through the tunnels.
    agrees(lab, "with WireGuard on").await;
    // Between the two nodes: the pods' packets as WireGuard's UDP, and the nodes' own traffic, which WireGuard
    // does not carry (as Calico without host encryption): an agent's connection to Typha on the other node.
    let seen = between(&frames, node0, node2);
    let wireguard = |s: &&caracal_e2e::capture::Seen| s.proto == 17 && s.sport == 51820 && s.dport == 51820;
    let typha = |s: &&caracal_e2e::capture::Seen| s.proto == 6 && (s.sport == 5473 || s.dport == 5473);
    assert!(
        seen.iter().any(|s| wireguard(&s)),
        "the pods' packets crossed the underlay: {seen:?}"
    );
    assert!(
        seen.iter().all(|s| wireguard(&s) || typha(&s)),
        "only WireGuard (and the agents' Typha connection) between the nodes while it is on: {seen:?}"
    );
    assert!(
        !carries(&frames, marker.as_bytes()),
        "the marker never appears on the wire"
    );
    assert_eq!(
        ds_generation(&ds_api).await,
        generation,
        "the toggle does not roll the DaemonSet"
    );

    // Rotation: node 0's key file deleted; it makes a new key, publishes it, the others take it, and the
    // held connection (p2 on node 2 to p0 on node 0) talks again.
    let key_file = lab::lab_dir()
        .join("nodes")
        .join(&lab.nodes[0].0)
        .join("var/lib/caracal/wireguard/private.key");
    let old = node_annotations(lab, 0).await[annotation::WIREGUARD_PUBLIC_KEY].clone();
    std::fs::remove_file(&key_file).expect("delete node 0's WireGuard key file");
    let start = Instant::now();
    loop {
        let now = node_annotations(lab, 0).await[annotation::WIREGUARD_PUBLIC_KEY].clone();
        if now != old {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no new key after the key file was deleted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file)
            .expect("a new key file")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    held.check("after the key rotation");
    println!(
        "WireGuard key rotation: new key published and the held connection answered {:.1} s after the key file was deleted",
        start.elapsed().as_secs_f64()
    );

    // Off: devices gone, traffic back on VXLAN, the held connection still there.
    edit(&vxlan("Disabled"));
    let start = Instant::now();
    while lab
        .nodes
        .iter()
        .any(|n| n.1.ip(&["link", "show", "wg.caracal"]).is_ok())
    {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the WireGuard devices stayed after WireGuard off"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    held.check("after WireGuard off");
    let ((), frames) = capture(&lab.underlay.ns, || held.check("in the clear again"));
    let seen = between(&frames, node0, node2);
    assert!(
        seen.iter().any(|s| s.proto == 17 && s.dport == 4789),
        "VXLAN again after WireGuard off: {seen:?}"
    );
    for i in 0..lab.nodes.len() {
        assert!(
            !node_annotations(lab, i)
                .await
                .contains_key(annotation::WIREGUARD_PUBLIC_KEY),
            "node {i} still publishes a WireGuard key"
        );
    }
    agrees(lab, "after WireGuard off").await;
}

/// Node `i`'s BPF pins: its own bpffs, where the lab kubelet mounted the DaemonSet's `/sys/fs/bpf`.
fn bpf_pins(lab: &Lab, i: usize) -> std::path::PathBuf {
    lab::lab_dir()
        .join("nodes")
        .join(&lab.nodes[i].0)
        .join("sys/fs/bpf/caracal")
}

/// The IPv4 ClusterIP of Service `ns/name`.
async fn cluster_ip(lab: &Lab, ns: &str, name: &str) -> std::net::Ipv4Addr {
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(lab.client.clone(), ns)
        .get(name)
        .await
        .expect("the Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("ClusterIP")
        .parse()
        .expect("IPv4")
}

/// The endpoint entries in node `i`'s BPF maps.
fn bpf_endpoint_entries(lab: &Lab, i: usize) -> usize {
    let pins = bpf_pins(lab, i);
    lab.nodes[i]
        .1
        .enter(move || {
            caracal_node::dataplane::bpf::Loaded::load(&pins)
                .and_then(|mut l| l.endpoint_entries())
                .map(|e| e.len())
                .expect("the node's BPF maps")
        })
        .expect("enter")
}

/// Lines of the iptables policy (filter table) in node `i`.
fn policy_rules(lab: &Lab, i: usize) -> usize {
    lab.nodes[i]
        .1
        .exec(&["iptables-save", "-t", "filter"])
        .expect("iptables-save")
        .lines()
        .filter(|l| l.contains("crc-"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lab_runs_caracal_end_to_end_and_measured_connectivity_matches_the_policy_matrix() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let lab = Lab::up(&LabOptions::new(
        3,
        workspace_root().join("examples/installation-vxlan.yaml"),
    ))
    .await
    .expect("lab up");
    // The DaemonSet's agents run as processes inside their node's network namespace.
    for (i, (name, ns, _)) in lab.nodes.iter().enumerate() {
        let node_net = ns
            .enter(|| std::fs::read_link("/proc/thread-self/ns/net"))
            .expect("enter")
            .expect("netns link");
        let pids: Vec<u32> = lab.host_pods[i]
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, _)| k.starts_with("caracal-system/caracal-node-"))
            .flat_map(|(_, p)| p.pids())
            .collect();
        assert!(!pids.is_empty(), "no agent process on {name}");
        for pid in pids {
            let net = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("process netns");
            assert_eq!(
                net, node_net,
                "the agent on {name} runs outside its node's namespace"
            );
        }
    }
    lab.apply(&workspace_root().join("e2e/lab/demo.yaml"))
        .expect("demo");
    let pinned = lab.cp.dir().join("pinned.yaml");
    let mut text = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: e2e}\n");
    for i in 0..3 {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: e2e, labels: {{app: p{i}}}}}\nspec:\n  nodeName: lab-node-{i}\n  containers: [{{name: c, image: lab/echo, ports: [{{containerPort: 9000}}]}}]\n"
        ));
    }
    std::fs::write(&pinned, text).expect("write");
    lab.apply(&pinned).expect("pinned pods");
    lab.wait_pods(&["frontend", "backend", "data", "e2e"])
        .await
        .expect("pods");

    let cells = agrees(&lab, "after start").await;
    // Pods on three different nodes reach each other (over VXLAN), and the demo's policies deny.
    let cell = |from: &str, to: &str, port: u64| {
        cells
            .iter()
            .find(|c| c["from"] == from && c["to"] == to && c["port"] == port)
            .map(|c| c["allowed"] == true)
    };
    for (a, b) in [("e2e/p0", "e2e/p1"), ("e2e/p1", "e2e/p2"), ("e2e/p2", "e2e/p0")] {
        assert_eq!(cell(a, b, 9000), Some(true), "{a} -> {b}");
    }
    assert_eq!(cell("frontend/web", "backend/api", 8080), Some(true));
    assert_eq!(cell("frontend/web", "data/db", 5432), Some(false));

    // Services through the real kube-proxy (iptables mode): pod -> ClusterIP (TCP and UDP) reaches every
    // backend the client's policy allows, each connection judged at the backend after kube-proxy's DNAT;
    // affinity keeps a client on one backend; NodePort from another node; scaling moves the backends.
    services_work(&lab, "iptables mode, kube-proxy").await;

    // A NetworkPolicy applied with kubectl isolates p2; the measurement follows across nodes.
    let deny = lab.cp.dir().join("deny.yaml");
    std::fs::write(
        &deny,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: isolate-p2, namespace: e2e}\nspec: {podSelector: {matchLabels: {app: p2}}, policyTypes: [Ingress]}\n",
    )
    .expect("write");
    lab.apply(&deny).expect("deny");
    let cells = agrees(&lab, "after the NetworkPolicy").await;
    let denied = cells
        .iter()
        .filter(|c| c["to"] == "e2e/p2" && c["allowed"] == false)
        .count();
    assert!(denied >= 2, "p2 is not isolated: {cells:?}");

    // An invalid Installation edit is reported Degraded and changes nothing that runs.
    let ds_api: Api<k8s_openapi::api::apps::v1::DaemonSet> =
        Api::namespaced(lab.client.clone(), "caracal-system");
    let ds_version = ds_api
        .get("caracal-node")
        .await
        .expect("ds")
        .metadata
        .resource_version;
    let edit = |body: &str| {
        let path = lab.cp.dir().join("installation-edit.yaml");
        std::fs::write(&path, format!("apiVersion: operator.caracal.dev/v1\nkind: Installation\nmetadata: {{name: default}}\nspec:\n{body}")).expect("write");
        lab.apply(&path).expect("apply the edit");
    };
    edit(
        "  calicoNetwork:\n    bgp: Disabled\n    ipPools: [{name: default-ipv4-ippool, cidr: 10.244.0.0/16, encapsulation: IPIP, natOutgoing: Enabled, nodeSelector: all(), blockSize: 26}]\n",
    );
    let installations: Api<caracal_crds::installation::Installation> = Api::all(lab.client.clone());
    let start = Instant::now();
    loop {
        let degraded = installations
            .get("default")
            .await
            .expect("installation")
            .status
            .is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Degraded" && c.status == "True")
            });
        if degraded {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the invalid edit was not reported Degraded"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        ds_api
            .get("caracal-node")
            .await
            .expect("ds")
            .metadata
            .resource_version,
        ds_version,
        "an invalid edit must not touch the DaemonSet"
    );
    agrees(&lab, "after an invalid edit").await;

    wireguard_on_and_off(&lab, &edit).await;

    // VXLAN -> BGP with an explicit MTU: the agents roll through the DaemonSet, BIRD carries the routes, the
    // VXLAN device goes, connectivity comes back, and a new pod gets the new MTU.
    let bgp_from = ds_generation(&ds_api).await;
    edit(
        "  calicoNetwork:\n    bgp: Enabled\n    mtu: 1400\n    ipPools: [{name: default-ipv4-ippool, cidr: 10.244.0.0/16, encapsulation: None, natOutgoing: Enabled, nodeSelector: all(), blockSize: 26}]\n    nodeAddressAutodetectionV4: {firstFound: true}\n  nodeUpdateStrategy: {type: RollingUpdate, rollingUpdate: {maxUnavailable: 1}}\n",
    );
    wait_rolled(&ds_api, "VXLAN -> BGP", bgp_from).await;
    let start = Instant::now();
    loop {
        let bird = lab.nodes[0]
            .1
            .ip(&["route", "show", "proto", "bird"])
            .unwrap_or_default();
        let vxlan_gone = lab.nodes[0].1.ip(&["link", "show", "vxlan.caracal"]).is_err();
        if bird.lines().count() >= 2 && vxlan_gone {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "BGP routes never arrived: {bird}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    agrees(&lab, "after VXLAN -> BGP").await;
    std::fs::write(
        &pinned,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p3, namespace: e2e, labels: {app: p3}}\nspec:\n  nodeName: lab-node-2\n  containers: [{name: c, image: lab/echo, ports: [{containerPort: 9000}]}]\n",
    )
    .expect("write");
    lab.apply(&pinned).expect("p3");
    lab.wait_pods(&["e2e"]).await.expect("p3 running");
    let p3_ns = recorded(&lab, "e2e/p3", "netns").await;
    let link = caracal_e2e::netns::NetNs::existing(&p3_ns)
        .ip(&["-o", "link", "show", "eth0"])
        .expect("link");
    assert!(
        link.contains("mtu 1400"),
        "the explicit MTU reaches new pods: {link}"
    );
    agrees(&lab, "with a pod started under BGP").await;

    // Iptables -> BPF through the Installation: the agents roll, each converging its BPF programs before
    // removing the iptables policy, so an established connection between pods on two nodes keeps going.
    let bgp_bpf = |dataplane: &str| {
        format!(
            "  calicoNetwork:\n    bgp: Enabled\n    mtu: 1400\n    linuxDataplane: {dataplane}\n    ipPools: [{{name: default-ipv4-ippool, cidr: 10.244.0.0/16, encapsulation: None, natOutgoing: Enabled, nodeSelector: all(), blockSize: 26}}]\n    nodeAddressAutodetectionV4: {{firstFound: true}}\n  nodeUpdateStrategy: {{type: RollingUpdate, rollingUpdate: {{maxUnavailable: 1}}}}\n"
        )
    };
    let mut across = Echo::open(&lab, "e2e/p0", "e2e/p1").await;
    assert!(
        policy_rules(&lab, 0) > 0,
        "the iptables policy is in place before the switch"
    );
    // As Calico documents the switch to its eBPF data plane: the operator is given the API server's address
    // (the kubernetes-services-endpoint ConfigMap), kube-proxy stops (its rules stay behind), then the
    // Installation changes; the BPF agents remove kube-proxy's rules and serve Services themselves.
    // A connection through a ClusterIP opened under kube-proxy, kept across the switch (the kernel's
    // connection tracker goes on translating it).
    let web_ns = caracal_e2e::netns::NetNs::existing(&recorded(&lab, "frontend/web", "netns").await);
    let api_vip = cluster_ip(&lab, "backend", "api").await;
    let whoami = |s: &mut std::net::TcpStream| {
        use std::io::{Read as _, Write as _};
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(caracal_e2e::probe::WHOAMI)?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    };
    let mut kube_proxy_vip = web_ns
        .enter(move || std::net::TcpStream::connect_timeout(&(api_vip, 8080).into(), Duration::from_secs(3)))
        .expect("enter")
        .expect("connect web -> api's ClusterIP under kube-proxy");
    let kube_proxy_backend = whoami(&mut kube_proxy_vip).expect("through kube-proxy");
    lab.give_api_server_address()
        .await
        .expect("the API server's address");
    lab.stop_kube_proxy();
    let bpf_from = ds_generation(&ds_api).await;
    edit(&bgp_bpf("BPF"));
    wait_rolled(&ds_api, "Iptables -> BPF", bpf_from).await;
    across.check("after the switch to BPF");
    assert_eq!(
        whoami(&mut kube_proxy_vip)
            .expect("the ClusterIP connection opened under kube-proxy, after the switch"),
        kube_proxy_backend,
        "a ClusterIP connection opened under kube-proxy keeps its backend after the switch to BPF"
    );
    drop(kube_proxy_vip);
    let start = Instant::now();
    for (name, ns, _) in &lab.nodes {
        loop {
            let nat = ns.exec(&["iptables-save", "-t", "nat"]).unwrap_or_default();
            if !nat.contains("KUBE-SERVICES") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "{name}: kube-proxy's rules were not removed:\n{nat}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for i in 0..3 {
        assert_eq!(
            policy_rules(&lab, i),
            0,
            "{}: iptables policy left behind",
            lab.nodes[i].0
        );
        assert!(
            bpf_endpoint_entries(&lab, i) >= 1,
            "{}: no BPF endpoint",
            lab.nodes[i].0
        );
    }
    agrees(&lab, "in BPF mode").await;
    // A NetworkPolicy applied with kubectl in BPF mode: p1 admits only p0, across nodes.
    let only_p0 = lab.cp.dir().join("only-p0.yaml");
    std::fs::write(
        &only_p0,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p1-from-p0, namespace: e2e}\nspec:\n  podSelector: {matchLabels: {app: p1}}\n  policyTypes: [Ingress]\n  ingress: [{from: [{podSelector: {matchLabels: {app: p0}}}]}]\n",
    )
    .expect("write");
    lab.apply(&only_p0).expect("p1-from-p0");
    let cells = agrees(&lab, "after a NetworkPolicy in BPF mode").await;
    let to_p1 = |from: &str| {
        cells
            .iter()
            .find(|c| c["from"] == from && c["to"] == "e2e/p1" && c["port"] == 9000)
            .map(|c| c["allowed"] == true)
    };
    assert_eq!(to_p1("e2e/p0"), Some(true), "p0 -> p1 in BPF mode");
    assert_eq!(to_p1("e2e/p3"), Some(false), "p3 -> p1 in BPF mode");
    across.check("with the NetworkPolicy in place");

    // Services without kube-proxy: the same cells as in iptables mode, from Caracal's programs.
    services_work(&lab, "BPF mode, no kube-proxy").await;
    // A connection through a ClusterIP, held across the agent restart below.
    let mut via_vip = web_ns
        .enter(move || std::net::TcpStream::connect_timeout(&(api_vip, 8080).into(), Duration::from_secs(3)))
        .expect("enter")
        .expect("connect web -> api's ClusterIP");
    let vip_backend = whoami(&mut via_vip).expect("through the ClusterIP");
    // Connect-time load balancing: every node registered its own namespace and its pods' with its socket
    // programs, and the connection above got its backend at connect(): getpeername() still says the
    // ClusterIP, while no node's tracker translates it per packet.
    for i in 0..3 {
        let pins = bpf_pins(&lab, i);
        let registered = caracal_node::dataplane::bpf::ctlb::registered(&pins).expect("registrations");
        let host = registered
            .iter()
            .filter(|(_, e)| e.flags & caracal_node::dataplane::bpf::ctlb::CTLB_HOST != 0)
            .count();
        assert_eq!(
            host, 1,
            "{}: the node's own namespace registered once",
            lab.nodes[i].0
        );
        assert!(
            registered.len() > 1,
            "{}: its pods registered: {registered:?}",
            lab.nodes[i].0
        );
        for (name, _) in caracal_node::dataplane::bpf::ctlb::SOCKET_HOOKS {
            assert!(
                pins.join(caracal_node::dataplane::bpf::ctlb::LINKS)
                    .join(name)
                    .exists(),
                "{}: {name} is not on the cgroup",
                lab.nodes[i].0
            );
        }
    }
    assert_eq!(
        via_vip.peer_addr().expect("peer"),
        std::net::SocketAddr::from((api_vip, 8080)),
        "getpeername() of a connection translated at connect()"
    );
    // The nodes' own processes reach a ClusterIP too (TCP, given its backend at connect()): before
    // connect-time load balancing nothing translated a host's connection without kube-proxy. (frontend/web:
    // its pods admit everyone.)
    let web_vip = cluster_ip(&lab, "frontend", "web").await;
    for (name, ns, _) in &lab.nodes {
        let from_node = caracal_e2e::probe::whoami(ns, (web_vip, 80).into(), "TCP", Duration::from_secs(3));
        assert!(
            from_node.as_ref().is_ok_and(|ip| !ip.is_empty()),
            "{name}: the node's own connection to the ClusterIP: {from_node:?}"
        );
    }
    let vip_port = via_vip.local_addr().expect("local").port();
    for i in 0..3 {
        let translated: Vec<_> = caracal_node::dataplane::bpf::sweep::entries(&bpf_pins(&lab, i))
            .expect("tracker")
            .into_iter()
            .filter(|(k, v)| (k.sport == vip_port || k.dport == vip_port) && v.nat != 0)
            .collect();
        assert!(
            translated.is_empty(),
            "{}: the ClusterIP connection translated per packet: {translated:?}",
            lab.nodes[i].0
        );
    }

    // Restarting a node agent in BPF mode (its pod deleted; the DaemonSet brings a new one) keeps an
    // established TCP connection between pods on two nodes working: the programs and maps stay pinned and
    // the new agent adopts them.
    let p0_ns = recorded(&lab, "e2e/p0", "netns").await;
    let p1_ip: std::net::Ipv4Addr = recorded(&lab, "e2e/p1", "ip").await.parse().expect("ip");
    let ns = caracal_e2e::netns::NetNs::existing(&p0_ns);
    let mut stream = ns
        .enter(move || std::net::TcpStream::connect_timeout(&(p1_ip, 9000).into(), Duration::from_secs(3)))
        .expect("enter")
        .expect("connect p0 -> p1");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let echo = |s: &mut std::net::TcpStream, msg: &[u8]| {
        use std::io::{Read as _, Write as _};
        let mut buf = vec![0u8; msg.len()];
        s.write_all(msg)
            .and_then(|()| s.read_exact(&mut buf))
            .map(|()| buf == msg)
    };
    assert!(echo(&mut stream, b"before").expect("echo before"));
    let node_pods: Api<Pod> = Api::namespaced(lab.client.clone(), "caracal-system");
    let agent = node_pods
        .list(&ListParams::default().labels("k8s-app=caracal-node"))
        .await
        .expect("agents")
        .items
        .into_iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("lab-node-1"))
        .expect("the agent on lab-node-1");
    let old = agent.metadata.name.clone().expect("name");
    node_pods
        .delete(&old, &Default::default())
        .await
        .expect("delete agent pod");
    let start = Instant::now();
    loop {
        let fresh = node_pods
            .list(&ListParams::default().labels("k8s-app=caracal-node"))
            .await
            .expect("agents")
            .items
            .into_iter()
            .find(|p| {
                p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("lab-node-1")
                    && p.metadata.name.as_deref() != Some(old.as_str())
            });
        let ready = fresh.is_some_and(|p| {
            p.status
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
        if ready {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the restarted agent never became Ready"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Give a retransmission time to land (the first packets may meet the restart).
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    assert!(
        echo(&mut stream, b"after the agent restart").expect("echo after"),
        "the established connection broke"
    );
    drop(stream);
    assert_eq!(
        whoami(&mut via_vip).expect("the ClusterIP connection after the agent restart"),
        vip_backend,
        "the connection through the ClusterIP kept its backend across the restart"
    );
    drop(via_vip);

    // Deleting a pod releases its address.
    let p2_ip = recorded(&lab, "e2e/p2", "ip").await;
    let node2_entries = bpf_endpoint_entries(&lab, 2);
    Api::<Pod>::namespaced(lab.client.clone(), "e2e")
        .delete("p2", &Default::default())
        .await
        .expect("delete p2");
    common::wait_released(&lab.client, p2_ip.parse().expect("ip"), Duration::from_secs(60)).await;
    // Its endpoint entry leaves node-2's maps (the node's other pods' stay).
    let start = Instant::now();
    while bpf_endpoint_entries(&lab, 2) != node2_entries - 1 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the deleted pod's BPF endpoint entry stayed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // BPF -> Iptables: kube-proxy back first; the connection keeps going, and no BPF pin is left on any node.
    lab.start_kube_proxy(caracal_e2e::kubeproxy::Mode::Iptables)
        .expect("kube-proxy again");
    let ipt_from = ds_generation(&ds_api).await;
    edit(&bgp_bpf("Iptables"));
    wait_rolled(&ds_api, "BPF -> Iptables", ipt_from).await;
    across.check("after the switch back to iptables");
    for i in 0..3 {
        assert!(
            policy_rules(&lab, i) > 0,
            "{}: no iptables policy",
            lab.nodes[i].0
        );
        let pins = bpf_pins(&lab, i);
        let left: Vec<_> = std::fs::read_dir(&pins)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "{}: BPF pins left behind: {left:?}",
            lab.nodes[i].0
        );
    }
    agrees(&lab, "back in iptables mode").await;
    services_agree(&lab, "back in iptables mode, kube-proxy again").await;
    drop(across);

    // Deleting the Installation tears Caracal down: the operator's objects go, and with them every agent and
    // Typha process on the nodes.
    installations
        .delete("default", &Default::default())
        .await
        .expect("delete the Installation");
    let start = Instant::now();
    loop {
        let gone = installations.get_opt("default").await.expect("get").is_none()
            && ds_api.get_opt("caracal-node").await.expect("get").is_none();
        let processes: usize = lab
            .host_pods
            .iter()
            .map(|h| h.lock().map(|m| m.len()).unwrap_or(0))
            .sum();
        if gone && processes == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "teardown incomplete: objects gone {gone}, {processes} host pods still running"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let names: Vec<String> = lab.nodes.iter().map(|(_, ns, _)| ns.name().to_owned()).collect();
    lab.down();
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let left = String::from_utf8_lossy(&left.stdout);
    for n in names {
        assert!(!left.contains(&n), "{n} left behind");
    }
}
