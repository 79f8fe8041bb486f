//! The IPIP manager: the ipip module's `tunl0` device (IPv4 only), its tunnel address, the annotation that
//! publishes it, and the routes through it. A kernel without the ipip module gets no device and no IPIP
//! routes, with a warning that names the alternative; nothing else stops.

use std::net::IpAddr;

use ipnet::IpNet;

use super::kernel::Kernel;
use super::model::{Hop, annotation};
use super::{Contributions, IPIP_DEVICE, Plan, RoutingError};
use crate::netlink::{OwnedRoute, RouteTarget};

/// The warning when a pool asks for IPIP on a kernel without the module.
pub const NO_MODULE: &str = "an IPPool asks for IPIP, but this kernel has no ipip module: IPIP routes are not programmed (use vxlanMode)";

/// IPIP (IPv4 in IPv4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpipManager;

impl IpipManager {
    /// The bytes each packet gains: the outer IPv4 header.
    pub const OVERHEAD: u32 = 20;

    /// Whether the plan needs the device (an enabled IPv4 pool with an ipipMode).
    pub fn wanted(plan: &Plan<'_>) -> bool {
        plan.desired.ipip
    }

    /// Converges `tunl0` to `plan` with `tunnel` (its address from IPAM; None when not wanted). The device
    /// is left alone when no pool wants it (the ipip module's fallback device cannot be deleted; without
    /// routes through it, it carries nothing).
    pub async fn apply<K: Kernel>(
        &self,
        k: &K,
        plan: &Plan<'_>,
        tunnel: Option<IpAddr>,
        out: &mut Contributions,
    ) -> Result<(), RoutingError> {
        let Some(addr) = tunnel.filter(|_| Self::wanted(plan)) else {
            out.annotations
                .insert(annotation::IPV4_IPIP_TUNNEL_ADDR.into(), None);
            return Ok(());
        };
        let mtu = plan
            .ipip_mtu
            .unwrap_or(plan.underlay.host_mtu(false).saturating_sub(Self::OVERHEAD));
        let index = match k.ensure_ipip(IPIP_DEVICE, mtu).await {
            Ok(index) => index,
            Err(e) if crate::netlink::is_not_supported(&e) => {
                out.warnings.push(NO_MODULE.to_owned());
                out.annotations
                    .insert(annotation::IPV4_IPIP_TUNNEL_ADDR.into(), None);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        k.add_addr(index, IpNet::from(addr)).await?;
        out.annotations
            .insert(annotation::IPV4_IPIP_TUNNEL_ADDR.into(), Some(addr.to_string()));
        for (dst, hop) in &plan.desired.routes {
            if let Hop::Ipip(ip) = hop {
                out.routes.insert(OwnedRoute {
                    dst: *dst,
                    target: RouteTarget::Via(IpAddr::V4(*ip), index),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::model::Desired;
    use crate::routing::testutil::{detected, ip, kernel, plan};

    fn desired() -> Desired {
        let mut d = Desired {
            ipip: true,
            ..Default::default()
        };
        d.routes.insert(
            "10.244.1.0/26".parse().expect("net"),
            Hop::Ipip("10.99.0.3".parse().expect("ip")),
        );
        d
    }

    #[tokio::test]
    async fn without_the_module_no_routes_and_a_warning_that_names_the_alternative() {
        let k = kernel();
        let (d, u) = (desired(), detected(&k));
        let mut out = Contributions::default();
        IpipManager
            .apply(&k, &plan(&d, &u), Some(ip("10.244.0.1")), &mut out)
            .await
            .expect("not an error: the rest of routing goes on");
        assert!(out.routes.is_empty());
        assert_eq!(out.warnings, vec![NO_MODULE.to_owned()]);
        assert!(NO_MODULE.contains("vxlanMode"));
        assert_eq!(out.annotations[annotation::IPV4_IPIP_TUNNEL_ADDR], None);
        assert!(!k.state().links.contains_key(IPIP_DEVICE));
    }

    #[tokio::test]
    async fn with_the_module_tunl0_gets_the_underlay_mtu_less_20_its_address_and_the_routes() {
        let k = kernel();
        k.state().ipip = true;
        let (d, u) = (desired(), detected(&k));
        let mut out = Contributions::default();
        IpipManager
            .apply(&k, &plan(&d, &u), Some(ip("10.244.0.1")), &mut out)
            .await
            .expect("apply");
        let s = k.snapshot();
        let tunl = &s.links[IPIP_DEVICE];
        assert_eq!(tunl.mtu, 1480);
        assert!(tunl.addrs.contains(&"10.244.0.1/32".parse().expect("net")));
        let want = OwnedRoute {
            dst: "10.244.1.0/26".parse().expect("net"),
            target: RouteTarget::Via(ip("10.99.0.3"), tunl.index),
        };
        assert_eq!(out.routes.iter().collect::<Vec<_>>(), vec![&want]);
        assert_eq!(
            out.annotations[annotation::IPV4_IPIP_TUNNEL_ADDR].as_deref(),
            Some("10.244.0.1")
        );
        // Felix's ipipMTU wins over the detected one.
        let mut p = plan(&d, &u);
        p.ipip_mtu = Some(1400);
        IpipManager
            .apply(&k, &p, Some(ip("10.244.0.1")), &mut Contributions::default())
            .await
            .expect("apply");
        assert_eq!(k.snapshot().links[IPIP_DEVICE].mtu, 1400);
    }
}
