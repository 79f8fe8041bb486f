//! The BPF policy data plane: converges the programs, endpoint entries and policy tables to the node's
//! [`DataplaneModel`] (docs/bpf.md).
//!
//! - Every local endpoint's host-side interface gets both programs (attached once per run; a pinned link of
//!   an earlier run gets this run's program in place).
//! - Per endpoint and direction, the tiers are flattened, compiled ([`caracal_policy::classify`]) and laid
//!   out ([`tables::image`]); equal images are one table, shared. A changed policy writes a new table and
//!   then flips the endpoint entry to it; the old table goes when no endpoint refers to it.
//! - An endpoint whose list cannot be laid out (too long) keeps what it had: an entry it never had leaves
//!   it dropping everything, and the error is reported; nothing is widened.
//! - A full converge adopts what an earlier run left: tables found by content hash, entries that already
//!   say the right thing are not written, links are re-pointed, tables nobody refers to are swept.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use caracal_policy::classify::{Own, compile_for, flatten};
use caracal_policy::ir::Direction;
use caracal_policy::model::{SetKey, entity_sets};

use super::tables::{self, Image};
use super::{BpfError, Endpoint, Loaded, PIN_DIR};
use crate::dataplane::iptables::apply::ApplyStats;
use crate::dataplane::{Changes, DataplaneError, DataplaneModel, PolicyDataplane};

/// Where a node's pins go: `CARACAL_BPF_PIN_DIR` when set (the node DaemonSet sets it to a directory on the
/// host's bpffs it mounts; the lab points it at each node's own bpffs), else [`PIN_DIR`]; when
/// `exec_prefix` is `ip netns exec NAME` (how tests run the kernel tools in a namespace: the namespace to
/// program), `PIN_DIR-NAME`, since several such nodes share one host's bpffs and interface indexes repeat
/// across namespaces.
pub fn pin_dir(exec_prefix: &[String]) -> PathBuf {
    if let Some(dir) = std::env::var_os("CARACAL_BPF_PIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    match exec_prefix {
        [_, _, _, name] => PathBuf::from(format!("{PIN_DIR}-{name}")),
        _ => PathBuf::from(PIN_DIR),
    }
}

/// A table in the kernel.
struct Written {
    id: u32,
    image: Arc<Image>,
    /// Endpoint directions referring to it.
    refs: usize,
}

/// An endpoint as programmed.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Programmed {
    ifindex: u32,
    /// The entry's flags (`super::EP_HOST_DROP`).
    flags: u32,
    /// Table hashes: [egress (from the pod), ingress (to the pod)].
    hashes: [u64; 2],
}

/// The named-port sets of a model: (port name, members).
type NamedSets<'m> = Vec<(&'m str, &'m caracal_policy::model::SetMembers)>;

/// A hash map with a fast hasher (keys here are the model's own names, not chosen to collide).
type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::FixedState>;
/// A hash set with the same hasher.
type FastSet<K> = std::collections::HashSet<K, foldhash::fast::FixedState>;

/// Which interfaces' tiers name each policy, per direction (0: ingress, 1: egress), equal to the model's
/// `endpoint_tiers` at all times: a converge rebuilds it, an update changes the endpoints the change names
/// (every endpoint whose tiers change is named). A change to a policy or to a set its rules use then reaches
/// the policy's users directly, not through a walk over every endpoint's tiers.
///
/// And which policies' rules use each set, and how: a set's change reaches the policies using it directly,
/// not through every policy's rules.
#[derive(Debug, Default, PartialEq)]
struct PolicyUsers {
    by_policy: FastMap<String, [BTreeSet<String>; 2]>,
    of_iface: FastMap<String, [Vec<String>; 2]>,
    by_set: FastMap<SetKey, BTreeSet<(String, SetUse)>>,
    of_policy: FastMap<String, Vec<(SetKey, SetUse)>>,
}

/// How a policy's rule uses a set: the direction (0: ingress, 1: egress), and whether on the endpoint's own
/// side (the destination of an ingress rule, the source of an egress one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct SetUse {
    dir: usize,
    own_side: bool,
}

impl PolicyUsers {
    fn of(model: &DataplaneModel) -> Self {
        let mut out = Self::default();
        for (iface, tiers) in &model.endpoint_tiers {
            out.set_endpoint(iface, Some(tiers));
        }
        for (name, p) in &model.policies {
            out.set_policy(name, Some(p));
        }
        out
    }

    /// Records the sets policy `name`'s rules use (None: it left).
    fn set_policy(&mut self, name: &str, policy: Option<&caracal_policy::ir::Policy>) {
        if let Some(old) = self.of_policy.remove(name) {
            for (k, u) in old {
                if let Some(users) = self.by_set.get_mut(&k) {
                    users.remove(&(name.to_owned(), u));
                    if users.is_empty() {
                        self.by_set.remove(&k);
                    }
                }
            }
        }
        let Some(p) = policy else { return };
        let mut uses: BTreeSet<(SetKey, SetUse)> = BTreeSet::new();
        for (dir, rules) in [(0, &p.ingress), (1, &p.egress)] {
            for r in rules.iter().flatten() {
                // Ingress: the endpoint is the destination; egress: the source.
                for (m, source) in [(&r.source, true), (&r.destination, false)] {
                    let own_side = source == (dir == 1);
                    for k in entity_sets(m, r.protocol, source).all() {
                        uses.insert((k.clone(), SetUse { dir, own_side }));
                    }
                }
            }
        }
        for (k, u) in &uses {
            self.by_set
                .entry(k.clone())
                .or_default()
                .insert((name.to_owned(), *u));
        }
        if !uses.is_empty() {
            self.of_policy.insert(name.to_owned(), uses.into_iter().collect());
        }
    }

