//! The BPF policy data plane's kernel side: the programs of `node/bpf/policy.c` (built by `build.rs`),
//! loaded with aya, their maps pinned under [`PIN_DIR`], attached to pods' host-side veths with TCX links
//! that are pinned too, so a restarted agent adopts what it finds (see docs/bpf.md).
//!
//! What is here: loading (maps reused from their pins), attaching and detaching per interface (an attached
//! link whose program is replaced atomically on restart), the endpoint map (an interface without an entry
//! drops everything: fail closed), the policy tables ([`tables`]: an endpoint's tiers as per-field lookups),
//! the connection tracker and per-endpoint counters. [`backend`] is the data plane that converges all of it
//! to the node's model.

pub mod backend;
pub mod ctlb;
pub mod dump;
pub mod services;
pub mod sweep;
mod sys;
pub mod tables;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, PerCpuHashMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{CgroupSockAddr, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

/// Where Caracal pins its BPF objects.
pub const PIN_DIR: &str = "/sys/fs/bpf/caracal";

/// The compiled programs (`node/bpf/policy.c`).
static POLICY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/policy.bpf.o"));

use tables::{Bits, Image, MatchPart};

/// A tracker entry's flag: the kernel's own tracker translates this flow (a connection opened under kube-proxy,
/// seeded at a switch), so its packets keep going through the stack, never straight to a local pod.
pub const CT_STACK: u8 = 1;
/// A tracker entry's flag: a TCP FIN seen in the direction of the entry's key.
pub const CT_FIN_FWD: u8 = 2;
/// A tracker entry's flag: a TCP FIN seen in the other direction.
pub const CT_FIN_REV: u8 = 4;
/// A tracker entry's flag: a TCP reset seen on the flow (either way): the entry lives [`sweep::idle_limit_ns`].
pub const CT_RST: u8 = 8;
/// A tracker entry's flag, with [`CT_RST`]: the reset was the endpoint pod's own, so the entry lives only
/// [`sweep::idle_limit_ns`] (1 s).
pub const CT_RST_OWN: u8 = 16;

/// An endpoint's flag: what it sends to its own host is dropped once its egress policy allowed it (Felix's
/// `defaultEndpointToHostAction: Drop`; without the flag, Accept or Return: the host's stack gets it).
pub const EP_HOST_DROP: u32 = 1;

/// An endpoint entry (`struct endpoint` in policy.c).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Flags: [`EP_HOST_DROP`].
    pub flags: u32,
    /// The policy tables new flows are evaluated against: `[0]` what the pod sends (its egress policy),
    /// `[1]` what it receives (its ingress policy).
    pub table: [u32; 2],
    /// Layout padding.
    pub pad: u32,
}

/// A table's entry in `caracal_table_v2` (`struct table`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableMeta {
    /// Entries of the list.
    pub entries: u32,
    /// Chunks.
    pub chunks: u32,
    /// The image's content hash.
    pub hash: u64,
}

/// `struct chunk_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkKey {
    /// Table id.
    pub table: u32,
    /// Chunk.
    pub chunk: u32,
}

/// `struct actions`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Actions {
    /// `F_*` of the fields the chunk's entries constrain.
    pub fields: u32,
    /// Layout padding.
    pub pad: u32,
    /// Entries that allow.
    pub allow: Bits,
    /// Entries that pass.
    pub pass: Bits,
}

/// `struct pass_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassKey {
    /// Table id.
    pub table: u32,
    /// The Pass entry.
    pub entry: u32,
}

/// `struct match_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatchKey {
    /// Table id.
    pub table: u32,
    /// Chunk.
    pub chunk: u8,
    /// `K_*`.
    pub kind: u8,
    /// IP protocol.
    pub proto: u8,
    /// Side (and not).
    pub side: u8,
    /// Version, type or port.
    pub a: u16,
    /// Protocol or code.
    pub b: u16,
    /// Address.
    pub addr: [u8; 16],
}

/// The data of `struct addr_key` (after the prefix length).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrData {
    /// table << 8 | chunk << 1 | side.
    pub tcs: u32,
    /// Address (IPv4 mapped).
    pub addr: [u8; 16],
}

/// The data of `struct port_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortData {
    /// table << 8 | chunk << 2 | side << 1 | not.
    pub tcs: u32,
    /// Port, network order.
    pub port: [u8; 2],
    /// Layout padding.
    pub pad: [u8; 2],
}

/// `struct ct_key`: a flow as first seen, by the endpoint interface that allowed it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtKey {
    /// The endpoint's interface.
    pub ifindex: u32,
    /// Source address (IPv4 mapped).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port, host order (ICMP echo: its identifier).
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Layout padding.
    pub pad: [u8; 3],
}

