//! The incremental calculation graph: keeps the [`DataplaneModel`] of one node up to date as endpoints,
//! policies and namespaces change, doing work proportional to what a change touches:
//!
//! - a label index (`key=value` and `key` -> endpoints) narrows which endpoints a selector can match, so a
//!   set's members are computed from candidates, not from every endpoint in the cluster;
//! - an endpoint change re-checks only that endpoint against the sets (and, if it is local, the policies);
//! - a policy change re-checks only the local endpoints against that policy, and computes only sets that no
//!   other policy already keeps.
//!
//! [`CalcGraph::full`] and the incremental updates always agree (tested by comparing against
//! [`super::compute`] after every change).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use caracal_crds::selector::Expr;

use super::{endpoint_tiers, members, members_among, rule_sets};
use crate::dataplane::{DataplaneModel, EndpointTiers, LocalEndpoint, SetKey};
use crate::policy::eval::selects;
use crate::policy::ir::{Policy, Tier, TierDefault, order_key};
use crate::policy::model::{Endpoint, Labels, World};

/// Endpoint keys by label, for narrowing selector evaluation.
#[derive(Debug, Default)]
struct LabelIndex {
    by_pair: HashMap<(String, String), BTreeSet<String>>,
    by_key: HashMap<String, BTreeSet<String>>,
}

impl LabelIndex {
    fn add(&mut self, ep: &str, labels: &Labels) {
        for (k, v) in labels {
            self.by_pair
                .entry((k.clone(), v.clone()))
                .or_default()
                .insert(ep.to_owned());
            self.by_key.entry(k.clone()).or_default().insert(ep.to_owned());
        }
    }

    fn remove(&mut self, ep: &str, labels: &Labels) {
        for (k, v) in labels {
            if let Some(s) = self.by_pair.get_mut(&(k.clone(), v.clone())) {
                s.remove(ep);
            }
            if let Some(s) = self.by_key.get_mut(k) {
                s.remove(ep);
            }
        }
    }

    /// Endpoints that can match `e`, or None when the selector cannot be narrowed (it may match endpoints
    /// lacking every label it names, as `!=`, `not in`, `!` and `all()` do).
    fn candidates(&self, e: &Expr) -> Option<BTreeSet<String>> {
        match e {
            Expr::Eq(k, v) => Some(
                self.by_pair
                    .get(&(k.clone(), v.clone()))
                    .cloned()
                    .unwrap_or_default(),
            ),
            Expr::In(k, vs) => Some(
                vs.iter()
                    .flat_map(|v| {
                        self.by_pair
                            .get(&(k.clone(), v.clone()))
                            .cloned()
                            .unwrap_or_default()
                    })
                    .collect(),
            ),
            Expr::Has(k) | Expr::Contains(k, _) | Expr::StartsWith(k, _) | Expr::EndsWith(k, _) => {
                Some(self.by_key.get(k).cloned().unwrap_or_default())
            }
            Expr::And(es) => es
                .iter()
                .filter_map(|x| self.candidates(x))
                .min_by_key(BTreeSet::len),
            Expr::Or(es) => es
                .iter()
                .map(|x| self.candidates(x))
                .collect::<Option<Vec<_>>>()
                .map(|v| v.into_iter().flatten().collect()),
            _ => None,
        }
    }
}

/// The graph.
#[derive(Debug)]
pub struct CalcGraph {
    world: World,
    by_key: BTreeMap<String, usize>,
    index: LabelIndex,
    local: BTreeMap<String, LocalEndpoint>,
    model: DataplaneModel,
    /// How many policies in `model.policies` reference each set.
    set_refs: BTreeMap<SetKey, usize>,
}

fn policy_sets(p: &Policy) -> BTreeSet<SetKey> {
    let mut out = BTreeSet::new();
    rule_sets(
        p.ingress.iter().flatten().chain(p.egress.iter().flatten()),
        &mut out,
    );
    out
}

