//! The policy contract, evaluated offline: for a new connection, the source endpoint's egress side, then the
//! destination endpoint's ingress side; each side walks the tiers in order. Every backend is held to the
//! answers this gives.

use std::fmt;
use std::net::IpAddr;

use caracal_crds::selector::{Expr, NamespaceTarget};

use super::ir::{Action, Direction, EntityMatch, Icmp, Policy, PortMatch, Rule, Scope, TierDefault};
use super::world::{Endpoint, World};

/// The first packet of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number.
    pub protocol: u8,
    /// Source port (TCP/UDP/SCTP).
    pub src_port: Option<u16>,
    /// Destination port (TCP/UDP/SCTP).
    pub dst_port: Option<u16>,
    /// ICMP type and code.
    pub icmp: Option<(u8, u8)>,
}

/// Why a side decided as it did.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// No policy selects the endpoint in this direction: allowed (Kubernetes' default).
    NotSelected,
    /// The packet's address on this side belongs to no endpoint here: nothing to enforce on this side.
    NotAnEndpoint,
    /// A rule decided.
    Rule {
        /// Tier.
        tier: String,
        /// Policy.
        policy: String,
        /// Rule index in the direction's list.
        index: usize,
    },
    /// A tier with selecting policies ended without a decision and its default action is Deny.
    EndOfTier {
        /// Tier.
        tier: String,
    },
    /// Every tier that selected the endpoint passed: the endpoint's profile allows.
    PassedAllTiers,
}

/// One line of the decision path.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Tier.
    pub tier: String,
    /// Policy.
    pub policy: String,
    /// What happened (`rule 2 matched: Pass`, `no rule matched`).
    pub what: String,
}

/// One side's decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Side {
    /// The endpoint (`ns/name`), when the address is one.
    pub endpoint: Option<String>,
    /// Allowed or not.
    pub allowed: bool,
    /// Why.
    pub reason: Reason,
    /// The path through tiers and policies.
    pub steps: Vec<Step>,
}

/// The decision for a packet: both sides must allow.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The source endpoint's egress side.
    pub egress: Side,
    /// The destination endpoint's ingress side.
    pub ingress: Side,
}

impl Decision {
    /// Whether the connection is allowed.
    pub fn allowed(&self) -> bool {
        self.egress.allowed && self.ingress.allowed
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotSelected => f.write_str("no policy selects the endpoint: allowed"),
            Reason::NotAnEndpoint => f.write_str("not a Caracal endpoint: nothing enforced on this side"),
            Reason::Rule { tier, policy, index } => write!(f, "tier {tier}, policy {policy}, rule {index}"),
            Reason::EndOfTier { tier } => write!(
                f,
                "end of tier {tier}: no rule decided, and the tier's default is Deny"
            ),
            Reason::PassedAllTiers => {
                f.write_str("every selecting tier passed: the endpoint's profile allows")
            }
        }
    }
}

/// Whether an address belongs to something `sel` selects within `scope`: an endpoint, or a network set whose
/// nets contain it.
fn selected(world: &World, sel: &Expr, scope: &Scope, ip: IpAddr) -> bool {
    let ns_in_scope = |ns: Option<&str>| match (scope, ns) {
        (Scope::Any, _) => true,
        (Scope::Namespace(want), Some(ns)) => want == ns,
        (Scope::Namespace(_), None) => false,
        (Scope::Selector(nsel), Some(ns)) => {
            nsel.matches_namespace(NamespaceTarget::Namespace(&world.namespace_labels(ns)))
        }
        (Scope::Selector(nsel), None) => nsel.matches_namespace(NamespaceTarget::Global),
    };
    if let Some(ep) = world.endpoint_by_ip(ip)
        && ns_in_scope(Some(&ep.namespace))
        && sel.matches(&ep.labels)
    {
        return true;
    }
    world
        .network_sets
        .values()
        .filter(|s| s.nets.iter().any(|n| n.contains(&ip)))
        .any(|s| ns_in_scope(s.namespace.as_deref()) && sel.matches(&s.labels))
}

fn port_matches(m: &PortMatch, port: u16, protocol: u8, ep: Option<&Endpoint>) -> bool {
    match m {
        PortMatch::Range(lo, hi) => (*lo..=*hi).contains(&port),
        PortMatch::Named(name) => ep.is_some_and(|e| {
            e.ports
                .iter()
                .any(|p| &p.name == name && p.protocol == protocol && p.port == port)
        }),
    }
}

fn entity_matches(
    world: &World,
    m: &EntityMatch,
    ip: IpAddr,
    port: Option<u16>,
    protocol: u8,
    source: bool,
) -> bool {
    if let Some(svc) = &m.services {
        let backends = world.services.get(&(svc.namespace.clone(), svc.name.clone()));
        let hit = backends.is_some_and(|b| {
            if source {
                b.addrs.contains(&ip)
            } else {
                port.is_some_and(|p| b.ports.contains(&(ip, protocol, p)))
            }
        });
        if !hit {
            return false;
        }
    }
    if !m.nets.is_empty() && !m.nets.iter().any(|n| n.contains(&ip)) {
        return false;
    }
    if m.not_nets.iter().any(|n| n.contains(&ip)) {
        return false;
    }
    match &m.selector {
        Some(sel) if !selected(world, sel, &m.scope, ip) => return false,
        None if m.scoped && !selected(world, &Expr::All, &m.scope, ip) => return false,
        _ => {}
    }
    if let Some(not) = &m.not_selector
        && selected(world, not, &m.scope, ip)
    {
        return false;
    }
    let ep = world.endpoint_by_ip(ip);
    if !m.ports.is_empty() && !port.is_some_and(|p| m.ports.iter().any(|x| port_matches(x, p, protocol, ep)))
    {
        return false;
    }
    if let Some(p) = port
        && m.not_ports.iter().any(|x| port_matches(x, p, protocol, ep))
    {
        return false;
    }
    if let Some(sa) = &m.service_accounts {
        let Some(ep) = ep else { return false };
        if !sa.names.is_empty() && !sa.names.contains(&ep.service_account) {
            return false;
        }
        if let Some(sel) = &sa.selector
            && !sel.matches(world.service_account_labels(&ep.namespace, &ep.service_account))
        {
            return false;
        }
    }
    true
}

