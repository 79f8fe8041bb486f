//! Cluster tier: the direct-watch datastore against the real kube-apiserver gives the policy engine the same
//! world as the same objects read from YAML, and follows creates, updates and deletes.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::time::{Duration, Instant};

use caracal_datastore::{Cache, api};
use caracal_policy::contract::{WORLD, scenarios};
use caracal_policy::load::load_documents;
use caracal_policy::matrix::{self, Cell, ProbePort};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::mpsc;

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|de| {
            let v: Value = serde::Deserialize::deserialize(de).expect("YAML");
            (!v.is_null()).then_some(v)
        })
        .collect()
}

fn ports() -> Vec<ProbePort> {
    ["80/TCP", "53/UDP", "8080/TCP"]
        .iter()
        .map(|p| p.parse().expect("port"))
        .collect()
}

fn expected(manifests: &str) -> Vec<Cell> {
    let docs = yaml_docs(WORLD)
        .into_iter()
        .chain(yaml_docs(manifests))
        .map(|v| ("yaml".to_owned(), v))
        .collect();
    let loaded = load_documents(docs).expect("load");
    matrix::matrix(&loaded.world, &ports())
}

/// Creates `doc` through the API (pods: then sets status.podIP, as a kubelet would).
async fn create(client: &kube::Client, mut doc: Value) {
    let kind = doc["kind"].as_str().expect("kind").to_owned();
    let api_version = doc["apiVersion"].as_str().expect("apiVersion").to_owned();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    let plural = caracal_datastore::KINDS
        .iter()
        .find(|(v, k, _, _)| *v == api_version && *k == kind)
        .map(|k| k.2)
        .expect("watched kind");
    let ar = kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk(group, version, &kind),
        plural,
    );
    let ns = doc["metadata"]["namespace"].as_str().map(str::to_owned);
    let api: Api<DynamicObject> = match &ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    let status = doc.get("status").cloned();
    if kind == "Pod" {
        doc["spec"]["containers"] =
            json!([{"name": "c", "image": "pause", "ports": doc["spec"]["containers"][0]["ports"].clone()}]);
        if doc["spec"]["containers"][0]["ports"].is_null() {
            doc["spec"]["containers"][0]
                .as_object_mut()
                .expect("container")
                .remove("ports");
        }
        doc.as_object_mut().expect("object").remove("status");
    }
    let obj: DynamicObject = serde_json::from_value(doc.clone()).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .unwrap_or_else(|e| panic!("create {kind}: {e}"));
    if let Some(status) = status {
        let name = doc["metadata"]["name"].as_str().expect("name");
        let ip = status["podIP"].clone();
        let patch = json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("pod status");
    }
}

async fn wait_for(cache: &mut Cache, rx: &mut mpsc::Receiver<caracal_datastore::Update>, want: &[Cell]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        while let Ok(u) = rx.try_recv() {
            cache.apply(u);
        }
        if cache.in_sync() {
            let loaded = load_documents(cache.documents()).expect("world");
            if matrix::matrix(&loaded.world, &ports()) == want {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the datastore's world never matched the YAML's ({} objects cached)",
            cache.len()
        );
        if let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            cache.apply(u);
        }
    }
}

#[tokio::test]
async fn the_api_datastore_gives_the_engine_the_same_world_as_yaml_and_follows_changes() {
    let (_cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let (tx, mut rx) = mpsc::channel(1024);
    let tasks = api::watch(client.clone(), tx);
    let mut cache = Cache::default();

    // The contract world, through the API: namespaces, service accounts (default ones too: no controller
    // manager runs here), pods with their addresses.
    for ns in ["x", "y", "z"] {
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}});
        let docs = yaml_docs(WORLD);
        if let Some(n) = docs
            .iter()
            .find(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == ns)
        {
            create(&client, n.clone()).await;
        }
        create(&client, sa).await;
    }
    for doc in yaml_docs(WORLD).into_iter().filter(|d| d["kind"] != "Namespace") {
        create(&client, doc).await;
    }
    wait_for(&mut cache, &mut rx, &expected("")).await;

    // A scenario with tiers, global and namespaced policies and a network set.
    let s = scenarios()
        .into_iter()
        .find(|s| s.name.starts_with("tiers: a higher tier's Deny"))
        .expect("scenario");
    for doc in yaml_docs(s.manifests) {
        create(&client, doc).await;
    }
    let with_policy = expected(s.manifests);
    assert_ne!(with_policy, expected(""), "the scenario changes the matrix");
    wait_for(&mut cache, &mut rx, &with_policy).await;

    // Deleting the Kubernetes policy and the tier's policy brings back the open matrix.
    let knp: Api<k8s_openapi::api::networking::v1::NetworkPolicy> = Api::namespaced(client.clone(), "x");
    knp.delete("allow-all", &Default::default())
        .await
        .expect("delete");
    let gnp = kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("caracal.dev", "v1", "GlobalNetworkPolicy"),
        "globalnetworkpolicies",
    );
    Api::<DynamicObject>::all_with(client.clone(), &gnp)
        .delete("block-y", &Default::default())
        .await
        .expect("delete");
    wait_for(&mut cache, &mut rx, &expected("")).await;
    for t in tasks {
        t.abort();
    }
}
