//! Datastore objects into policy inputs, once, at the edge: an object (JSON as the API server and Typha send
//! it, or a YAML document) is decoded into its typed API type (k8s-openapi or `caracal_crds`) and converted
//! into an [`Input`]. The agent runs this on every object as it arrives and `caracalctl` on every document
//! it reads ([`crate::load`]), so the two cannot disagree on what an object means.
//!
//! When a policy cannot be converted, [`fail_closed_input`] gives what the agent enforces for it if it never
//! had a good version: see docs/policy.md ("Objects that fail to convert").

use std::collections::BTreeSet;

use caracal_crds::networkset::{GlobalNetworkSetSpec, NetworkSetSpec};
use caracal_crds::policy::{GlobalNetworkPolicySpec, NetworkPolicySpec, TierDefaultAction, TierSpec};
use caracal_crds::selector::{self, Expr};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

use crate::convert::{self, DEFAULT_TIER, TierInfo};
use crate::ir::{Policy, TierDefault};
use crate::world::{Endpoint, Labels, NamedPort, NetworkSet, ServiceBackends};

/// Every kind the policy data plane's model reads: the policy kinds ([`POLICY_KINDS`]), then IP pools
/// (natOutgoing).
pub const DATAPLANE_KINDS: &[&str] = &[
    "v1/Namespace",
    "v1/Pod",
    "v1/ServiceAccount",
    "networking.k8s.io/v1/NetworkPolicy",
    "caracal.dev/v1/NetworkPolicy",
    "caracal.dev/v1/GlobalNetworkPolicy",
    "caracal.dev/v1/Tier",
    "caracal.dev/v1/NetworkSet",
    "caracal.dev/v1/GlobalNetworkSet",
    "discovery.k8s.io/v1/EndpointSlice",
    "caracal.dev/v1/IPPool",
];

/// The kinds policy is computed from (`apiVersion/kind`): [`DATAPLANE_KINDS`] but the pools.
pub const POLICY_KINDS: &[&str] = DATAPLANE_KINDS.split_at(DATAPLANE_KINDS.len() - 1).0;

/// The policy kinds whose objects fail closed when they never converted.
pub const POLICY_OBJECT_KINDS: &[&str] = &[
    "networking.k8s.io/v1/NetworkPolicy",
    "caracal.dev/v1/NetworkPolicy",
    "caracal.dev/v1/GlobalNetworkPolicy",
];

/// One EndpointSlice's serving endpoints, for the Service it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name (label `kubernetes.io/service-name`).
    pub service: String,
    /// What the slice contributes.
    pub backends: ServiceBackends,
}

/// A decoded, converted object.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// A namespace's labels.
    Namespace {
        /// Name.
        name: String,
        /// Labels.
        labels: Labels,
    },
    /// A pod (its addresses may be empty until the kubelet reports them).
    Pod(Endpoint),
    /// A pod that is not a workload endpoint (host network).
    NotAnEndpoint,
    /// A service account's labels.
    ServiceAccount {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Labels.
        labels: Labels,
    },
    /// A (Global)NetworkSet.
    NetworkSet(NetworkSet),
    /// A tier.
    Tier(TierInfo),
    /// A policy of any kind, with the tier it belongs to.
    Policy {
        /// Tier name.
        tier: String,
        /// The converted policy.
        policy: Policy,
    },
    /// An EndpointSlice.
    Slice(Slice),
    /// An IP pool (natOutgoing).
    Pool(crate::model::PoolNat),
}

/// Why an object could not be decoded or converted. The text names the object and the field.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The object does not fit its kind's type.
    #[error("{kind} {key}: {message}")]
    Shape {
        /// The kind.
        kind: String,
        /// The key.
        key: String,
        /// What serde said.
        message: String,
    },
    /// A policy that decoded but cannot be converted (a selector that does not parse, a services match
    /// without a namespace).
    #[error(transparent)]
    Convert(#[from] convert::ConvertError),
}

fn labels(v: &Value) -> Labels {
    v["metadata"]["labels"]
        .as_object()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k, v.as_str()?))).collect())
        .unwrap_or_default()
}

