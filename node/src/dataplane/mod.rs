//! The data plane: the desired state for one node ([`DataplaneModel`]) and the backends that converge the
//! kernel to it. A backend takes the whole model each time, is idempotent and diff-based, and touches only
//! kernel objects that carry Caracal's prefix.

pub mod iptables;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::policy::ir::Tier;

/// The prefix of every kernel object Caracal owns (chains, ipsets, interfaces).
pub const PREFIX: &str = "crc";

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

/// What an IP set is keyed by: the thing it stands for, so equal keys share one set.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKey {
    /// Addresses of endpoints and network sets a selector picks in a scope (canonical texts).
    Selected {
        /// Canonical selector text.
        selector: String,
        /// The scope, as text (`ns:x`, `any`, `nsel:<selector>`).
        scope: String,
    },
    /// A list of networks.
    Nets(Vec<IpNet>),
    /// Endpoints running as matching service accounts.
    ServiceAccounts {
        /// Names (any when empty).
        names: Vec<String>,
        /// Canonical selector text, or empty.
        selector: String,
    },
    /// (address, protocol, port) of every endpoint's container port with this name.
    NamedPort {
        /// Port name.
        name: String,
        /// IP protocol number.
        protocol: u8,
    },
}

/// The members of a set.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SetMembers {
    /// Networks (hash:net sets).
    pub nets: BTreeSet<IpNet>,
    /// (address, protocol, port) (hash:ip,port sets).
    pub ip_ports: BTreeSet<(IpAddr, u8, u16)>,
}

/// Everything the policy data plane of one node must enforce.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DataplaneModel {
    /// Endpoints on this node, sorted by key.
    pub endpoints: Vec<LocalEndpoint>,
    /// Per interface: for each direction, the tiers (with only the policies selecting that endpoint).
    pub endpoint_tiers: BTreeMap<String, EndpointTiers>,
    /// The policies referenced by any endpoint, by name (each rendered once, shared).
    pub policies: BTreeMap<String, crate::policy::ir::Policy>,
    /// Every set the rules reference, with its members.
    pub sets: BTreeMap<SetKey, SetMembers>,
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
#[derive(Clone, Debug, PartialEq)]
pub struct TierRef {
    /// Tier name.
    pub name: String,
    /// What undecided traffic does.
    pub default_action: crate::policy::ir::TierDefault,
    /// Selecting policies, in order.
    pub policies: Vec<String>,
}

/// Builds tier references from full tiers (helper for calc).
pub fn tier_ref(t: &Tier, policies: Vec<String>) -> TierRef {
    TierRef {
        name: t.name.clone(),
        default_action: t.default_action,
        policies,
    }
}
