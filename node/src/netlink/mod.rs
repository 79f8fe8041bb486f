//! Typed rtnetlink access to one network namespace: links, addresses, routes, neighbours and FDB entries.
//!
//! A netlink socket belongs to the namespace it was opened in, so [`Netlink::open`] opens it from a
//! short-lived thread that has entered the namespace (`setns`); the rest of the agent never changes
//! namespace. The same trick writes per-namespace sysctls ([`sysctl`]).
//!
//! Routes the agent owns carry [`PROTO_CARACAL`], so listing, diffing and cleanup find exactly its own.

pub mod blocking;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourFlags, NeighbourState};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

/// The route protocol number on every route the agent writes (`ip route show proto 80`).
pub const PROTO_CARACAL: u8 = 80;

/// Errors talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// Entering a namespace or opening a socket failed.
    #[error("network namespace {path}: {source}")]
    Namespace {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel refused a request.
    #[error("{what}: {source}")]
    Request {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
    /// A link that must exist does not.
    #[error("no link named {0}")]
    NoLink(String),
    /// The kernel lacks what was asked for (a link kind whose module is missing), said without the kernel's
    /// own answer (the routing managers' fake kernel).
    #[error("{0}: not supported by this kernel")]
    NotSupported(String),
    /// The netlink socket failed (sending, receiving or decoding), not the kernel's answer.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

/// True when the kernel said "no such thing" (ENOENT, ENODEV, ESRCH): deletes treat it as done.
pub fn is_not_found(e: &NetlinkError) -> bool {
    match e {
        NetlinkError::NoLink(_) => true,
        NetlinkError::Request {
            source: rtnetlink::Error::NetlinkError(m),
            ..
        } => m
            .raw_code()
            .checked_neg()
            .is_some_and(|c| c == libc::ENOENT || c == libc::ENODEV || c == libc::ESRCH),
        _ => false,
    }
}

/// True when the kernel does not support what was asked (a link kind whose module is missing).
pub fn is_not_supported(e: &NetlinkError) -> bool {
    matches!(e, NetlinkError::NotSupported(_))
        || matches!(e, NetlinkError::Request { source: rtnetlink::Error::NetlinkError(m), .. }
        if m.raw_code().checked_neg().is_some_and(|c| c == libc::EOPNOTSUPP || c == libc::ENODEV || c == libc::ENOENT))
}

/// Runs `f` on a new thread that has entered the network namespace at `path` (or on a new thread in the
/// agent's own namespace for None), awaiting it without blocking the runtime: a namespace switch is per
/// thread, so the thread is never reused.
pub async fn in_netns<T: Send + 'static>(
    path: Option<&Path>,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, NetlinkError> {
    let owned = path.map(Path::to_path_buf);
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let run = || -> std::io::Result<T> {
            if let Some(p) = &owned {
                let ns = std::fs::File::open(p)?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            }
            f()
        };
        let _ = tx.send(run());
    });
    let result = rx
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("namespace thread panicked")));
    result.map_err(|source| NetlinkError::Namespace {
        path: path.map_or_else(|| PathBuf::from("(own)"), Path::to_path_buf),
        source,
    })
}

/// Deletes the link named `name` in the namespace at `netns` (None: the agent's own) from a netlink socket
/// and a thread of its own; absent is fine. Returns whether it existed.
///
/// The kernel answers a link delete only once the device is unregistered, which waits out RCU grace
/// periods: about 20 ms here, idle time rather than CPU, spent inside the sending thread's `sendmsg`. On the
/// agent's shared connection, deletes queue behind each other (20 pods deleted at once: the last waits about
/// 400 ms) and each blocks the runtime worker that drives the connection. On sockets of their own they wait
/// side by side, as separate plugin processes (the `bridge` plugin's) do. One request, no lookup: the
/// kernel finds the link by name.
pub async fn del_link_alone(netns: Option<&Path>, name: &str) -> Result<bool, NetlinkError> {
    let owned = name.to_owned();
    in_netns(netns, move || Ok(blocking::Rtnl::open()?.del_link(&owned))).await?
}

