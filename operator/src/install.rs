//! How the operator itself is installed, from one source: the objects of `manifests/operator/operator.yaml`,
//! the OLM bundle (`manifests/olm/<version>/`) and the Helm chart (`manifests/helm/caracal/`) are all made
//! here, for the workspace's version ([`Release::current`]), by `caracal-manifests` (`make manifests`). A
//! test regenerates them and fails when a committed file differs: they are never edited by hand.
//!
//! The operator installs Caracal's CRDs itself at start ([`crate::crds`]), so the plain manifest and the Helm
//! chart carry none: upgrading the operator upgrades them. The OLM bundle lists them as owned (OLM requires
//! it, and checks an upgrade's CRDs against the existing objects before it rolls the operator).

use std::collections::BTreeMap;
use std::path::Path;

use caracal_crds::crdgen;
use kube::ResourceExt as _;
use serde_json::{Value, json};

/// The operator's namespace in the plain manifest (the chart and OLM install into the one they are given).
pub const NAMESPACE: &str = "caracal-operator";
/// The OLM package and the chart's name.
pub const PACKAGE: &str = "caracal";
/// The channel every release is published in.
pub const CHANNEL: &str = "stable";
/// The oldest Kubernetes release the operator is tested against.
pub const MIN_KUBE_VERSION: &str = "1.30.0";

/// One release of Caracal: its version (semver, no `v`) and the one before it, which an upgrade replaces.
#[derive(Clone, Debug)]
pub struct Release {
    /// `0.2.0`.
    pub version: String,
    /// The release this one upgrades from (`replaces` in OLM), None for the first.
    pub previous: Option<String>,
}

impl Release {
    /// The workspace's version; the previous release is the one [`PREVIOUS_RELEASE`] names.
    pub fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            previous: PREVIOUS_RELEASE.map(str::to_owned),
        }
    }

    /// The image tag (`v0.2.0`).
    pub fn tag(&self) -> String {
        format!("v{}", self.version)
    }

    /// The operator image of the default registry and path.
    pub fn operator_image(&self) -> String {
        format!("docker.io/caracal/operator:{}", self.tag())
    }

    /// The CSV's name (`caracal-operator.v0.2.0`).
    pub fn csv_name(&self) -> String {
        format!("caracal-operator.v{}", self.version)
    }
}

/// The release before this one (tagged `v<version>` in git): the N-1 that upgrades are tested from. None
/// for the first release.
pub const PREVIOUS_RELEASE: Option<&str> = Some("0.1.0");

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

const ALL: &[&str] = &["get", "list", "watch", "create", "patch", "update", "delete"];
const READ: &[&str] = &["get", "list", "watch"];

/// What the operator may do cluster-wide (its ClusterRole; OLM's clusterPermissions).
pub fn cluster_rules() -> Vec<Value> {
    vec![
        // Its API and the CRDs it installs.
        rule(
            &["apiextensions.k8s.io"],
            &["customresourcedefinitions"],
            &["get", "list", "watch", "create", "patch", "update"],
        ),
        rule(
            &["operator.caracal.dev"],
            &[
                "installations",
                "installations/status",
                "installations/finalizers",
            ],
            // delete: `caracal-operator uninstall` (the chart's pre-delete hook) runs as the operator.
            &["get", "list", "watch", "patch", "update", "delete"],
        ),
        // ImageSets (digests of a release's images): read only.
        rule(&["operator.caracal.dev"], &["imagesets"], READ),
        rule(&["caracal.dev"], &["ippools", "felixconfigurations"], ALL),
        rule(&["caracal.dev"], &["ipamblocks", "tiers"], READ),
        // What it renders. Secrets also covers reading image pull secrets in its own namespace to copy them
        // into caracal-system.
        rule(
            &[""],
            &[
                "namespaces",
                "serviceaccounts",
                "configmaps",
                "secrets",
                "services",
            ],
            ALL,
        ),
        rule(&[""], &["nodes"], READ),
        rule(&["apps"], &["daemonsets", "deployments"], ALL),
        rule(&["policy"], &["poddisruptionbudgets"], ALL),
        // The components' ClusterRoles grant what the operator itself does not use (IPAM writes, node
        // patches): `escalate` and `bind` let it create them without holding those rights.
        rule(
            &["rbac.authorization.k8s.io"],
            &["clusterroles", "clusterrolebindings"],
            &[
                "get", "list", "watch", "create", "patch", "update", "delete", "escalate", "bind",
            ],
        ),
        rule(&["", "events.k8s.io"], &["events"], &["create", "patch"]),
        // The admission webhook's registration.
        rule(
            &["admissionregistration.k8s.io"],
            &["validatingwebhookconfigurations"],
            &["get", "list", "watch", "create", "patch", "update"],
        ),
    ]
}

/// What the operator may do in its own namespace (the leader Lease; OLM's permissions).
pub fn namespace_rules() -> Vec<Value> {
    vec![rule(
        &["coordination.k8s.io"],
        &["leases"],
        &["get", "create", "update"],
    )]
}

