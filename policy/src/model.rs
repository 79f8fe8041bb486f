//! The data plane model: everything one node's policy data plane must enforce, resolved. Backends (iptables,
//! and later eBPF) take this and converge the kernel to it; they never see selectors to evaluate, only sets
//! with stable identifiers and their members.
//!
//! ## Set identifiers
//! A set is keyed by what it stands for ([`SetKey`]), so two rules meaning the same thing share one set. Its
//! identifier ([`SetKey::id`]) is the first 64 bits (16 hex digits) of the SHA-256 of an explicit encoding of
//! the key ([`SetKey::encoding`]), so kernel object names derived from it survive refactors and upgrades
//! (an agent restarted on a newer build adopts the sets it finds). The encoding is a kind tag followed by
//! length-prefixed fields, `<len>:<text>` each, which makes it injective:
//!
//! | key | encoding |
//! | --- | --- |
//! | selector in a scope | `selected` `<scope>` `<canonical selector>` |
//! | networks | `nets` `<cidr>`... (sorted, deduplicated, canonical CIDR text) |
//! | service accounts | `serviceaccounts` `<name,name,...>` (sorted) `<canonical selector or empty>` |
//! | named port | `namedport` `<protocol number>` `<port name>` |
//! | a Service's endpoints | `service` `<namespace>` `<name>` |
//! | a Service's endpoint ports | `serviceports` `<namespace>` `<name>` |
//!
//! where `<scope>` is `any`, `ns=<namespace>` or `nsel=<canonical namespace selector>`, and the canonical
//! selector is the selector printer's output (`caracal_crds::selector`), which is stable by contract. Changing
//! this encoding renames every set on every node: treat it like an on-disk format.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use caracal_crds::selector::Expr;
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::ir::{EntityMatch, Policy, PortMatch, Scope, Tier, TierDefault};

/// A workload endpoint on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// `namespace/pod`.
    pub key: String,
    /// The host side of its veth (`crc...`).
    pub iface: String,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
}

/// What a set is keyed by: the thing it stands for, so equal keys share one set. Selectors stay parsed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKey {
    /// Addresses of endpoints and network sets a selector picks in a scope.
    Selected {
        /// The selector.
        selector: Expr,
        /// Where it looks.
        scope: Scope,
    },
    /// A list of networks (sorted, deduplicated).
    Nets(Vec<IpNet>),
    /// Endpoints running as matching service accounts.
    ServiceAccounts {
        /// Names (any when empty; sorted).
        names: Vec<String>,
        /// Label selector over service accounts.
        selector: Option<Expr>,
    },
    /// (address, protocol, port) of every endpoint's container port with this name.
    NamedPort {
        /// Port name.
        name: String,
        /// IP protocol number.
        protocol: u8,
    },
    /// The addresses of a Service's serving endpoints (a source `services` match).
    Service {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name.
        name: String,
    },
    /// (address, protocol, port) of a Service's serving endpoints (a destination `services` match).
    ServicePorts {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name.
        name: String,
    },
}

/// A set's stable identifier: 16 hex digits of the SHA-256 of [`SetKey::encoding`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SetId(pub String);

impl std::fmt::Display for SetId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn field(out: &mut String, text: &str) {
    let _ = write!(out, "{}:{text}", text.len());
}

/// The scope as the set encoding writes it.
fn scope_encoding(scope: &Scope) -> String {
    match scope {
        Scope::Any => "any".into(),
        Scope::Namespace(ns) => format!("ns={ns}"),
        Scope::Selector(e) => format!("nsel={e}"),
    }
}

impl SetKey {
    /// The explicit encoding the identifier hashes (see the module docs).
    pub fn encoding(&self) -> String {
        let mut out = String::new();
        match self {
            SetKey::Selected { selector, scope } => {
                out.push_str("selected");
                field(&mut out, &scope_encoding(scope));
                field(&mut out, &selector.to_string());
            }
            SetKey::Nets(nets) => {
                out.push_str("nets");
                for n in nets {
                    field(&mut out, &n.to_string());
                }
            }
            SetKey::ServiceAccounts { names, selector } => {
                out.push_str("serviceaccounts");
                field(&mut out, &names.join(","));
                field(
                    &mut out,
                    &selector.as_ref().map(ToString::to_string).unwrap_or_default(),
                );
            }
            SetKey::NamedPort { name, protocol } => {
                out.push_str("namedport");
                field(&mut out, &protocol.to_string());
                field(&mut out, name);
            }
            SetKey::Service { namespace, name } => {
                out.push_str("service");
                field(&mut out, namespace);
                field(&mut out, name);
            }
            SetKey::ServicePorts { namespace, name } => {
                out.push_str("serviceports");
                field(&mut out, namespace);
                field(&mut out, name);
            }
        }
        out
    }

