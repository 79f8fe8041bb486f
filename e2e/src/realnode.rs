//! A real node: the upstream kubelet (built from the pinned Kubernetes release) with containerd and runc
//! (built from their Go modules), running inside a lab node's network namespace, so that the operator's
//! rendered DaemonSet and Deployments, Caracal's images and its CNI plugin are interpreted by the real
//! programs rather than by the lab kubelet.
//!
//! Several real nodes share this machine. What each keeps to itself:
//!
//! - **Network**: the node's namespace (`nsenter --net`): the kubelet's ports, the host-network pods (the
//!   agent, Typha, the operator) and the pods' veths are the node's.
//! - **Files**: a mount namespace of its own (`unshare --mount --propagation private`, held by a `sleep`
//!   process, entered by containerd and the kubelet with `nsenter --mount`), in which the node's directory
//!   under `target/lab/nodes/<node>/` is bind-mounted over the paths a node's programs use: `/etc/cni/net.d`,
//!   `/opt/cni/bin`, `/var/lib/kubelet`, `/var/log/pods`, `/var/log/containers`, `/run/containerd`,
//!   `/var/lib/caracal`, `/run/caracal`, and a bpf filesystem of its own on `/sys/fs/bpf`. The kubelet's
//!   volume mounts and the containers' root filesystems live in that namespace and end with it. The
//!   host needs the mount points to exist (empty directories, created once); nothing is mounted in the
//!   machine's own mount namespace. Not `ip netns exec`, which remounts `/sys` and leaves
//!   `/sys/fs/cgroup` empty.
//! - **Cgroups** (the machine has cgroup v1, with a v2 hierarchy beside it): the kubelet's `cgroupRoot` is
//!   `/caracal-lab/<node>` (driver `cgroupfs`), created beforehand in every hierarchy; containerd, its shims
//!   and the kubelet run in `/caracal-lab/<node>/runtime`. Stopping the node kills every process under
//!   `/caracal-lab/<node>` (the containers too, which outlive containerd) and removes the cgroups.
//! - **containerd** has its own configuration, root (`target/lab/nodes/<node>/containerd`), state and
//!   sockets (`/run/containerd`, the node's own), runc state root, and the CNI directories above; pod
//!   network namespaces are mounted under its state directory. NRI is off; the sandbox (pause) image is the
//!   lab's own, imported like every other image (`ctr images import`), never pulled.
//!
//! The kubelet's kernel sysctls: with `protectKernelDefaults: false` (the default) a kubelet sets
//! `vm.overcommit_memory=1`, `vm.panic_on_oom=0`, `kernel.panic=10`, `kernel.panic_on_oops=1` and the keys
//! limits on the machine; [`Sysctls`] records the machine's values first and puts them back when the last real
//! node stops.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::netns::NetNs;
use crate::pki::Pki;
use crate::process::{Lifetime, Supervised};

/// The paths a node's programs use that each real node has its own copy of (host path, directory under the
/// node's directory).
pub const NODE_PATHS: &[(&str, &str)] = &[
    ("/etc/cni/net.d", "etc-cni-net.d"),
    ("/opt/cni/bin", "opt-cni-bin"),
    ("/var/lib/kubelet", "kubelet"),
    ("/var/log/pods", "log/pods"),
    ("/var/log/containers", "log/containers"),
    ("/run/containerd", "run/containerd"),
    ("/var/lib/caracal", "var-lib-caracal"),
    ("/run/caracal", "run/caracal"),
];

