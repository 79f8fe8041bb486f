//! Kernel + cluster tier: `services` rules (Calico's ServiceMatch) on real TCP connections between pods on
//! two nodes, each running the real `caracal-node`, pods created through the real `caracal-cni` plugin.
//!
//! The test cluster runs no kube-controller-manager, so the Service `shop/web` is created without a
//! selector and its EndpointSlice is written through the API as a controller would write it (label
//! `kubernetes.io/service-name`, the target port, `conditions.ready/serving`); the endpoints are "scaled"
//! by editing the slice. A Caracal NetworkPolicy default-denies the client's egress except to
//! `destination: {services: {name: web}}`, another admits into `db` only `source: {services: {name:
//! web}}`. After every change the connections allowed must be exactly the expected ones, and the offline
//! evaluator (`caracal_policy`, what `caracalctl` runs), fed the objects read back from the API, must give
//! the same verdicts. Needs root.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use caracal_crds::ippool::EncapMode;
use caracal_e2e::cluster::{TestCluster, TestPod};
use caracal_e2e::probe::{self, Outcome};
use caracal_policy::eval::evaluate;
use caracal_policy::load::load_documents;
use caracal_policy::matrix::{self, ProbePort};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const NS: &str = "shop";
const PROBE: Duration = Duration::from_millis(700);
/// How long a change may take to reach both nodes' data planes on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(90);
/// The Service's target port: what its EndpointSlice lists and what the rule allows.
const TARGET: u16 = 8080;
/// Another port the same pods listen on, never allowed.
const OTHER_PORT: u16 = 9090;
const DB_PORT: u16 = 5432;
const SLICE: &str = "web-7k2qp";

/// (client, server, TCP port, allowed).
type Check = (&'static str, &'static str, u16, bool);

/// An endpoint of the slice: (pod, ready and serving).
type SliceEndpoint = (&'static str, bool);

fn policies() -> Vec<Value> {
    vec![
        json!({"apiVersion": "caracal.dev/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "client-egress", "namespace": NS},
               "spec": {"selector": "app == 'client'", "types": ["Egress"],
                        "egress": [{"action": "Allow", "destination": {"services": {"name": "web"}}}]}}),
        json!({"apiVersion": "caracal.dev/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "db-ingress", "namespace": NS},
               "spec": {"selector": "app == 'db'", "types": ["Ingress"],
                        "ingress": [{"action": "Allow", "source": {"services": {"name": "web"}}}]}}),
    ]
}

/// The slice an EndpointSlice controller would write for `endpoints`, owned by the Service.
fn slice(service_uid: &str, pods: &BTreeMap<&str, TestPod>, endpoints: &[SliceEndpoint]) -> EndpointSlice {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(name, up)| {
            json!({"addresses": [pods[name].ip.to_string()],
                   "conditions": {"ready": up, "serving": up, "terminating": false},
                   "nodeName": format!("node-{}", pods[name].node),
                   "targetRef": {"kind": "Pod", "namespace": NS, "name": name}})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": SLICE, "namespace": NS,
                     "labels": {"kubernetes.io/service-name": "web",
                                "endpointslice.kubernetes.io/managed-by": "caracal-e2e.caracal.dev"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web",
                                          "uid": service_uid, "controller": true}]},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TARGET, "protocol": "TCP"}],
        "endpoints": eps
    }))
    .expect("EndpointSlice")
}

async fn write_slice(c: &TestCluster, s: &EndpointSlice) {
    Api::<EndpointSlice>::namespaced(c.client.clone(), NS)
        .patch(
            SLICE,
            &PatchParams::apply("caracal-e2e").force(),
            &Patch::Apply(s),
        )
        .await
        .expect("apply EndpointSlice");
}

