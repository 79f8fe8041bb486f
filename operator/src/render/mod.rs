//! `render`: a pure function from (computed Installation, cluster facts) to every object the operator wants
//! to exist. No I/O, no clock, no randomness: certificates and the facts about the cluster come in as inputs,
//! so the same inputs always give the same objects and golden tests can pin them.

mod common;
pub mod defaults;
mod felix;
pub mod images;
mod node;
pub mod pull_secrets;
mod typha;

use std::collections::BTreeMap;

use caracal_crds::imageset::ImageSet;
use caracal_crds::installation::InstallationSpec;
use caracal_crds::schema::Cidr;
use k8s_openapi::api::core::v1::Secret;
use serde::Serialize;

pub use common::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, NAMESPACE, managed_selector, namespace};
pub use defaults::{SpecError, compute};
pub use typha::typha_replicas;

/// A pool that exists in the cluster and was not created by the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPool {
    /// The IPPool's name.
    pub name: String,
    /// Its network.
    pub cidr: Cidr,
}

/// PEM material for Typha's mutual TLS, produced by the operator's certificate manager.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Certificates {
    /// The CA certificate both sides trust.
    pub ca_cert: String,
    /// Typha's server certificate (identity `caracal-typha`).
    pub typha_cert: String,
    /// Typha's server key.
    pub typha_key: String,
    /// The node agents' client certificate (identity `caracal-node`).
    pub node_cert: String,
    /// The node agents' client key.
    pub node_key: String,
}

/// What the operator knows about the cluster when it renders.
#[derive(Clone, Debug, Default)]
pub struct ClusterFacts {
    /// Number of Nodes (Typha replicas follow it).
    pub node_count: usize,
    /// IPPools not made by the operator (same CIDR as a spec pool: adopted; overlapping: an error).
    pub user_pools: Vec<UserPool>,
    /// Certificates to distribute.
    pub certificates: Certificates,
    /// The API server's address from the `kubernetes-services-endpoint` ConfigMap in the operator's
    /// namespace, when there is one: given to the components as `KUBERNETES_SERVICE_HOST` /
    /// `KUBERNETES_SERVICE_PORT`, so they reach the API server without the `kubernetes` ClusterIP (which, in
    /// the BPF data plane without kube-proxy, works only once the agents run).
    pub api_server: Option<ApiServer>,
    /// Why that ConfigMap could not be used (the Installation is then Degraded and nothing changes).
    pub api_server_error: Option<String>,
    /// The operator's own namespace, where `spec.imagePullSecrets` name Secrets.
    pub operator_namespace: String,
    /// The Secrets `spec.imagePullSecrets` names that exist in the operator's namespace, by name.
    pub pull_secrets: BTreeMap<String, Secret>,
    /// The ImageSet of this release (`caracal-<version>`), when there is one: images are rendered by digest.
    pub image_set: Option<ImageSet>,
    /// Why that ImageSet could not be read (it does not decode); the Installation is then Degraded.
    pub image_set_error: Option<String>,
}

/// Where the API server is, as the `kubernetes-services-endpoint` ConfigMap gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiServer {
    /// `KUBERNETES_SERVICE_HOST`: an address or a name.
    pub host: String,
    /// `KUBERNETES_SERVICE_PORT` (443 when the ConfigMap leaves it out).
    pub port: String,
}

/// The ConfigMap (in the operator's namespace) that tells the operator where the API server is.
pub const API_SERVER_CONFIGMAP: &str = "kubernetes-services-endpoint";

impl ApiServer {
    /// Reads the ConfigMap's data: `KUBERNETES_SERVICE_HOST` (required, an address or DNS name) and
    /// `KUBERNETES_SERVICE_PORT` (a port number; 443 when absent). The error names the key and what to change.
    pub fn from_data(data: &std::collections::BTreeMap<String, String>) -> Result<Self, String> {
        let host = data
            .get("KUBERNETES_SERVICE_HOST")
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                format!(
                    "ConfigMap {API_SERVER_CONFIGMAP}: data.KUBERNETES_SERVICE_HOST is missing: set it to the API \
                     server's address (reachable from every node without kube-proxy), or delete the ConfigMap"
                )
            })?;
        if host.contains(['/', ':', ' ']) && host.parse::<std::net::IpAddr>().is_err() {
            return Err(format!(
                "ConfigMap {API_SERVER_CONFIGMAP}: data.KUBERNETES_SERVICE_HOST {host:?} is not an address or a \
                 host name: give the host alone (no scheme or port; the port goes in KUBERNETES_SERVICE_PORT)"
            ));
        }
        let port = data
            .get("KUBERNETES_SERVICE_PORT")
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "443".into());
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!(
                "ConfigMap {API_SERVER_CONFIGMAP}: data.KUBERNETES_SERVICE_PORT {port:?} is not a port number (1-65535)"
            ));
        }
        Ok(ApiServer { host, port })
    }

    /// The two environment variables.
    pub fn env(&self) -> Vec<k8s_openapi::api::core::v1::EnvVar> {
        vec![
            common::env("KUBERNETES_SERVICE_HOST", self.host.clone()),
            common::env("KUBERNETES_SERVICE_PORT", self.port.clone()),
        ]
    }
}

