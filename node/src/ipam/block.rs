//! Allocation inside one IPAM block: which addresses are free, who holds the others, and the conversion to
//! and from the `IPAMBlock` object that stores it. Pure: persistence (compare-and-swap on the object's
//! resourceVersion) is the caller's, so an allocation exists only once the block that records it is stored.

use std::collections::BTreeMap;
use std::net::IpAddr;

use caracal_crds::ipam::{AllocationAttribute, IPAMBlockSpec};
use caracal_crds::schema::Cidr;
use ipnet::IpNet;

/// Why an allocation or release was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// Not enough free addresses.
    #[error("block {cidr} has {free} free addresses, {wanted} were asked for")]
    Full {
        /// The block.
        cidr: IpNet,
        /// Free addresses.
        free: usize,
        /// Asked for.
        wanted: usize,
    },
    /// The address is not in this block.
    #[error("{ip} is not in block {cidr}")]
    NotInBlock {
        /// The address.
        ip: IpAddr,
        /// The block.
        cidr: IpNet,
    },
    /// The stored object is inconsistent (wrong allocation count, an out-of-range index).
    #[error("IPAMBlock {cidr} is inconsistent: {why}")]
    Corrupt {
        /// The block.
        cidr: IpNet,
        /// What is wrong.
        why: String,
    },
}

/// One block's allocation state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The block's network.
    pub cidr: IpNet,
    /// `host:<node>` or None.
    pub affinity: Option<String>,
    /// Only the affine node may allocate here (no borrowing).
    pub strict_affinity: bool,
    /// Per address offset: the index into `attributes` of its holder.
    allocations: Vec<Option<u32>>,
    /// Free offsets, in hand-out order (released addresses go to the back, so they are reused last).
    unallocated: Vec<u32>,
    /// Holders.
    attributes: Vec<AllocationAttribute>,
    /// Bumped on every change.
    pub sequence: u64,
}

fn size(cidr: IpNet) -> usize {
    1usize << (cidr.max_prefix_len() - cidr.prefix_len()).min(20)
}

fn offset_ip(cidr: IpNet, offset: u32) -> IpAddr {
    match cidr.network() {
        IpAddr::V4(a) => IpAddr::V4(std::net::Ipv4Addr::from(u32::from(a) + offset)),
        IpAddr::V6(a) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(a) + u128::from(offset))),
    }
}

fn ip_offset(cidr: IpNet, ip: IpAddr) -> Option<u32> {
    if !cidr.contains(&ip) {
        return None;
    }
    match (cidr.network(), ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a).checked_sub(u32::from(n)),
        (IpAddr::V6(n), IpAddr::V6(a)) => u32::try_from(u128::from(a) - u128::from(n)).ok(),
        _ => None,
    }
}

impl Block {
    /// A new empty block (at most 4096 addresses, as the CRD allows).
    pub fn new(cidr: IpNet, affinity: Option<String>) -> Self {
        let n = size(cidr);
        Block {
            cidr,
            affinity,
            strict_affinity: false,
            allocations: vec![None; n],
            unallocated: (0..u32::try_from(n).unwrap_or(u32::MAX)).collect(),
            attributes: Vec::new(),
            sequence: 0,
        }
    }

    /// Free addresses.
    pub fn free(&self) -> usize {
        self.unallocated.len()
    }

    /// True when nothing is allocated.
    pub fn is_empty(&self) -> bool {
        self.allocations.iter().all(Option::is_none)
    }

    /// Allocates `n` addresses for `handle` with `attrs` (namespace, pod, node...). All or nothing.
    pub fn assign(
        &mut self,
        n: usize,
        handle: &str,
        attrs: BTreeMap<String, String>,
    ) -> Result<Vec<IpAddr>, BlockError> {
        if self.unallocated.len() < n {
            return Err(BlockError::Full {
                cidr: self.cidr,
                free: self.unallocated.len(),
                wanted: n,
            });
        }
        let index = match self
            .attributes
            .iter()
            .position(|a| a.handle_id.as_deref() == Some(handle) && a.secondary == attrs)
        {
            Some(i) => i,
            None => {
                self.attributes.push(AllocationAttribute {
                    handle_id: Some(handle.to_owned()),
                    secondary: attrs,
                });
                self.attributes.len() - 1
            }
        };
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let taken: Vec<u32> = self.unallocated.drain(..n).collect();
        for o in &taken {
            self.allocations[*o as usize] = Some(index);
        }
        self.sequence += 1;
        Ok(taken.into_iter().map(|o| offset_ip(self.cidr, o)).collect())
    }

