//! The contract table, evaluated by the offline engine. (The iptables backend's kernel tests replay the same
//! scenarios with real packets.)

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use caracal_policy::contract::{Check, WORLD, scenarios};
use caracal_policy::eval::{Packet, evaluate};
use caracal_policy::load::{Loaded, load_documents};
use caracal_policy::matrix::{self, ProbePort};
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

fn verdict(loaded: &Loaded, check: &Check) -> bool {
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
    if let Some(icmp) = port.strip_suffix("/ICMP") {
        let (t, c) = icmp.split_once('.').expect("TYPE.CODE/ICMP");
        let pkt = Packet {
            src: a.ips[0],
            dst: b.ips[0],
            protocol: 1,
            src_port: None,
            dst_port: None,
            icmp: Some((t.parse().expect("type"), c.parse().expect("code"))),
        };
        return evaluate(&loaded.world, &pkt).allowed();
    }
    let port: ProbePort = port.parse().expect("port");
    evaluate(&loaded.world, &matrix::packet(a, b, port).expect("packet")).allowed()
}

#[test]
fn the_engine_meets_the_contract_table() {
    let all = scenarios();
    assert!(
        all.len() >= 40,
        "the contract table should hold at least 40 scenarios, has {}",
        all.len()
    );
    let mut failures = Vec::new();
    let mut checks = 0;
    for s in &all {
        let loaded = world(s.manifests);
        assert!(loaded.warnings.is_empty(), "{}: {:?}", s.name, loaded.warnings);
        for check in &s.checks {
            checks += 1;
            if verdict(&loaded, check) != check.3 {
                let want = if check.3 { "allowed" } else { "denied" };
                failures.push(format!(
                    "{}: {} -> {} {}: expected {want}",
                    s.name, check.0, check.1, check.2
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checks} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn explain_shows_the_path_through_tiers() {
    let s = scenarios()
        .into_iter()
        .find(|s| s.name.starts_with("tiers: a higher tier's Deny"))
        .expect("scenario");
    let loaded = world(s.manifests);
    let find = |k: &str| loaded.world.endpoints.iter().find(|e| e.key() == k).expect("pod");
    let pkt = matrix::packet(find("z/a"), find("x/a"), "80/TCP".parse().expect("port")).expect("packet");
    let text = matrix::explain(&evaluate(&loaded.world, &pkt));
    assert!(
        text.contains("tier security: policy block-y: rule 1 matched: Pass to the next tier"),
        "{text}"
    );
    assert!(
        text.contains("tier default: policy knp.default.x/allow-all: rule 0 matched: Allow"),
        "{text}"
    );
    assert!(text.ends_with("verdict: ALLOWED\n"), "{text}");
}

#[test]
fn the_matrix_covers_every_ordered_pair_of_distinct_pods_for_every_port() {
    let loaded = world(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n",
    );
    let ports: Vec<ProbePort> = vec!["80/TCP".parse().expect("p"), "81/UDP".parse().expect("p")];
    let cells = matrix::matrix(&loaded.world, &ports);
    let n = loaded.world.endpoints.len();
    assert_eq!(cells.len(), n * (n - 1) * 2);
    let json = serde_json::json!({ "results": cells });
    let first = &json["results"][0];
    for key in ["from", "to", "port", "protocol", "allowed"] {
        assert!(first.get(key).is_some(), "{key} missing from {first}");
    }
    let table = matrix::table(&loaded.world, &cells, &ports);
    assert!(
        table.starts_with("80/TCP:\n-\tx/a\tx/b\tx/c\ty/a\ty/b\tz/a\tz/c\n"),
        "{table}"
    );
    assert!(table.contains("\ny/a\tX\tX\tX\t-\t.\t.\t.\n"), "{table}");
}
