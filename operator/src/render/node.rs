//! caracal-node: its identity and RBAC, the CNI network configuration, its client certificate, and the
//! DaemonSet that runs the agent on every node.

use std::collections::BTreeMap;

use caracal_crds::installation::{InstallationSpec, NodeAddressAutodetection, Toggle};
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HostPathVolumeSource,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Secret, SecretVolumeSource, SecurityContext, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use caracal_crds::imageset::ComponentImage;

use super::common::{self, NAMESPACE, env, identity, meta, probe, rule};
use super::images::image;
use super::{ClusterFacts, Object};

/// Component and object name.
pub const NODE: &str = "caracal-node";
/// The CNI configuration ConfigMap.
pub const CNI_CONFIG: &str = "caracal-cni-config";
/// The conflist file name on hosts.
pub const CONFLIST: &str = "10-caracal.conflist";
/// The agent's health port (Felix's default).
pub const HEALTH_PORT: i32 = 9099;
/// Where the agent serves the CNI plugin, on each host.
pub const AGENT_SOCKET: &str = "/var/run/caracal/cni.sock";

fn node_rules() -> Vec<k8s_openapi::api::rbac::v1::PolicyRule> {
    let read = ["get", "list", "watch"];
    vec![
        rule(
            &[""],
            &["pods", "namespaces", "serviceaccounts", "services", "endpoints"],
            &read,
        ),
        rule(&[""], &["nodes"], &["get", "list", "watch", "patch", "update"]),
        rule(&[""], &["nodes/status"], &["patch", "update"]),
        rule(&["networking.k8s.io"], &["networkpolicies"], &read),
        rule(&["discovery.k8s.io"], &["endpointslices"], &read),
        // Warning Events on objects the agent cannot convert.
        rule(&["", "events.k8s.io"], &["events"], &["create", "patch"]),
        rule(
            &["caracal.dev"],
            &[
                "globalnetworkpolicies",
                "networkpolicies",
                "tiers",
                "globalnetworksets",
                "networksets",
                "felixconfigurations",
                "bgpconfigurations",
                "bgppeers",
                "ippools",
                "ipamconfigurations",
            ],
            &read,
        ),
        rule(
            &["caracal.dev"],
            &["ipamblocks", "blockaffinities", "ipamhandles"],
            &["get", "list", "watch", "create", "update", "patch", "delete"],
        ),
    ]
}

/// The CNI network configuration the install-cni init container writes to each host.
pub fn conflist(spec: &InstallationSpec) -> serde_json::Value {
    let mtu = spec.calico_network.as_ref().and_then(|n| n.mtu).unwrap_or(0);
    serde_json::json!({
        "name": "k8s-pod-network",
        "cniVersion": "1.1.0",
        "plugins": [{
            "type": "caracal",
            "log_level": "info",
            "mtu": mtu,
            "agent_socket": AGENT_SOCKET,
            "ipam": { "type": "caracal" }
        }]
    })
}

/// Calico's `IP_AUTODETECTION_METHOD` syntax for one address family; `none` when unset.
pub fn autodetection(method: Option<&NodeAddressAutodetection>) -> String {
    let Some(m) = method else { return "none".into() };
    if let Some(i) = &m.interface {
        format!("interface={i}")
    } else if let Some(i) = &m.skip_interface {
        format!("skip-interface={i}")
    } else if let Some(r) = &m.can_reach {
        format!("can-reach={r}")
    } else if let Some(c) = &m.cidrs {
        format!(
            "cidr={}",
            c.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
        )
    } else if m.kubernetes.is_some() {
        "kubernetes-internal-ip".into()
    } else if m.first_found == Some(true) {
        "first-found".into()
    } else {
        "none".into()
    }
}

fn host_path(name: &str, path: &str, kind: Option<&str>) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: kind.map(Into::into),
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn toggle(t: Option<Toggle>) -> &'static str {
    if t == Some(Toggle::Enabled) {
        "Enabled"
    } else {
        "Disabled"
    }
}

