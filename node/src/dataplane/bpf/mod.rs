//! The BPF policy data plane's kernel side: the programs of `node/bpf/policy.c` (built by `build.rs`),
//! loaded with aya, their maps pinned under [`PIN_DIR`], attached to pods' host-side veths with TCX links
//! that are pinned too, so a restarted agent adopts what it finds (see docs/bpf.md).
//!
//! What is here: loading (maps reused from their pins), attaching and detaching per interface (an attached
//! link whose program is replaced atomically on restart), the endpoint map (an interface without an entry
//! drops everything: fail closed), the connection tracker and per-endpoint counters. The policy tables that
//! turn the model's tiers into per-field lookups are the next step; until then an endpoint entry carries one
//! verdict per direction for new flows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuHashMap};
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

/// Where Caracal pins its BPF objects.
pub const PIN_DIR: &str = "/sys/fs/bpf/caracal";

/// The compiled programs (`node/bpf/policy.c`).
static POLICY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy.bpf.o"));

/// New flows the pod starts are allowed.
pub const EP_ALLOW_FROM: u32 = 1;
/// New flows toward the pod are allowed.
pub const EP_ALLOW_TO: u32 = 2;

/// An endpoint entry (`struct endpoint` in policy.c).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// `EP_*` flags.
    pub flags: u32,
    /// The policy generation new flows are evaluated against.
    pub generation: u32,
}

/// Per endpoint and direction (`struct counters` in policy.c).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets passed.
    pub allowed: u64,
    /// Packets dropped.
    pub dropped: u64,
}

#[expect(
    unsafe_code,
    reason = "aya reads map values as plain bytes: the types must be plain old data"
)]
mod pod {
    // SAFETY: both are repr(C) structs of integers without padding, valid for every bit pattern.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counters {}
}

/// Errors of the BPF data plane.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// Loading the object or a program failed (the verifier's log is in the message).
    #[error("loading the BPF programs: {0}")]
    Load(String),
    /// Attaching or detaching failed.
    #[error("{what} on {iface}: {reason}")]
    Attach {
        /// What was being done.
        what: &'static str,
        /// The interface.
        iface: String,
        /// Why it failed.
        reason: String,
    },
    /// A map operation failed.
    #[error("BPF map {map}: {reason}")]
    Map {
        /// The map.
        map: &'static str,
        /// Why.
        reason: String,
    },
    /// A file under the pin directory.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn load_error(e: impl std::fmt::Display) -> BpfError {
    BpfError::Load(e.to_string())
}

/// The programs and maps, loaded; maps shared through their pins with earlier runs.
pub struct Loaded {
    ebpf: Ebpf,
    dir: PathBuf,
}

/// The two hooks of an endpoint: the program, its TC direction, the pinned link's file name suffix.
const HOOKS: [(&str, TcAttachType, &str); 2] = [
    ("from_pod", TcAttachType::Ingress, "from"),
    ("to_pod", TcAttachType::Egress, "to"),
];

/// Makes sure `/sys/fs/bpf` is a bpffs (it is not mounted on every host, nor inside `ip netns exec`).
fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) {
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .map_err(|source| BpfError::Io {
                path: "/proc/self/mounts".into(),
                source,
            })?
            .lines()
            .any(|l| {
                let mut fields = l.split_whitespace().skip(1);
                fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
            });
        if !mounted {
            nix::mount::mount(
                Some("bpffs"),
                root,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| BpfError::Io {
                path: root.to_path_buf(),
                source: e.into(),
            })?;
        }
    }
    for d in [dir.to_path_buf(), dir.join("links")] {
        std::fs::create_dir_all(&d).map_err(|source| BpfError::Io { path: d, source })?;
    }
    Ok(())
}

