//! Unit tier: the lab kubelet's plan for the operator's real rendered DaemonSet (the golden render of
//! `examples/installation-vxlan.yaml`): binaries, host paths per node, configMap and secret files, resolved
//! and rewritten environment, remapped ports with the readiness probe following them.

#![expect(
    clippy::unwrap_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::collections::BTreeMap;
use std::path::Path;

use caracal_e2e::podspec::{Context, env_of, plan};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};

fn golden() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../operator/tests/golden/installation-vxlan.yaml"),
    )
    .unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

#[test]
fn the_rendered_daemonset_becomes_processes_with_per_node_paths_and_remapped_ports() {
    let docs = golden();
    let ds: DaemonSet = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .map(|d| serde_json::from_value(d.clone()).unwrap())
        .unwrap();
    let mut config_maps = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    for d in &docs {
        let name = d["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        match d["kind"].as_str() {
            Some("ConfigMap") => {
                config_maps.insert(name, serde_json::from_value::<ConfigMap>(d.clone()).unwrap());
            }
            Some("Secret") => {
                secrets.insert(name, serde_json::from_value::<Secret>(d.clone()).unwrap());
            }
            _ => {}
        }
    }
    let template = ds.spec.unwrap().template;
    let pod = Pod {
        metadata: template.metadata.unwrap_or_default(),
        spec: Some(template.spec.unwrap_or_default()),
        status: None,
    };
    let mut next = 20000u16;
    let mut given = BTreeMap::new();
    let mut port = |p: u16| {
        *given.entry(p).or_insert_with(|| {
            next += 1;
            next
        })
    };
    let mut ctx = Context {
        node: "node-1",
        host_ip: "10.99.0.3",
        node_root: Path::new("/lab/nodes/node-1"),
        pod_root: Path::new("/lab/pods/caracal-node-x"),
        bin_dir: Path::new("/ws/target/debug"),
        config_maps: &config_maps,
        secrets: &secrets,
        port: &mut port,
    };
    let p = plan(&pod, &mut ctx).unwrap();
    assert_eq!(p.processes.len(), 2);
    let (install, node) = (&p.processes[0], &p.processes[1]);
    assert!(install.init && !node.init);
    assert_eq!(install.program, Path::new("/ws/target/debug/caracal-cni"));
    assert_eq!(install.args, ["install"]);
    assert_eq!(
        env_of(install, "CNI_BIN_DIR"),
        Some("/lab/nodes/node-1/opt/cni/bin")
    );
    assert_eq!(
        env_of(install, "CNI_NET_DIR"),
        Some("/lab/nodes/node-1/etc/cni/net.d")
    );
    assert_eq!(
        env_of(install, "CNI_CONF_SOURCE"),
        Some("/lab/pods/caracal-node-x/cni-config/10-caracal.conflist")
    );
    assert_eq!(node.program, Path::new("/ws/target/debug/caracal-node"));
    assert_eq!(env_of(node, "CARACAL_NODE_NAME"), Some("node-1"));
    assert_eq!(
        env_of(node, "CARACAL_CNI_SOCKET"),
        Some("/lab/nodes/node-1/var/run/caracal/cni.sock")
    );
    assert_eq!(
        env_of(node, "CARACAL_TYPHA_CERT_FILE"),
        Some("/lab/pods/caracal-node-x/node-certs/tls.crt")
    );
    // The health port is remapped, and the readiness probe asks the remapped port.
    let health: u16 = env_of(node, "CARACAL_HEALTH_PORT").unwrap().parse().unwrap();
    assert_ne!(health, 9099);
    assert_eq!(node.readiness, Some((health, "/readyz".to_owned())));
    assert_ne!(env_of(node, "CARACAL_METRICS_PORT"), Some("9091"));
    // Files of the configMap and secret volumes, host directories per node.
    assert!(
        p.files
            .iter()
            .any(|(f, _)| f == Path::new("/lab/pods/caracal-node-x/node-certs/tls.key"))
    );
    assert!(
        p.files
            .iter()
            .any(|(f, data)| f.ends_with("cni-config/10-caracal.conflist")
                && String::from_utf8_lossy(data).contains("\"type\": \"caracal\"")
                || f.ends_with("cni-config/10-caracal.conflist")
                    && String::from_utf8_lossy(data).contains("\"type\":\"caracal\""))
    );
    assert!(
        p.dirs
            .iter()
            .any(|d| d == Path::new("/lab/nodes/node-1/var/run/caracal"))
    );
    assert!(
        p.dirs.iter().any(|d| d == Path::new("/lab/nodes/node-1/run")),
        "{:?}",
        p.dirs
    );
}

#[test]
fn a_missing_secret_or_an_unknown_binary_is_a_clear_error() {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "c", "image": "nginx:1"}],
                 "volumes": [{"name": "certs", "secret": {"secretName": "absent"}}]}
    }))
    .unwrap();
    let mut port = |p: u16| p;
    let empty_cm = BTreeMap::new();
    let empty_sec = BTreeMap::new();
    let mut ctx = Context {
        node: "n",
        host_ip: "10.0.0.1",
        node_root: Path::new("/n"),
        pod_root: Path::new("/p"),
        bin_dir: Path::new("/b"),
        config_maps: &empty_cm,
        secrets: &empty_sec,
        port: &mut port,
    };
    let e = plan(&pod, &mut ctx).unwrap_err().to_string();
    assert!(e.contains("certs") && e.contains("Secret absent"), "{e}");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "x"}, "spec": {"containers": [{"name": "web", "image": "nginx:1"}]}
    }))
    .unwrap();
    let e = plan(&pod, &mut ctx).unwrap_err().to_string();
    assert!(e.contains("web") && e.contains("nginx"), "{e}");
}