/// `struct ct_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// Last packet, CLOCK_MONOTONIC nanoseconds.
    pub last_seen_ns: u64,
    /// The table that allowed it (0: the host's own traffic).
    pub table: u32,
    /// `NAT_*` of policy.c: 0 (none), 1 forward (| 4 source to the node, | 8 hairpin), 2 reverse.
    pub nat: u8,
    /// `CT_*` of policy.c: [`CT_STACK`], [`CT_FIN_FWD`], [`CT_FIN_REV`], [`CT_RST`], [`CT_RST_OWN`].
    pub flags: u8,
    /// Forward: the backend's port; reverse: the Service's (host order).
    pub nat_port: u16,
    /// Forward: the backend's address; reverse: the Service's (network order bytes).
    pub nat_addr: [u8; 4],
    /// Reverse, when the source was translated too: the client (all zero: none).
    pub orig_addr: [u8; 4],
    /// Its port.
    pub orig_port: u16,
    /// Layout padding.
    pub pad2: u16,
    /// Layout padding.
    pub pad3: u32,
}

/// `struct svc_key`: a Service frontend (a ClusterIP, or a node address for a NodePort).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvcKey {
    /// The address (network order bytes).
    pub addr: [u8; 4],
    /// The port, host order.
    pub port: u16,
    /// IP protocol (6 TCP, 17 UDP).
    pub proto: u8,
    /// Layout padding.
    pub pad: u8,
}

/// `struct svc_value`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcValue {
    /// The backend set's id.
    pub set: u32,
    /// Its backends (0: connections are refused).
    pub count: u16,
    /// `SVC_AFFINITY` (1): sessionAffinity ClientIP.
    pub flags: u16,
    /// The affinity's timeout, seconds.
    pub affinity_s: u32,
    /// Layout padding.
    pub pad: u32,
}

/// `struct backend_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendKey {
    /// The set.
    pub set: u32,
    /// The backend's index in it.
    pub index: u32,
}

/// `struct backend`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// Its address (network order bytes).
    pub addr: [u8; 4],
    /// Its port, host order.
    pub port: u16,
    /// `BACKEND_REMOTE` (1): on another node; `BACKEND_NODE` (2): an address of this node
    /// (`services::model`).
    pub flags: u16,
}

/// `struct member_key`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberKey {
    /// The set.
    pub set: u32,
    /// The backend's address.
    pub addr: [u8; 4],
    /// Its port.
    pub port: u16,
    /// Layout padding.
    pub pad: u16,
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
    // SAFETY: each is a repr(C) struct of integers and integer arrays, laid out without implicit padding
    // (explicit `pad` fields fill the gaps), valid for every bit pattern.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TableMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ChunkKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Actions {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PassKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MatchKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AddrData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SvcKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SvcValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MemberKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ctlb::NsEntry {}
    // SAFETY: an array of integers.
    unsafe impl aya::Pod for super::tables::Bits {}
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

/// The two hooks of the node's own interface (NodePorts), pinned under `host-links/`.
const HOST_HOOKS: [(&str, TcAttachType, &str); 2] = [
    ("host_ingress", TcAttachType::Ingress, "in"),
    ("host_egress", TcAttachType::Egress, "out"),
];

/// The raw TCX attach type of a hook's direction.
fn tcx_type(dir: TcAttachType) -> u32 {
    match dir {
        TcAttachType::Egress => sys::TCX_EGRESS,
        _ => sys::TCX_INGRESS,
    }
}

/// Pins `fd` at `path`, replacing what is pinned there (bpffs has no rename, so this is an unlink, then the
/// pin).
fn pin_replacing(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    sys::obj_pin(fd, path)
}

/// Pins a loaded program under `dir/progs/` for whoever attaches it later ([`attach_pinned`],
/// [`ctlb::attach_sockets`]), replacing an earlier run's unless that is this very program (`tag` equal: a
/// restart of the same build).
fn pin_program(
    dir: &Path,
    name: &str,
    tag: Option<u64>,
    fd: &aya::programs::ProgramFd,
) -> Result<(), BpfError> {
    let path = dir.join("progs").join(name);
    let pinned = aya::programs::ProgramInfo::from_pin(&path).map(|i| i.tag()).ok();
    if tag.is_none() || tag != pinned {
        pin_replacing(std::os::fd::AsFd::as_fd(fd), &path).map_err(|source| BpfError::Io { path, source })?;
    }
    Ok(())
}