    /// The handle holding `ip`, if allocated.
    pub fn holder(&self, ip: IpAddr) -> Option<&str> {
        let o = ip_offset(self.cidr, ip)? as usize;
        let idx = (*self.allocations.get(o)?)? as usize;
        self.attributes.get(idx)?.handle_id.as_deref()
    }

    /// The holder record (handle and attributes) of `ip`, if allocated.
    pub fn attributes_of(&self, ip: IpAddr) -> Option<&AllocationAttribute> {
        let o = ip_offset(self.cidr, ip)? as usize;
        let idx = (*self.allocations.get(o)?)? as usize;
        self.attributes.get(idx)
    }

    /// Hands an already allocated `ip` to another holder (a node's reserved address given to a pod).
    /// Returns false, changing nothing, when `ip` is free.
    pub fn reassign(
        &mut self,
        ip: IpAddr,
        handle: &str,
        attrs: BTreeMap<String, String>,
    ) -> Result<bool, BlockError> {
        let o = ip_offset(self.cidr, ip).ok_or(BlockError::NotInBlock { ip, cidr: self.cidr })? as usize;
        if self.allocations[o].is_none() {
            return Ok(false);
        }
        let index = match self
            .attributes
            .iter()
            .position(|a| a.handle_id.as_deref() == Some(handle) && a.secondary == attrs)
        {
            Some(i) => i,
            None => {
                self.attributes.push(AllocationAttribute {
                    handle_id: Some(handle.to_owned()),
                    secondary: attrs,
                });
                self.attributes.len() - 1
            }
        };
        self.allocations[o] = Some(u32::try_from(index).unwrap_or(u32::MAX));
        self.gc_attributes();
        self.sequence += 1;
        Ok(true)
    }

    /// Releases `ip`; releasing a free address is a no-op (DEL is idempotent). Returns whether it was held.
    pub fn release(&mut self, ip: IpAddr) -> Result<bool, BlockError> {
        let o = ip_offset(self.cidr, ip).ok_or(BlockError::NotInBlock { ip, cidr: self.cidr })?;
        let slot = &mut self.allocations[o as usize];
        if slot.take().is_none() {
            return Ok(false);
        }
        self.unallocated.push(o);
        self.gc_attributes();
        self.sequence += 1;
        Ok(true)
    }

    /// Releases every address `handle` holds; returns them.
    pub fn release_handle(&mut self, handle: &str) -> Vec<IpAddr> {
        let idx: Vec<u32> = self
            .attributes
            .iter()
            .enumerate()
            .filter(|(_, a)| a.handle_id.as_deref() == Some(handle))
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .collect();
        let mut out = Vec::new();
        for (o, slot) in self.allocations.iter_mut().enumerate() {
            if slot.is_some_and(|i| idx.contains(&i)) {
                *slot = None;
                let o = u32::try_from(o).unwrap_or(u32::MAX);
                self.unallocated.push(o);
                out.push(offset_ip(self.cidr, o));
            }
        }
        if !out.is_empty() {
            self.gc_attributes();
            self.sequence += 1;
        }
        out
    }

