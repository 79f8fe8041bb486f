//! The VXLAN manager, one per family: the device (`vxlan.caracal`, or `vxlan6.caracal` tunnelled over the
//! nodes' IPv6 addresses), its VTEP address, the permanent ARP / NDP and FDB entries of its peers, the
//! node annotations that publish the VTEP, and the routes through it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::kernel::{Kernel, Neighbour};
use super::model::{self, Hop, annotation};
use super::{Contributions, Plan, RoutingError, VXLAN_DEVICE, VXLAN_V6_DEVICE, address};
use crate::netlink::{OwnedRoute, RouteTarget, VxlanDevice};

/// VXLAN for one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanManager {
    v6: bool,
}

/// What makes one family's device differ from the other's.
struct Names {
    device: &'static str,
    addr_key: &'static str,
    mac_key: &'static str,
}

impl VxlanManager {
    /// The manager of `vxlan.caracal` (`v6` false) or `vxlan6.caracal`.
    pub fn new(v6: bool) -> Self {
        Self { v6 }
    }

    /// Whether this is the IPv6 device.
    pub fn v6(&self) -> bool {
        self.v6
    }

    fn names(&self) -> Names {
        if self.v6 {
            Names {
                device: VXLAN_V6_DEVICE,
                addr_key: annotation::IPV6_VXLAN_TUNNEL_ADDR,
                mac_key: annotation::VXLAN_TUNNEL_MAC_V6,
            }
        } else {
            Names {
                device: VXLAN_DEVICE,
                addr_key: annotation::IPV4_VXLAN_TUNNEL_ADDR,
                mac_key: annotation::VXLAN_TUNNEL_MAC,
            }
        }
    }

    /// The IPAM handle of this node's VTEP address and the allocation's type attribute (Calico's).
    pub fn handle(&self, node: &str) -> (String, &'static str) {
        if self.v6 {
            (super::vtep6_handle(node), "vxlanV6TunnelAddress")
        } else {
            (super::vtep_handle(node), "vxlanTunnelAddress")
        }
    }

    /// Whether the plan needs this family's device: a pool of the family encapsulates and the node has an
    /// underlay address of the family.
    pub fn wanted(&self, plan: &Plan<'_>) -> Option<(IpAddr, u32)> {
        if self.v6 {
            let c6 = plan.underlay.chosen6.as_ref()?;
            plan.desired
                .vxlan6
                .then_some((IpAddr::V6(c6.ip.addr()), c6.index))
        } else {
            let c = &plan.underlay.chosen;
            plan.desired.vxlan.then_some((IpAddr::V4(c.ip.addr()), c.index))
        }
    }

    /// The bytes each packet gains: an outer IP header (20, or 40 for IPv6), UDP (8), VXLAN (8), the inner
    /// Ethernet header (14).
    pub fn overhead(&self) -> u32 {
        if self.v6 { 70 } else { 50 }
    }

    /// The node's MAC for this device.
    pub fn mac(&self, node: &str) -> [u8; 6] {
        if self.v6 {
            address::vtep_mac_v6(node)
        } else {
            address::vtep_mac(node)
        }
    }

    /// Converges the device to `plan` with `vtep` (the VTEP address IPAM gave; None when the device is not
    /// wanted): the device, its address, its peers, its annotations and its routes go into `out`. Without,
    /// the device is deleted (its routes and entries go with it) and its annotations are cleared.
    pub async fn apply<K: Kernel>(
        &self,
        k: &K,
        plan: &Plan<'_>,
        vtep: Option<IpAddr>,
        out: &mut Contributions,
    ) -> Result<(), RoutingError> {
        let names = self.names();
        let (Some((local, parent)), Some(vtep)) = (self.wanted(plan), vtep) else {
            k.del_link(names.device).await?;
            out.annotations.insert(names.addr_key.into(), None);
            out.annotations.insert(names.mac_key.into(), None);
            return Ok(());
        };
        let mac = self.mac(plan.me);
        let dev = VxlanDevice {
            name: names.device.into(),
            vni: plan.vxlan.vni,
            port: plan.vxlan.port,
            local,
            parent,
            mac,
            mtu: plan.pod_mtu,
        };
        let index = k.ensure_vxlan(&dev).await?;
        if self.v6 {
            // The VTEP address is usable at once (no DAD); the device name has a dot, so the key is a path.
            k.sysctls(vec![(
                format!("net/ipv6/conf/{}/accept_dad", names.device),
                "0".to_owned(),
            )])
            .await?;
        }
        k.add_addr(index, IpNet::from(vtep)).await?;
        out.stats.neighbours_written += self.sync_peers(k, index, plan.desired).await?;
        out.annotations
            .insert(names.addr_key.into(), Some(vtep.to_string()));
        out.annotations
            .insert(names.mac_key.into(), Some(model::mac_text(mac)));
        for (dst, hop) in &plan.desired.routes {
            if let Hop::Vxlan(v) = hop
                && v.is_ipv6() == self.v6
            {
                out.routes.insert(OwnedRoute {
                    dst: *dst,
                    target: RouteTarget::Via(*v, index),
                });
            }
        }
        Ok(())
    }