    /// The policies whose rules use `set`, and how.
    fn set_users(&self, set: &SetKey) -> impl Iterator<Item = &(String, SetUse)> {
        self.by_set.get(set).into_iter().flatten()
    }

    /// Records `iface`'s tiers (None: it left).
    fn set_endpoint(&mut self, iface: &str, tiers: Option<&caracal_policy::model::EndpointTiers>) {
        let names = |list: &[caracal_policy::model::TierRef]| {
            let mut v: Vec<String> = list.iter().flat_map(|t| t.policies.iter().cloned()).collect();
            v.sort();
            v.dedup();
            v
        };
        let new = tiers.map(|t| [names(&t.ingress), names(&t.egress)]);
        let old = self.of_iface.remove(iface);
        if let Some(old) = &old {
            for (d, list) in old.iter().enumerate() {
                for p in list {
                    if let Some(u) = self.by_policy.get_mut(p) {
                        u[d].remove(iface);
                        if u.iter().all(BTreeSet::is_empty) {
                            self.by_policy.remove(p);
                        }
                    }
                }
            }
        }
        if let Some(new) = new {
            for (d, list) in new.iter().enumerate() {
                for p in list {
                    self.by_policy.entry(p.clone()).or_default()[d].insert(iface.to_owned());
                }
            }
            if new.iter().any(|l| !l.is_empty()) {
                self.of_iface.insert(iface.to_owned(), new);
            }
        }
    }

    /// The interfaces whose `d` tiers name `policy`.
    fn users(&self, policy: &str, d: usize) -> impl Iterator<Item = &String> {
        self.by_policy
            .get(policy)
            .into_iter()
            .flat_map(move |u| u[d].iter())
    }
}

/// An endpoint direction moving off a table: (interface, direction, its new image).
type Move<'a> = (&'a str, usize, Arc<Image>);

/// What an image is computed from: the direction, the tier list, the endpoint's own named ports (borrowed
/// from the model: hashing them is cheaper than formatting a key, which a pod joining a set every endpoint
/// uses did a thousand times).
type ImageKey<'m> = (
    bool,
    &'m [caracal_policy::model::TierRef],
    Vec<(&'m str, u8, u16)>,
);

/// What one program computes once: every endpoint's addresses, its images, images by tier list and own
/// named ports, and the model's named-port sets.
struct Memo<'m> {
    ips: FastMap<&'m str, &'m [std::net::IpAddr]>,
    /// Each endpoint's images once computed (an update asks for an endpoint's twice: to patch, to program).
    of_iface: FastMap<String, [Arc<Image>; 2]>,
    images: FastMap<ImageKey<'m>, Result<Arc<Image>, tables::ImageError>>,
    named_sets: Option<NamedSets<'m>>,
    /// The endpoints the change names itself (added, removed, tiers changed): their interfaces are looked
    /// up again.
    changed: Option<&'m BTreeSet<String>>,
}

impl<'m> Memo<'m> {
    fn new(model: &'m DataplaneModel) -> Self {
        Memo {
            ips: model
                .endpoints
                .iter()
                .map(|e| (e.iface.as_str(), e.ips.as_slice()))
                .collect(),
            of_iface: Default::default(),
            images: Default::default(),
            named_sets: None,
            changed: None,
        }
    }

    /// Whether the change being programmed names the endpoint on `iface` itself (always, in a converge).
    fn changed_endpoint(&self, iface: &str) -> bool {
        self.changed.is_none_or(|c| c.contains(iface))
    }

    /// The addresses of the endpoint on `iface` (none when it is not in the model).
    fn ips_of(&self, iface: &str) -> &'m [std::net::IpAddr] {
        self.ips.get(iface).copied().unwrap_or(&[])
    }
}

/// The model's named-port sets (their keys sort together, after the address sets).
fn named_sets(model: &DataplaneModel) -> NamedSets<'_> {
    let first = SetKey::NamedPort {
        name: String::new(),
        protocol: 0,
    };
    model
        .sets
        .range(first..)
        .map_while(|(key, members)| match key {
            SetKey::NamedPort { name, .. } => Some((name.as_str(), members)),
            _ => None,
        })
        .collect()
}

/// An endpoint as looked at for connect-time load balancing: its interface, IPv4 address and the cookie
/// of its namespace it was registered under (None: no record or no IPv4 address; not registered).
#[derive(Clone, Copy)]
struct Registration {
    ifindex: u32,
    addr: Option<[u8; 4]>,
    cookie: Option<u64>,
}

/// The BPF data plane.
pub struct BpfDataplane {
    dir: PathBuf,
    netns: Option<PathBuf>,
    loaded: Option<Loaded>,
    tables: BTreeMap<u64, Written>,
    endpoints: BTreeMap<String, Programmed>,
    /// Interfaces this run attached (or re-pointed) its programs to.
    attached: BTreeSet<String>,
    next_id: u32,
    /// After a failed update the next one converges in full.
    dirty: bool,
    /// The endpoints each policy reaches.
    users: PolicyUsers,
    /// natOutgoing (the kernel's nat table, as the iptables backend programs it: see `dataplane::nat`).
    nat: Option<crate::dataplane::NatProgram>,
    /// Where the CNI wiring records pods' namespace cookies ([`super::ctlb::record`]): a programmed
    /// endpoint's pod is registered for connect-time load balancing from there. None: no pod is.
    netns_records: Option<PathBuf>,
    /// The endpoints looked at for connect-time load balancing, by interface.
    registered: BTreeMap<String, Registration>,
}

