//! `Installation` (operator.caracal.dev/v1): the one object a user writes to install and configure Caracal.
//!
//! Field names follow the Tigera operator's operator.tigera.io/v1 Installation, so a Calico Installation
//! converts by changing its apiVersion. Defaults are never written into `spec`: the operator reports the
//! spec with every default filled in under `status.computed`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::DaemonSetUpdateStrategy;
use k8s_openapi::api::core::v1::{Affinity, LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use crate::ippool::{
    AllowedUse, BLOCK_SIZE_RANGE_MSG, BLOCK_SIZE_RANGE_RULE, POOL_HOLDS_BLOCK_MSG, POOL_HOLDS_BLOCK_RULE,
};
use crate::schema::{Cidr, Selector, mtu_schema};

/// The Installation's only allowed name.
pub const INSTALLATION_NAME: &str = "default";

/// Which data plane enforces policy on Linux nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum LinuxDataplane {
    /// iptables (the default).
    Iptables,
    /// eBPF programs attached with TC.
    BPF,
    /// nftables.
    Nftables,
}

/// A feature switch, spelled as the Tigera operator spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Toggle {
    /// On.
    Enabled,
    /// Off.
    Disabled,
}

/// Encapsulation of an Installation IP pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Encapsulation {
    /// IP-in-IP between all nodes (IPv4 only).
    IPIP,
    /// IP-in-IP between nodes in different subnets (IPv4 only).
    IPIPCrossSubnet,
    /// VXLAN between all nodes.
    VXLAN,
    /// VXLAN between nodes in different subnets.
    VXLANCrossSubnet,
    /// No encapsulation: routes (BGP or direct).
    None,
}

/// An IP pool the operator creates as an `IPPool` object.
#[skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(BLOCK_SIZE_RANGE_RULE).message(BLOCK_SIZE_RANGE_MSG).field_path(".blockSize"),
    validation = Rule::new(POOL_HOLDS_BLOCK_RULE).message(kube::core::Message::Expression(POOL_HOLDS_BLOCK_MSG.into())).field_path(".cidr"),
    validation = Rule::new("!isCIDR(self.cidr) || cidr(self.cidr).ip().family() == 4 || !has(self.encapsulation) || !self.encapsulation.startsWith('IPIP')")
        .message("IPIP carries IPv4 only: use VXLAN, VXLANCrossSubnet or None for an IPv6 pool")
        .field_path(".encapsulation"),
)]
pub struct InstallationIPPool {
    /// Name of the IPPool object; derived from the CIDR when unset.
    #[schemars(length(max = 253))]
    pub name: Option<String>,
    /// The pool's network.
    pub cidr: Cidr,
    /// Encapsulation (VXLAN when unset and BGP is off, IPIP when BGP is on).
    pub encapsulation: Option<Encapsulation>,
    /// Masquerade traffic leaving the pools (Enabled when unset).
    pub nat_outgoing: Option<Toggle>,
    /// Nodes that take addresses from this pool (`all()` when unset).
    pub node_selector: Option<Selector>,
    /// Per-node block size as a prefix length (26 / 122 when unset).
    pub block_size: Option<i32>,
    /// Do not advertise this pool over BGP.
    #[serde(rename = "disableBGPExport")]
    pub disable_bgp_export: Option<bool>,
    /// What the addresses may be used for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub allowed_uses: Vec<AllowedUse>,
}

/// How a node finds the address it advertises to other nodes; at most one method may be set.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.firstFound) && self.firstFound, has(self.kubernetes), has(self.interface), has(self.skipInterface), has(self.canReach), has(self.cidrs)].filter(m, m).size() <= 1")
    .message("choose one autodetection method: set only one of firstFound, kubernetes, interface, skipInterface, canReach, cidrs"))]
