//! Wiring a pod into the node: a veth pair whose host side (`crc…`) answers ARP for the pod's link-local
//! gateway 169.254.1.1 by proxy ARP, and whose pod side (`eth0`) carries the pod's /32 and a default route
//! through that gateway. The host gets a /32 route to the pod through the veth. Every pod therefore sees
//! the same gateway and MAC, and all traffic leaves the pod through the node's routing and policy.
//!
//! IPv6 the same way: the pod's /128, and a default route via `fe80::ecee:eeff:feee:eeee`, the link-local
//! address the kernel gives the host side from its MAC `ee:ee:ee:ee:ee:ee`. Duplicate address detection is
//! off on both ends (`accept_dad=0`), so both addresses work at once rather than after a second of DAD.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use netlink_packet_route::link::LinkMessage;

pub use caracal_cni::{GATEWAY, GATEWAY_V6, HOST_MAC, gateway};

use crate::netlink::blocking::{self, Rtnl};
use crate::netlink::{self, Netlink, NetlinkError, OwnedRoute, PROTO_CARACAL, RouteTarget};

/// One pod interface to wire.
#[derive(Clone, Debug)]
pub struct PodWiring {
    /// Host-side name (`cni::host_iface`).
    pub host_iface: String,
    /// The pod's network namespace (CNI_NETNS).
    pub netns: PathBuf,
    /// The pod's network namespace as the plugin opened it, when it passed one (used instead of `netns`,
    /// which exists only in the runtime's mount namespace).
    pub netns_fd: Option<caracal_cni::NetnsFd>,
    /// The pod-side name (CNI_IFNAME).
    pub ifname: String,
    /// The pod's addresses.
    pub ips: Vec<IpNet>,
    /// The MTU of both ends.
    pub mtu: u32,
    /// Where the BPF policy data plane pins its programs, when it is the node's: the host side gets them
    /// before the pod side comes up (`bpf::attach_pinned`), so the pod's first packet meets its policy.
    pub bpf_pins: Option<PathBuf>,
    /// Where the pod's network namespace cookie is recorded (`dataplane::bpf::ctlb::record`), when anywhere.
    pub netns_records: Option<PathBuf>,
}

/// What was wired, for the CNI result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wired {
    /// The host side's MAC.
    pub host_mac: String,
    /// The pod side's MAC.
    pub pod_mac: String,
}