fn name(v: &Value) -> String {
    v["metadata"]["name"].as_str().unwrap_or_default().to_owned()
}

fn namespace(v: &Value) -> String {
    v["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned()
}

fn typed<T: serde::de::DeserializeOwned>(kind: &str, key: &str, v: &Value) -> Result<T, DecodeError> {
    T::deserialize(v).map_err(|e| DecodeError::Shape {
        kind: kind.into(),
        key: key.into(),
        message: e.to_string(),
    })
}

fn no_domains(kind: &str, key: &str, domains: &[String]) -> Result<(), DecodeError> {
    if domains.is_empty() {
        return Ok(());
    }
    Err(DecodeError::Shape {
        kind: kind.into(),
        key: key.into(),
        message: "spec.allowedEgressDomains is not enforced by Caracal: list the addresses in nets instead"
            .into(),
    })
}

/// A pod as an endpoint, with the labels Calico adds; None for a host-network pod (Calico makes no workload
/// endpoint for those: their address is the node's).
pub fn endpoint(pod: &Pod) -> Option<Endpoint> {
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return None;
    }
    let status = pod.status.as_ref();
    let mut ips: Vec<std::net::IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = status
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|s| s.parse().ok())
        && !ips.contains(&ip)
    {
        ips.insert(0, ip);
    }
    let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let sa = spec
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let l: Labels = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([
            ("projectcalico.org/namespace", ns.as_str()),
            ("projectcalico.org/orchestrator", "k8s"),
            ("projectcalico.org/serviceaccount", sa.as_str()),
        ])
        .collect();
    let ports = spec
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone()?,
                protocol: protocol_number(p.protocol.as_deref()),
                port: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect();
    Some(Endpoint {
        namespace: ns,
        name: pod.metadata.name.clone().unwrap_or_default(),
        ips,
        labels: l,
        service_account: sa,
        ports,
        node: spec.and_then(|s| s.node_name.clone()),
    })
}

fn protocol_number(p: Option<&str>) -> u8 {
    match p.unwrap_or("TCP") {
        "UDP" => 17,
        "SCTP" => 132,
        _ => 6,
    }
}