/// The labels of the operator's pods.
pub fn pod_labels() -> Value {
    json!({"k8s-app": "caracal-operator", "app.kubernetes.io/name": "caracal-operator"})
}

/// The operator Deployment's spec, running `image` with `resources` (and `pull_secrets` by name).
pub fn deployment_spec(image: &str, resources: &Value, pull_secrets: &[String]) -> Value {
    let mut pod = json!({
        "serviceAccountName": "caracal-operator",
        // It must start before pod networking exists: it is what installs pod networking.
        "hostNetwork": true,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "priorityClassName": "system-cluster-critical",
        "tolerations": [
            {"operator": "Exists", "effect": "NoSchedule"},
            {"operator": "Exists", "effect": "NoExecute"},
        ],
        // The images are built for linux/amd64 only.
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{
            "matchExpressions": [
                {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]},
            ],
        }]}}},
        "containers": [{
            "name": "caracal-operator",
            "image": image,
            "command": ["caracal-operator"],
            // Where no kube-proxy makes the `kubernetes` ClusterIP work (Caracal's eBPF data plane replacing
            // it), the operator reaches the API server by the address this ConfigMap gives, as the agents do.
            "envFrom": [{"configMapRef": {"name": "kubernetes-services-endpoint", "optional": true}}],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "CARACAL_OPERATOR_HTTP_ADDR", "value": "127.0.0.1:9094"},
                {"name": "CARACAL_OPERATOR_LOG_FORMAT", "value": "json"},
                {"name": "CARACAL_OPERATOR_WEBHOOK_ADDR", "value": "0.0.0.0:9443"},
            ],
            "ports": [
                {"name": "metrics", "containerPort": 9094},
                {"name": "webhook", "containerPort": 9443},
            ],
            "livenessProbe": {
                "httpGet": {"host": "127.0.0.1", "path": "/healthz", "port": 9094},
                "periodSeconds": 10,
            },
            "readinessProbe": {
                "httpGet": {"host": "127.0.0.1", "path": "/readyz", "port": 9094},
                "periodSeconds": 5,
            },
            "resources": resources,
        }],
    });
    if !pull_secrets.is_empty() {
        pod["imagePullSecrets"] = pull_secrets.iter().map(|s| json!({"name": s})).collect();
    }
    json!({
        "replicas": 1,
        "selector": {"matchLabels": {"k8s-app": "caracal-operator"}},
        // One leader at a time anyway; Recreate never runs two versions side by side.
        "strategy": {"type": "Recreate"},
        "template": {"metadata": {"labels": pod_labels()}, "spec": pod},
    })
}

/// The operator's default resource requests.
pub fn default_resources() -> Value {
    json!({"requests": {"cpu": "50m", "memory": "64Mi"}})
}

/// The webhook Service's spec (every replica serves the admission webhook).
pub fn webhook_service_spec() -> Value {
    json!({
        "selector": {"k8s-app": "caracal-operator"},
        "ports": [{"name": "webhook", "port": 443, "targetPort": "webhook"}],
    })
}

fn labels(r: &Release) -> Value {
    json!({"app.kubernetes.io/part-of": "caracal", "app.kubernetes.io/version": r.version})
}

/// The objects of `manifests/operator/operator.yaml`, each with the comment written above it.
pub fn operator_objects(r: &Release) -> Vec<(&'static str, Value)> {
    let sa = json!({"kind": "ServiceAccount", "name": "caracal-operator", "namespace": NAMESPACE});
    let mut ns_labels = labels(r);
    ns_labels["pod-security.kubernetes.io/enforce"] = "privileged".into();
    let mut deploy_labels = labels(r);
    deploy_labels["app.kubernetes.io/name"] = "caracal-operator".into();
    vec![
        (
            "The operator's namespace: its pods use the host network (privileged).",
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": NAMESPACE, "labels": ns_labels}}),
        ),
        (
            "",
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "caracal-operator", "namespace": NAMESPACE, "labels": labels(r)}}),
        ),
        (
            "What the operator does cluster-wide: install the CRDs, reconcile the Installation, render the components.",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": "caracal-operator", "labels": labels(r)},
                   "rules": cluster_rules()}),
        ),
        (
            "",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "caracal-operator", "labels": labels(r)},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "caracal-operator"},
                   "subjects": [sa.clone()]}),
        ),
        (
            "The leader Lease lives in the operator's own namespace.",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": "caracal-operator-leader", "namespace": NAMESPACE, "labels": labels(r)},
                   "rules": namespace_rules()}),
        ),
        (
            "",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "caracal-operator-leader", "namespace": NAMESPACE, "labels": labels(r)},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "caracal-operator-leader"},
                   "subjects": [sa]}),
        ),
        (
            "The operator: one leader at a time holds the Lease.",
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "caracal-operator", "namespace": NAMESPACE, "labels": deploy_labels},
                   "spec": deployment_spec(&r.operator_image(), &default_resources(), &[])}),
        ),
        (
            "The admission webhook, served by every operator replica.",
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": crate::webhook::NAME, "namespace": NAMESPACE, "labels": labels(r)},
                   "spec": webhook_service_spec()}),
        ),
    ]
}

