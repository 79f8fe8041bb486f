//! The incremental calculation graph the agent runs: it holds the policy world as converted inputs arrive
//! ([`CalcGraph::apply`]), keeps one node's [`DataplaneModel`] up to date, and records what each change did to
//! the model ([`Changes`]) so a backend rewrites only that. Work follows the change, not the cluster:
//!
//! - a label index (`key=value` and `key` -> endpoints) narrows which endpoints a selector can match, so a
//!   set's members are computed from candidates, not from every endpoint in the cluster;
//! - an endpoint change re-checks only that endpoint against the kept sets (and, if it is local, the
//!   policies);
//! - a policy change re-checks only the local endpoints it selected or selects, and computes only sets that
//!   no other policy already keeps;
//! - namespace, service-account, network-set and Service changes recompute only the sets (and re-check only
//!   the local endpoints) they can affect; tier changes, which are rare, re-check every local endpoint.
//!
//! The graph and [`super::compute`] over the same objects always agree: a property test drives the graph with
//! thousands of random changes and compares after each.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use caracal_crds::selector::Expr;

use super::{ScopeEval, endpoint_tiers, members, members_among};
use crate::convert::{self, DEFAULT_TIER, TierInfo};
use crate::decode::{Input, Slice};
use crate::eval::selects;
use crate::ir::{Policy, Scope};
use crate::labels::Name;
use crate::model::{DataplaneModel, LocalEndpoint, SetKey, SetMembers, policy_sets};
use crate::world::{Endpoint, Labels, NetworkSet, ServiceBackends, World};

/// Endpoints by label, for narrowing selector evaluation: `key=value` and `key` -> positions in
/// `world.endpoints` (small integers, not keys: the index costs a few bytes per label of each endpoint).
#[derive(Debug, Default)]
struct LabelIndex {
    keys: HashMap<Name, KeyIndex>,
}

/// One label key: the endpoints that have it, and those with each of its values.
type KeyIndex = (BTreeSet<u32>, HashMap<Name, BTreeSet<u32>>);

impl LabelIndex {
    fn add(&mut self, ep: u32, labels: &Labels) {
        for (k, v) in labels.iter() {
            let (all, by_value) = self.keys.entry(k.clone()).or_default();
            all.insert(ep);
            by_value.entry(v.clone()).or_default().insert(ep);
        }
    }

    fn remove(&mut self, ep: u32, labels: &Labels) {
        for (k, v) in labels.iter() {
            let Some((all, by_value)) = self.keys.get_mut(k) else {
                continue;
            };
            all.remove(&ep);
            if let Some(s) = by_value.get_mut(v) {
                s.remove(&ep);
                if s.is_empty() {
                    by_value.remove(v);
                }
            }
            if all.is_empty() {
                self.keys.remove(k);
            }
        }
    }