impl BpfDataplane {
    /// The data plane with its pins under `dir`, programming interfaces in the network namespace at
    /// `netns` (the caller's when None).
    pub fn new(dir: &Path, netns: Option<PathBuf>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            netns,
            loaded: None,
            tables: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            attached: BTreeSet::new(),
            next_id: 1,
            dirty: true,
            users: PolicyUsers::default(),
            nat: None,
            netns_records: None,
            registered: BTreeMap::new(),
        }
    }

    /// Registers each programmed endpoint's pod for connect-time load balancing, from the cookies recorded
    /// under `dir` (see [`super::ctlb`]).
    pub fn with_netns_records(mut self, dir: PathBuf) -> Self {
        self.netns_records = Some(dir);
        self
    }

    /// Registers `iface`'s pod (host-side index `ifindex`, addresses `ips`) for connect-time load balancing when its
    /// namespace's cookie was recorded and it has an IPv4 address; a pod without either is left to the TC
    /// programs' translation.
    fn register(&mut self, ips: &[std::net::IpAddr], iface: &str, ifindex: u32) -> Result<(), BpfError> {
        let Some(dir) = &self.netns_records else {
            return Ok(());
        };
        let addr = ips.iter().find_map(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(v4.octets()),
            std::net::IpAddr::V6(_) => None,
        });
        // An interface keeps its pod's namespace for its whole life (a new pod comes with a new interface,
        // and the wiring records the cookie before the interface exists): read once per interface.
        if self
            .registered
            .get(iface)
            .is_some_and(|r| r.ifindex == ifindex && r.addr == addr)
        {
            return Ok(());
        }
        let cookie = addr.and_then(|_| super::ctlb::recorded(dir, iface));
        if let Some(old) = self.registered.remove(iface).and_then(|r| r.cookie) {
            self.loaded()?.unregister_netns(old)?;
        }
        if let (Some(cookie), Some(addr)) = (cookie, addr) {
            let entry = super::ctlb::NsEntry {
                addr,
                flags: 0,
                ifindex,
                pad: 0,
            };
            self.loaded()?.register_netns(cookie, entry)?;
        }
        self.registered.insert(
            iface.to_owned(),
            Registration {
                ifindex,
                addr,
                cookie,
            },
        );
        Ok(())
    }

    /// Programs natOutgoing too (what an agent's backend does; kernel tests of policy alone leave it out).
    pub fn with_nat(mut self, nat: crate::dataplane::NatProgram) -> Self {
        self.nat = Some(nat);
        self
    }

    /// The node's data plane, its pins under [`pin_dir`]`(exec_prefix)`.
    pub fn for_node(exec_prefix: &[String]) -> Self {
        Self::with_pins(&pin_dir(exec_prefix), exec_prefix)
    }

    /// As [`BpfDataplane::for_node`], with the pins under `dir`.
    pub fn with_pins(dir: &Path, exec_prefix: &[String]) -> Self {
        let netns = match exec_prefix {
            [ip, netns, exec, name] if ip == "ip" && netns == "netns" && exec == "exec" => {
                Some(PathBuf::from("/run/netns").join(name))
            }
            _ => None,
        };
        Self::new(dir, netns)
    }

    /// The loaded programs (loading them on first use).
    pub fn loaded(&mut self) -> Result<&mut Loaded, BpfError> {
        if self.loaded.is_none() {
            self.loaded = Some(Loaded::load(&self.dir)?);
        }
        self.loaded
            .as_mut()
            .ok_or_else(|| BpfError::Load("not loaded".into()))
    }

    /// The table id an endpoint direction refers to, for the debug dump.
    pub fn table_of(&self, iface: &str) -> Option<[u32; 2]> {
        let p = self.endpoints.get(iface)?;
        Some(p.hashes.map(|h| self.tables.get(&h).map_or(0, |w| w.id)))
    }

    /// Runs `f` inside the configured network namespace (on a thread of its own that entered it).
    fn in_netns<T: Send>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, BpfError> + Send,
    ) -> Result<T, BpfError> {
        let Some(path) = self.netns.clone() else {
            return f(self);
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).map_err(|source| BpfError::Io {
                    path: path.clone(),
                    source,
                })?;
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| BpfError::Io {
                    path: path.clone(),
                    source: e.into(),
                })?;
                f(self)
            })
            .join()
            .unwrap_or_else(|_| Err(BpfError::Load("the BPF data plane's thread panicked".into())))
        })
    }

    /// The images of `iface`'s two directions: [egress, ingress], compiled for the endpoint (its own
    /// named ports address-less: [`caracal_policy::classify::compile_for`]). An image depends only on the
    /// tier list, the model and the endpoint's own named ports, so `memo` computes each distinct combination
    /// once per program (endpoints of one namespace usually share theirs).
    fn images<'m>(
        model: &'m DataplaneModel,
        iface: &str,
        memo: &mut Memo<'m>,
    ) -> Result<[Arc<Image>; 2], tables::ImageError> {
        static NONE: caracal_policy::model::EndpointTiers = caracal_policy::model::EndpointTiers {
            ingress: Vec::new(),
            egress: Vec::new(),
        };
        if let Some(done) = memo.of_iface.get(iface) {
            return Ok(done.clone());
        }
        let tiers = model.endpoint_tiers.get(iface).unwrap_or(&NONE);
        let ips = memo.ips_of(iface);
        let named = memo.named_sets.get_or_insert_with(|| named_sets(model));
        // The endpoint's own named ports: its addresses' range of each named-port set.
        let mut own_ports: Vec<(&'m str, u8, u16)> = named
            .iter()
            .flat_map(|(name, members)| {
                members
                    .ports_at(ips)
                    .map(move |(proto, port)| (*name, proto, port))
            })
            .collect();
        own_ports.sort();
        own_ports.dedup();
        let mut one = |dir: Direction, list: &'m [caracal_policy::model::TierRef]| {
            memo.images
                .entry((dir == Direction::Egress, list, own_ports.clone()))
                .or_insert_with(|| {
                    let entries = flatten(list, &model.policies, dir);
                    let own = Own {
                        source: dir == Direction::Egress,
                        ips,
                    };
                    let compiled = compile_for(&entries, model, Some(own));
                    tables::image(&entries, &compiled).map(Arc::new)
                })
                .clone()
        };
        let images = [
            one(Direction::Egress, &tiers.egress)?,
            one(Direction::Ingress, &tiers.ingress)?,
        ];
        memo.of_iface.insert(iface.to_owned(), images.clone());
        Ok(images)
    }

    /// Tables whose every user moves to one new image that differs from the old only in set members are
    /// changed in place, key by key, when that is atomic for each packet ([`tables::MemberDiff::atomic_for`]):
    /// a pod joining a set that 1,000 endpoints' tables use costs a few keys per table, and no endpoint
    /// entry is written. What cannot be patched is left for [`Self::program`] (a new table, then the flip).
    fn patch_in_place<'m>(
        &mut self,
        model: &'m DataplaneModel,
        affected: &FastSet<&str>,
        memo: &mut Memo<'m>,
        stats: &mut ApplyStats,
    ) -> Result<(), BpfError> {
        // Old hash -> (interface, direction, new image) of the users moving off it.
        let mut moving: BTreeMap<u64, Vec<Move<'_>>> = BTreeMap::new();
        for iface in affected {
            let Some(p) = self.endpoints.get(*iface).copied() else {
                continue;
            };
            let Ok(images) = Self::images(model, iface, memo) else {
                continue;
            };
            for (d, image) in images.into_iter().enumerate() {
                if image.hash != p.hashes[d] {
                    moving.entry(p.hashes[d]).or_default().push((*iface, d, image));
                }
            }
        }
        for (old, users) in moving {
            let Some(w) = self.tables.get(&old) else {
                continue;
            };
            let new = Arc::clone(&users[0].2);
            if users.len() != w.refs
                || users.iter().any(|u| u.2.hash != new.hash)
                || self.tables.contains_key(&new.hash)
            {
                continue;
            }
            let Some(diff) = tables::member_diff(&w.image, &new) else {
                continue;
            };
            let atomic = users.iter().all(|(iface, d, _)| {
                let own: Vec<[u8; 16]> = memo.ips_of(iface).iter().map(|ip| tables::addr16(*ip)).collect();
                diff.atomic_for(*d as u8, &own)
            });
            if !atomic {
                continue;
            }
            let id = w.id;
            self.loaded()?.patch_table(id, &diff, new.hash)?;
            stats.tables_patched += 1;
            if let Some(mut w) = self.tables.remove(&old) {
                w.image = Arc::clone(&new);
                self.tables.insert(new.hash, w);
            }
            for (iface, d, image) in &users {
                if let Some(p) = self.endpoints.get_mut(*iface) {
                    p.hashes[*d] = image.hash;
                }
            }
        }
        Ok(())
    }

    /// The id of a table holding `image`, writing it when no table does.
    fn table_for(&mut self, image: Arc<Image>, stats: &mut ApplyStats) -> Result<u32, BpfError> {
        if let Some(w) = self.tables.get_mut(&image.hash) {
            w.refs += 1;
            return Ok(w.id);
        }
        let id = self.allocate_id();
        self.loaded()?.write_table(id, &image)?;
        stats.tables_written += 1;
        self.tables.insert(image.hash, Written { id, image, refs: 1 });
        Ok(id)
    }

    fn allocate_id(&mut self) -> u32 {
        let used: BTreeSet<u32> = self.tables.values().map(|w| w.id).collect();
        // Ids fit in 24 bits (the lookup keys hold them shifted by 8); 0 is no table.
        loop {
            let id = self.next_id;
            self.next_id = if self.next_id >= (1 << 24) - 1 {
                1
            } else {
                self.next_id + 1
            };
            if !used.contains(&id) {
                return id;
            }
        }
    }

    /// Drops one reference to the table of `hash`, deleting it when it was the last.
    fn release(&mut self, hash: u64, stats: &mut ApplyStats) -> Result<(), BpfError> {
        let Some(w) = self.tables.get_mut(&hash) else {
            return Ok(());
        };
        w.refs = w.refs.saturating_sub(1);
        if w.refs == 0
            && let Some(w) = self.tables.remove(&hash)
        {
            self.loaded()?.delete_table(w.id, &w.image)?;
            stats.tables_deleted += 1;
        }
        Ok(())
    }

    /// Programs one endpoint: attaches the programs, writes its tables, flips its entry (unless it is known
    /// to be right already and not `force`d). An interface that does not exist (yet) is left for the next
    /// change that names it.
    fn program<'m>(
        &mut self,
        model: &'m DataplaneModel,
        iface: &str,
        force: bool,
        memo: &mut Memo<'m>,
        stats: &mut ApplyStats,
        errors: &mut Vec<String>,
    ) -> Result<(), BpfError> {
        // An endpoint programmed before and not itself changed keeps its interface (a new interface under the
        // name comes with a new pod, which the model changes for): asking the kernel costs a socket per
        // endpoint, and a pod joining a set every endpoint uses reaches them all.
        let known = self.endpoints.get(iface).map(|p| p.ifindex);
        let ifindex = match known {
            Some(i) if !force && !memo.changed_endpoint(iface) => i,
            _ => match nix::net::if_::if_nametoindex(iface) {
                Ok(i) => i,
                // Gone or not there yet: nothing to hold it.
                Err(_) => return self.unprogram(iface, stats),
            },
        };
        if !self.attached.contains(iface) {
            self.loaded()?.attach(iface)?;
            self.attached.insert(iface.to_owned());
        }
        let images = match Self::images(model, iface, memo) {
            Ok(i) => i,
            Err(e) => {
                errors.push(format!("{iface}: {e}; it keeps the policy it had"));
                return Ok(());
            }
        };
        let hashes = [images[0].hash, images[1].hash];
        let flags = endpoint_flags(model);
        let before = self.endpoints.get(iface).copied();
        if !force
            && before
                == Some(Programmed {
                    ifindex,
                    flags,
                    hashes,
                })
        {
            return Ok(());
        }
        let [egress, ingress] = images;
        let table = [self.table_for(egress, stats)?, self.table_for(ingress, stats)?];
        let entry = Endpoint { flags, table, pad: 0 };
        self.loaded()?.set_endpoint(ifindex, entry)?;
        self.register(memo.ips_of(iface), iface, ifindex)?;
        stats.endpoints_written += 1;
        self.endpoints.insert(
            iface.to_owned(),
            Programmed {
                ifindex,
                flags,
                hashes,
            },
        );
        if let Some(old) = before {
            if old.ifindex != ifindex {
                self.loaded()?.remove_endpoint(old.ifindex)?;
            }
            for h in old.hashes {
                self.release(h, stats)?;
            }
        }
        Ok(())
    }

    /// Forgets an endpoint that left: its entry, flows and counters, its tables' references, and its links
    /// once its interface is gone. An interface that is still there keeps its programs, which drop everything
    /// without an entry: a pod that left the model while still wired (deleted, its CNI DEL not run yet), or
    /// one the CNI wiring attached to before it reached the model, stays closed, as the iptables backend's
    /// dispatch chains keep an unknown interface closed.
    fn unprogram(&mut self, iface: &str, stats: &mut ApplyStats) -> Result<(), BpfError> {
        let was_attached = self.attached.remove(iface);
        if let Some(cookie) = self.registered.remove(iface).and_then(|r| r.cookie) {
            self.loaded()?.unregister_netns(cookie)?;
        }
        let old = self.endpoints.remove(iface);
        if let Some(old) = old {
            self.loaded()?.remove_endpoint(old.ifindex)?;
            stats.endpoints_removed += 1;
            for h in old.hashes {
                self.release(h, stats)?;
            }
        }
        if (was_attached || old.is_some()) && nix::net::if_::if_nametoindex(iface).is_err() {
            self.loaded()?.detach(iface)?;
        }
        Ok(())
    }

    fn converge_here(&mut self, model: &DataplaneModel) -> Result<ApplyStats, BpfError> {
        let mut stats = ApplyStats::default();
        let mut errors = Vec::new();
        let mut memo = Memo::new(model);
        self.users = PolicyUsers::of(model);
        if self.loaded.is_none() {
            // First converge of this run: flows the kernel saw answered (established under whatever enforced
            // policy before, the iptables backend when switching) keep going; see `seed_flows`.
            let flows = seed_flows(model);
            let now = super::sweep::monotonic_ns();
            self.loaded()?.add_flows(&flows, now)?;
        }
        // Adopt what the kernel holds: tables by content hash, entries by interface.
        let metas = self.loaded()?.table_metas()?;
        let kernel_entries = self.loaded()?.endpoint_entries()?;
        if self.tables.is_empty() {
            self.endpoints.clear();
        }
        let mut adopted: BTreeMap<u64, u32> = BTreeMap::new();
        for (id, meta) in &metas {
            adopted.entry(meta.hash).or_insert(*id);
        }
        let wanted: BTreeSet<&str> = model.endpoints.iter().map(|e| e.iface.as_str()).collect();
        for ep in &model.endpoints {
            let iface = ep.iface.as_str();
            let Ok(ifindex) = nix::net::if_::if_nametoindex(iface) else {
                self.unprogram(iface, &mut stats)?;
                continue;
            };
            if !self.attached.contains(iface) {
                self.loaded()?.attach(iface)?;
                self.attached.insert(iface.to_owned());
            }
            let images = match Self::images(model, iface, &mut memo) {
                Ok(i) => i,
                Err(e) => {
                    errors.push(format!("{iface}: {e}; it keeps the policy it had"));
                    continue;
                }
            };
            // An earlier run's tables with the same content are adopted, not written again.
            for image in &images {
                if !self.tables.contains_key(&image.hash)
                    && let Some(id) = adopted.get(&image.hash)
                {
                    self.tables.insert(
                        image.hash,
                        Written {
                            id: *id,
                            image: Arc::clone(image),
                            refs: 0,
                        },
                    );
                }
            }
            let hashes = [images[0].hash, images[1].hash];
            let ids = hashes.map(|h| self.tables.get(&h).map(|w| w.id));
            let in_kernel = kernel_entries.get(&ifindex);
            let known = self.endpoints.get(iface).copied();
            let flags = endpoint_flags(model);
            if let (Some(k), [Some(e), Some(i)]) = (in_kernel, ids)
                && k.table == [e, i]
                && k.flags == flags
            {
                self.register(memo.ips_of(iface), iface, ifindex)?;
                // Right already: take the references, write nothing.
                let now = Programmed {
                    ifindex,
                    flags,
                    hashes,
                };
                if known != Some(now) {
                    for h in hashes {
                        if let Some(w) = self.tables.get_mut(&h) {
                            w.refs += 1;
                        }
                    }
                    if let Some(old) = known {
                        for h in old.hashes {
                            self.release(h, &mut stats)?;
                        }
                    }
                    self.endpoints.insert(iface.to_owned(), now);
                }
                continue;
            }
            self.program(model, iface, true, &mut memo, &mut stats, &mut errors)?;
        }
        // Endpoints that left, by name and by kernel entry.
        let gone: Vec<String> = self
            .endpoints
            .keys()
            .filter(|i| !wanted.contains(i.as_str()))
            .cloned()
            .collect();
        for iface in gone {
            self.unprogram(&iface, &mut stats)?;
        }
        // Pods' registrations nobody holds (an earlier run's, of pods gone since); the node's own stays.
        let held: BTreeSet<u64> = self.registered.values().filter_map(|r| r.cookie).collect();
        for (cookie, e) in self.loaded()?.netns_entries()? {
            if e.flags & super::ctlb::CTLB_HOST == 0 && !held.contains(&cookie) {
                self.loaded()?.unregister_netns(cookie)?;
            }
        }
        let live: BTreeSet<u32> = self.endpoints.values().map(|p| p.ifindex).collect();
        for ifindex in self.loaded()?.endpoint_entries()?.keys() {
            if !live.contains(ifindex) {
                self.loaded()?.remove_endpoint(*ifindex)?;
                stats.endpoints_removed += 1;
            }
        }
        // Links of interfaces that are gone; one on an interface still there stays (see `unprogram`).
        let links = self.loaded()?.attached()?;
        for iface in links {
            if !wanted.contains(iface.as_str()) && nix::net::if_::if_nametoindex(iface.as_str()).is_err() {
                self.loaded()?.detach(&iface)?;
            }
        }
        // Tables nobody refers to, this run's or an earlier one's.
        self.tables.retain(|_, w| w.refs > 0);
        let keep: BTreeSet<u32> = self.tables.values().map(|w| w.id).collect();
        stats.tables_deleted += self.loaded()?.sweep_tables(&keep)?;
        self.next_id = keep.iter().max().map_or(1, |m| m + 1);
        if errors.is_empty() {
            Ok(stats)
        } else {
            Err(BpfError::Load(errors.join("; ")))
        }
    }

    fn update_here(&mut self, model: &DataplaneModel, changes: &Changes) -> Result<ApplyStats, BpfError> {
        let mut stats = ApplyStats::default();
        let mut errors = Vec::new();
        for iface in &changes.endpoints {
            self.users.set_endpoint(iface, model.endpoint_tiers.get(iface));
        }
        for name in &changes.policies {
            self.users.set_policy(name, model.policies.get(name));
        }
        debug_assert_eq!(
            self.users,
            PolicyUsers::of(model),
            "the policy users index drifted"
        );
        // Per policy using a changed set: for each direction (ingress, egress), whether a changed set is used
        // on the other side of the endpoint, and the named-port sets used on its own side (which matter to an
        // endpoint only when its own ports are among the changed members: compile_for).
        //
        // Then the changed policies themselves, which reach every endpoint they are in: together, what a
        // policy of an endpoint's tiers must be for the change to reach that endpoint.
        let mut reach: FastMap<&str, [(bool, BTreeSet<&SetKey>); 2]> = Default::default();
        for k in changes.sets.iter().chain(changes.members.keys()) {
            let member_only = !changes.sets.contains(k);
            for (name, u) in self.users.set_users(k) {
                let dirs = reach.entry(name.as_str()).or_default();
                if u.own_side && member_only && matches!(k, SetKey::NamedPort { .. }) {
                    dirs[u.dir].1.insert(k);
                } else {
                    dirs[u.dir].0 = true;
                }
            }
        }
        let mut memo = Memo::new(model);
        memo.changed = Some(&changes.endpoints);
        // Whether a named-port set's changed members include one of `own`.
        let own_changed = |k: &SetKey, own: &[std::net::IpAddr]| {
            changes.members.get(k).is_some_and(|d| {
                d.added
                    .ip_ports
                    .iter()
                    .chain(&d.removed.ip_ports)
                    .any(|(ip, ..)| own.contains(ip))
            })
        };
        for name in &changes.policies {
            let r = reach.entry(name.as_str()).or_default();
            r[0].0 = true;
            r[1].0 = true;
        }
        let mut affected: FastSet<&str> = changes.endpoints.iter().map(String::as_str).collect();
        // defaultEndpointToHostAction is in every endpoint's entry.
        if changes.endpoint_to_host {
            affected.extend(model.endpoint_tiers.keys().map(String::as_str));
        }
        for (p, dirs) in &reach {
            for (d, (other, own_sets)) in dirs.iter().enumerate() {
                if !*other && own_sets.is_empty() {
                    continue;
                }
                for iface in self.users.users(p, d) {
                    // The model's own name (the index's is borrowed from `self`, which programming changes).
                    let Some((iface, _)) = model.endpoint_tiers.get_key_value(iface) else {
                        continue;
                    };
                    if !affected.contains(iface.as_str())
                        && (*other || own_sets.iter().any(|k| own_changed(k, memo.ips_of(iface))))
                    {
                        affected.insert(iface);
                    }
                }
            }
        }
        self.patch_in_place(model, &affected, &mut memo, &mut stats)?;
        for iface in affected {
            if memo.ips.contains_key(iface) {
                self.program(model, iface, false, &mut memo, &mut stats, &mut errors)?;
            } else {
                self.unprogram(iface, &mut stats)?;
            }
        }
        if errors.is_empty() {
            Ok(stats)
        } else {
            Err(BpfError::Load(errors.join("; ")))
        }
    }
}