/// Objects as one YAML stream, each preceded by its comment.
pub fn yaml_stream(header: &str, objects: &[(&str, Value)]) -> anyhow::Result<String> {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str(&format!("# {line}\n").replace("# \n", "#\n"));
    }
    for (i, (comment, obj)) in objects.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        if !comment.is_empty() {
            out.push_str(&format!("# {comment}\n"));
        }
        out.push_str(&serde_yaml::to_string(obj)?);
    }
    Ok(out)
}

/// What each owned CRD is, for OLM's UI and the CSV (displayName, description), by kind.
fn crd_description(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "Installation" => (
            "Installation",
            "How Caracal is installed: IP pools, encapsulation, MTU, data plane, WireGuard, Typha and node overrides. One, named default.",
        ),
        "ImageSet" => (
            "Image Set",
            "The digests of one release's images: with one named caracal-<version>, the operator renders images by digest.",
        ),
        "IPPool" => (
            "IP Pool",
            "A range pods get addresses from, with its encapsulation and NAT.",
        ),
        "FelixConfiguration" => (
            "Felix Configuration",
            "How the node agents program the data plane (rendered by the operator from the Installation).",
        ),
        "GlobalNetworkPolicy" => (
            "Global Network Policy",
            "Cluster-wide, ordered policy with allow, deny, log and pass.",
        ),
        "NetworkPolicy" => (
            "Network Policy",
            "Namespaced, ordered policy with allow, deny, log and pass.",
        ),
        "Tier" => (
            "Tier",
            "An ordered group of policies, evaluated before the next tier.",
        ),
        "GlobalNetworkSet" => (
            "Global Network Set",
            "Labelled cluster-wide CIDRs that policy selects.",
        ),
        "NetworkSet" => ("Network Set", "Labelled namespaced CIDRs that policy selects."),
        "BGPConfiguration" => (
            "BGP Configuration",
            "The cluster's BGP settings: AS number, mesh, advertised Service ranges.",
        ),
        "BGPPeer" => (
            "BGP Peer",
            "A BGP peering of some nodes with a router or with each other.",
        ),
        "IPAMBlock" => (
            "IPAM Block",
            "A block of a pool with the addresses allocated in it (written by the nodes).",
        ),
        "BlockAffinity" => (
            "Block Affinity",
            "Which node owns a block (written by the nodes).",
        ),
        "IPAMHandle" => (
            "IPAM Handle",
            "The addresses one pod or tunnel holds (written by the nodes).",
        ),
        "IPAMConfiguration" => (
            "IPAM Configuration",
            "Cluster-wide IPAM settings: strict affinity, blocks per node.",
        ),
        _ => ("", ""),
    }
}

/// The example Installation OLM shows (`alm-examples`) and the chart installs by default.
pub fn example_installation_spec() -> Value {
    json!({
        "calicoNetwork": {
            "ipPools": [{"cidr": "10.244.0.0/16", "encapsulation": "VXLAN", "natOutgoing": "Enabled"}],
        },
    })
}

const DESCRIPTION: &str = "Caracal is Kubernetes pod networking and network policy: each node's agent wires pods with \
addresses from Caracal's IPAM, routes between nodes (VXLAN, IPIP, BGP or plain routes), optionally encrypts with \
WireGuard, and enforces Kubernetes and Caracal network policy with iptables or eBPF (which also replaces \
kube-proxy for Services).\n\nThis operator reconciles one Installation named `default` into the node DaemonSet, \
Typha, the CNI plugin, IP pools and the agents' configuration, installs Caracal's CRDs, and reports status on \
the Installation.";

/// A small icon (the OperatorHub validator asks for one).
const ICON_SVG: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64"><circle cx="32" cy="32" r="30" fill="#b5651d"/><path d="M14 10 L24 26 L18 28 Z M50 10 L40 26 L46 28 Z" fill="#2b1a0b"/><circle cx="24" cy="36" r="4" fill="#fff"/><circle cx="40" cy="36" r="4" fill="#fff"/></svg>"##;

/// The example files the CSV's `alm-examples` come from: one object of each Caracal kind, as `examples/`
/// ships them (which the tests apply), and an IPAMConfiguration.
const EXAMPLES: &[&str] = &[
    include_str!("../../examples/installation-vxlan.yaml"),
    include_str!("../../examples/imageset.yaml"),
    include_str!("../../examples/ippool.yaml"),
    include_str!("../../examples/felixconfiguration.yaml"),
    include_str!("../../examples/globalnetworkpolicy.yaml"),
    include_str!("../../examples/networkpolicy.yaml"),
    include_str!("../../examples/bgp.yaml"),
    "apiVersion: caracal.dev/v1\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: false}\n",
];

