//! Cluster tier: the operator's controller, in-process, against the real kube-apiserver.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use caracal_crds::felix::FelixConfiguration;
use caracal_crds::installation::Installation;
use caracal_e2e::controlplane::{ControlPlane, Options};
use caracal_operator::controller::{self, Context};
use caracal_operator::metrics::Metrics;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// Generous for a loaded 2-core machine; the figures that matter are measured in `make bench`.
const DEADLINE: Duration = Duration::from_secs(30);
const NS: &str = "caracal-system";

struct Running {
    _cp: ControlPlane,
    client: Client,
    ctx: Arc<Context>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

async fn operator() -> Running {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "caracal_operator=info".into()),
        )
        .with_test_writer()
        .try_init();
    let (cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let ctx = Arc::new(Context::new(client.clone(), Arc::new(Metrics::default())));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(ctx.clone(), async move {
        let _ = rx.await;
    }));
    Running {
        _cp: cp,
        client,
        ctx,
        stop: Some(tx),
        task: Some(task),
    }
}

async fn apply_installation(client: &Client, spec: serde_json::Value) {
    let api: Api<Installation> = Api::all(client.clone());
    let body = json!({"apiVersion": "operator.caracal.dev/v1", "kind": "Installation", "metadata": {"name": "default"}, "spec": spec});
    api.patch(
        "default",
        &PatchParams::apply("test-user").force(),
        &Patch::Apply(&body),
    )
    .await
    .expect("apply Installation");
}

/// A finalizer of the tests' own, which holds an Installation after the operator's cleanup.
const HOLD: &str = "test.caracal.dev/hold";

/// Sets the finalizers of the Installation `default`.
async fn set_finalizers(insts: &Api<Installation>, finalizers: Vec<String>) {
    insts
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"finalizers": finalizers}})),
        )
        .await
        .expect("set the finalizers");
}

/// Applies the default Installation and waits for the operator to render the caracal-node DaemonSet.
async fn install_default(client: &Client) -> DaemonSet {
    apply_installation(client, json!({})).await;
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    eventually("the DaemonSet", || {
        let d = daemonsets.clone();
        async move { d.get_opt("caracal-node").await.ok().flatten() }
    })
    .await
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn condition(client: &Client, type_: &str) -> Option<(String, String, String)> {
    let inst = Api::<Installation>::all(client.clone())
        .get_opt("default")
        .await
        .ok()??;
    let c = inst.status?.conditions.into_iter().find(|c| c.type_ == type_)?;
    Some((c.status, c.reason, c.message))
}

const RENDERED: &[(&str, &str)] = &[
    ("ServiceAccount", "caracal-node"),
    ("ServiceAccount", "caracal-typha"),
    ("ConfigMap", "caracal-cni-config"),
    ("ConfigMap", "caracal-typha-ca"),
    ("Secret", "caracal-node-certs"),
    ("Secret", "caracal-typha-certs"),
    ("Secret", "caracal-ca"),
    ("DaemonSet", "caracal-node"),
    ("Deployment", "caracal-typha"),
    ("Service", "caracal-typha"),
    ("PodDisruptionBudget", "caracal-typha"),
];

/// The caracal-node DaemonSet's resourceVersion (what an invalid edit must leave unchanged).
async fn ds_version(client: &Client) -> Option<String> {
    Api::<DaemonSet>::namespaced(client.clone(), NS)
        .get("caracal-node")
        .await
        .expect("ds")
        .resource_version()
}

async fn exists(client: &Client, kind: &str, name: &str) -> bool {
    let ar = caracal_operator::apply::resource(
        match kind {
            "DaemonSet" | "Deployment" => "apps/v1",
            "PodDisruptionBudget" => "policy/v1",
            "ClusterRole" | "ClusterRoleBinding" => "rbac.authorization.k8s.io/v1",
            "IPPool" | "FelixConfiguration" => "caracal.dev/v1",
            _ => "v1",
        },
        kind,
    );
    let namespaced = !matches!(
        kind,
        "ClusterRole" | "ClusterRoleBinding" | "IPPool" | "FelixConfiguration"
    );
    let api: Api<kube::api::DynamicObject> = if namespaced {
        Api::namespaced_with(client.clone(), NS, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    };
    api.get_opt(name).await.ok().flatten().is_some()
}

#[tokio::test]
async fn an_installation_becomes_every_object_and_reports_progressing() {
    let op = operator().await;
    apply_installation(
        &op.client,
        json!({"calicoNetwork": {"ipPools": [{"cidr": "10.244.0.0/16"}]}}),
    )
    .await;
    let client = op.client.clone();
    eventually("Progressing=True", || {
        let client = client.clone();
        async move { condition(&client, "Progressing").await.filter(|c| c.0 == "True") }
    })
    .await;
    for (kind, name) in RENDERED {
        assert!(exists(&op.client, kind, name).await, "{kind} {name} missing");
    }
    for (kind, name) in [
        ("ClusterRole", "caracal-node"),
        ("ClusterRoleBinding", "caracal-typha"),
        ("IPPool", "default-ipv4-ippool"),
        ("FelixConfiguration", "default"),
    ] {
        assert!(exists(&op.client, kind, name).await, "{kind} {name} missing");
    }
    let inst = Api::<Installation>::all(op.client.clone())
        .get("default")
        .await
        .expect("get");
    assert_eq!(
        inst.spec.calico_network.as_ref().and_then(|n| n.linux_dataplane),
        None,
        "defaults never go into spec"
    );
    let computed = inst
        .status
        .as_ref()
        .and_then(|s| s.computed.as_ref())
        .expect("status.computed");
    let pool = &computed
        .calico_network
        .as_ref()
        .expect("network")
        .ip_pools
        .as_ref()
        .expect("pools")[0];
    assert_eq!(pool.block_size, Some(26));
    assert!(
        inst.status
            .as_ref()
            .expect("status")
            .conditions
            .iter()
            .all(|c| c.observed_generation == inst.metadata.generation)
    );
    assert!(inst.finalizers().contains(&controller::FINALIZER.to_owned()));
    op.stop().await;
}

#[tokio::test]
async fn drift_is_repaired_invalid_edits_change_nothing_and_user_felix_fields_survive() {
    let op = operator().await;
    let c = op.client.clone();
    apply_installation(
        &c,
        json!({"calicoNetwork": {"ipPools": [{"cidr": "10.244.0.0/16"}]}}),
    )
    .await;
    let services: Api<Service> = Api::namespaced(c.clone(), NS);
    let daemonsets: Api<DaemonSet> = Api::namespaced(c.clone(), NS);
    eventually("the DaemonSet and the Service", || {
        let (d, s) = (daemonsets.clone(), services.clone());
        async move {
            d.get_opt("caracal-node").await.ok().flatten()?;
            s.get_opt("caracal-typha").await.ok().flatten()
        }
    })
    .await;

    // Drift: a deleted Service and an edited DaemonSet come back.
    services
        .delete("caracal-typha", &DeleteParams::default())
        .await
        .expect("delete service");
    let edit = json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "spec": {"template": {"spec": {"containers": [{"name": "caracal-node", "image": "evil/node:latest"}]}}}});
    daemonsets
        .patch(
            "caracal-node",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(&edit),
        )
        .await
        .expect("edit DS");
    let t = Instant::now();
    eventually("Service and DaemonSet restored", || {
        let (s, d) = (services.clone(), daemonsets.clone());
        async move {
            let svc = s.get_opt("caracal-typha").await.ok().flatten()?;
            let ds = d.get("caracal-node").await.ok()?;
            let image = ds
                .spec?
                .template
                .spec?
                .containers
                .into_iter()
                .find(|c| c.name == "caracal-node")?
                .image?;
            (image.starts_with("caracal/node:") && svc.metadata.deletion_timestamp.is_none()).then_some(())
        }
    })
    .await;
    eprintln!("drift repaired in {:?}", t.elapsed());

    // A user's own FelixConfiguration field survives reconciles; the operator's fields stay the operator's.
    let felix: Api<FelixConfiguration> = Api::all(c.clone());
    let mine = json!({"apiVersion": "caracal.dev/v1", "kind": "FelixConfiguration", "metadata": {"name": "default"}, "spec": {"logSeverityScreen": "Debug", "routeRefreshInterval": "30s"}});
    felix
        .patch("default", &PatchParams::apply("a-user"), &Patch::Apply(&mine))
        .await
        .expect("user edit");
    // Force a reconcile (a Node appears) and check the user's fields are still there afterwards.
    Api::<Node>::all(c.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}})).expect("node"),
        )
        .await
        .expect("node");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let f = felix.get("default").await.expect("felix");
    assert_eq!(
        f.spec.log_severity_screen,
        Some(caracal_crds::felix::LogSeverity::Debug)
    );
    assert_eq!(
        f.spec.route_refresh_interval.as_ref().map(|d| d.0.as_str()),
        Some("30s")
    );
    assert_eq!(f.spec.bpf_enabled, Some(false), "operator-owned field still set");

    // An invalid edit: Degraded with the message, and nothing that runs changes.
    let ds_before = ds_version(&c).await;
    let cm_before = Api::<ConfigMap>::namespaced(c.clone(), NS)
        .get("caracal-cni-config")
        .await
        .expect("cm")
        .resource_version();
    apply_installation(&c, json!({"calicoNetwork": {"bgp": "Disabled", "ipPools": [{"cidr": "10.244.0.0/16", "encapsulation": "IPIP"}]}})).await;
    let (_, reason, message) = eventually("Degraded=True", || {
        let c = c.clone();
        async move { condition(&c, "Degraded").await.filter(|d| d.0 == "True") }
    })
    .await;
    assert_eq!(reason, "EncapsulationNeedsBGP");
    assert!(
        message.contains("spec.calicoNetwork.ipPools[0].encapsulation")
            && message.contains("set calicoNetwork.bgp to Enabled"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ds_version(&c).await, ds_before, "DaemonSet changed");
    let cm_after = Api::<ConfigMap>::namespaced(c.clone(), NS)
        .get("caracal-cni-config")
        .await
        .expect("cm")
        .resource_version();
    assert_eq!(cm_after, cm_before, "CNI config changed");
    let inst = Api::<Installation>::all(c.clone())
        .get("default")
        .await
        .expect("inst");
    let kept = inst
        .status
        .and_then(|s| s.computed)
        .and_then(|c| c.calico_network)
        .and_then(|n| n.ip_pools)
        .expect("pools");
    assert_eq!(
        kept[0].encapsulation,
        Some(caracal_crds::installation::Encapsulation::VXLAN),
        "status.computed keeps the last valid spec"
    );
    op.stop().await;
}