    /// Endpoints that can match `e`, or None when the selector cannot be narrowed (it may match endpoints
    /// lacking every label it names, as `!=`, `not in`, `!` and `all()` do).
    fn candidates(&self, e: &Expr) -> Option<BTreeSet<u32>> {
        let pair = |k: &str, v: &str| {
            self.keys
                .get(k)
                .and_then(|(_, by_value)| by_value.get(v))
                .cloned()
                .unwrap_or_default()
        };
        match e {
            Expr::Eq(k, v) => Some(pair(k, v)),
            Expr::In(k, vs) => Some(vs.iter().flat_map(|v| pair(k, v)).collect()),
            Expr::Has(k) | Expr::Contains(k, _) | Expr::StartsWith(k, _) | Expr::EndsWith(k, _) => Some(
                self.keys
                    .get(k.as_str())
                    .map(|(all, _)| all.clone())
                    .unwrap_or_default(),
            ),
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

fn slot(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// What changes did to the model since the last [`CalcGraph::take_changes`]: a backend rewrites exactly
/// these and keeps the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Sets added or removed (rendered whole).
    pub sets: BTreeSet<SetKey>,
    /// Members added to and removed from sets that existed before and still exist (not in `sets`): a
    /// backend writes only these, so a pod joining a set of 10,000 costs one member, not 10,000.
    pub members: BTreeMap<SetKey, MemberDelta>,
    /// Policies added, removed, or whose rules changed.
    pub policies: BTreeSet<String>,
    /// Local endpoint interfaces added, removed, or whose tiers changed.
    pub endpoints: BTreeSet<String>,
    /// natOutgoing changed (rendered whole: a few pools).
    pub nat: bool,
    /// What a pod's traffic to its host meets changed.
    pub endpoint_to_host: bool,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
            && self.members.is_empty()
            && self.policies.is_empty()
            && self.endpoints.is_empty()
            && !self.nat
            && !self.endpoint_to_host
    }

    /// Adds `other`'s changes (which came after these) to these.
    pub fn merge(&mut self, other: Changes) {
        self.nat |= other.nat;
        self.endpoint_to_host |= other.endpoint_to_host;
        for key in other.sets {
            self.members.remove(&key);
            self.sets.insert(key);
        }
        for (key, delta) in other.members {
            self.add_delta(key, delta.added, delta.removed);
        }
        self.policies.extend(other.policies);
        self.endpoints.extend(other.endpoints);
    }

    /// Records members added to and removed from `key`, after what is recorded already.
    fn add_delta(&mut self, key: SetKey, added: SetMembers, removed: SetMembers) {
        if self.sets.contains(&key) {
            return;
        }
        let d = self.members.entry(key.clone()).or_default();
        cancel_or_add(added.nets, &mut d.removed.nets, &mut d.added.nets);
        cancel_or_add(added.ip_ports, &mut d.removed.ip_ports, &mut d.added.ip_ports);
        cancel_or_add(removed.nets, &mut d.added.nets, &mut d.removed.nets);
        cancel_or_add(removed.ip_ports, &mut d.added.ip_ports, &mut d.removed.ip_ports);
        if d.added == SetMembers::default() && d.removed == SetMembers::default() {
            self.members.remove(&key);
        }
    }
}

/// Each item cancels its opposite in `undo` (a member added, then removed) or joins `into`.
fn cancel_or_add<T: Ord>(items: BTreeSet<T>, undo: &mut BTreeSet<T>, into: &mut BTreeSet<T>) {
    for x in items {
        if !undo.remove(&x) {
            into.insert(x);
        }
    }
}

/// What changed in one set's members.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberDelta {
    /// Members that joined.
    pub added: SetMembers,
    /// Members that left.
    pub removed: SetMembers,
}

fn difference(a: &SetMembers, b: &SetMembers) -> SetMembers {
    SetMembers {
        nets: a.nets.difference(&b.nets).copied().collect(),
        ip_ports: a.ip_ports.difference(&b.ip_ports).copied().collect(),
    }
}

/// Which policies' content a sync must compare again.
#[derive(Clone, Copy)]
enum Changed<'a> {
    None,
    One(&'a str),
    All,
}

/// How the host side of a local endpoint's interface is named (the CNI plugin decides).
pub type IfaceName = Box<dyn Fn(&Endpoint) -> String + Send + Sync>;

/// The graph.
pub struct CalcGraph {
    node: String,
    iface: IfaceName,
    world: World,
    by_key: HashMap<String, usize>,
    index: LabelIndex,
    tiers: BTreeMap<String, TierInfo>,
    /// Every policy as converted, by name, with the tier it declares (`world.tiers` holds what is
    /// enforced: the same, or its fail-closed form while its tier is missing).
    policies: BTreeMap<String, (String, Arc<Policy>)>,
    /// Policies programmed whether or not a local endpoint uses them.
    everywhere: BTreeSet<String>,
    /// EndpointSlices by (namespace, slice name).
    slices: BTreeMap<(String, String), Slice>,
    /// IP pools by name (natOutgoing).
    pools: BTreeMap<String, crate::model::PoolNat>,
    local: BTreeMap<String, LocalEndpoint>,
    model: DataplaneModel,
    /// How many policies in `model.policies` reference each set.
    set_refs: BTreeMap<SetKey, usize>,
    /// How many times `model.endpoint_tiers` names each policy (kept with it, so that a pod's change does
    /// not recount every local endpoint's policies).
    policy_uses: BTreeMap<String, usize>,
    /// Policies whose use count or `everywhere` membership changed since the last `sync_policies`.
    uses_changed: BTreeSet<String>,
    changes: Changes,
}

impl std::fmt::Debug for CalcGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CalcGraph")
            .field("node", &self.node)
            .field("endpoints", &self.world.endpoints.len())
            .field("local", &self.local.len())
            .field("policies", &self.policies.len())
            .field("sets", &self.model.sets.len())
            .finish_non_exhaustive()
    }
}

