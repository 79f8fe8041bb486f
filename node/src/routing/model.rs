//! What reachability a node needs, computed from the datastore (pure): a route per remote block (through the
//! VXLAN device, straight to the node in the same subnet, or nothing when BIRD carries it), a blackhole per
//! own block, host routes for addresses borrowed across nodes, and the VXLAN peers' neighbour and FDB
//! entries. Both families: an IPv6 block goes through `vxlan6.caracal` (tunnelled over the
//! nodes' IPv6 addresses) or straight to the node's IPv6 address, as its pool says.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use caracal_crds::ippool::EncapMode;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::Value;

/// Node annotations the agents publish and read (Calico's names, in Caracal's domain).
pub mod annotation {
    /// The node's underlay address with its prefix (`10.99.0.2/24`).
    pub const IPV4_ADDRESS: &str = "caracal.dev/IPv4Address";
    /// The node's IPv6 underlay address with its prefix (`fd00:99::2/64`).
    pub const IPV6_ADDRESS: &str = "caracal.dev/IPv6Address";
    /// The node's VXLAN tunnel (VTEP) address.
    pub const IPV4_VXLAN_TUNNEL_ADDR: &str = "caracal.dev/IPv4VXLANTunnelAddr";
    /// The node's VTEP MAC address.
    pub const VXLAN_TUNNEL_MAC: &str = "caracal.dev/VXLANTunnelMACAddr";
    /// The node's IPv6 VXLAN tunnel (VTEP) address.
    pub const IPV6_VXLAN_TUNNEL_ADDR: &str = "caracal.dev/IPv6VXLANTunnelAddr";
    /// The node's IPv6 VTEP MAC address.
    pub const VXLAN_TUNNEL_MAC_V6: &str = "caracal.dev/VXLANTunnelMACAddrV6";
    /// The node's IPIP tunnel address.
    pub const IPV4_IPIP_TUNNEL_ADDR: &str = "caracal.dev/IPv4IPIPTunnelAddr";
    /// The node's WireGuard public key (base64), IPv4 device.
    pub const WIREGUARD_PUBLIC_KEY: &str = "caracal.dev/WireguardPublicKey";
    /// The node's WireGuard public key (base64), IPv6 device.
    pub const WIREGUARD_PUBLIC_KEY_V6: &str = "caracal.dev/WireguardPublicKeyV6";
    /// The IPv4 WireGuard device's address.
    pub const IPV4_WIREGUARD_INTERFACE_ADDR: &str = "caracal.dev/IPv4WireguardInterfaceAddr";
    /// The IPv6 WireGuard device's address.
    pub const IPV6_WIREGUARD_INTERFACE_ADDR: &str = "caracal.dev/IPv6WireguardInterfaceAddr";
    /// The nodes this node sends pod traffic to unencrypted although its WireGuard is on (they publish no
    /// key of the family), comma-separated, IPv4 and IPv6 devices; absent when there are none.
    pub const WIREGUARD_UNENCRYPTED_PEERS: &str = "caracal.dev/WireguardUnencryptedPeers";
    /// As [`WIREGUARD_UNENCRYPTED_PEERS`], for the IPv6 device.
    pub const WIREGUARD_UNENCRYPTED_PEERS_V6: &str = "caracal.dev/WireguardUnencryptedPeersV6";
}

/// What other nodes publish.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Underlay address and prefix.
    pub ip: Option<Ipv4Net>,
    /// VTEP address.
    pub vtep: Option<Ipv4Addr>,
    /// VTEP MAC.
    pub vtep_mac: Option<[u8; 6]>,
    /// IPv6 underlay address and prefix.
    pub ip6: Option<Ipv6Net>,
    /// IPv6 VTEP address.
    pub vtep6: Option<Ipv6Addr>,
    /// IPv6 VTEP MAC.
    pub vtep_mac6: Option<[u8; 6]>,
    /// WireGuard public keys: IPv4 and IPv6 devices.
    pub wg_key: [Option<[u8; 32]>; 2],
    /// WireGuard device addresses: IPv4 and IPv6 devices.
    pub wg_addr: [Option<IpAddr>; 2],
}

