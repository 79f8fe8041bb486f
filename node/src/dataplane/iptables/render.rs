//! The iptables rendering of a [`DataplaneModel`]: pure, so the rule text is unit-tested without root.
//!
//! Layout (filter table; every name carries the `crc-` prefix):
//! - `FORWARD` jumps once to `crc-FORWARD`: established/related accepted and invalid dropped first, then
//!   traffic from workloads goes through `crc-from-wl-dispatch` (the source endpoint's egress), traffic to
//!   workloads through `crc-to-wl-dispatch` (the destination's ingress); what returns is accepted.
//! - Dispatch chains `goto` one chain per endpoint interface (`crc-fw-IFACE`, `crc-tw-IFACE`); an unknown
//!   `crc` interface is dropped (fail closed).
//! - An endpoint chain walks its tiers: it calls each selecting policy's chain while neither the accept nor
//!   the pass mark is set, returns when accepted, and drops at the end of a tier whose default is Deny unless
//!   a policy passed.
//! - One chain per policy and direction (`crc-pi-HASH`, `crc-po-HASH`), shared by every endpoint it selects:
//!   Allow sets the accept mark and returns, Pass sets the pass mark and returns, Deny drops, Log logs.
//! - One ipset per distinct selector-in-scope, net list, service-account match (`crc-s-HASH`, hash:net) and
//!   named port (`crc-p-HASH`, hash:ip,port).
//!
//! Each family is rendered on its own ([`render_family`]): `ip6tables` has its own tables, so chain names are
//! the same in both, while IPv6 sets are named `crc6s-` / `crc6p-` and created `family inet6`. A rule limited
//! to the other family (`ipVersion`, or protocol ICMP in IPv6 and ICMPv6 in IPv4) renders to nothing; a set
//! holds only its family's members, so a rule matching only the other family's networks matches nothing.
//!
//! The first rule of every chain is a comment `crc:HASH` of the chain's content, so the applier can tell an
//! unchanged chain from one it must rewrite, also across an agent restart.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use caracal_policy::ir::{Action, Direction, EntityMatch, Icmp, PortMatch, Rule, TierDefault};
use caracal_policy::model::{EntitySets, TierRef, entity_sets};

use crate::dataplane::{Changes, DataplaneModel, Family, SetKey, SetMembers};

/// The mark bit set when a policy accepts.
pub const MARK_ACCEPT: u32 = 0x10000;
/// The mark bit set when a policy passes.
pub const MARK_PASS: u32 = 0x20000;
/// The top-level chain of forwarded traffic.
pub const FORWARD_CHAIN: &str = "crc-FORWARD";
/// The top-level chain of traffic to the host itself.
pub const INPUT_CHAIN: &str = "crc-INPUT";
/// A pod's traffic to its own host: its egress policy, then `defaultEndpointToHostAction`.
pub const WL_TO_HOST: &str = "crc-wl-to-host";
/// The built-in chains Caracal hooks, each with the chain its hook jumps to (first rule, exactly once).
pub const HOOKS: [(&str, &str); 2] = [("FORWARD", FORWARD_CHAIN), ("INPUT", INPUT_CHAIN)];
/// Dispatch to endpoints' ingress chains.
pub const TO_WL: &str = "crc-to-wl-dispatch";
/// Dispatch to endpoints' egress chains.
pub const FROM_WL: &str = "crc-from-wl-dispatch";
/// Glob of workload interfaces.
pub const IFACE_GLOB: &str = "crc+";

/// An ipset to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpSet {
    /// `hash:net` or `hash:ip,port`.
    pub kind: &'static str,
    /// Members as `ipset save` prints them.
    pub members: BTreeSet<String>,
}

/// The whole rendering.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Desired {
    /// Chain name -> rules (without `-A NAME`), the hash comment first.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Set name -> set.
    pub sets: BTreeMap<String, IpSet>,
}

fn hash(text: &str, len: usize) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect::<String>()[..len].to_owned()
}

/// The name of the chain of `policy` in `dir`.
pub fn policy_chain(policy: &str, dir: Direction) -> String {
    format!(
        "crc-p{}-{}",
        if dir == Direction::Ingress { "i" } else { "o" },
        hash(policy, 12)
    )
}

/// The name of the IPv4 set for `key`.
pub fn set_name(key: &SetKey) -> String {
    set_name_in(key, Family::V4)
}