/// The offline verdicts for `checks`, from the objects as the API server now holds them.
async fn offline(c: &TestCluster, checks: &[Check]) -> Vec<bool> {
    let mut docs = Vec::new();
    let ns = Api::<Namespace>::all(c.client.clone())
        .get(NS)
        .await
        .expect("namespace");
    docs.push(serde_json::to_value(ns).expect("json"));
    let lp = ListParams::default();
    for p in Api::<Pod>::namespaced(c.client.clone(), NS)
        .list(&lp)
        .await
        .expect("pods")
    {
        docs.push(serde_json::to_value(p).expect("json"));
    }
    for s in Api::<EndpointSlice>::namespaced(c.client.clone(), NS)
        .list(&lp)
        .await
        .expect("slices")
    {
        docs.push(serde_json::to_value(s).expect("json"));
    }
    for p in policies() {
        let obj: DynamicObject = serde_json::from_value(p).expect("policy");
        let api = caracal_e2e::crds::api_for(&c.client, &obj).expect("a Caracal kind");
        let name = obj.metadata.name.clone().expect("name");
        if let Some(p) = api.get_opt(&name).await.expect("policy") {
            docs.push(serde_json::to_value(p).expect("json"));
        }
    }
    let docs = docs.into_iter().map(|d| ("api".to_owned(), d)).collect();
    let loaded = load_documents(docs).expect("the API's objects load");
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let world = loaded.world;
    let find = |name: &str| {
        world
            .endpoints
            .iter()
            .find(|e| e.key() == format!("{NS}/{name}"))
            .unwrap_or_else(|| panic!("no pod {name} offline"))
    };
    checks
        .iter()
        .map(|(from, to, port, _)| {
            let port = ProbePort {
                port: *port,
                protocol: 6,
            };
            let pkt = matrix::packet(find(from), find(to), port).expect("packet");
            evaluate(&world, &pkt).allowed()
        })
        .collect()
}

/// The checks that real connections do not (yet) answer as expected: allowed means connected, denied
/// means dropped (no answer).
fn wrong(pods: &BTreeMap<&str, TestPod>, checks: &[Check]) -> Vec<String> {
    checks
        .iter()
        .filter_map(|&(from, to, port, allowed)| {
            let (a, b) = (&pods[from], &pods[to]);
            let seen = probe::tcp(&a.ns, &b.ns, b.ip, port, PROBE).expect("probe");
            let ok = if allowed {
                seen == Outcome::Connected
            } else {
                seen == Outcome::NoAnswer
            };
            (!ok).then(|| format!("{from} -> {to}:{port}: expected allowed={allowed}, saw {seen:?}"))
        })
        .collect()
}

