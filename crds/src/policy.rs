//! Network policy: `GlobalNetworkPolicy` (cluster-wide) and `NetworkPolicy` (namespaced), with the rule
//! language they share. Field names are Calico's (projectcalico.org/v3).
//!
//! What the API server can check alone is checked by the schema: rule actions, protocol and port syntax,
//! ICMP fields, rule counts, selector lengths, `global()` placement, and where `services` may appear and
//! with what. Selector syntax and tier existence need the parser and the cluster, so the operator's admission
//! webhook checks them.
//!
//! Nothing is accepted that Caracal does not enforce. Calico fields Caracal has no enforcement for (L7 `http`
//! matches, the host-endpoint flags `doNotTrack`, `preDNAT` and `applyOnForward`, Calico Enterprise's DNS
//! `domains`) are in the types so the schema knows them, and a CEL rule refuses each one by name. Were they
//! left out, the API server would prune them from any client that does not ask for strict field validation,
//! and an HTTP- or domain-restricted Allow would become a plain Allow.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::{Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
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

/// A Kubernetes Service a rule matches by name: its endpoints' addresses and, as a destination, their ports.
///
/// As Calico has it: allowed as the destination of egress rules and the source of ingress rules; not combined
/// with selectors, nets or service accounts on the same side; a destination Service brings its own ports, so
/// the destination may not list ports. A GlobalNetworkPolicy must name the namespace.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
pub struct ServiceMatch {
    /// Service name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Service namespace; in a NetworkPolicy it defaults to the policy's, in a GlobalNetworkPolicy it is
    /// required.
    #[schemars(length(min = 1, max = 253))]
    pub namespace: Option<String>,
}

/// One side (source or destination) of a rule. Every field that is set must match.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.services) || !(has(self.selector) || has(self.notSelector) || has(self.namespaceSelector) || has(self.serviceAccounts) || has(self.nets) || has(self.notNets))")
        .message("services cannot be combined with selector, notSelector, namespaceSelector, serviceAccounts, nets or notNets on the same side of a rule: the Service's endpoints are the match; use services alone, or the other fields without services")
        .field_path(".services"),
    validation = Rule::new("!has(self.domains)")
        .message("domains (Calico Enterprise DNS policy) are not enforced by Caracal: remove domains and match the destination by nets, or by a selector over a (Global)NetworkSet (an Allow would otherwise allow every destination)")
        .field_path(".domains"),
)]
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
    /// Match the endpoints of this Kubernetes Service: only as an ingress rule's source or an egress rule's
    /// destination, and with no selector, nets or serviceAccounts on the same side (see [`ServiceMatch`]).
    pub services: Option<ServiceMatch>,
    /// Calico Enterprise's DNS match. Not enforced by Caracal, so it is refused: it is in the schema only so
    /// that it is refused by name rather than pruned.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
}

/// One HTTP path to match: exactly one of `exact` or `prefix` (Calico's HTTPPath).
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
pub struct HttpPath {
    /// The path, exactly, without query string or fragment.
    pub exact: Option<String>,
    /// Any path beginning with this.
    pub prefix: Option<String>,
}

/// Calico's L7 HTTP request match (HTTPMatch). Caracal enforces no L7 policy, so a rule carrying one is
/// refused by the API server (a CEL rule on [`PolicyRule`]); the type is here so the schema knows the field
/// and refuses it by name instead of pruning it.
#[skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
pub struct HttpMatch {
    /// HTTP methods (`GET`, `PUT`, ...), any of which matches; case sensitive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// HTTP paths, any of which matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<HttpPath>,
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
    validation = Rule::new("!has(self.http)")
        .message("http (L7) matches are not enforced by Caracal: remove http from the rule (an Allow would otherwise allow every HTTP request, not only the matching ones)")
        .field_path(".http"),
    validation = Rule::new("!has(self.destination) || !has(self.destination.services) || !has(self.destination.ports)")
        .message("destination ports cannot be combined with destination services: the Service's own ports are matched; remove the ports, or match the pods by selector instead")
        .field_path(".destination.ports"),
    validation = Rule::new("!has(self.destination) || !has(self.destination.services) || !has(self.destination.notPorts)")
        .message("destination notPorts cannot be combined with destination services: the Service's own ports are matched; remove notPorts, or match the pods by selector instead")
        .field_path(".destination.notPorts"),
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
    /// Calico's L7 HTTP match. Not enforced by Caracal, so it is refused: it is in the schema only so that it
    /// is refused by name rather than pruned.
    pub http: Option<HttpMatch>,
    /// Metadata kept with the rule.
    pub metadata: Option<RuleMetadata>,
}

