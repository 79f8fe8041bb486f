//! The real-node tier: Caracal installed on nodes that run the real upstream kubelet with containerd and runc
//! (`caracal-lab up --runtime containerd`; `e2e/src/realnode.rs`), from the images `make images` builds.
//!
//! One test, one cluster of two real nodes: the operator runs as its Deployment from its image and installs
//! Caracal; the caracal-node pods (from the node image, the CNI plugin installed by their own init container)
//! become Ready on every node; the demo's pods are real containers of the echo image, wired by the kubelet's
//! CNI calls through containerd, with addresses from Caracal's IPAM; connectivity between them, across nodes,
//! with the demo's NetworkPolicies, is exactly what `caracalctl policy matrix` computes; the API server reaches
//! the kubelets (`kubectl logs`); deleting a pod through the API releases its address; deleting a node's
//! caracal-node pod (the DaemonSet starts a new one) keeps an established connection; the agents reach the API
//! server by the address the operator renders; and with the `ImageSet` `make images` writes, the operator
//! renders the images by digest and containerd runs them so.
//!
//! Needs root, `make runtime` (kubelet, containerd, runc) and `make images`; `make test` builds both first.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

mod common;
#[path = "common/matrix.rs"]
mod matrix_probe;

use std::time::{Duration, Instant};

use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::lab::{Lab, LabOptions, Runtime};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, ListParams};
use matrix_probe::{Echo, agrees};
use serde_json::Value;

/// The images' references and digests as `make images` listed them.
fn images() -> Value {
    let path = workspace_root().join("target/images/images.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make images`)", path.display()));
    serde_json::from_str(&text).expect("images.json")
}

