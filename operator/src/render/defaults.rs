//! The computed Installation: the user's spec with every default filled in, and the checks that need more
//! than one field or knowledge of the cluster. The result goes to `status.computed`, never into `spec`.

use caracal_crds::installation::{
    CalicoNetworkSpec, Encapsulation, InstallationIPPool, InstallationSpec, LinuxDataplane,
    NodeAddressAutodetection, Toggle,
};
use caracal_crds::schema::{Cidr, Selector};
use ipnet::IpNet;
use k8s_openapi::api::apps::v1::{DaemonSetUpdateStrategy, RollingUpdateDaemonSet};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ClusterFacts;

/// The pool created when the Installation names none and the cluster has no IPPool.
pub const DEFAULT_POOL_CIDR: &str = "192.168.0.0/16";
/// Default per-node block sizes.
pub const DEFAULT_BLOCK_V4: i32 = 26;
/// Default per-node block size for IPv6 pools.
pub const DEFAULT_BLOCK_V6: i32 = 122;
/// Default caracal-node metrics port.
pub const DEFAULT_NODE_METRICS_PORT: u16 = 9091;
/// Default caracal-typha metrics port.
pub const DEFAULT_TYPHA_METRICS_PORT: u16 = 9093;

/// A problem with the Installation that a person must fix; the operator reports it as Degraded and changes
/// nothing that is running.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// The offending field, as a path (`spec.calicoNetwork.ipPools[1].cidr`).
    pub field: String,
    /// What is wrong and what to change.
    pub message: String,
    /// A short CamelCase reason for conditions and metrics (bounded set).
    pub reason: &'static str,
}

fn err(field: impl Into<String>, reason: &'static str, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        message: message.into(),
        reason,
    }
}

fn is_ipip(e: Encapsulation) -> bool {
    matches!(e, Encapsulation::IPIP | Encapsulation::IPIPCrossSubnet)
}

