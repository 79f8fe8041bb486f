//! Kernel + cluster tier, IPv6: three nodes as namespaces on a dual-stack underlay, each running the real
//! `caracal-node` with IPv6 on, pods created through the real `caracal-cni` plugin. Every pod gets an IPv4
//! and an IPv6 address; pods on all nodes reach each other over IPv6 (TCP and UDP) through
//! `vxlan6.caracal`, and again when the IPv6 pool stops encapsulating (routes straight to the nodes' IPv6
//! addresses); natOutgoing masquerades IPv6 to the node's IPv6 address; a NetworkPolicy is enforced on IPv6 exactly as on IPv4 (ip6tables), so an IPv6 address never
//! fails open; WireGuard on both families encrypts pod traffic of each (only WireGuard's UDP on the underlay,
//! policy unchanged); DEL releases both addresses. Needs root.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use caracal_crds::ippool::{EncapMode, IPPool};
use caracal_e2e::cluster::{TestCluster, TestPod, unreachable_pairs, unreachable_pairs_v6};
use caracal_e2e::probe::{self, Outcome};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const PROBE: Duration = Duration::from_millis(700);

/// Waits until `f` holds (routes and policy program asynchronously).
async fn eventually(what: &str, mut f: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        match f() {
            Ok(()) => return,
            Err(e) if start.elapsed() > Duration::from_secs(40) => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

fn all_reachable(pods: &[TestPod]) -> Result<(), String> {
    let mut failed = unreachable_pairs_v6(pods, PROBE);
    failed.extend(unreachable_pairs(pods, PROBE));
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{failed:?}"))
    }
}

/// Sends `text` from `a` to `b` at `to`:8080 over a new TCP connection to an echo server the call starts in
/// `b`; whether it came back.
fn marker_exchange(a: &TestPod, b: &TestPod, to: std::net::IpAddr, text: &str) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(Ok(listener)) = b.ns.enter(move || std::net::TcpListener::bind((to, 8080))) else {
        return false;
    };
    let server = std::thread::spawn(move || {
        let _ = listener.set_nonblocking(false);
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
            let mut buf = [0u8; 256];
            if let Ok(n) = s.read(&mut buf) {
                let _ = s.write_all(&buf[..n]);
            }
        }
    });
    let text = text.to_owned();
    let ok =
        a.ns.enter(move || -> Option<bool> {
            let mut s =
                std::net::TcpStream::connect_timeout(&(to, 8080).into(), Duration::from_secs(1)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(text.as_bytes()).ok()?;
            let mut buf = vec![0u8; text.len()];
            s.read_exact(&mut buf).ok()?;
            Some(buf == text.as_bytes())
        })
        .ok()
        .flatten()
        .unwrap_or(false);
    if !ok {
        // Unblock the server's accept.
        let _ = b.ns.enter(move || {
            std::net::TcpStream::connect_timeout(&(to, 8080).into(), Duration::from_millis(200))
        });
    }
    let _ = server.join();
    ok
}

/// (TCP 8080 over IPv6, TCP 8080 over IPv4, UDP 5353 over IPv6) from `a` to `b`.
fn flows(a: &TestPod, b: &TestPod) -> (bool, bool, bool) {
    let v6 = b.ip6.expect("IPv6 address");
    let ok = |o: Result<Outcome, _>| o.is_ok_and(|o: Outcome| o.connected());
    (
        ok(probe::tcp(&a.ns, &b.ns, v6, 8080, PROBE)),
        ok(probe::tcp(&a.ns, &b.ns, b.ip, 8080, PROBE)),
        ok(probe::udp(&a.ns, &b.ns, v6, 5353, PROBE)),
    )
}