/// Waits until `f` gives Some, for at most `deadline`.
async fn until<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => assert!(start.elapsed() < deadline, "{what}: {e} (after {deadline:?})"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The pods of `namespace` with `label`.
async fn pods(lab: &Lab, namespace: &str, label: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(lab.client.clone(), namespace)
        .list(&ListParams::default().labels(label))
        .await
        .expect("list pods")
        .items
}

/// Every container of `pod` is ready, and runs the image `want` names (the kubelet's status, as
/// containerd reports it).
fn ready_from(pod: &Pod, want: &str) -> Result<(), String> {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    if statuses.is_empty() || !statuses.iter().all(|c| c.ready) {
        return Err(format!("{} not ready: {statuses:?}", pod.name_any()));
    }
    for c in &statuses {
        if c.image != want {
            return Err(format!("{}: runs {}, not {want}", pod.name_any(), c.image));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caracal_installs_from_its_operator_deployment_on_real_kubelets_and_real_pods_follow_the_policy_matrix()
 {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (network and mount namespaces, cgroups)"
    );
    let images = images();
    let mut opts = LabOptions::new(2, workspace_root().join("examples/installation-vxlan.yaml"));
    opts.runtime = Runtime::Containerd;
    let lab = Lab::up(&opts).await.expect("the real-node lab comes up");

    // The operator runs as its Deployment, from its image, on one of the real nodes.
    let operator = until(
        "the operator's Deployment is available",
        Duration::from_secs(120),
        || async {
            let d = Api::<Deployment>::namespaced(lab.client.clone(), "caracal-operator")
                .get("caracal-operator")
                .await
                .map_err(|e| e.to_string())?;
            let available = d.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
            if available < 1 {
                return Err(format!("{available} available"));
            }
            let p = pods(&lab, "caracal-operator", "k8s-app=caracal-operator").await;
            let p = p.first().ok_or("no operator pod")?.clone();
            ready_from(&p, images["operator"]["reference"].as_str().unwrap_or_default())?;
            Ok(p)
        },
    )
    .await;
    // It started once: the API server's address was there before its container (no crash on a ClusterIP
    // that nothing serves yet).
    let restarts: Vec<i32> = operator
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .map(|c| c.restart_count)
        .collect();
    assert_eq!(restarts, [0], "the operator's container restarted");
    let on = operator
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("scheduled");
    assert!(
        lab.nodes.iter().any(|(n, _, _)| *n == on),
        "the operator runs on {on}"
    );

    // caracal-node Ready on every real node, from the node image.
    let want_node = images["node"]["reference"]
        .as_str()
        .expect("node image")
        .to_owned();
    let node_pods = until(
        "caracal-node Ready on both nodes",
        Duration::from_secs(180),
        || async {
            let list = pods(&lab, "caracal-system", "k8s-app=caracal-node").await;
            if list.len() != 2 {
                return Err(format!("{} caracal-node pods", list.len()));
            }
            for p in &list {
                ready_from(p, &want_node)?;
            }
            Ok(list)
        },
    )
    .await;
    // The agents reach the API server by the address the operator rendered from the
    // `kubernetes-services-endpoint` ConfigMap, not through the `kubernetes` ClusterIP.
    for p in &node_pods {
        let env = p
            .spec
            .as_ref()
            .map(|s| s.containers[0].env.clone().unwrap_or_default())
            .unwrap_or_default();
        let host = env
            .iter()
            .find(|e| e.name == "KUBERNETES_SERVICE_HOST")
            .and_then(|e| e.value.clone());
        assert_eq!(
            host.as_deref(),
            Some(caracal_e2e::controlplane::ADVERTISED_ADDRESS.to_string().as_str()),
            "{}: {env:?}",
            p.name_any()
        );
    }
    let mut on_nodes: Vec<String> = node_pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    on_nodes.sort();
    assert_eq!(on_nodes, ["lab-node-0", "lab-node-1"]);
    // The install step put the plugin and its configuration in each node's own CNI directories.
    for (name, _, _) in &lab.nodes {
        let dir = caracal_e2e::lab::lab_dir().join("nodes").join(name);
        assert!(
            dir.join("opt-cni-bin/caracal").exists(),
            "{name}: no plugin installed"
        );
        assert!(
            dir.join("etc-cni-net.d/10-caracal.conflist").exists(),
            "{name}: no conflist installed"
        );
    }

    // The demo's pods: real containers of the echo image, addresses from Caracal's IPAM.
    lab.apply(&workspace_root().join("e2e/lab/demo.yaml"))
        .expect("apply the demo");
    lab.wait_pods(&["frontend", "backend", "data"])
        .await
        .expect("demo pods running");
    let want_echo = images["echo"]["reference"]
        .as_str()
        .expect("echo image")
        .to_owned();
    let demo = until("demo pods ready", Duration::from_secs(120), || async {
        let mut all = Vec::new();
        for ns in ["frontend", "backend", "data"] {
            for p in pods(&lab, ns, "app").await {
                ready_from(&p, &want_echo)?;
                all.push(p);
            }
        }
        Ok(all)
    })
    .await;
    assert_eq!(demo.len(), 5, "web, web-2, api, api-2, db");
    let blocks = Api::<caracal_crds::ipam::IPAMBlock>::all(lab.client.clone())
        .list(&ListParams::default())
        .await
        .expect("blocks");
    for p in &demo {
        let ip: std::net::IpAddr = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .expect("podIP")
            .parse()
            .expect("an address");
        let held = blocks.items.iter().find_map(|b| {
            let blk = caracal_node::ipam::block::Block::from_spec(&b.spec).ok()?;
            blk.attributes_of(ip).cloned()
        });
        let attrs = held.unwrap_or_else(|| panic!("{}: {ip} is in no IPAMBlock", p.name_any()));
        assert_eq!(attrs.secondary.get("pod"), Some(&p.name_any()), "{ip}: {attrs:?}");
        assert_eq!(
            attrs.secondary.get("namespace"),
            p.namespace().as_ref(),
            "{ip}: {attrs:?}"
        );
    }

    // Connectivity across the two nodes, policy included, is what the policy matrix computes.
    let measured = agrees(&lab, "real nodes, demo").await;
    assert!(
        measured.iter().any(|c| c["allowed"] == true),
        "some flow is allowed"
    );
    assert!(
        measured.iter().any(|c| c["allowed"] == false),
        "some flow is denied"
    );
    let nodes_of: std::collections::BTreeSet<String> = lab
        .record_pods()
        .await
        .expect("record")
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["node"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(nodes_of.len(), 2, "the demo spans both nodes: {nodes_of:?}");

    // The API server reaches the kubelet that runs a pod: its container's log.
    let out = lab
        .cp
        .kubectl()
        .args(["logs", "-n", "backend", "api"])
        .output()
        .expect("kubectl logs");
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("serving 8080/TCP"),
        "kubectl logs backend/api: {log} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An established connection across nodes survives the caracal-node pod of the client's node being
    // deleted and replaced by the DaemonSet: two pods of their own, one on each node, in a namespace no policy
    // selects (the test's connection is on a port the pods do not declare).
    let mut text = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: e2e}\n");
    for i in 0..2 {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: e2e, labels: {{app: p{i}}}}}\nspec:\n  nodeName: lab-node-{i}\n  containers: [{{name: c, image: caracal/echo:v{version}, args: [\"9000/TCP\"], ports: [{{containerPort: 9000}}]}}]\n",
            version = env!("CARGO_PKG_VERSION"),
        ));
    }
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write pods");
    lab.apply(file.path()).expect("apply e2e pods");
    lab.wait_pods(&["e2e"]).await.expect("e2e pods running");
    let web = "lab-node-0".to_owned();
    let (from, to) = ("e2e/p0", "e2e/p1");
    until("e2e pods recorded", Duration::from_secs(60), || async {
        let pods = lab.record_pods().await.map_err(|e| e.to_string())?;
        let n = pods
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["pod"].as_str().is_some_and(|n| n.starts_with("e2e/")))
            .count();
        if n == 2 { Ok(()) } else { Err(format!("{n} of 2")) }
    })
    .await;
    let mut echo = Echo::open(&lab, from, to).await;
    let victim = node_pods
        .iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(web.as_str()))
        .expect("caracal-node on the client's node");
    let old_uid = victim.metadata.uid.clone();
    Api::<Pod>::namespaced(lab.client.clone(), "caracal-system")
        .delete(&victim.name_any(), &DeleteParams::default())
        .await
        .expect("delete caracal-node pod");
    until(
        "a new caracal-node pod Ready on the client's node",
        Duration::from_secs(180),
        || async {
            let list = pods(&lab, "caracal-system", "k8s-app=caracal-node").await;
            let p = list
                .iter()
                .find(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(web.as_str())
                        && p.metadata.uid != old_uid
                })
                .ok_or("not replaced yet")?;
            ready_from(p, &want_node)
        },
    )
    .await;
    echo.check("after the caracal-node pod was replaced");
    agrees(&lab, "after the caracal-node pod was replaced").await;

    // Deleting a pod through the API: the kubelet's CNI DEL releases its address.
    let api2 = Api::<Pod>::namespaced(lab.client.clone(), "backend")
        .get("api-2")
        .await
        .expect("api-2");
    let ip: std::net::IpAddr = api2
        .status
        .and_then(|s| s.pod_ip)
        .expect("podIP")
        .parse()
        .expect("an address");
    Api::<Pod>::namespaced(lab.client.clone(), "backend")
        .delete("api-2", &DeleteParams::default())
        .await
        .expect("delete api-2");
    common::wait_released(&lab.client, ip, Duration::from_secs(90)).await;

    // The ImageSet `make images` wrote: the operator renders the images by digest, the DaemonSet rolls, and
    // containerd runs the imported images by those digests.
    let imageset = workspace_root().join("target/images/imageset.yaml");
    lab.apply(&imageset).expect("apply the ImageSet");
    let digest = images["node"]["digest"].as_str().expect("node digest").to_owned();
    until(
        "caracal-node rolled to the image by digest",
        Duration::from_secs(240),
        || async {
            let list = pods(&lab, "caracal-system", "k8s-app=caracal-node").await;
            if list.len() != 2 {
                return Err(format!("{} caracal-node pods", list.len()));
            }
            for p in &list {
                let spec_image = p
                    .spec
                    .as_ref()
                    .map(|s| s.containers[0].image.clone().unwrap_or_default());
                if spec_image.as_deref() != Some(&format!("caracal/node@{digest}")) {
                    return Err(format!("{} runs {spec_image:?}", p.name_any()));
                }
                let st = p
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.clone())
                    .unwrap_or_default();
                if !st.iter().all(|c| c.ready && c.image_id.ends_with(&digest)) || st.is_empty() {
                    return Err(format!("{} not ready on the digest: {st:?}", p.name_any()));
                }
            }
            Ok(())
        },
    )
    .await;
    agrees(&lab, "after the roll to images by digest").await;

    lab.down();
}