/// Write requests the API server has served for the resources the operator owns (its own count, from
/// `/metrics`).
async fn server_side_writes(client: &Client) -> u64 {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new()).expect("request"))
        .await
        .expect("metrics");
    let owned = [
        "daemonsets",
        "deployments",
        "services",
        "configmaps",
        "secrets",
        "serviceaccounts",
        "clusterroles",
        "clusterrolebindings",
        "poddisruptionbudgets",
        "ippools",
        "felixconfigurations",
        "installations",
        "namespaces",
    ];
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            ["APPLY", "PATCH", "POST", "PUT", "DELETE"]
                .iter()
                .any(|v| l.contains(&format!("verb=\"{v}\"")))
        })
        .filter(|l| owned.iter().any(|r| l.contains(&format!("resource=\"{r}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test]
async fn a_steady_state_reconcile_makes_no_write_request() {
    let op = operator().await;
    let c = op.client.clone();
    apply_installation(&c, json!({})).await;
    eventually("Progressing=True", || {
        let c = c.clone();
        async move { condition(&c, "Progressing").await.filter(|p| p.0 == "True") }
    })
    .await;
    // Let the first rounds settle (status written, watches delivered).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let nodes: Api<Node> = Api::all(c.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}})).expect("node"),
        )
        .await
        .expect("node");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes_before = server_side_writes(&c).await;
    assert!(
        writes_before > 10,
        "the counter sees the operator's first writes ({writes_before})"
    );
    let reconciles_before = reconcile_count(&op).await;
    // Each label edit on the Node triggers a reconcile whose inputs are unchanged.
    for i in 0..5 {
        let patch = json!({"metadata": {"labels": {"touch": i.to_string()}}});
        nodes
            .patch("n1", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("touch node");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reconciles = reconcile_count(&op).await - reconciles_before;
    let writes = server_side_writes(&c).await - writes_before;
    assert!(
        reconciles >= 3,
        "expected the node edits to trigger reconciles, saw {reconciles}"
    );
    assert_eq!(
        writes, 0,
        "{reconciles} steady-state reconciles made {writes} write requests"
    );
    op.stop().await;
}

async fn reconcile_count(op: &Running) -> u64 {
    let mut registry = prometheus_client::registry::Registry::default();
    op.ctx.metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    text.lines()
        .find(|l| l.starts_with("caracal_operator_reconciles_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn deleting_the_installation_removes_what_was_rendered_and_does_not_hang() {
    let op = operator().await;
    let c = op.client.clone();
    install_default(&c).await;
    // A second finalizer of the test's own holds the object after the operator's cleanup, so the status
    // the operator writes while uninstalling can be read.
    let insts: Api<Installation> = Api::all(c.clone());
    let mut finalizers = insts.get("default").await.expect("get").finalizers().to_vec();
    finalizers.push(HOLD.into());
    set_finalizers(&insts, finalizers).await;
    insts
        .delete("default", &DeleteParams::default())
        .await
        .expect("delete");
    let held = eventually("the operator's finalizer released", || {
        let i = insts.clone();
        async move {
            let inst = i.get("default").await.ok()?;
            (!inst.finalizers().iter().any(|f| f == controller::FINALIZER)).then_some(inst)
        }
    })
    .await;
    let uninstalling = held
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Progressing")
        .expect("Progressing");
    assert_eq!(uninstalling.reason, "Uninstalling");
    assert!(
        uninstalling.message.contains("released after at most"),
        "{}",
        uninstalling.message
    );
    set_finalizers(&insts, Vec::new()).await;
    eventually("the Installation gone", || {
        let c = c.clone();
        async move {
            Api::<Installation>::all(c)
                .get_opt("default")
                .await
                .ok()
                .and_then(|o| o.is_none().then_some(()))
        }
    })
    .await;
    for (kind, name) in [
        ("DaemonSet", "caracal-node"),
        ("Deployment", "caracal-typha"),
        ("ClusterRole", "caracal-node"),
        ("IPPool", "default-ipv4-ippool"),
    ] {
        assert!(!exists(&c, kind, name).await, "{kind} {name} still there");
    }
    op.stop().await;
}

#[tokio::test]
async fn two_operator_replicas_never_both_act_and_the_standby_takes_over() {
    use caracal_operator::leader::{Elector, Timings};
    let (_cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let timings = Timings {
        lease_duration: Duration::from_secs(4),
        renew_period: Duration::from_millis(500),
        renew_deadline: Duration::from_secs(3),
    };
    let replica = |id: &str| {
        let ctx = Arc::new(Context::new(client.clone(), Arc::new(Metrics::default())));
        let elector = Elector::new(client.clone(), "default", "caracal-operator", id, timings);
        let task = tokio::spawn(controller::run_elected(
            ctx.clone(),
            elector,
            std::future::pending(),
        ));
        (ctx, task)
    };
    let (a, a_task) = replica("replica-a");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (b, b_task) = replica("replica-b");
    apply_installation(&client, json!({})).await;
    let count = |ctx: &Arc<Context>| {
        let mut registry = prometheus_client::registry::Registry::default();
        ctx.metrics.register(&mut registry);
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text.lines()
            .find(|l| l.starts_with("caracal_operator_reconciles_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    eventually("the leader reconciles", || {
        let c = client.clone();
        async move { condition(&c, "Progressing").await }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(count(&a) > 0, "the first replica leads");
    assert_eq!(
        count(&b),
        0,
        "the standby must not reconcile while the leader holds the lease"
    );

    // The leader dies without releasing: the standby waits out the lease, then acts.
    a_task.abort();
    let died = Instant::now();
    let b_ref = b.clone();
    eventually("the standby takes over", || {
        let n = count(&b_ref);
        async move { (n > 0).then_some(()) }
    })
    .await;
    assert!(
        died.elapsed() >= Duration::from_secs(3),
        "took over before the lease could expire"
    );
    let lease: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), "default");
    let holder = lease
        .get("caracal-operator")
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some("replica-b"));
    b_task.abort();
}

#[tokio::test]
async fn the_install_manifest_applies_and_its_rbac_is_enough_to_run_the_operator() {
    let cp = ControlPlane::start(Options::api_only())
        .await
        .expect("control plane");
    let admin = cp.client().await.expect("client");
    let manifest = caracal_e2e::controlplane::workspace_root().join("manifests/operator");
    let out = cp
        .kubectl()
        .args(["apply", "-f"])
        .arg(&manifest)
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl apply -f manifests/operator: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Act as the operator's ServiceAccount, with a token from the TokenRequest API.
    let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(admin.clone(), "caracal-operator");
    let req = serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
        .expect("token request");
    let token = sa
        .create_token_request("caracal-operator", &PostParams::default(), &req)
        .await
        .expect("token");
    let token = token.status.expect("token status").token;
    let client = cp.client_with_token(&token).await.expect("token client");

    // Everything the binary does at start and in a reconcile, with those rights only.
    caracal_operator::crds::ensure(&client)
        .await
        .expect("the operator installs CRDs with its own RBAC");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let endpoint = caracal_operator::webhook::Endpoint::Url(format!("https://127.0.0.1:{port}/validate"));
    let listen = format!("127.0.0.1:{port}").parse().expect("addr");
    let hook = caracal_operator::webhook::start(&client, "caracal-operator", listen, &endpoint)
        .await
        .expect("the webhook starts with the operator's own RBAC");
    // Its registration belongs to the manifest's ClusterRoleBinding and its Secret to the ServiceAccount, so
    // that deleting the install removes them (the garbage collector; realnode_install shows it).
    let uid_of = |v: Option<String>| v.expect("uid");
    let binding = uid_of(
        Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(admin.clone())
            .get("caracal-operator")
            .await
            .expect("the manifest's ClusterRoleBinding")
            .metadata
            .uid,
    );
    let account = uid_of(
        sa.get("caracal-operator")
            .await
            .expect("ServiceAccount")
            .metadata
            .uid,
    );
    let owners = |refs: Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
        refs.unwrap_or_default()
            .into_iter()
            .map(|o| (o.kind, o.uid))
            .collect::<Vec<_>>()
    };
    let registration =
        Api::<k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration>::all(
            admin.clone(),
        )
        .get(caracal_operator::webhook::NAME)
        .await
        .expect("the registration");
    assert_eq!(
        owners(registration.metadata.owner_references),
        vec![("ClusterRoleBinding".to_owned(), binding)],
        "the registration is owned by the binding of the operator's ServiceAccount, and only by it"
    );
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), "caracal-operator")
        .get(caracal_operator::webhook::NAME)
        .await
        .expect("the webhook Secret");
    assert_eq!(
        owners(secret.metadata.owner_references),
        vec![("ServiceAccount".to_owned(), account)],
        "the webhook Secret is owned by the operator's ServiceAccount"
    );
    let elector = caracal_operator::leader::Elector::new(
        client.clone(),
        "caracal-operator",
        "caracal-operator",
        "sa-test",
        Default::default(),
    );
    let ctx = Arc::new(Context::new(client.clone(), Arc::new(Metrics::default())));
    let task = tokio::spawn(controller::run_elected(ctx, elector, std::future::pending()));
    apply_installation(&admin, json!({})).await;
    eventually("Progressing=True under the operator's own RBAC", || {
        let c = admin.clone();
        async move { condition(&c, "Progressing").await.filter(|p| p.0 == "True") }
    })
    .await;
    for (kind, name) in RENDERED {
        assert!(exists(&admin, kind, name).await, "{kind} {name} missing");
    }
    // And it may not do what it was not given: reading pods is not in its role.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::all(client.clone());
    assert!(matches!(pods.list(&Default::default()).await, Err(kube::Error::Api(s)) if s.code == 403));
    task.abort();
    hook.abort();
}

#[tokio::test]
async fn the_webhook_rejects_bad_selectors_overlapping_pools_and_missing_tiers() {
    use caracal_operator::webhook::{self, Endpoint};
    let (_cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let endpoint = Endpoint::Url(format!("https://127.0.0.1:{port}{}", webhook::PATH));
    let task = webhook::start(&client, "default", addr, &endpoint)
        .await
        .expect("webhook");

    let create = |doc: serde_json::Value| {
        let client = client.clone();
        async move {
            let obj: kube::api::DynamicObject = serde_json::from_value(doc).expect("object");
            let api = caracal_e2e::crds::api_for(&client, &obj).expect("kind");
            api.create(&PostParams::default(), &obj).await.map(|_| ())
        }
    };
    let message = |r: Result<(), kube::Error>| match r {
        Err(kube::Error::Api(s)) => s.message,
        other => panic!("expected a rejection, got {other:?}"),
    };
    // The webhook may take a moment to answer after registration.
    let pool = |name: &str, cidr: &str| json!({"apiVersion": "caracal.dev/v1", "kind": "IPPool", "metadata": {"name": name}, "spec": {"cidr": cidr}});
    eventually("the webhook admits a valid pool", || {
        let c = create(pool("first", "10.0.0.0/16"));
        async move { c.await.ok() }
    })
    .await;

    let msg = message(create(pool("second", "10.0.128.0/20")).await);
    assert!(
        msg.contains("spec.cidr: 10.0.128.0/20 overlaps IPPool \"first\" (10.0.0.0/16)"),
        "{msg}"
    );
    create(pool("third", "10.1.0.0/16"))
        .await
        .expect("a pool next to it is fine");

    let gnp = |spec: serde_json::Value| json!({"apiVersion": "caracal.dev/v1", "kind": "GlobalNetworkPolicy", "metadata": {"name": "p"}, "spec": spec});
    let msg = message(create(gnp(json!({"selector": "app == 'web' && tier = 'x'"}))).await);
    assert!(
        msg.contains("spec.selector: at character 22: expected an operator"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("app == 'web' && tier = 'x'\n{}^", " ".repeat(2 + 21))),
        "{msg}"
    );
    let msg = message(
        create(gnp(
            json!({"ingress": [{"action": "Allow", "source": {"selector": "has(app"}}]}),
        ))
        .await,
    );
    assert!(
        msg.contains("spec.ingress[0].source.selector: at character 8"),
        "{msg}"
    );
    let msg = message(create(gnp(json!({"tier": "security", "selector": "all()"}))).await);
    assert!(
        msg.contains("spec.tier: tier \"security\" does not exist"),
        "{msg}"
    );

    let tier = json!({"apiVersion": "caracal.dev/v1", "kind": "Tier", "metadata": {"name": "security"}, "spec": {"order": 100}});
    create(tier).await.expect("tier");
    create(gnp(json!({"tier": "security", "selector": "app == 'web'"})))
        .await
        .expect("a valid policy in an existing tier");
    task.abort();
}

/// An upgrade from the release whose render is `fixture` (under tests/fixtures, its images tagged `old_tag`):
/// its objects are applied as its operator left them (same field manager), this release's operator starts on
/// the same Installation (examples/installation-vxlan.yaml), and the DaemonSet is returned once its image is
/// no longer `old_tag`'s, with the UIDs the DaemonSet and the Typha Deployment had before.
struct Upgraded {
    _cp: ControlPlane,
    client: Client,
    old_uids: (String, String),
    migrated: DaemonSet,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// The image of the first container of a pod template.
fn first_image(template: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>) -> Option<String> {
    template?.spec.as_ref()?.containers.first()?.image.clone()
}

async fn upgrade_from(fixture: &str, old_tag: &str) -> Upgraded {
    let (cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(fixture),
    )
    .expect("fixture");
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}});
    let ns_api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    ns_api
        .patch(NS, &PatchParams::apply("caracal-operator"), &Patch::Apply(&ns))
        .await
        .expect("namespace");
    for de in serde_yaml::Deserializer::from_str(&text) {
        let doc: serde_json::Value = serde::Deserialize::deserialize(de).expect("yaml");
        let kind = doc["kind"].as_str().expect("kind");
        let ar = caracal_operator::apply::resource(doc["apiVersion"].as_str().expect("apiVersion"), kind);
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), NS, &ar);
        let name = doc["metadata"]["name"].as_str().expect("name");
        api.patch(name, &PatchParams::apply("caracal-operator"), &Patch::Apply(&doc))
            .await
            .unwrap_or_else(|e| panic!("previous {kind} {name}: {e}"));
    }
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), NS);
    let old_uids = (
        daemonsets
            .get("caracal-node")
            .await
            .expect("old DS")
            .uid()
            .expect("uid"),
        deployments
            .get("caracal-typha")
            .await
            .expect("old Deployment")
            .uid()
            .expect("uid"),
    );

    // The new operator starts on the same Installation.
    let ctx = Arc::new(Context::new(client.clone(), Arc::new(Metrics::default())));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(ctx, async move {
        let _ = rx.await;
    }));
    let example: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/installation-vxlan.yaml"
        ))
        .expect("example"),
    )
    .expect("yaml");
    apply_installation(&client, example["spec"].clone()).await;
    let old_suffix = format!(":{old_tag}");
    let migrated = eventually("the DaemonSet migrated", || {
        let d = daemonsets.clone();
        let old_suffix = old_suffix.clone();
        async move {
            let ds = d.get("caracal-node").await.ok()?;
            let image = first_image(ds.spec.as_ref().map(|s| &s.template))?;
            (!image.ends_with(&old_suffix)).then_some(ds)
        }
    })
    .await;
    Upgraded {
        _cp: cp,
        client,
        old_uids,
        migrated,
        stop,
        task,
    }
}

