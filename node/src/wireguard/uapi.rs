//! WireGuard's cross-platform userspace API (the `get=1` / `set=1` text protocol every userspace
//! implementation serves, boringtun's included): requests rendered from what the device should have, and the
//! device's `get` answer parsed. Pure, apart from [`exchange`], which carries one request over a stream.
//!
//! boringtun cannot change a peer it has (it panics in its device thread), and keeps a peer section's flags
//! for the next section of the same request; so a change is sent as single-peer requests only: one removes a
//! peer, another adds one, and a changed peer is removed and added again ([`plan`]).

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::net::SocketAddr;

use ipnet::IpNet;

use super::keys::hex;

/// One peer, as the device should have it or as it reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its public key.
    pub public_key: [u8; 32],
    /// Where its encrypted packets go.
    pub endpoint: Option<SocketAddr>,
    /// What it may send and what is sent to it.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive, seconds (0: off).
    pub keepalive: u16,
}

/// A peer as the device reports it: its configuration and its session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerState {
    /// Configuration.
    pub endpoint: Option<SocketAddr>,
    /// Allowed IPs.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive, seconds.
    pub keepalive: u16,
    /// The last completed handshake, seconds since the epoch (0: none yet).
    pub last_handshake_s: u64,
    /// Bytes received from it.
    pub rx_bytes: u64,
    /// Bytes sent to it.
    pub tx_bytes: u64,
}

/// The device as it reports itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Its public key (None: no private key set yet).
    pub public_key: Option<[u8; 32]>,
    /// Its UDP port.
    pub listen_port: u16,
    /// The mark on its UDP packets.
    pub fwmark: u32,
    /// Its peers by public key.
    pub peers: BTreeMap<[u8; 32], PeerState>,
}

/// Errors of the protocol.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    /// The stream failed.
    #[error("talking to the WireGuard device: {0}")]
    Io(#[from] std::io::Error),
    /// The device refused a request.
    #[error("the WireGuard device refused a request (errno {errno}): {request}")]
    Refused {
        /// Its errno.
        errno: i32,
        /// The request, with any private key blanked.
        request: String,
    },
    /// An answer that is not the protocol's.
    #[error("the WireGuard device answered something unexpected: {0}")]
    Garbled(String),
}

/// The 32 bytes of a hex key (None: not 64 hex digits).
pub fn key_from_hex(hex_text: &str) -> Option<[u8; 32]> {
    if hex_text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex_text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Parses a `get=1` answer (without its `errno=` line).
pub fn parse_get(text: &str) -> Result<DeviceState, UapiError> {
    let mut dev = DeviceState::default();
    let mut peer: Option<[u8; 32]> = None;
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| UapiError::Garbled(line.to_owned()))?;
        let num = |v: &str| v.parse::<u64>().map_err(|_| UapiError::Garbled(line.to_owned()));
        match (k, peer) {
            ("public_key", _) => {
                let key = key_from_hex(v).ok_or_else(|| UapiError::Garbled(line.to_owned()))?;
                dev.peers.insert(key, PeerState::default());
                peer = Some(key);
            }
            ("private_key", None) => {
                let private = key_from_hex(v).ok_or_else(|| UapiError::Garbled("private_key".to_owned()))?;
                dev.public_key = Some(super::keys::KeyPair::from_private(private).public.to_bytes());
            }
            ("listen_port", None) => dev.listen_port = num(v)? as u16,
            ("fwmark", None) => dev.fwmark = num(v)? as u32,
            ("endpoint", Some(p)) => {
                if let Some(s) = dev.peers.get_mut(&p) {
                    s.endpoint = v.parse().ok();
                }
            }
            ("allowed_ip", Some(p)) => {
                if let (Some(s), Ok(net)) = (dev.peers.get_mut(&p), v.parse::<IpNet>()) {
                    s.allowed_ips.push(net);
                }
            }
            ("persistent_keepalive_interval", Some(p)) => {
                if let Some(s) = dev.peers.get_mut(&p) {
                    s.keepalive = num(v)? as u16;
                }
            }
            ("last_handshake_time_sec", Some(p)) => {
                if let Some(s) = dev.peers.get_mut(&p) {
                    s.last_handshake_s = num(v)?;
                }
            }
            ("rx_bytes", Some(p)) => {
                if let Some(s) = dev.peers.get_mut(&p) {
                    s.rx_bytes = num(v)?;
                }
            }
            ("tx_bytes", Some(p)) => {
                if let Some(s) = dev.peers.get_mut(&p) {
                    s.tx_bytes = num(v)?;
                }
            }
            // Anything else (protocol_version, last_handshake_time_nsec, ...) is not needed.
            _ => {}
        }
    }
    Ok(dev)
}

