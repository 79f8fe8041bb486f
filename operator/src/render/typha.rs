//! caracal-typha: its identity and RBAC, the CA bundle and its server certificate, the Deployment (replicas
//! from the node count), its Service and PodDisruptionBudget.

use std::collections::BTreeMap;

use caracal_crds::installation::InstallationSpec;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, PodAffinityTerm, PodAntiAffinity,
    PodSpec, PodTemplateSpec, Secret, SecretVolumeSource, Service, ServicePort, ServiceSpec, Toleration,
    Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use caracal_crds::imageset::ComponentImage;

use super::common::{self, env, identity, meta, probe, rule};
use super::images::image;
use super::{ClusterFacts, Object};

/// Component, Deployment and Service name.
pub const TYPHA: &str = "caracal-typha";
/// The ConfigMap holding the CA both sides of Typha's mutual TLS trust.
pub const TYPHA_CA: &str = "caracal-typha-ca";
/// Typha's port (Calico's).
pub const TYPHA_PORT: i32 = 5473;
/// Typha's health port (Calico's).
pub const TYPHA_HEALTH_PORT: i32 = 9098;

/// Typha replicas for `nodes` nodes: 1 up to 2 nodes, 2 up to 4, then `nodes / 200 + 2` but at least 3; then
/// clamped by the user's min / max; and never more than the node count (Typha uses the host network, so two
/// replicas cannot share a node).
pub fn typha_replicas(nodes: usize, min: Option<i32>, max: Option<i32>) -> i32 {
    let n = i32::try_from(nodes).unwrap_or(i32::MAX);
    let mut r = match n {
        ..=2 => 1,
        3..=4 => 2,
        _ => (n / 200 + 2).max(3),
    };
    if let Some(min) = min {
        r = r.max(min);
    }
    if let Some(max) = max {
        r = r.min(max);
    }
    r.min(n.max(1))
}

fn typha_rules() -> Vec<k8s_openapi::api::rbac::v1::PolicyRule> {
    let read = ["get", "list", "watch"];
    vec![
        rule(
            &[""],
            &[
                "pods",
                "namespaces",
                "serviceaccounts",
                "nodes",
                "services",
                "endpoints",
            ],
            &read,
        ),
        rule(&["networking.k8s.io"], &["networkpolicies"], &read),
        rule(&["discovery.k8s.io"], &["endpointslices"], &read),
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
                "ipamblocks",
                "blockaffinities",
            ],
            &read,
        ),
    ]
}

