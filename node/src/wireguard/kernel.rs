//! The kernel WireGuard backend: a `wireguard` link (rtnetlink) configured over generic netlink (the
//! `wireguard` family's `WG_CMD_GET_DEVICE` / `WG_CMD_SET_DEVICE`), the device Calico uses. Chosen at
//! runtime ([`AutoFactory`]): where the kernel cannot make a `wireguard` link (no module), the agent makes
//! the userspace device instead, and says so once. The same [`uapi::changes`] drive both backends, so a
//! changed peer is removed and added again here too.
//!
//! Requests are blocking, on a socket opened in the device's namespace by the thread that makes the device
//! (a netlink socket stays in the namespace it was opened in).

use std::io;
use std::net::IpAddr;

use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute, WireguardCmd,
    WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use rtnetlink::packet_core::{
    Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, NetlinkSerializable, ParseableParametrized,
};
use rtnetlink::sys::{Socket, SocketAddr as NlAddr, protocols::NETLINK_GENERIC};

use super::uapi::{self, Change, DeviceState, Peer, PeerState, Settings};
use super::{Device, DeviceFactory, WgError};

/// A blocking generic netlink socket.
struct Genl {
    socket: Socket,
    seq: u32,
}

fn io_error(what: &str, e: impl std::fmt::Display) -> WgError {
    WgError::Create {
        name: "wireguard".to_owned(),
        reason: format!("{what}: {e}"),
    }
}

impl Genl {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sends `msg` and collects the answer (a dump's messages, a get's one, nothing for an acknowledged
    /// change); the kernel's refusal is an error with its errno.
    fn request<F>(&mut self, msg: GenlMessage<F>, flags: u16) -> io::Result<Vec<GenlMessage<F>>>
    where
        F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
        GenlMessage<F>: NetlinkSerializable + NetlinkDeserializable,
    {
        self.seq = self.seq.wrapping_add(1);
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
        m.header.flags = flags;
        m.header.sequence_number = self.seq;
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        self.socket.send_to(&buf, &NlAddr::new(0, 0), 0)?;
        let single = flags & (NLM_F_DUMP | NLM_F_ACK) == 0;
        let mut out = Vec::new();
        let mut rx = vec![0u8; 65536];
        loop {
            let n = self.socket.recv(&mut &mut rx[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let reply = NetlinkMessage::<GenlMessage<F>>::deserialize(&rx[offset..n])
                    .map_err(|e| io::Error::other(e.to_string()))?;
                let len = reply.header.length as usize;
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        out.push(inner);
                        if single {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }

    /// The `wireguard` family's id (none: the module is not loaded).
    fn family(&mut self) -> io::Result<u16> {
        let ask = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(
                WireguardMessage::family_name().to_owned(),
            )],
        });
        self.request(ask, NLM_F_REQUEST)?
            .into_iter()
            .flat_map(|m| m.payload.nlas)
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(id),
                _ => None,
            })
            .ok_or_else(|| io::Error::other("no wireguard family id in the answer"))
    }
}

/// A kernel WireGuard device.
pub struct KernelDevice {
    name: String,
    genl: Genl,
    family: u16,
}

impl std::fmt::Debug for KernelDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDevice")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn allowed(net: &ipnet::IpNet) -> WireguardAllowedIp {
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(if net.addr().is_ipv6() {
            WireguardAddressFamily::Ipv6
        } else {
            WireguardAddressFamily::Ipv4
        }),
        WireguardAllowedIpAttr::IpAddr(net.addr()),
        WireguardAllowedIpAttr::Cidr(net.prefix_len()),
    ])
}

/// A change as a `WG_CMD_SET_DEVICE` message's attributes (after the device's name).
pub fn attributes(change: &Change) -> Vec<WireguardAttribute> {
    match change {
        Change::Settings {
            private_hex,
            listen_port,
            fwmark,
        } => {
            let mut a = Vec::new();
            if let Some(k) = private_hex.as_deref().and_then(uapi::key_from_hex) {
                a.push(WireguardAttribute::PrivateKey(k));
            }
            if let Some(p) = listen_port {
                a.push(WireguardAttribute::ListenPort(*p));
            }
            a.push(WireguardAttribute::Fwmark(*fwmark));
            a
        }
        Change::RemovePeer(key) => vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(*key),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ])])],
        Change::AddPeer(p) => {
            let mut peer = vec![
                WireguardPeerAttribute::PublicKey(p.public_key),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
            ];
            if let Some(e) = p.endpoint {
                peer.push(WireguardPeerAttribute::Endpoint(e));
            }
            if p.keepalive > 0 {
                peer.push(WireguardPeerAttribute::PersistentKeepalive(p.keepalive));
            }
            peer.push(WireguardPeerAttribute::AllowedIps(
                p.allowed_ips.iter().map(allowed).collect(),
            ));
            vec![WireguardAttribute::Peers(vec![WireguardPeer(peer)])]
        }
    }
}

