//! Real-packet probes between namespaces: TCP (connect, then an echo, so replies of established connections
//! are shown to pass), UDP (request and echo) and ICMP (any type/code, over a raw socket).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::netns::{NetNs, NetnsError};

/// What a probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The connection worked both ways.
    Connected,
    /// Nothing answered before the timeout (a dropped packet).
    NoAnswer,
    /// The peer refused (a TCP RST or ICMP unreachable).
    Refused,
    /// Something else went wrong.
    Error(String),
}

impl Outcome {
    /// True for [`Outcome::Connected`].
    pub fn connected(&self) -> bool {
        *self == Outcome::Connected
    }
}

/// TCP from `src` to `dst_ip:port` (either family; a listener is opened in `dst` for the probe).
pub fn tcp(
    src: &NetNs,
    dst: &NetNs,
    dst_ip: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<Outcome, NetnsError> {
    let dst_ip = dst_ip.into();
    let listener = dst
        .enter(move || TcpListener::bind((dst_ip, port)))?
        .map_err(|e| NetnsError::Enter("bind".into(), e.to_string()))?;
    let _ = listener.set_nonblocking(true);
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + timeout + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Ok((mut s, _)) = listener.accept() {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(timeout));
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() {
                    let _ = s.write_all(&buf);
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let outcome = tcp_echo(src, dst_ip, port, timeout)?;
    let _ = server.join();
    Ok(outcome)
}

/// UDP from `src` to `dst_ip:port` (either family): one datagram, answered by an echo opened in `dst`.
pub fn udp(
    src: &NetNs,
    dst: &NetNs,
    dst_ip: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<Outcome, NetnsError> {
    let dst_ip = dst_ip.into();
    let server_sock = dst
        .enter(move || UdpSocket::bind((dst_ip, port)))?
        .map_err(|e| NetnsError::Enter("bind".into(), e.to_string()))?;
    let _ = server_sock.set_read_timeout(Some(timeout + Duration::from_millis(200)));
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 16];
        if let Ok((n, from)) = server_sock.recv_from(&mut buf) {
            let _ = server_sock.send_to(&buf[..n], from);
        }
    });
    let outcome = udp_echo(src, dst_ip, port, timeout)?;
    let _ = server.join();
    Ok(outcome)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// ICMP `type_`/`code` from `src` to `dst_ip`; Connected when the destination's kernel answers (echo 8 ->
/// reply 0, timestamp 13 -> reply 14).
pub fn icmp(
    src: &NetNs,
    dst_ip: Ipv4Addr,
    type_: u8,
    code: u8,
    timeout: Duration,
) -> Result<Outcome, NetnsError> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recv, sendto, socket,
    };
    src.enter(move || {
        let fd = match socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK,
            SockProtocol::Icmp,
        ) {
            Ok(fd) => fd,
            Err(e) => return Outcome::Error(e.to_string()),
        };
        let id: u16 = (std::process::id() & 0xffff) as u16;
        let mut pkt = vec![type_, code, 0, 0];
        pkt.extend(id.to_be_bytes());
        pkt.extend(1u16.to_be_bytes());
        pkt.extend([0u8; 12]); // timestamp fields, or echo payload
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        let to = SockaddrIn::from(std::net::SocketAddrV4::new(dst_ip, 0));
        if let Err(e) = sendto(std::os::fd::AsRawFd::as_raw_fd(&fd), &pkt, &to, MsgFlags::empty()) {
            return Outcome::Error(e.to_string());
        }
        let want = match type_ {
            8 => 0,
            13 => 14,
            _ => return Outcome::Error(format!("no reply type known for ICMP type {type_}")),
        };
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            if let Ok(n) = recv(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut buf, MsgFlags::empty()) {
                // Raw IPv4 sockets deliver the IP header first.
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                let from = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                if n > ihl + 8
                    && from == dst_ip
                    && buf[ihl] == want
                    && buf[ihl + 4..ihl + 6] == id.to_be_bytes()
                {
                    return Outcome::Connected;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Outcome::NoAnswer
    })
}

/// `GET path` on 127.0.0.1:`port` (plain HTTP/1.0): (status code, body), or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(2),
    )
    .ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        buf.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}

/// The source address a server at `addr` in `outside` sees when `src` connects to it over TCP: how a test
/// shows natOutgoing (the outside sees the node's address, never the pod's).
pub fn source_seen_by(
    src: &NetNs,
    outside: &NetNs,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<IpAddr, String> {
    let listener = outside
        .enter(move || TcpListener::bind(addr))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("bind {addr}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    src.enter(move || TcpStream::connect_timeout(&addr, timeout).map(|_| ()))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((_, peer)) => return Ok(peer.ip()),
            Err(_) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{addr} never saw the connection: {e}")),
        }
    }
}

