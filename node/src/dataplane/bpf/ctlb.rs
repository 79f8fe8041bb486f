//! Connect-time load balancing (docs/bpf.md, "Connect-time load balancing"): the socket programs of
//! `policy.c` (`ctlb_connect4`, `ctlb_getpeername4`) on the node's cgroup (v2), and the network namespaces
//! they act for.
//!
//! A TCP socket that connects to a Service's frontend gets a backend at `connect()`, so its packets carry
//! the backend from the first SYN on: no per-packet rewrite, no translation entries in the tracker. The
//! programs act only for sockets of a namespace registered in `caracal_ctlb_ns_v1`, by its cookie: the
//! node's own ([`register`] with [`CTLB_HOST`], by the Service manager) and each local pod's (by the BPF data
//! plane when it programs the pod's endpoint, from the cookie the CNI wiring [`record`]ed when it wired the
//! pod, in any data plane mode, so pods wired before a switch to BPF are registered too). Everything else
//! is left to the TC programs, which translate per packet as before.
//!
//! The registration is what keeps the programs to their node in the lab, where every node is a namespace
//! of one machine and all share its cgroup root; on a real node it also leaves alone namespaces Caracal did
//! not wire.

use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData};

use super::{BpfError, Loaded, absent_ok, map_error, pin_replacing, sys};

/// Where the socket programs' links are pinned, under the pin directory.
pub const LINKS: &str = "cgroup-links";

/// The socket programs: name in the object, cgroup attach type.
pub const SOCKET_HOOKS: [(&str, u32); 2] = [
    ("ctlb_connect4", sys::CGROUP_INET4_CONNECT),
    ("ctlb_getpeername4", sys::CGROUP_INET4_GETPEERNAME),
];

/// The namespaces the socket programs act for, by cookie.
pub const MAP_NS: &str = "caracal_ctlb_ns_v1";

/// A registration's flag: the node's own namespace (its connections to its own address are translated too).
pub const CTLB_HOST: u32 = 1;

/// `struct ctlb_ns`: a registered namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NsEntry {
    /// The pod's IPv4 address (the node's, with [`CTLB_HOST`]), network order: the client sessionAffinity
    /// keys on, and the address a pod's own Service hairpin is recognised by.
    pub addr: [u8; 4],
    /// `CTLB_*`.
    pub flags: u32,
    /// The pod's host-side interface (0 for the node): which endpoint the registration belongs to.
    pub ifindex: u32,
    /// Layout padding.
    pub pad: u32,
}

/// The cookie of the calling thread's network namespace.
pub fn this_netns_cookie() -> std::io::Result<u64> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let s = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)?;
    sys::netns_cookie(s.as_fd())
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a host with cgroup v2 alone,
/// `/sys/fs/cgroup/unified` beside v1), from this process's mount table.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    table.lines().find_map(|line| {
        // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS`
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split(' ').next()?;
        let mut fields = left.split(' ');
        let root = fields.nth(3)?;
        let mountpoint = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(mountpoint))
    })
}

/// The cgroup v2 hierarchy at `path` (the host's `/sys/fs/cgroup` mounted into the agent's container): the
/// path itself when it is a cgroup2 mount (a host with cgroup v2 alone), else its `unified` (v2 beside v1).
pub fn cgroup2_root(path: &Path) -> Option<PathBuf> {
    let is_cgroup2 = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
    };
    [path.to_path_buf(), path.join("unified")]
        .into_iter()
        .find(|p| is_cgroup2(p))
}

/// Attaches the socket programs pinned under `dir` to the cgroup (v2) at `cgroup`, beside anything else
/// there, and pins the links under [`LINKS`]. Links already pinned (an earlier run's) get the pinned programs
/// in place, atomically. False when the programs are not pinned (the data plane has not loaded yet).
pub fn attach_sockets(dir: &Path, cgroup: &Path) -> Result<bool, BpfError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BpfError::Io { path, source }
    };
    let links = dir.join(LINKS);
    std::fs::create_dir_all(&links).map_err(io(&links))?;
    for (name, attach_type) in SOCKET_HOOKS {
        let prog_path = dir.join("progs").join(name);
        let prog = match sys::obj_get(&prog_path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(&prog_path)(e)),
        };
        let path = links.join(name);
        if let Ok(link) = sys::obj_get(&path) {
            // A link whose cgroup went away cannot be updated: it is made again below.
            if sys::link_update(link.as_fd(), prog.as_fd()).is_ok() {
                continue;
            }
        }
        let cg = std::fs::File::open(cgroup).map_err(io(cgroup))?;
        let link =
            sys::cgroup_link_create(prog.as_fd(), cg.as_fd(), attach_type).map_err(|e| BpfError::Attach {
                what: "attaching a socket program to the cgroup",
                iface: cgroup.display().to_string(),
                reason: format!("{name}: {e}"),
            })?;
        pin_replacing(link.as_fd(), &path).map_err(io(&path))?;
    }
    Ok(true)
}

