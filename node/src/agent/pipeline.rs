//! The agent's update path, without effects: datastore updates of the policy kinds in, the calculation
//! graph's model and its changes out. The engine thread runs it; tests drive it directly with random
//! datastore changes and compare its model with a full computation.
//!
//! Each object is decoded and converted once, on arrival (`caracal_policy::decode`). One that fails keeps
//! its last good version in the graph; one that never had a good version is enforced as its fail-closed form
//! when it is a policy (`caracal_policy::decode::fail_closed_input`) and contributes nothing otherwise. Every
//! other object's changes go on being applied.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use caracal_datastore::Update;
use caracal_policy::calc::graph::{CalcGraph, Changes};
use caracal_policy::decode::{self, DATAPLANE_KINDS, Input};
use caracal_policy::model::DataplaneModel;
use caracal_policy::world::Endpoint;
use tracing::warn;

/// An object that failed to decode or convert, for the caller to report on the object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// `apiVersion/kind`.
    pub kind: String,
    /// `namespace/name` or `name`.
    pub key: String,
    /// What is wrong, naming the field.
    pub message: String,
    /// Whether a previous good version is still enforced (otherwise its fail-closed form, or nothing).
    pub kept_last_good: bool,
}

/// The update path.
pub struct Pipeline {
    node: String,
    graph: CalcGraph,
    /// Objects by kind and key, with whether a version of each converted at least once.
    objects: BTreeMap<String, BTreeMap<String, bool>>,
    /// Keys seen during a relist in progress, by kind: what is not seen is deleted at its InSync.
    relisting: BTreeMap<String, BTreeSet<String>>,
    synced: BTreeSet<String>,
    /// This node's pods as decoded (their status addresses), to merge with IPAM's.
    local_pods: BTreeMap<String, Endpoint>,
    held: BTreeMap<String, Vec<IpAddr>>,
}

impl Pipeline {
    /// An empty pipeline for `node`; local interfaces are named as the CNI plugin names them.
    pub fn new(node: &str) -> Self {
        Pipeline {
            node: node.to_owned(),
            graph: CalcGraph::new(
                node,
                Box::new(|ep: &Endpoint| crate::cni::host_iface(&ep.namespace, &ep.name)),
            ),
            objects: BTreeMap::new(),
            relisting: BTreeMap::new(),
            synced: BTreeSet::new(),
            local_pods: BTreeMap::new(),
            held: BTreeMap::new(),
        }
    }

    /// True once every policy kind has been listed completely.
    pub fn in_sync(&self) -> bool {
        DATAPLANE_KINDS.iter().all(|k| self.synced.contains(*k))
    }

    /// The model.
    pub fn model(&self) -> &DataplaneModel {
        self.graph.model()
    }

    /// Felix's `natOutgoingAddress` and `defaultEndpointToHostAction`.
    pub fn set_felix(&mut self, nat_address: Option<IpAddr>, to_host: caracal_policy::model::EndpointToHost) {
        self.graph.set_nat_address(nat_address);
        self.graph.set_endpoint_to_host(to_host);
    }

    /// What changed in the model since the last call.
    pub fn take_changes(&mut self) -> Changes {
        self.graph.take_changes()
    }

    /// Applies one update; returns the failure when its object could not be converted.
    pub fn update(&mut self, u: Update) -> Option<Failure> {
        match u {
            Update::Resync { kind } => {
                self.relisting.insert(kind, BTreeSet::new());
                None
            }
            Update::InSync { kind } => {
                if let Some(seen) = self.relisting.remove(&kind) {
                    let gone: Vec<String> = self
                        .objects
                        .get(&kind)
                        .into_iter()
                        .flat_map(|o| o.keys())
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        self.delete(&kind, &key);
                    }
                }
                self.synced.insert(kind);
                None
            }
            Update::Upsert { kind, key, object } => {
                if let Some(seen) = self.relisting.get_mut(&kind) {
                    seen.insert(key.clone());
                }
                self.upsert(&kind, &key, &object)
            }
            Update::Delete { kind, key } => {
                self.delete(&kind, &key);
                None
            }
        }
    }

    fn upsert(&mut self, kind: &str, key: &str, object: &serde_json::Value) -> Option<Failure> {
        let good = self
            .objects
            .entry(kind.to_owned())
            .or_default()
            .entry(key.to_owned())
            .or_default();
        match decode::decode(kind, key, object) {
            Ok(Some(input)) => {
                *good = true;
                self.feed(kind, key, input);
                None
            }
            Ok(None) => {
                // Not something policy reads (a slice of no Service): whatever it contributed goes.
                *good = true;
                self.remove_from_graph(kind, key);
                None
            }
            Err(err) => {
                let kept_last_good = *good;
                let message = err.to_string();
                warn!(kind, key, error = %message, kept_last_good, "an object could not be converted; the others are applied");
                if !kept_last_good {
                    match decode::fail_closed_input(kind, object) {
                        Some(input) => self.feed(kind, key, input),
                        None => self.remove_from_graph(kind, key),
                    }
                }
                Some(Failure {
                    kind: kind.to_owned(),
                    key: key.to_owned(),
                    message,
                    kept_last_good,
                })
            }
        }
    }

    fn feed(&mut self, kind: &str, key: &str, input: Input) {
        match input {
            Input::Pod(ep) if ep.node.as_deref() == Some(self.node.as_str()) => {
                self.local_pods.insert(key.to_owned(), ep.clone());
                self.graph.upsert_endpoint(self.with_held(ep));
            }
            Input::Pod(ep) => {
                self.local_pods.remove(key);
                self.graph.upsert_endpoint(ep);
            }
            other => {
                if kind == "v1/Pod" {
                    self.local_pods.remove(key);
                }
                self.graph.apply(key, other);
            }
        }
    }

    fn remove_from_graph(&mut self, kind: &str, key: &str) {
        if kind == "v1/Pod" {
            self.local_pods.remove(key);
        }
        self.graph.remove(kind, key);
    }

    fn delete(&mut self, kind: &str, key: &str) {
        if let Some(o) = self.objects.get_mut(kind) {
            o.remove(key);
        }
        self.remove_from_graph(kind, key);
    }

    /// A local pod's endpoint with the addresses IPAM gave it (they win over the status: they are known
    /// first, and the same once the kubelet reports them).
    fn with_held(&self, mut ep: Endpoint) -> Endpoint {
        if let Some(ips) = self.held.get(&ep.key()) {
            ep.ips.clone_from(ips);
        }
        ep
    }

    /// The addresses IPAM holds for local pods (`namespace/pod` -> addresses).
    pub fn set_held(&mut self, held: BTreeMap<String, Vec<IpAddr>>) {
        let changed: Vec<String> = self
            .held
            .keys()
            .chain(held.keys())
            .filter(|k| self.held.get(*k) != held.get(*k))
            .cloned()
            .collect();
        self.held = held;
        for k in changed {
            if let Some(ep) = self.local_pods.get(&k).cloned() {
                self.graph.upsert_endpoint(self.with_held(ep));
            }
        }
    }
}
