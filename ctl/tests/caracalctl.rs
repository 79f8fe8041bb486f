//! `caracalctl policy` as a person runs it.

use std::process::Command;

use caracal_policy::contract::{WORLD, scenarios};

#[test]
fn matrix_reads_a_directory_prints_the_json_contract_and_warns_about_other_kinds() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("world.yaml"), WORLD).expect("write");
    std::fs::create_dir(dir.path().join("policies")).expect("mkdir");
    std::fs::write(
        dir.path().join("policies/deny.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: unrelated}\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_caracalctl"))
        .args(["policy", "matrix", "-f"])
        .arg(dir.path())
        .args(["--port", "80/TCP", "--port", "53/UDP", "--output", "json"])
        .output()
        .expect("run caracalctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning:") && stderr.contains("ignoring v1 ConfigMap unrelated"),
        "{stderr}"
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let results = json["results"].as_array().expect("results");
    assert_eq!(results.len(), 7 * 6 * 2);
    let cell = results
        .iter()
        .find(|c| c["from"] == "y/a" && c["to"] == "x/a" && c["port"] == 80)
        .expect("cell");
    assert_eq!(
        cell,
        &serde_json::json!({"from": "y/a", "to": "x/a", "port": 80, "protocol": "TCP", "allowed": false})
    );
    let cell = results
        .iter()
        .find(|c| c["from"] == "x/a" && c["to"] == "y/a" && c["protocol"] == "UDP")
        .expect("cell");
    assert_eq!(cell["allowed"], true);
}

#[test]
fn explain_names_a_missing_pod_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("world.yaml"), WORLD).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_caracalctl"))
        .args([
            "policy", "explain", "--from", "x/a", "--to", "q/zz", "--port", "80/TCP", "-f",
        ])
        .arg(dir.path())
        .output()
        .expect("run caracalctl");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pod q/zz"));
    let bad_port = Command::new(env!("CARGO_BIN_EXE_caracalctl"))
        .args(["policy", "matrix", "--port", "80/ICMP", "-f"])
        .arg(dir.path())
        .output()
        .expect("run caracalctl");
    assert!(String::from_utf8_lossy(&bad_port.stderr).contains("protocol \"ICMP\" is not TCP, UDP or SCTP"));
}

/// The contract's `services` scenarios through `caracalctl policy matrix` (EndpointSlices read from YAML
/// by the same decode as the agent's): every TCP/UDP check of the table is the matrix's answer. The kernel
/// test (`node/tests/iptables_kernel.rs`) holds real packets to the same table, so the matrix and the data
/// plane agree on these rules.
#[test]
fn matrix_of_services_scenarios_meets_the_contract_table() {
    let services: Vec<_> = scenarios()
        .into_iter()
        .filter(|s| s.manifests.contains("kind: EndpointSlice"))
        .collect();
    assert!(services.len() >= 4, "the table's services scenarios");
    for s in services {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("world.yaml"), WORLD).expect("write");
        std::fs::write(dir.path().join("scenario.yaml"), s.manifests).expect("write");
        let checks: Vec<_> = s.checks.iter().filter(|c| !c.2.ends_with("/ICMP")).collect();
        let mut ports: Vec<&str> = checks.iter().map(|c| c.2).collect();
        ports.sort_unstable();
        ports.dedup();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_caracalctl"));
        cmd.args(["policy", "matrix", "--output", "json", "-f"])
            .arg(dir.path());
        for p in &ports {
            cmd.args(["--port", p]);
        }
        let out = cmd.output().expect("run caracalctl");
        assert!(
            out.status.success(),
            "{}: {}",
            s.name,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("warning:"),
            "{}: every object is read: {}",
            s.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
        let results = json["results"].as_array().expect("results");
        for (from, to, port, allowed) in checks {
            let (p, proto) = port.split_once('/').expect("PORT/PROTO");
            let p: u16 = p.parse().expect("port");
            let cell = results
                .iter()
                .find(|c| c["from"] == *from && c["to"] == *to && c["port"] == p && c["protocol"] == proto)
                .unwrap_or_else(|| panic!("{}: no cell {from} -> {to} {port}", s.name));
            assert_eq!(cell["allowed"], *allowed, "{}: {from} -> {to} {port}", s.name);
        }
    }
}

#[test]
fn explain_names_the_services_rule_that_decided() {
    let s = scenarios()
        .into_iter()
        .find(|s| s.name.starts_with("caracal services as an egress destination"))
        .expect("scenario");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("world.yaml"), WORLD).expect("write");
    std::fs::write(dir.path().join("scenario.yaml"), s.manifests).expect("write");
    let explain = |to: &str, port: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_caracalctl"))
            .args([
                "policy", "explain", "--from", "x/c", "--to", to, "--port", port, "-f",
            ])
            .arg(dir.path())
            .output()
            .expect("run caracalctl");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let serving = explain("x/a", "8080/TCP");
    assert!(
        serving.contains("tier default: policy x/to-web: rule 0 matched: Allow")
            && serving.ends_with("verdict: ALLOWED\n"),
        "{serving}"
    );
    let not_serving = explain("x/b", "8080/TCP");
    assert!(
        not_serving.contains("tier default: policy x/to-web: no rule matched")
            && not_serving.ends_with("verdict: DENIED\n"),
        "{not_serving}"
    );
}