impl PolicyDataplane for BpfDataplane {
    fn converge(&mut self, model: &DataplaneModel) -> Result<ApplyStats, DataplaneError> {
        let r = self.in_netns(|me| me.converge_here(model));
        self.dirty = r.is_err();
        let stats = r?;
        if let Some(n) = &mut self.nat {
            n.converge(&model.nat_outgoing)?;
        }
        Ok(stats)
    }

    fn update(&mut self, model: &DataplaneModel, changes: &Changes) -> Result<ApplyStats, DataplaneError> {
        if self.dirty {
            return self.converge(model);
        }
        let r = self.in_netns(|me| me.update_here(model, changes));
        self.dirty = r.is_err();
        let stats = r?;
        if let Some(n) = &mut self.nat
            && changes.nat
        {
            n.update(&model.nat_outgoing)?;
        }
        Ok(stats)
    }

    /// Packets between two local pods skipped the node's stack (`to_local_pod`), so the kernel's tracker
    /// holds such a flow as it was when BPF took over, its TCP window long behind: the iptables backend
    /// would drop its next packet as INVALID. Each such entry is written again, established and answered,
    /// without window data, so the kernel takes the window up again from the flow's next packets: the flow
    /// stays established for the new backend, as it was for this one.
    fn hand_over(&mut self, model: &DataplaneModel) -> Result<(), DataplaneError> {
        let local: BTreeSet<std::net::IpAddr> = model
            .endpoints
            .iter()
            .flat_map(|e| e.ips.iter().copied())
            .collect();
        self.in_netns(move |_| {
            for t in bypassed_flows(&local) {
                let (sport, dport) = (t.sport.to_string(), t.dport.to_string());
                let (src, dst) = (t.src.to_string(), t.dst.to_string());
                let tuple = [
                    "-p", "tcp", "-s", &src, "-d", &dst, "--sport", &sport, "--dport", &dport,
                ];
                let reply = [
                    "-r",
                    &dst,
                    "-q",
                    &src,
                    "--reply-port-src",
                    &dport,
                    "--reply-port-dst",
                    &sport,
                ];
                let conntrack = |args: &[&str]| {
                    std::process::Command::new("conntrack")
                        .args(args)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status()
                };
                // Gone already (the flow ended meanwhile) is fine: nothing is written back then.
                if conntrack(&[&["-D"][..], &tuple[..]].concat()).is_ok_and(|s| s.success()) {
                    let _ = conntrack(
                        &[
                            &["-I"][..],
                            &tuple[..],
                            &reply[..],
                            &[
                                "--state",
                                "ESTABLISHED",
                                "--status",
                                "ASSURED,SEEN_REPLY",
                                "--timeout",
                                "432000",
                            ][..],
                        ]
                        .concat(),
                    );
                }
            }
            Ok(())
        })
        .map_err(DataplaneError::from)
    }