impl CalcGraph {
    /// Builds the graph and computes the model in full.
    pub fn full(world: World, local: &[LocalEndpoint]) -> Self {
        let mut g = CalcGraph {
            by_key: BTreeMap::new(),
            index: LabelIndex::default(),
            local: local.iter().map(|l| (l.key.clone(), l.clone())).collect(),
            model: DataplaneModel {
                endpoints: Vec::new(),
                ..Default::default()
            },
            set_refs: BTreeMap::new(),
            world,
        };
        for (i, ep) in g.world.endpoints.iter().enumerate() {
            g.by_key.insert(ep.key(), i);
            g.index.add(&ep.key(), &ep.labels);
        }
        g.model.endpoints = g.local.values().cloned().collect();
        let keys: std::collections::BTreeSet<String> = g.local.keys().cloned().collect();
        g.refresh_locals(keys, None);
        g
    }

    /// The current model.
    pub fn model(&self) -> &DataplaneModel {
        &self.model
    }

    /// The world as the graph sees it.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Members of a set, narrowed by the label index.
    fn compute_set(&self, key: &SetKey) -> crate::dataplane::SetMembers {
        if let SetKey::Selected { selector, .. } = key
            && let Ok(sel) = caracal_crds::selector::parse(selector)
            && let Some(cands) = self.index.candidates(&sel)
        {
            let eps = cands
                .iter()
                .filter_map(|k| self.by_key.get(k).map(|i| &self.world.endpoints[*i]));
            return members_among(&self.world, key, eps, true);
        }
        members(&self.world, key)
    }

    fn reference(&mut self, p: &Policy) {
        for key in policy_sets(p) {
            let n = self.set_refs.entry(key.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                let m = self.compute_set(&key);
                self.model.sets.insert(key, m);
            }
        }
    }

