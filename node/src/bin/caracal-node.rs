//! `caracal-node`: the per-node agent: the policy loop (datastore -> calculation -> iptables), the IPAM
//! server and the CNI server the `caracal-cni` plugin forwards to, and routing (node address, VXLAN,
//! routes, natOutgoing, MTU); health and metrics.
//!
//! Configuration (environment, as the operator renders the DaemonSet):
//! - `CARACAL_NODE_NAME` (required): this node's name.
//! - `CARACAL_DATAPLANE`: `Iptables` (default) or `BPF` (which also serves Services in place of kube-proxy;
//!   `CARACAL_KUBE_PROXY_CLEANUP=false` leaves a kube-proxy's rules alone).
//!
//! `caracal-node bpf dump IFACE [PROTO SRC DST [SPORT DPORT | TYPE CODE]]` prints what the BPF data plane
//! holds for a pod's interface (its tables, counters and flows) and, given a packet, each table's verdict
//! with the entry that decided (in the namespace `CARACAL_NETNS` names, when set).
//! - `CARACAL_HEALTH_PORT` (9099) and `CARACAL_METRICS_PORT` (9091): `/healthz` `/readyz` and `/metrics`.
//! - `CARACAL_HEALTH_HOST` (127.0.0.1) and `CARACAL_METRICS_HOST` (every address): where each listens.
//! - FelixConfiguration (`default`, then `node.<name>`) overrides these listeners, the refresh and the log
//!   level live, and decides the data plane and IPv6 at start (`caracal_node::felix`).
//! - `CARACAL_NETNS`: program the data plane of this named network namespace instead of the agent's own
//!   (for a lab where agents reach the API server from the host).
//! - `CARACAL_LOG_FORMAT=json` for JSON logs; `KUBECONFIG` or the in-cluster service account for the API.
//! - `CARACAL_CNI_SOCKET` (/var/run/caracal/cni.sock): where the CNI server listens.
//! - `CARACAL_BPF_CGROUP` (the DaemonSet: `/host/sys/fs/cgroup`, the host's `/sys/fs/cgroup`): the cgroup
//!   hierarchy the BPF data plane's socket programs (connect-time load balancing) go on.
//! - `CARACAL_STATE_DIR` (/var/lib/caracal): the IPAM journal, BIRD's and WireGuard's files, the pods'
//!   namespace cookies (connect-time load balancing).
//! - `CARACAL_IPV4_AUTODETECTION` (first-found) or `CARACAL_IP` (an address/prefix to use as is).
//! - IPv6 (pods get an IPv6 address too, `ip6tables` enforces policy, IPv6 blocks are routed) is on when
//!   `CARACAL_IPV6_AUTODETECTION` names a method or `CARACAL_IP6` an address/prefix; `none` or unset means
//!   off. The operator sets the method when the Installation has an IPv6 pool.
//! - `CARACAL_BGP` (`Enabled`/`Disabled`), `CARACAL_MTU` (an explicit pod MTU).
//! - `CARACAL_IPAM_RESERVE` (32), `CARACAL_IPAM_GC_GRACE_SECONDS` (900), `CARACAL_REFRESH_SECONDS` (90).
//! - Typha: `CARACAL_TYPHA_ADDRS` (`host:port,...`) or `CARACAL_TYPHA_SERVICE` (`name.namespace`: the
//!   ready endpoints of that Service's EndpointSlices, read from the API server before each connection) with
//!   `CARACAL_TYPHA_CA_FILE`, `CARACAL_TYPHA_CERT_FILE`, `CARACAL_TYPHA_KEY_FILE` and
//!   `CARACAL_TYPHA_SERVER_NAME` (caracal-typha); without them the agent watches the API server directly.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use caracal_datastore::api;
use caracal_node::agent::{self, Config, Status};
use tokio::sync::mpsc;

/// Where Typha is: fixed replicas (`CARACAL_TYPHA_ADDRS`, `host:port,...`), or the ready endpoints of the
/// Service `CARACAL_TYPHA_SERVICE` (`name.namespace`) read from the API server before each connection.
enum Typha {
    Fixed(Vec<String>),
    Service(String, String),
}

