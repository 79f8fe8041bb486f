//! Reachability between nodes: the node's address and VTEP published on its Node object, the VXLAN device
//! with static ARP and FDB entries per peer, a route per remote block (encapsulated, direct in the same
//! subnet, or BIRD's with BGP), blackholes for own blocks, the pods' /32 routes, natOutgoing, and the pod
//! MTU. [`model`] computes (pure); [`Routing::sync`] converges the kernel, and running it again repairs
//! drift (a deleted route or FDB entry returns).

pub mod address;
pub mod bgp;
pub mod model;
pub mod nat;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::Value;
use tracing::{info, warn};

use crate::cni::host_iface;
use crate::datastore::Cache;
use crate::ipam::node::{NodeIpam, attr};
use crate::netlink::{Netlink, NetlinkError, OwnedRoute, PROTO_CARACAL, RouteTarget, VxlanDevice};
use model::{Desired, Hop, annotation};

/// The IPIP device's name (the ipip module's fallback device, as Calico uses it).
pub const IPIP_DEVICE: &str = "tunl0";
/// The VXLAN device's name.
pub const VXLAN_DEVICE: &str = "vxlan.caracal";
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
    last: Option<(Desired, address::Chosen, u32)>,
    /// BIRD, when BGP is enabled.
    bird: Option<bgp::Bird>,
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
        crate::netlink::sysctl(self.nl.netns(), "net.ipv4.ip_forward", "1").await?;
        let me = self.cfg.node.clone();
        let my_node = cache.get("v1/Node", &me).cloned().unwrap_or(Value::Null);
        let internal_ip = my_node["status"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["type"] == "InternalIP")
            .and_then(|a| a["address"].as_str()?.parse().ok());
        let chosen = address::detect(&self.nl, &self.cfg.method, internal_ip).await?;
        let nodes = model::nodes(cache.of_kind("v1/Node").map(|(_, v)| v));
        let pools = model::pools(cache.of_kind("caracal.dev/v1/IPPool").map(|(_, v)| v));
        let blocks = model::blocks(cache.of_kind("caracal.dev/v1/IPAMBlock").map(|(_, v)| v));
        let desired = model::compute(&me, Some(chosen.ip), &nodes, &pools, &blocks, self.cfg.bgp);
        let mut warnings = desired.warnings.clone();
        for (name, p) in cache.of_kind("caracal.dev/v1/IPPool") {
            if p["spec"]["cidr"].as_str().is_some_and(|c| c.contains(':')) {
                warnings.push(format!(
                    "IPPool {name} is IPv6: IPv6 pod addresses are not served yet (the policy data plane enforces IPv4 only, and an address it cannot police would fail open); pods get IPv4 addresses"
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
            let mine: BTreeSet<Ipv4Net> = blocks
                .iter()
                .filter(|b| b.node.as_deref() == Some(me.as_str()))
                .map(|b| b.cidr)
                .collect();
            let input = bgp::input(&me, chosen.ip, &nodes, &config, &peers, mine);
            bird.ensure(&bgp::render(&input)).await?;
        }
        let f = felix(cache);
        let explicit = self
            .cfg
            .mtu
            .or_else(|| f["vxlanMTU"].as_u64().and_then(|m| u32::try_from(m).ok()));
        let pod_mtu =
            explicit.unwrap_or_else(|| model::pod_mtu(chosen.mtu, desired.vxlan, desired.ipip, false));
        self.mtu.store(pod_mtu, Ordering::Relaxed);
        let key = (desired.clone(), chosen.clone(), pod_mtu);
        if !force && self.last.as_ref() == Some(&key) {
            return Ok(stats);
        }

        // The VXLAN device, its address and the peers.
        let mut annotations =
            BTreeMap::from([(annotation::IPV4_ADDRESS.to_owned(), Some(chosen.ip.to_string()))]);
        let mut vxlan_index = None;
        if desired.vxlan {
            let vtep = self.vtep_address().await?;
            let mac = address::vtep_mac(&me);
            let dev = VxlanDevice {
                name: VXLAN_DEVICE.into(),
                vni: f["vxlanVNI"]
                    .as_u64()
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(DEFAULT_VNI),
                port: f["vxlanPort"]
                    .as_u64()
                    .and_then(|v| u16::try_from(v).ok())
                    .unwrap_or(DEFAULT_PORT),
                local: chosen.ip.addr(),
                parent: chosen.index,
                mac,
                mtu: pod_mtu,
            };
            let index = self.nl.ensure_vxlan(&dev).await?;
            self.nl
                .add_addr(index, IpNet::V4(Ipv4Net::new(vtep, 32).unwrap_or_default()))
                .await?;
            stats.neighbours_written += self.sync_peers(index, &desired).await?;
            vxlan_index = Some(index);
            annotations.insert(annotation::IPV4_VXLAN_TUNNEL_ADDR.into(), Some(vtep.to_string()));
            annotations.insert(annotation::VXLAN_TUNNEL_MAC.into(), Some(model::mac_text(mac)));
        } else {
            self.nl.del_link(VXLAN_DEVICE).await?;
            annotations.insert(annotation::IPV4_VXLAN_TUNNEL_ADDR.into(), None);
            annotations.insert(annotation::VXLAN_TUNNEL_MAC.into(), None);
        }
        let mut ipip_index = None;
        if desired.ipip {
            match self
                .nl
                .ensure_ipip(IPIP_DEVICE, chosen.mtu.saturating_sub(20))
                .await
            {
                Ok(index) => {
                    let addr = self
                        .tunnel_address(&ipip_handle(&me), "ipipTunnelAddress")
                        .await?;
                    self.nl
                        .add_addr(index, IpNet::V4(Ipv4Net::new(addr, 32).unwrap_or_default()))
                        .await?;
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
                Hop::Vxlan(v) => match vxlan_index {
                    Some(i) => RouteTarget::Via(*v, i),
                    None => continue,
                },
                Hop::Direct(ip) => RouteTarget::Via(*ip, chosen.index),
                Hop::Ipip(ip) => match ipip_index {
                    Some(i) => RouteTarget::Via(*ip, i),
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
        let (prefix, masq, all) = (
            self.cfg.exec_prefix.clone(),
            desired.masquerade.clone(),
            desired.all_pools.clone(),
        );
        stats.nat_changed = tokio::task::spawn_blocking(move || nat::apply(&prefix, &masq, &all))
            .await
            .map_err(|e| RoutingError::Task(e.to_string()))??;
        self.last = Some(key);
        Ok(stats)
    }

    /// The node's VTEP address, allocated once from IPAM under its own handle.
    async fn vtep_address(&self) -> Result<Ipv4Addr, RoutingError> {
        self.tunnel_address(&vtep_handle(&self.cfg.node), "vxlanTunnelAddress")
            .await
    }

    /// A tunnel device's address, allocated once from IPAM under `handle`.
    async fn tunnel_address(&self, handle: &str, kind: &str) -> Result<Ipv4Addr, RoutingError> {
        let attrs = BTreeMap::from([(attr::TYPE.to_owned(), kind.to_owned())]);
        let ips = self.ipam.assign(handle, attrs).await?;
        Ok(ips
            .into_iter()
            .find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .unwrap_or(Ipv4Addr::UNSPECIFIED))
    }

    async fn sync_peers(&self, index: u32, desired: &Desired) -> Result<usize, RoutingError> {
        let arp: BTreeSet<([u8; 6], Ipv4Addr)> =
            self.nl.neighbours(index, false).await?.into_iter().collect();
        let fdb: BTreeSet<([u8; 6], Ipv4Addr)> = self.nl.neighbours(index, true).await?.into_iter().collect();
        let mut n = 0;
        // Entries of peers that are gone (a deleted node, a changed VTEP) go first.
        let want_arp: BTreeSet<([u8; 6], Ipv4Addr)> =
            desired.peers.iter().map(|(v, (m, _))| (*m, *v)).collect();
        let want_fdb: BTreeSet<([u8; 6], Ipv4Addr)> = desired.peers.values().copied().collect();
        for (mac, ip) in arp.difference(&want_arp) {
            self.nl.del_neighbour(index, *mac, *ip, false).await?;
            n += 1;
        }
        for (mac, ip) in fdb.difference(&want_fdb) {
            self.nl.del_neighbour(index, *mac, *ip, true).await?;
            n += 1;
        }
        for (vtep, (mac, node_ip)) in &desired.peers {
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

    /// /32 routes to this node's pods through their veths (those whose interface exists).
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
                if let IpAddr::V4(v4) = ip {
                    out.push(crate::cni::wire::pod_route(
                        Ipv4Net::new(v4, 32).unwrap_or_default(),
                        *index,
                    ));
                }
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