/// Errors wiring a pod.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The pod's namespace cannot be opened.
    #[error("CNI_NETNS {path}: {source}")]
    Netns {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel refused.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The BPF policy programs could not be attached to the host side: the pod is not wired (it would run
    /// without its policy).
    #[error("closing the pod's interface with the BPF policy programs: {0}")]
    Bpf(#[from] crate::dataplane::bpf::BpfError),
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The pod's addresses as host prefixes (/32, /128).
fn hosts(ips: &[IpNet]) -> Vec<IpNet> {
    ips.iter().map(|ip| IpNet::from(ip.addr())).collect()
}

/// The host route to a pod address through its veth.
pub fn pod_route(ip: IpAddr, index: u32) -> OwnedRoute {
    OwnedRoute {
        dst: IpNet::from(ip),
        target: RouteTarget::Dev(index),
    }
}

/// The loopback device's index: the same in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// A job for a wiring thread: it gets the thread's place in the node's namespace (opened on first use).
type Job = Box<dyn FnOnce(&mut Option<Here>) + Send>;

/// The threads that wire pods, fed first come first served: a fixed few, each with a blocking socket in
/// the node's namespace, entering a pod's namespace only to open a socket there.
///
/// Why a queue and not a thread per pod: a pod's wiring is a few milliseconds of kernel work, most of it
/// under the RTNL lock that every pod takes in turn. Twenty pods wired at once by twenty threads are served
/// in whatever order the scheduler and the lock pick, so some wait for most of the others several times
/// over; a queue served by a few threads serves them in the order they came, and none waits for more than
/// the queue ahead of it.
#[derive(Clone)]
pub struct Wirer {
    jobs: std::sync::mpsc::Sender<Job>,
    node_ns: Option<PathBuf>,
}

/// The nice value of the threads that serve the CNI plugin (the wiring threads and the server's own).
const CNI_NICE: libc::c_int = -10;

/// Gives the calling thread a higher CPU priority ([`CNI_NICE`]). A wiring thread holds the kernel's RTNL
/// lock for most of its work, and when it loses its CPU to a plugin process or an `iptables-restore` while
/// holding it, every other pod's wiring (and every other link change on the node) waits too; the server's
/// thread reads each request and writes each answer, which a kubelet waits for. Without the privilege to
/// raise it (not root, no CAP_SYS_NICE) the thread keeps its priority.
#[expect(unsafe_code, reason = "setpriority has no safe wrapper in nix or std")]
pub(crate) fn raise_priority() {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority takes plain integers and changes nothing but the calling thread's nice value.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, CNI_NICE) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "raising a wiring thread's priority");
    }
}

impl Wirer {
    /// Starts `workers` wiring threads for the node whose namespace is `node_ns` (None: the agent's own).
    pub fn start(node_ns: Option<&Path>, workers: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("wire-{i}"))
                .spawn(move || {
                    raise_priority();
                    let mut here: Option<Here> = None;
                    loop {
                        let job = match rx.lock().map(|r| r.recv()) {
                            Ok(Ok(job)) => job,
                            // The server is gone (or a sibling panicked holding the queue).
                            _ => return,
                        };
                        job(&mut here);
                        if here.as_ref().is_some_and(|h| h.lost) {
                            // Stranded in a pod's namespace: this thread wires nothing more.
                            tracing::error!(
                                "a wiring thread could not return to the node's namespace and stops"
                            );
                            return;
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "starting a wiring thread");
            }
        }
        Wirer {
            jobs: tx,
            node_ns: node_ns.map(Path::to_path_buf),
        }
    }

    /// Runs `f` on a wiring thread, waiting for it without blocking the runtime.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Here) -> Result<T, WireError> + Send + 'static,
    ) -> Result<T, WireError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let node_ns = self.node_ns.clone();
        let job: Job = Box::new(move |here: &mut Option<Here>| {
            // The thread's place is made on its first job; when that fails, this pod says so and the
            // next job tries again.
            let result = match here {
                Some(h) => f(h),
                None => Here::start(node_ns.as_deref()).and_then(|h| f(here.insert(h))),
            };
            let _ = tx.send(result);
        });
        let gone = || WireError::Netns {
            path: PathBuf::from("(wiring threads)"),
            source: std::io::Error::other("no wiring thread is running"),
        };
        self.jobs.send(job).map_err(|_| gone())?;
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Creates the pair and configures both ends. An existing host side of the same name is replaced unless
    /// it already is exactly this wiring (a repeated ADD), in which case nothing changes.
    pub async fn add(&self, w: &PodWiring) -> Result<Wired, WireError> {
        let w = w.clone();
        self.run(move |here| add_here(here, &w)).await
    }

    /// The existing wiring when it is complete and matches `w` (host side with the pod routes, the pod side
    /// holding every address); None otherwise.
    pub async fn check(&self, w: &PodWiring) -> Result<Option<Wired>, WireError> {
        let w = w.clone();
        self.run(move |here| check_here(here, &w)).await
    }
}

/// A wiring thread's place: a blocking socket in the node's namespace, and the way back to it.
struct Here {
    node: Rtnl,
    /// The node's namespace, to return to after opening a socket in a pod's.
    home: std::fs::File,
    /// Returning to the node's namespace failed: the thread is somewhere else.
    lost: bool,
}

impl Here {
    fn start(node_ns: Option<&Path>) -> Result<Self, WireError> {
        let ns_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WireError::Netns { path, source }
        };
        let home_path = node_ns.map_or_else(|| PathBuf::from("/proc/thread-self/ns/net"), Path::to_path_buf);
        let home = std::fs::File::open(&home_path).map_err(ns_error(&home_path))?;
        if node_ns.is_some() {
            blocking::enter(&home).map_err(ns_error(&home_path))?;
        }
        let node = Rtnl::open().map_err(ns_error(&home_path))?;
        Ok(Self {
            node,
            home,
            lost: false,
        })
    }

    /// The cookie of the network namespace `ns`; the thread is back in the node's namespace when this
    /// returns.
    fn cookie_of(&mut self, ns: &std::fs::File) -> std::io::Result<u64> {
        blocking::enter(ns)?;
        let cookie = crate::dataplane::bpf::ctlb::this_netns_cookie();
        let back = blocking::enter(&self.home);
        self.lost = back.is_err();
        back?;
        cookie
    }

    /// A socket in the pod's namespace (and, with `sysctls`, those written there first); the thread is back
    /// in the node's namespace when this returns.
    fn in_pod(&mut self, w: &PodWiring, sysctls: &[(String, String)]) -> Result<Rtnl, WireError> {
        let pod_ns = open_netns(w)?;
        let ns_error = |source| WireError::Netns {
            path: w.netns.clone(),
            source,
        };
        blocking::enter(&pod_ns).map_err(ns_error)?;
        let opened = Rtnl::open().and_then(|pod| netlink::write_sysctls(sysctls).map(|()| pod));
        let back = blocking::enter(&self.home);
        self.lost = back.is_err();
        let pod = opened.map_err(ns_error)?;
        back.map_err(|source| WireError::Netns {
            path: PathBuf::from("(node namespace)"),
            source,
        })?;
        Ok(pod)
    }
}

