//! The calculation: from the policy world and one node's endpoints to the [`DataplaneModel`].
//!
//! [`compute`] is the full computation, kept as the oracle; [`graph::CalcGraph`] is what the agent runs: it
//! keeps the same result up to date incrementally, doing work proportional to what a change touches, and
//! reports what changed so a backend rewrites only that. Both are pure and run without root.

pub mod graph;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use caracal_crds::selector::NamespaceTarget;

use crate::eval::selects;
use crate::ir::{Direction, Scope};
use crate::model::{DataplaneModel, EndpointTiers, LocalEndpoint, SetKey, SetMembers, policy_sets, tier_ref};
use crate::world::{Endpoint, World};

/// A scope ready to evaluate, with the namespace verdicts cached.
pub(crate) struct ScopeEval<'w> {
    world: &'w World,
    scope: &'w Scope,
    cache: HashMap<Option<String>, bool>,
}

impl<'w> ScopeEval<'w> {
    pub(crate) fn new(world: &'w World, scope: &'w Scope) -> Self {
        ScopeEval {
            world,
            scope,
            cache: HashMap::new(),
        }
    }

    pub(crate) fn contains(&mut self, ns: Option<&str>) -> bool {
        match self.scope {
            Scope::Any => true,
            Scope::Namespace(want) => ns == Some(want.as_str()),
            Scope::Selector(sel) => {
                let key = ns.map(str::to_owned);
                if let Some(v) = self.cache.get(&key) {
                    return *v;
                }
                let v = match ns {
                    Some(ns) => {
                        sel.matches_namespace(NamespaceTarget::Namespace(&self.world.namespace_labels(ns)))
                    }
                    None => sel.matches_namespace(NamespaceTarget::Global),
                };
                self.cache.insert(key, v);
                v
            }
        }
    }
}

/// The members of a set in `world`.
pub fn members(world: &World, key: &SetKey) -> SetMembers {
    members_among(world, key, &world.endpoints, true)
}

/// The members of a set among `endpoints` (candidates), plus what the world holds beside endpoints (network
/// sets, literal nets, Services) when `with_rest`.
pub fn members_among<'a>(
    world: &World,
    key: &SetKey,
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
    with_rest: bool,
) -> SetMembers {
    let mut out = SetMembers::default();
    match key {
        SetKey::Selected { selector, scope } => {
            let mut scope = ScopeEval::new(world, scope);
            for ep in endpoints {
                if selector.matches(&ep.labels) && scope.contains(Some(&ep.namespace)) {
                    out.nets.extend(ep.ips.iter().map(|ip| ipnet::IpNet::from(*ip)));
                }
            }
            if with_rest {
                for set in world.network_sets.values() {
                    if selector.matches(&set.labels) && scope.contains(set.namespace.as_deref()) {
                        out.nets.extend(set.nets.iter().copied());
                    }
                }
            }
        }
        SetKey::Nets(nets) => {
            if with_rest {
                out.nets.extend(nets.iter().copied());
            }
        }
        SetKey::ServiceAccounts { names, selector } => {
            for ep in endpoints {
                let name_ok = names.is_empty() || names.contains(&ep.service_account);
                let sel_ok = selector.as_ref().is_none_or(|s| {
                    s.matches(world.service_account_labels(&ep.namespace, &ep.service_account))
                });
                if name_ok && sel_ok {
                    out.nets.extend(ep.ips.iter().map(|ip| ipnet::IpNet::from(*ip)));
                }
            }
        }
        SetKey::NamedPort { name, protocol } => {
            for ep in endpoints {
                for p in ep
                    .ports
                    .iter()
                    .filter(|p| &p.name == name && p.protocol == *protocol)
                {
                    out.ip_ports
                        .extend(ep.ips.iter().map(|ip| (*ip, p.protocol, p.port)));
                }
            }
        }
        SetKey::Service { namespace, name } => {
            if with_rest && let Some(b) = world.services.get(&(namespace.clone(), name.clone())) {
                out.nets.extend(b.addrs.iter().map(|ip| ipnet::IpNet::from(*ip)));
            }
        }
        SetKey::ServicePorts { namespace, name } => {
            if with_rest && let Some(b) = world.services.get(&(namespace.clone(), name.clone())) {
                out.ip_ports.extend(b.ports.iter().copied());
            }
        }
    }
    out
}

/// The tiers, and in each the policies in order, that apply to `ep` in each direction.
pub fn endpoint_tiers(world: &World, ep: &Endpoint) -> EndpointTiers {
    let mut tiers = EndpointTiers::default();
    for dir in [Direction::Ingress, Direction::Egress] {
        for tier in &world.tiers {
            let names: Vec<String> = tier
                .policies
                .iter()
                .filter(|p| p.rules(dir).is_some() && selects(world, p, ep))
                .map(|p| p.name.clone())
                .collect();
            if !names.is_empty() {
                let list = if dir == Direction::Ingress {
                    &mut tiers.ingress
                } else {
                    &mut tiers.egress
                };
                list.push(tier_ref(tier, names));
            }
        }
    }
    tiers
}

/// The local endpoints of `node` in `world`, their host interfaces named by `iface`.
pub fn local_endpoints(world: &World, node: &str, iface: impl Fn(&Endpoint) -> String) -> Vec<LocalEndpoint> {
    world
        .endpoints
        .iter()
        .filter(|e| e.node.as_deref() == Some(node))
        .map(|e| LocalEndpoint {
            key: e.key(),
            iface: iface(e),
            ips: e.ips.clone(),
        })
        .collect()
}

/// The full computation: which policies apply to which local endpoint, and every referenced set's members.
/// Policies marked [`crate::ir::Policy::everywhere`] (`performanceHints: [AssumeNeededOnEveryNode]`) are in
/// the model whether or not a local endpoint uses them.
pub fn compute(world: &World, local: &[LocalEndpoint]) -> DataplaneModel {
    let mut endpoints = local.to_vec();
    endpoints.sort_by(|a, b| a.key.cmp(&b.key));
    let mut model = DataplaneModel {
        endpoints,
        ..Default::default()
    };
    let by_name: BTreeMap<&str, &crate::ir::Policy> = world
        .tiers
        .iter()
        .flat_map(|t| t.policies.iter())
        .map(|p| (p.name.as_str(), &**p))
        .collect();
    for le in local {
        let Some(ep) = world.endpoints.iter().find(|e| e.key() == le.key) else {
            // Not known to the datastore (yet): no policy selects it; the dispatch chain still has it.
            model
                .endpoint_tiers
                .insert(le.iface.clone(), EndpointTiers::default());
            continue;
        };
        let tiers = endpoint_tiers(world, ep);
        for name in tiers
            .ingress
            .iter()
            .chain(tiers.egress.iter())
            .flat_map(|t| t.policies.iter())
        {
            if let Some(p) = by_name.get(name.as_str()) {
                model.policies.insert(name.clone(), (*p).clone());
            }
        }
        model.endpoint_tiers.insert(le.iface.clone(), tiers);
    }
    for p in by_name.values().filter(|p| p.everywhere) {
        model.policies.insert(p.name.clone(), (*p).clone());
    }
    let keys: BTreeSet<SetKey> = model.policies.values().flat_map(policy_sets).collect();
    model.sets = keys
        .into_iter()
        .map(|k| {
            let m = members(world, &k);
            (k, m)
        })
        .collect();
    model
}
