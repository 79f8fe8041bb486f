//! The rule IR: what every policy backend (the offline evaluator, iptables, and later eBPF and nftables)
//! consumes. Kubernetes NetworkPolicy, Caracal NetworkPolicy and GlobalNetworkPolicy all convert into it, so
//! the semantics live in one place.

use caracal_crds::selector::Expr;
use ipnet::IpNet;

/// What a rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Accept; no later rule or tier is consulted.
    Allow,
    /// Drop.
    Deny,
    /// Log, then go on to the next rule.
    Log,
    /// Skip the rest of this tier.
    Pass,
}

/// A traffic direction, seen from the endpoint a policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Into the endpoint.
    Ingress,
    /// Out of the endpoint.
    Egress,
}

/// What a tier does with traffic its selecting policies leave undecided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TierDefault {
    /// Drop it.
    Deny,
    /// Go on to the next tier.
    Pass,
}

/// Which namespaces a rule's selectors look in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The policy's own namespace (a namespaced policy's rule without a namespaceSelector).
    Namespace(String),
    /// Every namespace and the global network sets (a GlobalNetworkPolicy's rule without a namespaceSelector).
    Any,
    /// Namespaces (and, with `global()`, non-namespaced entities) a namespaceSelector picks.
    Selector(Expr),
}

/// A port condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    /// Ports `low..=high`.
    Range(u16, u16),
    /// A named container port of the endpoint on that side.
    Named(String),
}

/// ICMP type and optional code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icmp {
    /// ICMP type.
    pub type_: u8,
    /// ICMP code; any when unset.
    pub code: Option<u8>,
}

/// Service-account conditions on an endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceAccountMatch {
    /// Names (any when empty).
    pub names: Vec<String>,
    /// Label selector over service accounts.
    pub selector: Option<Expr>,
}

/// A Kubernetes Service a rule matches (`services`): its serving endpoints' addresses as a source, their
/// addresses and ports as a destination.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    /// The Service's namespace (the policy's when the rule does not say).
    pub namespace: String,
    /// The Service's name.
    pub name: String,
}

/// Conditions on one side (source or destination) of a packet. Unset fields match anything.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityMatch {
    /// The address is in one of these networks (any when empty).
    pub nets: Vec<IpNet>,
    /// The address is in none of these networks.
    pub not_nets: Vec<IpNet>,
    /// The address belongs to an endpoint or network set these labels select (in `scope`).
    pub selector: Option<Expr>,
    /// The address belongs to nothing this selector selects (in `scope`).
    pub not_selector: Option<Expr>,
    /// Where the selectors look; also restricts the entity to those namespaces when no selector is set
    /// (`namespaceSelector` alone).
    pub scope: Scope,
    /// `scope` came from an explicit namespaceSelector (so it constrains even without a selector).
    pub scoped: bool,
    /// Port is one of these (any when empty).
    pub ports: Vec<PortMatch>,
    /// Port is none of these.
    pub not_ports: Vec<PortMatch>,
    /// The entity is an endpoint running as one of these service accounts.
    pub service_accounts: Option<Box<ServiceAccountMatch>>,
    /// The entity is a serving endpoint of this Service (as a destination: on one of its ports).
    pub services: Option<Box<ServiceRef>>,
}

impl EntityMatch {
    /// Matches anything, looking for selectors in `scope`.
    pub fn any(scope: Scope) -> Self {
        EntityMatch {
            nets: Vec::new(),
            not_nets: Vec::new(),
            selector: None,
            not_selector: None,
            scope,
            scoped: false,
            ports: Vec::new(),
            not_ports: Vec::new(),
            service_accounts: None,
            services: None,
        }
    }
}

/// One rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The action on a match.
    pub action: Action,
    /// 4 or 6; any when unset.
    pub ip_version: Option<u8>,
    /// IP protocol number; any when unset.
    pub protocol: Option<u8>,
    /// Not this protocol.
    pub not_protocol: Option<u8>,
    /// ICMP type/code.
    pub icmp: Option<Icmp>,
    /// Not this ICMP type/code.
    pub not_icmp: Option<Icmp>,
    /// Source conditions.
    pub source: EntityMatch,
    /// Destination conditions.
    pub destination: EntityMatch,
}

/// One policy, converted.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Display name: `ns/name` for namespaced policies, `knp.default.ns/name` for Kubernetes ones.
    pub name: String,
    /// The namespace of a namespaced policy.
    pub namespace: Option<String>,
    /// Position in the tier (unset sorts last).
    pub order: Option<f64>,
    /// Endpoints it applies to.
    pub selector: Expr,
    /// GlobalNetworkPolicy: only endpoints in these namespaces.
    pub namespace_selector: Option<Expr>,
    /// Only endpoints running as service accounts these labels select.
    pub service_account_selector: Option<Expr>,
    /// Ingress rules, when the policy applies to ingress.
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules, when the policy applies to egress.
    pub egress: Option<Vec<Rule>>,
    /// Programmed on every node whether or not a local endpoint uses it (`performanceHints:
    /// [AssumeNeededOnEveryNode]`), so an endpoint it selects starts with its chains already in place.
    pub everywhere: bool,
}

impl Policy {
    /// The rules for `dir`, when the policy applies to that direction.
    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }
}

/// A tier and its policies, in evaluation order.
#[derive(Clone, Debug, PartialEq)]
pub struct Tier {
    /// Tier name.
    pub name: String,
    /// Position among tiers (unset sorts last).
    pub order: Option<f64>,
    /// What undecided traffic does.
    pub default_action: TierDefault,
    /// Policies by order, then name.
    pub policies: Vec<std::sync::Arc<Policy>>,
}

/// Sort key: set orders first, ascending; unset last; then by name.
pub fn order_key(order: Option<f64>, name: &str) -> (u8, f64, String) {
    match order {
        Some(o) => (0, o, name.to_owned()),
        None => (1, 0.0, name.to_owned()),
    }
}
