//! The programs of the real-node lab's own images (`make images`; `e2e/src/bin/caracal-images.rs`), built
//! statically so that each image is one file on an empty root filesystem:
//!
//! - `caracal-pause`, the pod sandbox's process (the `sandbox_image` containerd is configured with, as the
//!   upstream `pause` image): it holds the pod's namespaces, reaps the zombies a shared PID namespace leaves it,
//!   and exits on SIGINT or SIGTERM;
//! - `caracal-echo`, the workload pods' server: TCP and UDP echo on the ports its arguments name, answering
//!   [`WHOAMI`] with the pod's address (as the lab's own pods do, so a probe through a Service sees which
//!   backend answered).

use std::net::{IpAddr, Ipv4Addr};

/// The request a prober sends to learn which pod answered (the lab's `probe::WHOAMI`).
pub const WHOAMI: &[u8] = b"caracal-whoami\n";

/// What the server answers to `got`, received on a socket bound to `local`.
pub fn answer(local: IpAddr, got: &[u8]) -> Vec<u8> {
    if got == WHOAMI {
        format!("{local}\n").into_bytes()
    } else {
        got.to_vec()
    }
}

/// A port and protocol to serve, parsed from `PORT/TCP` or `PORT/UDP` (protocol case-insensitive; TCP if
/// left out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen {
    /// The port.
    pub port: u16,
    /// UDP, else TCP.
    pub udp: bool,
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
        let port = port
            .parse::<u16>()
            .map_err(|e| format!("{s:?}: the port {port:?} is not a number from 1 to 65535 ({e})"))?;
        if port == 0 {
            return Err(format!("{s:?}: port 0 cannot be served"));
        }
        let udp = match proto.to_ascii_uppercase().as_str() {
            "TCP" => false,
            "UDP" => true,
            other => return Err(format!("{s:?}: protocol {other:?} is not TCP or UDP")),
        };
        Ok(Listen { port, udp })
    }
}

/// The IPv4 addresses of this namespace's interfaces other than loopback (a pod's own addresses: UDP is
/// served on each, so that an answer leaves from the address the request was sent to).
pub fn own_ipv4() -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .into_iter()
        .flatten()
        .filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip()))
        .filter(|ip| !ip.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parses_port_and_protocol_and_names_what_is_wrong() {
        assert_eq!(
            "8080".parse(),
            Ok(Listen {
                port: 8080,
                udp: false
            })
        );
        assert_eq!("53/udp".parse(), Ok(Listen { port: 53, udp: true }));
        assert_eq!("80/TCP".parse(), Ok(Listen { port: 80, udp: false }));
        let e = "80/SCTP".parse::<Listen>().unwrap_err();
        assert!(e.contains("SCTP"), "{e}");
        let e = "http/TCP".parse::<Listen>().unwrap_err();
        assert!(e.contains("\"http\""), "{e}");
        assert!("0".parse::<Listen>().is_err());
    }

    #[test]
    fn whoami_gets_the_local_address_and_anything_else_its_echo() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(answer(ip, WHOAMI), b"10.0.0.7\n");
        assert_eq!(answer(ip, b"hello"), b"hello");
    }
}
