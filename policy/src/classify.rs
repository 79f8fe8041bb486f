//! One endpoint's policy in one direction as a first-match list, and the pieces that turn that list into the
//! lookup tables of the BPF data plane (docs/bpf.md, "Policy as data").
//!
//! - [`flatten`]: the tiers the model gives an endpoint become one ordered list of entries: each tier's rules
//!   (`Log` rules left out: they decide nothing), then the tier's default as a rule that matches everything
//!   (`Deny`, or `Pass` to the next tier), and finally an `Allow` that matches everything (an endpoint that
//!   every tier passed, or that no policy selects, is allowed). A rule's `Pass` jumps to the first entry of
//!   the next tier.
//! - [`decide`]: the verdict of a flattened list for a packet, given which entries match it: the first
//!   matching entry decides, a `Pass` continues from where it points. The BPF program computes the same with
//!   bitmaps ([`Bitmap::first_set_from`]); this is the reference it is tested against, and it is tested
//!   against the contract evaluator itself.
//! - [`Regions`]: the address (or port) regions over which every set condition of the rules is constant, one
//!   per prefix any set mentions plus the default /0: an address belongs to the region of its longest
//!   matching prefix, and it is in a set exactly when the set holds a prefix containing that region. A table
//!   keyed by those prefixes, looked up by longest match, is therefore exact.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::ir::{Action, Direction, Policy, Rule, TierDefault};
use crate::model::TierRef;

/// What an entry of a flattened list does when it is the first to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryAction {
    /// Allow the flow.
    Allow,
    /// Drop it.
    Deny,
    /// Go on from entry `to` (the first entry of the next tier).
    Pass {
        /// Where evaluation continues.
        to: usize,
    },
}

/// One entry of a flattened list.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry<'a> {
    /// The rule whose match it is; None for a tier's default and the final Allow, which match everything.
    pub rule: Option<&'a Rule>,
    /// What it does.
    pub action: EntryAction,
    /// The policy it comes from (None for a tier's default and the final Allow).
    pub policy: Option<&'a str>,
    /// The tier it belongs to (None for the final Allow).
    pub tier: Option<&'a str>,
}

/// Flattens `tiers` (as the model lists them for one endpoint and `dir`, only the selecting policies) into
/// a first-match list (see the module docs). A policy named in a tier but absent from `policies`, or without
/// rules for `dir`, does not select the endpoint in that direction; a tier left without a selecting policy
/// is skipped, as the contract evaluator skips it.
pub fn flatten<'a>(
    tiers: &'a [TierRef],
    policies: &'a BTreeMap<String, Policy>,
    dir: Direction,
) -> Vec<Entry<'a>> {
    let mut out = Vec::new();
    for tier in tiers {
        let selecting: Vec<(&'a str, &'a [Rule])> = tier
            .policies
            .iter()
            .filter_map(|name| Some((name.as_str(), policies.get(name)?.rules(dir)?)))
            .collect();
        if selecting.is_empty() {
            continue;
        }
        let start = out.len();
        for (name, rules) in &selecting {
            for rule in rules.iter().filter(|r| r.action != Action::Log) {
                out.push(Entry {
                    rule: Some(rule),
                    action: match rule.action {
                        Action::Allow => EntryAction::Allow,
                        // Pass targets are set below, once the tier's end is known.
                        Action::Pass => EntryAction::Pass { to: 0 },
                        _ => EntryAction::Deny,
                    },
                    policy: Some(name),
                    tier: Some(tier.name.as_str()),
                });
            }
        }
        // The tier's default, then the next tier starts.
        let next = out.len() + 1;
        out.push(Entry {
            rule: None,
            action: match tier.default_action {
                TierDefault::Deny => EntryAction::Deny,
                TierDefault::Pass => EntryAction::Pass { to: next },
            },
            policy: None,
            tier: Some(tier.name.as_str()),
        });
        for e in &mut out[start..next - 1] {
            if let EntryAction::Pass { to } = &mut e.action {
                *to = next;
            }
        }
    }
    out.push(Entry {
        rule: None,
        action: EntryAction::Allow,
        policy: None,
        tier: None,
    });
    out
}