/// Writes sysctls (`key` with dots, value) inside the namespace at `netns`, all from one thread, skipping
/// those that already have the value. A key
/// written with slashes (`net/ipv6/conf/vxlan6.caracal/accept_dad`) is taken as a path, for interface names
/// that contain dots. A failure names the key.
pub async fn sysctls(netns: Option<&Path>, settings: Vec<(String, String)>) -> Result<(), NetlinkError> {
    in_netns(netns, move || write_sysctls(&settings)).await
}

/// Writes sysctls in the calling thread's network namespace, as [`sysctls`] does.
pub fn write_sysctls(settings: &[(String, String)]) -> std::io::Result<()> {
    for (key, value) in settings {
        let path = if key.contains('/') {
            key.clone()
        } else {
            key.replace('.', "/")
        };
        let file = format!("/proc/sys/{path}");
        // Read first: writing some keys is expensive even when nothing changes (setting
        // `net.ipv6.conf.all.forwarding` walks every interface), and these are written on every sync.
        if std::fs::read_to_string(&file).is_ok_and(|have| have.trim() == value.trim()) {
            continue;
        }
        std::fs::write(&file, value)
            .map_err(|e| std::io::Error::new(e.kind(), format!("sysctl {key}: {e}")))?;
    }
    Ok(())
}

/// Writes one sysctl inside the namespace at `netns`.
pub async fn sysctl(netns: Option<&Path>, key: &str, value: &str) -> Result<(), NetlinkError> {
    sysctls(netns, vec![(key.to_owned(), value.to_owned())]).await
}

/// The path of a named namespace (`ip netns add NAME`).
pub fn named_netns(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// A route the agent owns: destination, and either an interface (scope link) or a gateway through one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnedRoute {
    /// Destination (either family).
    pub dst: IpNet,
    /// What happens to it.
    pub target: RouteTarget,
}

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

/// A routing policy rule that sends to a table: `ip rule add [not] fwmark MARK/MASK lookup TABLE priority P`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rule {
    /// IPv6 (otherwise IPv4).
    pub v6: bool,
    /// Its priority (lower first).
    pub priority: u32,
    /// The table it sends to.
    pub table: u32,
    /// The mark it matches (with `fwmask`; both 0: any packet).
    pub fwmark: u32,
    /// The mark's mask.
    pub fwmask: u32,
    /// Matches what the mark does not match (`not`).
    pub invert: bool,
}

/// Where an owned route sends traffic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteTarget {
    /// Directly out of an interface (a pod's veth).
    Dev(u32),
    /// Via a gateway on an interface, marked onlink (VXLAN peers, same-subnet nodes).
    Via(IpAddr, u32),
    /// Dropped: this node's own blocks, so unknown addresses in them are not sent back out.
    Blackhole,
}

/// The parameters of a VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanDevice {
    /// Its name (`vxlan.caracal`).
    pub name: String,
    /// The VNI (4096 by default).
    pub vni: u32,
    /// The UDP port (4789 by default).
    pub port: u16,
    /// The node's underlay address (the tunnel's source; IPv6 for `vxlan6.caracal`).
    pub local: IpAddr,
    /// The underlay link's index.
    pub parent: u32,
    /// The VTEP MAC (published on the Node).
    pub mac: [u8; 6],
    /// The device MTU.
    pub mtu: u32,
}

