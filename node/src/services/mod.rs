//! Kubernetes Services in the BPF data plane, in place of kube-proxy (docs/bpf.md, "Services").
//!
//! The agent watches Services and EndpointSlices straight from the API server (as kube-proxy does; they are
//! not policy, so they do not go through Typha), computes every frontend this node serves
//! ([`model::frontends`]) and writes the changes into the Service maps the BPF programs read
//! ([`crate::dataplane::bpf::services::ServiceMaps`]). A pod's connection to a ClusterIP is translated by the
//! pod's own program (`from_pod`) before policy, so policy judges the backend it goes to; NodePorts are
//! served by programs on the node's own interface (the one holding its InternalIP).
//!
//! When asked (`CARACAL_KUBE_PROXY_CLEANUP`, on unless `false`), it also removes what a kube-proxy left
//! in iptables and nftables, as Calico's eBPF data plane does: the rules of a kube-proxy that no longer
//! runs would translate Services a second time, before Caracal's programs see them.

pub mod model;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::dataplane::bpf::services::ServiceMaps;

/// How the manager runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name.
    pub node: String,
    /// Where the BPF data plane pins its maps and programs.
    pub pin_dir: PathBuf,
    /// The node's network namespace when the agent programs another one (`CARACAL_NETNS`).
    pub netns: Option<PathBuf>,
    /// The prefix that runs a program in that namespace (`ip netns exec NAME`), for iptables and nft.
    pub exec_prefix: Vec<String>,
    /// Remove kube-proxy's rules.
    pub kube_proxy_cleanup: bool,
    /// Connect-time load balancing: the cgroup (v2) the socket programs go on, or None to leave every
    /// connection to the TC programs' translation (`dataplane::bpf::ctlb`).
    pub connect_time_lb: Option<PathBuf>,
}

/// What the manager reports (for `/metrics` and tests).
#[derive(Debug, Default)]
pub struct Stats {
    /// Frontends programmed.
    pub frontends: std::sync::atomic::AtomicUsize,
    /// Syncs done.
    pub syncs: std::sync::atomic::AtomicU64,
}

enum Change {
    Service(Box<Event<Service>>),
    Slice(Box<Event<EndpointSlice>>),
}

fn key_of<K: ResourceExt>(o: &K) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}

/// Applies one watch event to a store; true when the store is whole (after the initial list).
fn apply_event<K: ResourceExt + Clone>(
    store: &mut BTreeMap<String, K>,
    pending: &mut Option<BTreeMap<String, K>>,
    ev: Event<K>,
) -> bool {
    match ev {
        Event::Init => {
            *pending = Some(BTreeMap::new());
            false
        }
        Event::InitApply(o) => {
            pending.get_or_insert_with(BTreeMap::new).insert(key_of(&o), o);
            false
        }
        Event::InitDone => {
            *store = pending.take().unwrap_or_default();
            true
        }
        Event::Apply(o) => {
            store.insert(key_of(&o), o);
            true
        }
        Event::Delete(o) => {
            store.remove(&key_of(&o));
            true
        }
    }
}

/// The node's IPv4 InternalIPs, from its Node object.
async fn node_addresses(client: &Client, node: &str) -> Result<Vec<Ipv4Addr>, kube::Error> {
    let n = Api::<Node>::all(client.clone()).get(node).await?;
    Ok(n.status
        .and_then(|s| s.addresses)
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect())
}

/// The interface holding `addr` in the namespace at `netns` (None: the agent's own).
async fn interface_of(netns: Option<&Path>, addr: Ipv4Addr) -> Option<(String, u32)> {
    let nl = crate::netlink::Netlink::open(netns).await.ok()?;
    for (index, name) in nl.links().await.ok()? {
        let addrs = nl.addrs(index).await.unwrap_or_default();
        if addrs.iter().any(|a| a.addr() == std::net::IpAddr::V4(addr)) {
            return Some((name, index));
        }
    }
    None
}

