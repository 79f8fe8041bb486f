//! From Services and EndpointSlices to the frontends the BPF data plane serves: a pure function, so what
//! kube-proxy's rules would do is checked here by unit tests, and the manager only watches and writes.
//!
//! For each port (TCP or UDP) of each Service with a ClusterIP (not headless, not ExternalName):
//! - the ClusterIP frontend `clusterIP:port`, and for a NodePort (or LoadBalancer) Service one frontend
//!   `nodeAddress:nodePort` per address of this node;
//! - the backends: the endpoints of the Service's EndpointSlices on the slice port of the same name, those
//!   `ready`; when none is, those still `serving` while `terminating` (as kube-proxy does, so a rollout that
//!   leaves only terminating pods still answers); none at all means connections are refused;
//! - `externalTrafficPolicy: Local` keeps a NodePort's backends to this node's (none: refused), and
//!   `internalTrafficPolicy: Local` the ClusterIP's;
//! - `sessionAffinity: ClientIP` with its timeout (10800 s unless `sessionAffinityConfig` says).
//!
//! IPv6 ClusterIPs and SCTP ports are not served by the BPF data plane; [`frontends`] reports them in
//! `skipped` so the agent can say so (docs/bpf.md).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::dataplane::bpf::{Backend, SvcKey};

/// The default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10800;

/// A backend's flag (`BACKEND_REMOTE` of policy.c): on another node.
pub const BACKEND_REMOTE: u16 = 1;
/// A backend's flag (`BACKEND_NODE`): one of this node's own addresses (a host-network pod here, the API
/// server on its node); a pod's connection to it is not translated at connect() (docs/bpf.md).
pub const BACKEND_NODE: u16 = 2;

/// What one frontend serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// Its backends, sorted (empty: connections are refused).
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds.
    pub affinity_s: Option<u32>,
}

/// Every frontend, and the Service ports left out with why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontends {
    /// By frontend.
    pub frontends: BTreeMap<SvcKey, Frontend>,
    /// `namespace/name port`: why it is not served.
    pub skipped: Vec<String>,
}

fn proto(p: Option<&str>) -> Option<u8> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(6),
        "UDP" => Some(17),
        _ => None,
    }
}

/// A frontend's key.
pub fn key(addr: Ipv4Addr, port: u16, proto: u8) -> SvcKey {
    SvcKey {
        addr: addr.octets(),
        port,
        proto,
        pad: 0,
    }
}

/// The endpoints of the slices of one Service for the port named `port_name`: (ready, serving while
/// terminating), each as backends (remote unless on `node`; of the node when one of `node_addrs`).
fn endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    proto_name: &str,
    node: &str,
    node_addrs: &[Ipv4Addr],
) -> (Vec<Backend>, Vec<Backend>) {
    let (mut ready, mut terminating) = (BTreeSet::new(), BTreeSet::new());
    for s in slices {
        if s.address_type != "IPv4" {
            continue;
        }
        let Some(port) = s
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or("") == port_name
                    && p.protocol.as_deref().unwrap_or("TCP") == proto_name
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for e in &s.endpoints {
            let c = e.conditions.as_ref();
            let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
            let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let remote = e.node_name.as_deref() != Some(node);
            for a in &e.addresses {
                let Ok(ip) = a.parse::<Ipv4Addr>() else { continue };
                let b = Backend {
                    addr: ip.octets(),
                    port,
                    flags: if remote { BACKEND_REMOTE } else { 0 }
                        | if node_addrs.contains(&ip) { BACKEND_NODE } else { 0 },
                };
                if is_ready && !is_terminating {
                    ready.insert(b);
                } else if serving && is_terminating {
                    terminating.insert(b);
                }
            }
        }
    }
    (ready.into_iter().collect(), terminating.into_iter().collect())
}

