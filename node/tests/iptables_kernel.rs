//! Kernel tier: the agent's policy engine (its production update path, with the iptables backend and with
//! the BPF backend) enforces the policy contract on real packets between network namespaces (TCP, UDP,
//! ICMP; established replies pass; a denied SYN gets no answer); the iptables backend repairs drift, adopts
//! its state on restart without breaking an established connection, and removes everything it created.
//! Needs root (CI runs as root).

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

#[path = "common/established.rs"]
mod established;

use established::Established;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use caracal_datastore::Update;
use caracal_e2e::netns::{self, NetNs, Pod};
use caracal_e2e::probe::{self, Outcome};
use caracal_node::agent::engine::{Engine, Msg};
use caracal_node::agent::{Config, Status};
use caracal_node::cni::host_iface;
use caracal_node::dataplane::Family;
use caracal_node::dataplane::bpf::backend::BpfDataplane;
use caracal_node::dataplane::iptables::apply::{ApplyStats, Iptables};
use caracal_node::dataplane::iptables::render;
use caracal_policy::contract::{Check, WORLD, scenarios};
use caracal_policy::decode::DATAPLANE_KINDS;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_millis(500);
/// The node the contract's pods run on.
const NODE: &str = "node-1";

struct Node {
    ns: NetNs,
    pods: BTreeMap<String, Pod>,
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "kernel-tier tests need root (CI runs as root)"
    );
}

/// YAML documents as (kind, key, object), pods placed on [`NODE`] as the scheduler would.
fn objects(manifests: &str) -> Vec<(String, String, Value)> {
    serde_yaml::Deserializer::from_str(manifests)
        .filter_map(|de| {
            let mut v: Value = serde::Deserialize::deserialize(de).expect("YAML");
            if v.is_null() {
                return None;
            }
            if v["kind"] == "Pod" {
                v["spec"]["nodeName"] = NODE.into();
            }
            let kind = format!(
                "{}/{}",
                v["apiVersion"].as_str().expect("apiVersion"),
                v["kind"].as_str().expect("kind")
            );
            let name = v["metadata"]["name"].as_str().expect("name").to_owned();
            let key = match v["metadata"]["namespace"].as_str() {
                Some(ns) => format!("{ns}/{name}"),
                None => name,
            };
            Some((kind, key, v))
        })
        .collect()
}

/// A node namespace with the contract world's pods wired to it, their host sides named as the CNI plugin
/// names them.
fn node() -> Node {
    require_root();
    let ns = netns::node("ipt").expect("node namespace");
    let mut pods = BTreeMap::new();
    for (kind, key, v) in objects(WORLD) {
        if kind != "v1/Pod" {
            continue;
        }
        let (pod_ns, name) = key.split_once('/').expect("namespaced");
        let ip: std::net::Ipv4Addr = v["status"]["podIP"]
            .as_str()
            .expect("podIP")
            .parse()
            .expect("IPv4 world");
        pods.insert(
            key.clone(),
            netns::wire_pod(&ns, "pod", &host_iface(pod_ns, name), ip).expect("pod"),
        );
    }
    Node { ns, pods }
}

/// The agent's policy engine for `node`, fed the contract world, with the manifests of one scenario at a
/// time on top.
struct Agent {
    engine: Engine,
    scenario: Vec<(String, String)>,
}

impl Agent {
    fn new(node: &Node, ipv6: bool) -> Self {
        let backend =
            caracal_node::dataplane::backend("Iptables", node.ns.exec_prefix(), ipv6).expect("backend");
        Self::with_backend(node, ipv6, "Iptables", backend)
    }

    /// The BPF backend, its pins under a directory of the test's own.
    fn bpf(node: &Node, pins: &std::path::Path) -> Self {
        let backend = Box::new(BpfDataplane::with_pins(pins, &node.ns.exec_prefix()));
        Self::with_backend(node, false, "BPF", backend)
    }

    fn with_backend(
        node: &Node,
        ipv6: bool,
        dataplane: &str,
        backend: Box<dyn caracal_node::dataplane::PolicyDataplane>,
    ) -> Self {
        let cfg = Config {
            node_name: NODE.into(),
            dataplane: dataplane.into(),
            exec_prefix: node.ns.exec_prefix(),
            debounce: Duration::ZERO,
            refresh: Duration::from_secs(90),
            ipv6,
        };
        let mut engine = Engine::new(cfg, backend, Arc::new(Status::default()), None);
        for (kind, key, object) in objects(WORLD) {
            engine.handle(Msg::Update(Update::Upsert { kind, key, object }));
        }
        for kind in DATAPLANE_KINDS {
            engine.handle(Msg::Update(Update::InSync { kind: (*kind).into() }));
        }
        Agent {
            engine,
            scenario: Vec::new(),
        }
    }