/// A netlink connection bound to one namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    netns: Option<PathBuf>,
    /// The kernel runs one dump per socket at a time (a second gets EBUSY): dumps take turns.
    dumps: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Netlink {
    /// Opens a connection in the namespace at `netns` (None: the agent's own).
    ///
    /// The connection is driven on a thread of its own (it ends when the last clone is dropped): the kernel
    /// handles a request inside the sender's `sendmsg`, waiting there for the RTNL lock that every link,
    /// address and route change takes, so a connection driven by the agent's runtime would stall one of
    /// its workers (a node has two or so) whenever pods are wired concurrently.
    pub async fn open(netns: Option<&Path>) -> Result<Self, NetlinkError> {
        let owned = netns.map(Path::to_path_buf);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("netlink".into()).spawn(move || {
            let setup = || -> std::io::Result<_> {
                if let Some(p) = &owned {
                    let ns = std::fs::File::open(p)?;
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(std::io::Error::from)?;
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()?;
                let (conn, handle, _) = {
                    let _guard = rt.enter();
                    rtnetlink::new_connection()?
                };
                Ok((rt, conn, handle))
            };
            match setup() {
                Ok((rt, conn, handle)) => {
                    if tx.send(Ok(handle)).is_ok() {
                        rt.block_on(conn);
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        let namespace_error = |source| NetlinkError::Namespace {
            path: netns.map_or_else(|| PathBuf::from("(own)"), Path::to_path_buf),
            source,
        };
        spawned.map_err(namespace_error)?;
        let handle = rx
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("netlink thread panicked")))
            .map_err(namespace_error)?;
        Ok(Self {
            handle,
            netns: netns.map(Path::to_path_buf),
            dumps: std::sync::Arc::default(),
        })
    }

    /// The namespace this connection works in.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    /// The link named `name`, if any.
    pub async fn link(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(l) => Ok(l),
            Err(e) => {
                let e = req(format!("reading link {name}"))(e);
                if is_not_found(&e) { Ok(None) } else { Err(e) }
            }
        }
    }

    /// The index of the link named `name`.
    pub async fn index(&self, name: &str) -> Result<u32, NetlinkError> {
        self.link(name)
            .await?
            .map(|l| l.header.index)
            .ok_or_else(|| NetlinkError::NoLink(name.to_owned()))
    }

    /// Every link's name by index.
    pub async fn links(&self) -> Result<Vec<(u32, String)>, NetlinkError> {
        let _turn = self.dumps.lock().await;
        Ok(self
            .dump_links()
            .await?
            .into_iter()
            .filter_map(|l| link_name(&l).map(|n| (l.header.index, n)))
            .collect())
    }

    /// Every link's message (the caller holds the dump turn).
    async fn dump_links(&self) -> Result<Vec<LinkMessage>, NetlinkError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("listing links"))
    }

    /// Every link with its MTU and addresses: one dump of links, one of addresses.
    pub async fn interfaces(&self) -> Result<Vec<crate::routing::kernel::Interface>, NetlinkError> {
        use netlink_packet_route::address::AddressAttribute;
        let _turn = self.dumps.lock().await;
        let links = self.dump_links().await?;
        let addrs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("listing addresses"))?;
        Ok(links
            .into_iter()
            .filter_map(|l| {
                let index = l.header.index;
                Some(crate::routing::kernel::Interface {
                    index,
                    name: link_name(&l)?,
                    mtu: link_mtu(&l).unwrap_or(1500),
                    addrs: addrs
                        .iter()
                        .filter(|m| m.header.index == index)
                        .filter_map(|m| {
                            m.attributes.iter().find_map(|a| match a {
                                AddressAttribute::Address(ip) => IpNet::new(*ip, m.header.prefix_len).ok(),
                                _ => None,
                            })
                        })
                        .collect(),
                })
            })
            .collect())
    }

    /// Sets a link up, with `mtu` when given.
    pub async fn set_up(&self, index: u32, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let mut b = LinkUnspec::new_with_index(index).up();
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(req(format!("setting link {index} up")))
    }

    /// The routing policy rules of one family that send to a table (`ip rule`), as [`Rule`]s.
    pub async fn rules(&self, v6: bool) -> Result<Vec<Rule>, NetlinkError> {
        use netlink_packet_route::rule::{RuleAttribute, RuleFlags};
        let _turn = self.dumps.lock().await;
        let version = if v6 {
            rtnetlink::IpVersion::V6
        } else {
            rtnetlink::IpVersion::V4
        };
        let msgs: Vec<_> = self
            .handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(req("listing rules"))?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let mut r = Rule {
                    v6,
                    priority: 0,
                    table: u32::from(m.header.table),
                    fwmark: 0,
                    fwmask: 0,
                    invert: m.header.flags.contains(RuleFlags::Invert),
                };
                for a in &m.attributes {
                    match a {
                        RuleAttribute::Priority(p) => r.priority = *p,
                        RuleAttribute::Table(t) => r.table = *t,
                        RuleAttribute::FwMark(f) => r.fwmark = *f,
                        RuleAttribute::FwMask(f) => r.fwmask = *f,
                        _ => {}
                    }
                }
                r
            })
            .collect())
    }

    /// Adds `rule`; one already there is fine.
    pub async fn add_rule(&self, rule: &Rule) -> Result<(), NetlinkError> {
        let mut add = self
            .handle
            .rule()
            .add()
            .table_id(rule.table)
            .priority(rule.priority);
        add = add.action(netlink_packet_route::rule::RuleAction::ToTable);
        if rule.fwmark != 0 || rule.fwmask != 0 {
            add = add.fw_mark(rule.fwmark);
        }
        let finish = |m: &mut netlink_packet_route::rule::RuleMessage| {
            use netlink_packet_route::rule::{RuleAttribute, RuleFlags};
            if rule.fwmask != 0 {
                m.attributes.push(RuleAttribute::FwMask(rule.fwmask));
            }
            if rule.invert {
                m.header.flags |= RuleFlags::Invert;
            }
        };
        let result = if rule.v6 {
            let mut r = add.v6();
            finish(r.message_mut());
            r.execute().await
        } else {
            let mut r = add.v4();
            finish(r.message_mut());
            r.execute().await
        };
        match result {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(req(format!("adding rule {rule:?}"))(e)),
        }
    }

    /// Deletes `rule`; absent is fine.
    pub async fn del_rule(&self, rule: &Rule) -> Result<(), NetlinkError> {
        use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
        let mut m = RuleMessage::default();
        m.header.family = if rule.v6 {
            netlink_packet_route::AddressFamily::Inet6
        } else {
            netlink_packet_route::AddressFamily::Inet
        };
        m.header.action = RuleAction::ToTable;
        m.attributes.push(RuleAttribute::Table(rule.table));
        m.attributes.push(RuleAttribute::Priority(rule.priority));
        if rule.fwmark != 0 || rule.fwmask != 0 {
            m.attributes.push(RuleAttribute::FwMark(rule.fwmark));
        }
        if rule.fwmask != 0 {
            m.attributes.push(RuleAttribute::FwMask(rule.fwmask));
        }
        if rule.invert {
            m.header.flags |= RuleFlags::Invert;
        }
        match self.handle.rule().del(m).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = req(format!("deleting rule {rule:?}"))(e);
                if is_not_found(&e) { Ok(()) } else { Err(e) }
            }
        }
    }

    /// Deletes the link named `name`; absent is fine. Returns whether it existed.
    pub async fn del_link(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(l) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(l.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = req(format!("deleting link {name}"))(e);
                if is_not_found(&e) { Ok(false) } else { Err(e) }
            }
        }
    }

    /// Adds `addr` to link `index` (already present is fine).
    pub async fn add_addr(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        match self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EEXIST => Ok(()),
            Err(e) => Err(req(format!("adding {addr} to link {index}"))(e)),
        }
    }

    /// The addresses on link `index`.
    pub async fn addrs(&self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        let _turn = self.dumps.lock().await;
        use netlink_packet_route::address::AddressAttribute;
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(req("listing addresses"))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let prefix = m.header.prefix_len;
                m.attributes.into_iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => IpNet::new(ip, prefix).ok(),
                    _ => None,
                })
            })
            .collect())
    }

    /// Adds (or replaces) a route of either family, tagged with `proto`.
    pub async fn replace_route(&self, route: &OwnedRoute, proto: u8) -> Result<(), NetlinkError> {
        self.replace_route_in(route, proto, MAIN_TABLE).await
    }

    /// As [`Netlink::replace_route`], in routing table `table`.
    pub async fn replace_route_in(
        &self,
        route: &OwnedRoute,
        proto: u8,
        table: u32,
    ) -> Result<(), NetlinkError> {
        let msg = route_message(route, proto, table);
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(req(format!("writing route {}", route.dst)))
    }

    /// Adds the default route via `gw` on `index` (`ip route add default via GW dev IF onlink proto 80`).
    pub async fn add_default_via(&self, gw: IpAddr, index: u32) -> Result<(), NetlinkError> {
        let msg = default_route_message(gw, index);
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(req("adding the default route"))
    }

    /// Deletes an owned route; absent is fine.
    pub async fn del_route(&self, route: &OwnedRoute, proto: u8) -> Result<(), NetlinkError> {
        self.del_route_in(route, proto, MAIN_TABLE).await
    }

    /// As [`Netlink::del_route`], in routing table `table`.
    pub async fn del_route_in(&self, route: &OwnedRoute, proto: u8, table: u32) -> Result<(), NetlinkError> {
        match self
            .handle
            .route()
            .del(route_message(route, proto, table))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = req(format!("deleting route {}", route.dst))(e);
                if is_not_found(&e) { Ok(()) } else { Err(e) }
            }
        }
    }

    /// Every route of both families in the main table tagged with `proto`.
    pub async fn routes(&self, proto: u8) -> Result<Vec<OwnedRoute>, NetlinkError> {
        self.routes_in(proto, MAIN_TABLE).await
    }

    /// Every route of both families in routing table `table` tagged with `proto`.
    pub async fn routes_in(&self, proto: u8, table: u32) -> Result<Vec<OwnedRoute>, NetlinkError> {
        let _turn = self.dumps.lock().await;
        let mut all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(req("listing routes"))?;
        let v6: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(req("listing IPv6 routes"))?;
        all.extend(v6);
        Ok(all
            .into_iter()
            .filter(|m| u8::from(m.header.protocol) == proto && route_table(m) == table)
            .filter_map(|m| parse_route(&m))
            .collect())
    }

    /// Creates (or adopts) the VXLAN device `v.name`: VNI, UDP port, local address and parent link, no
    /// learning. A device with other parameters (a changed port or node address) is recreated.
    pub async fn ensure_vxlan(&self, v: &VxlanDevice) -> Result<u32, NetlinkError> {
        if let Some(l) = self.link(&v.name).await? {
            if vxlan_matches(&l, v.vni, v.port, v.local) && link_mac(&l) == Some(v.mac) {
                self.set_up(l.header.index, Some(v.mtu)).await?;
                return Ok(l.header.index);
            }
            self.del_link(&v.name).await?;
        }
        let b = LinkVxlan::new(&v.name, v.vni).port(v.port);
        let b = match v.local {
            IpAddr::V4(ip) => b.local(ip),
            IpAddr::V6(ip) => b.local6(ip),
        };
        let msg = b
            .dev(v.parent)
            .learning(false)
            .address(v.mac.to_vec())
            .mtu(v.mtu)
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(req(format!("creating {}", v.name)))?;
        self.index(&v.name).await
    }

    /// Creates (or adopts) the IPIP device `name` (`tunl0`): up, with `mtu`. Fails when the kernel has no
    /// ipip module ([`is_not_supported`]).
    pub async fn ensure_ipip(&self, name: &str, mtu: u32) -> Result<u32, NetlinkError> {
        if let Some(l) = self.link(name).await? {
            self.set_up(l.header.index, Some(mtu)).await?;
            return Ok(l.header.index);
        }
        let msg = rtnetlink::LinkIpIp::new(name).mtu(mtu).up().build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(req(format!("creating {name}")))?;
        self.index(name).await
    }

    /// A permanent ARP (or IPv6 neighbour) entry: `ip` is at `mac` on link `index`.
    pub async fn replace_neighbour(&self, index: u32, ip: IpAddr, mac: [u8; 6]) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(req(format!("writing the ARP entry for {ip}")))
    }

    /// Deletes an ARP entry (`bridge` false) or an FDB entry (`bridge` true) on link `index`; absent is fine.
    pub async fn del_neighbour(
        &self,
        index: u32,
        mac: [u8; 6],
        ip: IpAddr,
        bridge: bool,
    ) -> Result<(), NetlinkError> {
        use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
        let mut msg = NeighbourMessage::default();
        msg.header.family = match (bridge, ip) {
            (true, _) => netlink_packet_route::AddressFamily::Bridge,
            (false, IpAddr::V4(_)) => netlink_packet_route::AddressFamily::Inet,
            (false, IpAddr::V6(_)) => netlink_packet_route::AddressFamily::Inet6,
        };
        msg.header.ifindex = index;
        if bridge {
            msg.header.flags = NeighbourFlags::Own;
            msg.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        }
        msg.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = req(format!("deleting the neighbour {ip}"))(e);
                if is_not_found(&e) { Ok(()) } else { Err(e) }
            }
        }
    }

    /// A permanent FDB entry on a VXLAN device: frames for `mac` go to `dst`.
    pub async fn replace_fdb(&self, index: u32, mac: [u8; 6], dst: IpAddr) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac)
            .destination(dst)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(req(format!("writing the FDB entry for {dst}")))
    }

    /// Permanent neighbours on link `index` (ARP, or IPv6 neighbours when `v6`, when `bridge` is false; FDB
    /// entries otherwise): (mac, ip). The kernel reports a permanent FDB entry's state with extra bits, so state is
    /// not compared: on Caracal's own devices every entry is Caracal's.
    pub async fn neighbours(
        &self,
        index: u32,
        bridge: bool,
        v6: bool,
    ) -> Result<Vec<([u8; 6], IpAddr)>, NetlinkError> {
        let _turn = self.dumps.lock().await;
        use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
        let family = match (bridge, v6) {
            (true, _) => netlink_packet_route::AddressFamily::Bridge,
            (false, false) => netlink_packet_route::AddressFamily::Inet,
            (false, true) => netlink_packet_route::AddressFamily::Inet6,
        };
        let get = self.handle.neighbours().get().set_address_family(family);
        let all: Vec<_> = get
            .execute()
            .try_collect()
            .await
            .map_err(req("listing neighbours"))?;
        Ok(all
            .into_iter()
            .filter(|m| m.header.ifindex == index && m.header.family == family)
            // Neighbour entries the kernel learned (NDP on an IPv6 device) are not Caracal's: only permanent
            // ones are listed. (FDB states carry extra bits and are all Caracal's here.)
            .filter(|m| bridge || m.header.state == NeighbourState::Permanent)
            .filter_map(|m| {
                let mut mac = None;
                let mut ip = None;
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::LinkLayerAddress(l) => {
                            mac = <[u8; 6]>::try_from(l.as_slice()).ok()
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                            ip = Some(IpAddr::V4(*v4))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                            ip = Some(IpAddr::V6(*v6))
                        }
                        // FDB entries (family bridge) carry the remote as raw bytes.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                            ip = <[u8; 4]>::try_from(b.as_slice())
                                .ok()
                                .map(|a| IpAddr::V4(Ipv4Addr::from(a)))
                                .or_else(|| {
                                    <[u8; 16]>::try_from(b.as_slice())
                                        .ok()
                                        .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
                                });
                        }
                        _ => {}
                    }
                }
                Some((mac?, ip?))
            })
            .collect())
    }
}