/// Whether the nearest existing ancestor of `dir` (or `dir` itself) is on a bpf filesystem.
fn on_bpffs(dir: &Path) -> bool {
    dir.ancestors()
        .find(|d| d.exists())
        .and_then(|d| nix::sys::statfs::statfs(d).ok())
        .is_some_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Makes sure `dir` is on a bpffs: `/sys/fs/bpf` is mounted when it is not (it is not on every host, nor
/// inside `ip netns exec`); a directory elsewhere (`CARACAL_BPF_PIN_DIR`) must already be on one, since a
/// bpffs this process mounted in a private mount namespace would take the pins with it when it exits.
fn ensure_bpffs(dir: &Path) -> Result<(), BpfError> {
    let root = Path::new("/sys/fs/bpf");
    if !on_bpffs(dir) {
        if !dir.starts_with(root) {
            return Err(BpfError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::other(
                    "not on a bpf filesystem: mount one (mount -t bpf bpffs DIR) or point CARACAL_BPF_PIN_DIR under /sys/fs/bpf",
                ),
            });
        }
        std::fs::create_dir_all(root).map_err(|source| BpfError::Io {
            path: root.to_path_buf(),
            source,
        })?;
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
    for d in [
        dir.to_path_buf(),
        dir.join("links"),
        dir.join("host-links"),
        dir.join(ctlb::LINKS),
        dir.join("progs"),
    ] {
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
        fn program<'e>(ebpf: &'e mut Ebpf, name: &str) -> Result<&'e mut aya::programs::Program, BpfError> {
            ebpf.program_mut(name)
                .ok_or_else(|| load_error(format!("no program {name} in the object")))
        }
        for (name, _, _) in HOOKS.iter().chain(&HOST_HOOKS) {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?.try_into().map_err(load_error)?;
            prog.load().map_err(load_error)?;
        }
        for (name, _) in ctlb::SOCKET_HOOKS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into().map_err(load_error)?;
            prog.load().map_err(load_error)?;
        }
        let names = HOOKS.iter().chain(&HOST_HOOKS).map(|h| h.0);
        for name in names.chain(ctlb::SOCKET_HOOKS.iter().map(|h| h.0)) {
            let prog = program(&mut ebpf, name)?;
            pin_program(
                dir,
                name,
                prog.info().map(|i| i.tag()).ok(),
                prog.fd().map_err(load_error)?,
            )?;
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
    /// it (an earlier run's) is kept as it is when it runs the same program (same tag), and otherwise gets
    /// this run's program in place, atomically: no packet meets an interface without a program, and nothing
    /// is detached.
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
                // Already running this very program (same tag): nothing to re-attach.
                let ours = prog.info().map(|i| i.tag()).ok();
                let current = SchedClassifier::query_tcx(iface, dir)
                    .map(|(_, progs)| progs.iter().map(|p| p.tag()).collect::<Vec<_>>())
                    .unwrap_or_default();
                if ours.is_some_and(|t| current.contains(&t)) {
                    continue;
                }
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
            let fd = prog.fd().map_err(load_error)?;
            let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|e| attach_error("finding", &e))?;
            attach_tcx(std::os::fd::AsFd::as_fd(fd), iface, ifindex, dir, &path)?;
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

    fn hash<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, BpfError> {
        let map = self.ebpf.map_mut(name).ok_or_else(|| BpfError::Map {
            map: name,
            reason: "not in the object".into(),
        })?;
        HashMap::try_from(map).map_err(|e| map_error(name, e))
    }

    fn lpm<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<LpmTrie<&mut MapData, K, V>, BpfError> {
        let map = self.ebpf.map_mut(name).ok_or_else(|| BpfError::Map {
            map: name,
            reason: "not in the object".into(),
        })?;
        LpmTrie::try_from(map).map_err(|e| map_error(name, e))
    }

    /// Writes the entry of the interface with index `ifindex`: from here on its packets are no longer
    /// dropped for want of one.
    pub fn set_endpoint(&mut self, ifindex: u32, ep: Endpoint) -> Result<(), BpfError> {
        self.hash::<u32, Endpoint>(MAP_EP)?
            .insert(ifindex, ep, 0)
            .map_err(|e| map_error(MAP_EP, e))
    }

    /// Removes the entry of `ifindex` (its packets are dropped again), its counters and its flows. Absent
    /// is fine.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), BpfError> {
        absent_ok(MAP_EP, self.hash::<u32, Endpoint>(MAP_EP)?.remove(&ifindex))?;
        let mut counters: PerCpuHashMap<&mut MapData, u32, Counters> = {
            let map = self.ebpf.map_mut(MAP_COUNTERS).ok_or_else(|| BpfError::Map {
                map: MAP_COUNTERS,
                reason: "not in the object".into(),
            })?;
            PerCpuHashMap::try_from(map).map_err(|e| map_error(MAP_COUNTERS, e))?
        };
        for key in [ifindex << 1, (ifindex << 1) | 1] {
            absent_ok(MAP_COUNTERS, counters.remove(&key))?;
        }
        let mut ct = self.hash::<CtKey, CtValue>(MAP_CT)?;
        let keys: Vec<CtKey> = ct
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.ifindex == ifindex)
            .collect();
        for k in keys {
            absent_ok(MAP_CT, ct.remove(&k))?;
        }
        Ok(())
    }

    /// Every endpoint entry, by ifindex.
    pub fn endpoint_entries(&mut self) -> Result<BTreeMap<u32, Endpoint>, BpfError> {
        Ok(self
            .hash::<u32, Endpoint>(MAP_EP)?
            .iter()
            .filter_map(Result::ok)
            .collect())
    }

    /// Adds flows to the connection tracker (the kernel's established flows, when taking over from the
    /// iptables backend); an entry already there is kept.
    pub fn add_flows(&mut self, flows: &[(CtKey, u8)], now_ns: u64) -> Result<usize, BpfError> {
        let mut ct = self.hash::<CtKey, CtValue>(MAP_CT)?;
        let mut added = 0;
        for (k, flags) in flows {
            let value = CtValue {
                last_seen_ns: now_ns,
                flags: *flags,
                ..CtValue::default()
            };
            // BPF_NOEXIST: an entry the programs made is theirs.
            if ct.insert(k, value, 1).is_ok() {
                added += 1;
            }
        }
        Ok(added)
    }

    /// The flows the connection tracker holds for `ifindex` (every interface's when None).
    pub fn flows(&mut self, ifindex: Option<u32>) -> Result<Vec<(CtKey, CtValue)>, BpfError> {
        Ok(self
            .hash::<CtKey, CtValue>(MAP_CT)?
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| ifindex.is_none_or(|i| k.ifindex == i))
            .collect())
    }

    /// Writes `image` as table `id`: its lookups first, its entry in the table map last, so a program never
    /// finds the table before its lookups.
    pub fn write_table(&mut self, id: u32, image: &Image) -> Result<(), BpfError> {
        let mut pass = self.hash::<PassKey, u32>(MAP_PASS)?;
        for (entry, to) in &image.passes {
            pass.insert(
                PassKey {
                    table: id,
                    entry: *entry,
                },
                to,
                0,
            )
            .map_err(|e| map_error(MAP_PASS, e))?;
        }
        let mut matches = self.hash::<MatchKey, Bits>(MAP_MATCH)?;
        for (c, ch) in image.chunks.iter().enumerate() {
            for (part, bits) in &ch.matches {
                matches
                    .insert(match_key(id, c, part), bits, 0)
                    .map_err(|e| map_error(MAP_MATCH, e))?;
            }
        }
        let mut addrs = self.lpm::<AddrData, Bits>(MAP_ADDRS)?;
        for (c, ch) in image.chunks.iter().enumerate() {
            for (side, len, addr, bits) in &ch.addrs {
                addrs
                    .insert(&addr_key(id, c, *side, *len, *addr), bits, 0)
                    .map_err(|e| map_error(MAP_ADDRS, e))?;
            }
        }
        let mut ports = self.lpm::<PortData, Bits>(MAP_PORTS)?;
        for (c, ch) in image.chunks.iter().enumerate() {
            for (side, not, len, first, bits) in &ch.ports {
                ports
                    .insert(&port_key(id, c, *side, *not, *len, *first), bits, 0)
                    .map_err(|e| map_error(MAP_PORTS, e))?;
            }
        }
        let mut actions = self.hash::<ChunkKey, Actions>(MAP_ACTIONS)?;
        for (c, ch) in image.chunks.iter().enumerate() {
            let value = Actions {
                fields: ch.fields,
                pad: 0,
                allow: ch.allow,
                pass: ch.pass,
            };
            actions
                .insert(
                    ChunkKey {
                        table: id,
                        chunk: c as u32,
                    },
                    value,
                    0,
                )
                .map_err(|e| map_error(MAP_ACTIONS, e))?;
        }
        let meta = TableMeta {
            entries: image.entries,
            chunks: image.chunks.len() as u32,
            hash: image.hash,
        };
        self.hash::<u32, TableMeta>(MAP_TABLE)?
            .insert(id, meta, 0)
            .map_err(|e| map_error(MAP_TABLE, e))
    }

    /// Turns table `id` into the image whose hash is `hash` by `diff` (see [`tables::member_diff`]): the new
    /// keys first, then the stale ones go, then the table entry records the new hash.
    pub fn patch_table(&mut self, id: u32, diff: &tables::MemberDiff, hash: u64) -> Result<(), BpfError> {
        let mut matches = self.hash::<MatchKey, Bits>(MAP_MATCH)?;
        for (c, part, bits) in &diff.put_matches {
            matches
                .insert(match_key(id, *c, part), bits, 0)
                .map_err(|e| map_error(MAP_MATCH, e))?;
        }
        let mut addrs = self.lpm::<AddrData, Bits>(MAP_ADDRS)?;
        for (c, side, addr, bits) in &diff.put_addrs {
            addrs
                .insert(&addr_key(id, *c, *side, 128, *addr), bits, 0)
                .map_err(|e| map_error(MAP_ADDRS, e))?;
        }
        for (c, side, addr) in &diff.drop_addrs {
            absent_ok(MAP_ADDRS, addrs.remove(&addr_key(id, *c, *side, 128, *addr)))?;
        }
        let mut matches = self.hash::<MatchKey, Bits>(MAP_MATCH)?;
        for (c, part) in &diff.drop_matches {
            absent_ok(MAP_MATCH, matches.remove(&match_key(id, *c, part)))?;
        }
        let mut tables = self.hash::<u32, TableMeta>(MAP_TABLE)?;
        let mut meta = tables.get(&id, 0).map_err(|e| map_error(MAP_TABLE, e))?;
        meta.hash = hash;
        tables.insert(id, meta, 0).map_err(|e| map_error(MAP_TABLE, e))
    }

    /// The tables in the kernel, by id.
    pub fn table_metas(&mut self) -> Result<BTreeMap<u32, TableMeta>, BpfError> {
        Ok(self
            .hash::<u32, TableMeta>(MAP_TABLE)?
            .iter()
            .filter_map(Result::ok)
            .collect())
    }

    /// Removes every table whose id is not in `keep`, with all its lookups (found by scanning the maps, so
    /// tables an earlier run wrote go too). The table entry goes first, so a program never walks half a
    /// table. Returns how many tables went.
    pub fn sweep_tables(&mut self, keep: &std::collections::BTreeSet<u32>) -> Result<usize, BpfError> {
        let gone = |t: u32| !keep.contains(&t);
        let mut tables = self.hash::<u32, TableMeta>(MAP_TABLE)?;
        let ids: Vec<u32> = tables
            .keys()
            .filter_map(Result::ok)
            .filter(|t| gone(*t))
            .collect();
        for id in &ids {
            absent_ok(MAP_TABLE, tables.remove(id))?;
        }
        let mut actions = self.hash::<ChunkKey, Actions>(MAP_ACTIONS)?;
        let keys: Vec<ChunkKey> = actions
            .keys()
            .filter_map(Result::ok)
            .filter(|k| gone(k.table))
            .collect();
        for k in keys {
            absent_ok(MAP_ACTIONS, actions.remove(&k))?;
        }
        let mut pass = self.hash::<PassKey, u32>(MAP_PASS)?;
        let keys: Vec<PassKey> = pass
            .keys()
            .filter_map(Result::ok)
            .filter(|k| gone(k.table))
            .collect();
        for k in keys {
            absent_ok(MAP_PASS, pass.remove(&k))?;
        }
        let mut matches = self.hash::<MatchKey, Bits>(MAP_MATCH)?;
        let keys: Vec<MatchKey> = matches
            .keys()
            .filter_map(Result::ok)
            .filter(|k| gone(k.table))
            .collect();
        for k in keys {
            absent_ok(MAP_MATCH, matches.remove(&k))?;
        }
        let mut addrs = self.lpm::<AddrData, Bits>(MAP_ADDRS)?;
        let keys: Vec<Key<AddrData>> = addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| gone(k.data().tcs >> 8))
            .collect();
        for k in keys {
            absent_ok(MAP_ADDRS, addrs.remove(&k))?;
        }
        let mut ports = self.lpm::<PortData, Bits>(MAP_PORTS)?;
        let keys: Vec<Key<PortData>> = ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| gone(k.data().tcs >> 8))
            .collect();
        for k in keys {
            absent_ok(MAP_PORTS, ports.remove(&k))?;
        }
        Ok(ids.len())
    }

    /// Removes table `id` as `image` wrote it (the fast path of [`Loaded::sweep_tables`]).
    pub fn delete_table(&mut self, id: u32, image: &Image) -> Result<(), BpfError> {
        absent_ok(MAP_TABLE, self.hash::<u32, TableMeta>(MAP_TABLE)?.remove(&id))?;
        let mut actions = self.hash::<ChunkKey, Actions>(MAP_ACTIONS)?;
        for c in 0..image.chunks.len() {
            absent_ok(
                MAP_ACTIONS,
                actions.remove(&ChunkKey {
                    table: id,
                    chunk: c as u32,
                }),
            )?;
        }
        let mut pass = self.hash::<PassKey, u32>(MAP_PASS)?;
        for (entry, _) in &image.passes {
            absent_ok(
                MAP_PASS,
                pass.remove(&PassKey {
                    table: id,
                    entry: *entry,
                }),
            )?;
        }
        let mut matches = self.hash::<MatchKey, Bits>(MAP_MATCH)?;
        for (c, ch) in image.chunks.iter().enumerate() {
            for (part, _) in &ch.matches {
                absent_ok(MAP_MATCH, matches.remove(&match_key(id, c, part)))?;
            }
        }
        let mut addrs = self.lpm::<AddrData, Bits>(MAP_ADDRS)?;
        for (c, ch) in image.chunks.iter().enumerate() {
            for (side, len, addr, _) in &ch.addrs {
                absent_ok(MAP_ADDRS, addrs.remove(&addr_key(id, c, *side, *len, *addr)))?;
            }
        }
        let mut ports = self.lpm::<PortData, Bits>(MAP_PORTS)?;
        for (c, ch) in image.chunks.iter().enumerate() {
            for (side, not, len, first, _) in &ch.ports {
                absent_ok(
                    MAP_PORTS,
                    ports.remove(&port_key(id, c, *side, *not, *len, *first)),
                )?;
            }
        }
        Ok(())
    }

    /// Table `id` as the maps hold it, read back into an image (its parts in map order; `hash` is the one
    /// its table entry records). None when there is no such table.
    pub fn read_table(&mut self, id: u32) -> Result<Option<Image>, BpfError> {
        let Some(meta) = self.table_metas()?.get(&id).copied() else {
            return Ok(None);
        };
        let mut chunks: Vec<tables::ChunkImage> = Vec::new();
        let actions = self.hash::<ChunkKey, Actions>(MAP_ACTIONS)?;
        for c in 0..meta.chunks {
            let a = actions
                .get(&ChunkKey { table: id, chunk: c }, 0)
                .map_err(|e| map_error(MAP_ACTIONS, e))?;
            chunks.push(tables::ChunkImage {
                fields: a.fields,
                allow: a.allow,
                pass: a.pass,
                ..Default::default()
            });
        }
        let mut passes: Vec<(u32, u32)> = self
            .hash::<PassKey, u32>(MAP_PASS)?
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.table == id)
            .map(|(k, to)| (k.entry, to))
            .collect();
        passes.sort_unstable();
        for (k, bits) in self
            .hash::<MatchKey, Bits>(MAP_MATCH)?
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.table == id)
        {
            if let Some(ch) = chunks.get_mut(usize::from(k.chunk)) {
                let part = MatchPart {
                    kind: k.kind,
                    proto: k.proto,
                    side: k.side,
                    a: k.a,
                    b: k.b,
                    addr: k.addr,
                };
                ch.matches.push((part, bits));
            }
        }
        for (k, bits) in self
            .lpm::<AddrData, Bits>(MAP_ADDRS)?
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.data().tcs >> 8 == id)
        {
            let d = k.data();
            if let Some(ch) = chunks.get_mut(((d.tcs >> 1) & 0x7f) as usize) {
                let len = (k.prefix_len() - 32) as u8;
                ch.addrs.push(((d.tcs & 1) as u8, len, d.addr, bits));
            }
        }
        for (k, bits) in self
            .lpm::<PortData, Bits>(MAP_PORTS)?
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.data().tcs >> 8 == id)
        {
            let d = k.data();
            if let Some(ch) = chunks.get_mut(((d.tcs >> 2) & 0x3f) as usize) {
                let len = (k.prefix_len() - 32) as u8;
                let (side, not) = (((d.tcs >> 1) & 1) as u8, (d.tcs & 1) as u8);
                ch.ports.push((side, not, len, u16::from_be_bytes(d.port), bits));
            }
        }
        Ok(Some(Image {
            entries: meta.entries,
            chunks,
            passes,
            hash: meta.hash,
        }))
    }

    /// The counters of `ifindex`: (from the pod, to the pod), summed over CPUs.
    pub fn counters(&mut self, ifindex: u32) -> Result<(Counters, Counters), BpfError> {
        let map = self.ebpf.map_mut(MAP_COUNTERS).ok_or_else(|| BpfError::Map {
            map: MAP_COUNTERS,
            reason: "not in the object".into(),
        })?;
        let counters: PerCpuHashMap<&mut MapData, u32, Counters> =
            PerCpuHashMap::try_from(map).map_err(|e| map_error(MAP_COUNTERS, e))?;
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

/// The maps (policy.c).
const MAP_EP: &str = "caracal_ep_v2";
const MAP_TABLE: &str = "caracal_table_v2";
const MAP_ACTIONS: &str = "caracal_actions_v2";
const MAP_PASS: &str = "caracal_pass_v2";
const MAP_MATCH: &str = "caracal_match_v2";
const MAP_ADDRS: &str = "caracal_addrs_v2";
const MAP_PORTS: &str = "caracal_ports_v2";
const MAP_CT: &str = "caracal_ct_v3";
/// Service frontends.
pub const MAP_SVC: &str = "caracal_svc_v1";
/// Service backend sets.
pub const MAP_BACKEND: &str = "caracal_backend_v1";
/// Service backend sets by member.
pub const MAP_MEMBER: &str = "caracal_member_v1";
const MAP_COUNTERS: &str = "caracal_counters_v2";

fn map_error(map: &'static str, e: impl std::fmt::Display) -> BpfError {
    BpfError::Map {
        map,
        reason: e.to_string(),
    }
}

fn absent_ok(map: &'static str, r: Result<(), aya::maps::MapError>) -> Result<(), BpfError> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        // Some map kinds (per-CPU hashes) report a missing key as the syscall's ENOENT.
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        Err(e) => Err(map_error(map, e)),
    }
}