/// One object to apply.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Object {
    /// `apps/v1`, `v1`, `caracal.dev/v1`, ...
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// The kind.
    pub kind: String,
    /// The name.
    pub name: String,
    /// The namespace, for namespaced kinds.
    pub namespace: Option<String>,
    /// The whole object, as it would be applied.
    pub body: serde_json::Value,
}

impl Object {
    /// Builds an object from a typed Kubernetes value (`k8s_openapi` or a Caracal type).
    fn from_typed<T: Serialize>(api_version: &str, kind: &str, typed: &T) -> Object {
        let mut body = serde_json::to_value(typed).unwrap_or_default();
        body["apiVersion"] = api_version.into();
        body["kind"] = kind.into();
        let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let namespace = body["metadata"]["namespace"].as_str().map(str::to_owned);
        Object {
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            name,
            namespace,
            body,
        }
    }

    /// `kind/namespace/name`, for messages and sorting.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.kind,
            self.namespace.as_deref().unwrap_or(""),
            self.name
        )
    }
}

/// Everything the operator wants to exist for one computed Installation.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    /// Objects in the order they should be applied (namespace and RBAC first, workloads last).
    pub objects: Vec<Object>,
}

/// Renders the objects for `computed` (the output of [`compute`]).
pub fn render(computed: &InstallationSpec, facts: &ClusterFacts) -> Rendered {
    let mut objects = vec![common::namespace()];
    objects.extend(pull_secrets::render(computed, facts));
    objects.extend(node::render(computed, facts));
    objects.extend(typha::render(computed, facts));
    objects.extend(felix::render(computed, facts));
    Rendered { objects }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn the_api_server_configmap_is_read_or_refused_with_the_key_named() {
        assert_eq!(
            ApiServer::from_data(&data(&[("KUBERNETES_SERVICE_HOST", "10.0.0.1")])),
            Ok(ApiServer {
                host: "10.0.0.1".into(),
                port: "443".into()
            })
        );
        assert_eq!(
            ApiServer::from_data(&data(&[
                ("KUBERNETES_SERVICE_HOST", "api.example"),
                ("KUBERNETES_SERVICE_PORT", "6443")
            ]))
            .map(|a| a.port),
            Ok("6443".into())
        );
        let missing = ApiServer::from_data(&data(&[("KUBERNETES_SERVICE_PORT", "6443")])).unwrap_err();
        assert!(
            missing.contains("KUBERNETES_SERVICE_HOST is missing"),
            "{missing}"
        );
        let url =
            ApiServer::from_data(&data(&[("KUBERNETES_SERVICE_HOST", "https://api:6443")])).unwrap_err();
        assert!(url.contains("no scheme or port"), "{url}");
        let port = ApiServer::from_data(&data(&[
            ("KUBERNETES_SERVICE_HOST", "10.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", "https"),
        ]))
        .unwrap_err();
        assert!(port.contains("KUBERNETES_SERVICE_PORT"), "{port}");
    }

    fn env_of(objects: &[Object], kind: &str, name: &str) -> serde_json::Value {
        let o = objects
            .iter()
            .find(|o| o.kind == kind && o.name == name)
            .unwrap_or_else(|| panic!("{kind} {name} rendered"));
        o.body["spec"]["template"]["spec"]["containers"][0]["env"].clone()
    }

    #[test]
    fn the_api_server_address_reaches_the_agent_and_typha_and_an_invalid_one_changes_nothing() {
        let spec = compute(&InstallationSpec::default(), &ClusterFacts::default()).unwrap();
        let has = |env: &serde_json::Value, k: &str, v: &str| {
            env.as_array()
                .into_iter()
                .flatten()
                .any(|e| e["name"] == k && e["value"] == v)
        };
        let plain = render(&spec, &ClusterFacts::default());
        assert!(!has(
            &env_of(&plain.objects, "DaemonSet", "caracal-node"),
            "KUBERNETES_SERVICE_HOST",
            "10.0.0.1"
        ));
        let facts = ClusterFacts {
            api_server: Some(ApiServer {
                host: "10.0.0.1".into(),
                port: "6443".into(),
            }),
            ..Default::default()
        };
        let with = render(&spec, &facts);
        for (kind, name) in [("DaemonSet", "caracal-node"), ("Deployment", "caracal-typha")] {
            let env = env_of(&with.objects, kind, name);
            assert!(has(&env, "KUBERNETES_SERVICE_HOST", "10.0.0.1"), "{kind}: {env}");
            assert!(has(&env, "KUBERNETES_SERVICE_PORT", "6443"), "{kind}: {env}");
        }
        let bad = ClusterFacts {
            api_server_error: Some("ConfigMap kubernetes-services-endpoint: bad".into()),
            ..Default::default()
        };
        let errs = compute(&InstallationSpec::default(), &bad).unwrap_err();
        assert_eq!(errs[0].reason, "InvalidAPIServerEndpoint");
    }
}
