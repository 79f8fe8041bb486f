//! The few `bpf(2)` commands aya 0.14 has no call for: opening a pinned object, pinning a descriptor,
//! creating a TCX or cgroup link from a program descriptor alone, giving a link another program, detaching a
//! pinned link, and reading a hash map in batches and taking one entry out of it (the tracker's sweeper);
//! and a socket's network namespace cookie (`SO_NETNS_COOKIE`), which the connect-time programs key on.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
/// Gives a link another program, atomically.
const BPF_LINK_UPDATE: libc::c_long = 29;
/// Detaches a link from its hook now, whoever else holds it.
const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_TCX_INGRESS` and `BPF_TCX_EGRESS` (`enum bpf_attach_type`).
pub const TCX_INGRESS: u32 = 46;
pub const TCX_EGRESS: u32 = 47;
/// `BPF_CGROUP_INET4_CONNECT` and `BPF_CGROUP_INET4_GETPEERNAME` (`enum bpf_attach_type`).
pub const CGROUP_INET4_CONNECT: u32 = 10;
pub const CGROUP_INET4_GETPEERNAME: u32 = 29;
/// `SO_NETNS_COOKIE` (`asm-generic/socket.h`; Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;
/// `BPF_F_BEFORE`: with no relative program, first in the hook's order.
const BPF_F_BEFORE: u32 = 1 << 3;

/// `union bpf_attr`, as bytes: every command here uses a prefix of it, the rest zero.
type Attr = [u8; 128];

#[expect(
    unsafe_code,
    reason = "the bpf syscall has no safe wrapper for these commands"
)]
fn bpf(cmd: libc::c_long, attr: &Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is valid for its whole length, and any pointer in it points at memory the caller keeps
    // alive for the call; the kernel only reads them for these commands.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_ptr(), attr.len()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// As [`bpf`], for the commands that write results back into `attr` itself.
#[expect(
    unsafe_code,
    reason = "the bpf syscall has no safe wrapper for these commands"
)]
fn bpf_rw(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is valid and writable for its whole length, and its pointers point at buffers the caller
    // keeps alive (and writable where the kernel writes) for the call, each as large as the command says.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[expect(unsafe_code, reason = "adopting the descriptor the kernel just returned")]
fn owned(fd: libc::c_long) -> std::io::Result<OwnedFd> {
    let raw = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the syscall returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn c_path(path: &Path) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

/// Opens the object pinned at `path` (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let name = c_path(path)?;
    // `pathname` (u64 pointer), `bpf_fd`, `file_flags`.
    let mut attr: Attr = [0; 128];
    attr[..8].copy_from_slice(&(name.as_ptr() as u64).to_ne_bytes());
    owned(bpf(BPF_OBJ_GET, &attr)?)
}

/// Pins `fd` at `path` (`BPF_OBJ_PIN`); the path must not exist.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    let name = c_path(path)?;
    let mut attr: Attr = [0; 128];
    attr[..8].copy_from_slice(&(name.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&fd.as_raw_fd().to_ne_bytes());
    bpf(BPF_OBJ_PIN, &attr).map(drop)
}

/// Attaches the program `prog` to interface `ifindex` at `attach_type` ([`TCX_INGRESS`], [`TCX_EGRESS`]),
/// first in the hook's order, and returns the link (`BPF_LINK_CREATE`).
pub fn tcx_link_create(prog: BorrowedFd<'_>, ifindex: u32, attach_type: u32) -> std::io::Result<OwnedFd> {
    // `prog_fd`, `target_ifindex`, `attach_type`, `flags`, then the tcx part: `relative_fd` (0: none),
    // `expected_revision` (0: any).
    let mut attr: Attr = [0; 128];
    attr[..4].copy_from_slice(&prog.as_raw_fd().to_ne_bytes());
    attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    attr[12..16].copy_from_slice(&BPF_F_BEFORE.to_ne_bytes());
    owned(bpf(BPF_LINK_CREATE, &attr)?)
}

/// Attaches the program `prog` to the cgroup (v2) open at `cgroup` at `attach_type` ([`CGROUP_INET4_CONNECT`],
/// ...) beside whatever else is attached there, and returns the link (`BPF_LINK_CREATE`).
pub fn cgroup_link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    // `prog_fd`, `target_fd`, `attach_type`, `flags` (0: a cgroup's links always run side by side).
    let mut attr: Attr = [0; 128];
    attr[..4].copy_from_slice(&prog.as_raw_fd().to_ne_bytes());
    attr[4..8].copy_from_slice(&cgroup.as_raw_fd().to_ne_bytes());
    attr[8..12].copy_from_slice(&attach_type.to_ne_bytes());
    owned(bpf(BPF_LINK_CREATE, &attr)?)
}

/// Gives the link `link` the program `prog` in place of its own, atomically (`BPF_LINK_UPDATE`).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    // `link_fd`, `new_prog_fd`, `flags` (0: whatever program it had), `old_prog_fd`.
    let mut attr: Attr = [0; 128];
    attr[..4].copy_from_slice(&link.as_raw_fd().to_ne_bytes());
    attr[4..8].copy_from_slice(&prog.as_raw_fd().to_ne_bytes());
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}

/// The cookie of the network namespace socket `fd` lives in (`SO_NETNS_COOKIE`): what a BPF program's
/// `bpf_get_netns_cookie` gives for that namespace's sockets, unique for as long as the machine runs.
#[expect(unsafe_code, reason = "getsockopt has no safe wrapper for SO_NETNS_COOKIE")]
pub fn netns_cookie(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid and writable for the call; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(cookie)
    }
}

/// Opens the link pinned at `path` and detaches it (`BPF_LINK_DETACH`): dropping the pin alone leaves the
/// program attached until the kernel's deferred release runs.
pub fn link_detach(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let link = obj_get(path)?;
    // `link_fd` first.
    let mut attr: Attr = [0; 128];
    attr[..4].copy_from_slice(&link.as_fd().as_raw_fd().to_ne_bytes());
    bpf(BPF_LINK_DETACH, &attr).map(drop)
}

/// Reads the entries of hash map `map` (keys of `key_size` bytes, values of `value_size`) from bucket cursor
/// `cursor` on (None: the start) into `keys` and `values`, as many as they hold (`BPF_MAP_LOOKUP_BATCH`).
/// Returns how many were read and the cursor to go on from (None: the map is done).
pub fn map_lookup_batch(
    map: BorrowedFd<'_>,
    cursor: Option<u32>,
    keys: &mut [u8],
    key_size: usize,
    values: &mut [u8],
    value_size: usize,
) -> std::io::Result<(usize, Option<u32>)> {
    let count = (keys.len() / key_size).min(values.len() / value_size);
    let count32 = u32::try_from(count).map_err(std::io::Error::other)?;
    // A hash map's cursor is a bucket index (u32).
    let in_batch = cursor.unwrap_or(0).to_ne_bytes();
    let mut out_batch = [0u8; 4];
    // `in_batch`, `out_batch`, `keys`, `values` (u64 pointers), `count`, `map_fd`, `elem_flags`, `flags`.
    let mut attr: Attr = [0; 128];
    if cursor.is_some() {
        attr[..8].copy_from_slice(&(in_batch.as_ptr() as u64).to_ne_bytes());
    }
    attr[8..16].copy_from_slice(&(out_batch.as_mut_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(keys.as_mut_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(values.as_mut_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&count32.to_ne_bytes());
    attr[36..40].copy_from_slice(&map.as_raw_fd().to_ne_bytes());
    let rc = bpf_rw(BPF_MAP_LOOKUP_BATCH, &mut attr);
    let mut read = [0u8; 4];
    read.copy_from_slice(&attr[32..36]);
    let read = (u32::from_ne_bytes(read) as usize).min(count);
    match rc {
        Ok(_) => Ok((read, Some(u32::from_ne_bytes(out_batch)))),
        // The end of the map: the last (possibly empty) batch.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((read, None)),
        Err(e) => Err(e),
    }
}

/// Takes the entry under `key` out of hash map `map` and writes its value into `value`, in one step
/// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`). False when there is none.
pub fn map_lookup_and_delete(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> std::io::Result<bool> {
    // `map_fd`, padding, `key`, `value` (u64 pointers), `flags`.
    let mut attr: Attr = [0; 128];
    attr[..4].copy_from_slice(&map.as_raw_fd().to_ne_bytes());
    attr[8..16].copy_from_slice(&(key.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(value.as_mut_ptr() as u64).to_ne_bytes());
    match bpf_rw(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `value` under `key` in map `map` unless an entry is there already (`BPF_MAP_UPDATE_ELEM` with
/// `BPF_NOEXIST`). False when one was.
pub fn map_insert_new(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> std::io::Result<bool> {
    // `map_fd`, padding, `key`, `value` (u64 pointers), `flags` (BPF_NOEXIST: 1).
    let mut attr: Attr = [0; 128];
    attr[..4].copy_from_slice(&map.as_raw_fd().to_ne_bytes());
    attr[8..16].copy_from_slice(&(key.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(value.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&1u64.to_ne_bytes());
    match bpf(BPF_MAP_UPDATE_ELEM, &attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}