/// Fills in every default and checks what needs context. Errors list every problem found, not just the first.
pub fn compute(spec: &InstallationSpec, facts: &ClusterFacts) -> Result<InstallationSpec, Vec<SpecError>> {
    let mut out = spec.clone();
    let mut errors = Vec::new();
    if let Some(e) = &facts.api_server_error {
        errors.push(err(
            format!("ConfigMap {}", super::API_SERVER_CONFIGMAP),
            "InvalidAPIServerEndpoint",
            e.clone(),
        ));
    }
    errors.extend(super::pull_secrets::check(spec, facts));
    errors.extend(super::images::check(facts));
    let net = out.calico_network.get_or_insert_with(CalicoNetworkSpec::default);
    let dataplane = *net.linux_dataplane.get_or_insert(LinuxDataplane::Iptables);

    // Pools: the user's, or one default pool when neither the Installation nor the cluster has any.
    let mut pools = net.ip_pools.clone().unwrap_or_default();
    if net.ip_pools.is_none() && facts.user_pools.is_empty() {
        pools.push(InstallationIPPool {
            name: None,
            cidr: DEFAULT_POOL_CIDR.parse().unwrap_or(Cidr(IpNet::default())),
            encapsulation: None,
            nat_outgoing: None,
            node_selector: None,
            block_size: None,
            disable_bgp_export: None,
            allowed_uses: Vec::new(),
        });
    }
    // BGP follows the encapsulation unless the user chose: IPIP and None need routes from BGP.
    let bgp = match net.bgp {
        Some(b) => b,
        None if pools.iter().any(|p| {
            p.encapsulation
                .is_some_and(|e| is_ipip(e) || e == Encapsulation::None)
        }) =>
        {
            Toggle::Enabled
        }
        None => Toggle::Disabled,
    };
    net.bgp = Some(bgp);
    let (mut v4_named, mut v6_named) = (false, false);
    for (i, pool) in pools.iter_mut().enumerate() {
        let v4 = pool.cidr.is_ipv4();
        let encap = *pool.encapsulation.get_or_insert(match (bgp, v4) {
            (Toggle::Enabled, true) => Encapsulation::IPIP,
            (Toggle::Enabled, false) => Encapsulation::None,
            (Toggle::Disabled, _) => Encapsulation::VXLAN,
        });
        pool.nat_outgoing.get_or_insert(Toggle::Enabled);
        pool.node_selector.get_or_insert_with(|| Selector::from("all()"));
        pool.block_size
            .get_or_insert(if v4 { DEFAULT_BLOCK_V4 } else { DEFAULT_BLOCK_V6 });
        pool.disable_bgp_export.get_or_insert(false);
        if pool.name.is_none() {
            let first = if v4 { &mut v4_named } else { &mut v6_named };
            pool.name = Some(if *first {
                format!("pool-{}", pool.cidr.to_string().replace(['.', ':', '/'], "-"))
            } else {
                format!("default-ipv{}-ippool", if v4 { 4 } else { 6 })
            });
            *first = true;
        }
        let field = format!("spec.calicoNetwork.ipPools[{i}]");
        if is_ipip(encap) && bgp == Toggle::Disabled {
            errors.push(err(
                format!("{field}.encapsulation"),
                "EncapsulationNeedsBGP",
                "IPIP needs BGP to learn routes: set calicoNetwork.bgp to Enabled, or use VXLAN",
            ));
        }
        if is_ipip(encap) && dataplane == LinuxDataplane::BPF {
            // Calico's BPF data plane supports IPIP; Caracal's will when BPF lands. Say so rather than guess.
            errors.push(err(
                format!("{field}.encapsulation"),
                "UnsupportedCombination",
                "IPIP with the BPF data plane is not supported yet: use VXLAN",
            ));
        }
    }
    // Pool overlap, within the spec and against pools the user made (same CIDR means "adopt", not overlap).
    for (i, a) in pools.iter().enumerate() {
        for (j, b) in pools.iter().enumerate().skip(i + 1) {
            if overlaps(a.cidr.0, b.cidr.0) {
                errors.push(err(
                    format!("spec.calicoNetwork.ipPools[{j}].cidr"),
                    "PoolOverlap",
                    format!(
                        "{} overlaps ipPools[{i}] ({}): give each pool its own range",
                        b.cidr, a.cidr
                    ),
                ));
            }
        }
        for user in &facts.user_pools {
            if user.cidr != a.cidr && overlaps(a.cidr.0, user.cidr.0) {
                errors.push(err(
                    format!("spec.calicoNetwork.ipPools[{i}].cidr"),
                    "PoolOverlap",
                    format!(
                        "{} overlaps IPPool {:?} ({}): choose another range or delete that pool",
                        a.cidr, user.name, user.cidr
                    ),
                ));
            }
        }
    }
    net.ip_pools = Some(pools);

    // What the node side cannot do yet is an error, never silently ignored.
    match dataplane {
        LinuxDataplane::Iptables | LinuxDataplane::BPF => {}
        LinuxDataplane::Nftables => errors.push(err(
            "spec.calicoNetwork.linuxDataplane",
            "DataplaneUnavailable",
            "the Nftables data plane is not available in this Caracal release yet: set linuxDataplane to Iptables",
        )),
    }
    net.wireguard.get_or_insert(Toggle::Disabled);
    if *net.host_ports.get_or_insert(Toggle::Disabled) == Toggle::Enabled {
        errors.push(err(
            "spec.calicoNetwork.hostPorts",
            "HostPortsUnavailable",
            "hostPorts needs a port-mapping plugin that this Caracal release does not ship: set hostPorts to Disabled",
        ));
    }
    let has_v6 = net.ip_pools.iter().flatten().any(|p| !p.cidr.is_ipv4());
    net.node_address_autodetection_v4
        .get_or_insert_with(|| NodeAddressAutodetection {
            first_found: Some(true),
            ..Default::default()
        });
    if has_v6 {
        net.node_address_autodetection_v6
            .get_or_insert_with(|| NodeAddressAutodetection {
                first_found: Some(true),
                ..Default::default()
            });
    }

    out.node_update_strategy
        .get_or_insert_with(|| DaemonSetUpdateStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDaemonSet {
                max_unavailable: Some(IntOrString::Int(1)),
                max_surge: None,
            }),
        });
    out.node_metrics_port.get_or_insert(DEFAULT_NODE_METRICS_PORT);
    out.typha_metrics_port.get_or_insert(DEFAULT_TYPHA_METRICS_PORT);
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::UserPool;

    fn net(n: CalicoNetworkSpec) -> InstallationSpec {
        InstallationSpec {
            calico_network: Some(n),
            ..Default::default()
        }
    }
    fn pool(cidr: &str, encap: Option<Encapsulation>) -> InstallationIPPool {
        InstallationIPPool {
            name: None,
            cidr: cidr.parse().unwrap(),
            encapsulation: encap,
            nat_outgoing: None,
            node_selector: None,
            block_size: None,
            disable_bgp_export: None,
            allowed_uses: Vec::new(),
        }
    }
    fn computed_network(spec: &InstallationSpec, facts: &ClusterFacts) -> CalicoNetworkSpec {
        compute(spec, facts).unwrap().calico_network.unwrap()
    }

    #[test]
    fn empty_spec_gets_one_vxlan_pool_iptables_and_no_bgp() {
        let n = computed_network(&InstallationSpec::default(), &ClusterFacts::default());
        assert_eq!(n.linux_dataplane, Some(LinuxDataplane::Iptables));
        assert_eq!(n.bgp, Some(Toggle::Disabled));
        let pools = n.ip_pools.unwrap();
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].cidr.to_string(), "192.168.0.0/16");
        assert_eq!(pools[0].encapsulation, Some(Encapsulation::VXLAN));
        assert_eq!(pools[0].nat_outgoing, Some(Toggle::Enabled));
        assert_eq!(pools[0].block_size, Some(26));
        assert_eq!(pools[0].name.as_deref(), Some("default-ipv4-ippool"));
        assert_eq!(n.mtu, None, "MTU stays auto: the node agent detects it");
    }

    #[test]
    fn no_default_pool_when_the_cluster_already_has_pools() {
        let facts = ClusterFacts {
            user_pools: vec![UserPool {
                name: "mine".into(),
                cidr: "10.0.0.0/16".parse().unwrap(),
            }],
            ..Default::default()
        };
        let n = computed_network(&InstallationSpec::default(), &facts);
        assert!(n.ip_pools.unwrap().is_empty());
    }

    #[test]
    fn ipip_or_unencapsulated_pools_turn_bgp_on_and_default_encapsulation_follows_bgp() {
        let n = computed_network(
            &net(CalicoNetworkSpec {
                ip_pools: Some(vec![pool("10.0.0.0/16", Some(Encapsulation::None))]),
                ..Default::default()
            }),
            &ClusterFacts::default(),
        );
        assert_eq!(n.bgp, Some(Toggle::Enabled));
        let n = computed_network(
            &net(CalicoNetworkSpec {
                bgp: Some(Toggle::Enabled),
                ip_pools: Some(vec![pool("10.0.0.0/16", None), pool("fd00::/48", None)]),
                ..Default::default()
            }),
            &ClusterFacts::default(),
        );
        let pools = n.ip_pools.unwrap();
        assert_eq!(pools[0].encapsulation, Some(Encapsulation::IPIP));
        assert_eq!(pools[1].encapsulation, Some(Encapsulation::None));
        assert_eq!(pools[1].block_size, Some(122));
        assert_eq!(pools[1].name.as_deref(), Some("default-ipv6-ippool"));
        assert!(n.node_address_autodetection_v6.is_some());
    }

    #[test]
    fn ipip_without_bgp_is_an_error_naming_the_pool() {
        let spec = net(CalicoNetworkSpec {
            bgp: Some(Toggle::Disabled),
            ip_pools: Some(vec![
                pool("10.0.0.0/16", None),
                pool("10.1.0.0/16", Some(Encapsulation::IPIP)),
            ]),
            ..Default::default()
        });
        let errs = compute(&spec, &ClusterFacts::default()).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].field, "spec.calicoNetwork.ipPools[1].encapsulation");
        assert!(errs[0].message.contains("set calicoNetwork.bgp to Enabled"));
    }

    #[test]
    fn overlapping_pools_are_reported_but_an_identical_user_pool_is_adopted() {
        let spec = net(CalicoNetworkSpec {
            ip_pools: Some(vec![pool("10.0.0.0/16", None), pool("10.0.128.0/24", None)]),
            ..Default::default()
        });
        let errs = compute(&spec, &ClusterFacts::default()).unwrap_err();
        assert_eq!(errs[0].reason, "PoolOverlap");
        assert_eq!(errs[0].field, "spec.calicoNetwork.ipPools[1].cidr");

        let same = ClusterFacts {
            user_pools: vec![UserPool {
                name: "old".into(),
                cidr: "10.0.0.0/16".parse().unwrap(),
            }],
            ..Default::default()
        };
        let one = net(CalicoNetworkSpec {
            ip_pools: Some(vec![pool("10.0.0.0/16", None)]),
            ..Default::default()
        });
        assert!(compute(&one, &same).is_ok());
        let over = ClusterFacts {
            user_pools: vec![UserPool {
                name: "old".into(),
                cidr: "10.0.0.0/8".parse().unwrap(),
            }],
            ..Default::default()
        };
        let errs = compute(&one, &over).unwrap_err();
        assert!(errs[0].message.contains("\"old\""), "{}", errs[0]);
    }

    #[test]
    fn features_the_node_cannot_provide_yet_are_errors_not_silence() {
        let spec = net(CalicoNetworkSpec {
            linux_dataplane: Some(LinuxDataplane::Nftables),
            wireguard: Some(Toggle::Enabled),
            ..Default::default()
        });
        let errs = compute(&spec, &ClusterFacts::default()).unwrap_err();
        let reasons: Vec<_> = errs.iter().map(|e| e.reason).collect();
        // WireGuard is one the node provides.
        assert_eq!(reasons, vec!["DataplaneUnavailable"]);
        // The BPF data plane is one the node provides.
        let bpf = net(CalicoNetworkSpec {
            linux_dataplane: Some(LinuxDataplane::BPF),
            ..Default::default()
        });
        let done = compute(&bpf, &ClusterFacts::default()).expect("BPF is accepted");
        assert_eq!(
            done.calico_network.and_then(|n| n.linux_dataplane),
            Some(LinuxDataplane::BPF)
        );
    }

    #[test]
    fn computing_twice_changes_nothing() {
        let once = compute(&InstallationSpec::default(), &ClusterFacts::default()).unwrap();
        assert_eq!(compute(&once, &ClusterFacts::default()).unwrap(), once);
    }
}
