//! Conversion of Kubernetes NetworkPolicy and Caracal (Global)NetworkPolicy into the rule IR, following the
//! semantics in ARCHITECTURE.md: Kubernetes policies live in the `default` tier at order 1000.

use std::collections::BTreeMap;
use std::sync::Arc;

use caracal_crds::policy::{self as crd, PolicyType};
use caracal_crds::schema::{Port, PortSpec, Protocol};
use caracal_crds::selector::{self, Expr};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as k8s;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ir::{
    Action, Direction, EntityMatch, Icmp, Policy, PortMatch, Rule, Scope, ServiceAccountMatch, ServiceRef,
    Tier, TierDefault, order_key,
};

/// The tier policies without `spec.tier` (and every Kubernetes NetworkPolicy) belong to.
pub const DEFAULT_TIER: &str = "default";
/// The default tier's order (Calico's).
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;
/// Where Kubernetes NetworkPolicies sit in the default tier.
pub const K8S_POLICY_ORDER: f64 = 1000.0;

/// A policy that cannot be converted.
#[derive(Debug, thiserror::Error)]
#[error("{policy}: {field}: {message}")]
pub struct ConvertError {
    /// The policy.
    pub policy: String,
    /// The field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// A field Caracal does not enforce (the API server refuses it; this keeps manifests read from files, and
/// objects that reached the datastore another way, from being enforced as something they do not say).
fn unenforced(policy: &str, field: &str, what: &str) -> ConvertError {
    ConvertError {
        policy: policy.into(),
        field: field.into(),
        message: format!(
            "{what} are not enforced by Caracal: remove the field (docs/api.md lists what is refused)"
        ),
    }
}

fn flag_unenforced(policy: &str, field: &str, set: Option<bool>) -> Result<(), ConvertError> {
    if set == Some(true) {
        return Err(ConvertError {
            policy: policy.into(),
            field: field.into(),
            message: "is not enforced by Caracal (there are no host endpoints): remove it".into(),
        });
    }
    Ok(())
}

fn parse(policy: &str, field: &str, text: Option<&str>) -> Result<Option<Expr>, ConvertError> {
    text.map(|t| {
        selector::parse(t).map_err(|e| ConvertError {
            policy: policy.into(),
            field: field.into(),
            message: e.to_string(),
        })
    })
    .transpose()
}

/// A Kubernetes LabelSelector as a selector expression (matchLabels and matchExpressions, all ANDed).
pub fn label_selector(sel: &LabelSelector) -> Expr {
    let mut terms = Vec::new();
    for (k, v) in sel.match_labels.iter().flatten() {
        terms.push(Expr::Eq(k.clone(), v.clone()));
    }
    for req in sel.match_expressions.iter().flatten() {
        let values = req.values.clone().unwrap_or_default().into_iter().collect();
        terms.push(match req.operator.as_str() {
            "In" => Expr::In(req.key.clone(), values),
            "NotIn" => Expr::NotIn(req.key.clone(), values),
            "Exists" => Expr::Has(req.key.clone()),
            // DoesNotExist, and anything unknown fails closed (matches only what lacks the key).
            _ => Expr::Not(Box::new(Expr::Has(req.key.clone()))),
        });
    }
    match terms.len() {
        0 => Expr::All,
        1 => terms.remove(0),
        _ => Expr::And(terms),
    }
}

fn protocol_number(p: &Protocol) -> Option<u8> {
    p.number()
}

fn ports(list: &[Port]) -> Vec<PortMatch> {
    list.iter()
        .filter_map(|p| match p.parse()? {
            PortSpec::Range(lo, hi) => Some(PortMatch::Range(lo, hi)),
            PortSpec::Named(n) => Some(PortMatch::Named(n.to_owned())),
        })
        .collect()
}

fn entity(
    policy: &str,
    field: &str,
    e: Option<&crd::EntityRule>,
    default_scope: &Scope,
    policy_namespace: Option<&str>,
) -> Result<EntityMatch, ConvertError> {
    let Some(e) = e else {
        return Ok(EntityMatch::any(default_scope.clone()));
    };
    if !e.domains.is_empty() {
        return Err(unenforced(policy, &format!("{field}.domains"), "domain matches"));
    }
    let ns_sel = parse(
        policy,
        &format!("{field}.namespaceSelector"),
        e.namespace_selector.as_ref().map(|s| s.as_str()),
    )?;
    let sa = e
        .service_accounts
        .as_ref()
        .map(|s| {
            Ok::<_, ConvertError>(ServiceAccountMatch {
                names: s.names.clone(),
                selector: parse(
                    policy,
                    &format!("{field}.serviceAccounts.selector"),
                    s.selector.as_ref().map(|x| x.as_str()),
                )?,
            })
        })
        .transpose()?;
    Ok(EntityMatch {
        nets: e.nets.iter().map(|n| n.net()).collect(),
        not_nets: e.not_nets.iter().map(|n| n.net()).collect(),
        selector: parse(
            policy,
            &format!("{field}.selector"),
            e.selector.as_ref().map(|s| s.as_str()),
        )?,
        not_selector: parse(
            policy,
            &format!("{field}.notSelector"),
            e.not_selector.as_ref().map(|s| s.as_str()),
        )?,
        scoped: ns_sel.is_some(),
        scope: ns_sel.map_or_else(|| default_scope.clone(), Scope::Selector),
        ports: ports(&e.ports),
        not_ports: ports(&e.not_ports),
        service_accounts: sa.map(Box::new),
        services: e
            .services
            .as_ref()
            .map(|s| {
                let namespace = s
                    .namespace
                    .clone()
                    .or_else(|| policy_namespace.map(str::to_owned))
                    .ok_or_else(|| ConvertError {
                        policy: policy.into(),
                        field: format!("{field}.services.namespace"),
                        message: "a GlobalNetworkPolicy's services match needs a namespace: set it".into(),
                    })?;
                Ok::<_, ConvertError>(ServiceRef {
                    namespace,
                    name: s.name.clone(),
                })
            })
            .transpose()?
            .map(Box::new),
    })
}

fn icmp(f: Option<&crd::IcmpFields>) -> Option<Icmp> {
    f.and_then(|f| {
        f.type_.map(|t| Icmp {
            type_: t,
            code: f.code,
        })
    })
}

fn rules(
    policy: &str,
    dir: &str,
    list: &[crd::PolicyRule],
    scope: &Scope,
    policy_namespace: Option<&str>,
) -> Result<Vec<Rule>, ConvertError> {
    list.iter()
        .enumerate()
        .map(|(i, r)| {
            let field = format!("spec.{dir}[{i}]");
            if r.http.is_some() {
                return Err(unenforced(policy, &format!("{field}.http"), "http (L7) matches"));
            }
            Ok(Rule {
                action: match r.action {
                    crd::Action::Allow => Action::Allow,
                    crd::Action::Deny => Action::Deny,
                    crd::Action::Log => Action::Log,
                    crd::Action::Pass => Action::Pass,
                },
                ip_version: r.ip_version.and_then(|v| u8::try_from(v).ok()),
                protocol: r.protocol.as_ref().and_then(protocol_number),
                not_protocol: r.not_protocol.as_ref().and_then(protocol_number),
                icmp: icmp(r.icmp.as_ref()),
                not_icmp: icmp(r.not_icmp.as_ref()),
                source: entity(
                    policy,
                    &format!("{field}.source"),
                    r.source.as_ref(),
                    scope,
                    policy_namespace,
                )?,
                destination: entity(
                    policy,
                    &format!("{field}.destination"),
                    r.destination.as_ref(),
                    scope,
                    policy_namespace,
                )?,
            })
        })
        .collect()
}

/// `performanceHints: [AssumeNeededOnEveryNode]`.
fn everywhere(hints: &[crd::PerformanceHint]) -> bool {
    hints.contains(&crd::PerformanceHint::AssumeNeededOnEveryNode)
}

/// Kubernetes' and Calico's default for `types`: Ingress, plus Egress when there are egress rules.
fn directions(types: &[PolicyType], has_egress: bool) -> (bool, bool) {
    if types.is_empty() {
        (true, has_egress)
    } else {
        (
            types.contains(&PolicyType::Ingress),
            types.contains(&PolicyType::Egress),
        )
    }
}

/// A Caracal NetworkPolicy in namespace `ns`. Returns (tier, policy).
pub fn caracal_policy(
    ns: &str,
    name: &str,
    spec: &crd::NetworkPolicySpec,
) -> Result<(String, Policy), ConvertError> {
    let display = format!("{ns}/{name}");
    let scope = Scope::Namespace(ns.to_owned());
    let (ing, eg) = directions(&spec.types, !spec.egress.is_empty());
    Ok((
        spec.tier.clone().unwrap_or_else(|| DEFAULT_TIER.into()),
        Policy {
            namespace: Some(ns.to_owned()),
            order: spec.order,
            selector: parse(
                &display,
                "spec.selector",
                spec.selector.as_ref().map(|s| s.as_str()),
            )?
            .unwrap_or(Expr::All),
            namespace_selector: None,
            service_account_selector: parse(
                &display,
                "spec.serviceAccountSelector",
                spec.service_account_selector.as_ref().map(|s| s.as_str()),
            )?,
            ingress: ing
                .then(|| rules(&display, "ingress", &spec.ingress, &scope, Some(ns)))
                .transpose()?,
            egress: eg
                .then(|| rules(&display, "egress", &spec.egress, &scope, Some(ns)))
                .transpose()?,
            everywhere: everywhere(&spec.performance_hints),
            name: display,
        },
    ))
}

/// A Caracal GlobalNetworkPolicy. Returns (tier, policy).
pub fn global_policy(
    name: &str,
    spec: &crd::GlobalNetworkPolicySpec,
) -> Result<(String, Policy), ConvertError> {
    let scope = Scope::Any;
    flag_unenforced(name, "spec.doNotTrack", spec.do_not_track)?;
    flag_unenforced(name, "spec.preDNAT", spec.pre_dnat)?;
    flag_unenforced(name, "spec.applyOnForward", spec.apply_on_forward)?;
    let (ing, eg) = directions(&spec.types, !spec.egress.is_empty());
    Ok((
        spec.tier.clone().unwrap_or_else(|| DEFAULT_TIER.into()),
        Policy {
            namespace: None,
            order: spec.order,
            selector: parse(name, "spec.selector", spec.selector.as_ref().map(|s| s.as_str()))?
                .unwrap_or(Expr::All),
            namespace_selector: parse(
                name,
                "spec.namespaceSelector",
                spec.namespace_selector.as_ref().map(|s| s.as_str()),
            )?,
            service_account_selector: parse(
                name,
                "spec.serviceAccountSelector",
                spec.service_account_selector.as_ref().map(|s| s.as_str()),
            )?,
            ingress: ing
                .then(|| rules(name, "ingress", &spec.ingress, &scope, None))
                .transpose()?,
            egress: eg
                .then(|| rules(name, "egress", &spec.egress, &scope, None))
                .transpose()?,
            everywhere: everywhere(&spec.performance_hints),
            name: name.to_owned(),
        },
    ))
}

fn k8s_peer_rules(
    ns: &str,
    peers: Option<&Vec<k8s::NetworkPolicyPeer>>,
    ports: Option<&Vec<k8s::NetworkPolicyPort>>,
    peer_is_source: bool,
) -> Vec<Rule> {
    // Ports group by protocol: one rule per (peer, protocol).
    let mut by_proto: BTreeMap<u8, Vec<PortMatch>> = BTreeMap::new();
    let mut any_port_protocols = Vec::new();
    for p in ports.into_iter().flatten() {
        let proto = match p.protocol.as_deref().unwrap_or("TCP") {
            "UDP" => 17,
            "SCTP" => 132,
            _ => 6,
        };
        match &p.port {
            None => any_port_protocols.push(proto),
            Some(IntOrString::Int(n)) => {
                let lo = u16::try_from(*n).unwrap_or(0);
                let hi = p.end_port.and_then(|e| u16::try_from(e).ok()).unwrap_or(lo);
                by_proto.entry(proto).or_default().push(PortMatch::Range(lo, hi));
            }
            Some(IntOrString::String(name)) => by_proto
                .entry(proto)
                .or_default()
                .push(PortMatch::Named(name.clone())),
        }
    }
    let port_sets: Vec<(Option<u8>, Vec<PortMatch>)> = if ports.is_none_or(|p| p.is_empty()) {
        vec![(None, Vec::new())]
    } else {
        by_proto
            .into_iter()
            .map(|(p, l)| (Some(p), l))
            .chain(any_port_protocols.into_iter().map(|p| (Some(p), Vec::new())))
            .collect()
    };
    let peer_matches: Vec<EntityMatch> = match peers {
        None => vec![EntityMatch::any(Scope::Any)],
        Some(list) if list.is_empty() => vec![EntityMatch::any(Scope::Any)],
        Some(list) => list
            .iter()
            .map(|peer| {
                let mut m = EntityMatch::any(Scope::Namespace(ns.to_owned()));
                if let Some(block) = &peer.ip_block {
                    m.scope = Scope::Any;
                    m.nets = block.cidr.parse::<IpNet>().into_iter().collect();
                    m.not_nets = block
                        .except
                        .iter()
                        .flatten()
                        .filter_map(|c| c.parse().ok())
                        .collect();
                    return m;
                }
                if let Some(nsel) = &peer.namespace_selector {
                    m.scope = Scope::Selector(label_selector(nsel));
                    m.scoped = true;
                }
                // A podSelector restricts to pods; without one, every pod of the selected namespaces.
                m.selector = Some(peer.pod_selector.as_ref().map_or(Expr::All, label_selector));
                m
            })
            .collect(),
    };
    let mut out = Vec::new();
    for peer in &peer_matches {
        for (proto, ports) in &port_sets {
            let mut port_side = EntityMatch::any(Scope::Any);
            port_side.ports = ports.clone();
            // Ingress: the peer is the source and the ports are the endpoint's (destination) ports.
            // Egress: the peer is the destination, and the ports are the peer's.
            let (source, destination) = if peer_is_source {
                (peer.clone(), port_side)
            } else {
                (
                    EntityMatch::any(Scope::Any),
                    EntityMatch {
                        ports: ports.clone(),
                        ..peer.clone()
                    },
                )
            };
            out.push(Rule {
                action: Action::Allow,
                ip_version: None,
                protocol: *proto,
                not_protocol: None,
                icmp: None,
                not_icmp: None,
                source,
                destination,
            });
        }
    }
    out
}

/// A Kubernetes NetworkPolicy: default tier, order 1000, named `knp.default.<ns>/<name>` as Calico names them.
pub fn k8s_policy(np: &k8s::NetworkPolicy) -> Policy {
    let ns = np.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = np.metadata.name.clone().unwrap_or_default();
    let spec = np.spec.clone().unwrap_or_default();
    let types = spec.policy_types.clone().unwrap_or_else(|| {
        let mut t = vec!["Ingress".to_owned()];
        if spec.egress.is_some() {
            t.push("Egress".into());
        }
        t
    });
    let ingress = types.iter().any(|t| t == "Ingress").then(|| {
        spec.ingress
            .iter()
            .flatten()
            .flat_map(|r| k8s_peer_rules(&ns, r.from.as_ref(), r.ports.as_ref(), true))
            .collect()
    });
    let egress = types.iter().any(|t| t == "Egress").then(|| {
        spec.egress
            .iter()
            .flatten()
            .flat_map(|r| k8s_peer_rules(&ns, r.to.as_ref(), r.ports.as_ref(), false))
            .collect()
    });
    Policy {
        name: format!("knp.default.{ns}/{name}"),
        namespace: Some(ns),
        order: Some(K8S_POLICY_ORDER),
        selector: label_selector(&spec.pod_selector.unwrap_or_default()),
        namespace_selector: None,
        service_account_selector: None,
        ingress,
        egress,
        everywhere: false,
    }
}

/// The order of the tier that holds policies naming a tier that does not exist: before every other tier.
pub const MISSING_TIER_ORDER: f64 = f64::MIN;

/// A tier as its Tier object declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct TierInfo {
    /// Name.
    pub name: String,
    /// Position among tiers (unset sorts last).
    pub order: Option<f64>,
    /// What undecided traffic does.
    pub default_action: TierDefault,
}

