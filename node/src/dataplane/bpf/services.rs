//! Writing Service frontends into the BPF maps the running agent pinned ([`super::Loaded::load`]), without
//! loading the programs again.
//!
//! A frontend names a backend set by id; a set is written whole under a new id (its backends by index, and
//! by member for affinity checks) before the frontend is flipped to it, and the old set is deleted after,
//! so a new connection sees the old backends or the new ones, never a set half written. What is already in
//! the maps (an earlier run's) is read back at start and kept where it is still wanted: a restart rewrites
//! nothing that did not change, and established flows keep their translation in the connection tracker.

use std::collections::BTreeMap;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData};

use super::{
    Backend, BackendKey, BpfError, MAP_BACKEND, MAP_MEMBER, MAP_SVC, MemberKey, SvcKey, SvcValue, absent_ok,
    map_error,
};
use crate::services::model::Frontend;

/// `SVC_AFFINITY` of policy.c.
const SVC_AFFINITY: u16 = 1;

/// What one [`ServiceMaps::apply`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Frontends written (new or changed).
    pub written: usize,
    /// Frontends removed.
    pub removed: usize,
    /// Frontends left as they were.
    pub kept: usize,
}

/// The Service maps, opened from their pins.
pub struct ServiceMaps {
    svc: HashMap<MapData, SvcKey, SvcValue>,
    backend: HashMap<MapData, BackendKey, Backend>,
    member: HashMap<MapData, MemberKey, u32>,
    /// What each frontend holds now: its value and its set's backends.
    programmed: BTreeMap<SvcKey, (SvcValue, Vec<Backend>)>,
    next_set: u32,
}

fn open<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, BpfError> {
    let data = MapData::from_pin(dir.join(name)).map_err(|e| map_error(name, e))?;
    HashMap::try_from(Map::HashMap(data)).map_err(|e| map_error(name, e))
}

impl ServiceMaps {
    /// Opens the maps pinned under `dir` and reads what they hold.
    pub fn open(dir: &Path) -> Result<Self, BpfError> {
        let svc: HashMap<MapData, SvcKey, SvcValue> = open(dir, MAP_SVC)?;
        let backend: HashMap<MapData, BackendKey, Backend> = open(dir, MAP_BACKEND)?;
        let member = open(dir, MAP_MEMBER)?;
        let mut programmed = BTreeMap::new();
        let mut next_set = 1;
        for (k, v) in svc.iter().filter_map(Result::ok) {
            let backends: Vec<Backend> = (0..u32::from(v.count))
                .filter_map(|index| backend.get(&BackendKey { set: v.set, index }, 0).ok())
                .collect();
            next_set = next_set.max(v.set.wrapping_add(1));
            programmed.insert(k, (v, backends));
        }
        Ok(ServiceMaps {
            svc,
            backend,
            member,
            programmed,
            next_set: next_set.max(1),
        })
    }

    /// The frontends as programmed.
    pub fn programmed(&self) -> &BTreeMap<SvcKey, (SvcValue, Vec<Backend>)> {
        &self.programmed
    }

    /// A set id no frontend uses (`in_use`, which it joins).
    fn new_set(&mut self, in_use: &mut std::collections::BTreeSet<u32>) -> u32 {
        loop {
            let id = self.next_set;
            self.next_set = self.next_set.wrapping_add(1).max(1);
            if in_use.insert(id) {
                return id;
            }
        }
    }

    fn delete_set(&mut self, set: u32, backends: &[Backend]) -> Result<(), BpfError> {
        for (i, b) in backends.iter().enumerate() {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            absent_ok(MAP_BACKEND, self.backend.remove(&BackendKey { set, index }))?;
            let mk = MemberKey {
                set,
                addr: b.addr,
                port: b.port,
                pad: 0,
            };
            absent_ok(MAP_MEMBER, self.member.remove(&mk))?;
        }
        Ok(())
    }

    /// Makes the maps hold exactly `desired`: changed frontends get a new set, flipped to once written;
    /// gone ones are removed, their sets after them.
    pub fn apply(&mut self, desired: &BTreeMap<SvcKey, Frontend>) -> Result<Applied, BpfError> {
        let mut done = Applied::default();
        let mut in_use = self.programmed.values().map(|(v, _)| v.set).collect();
        for (key, f) in desired {
            let flags = if f.affinity_s.is_some() { SVC_AFFINITY } else { 0 };
            let affinity_s = f.affinity_s.unwrap_or(0);
            if let Some((v, b)) = self.programmed.get(key)
                && *b == f.backends
                && v.flags == flags
                && v.affinity_s == affinity_s
            {
                done.kept += 1;
                continue;
            }
            let set = self.new_set(&mut in_use);
            for (i, b) in f.backends.iter().enumerate() {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                self.backend
                    .insert(BackendKey { set, index }, *b, 0)
                    .map_err(|e| map_error(MAP_BACKEND, e))?;
                let mk = MemberKey {
                    set,
                    addr: b.addr,
                    port: b.port,
                    pad: 0,
                };
                self.member
                    .insert(mk, index, 0)
                    .map_err(|e| map_error(MAP_MEMBER, e))?;
            }
            let value = SvcValue {
                set,
                count: u16::try_from(f.backends.len()).unwrap_or(u16::MAX),
                flags,
                affinity_s,
                pad: 0,
            };
            self.svc
                .insert(*key, value, 0)
                .map_err(|e| map_error(MAP_SVC, e))?;
            if let Some((old, backends)) = self.programmed.insert(*key, (value, f.backends.clone())) {
                self.delete_set(old.set, &backends)?;
            }
            done.written += 1;
        }
        let gone: Vec<SvcKey> = self
            .programmed
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            absent_ok(MAP_SVC, self.svc.remove(&key))?;
            if let Some((old, backends)) = self.programmed.remove(&key) {
                self.delete_set(old.set, &backends)?;
            }
            done.removed += 1;
        }
        Ok(done)
    }
}