/// Creates the pair and configures both ends. An existing host side of the same name is replaced unless
/// it already is exactly this wiring (a repeated ADD), in which case nothing changes.
///
/// Every request of the pod comes from one thread with blocking sockets ([`blocking`]): under a burst of
/// concurrent ADDs each hand-off between threads waits for a CPU, so there are none. Every link, address
/// and route change takes the kernel's RTNL lock, which concurrent ADDs (and DELs) take turns for, so the
/// wiring asks for as few of them as it can: an IPv4 pair's host side is created up, and the pod side's
/// one link lookup gives its index, its MAC and the host side's index.
fn add_here(here: &mut Here, w: &PodWiring) -> Result<Wired, WireError> {
    let t0 = std::time::Instant::now();
    let ips = hosts(&w.ips);
    let host = here.node.link(&w.host_iface)?;
    let t_lookup = t0.elapsed();
    if let Some(host) = host {
        if let Some(eth) = pod_side(here, w, &ips)? {
            // A repeated ADD (perhaps after an agent killed mid-ADD): finish the host side, answer the same.
            host_side(here, w, &ips, host.header.index, false)?;
            return Ok(Wired {
                host_mac: mac_text(netlink::link_mac(&host).unwrap_or_default()),
                pod_mac: mac_text(netlink::link_mac(&eth).unwrap_or_default()),
            });
        }
        // A stale or half-made pair: replaced.
        here.node.del_link(&w.host_iface)?;
    }
    let pod_ns = open_netns(w)?;
    // The namespace's cookie is recorded before its interface exists, so the BPF data plane finds it when it
    // first programs the endpoint (a pod without one is not registered for connect-time load balancing:
    // its Service connections are translated per packet instead, so a failure here only says so).
    if let Some(dir) = &w.netns_records {
        let recorded = here
            .cookie_of(&pod_ns)
            .and_then(|c| crate::dataplane::bpf::ctlb::record(dir, &w.host_iface, c));
        if let Err(e) = recorded {
            tracing::warn!(iface = %w.host_iface, error = %e, "recording the pod's namespace cookie");
        }
    }
    // With IPv6, the host side comes up only once duplicate address detection is off on it (below).
    let v6 = ips.iter().any(|ip| ip.addr().is_ipv6());
    here.node.add_link(
        &format!("creating veth {}", w.host_iface),
        netlink::veth_message(&w.host_iface, &w.ifname, &pod_ns, w.mtu, HOST_MAC, !v6),
    )?;
    let t_veth = t0.elapsed();
    // Pod side. With IPv6, before the address exists: no duplicate address detection, so it is usable at once.
    let pod_sysctls = if v6 {
        vec![
            (format!("net.ipv6.conf.{}.disable_ipv6", w.ifname), "0".to_owned()),
            (format!("net.ipv6.conf.{}.accept_dad", w.ifname), "0".to_owned()),
        ]
    } else {
        Vec::new()
    };
    let mut pod = here.in_pod(w, &pod_sysctls)?;
    let t_open = t0.elapsed();
    // The runtime usually has the sandbox's loopback up already: a lookup costs no RTNL turn, a change does.
    let lo_up = pod
        .link("lo")?
        .is_some_and(|l| l.header.flags.contains(netlink_packet_route::link::LinkFlags::Up));
    if !lo_up {
        pod.set_up(LOOPBACK_INDEX)?;
    }
    let eth_link = pod
        .link(&w.ifname)?
        .ok_or_else(|| NetlinkError::NoLink(w.ifname.clone()))?;
    let eth = eth_link.header.index;
    // A veth end's link is its peer's index (in the peer's namespace: here, the node's).
    let host_index = match netlink::link_peer(&eth_link) {
        Some(i) => i,
        None => here
            .node
            .link(&w.host_iface)?
            .map(|l| l.header.index)
            .ok_or_else(|| NetlinkError::NoLink(w.host_iface.clone()))?,
    };
    // In BPF mode the host side is closed by the policy programs before the pod side is up: they drop the
    // pod's packets until the agent has its policy in the maps.
    let t_closed = t0.elapsed();
    if let Some(dir) = &w.bpf_pins {
        crate::dataplane::bpf::attach_pinned(dir, &w.host_iface, host_index)?;
    }
    let t_attach = t0.elapsed();
    for ip in &ips {
        pod.add_addr(eth, *ip)?;
    }
    pod.set_up(eth)?;

    // The IPv4 default route is onlink: the gateway needs no route of its own to be resolved on eth0.
    // The IPv6 default route last: `pod_side` takes the default routes as the sign of a complete pod side.
    for ip in ips
        .iter()
        .filter(|ip| ip.addr().is_ipv4())
        .chain(ips.iter().filter(|ip| ip.addr().is_ipv6()))
    {
        pod.add_default_via(gateway(ip), eth)?;
    }
    let t_pod = t0.elapsed();
    host_side(here, w, &ips, host_index, !v6)?;
    tracing::debug!(
        iface = %w.host_iface,
        lookup_us = t_lookup.as_micros() as u64,
        veth_us = (t_veth - t_lookup).as_micros() as u64,
        open_us = (t_open - t_veth).as_micros() as u64,
        bpf_attach_us = (t_attach - t_closed).as_micros() as u64,
        pod_us = (t_pod - t_open - (t_attach - t_closed)).as_micros() as u64,
        host_us = (t0.elapsed() - t_pod).as_micros() as u64,
        "wired"
    );
    Ok(Wired {
        host_mac: mac_text(HOST_MAC),
        pod_mac: mac_text(netlink::link_mac(&eth_link).unwrap_or_default()),
    })
}

