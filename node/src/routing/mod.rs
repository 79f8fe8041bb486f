//! Reachability between nodes, as one manager per concern (Felix's shape): [`address::AddressManager`]
//! finds the node's underlay addresses and turns forwarding on; [`vxlan::VxlanManager`] (one per family)
//! owns `vxlan.caracal` / `vxlan6.caracal`, its VTEP address and its peers' ARP and FDB entries;
//! [`ipip::IpipManager`] owns `tunl0`; BGP renders BIRD's configuration purely ([`bgp`]) apart from running
//! BIRD ([`bird`]); [`routes::RouteManager`] owns every route Caracal puts in the kernel, merging what the
//! others contribute with same-subnet routes, blackholes for the node's own blocks and the pods' host routes.
//! [`model`] computes what the datastore asks for (pure); [`Routing::sync`] runs the managers in order, and
//! running it again repairs drift (a deleted route or FDB entry returns). The pod MTU is the host's less
//! the largest overhead in use ([`model::pod_mtu`]).
//!
//! Every manager reaches the kernel through [`kernel::Kernel`] only: the real one is [`Netlink`], and the
//! managers' unit tests run against an in-memory fake without root.
//!
//! IPv6, when on (`Config::method6`): the node's IPv6 address is found and published, IPv6 forwarding is
//! on, IPv6 blocks are routed through `vxlan6.caracal` (tunnelled between the nodes' IPv6 addresses) or
//! straight to the node's IPv6 address in the same subnet (or by BIRD, with BGP).
//!
//! natOutgoing is not routing's: it is part of the policy data plane's model, which every policy backend
//! implements (`dataplane::nat`).

pub mod address;
pub mod bgp;
pub mod bird;
pub mod ipip;
pub mod kernel;
pub mod model;
pub mod routes;
pub mod secrets;
#[cfg(test)]
mod testutil;
pub mod vxlan;
pub mod wireguard;

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
use crate::felix::Felix;
use crate::ipam::node::{NodeIpam, attr};
use crate::netlink::{Netlink, NetlinkError, OwnedRoute};
use address::{AddressManager, Detected};
use caracal_datastore::Cache;
use ipip::IpipManager;
use kernel::Kernel;
use model::{Desired, Overhead, annotation};
use routes::RouteManager;
use vxlan::VxlanManager;

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
    /// The agent's namespace: BGP password Secrets are read there.
    pub namespace: String,
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
    /// The VTEP address could not be allocated.
    #[error("allocating the VTEP address: {0}")]
    Ipam(#[from] crate::ipam::node::IpamError),
    /// BIRD.
    #[error(transparent)]
    Bird(#[from] bird::BirdError),
    /// A blocking task died.
    #[error("routing task: {0}")]
    Task(String),
    /// Publishing on the Node failed.
    #[error("publishing the node's address on its Node object: {0}")]
    Publish(kube::Error),
    /// The WireGuard device.
    #[error(transparent)]
    Wireguard(#[from] crate::wireguard::WgError),
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
    /// The Node's annotations were updated.
    pub published: bool,
    /// Changes sent to WireGuard devices.
    pub wireguard_changes: usize,
}

impl SyncStats {
    /// True when the kernel already matched.
    pub fn is_noop(&self) -> bool {
        *self == SyncStats::default()
    }
}

/// FelixConfiguration's VXLAN parameters (both devices share them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanParams {
    /// The VNI.
    pub vni: u32,
    /// The UDP port.
    pub port: u16,
}

/// What one sync works from, computed before any manager touches the kernel.
#[derive(Clone, Debug)]
pub struct Plan<'a> {
    /// This node.
    pub me: &'a str,
    /// The routing the datastore asks for.
    pub desired: &'a Desired,
    /// The node's underlay addresses.
    pub underlay: &'a Detected,
    /// The pod MTU (every device Caracal creates for pods' traffic uses it).
    pub pod_mtu: u32,
    /// The VXLAN parameters.
    pub vxlan: VxlanParams,
    /// Felix's `ipipMTU` (None: the host's less 20).
    pub ipip_mtu: Option<u32>,
    /// WireGuard, IPv4 and IPv6.
    pub wireguard: [wireguard::WgPlan; 2],
}

/// What the managers contribute in one sync: routes through their devices (the route manager owns the
/// whole set), the node's annotations (None: removed), problems worth a log line, and what changed.
#[derive(Clone, Debug, Default)]
pub struct Contributions {
    /// Routes through the managers' devices.
    pub routes: BTreeSet<OwnedRoute>,
    /// Node annotations.
    pub annotations: BTreeMap<String, Option<String>>,
    /// Warnings.
    pub warnings: Vec<String>,
    /// What changed.
    pub stats: SyncStats,
}

