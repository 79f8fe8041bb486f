//! Kernel tier: the CNI wiring (netlink) connects pods through a node namespace by proxy ARP for the
//! link-local gateway; a repeated ADD changes nothing; DEL is idempotent and works after the pod's
//! namespace is gone; in BPF mode the host side is closed by the policy programs before the pod side is up.
//! Needs root.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use caracal_e2e::netns::{self, NetNs, Underlay};
use caracal_e2e::probe;
use caracal_node::cni::wire::{self, PodWiring, Wirer};
use caracal_node::netlink::{Netlink, PROTO_CARACAL, named_netns};

const TIMEOUT: Duration = Duration::from_secs(2);

fn wiring(node: &NetNs, pod: &NetNs, iface: &str, ip: &str) -> PodWiring {
    let _ = node;
    PodWiring {
        host_iface: iface.into(),
        netns: named_netns(pod.name()),
        netns_fd: None,
        ifname: "eth0".into(),
        ips: vec![ip.parse().expect("ip")],
        mtu: 1450,
        bpf_pins: None,
        netns_records: None,
    }
}

fn node_with_uplink() -> (Underlay, NetNs) {
    assert!(nix::unistd::geteuid().is_root(), "kernel-tier tests need root");
    let underlay = Underlay::new("10.98.0.0/24".parse().expect("net")).expect("underlay");
    let node = netns::node("wire").expect("node");
    underlay
        .attach(&node, "eth0", Ipv4Addr::new(10, 98, 0, 2))
        .expect("attach");
    (underlay, node)
}

#[tokio::test]
async fn wired_pods_reach_each_other_through_proxy_arp_and_del_is_idempotent() {
    let (_underlay, node) = node_with_uplink();
    let nl = Netlink::open(Some(&named_netns(node.name())))
        .await
        .expect("netlink");
    // The agent's wiring threads; two, so that the two pods are wired side by side.
    let wirer = Wirer::start(Some(&named_netns(node.name())), 2);
    let a = NetNs::new("pa").expect("pod a");
    let b = NetNs::new("pb").expect("pod b");
    let wa = wiring(&node, &a, "crcwiretesta", "10.200.0.5/32");
    let wb = wiring(&node, &b, "crcwiretestb", "10.200.0.6/32");
    let (first, second) = tokio::join!(wirer.add(&wa), wirer.add(&wb));
    let first = first.expect("wire a");
    second.expect("wire b");

    // The pod sees its /32, the gateway route and the MTU.
    let addr = a.ip(&["-o", "addr", "show", "eth0"]).expect("addr");
    assert!(addr.contains("10.200.0.5/32"), "{addr}");
    let link = a.ip(&["-o", "link", "show", "eth0"]).expect("link");
    assert!(link.contains("mtu 1450"), "{link}");
    let routes = a.ip(&["route"]).expect("routes");
    assert!(routes.contains("default via 169.254.1.1 dev eth0"), "{routes}");
    let host_routes = node
        .ip(&["route", "show", "proto", &PROTO_CARACAL.to_string()])
        .expect("routes");
    assert!(
        host_routes.contains("10.200.0.5 dev crcwiretesta"),
        "{host_routes}"
    );

    for (src, dst, ip) in [
        (&a, &b, Ipv4Addr::new(10, 200, 0, 6)),
        (&b, &a, Ipv4Addr::new(10, 200, 0, 5)),
    ] {
        assert!(probe::tcp(src, dst, ip, 8080, TIMEOUT).expect("tcp").connected());
        assert!(probe::icmp(src, ip, 8, 0, TIMEOUT).expect("icmp").connected());
    }
    // The gateway's MAC is the host side's, learned by proxy ARP.
    let neigh = a.ip(&["neigh", "show", "169.254.1.1"]).expect("neigh");
    assert!(neigh.contains("ee:ee:ee:ee:ee:ee"), "{neigh}");

    // A repeated ADD returns the same wiring and leaves the interface alone.
    let index_before = nl.index("crcwiretesta").await.expect("index");
    assert_eq!(wirer.add(&wa).await.expect("again"), first);
    assert_eq!(nl.index("crcwiretesta").await.expect("index"), index_before);
    assert!(wirer.check(&wa).await.expect("check").is_some());

    // DEL removes both ends and the route; again is fine; after the pod namespace is gone too.
    assert!(wire::del(&nl, "crcwiretesta").await.expect("del"));
    assert!(!wire::del(&nl, "crcwiretesta").await.expect("del again"));
    assert!(wirer.check(&wa).await.expect("check").is_none());
    let host_routes = node
        .ip(&["route", "show", "proto", &PROTO_CARACAL.to_string()])
        .expect("routes");
    assert!(!host_routes.contains("10.200.0.5"), "{host_routes}");
    drop(b);
    let _ = wire::del(&nl, "crcwiretestb")
        .await
        .expect("del after the namespace is gone");
    assert!(nl.link("crcwiretestb").await.expect("link").is_none());
}

