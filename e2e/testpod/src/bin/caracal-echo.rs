//! A workload pod's server: `caracal-echo PORT[/TCP|/UDP]...` echoes on every port named, TCP on all
//! addresses and UDP on each of the pod's own IPv4 addresses, answering `caracal-whoami` with the address
//! the request reached. Exits on SIGTERM (the default action) as a container's process should.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use caracal_testpod::{Listen, answer, own_ipv4};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--version") {
        println!("caracal-echo v{}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let listens: Vec<Listen> = match args.iter().map(|a| a.parse()).collect() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("caracal-echo: {e}");
            std::process::exit(2);
        }
    };
    if listens.is_empty() {
        eprintln!("caracal-echo: name at least one PORT/TCP or PORT/UDP to serve");
        std::process::exit(2);
    }
    let mut threads = Vec::new();
    for l in listens {
        if l.udp {
            for ip in own_ipv4() {
                let sock = UdpSocket::bind((ip, l.port))
                    .unwrap_or_else(|e| fail(&format!("UDP {ip}:{}", l.port), &e));
                threads.push(std::thread::spawn(move || serve_udp(&sock)));
            }
        } else {
            let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, l.port))
                .unwrap_or_else(|e| fail(&format!("TCP port {}", l.port), &e));
            threads.push(std::thread::spawn(move || serve_tcp(&listener)));
        }
        println!(
            "caracal-echo: serving {}/{}",
            l.port,
            if l.udp { "UDP" } else { "TCP" }
        );
    }
    for t in threads {
        let _ = t.join();
    }
}

fn fail(what: &str, e: &std::io::Error) -> ! {
    eprintln!("caracal-echo: binding {what}: {e}");
    std::process::exit(1);
}

fn serve_udp(sock: &UdpSocket) {
    let local = sock
        .local_addr()
        .map(|a| a.ip())
        .unwrap_or(Ipv4Addr::UNSPECIFIED.into());
    let mut buf = [0u8; 2048];
    loop {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&answer(local, &buf[..n]), from);
        }
    }
}

fn serve_tcp(listener: &TcpListener) {
    for s in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut s = s;
            let local = s
                .local_addr()
                .map_or(SocketAddr::from(([0, 0, 0, 0], 0)).ip(), |a| a.ip());
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&answer(local, &buf[..n])).is_err() {
                    return;
                }
            }
        });
    }
}
