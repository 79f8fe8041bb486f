//! The policy tables as the BPF programs read them (`node/bpf/policy.c`): one endpoint's flattened list in
//! one direction ([`caracal_policy::classify`]) cut into chunks of [`CHUNK_BITS`] entries and laid out as
//! map entries. Pure: an [`Image`] is what a table holds whatever id it gets, and [`Image::decide`] is the
//! program's walk over those entries, so the layout is tested without a kernel.
//!
//! Per chunk, only the fields the chunk's entries constrain are written (and flagged, `F_*`); the program
//! skips the others. An address region whose bitmap equals the one of the region that contains it is left
//! out: the longest-prefix lookup finds the containing region's entry, which says the same.

use std::collections::BTreeMap;
use std::net::IpAddr;

use caracal_policy::classify::{ANY_CODE, Bitmap, Entry, EntryAction, Tables, port_prefixes};
use caracal_policy::eval::Packet;
use ipnet::IpNet;
use sha2::{Digest, Sha256};

/// 64-bit words per chunk bitmap.
pub const CHUNK_WORDS: usize = 64;
/// Entries per chunk.
pub const CHUNK_BITS: usize = CHUNK_WORDS * 64;
/// Chunks per table: the most entries one endpoint's list may have is `MAX_CHUNKS * CHUNK_BITS`.
pub const MAX_CHUNKS: usize = 8;
/// Chunks visited plus passes taken in one evaluation (policy.c's `MAX_STEPS`).
pub const MAX_STEPS: usize = 24;

/// Field flags of a chunk.
pub const F_PROTO: u32 = 1;
/// ICMP type and code.
pub const F_ICMP: u32 = 2;
/// Source address.
pub const F_SADDR: u32 = 4;
/// Destination address.
pub const F_DADDR: u32 = 8;
/// Source port.
pub const F_SPORT: u32 = 16;
/// Destination port.
pub const F_DPORT: u32 = 32;
/// Destination `services`.
pub const F_SERVICE: u32 = 64;

/// Kinds of exact-match entries (`K_*` in policy.c).
pub const K_PROTO: u8 = 1;
/// ICMP (type, code); `a` = [`OTHER`] for a type no entry names, [`NOT_ICMP`] for a packet that is not ICMP.
pub const K_ICMP: u8 = 2;
/// Entries accepting a packet without ports on a side.
pub const K_PORTLESS: u8 = 3;
/// A named port: (address, protocol, port), side << 1 | not.
pub const K_NAMED: u8 = 4;
/// A destination `services` match: (address, protocol, port).
pub const K_SERVICE: u8 = 5;
/// Entries accepting a destination no `services` match names.
pub const K_SERVICE_OTHER: u8 = 6;
/// A protocol, ICMP type or code no entry names.
pub const OTHER: u16 = 256;
/// The ICMP key of a packet that is not ICMP.
pub const NOT_ICMP: u16 = 257;

/// One chunk's bitmap (`struct bits`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bits(pub [u64; CHUNK_WORDS]);

impl Default for Bits {
    fn default() -> Self {
        Bits([0; CHUNK_WORDS])
    }
}

impl Bits {
    /// Chunk `c` of `b`.
    pub fn of(b: &Bitmap, c: usize) -> Self {
        let mut out = Bits::default();
        for (o, w) in out.0.iter_mut().zip(b.words().iter().skip(c * CHUNK_WORDS)) {
            *o = *w;
        }
        out
    }

    fn is_zero(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
}

/// What an exact-match entry is keyed by, apart from its table and chunk (`struct match_key`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MatchPart {
    /// `K_*`.
    pub kind: u8,
    /// IP protocol (named ports, services).
    pub proto: u8,
    /// Side (and `not`, for named ports).
    pub side: u8,
    /// IP version, ICMP type or port.
    pub a: u16,
    /// Protocol or ICMP code.
    pub b: u16,
    /// Address (IPv4 mapped into IPv6).
    pub addr: [u8; 16],
}

impl MatchPart {
    /// A key of `kind` with every other field zero (the kinds keyed by side or nothing else).
    pub fn of_kind(kind: u8) -> Self {
        MatchPart {
            kind,
            proto: 0,
            side: 0,
            a: 0,
            b: 0,
            addr: [0; 16],
        }
    }
}

