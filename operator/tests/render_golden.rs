//! Golden tests: every Installation in examples/ renders to exactly the objects pinned in tests/golden/
//! (or, when this release cannot run it, to the errors pinned there). Regenerate with
//! `CARACAL_UPDATE_GOLDEN=1 cargo test -p caracal-operator --test render_golden` and review the diff.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use caracal_crds::imageset::ImageSet;
use caracal_crds::installation::{Installation, InstallationSpec};
use caracal_operator::render::{Certificates, ClusterFacts, compute, render};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;

/// The facts every example renders with: the pull secrets it names exist in the operator's namespace, and
/// `installation-private-registry.yaml` also finds the ImageSet of examples/imageset.yaml.
fn facts(example: &Path, spec: &InstallationSpec) -> ClusterFacts {
    let pull_secrets = spec
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|r| {
            let secret = Secret {
                type_: Some("kubernetes.io/dockerconfigjson".into()),
                data: Some(BTreeMap::from([(
                    ".dockerconfigjson".to_owned(),
                    ByteString(br#"{"auths":{"registry.example.com":{"auth":"dXNlcjpwYXNz"}}}"#.to_vec()),
                )])),
                ..Default::default()
            };
            (r.name.clone(), secret)
        })
        .collect();
    let image_set = example.ends_with("installation-private-registry.yaml").then(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/imageset.yaml");
        serde_yaml::from_str::<ImageSet>(&std::fs::read_to_string(path).expect("read")).expect("an ImageSet")
    });
    ClusterFacts {
        operator_namespace: "caracal-operator".into(),
        pull_secrets,
        image_set,
        node_count: 3,
        user_pools: Vec::new(),
        certificates: Certificates {
            ca_cert: "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n".into(),
            typha_cert: "TYPHA CERT".into(),
            typha_key: "TYPHA KEY".into(),
            node_cert: "NODE CERT".into(),
            node_key: "NODE KEY".into(),
        },
        ..Default::default()
    }
}

fn golden_text(example: &Path) -> String {
    let inst: Installation =
        serde_yaml::from_str(&std::fs::read_to_string(example).expect("read")).expect("an Installation");
    let mut out = format!(
        "# render of examples/{}\n",
        example.file_name().and_then(|n| n.to_str()).unwrap_or("")
    );
    let facts = facts(example, &inst.spec);
    match compute(&inst.spec, &facts) {
        Err(errors) => {
            out.push_str("# Degraded: nothing is rendered\n");
            for e in errors {
                out.push_str(&format!("# {} ({}): {}\n", e.field, e.reason, e.message));
            }
        }
        Ok(computed) => {
            out.push_str("---\n# status.computed\n");
            out.push_str(&serde_yaml::to_string(&computed).expect("yaml"));
            for o in render(&computed, &facts).objects {
                out.push_str("---\n");
                out.push_str(&serde_yaml::to_string(&o.body).expect("yaml"));
            }
        }
    }
    out
}

#[test]
fn every_example_installation_renders_as_pinned() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root.join("../examples"))
        .expect("examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("installation"))
        })
        .collect();
    examples.sort();
    assert!(examples.len() >= 3);
    let update = std::env::var_os("CARACAL_UPDATE_GOLDEN").is_some();
    let mut stale = Vec::new();
    for example in examples {
        let golden = root.join("tests/golden").join(example.file_name().expect("name"));
        let want = golden_text(&example);
        if update {
            std::fs::write(&golden, &want).expect("write golden");
        } else if std::fs::read_to_string(&golden).ok().as_deref() != Some(want.as_str()) {
            stale.push(golden.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "render output differs from {stale:?}: review with CARACAL_UPDATE_GOLDEN=1 cargo test -p caracal-operator --test render_golden; git diff"
    );
}

#[test]
fn rendering_is_deterministic() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/installation-vxlan.yaml");
    assert_eq!(golden_text(&example), golden_text(&example));
}