/// The device-wide settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The private key, hex.
    pub private_hex: String,
    /// Its public key.
    pub public_key: [u8; 32],
    /// The UDP port.
    pub listen_port: u16,
    /// The mark on its UDP packets.
    pub fwmark: u32,
}

/// One change to a device, as either backend carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The device-wide settings: the private key (hex) when the device's differs, the port when it differs,
    /// and the mark (always with these, so a new socket gets it).
    Settings {
        /// The private key, hex.
        private_hex: Option<String>,
        /// The UDP port.
        listen_port: Option<u16>,
        /// The mark.
        fwmark: u32,
    },
    /// A peer removed.
    RemovePeer([u8; 32]),
    /// A peer added.
    AddPeer(Peer),
}

/// The changes that take a device from `have` to `settings` with `peers`, in order: the device's settings
/// (the private key first, since peers need it), then the removals, then the additions. A peer whose
/// configuration differs is removed and added again (its session starts over); an unchanged one is not
/// touched. Nothing when the device matches.
pub fn changes(have: &DeviceState, settings: &Settings, peers: &[Peer]) -> Vec<Change> {
    let mut out = Vec::new();
    let private_hex = (have.public_key != Some(settings.public_key)).then(|| settings.private_hex.clone());
    let listen_port = (have.listen_port != settings.listen_port).then_some(settings.listen_port);
    if private_hex.is_some() || listen_port.is_some() || have.fwmark != settings.fwmark {
        out.push(Change::Settings {
            private_hex,
            listen_port,
            fwmark: settings.fwmark,
        });
    }
    let want: BTreeMap<[u8; 32], &Peer> = peers.iter().map(|p| (p.public_key, p)).collect();
    let same = |p: &Peer, s: &PeerState| {
        let mut a = p.allowed_ips.clone();
        let mut b = s.allowed_ips.clone();
        a.sort();
        b.sort();
        p.endpoint == s.endpoint && a == b && p.keepalive == s.keepalive
    };
    let mut add = Vec::new();
    for (key, state) in &have.peers {
        match want.get(key) {
            Some(p) if same(p, state) => {}
            Some(p) => {
                out.push(Change::RemovePeer(*key));
                add.push(*p);
            }
            None => out.push(Change::RemovePeer(*key)),
        }
    }
    add.extend(peers.iter().filter(|p| !have.peers.contains_key(&p.public_key)));
    out.extend(add.into_iter().map(|p| Change::AddPeer(p.clone())));
    out
}

