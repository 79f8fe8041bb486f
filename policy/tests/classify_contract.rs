//! The contract table through the flattened first-match lists the BPF data plane's tables are compiled from:
//! for every check, the source endpoint's egress list and the destination endpoint's ingress list, built from
//! the node's model (the calculation graph's output, as a backend receives it), decide as the contract says,
//! both walked entry by entry and through a bitmap of the matching entries; and the per-field tables compiled
//! from the model's sets find exactly the entries whose rules match.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use caracal_policy::calc::compute;
use caracal_policy::classify::{Bitmap, compile, decide, decide_bitmap, flatten};
use caracal_policy::contract::{Check, check_packet, load_world, scenarios};
use caracal_policy::eval::{Packet, rule_matches};
use caracal_policy::ir::Direction;
use caracal_policy::load::Loaded;
use caracal_policy::model::{DataplaneModel, LocalEndpoint};

fn world(manifests: &str) -> Loaded {
    load_world(manifests).expect("the scenario loads")
}

/// The model of one node that holds every endpoint of the world (so it lists every endpoint's tiers).
fn model_of(loaded: &Loaded) -> DataplaneModel {
    let local: Vec<LocalEndpoint> = loaded
        .world
        .endpoints
        .iter()
        .map(|e| LocalEndpoint {
            key: e.key(),
            iface: iface(&e.key()),
            ips: e.ips.clone(),
        })
        .collect();
    compute(&loaded.world, &local)
}

fn iface(key: &str) -> String {
    format!("crc{}", key.replace('/', "-"))
}

/// One side's verdict through the flattened list, both ways; they must agree.
fn side(loaded: &Loaded, model: &DataplaneModel, key: &str, dir: Direction, pkt: &Packet) -> bool {
    let Some(tiers) = model.endpoint_tiers.get(&iface(key)) else {
        return true;
    };
    let tiers = match dir {
        Direction::Ingress => &tiers.ingress,
        Direction::Egress => &tiers.egress,
    };
    let entries = flatten(tiers, &model.policies, dir);
    let matches = |i: usize| {
        entries[i]
            .rule
            .is_some_and(|r| rule_matches(&loaded.world, r, pkt))
    };
    let mut bits = Bitmap::new(entries.len());
    for (i, e) in entries.iter().enumerate() {
        if e.rule.is_none() || matches(i) {
            bits.set(i);
        }
    }
    let walked = decide(&entries, matches);
    assert_eq!(
        walked,
        decide_bitmap(&entries, &bits),
        "{key} {dir:?}: the walks disagree"
    );
    // The per-field tables find the same matching entries.
    let tables = compile(&entries, model);
    let looked_up = tables.matching(pkt);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(
            looked_up.get(i),
            bits.get(i),
            "{key} {dir:?} {pkt:?}: entry {i} ({:?} of {:?}) matches by rule but not by table, or the reverse",
            e.policy,
            e.tier
        );
    }
    walked
}

fn verdict(loaded: &Loaded, model: &DataplaneModel, check: &Check) -> bool {
    let pkt = check_packet(loaded, check).expect("packet");
    side(loaded, model, check.0, Direction::Egress, &pkt)
        && side(loaded, model, check.1, Direction::Ingress, &pkt)
}

#[test]
fn the_flattened_lists_meet_the_contract_table() {
    let mut failures = Vec::new();
    let mut checks = 0;
    for s in &scenarios() {
        let loaded = world(s.manifests);
        let model = model_of(&loaded);
        for check in &s.checks {
            checks += 1;
            if verdict(&loaded, &model, check) != check.3 {
                let want = if check.3 { "allowed" } else { "denied" };
                failures.push(format!(
                    "{}: {} -> {} {}: expected {want}",
                    s.name, check.0, check.1, check.2
                ));
            }
        }
    }
    assert!(checks >= 100, "only {checks} checks");
    assert!(
        failures.is_empty(),
        "{} of {checks} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Beyond the table's own packets: for every scenario, thousands of packets drawn at random (any two of the
/// world's addresses or addresses outside it, either order, TCP/UDP/SCTP on ports around the ones the
/// scenarios name, ICMP of several types and codes, other protocols), and every endpoint's lists in both
/// directions: the compiled tables find exactly the entries whose rules match.
#[test]
fn the_compiled_tables_match_the_rules_on_random_packets() {
    // A fixed-seed generator: the same packets every run.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    let mut compared = 0usize;
    for s in &scenarios() {
        let loaded = world(s.manifests);
        let model = model_of(&loaded);
        let mut addrs: Vec<std::net::IpAddr> = loaded
            .world
            .endpoints
            .iter()
            .flat_map(|e| e.ips.clone())
            .collect();
        addrs.extend(
            [
                "10.0.1.200",
                "10.0.9.9",
                "192.168.7.1",
                "172.16.0.1",
                "8.8.8.8",
                "10.0.3.254",
            ]
            .iter()
            .map(|a| a.parse::<std::net::IpAddr>().expect("addr")),
        );
        let ports = [
            0u16, 1, 52, 53, 54, 79, 80, 81, 443, 5000, 8080, 8443, 9000, 40000, 65535,
        ];
        for e in &loaded.world.endpoints {
            let Some(tiers) = model.endpoint_tiers.get(&iface(&e.key())) else {
                continue;
            };
            for (dir, list) in [
                (Direction::Ingress, &tiers.ingress),
                (Direction::Egress, &tiers.egress),
            ] {
                let entries = flatten(list, &model.policies, dir);
                let tables = compile(&entries, &model);
                for _ in 0..200 {
                    let other = addrs[next(addrs.len() as u64) as usize];
                    let (src, dst) = match dir {
                        Direction::Ingress => (other, e.ips[0]),
                        Direction::Egress => (e.ips[0], other),
                    };
                    let pkt = match next(5) {
                        0..=2 => Packet {
                            src,
                            dst,
                            protocol: [6u8, 17, 132][next(3) as usize],
                            src_port: Some(ports[next(ports.len() as u64) as usize]),
                            dst_port: Some(ports[next(ports.len() as u64) as usize]),
                            icmp: None,
                        },
                        3 => Packet {
                            src,
                            dst,
                            protocol: 1,
                            src_port: None,
                            dst_port: None,
                            icmp: Some(([0u8, 3, 8, 11][next(4) as usize], next(5) as u8)),
                        },
                        _ => Packet {
                            src,
                            dst,
                            protocol: [47u8, 50, 4][next(3) as usize],
                            src_port: None,
                            dst_port: None,
                            icmp: None,
                        },
                    };
                    let found = tables.matching(&pkt);
                    for (i, entry) in entries.iter().enumerate() {
                        let by_rule = entry.rule.is_none_or(|r| rule_matches(&loaded.world, r, &pkt));
                        assert_eq!(
                            found.get(i),
                            by_rule,
                            "{}: {} {dir:?} {pkt:?}: entry {i} of {:?}",
                            s.name,
                            e.key(),
                            entry.policy
                        );
                        compared += 1;
                    }
                }
            }
        }
    }
    assert!(compared > 100_000, "only {compared} comparisons");
}
