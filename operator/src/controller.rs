//! The Installation controller: gathers facts, computes, renders, applies, prunes and reports status.
//! A span per reconcile; Degraded (with an Event) when the Installation is invalid, in which case nothing that
//! runs is changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caracal_crds::imageset::ImageSet;
use caracal_crds::installation::{INSTALLATION_NAME, Installation, InstallationSpec};
use caracal_crds::ipam::IPAMBlock;
use caracal_crds::ippool::IPPool;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tracing::{Instrument, info, info_span, warn};

use crate::apply::{Applier, ApplyError, FIELD_MANAGER};
use crate::certs::{self, CertError};
use crate::metrics::Metrics;
use crate::render::{
    self, ClusterFacts, MANAGED_BY_LABEL, MANAGED_BY_VALUE, NAMESPACE, UserPool, managed_selector,
};
use crate::status;

/// The finalizer that lets the operator clean up before the Installation goes.
pub const FINALIZER: &str = "operator.caracal.dev/cleanup";
/// How long cleanup may keep the Installation before the finalizer is removed regardless.
pub const CLEANUP_DEADLINE: Duration = Duration::from_secs(120);
/// Safety-net resync (also renews certificates in time).
pub const RESYNC: Duration = Duration::from_secs(300);

/// Errors a reconcile can end with (an invalid Installation is not an error: it is Degraded status).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to the API server failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// Certificates could not be made or stored.
    #[error(transparent)]
    Certs(#[from] CertError),
    /// Reading cluster facts or writing status failed.
    #[error("{0}: {1}")]
    Kube(&'static str, #[source] kube::Error),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// A bounded reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Apply(_) => "ApplyFailed",
            Error::Certs(_) => "CertificatesFailed",
            Error::Kube(..) => "ApiFailed",
            Error::Finalizer(_) => "FinalizerFailed",
        }
    }
}

/// What every reconcile gets.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Applies and prunes.
    pub applier: Applier,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Publishes Events on the Installation.
    pub recorder: Recorder,
    /// The operator's own namespace (`POD_NAMESPACE`, else `caracal-operator`): where it reads the
    /// `kubernetes-services-endpoint` ConfigMap and the Secrets `spec.imagePullSecrets` names.
    pub namespace: String,
}

impl Context {
    /// A context for `client`.
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            applier: Applier::new(client.clone(), metrics.clone()),
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            namespace: std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "caracal-operator".into()),
        }
    }
}

/// The Secrets `spec.imagePullSecrets` names that exist in the operator's namespace.
async fn pull_secrets(
    client: &Client,
    namespace: &str,
    spec: &InstallationSpec,
) -> Result<BTreeMap<String, Secret>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut found = BTreeMap::new();
    for name in render::pull_secrets::names(spec) {
        if name.is_empty() {
            continue;
        }
        if let Some(secret) = api
            .get_opt(&name)
            .await
            .map_err(|e| Error::Kube("reading an image pull secret", e))?
        {
            found.insert(name, secret);
        }
    }
    Ok(found)
}

/// This release's ImageSet, or why it does not decode.
async fn image_set(client: &Client) -> Result<(Option<ImageSet>, Option<String>), Error> {
    match Api::<ImageSet>::all(client.clone())
        .get_opt(&render::images::image_set_name())
        .await
    {
        Ok(set) => Ok((set, None)),
        Err(kube::Error::SerdeError(e)) => Ok((None, Some(e.to_string()))),
        Err(e) => Err(Error::Kube("reading the ImageSet", e)),
    }
}

