//! The operator's other install paths on real nodes (real kubelet, containerd and runc), each starting from the
//! previous release (N-1, `make previous`: its own images, OLM bundle and chart, built from its commit) and
//! upgraded to this one while pods talk:
//!
//! - **OLM**: the real OLM installs N-1 from a catalog served by `opm` (a Subscription); the demo's real pods
//!   connect exactly as the policy matrix says; then a catalog with N (which `replaces` N-1) is published and
//!   OLM upgrades the operator in place, which upgrades what N-1 rendered.
//! - **Helm**: the real `helm` installs N-1's chart; the same checks; `helm upgrade` to this release's chart,
//!   which now also manages the Installation (its hook Job patches it in place).
//!
//! During each upgrade two probes connect pod to pod across the nodes (node 0 to node 1 and back) every
//! 100 ms, each a new TCP connection with an echo: none may fail (the longest gap is reported). After it: the
//! Installation, the caracal-node DaemonSet and the Typha Deployment are the same objects (UIDs), every agent,
//! Typha and the operator run this release's images, the agents were replaced node by node (never fewer than
//! all but one Ready), and connectivity still agrees with the matrix; how long policy writes are refused
//! while the operator (which serves their webhook) is replaced is reported. Uninstalling through each path
//! leaves nothing of Caracal but its CRDs: no Installation, nothing the operator rendered, no operator, no
//! webhook registration or webhook Secret (the garbage collector removes those with the operator's bindings).
//!
//! Needs root, `make runtime images olm helm previous`; `make test` builds them first.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

#[path = "common/matrix.rs"]
#[expect(
    dead_code,
    reason = "this test compares with the matrix; the shared connection helpers are for the others"
)]
mod matrix_probe;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::lab::{Lab, LabOptions, OPERATOR_NAMESPACE, OperatorInstall, PreviousRelease, Runtime};
use caracal_e2e::olm::{CatalogBundle, resource};
use caracal_e2e::probe::{Continuous, Report};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use matrix_probe::{agrees, recorded};

const VERSION: &str = env!("CARGO_PKG_VERSION");

async fn until<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) => assert!(start.elapsed() < deadline, "{what}: {e} (after {deadline:?})"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The release this one's OLM bundle `replaces`, as `make previous` built it.
fn previous() -> PreviousRelease {
    let csv: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(
            workspace_root()
                .join("manifests/olm")
                .join(VERSION)
                .join("manifests/caracal-operator.clusterserviceversion.yaml"),
        )
        .expect("this release's CSV"),
    )
    .expect("yaml");
    let replaces = csv["spec"]["replaces"]
        .as_str()
        .expect("this release's CSV replaces the one before it");
    let version = replaces
        .strip_prefix("caracal-operator.v")
        .expect("a Caracal CSV name");
    PreviousRelease::open(version).expect("the previous release")
}

/// The UID of `name`, None when there is none.
async fn uid_of<K>(api: Api<K>, name: &str) -> Result<Option<String>, String>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    Ok(api
        .get_opt(name)
        .await
        .map_err(|e| format!("{name}: {e}"))?
        .and_then(|o| o.meta().uid.clone()))
}

/// What an upgrade keeps and an uninstall removes, each by its UID (None: not there): the Installation, the
/// caracal-node DaemonSet, the Typha Deployment.
async fn rendered(lab: &Lab) -> Result<[(&'static str, Option<String>); 3], String> {
    let c = &lab.client;
    Ok([
        (
            "the Installation",
            uid_of(
                Api::<caracal_crds::installation::Installation>::all(c.clone()),
                "default",
            )
            .await?,
        ),
        (
            "the caracal-node DaemonSet",
            uid_of(
                Api::<DaemonSet>::namespaced(c.clone(), "caracal-system"),
                "caracal-node",
            )
            .await?,
        ),
        (
            "the Typha Deployment",
            uid_of(
                Api::<Deployment>::namespaced(c.clone(), "caracal-system"),
                "caracal-typha",
            )
            .await?,
        ),
    ])
}

/// Nothing of Caracal is left but its CRDs: none of [`rendered`], no operator Deployment, no webhook
/// registration (failurePolicy Fail: left behind it would refuse every write of the kinds it validates) or
/// webhook Secret, which go with the install that owned them.
async fn nothing_left(lab: &Lab) -> Result<(), String> {
    let c = &lab.client;
    let mut present = rendered(lab).await?.to_vec();
    present.extend([
        (
            "the operator",
            uid_of(
                Api::<Deployment>::namespaced(c.clone(), OPERATOR_NAMESPACE),
                "caracal-operator",
            )
            .await?,
        ),
        (
            "the webhook registration",
            uid_of(
                Api::<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration>::all(
                    c.clone(),
                ),
                "caracal-operator-webhook",
            )
            .await?,
        ),
        (
            "the webhook Secret",
            uid_of(
                Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), OPERATOR_NAMESPACE),
                "caracal-operator-webhook",
            )
            .await?,
        ),
    ]);
    match present.iter().find(|(_, uid)| uid.is_some()) {
        Some((what, _)) => Err(format!("{what} is still there")),
        None => Ok(()),
    }
}

