//! How the lab kubelet turns a host-network pod (the operator's DaemonSet and Deployment pods) into
//! processes on the machine, without containers (pure: the plan; the kubelet carries it out):
//! - the image's command becomes the workspace binary of the same name (`caracal/node` runs
//!   `target/<profile>/caracal-node`, a `command` of `caracal-cni install` runs that binary with `install`);
//! - a `hostPath` volume is the node's own directory (`<node root>/<path>`): nodes are namespaces on one
//!   machine, so each gets its own `/var/run/caracal`, `/etc/cni/net.d`, ...; the one for `/sys/fs/bpf`
//!   gets a bpffs of its own, mounted by the kubelet, and the one for `/sys/fs/cgroup` the machine's cgroup v2
//!   hierarchy (every node's processes are in the machine's cgroups, as a real node's are in its own);
//! - `configMap` and `secret` volumes are files written under the pod's directory;
//! - an environment value under a container mount path is rewritten to where that mount points, and
//!   `fieldRef`s (`spec.nodeName`, `status.hostIP`, `metadata.name`, `metadata.namespace`) are resolved;
//! - ports: every process runs in the machine's own network namespace (so it reaches the API server on
//!   loopback), so the ports a pod declares for health and metrics are remapped to free ones per pod, and the
//!   readiness probe follows the remapping.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use serde_json::Value;

/// One process to run for a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The container's name.
    pub container: String,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment (resolved and rewritten).
    pub env: Vec<(String, String)>,
    /// An init container (runs to completion before the others start).
    pub init: bool,
    /// Readiness: an HTTP GET of this path on this (remapped) loopback port answers 200.
    pub readiness: Option<(u16, String)>,
}

/// The plan for a pod: files to write, then processes to run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Files of configMap and secret volumes.
    pub files: Vec<(PathBuf, Vec<u8>)>,
    /// Directories of hostPath volumes to create.
    pub dirs: Vec<PathBuf>,
    /// Of those, the ones standing for the host's `/sys/fs/bpf`: the kubelet mounts a bpffs on each (a
    /// real node has one there), so what a process pins outlives the process.
    pub bpffs: Vec<PathBuf>,
    /// Of those, the ones standing for the host's `/sys/fs/cgroup`: the kubelet mounts the machine's cgroup
    /// v2 hierarchy on each.
    pub cgroup2: Vec<PathBuf>,
    /// Init containers first, in order, then the containers.
    pub processes: Vec<ProcessSpec>,
}

/// Why a pod cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// No binary for the container's command or image.
    #[error("container {container}: no workspace binary for command {command:?} / image {image:?}")]
    NoBinary {
        /// The container.
        container: String,
        /// Its command.
        command: Vec<String>,
        /// Its image.
        image: String,
    },
    /// A volume refers to a ConfigMap or Secret that does not exist (yet).
    #[error("volume {volume}: {kind} {name} not found")]
    MissingSource {
        /// The volume.
        volume: String,
        /// ConfigMap or Secret.
        kind: &'static str,
        /// Its name.
        name: String,
    },
}

/// What the plan needs from around the pod.
pub struct Context<'a> {
    /// The node's name.
    pub node: &'a str,
    /// The node's address.
    pub host_ip: &'a str,
    /// The node's root directory (hostPath volumes live under it).
    pub node_root: &'a Path,
    /// The pod's directory (configMap and secret files).
    pub pod_root: &'a Path,
    /// Where the workspace binaries are (`target/debug`).
    pub bin_dir: &'a Path,
    /// ConfigMaps of the pod's namespace, by name.
    pub config_maps: &'a BTreeMap<String, ConfigMap>,
    /// Secrets of the pod's namespace, by name.
    pub secrets: &'a BTreeMap<String, Secret>,
    /// Gives a free port for a declared one (the kubelet remembers the mapping per pod).
    pub port: &'a mut dyn FnMut(u16) -> u16,
}

fn binary(c: &Container, bin_dir: &Path) -> Result<(PathBuf, Vec<String>), PlanError> {
    let command = c.command.clone().unwrap_or_default();
    let image = c.image.clone().unwrap_or_default();
    let name = match command.first() {
        Some(cmd) => Path::new(cmd)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(cmd)
            .to_owned(),
        None => {
            // [registry/]caracal/node:v0.1.0 -> caracal-node; any other image has no binary here.
            let path = image.split(':').next().unwrap_or(&image);
            let mut parts = path.rsplit('/');
            match (parts.next(), parts.next()) {
                (Some(name), Some("caracal")) => format!("caracal-{name}"),
                _ => String::new(),
            }
        }
    };
    let path = bin_dir.join(&name);
    if !name.starts_with("caracal-") {
        return Err(PlanError::NoBinary {
            container: c.name.clone(),
            command,
            image,
        });
    }
    let mut args: Vec<String> = command.iter().skip(1).cloned().collect();
    args.extend(c.args.clone().unwrap_or_default());
    Ok((path, args))
}