impl Loaded {
    /// Loads the programs (each checked by the verifier) with their maps pinned under `dir` (reused when
    /// already pinned there).
    pub fn load(dir: &Path) -> Result<Self, BpfError> {
        ensure_bpffs(dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .load(POLICY_OBJECT)
            .map_err(load_error)?;
        for (name, _, _) in HOOKS {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| load_error(format!("no program {name} in the object")))?
                .try_into()
                .map_err(load_error)?;
            prog.load().map_err(load_error)?;
        }
        Ok(Self {
            ebpf,
            dir: dir.to_path_buf(),
        })
    }

    fn link_path(&self, iface: &str, suffix: &str) -> PathBuf {
        self.dir.join("links").join(format!("{iface}_{suffix}"))
    }

    /// Attaches both programs to `iface` (TCX, first in order) and pins the links. A link already pinned for
    /// it (an earlier run's) gets this run's program in place, atomically: no packet meets an interface
    /// without a program, and nothing is detached.
    pub fn attach(&mut self, iface: &str) -> Result<(), BpfError> {
        for (name, dir, suffix) in HOOKS {
            let path = self.link_path(iface, suffix);
            let attach_error = |what, e: &dyn std::fmt::Display| BpfError::Attach {
                what,
                iface: iface.to_owned(),
                reason: e.to_string(),
            };
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| load_error(format!("no program {name}")))?
                .try_into()
                .map_err(load_error)?;
            if path.exists() {
                let pinned =
                    PinnedLink::from_pin(&path).map_err(|e| attach_error("reading a pinned link", &e))?;
                let link = SchedClassifierLink::try_from(FdLink::from(pinned))
                    .map_err(|e| attach_error("adopting a pinned link", &e))?;
                let id = prog
                    .attach_to_link(link)
                    .map_err(|e| attach_error("replacing the program of a pinned link", &e))?;
                // The kernel keeps the link as long as its pin: this run's handle may go.
                let _ = prog.take_link(id);
                continue;
            }
            let id = prog
                .attach_with_options(iface, dir, TcAttachOptions::TcxOrder(LinkOrder::first()))
                .map_err(|e| attach_error("attaching", &e))?;
            let link = prog
                .take_link(id)
                .map_err(|e| attach_error("taking the link", &e))?;
            let fd: FdLink = link
                .try_into()
                .map_err(|e| attach_error("pinning the link", &e))?;
            fd.pin(&path).map_err(|e| attach_error("pinning the link", &e))?;
        }
        Ok(())
    }

    /// Detaches both programs from `iface` at once (the links are detached, then their pins removed; an
    /// unpinned link alone is released only after the kernel's deferred work). Absent is fine.
    pub fn detach(&mut self, iface: &str) -> Result<(), BpfError> {
        for (_, _, suffix) in HOOKS {
            detach_pinned(&self.link_path(iface, suffix))?;
        }
        Ok(())
    }

    /// How many TCX programs are attached to `iface` in each direction (ingress, egress), Caracal's or not,
    /// in the calling thread's network namespace.
    pub fn tcx_programs(iface: &str) -> Result<(usize, usize), BpfError> {
        let count = |dir| {
            SchedClassifier::query_tcx(iface, dir)
                .map(|(_, progs)| progs.len())
                .map_err(|e| BpfError::Attach {
                    what: "listing TCX programs",
                    iface: iface.to_owned(),
                    reason: e.to_string(),
                })
        };
        Ok((count(TcAttachType::Ingress)?, count(TcAttachType::Egress)?))
    }

    /// The interfaces with pinned links.
    pub fn attached(&self) -> Result<Vec<String>, BpfError> {
        let dir = self.dir.join("links");
        let mut out: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|source| BpfError::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.rsplit_once('_').map(|(iface, _)| iface.to_owned()))
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn endpoints(&mut self) -> Result<HashMap<&mut MapData, u32, Endpoint>, BpfError> {
        let map = self.ebpf.map_mut("caracal_ep_v1").ok_or_else(|| BpfError::Map {
            map: "caracal_ep_v1",
            reason: "not in the object".into(),
        })?;
        HashMap::try_from(map).map_err(|e| BpfError::Map {
            map: "caracal_ep_v1",
            reason: e.to_string(),
        })
    }

    /// Writes the entry of the interface with index `ifindex`: from here on its packets are no longer
    /// dropped for want of one.
    pub fn set_endpoint(&mut self, ifindex: u32, ep: Endpoint) -> Result<(), BpfError> {
        self.endpoints()?
            .insert(ifindex, ep, 0)
            .map_err(|e| BpfError::Map {
                map: "caracal_ep_v1",
                reason: e.to_string(),
            })
    }

    /// Removes the entry of `ifindex` (its packets are dropped again). Absent is fine.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), BpfError> {
        match self.endpoints()?.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(BpfError::Map {
                map: "caracal_ep_v1",
                reason: e.to_string(),
            }),
        }
    }

    /// Every endpoint entry, by ifindex.
    pub fn endpoint_entries(&mut self) -> Result<BTreeMap<u32, Endpoint>, BpfError> {
        Ok(self.endpoints()?.iter().filter_map(Result::ok).collect())
    }

    /// The counters of `ifindex`: (from the pod, to the pod), summed over CPUs.
    pub fn counters(&mut self, ifindex: u32) -> Result<(Counters, Counters), BpfError> {
        let map = self
            .ebpf
            .map_mut("caracal_counters_v1")
            .ok_or_else(|| BpfError::Map {
                map: "caracal_counters_v1",
                reason: "not in the object".into(),
            })?;
        let counters: PerCpuHashMap<&mut MapData, u32, Counters> =
            PerCpuHashMap::try_from(map).map_err(|e| BpfError::Map {
                map: "caracal_counters_v1",
                reason: e.to_string(),
            })?;
        let sum = |key: u32| {
            counters
                .get(&key, 0)
                .map(|per_cpu| {
                    per_cpu.iter().fold(Counters::default(), |a, c| Counters {
                        allowed: a.allowed + c.allowed,
                        dropped: a.dropped + c.dropped,
                    })
                })
                .unwrap_or_default()
        };
        Ok((sum(ifindex << 1), sum((ifindex << 1) | 1)))
    }
}