/// The prefixes of the sets a family's policy owns: (selector/net sets, named-port sets, temporaries). All
/// are six characters, so a set's temporary twin swaps the prefix.
pub fn set_prefixes(family: Family) -> [&'static str; 3] {
    match family {
        Family::V4 => ["crc-s-", "crc-p-", "crc-t-"],
        Family::V6 => ["crc6s-", "crc6p-", "crc6t-"],
    }
}

/// The name of the set for `key` in `family`.
pub fn set_name_in(key: &SetKey, family: Family) -> String {
    let [nets, ports, _] = set_prefixes(family);
    let prefix = if key.holds_ports() { ports } else { nets };
    format!("{prefix}{}", key.id())
}

fn protocol_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        58 => "ipv6-icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// The members of `members` in `family`, as `ipset save` prints them.
fn member_texts(members: &SetMembers, family: Family) -> impl Iterator<Item = String> + '_ {
    let nets = members
        .nets
        .iter()
        .filter(move |n| Family::of(&n.addr()) == family)
        .map(move |n| {
            if n.prefix_len() == family.host_prefix() {
                n.addr().to_string()
            } else {
                n.to_string()
            }
        });
    let ports = members
        .ip_ports
        .iter()
        .filter(move |(ip, _, _)| Family::of(ip) == family)
        .map(|(ip, proto, port)| format!("{ip},{}:{port}", protocol_name(*proto)));
    nets.chain(ports)
}

fn set_members(key: &SetKey, members: &SetMembers, family: Family) -> IpSet {
    IpSet {
        kind: if key.holds_ports() {
            "hash:ip,port"
        } else {
            "hash:net"
        },
        members: member_texts(members, family).collect(),
    }
}

fn icmp_text(i: &Icmp) -> String {
    match i.code {
        Some(c) => format!("{}/{c}", i.type_),
        None => i.type_.to_string(),
    }
}

/// Numeric port lists as multiport arguments, at most 15 ports per match (a range counts twice).
fn port_chunks(ports: &[PortMatch]) -> Vec<String> {
    let mut chunks = Vec::new();
    let (mut cur, mut weight) = (Vec::new(), 0);
    for p in ports {
        let (text, w) = match p {
            PortMatch::Range(lo, hi) if lo == hi => (lo.to_string(), 1),
            PortMatch::Range(lo, hi) => (format!("{lo}:{hi}"), 2),
            PortMatch::Named(_) => continue,
        };
        if weight + w > 15 {
            chunks.push(cur.join(","));
            cur.clear();
            weight = 0;
        }
        cur.push(text);
        weight += w;
    }
    if !cur.is_empty() {
        chunks.push(cur.join(","));
    }
    chunks
}

/// The matches of one side that do not branch (everything but the positive port list), and the port
/// alternatives (each one OR'd: a multiport chunk or a named-port set).
fn side_matches(m: &EntityMatch, sets: &EntitySets, dir: &str, family: Family) -> (Vec<String>, Vec<String>) {
    let mut fixed = Vec::new();
    let set = |k: &Option<SetKey>, neg: bool| {
        k.as_ref().map(|k| {
            format!(
                "-m set {}--match-set {} {dir}",
                if neg { "! " } else { "" },
                set_name_in(k, family)
            )
        })
    };
    fixed.extend(set(&sets.nets, false));
    fixed.extend(set(&sets.not_nets, true));
    fixed.extend(set(&sets.selector, false));
    fixed.extend(set(&sets.not_selector, true));
    fixed.extend(set(&sets.service_accounts, false));
    fixed.extend(set(&sets.service, false));
    if let Some(k) = &sets.service_ports {
        fixed.push(format!(
            "-m set --match-set {} {dir},{dir}",
            set_name_in(k, family)
        ));
    }
    let ports_flag = if dir == "src" { "--sports" } else { "--dports" };
    for chunk in port_chunks(&m.not_ports) {
        fixed.push(format!("-m multiport ! {ports_flag} {chunk}"));
    }
    for k in &sets.not_named_ports {
        fixed.push(format!(
            "-m set ! --match-set {} {dir},{dir}",
            set_name_in(k, family)
        ));
    }
    let mut alternatives: Vec<String> = port_chunks(&m.ports)
        .into_iter()
        .map(|c| format!("-m multiport {ports_flag} {c}"))
        .collect();
    alternatives.extend(
        sets.named_ports
            .iter()
            .map(|k| format!("-m set --match-set {} {dir},{dir}", set_name_in(k, family))),
    );
    (fixed, alternatives)
}