fn field(pod: &Pod, ctx: &Context<'_>, path: &str) -> String {
    match path {
        "spec.nodeName" => ctx.node.to_owned(),
        "status.hostIP" | "status.podIP" => ctx.host_ip.to_owned(),
        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
        "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
        _ => String::new(),
    }
}

/// The plan for `pod` on a node.
pub fn plan(pod: &Pod, ctx: &mut Context<'_>) -> Result<Plan, PlanError> {
    let mut out = Plan::default();
    let spec = pod.spec.clone().unwrap_or_default();
    // Where each volume is on this machine.
    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        if let Some(hp) = &v.host_path {
            let dir = ctx.node_root.join(hp.path.trim_start_matches('/'));
            match hp.path.trim_end_matches('/') {
                "/sys/fs/bpf" => out.bpffs.push(dir.clone()),
                "/sys/fs/cgroup" => out.cgroup2.push(dir.clone()),
                _ => {}
            }
            out.dirs.push(if hp.type_.as_deref() == Some("FileOrCreate") {
                dir.parent().map(Path::to_path_buf).unwrap_or_else(|| dir.clone())
            } else {
                dir.clone()
            });
            volumes.insert(v.name.clone(), dir);
        } else if let Some(cm) = &v.config_map {
            let name = cm.name.clone();
            let dir = ctx.pod_root.join(&v.name);
            let source = ctx
                .config_maps
                .get(&name)
                .ok_or_else(|| PlanError::MissingSource {
                    volume: v.name.clone(),
                    kind: "ConfigMap",
                    name: name.clone(),
                })?;
            for (k, val) in source.data.iter().flatten() {
                out.files.push((dir.join(k), val.as_bytes().to_vec()));
            }
            volumes.insert(v.name.clone(), dir);
        } else if let Some(sec) = &v.secret {
            let name = sec.secret_name.clone().unwrap_or_default();
            let dir = ctx.pod_root.join(&v.name);
            let source = ctx.secrets.get(&name).ok_or_else(|| PlanError::MissingSource {
                volume: v.name.clone(),
                kind: "Secret",
                name: name.clone(),
            })?;
            for (k, val) in source.data.iter().flatten() {
                out.files.push((dir.join(k), val.0.clone()));
            }
            volumes.insert(v.name.clone(), dir);
        }
    }
    let init = spec.init_containers.clone().unwrap_or_default();
    for (is_init, c) in init
        .iter()
        .map(|c| (true, c))
        .chain(spec.containers.iter().map(|c| (false, c)))
    {
        let (program, args) = binary(c, ctx.bin_dir)?;
        let mounts: Vec<(String, PathBuf)> = c
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| {
                Some((
                    m.mount_path.trim_end_matches('/').to_owned(),
                    volumes.get(&m.name)?.clone(),
                ))
            })
            .collect();
        let rewrite = |value: &str| -> String {
            // The longest mount path that contains the value wins.
            let best = mounts
                .iter()
                .filter(|(mp, _)| value == mp || value.starts_with(&format!("{mp}/")))
                .max_by_key(|(mp, _)| mp.len());
            match best {
                Some((mp, dir)) => format!("{}{}", dir.display(), &value[mp.len()..]),
                None => value.to_owned(),
            }
        };
        let mut env = Vec::new();
        for e in c.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                rewrite(v)
            } else if let Some(f) = e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
                field(pod, ctx, &f.field_path)
            } else {
                String::new()
            };
            let value = if e.name.ends_with("_PORT") && value.parse::<u16>().is_ok() {
                (ctx.port)(value.parse().unwrap_or(0)).to_string()
            } else {
                value
            };
            env.push((e.name.clone(), value));
        }
        let readiness = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|g| {
                let declared = match &g.port {
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => {
                        u16::try_from(*n).ok()?
                    }
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(_) => return None,
                };
                Some(((ctx.port)(declared), g.path.clone().unwrap_or_else(|| "/".into())))
            });
        out.processes.push(ProcessSpec {
            container: c.name.clone(),
            program,
            args,
            env,
            init: is_init,
            readiness,
        });
    }
    Ok(out)
}

/// The env value of `name` in a process spec (for callers and tests).
pub fn env_of<'a>(p: &'a ProcessSpec, name: &str) -> Option<&'a str> {
    p.env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Rewrites a host path the way the plan does for `hostPath` volumes (a CNI conflist's socket path, read by
/// the lab's container runtime).
pub fn host_path(node_root: &Path, path: &str) -> PathBuf {
    node_root.join(path.trim_start_matches('/'))
}

/// Reads a JSON value's string at `pointer`, for the runtime side of the lab.
pub fn string_at(v: &Value, pointer: &str) -> Option<String> {
    v.pointer(pointer)?.as_str().map(str::to_owned)
}
