//! The `caracal-operator` binary as a process against the real API server: its HTTP endpoints, JSON logs,
//! reconciling, and a clean exit (lease released) on SIGTERM.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caracal_crds::installation::Installation;
use caracal_e2e::controlplane::{ControlPlane, Options};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port()
}

/// (status code, body) of `GET path` on 127.0.0.1:port, or None when nothing answers yet.
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        buf.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}

#[tokio::test]
async fn the_operator_binary_serves_health_and_metrics_reconciles_and_exits_cleanly_on_sigterm() {
    let cp = ControlPlane::start(Options::api_only())
        .await
        .expect("control plane");
    let client = cp.client().await.expect("client");
    let (http_port, hook_port) = (free_port(), free_port());
    let log = cp.dir().join("operator.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_caracal-operator"))
        .env("KUBECONFIG", cp.kubeconfig())
        .env("POD_NAMESPACE", "default")
        .env("POD_NAME", "binary-test")
        .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
        .args(["--webhook-addr", &format!("127.0.0.1:{hook_port}")])
        .args([
            "--webhook-url",
            &format!("https://127.0.0.1:{hook_port}/validate"),
        ])
        .args(["--log-format", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start caracal-operator");

    let start = Instant::now();
    while get(http_port, "/readyz").await.map(|r| r.0) != Some(200) {
        assert!(
            start.elapsed() < DEADLINE,
            "never ready; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "exited; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(http_port, "/healthz").await.map(|r| r.0), Some(200));

    let inst: Api<Installation> = Api::all(client.clone());
    let body = json!({"apiVersion": "operator.caracal.dev/v1", "kind": "Installation", "metadata": {"name": "default"}, "spec": {}});
    inst.patch("default", &PatchParams::apply("test"), &Patch::Apply(&body))
        .await
        .expect("installation (the CRDs are the binary's)");
    let start = Instant::now();
    loop {
        let progressing = inst
            .get("default")
            .await
            .ok()
            .and_then(|i| i.status)
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Progressing"));
        if progressing {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no status; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, metrics) = get(http_port, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    for name in [
        "caracal_operator_reconciles_total",
        "caracal_operator_reconcile_duration_seconds_bucket",
        "caracal_operator_objects_applied_total{kind=\"DaemonSet\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics:\n{metrics}");
    }

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < DEADLINE, "did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client, "default");
    let holder = leases
        .get("caracal-operator")
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder, None, "the lease is released on shutdown");
    let text = std::fs::read_to_string(&log).expect("log");
    let first = text.lines().next().expect("a log line");
    let line: serde_json::Value = serde_json::from_str(first).expect("JSON logs");
    assert!(
        line.get("level").is_some() && line.get("fields").is_some(),
        "{first}"
    );
}