    fn remove_nat(&mut self) -> Vec<DataplaneError> {
        self.nat
            .as_mut()
            .map(crate::dataplane::NatProgram::remove)
            .unwrap_or_default()
    }

    fn remove_all(&mut self) -> Result<(), Vec<DataplaneError>> {
        self.loaded = None;
        self.tables.clear();
        self.endpoints.clear();
        self.attached.clear();
        self.dirty = true;
        super::remove_all(&self.dir).map_err(|e| vec![e.into()])
    }
}

/// The flags of every endpoint's entry: what `defaultEndpointToHostAction` asks (Drop: [`super::EP_HOST_DROP`];
/// Return hands the packet to the stack, where the host's own input rules see it, as Accept does).
fn endpoint_flags(model: &DataplaneModel) -> u32 {
    match model.endpoint_to_host {
        caracal_policy::model::EndpointToHost::Drop => super::EP_HOST_DROP,
        caracal_policy::model::EndpointToHost::Return | caracal_policy::model::EndpointToHost::Accept => 0,
    }
}

/// The connection tracker entries for the kernel's answered flows (`/proc/thread-self/net/nf_conntrack`,
/// this thread's namespace) that touch a local endpoint: one per endpoint interface and direction the flow
/// crosses, keyed as the programs key a flow (its original tuple, and the reply tuple reversed when the
/// kernel translated it). Only flows with replies are taken: a flow some policy denied never got one, so
/// taking over adds no flow that was not allowed. A flow the kernel translated (kube-proxy's DNAT) is marked
/// [`super::CT_STACK`]: its packets keep going through the stack, whose tracker undoes the translation.
/// Missing conntrack (no module) yields nothing.
fn seed_flows(model: &DataplaneModel) -> Vec<(super::CtKey, u8)> {
    let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/nf_conntrack") else {
        return Vec::new();
    };
    let mut by_ip: BTreeMap<std::net::IpAddr, u32> = BTreeMap::new();
    for ep in &model.endpoints {
        if let Ok(ifindex) = nix::net::if_::if_nametoindex(ep.iface.as_str()) {
            for ip in &ep.ips {
                by_ip.insert(*ip, ifindex);
            }
        }
    }
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some((orig, reply)) = conntrack_tuples(line) {
            // Translated by the kernel (kube-proxy's DNAT): only the stack can undo it.
            let flags = if reply.reversed() == orig {
                0
            } else {
                super::CT_STACK
            };
            for t in [orig, reply.reversed()] {
                for ip in [t.src, t.dst] {
                    if let Some(ifindex) = by_ip.get(&ip) {
                        let key = (t.key(*ifindex), flags);
                        if !out.contains(&key) {
                            out.push(key);
                        }
                    }
                }
            }
        }
    }
    out
}