fn typha() -> Option<Typha> {
    if let Ok(list) = std::env::var("CARACAL_TYPHA_ADDRS")
        && !list.is_empty()
    {
        return Some(Typha::Fixed(list.split(',').map(str::to_owned).collect()));
    }
    let svc = std::env::var("CARACAL_TYPHA_SERVICE")
        .ok()
        .filter(|s| !s.is_empty())?;
    let (ns, name) = caracal_node::typha::service_ref(&svc);
    Some(Typha::Service(ns, name))
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Connect-time load balancing in BPF mode (FelixConfiguration `bpfConnectTimeLoadBalancing`, on unless
/// Disabled): the cgroup (v2) its socket programs go on: the hierarchy at `CARACAL_BPF_CGROUP` (the host's
/// `/sys/fs/cgroup`, which the DaemonSet mounts at `/host/sys/fs/cgroup`; its `unified` beside v1), or else
/// the one this process sees; None when off.
fn connect_time_lb(on: bool) -> Option<std::path::PathBuf> {
    if !on {
        return None;
    }
    use caracal_node::dataplane::bpf::ctlb;
    let given = std::env::var_os("CARACAL_BPF_CGROUP")
        .filter(|c| !c.is_empty())
        .map(std::path::PathBuf::from);
    let found = given.as_deref().and_then(ctlb::cgroup2_root);
    if let (Some(g), None) = (&given, &found) {
        tracing::warn!(path = %g.display(), "CARACAL_BPF_CGROUP holds no cgroup v2 hierarchy: using this process's own");
    }
    let cgroup = found.or_else(ctlb::cgroup2_mount);
    if cgroup.is_none() {
        tracing::warn!(
            "no cgroup v2 hierarchy is mounted: connect-time load balancing is off (set CARACAL_BPF_CGROUP)"
        );
    }
    cgroup
}

/// `caracal-node bpf dump IFACE [PACKET...]`.
fn bpf_command(args: &[String]) -> anyhow::Result<()> {
    use caracal_node::dataplane::bpf::{backend, dump};
    let [cmd, iface, packet @ ..] = args else {
        anyhow::bail!("usage: caracal-node bpf dump IFACE [PROTO SRC DST [SPORT DPORT | TYPE CODE]]");
    };
    anyhow::ensure!(cmd == "dump", "unknown bpf command {cmd:?}: use dump");
    let packet = if packet.is_empty() {
        None
    } else {
        Some(dump::parse_packet(packet).map_err(anyhow::Error::msg)?)
    };
    let mut prefix = Vec::new();
    if let Ok(ns) = std::env::var("CARACAL_NETNS")
        && !ns.is_empty()
    {
        let file = std::fs::File::open(format!("/run/netns/{ns}")).context("opening CARACAL_NETNS")?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("entering CARACAL_NETNS")?;
        prefix = vec!["ip".into(), "netns".into(), "exec".into(), ns];
    }
    print!(
        "{}",
        dump::dump(&backend::pin_dir(&prefix), iface, packet.as_ref())?
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--version") {
        println!("caracal-node v{}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("bpf") {
        return bpf_command(&args[1..]);
    }
    agent_main()
}

/// Sets the log level the agent's filter admits (from FelixConfiguration's `logSeverityScreen`).
type SetLevel = Box<dyn Fn(&str) + Send + Sync>;

/// Logging to stderr (JSON with `CARACAL_LOG_FORMAT=json`), filtered by `RUST_LOG` when set, else by the level
/// the returned function sets (info until FelixConfiguration says otherwise).
fn init_logs() -> SetLevel {
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let fixed = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| "info".into());
    // Colours only on a terminal (a container runtime writes the log to a file).
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let reload: Box<dyn Fn(tracing_subscriber::EnvFilter) + Send + Sync> =
        if env("CARACAL_LOG_FORMAT", "text") == "json" {
            let builder = fmt.json().with_env_filter(filter).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |f| {
                let _ = handle.reload(f);
            })
        } else {
            let builder = fmt.with_env_filter(filter).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |f| {
                let _ = handle.reload(f);
            })
        };
    Box::new(move |level: &str| {
        if !fixed {
            reload(tracing_subscriber::EnvFilter::new(level));
        }
    })
}

