//! The BPF policy tables as the program reads them (pure, no kernel): the program's walk over the laid-out
//! map entries ([`Image::decide`]) gives the contract's verdict for every check of the contract table, and
//! the same verdict as the compiled tables' bitmap walk for thousands of random packets; lists longer than
//! one chunk, with tiers passing across chunk boundaries, decide as the list walk does.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use caracal_node::dataplane::bpf::tables::{self, CHUNK_BITS, Image, image};
use caracal_policy::classify::{compile, compile_for, decide_bitmap, flatten};
use caracal_policy::contract::{
    RandomPackets, check_packet, load_world, local_iface, model_all_local, scenarios,
};
use caracal_policy::eval::Packet;
use caracal_policy::ir::Direction;
use caracal_policy::model::DataplaneModel;

fn side_image(model: &DataplaneModel, key: &str, dir: Direction) -> Option<Image> {
    let tiers = model.endpoint_tiers.get(&local_iface(key))?;
    let list = match dir {
        Direction::Ingress => &tiers.ingress,
        Direction::Egress => &tiers.egress,
    };
    let entries = flatten(list, &model.policies, dir);
    Some(image(&entries, &compile(&entries, model)).expect("lays out"))
}

#[test]
fn the_laid_out_tables_meet_the_contract_table() {
    let mut failures = Vec::new();
    let mut checks = 0;
    for s in &scenarios() {
        let loaded = load_world(s.manifests).expect("loads");
        let model = model_all_local(&loaded);
        for check in &s.checks {
            checks += 1;
            let pkt = check_packet(&loaded, check).expect("packet");
            let egress = side_image(&model, check.0, Direction::Egress).is_none_or(|i| i.decide(&pkt));
            let ingress = side_image(&model, check.1, Direction::Ingress).is_none_or(|i| i.decide(&pkt));
            if (egress && ingress) != check.3 {
                failures.push(format!(
                    "{}: {} -> {} {}: expected {}",
                    s.name,
                    check.0,
                    check.1,
                    check.2,
                    if check.3 { "allowed" } else { "denied" }
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

#[test]
fn the_laid_out_tables_decide_as_the_compiled_tables_on_random_packets() {
    let mut compared = 0usize;
    let mut denied = 0usize;
    for s in &scenarios() {
        let loaded = load_world(s.manifests).expect("loads");
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
                let laid_out = image(&entries, &tables).expect("lays out");
                for _ in 0..200 {
                    let pkt = packets.packet(e.ips[0], dir == Direction::Ingress);
                    let want = decide_bitmap(&entries, &tables.matching(&pkt));
                    assert_eq!(
                        laid_out.decide(&pkt),
                        want,
                        "{}: {} {dir:?} {pkt:?}",
                        s.name,
                        e.key()
                    );
                    compared += 1;
                    denied += usize::from(!want);
                }
            }
        }
    }
    assert!(compared > 10_000, "only {compared} packets");
    assert!(
        denied > compared / 20,
        "only {denied} of {compared} denied: the packets test little"
    );
}

/// A policy of `n` ingress rules: Deny from 10.99.x.y/32 for the first `n - 1`, then `last`.
fn long_policy(name: &str, order: u32, tier: &str, n: usize, last: &str) -> String {
    let mut rules = String::new();
    for i in 0..n - 1 {
        rules.push_str(&format!(
            "  - {{action: Deny, source: {{nets: [10.99.{}.{}/32]}}}}\n",
            i / 256,
            i % 256
        ));
    }
    rules.push_str(&format!("  - {last}\n"));
    format!(
        "apiVersion: caracal.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  order: {order}\n  selector: all()\n  ingress:\n{rules}"
    )
}

#[test]
fn lists_longer_than_a_chunk_pass_and_decide_across_chunks() {
    // Tier one: 5,000 rules ending in a Pass (so its Pass sits in the second chunk and jumps to tier two's
    // first entry); tier two: 3,000 rules ending in an Allow for 10.0.0.0/8 on TCP 80 only.
    let manifests = format!(
        "apiVersion: caracal.dev/v1\nkind: Tier\nmetadata: {{name: one}}\nspec: {{order: 10}}\n---\napiVersion: caracal.dev/v1\nkind: Tier\nmetadata: {{name: two}}\nspec: {{order: 20}}\n---\n{}---\n{}",
        long_policy("first", 1, "one", 5000, "{action: Pass}"),
        long_policy(
            "second",
            1,
            "two",
            3000,
            "{action: Allow, protocol: TCP, source: {nets: [10.0.0.0/8]}, destination: {ports: [80]}}"
        ),
    );
    let loaded = load_world(&manifests).expect("loads");
    let model = model_all_local(&loaded);
    let e = &loaded.world.endpoints[0];
    let tiers = model.endpoint_tiers.get(&local_iface(&e.key())).expect("tiers");
    let entries = flatten(&tiers.ingress, &model.policies, Direction::Ingress);
    assert!(entries.len() > CHUNK_BITS, "{} entries", entries.len());
    let tables = compile(&entries, &model);
    let laid_out = image(&entries, &tables).expect("lays out");
    assert_eq!(laid_out.chunks.len(), entries.len().div_ceil(CHUNK_BITS));
    let tcp = |src: &str, port: u16| Packet {
        src: src.parse().expect("ip"),
        dst: e.ips[0],
        protocol: 6,
        src_port: Some(40000),
        dst_port: Some(port),
        icmp: None,
    };
    let cases = [
        (tcp("10.0.0.9", 80), true),
        (tcp("10.0.0.9", 81), false),
        (tcp("10.99.3.7", 80), false),    // denied in tier one, first chunk
        (tcp("10.99.17.50", 80), false),  // denied in tier one, second chunk
        (tcp("10.99.19.100", 80), false), // 10.99.19.100 is rule 4964 of tier one; of tier two too
        (tcp("10.99.12.0", 80), false),   // tier two's rules are tier one's first 3,000
        (tcp("192.168.0.1", 80), false),  // tier two's default
    ];
    for (pkt, want) in cases {
        assert_eq!(
            decide_bitmap(&entries, &tables.matching(&pkt)),
            want,
            "the list walk on {pkt:?}"
        );
        assert_eq!(laid_out.decide(&pkt), want, "the laid-out walk on {pkt:?}");
    }
}

/// Namespace `m` (beside the contract's base world) with pod `server` (selected by the policy) and `client`;
/// `extra` adds pod `new` (app=client, with a named port `http`); `rule` is the policy's one ingress rule.
fn member_world(extra: bool, rule: &str) -> String {
    let mut m = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: m}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: m, labels: {app: server}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 80, protocol: TCP}]}]}\nstatus: {podIP: 10.7.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: m, labels: {app: client}}\nstatus: {podIP: 10.7.0.2}\n",
    );
    if extra {
        m.push_str("---\napiVersion: v1\nkind: Pod\nmetadata: {name: new, namespace: m, labels: {app: client}}\nspec: {containers: [{name: c, ports: [{name: http, containerPort: 8080, protocol: TCP}]}]}\nstatus: {podIP: 10.7.0.9}\n");
    }
    m.push_str(&format!(
        "---\napiVersion: caracal.dev/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: m}}\nspec:\n  selector: app == 'server'\n  types: [Ingress]\n  ingress:\n  - {rule}\n"
    ));
    m
}

