//! The release's OLM bundle and Helm chart, checked by the Operator Framework's and Helm's own tools (built
//! by `make olm helm`): the bundle passes the validation library's default and optional suites with no
//! error; the chart passes `helm lint`, and `helm template` renders the operator from the chart's values
//! (registry, image path, tag, pull secrets, resources), the Installation for the hook Job that applies it
//! after install and every upgrade, and the uninstall hook.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use caracal_operator::install::Release;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(rel: &str) -> PathBuf {
    let path = root().join(rel);
    assert!(
        path.exists(),
        "{} is missing: run `make olm helm`",
        path.display()
    );
    path
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

#[test]
fn the_olm_bundle_passes_the_operator_frameworks_validators() {
    let r = Release::current();
    let bundle = root().join("manifests/olm").join(&r.version);
    let out = run(Command::new(tool("target/olm/bin/bundle-validate")).arg(&bundle));
    let summary = out.lines().last().unwrap_or_default();
    assert!(
        summary.contains(&format!("caracal-operator.v{}", r.version)) && summary.contains(" 0 errors"),
        "{out}"
    );
}

fn template(values: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new(tool("target/helm/bin/helm"));
    cmd.args(["template", "caracal"])
        .arg(root().join("manifests/helm/caracal"))
        .args(["--namespace", "caracal-operator"]);
    for v in values {
        cmd.args(["--set", v]);
    }
    let out = run(&mut cmd);
    serde_yaml::Deserializer::from_str(&out)
        .filter_map(|d| serde::Deserialize::deserialize(d).ok())
        .filter(|v: &Value| v.is_object())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

#[test]
fn the_helm_chart_lints_and_renders_the_operator_from_its_values() {
    let chart = root().join("manifests/helm/caracal");
    let out = run(Command::new(tool("target/helm/bin/helm")).arg("lint").arg(&chart));
    assert!(out.contains("0 chart(s) failed"), "{out}");

    // Defaults: the release's image, every namespaced object in the release's namespace, the Installation
    // as a post-install hook.
    let r = Release::current();
    let objects = template(&[]);
    let deploy = find(&objects, "Deployment");
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["image"], r.operator_image());
    assert_eq!(pod["containers"][0]["resources"]["requests"]["cpu"], "50m");
    assert!(pod.get("imagePullSecrets").is_none());
    for o in &objects {
        let namespaced = !matches!(
            o["kind"].as_str(),
            Some("ClusterRole" | "ClusterRoleBinding" | "Installation")
        );
        if namespaced {
            assert_eq!(o["metadata"]["namespace"], "caracal-operator", "{o}");
        }
    }
    // The Installation is not a release object but the hook Job's input: a ConfigMap applied after install
    // and every upgrade (patched in place, never deleted and recreated).
    assert!(objects.iter().all(|o| o["kind"] != "Installation"));
    let config = find(&objects, "ConfigMap");
    let installation: Value = serde_yaml::from_str(
        config["data"]["installation.yaml"]
            .as_str()
            .expect("installation.yaml"),
    )
    .expect("the Installation parses");
    assert_eq!(installation["kind"], "Installation");
    assert_eq!(installation["metadata"]["name"], "default");
    assert_eq!(
        installation["spec"]["calicoNetwork"]["ipPools"][0]["cidr"],
        "10.244.0.0/16"
    );
    let jobs: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "Job").collect();
    let hook = |name: &str| {
        jobs.iter()
            .find(|j| j["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Job {name}"))
    };
    let apply = hook("caracal-apply-installation");
    assert_eq!(
        apply["metadata"]["annotations"]["helm.sh/hook"],
        "post-install,post-upgrade"
    );
    assert_eq!(
        apply["spec"]["template"]["spec"]["containers"][0]["command"][1],
        "apply-installation"
    );
    let uninstall = hook("caracal-uninstall");
    assert_eq!(uninstall["metadata"]["annotations"]["helm.sh/hook"], "pre-delete");
    assert_eq!(
        uninstall["spec"]["template"]["spec"]["containers"][0]["image"],
        r.operator_image()
    );

    // Values: another registry, path and tag, pull secrets, resources; no Installation.
    let objects = template(&[
        "image.registry=registry.example:5000",
        "image.imagePath=team",
        "image.tag=v9.9.9",
        "imagePullSecrets[0].name=regcred",
        "resources.limits.memory=256Mi",
        "installation.enabled=false",
    ]);
    let pod = &find(&objects, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["image"],
        "registry.example:5000/team/operator:v9.9.9"
    );
    assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(pod["containers"][0]["resources"]["limits"]["memory"], "256Mi");
    assert!(objects.iter().all(|o| o["kind"] != "ConfigMap"));
    assert!(
        objects
            .iter()
            .all(|o| o["metadata"]["name"] != "caracal-apply-installation")
    );
}
