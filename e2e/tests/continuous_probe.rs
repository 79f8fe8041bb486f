//! The continuous prober an upgrade test runs: with a server answering it counts every connection as working;
//! with the server gone and back it counts the failures and measures the gap. Needs root (a namespace).

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use caracal_e2e::netns::NetNs;
use caracal_e2e::probe::Continuous;

/// An echo server in `ns` on 127.0.0.1:`port` until the returned flag is set.
fn echo(ns: &NetNs, port: u16) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let listener = ns
        .enter(move || TcpListener::bind(("127.0.0.1", port)))
        .expect("enter")
        .expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let mut buf = [0u8; 4];
                    if s.read_exact(&mut buf).is_ok() {
                        let _ = s.write_all(&buf);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    done
}

#[test]
fn the_continuous_prober_counts_working_connections_and_measures_an_outage() {
    let ns = NetNs::new("cprobe").expect("namespace");
    let port = 47_011;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let server = echo(&ns, port);
    let probe = Continuous::start(
        ns.name(),
        addr,
        Duration::from_millis(100),
        Duration::from_millis(500),
    );
    std::thread::sleep(Duration::from_secs(1));
    // The server goes for about a second, then comes back on the same port.
    server.store(true, std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(50));
    std::thread::sleep(Duration::from_secs(1));
    let _again = echo(&ns, port);
    std::thread::sleep(Duration::from_secs(1));
    let report = probe.stop();
    assert!(report.attempts >= 15, "{report:?}");
    assert!(report.failures >= 5, "{report:?}");
    assert!(report.failures < report.attempts, "{report:?}");
    assert!(
        report.longest_gap >= Duration::from_millis(700) && report.longest_gap < Duration::from_secs(3),
        "{report:?}"
    );
    assert!(!report.failed.is_empty());
}
