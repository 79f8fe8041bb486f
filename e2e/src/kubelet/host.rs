//! The lab kubelet's process side: a host-network pod (the operator's DaemonSet and Deployment pods) runs
//! as processes on the machine, following the plan of [`crate::podspec`]: its configMap and secret files
//! written, its host directories made, init containers run to completion, then the containers started with
//! their environment (plus the lab's own, such as the agent's `CARACAL_NETNS`), the readiness probe polled,
//! and the pod's status reported (Running, hostIP as podIP, Ready following the probe). Deleting the pod
//! stops the processes (SIGTERM, then SIGKILL).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::podspec::{self, Context};
use crate::process::{Lifetime, Supervised};

/// Where host-network pods' files and programs come from.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The lab's directory: `nodes/<node>/...` for host paths, `pods/<ns>_<pod>/...` for volumes and logs.
    pub lab_dir: PathBuf,
    /// The workspace binaries (`target/debug`).
    pub bin_dir: PathBuf,
    /// Extra environment for every process of the node (`CARACAL_NETNS`, ...).
    pub extra_env: Vec<(String, String)>,
    /// The admin kubeconfig: its server and CA go into each pod's own kubeconfig, whose credentials are a
    /// token of the pod's ServiceAccount (so every component runs with exactly its RBAC).
    pub admin_kubeconfig: PathBuf,
    /// Run the processes inside this network namespace (the node's), as on a node: ports stay as declared
    /// and probes are made inside it. None: in the machine's own namespace, with ports remapped per pod.
    pub node_ns: Option<String>,
}

/// Where `ip` is (the processes of a node run behind `ip netns exec`).
pub(crate) fn ip_tool() -> PathBuf {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/ip"))
}

/// The pod's own ServiceAccount kubeconfig in `dir` (None for a pod without an account).
async fn token_kubeconfig(
    cfg: &HostConfig,
    client: &Client,
    pod: &Pod,
    server: Option<&str>,
    dir: &std::path::Path,
) -> Result<Option<PathBuf>, String> {
    let Some(sa) = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()) else {
        return Ok(None);
    };
    let path = dir.join("kubeconfig");
    crate::controlplane::service_account_kubeconfig(
        client,
        &cfg.admin_kubeconfig,
        &pod.namespace().unwrap_or_default(),
        &sa,
        server,
        &path,
    )
    .await?;
    Ok(Some(path))
}

