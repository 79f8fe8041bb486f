//! Kernel tier: the BPF policy programs on real packets, driven through their maps directly. The verifier
//! accepts them on this kernel; an interface they are attached to drops everything until its endpoint entry
//! exists (fail closed); a direction whose table denies gets no answer while the other passes with replies;
//! each endpoint's counters see it; a reloaded agent (programs loaded again, maps and links found pinned)
//! keeps the entries and the flows working; removing everything detaches the programs. Needs root.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::path::PathBuf;
use std::time::Duration;

#[path = "common/bpf.rs"]
mod bpf_common;

use bpf_common::{entry, ifindex, table, with_loaded};

use caracal_e2e::netns::{self, Pod};
use caracal_e2e::probe;
use caracal_node::dataplane::bpf::{self, Loaded};

const TIMEOUT: Duration = Duration::from_secs(1);

/// Writes the allow-all table as 1 and the deny-all table as 2.
fn write_tables(l: &mut Loaded) {
    l.write_table(1, &table(true)).expect("allow table");
    l.write_table(2, &table(false)).expect("deny table");
}

fn tcp(a: &Pod, b: &Pod, port: u16) -> probe::Outcome {
    probe::tcp(&a.ns, &b.ns, b.ip, port, TIMEOUT).expect("probe")
}

#[test]
fn fail_closed_until_programmed_per_direction_verdicts_and_a_reload_keeps_everything() {
    assert!(nix::unistd::geteuid().is_root(), "kernel-tier tests need root");
    let node = netns::node("bpf").expect("node");
    let a = netns::wire_pod(&node, "bpfa", "crcbpfa", "10.201.0.5".parse().expect("ip")).expect("pod a");
    let b = netns::wire_pod(&node, "bpfb", "crcbpfb", "10.201.0.6".parse().expect("ip")).expect("pod b");
    let dir = PathBuf::from(format!("/sys/fs/bpf/caracal-test-{}", std::process::id()));
    assert!(tcp(&a, &b, 7001).connected(), "no program yet: the pods talk");

    // Attached, no entries: nothing passes either way.
    with_loaded(&node, &dir, |l| {
        l.attach("crcbpfa").expect("attach a");
        l.attach("crcbpfb").expect("attach b");
    });
    assert_eq!(tcp(&a, &b, 7002), probe::Outcome::NoAnswer, "fail closed");
    assert!(!probe::icmp(&a.ns, b.ip, 8, 0, TIMEOUT).expect("icmp").connected());
    let (ia, ib) = (ifindex(&node, "crcbpfa"), ifindex(&node, "crcbpfb"));

    // a may start flows and receive them; b may start flows but not receive new ones.
    with_loaded(&node, &dir, move |l| {
        write_tables(l);
        l.set_endpoint(ia, entry(1, 1)).expect("a");
        l.set_endpoint(ib, entry(1, 2)).expect("b");
    });
    assert_eq!(
        tcp(&a, &b, 7003),
        probe::Outcome::NoAnswer,
        "b's ingress denies new flows"
    );
    assert!(
        tcp(&b, &a, 7004).connected(),
        "b -> a passes both egress and ingress, replies too"
    );
    let (b_from, b_to) = with_loaded(&node, &dir, move |l| l.counters(ib).expect("counters"));
    assert!(b_to.dropped > 0, "b's ingress counted its drops: {b_to:?}");
    assert!(
        b_from.allowed > 0 && b_to.allowed > 0,
        "b's flow to a and its replies: {b_from:?} {b_to:?}"
    );
    // What /metrics reads (the pinned counters map, without loading the programs) says the same.
    let pinned = bpf::pinned_counters(&dir).expect("pinned counters");
    assert!(
        pinned
            .iter()
            .any(|(i, _, to)| *i == ib && to.dropped == b_to.dropped),
        "{pinned:?}"
    );
    // The tables read back from the maps decide as written, and the dump shows why b's ingress drops.
    let (deny, allow) = with_loaded(&node, &dir, |l| {
        (
            l.read_table(2).expect("read").expect("table 2"),
            l.read_table(1).expect("read").expect("table 1"),
        )
    });
    assert_eq!(deny.actions(), table(false).actions());
    assert_eq!(deny.hash, table(false).hash);
    assert_eq!(allow.actions(), vec!["Allow".to_owned()]);
    let to_b = caracal_policy::eval::Packet {
        src: a.ip.into(),
        dst: b.ip.into(),
        protocol: 6,
        src_port: Some(40000),
        dst_port: Some(7003),
        icmp: None,
    };
    assert_eq!(deny.explain(&to_b), (false, Some(0), vec![]));
    let dir2 = dir.clone();
    let text = node
        .enter(move || bpf::dump::dump(&dir2, "crcbpfb", Some(&to_b)).expect("dump"))
        .expect("enter");
    assert!(
        text.contains("ingress (what the pod receives): table 2")
            && text.contains("packet: dropped by entry 0")
            && text.contains("flows ("),
        "{text}"
    );

    // b opens up; a reload (programs loaded again, maps and links adopted from their pins) keeps it.
    with_loaded(&node, &dir, move |l| {
        l.set_endpoint(ib, entry(1, 1)).expect("b");
    });
    assert!(tcp(&a, &b, 7005).connected());
    let entries = with_loaded(&node, &dir, |l| {
        l.attach("crcbpfa").expect("re-attach a");
        l.attach("crcbpfb").expect("re-attach b");
        (
            l.endpoint_entries().expect("entries"),
            l.attached().expect("attached"),
        )
    });
    assert_eq!(entries.0.len(), 2, "{:?}", entries.0);
    assert_eq!(entries.1, vec!["crcbpfa".to_owned(), "crcbpfb".to_owned()]);
    assert!(tcp(&a, &b, 7006).connected(), "still allowed after the reload");

    // An entry removed: b is closed again.
    with_loaded(&node, &dir, move |l| l.remove_endpoint(ib).expect("remove"));
    assert_eq!(tcp(&a, &b, 7007), probe::Outcome::NoAnswer);
    let on_b = node
        .enter(|| Loaded::tcx_programs("crcbpfb").expect("query"))
        .expect("enter");
    assert_eq!(
        on_b,
        (1, 1),
        "one program each way on b, after two loads and re-attachments"
    );

    // b detached: its programs are gone at once, a's stay.
    with_loaded(&node, &dir, |l| l.detach("crcbpfb").expect("detach b"));
    let counts = node
        .enter(|| (Loaded::tcx_programs("crcbpfa"), Loaded::tcx_programs("crcbpfb")))
        .expect("enter");
    assert_eq!(counts.0.expect("a"), (1, 1));
    assert_eq!(counts.1.expect("b"), (0, 0), "b's programs are detached");

    // Everything removed: the programs are detached at once (b has no entry, yet passes) and no pin is left.
    bpf::remove_all(&dir).expect("remove all");
    assert!(!dir.exists());
    let on_a = node
        .enter(|| Loaded::tcx_programs("crcbpfa").expect("query"))
        .expect("enter");
    assert_eq!(on_a, (0, 0), "a's programs are detached");
    assert!(
        tcp(&a, &b, 7008).connected(),
        "no program is left on the interfaces"
    );
}