/// A `WG_CMD_GET_DEVICE` answer (every message of the dump) as the device's state.
pub fn state_of(attrs: impl IntoIterator<Item = WireguardAttribute>) -> DeviceState {
    let mut dev = DeviceState::default();
    for a in attrs {
        match a {
            WireguardAttribute::PublicKey(k) => dev.public_key = Some(k),
            WireguardAttribute::ListenPort(p) => dev.listen_port = p,
            WireguardAttribute::Fwmark(m) => dev.fwmark = m,
            WireguardAttribute::Peers(peers) => {
                for WireguardPeer(attrs) in peers {
                    let mut key = None;
                    let mut s = PeerState::default();
                    for pa in attrs {
                        match pa {
                            WireguardPeerAttribute::PublicKey(k) => key = Some(k),
                            WireguardPeerAttribute::Endpoint(e) => s.endpoint = Some(e),
                            WireguardPeerAttribute::PersistentKeepalive(k) => s.keepalive = k,
                            WireguardPeerAttribute::LastHandshake(t) => {
                                s.last_handshake_s = u64::try_from(t.seconds).unwrap_or(0);
                            }
                            WireguardPeerAttribute::RxBytes(b) => s.rx_bytes = b,
                            WireguardPeerAttribute::TxBytes(b) => s.tx_bytes = b,
                            WireguardPeerAttribute::AllowedIps(ips) => {
                                for WireguardAllowedIp(ia) in ips {
                                    let (mut ip, mut cidr): (Option<IpAddr>, Option<u8>) = (None, None);
                                    for x in ia {
                                        match x {
                                            WireguardAllowedIpAttr::IpAddr(a) => ip = Some(a),
                                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(c),
                                            _ => {}
                                        }
                                    }
                                    if let (Some(ip), Some(c)) = (ip, cidr)
                                        && let Ok(net) = ipnet::IpNet::new(ip, c)
                                    {
                                        s.allowed_ips.push(net);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    if let Some(k) = key {
                        // A peer split over two messages of the dump keeps what the first gave.
                        let e = dev.peers.entry(k).or_default();
                        if s.endpoint.is_some() {
                            e.endpoint = s.endpoint;
                        }
                        e.allowed_ips.extend(s.allowed_ips);
                        e.keepalive = e.keepalive.max(s.keepalive);
                        e.last_handshake_s = e.last_handshake_s.max(s.last_handshake_s);
                        e.rx_bytes = e.rx_bytes.max(s.rx_bytes);
                        e.tx_bytes = e.tx_bytes.max(s.tx_bytes);
                    }
                }
            }
            _ => {}
        }
    }
    dev
}

impl KernelDevice {
    fn message(
        &self,
        cmd: WireguardCmd,
        mut attributes: Vec<WireguardAttribute>,
    ) -> GenlMessage<WireguardMessage> {
        attributes.insert(0, WireguardAttribute::IfName(self.name.clone()));
        let mut m = GenlMessage::from_payload(WireguardMessage { cmd, attributes });
        m.set_resolved_family_id(self.family);
        m
    }
}

impl Device for KernelDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn state(&mut self) -> Result<DeviceState, WgError> {
        let ask = self.message(WireguardCmd::GetDevice, Vec::new());
        let answer = self
            .genl
            .request(ask, NLM_F_REQUEST | NLM_F_DUMP)
            .map_err(|e| io_error("reading the kernel WireGuard device", e))?;
        Ok(state_of(answer.into_iter().flat_map(|m| m.payload.attributes)))
    }

    fn configure(&mut self, settings: &Settings, peers: &[Peer]) -> Result<usize, WgError> {
        let have = self.state()?;
        let changes = uapi::changes(&have, settings, peers);
        for c in &changes {
            let m = self.message(WireguardCmd::SetDevice, attributes(c));
            self.genl
                .request(m, NLM_F_REQUEST | NLM_F_ACK)
                .map_err(|e| io_error("configuring the kernel WireGuard device", e))?;
        }
        Ok(changes.len())
    }
}

/// Whether an error from adding a `wireguard` link means the kernel has no WireGuard (the module missing:
/// "Unknown device type", `EOPNOTSUPP`).
fn no_module(e: &crate::netlink::NetlinkError) -> bool {
    let text = e.to_string();
    text.contains("Operation not supported") || text.contains("os error 95") || text.contains("-95")
}

/// Makes a kernel WireGuard device `name` in the calling thread's namespace: None when the kernel has no
/// WireGuard.
pub fn create(name: &str) -> Result<Option<KernelDevice>, WgError> {
    let mut rtnl = crate::netlink::blocking::Rtnl::open().map_err(|e| io_error("a netlink socket", e))?;
    if rtnl
        .link(name)
        .map_err(|e| io_error("looking for the device", e))?
        .is_none()
    {
        let msg = rtnetlink::LinkWireguard::new(name).build();
        if let Err(e) = rtnl.add_link(&format!("creating {name}"), msg) {
            if no_module(&e) {
                return Ok(None);
            }
            return Err(io_error("creating the kernel WireGuard device", e));
        }
    }
    let mut genl = Genl::open().map_err(|e| io_error("a generic netlink socket", e))?;
    let family = genl
        .family()
        .map_err(|e| io_error("the kernel's wireguard netlink family", e))?;
    Ok(Some(KernelDevice {
        name: name.to_owned(),
        genl,
        family,
    }))
}

/// Which backend a node's devices use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The kernel's module.
    Kernel,
    /// boringtun's userspace device.
    Userspace,
}

/// Makes kernel devices where the kernel can, userspace ones otherwise (decided at the first device and
/// kept), in the namespace `netns` names (None: the agent's own).
#[derive(Debug, Default)]
pub struct AutoFactory {
    /// A named network namespace for an agent that programs another one.
    pub netns: Option<std::path::PathBuf>,
    /// The backend chosen, once one is.
    pub chosen: Option<Backend>,
    /// Never the kernel's (the userspace device everywhere).
    pub userspace_only: bool,
}

impl DeviceFactory for AutoFactory {
    fn create(&mut self, name: &str) -> Result<Box<dyn Device>, WgError> {
        if !self.userspace_only && self.chosen != Some(Backend::Userspace) {
            let owned = name.to_owned();
            match super::in_netns(self.netns.clone(), move || create(&owned))? {
                Some(d) => {
                    if self.chosen.is_none() {
                        tracing::info!("WireGuard: the kernel's module");
                    }
                    self.chosen = Some(Backend::Kernel);
                    return Ok(Box::new(d));
                }
                None => {
                    tracing::info!(
                        "WireGuard: the kernel has no wireguard module; using the userspace device (boringtun)"
                    );
                    self.chosen = Some(Backend::Userspace);
                }
            }
        }
        self.chosen = Some(Backend::Userspace);
        super::userspace::UserspaceFactory {
            netns: self.netns.clone(),
        }
        .create(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_become_the_kernels_attributes_and_its_answer_becomes_the_state() {
        let peer = Peer {
            public_key: [3; 32],
            endpoint: Some("10.99.0.3:51820".parse().expect("addr")),
            allowed_ips: vec![
                "10.244.1.0/26".parse().expect("net"),
                "fd10::/122".parse().expect("net"),
            ],
            keepalive: 0,
        };
        let add = attributes(&Change::AddPeer(peer.clone()));
        let WireguardAttribute::Peers(p) = &add[0] else {
            panic!("a peer: {add:?}")
        };
        assert!(p[0].0.contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));
        let remove = attributes(&Change::RemovePeer([3; 32]));
        let WireguardAttribute::Peers(r) = &remove[0] else {
            panic!("a peer: {remove:?}")
        };
        assert!(
            r[0].0
                .contains(&WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe))
        );
        let settings = attributes(&Change::Settings {
            private_hex: Some(super::super::keys::hex(&[9; 32])),
            listen_port: Some(51820),
            fwmark: 0x100000,
        });
        assert_eq!(
            settings,
            vec![
                WireguardAttribute::PrivateKey([9; 32]),
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Fwmark(0x100000),
            ]
        );
        // What the kernel answers with the peer added reads back as the same peer: no change planned.
        let mut answer = vec![
            WireguardAttribute::PublicKey([10; 32]),
            WireguardAttribute::ListenPort(51820),
            WireguardAttribute::Fwmark(0x100000),
        ];
        if let WireguardAttribute::Peers(mut p) = add.into_iter().next().expect("peer") {
            p[0].0.retain(|a| !matches!(a, WireguardPeerAttribute::Flags(_)));
            answer.push(WireguardAttribute::Peers(p));
        }
        let state = state_of(answer);
        let s = Settings {
            private_hex: super::super::keys::hex(&[9; 32]),
            public_key: [10; 32],
            listen_port: 51820,
            fwmark: 0x100000,
        };
        assert!(uapi::changes(&state, &s, &[peer]).is_empty(), "{state:?}");
    }
}
