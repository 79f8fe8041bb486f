//! The `caracal-node` binary as a process: programs the data plane of its node from the real API server,
//! reports ready only then, serves metrics, and exits cleanly on SIGTERM leaving the rules in place.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caracal_e2e::netns;
use caracal_e2e::probe::http_get;
use caracal_node::cni::host_iface;
use serde_json::json;

/// Kills a spawned binary when the test ends, also when it panics.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test]
async fn the_node_binary_programs_its_node_reports_ready_and_stops_cleanly() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let (cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let node = netns::node("nbin").expect("node namespace");
    let _pod = netns::wire_pod(
        &node,
        "nbpod",
        &host_iface("app", "web"),
        "10.61.0.1".parse().expect("ip"),
    )
    .expect("pod");
    caracal_e2e::objects::namespace(&client, "app", json!({}))
        .await
        .expect("namespace");
    caracal_e2e::objects::pod(&client, "app", "web", json!({}), "bin-node", "10.61.0.1")
        .await
        .expect("pod");

    let (health, metrics) = (free_port(), free_port());
    let log = cp.dir().join("caracal-node.log");
    let child = Command::new(env!("CARGO_BIN_EXE_caracal-node"))
        .env("KUBECONFIG", cp.kubeconfig())
        .env("CARACAL_NODE_NAME", "bin-node")
        .env("CARACAL_NETNS", node.name())
        .env("CARACAL_CNI_SOCKET", cp.dir().join("bin-node.sock"))
        .env("CARACAL_STATE_DIR", cp.dir().join("bin-node-state"))
        .env("CARACAL_HEALTH_PORT", health.to_string())
        .env("CARACAL_METRICS_PORT", metrics.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start caracal-node");
    let mut child = Reap(child);
    let start = Instant::now();
    while http_get(health, "/readyz").map(|r| r.0) != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never ready; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            child.0.try_wait().expect("wait").is_none(),
            "exited; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(http_get(health, "/healthz").map(|r| r.0), Some(200));
    let (code, text) = http_get(metrics, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        text.contains("caracal_node_ready 1") && text.contains("caracal_node_dataplane_programs_total"),
        "{text}"
    );
    let save = node.exec(&["iptables-save", "-t", "filter"]).expect("save");
    assert!(
        save.contains(&format!(
            "-o {} -g crc-tw-{}",
            host_iface("app", "web"),
            host_iface("app", "web")
        )),
        "the pod's interface is dispatched:\n{save}"
    );

    Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        node.exec(&["iptables-save", "-t", "filter"])
            .expect("save")
            .contains("crc-FORWARD"),
        "rules stay after the agent stops"
    );
    caracal_node::dataplane::backend("Iptables", node.exec_prefix(), true)
        .expect("backend")
        .remove_all()
        .expect("cleanup");
}

fn pki(dir: &std::path::Path) -> [std::path::PathBuf; 5] {
    caracal_e2e::pki::TyphaPki::generate()
        .expect("pki")
        .write(dir)
        .expect("write pki")
}

#[tokio::test]
async fn the_node_binary_through_the_typha_binary_programs_its_node() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let (cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let node = netns::node("ntyp").expect("node namespace");
    let _pod = netns::wire_pod(
        &node,
        "ntpod",
        &host_iface("app", "web"),
        "10.62.0.1".parse().expect("ip"),
    )
    .expect("pod");
    caracal_e2e::objects::namespace(&client, "app", json!({}))
        .await
        .expect("namespace");
    caracal_e2e::objects::pod(&client, "app", "web", json!({}), "typha-node", "10.62.0.1")
        .await
        .expect("pod");
    // Typha's PKI in its own directory: the control plane's ca.crt next door is the API server's client CA.
    let typha_pki = cp.dir().join("typha-pki");
    std::fs::create_dir_all(&typha_pki).expect("mkdir");
    let [ca, tcrt, tkey, ncrt, nkey] = pki(&typha_pki);
    let (typha_port, typha_health, typha_metrics, health, metrics) =
        (free_port(), free_port(), free_port(), free_port(), free_port());
    let tlog = cp.dir().join("typha.log");
    let typha = Command::new(caracal_e2e::controlplane::workspace_bin("caracal-typha"))
        .env("KUBECONFIG", cp.kubeconfig())
        .env("CARACAL_TYPHA_LISTEN_HOST", "127.0.0.1")
        .env("CARACAL_TYPHA_PORT", typha_port.to_string())
        .env("CARACAL_TYPHA_HEALTH_PORT", typha_health.to_string())
        .env("CARACAL_TYPHA_METRICS_PORT", typha_metrics.to_string())
        .env("CARACAL_TYPHA_CA_FILE", &ca)
        .env("CARACAL_TYPHA_CERT_FILE", &tcrt)
        .env("CARACAL_TYPHA_KEY_FILE", &tkey)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&tlog).expect("log"))
        .spawn()
        .expect("start caracal-typha");
    let mut typha = Reap(typha);
    let nlog = cp.dir().join("node.log");
    let agent = Command::new(env!("CARGO_BIN_EXE_caracal-node"))
        .env("KUBECONFIG", cp.kubeconfig())
        .env("CARACAL_NODE_NAME", "typha-node")
        .env("CARACAL_NETNS", node.name())
        .env("CARACAL_CNI_SOCKET", cp.dir().join("typha-node.sock"))
        .env("CARACAL_STATE_DIR", cp.dir().join("typha-node-state"))
        .env("CARACAL_HEALTH_PORT", health.to_string())
        .env("CARACAL_METRICS_PORT", metrics.to_string())
        .env("CARACAL_TYPHA_ADDRS", format!("127.0.0.1:{typha_port}"))
        .env("CARACAL_TYPHA_CA_FILE", &ca)
        .env("CARACAL_TYPHA_CERT_FILE", &ncrt)
        .env("CARACAL_TYPHA_KEY_FILE", &nkey)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&nlog).expect("log"))
        .spawn()
        .expect("start caracal-node");
    let mut agent = Reap(agent);
    let start = Instant::now();
    while http_get(health, "/readyz").map(|r| r.0) != Some(200) {
        let logs = || {
            format!(
                "typha:\n{}\nnode:\n{}",
                std::fs::read_to_string(&tlog).unwrap_or_default(),
                std::fs::read_to_string(&nlog).unwrap_or_default()
            )
        };
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the agent never got ready through Typha; {}",
            logs()
        );
        assert!(
            typha.0.try_wait().expect("wait").is_none() && agent.0.try_wait().expect("wait").is_none(),
            "a process exited; {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        http_get(typha_health, "/readyz").map(|r| r.0),
        Some(200),
        "Typha is ready once its watches are in sync"
    );
    let (_, text) = http_get(typha_metrics, "/metrics").expect("typha metrics");
    assert!(text.contains("caracal_typha_connections 1"), "{text}");
    let save = node.exec(&["iptables-save", "-t", "filter"]).expect("save");
    assert!(
        save.contains(&format!("-o {} -g crc-tw-", host_iface("app", "web"))),
        "programmed through Typha:\n{save}"
    );
    for p in [&mut agent, &mut typha] {
        Command::new("kill")
            .args(["-TERM", &p.0.id().to_string()])
            .status()
            .expect("kill");
    }
    for p in [&mut agent, &mut typha] {
        let start = Instant::now();
        while p.0.try_wait().expect("wait").is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    caracal_node::dataplane::backend("Iptables", node.exec_prefix(), true)
        .expect("backend")
        .remove_all()
        .expect("cleanup");
}
