//! `make bench` figures for WireGuard, written to `target/bench/wireguard.json`: pod -> pod across two nodes
//! (two node namespaces on an underlay bridge, a pod on each, every pod interface at MTU 1440 so each way
//! carries the same payload per packet), measured three ways on the same namespaces, one after another, for
//! `ROUNDS` rounds:
//!
//! - `caracal_wireguard`: each node's `WireguardManager` (what the agent's routing runs) with the device the
//!   agent chooses on this machine (boringtun's userspace device: the kernel has no WireGuard module), its
//!   routing table and fwmark rule;
//! - `vxlan`: the kernel's VXLAN devices as Caracal's VXLAN mode programs them (VNI 4096, port 4789, static
//!   ARP and FDB entries, onlink routes through the remote VTEP), set up with iproute2;
//! - `bare_boringtun`: boringtun's device made and configured over its UAPI by this bench alone, with plain
//!   routes: no Caracal code (the userspace ceiling the issue compares with).
//!
//! Per way: iperf3 throughput (one stream, `IPERF_SECONDS` a sample, `SAMPLES` samples a round), the
//! machine's busy CPU seconds per Gbit during those samples, and request/response latency over one held TCP
//! connection (one byte each way, `RR_SECONDS`), p50 / p99. The figure the issue asks for is
//! `wireguard_over_bare_boringtun_throughput` (goal: at least 0.9), the medians' ratio. Timings are reported,
//! never asserted. Needs root.

#![expect(
    clippy::expect_used,
    reason = "a benchmark that cannot go on stops with the reason"
)]

use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::IntoRawFd as _;
use std::time::{Duration, Instant};

use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::measure::{machine_busy_seconds, percentile, summary_ms};
use caracal_e2e::netns::{self, NetNs, Pod, Underlay};
use caracal_node::netlink::{Netlink, named_netns};
use caracal_node::routing::address::{Chosen, Detected};
use caracal_node::routing::model::{Desired, WgPeer, annotation};
use caracal_node::routing::wireguard::{Params, WgPlan, WireguardManager};
use caracal_node::routing::{Contributions, Plan, VxlanParams};
use caracal_node::wireguard::kernel::AutoFactory;
use serde_json::{Value, json};

const ROUNDS: usize = 2;
const SAMPLES: usize = 3;
const IPERF_SECONDS: u64 = 3;
const RR_SECONDS: u64 = 3;
const POD_MTU: &str = "1440";
const NODES: [(&str, &str, &str, &str); 2] = [
    // name, underlay address, the pods' block, its pod
    ("wbna", "10.217.0.2", "10.218.0.0/24", "10.218.0.5"),
    ("wbnb", "10.217.0.3", "10.218.1.0/24", "10.218.1.5"),
];

struct Lab {
    underlay: Underlay,
    nodes: Vec<NetNs>,
    pods: Vec<Pod>,
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("address")
}

fn lab() -> Lab {
    let underlay = Underlay::new("10.217.0.0/24".parse().expect("net")).expect("underlay");
    let mut nodes = Vec::new();
    let mut pods = Vec::new();
    for (i, (name, addr, _, pod)) in NODES.iter().enumerate() {
        let ns = netns::node(name).expect("node");
        underlay.attach(&ns, "eth0", ip(addr)).expect("attach");
        let p = netns::wire_pod(&ns, &format!("wbp{i}"), &format!("crcwbp{i}"), ip(pod)).expect("pod");
        ns.ip(&["link", "set", &format!("crcwbp{i}"), "mtu", POD_MTU])
            .expect("mtu");
        p.ns.ip(&["link", "set", "eth0", "mtu", POD_MTU]).expect("mtu");
        nodes.push(ns);
        pods.push(p);
    }
    Lab {
        underlay,
        nodes,
        pods,
    }
}

// ----- Caracal's WireGuard -----

fn detected(addr: &str) -> Detected {
    Detected {
        chosen: Chosen {
            ip: format!("{addr}/24").parse().expect("net"),
            index: 0,
            name: "eth0".into(),
            mtu: 1500,
        },
        chosen6: None,
        warning: None,
        host_mtu: None,
    }
}