    /// Replaces the scenario's objects with `manifests`' (deletions and upserts, as watches deliver them).
    fn set(&mut self, manifests: &str) {
        for (kind, key) in std::mem::take(&mut self.scenario) {
            self.engine.handle(Msg::Update(Update::Delete { kind, key }));
        }
        for (kind, key, object) in objects(manifests) {
            self.scenario.push((kind.clone(), key.clone()));
            self.engine
                .handle(Msg::Update(Update::Upsert { kind, key, object }));
        }
    }

    /// The fast path: what changed.
    fn program(&mut self, manifests: &str) -> ApplyStats {
        self.set(manifests);
        self.engine.flush().expect("program")
    }

    /// A full converge: reads everything back, adopts, repairs.
    fn converge(&mut self, manifests: &str) -> ApplyStats {
        self.set(manifests);
        self.engine.converge().expect("converge")
    }

    fn model(&self) -> caracal_node::dataplane::DataplaneModel {
        self.engine.pipeline().model().clone()
    }
}

fn probe_with(node: &Node, check: &Check, timeout: Duration) -> Outcome {
    let (from, to, port, _) = *check;
    let (a, b) = (&node.pods[from], &node.pods[to]);
    if let Some(icmp) = port.strip_suffix("/ICMP") {
        let (t, c) = icmp.split_once('.').expect("TYPE.CODE");
        return probe::icmp(
            &a.ns,
            b.ip,
            t.parse().expect("type"),
            c.parse().expect("code"),
            timeout,
        )
        .expect("icmp probe");
    }
    let (p, proto) = port.split_once('/').expect("PORT/PROTO");
    let p: u16 = p.parse().expect("port");
    match proto {
        "TCP" => probe::tcp(&a.ns, &b.ns, b.ip, p, timeout).expect("tcp probe"),
        "UDP" => probe::udp(&a.ns, &b.ns, b.ip, p, timeout).expect("udp probe"),
        other => panic!("the contract uses no {other} checks"),
    }
}

/// Probes once; an expected-allowed check that saw nothing is tried again with a long timeout, so a loaded
/// machine does not turn a slow answer into a failure. (Denied checks keep the short timeout: waiting longer
/// could only turn a wrong "allowed" into a slow pass, never the other way.)
fn probe(node: &Node, check: &Check) -> Outcome {
    let first = probe_with(node, check, TIMEOUT);
    if check.3 && first != Outcome::Connected {
        return probe_with(node, check, Duration::from_secs(3));
    }
    first
}

#[test]
fn the_iptables_backend_enforces_the_contract_table_on_real_packets() {
    let node = node();
    contract_on_real_packets(&node, Agent::new(&node, false));
}

#[test]
fn the_bpf_backend_enforces_the_contract_table_on_real_packets() {
    let node = node();
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/caracal-contract-{}", std::process::id()));
    contract_on_real_packets(&node, Agent::bpf(&node, &pins));
    assert!(!pins.exists(), "remove_all left {}", pins.display());
}