/// The verdict of `entries` for a packet: `matches(i)` says whether entry `i`'s rule matches it (entries
/// without a rule match everything and are not asked). True when allowed.
pub fn decide(entries: &[Entry<'_>], mut matches: impl FnMut(usize) -> bool) -> bool {
    let mut i = 0;
    while i < entries.len() {
        let e = &entries[i];
        if e.rule.is_none() || matches(i) {
            match e.action {
                EntryAction::Allow => return true,
                EntryAction::Deny => return false,
                EntryAction::Pass { to } => {
                    i = to;
                    continue;
                }
            }
        }
        i += 1;
    }
    // Unreachable for a list from `flatten` (it ends with a match-everything Allow).
    true
}

/// A fixed-size set of entry indexes, 64 to a word: what a field's lookup returns in the BPF tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: usize,
}

impl Bitmap {
    /// `bits` bits, all clear.
    pub fn new(bits: usize) -> Self {
        Self {
            words: vec![0; bits.div_ceil(64)],
            bits,
        }
    }

    /// `bits` bits, all set.
    pub fn full(bits: usize) -> Self {
        let mut b = Self::new(bits);
        for i in 0..bits {
            b.set(i);
        }
        b
    }

    /// How many bits it holds.
    pub fn len(&self) -> usize {
        self.bits
    }

    /// True when it holds no bits.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Sets bit `i` (ignored beyond the length).
    pub fn set(&mut self, i: usize) {
        if i < self.bits {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: usize) -> bool {
        i < self.bits && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Keeps only the bits also set in `other` (of the same length).
    pub fn and_assign(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= b;
        }
    }

    /// The first set bit at or after `start`.
    pub fn first_set_from(&self, start: usize) -> Option<usize> {
        let mut w = start / 64;
        if w >= self.words.len() {
            return None;
        }
        let mut word = self.words[w] & (!0u64 << (start % 64));
        loop {
            if word != 0 {
                let i = w * 64 + word.trailing_zeros() as usize;
                return (i < self.bits).then_some(i);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w];
        }
    }

    /// The words, lowest bits first (the layout the BPF maps store).
    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

/// [`decide`] over a bitmap of the matching entries, as the BPF program does it: the first set bit at or
/// after the current position decides; a `Pass` moves the position.
pub fn decide_bitmap(entries: &[Entry<'_>], matching: &Bitmap) -> bool {
    let mut at = 0;
    while let Some(i) = matching.first_set_from(at) {
        match entries.get(i).map(|e| e.action) {
            Some(EntryAction::Allow) | None => return true,
            Some(EntryAction::Deny) => return false,
            Some(EntryAction::Pass { to }) => at = to,
        }
    }
    true
}

/// The regions of an address space that a collection of prefix sets divides it into (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Regions {
    /// Every prefix mentioned, truncated, sorted and deduplicated, with the default route of each family
    /// present first.
    prefixes: Vec<IpNet>,
}

impl Regions {
    /// The regions of every prefix in `sets`, plus the default route of each family.
    pub fn new<'a>(sets: impl IntoIterator<Item = &'a IpNet>) -> Self {
        let mut prefixes: Vec<IpNet> = sets.into_iter().map(IpNet::trunc).collect();
        prefixes.push(IpNet::V4(ipnet::Ipv4Net::default()));
        prefixes.push(IpNet::V6(ipnet::Ipv6Net::default()));
        prefixes.sort();
        prefixes.dedup();
        Self { prefixes }
    }

    /// The prefixes, each standing for the addresses whose longest match it is.
    pub fn prefixes(&self) -> &[IpNet] {
        &self.prefixes
    }

    /// The region `addr` falls in: its longest matching prefix.
    pub fn of(&self, addr: std::net::IpAddr) -> IpNet {
        self.prefixes
            .iter()
            .filter(|p| p.contains(&addr))
            .max_by_key(|p| p.prefix_len())
            .copied()
            .unwrap_or_else(|| IpNet::from(addr))
    }

    /// Whether the addresses of `region` (one of [`Regions::prefixes`]) are in the set made of `set`'s
    /// prefixes: exactly when one of them contains the region.
    pub fn in_set(region: &IpNet, set: &[IpNet]) -> bool {
        set.iter().any(|q| q.contains(region))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use proptest::prelude::*;

    use super::*;

    fn v4(a: u8, b: u8, len: u8) -> IpNet {
        IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::new(10, 0, a, b), len).unwrap_or_default())
    }