/// One node's manager sync (on with `peers`, or off).
async fn sync(
    m: &mut WireguardManager,
    kernel: &Netlink,
    factory: &mut AutoFactory,
    node: usize,
    on: bool,
    peers: Vec<WgPeer>,
) -> Contributions {
    let desired = Desired::default();
    let underlay = detected(NODES[node].1);
    let mut off = WgPlan::off(false);
    off.params = Params {
        enabled: on,
        iface: "wg.caracal".into(),
        port: 51820,
        mtu: 1440,
    };
    off.peers = peers;
    off.key_file = true;
    let plan = Plan {
        me: NODES[node].0,
        desired: &desired,
        underlay: &underlay,
        pod_mtu: 1440,
        vxlan: VxlanParams {
            vni: 4096,
            port: 4789,
        },
        ipip_mtu: None,
        wireguard: [off, WgPlan::off(true)],
    };
    let mut out = Contributions::default();
    let address: IpAddr = format!("10.218.{node}.1").parse().expect("ip");
    m.apply(kernel, &plan, factory, on.then_some(address), &mut out)
        .await
        .expect("the WireGuard manager converges");
    out
}

struct CaracalWireguard {
    kernels: Vec<Netlink>,
    managers: Vec<WireguardManager>,
    factories: Vec<AutoFactory>,
}

impl CaracalWireguard {
    async fn up(lab: &Lab, dir: &std::path::Path) -> Self {
        let mut w = CaracalWireguard {
            kernels: Vec::new(),
            managers: Vec::new(),
            factories: Vec::new(),
        };
        for (i, ns) in lab.nodes.iter().enumerate() {
            let path = named_netns(ns.name());
            w.kernels.push(Netlink::open(Some(&path)).await.expect("netlink"));
            w.managers
                .push(WireguardManager::new(false, dir.join(format!("{i}/private.key"))));
            w.factories.push(AutoFactory {
                netns: Some(path),
                chosen: None,
                userspace_only: false,
            });
        }
        let mut keys = Vec::new();
        for i in 0..2 {
            let out = sync(
                &mut w.managers[i],
                &w.kernels[i],
                &mut w.factories[i],
                i,
                true,
                Vec::new(),
            )
            .await;
            keys.push(
                out.annotations[annotation::WIREGUARD_PUBLIC_KEY]
                    .as_deref()
                    .and_then(caracal_node::wireguard::keys::decode)
                    .expect("a key"),
            );
        }
        for i in 0..2 {
            let j = 1 - i;
            let peer = WgPeer {
                node: NODES[j].0.into(),
                key: keys[j],
                ip: NODES[j].1.parse().expect("ip"),
                allowed: vec![
                    NODES[j].2.parse().expect("net"),
                    format!("10.218.{j}.1/32").parse().expect("net"),
                ],
            };
            sync(
                &mut w.managers[i],
                &w.kernels[i],
                &mut w.factories[i],
                i,
                true,
                vec![peer],
            )
            .await;
        }
        w
    }

    async fn down(mut self) {
        for i in 0..2 {
            sync(
                &mut self.managers[i],
                &self.kernels[i],
                &mut self.factories[i],
                i,
                false,
                Vec::new(),
            )
            .await;
        }
    }
}

// ----- plain VXLAN -----

fn vxlan_up(lab: &Lab) {
    let mac = |i: usize| format!("66:00:00:00:00:0{i}");
    let vtep = |i: usize| format!("10.218.{i}.1");
    for (i, ns) in lab.nodes.iter().enumerate() {
        let j = 1 - i;
        let r = |args: &[&str]| ns.ip(args).expect("vxlan setup");
        r(&[
            "link",
            "add",
            "vxlan.caracal",
            "address",
            &mac(i),
            "type",
            "vxlan",
            "id",
            "4096",
            "dstport",
            "4789",
            "local",
            NODES[i].1,
            "dev",
            "eth0",
            "nolearning",
        ]);
        r(&["link", "set", "vxlan.caracal", "mtu", "1450", "up"]);
        r(&["addr", "add", &format!("{}/32", vtep(i)), "dev", "vxlan.caracal"]);
        r(&[
            "neigh",
            "replace",
            &vtep(j),
            "lladdr",
            &mac(j),
            "dev",
            "vxlan.caracal",
            "nud",
            "permanent",
        ]);
        ns.exec(&[
            "bridge",
            "fdb",
            "replace",
            &mac(j),
            "dev",
            "vxlan.caracal",
            "dst",
            NODES[j].1,
        ])
        .expect("fdb");
        r(&[
            "route",
            "replace",
            NODES[j].2,
            "via",
            &vtep(j),
            "dev",
            "vxlan.caracal",
            "onlink",
        ]);
    }
}