/// Every scenario of the contract through `agent`'s fast path, each check probed with real packets; then a
/// full converge finds nothing to do and everything is removed.
fn contract_on_real_packets(node: &Node, mut agent: Agent) {
    agent.engine.flush().expect("first program");
    let mut failures = Vec::new();
    let mut checks = 0;
    for s in scenarios() {
        // The agent's fast path between scenarios: only what changed is written, no read-back.
        agent.program(s.manifests);
        for check in &s.checks {
            checks += 1;
            let outcome = probe(node, check);
            let ok = match (check.3, &outcome) {
                (true, Outcome::Connected) => true,
                // Denied means dropped: no answer at all, not a reset or an unreachable.
                (false, Outcome::NoAnswer) => true,
                _ => false,
            };
            if !ok {
                failures.push(format!(
                    "{}: {} -> {} {}: expected {}, saw {outcome:?}",
                    s.name,
                    check.0,
                    check.1,
                    check.2,
                    if check.3 { "allowed" } else { "dropped" }
                ));
            }
        }
    }
    // The fast path left exactly what a full read-back expects.
    let stats = agent.engine.converge().expect("converge");
    assert!(
        stats.is_noop(),
        "after the incremental programs, a full converge found drift: {stats:?}"
    );
    agent.engine.remove_all().expect("clean up");
    assert!(
        failures.is_empty(),
        "{} of {checks} real-packet checks disagree with the contract:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

const DENY_X_INGRESS_FROM_Y: &str = "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: all()\n  ingress: [{action: Deny, source: {namespaceSelector: ns == 'y'}}, {action: Allow}]\n";

#[test]
fn drift_is_repaired_by_the_next_apply() {
    let node = node();
    let mut agent = Agent::new(&node, false);
    agent.converge(DENY_X_INGRESS_FROM_Y);
    let check: Check = ("y/a", "x/a", "80/TCP", false);
    assert_eq!(probe(&node, &check), Outcome::NoAnswer);
    // Someone deletes the Deny rule of the policy chain and the FORWARD hook is removed.
    let save = node.ns.exec(&["iptables-save", "-t", "filter"]).expect("save");
    let deny = save
        .lines()
        .find(|l| l.starts_with("-A crc-pi-") && l.ends_with("-j DROP"))
        .expect("a Deny rule")
        .to_owned();
    let args: Vec<&str> = deny.trim_start_matches("-A ").split_whitespace().collect();
    let mut del = vec!["iptables", "-D"];
    del.extend(args.iter().map(|a| a.trim_matches('"')));
    node.ns.exec(&del).expect("delete rule");
    assert_eq!(
        probe(&node, &check),
        Outcome::Connected,
        "the deletion took effect"
    );
    let stats = agent.converge(DENY_X_INGRESS_FROM_Y);
    assert_eq!(
        stats.chains_written, 1,
        "only the damaged chain is rewritten: {stats:?}"
    );
    assert_eq!(probe(&node, &check), Outcome::NoAnswer, "the rule is back");
    node.ns
        .exec(&["iptables", "-D", "FORWARD", "-j", "crc-FORWARD"])
        .expect("unhook");
    let stats = agent.converge(DENY_X_INGRESS_FROM_Y);
    assert!(stats.hooked && stats.chains_written == 0, "{stats:?}");
    assert_eq!(probe(&node, &check), Outcome::NoAnswer);
    // kube-proxy starting later prepends its own jump, whose chain accepts what it marked before policy
    // would see it: the next apply puts the hook first again (and only moves it).
    node.ns
        .exec(&["iptables", "-N", "KUBE-FORWARD"])
        .expect("a kube-proxy chain");
    node.ns
        .exec(&[
            "iptables",
            "-A",
            "KUBE-FORWARD",
            "-m",
            "mark",
            "--mark",
            "0x4000/0x4000",
            "-j",
            "ACCEPT",
        ])
        .expect("its accept");
    node.ns
        .exec(&["iptables", "-I", "FORWARD", "1", "-j", "KUBE-FORWARD"])
        .expect("prepended");
    let stats = agent.converge(DENY_X_INGRESS_FROM_Y);
    assert!(stats.hooked && stats.chains_written == 0, "{stats:?}");
    let forward = node.ns.exec(&["iptables", "-S", "FORWARD"]).expect("FORWARD");
    let rules: Vec<&str> = forward.lines().filter(|l| l.starts_with("-A FORWARD")).collect();
    assert_eq!(
        rules,
        vec!["-A FORWARD -j crc-FORWARD", "-A FORWARD -j KUBE-FORWARD"],
        "Caracal's hook first, kube-proxy's kept after it"
    );
    node.ns
        .exec(&["iptables", "-D", "FORWARD", "-j", "KUBE-FORWARD"])
        .expect("unhook kube-proxy");
    node.ns.exec(&["iptables", "-F", "KUBE-FORWARD"]).expect("flush");
    node.ns.exec(&["iptables", "-X", "KUBE-FORWARD"]).expect("delete");
    // A changed set is swapped in; unchanged chains stay untouched.
    let stats = agent.converge(DENY_X_INGRESS_FROM_Y);
    assert!(stats.is_noop(), "a steady state rewrites nothing: {stats:?}");
    agent.engine.remove_all().expect("clean up");
}

/// The dispatch rules of `chain` in the kernel, without the hash comment (whose text changes with them).
fn dispatch_rules(node: &Node, chain: &str) -> std::collections::BTreeSet<String> {
    node.ns
        .exec(&["iptables", "-S", chain])
        .expect("iptables -S")
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("-A {chain} ")))
        .filter(|r| !r.contains("crc:"))
        .map(str::to_owned)
        .collect()
}

/// The kernel's handles of the rules of `chain` that name an interface other than `iface`: a chain patched
/// in place keeps them, a rewritten one gets new ones.
fn other_handles(node: &Node, chain: &str, iface: &str) -> Vec<String> {
    node.ns
        .exec(&["nft", "-a", "list", "chain", "ip", "filter", chain])
        .expect("nft list chain")
        .lines()
        .filter(|l| l.contains("iifname") || l.contains("oifname"))
        .filter(|l| !l.contains(iface))
        .filter_map(|l| l.rsplit_once("# handle ").map(|(_, h)| h.trim().to_owned()))
        .collect()
}

