//! Network sets: named lists of networks that policies select by label like endpoints.
//!
//! Calico Enterprise's `allowedEgressDomains` is in the types only so the API server refuses it by name
//! (a CEL rule) instead of pruning it: Caracal has no DNS policy.

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
#[x_kube(validation = Rule::new("!has(self.allowedEgressDomains)")
    .message("allowedEgressDomains (Calico Enterprise DNS policy) are not enforced by Caracal: remove it and list the destinations' addresses in nets")
    .field_path(".allowedEgressDomains"))]
pub struct GlobalNetworkSetSpec {
    /// The networks (CIDRs or single addresses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SET_NETS))]
    pub nets: Vec<Net>,
    /// Calico Enterprise's domain names. Not enforced by Caracal, so it is refused: it is in the schema only
    /// so that it is refused by name rather than pruned.
    #[serde(
        default,
        rename = "allowedEgressDomains",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub allowed_egress_domains: Vec<String>,
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
#[x_kube(validation = Rule::new("!has(self.allowedEgressDomains)")
    .message("allowedEgressDomains (Calico Enterprise DNS policy) are not enforced by Caracal: remove it and list the destinations' addresses in nets")
    .field_path(".allowedEgressDomains"))]
pub struct NetworkSetSpec {
    /// The networks (CIDRs or single addresses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SET_NETS))]
    pub nets: Vec<Net>,
    /// Calico Enterprise's domain names. Not enforced by Caracal, so it is refused: it is in the schema only
    /// so that it is refused by name rather than pruned.
    #[serde(
        default,
        rename = "allowedEgressDomains",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub allowed_egress_domains: Vec<String>,
}
