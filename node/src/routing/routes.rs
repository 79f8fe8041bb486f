//! The route manager: one owner for every route Caracal puts in the kernel (its protocol number). The other
//! managers contribute the routes through their devices; this one adds the routes that need no device of
//! Caracal's (straight to a node in the same subnet, blackholes for the node's own blocks, a host route per
//! local pod through its veth), then makes the kernel hold exactly that set: what is missing is written,
//! what is Caracal's and not wanted is removed.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;

use super::kernel::Kernel;
use super::model::Hop;
use super::{Contributions, Plan, RoutingError};
use crate::netlink::{OwnedRoute, RouteTarget};

/// Owns Caracal's routes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteManager;

impl RouteManager {
    /// The routes that need no device of Caracal's: same-subnet nodes through the underlay link of the
    /// family, and blackholes.
    pub fn underlay_routes(plan: &Plan<'_>) -> BTreeSet<OwnedRoute> {
        let mut out = BTreeSet::new();
        for (dst, hop) in &plan.desired.routes {
            let target = match hop {
                Hop::Direct(ip) if ip.is_ipv4() => RouteTarget::Via(*ip, plan.underlay.chosen.index),
                Hop::Direct(ip) => match &plan.underlay.chosen6 {
                    Some(c6) => RouteTarget::Via(*ip, c6.index),
                    None => continue,
                },
                Hop::Blackhole => RouteTarget::Blackhole,
                Hop::Vxlan(_) | Hop::Ipip(_) => continue,
            };
            out.insert(OwnedRoute { dst: *dst, target });
        }
        out
    }

    /// Makes the kernel's routes exactly `contributed`, the underlay routes and a host route per local pod.
    /// `pods` lists the pods' addresses with their veth's name; it is awaited after the kernel's routes are
    /// read, so a pod wired meanwhile is never taken for a stale route and removed.
    pub async fn apply<K: Kernel>(
        &self,
        k: &K,
        plan: &Plan<'_>,
        pods: impl Future<Output = Vec<(IpAddr, String)>> + Send,
        out: &mut Contributions,
    ) -> Result<(), RoutingError> {
        let mut want = std::mem::take(&mut out.routes);
        want.extend(Self::underlay_routes(plan));
        let have: BTreeSet<OwnedRoute> = k.routes().await?.into_iter().collect();
        let pods = pods.await;
        let links: BTreeMap<String, u32> = k.link_names().await?.into_iter().map(|(i, n)| (n, i)).collect();
        for (ip, iface) in pods {
            if let Some(index) = links.get(&iface) {
                want.insert(crate::cni::wire::pod_route(ip, *index));
            }
        }
        for r in have.difference(&want) {
            k.del_route(r).await?;
            out.stats.routes_removed += 1;
        }
        for r in want.difference(&have) {
            k.replace_route(r).await?;
            out.stats.routes_added += 1;
        }
        out.routes = want;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::model::Desired;
    use crate::routing::testutil::{detected, ip, kernel, plan};

    #[tokio::test]
    async fn the_kernel_ends_with_exactly_the_contributed_underlay_and_pod_routes() {
        let k = kernel();
        let u = detected(&k);
        let eth0 = u.chosen.index;
        let veth = k.add_link("crc1234567890ab");
        let other = k.add_link("vxlan.caracal");
        let mut d = Desired::default();
        d.routes
            .insert("10.244.0.0/26".parse().expect("net"), Hop::Blackhole);
        d.routes.insert(
            "10.244.1.0/26".parse().expect("net"),
            Hop::Direct(ip("10.99.0.3")),
        );
        d.routes.insert(
            "fd00:244:1::/122".parse().expect("net"),
            Hop::Direct(ip("fd00:99::3")),
        );
        // A stale route of Caracal's, and one the other managers contribute.
        let stale = OwnedRoute {
            dst: "10.244.9.0/26".parse().expect("net"),
            target: RouteTarget::Via(ip("10.99.0.9"), eth0),
        };
        k.replace_route(&stale).await.expect("stale");
        let through = OwnedRoute {
            dst: "10.244.2.0/26".parse().expect("net"),
            target: RouteTarget::Via(ip("10.244.2.0"), other),
        };
        let mut out = Contributions::default();
        out.routes.insert(through.clone());
        let pods = async {
            vec![
                (ip("10.244.0.5"), "crc1234567890ab".to_owned()),
                // A pod whose veth is gone (or not made yet) gets no route.
                (ip("10.244.0.6"), "crcgone".to_owned()),
            ]
        };
        RouteManager
            .apply(&k, &plan(&d, &u), pods, &mut out)
            .await
            .expect("apply");
        let want: BTreeSet<OwnedRoute> = [
            through,
            OwnedRoute {
                dst: "10.244.0.0/26".parse().expect("net"),
                target: RouteTarget::Blackhole,
            },
            OwnedRoute {
                dst: "10.244.1.0/26".parse().expect("net"),
                target: RouteTarget::Via(ip("10.99.0.3"), eth0),
            },
            OwnedRoute {
                dst: "fd00:244:1::/122".parse().expect("net"),
                target: RouteTarget::Via(ip("fd00:99::3"), eth0),
            },
            crate::cni::wire::pod_route(ip("10.244.0.5"), veth),
        ]
        .into();
        assert_eq!(k.state().routes, want);
        assert_eq!((out.stats.routes_added, out.stats.routes_removed), (5, 1));

        // Drift: a route deleted behind Caracal's back returns; a converged kernel sees no writes.
        k.state()
            .routes
            .remove(&crate::cni::wire::pod_route(ip("10.244.0.5"), veth));
        let mut again = Contributions {
            routes: out.routes.clone(),
            ..Default::default()
        };
        let pods = async { vec![(ip("10.244.0.5"), "crc1234567890ab".to_owned())] };
        RouteManager
            .apply(&k, &plan(&d, &u), pods, &mut again)
            .await
            .expect("apply");
        assert_eq!(k.state().routes, want);
        assert_eq!((again.stats.routes_added, again.stats.routes_removed), (1, 0));
        let writes = k.state().writes;
        let mut third = Contributions {
            routes: out.routes.clone(),
            ..Default::default()
        };
        let pods = async { vec![(ip("10.244.0.5"), "crc1234567890ab".to_owned())] };
        RouteManager
            .apply(&k, &plan(&d, &u), pods, &mut third)
            .await
            .expect("apply");
        assert_eq!(k.state().writes, writes);
    }

    #[tokio::test]
    async fn an_ipv6_same_subnet_route_needs_an_ipv6_underlay() {
        let k = kernel();
        let mut u = detected(&k);
        u.chosen6 = None;
        let mut d = Desired::default();
        d.routes.insert(
            "fd00:244:1::/122".parse().expect("net"),
            Hop::Direct(ip("fd00:99::3")),
        );
        assert!(RouteManager::underlay_routes(&plan(&d, &u)).is_empty());
    }
}
