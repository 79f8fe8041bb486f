//! caracal-datastore: how node-side processes see the datastore. Every change is an [`Update`]; where the
//! updates come from is the only difference between watching the API server directly ([`api::watch`]) and
//! going through Typha ([`typha::client`], speaking [`typha::protocol`] over mutual TLS, [`typha::tls`]), so
//! the agent uses one interface either way. [`Cache`] keeps the objects of kinds that are read as documents;
//! policy inputs are decoded once on arrival instead (`caracal_policy::decode`). [`http`] serves the
//! `/healthz`, `/readyz` and `/metrics` endpoints of every long-running node-side binary.

pub mod api;
pub mod http;

/// Typha's wire protocol, its TLS identities, and the client node agents use.
pub mod typha {
    pub mod client;
    pub mod protocol;
    pub mod tls;
}

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// A kind the agent watches: (apiVersion, kind, plural, namespaced).
pub type KindSpec = (&'static str, &'static str, &'static str, bool);

/// Everything node agents read: policy inputs (EndpointSlices for rules' `services` matches), and the IPAM,
/// routing and agent configuration objects.
pub const KINDS: &[KindSpec] = &[
    ("v1", "Node", "nodes", false),
    ("v1", "Namespace", "namespaces", false),
    ("v1", "Pod", "pods", true),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    ("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", true),
    (
        "caracal.dev/v1",
        "GlobalNetworkPolicy",
        "globalnetworkpolicies",
        false,
    ),
    ("caracal.dev/v1", "NetworkPolicy", "networkpolicies", true),
    ("caracal.dev/v1", "Tier", "tiers", false),
    ("caracal.dev/v1", "NetworkSet", "networksets", true),
    ("caracal.dev/v1", "GlobalNetworkSet", "globalnetworksets", false),
    ("caracal.dev/v1", "IPPool", "ippools", false),
    ("caracal.dev/v1", "IPAMBlock", "ipamblocks", false),
    (
        "caracal.dev/v1",
        "FelixConfiguration",
        "felixconfigurations",
        false,
    ),
    ("caracal.dev/v1", "BGPConfiguration", "bgpconfigurations", false),
    ("caracal.dev/v1", "BGPPeer", "bgppeers", false),
    ("discovery.k8s.io/v1", "EndpointSlice", "endpointslices", true),
];

/// `apiVersion/kind`, the key of a kind in the cache.
pub fn kind_id(api_version: &str, kind: &str) -> String {
    format!("{api_version}/{kind}")
}

/// One change to the datastore view (also what Typha sends on the wire).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op")]
pub enum Update {
    /// A (re)list of `kind` starts: what follows until [`Update::InSync`] replaces its entries.
    Resync {
        /// The kind (`apiVersion/kind`).
        kind: String,
    },
    /// An object was created or changed (during a resync: listed).
    Upsert {
        /// The kind.
        kind: String,
        /// `namespace/name` or `name`.
        key: String,
        /// The object, with apiVersion and kind.
        object: Value,
    },
    /// An object was deleted.
    Delete {
        /// The kind.
        kind: String,
        /// `namespace/name` or `name`.
        key: String,
    },
    /// A (re)list of `kind` is complete.
    InSync {
        /// The kind.
        kind: String,
    },
}

/// The objects the agent knows, by kind and key.
#[derive(Debug, Default)]
pub struct Cache {
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    /// Entries of kinds being resynced, swapped in at InSync.
    pending: BTreeMap<String, BTreeMap<String, Value>>,
    synced: BTreeSet<String>,
}

impl Cache {
    /// Applies one update.
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Resync { kind } => {
                self.pending.insert(kind, BTreeMap::new());
            }
            Update::Upsert { kind, key, object } => {
                let target = match self.pending.get_mut(&kind) {
                    Some(p) => p,
                    None => self.objects.entry(kind).or_default(),
                };
                target.insert(key, object);
            }
            Update::Delete { kind, key } => {
                if let Some(p) = self.pending.get_mut(&kind) {
                    p.remove(&key);
                }
                if let Some(o) = self.objects.get_mut(&kind) {
                    o.remove(&key);
                }
            }
            Update::InSync { kind } => {
                if let Some(p) = self.pending.remove(&kind) {
                    self.objects.insert(kind.clone(), p);
                }
                self.synced.insert(kind);
            }
        }
    }

    /// The objects of one kind (`v1/Pod`), by key (`namespace/name`, or `name` for cluster-scoped kinds).
    pub fn of_kind(&self, kind: &str) -> impl Iterator<Item = (&String, &Value)> {
        self.objects.get(kind).into_iter().flatten()
    }

    /// One object by kind and key.
    pub fn get(&self, kind: &str, key: &str) -> Option<&Value> {
        self.objects.get(kind)?.get(key)
    }

    /// True once `kind` has been listed completely at least once.
    pub fn kind_in_sync(&self, kind: &str) -> bool {
        self.synced.contains(kind)
    }

    /// True once every watched kind has been listed completely.
    pub fn in_sync(&self) -> bool {
        KINDS
            .iter()
            .all(|(v, k, _, _)| self.synced.contains(&kind_id(v, k)))
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        self.objects.values().map(BTreeMap::len).sum()
    }

    /// True when no object is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The objects as documents.
    pub fn documents(&self) -> Vec<(String, Value)> {
        self.objects
            .iter()
            .flat_map(|(kind, objs)| {
                objs.iter()
                    .map(move |(key, v)| (format!("{kind} {key}"), v.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn upsert(kind: &str, key: &str) -> Update {
        Update::Upsert {
            kind: kind.into(),
            key: key.into(),
            object: json!({"metadata": {"name": key}}),
        }
    }

    #[test]
    fn a_resync_replaces_a_kind_only_when_complete() {
        let mut c = Cache::default();
        let k = "v1/Namespace";
        c.apply(Update::Resync { kind: k.into() });
        c.apply(upsert(k, "a"));
        c.apply(upsert(k, "b"));
        assert_eq!(c.len(), 0, "a resync in progress is not visible");
        c.apply(Update::InSync { kind: k.into() });
        assert_eq!(c.len(), 2);
        c.apply(Update::Delete {
            kind: k.into(),
            key: "a".into(),
        });
        assert_eq!(c.len(), 1);
        // A relist after a lost watch drops what disappeared meanwhile.
        c.apply(Update::Resync { kind: k.into() });
        c.apply(upsert(k, "c"));
        assert_eq!(c.len(), 1, "the old view stays until the relist completes");
        c.apply(Update::InSync { kind: k.into() });
        let keys: Vec<String> = c.documents().into_iter().map(|(s, _)| s).collect();
        assert_eq!(keys, vec!["v1/Namespace c".to_owned()]);
        assert!(!c.in_sync(), "other kinds are not listed yet");
    }
}