/// The IPv4 rules of one IR rule.
pub fn rule_lines(rule: &Rule) -> Vec<String> {
    rule_lines_in(rule, Family::V4)
}

/// The rules of one IR rule in `family` (several when ports are alternatives), followed by the return
/// rule; nothing when the rule is limited to the other family.
pub fn rule_lines_in(rule: &Rule, family: Family) -> Vec<String> {
    let other_icmp = match family {
        Family::V4 => 58,
        Family::V6 => 1,
    };
    if rule.ip_version.is_some_and(|v| v != family.version()) || rule.protocol == Some(other_icmp) {
        return Vec::new();
    }
    let icmp_match = match family {
        Family::V4 => "-m icmp --icmp-type",
        Family::V6 => "-m icmp6 --icmpv6-type",
    };
    let mut base = Vec::new();
    if let Some(p) = rule.protocol {
        base.push(format!("-p {}", protocol_name(p)));
    }
    if let Some(p) = rule.not_protocol {
        base.push(format!("! -p {}", protocol_name(p)));
    }
    if let Some(i) = &rule.icmp {
        base.push(format!("{icmp_match} {}", icmp_text(i)));
    }
    if let Some(i) = &rule.not_icmp {
        let (m, t) = icmp_match.split_once(" --").unwrap_or_default();
        base.push(format!("{m} ! --{t} {}", icmp_text(i)));
    }
    let (src_fixed, src_alts) = side_matches(
        &rule.source,
        &entity_sets(&rule.source, rule.protocol, true),
        "src",
        family,
    );
    let (dst_fixed, dst_alts) = side_matches(
        &rule.destination,
        &entity_sets(&rule.destination, rule.protocol, false),
        "dst",
        family,
    );
    base.extend(src_fixed);
    base.extend(dst_fixed);
    let (target, ret) = match rule.action {
        Action::Allow => (
            format!("-j MARK --set-xmark {MARK_ACCEPT:#x}/{MARK_ACCEPT:#x}"),
            Some(MARK_ACCEPT),
        ),
        Action::Pass => (
            format!("-j MARK --set-xmark {MARK_PASS:#x}/{MARK_PASS:#x}"),
            Some(MARK_PASS),
        ),
        Action::Deny => ("-j DROP".into(), None),
        Action::Log => ("-j LOG --log-prefix \"crc-policy: \"".into(), None),
    };
    let src_alts = if src_alts.is_empty() {
        vec![String::new()]
    } else {
        src_alts
    };
    let dst_alts = if dst_alts.is_empty() {
        vec![String::new()]
    } else {
        dst_alts
    };
    let mut out = Vec::new();
    for s in &src_alts {
        for d in &dst_alts {
            let parts: Vec<&str> = base
                .iter()
                .map(String::as_str)
                .chain([s.as_str(), d.as_str(), target.as_str()])
                .filter(|x| !x.is_empty())
                .collect();
            out.push(parts.join(" "));
        }
    }
    if let Some(mark) = ret {
        out.push(format!("-m mark --mark {mark:#x}/{mark:#x} -j RETURN"));
    }
    out
}

fn with_hash(rules: Vec<String>) -> Vec<String> {
    let h = hash(&rules.join("\n"), 16);
    let mut out = vec![format!("-m comment --comment \"crc:{h}\"")];
    out.extend(rules);
    out
}

fn endpoint_chain(tiers: &[TierRef], dir: Direction) -> Vec<String> {
    let both = MARK_ACCEPT | MARK_PASS;
    let mut rules = Vec::new();
    for t in tiers {
        rules.push(format!(
            "-m comment --comment \"tier {}\" -j MARK --set-xmark 0x0/{both:#x}",
            t.name
        ));
        for p in &t.policies {
            rules.push(format!(
                "-m mark --mark 0x0/{both:#x} -j {}",
                policy_chain(p, dir)
            ));
        }
        rules.push(format!(
            "-m mark --mark {MARK_ACCEPT:#x}/{MARK_ACCEPT:#x} -j RETURN"
        ));
        if t.default_action == TierDefault::Deny {
            rules.push(format!(
                "-m mark --mark 0x0/{MARK_PASS:#x} -m comment --comment \"end of tier {}\" -j DROP",
                t.name
            ));
        }
    }
    // No tier selected the endpoint, or every selecting tier passed: the profile allows.
    rules.push("-j RETURN".into());
    rules
}