#[test]
fn pods_leaving_and_joining_patch_the_dispatch_chains_in_place() {
    let node = node();
    let mut agent = Agent::new(&node, false);
    agent.converge(DENY_X_INGRESS_FROM_Y);
    let iface = host_iface("x", "b");
    let pod = objects(WORLD)
        .into_iter()
        .find(|(kind, key, _)| kind == "v1/Pod" && key == "x/b")
        .expect("pod x/b in the world");
    let before = dispatch_rules(&node, render::TO_WL);
    assert!(before.iter().any(|r| r.contains(&iface)), "{before:?}");
    let to_b: Check = ("x/a", "x/b", "80/TCP", true);
    assert_eq!(probe(&node, &to_b), Outcome::Connected);
    let handles = other_handles(&node, render::TO_WL, &iface);
    assert!(
        handles.len() >= 2,
        "the other endpoints' dispatch rules: {handles:?}"
    );

    // The pod leaves: its dispatch rules go, the other endpoints' stay, and its packets are dropped as
    // an unknown endpoint's.
    agent.engine.handle(Msg::Update(Update::Delete {
        kind: pod.0.clone(),
        key: pod.1.clone(),
    }));
    let stats = agent.engine.flush().expect("program");
    assert!(
        stats.chains_deleted >= 2,
        "its endpoint chains are deleted: {stats:?}"
    );
    let gone = dispatch_rules(&node, render::TO_WL);
    let expected: std::collections::BTreeSet<String> =
        before.iter().filter(|r| !r.contains(&iface)).cloned().collect();
    assert_eq!(gone, expected);
    assert!(
        !dispatch_rules(&node, render::FROM_WL)
            .iter()
            .any(|r| r.contains(&iface)),
        "its egress dispatch rule is gone too"
    );
    assert_eq!(
        probe(&node, &to_b),
        Outcome::NoAnswer,
        "an unknown endpoint's traffic is dropped"
    );
    // The final rule is still the drop of unknown endpoints.
    let listed = node
        .ns
        .exec(&["iptables", "-S", render::TO_WL])
        .expect("iptables -S");
    assert!(listed.trim_end().ends_with("-j DROP"), "{listed}");

    // It comes back: the same dispatch rules as before, traffic allowed again, and a full read-back finds
    // nothing to repair (the patched chain's hash comment matches the rendering).
    agent.engine.handle(Msg::Update(Update::Upsert {
        kind: pod.0,
        key: pod.1,
        object: pod.2,
    }));
    agent.engine.flush().expect("program");
    assert_eq!(dispatch_rules(&node, render::TO_WL), before);
    assert_eq!(
        other_handles(&node, render::TO_WL, &iface),
        handles,
        "the other endpoints' rules were left in place, not rewritten"
    );
    assert_eq!(probe(&node, &to_b), Outcome::Connected);
    let stats = agent.engine.converge().expect("converge");
    assert!(
        stats.is_noop(),
        "the patched chains are what a full render expects: {stats:?}"
    );
    agent.engine.remove_all().expect("clean up");
}

/// x/a admits TCP 80 from x/b and may start nothing itself: its replies pass only as an established flow.
const ALLOW_WEB: &str = "apiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  selector: pod == 'a'\n  types: [Ingress, Egress]\n  ingress: [{action: Allow, protocol: TCP, source: {selector: pod == 'b'}, destination: {ports: [80]}}]\n";

/// An established connection x/b -> x/a:80.
fn established(node: &Node) -> Established {
    let (client, server) = (&node.pods["x/b"], &node.pods["x/a"]);
    Established::open(&client.ns, &server.ns, server.ip, 80)
}

/// A new agent (no memory) of `restart`'s making adopts what `first` left without rewriting anything, the
/// established connection surviving; a policy edit then denies new connections and keeps it.
fn restart_keeps_an_established_connection(node: &Node, first: Agent, restart: impl Fn() -> Agent) {
    let mut agent = first;
    agent.converge(ALLOW_WEB);
    let mut conn = established(node);
    conn.roundtrip("before the restart");
    drop(agent);
    let mut restarted = restart();
    restarted.set(ALLOW_WEB);
    let stats = restarted.engine.flush().expect("first program");
    assert!(stats.is_noop(), "a restart must adopt, not rebuild: {stats:?}");
    conn.roundtrip("after the restart");
    let stats = restarted.program(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
    );
    assert!(!stats.is_noop());
    conn.roundtrip("after a deny");
    assert_eq!(
        probe(node, &("x/b", "x/a", "80/TCP", false)),
        Outcome::NoAnswer,
        "new connections are denied"
    );
    restarted.engine.remove_all().expect("clean up");
}

#[test]
fn a_restarted_agent_adopts_its_rules_and_an_established_connection_survives() {
    let node = node();
    restart_keeps_an_established_connection(&node, Agent::new(&node, false), || Agent::new(&node, false));
}

fn bpf_pins(what: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/sys/fs/bpf/caracal-{what}-{}", std::process::id()))
}

#[test]
fn a_restarted_bpf_agent_adopts_its_tables_and_links_and_an_established_connection_survives() {
    let node = node();
    let pins = bpf_pins("restart");
    restart_keeps_an_established_connection(&node, Agent::bpf(&node, &pins), || Agent::bpf(&node, &pins));
    assert!(!pins.exists());
}