fn match_key(table: u32, chunk: usize, p: &MatchPart) -> MatchKey {
    MatchKey {
        table,
        chunk: chunk as u8,
        kind: p.kind,
        proto: p.proto,
        side: p.side,
        a: p.a,
        b: p.b,
        addr: p.addr,
    }
}

fn addr_key(table: u32, chunk: usize, side: u8, len: u8, addr: [u8; 16]) -> Key<AddrData> {
    Key::new(
        32 + u32::from(len),
        AddrData {
            tcs: table << 8 | (chunk as u32) << 1 | u32::from(side),
            addr,
        },
    )
}

fn port_key(table: u32, chunk: usize, side: u8, not: u8, len: u8, first: u16) -> Key<PortData> {
    Key::new(
        32 + u32::from(len),
        PortData {
            tcs: table << 8 | (chunk as u32) << 2 | u32::from(side) << 1 | u32::from(not),
            port: first.to_be_bytes(),
            pad: [0; 2],
        },
    )
}

/// Every endpoint's counters as pinned under `dir` (without loading the programs: what `/metrics` reads):
/// (ifindex, from the pod, to the pod). Nothing pinned yet gives nothing.
pub fn pinned_counters(dir: &Path) -> Result<Vec<(u32, Counters, Counters)>, BpfError> {
    let path = dir.join(MAP_COUNTERS);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let data = MapData::from_pin(&path).map_err(|e| map_error(MAP_COUNTERS, e))?;
    let map: PerCpuHashMap<MapData, u32, Counters> =
        PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))
            .map_err(|e| map_error(MAP_COUNTERS, e))?;
    let mut sums: BTreeMap<u32, (Counters, Counters)> = BTreeMap::new();
    for (key, per_cpu) in map.iter().filter_map(Result::ok) {
        let total = per_cpu.iter().fold(Counters::default(), |a, c| Counters {
            allowed: a.allowed + c.allowed,
            dropped: a.dropped + c.dropped,
        });
        let e = sums.entry(key >> 1).or_default();
        if key & 1 == 1 {
            e.1 = total;
        } else {
            e.0 = total;
        }
    }
    Ok(sums.into_iter().map(|(i, (f, t))| (i, f, t)).collect())
}