/// Renders the model for IPv4.
pub fn render(model: &DataplaneModel) -> Desired {
    render_family(model, Family::V4)
}

fn forward_chain() -> Vec<String> {
    with_hash(vec![
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
        "-m conntrack --ctstate INVALID -j DROP".into(),
        format!("-i {IFACE_GLOB} -j {FROM_WL}"),
        format!("-o {IFACE_GLOB} -j {TO_WL}"),
        format!("-i {IFACE_GLOB} -j ACCEPT"),
        format!("-o {IFACE_GLOB} -j ACCEPT"),
    ])
}

fn input_chain() -> Vec<String> {
    with_hash(vec![format!("-i {IFACE_GLOB} -j {WL_TO_HOST}")])
}

/// A pod's traffic to its host: replies and related errors pass, invalid is dropped; IPv6 neighbour
/// discovery and router solicitation pass (a pod resolves its gateway with them); then the pod's egress
/// policy (its dispatch drops what it denies) and the configured action.
fn wl_to_host_chain(model: &DataplaneModel, family: Family) -> Vec<String> {
    let mut rules = vec![
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".to_owned(),
        "-m conntrack --ctstate INVALID -j DROP".to_owned(),
    ];
    if family == Family::V6 {
        for t in [130, 131, 132, 133, 135, 136] {
            rules.push(format!("-p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT"));
        }
    }
    rules.push(format!("-j {FROM_WL}"));
    let action = match model.endpoint_to_host {
        caracal_policy::model::EndpointToHost::Drop => "DROP",
        caracal_policy::model::EndpointToHost::Return => "RETURN",
        caracal_policy::model::EndpointToHost::Accept => "ACCEPT",
    };
    rules.push(format!(
        "-m comment --comment \"defaultEndpointToHostAction\" -j {action}"
    ));
    with_hash(rules)
}

/// Whether the order of chain `name`'s rules between its hash comment and its last rule is free: the
/// dispatch chains, whose rules each match one distinct interface ahead of the final `DROP`. The fast path
/// patches such a chain (inserts and deletes single rules) instead of rewriting it.
pub fn order_free(name: &str) -> bool {
    name == TO_WL || name == FROM_WL
}

/// The two dispatch chains: every local endpoint's interface to its chain, anything else dropped.
fn dispatch_chains(model: &DataplaneModel) -> [(String, Vec<String>); 2] {
    let (mut to, mut from) = (Vec::new(), Vec::new());
    for ep in &model.endpoints {
        to.push(format!(
            "-o {} -g {}",
            ep.iface,
            endpoint_chain_name(&ep.iface, Direction::Ingress)
        ));
        from.push(format!(
            "-i {} -g {}",
            ep.iface,
            endpoint_chain_name(&ep.iface, Direction::Egress)
        ));
    }
    to.push("-m comment --comment \"unknown endpoint\" -j DROP".into());
    from.push("-m comment --comment \"unknown endpoint\" -j DROP".into());
    [(TO_WL.into(), with_hash(to)), (FROM_WL.into(), with_hash(from))]
}

/// The chain of endpoint interface `iface` in `dir` (`crc-tw-IFACE` into it, `crc-fw-IFACE` out of it).
pub fn endpoint_chain_name(iface: &str, dir: Direction) -> String {
    match dir {
        Direction::Ingress => format!("crc-tw-{iface}"),
        Direction::Egress => format!("crc-fw-{iface}"),
    }
}

/// The chains of endpoint `iface` in both directions; None when it is not a local endpoint.
fn endpoint_chains(model: &DataplaneModel, iface: &str) -> [(String, Option<Vec<String>>); 2] {
    let known = model.endpoints.iter().any(|e| e.iface == iface);
    let tiers = model.endpoint_tiers.get(iface).cloned().unwrap_or_default();
    [
        (Direction::Ingress, &tiers.ingress),
        (Direction::Egress, &tiers.egress),
    ]
    .map(|(dir, t)| {
        (
            endpoint_chain_name(iface, dir),
            known.then(|| with_hash(endpoint_chain(t, dir))),
        )
    })
}

/// The chains of policy `name` in both directions; None where it does not apply (or is gone).
fn policy_chains(model: &DataplaneModel, name: &str, family: Family) -> [(String, Option<Vec<String>>); 2] {
    let p = model.policies.get(name);
    [Direction::Ingress, Direction::Egress].map(|dir| {
        let lines = p
            .and_then(|p| p.rules(dir))
            .map(|rules| with_hash(rules.iter().flat_map(|r| rule_lines_in(r, family)).collect()));
        (policy_chain(name, dir), lines)
    })
}

