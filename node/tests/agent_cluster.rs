//! Cluster + kernel tier: the agent's policy loop, fed by the direct API watch, enforces a Kubernetes
//! NetworkPolicy written through the real API server on real packets between pod namespaces, follows its
//! deletion, and leaves enforcement in place when it stops.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use caracal_datastore::api;
use caracal_e2e::netns;
use caracal_e2e::probe::{self, Outcome};
use caracal_node::agent::{self, Config, Status};
use caracal_node::cni::host_iface;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::mpsc;

const NODE: &str = "node-1";

async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn a_network_policy_written_through_the_api_is_enforced_on_real_packets() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let (_cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");

    // Two pods on this node, in namespaces `web` and `other`, wired as the CNI plugin will wire them.
    let node = netns::node("agent").expect("node namespace");
    let pods = [("web", "server", "10.60.0.1"), ("other", "client", "10.60.0.2")];
    let mut wired = Vec::new();
    for (ns, name, ip) in pods {
        caracal_e2e::objects::namespace(&client, ns, json!({}))
            .await
            .expect("namespace");
        caracal_e2e::objects::pod(&client, ns, name, json!({"app": name}), NODE, ip)
            .await
            .expect("pod");
        wired.push(
            netns::wire_pod(&node, "apod", &host_iface(ns, name), ip.parse().expect("ip")).expect("wire"),
        );
    }
    let (server, client_pod) = (&wired[0], &wired[1]);

    let (tx, rx) = mpsc::channel(1024);
    let watches = api::watch(client.clone(), tx);
    let status = Arc::new(Status::default());
    let cfg = Config {
        node_name: NODE.into(),
        dataplane: "Iptables".into(),
        exec_prefix: node.exec_prefix(),
        debounce: Duration::from_millis(50),
        refresh: Duration::from_secs(90),
        ipv6: true,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(
        cfg,
        rx,
        status.clone(),
        agent::Parts::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    eventually("the agent programmed the data plane", || {
        status.ready.load(Ordering::Relaxed)
    })
    .await;
    let probe_tcp = || {
        probe::tcp(
            &client_pod.ns,
            &server.ns,
            server.ip,
            80,
            Duration::from_millis(500),
        )
        .expect("probe")
    };
    assert_eq!(probe_tcp(), Outcome::Connected, "no policy: allowed");

    // Default deny in `web`, allowing only app=client from namespaces labelled team=frontend (not `other`).
    let np = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "only-frontend", "namespace": "web"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "frontend"}}}]}]}});
    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), "web");
    let written = Instant::now();
    nps.create(&PostParams::default(), &serde_json::from_value(np).expect("np"))
        .await
        .expect("create policy");
    eventually("the policy to be enforced", || {
        probe::tcp(
            &client_pod.ns,
            &server.ns,
            server.ip,
            80,
            Duration::from_millis(300),
        )
        .expect("probe")
            == Outcome::NoAnswer
    })
    .await;
    eprintln!("policy enforced {:?} after the write", written.elapsed());

    // Labelling `other` team=frontend admits it (a namespace label change reaches the data plane).
    let label = json!({"metadata": {"labels": {"team": "frontend"}}});
    Api::<Namespace>::all(client.clone())
        .patch("other", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("label");
    eventually("the namespace label to admit the client", || {
        probe_tcp() == Outcome::Connected
    })
    .await;

    // Stopping the agent leaves enforcement in place.
    nps.delete("only-frontend", &Default::default()).await.ok();
    let _ = stop.send(());
    agent.await.expect("agent task").expect("agent");
    for w in watches {
        w.abort();
    }
    let save = node.exec(&["iptables-save", "-t", "filter"]).expect("save");
    assert!(
        save.contains("-A FORWARD -j crc-FORWARD"),
        "rules stay while the agent is down"
    );
    caracal_node::dataplane::backend("Iptables", node.exec_prefix(), true)
        .expect("backend")
        .remove_all()
        .expect("cleanup");
}

/// A Caracal NetworkPolicy in `web` selecting `app == target`: TCP to `port` from the client is allowed,
/// everything else into the target denied. `source` is the rule's source selector (broken on purpose in
/// some cases: the API server accepts any selector text, only the operator's webhook, absent here, parses
/// it).
fn allow_port(name: &str, target: &str, port: u16, source: &str, order: f64) -> serde_json::Value {
    json!({"apiVersion": "caracal.dev/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": "web"},
           "spec": {"selector": format!("app == '{target}'"), "order": order, "types": ["Ingress"],
                    "ingress": [{"action": "Allow", "protocol": "TCP",
                                 "source": {"selector": source, "namespaceSelector": "all()"},
                                 "destination": {"ports": [port]}}]}})
}