/// Detaches the socket programs (connect-time load balancing off: the TC programs translate every
/// connection). Absent is fine.
pub fn detach_sockets(dir: &Path) -> Result<(), BpfError> {
    for (name, _) in SOCKET_HOOKS {
        super::detach_pinned(&dir.join(LINKS).join(name))?;
    }
    Ok(())
}

fn open(dir: &Path) -> Result<HashMap<MapData, u64, NsEntry>, BpfError> {
    let data = MapData::from_pin(dir.join(MAP_NS)).map_err(|e| map_error(MAP_NS, e))?;
    HashMap::try_from(Map::HashMap(data)).map_err(|e| map_error(MAP_NS, e))
}

/// Registers the namespace with cookie `cookie` in the map pinned under `dir`.
pub fn register(dir: &Path, cookie: u64, entry: NsEntry) -> Result<(), BpfError> {
    open(dir)?
        .insert(cookie, entry, 0)
        .map_err(|e| map_error(MAP_NS, e))
}

/// Every registration in the map pinned under `dir`.
pub fn registered(dir: &Path) -> Result<Vec<(u64, NsEntry)>, BpfError> {
    Ok(open(dir)?.iter().filter_map(Result::ok).collect())
}

impl Loaded {
    /// Registers a namespace (see [`register`]).
    pub fn register_netns(&mut self, cookie: u64, entry: NsEntry) -> Result<(), BpfError> {
        self.hash::<u64, NsEntry>(MAP_NS)?
            .insert(cookie, entry, 0)
            .map_err(|e| map_error(MAP_NS, e))
    }

    /// Removes a namespace's registration. Absent is fine.
    pub fn unregister_netns(&mut self, cookie: u64) -> Result<(), BpfError> {
        absent_ok(MAP_NS, self.hash::<u64, NsEntry>(MAP_NS)?.remove(&cookie))
    }

    /// Every registration.
    pub fn netns_entries(&mut self) -> Result<Vec<(u64, NsEntry)>, BpfError> {
        Ok(self
            .hash::<u64, NsEntry>(MAP_NS)?
            .iter()
            .filter_map(Result::ok)
            .collect())
    }
}

/// This boot's id: a recorded cookie is only good for the boot it was read in (cookies count from 1 again
/// after a reboot).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Records, under `dir`, the cookie of the namespace of the pod wired to host interface `iface` (one file per
/// interface: the boot id and the cookie).
pub fn record(dir: &Path, iface: &str, cookie: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{iface}.tmp"));
    std::fs::write(&tmp, format!("{} {cookie}\n", boot_id()))?;
    std::fs::rename(&tmp, dir.join(iface))
}

/// The cookie recorded for `iface`, if one was in this boot.
pub fn recorded(dir: &Path, iface: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(iface)).ok()?;
    let (boot, cookie) = text.trim().split_once(' ')?;
    (boot == boot_id()).then(|| cookie.parse().ok())?
}

/// Forgets the record of `iface`. Absent is fine.
pub fn forget(dir: &Path, iface: &str) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(iface)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_read_back_in_the_same_boot_and_not_after_another() {
        let dir = std::env::temp_dir().join(format!("caracal-ctlb-{}", std::process::id()));
        record(&dir, "crc0123", 4242).expect("record");
        assert_eq!(recorded(&dir, "crc0123"), Some(4242));
        assert_eq!(recorded(&dir, "crc9999"), None);
        std::fs::write(dir.join("crc0123"), "another-boot 4242\n").expect("write");
        assert_eq!(recorded(&dir, "crc0123"), None);
        forget(&dir, "crc0123").expect("forget");
        forget(&dir, "crc0123").expect("forget twice");
        assert!(!dir.join("crc0123").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_cgroup2_mount_is_found_in_the_mount_table() {
        // This machine mounts cgroup v2 (beside v1 or alone); the path found is a cgroup2 root.
        let found = cgroup2_mount().expect("a cgroup2 mount");
        assert!(found.join("cgroup.procs").exists(), "{}", found.display());
    }

    #[test]
    fn the_cgroup2_root_is_found_beside_v1_or_alone() {
        let mounted = cgroup2_mount().expect("a cgroup2 mount");
        assert_eq!(cgroup2_root(&mounted), Some(mounted.clone()));
        if let Some(parent) = mounted.parent().filter(|_| mounted.ends_with("unified")) {
            assert_eq!(cgroup2_root(parent), Some(mounted.clone()), "v2 beside v1");
        }
        assert_eq!(cgroup2_root(Path::new("/proc")), None);
    }

    #[test]
    fn the_namespace_cookie_differs_between_namespaces() {
        let here = this_netns_cookie().expect("cookie");
        assert_ne!(here, 0);
        assert_eq!(this_netns_cookie().expect("again"), here);
        let other = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            this_netns_cookie().expect("cookie")
        })
        .join()
        .expect("thread");
        assert_ne!(other, here);
    }
}