/// The frontends of `services` with the endpoints in `slices`, as this node (`node`, with the IPv4
/// addresses `node_addrs`) serves them.
pub fn frontends<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &str,
    node_addrs: &[Ipv4Addr],
) -> Frontends {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        let ns = s.metadata.namespace.clone().unwrap_or_default();
        if let Some(name) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        {
            by_service.entry((ns, name.clone())).or_default().push(s);
        }
    }
    let mut out = Frontends::default();
    for svc in services {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let Some(cluster_ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty() && *ip != "None")
        else {
            continue;
        };
        let Ok(vip) = cluster_ip.parse::<Ipv4Addr>() else {
            out.skipped.push(format!(
                "{ns}/{name}: ClusterIP {cluster_ip} is not IPv4 (the BPF data plane serves IPv4 Services)"
            ));
            continue;
        };
        let slices = by_service
            .get(&(ns.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let affinity_s = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_AFFINITY_SECONDS)
        });
        let node_port_type = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
        for p in spec.ports.iter().flatten() {
            let proto_name = p.protocol.as_deref().unwrap_or("TCP");
            let Some(proto) = proto(Some(proto_name)) else {
                out.skipped.push(format!(
                    "{ns}/{name} port {}: protocol {proto_name} (the BPF data plane serves TCP and UDP)",
                    p.port
                ));
                continue;
            };
            let Ok(port) = u16::try_from(p.port) else { continue };
            let (ready, terminating) = endpoints(
                slices,
                p.name.as_deref().unwrap_or(""),
                proto_name,
                node,
                node_addrs,
            );
            let all = if ready.is_empty() { terminating } else { ready };
            let local: Vec<Backend> = all
                .iter()
                .copied()
                .filter(|b| b.flags & BACKEND_REMOTE == 0)
                .collect();
            let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
            out.frontends.insert(
                key(vip, port, proto),
                Frontend {
                    backends: if internal_local {
                        local.clone()
                    } else {
                        all.clone()
                    },
                    affinity_s,
                },
            );
            if let Some(node_port) = p
                .node_port
                .filter(|_| node_port_type)
                .and_then(|n| u16::try_from(n).ok())
            {
                let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
                for a in node_addrs {
                    out.frontends.insert(
                        key(*a, node_port, proto),
                        Frontend {
                            backends: if external_local {
                                local.clone()
                            } else {
                                all.clone()
                            },
                            affinity_s,
                        },
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("service")
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("slice")
    }

    fn b(ip: &str, port: u16, remote: bool) -> Backend {
        Backend {
            addr: ip.parse::<Ipv4Addr>().expect("ip").octets(),
            port,
            flags: u16::from(remote),
        }
    }

    fn web_slice(endpoints: serde_json::Value) -> EndpointSlice {
        slice(json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints,
        }))
    }

    #[test]
    fn a_cluster_ip_port_serves_the_ready_endpoints_on_the_port_of_the_same_name() {
        let s = svc(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}
        }));
        let sl = web_slice(json!([
            {"addresses": ["10.244.0.2"], "nodeName": "n1", "conditions": {"ready": true}},
            {"addresses": ["10.244.1.2"], "nodeName": "n2", "conditions": {"ready": true}},
            {"addresses": ["10.244.1.3"], "nodeName": "n2", "conditions": {"ready": false}},
        ]));
        let f = frontends(&[s], &[sl], "n1", &[]);
        assert_eq!(
            f.frontends[&key("10.96.0.10".parse().unwrap(), 80, 6)].backends,
            vec![b("10.244.0.2", 8080, false), b("10.244.1.2", 8080, true)]
        );
        assert_eq!(
            f.frontends[&key("10.96.0.10".parse().unwrap(), 53, 17)].backends,
            vec![b("10.244.0.2", 5353, false), b("10.244.1.2", 5353, true)]
        );
        assert_eq!(f.frontends.len(), 2);
        assert!(f.skipped.is_empty());
    }

    #[test]
    fn terminating_endpoints_serve_only_when_no_endpoint_is_ready_and_none_refuses() {
        let s = svc(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}
        }));
        let mixed = web_slice(json!([
            {"addresses": ["10.244.0.2"], "nodeName": "n1", "conditions": {"ready": true}},
            {"addresses": ["10.244.0.3"], "nodeName": "n1", "conditions": {"ready": false, "serving": true, "terminating": true}},
        ]));
        let k = key("10.96.0.10".parse().unwrap(), 80, 6);
        assert_eq!(
            frontends(std::slice::from_ref(&s), &[mixed], "n1", &[]).frontends[&k].backends,
            vec![b("10.244.0.2", 8080, false)]
        );
        let only_terminating = web_slice(json!([
            {"addresses": ["10.244.0.3"], "nodeName": "n1", "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.0.4"], "nodeName": "n1", "conditions": {"ready": false, "serving": false, "terminating": true}},
        ]));
        assert_eq!(
            frontends(std::slice::from_ref(&s), &[only_terminating], "n1", &[]).frontends[&k].backends,
            vec![b("10.244.0.3", 8080, false)]
        );
        let f = frontends(&[s], &[], "n1", &[]);
        assert_eq!(
            f.frontends[&k].backends,
            vec![],
            "no endpoints: the frontend stays, refusing"
        );
    }

    #[test]
    fn node_ports_on_every_node_address_and_external_traffic_policy_local_keeps_local_backends() {
        let s = svc(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                     "sessionAffinity": "ClientIP",
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}
        }));
        let sl = web_slice(json!([
            {"addresses": ["10.244.0.2"], "nodeName": "n1"},
            {"addresses": ["10.244.1.2"], "nodeName": "n2"},
        ]));
        let addrs: Vec<Ipv4Addr> = vec!["10.0.0.1".parse().unwrap(), "192.168.5.1".parse().unwrap()];
        let f = frontends(&[s], &[sl], "n1", &addrs);
        for a in &addrs {
            let np = &f.frontends[&key(*a, 30080, 6)];
            assert_eq!(np.backends, vec![b("10.244.0.2", 8080, false)]);
            assert_eq!(np.affinity_s, Some(DEFAULT_AFFINITY_SECONDS));
        }
        let cip = &f.frontends[&key("10.96.0.10".parse().unwrap(), 80, 6)];
        assert_eq!(cip.backends.len(), 2, "the ClusterIP keeps every backend");
    }

    #[test]
    fn headless_external_name_ipv6_and_sctp_are_not_frontends() {
        let services = [
            svc(
                json!({"metadata": {"name": "h", "namespace": "a"}, "spec": {"clusterIP": "None", "ports": [{"port": 80}]}}),
            ),
            svc(
                json!({"metadata": {"name": "x", "namespace": "a"}, "spec": {"type": "ExternalName", "externalName": "example.com"}}),
            ),
            svc(
                json!({"metadata": {"name": "six", "namespace": "a"}, "spec": {"clusterIP": "fd00::10", "ports": [{"port": 80}]}}),
            ),
            svc(
                json!({"metadata": {"name": "s", "namespace": "a"}, "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80, "protocol": "SCTP"}]}}),
            ),
        ];
        let f = frontends(&services, &[], "n1", &[]);
        assert!(f.frontends.is_empty(), "{:?}", f.frontends);
        assert_eq!(f.skipped.len(), 2, "{:?}", f.skipped);
        assert!(
            f.skipped[0].contains("a/six") && f.skipped[1].contains("SCTP"),
            "{:?}",
            f.skipped
        );
    }

    #[test]
    fn affinity_timeout_from_the_config() {
        let s = svc(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                     "ports": [{"name": "http", "port": 80}]}
        }));
        let f = frontends(&[s], &[], "n1", &[]);
        assert_eq!(f.frontends.values().next().and_then(|f| f.affinity_s), Some(60));
    }
}
