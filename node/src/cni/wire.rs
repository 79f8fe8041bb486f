//! Wiring a pod into the node: a veth pair whose host side (`crc…`) answers ARP for the pod's link-local
//! gateway 169.254.1.1 by proxy ARP, and whose pod side (`eth0`) carries the pod's /32 and a default route
//! through that gateway. The host gets a /32 route to the pod through the veth. Every pod therefore sees
//! the same gateway and MAC, and all traffic leaves the pod through the node's routing and policy.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use netlink_packet_route::link::LinkMessage;

use crate::netlink::{self, Netlink, NetlinkError, OwnedRoute, PROTO_CARACAL, RouteTarget};

/// The gateway every pod routes through (answered by proxy ARP on the host side).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The host side's MAC, as Calico uses: every pod sees the same gateway MAC.
pub const HOST_MAC: [u8; 6] = [0xee; 6];

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
    /// Only IPv4 pod addresses are wired so far.
    #[error("{0} is not IPv4: IPv6 pod addresses are not wired yet")]
    NotV4(IpNet),
    /// The kernel refused.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

fn mac_text(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn v4s(ips: &[IpNet]) -> Result<Vec<Ipv4Net>, WireError> {
    ips.iter()
        .map(|ip| match ip {
            IpNet::V4(v) => Ok(Ipv4Net::new(v.addr(), 32).unwrap_or(*v)),
            IpNet::V6(_) => Err(WireError::NotV4(*ip)),
        })
        .collect()
}

/// The host route to a pod address through its veth.
pub fn pod_route(ip: Ipv4Net, index: u32) -> OwnedRoute {
    OwnedRoute {
        dst: Ipv4Net::new(ip.addr(), 32).unwrap_or(ip),
        target: RouteTarget::Dev(index),
    }
}

/// Creates the pair and configures both ends. An existing host side of the same name is replaced unless
/// it already is exactly this wiring (a repeated ADD), in which case nothing changes.
pub async fn add(node: &Netlink, w: &PodWiring) -> Result<Wired, WireError> {
    let ips = v4s(&w.ips)?;
    if let Some((host, eth)) = existing(node, w, &ips).await? {
        // A repeated ADD (perhaps after an agent killed mid-ADD): finish the host side, answer the same.
        host_side(node, w, &ips).await?;
        return Ok(Wired {
            host_mac: mac_text(netlink::link_mac(&host).unwrap_or_default()),
            pod_mac: mac_text(netlink::link_mac(&eth).unwrap_or_default()),
        });
    }
    node.del_link(&w.host_iface).await?;
    let pod_ns = std::fs::File::open(&w.netns).map_err(|source| WireError::Netns {
        path: w.netns.clone(),
        source,
    })?;
    node.add_veth_into(&w.host_iface, &w.ifname, &pod_ns, w.mtu, HOST_MAC)
        .await?;
    // Pod side.
    let pod = Netlink::open(Some(&w.netns)).await?;
    let lo = pod.index("lo").await?;
    pod.set_up(lo, None).await?;
    let eth = pod.index(&w.ifname).await?;
    for ip in &ips {
        pod.add_addr(eth, IpNet::V4(*ip)).await?;
    }
    pod.set_up(eth, None).await?;
    pod.replace_route(
        &OwnedRoute {
            dst: Ipv4Net::new(GATEWAY, 32).unwrap_or_default(),
            target: RouteTarget::Dev(eth),
        },
        PROTO_CARACAL,
    )
    .await?;
    pod.add_default_via(GATEWAY, eth).await?;
    let pod_mac = pod
        .link(&w.ifname)
        .await?
        .as_ref()
        .and_then(netlink::link_mac)
        .unwrap_or_default();
    host_side(node, w, &ips).await?;
    Ok(Wired {
        host_mac: mac_text(HOST_MAC),
        pod_mac: mac_text(pod_mac),
    })
}

/// The host side: answer ARP for the gateway (proxy ARP, no delay), up, the pod's addresses routed to it.
/// Idempotent, and without dumps (one write each), so concurrent ADDs do not queue behind each other.
async fn host_side(node: &Netlink, w: &PodWiring, ips: &[Ipv4Net]) -> Result<(), WireError> {
    netlink::sysctls(
        node.netns(),
        vec![
            (
                format!("net.ipv4.conf.{}.proxy_arp", w.host_iface),
                "1".to_owned(),
            ),
            (
                format!("net.ipv4.neigh.{}.proxy_delay", w.host_iface),
                "0".to_owned(),
            ),
        ],
    )
    .await?;
    let host = node.index(&w.host_iface).await?;
    node.set_up(host, None).await?;
    for ip in ips {
        node.replace_route(&pod_route(*ip, host), PROTO_CARACAL).await?;
    }
    Ok(())
}

/// Both ends when they exist and the pod side holds every address.
async fn existing(
    node: &Netlink,
    w: &PodWiring,
    ips: &[Ipv4Net],
) -> Result<Option<(LinkMessage, LinkMessage)>, WireError> {
    let Some(host) = node.link(&w.host_iface).await? else {
        return Ok(None);
    };
    if !Path::new(&w.netns).exists() {
        return Ok(None);
    }
    let pod = Netlink::open(Some(&w.netns)).await?;
    let Some(eth) = pod.link(&w.ifname).await? else {
        return Ok(None);
    };
    let have = pod.addrs(eth.header.index).await?;
    if !ips.iter().all(|ip| have.contains(&IpNet::V4(*ip))) {
        return Ok(None);
    }
    // The default route is the pod side's last step: with it, the pod side is complete.
    let default = pod
        .routes(PROTO_CARACAL)
        .await?
        .into_iter()
        .any(|r| r.dst.prefix_len() == 0 && r.target == RouteTarget::Via(GATEWAY, eth.header.index));
    if !default {
        return Ok(None);
    }
    Ok(Some((host, eth)))
}

/// The existing wiring when it is complete and matches `w` (host side with the pod routes, the pod side
/// holding every address); None otherwise.
pub async fn check(node: &Netlink, w: &PodWiring) -> Result<Option<Wired>, WireError> {
    let ips = v4s(&w.ips)?;
    let Some((host, eth)) = existing(node, w, &ips).await? else {
        return Ok(None);
    };
    let routes = node.routes(PROTO_CARACAL).await?;
    if !ips
        .iter()
        .all(|ip| routes.contains(&pod_route(*ip, host.header.index)))
    {
        return Ok(None);
    }
    Ok(Some(Wired {
        host_mac: mac_text(netlink::link_mac(&host).unwrap_or_default()),
        pod_mac: mac_text(netlink::link_mac(&eth).unwrap_or_default()),
    }))
}

/// Removes the pod's veth (both ends go with the host side); absent is fine, so DEL is idempotent and
/// works after the pod's namespace is gone.
pub async fn del(node: &Netlink, host_iface: &str) -> Result<bool, WireError> {
    Ok(node.del_link(host_iface).await?)
}
