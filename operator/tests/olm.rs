//! Caracal's OLM bundle through the real OLM (v0.42.0's olm and catalog operators, built by `make olm`) and a
//! catalog served by the real `opm`, against the real API server: the CatalogSource becomes READY, a
//! Subscription resolves the package, the InstallPlan completes without a bundle image (the catalog carries
//! the bundle's objects), OLM installs the owned CRDs and creates the operator's Deployment from the CSV with
//! the release's image and the CSV's rules. (This control plane has no nodes: the CSV cannot reach
//! Succeeded here; the lab tier runs the Deployment on real nodes.)

use std::time::{Duration, Instant};

use caracal_e2e::controlplane::{ControlPlane, Options};
use caracal_e2e::olm::{CatalogBundle, Olm, resource};
use caracal_operator::install::Release;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams};

const NS: &str = "caracal-operator";

async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => assert!(
                start.elapsed() < deadline,
                "timed out after {deadline:?} waiting for {what}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn olm_installs_the_operator_from_a_catalog_of_caracals_bundle() {
    let r = Release::current();
    let cp = ControlPlane::start(Options::api_only())
        .await
        .expect("control plane");
    let client = cp.client().await.expect("client");
    let mut olm = Olm::start(&cp, &client, &cp.dir().join("olm"))
        .await
        .expect("OLM");
    let catalog = olm
        .write_catalog(&[CatalogBundle::this_release(None)])
        .expect("catalog");
    let addr = olm.serve(&catalog).await.expect("opm serve");
    olm.publish(&client, addr).await.expect("CatalogSource READY");
    olm.subscribe(&client, NS).await.expect("subscribe");

    let plans: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &resource("InstallPlan"));
    let start = Instant::now();
    loop {
        olm.keep_running().expect("OLM's operators");
        let list = plans.list(&ListParams::default()).await.expect("list");
        if list.items.iter().any(|p| p.data["status"]["phase"] == "Complete") {
            break;
        }
        let phases: Vec<String> = list
            .items
            .iter()
            .map(|p| format!("{} {}", p.data["status"]["phase"], p.data["status"]["conditions"]))
            .collect();
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no InstallPlan Complete after 180 s: {phases:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // OLM installed the owned CRDs and created the Deployment of the CSV's install strategy.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in ["installations.operator.caracal.dev", "ippools.caracal.dev"] {
        assert!(crds.get_opt(name).await.expect("get").is_some(), "{name} missing");
    }
    let deploy = eventually("the operator Deployment", Duration::from_secs(60), || async {
        Api::<Deployment>::namespaced(client.clone(), NS)
            .get_opt("caracal-operator")
            .await
            .map_err(|e| e.to_string())?
            .ok_or("not yet".to_owned())
    })
    .await;
    let pod = deploy.spec.expect("spec").template.spec.expect("pod spec");
    assert_eq!(
        pod.containers[0].image.as_deref(),
        Some(r.operator_image().as_str())
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("caracal-operator"));
    let csv = Api::<DynamicObject>::namespaced_with(client.clone(), NS, &resource("ClusterServiceVersion"))
        .get(&r.csv_name())
        .await
        .expect("the CSV");
    let phase = csv.data["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        ["Pending", "InstallReady", "Installing"].contains(&phase.as_str()),
        "CSV phase {phase}: {}",
        csv.data["status"]["message"]
    );
}