impl Upgraded {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// The real previous release: v0.1.0's render (its golden file) is adopted in place, the DaemonSet and the
/// Typha Deployment keep their UIDs and take this release's images.
#[tokio::test]
async fn the_previous_releases_render_is_adopted_and_migrated_in_place() {
    let previous = caracal_operator::install::PREVIOUS_RELEASE.expect("a previous release");
    let up = upgrade_from(&format!("release-{previous}.yaml"), &format!("v{previous}")).await;
    let tag = concat!(":v", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        up.migrated.uid().as_deref(),
        Some(up.old_uids.0.as_str()),
        "the DaemonSet was replaced instead of updated in place"
    );
    let images: Vec<String> = up
        .migrated
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|p| {
            p.containers
                .iter()
                .chain(p.init_containers.iter().flatten())
                .filter_map(|c| c.image.clone())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !images.is_empty() && images.iter().all(|i| i.ends_with(tag)),
        "every container of the agent runs this release: {images:?}"
    );
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(up.client.clone(), NS);
    let typha = eventually("Typha migrated", || {
        let d = deployments.clone();
        async move {
            let dep = d.get("caracal-typha").await.ok()?;
            let image = first_image(dep.spec.as_ref().map(|s| &s.template))?;
            image.ends_with(tag).then_some(dep)
        }
    })
    .await;
    assert_eq!(
        typha.uid().as_deref(),
        Some(up.old_uids.1.as_str()),
        "the Typha Deployment was replaced instead of updated in place"
    );
    up.stop().await;
}

/// What a release stopped rendering goes: an env var leaves the DaemonSet and an obsolete ConfigMap is
/// pruned (a synthetic older release: no real one has dropped anything yet).
#[tokio::test]
async fn what_an_older_release_rendered_and_this_one_does_not_is_pruned_in_place() {
    let up = upgrade_from("synthetic-older-release.yaml", "v0.0.9").await;
    assert_eq!(
        up.migrated.uid().as_deref(),
        Some(up.old_uids.0.as_str()),
        "the DaemonSet was replaced instead of updated in place"
    );
    let env: Vec<String> = up
        .migrated
        .spec
        .clone()
        .and_then(|s| s.template.spec)
        .expect("pod spec")
        .containers[0]
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        env.contains(&"CARACAL_CNI_SOCKET".to_owned()),
        "new env set: {env:?}"
    );
    assert!(
        !env.contains(&"CARACAL_LEGACY_FELIX".to_owned()),
        "the old release's env var is gone: {env:?}"
    );
    let configmaps: Api<ConfigMap> = Api::namespaced(up.client.clone(), NS);
    eventually("the obsolete ConfigMap pruned", || {
        let c = configmaps.clone();
        async move {
            c.get_opt("caracal-node-config")
                .await
                .ok()
                .and_then(|o| o.is_none().then_some(()))
        }
    })
    .await;
    up.stop().await;
}

