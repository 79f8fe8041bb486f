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

use crate::netlink::{self, Netlink, NetlinkError, OwnedRoute, PROTO_CARACAL, RouteTarget};

/// One pod interface to wire.
#[derive(Clone, Debug)]
pub struct PodWiring {
    /// Host-side name (`cni::host_iface`).
    pub host_iface: String,
    /// The pod's network namespace (CNI_NETNS).
    pub netns: PathBuf,
    /// The pod-side name (CNI_IFNAME).
    pub ifname: String,
    /// The pod's addresses.
    pub ips: Vec<IpNet>,
    /// The MTU of both ends.
    pub mtu: u32,
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

/// Creates the pair and configures both ends. An existing host side of the same name is replaced unless
/// it already is exactly this wiring (a repeated ADD), in which case nothing changes.
///
/// Every link, address and route change takes the kernel's RTNL lock, which concurrent ADDs (and DELs)
/// take turns for, so the wiring asks for as few of them as it can: an IPv4 pair's host side is created
/// up, and the pod side's one link lookup gives its index, its MAC and the host side's index.
pub async fn add(node: &Netlink, w: &PodWiring) -> Result<Wired, WireError> {
    let t0 = std::time::Instant::now();
    let ips = hosts(&w.ips);
    let host = node.link(&w.host_iface).await?;
    let t_lookup = t0.elapsed();
    if let Some(host) = host {
        if let Some(eth) = pod_side(w, &ips).await? {
            // A repeated ADD (perhaps after an agent killed mid-ADD): finish the host side, answer the same.
            host_side(node, w, &ips, Some(host.header.index), false).await?;
            return Ok(Wired {
                host_mac: mac_text(netlink::link_mac(&host).unwrap_or_default()),
                pod_mac: mac_text(netlink::link_mac(&eth).unwrap_or_default()),
            });
        }
        // A stale or half-made pair: replaced.
        netlink::del_link_alone(node.netns(), &w.host_iface).await?;
    }
    let pod_ns = std::fs::File::open(&w.netns).map_err(|source| WireError::Netns {
        path: w.netns.clone(),
        source,
    })?;
    // With IPv6, the host side comes up only once duplicate address detection is off on it (below).
    let v6 = ips.iter().any(|ip| ip.addr().is_ipv6());
    node.add_veth_into(&w.host_iface, &w.ifname, &pod_ns, w.mtu, HOST_MAC, !v6)
        .await?;
    let t_veth = t0.elapsed();
    // Pod side.
    let pod = Netlink::open(Some(&w.netns)).await?;
    let t_open = t0.elapsed();
    if v6 {
        // Before the address exists: no duplicate address detection, so it is usable at once.
        netlink::sysctls(
            Some(&w.netns),
            vec![
                (format!("net.ipv6.conf.{}.disable_ipv6", w.ifname), "0".to_owned()),
                (format!("net.ipv6.conf.{}.accept_dad", w.ifname), "0".to_owned()),
            ],
        )
        .await?;
    }
    // The runtime usually has the sandbox's loopback up already: a lookup costs no RTNL turn, a change does.
    let lo_up = pod
        .link("lo")
        .await?
        .is_some_and(|l| l.header.flags.contains(netlink_packet_route::link::LinkFlags::Up));
    if !lo_up {
        pod.set_up(LOOPBACK_INDEX, None).await?;
    }
    let eth_link = pod
        .link(&w.ifname)
        .await?
        .ok_or_else(|| NetlinkError::NoLink(w.ifname.clone()))?;
    let eth = eth_link.header.index;
    for ip in &ips {
        pod.add_addr(eth, *ip).await?;
    }
    pod.set_up(eth, None).await?;
    // The IPv4 default route is onlink: the gateway needs no route of its own to be resolved on eth0.
    // The IPv6 default route last: `pod_side` takes the default routes as the sign of a complete pod side.
    for ip in ips
        .iter()
        .filter(|ip| ip.addr().is_ipv4())
        .chain(ips.iter().filter(|ip| ip.addr().is_ipv6()))
    {
        pod.add_default_via(gateway(ip), eth).await?;
    }
    let t_pod = t0.elapsed();
    // A veth end's link is its peer's index (in the peer's namespace: here, the node's).
    host_side(node, w, &ips, netlink::link_peer(&eth_link), !v6).await?;
    tracing::debug!(
        iface = %w.host_iface,
        lookup_us = t_lookup.as_micros() as u64,
        veth_us = (t_veth - t_lookup).as_micros() as u64,
        open_us = (t_open - t_veth).as_micros() as u64,
        pod_us = (t_pod - t_open).as_micros() as u64,
        host_us = (t0.elapsed() - t_pod).as_micros() as u64,
        "wired"
    );
    Ok(Wired {
        host_mac: mac_text(HOST_MAC),
        pod_mac: mac_text(netlink::link_mac(&eth_link).unwrap_or_default()),
    })
}

/// The host side: answer ARP for the gateway (proxy ARP, no delay), up, the pod's addresses routed to it.
/// Idempotent, and without dumps (one write each), so concurrent ADDs do not queue behind each other.
/// `index` is the host side's when known (looked up otherwise); `up` says it already is.
async fn host_side(
    node: &Netlink,
    w: &PodWiring,
    ips: &[IpNet],
    index: Option<u32>,
    up: bool,
) -> Result<(), WireError> {
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
    netlink::sysctls(node.netns(), settings).await?;
    let host = match index {
        Some(i) => i,
        None => node.index(&w.host_iface).await?,
    };
    if !up {
        node.set_up(host, None).await?;
    }
    for ip in ips {
        node.replace_route(&pod_route(ip.addr(), host), PROTO_CARACAL)
            .await?;
    }
    Ok(())
}

/// Both ends when they exist and the pod side holds every address.
async fn existing(
    node: &Netlink,
    w: &PodWiring,
    ips: &[IpNet],
) -> Result<Option<(LinkMessage, LinkMessage)>, WireError> {
    let Some(host) = node.link(&w.host_iface).await? else {
        return Ok(None);
    };
    Ok(pod_side(w, ips).await?.map(|eth| (host, eth)))
}

/// The pod side when it is complete: it exists and holds every address and default route.
async fn pod_side(w: &PodWiring, ips: &[IpNet]) -> Result<Option<LinkMessage>, WireError> {
    if !Path::new(&w.netns).exists() {
        return Ok(None);
    }
    let pod = Netlink::open(Some(&w.netns)).await?;
    let Some(eth) = pod.link(&w.ifname).await? else {
        return Ok(None);
    };
    let have = pod.addrs(eth.header.index).await?;
    if !ips.iter().all(|ip| have.contains(ip)) {
        return Ok(None);
    }
    // The default routes are the pod side's last step: with them, the pod side is complete.
    let routes = pod.routes(PROTO_CARACAL).await?;
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

/// The existing wiring when it is complete and matches `w` (host side with the pod routes, the pod side
/// holding every address); None otherwise.
pub async fn check(node: &Netlink, w: &PodWiring) -> Result<Option<Wired>, WireError> {
    let ips = hosts(&w.ips);
    let Some((host, eth)) = existing(node, w, &ips).await? else {
        return Ok(None);
    };
    let routes = node.routes(PROTO_CARACAL).await?;
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
