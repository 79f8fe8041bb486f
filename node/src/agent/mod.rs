//! The node agent's loop: datastore updates in, the kernel converged out.
//!
//! Updates of the kinds policy reads go to the policy [`engine`], a thread of its own that decodes each
//! object once, keeps the calculation graph and programs the policy data plane with what changed. Every
//! update (policy kinds as bare keys) also goes to a [`Cache`] that routing reads and IPAM's garbage
//! collector consults. IPAM's assignments are sent to the engine as they change, so a new pod's policy is
//! programmed from the addresses IPAM gave it, before the kubelet reports them.
//!
//! Stopping the agent leaves the rules in place: traffic keeps flowing and policy keeps being enforced while
//! it restarts; the next agent adopts them on its first, full, program.

pub mod engine;
pub mod pipeline;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use caracal_datastore::{Cache, Update};
use caracal_policy::decode::{DATAPLANE_KINDS, POLICY_KINDS};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::dataplane::{self, DataplaneError};
use crate::felix::{Defaults, Felix};
use crate::ipam::node::{Held, NodeIpam, attr};
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
    /// The least time between two programs: a change that finds the engine idle is programmed at once,
    /// later ones within `debounce` of that program are gathered until then.
    pub debounce: Duration,
    /// How often to converge with a full read-back (Felix's `iptablesRefreshInterval`, 90 s by default).
    pub refresh: Duration,
    /// Enforce policy on IPv6 too (`ip6tables`; Felix's `ipv6Support`).
    pub ipv6: bool,
}

/// The agent's optional parts beyond policy: IPAM (whose assignments are the local pods' addresses),
/// routing, and where to report objects that fail to convert.
#[derive(Default)]
pub struct Parts {
    /// The node's IPAM server.
    pub ipam: Option<NodeIpam>,
    /// Routing.
    pub routing: Option<Routing>,
    /// How often IPAM garbage collection runs.
    pub gc_every: Option<Duration>,
    /// Records a Warning Event on each object that fails to convert.
    pub events: Option<kube::Client>,
    /// FelixConfiguration: the defaults the environment gives and where the settings in effect go.
    pub felix: Option<FelixParts>,
}

/// The agent's FelixConfiguration side.
pub struct FelixParts {
    /// What applies where FelixConfiguration says nothing (`bpf` and `ipv6` as the environment has them).
    pub defaults: Defaults,
    /// What this process runs that only a restart changes.
    pub running: crate::felix::RestartKey,
    /// The settings in effect, for what the agent's loop does not own (its listeners, its log level).
    pub tx: tokio::sync::watch::Sender<Felix>,
}

/// The FelixConfiguration kind.
pub const FELIX_KIND: &str = "caracal.dev/v1/FelixConfiguration";

/// The settings in effect from what `cache` holds (`default` and `node.<node>`).
pub fn felix_from(cache: &Cache, node: &str, defaults: &Defaults) -> (Felix, Vec<crate::felix::FelixError>) {
    Felix::effective(
        cache.get(FELIX_KIND, "default"),
        cache.get(FELIX_KIND, &format!("node.{node}")),
        defaults,
    )
}

/// What the agent exposes to health checks and metrics.
#[derive(Debug, Default)]
pub struct Status {
    /// The first program from a complete datastore view succeeded: every valid object is enforced.
    pub ready: AtomicBool,
    /// Data plane programs (changes and full converges).
    pub programs: AtomicU64,
    /// Full read-backs that found something to repair.
    pub repairs: AtomicU64,
    /// Programs that failed.
    pub failures: AtomicU64,
    /// Routing syncs that changed something after the first (drift or datastore changes).
    pub routing_changes: AtomicU64,
    /// Routing syncs that failed.
    pub routing_failures: AtomicU64,
    /// Why the agent stopped to be started again (a FelixConfiguration change that needs a restart).
    pub restart: std::sync::OnceLock<String>,
    /// Objects that failed to decode or convert, by kind (the kinds are a fixed list).
    pub conversion_failures: Mutex<BTreeMap<&'static str, u64>>,
    /// The last program's duration, in microseconds.
    pub last_program_us: AtomicU64,
    /// From the first change a program applied arriving at the engine to the program's end, in
    /// microseconds (the last incremental program).
    pub last_change_us: AtomicU64,
    /// Where the BPF data plane's maps are pinned, when it is the one running: `/metrics` reads the
    /// per-endpoint counters there.
    pub bpf_pins: std::sync::OnceLock<std::path::PathBuf>,
    /// The BPF counters as last read for `/metrics`, with when: reading them walks a map of every endpoint
    /// and names each interface, so scrapes closer together than [`BPF_COUNTERS_MAX_AGE`] share one read
    /// (a scraper polling every few milliseconds would otherwise take a CPU from the policy engine).
    pub bpf_counters: Mutex<Option<(std::time::Instant, Arc<BpfCounterRows>)>>,
    /// The BPF data plane's Service manager, when it runs.
    pub services: std::sync::OnceLock<Arc<crate::services::Stats>>,
    /// What the WireGuard managers reported last (IPv4, IPv6).
    pub wireguard: std::sync::OnceLock<Arc<Mutex<[crate::routing::wireguard::Report; 2]>>>,
    /// BGP sessions left out because their password cannot be read: (peer address, why).
    pub bgp_left_out: std::sync::OnceLock<crate::routing::LeftOut>,
    /// The BPF connection tracker's sweeper, when it runs.
    pub bpf_conntrack: std::sync::OnceLock<Arc<dataplane::bpf::sweep::SweepStats>>,
    /// How long each CNI ADD took in the agent (request read to answer: address, wiring).
    pub cni_add: CniAddSeconds,
}