#[tokio::test]
async fn a_pool_that_still_holds_addresses_is_kept_and_reported_and_degraded_raises_an_event() {
    let op = operator().await;
    let c = op.client.clone();
    apply_installation(
        &c,
        json!({"calicoNetwork": {"ipPools": [{"name": "old", "cidr": "10.244.0.0/16"}]}}),
    )
    .await;
    let pools: Api<caracal_crds::ippool::IPPool> = Api::all(c.clone());
    eventually("pool old", || {
        let p = pools.clone();
        async move { p.get_opt("old").await.ok().flatten() }
    })
    .await;
    // A node holds one address from a block of the old pool.
    let mut allocations = vec![serde_json::Value::Null; 64];
    allocations[0] = json!(0);
    let block = json!({"apiVersion": "caracal.dev/v1", "kind": "IPAMBlock", "metadata": {"name": "10-244-0-0-26"},
        "spec": {"cidr": "10.244.0.0/26", "affinity": "host:n1", "allocations": allocations, "unallocated": (1..64).collect::<Vec<u32>>(),
                 "attributes": [{"handle_id": "pod-a", "secondary": {"namespace": "default", "pod": "a"}}]}});
    let blocks: Api<caracal_crds::ipam::IPAMBlock> = Api::all(c.clone());
    blocks
        .create(
            &PostParams::default(),
            &serde_json::from_value(block).expect("block"),
        )
        .await
        .expect("block");

    apply_installation(
        &c,
        json!({"calicoNetwork": {"ipPools": [{"name": "new", "cidr": "10.250.0.0/16"}]}}),
    )
    .await;
    let (_, reason, message) = eventually("Degraded=True PoolInUse", || {
        let c = c.clone();
        async move { condition(&c, "Degraded").await.filter(|d| d.0 == "True") }
    })
    .await;
    assert_eq!(reason, "PoolInUse");
    assert!(message.contains("old"), "{message}");
    assert!(
        pools.get_opt("old").await.expect("get").is_some(),
        "a pool with allocations was deleted"
    );
    assert!(pools.get_opt("new").await.expect("get").is_some());

    // Once the address is released, the pool goes and the Installation is no longer Degraded.
    blocks
        .delete("10-244-0-0-26", &DeleteParams::default())
        .await
        .expect("release");
    let nodes: Api<Node> = Api::all(c.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "nudge"}})).expect("node"),
        )
        .await
        .expect("node");
    eventually("pool old pruned", || {
        let p = pools.clone();
        async move {
            p.get_opt("old")
                .await
                .ok()
                .and_then(|o| o.is_none().then_some(()))
        }
    })
    .await;

    // An invalid edit raises a Warning Event on the Installation with the reason.
    apply_installation(&c, json!({"calicoNetwork": {"bgp": "Disabled", "ipPools": [{"cidr": "10.250.0.0/16", "encapsulation": "IPIPCrossSubnet"}]}})).await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(c.clone(), "default");
    let ev = eventually("a Warning event", || {
        let e = events.clone();
        async move {
            e.list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("EncapsulationNeedsBGP"))
        }
    })
    .await;
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.regarding.and_then(|r| r.kind).as_deref(), Some("Installation"));
    assert!(
        ev.note
            .unwrap_or_default()
            .contains("set calicoNetwork.bgp to Enabled")
    );
    op.stop().await;
}

