//! What every rendered object shares: the namespace, labels, metadata, RBAC and probe builders.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::Object;

/// The namespace Caracal's components run in.
pub const NAMESPACE: &str = "caracal-system";
/// The label that marks what the operator rendered; pruning lists by it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY_VALUE: &str = "caracal-operator";
/// The release whose images are rendered.
pub const VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"));

/// The label selector of everything the operator rendered.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")
}

/// The standard labels of one component.
pub fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
        ("app.kubernetes.io/part-of".to_owned(), "caracal".to_owned()),
        ("app.kubernetes.io/name".to_owned(), component.to_owned()),
    ])
}

/// Metadata for an object of `component` named `name` (in the Caracal namespace when `namespaced`).
pub fn meta(component: &str, name: &str, namespaced: bool) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespaced.then(|| NAMESPACE.to_owned()),
        labels: Some(labels(component)),
        ..Default::default()
    }
}

/// The namespace, privileged for Pod Security (the node agent is a privileged hostNetwork pod).
pub fn namespace() -> Object {
    let mut meta = meta("caracal", NAMESPACE, false);
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    for mode in ["enforce", "audit", "warn"] {
        labels.insert(
            format!("pod-security.kubernetes.io/{mode}"),
            "privileged".to_owned(),
        );
    }
    Object::from_typed(
        "v1",
        "Namespace",
        &Namespace {
            metadata: meta,
            ..Default::default()
        },
    )
}

/// Applies a component's pod-template overrides: labels, annotations, container resources by name, and
/// nodeSelector / tolerations / affinity, each replacing what was rendered.
pub fn apply_pod_overrides(
    template: &mut k8s_openapi::api::core::v1::PodTemplateSpec,
    over: Option<&caracal_crds::installation::PodTemplateOverride>,
) {
    let Some(over) = over else { return };
    if let Some(m) = &over.metadata {
        let meta = template.metadata.get_or_insert_with(Default::default);
        merge_maps(&mut meta.labels, m.labels.as_ref());
        merge_maps(&mut meta.annotations, m.annotations.as_ref());
    }
    let (Some(o), Some(spec)) = (&over.spec, template.spec.as_mut()) else {
        return;
    };
    let set_resources =
        |containers: &mut Vec<k8s_openapi::api::core::v1::Container>,
         overrides: Option<&Vec<caracal_crds::installation::ContainerOverride>>| {
            for c in overrides.into_iter().flatten() {
                if let Some(target) = containers.iter_mut().find(|t| t.name == c.name) {
                    target.resources.clone_from(&c.resources);
                }
            }
        };
    set_resources(&mut spec.containers, o.containers.as_ref());
    if let Some(init) = spec.init_containers.as_mut() {
        set_resources(init, o.init_containers.as_ref());
    }
    if let Some(ns) = &o.node_selector {
        spec.node_selector = Some(ns.clone());
    }
    if let Some(t) = &o.tolerations {
        spec.tolerations = Some(t.clone());
    }
    if let Some(a) = &o.affinity {
        spec.affinity = Some(a.clone());
    }
}

/// Adds `extra` entries to `target` (creating it), keeping existing keys unless `extra` sets them.
pub fn merge_maps(target: &mut Option<BTreeMap<String, String>>, extra: Option<&BTreeMap<String, String>>) {
    if let Some(extra) = extra {
        target
            .get_or_insert_with(BTreeMap::new)
            .extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
}

/// A ClusterRole rule.
pub fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> k8s_openapi::api::rbac::v1::PolicyRule {
    let strings = |xs: &[&str]| Some(xs.iter().map(|x| (*x).to_owned()).collect());
    k8s_openapi::api::rbac::v1::PolicyRule {
        api_groups: strings(groups),
        resources: strings(resources),
        verbs: strings(verbs).unwrap_or_default(),
        ..Default::default()
    }
}

/// ServiceAccount, ClusterRole and ClusterRoleBinding, all named `name`.
pub fn identity(component: &str, rules: Vec<k8s_openapi::api::rbac::v1::PolicyRule>) -> Vec<Object> {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleRef, Subject};
    let sa = ServiceAccount {
        metadata: meta(component, component, true),
        ..Default::default()
    };
    let role = ClusterRole {
        metadata: meta(component, component, false),
        rules: Some(rules),
        ..Default::default()
    };
    let binding = ClusterRoleBinding {
        metadata: meta(component, component, false),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: component.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: component.into(),
            namespace: Some(NAMESPACE.into()),
            ..Default::default()
        }]),
    };
    vec![
        Object::from_typed("v1", "ServiceAccount", &sa),
        Object::from_typed("rbac.authorization.k8s.io/v1", "ClusterRole", &role),
        Object::from_typed("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", &binding),
    ]
}

/// An environment variable with a literal value.
pub fn env(name: &str, value: impl Into<String>) -> k8s_openapi::api::core::v1::EnvVar {
    k8s_openapi::api::core::v1::EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// An HTTP probe on the loopback address (the components run with hostNetwork).
pub fn probe(path: &str, port: i32, period: i32, failures: i32) -> k8s_openapi::api::core::v1::Probe {
    use k8s_openapi::api::core::v1::{HTTPGetAction, Probe};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    Probe {
        http_get: Some(HTTPGetAction {
            host: Some("127.0.0.1".into()),
            path: Some(path.into()),
            port: IntOrString::Int(port),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Default::default()
    }
}

/// Secret `data` (base64 on the wire): Secrets are rendered with `data`, not `stringData`, because the API
/// server folds `stringData` into `data` and a comparison with what is stored would never settle.
pub fn secret_data(entries: &[(&str, &str)]) -> BTreeMap<String, k8s_openapi::ByteString> {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), k8s_openapi::ByteString(v.as_bytes().to_vec())))
        .collect()
}