async fn facts(client: &Client, namespace: &str, spec: &InstallationSpec) -> Result<ClusterFacts, Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node_count = nodes
        .list_metadata(&ListParams::default())
        .await
        .map_err(|e| Error::Kube("listing nodes", e))?
        .items
        .len();
    let pools: Api<IPPool> = Api::all(client.clone());
    let user_pools = pools
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::Kube("listing IPPools", e))?
        .into_iter()
        .filter(|p| p.labels().get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGED_BY_VALUE))
        .map(|p| UserPool {
            name: p.name_any(),
            cidr: p.spec.cidr,
        })
        .collect();
    let (api_server, api_server_error) = match Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(render::API_SERVER_CONFIGMAP)
        .await
        .map_err(|e| Error::Kube("reading the kubernetes-services-endpoint ConfigMap", e))?
    {
        Some(cm) => match render::ApiServer::from_data(&cm.data.unwrap_or_default()) {
            Ok(a) => (Some(a), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, None),
    };
    let (image_set, image_set_error) = image_set(client).await?;
    Ok(ClusterFacts {
        node_count,
        user_pools,
        certificates: Default::default(),
        api_server,
        api_server_error,
        operator_namespace: namespace.to_owned(),
        pull_secrets: pull_secrets(client, namespace, spec).await?,
        image_set,
        image_set_error,
    })
}

/// True for an IPPool object with an allocated address in one of `in_use` (the blocks that hold some).
fn holds_addresses(kind: &str, obj: &kube::api::DynamicObject, in_use: &[ipnet::IpNet]) -> bool {
    kind == "IPPool"
        && obj.data["spec"]["cidr"]
            .as_str()
            .and_then(|c| c.parse::<ipnet::IpNet>().ok())
            .is_some_and(|pool| in_use.iter().any(|b| pool.contains(&b.network())))
}

/// CIDRs of IPPools that still hold allocations (an IPAMBlock inside them with an allocated address).
async fn pools_in_use(client: &Client) -> Result<Vec<ipnet::IpNet>, Error> {
    let blocks: Api<IPAMBlock> = Api::all(client.clone());
    let blocks = blocks
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::Kube("listing IPAMBlocks", e))?;
    Ok(blocks
        .into_iter()
        .filter(|b| b.spec.allocations.iter().any(Option::is_some))
        .map(|b| b.spec.cidr.0)
        .collect())
}

async fn write_status(
    inst: &Installation,
    ctx: &Context,
    new: caracal_crds::installation::InstallationStatus,
) -> Result<(), Error> {
    if status::same(inst.status.as_ref(), &new) {
        return Ok(());
    }
    let api: Api<Installation> = Api::all(ctx.client.clone());
    let patch =
        serde_json::json!({ "apiVersion": "operator.caracal.dev/v1", "kind": "Installation", "status": new });
    api.patch_status(
        &inst.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|e| Error::Kube("writing status", e))?;
    Ok(())
}

async fn event(ctx: &Context, inst: &Installation, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &inst.object_ref(&())).await {
        warn!(error = %e, "publishing an event failed");
    }
}

async fn apply(inst: Arc<Installation>, ctx: &Context) -> Result<Action, Error> {
    let generation = inst.metadata.generation.unwrap_or(0);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let mut facts = facts(&ctx.client, &ctx.namespace, &inst.spec).await?;
    let computed = match render::compute(&inst.spec, &facts) {
        Ok(c) => c,
        Err(errors) => {
            let reason = errors.first().map_or("Invalid", |e| e.reason);
            let message = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            ctx.metrics.failed(reason);
            let was_degraded_same = inst.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Degraded" && c.status == "True" && c.message == message)
            });
            if !was_degraded_same {
                event(ctx, &inst, EventType::Warning, reason, message.clone()).await;
            }
            warn!(%reason, %message, "Installation is invalid; nothing changed");
            write_status(
                &inst,
                ctx,
                status::invalid(inst.status.as_ref(), reason, message, generation, &now),
            )
            .await?;
            return Ok(Action::requeue(RESYNC));
        }
    };
    // The namespace first: the CA Secret lives in it.
    ctx.applier.apply(&render::namespace()).await?;
    facts.certificates = certs::ensure(&ctx.client).await?;
    let rendered = render::render(&computed, &facts);
    let mut writes = 0;
    for object in &rendered.objects {
        if ctx.applier.apply(object).await? {
            writes += 1;
        }
    }
    let in_use = pools_in_use(&ctx.client).await?;
    let (deleted, kept) = ctx
        .applier
        .prune(&rendered.objects, |kind, obj| holds_addresses(kind, obj, &in_use))
        .await?;
    if writes > 0 || !deleted.is_empty() {
        info!(writes, deleted = deleted.len(), "applied");
    }
    let ds = Api::<DaemonSet>::namespaced(ctx.client.clone(), NAMESPACE)
        .get_opt("caracal-node")
        .await
        .map_err(|e| Error::Kube("reading the DaemonSet", e))?;
    let dep = Api::<Deployment>::namespaced(ctx.client.clone(), NAMESPACE)
        .get_opt("caracal-typha")
        .await
        .map_err(|e| Error::Kube("reading the Deployment", e))?;
    let components = status::components(ds.as_ref(), dep.as_ref());
    let kept: Vec<String> = kept
        .into_iter()
        .map(|k| k.rsplit('/').next().unwrap_or_default().to_owned())
        .collect();
    if !kept.is_empty() {
        ctx.metrics.failed("PoolInUse");
    }
    let mut st = status::applied(
        inst.status.as_ref(),
        computed,
        components,
        &kept,
        generation,
        &now,
    );
    st.image_set = facts.image_set.as_ref().map(ResourceExt::name_any);
    write_status(&inst, ctx, st).await?;
    Ok(Action::requeue(RESYNC))
}

