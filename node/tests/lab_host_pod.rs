//! Cluster tier: the lab kubelet's process side runs a host-network pod written to the API server, as the
//! operator's Typha Deployment renders it: the image becomes the workspace's `caracal-typha`, the secret
//! and configMap volumes become files its environment points at, its ports are remapped, the readiness probe
//! on the remapped port turns the pod Ready, the process runs with its pod's ServiceAccount token, and
//! deleting the pod stops the process.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use caracal_e2e::kubelet::host::HostConfig;
use caracal_e2e::kubelet::{HostPods, KubeletConfig};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test]
async fn a_host_network_pod_runs_as_a_process_becomes_ready_and_stops_on_delete() {
    let (cp, client) = caracal_e2e::crds::control_plane().await.expect("control plane");
    let pki = caracal_e2e::pki::TyphaPki::generate().expect("pki");
    caracal_e2e::objects::namespace(&client, "caracal-system", json!({}))
        .await
        .expect("namespace");
    // The kubelet runs each process with its pod's ServiceAccount token: give this pod's account (the
    // namespace's default) what Typha reads.
    let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "typha-x-view"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "caracal-system"}]
    }))
    .expect("binding");
    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("create binding");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "typha-ca"}, "data": {"ca.crt": pki.ca}}))
            .expect("cm");
    Api::<ConfigMap>::namespaced(client.clone(), "caracal-system")
        .create(&PostParams::default(), &cm)
        .await
        .expect("create cm");
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "typha-certs"},
        "stringData": {"tls.crt": pki.server.0, "tls.key": pki.server.1}}))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), "caracal-system")
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "typha-x"},
        "spec": {
            "nodeName": "node-0",
            "hostNetwork": true,
            "containers": [{
                "name": "caracal-typha",
                "image": concat!("caracal/typha:v", env!("CARGO_PKG_VERSION")),
                "env": [
                    {"name": "CARACAL_TYPHA_PORT", "value": "5473"},
                    {"name": "CARACAL_TYPHA_HEALTH_PORT", "value": "9098"},
                    {"name": "CARACAL_TYPHA_METRICS_PORT", "value": "9093"},
                    {"name": "CARACAL_TYPHA_LISTEN_HOST", "value": "127.0.0.1"},
                    {"name": "CARACAL_TYPHA_CA_FILE", "value": "/etc/caracal/typha-ca/ca.crt"},
                    {"name": "CARACAL_TYPHA_CERT_FILE", "value": "/etc/caracal/typha-certs/tls.crt"},
                    {"name": "CARACAL_TYPHA_KEY_FILE", "value": "/etc/caracal/typha-certs/tls.key"}
                ],
                "volumeMounts": [
                    {"name": "typha-ca", "mountPath": "/etc/caracal/typha-ca"},
                    {"name": "typha-certs", "mountPath": "/etc/caracal/typha-certs"}
                ],
                "readinessProbe": {"httpGet": {"host": "127.0.0.1", "path": "/readyz", "port": 9098}}
            }],
            "volumes": [
                {"name": "typha-ca", "configMap": {"name": "typha-ca"}},
                {"name": "typha-certs", "secret": {"secretName": "typha-certs"}}
            ]
        }
    }))
    .expect("pod");
    let api: Api<Pod> = Api::namespaced(client.clone(), "caracal-system");
    api.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");

    let lab_dir = cp.dir().join("lab");
    let cfg = KubeletConfig {
        node: "node-0".into(),
        node_ns: String::new(),
        host_ip: "127.0.0.1".parse().expect("ip"),
        plugin: PathBuf::new(),
        conf: json!({}),
        host: Some(HostConfig {
            lab_dir: lab_dir.clone(),
            bin_dir: caracal_e2e::controlplane::workspace_bin("caracal-typha")
                .parent()
                .expect("bin dir")
                .to_path_buf(),
            extra_env: vec![],
            admin_kubeconfig: cp.kubeconfig().to_path_buf(),
            node_ns: None,
        }),
    };
    let host_pods = HostPods::default();
    let kubelet = tokio::spawn(cfg.run(client.clone(), Default::default(), host_pods.clone()));

    let start = Instant::now();
    loop {
        let p = api.get("typha-x").await.expect("get");
        if ready(&p) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never Ready; log:\n{}",
            std::fs::read_to_string(lab_dir.join("pods/caracal-system_typha-x/caracal-typha.log"))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The process got the files and remapped ports; the declared health port was not used.
    let (pid, health) = {
        let m = host_pods.lock().expect("lock");
        let hp = &m["caracal-system/typha-x"];
        (hp.pids()[0], hp.ports[&9098])
    };
    assert_ne!(health, 9098);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    assert!(
        environ.contains(&format!("CARACAL_TYPHA_HEALTH_PORT={health}")),
        "{environ}"
    );
    assert!(
        environ.contains("caracal-system_typha-x/typha-certs/tls.crt"),
        "{environ}"
    );
    assert!(
        environ.contains("KUBECONFIG=") && environ.contains("caracal-system_typha-x/kubeconfig"),
        "the process runs with its pod's ServiceAccount kubeconfig: {environ}"
    );
    assert_eq!(
        caracal_e2e::probe::http_get(health, "/readyz").map(|r| r.0),
        Some(200)
    );

    api.delete("typha-x", &DeleteParams::default())
        .await
        .expect("delete");
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the process outlived its pod"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    while api.get_opt("typha-x").await.expect("get").is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the pod object never went away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kubelet.abort();
}