/// The CNI ADD duration histogram (`caracal_node_cni_add_seconds`), buckets from 1 ms to 10 s.
#[derive(Debug, Clone)]
pub struct CniAddSeconds(pub prometheus_client::metrics::histogram::Histogram);

impl Default for CniAddSeconds {
    fn default() -> Self {
        CniAddSeconds(prometheus_client::metrics::histogram::Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]))
    }
}

/// Per endpoint interface: (name, from the pod, to the pod).
pub type BpfCounterRows = Vec<(String, dataplane::bpf::Counters, dataplane::bpf::Counters)>;

/// How often the agent looks for a deleted WireGuard key file (a rotation asked for).
pub const WIREGUARD_KEY_WATCH: Duration = Duration::from_secs(2);

/// How stale the BPF counters on `/metrics` may be.
pub const BPF_COUNTERS_MAX_AGE: Duration = Duration::from_secs(1);

impl Status {
    /// Counts a failed conversion of an object of `kind`.
    pub fn conversion_failed(&self, kind: &str) {
        let Some(k) = DATAPLANE_KINDS.iter().find(|k| **k == kind) else {
            return;
        };
        let mut m = self
            .conversion_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *m.entry(k).or_default() += 1;
    }

    /// Conversion failures by kind, every kind the data plane's model reads listed.
    pub fn conversion_failures(&self) -> Vec<(&'static str, u64)> {
        let m = self
            .conversion_failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        DATAPLANE_KINDS
            .iter()
            .map(|k| (*k, m.get(k).copied().unwrap_or(0)))
            .collect()
    }

