//! Kernel + cluster tier: three nodes with BGP and no encapsulation. Each agent renders BIRD's
//! configuration and runs Debian's `bird` in its node namespace; the node-to-node mesh comes up
//! (every session Established), each node's kernel learns the other nodes' blocks from BIRD, and pods on
//! all nodes reach each other over TCP, UDP and ICMP. Dual stack: the same BIRD also runs IPv6 sessions
//! between the nodes' IPv6 addresses and carries the IPv6 blocks, and pods reach each other over IPv6. Needs
//! root and bird2 (`make deps` installs it).

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use caracal_crds::ippool::EncapMode;
use caracal_e2e::cluster::{TestCluster, unreachable_pairs, unreachable_pairs_v6};
use caracal_e2e::netns::NetNs;
use serde_json::json;

fn birdc(state: &Path, args: &[&str]) -> String {
    birdc_at(&state.join("bird/bird.ctl"), args)
}

/// `birdc` on the control socket `ctl`.
fn birdc_at(ctl: &Path, args: &[&str]) -> String {
    let out = Command::new("birdc")
        .arg("-s")
        .arg(ctl)
        .args(args)
        .output()
        .expect("birdc (Debian bird2; make deps installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn bgp_mesh_with_bird_carries_pod_routes_between_three_nodes() {
    mesh("10.95.10.0/24", None).await;
}

#[tokio::test]
async fn bgp_mesh_with_bird_carries_ipv6_pod_routes_between_three_dual_stack_nodes() {
    mesh("10.95.50.0/24", Some("fd00:95:50::/64")).await;
}

/// Three nodes on `underlay` (dual stack with `ipv6`), BGP on, pools without encapsulation: the mesh comes
/// up in every family, the kernels learn the other nodes' blocks from BIRD, and every pod pair connects.
async fn mesh(underlay: &str, ipv6: Option<&str>) {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let mut c = TestCluster::with_underlay(
        3,
        Path::new(env!("CARGO_BIN_EXE_caracal-node")),
        &caracal_e2e::controlplane::workspace_bin("caracal-cni"),
        underlay,
    )
    .await
    .expect("cluster");
    c.agent_env.push(("CARACAL_BGP".into(), "Enabled".into()));
    if let Some(net) = ipv6 {
        c.enable_ipv6(net).expect("IPv6 underlay");
        caracal_e2e::objects::ippool(
            &c.client,
            "bgp-pool-v6",
            "fd10:245::/48",
            EncapMode::Never,
            EncapMode::Never,
            false,
        )
        .await
        .expect("IPv6 pool");
    }
    let families = if ipv6.is_some() { 2 } else { 1 };
    caracal_e2e::objects::ippool(
        &c.client,
        "bgp-pool",
        "10.245.0.0/16",
        EncapMode::Never,
        EncapMode::Never,
        true,
    )
    .await
    .expect("pool");
    c.start_agents().await.expect("agents");
    let pods = c.pod_on_each_node("demo", "b", json!({})).await.expect("ADD");

    // Every node's BIRD has two Established sessions, and its kernel has the other nodes' blocks.
    let start = Instant::now();
    loop {
        let mut pending = Vec::new();
        for n in &c.nodes {
            let protocols = birdc(&n.state, &["show", "protocols"]);
            let established = protocols
                .lines()
                .filter(|l| l.contains("BGP") && l.contains("Established"))
                .count();
            let mut routes = n.ns.ip(&["route", "show", "proto", "bird"]).unwrap_or_default();
            let mut learned = routes.lines().filter(|l| l.starts_with("10.245.")).count();
            if ipv6.is_some() {
                let routes6 =
                    n.ns.ip(&["-6", "route", "show", "proto", "bird"])
                        .unwrap_or_default();
                // Each family must have learned both other nodes' blocks.
                learned = learned.min(routes6.lines().filter(|l| l.starts_with("fd10:245:")).count());
                routes.push_str(&routes6);
            }
            if established != 2 * families || learned < 2 {
                pending.push(format!(
                    "{}: {established} sessions, {learned} learned routes\n{protocols}\n{routes}",
                    n.name
                ));
            }
        }
        if pending.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "BGP never converged:\n{}",
            pending.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // No VXLAN device: BGP carries the routes.
    assert!(c.nodes[0].ns.ip(&["link", "show", "vxlan.caracal"]).is_err());

    let start = Instant::now();
    loop {
        let mut failed = unreachable_pairs(&pods, Duration::from_millis(700));
        if ipv6.is_some() {
            failed.extend(unreachable_pairs_v6(&pods, Duration::from_millis(700)));
        }
        if failed.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "pods unreachable over BGP routes: {failed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The sum of the TCP MD5 failure counters (`TcpExt` TCPMD5NotFound, TCPMD5Unexpected, TCPMD5Failure) in
/// `ns`: segments the kernel dropped because their MD5 signature was missing, unexpected or wrong.
fn md5_drops(ns: &NetNs) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/netstat"]).expect("netstat");
    let mut lines = text.lines();
    let mut total = 0;
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if n.starts_with("TCPMD5") {
                total += v.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// An IPPool for the nodes `selector` picks, without encapsulation unless `vxlan`.
async fn pool(c: &TestCluster, name: &str, cidr: &str, selector: &str, no_export: bool, vxlan: bool) {
    use caracal_crds::ippool::IPPool;
    let pool: IPPool = serde_json::from_value(json!({
        "apiVersion": "caracal.dev/v1", "kind": "IPPool", "metadata": {"name": name},
        "spec": {"cidr": cidr, "blockSize": 26, "natOutgoing": false, "nodeSelector": selector,
            "vxlanMode": if vxlan { "Always" } else { "Never" }, "ipipMode": "Never",
            "disableBGPExport": no_export},
    }))
    .expect("pool");
    kube::Api::<IPPool>::all(c.client.clone())
        .create(&Default::default(), &pool)
        .await
        .expect("create pool");
}

/// An external router: BIRD in its own namespace on the underlay (a top-of-rack router, AS 65100) with a
/// host behind it on 10.96.70.0/24, peering with both nodes through a BGPPeer whose MD5 password is in a
/// Secret. A session is not configured while its Secret is missing (the node's metrics say so), a wrong
/// password keeps it down (the router's kernel drops the signed segments), the right one brings it up; the
/// router learns the exported pool's block and not the block of the pool with `disableBGPExport`, and the
/// host behind it reaches a pod in the first and not in the second.
#[tokio::test]
async fn an_external_router_with_an_md5_password_learns_the_exported_blocks_and_its_host_reaches_pods() {
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let mut c = TestCluster::with_underlay(
        2,
        Path::new(env!("CARGO_BIN_EXE_caracal-node")),
        &caracal_e2e::controlplane::workspace_bin("caracal-cni"),
        "10.95.70.0/24",
    )
    .await
    .expect("cluster");
    c.agent_env.push(("CARACAL_BGP".into(), "Enabled".into()));
    c.agent_env
        .push(("CARACAL_NAMESPACE".into(), "caracal-system".into()));

    // The router and the host behind it.
    let tor = NetNs::new("tor").expect("router namespace");
    let tor_ip = "10.95.70.200";
    c.underlay
        .attach(&tor, "eth0", tor_ip.parse().expect("ip"))
        .expect("router on the underlay");
    tor.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
    let host = NetNs::new("exth").expect("host namespace");
    tor.ip(&[
        "link",
        "add",
        "h0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        host.name(),
    ])
    .expect("veth");
    tor.ip(&["addr", "add", "10.96.70.1/24", "dev", "h0"])
        .expect("addr");
    tor.ip(&["link", "set", "h0", "up"]).expect("up");
    host.ip(&["addr", "add", "10.96.70.2/24", "dev", "eth0"])
        .expect("addr");
    host.ip(&["link", "set", "eth0", "up"]).expect("up");
    host.ip(&["link", "set", "lo", "up"]).expect("lo up");
    host.ip(&["route", "add", "default", "via", "10.96.70.1"])
        .expect("route");
    let password = "t0r-Secret!";
    let dir = c.cp.dir().join("tor");
    std::fs::create_dir_all(&dir).expect("router dir");
    let mut conf = format!(
        "router id {tor_ip};\nlog stderr all;\nprotocol device {{ scan time 2; }}\n\
         protocol direct hosts {{ ipv4; interface \"h0\"; }}\n\
         protocol kernel {{ ipv4 {{ import none; export filter {{ if source = RTS_BGP then accept; reject; }}; }}; }}\n\
         template bgp node {{\n  local {tor_ip} as 65100;\n  direct;\n  connect retry time 2;\n  error wait time 2, 5;\n\
         \x20 password \"{password}\";\n  ipv4 {{ import all; export where proto = \"hosts\"; }};\n}}\n"
    );
    for (i, n) in c.nodes.iter().enumerate() {
        conf.push_str(&format!(
            "protocol bgp node{i} from node {{ neighbor {} as 64512; }}\n",
            n.ip
        ));
    }
    std::fs::write(dir.join("bird.conf"), conf).expect("router conf");
    let ctl = dir.join("bird.ctl");
    let _router = caracal_e2e::process::Supervised::spawn(
        "router bird",
        Path::new("/usr/bin/ip"),
        &[
            "netns".into(),
            "exec".into(),
            tor.name().into(),
            "bird".into(),
            "-f".into(),
            "-c".into(),
            dir.join("bird.conf").display().to_string(),
            "-s".into(),
            ctl.display().to_string(),
            "-P".into(),
            dir.join("bird.pid").display().to_string(),
        ],
        &dir.join("bird.log"),
        caracal_e2e::process::Lifetime::Attached,
    )
    .expect("router BIRD");

    // Node 0 takes addresses from a pool BGP exports, node 1 from one it must not.
    let on = |i: usize| format!("kubernetes.io/hostname == '{}'", c.nodes[i].name);
    pool(&c, "exported", "10.247.0.0/16", &on(0), false, false).await;
    pool(&c, "hidden", "10.248.0.0/16", &on(1), true, true).await;
    let ns = kube::Api::<Namespace>::all(c.client.clone());
    let _ = ns
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": "caracal-system"}})).expect("ns"),
        )
        .await;
    let peer: caracal_crds::bgp::BGPPeer = serde_json::from_value(json!({
        "apiVersion": "caracal.dev/v1", "kind": "BGPPeer", "metadata": {"name": "tor"},
        "spec": {"peerIP": tor_ip, "asNumber": 65100,
            "password": {"secretKeyRef": {"name": "bgp-passwords", "key": "tor"}}},
    }))
    .expect("peer");
    kube::Api::<caracal_crds::bgp::BGPPeer>::all(c.client.clone())
        .create(&Default::default(), &peer)
        .await
        .expect("BGPPeer with a password");
    c.start_agents().await.expect("agents");
    caracal_e2e::objects::namespace(&c.client, "demo", json!({}))
        .await
        .expect("namespace");
    let exported = c.add_pod(0, "demo", "exported", json!({})).await.expect("pod 0");
    let hidden = c.add_pod(1, "demo", "hidden", json!({})).await.expect("pod 1");
    assert!(
        exported.ip.to_string().starts_with("10.247.") && hidden.ip.to_string().starts_with("10.248."),
        "pools by node: {} {}",
        exported.ip,
        hidden.ip
    );

    // No Secret yet: the session is left out, and the metrics say so.
    let left_out = format!("caracal_node_bgp_session_left_out{{peer=\"{tor_ip}\"}} 1");
    for n in &c.nodes {
        let start = Instant::now();
        loop {
            let text = caracal_e2e::probe::http_get(n.metrics, "/metrics")
                .map(|r| r.1)
                .unwrap_or_default();
            if text.contains(&left_out) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{}: no {left_out} on /metrics:\n{text}",
                n.name
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let conf = std::fs::read_to_string(n.state.join("bird/bird.conf")).expect("bird.conf");
        assert!(
            !conf.contains(tor_ip),
            "{}: a session without its password:\n{conf}",
            n.name
        );
    }

    // A wrong password: the nodes configure the session, sign their segments, and the router's kernel drops
    // them; nothing is established.
    let secrets = kube::Api::<Secret>::namespaced(c.client.clone(), "caracal-system");
    let secret = |pw: &str| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": "bgp-passwords"}, "stringData": {"tor": pw}}))
            .expect("secret")
    };
    let drops_before = md5_drops(&tor);
    secrets
        .create(&Default::default(), &secret("not-the-password"))
        .await
        .expect("Secret");
    let start = Instant::now();
    while md5_drops(&tor) < drops_before + 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the router's kernel never dropped a wrongly signed segment ({} MD5 drops)",
            md5_drops(&tor)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for n in &c.nodes {
        let conf = std::fs::read_to_string(n.state.join("bird/bird.conf")).expect("bird.conf");
        assert!(
            conf.contains("password \"not-the-password\";"),
            "{}:\n{conf}",
            n.name
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(n.state.join("bird/bird.conf"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}: bird.conf holds passwords", n.name);
    }
    let protocols = birdc_at(&ctl, &["show", "protocols"]);
    assert!(
        !protocols.contains("Established"),
        "a session came up with the wrong password:\n{protocols}"
    );

    // The right password (a rotation of the Secret): both sessions come up, the router learns the exported
    // block and not the hidden one, and the nodes learn the host subnet.
    secrets
        .replace("bgp-passwords", &Default::default(), &secret(password))
        .await
        .expect("Secret update");
    let start = Instant::now();
    loop {
        let protocols = birdc_at(&ctl, &["show", "protocols"]);
        let up = protocols
            .lines()
            .filter(|l| l.contains("BGP") && l.contains("Established"))
            .count();
        let routes = tor.ip(&["route", "show", "proto", "bird"]).unwrap_or_default();
        let learned = c.nodes.iter().all(|n| {
            n.ns.ip(&["route", "show", "10.96.70.0/24"])
                .unwrap_or_default()
                .contains(tor_ip)
        });
        if up == 2 && routes.contains("10.247.") && learned {
            assert!(
                !routes.contains("10.248."),
                "a disableBGPExport block reached the router:\n{routes}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the router never came up: {up} sessions, learned {learned}\n{protocols}\n{routes}\nnode 0 log:\n{}",
            c.agent_log(0, 30)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Announcements take a moment to settle after the sessions come up: the hidden block stays away.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let routes = tor.ip(&["route", "show", "proto", "bird"]).unwrap_or_default();
    assert!(
        !routes.contains("10.248."),
        "a disableBGPExport block reached the router:\n{routes}"
    );
    assert!(
        !birdc_at(&ctl, &["show", "route"]).contains("10.248."),
        "the router's BIRD learned a disableBGPExport block"
    );

    // The host behind the router reaches the exported pod, and not the hidden one.
    let start = Instant::now();
    loop {
        let got = caracal_e2e::probe::tcp(&host, &exported.ns, exported.ip, 7070, Duration::from_millis(700))
            .expect("probe");
        if got.connected() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the host behind the router cannot reach pod {}: {got:?}",
            exported.ip
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = caracal_e2e::probe::tcp(&host, &hidden.ns, hidden.ip, 7070, Duration::from_millis(700))
        .expect("probe");
    assert!(
        !got.connected(),
        "the host reached a pod of a pool BGP does not export"
    );

    // The agent reads a password Secret with no more than Calico's documented grant, a Role with get, list
    // and watch on that one Secret (resourceNames), as caracal-node's ServiceAccount; another Secret is
    // refused, and says so.
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "caracal-node-bgp-passwords", "namespace": "caracal-system"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["bgp-passwords"],
            "verbs": ["get", "list", "watch"]}],
    }))
    .expect("role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "caracal-node-bgp-passwords", "namespace": "caracal-system"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "caracal-node-bgp-passwords"},
        "subjects": [{"kind": "ServiceAccount", "name": "caracal-node", "namespace": "caracal-system"}],
    }))
    .expect("binding");
    kube::Api::<Role>::namespaced(c.client.clone(), "caracal-system")
        .create(&Default::default(), &role)
        .await
        .expect("Role");
    kube::Api::<RoleBinding>::namespaced(c.client.clone(), "caracal-system")
        .create(&Default::default(), &binding)
        .await
        .expect("RoleBinding");
    let kubeconfig = kube::config::Kubeconfig::read_from(c.cp.kubeconfig()).expect("kubeconfig");
    let mut cfg = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    cfg.auth_info.impersonate = Some("system:serviceaccount:caracal-system:caracal-node".into());
    cfg.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        "system:serviceaccounts:caracal-system".into(),
        "system:authenticated".into(),
    ]);
    let as_node = kube::Client::try_from(cfg).expect("client");
    let mut watched = caracal_node::routing::secrets::Secrets::new(as_node, "caracal-system".into());
    watched.track(&["bgp-passwords".to_owned(), "not-granted".to_owned()].into());
    let start = Instant::now();
    loop {
        use caracal_node::routing::secrets::Known;
        let granted = watched.get("bgp-passwords");
        let refused = watched.get("not-granted");
        let read = matches!(&granted, Known::Present(d) if d.get("tor").map(Vec::as_slice) == Some(password.as_bytes()));
        if read && matches!(&refused, Known::Unreadable(e) if e.contains("forbidden")) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "as caracal-node: granted {granted:?}, other {refused:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
