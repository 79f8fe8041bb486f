//! Network sets: named lists of networks that policies select by label like endpoints.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::schema::Net;

/// Most networks one set may hold.
pub const MAX_SET_NETS: u64 = 20_000;

/// A cluster-wide set of networks, selected by policies through its labels (and `global()`).
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "GlobalNetworkSet",
    shortname = "gns",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
pub struct GlobalNetworkSetSpec {
    /// The networks (CIDRs or single addresses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SET_NETS))]
    pub nets: Vec<Net>,
}

/// A namespaced set of networks, selected by policies in its namespace through its labels.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "NetworkSet",
    namespaced,
    shortname = "cns",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
pub struct NetworkSetSpec {
    /// The networks (CIDRs or single addresses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SET_NETS))]
    pub nets: Vec<Net>,
}
