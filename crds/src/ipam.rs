//! IPAM state: `IPAMBlock`, `BlockAffinity`, `IPAMHandle`, and the cluster's `IPAMConfiguration`.
//!
//! These objects are written by node agents with compare-and-swap on `resourceVersion`: a block is the
//! unit of ownership, and an allocation exists only once the block that records it has been stored.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use crate::schema::Cidr;

/// Most addresses one block holds (a /20 or a /116).
pub const MAX_BLOCK_ADDRESSES: u64 = 4096;

/// Who holds an allocation, recorded once per distinct holder in a block.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
pub struct AllocationAttribute {
    /// The IPAMHandle the allocation belongs to (one per pod interface).
    #[serde(rename = "handle_id")]
    pub handle_id: Option<String>,
    /// Extra attributes: namespace, pod, node, interface.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secondary: BTreeMap<String, String>,
}

/// A block of addresses carved from an IPPool and (usually) affine to one node.
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "IPAMBlock",
    shortname = "ipamblock",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "Affinity", type_ = "string", json_path = ".spec.affinity"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct IPAMBlockSpec {
    /// The block's network.
    pub cidr: Cidr,
    /// `host:<node>` for a block affine to a node; unset for a block with no affinity.
    #[schemars(length(max = 260))]
    pub affinity: Option<String>,
    /// Only the affine node may allocate from this block.
    #[serde(default)]
    pub strict_affinity: bool,
    /// Per address of the block, the index into `attributes` of its holder, or null when free.
    #[schemars(length(max = MAX_BLOCK_ADDRESSES))]
    pub allocations: Vec<Option<u32>>,
    /// Offsets of the free addresses, in the order they will be handed out.
    #[schemars(length(max = MAX_BLOCK_ADDRESSES))]
    pub unallocated: Vec<u32>,
    /// The holders referenced from `allocations`.
    #[serde(default)]
    #[schemars(length(max = MAX_BLOCK_ADDRESSES))]
    pub attributes: Vec<AllocationAttribute>,
    /// Bumped on every allocation change; lets readers detect reuse of an address.
    #[serde(default)]
    pub sequence_number: u64,
    /// Marked for deletion: no new allocations.
    #[serde(default)]
    pub deleted: bool,
}

/// The state of a node's claim on a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AffinityState {
    /// Claimed; the block is being created.
    Pending,
    /// The block exists and is the node's.
    Confirmed,
    /// Being released.
    PendingDeletion,
}

/// A node's claim on a block.
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "BlockAffinity",
    shortname = "blockaffinity",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "CIDR", type_ = "string", json_path = ".spec.cidr"),
    printcolumn(name = "State", type_ = "string", json_path = ".spec.state"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct BlockAffinitySpec {
    /// Claim state.
    pub state: AffinityState,
    /// The claiming node.
    #[schemars(length(max = 253))]
    pub node: String,
    /// The block's network.
    pub cidr: Cidr,
    /// Marked for deletion.
    #[serde(default)]
    pub deleted: bool,
}

/// Everything allocated under one handle (one pod interface), by block.
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "IPAMHandle",
    shortname = "ipamhandle",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "Handle", type_ = "string", json_path = ".spec.handleID"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct IPAMHandleSpec {
    /// The handle (container ID and interface).
    #[serde(rename = "handleID")]
    #[schemars(length(max = 512))]
    pub handle_id: String,
    /// Per block CIDR (with `/` written as `-`), how many addresses the handle holds there.
    #[serde(default)]
    pub block: BTreeMap<String, u32>,
    /// Marked for deletion.
    #[serde(default)]
    pub deleted: bool,
}

/// Cluster-wide IPAM settings (name `default`).
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "IPAMConfiguration",
    shortname = "ipamconfig",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(
        name = "StrictAffinity",
        type_ = "boolean",
        json_path = ".spec.strictAffinity"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[kube(validation = Rule::new("self.metadata.name == 'default'").message("the IPAMConfiguration must be named default"))]
pub struct IPAMConfigurationSpec {
    /// Never borrow addresses from another node's block.
    pub strict_affinity: Option<bool>,
    /// Most blocks one node may claim (0 or unset: no limit).
    #[schemars(range(min = 0))]
    pub max_blocks_per_host: Option<i32>,
    /// Claim new blocks when a node's are full (true when unset).
    pub auto_allocate_blocks: Option<bool>,
}
