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

/// An IP family: the iptables backend runs once per family (`iptables` and `ip6tables`), each with its own
/// tables and sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4 (`iptables`, ipsets `family inet`).
    #[default]
    V4,
    /// IPv6 (`ip6tables`, ipsets `family inet6`).
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

/// What a backend reports about one convergence.
pub use iptables::apply::ApplyStats;

/// Errors of a policy data plane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The iptables backend failed.
    #[error(transparent)]
    Iptables(#[from] iptables::apply::IptablesError),
    /// The configured data plane is not one this build provides.
    #[error("data plane {0:?} is not available in this Caracal release: use Iptables")]
    Unsupported(String),
    /// The task programming the data plane died (a panic in a backend).
    #[error("{0}")]
    Internal(String),
}

/// A policy data plane: takes the whole desired model and converges the kernel to it. Implementations are
/// idempotent, diff-based, and touch only objects with Caracal's prefix.
pub trait PolicyDataplane: Send {
    /// Converges after reading the kernel's state back: adopts what matches, repairs drift. At start and
    /// periodically.
    fn converge(&mut self, model: &DataplaneModel) -> Result<ApplyStats, DataplaneError>;
    /// Converges from what was last applied, without a full read-back: for changes.
    fn update(&mut self, model: &DataplaneModel) -> Result<ApplyStats, DataplaneError>;
    /// Removes everything the backend created, reporting every error.
    fn remove_all(&mut self) -> Result<(), Vec<DataplaneError>>;
}

/// The iptables backend of both families: `iptables` always, `ip6tables` when IPv6 is on (Felix's
/// `ipv6Support`). Each family converges on its own; the stats add up.
pub struct DualStack {
    v4: iptables::apply::Iptables,
    v6: Option<iptables::apply::Iptables>,
}

impl DualStack {
    /// Both families behind `exec_prefix` (IPv6 only when `ipv6`).
    pub fn new(exec_prefix: Vec<String>, ipv6: bool) -> Self {
        Self {
            v6: ipv6.then(|| iptables::apply::Iptables::for_family(exec_prefix.clone(), Family::V6)),
            v4: iptables::apply::Iptables::new(exec_prefix),
        }
    }

    fn each(
        &mut self,
        model: &DataplaneModel,
        f: impl Fn(
            &mut iptables::apply::Iptables,
            &iptables::render::Desired,
        ) -> Result<ApplyStats, iptables::apply::IptablesError>,
    ) -> Result<ApplyStats, DataplaneError> {
        let mut stats = f(&mut self.v4, &iptables::render::render_family(model, Family::V4))?;
        if let Some(v6) = self.v6.as_mut() {
            stats.add(&f(v6, &iptables::render::render_family(model, Family::V6))?);
        }
        Ok(stats)
    }
}

impl PolicyDataplane for DualStack {
    fn converge(&mut self, model: &DataplaneModel) -> Result<ApplyStats, DataplaneError> {
        self.each(model, iptables::apply::Iptables::apply)
    }

    fn update(&mut self, model: &DataplaneModel) -> Result<ApplyStats, DataplaneError> {
        self.each(model, iptables::apply::Iptables::apply_update)
    }

    fn remove_all(&mut self) -> Result<(), Vec<DataplaneError>> {
        let mut errors: Vec<DataplaneError> = Vec::new();
        for b in std::iter::once(&mut self.v4).chain(self.v6.as_mut()) {
            if let Err(es) = b.remove_all() {
                errors.extend(es.into_iter().map(DataplaneError::from));
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

/// The backend for the configured data plane (`CARACAL_DATAPLANE`, as the operator renders it), enforcing
/// IPv6 too when `ipv6`. `exec_prefix` runs the kernel tools elsewhere (a namespace, in tests); empty on a
/// node.
pub fn backend(
    dataplane: &str,
    exec_prefix: Vec<String>,
    ipv6: bool,
) -> Result<Box<dyn PolicyDataplane>, DataplaneError> {
    match dataplane {
        "Iptables" | "" => Ok(Box::new(DualStack::new(exec_prefix, ipv6))),
        other => Err(DataplaneError::Unsupported(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_is_chosen_from_configuration() {
        assert!(backend("Iptables", vec![], true).is_ok());
        let err = backend("BPF", vec![], true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("\"BPF\" is not available") && err.contains("use Iptables"),
            "{err}"
        );
    }
}