/// One chunk of a table.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct ChunkImage {
    /// `F_*` of the fields written.
    pub fields: u32,
    /// Entries that allow.
    pub allow: Bits,
    /// Entries that pass.
    pub pass: Bits,
    /// Exact-match entries.
    pub matches: Vec<(MatchPart, Bits)>,
    /// Address regions: (side, prefix length over the 128-bit address, address).
    pub addrs: Vec<(u8, u8, [u8; 16], Bits)>,
    /// Port prefixes: (side, not, prefix length over 16 bits, first port).
    pub ports: Vec<(u8, u8, u8, u16, Bits)>,
}

/// A compiled table, independent of the id it is written under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    /// Entries (bits).
    pub entries: u32,
    /// The chunks, in order.
    pub chunks: Vec<ChunkImage>,
    /// (Pass entry, where evaluation continues).
    pub passes: Vec<(u32, u32)>,
    /// A content hash: equal images are written once and shared.
    pub hash: u64,
}

/// Errors building an image.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    /// The list is longer than a table holds.
    #[error(
        "{entries} policy entries for one endpoint and direction: the BPF data plane holds at most {max}"
    )]
    TooLarge {
        /// Entries in the list.
        entries: usize,
        /// The limit.
        max: usize,
    },
    /// More tier passes than one evaluation follows.
    #[error("{passes} tiers pass in one endpoint's list: the BPF data plane follows at most {max}")]
    TooManyPasses {
        /// Pass entries.
        passes: usize,
        /// The limit.
        max: usize,
    },
}

/// An address as the maps key it: IPv4 mapped into IPv6.
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A prefix over the 128-bit mapped address space: (length, address).
fn prefix16(net: &IpNet) -> (u8, [u8; 16]) {
    match net {
        IpNet::V4(n) => (96 + n.prefix_len(), addr16(IpAddr::V4(n.network()))),
        IpNet::V6(n) => (n.prefix_len(), addr16(IpAddr::V6(n.network()))),
    }
}

/// Each region's containing region (the longest other prefix holding it), by index; None for the roots.
fn parents(regions: &[(IpNet, Bitmap)]) -> Vec<Option<usize>> {
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by(|a, b| {
        let (x, y) = (&regions[*a].0, &regions[*b].0);
        (matches!(x, IpNet::V6(_)), x.network(), x.prefix_len()).cmp(&(
            matches!(y, IpNet::V6(_)),
            y.network(),
            y.prefix_len(),
        ))
    });
    let mut out = vec![None; regions.len()];
    let mut stack: Vec<usize> = Vec::new();
    for i in order {
        let net = regions[i].0;
        while let Some(top) = stack.last() {
            let t = regions[*top].0;
            if matches!(t, IpNet::V6(_)) == matches!(net, IpNet::V6(_)) && t.contains(&net) && t != net {
                break;
            }
            stack.pop();
        }
        out[i] = stack.last().copied();
        stack.push(i);
    }
    out
}

