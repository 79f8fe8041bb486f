//! The lab kubelet's workload side: it watches the pods bound to its node and, for each workload pod (not
//! host-network), does what a container runtime does for networking: creates the pod's network namespace,
//! calls the CNI plugin (`ADD`, the runtime's environment and the network configuration on stdin), starts a
//! small server answering TCP (echo) and UDP (echo) on every declared container port, and reports
//! `status.podIP` / `podIPs`, `hostIP`, phase Running and Ready. When a pod is deleted it calls `DEL`,
//! stops the servers, removes the namespace, and confirms the deletion (grace period 0), as a kubelet does.
//!
//! Host-network pods (the operator's DaemonSet and Deployment) run as processes ([`host`]).

pub mod host;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::cni::{self, Invocation};
use crate::netns::NetNs;

/// The annotation in which the lab kubelet records a pod's network namespace (its `ip netns` name).
pub const NETNS_ANNOTATION: &str = "lab.caracal.dev/netns";

/// A pod this kubelet runs.
#[derive(Debug)]
pub struct RunningPod {
    /// Its network namespace.
    pub ns: NetNs,
    /// Its address.
    pub ip: Ipv4Addr,
    /// The container id used with the plugin.
    pub container_id: String,
    servers: Servers,
}

/// How a kubelet reaches its node.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// The Node name.
    pub node: String,
    /// The node's namespace (the plugin runs inside it, as on a node).
    pub node_ns: String,
    /// The node's underlay address (`status.hostIP`).
    pub host_ip: Ipv4Addr,
    /// The plugin binary.
    pub plugin: PathBuf,
    /// The network configuration handed to the plugin (the conflist's plugin entry).
    pub conf: Value,
    /// How host-network pods run (None: they are left alone).
    pub host: Option<host::HostConfig>,
}

/// Pods by `namespace/name`.
pub type Pods = Arc<Mutex<BTreeMap<String, RunningPod>>>;

/// Host-network pods by `namespace/name`.
pub type HostPods = Arc<Mutex<BTreeMap<String, host::HostPod>>>;

fn is_workload(p: &Pod) -> bool {
    !p.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false)
}

fn ports(p: &Pod) -> Vec<(u16, String)> {
    p.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|port| {
            Some((
                u16::try_from(port.container_port).ok()?,
                port.protocol.clone().unwrap_or_else(|| "TCP".into()),
            ))
        })
        .collect()
}

/// The echo servers of one pod. TCP: tasks on [`echo_runtime`] (an accepted connection costs a task, not an OS
/// thread: the Services bench opens thousands a second, and a thread's creation and exit per connection
/// would weigh on what it measures as much as the data plane does); UDP: a thread per socket. All stop when
/// this is dropped (the pod deleted): listeners, their connections, and the UDP threads.
#[derive(Debug)]
struct Servers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Dropped with this: every TCP task sees its receiver end.
    _tcp: tokio::sync::watch::Sender<()>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The runtime the pods' TCP echo servers run on: its own threads (two), so that a busy kubelet or test
/// runtime never starves the servers, nor they it.
fn echo_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pod-echo")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("the pods' echo runtime: {e}"))
    })
}

