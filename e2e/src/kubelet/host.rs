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
    /// Extra environment for every process of the node (`KUBECONFIG`, `CARACAL_NETNS`, ...).
    pub extra_env: Vec<(String, String)>,
}

/// A host-network pod this kubelet runs.
#[derive(Debug)]
pub struct HostPod {
    /// Its processes (the containers, not the finished init containers).
    pub processes: Vec<Supervised>,
    /// Declared port -> the port it got on this machine.
    pub ports: BTreeMap<u16, u16>,
    ready_loop: Arc<AtomicBool>,
}

impl Drop for HostPod {
    fn drop(&mut self) {
        self.ready_loop.store(false, Ordering::Relaxed);
        for p in &mut self.processes {
            p.stop(Duration::from_secs(5));
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

async fn patch_status(client: &Client, pod: &Pod, status: serde_json::Value) -> Result<(), String> {
    Api::<Pod>::namespaced(client.clone(), &pod.namespace().unwrap_or_default())
        .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map(|_| ())
        .map_err(|e| format!("reporting status: {e}"))
}

fn ready_status(host_ip: &str, ready: bool) -> serde_json::Value {
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
        ]
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
    let mut port = |declared: u16| *ports.entry(declared).or_insert_with(free_port);
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
    for (path, data) in &plan.files {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        std::fs::write(path, data).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    std::fs::create_dir_all(&pod_root).map_err(|e| format!("creating {}: {e}", pod_root.display()))?;
    let mut processes = Vec::new();
    let mut readiness = None;
    for p in &plan.processes {
        let mut env = p.env.clone();
        env.extend(cfg.extra_env.iter().cloned());
        let log = pod_root.join(format!("{}.log", p.container));
        if p.init {
            let (program, args, log2) = (p.program.clone(), p.args.clone(), log.clone());
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
                &p.program,
                &p.args,
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
    patch_status(client, pod, ready_status(host_ip, false)).await?;
    let ready_loop = Arc::new(AtomicBool::new(true));
    // Readiness follows the probe (or the processes running, without one).
    {
        let (client, pod, host_ip, alive) = (
            client.clone(),
            pod.clone(),
            host_ip.to_owned(),
            ready_loop.clone(),
        );
        tokio::spawn(async move {
            let mut last = None;
            while alive.load(Ordering::Relaxed) {
                let ready = match &readiness {
                    Some((port, path)) => {
                        let (port, path) = (*port, path.clone());
                        tokio::task::spawn_blocking(move || crate::probe::http_get(port, &path).map(|r| r.0))
                            .await
                            .ok()
                            .flatten()
                            == Some(200)
                    }
                    None => true,
                };
                if last != Some(ready) {
                    match patch_status(&client, &pod, ready_status(&host_ip, ready)).await {
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