/// Lines of Caracal's policy rules (natOutgoing's chain is not a backend's: it stays across a switch).
fn crc_rules(node: &Node) -> usize {
    let save = node.ns.exec(&["iptables-save"]).expect("save");
    save.lines()
        .filter(|l| l.contains("crc-") && !l.contains(caracal_node::dataplane::nat::CHAIN))
        .count()
}

fn tcx_programs(node: &Node, iface: &'static str) -> (usize, usize) {
    node.ns
        .enter(move || caracal_node::dataplane::bpf::Loaded::tcx_programs(iface).expect("query"))
        .expect("enter")
}

#[test]
fn a_live_switch_between_iptables_and_bpf_keeps_an_established_connection_and_leaves_nothing_behind() {
    use caracal_node::dataplane::{DualStack, TakeOver};
    let node = node();
    let pins = bpf_pins("switch");
    let a_iface: &'static str = Box::leak(host_iface("x", "a").into_boxed_str());
    let iptables = || Box::new(DualStack::new(node.ns.exec_prefix(), false));
    let bpf = || Box::new(BpfDataplane::with_pins(&pins, &node.ns.exec_prefix()));

    let mut agent = Agent::new(&node, false);
    agent.converge(ALLOW_WEB);
    let mut conn = established(&node);
    conn.roundtrip("under iptables");
    assert!(crc_rules(&node) > 0);
    drop(agent);

    // Iptables -> BPF: the BPF agent converges, then the iptables backend's rules go.
    let mut agent = Agent::with_backend(&node, false, "BPF", Box::new(TakeOver::new(bpf(), iptables())));
    agent.set(ALLOW_WEB);
    agent.engine.flush().expect("BPF takes over");
    conn.roundtrip("after the switch to BPF");
    assert_eq!(crc_rules(&node), 0, "the iptables backend left rules behind");
    let nat = node.ns.exec(&["iptables-save", "-t", "nat"]).expect("save");
    assert!(
        nat.contains(&format!(
            "-A POSTROUTING -m comment --comment \"caracal nat-outgoing\" -j {}",
            caracal_node::dataplane::nat::CHAIN
        )),
        "natOutgoing is both backends': it stays across the switch\n{nat}"
    );
    assert_eq!(tcx_programs(&node, a_iface), (1, 1));
    assert_eq!(
        probe(&node, &("x/a", "x/b", "80/TCP", false)),
        Outcome::NoAnswer,
        "BPF enforces: x/a may start nothing"
    );
    drop(agent);

    // BPF -> Iptables: the iptables agent converges, then the BPF programs and pins go.
    let mut agent = Agent::with_backend(
        &node,
        false,
        "Iptables",
        Box::new(TakeOver::new(iptables(), bpf())),
    );
    agent.set(ALLOW_WEB);
    agent.engine.flush().expect("iptables takes over");
    conn.roundtrip("after the switch back to iptables");
    assert_eq!(tcx_programs(&node, a_iface), (0, 0), "BPF programs left behind");
    assert!(!pins.exists(), "BPF pins left behind");
    assert!(crc_rules(&node) > 0);
    assert_eq!(
        probe(&node, &("x/a", "x/b", "80/TCP", false)),
        Outcome::NoAnswer,
        "iptables enforces: x/a may start nothing"
    );
    agent.engine.remove_all().expect("clean up");
}

#[test]
fn removal_leaves_no_chain_set_or_hook_behind() {
    let node = node();
    // Both families, as the agent runs them with IPv6 on.
    let mut agent = Agent::new(&node, true);
    let s = scenarios()
        .into_iter()
        .find(|s| s.name.contains("network set by label"))
        .expect("scenario");
    agent.converge(s.manifests);
    let save = node.ns.exec(&["iptables-save", "-t", "filter"]).expect("save");
    assert!(
        save.contains(":crc-FORWARD") && save.contains("-A FORWARD -j crc-FORWARD"),
        "{save}"
    );
    assert!(
        node.ns
            .exec(&["ipset", "list", "-n"])
            .expect("ipset")
            .lines()
            .any(|l| l.starts_with("crc-"))
    );
    agent.engine.remove_all().expect("remove");
    let save = node.ns.exec(&["iptables-save", "-t", "filter"]).expect("save");
    assert!(!save.contains("crc-"), "left behind:\n{save}");
    assert!(
        !node
            .ns
            .exec(&["ipset", "list", "-n"])
            .expect("ipset")
            .lines()
            .any(|l| l.starts_with("crc-"))
    );
    assert_eq!(
        probe(&node, &("y/a", "x/a", "80/TCP", true)),
        Outcome::Connected,
        "traffic flows without Caracal"
    );
}