fn link_name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// The MTU of a link message.
pub fn link_mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

/// The link of a link message (`IFLA_LINK`): for a veth end, its peer's index in the peer's namespace.
pub fn link_peer(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(i) => Some(*i),
        _ => None,
    })
}

/// The MAC address of a link message.
pub fn link_mac(l: &LinkMessage) -> Option<[u8; 6]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    })
}

fn vxlan_matches(l: &LinkMessage, vni: u32, port: u16, local: IpAddr) -> bool {
    use netlink_packet_route::link::InfoVxlan;
    let Some(data) = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(d)) => Some(d.clone()),
            _ => None,
        }),
        _ => None,
    }) else {
        return false;
    };
    let has = |want: &InfoVxlan| data.contains(want);
    let local = match local {
        IpAddr::V4(ip) => InfoVxlan::Local(ip),
        IpAddr::V6(ip) => InfoVxlan::Local6(ip),
    };
    has(&InfoVxlan::Id(vni)) && has(&InfoVxlan::Port(port)) && has(&local)
}

/// The message creating veth `host` with its peer `peer` directly inside the namespace `peer_netns`, the
/// host end up when `up` (the peer cannot be: the kernel opens it before it is paired, and refuses).
///
/// One transmit and one receive queue each, asked for explicitly: otherwise the kernel allocates one per
/// CPU and then cuts the device down to one, which waits out an RCU grace period while holding the RTNL
/// lock (0.4 to 0.5 ms per pair on this 2-core machine under load, during which no other link, address or
/// route change on the node proceeds).
pub fn veth_message(
    host: &str,
    peer: &str,
    peer_netns: &std::fs::File,
    mtu: u32,
    host_mac: [u8; 6],
    up: bool,
) -> LinkMessage {
    use std::os::fd::AsRawFd as _;
    let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
        .append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
        .name(peer.to_owned())
        .mtu(mtu)
        .setns_by_fd(peer_netns.as_raw_fd())
        .build();
    let mut b = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .append_extra_attribute(LinkAttribute::NumTxQueues(1))
        .append_extra_attribute(LinkAttribute::NumRxQueues(1))
        .name(host.to_owned())
        .mtu(mtu)
        .address(host_mac.to_vec())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)));
    if up {
        b = b.up();
    }
    b.build()
}

