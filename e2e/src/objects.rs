//! Small builders for the objects cluster-tier tests create: a namespace (with its `default`
//! ServiceAccount, which no controller manager creates in an API-only control plane) and a pod scheduled to
//! a node with the address a kubelet would report.

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// Creates namespace `name` with `labels`, and its `default` ServiceAccount (unless a controller manager
/// made it first).
pub async fn namespace(client: &Client, name: &str, labels: serde_json::Value) -> Result<(), kube::Error> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
        .map_err(kube::Error::SerdeError)?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}})).map_err(kube::Error::SerdeError)?;
    match Api::<ServiceAccount>::namespaced(client.clone(), name)
        .create(&PostParams::default(), &sa)
        .await
    {
        // A controller manager made it first.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Creates pod `namespace/name` with `labels` on `node`, then sets `status.podIP` to `ip`.
pub async fn pod(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: serde_json::Value,
    node: &str,
    ip: &str,
) -> Result<(), kube::Error> {
    scheduled_pod(client, namespace, name, labels, node).await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let status = json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Creates pod `namespace/name` with `labels`, bound to `node`, with no address yet (the CNI plugin gives
/// it one).
pub async fn scheduled_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    labels: serde_json::Value,
    node: &str,
) -> Result<(), kube::Error> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause"}]}
    }))
    .map_err(kube::Error::SerdeError)?;
    Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &pod)
        .await?;
    Ok(())
}

/// Registers Node `name` with `internal_ip` as its InternalIP (what a kubelet does).
pub async fn node(client: &Client, name: &str, internal_ip: &str) -> Result<(), kube::Error> {
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
    }))
    .map_err(kube::Error::SerdeError)?;
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    api.create(&PostParams::default(), &node).await?;
    let resources = json!({"cpu": "2", "memory": "8Gi", "pods": "110"});
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": internal_ip}, {"type": "Hostname", "address": name}],
        "capacity": resources, "allocatable": resources
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Creates IPPool `name` on `cidr` with /26 blocks (/122 for IPv6) and the given encapsulation and
/// natOutgoing.
pub async fn ippool(
    client: &Client,
    name: &str,
    cidr: &str,
    vxlan: caracal_crds::ippool::EncapMode,
    ipip: caracal_crds::ippool::EncapMode,
    nat_outgoing: bool,
) -> Result<(), kube::Error> {
    use caracal_crds::ippool::{IPPool, IPPoolSpec};
    let cidr: caracal_crds::schema::Cidr = cidr
        .parse()
        .map_err(|e| kube::Error::Service(format!("{cidr}: {e}").into()))?;
    let spec = IPPoolSpec {
        block_size: Some(if cidr.is_ipv4() { 26 } else { 122 }),
        cidr,
        vxlan_mode: Some(vxlan),
        ipip_mode: Some(ipip),
        nat_outgoing: Some(nat_outgoing),
        disabled: None,
        disable_bgp_export: None,
        node_selector: None,
        allowed_uses: vec![],
        assignment_mode: None,
    };
    Api::<IPPool>::all(client.clone())
        .create(&PostParams::default(), &IPPool::new(name, spec))
        .await?;
    Ok(())
}
