//! Lab tier: the namespace lab as a new user drives it, on the upstream NetworkPolicy e2e suite's pod model.
//!
//! The model (Kubernetes' `test/e2e/network/netpol`): namespaces `x`, `y`, `z`, pods `a`, `b`, `c` in each,
//! every pod with one container per port and protocol (`cont-80-tcp`, `cont-80-udp`, `cont-81-tcp`,
//! `cont-81-udp`: TCP and UDP on the same port numbers; the suite's SCTP containers are left out, as Caracal's
//! lab serves no SCTP). Applied with `caracal-lab apply -f` after `up`, measured with `caracal-lab probe`
//! (the binaries, as a user runs them), with two of the suite's policies: connectivity is exactly what
//! `caracalctl policy matrix` computes from the objects in the API server. Every pod reports its containers'
//! statuses (READY 4/4). Then an Installation the operator refuses (a pull secret that does not exist) stops
//! `Lab::up` with the operator's message instead of a 300 s wait.
//!
//! Needs root and the workspace's binaries (`cargo test --workspace` builds them).

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

#[path = "common/matrix.rs"]
#[expect(
    dead_code,
    reason = "this test compares with the matrix; the shared connection helpers are for the others"
)]
mod matrix_probe;

use std::process::Command;
use std::time::{Duration, Instant};

use caracal_e2e::controlplane::{workspace_bin, workspace_root};
use caracal_e2e::lab::{self, Lab, LabOptions};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::Value;

/// The model's pods and namespaces, as YAML.
fn model() -> String {
    let mut text = String::new();
    for ns in ["x", "y", "z"] {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: '{ns}', labels: {{ns: '{ns}'}}}}\n---\n"
        ));
        for pod in ["a", "b", "c"] {
            let mut containers = String::new();
            for port in [80, 81] {
                for proto in ["TCP", "UDP"] {
                    containers.push_str(&format!(
                        "  - {{name: cont-{port}-{}, image: caracal/echo:v{version}, args: [\"{port}/{proto}\"], ports: [{{containerPort: {port}, protocol: {proto}, name: serve-{port}-{}}}]}}\n",
                        proto.to_lowercase(),
                        proto.to_lowercase(),
                        version = env!("CARGO_PKG_VERSION"),
                    ));
                }
            }
            text.push_str(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: '{ns}', labels: {{pod: {pod}}}}}\nspec:\n  containers:\n{containers}---\n"
            ));
        }
    }
    text
}

/// Two of the suite's policies (the names quoted: YAML 1.1 reads a bare `y` as true): x/a takes ingress only from namespace y on 80/TCP ("should allow ingress
/// access on one named port" narrowed to a namespace); z denies all egress but UDP 81 to pods labelled b.
const POLICIES: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-y-80-tcp, namespace: 'x'}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {ns: 'y'}}}]
    ports: [{port: serve-80-tcp, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-udp-81-to-b, namespace: 'z'}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {pod: b}}, namespaceSelector: {}}]
    ports: [{port: 81, protocol: UDP}]
";