/// The operator's namespace in these tests (`POD_NAMESPACE` is unset, so the default).
const OPERATOR_NS: &str = "caracal-operator";

fn pull_secret(name: &str, type_: &str, config: &str) -> k8s_openapi::api::core::v1::Secret {
    let key = if type_ == "kubernetes.io/dockercfg" {
        ".dockercfg"
    } else {
        ".dockerconfigjson"
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": OPERATOR_NS},
        "type": type_,
        "stringData": {key: config},
    }))
    .expect("secret")
}

/// The pull secret names and the images of a pod template.
fn pod_images(spec: Option<k8s_openapi::api::core::v1::PodTemplateSpec>) -> (Vec<String>, Vec<String>) {
    let pod = spec.and_then(|t| t.spec).unwrap_or_default();
    let secrets = pod
        .image_pull_secrets
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .collect();
    let images = pod
        .init_containers
        .unwrap_or_default()
        .into_iter()
        .chain(pod.containers)
        .filter_map(|c| c.image)
        .collect();
    (secrets, images)
}

async fn node_pods(client: &Client) -> Option<(Vec<String>, Vec<String>)> {
    let ds = Api::<DaemonSet>::namespaced(client.clone(), NS)
        .get_opt("caracal-node")
        .await
        .ok()??;
    Some(pod_images(ds.spec.map(|s| s.template)))
}