pub struct NodeAddressAutodetection {
    /// The first valid address on the first interface found.
    pub first_found: Option<bool>,
    /// The Node object's address of this type (`NodeInternalIP`).
    #[x_kube(validation = Rule::new("self == 'NodeInternalIP'").message("kubernetes must be NodeInternalIP"))]
    #[schemars(length(max = 32))]
    pub kubernetes: Option<String>,
    /// The address of the first interface whose name matches this regular expression.
    #[schemars(length(max = 256))]
    pub interface: Option<String>,
    /// The first interface whose name does not match this regular expression.
    #[schemars(length(max = 256))]
    pub skip_interface: Option<String>,
    /// The interface that routes to this address or host name.
    #[schemars(length(max = 253))]
    pub can_reach: Option<String>,
    /// The first address inside one of these networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub cidrs: Option<Vec<Cidr>>,
}

/// Pod networking settings.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CalicoNetworkSpec {
    /// The data plane (Iptables when unset).
    pub linux_dataplane: Option<LinuxDataplane>,
    /// Run BGP (BIRD) on every node (Enabled when a pool uses IPIP or no encapsulation).
    pub bgp: Option<Toggle>,
    /// Encrypt pod traffic between nodes with WireGuard (Disabled when unset).
    pub wireguard: Option<Toggle>,
    /// Pools to create (one IPv4 pool 192.168.0.0/16 when unset and no IPPool exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 25))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.cidr == a.cidr))").message("two ipPools have the same cidr: give each pool its own network"))]
    pub ip_pools: Option<Vec<InstallationIPPool>>,
    /// Pod interface MTU; detected from the host interface minus encapsulation overhead when unset.
    #[serde(default)]
    #[schemars(schema_with = "mtu_schema")]
    pub mtu: Option<i32>,
    /// How nodes find their IPv4 address.
    #[serde(rename = "nodeAddressAutodetectionV4")]
    pub node_address_autodetection_v4: Option<NodeAddressAutodetection>,
    /// How nodes find their IPv6 address.
    #[serde(rename = "nodeAddressAutodetectionV6")]
    pub node_address_autodetection_v6: Option<NodeAddressAutodetection>,
    /// Support hostPort mappings (Enabled when unset).
    pub host_ports: Option<Toggle>,
}

/// Resource requirements for one named container of a component.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
pub struct ContainerOverride {
    /// Container name (`caracal-node`, `install-cni`, `caracal-typha`).
    #[schemars(length(max = 63))]
    pub name: String,
    /// Requests and limits.
    pub resources: Option<ResourceRequirements>,
}

/// Labels and annotations added to what the operator renders.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
pub struct MetadataOverride {
    /// Extra labels.
    pub labels: Option<BTreeMap<String, String>>,
    /// Extra annotations.
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Pod-spec overrides of a component.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecOverride {
    /// Container resources, by container name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub containers: Option<Vec<ContainerOverride>>,
    /// Init container resources, by container name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub init_containers: Option<Vec<ContainerOverride>>,
    /// Replaces the rendered node selector.
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Replaces the rendered affinity.
    pub affinity: Option<Affinity>,
    /// Replaces the rendered tolerations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub tolerations: Option<Vec<Toleration>>,
}

/// Pod template overrides of a component.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
pub struct PodTemplateOverride {
    /// Pod labels and annotations.
    pub metadata: Option<MetadataOverride>,
    /// Pod spec overrides.
    pub spec: Option<PodSpecOverride>,
}

/// Overrides of the caracal-node DaemonSet.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DaemonSetOverrideSpec {
    /// Seconds a new pod must be ready before it counts as available.
    #[schemars(range(min = 0))]
    pub min_ready_seconds: Option<i32>,
    /// Pod template overrides.
    pub template: Option<PodTemplateOverride>,
}

/// The `calicoNodeDaemonSet` override.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
pub struct DaemonSetOverride {
    /// DaemonSet labels and annotations.
    pub metadata: Option<MetadataOverride>,
    /// DaemonSet spec overrides.
    pub spec: Option<DaemonSetOverrideSpec>,
}

/// Overrides of the caracal-typha Deployment.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas")
    .message("minReplicas must not exceed maxReplicas")
    .field_path(".minReplicas"))]