/// The kinds the node agents write (IPAM's bookkeeping): OLM's UI hides them, and they have no example.
const INTERNAL: &[&str] = &[
    "ipamblocks.caracal.dev",
    "blockaffinities.caracal.dev",
    "ipamhandles.caracal.dev",
];

/// The first object of each Caracal kind in [`EXAMPLES`].
fn alm_examples() -> anyhow::Result<Value> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for text in EXAMPLES {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v: Value = serde::Deserialize::deserialize(doc)?;
            let group = v["apiVersion"].as_str().unwrap_or_default();
            let kind = v["kind"].as_str().unwrap_or_default().to_owned();
            if (group.starts_with("caracal.dev/") || group.starts_with("operator.caracal.dev/"))
                && seen.insert(kind)
            {
                out.push(v);
            }
        }
    }
    Ok(Value::Array(out))
}

/// The ClusterServiceVersion of the OLM bundle.
pub fn csv(r: &Release) -> anyhow::Result<Value> {
    let mut owned: Vec<Value> = crdgen::all()
        .iter()
        .map(|crd| {
            let kind = crd.spec.names.kind.clone();
            let (display, description) = crd_description(&kind);
            let version = crd
                .spec
                .versions
                .iter()
                .find(|v| v.storage)
                .map(|v| v.name.clone())
                .unwrap_or_default();
            json!({"name": crd.name_any(), "kind": kind, "version": version,
                   "displayName": display, "description": description})
        })
        .collect();
    owned.sort_by_key(|o| o["name"].as_str().unwrap_or_default().to_owned());
    let example = alm_examples()?;
    let mut annotations = json!({
        "alm-examples": serde_json::to_string_pretty(&example).unwrap_or_default(),
        "capabilities": "Seamless Upgrades",
        "categories": "Networking,Security",
        "containerImage": r.operator_image(),
        "description": "Kubernetes pod networking and network policy, modelled on Project Calico.",
        "repository": "https://github.com/caracal-dev/caracal",
        "support": "Caracal",
        "operatorframework.io/suggested-namespace": NAMESPACE,
        "operators.operatorframework.io/internal-objects": serde_json::to_string(INTERNAL)?,
    });
    if r.previous.is_some() {
        annotations["olm.skipRange"] = format!("<{}", r.version).into();
    }
    let related: Vec<Value> = ["operator", "node", "cni", "typha"]
        .iter()
        .map(|c| json!({"name": c, "image": format!("docker.io/caracal/{c}:{}", r.tag())}))
        .collect();
    let mut spec = json!({
        "displayName": "Caracal",
        "description": DESCRIPTION,
        "version": r.version,
        "minKubeVersion": MIN_KUBE_VERSION,
        "maturity": "alpha",
        "provider": {"name": "Caracal"},
        "maintainers": [{"name": "Caracal engineers", "email": "caracal@caracal.dev"}],
        "links": [{"name": "Caracal", "url": "https://github.com/caracal-dev/caracal"}],
        "keywords": ["networking", "cni", "network-policy", "ebpf", "wireguard"],
        "icon": [{"base64data": base64(ICON_SVG.as_bytes()), "mediatype": "image/svg+xml"}],
        // Cluster-scoped: it watches cluster-wide objects, so it installs for all namespaces only.
        "installModes": [
            {"type": "OwnNamespace", "supported": false},
            {"type": "SingleNamespace", "supported": false},
            {"type": "MultiNamespace", "supported": false},
            {"type": "AllNamespaces", "supported": true},
        ],
        "install": {
            "strategy": "deployment",
            "spec": {
                "clusterPermissions": [{"serviceAccountName": "caracal-operator", "rules": olm_cluster_rules()}],
                "permissions": [{"serviceAccountName": "caracal-operator", "rules": namespace_rules()}],
                "deployments": [{
                    "name": "caracal-operator",
                    "label": pod_labels(),
                    "spec": deployment_spec(&r.operator_image(), &default_resources(), &[]),
                }],
            },
        },
        "customresourcedefinitions": {"owned": owned},
        "relatedImages": related,
    });
    if let Some(prev) = &r.previous {
        spec["replaces"] = format!("caracal-operator.v{prev}").into();
    }
    Ok(json!({
        "apiVersion": "operators.coreos.com/v1alpha1",
        "kind": "ClusterServiceVersion",
        "metadata": {"name": r.csv_name(), "namespace": "placeholder", "annotations": annotations,
                     "labels": {"operatorframework.io/arch.amd64": "supported", "operatorframework.io/os.linux": "supported"}},
        "spec": spec,
    }))
}