/// A change as a UAPI `set=1` request (ending with its blank line).
pub fn request(change: &Change) -> String {
    match change {
        Change::Settings {
            private_hex,
            listen_port,
            fwmark,
        } => {
            let mut req = String::from("set=1\n");
            if let Some(k) = private_hex {
                req.push_str(&format!("private_key={k}\n"));
            }
            if let Some(p) = listen_port {
                req.push_str(&format!("listen_port={p}\n"));
            }
            req.push_str(&format!("fwmark={fwmark}\n\n"));
            req
        }
        Change::RemovePeer(key) => format!("set=1\npublic_key={}\nremove=true\n\n", hex(key)),
        Change::AddPeer(p) => {
            let mut req = format!("set=1\npublic_key={}\n", hex(&p.public_key));
            if let Some(e) = p.endpoint {
                req.push_str(&format!("endpoint={e}\n"));
            }
            if p.keepalive > 0 {
                req.push_str(&format!("persistent_keepalive_interval={}\n", p.keepalive));
            }
            req.push_str("replace_allowed_ips=true\n");
            for ip in &p.allowed_ips {
                req.push_str(&format!("allowed_ip={ip}\n"));
            }
            req.push('\n');
            req
        }
    }
}

/// [`changes`] as UAPI requests.
pub fn plan(have: &DeviceState, settings: &Settings, peers: &[Peer]) -> Vec<String> {
    changes(have, settings, peers).iter().map(request).collect()
}