/// Attaches the programs pinned under `dir` by the running agent ([`Loaded::load`]) to the interface `iface`
/// (index `ifindex`, in the calling thread's network namespace) and pins the links where the agent looks for
/// them, so that its own [`Loaded::attach`] finds them right and attaches nothing. This is how the CNI
/// wiring closes a new pod's interface before the pod side is up: with no endpoint entry yet, the programs
/// drop the pod's packets until its policy is in the maps. Returns false, attaching nothing, when no programs
/// are pinned there (the node's policy data plane is not BPF).
///
/// A TCX attachment costs the kernel an RCU grace period under the RTNL lock (about 12 ms here), so this
/// takes about 25 ms: spent while the pod's sandbox is being wired, before its container starts.
pub fn attach_pinned(dir: &Path, iface: &str, ifindex: u32) -> Result<bool, BpfError> {
    attach_pinned_hooks(dir, &HOOKS, "links", iface, ifindex)
}

/// Attaches the NodePort programs pinned under `dir` to the node's own interface `iface` (index `ifindex`),
/// pinning the links under `host-links/`. False when nothing is pinned there.
pub fn attach_host(dir: &Path, iface: &str, ifindex: u32) -> Result<bool, BpfError> {
    attach_pinned_hooks(dir, &HOST_HOOKS, "host-links", iface, ifindex)
}