/// Writes, lists and deletes one peer's neighbour and FDB entries on `dev`.
async fn peer_entries_round_trip(
    nl: &Netlink,
    dev: &caracal_node::netlink::VxlanDevice,
    vtep: IpAddr,
    peer: IpAddr,
) {
    let index = nl.ensure_vxlan(dev).await.expect("vxlan");
    assert_eq!(
        nl.ensure_vxlan(dev).await.expect("adopted"),
        index,
        "an existing device is adopted"
    );
    let v6 = vtep.is_ipv6();
    let mac = [0x66, 9, 9, 9, 9, 9];
    nl.replace_neighbour(index, vtep, mac).await.expect("neighbour");
    nl.replace_fdb(index, mac, peer).await.expect("fdb");
    assert_eq!(
        nl.neighbours(index, false, v6).await.expect("neighbour list"),
        vec![(mac, vtep)]
    );
    assert_eq!(
        nl.neighbours(index, true, v6).await.expect("fdb list"),
        vec![(mac, peer)]
    );
    nl.del_neighbour(index, mac, vtep, false)
        .await
        .expect("neighbour del");
    nl.del_neighbour(index, mac, peer, true).await.expect("fdb del");
    assert!(
        nl.neighbours(index, false, v6)
            .await
            .expect("neighbour list")
            .is_empty()
    );
    assert!(nl.neighbours(index, true, v6).await.expect("fdb list").is_empty());
    nl.del_neighbour(index, mac, peer, true)
        .await
        .expect("deleting again is fine");
}

#[tokio::test]
async fn vxlan_peers_neighbour_and_fdb_entries_are_written_listed_and_deleted_in_both_families() {
    let (_underlay, node) = node_with_uplink();
    node.ip(&["-6", "addr", "add", "fd00:98::2/64", "dev", "eth0", "nodad"])
        .expect("IPv6 underlay address");
    let nl = Netlink::open(Some(&named_netns(node.name())))
        .await
        .expect("netlink");
    let parent = nl.index("eth0").await.expect("eth0");
    let mut dev = caracal_node::netlink::VxlanDevice {
        name: "vxlan.caracal".into(),
        vni: 4096,
        port: 4789,
        local: IpAddr::V4(Ipv4Addr::new(10, 98, 0, 2)),
        parent,
        mac: [0x66, 1, 2, 3, 4, 5],
        mtu: 1450,
    };
    peer_entries_round_trip(
        &nl,
        &dev,
        "10.244.1.0".parse().expect("ip"),
        "10.98.0.3".parse().expect("ip"),
    )
    .await;
    dev.name = "vxlan6.caracal".into();
    dev.local = "fd00:98::2".parse().expect("ip");
    dev.mac = [0x66, 1, 2, 3, 4, 6];
    dev.mtu = 1430;
    peer_entries_round_trip(
        &nl,
        &dev,
        "fd10::1".parse().expect("ip"),
        "fd00:98::3".parse().expect("ip"),
    )
    .await;
}

