//! The operator-owned part of FelixConfiguration `default`, and the IPPools of the Installation.
//!
//! FelixConfiguration is applied with only the fields the Installation decides; every other field stays the
//! user's (server-side apply tracks ownership per field).

use caracal_crds::installation::{Encapsulation, InstallationSpec, LinuxDataplane, Toggle};
use caracal_crds::ippool::{EncapMode, IPPool, IPPoolSpec};
use serde_json::json;

use super::common::meta;
use super::{ClusterFacts, Object};

fn modes(e: Encapsulation) -> (EncapMode, EncapMode) {
    match e {
        Encapsulation::VXLAN => (EncapMode::Always, EncapMode::Never),
        Encapsulation::VXLANCrossSubnet => (EncapMode::CrossSubnet, EncapMode::Never),
        Encapsulation::IPIP => (EncapMode::Never, EncapMode::Always),
        Encapsulation::IPIPCrossSubnet => (EncapMode::Never, EncapMode::CrossSubnet),
        Encapsulation::None => (EncapMode::Never, EncapMode::Never),
    }
}

/// Renders FelixConfiguration `default` (owned fields only) and one IPPool per Installation pool.
pub fn render(spec: &InstallationSpec, facts: &ClusterFacts) -> Vec<Object> {
    let net = spec.calico_network.clone().unwrap_or_default();
    let pools = net.ip_pools.clone().unwrap_or_default();
    let encaps: Vec<Encapsulation> = pools.iter().filter_map(|p| p.encapsulation).collect();
    let mut felix = json!({
        "apiVersion": "caracal.dev/v1",
        "kind": "FelixConfiguration",
        "metadata": serde_json::to_value(meta("caracal-node", "default", false)).unwrap_or_default(),
        "spec": {
            "bpfEnabled": net.linux_dataplane == Some(LinuxDataplane::BPF),
            "wireguardEnabled": net.wireguard == Some(Toggle::Enabled),
            "wireguardEnabledV6": net.wireguard == Some(Toggle::Enabled) && pools.iter().any(|p| !p.cidr.is_ipv4()),
            "vxlanEnabled": encaps.iter().any(|e| matches!(e, Encapsulation::VXLAN | Encapsulation::VXLANCrossSubnet)),
            "ipipEnabled": encaps.iter().any(|e| matches!(e, Encapsulation::IPIP | Encapsulation::IPIPCrossSubnet)),
        }
    });
    if let Some(mtu) = net.mtu {
        for field in [
            "vxlanMTU",
            "vxlanMTUV6",
            "ipipMTU",
            "wireguardMTU",
            "wireguardMTUV6",
        ] {
            felix["spec"][field] = mtu.into();
        }
    }
    let mut out = vec![Object {
        api_version: "caracal.dev/v1".into(),
        kind: "FelixConfiguration".into(),
        name: "default".into(),
        namespace: None,
        body: felix,
    }];
    for pool in pools {
        // A pool the user already made with this CIDR is adopted under its own name.
        let name = facts
            .user_pools
            .iter()
            .find(|u| u.cidr == pool.cidr)
            .map(|u| u.name.clone())
            .or(pool.name.clone())
            .unwrap_or_default();
        let (vxlan, ipip) = modes(pool.encapsulation.unwrap_or(Encapsulation::VXLAN));
        let object = IPPool {
            metadata: meta("ippool", &name, false),
            spec: IPPoolSpec {
                cidr: pool.cidr,
                block_size: pool.block_size,
                vxlan_mode: Some(vxlan),
                ipip_mode: Some(ipip),
                nat_outgoing: Some(pool.nat_outgoing == Some(Toggle::Enabled)),
                disabled: Some(false),
                disable_bgp_export: pool.disable_bgp_export,
                node_selector: pool.node_selector.clone(),
                allowed_uses: pool.allowed_uses.clone(),
                assignment_mode: None,
            },
        };
        out.push(Object::from_typed("caracal.dev/v1", "IPPool", &object));
    }
    out
}

#[cfg(test)]
mod tests {
    use caracal_crds::installation::{CalicoNetworkSpec, InstallationIPPool};

    use super::*;
    use crate::render::{UserPool, compute};

    #[test]
    fn a_user_pool_with_the_same_cidr_is_adopted_under_its_own_name() {
        let spec = InstallationSpec {
            calico_network: Some(CalicoNetworkSpec {
                ip_pools: Some(vec![InstallationIPPool {
                    name: Some("from-spec".into()),
                    cidr: "10.0.0.0/16".parse().unwrap(),
                    encapsulation: None,
                    nat_outgoing: None,
                    node_selector: None,
                    block_size: None,
                    disable_bgp_export: None,
                    allowed_uses: Vec::new(),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let facts = ClusterFacts {
            user_pools: vec![UserPool {
                name: "made-by-hand".into(),
                cidr: "10.0.0.0/16".parse().unwrap(),
            }],
            ..Default::default()
        };
        let computed = compute(&spec, &facts).unwrap();
        let objects = render(&computed, &facts);
        let pools: Vec<_> = objects.iter().filter(|o| o.kind == "IPPool").collect();
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].name, "made-by-hand");
        assert_eq!(
            pools[0].body["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "caracal-operator"
        );
        assert_eq!(pools[0].body["spec"]["vxlanMode"], "Always");
        let felix = &objects[0].body["spec"];
        assert_eq!(
            (felix["vxlanEnabled"].as_bool(), felix["ipipEnabled"].as_bool()),
            (Some(true), Some(false))
        );
    }
}