/// The routing side of one node: the managers, run in order by [`Routing::sync`].
pub struct Routing<K: Kernel = Netlink> {
    cfg: Config,
    kernel: K,
    client: Client,
    ipam: NodeIpam,
    /// The pod MTU, shared with the CNI server.
    pub mtu: Arc<AtomicU32>,
    warned: BTreeSet<String>,
    /// What the last successful sync converged to: an unchanged input needs no kernel work until the next
    /// forced (periodic) sync.
    last: Option<SyncKey>,
    addresses: AddressManager,
    vxlan: [VxlanManager; 2],
    ipip: IpipManager,
    wireguard: [wireguard::WireguardManager; 2],
    /// Makes WireGuard devices.
    wg_devices: Box<dyn crate::wireguard::DeviceFactory>,
    /// What the WireGuard managers reported last, IPv4 and IPv6 (for `/metrics`).
    pub wireguard_report: Arc<std::sync::Mutex<[wireguard::Report; 2]>>,
    /// BIRD, when BGP is enabled.
    bird: Option<bird::Bird>,
    /// The Secrets BGP passwords come from.
    secrets: secrets::Secrets,
    /// BGP sessions left out because their password cannot be read: (peer address, why), for `/metrics`.
    pub bgp_left_out: LeftOut,
    routes: RouteManager,
}

/// What a sync converged to: the desired routing, the underlay, the pod MTU, the VXLAN parameters, Felix's
/// `ipipMTU`, WireGuard's plans.
type SyncKey = (
    Desired,
    Detected,
    u32,
    VxlanParams,
    Option<u32>,
    [wireguard::WgPlan; 2],
);

/// BGP sessions left out because their password cannot be read: (peer address, why).
pub type LeftOut = Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// The handle of a node's IPIP tunnel address.
pub fn ipip_handle(node: &str) -> String {
    format!("ipip-tunnel-addr.{node}")
}

/// The handle of a node's VTEP address.
pub fn vtep_handle(node: &str) -> String {
    format!("vxlan-tunnel-addr.{node}")
}

/// The handle of a node's WireGuard device address of a family.
pub fn wireguard_handle(node: &str, v6: bool) -> String {
    if v6 {
        format!("wireguard-v6-tunnel-addr.{node}")
    } else {
        format!("wireguard-tunnel-addr.{node}")
    }
}

/// The handle of a node's IPv6 VTEP address.
pub fn vtep6_handle(node: &str) -> String {
    format!("vxlan-v6-tunnel-addr.{node}")
}

impl<K: Kernel> Routing<K> {
    /// Routing for the namespace `kernel` works in.
    pub fn new(cfg: Config, kernel: K, client: Client, ipam: NodeIpam, mtu: Arc<AtomicU32>) -> Self {
        Self {
            kernel,
            ipam,
            mtu,
            warned: BTreeSet::new(),
            last: None,
            addresses: AddressManager::new(cfg.method.clone(), cfg.method6.clone()),
            vxlan: [VxlanManager::new(false), VxlanManager::new(true)],
            ipip: IpipManager,
            wireguard: [
                wireguard::WireguardManager::new(false, cfg.state_dir.join("wireguard/private.key")),
                wireguard::WireguardManager::new(true, cfg.state_dir.join("wireguard/private-v6.key")),
            ],
            wg_devices: Box::new(crate::wireguard::kernel::AutoFactory::default()),
            wireguard_report: Arc::default(),
            bird: cfg
                .bgp
                .then(|| bird::Bird::new(&cfg.state_dir.join("bird"), cfg.exec_prefix.clone())),
            secrets: secrets::Secrets::new(client.clone(), cfg.namespace.clone()),
            client,
            bgp_left_out: Arc::default(),
            routes: RouteManager,
            cfg,
        }
    }

    /// Makes WireGuard devices with `factory` (otherwise the kernel's where it has WireGuard, boringtun's
    /// elsewhere, in the agent's namespace).
    pub fn with_wireguard_devices(mut self, factory: Box<dyn crate::wireguard::DeviceFactory>) -> Self {
        self.wg_devices = factory;
        self
    }

    /// Whether WireGuard is on for a family whose key file is missing (deleted to rotate the key): the next
    /// sync makes a new one.
    pub fn wireguard_key_missing(&self, felix: &Felix) -> bool {
        self.wireguard
            .iter()
            .zip(&felix.wireguard)
            .any(|(m, f)| f.enabled && !m.key_file().exists())
    }