/// Opens the Service maps, waiting for the BPF data plane to have pinned them.
async fn open_maps(dir: &Path) -> ServiceMaps {
    let mut last = String::new();
    loop {
        match ServiceMaps::open(dir) {
            Ok(m) => return m,
            Err(e) => {
                let e = e.to_string();
                if e != last {
                    info!(error = %e, "waiting for the BPF data plane's Service maps");
                    last = e;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Watches `api` and sends each event into `tx` as `wrap` makes it, until `tx` closes.
fn forward<K>(
    api: Api<K>,
    tx: mpsc::Sender<Change>,
    wrap: fn(Event<K>) -> Change,
    what: &'static str,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    tokio::spawn(async move {
        let mut w = watcher::watcher(api, watcher::Config::default()).boxed();
        while let Some(ev) = w.next().await {
            match ev {
                Ok(ev) => {
                    if tx.send(wrap(ev)).await.is_err() {
                        return;
                    }
                }
                Err(e) => warn!(error = %e, "{what}"),
            }
        }
    })
}

/// Runs until the watches end: keeps the Service maps equal to what the Services and EndpointSlices say,
/// the NodePort programs on the node's interface, and (when asked) kube-proxy's rules away.
pub async fn run(client: Client, cfg: Config, stats: Arc<Stats>) {
    let mut maps = open_maps(&cfg.pin_dir).await;
    info!(frontends = maps.programmed().len(), "Service maps opened");
    let mut addrs: Vec<Ipv4Addr> = Vec::new();
    let mut host_iface: Option<String> = None;
    let mut ctlb_said = String::new();
    let (tx, mut rx) = mpsc::channel(1024);
    let services = forward(
        Api::<Service>::all(client.clone()),
        tx.clone(),
        |ev| Change::Service(Box::new(ev)),
        "watching Services",
    );
    let slices = forward(
        Api::<EndpointSlice>::all(client.clone()),
        tx,
        |ev| Change::Slice(Box::new(ev)),
        "watching EndpointSlices",
    );
    let (mut svc_store, mut slice_store) = (BTreeMap::new(), BTreeMap::new());
    let (mut svc_pending, mut slice_pending) = (None, None);
    let (mut svc_synced, mut slice_synced) = (false, false);
    let mut skipped_said: Vec<String> = Vec::new();
    // Housekeeping (addresses, NodePort programs, kube-proxy's leftovers): at once, then every 30 s, or
    // every second while the NodePort programs are not attached yet (the data plane may still be pinning
    // them).
    let housekeeping = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(housekeeping);
    loop {
        let mut dirty = false;
        tokio::select! {
            ch = rx.recv() => {
                let Some(ch) = ch else { break };
                let mut next = Some(ch);
                // Everything already queued goes into one sync.
                while let Some(ch) = next {
                    match ch {
                        Change::Service(ev) => {
                            svc_synced |= apply_event(&mut svc_store, &mut svc_pending, *ev);
                        }
                        Change::Slice(ev) => {
                            slice_synced |= apply_event(&mut slice_store, &mut slice_pending, *ev);
                        }
                    }
                    next = rx.try_recv().ok();
                }
                dirty = true;
            }
            () = &mut housekeeping => {
                // The node's addresses and interface (NodePorts), and kube-proxy's leftovers.
                match node_addresses(&client, &cfg.node).await {
                    Ok(a) if a != addrs => {
                        info!(addresses = ?a, "NodePorts on the node's addresses");
                        addrs = a;
                        dirty = true;
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "reading this node's addresses"),
                }
                if let Some(first) = addrs.first().copied() {
                    attach_host(&cfg, first, &mut host_iface).await;
                    connect_time_lb(&cfg, first, &mut ctlb_said).await;
                }
                if cfg.kube_proxy_cleanup {
                    let removed = cleanup_kube_proxy(&cfg.exec_prefix).await;
                    if removed > 0 {
                        info!(removed, "removed kube-proxy's rules (the BPF data plane handles Services)");
                    }
                }
                let next = if host_iface.is_some() { 30 } else { 1 };
                housekeeping.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(next));
            }
        }
        if !dirty || !svc_synced || !slice_synced {
            continue;
        }
        let started = Instant::now();
        let f = model::frontends(svc_store.values(), slice_store.values(), &cfg.node, &addrs);
        if f.skipped != skipped_said {
            for s in f.skipped.iter().filter(|s| !skipped_said.contains(s)) {
                warn!(service = %s, "not served by the BPF data plane");
            }
            skipped_said = f.skipped.clone();
        }
        match maps.apply(&f.frontends) {
            Ok(done) => {
                stats
                    .frontends
                    .store(f.frontends.len(), std::sync::atomic::Ordering::Relaxed);
                stats.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if done.written + done.removed > 0 {
                    debug!(
                        written = done.written,
                        removed = done.removed,
                        kept = done.kept,
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "Services programmed"
                    );
                }
            }
            Err(e) => warn!(error = %e, "writing the Service maps"),
        }
    }
    services.abort();
    slices.abort();
}

/// Keeps the NodePort programs on the interface holding `addr` (and on no other).
async fn attach_host(cfg: &Config, addr: Ipv4Addr, current: &mut Option<String>) {
    let Some((iface, index)) = interface_of(cfg.netns.as_deref(), addr).await else {
        warn!(%addr, "no interface holds the node's address: NodePorts are not served");
        return;
    };
    if current.as_deref() == Some(iface.as_str()) {
        return;
    }
    let (dir, name) = (cfg.pin_dir.clone(), iface.clone());
    let done = crate::netlink::in_netns(cfg.netns.as_deref(), move || {
        crate::dataplane::bpf::detach_host(&dir, Some(&name)).map_err(std::io::Error::other)?;
        crate::dataplane::bpf::attach_host(&dir, &name, index).map_err(std::io::Error::other)
    })
    .await;
    match done {
        Ok(true) => {
            info!(%iface, "NodePort programs attached");
            *current = Some(iface);
        }
        Ok(false) => warn!("the BPF programs are not pinned: NodePorts are not served"),
        Err(e) => warn!(%iface, error = %e, "attaching the NodePort programs"),
    }
}

/// Keeps connect-time load balancing as configured: the socket programs on the cgroup and the node's own
/// namespace registered with its address `addr` (so the node's own connections to a ClusterIP are
/// translated too), or the programs detached. `said` is what was last logged, so a steady state logs once.
async fn connect_time_lb(cfg: &Config, addr: Ipv4Addr, said: &mut String) {
    use crate::dataplane::bpf::ctlb;
    let (dir, cgroup) = (cfg.pin_dir.clone(), cfg.connect_time_lb.clone());
    let done = crate::netlink::in_netns(cfg.netns.as_deref(), move || {
        let Some(cgroup) = cgroup else {
            ctlb::detach_sockets(&dir).map_err(std::io::Error::other)?;
            return Ok("off: every Service connection is translated per packet".to_owned());
        };
        let cookie = ctlb::this_netns_cookie()?;
        let entry = ctlb::NsEntry {
            addr: addr.octets(),
            flags: ctlb::CTLB_HOST,
            ifindex: 0,
            pad: 0,
        };
        if !ctlb::attach_sockets(&dir, &cgroup).map_err(std::io::Error::other)? {
            return Ok("waiting for the BPF programs to be pinned".to_owned());
        }
        ctlb::register(&dir, cookie, entry).map_err(std::io::Error::other)?;
        Ok(format!(
            "on (TCP), socket programs on the cgroup {}",
            cgroup.display()
        ))
    })
    .await;
    let now = match done {
        Ok(s) => s,
        Err(e) => format!("failed: {e}"),
    };
    if now != *said {
        if now.starts_with("failed") {
            warn!(state = %now, "connect-time load balancing (the TC programs translate every Service connection)");
        } else {
            info!(state = %now, "connect-time load balancing");
        }
        *said = now;
    }
}

/// The chains a kube-proxy makes in iptables mode (kubelet's own `KUBE-` chains are left alone).
fn kube_proxy_chain(name: &str) -> bool {
    name.starts_with("KUBE-")
        && !matches!(
            name,
            "KUBE-KUBELET-CANARY" | "KUBE-IPTABLES-HINT" | "KUBE-FIREWALL"
        )
}

/// An `iptables-restore` script that removes kube-proxy's chains and the rules that jump to them, from an
/// `iptables-save` dump; None when there is nothing of it.
pub fn kube_proxy_cleanup_script(save: &str) -> Option<String> {
    let mut out = String::new();
    let mut table = String::new();
    let mut deletes = Vec::new();
    let mut chains = Vec::new();
    let flush = |out: &mut String, table: &str, deletes: &mut Vec<String>, chains: &mut Vec<String>| {
        if deletes.is_empty() && chains.is_empty() {
            return;
        }
        out.push_str(&format!("*{table}\n"));
        for d in deletes.drain(..) {
            out.push_str(&format!("-D {d}\n"));
        }
        for c in chains.iter() {
            out.push_str(&format!("-F {c}\n"));
        }
        for c in chains.drain(..) {
            out.push_str(&format!("-X {c}\n"));
        }
        out.push_str("COMMIT\n");
    };
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_owned();
        } else if line == "COMMIT" {
            flush(&mut out, &table, &mut deletes, &mut chains);
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or_default();
            if kube_proxy_chain(name) {
                chains.push(name.to_owned());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let (chain, rest) = rule.split_once(' ').unwrap_or((rule, ""));
            let target = rest
                .split_whitespace()
                .skip_while(|w| *w != "-j" && *w != "-g")
                .nth(1)
                .unwrap_or_default();
            if !kube_proxy_chain(chain) && kube_proxy_chain(target) {
                deletes.push(rule.to_owned());
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Removes kube-proxy's rules: its iptables chains (IPv4 and IPv6) and its nftables tables. Returns how
/// many chains and tables went.
pub async fn cleanup_kube_proxy(exec_prefix: &[String]) -> usize {
    let prefix = exec_prefix.to_vec();
    tokio::task::spawn_blocking(move || {
        let run = |args: &[&str], stdin: Option<&str>| -> Option<String> {
            use std::io::Write as _;
            let mut all: Vec<&str> = prefix.iter().map(String::as_str).collect();
            all.extend(args);
            let mut cmd = std::process::Command::new(all[0]);
            cmd.args(&all[1..])
                .stdin(if stdin.is_some() {
                    std::process::Stdio::piped()
                } else {
                    std::process::Stdio::null()
                })
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = cmd.spawn().ok()?;
            if let (Some(text), Some(mut sin)) = (stdin, child.stdin.take()) {
                let _ = sin.write_all(text.as_bytes());
            }
            let out = child.wait_with_output().ok()?;
            if !out.status.success() {
                warn!(command = ?args, stderr = %String::from_utf8_lossy(&out.stderr), "kube-proxy cleanup");
                return None;
            }
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let mut removed = 0;
        for (save, restore) in [
            ("iptables-save", "iptables-restore"),
            ("ip6tables-save", "ip6tables-restore"),
        ] {
            let Some(dump) = run(&[save], None) else { continue };
            if let Some(script) = kube_proxy_cleanup_script(&dump) {
                removed += script.lines().filter(|l| l.starts_with("-X ")).count();
                run(&[restore, "--noflush"], Some(&script));
            }
        }
        // kube-proxy's nftables mode keeps everything in tables of its own.
        let tables = run(&["nft", "list", "tables"], None).unwrap_or_default();
        for family in ["ip", "ip6"] {
            if tables
                .lines()
                .any(|l| l.trim() == format!("table {family} kube-proxy"))
                && run(&["nft", "delete", "table", family, "kube-proxy"], None).is_some()
            {
                removed += 1;
            }
        }
        removed
    })
    .await
    .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cleanup_removes_kube_proxy_chains_and_the_jumps_to_them_only() {
        let save = "\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
:crc-nat - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -j KUBE-SERVICES
-A POSTROUTING -j crc-nat
-A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-ABC
COMMIT
*filter
:FORWARD ACCEPT [0:0]
:crc-FORWARD - [0:0]
-A FORWARD -j crc-FORWARD
COMMIT
";
        let script = kube_proxy_cleanup_script(save).expect("something to remove");
        assert_eq!(
            script,
            "*nat\n\
-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-D OUTPUT -j KUBE-SERVICES\n\
-F KUBE-SERVICES\n-F KUBE-SVC-ABC\n-X KUBE-SERVICES\n-X KUBE-SVC-ABC\nCOMMIT\n"
        );
        let clean = "*filter\n:FORWARD ACCEPT [0:0]\n:KUBE-KUBELET-CANARY - [0:0]\n-A FORWARD -j crc-FORWARD\nCOMMIT\n";
        assert_eq!(kube_proxy_cleanup_script(clean), None);
    }
}
