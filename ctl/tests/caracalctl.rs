//! `caracalctl policy` as a person runs it.

use std::process::Command;

use caracal_policy::contract::WORLD;

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