/// The host side: answer ARP for the gateway (proxy ARP, no delay), up, the pod's addresses routed to it.
/// Idempotent, and without dumps (one write each). `up` says it already is.
fn host_side(here: &mut Here, w: &PodWiring, ips: &[IpNet], index: u32, up: bool) -> Result<(), WireError> {
    let mut settings = vec![
        (
            format!("net.ipv4.conf.{}.proxy_arp", w.host_iface),
            "1".to_owned(),
        ),
        (
            format!("net.ipv4.neigh.{}.proxy_delay", w.host_iface),
            "0".to_owned(),
        ),
    ];
    if ips.iter().any(|ip| ip.addr().is_ipv6()) {
        // The gateway address (the link-local the kernel derives from the MAC) is usable at once.
        settings.push((
            format!("net.ipv6.conf.{}.accept_dad", w.host_iface),
            "0".to_owned(),
        ));
    }
    // The thread is in the node's namespace: its /proc/sys/net is the node's.
    netlink::write_sysctls(&settings).map_err(|source| WireError::Netns {
        path: PathBuf::from("(node namespace)"),
        source,
    })?;
    if !up {
        here.node.set_up(index)?;
    }
    for ip in ips {
        here.node
            .replace_route(&pod_route(ip.addr(), index), PROTO_CARACAL)?;
    }
    Ok(())
}

