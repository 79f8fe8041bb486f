//! The lab: Caracal end to end on this machine, with nothing faked but the container runtime.
//!
//! `up` starts the real control plane (with the controller manager and scheduler), installs the CRDs,
//! applies `manifests/operator` (all but its Deployment) and runs `caracal-operator` as a process with its
//! ServiceAccount's token, registers N nodes (network namespaces on an underlay bridge, each with a lab
//! kubelet and a heartbeat), and applies an Installation. The kubelets then run what the operator rendered:
//! the caracal-node DaemonSet and the Typha Deployment as processes, the CNI install step into each node's
//! directories, and workload pods through the CNI plugin that step installed.
//!
//! Everything lives under `target/lab`; the pods' namespaces are recorded in `target/lab/pods.json` for
//! `caracal-lab probe`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::controlplane::{ControlPlane, Options, workspace_root};
use crate::kubelet::host::HostConfig;
use crate::kubelet::{self, HostPods, KubeletConfig, Pods};
use crate::netns::{NetNs, Underlay};
use crate::process::{Lifetime, Supervised};

/// How to run the lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Number of nodes.
    pub nodes: usize,
    /// The Installation to apply.
    pub installation: PathBuf,
}

/// A running lab (dropping it tears everything down).
pub struct Lab {
    /// The control plane.
    pub cp: ControlPlane,
    /// An admin client.
    pub client: Client,
    /// The underlay.
    pub underlay: Underlay,
    /// Node namespaces, by Node name.
    pub nodes: Vec<(String, NetNs, Ipv4Addr)>,
    /// Workload pods each kubelet runs.
    pub pods: Vec<Pods>,
    /// Host-network pods each kubelet runs.
    pub host_pods: Vec<HostPods>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    operator: Option<Supervised>,
    dir: PathBuf,
}

/// The lab's directory.
pub fn lab_dir() -> PathBuf {
    workspace_root().join("target/lab")
}

fn step(what: &str) {
    println!("==> {what}");
}

/// Makes the API server (on the machine's loopback) reachable at the same address inside the node namespace
/// `ns`: a listener on the namespace's 127.0.0.1:`port` whose connections are carried to the machine's. TLS is
/// end to end (bytes are copied), so the certificate and the kubeconfigs stay as they are.
fn api_forwarder(ns: &NetNs, port: u16) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = ns
        .enter(move || std::net::TcpListener::bind(("127.0.0.1", port)))
        .map_err(|e| anyhow::anyhow!("entering {}: {e}", ns.name()))??;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    Ok(tokio::spawn(async move {
        while let Ok((mut inside, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut host) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inside, &mut host).await;
                }
            });
        }
    }))
}