async fn typha_pods(client: &Client) -> Option<(Vec<String>, Vec<String>)> {
    let dep = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(client.clone(), NS)
        .get_opt("caracal-typha")
        .await
        .ok()??;
    Some(pod_images(dep.spec.map(|s| s.template)))
}

async fn copy_of(client: &Client, name: &str) -> Option<k8s_openapi::api::core::v1::Secret> {
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), NS)
        .get_opt(name)
        .await
        .ok()?
}

fn secret_text(secret: &k8s_openapi::api::core::v1::Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn image_pull_secrets_are_copied_kept_in_sync_set_on_pods_and_removed_when_unreferenced() {
    let op = operator().await;
    let c = op.client.clone();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(c.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": OPERATOR_NS}})).expect("ns"),
        )
        .await
        .expect("operator namespace");
    let sources: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(c.clone(), OPERATOR_NS);
    sources
        .create(
            &PostParams::default(),
            &pull_secret(
                "regcred",
                "kubernetes.io/dockerconfigjson",
                r#"{"auths":{"registry.example":{"auth":"b25lOm9uZQ=="}}}"#,
            ),
        )
        .await
        .expect("regcred");
    apply_installation(&c, json!({"imagePullSecrets": [{"name": "regcred"}]})).await;

    // Copied into caracal-system, and named on the DaemonSet's and the Deployment's pods.
    let copy = eventually("the copy of regcred", || copy_of(&c, "regcred")).await;
    assert_eq!(copy.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    assert!(secret_text(&copy, ".dockerconfigjson").contains("b25lOm9uZQ=="));
    eventually("regcred on the DaemonSet's and the Deployment's pods", || async {
        let (node, _) = node_pods(&c).await?;
        let (typha, _) = typha_pods(&c).await?;
        (node == ["regcred"] && typha == ["regcred"]).then_some(())
    })
    .await;

    // A changed source updates the copy (through the watch: the resync is minutes away).
    sources
        .replace(
            "regcred",
            &PostParams::default(),
            &pull_secret(
                "regcred",
                "kubernetes.io/dockerconfigjson",
                r#"{"auths":{"registry.example":{"auth":"dHdvOnR3bw=="}}}"#,
            ),
        )
        .await
        .expect("update regcred");
    eventually("the copy follows the source", || async {
        copy_of(&c, "regcred")
            .await
            .filter(|s| secret_text(s, ".dockerconfigjson").contains("dHdvOnR3bw=="))
    })
    .await;

    // A reference to a Secret that does not exist: Degraded naming the field and the Secret; nothing changes.
    let ds_before = ds_version(&c).await;
    apply_installation(&c, json!({"imagePullSecrets": [{"name": "later"}]})).await;
    let (_, reason, message) = eventually("Degraded=True", || async {
        condition(&c, "Degraded").await.filter(|d| d.0 == "True")
    })
    .await;
    assert_eq!(reason, "PullSecretNotFound");
    assert!(
        message.starts_with(
            "spec.imagePullSecrets[0]: Secret \"later\" does not exist in namespace caracal-operator"
        ) && message.contains("kubectl create secret docker-registry later"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ds_version(&c).await,
        ds_before,
        "the DaemonSet changed under an invalid Installation"
    );
    assert!(
        copy_of(&c, "regcred").await.is_some(),
        "the working copy was removed under an invalid Installation"
    );

    // A Secret of the wrong type is named too.
    sources
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "later", "namespace": OPERATOR_NS}, "type": "Opaque", "stringData": {"a": "b"}}))
                .expect("opaque"),
        )
        .await
        .expect("opaque later");
    let (_, reason, message) = eventually("Degraded PullSecretWrongType", || async {
        condition(&c, "Degraded")
            .await
            .filter(|d| d.1 == "PullSecretWrongType")
    })
    .await;
    assert!(
        message.starts_with("spec.imagePullSecrets[0]: Secret \"later\"")
            && message.contains("has type Opaque"),
        "{reason}: {message}"
    );

    // Once it is a registry credential (created after the reference: the watch picks it up), it is copied, the
    // pods name it, and the copy no longer referenced is removed.
    sources
        .delete("later", &DeleteParams::default())
        .await
        .expect("delete opaque");
    sources
        .create(
            &PostParams::default(),
            &pull_secret(
                "later",
                "kubernetes.io/dockercfg",
                r#"{"registry.example":{"auth":"dGhyZWU6dGhyZWU="}}"#,
            ),
        )
        .await
        .expect("later");
    eventually("later copied, regcred removed, pods switched", || async {
        copy_of(&c, "later").await?;
        if copy_of(&c, "regcred").await.is_some() {
            return None;
        }
        let (node, _) = node_pods(&c).await?;
        let (typha, _) = typha_pods(&c).await?;
        (node == ["later"] && typha == ["later"]).then_some(())
    })
    .await;
    // The status is written after the objects: it follows within the reconcile that switched the pods.
    eventually("Degraded AsExpected again", || async {
        let (_, reason, _) = condition(&c, "Degraded").await?;
        (reason == "AsExpected").then_some(())
    })
    .await;
    assert!(
        sources.get_opt("regcred").await.expect("get").is_some(),
        "the source of a removed copy stays"
    );

    // No pull secrets: no copies and no imagePullSecrets on the pods.
    apply_installation(&c, json!({"imagePullSecrets": []})).await;
    eventually("no copies and no pull secrets on the pods", || async {
        if copy_of(&c, "later").await.is_some() {
            return None;
        }
        let (node, _) = node_pods(&c).await?;
        let (typha, _) = typha_pods(&c).await?;
        (node.is_empty() && typha.is_empty()).then_some(())
    })
    .await;
    op.stop().await;
}

