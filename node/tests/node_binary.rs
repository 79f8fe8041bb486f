//! The `caracal-node` binary as a process: programs the data plane of its node from the real API server,
//! reports ready only then, serves metrics, and exits cleanly on SIGTERM leaving the rules in place.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caracal_e2e::controlplane::{ControlPlane, Options};
use caracal_e2e::netns;
use caracal_e2e::probe::http_get;
use caracal_node::cni::host_iface;
use serde_json::json;

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
    let cp = ControlPlane::start(Options::api_only())
        .await
        .expect("control plane");
    let client = cp.client().await.expect("client");
    caracal_e2e::crds::install(&client, Duration::from_secs(60))
        .await
        .expect("CRDs");
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_caracal-node"))
        .env("KUBECONFIG", cp.kubeconfig())
        .env("CARACAL_NODE_NAME", "bin-node")
        .env("CARACAL_NETNS", node.name())
        .env("CARACAL_HEALTH_PORT", health.to_string())
        .env("CARACAL_METRICS_PORT", metrics.to_string())
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start caracal-node");
    let start = Instant::now();
    while http_get(health, "/readyz").map(|r| r.0) != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never ready; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
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
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
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
    caracal_node::dataplane::backend("Iptables", node.exec_prefix())
        .expect("backend")
        .remove_all()
        .expect("cleanup");
}