/// The default route via `gw` on `index`, tagged as Caracal's (IPv4 onlink).
fn default_route_message(gw: IpAddr, index: u32) -> RouteMessage {
    match gw {
        IpAddr::V4(gw) => RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .onlink()
            .protocol(RouteProtocol::from(PROTO_CARACAL))
            .build(),
        // An IPv6 link-local gateway needs no onlink: it is on the link by definition.
        IpAddr::V6(gw) => RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(gw)
            .output_interface(index)
            .protocol(RouteProtocol::from(PROTO_CARACAL))
            .build(),
    }
}

/// The routing table a dumped route is in.
fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn route_message(route: &OwnedRoute, proto: u8, table: u32) -> RouteMessage {
    match (route.dst, route.target.clone()) {
        (IpNet::V4(dst), target) => {
            let b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.addr(), dst.prefix_len())
                .table_id(table)
                .protocol(RouteProtocol::from(proto));
            match target {
                RouteTarget::Dev(i) => b.output_interface(i).scope(RouteScope::Link).build(),
                RouteTarget::Via(IpAddr::V4(gw), i) => b.gateway(gw).output_interface(i).onlink().build(),
                RouteTarget::Via(IpAddr::V6(gw), i) => b.via(gw).output_interface(i).onlink().build(),
                RouteTarget::Blackhole => b.kind(RouteType::BlackHole).build(),
            }
        }
        (IpNet::V6(dst), target) => {
            let b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dst.addr(), dst.prefix_len())
                .table_id(table)
                .protocol(RouteProtocol::from(proto));
            match target {
                RouteTarget::Dev(i) => b.output_interface(i).scope(RouteScope::Link).build(),
                RouteTarget::Via(IpAddr::V6(gw), i) => b.gateway(gw).output_interface(i).onlink().build(),
                // An IPv6 destination through an IPv4 gateway is not something Caracal writes.
                RouteTarget::Via(IpAddr::V4(_), i) => b.output_interface(i).build(),
                RouteTarget::Blackhole => b.kind(RouteType::BlackHole).build(),
            }
        }
    }
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn parse_route(m: &RouteMessage) -> Option<OwnedRoute> {
    let v6 = m.header.address_family == netlink_packet_route::AddressFamily::Inet6;
    let mut dst = if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    let mut gw = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_addr(d)?,
            RouteAttribute::Gateway(g) => gw = route_addr(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let dst = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
    let target = if m.header.kind == RouteType::BlackHole {
        RouteTarget::Blackhole
    } else {
        match (gw, oif) {
            (Some(g), Some(i)) => RouteTarget::Via(g, i),
            (None, Some(i)) => RouteTarget::Dev(i),
            _ => return None,
        }
    };
    Some(OwnedRoute { dst, target })
}
