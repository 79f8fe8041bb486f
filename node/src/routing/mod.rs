//! Reachability between nodes: the node's address and VTEP published on its Node object, the VXLAN device
//! with static ARP and FDB entries per peer, a route per remote block (encapsulated, direct in the same
//! subnet, or BIRD's with BGP), blackholes for own blocks, the pods' /32 routes, natOutgoing, and the pod
//! MTU. [`model`] computes (pure); [`Routing::sync`] converges the kernel, and running it again repairs
//! drift (a deleted route or FDB entry returns).
//!
//! IPv6, when on (`Config::method6`): the node's IPv6 address is found and published, IPv6 forwarding is
//! on, IPv6 blocks are routed through `vxlan6.caracal` (tunnelled between the nodes' IPv6 addresses) or
//! straight to the node's IPv6 address in the same subnet (or by BIRD, with BGP), and natOutgoing has its
//! `ip6tables` twin.

pub mod address;
pub mod bgp;
pub mod model;
pub mod nat;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::Value;
use tracing::{info, warn};

use crate::cni::host_iface;
use crate::ipam::node::{NodeIpam, attr};
use crate::netlink::{Netlink, NetlinkError, OwnedRoute, PROTO_CARACAL, RouteTarget, VxlanDevice};
use caracal_datastore::Cache;
use model::{Desired, Hop, annotation};

/// The IPIP device's name (the ipip module's fallback device, as Calico uses it).
pub const IPIP_DEVICE: &str = "tunl0";
/// The VXLAN device's name.
pub const VXLAN_DEVICE: &str = "vxlan.caracal";
/// The IPv6 VXLAN device's name (Calico's `vxlan-v6.calico` would be 16 characters here, one over the
/// kernel's limit).
pub const VXLAN_V6_DEVICE: &str = "vxlan6.caracal";
/// Felix's defaults.
pub const DEFAULT_VNI: u32 = 4096;
/// Felix's default VXLAN port.
pub const DEFAULT_PORT: u16 = 4789;

/// How routing is configured (from the DaemonSet's environment).
#[derive(Clone, Debug)]
pub struct Config {
    /// This node.
    pub node: String,
    /// How to find the node's address.
    pub method: address::Method,
    /// How to find the node's IPv6 address; None when IPv6 is off.
    pub method6: Option<address::Method>,
    /// BIRD carries routes for pools without encapsulation.
    pub bgp: bool,
    /// An explicit pod MTU (Installation `calicoNetwork.mtu`): wins over detection.
    pub mtu: Option<u32>,
    /// Prefix for iptables/ipset and BIRD (a namespace in tests and the lab).
    pub exec_prefix: Vec<String>,
    /// Where BIRD's configuration, control socket and log live (per node).
    pub state_dir: std::path::PathBuf,
}

