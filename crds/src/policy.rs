//! Network policy: `GlobalNetworkPolicy` (cluster-wide) and `NetworkPolicy` (namespaced), with the rule
//! language they share. Field names are Calico's (projectcalico.org/v3).
//!
//! What the API server can check alone is checked by the schema: rule actions, protocol and port syntax,
//! ICMP fields, rule counts, selector lengths, `global()` placement and the GlobalNetworkPolicy flag
//! combinations Calico forbids. Selector syntax and tier existence need the parser and the cluster, so the
//! operator's admission webhook checks them.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use crate::schema::{NamespaceSelector, Net, Port, Protocol, Selector};

/// Most rules one policy may hold in each direction.
pub const MAX_RULES: u64 = 1024;
/// Most nets (or notNets) one entity rule may list; larger lists belong in a (Global)NetworkSet.
pub const MAX_RULE_NETS: u64 = 64;
/// Most ports (or notPorts) one entity rule may list.
pub const MAX_RULE_PORTS: u64 = 32;

/// What a rule does with a packet it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Action {
    /// Accept the packet; later policies in any tier are not consulted.
    Allow,
    /// Drop the packet.
    Deny,
    /// Log the packet and go on to the next rule.
    Log,
    /// Skip the rest of this tier and go on to the next tier.
    Pass,
}

/// Which directions a policy applies to.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum PolicyType {
    /// Traffic into the selected endpoints.
    Ingress,
    /// Traffic out of the selected endpoints.
    Egress,
}

/// ICMP type and code to match; the code may be given only with a type.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.code) || has(self.type)")
    .message("an ICMP code needs an ICMP type: set type as well, or remove code")
    .field_path(".code"))]
pub struct IcmpFields {
    /// ICMP type, 0..=254.
    #[serde(rename = "type")]
    #[schemars(range(min = 0, max = 254))]
    pub type_: Option<u8>,
    /// ICMP code, 0..=255; requires `type`.
    #[schemars(range(min = 0, max = 255))]
    pub code: Option<u8>,
}

/// Service accounts an entity rule matches, by name and/or by label selector.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
pub struct ServiceAccountMatch {
    /// Names of service accounts (in the endpoint's namespace).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub names: Vec<String>,
    /// Label selector over service accounts.
    pub selector: Option<Selector>,
}

/// A Kubernetes Service a rule matches by name.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
pub struct ServiceMatch {
    /// Service name.
    pub name: String,
    /// Service namespace; defaults to the policy's.
    pub namespace: Option<String>,
}

/// One side (source or destination) of a rule. Every field that is set must match.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntityRule {
    /// Match addresses in any of these networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULE_NETS))]
    pub nets: Vec<Net>,
    /// Match addresses in none of these networks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULE_NETS))]
    pub not_nets: Vec<Net>,
    /// Match endpoints (and network sets) with these labels.
    pub selector: Option<Selector>,
    /// Match endpoints without these labels.
    pub not_selector: Option<Selector>,
    /// Match endpoints in namespaces with these labels; `global()` matches non-namespaced entities.
    pub namespace_selector: Option<NamespaceSelector>,
    /// Match these ports (numbers, `"low:high"` ranges, named ports). Needs protocol TCP, UDP or SCTP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULE_PORTS))]
    pub ports: Vec<Port>,
    /// Match ports other than these. Needs protocol TCP, UDP or SCTP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULE_PORTS))]
    pub not_ports: Vec<Port>,
    /// Match endpoints running as these service accounts.
    pub service_accounts: Option<ServiceAccountMatch>,
    /// Match the endpoints of this Kubernetes Service.
    pub services: Option<ServiceMatch>,
}

/// Free-form metadata carried with a rule.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
pub struct RuleMetadata {
    /// Annotations, for the user's own bookkeeping.
    pub annotations: Option<BTreeMap<String, String>>,
}

/// Rule condition: some port list is set on either side.
const RULE_HAS_PORTS: &str = "(has(self.source) && (has(self.source.ports) || has(self.source.notPorts))) || \
     (has(self.destination) && (has(self.destination.ports) || has(self.destination.notPorts)))";

/// A policy rule: when the packet matches every field set, `action` applies.
#[skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new(format!("!({RULE_HAS_PORTS}) || (has(self.protocol) && (type(self.protocol) == string ? self.protocol in ['TCP', 'UDP', 'SCTP'] : self.protocol in [6, 17, 132]))"))
        .message("ports and notPorts need protocol TCP, UDP or SCTP: set protocol, or remove the ports")
        .field_path(".protocol"),
    validation = Rule::new("!(has(self.icmp) || has(self.notICMP)) || (has(self.protocol) && (type(self.protocol) == string ? self.protocol in ['ICMP', 'ICMPv6'] : self.protocol in [1, 58]))")
        .message("icmp and notICMP need protocol ICMP or ICMPv6: set protocol, or remove the ICMP match")
        .field_path(".protocol"),
)]
pub struct PolicyRule {
    /// What to do with a matching packet.
    pub action: Action,
    /// Match only IPv4 (4) or IPv6 (6) traffic.
    #[x_kube(validation = Rule::new("self == 4 || self == 6").message("ipVersion must be 4 or 6"))]
    pub ip_version: Option<i32>,
    /// Match this protocol.
    pub protocol: Option<Protocol>,
    /// Match protocols other than this.
    pub not_protocol: Option<Protocol>,
    /// Match this ICMP type/code (protocol ICMP or ICMPv6).
    pub icmp: Option<IcmpFields>,
    /// Match ICMP other than this type/code.
    #[serde(rename = "notICMP")]
    pub not_icmp: Option<IcmpFields>,
    /// Conditions on the packet's source.
    pub source: Option<EntityRule>,
    /// Conditions on the packet's destination.
    pub destination: Option<EntityRule>,
    /// Metadata kept with the rule.
    pub metadata: Option<RuleMetadata>,
}