/// Detaches the NodePort programs from every interface they are on but `keep` (all of them with None).
pub fn detach_host(dir: &Path, keep: Option<&str>) -> Result<(), BpfError> {
    let links = dir.join("host-links");
    let entries = match std::fs::read_dir(&links) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(BpfError::Io { path: links, source }),
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let iface = name.rsplit_once('_').map_or(name.as_str(), |(i, _)| i);
        if Some(iface) != keep {
            detach_pinned(&e.path())?;
        }
    }
    Ok(())
}

fn attach_pinned_hooks(
    dir: &Path,
    hooks: &[(&str, TcAttachType, &str)],
    links: &str,
    iface: &str,
    ifindex: u32,
) -> Result<bool, BpfError> {
    let mut progs = Vec::new();
    for &(name, dir_, suffix) in hooks {
        let path = dir.join("progs").join(name);
        // A loading agent replaces a program's pin (unlinked, then pinned): while the directory is there, a
        // missing program is waited for a moment rather than taken for "not BPF".
        let mut tries = 0;
        let fd = loop {
            match sys::obj_get(&path) {
                Ok(fd) => break fd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !dir.join("progs").exists() {
                        return Ok(false);
                    }
                    if tries == 50 {
                        return Err(BpfError::Io { path, source: e });
                    }
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(source) => return Err(BpfError::Io { path, source }),
            }
        };
        progs.push((fd, dir_, suffix));
    }
    for (prog, dir_, suffix) in progs {
        let path = dir.join(links).join(format!("{iface}_{suffix}"));
        attach_tcx(std::os::fd::AsFd::as_fd(&prog), iface, ifindex, dir_, &path)?;
    }
    Ok(true)
}

