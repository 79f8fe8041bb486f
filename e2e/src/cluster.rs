//! A test cluster of node namespaces: the real control plane with Caracal's CRDs, an underlay bridge, N
//! nodes (each a namespace attached to the underlay, registered as a Node) each running the real
//! `caracal-node` binary, and pods created through the real `caracal-cni` plugin with the runtime's
//! protocol. Every packet stays inside the namespaces it creates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::Client;
use serde_json::Value;

use crate::cni::{self, Invocation};
use crate::controlplane::ControlPlane;
use crate::netns::{NetNs, Underlay};
use crate::process::{Lifetime, Supervised};

/// Errors setting the cluster up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Control plane or CRDs.
    #[error(transparent)]
    Setup(#[from] crate::crds::SetupError),
    /// The control plane's helpers.
    #[error(transparent)]
    ControlPlane(#[from] crate::controlplane::ControlPlaneError),
    /// Namespaces.
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    /// The API server.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// A process.
    #[error(transparent)]
    Process(#[from] crate::process::ProcessError),
    /// Something did not happen in time.
    #[error("{0}")]
    Timeout(String),
    /// The plugin failed.
    #[error("CNI {command} failed with code {code}: {output}")]
    Cni {
        /// The command.
        command: String,
        /// Its exit code.
        code: i32,
        /// What it printed.
        output: Value,
    },
    /// I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One node: its namespace, underlay address, and agent.
#[derive(Debug)]
pub struct TestNode {
    /// The Node name.
    pub name: String,
    /// Its namespace.
    pub ns: NetNs,
    /// Its underlay address.
    pub ip: Ipv4Addr,
    /// Its IPv6 underlay address ([`TestCluster::enable_ipv6`]).
    pub ip6: Option<Ipv6Addr>,
    /// Its agent's CNI socket.
    pub socket: PathBuf,
    /// Its agent's state directory (IPAM journal).
    pub state: PathBuf,
    /// Its agent's health port.
    pub health: u16,
    /// Its agent's metrics port (chosen each time the agent starts).
    pub metrics: u16,
    /// The running agent.
    pub agent: Option<Supervised>,
    /// The agent's log.
    pub log: PathBuf,
}

/// A pod created through the plugin.
#[derive(Debug)]
pub struct TestPod {
    /// Its namespace (network).
    pub ns: NetNs,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, when the node hands out IPv6 too.
    pub ip6: Option<Ipv6Addr>,
    /// The container id used with the plugin.
    pub container_id: String,
    /// Kubernetes namespace and name.
    pub pod: (String, String),
    /// Index of its node.
    pub node: usize,
}

/// The cluster.
pub struct TestCluster {
    /// The control plane (keep alive).
    pub cp: ControlPlane,
    /// A client.
    pub client: Client,
    /// The underlay.
    pub underlay: Underlay,
    /// The nodes.
    pub nodes: Vec<TestNode>,
    /// The agent binary.
    pub agent_bin: PathBuf,
    /// The plugin binary.
    pub plugin_bin: PathBuf,
    /// Extra environment for every agent.
    pub agent_env: Vec<(String, String)>,
    next_container: u32,
}

impl TestCluster {
    /// Control plane + CRDs, `n` node namespaces on the underlay `10.97.0.0/24` (node i at .(i+2)),
    /// registered as Nodes `node-0`.., with no agents yet.
    pub async fn new(n: usize, agent_bin: &Path, plugin_bin: &Path) -> Result<Self, ClusterError> {
        Self::with_underlay(n, agent_bin, plugin_bin, "10.97.0.0/24").await
    }

    /// [`TestCluster::new`] on another underlay network.
    pub async fn with_underlay(
        n: usize,
        agent_bin: &Path,
        plugin_bin: &Path,
        net: &str,
    ) -> Result<Self, ClusterError> {
        let (cp, client) = crate::crds::control_plane().await?;
        let net: ipnet::Ipv4Net = net
            .parse()
            .map_err(|_| ClusterError::Timeout(format!("bad underlay {net}")))?;
        let underlay = Underlay::new(net)?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("node-{i}");
            let ns = crate::netns::node(&format!("n{i}"))?;
            let ip = Ipv4Addr::from(u32::from(net.network()) + 2 + u32::try_from(i).unwrap_or(0));
            underlay.attach(&ns, "eth0", ip)?;
            crate::objects::node(&client, &name, &ip.to_string()).await?;
            let dir = cp.dir().join(&name);
            std::fs::create_dir_all(&dir)?;
            nodes.push(TestNode {
                name,
                ns,
                ip,
                ip6: None,
                socket: dir.join("cni.sock"),
                state: dir.join("state"),
                health: crate::controlplane::free_port()?,
                metrics: 0,
                agent: None,
                log: dir.join("caracal-node.log"),
            });
        }
        Ok(Self {
            cp,
            client,
            underlay,
            nodes,
            agent_bin: agent_bin.to_owned(),
            plugin_bin: plugin_bin.to_owned(),
            agent_env: Vec::new(),
            next_container: 0,
        })
    }

    /// Makes the underlay dual-stack: node i gets address .(i+2) of the IPv6 `net` (a /64) on its underlay
    /// link, and every agent is started with IPv6 on (`CARACAL_IPV6_AUTODETECTION=interface=eth0`).
    pub fn enable_ipv6(&mut self, net: &str) -> Result<(), ClusterError> {
        let net: ipnet::Ipv6Net = net
            .parse()
            .map_err(|_| ClusterError::Timeout(format!("bad IPv6 underlay {net}")))?;
        for (i, n) in self.nodes.iter_mut().enumerate() {
            let ip = Ipv6Addr::from(u128::from(net.network()) + 2 + i as u128);
            n.ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip}/{}", net.prefix_len()),
                "dev",
                "eth0",
                "nodad",
            ])?;
            n.ip6 = Some(ip);
        }
        self.agent_env
            .push(("CARACAL_IPV6_AUTODETECTION".into(), "interface=eth0".into()));
        Ok(())
    }

    /// Starts (or restarts) node `i`'s agent.
    pub fn start_agent(&mut self, i: usize) -> Result<(), ClusterError> {
        let n = &mut self.nodes[i];
        let metrics = crate::controlplane::free_port()?;
        n.metrics = metrics;
        let mut env: Vec<(String, String)> = vec![
            ("KUBECONFIG".into(), self.cp.kubeconfig().display().to_string()),
            ("CARACAL_NODE_NAME".into(), n.name.clone()),
            ("CARACAL_NETNS".into(), n.ns.name().to_owned()),
            ("CARACAL_CNI_SOCKET".into(), n.socket.display().to_string()),
            ("CARACAL_STATE_DIR".into(), n.state.display().to_string()),
            ("CARACAL_HEALTH_PORT".into(), n.health.to_string()),
            ("CARACAL_METRICS_PORT".into(), metrics.to_string()),
            ("CARACAL_IPV4_AUTODETECTION".into(), "interface=eth0".into()),
            ("RUST_LOG".into(), "info".into()),
        ];
        env.extend(self.agent_env.iter().cloned());
        n.agent = Some(Supervised::spawn_env(
            &format!("caracal-node {}", n.name),
            &self.agent_bin,
            &[],
            &env,
            &n.log,
            Lifetime::Attached,
        )?);
        Ok(())
    }

    /// Starts every agent and waits until each reports ready.
    pub async fn start_agents(&mut self) -> Result<(), ClusterError> {
        for i in 0..self.nodes.len() {
            self.start_agent(i)?;
        }
        for i in 0..self.nodes.len() {
            self.wait_ready(i).await?;
        }
        Ok(())
    }

    /// Waits for node `i`'s agent `/readyz`.
    pub async fn wait_ready(&mut self, i: usize) -> Result<(), ClusterError> {
        let start = Instant::now();
        loop {
            if crate::probe::http_get(self.nodes[i].health, "/readyz").map(|r| r.0) == Some(200) {
                return Ok(());
            }
            if let Some(a) = self.nodes[i].agent.as_mut()
                && let Err(e) = a.check_running()
            {
                return Err(ClusterError::Timeout(e));
            }
            if start.elapsed() > Duration::from_secs(90) {
                return Err(ClusterError::Timeout(format!(
                    "{} never ready; log:\n{}",
                    self.nodes[i].name,
                    self.agent_log(i, 40)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of node `i`'s agent log.
    pub fn agent_log(&self, i: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Calls the plugin for node `i` as the runtime would (inside the node's namespace).
    pub fn cni(&self, i: usize, inv: &Invocation<'_>) -> Result<(i32, Value), ClusterError> {
        let n = &self.nodes[i];
        Ok(cni::invoke(
            &self.plugin_bin,
            &n.ns.exec_prefix(),
            inv,
            &cni::caracal_conf(&n.socket),
        )?)
    }

    /// A new container id.
    pub fn container_id(&mut self) -> String {
        self.next_container += 1;
        format!("{:016x}{:08x}", std::process::id(), self.next_container)
    }

    /// Creates pod `ns/name` on node `i` in the API, then ADDs it through the plugin; returns the pod.
    pub async fn add_pod(
        &mut self,
        i: usize,
        ns: &str,
        name: &str,
        labels: Value,
    ) -> Result<TestPod, ClusterError> {
        crate::objects::scheduled_pod(&self.client, ns, name, labels, &self.nodes[i].name).await?;
        let pod_ns = NetNs::new("pod")?;
        let container_id = self.container_id();
        let path = format!("/run/netns/{}", pod_ns.name());
        let (code, out) = self.cni(
            i,
            &Invocation {
                command: "ADD",
                container_id: &container_id,
                netns: &path,
                ifname: "eth0",
                pod: Some((ns, name)),
            },
        )?;
        if code != 0 {
            return Err(ClusterError::Cni {
                command: "ADD".into(),
                code,
                output: out,
            });
        }
        let ips: Vec<IpAddr> = out["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
            .collect();
        let ip = ips
            .iter()
            .find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .ok_or_else(|| ClusterError::Cni {
                command: "ADD (no IPv4 address in the result)".into(),
                code,
                output: out.clone(),
            })?;
        let ip6 = ips.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        });
        Ok(TestPod {
            ns: pod_ns,
            ip,
            ip6,
            container_id,
            pod: (ns.to_owned(), name.to_owned()),
            node: i,
        })
    }

    /// Creates Kubernetes namespace `ns` and one pod `PREFIX<i>` with `labels` on every node i, through the
    /// plugin (the agents must be running).
    pub async fn pod_on_each_node(
        &mut self,
        ns: &str,
        prefix: &str,
        labels: Value,
    ) -> Result<Vec<TestPod>, ClusterError> {
        crate::objects::namespace(&self.client, ns, serde_json::json!({})).await?;
        let mut pods = Vec::new();
        for i in 0..self.nodes.len() {
            pods.push(
                self.add_pod(i, ns, &format!("{prefix}{i}"), labels.clone())
                    .await?,
            );
        }
        Ok(pods)
    }

    /// Writes the pod's addresses to `status.podIP(s)`, as the kubelet does after ADD: other nodes' agents
    /// learn a remote pod's addresses from there (policy selecting it by label).
    pub async fn report_pod_ips(&self, pod: &TestPod) -> Result<(), ClusterError> {
        let mut ips = vec![serde_json::json!({"ip": pod.ip.to_string()})];
        ips.extend(pod.ip6.map(|ip| serde_json::json!({"ip": ip.to_string()})));
        let status = serde_json::json!({"status": {"podIP": pod.ip.to_string(), "podIPs": ips}});
        kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), &pod.pod.0)
            .patch_status(
                &pod.pod.1,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&status),
            )
            .await?;
        Ok(())
    }

    /// DEL of a pod through the plugin.
    pub fn del_pod(&self, pod: &TestPod) -> Result<(i32, Value), ClusterError> {
        let path = format!("/run/netns/{}", pod.ns.name());
        self.cni(
            pod.node,
            &Invocation {
                command: "DEL",
                container_id: &pod.container_id,
                netns: &path,
                ifname: "eth0",
                pod: Some((&pod.pod.0, &pod.pod.1)),
            },
        )
    }
}

/// Waits until `f` is true, for up to `deadline`.
pub async fn eventually(
    what: &str,
    deadline: Duration,
    mut f: impl FnMut() -> bool,
) -> Result<(), ClusterError> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > deadline {
            return Err(ClusterError::Timeout(format!("timed out waiting for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Probes every ordered pair of pods over IPv6 (TCP and UDP); returns the pairs that failed (a pod without
/// an IPv6 address fails).
pub fn unreachable_pairs_v6(pods: &[TestPod], timeout: Duration) -> Vec<String> {
    let mut failed = Vec::new();
    for a in pods {
        for b in pods {
            if a.ip == b.ip {
                continue;
            }
            let Some(dst) = b.ip6 else {
                failed.push(format!("{}: no IPv6 address", b.ip));
                continue;
            };
            let tcp = crate::probe::tcp(&a.ns, &b.ns, dst, 8080, timeout).is_ok_and(|o| o.connected());
            let udp = crate::probe::udp(&a.ns, &b.ns, dst, 5353, timeout).is_ok_and(|o| o.connected());
            if !(tcp && udp) {
                failed.push(format!("{:?} -> {dst}: tcp {tcp} udp {udp}", a.ip6));
            }
        }
    }
    failed
}

/// Probes every ordered pair of pods over TCP, UDP and ICMP; returns the pairs that failed.
pub fn unreachable_pairs(pods: &[TestPod], timeout: Duration) -> Vec<String> {
    let mut failed = Vec::new();
    for a in pods {
        for b in pods {
            if a.ip == b.ip {
                continue;
            }
            let tcp = crate::probe::tcp(&a.ns, &b.ns, b.ip, 8080, timeout).is_ok_and(|o| o.connected());
            let udp = crate::probe::udp(&a.ns, &b.ns, b.ip, 5353, timeout).is_ok_and(|o| o.connected());
            let icmp = crate::probe::icmp(&a.ns, b.ip, 8, 0, timeout).is_ok_and(|o| o.connected());
            if !(tcp && udp && icmp) {
                failed.push(format!("{} -> {}: tcp {tcp} udp {udp} icmp {icmp}", a.ip, b.ip));
            }
        }
    }
    failed
}
