//! The contract table through the flattened first-match lists the BPF data plane's tables are compiled from:
//! for every check, the source endpoint's egress list and the destination endpoint's ingress list, built from
//! the node's model (the calculation graph's output, as a backend receives it), decide as the contract says,
//! both walked entry by entry and through a bitmap of the matching entries; and the per-field tables compiled
//! from the model's sets find exactly the entries whose rules match.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use caracal_policy::classify::{Bitmap, compile, decide, decide_bitmap, flatten};
use caracal_policy::contract::{
    Check, RandomPackets, check_packet, load_world, local_iface, model_all_local, scenarios,
};
use caracal_policy::eval::{Packet, rule_matches};
use caracal_policy::ir::Direction;
use caracal_policy::load::Loaded;
use caracal_policy::model::DataplaneModel;

fn world(manifests: &str) -> Loaded {
    load_world(manifests).expect("the scenario loads")
}

/// One side's verdict through the flattened list, both ways; they must agree.
fn side(loaded: &Loaded, model: &DataplaneModel, key: &str, dir: Direction, pkt: &Packet) -> bool {
    let Some(tiers) = model.endpoint_tiers.get(&local_iface(key)) else {
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
        let model = model_all_local(&loaded);
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
    let mut compared = 0usize;
    for s in &scenarios() {
        let loaded = world(s.manifests);
        let model = model_all_local(&loaded);
        let mut packets = RandomPackets::new(&loaded);
        for e in &loaded.world.endpoints {
            let Some(tiers) = model.endpoint_tiers.get(&local_iface(&e.key())) else {
                continue;
            };
            for (dir, list) in [
                (Direction::Ingress, &tiers.ingress),
                (Direction::Egress, &tiers.egress),
            ] {
                let entries = flatten(list, &model.policies, dir);
                let tables = compile(&entries, &model);
                for _ in 0..200 {
                    let pkt = packets.packet(e.ips[0], dir == Direction::Ingress);
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