/// The kernel settings a kubelet changes on its machine (and the values it sets).
pub const KUBELET_SYSCTLS: &[(&str, &str)] = &[
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// The machine's values of [`KUBELET_SYSCTLS`], put back when dropped.
#[derive(Debug)]
pub struct Sysctls(Vec<(PathBuf, String)>);

impl Sysctls {
    /// Records the current values.
    pub fn record() -> Self {
        Sysctls(
            KUBELET_SYSCTLS
                .iter()
                .filter_map(|(k, _)| {
                    let p = Path::new("/proc/sys").join(k);
                    std::fs::read_to_string(&p).ok().map(|v| (p, v.trim().to_owned()))
                })
                .collect(),
        )
    }
}

impl Drop for Sysctls {
    fn drop(&mut self) {
        for (p, v) in &self.0 {
            let _ = std::fs::write(p, v);
        }
    }
}

/// How to start a real node.
#[derive(Clone, Debug)]
pub struct RealNodeConfig {
    /// The Node name (the kubelet registers it).
    pub name: String,
    /// The node's network namespace.
    pub netns: String,
    /// The node's underlay address (`--node-ip`; the API server reaches the kubelet there).
    pub ip: Ipv4Addr,
    /// The node's directory (`target/lab/nodes/<node>`).
    pub dir: PathBuf,
    /// The API server's port on the node's 127.0.0.1 (the lab's forwarder).
    pub api_port: u16,
    /// The control plane's PKI (the kubelet's client and serving certificates are signed by its CA).
    pub pki: Pki,
    /// Where kubelet, containerd, its shim, ctr and runc are (`make runtime`: `target/runtime/bin`).
    pub bin: PathBuf,
}

/// The directory `make runtime` builds into.
pub fn runtime_bin() -> PathBuf {
    crate::controlplane::binary_from_env(
        "CARACAL_RUNTIME_BIN",
        crate::controlplane::workspace_root().join("target/runtime/bin"),
    )
}

/// The cgroup hierarchies of this machine (`/sys/fs/cgroup/<name>`: the v1 controllers, the named
/// `systemd` hierarchy and the v2 `unified` one).
fn hierarchies() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    out.sort();
    out
}

/// Creates `rel` (e.g. `caracal-lab/node/runtime`) in every hierarchy; in cpuset's, each level takes its
/// parent's CPUs and memory nodes (a v1 cpuset with none takes no task).
fn make_cgroup(rel: &str) -> anyhow::Result<()> {
    for h in hierarchies() {
        let mut dir = h.clone();
        for part in rel.split('/') {
            let parent = dir.clone();
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .with_context(|| format!("creating the cgroup {}", dir.display()))?;
            }
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(v) = std::fs::read_to_string(parent.join(f))
                    && std::fs::read_to_string(dir.join(f)).is_ok_and(|c| c.trim().is_empty())
                {
                    std::fs::write(dir.join(f), v.trim())
                        .with_context(|| format!("writing {}", dir.join(f).display()))?;
                }
            }
        }
    }
    Ok(())
}

