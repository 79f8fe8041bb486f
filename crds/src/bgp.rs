//! BGP: `BGPConfiguration` (cluster-wide settings) and `BGPPeer` (sessions beyond the node mesh).

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use crate::schema::{Cidr, Selector, port_number_schema};

/// A service CIDR to advertise.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
pub struct ServiceCidr {
    /// The network.
    pub cidr: Cidr,
}

/// How BIRD binds its listening socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum BindMode {
    /// Listen on every address.
    None,
    /// Listen on the node's address only.
    NodeIP,
}

/// Cluster-wide BGP settings (`default`), or one node's (`node.<name>`).
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "BGPConfiguration",
    shortname = "bgpconfig",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "ASN", type_ = "integer", json_path = ".spec.asNumber"),
    printcolumn(name = "Mesh", type_ = "boolean", json_path = ".spec.nodeToNodeMeshEnabled"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct BGPConfigurationSpec {
    /// Peer every node with every other node (true when unset).
    pub node_to_node_mesh_enabled: Option<bool>,
    /// The cluster's AS number (64512 when unset).
    #[schemars(range(min = 1))]
    pub as_number: Option<u32>,
    /// BGP port BIRD listens on (179 when unset).
    #[serde(default)]
    #[schemars(schema_with = "port_number_schema")]
    pub listen_port: Option<u16>,
    /// BIRD's log level: Debug, Info, Warning, Error, Fatal.
    #[schemars(length(max = 8))]
    #[x_kube(validation = Rule::new("false").message("logSeverityScreen is not implemented by Caracal yet (BIRD logs at its default level): remove it"))]
    pub log_severity_screen: Option<String>,
    /// Service cluster IP ranges to advertise.
    #[serde(rename = "serviceClusterIPs", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("false").message("serviceClusterIPs is not implemented by Caracal yet (Service addresses are not advertised over BGP): remove it"))]
    pub service_cluster_ips: Vec<ServiceCidr>,
    /// Service external IP ranges to advertise.
    #[serde(rename = "serviceExternalIPs", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("false").message("serviceExternalIPs is not implemented by Caracal yet (Service addresses are not advertised over BGP): remove it"))]
    pub service_external_ips: Vec<ServiceCidr>,
    /// LoadBalancer IP ranges to advertise.
    #[serde(
        rename = "serviceLoadBalancerIPs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("false").message("serviceLoadBalancerIPs is not implemented by Caracal yet (Service addresses are not advertised over BGP): remove it"))]
    pub service_load_balancer_ips: Vec<ServiceCidr>,
    /// Where BIRD listens.
    #[x_kube(validation = Rule::new("false").message("bindMode is not implemented by Caracal yet (BIRD listens on every address): remove it"))]
    pub bind_mode: Option<BindMode>,
    /// Interfaces whose routes BIRD ignores (shell globs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("false").message("ignoredInterfaces is not implemented by Caracal yet (BIRD imports only BGP routes and ignores interfaces already): remove it"))]
    pub ignored_interfaces: Vec<String>,
}

/// A Secret key holding a BGP password.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
pub struct SecretKeyRef {
    /// Secret name (in caracal-node's namespace, caracal-system).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Where a BGP password comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BGPPassword {
    /// The Secret key.
    pub secret_key_ref: SecretKeyRef,
}

/// Which source address BIRD uses towards a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum SourceAddress {
    /// The node's address.
    UseNodeIP,
    /// Let the kernel choose.
    None,
}

/// A BGP session: from one node (or the nodes `nodeSelector` matches) to a peer address or to the nodes
/// `peerSelector` matches (route reflectors).
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "BGPPeer",
    shortname = "bgppeer",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "PeerIP", type_ = "string", json_path = ".spec.peerIP"),
    printcolumn(name = "ASN", type_ = "integer", json_path = ".spec.asNumber"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.node) && has(self.nodeSelector))")
        .message("set node or nodeSelector, not both")
        .field_path(".nodeSelector"),
    validation = Rule::new("!(has(self.peerIP) && has(self.peerSelector))")
        .message("set peerIP or peerSelector, not both")
        .field_path(".peerSelector"),
    validation = Rule::new("has(self.peerIP) || has(self.peerSelector)")
        .message("a BGPPeer needs peerIP (an address, optionally with :port) or peerSelector")
        .field_path(".peerIP"),
    validation = Rule::new("!has(self.peerIP) || has(self.asNumber)")
        .message("a peerIP needs the peer's asNumber")
        .field_path(".asNumber"),
)]
pub struct BGPPeerSpec {
    /// The node this peering is configured on (every node when neither node nor nodeSelector is set).
    #[schemars(length(max = 253))]
    pub node: Option<String>,
    /// The nodes this peering is configured on.
    pub node_selector: Option<Selector>,
    /// The peer's address, optionally `ip:port` or `[ipv6]:port`.
    #[serde(rename = "peerIP")]
    #[schemars(length(max = 53))]
    #[x_kube(validation = Rule::new("isIP(self) || (self.contains(':') && isIP(self.substring(0, self.lastIndexOf(':')).replace('[', '').replace(']', '')))").message("peerIP must be an IP address, optionally followed by :port"))]
    pub peer_ip: Option<String>,
    /// Peer with the nodes these labels select (route reflectors).
    pub peer_selector: Option<Selector>,
    /// The peer's AS number.
    #[schemars(range(min = 1))]
    pub as_number: Option<u32>,
    /// Keep the original next hop when re-advertising.
    #[x_kube(validation = Rule::new("false").message("keepOriginalNextHop is not implemented by Caracal yet (BIRD sets the next hop itself): remove it"))]
    pub keep_original_next_hop: Option<bool>,
    /// TCP MD5 password for the session: a key of a Secret in caracal-node's namespace, which caracal-node
    /// must be allowed to get, list and watch (a Role with `resourceNames` and a RoleBinding). A session
    /// whose password cannot be read is not configured.
    pub password: Option<BGPPassword>,
    /// Source address selection.
    #[x_kube(validation = Rule::new("false").message("sourceAddress is not implemented by Caracal yet (BIRD chooses the source address): remove it"))]
    pub source_address: Option<SourceAddress>,
    /// How long the peer keeps routes while BIRD restarts (graceful restart), e.g. `120s`.
    #[x_kube(validation = Rule::new("false").message("maxRestartTime is not implemented by Caracal yet (graceful restart is not configured): remove it"))]
    pub max_restart_time: Option<crate::schema::Duration>,
    /// Require this TTL hop count (GTSM).
    #[schemars(range(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("false").message("ttlSecurity is not implemented by Caracal yet (GTSM is not configured): remove it"))]
    pub ttl_security: Option<u8>,
}