/// A pool as routing sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    /// Its network (either family).
    pub cidr: IpNet,
    /// VXLAN mode.
    pub vxlan: EncapMode,
    /// IPIP mode (IPv4 pools only).
    pub ipip: EncapMode,
    /// No new allocations (routes still exist for what is allocated).
    pub disabled: bool,
    /// `disableBGPExport`: its blocks are announced to no BGP peer.
    pub no_bgp_export: bool,
}

/// A block as routing sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    /// Its network.
    pub cidr: IpNet,
    /// The affine node.
    pub node: Option<String>,
    /// Addresses held by pods on other nodes than the affine one (borrowed), with their node.
    pub borrowed: Vec<(IpAddr, String)>,
}

/// How traffic for a destination leaves this node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hop {
    /// Through the family's VXLAN device to the remote VTEP (onlink).
    Vxlan(IpAddr),
    /// Straight to the node's underlay address of the family (same subnet).
    Direct(IpAddr),
    /// Through the IPIP device `tunl0` to the node's underlay address (onlink).
    Ipip(Ipv4Addr),
    /// Dropped: one of this node's blocks (its live pods have more specific routes).
    Blackhole,
}

/// The routing a node wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// The IPv4 VXLAN device is needed.
    pub vxlan: bool,
    /// The IPv6 VXLAN device is needed.
    pub vxlan6: bool,
    /// The IPIP device is needed.
    pub ipip: bool,
    /// Destination -> hop.
    pub routes: BTreeMap<IpNet, Hop>,
    /// VXLAN peers: VTEP address -> (VTEP MAC, node address), for neighbour and FDB entries (IPv6 VTEPs
    /// belong to the IPv6 device).
    pub peers: BTreeMap<IpAddr, ([u8; 6], IpAddr)>,
    /// Problems worth a log line (a node without an address, an IPIP pool on a kernel without IPIP).
    pub warnings: Vec<String>,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    <[u8; 6]>::try_from(parts.as_slice()).ok()
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn parsed<T: std::str::FromStr>(annotations: &Value, key: &str) -> Option<T> {
    annotations[key].as_str().and_then(|s| s.parse().ok())
}

/// Nodes from `v1/Node` documents.
pub fn nodes<'a>(docs: impl Iterator<Item = &'a Value>) -> Vec<NodeInfo> {
    docs.map(|n| {
        let a = &n["metadata"]["annotations"];
        NodeInfo {
            name: n["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
            ip: parsed(a, annotation::IPV4_ADDRESS),
            vtep: parsed(a, annotation::IPV4_VXLAN_TUNNEL_ADDR),
            vtep_mac: a[annotation::VXLAN_TUNNEL_MAC].as_str().and_then(parse_mac),
            ip6: parsed(a, annotation::IPV6_ADDRESS),
            vtep6: parsed(a, annotation::IPV6_VXLAN_TUNNEL_ADDR),
            vtep_mac6: a[annotation::VXLAN_TUNNEL_MAC_V6].as_str().and_then(parse_mac),
            wg_key: [
                annotation::WIREGUARD_PUBLIC_KEY,
                annotation::WIREGUARD_PUBLIC_KEY_V6,
            ]
            .map(|k| a[k].as_str().and_then(crate::wireguard::keys::decode)),
            wg_addr: [
                parsed::<Ipv4Addr>(a, annotation::IPV4_WIREGUARD_INTERFACE_ADDR).map(IpAddr::V4),
                parsed::<Ipv6Addr>(a, annotation::IPV6_WIREGUARD_INTERFACE_ADDR).map(IpAddr::V6),
            ],
        }
    })
    .collect()
}

/// One WireGuard peer of a family, as the datastore describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgPeer {
    /// The node.
    pub node: String,
    /// Its public key.
    pub key: [u8; 32],
    /// Its underlay address of the family.
    pub ip: IpAddr,
    /// What it holds: its blocks of the family, addresses it borrowed from other nodes' blocks, its device's
    /// address.
    pub allowed: Vec<IpNet>,
}