pub struct DeploymentOverrideSpec {
    /// Seconds a new pod must be ready before it counts as available.
    #[schemars(range(min = 0))]
    pub min_ready_seconds: Option<i32>,
    /// Fewest Typha replicas, whatever the node count (a Caracal extension).
    #[schemars(range(min = 0, max = 100))]
    pub min_replicas: Option<i32>,
    /// Most Typha replicas, whatever the node count (a Caracal extension).
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: Option<i32>,
    /// Pod template overrides.
    pub template: Option<PodTemplateOverride>,
}

/// The `typhaDeployment` override.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
pub struct DeploymentOverride {
    /// Deployment labels and annotations.
    pub metadata: Option<MetadataOverride>,
    /// Deployment spec overrides.
    pub spec: Option<DeploymentOverrideSpec>,
}

/// Installs and configures Caracal. There is one, named `default`.
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "operator.caracal.dev",
    version = "v1",
    kind = "Installation",
    status = "InstallationStatus",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Degraded",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].status"
    ),
    printcolumn(
        name = "Dataplane",
        type_ = "string",
        json_path = ".status.computed.calicoNetwork.linuxDataplane"
    ),
    printcolumn(name = "MTU", type_ = "integer", json_path = ".status.mtu"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[kube(validation = Rule::new("self.metadata.name == 'default'").message("the Installation must be named default (metadata.name): Caracal reads only that one"))]
#[serde(rename_all = "camelCase")]
pub struct InstallationSpec {
    /// Pod networking.
    pub calico_network: Option<CalicoNetworkSpec>,
    /// Registry images are pulled from (with a trailing `/`).
    #[schemars(length(max = 253))]
    pub registry: Option<String>,
    /// Path between the registry and the image name.
    #[schemars(length(max = 253))]
    pub image_path: Option<String>,
    /// Prefix added to every image name.
    #[schemars(length(max = 63))]
    pub image_prefix: Option<String>,
    /// Pull secrets (in the operator's namespace) copied to caracal-system and set on every pod the operator
    /// renders; each must be of type kubernetes.io/dockerconfigjson or kubernetes.io/dockercfg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(s, size(s.name) > 0)").message("every imagePullSecrets entry needs a name: the name of a Secret in the operator's namespace"))]
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    /// Replicas of control-plane components (Typha's floor); from the node count when unset.
    #[schemars(range(min = 1, max = 100))]
    pub control_plane_replicas: Option<i32>,
    /// How caracal-node pods are replaced (RollingUpdate, maxUnavailable 1 when unset).
    pub node_update_strategy: Option<DaemonSetUpdateStrategy>,
    /// caracal-node DaemonSet overrides.
    pub calico_node_daemon_set: Option<DaemonSetOverride>,
    /// caracal-typha Deployment overrides.
    pub typha_deployment: Option<DeploymentOverride>,
    /// Port of caracal-node's /metrics (9091 when unset).
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::port_number_schema")]
    pub node_metrics_port: Option<u16>,
    /// Port of caracal-typha's /metrics (9093 when unset).
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::port_number_schema")]
    pub typha_metrics_port: Option<u16>,
}

/// The state of one rendered component.
#[skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
pub struct ComponentStatus {
    /// Component name (`caracal-node`, `caracal-typha`, ...).
    pub name: String,
    /// `Ready`, `Progressing` or `Degraded`.
    pub state: String,
    /// What is happening, for a person.
    pub message: Option<String>,
}

/// What the operator observed and did.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstallationStatus {
    /// Ready, Progressing and Degraded, each with observedGeneration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The spec as applied, with every default filled in.
    pub computed: Option<InstallationSpec>,
    /// The pod MTU in force.
    pub mtu: Option<i32>,
    /// The ImageSet whose digests the rendered images use (`caracal-<release>`); unset when images are
    /// rendered by tag.
    pub image_set: Option<String>,
    /// Per-component state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentStatus>,
}