    /// The stable identifier.
    pub fn id(&self) -> SetId {
        let digest = Sha256::digest(self.encoding().as_bytes());
        SetId(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
    }

    /// True for sets of (address, protocol, port) rather than networks.
    pub fn holds_ports(&self) -> bool {
        matches!(self, SetKey::NamedPort { .. } | SetKey::ServicePorts { .. })
    }
}

/// The members of a set.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SetMembers {
    /// Networks (for network sets).
    pub nets: BTreeSet<IpNet>,
    /// (address, protocol, port) (for port sets).
    pub ip_ports: BTreeSet<(IpAddr, u8, u16)>,
}

impl SetMembers {
    /// The (protocol, port) members at `ips` (a range of the ordered members per address, not a scan).
    pub fn ports_at<'a>(&'a self, ips: &'a [IpAddr]) -> impl Iterator<Item = (u8, u16)> + 'a {
        ips.iter().flat_map(|ip| {
            self.ip_ports
                .range((*ip, 0, 0)..=(*ip, u8::MAX, u16::MAX))
                .map(|(_, proto, port)| (*proto, *port))
        })
    }
}

/// Everything the policy data plane of one node must enforce.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DataplaneModel {
    /// Endpoints on this node, sorted by key.
    pub endpoints: Vec<LocalEndpoint>,
    /// Per interface: for each direction, the tiers (with only the policies selecting that endpoint).
    pub endpoint_tiers: BTreeMap<String, EndpointTiers>,
    /// The policies referenced by any endpoint, by name (each rendered once, shared).
    pub policies: BTreeMap<String, Policy>,
    /// Every set the rules reference, with its members.
    pub sets: BTreeMap<SetKey, SetMembers>,
    /// natOutgoing: what leaves the pools with the node's address.
    pub nat_outgoing: NatOutgoing,
    /// What happens to a pod's traffic to its own host, after the pod's egress policy (Felix's
    /// `defaultEndpointToHostAction`).
    pub endpoint_to_host: EndpointToHost,
}

/// Felix's `defaultEndpointToHostAction`: what a pod's traffic to its own host meets once the pod's egress
/// policy allowed it (a reply of a connection the host opened is always let through).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EndpointToHost {
    /// Dropped (Calico's default).
    #[default]
    Drop,
    /// Handed to the host's own input rules.
    Return,
    /// Accepted.
    Accept,
}

/// natOutgoing, as every policy backend implements it: traffic from a pool with `natOutgoing: true` to
/// anywhere outside every pool leaves with the node's address (or `address`, Felix's `natOutgoingAddress`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatOutgoing {
    /// Pools whose traffic is masqueraded (enabled pools with `natOutgoing: true`).
    pub masquerade: BTreeSet<IpNet>,
    /// Every pool: destinations never masqueraded.
    pub all_pools: BTreeSet<IpNet>,
    /// The source address to use instead of the outgoing interface's (IPv4; None: masquerade).
    pub address: Option<IpAddr>,
}

/// One IP pool as natOutgoing sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolNat {
    /// The pool's network.
    pub cidr: IpNet,
    /// `natOutgoing: true`.
    pub nat_outgoing: bool,
    /// `disabled: true` (its blocks still exist, so it stays a pool destination; it no longer masquerades).
    pub disabled: bool,
}

/// The tiers that apply to one endpoint, per direction, each listing the names of the selecting policies.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct EndpointTiers {
    /// Ingress.
    pub ingress: Vec<TierRef>,
    /// Egress.
    pub egress: Vec<TierRef>,
}

/// A tier as one endpoint sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TierRef {
    /// Tier name.
    pub name: String,
    /// What undecided traffic does.
    pub default_action: TierDefault,
    /// Selecting policies, in order.
    pub policies: Vec<String>,
}

/// Builds a tier reference from a full tier.
pub fn tier_ref(t: &Tier, policies: Vec<String>) -> TierRef {
    TierRef {
        name: t.name.clone(),
        default_action: t.default_action,
        policies,
    }
}

/// The sets one side of a rule references, in the order renderers use them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EntitySets {
    /// `selector` (or `all()` for a namespaceSelector alone).
    pub selector: Option<SetKey>,
    /// `notSelector`.
    pub not_selector: Option<SetKey>,
    /// `nets`.
    pub nets: Option<SetKey>,
    /// `notNets`.
    pub not_nets: Option<SetKey>,
    /// `serviceAccounts`.
    pub service_accounts: Option<SetKey>,
    /// `services` on the source side: the Service's endpoint addresses.
    pub service: Option<SetKey>,
    /// `services` on the destination side: the Service's endpoint (address, protocol, port)s.
    pub service_ports: Option<SetKey>,
    /// Named ports in `ports`.
    pub named_ports: Vec<SetKey>,
    /// Named ports in `notPorts`.
    pub not_named_ports: Vec<SetKey>,
}