fn kubectl_apply(cp: &ControlPlane, file: &Path) -> anyhow::Result<()> {
    let out = cp.kubectl().args(["apply", "-f"]).arg(file).output()?;
    if !out.status.success() {
        bail!(
            "kubectl apply -f {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

async fn until<F, Fut>(what: &str, deadline: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match f().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => {
                if e != last {
                    println!("    {what}: {e}");
                    last = e;
                }
            }
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Lab {
    /// Brings the lab up (see the module docs), printing each step.
    pub async fn up(opts: &LabOptions) -> anyhow::Result<Self> {
        let dir = lab_dir();
        crate::netns::unmount_bpffs_under(&dir.join("nodes"));
        let _ = std::fs::remove_dir_all(dir.join("nodes"));
        let _ = std::fs::remove_dir_all(dir.join("pods"));
        std::fs::create_dir_all(&dir)?;
        step("control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)");
        let cp = ControlPlane::start(Options::with_controllers()).await?;
        let client = cp.client().await?;
        std::fs::copy(cp.kubeconfig(), dir.join("kubeconfig"))?;
        step("CRDs");
        crate::crds::install(&client, Duration::from_secs(60)).await?;

        step("operator: manifests/operator (its Deployment runs as a lab process instead)");
        let mut docs = Vec::new();
        let manifest_dir = workspace_root().join("manifests/operator");
        for entry in std::fs::read_dir(&manifest_dir)? {
            let text = std::fs::read_to_string(entry?.path())?;
            for d in serde_yaml::Deserializer::from_str(&text) {
                let v: Value = serde::Deserialize::deserialize(d)?;
                if !v.is_null() && v["kind"] != "Deployment" {
                    docs.push(serde_yaml::to_string(&v)?);
                }
            }
        }
        let manifest = dir.join("operator-manifest.yaml");
        std::fs::write(&manifest, docs.join("---\n"))?;
        kubectl_apply(&cp, &manifest)?;
        let op_kc = dir.join("operator.kubeconfig");
        crate::controlplane::service_account_kubeconfig(
            &client,
            cp.kubeconfig(),
            "caracal-operator",
            "caracal-operator",
            &op_kc,
        )
        .await
        .map_err(anyhow::Error::msg)?;
        let bin = workspace_root().join("target/debug");
        let hook = crate::controlplane::free_port()?;
        let operator = Supervised::spawn_env(
            "caracal-operator",
            &bin.join("caracal-operator"),
            &[
                "--webhook-addr".into(),
                format!("127.0.0.1:{hook}"),
                "--webhook-url".into(),
                format!("https://127.0.0.1:{hook}/validate"),
                "--http-addr".into(),
                format!("127.0.0.1:{}", crate::controlplane::free_port()?),
            ],
            &[
                ("KUBECONFIG".into(), op_kc.display().to_string()),
                ("POD_NAME".into(), "lab-operator".into()),
            ],
            &dir.join("operator.log"),
            Lifetime::Attached,
        )?;

        step(&format!(
            "{} nodes: namespaces on an underlay bridge, each with a lab kubelet",
            opts.nodes
        ));
        let net: ipnet::Ipv4Net = "10.99.0.0/24".parse()?;
        let underlay = Underlay::new(net)?;
        let api_port: u16 = cp
            .server()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("the API server's port")?;
        let typha = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let mut nodes = Vec::new();
        let mut tasks = Vec::new();
        let mut pods = Vec::new();
        let mut host_pods = Vec::new();
        for i in 0..opts.nodes {
            let name = format!("lab-node-{i}");
            let ns = crate::netns::node(&format!("lab{i}"))?;
            let ip = Ipv4Addr::from(u32::from(net.network()) + 2 + u32::try_from(i)?);
            underlay.attach(&ns, "eth0", ip)?;
            tasks.push(api_forwarder(&ns, api_port)?);
            crate::objects::node(&client, &name, &ip.to_string()).await?;
            tasks.push(tokio::spawn(kubelet::heartbeat(client.clone(), name.clone())));
            let cfg = KubeletConfig {
                node: name.clone(),
                node_ns: ns.name().to_owned(),
                host_ip: ip,
                plugin: PathBuf::new(),
                conf: Value::Null,
                host: Some(HostConfig {
                    lab_dir: dir.clone(),
                    bin_dir: bin.clone(),
                    extra_env: Vec::new(),
                    admin_kubeconfig: cp.kubeconfig().to_path_buf(),
                    typha: typha.clone(),
                    node_ns: Some(ns.name().to_owned()),
                }),
            };
            let (p, h) = (Pods::default(), HostPods::default());
            tasks.push(tokio::spawn(cfg.run(client.clone(), p.clone(), h.clone())));
            pods.push(p);
            host_pods.push(h);
            nodes.push((name, ns, ip));
        }

        step(&format!("Installation from {}", opts.installation.display()));
        kubectl_apply(&cp, &opts.installation)?;
        let lab = Lab {
            cp,
            client,
            underlay,
            nodes,
            pods,
            host_pods,
            tasks,
            operator: Some(operator),
            dir,
        };
        step("waiting for caracal-node on every node");
        let ds: Api<DaemonSet> = Api::namespaced(lab.client.clone(), "caracal-system");
        let want = i32::try_from(opts.nodes)?;
        until(
            "caracal-node ready on every node",
            Duration::from_secs(300),
            || {
                let ds = ds.clone();
                async move {
                    match ds.get_opt("caracal-node").await {
                        Ok(Some(d)) => {
                            let ready = d.status.map(|s| s.number_ready).unwrap_or(0);
                            if ready >= want {
                                Ok(true)
                            } else {
                                Err(format!("{ready}/{want} ready"))
                            }
                        }
                        Ok(None) => Err("the operator has not rendered the DaemonSet yet".into()),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        )
        .await?;
        Ok(lab)
    }

    /// The operator process's id.
    pub fn operator_pid(&self) -> Option<u32> {
        self.operator.as_ref().and_then(Supervised::pid)
    }

    /// Applies `file` with kubectl.
    pub fn apply(&self, file: &Path) -> anyhow::Result<()> {
        kubectl_apply(&self.cp, file)
    }

    /// Waits until every pod in `namespaces` is running with an address.
    pub async fn wait_pods(&self, namespaces: &[&str]) -> anyhow::Result<()> {
        for ns in namespaces {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            until(&format!("pods in {ns}"), Duration::from_secs(120), || {
                let api = api.clone();
                async move {
                    let list = api
                        .list(&ListParams::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    let pending: Vec<String> = list
                        .items
                        .iter()
                        .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_none())
                        .map(ResourceExt::name_any)
                        .collect();
                    if pending.is_empty() {
                        Ok(true)
                    } else {
                        Err(format!("waiting for {pending:?}"))
                    }
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Records every workload pod (namespace, address, declared ports) in `target/lab/pods.json`.
    pub async fn record_pods(&self) -> anyhow::Result<Value> {
        let mut out = Vec::new();
        for running in &self.pods {
            let snapshot: Vec<(String, String, Ipv4Addr)> = running
                .lock()
                .map(|m| {
                    m.iter()
                        .map(|(k, p)| (k.clone(), p.ns.name().to_owned(), p.ip))
                        .collect()
                })
                .unwrap_or_default();
            for (key, netns, ip) in snapshot {
                let (ns, name) = key.split_once('/').unwrap_or(("", &key));
                let pod = Api::<Pod>::namespaced(self.client.clone(), ns).get(name).await?;
                let ports: Vec<Value> = pod
                    .spec
                    .iter()
                    .flat_map(|s| &s.containers)
                    .flat_map(|c| c.ports.iter().flatten())
                    .map(|p| json!({"port": p.container_port, "protocol": p.protocol.clone().unwrap_or_else(|| "TCP".into())}))
                    .collect();
                out.push(json!({"pod": key, "netns": netns, "ip": ip.to_string(), "ports": ports}));
            }
        }
        let v = Value::Array(out);
        std::fs::write(self.dir.join("pods.json"), serde_json::to_string_pretty(&v)?)?;
        Ok(v)
    }

    /// Tears everything down: kubelets and their processes, pods' and nodes' namespaces, the operator and
    /// the control plane.
    pub fn down(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for h in &self.host_pods {
            if let Ok(mut m) = h.lock() {
                m.clear();
            }
        }
        for p in &self.pods {
            if let Ok(mut m) = p.lock() {
                m.clear();
            }
        }
        if let Some(mut op) = self.operator.take() {
            op.stop(Duration::from_secs(5));
        }
        self.nodes.clear();
        crate::netns::unmount_bpffs_under(&self.dir.join("nodes"));
    }
}

/// Probes every ordered pair of recorded pods on every port the destination declares, with real
/// connections between the pods' namespaces. The cells have the shape `caracalctl policy matrix` prints
/// (`from`, `to`, `port`, `protocol`, `allowed`), sorted the same way.
pub fn probe(pods: &Value, timeout: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    let list = pods.as_array().cloned().unwrap_or_default();
    for src in &list {
        let Some(netns) = src["netns"].as_str() else {
            continue;
        };
        let ns = NetNs::existing(netns);
        for dst in &list {
            if src["pod"] == dst["pod"] {
                continue;
            }
            let Some(ip) = dst["ip"].as_str().and_then(|i| i.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            for port in dst["ports"].as_array().into_iter().flatten() {
                let p = u16::try_from(port["port"].as_u64().unwrap_or(0)).unwrap_or(0);
                let proto = port["protocol"].as_str().unwrap_or("TCP");
                let ok = if proto == "UDP" {
                    crate::probe::udp_echo(&ns, ip, p, timeout)
                } else {
                    crate::probe::tcp_echo(&ns, ip, p, timeout)
                }
                .is_ok_and(|o| o.connected());
                out.push(json!({"from": src["pod"], "to": dst["pod"], "port": p, "protocol": proto, "allowed": ok}));
            }
        }
    }
    sort_cells(&mut out);
    out
}

/// Orders connectivity cells (port, protocol, from, to), as [`probe`] returns them: a measured table and one
/// computed elsewhere compare equal cell by cell.
pub fn sort_cells(cells: &mut [Value]) {
    cells.sort_by_key(|c| {
        (
            c["port"].as_u64(),
            c["protocol"].to_string(),
            c["from"].to_string(),
            c["to"].to_string(),
        )
    });
}
