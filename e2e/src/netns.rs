//! Network namespaces for kernel-tier tests and the lab: a guard that creates a namespace and deletes it on
//! drop, helpers that wire a "pod" namespace to a "node" namespace with a veth pair, and a way to run code
//! (open sockets) inside a namespace. Every packet stays inside namespaces the test created.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::CloneFlags;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Errors setting namespaces up.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// Entering a namespace failed.
    #[error("entering netns {0}: {1}")]
    Enter(String, String),
}

/// Runs a command, failing with its stderr.
pub fn run(args: &[&str]) -> Result<String, NetnsError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| NetnsError::Command {
            command: args.join(" "),
            stderr: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// Created here, so deleted on drop (false for [`NetNs::existing`]).
    owned: bool,
}

/// Deletes the namespaces [`NetNs::new`] made in processes that are gone (`crct-<tag>-<pid>-<n>` whose pid
/// runs nothing): a test or lab killed before its guards ran (SIGKILL, a timeout) leaves its namespaces, their
/// links and rules behind. A pid that runs something, perhaps a later process that reused it, keeps its
/// namespaces: the cleanup errs on the side of leaving them.
pub fn remove_orphans() {
    for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = creator(&name)
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = run(&["ip", "netns", "del", &name]);
        }
    }
}

/// The pid of the process that made the namespace `name` (`crct-<tag>-<pid>-<n>`), or None for a name of
/// another form.
fn creator(name: &str) -> Option<u32> {
    let mut parts = name.strip_prefix("crct-")?.rsplitn(3, '-');
    let (n, pid, _tag) = (parts.next()?, parts.next()?, parts.next()?);
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_creator_is_read_from_names_new_makes_and_no_other() {
        assert_eq!(super::creator("crct-lab0-846-1"), Some(846));
        assert_eq!(super::creator("crct-lpod-12-3-40"), Some(3));
        assert_eq!(super::creator("crct-ul-846"), None);
        assert_eq!(super::creator("cni-1234-5678"), None);
        assert_eq!(super::creator("crct-x-y-1"), None);
    }
}

