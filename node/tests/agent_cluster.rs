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
