//! What the admission webhook checks that the CRD schema cannot: selector syntax (with the selector parser
//! from `caracal-crds`), IPPools overlapping other pools, and policies naming tiers that do not exist.
//! Pure functions over the object's JSON; the webhook supplies the cluster facts.

use caracal_crds::selector;
use ipnet::IpNet;
use serde_json::Value;

/// The tier every policy without `spec.tier` belongs to; it always exists.
pub const DEFAULT_TIER: &str = "default";

/// Every selector string in an object of `kind`, with its field path and whether `global()` is allowed.
pub fn selectors(kind: &str, obj: &Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    let mut add = |path: String, v: &Value, global: bool| {
        if let Some(s) = v.as_str() {
            out.push((path, s.to_owned(), global));
        }
    };
    let spec = &obj["spec"];
    match kind {
        "GlobalNetworkPolicy" | "NetworkPolicy" => {
            add("spec.selector".into(), &spec["selector"], false);
            add(
                "spec.serviceAccountSelector".into(),
                &spec["serviceAccountSelector"],
                false,
            );
            add("spec.namespaceSelector".into(), &spec["namespaceSelector"], true);
            for dir in ["ingress", "egress"] {
                for (i, rule) in spec[dir].as_array().into_iter().flatten().enumerate() {
                    for side in ["source", "destination"] {
                        let e = &rule[side];
                        let p = format!("spec.{dir}[{i}].{side}");
                        add(format!("{p}.selector"), &e["selector"], false);
                        add(format!("{p}.notSelector"), &e["notSelector"], false);
                        add(format!("{p}.namespaceSelector"), &e["namespaceSelector"], true);
                        add(
                            format!("{p}.serviceAccounts.selector"),
                            &e["serviceAccounts"]["selector"],
                            false,
                        );
                    }
                }
            }
        }
        "IPPool" => add("spec.nodeSelector".into(), &spec["nodeSelector"], false),
        "BGPPeer" => {
            add("spec.nodeSelector".into(), &spec["nodeSelector"], false);
            add("spec.peerSelector".into(), &spec["peerSelector"], false);
        }
        "Installation" => {
            for (i, pool) in spec["calicoNetwork"]["ipPools"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                add(
                    format!("spec.calicoNetwork.ipPools[{i}].nodeSelector"),
                    &pool["nodeSelector"],
                    false,
                );
            }
        }
        _ => {}
    }
    out
}

/// Problems with the selectors of an object, each naming the field and the character, with a caret line.
pub fn check_selectors(kind: &str, obj: &Value) -> Vec<String> {
    selectors(kind, obj)
        .into_iter()
        .filter_map(|(path, text, global)| {
            let err = match selector::parse(&text) {
                Err(e) => e,
                Ok(e) if !global && e.uses_global() => selector::ParseError {
                    selector: text.clone(),
                    position: text.find("global").unwrap_or(0),
                    expected: "a selector without global() (it is allowed only in a namespaceSelector)"
                        .into(),
                    found: "global()".into(),
                },
                Ok(_) => return None,
            };
            Some(format!(
                "{path}: at character {}: expected {}, found {}\n  {}\n  {}^",
                err.position + 1,
                err.expected,
                err.found,
                text,
                " ".repeat(err.position)
            ))
        })
        .collect()
}

/// The tier a policy names, when it is not the default tier.
pub fn tier_of(obj: &Value) -> Option<&str> {
    obj["spec"]["tier"].as_str().filter(|t| *t != DEFAULT_TIER)
}

/// Pools (name, cidr) among `others` that overlap `cidr`.
pub fn overlapping(cidr: IpNet, others: &[(String, IpNet)]) -> Vec<&(String, IpNet)> {
    others
        .iter()
        .filter(|(_, o)| o.contains(&cidr.network()) || cidr.contains(&o.network()))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_bad_rule_selector_is_reported_at_its_field_and_character() {
        let gnp = json!({"spec": {"selector": "all()", "ingress": [{"action": "Allow"}, {"action": "Allow", "source": {"selector": "app == web"}}]}});
        let errs = check_selectors("GlobalNetworkPolicy", &gnp);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0]
                .starts_with("spec.ingress[1].source.selector: at character 8: expected a value in quotes"),
            "{}",
            errs[0]
        );
        assert!(errs[0].ends_with("  app == web\n         ^"), "{:?}", errs[0]);
    }

    #[test]
    fn global_is_refused_outside_namespace_selectors() {
        let np = json!({"spec": {"selector": "global()", "ingress": [{"action": "Allow", "source": {"namespaceSelector": "global()"}}]}});
        let errs = check_selectors("NetworkPolicy", &np);
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("spec.selector:"));
    }

    #[test]
    fn pool_and_peer_and_installation_selectors_are_checked() {
        assert_eq!(
            check_selectors("IPPool", &json!({"spec": {"nodeSelector": "zone in {'a'"}})).len(),
            1
        );
        assert_eq!(
            check_selectors("BGPPeer", &json!({"spec": {"peerSelector": "has(rr"}})).len(),
            1
        );
        let inst = json!({"spec": {"calicoNetwork": {"ipPools": [{"nodeSelector": "all()"}, {"nodeSelector": "a ="}]}}});
        let errs = check_selectors("Installation", &inst);
        assert!(errs.len() == 1 && errs[0].starts_with("spec.calicoNetwork.ipPools[1].nodeSelector"));
    }

    #[test]
    fn overlap_and_tiers() {
        let others = vec![
            ("a".to_owned(), "10.0.0.0/16".parse().unwrap()),
            ("b".to_owned(), "10.2.0.0/16".parse().unwrap()),
        ];
        assert_eq!(overlapping("10.0.128.0/24".parse().unwrap(), &others).len(), 1);
        assert_eq!(overlapping("10.0.0.0/8".parse().unwrap(), &others).len(), 2);
        assert!(overlapping("10.1.0.0/16".parse().unwrap(), &others).is_empty());
        assert_eq!(tier_of(&json!({"spec": {"tier": "security"}})), Some("security"));
        assert_eq!(tier_of(&json!({"spec": {"tier": "default"}})), None);
        assert_eq!(tier_of(&json!({"spec": {}})), None);
    }
}
