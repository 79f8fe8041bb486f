//! Captures on a namespace's wire: every frame a packet socket (`AF_PACKET`, all protocols) in a namespace
//! sees while something runs, and what they carried between two addresses. What the WireGuard tests use to
//! show that nothing but WireGuard's UDP crosses the underlay.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::netns::NetNs;

/// Every frame the namespace `ns` sends or receives on any of its interfaces while `f` runs (and for 200 ms
/// after, so late replies are in).
pub fn capture<T>(ns: &NetNs, f: impl FnOnce() -> T) -> (T, Vec<Vec<u8>>) {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = NetNs::existing(ns.name());
    let reader = std::thread::spawn(move || {
        ns.enter(move || {
            let fd = match socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::empty(),
                SockProtocol::EthAll,
            ) {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return Vec::new();
                }
            };
            let sock = std::net::UdpSocket::from(fd);
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            let _ = tx.send(Ok(()));
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !s2.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    frames.push(buf[..n].to_vec());
                }
            }
            frames
        })
        .unwrap_or_default()
    });
    if let Ok(Err(e)) = rx.recv() {
        panic!("opening a packet socket for a capture: {e}");
    }
    let out = f();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let frames = reader.join().unwrap_or_default();
    (out, frames)
}

/// One IP packet of a capture: protocol, source and destination, and the ports (TCP, UDP; 0 otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// IP protocol (IPv6: the first header's next header).
    pub proto: u8,
    /// Source.
    pub src: IpAddr,
    /// Destination.
    pub dst: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

/// One Ethernet frame's IP packet, if it is one.
fn seen(f: &[u8]) -> Option<Seen> {
    let ip = f.get(14..)?;
    let (proto, src, dst, l4) = match f.get(12..14)? {
        [0x08, 0x00] if ip.len() >= 20 => (
            ip[9],
            IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).ok()?),
            IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).ok()?),
            ip.get(usize::from(ip[0] & 0xf) * 4..)?,
        ),
        [0x86, 0xdd] if ip.len() >= 40 => (
            ip[6],
            IpAddr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?),
            IpAddr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?),
            &ip[40..],
        ),
        _ => return None,
    };
    let ports = matches!(proto, 6 | 17) && l4.len() >= 4;
    Some(Seen {
        proto,
        src,
        dst,
        sport: if ports {
            u16::from_be_bytes([l4[0], l4[1]])
        } else {
            0
        },
        dport: if ports {
            u16::from_be_bytes([l4[2], l4[3]])
        } else {
            0
        },
    })
}

/// The IP packets (IPv4 or IPv6) of `frames` (Ethernet) between `a` and `b`, either way.
pub fn between(frames: &[Vec<u8>], a: IpAddr, b: IpAddr) -> Vec<Seen> {
    frames
        .iter()
        .filter_map(|f| seen(f))
        .filter(|s| (s.src == a && s.dst == b) || (s.src == b && s.dst == a))
        .collect()
}

/// Whether any frame carries `needle`.
pub fn carries(frames: &[Vec<u8>], needle: &[u8]) -> bool {
    frames
        .iter()
        .any(|f| f.windows(needle.len()).any(|w| w == needle))
}