#[tokio::test]
async fn a_bad_object_never_opens_or_freezes_the_node() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let (_cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let node = netns::node("bad").expect("node namespace");
    for ns in ["web", "other"] {
        caracal_e2e::objects::namespace(&client, ns, json!({}))
            .await
            .expect("namespace");
    }
    let mut pods = std::collections::BTreeMap::new();
    for (ns, name, ip) in [
        ("web", "server1", "10.61.0.1"),
        ("web", "server2", "10.61.0.2"),
        ("other", "client", "10.61.0.3"),
    ] {
        caracal_e2e::objects::pod(&client, ns, name, json!({"app": name}), NODE, ip)
            .await
            .expect("pod");
        let wired =
            netns::wire_pod(&node, "bpod", &host_iface(ns, name), ip.parse().expect("ip")).expect("wire");
        pods.insert(name, wired);
    }
    // A pod that arrives later: its interface exists before the datastore knows it (dropped until then).
    pods.insert(
        "server3",
        netns::wire_pod(
            &node,
            "bpod",
            &host_iface("web", "server3"),
            "10.61.0.4".parse().expect("ip"),
        )
        .expect("wire"),
    );
    let policies: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        "web",
        &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "caracal.dev",
            "v1",
            "NetworkPolicy",
        )),
    );
    let put = |v: serde_json::Value| {
        let policies = policies.clone();
        async move {
            let name = v["metadata"]["name"].as_str().expect("name").to_owned();
            let obj: kube::api::DynamicObject = serde_json::from_value(v).expect("object");
            policies
                .patch(&name, &PatchParams::apply("test").force(), &Patch::Apply(&obj))
                .await
                .expect("apply policy");
        }
    };
    // Before the agent starts: a valid policy for server1, and a policy for server2 that never converts (its
    // rule's selector does not parse). Without the fail-closed rule server2 would be open to everyone.
    put(allow_port(
        "server1-http",
        "server1",
        80,
        "app == 'client'",
        100.0,
    ))
    .await;
    put(allow_port("server2-broken", "server2", 80, "app == ", 100.0)).await;

    let (tx, rx) = mpsc::channel(1024);
    let watches = api::watch(client.clone(), tx);
    let status = Arc::new(Status::default());
    let cfg = Config {
        node_name: NODE.into(),
        dataplane: "Iptables".into(),
        exec_prefix: node.exec_prefix(),
        debounce: Duration::from_millis(20),
        refresh: Duration::from_secs(90),
        ipv6: false,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(
        cfg,
        rx,
        status.clone(),
        agent::Parts {
            events: Some(client.clone()),
            ..agent::Parts::default()
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let tcp = |to: &str, port: u16| {
        let (c, s) = (&pods["client"], &pods[to]);
        probe::tcp(&c.ns, &s.ns, s.ip, port, Duration::from_millis(500)).expect("probe")
    };
    eventually("the agent to be ready", || status.ready.load(Ordering::Relaxed)).await;
    // Ready means every valid object is enforced already: no waiting from here on for the first checks.
    assert_eq!(tcp("server1", 80), Outcome::Connected, "the valid policy allows");
    assert_eq!(
        tcp("server1", 81),
        Outcome::NoAnswer,
        "the valid policy denies the rest"
    );
    assert_eq!(
        tcp("server2", 80),
        Outcome::NoAnswer,
        "a policy that never converted fails closed for what it selects"
    );

    // The working policy is edited into an unconvertible form: its last good version stays enforced.
    put(allow_port("server1-http", "server1", 80, "app in {", 100.0)).await;
    let failures = |status: &Status| {
        status
            .conversion_failures()
            .into_iter()
            .find(|(k, _)| *k == "caracal.dev/v1/NetworkPolicy")
            .map_or(0, |(_, n)| n)
    };
    eventually("the edit to be seen and refused", || failures(&status) >= 2).await;
    // Meanwhile another policy's edit is applied: a Deny of port 80 from the client, before the Allow.
    put(json!({"apiVersion": "caracal.dev/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "server1-no-http", "namespace": "web"},
               "spec": {"selector": "app == 'server1'", "order": 10, "types": ["Ingress"],
                        "ingress": [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [80]}}]}}))
    .await;
    eventually("another policy's edit to be applied", || {
        tcp("server1", 80) == Outcome::NoAnswer
    })
    .await;
    // ... and a new pod's policy.
    caracal_e2e::objects::pod(
        &client,
        "web",
        "server3",
        json!({"app": "server3"}),
        NODE,
        "10.61.0.4",
    )
    .await
    .expect("pod");
    put(allow_port(
        "server3-alt",
        "server3",
        8080,
        "app == 'client'",
        100.0,
    ))
    .await;
    eventually("the new pod's policy to be applied", || {
        tcp("server3", 8080) == Outcome::Connected && tcp("server3", 80) == Outcome::NoAnswer
    })
    .await;
    // The broken policy's last good version still decides what its own rule allowed: port 81 stays denied
    // and its (refused) new form never took effect.
    assert_eq!(tcp("server1", 81), Outcome::NoAnswer);
    assert_eq!(tcp("server2", 80), Outcome::NoAnswer, "still fail-closed");

    // The failure is visible: a Warning Event on each broken object, and the metric.
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "web");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        seen = events
            .list(&Default::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some("ConversionFailed") && e.type_.as_deref() == Some("Warning")
            })
            .filter_map(|e| Some((e.involved_object.name?, e.message.unwrap_or_default())))
            .collect();
        if seen.iter().any(|(n, _)| n == "server1-http") && seen.iter().any(|(n, _)| n == "server2-broken") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let on = |name: &str| {
        seen.iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    };
    assert!(
        on("server1-http").contains("last good version stays enforced"),
        "{seen:?}"
    );
    assert!(on("server2-broken").contains("fail-closed"), "{seen:?}");
    assert!(
        on("server2-broken").contains("selector"),
        "the message names the field: {seen:?}"
    );
    let metrics = caracal_datastore::http::metrics_text(status.as_ref());
    assert!(
        metrics.lines().any(|l| l
            .starts_with("caracal_node_conversion_failures_total{kind=\"caracal.dev/v1/NetworkPolicy\"}")),
        "{metrics}"
    );

    let _ = stop.send(());
    agent.await.expect("agent task").expect("agent");
    for w in watches {
        w.abort();
    }
    caracal_node::dataplane::backend("Iptables", node.exec_prefix(), false)
        .expect("backend")
        .remove_all()
        .expect("cleanup");
}