/// An EndpointSlice's serving endpoints; None when it belongs to no Service.
pub fn slice(s: &EndpointSlice) -> Option<Slice> {
    let service = s
        .metadata
        .labels
        .as_ref()?
        .get("kubernetes.io/service-name")?
        .clone();
    let mut backends = ServiceBackends::default();
    let ports: Vec<(u8, u16)> = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some((
                protocol_number(p.protocol.as_deref()),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    for ep in &s.endpoints {
        // Kubernetes: a nil `serving` means true.
        if ep.conditions.as_ref().and_then(|c| c.serving) == Some(false) {
            continue;
        }
        for addr in ep
            .addresses
            .iter()
            .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        {
            backends.addrs.insert(addr);
            backends
                .ports
                .extend(ports.iter().map(|(proto, port)| (addr, *proto, *port)));
        }
    }
    Some(Slice {
        namespace: s.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        service,
        backends,
    })
}

/// Decodes and converts one object of `kind` (`apiVersion/kind`) stored under `key`. `Ok(None)` for kinds
/// policy does not read.
pub fn decode(kind: &str, key: &str, v: &Value) -> Result<Option<Input>, DecodeError> {
    Ok(Some(match kind {
        "v1/Namespace" => Input::Namespace {
            name: name(v),
            labels: labels(v),
        },
        "v1/Pod" => {
            let pod: Pod = typed(kind, key, v)?;
            endpoint(&pod).map_or(Input::NotAnEndpoint, Input::Pod)
        }
        "v1/ServiceAccount" => Input::ServiceAccount {
            namespace: namespace(v),
            name: name(v),
            labels: labels(v),
        },
        "networking.k8s.io/v1/NetworkPolicy" => {
            let np: k8s_openapi::api::networking::v1::NetworkPolicy = typed(kind, key, v)?;
            Input::Policy {
                tier: DEFAULT_TIER.into(),
                policy: convert::k8s_policy(&np),
            }
        }
        "caracal.dev/v1/NetworkPolicy" => {
            let spec: NetworkPolicySpec = typed(kind, key, &v["spec"])?;
            let (tier, policy) = convert::caracal_policy(&namespace(v), &name(v), &spec)?;
            Input::Policy { tier, policy }
        }
        "caracal.dev/v1/GlobalNetworkPolicy" => {
            let spec: GlobalNetworkPolicySpec = typed(kind, key, &v["spec"])?;
            let (tier, policy) = convert::global_policy(&name(v), &spec)?;
            Input::Policy { tier, policy }
        }
        "caracal.dev/v1/Tier" => {
            let spec: TierSpec = typed(kind, key, &v["spec"])?;
            Input::Tier(TierInfo {
                name: name(v),
                order: spec.order,
                default_action: match spec.default_action {
                    Some(TierDefaultAction::Pass) => TierDefault::Pass,
                    _ => TierDefault::Deny,
                },
            })
        }
        "caracal.dev/v1/NetworkSet" => {
            let spec: NetworkSetSpec = typed(kind, key, &v["spec"])?;
            no_domains(kind, key, &spec.allowed_egress_domains)?;
            Input::NetworkSet(NetworkSet {
                namespace: Some(namespace(v)),
                name: name(v),
                labels: labels(v),
                nets: spec.nets.iter().map(|n| n.net()).collect(),
            })
        }
        "caracal.dev/v1/GlobalNetworkSet" => {
            let spec: GlobalNetworkSetSpec = typed(kind, key, &v["spec"])?;
            no_domains(kind, key, &spec.allowed_egress_domains)?;
            Input::NetworkSet(NetworkSet {
                namespace: None,
                name: name(v),
                labels: labels(v),
                nets: spec.nets.iter().map(|n| n.net()).collect(),
            })
        }
        "caracal.dev/v1/IPPool" => {
            let spec: caracal_crds::ippool::IPPoolSpec = typed(kind, key, &v["spec"])?;
            Input::Pool(crate::model::PoolNat {
                cidr: spec.cidr.0.trunc(),
                nat_outgoing: spec.nat_outgoing.unwrap_or(false),
                disabled: spec.disabled.unwrap_or(false),
            })
        }
        "discovery.k8s.io/v1/EndpointSlice" => {
            let s: EndpointSlice = typed(kind, key, v)?;
            match slice(&s) {
                Some(s) => Input::Slice(s),
                None => return Ok(None),
            }
        }
        _ => return Ok(None),
    }))
}

/// Selects nothing.
fn nothing() -> Expr {
    Expr::Not(Box::new(Expr::All))
}

/// What a policy object that never converted is enforced as: a fail-closed policy ([`convert::fail_closed`])
/// at the object's position (`spec.tier`, `spec.order`), for the directions it declares (both when they
/// cannot be read), selecting what its selector selects. When the selector cannot be parsed, a namespaced
/// policy selects every endpoint of its namespace; a GlobalNetworkPolicy's selects nothing (a cluster-wide
/// deny on one bad object would cut off every workload), and the failure is reported. None for other kinds.
pub fn fail_closed_input(kind: &str, v: &Value) -> Option<Input> {
    if !POLICY_OBJECT_KINDS.contains(&kind) {
        return None;
    }
    let spec = &v["spec"];
    let k8s = kind == "networking.k8s.io/v1/NetworkPolicy";
    let global = kind == "caracal.dev/v1/GlobalNetworkPolicy";
    let ns = namespace(v);
    let display = match (k8s, global) {
        (true, _) => format!("knp.default.{ns}/{}", name(v)),
        (_, true) => name(v),
        _ => format!("{ns}/{}", name(v)),
    };
    let selector = if k8s {
        spec.get("podSelector")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .map_or(Expr::All, |s| convert::label_selector(&s))
    } else {
        match spec["selector"].as_str() {
            None => Expr::All,
            Some(text) => match selector::parse(text) {
                Ok(e) if !(global && e.uses_global()) => e,
                _ if global => nothing(),
                _ => Expr::All,
            },
        }
    };
    let namespace_selector = global
        .then(|| spec["namespaceSelector"].as_str().map(selector::parse))
        .flatten()
        .map(|r| r.unwrap_or_else(|_| nothing()));
    let types_key = if k8s { "policyTypes" } else { "types" };
    let types: BTreeSet<&str> = spec[types_key]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let (ingress, egress) = if types.is_empty() {
        (true, true)
    } else {
        (types.contains("Ingress"), types.contains("Egress"))
    };
    let policy = Policy {
        name: display,
        namespace: (!global).then_some(ns),
        order: if k8s {
            Some(convert::K8S_POLICY_ORDER)
        } else {
            spec["order"].as_f64()
        },
        selector,
        namespace_selector,
        service_account_selector: None,
        ingress: ingress.then(Vec::new),
        egress: egress.then(Vec::new),
        everywhere: false,
    };
    let tier = if k8s {
        DEFAULT_TIER.to_owned()
    } else {
        spec["tier"].as_str().unwrap_or(DEFAULT_TIER).to_owned()
    };
    Some(Input::Policy {
        tier,
        policy: convert::fail_closed(policy),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ir::Action;

    #[test]
    fn a_policy_that_never_converted_denies_what_it_would_select() {
        let bad = json!({
            "apiVersion": "caracal.dev/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"selector": "app == 'db'", "order": 5, "types": ["Ingress"],
                     "ingress": [{"action": "Allow", "source": {"selector": "app == "}}]}
        });
        assert!(decode("caracal.dev/v1/NetworkPolicy", "shop/p", &bad).is_err());
        let Some(Input::Policy { tier, policy }) = fail_closed_input("caracal.dev/v1/NetworkPolicy", &bad)
        else {
            panic!("a policy kind fails closed");
        };
        assert_eq!(tier, "default");
        assert_eq!(policy.name, "shop/p");
        assert_eq!(policy.order, Some(5.0));
        assert_eq!(policy.selector.to_string(), "app == \"db\"");
        assert!(policy.egress.is_none(), "only the declared direction");
        let rules = policy.ingress.unwrap_or_default();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].action, Action::Deny);
    }

    #[test]
    fn an_unreadable_selector_covers_the_namespace_or_for_a_global_policy_nothing() {
        let ns = json!({"metadata": {"name": "p", "namespace": "shop"}, "spec": {"selector": "(("}});
        let Some(Input::Policy { policy, .. }) = fail_closed_input("caracal.dev/v1/NetworkPolicy", &ns)
        else {
            panic!("fails closed");
        };
        assert_eq!(policy.selector, Expr::All);
        assert_eq!(policy.namespace.as_deref(), Some("shop"));
        let global = json!({"metadata": {"name": "g"}, "spec": {"selector": "(("}});
        let Some(Input::Policy { policy, .. }) =
            fail_closed_input("caracal.dev/v1/GlobalNetworkPolicy", &global)
        else {
            panic!("fails closed");
        };
        assert!(!policy.selector.matches(&Labels::new()));
        assert!(fail_closed_input("v1/Pod", &global).is_none());
    }

    #[test]
    fn serving_endpoints_and_their_ports_make_a_slice() {
        let s = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "web-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "ports": [{"port": 8080, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"serving": true}},
                {"addresses": ["10.0.0.2"]},
                {"addresses": ["10.0.0.3"], "conditions": {"serving": false}}
            ]
        });
        let Ok(Some(Input::Slice(slice))) = decode("discovery.k8s.io/v1/EndpointSlice", "shop/web-x", &s)
        else {
            panic!("decodes");
        };
        assert_eq!(
            (slice.namespace.as_str(), slice.service.as_str()),
            ("shop", "web")
        );
        let addrs: Vec<String> = slice.backends.addrs.iter().map(ToString::to_string).collect();
        assert_eq!(
            addrs,
            ["10.0.0.1", "10.0.0.2"],
            "not serving is left out; no condition means serving"
        );
        assert_eq!(slice.backends.ports.len(), 4);
    }

    #[test]
    fn host_network_pods_are_not_endpoints() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "n", "namespace": "kube-system"},
                         "spec": {"hostNetwork": true, "containers": []}, "status": {"podIP": "10.95.0.2"}});
        assert!(matches!(
            decode("v1/Pod", "kube-system/n", &pod),
            Ok(Some(Input::NotAnEndpoint))
        ));
    }
}
