//! Finding Typha: the addresses of the `caracal-typha` Service's ready endpoints, read from its
//! EndpointSlices through the API server before each connection attempt (as Calico's agent does). A node
//! cannot resolve the Service's DNS name (a host-network pod uses the host's resolver), and its ClusterIP
//! works only once kube-proxy or the BPF data plane does, which may need Typha first.

use std::sync::Arc;

use caracal_datastore::typha::client::Discover;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};

/// `name.namespace` (how the operator names the Service in `CARACAL_TYPHA_SERVICE`) as (namespace, name);
/// a bare name is in `caracal-system`.
pub fn service_ref(s: &str) -> (String, String) {
    match s.split_once('.') {
        Some((name, ns)) => (ns.split('.').next().unwrap_or(ns).to_owned(), name.to_owned()),
        None => ("caracal-system".to_owned(), s.to_owned()),
    }
}

/// `host:port` of every ready endpoint in `slices`, on the port named `port_name` (the Service port's name;
/// a slice with one unnamed port uses it), sorted. Terminating and not-ready endpoints are left out.
pub fn ready_addresses(slices: &[EndpointSlice], port_name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for s in slices {
        let ports = s.ports.as_deref().unwrap_or_default();
        let port = ports
            .iter()
            .find(|p| p.name.as_deref() == Some(port_name))
            .or_else(|| {
                (ports.len() == 1 && ports[0].name.as_deref().unwrap_or("").is_empty()).then(|| &ports[0])
            })
            .and_then(|p| p.port);
        let Some(port) = port else { continue };
        for e in &s.endpoints {
            let c = e.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            if !ready || terminating {
                continue;
            }
            for a in &e.addresses {
                if s.address_type == "IPv6" {
                    out.push(format!("[{a}]:{port}"));
                } else {
                    out.push(format!("{a}:{port}"));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A [`Discover`] that lists the EndpointSlices of Service `namespace/name` and returns its ready endpoints on
/// the Service port named `name` (the operator names Typha's port after the Service).
pub fn discover(client: kube::Client, namespace: String, name: String) -> Discover {
    Arc::new(move || {
        let (client, namespace, name) = (client.clone(), namespace.clone(), name.clone());
        Box::pin(async move {
            let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
            let list = api
                .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={name}")))
                .await
                .map_err(|e| format!("listing the EndpointSlices of {namespace}/{name}: {e}"))?;
            Ok(ready_addresses(&list.items, &name))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("slice")
    }

    #[test]
    fn ready_endpoints_on_the_named_port_only() {
        let s = slice(json!({
            "metadata": {"name": "caracal-typha-abc"},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9093}, {"name": "caracal-typha", "port": 5473}],
            "endpoints": [
                {"addresses": ["10.0.0.3"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true, "terminating": false}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.5"], "conditions": {"ready": true, "terminating": true}},
            ]
        }));
        assert_eq!(
            ready_addresses(&[s], "caracal-typha"),
            vec!["10.0.0.2:5473", "10.0.0.3:5473"]
        );
    }

    #[test]
    fn a_slice_without_the_port_contributes_nothing_and_ipv6_is_bracketed() {
        let other = slice(json!({
            "metadata": {"name": "a"}, "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9093}],
            "endpoints": [{"addresses": ["10.0.0.9"]}]
        }));
        let v6 = slice(json!({
            "metadata": {"name": "b"}, "addressType": "IPv6",
            "ports": [{"name": "caracal-typha", "port": 5473}],
            "endpoints": [{"addresses": ["fd00::2"]}]
        }));
        assert_eq!(
            ready_addresses(&[other, v6], "caracal-typha"),
            vec!["[fd00::2]:5473"]
        );
    }

    #[test]
    fn service_names() {
        assert_eq!(
            service_ref("caracal-typha.caracal-system"),
            ("caracal-system".into(), "caracal-typha".into())
        );
        assert_eq!(
            service_ref("caracal-typha.caracal-system.svc.cluster.local"),
            ("caracal-system".into(), "caracal-typha".into())
        );
        assert_eq!(service_ref("t"), ("caracal-system".into(), "t".into()));
    }
}