    /// Drops holders no address refers to, renumbering the references.
    fn gc_attributes(&mut self) {
        let used: std::collections::BTreeSet<u32> = self.allocations.iter().flatten().copied().collect();
        let mut renumber = BTreeMap::new();
        let mut kept = Vec::new();
        for (i, a) in self.attributes.drain(..).enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            if used.contains(&i) {
                renumber.insert(i, u32::try_from(kept.len()).unwrap_or(u32::MAX));
                kept.push(a);
            }
        }
        self.attributes = kept;
        for slot in self.allocations.iter_mut().flatten() {
            *slot = renumber[slot];
        }
    }

    /// Every allocated address with its handle.
    pub fn allocated(&self) -> Vec<(IpAddr, String)> {
        self.allocations
            .iter()
            .enumerate()
            .filter_map(|(o, slot)| {
                let handle = self.attributes.get((*slot)? as usize)?.handle_id.clone()?;
                Some((offset_ip(self.cidr, u32::try_from(o).ok()?), handle))
            })
            .collect()
    }

    /// The stored form.
    pub fn to_spec(&self) -> IPAMBlockSpec {
        IPAMBlockSpec {
            cidr: Cidr(self.cidr),
            affinity: self.affinity.clone(),
            strict_affinity: self.strict_affinity,
            allocations: self.allocations.clone(),
            unallocated: self.unallocated.clone(),
            attributes: self.attributes.clone(),
            sequence_number: self.sequence,
            deleted: false,
        }
    }

    /// Reads the stored form, checking it is consistent (every address either free or held, never both).
    pub fn from_spec(spec: &IPAMBlockSpec) -> Result<Self, BlockError> {
        let cidr = spec.cidr.0;
        let corrupt = |why: String| BlockError::Corrupt { cidr, why };
        if spec.allocations.len() != size(cidr) {
            return Err(corrupt(format!(
                "{} allocation entries for {} addresses",
                spec.allocations.len(),
                size(cidr)
            )));
        }
        let mut seen = vec![false; size(cidr)];
        for o in &spec.unallocated {
            let o = *o as usize;
            if o >= seen.len() || seen[o] || spec.allocations[o].is_some() {
                return Err(corrupt(format!(
                    "offset {o} is listed free twice, out of range, or also allocated"
                )));
            }
            seen[o] = true;
        }
        for (o, slot) in spec.allocations.iter().enumerate() {
            match slot {
                Some(i) if (*i as usize) >= spec.attributes.len() => {
                    return Err(corrupt(format!(
                        "offset {o} refers to holder {i}, which does not exist"
                    )));
                }
                None if !seen[o] => return Err(corrupt(format!("offset {o} is neither allocated nor free"))),
                _ => {}
            }
        }
        Ok(Block {
            cidr,
            affinity: spec.affinity.clone(),
            strict_affinity: spec.strict_affinity,
            allocations: spec.allocations.clone(),
            unallocated: spec.unallocated.clone(),
            attributes: spec.attributes.clone(),
            sequence: spec.sequence_number,
        })
    }
}

/// The blocks of size `block_prefix` a pool is carved into, in order.
pub fn blocks_of(pool: IpNet, block_prefix: u8) -> impl Iterator<Item = IpNet> {
    pool.subnets(block_prefix).into_iter().flatten()
}