/// [`cluster_rules`] under OLM: OLM installs and upgrades the bundle's CRDs, so the operator only reads them
/// (it finds them as it would have written them, and writes nothing).
pub fn olm_cluster_rules() -> Vec<Value> {
    let mut rules = cluster_rules();
    rules[0] = rule(&["apiextensions.k8s.io"], &["customresourcedefinitions"], READ);
    rules
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The files of the OLM bundle (registry+v1), relative to `manifests/olm/<version>/`.
pub fn bundle_files(r: &Release) -> anyhow::Result<BTreeMap<String, String>> {
    let header = format!(
        "Caracal {} OLM bundle, generated by `make manifests` (operator/src/install.rs): do not edit.",
        r.version
    );
    let mut files = BTreeMap::new();
    files.insert(
        "manifests/caracal-operator.clusterserviceversion.yaml".to_owned(),
        yaml_stream(&header, &[("", csv(r)?)])?,
    );
    for crd in crdgen::all() {
        files.insert(
            format!("manifests/{}.yaml", crd.name_any()),
            yaml_stream(&header, &[("", crate::crds::manifest(&crd))])?,
        );
    }
    let mut svc_labels = labels(r);
    svc_labels["app.kubernetes.io/name"] = "caracal-operator".into();
    files.insert(
        "manifests/caracal-operator-webhook_v1_service.yaml".to_owned(),
        yaml_stream(
            &header,
            &[(
                "The admission webhook, served by every operator replica.",
                json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"name": crate::webhook::NAME, "labels": svc_labels},
                       "spec": webhook_service_spec()}),
            )],
        )?,
    );
    let annotations = json!({"annotations": {
        "operators.operatorframework.io.bundle.mediatype.v1": "registry+v1",
        "operators.operatorframework.io.bundle.manifests.v1": "manifests/",
        "operators.operatorframework.io.bundle.metadata.v1": "metadata/",
        "operators.operatorframework.io.bundle.package.v1": PACKAGE,
        "operators.operatorframework.io.bundle.channels.v1": CHANNEL,
        "operators.operatorframework.io.bundle.channel.default.v1": CHANNEL,
    }});
    files.insert(
        "metadata/annotations.yaml".to_owned(),
        yaml_stream(&header, &[("", annotations)])?,
    );
    Ok(files)
}