/// Errors converging routing.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// The kernel refused.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// No address to publish.
    #[error(transparent)]
    Address(#[from] address::AddressError),
    /// The nat table.
    #[error("natOutgoing: {0}")]
    Nat(#[from] crate::dataplane::iptables::apply::IptablesError),
    /// The VTEP address could not be allocated.
    #[error("allocating the VTEP address: {0}")]
    Ipam(#[from] crate::ipam::node::IpamError),
    /// BIRD.
    #[error(transparent)]
    Bird(#[from] bgp::BirdError),
    /// A blocking task died.
    #[error("routing task: {0}")]
    Task(String),
    /// Publishing on the Node failed.
    #[error("publishing the node's address on its Node object: {0}")]
    Publish(kube::Error),
}

/// What one sync changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Routes written.
    pub routes_added: usize,
    /// Routes removed.
    pub routes_removed: usize,
    /// ARP/FDB entries written.
    pub neighbours_written: usize,
    /// The nat table or its sets changed.
    pub nat_changed: bool,
    /// The Node's annotations were updated.
    pub published: bool,
}

impl SyncStats {
    /// True when the kernel already matched.
    pub fn is_noop(&self) -> bool {
        *self == SyncStats::default()
    }
}

/// What both VXLAN devices share (FelixConfiguration's VNI and port, the pod MTU).
struct VxlanParams {
    vni: u32,
    port: u16,
    mtu: u32,
}

/// The routing side of one node.
pub struct Routing {
    cfg: Config,
    nl: Netlink,
    client: Client,
    ipam: NodeIpam,
    /// The pod MTU, shared with the CNI server.
    pub mtu: Arc<AtomicU32>,
    warned: BTreeSet<String>,
    /// What the last successful sync converged to: an unchanged input needs no kernel work until the next
    /// forced (periodic) sync.
    last: Option<(
        Desired,
        address::Chosen,
        Option<address::Chosen<ipnet::Ipv6Net>>,
        u32,
    )>,
    /// BIRD, when BGP is enabled.
    bird: Option<bgp::Bird>,
    /// The node's addresses as last found (again on every forced sync).
    detected: Option<Detected>,
}

/// The node's underlay addresses as found, and why IPv6 has none.
#[derive(Clone, Debug)]
struct Detected {
    chosen: address::Chosen,
    chosen6: Option<address::Chosen<ipnet::Ipv6Net>>,
    warning: Option<String>,
}

fn felix(cache: &Cache) -> Value {
    cache
        .get("caracal.dev/v1/FelixConfiguration", "default")
        .cloned()
        .unwrap_or(Value::Null)
}

/// The handle of a node's IPIP tunnel address.
pub fn ipip_handle(node: &str) -> String {
    format!("ipip-tunnel-addr.{node}")
}

/// The handle of a node's VTEP address.
pub fn vtep_handle(node: &str) -> String {
    format!("vxlan-tunnel-addr.{node}")
}

/// The handle of a node's IPv6 VTEP address.
pub fn vtep6_handle(node: &str) -> String {
    format!("vxlan-v6-tunnel-addr.{node}")
}

impl Routing {
    /// Routing for the namespace `nl` works in.
    pub fn new(cfg: Config, nl: Netlink, client: Client, ipam: NodeIpam, mtu: Arc<AtomicU32>) -> Self {
        Self {
            nl,
            client,
            ipam,
            mtu,
            warned: BTreeSet::new(),
            last: None,
            detected: None,
            bird: cfg
                .bgp
                .then(|| bgp::Bird::new(&cfg.state_dir.join("bird"), cfg.exec_prefix.clone())),
            cfg,
        }
    }

    /// BIRD's `show protocols`, when BGP is enabled.
    pub async fn bgp_protocols(&self) -> Option<String> {
        match &self.bird {
            Some(b) => b.protocols().await.ok(),
            None => None,
        }
    }

    /// Converges the node's routing to what `cache` says. Unless `force`, nothing is done when the desired
    /// routing equals what the last sync converged to (the periodic sync forces, and repairs drift).
    pub async fn sync(&mut self, cache: &Cache, force: bool) -> Result<SyncStats, RoutingError> {
        let mut stats = SyncStats::default();
        let me = self.cfg.node.clone();
        let my_node = cache.get("v1/Node", &me).cloned().unwrap_or(Value::Null);
        let internal = |v6: bool| -> Option<IpAddr> {
            my_node["status"]["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["type"] == "InternalIP")
                .filter_map(|a| a["address"].as_str()?.parse::<IpAddr>().ok())
                .find(|ip| ip.is_ipv6() == v6)
        };
        // The node's addresses are found again (and forwarding set) on every forced (periodic) sync only:
        // finding them dumps every link and address, and with hundreds of pods that is most of a sync's cost.
        let detected = match (&self.detected, force) {
            (Some(d), false) => d.clone(),
            _ => {
                let mut forwarding = vec![("net.ipv4.ip_forward".to_owned(), "1".to_owned())];
                if self.cfg.method6.is_some() {
                    forwarding.push(("net.ipv6.conf.all.forwarding".to_owned(), "1".to_owned()));
                }
                crate::netlink::sysctls(self.nl.netns(), forwarding).await?;
                let chosen = address::detect(&self.nl, &self.cfg.method, internal(false)).await?;
                let (chosen6, warning) = match &self.cfg.method6 {
                    Some(m) => match address::detect_v6(&self.nl, m, internal(true)).await {
                        Ok(c) => (Some(c), None),
                        Err(e) => (
                            None,
                            Some(format!("IPv6 is on but the node has no IPv6 address: {e}")),
                        ),
                    },
                    None => (None, None),
                };
                let d = Detected {
                    chosen,
                    chosen6,
                    warning,
                };
                self.detected = Some(d.clone());
                d
            }
        };
        let Detected {
            chosen,
            chosen6,
            warning,
        } = detected;
        let mut warnings: Vec<String> = warning.into_iter().collect();
        let nodes = model::nodes(cache.of_kind("v1/Node").map(|(_, v)| v));
        let pools = model::pools(cache.of_kind("caracal.dev/v1/IPPool").map(|(_, v)| v));
        let blocks = model::blocks(cache.of_kind("caracal.dev/v1/IPAMBlock").map(|(_, v)| v));
        let underlay = model::Underlay {
            v4: Some(chosen.ip),
            v6: chosen6.as_ref().map(|c| c.ip),
        };
        let desired = model::compute(&me, underlay, &nodes, &pools, &blocks, self.cfg.bgp);
        warnings.extend(desired.warnings.iter().cloned());
        for (name, p) in cache.of_kind("caracal.dev/v1/IPPool") {
            if self.cfg.method6.is_none() && p["spec"]["cidr"].as_str().is_some_and(|c| c.contains(':')) {
                warnings.push(format!(
                    "IPPool {name} is IPv6, but IPv6 is off on this node (CARACAL_IPV6_AUTODETECTION is none or unset; the operator sets it when the Installation has an IPv6 pool): its addresses are not routed here"
                ));
            }
        }
        for w in &warnings {
            if self.warned.insert(w.clone()) {
                warn!("{w}");
            }
        }
        if let Some(bird) = self.bird.as_mut() {
            let nodes: BTreeMap<String, Value> = cache
                .of_kind("v1/Node")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let config = cache
                .get("caracal.dev/v1/BGPConfiguration", "default")
                .cloned()
                .unwrap_or(Value::Null);
            let peers: Vec<Value> = cache
                .of_kind("caracal.dev/v1/BGPPeer")
                .map(|(_, v)| v.clone())
                .collect();
            let mine: BTreeSet<IpNet> = blocks
                .iter()
                .filter(|b| b.node.as_deref() == Some(me.as_str()))
                .map(|b| b.cidr)
                .collect();
            let input = bgp::input(
                &me,
                chosen.ip,
                chosen6.as_ref().map(|c| c.ip),
                &nodes,
                &config,
                &peers,
                mine,
            );
            bird.ensure(&bgp::render(&input)).await?;
        }
        let f = felix(cache);
        let explicit = self
            .cfg
            .mtu
            .or_else(|| f["vxlanMTU"].as_u64().and_then(|m| u32::try_from(m).ok()));
        let pod_mtu = explicit.unwrap_or_else(|| {
            let mut mtu = model::pod_mtu(chosen.mtu, desired.vxlan, desired.ipip, false);
            if let (true, Some(c6)) = (desired.vxlan6, &chosen6) {
                // VXLAN over IPv6 costs 70 bytes (a 40-byte outer header).
                mtu = mtu.min(c6.mtu.saturating_sub(70));
            }
            mtu
        });
        self.mtu.store(pod_mtu, Ordering::Relaxed);
        let key = (desired.clone(), chosen.clone(), chosen6.clone(), pod_mtu);
        if !force && self.last.as_ref() == Some(&key) {
            return Ok(stats);
        }

        // The VXLAN devices, their addresses and the peers.
        let mut annotations =
            BTreeMap::from([(annotation::IPV4_ADDRESS.to_owned(), Some(chosen.ip.to_string()))]);
        annotations.insert(
            annotation::IPV6_ADDRESS.to_owned(),
            chosen6.as_ref().map(|c| c.ip.to_string()),
        );
        let vni = f["vxlanVNI"]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(DEFAULT_VNI);
        let port = f["vxlanPort"]
            .as_u64()
            .and_then(|v| u16::try_from(v).ok())
            .unwrap_or(DEFAULT_PORT);
        let vx = VxlanParams {
            vni,
            port,
            mtu: pod_mtu,
        };
        let vxlan_index = self
            .vxlan_device(
                false,
                desired
                    .vxlan
                    .then_some((IpAddr::V4(chosen.ip.addr()), chosen.index)),
                &vx,
                &desired,
                &mut annotations,
                &mut stats,
            )
            .await?;
        let vxlan6_index = self
            .vxlan_device(
                true,
                chosen6
                    .as_ref()
                    .filter(|_| desired.vxlan6)
                    .map(|c6| (IpAddr::V6(c6.ip.addr()), c6.index)),
                &vx,
                &desired,
                &mut annotations,
                &mut stats,
            )
            .await?;
        let mut ipip_index = None;
        if desired.ipip {
            match self
                .nl
                .ensure_ipip(IPIP_DEVICE, chosen.mtu.saturating_sub(20))
                .await
            {
                Ok(index) => {
                    let addr = self
                        .tunnel_address(&ipip_handle(&me), "ipipTunnelAddress", false)
                        .await?;
                    self.nl.add_addr(index, IpNet::from(addr)).await?;
                    annotations.insert(annotation::IPV4_IPIP_TUNNEL_ADDR.into(), Some(addr.to_string()));
                    ipip_index = Some(index);
                }
                Err(e) if crate::netlink::is_not_supported(&e) => {
                    let w = "an IPPool asks for IPIP, but this kernel has no ipip module: IPIP routes are not programmed (use vxlanMode)".to_owned();
                    if self.warned.insert(w.clone()) {
                        warn!("{w}");
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        stats.published = self.publish(&my_node, annotations).await?;

        // Routes: remote blocks, own blackholes, local pods.
        let mut want: BTreeSet<OwnedRoute> = BTreeSet::new();
        for (dst, hop) in &desired.routes {
            let target = match hop {
                Hop::Vxlan(v) => match (v.is_ipv4(), vxlan_index, vxlan6_index) {
                    (true, Some(i), _) | (false, _, Some(i)) => RouteTarget::Via(*v, i),
                    _ => continue,
                },
                Hop::Direct(ip) => match (ip.is_ipv4(), &chosen6) {
                    (true, _) => RouteTarget::Via(*ip, chosen.index),
                    (false, Some(c6)) => RouteTarget::Via(*ip, c6.index),
                    (false, None) => continue,
                },
                Hop::Ipip(ip) => match ipip_index {
                    Some(i) => RouteTarget::Via(IpAddr::V4(*ip), i),
                    None => continue,
                },
                Hop::Blackhole => RouteTarget::Blackhole,
            };
            want.insert(OwnedRoute { dst: *dst, target });
        }
        // Read the kernel before the pods: a pod wired meanwhile is then never taken for a stale route.
        let have: BTreeSet<OwnedRoute> = self.nl.routes(PROTO_CARACAL).await?.into_iter().collect();
        want.extend(self.pod_routes().await?);
        for r in have.difference(&want) {
            self.nl.del_route(r, PROTO_CARACAL).await?;
            stats.routes_removed += 1;
        }
        for r in want.difference(&have) {
            self.nl.replace_route(r, PROTO_CARACAL).await?;
            stats.routes_added += 1;
        }
        // The nat tools are processes: off the runtime's threads.
        let (prefix, masq, all, v6) = (
            self.cfg.exec_prefix.clone(),
            desired.masquerade.clone(),
            desired.all_pools.clone(),
            self.cfg.method6.is_some(),
        );
        stats.nat_changed = tokio::task::spawn_blocking(move || {
            let mut changed = nat::apply(&prefix, crate::dataplane::Family::V4, &masq, &all)?;
            if v6 {
                changed |= nat::apply(&prefix, crate::dataplane::Family::V6, &masq, &all)?;
            }
            Ok::<bool, crate::dataplane::iptables::apply::IptablesError>(changed)
        })
        .await
        .map_err(|e| RoutingError::Task(e.to_string()))??;
        self.last = Some(key);
        Ok(stats)
    }

    /// Converges the VXLAN device of one family (`v6`: `vxlan6.caracal`): with `underlay` (the node's
    /// address and link of that family) the device, its VTEP address from IPAM, its peers' entries and its
    /// annotations; without, no device and no annotations. Returns the device's index.
    async fn vxlan_device(
        &self,
        v6: bool,
        underlay: Option<(IpAddr, u32)>,
        vx: &VxlanParams,
        desired: &Desired,
        annotations: &mut BTreeMap<String, Option<String>>,
        stats: &mut SyncStats,
    ) -> Result<Option<u32>, RoutingError> {
        let me = &self.cfg.node;
        let (name, handle, kind, mac, addr_key, mac_key) = if v6 {
            (
                VXLAN_V6_DEVICE,
                vtep6_handle(me),
                "vxlanV6TunnelAddress",
                address::vtep_mac_v6(me),
                annotation::IPV6_VXLAN_TUNNEL_ADDR,
                annotation::VXLAN_TUNNEL_MAC_V6,
            )
        } else {
            (
                VXLAN_DEVICE,
                vtep_handle(me),
                "vxlanTunnelAddress",
                address::vtep_mac(me),
                annotation::IPV4_VXLAN_TUNNEL_ADDR,
                annotation::VXLAN_TUNNEL_MAC,
            )
        };
        let Some((local, parent)) = underlay else {
            self.nl.del_link(name).await?;
            annotations.insert(addr_key.into(), None);
            annotations.insert(mac_key.into(), None);
            return Ok(None);
        };
        let vtep = self.tunnel_address(&handle, kind, v6).await?;
        let dev = VxlanDevice {
            name: name.into(),
            vni: vx.vni,
            port: vx.port,
            local,
            parent,
            mac,
            mtu: vx.mtu,
        };
        let index = self.nl.ensure_vxlan(&dev).await?;
        if v6 {
            // The VTEP address is usable at once (no DAD); the device name has a dot, so the key is a path.
            crate::netlink::sysctl(self.nl.netns(), &format!("net/ipv6/conf/{name}/accept_dad"), "0").await?;
        }
        self.nl.add_addr(index, IpNet::from(vtep)).await?;
        stats.neighbours_written += self.sync_peers(index, desired, v6).await?;
        annotations.insert(addr_key.into(), Some(vtep.to_string()));
        annotations.insert(mac_key.into(), Some(model::mac_text(mac)));
        Ok(Some(index))
    }

    /// A tunnel device's address of one family, allocated once from IPAM under `handle`.
    async fn tunnel_address(&self, handle: &str, kind: &str, v6: bool) -> Result<IpAddr, RoutingError> {
        let attrs = BTreeMap::from([(attr::TYPE.to_owned(), kind.to_owned())]);
        let ips = self.ipam.assign_family(handle, attrs, v6).await?;
        ips.into_iter().find(|ip| ip.is_ipv6() == v6).ok_or_else(|| {
            RoutingError::Ipam(crate::ipam::node::IpamError::Alloc(
                crate::ipam::allocator::AllocError::Exhausted {
                    node: self.cfg.node.clone(),
                },
            ))
        })
    }

    /// The neighbour and FDB entries of one VXLAN device (`v6`: the IPv6 one) for the peers of its family.
    async fn sync_peers(&self, index: u32, desired: &Desired, v6: bool) -> Result<usize, RoutingError> {
        let arp: BTreeSet<([u8; 6], IpAddr)> =
            self.nl.neighbours(index, false, v6).await?.into_iter().collect();
        let fdb: BTreeSet<([u8; 6], IpAddr)> =
            self.nl.neighbours(index, true, v6).await?.into_iter().collect();
        let peers: Vec<(&IpAddr, &([u8; 6], IpAddr))> =
            desired.peers.iter().filter(|(v, _)| v.is_ipv6() == v6).collect();
        let mut n = 0;
        // Entries of peers that are gone (a deleted node, a changed VTEP) go first.
        let want_arp: BTreeSet<([u8; 6], IpAddr)> = peers.iter().map(|(v, (m, _))| (*m, **v)).collect();
        let want_fdb: BTreeSet<([u8; 6], IpAddr)> = peers.iter().map(|(_, p)| **p).collect();
        for (mac, ip) in arp.difference(&want_arp) {
            self.nl.del_neighbour(index, *mac, *ip, false).await?;
            n += 1;
        }
        for (mac, ip) in fdb.difference(&want_fdb) {
            self.nl.del_neighbour(index, *mac, *ip, true).await?;
            n += 1;
        }
        for (vtep, (mac, node_ip)) in peers {
            if !arp.contains(&(*mac, *vtep)) {
                self.nl.replace_neighbour(index, *vtep, *mac).await?;
                n += 1;
            }
            if !fdb.contains(&(*mac, *node_ip)) {
                self.nl.replace_fdb(index, *mac, *node_ip).await?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Host routes (/32, /128) to this node's pods through their veths (those whose interface exists).
    async fn pod_routes(&self) -> Result<Vec<OwnedRoute>, RoutingError> {
        let links: BTreeMap<String, u32> = self.nl.links().await?.into_iter().map(|(i, n)| (n, i)).collect();
        let mut out = Vec::new();
        for h in self.ipam.held().await.into_values() {
            let (Some(ns), Some(pod)) = (h.attrs.get(attr::NAMESPACE), h.attrs.get(attr::POD)) else {
                continue;
            };
            let Some(index) = links.get(&host_iface(ns, pod)) else {
                continue;
            };
            for ip in h.ips {
                out.push(crate::cni::wire::pod_route(ip, *index));
            }
        }
        Ok(out)
    }

    /// Writes the node's routing annotations when they differ from what the Node object has.
    async fn publish(
        &self,
        node: &Value,
        want: BTreeMap<String, Option<String>>,
    ) -> Result<bool, RoutingError> {
        let have = &node["metadata"]["annotations"];
        let differs = want
            .iter()
            .any(|(k, v)| have[k.as_str()].as_str() != v.as_deref());
        if !differs || node.is_null() {
            return Ok(false);
        }
        let patch = serde_json::json!({"metadata": {"annotations": want}});
        Api::<Node>::all(self.client.clone())
            .patch(&self.cfg.node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(RoutingError::Publish)?;
        info!(node = %self.cfg.node, ?want, "published the node's routing addresses");
        Ok(true)
    }
}