/// Rule on an ingress rule: `services` only as the source.
const INGRESS_SERVICES: (&str, &str, &str) = (
    "!has(self.destination) || !has(self.destination.services)",
    "services is not allowed in an ingress rule's destination (the destination is the selected endpoint itself): match the Service's pods as source.services, or remove destination.services",
    ".destination.services",
);
/// Rule on an egress rule: `services` only as the destination.
const EGRESS_SERVICES: (&str, &str, &str) = (
    "!has(self.source) || !has(self.source.services)",
    "services is not allowed in an egress rule's source (the source is the selected endpoint itself): match the Service as destination.services, or remove source.services",
    ".source.services",
);
/// Rule on a GlobalNetworkPolicy ingress rule: a source Service names its namespace.
const GLOBAL_INGRESS_NAMESPACE: (&str, &str, &str) = (
    "!has(self.source) || !has(self.source.services) || has(self.source.services.namespace)",
    "a GlobalNetworkPolicy has no namespace to default to: set source.services.namespace to the Service's namespace",
    ".source.services.namespace",
);
/// Rule on a GlobalNetworkPolicy egress rule: a destination Service names its namespace.
const GLOBAL_EGRESS_NAMESPACE: (&str, &str, &str) = (
    "!has(self.destination) || !has(self.destination.services) || has(self.destination.services.namespace)",
    "a GlobalNetworkPolicy has no namespace to default to: set destination.services.namespace to the Service's namespace",
    ".destination.services.namespace",
);

/// The schema of a rule list (at most [`MAX_RULES`]) whose items also carry `rules` (rule, message,
/// fieldPath): rules that depend on the direction, so they sit on the list's items and the error names the
/// rule's index (`spec.egress[3].source.services`).
fn rule_list(generator: &mut SchemaGenerator, rules: &[(&str, &str, &str)]) -> Schema {
    let mut schema = generator.subschema_for::<Vec<PolicyRule>>();
    schema.insert("maxItems".into(), json!(MAX_RULES));
    let added = rules
        .iter()
        .map(|(rule, message, path)| json!({ "rule": rule, "message": message, "fieldPath": path }));
    if let Some(Value::Object(items)) = schema.get_mut("items")
        && let Value::Array(list) = items
            .entry("x-kubernetes-validations")
            .or_insert_with(|| json!([]))
    {
        list.extend(added);
    }
    schema
}

fn ingress_rules(generator: &mut SchemaGenerator) -> Schema {
    rule_list(generator, &[INGRESS_SERVICES])
}
fn egress_rules(generator: &mut SchemaGenerator) -> Schema {
    rule_list(generator, &[EGRESS_SERVICES])
}
fn global_ingress_rules(generator: &mut SchemaGenerator) -> Schema {
    rule_list(generator, &[INGRESS_SERVICES, GLOBAL_INGRESS_NAMESPACE])
}
fn global_egress_rules(generator: &mut SchemaGenerator) -> Schema {
    rule_list(generator, &[EGRESS_SERVICES, GLOBAL_EGRESS_NAMESPACE])
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
    #[schemars(schema_with = "ingress_rules")]
    pub ingress: Vec<PolicyRule>,
    /// Rules for traffic out of the selected endpoints, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "egress_rules")]
    pub egress: Vec<PolicyRule>,
    /// Rendering hints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1))]
    pub performance_hints: Vec<PerformanceHint>,
}

