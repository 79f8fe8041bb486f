//! What policy is evaluated over: namespaces, endpoints (pods), service accounts and network sets, plus the
//! tiers of converted policies.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::ir::Tier;

pub use crate::labels::Labels;

/// A container port an endpoint declares, for named ports in rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    /// The port's name.
    pub name: String,
    /// IP protocol number.
    pub protocol: u8,
    /// The port.
    pub port: u16,
}

/// A workload endpoint (a pod interface).
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// Pod labels, plus `projectcalico.org/namespace` and `projectcalico.org/serviceaccount` as Calico adds them.
    pub labels: Labels,
    /// Service account name.
    pub service_account: String,
    /// Declared container ports.
    pub ports: Vec<NamedPort>,
    /// The node the pod runs on (`spec.nodeName`), when scheduled.
    pub node: Option<String>,
}

impl Endpoint {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A NetworkSet (namespaced) or GlobalNetworkSet (`namespace: None`).
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkSet {
    /// Namespace, or None for a global set.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// Labels policies select it by.
    pub labels: Labels,
    /// Its networks.
    pub nets: Vec<IpNet>,
}

/// A Service's serving endpoints, from its EndpointSlices: what a `services` match in a rule selects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceBackends {
    /// Addresses of the serving endpoints (a source `services` match).
    pub addrs: std::collections::BTreeSet<IpAddr>,
    /// (address, protocol, port) of the serving endpoints' ports (a destination `services` match).
    pub ports: std::collections::BTreeSet<(IpAddr, u8, u16)>,
}

/// Everything policy evaluation needs.
#[derive(Clone, Debug, Default)]
pub struct World {
    /// Namespace labels by name (with `kubernetes.io/metadata.name` and `projectcalico.org/name`).
    pub namespaces: BTreeMap<String, Labels>,
    /// Endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Service account labels by (namespace, name).
    pub service_accounts: BTreeMap<(String, String), Labels>,
    /// Network sets by (namespace, name); the namespace is None for a GlobalNetworkSet.
    pub network_sets: BTreeMap<(Option<String>, String), NetworkSet>,
    /// Tiers in evaluation order, each with its policies in order.
    pub tiers: Vec<Tier>,
    /// Serving endpoints by Service (namespace, name).
    pub services: BTreeMap<(String, String), ServiceBackends>,
}

impl World {
    /// Labels of namespace `ns` (its name labels even when no Namespace object was given).
    pub fn namespace_labels(&self, ns: &str) -> Labels {
        let mut labels = self.namespaces.get(ns).cloned().unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name", ns);
        labels.insert("projectcalico.org/name", ns);
        labels
    }

    /// Labels of service account `namespace/name` (none when it is not known).
    pub fn service_account_labels(&self, namespace: &str, name: &str) -> &Labels {
        static EMPTY: std::sync::OnceLock<Labels> = std::sync::OnceLock::new();
        self.service_accounts
            .get(&(namespace.to_owned(), name.to_owned()))
            .unwrap_or_else(|| EMPTY.get_or_init(Labels::new))
    }

    /// The endpoint with address `ip`.
    pub fn endpoint_by_ip(&self, ip: IpAddr) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.ips.contains(&ip))
    }
}