/// Lays `tables` (compiled from `entries`) out as map entries.
pub fn image(entries: &[Entry<'_>], tables: &Tables) -> Result<Image, ImageError> {
    let n = entries.len();
    if n > MAX_CHUNKS * CHUNK_BITS {
        return Err(ImageError::TooLarge {
            entries: n,
            max: MAX_CHUNKS * CHUNK_BITS,
        });
    }
    let (mut allow, mut pass) = (Bitmap::new(n), Bitmap::new(n));
    let mut passes = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match e.action {
            EntryAction::Allow => allow.set(i),
            EntryAction::Deny => {}
            EntryAction::Pass { to } => {
                pass.set(i);
                passes.push((i as u32, to as u32));
            }
        }
    }
    let chunks = n.div_ceil(CHUNK_BITS).max(1);
    if passes.len() + chunks > MAX_STEPS {
        return Err(ImageError::TooManyPasses {
            passes: passes.len(),
            max: MAX_STEPS - chunks,
        });
    }
    let addr_parents = [parents(&tables.addr[0]), parents(&tables.addr[1])];
    let mut out = Vec::with_capacity(chunks);
    for c in 0..chunks {
        let valid = Bits::of(&Bitmap::full(n), c);
        let mut ch = ChunkImage {
            allow: Bits::of(&allow, c),
            pass: Bits::of(&pass, c),
            ..ChunkImage::default()
        };
        let part = MatchPart::of_kind;

        // Protocol.
        let proto: Vec<(MatchPart, Bits)> = tables
            .protocol
            .iter()
            .map(|((v, p), b)| {
                (
                    MatchPart {
                        a: u16::from(*v),
                        b: *p,
                        ..part(K_PROTO)
                    },
                    Bits::of(b, c),
                )
            })
            .collect();
        if proto.iter().any(|(_, b)| *b != valid) {
            ch.fields |= F_PROTO;
            ch.matches.extend(proto);
        }

        // ICMP.
        let mut icmp: Vec<(MatchPart, Bits)> = tables
            .icmp
            .iter()
            .map(|((t, code), b)| {
                let code = if *code == ANY_CODE { OTHER } else { *code };
                (
                    MatchPart {
                        a: u16::from(*t),
                        b: code,
                        ..part(K_ICMP)
                    },
                    Bits::of(b, c),
                )
            })
            .collect();
        icmp.push((
            MatchPart {
                a: OTHER,
                b: OTHER,
                ..part(K_ICMP)
            },
            Bits::of(&tables.icmp_other, c),
        ));
        icmp.push((
            MatchPart {
                a: NOT_ICMP,
                ..part(K_ICMP)
            },
            Bits::of(&tables.not_icmp, c),
        ));
        if icmp.iter().any(|(_, b)| *b != valid) {
            ch.fields |= F_ICMP;
            ch.matches.extend(icmp);
        }

        // Addresses.
        for side in 0..2u8 {
            let regions = &tables.addr[usize::from(side)];
            let bits: Vec<Bits> = regions.iter().map(|(_, b)| Bits::of(b, c)).collect();
            if bits.iter().all(|b| *b == valid) {
                continue;
            }
            ch.fields |= if side == 0 { F_SADDR } else { F_DADDR };
            for (i, (net, _)) in regions.iter().enumerate() {
                let same_as_parent = addr_parents[usize::from(side)][i].is_some_and(|p| bits[p] == bits[i]);
                if !same_as_parent {
                    let (len, addr) = prefix16(net);
                    ch.addrs.push((side, len, addr, bits[i]));
                }
            }
        }

        // Ports.
        for side in 0..2u8 {
            let t = &tables.ports[usize::from(side)];
            let ranges: Vec<(u16, Bits)> = t.ranges.iter().map(|(p, b)| (*p, Bits::of(b, c))).collect();
            let nots: Vec<(u16, Bits)> = t.not_ranges.iter().map(|(p, b)| (*p, Bits::of(b, c))).collect();
            let named: Vec<(&(IpAddr, u8, u16), Bits, u8)> = t
                .named
                .iter()
                .map(|(k, b)| (k, Bits::of(b, c), 0u8))
                .chain(t.not_named.iter().map(|(k, b)| (k, Bits::of(b, c), 1u8)))
                .filter(|(_, b, _)| !b.is_zero())
                .collect();
            let portless = Bits::of(&t.portless, c);
            let constrained = ranges.iter().any(|(_, b)| *b != valid)
                || nots.iter().any(|(_, b)| !b.is_zero())
                || !named.is_empty()
                || portless != valid;
            if !constrained {
                continue;
            }
            ch.fields |= if side == 0 { F_SPORT } else { F_DPORT };
            ch.matches.push((
                MatchPart {
                    side,
                    ..part(K_PORTLESS)
                },
                portless,
            ));
            for (not, list) in [(0u8, &ranges), (1u8, &nots)] {
                if not == 1 && list.iter().all(|(_, b)| b.is_zero()) {
                    continue;
                }
                for (i, (start, b)) in list.iter().enumerate() {
                    let end = list.get(i + 1).map_or(u16::MAX, |(next, _)| next - 1);
                    for (first, len) in port_prefixes(*start, end) {
                        ch.ports.push((side, not, len, first, *b));
                    }
                }
            }
            for ((ip, proto, port), b, not) in named {
                ch.matches.push((
                    MatchPart {
                        kind: K_NAMED,
                        proto: *proto,
                        side: side << 1 | not,
                        a: *port,
                        b: 0,
                        addr: addr16(*ip),
                    },
                    b,
                ));
            }
        }

        // Destination services.
        let other = Bits::of(&tables.service_other, c);
        if other != valid {
            ch.fields |= F_SERVICE;
            ch.matches.push((part(K_SERVICE_OTHER), other));
            for ((ip, proto, port), b) in &tables.service {
                ch.matches.push((
                    MatchPart {
                        kind: K_SERVICE,
                        proto: *proto,
                        side: 0,
                        a: *port,
                        b: 0,
                        addr: addr16(*ip),
                    },
                    Bits::of(b, c),
                ));
            }
        }
        out.push(ch);
    }
    let mut image = Image {
        entries: n as u32,
        chunks: out,
        passes,
        hash: 0,
    };
    image.hash = image.content_hash();
    Ok(image)
}