/// Keeps the health and metrics listeners where FelixConfiguration says (each moves, starts or stops as its
/// settings change), and the log level.
async fn follow_felix(
    mut rx: tokio::sync::watch::Receiver<caracal_node::felix::Felix>,
    status: Arc<Status>,
    set_level: SetLevel,
) {
    use caracal_node::felix::Listen;
    let mut running: [Option<(Listen, Vec<tokio::task::JoinHandle<()>>)>; 2] = [None, None];
    loop {
        let f = rx.borrow_and_update().clone();
        set_level(caracal_node::felix::log_directive(f.log_severity));
        for (i, (what, want)) in [("health", f.health), ("metrics", f.metrics)]
            .into_iter()
            .enumerate()
        {
            if running[i].as_ref().map(|(l, _)| l) == Some(&want) {
                continue;
            }
            if let Some((_, tasks)) = running[i].take() {
                // Wait until the old listeners are gone: a move to another host on the same port binds it
                // again at once.
                for t in tasks {
                    t.abort();
                    let _ = t.await;
                }
            }
            let mut tasks = Vec::new();
            if want.enabled {
                let addrs = want.addrs();
                if addrs.is_empty() {
                    tracing::warn!(host = %want.host, "the {what} server's host does not resolve: not listening");
                }
                for addr in addrs {
                    let status = status.clone();
                    tracing::info!(%addr, "{what} server listening");
                    tasks.push(tokio::spawn(async move {
                        if let Err(e) = caracal_datastore::http::serve(addr, status).await {
                            tracing::warn!(%addr, error = %e, "the {what} server cannot listen");
                        }
                    }));
                }
            }
            running[i] = Some((want, tasks));
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// FelixConfiguration `default` and `node.<node>` as the API server has them now (absent, or unreadable:
/// None), so the agent starts with the data plane and IPv6 setting they ask for.
async fn felix_at_start(
    client: &kube::Client,
    node: &str,
) -> (Option<serde_json::Value>, Option<serde_json::Value>) {
    let api: kube::Api<caracal_crds::felix::FelixConfiguration> = kube::Api::all(client.clone());
    let get = |name: String| {
        let api = api.clone();
        async move {
            api.get_opt(&name)
                .await
                .ok()
                .flatten()
                .and_then(|f| serde_json::to_value(f).ok())
        }
    };
    (get("default".into()).await, get(format!("node.{node}")).await)
}

#[tokio::main]
async fn agent_main() -> anyhow::Result<()> {
    let set_level = init_logs();
    let node_name = std::env::var("CARACAL_NODE_NAME")
        .context("CARACAL_NODE_NAME must name this node (the DaemonSet sets it from spec.nodeName)")?;
    let port = |var: &str, default: u16| -> anyhow::Result<u16> {
        env(var, &default.to_string())
            .parse()
            .with_context(|| format!("{var} must be a port number"))
    };
    let mut defaults = caracal_node::felix::Defaults::default();
    defaults.health.host = env("CARACAL_HEALTH_HOST", "127.0.0.1");
    defaults.health.port = port("CARACAL_HEALTH_PORT", 9099)?;
    defaults.metrics.host = env("CARACAL_METRICS_HOST", "");
    defaults.metrics.port = port("CARACAL_METRICS_PORT", 9091)?;
    let exec_prefix = match std::env::var("CARACAL_NETNS") {
        Ok(ns) if !ns.is_empty() => vec!["ip".into(), "netns".into(), "exec".into(), ns],
        _ => Vec::new(),
    };
    let status = Arc::new(Status::default());
    // A short queue: during the initial list of a large cluster the watches wait for the agent rather than
    // pile up thousands of documents (each a few KiB of JSON) that the allocator then keeps.
    let (tx, rx) = mpsc::channel(256);
    // IPAM writes to the API server whether the datastore comes from it or from Typha.
    let client = kube::Client::try_default()
        .await
        .context("connecting to the API server (in-cluster or KUBECONFIG)")?;
    let watches = match typha() {
        // Through Typha when the configuration names it, directly otherwise: the same updates either way.
        Some(found) => {
            let read = |var: &str| -> anyhow::Result<String> {
                let path = std::env::var(var)
                    .with_context(|| format!("{var} must name a PEM file to talk to Typha"))?;
                std::fs::read_to_string(&path).with_context(|| format!("{var}: reading {path}"))
            };
            let tls = caracal_datastore::typha::tls::client_config(
                &read("CARACAL_TYPHA_CA_FILE")?,
                &read("CARACAL_TYPHA_CERT_FILE")?,
                &read("CARACAL_TYPHA_KEY_FILE")?,
            )?;
            let (addrs, discover) = match found {
                Typha::Fixed(addrs) => (addrs, None),
                Typha::Service(ns, name) => (
                    Vec::new(),
                    Some(caracal_node::typha::discover(client.clone(), ns, name)),
                ),
            };
            let mut cfg = caracal_datastore::typha::client::Config::new(addrs, &node_name);
            cfg.server_identity = env("CARACAL_TYPHA_SERVER_NAME", "caracal-typha");
            vec![tokio::spawn(caracal_datastore::typha::client::run_discovering(
                cfg, discover, tls, tx,
            ))]
        }
        None => api::watch(client.clone(), tx),
    };
    let netns = std::env::var("CARACAL_NETNS")
        .ok()
        .filter(|n| !n.is_empty())
        .map(|n| caracal_node::netlink::named_netns(&n));
    let nl = caracal_node::netlink::Netlink::open(netns.as_deref())
        .await
        .context("netlink")?;
    let mut ipam_cfg = caracal_node::ipam::node::Config::new(&node_name, caracal_node::state_dir());
    ipam_cfg.reserve = env("CARACAL_IPAM_RESERVE", "32")
        .parse()
        .context("CARACAL_IPAM_RESERVE")?;
    ipam_cfg.gc_grace = Duration::from_secs(
        env("CARACAL_IPAM_GC_GRACE_SECONDS", "900")
            .parse()
            .context("CARACAL_IPAM_GC_GRACE_SECONDS")?,
    );
    let ipam = caracal_node::ipam::node::NodeIpam::start(client.clone(), ipam_cfg)
        .await
        .context("starting IPAM")?;
    let method = match std::env::var("CARACAL_IP") {
        Ok(ip) if !ip.is_empty() => caracal_node::routing::address::Method::Fixed(
            ip.parse()
                .context("CARACAL_IP must be an address with its prefix, like 10.0.0.2/24")?,
        ),
        _ => caracal_node::routing::address::parse(&env("CARACAL_IPV4_AUTODETECTION", "first-found"))?,
    };
    let method6 = match (
        std::env::var("CARACAL_IP6"),
        std::env::var("CARACAL_IPV6_AUTODETECTION"),
    ) {
        (Ok(ip), _) if !ip.is_empty() && ip != "none" => Some(caracal_node::routing::address::Method::Fixed(
            ip.parse()
                .context("CARACAL_IP6 must be an address with its prefix, like fd00::2/64")?,
        )),
        (_, Ok(m)) if !m.trim().is_empty() && m.trim() != "none" => {
            Some(caracal_node::routing::address::parse(&m)?)
        }
        _ => None,
    };
    // FelixConfiguration's bpfEnabled and ipv6Support, when set, decide over the environment: a restart
    // that a change of either asks for comes back up with what it asks for.
    let (felix_default, felix_node) = felix_at_start(&client, &node_name).await;
    defaults.refresh = Duration::from_secs(
        env("CARACAL_REFRESH_SECONDS", "90")
            .parse()
            .context("CARACAL_REFRESH_SECONDS")?,
    );
    defaults.bpf = env("CARACAL_DATAPLANE", "Iptables") == "BPF";
    defaults.ipv6 = method6.is_some();
    let (at_start, _) =
        caracal_node::felix::Felix::effective(felix_default.as_ref(), felix_node.as_ref(), &defaults);
    let running = at_start.restart_key();
    let ipv6 = at_start.ipv6;
    let method6 = method6.filter(|_| ipv6);
    let (felix_tx, felix_rx) = tokio::sync::watch::channel(at_start);
    let listeners = tokio::spawn(follow_felix(felix_rx, status.clone(), set_level));
    let mtu = Arc::new(std::sync::atomic::AtomicU32::new(1450));
    let explicit_mtu = match std::env::var("CARACAL_MTU") {
        Ok(m) if !m.is_empty() && m != "0" => Some(m.parse().context("CARACAL_MTU must be a number")?),
        _ => None,
    };
    let routing = caracal_node::routing::Routing::new(
        caracal_node::routing::Config {
            node: node_name.clone(),
            method,
            method6,
            bgp: env("CARACAL_BGP", "Disabled") == "Enabled",
            mtu: explicit_mtu,
            exec_prefix: exec_prefix.clone(),
            state_dir: caracal_node::state_dir(),
            // The DaemonSet sets it from the pod's namespace (the downward API).
            namespace: env("CARACAL_NAMESPACE", "caracal-system"),
        },
        nl.clone(),
        client.clone(),
        ipam.clone(),
        mtu.clone(),
    )
    .with_wireguard_devices(Box::new(caracal_node::wireguard::kernel::AutoFactory {
        netns: std::env::var("CARACAL_NETNS")
            .ok()
            .filter(|n| !n.is_empty())
            .map(|n| caracal_node::netlink::named_netns(&n)),
        chosen: None,
        // CARACAL_WIREGUARD_BACKEND=userspace: boringtun's device even where the kernel has WireGuard.
        userspace_only: env("CARACAL_WIREGUARD_BACKEND", "auto") == "userspace",
    }));
    let _ = status.wireguard.set(routing.wireguard_report.clone());
    let _ = status.bgp_left_out.set(routing.bgp_left_out.clone());
    let cni = caracal_node::cni::server::CniServer {
        ipam: ipam.clone(),
        node: nl,
        mtu,
        status: status.clone(),
        netns_records: Some(caracal_node::netns_records_dir()),
    };
    let socket = std::path::PathBuf::from(env("CARACAL_CNI_SOCKET", "/var/run/caracal/cni.sock"));
    // On a thread of its own (it stops with the process).
    cni.spawn(socket).context("starting the CNI server's thread")?;
    let refresh = defaults.refresh;
    let dataplane = match (running.bpf, env("CARACAL_DATAPLANE", "Iptables")) {
        (true, _) => "BPF".to_owned(),
        (false, d) if d == "BPF" => "Iptables".to_owned(),
        (false, d) => d,
    };
    // In BPF mode the agent also replaces kube-proxy: Services and EndpointSlices into the BPF maps.
    if dataplane == "BPF" {
        let stats = status.bpf_conntrack.get_or_init(Default::default).clone();
        caracal_node::dataplane::bpf::sweep::spawn(
            caracal_node::dataplane::bpf::backend::pin_dir(&exec_prefix),
            stats,
        )
        .context("starting the BPF connection tracker's sweeper")?;
    }
    let connect_time_lb = connect_time_lb(running.connect_time_lb);
    let services = (dataplane == "BPF").then(|| {
        let cfg = caracal_node::services::Config {
            node: node_name.clone(),
            pin_dir: caracal_node::dataplane::bpf::backend::pin_dir(&exec_prefix),
            netns: std::env::var("CARACAL_NETNS")
                .ok()
                .filter(|n| !n.is_empty())
                .map(|n| caracal_node::netlink::named_netns(&n)),
            exec_prefix: exec_prefix.clone(),
            kube_proxy_cleanup: env("CARACAL_KUBE_PROXY_CLEANUP", "true") != "false",
            connect_time_lb,
        };
        let stats = status.services.get_or_init(Default::default).clone();
        tokio::spawn(caracal_node::services::run(client.clone(), cfg, stats))
    });
    let cfg = Config {
        node_name,
        dataplane,
        exec_prefix,
        debounce: Duration::from_millis(20),
        refresh,
        ipv6,
    };
    let parts = agent::Parts {
        ipam: Some(ipam),
        routing: Some(routing),
        gc_every: Some(Duration::from_secs(30).min(refresh)),
        events: Some(client.clone()),
        felix: Some(agent::FelixParts {
            defaults,
            running,
            tx: felix_tx,
        }),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let result = agent::run(cfg, rx, status.clone(), parts, shutdown).await;
    watches.iter().for_each(tokio::task::JoinHandle::abort);
    services.iter().for_each(tokio::task::JoinHandle::abort);
    listeners.abort();
    result.context("the policy data plane")?;
    if let Some(why) = status.restart.get() {
        // Exits so that the kubelet starts the agent again, which then runs what FelixConfiguration says.
        anyhow::bail!("{why}");
    }
    Ok(())
}