    /// The neighbour and FDB entries of the device for the peers of its family; how many were written or
    /// removed.
    async fn sync_peers<K: Kernel>(
        &self,
        k: &K,
        index: u32,
        desired: &model::Desired,
    ) -> Result<usize, RoutingError> {
        let arp: BTreeSet<Neighbour> = k.neighbours(index, false, self.v6).await?.into_iter().collect();
        let fdb: BTreeSet<Neighbour> = k.neighbours(index, true, self.v6).await?.into_iter().collect();
        let peers: BTreeMap<&IpAddr, &([u8; 6], IpAddr)> = desired
            .peers
            .iter()
            .filter(|(v, _)| v.is_ipv6() == self.v6)
            .collect();
        let want_arp: BTreeSet<Neighbour> = peers.iter().map(|(v, (m, _))| (*m, **v)).collect();
        let want_fdb: BTreeSet<Neighbour> = peers.values().map(|p| **p).collect();
        let mut n = 0;
        // Entries of peers that are gone (a deleted node, a changed VTEP) go first.
        for e in arp.difference(&want_arp) {
            k.del_neighbour(index, *e, false).await?;
            n += 1;
        }
        for e in fdb.difference(&want_fdb) {
            k.del_neighbour(index, *e, true).await?;
            n += 1;
        }
        for (vtep, (mac, node_ip)) in peers {
            if !arp.contains(&(*mac, *vtep)) {
                k.replace_neighbour(index, *vtep, *mac).await?;
                n += 1;
            }
            if !fdb.contains(&(*mac, *node_ip)) {
                k.replace_fdb(index, *mac, *node_ip).await?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::testutil::{detected, ip, kernel, plan};

    const MAC_B: [u8; 6] = [0x66, 1, 2, 3, 4, 5];
    const MAC_C: [u8; 6] = [0x66, 1, 2, 3, 4, 6];

    /// Node `a` with VXLAN on and peers b (VTEP 10.244.1.0) and c (VTEP 10.244.2.0), one block each.
    fn desired() -> model::Desired {
        let mut d = model::Desired {
            vxlan: true,
            ..Default::default()
        };
        for (vtep, mac, node, block) in [
            ("10.244.1.0", MAC_B, "10.99.0.3", "10.244.1.0/26"),
            ("10.244.2.0", MAC_C, "10.99.0.4", "10.244.2.0/26"),
        ] {
            d.peers.insert(ip(vtep), (mac, ip(node)));
            d.routes.insert(block.parse().expect("net"), Hop::Vxlan(ip(vtep)));
        }
        d.routes
            .insert("10.244.0.0/26".parse().expect("net"), Hop::Blackhole);
        d
    }

    #[tokio::test]
    async fn the_device_its_peers_and_routes_converge_and_a_second_sync_writes_nothing() {
        let k = kernel();
        let (d, u) = (desired(), detected(&k));
        let m = VxlanManager::new(false);
        let mut out = Contributions::default();
        m.apply(&k, &plan(&d, &u), Some(ip("10.244.0.0")), &mut out)
            .await
            .expect("apply");
        let s = k.snapshot();
        let dev = &s.links[VXLAN_DEVICE];
        let vx = dev.vxlan.as_ref().expect("a VXLAN device");
        assert_eq!(
            (vx.vni, vx.port, vx.local, dev.mtu),
            (4096, 4789, ip("10.99.0.2"), 1450)
        );
        assert_eq!(vx.mac, address::vtep_mac("a"));
        assert!(dev.addrs.contains(&"10.244.0.0/32".parse().expect("net")));
        let i = dev.index;
        for (vtep, mac, node) in [
            ("10.244.1.0", MAC_B, "10.99.0.3"),
            ("10.244.2.0", MAC_C, "10.99.0.4"),
        ] {
            assert!(
                s.neighbours.contains(&(i, false, (mac, ip(vtep)))),
                "ARP for {vtep}"
            );
            assert!(
                s.neighbours.contains(&(i, true, (mac, ip(node)))),
                "FDB for {node}"
            );
        }
        assert_eq!(out.stats.neighbours_written, 4);
        // Routes through the device for the remote blocks only (the blackhole is the route manager's).
        let routes: Vec<_> = out
            .routes
            .iter()
            .map(|r| (r.dst.to_string(), r.target.clone()))
            .collect();
        assert_eq!(
            routes,
            vec![
                ("10.244.1.0/26".to_owned(), RouteTarget::Via(ip("10.244.1.0"), i)),
                ("10.244.2.0/26".to_owned(), RouteTarget::Via(ip("10.244.2.0"), i)),
            ]
        );
        assert_eq!(
            out.annotations[annotation::IPV4_VXLAN_TUNNEL_ADDR].as_deref(),
            Some("10.244.0.0")
        );

        let before = k.state().writes;
        let mut again = Contributions::default();
        m.apply(&k, &plan(&d, &u), Some(ip("10.244.0.0")), &mut again)
            .await
            .expect("apply");
        assert_eq!(k.state().writes, before, "converged: nothing written");
        assert_eq!(again.routes, out.routes);
    }

    #[tokio::test]
    async fn a_gone_peer_loses_its_entries_a_changed_port_recreates_the_device_and_off_removes_it() {
        let k = kernel();
        let (mut d, u) = (desired(), detected(&k));
        let m = VxlanManager::new(false);
        m.apply(
            &k,
            &plan(&d, &u),
            Some(ip("10.244.0.0")),
            &mut Contributions::default(),
        )
        .await
        .expect("apply");
        d.peers.remove(&ip("10.244.2.0"));
        let mut out = Contributions::default();
        m.apply(&k, &plan(&d, &u), Some(ip("10.244.0.0")), &mut out)
            .await
            .expect("apply");
        let i = k.state().index(VXLAN_DEVICE).expect("device");
        let left: Vec<_> = k
            .state()
            .neighbours
            .iter()
            .filter(|(x, _, _)| *x == i)
            .cloned()
            .collect();
        assert_eq!(
            left,
            vec![
                (i, false, (MAC_B, ip("10.244.1.0"))),
                (i, true, (MAC_B, ip("10.99.0.3")))
            ],
            "only b's entries are left"
        );
        assert_eq!(out.stats.neighbours_written, 2, "c's two entries removed");

        // Felix's vxlanPort changed: the device is made again with it (the kernel cannot change the port).
        let mut p = plan(&d, &u);
        p.vxlan.port = 8472;
        m.apply(&k, &p, Some(ip("10.244.0.0")), &mut Contributions::default())
            .await
            .expect("apply");
        let s = k.snapshot();
        assert_eq!(s.links[VXLAN_DEVICE].vxlan.as_ref().map(|v| v.port), Some(8472));
        assert_ne!(s.links[VXLAN_DEVICE].index, i, "a new device");

        // No pool encapsulates any more: no device, no annotations.
        let off = model::Desired::default();
        let mut out = Contributions::default();
        m.apply(&k, &plan(&off, &u), None, &mut out).await.expect("apply");
        assert!(!k.state().links.contains_key(VXLAN_DEVICE));
        assert_eq!(out.annotations[annotation::IPV4_VXLAN_TUNNEL_ADDR], None);
        assert_eq!(out.annotations[annotation::VXLAN_TUNNEL_MAC], None);
        assert!(out.routes.is_empty());
    }

    #[tokio::test]
    async fn the_ipv6_device_rides_the_ipv6_underlay_without_dad_and_takes_only_ipv6_peers() {
        let k = kernel();
        let u = detected(&k);
        let mut d = desired();
        d.vxlan6 = true;
        d.peers.insert(ip("fd00:244:1::"), (MAC_B, ip("fd00:99::3")));
        d.routes.insert(
            "fd00:244:1::/122".parse().expect("net"),
            Hop::Vxlan(ip("fd00:244:1::")),
        );
        let m = VxlanManager::new(true);
        let mut out = Contributions::default();
        m.apply(&k, &plan(&d, &u), Some(ip("fd00:244::")), &mut out)
            .await
            .expect("apply");
        let s = k.snapshot();
        let dev = &s.links[VXLAN_V6_DEVICE];
        assert_eq!(dev.vxlan.as_ref().map(|v| v.local), Some(ip("fd00:99::2")));
        assert_eq!(
            s.sysctls
                .get("net/ipv6/conf/vxlan6.caracal/accept_dad")
                .map(String::as_str),
            Some("0")
        );
        let mine: Vec<_> = s.neighbours.iter().filter(|(x, _, _)| *x == dev.index).collect();
        assert_eq!(
            mine.len(),
            2,
            "the IPv6 peer's ARP and FDB entries only: {mine:?}"
        );
        assert_eq!(out.routes.len(), 1);
        assert_eq!(m.overhead(), 70);
    }
}
