//! The calculation graph: from the policy world and this node's endpoints to the [`DataplaneModel`].
//!
//! [`compute`] is the full computation; [`graph::CalcGraph`] keeps the same result up to date incrementally.
//! Both are pure and run without root.

pub mod graph;

use std::collections::{BTreeMap, BTreeSet};

use caracal_crds::selector::{Expr, NamespaceTarget};

use crate::dataplane::{DataplaneModel, EndpointTiers, LocalEndpoint, SetKey, SetMembers, tier_ref};
use crate::policy::eval::selects;
use crate::policy::ir::{Direction, EntityMatch, PortMatch, Scope};
use crate::policy::model::World;

/// The scope as the text that keys sets.
pub fn scope_text(scope: &Scope) -> String {
    match scope {
        Scope::Any => "any".into(),
        Scope::Namespace(ns) => format!("ns:{ns}"),
        Scope::Selector(e) => format!("nsel:{e}"),
    }
}

/// The sets an entity match references, in the order the renderer uses them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EntitySets {
    /// `selector` (or `All` for a namespaceSelector alone).
    pub selector: Option<SetKey>,
    /// `notSelector`.
    pub not_selector: Option<SetKey>,
    /// `nets`.
    pub nets: Option<SetKey>,
    /// `notNets`.
    pub not_nets: Option<SetKey>,
    /// `serviceAccounts`.
    pub service_accounts: Option<SetKey>,
    /// Named ports in `ports`.
    pub named_ports: Vec<SetKey>,
    /// Named ports in `notPorts`.
    pub not_named_ports: Vec<SetKey>,
}

/// The set keys of one side of a rule (`protocol` is the rule's, for named ports).
pub fn entity_sets(m: &EntityMatch, protocol: Option<u8>) -> EntitySets {
    let selected = |e: &Expr| SetKey::Selected {
        selector: e.to_string(),
        scope: scope_text(&m.scope),
    };
    let named = |ports: &[PortMatch]| {
        ports
            .iter()
            .filter_map(|p| match p {
                PortMatch::Named(n) => Some(SetKey::NamedPort {
                    name: n.clone(),
                    protocol: protocol.unwrap_or(6),
                }),
                PortMatch::Range(..) => None,
            })
            .collect()
    };
    EntitySets {
        selector: m
            .selector
            .as_ref()
            .map(selected)
            .or_else(|| m.scoped.then(|| selected(&Expr::All))),
        not_selector: m.not_selector.as_ref().map(selected),
        nets: (!m.nets.is_empty()).then(|| SetKey::Nets(m.nets.clone())),
        not_nets: (!m.not_nets.is_empty()).then(|| SetKey::Nets(m.not_nets.clone())),
        service_accounts: m.service_accounts.as_ref().map(|sa| SetKey::ServiceAccounts {
            names: sa.names.clone(),
            selector: sa.selector.as_ref().map(ToString::to_string).unwrap_or_default(),
        }),
        named_ports: named(&m.ports),
        not_named_ports: named(&m.not_ports),
    }
}

/// A scope ready to evaluate, with the namespace verdicts cached.
struct ScopeEval<'w> {
    world: &'w World,
    kind: ScopeKind,
    cache: std::collections::HashMap<Option<String>, bool>,
}

enum ScopeKind {
    Any,
    Namespace(String),
    Selector(Option<Expr>),
}

impl<'w> ScopeEval<'w> {
    fn new(world: &'w World, scope: &str) -> Self {
        let kind = if scope == "any" {
            ScopeKind::Any
        } else if let Some(ns) = scope.strip_prefix("ns:") {
            ScopeKind::Namespace(ns.to_owned())
        } else {
            ScopeKind::Selector(
                scope
                    .strip_prefix("nsel:")
                    .and_then(|t| caracal_crds::selector::parse(t).ok()),
            )
        };
        ScopeEval {
            world,
            kind,
            cache: std::collections::HashMap::new(),
        }
    }