fn digest(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

#[tokio::test]
async fn an_image_set_pins_digests_and_an_invalid_one_is_refused_or_degraded() {
    let op = operator().await;
    let c = op.client.clone();
    let name = caracal_operator::render::images::image_set_name();
    apply_installation(&c, json!({"registry": "registry.example/"})).await;
    let (_, images) = eventually("the DaemonSet", || node_pods(&c)).await;
    let tag = format!(":{}", name.trim_start_matches("caracal-"));
    assert!(images.iter().all(|i| i.ends_with(&tag)), "{images:?}");

    // What the API server refuses, each with the field and what to write.
    let create = |doc: serde_json::Value| {
        let c = c.clone();
        async move {
            let obj: kube::api::DynamicObject = serde_json::from_value(doc).expect("object");
            let api = caracal_e2e::crds::api_for(&c, &obj).expect("kind");
            match api.create(&PostParams::default(), &obj).await {
                Err(kube::Error::Api(s)) => s.message,
                other => panic!("expected a rejection, got {other:?}"),
            }
        }
    };
    let set = |name: &str, images: serde_json::Value| json!({"apiVersion": "operator.caracal.dev/v1", "kind": "ImageSet", "metadata": {"name": name}, "spec": {"images": images}});
    let msg = create(set(
        &name,
        json!([{"image": "caracal/node", "digest": "sha256:ABC"}]),
    ))
    .await;
    assert!(
        msg.contains("spec.images[0].digest") && msg.contains("64 lowercase hex digits"),
        "{msg}"
    );
    let msg = create(set(
        &name,
        json!([{"image": "caracal/operator", "digest": digest('a')}]),
    ))
    .await;
    assert!(
        msg.contains("spec.images[0].image") && msg.contains("caracal/node"),
        "{msg}"
    );
    let msg = create(set(
        &name,
        json!([{"image": "caracal/node", "digest": digest('a')}, {"image": "caracal/node", "digest": digest('b')}]),
    ))
    .await;
    assert!(msg.contains("listed twice"), "{msg}");
    let msg = create(set(
        "my-images",
        json!([{"image": "caracal/node", "digest": digest('a')}]),
    ))
    .await;
    assert!(msg.contains("caracal-<release>"), "{msg}");

    // A set without Typha's image: Degraded, and nothing changes.
    let ds_before = ds_version(&c).await;
    let sets: Api<caracal_crds::imageset::ImageSet> = Api::all(c.clone());
    let partial = set(
        &name,
        json!([{"image": "caracal/node", "digest": digest('a')}, {"image": "caracal/cni", "digest": digest('c')}]),
    );
    sets.create(
        &PostParams::default(),
        &serde_json::from_value(partial).expect("set"),
    )
    .await
    .expect("a partial set is a valid object");
    let (_, reason, message) = eventually("Degraded=True", || async {
        condition(&c, "Degraded").await.filter(|d| d.0 == "True")
    })
    .await;
    assert_eq!(reason, "InvalidImageSet");
    assert!(
        message.starts_with(&format!(
            "ImageSet {name}: spec.images: no digest for caracal/typha"
        )),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ds_version(&c).await,
        ds_before,
        "the DaemonSet changed under an invalid ImageSet"
    );

    // Complete: every image by digest, under the Installation's registry and path.
    let full = set(
        &name,
        json!([{"image": "caracal/node", "digest": digest('a')}, {"image": "caracal/cni", "digest": digest('c')}, {"image": "caracal/typha", "digest": digest('b')}]),
    );
    sets.patch(
        &name,
        &PatchParams::apply("test-user").force(),
        &Patch::Apply(&full),
    )
    .await
    .expect("complete the set");
    let (_, node) = eventually("the DaemonSet by digest", || async {
        node_pods(&c)
            .await
            .filter(|(_, images)| images.iter().all(|i| i.contains('@')))
    })
    .await;
    assert_eq!(
        node,
        vec![
            format!("registry.example/caracal/cni@{}", digest('c')),
            format!("registry.example/caracal/node@{}", digest('a')),
        ]
    );
    let (_, typha) = eventually("the Deployment by digest", || async {
        typha_pods(&c)
            .await
            .filter(|(_, images)| images.iter().all(|i| i.contains('@')))
    })
    .await;
    assert_eq!(
        typha,
        vec![format!("registry.example/caracal/typha@{}", digest('b'))]
    );
    let status = eventually("status.imageSet", || async {
        Api::<Installation>::all(c.clone())
            .get("default")
            .await
            .ok()?
            .status
            .filter(|s| s.image_set.is_some())
    })
    .await;
    assert_eq!(status.image_set.as_deref(), Some(name.as_str()));
    assert_eq!(condition(&c, "Degraded").await.expect("Degraded").1, "AsExpected");

    // Deleted: back to tags.
    sets.delete(&name, &DeleteParams::default())
        .await
        .expect("delete the set");
    eventually("the DaemonSet by tag again", || async {
        node_pods(&c)
            .await
            .filter(|(_, images)| images.iter().all(|i| i.ends_with(&tag)))
    })
    .await;
    op.stop().await;
}

/// `caracal-operator uninstall` (the chart's pre-delete hook): with the operator running it deletes the
/// Installation and returns once the operator has removed what it rendered; with none running it fails after
/// its timeout, naming the finalizer left, instead of hanging.
#[tokio::test]
async fn uninstall_waits_for_the_operator_to_remove_what_it_rendered_and_fails_clearly_without_one() {
    let op = operator().await;
    let c = op.client.clone();
    install_default(&c).await;
    // Run off the test's runtime, which the in-process operator needs meanwhile.
    let kubeconfig = op._cp.kubeconfig().to_path_buf();
    let uninstall = |timeout: &'static str| {
        let kubeconfig = kubeconfig.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_caracal-operator"))
                    .env("KUBECONFIG", kubeconfig)
                    .args(["uninstall", "--timeout", timeout])
                    .output()
                    .expect("run caracal-operator uninstall")
            })
            .await
            .expect("join")
        }
    };
    let out = uninstall("120").await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Caracal is removed"), "{text}");
    for (kind, name) in [
        ("DaemonSet", "caracal-node"),
        ("Deployment", "caracal-typha"),
        ("IPPool", "default-ipv4-ippool"),
    ] {
        assert!(!exists(&c, kind, name).await, "{kind} {name} still there");
    }
    // Again: nothing to remove.
    let out = uninstall("10").await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to remove"));

    // A finalizer nobody removes (here the test's own; in a cluster, the operator's when no operator runs):
    // uninstall fails after its timeout and names it, instead of hanging.
    apply_installation(&c, json!({})).await;
    let insts: Api<Installation> = Api::all(c.clone());
    let with_operator_finalizer = eventually("the operator's finalizer", || {
        let i = insts.clone();
        async move {
            let inst = i.get("default").await.ok()?;
            inst.finalizers()
                .iter()
                .any(|f| f == controller::FINALIZER)
                .then_some(inst)
        }
    })
    .await;
    let mut finalizers = with_operator_finalizer.finalizers().to_vec();
    finalizers.push(HOLD.into());
    set_finalizers(&insts, finalizers).await;
    let out = uninstall("3").await;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "uninstall returned with a finalizer left");
    assert!(
        text.contains(HOLD) && text.contains("is the operator running?"),
        "{text}"
    );
    set_finalizers(&insts, Vec::new()).await;
    op.stop().await;
}