/// IPv6 rules beyond the contract table: ICMPv6 with a type, an IPv4-only ICMP rule, IPv6 networks, and
/// `ipVersion`.
const IPV6_RULES: &str = "apiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: six}\nspec:\n  selector: all()\n  ingress:\n  - {action: Allow, protocol: ICMPv6, icmp: {type: 128}}\n  - {action: Allow, protocol: ICMP, icmp: {type: 8}}\n  - {action: Deny, ipVersion: 4, protocol: UDP}\n  - {action: Allow, protocol: TCP, source: {nets: ['fd00:1::/64', 10.0.0.0/8]}, destination: {ports: [80, http]}}\n";

#[test]
fn ip6tables_accepts_every_contract_rendering_and_renders_ipv6_only_what_matches_ipv6() {
    require_root();
    let ns = netns::node("ip6t").expect("node namespace");
    // The contract's pods, each with an IPv6 address beside its IPv4 one (the model comes from the agent's
    // update path; no interfaces are needed to check what ip6tables accepts).
    let node = Node {
        ns,
        pods: BTreeMap::new(),
    };
    let mut agent = Agent::new(&node, true);
    let mut i = 0;
    for (kind, key, mut object) in objects(WORLD).into_iter().filter(|(k, _, _)| k == "v1/Pod") {
        i += 1;
        let v4 = object["status"]["podIP"].clone();
        object["status"]["podIPs"] = serde_json::json!([{"ip": v4}, {"ip": format!("fd00:1::{i}")}]);
        agent
            .engine
            .handle(Msg::Update(Update::Upsert { kind, key, object }));
    }
    let ns = &node.ns;
    let mut backend = Iptables::for_family(ns.exec_prefix(), Family::V6);
    let mut render6 = |manifests: &str| {
        agent.set(manifests);
        let model = agent.model();
        (
            render::render_family(&model, Family::V6),
            render::render_family(&model, Family::V4),
        )
    };
    for s in scenarios() {
        let (six, _) = render6(s.manifests);
        backend.apply(&six).unwrap_or_else(|e| panic!("{}: {e}", s.name));
    }
    let (six, four) = render6(IPV6_RULES);
    backend.apply(&six).expect("IPv6 rules");
    assert!(
        backend.apply(&six).expect("read back").is_noop(),
        "adopted as written"
    );
    let text = render::to_text(&six);
    assert!(text.contains("-p ipv6-icmp -m icmp6 --icmpv6-type 128"), "{text}");
    assert!(
        !text.contains("--icmp-type 8"),
        "an ICMP (IPv4) rule matches no IPv6 packet: {text}"
    );
    assert!(
        !text.contains("-p udp -j DROP"),
        "an ipVersion 4 rule is IPv4's: {text}"
    );
    let four = render::to_text(&four);
    assert!(
        four.contains("-p udp -j DROP") && four.contains("--icmp-type 8"),
        "{four}"
    );
    assert!(!four.contains("icmpv6"), "{four}");
    // Sets hold only their family's members, and IPv6 sets are their own (crc6s-).
    let sets = ns.exec(&["ipset", "list", "-t"]).expect("ipset");
    assert!(
        sets.contains("family inet6") && !sets.contains("Name: crc-s-"),
        "{sets}"
    );
    let members = ns.exec(&["ipset", "save"]).expect("ipset save");
    assert!(
        members.contains("fd00:1::/64") && !members.contains("10.0.0.0/8"),
        "{members}"
    );
    let rules = ns.exec(&["ip6tables", "-S", "FORWARD"]).expect("ip6tables");
    assert!(rules.contains("-j crc-FORWARD"), "{rules}");
    backend.remove_all().expect("clean up");
    let after = ns.exec(&["ip6tables-save", "-t", "filter"]).expect("save");
    assert!(!after.contains("crc-"), "{after}");
    assert!(!ns.exec(&["ipset", "save"]).expect("ipset").contains("crc6"));
}

/// What `pod` sees sending one UDP datagram to `ip:port` where nothing listens: `refused` when the ICMP port
/// unreachable came back, `timeout` when nothing did.
fn udp_to_closed_port(pod: &Pod, ip: std::net::Ipv4Addr) -> String {
    let script = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(2)\n\
         s.connect(('{ip}',9999))\ns.send(b'x')\ntry:\n    s.recv(9)\n    print('answer')\n\
         except ConnectionRefusedError:\n    print('refused')\nexcept socket.timeout:\n    print('timeout')\n"
    );
    pod.ns
        .exec(&["python3", "-c", &script])
        .expect("python3")
        .trim()
        .to_owned()
}

