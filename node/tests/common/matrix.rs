//! The lab's connectivity measured against what `caracalctl policy matrix` computes from the same objects.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use caracal_e2e::lab::{self, Lab};
use caracal_policy::load::load_documents;
use caracal_policy::matrix::{self, ProbePort};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

/// The matrix the policy engine computes from the objects in the API server, restricted to the ports each
/// destination declares (where the lab's pods listen), in the probe's shape; without a pod's cells to itself.
pub async fn expected(client: &kube::Client, pods: &Value) -> Vec<Value> {
    let mut out = matrix_cells(client, pods).await;
    out.retain(|c| c["from"] != c["to"]);
    out
}

/// [`expected`] with each pod's cells to itself (what a Service whose backend is the client itself needs).
pub async fn matrix_cells(client: &kube::Client, pods: &Value) -> Vec<Value> {
    let mut docs = Vec::new();
    let ns: Vec<Namespace> = Api::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("ns")
        .items;
    let po: Vec<Pod> = Api::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("pods")
        .items;
    let np: Vec<NetworkPolicy> = Api::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("np")
        .items;
    for v in ns
        .iter()
        .map(|o| serde_json::to_value(o).expect("json"))
        .chain(po.iter().map(|o| serde_json::to_value(o).expect("json")))
        .chain(np.iter().map(|o| serde_json::to_value(o).expect("json")))
    {
        docs.push(("api".to_owned(), v));
    }
    let world = load_documents(docs).expect("load").world;
    let mut declared = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for p in pods.as_array().into_iter().flatten() {
        for port in p["ports"].as_array().into_iter().flatten() {
            let (n, proto) = (
                port["port"].as_u64().expect("port"),
                port["protocol"].as_str().expect("proto"),
            );
            declared.insert((p["pod"].as_str().expect("pod").to_owned(), n, proto.to_owned()));
            ports.insert(format!("{n}/{proto}"));
        }
    }
    let ports: Vec<ProbePort> = ports.iter().map(|p| p.parse().expect("port")).collect();
    let recorded: BTreeSet<String> = pods
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["pod"].as_str().map(str::to_owned))
        .collect();
    let mut out: Vec<Value> = matrix::cells(&world, &ports, true)
        .into_iter()
        .filter(|c| recorded.contains(&c.from) && recorded.contains(&c.to))
        .filter(|c| declared.contains(&(c.to.clone(), u64::from(c.port), c.protocol.to_owned())))
        .map(|c| json!({"from": c.from, "to": c.to, "port": c.port, "protocol": c.protocol, "allowed": c.allowed}))
        .collect();
    lab::sort_cells(&mut out);
    out
}

/// `field` of the pod `pod` (`namespace/name`) as the lab recorded it.
pub async fn recorded(lab: &Lab, pod: &str, field: &str) -> String {
    lab.record_pods()
        .await
        .expect("record")
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["pod"] == pod)
        .and_then(|p| p[field].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("{pod} has no recorded {field}"))
}

pub async fn agrees(lab: &Lab, what: &str) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let pods = lab.record_pods().await.expect("record");
        let measured = lab::probe(&pods, Duration::from_millis(800));
        let want = expected(&lab.client, &pods).await;
        if measured == want {
            return measured;
        }
        let diff: Vec<String> = measured
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("measured {a} / expected {b}"))
            .collect();
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: probe and policy matrix disagree ({} vs {} cells): {diff:?}",
            measured.len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An established TCP connection from one recorded pod to an echo server the test runs in another (port
/// 7070, not a declared port, so the matrix never probes it; unlike the lab's echo servers it never closes an
/// idle connection, and this one stays open across minutes of switches).
pub struct Echo(std::net::TcpStream);

impl Echo {
    pub async fn open(lab: &Lab, from: &str, to: &str) -> Echo {
        use std::io::{Read as _, Write as _};
        let client_ns = caracal_e2e::netns::NetNs::existing(&recorded(lab, from, "netns").await);
        let server_ns = caracal_e2e::netns::NetNs::existing(&recorded(lab, to, "netns").await);
        let ip: std::net::Ipv4Addr = recorded(lab, to, "ip").await.parse().expect("ip");
        let listener = server_ns
            .enter(move || std::net::TcpListener::bind((ip, 7070)))
            .expect("enter")
            .expect("bind the test's echo server");
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        });
        let s = client_ns
            .enter(move || std::net::TcpStream::connect_timeout(&(ip, 7070).into(), Duration::from_secs(3)))
            .expect("enter")
            .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
        let mut e = Echo(s);
        e.check("when opened");
        e
    }

    /// One message through (a retransmission may meet a restart: allow it time to land).
    pub fn check(&mut self, when: &str) {
        use std::io::{Read as _, Write as _};
        self.0
            .set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let msg = when.as_bytes();
        let mut buf = vec![0u8; msg.len()];
        self.0
            .write_all(msg)
            .and_then(|()| self.0.read_exact(&mut buf))
            .unwrap_or_else(|e| panic!("{when}: the established connection broke: {e}"));
        assert_eq!(buf, msg, "{when}");
    }
}