/// What turns a written table into another in place, one lookup key at a time (see [`member_diff`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberDiff {
    /// Exact-match entries to write: (chunk, key, bits).
    pub put_matches: Vec<(usize, MatchPart, Bits)>,
    /// Exact-match entries to delete.
    pub drop_matches: Vec<(usize, MatchPart)>,
    /// Host address entries to write: (chunk, side, address, bits).
    pub put_addrs: Vec<(usize, u8, [u8; 16], Bits)>,
    /// Host address entries to delete.
    pub drop_addrs: Vec<(usize, u8, [u8; 16])>,
}

impl MemberDiff {
    /// Lookup keys written or deleted.
    pub fn len(&self) -> usize {
        self.put_matches.len() + self.drop_matches.len() + self.put_addrs.len() + self.drop_addrs.len()
    }

    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The lookups that turn `old` into `new` when the two differ only where set members do: host address
/// entries (a /32 or /128, one per address) and named-port and service entries (one per address, protocol
/// and port). Each such key decides for its own packets alone, so writing the new ones, then deleting the
/// stale ones, moves every packet from the old answer to the new one without a mixed state (a host entry
/// that goes falls back to its covering region, unchanged, which is what the new image says by omitting
/// it). None when anything else differs (entries, chunks, actions, passes, ports, regions wider than a
/// host, the other exact-match kinds): then the new image is written as a table of its own and endpoints
/// flip to it.
pub fn member_diff(old: &Image, new: &Image) -> Option<MemberDiff> {
    if old.entries != new.entries || old.passes != new.passes || old.chunks.len() != new.chunks.len() {
        return None;
    }
    let per_member = |k: &MatchPart| k.kind == K_NAMED || k.kind == K_SERVICE;
    let mut d = MemberDiff::default();
    for (c, (o, n)) in old.chunks.iter().zip(&new.chunks).enumerate() {
        if o.fields != n.fields || o.allow != n.allow || o.pass != n.pass || o.ports != n.ports {
            return None;
        }
        let om: BTreeMap<&MatchPart, &Bits> = o.matches.iter().map(|(k, b)| (k, b)).collect();
        let nm: BTreeMap<&MatchPart, &Bits> = n.matches.iter().map(|(k, b)| (k, b)).collect();
        for (k, b) in &nm {
            if om.get(k) != Some(b) {
                if !per_member(k) {
                    return None;
                }
                d.put_matches.push((c, **k, **b));
            }
        }
        for k in om.keys().filter(|k| !nm.contains_key(*k)) {
            if !per_member(k) {
                return None;
            }
            d.drop_matches.push((c, **k));
        }
        let oa: BTreeMap<(u8, u8, [u8; 16]), &Bits> =
            o.addrs.iter().map(|(s, l, a, b)| ((*s, *l, *a), b)).collect();
        let na: BTreeMap<(u8, u8, [u8; 16]), &Bits> =
            n.addrs.iter().map(|(s, l, a, b)| ((*s, *l, *a), b)).collect();
        for (k, b) in &na {
            if oa.get(k) != Some(b) {
                if k.1 != 128 {
                    return None;
                }
                d.put_addrs.push((c, k.0, k.2, **b));
            }
        }
        for k in oa.keys().filter(|k| !na.contains_key(*k)) {
            if k.1 != 128 {
                return None;
            }
            d.drop_addrs.push((c, k.0, k.2));
        }
    }
    Some(d)
}

impl MemberDiff {
    /// `old` with this diff applied (what the maps hold after [`super::Loaded::patch_table`]); the hash is
    /// left to the caller.
    pub fn apply(&self, old: &Image) -> Image {
        let mut out = old.clone();
        for (c, k, b) in &self.put_matches {
            let m = &mut out.chunks[*c].matches;
            m.retain(|(x, _)| x != k);
            m.push((*k, *b));
            m.sort();
        }
        for (c, k) in &self.drop_matches {
            out.chunks[*c].matches.retain(|(x, _)| x != k);
        }
        for (c, side, addr, b) in &self.put_addrs {
            let a = &mut out.chunks[*c].addrs;
            a.retain(|(s, l, x, _)| !(s == side && *l == 128 && x == addr));
            a.push((*side, 128, *addr, *b));
            a.sort();
        }
        for (c, side, addr) in &self.drop_addrs {
            out.chunks[*c]
                .addrs
                .retain(|(s, l, x, _)| !(s == side && *l == 128 && x == addr));
        }
        out
    }
}

impl MemberDiff {
    /// Whether writing this diff key by key can never give a packet an answer that neither the old nor the
    /// new table gives, for a table whose packets always have one of `own` on side `own_side` (0 source, 1
    /// destination: the endpoint's own side of the direction the table is used in). A packet consults one
    /// host entry per side and the named-port entry of its port, chunk by chunk; the write is safe when
    /// every change is in one chunk, no (side, address) has more than one changed key, and no packet can
    /// meet changed keys on both sides (changes on one side only, or none of `own` changes on the own side).
    pub fn atomic_for(&self, own_side: u8, own: &[[u8; 16]]) -> bool {
        let chunks: std::collections::BTreeSet<usize> = self
            .put_matches
            .iter()
            .map(|(c, ..)| *c)
            .chain(self.drop_matches.iter().map(|(c, _)| *c))
            .chain(self.put_addrs.iter().map(|(c, ..)| *c))
            .chain(self.drop_addrs.iter().map(|(c, ..)| *c))
            .collect();
        if chunks.len() > 1 {
            return false;
        }
        // (side, address) of every changed key.
        let side_of = |k: &MatchPart| if k.kind == K_NAMED { k.side >> 1 } else { 1 };
        let keys: Vec<(u8, [u8; 16])> = self
            .put_matches
            .iter()
            .map(|(_, k, _)| (side_of(k), k.addr))
            .chain(self.drop_matches.iter().map(|(_, k)| (side_of(k), k.addr)))
            .chain(self.put_addrs.iter().map(|(_, s, a, _)| (*s, *a)))
            .chain(self.drop_addrs.iter().map(|(_, s, a)| (*s, *a)))
            .collect();
        let distinct: std::collections::BTreeSet<&(u8, [u8; 16])> = keys.iter().collect();
        if distinct.len() != keys.len() {
            return false;
        }
        let both_sides = keys.iter().any(|k| k.0 == 0) && keys.iter().any(|k| k.0 == 1);
        // The all-zero address is the own side's address-less named-port key: every packet reads it.
        !both_sides
            || !keys
                .iter()
                .any(|(s, a)| *s == own_side && (own.contains(a) || *a == [0; 16]))
    }
}

impl Image {
    fn content_hash(&self) -> u64 {
        let mut h = Sha256::new();
        // Only the words a chunk's entries use: the rest are zero in every bitmap of the chunk (a table of
        // 20 entries would otherwise hash 64 words per key).
        let mut used;
        let words = |h: &mut Sha256, b: &Bits, used: usize| {
            for w in &b.0[..used] {
                h.update(w.to_le_bytes());
            }
        };
        h.update(self.entries.to_le_bytes());
        for (from, to) in &self.passes {
            h.update(from.to_le_bytes());
            h.update(to.to_le_bytes());
        }
        for (c, ch) in self.chunks.iter().enumerate() {
            let in_chunk = (self.entries as usize)
                .saturating_sub(c * CHUNK_BITS)
                .min(CHUNK_BITS);
            used = in_chunk.div_ceil(64).clamp(1, CHUNK_WORDS);
            h.update(b"chunk");
            h.update(ch.fields.to_le_bytes());
            words(&mut h, &ch.allow, used);
            words(&mut h, &ch.pass, used);
            for (m, b) in &ch.matches {
                h.update([m.kind, m.proto, m.side]);
                h.update(m.a.to_le_bytes());
                h.update(m.b.to_le_bytes());
                h.update(m.addr);
                words(&mut h, b, used);
            }
            for (side, len, addr, b) in &ch.addrs {
                h.update([b'a', *side, *len]);
                h.update(addr);
                words(&mut h, b, used);
            }
            for (side, not, len, port, b) in &ch.ports {
                h.update([b'p', *side, *not, *len]);
                h.update(port.to_le_bytes());
                words(&mut h, b, used);
            }
        }
        let d = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        u64::from_le_bytes(first)
    }

