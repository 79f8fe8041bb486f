//! Kernel tier: the WireGuard manager with the userspace device on real packets. Two node namespaces on one
//! underlay bridge, a pod on each; each node's `WireguardManager` (what the agent's routing runs) converges
//! against the real kernel through netlink and makes boringtun's device in its node's namespace. With each
//! node the other's peer, pod-to-pod TCP crosses; a capture on the underlay bridge sees only WireGuard's
//! UDP between the nodes and never the marker the pods send; a deleted key file rotates the key and
//! connectivity comes back once the peer has the new key; off removes device, routes, rule and
//! annotations. Needs root.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use caracal_e2e::capture::{between, capture, carries};
use caracal_e2e::netns::{self, NetNs, Pod, Underlay};
use caracal_node::netlink::{Netlink, named_netns};
use caracal_node::routing::address::{Chosen, Detected};
use caracal_node::routing::model::{Desired, WgPeer, annotation};
use caracal_node::routing::wireguard::{Params, Report, WgPlan, WireguardManager};
use caracal_node::routing::{Contributions, Plan, VxlanParams};
use caracal_node::wireguard::kernel::{AutoFactory, Backend};

const MARKER: &str = "caracal-wireguard-marker-7f3a9c";

/// One node of the test: its namespace, kernel, manager and device factory.
struct Node {
    name: &'static str,
    ns: NetNs,
    ip: Ipv4Addr,
    wg_addr: Ipv4Addr,
    block: String,
    kernel: Netlink,
    manager: WireguardManager,
    factory: AutoFactory,
    key_file: PathBuf,
}

impl Node {
    fn detected(&self) -> Detected {
        Detected {
            chosen: Chosen {
                ip: format!("{}/24", self.ip).parse().expect("net"),
                index: 0,
                name: "eth0".into(),
                mtu: 1500,
            },
            chosen6: None,
            warning: None,
            host_mtu: None,
        }
    }

    /// One sync of the manager with `peers`; the annotations it publishes and its report.
    async fn sync(&mut self, on: bool, peers: Vec<WgPeer>) -> (Contributions, Report) {
        let desired = Desired::default();
        let detected = self.detected();
        let params = |enabled| Params {
            enabled,
            iface: "wg.caracal".into(),
            port: 51820,
            mtu: 1440,
        };
        let plan = Plan {
            me: self.name,
            desired: &desired,
            underlay: &detected,
            pod_mtu: 1440,
            vxlan: VxlanParams {
                vni: 4096,
                port: 4789,
            },
            ipip_mtu: None,
            wireguard: [
                WgPlan {
                    params: params(on),
                    peers,
                    unencrypted: Vec::new(),
                    key_file: true,
                },
                WgPlan {
                    params: params(false),
                    peers: Vec::new(),
                    unencrypted: Vec::new(),
                    key_file: false,
                },
            ],
        };
        let mut out = Contributions::default();
        let report = self
            .manager
            .apply(
                &self.kernel,
                &plan,
                &mut self.factory,
                on.then_some(IpAddr::V4(self.wg_addr)),
                &mut out,
            )
            .await
            .expect("the manager converges");
        (out, report)
    }

    /// This node as the other's peer, from what it published.
    fn as_peer(&self, published: &Contributions) -> WgPeer {
        let key = published.annotations[annotation::WIREGUARD_PUBLIC_KEY]
            .as_deref()
            .and_then(caracal_node::wireguard::keys::decode)
            .expect("a published key");
        WgPeer {
            node: self.name.into(),
            key,
            ip: IpAddr::V4(self.ip),
            allowed: vec![
                self.block.parse().expect("block"),
                format!("{}/32", self.wg_addr).parse().expect("addr"),
            ],
        }
    }
}

async fn node(
    userspace_only: bool,
    name: &'static str,
    underlay: &Underlay,
    ip: &str,
    wg_addr: &str,
    block: &str,
    dir: &std::path::Path,
) -> Node {
    let ns = netns::node(name).expect("node namespace");
    let ip: Ipv4Addr = ip.parse().expect("ip");
    underlay.attach(&ns, "eth0", ip).expect("attach");
    let path = named_netns(ns.name());
    let kernel = Netlink::open(Some(&path)).await.expect("netlink");
    let key_file = dir.join(format!("{name}/wireguard/private.key"));
    Node {
        name,
        ip,
        wg_addr: wg_addr.parse().expect("wg addr"),
        block: block.to_owned(),
        kernel,
        manager: WireguardManager::new(false, key_file.clone()),
        factory: AutoFactory {
            netns: Some(path),
            chosen: None,
            userspace_only,
        },
        key_file,
        ns,
    }
}

