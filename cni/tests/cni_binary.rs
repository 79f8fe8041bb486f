//! `caracal-cni` as a container runtime and the DaemonSet's init container run it.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::io::Write as _;
use std::process::{Command, Stdio};

fn plugin(env: &[(&str, &str)], stdin: &str) -> (i32, serde_json::Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_caracal-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run caracal-cni");
    // A plugin may answer (an environment error) without reading stdin: a closed pipe is fine.
    let _ = child.stdin.take().expect("stdin").write_all(stdin.as_bytes());
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout).expect("JSON on stdout"),
    )
}

#[test]
fn version_errors_and_an_absent_agent_follow_the_spec() {
    let (code, v) = plugin(&[("CNI_COMMAND", "VERSION")], "");
    assert_eq!(code, 0);
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );

    let add = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
    ];
    let (code, v) = plugin(
        &add,
        r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"caracal","mtu":42}"#,
    );
    assert_eq!((code, v["code"].as_u64()), (1, Some(7)), "{v}");
    assert!(
        v["details"]
            .as_str()
            .expect("details")
            .contains("mtu 42 is out of range"),
        "{v}"
    );

    let (_, v) = plugin(&add[..3], r#"{"cniVersion":"1.0.0","name":"n","type":"caracal"}"#);
    assert_eq!(v["code"], 4, "missing CNI_IFNAME: {v}");

    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nobody.sock");
    let conf = format!(
        r#"{{"cniVersion":"0.4.0","name":"n","type":"caracal","agent_socket":"{}"}}"#,
        sock.display()
    );
    let (code, v) = plugin(&add, &conf);
    assert_eq!(
        (code, v["code"].as_u64(), v["cniVersion"].as_str()),
        (1, Some(11), Some("0.4.0")),
        "{v}"
    );
    assert!(
        v["details"]
            .as_str()
            .expect("details")
            .contains("cannot reach caracal-node"),
        "{v}"
    );
}

#[test]
fn install_puts_the_plugin_and_the_conflist_on_the_host_atomically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("10-caracal.conflist");
    std::fs::write(
        &source,
        r#"{"name":"k8s-pod-network","cniVersion":"1.1.0","plugins":[{"type":"caracal"}]}"#,
    )
    .expect("write");
    let (bin, net) = (dir.path().join("opt/cni/bin"), dir.path().join("etc/cni/net.d"));
    let run = |src: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_caracal-cni"))
            .arg("install")
            .env("CNI_BIN_DIR", &bin)
            .env("CNI_NET_DIR", &net)
            .env("CNI_CONF_SOURCE", src)
            .env("CNI_CONF_NAME", "10-caracal.conflist")
            .output()
            .expect("run install")
    };
    assert!(run(&source).status.success());
    let installed = bin.join("caracal");
    let out = Command::new(&installed)
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .output()
        .expect("run the installed plugin");
    assert!(String::from_utf8_lossy(&out.stdout).contains("supportedVersions"));
    assert_eq!(
        std::fs::read(net.join("10-caracal.conflist")).expect("conflist"),
        std::fs::read(&source).expect("source")
    );
    assert!(std::fs::read_dir(&net).expect("dir").all(|e| {
        !e.expect("entry")
            .file_name()
            .to_string_lossy()
            .contains("caracal-tmp")
    }));
    let bad = dir.path().join("bad.conflist");
    std::fs::write(&bad, r#"{"name":"x","plugins":[]}"#).expect("write");
    let out = run(&bad);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("non-empty \"plugins\" list")
    );
}