fn vxlan_down(lab: &Lab) {
    for ns in &lab.nodes {
        let _ = ns.ip(&["link", "del", "vxlan.caracal"]);
    }
}

// ----- a bare boringtun tunnel -----

/// boringtun's device and this bench's end of its UAPI socket pair.
struct Bare {
    _device: boringtun::device::DeviceHandle,
    uapi: std::os::unix::net::UnixStream,
}

fn uapi_set(s: &mut std::os::unix::net::UnixStream, body: &str) {
    s.write_all(format!("set=1\n{body}\n").as_bytes())
        .expect("uapi write");
    let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
    let mut line = String::new();
    r.read_line(&mut line).expect("uapi answer");
    assert_eq!(line.trim(), "errno=0", "boringtun refused: {body}");
    let mut blank = String::new();
    r.read_line(&mut blank).expect("uapi end");
}

fn bare_up(lab: &Lab) -> Vec<Bare> {
    let secrets: Vec<boringtun::x25519::StaticSecret> = (0..2u8)
        .map(|i| boringtun::x25519::StaticSecret::from([i + 41; 32]))
        .collect();
    let hex = |b: &[u8; 32]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut out = Vec::new();
    for (i, ns) in lab.nodes.iter().enumerate() {
        let j = 1 - i;
        let path = named_netns(ns.name());
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("pair");
        let fd = theirs.into_raw_fd();
        let device = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            boringtun::device::DeviceHandle::new(
                "wg.bare",
                boringtun::device::DeviceConfig {
                    n_threads: 2,
                    use_connected_socket: true,
                    use_multi_queue: true,
                    uapi_fd: fd,
                },
            )
            .expect("boringtun device")
        })
        .join()
        .expect("thread");
        let mut b = Bare {
            _device: device,
            uapi: ours,
        };
        let peer_public = boringtun::x25519::PublicKey::from(&secrets[j]);
        uapi_set(
            &mut b.uapi,
            &format!(
                "private_key={}\nlisten_port=51820\npublic_key={}\nendpoint={}:51820\nallowed_ip={}\n",
                hex(&secrets[i].to_bytes()),
                hex(peer_public.as_bytes()),
                NODES[j].1,
                NODES[j].2
            ),
        );
        let r = |args: &[&str]| ns.ip(args).expect("bare setup");
        r(&["addr", "add", &format!("10.218.{i}.1/32"), "dev", "wg.bare"]);
        r(&["link", "set", "wg.bare", "mtu", "1440", "up"]);
        r(&["route", "replace", NODES[j].2, "dev", "wg.bare"]);
        out.push(b);
    }
    out
}

// ----- measuring -----

/// One iperf3 sample from pod 0 to pod 1: bits per second.
fn iperf(lab: &Lab) -> f64 {
    let out = lab.pods[0]
        .ns
        .exec(&[
            "iperf3",
            "-c",
            &lab.pods[1].ip.to_string(),
            "-t",
            &IPERF_SECONDS.to_string(),
            "-J",
        ])
        .expect("iperf3 client");
    let v: Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
}