/// Sends one request (`get=1\n\n` or a `set=1` one from [`plan`]) over `stream` and reads the answer up to
/// its `errno=` line and the blank line after it; the answer's lines before it (a `get`'s) are returned.
pub fn exchange<S: std::io::Read + std::io::Write>(
    stream: &mut S,
    request: &str,
) -> Result<String, UapiError> {
    stream.write_all(request.as_bytes())?;
    stream.flush()?;
    let mut reader = std::io::BufReader::new(stream);
    let mut body = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(UapiError::Garbled("the device closed the connection".to_owned()));
        }
        if let Some(errno) = line.trim_end().strip_prefix("errno=") {
            // The blank line that ends the answer.
            let mut end = String::new();
            reader.read_line(&mut end)?;
            let errno: i32 = errno.parse().map_err(|_| UapiError::Garbled(line.clone()))?;
            if errno != 0 {
                let request = request
                    .lines()
                    .map(|l| {
                        if l.starts_with("private_key=") {
                            "private_key=(hidden)"
                        } else {
                            l
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(UapiError::Refused { errno, request });
            }
            return Ok(body);
        }
        body.push_str(&line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> [u8; 32] {
        [n; 32]
    }

    fn peer(n: u8, allowed: &[&str]) -> Peer {
        Peer {
            public_key: key(n),
            endpoint: Some(format!("192.0.2.{n}:51820").parse().expect("addr")),
            allowed_ips: allowed.iter().map(|a| a.parse().expect("net")).collect(),
            keepalive: 0,
        }
    }

    fn settings() -> Settings {
        Settings {
            private_hex: hex(&key(9)),
            public_key: key(10),
            listen_port: 51820,
            fwmark: 0x100000,
        }
    }

    #[test]
    fn a_new_device_gets_its_settings_first_then_one_request_per_peer() {
        let reqs = plan(
            &DeviceState::default(),
            &settings(),
            &[
                peer(1, &["10.0.1.0/26", "10.0.9.1/32"]),
                peer(2, &["10.0.2.0/26"]),
            ],
        );
        assert_eq!(reqs.len(), 3, "{reqs:?}");
        assert!(reqs[0].starts_with(&format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nfwmark=1048576\n\n",
            hex(&key(9))
        )));
        assert_eq!(
            reqs[1],
            format!(
                "set=1\npublic_key={}\nendpoint=192.0.2.1:51820\nreplace_allowed_ips=true\nallowed_ip=10.0.1.0/26\nallowed_ip=10.0.9.1/32\n\n",
                hex(&key(1))
            )
        );
        assert!(reqs[2].contains(&hex(&key(2))) && !reqs[2].contains(&hex(&key(1))));
    }

    #[test]
    fn unchanged_peers_are_left_alone_changed_ones_removed_and_added_gone_ones_removed() {
        let mut have = DeviceState {
            public_key: Some(key(10)),
            listen_port: 51820,
            fwmark: 0x100000,
            ..Default::default()
        };
        for (n, allowed) in [(1u8, "10.0.1.0/26"), (2, "10.0.2.0/26"), (3, "10.0.3.0/26")] {
            have.peers.insert(
                key(n),
                PeerState {
                    endpoint: Some(format!("192.0.2.{n}:51820").parse().expect("addr")),
                    allowed_ips: vec![allowed.parse().expect("net")],
                    ..Default::default()
                },
            );
        }
        // 1 as it is; 2 with one more block; 3 gone; 4 new.
        let want = [
            peer(1, &["10.0.1.0/26"]),
            peer(2, &["10.0.2.0/26", "10.0.2.64/26"]),
            peer(4, &["10.0.4.0/26"]),
        ];
        let reqs = plan(&have, &settings(), &want);
        assert_eq!(
            reqs,
            vec![
                format!("set=1\npublic_key={}\nremove=true\n\n", hex(&key(2))),
                format!("set=1\npublic_key={}\nremove=true\n\n", hex(&key(3))),
                format!(
                    "set=1\npublic_key={}\nendpoint=192.0.2.2:51820\nreplace_allowed_ips=true\nallowed_ip=10.0.2.0/26\nallowed_ip=10.0.2.64/26\n\n",
                    hex(&key(2))
                ),
                format!(
                    "set=1\npublic_key={}\nendpoint=192.0.2.4:51820\nreplace_allowed_ips=true\nallowed_ip=10.0.4.0/26\n\n",
                    hex(&key(4))
                ),
            ]
        );
        // Matching already: nothing to send.
        let mut now = have.clone();
        now.peers.remove(&key(3));
        now.peers
            .get_mut(&key(2))
            .expect("2")
            .allowed_ips
            .push("10.0.2.64/26".parse().expect("net"));
        now.peers.insert(
            key(4),
            PeerState {
                endpoint: Some("192.0.2.4:51820".parse().expect("addr")),
                allowed_ips: vec!["10.0.4.0/26".parse().expect("net")],
                ..Default::default()
            },
        );
        assert!(plan(&now, &settings(), &want).is_empty());
    }

    #[test]
    fn a_get_answer_is_read_and_a_refusal_hides_the_private_key() {
        let text = format!(
            "private_key={}\nlisten_port=51820\nfwmark=1048576\npublic_key={}\nendpoint=192.0.2.1:51820\nallowed_ip=10.0.1.0/26\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\nrx_bytes=10\ntx_bytes=20\npersistent_keepalive_interval=0\nprotocol_version=1\n",
            hex(&key(9)),
            hex(&key(1))
        );
        let dev = parse_get(&text).expect("parsed");
        assert_eq!(dev.listen_port, 51820);
        assert_eq!(dev.fwmark, 0x100000);
        assert_eq!(
            dev.public_key,
            Some(
                super::super::keys::KeyPair::from_private(key(9))
                    .public
                    .to_bytes()
            )
        );
        let p = &dev.peers[&key(1)];
        assert_eq!(p.last_handshake_s, 1_700_000_000);
        assert_eq!((p.rx_bytes, p.tx_bytes), (10, 20));
        assert_eq!(p.allowed_ips, vec!["10.0.1.0/26".parse::<IpNet>().expect("net")]);

        // Over a stream: the answer up to errno, and a refusal names the errno without the key.
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let server = std::thread::spawn(move || {
            use std::io::Write as _;
            let mut r = std::io::BufReader::new(b.try_clone().expect("clone"));
            let mut line = String::new();
            while r.read_line(&mut line).expect("read") > 0 && !line.ends_with("\n\n") {}
            b.write_all(b"errno=22\n\n").expect("answer");
        });
        let req = format!("set=1\nprivate_key={}\n\n", hex(&key(9)));
        let err = exchange(&mut a, &req).expect_err("refused");
        server.join().expect("server");
        let shown = err.to_string();
        assert!(shown.contains("errno 22"), "{shown}");
        assert!(!shown.contains(&hex(&key(9))), "{shown}");
    }
}