async fn demo_agrees(lab: &Lab, what: &str) {
    lab.apply(&workspace_root().join("e2e/lab/demo.yaml"))
        .expect("apply the demo");
    lab.wait_pods(&["frontend", "backend", "data"])
        .await
        .expect("demo pods running");
    let measured = agrees(lab, what).await;
    assert!(measured.iter().any(|c| c["allowed"] == true));
    assert!(measured.iter().any(|c| c["allowed"] == false));
}

/// [`rendered`], which must all be there.
async fn uids(lab: &Lab) -> [(&'static str, String); 3] {
    rendered(lab)
        .await
        .expect("reading what the operator rendered")
        .map(|(what, uid)| (what, uid.unwrap_or_else(|| panic!("{what} is not there"))))
}

/// Two pods of their own in a namespace no policy selects, one on each node, serving an echo on 9000; a
/// [`Continuous`] probe from each to the other, every 100 ms.
async fn start_probes(lab: &Lab) -> Vec<(String, Continuous)> {
    let mut text = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: upgrade}\n");
    for i in 0..2 {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: upgrade}}\nspec:\n  nodeName: lab-node-{i}\n  containers: [{{name: c, image: caracal/echo:v{VERSION}, args: [\"9000/TCP\"], ports: [{{containerPort: 9000}}]}}]\n"
        ));
    }
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write pods");
    lab.apply(file.path()).expect("apply the probe's pods");
    lab.wait_pods(&["upgrade"])
        .await
        .expect("the probe's pods running");
    let mut probes = Vec::new();
    for (from, to) in [("upgrade/p0", "upgrade/p1"), ("upgrade/p1", "upgrade/p0")] {
        let netns = recorded(lab, from, "netns").await;
        let ip: std::net::Ipv4Addr = recorded(lab, to, "ip").await.parse().expect("ip");
        let probe = Continuous::start(
            &netns,
            (ip, 9000).into(),
            Duration::from_millis(100),
            Duration::from_secs(1),
        );
        probes.push((format!("{from} -> {to}"), probe));
    }
    // Both work before the upgrade starts (a probe that never worked would prove nothing).
    tokio::time::sleep(Duration::from_secs(2)).await;
    probes
}

/// Stops the probes; every connection must have worked.
fn finish_probes(probes: Vec<(String, Continuous)>, during: &str) {
    for (what, probe) in probes {
        let Report {
            attempts,
            failures,
            longest_gap,
            failed,
        } = probe.stop();
        println!(
            "probe {what} during {during}: {attempts} connections, {failures} failed, longest gap {longest_gap:?}"
        );
        assert!(attempts > 10, "{what}: the probe ran ({attempts} connections)");
        assert_eq!(
            failures, 0,
            "{what}: connections failed during {during} (longest gap {longest_gap:?}): {failed:?}"
        );
    }
}

/// Watches the caracal-node pods while an upgrade runs: the fewest Ready at any time it looked.
struct RollWatch {
    stop: Arc<AtomicBool>,
    fewest_ready: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    admission: tokio::task::JoinHandle<Admission>,
}

/// What a policy write (a server-side dry run, every 200 ms) met during the upgrade: the operator's
/// webhook (`failurePolicy: Fail`) refuses writes while no operator serves it. Reported, not asserted.
#[derive(Debug, Default)]
struct Admission {
    writes: u64,
    refused: u64,
    longest_refusal: Duration,
    first_error: Option<String>,
}