/// The object name of the IPAMBlock for `cidr` (`10-244-0-0-26`).
pub fn block_name(cidr: IpNet) -> String {
    cidr.to_string().replace(['.', ':', '/'], "-")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use caracal_policy::synth::Rng;

    fn attrs(pod: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("pod".to_owned(), pod.to_owned())])
    }

    #[test]
    fn a_26_hands_out_64_addresses_then_refuses() {
        let mut b = Block::new("10.244.1.0/26".parse().unwrap(), Some("host:n1".into()));
        let first = b.assign(1, "h0", attrs("p0")).unwrap();
        assert_eq!(first, vec!["10.244.1.0".parse::<IpAddr>().unwrap()]);
        for i in 1..64 {
            b.assign(1, &format!("h{i}"), attrs("p")).unwrap();
        }
        assert_eq!(b.free(), 0);
        assert_eq!(
            b.assign(1, "more", attrs("x")),
            Err(BlockError::Full {
                cidr: b.cidr,
                free: 0,
                wanted: 1
            })
        );
    }

    #[test]
    fn a_reserved_address_can_be_handed_to_a_pod_and_the_reserve_record_goes_when_unused() {
        let mut b = Block::new("10.0.0.0/30".parse().unwrap(), None);
        let reserved = b.assign(2, "reserve", attrs("-")).unwrap();
        assert!(b.reassign(reserved[0], "pod-a", attrs("a")).unwrap());
        assert_eq!(b.holder(reserved[0]), Some("pod-a"));
        assert_eq!(b.holder(reserved[1]), Some("reserve"));
        assert!(b.reassign(reserved[1], "pod-b", attrs("b")).unwrap());
        assert!(
            b.to_spec()
                .attributes
                .iter()
                .all(|a| a.handle_id.as_deref() != Some("reserve"))
        );
        assert_eq!(b.attributes_of(reserved[1]).unwrap().secondary, attrs("b"));
        let free = "10.0.0.3".parse().unwrap();
        assert!(
            !b.reassign(free, "pod-c", attrs("c")).unwrap(),
            "a free address is not reassigned"
        );
        assert_eq!(Block::from_spec(&b.to_spec()).unwrap(), b);
    }

    #[test]
    fn release_is_idempotent_and_released_addresses_are_reused_last() {
        let mut b = Block::new("10.0.0.0/30".parse().unwrap(), None);
        let ips: Vec<IpAddr> = (0..3)
            .flat_map(|i| b.assign(1, &format!("h{i}"), attrs("p")).unwrap())
            .collect();
        assert!(b.release(ips[0]).unwrap());
        assert!(!b.release(ips[0]).unwrap(), "a second release is a no-op");
        assert_eq!(
            b.assign(1, "h9", attrs("p")).unwrap(),
            vec!["10.0.0.3".parse::<IpAddr>().unwrap()],
            "never-used first"
        );
        assert_eq!(b.assign(1, "h10", attrs("p")).unwrap(), vec![ips[0]]);
        assert!(matches!(
            b.release("10.9.9.9".parse().unwrap()),
            Err(BlockError::NotInBlock { .. })
        ));
    }

    #[test]
    fn a_handle_releases_all_it_holds_and_holders_are_compacted() {
        let mut b = Block::new("fd00::/122".parse().unwrap(), None);
        b.assign(2, "pod-a", attrs("a")).unwrap();
        b.assign(1, "pod-b", attrs("b")).unwrap();
        assert_eq!(b.release_handle("pod-a").len(), 2);
        assert_eq!(b.allocated().len(), 1);
        assert_eq!(b.to_spec().attributes.len(), 1);
        assert_eq!(b.holder("fd00::2".parse().unwrap()), Some("pod-b"));
    }

    #[test]
    fn the_stored_form_round_trips_and_inconsistency_is_refused() {
        let mut b = Block::new("10.1.0.0/28".parse().unwrap(), Some("host:n2".into()));
        b.assign(3, "h", attrs("p")).unwrap();
        let spec = b.to_spec();
        assert_eq!(Block::from_spec(&spec).unwrap(), b);
        let mut bad = spec.clone();
        bad.unallocated.push(0);
        assert!(matches!(Block::from_spec(&bad), Err(BlockError::Corrupt { .. })));
        let mut bad = spec;
        bad.allocations.pop();
        assert!(matches!(Block::from_spec(&bad), Err(BlockError::Corrupt { .. })));
    }

    #[test]
    fn no_address_is_ever_held_twice_under_random_assign_and_release() {
        let mut rng = Rng(12345);
        let mut b = Block::new("10.2.0.0/26".parse().unwrap(), None);
        let mut held: BTreeMap<IpAddr, String> = BTreeMap::new();
        for step in 0..5000 {
            if rng.below(3) > 0 && b.free() > 0 {
                let h = format!("h{step}");
                for ip in b
                    .assign(1 + rng.below(2).min(b.free() as u64 - 1) as usize, &h, attrs("p"))
                    .unwrap()
                {
                    assert!(
                        held.insert(ip, h.clone()).is_none(),
                        "step {step}: {ip} handed out twice"
                    );
                }
            } else if let Some((&ip, _)) = held.iter().nth(rng.below(held.len().max(1) as u64) as usize) {
                assert!(b.release(ip).unwrap());
                held.remove(&ip);
            }
            assert_eq!(b.free() + held.len(), 64);
            let stored = Block::from_spec(&b.to_spec()).unwrap();
            let alloc: BTreeSet<IpAddr> = stored.allocated().into_iter().map(|(ip, _)| ip).collect();
            assert_eq!(alloc, held.keys().copied().collect::<BTreeSet<_>>());
        }
    }

    #[test]
    fn pools_carve_into_blocks_with_stable_names() {
        let blocks: Vec<IpNet> = blocks_of("10.244.0.0/24".parse().unwrap(), 26).collect();
        assert_eq!(blocks.len(), 4);
        assert_eq!(block_name(blocks[1]), "10-244-0-64-26");
        assert_eq!(blocks_of("fd00::/120".parse().unwrap(), 122).count(), 4);
    }
}