    proptest! {
        /// Membership decided per region equals membership decided per address, for every address.
        #[test]
        fn a_set_is_constant_over_each_region(
            sets in prop::collection::vec(
                prop::collection::vec((0u8..4, any::<u8>(), 22u8..=32), 0..5), 1..4),
            addrs in prop::collection::vec((0u8..4, any::<u8>()), 1..40),
        ) {
            let sets: Vec<Vec<IpNet>> = sets
                .into_iter()
                .map(|s| s.into_iter().map(|(a, b, l)| v4(a, b, l).trunc()).collect())
                .collect();
            let regions = Regions::new(sets.iter().flatten());
            for (a, b) in addrs {
                let addr = IpAddr::V4(Ipv4Addr::new(10, 0, a, b));
                let region = regions.of(addr);
                prop_assert!(region.contains(&addr));
                for set in &sets {
                    prop_assert_eq!(
                        Regions::in_set(&region, set),
                        set.iter().any(|q| q.contains(&addr)),
                        "{} in region {}", addr, region
                    );
                }
            }
        }

        /// The bitmap walk decides as the list walk does.
        #[test]
        fn the_bitmap_walk_equals_the_list_walk(
            actions in prop::collection::vec(0u8..3, 1..150),
            matching in prop::collection::vec(any::<bool>(), 150),
        ) {
            let rule = Rule {
                action: Action::Allow,
                ip_version: None,
                protocol: None,
                not_protocol: None,
                icmp: None,
                not_icmp: None,
                source: crate::ir::EntityMatch::any(crate::ir::Scope::Any),
                destination: crate::ir::EntityMatch::any(crate::ir::Scope::Any),
            };
            let n = actions.len();
            let mut entries: Vec<Entry<'_>> = actions
                .iter()
                .enumerate()
                .map(|(i, a)| Entry {
                    rule: Some(&rule),
                    action: match a {
                        0 => EntryAction::Allow,
                        1 => EntryAction::Deny,
                        // A pass jumps forward, somewhere up to the end.
                        _ => EntryAction::Pass { to: (i + 1 + (i * 7) % 5).min(n) },
                    },
                    policy: None,
                    tier: None,
                })
                .collect();
            entries.push(Entry { rule: None, action: EntryAction::Allow, policy: None, tier: None });
            let mut bits = Bitmap::new(entries.len());
            for i in 0..entries.len() {
                if entries[i].rule.is_none() || matching[i % matching.len()] {
                    bits.set(i);
                }
            }
            prop_assert_eq!(
                decide_bitmap(&entries, &bits),
                decide(&entries, |i| matching[i % matching.len()])
            );
        }
    }

    #[test]
    fn first_set_from_crosses_words_and_stops_at_the_length() {
        let mut b = Bitmap::new(130);
        b.set(3);
        b.set(64);
        b.set(129);
        b.set(200);
        assert_eq!(b.first_set_from(0), Some(3));
        assert_eq!(b.first_set_from(4), Some(64));
        assert_eq!(b.first_set_from(65), Some(129));
        assert_eq!(b.first_set_from(130), None);
        assert!(!b.get(200));
        let mut f = Bitmap::full(130);
        f.and_assign(&b);
        assert_eq!(f, b);
    }
}