    /// The image with its parts in one order (a table read back from the maps has them in map order):
    /// equal contents compare equal.
    pub fn canonical(mut self) -> Self {
        for c in &mut self.chunks {
            c.matches.sort();
            c.addrs.sort();
            c.ports.sort();
        }
        self.passes.sort();
        self
    }

    /// Map entries this image writes (for memory figures).
    pub fn map_entries(&self) -> usize {
        1 + self.passes.len()
            + self
                .chunks
                .iter()
                .map(|c| 1 + c.matches.len() + c.addrs.len() + c.ports.len())
                .sum::<usize>()
    }

    /// The program's walk (policy.c's `decide`) over this image's entries, as the maps answer lookups:
    /// exact keys, longest prefix for addresses and ports. A missing entry the program needs denies.
    pub fn decide(&self, pkt: &Packet) -> bool {
        self.explain(pkt).0
    }

    /// [`Image::decide`], with the entry that decided (None when the walk found the table broken) and the
    /// entries that passed on the way.
    pub fn explain(&self, pkt: &Packet) -> (bool, Option<u32>, Vec<u32>) {
        let mut start = 0usize;
        let mut passed = Vec::new();
        let mut acc: Option<(usize, Bits)> = None;
        for _ in 0..MAX_STEPS {
            let c = start / CHUNK_BITS;
            let Some(ch) = self.chunks.get(c) else {
                return (false, None, passed);
            };
            if acc.as_ref().is_none_or(|(at, _)| *at != c) {
                match ch.matching(pkt) {
                    Some(b) => acc = Some((c, b)),
                    None => return (false, None, passed),
                }
            }
            let Some((_, bits)) = &acc else {
                return (false, None, passed);
            };
            let from = start % CHUNK_BITS;
            let found = (from..CHUNK_BITS).find(|i| bits.0[i / 64] >> (i % 64) & 1 == 1);
            let Some(i) = found else {
                start = (c + 1) * CHUNK_BITS;
                continue;
            };
            let bit = 1u64 << (i % 64);
            let entry = (c * CHUNK_BITS + i) as u32;
            if ch.allow.0[i / 64] & bit != 0 {
                return (true, Some(entry), passed);
            }
            if ch.pass.0[i / 64] & bit == 0 {
                return (false, Some(entry), passed);
            }
            passed.push(entry);
            match self.passes.iter().find(|(from, _)| *from == entry) {
                Some((_, to)) if *to > entry => start = *to as usize,
                _ => return (false, None, passed),
            }
        }
        (false, None, passed)
    }