/// Every process in `rel` or below, in any hierarchy.
fn cgroup_pids(rel: &str) -> Vec<i32> {
    fn walk(dir: &Path, out: &mut Vec<i32>) {
        if let Ok(t) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    for h in hierarchies() {
        walk(&h.join(rel), &mut out);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Removes `rel` and everything below it in every hierarchy (deepest first; a cgroup with processes left
/// stays).
fn remove_cgroup(rel: &str) {
    fn walk(dir: &Path) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path());
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    for h in hierarchies() {
        walk(&h.join(rel));
    }
}

/// Kills every process under the cgroup `rel` until none is left (or `deadline` passes).
fn kill_cgroup(rel: &str, deadline: Duration) {
    let start = Instant::now();
    loop {
        let pids = cgroup_pids(rel);
        if pids.is_empty() || start.elapsed() > deadline {
            return;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running real node (dropping it stops the kubelet, containerd and every container, and removes its
/// cgroups).
#[derive(Debug)]
pub struct RealNode {
    cfg: RealNodeConfig,
    cgroup: String,
    /// The node's mount namespace (the holder's).
    mnt: PathBuf,
    holder: Supervised,
    containerd: Supervised,
    kubelet: Option<Supervised>,
}

/// The shell commands that move the shell itself (`$$`) into the cgroup `rel` in every hierarchy.
fn move_into(rel: &str) -> String {
    hierarchies()
        .iter()
        .map(|h| format!("echo $$ > {}", h.join(rel).join("cgroup.procs").display()))
        .collect::<Vec<_>>()
        .join(" && ")
}

/// Starts `program` (from the runtime's directory) on the node, logging to `<node dir>/<program>.log`: a shell
/// moves itself into the node's `runtime` cgroup in every hierarchy, then `nsenter` enters the node's mount
/// namespace (`mnt`) and network namespace and executes the program, with the runtime's directory first on
/// `PATH` (containerd finds its shim and runc there).
fn spawn_in_node(
    cfg: &RealNodeConfig,
    cgroup: &str,
    mnt: &Path,
    program: &str,
    args: &[String],
) -> anyhow::Result<Supervised> {
    let mut wrapped = vec![
        "-c".to_owned(),
        format!("{} && exec \"$@\"", move_into(&format!("{cgroup}/runtime"))),
        "sh".to_owned(),
        "nsenter".to_owned(),
        format!("--mount={}", mnt.display()),
        format!("--net=/run/netns/{}", cfg.netns),
        "--".to_owned(),
        cfg.bin.join(program).display().to_string(),
    ];
    wrapped.extend(args.iter().cloned());
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        cfg.bin.display()
    );
    Ok(Supervised::spawn_env(
        &format!("{}-{program}", cfg.name),
        Path::new("/bin/sh"),
        &wrapped,
        &[("PATH".into(), path)],
        &cfg.dir.join(format!("{program}.log")),
        Lifetime::Attached,
    )?)
}

impl RealNode {
    /// Starts the node's mount namespace, containerd and (once containerd answers) nothing else: import the
    /// images with [`RealNode::import`], then [`RealNode::start_kubelet`].
    pub fn start(cfg: RealNodeConfig) -> anyhow::Result<Self> {
        let dir = &cfg.dir;
        std::fs::create_dir_all(dir)?;
        for tool in ["kubelet", "containerd", "containerd-shim-runc-v2", "ctr", "runc"] {
            if !cfg.bin.join(tool).exists() {
                bail!("{} is missing: run `make runtime`", cfg.bin.join(tool).display());
            }
        }
        let cgroup = format!("caracal-lab/{}", cfg.name);
        // A node left by an earlier run that did not stop (killed lab): its processes and cgroups go first.
        kill_cgroup(&cgroup, Duration::from_secs(10));
        remove_cgroup(&cgroup);
        make_cgroup(&format!("{cgroup}/runtime"))?;

        // The node's mount namespace: its directories over the node paths, its own bpf filesystem.
        let mut script = vec!["set -e".to_owned()];
        for (host, own) in NODE_PATHS {
            let own = dir.join(own);
            std::fs::create_dir_all(&own)?;
            std::fs::create_dir_all(host).with_context(|| format!("creating the mount point {host}"))?;
            script.push(format!("mount --bind '{}' '{host}'", own.display()));
        }
        script.push("mount -t bpf bpf /sys/fs/bpf".to_owned());
        script.push("exec sleep infinity".to_owned());
        let holder_args = in_node_holder(&cgroup, &script.join("\n"));
        let mut holder = Supervised::spawn(
            &format!("{}-mounts", cfg.name),
            Path::new("/bin/sh"),
            &holder_args,
            &dir.join("mounts.log"),
            Lifetime::Attached,
        )?;
        let pid = holder.pid().context("the mount namespace holder's pid")?;
        let mnt = PathBuf::from(format!("/proc/{pid}/ns/mnt"));
        // The holder has mounted everything once `sleep` runs (its command line says so). The command line
        // reads empty for a moment while the holder execs (the new image's arguments are not set up yet), so
        // only the process's exit, not an empty read, means it failed.
        let start = Instant::now();
        loop {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with(b"sleep") {
                break;
            }
            if start.elapsed() > Duration::from_secs(10) || holder.exited() {
                bail!(
                    "the node's mount namespace did not come up: {}",
                    std::fs::read_to_string(dir.join("mounts.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }

        let cd_dir = dir.join("containerd");
        std::fs::create_dir_all(&cd_dir)?;
        let config = cd_dir.join("config.toml");
        std::fs::write(&config, containerd_config(&cd_dir, &cfg.bin))?;
        let containerd = spawn_in_node(
            &cfg,
            &cgroup,
            &mnt,
            "containerd",
            &["--config".into(), config.display().to_string()],
        )?;
        let mut node = RealNode {
            cfg,
            cgroup,
            mnt,
            holder,
            containerd,
            kubelet: None,
        };
        node.wait_containerd(Duration::from_secs(60))?;
        Ok(node)
    }

    /// The node's containerd socket as the machine sees it (the node's `/run/containerd` is its directory).
    pub fn socket(&self) -> PathBuf {
        self.cfg.dir.join("run/containerd/containerd.sock")
    }

    /// `ctr` against this node's containerd, in the `k8s.io` namespace the kubelet's pods use.
    pub fn ctr(&self) -> std::process::Command {
        let mut c = std::process::Command::new(self.cfg.bin.join("ctr"));
        c.arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"]);
        c
    }

    fn wait_containerd(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok(o) = self.ctr().args(["version"]).output()
                && o.status.success()
            {
                return Ok(());
            }
            if let Err(e) = self.containerd.check_running() {
                bail!(
                    "containerd on {}: {e}\n{}",
                    self.cfg.name,
                    self.containerd.log_tail(30)
                );
            }
            if start.elapsed() > deadline {
                bail!(
                    "containerd on {} did not answer within {deadline:?}\n{}",
                    self.cfg.name,
                    self.containerd.log_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Imports an image archive (`make images`: `target/images/<image>.oci.tar`) into the node's containerd,
    /// unpacked for the overlay snapshotter the kubelet's pods use, and names it also by its digest
    /// (`<repository>@<digest>`, as a pull by digest would): the CRI resolves a pod's `name@sha256:…` image
    /// (the operator's rendering with an ImageSet) only through such a name.
    pub fn import(&self, archive: &Path, reference: &str, digest: &str) -> anyhow::Result<()> {
        let out = self
            .ctr()
            .args(["images", "import", "--snapshotter", "overlayfs", "--local"])
            .arg(archive)
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr images import {} on {}: {}",
                archive.display(),
                self.cfg.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let repository = reference.rsplit_once(':').map_or(reference, |(r, _)| r);
        let out = self
            .ctr()
            .args([
                "images",
                "tag",
                "--force",
                reference,
                &format!("{repository}@{digest}"),
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "ctr images tag {reference} by its digest on {}: {}",
                self.cfg.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts the kubelet: it registers the Node and runs what the API server binds to it.
    pub fn start_kubelet(&mut self) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let kdir = cfg.dir.join("kubelet-config");
        std::fs::create_dir_all(&kdir)?;
        let (cert, key) =
            crate::pki::client_cert(&cfg.pki, &format!("system:node:{}", cfg.name), "system:nodes")?;
        let (scert, skey) = crate::pki::serving_cert(&cfg.pki, &cfg.name, &[IpAddr::V4(cfg.ip)])?;
        for (f, pem) in [
            ("client.crt", &cert),
            ("client.key", &key),
            ("serving.crt", &scert),
            ("serving.key", &skey),
        ] {
            std::fs::write(kdir.join(f), pem)?;
        }
        let kubeconfig = kdir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            serde_yaml::to_string(&serde_json::json!({
                "apiVersion": "v1", "kind": "Config",
                "clusters": [{"name": "lab", "cluster": {
                    "server": format!("https://127.0.0.1:{}", cfg.api_port),
                    "certificate-authority": cfg.pki.ca_cert}}],
                "users": [{"name": "kubelet", "user": {
                    "client-certificate": kdir.join("client.crt"), "client-key": kdir.join("client.key")}}],
                "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "kubelet"}}],
                "current-context": "lab",
            }))?,
        )?;
        let config = kdir.join("config.yaml");
        std::fs::write(
            &config,
            kubelet_config(&self.cgroup, cfg.ip, &kdir, &cfg.pki.ca_cert),
        )?;
        self.kubelet = Some(spawn_in_node(
            cfg,
            &self.cgroup,
            &self.mnt,
            "kubelet",
            &[
                format!("--config={}", config.display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--hostname-override={}", cfg.name),
                format!("--node-ip={}", cfg.ip),
                "--v=1".into(),
            ],
        )?);
        Ok(())
    }

    /// Whether the kubelet and containerd still run (an error names the one that stopped, with its log's
    /// end).
    pub fn check_running(&mut self) -> Result<(), String> {
        self.containerd
            .check_running()
            .map_err(|e| format!("{e}\n{}", self.containerd.log_tail(20)))?;
        if let Some(k) = self.kubelet.as_mut() {
            k.check_running()
                .map_err(|e| format!("{e}\n{}", k.log_tail(20)))?;
        }
        Ok(())
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The node's network namespace.
    pub fn netns(&self) -> NetNs {
        NetNs::existing(&self.cfg.netns)
    }
}

/// The network namespace of the pod with `uid` on the real node `node`, as a path any process can enter
/// (`/proc/PID/ns/net` of a process in the pod's cgroup, `/caracal-lab/<node>/kubepods/.../pod<uid>`), or
/// None while the pod has no process.
pub fn pod_netns(node: &str, uid: &str) -> Option<String> {
    fn find(dir: &Path, want: &str) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if e.file_name().to_str() == Some(want) {
                return Some(e.path());
            }
            if let Some(p) = find(&e.path(), want) {
                return Some(p);
            }
        }
        None
    }
    let pids = Path::new("/sys/fs/cgroup/pids");
    let pod = find(
        &pids.join(format!("caracal-lab/{node}/kubepods")),
        &format!("pod{uid}"),
    )?;
    let rel = pod.strip_prefix(pids).ok()?.to_str()?.to_owned();
    cgroup_pids(&rel)
        .into_iter()
        .map(|p| format!("/proc/{p}/ns/net"))
        .find(|p| Path::new(p).exists())
}

/// The holder's arguments: into the node's runtime cgroup, then `unshare --mount --propagation private` of
/// `script` (which mounts and then becomes `sleep infinity`).
fn in_node_holder(cgroup: &str, script: &str) -> Vec<String> {
    vec![
        "-c".to_owned(),
        format!(
            "{} && exec unshare --mount --propagation private -- sh -c \"$1\"",
            move_into(&format!("{cgroup}/runtime"))
        ),
        "sh".to_owned(),
        script.to_owned(),
    ]
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if let Some(mut k) = self.kubelet.take() {
            k.stop(Duration::from_secs(5));
        }
        self.containerd.stop(Duration::from_secs(5));
        kill_cgroup(&self.cgroup, Duration::from_secs(20));
        self.holder.stop(Duration::from_secs(1));
        remove_cgroup(&self.cgroup);
        // The shared parent goes with the last node (a node still running keeps it).
        for h in hierarchies() {
            let _ = std::fs::remove_dir(h.join("caracal-lab"));
        }
    }
}

/// containerd's configuration (version 4, containerd 2.3's) for a node whose containerd directory is `dir`: root there; state
/// and sockets in the node's `/run/containerd`; the CRI plugin with runc (cgroupfs, state under the node's
/// run directory), the overlay snapshotter, the CNI directories (the pods' loopback brought up by containerd
/// itself, not by a `loopback` plugin binary Caracal does not install), pod network namespaces under the state
/// directory, and the lab's pause image as the sandbox image; NRI and the snapshotters that cannot work here
/// off.
pub fn containerd_config(dir: &Path, bin: &Path) -> String {
    let root = dir.join("root");
    let runc = bin.join("runc");
    format!(
        r#"version = 4
root = "{root}"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "/run/containerd/containerd.sock"

[ttrpc]
  address = "/run/containerd/containerd.sock.ttrpc"

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "{pause}"

  [plugins.'io.containerd.cri.v1.runtime']
    enable_selinux = false
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = "runc"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = "{runc}"
          Root = "/run/containerd/runc"
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["/opt/cni/bin"]
      conf_dir = "/etc/cni/net.d"
      max_conf_num = 1
      use_internal_loopback = true

  [plugins.'io.containerd.grpc.v1.cri']
    disable_tcp_service = true
"#,
        root = root.display(),
        runc = runc.display(),
        pause = PAUSE_IMAGE,
    )
}

/// The sandbox image (`make images` builds it; the kubelet's pods use it through containerd's pinned
/// sandbox image).
pub const PAUSE_IMAGE: &str = concat!("docker.io/caracal/pause:v", env!("CARGO_PKG_VERSION"));

/// The kubelet's configuration: cgroupfs under `cgroup`, serving on the node's address with a certificate the
/// API server verifies, no swap or cgroup v1 refusal, no image garbage collection or disk eviction (the
/// images are imported, never pulled), no DNS (the lab has none), logs in the node's `/var/log/pods`.
pub fn kubelet_config(cgroup: &str, ip: Ipv4Addr, dir: &Path, ca: &Path) -> String {
    let v = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": ip.to_string(),
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": dir.join("serving.crt"),
        "tlsPrivateKeyFile": dir.join("serving.key"),
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": false},
            "x509": {"clientCAFile": ca},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/{cgroup}"),
        "cgroupsPerQOS": true,
        "enforceNodeAllocatable": ["pods"],
        "failSwapOn": false,
        "failCgroupV1": false,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "resolvConf": "",
        "oomScoreAdj": 0,
        "podLogsDir": "/var/log/pods",
        "protectKernelDefaults": false,
        "serializeImagePulls": false,
        "registerNode": true,
        "maxPods": 110,
        "shutdownGracePeriod": "0s",
    });
    serde_yaml::to_string(&v).unwrap_or_default()
}