#[tokio::test]
async fn dual_stack_pods_get_a_128_and_reach_each_other_over_ipv6_through_the_link_local_gateway() {
    let (_underlay, node) = node_with_uplink();
    node.sysctl("net.ipv6.conf.all.forwarding", "1")
        .expect("forwarding");
    let nl = Netlink::open(Some(&named_netns(node.name())))
        .await
        .expect("netlink");
    // The agent's wiring threads; two, so that the two pods are wired side by side.
    let wirer = Wirer::start(Some(&named_netns(node.name())), 2);
    let a = NetNs::new("pa").expect("pod a");
    let b = NetNs::new("pb").expect("pod b");
    let dual = |pod: &NetNs, iface: &str, v4: &str, v6: &str| {
        let mut w = wiring(&node, pod, iface, v4);
        w.ips.push(v6.parse().expect("ip"));
        w
    };
    let wa = dual(&a, "crcwire6a", "10.200.0.5/32", "fd20::5/128");
    let wb = dual(&b, "crcwire6b", "10.200.0.6/32", "fd20::6/128");
    let (first, second) = tokio::join!(wirer.add(&wa), wirer.add(&wb));
    let first = first.expect("wire a");
    second.expect("wire b");

    // The pod holds its /128 at once (no duplicate address detection), with a default route via the host
    // side's link-local address.
    let addr = a.ip(&["-6", "-o", "addr", "show", "eth0"]).expect("addr");
    assert!(
        addr.contains("fd20::5/128") && !addr.contains("tentative"),
        "{addr}"
    );
    let routes = a.ip(&["-6", "route"]).expect("routes");
    assert!(
        routes.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{routes}"
    );
    let host_routes = node
        .ip(&["-6", "route", "show", "proto", &PROTO_CARACAL.to_string()])
        .expect("routes");
    assert!(host_routes.contains("fd20::5 dev crcwire6a"), "{host_routes}");

    for (src, dst, ip) in [(&a, &b, "fd20::6"), (&b, &a, "fd20::5")] {
        let ip: std::net::Ipv6Addr = ip.parse().expect("ip");
        assert!(probe::tcp(src, dst, ip, 8080, TIMEOUT).expect("tcp").connected());
        assert!(probe::udp(src, dst, ip, 5353, TIMEOUT).expect("udp").connected());
    }
    // IPv4 still works beside it.
    assert!(
        probe::tcp(&a, &b, Ipv4Addr::new(10, 200, 0, 6), 8080, TIMEOUT)
            .expect("tcp")
            .connected()
    );
    // A repeated ADD is the same wiring, CHECK sees both families, DEL removes both routes.
    assert_eq!(wirer.add(&wa).await.expect("again"), first);
    assert!(wirer.check(&wa).await.expect("check").is_some());
    assert!(wire::del(&nl, "crcwire6a").await.expect("del"));
    let host_routes = node
        .ip(&["-6", "route", "show", "proto", &PROTO_CARACAL.to_string()])
        .expect("routes");
    assert!(!host_routes.contains("fd20::5"), "{host_routes}");
}