#[tokio::test]
async fn dual_stack_pods_reach_each_other_over_ipv6_and_policy_is_enforced_on_both_families() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let mut c = TestCluster::with_underlay(
        3,
        Path::new(env!("CARGO_BIN_EXE_caracal-node")),
        &caracal_e2e::controlplane::workspace_bin("caracal-cni"),
        "10.95.40.0/24",
    )
    .await
    .expect("cluster");
    c.enable_ipv6("fd00:95:40::/64").expect("IPv6 underlay");
    c.agent_env.push(("CARACAL_REFRESH_SECONDS".into(), "2".into()));
    for (name, cidr, nat) in [("v4", "10.246.0.0/16", false), ("v6", "fd10:246::/48", true)] {
        caracal_e2e::objects::ippool(&c.client, name, cidr, EncapMode::Always, EncapMode::Never, nat)
            .await
            .expect("pool");
    }
    caracal_e2e::objects::namespace(&c.client, "demo", json!({}))
        .await
        .expect("namespace");
    c.start_agents().await.expect("agents");

    let mut pods = Vec::new();
    for (i, app) in ["web", "db", "other"].into_iter().enumerate() {
        pods.push(c.add_pod(i, "demo", app, json!({"app": app})).await.expect("ADD"));
    }
    for p in &pods {
        c.report_pod_ips(p).await.expect("pod status");
    }
    let pool6: ipnet::Ipv6Net = "fd10:246::/48".parse().expect("net");
    for p in &pods {
        let v6 = p.ip6.expect("every pod gets an IPv6 address");
        assert!(pool6.contains(&v6), "{v6}");
        let addr = p.ns.ip(&["-6", "-o", "addr", "show", "eth0"]).expect("addr");
        assert!(addr.contains(&format!("{v6}/128")), "{addr}");
    }
    // The IPv6 VXLAN device costs 70 bytes: the pods' MTU is the underlay's 1500 minus 70.
    let link = pods[0].ns.ip(&["-o", "link", "show", "eth0"]).expect("link");
    assert!(link.contains("mtu 1430"), "{link}");

    // Nodes publish their IPv6 address and IPv6 VTEP.
    let nodes = Api::<Node>::all(c.client.clone());
    let start = Instant::now();
    loop {
        let n1 = nodes.get("node-1").await.expect("node");
        let ann = n1.metadata.annotations.clone().unwrap_or_default();
        let published = ann.get("caracal.dev/IPv6Address").map(String::as_str) == Some("fd00:95:40::3/64")
            && ann.contains_key("caracal.dev/IPv6VXLANTunnelAddr")
            && ann.contains_key("caracal.dev/VXLANTunnelMACAddrV6");
        if published {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node-1 never published its IPv6 addresses: {ann:?}\n{}",
            c.agent_log(1, 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dev = c.nodes[0]
        .ns
        .ip(&["-d", "link", "show", "vxlan6.caracal"])
        .expect("IPv6 VXLAN device");
    assert!(dev.contains("local fd00:95:40::2"), "{dev}");

    eventually("every pair over IPv6 and IPv4 through VXLAN", || {
        all_reachable(&pods)
    })
    .await;

    // natOutgoing for IPv6: a namespace on the underlay outside every pool sees the node's IPv6 address.
    let outside = caracal_e2e::netns::NetNs::new("out6").expect("outside");
    c.underlay
        .attach(&outside, "eth0", std::net::Ipv4Addr::new(10, 95, 40, 200))
        .expect("attach");
    outside
        .ip(&["-6", "addr", "add", "fd00:95:40::c8/64", "dev", "eth0", "nodad"])
        .expect("outside IPv6");
    let peer = probe::source_seen_by(
        &pods[2].ns,
        &outside,
        "[fd00:95:40::c8]:9000".parse().expect("addr"),
        Duration::from_secs(3),
    )
    .expect("pod -> outside over IPv6");
    assert_eq!(
        peer,
        std::net::IpAddr::V6(c.nodes[2].ip6.expect("node IPv6")),
        "masqueraded to node-2's IPv6 address"
    );

    // Policy: db accepts TCP 8080 from web only. Enforced on both families.
    let policy: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "db", "namespace": "demo"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                              "ports": [{"protocol": "TCP", "port": 8080}]}]}
    }))
    .expect("policy");
    Api::<NetworkPolicy>::namespaced(c.client.clone(), "demo")
        .create(&PostParams::default(), &policy)
        .await
        .expect("create policy");
    let (web, db, other) = (&pods[0], &pods[1], &pods[2]);
    eventually("the policy enforced on both families", || {
        let from_other = flows(other, db);
        let from_web = flows(web, db);
        if from_other == (false, false, false) && from_web == (true, true, false) {
            Ok(())
        } else {
            Err(format!(
                "other->db {from_other:?}, web->db {from_web:?} (tcp6, tcp4, udp6)"
            ))
        }
    })
    .await;
    let rules = c.nodes[1]
        .ns
        .exec(&["ip6tables", "-S", "crc-to-wl-dispatch"])
        .expect("ip6tables");
    assert!(rules.contains("-j DROP"), "{rules}");

    // vxlanMTUV6 through FelixConfiguration: the IPv6 VXLAN device takes it (the pod MTU is the smallest of
    // the encapsulations', so it is the IPv4 device's too).
    Api::<caracal_crds::felix::FelixConfiguration>::all(c.client.clone())
        .patch(
            "default",
            &PatchParams::apply("dual-stack-test").force(),
            &Patch::Apply(json!({
                "apiVersion": "caracal.dev/v1", "kind": "FelixConfiguration",
                "metadata": {"name": "default"},
                "spec": {"vxlanMTUV6": 1280}
            })),
        )
        .await
        .expect("FelixConfiguration with vxlanMTUV6");
    eventually("vxlan6.caracal at MTU 1280", || {
        let link = c.nodes[0]
            .ns
            .ip(&["link", "show", "vxlan6.caracal"])
            .map_err(|e| e.to_string())?;
        if link.contains(" mtu 1280 ") {
            Ok(())
        } else {
            Err(link)
        }
    })
    .await;

    // The IPv6 pool stops encapsulating: routes go straight to the nodes' IPv6 addresses.
    Api::<IPPool>::all(c.client.clone())
        .patch(
            "v6",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"vxlanMode": "Never"}})),
        )
        .await
        .expect("patch pool");
    eventually("IPv6 routes straight to the node", || {
        let routes = c.nodes[0]
            .ns
            .ip(&["-6", "route", "show", "proto", "80"])
            .map_err(|e| e.to_string())?;
        let gone = c.nodes[0].ns.ip(&["link", "show", "vxlan6.caracal"]).is_err();
        if routes.contains("via fd00:95:40::3 dev eth0") && gone {
            Ok(())
        } else {
            Err(routes)
        }
    })
    .await;
    eventually("web -> db over IPv6 without encapsulation", || {
        match flows(web, db) {
            (true, true, false) => Ok(()),
            f => Err(format!("{f:?}")),
        }
    })
    .await;

    // WireGuard on both families through FelixConfiguration: every node publishes an IPv4 and an IPv6 key
    // and makes both devices (the IPv6 one with the name, port and MTU FelixConfiguration gives); then web
    // -> db (the policy still allows it, and still denies other -> db) crosses the underlay as WireGuard's UDP
    // only (51820 between the IPv4 addresses, 51911 between the IPv6 ones), and the marker never shows on
    // the wire.
    Api::<caracal_crds::felix::FelixConfiguration>::all(c.client.clone())
        .patch(
            "default",
            &PatchParams::apply("dual-stack-test").force(),
            &Patch::Apply(json!({
                "apiVersion": "caracal.dev/v1", "kind": "FelixConfiguration",
                "metadata": {"name": "default"},
                "spec": {"wireguardEnabled": true, "wireguardEnabledV6": true,
                    "wireguardInterfaceNameV6": "wg6-dual", "wireguardListeningPortV6": 51911,
                    "wireguardMTUV6": 1360}
            })),
        )
        .await
        .expect("FelixConfiguration with WireGuard");
    let start = Instant::now();
    loop {
        let mut ready = 0;
        for i in 0..3 {
            let n = nodes.get(&format!("node-{i}")).await.expect("node");
            let ann = n.metadata.annotations.unwrap_or_default();
            if ann.contains_key("caracal.dev/WireguardPublicKey")
                && ann.contains_key("caracal.dev/WireguardPublicKeyV6")
                && ann.contains_key("caracal.dev/IPv6WireguardInterfaceAddr")
                && !ann.contains_key("caracal.dev/WireguardUnencryptedPeers")
                && !ann.contains_key("caracal.dev/WireguardUnencryptedPeersV6")
            {
                ready += 1;
            }
        }
        if ready == 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "WireGuard never came up on every node ({ready} of 3)\n{}",
            c.agent_log(0, 30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (dev, mtu) in [("wg.caracal", " mtu 1440 "), ("wg6-dual", " mtu 1360 ")] {
        let link = c.nodes[0]
            .ns
            .ip(&["link", "show", dev])
            .unwrap_or_else(|e| panic!("{dev}: {e}"));
        assert!(link.contains(mtu), "{dev}: {link}");
    }
    let marker = "caracal-dual-stack-wireguard-marker-91c4";
    let db6 = std::net::IpAddr::V6(db.ip6.expect("v6"));
    let db4 = std::net::IpAddr::V4(db.ip);
    let ((), frames) = caracal_e2e::capture::capture(&c.underlay.ns, || {
        for to in [db6, db4] {
            let start = Instant::now();
            while !marker_exchange(web, db, to, marker) {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "web -> db {to} through WireGuard"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    });
    assert!(
        !caracal_e2e::capture::carries(&frames, marker.as_bytes()),
        "the marker never appears on the wire"
    );
    let (n0, n1) = (&c.nodes[web.node], &c.nodes[db.node]);
    let v4 = caracal_e2e::capture::between(&frames, n0.ip.into(), n1.ip.into());
    let v6 = caracal_e2e::capture::between(&frames, n0.ip6.expect("v6").into(), n1.ip6.expect("v6").into());
    assert!(
        !v4.is_empty() && !v6.is_empty(),
        "both families crossed: {v4:?} {v6:?}"
    );
    assert!(
        v4.iter()
            .all(|s| s.proto == 17 && s.sport == 51820 && s.dport == 51820),
        "{v4:?}"
    );
    assert!(
        v6.iter()
            .all(|s| s.proto == 17 && s.sport == 51911 && s.dport == 51911),
        "{v6:?}"
    );
    eventually(
        "the policy still enforced on both families through WireGuard",
        || match (flows(web, db), flows(other, db)) {
            ((true, true, false), (false, false, false)) => Ok(()),
            f => Err(format!("{f:?}")),
        },
    )
    .await;

    // DEL releases both addresses.
    let (code, out) = c.del_pod(other).expect("DEL");
    assert_eq!(code, 0, "{out}");
    for ip in [std::net::IpAddr::V4(other.ip), other.ip6.expect("v6").into()] {
        common::wait_released(&c.client, ip, Duration::from_secs(30)).await;
    }
}