/// Removes what the operator rendered (pools that hold addresses stay), bounded by [`CLEANUP_DEADLINE`].
async fn cleanup(inst: Arc<Installation>, ctx: &Context) -> Result<Action, Error> {
    let started = inst.metadata.deletion_timestamp.as_ref().map(|t| t.0);
    let overdue = started.is_some_and(|t| {
        k8s_openapi::jiff::Timestamp::now().duration_since(t).as_secs()
            > i64::try_from(CLEANUP_DEADLINE.as_secs()).unwrap_or(i64::MAX)
    });
    // Say what is happening while the Installation waits on its finalizer.
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let wants = [status::Want {
        type_: "Progressing",
        status: true,
        reason: "Uninstalling".into(),
        message: format!(
            "removing what the operator rendered (IPPools that hold addresses stay); the finalizer is released after \
             at most {CLEANUP_DEADLINE:?} even if cleanup keeps failing"
        ),
    }];
    let mut st = inst.status.clone().unwrap_or_default();
    st.conditions = status::set_conditions(
        &st.conditions,
        &wants,
        inst.metadata.generation.unwrap_or(0),
        &now,
    );
    if let Err(e) = write_status(&inst, ctx, st).await {
        warn!(error = %e, "reporting cleanup in status");
    }
    let result = async {
        let in_use = pools_in_use(&ctx.client).await?;
        let (deleted, kept) = ctx
            .applier
            .prune(&[], |kind, obj| holds_addresses(kind, obj, &in_use))
            .await?;
        let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ctx.client.clone());
        match ns.delete(NAMESPACE, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Kube("deleting the namespace", e)),
        }
        Ok::<_, Error>((deleted, kept))
    }
    .await;
    match result {
        Ok((deleted, kept)) => {
            let note = if kept.is_empty() {
                format!("removed {} objects and namespace {NAMESPACE}", deleted.len())
            } else {
                format!(
                    "removed {} objects; kept IPPools that still hold addresses: {}",
                    deleted.len(),
                    kept.join(", ")
                )
            };
            event(ctx, &inst, EventType::Normal, "Uninstalled", note).await;
            Ok(Action::await_change())
        }
        Err(e) if overdue => {
            event(ctx, &inst, EventType::Warning, "CleanupAbandoned", format!("cleanup did not finish within {CLEANUP_DEADLINE:?} ({e}); releasing the Installation anyway")).await;
            Ok(Action::await_change())
        }
        Err(e) => Err(e),
    }
}

