//! The one narrow interface between the routing managers and the kernel: the handful of link, address,
//! route, neighbour and sysctl operations they need, and nothing else. [`Netlink`] implements it for real;
//! [`fake::FakeKernel`] (unit tests only) keeps the same state in memory, so every manager has root-free
//! unit tests that assert what it leaves in the kernel, not which calls it made.

use std::future::Future;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::netlink::{Netlink, NetlinkError, OwnedRoute, PROTO_CARACAL, Rule, VxlanDevice};

/// One interface as address detection sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// Its index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses, with their prefixes.
    pub addrs: Vec<IpNet>,
}

/// A neighbour-table entry on one of Caracal's devices: an ARP / NDP entry (`fdb` false: the address is the
/// peer's tunnel address) or an FDB entry (`fdb` true: frames for the MAC go to the address).
pub type Neighbour = ([u8; 6], IpAddr);

/// What the routing managers may do to the kernel. Every call is idempotent where the kernel's is not made so
/// (an address already present, a link or neighbour already absent, are fine).
pub trait Kernel: Send + Sync {
    /// Every interface with its MTU and addresses (a dump of links and one of addresses).
    fn interfaces(&self) -> impl Future<Output = Result<Vec<Interface>, NetlinkError>> + Send;
    /// Every link's index and name (cheaper than [`Kernel::interfaces`]).
    fn link_names(&self) -> impl Future<Output = Result<Vec<(u32, String)>, NetlinkError>> + Send;
    /// Writes sysctls (`net.ipv4.ip_forward`, or a `/`-separated path when a name holds a dot).
    fn sysctls(
        &self,
        settings: Vec<(String, String)>,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Creates the VXLAN device, or adopts it when it already has these parameters (recreated otherwise); up.
    fn ensure_vxlan(&self, dev: &VxlanDevice) -> impl Future<Output = Result<u32, NetlinkError>> + Send;
    /// Creates or adopts the IPIP device `name`, up with `mtu`; not supported without the ipip module.
    fn ensure_ipip(&self, name: &str, mtu: u32) -> impl Future<Output = Result<u32, NetlinkError>> + Send;
    /// Deletes the link `name`; whether it existed.
    fn del_link(&self, name: &str) -> impl Future<Output = Result<bool, NetlinkError>> + Send;
    /// Adds an address to a link.
    fn add_addr(&self, index: u32, addr: IpNet) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// The routes Caracal owns (its protocol number).
    fn routes(&self) -> impl Future<Output = Result<Vec<OwnedRoute>, NetlinkError>> + Send;
    /// Adds or replaces one of Caracal's routes.
    fn replace_route(&self, route: &OwnedRoute) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Deletes one of Caracal's routes.
    fn del_route(&self, route: &OwnedRoute) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// The permanent neighbour entries (`fdb`: FDB entries) of one family on link `index`.
    fn neighbours(
        &self,
        index: u32,
        fdb: bool,
        v6: bool,
    ) -> impl Future<Output = Result<Vec<Neighbour>, NetlinkError>> + Send;
    /// A permanent ARP / NDP entry: `ip` is at `mac` on link `index`.
    fn replace_neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: [u8; 6],
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// A permanent FDB entry: frames for `mac` go to `dst`.
    fn replace_fdb(
        &self,
        index: u32,
        mac: [u8; 6],
        dst: IpAddr,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Deletes a neighbour (`fdb`: FDB) entry.
    fn del_neighbour(
        &self,
        index: u32,
        entry: Neighbour,
        fdb: bool,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Sets link `name` up with MTU `mtu` and returns its index; None when there is no such link (a device
    /// another component creates, such as the WireGuard device, that is not there yet).
    fn link_up(&self, name: &str, mtu: u32)
    -> impl Future<Output = Result<Option<u32>, NetlinkError>> + Send;
    /// Caracal's routes in routing table `table` (not the main one).
    fn table_routes(&self, table: u32) -> impl Future<Output = Result<Vec<OwnedRoute>, NetlinkError>> + Send;
    /// Writes a route in table `table`.
    fn replace_table_route(
        &self,
        table: u32,
        route: &OwnedRoute,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Deletes a route from table `table`; absent is fine.
    fn del_table_route(
        &self,
        table: u32,
        route: &OwnedRoute,
    ) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// The routing policy rules of one family.
    fn rules(&self, v6: bool) -> impl Future<Output = Result<Vec<Rule>, NetlinkError>> + Send;
    /// Adds a rule; one already there is fine.
    fn add_rule(&self, rule: &Rule) -> impl Future<Output = Result<(), NetlinkError>> + Send;
    /// Deletes a rule; absent is fine.
    fn del_rule(&self, rule: &Rule) -> impl Future<Output = Result<(), NetlinkError>> + Send;
}

impl Kernel for Netlink {
    async fn interfaces(&self) -> Result<Vec<Interface>, NetlinkError> {
        self.interfaces().await
    }

    async fn link_names(&self) -> Result<Vec<(u32, String)>, NetlinkError> {
        self.links().await
    }

    async fn sysctls(&self, settings: Vec<(String, String)>) -> Result<(), NetlinkError> {
        crate::netlink::sysctls(self.netns(), settings).await
    }

    async fn ensure_vxlan(&self, dev: &VxlanDevice) -> Result<u32, NetlinkError> {
        Netlink::ensure_vxlan(self, dev).await
    }

    async fn ensure_ipip(&self, name: &str, mtu: u32) -> Result<u32, NetlinkError> {
        Netlink::ensure_ipip(self, name, mtu).await
    }

    async fn del_link(&self, name: &str) -> Result<bool, NetlinkError> {
        Netlink::del_link(self, name).await
    }

    async fn add_addr(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        Netlink::add_addr(self, index, addr).await
    }

    async fn routes(&self) -> Result<Vec<OwnedRoute>, NetlinkError> {
        Netlink::routes(self, PROTO_CARACAL).await
    }

    async fn replace_route(&self, route: &OwnedRoute) -> Result<(), NetlinkError> {
        Netlink::replace_route(self, route, PROTO_CARACAL).await
    }

    async fn del_route(&self, route: &OwnedRoute) -> Result<(), NetlinkError> {
        Netlink::del_route(self, route, PROTO_CARACAL).await
    }

    async fn neighbours(&self, index: u32, fdb: bool, v6: bool) -> Result<Vec<Neighbour>, NetlinkError> {
        Netlink::neighbours(self, index, fdb, v6).await
    }

    async fn replace_neighbour(&self, index: u32, ip: IpAddr, mac: [u8; 6]) -> Result<(), NetlinkError> {
        Netlink::replace_neighbour(self, index, ip, mac).await
    }

    async fn replace_fdb(&self, index: u32, mac: [u8; 6], dst: IpAddr) -> Result<(), NetlinkError> {
        Netlink::replace_fdb(self, index, mac, dst).await
    }

    async fn del_neighbour(&self, index: u32, entry: Neighbour, fdb: bool) -> Result<(), NetlinkError> {
        Netlink::del_neighbour(self, index, entry.0, entry.1, fdb).await
    }

    async fn link_up(&self, name: &str, mtu: u32) -> Result<Option<u32>, NetlinkError> {
        let Some(l) = self.link(name).await? else {
            return Ok(None);
        };
        self.set_up(l.header.index, Some(mtu)).await?;
        Ok(Some(l.header.index))
    }

    async fn table_routes(&self, table: u32) -> Result<Vec<OwnedRoute>, NetlinkError> {
        Netlink::routes_in(self, PROTO_CARACAL, table).await
    }

    async fn replace_table_route(&self, table: u32, route: &OwnedRoute) -> Result<(), NetlinkError> {
        Netlink::replace_route_in(self, route, PROTO_CARACAL, table).await
    }

    async fn del_table_route(&self, table: u32, route: &OwnedRoute) -> Result<(), NetlinkError> {
        Netlink::del_route_in(self, route, PROTO_CARACAL, table).await
    }

    async fn rules(&self, v6: bool) -> Result<Vec<Rule>, NetlinkError> {
        Netlink::rules(self, v6).await
    }

    async fn add_rule(&self, rule: &Rule) -> Result<(), NetlinkError> {
        Netlink::add_rule(self, rule).await
    }

    async fn del_rule(&self, rule: &Rule) -> Result<(), NetlinkError> {
        Netlink::del_rule(self, rule).await
    }
}

/// An in-memory kernel for the managers' unit tests.
#[cfg(test)]
pub mod fake {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::IpAddr;
    use std::sync::Mutex;

    use ipnet::IpNet;

    use super::{Interface, Kernel, Neighbour};
    use crate::netlink::{NetlinkError, OwnedRoute, Rule, VxlanDevice};

    /// A link the fake holds.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Link {
        /// Its index.
        pub index: u32,
        /// Its MTU.
        pub mtu: u32,
        /// Its addresses.
        pub addrs: BTreeSet<IpNet>,
        /// The VXLAN parameters, for a VXLAN device.
        pub vxlan: Option<VxlanDevice>,
    }

    /// Everything the fake kernel holds.
    #[derive(Clone, Debug, Default)]
    pub struct State {
        /// Links by name.
        pub links: BTreeMap<String, Link>,
        /// Caracal's routes.
        pub routes: BTreeSet<OwnedRoute>,
        /// Caracal's routes in other tables: (table, route).
        pub table_routes: BTreeSet<(u32, OwnedRoute)>,
        /// Routing policy rules.
        pub rules: BTreeSet<Rule>,
        /// Neighbour entries: (link index, fdb, entry).
        pub neighbours: BTreeSet<(u32, bool, Neighbour)>,
        /// Sysctls written.
        pub sysctls: BTreeMap<String, String>,
        /// Whether IPIP devices can be created (this machine's kernel has no ipip module).
        pub ipip: bool,
        next_index: u32,
        /// Writes (anything that changed state), to assert that a converged kernel sees none.
        pub writes: usize,
    }

    /// The fake: its state behind a lock, so tests can read and disturb it between syncs.
    #[derive(Debug, Default)]
    pub struct FakeKernel {
        /// The state.
        pub state: Mutex<State>,
    }

    impl FakeKernel {
        /// A kernel with one underlay interface `name` holding `addrs`.
        pub fn with_underlay(name: &str, mtu: u32, addrs: &[&str]) -> Self {
            let k = FakeKernel::default();
            {
                let mut s = k.state();
                s.next_index = 2;
                let addrs = addrs.iter().map(|a| a.parse().expect("address")).collect();
                s.add_link(name, mtu, addrs, None);
            }
            k
        }

        /// The state, locked.
        pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().expect("fake kernel lock")
        }

        /// A copy of the state (no lock held).
        pub fn snapshot(&self) -> State {
            self.state().clone()
        }

        /// Adds a plain link (a pod's veth), returning its index.
        pub fn add_link(&self, name: &str) -> u32 {
            self.state().add_link(name, 1500, BTreeSet::new(), None)
        }
    }

    impl State {
        fn add_link(
            &mut self,
            name: &str,
            mtu: u32,
            addrs: BTreeSet<IpNet>,
            vxlan: Option<VxlanDevice>,
        ) -> u32 {
            self.next_index = self.next_index.max(1) + 1;
            let index = self.next_index;
            self.links.insert(
                name.to_owned(),
                Link {
                    index,
                    mtu,
                    addrs,
                    vxlan,
                },
            );
            index
        }

        /// The index of link `name`.
        pub fn index(&self, name: &str) -> Option<u32> {
            self.links.get(name).map(|l| l.index)
        }

        fn remove_link(&mut self, name: &str) -> bool {
            let Some(l) = self.links.remove(name) else {
                return false;
            };
            // What the kernel removes with a link.
            self.routes.retain(|r| !route_uses(r, l.index));
            self.table_routes.retain(|(_, r)| !route_uses(r, l.index));
            self.neighbours.retain(|(i, _, _)| *i != l.index);
            true
        }
    }

    fn route_uses(r: &OwnedRoute, index: u32) -> bool {
        use crate::netlink::RouteTarget;
        matches!(r.target, RouteTarget::Dev(i) | RouteTarget::Via(_, i) if i == index)
    }

    fn no_link(index: u32) -> NetlinkError {
        NetlinkError::NoLink(format!("index {index}"))
    }

    impl Kernel for FakeKernel {
        async fn interfaces(&self) -> Result<Vec<Interface>, NetlinkError> {
            Ok(self
                .state()
                .links
                .iter()
                .map(|(name, l)| Interface {
                    index: l.index,
                    name: name.clone(),
                    mtu: l.mtu,
                    addrs: l.addrs.iter().copied().collect(),
                })
                .collect())
        }

        async fn link_names(&self) -> Result<Vec<(u32, String)>, NetlinkError> {
            Ok(self
                .state()
                .links
                .iter()
                .map(|(n, l)| (l.index, n.clone()))
                .collect())
        }

        async fn sysctls(&self, settings: Vec<(String, String)>) -> Result<(), NetlinkError> {
            let mut s = self.state();
            for (k, v) in settings {
                if s.sysctls.insert(k, v.clone()).as_deref() != Some(v.as_str()) {
                    s.writes += 1;
                }
            }
            Ok(())
        }

        async fn ensure_vxlan(&self, dev: &VxlanDevice) -> Result<u32, NetlinkError> {
            let mut s = self.state();
            if let Some(l) = s.links.get_mut(&dev.name) {
                let mut same = dev.clone();
                same.mtu = l.mtu;
                if l.vxlan.as_ref() == Some(&same) {
                    if l.mtu != dev.mtu {
                        l.mtu = dev.mtu;
                        l.vxlan = Some(dev.clone());
                        s.writes += 1;
                    }
                    return Ok(s.links[&dev.name].index);
                }
                s.remove_link(&dev.name);
            }
            s.writes += 1;
            Ok(s.add_link(&dev.name, dev.mtu, BTreeSet::new(), Some(dev.clone())))
        }

        async fn ensure_ipip(&self, name: &str, mtu: u32) -> Result<u32, NetlinkError> {
            let mut s = self.state();
            if !s.ipip {
                return Err(NetlinkError::NotSupported(format!(
                    "creating {name}: no ipip module"
                )));
            }
            if let Some(l) = s.links.get_mut(name) {
                if l.mtu != mtu {
                    l.mtu = mtu;
                    s.writes += 1;
                }
                return Ok(s.links[name].index);
            }
            s.writes += 1;
            Ok(s.add_link(name, mtu, BTreeSet::new(), None))
        }

        async fn del_link(&self, name: &str) -> Result<bool, NetlinkError> {
            let mut s = self.state();
            let gone = s.remove_link(name);
            s.writes += usize::from(gone);
            Ok(gone)
        }

        async fn add_addr(&self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
            let mut s = self.state();
            let l = s
                .links
                .values_mut()
                .find(|l| l.index == index)
                .ok_or_else(|| no_link(index))?;
            if l.addrs.insert(addr) {
                s.writes += 1;
            }
            Ok(())
        }

        async fn routes(&self) -> Result<Vec<OwnedRoute>, NetlinkError> {
            Ok(self.state().routes.iter().cloned().collect())
        }

        async fn replace_route(&self, route: &OwnedRoute) -> Result<(), NetlinkError> {
            let mut s = self.state();
            if let crate::netlink::RouteTarget::Dev(i) | crate::netlink::RouteTarget::Via(_, i) = route.target
                && !s.links.values().any(|l| l.index == i)
            {
                return Err(no_link(i));
            }
            // One route per destination, as the main table holds it.
            s.routes.retain(|r| r.dst != route.dst);
            s.routes.insert(route.clone());
            s.writes += 1;
            Ok(())
        }

        async fn del_route(&self, route: &OwnedRoute) -> Result<(), NetlinkError> {
            let mut s = self.state();
            if s.routes.remove(route) {
                s.writes += 1;
            }
            Ok(())
        }

        async fn neighbours(&self, index: u32, fdb: bool, v6: bool) -> Result<Vec<Neighbour>, NetlinkError> {
            Ok(self
                .state()
                .neighbours
                .iter()
                .filter(|(i, f, (_, ip))| *i == index && *f == fdb && (fdb || ip.is_ipv6() == v6))
                .map(|(_, _, n)| *n)
                .collect())
        }

        async fn replace_neighbour(&self, index: u32, ip: IpAddr, mac: [u8; 6]) -> Result<(), NetlinkError> {
            let mut s = self.state();
            s.neighbours
                .retain(|(i, f, (_, a))| !(*i == index && !*f && *a == ip));
            s.neighbours.insert((index, false, (mac, ip)));
            s.writes += 1;
            Ok(())
        }

        async fn replace_fdb(&self, index: u32, mac: [u8; 6], dst: IpAddr) -> Result<(), NetlinkError> {
            let mut s = self.state();
            s.neighbours
                .retain(|(i, f, (m, _))| !(*i == index && *f && *m == mac));
            s.neighbours.insert((index, true, (mac, dst)));
            s.writes += 1;
            Ok(())
        }

        async fn del_neighbour(&self, index: u32, entry: Neighbour, fdb: bool) -> Result<(), NetlinkError> {
            let mut s = self.state();
            if s.neighbours.remove(&(index, fdb, entry)) {
                s.writes += 1;
            }
            Ok(())
        }

        async fn link_up(&self, name: &str, mtu: u32) -> Result<Option<u32>, NetlinkError> {
            let mut s = self.state();
            let Some(l) = s.links.get_mut(name) else {
                return Ok(None);
            };
            let index = l.index;
            if l.mtu != mtu {
                l.mtu = mtu;
                s.writes += 1;
            }
            Ok(Some(index))
        }

        async fn table_routes(&self, table: u32) -> Result<Vec<OwnedRoute>, NetlinkError> {
            Ok(self
                .state()
                .table_routes
                .iter()
                .filter(|(t, _)| *t == table)
                .map(|(_, r)| r.clone())
                .collect())
        }

        async fn replace_table_route(&self, table: u32, route: &OwnedRoute) -> Result<(), NetlinkError> {
            let mut s = self.state();
            if let crate::netlink::RouteTarget::Dev(i) | crate::netlink::RouteTarget::Via(_, i) = route.target
                && !s.links.values().any(|l| l.index == i)
            {
                return Err(no_link(i));
            }
            s.table_routes
                .retain(|(t, r)| !(*t == table && r.dst == route.dst));
            s.table_routes.insert((table, route.clone()));
            s.writes += 1;
            Ok(())
        }

        async fn del_table_route(&self, table: u32, route: &OwnedRoute) -> Result<(), NetlinkError> {
            let mut s = self.state();
            if s.table_routes.remove(&(table, route.clone())) {
                s.writes += 1;
            }
            Ok(())
        }

        async fn rules(&self, v6: bool) -> Result<Vec<Rule>, NetlinkError> {
            Ok(self
                .state()
                .rules
                .iter()
                .filter(|r| r.v6 == v6)
                .copied()
                .collect())
        }

        async fn add_rule(&self, rule: &Rule) -> Result<(), NetlinkError> {
            let mut s = self.state();
            if s.rules.insert(*rule) {
                s.writes += 1;
            }
            Ok(())
        }

        async fn del_rule(&self, rule: &Rule) -> Result<(), NetlinkError> {
            let mut s = self.state();
            if s.rules.remove(rule) {
                s.writes += 1;
            }
            Ok(())
        }
    }
}