/// Polls until every check holds on real packets, then asserts the offline evaluator agrees.
async fn expect(c: &TestCluster, pods: &BTreeMap<&str, TestPod>, what: &str, checks: &[Check]) {
    let start = Instant::now();
    loop {
        let failed = wrong(pods, checks);
        if failed.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: after {DEADLINE:?} still\n{}\nnode-0:\n{}\nnode-1:\n{}",
            failed.join("\n"),
            c.agent_log(0, 20),
            c.agent_log(1, 20)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!(
        "{what}: every check holds after {:?} (probe rounds included)",
        start.elapsed()
    );
    let want: Vec<bool> = checks.iter().map(|c| c.3).collect();
    assert_eq!(
        offline(c, checks).await,
        want,
        "{what}: the offline evaluator disagrees with the packets for {checks:?}"
    );
}

#[tokio::test]
async fn services_rules_follow_the_endpoint_slice_on_real_packets_and_offline() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let mut c = TestCluster::with_underlay(
        2,
        Path::new(env!("CARGO_BIN_EXE_caracal-node")),
        &caracal_e2e::controlplane::workspace_bin("caracal-cni"),
        "10.95.60.0/24",
    )
    .await
    .expect("cluster");
    caracal_e2e::objects::ippool(
        &c.client,
        "svc-pool",
        "10.248.0.0/16",
        EncapMode::Always,
        EncapMode::Never,
        false,
    )
    .await
    .expect("pool");
    caracal_e2e::objects::namespace(&c.client, NS, json!({}))
        .await
        .expect("namespace");
    c.start_agents().await.expect("agents");

    // node-0: the client and one backend; node-1: two backends, the database and a pod no Service names.
    let mut pods = BTreeMap::new();
    for (node, name, app) in [
        (0, "client", "client"),
        (0, "web-1", "web"),
        (1, "web-0", "web"),
        (1, "web-2", "web"),
        (1, "db", "db"),
        (1, "other", "other"),
    ] {
        let pod = c.add_pod(node, NS, name, json!({"app": app})).await.expect("ADD");
        c.report_pod_ips(&pod).await.expect("pod status");
        pods.insert(name, pod);
    }
    expect(
        &c,
        &pods,
        "no policy: the pods reach each other across nodes",
        &[
            ("client", "web-0", TARGET, true),
            ("client", "web-1", OTHER_PORT, true),
            ("client", "other", TARGET, true),
            ("other", "db", DB_PORT, true),
            ("web-1", "db", DB_PORT, true),
        ],
    )
    .await;

    // The Service (no selector: its slices are written here, as a controller would) and its first slice:
    // web-0 serving, web-2 not ready yet.
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": TARGET, "protocol": "TCP"}]}
    }))
    .expect("service");
    let svc = Api::<Service>::namespaced(c.client.clone(), NS)
        .create(&PostParams::default(), &svc)
        .await
        .expect("create Service");
    let uid = svc.metadata.uid.expect("uid");
    write_slice(&c, &slice(&uid, &pods, &[("web-0", true), ("web-2", false)])).await;
    for p in policies() {
        let obj: DynamicObject = serde_json::from_value(p).expect("policy");
        caracal_e2e::crds::api_for(&c.client, &obj)
            .expect("a Caracal kind")
            .create(&PostParams::default(), &obj)
            .await
            .expect("create policy");
    }
    expect(
        &c,
        &pods,
        "web-0 serving, web-2 not",
        &[
            ("client", "web-0", TARGET, true),
            ("client", "web-0", OTHER_PORT, false),
            ("client", "web-1", TARGET, false),
            ("client", "web-2", TARGET, false),
            ("client", "other", TARGET, false),
            ("client", "db", DB_PORT, false),
            ("web-0", "db", DB_PORT, true),
            ("web-2", "db", DB_PORT, false),
            ("other", "db", DB_PORT, false),
            ("other", "web-0", TARGET, true),
        ],
    )
    .await;

    // Scale up: web-1 (the client's node) is added to the slice.
    write_slice(
        &c,
        &slice(&uid, &pods, &[("web-0", true), ("web-1", true), ("web-2", false)]),
    )
    .await;
    expect(
        &c,
        &pods,
        "web-1 added",
        &[
            ("client", "web-1", TARGET, true),
            ("client", "web-1", OTHER_PORT, false),
            ("client", "web-0", TARGET, true),
            ("client", "web-2", TARGET, false),
            ("web-1", "db", DB_PORT, true),
            ("web-2", "db", DB_PORT, false),
            ("other", "db", DB_PORT, false),
        ],
    )
    .await;

    // A rolling update: web-2 becomes ready, web-0 leaves the slice.
    write_slice(&c, &slice(&uid, &pods, &[("web-1", true), ("web-2", true)])).await;
    expect(
        &c,
        &pods,
        "web-2 ready, web-0 removed",
        &[
            ("client", "web-0", TARGET, false),
            ("client", "web-1", TARGET, true),
            ("client", "web-2", TARGET, true),
            ("client", "web-2", OTHER_PORT, false),
            ("web-0", "db", DB_PORT, false),
            ("web-2", "db", DB_PORT, true),
            ("client", "other", TARGET, false),
        ],
    )
    .await;

    // Scaled to zero: with no slice the rules match nothing.
    Api::<EndpointSlice>::namespaced(c.client.clone(), NS)
        .delete(SLICE, &Default::default())
        .await
        .expect("delete slice");
    expect(
        &c,
        &pods,
        "no slice",
        &[
            ("client", "web-1", TARGET, false),
            ("client", "web-2", TARGET, false),
            ("web-1", "db", DB_PORT, false),
            ("web-2", "db", DB_PORT, false),
            ("other", "web-1", TARGET, true),
        ],
    )
    .await;
}