/// Reconciles the Installation.
pub async fn reconcile(inst: Arc<Installation>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span =
        info_span!("reconcile", installation = %inst.name_any(), generation = inst.metadata.generation);
    async move {
        if inst.name_any() != INSTALLATION_NAME {
            // The CRD's CEL rule refuses other names; an older stored object is ignored, not acted on.
            return Ok(Action::await_change());
        }
        let start = Instant::now();
        let api: Api<Installation> = Api::all(ctx.client.clone());
        let result = finalizer(&api, FINALIZER, inst, |ev| async {
            match ev {
                Finalizer::Apply(i) => apply(i, &ctx).await,
                Finalizer::Cleanup(i) => cleanup(i, &ctx).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        });
        ctx.metrics.reconciled(start.elapsed());
        result
    }
    .instrument(span)
    .await
}

/// Requeues a failed reconcile with a short delay.
pub fn error_policy(_inst: Arc<Installation>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(%error, "reconcile failed");
    ctx.metrics.failed(error.reason());
    Action::requeue(Duration::from_secs(5))
}

/// Any change to a watched object means: reconcile the one Installation.
fn to_default<T>(_: T) -> Option<ObjectRef<Installation>> {
    Some(ObjectRef::new(INSTALLATION_NAME))
}

/// Runs the controller until `shutdown` resolves: the Installation, plus everything the operator renders
/// (so drift is repaired at once), Nodes (Typha follows the node count), the Secrets of its own namespace
/// (image pull secrets are copied from there) and this release's ImageSet.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let own_namespace = ctx.namespace.clone();
    let managed = || watcher::Config::default().labels(&managed_selector());
    macro_rules! namespaced {
        ($t:ty) => {
            Api::<$t>::namespaced(client.clone(), NAMESPACE)
        };
    }
    Controller::new(
        Api::<Installation>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(namespaced!(DaemonSet), managed(), to_default)
    .watches(namespaced!(Deployment), managed(), to_default)
    .watches(namespaced!(Service), managed(), to_default)
    .watches(namespaced!(ConfigMap), managed(), to_default)
    .watches(namespaced!(Secret), managed(), to_default)
    .watches(namespaced!(ServiceAccount), managed(), to_default)
    .watches(namespaced!(PodDisruptionBudget), managed(), to_default)
    .watches(Api::<ClusterRole>::all(client.clone()), managed(), to_default)
    .watches(
        Api::<ClusterRoleBinding>::all(client.clone()),
        managed(),
        to_default,
    )
    .watches(
        Api::<IPPool>::all(client.clone()),
        watcher::Config::default(),
        to_default,
    )
    .watches(
        Api::<caracal_crds::felix::FelixConfiguration>::all(client.clone()),
        managed(),
        to_default,
    )
    .watches(
        Api::<Node>::all(client.clone()),
        watcher::Config::default(),
        to_default,
    )
    .watches(
        Api::<ConfigMap>::namespaced(client.clone(), &own_namespace),
        watcher::Config::default().fields(&format!("metadata.name={}", render::API_SERVER_CONFIGMAP)),
        to_default,
    )
    // Image pull secrets are read from the operator's namespace: a created or changed one is copied at once.
    .watches(
        Api::<Secret>::namespaced(client.clone(), &own_namespace),
        watcher::Config::default(),
        to_default,
    )
    .watches(
        Api::<ImageSet>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", render::images::image_set_name())),
        to_default,
    )
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|res| async move {
        if let Err(e) = res {
            tracing::debug!(error = %e, "controller event");
        }
    })
    .await;
}

/// How an elected run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `shutdown` resolved; the lease was released.
    Shutdown,
    /// Another replica took the lease (or it could not be renewed): stop acting at once.
    LostLease,
}

/// Runs the controller only while `elector` holds the leader lease.
pub async fn run_elected(
    ctx: Arc<Context>,
    mut elector: crate::leader::Elector,
    shutdown: impl std::future::Future<Output = ()>,
) -> Outcome {
    tokio::pin!(shutdown);
    tokio::select! {
        () = elector.acquire() => {}
        () = &mut shutdown => return Outcome::Shutdown,
    }
    info!(identity = elector.identity(), "leading: reconciling");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut task = tokio::spawn(run(ctx, async move {
        let _ = stopped.await;
    }));
    let outcome = tokio::select! {
        () = elector.hold() => Outcome::LostLease,
        () = &mut shutdown => Outcome::Shutdown,
        _ = &mut task => Outcome::LostLease,
    };
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    if outcome == Outcome::Shutdown {
        elector.release().await;
    }
    outcome
}