/// The WireGuard peers of node `me` for a family: every other node with a key and an underlay address of
/// the family, with what it holds; and the nodes that hold pod addresses of the family but publish no key
/// (or no address), whose traffic stays unencrypted (Calico's behaviour: a node without WireGuard still
/// talks to the others in the clear; the caller reports them).
pub fn wireguard_peers(
    me: &str,
    v6: bool,
    nodes: &[NodeInfo],
    blocks: &[BlockInfo],
) -> (Vec<WgPeer>, Vec<String>) {
    let family = usize::from(v6);
    let mut holds: BTreeMap<&str, Vec<IpNet>> = BTreeMap::new();
    for b in blocks.iter().filter(|b| b.cidr.addr().is_ipv6() == v6) {
        if let Some(n) = b.node.as_deref() {
            holds.entry(n).or_default().push(b.cidr);
        }
        for (ip, holder) in &b.borrowed {
            holds.entry(holder.as_str()).or_default().push(IpNet::from(*ip));
        }
    }
    let mut peers = Vec::new();
    let mut clear = Vec::new();
    for n in nodes.iter().filter(|n| n.name != me) {
        let ip = if v6 {
            n.ip6.map(|i| IpAddr::V6(i.addr()))
        } else {
            n.ip.map(|i| IpAddr::V4(i.addr()))
        };
        let held = holds.get(n.name.as_str()).cloned().unwrap_or_default();
        match (n.wg_key[family], ip) {
            (Some(key), Some(ip)) => {
                let mut allowed = held;
                if let Some(a) = n.wg_addr[family] {
                    allowed.push(IpNet::from(a));
                }
                allowed.sort();
                allowed.dedup();
                peers.push(WgPeer {
                    node: n.name.clone(),
                    key,
                    ip,
                    allowed,
                });
            }
            _ if !held.is_empty() => clear.push(n.name.clone()),
            _ => {}
        }
    }
    (peers, clear)
}

fn mode(v: &Value) -> EncapMode {
    serde_json::from_value(v.clone()).unwrap_or(EncapMode::Never)
}

/// Pools (both families) from `caracal.dev/v1/IPPool` documents.
pub fn pools<'a>(docs: impl Iterator<Item = &'a Value>) -> Vec<Pool> {
    docs.filter_map(|p| {
        let s = &p["spec"];
        Some(Pool {
            cidr: s["cidr"].as_str()?.parse().ok()?,
            vxlan: mode(&s["vxlanMode"]),
            ipip: mode(&s["ipipMode"]),
            disabled: s["disabled"].as_bool().unwrap_or(false),
            no_bgp_export: s["disableBGPExport"].as_bool().unwrap_or(false),
        })
    })
    .collect()
}

/// The blocks node `me` announces over BGP: its own, less those of pools with `disableBGPExport` (Calico's
/// meaning: that pool's routes go to no BGP peer, the node-to-node mesh's included, so such a pool is reached
/// between nodes through its encapsulation only).
pub fn bgp_blocks(me: &str, blocks: &[BlockInfo], pools: &[Pool]) -> std::collections::BTreeSet<IpNet> {
    blocks
        .iter()
        .filter(|b| b.node.as_deref() == Some(me))
        .filter(|b| !pools.iter().any(|p| p.no_bgp_export && p.cidr.contains(&b.cidr)))
        .map(|b| b.cidr)
        .collect()
}

/// The address `offset` places into `net`.
fn nth(net: IpNet, offset: u64) -> IpAddr {
    match net {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(
            u32::from(n.network()).wrapping_add(u32::try_from(offset).unwrap_or(0)),
        )),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(
            u128::from(n.network()).wrapping_add(u128::from(offset)),
        )),
    }
}

/// Blocks (both families) from `caracal.dev/v1/IPAMBlock` documents, with their borrowed addresses.
pub fn blocks<'a>(docs: impl Iterator<Item = &'a Value>) -> Vec<BlockInfo> {
    docs.filter_map(|b| {
        let s = &b["spec"];
        let cidr: IpNet = s["cidr"].as_str()?.parse().ok()?;
        let node = s["affinity"]
            .as_str()
            .and_then(|a| a.strip_prefix("host:"))
            .map(str::to_owned);
        let attrs = s["attributes"].as_array().cloned().unwrap_or_default();
        let mut borrowed = Vec::new();
        for (offset, slot) in s["allocations"].as_array().into_iter().flatten().enumerate() {
            let Some(i) = slot.as_u64() else { continue };
            let Some(holder) = attrs
                .get(usize::try_from(i).unwrap_or(usize::MAX))
                .and_then(|a| a["secondary"]["node"].as_str())
            else {
                continue;
            };
            if Some(holder) != node.as_deref() {
                borrowed.push((nth(cidr, offset as u64), holder.to_owned()));
            }
        }
        Some(BlockInfo { cidr, node, borrowed })
    })
    .collect()
}