/// Renders the model for `family`.
pub fn render_family(model: &DataplaneModel, family: Family) -> Desired {
    let mut d = Desired::default();
    d.chains.insert(FORWARD_CHAIN.into(), forward_chain());
    d.chains.insert(INPUT_CHAIN.into(), input_chain());
    d.chains
        .insert(WL_TO_HOST.into(), wl_to_host_chain(model, family));
    d.chains.extend(dispatch_chains(model));
    for ep in &model.endpoints {
        for (name, rules) in endpoint_chains(model, &ep.iface) {
            d.chains.extend(rules.map(|r| (name, r)));
        }
    }
    for name in model.policies.keys() {
        for (chain, rules) in policy_chains(model, name, family) {
            d.chains.extend(rules.map(|r| (chain, r)));
        }
    }
    for (key, members) in &model.sets {
        d.sets
            .insert(set_name_in(key, family), set_members(key, members, family));
    }
    d
}

/// What [`render_changes`] replaced: each touched chain and set with its previous content (None where it
/// did not exist). The applier diffs these against the new rendering.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Touched {
    /// Chains, with their previous rules.
    pub chains: BTreeMap<String, Option<Vec<String>>>,
    /// Sets rendered whole, with their previous members.
    pub sets: BTreeMap<String, Option<IpSet>>,
    /// Sets patched in place: (members added, members removed).
    pub set_deltas: BTreeMap<String, (Vec<String>, Vec<String>)>,
}

fn replace<T>(map: &mut BTreeMap<String, T>, name: String, new: Option<T>) -> Option<T> {
    match new {
        Some(v) => map.insert(name, v),
        None => map.remove(&name),
    }
}

/// Brings `d`, the rendering of the model before `changes`, up to date with `model`, re-rendering only what
/// changed. Equal to [`render_family`] of `model` afterwards.
pub fn render_changes(d: &mut Desired, model: &DataplaneModel, changes: &Changes, family: Family) -> Touched {
    let mut touched = Touched::default();
    let mut chain = |d: &mut Desired, name: String, rules: Option<Vec<String>>| {
        let old = replace(&mut d.chains, name.clone(), rules);
        touched.chains.entry(name).or_insert(old);
    };
    for name in &changes.policies {
        for (c, rules) in policy_chains(model, name, family) {
            chain(d, c, rules);
        }
    }
    if changes.endpoint_to_host {
        chain(d, WL_TO_HOST.into(), Some(wl_to_host_chain(model, family)));
    }
    if !changes.endpoints.is_empty() {
        for iface in &changes.endpoints {
            for (c, rules) in endpoint_chains(model, iface) {
                chain(d, c, rules);
            }
        }
        for (c, rules) in dispatch_chains(model) {
            chain(d, c, Some(rules));
        }
    }
    let mut whole = |d: &mut Desired, key: &SetKey| {
        let name = set_name_in(key, family);
        let new = model.sets.get(key).map(|m| set_members(key, m, family));
        let old = replace(&mut d.sets, name.clone(), new);
        touched.sets.entry(name).or_insert(old);
    };
    for key in &changes.sets {
        whole(d, key);
    }
    let mut deltas = BTreeMap::new();
    for (key, delta) in changes.members.iter().filter(|(k, _)| !changes.sets.contains(*k)) {
        let name = set_name_in(key, family);
        let Some(set) = d.sets.get_mut(&name) else {
            whole(d, key);
            continue;
        };
        let added: Vec<String> = member_texts(&delta.added, family)
            .filter(|m| set.members.insert(m.clone()))
            .collect();
        let removed: Vec<String> = member_texts(&delta.removed, family)
            .filter(|m| set.members.remove(m))
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            deltas.insert(name, (added, removed));
        }
    }
    touched.set_deltas = deltas;
    touched
}

/// The `iptables-save` style text of the whole rendering, for golden files and people.
pub fn to_text(d: &Desired) -> String {
    let mut out = String::new();
    for (name, set) in &d.sets {
        let _ = writeln!(
            out,
            "# ipset {name} {}: {}",
            set.kind,
            set.members
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    for (chain, rules) in &d.chains {
        let _ = writeln!(out, ":{chain} - [0:0]");
        for r in rules {
            let _ = writeln!(out, "-A {chain} {r}");
        }
    }
    out
}