impl CalcGraph {
    /// An empty graph for `node`, naming local interfaces with `iface`.
    pub fn new(node: &str, iface: IfaceName) -> Self {
        let world = World {
            tiers: convert::build_tiers(&[], Vec::new()),
            ..World::default()
        };
        CalcGraph {
            node: node.to_owned(),
            iface,
            world,
            by_key: HashMap::new(),
            index: LabelIndex::default(),
            tiers: BTreeMap::new(),
            policies: BTreeMap::new(),
            everywhere: BTreeSet::new(),
            slices: BTreeMap::new(),
            pools: BTreeMap::new(),
            local: BTreeMap::new(),
            model: DataplaneModel::default(),
            set_refs: BTreeMap::new(),
            policy_uses: BTreeMap::new(),
            uses_changed: BTreeSet::new(),
            changes: Changes::default(),
        }
    }

    /// The current model.
    pub fn model(&self) -> &DataplaneModel {
        &self.model
    }

    /// The world as the graph sees it.
    pub fn world(&self) -> &World {
        &self.world
    }

    /// What changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Applies one converted object, stored under `key` (`namespace/name` or `name`).
    pub fn apply(&mut self, key: &str, input: Input) {
        match input {
            Input::Namespace { name, labels } => self.set_namespace(&name, Some(labels)),
            Input::Pod(ep) => self.upsert_endpoint(ep),
            Input::NotAnEndpoint => self.remove_endpoint(key),
            Input::ServiceAccount {
                namespace,
                name,
                labels,
            } => self.set_service_account(&namespace, &name, Some(labels)),
            Input::NetworkSet(set) => {
                self.set_network_set(set.namespace.clone(), &set.name.clone(), Some(set))
            }
            Input::Tier(t) => self.set_tier(&t.name.clone(), Some(t)),
            Input::Policy { tier, policy } => self.upsert_policy(&tier, policy),
            Input::Slice(s) => {
                let ns = s.namespace.clone();
                let name = key.rsplit('/').next().unwrap_or(key).to_owned();
                self.set_slice(&ns, &name, Some(s));
            }
            Input::Pool(p) => self.set_pool(key, Some(p)),
        }
    }

    /// Removes what `kind` (`apiVersion/kind`) stored under `key` contributed.
    pub fn remove(&mut self, kind: &str, key: &str) {
        let (ns, name) = match key.split_once('/') {
            Some((ns, name)) => (Some(ns.to_owned()), name.to_owned()),
            None => (None, key.to_owned()),
        };
        match kind {
            "v1/Namespace" => self.set_namespace(&name, None),
            "v1/Pod" => self.remove_endpoint(key),
            "v1/ServiceAccount" => self.set_service_account(ns.as_deref().unwrap_or_default(), &name, None),
            "caracal.dev/v1/NetworkSet" | "caracal.dev/v1/GlobalNetworkSet" => {
                self.set_network_set(ns, &name, None);
            }
            "caracal.dev/v1/Tier" => self.set_tier(&name, None),
            "networking.k8s.io/v1/NetworkPolicy" => self.remove_policy(&format!("knp.default.{key}")),
            "caracal.dev/v1/NetworkPolicy" | "caracal.dev/v1/GlobalNetworkPolicy" => self.remove_policy(key),
            "discovery.k8s.io/v1/EndpointSlice" => {
                self.set_slice(ns.as_deref().unwrap_or_default(), &name, None);
            }
            "caracal.dev/v1/IPPool" => self.set_pool(key, None),
            _ => {}
        }
    }

    // ----- natOutgoing -----

    /// Sets (or, with None, removes) the pool `name` and recomputes natOutgoing.
    fn set_pool(&mut self, name: &str, pool: Option<crate::model::PoolNat>) {
        match pool {
            Some(p) => self.pools.insert(name.to_owned(), p),
            None => self.pools.remove(name),
        };
        self.recompute_nat(self.model.nat_outgoing.address);
    }

    /// Sets Felix's `defaultEndpointToHostAction`.
    pub fn set_endpoint_to_host(&mut self, action: crate::model::EndpointToHost) {
        if self.model.endpoint_to_host != action {
            self.model.endpoint_to_host = action;
            self.changes.endpoint_to_host = true;
        }
    }

