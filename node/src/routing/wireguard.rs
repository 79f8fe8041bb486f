//! WireGuard, one manager per family: the device (`wg.caracal`, `wg6.caracal`), its key, its peers, the
//! routing table its pod traffic is routed by and the rule that sends traffic there (docs/wireguard.md).
//!
//! - The key pair lives in a file of the node's state directory ([`crate::wireguard::keys`]); its public
//!   half and the device's address (allocated from IPAM, as the VXLAN device's is) are published on the Node.
//! - The peers are the other nodes that publish a key of the family ([`model::wireguard_peers`]): their
//!   underlay address and the family's port as endpoint, what they hold (blocks, borrowed addresses, their
//!   device's address) as allowed IPs.
//! - Table [`TABLE`] routes what the peers hold through the device; the rule `not fwmark MARK/MARK lookup
//!   TABLE` (priority [`RULE_PRIORITY`]) sends every packet there first except the device's own encrypted
//!   ones, which carry [`FWMARK`] and so take the main table to the peer's underlay address, never back
//!   into the tunnel. What the table does not hold (nodes without a key) falls through to the main table:
//!   VXLAN, IPIP or direct routes, unencrypted; such nodes are reported on the Node
//!   ([`annotation::WIREGUARD_UNENCRYPTED_PEERS`]) and in `/metrics`.
//! - Off: the device, the table's routes of the family, the rule and the annotations go.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

use super::kernel::Kernel;
use super::model::{self, annotation};
use super::{Contributions, Plan, RoutingError};
use crate::netlink::{OwnedRoute, RouteTarget, Rule};
use crate::wireguard::keys::KeyPair;
use crate::wireguard::uapi::{Peer, Settings};
use crate::wireguard::{Device, DeviceFactory};

/// The routing table WireGuard's routes are in.
pub const TABLE: u32 = 1;
/// The rule's priority (Calico's `wireguardRoutingRulePriority` default).
pub const RULE_PRIORITY: u32 = 99;
/// The mark the device puts on its encrypted packets.
pub const FWMARK: u32 = 0x0010_0000;
/// What WireGuard adds to a packet: IPv4 (20 IP + 8 UDP + 32 WireGuard) and IPv6 (40 + 8 + 32).
pub const OVERHEAD: [u32; 2] = [60, 80];

/// One family's WireGuard settings for a sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// On.
    pub enabled: bool,
    /// The device's name.
    pub iface: String,
    /// Its UDP port (every node's).
    pub port: u16,
    /// Its MTU.
    pub mtu: u32,
}

/// One family's WireGuard for a sync: the settings, and the peers the datastore gives
/// ([`model::wireguard_peers`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgPlan {
    /// The settings.
    pub params: Params,
    /// The peers.
    pub peers: Vec<model::WgPeer>,
    /// Nodes holding pod addresses of the family without a key.
    pub unencrypted: Vec<String>,
    /// Whether the key file exists (a deleted one must be noticed by the next sync, not the next forced one).
    pub key_file: bool,
}

impl WgPlan {
    /// The family off.
    pub fn off(v6: bool) -> Self {
        let f = usize::from(v6);
        Self {
            params: Params {
                enabled: false,
                iface: crate::felix::WIREGUARD_IFACE[f].to_owned(),
                port: crate::felix::WIREGUARD_PORT[f],
                mtu: 1500 - OVERHEAD[f],
            },
            peers: Vec::new(),
            unencrypted: Vec::new(),
            key_file: false,
        }
    }
}

/// What one family's manager found in a sync, for the node's status and `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Peers the device has.
    pub encrypted: Vec<String>,
    /// Nodes holding pod addresses of the family that publish no key: their traffic is not encrypted.
    pub unencrypted: Vec<String>,
    /// A new key was made this sync (first start, or the key file was deleted).
    pub new_key: bool,
}

/// One family's WireGuard manager.
pub struct WireguardManager {
    v6: bool,
    key_file: PathBuf,
    device: Option<Box<dyn Device>>,
    /// The device's interface name when it was made (a changed name makes a new device).
    made_as: Option<String>,
}

impl std::fmt::Debug for WireguardManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireguardManager")
            .field("v6", &self.v6)
            .field("key_file", &self.key_file)
            .field("device", &self.made_as)
            .finish()
    }
}

/// The rule of a family.
pub fn rule(v6: bool) -> Rule {
    Rule {
        v6,
        priority: RULE_PRIORITY,
        table: TABLE,
        fwmark: FWMARK,
        fwmask: FWMARK,
        invert: true,
    }
}