/// Deletes the Installation `default` and waits until it is gone, that is until the running operator has
/// removed what it rendered and then its finalizer, printing what it waits for every five seconds. Fails
/// after `timeout`, naming the finalizers left (an operator that is not running never removes them).
pub async fn uninstall(client: &kube::Client, timeout: std::time::Duration) -> anyhow::Result<()> {
    use caracal_crds::installation::{INSTALLATION_NAME, Installation};
    let api: kube::Api<Installation> = kube::Api::all(client.clone());
    let start = std::time::Instant::now();
    match api
        .delete(INSTALLATION_NAME, &kube::api::DeleteParams::default())
        .await
    {
        Ok(_) => println!("deleting the Installation {INSTALLATION_NAME}"),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            println!("no Installation {INSTALLATION_NAME}: nothing to remove");
            return Ok(());
        }
        Err(e) => anyhow::bail!("deleting the Installation {INSTALLATION_NAME}: {e}"),
    }
    let mut last_report = std::time::Instant::now();
    loop {
        let Some(left) = api.get_opt(INSTALLATION_NAME).await? else {
            println!(
                "the Installation is gone after {:.1} s: Caracal is removed",
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        };
        let finalizers = left.finalizers().join(", ");
        if start.elapsed() > timeout {
            anyhow::bail!(
                "the Installation is still there after {timeout:?} with finalizers [{finalizers}]: is the operator running? (it removes them once it has removed what it rendered)"
            );
        }
        if last_report.elapsed() >= std::time::Duration::from_secs(5) {
            println!(
                "{:.0} s: waiting for the operator to remove what it rendered (finalizers [{finalizers}])",
                start.elapsed().as_secs_f64()
            );
            last_report = std::time::Instant::now();
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Applies the Installation in `file` (server-side, field manager `caracal-chart`), waiting up to `timeout`
/// for what it needs to be there: the Installation CRD (the operator installs it at start) and the
/// operator's admission webhook (serving once the operator is ready). A refusal (the webhook's or the
/// schema's) fails at once with the API server's message. What the chart's post-install and post-upgrade
/// hook Job runs: the Installation is then patched in place by every upgrade, never deleted and recreated.
pub async fn apply_installation(
    client: &kube::Client,
    file: &Path,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    use caracal_crds::installation::{INSTALLATION_NAME, Installation};
    let text =
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    let obj: Value = serde_yaml::from_str(&text)?;
    if obj["kind"] != "Installation" || obj["metadata"]["name"] != INSTALLATION_NAME {
        anyhow::bail!(
            "{} must hold the Installation named {INSTALLATION_NAME}",
            file.display()
        );
    }
    let api: kube::Api<Installation> = kube::Api::all(client.clone());
    let params = kube::api::PatchParams::apply("caracal-chart").force();
    let start = std::time::Instant::now();
    let mut last_report: Option<std::time::Instant> = None;
    loop {
        let err = match api
            .patch(INSTALLATION_NAME, &params, &kube::api::Patch::Apply(&obj))
            .await
        {
            Ok(_) => {
                println!(
                    "the Installation {INSTALLATION_NAME} is applied ({:.1} s)",
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            Err(e) => e,
        };
        // Not there yet: the CRD (404), the webhook (no endpoints, connection refused: 500), the API server.
        let waiting = match &err {
            kube::Error::Api(e) => {
                e.code == 404
                    || (e.code == 500
                        && (e.message.contains("failed calling webhook")
                            || e.message.contains("no endpoints available")))
                    || e.code == 503
            }
            _ => true,
        };
        if !waiting {
            anyhow::bail!("the Installation was refused: {err}");
        }
        if start.elapsed() > timeout {
            anyhow::bail!("the Installation could not be applied within {timeout:?}: {err}");
        }
        if last_report.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5)) {
            println!(
                "{:.0} s: waiting for the operator (CRD and admission webhook): {err}",
                start.elapsed().as_secs_f64()
            );
            last_report = Some(std::time::Instant::now());
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// A hook Job of the chart: `caracal-operator` with `args`, the operator's image and ServiceAccount, on the
/// host network (pod networking may be going or not there yet while it runs); `config` mounts the
/// `caracal-installation` ConfigMap at /etc/caracal.
fn hook_job(name: &str, hook: &str, args: &[&str], config: bool, labels: &Value) -> Value {
    let spec = deployment_spec(IMAGE, &default_resources(), &[]);
    let mut pod = spec["template"]["spec"].clone();
    let container = &mut pod["containers"][0];
    container["name"] = name.into();
    let mut command = vec!["caracal-operator"];
    command.extend_from_slice(args);
    container["command"] = json!(command);
    if let Some(c) = container.as_object_mut() {
        for k in ["ports", "livenessProbe", "readinessProbe", "resources"] {
            c.remove(k);
        }
    }
    if config {
        container["volumeMounts"] =
            json!([{"name": "installation", "mountPath": "/etc/caracal", "readOnly": true}]);
        pod["volumes"] = json!([{"name": "installation", "configMap": {"name": "caracal-installation"}}]);
    }
    pod["restartPolicy"] = "Never".into();
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": format!("caracal-{name}"), "namespace": NS, "labels": labels,
            "annotations": {
                "helm.sh/hook": hook,
                // The Job, not what it applies or deletes, goes before the next one and once it succeeded.
                "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded",
            }},
        "spec": {"backoffLimit": 0, "activeDeadlineSeconds": 300,
                 "template": {"metadata": {"labels": {"k8s-app": format!("caracal-{name}")}}, "spec": pod}},
    })
}

/// Placeholders in the objects the chart's templates are made from, replaced by template expressions.
const NS: &str = "CARACAL_CHART_NAMESPACE";
const IMAGE: &str = "CARACAL_CHART_IMAGE";
const RESOURCES: &str = "CARACAL_CHART_RESOURCES";
const VERSION_LABEL: &str = "CARACAL_CHART_VERSION";

/// One chart template from `obj`: placeholders become template expressions; a key whose value is
/// [`RESOURCES`] becomes the `resources` value as YAML, and the pod spec gets `imagePullSecrets` when given.
fn template(comment: &str, obj: &Value) -> anyhow::Result<String> {
    let yaml = serde_yaml::to_string(obj)?;
    let mut out = String::new();
    if !comment.is_empty() {
        out.push_str(&format!("# {comment}\n"));
    }
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        let pad = " ".repeat(indent);
        if line.trim_start() == format!("resources: {RESOURCES}") {
            out.push_str(&format!(
                "{pad}resources:\n{pad}  {{{{- toYaml .Values.resources | nindent {} }}}}\n",
                indent + 2
            ));
            continue;
        }
        if line.trim_start() == "serviceAccountName: caracal-operator" {
            out.push_str(&format!(
                "{pad}{{{{- with .Values.imagePullSecrets }}}}\n{pad}imagePullSecrets:\n{pad}  {{{{- toYaml . | nindent {} }}}}\n{pad}{{{{- end }}}}\n",
                indent + 2
            ));
        }
        out.push_str(
            &line
                .replace(NS, "{{ .Release.Namespace }}")
                .replace(
                    IMAGE,
                    "{{ .Values.image.registry }}/{{ .Values.image.imagePath }}/operator:{{ .Values.image.tag | default .Chart.AppVersion }}",
                )
                .replace(VERSION_LABEL, "{{ .Chart.Version }}"),
        );
        out.push('\n');
    }
    Ok(out)
}

/// The files of the Helm chart, relative to `manifests/helm/caracal/`.
pub fn chart_files(r: &Release) -> anyhow::Result<BTreeMap<String, String>> {
    let generated = "Generated by `make manifests` (operator/src/install.rs): do not edit.";
    let mut files = BTreeMap::new();
    files.insert(
        "Chart.yaml".to_owned(),
        yaml_stream(
            generated,
            &[(
                "",
                json!({
                    "apiVersion": "v2",
                    "name": PACKAGE,
                    "description": "Caracal: Kubernetes pod networking and network policy, installed by its operator",
                    "type": "application",
                    "version": r.version,
                    "appVersion": r.tag(),
                    "kubeVersion": format!(">={MIN_KUBE_VERSION}-0"),
                    "keywords": ["networking", "cni", "network-policy"],
                    "home": "https://github.com/caracal-dev/caracal",
                    "icon": format!("data:image/svg+xml;base64,{}", base64(ICON_SVG.as_bytes())),
                }),
            )],
        )?,
    );
    let spec = serde_yaml::to_string(&example_installation_spec())?;
    let spec: String = spec.lines().map(|l| format!("    {l}\n")).collect();
    files.insert(
        "values.yaml".to_owned(),
        format!(
            "# {generated}
# The operator's image: <registry>/<imagePath>/operator:<tag> (the tag defaults to the chart's appVersion).
image:
  registry: docker.io
  imagePath: caracal
  tag: \"\"
# Secrets (in the release's namespace) the operator's pods pull with, as [{{name: ...}}]. The Installation
# names its own (spec.imagePullSecrets): the operator copies them to caracal-system.
imagePullSecrets: []
# The operator container's resources.
resources:
  requests:
    cpu: 50m
    memory: 64Mi
# The Installation named default. With enabled, a hook Job applies it after install and every upgrade, once
# the operator has installed the CRDs and serves its webhook (Helm cannot apply an object whose CRD it does
# not know yet); an upgrade patches it in place. `helm uninstall` deletes it first (a pre-delete hook), so
# that the operator removes what it rendered.
installation:
  enabled: true
  spec:
{spec}"
        ),
    );
    let labels = json!({"app.kubernetes.io/part-of": "caracal", "app.kubernetes.io/version": VERSION_LABEL,
                        "app.kubernetes.io/managed-by": "Helm"});
    let sa = json!({"kind": "ServiceAccount", "name": "caracal-operator", "namespace": NS});
    let mut deploy_labels = labels.clone();
    deploy_labels["app.kubernetes.io/name"] = "caracal-operator".into();
    let templates: Vec<(&str, &str, Value)> = vec![
        (
            "serviceaccount.yaml",
            "",
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "caracal-operator", "namespace": NS, "labels": labels}}),
        ),
        (
            "clusterrole.yaml",
            "What the operator does cluster-wide.",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "caracal-operator", "labels": labels}, "rules": cluster_rules()}),
        ),
        (
            "clusterrolebinding.yaml",
            "",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "caracal-operator", "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "caracal-operator"},
            "subjects": [sa.clone()]}),
        ),
        (
            "role.yaml",
            "The leader Lease lives in the operator's own namespace.",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "caracal-operator-leader", "namespace": NS, "labels": labels}, "rules": namespace_rules()}),
        ),
        (
            "rolebinding.yaml",
            "",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "caracal-operator-leader", "namespace": NS, "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "caracal-operator-leader"},
            "subjects": [sa]}),
        ),
        (
            "deployment.yaml",
            "The operator: one leader at a time holds the Lease.",
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "caracal-operator", "namespace": NS, "labels": deploy_labels},
            "spec": deployment_spec(IMAGE, &Value::String(RESOURCES.into()), &[])}),
        ),
        (
            "service.yaml",
            "The admission webhook, served by every operator replica.",
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": crate::webhook::NAME, "namespace": NS, "labels": labels}, "spec": webhook_service_spec()}),
        ),
        (
            "uninstall-job.yaml",
            "Before `helm uninstall` removes the operator: the Installation is deleted and the operator removes what it rendered, so no finalizer is left that nobody removes.",
            hook_job(
                "uninstall",
                "pre-delete",
                &["uninstall", "--timeout", "280"],
                false,
                &labels,
            ),
        ),
    ];
    for (name, comment, obj) in &templates {
        files.insert(
            format!("templates/{name}"),
            format!("# {generated}\n{}", template(comment, obj)?),
        );
    }
    files.insert(
        "templates/installation.yaml".to_owned(),
        format!(
            "# {generated}
# The Installation, as the chart's values say: applied by the hook Job below once the operator has installed
# its CRD and serves its webhook (Helm cannot apply an object whose CRD it does not know yet), and patched in
# place by every upgrade.
{{{{- if .Values.installation.enabled }}}}
apiVersion: v1
kind: ConfigMap
metadata:
  name: caracal-installation
  namespace: {{{{ .Release.Namespace }}}}
data:
  installation.yaml: |
    apiVersion: operator.caracal.dev/v1
    kind: Installation
    metadata:
      name: default
    spec:
      {{{{- toYaml .Values.installation.spec | nindent 6 }}}}
{{{{- end }}}}
"
        ),
    );
    let job = template(
        "After install and every upgrade: `caracal-operator apply-installation` applies the Installation above.",
        &hook_job(
            "apply-installation",
            "post-install,post-upgrade",
            &[
                "apply-installation",
                "--file",
                "/etc/caracal/installation.yaml",
                "--timeout",
                "280",
            ],
            true,
            &labels,
        ),
    )?;
    files.insert(
        "templates/installation-job.yaml".to_owned(),
        format!("# {generated}\n{{{{- if .Values.installation.enabled }}}}\n{job}{{{{- end }}}}\n"),
    );
    files.insert(
        "templates/NOTES.txt".to_owned(),
        "Caracal {{ .Chart.AppVersion }}: the operator runs in {{ .Release.Namespace }}.\n\
         {{- if .Values.installation.enabled }}\n\
         Its status: kubectl get installation default -o jsonpath='{.status.conditions}'\n\
         {{- else }}\n\
         Apply an Installation named default to install pod networking.\n\
         {{- end }}\n"
            .to_owned(),
    );
    Ok(files)
}

