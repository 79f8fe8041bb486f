//! The node agent's policy loop: datastore updates in, the kernel converged out.
//!
//! Updates are batched (a short debounce), then the world is recomputed and the data plane updated through
//! its fast path; every `refresh` the data plane is converged with a full read-back, which repairs drift.
//! The first program after start is also a full read-back, so a restarted agent adopts what is in the
//! kernel instead of rebuilding it. Stopping the agent leaves the rules in place: traffic keeps flowing and
//! policy keeps being enforced while it restarts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::calc::compute;
use crate::cni::host_iface;
use crate::dataplane::{self, DataplaneError, LocalEndpoint};
use crate::datastore::{Cache, Update};
use crate::ipam::node::{Held, NodeIpam, attr};
use crate::policy::model::World;
use crate::routing::Routing;

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name (pods with this `spec.nodeName` are local).
    pub node_name: String,
    /// The data plane (`Iptables`).
    pub dataplane: String,
    /// Prefix for the kernel tools (a namespace in tests; empty on a node).
    pub exec_prefix: Vec<String>,
    /// How long to gather updates before recomputing.
    pub debounce: Duration,
    /// How often to converge with a full read-back (Felix's `iptablesRefreshInterval`, 90 s by default).
    pub refresh: Duration,
    /// Enforce policy on IPv6 too (`ip6tables`; Felix's `ipv6Support`).
    pub ipv6: bool,
}

/// The agent's optional parts beyond policy: IPAM (whose assignments are the local pods' addresses) and
/// routing.
#[derive(Default)]
pub struct Parts {
    /// The node's IPAM server.
    pub ipam: Option<NodeIpam>,
    /// Routing.
    pub routing: Option<Routing>,
    /// How often IPAM garbage collection runs.
    pub gc_every: Option<Duration>,
}

/// What the agent exposes to health checks and metrics.
#[derive(Debug, Default)]
pub struct Status {
    /// The data plane has been programmed from a complete datastore view.
    pub ready: AtomicBool,
    /// Data plane programs (fast path and full).
    pub programs: AtomicU64,
    /// Full read-backs that found something to repair.
    pub repairs: AtomicU64,
    /// Programs that failed.
    pub failures: AtomicU64,
    /// Routing syncs that changed something after the first (drift or datastore changes).
    pub routing_changes: AtomicU64,
    /// Routing syncs that failed.
    pub routing_failures: AtomicU64,
}

/// This node's endpoints in `world`, with their host interfaces.
pub fn local_endpoints(world: &World, node: &str) -> Vec<LocalEndpoint> {
    world
        .endpoints
        .iter()
        .filter(|e| e.node.as_deref() == Some(node))
        .map(|e| LocalEndpoint {
            key: e.key(),
            iface: host_iface(&e.namespace, &e.name),
            ips: e.ips.clone(),
        })
        .collect()
}

/// The addresses IPAM gave each local pod (`namespace/name` -> addresses): they are the pods' addresses
/// before the kubelet writes `status.podIPs`, so policy is in place from the pod's first packet.
fn ipam_addresses(
    held: &std::collections::BTreeMap<String, Held>,
) -> std::collections::BTreeMap<String, Vec<std::net::IpAddr>> {
    held.values()
        .filter_map(|h| {
            let key = format!("{}/{}", h.attrs.get(attr::NAMESPACE)?, h.attrs.get(attr::POD)?);
            Some((key, h.ips.clone()))
        })
        .collect()
}

/// Kinds whose changes routing depends on (pod changes do not: the CNI wiring owns pod routes).
fn routing_input(u: &Update) -> bool {
    let kind = match u {
        Update::Resync { kind }
        | Update::Upsert { kind, .. }
        | Update::Delete { kind, .. }
        | Update::InSync { kind } => kind,
    };
    [
        "v1/Node",
        "caracal.dev/v1/IPPool",
        "caracal.dev/v1/IPAMBlock",
        "caracal.dev/v1/FelixConfiguration",
        "caracal.dev/v1/BGPConfiguration",
        "caracal.dev/v1/BGPPeer",
    ]
    .contains(&kind.as_str())
}

/// Converges routing; false when it failed (the next change or refresh retries).
async fn sync_routing(
    routing: &mut Option<Routing>,
    cache: &Cache,
    status: &Status,
    first: &mut bool,
    force: bool,
) -> bool {
    let Some(r) = routing.as_mut() else { return true };
    match r.sync(cache, force).await {
        Ok(stats) => {
            if !stats.is_noop() {
                if !*first {
                    status.routing_changes.fetch_add(1, Ordering::Relaxed);
                }
                info!(?stats, "routing converged");
            }
            *first = false;
            true
        }
        Err(e) => {
            status.routing_failures.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "routing sync failed; retrying on the next change or refresh");
            false
        }
    }
}