/// Attaches `prog` to `iface`'s (index `ifindex`) TCX hook `dir`, first in order, and pins the link at `path`.
/// The same program already on the hook counts as attached: the kernel refuses it twice (`EEXIST`), and the
/// CNI wiring ([`attach_pinned`]) and the agent ([`Loaded::attach`]) can race for a new pod's hooks (its
/// address reaches the agent as soon as the interface exists); whichever came first pins its link.
fn attach_tcx(
    prog: std::os::fd::BorrowedFd<'_>,
    iface: &str,
    ifindex: u32,
    dir: TcAttachType,
    path: &Path,
) -> Result<(), BpfError> {
    let attach_error = |what, e: std::io::Error| BpfError::Attach {
        what,
        iface: iface.to_owned(),
        reason: e.to_string(),
    };
    let link = match sys::tcx_link_create(prog, ifindex, tcx_type(dir)) {
        Ok(link) => link,
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(()),
        Err(e) => return Err(attach_error("attaching", e)),
    };
    pin_replacing(std::os::fd::AsFd::as_fd(&link), path).map_err(|e| attach_error("pinning the link", e))
}

/// Detaches the link pinned at `path` and removes the pin. Absent is fine.
fn detach_pinned(path: &Path) -> Result<(), BpfError> {
    if !path.exists() {
        return Ok(());
    }
    let io = |source: std::io::Error| BpfError::Io {
        path: path.to_path_buf(),
        source,
    };
    sys::link_detach(path).map_err(io)?;
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(e)),
    }
}

/// Removes everything Caracal pinned under `dir`: every link is detached first (so no interface keeps a
/// program), then the pins of links and maps go. Absent is fine.
pub fn remove_all(dir: &Path) -> Result<(), BpfError> {
    for links in [dir.join("links"), dir.join("host-links"), dir.join(ctlb::LINKS)] {
        match std::fs::read_dir(&links) {
            Ok(entries) => {
                for e in entries.flatten() {
                    detach_pinned(&e.path())?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(BpfError::Io { path: links, source }),
        }
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