/// Every generated file under `manifests/`, relative to it.
pub fn all_files(r: &Release) -> anyhow::Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for crd in crdgen::all() {
        files.insert(format!("crds/{}", crdgen::file_name(&crd)), crdgen::render(&crd)?);
    }
    files.insert(
        "operator/operator.yaml".to_owned(),
        yaml_stream(
            &format!(
                "caracal-operator {}: installs the CRDs, reconciles the Installation named `default`, and holds a\n\
                 leader Lease so more than one replica is safe. Generated by `make manifests`\n\
                 (operator/src/install.rs): do not edit.",
                r.tag()
            ),
            &operator_objects(r),
        )?,
    );
    for (rel, text) in bundle_files(r)? {
        files.insert(format!("olm/{}/{rel}", r.version), text);
    }
    for (rel, text) in chart_files(r)? {
        files.insert(format!("helm/{PACKAGE}/{rel}"), text);
    }
    Ok(files)
}

/// Writes [`all_files`] under `root` (`manifests/`), removing what is no longer generated in the directories
/// it owns (crds, operator, olm, helm). Returns the files written.
pub fn write_all(root: &Path, r: &Release) -> anyhow::Result<Vec<String>> {
    let files = all_files(r)?;
    for sub in ["crds", "operator", "olm", "helm"] {
        let dir = root.join(sub);
        if dir.exists() {
            for path in walk(&dir)? {
                let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
                if !files.contains_key(&rel) {
                    std::fs::remove_file(&path)?;
                }
            }
            prune_empty(&dir)?;
        }
    }
    write_tree(root, &files)
}

