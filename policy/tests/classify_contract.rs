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
use caracal_policy::contract::{Check, WORLD, scenarios};
use caracal_policy::eval::{Packet, rule_matches};
use caracal_policy::ir::Direction;
use caracal_policy::load::{Loaded, load_documents};
use caracal_policy::matrix::{self, ProbePort};
use caracal_policy::model::{DataplaneModel, LocalEndpoint};
use serde_json::Value;

fn world(manifests: &str) -> Loaded {
    let docs = serde_yaml::Deserializer::from_str(WORLD)
        .chain(serde_yaml::Deserializer::from_str(manifests))
        .filter_map(|de| {
            let v: Value = serde::Deserialize::deserialize(de).expect("YAML");
            (!v.is_null()).then(|| ("scenario".to_owned(), v))
        })
        .collect();
    load_documents(docs).expect("load")
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
    let (from, to, port, _) = *check;
    let find = |k: &str| {
        loaded
            .world
            .endpoints
            .iter()
            .find(|e| e.key() == k)
            .unwrap_or_else(|| panic!("no pod {k}"))
    };
    let (a, b) = (find(from), find(to));
    let pkt = if let Some(icmp) = port.strip_suffix("/ICMP") {
        let (t, c) = icmp.split_once('.').expect("TYPE.CODE/ICMP");
        Packet {
            src: a.ips[0],
            dst: b.ips[0],
            protocol: 1,
            src_port: None,
            dst_port: None,
            icmp: Some((t.parse().expect("type"), c.parse().expect("code"))),
        }
    } else {
        let port: ProbePort = port.parse().expect("port");
        matrix::packet(a, b, port).expect("packet")
    };
    side(loaded, model, from, Direction::Egress, &pkt) && side(loaded, model, to, Direction::Ingress, &pkt)
}

#[test]
fn the_flattened_lists_meet_the_contract_table() {
    let mut failures = Vec::new();
    let mut checks = 0;
    for s in &scenarios() {
        let loaded = world(s.manifests);
        // Every endpoint local to one node: the model then lists every endpoint's tiers.
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
        let model = compute(&loaded.world, &local);
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