impl WireguardManager {
    /// The key file.
    pub fn key_file(&self) -> &std::path::Path {
        &self.key_file
    }

    /// The manager of one family, its key in `key_file`.
    pub fn new(v6: bool, key_file: PathBuf) -> Self {
        Self {
            v6,
            key_file,
            device: None,
            made_as: None,
        }
    }

    fn family(&self) -> usize {
        usize::from(self.v6)
    }

    /// The annotations of this family: key, address, unencrypted peers.
    fn annotations(&self) -> [&'static str; 3] {
        if self.v6 {
            [
                annotation::WIREGUARD_PUBLIC_KEY_V6,
                annotation::IPV6_WIREGUARD_INTERFACE_ADDR,
                annotation::WIREGUARD_UNENCRYPTED_PEERS_V6,
            ]
        } else {
            [
                annotation::WIREGUARD_PUBLIC_KEY,
                annotation::IPV4_WIREGUARD_INTERFACE_ADDR,
                annotation::WIREGUARD_UNENCRYPTED_PEERS,
            ]
        }
    }

    /// Whether the family is on and this node has an underlay address of it.
    pub fn wanted(&self, plan: &Plan<'_>) -> bool {
        let p = &plan.wireguard[self.family()].params;
        p.enabled && (!self.v6 || plan.underlay.chosen6.is_some())
    }

    /// Converges the family: on, the device with its key, address, peers, routes and rule; off, none of
    /// them. `address` is the device's address (allocated by the caller when [`Self::wanted`]).
    pub async fn apply<K: Kernel>(
        &mut self,
        kernel: &K,
        plan: &Plan<'_>,
        factory: &mut dyn DeviceFactory,
        address: Option<IpAddr>,
        out: &mut Contributions,
    ) -> Result<Report, RoutingError> {
        let p = &plan.wireguard[self.family()].params;
        let [key_note, addr_note, clear_note] = self.annotations();
        let (Some(address), true) = (address, self.wanted(plan)) else {
            self.remove(kernel, p).await?;
            for a in [key_note, addr_note, clear_note] {
                out.annotations.insert(a.to_owned(), None);
            }
            return Ok(Report::default());
        };
        let (key, new_key) =
            KeyPair::load_or_create(&self.key_file).map_err(crate::wireguard::WgError::from)?;
        if new_key {
            tracing::info!(
                public_key = %key.public_base64(),
                file = %self.key_file.display(),
                "made a new WireGuard key"
            );
        }
        // The device: made when missing (first sync, a renamed device, or one whose interface vanished).
        let mut index = match (&self.device, self.made_as.as_deref()) {
            (Some(_), Some(made)) if made == p.iface => kernel.link_up(&p.iface, p.mtu).await?,
            _ => None,
        };
        if index.is_none() {
            self.device = None;
            if let Some(old) = self.made_as.take() {
                kernel.del_link(&old).await?;
            }
            kernel.del_link(&p.iface).await?;
            self.device = Some(factory.create(&p.iface).map_err(RoutingError::from)?);
            self.made_as = Some(p.iface.clone());
            index = kernel.link_up(&p.iface, p.mtu).await?;
        }
        let index = index
            .ok_or_else(|| RoutingError::Netlink(crate::netlink::NetlinkError::NoLink(p.iface.clone())))?;
        kernel.add_addr(index, IpNet::from(address)).await?;

        let peers = plan.wireguard[self.family()].peers.clone();
        let unencrypted = plan.wireguard[self.family()].unencrypted.clone();
        let device_peers: Vec<Peer> = peers
            .iter()
            .map(|peer| Peer {
                public_key: peer.key,
                endpoint: Some(std::net::SocketAddr::new(peer.ip, p.port)),
                allowed_ips: peer.allowed.clone(),
                keepalive: 0,
            })
            .collect();
        let settings = Settings {
            private_hex: key.private_hex(),
            public_key: key.public.to_bytes(),
            listen_port: p.port,
            fwmark: FWMARK,
        };
        if let Some(device) = self.device.as_mut() {
            let changes = device
                .configure(&settings, &device_peers)
                .map_err(RoutingError::from)?;
            out.stats.wireguard_changes += changes;
        }

        // The table's routes of this family: what the peers hold, through the device.
        let want: BTreeSet<OwnedRoute> = peers
            .iter()
            .flat_map(|peer| peer.allowed.iter())
            .map(|dst| OwnedRoute {
                dst: *dst,
                target: RouteTarget::Dev(index),
            })
            .collect();
        let have: BTreeSet<OwnedRoute> = kernel
            .table_routes(TABLE)
            .await?
            .into_iter()
            .filter(|r| r.dst.addr().is_ipv6() == self.v6)
            .collect();
        for r in have.difference(&want) {
            kernel.del_table_route(TABLE, r).await?;
            out.stats.routes_removed += 1;
        }
        for r in want.difference(&have) {
            kernel.replace_table_route(TABLE, r).await?;
            out.stats.routes_added += 1;
        }
        let rule = rule(self.v6);
        if !kernel.rules(self.v6).await?.contains(&rule) {
            kernel.add_rule(&rule).await?;
        }

        out.annotations
            .insert(key_note.to_owned(), Some(key.public_base64()));
        out.annotations
            .insert(addr_note.to_owned(), Some(address.to_string()));
        out.annotations.insert(
            clear_note.to_owned(),
            (!unencrypted.is_empty()).then(|| unencrypted.join(",")),
        );
        if !unencrypted.is_empty() {
            out.warnings.push(format!(
                "WireGuard ({}) is on, but these nodes publish no key, so pod traffic to and from them is not encrypted: {}",
                if self.v6 { "IPv6" } else { "IPv4" },
                unencrypted.join(", ")
            ));
        }
        Ok(Report {
            encrypted: peers.into_iter().map(|p| p.node).collect(),
            unencrypted,
            new_key,
        })
    }