/// Whether `to` receives (on a raw socket) an ICMP message of `type_` that `from` sends it: a port
/// unreachable (3) quoting a UDP flow that never existed (to:5555 -> from:7777), or an echo request (8).
fn crafted_icmp_arrives(from: &Pod, to: &Pod, type_: u8) -> bool {
    let listen = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP)\ns.settimeout(3)\n\
         try:\n    while True:\n        d=s.recv(200)\n        if d[20]=={type_} and d[12:16]==bytes({src:?}):\n            print('got')\n            break\n\
         except socket.timeout:\n    print('none')\n",
        src = from.ip.octets()
    );
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", to.ns.name(), "python3", "-c", &listen])
        .stdout(std::process::Stdio::piped());
    let listener = cmd.spawn().expect("listener");
    std::thread::sleep(Duration::from_millis(500));
    let (src, dst) = (to.ip.octets(), from.ip.octets());
    let send = format!(
        "import socket,struct\n\
         def csum(b):\n    s=sum(struct.unpack('!%dH'%(len(b)//2),b))\n    s=(s>>16)+(s&0xffff)\n    s+=s>>16\n    return (~s)&0xffff\n\
         ip=struct.pack('!BBHHHBBH4s4s',0x45,0,28,1,0,64,17,0,bytes({src:?}),bytes({dst:?}))\n\
         ip=ip[:10]+struct.pack('!H',csum(ip))+ip[12:]\n\
         udp=struct.pack('!HHHH',5555,7777,8,0)\n\
         body=struct.pack('!BBHI',{type_},{code},0,0)+ip+udp\n\
         body=body[:2]+struct.pack('!H',csum(body))+body[4:]\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_ICMP)\n\
         s.sendto(body,('{}',0))\n",
        to.ip,
        code = if type_ == 3 { 3 } else { 0 },
    );
    from.ns.exec(&["python3", "-c", &send]).expect("send");
    let out = listener.wait_with_output().expect("listener output");
    String::from_utf8_lossy(&out.stdout).trim() == "got"
}

/// ICMP errors about a flow the policy allowed reach the pod though its ingress denies everything (RELATED,
/// as Linux's tracker and the iptables backend have it); one about no flow does not, even with no policy at
/// all (the tracker calls it INVALID, which the iptables backend drops before policy).
fn icmp_errors_are_related_to_their_flow(node: &Node, mut agent: Agent) {
    agent.program(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
    );
    let (xa, ya) = (&node.pods["x/a"], &node.pods["y/a"]);
    // The denial holds for new flows into x/a.
    assert_eq!(probe(node, &("y/a", "x/a", "80/TCP", false)), Outcome::NoAnswer);
    assert_eq!(
        udp_to_closed_port(xa, ya.ip),
        "refused",
        "the port unreachable about x/a's own UDP flow reaches it"
    );
    assert!(
        !crafted_icmp_arrives(ya, xa, 3),
        "an ICMP error about no flow is dropped"
    );
    agent.program("");
    assert!(
        !crafted_icmp_arrives(ya, xa, 3),
        "an ICMP error about no flow is dropped with no policy too"
    );
    assert!(
        crafted_icmp_arrives(ya, xa, 8),
        "an echo request crafted the same way arrives: the probe works"
    );
    agent.engine.remove_all().expect("clean up");
}

#[test]
fn the_iptables_backend_passes_icmp_errors_related_to_an_allowed_flow() {
    let node = node();
    icmp_errors_are_related_to_their_flow(&node, Agent::new(&node, false));
}

#[test]
fn the_bpf_backend_passes_icmp_errors_related_to_an_allowed_flow() {
    let node = node();
    let pins = std::path::PathBuf::from(format!("/sys/fs/bpf/caracal-related-{}", std::process::id()));
    icmp_errors_are_related_to_their_flow(&node, Agent::bpf(&node, &pins));
}

/// A TCP connection from pod `from` to its host (the gateway address on the host side of its veth).
fn to_host(node: &Node, from: &str, port: u16) -> Outcome {
    let gateway = std::net::Ipv4Addr::new(169, 254, 1, 1);
    let first = probe::tcp(&node.pods[from].ns, &node.ns, gateway, port, TIMEOUT).expect("probe");
    if first == Outcome::Connected {
        return first;
    }
    probe::tcp(
        &node.pods[from].ns,
        &node.ns,
        gateway,
        port,
        Duration::from_secs(2),
    )
    .expect("probe")
}

fn set_to_host(agent: &mut Agent, action: caracal_policy::model::EndpointToHost) {
    agent.engine.handle(Msg::Felix {
        nat_outgoing_address: None,
        endpoint_to_host: action,
    });
    agent.engine.flush().expect("program");
}