/// This node's underlay addresses, one per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Underlay {
    /// IPv4.
    pub v4: Option<Ipv4Net>,
    /// IPv6.
    pub v6: Option<Ipv6Net>,
}

/// The routing node `me` (underlay addresses `mine`) wants. With `bgp`, routes between nodes in IPv4 pools
/// without encapsulation are BIRD's, not these.
pub fn compute(
    me: &str,
    mine: Underlay,
    nodes: &[NodeInfo],
    pools: &[Pool],
    blocks: &[BlockInfo],
    bgp: bool,
) -> Desired {
    let mut d = Desired::default();
    let by_name: BTreeMap<&str, &NodeInfo> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let active = |p: &&Pool| !p.disabled && p.vxlan != EncapMode::Never;
    d.vxlan = pools.iter().filter(active).any(|p| p.cidr.addr().is_ipv4());
    d.vxlan6 = pools.iter().filter(active).any(|p| p.cidr.addr().is_ipv6());
    for p in pools {
        if p.ipip != EncapMode::Never && !p.disabled && p.cidr.addr().is_ipv4() {
            d.ipip = true;
        }
    }
    for n in nodes.iter().filter(|n| n.name != me) {
        if d.vxlan
            && let (Some(vtep), Some(mac), Some(ip)) = (n.vtep, n.vtep_mac, n.ip)
        {
            d.peers.insert(IpAddr::V4(vtep), (mac, IpAddr::V4(ip.addr())));
        }
        if d.vxlan6
            && let (Some(vtep), Some(mac), Some(ip)) = (n.vtep6, n.vtep_mac6, n.ip6)
        {
            d.peers.insert(IpAddr::V6(vtep), (mac, IpAddr::V6(ip.addr())));
        }
    }
    let hop_to = |node: &str, dst: IpNet, d: &mut Desired| -> Option<Hop> {
        let pool = pools.iter().find(|p| p.cidr.contains(&dst.network()))?;
        let Some(n) = by_name.get(node) else {
            d.warnings.push(format!("{dst}: node {node} is unknown"));
            return None;
        };
        let v4 = dst.addr().is_ipv4();
        // The peer's underlay address of the destination's family, and whether it shares our subnet.
        let (theirs, same_subnet): (Option<IpAddr>, bool) = if v4 {
            let t = n.ip.map(|i| i.addr());
            (
                t.map(IpAddr::V4),
                matches!((mine.v4, t), (Some(m), Some(t)) if m.contains(&t)),
            )
        } else {
            let t = n.ip6.map(|i| i.addr());
            (
                t.map(IpAddr::V6),
                matches!((mine.v6, t), (Some(m), Some(t)) if m.contains(&t)),
            )
        };
        let vxlan = match pool.vxlan {
            EncapMode::Always => true,
            EncapMode::CrossSubnet => !same_subnet,
            EncapMode::Never => false,
        };
        if vxlan {
            let vtep = if v4 {
                n.vtep.filter(|_| n.vtep_mac.is_some()).map(IpAddr::V4)
            } else {
                n.vtep6.filter(|_| n.vtep_mac6.is_some()).map(IpAddr::V6)
            };
            return match vtep {
                Some(v) => Some(Hop::Vxlan(v)),
                None => {
                    d.warnings
                        .push(format!("{dst}: node {node} has not published its VTEP yet"));
                    None
                }
            };
        }
        let ipip = v4
            && match pool.ipip {
                EncapMode::Always => true,
                EncapMode::CrossSubnet => !same_subnet,
                EncapMode::Never => false,
            };
        if ipip {
            return n.ip.map(|i| Hop::Ipip(i.addr()));
        }
        if bgp {
            // BIRD announces the route (a static one would fight it), over IPv6 sessions for IPv6 blocks.
            return None;
        }
        if same_subnet {
            return theirs.map(Hop::Direct);
        }
        d.warnings.push(if theirs.is_none() {
            format!(
                "{dst}: node {node} has published no IPv{} address",
                if v4 { 4 } else { 6 }
            )
        } else {
            format!("{dst}: node {node} is in another subnet and the pool does not encapsulate")
        });
        None
    };
    for b in blocks {
        match b.node.as_deref() {
            Some(n) if n == me => {
                d.routes.insert(b.cidr, Hop::Blackhole);
            }
            Some(n) => {
                if let Some(h) = hop_to(n, b.cidr, &mut d) {
                    d.routes.insert(b.cidr, h);
                }
            }
            None => {}
        }
        for (ip, holder) in &b.borrowed {
            if holder == me {
                continue; // The pod's own host route through its veth.
            }
            let dst = IpNet::from(*ip);
            if let Some(h) = hop_to(holder, dst, &mut d) {
                d.routes.insert(dst, h);
            }
        }
    }
    d
}