impl EntitySets {
    /// Every set, once each.
    pub fn all(&self) -> impl Iterator<Item = &SetKey> {
        [
            &self.selector,
            &self.not_selector,
            &self.nets,
            &self.not_nets,
            &self.service_accounts,
            &self.service,
            &self.service_ports,
        ]
        .into_iter()
        .flatten()
        .chain(self.named_ports.iter())
        .chain(self.not_named_ports.iter())
    }
}

fn nets_key(nets: &[IpNet]) -> SetKey {
    let mut v: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
    v.sort();
    v.dedup();
    SetKey::Nets(v)
}

/// The set keys of one side of a rule (`protocol` is the rule's, for named ports; `source` tells the side,
/// for `services`).
pub fn entity_sets(m: &EntityMatch, protocol: Option<u8>, source: bool) -> EntitySets {
    let selected = |e: &Expr| SetKey::Selected {
        selector: e.clone(),
        scope: m.scope.clone(),
    };
    let named = |ports: &[PortMatch]| {
        ports
            .iter()
            .filter_map(|p| match p {
                PortMatch::Named(n) => Some(SetKey::NamedPort {
                    name: n.clone(),
                    protocol: protocol.unwrap_or(6),
                }),
                PortMatch::Range(..) => None,
            })
            .collect()
    };
    let service = m.services.as_ref().map(|s| (s.namespace.clone(), s.name.clone()));
    EntitySets {
        selector: m
            .selector
            .as_ref()
            .map(selected)
            .or_else(|| m.scoped.then(|| selected(&Expr::All))),
        not_selector: m.not_selector.as_ref().map(selected),
        nets: (!m.nets.is_empty()).then(|| nets_key(&m.nets)),
        not_nets: (!m.not_nets.is_empty()).then(|| nets_key(&m.not_nets)),
        service_accounts: m.service_accounts.as_ref().map(|sa| {
            let mut names = sa.names.clone();
            names.sort();
            names.dedup();
            SetKey::ServiceAccounts {
                names,
                selector: sa.selector.clone(),
            }
        }),
        service: service
            .clone()
            .filter(|_| source)
            .map(|(namespace, name)| SetKey::Service { namespace, name }),
        service_ports: service
            .filter(|_| !source)
            .map(|(namespace, name)| SetKey::ServicePorts { namespace, name }),
        named_ports: named(&m.ports),
        not_named_ports: named(&m.not_ports),
    }
}

/// Every set key a policy's rules reference.
pub fn policy_sets(p: &Policy) -> BTreeSet<SetKey> {
    let mut out = BTreeSet::new();
    for r in p.ingress.iter().flatten().chain(p.egress.iter().flatten()) {
        for (side, source) in [(&r.source, true), (&r.destination, false)] {
            out.extend(entity_sets(side, r.protocol, source).all().cloned());
        }
    }
    out
}

/// An IP family: the iptables backend runs once per family (`iptables` and `ip6tables`), each with its own
/// tables and sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    #[default]
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// 4 or 6 (a rule's `ipVersion`).
    pub fn version(self) -> u8 {
        match self {
            Family::V4 => 4,
            Family::V6 => 6,
        }
    }

    /// The longest prefix (a single address).
    pub fn host_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Expr {
        caracal_crds::selector::parse(s).unwrap_or(Expr::All)
    }

    #[test]
    fn set_ids_are_pinned_to_the_documented_encoding() {
        let key = SetKey::Selected {
            selector: sel("app == 'web'"),
            scope: Scope::Namespace("shop".into()),
        };
        assert_eq!(key.encoding(), "selected7:ns=shop12:app == \"web\"");
        // The identifier is a pure function of that text: pinned, so a change shows up here first.
        let digest = Sha256::digest(b"selected7:ns=shop12:app == \"web\"");
        let want: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        assert_eq!(key.id().0, want);
        assert_eq!(key.id().0.len(), 16);
    }

    #[test]
    fn equal_meanings_share_a_set_and_different_ones_do_not() {
        let a: IpNet = "10.0.0.0/8".parse().unwrap_or_else(|_| IpNet::default());
        let b: IpNet = "192.168.1.7/24".parse().unwrap_or_else(|_| IpNet::default());
        assert_eq!(
            nets_key(&[a, b]),
            nets_key(&[b, a, b]),
            "order and duplicates do not matter"
        );
        assert_eq!(
            nets_key(&[b]).encoding(),
            "nets14:192.168.1.0/24",
            "host bits are truncated"
        );
        let keys = [
            SetKey::Service {
                namespace: "a".into(),
                name: "b".into(),
            },
            SetKey::ServicePorts {
                namespace: "a".into(),
                name: "b".into(),
            },
            SetKey::Service {
                namespace: "ab".into(),
                name: String::new(),
            },
        ];
        let ids: BTreeSet<SetId> = keys.iter().map(SetKey::id).collect();
        assert_eq!(
            ids.len(),
            keys.len(),
            "length prefixes keep the encoding injective"
        );
    }
}