impl NetNs {
    /// Creates `crct-<tag>-<pid>-<n>` with loopback up.
    pub fn new(tag: &str) -> Result<Self, NetnsError> {
        let name = format!(
            "crct-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name])?;
        let ns = NetNs { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A namespace someone else created and will delete (a lab pod's, from another process).
    pub fn existing(name: &str) -> Self {
        NetNs {
            name: name.to_owned(),
            owned: false,
        }
    }

    /// Its name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend(args);
        run(&all)
    }

    /// Runs a program inside the namespace: `ip netns exec NAME ARGS...`.
    pub fn exec(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend(args);
        run(&all)
    }

    /// The prefix that runs a program inside the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.name.clone()]
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        self.exec(&["sysctl", "-q", "-w", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// Runs `f` on a thread that has entered the namespace; sockets it opens stay in the namespace. A name
    /// that is an absolute path is the namespace's file itself (a real node's pod: `/proc/PID/ns/net`).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        let path = if self.name.starts_with('/') {
            self.name.clone()
        } else {
            format!("/run/netns/{}", self.name)
        };
        let name = self.name.clone();
        std::thread::spawn(move || {
            let file =
                std::fs::File::open(&path).map_err(|e| NetnsError::Enter(name.clone(), e.to_string()))?;
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetnsError::Enter(name.clone(), e.to_string()))?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetnsError::Enter(self.name.clone(), "thread panicked".into()))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// A pod: its namespace, its address, and the host side of its veth in the node namespace.
#[derive(Debug)]
pub struct Pod {
    /// The pod's namespace (eth0 inside).
    pub ns: NetNs,
    /// Its IPv4 address.
    pub ip: std::net::Ipv4Addr,
    /// The host-side interface in the node namespace.
    pub iface: String,
}

/// Wires a pod namespace to `node` the way Caracal's CNI plugin does: a veth (`iface` on the node, `eth0` in
/// the pod), the pod's /32 with a default route via the link-local gateway 169.254.1.1, and a /32 route on the
/// node. The node side answers for the gateway address.
pub fn wire_pod(node: &NetNs, tag: &str, iface: &str, ip: std::net::Ipv4Addr) -> Result<Pod, NetnsError> {
    let ns = NetNs::new(tag)?;
    node.ip(&[
        "link",
        "add",
        iface,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    node.ip(&["link", "set", iface, "up"])?;
    node.ip(&["addr", "add", "169.254.1.1/32", "dev", iface])?;
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", iface])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    ns.ip(&["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
    ns.ip(&["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
    Ok(Pod {
        ns,
        ip,
        iface: iface.to_owned(),
    })
}

/// A node namespace that forwards between its pods.
pub fn node(tag: &str) -> Result<NetNs, NetnsError> {
    let ns = NetNs::new(tag)?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    Ok(ns)
}

/// The underlay: a namespace holding a bridge (`br0`, with the network's first address) that node
/// namespaces are attached to, as hosts on one L2 segment. Nothing in it routes anywhere else, so every
/// packet stays inside namespaces the test created.
#[derive(Debug)]
pub struct Underlay {
    /// The namespace holding the bridge.
    pub ns: NetNs,
    /// The underlay network (e.g. 10.99.0.0/24); the bridge holds its first address.
    pub net: ipnet::Ipv4Net,
    links: AtomicU32,
}

impl Underlay {
    /// A new underlay on `net`.
    pub fn new(net: ipnet::Ipv4Net) -> Result<Self, NetnsError> {
        let ns = NetNs::new("ul")?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        let gw = net.hosts().next().unwrap_or(net.addr());
        ns.ip(&["addr", "add", &format!("{gw}/{}", net.prefix_len()), "dev", "br0"])?;
        Ok(Underlay {
            ns,
            net,
            links: AtomicU32::new(0),
        })
    }

    /// The bridge's address (nodes' default gateway).
    pub fn gateway(&self) -> std::net::Ipv4Addr {
        self.net.hosts().next().unwrap_or(self.net.addr())
    }

    /// Links the machine's own namespace into the underlay (a veth named `iface`, address `host`): the one
    /// link into the underlay the lab allows itself, for the API server, which dials a real node's kubelet (`logs`, `exec`) and
    /// the operator's webhook on a node. Only the underlay's own subnet is routed through it; it goes with the
    /// underlay's namespace.
    pub fn host_link(&self, iface: &str, host: std::net::Ipv4Addr) -> Result<(), NetnsError> {
        let n = self.links.fetch_add(1, Ordering::Relaxed);
        let port = format!("ul{n}");
        let _ = run(&["ip", "link", "del", iface]);
        run(&[
            "ip",
            "link",
            "add",
            iface,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            self.ns.name(),
        ])?;
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host}/{}", self.net.prefix_len()),
            "dev",
            iface,
        ])?;
        run(&["ip", "link", "set", iface, "up"])?;
        Ok(())
    }

    /// Attaches `node` as `iface` with address `host` (an address of the underlay network), and a default
    /// route via the bridge (proxy ARP for pods' link-local gateway needs one).
    pub fn attach(&self, node: &NetNs, iface: &str, host: std::net::Ipv4Addr) -> Result<(), NetnsError> {
        let n = self.links.fetch_add(1, Ordering::Relaxed);
        let port = format!("ul{n}");
        self.ns.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            iface,
            "netns",
            node.name(),
        ])?;
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{host}/{}", self.net.prefix_len()),
            "dev",
            iface,
        ])?;
        node.ip(&["link", "set", iface, "up"])?;
        node.ip(&[
            "route",
            "replace",
            "default",
            "via",
            &self.gateway().to_string(),
            "dev",
            iface,
        ])?;
        Ok(())
    }
}

/// Mounts a bpf filesystem on `dir` unless one is there already (a lab node's stand-in for the host's
/// `/sys/fs/bpf`; it lives in the machine's mount namespace, so pins outlive the processes that made them).
pub fn mount_bpffs(dir: &std::path::Path) -> std::io::Result<()> {
    mount_once(dir, "bpf", nix::sys::statfs::BPF_FS_MAGIC)
}

/// Mounts the machine's cgroup v2 hierarchy on `dir` (another mount of the one hierarchy) unless one is
/// there already.
pub fn mount_cgroup2(dir: &std::path::Path) -> std::io::Result<()> {
    mount_once(dir, "cgroup2", nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Mounts a filesystem of type `fstype` on `dir` unless `dir` already is one (`magic`).
fn mount_once(dir: &std::path::Path, fstype: &str, magic: nix::sys::statfs::FsType) -> std::io::Result<()> {
    if nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type() == magic) {
        return Ok(());
    }
    nix::mount::mount(
        Some(fstype),
        dir,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(std::io::Error::from)
}

/// Unmounts every bpffs and cgroup2 mounted at or under `root` (what [`mount_bpffs`] and [`mount_cgroup2`]
/// mounted for a lab's nodes), so their pins go and the directories can be removed.
pub fn unmount_node_filesystems_under(root: &std::path::Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for l in mounts.lines() {
        let mut f = l.split_whitespace();
        let (Some(_), Some(at), Some("bpf" | "cgroup2")) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if std::path::Path::new(at).starts_with(root) {
            let _ = nix::mount::umount2(at, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
