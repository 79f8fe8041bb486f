//! `IPPool`: a range of addresses Caracal's IPAM hands to pods, with how traffic to it is routed.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use crate::schema::{Cidr, Selector};

/// CEL: the IPv4/IPv6 block-size range check shared by `IPPool` and the Installation's pools.
/// `self.cidr` is already known to be a CIDR (its own rule says so) when this runs.
pub(crate) const BLOCK_SIZE_RANGE_RULE: &str = "!has(self.blockSize) || !isCIDR(self.cidr) || \
    (cidr(self.cidr).ip().family() == 4 ? (self.blockSize >= 20 && self.blockSize <= 32) \
     : (self.blockSize >= 116 && self.blockSize <= 128))";
/// Message for [`BLOCK_SIZE_RANGE_RULE`].
pub(crate) const BLOCK_SIZE_RANGE_MSG: &str =
    "blockSize is out of range: IPv4 pools take 20 to 32, IPv6 pools 116 to 128";
/// CEL: the pool holds at least one block (its prefix is no longer than the block size, 26 / 122 when unset).
pub(crate) const POOL_HOLDS_BLOCK_RULE: &str = "!isCIDR(self.cidr) || cidr(self.cidr).prefixLength() <= \
    (has(self.blockSize) ? self.blockSize : (cidr(self.cidr).ip().family() == 4 ? 26 : 122))";
/// Message for [`POOL_HOLDS_BLOCK_RULE`].
pub(crate) const POOL_HOLDS_BLOCK_MSG: &str = "'cidr ' + self.cidr + ' is smaller than one block: make its prefix no longer than blockSize (26 for IPv4 and 122 for IPv6 when unset)'";

/// When to encapsulate pod traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum EncapMode {
    /// Never encapsulate.
    Never,
    /// Always encapsulate between nodes.
    Always,
    /// Encapsulate only between nodes in different subnets.
    CrossSubnet,
}

/// What addresses from a pool may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum AllowedUse {
    /// Pod addresses.
    Workload,
    /// Tunnel endpoint addresses (VXLAN VTEPs, IPIP, WireGuard).
    Tunnel,
    /// Service LoadBalancer addresses.
    LoadBalancer,
}

/// Whether IPAM assigns from a pool by itself or only when asked for it by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum AssignmentMode {
    /// Used for any pod on a node the pool's nodeSelector matches.
    Automatic,
    /// Used only when a pod asks for the pool.
    Manual,
}

/// A range of pod addresses and how traffic to them is routed.
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "IPPool",
    shortname = "ippool",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "VXLAN", type_ = "string", json_path = ".spec.vxlanMode"),
    printcolumn(name = "IPIP", type_ = "string", json_path = ".spec.ipipMode"),
    printcolumn(name = "NAT", type_ = "boolean", json_path = ".spec.natOutgoing"),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(BLOCK_SIZE_RANGE_RULE).message(BLOCK_SIZE_RANGE_MSG).field_path(".blockSize"),
    validation = Rule::new(POOL_HOLDS_BLOCK_RULE).message(kube::core::Message::Expression(POOL_HOLDS_BLOCK_MSG.into())).field_path(".cidr"),
    validation = Rule::new("!isCIDR(self.cidr) || cidr(self.cidr).ip().family() == 4 || !has(self.ipipMode) || self.ipipMode == 'Never'")
        .message("IPIP carries IPv4 only: set ipipMode Never on an IPv6 pool (use vxlanMode)")
        .field_path(".ipipMode"),
    validation = Rule::new("!has(self.ipipMode) || self.ipipMode == 'Never' || !has(self.vxlanMode) || self.vxlanMode == 'Never'")
        .message("a pool uses one encapsulation: set ipipMode or vxlanMode to Never")
        .field_path(".vxlanMode"),
)]
pub struct IPPoolSpec {
    /// The pool's network.
    pub cidr: Cidr,
    /// Size of the per-node blocks carved from the pool, as a prefix length (26 / 122 when unset).
    pub block_size: Option<i32>,
    /// VXLAN encapsulation (Never when unset).
    #[serde(rename = "vxlanMode")]
    pub vxlan_mode: Option<EncapMode>,
    /// IPIP encapsulation (Never when unset).
    #[serde(rename = "ipipMode")]
    pub ipip_mode: Option<EncapMode>,
    /// Masquerade traffic from the pool to destinations outside every pool.
    pub nat_outgoing: Option<bool>,
    /// Stop assigning new addresses from this pool.
    pub disabled: Option<bool>,
    /// Do not advertise the pool's routes over BGP.
    #[serde(rename = "disableBGPExport")]
    pub disable_bgp_export: Option<bool>,
    /// Nodes whose pods get addresses from this pool; every node when unset.
    pub node_selector: Option<Selector>,
    /// What the addresses may be used for (Workload and Tunnel when unset).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub allowed_uses: Vec<AllowedUse>,
    /// Automatic (the default) or Manual assignment.
    pub assignment_mode: Option<AssignmentMode>,
}