    fn unreference(&mut self, p: &Policy) {
        for key in policy_sets(p) {
            if let Some(n) = self.set_refs.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.set_refs.remove(&key);
                    self.model.sets.remove(&key);
                }
            }
        }
    }

    /// The tiers and policies that apply to endpoint `key`.
    fn tiers_for(&self, key: &str) -> EndpointTiers {
        self.by_key
            .get(key)
            .map(|i| endpoint_tiers(&self.world, &self.world.endpoints[*i]))
            .unwrap_or_default()
    }

    /// Recomputes which policies select local endpoint `key`, and drops policies nobody uses any more.
    fn refresh_local(&mut self, key: &str) {
        let Some(le) = self.local.get(key).cloned() else {
            return;
        };
        let tiers = self.tiers_for(key);
        self.model.endpoint_tiers.insert(le.iface, tiers);
        self.sync_policies(None);
    }

    /// Makes `model.policies` exactly the policies some local endpoint uses, (un)referencing their sets.
    /// `changed` names a policy whose content may have changed (it is replaced if still used).
    fn sync_policies(&mut self, changed: Option<&str>) {
        let used: BTreeSet<String> = self
            .model
            .endpoint_tiers
            .values()
            .flat_map(|t| t.ingress.iter().chain(t.egress.iter()))
            .flat_map(|t| t.policies.iter().cloned())
            .collect();
        let stale: Vec<String> = self
            .model
            .policies
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        for name in stale {
            if let Some(p) = self.model.policies.remove(&name) {
                self.unreference(&p);
            }
        }
        let missing: Vec<String> = used
            .iter()
            .filter(|n| !self.model.policies.contains_key(*n) || Some(n.as_str()) == changed)
            .cloned()
            .collect();
        for name in missing {
            let Some(p) = self.find_policy(&name) else {
                continue;
            };
            match self.model.policies.insert(name, p.clone()) {
                Some(old) if old == p => {}
                Some(old) => {
                    self.reference(&p);
                    self.unreference(&old);
                }
                None => self.reference(&p),
            }
        }
    }

    /// Re-checks one endpoint's membership of every kept set: additions are applied directly; when the
    /// endpoint leaves a set (or changes its addresses) the set is recomputed from its index candidates,
    /// because another member may hold the same address.
    fn refresh_membership(&mut self, old: Option<&Endpoint>, new: Option<&Endpoint>) {
        let keys: Vec<SetKey> = self.model.sets.keys().cloned().collect();
        for key in keys {
            let was = members_among(&self.world, &key, old, false);
            let is = members_among(&self.world, &key, new, false);
            if was == is {
                continue;
            }
            let only_additions = was.nets.is_subset(&is.nets) && was.ip_ports.is_subset(&is.ip_ports);
            if only_additions {
                if let Some(set) = self.model.sets.get_mut(&key) {
                    set.nets.extend(is.nets);
                    set.ip_ports.extend(is.ip_ports);
                }
            } else {
                let m = self.compute_set(&key);
                self.model.sets.insert(key, m);
            }
        }
    }

    /// Adds or changes an endpoint (labels, addresses, ports).
    pub fn upsert_endpoint(&mut self, ep: Endpoint) {
        let key = ep.key();
        let old = match self.by_key.get(&key) {
            Some(i) => {
                let old = std::mem::replace(&mut self.world.endpoints[*i], ep.clone());
                self.index.remove(&key, &old.labels);
                Some(old)
            }
            None => {
                self.by_key.insert(key.clone(), self.world.endpoints.len());
                self.world.endpoints.push(ep.clone());
                None
            }
        };
        self.index.add(&key, &ep.labels);
        self.refresh_membership(old.as_ref(), Some(&ep));
        if self.local.contains_key(&key) {
            self.refresh_local(&key);
        }
    }

    /// Removes an endpoint.
    pub fn remove_endpoint(&mut self, key: &str) {
        let Some(i) = self.by_key.remove(key) else { return };
        let old = self.world.endpoints.swap_remove(i);
        if let Some(moved) = self.world.endpoints.get(i) {
            self.by_key.insert(moved.key(), i);
        }
        self.index.remove(key, &old.labels);
        self.refresh_membership(Some(&old), None);
        if self.local.contains_key(key) {
            self.refresh_local(key);
        }
    }

    /// Adds or replaces a policy in `tier` (created with default Deny if it does not exist). Only local
    /// endpoints the old or new version selects are re-checked.
    pub fn upsert_policy(&mut self, tier: &str, policy: Policy) {
        let old = self.find_policy(&policy.name);
        for t in &mut self.world.tiers {
            t.policies.retain(|p| p.name != policy.name);
        }
        if !self.world.tiers.iter().any(|t| t.name == tier) {
            self.world.tiers.push(Tier {
                name: tier.to_owned(),
                order: None,
                default_action: TierDefault::Deny,
                policies: Vec::new(),
            });
        }
        let name = policy.name.clone();
        let affected = self
            .selected_locals(old.as_ref())
            .into_iter()
            .chain(self.selected_locals(Some(&policy)))
            .collect();
        if let Some(t) = self.world.tiers.iter_mut().find(|t| t.name == tier) {
            t.policies.push(policy);
            t.policies.sort_by(|a, b| {
                order_key(a.order, &a.name)
                    .partial_cmp(&order_key(b.order, &b.name))
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
        }
        self.refresh_locals(affected, Some(&name));
    }

    /// Removes a policy; only the local endpoints it selected are re-checked.
    pub fn remove_policy(&mut self, name: &str) {
        let old = self.find_policy(name);
        let affected = self.selected_locals(old.as_ref());
        for t in &mut self.world.tiers {
            t.policies.retain(|p| p.name != name);
        }
        self.refresh_locals(affected, None);
    }

    /// Changes a namespace's labels. Namespace selectors can move whole sets and policies, so this
    /// recomputes the model in full (namespace label edits are rare next to pod and policy churn).
    pub fn set_namespace_labels(&mut self, ns: &str, labels: Labels) {
        self.world.namespaces.insert(ns.to_owned(), labels);
        let local: Vec<LocalEndpoint> = self.local.values().cloned().collect();
        *self = CalcGraph::full(std::mem::take(&mut self.world), &local);
    }

    fn find_policy(&self, name: &str) -> Option<Policy> {
        self.world
            .tiers
            .iter()
            .flat_map(|t| t.policies.iter())
            .find(|p| p.name == name)
            .cloned()
    }

    /// Local endpoint keys `policy` selects.
    fn selected_locals(&self, policy: Option<&Policy>) -> BTreeSet<String> {
        let Some(p) = policy else { return BTreeSet::new() };
        self.local
            .keys()
            .filter(|k| {
                self.by_key
                    .get(*k)
                    .is_some_and(|i| selects(&self.world, p, &self.world.endpoints[*i]))
            })
            .cloned()
            .collect()
    }

    fn refresh_locals(&mut self, keys: BTreeSet<String>, changed: Option<&str>) {
        for k in &keys {
            let Some(le) = self.local.get(k).cloned() else {
                continue;
            };
            let tiers = self.tiers_for(k);
            self.model.endpoint_tiers.insert(le.iface, tiers);
        }
        self.sync_policies(changed);
    }
}