/// Hints that change how a policy is rendered, not what it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum PerformanceHint {
    /// The policy will be active on every node: render it eagerly.
    AssumeNeededOnEveryNode,
}

/// A namespaced policy that applies to the workloads of its namespace.
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "NetworkPolicy",
    namespaced,
    shortname = "cnp",
    shortname = "caracalnetworkpolicy",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "Tier", type_ = "string", json_path = ".spec.tier"),
    printcolumn(name = "Order", type_ = "number", json_path = ".spec.order"),
    printcolumn(name = "Selector", type_ = "string", json_path = ".spec.selector"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Tier this policy belongs to; `default` when unset.
    #[schemars(length(max = 253))]
    pub tier: Option<String>,
    /// Position within the tier: lower applies first; unset applies last. Ties go by name.
    pub order: Option<f64>,
    /// Endpoints (in this namespace) the policy applies to; all of them when unset.
    pub selector: Option<Selector>,
    /// Further restricts the endpoints to those running as matching service accounts.
    pub service_account_selector: Option<Selector>,
    /// Directions the policy applies to; by default Ingress, plus Egress when egress rules exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    pub types: Vec<PolicyType>,
    /// Rules for traffic into the selected endpoints, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    pub ingress: Vec<PolicyRule>,
    /// Rules for traffic out of the selected endpoints, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    pub egress: Vec<PolicyRule>,
    /// Rendering hints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1))]
    pub performance_hints: Vec<PerformanceHint>,
}

/// A cluster-wide policy: applies to workloads in any namespace and to hosts.
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "GlobalNetworkPolicy",
    shortname = "gnp",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "Tier", type_ = "string", json_path = ".spec.tier"),
    printcolumn(name = "Order", type_ = "number", json_path = ".spec.order"),
    printcolumn(name = "Selector", type_ = "string", json_path = ".spec.selector"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(has(self.doNotTrack) && self.doNotTrack && has(self.preDNAT) && self.preDNAT)")
        .message("doNotTrack and preDNAT cannot both be true: choose one")
        .field_path(".preDNAT"),
    validation = Rule::new("!((has(self.doNotTrack) && self.doNotTrack) || (has(self.preDNAT) && self.preDNAT)) || (has(self.applyOnForward) && self.applyOnForward)")
        .message("doNotTrack and preDNAT policies must also set applyOnForward: true")
        .field_path(".applyOnForward"),
    validation = Rule::new("!(has(self.preDNAT) && self.preDNAT) || !has(self.egress)")
        .message("preDNAT policies apply to ingress only: remove the egress rules")
        .field_path(".egress"),
)]
pub struct GlobalNetworkPolicySpec {
    /// Tier this policy belongs to; `default` when unset.
    #[schemars(length(max = 253))]
    pub tier: Option<String>,
    /// Position within the tier: lower applies first; unset applies last. Ties go by name.
    pub order: Option<f64>,
    /// Endpoints the policy applies to; all of them when unset.
    pub selector: Option<Selector>,
    /// Restricts the policy to endpoints in namespaces with these labels.
    pub namespace_selector: Option<NamespaceSelector>,
    /// Further restricts the endpoints to those running as matching service accounts.
    pub service_account_selector: Option<Selector>,
    /// Directions the policy applies to; by default Ingress, plus Egress when egress rules exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    pub types: Vec<PolicyType>,
    /// Rules for traffic into the selected endpoints, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    pub ingress: Vec<PolicyRule>,
    /// Rules for traffic out of the selected endpoints, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    pub egress: Vec<PolicyRule>,
    /// Apply before connection tracking (host endpoints only); return traffic must be allowed explicitly.
    pub do_not_track: Option<bool>,
    /// Apply before DNAT (host endpoints, ingress only).
    #[serde(rename = "preDNAT")]
    pub pre_dnat: Option<bool>,
    /// Also apply to traffic forwarded through a host endpoint.
    pub apply_on_forward: Option<bool>,
    /// Rendering hints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1))]
    pub performance_hints: Vec<PerformanceHint>,
}

/// What a tier does with traffic that its selecting policies leave undecided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum TierDefaultAction {
    /// Drop it (the default).
    Deny,
    /// Go on to the next tier.
    Pass,
}

/// An ordered group of policies; tiers are evaluated by `order`, lowest first.
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "Tier",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "Order", type_ = "number", json_path = ".spec.order"),
    printcolumn(name = "DefaultAction", type_ = "string", json_path = ".spec.defaultAction"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct TierSpec {
    /// Position among tiers: lower applies first; unset applies last.
    pub order: Option<f64>,
    /// What happens to traffic the tier's policies select but do not decide; Deny when unset.
    pub default_action: Option<TierDefaultAction>,
}