    /// Sets Felix's `natOutgoingAddress` (None: masquerade to the outgoing interface's address).
    pub fn set_nat_address(&mut self, address: Option<IpAddr>) {
        self.recompute_nat(address);
    }

    fn recompute_nat(&mut self, address: Option<IpAddr>) {
        let nat = crate::model::NatOutgoing {
            masquerade: self
                .pools
                .values()
                .filter(|p| p.nat_outgoing && !p.disabled)
                .map(|p| p.cidr)
                .collect(),
            all_pools: self.pools.values().map(|p| p.cidr).collect(),
            address,
        };
        if nat != self.model.nat_outgoing {
            self.model.nat_outgoing = nat;
            self.changes.nat = true;
        }
    }

    // ----- sets -----

    /// Members of a set, narrowed by the label index.
    fn compute_set(&self, key: &SetKey) -> SetMembers {
        if let SetKey::Selected { selector, .. } = key
            && let Some(cands) = self.index.candidates(selector)
        {
            let eps = cands.iter().filter_map(|i| self.world.endpoints.get(*i as usize));
            return members_among(&self.world, key, eps, true);
        }
        members(&self.world, key)
    }

    /// Recomputes a kept set, recording it when its members changed.
    fn recompute_set(&mut self, key: &SetKey) {
        if !self.model.sets.contains_key(key) {
            return;
        }
        let m = self.compute_set(key);
        if let Some(old) = self.model.sets.get(key)
            && *old != m
        {
            let (added, removed) = (difference(&m, old), difference(old, &m));
            self.model.sets.insert(key.clone(), m);
            self.changes.add_delta(key.clone(), added, removed);
        }
    }

    /// Recomputes every kept set `f` picks.
    fn recompute_sets_where(&mut self, f: impl Fn(&SetKey) -> bool) {
        let keys: Vec<SetKey> = self.model.sets.keys().filter(|k| f(k)).cloned().collect();
        for k in keys {
            self.recompute_set(&k);
        }
    }