/// The implicit `default` tier, present whether or not a Tier object declares it.
pub fn default_tier() -> TierInfo {
    TierInfo {
        name: DEFAULT_TIER.into(),
        order: Some(DEFAULT_TIER_ORDER),
        default_action: TierDefault::Deny,
    }
}

/// A rule that drops everything: what a fail-closed policy holds.
pub fn deny_all() -> Rule {
    Rule {
        action: Action::Deny,
        ip_version: None,
        protocol: None,
        not_protocol: None,
        icmp: None,
        not_icmp: None,
        source: EntityMatch::any(Scope::Any),
        destination: EntityMatch::any(Scope::Any),
    }
}

/// `policy` made fail closed: it keeps what it selects, its directions and its position, and its rules become
/// one Deny, so it can only narrow what is allowed.
pub fn fail_closed(mut policy: Policy) -> Policy {
    for dir in [Direction::Ingress, Direction::Egress] {
        let rules = match dir {
            Direction::Ingress => &mut policy.ingress,
            Direction::Egress => &mut policy.egress,
        };
        if rules.is_some() {
            *rules = Some(vec![deny_all()]);
        }
    }
    policy
}

/// Orders tiers and the policies in each: set orders first, ascending; unset last; ties by name.
pub fn sort_tiers(tiers: &mut [Tier]) {
    tiers.sort_by(|a, b| {
        order_key(a.order, &a.name)
            .partial_cmp(&order_key(b.order, &b.name))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for t in tiers {
        sort_policies(&mut t.policies);
    }
}

/// Orders one tier's policies.
pub fn sort_policies(policies: &mut [Arc<Policy>]) {
    policies.sort_by(|a, b| {
        order_key(a.order, &a.name)
            .partial_cmp(&order_key(b.order, &b.name))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
}

/// Builds the tiers: `tiers`, the implicit default tier, and `policies` placed by tier name.
///
/// A policy naming a tier that does not exist (the webhook refuses them, but a tier can be deleted under its
/// policies, or arrive later) cannot be placed where it belongs, so it fails closed: it goes, with its rules
/// replaced by one Deny ([`fail_closed`]), into a tier of that name evaluated before every other tier
/// ([`MISSING_TIER_ORDER`]). The endpoints it selects lose their traffic (except established flows and the
/// failsafe ports) until the tier exists; nothing is ever allowed because of it.
pub fn build_tiers(
    tiers: &[TierInfo],
    policies: impl IntoIterator<Item = (String, Arc<Policy>)>,
) -> Vec<Tier> {
    let mut out: Vec<Tier> = tiers
        .iter()
        .map(|t| Tier {
            name: t.name.clone(),
            order: t.order,
            default_action: t.default_action,
            policies: Vec::new(),
        })
        .collect();
    if !out.iter().any(|t| t.name == DEFAULT_TIER) {
        let d = default_tier();
        out.push(Tier {
            name: d.name,
            order: d.order,
            default_action: d.default_action,
            policies: Vec::new(),
        });
    }
    let declared = out.len();
    for (tier, policy) in policies {
        match out.iter().position(|t| t.name == tier) {
            Some(i) if i < declared => out[i].policies.push(policy),
            Some(i) => out[i].policies.push(Arc::new(fail_closed((*policy).clone()))),
            None => out.push(Tier {
                name: tier,
                order: Some(MISSING_TIER_ORDER),
                default_action: TierDefault::Deny,
                policies: vec![Arc::new(fail_closed((*policy).clone()))],
            }),
        }
    }
    sort_tiers(&mut out);
    out
}
