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

    /// Which of `sets` each region is in, as [`Regions::in_set`] answers it: `out[region * sets + set]`, the
    /// regions in [`Regions::prefixes`] order. Every member of the sets must be among the prefixes (the
    /// regions were made from them); a member that is not is skipped.
    ///
    /// A member contains exactly the regions from its own up to the last whose network is still inside it,
    /// a run of the sorted prefixes: a region at the member's address but shorter sorts before it, and one
    /// at a later address inside it is aligned to a length at least the member's. So the cost is the
    /// members plus the regions they contain, not a lookup per region into every set.
    pub fn membership<'a, S: IntoIterator<Item = &'a IpNet>>(
        &self,
        sets: impl ExactSizeIterator<Item = S>,
    ) -> Vec<bool> {
        let k = sets.len();
        let mut out = vec![false; self.prefixes.len() * k];
        for (s, set) in sets.enumerate() {
            for q in set {
                let q = q.trunc();
                let Ok(start) = self.prefixes.binary_search(&q) else {
                    continue;
                };
                for (r, p) in self.prefixes.iter().enumerate().skip(start) {
                    if !q.contains(p) {
                        break;
                    }
                    out[r * k + s] = true;
                }
            }
        }
        out
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
                prop::collection::vec((0u8..4, any::<u8>(), 14u8..=32), 0..5), 1..4),
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
            // The membership the compiler uses answers as `in_set` for every region and set.
            let member = regions.membership(sets.iter());
            for (r, region) in regions.prefixes().iter().enumerate() {
                for (s, set) in sets.iter().enumerate() {
                    prop_assert_eq!(
                        member[r * sets.len() + s],
                        Regions::in_set(region, set),
                        "region {} in set {}", region, s
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

    proptest! {
        /// An interval's prefixes are disjoint and cover exactly the interval.
        #[test]
        fn port_prefixes_cover_exactly_the_interval(a in any::<u16>(), b in any::<u16>()) {
            let (lo, hi) = (a.min(b), a.max(b));
            let prefixes = port_prefixes(lo, hi);
            prop_assert!(prefixes.len() <= 30, "{} prefixes", prefixes.len());
            let mut covered = 0u32;
            for w in prefixes.windows(2) {
                let size = 1u32 << (16 - w[0].1);
                prop_assert_eq!(u32::from(w[0].0) + size, u32::from(w[1].0), "disjoint and contiguous");
            }
            for (start, len) in &prefixes {
                let size = 1u32 << (16 - len);
                prop_assert_eq!(u32::from(*start) % size, 0, "aligned");
                covered += size;
            }
            prop_assert_eq!(prefixes.first().map(|p| p.0), Some(lo));
            prop_assert_eq!(covered, u32::from(hi) - u32::from(lo) + 1);
        }
    }

    #[test]
    fn port_prefixes_of_known_intervals() {
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_prefixes(1024, 2047), vec![(1024, 6)]);
        assert_eq!(port_prefixes(79, 81), vec![(79, 16), (80, 15)]);
        assert_eq!(port_prefixes(65535, 65535), vec![(65535, 16)]);
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

/// Per-field lookup tables of one flattened list: each lookup returns the bitmap of the entries that accept
/// the packet's value of that field, and an entry matches a packet when every field accepts it
/// ([`Tables::matching`]). Built by [`compile`] from the node's model (its resolved sets).
#[derive(Clone, Debug, PartialEq)]
pub struct Tables {
    /// How many entries (bits).
    pub entries: usize,
    /// (IP version, protocol) -> entries whose `ipVersion`, `protocol` and `notProtocol` accept it, for
    /// every protocol an entry names; (version, [`OTHER_PROTOCOL`]) stands for the protocols none names.
    pub protocol: BTreeMap<(u8, u16), Bitmap>,
    /// (ICMP type, code) -> entries whose `icmp` and `notICMP` accept it; a type without its code listed
    /// uses (type, [`ANY_CODE`]), a type not listed [`Tables::icmp_other`].
    pub icmp: BTreeMap<(u8, u16), Bitmap>,
    /// ICMP of a type no entry names.
    pub icmp_other: Bitmap,
    /// Packets that are not ICMP.
    pub not_icmp: Bitmap,
    /// Source and destination address tables: region prefix -> entries whose address conditions accept it.
    pub addr: [Vec<(IpNet, Bitmap)>; 2],
    /// Source and destination port tables.
    pub ports: [PortTable; 2],
    /// (destination address, protocol, port) of a destination `services` match -> the entries it
    /// satisfies; a miss gives [`Tables::service_other`].
    pub service: BTreeMap<(std::net::IpAddr, u8, u16), Bitmap>,
    /// Entries without a destination `services` condition.
    pub service_other: Bitmap,
}

/// The code key of a type-only ICMP entry.
pub const ANY_CODE: u16 = 256;

/// The protocol key of [`Tables::protocol`] for a protocol no entry names.
pub const OTHER_PROTOCOL: u16 = 256;

/// One side's port conditions: `ports` accept a packet when a range or a named port matches, `notPorts`
/// reject it when one does.
#[derive(Clone, Debug, PartialEq)]
pub struct PortTable {
    /// Elementary intervals: (first port, entries whose `ports` ranges accept it, or that have no `ports`).
    pub ranges: Vec<(u16, Bitmap)>,
    /// (address, protocol, port) -> entries with a named port in `ports` that it is.
    pub named: BTreeMap<(std::net::IpAddr, u8, u16), Bitmap>,
    /// Elementary intervals: entries whose `notPorts` ranges contain the port.
    pub not_ranges: Vec<(u16, Bitmap)>,
    /// (address, protocol, port) -> entries with a named port in `notPorts` that it is.
    pub not_named: BTreeMap<(std::net::IpAddr, u8, u16), Bitmap>,
    /// Packets without ports: entries without a `ports` condition.
    pub portless: Bitmap,
}

fn interval_of(table: &[(u16, Bitmap)], port: u16) -> Option<&Bitmap> {
    let i = table.partition_point(|(start, _)| *start <= port);
    table.get(i.checked_sub(1)?).map(|(_, b)| b)
}

impl Tables {
    /// The entries matching `pkt`.
    pub fn matching(&self, pkt: &crate::eval::Packet) -> Bitmap {
        let version = if pkt.src.is_ipv4() { 4 } else { 6 };
        let mut out = self
            .protocol
            .get(&(version, u16::from(pkt.protocol)))
            .or_else(|| self.protocol.get(&(version, OTHER_PROTOCOL)))
            .cloned()
            .unwrap_or_else(|| Bitmap::new(self.entries));
        let icmp = match pkt.icmp {
            Some((t, c)) => self
                .icmp
                .get(&(t, u16::from(c)))
                .or_else(|| self.icmp.get(&(t, ANY_CODE)))
                .unwrap_or(&self.icmp_other),
            None => &self.not_icmp,
        };
        out.and_assign(icmp);
        for (side, (ip, port)) in [(pkt.src, pkt.src_port), (pkt.dst, pkt.dst_port)]
            .into_iter()
            .enumerate()
        {
            let regions = &self.addr[side];
            let region = regions
                .iter()
                .filter(|(p, _)| p.contains(&ip))
                .max_by_key(|(p, _)| p.prefix_len());
            match region {
                Some((_, b)) => out.and_assign(b),
                None => return Bitmap::new(self.entries),
            }
            let t = &self.ports[side];
            match port {
                None => out.and_assign(&t.portless),
                Some(p) => {
                    // The packet's own address, and the address-less key of an endpoint's own side
                    // (see [`compile_for`]).
                    let keys = [(ip, pkt.protocol, p), (OWN, pkt.protocol, p)];
                    let mut ok = interval_of(&t.ranges, p)
                        .cloned()
                        .unwrap_or_else(|| Bitmap::new(self.entries));
                    for n in keys.iter().filter_map(|k| t.named.get(k)) {
                        ok.or_assign(n);
                    }
                    let mut not = interval_of(&t.not_ranges, p)
                        .cloned()
                        .unwrap_or_else(|| Bitmap::new(self.entries));
                    for n in keys.iter().filter_map(|k| t.not_named.get(k)) {
                        not.or_assign(n);
                    }
                    ok.and_not_assign(&not);
                    out.and_assign(&ok);
                }
            }
        }
        let service = pkt
            .dst_port
            .and_then(|p| self.service.get(&(pkt.dst, pkt.protocol, p)))
            .unwrap_or(&self.service_other);
        out.and_assign(service);
        out
    }
}

impl Bitmap {
    /// Adds the bits set in `other` (of the same length).
    pub fn or_assign(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Clears the bits set in `other` (of the same length).
    pub fn and_not_assign(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }
}

/// Elementary intervals of the port space for `ranges` (each entry's list of inclusive ranges): within an
/// interval, every entry's answer is the same. `accept(i, in_range)` says whether entry `i` accepts a port
/// given whether one of its ranges holds it.
fn port_intervals(
    n: usize,
    ranges: &[Vec<(u16, u16)>],
    accept: impl Fn(usize, bool) -> bool,
) -> Vec<(u16, Bitmap)> {
    let mut starts: Vec<u16> = vec![0];
    for (lo, hi) in ranges.iter().flatten() {
        starts.push(*lo);
        if let Some(next) = hi.checked_add(1) {
            starts.push(next);
        }
    }
    starts.sort_unstable();
    starts.dedup();
    starts
        .into_iter()
        .map(|start| {
            let mut b = Bitmap::new(n);
            for (i, list) in ranges.iter().enumerate().take(n) {
                let in_range = list.iter().any(|(lo, hi)| (*lo..=*hi).contains(&start));
                if accept(i, in_range) {
                    b.set(i);
                }
            }
            (start, b)
        })
        .collect()
}

/// The prefixes of the 16-bit port space that make up `lo..=hi` exactly, as (first port, prefix length),
/// largest first where they fit: how a port interval of [`PortTable`] becomes LPM trie entries (disjoint
/// prefixes, so a port finds its interval's entry by longest match). At most 30 for any interval.
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut at, end) = (u32::from(lo), u32::from(hi));
    while at <= end {
        // The largest aligned block starting at `at` that stays within the interval.
        let mut size = if at == 0 {
            1u32 << 16
        } else {
            1u32 << at.trailing_zeros().min(16)
        };
        while at + size - 1 > end {
            size >>= 1;
        }
        let len = 16 - size.trailing_zeros() as u8;
        out.push((at as u16, len));
        at += size;
    }
    out
}

/// One entry's address conditions on one side: the sets the address must be in, and those it must not be in
/// (each as an index into the table's distinct sets).
type AddrConditions = (Vec<usize>, Vec<usize>);

/// The address of the named-port keys on an endpoint's own side ([`compile_for`]): `::`, which no packet with
/// ports has as its address.
pub const OWN: std::net::IpAddr = std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

/// The endpoint a table is compiled for: its own side (`true`: the source, an egress table; `false`: the
/// destination, an ingress table) and its addresses.
#[derive(Clone, Copy, Debug)]
pub struct Own<'a> {
    /// The side the endpoint is always on.
    pub source: bool,
    /// Its addresses.
    pub ips: &'a [std::net::IpAddr],
}

/// Compiles `entries` (from [`flatten`]) into per-field tables over the resolved sets of `model`.
pub fn compile(entries: &[Entry<'_>], model: &crate::model::DataplaneModel) -> Tables {
    compile_for(entries, model, None)
}

/// [`compile`] for the endpoint `own`: on its own side a named port is keyed by (`OWN`, protocol, port) and
/// holds only the endpoint's own ports. Every packet through the table has one of the endpoint's addresses on
/// that side (it is the destination of what the pod receives, the source of what it sends), so the key
/// decides as the per-address one would, and the table neither grows with every pod in the cluster that
/// declares the port nor changes when one starts: endpoints with the same lists and the same own ports share
/// it. (A pod sending from an address not its own would match its own source named ports; the per-address
/// key would not have matched it.)
pub fn compile_for(
    entries: &[Entry<'_>],
    model: &crate::model::DataplaneModel,
    own: Option<Own<'_>>,
) -> Tables {
    use crate::ir::PortMatch;
    use crate::model::{SetKey, entity_sets};
    let n = entries.len();
    let members = |key: &SetKey| model.sets.get(key).into_iter().flat_map(|m| m.nets.iter());
    let ip_ports = |key: &SetKey| -> Vec<(std::net::IpAddr, u8, u16)> {
        model
            .sets
            .get(key)
            .map(|m| m.ip_ports.iter().copied().collect())
            .unwrap_or_default()
    };
    let bit_if = |pred: &dyn Fn(&Rule) -> bool| {
        let mut b = Bitmap::new(n);
        for (i, e) in entries.iter().enumerate() {
            if e.rule.is_none_or(pred) {
                b.set(i);
            }
        }
        b
    };

    // Protocol: every protocol an entry names, and one no entry names standing for the rest.
    let named_protocols: std::collections::BTreeSet<u8> = entries
        .iter()
        .filter_map(|e| e.rule)
        .flat_map(|r| [r.protocol, r.not_protocol])
        .flatten()
        .collect();
    let other_protocol = (0..=255u8).rev().find(|p| !named_protocols.contains(p));
    let mut protocol = BTreeMap::new();
    for version in [4u8, 6] {
        let keys = named_protocols
            .iter()
            .map(|p| (u16::from(*p), *p))
            .chain(other_protocol.map(|p| (OTHER_PROTOCOL, p)));
        for (key, proto) in keys {
            protocol.insert(
                (version, key),
                bit_if(&|r: &Rule| {
                    r.ip_version.is_none_or(|v| v == version)
                        && r.protocol.is_none_or(|p| p == proto)
                        && r.not_protocol != Some(proto)
                }),
            );
        }
    }

    // ICMP: every (type, code) and (type, any) an entry names, then the rest.
    let icmp_ok = |r: &Rule, got: Option<(u8, u8)>| {
        let hit =
            |w: &crate::ir::Icmp| got.is_some_and(|(t, c)| t == w.type_ && w.code.is_none_or(|x| x == c));
        r.icmp.as_ref().is_none_or(hit) && !r.not_icmp.as_ref().is_some_and(hit)
    };
    let mut icmp = BTreeMap::new();
    let named_types: Vec<crate::ir::Icmp> = entries
        .iter()
        .filter_map(|e| e.rule)
        .flat_map(|r| [r.icmp, r.not_icmp])
        .flatten()
        .collect();
    // A type no entry names stands for all of them (their code is irrelevant then).
    let other_type = (0..=255u8)
        .rev()
        .find(|t| !named_types.iter().any(|i| i.type_ == *t));
    for w in &named_types {
        // Codes not listed for the type: one that no entry names stands for them.
        let other_code = (0..=255u8).rev().find(|c| {
            !named_types
                .iter()
                .any(|i| i.type_ == w.type_ && i.code == Some(*c))
        });
        if let Some(c) = other_code {
            icmp.insert(
                (w.type_, ANY_CODE),
                bit_if(&|r: &Rule| icmp_ok(r, Some((w.type_, c)))),
            );
        }
        if let Some(c) = w.code {
            icmp.insert(
                (w.type_, u16::from(c)),
                bit_if(&|r: &Rule| icmp_ok(r, Some((w.type_, c)))),
            );
        }
    }
    let icmp_other = match other_type {
        Some(t) => bit_if(&|r: &Rule| icmp_ok(r, Some((t, 0)))),
        None => Bitmap::new(n),
    };
    let not_icmp = bit_if(&|r: &Rule| icmp_ok(r, None));

    // Addresses and ports, per side.
    let side = |source: bool| -> (Vec<(IpNet, Bitmap)>, PortTable) {
        let sets: Vec<Option<crate::model::EntitySets>> = entries
            .iter()
            .map(|e| {
                e.rule.map(|r| {
                    entity_sets(
                        if source { &r.source } else { &r.destination },
                        r.protocol,
                        source,
                    )
                })
            })
            .collect();
        // Each entry's address conditions: (sets it must be in, sets it must not be in), as indexes of the
        // distinct sets of this side.
        let mut distinct: Vec<SetKey> = Vec::new();
        let mut index_of = |k: &Option<SetKey>| -> Option<usize> {
            let k = k.as_ref()?;
            Some(match distinct.iter().position(|d| d == k) {
                Some(i) => i,
                None => {
                    distinct.push(k.clone());
                    distinct.len() - 1
                }
            })
        };
        let conds: Vec<Option<AddrConditions>> = sets
            .iter()
            .map(|s| {
                s.as_ref().map(|s| {
                    let within: Vec<usize> = [&s.service, &s.nets, &s.selector, &s.service_accounts]
                        .into_iter()
                        .filter_map(&mut index_of)
                        .collect();
                    let outside: Vec<usize> = [&s.not_nets, &s.not_selector]
                        .into_iter()
                        .filter_map(&mut index_of)
                        .collect();
                    (within, outside)
                })
            })
            .collect();
        let regions = Regions::new(distinct.iter().flat_map(&members));
        let prefixes = regions.prefixes();
        let k = distinct.len();
        let member = regions.membership(distinct.iter().map(&members));
        let addr = prefixes
            .iter()
            .enumerate()
            .map(|(r, region)| {
                let member = &member[r * k..(r + 1) * k];
                let mut b = Bitmap::new(n);
                for (i, c) in conds.iter().enumerate() {
                    let ok = c.as_ref().is_none_or(|(within, outside)| {
                        within.iter().all(|&s| member[s]) && !outside.iter().any(|&s| member[s])
                    });
                    if ok {
                        b.set(i);
                    }
                }
                (*region, b)
            })
            .collect();

        let entity = |i: usize| {
            entries[i]
                .rule
                .map(|r| if source { &r.source } else { &r.destination })
        };
        let range_list = |list: &[PortMatch]| -> Vec<(u16, u16)> {
            list.iter()
                .filter_map(|p| match p {
                    PortMatch::Range(lo, hi) => Some((*lo, *hi)),
                    PortMatch::Named(_) => None,
                })
                .collect()
        };
        let ranges: Vec<Vec<(u16, u16)>> = (0..n)
            .map(|i| entity(i).map(|m| range_list(&m.ports)).unwrap_or_default())
            .collect();
        let not_ranges: Vec<Vec<(u16, u16)>> = (0..n)
            .map(|i| entity(i).map(|m| range_list(&m.not_ports)).unwrap_or_default())
            .collect();
        let no_ports = |i: usize| entity(i).is_none_or(|m| m.ports.is_empty());
        let table_ranges = port_intervals(n, &ranges, |i, hit| no_ports(i) || hit);
        let table_not = port_intervals(n, &not_ranges, |_, hit| hit);
        let mut named: BTreeMap<(std::net::IpAddr, u8, u16), Bitmap> = BTreeMap::new();
        let mut not_named: BTreeMap<(std::net::IpAddr, u8, u16), Bitmap> = BTreeMap::new();
        // On the endpoint's own side: its own ports, address-less.
        let own_side = own.filter(|o| o.source == source);
        // Each distinct named-port set's keys, once: on the own side only the endpoint's addresses are looked
        // up (a range of the ordered members per address), not every pod in the cluster declaring the port.
        let keys_of: BTreeMap<&SetKey, Vec<(std::net::IpAddr, u8, u16)>> = sets
            .iter()
            .flatten()
            .flat_map(|s| s.named_ports.iter().chain(&s.not_named_ports))
            .map(|key| {
                let keys = match own_side {
                    None => ip_ports(key),
                    Some(o) => {
                        let mut v: Vec<_> = model
                            .sets
                            .get(key)
                            .into_iter()
                            .flat_map(|set| set.ports_at(o.ips))
                            .map(|(proto, port)| (OWN, proto, port))
                            .collect();
                        v.sort();
                        v.dedup();
                        v
                    }
                };
                (key, keys)
            })
            .collect();
        for (i, s) in sets.iter().enumerate() {
            let Some(s) = s else { continue };
            for (key, not) in s
                .named_ports
                .iter()
                .map(|k| (k, false))
                .chain(s.not_named_ports.iter().map(|k| (k, true)))
            {
                let table = if not { &mut not_named } else { &mut named };
                for m in keys_of.get(key).into_iter().flatten() {
                    table.entry(*m).or_insert_with(|| Bitmap::new(n)).set(i);
                }
            }
        }
        let mut portless = Bitmap::new(n);
        for i in (0..n).filter(|i| no_ports(*i)) {
            portless.set(i);
        }
        let ports = PortTable {
            ranges: table_ranges,
            named,
            not_ranges: table_not,
            not_named,
            portless,
        };
        (addr, ports)
    };
    let (src_addr, src_ports) = side(true);
    let (dst_addr, dst_ports) = side(false);

    // Destination `services`: a hit keeps the entries without the condition too.
    let mut service: BTreeMap<(std::net::IpAddr, u8, u16), Bitmap> = BTreeMap::new();
    let mut with_condition = Bitmap::new(n);
    for (i, e) in entries.iter().enumerate() {
        let Some(r) = e.rule else { continue };
        if let Some(key) = entity_sets(&r.destination, r.protocol, false).service_ports {
            with_condition.set(i);
            for m in ip_ports(&key) {
                service.entry(m).or_insert_with(|| Bitmap::new(n)).set(i);
            }
        }
    }
    let mut service_other = Bitmap::full(n);
    service_other.and_not_assign(&with_condition);
    for b in service.values_mut() {
        b.or_assign(&service_other);
    }
    Tables {
        entries: n,
        protocol,
        icmp,
        icmp_other,
        not_icmp,
        addr: [src_addr, dst_addr],
        ports: [src_ports, dst_ports],
        service,
        service_other,
    }
}
