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
use crate::policy::model::World;

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

/// Runs until `updates` closes or `shutdown` resolves.
pub async fn run(
    cfg: Config,
    mut updates: mpsc::Receiver<Update>,
    status: Arc<Status>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DataplaneError> {
    let mut backend = dataplane::backend(&cfg.dataplane, cfg.exec_prefix.clone())?;
    let mut cache = Cache::default();
    let mut dirty = false;
    let mut programmed_once = false;
    let mut refresh = tokio::time::interval(cfg.refresh);
    refresh.tick().await;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            u = updates.recv() => match u {
                Some(u) => {
                    cache.apply(u);
                    dirty = true;
                }
                None => return Ok(()),
            },
            () = tokio::time::sleep(cfg.debounce), if dirty && cache.in_sync() => {
                // Drain what queued up meanwhile, then program once.
                while let Ok(u) = updates.try_recv() {
                    cache.apply(u);
                }
                dirty = false;
                let full = !programmed_once;
                match program(&cfg, &cache, backend.as_mut(), full) {
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
            },
            _ = refresh.tick(), if programmed_once => {
                match program(&cfg, &cache, backend.as_mut(), true) {
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

fn program(
    cfg: &Config,
    cache: &Cache,
    backend: &mut dyn dataplane::PolicyDataplane,
    full: bool,
) -> Result<dataplane::ApplyStats, DataplaneError> {
    let loaded = match cache.world() {
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
