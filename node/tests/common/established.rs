//! An established TCP connection between two namespaces, for tests that change the data plane under it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use caracal_e2e::netns::NetNs;

/// A connection from a client namespace to `ip:port` in a server namespace (both ends held by the test).
pub struct Established {
    client: TcpStream,
    server: TcpStream,
}

impl Established {
    /// Listens in `server` on `ip:port`, connects from `client`, and keeps both ends (the listener goes).
    pub fn open(client: &NetNs, server: &NetNs, ip: Ipv4Addr, port: u16) -> Self {
        Self::open_via(client, server, ip, port, (ip, port).into())
    }

    /// Listens in `server` on `ip:port` and connects from `client` to `via` (an address the node translates to
    /// `ip:port`, as kube-proxy's DNAT of a ClusterIP).
    pub fn open_via(
        client: &NetNs,
        server: &NetNs,
        ip: Ipv4Addr,
        port: u16,
        via: std::net::SocketAddr,
    ) -> Self {
        let listener = server
            .enter(move || std::net::TcpListener::bind((ip, port)))
            .expect("enter")
            .expect("bind");
        let client = client
            .enter(move || TcpStream::connect_timeout(&via, Duration::from_secs(3)))
            .expect("enter")
            .expect("connect");
        let (server, _) = listener.accept().expect("accept");
        Established { client, server }
    }

    /// The server speaks first, then the client answers: after a change, the first packet of the flow is one
    /// the server's side may not start, so only a flow the data plane knows as established passes.
    pub fn roundtrip(&mut self, when: &str) {
        for s in [&self.client, &self.server] {
            s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        }
        self.server.write_all(b"helo").expect("write");
        let mut buf = [0u8; 4];
        self.client
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{when}: the client reads nothing: {e}"));
        self.client.write_all(b"ping").expect("answer");
        self.server
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{when}: the server gets no answer: {e}"));
        assert_eq!(&buf, b"ping", "{when}");
    }
}