/// The bpf syscall's commands used here.
const BPF_OBJ_GET: libc::c_long = 7;
/// Detaches a link from its hook now, whoever else holds it.
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches the link pinned at `path` and removes the pin. Absent is fine.
fn detach_pinned(path: &Path) -> Result<(), BpfError> {
    if !path.exists() {
        return Ok(());
    }
    let io = |source: std::io::Error| BpfError::Io {
        path: path.to_path_buf(),
        source,
    };
    link_detach(path).map_err(io)?;
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// Opens the link pinned at `path` (`BPF_OBJ_GET`) and detaches it (`BPF_LINK_DETACH`): aya has neither call
/// for a pinned TCX link, and dropping the pin alone leaves the program attached until the kernel's deferred
/// release runs.
#[expect(
    unsafe_code,
    reason = "the bpf syscall has no safe wrapper for these two commands"
)]
fn link_detach(path: &Path) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // union bpf_attr for BPF_OBJ_GET: `pathname` (u64 pointer), `bpf_fd`, `file_flags`; the rest zero.
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(name.as_ptr() as u64).to_ne_bytes());
    // SAFETY: `attr` is valid for its whole length and `name` outlives the call; the kernel only reads them.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let raw = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the syscall returned a new file descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
    // union bpf_attr for BPF_LINK_DETACH: `link_fd` (u32) first, the rest zero.
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&raw.to_ne_bytes());
    // SAFETY: as above; `owned` keeps the descriptor open during the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_ptr(), attr.len()) };
    drop(owned);
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Removes everything Caracal pinned under `dir`: every link is detached first (so no interface keeps a
/// program), then the pins of links and maps go. Absent is fine.
pub fn remove_all(dir: &Path) -> Result<(), BpfError> {
    let links = dir.join("links");
    match std::fs::read_dir(&links) {
        Ok(entries) => {
            for e in entries.flatten() {
                detach_pinned(&e.path())?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(BpfError::Io { path: links, source }),
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BpfError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}
