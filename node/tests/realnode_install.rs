//! The operator's other install paths on real nodes (real kubelet, containerd and runc): through the real OLM
//! (a catalog of this version's bundle served by `opm`, a Subscription) and through the real `helm` (the
//! chart). Each: the operator runs from what that path installed, installs Caracal, the demo's real pods
//! connect exactly as the policy matrix says, and uninstalling through that path leaves nothing of Caracal:
//! the Installation, what the operator rendered (caracal-system's DaemonSet and Deployment) and the operator.
//! Through helm also: `helm upgrade` with the chart managing the Installation patches it in place (its hook
//! Job), recreating neither it nor the DaemonSet, and connectivity still agrees.
//!
//! Needs root, `make runtime images olm helm`; `make test` builds them first.

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

use std::time::{Duration, Instant};

use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::lab::{Lab, LabOptions, OPERATOR_NAMESPACE, OperatorInstall, Runtime};
use caracal_e2e::olm::{CatalogBundle, resource};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::api::{Api, DeleteParams, DynamicObject};
use matrix_probe::agrees;

async fn until<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) => assert!(start.elapsed() < deadline, "{what}: {e} (after {deadline:?})"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Nothing of Caracal is left: no Installation, no caracal-node DaemonSet or Typha Deployment, no operator
/// Deployment.
async fn nothing_left(lab: &Lab) -> Result<(), String> {
    let e = |e: kube::Error| e.to_string();
    let inst = Api::<caracal_crds::installation::Installation>::all(lab.client.clone())
        .get_opt("default")
        .await;
    if matches!(inst, Ok(Some(_))) {
        return Err("the Installation is still there".into());
    }
    if Api::<DaemonSet>::namespaced(lab.client.clone(), "caracal-system")
        .get_opt("caracal-node")
        .await
        .map_err(e)?
        .is_some()
    {
        return Err("caracal-node is still there".into());
    }
    if Api::<Deployment>::namespaced(lab.client.clone(), "caracal-system")
        .get_opt("caracal-typha")
        .await
        .map_err(e)?
        .is_some()
    {
        return Err("caracal-typha is still there".into());
    }
    if Api::<Deployment>::namespaced(lab.client.clone(), OPERATOR_NAMESPACE)
        .get_opt("caracal-operator")
        .await
        .map_err(e)?
        .is_some()
    {
        return Err("the operator is still there".into());
    }
    Ok(())
}

async fn demo_agrees(lab: &Lab, what: &str) {
    lab.apply(&workspace_root().join("e2e/lab/demo.yaml"))
        .expect("apply the demo");
    lab.wait_pods(&["frontend", "backend", "data"])
        .await
        .expect("demo pods running");
    let measured = agrees(lab, what).await;
    assert!(measured.iter().any(|c| c["allowed"] == true));
    assert!(measured.iter().any(|c| c["allowed"] == false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn caracal_installs_and_uninstalls_through_olm_and_through_helm_on_real_nodes() {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let version = env!("CARGO_PKG_VERSION");
    let installation = workspace_root().join("examples/installation-vxlan.yaml");

    // OLM: OLM's operators, a catalog of this version's bundle, a Subscription.
    let mut opts = LabOptions::new(2, installation.clone());
    opts.runtime = Runtime::Containerd;
    opts.operator = OperatorInstall::Olm(vec![CatalogBundle {
        version: version.to_owned(),
        dir: workspace_root().join("manifests/olm").join(version),
        replaces: None,
    }]);
    let mut lab = Lab::up(&opts).await.expect("the lab, its operator through OLM");
    let csv = format!("caracal-operator.v{version}");
    let client = lab.client.clone();
    lab.olm
        .as_mut()
        .expect("OLM")
        .wait_installed(&client, OPERATOR_NAMESPACE, &csv, Duration::from_secs(120))
        .await
        .expect("the CSV Succeeded");
    demo_agrees(&lab, "installed through OLM").await;
    // Uninstall through OLM: the Installation first (the operator removes what it rendered), then the
    // Subscription and the CSV (OLM removes the operator's Deployment); OLM leaves CRDs by design.
    let out = lab
        .cp
        .kubectl()
        .args(["delete", "installation", "default", "--timeout=180s"])
        .output()
        .expect("kubectl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for kind in ["Subscription", "ClusterServiceVersion"] {
        let name = if kind == "Subscription" {
            "caracal"
        } else {
            csv.as_str()
        };
        Api::<DynamicObject>::namespaced_with(client.clone(), OPERATOR_NAMESPACE, &resource(kind))
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete {kind} {name}: {e}"));
    }
    until(
        "nothing left after the OLM uninstall",
        Duration::from_secs(180),
        || nothing_left(&lab),
    )
    .await;
    lab.down();

    // Helm: the chart.
    let mut opts = LabOptions::new(2, installation);
    opts.runtime = Runtime::Containerd;
    opts.operator = OperatorInstall::Helm {
        chart: workspace_root().join("manifests/helm/caracal"),
        values: Vec::new(),
    };
    let lab = Lab::up(&opts).await.expect("the lab, its operator through helm");
    demo_agrees(&lab, "installed through helm").await;
    // `helm upgrade` with the chart managing the Installation (the lab's own spec as the chart's values): the
    // hook Job applies it in place; neither the Installation nor the DaemonSet is recreated.
    let uid = |v: Option<String>| v.expect("uid");
    let inst_uid = uid(
        Api::<caracal_crds::installation::Installation>::all(lab.client.clone())
            .get("default")
            .await
            .expect("Installation")
            .metadata
            .uid,
    );
    let ds_uid = uid(Api::<DaemonSet>::namespaced(lab.client.clone(), "caracal-system")
        .get("caracal-node")
        .await
        .expect("DaemonSet")
        .metadata
        .uid);
    let example: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&opts.installation).expect("example")).expect("yaml");
    let values = tempfile::NamedTempFile::new().expect("values file");
    std::fs::write(
        values.path(),
        serde_yaml::to_string(&serde_json::json!({
            "installation": {"enabled": true, "spec": example["spec"]},
        }))
        .expect("yaml"),
    )
    .expect("write values");
    let out = caracal_e2e::lab::helm(&lab.cp)
        .args(["upgrade", "caracal"])
        .arg(workspace_root().join("manifests/helm/caracal"))
        .args([
            "--namespace",
            OPERATOR_NAMESPACE,
            "--wait",
            "--timeout",
            "5m",
            "-f",
        ])
        .arg(values.path())
        .output()
        .expect("helm");
    assert!(
        out.status.success(),
        "helm upgrade: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let after = Api::<caracal_crds::installation::Installation>::all(lab.client.clone())
        .get("default")
        .await
        .expect("Installation after the upgrade");
    assert_eq!(
        after.metadata.uid.as_deref(),
        Some(inst_uid.as_str()),
        "Installation recreated"
    );
    let managers: Vec<String> = after
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().any(|m| m == "caracal-chart"),
        "the hook Job did not apply it: {managers:?}"
    );
    let ds_after = Api::<DaemonSet>::namespaced(lab.client.clone(), "caracal-system")
        .get("caracal-node")
        .await
        .expect("DaemonSet after the upgrade");
    assert_eq!(
        ds_after.metadata.uid.as_deref(),
        Some(ds_uid.as_str()),
        "DaemonSet recreated"
    );
    agrees(&lab, "after helm upgrade").await;
    let out = caracal_e2e::lab::helm(&lab.cp)
        .args([
            "uninstall",
            "caracal",
            "--namespace",
            OPERATOR_NAMESPACE,
            "--wait",
            "--timeout",
            "5m",
        ])
        .output()
        .expect("helm");
    assert!(
        out.status.success(),
        "helm uninstall: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    until(
        "nothing left after helm uninstall",
        Duration::from_secs(120),
        || nothing_left(&lab),
    )
    .await;
    lab.down();
}