    fn reference(&mut self, p: &Policy) {
        for key in policy_sets(p) {
            let n = self.set_refs.entry(key.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                let m = self.compute_set(&key);
                self.model.sets.insert(key.clone(), m);
                self.changes.members.remove(&key);
                self.changes.sets.insert(key);
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
                    self.changes.members.remove(&key);
                    self.changes.sets.insert(key);
                }
            }
        }
    }

    /// Re-checks one endpoint's membership of every kept set: additions are applied directly; when the
    /// endpoint leaves a set (or changes its addresses) the set is recomputed from its index candidates,
    /// because another member may hold the same address.
    fn refresh_membership(&mut self, old: Option<&Endpoint>, new: Option<&Endpoint>) {
        // The sets whose members among the two versions differ, found without copying every set's key (a
        // cluster's thousand selectors, per pod change).
        let changed: Vec<(SetKey, SetMembers, SetMembers)> = self
            .model
            .sets
            .keys()
            .filter_map(|key| {
                let was = members_among(&self.world, key, old, false);
                let is = members_among(&self.world, key, new, false);
                (was != is).then(|| (key.clone(), was, is))
            })
            .collect();
        for (key, was, is) in changed {
            let only_additions = was.nets.is_subset(&is.nets) && was.ip_ports.is_subset(&is.ip_ports);
            if only_additions {
                if let Some(set) = self.model.sets.get_mut(&key) {
                    let added = difference(&is, set);
                    set.nets.extend(added.nets.iter().copied());
                    set.ip_ports.extend(added.ip_ports.iter().copied());
                    if added != SetMembers::default() {
                        self.changes.add_delta(key, added, SetMembers::default());
                    }
                }
            } else {
                self.recompute_set(&key);
            }
        }
    }

    // ----- local endpoints and their policies -----

    /// Recomputes which policies select local endpoint `key`.
    fn refresh_local_tiers(&mut self, key: &str) {
        let Some(le) = self.local.get(key) else { return };
        let iface = le.iface.clone();
        let tiers = self
            .by_key
            .get(key)
            .map(|i| endpoint_tiers(&self.world, &self.world.endpoints[*i]))
            .unwrap_or_default();
        if self.model.endpoint_tiers.get(&iface) != Some(&tiers) {
            self.count_uses(&tiers, true);
            if let Some(old) = self.model.endpoint_tiers.insert(iface.clone(), tiers) {
                self.count_uses(&old, false);
            }
            self.changes.endpoints.insert(iface);
        }
    }

    /// Counts (`add`) or uncounts the policies `tiers` name in `policy_uses`.
    fn count_uses(&mut self, tiers: &crate::model::EndpointTiers, add: bool) {
        for name in tiers
            .ingress
            .iter()
            .chain(tiers.egress.iter())
            .flat_map(|t| t.policies.iter())
        {
            if add {
                *self.policy_uses.entry(name.clone()).or_default() += 1;
            } else if let Some(n) = self.policy_uses.get_mut(name) {
                *n -= 1;
                if *n == 0 {
                    self.policy_uses.remove(name);
                }
            }
            if !self.uses_changed.contains(name) {
                self.uses_changed.insert(name.clone());
            }
        }
    }

    fn refresh_locals(&mut self, keys: impl IntoIterator<Item = String>, changed: Changed<'_>) {
        for k in keys {
            self.refresh_local_tiers(&k);
        }
        self.sync_policies(changed);
    }

    /// Makes `model.policies` exactly the policies some local endpoint uses (and the `everywhere` ones),
    /// (un)referencing their sets. `changed` says whose content may have changed. Only the policies whose use
    /// changed since the last call (and the one `changed` names) are looked at, unless `changed` is `All`.
    fn sync_policies(&mut self, changed: Changed<'_>) {
        let mut candidates = std::mem::take(&mut self.uses_changed);
        match changed {
            Changed::All => candidates.extend(
                self.model
                    .policies
                    .keys()
                    .chain(self.policy_uses.keys())
                    .chain(self.everywhere.iter())
                    .cloned(),
            ),
            Changed::One(c) => {
                candidates.insert(c.to_owned());
            }
            Changed::None => {}
        }
        let (used, stale): (BTreeSet<String>, BTreeSet<String>) = candidates
            .into_iter()
            .partition(|n| self.policy_uses.contains_key(n) || self.everywhere.contains(n));
        for name in stale {
            if let Some(p) = self.model.policies.remove(&name) {
                self.unreference(&p);
                self.changes.policies.insert(name);
            }
        }
        let missing: Vec<String> = used
            .iter()
            .filter(|n| {
                !self.model.policies.contains_key(*n)
                    || match changed {
                        Changed::None => false,
                        Changed::One(c) => c == n.as_str(),
                        Changed::All => true,
                    }
            })
            .cloned()
            .collect();
        for name in missing {
            let Some(p) = self.find_policy(&name).cloned() else {
                continue;
            };
            match self.model.policies.insert(name.clone(), p.clone()) {
                Some(old) if old == p => {}
                Some(old) => {
                    self.reference(&p);
                    self.unreference(&old);
                    self.changes.policies.insert(name);
                }
                None => {
                    self.reference(&p);
                    self.changes.policies.insert(name);
                }
            }
        }
    }

    fn find_policy(&self, name: &str) -> Option<&Policy> {
        self.world
            .tiers
            .iter()
            .flat_map(|t| t.policies.iter())
            .find(|p| p.name == name)
            .map(|p| &**p)
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

    /// Local endpoint keys matching `f`.
    fn locals_where(&self, f: impl Fn(&Endpoint) -> bool) -> Vec<String> {
        self.local
            .keys()
            .filter(|k| self.by_key.get(*k).is_some_and(|i| f(&self.world.endpoints[*i])))
            .cloned()
            .collect()
    }

    fn set_local(&mut self, ep: Option<&Endpoint>, key: &str) {
        match ep.filter(|e| e.node.as_deref() == Some(self.node.as_str())) {
            Some(e) => {
                let le = LocalEndpoint {
                    key: key.to_owned(),
                    iface: (self.iface)(e),
                    ips: e.ips.clone(),
                };
                let pos = self.model.endpoints.binary_search_by(|x| x.key.as_str().cmp(key));
                match pos {
                    Ok(i) if self.model.endpoints[i] == le => {}
                    Ok(i) => {
                        self.changes.endpoints.insert(le.iface.clone());
                        self.model.endpoints[i] = le.clone();
                    }
                    Err(i) => {
                        self.changes.endpoints.insert(le.iface.clone());
                        self.model.endpoints.insert(i, le.clone());
                    }
                }
                self.local.insert(key.to_owned(), le);
            }
            None => {
                if let Some(le) = self.local.remove(key) {
                    self.model.endpoints.retain(|x| x.key != key);
                    if let Some(old) = self.model.endpoint_tiers.remove(&le.iface) {
                        self.count_uses(&old, false);
                    }
                    self.changes.endpoints.insert(le.iface);
                }
            }
        }
    }

    // ----- inputs -----

    /// Adds or changes an endpoint (labels, addresses, ports, node). One without addresses is removed:
    /// nothing can match it yet.
    pub fn upsert_endpoint(&mut self, ep: Endpoint) {
        let key = ep.key();
        if ep.ips.is_empty() {
            self.remove_endpoint(&key);
            return;
        }
        let old = match self.by_key.get(&key) {
            Some(i) => {
                if self.world.endpoints[*i] == ep {
                    return;
                }
                let old = std::mem::replace(&mut self.world.endpoints[*i], ep.clone());
                self.index.remove(slot(*i), &old.labels);
                Some(old)
            }
            None => {
                self.by_key.insert(key.clone(), self.world.endpoints.len());
                self.world.endpoints.push(ep.clone());
                None
            }
        };
        let at = self.by_key.get(&key).copied().unwrap_or_default();
        self.index.add(slot(at), &ep.labels);
        self.refresh_membership(old.as_ref(), Some(&ep));
        let was_local = self.local.contains_key(&key);
        self.set_local(Some(&ep), &key);
        if self.local.contains_key(&key) {
            self.refresh_local_tiers(&key);
        }
        if was_local || self.local.contains_key(&key) {
            self.sync_policies(Changed::None);
        }
    }

    /// Removes an endpoint.
    pub fn remove_endpoint(&mut self, key: &str) {
        let Some(i) = self.by_key.remove(key) else { return };
        let last = self.world.endpoints.len() - 1;
        let old = self.world.endpoints.swap_remove(i);
        self.index.remove(slot(i), &old.labels);
        if let Some(moved) = self.world.endpoints.get(i) {
            // The last endpoint took the removed one's position.
            self.by_key.insert(moved.key(), i);
            self.index.remove(slot(last), &moved.labels);
            self.index.add(slot(i), &moved.labels);
        }
        self.refresh_membership(Some(&old), None);
        if self.local.contains_key(key) {
            self.set_local(None, key);
            self.sync_policies(Changed::None);
        }
    }

    /// Rebuilds the tiers from the declared tiers and every policy (tier edits, and policies whose tier
    /// does not exist), then re-checks every local endpoint.
    fn rebuild_tiers(&mut self) {
        let tiers: Vec<TierInfo> = self.tiers.values().cloned().collect();
        self.world.tiers = convert::build_tiers(&tiers, self.policies.values().cloned());
        let keys: Vec<String> = self.local.keys().cloned().collect();
        // Any policy's enforced form may have changed (a fail-closed one becoming real, or the reverse).
        self.refresh_locals(keys, Changed::All);
    }

    /// Adds, changes (`Some`) or removes (`None`) a tier.
    pub fn set_tier(&mut self, name: &str, info: Option<TierInfo>) {
        if self.tiers.get(name) == info.as_ref() {
            return;
        }
        match info {
            Some(t) => self.tiers.insert(name.to_owned(), t),
            None => self.tiers.remove(name),
        };
        self.rebuild_tiers();
    }

    /// True when `tier` is where its policies belong (declared, or the implicit default tier).
    fn tier_exists(&self, tier: &str) -> bool {
        tier == DEFAULT_TIER || self.tiers.contains_key(tier)
    }

    /// Adds or replaces a policy in `tier`. Only local endpoints the old or new version selects are
    /// re-checked.
    pub fn upsert_policy(&mut self, tier: &str, policy: Policy) {
        let name = policy.name.clone();
        // One copy, shared by this index and the tier that holds it.
        let entry = (tier.to_owned(), Arc::new(policy));
        let Some(old) = self.policies.insert(name.clone(), entry.clone()) else {
            return self.place_policy(&name, tier, entry.1, None);
        };
        if old == entry {
            return;
        }
        self.place_policy(&name, tier, entry.1, Some(&old.0));
    }

    fn place_policy(&mut self, name: &str, tier: &str, policy: Arc<Policy>, old_tier: Option<&str>) {
        let was_everywhere = self.everywhere.contains(name);
        if policy.everywhere {
            self.everywhere.insert(name.to_owned());
        } else {
            self.everywhere.remove(name);
        }
        if was_everywhere != policy.everywhere {
            self.uses_changed.insert(name.to_owned());
        }
        if !self.tier_exists(tier) || old_tier.is_some_and(|t| !self.tier_exists(t)) {
            return self.rebuild_tiers();
        }
        let old = self.find_policy(name).cloned();
        for t in &mut self.world.tiers {
            t.policies.retain(|p| p.name != name);
        }
        let mut affected = self.selected_locals(old.as_ref());
        affected.extend(self.selected_locals(Some(&policy)));
        if let Some(t) = self.world.tiers.iter_mut().find(|t| t.name == tier) {
            t.policies.push(policy);
            convert::sort_policies(&mut t.policies);
        }
        self.refresh_locals(affected, Changed::One(name));
    }

    /// Removes a policy; only the local endpoints it selected are re-checked.
    pub fn remove_policy(&mut self, name: &str) {
        let Some((tier, _)) = self.policies.remove(name) else {
            return;
        };
        if self.everywhere.remove(name) {
            self.uses_changed.insert(name.to_owned());
        }
        if !self.tier_exists(&tier) {
            // The synthetic tier of a missing one may now be empty.
            return self.rebuild_tiers();
        }
        let old = self.find_policy(name).cloned();
        let affected = self.selected_locals(old.as_ref());
        for t in &mut self.world.tiers {
            t.policies.retain(|p| p.name != name);
        }
        self.refresh_locals(affected, Changed::None);
    }

    /// Sets (`Some`) or clears a namespace's labels. Sets scoped by a namespace selector are recomputed, and
    /// the namespace's local endpoints re-checked (a GlobalNetworkPolicy's namespaceSelector).
    pub fn set_namespace(&mut self, ns: &str, labels: Option<Labels>) {
        let labels = labels.unwrap_or_default();
        if self.world.namespaces.get(ns).unwrap_or(&Labels::new()) == &labels {
            return;
        }
        if labels.is_empty() {
            self.world.namespaces.remove(ns);
        } else {
            self.world.namespaces.insert(ns.to_owned(), labels);
        }
        self.recompute_sets_where(|k| {
            matches!(
                k,
                SetKey::Selected {
                    scope: Scope::Selector(_),
                    ..
                }
            )
        });
        let locals = self.locals_where(|e| e.namespace == ns);
        self.refresh_locals(locals, Changed::None);
    }

    /// Sets (`Some`) or clears a service account's labels.
    pub fn set_service_account(&mut self, ns: &str, name: &str, labels: Option<Labels>) {
        let id = (ns.to_owned(), name.to_owned());
        if self.world.service_accounts.get(&id) == labels.as_ref() {
            return;
        }
        match labels {
            Some(l) => self.world.service_accounts.insert(id, l),
            None => self.world.service_accounts.remove(&id),
        };
        self.recompute_sets_where(|k| {
            matches!(
                k,
                SetKey::ServiceAccounts {
                    selector: Some(_),
                    ..
                }
            )
        });
        let locals = self.locals_where(|e| e.namespace == ns && e.service_account == name);
        self.refresh_locals(locals, Changed::None);
    }

    /// Adds, changes (`Some`) or removes a network set. Kept selector sets that match its old or new
    /// labels are recomputed.
    pub fn set_network_set(&mut self, ns: Option<String>, name: &str, set: Option<NetworkSet>) {
        let id = (ns, name.to_owned());
        if self.world.network_sets.get(&id) == set.as_ref() {
            return;
        }
        let old = match set {
            Some(s) => self
                .world
                .network_sets
                .insert(id, s.clone())
                .into_iter()
                .chain([s])
                .collect(),
            None => self
                .world
                .network_sets
                .remove(&id)
                .into_iter()
                .collect::<Vec<_>>(),
        };
        let keys: Vec<SetKey> = self
            .model
            .sets
            .keys()
            .filter(|k| match k {
                SetKey::Selected { selector, scope } => {
                    let mut scope = ScopeEval::new(&self.world, scope);
                    old.iter()
                        .any(|s| selector.matches(&s.labels) && scope.contains(s.namespace.as_deref()))
                }
                _ => false,
            })
            .cloned()
            .collect();
        for k in keys {
            self.recompute_set(&k);
        }
    }

    /// Adds, changes (`Some`) or removes an EndpointSlice; the Service's sets are recomputed.
    pub fn set_slice(&mut self, ns: &str, name: &str, slice: Option<Slice>) {
        let id = (ns.to_owned(), name.to_owned());
        if self.slices.get(&id) == slice.as_ref() {
            return;
        }
        let old = match slice {
            Some(s) => self.slices.insert(id, s.clone()).into_iter().chain([s]).collect(),
            None => self.slices.remove(&id).into_iter().collect::<Vec<_>>(),
        };
        let services: BTreeSet<(String, String)> = old
            .iter()
            .map(|s| (s.namespace.clone(), s.service.clone()))
            .collect();
        for (sns, svc) in services {
            let mut b = ServiceBackends::default();
            for s in self
                .slices
                .range((sns.clone(), String::new())..)
                .take_while(|((n, _), _)| *n == sns)
                .map(|(_, s)| s)
                .filter(|s| s.service == svc)
            {
                b.addrs.extend(s.backends.addrs.iter().copied());
                b.ports.extend(s.backends.ports.iter().copied());
            }
            let id = (sns.clone(), svc.clone());
            if b == ServiceBackends::default() {
                self.world.services.remove(&id);
            } else {
                self.world.services.insert(id, b);
            }
            for k in [
                SetKey::Service {
                    namespace: sns.clone(),
                    name: svc.clone(),
                },
                SetKey::ServicePorts {
                    namespace: sns.clone(),
                    name: svc.clone(),
                },
            ] {
                self.recompute_set(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode;
    use ipnet::IpNet;
    use serde_json::json;

    fn pool(name: &str, cidr: &str, nat: bool, disabled: bool) -> Input {
        let v = json!({"metadata": {"name": name}, "spec": {"cidr": cidr, "natOutgoing": nat, "disabled": disabled}});
        decode("caracal.dev/v1/IPPool", name, &v)
            .expect("decodes")
            .expect("an input")
    }

    #[test]
    fn pools_make_nat_outgoing_and_each_change_is_reported_once() {
        let mut g = CalcGraph::new("n", Box::new(|e: &crate::world::Endpoint| e.name.clone()));
        g.apply("a", pool("a", "10.244.0.0/16", true, false));
        g.apply("b", pool("b", "10.245.0.0/16", false, false));
        g.apply("c", pool("c", "fd00:244::/48", true, false));
        let nat = &g.model().nat_outgoing;
        let nets = |v: &[&str]| {
            v.iter()
                .map(|n| n.parse().expect("net"))
                .collect::<BTreeSet<IpNet>>()
        };
        assert_eq!(nat.masquerade, nets(&["10.244.0.0/16", "fd00:244::/48"]));
        assert_eq!(
            nat.all_pools,
            nets(&["10.244.0.0/16", "10.245.0.0/16", "fd00:244::/48"])
        );
        assert!(g.take_changes().nat);
        // The same pool again: nothing changed.
        g.apply("b", pool("b", "10.245.0.0/16", false, false));
        assert!(!g.take_changes().nat);
        // Disabled: no longer masquerades, still a pool destination; deleted: gone from both.
        g.apply("a", pool("a", "10.244.0.0/16", true, true));
        assert_eq!(g.model().nat_outgoing.masquerade, nets(&["fd00:244::/48"]));
        assert!(
            g.model()
                .nat_outgoing
                .all_pools
                .contains(&"10.244.0.0/16".parse().expect("net"))
        );
        assert!(g.take_changes().nat);
        g.remove("caracal.dev/v1/IPPool", "a");
        assert_eq!(
            g.model().nat_outgoing.all_pools,
            nets(&["10.245.0.0/16", "fd00:244::/48"])
        );
        // Felix's natOutgoingAddress.
        g.set_nat_address(Some("192.0.2.7".parse().expect("ip")));
        assert_eq!(
            g.model().nat_outgoing.address,
            Some("192.0.2.7".parse().expect("ip"))
        );
        assert!(g.take_changes().nat);
    }
}