    /// Notified when a Secret a BGP password comes from changes (routing should sync).
    pub fn secrets_changed(&self) -> Arc<tokio::sync::Notify> {
        self.secrets.changed()
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
    ///
    /// The managers run in order: addresses (found again on forced syncs only), BGP (BIRD's configuration),
    /// the VXLAN device of each family, IPIP, the Node's annotations, the routes (every manager's and the
    /// pods').
    pub async fn sync(
        &mut self,
        cache: &Cache,
        felix: &Felix,
        force: bool,
    ) -> Result<SyncStats, RoutingError> {
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
        let detected = self
            .addresses
            .detect(
                &self.kernel,
                (internal(false), internal(true)),
                &felix.mtu_iface_pattern,
                force,
            )
            .await?;
        let mut warnings: Vec<String> = detected.warning.iter().cloned().collect();
        let nodes = model::nodes(cache.of_kind("v1/Node").map(|(_, v)| v));
        let pools = model::pools(cache.of_kind("caracal.dev/v1/IPPool").map(|(_, v)| v));
        let blocks = model::blocks(cache.of_kind("caracal.dev/v1/IPAMBlock").map(|(_, v)| v));
        let underlay = model::Underlay {
            v4: Some(detected.chosen.ip),
            v6: detected.chosen6.as_ref().map(|c| c.ip),
        };
        let mut desired = model::compute(&me, underlay, &nodes, &pools, &blocks, self.cfg.bgp);
        warnings.extend(desired.warnings.iter().cloned());
        // FelixConfiguration's vxlanEnabled / ipipEnabled override what the pools decide.
        for (name, set, wanted) in [
            ("vxlanEnabled", felix.vxlan_enabled, &mut desired.vxlan),
            ("ipipEnabled", felix.ipip_enabled, &mut desired.ipip),
        ] {
            if let Some(on) = set {
                if *wanted && !on {
                    warnings.push(format!(
                        "FelixConfiguration {name} is false while an IPPool asks for it: its routes are not programmed"
                    ));
                }
                *wanted = on;
            }
        }
        for (name, p) in cache.of_kind("caracal.dev/v1/IPPool") {
            if !self.addresses.ipv6() && p["spec"]["cidr"].as_str().is_some_and(|c| c.contains(':')) {
                warnings.push(format!(
                    "IPPool {name} is IPv6, but IPv6 is off on this node (CARACAL_IPV6_AUTODETECTION is none or unset; the operator sets it when the Installation has an IPv6 pool): its addresses are not routed here"
                ));
            }
        }
        self.warn(&warnings);
        if self.bird.is_some() {
            self.sync_bgp(cache, &detected, model::bgp_blocks(&me, &blocks, &pools))
                .await?;
        }
        let vx = VxlanParams {
            vni: felix.vxlan_vni,
            port: felix.vxlan_port,
        };
        let wg = [false, true].map(|v6| {
            let f = &felix.wireguard[usize::from(v6)];
            let (peers, unencrypted) = if f.enabled {
                model::wireguard_peers(&me, v6, &nodes, &blocks)
            } else {
                (Vec::new(), Vec::new())
            };
            wireguard::WgPlan {
                params: wireguard::Params {
                    enabled: f.enabled,
                    iface: f.iface.clone(),
                    port: f.port,
                    mtu: f.mtu.unwrap_or_else(|| {
                        detected
                            .host_mtu(v6)
                            .saturating_sub(wireguard::OVERHEAD[usize::from(v6)])
                    }),
                },
                peers,
                unencrypted,
                key_file: self.wireguard[usize::from(v6)].key_file().exists(),
            }
        });
        let mut plan = Plan {
            me: &me,
            desired: &desired,
            underlay: &detected,
            pod_mtu: 0,
            vxlan: vx,
            ipip_mtu: felix.ipip_mtu,
            wireguard: wg,
        };
        // The pod MTU: explicit, or the host's less the largest overhead in use (or that encapsulation's
        // configured MTU).
        let mut overheads: Vec<Overhead> = self
            .vxlan
            .iter()
            .filter(|m| m.wanted(&plan).is_some())
            .map(|m| Overhead {
                v6: m.v6(),
                bytes: m.overhead(),
                fixed: if m.v6() {
                    felix.vxlan_mtu_v6
                } else {
                    felix.vxlan_mtu
                },
            })
            .collect();
        if IpipManager::wanted(&plan) {
            overheads.push(Overhead {
                v6: false,
                bytes: IpipManager::OVERHEAD,
                fixed: felix.ipip_mtu,
            });
        }
        for (i, m) in self.wireguard.iter().enumerate() {
            if m.wanted(&plan) {
                overheads.push(Overhead {
                    v6: i == 1,
                    bytes: wireguard::OVERHEAD[i],
                    fixed: felix.wireguard[i].mtu,
                });
            }
        }
        plan.pod_mtu = self.cfg.mtu.unwrap_or_else(|| {
            model::pod_mtu(
                detected.host_mtu(false),
                detected.chosen6.as_ref().map(|_| detected.host_mtu(true)),
                &overheads,
            )
        });
        self.mtu.store(plan.pod_mtu, Ordering::Relaxed);
        let key = (
            desired.clone(),
            detected.clone(),
            plan.pod_mtu,
            vx,
            plan.ipip_mtu,
            plan.wireguard.clone(),
        );
        if !force && self.last.as_ref() == Some(&key) {
            return Ok(SyncStats::default());
        }

        let mut out = Contributions::default();
        out.annotations.insert(
            annotation::IPV4_ADDRESS.to_owned(),
            Some(detected.chosen.ip.to_string()),
        );
        out.annotations.insert(
            annotation::IPV6_ADDRESS.to_owned(),
            detected.chosen6.as_ref().map(|c| c.ip.to_string()),
        );
        for m in self.vxlan {
            let vtep = match m.wanted(&plan) {
                Some((local, _)) => {
                    let (handle, kind) = m.handle(&me);
                    Some(self.tunnel_address(&handle, kind, local.is_ipv6()).await?)
                }
                None => None,
            };
            m.apply(&self.kernel, &plan, vtep, &mut out).await?;
        }
        let tunnel = match IpipManager::wanted(&plan) {
            true => Some(
                self.tunnel_address(&ipip_handle(&me), "ipipTunnelAddress", false)
                    .await?,
            ),
            false => None,
        };
        self.ipip.apply(&self.kernel, &plan, tunnel, &mut out).await?;
        let mut reports: [wireguard::Report; 2] = Default::default();
        for (i, v6) in [false, true].into_iter().enumerate() {
            let address = match self.wireguard[i].wanted(&plan) {
                true => Some(
                    self.tunnel_address(&wireguard_handle(&me, v6), "wireguardTunnelAddress", v6)
                        .await?,
                ),
                false => None,
            };
            reports[i] = self.wireguard[i]
                .apply(&self.kernel, &plan, self.wg_devices.as_mut(), address, &mut out)
                .await?;
        }
        if let Ok(mut r) = self.wireguard_report.lock() {
            *r = reports;
        }
        out.stats.published = self.publish(&my_node, &out.annotations).await?;
        let ipam = &self.ipam;
        let pods = async move {
            let mut pods = Vec::new();
            for h in ipam.held().await.into_values() {
                let (Some(ns), Some(pod)) = (h.attrs.get(attr::NAMESPACE), h.attrs.get(attr::POD)) else {
                    continue;
                };
                let iface = host_iface(ns, pod);
                pods.extend(h.ips.into_iter().map(|ip| (ip, iface.clone())));
            }
            pods
        };
        self.routes.apply(&self.kernel, &plan, pods, &mut out).await?;
        let warnings = std::mem::take(&mut out.warnings);
        self.warn(&warnings);

        self.last = Some(key);
        Ok(out.stats)
    }

    /// Logs each warning once.
    fn warn(&mut self, warnings: &[String]) {
        for w in warnings {
            if self.warned.insert(w.clone()) {
                warn!("{w}");
            }
        }
    }

    /// BIRD's configuration from the datastore (rendered purely by [`bgp::render`]), and BIRD running it.
    async fn sync_bgp(
        &mut self,
        cache: &Cache,
        detected: &Detected,
        mine: BTreeSet<IpNet>,
    ) -> Result<(), RoutingError> {
        let me = self.cfg.node.as_str();
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
        let mut input = bgp::input(
            me,
            detected.chosen.ip,
            detected.chosen6.as_ref().map(|c| c.ip),
            &nodes,
            &config,
            &peers,
            mine,
        );
        self.secrets.track(&bgp::secret_names(&input));
        let (secrets, ns) = (&self.secrets, self.secrets.namespace());
        let warnings = bgp::resolve_passwords(&mut input, |secret, key| {
            secrets::password(ns, secret, key, &secrets.get(secret))
        });
        *self
            .bgp_left_out
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = warnings
            .iter()
            .map(|(ip, why)| (ip.to_string(), why.clone()))
            .collect();
        let warnings: Vec<String> = warnings.into_iter().map(|(_, why)| why).collect();
        self.warn(&warnings);
        if let Some(bird) = self.bird.as_mut() {
            bird.ensure(&bgp::render(&input)).await?;
        }
        Ok(())
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

    /// Writes the node's routing annotations when they differ from what the Node object has.
    async fn publish(
        &self,
        node: &Value,
        want: &BTreeMap<String, Option<String>>,
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