#[test]
fn a_set_member_joining_changes_a_table_by_a_few_keys_that_give_the_new_answer() {
    let rule =
        "{action: Allow, protocol: TCP, source: {selector: app == 'client'}, destination: {ports: [http]}}";
    let image_of = |extra: bool, rule: &str| {
        let loaded = load_world(&member_world(extra, rule)).expect("loads");
        let model = model_all_local(&loaded);
        (
            side_image(&model, "m/server", Direction::Ingress).expect("the server's ingress"),
            loaded,
        )
    };
    let (before, _) = image_of(false, rule);
    let (after, loaded) = image_of(true, rule);
    assert_ne!(before.hash, after.hash, "the new member changes the table");
    let diff = tables::member_diff(&before, &after).expect("a member-only change");
    // The new client's address (source side) and its named port (destination side, another pod's).
    assert_eq!(diff.put_addrs.len(), 1, "{diff:?}");
    assert_eq!(diff.put_addrs[0].1, 0, "a source address");
    assert_eq!(diff.put_matches.len(), 1, "{diff:?}");
    assert!(diff.drop_addrs.is_empty() && diff.drop_matches.is_empty());
    assert_eq!(
        diff.apply(&before).canonical().chunks,
        after.clone().canonical().chunks,
        "the patched table is the new one"
    );
    // Safe for the server's table (its own address is not among the changed keys) ...
    let a = tables::addr16(
        loaded
            .world
            .endpoints
            .iter()
            .find(|e| e.key() == "m/server")
            .expect("server")
            .ips[0],
    );
    assert!(diff.atomic_for(1, &[a]));
    // ... and not for a table whose own side is where the new pod's named port changed.
    let n = tables::addr16("10.7.0.9".parse().expect("ip"));
    assert!(
        !diff.atomic_for(1, &[n]),
        "changes on both sides, one of them the table's own address"
    );
    // The patched table answers for the new client as the new one does.
    let pkt = Packet {
        src: "10.7.0.9".parse().expect("ip"),
        dst: "10.7.0.1".parse().expect("ip"),
        protocol: 6,
        src_port: Some(40000),
        dst_port: Some(80),
        icmp: None,
    };
    assert!(!before.decide(&pkt));
    assert!(diff.apply(&before).decide(&pkt));
    // The member leaving is the reverse diff.
    let back = tables::member_diff(&after, &before).expect("member-only");
    assert_eq!((back.drop_addrs.len(), back.drop_matches.len()), (1, 1));
    assert!(!back.apply(&after).decide(&pkt));
    // A changed rule is not a member change: it gets a table of its own.
    let (other, _) = image_of(
        false,
        "{action: Allow, protocol: TCP, source: {selector: app == 'client'}, destination: {ports: [81]}}",
    );
    assert!(tables::member_diff(&before, &other).is_none());
}