/// Felix's `defaultEndpointToHostAction` in both backends: Drop (the default) stops a pod's traffic to its
/// own host, Accept lets it in, and the pod's egress policy still comes first; in iptables mode Return hands
/// it to the host's own INPUT rules (which Accept bypasses). The host's own connections to a pod are
/// unaffected.
#[test]
fn default_endpoint_to_host_action_drops_accepts_or_returns_a_pods_traffic_to_its_host() {
    use caracal_policy::model::EndpointToHost;
    let node = node();
    let pins = bpf_pins("to-host");
    for dataplane in ["Iptables", "BPF"] {
        let mut agent = match dataplane {
            "BPF" => Agent::bpf(&node, &pins),
            _ => Agent::new(&node, false),
        };
        agent.converge(ALLOW_WEB);
        assert_eq!(
            to_host(&node, "x/b", 7201),
            Outcome::NoAnswer,
            "{dataplane}: Drop by default"
        );
        assert_eq!(
            probe(&node, &("x/b", "x/a", "80/TCP", true)),
            Outcome::Connected,
            "{dataplane}: pod to pod is not the host's"
        );
        let from_host = probe::tcp(
            &node.ns,
            &node.pods["x/b"].ns,
            node.pods["x/b"].ip,
            7202,
            Duration::from_secs(2),
        )
        .expect("probe");
        assert_eq!(
            from_host,
            Outcome::Connected,
            "{dataplane}: the host reaches its pods"
        );

        set_to_host(&mut agent, EndpointToHost::Accept);
        assert_eq!(
            to_host(&node, "x/b", 7203),
            Outcome::Connected,
            "{dataplane}: Accept"
        );
        assert_eq!(
            to_host(&node, "x/a", 7204),
            Outcome::NoAnswer,
            "{dataplane}: x/a's egress policy (it may start nothing) still comes first"
        );

        if dataplane == "Iptables" {
            // The host's own INPUT rule against the port: Return hands the packet to it, Accept does not.
            node.ns
                .exec(&[
                    "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "7205", "-j", "DROP",
                ])
                .expect("host rule");
            assert_eq!(
                to_host(&node, "x/b", 7205),
                Outcome::Connected,
                "Accept bypasses the host's rules"
            );
            set_to_host(&mut agent, EndpointToHost::Return);
            assert_eq!(
                to_host(&node, "x/b", 7205),
                Outcome::NoAnswer,
                "Return: the host's rule drops it"
            );
            assert_eq!(
                to_host(&node, "x/b", 7206),
                Outcome::Connected,
                "Return: other ports pass"
            );
            node.ns
                .exec(&[
                    "iptables", "-D", "INPUT", "-p", "tcp", "--dport", "7205", "-j", "DROP",
                ])
                .expect("host rule");
        } else {
            set_to_host(&mut agent, EndpointToHost::Return);
            assert_eq!(
                to_host(&node, "x/b", 7206),
                Outcome::Connected,
                "BPF: Return passes to the stack"
            );
        }
        set_to_host(&mut agent, EndpointToHost::Drop);
        assert_eq!(
            to_host(&node, "x/b", 7207),
            Outcome::NoAnswer,
            "{dataplane}: Drop again"
        );
        agent.engine.remove_all().expect("clean up");
    }
    assert!(!pins.exists());
}

/// A connection the kernel's tracker translates (kube-proxy's DNAT of a ClusterIP to a pod on the same node)
/// keeps working after the switch to BPF with kube-proxy's rule gone: the programs leave its packets to the
/// stack, whose tracker still undoes the translation, instead of sending the backend's replies straight to
/// the client pod (which would see them from the backend's own address).
#[test]
fn a_connection_the_kernel_translates_keeps_working_after_the_switch_to_bpf() {
    use caracal_node::dataplane::{DualStack, TakeOver};
    let node = node();
    let pins = bpf_pins("natswitch");
    let iptables = || Box::new(DualStack::new(node.ns.exec_prefix(), false));
    let bpf = || Box::new(BpfDataplane::with_pins(&pins, &node.ns.exec_prefix()));
    let mut agent = Agent::new(&node, false);
    agent.converge(ALLOW_WEB);
    let (client, server) = (&node.pods["x/b"], &node.pods["x/a"]);
    let dnat = |op: &str| {
        node.ns
            .exec(&[
                "iptables",
                "-t",
                "nat",
                op,
                "PREROUTING",
                "-d",
                "10.96.7.7",
                "-p",
                "tcp",
                "--dport",
                "8080",
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{}:80", server.ip),
            ])
            .expect("kube-proxy's DNAT");
    };
    dnat("-A");
    let mut conn = Established::open_via(
        &client.ns,
        &server.ns,
        server.ip,
        80,
        "10.96.7.7:8080".parse().expect("addr"),
    );
    conn.roundtrip("through the DNAT, under iptables");
    drop(agent);
    let mut agent = Agent::with_backend(&node, false, "BPF", Box::new(TakeOver::new(bpf(), iptables())));
    agent.set(ALLOW_WEB);
    agent.engine.flush().expect("BPF takes over");
    dnat("-D");
    conn.roundtrip("after the switch to BPF, the DNAT rule gone");
    agent.engine.remove_all().expect("clean up");
}
