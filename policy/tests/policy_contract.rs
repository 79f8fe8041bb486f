//! The contract table, evaluated by the offline engine. (The iptables backend's kernel tests replay the same
//! scenarios with real packets.)

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use caracal_policy::contract::{Check, check_packet, load_world, scenarios};
use caracal_policy::eval::evaluate;
use caracal_policy::load::Loaded;
use caracal_policy::matrix::{self, ProbePort};

fn world(manifests: &str) -> Loaded {
    load_world(manifests).expect("the scenario loads")
}

fn verdict(loaded: &Loaded, check: &Check) -> bool {
    evaluate(&loaded.world, &check_packet(loaded, check).expect("packet")).allowed()
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
