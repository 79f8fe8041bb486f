//! `spec.imagePullSecrets`: as the Tigera operator does, each named Secret in the operator's namespace is copied
//! into caracal-system (a rendered object like any other, so a changed source updates the copy and a copy no
//! longer referenced is pruned) and named in `imagePullSecrets` of every pod the operator renders.
//!
//! A reference to a Secret that does not exist, is not a registry credential, or would overwrite one of the
//! operator's own Secrets makes the Installation Degraded; nothing that runs changes.

use std::collections::BTreeMap;

use caracal_crds::installation::InstallationSpec;
use k8s_openapi::api::core::v1::{LocalObjectReference, Secret};

use super::common::{NAMESPACE, meta};
use super::{ClusterFacts, Object, SpecError};

/// The Secret types a kubelet reads registry credentials from.
pub const PULL_SECRET_TYPES: &[&str] = &["kubernetes.io/dockerconfigjson", "kubernetes.io/dockercfg"];

/// The annotation on a copy naming its source (`<namespace>/<name>`).
pub const COPIED_FROM: &str = "operator.caracal.dev/copied-from";

/// The component label of the copies.
const COMPONENT: &str = "caracal-pull-secret";

/// Secrets the operator keeps in caracal-system for itself; a pull secret of the same name would replace one.
const RESERVED: &[&str] = &["caracal-ca", "caracal-node-certs", "caracal-typha-certs"];

/// The referenced Secret names, in order, each once.
pub fn names(spec: &InstallationSpec) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in spec.image_pull_secrets.iter().flatten() {
        if !out.contains(&r.name) {
            out.push(r.name.clone());
        }
    }
    out
}

/// `imagePullSecrets` for a rendered pod spec: the copies. Always a list, empty when there are none, so that
/// removing the last reference also clears the pods' list (server-side apply drops what the operator no
/// longer sets; a field left out would be taken as unchanged by the apply-if-different check).
pub fn references(spec: &InstallationSpec) -> Option<Vec<LocalObjectReference>> {
    Some(
        names(spec)
            .into_iter()
            .map(|name| LocalObjectReference { name })
            .collect(),
    )
}

/// What is wrong with each reference, naming `spec.imagePullSecrets[i]`, the Secret and what to do.
pub fn check(spec: &InstallationSpec, facts: &ClusterFacts) -> Vec<SpecError> {
    let ns = &facts.operator_namespace;
    let mut errors = Vec::new();
    for (i, r) in spec.image_pull_secrets.iter().flatten().enumerate() {
        let field = format!("spec.imagePullSecrets[{i}]");
        let name = &r.name;
        if name.is_empty() {
            errors.push(SpecError {
                field,
                reason: "PullSecretInvalid",
                message: format!("the name is empty: name a Secret in namespace {ns}"),
            });
            continue;
        }
        if RESERVED.contains(&name.as_str()) {
            errors.push(SpecError {
                field,
                reason: "PullSecretInvalid",
                message: format!(
                    "Secret {name:?} would replace the operator's own Secret of that name in {NAMESPACE}: give \
                     the pull secret another name"
                ),
            });
            continue;
        }
        let Some(source) = facts.pull_secrets.get(name) else {
            errors.push(SpecError {
                field,
                reason: "PullSecretNotFound",
                message: format!(
                    "Secret {name:?} does not exist in namespace {ns} (the operator's): create it there (type \
                     kubernetes.io/dockerconfigjson, e.g. `kubectl create secret docker-registry {name} -n {ns} \
                     ...`), or remove it from imagePullSecrets"
                ),
            });
            continue;
        };
        let type_ = source.type_.as_deref().unwrap_or("Opaque");
        if !PULL_SECRET_TYPES.contains(&type_) {
            errors.push(SpecError {
                field,
                reason: "PullSecretWrongType",
                message: format!(
                    "Secret {name:?} in namespace {ns} has type {type_}, which a kubelet does not read registry \
                     credentials from: recreate it with type kubernetes.io/dockerconfigjson (`kubectl create \
                     secret docker-registry`)"
                ),
            });
        }
    }
    errors
}