/// One encapsulation in use and what it costs each packet: `v6` when it runs over the IPv6 underlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overhead {
    /// Over the IPv6 underlay (its link's MTU applies).
    pub v6: bool,
    /// Bytes added to each packet.
    pub bytes: u32,
    /// The MTU configured for this encapsulation (Felix's `vxlanMTU`, `vxlanMTUV6`, `ipipMTU`): used as is.
    pub fixed: Option<u32>,
}

/// The MTU pods get: the host MTU less the largest overhead in use, per underlay family (`host_v6`: the IPv6
/// underlay link's MTU, when the node has one). No encapsulation: the IPv4 underlay's MTU.
pub fn pod_mtu(host_v4: u32, host_v6: Option<u32>, overheads: &[Overhead]) -> u32 {
    overheads
        .iter()
        .map(|o| {
            let host = if o.v6 { host_v6.unwrap_or(host_v4) } else { host_v4 };
            o.fixed.unwrap_or(host.saturating_sub(o.bytes))
        })
        .min()
        .unwrap_or(host_v4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, vtep: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            ip: Some(ip.parse().unwrap()),
            vtep: Some(vtep.parse().unwrap()),
            vtep_mac: Some([0x66, 0, 0, 0, 0, name.len() as u8]),
            ..NodeInfo::default()
        }
    }

    fn v4(n: &NodeInfo) -> Underlay {
        Underlay { v4: n.ip, v6: n.ip6 }
    }

    fn pool(cidr: &str, vxlan: EncapMode) -> Pool {
        Pool {
            cidr: cidr.parse().unwrap(),
            vxlan,
            ipip: EncapMode::Never,
            disabled: false,
            no_bgp_export: false,
        }
    }

    #[test]
    fn blocks_of_a_pool_that_disables_bgp_export_are_not_announced() {
        let mut quiet = pool("10.250.0.0/16", EncapMode::Always);
        quiet.no_bgp_export = true;
        let all = vec![pool("10.244.0.0/16", EncapMode::Never), quiet];
        let blocks = vec![
            block("10.244.0.0/26", "a"),
            block("10.250.0.0/26", "a"),
            block("10.244.0.64/26", "b"),
        ];
        let announced: Vec<String> = bgp_blocks("a", &blocks, &all)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(announced, ["10.244.0.0/26"]);
        // Parsed from the IPPool document.
        let doc = serde_json::json!({"spec": {"cidr": "10.250.0.0/16", "disableBGPExport": true}});
        assert!(pools(std::iter::once(&doc))[0].no_bgp_export);
    }

    fn block(cidr: &str, node: &str) -> BlockInfo {
        BlockInfo {
            cidr: cidr.parse().unwrap(),
            node: Some(node.into()),
            borrowed: vec![],
        }
    }

    fn setup() -> (Vec<NodeInfo>, Vec<BlockInfo>) {
        let nodes = vec![
            node("a", "10.99.0.2/24", "10.244.0.0"),
            node("b", "10.99.0.3/24", "10.244.0.64"),
            node("c", "10.98.0.4/24", "10.244.0.128"),
        ];
        let mut b = block("10.244.0.64/26", "b");
        b.borrowed.push(("10.244.0.70".parse().unwrap(), "c".into()));
        b.borrowed.push(("10.244.0.71".parse().unwrap(), "a".into()));
        let blocks = vec![block("10.244.0.0/26", "a"), b, block("10.244.0.128/26", "c")];
        (nodes, blocks)
    }

    #[test]
    fn vxlan_always_routes_every_remote_block_through_its_vtep_and_blackholes_its_own() {
        let (nodes, blocks) = setup();
        let d = compute(
            "a",
            v4(&nodes[0]),
            &nodes,
            &[pool("10.244.0.0/16", EncapMode::Always)],
            &blocks,
            false,
        );
        assert!(d.vxlan);
        assert_eq!(d.routes[&"10.244.0.0/26".parse().unwrap()], Hop::Blackhole);
        assert_eq!(
            d.routes[&"10.244.0.64/26".parse().unwrap()],
            Hop::Vxlan("10.244.0.64".parse().unwrap())
        );
        assert_eq!(
            d.routes[&"10.244.0.128/26".parse().unwrap()],
            Hop::Vxlan("10.244.0.128".parse().unwrap())
        );
        // A borrowed address goes to the node that holds it; our own borrowed address is the veth's.
        assert_eq!(
            d.routes[&"10.244.0.70/32".parse().unwrap()],
            Hop::Vxlan("10.244.0.128".parse().unwrap())
        );
        assert!(!d.routes.contains_key(&"10.244.0.71/32".parse().unwrap()));
        assert_eq!(d.peers.len(), 2);
        assert_eq!(
            d.peers[&"10.244.0.64".parse().unwrap()].1,
            "10.99.0.3".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn cross_subnet_encapsulates_only_across_subnets() {
        let (nodes, blocks) = setup();
        let d = compute(
            "a",
            v4(&nodes[0]),
            &nodes,
            &[pool("10.244.0.0/16", EncapMode::CrossSubnet)],
            &blocks,
            false,
        );
        assert_eq!(
            d.routes[&"10.244.0.64/26".parse().unwrap()],
            Hop::Direct("10.99.0.3".parse().unwrap())
        );
        assert_eq!(
            d.routes[&"10.244.0.128/26".parse().unwrap()],
            Hop::Vxlan("10.244.0.128".parse().unwrap())
        );
    }

    #[test]
    fn no_encapsulation_routes_directly_in_the_subnet_and_leaves_the_rest_to_bgp() {
        let (nodes, blocks) = setup();
        let plain = compute(
            "a",
            v4(&nodes[0]),
            &nodes,
            &[pool("10.244.0.0/16", EncapMode::Never)],
            &blocks,
            false,
        );
        assert!(!plain.vxlan);
        assert!(plain.peers.is_empty());
        assert_eq!(
            plain.routes[&"10.244.0.64/26".parse().unwrap()],
            Hop::Direct("10.99.0.3".parse().unwrap())
        );
        assert!(!plain.routes.contains_key(&"10.244.0.128/26".parse().unwrap()));
        assert!(plain.warnings.iter().any(|w| w.contains("another subnet")));
        let bgp = compute(
            "a",
            v4(&nodes[0]),
            &nodes,
            &[pool("10.244.0.0/16", EncapMode::Never)],
            &blocks,
            true,
        );
        assert_eq!(
            bgp.routes.len(),
            1,
            "only the own blackhole: BIRD carries the rest: {:?}",
            bgp.routes
        );
    }

    #[test]
    fn a_node_without_a_published_vtep_gets_no_route_yet_and_a_warning() {
        let (mut nodes, blocks) = setup();
        nodes[1].vtep = None;
        let d = compute(
            "a",
            v4(&nodes[0]),
            &nodes,
            &[pool("10.244.0.0/16", EncapMode::Always)],
            &blocks,
            false,
        );
        assert!(!d.routes.contains_key(&"10.244.0.64/26".parse().unwrap()));
        assert!(d.warnings.iter().any(|w| w.contains("VTEP")));
    }

    #[test]
    fn ipip_routes_through_tunl0_to_the_node_address_and_cross_subnet_only_across_subnets() {
        let (nodes, blocks) = setup();
        let mut p = pool("10.244.0.0/16", EncapMode::Never);
        p.ipip = EncapMode::Always;
        let d = compute(
            "a",
            v4(&nodes[0]),
            &nodes,
            std::slice::from_ref(&p),
            &blocks,
            true,
        );
        assert!(d.ipip && !d.vxlan);
        assert_eq!(
            d.routes[&"10.244.0.64/26".parse().unwrap()],
            Hop::Ipip("10.99.0.3".parse().unwrap())
        );
        p.ipip = EncapMode::CrossSubnet;
        let d = compute("a", v4(&nodes[0]), &nodes, &[p], &blocks, false);
        assert_eq!(
            d.routes[&"10.244.0.64/26".parse().unwrap()],
            Hop::Direct("10.99.0.3".parse().unwrap())
        );
        assert_eq!(
            d.routes[&"10.244.0.128/26".parse().unwrap()],
            Hop::Ipip("10.98.0.4".parse().unwrap())
        );
    }

    #[test]
    fn wireguard_peers_are_the_keyed_nodes_with_what_they_hold_and_the_rest_are_reported() {
        let keyed = |name: &str, ip: &str, key: u8, wg: &str| NodeInfo {
            name: name.into(),
            ip: Some(ip.parse().unwrap()),
            wg_key: [Some([key; 32]), None],
            wg_addr: [Some(wg.parse().unwrap()), None],
            ..NodeInfo::default()
        };
        let nodes = vec![
            keyed("a", "10.99.0.2/24", 1, "10.244.0.1"),
            keyed("b", "10.99.0.3/24", 2, "10.244.0.65"),
            // c runs pods but has no key (WireGuard off there, or not started yet); d has nothing.
            node("c", "10.99.0.4/24", "10.244.0.129"),
            node("d", "10.99.0.5/24", "10.244.0.193"),
        ];
        let block = |cidr: &str, node: &str| BlockInfo {
            cidr: cidr.parse().unwrap(),
            node: Some(node.into()),
            borrowed: vec![],
        };
        let mut a_block = block("10.244.0.0/26", "a");
        // b holds one address of a's block.
        a_block.borrowed.push(("10.244.0.9".parse().unwrap(), "b".into()));
        let blocks = vec![
            a_block,
            block("10.244.0.64/26", "b"),
            block("10.244.1.0/26", "b"),
            block("10.244.0.128/26", "c"),
            block("fd10::/122", "b"),
        ];
        let (peers, clear) = wireguard_peers("a", false, &nodes, &blocks);
        assert_eq!(clear, vec!["c".to_owned()]);
        assert_eq!(peers.len(), 1, "{peers:?}");
        let b = &peers[0];
        assert_eq!(
            (b.node.as_str(), b.key, b.ip),
            ("b", [2; 32], "10.99.0.3".parse().unwrap())
        );
        let allowed: Vec<String> = b.allowed.iter().map(ToString::to_string).collect();
        assert_eq!(
            allowed,
            [
                "10.244.0.9/32",
                "10.244.0.64/26",
                "10.244.0.65/32",
                "10.244.1.0/26"
            ]
        );
        // From b: a is a peer with its block (less nothing: what b borrowed stays b's), c still clear.
        let (peers, clear) = wireguard_peers("b", false, &nodes, &blocks);
        assert_eq!(peers.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(clear, vec!["c".to_owned()]);
        // IPv6: nobody has an IPv6 key; b holds an IPv6 block, so it is reported.
        let (peers, clear) = wireguard_peers("a", true, &nodes, &blocks);
        assert!(peers.is_empty());
        assert_eq!(clear, vec!["b".to_owned()]);
    }

    #[test]
    fn ipv6_blocks_go_through_the_ipv6_vtep_or_straight_to_the_nodes_ipv6_address() {
        let six = |name: &str, ip: &str, vtep: &str| NodeInfo {
            name: name.into(),
            ip6: Some(ip.parse().unwrap()),
            vtep6: Some(vtep.parse().unwrap()),
            vtep_mac6: Some([0x66, 6, 0, 0, 0, name.len() as u8]),
            ..NodeInfo::default()
        };
        let nodes = vec![
            six("a", "fd00:99::2/64", "fd10::"),
            six("bb", "fd00:99::3/64", "fd10::40"),
            six("ccc", "fd00:98::4/64", "fd10::80"),
        ];
        let mut shared = BlockInfo {
            cidr: "fd10::40/122".parse().unwrap(),
            node: Some("bb".into()),
            borrowed: vec![],
        };
        shared.borrowed.push(("fd10::45".parse().unwrap(), "ccc".into()));
        let blocks = vec![
            BlockInfo {
                cidr: "fd10::/122".parse().unwrap(),
                node: Some("a".into()),
                borrowed: vec![],
            },
            shared,
            BlockInfo {
                cidr: "fd10::80/122".parse().unwrap(),
                node: Some("ccc".into()),
                borrowed: vec![],
            },
        ];
        let mine = Underlay {
            v4: None,
            v6: nodes[0].ip6,
        };
        let mut p = pool("fd10::/48", EncapMode::Always);
        let d = compute("a", mine, &nodes, std::slice::from_ref(&p), &blocks, false);
        assert!(d.vxlan6 && !d.vxlan);
        assert_eq!(d.routes[&"fd10::/122".parse().unwrap()], Hop::Blackhole);
        assert_eq!(
            d.routes[&"fd10::40/122".parse().unwrap()],
            Hop::Vxlan("fd10::40".parse().unwrap())
        );
        assert_eq!(
            d.routes[&"fd10::45/128".parse().unwrap()],
            Hop::Vxlan("fd10::80".parse().unwrap()),
            "a borrowed address goes to the node holding it"
        );
        assert_eq!(
            d.peers[&"fd10::40".parse::<IpAddr>().unwrap()],
            ([0x66, 6, 0, 0, 0, 2], "fd00:99::3".parse().unwrap())
        );
        // Without encapsulation: straight to the node's IPv6 address in the subnet; across subnets, nothing
        // and a warning; with BGP, BIRD's.
        p.vxlan = EncapMode::Never;
        let bgp = compute("a", mine, &nodes, std::slice::from_ref(&p), &blocks, true);
        assert_eq!(bgp.routes.len(), 1, "only the own blackhole: {:?}", bgp.routes);
        let d = compute("a", mine, &nodes, &[p], &blocks, false);
        assert!(!d.vxlan6);
        assert_eq!(
            d.routes[&"fd10::40/122".parse().unwrap()],
            Hop::Direct("fd00:99::3".parse().unwrap())
        );
        assert!(!d.routes.contains_key(&"fd10::80/122".parse().unwrap()));
        assert!(d.warnings.iter().any(|w| w.contains("another subnet")));
    }

    #[test]
    fn the_pod_mtu_is_the_host_mtu_less_the_largest_overhead_in_use() {
        let o = |v6, bytes| Overhead {
            v6,
            bytes,
            fixed: None,
        };
        let fixed = Overhead {
            v6: false,
            bytes: 50,
            fixed: Some(1400),
        };
        assert_eq!(
            pod_mtu(1500, None, &[fixed, o(false, 20)]),
            1400,
            "a configured MTU is used as is"
        );
        assert_eq!(pod_mtu(1500, None, &[o(false, 50)]), 1450, "VXLAN");
        assert_eq!(pod_mtu(1500, None, &[o(false, 20)]), 1480, "IPIP");
        assert_eq!(
            pod_mtu(1500, None, &[o(false, 50), o(false, 60)]),
            1440,
            "the largest overhead in use: WireGuard's"
        );
        assert_eq!(pod_mtu(9000, None, &[]), 9000, "no encapsulation");
        assert_eq!(
            pod_mtu(1500, Some(1400), &[o(false, 50), o(true, 70)]),
            1330,
            "VXLAN over an IPv6 underlay with a smaller MTU"
        );
    }

    #[test]
    fn documents_parse_into_nodes_pools_and_blocks_with_borrowed_addresses() {
        let n = serde_json::json!({"metadata": {"name": "b", "annotations": {
            annotation::IPV4_ADDRESS: "10.99.0.3/24", annotation::IPV4_VXLAN_TUNNEL_ADDR: "10.244.0.64",
            annotation::VXLAN_TUNNEL_MAC: "66:0a:0b:0c:0d:0e"}}});
        let got = nodes([&n].into_iter());
        assert_eq!(got[0].vtep_mac, Some([0x66, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e]));
        let b = serde_json::json!({"spec": {"cidr": "10.244.0.64/30", "affinity": "host:b",
            "allocations": [0, null, 1, null], "unallocated": [1, 3],
            "attributes": [{"handle_id": "x", "secondary": {"node": "b"}}, {"handle_id": "y", "secondary": {"node": "c"}}]}});
        let got = blocks([&b].into_iter());
        assert_eq!(
            got[0].borrowed,
            vec![("10.244.0.66".parse().unwrap(), "c".to_owned())]
        );
        let p = serde_json::json!({"spec": {"cidr": "10.244.0.0/16", "vxlanMode": "CrossSubnet", "natOutgoing": true}});
        assert_eq!(pools([&p].into_iter())[0].vxlan, EncapMode::CrossSubnet);
    }
}