/// In BPF mode the wiring attaches the pinned policy programs to the host side before the pod side comes
/// up: the pod is wired, and its packets are dropped until the agent writes its endpoint entry; the agent's
/// own attach then finds the links right and adds nothing.
#[tokio::test]
async fn in_bpf_mode_the_host_side_is_closed_until_the_endpoint_entry_is_written() {
    use caracal_node::dataplane::bpf::{self, Endpoint, Loaded, tables::image};
    use caracal_policy::classify::{Entry, EntryAction, compile};
    let (_underlay, node) = node_with_uplink();
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/caracal-wiretest-{}", std::process::id()));
    // The agent's load pins the programs (its maps and programs outlive this handle through their pins).
    let d = dir.clone();
    node.enter(move || drop(Loaded::load(&d).expect("load")))
        .expect("enter");
    let wirer = Wirer::start(Some(&named_netns(node.name())), 2);
    let a = NetNs::new("pa").expect("pod a");
    let b = NetNs::new("pb").expect("pod b");
    let mut wa = wiring(&node, &a, "crcwirebpfa", "10.200.0.5/32");
    let mut wb = wiring(&node, &b, "crcwirebpfb", "10.200.0.6/32");
    wa.bpf_pins = Some(dir.clone());
    wb.bpf_pins = Some(dir.clone());
    let (first, second) = tokio::join!(wirer.add(&wa), wirer.add(&wb));
    first.expect("wire a");
    second.expect("wire b");
    let counts = node
        .enter(|| {
            (
                Loaded::tcx_programs("crcwirebpfa").expect("query"),
                Loaded::tcx_programs("crcwirebpfb").expect("query"),
            )
        })
        .expect("enter");
    assert_eq!(counts, ((1, 1), (1, 1)), "each host side has both programs");
    // Attaching again (the agent got there first, when the pod's address reached it as soon as the
    // interface existed) finds the programs on the hooks and adds nothing.
    let d = dir.clone();
    let again = node
        .enter(move || {
            let index = nix::net::if_::if_nametoindex("crcwirebpfa").expect("index");
            let attached = bpf::attach_pinned(&d, "crcwirebpfa", index).expect("attach again");
            (attached, Loaded::tcx_programs("crcwirebpfa").expect("query"))
        })
        .expect("enter");
    assert_eq!(again, (true, (1, 1)), "a second attach is a no-op");
    let ip_b = Ipv4Addr::new(10, 200, 0, 6);
    assert!(
        !probe::tcp(&a, &b, ip_b, 8080, TIMEOUT).expect("tcp").connected(),
        "a pod without its endpoint entry must not pass"
    );
    assert!(!probe::icmp(&a, ip_b, 8, 0, TIMEOUT).expect("icmp").connected());

    // The agent: its attach finds both right, then the entries (allow everything) open the pods.
    let d = dir.clone();
    let indexes = node
        .enter(move || {
            let mut l = Loaded::load(&d).expect("load");
            let entries = vec![Entry {
                rule: None,
                action: EntryAction::Allow,
                policy: None,
                tier: None,
            }];
            let allow = image(&entries, &compile(&entries, &Default::default())).expect("lays out");
            l.write_table(1, &allow).expect("table");
            let mut idx = Vec::new();
            for iface in ["crcwirebpfa", "crcwirebpfb"] {
                l.attach(iface).expect("attach");
                let i = nix::net::if_::if_nametoindex(iface).expect("index");
                l.set_endpoint(
                    i,
                    Endpoint {
                        flags: 0,
                        table: [1, 1],
                        pad: 0,
                    },
                )
                .expect("entry");
                idx.push((Loaded::tcx_programs(iface).expect("query"), i));
            }
            idx
        })
        .expect("enter");
    assert!(
        indexes.iter().all(|(c, _)| *c == (1, 1)),
        "the agent's attach adds nothing: {indexes:?}"
    );
    assert!(probe::tcp(&a, &b, ip_b, 8080, TIMEOUT).expect("tcp").connected());
    assert!(probe::icmp(&a, ip_b, 8, 0, TIMEOUT).expect("icmp").connected());

    // No programs pinned (the node is not in BPF mode, or left it): the wiring attaches nothing.
    bpf::remove_all(&dir).expect("remove");
    let c = NetNs::new("pc").expect("pod c");
    let mut wc = wiring(&node, &c, "crcwirebpfc", "10.200.0.7/32");
    wc.bpf_pins = Some(dir.clone());
    wirer.add(&wc).await.expect("wire c");
    let count = node
        .enter(|| Loaded::tcx_programs("crcwirebpfc").expect("query"))
        .expect("enter");
    assert_eq!(count, (0, 0));
    assert!(probe::tcp(&c, &b, ip_b, 8080, TIMEOUT).expect("tcp").connected());
}