impl RollWatch {
    fn start(lab: &Lab) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let fewest_ready = Arc::new(AtomicUsize::new(usize::MAX));
        let api: Api<Pod> = Api::namespaced(lab.client.clone(), "caracal-system");
        let (flag, fewest) = (stop.clone(), fewest_ready.clone());
        let gnp = kube::discovery::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "caracal.dev",
            "v1",
            "GlobalNetworkPolicy",
        ));
        let policies: Api<DynamicObject> = Api::all_with(lab.client.clone(), &gnp);
        let admission_flag = stop.clone();
        let admission = tokio::spawn(async move {
            let obj: DynamicObject = serde_json::from_value(serde_json::json!({
                "apiVersion": "caracal.dev/v1", "kind": "GlobalNetworkPolicy",
                "metadata": {"name": "upgrade-dry-run"},
                "spec": {"selector": "app == 'x'", "types": ["Ingress"]},
            }))
            .expect("a policy");
            let params = kube::api::PostParams {
                dry_run: true,
                ..Default::default()
            };
            let mut seen = Admission::default();
            let mut refused_since: Option<Instant> = None;
            while !admission_flag.load(Ordering::Relaxed) {
                seen.writes += 1;
                match policies.create(&params, &obj).await {
                    Ok(_) => {
                        if let Some(t) = refused_since.take() {
                            seen.longest_refusal = seen.longest_refusal.max(t.elapsed());
                        }
                    }
                    Err(e) => {
                        seen.refused += 1;
                        refused_since.get_or_insert_with(Instant::now);
                        seen.first_error.get_or_insert_with(|| match e {
                            kube::Error::Api(s) => s.message,
                            e => e.to_string(),
                        });
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if let Some(t) = refused_since {
                seen.longest_refusal = seen.longest_refusal.max(t.elapsed());
            }
            seen
        });
        let task = tokio::spawn(async move {
            while !flag.load(Ordering::Relaxed) {
                if let Ok(list) = api
                    .list(&ListParams::default().labels("k8s-app=caracal-node"))
                    .await
                {
                    let ready = list.items.iter().filter(|p| pod_ready(p)).count();
                    fewest.fetch_min(ready, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self {
            stop,
            fewest_ready,
            task,
            admission,
        }
    }

    async fn finish(self) -> (usize, Admission) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let admission = self.admission.await.unwrap_or_default();
        (self.fewest_ready.load(Ordering::Relaxed), admission)
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The images of the pods labelled `selector` in `ns` when every one is Ready and runs only images tagged
/// `tag`; Err says what is not there yet.
async fn all_on(lab: &Lab, ns: &str, selector: &str, tag: &str, want: usize) -> Result<(), String> {
    let list = Api::<Pod>::namespaced(lab.client.clone(), ns)
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|e| e.to_string())?
        .items;
    if list.len() != want {
        return Err(format!("{} pods {selector} (want {want})", list.len()));
    }
    for p in &list {
        let images: Vec<String> = p
            .spec
            .iter()
            .flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()))
            .filter_map(|c| c.image.clone())
            .collect();
        if !images.iter().all(|i| i.ends_with(tag)) {
            return Err(format!("{} runs {images:?}", p.name_any()));
        }
        if !pod_ready(p) {
            return Err(format!("{} not Ready", p.name_any()));
        }
    }
    Ok(())
}

/// After an upgrade: the operator, every agent and Typha run this release, the same objects as before.
async fn upgraded(lab: &Lab, before: &[(&'static str, String); 3]) {
    let tag = format!(":v{VERSION}");
    until("the operator on this release", Duration::from_secs(240), || {
        all_on(lab, OPERATOR_NAMESPACE, "k8s-app=caracal-operator", &tag, 1)
    })
    .await;
    until("every agent on this release", Duration::from_secs(300), || {
        all_on(lab, "caracal-system", "k8s-app=caracal-node", &tag, 2)
    })
    .await;
    until("Typha on this release", Duration::from_secs(240), || async {
        let list = Api::<Pod>::namespaced(lab.client.clone(), "caracal-system")
            .list(&ListParams::default().labels("k8s-app=caracal-typha"))
            .await
            .map_err(|e| e.to_string())?;
        let n = list.items.len().max(1);
        all_on(lab, "caracal-system", "k8s-app=caracal-typha", &tag, n).await
    })
    .await;
    let after = uids(lab).await;
    for ((what, b), (_, a)) in before.iter().zip(&after) {
        assert_eq!(b, a, "{what} was recreated by the upgrade");
    }
}

/// An upgrade under way: what must survive it, the probes and the roll watch, started before the upgrade.
struct Upgrade {
    before: [(&'static str, String); 3],
    probes: Vec<(String, Continuous)>,
    roll: RollWatch,
    started: Instant,
}

impl Upgrade {
    /// N-1 runs (every agent on `prev_tag`, the demo equal to the matrix); records the UIDs, starts the probes
    /// and the roll watch.
    async fn begin(lab: &Lab, prev_tag: &str, how: &str) -> Self {
        until("the agents on N-1", Duration::from_secs(240), || {
            all_on(lab, "caracal-system", "k8s-app=caracal-node", prev_tag, 2)
        })
        .await;
        demo_agrees(lab, &format!("N-1 installed through {how}")).await;
        let before = uids(lab).await;
        let probes = start_probes(lab).await;
        let roll = RollWatch::start(lab);
        Upgrade {
            before,
            probes,
            roll,
            started: Instant::now(),
        }
    }

    /// Waits until everything runs this release (`step` took `stepped` of it: OLM's CSV, helm's command),
    /// then checks the probes, the roll and the matrix.
    async fn finish(self, lab: &Lab, what: &str, step: &str, stepped: Duration) {
        upgraded(lab, &self.before).await;
        let (fewest, admission) = self.roll.finish().await;
        println!(
            "{what}: {step} after {stepped:?}, every pod on v{VERSION} after {:?}, fewest agents Ready {fewest} of 2",
            self.started.elapsed()
        );
        println!(
            "{what}: policy writes (dry run) {} tried, {} refused, longest refusal {:?}; first refusal: {}",
            admission.writes,
            admission.refused,
            admission.longest_refusal,
            admission.first_error.as_deref().unwrap_or("none")
        );
        assert!(
            admission.refused < admission.writes,
            "the policy-write probe never got through: {:?}",
            admission.first_error
        );
        finish_probes(self.probes, what);
        assert!(
            fewest >= 1,
            "the agents were replaced node by node: at one time {fewest} of 2 were Ready"
        );
        agrees(lab, &format!("after {what}")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_previous_release_installs_through_olm_and_helm_and_upgrades_to_this_one_without_a_failed_connection()
 {
    assert!(nix::unistd::geteuid().is_root(), "needs root");
    let prev = previous();
    let prev_tag = format!(":v{}", prev.version);
    let installation = workspace_root().join("examples/installation-vxlan.yaml");

    // OLM: OLM's operators, a catalog of N-1's bundle, a Subscription.
    let mut opts = LabOptions::new(2, installation.clone());
    opts.runtime = Runtime::Containerd;
    opts.extra_images = vec![prev.images()];
    let prev_bundle = CatalogBundle {
        version: prev.version.clone(),
        dir: prev.bundle(),
        replaces: None,
    };
    opts.operator = OperatorInstall::Olm(vec![prev_bundle.clone()]);
    let mut lab = Lab::up(&opts).await.expect("the lab, N-1's operator through OLM");
    let client = lab.client.clone();
    let old_csv = format!("caracal-operator.v{}", prev.version);
    lab.olm
        .as_mut()
        .expect("OLM")
        .wait_installed(&client, OPERATOR_NAMESPACE, &old_csv, Duration::from_secs(120))
        .await
        .expect("N-1's CSV Succeeded");
    // Publish N beside N-1 (N replaces N-1): OLM upgrades the operator, the operator upgrades the rest.
    let upgrade = Upgrade::begin(&lab, &prev_tag, "OLM").await;
    let csv = format!("caracal-operator.v{VERSION}");
    let olm = lab.olm.as_mut().expect("OLM");
    let catalog = olm
        .write_catalog(&[prev_bundle, CatalogBundle::this_release(Some(old_csv.clone()))])
        .expect("the catalog with N");
    let addr = olm.serve(&catalog).await.expect("serve the catalog with N");
    olm.publish(&client, addr).await.expect("publish N");
    olm.wait_installed(&client, OPERATOR_NAMESPACE, &csv, Duration::from_secs(300))
        .await
        .expect("OLM upgraded to N");
    let csv_done = upgrade.started.elapsed();
    let what = format!("the OLM upgrade v{} -> v{VERSION}", prev.version);
    upgrade.finish(&lab, &what, "CSV Succeeded", csv_done).await;
    let old = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        OPERATOR_NAMESPACE,
        &resource("ClusterServiceVersion"),
    );
    until("N-1's CSV replaced", Duration::from_secs(120), || async {
        match old.get_opt(&old_csv).await {
            Ok(None) => Ok(()),
            Ok(Some(c)) => Err(format!("{old_csv} is {}", c.data["status"]["phase"])),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;

    // Uninstall through OLM: the Installation first (the operator removes what it rendered), then the
    // Subscription and the CSV (OLM removes the operator's Deployment); OLM leaves CRDs by design.
    let out = lab
        .cp
        .kubectl()
        .args(["delete", "installation", "default", "--timeout=180s"])
        .output()
        .expect("kubectl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for kind in ["Subscription", "ClusterServiceVersion"] {
        let name = if kind == "Subscription" {
            "caracal"
        } else {
            csv.as_str()
        };
        Api::<DynamicObject>::namespaced_with(client.clone(), OPERATOR_NAMESPACE, &resource(kind))
            .delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete {kind} {name}: {e}"));
    }
    until(
        "nothing left after the OLM uninstall",
        Duration::from_secs(180),
        || nothing_left(&lab),
    )
    .await;
    lab.down();

    // Helm: N-1's chart.
    let mut opts = LabOptions::new(2, installation);
    opts.runtime = Runtime::Containerd;
    opts.extra_images = vec![prev.images()];
    opts.operator = OperatorInstall::Helm {
        chart: prev.chart(),
        values: Vec::new(),
    };
    let lab = Lab::up(&opts)
        .await
        .expect("the lab, N-1's operator through helm");
    // `helm upgrade` to this release's chart, which now manages the Installation too (the lab's own spec as
    // the chart's values): its hook Job applies it in place.
    let upgrade = Upgrade::begin(&lab, &prev_tag, "helm").await;
    let example: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&opts.installation).expect("example")).expect("yaml");
    let values = tempfile::NamedTempFile::new().expect("values file");
    std::fs::write(
        values.path(),
        serde_yaml::to_string(&serde_json::json!({
            "installation": {"enabled": true, "spec": example["spec"]},
        }))
        .expect("yaml"),
    )
    .expect("write values");
    let out = caracal_e2e::lab::helm(&lab.cp)
        .args(["upgrade", "caracal"])
        .arg(workspace_root().join("manifests/helm/caracal"))
        .args([
            "--namespace",
            OPERATOR_NAMESPACE,
            "--wait",
            "--timeout",
            "5m",
            "-f",
        ])
        .arg(values.path())
        .output()
        .expect("helm");
    assert!(
        out.status.success(),
        "helm upgrade: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let helm_done = upgrade.started.elapsed();
    let what = format!("helm upgrade v{} -> v{VERSION}", prev.version);
    upgrade.finish(&lab, &what, "helm returned", helm_done).await;
    let managers: Vec<String> = Api::<caracal_crds::installation::Installation>::all(lab.client.clone())
        .get("default")
        .await
        .expect("Installation after the upgrade")
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().any(|m| m == "caracal-chart"),
        "the hook Job did not apply it: {managers:?}"
    );
    let out = caracal_e2e::lab::helm(&lab.cp)
        .args([
            "uninstall",
            "caracal",
            "--namespace",
            OPERATOR_NAMESPACE,
            "--wait",
            "--timeout",
            "5m",
        ])
        .output()
        .expect("helm");
    assert!(
        out.status.success(),
        "helm uninstall: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    until(
        "nothing left after helm uninstall",
        Duration::from_secs(120),
        || nothing_left(&lab),
    )
    .await;
    lab.down();
}