/// Runs until `updates` closes or `shutdown` resolves.
pub async fn run(
    cfg: Config,
    mut updates: mpsc::Receiver<Update>,
    status: Arc<Status>,
    parts: Parts,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DataplaneError> {
    let backend: Backend = Arc::new(std::sync::Mutex::new(dataplane::backend(
        &cfg.dataplane,
        cfg.exec_prefix.clone(),
        cfg.ipv6,
    )?));
    let Parts {
        ipam,
        mut routing,
        gc_every,
    } = parts;
    let mut ipam_changes = ipam.as_ref().map(NodeIpam::subscribe);
    let mut cache = Cache::default();
    let mut dirty = false;
    let mut routing_dirty = true;
    let mut programmed_once = false;
    let mut routing_first = true;
    let mut refresh = tokio::time::interval(cfg.refresh);
    refresh.tick().await;
    let mut gc = tokio::time::interval(gc_every.unwrap_or(Duration::from_secs(60)));
    gc.tick().await;
    tokio::pin!(shutdown);
    loop {
        let ipam_changed = async {
            match ipam_changes.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            u = updates.recv() => match u {
                Some(u) => {
                    routing_dirty |= routing_input(&u);
                    cache.apply(u);
                    dirty = true;
                }
                None => return Ok(()),
            },
            true = ipam_changed => dirty = true,
            _ = gc.tick(), if ipam.is_some() && cache.kind_in_sync("v1/Pod") => {
                if let Some(i) = &ipam
                    && let Err(e) = i.gc(|ns, pod| cache.get("v1/Pod", &format!("{ns}/{pod}")).is_some()).await
                {
                    warn!(error = %e, "IPAM garbage collection failed");
                }
            },
            () = tokio::time::sleep(cfg.debounce), if dirty && cache.in_sync() => {
                // Drain what queued up meanwhile, then program once.
                while let Ok(u) = updates.try_recv() {
                    routing_dirty |= routing_input(&u);
                    cache.apply(u);
                }
                dirty = false;
                let full = !programmed_once;
                let addrs = match &ipam {
                    Some(i) => ipam_addresses(&i.held().await),
                    None => Default::default(),
                };
                match program_blocking(&cfg, &cache, addrs, &backend, full).await {
                    Ok(_) => {
                        programmed_once = true;
                        status.programs.fetch_add(1, Ordering::Relaxed);
                        status.ready.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        status.failures.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, "programming the data plane failed; retrying on the next change or refresh");
                        dirty = true;
                    }
                }
                if routing_dirty {
                    routing_dirty = !sync_routing(&mut routing, &cache, &status, &mut routing_first, false).await;
                }
            },
            _ = refresh.tick(), if programmed_once => {
                let addrs = match &ipam {
                    Some(i) => ipam_addresses(&i.held().await),
                    None => Default::default(),
                };
                routing_dirty = !sync_routing(&mut routing, &cache, &status, &mut routing_first, true).await;
                match program_blocking(&cfg, &cache, addrs, &backend, true).await {
                    Ok(stats) => {
                        if !stats.is_noop() {
                            status.repairs.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        status.failures.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, "periodic refresh failed");
                    }
                }
            },
        }
    }
}

type Backend = Arc<std::sync::Mutex<Box<dyn dataplane::PolicyDataplane>>>;

/// Runs [`program`] on a blocking thread: the kernel tools take tens to hundreds of milliseconds, and the
/// runtime's threads must keep answering CNI requests meanwhile.
async fn program_blocking(
    cfg: &Config,
    cache: &Cache,
    addrs: std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    backend: &Backend,
    full: bool,
) -> Result<dataplane::ApplyStats, DataplaneError> {
    let (cfg, docs, backend) = (cfg.clone(), cache.documents(), backend.clone());
    tokio::task::spawn_blocking(move || {
        let mut b = backend.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        program(&cfg, docs, &addrs, b.as_mut(), full)
    })
    .await
    .unwrap_or_else(|e| Err(DataplaneError::Internal(format!("programming task: {e}"))))
}

fn program(
    cfg: &Config,
    mut docs: Vec<(String, serde_json::Value)>,
    addrs: &std::collections::BTreeMap<String, Vec<std::net::IpAddr>>,
    backend: &mut dyn dataplane::PolicyDataplane,
    full: bool,
) -> Result<dataplane::ApplyStats, DataplaneError> {
    // Local pods get the addresses IPAM gave them before the kubelet reports them in status, through the
    // same loader as everything else.
    for (_, v) in docs
        .iter_mut()
        .filter(|(_, v)| v["kind"] == "Pod" && v["spec"]["nodeName"] == cfg.node_name.as_str())
    {
        let key = format!(
            "{}/{}",
            v["metadata"]["namespace"].as_str().unwrap_or_default(),
            v["metadata"]["name"].as_str().unwrap_or_default()
        );
        if let Some(ips) = addrs.get(&key) {
            let list: Vec<serde_json::Value> = ips
                .iter()
                .map(|ip| serde_json::json!({"ip": ip.to_string()}))
                .collect();
            v["status"]["podIP"] = ips.first().map(ToString::to_string).into();
            v["status"]["podIPs"] = list.into();
        }
    }
    let loaded = match crate::policy::load::load_documents(docs) {
        Ok(l) => l,
        Err(e) => {
            // A policy the loader cannot convert: keep the data plane as it is rather than tear it down.
            warn!(error = %e, "the datastore holds an object that cannot be converted; keeping the current rules");
            return Ok(dataplane::ApplyStats::default());
        }
    };
    let local = local_endpoints(&loaded.world, &cfg.node_name);
    let model = compute(&loaded.world, &local);
    let stats = if full {
        backend.converge(&model)?
    } else {
        backend.update(&model)?
    };
    if full && !stats.is_noop() {
        info!(?stats, "converged with a full read-back");
    }
    Ok(stats)
}