/// The API server as a kubelet's pod reaches it (the server of its kubeconfig, standing in for in-cluster
/// configuration): `KUBERNETES_SERVICE_HOST`:`KUBERNETES_SERVICE_PORT` when the pod's containers set them (the
/// operator does, from its `kubernetes-services-endpoint` ConfigMap), the `kubernetes` Service's ClusterIP
/// otherwise, as a kubelet sets them; so on a lab node the API server is reached through kube-proxy or
/// Caracal's Service handling, or the address the operator was given, never around them.
async fn api_server_for(client: &Client, plan: &podspec::Plan) -> Result<String, String> {
    let env = |k| {
        plan.processes
            .iter()
            .filter(|p| !p.init)
            .find_map(|p| podspec::env_of(p, k).map(str::to_owned))
    };
    if let Some(host) = env("KUBERNETES_SERVICE_HOST") {
        let port = env("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
        return Ok(format!("https://{host}:{port}"));
    }
    let svc = Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await
        .map_err(|e| format!("reading the kubernetes Service: {e}"))?;
    let ip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .ok_or("the kubernetes Service has no ClusterIP")?;
    Ok(format!("https://{ip}:443"))
}

/// A host-network pod this kubelet runs.
#[derive(Debug)]
pub struct HostPod {
    /// Its processes (the containers, not the finished init containers); one that exits is started again
    /// (restartPolicy Always), after a back-off of 1 s doubling to 30 s.
    pub processes: Arc<std::sync::Mutex<Vec<Supervised>>>,
    /// Declared port -> the port it got on this machine.
    pub ports: BTreeMap<u16, u16>,
    ready_loop: Arc<AtomicBool>,
}

impl HostPod {
    /// The process ids of its running processes.
    pub fn pids(&self) -> Vec<u32> {
        self.processes
            .lock()
            .map(|ps| ps.iter().filter_map(Supervised::pid).collect())
            .unwrap_or_default()
    }

    /// Each process's name and id.
    pub fn named_pids(&self) -> Vec<(String, u32)> {
        self.processes
            .lock()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| Some((p.name().to_owned(), p.pid()?)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for HostPod {
    fn drop(&mut self) {
        self.ready_loop.store(false, Ordering::Relaxed);
        if let Ok(mut ps) = self.processes.lock() {
            for p in ps.iter_mut() {
                p.stop(Duration::from_secs(5));
            }
        }
    }
}

async fn patch_status(client: &Client, pod: &Pod, status: serde_json::Value) -> Result<(), String> {
    Api::<Pod>::namespaced(client.clone(), &pod.namespace().unwrap_or_default())
        .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map(|_| ())
        .map_err(|e| format!("reporting status: {e}"))
}

fn ready_status(pod: &Pod, host_ip: &str, ready: bool) -> serde_json::Value {
    let s = if ready { "True" } else { "False" };
    json!({"status": {
        "phase": "Running",
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "podIP": host_ip, "podIPs": [{"ip": host_ip}],
        "conditions": [
            {"type": "Ready", "status": s},
            {"type": "ContainersReady", "status": s},
            {"type": "Initialized", "status": "True"},
            {"type": "PodScheduled", "status": "True"}
        ],
        "containerStatuses": super::container_statuses(pod, ready),
    }})
}

/// Starts a host-network pod on node `node` (address `host_ip`).
pub async fn start(
    cfg: &HostConfig,
    client: &Client,
    node: &str,
    host_ip: &str,
    pod: &Pod,
) -> Result<HostPod, String> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let config_maps: BTreeMap<String, ConfigMap> = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing ConfigMaps: {e}"))?
        .into_iter()
        .map(|c| (c.name_any(), c))
        .collect();
    let secrets: BTreeMap<String, Secret> = Api::<Secret>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing Secrets: {e}"))?
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    let node_root = cfg.lab_dir.join("nodes").join(node);
    let pod_root = cfg.lab_dir.join("pods").join(format!("{ns}_{name}"));
    let mut ports = BTreeMap::new();
    let in_node = cfg.node_ns.is_some();
    let mut port = |declared: u16| {
        *ports.entry(declared).or_insert_with(|| {
            if in_node {
                declared
            } else {
                crate::controlplane::free_port().unwrap_or(0)
            }
        })
    };
    let plan = podspec::plan(
        pod,
        &mut Context {
            node,
            host_ip,
            node_root: &node_root,
            pod_root: &pod_root,
            bin_dir: &cfg.bin_dir,
            config_maps: &config_maps,
            secrets: &secrets,
            port: &mut port,
        },
    )
    .map_err(|e| e.to_string())?;
    for d in &plan.dirs {
        std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    for d in &plan.bpffs {
        crate::netns::mount_bpffs(d).map_err(|e| format!("mounting a bpffs on {}: {e}", d.display()))?;
    }
    for d in &plan.cgroup2 {
        crate::netns::mount_cgroup2(d)
            .map_err(|e| format!("mounting the cgroup v2 hierarchy on {}: {e}", d.display()))?;
    }
    for (path, data) in &plan.files {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        std::fs::write(path, data).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    std::fs::create_dir_all(&pod_root).map_err(|e| format!("creating {}: {e}", pod_root.display()))?;
    let mut lab_env = cfg.extra_env.clone();
    let server = match &cfg.node_ns {
        Some(_) => Some(api_server_for(client, &plan).await?),
        None => None,
    };
    if let Some(kc) = token_kubeconfig(cfg, client, pod, server.as_deref(), &pod_root).await? {
        lab_env.push(("KUBECONFIG".into(), kc.display().to_string()));
    }
    let mut processes = Vec::new();
    let mut readiness = None;
    for p in &plan.processes {
        let mut env = p.env.clone();
        env.extend(lab_env.iter().cloned());
        // Inside the node's namespace: `ip netns exec NODE PROGRAM ARGS...` (ip execs the program in place).
        let (program, args) = match &cfg.node_ns {
            Some(node_ns) => {
                let mut a = vec![
                    "netns".to_owned(),
                    "exec".to_owned(),
                    node_ns.clone(),
                    p.program.display().to_string(),
                ];
                a.extend(p.args.iter().cloned());
                (ip_tool(), a)
            }
            None => (p.program.clone(), p.args.clone()),
        };
        let log = pod_root.join(format!("{}.log", p.container));
        if p.init {
            let (program, args, log2) = (program.clone(), args.clone(), log.clone());
            let status = tokio::task::spawn_blocking(move || {
                std::process::Command::new(&program)
                    .args(&args)
                    .envs(env)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::fs::File::create(&log2)?)
                    .stderr(std::fs::File::options().append(true).open(&log2)?)
                    .status()
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("init container {}: {e}", p.container))?;
            if !status.success() {
                return Err(format!(
                    "init container {} failed ({status}): {}",
                    p.container,
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            continue;
        }
        processes.push(
            Supervised::spawn_env(
                &format!("{ns}/{name}/{}", p.container),
                &program,
                &args,
                &env,
                &log,
                Lifetime::Attached,
            )
            .map_err(|e| e.to_string())?,
        );
        if readiness.is_none() {
            readiness.clone_from(&p.readiness);
        }
    }
    patch_status(client, pod, ready_status(pod, host_ip, false)).await?;
    let processes = Arc::new(std::sync::Mutex::new(processes));
    let ready_loop = Arc::new(AtomicBool::new(true));
    // restartPolicy Always: a process that exits is started again after a back-off.
    {
        let (processes, alive) = (processes.clone(), ready_loop.clone());
        tokio::spawn(async move {
            let mut backoff: BTreeMap<usize, (Duration, Option<std::time::Instant>)> = BTreeMap::new();
            while alive.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Ok(mut ps) = processes.lock() else { return };
                if !alive.load(Ordering::Relaxed) {
                    return;
                }
                for (i, p) in ps.iter_mut().enumerate() {
                    if !p.exited() {
                        continue;
                    }
                    let (delay, since) = backoff.entry(i).or_insert((Duration::from_secs(1), None));
                    let due = since.get_or_insert_with(std::time::Instant::now);
                    if due.elapsed() < *delay {
                        continue;
                    }
                    warn!(process = %p.name(), "exited; restarting (restartPolicy Always)");
                    if let Err(e) = p.respawn() {
                        warn!(process = %p.name(), error = %e, "restarting");
                    }
                    *delay = (*delay * 2).min(Duration::from_secs(30));
                    *since = None;
                }
            }
        });
    }
    // Readiness follows the probe (or the processes running, without one).
    {
        let (client, pod, host_ip, alive) = (
            client.clone(),
            pod.clone(),
            host_ip.to_owned(),
            ready_loop.clone(),
        );
        let node_ns = cfg.node_ns.clone();
        tokio::spawn(async move {
            let mut last = None;
            while alive.load(Ordering::Relaxed) {
                let ready = match &readiness {
                    Some((port, path)) => {
                        let (port, path) = (*port, path.clone());
                        let node_ns: Option<String> = node_ns.clone();
                        tokio::task::spawn_blocking(move || match node_ns {
                            Some(n) => crate::netns::NetNs::existing(&n)
                                .enter(move || crate::probe::http_get(port, &path).map(|r| r.0))
                                .ok()
                                .flatten(),
                            None => crate::probe::http_get(port, &path).map(|r| r.0),
                        })
                        .await
                        .ok()
                        .flatten()
                            == Some(200)
                    }
                    None => true,
                };
                if last != Some(ready) {
                    match patch_status(&client, &pod, ready_status(&pod, &host_ip, ready)).await {
                        Ok(()) => {
                            info!(pod = %pod.name_any(), ready, "readiness changed");
                            last = Some(ready);
                        }
                        Err(e) => warn!(error = %e, "reporting readiness"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
    Ok(HostPod {
        processes,
        ports,
        ready_loop,
    })
}