/// The copies in caracal-system: each referenced Secret's type and data, under the same name.
pub fn render(spec: &InstallationSpec, facts: &ClusterFacts) -> Vec<Object> {
    names(spec)
        .into_iter()
        .filter_map(|name| {
            let source = facts.pull_secrets.get(&name)?;
            let mut metadata = meta(COMPONENT, &name, true);
            metadata.annotations = Some(BTreeMap::from([(
                COPIED_FROM.to_owned(),
                format!("{}/{name}", facts.operator_namespace),
            )]));
            let copy = Secret {
                metadata,
                type_: source.type_.clone(),
                data: Some(source.data.clone().unwrap_or_default()),
                ..Default::default()
            };
            Some(Object::from_typed("v1", "Secret", &copy))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;

    use super::*;

    fn secret(type_: &str, data: &str) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some(BTreeMap::from([(
                ".dockerconfigjson".to_owned(),
                ByteString(data.as_bytes().to_vec()),
            )])),
            ..Default::default()
        }
    }

    fn spec(names: &[&str]) -> InstallationSpec {
        InstallationSpec {
            image_pull_secrets: Some(
                names
                    .iter()
                    .map(|n| LocalObjectReference { name: (*n).into() })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn facts(secrets: &[(&str, Secret)]) -> ClusterFacts {
        ClusterFacts {
            operator_namespace: "caracal-operator".into(),
            pull_secrets: secrets
                .iter()
                .map(|(n, s)| ((*n).to_owned(), s.clone()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn each_referenced_secret_is_copied_once_with_its_type_and_data() {
        let f = facts(&[
            ("regcred", secret("kubernetes.io/dockerconfigjson", "{}")),
            ("old", secret("kubernetes.io/dockercfg", "{}")),
        ]);
        let s = spec(&["regcred", "old", "regcred"]);
        assert_eq!(check(&s, &f), vec![]);
        let copies = render(&s, &f);
        assert_eq!(copies.len(), 2);
        assert_eq!(copies[0].key(), "Secret/caracal-system/regcred");
        assert_eq!(copies[0].body["type"], "kubernetes.io/dockerconfigjson");
        assert_eq!(copies[0].body["data"][".dockerconfigjson"], "e30=");
        assert_eq!(
            copies[0].body["metadata"]["annotations"][COPIED_FROM],
            "caracal-operator/regcred"
        );
        assert_eq!(
            copies[0].body["metadata"]["labels"]["app.kubernetes.io/managed-by"], "caracal-operator",
            "copies are pruned like every rendered object"
        );
        assert_eq!(
            references(&s),
            Some(vec![
                LocalObjectReference {
                    name: "regcred".into()
                },
                LocalObjectReference { name: "old".into() }
            ])
        );
        assert_eq!(references(&InstallationSpec::default()), Some(vec![]));
        assert_eq!(references(&spec(&[])), Some(vec![]));
    }

    #[test]
    fn a_missing_wrong_typed_or_reserved_secret_is_named_with_its_index() {
        let f = facts(&[("opaque", secret("Opaque", "x"))]);
        let errs = check(&spec(&["missing", "opaque", "caracal-ca", ""]), &f);
        let fields: Vec<_> = errs.iter().map(|e| (e.field.as_str(), e.reason)).collect();
        assert_eq!(
            fields,
            vec![
                ("spec.imagePullSecrets[0]", "PullSecretNotFound"),
                ("spec.imagePullSecrets[1]", "PullSecretWrongType"),
                ("spec.imagePullSecrets[2]", "PullSecretInvalid"),
                ("spec.imagePullSecrets[3]", "PullSecretInvalid"),
            ]
        );
        assert!(
            errs[0]
                .message
                .starts_with("Secret \"missing\" does not exist in namespace caracal-operator"),
            "{}",
            errs[0]
        );
        assert!(errs[1].message.contains("has type Opaque"), "{}", errs[1]);
        assert!(render(&spec(&["missing"]), &f).is_empty());
    }
}
