//! `render`: a pure function from (computed Installation, cluster facts) to every object the operator wants
//! to exist. No I/O, no clock, no randomness: certificates and the facts about the cluster come in as inputs,
//! so the same inputs always give the same objects and golden tests can pin them.

mod common;
pub mod defaults;
mod felix;
mod node;
mod typha;

use caracal_crds::installation::InstallationSpec;
use caracal_crds::schema::Cidr;
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
    objects.extend(node::render(computed, facts));
    objects.extend(typha::render(computed, facts));
    objects.extend(felix::render(computed, facts));
    Rendered { objects }
}
