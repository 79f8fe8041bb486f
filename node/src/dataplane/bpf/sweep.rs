//! The connection tracker's sweeper: the programs only ever look at an entry when a packet of its flow
//! comes, so an entry whose flow ended (both FINs, a reset, a flow idle past its limit)
//! stays until the LRU map needs its room, and a full LRU map takes its room from the entries nobody has
//! looked up yet, which are the newest flows' (a new Service connection's reverse entry, between its SYN and
//! the answer). The agent removes such entries itself, every [`SWEEP_INTERVAL`] (every
//! [`BUSY_SWEEP_INTERVAL`] while the map holds more than [`BUSY_ENTRIES`]), so the map keeps room for new
//! flows and an entry left by an ended connection is gone before its tuple is used again (docs/bpf.md,
//! "Closed connections").
//!
//! The limits mirror `idle_limit` in `bpf/policy.c`; [`idle_limit_ns`] must say what it says.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::{BpfError, CT_FIN_FWD, CT_FIN_REV, CT_RST, CT_RST_OWN, MAP_CT, sys};

/// How often the agent sweeps the tracker while it holds no more than [`BUSY_ENTRIES`].
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// How often it sweeps a tracker holding more: at thousands of new connections a second, what closed flows
/// leave within [`SWEEP_INTERVAL`] would outgrow the map.
pub const BUSY_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// The tracker's size (`max_entries` of `caracal_ct_v3` in policy.c).
pub const CT_CAPACITY: usize = 524_288;
/// Past this many entries (a quarter of the map) the sweeper sweeps every [`BUSY_SWEEP_INTERVAL`].
pub const BUSY_ENTRIES: usize = CT_CAPACITY / 4;

/// When to sweep next after a sweep that found `entries`.
pub fn next_sweep(entries: usize) -> Duration {
    if entries > BUSY_ENTRIES {
        BUSY_SWEEP_INTERVAL
    } else {
        SWEEP_INTERVAL
    }
}

/// `sizeof(struct ct_key)` and `sizeof(struct ct_value)`.
const KEY_SIZE: usize = std::mem::size_of::<super::CtKey>();
const VALUE_SIZE: usize = std::mem::size_of::<super::CtValue>();
/// Entries read per `BPF_MAP_LOOKUP_BATCH`.
const BATCH: usize = 4096;

const SECOND: u64 = 1_000_000_000;

/// How long an entry of protocol `proto` with flags `flags` lives after its flow's last packet (policy.c's
/// `idle_limit`): the kernel tracker's defaults for established TCP (5 days), UDP (120 s) and the rest (30 s);
/// a TCP flow after both FINs 30 s (Calico's `TCPFinsSeen`), after a reset 10 s (the kernel's CLOSE), or 1 s
/// when the reset was the endpoint pod's own.
pub fn idle_limit_ns(proto: u8, flags: u8) -> u64 {
    match proto {
        6 if flags & CT_RST_OWN != 0 => SECOND,
        6 if flags & CT_RST != 0 => 10 * SECOND,
        6 if flags & (CT_FIN_FWD | CT_FIN_REV) == CT_FIN_FWD | CT_FIN_REV => 30 * SECOND,
        6 => 5 * 24 * 3600 * SECOND,
        17 => 120 * SECOND,
        _ => 30 * SECOND,
    }
}

/// Whether the programs would no longer use an entry (`proto`, `flags`, last packet at `last_seen_ns`) at
/// `now_ns` (CLOCK_MONOTONIC, as `bpf_ktime_get_ns`). An entry seen after `now_ns` is not.
pub fn expired(proto: u8, flags: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_seen_ns) >= idle_limit_ns(proto, flags)
}

/// The parts of a raw key and value the expiry needs: (proto, flags, last_seen_ns).
fn parts(key: &[u8], value: &[u8]) -> (u8, u8, u64) {
    let proto = key[std::mem::offset_of!(super::CtKey, proto)];
    let flags = value[std::mem::offset_of!(super::CtValue, flags)];
    let mut seen = [0u8; 8];
    let at = std::mem::offset_of!(super::CtValue, last_seen_ns);
    seen.copy_from_slice(&value[at..at + 8]);
    (proto, flags, u64::from_ne_bytes(seen))
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Entries in the tracker when it was read.
    pub entries: usize,
    /// Entries removed.
    pub removed: usize,
}