#[test]
fn an_endpoints_own_named_ports_are_keyed_without_address_and_another_pods_port_changes_nothing() {
    let rule =
        "{action: Allow, protocol: TCP, source: {selector: app == 'client'}, destination: {ports: [http]}}";
    let own_image = |extra: bool| {
        let loaded = load_world(&member_world(extra, rule)).expect("loads");
        let model = model_all_local(&loaded);
        let server = loaded
            .world
            .endpoints
            .iter()
            .find(|e| e.key() == "m/server")
            .expect("server");
        let tiers = model.endpoint_tiers.get(&local_iface("m/server")).expect("tiers");
        let entries = flatten(&tiers.ingress, &model.policies, Direction::Ingress);
        let own = caracal_policy::classify::Own {
            source: false,
            ips: &server.ips,
        };
        image(&entries, &compile_for(&entries, &model, Some(own))).expect("lays out")
    };
    let (before, after) = (own_image(false), own_image(true));
    // The server's own http (80) is one address-less key; the new pod's http (8080) is not in its table.
    let named: Vec<_> = after
        .chunks
        .iter()
        .flat_map(|c| &c.matches)
        .filter(|(k, _)| k.kind == tables::K_NAMED)
        .map(|(k, _)| (k.addr, k.a))
        .collect();
    assert_eq!(named, vec![([0; 16], 80)]);
    let diff = tables::member_diff(&before, &after).expect("member-only");
    assert!(
        diff.put_matches.is_empty() && diff.drop_matches.is_empty(),
        "{diff:?}"
    );
    assert_eq!(diff.put_addrs.len(), 1, "only the new client's source address");
    let to = |port: u16| Packet {
        src: "10.7.0.9".parse().expect("ip"),
        dst: "10.7.0.1".parse().expect("ip"),
        protocol: 6,
        src_port: Some(40000),
        dst_port: Some(port),
        icmp: None,
    };
    assert!(after.decide(&to(80)), "the server's own named port");
    assert!(!after.decide(&to(8080)), "another pod's http is not the server's");
}