/// The time to live of `to`'s answer to one ping from `from` (`ping -6` for an IPv6 address), if it answered.
fn ping_ttl(from: &Pod, to: &str) -> Option<u32> {
    let family = if to.contains(':') { "-6" } else { "-4" };
    let out = from.ns.exec(&["ping", family, "-c1", "-W1", to]).ok()?;
    let ttl = out.split("ttl=").nth(1)?;
    ttl.split_whitespace().next()?.parse().ok()
}

#[test]
fn local_pods_are_delivered_past_the_node_stack_and_still_judged_by_the_receiver() {
    assert!(nix::unistd::geteuid().is_root(), "kernel-tier tests need root");
    let node = netns::node("bpffwd").expect("node");
    node.sysctl("net.ipv6.conf.all.forwarding", "1")
        .expect("v6 forwarding");
    let a = netns::wire_pod(&node, "fwda", "crcfwda", "10.202.0.5".parse().expect("ip")).expect("pod a");
    let b = netns::wire_pod(&node, "fwdb", "crcfwdb", "10.202.0.6".parse().expect("ip")).expect("pod b");
    // IPv6 too: each pod's address routed to its interface, the node's link-local fe80::1 its gateway.
    for (pod, v6) in [(&a, "fd00:202::5"), (&b, "fd00:202::6")] {
        node.ip(&["-6", "addr", "add", "fe80::1/64", "dev", &pod.iface, "nodad"])
            .expect("gateway");
        node.ip(&["-6", "route", "add", &format!("{v6}/128"), "dev", &pod.iface])
            .expect("route");
        pod.ns
            .ip(&["-6", "addr", "add", &format!("{v6}/128"), "dev", "eth0", "nodad"])
            .expect("v6 address");
        pod.ns
            .ip(&["-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"])
            .expect("v6 default");
    }
    // The node's stack forwards nothing between its pods.
    for tool in ["iptables", "ip6tables"] {
        node.exec(&[tool, "-P", "FORWARD", "DROP"]).expect("forward drop");
    }
    assert_eq!(
        tcp(&a, &b, 7101),
        probe::Outcome::NoAnswer,
        "without the programs the node's forward rules drop a -> b"
    );
    assert_eq!(ping_ttl(&a, "fd00:202::6"), None, "and over IPv6");

    let dir = PathBuf::from(format!("/sys/fs/bpf/caracal-test-fwd-{}", std::process::id()));
    let (ia, ib) = (ifindex(&node, "crcfwda"), ifindex(&node, "crcfwdb"));
    with_loaded(&node, &dir, move |l| {
        write_tables(l);
        l.attach("crcfwda").expect("attach a");
        l.attach("crcfwdb").expect("attach b");
        l.set_endpoint(ia, entry(1, 1)).expect("a");
        l.set_endpoint(ib, entry(1, 1)).expect("b");
    });
    // Allowed flows go from pod to pod past the stack (its forward rules never see them), one hop each way.
    assert!(tcp(&a, &b, 7102).connected(), "a -> b past the node's stack");
    assert!(tcp(&b, &a, 7103).connected(), "b -> a");
    assert_eq!(ping_ttl(&a, "10.202.0.6"), Some(63), "forwarded once: 64 - 1");
    assert_eq!(ping_ttl(&a, "fd00:202::6"), Some(63), "IPv6: 64 - 1");
    let (_, b_to) = with_loaded(&node, &dir, move |l| l.counters(ib).expect("counters"));
    assert!(b_to.allowed > 0, "b's own program saw what it received: {b_to:?}");

    // The receiver's policy still decides: b's ingress denies, a's packets are dropped by b's program.
    with_loaded(&node, &dir, move |l| l.set_endpoint(ib, entry(1, 2)).expect("b"));
    assert_eq!(tcp(&a, &b, 7104), probe::Outcome::NoAnswer, "b's ingress denies");
    assert_eq!(ping_ttl(&a, "fd00:202::6"), None, "over IPv6 too");
    let (_, b_denied) = with_loaded(&node, &dir, move |l| l.counters(ib).expect("counters"));
    assert!(b_denied.dropped > b_to.dropped, "{b_denied:?}");
    assert!(tcp(&b, &a, 7105).connected(), "b -> a still passes");
    bpf::remove_all(&dir).expect("remove all");
}