/// `caracal-operator apply-installation` (the chart's post-install and post-upgrade hook): applies the
/// Installation from a file, and applying a changed one patches the same object in place (same UID: an
/// upgrade never deletes it); a spec the API server refuses fails at once with its message.
#[tokio::test]
async fn apply_installation_patches_the_installation_in_place_and_fails_on_a_refused_spec() {
    let op = operator().await;
    let c = op.client.clone();
    let kubeconfig = op._cp.kubeconfig().to_path_buf();
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |spec: &str| {
        let file = dir.path().join("installation.yaml");
        std::fs::write(
            &file,
            format!(
                "apiVersion: operator.caracal.dev/v1\nkind: Installation\nmetadata:\n  name: default\nspec:\n{spec}"
            ),
        )
        .expect("write");
        let kubeconfig = kubeconfig.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_caracal-operator"))
                    .env("KUBECONFIG", kubeconfig)
                    .args(["apply-installation", "--timeout", "60", "--file"])
                    .arg(file)
                    .output()
                    .expect("run caracal-operator apply-installation")
            })
            .await
            .expect("join")
        }
    };
    let out = run("  calicoNetwork:\n    mtu: 1400\n").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let insts: Api<Installation> = Api::all(c.clone());
    let first = insts.get("default").await.expect("applied");
    let out = run("  calicoNetwork:\n    mtu: 1300\n").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second = insts.get("default").await.expect("applied again");
    assert_eq!(first.metadata.uid, second.metadata.uid, "recreated, not patched");
    assert_eq!(
        serde_json::to_value(&second.spec).expect("spec")["calicoNetwork"]["mtu"],
        1300
    );
    let out = run("  calicoNetwork:\n    linuxDataplane: NoSuchPlane\n").await;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a refused spec was applied");
    assert!(
        text.contains("refused") && text.contains("linuxDataplane"),
        "{text}"
    );
    op.stop().await;
}

/// An older release's CRD (here: the Installation CRD without one of this release's spec fields, written by
/// the same field manager) is upgraded in place when the operator starts: what makes `helm upgrade`, which
/// never touches CRDs, upgrade them.
#[tokio::test]
async fn the_operator_upgrades_an_older_releases_crd_in_place() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let (_cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let name = "installations.operator.caracal.dev";
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let current = crds.get(name).await.expect("the CRD");
    let uid = current.metadata.uid.clone();
    let mut older = caracal_operator::crds::manifest(
        &caracal_crds::crdgen::all()
            .into_iter()
            .find(|c| c.name_any() == name)
            .expect("generated"),
    );
    let spec_props =
        &mut older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let removed = spec_props
        .as_object_mut()
        .expect("spec properties")
        .remove("typhaDeployment")
        .map(|_| "typhaDeployment")
        .expect("this release's Installation has spec.typhaDeployment");
    crds.patch(
        name,
        &PatchParams::apply(caracal_operator::apply::FIELD_MANAGER).force(),
        &Patch::Apply(&older),
    )
    .await
    .expect("write the older CRD");
    let has = |c: &CustomResourceDefinition| {
        serde_json::to_value(c).expect("json")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]
            .get(removed)
            .is_some()
    };
    assert!(
        !has(&crds.get(name).await.expect("CRD")),
        "the older CRD lacks {removed}"
    );
    caracal_operator::crds::ensure(&client).await.expect("ensure");
    let after = crds.get(name).await.expect("CRD");
    assert!(has(&after), "the operator restored spec.{removed}");
    assert_eq!(after.metadata.uid, uid, "upgraded in place, not recreated");
}

/// A running operator restores a deleted webhook registration while a ClusterRoleBinding of its
/// ServiceAccount owns it, and does not once none does (the install is being removed: a registration written
/// then would have no owner to take it away).
#[tokio::test]
async fn the_webhook_registration_is_restored_while_owned_and_not_after_the_install_is_gone() {
    use caracal_operator::webhook::{self, Endpoint};
    use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    let (_cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let ns = "caracal-operator";
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"),
        )
        .await
        .expect("namespace");
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), ns);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": webhook::SERVICE_ACCOUNT}})).expect("sa"),
        )
        .await
        .expect("ServiceAccount");
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "caracal-operator"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "caracal-operator"},
                "subjects": [{"kind": "ServiceAccount", "name": webhook::SERVICE_ACCOUNT, "namespace": ns}],
            }))
            .expect("binding"),
        )
        .await
        .expect("ClusterRoleBinding");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let endpoint = Endpoint::Url(format!("https://127.0.0.1:{port}{}", webhook::PATH));
    let recheck = Duration::from_millis(500);
    let task = webhook::start_checking_every(&client, ns, addr, &endpoint, recheck)
        .await
        .expect("webhook");
    let registrations: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    registrations
        .delete(webhook::NAME, &DeleteParams::default())
        .await
        .expect("delete the registration");
    let restored = eventually("the registration restored", || {
        let r = registrations.clone();
        async move { r.get_opt(webhook::NAME).await.ok().flatten() }
    })
    .await;
    assert_eq!(
        restored
            .metadata
            .owner_references
            .unwrap_or_default()
            .into_iter()
            .map(|o| o.name)
            .collect::<Vec<_>>(),
        vec!["caracal-operator".to_owned()],
        "restored with its owner"
    );
    // The install goes: its binding first (as every uninstall path deletes it), then the registration (the
    // garbage collector's part, done by hand: this control plane runs none).
    bindings
        .delete("caracal-operator", &DeleteParams::default())
        .await
        .expect("delete the binding");
    registrations
        .delete(webhook::NAME, &DeleteParams::default())
        .await
        .expect("delete the registration");
    tokio::time::sleep(recheck * 8).await;
    assert!(
        registrations.get_opt(webhook::NAME).await.expect("get").is_none(),
        "a registration with no owner left was written again"
    );
    task.abort();
}