/// Removes the tracker entries pinned under `dir` that are expired at `now_ns`. Each is taken out with its
/// value in one step, and put back if a packet refreshed it in the meantime (or its tuple started a new
/// flow), unless the programs have written it again already. Nothing pinned: nothing to do.
pub fn sweep(dir: &Path, now_ns: u64) -> Result<Swept, BpfError> {
    let path = dir.join(MAP_CT);
    if !path.exists() {
        return Ok(Swept::default());
    }
    let io = |source| BpfError::Io {
        path: path.clone(),
        source,
    };
    let map = sys::obj_get(&path).map_err(io)?;
    let map = std::os::fd::AsFd::as_fd(&map);
    let mut stale: Vec<u8> = Vec::new();
    let mut swept = Swept {
        entries: scan(map, |key, value| {
            let (proto, flags, seen) = parts(key, value);
            if expired(proto, flags, seen, now_ns) {
                stale.extend_from_slice(key);
            }
        })
        .map_err(io)?,
        removed: 0,
    };
    let mut value = [0u8; VALUE_SIZE];
    for key in stale.chunks_exact(KEY_SIZE) {
        if !sys::map_lookup_and_delete(map, key, &mut value).map_err(io)? {
            continue;
        }
        let (proto, flags, seen) = parts(key, &value);
        if expired(proto, flags, seen, now_ns) {
            swept.removed += 1;
        } else {
            sys::map_insert_new(map, key, &value).map_err(io)?;
        }
    }
    Ok(swept)
}

/// The entries of the tracker pinned under `dir` (0 when nothing is pinned), read as a sweep reads them.
pub fn count(dir: &Path) -> Result<usize, BpfError> {
    let path = dir.join(MAP_CT);
    if !path.exists() {
        return Ok(0);
    }
    let io = |source| BpfError::Io {
        path: path.clone(),
        source,
    };
    let map = sys::obj_get(&path).map_err(io)?;
    scan(std::os::fd::AsFd::as_fd(&map), |_, _| {}).map_err(io)
}

/// Every entry of the tracker pinned under `dir` (none when nothing is pinned), read as a sweep reads them:
/// for looking at flows without loading the programs (`caracal-node bpf dump` loads them).
pub fn entries(dir: &Path) -> Result<Vec<(super::CtKey, super::CtValue)>, BpfError> {
    let path = dir.join(MAP_CT);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let io = |source| BpfError::Io {
        path: path.clone(),
        source,
    };
    let map = sys::obj_get(&path).map_err(io)?;
    let mut out = Vec::new();
    scan(std::os::fd::AsFd::as_fd(&map), |k, v| {
        out.push((key_from(k), value_from(v)))
    })
    .map_err(io)?;
    Ok(out)
}

fn bytes<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

/// A raw `struct ct_key`.
fn key_from(b: &[u8]) -> super::CtKey {
    use std::mem::offset_of;
    type K = super::CtKey;
    super::CtKey {
        ifindex: u32::from_ne_bytes(bytes(b, offset_of!(K, ifindex))),
        src: bytes(b, offset_of!(K, src)),
        dst: bytes(b, offset_of!(K, dst)),
        sport: u16::from_ne_bytes(bytes(b, offset_of!(K, sport))),
        dport: u16::from_ne_bytes(bytes(b, offset_of!(K, dport))),
        proto: b[offset_of!(K, proto)],
        pad: bytes(b, offset_of!(K, pad)),
    }
}

/// A raw `struct ct_value`.
fn value_from(b: &[u8]) -> super::CtValue {
    use std::mem::offset_of;
    type V = super::CtValue;
    super::CtValue {
        last_seen_ns: u64::from_ne_bytes(bytes(b, offset_of!(V, last_seen_ns))),
        table: u32::from_ne_bytes(bytes(b, offset_of!(V, table))),
        nat: b[offset_of!(V, nat)],
        flags: b[offset_of!(V, flags)],
        nat_port: u16::from_ne_bytes(bytes(b, offset_of!(V, nat_port))),
        nat_addr: bytes(b, offset_of!(V, nat_addr)),
        orig_addr: bytes(b, offset_of!(V, orig_addr)),
        orig_port: u16::from_ne_bytes(bytes(b, offset_of!(V, orig_port))),
        pad2: u16::from_ne_bytes(bytes(b, offset_of!(V, pad2))),
        pad3: u32::from_ne_bytes(bytes(b, offset_of!(V, pad3))),
    }
}

/// Reads every entry of the tracker `map` in batches, handing each raw key and value to `visit`; the number
/// read.
fn scan(map: std::os::fd::BorrowedFd<'_>, mut visit: impl FnMut(&[u8], &[u8])) -> std::io::Result<usize> {
    let mut keys = vec![0u8; BATCH * KEY_SIZE];
    let mut values = vec![0u8; BATCH * VALUE_SIZE];
    let (mut n, mut cursor) = (0, None);
    loop {
        let (read, next) = sys::map_lookup_batch(map, cursor, &mut keys, KEY_SIZE, &mut values, VALUE_SIZE)?;
        n += read;
        for i in 0..read {
            visit(
                &keys[i * KEY_SIZE..(i + 1) * KEY_SIZE],
                &values[i * VALUE_SIZE..(i + 1) * VALUE_SIZE],
            );
        }
        match next {
            Some(c) => cursor = Some(c),
            None => return Ok(n),
        }
    }
}