/// Renders caracal-typha's objects.
pub fn render(spec: &InstallationSpec, facts: &ClusterFacts) -> Vec<Object> {
    let mut out = identity(TYPHA, typha_rules());
    let ca = ConfigMap {
        metadata: meta(TYPHA, TYPHA_CA, true),
        data: Some(BTreeMap::from([(
            "ca.crt".to_owned(),
            facts.certificates.ca_cert.clone(),
        )])),
        ..Default::default()
    };
    out.push(Object::from_typed("v1", "ConfigMap", &ca));
    let certs = Secret {
        metadata: meta(TYPHA, "caracal-typha-certs", true),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(common::secret_data(&[
            ("tls.crt", &facts.certificates.typha_cert),
            ("tls.key", &facts.certificates.typha_key),
        ])),
        ..Default::default()
    };
    out.push(Object::from_typed("v1", "Secret", &certs));

    let over = spec.typha_deployment.as_ref();
    let over_spec = over.and_then(|o| o.spec.as_ref());
    let replicas = typha_replicas(
        facts.node_count,
        over_spec
            .and_then(|s| s.min_replicas)
            .or(spec.control_plane_replicas),
        over_spec.and_then(|s| s.max_replicas),
    );
    let metrics_port = i32::from(
        spec.typha_metrics_port
            .unwrap_or(super::defaults::DEFAULT_TYPHA_METRICS_PORT),
    );
    let selector = BTreeMap::from([("k8s-app".to_owned(), TYPHA.to_owned())]);
    let mut pod_labels = common::labels(TYPHA);
    pod_labels.extend(selector.clone());
    let container = Container {
        name: TYPHA.into(),
        image: Some(image(spec, facts, ComponentImage::Typha)),
        command: Some(vec!["caracal-typha".into()]),
        env: Some(
            [
                env("CARACAL_TYPHA_PORT", TYPHA_PORT.to_string()),
                env("CARACAL_TYPHA_HEALTH_PORT", TYPHA_HEALTH_PORT.to_string()),
                env("CARACAL_TYPHA_METRICS_PORT", metrics_port.to_string()),
                env("CARACAL_TYPHA_CA_FILE", "/etc/caracal/typha-ca/ca.crt"),
                env("CARACAL_TYPHA_CERT_FILE", "/etc/caracal/typha-certs/tls.crt"),
                env("CARACAL_TYPHA_KEY_FILE", "/etc/caracal/typha-certs/tls.key"),
                env("CARACAL_TYPHA_CLIENT_NAME", super::node::NODE),
            ]
            .into_iter()
            .chain(facts.api_server.iter().flat_map(super::ApiServer::env))
            .collect(),
        ),
        ports: Some(vec![
            ContainerPort {
                name: Some(TYPHA.into()),
                container_port: TYPHA_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: metrics_port,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        liveness_probe: Some(probe("/healthz", TYPHA_HEALTH_PORT, 10, 6)),
        readiness_probe: Some(probe("/readyz", TYPHA_HEALTH_PORT, 5, 3)),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "typha-ca".into(),
                mount_path: "/etc/caracal/typha-ca".into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: "typha-certs".into(),
                mount_path: "/etc/caracal/typha-certs".into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            host_network: Some(true),
            service_account_name: Some(TYPHA.into()),
            image_pull_secrets: super::pull_secrets::references(spec),
            priority_class_name: Some("system-cluster-critical".into()),
            termination_grace_period_seconds: Some(30),
            node_selector: Some(BTreeMap::from([(
                "kubernetes.io/os".to_owned(),
                "linux".to_owned(),
            )])),
            // Every taint, as Calico's Typha: the agents need Typha before any node is Ready (a node is
            // `node.kubernetes.io/not-ready` until its network is), so Typha must start on such a node.
            tolerations: Some(vec![Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }]),
            affinity: Some(Affinity {
                pod_anti_affinity: Some(PodAntiAffinity {
                    preferred_during_scheduling_ignored_during_execution: Some(vec![
                        WeightedPodAffinityTerm {
                            weight: 100,
                            pod_affinity_term: PodAffinityTerm {
                                label_selector: Some(LabelSelector {
                                    match_labels: Some(selector.clone()),
                                    ..Default::default()
                                }),
                                topology_key: "kubernetes.io/hostname".into(),
                                ..Default::default()
                            },
                        },
                    ]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            containers: vec![container],
            volumes: Some(vec![
                Volume {
                    name: "typha-ca".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: TYPHA_CA.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "typha-certs".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some("caracal-typha-certs".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
    };
    common::apply_pod_overrides(&mut template, over_spec.and_then(|s| s.template.as_ref()));
    let mut dep_meta = meta(TYPHA, TYPHA, true);
    if let Some(m) = over.and_then(|o| o.metadata.as_ref()) {
        common::merge_maps(&mut dep_meta.labels, m.labels.as_ref());
        common::merge_maps(&mut dep_meta.annotations, m.annotations.as_ref());
    }
    let deployment = Deployment {
        metadata: dep_meta,
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..Default::default()
            },
            template,
            min_ready_seconds: over_spec.and_then(|s| s.min_ready_seconds),
            // Host-network replicas cannot overlap on a node: replace one at a time, never surge.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(1)),
                    max_surge: Some(IntOrString::Int(0)),
                }),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    out.push(Object::from_typed("apps/v1", "Deployment", &deployment));
    let service = Service {
        metadata: meta(TYPHA, TYPHA, true),
        spec: Some(ServiceSpec {
            selector: Some(selector.clone()),
            ports: Some(vec![ServicePort {
                name: Some(TYPHA.into()),
                port: TYPHA_PORT,
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::String(TYPHA.into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    out.push(Object::from_typed("v1", "Service", &service));
    let pdb = PodDisruptionBudget {
        metadata: meta(TYPHA, TYPHA, true),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    out.push(Object::from_typed("policy/v1", "PodDisruptionBudget", &pdb));
    out
}

#[cfg(test)]
mod tests {
    use super::typha_replicas;

    #[test]
    fn replicas_follow_the_node_count_ladder() {
        let ladder = [
            (0, 1),
            (1, 1),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (200, 3),
            (400, 4),
            (1000, 7),
            (5000, 27),
        ];
        for (nodes, want) in ladder {
            assert_eq!(typha_replicas(nodes, None, None), want, "{nodes} nodes");
        }
    }

    #[test]
    fn user_bounds_clamp_but_never_exceed_the_node_count() {
        assert_eq!(typha_replicas(1000, None, Some(4)), 4);
        assert_eq!(typha_replicas(3, Some(3), None), 3);
        assert_eq!(
            typha_replicas(2, Some(3), None),
            2,
            "two nodes cannot host three host-network replicas"
        );
        assert_eq!(typha_replicas(10, Some(5), Some(6)), 5);
    }
}