/// An echo server in `pod` on `port`, until `stop`.
fn echo(pod: &Pod, port: u16, stop: &Arc<AtomicBool>) {
    let ip = pod.ip;
    let l = pod
        .ns
        .enter(move || std::net::TcpListener::bind((ip, port)))
        .expect("enter")
        .expect("bind");
    l.set_nonblocking(true).expect("nonblocking");
    let stop = stop.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

/// Sends `text` from `from` to `to`:`port` over a new TCP connection and returns the echo (None: no
/// connection or no answer in time).
fn say(from: &Pod, to: Ipv4Addr, port: u16, text: &str) -> Option<String> {
    let text = text.to_owned();
    from.ns
        .enter(move || -> Option<String> {
            let addr = SocketAddr::from((to, port));
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(text.as_bytes()).ok()?;
            let mut buf = vec![0u8; text.len()];
            s.read_exact(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf).into_owned())
        })
        .ok()
        .flatten()
}

/// Retries [`say`] until it answers or `deadline` passes; how long it took.
fn say_within(from: &Pod, to: Ipv4Addr, port: u16, text: &str, deadline: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < deadline {
        if say(from, to, port, text).as_deref() == Some(text) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Whether this kernel can make a `wireguard` link (tried in a namespace of its own).
fn kernel_has_wireguard() -> bool {
    let ns = NetNs::new("wgprobe").expect("namespace");
    ns.ip(&["link", "add", "wgprobe", "type", "wireguard"]).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_two_nodes_talk_through_wireguard_only_and_survive_a_key_rotation() {
    scenario(true, "10.213", "10.214").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_backend_drives_the_kernel_module_where_there_is_one() {
    if !kernel_has_wireguard() {
        // Written to the stream directly: the test harness captures `println!`, and the SKIP line must show
        // in `make test`'s output.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIP the_kernel_backend_drives_the_kernel_module_where_there_is_one: wireguard kernel module missing\n",
        );
        return;
    }
    scenario(false, "10.215", "10.216").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_makes_the_kernels_device_where_it_can_and_the_userspace_one_elsewhere() {
    let ns = netns::node("wgauto").expect("node");
    let mut f = AutoFactory {
        netns: Some(named_netns(ns.name())),
        chosen: None,
        userspace_only: false,
    };
    let device = caracal_node::wireguard::DeviceFactory::create(&mut f, "wg.caracal").expect("a device");
    let details = ns
        .ip(&["-d", "link", "show", "wg.caracal"])
        .expect("the device's link");
    if kernel_has_wireguard() {
        assert_eq!(f.chosen, Some(Backend::Kernel));
        assert!(details.contains("wireguard"), "{details}");
    } else {
        assert_eq!(
            f.chosen,
            Some(Backend::Userspace),
            "no module here: boringtun's device"
        );
        assert!(details.contains("tun"), "a TUN interface: {details}");
    }
    drop(device);
}

/// Two nodes, a pod on each: WireGuard on, the capture, a key rotation, off. `userspace_only`: boringtun's
/// devices; otherwise the kernel's (where the module exists). The networks: `{underlay}.0.0/24` and the
/// pods' `{pods}.0.0/24` (node a) and `{pods}.1.0/24` (node b).
async fn scenario(userspace_only: bool, underlay_net: &str, pods_net: &str) {
    assert!(nix::unistd::geteuid().is_root(), "kernel-tier tests need root");
    let dir = std::env::temp_dir().join(format!("caracal-wg-test-{}-{userspace_only}", std::process::id()));
    let underlay = Underlay::new(format!("{underlay_net}.0.0/24").parse().expect("net")).expect("underlay");
    let (wa, wb) = (format!("{pods_net}.0.1"), format!("{pods_net}.1.1"));
    let bb = format!("{pods_net}.1.0/24");
    let mut a = node(
        userspace_only,
        "wga",
        &underlay,
        &format!("{underlay_net}.0.2"),
        &wa,
        &format!("{pods_net}.0.0/24"),
        &dir,
    )
    .await;
    let mut b = node(
        userspace_only,
        "wgb",
        &underlay,
        &format!("{underlay_net}.0.3"),
        &wb,
        &bb,
        &dir,
    )
    .await;
    let pa = netns::wire_pod(
        &a.ns,
        "wpa",
        "crcwpa",
        format!("{pods_net}.0.5").parse().expect("ip"),
    )
    .expect("pod a");
    let pb = netns::wire_pod(
        &b.ns,
        "wpb",
        "crcwpb",
        format!("{pods_net}.1.5").parse().expect("ip"),
    )
    .expect("pod b");
    let stop = Arc::new(AtomicBool::new(false));
    echo(&pb, 8080, &stop);

    // Nothing routes the pods to each other without WireGuard here (no VXLAN in this test).
    assert_eq!(say(&pa, pb.ip, 8080, "hello"), None, "no path before WireGuard");

    // Each node makes its key and device, then learns the other as its peer.
    let (a_out, a_report) = a.sync(true, Vec::new()).await;
    let (b_out, _) = b.sync(true, Vec::new()).await;
    assert!(a_report.new_key, "a new node makes a key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&a.key_file).expect("key file").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the private key file is the owner's only");
    let a_peer = a.as_peer(&a_out);
    let b_peer = b.as_peer(&b_out);
    assert_eq!(
        a_out.annotations[annotation::IPV4_WIREGUARD_INTERFACE_ADDR].as_deref(),
        Some(wa.as_str())
    );
    let (_, a_report) = a.sync(true, vec![b_peer.clone()]).await;
    b.sync(true, vec![a_peer.clone()]).await;
    assert_eq!(a_report.encrypted, vec!["wgb".to_owned()]);
    assert!(!a_report.new_key, "the key is kept across syncs");

    // The kernel holds what the manager says: the device up with its address and MTU, table 1, the rule.
    let link =
        a.ns.ip(&["-o", "addr", "show", "dev", "wg.caracal"])
            .expect("device");
    assert!(link.contains(&wa), "{link}");
    let mtu =
        a.ns.ip(&["-o", "link", "show", "dev", "wg.caracal"])
            .expect("link");
    assert!(mtu.contains("mtu 1440") && mtu.contains(",UP"), "{mtu}");
    let table = a.ns.ip(&["route", "show", "table", "1"]).expect("table 1");
    assert!(table.contains(&format!("{bb} dev wg.caracal")), "{table}");
    let rules = a.ns.ip(&["rule", "show"]).expect("rules");
    assert!(
        rules.contains("99:\tnot from all fwmark 0x100000/0x100000 lookup 1"),
        "{rules}"
    );

    // Pod to pod, with a capture on the underlay: the marker crosses, and the wire shows only WireGuard's
    // UDP between the nodes, never the marker.
    let (took, frames) = capture(&underlay.ns, || {
        say_within(&pa, pb.ip, 8080, MARKER, Duration::from_secs(20))
    });
    assert!(took.is_some(), "the pods talk through WireGuard");
    let flows = between(&frames, a.ip.into(), b.ip.into());
    assert!(!flows.is_empty(), "the pods' packets crossed the underlay");
    assert!(
        flows
            .iter()
            .all(|s| s.proto == 17 && s.sport == 51820 && s.dport == 51820),
        "only WireGuard between the nodes: {flows:?}"
    );
    assert!(
        !carries(&frames, MARKER.as_bytes()),
        "the marker never appears on the wire"
    );
    let pods_plain = between(&frames, pa.ip.into(), pb.ip.into());
    assert!(
        pods_plain.is_empty(),
        "no pod packet in the clear: {pods_plain:?}"
    );

    // Rotation: a's key file deleted; a's next sync makes a new key and gives it to the device; until b
    // has it, nothing crosses; once b has the new key, the pods talk again.
    std::fs::remove_file(&a.key_file).expect("delete the key file");
    let (a_out, a_report) = a.sync(true, vec![b_peer.clone()]).await;
    assert!(a_report.new_key, "a deleted key file means a new key");
    let rotated = a.as_peer(&a_out);
    assert_ne!(rotated.key, a_peer.key);
    b.sync(true, vec![rotated]).await;
    let back = say_within(&pa, pb.ip, 8080, "after rotation", Duration::from_secs(30));
    assert!(back.is_some(), "connectivity is restored after the rotation");
    println!("after the rotation, the pods talked again in {back:?}");

    // Off: device, routes and rule go; the annotations are removed; the pods have no path again.
    let (a_off, _) = a.sync(false, Vec::new()).await;
    b.sync(false, Vec::new()).await;
    for k in [
        annotation::WIREGUARD_PUBLIC_KEY,
        annotation::IPV4_WIREGUARD_INTERFACE_ADDR,
    ] {
        assert_eq!(a_off.annotations.get(k), Some(&None), "{k} removed");
    }
    assert!(
        a.ns.ip(&["link", "show", "dev", "wg.caracal"]).is_err(),
        "the device is gone"
    );
    let table = a.ns.ip(&["route", "show", "table", "1"]).unwrap_or_default();
    assert!(!table.contains("wg.caracal"), "{table}");
    let rules = a.ns.ip(&["rule", "show"]).expect("rules");
    assert!(!rules.contains("lookup 1"), "{rules}");
    assert_eq!(say(&pa, pb.ip, 8080, "hello"), None, "no path after WireGuard");

    stop.store(true, Ordering::Relaxed);
    let _ = std::fs::remove_dir_all(&dir);
}