/// The sweeper's figures for `/metrics`.
#[derive(Debug, Default)]
pub struct SweepStats {
    /// Entries in the tracker at the last sweep.
    pub entries: AtomicU64,
    /// Entries removed, all sweeps.
    pub removed: AtomicU64,
    /// Sweeps done.
    pub sweeps: AtomicU64,
    /// Sweeps that failed.
    pub failures: AtomicU64,
    /// The last sweep's duration, microseconds.
    pub last_us: AtomicU64,
}

/// CLOCK_MONOTONIC now, nanoseconds (the programs' clock).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * SECOND + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Sweeps the tracker pinned under `dir` every [`SWEEP_INTERVAL`] ([`BUSY_SWEEP_INTERVAL`] while it holds more
/// than [`BUSY_ENTRIES`]), on a thread of its own (a sweep of a full
/// map takes tens of milliseconds of system calls, which the agent's runtime should not wait for), for as
/// long as the process runs.
pub fn spawn(dir: std::path::PathBuf, stats: std::sync::Arc<SweepStats>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("ct-sweep".into())
        .spawn(move || {
            let mut wait = SWEEP_INTERVAL;
            loop {
                std::thread::sleep(wait);
                let started = Instant::now();
                match sweep(&dir, monotonic_ns()) {
                    Ok(s) => {
                        wait = next_sweep(s.entries);
                        stats.entries.store(s.entries as u64, Ordering::Relaxed);
                        stats.removed.fetch_add(s.removed as u64, Ordering::Relaxed);
                        tracing::debug!(entries = s.entries, removed = s.removed, "swept the BPF tracker");
                    }
                    Err(e) => {
                        stats.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "sweeping the BPF connection tracker");
                    }
                }
                stats.sweeps.fetch_add(1, Ordering::Relaxed);
                stats
                    .last_us
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_shortens_a_tcp_flow_life_and_only_tcp_flows_close() {
        let now = 100_000 * SECOND;
        // An established TCP flow idle for an hour is alive; after both FINs 30 s is the end; after a reset
        // 10 s; one FIN alone changes nothing.
        assert!(!expired(6, 0, now - 3600 * SECOND, now));
        assert!(!expired(6, CT_FIN_FWD, now - 3600 * SECOND, now));
        assert!(!expired(6, CT_FIN_FWD | CT_FIN_REV, now - 29 * SECOND, now));
        assert!(expired(6, CT_FIN_FWD | CT_FIN_REV, now - 30 * SECOND, now));
        assert!(!expired(6, CT_RST, now - 9 * SECOND, now));
        assert!(expired(6, CT_RST | CT_FIN_FWD, now - 10 * SECOND, now));
        // The pod's own reset: 1 s.
        assert!(!expired(6, CT_RST | CT_RST_OWN, now - SECOND / 2, now));
        assert!(expired(6, CT_RST | CT_RST_OWN, now - SECOND, now));
        // UDP and the rest keep their idle limits whatever the flags.
        assert!(!expired(17, CT_RST, now - 119 * SECOND, now));
        assert!(expired(17, 0, now - 120 * SECOND, now));
        assert!(expired(1, 0, now - 30 * SECOND, now));
        // Seen after the sweep read the clock: alive.
        assert!(!expired(6, CT_RST, now + SECOND, now));
    }

    #[test]
    fn the_capacity_is_the_maps() {
        let c = include_str!("../../../bpf/policy.c");
        let def = c
            .split("} caracal_ct_v3 SEC")
            .next()
            .and_then(|before| before.rsplit("struct {").next())
            .expect("the tracker's definition");
        assert!(
            def.contains(&format!("__uint(max_entries, {CT_CAPACITY});")),
            "{def}"
        );
    }

    #[test]
    fn a_busy_tracker_is_swept_every_second() {
        assert_eq!(next_sweep(0), SWEEP_INTERVAL);
        assert_eq!(next_sweep(BUSY_ENTRIES), SWEEP_INTERVAL);
        assert_eq!(next_sweep(BUSY_ENTRIES + 1), BUSY_SWEEP_INTERVAL);
    }

    #[test]
    fn the_raw_sizes_are_the_c_structs() {
        // policy.c's struct ct_key and struct ct_value, as the verifier-checked object declares them.
        assert_eq!((KEY_SIZE, VALUE_SIZE), (44, 32));
    }
}