/// A cluster-wide policy: applies to workloads in any namespace.
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
    validation = Rule::new("!has(self.doNotTrack) || !self.doNotTrack")
        .message("doNotTrack is not enforced: Caracal has no host endpoints and always tracks connections; remove doNotTrack (or set it to false)")
        .field_path(".doNotTrack"),
    validation = Rule::new("!has(self.preDNAT) || !self.preDNAT")
        .message("preDNAT is not enforced: Caracal has no host endpoints, and its policy always sees the destination after DNAT (the pod); remove preDNAT (or set it to false) and match the pods' own addresses and ports")
        .field_path(".preDNAT"),
    validation = Rule::new("!has(self.applyOnForward) || !self.applyOnForward")
        .message("applyOnForward is not enforced: Caracal has no host endpoints, and workload policy already applies to traffic forwarded to and from pods; remove applyOnForward (or set it to false)")
        .field_path(".applyOnForward"),
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
    #[schemars(schema_with = "global_ingress_rules")]
    pub ingress: Vec<PolicyRule>,
    /// Rules for traffic out of the selected endpoints, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "global_egress_rules")]
    pub egress: Vec<PolicyRule>,
    /// Calico: apply before connection tracking (host endpoints). Caracal has no host endpoints: only unset
    /// or `false` is accepted.
    pub do_not_track: Option<bool>,
    /// Calico: apply before DNAT (host endpoints). Caracal has no host endpoints: only unset or `false` is
    /// accepted.
    #[serde(rename = "preDNAT")]
    pub pre_dnat: Option<bool>,
    /// Calico: also apply to traffic forwarded through a host endpoint. Caracal has no host endpoints: only
    /// unset or `false` is accepted.
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

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    /// The CEL rules on the items of `spec.<dir>` in a CRD's schema.
    fn item_rules(crd: &serde_json::Value, dir: &str) -> Vec<String> {
        let path = format!("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/{dir}");
        let list = crd.pointer(&path).unwrap_or_else(|| panic!("{path}"));
        assert_eq!(list["maxItems"], json!(MAX_RULES), "{dir}");
        list["items"]["x-kubernetes-validations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["rule"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    #[test]
    fn direction_rules_sit_on_the_rule_items_of_each_list() {
        let np = serde_json::to_value(NetworkPolicy::crd()).unwrap();
        let gnp = serde_json::to_value(GlobalNetworkPolicy::crd()).unwrap();
        for (crd, dir, want) in [
            (&np, "ingress", vec![INGRESS_SERVICES]),
            (&np, "egress", vec![EGRESS_SERVICES]),
            (&gnp, "ingress", vec![INGRESS_SERVICES, GLOBAL_INGRESS_NAMESPACE]),
            (&gnp, "egress", vec![EGRESS_SERVICES, GLOBAL_EGRESS_NAMESPACE]),
        ] {
            let rules = item_rules(crd, dir);
            assert!(rules.iter().any(|r| r == "!has(self.http)"), "{dir}: {rules:?}");
            for (rule, _, _) in want {
                assert!(
                    rules.iter().any(|r| r == rule),
                    "{dir}: {rule} missing from {rules:?}"
                );
            }
        }
    }

    #[test]
    fn unenforced_fields_survive_the_rust_types_so_the_schema_can_refuse_them() {
        let rule: PolicyRule = serde_json::from_value(json!({
            "action": "Allow",
            "http": {"methods": ["GET"], "paths": [{"exact": "/a"}, {"prefix": "/b"}]},
            "destination": {"domains": ["example.com"]},
        }))
        .unwrap();
        let back = serde_json::to_value(&rule).unwrap();
        assert_eq!(back["http"]["paths"][1]["prefix"], "/b");
        assert_eq!(back["destination"]["domains"], json!(["example.com"]));
        let spec: GlobalNetworkPolicySpec =
            serde_json::from_value(json!({"doNotTrack": false, "preDNAT": false, "applyOnForward": false}))
                .unwrap();
        assert_eq!(
            (spec.do_not_track, spec.pre_dnat, spec.apply_on_forward),
            (Some(false), Some(false), Some(false))
        );
    }
}