    fn contains(&mut self, ns: Option<&str>) -> bool {
        match &self.kind {
            ScopeKind::Any => true,
            ScopeKind::Namespace(want) => ns == Some(want.as_str()),
            ScopeKind::Selector(None) => false,
            ScopeKind::Selector(Some(sel)) => {
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

/// The members of a set among `endpoints` (candidates), plus the world's network sets when `with_sets`.
pub fn members_among<'a>(
    world: &World,
    key: &SetKey,
    endpoints: impl IntoIterator<Item = &'a crate::policy::model::Endpoint>,
    with_sets: bool,
) -> SetMembers {
    let mut out = SetMembers::default();
    match key {
        SetKey::Selected { selector, scope } => {
            let Ok(sel) = caracal_crds::selector::parse(selector) else {
                return out;
            };
            let mut scope = ScopeEval::new(world, scope);
            for ep in endpoints {
                if sel.matches(&ep.labels) && scope.contains(Some(&ep.namespace)) {
                    out.nets.extend(ep.ips.iter().map(|ip| ipnet::IpNet::from(*ip)));
                }
            }
            if with_sets {
                for set in &world.network_sets {
                    if sel.matches(&set.labels) && scope.contains(set.namespace.as_deref()) {
                        out.nets.extend(set.nets.iter().copied());
                    }
                }
            }
        }
        SetKey::Nets(nets) => {
            if with_sets {
                out.nets.extend(nets.iter().copied());
            }
        }
        SetKey::ServiceAccounts { names, selector } => {
            let sel = (!selector.is_empty())
                .then(|| caracal_crds::selector::parse(selector).ok())
                .flatten();
            for ep in endpoints {
                let name_ok = names.is_empty() || names.contains(&ep.service_account);
                let sel_ok = sel.as_ref().is_none_or(|s| {
                    let labels = world
                        .service_accounts
                        .get(&(ep.namespace.clone(), ep.service_account.clone()))
                        .cloned()
                        .unwrap_or_default();
                    s.matches(&labels)
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
    }
    out
}

/// Every set key a rule list references.
pub(crate) fn rule_sets<'a>(
    rules: impl Iterator<Item = &'a crate::policy::ir::Rule>,
    out: &mut BTreeSet<SetKey>,
) {
    for r in rules {
        for side in [&r.source, &r.destination] {
            let s = entity_sets(side, r.protocol);
            out.extend(
                [s.selector, s.not_selector, s.nets, s.not_nets, s.service_accounts]
                    .into_iter()
                    .flatten(),
            );
            out.extend(s.named_ports);
            out.extend(s.not_named_ports);
        }
    }
}

/// The tiers, and in each the policies in order, that apply to `ep` in each direction.
pub fn endpoint_tiers(world: &World, ep: &crate::policy::model::Endpoint) -> EndpointTiers {
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

/// The full computation: which policies apply to which local endpoint, and every referenced set's members.
pub fn compute(world: &World, local: &[LocalEndpoint]) -> DataplaneModel {
    let mut endpoints = local.to_vec();
    endpoints.sort_by(|a, b| a.key.cmp(&b.key));
    let mut model = DataplaneModel {
        endpoints,
        ..Default::default()
    };
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
            if !model.policies.contains_key(name)
                && let Some(p) = world
                    .tiers
                    .iter()
                    .flat_map(|t| t.policies.iter())
                    .find(|p| &p.name == name)
            {
                model.policies.insert(name.clone(), p.clone());
            }
        }
        model.endpoint_tiers.insert(le.iface.clone(), tiers);
    }
    let mut keys = BTreeSet::new();
    for p in model.policies.values() {
        rule_sets(
            p.ingress.iter().flatten().chain(p.egress.iter().flatten()),
            &mut keys,
        );
    }
    model.sets = keys
        .into_iter()
        .map(|k| {
            let m = members(world, &k);
            (k, m)
        })
        .collect::<BTreeMap<_, _>>();
    model
}