/// `caracal-lab ARGS...`, its stdout (it must succeed).
fn caracal_lab(args: &[&str]) -> String {
    let out = Command::new(workspace_bin("caracal-lab"))
        .args(args)
        .output()
        .expect("run caracal-lab");
    assert!(
        out.status.success(),
        "caracal-lab {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_netpol_e2e_pod_model_applied_after_up_is_probed_and_matches_the_policy_matrix() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let lab = Lab::up(&LabOptions::new(
        2,
        workspace_root().join("examples/installation-vxlan.yaml"),
    ))
    .await
    .expect("lab up");

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("model.yaml");
    std::fs::write(&file, model()).expect("write model");
    caracal_lab(&["apply", "-f", file.to_str().expect("path")]);
    lab.wait_pods(&["x", "y", "z"]).await.expect("model pods running");
    // Every pod reports its four containers ready, as a kubelet does (`kubectl get pods` READY 4/4).
    for ns in ["x", "y", "z"] {
        for p in Api::<Pod>::namespaced(lab.client.clone(), ns)
            .list(&ListParams::default())
            .await
            .expect("pods")
        {
            let st = p
                .status
                .clone()
                .unwrap_or_default()
                .container_statuses
                .unwrap_or_default();
            let names: Vec<&str> = st.iter().filter(|c| c.ready).map(|c| c.name.as_str()).collect();
            assert_eq!(
                names,
                ["cont-80-tcp", "cont-80-udp", "cont-81-tcp", "cont-81-udp"],
                "{ns}/{:?}",
                p.metadata.name
            );
        }
    }
    let pol = dir.path().join("policies.yaml");
    std::fs::write(&pol, POLICIES).expect("write policies");
    caracal_lab(&["apply", "-f", pol.to_str().expect("path")]);

    // `caracal-lab probe` (another process) measures the pods that exist now, the model's among them.
    let start = Instant::now();
    loop {
        let measured: Vec<Value> =
            serde_json::from_str(&caracal_lab(&["probe", "--output", "json"])).expect("probe json");
        let pods = lab::list_pods(&lab.client).await.expect("pods");
        let mut measured: Vec<Value> = measured
            .into_iter()
            // Pod cells only (a recorded Service's cells are `svc:` and `nodeport:`).
            .filter(|c| {
                let to = c["to"].as_str().unwrap_or("");
                !to.starts_with("svc:") && !to.starts_with("nodeport:")
            })
            .collect();
        lab::sort_cells(&mut measured);
        let want = matrix_probe::expected(&lab.client, &pods).await;
        let model_cells = measured
            .iter()
            .filter(|c| c["to"].as_str().is_some_and(|t| t.starts_with("x/")))
            .count();
        if measured == want {
            // 9 pods, each probed by the 8 others on its 4 ports.
            assert_eq!(measured.len(), 9 * 8 * 4, "{measured:?}");
            assert_eq!(model_cells, 3 * 8 * 4);
            let cell = |from: &str, to: &str, port: u64, proto: &str| {
                measured
                    .iter()
                    .find(|c| {
                        c["from"] == from && c["to"] == to && c["port"] == port && c["protocol"] == proto
                    })
                    .map(|c| c["allowed"] == true)
                    .expect("cell")
            };
            // TCP and UDP on the same port number are told apart by policy.
            assert!(cell("y/b", "x/a", 80, "TCP"));
            assert!(!cell("y/b", "x/a", 80, "UDP"));
            assert!(!cell("x/b", "x/a", 80, "TCP"));
            assert!(cell("z/a", "y/b", 81, "UDP"));
            assert!(!cell("z/a", "y/b", 81, "TCP"));
            assert!(!cell("z/a", "y/c", 81, "UDP"));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "probe and policy matrix disagree ({} vs {} cells): {:?}",
            measured.len(),
            want.len(),
            measured
                .iter()
                .zip(&want)
                .filter(|(a, b)| a != b)
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    lab.down();

    // An Installation the operator refuses stops `up` with the operator's message.
    let bad = dir.path().join("installation.yaml");
    let text =
        std::fs::read_to_string(workspace_root().join("examples/installation-vxlan.yaml")).expect("example");
    let text = text.replacen(
        "spec:\n",
        "spec:\n  imagePullSecrets:\n  - name: no-such-secret\n",
        1,
    );
    std::fs::write(&bad, text).expect("write installation");
    let start = Instant::now();
    let err = match Lab::up(&LabOptions::new(1, bad)).await {
        Ok(l) => {
            l.down();
            panic!("a lab came up with an Installation naming a missing pull secret");
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains("Degraded"), "{err}");
    assert!(err.contains("spec.imagePullSecrets[0]"), "{err}");
    assert!(err.contains("no-such-secret"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(240),
        "up waited {:?} before saying so",
        start.elapsed()
    );
}