    fn record_program(&self, took: Duration) {
        self.last_program_us.store(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// The addresses IPAM gave each local pod (`namespace/name` -> addresses).
fn ipam_addresses(held: &BTreeMap<String, Held>) -> BTreeMap<String, Vec<std::net::IpAddr>> {
    held.values()
        .filter_map(|h| {
            let key = format!("{}/{}", h.attrs.get(attr::NAMESPACE)?, h.attrs.get(attr::POD)?);
            Some((key, h.ips.clone()))
        })
        .collect()
}

fn kind_of(u: &Update) -> &str {
    match u {
        Update::Resync { kind }
        | Update::Upsert { kind, .. }
        | Update::Delete { kind, .. }
        | Update::InSync { kind } => kind,
    }
}

/// Kinds whose changes routing depends on (pod changes do not: the CNI wiring owns pod routes).
fn routing_input(u: &Update) -> bool {
    [
        "v1/Node",
        "caracal.dev/v1/IPPool",
        "caracal.dev/v1/IPAMBlock",
        "caracal.dev/v1/FelixConfiguration",
        "caracal.dev/v1/BGPConfiguration",
        "caracal.dev/v1/BGPPeer",
    ]
    .contains(&kind_of(u))
}

/// The cache's copy of an update: policy kinds keep only their keys (the engine holds what they mean).
fn for_cache(u: &Update) -> Update {
    match u {
        Update::Upsert { kind, key, .. } if POLICY_KINDS.contains(&kind.as_str()) => Update::Upsert {
            kind: kind.clone(),
            key: key.clone(),
            object: serde_json::Value::Null,
        },
        other => other.clone(),
    }
}

/// Converges routing; false when it failed (the next change or refresh retries).
async fn sync_routing(
    routing: &mut Option<Routing>,
    cache: &Cache,
    felix: &Felix,
    status: &Status,
    first: &mut bool,
    force: bool,
) -> bool {
    let Some(r) = routing.as_mut() else { return true };
    match r.sync(cache, felix, force).await {
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

/// Records a Warning Event on an object that failed to convert.
async fn record_event(client: kube::Client, node: String, f: engine::Failure) {
    use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
    let (api_version, kind) = f.kind.rsplit_once('/').unwrap_or(("", f.kind.as_str()));
    let (namespace, name) = match f.key.split_once('/') {
        Some((ns, n)) => (Some(ns.to_owned()), n.to_owned()),
        None => (None, f.key.clone()),
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    let what = if f.kept_last_good {
        "its last good version stays enforced"
    } else if caracal_policy::decode::POLICY_OBJECT_KINDS.contains(&f.kind.as_str()) {
        "it is enforced fail-closed (its rules deny) until it is fixed"
    } else {
        "it is left out until it is fixed"
    };
    let ev = Event {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("{name}.caracal-")),
            namespace: Some(namespace.clone().unwrap_or_else(|| "default".into())),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some(api_version.to_owned()),
            kind: Some(kind.to_owned()),
            name: Some(name.clone()),
            namespace,
            ..Default::default()
        },
        reason: Some("ConversionFailed".into()),
        message: Some(format!(
            "caracal-node on {node} cannot convert this object: {}; {what}",
            f.message
        )),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some("caracal-node".into()),
            host: Some(node.clone()),
        }),
        first_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
        last_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
        count: Some(1),
        ..Default::default()
    };
    let ns = ev.metadata.namespace.clone().unwrap_or_default();
    let api: kube::Api<Event> = kube::Api::namespaced(client, &ns);
    if let Err(e) = api.create(&kube::api::PostParams::default(), &ev).await {
        warn!(error = %e, kind = %f.kind, key = %f.key, "recording the conversion failure as an Event");
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
    let backend = dataplane::backend(&cfg.dataplane, cfg.exec_prefix.clone(), cfg.ipv6)?;
    if cfg.dataplane == "BPF" {
        let _ = status
            .bpf_pins
            .set(dataplane::bpf::backend::pin_dir(&cfg.exec_prefix));
    }
    let Parts {
        ipam,
        mut routing,
        gc_every,
        events,
        felix: felix_parts,
    } = parts;
    let defaults = felix_parts
        .as_ref()
        .map(|f| f.defaults.clone())
        .unwrap_or_else(|| Defaults {
            refresh: cfg.refresh,
            bpf: cfg.dataplane == "BPF",
            ipv6: cfg.ipv6,
            ..Defaults::default()
        });
    let mut felix = Felix::effective(None, None, &defaults).0;
    let running = felix_parts.as_ref().map_or(
        crate::felix::RestartKey {
            bpf: cfg.dataplane == "BPF",
            ipv6: cfg.ipv6,
            connect_time_lb: false,
        },
        |f| f.running,
    );
    let (to_engine, engine_rx) = std::sync::mpsc::channel();
    let (failures_tx, mut failures) = mpsc::unbounded_channel();
    let engine = {
        let (cfg, status) = (cfg.clone(), status.clone());
        std::thread::Builder::new()
            .name("policy-engine".into())
            .spawn(move || engine::run(cfg, backend, status, engine_rx, Some(failures_tx)))
            .map_err(|e| DataplaneError::Internal(format!("starting the policy engine: {e}")))?
    };
    let send = |m: engine::Msg| {
        // The engine only stops when this loop drops its sender.
        let _ = to_engine.send(m);
    };
    let mut ipam_changes = ipam.as_ref().map(NodeIpam::subscribe);
    if let Some(i) = &ipam {
        send(engine::Msg::Held(ipam_addresses(&i.held().await)));
    }
    // The last message reported per object, so an unchanged failure is recorded once.
    let mut reported: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut cache = Cache::default();
    let mut routing_first = true;
    // The full read-backs: routing's (routeRefreshInterval) and the policy data plane's
    // (iptablesRefreshInterval), each on its own schedule.
    let mut route_refresh = tokio::time::interval(felix.route_refresh);
    route_refresh.tick().await;
    let mut policy_refresh = tokio::time::interval(felix.iptables_refresh);
    policy_refresh.tick().await;
    let mut gc = tokio::time::interval(gc_every.unwrap_or(Duration::from_secs(60)));
    gc.tick().await;
    // A deleted WireGuard key file is a key rotation: noticed within this, not at the next full refresh.
    let mut key_watch = tokio::time::interval(WIREGUARD_KEY_WATCH);
    key_watch.tick().await;
    // When routing must sync next: `debounce` after the first routing change (and at once at start).
    let mut routing_due: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    // A BGP password's Secret changed: routing renders BIRD's configuration again.
    let secrets_changed = routing.as_ref().map(|r| r.secrets_changed());
    tokio::pin!(shutdown);
    let result = loop {
        let ipam_changed = async {
            match ipam_changes.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let secret_changed = async {
            match &secrets_changed {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            () = secret_changed => {
                routing_due.get_or_insert_with(|| tokio::time::Instant::now() + cfg.debounce);
            },
            u = updates.recv() => match u {
                Some(u) => {
                    if routing_input(&u) {
                        routing_due.get_or_insert_with(|| tokio::time::Instant::now() + cfg.debounce);
                    }
                    let felix_changed = kind_of(&u) == FELIX_KIND;
                    cache.apply(for_cache(&u));
                    if DATAPLANE_KINDS.contains(&kind_of(&u)) {
                        send(engine::Msg::Update(u));
                    }
                    if felix_changed {
                        let (new, errors) = felix_from(&cache, &cfg.node_name, &defaults);
                        for e in errors {
                            warn!(error = %e, "FelixConfiguration: a field keeps its default");
                        }
                        if new != felix {
                            if new.restart_key() != running {
                                let want = new.restart_key();
                                let why = format!(
                                    "FelixConfiguration asks for bpfEnabled {}, IPv6 {} and connect-time load balancing {} while the agent runs {}, {} and {}: restarting to apply it",
                                    want.bpf, want.ipv6, want.connect_time_lb, running.bpf, running.ipv6, running.connect_time_lb
                                );
                                warn!("{why}");
                                let _ = status.restart.set(why);
                                break Ok(());
                            }
                            if (new.nat_outgoing_address, new.endpoint_to_host)
                                != (felix.nat_outgoing_address, felix.endpoint_to_host)
                            {
                                send(engine::Msg::Felix {
                                    nat_outgoing_address: new.nat_outgoing_address,
                                    endpoint_to_host: new.endpoint_to_host_model(),
                                });
                            }
                            if new.route_refresh != felix.route_refresh {
                                route_refresh = tokio::time::interval_at(tokio::time::Instant::now() + new.route_refresh, new.route_refresh);
                            }
                            if new.iptables_refresh != felix.iptables_refresh {
                                policy_refresh = tokio::time::interval_at(tokio::time::Instant::now() + new.iptables_refresh, new.iptables_refresh);
                            }
                            info!(?new, "FelixConfiguration in effect");
                            if let Some(p) = &felix_parts {
                                p.tx.send_replace(new.clone());
                            }
                            felix = new;
                        }
                    }
                }
                None => break Ok(()),
            },
            true = ipam_changed => {
                if let Some(i) = &ipam {
                    send(engine::Msg::Held(ipam_addresses(&i.held().await)));
                    for iface in i.take_wired() {
                        send(engine::Msg::Wired(iface));
                    }
                }
            },
            Some(f) = failures.recv() => {
                let id = (f.kind.clone(), f.key.clone());
                if reported.get(&id) != Some(&f.message) {
                    if let Some(client) = &events {
                        tokio::spawn(record_event(client.clone(), cfg.node_name.clone(), f.clone()));
                    }
                    reported.insert(id, f.message.clone());
                }
            },
            _ = gc.tick(), if ipam.is_some() && cache.kind_in_sync("v1/Pod") => {
                if let Some(i) = &ipam
                    && let Err(e) = i.gc(|ns, pod| cache.get("v1/Pod", &format!("{ns}/{pod}")).is_some()).await
                {
                    warn!(error = %e, "IPAM garbage collection failed");
                }
            },
            () = tokio::time::sleep_until(routing_due.unwrap_or_else(tokio::time::Instant::now)),
                if routing_due.is_some() && cache.in_sync() => {
                let ok = sync_routing(&mut routing, &cache, &felix, &status, &mut routing_first, false).await;
                // A failed sync is retried after a second (or sooner, at the next routing change).
                routing_due = (!ok).then(|| tokio::time::Instant::now() + Duration::from_secs(1));
            },
            _ = route_refresh.tick() => {
                let ok = sync_routing(&mut routing, &cache, &felix, &status, &mut routing_first, true).await;
                routing_due = (!ok).then(|| tokio::time::Instant::now() + Duration::from_secs(1));
            },
            _ = policy_refresh.tick() => send(engine::Msg::Refresh),
            _ = key_watch.tick() => {
                if routing.as_ref().is_some_and(|r| r.wireguard_key_missing(&felix)) {
                    routing_due.get_or_insert_with(tokio::time::Instant::now);
                }
            },
        }
    };
    drop(to_engine);
    let _ = tokio::task::spawn_blocking(move || engine.join()).await;
    result
}
