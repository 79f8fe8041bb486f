//! What the managers' unit tests share: a node's underlay as address detection found it in a fake kernel,
//! and a plan around a desired state.

use std::net::IpAddr;

use super::address::{Chosen, Detected};
use super::kernel::fake::FakeKernel;
use super::model::Desired;
use super::{Plan, VxlanParams};

/// A fake kernel with `eth0` (MTU 1500) holding 10.99.0.2/24 and fd00:99::2/64.
pub fn kernel() -> FakeKernel {
    FakeKernel::with_underlay("eth0", 1500, &["10.99.0.2/24", "fd00:99::2/64"])
}

/// What detection finds on [`kernel`]'s `eth0`.
pub fn detected(k: &FakeKernel) -> Detected {
    let index = k.state().index("eth0").expect("eth0");
    Detected {
        chosen: Chosen {
            ip: "10.99.0.2/24".parse().expect("ip"),
            index,
            name: "eth0".into(),
            mtu: 1500,
        },
        chosen6: Some(Chosen {
            ip: "fd00:99::2/64".parse().expect("ip"),
            index,
            name: "eth0".into(),
            mtu: 1500,
        }),
        warning: None,
        host_mtu: None,
    }
}

/// A plan for node `a` with the pod MTU 1450 and Felix's default VXLAN parameters.
pub fn plan<'a>(desired: &'a Desired, underlay: &'a Detected) -> Plan<'a> {
    Plan {
        me: "a",
        desired,
        underlay,
        pod_mtu: 1450,
        vxlan: VxlanParams {
            vni: super::DEFAULT_VNI,
            port: super::DEFAULT_PORT,
        },
        ipip_mtu: None,
        wireguard: [
            super::wireguard::WgPlan::off(false),
            super::wireguard::WgPlan::off(true),
        ],
    }
}

/// Parses an address.
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}