/// Serves one TCP listener until `stop` ends: each connection answered ([`answer`]) until the client closes
/// it, 30 s pass without a request, or the pod is deleted.
async fn serve_tcp(
    listener: std::net::TcpListener,
    ip: Ipv4Addr,
    mut stop: tokio::sync::watch::Receiver<()>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let Ok((mut s, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 4096];
            loop {
                let read = tokio::select! {
                    r = tokio::time::timeout(std::time::Duration::from_secs(30), s.read(&mut buf)) => r,
                    _ = stop.changed() => return,
                };
                match read {
                    Ok(Ok(n)) if n > 0 => {
                        if s.write_all(&answer(ip, &buf[..n])).await.is_err() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
    }
}

/// What a pod's server answers: [`crate::probe::WHOAMI`] gets the pod's address (so a probe through a
/// Service sees which backend answered), anything else its echo.
fn answer(ip: Ipv4Addr, got: &[u8]) -> Vec<u8> {
    if got == crate::probe::WHOAMI {
        format!("{ip}\n").into_bytes()
    } else {
        got.to_vec()
    }
}

/// `status.containerStatuses` as a kubelet reports them: one per container, running since now, `ready`
/// (what `kubectl get pods` counts in its READY column). The container ids name the lab kubelet as the
/// runtime (`lab://`).
pub fn container_statuses(p: &Pod, ready: bool) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let uid = p.uid().unwrap_or_default();
    Value::Array(
        p.spec
            .iter()
            .flat_map(|s| &s.containers)
            .map(|c| {
                json!({
                    "name": c.name,
                    "image": c.image.clone().unwrap_or_default(),
                    "imageID": "",
                    "containerID": format!("lab://{uid}/{}", c.name),
                    "ready": ready,
                    "started": true,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                })
            })
            .collect(),
    )
}

/// Starts the echo servers of one pod inside its namespace: TCP echo and UDP echo per declared port.
fn serve(ns: &NetNs, ip: Ipv4Addr, ports: &[(u16, String)]) -> Servers {
    use std::sync::atomic::Ordering;
    let (tcp, stopped) = tokio::sync::watch::channel(());
    let servers = Servers {
        stop: Arc::default(),
        _tcp: tcp,
    };
    for (port, proto) in ports {
        let (port, stop) = (*port, servers.stop.clone());
        if proto == "UDP" {
            let Ok(Ok(sock)) = ns.enter(move || std::net::UdpSocket::bind((ip, port))) else {
                continue;
            };
            let _ = sock.set_read_timeout(Some(std::time::Duration::from_millis(100)));
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&answer(ip, &buf[..n]), from);
                    }
                }
            });
        } else {
            let Ok(Ok(listener)) = ns.enter(move || std::net::TcpListener::bind((ip, port))) else {
                continue;
            };
            if listener.set_nonblocking(true).is_err() {
                continue;
            }
            echo_runtime().spawn(serve_tcp(listener, ip, stopped.clone()));
        }
    }
    servers
}

impl KubeletConfig {
    /// Starts or stops a host-network pod.
    async fn host_pod(&self, client: &Client, host_pods: &HostPods, key: &str, p: &Pod, deleted: bool) {
        let Some(hc) = &self.host else { return };
        if deleted {
            let taken = host_pods.lock().ok().and_then(|mut m| m.remove(key));
            drop(taken);
            if p.metadata.deletion_timestamp.is_some() {
                let _ = Api::<Pod>::namespaced(client.clone(), &p.namespace().unwrap_or_default())
                    .delete(&p.name_any(), &DeleteParams::default().grace_period(0))
                    .await;
            }
            return;
        }
        if host_pods.lock().map(|m| m.contains_key(key)).unwrap_or(true) {
            return;
        }
        match host::start(hc, client, &self.node, &self.host_ip.to_string(), p).await {
            Ok(hp) => {
                info!(pod = %key, node = %self.node, "host-network pod started");
                if let Ok(mut m) = host_pods.lock() {
                    m.insert(key.to_owned(), hp);
                }
            }
            Err(e) => warn!(pod = %key, node = %self.node, error = %e, "starting a host-network pod failed"),
        }
    }