/// The kernel tracker's established TCP flows (this thread's namespace) between two of `local`'s addresses,
/// untranslated: the flows whose packets `to_local_pod` took past the stack.
fn bypassed_flows(local: &BTreeSet<std::net::IpAddr>) -> Vec<Tuple> {
    let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/nf_conntrack") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(conntrack_tuples)
        .filter(|(orig, reply)| {
            orig.proto == 6
                && *reply == orig.reversed()
                && local.contains(&orig.src)
                && local.contains(&orig.dst)
        })
        .map(|(orig, _)| orig)
        .collect()
}

/// One direction of a conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tuple {
    proto: u8,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    sport: u16,
    dport: u16,
}

impl Tuple {
    fn reversed(self) -> Self {
        Tuple {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..self
        }
    }

    fn key(&self, ifindex: u32) -> super::CtKey {
        super::CtKey {
            ifindex,
            src: tables::addr16(self.src),
            dst: tables::addr16(self.dst),
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            pad: [0; 3],
        }
    }
}

/// The original and reply tuples of an answered TCP (established), UDP, SCTP or ICMP echo entry of
/// `nf_conntrack`: `ipv4 2 tcp 6 431999 ESTABLISHED src=.. dst=.. sport=.. dport=.. src=.. dst=.. sport=..
/// dport=.. [ASSURED] ...`. ICMP echo keeps its identifier in both ports, as the programs do.
fn conntrack_tuples(line: &str) -> Option<(Tuple, Tuple)> {
    if line.contains("[UNREPLIED]") {
        return None;
    }
    let fields: Vec<&str> = line.split_whitespace().collect();
    let proto: u8 = fields.get(3)?.parse().ok()?;
    if proto == 6 && !fields.contains(&"ESTABLISHED") {
        return None;
    }
    let mut tuples: Vec<Tuple> = Vec::new();
    let mut cur: Option<Tuple> = None;
    let unspecified = std::net::IpAddr::from([0u8, 0, 0, 0]);
    for f in &fields {
        let Some((k, v)) = f.split_once('=') else { continue };
        match k {
            "src" => {
                if let Some(t) = cur.take() {
                    tuples.push(t);
                }
                cur = Some(Tuple {
                    proto,
                    src: v.parse().ok()?,
                    dst: unspecified,
                    sport: 0,
                    dport: 0,
                });
            }
            "dst" => cur.as_mut()?.dst = v.parse().ok()?,
            "sport" => cur.as_mut()?.sport = v.parse().ok()?,
            "dport" => cur.as_mut()?.dport = v.parse().ok()?,
            "id" => {
                let id: u16 = v.parse().ok()?;
                let t = cur.as_mut()?;
                t.sport = id.to_be();
                t.dport = id.to_be();
            }
            _ => {}
        }
    }
    tuples.extend(cur);
    match tuples.as_slice() {
        [orig, reply] => Some((*orig, *reply)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_lines_give_answered_flows_only() {
        let tcp = "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.1.2 dst=10.0.1.3 sport=40000 dport=80 src=10.0.1.3 dst=10.0.1.2 sport=80 dport=40000 [ASSURED] mark=0 zone=0 use=2";
        let (orig, reply) = conntrack_tuples(tcp).expect("parsed");
        assert_eq!(orig.dport, 80);
        assert_eq!(reply.reversed(), orig);
        let unanswered = "ipv4     2 tcp      6 119 SYN_SENT src=10.0.1.2 dst=10.0.1.3 sport=40001 dport=81 [UNREPLIED] src=10.0.1.3 dst=10.0.1.2 sport=81 dport=40001 mark=0 zone=0 use=2";
        assert_eq!(conntrack_tuples(unanswered), None);
        let closing = "ipv4     2 tcp      6 100 TIME_WAIT src=10.0.1.2 dst=10.0.1.3 sport=40002 dport=80 src=10.0.1.3 dst=10.0.1.2 sport=80 dport=40002 [ASSURED] mark=0 zone=0 use=2";
        assert_eq!(conntrack_tuples(closing), None);
        let echo = "ipv4     2 icmp     1 29 src=10.0.1.2 dst=10.0.1.3 type=8 code=0 id=4660 src=10.0.1.3 dst=10.0.1.2 type=0 code=0 id=4660 mark=0 zone=0 use=2";
        let (orig, _) = conntrack_tuples(echo).expect("echo");
        assert_eq!(orig.sport, 4660u16.to_be());
        let dnat = "ipv4     2 udp      17 110 src=10.0.1.2 dst=10.96.0.10 sport=5000 dport=53 src=10.0.1.9 dst=10.0.1.2 sport=53 dport=5000 [ASSURED] mark=0 zone=0 use=2";
        let (orig, reply) = conntrack_tuples(dnat).expect("dnat");
        assert_eq!(orig.dst.to_string(), "10.96.0.10");
        assert_eq!(reply.reversed().dst.to_string(), "10.0.1.9");
    }
}