    /// Each entry's action as the table says it: `Allow`, `Deny` or `Pass -> N`.
    pub fn actions(&self) -> Vec<String> {
        (0..self.entries as usize)
            .map(|i| {
                let (w, bit) = ((i % CHUNK_BITS) / 64, 1u64 << (i % 64));
                let Some(ch) = self.chunks.get(i / CHUNK_BITS) else {
                    return "missing".to_owned();
                };
                if ch.allow.0[w] & bit != 0 {
                    "Allow".to_owned()
                } else if ch.pass.0[w] & bit != 0 {
                    let to = self
                        .passes
                        .iter()
                        .find(|(f, _)| *f as usize == i)
                        .map(|(_, t)| *t);
                    format!("Pass -> {}", to.map_or("?".to_owned(), |t| t.to_string()))
                } else {
                    "Deny".to_owned()
                }
            })
            .collect()
    }
}

impl ChunkImage {
    fn exact(&self, key: &MatchPart) -> Option<&Bits> {
        self.matches.iter().find(|(k, _)| k == key).map(|(_, b)| b)
    }

    /// The AND of the chunk's field bitmaps for `pkt` (policy.c's `match_chunk`); None where a lookup the
    /// layout guarantees is missing.
    fn matching(&self, pkt: &Packet) -> Option<Bits> {
        let mut acc = Bits([u64::MAX; CHUNK_WORDS]);
        let and = |acc: &mut Bits, b: &Bits| {
            for (a, w) in acc.0.iter_mut().zip(b.0) {
                *a &= w;
            }
        };
        let key = MatchPart::of_kind;
        let version: u16 = if pkt.src.is_ipv4() { 4 } else { 6 };
        if self.fields & F_PROTO != 0 {
            let k = MatchPart {
                a: version,
                b: u16::from(pkt.protocol),
                ..key(K_PROTO)
            };
            let b = self
                .exact(&k)
                .or_else(|| self.exact(&MatchPart { b: OTHER, ..k }))?;
            and(&mut acc, b);
        }
        if self.fields & F_ICMP != 0 {
            let b = match pkt.icmp {
                Some((t, code)) => {
                    let k = MatchPart {
                        a: u16::from(t),
                        b: u16::from(code),
                        ..key(K_ICMP)
                    };
                    self.exact(&k)
                        .or_else(|| self.exact(&MatchPart { b: OTHER, ..k }))
                        .or_else(|| {
                            self.exact(&MatchPart {
                                a: OTHER,
                                b: OTHER,
                                ..k
                            })
                        })?
                }
                None => self.exact(&MatchPart {
                    a: NOT_ICMP,
                    ..key(K_ICMP)
                })?,
            };
            and(&mut acc, b);
        }
        for (side, ip, flag) in [(0u8, pkt.src, F_SADDR), (1, pkt.dst, F_DADDR)] {
            if self.fields & flag == 0 {
                continue;
            }
            let a = u128::from_be_bytes(addr16(ip));
            let b = self
                .addrs
                .iter()
                .filter(|(s, len, net, _)| {
                    let mask = if *len == 0 {
                        0
                    } else {
                        u128::MAX << (128 - u32::from(*len))
                    };
                    *s == side && (a & mask) == u128::from_be_bytes(*net)
                })
                .max_by_key(|(_, len, _, _)| *len)
                .map(|(_, _, _, b)| b)?;
            and(&mut acc, b);
        }
        for (side, ip, port, flag) in [
            (0u8, pkt.src, pkt.src_port, F_SPORT),
            (1, pkt.dst, pkt.dst_port, F_DPORT),
        ] {
            if self.fields & flag == 0 {
                continue;
            }
            let Some(port) = port else {
                let b = self.exact(&MatchPart {
                    side,
                    ..key(K_PORTLESS)
                })?;
                and(&mut acc, b);
                continue;
            };
            let lpm = |not: u8| {
                self.ports
                    .iter()
                    .filter(|(s, n, len, first, _)| {
                        let mask = if *len == 0 {
                            0
                        } else {
                            u16::MAX << (16 - u32::from(*len))
                        };
                        *s == side && *n == not && port & mask == *first
                    })
                    .max_by_key(|(_, _, len, _, _)| *len)
                    .map(|(_, _, _, _, b)| *b)
            };
            let mut ok = lpm(0)?;
            // The packet's address, and the address-less key of the endpoint's own side.
            let named = |not: u8, addr: [u8; 16]| {
                self.exact(&MatchPart {
                    kind: K_NAMED,
                    proto: pkt.protocol,
                    side: side << 1 | not,
                    a: port,
                    b: 0,
                    addr,
                })
            };
            for b in [named(0, addr16(ip)), named(0, [0; 16])].into_iter().flatten() {
                for (o, w) in ok.0.iter_mut().zip(b.0) {
                    *o |= w;
                }
            }
            let nots = [lpm(1), named(1, addr16(ip)).copied(), named(1, [0; 16]).copied()];
            for b in nots.into_iter().flatten() {
                for (o, w) in ok.0.iter_mut().zip(b.0) {
                    *o &= !w;
                }
            }
            and(&mut acc, &ok);
        }
        if self.fields & F_SERVICE != 0 {
            let hit = pkt.dst_port.and_then(|port| {
                self.exact(&MatchPart {
                    kind: K_SERVICE,
                    proto: pkt.protocol,
                    side: 0,
                    a: port,
                    b: 0,
                    addr: addr16(pkt.dst),
                })
            });
            let b = match hit {
                Some(b) => b,
                None => self.exact(&key(K_SERVICE_OTHER))?,
            };
            and(&mut acc, b);
        }
        Some(acc)
    }
}

/// Images by hash: the tables one node needs, each written once however many endpoints share it.
pub type ImageSet = BTreeMap<u64, Image>;
