//! Blocking rtnetlink on the calling thread: one socket, each request answered inside the thread's own
//! `sendmsg` / `recvmsg`, no runtime and no hand-off to another thread.
//!
//! Why it exists beside the async [`super::Netlink`]: wiring a pod is a dozen requests in two namespaces, and
//! on the async connection each request crosses threads twice (the caller's task to the connection's
//! thread and back). When twenty pods are wired at once on a two-core node, every crossing waits for a
//! CPU behind the plugin processes, the API server and the policy writes; a whole pod's requests issued
//! from one thread wait once. [`crate::cni::wire`] runs each pod on a thread of its own that holds one of
//! these sockets in the node's namespace and one in the pod's.
//!
//! A socket belongs to the namespace its thread was in when it was opened ([`Rtnl::open`]); the thread may
//! leave that namespace afterwards and keep using it.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;

use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use rtnetlink::{AddressMessageBuilder, LinkUnspec};

use super::{NetlinkError, OwnedRoute, default_route_message, is_not_found, parse_route, route_message};

/// A blocking rtnetlink socket.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

/// Moves the calling thread into the network namespace `ns` (a `/run/netns/…` or `/proc/…/ns/net` file).
pub fn enter(ns: impl AsFd) -> io::Result<()> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

impl Rtnl {
    /// A socket in the calling thread's current network namespace.
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            socket: Socket::new(NETLINK_ROUTE)?,
            seq: 0,
        })
    }

    /// Sends `msg` with `flags` and collects the answer: the messages of a dump or a get, nothing for an
    /// acknowledged change. The kernel's refusal becomes [`NetlinkError::Request`] naming `what`.
    fn request(
        &mut self,
        what: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let io_error = |source: io::Error| NetlinkError::Io {
            what: what.to_owned(),
            source,
        };
        self.seq = self.seq.wrapping_add(1);
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
        m.header.flags = flags;
        m.header.sequence_number = self.seq;
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        self.socket
            .send_to(&buf, &SocketAddr::new(0, 0), 0)
            .map_err(io_error)?;
        // A get without NLM_F_ACK is answered by one message; a dump ends with DONE; a change with an ACK.
        let single = flags & (NLM_F_DUMP | NLM_F_ACK) == 0;
        let mut out = Vec::new();
        loop {
            let (reply, _) = self.socket.recv_from_full().map_err(io_error)?;
            let mut at = 0;
            while at + 16 <= reply.len() {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[at..])
                    .map_err(|e| io_error(io::Error::other(format!("undecodable answer: {e}"))))?;
                let len = m.header.length as usize;
                if len < 16 {
                    break;
                }
                at += (len + 3) & !3;
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Error(e) if e.code.is_none() => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return Err(NetlinkError::Request {
                            what: what.to_owned(),
                            source: rtnetlink::Error::NetlinkError(e),
                        });
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(inner) => {
                        out.push(inner);
                        if single {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn change(&mut self, what: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NetlinkError> {
        self.request(what, msg, NLM_F_REQUEST | NLM_F_ACK | flags)
            .map(drop)
    }

    /// The link named `name`, if any (one request, no dump).
    pub fn link(&mut self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(
            &format!("reading link {name}"),
            RouteNetlinkMessage::GetLink(msg),
            NLM_F_REQUEST,
        ) {
            Ok(found) => Ok(found.into_iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a link (`msg` as built by rtnetlink's `LinkMessageBuilder`); one that exists is an error.
    pub fn add_link(&mut self, what: &str, msg: LinkMessage) -> Result<(), NetlinkError> {
        self.change(what, RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Deletes the link named `name`; absent is fine. Returns whether it existed.
    pub fn del_link(&mut self, name: &str) -> Result<bool, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.change(
            &format!("deleting link {name}"),
            RouteNetlinkMessage::DelLink(msg),
            0,
        ) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets link `index` up.
    pub fn set_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.change(
            &format!("setting link {index} up"),
            RouteNetlinkMessage::SetLink(msg),
            0,
        )
    }

    /// Adds `addr` to link `index` (already present is fine).
    pub fn add_addr(&mut self, index: u32, addr: IpNet) -> Result<(), NetlinkError> {
        let msg = match addr.addr() {
            IpAddr::V4(a) => AddressMessageBuilder::<std::net::Ipv4Addr>::new()
                .index(index)
                .address(a, addr.prefix_len())
                .build(),
            IpAddr::V6(a) => AddressMessageBuilder::<std::net::Ipv6Addr>::new()
                .index(index)
                .address(a, addr.prefix_len())
                .build(),
        };
        match self.change(
            &format!("adding {addr} to link {index}"),
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            }) if m.raw_code() == -libc::EEXIST => Ok(()),
            other => other,
        }
    }

    /// The addresses on link `index`.
    pub fn addrs(&mut self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        let all = self.request(
            "listing addresses",
            RouteNetlinkMessage::GetAddress(Default::default()),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        Ok(all
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if a.header.index == index => {
                    let prefix = a.header.prefix_len;
                    a.attributes.into_iter().find_map(|x| match x {
                        AddressAttribute::Address(ip) => IpNet::new(ip, prefix).ok(),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Adds (or replaces) a route of either family, tagged with `proto`.
    pub fn replace_route(&mut self, route: &OwnedRoute, proto: u8) -> Result<(), NetlinkError> {
        self.change(
            &format!("writing route {}", route.dst),
            RouteNetlinkMessage::NewRoute(route_message(route, proto, super::MAIN_TABLE)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Adds (or replaces) the default route via `gw` on `index`, tagged as Caracal's.
    pub fn add_default_via(&mut self, gw: IpAddr, index: u32) -> Result<(), NetlinkError> {
        self.change(
            "adding the default route",
            RouteNetlinkMessage::NewRoute(default_route_message(gw, index)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Every route of both families in the main table tagged with `proto`.
    pub fn routes(&mut self, proto: u8) -> Result<Vec<OwnedRoute>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let all = self.request(
                "listing routes",
                RouteNetlinkMessage::GetRoute(msg),
                NLM_F_REQUEST | NLM_F_DUMP,
            )?;
            out.extend(all.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) if u8::from(r.header.protocol) == proto => parse_route(&r),
                _ => None,
            }));
        }
        Ok(out)
    }
}