/// TCP from `src` to a server that already listens at `dst_ip:port` and echoes (a lab pod's server):
/// connect, send, read the echo.
pub fn tcp_echo(
    src: &NetNs,
    dst_ip: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<Outcome, NetnsError> {
    let addr = SocketAddr::from((dst_ip.into(), port));
    src.enter(move || match TcpStream::connect_timeout(&addr, timeout) {
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(timeout));
            let mut buf = [0u8; 4];
            match s.write_all(b"ping").and_then(|()| s.read_exact(&mut buf)) {
                Ok(()) if &buf == b"ping" => Outcome::Connected,
                Ok(()) => Outcome::Error("wrong echo".into()),
                Err(e) => Outcome::Error(format!("connected but no echo: {e}")),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Outcome::NoAnswer,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        Err(e) => Outcome::Error(e.to_string()),
    })
}

/// UDP from `src` to a server that already answers at `dst_ip:port` with an echo.
pub fn udp_echo(
    src: &NetNs,
    dst_ip: impl Into<IpAddr>,
    port: u16,
    timeout: Duration,
) -> Result<Outcome, NetnsError> {
    let dst_ip = dst_ip.into();
    let any: IpAddr = if dst_ip.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    src.enter(move || {
        let sock = match UdpSocket::bind((any, 0)) {
            Ok(s) => s,
            Err(e) => return Outcome::Error(e.to_string()),
        };
        let _ = sock.set_read_timeout(Some(timeout));
        if let Err(e) = sock.send_to(b"ping", (dst_ip, port)) {
            return Outcome::Error(e.to_string());
        }
        let mut buf = [0u8; 16];
        match sock.recv_from(&mut buf) {
            Ok((4, _)) if &buf[..4] == b"ping" => Outcome::Connected,
            Ok(_) => Outcome::Error("wrong echo".into()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Outcome::NoAnswer
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
            Err(e) => Outcome::Error(e.to_string()),
        }
    })
}

/// The request a lab pod's server answers with its own address instead of an echo.
pub const WHOAMI: &[u8] = b"caracal-whoami\n";

/// Asks whoever answers at `addr` (TCP or UDP, as `protocol` says) for its address, from `src`: which backend
/// a Service connection reached. A new connection (TCP) or a new socket (UDP, so a new source port) each time.
pub fn whoami(src: &NetNs, addr: SocketAddr, protocol: &str, timeout: Duration) -> Result<String, Outcome> {
    let udp = protocol == "UDP";
    let res = src.enter(move || -> Result<String, Outcome> {
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => Outcome::NoAnswer,
            std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
            _ => Outcome::Error(e.to_string()),
        };
        let mut buf = [0u8; 64];
        let n = if udp {
            let any: IpAddr = if addr.is_ipv4() {
                Ipv4Addr::UNSPECIFIED.into()
            } else {
                Ipv6Addr::UNSPECIFIED.into()
            };
            // Connected, as a resolver's socket is: the reply must come from the address asked (a Service's
            // reply translated back), and an ICMP port unreachable surfaces as "connection refused".
            let sock = UdpSocket::bind((any, 0)).map_err(io)?;
            sock.set_read_timeout(Some(timeout)).map_err(io)?;
            sock.connect(addr).map_err(io)?;
            sock.send(WHOAMI).map_err(io)?;
            sock.recv(&mut buf).map_err(io)?
        } else {
            let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            s.write_all(WHOAMI).map_err(io)?;
            s.read(&mut buf).map_err(io)?
        };
        let text = String::from_utf8_lossy(&buf[..n]);
        match text.strip_suffix('\n') {
            Some(ip) if !ip.is_empty() => Ok(ip.to_owned()),
            _ => Err(Outcome::Error(format!("not an address: {text:?}"))),
        }
    });
    res.map_err(|e| Outcome::Error(e.to_string()))?
}

/// What a [`Continuous`] prober saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Connections tried.
    pub attempts: u64,
    /// Connections that failed.
    pub failures: u64,
    /// The longest time without a working connection: from the last success before a failure to the first
    /// success after it (or to the end, when it ended failing).
    pub longest_gap: Duration,
    /// The first failures (at most 20): when, since the start, and how.
    pub failed: Vec<(Duration, String)>,
}

/// Connects from the namespace `src` to `addr` every `interval`, each time a new TCP connection with an echo
/// (`timeout` each), until stopped: what an upgrade must never interrupt. Runs on a thread of its own.
pub struct Continuous {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Report>>,
}

impl Continuous {
    /// Starts probing.
    pub fn start(src: &str, addr: SocketAddr, interval: Duration, timeout: Duration) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let src = src.to_owned();
        let thread = std::thread::spawn(move || {
            let ns = NetNs::existing(&src);
            let start = Instant::now();
            let mut report = Report::default();
            let mut last_ok = start;
            let mut failing = false;
            while !flag.load(Ordering::Relaxed) {
                let tick = Instant::now();
                let outcome = tcp_echo(&ns, addr.ip(), addr.port(), timeout)
                    .unwrap_or_else(|e| Outcome::Error(e.to_string()));
                report.attempts += 1;
                if outcome.connected() {
                    if failing {
                        report.longest_gap = report.longest_gap.max(tick - last_ok);
                        failing = false;
                    }
                    last_ok = Instant::now();
                } else {
                    report.failures += 1;
                    failing = true;
                    if report.failed.len() < 20 {
                        report.failed.push((tick - start, format!("{outcome:?}")));
                    }
                }
                if let Some(rest) = interval.checked_sub(tick.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            if failing {
                report.longest_gap = report.longest_gap.max(last_ok.elapsed());
            }
            report
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops probing and returns what it saw.
    pub fn stop(mut self) -> Report {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or_default()
    }
}