/// Request/response round trips over one held connection from pod 0 to pod 1 (port 7001), milliseconds.
fn round_trips(lab: &Lab) -> Vec<f64> {
    let to = lab.pods[1].ip;
    let mut s = lab.pods[0]
        .ns
        .enter(move || std::net::TcpStream::connect_timeout(&(to, 7001).into(), Duration::from_secs(5)))
        .expect("enter")
        .expect("connect for round trips");
    s.set_nodelay(true).expect("nodelay");
    s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let mut out = Vec::new();
    let start = Instant::now();
    let mut b = [0u8; 1];
    while start.elapsed() < Duration::from_secs(RR_SECONDS) {
        let t = Instant::now();
        s.write_all(b"x").expect("request");
        s.read_exact(&mut b).expect("response");
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out
}

/// Waits until pod 0 reaches pod 1 (a way's routes and handshakes take a moment).
fn reachable(lab: &Lab, way: &str) {
    let to = lab.pods[1].ip;
    let start = Instant::now();
    loop {
        let ok = lab.pods[0]
            .ns
            .enter(move || std::net::TcpStream::connect_timeout(&(to, 7001).into(), Duration::from_secs(1)))
            .map(|r| r.is_ok())
            .unwrap_or(false);
        if ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{way}: the pods never reached each other"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Default)]
struct Figures {
    bps: Vec<f64>,
    cpu_per_gbit: Vec<f64>,
    rtt_ms: Vec<f64>,
}

fn measure(lab: &Lab, way: &str, f: &mut Figures) {
    reachable(lab, way);
    for _ in 0..SAMPLES {
        let busy = machine_busy_seconds();
        let bps = iperf(lab);
        let cpu = machine_busy_seconds() - busy;
        f.bps.push(bps);
        f.cpu_per_gbit.push(cpu / (bps * IPERF_SECONDS as f64 / 1e9));
    }
    f.rtt_ms.extend(round_trips(lab));
    println!(
        "    {way}: {:.2} Gbit/s (last sample)",
        f.bps.last().copied().unwrap_or(0.0) / 1e9
    );
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    percentile(&s, 0.5)
}

fn report(f: &Figures) -> Value {
    json!({
        "gbit_per_second": median(&f.bps) / 1e9,
        "samples_gbit_per_second": f.bps.iter().map(|b| b / 1e9).collect::<Vec<_>>(),
        "machine_cpu_seconds_per_gbit": median(&f.cpu_per_gbit),
        "round_trip": summary_ms(f.rtt_ms.clone()),
    })
}

/// The servers in pod 1: iperf3, and a one-byte echo on 7001 for the round trips.
fn servers(lab: &Lab) -> std::process::Child {
    let server = std::process::Command::new("ip")
        .args(["netns", "exec", lab.pods[1].ns.name(), "iperf3", "-s", "-B"])
        .arg(lab.pods[1].ip.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    let ip = lab.pods[1].ip;
    let listener = lab.pods[1]
        .ns
        .enter(move || std::net::TcpListener::bind((ip, 7001)))
        .expect("enter")
        .expect("bind 7001");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let _ = c.set_nodelay(true);
                let mut b = [0u8; 1];
                while c.read_exact(&mut b).is_ok() {
                    if c.write_all(&b).is_err() {
                        break;
                    }
                }
            });
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    server
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    assert!(nix::unistd::geteuid().is_root(), "the WireGuard bench needs root");
    let lab = lab();
    let mut iperf_server = servers(&lab);
    let dir = std::env::temp_dir().join(format!("caracal-wg-bench-{}", std::process::id()));
    let (mut wg, mut vx, mut bare) = (Figures::default(), Figures::default(), Figures::default());
    for round in 0..ROUNDS {
        println!("==> round {}", round + 1);
        let w = CaracalWireguard::up(&lab, &dir).await;
        measure(&lab, "Caracal WireGuard", &mut wg);
        w.down().await;
        vxlan_up(&lab);
        measure(&lab, "VXLAN", &mut vx);
        vxlan_down(&lab);
        let b = bare_up(&lab);
        measure(&lab, "bare boringtun", &mut bare);
        drop(b);
        // The bare devices' interfaces go with their file descriptors.
        for ns in &lab.nodes {
            let _ = ns.ip(&["link", "del", "wg.bare"]);
        }
    }
    let _ = iperf_server.kill();
    let _ = iperf_server.wait();
    let figures = json!({
        "caracal_wireguard": report(&wg),
        "vxlan": report(&vx),
        "bare_boringtun": report(&bare),
        "wireguard_over_bare_boringtun_throughput": median(&wg.bps) / median(&bare.bps),
        "wireguard_over_vxlan_throughput": median(&wg.bps) / median(&vx.bps),
        "note": "two node namespaces on one underlay bridge, a pod on each (MTU 1440); each way set up, measured and torn down in turn, two rounds; iperf3 one stream pod 0 -> pod 1; machine CPU = every core's busy time during the iperf samples; round trips: one byte each way over one held TCP connection; the WireGuard devices are boringtun's userspace ones (this kernel has no WireGuard module), in this process",
    });
    println!("{}", serde_json::to_string_pretty(&figures).expect("json"));
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(
        out.join("wireguard.json"),
        serde_json::to_string_pretty(&figures).expect("json"),
    )
    .expect("write");
    let _ = std::fs::remove_dir_all(&dir);
    drop(lab.pods);
    drop(lab.nodes);
    drop(lab.underlay);
}