    /// Removes the family's device, routes and rule (what is absent is fine).
    async fn remove<K: Kernel>(&mut self, kernel: &K, p: &Params) -> Result<(), RoutingError> {
        self.device = None;
        for name in self.made_as.take().into_iter().chain([p.iface.clone()]) {
            kernel.del_link(&name).await?;
        }
        for r in kernel
            .table_routes(TABLE)
            .await?
            .into_iter()
            .filter(|r| r.dst.addr().is_ipv6() == self.v6)
        {
            kernel.del_table_route(TABLE, &r).await?;
        }
        let rule = rule(self.v6);
        if kernel.rules(self.v6).await?.contains(&rule) {
            kernel.del_rule(&rule).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::routing::kernel::fake::FakeKernel;
    use crate::routing::testutil::{detected, plan};
    use crate::wireguard::uapi::DeviceState;
    use crate::wireguard::{WgError, keys};

    /// A device that keeps what it is given, on a link it adds to the fake kernel.
    struct FakeDevice {
        name: String,
        state: Arc<Mutex<DeviceState>>,
    }

    impl Device for FakeDevice {
        fn name(&self) -> &str {
            &self.name
        }
        fn state(&mut self) -> Result<DeviceState, WgError> {
            Ok(self.state.lock().expect("lock").clone())
        }
        fn configure(&mut self, settings: &Settings, peers: &[Peer]) -> Result<usize, WgError> {
            let mut s = self.state.lock().expect("lock");
            let n = crate::wireguard::uapi::plan(&s, settings, peers).len();
            s.public_key = Some(settings.public_key);
            s.listen_port = settings.listen_port;
            s.fwmark = settings.fwmark;
            s.peers = peers
                .iter()
                .map(|p| {
                    (
                        p.public_key,
                        crate::wireguard::uapi::PeerState {
                            endpoint: p.endpoint,
                            allowed_ips: p.allowed_ips.clone(),
                            ..Default::default()
                        },
                    )
                })
                .collect();
            Ok(n)
        }
    }

    struct Factory {
        kernel: Arc<FakeKernel>,
        made: usize,
        state: Arc<Mutex<DeviceState>>,
    }

    impl DeviceFactory for Factory {
        fn create(&mut self, name: &str) -> Result<Box<dyn Device>, WgError> {
            self.kernel.add_link(name);
            self.made += 1;
            *self.state.lock().expect("lock") = DeviceState::default();
            Ok(Box::new(FakeDevice {
                name: name.to_owned(),
                state: self.state.clone(),
            }))
        }
    }

    fn on(peers: Vec<model::WgPeer>, unencrypted: Vec<String>) -> WgPlan {
        let mut p = WgPlan::off(false);
        p.params.enabled = true;
        p.peers = peers;
        p.unencrypted = unencrypted;
        p
    }

    #[tokio::test]
    async fn on_makes_the_device_routes_rule_and_annotations_and_off_removes_them() {
        let kernel = Arc::new(FakeKernel::with_underlay("eth0", 1500, &["10.99.0.2/24"]));
        let mut factory = Factory {
            kernel: kernel.clone(),
            made: 0,
            state: Arc::default(),
        };
        let dir = std::env::temp_dir().join(format!("caracal-wg-mgr-{}", std::process::id()));
        let mut m = WireguardManager::new(false, dir.join("private.key"));
        let desired = model::Desired::default();
        let underlay = detected(&kernel);
        let b = model::WgPeer {
            node: "b".into(),
            key: [7; 32],
            ip: "10.99.0.3".parse().expect("ip"),
            allowed: vec![
                "10.244.1.0/26".parse().expect("net"),
                "10.244.1.1/32".parse().expect("net"),
            ],
        };
        let mut p = plan(&desired, &underlay);
        p.wireguard[0] = on(vec![b.clone()], vec!["c".into()]);
        let mut out = Contributions::default();
        let addr: IpAddr = "10.244.0.1".parse().expect("ip");
        let report = m
            .apply(kernel.as_ref(), &p, &mut factory, Some(addr), &mut out)
            .await
            .expect("on");
        assert_eq!(report.encrypted, vec!["b".to_owned()]);
        assert_eq!(report.unencrypted, vec!["c".to_owned()]);
        assert!(report.new_key);
        let s = kernel.snapshot();
        let wg = &s.links["wg.caracal"];
        assert_eq!(wg.mtu, 1440);
        assert!(wg.addrs.contains(&"10.244.0.1/32".parse().expect("net")));
        let routes: Vec<String> = s
            .table_routes
            .iter()
            .map(|(t, r)| format!("{t} {}", r.dst))
            .collect();
        assert_eq!(routes, ["1 10.244.1.0/26", "1 10.244.1.1/32"]);
        assert!(s.rules.contains(&rule(false)));
        let key = out.annotations[annotation::WIREGUARD_PUBLIC_KEY]
            .clone()
            .expect("key");
        assert_eq!(keys::decode(&key).map(|k| k.len()), Some(32));
        assert_eq!(
            out.annotations[annotation::IPV4_WIREGUARD_INTERFACE_ADDR].as_deref(),
            Some("10.244.0.1")
        );
        assert_eq!(
            out.annotations[annotation::WIREGUARD_UNENCRYPTED_PEERS].as_deref(),
            Some("c")
        );
        let dev = factory.state.lock().expect("lock").clone();
        assert_eq!((dev.listen_port, dev.fwmark), (51820, FWMARK));
        assert_eq!(
            dev.peers[&[7; 32]].endpoint,
            Some("10.99.0.3:51820".parse().expect("endpoint"))
        );

        // Converged: the same sync writes nothing and keeps the device and key.
        let writes = kernel.snapshot().writes;
        let mut out2 = Contributions::default();
        let again = m
            .apply(kernel.as_ref(), &p, &mut factory, Some(addr), &mut out2)
            .await
            .expect("again");
        assert!(!again.new_key);
        assert_eq!(kernel.snapshot().writes, writes, "nothing to write");
        assert_eq!(out2.stats.wireguard_changes, 0);
        assert_eq!(factory.made, 1);

        // The interface vanished (someone deleted it): the next sync makes the device again.
        kernel.state().links.remove("wg.caracal");
        m.apply(
            kernel.as_ref(),
            &p,
            &mut factory,
            Some(addr),
            &mut Contributions::default(),
        )
        .await
        .expect("again");
        assert_eq!(factory.made, 2);
        assert!(kernel.snapshot().links.contains_key("wg.caracal"));

        // Off: everything goes, annotations removed.
        p.wireguard[0] = WgPlan::off(false);
        let mut off = Contributions::default();
        m.apply(kernel.as_ref(), &p, &mut factory, None, &mut off)
            .await
            .expect("off");
        let s = kernel.snapshot();
        assert!(!s.links.contains_key("wg.caracal"));
        assert!(s.table_routes.is_empty());
        assert!(s.rules.is_empty());
        for a in [
            annotation::WIREGUARD_PUBLIC_KEY,
            annotation::IPV4_WIREGUARD_INTERFACE_ADDR,
            annotation::WIREGUARD_UNENCRYPTED_PEERS,
        ] {
            assert_eq!(off.annotations.get(a), Some(&None), "{a}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