    /// The plugin and its configuration: as given, or (in the lab) what the operator's install step put in
    /// the node's CNI directories, with host paths mapped to the node's own directory.
    fn cni_runtime(&self) -> Result<(PathBuf, Value), String> {
        if !self.conf.is_null() {
            return Ok((self.plugin.clone(), self.conf.clone()));
        }
        let Some(hc) = &self.host else {
            return Err("no CNI configuration".into());
        };
        let root = hc.lab_dir.join("nodes").join(&self.node);
        let net_d = root.join("etc/cni/net.d");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&net_d)
            .map_err(|e| format!("no CNI configuration yet in {}: {e}", net_d.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
            .collect();
        files.sort();
        let first = files
            .first()
            .ok_or_else(|| format!("no CNI configuration yet in {}", net_d.display()))?;
        let list: Value = serde_json::from_slice(&std::fs::read(first).map_err(|e| e.to_string())?)
            .map_err(|e| format!("{}: {e}", first.display()))?;
        let mut conf = list["plugins"][0].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(sock) = conf["agent_socket"].as_str() {
            conf["agent_socket"] = crate::podspec::host_path(&root, sock)
                .display()
                .to_string()
                .into();
        }
        let plugin = root
            .join("opt/cni/bin")
            .join(conf["type"].as_str().unwrap_or("caracal"));
        Ok((plugin, conf))
    }

    fn invoke(
        &self,
        plugin: &std::path::Path,
        conf: &Value,
        command: &str,
        cid: &str,
        netns: &str,
        pod: (&str, &str),
    ) -> std::io::Result<(i32, Value)> {
        let prefix = vec![
            "ip".to_owned(),
            "netns".to_owned(),
            "exec".to_owned(),
            self.node_ns.clone(),
        ];
        cni::invoke(
            plugin,
            &prefix,
            &Invocation {
                command,
                container_id: cid,
                netns,
                ifname: "eth0",
                pod: Some(pod),
            },
            conf,
        )
    }

    /// Sets a pod up: namespace, CNI ADD (retried while the agent says "try again"), servers, status.
    async fn start_pod(&self, client: &Client, p: &Pod) -> Result<RunningPod, String> {
        let (ns, name) = (p.namespace().unwrap_or_default(), p.name_any());
        let netns = NetNs::new("lpod").map_err(|e| e.to_string())?;
        let path = format!("/run/netns/{}", netns.name());
        let cid = format!("lab{}", p.uid().unwrap_or_default().replace('-', ""));
        let (plugin, conf) = self.cni_runtime()?;
        let (me, cid2, path2, ns2, name2) =
            (self.clone(), cid.clone(), path.clone(), ns.clone(), name.clone());
        let (code, out) = tokio::task::spawn_blocking(move || {
            me.invoke(&plugin, &conf, "ADD", &cid2, &path2, (&ns2, &name2))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("running the plugin: {e}"))?;
        if code != 0 {
            return Err(format!("CNI ADD: {out}"));
        }
        let ip = out["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
            .ok_or_else(|| format!("ADD result without an IPv4 address: {out}"))?;
        let servers = serve(&netns, ip, &ports(p));
        // Where the pod's network namespace is, for `caracal-lab probe` in another process (before the
        // status, so a Running pod always has it).
        let note = json!({"metadata": {"annotations": {NETNS_ANNOTATION: netns.name()}}});
        Api::<Pod>::namespaced(client.clone(), &ns)
            .patch(&name, &PatchParams::default(), &Patch::Merge(&note))
            .await
            .map_err(|e| format!("recording the network namespace: {e}"))?;
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": self.host_ip.to_string(),
            "hostIPs": [{"ip": self.host_ip.to_string()}],
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "PodScheduled", "status": "True"}
            ],
            "containerStatuses": container_statuses(p, true),
        }});
        Api::<Pod>::namespaced(client.clone(), &ns)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|e| format!("reporting status: {e}"))?;
        Ok(RunningPod {
            ns: netns,
            ip,
            container_id: cid,
            servers,
        })
    }

    /// Tears a pod down: servers, CNI DEL, namespace.
    async fn stop_pod(&self, key: &str, pod: RunningPod) {
        drop(pod.servers);
        let (ns, name) = key.split_once('/').unwrap_or(("", key));
        let (me, cid, path, ns, name) = (
            self.clone(),
            pod.container_id.clone(),
            format!("/run/netns/{}", pod.ns.name()),
            ns.to_owned(),
            name.to_owned(),
        );
        let Ok((plugin, conf)) = self.cni_runtime() else {
            warn!(pod = key, "no CNI configuration for DEL");
            return;
        };
        match tokio::task::spawn_blocking(move || me.invoke(&plugin, &conf, "DEL", &cid, &path, (&ns, &name)))
            .await
        {
            Ok(Ok((0, _))) => {}
            other => warn!(pod = key, result = ?other, "CNI DEL failed"),
        }
        drop(pod.ns);
    }

    /// Starts, keeps or stops one pod (idempotent; called on every event and retried every tick).
    async fn sync_pod(
        &self,
        client: &Client,
        pods: &Pods,
        host_pods: &HostPods,
        key: &str,
        p: &Pod,
        deleted: bool,
    ) {
        if !is_workload(p) {
            self.host_pod(client, host_pods, key, p, deleted).await;
            return;
        }
        if deleted {
            let taken = pods.lock().ok().and_then(|mut m| m.remove(key));
            if let Some(pod) = taken {
                self.stop_pod(key, pod).await;
                info!(pod = %key, node = %self.node, "pod stopped");
            }
            if p.metadata.deletion_timestamp.is_some() {
                let _ = Api::<Pod>::namespaced(client.clone(), &p.namespace().unwrap_or_default())
                    .delete(&p.name_any(), &DeleteParams::default().grace_period(0))
                    .await;
            }
            return;
        }
        if pods.lock().map(|m| m.contains_key(key)).unwrap_or(true) {
            return;
        }
        match self.start_pod(client, p).await {
            Ok(pod) => {
                info!(pod = %key, node = %self.node, ip = %pod.ip, "pod running");
                if let Ok(mut m) = pods.lock() {
                    m.insert(key.to_owned(), pod);
                }
            }
            Err(e) => warn!(pod = %key, error = %e, "starting the pod failed; retrying"),
        }
    }

    /// Runs the kubelet until the task is dropped; `pods` and `host_pods` show what it runs. Pods that
    /// could not start (the agent not ready yet, a volume's source missing) are retried every 2 s.
    pub async fn run(self, client: Client, pods: Pods, host_pods: HostPods) {
        let api: Api<Pod> = Api::all(client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
        let mut seen: BTreeMap<String, Pod> = BTreeMap::new();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        loop {
            tokio::select! {
                ev = events.next() => {
                    let Some(ev) = ev else { return };
                    let (p, deleted) = match ev {
                        Ok(Event::Apply(p) | Event::InitApply(p)) => {
                            let deleting = p.metadata.deletion_timestamp.is_some();
                            (p, deleting)
                        }
                        Ok(Event::Delete(p)) => (p, true),
                        Ok(_) => continue,
                        Err(e) => {
                            warn!(node = %self.node, error = %e, "pod watch error");
                            continue;
                        }
                    };
                    let key = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
                    if deleted {
                        seen.remove(&key);
                    } else {
                        seen.insert(key.clone(), p.clone());
                    }
                    self.sync_pod(&client, &pods, &host_pods, &key, &p, deleted).await;
                }
                _ = tick.tick() => {
                    for (key, p) in seen.clone() {
                        self.sync_pod(&client, &pods, &host_pods, &key, &p, false).await;
                    }
                }
            }
        }
    }
}

/// What a kubelet's heartbeat does, every 10 s until dropped: the Node's Ready condition and its Lease in
/// `kube-node-lease`, so the node lifecycle controller keeps the node Ready and the scheduler uses it.
pub async fn heartbeat(client: Client, node: String) {
    use k8s_openapi::api::coordination::v1::Lease;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = json!({"status": {"conditions": [{
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "caracal lab kubelet is posting ready status",
            "lastHeartbeatTime": now, "lastTransitionTime": now
        }]}});
        if let Err(e) = nodes
            .patch_status(&node, &PatchParams::default(), &Patch::Strategic(&status))
            .await
        {
            warn!(node = %node, error = %e, "node heartbeat");
        }
        let micro = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": node, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": micro}
        });
        if let Err(e) = leases
            .patch(
                &node,
                &PatchParams::apply("caracal-lab-kubelet").force(),
                &Patch::Apply(&lease),
            )
            .await
        {
            warn!(node = %node, error = %e, "node lease");
        }
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    }
}