/// The pod's namespace: the file the plugin passed, else `netns` opened here.
fn open_netns(w: &PodWiring) -> Result<std::fs::File, WireError> {
    let err = |source| WireError::Netns {
        path: w.netns.clone(),
        source,
    };
    match &w.netns_fd {
        Some(fd) => fd.0.try_clone().map(std::fs::File::from).map_err(err),
        None => std::fs::File::open(&w.netns).map_err(err),
    }
}

/// The pod side when it is complete: it exists and holds every address and default route.
fn pod_side(here: &mut Here, w: &PodWiring, ips: &[IpNet]) -> Result<Option<LinkMessage>, WireError> {
    if w.netns_fd.is_none() && !Path::new(&w.netns).exists() {
        return Ok(None);
    }
    let mut pod = here.in_pod(w, &[])?;
    let Some(eth) = pod.link(&w.ifname)? else {
        return Ok(None);
    };
    let have = pod.addrs(eth.header.index)?;
    if !ips.iter().all(|ip| have.contains(ip)) {
        return Ok(None);
    }
    // The default routes are the pod side's last step: with them, the pod side is complete.
    let routes = pod.routes(PROTO_CARACAL)?;
    let defaults = ips.iter().all(|ip| {
        routes.iter().any(|r| {
            r.dst.prefix_len() == 0
                && r.dst.addr().is_ipv4() == ip.addr().is_ipv4()
                && r.target == RouteTarget::Via(gateway(ip), eth.header.index)
        })
    });
    if !defaults {
        return Ok(None);
    }
    Ok(Some(eth))
}

fn check_here(here: &mut Here, w: &PodWiring) -> Result<Option<Wired>, WireError> {
    let ips = hosts(&w.ips);
    let Some(host) = here.node.link(&w.host_iface)? else {
        return Ok(None);
    };
    let Some(eth) = pod_side(here, w, &ips)? else {
        return Ok(None);
    };
    let routes = here.node.routes(PROTO_CARACAL)?;
    if !ips
        .iter()
        .all(|ip| routes.contains(&pod_route(ip.addr(), host.header.index)))
    {
        return Ok(None);
    }
    Ok(Some(Wired {
        host_mac: mac_text(netlink::link_mac(&host).unwrap_or_default()),
        pod_mac: mac_text(netlink::link_mac(&eth).unwrap_or_default()),
    }))
}

/// Removes the pod's veth (both ends go with the host side); absent is fine, so DEL is idempotent and
/// works after the pod's namespace is gone. On a socket of its own ([`netlink::del_link_alone`]): the
/// kernel's teardown waits of concurrent DELs overlap instead of queueing on the agent's connection.
pub async fn del(node: &Netlink, host_iface: &str) -> Result<bool, WireError> {
    Ok(netlink::del_link_alone(node.netns(), host_iface).await?)
}