/// Renders caracal-node's objects.
pub fn render(spec: &InstallationSpec, facts: &ClusterFacts) -> Vec<Object> {
    let net = spec.calico_network.clone().unwrap_or_default();
    let mut out = identity(NODE, node_rules());

    let cni = ConfigMap {
        metadata: meta(NODE, CNI_CONFIG, true),
        data: Some(BTreeMap::from([(
            CONFLIST.to_owned(),
            serde_json::to_string_pretty(&conflist(spec)).unwrap_or_default(),
        )])),
        ..Default::default()
    };
    out.push(Object::from_typed("v1", "ConfigMap", &cni));
    let certs = Secret {
        metadata: meta(NODE, "caracal-node-certs", true),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(common::secret_data(&[
            ("tls.crt", &facts.certificates.node_cert),
            ("tls.key", &facts.certificates.node_key),
        ])),
        ..Default::default()
    };
    out.push(Object::from_typed("v1", "Secret", &certs));

    let metrics_port = i32::from(
        spec.node_metrics_port
            .unwrap_or(super::defaults::DEFAULT_NODE_METRICS_PORT),
    );
    let mut env_vars = vec![
        EnvVar {
            name: "CARACAL_NODE_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        // BGP password Secrets are read in the agent's own namespace.
        EnvVar {
            name: "CARACAL_NAMESPACE".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.namespace".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env(
            "CARACAL_DATAPLANE",
            format!(
                "{:?}",
                net.linux_dataplane
                    .unwrap_or(caracal_crds::installation::LinuxDataplane::Iptables)
            ),
        ),
        // The BPF data plane's pins, on the host's bpffs (the bpffs mount), so they outlive the agent.
        env("CARACAL_BPF_PIN_DIR", "/sys/fs/bpf/caracal"),
        env("CARACAL_BGP", toggle(net.bgp)),
        // No WireGuard variable: the agent takes WireGuard from FelixConfiguration (which the operator
        // renders from the toggle) and turns it on and off without a restart, so the toggle never rolls
        // the DaemonSet.
        env(
            "CARACAL_IPV4_AUTODETECTION",
            autodetection(net.node_address_autodetection_v4.as_ref()),
        ),
        env(
            "CARACAL_IPV6_AUTODETECTION",
            autodetection(net.node_address_autodetection_v6.as_ref()),
        ),
        env("CARACAL_HEALTH_PORT", HEALTH_PORT.to_string()),
        env("CARACAL_METRICS_PORT", metrics_port.to_string()),
        env("CARACAL_CNI_SOCKET", AGENT_SOCKET),
        // The agent's state (IPAM journal, BIRD's files), on the var-lib-caracal host mount.
        env("CARACAL_STATE_DIR", "/var/lib/caracal"),
        // The host's cgroup hierarchy, where the BPF data plane's socket programs go (connect-time load
        // balancing): the host's root, not the container's own cgroup.
        env("CARACAL_BPF_CGROUP", "/host/sys/fs/cgroup"),
        env(
            "CARACAL_TYPHA_SERVICE",
            format!("{}.{NAMESPACE}", super::typha::TYPHA),
        ),
        env("CARACAL_TYPHA_CA_FILE", "/etc/caracal/typha-ca/ca.crt"),
        env("CARACAL_TYPHA_CERT_FILE", "/etc/caracal/node-certs/tls.crt"),
        env("CARACAL_TYPHA_KEY_FILE", "/etc/caracal/node-certs/tls.key"),
        env("CARACAL_TYPHA_SERVER_NAME", super::typha::TYPHA),
    ];
    if let Some(mtu) = net.mtu {
        env_vars.push(env("CARACAL_MTU", mtu.to_string()));
    }
    if let Some(api) = &facts.api_server {
        env_vars.extend(api.env());
    }

    let agent = Container {
        name: NODE.into(),
        image: Some(image(spec, facts, ComponentImage::Node)),
        command: Some(vec!["caracal-node".into()]),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: metrics_port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            privileged: Some(true),
            ..Default::default()
        }),
        liveness_probe: Some(probe("/healthz", HEALTH_PORT, 10, 6)),
        readiness_probe: Some(probe("/readyz", HEALTH_PORT, 5, 3)),
        volume_mounts: Some(vec![
            mount("var-run-caracal", "/var/run/caracal", false),
            mount("var-lib-caracal", "/var/lib/caracal", false),
            mount("bpffs", "/sys/fs/bpf", false),
            mount("host-cgroup", "/host/sys/fs/cgroup", true),
            mount("lib-modules", "/lib/modules", true),
            mount("xtables-lock", "/run/xtables.lock", false),
            mount("typha-ca", "/etc/caracal/typha-ca", true),
            mount("node-certs", "/etc/caracal/node-certs", true),
        ]),
        ..Default::default()
    };
    let install_cni = Container {
        name: "install-cni".into(),
        image: Some(image(spec, facts, ComponentImage::Cni)),
        command: Some(vec!["caracal-cni".into(), "install".into()]),
        env: Some(vec![
            env("CNI_CONF_NAME", CONFLIST),
            env("CNI_CONF_SOURCE", format!("/etc/caracal/cni/{CONFLIST}")),
            env("CNI_BIN_DIR", "/host/opt/cni/bin"),
            env("CNI_NET_DIR", "/host/etc/cni/net.d"),
        ]),
        security_context: Some(SecurityContext {
            privileged: Some(true),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount("cni-bin-dir", "/host/opt/cni/bin", false),
            mount("cni-net-dir", "/host/etc/cni/net.d", false),
            mount("cni-config", "/etc/caracal/cni", true),
        ]),
        ..Default::default()
    };
    let selector = BTreeMap::from([("k8s-app".to_owned(), NODE.to_owned())]);
    let mut pod_labels = common::labels(NODE);
    pod_labels.extend(selector.clone());
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            host_network: Some(true),
            service_account_name: Some(NODE.into()),
            image_pull_secrets: super::pull_secrets::references(spec),
            priority_class_name: Some("system-node-critical".into()),
            termination_grace_period_seconds: Some(5),
            node_selector: Some(BTreeMap::from([(
                "kubernetes.io/os".to_owned(),
                "linux".to_owned(),
            )])),
            tolerations: Some(vec![Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }]),
            init_containers: Some(vec![install_cni]),
            containers: vec![agent],
            volumes: Some(vec![
                host_path("cni-bin-dir", "/opt/cni/bin", Some("DirectoryOrCreate")),
                host_path("cni-net-dir", "/etc/cni/net.d", Some("DirectoryOrCreate")),
                host_path("var-run-caracal", "/var/run/caracal", Some("DirectoryOrCreate")),
                host_path("var-lib-caracal", "/var/lib/caracal", Some("DirectoryOrCreate")),
                host_path("bpffs", "/sys/fs/bpf", Some("DirectoryOrCreate")),
                host_path("host-cgroup", "/sys/fs/cgroup", Some("Directory")),
                // No type, as Calico renders it: a node whose kernel has no modules directory (everything built
                // in) still runs the agent; `Directory` would refuse the pod there.
                host_path("lib-modules", "/lib/modules", None),
                host_path("xtables-lock", "/run/xtables.lock", Some("FileOrCreate")),
                Volume {
                    name: "cni-config".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: CNI_CONFIG.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "typha-ca".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: super::typha::TYPHA_CA.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "node-certs".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some("caracal-node-certs".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
    };
    let over = spec.calico_node_daemon_set.as_ref();
    common::apply_pod_overrides(
        &mut template,
        over.and_then(|o| o.spec.as_ref())
            .and_then(|s| s.template.as_ref()),
    );
    let mut ds_meta = meta(NODE, NODE, true);
    if let Some(m) = over.and_then(|o| o.metadata.as_ref()) {
        common::merge_maps(&mut ds_meta.labels, m.labels.as_ref());
        common::merge_maps(&mut ds_meta.annotations, m.annotations.as_ref());
    }
    let ds = DaemonSet {
        metadata: ds_meta,
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            template,
            update_strategy: spec.node_update_strategy.clone(),
            min_ready_seconds: over
                .and_then(|o| o.spec.as_ref())
                .and_then(|s| s.min_ready_seconds),
            ..Default::default()
        }),
        ..Default::default()
    };
    out.push(Object::from_typed("apps/v1", "DaemonSet", &ds));
    out
}