fn icmp_matches(want: &Icmp, got: Option<(u8, u8)>) -> bool {
    got.is_some_and(|(t, c)| t == want.type_ && want.code.is_none_or(|w| w == c))
}

/// Whether `rule` matches `pkt`.
pub fn rule_matches(world: &World, rule: &Rule, pkt: &Packet) -> bool {
    let version = if pkt.src.is_ipv4() { 4 } else { 6 };
    if rule.ip_version.is_some_and(|v| v != version)
        || rule.protocol.is_some_and(|p| p != pkt.protocol)
        || rule.not_protocol == Some(pkt.protocol)
        || rule.icmp.as_ref().is_some_and(|i| !icmp_matches(i, pkt.icmp))
        || rule.not_icmp.as_ref().is_some_and(|i| icmp_matches(i, pkt.icmp))
    {
        return false;
    }
    entity_matches(world, &rule.source, pkt.src, pkt.src_port, pkt.protocol, true)
        && entity_matches(
            world,
            &rule.destination,
            pkt.dst,
            pkt.dst_port,
            pkt.protocol,
            false,
        )
}

/// Whether `policy` applies to `ep`.
pub fn selects(world: &World, policy: &Policy, ep: &Endpoint) -> bool {
    if policy.namespace.as_ref().is_some_and(|ns| *ns != ep.namespace) {
        return false;
    }
    if let Some(nsel) = &policy.namespace_selector
        && !nsel.matches_namespace(NamespaceTarget::Namespace(&world.namespace_labels(&ep.namespace)))
    {
        return false;
    }
    if !policy.selector.matches(&ep.labels) {
        return false;
    }
    policy
        .service_account_selector
        .as_ref()
        .is_none_or(|sas| sas.matches(world.service_account_labels(&ep.namespace, &ep.service_account)))
}

/// One side: `ep`'s policies in direction `dir` for `pkt`.
pub fn evaluate_side(world: &World, ep: &Endpoint, dir: Direction, pkt: &Packet) -> Side {
    let mut steps = Vec::new();
    let mut any_selected = false;
    let side = |allowed, reason, steps| Side {
        endpoint: Some(ep.key()),
        allowed,
        reason,
        steps,
    };
    'tiers: for tier in &world.tiers {
        let mut tier_selected = false;
        for policy in &tier.policies {
            let Some(rules) = policy.rules(dir) else { continue };
            if !selects(world, policy, ep) {
                continue;
            }
            tier_selected = true;
            let mut decided = false;
            for (index, rule) in rules.iter().enumerate() {
                if !rule_matches(world, rule, pkt) {
                    continue;
                }
                let step = |what: String| Step {
                    tier: tier.name.clone(),
                    policy: policy.name.clone(),
                    what,
                };
                match rule.action {
                    Action::Log => steps.push(step(format!("rule {index} matched: Log, continue"))),
                    Action::Pass => {
                        steps.push(step(format!("rule {index} matched: Pass to the next tier")));
                        any_selected = true;
                        continue 'tiers;
                    }
                    Action::Allow | Action::Deny => {
                        let allowed = rule.action == Action::Allow;
                        steps.push(step(format!(
                            "rule {index} matched: {}",
                            if allowed { "Allow" } else { "Deny" }
                        )));
                        let reason = Reason::Rule {
                            tier: tier.name.clone(),
                            policy: policy.name.clone(),
                            index,
                        };
                        return side(allowed, reason, steps);
                    }
                }
                decided = true;
            }
            if !decided {
                steps.push(Step {
                    tier: tier.name.clone(),
                    policy: policy.name.clone(),
                    what: "no rule matched".into(),
                });
            }
        }
        if tier_selected {
            any_selected = true;
            if tier.default_action == TierDefault::Deny {
                return side(
                    false,
                    Reason::EndOfTier {
                        tier: tier.name.clone(),
                    },
                    steps,
                );
            }
            steps.push(Step {
                tier: tier.name.clone(),
                policy: "-".into(),
                what: "end of tier: default action Pass".into(),
            });
        }
    }
    if any_selected {
        side(true, Reason::PassedAllTiers, steps)
    } else {
        side(true, Reason::NotSelected, steps)
    }
}

/// Evaluates a new connection: the source endpoint's egress, then the destination endpoint's ingress.
pub fn evaluate(world: &World, pkt: &Packet) -> Decision {
    let not_endpoint = || Side {
        endpoint: None,
        allowed: true,
        reason: Reason::NotAnEndpoint,
        steps: Vec::new(),
    };
    let egress = world.endpoint_by_ip(pkt.src).map_or_else(not_endpoint, |ep| {
        evaluate_side(world, ep, Direction::Egress, pkt)
    });
    let ingress = world.endpoint_by_ip(pkt.dst).map_or_else(not_endpoint, |ep| {
        evaluate_side(world, ep, Direction::Ingress, pkt)
    });
    Decision { egress, ingress }
}
