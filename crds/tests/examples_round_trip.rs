//! Every Caracal object in examples/ parses into its Rust type and serializes back to the same document:
//! the types drop no field a user wrote (the cluster tier checks the same against the API server's schema).

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::path::Path;

use caracal_crds::{bgp, felix, imageset, installation, ipam, ippool, networkset, policy};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Numbers compare by value: `order: 10` and `10.0` are the same order.
fn normalize(v: Value) -> Value {
    match v {
        Value::Number(n) => n.as_f64().map(Value::from).unwrap_or(Value::Number(n)),
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, v)| (k, normalize(v))).collect()),
        other => other,
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Value {
    let typed: T =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{}: {e}", doc["metadata"]["name"]));
    serde_json::to_value(typed).expect("serialize")
}

fn round_trip_kind(doc: &Value) -> Option<Value> {
    Some(match doc["kind"].as_str()? {
        "Installation" => round_trip::<installation::Installation>(doc),
        "ImageSet" => round_trip::<imageset::ImageSet>(doc),
        "IPPool" => round_trip::<ippool::IPPool>(doc),
        "FelixConfiguration" => round_trip::<felix::FelixConfiguration>(doc),
        "GlobalNetworkPolicy" => round_trip::<policy::GlobalNetworkPolicy>(doc),
        "NetworkPolicy" if doc["apiVersion"] == "caracal.dev/v1" => round_trip::<policy::NetworkPolicy>(doc),
        "Tier" => round_trip::<policy::Tier>(doc),
        "GlobalNetworkSet" => round_trip::<networkset::GlobalNetworkSet>(doc),
        "NetworkSet" => round_trip::<networkset::NetworkSet>(doc),
        "BGPConfiguration" => round_trip::<bgp::BGPConfiguration>(doc),
        "BGPPeer" => round_trip::<bgp::BGPPeer>(doc),
        "IPAMConfiguration" => round_trip::<ipam::IPAMConfiguration>(doc),
        _ => return None,
    })
}

#[test]
fn every_example_round_trips_through_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        for de in serde_yaml::Deserializer::from_str(&text) {
            let doc: Value = serde::Deserialize::deserialize(de).expect("YAML");
            let Some(back) = round_trip_kind(&doc) else {
                continue;
            };
            assert_eq!(
                normalize(back["spec"].clone()),
                normalize(doc["spec"].clone()),
                "{}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 12, "only {checked} objects checked");
}

#[test]
fn port_and_protocol_values_keep_their_json_shape() {
    let rule: policy::PolicyRule = serde_json::from_value(serde_json::json!({
        "action": "Allow", "protocol": 6, "destination": {"ports": [80, "8000:8999", "http"]}
    }))
    .unwrap();
    assert_eq!(rule.protocol, Some(caracal_crds::schema::Protocol::Number(6)));
    let back = serde_json::to_value(&rule).unwrap();
    assert_eq!(
        back["destination"]["ports"],
        serde_json::json!([80, "8000:8999", "http"])
    );
    assert_eq!(back["protocol"], serde_json::json!(6));
}