/// Removes the empty directories below `dir` (an earlier version's bundle).
fn prune_empty(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            prune_empty(&path)?;
            if std::fs::read_dir(&path)?.next().is_none() {
                std::fs::remove_dir(&path)?;
            }
        }
    }
    Ok(())
}

/// Writes `files` under `dir`, removing files there that are not among them. Returns the paths written.
pub fn write_tree(dir: &Path, files: &BTreeMap<String, String>) -> anyhow::Result<Vec<String>> {
    if dir.exists() {
        for entry in walk(dir)? {
            let rel = entry.strip_prefix(dir)?.to_string_lossy().into_owned();
            if !files.contains_key(&rel) {
                std::fs::remove_file(&entry)?;
            }
        }
    }
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
    }
    Ok(files.keys().cloned().collect())
}

/// Every file below `dir`.
pub fn walk(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn every_owned_crd_has_a_display_name_and_description() {
        for crd in crdgen::all() {
            let (d, text) = crd_description(&crd.spec.names.kind);
            assert!(
                !d.is_empty() && !text.is_empty(),
                "{} has none",
                crd.spec.names.kind
            );
        }
    }

    #[test]
    fn the_csv_installs_the_same_deployment_and_rules_as_the_plain_manifest() {
        let r = Release::current();
        let csv = csv(&r).expect("csv");
        let objects = operator_objects(&r);
        let find = |kind: &str| {
            objects
                .iter()
                .find(|(_, o)| o["kind"] == kind)
                .map(|(_, o)| o.clone())
                .unwrap_or_default()
        };
        let strategy = &csv["spec"]["install"]["spec"];
        assert_eq!(strategy["deployments"][0]["spec"], find("Deployment")["spec"]);
        // The same rules, but for the CRDs: OLM installs them and the operator only reads them.
        let tail = |v: &Value| v.as_array().map(|a| a[1..].to_vec());
        assert_eq!(
            tail(&strategy["clusterPermissions"][0]["rules"]),
            tail(&find("ClusterRole")["rules"])
        );
        assert_eq!(
            strategy["clusterPermissions"][0]["rules"][0]["verbs"],
            json!(["get", "list", "watch"])
        );
        assert_eq!(strategy["permissions"][0]["rules"], find("Role")["rules"]);
        assert_eq!(
            csv["spec"]["customresourcedefinitions"]["owned"]
                .as_array()
                .map(Vec::len),
            Some(crdgen::all().len())
        );
    }
}
