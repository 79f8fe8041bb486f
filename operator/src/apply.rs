//! Applying rendered objects: server-side apply with the `caracal-operator` field manager, but only when the
//! live object differs from what is wanted, so a steady-state reconcile writes nothing; and pruning what the
//! operator rendered before and no longer wants.

use std::collections::BTreeSet;
use std::sync::Arc;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::Value;

use crate::metrics::Metrics;
use crate::render::{NAMESPACE, Object, managed_selector};

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "caracal-operator";

/// Errors talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A request failed.
    #[error("{verb} {object}: {source}")]
    Api {
        /// What was being done (`apply`, `delete`, `list`).
        verb: &'static str,
        /// Which object or kind.
        object: String,
        /// The API error.
        source: kube::Error,
    },
}

/// Every kind the operator renders, so pruning can list them: (apiVersion, kind, namespaced).
pub const MANAGED_KINDS: &[(&str, &str, bool)] = &[
    ("v1", "ServiceAccount", true),
    ("rbac.authorization.k8s.io/v1", "ClusterRole", false),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", false),
    ("v1", "ConfigMap", true),
    ("v1", "Secret", true),
    ("apps/v1", "DaemonSet", true),
    ("apps/v1", "Deployment", true),
    ("v1", "Service", true),
    ("policy/v1", "PodDisruptionBudget", true),
    ("caracal.dev/v1", "IPPool", false),
];

/// The API resource of `apiVersion` + `kind`.
pub fn resource(api_version: &str, kind: &str) -> ApiResource {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
}

/// True when every field of `want` is present in `live` with the same value. Fields the API server adds
/// (defaults, status, metadata it manages) do not count as differences; numbers compare by value. A wanted
/// empty list matches an absent field: the API server drops empty lists, and rendering one is how a list the
/// operator set before (a pod's `imagePullSecrets`) is cleared by server-side apply.
pub fn is_subset(want: &Value, live: &Value) -> bool {
    match (want, live) {
        (Value::Object(w), Value::Object(l)) => w.iter().all(|(k, wv)| match l.get(k) {
            Some(lv) => is_subset(wv, lv),
            None => wv.as_array().is_some_and(Vec::is_empty),
        }),
        (Value::Array(w), Value::Array(l)) => {
            w.len() == l.len() && w.iter().zip(l).all(|(a, b)| is_subset(a, b))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (a, b) => a == b,
    }
}

/// Applies and prunes on behalf of the operator.
#[derive(Clone)]
pub struct Applier {
    client: Client,
    metrics: Arc<Metrics>,
}

impl Applier {
    /// An applier writing with `client`.
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self { client, metrics }
    }

    fn api(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> Api<DynamicObject> {
        let ar = resource(api_version, kind);
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        }
    }

    /// Makes the live object contain what `object` says. Returns whether a write was needed.
    pub async fn apply(&self, object: &Object) -> Result<bool, ApplyError> {
        let api = self.api(&object.api_version, &object.kind, object.namespace.as_deref());
        let err = |verb, source| ApplyError::Api {
            verb,
            object: object.key(),
            source,
        };
        let live = api.get_opt(&object.name).await.map_err(|e| err("get", e))?;
        if let Some(live) = live {
            let live = serde_json::to_value(&live).unwrap_or_default();
            if is_subset(&object.body, &live) {
                return Ok(false);
            }
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(&object.name, &params, &Patch::Apply(&object.body))
            .await
            .map_err(|e| err("apply", e))?;
        self.metrics.object_applied(&object.kind);
        Ok(true)
    }

    /// Lists what the operator rendered before (by label) and is no longer in `wanted`; deletes it unless
    /// `keep` says otherwise. Returns the keys of what was deleted and of what was kept back.
    pub async fn prune(
        &self,
        wanted: &[Object],
        keep: impl Fn(&str, &DynamicObject) -> bool,
    ) -> Result<(Vec<String>, Vec<String>), ApplyError> {
        let wanted: BTreeSet<String> = wanted.iter().map(Object::key).collect();
        let (mut deleted, mut kept) = (Vec::new(), Vec::new());
        for (api_version, kind, namespaced) in MANAGED_KINDS {
            let ns = namespaced.then_some(NAMESPACE);
            let api = self.api(api_version, kind, ns);
            let list = api
                .list(&ListParams::default().labels(&managed_selector()))
                .await
                .map_err(|source| ApplyError::Api {
                    verb: "list",
                    object: (*kind).to_owned(),
                    source,
                })?;
            for obj in list {
                let key = format!(
                    "{kind}/{}/{}",
                    obj.namespace().unwrap_or_default(),
                    obj.name_any()
                );
                if wanted.contains(&key) || obj.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                if keep(kind, &obj) {
                    kept.push(key);
                    continue;
                }
                match api.delete(&obj.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(source) => {
                        return Err(ApplyError::Api {
                            verb: "delete",
                            object: key,
                            source,
                        });
                    }
                }
                self.metrics.object_deleted(kind);
                deleted.push(key);
            }
        }
        Ok((deleted, kept))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn server_added_fields_are_not_differences() {
        let want = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "a", "image": "x"}]}}}});
        let live = json!({"spec": {"replicas": 2.0, "revisionHistoryLimit": 10,
            "template": {"spec": {"dnsPolicy": "ClusterFirst", "containers": [{"name": "a", "image": "x", "imagePullPolicy": "IfNotPresent"}]}}},
            "status": {"readyReplicas": 1}});
        assert!(is_subset(&want, &live));
    }

    #[test]
    fn edits_and_missing_list_items_are_differences() {
        let want = json!({"spec": {"containers": [{"name": "a", "image": "x"}]}});
        assert!(!is_subset(
            &want,
            &json!({"spec": {"containers": [{"name": "a", "image": "y"}]}})
        ));
        assert!(!is_subset(&want, &json!({"spec": {"containers": []}})));
        assert!(!is_subset(&want, &json!({"spec": {}})));
    }

    #[test]
    fn a_wanted_empty_list_matches_an_absent_one_but_not_a_full_one() {
        let want = json!({"spec": {"imagePullSecrets": []}});
        assert!(is_subset(&want, &json!({"spec": {}})));
        assert!(is_subset(&want, &json!({"spec": {"imagePullSecrets": []}})));
        assert!(!is_subset(
            &want,
            &json!({"spec": {"imagePullSecrets": [{"name": "old"}]}})
        ));
        assert!(!is_subset(
            &json!({"spec": {"imagePullSecrets": [{"name": "new"}]}}),
            &json!({"spec": {}})
        ));
    }

    #[test]
    fn plural_names_follow_kubernetes() {
        assert_eq!(
            resource("policy/v1", "PodDisruptionBudget").plural,
            "poddisruptionbudgets"
        );
        assert_eq!(resource("caracal.dev/v1", "IPPool").plural, "ippools");
        assert_eq!(resource("v1", "Secret").group, "");
        assert_eq!(
            resource("caracal.dev/v1", "FelixConfiguration").plural,
            "felixconfigurations"
        );
    }
}
