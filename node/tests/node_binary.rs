//! The `caracal-node` binary as a process: programs the data plane of its node from the real API server,
//! reports ready only then, serves metrics, and exits cleanly on SIGTERM leaving the rules in place.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caracal_e2e::netns;
use caracal_e2e::probe::http_get;
use caracal_node::cni::host_iface;
use serde_json::json;

/// Kills a spawned binary when the test ends, also when it panics.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port()
}

/// The agent binary for node `name`, programming `node`'s namespace from the API server of `cp`: the
/// process, its health and metrics ports, its log file.
fn start_agent(
    cp: &caracal_e2e::controlplane::ControlPlane,
    node: &netns::NetNs,
    name: &str,
) -> (Reap, u16, u16, std::path::PathBuf) {
    start_agent_env(cp, node, name, &[])
}

/// [`start_agent`] with more environment.
fn start_agent_env(
    cp: &caracal_e2e::controlplane::ControlPlane,
    node: &netns::NetNs,
    name: &str,
    env: &[(&str, &str)],
) -> (Reap, u16, u16, std::path::PathBuf) {
    let (health, metrics) = (free_port(), free_port());
    let log = cp.dir().join(format!("caracal-node-{name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_caracal-node"))
        .envs(env.iter().copied())
        .env("KUBECONFIG", cp.kubeconfig())
        .env("CARACAL_NODE_NAME", name)
        .env("CARACAL_NETNS", node.name())
        .env("CARACAL_CNI_SOCKET", cp.dir().join(format!("{name}.sock")))
        .env("CARACAL_STATE_DIR", cp.dir().join(format!("{name}-state")))
        .env("CARACAL_HEALTH_PORT", health.to_string())
        .env("CARACAL_METRICS_PORT", metrics.to_string())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start caracal-node");
    (Reap(child), health, metrics, log)
}

/// A control plane with Caracal's CRDs, a node namespace (`tag`) and the pod `app/web` at `ip` on node
/// `node_name`, wired in the namespace and written to the API server.
async fn cluster_with_pod(
    tag: &str,
    node_name: &str,
    ip: &str,
) -> (
    caracal_e2e::controlplane::ControlPlane,
    kube::Client,
    netns::NetNs,
    netns::Pod,
) {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let (cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let node = netns::node(tag).expect("node namespace");
    let pod = netns::wire_pod(
        &node,
        &format!("{tag}pod"),
        &host_iface("app", "web"),
        ip.parse().expect("ip"),
    )
    .expect("pod");
    caracal_e2e::objects::namespace(&client, "app", json!({}))
        .await
        .expect("namespace");
    caracal_e2e::objects::pod(&client, "app", "web", json!({}), node_name, ip)
        .await
        .expect("pod");
    (cp, client, node, pod)
}

#[tokio::test]
async fn the_node_binary_programs_its_node_reports_ready_and_stops_cleanly() {
    let (cp, _client, node, _pod) = cluster_with_pod("nbin", "bin-node", "10.61.0.1").await;

    let (mut child, health, metrics, log) = start_agent(&cp, &node, "bin-node");
    let start = Instant::now();
    while http_get(health, "/readyz").map(|r| r.0) != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never ready; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            child.0.try_wait().expect("wait").is_none(),
            "exited; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(http_get(health, "/healthz").map(|r| r.0), Some(200));
    let (code, text) = http_get(metrics, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        text.contains("caracal_node_ready 1") && text.contains("caracal_node_dataplane_programs_total"),
        "{text}"
    );
    let save = node.exec(&["iptables-save", "-t", "filter"]).expect("save");
    assert!(
        save.contains(&format!(
            "-o {} -g crc-tw-{}",
            host_iface("app", "web"),
            host_iface("app", "web")
        )),
        "the pod's interface is dispatched:\n{save}"
    );

    Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        node.exec(&["iptables-save", "-t", "filter"])
            .expect("save")
            .contains("crc-FORWARD"),
        "rules stay after the agent stops"
    );
    caracal_node::dataplane::backend("Iptables", node.exec_prefix(), true)
        .expect("backend")
        .remove_all()
        .expect("cleanup");
}

fn pki(dir: &std::path::Path) -> [std::path::PathBuf; 5] {
    caracal_e2e::pki::TyphaPki::generate()
        .expect("pki")
        .write(dir)
        .expect("write pki")
}

#[tokio::test]
async fn the_node_binary_through_the_typha_binary_programs_its_node() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let (cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let node = netns::node("ntyp").expect("node namespace");
    let _pod = netns::wire_pod(
        &node,
        "ntpod",
        &host_iface("app", "web"),
        "10.62.0.1".parse().expect("ip"),
    )
    .expect("pod");
    caracal_e2e::objects::namespace(&client, "app", json!({}))
        .await
        .expect("namespace");
    caracal_e2e::objects::pod(&client, "app", "web", json!({}), "typha-node", "10.62.0.1")
        .await
        .expect("pod");
    // Typha's PKI in its own directory: the control plane's ca.crt next door is the API server's client CA.
    let typha_pki = cp.dir().join("typha-pki");
    std::fs::create_dir_all(&typha_pki).expect("mkdir");
    let [ca, tcrt, tkey, ncrt, nkey] = pki(&typha_pki);
    let (typha_port, typha_health, typha_metrics, health, metrics) =
        (free_port(), free_port(), free_port(), free_port(), free_port());
    let tlog = cp.dir().join("typha.log");
    let typha = Command::new(caracal_e2e::controlplane::workspace_bin("caracal-typha"))
        .env("KUBECONFIG", cp.kubeconfig())
        .env("CARACAL_TYPHA_LISTEN_HOST", "127.0.0.1")
        .env("CARACAL_TYPHA_PORT", typha_port.to_string())
        .env("CARACAL_TYPHA_HEALTH_PORT", typha_health.to_string())
        .env("CARACAL_TYPHA_METRICS_PORT", typha_metrics.to_string())
        .env("CARACAL_TYPHA_CA_FILE", &ca)
        .env("CARACAL_TYPHA_CERT_FILE", &tcrt)
        .env("CARACAL_TYPHA_KEY_FILE", &tkey)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&tlog).expect("log"))
        .spawn()
        .expect("start caracal-typha");
    let mut typha = Reap(typha);
    let nlog = cp.dir().join("node.log");
    let agent = Command::new(env!("CARGO_BIN_EXE_caracal-node"))
        .env("KUBECONFIG", cp.kubeconfig())
        .env("CARACAL_NODE_NAME", "typha-node")
        .env("CARACAL_NETNS", node.name())
        .env("CARACAL_CNI_SOCKET", cp.dir().join("typha-node.sock"))
        .env("CARACAL_STATE_DIR", cp.dir().join("typha-node-state"))
        .env("CARACAL_HEALTH_PORT", health.to_string())
        .env("CARACAL_METRICS_PORT", metrics.to_string())
        .env("CARACAL_TYPHA_ADDRS", format!("127.0.0.1:{typha_port}"))
        .env("CARACAL_TYPHA_CA_FILE", &ca)
        .env("CARACAL_TYPHA_CERT_FILE", &ncrt)
        .env("CARACAL_TYPHA_KEY_FILE", &nkey)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&nlog).expect("log"))
        .spawn()
        .expect("start caracal-node");
    let mut agent = Reap(agent);
    let start = Instant::now();
    while http_get(health, "/readyz").map(|r| r.0) != Some(200) {
        let logs = || {
            format!(
                "typha:\n{}\nnode:\n{}",
                std::fs::read_to_string(&tlog).unwrap_or_default(),
                std::fs::read_to_string(&nlog).unwrap_or_default()
            )
        };
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the agent never got ready through Typha; {}",
            logs()
        );
        assert!(
            typha.0.try_wait().expect("wait").is_none() && agent.0.try_wait().expect("wait").is_none(),
            "a process exited; {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        http_get(typha_health, "/readyz").map(|r| r.0),
        Some(200),
        "Typha is ready once its watches are in sync"
    );
    let (_, text) = http_get(typha_metrics, "/metrics").expect("typha metrics");
    assert!(text.contains("caracal_typha_connections 1"), "{text}");
    let save = node.exec(&["iptables-save", "-t", "filter"]).expect("save");
    assert!(
        save.contains(&format!("-o {} -g crc-tw-", host_iface("app", "web"))),
        "programmed through Typha:\n{save}"
    );
    for p in [&mut agent, &mut typha] {
        Command::new("kill")
            .args(["-TERM", &p.0.id().to_string()])
            .status()
            .expect("kill");
    }
    for p in [&mut agent, &mut typha] {
        let start = Instant::now();
        while p.0.try_wait().expect("wait").is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    caracal_node::dataplane::backend("Iptables", node.exec_prefix(), true)
        .expect("backend")
        .remove_all()
        .expect("cleanup");
}

/// Waits until `f` holds, or fails with `what` and the agent's log.
fn eventually(what: &str, within: Duration, log: &std::path::Path, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < within,
            "{what}: not within {within:?}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    start.elapsed()
}

/// FelixConfiguration changes, written through the API server, take effect in the running agent without a
/// restart: the per-node object moves the metrics listener; `iptablesRefreshInterval` and
/// `routeRefreshInterval` put the read-backs that repair drift (a deleted hook, forwarding turned off) on the
/// new schedules; `defaultEndpointToHostAction` (Drop by default) lets a pod reach
/// its host; `natOutgoingAddress` turns masquerading into SNAT to that address; `logSeverityScreen` Debug
/// brings debug lines.
#[tokio::test]
async fn felix_configuration_changes_take_effect_in_the_running_agent() {
    use caracal_e2e::probe::{self, Outcome};
    use kube::api::{Api, Patch, PatchParams};
    let (cp, client, node, pod) = cluster_with_pod("nfelix", "felix-node", "10.62.0.1").await;
    // An underlay address, so that routing finds the node's address and converges.
    for args in [
        &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"][..],
        &["addr", "add", "10.99.9.2/24", "dev", "eth0"],
        &["link", "set", "eth0", "up"],
    ] {
        node.ip(args).expect("underlay");
    }
    caracal_e2e::objects::ippool(
        &client,
        "pool",
        "10.62.0.0/16",
        caracal_crds::ippool::EncapMode::Never,
        caracal_crds::ippool::EncapMode::Never,
        true,
    )
    .await
    .expect("pool");
    let (_child, health, metrics, log) = start_agent(&cp, &node, "felix-node");
    eventually("ready", Duration::from_secs(60), &log, || {
        http_get(health, "/readyz").map(|r| r.0) == Some(200)
    });
    assert!(http_get(metrics, "/metrics").is_some_and(|r| r.0 == 200));
    let gateway = std::net::Ipv4Addr::new(169, 254, 1, 1);
    let to_host =
        |port: u16| probe::tcp(&pod.ns, &node, gateway, port, Duration::from_millis(700)).expect("probe");
    assert_eq!(
        to_host(7301),
        Outcome::NoAnswer,
        "defaultEndpointToHostAction is Drop by default"
    );

    // Drift with the default schedule (90 s): the FORWARD hook deleted stays deleted for a while.
    let hooked = || {
        node.exec(&["iptables-save", "-t", "filter"])
            .expect("save")
            .contains("-A FORWARD -j crc-FORWARD")
    };
    node.exec(&["iptables", "-D", "FORWARD", "-j", "crc-FORWARD"])
        .expect("drift");
    // Routing's drift: forwarding turned off (the address manager turns it on at its first sync and then at
    // every forced one only).
    eventually("routing's first sync", Duration::from_secs(30), &log, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("routing converged")
    });
    let forwarding = || {
        node.exec(&["sysctl", "-n", "net.ipv4.ip_forward"])
            .expect("sysctl")
            .trim()
            == "1"
    };
    node.sysctl("net.ipv4.ip_forward", "0").expect("drift");
    std::thread::sleep(Duration::from_secs(4));
    assert!(!hooked(), "no read-back yet on the 90 s schedule");
    assert!(!forwarding(), "no forced routing sync yet on the 90 s schedule");

    let felix: Api<caracal_crds::felix::FelixConfiguration> = Api::all(client.clone());
    let new_metrics = free_port();
    let apply = |name: &str, spec: serde_json::Value| {
        let felix = felix.clone();
        let name = name.to_owned();
        async move {
            let obj = json!({"apiVersion": "caracal.dev/v1", "kind": "FelixConfiguration", "metadata": {"name": name}, "spec": spec});
            felix
                .patch(
                    &name,
                    &PatchParams::apply("caracal-test").force(),
                    &Patch::Apply(&obj),
                )
                .await
                .expect("apply FelixConfiguration");
        }
    };
    apply(
        "default",
        json!({"iptablesRefreshInterval": "2s", "routeRefreshInterval": "3s", "defaultEndpointToHostAction": "Accept", "natOutgoingAddress": "192.0.2.77", "logSeverityScreen": "Debug"}),
    )
    .await;
    apply("node.felix-node", json!({"prometheusMetricsPort": new_metrics})).await;

    let routed = eventually(
        "forwarding turned on again on the 3 s routing schedule",
        Duration::from_secs(15),
        &log,
        forwarding,
    );
    eprintln!("routing drift repaired {routed:?} after the new schedule was written");
    let took = eventually(
        "the drift repaired on the 2 s schedule",
        Duration::from_secs(15),
        &log,
        hooked,
    );
    eprintln!("drift repaired {took:?} after the new schedule was written");
    eventually(
        "metrics moved to the per-node port",
        Duration::from_secs(15),
        &log,
        || {
            http_get(new_metrics, "/metrics")
                .is_some_and(|r| r.0 == 200 && r.1.contains("caracal_node_ready 1"))
        },
    );
    eventually(
        "the old metrics port closed",
        Duration::from_secs(15),
        &log,
        || http_get(metrics, "/metrics").is_none(),
    );
    assert!(
        http_get(health, "/healthz").is_some_and(|r| r.0 == 200),
        "health stays where it was"
    );
    eventually(
        "Accept: the pod reaches its host",
        Duration::from_secs(15),
        &log,
        || to_host(7302) == Outcome::Connected,
    );
    eventually(
        "natOutgoingAddress: SNAT to it",
        Duration::from_secs(15),
        &log,
        || {
            node.exec(&["iptables-save", "-t", "nat"])
                .expect("save")
                .contains("-j SNAT --to-source 192.0.2.77")
        },
    );
    eventually(
        "Debug: debug lines in the log",
        Duration::from_secs(15),
        &log,
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("DEBUG")
        },
    );

    // Back to Drop, through the per-node object this time (it wins over default).
    apply(
        "node.felix-node",
        json!({"prometheusMetricsPort": new_metrics, "defaultEndpointToHostAction": "Drop"}),
    )
    .await;
    eventually(
        "Drop again from the per-node object",
        Duration::from_secs(15),
        &log,
        || to_host(7303) == Outcome::NoAnswer,
    );
    caracal_node::dataplane::backend("Iptables", node.exec_prefix(), true)
        .expect("backend")
        .remove_all()
        .expect("cleanup");
}

/// `bpfEnabled` is one of the settings Felix restarts itself for: written while the agent runs iptables, the
/// agent stops (saying why) so that the kubelet starts it again; started again, it reads FelixConfiguration
/// before choosing and runs the BPF data plane although its environment still says iptables.
#[tokio::test]
async fn bpf_enabled_restarts_the_agent_into_the_bpf_data_plane() {
    let (cp, client, node, _pod) = cluster_with_pod("nbpfen", "bpfen-node", "10.63.0.1").await;
    let (mut child, health, _metrics, log) = start_agent(&cp, &node, "bpfen-node");
    eventually("ready", Duration::from_secs(60), &log, || {
        http_get(health, "/readyz").map(|r| r.0) == Some(200)
    });
    apply_felix(&client, "default", json!({"bpfEnabled": true})).await;
    eventually(
        "the agent stops to restart",
        Duration::from_secs(30),
        &log,
        || child.0.try_wait().expect("wait").is_some(),
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("bpfEnabled true") && text.contains("restarting to apply it"),
        "{text}"
    );

    // Started again with the same environment (CARACAL_DATAPLANE unset: iptables).
    let (_again, health, _metrics, log) = start_agent(&cp, &node, "bpfen-node");
    eventually("ready again", Duration::from_secs(60), &log, || {
        http_get(health, "/readyz").map(|r| r.0) == Some(200)
    });
    let iface = host_iface("app", "web");
    let programs = node
        .enter(move || caracal_node::dataplane::bpf::Loaded::tcx_programs(&iface).expect("query"))
        .expect("enter");
    assert_eq!(programs, (1, 1), "the BPF programs on the pod's interface");
    assert!(
        !node
            .exec(&["iptables-save", "-t", "filter"])
            .expect("save")
            .contains("-A FORWARD -j crc-FORWARD"),
        "the iptables backend's rules went with the switch"
    );
    let prefix = node.exec_prefix();
    caracal_node::dataplane::bpf::remove_all(&caracal_node::dataplane::bpf::backend::pin_dir(&prefix))
        .expect("cleanup");
    caracal_node::dataplane::backend("Iptables", prefix, true)
        .expect("backend")
        .remove_all()
        .expect("cleanup");
}

/// Applies FelixConfiguration `name` with `spec` (server-side apply, the test's field manager: fields left
/// out of `spec` are removed).
async fn apply_felix(client: &kube::Client, name: &str, spec: serde_json::Value) {
    use kube::api::{Api, Patch, PatchParams};
    let obj = json!({"apiVersion": "caracal.dev/v1", "kind": "FelixConfiguration", "metadata": {"name": name}, "spec": spec});
    Api::<caracal_crds::felix::FelixConfiguration>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("caracal-test").force(),
            &Patch::Apply(&obj),
        )
        .await
        .expect("apply FelixConfiguration");
}

/// The HTTP status of `path` at `addr` (None: nothing answers there).
fn status_at(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// FelixConfiguration's encapsulation, WireGuard and listener fields take effect in the running agent
/// without a restart: `vxlanEnabled` makes `vxlan.caracal` although the pool asks for none, with
/// `vxlanVNI`, `vxlanPort` and `vxlanMTU`; `wireguardEnabled` makes the device `wireguardInterfaceName` with
/// `wireguardMTU`, listening on `wireguardListeningPort`; `healthPort` and `prometheusMetricsHost` move the
/// listeners. Then `mtuIfacePattern` makes a narrower interface the MTU's source (both devices follow it), a
/// renamed WireGuard interface replaces the old one, and turning `vxlanEnabled`, `wireguardEnabled`,
/// `healthEnabled` and `prometheusMetricsEnabled` off removes the devices and closes the listeners.
#[tokio::test]
async fn felix_encapsulation_wireguard_and_listener_fields_take_effect_in_the_running_agent() {
    use kube::api::{Api, Patch, PatchParams};
    let (cp, client, node, _pod) = cluster_with_pod("nfelx", "felx-node", "10.64.0.1").await;
    for args in [
        &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"][..],
        &["addr", "add", "10.99.8.2/24", "dev", "eth0"],
        &["link", "set", "eth0", "up"],
        // A narrower interface mtuIfacePattern will pick.
        &[
            "link", "add", "eth1", "mtu", "1400", "type", "veth", "peer", "name", "eth1p", "mtu", "1400",
        ],
        &["link", "set", "eth1", "up"],
        &["link", "set", "eth1p", "up"],
    ] {
        node.ip(args).expect("underlay");
    }
    caracal_e2e::objects::ippool(
        &client,
        "pool",
        "10.64.0.0/16",
        caracal_crds::ippool::EncapMode::Never,
        caracal_crds::ippool::EncapMode::Never,
        true,
    )
    .await
    .expect("pool");
    let (_child, health, metrics, log) = start_agent_env(
        &cp,
        &node,
        "felx-node",
        &[("CARACAL_WIREGUARD_BACKEND", "userspace")],
    );
    eventually("ready", Duration::from_secs(60), &log, || {
        http_get(health, "/readyz").map(|r| r.0) == Some(200)
    });
    let link = |name: &str| node.ip(&["-d", "link", "show", name]).ok();
    let mtu_of = |name: &str| {
        link(name).and_then(|t| {
            let w: Vec<&str> = t.split_whitespace().collect();
            w.iter()
                .position(|x| *x == "mtu")
                .and_then(|i| w.get(i + 1)?.parse::<u32>().ok())
        })
    };
    assert!(link("vxlan.caracal").is_none(), "the pool asks for no VXLAN");

    let felix: Api<caracal_crds::felix::FelixConfiguration> = Api::all(client.clone());
    let apply = |spec: serde_json::Value| {
        let felix = felix.clone();
        async move {
            let obj = json!({"apiVersion": "caracal.dev/v1", "kind": "FelixConfiguration", "metadata": {"name": "default"}, "spec": spec});
            felix
                .patch(
                    "default",
                    &PatchParams::apply("caracal-test").force(),
                    &Patch::Apply(&obj),
                )
                .await
                .expect("apply FelixConfiguration");
        }
    };
    let new_health = free_port();
    let local2 = std::net::Ipv4Addr::new(127, 0, 0, 2);
    apply(json!({
        "vxlanEnabled": true, "vxlanVNI": 5000, "vxlanPort": 8472, "vxlanMTU": 1300,
        "wireguardEnabled": true, "wireguardInterfaceName": "wg-t0", "wireguardListeningPort": 51900,
        "wireguardMTU": 1380, "healthPort": new_health, "prometheusMetricsHost": "127.0.0.2",
    }))
    .await;
    eventually(
        "vxlan.caracal with VNI 5000, port 8472, MTU 1300",
        Duration::from_secs(20),
        &log,
        || {
            link("vxlan.caracal").is_some_and(|t| t.contains("id 5000") && t.contains("dstport 8472"))
                && mtu_of("vxlan.caracal") == Some(1300)
        },
    );
    eventually("wg-t0 with MTU 1380", Duration::from_secs(20), &log, || {
        mtu_of("wg-t0") == Some(1380)
    });
    eventually(
        "WireGuard listening on 51900",
        Duration::from_secs(20),
        &log,
        || node.exec(&["ss", "-uln"]).unwrap_or_default().contains(":51900 "),
    );
    assert!(link("wg.caracal").is_none(), "only the named device");
    eventually("health on the new port", Duration::from_secs(15), &log, || {
        http_get(new_health, "/healthz").is_some_and(|r| r.0 == 200)
    });
    eventually(
        "the old health port closed",
        Duration::from_secs(15),
        &log,
        || http_get(health, "/healthz").is_none(),
    );
    eventually("metrics on 127.0.0.2 only", Duration::from_secs(15), &log, || {
        status_at((local2, metrics).into(), "/metrics") == Some(200)
            && http_get(metrics, "/metrics").is_none()
    });

    // The MTU from eth1 (1400): WireGuard's 60 bytes are the larger overhead, so the pod MTU and the VXLAN
    // device are 1340, as the WireGuard device; the interface renamed.
    apply(json!({
        "vxlanEnabled": true, "vxlanVNI": 5000, "vxlanPort": 8472, "mtuIfacePattern": "^eth1$",
        "wireguardEnabled": true, "wireguardInterfaceName": "wg-t1", "wireguardListeningPort": 51900,
        "healthPort": new_health, "prometheusMetricsHost": "127.0.0.2",
    }))
    .await;
    eventually(
        "the MTU from eth1 on both devices",
        Duration::from_secs(20),
        &log,
        || mtu_of("wg-t1") == Some(1340) && mtu_of("vxlan.caracal") == Some(1340),
    );
    assert!(link("wg-t0").is_none(), "the renamed device replaced the old one");

    // Everything off.
    apply(json!({
        "vxlanEnabled": false, "wireguardEnabled": false, "healthEnabled": false,
        "prometheusMetricsEnabled": false, "healthPort": new_health, "prometheusMetricsHost": "127.0.0.2",
    }))
    .await;
    eventually("the devices gone", Duration::from_secs(20), &log, || {
        link("vxlan.caracal").is_none() && link("wg-t1").is_none()
    });
    eventually("the listeners closed", Duration::from_secs(15), &log, || {
        http_get(new_health, "/healthz").is_none()
            && status_at((local2, metrics).into(), "/metrics").is_none()
    });
    caracal_node::dataplane::backend("Iptables", node.exec_prefix(), true)
        .expect("backend")
        .remove_all()
        .expect("cleanup");
}

/// `ipv6Support` is the other setting the agent restarts itself for: written false while the agent runs
/// IPv6 (its environment names an IPv6 address), the agent stops saying why; started again with the same
/// environment it runs IPv4 only: no IPv6 rules of its own in the node.
#[tokio::test]
async fn ipv6_support_false_restarts_the_agent_without_ipv6() {
    let (cp, client, node, _pod) = cluster_with_pod("nip6s", "ip6s-node", "10.65.0.1").await;
    for args in [
        &["link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"][..],
        &["addr", "add", "10.99.7.2/24", "dev", "eth0"],
        &["addr", "add", "fd00:99:7::2/64", "dev", "eth0", "nodad"],
        &["link", "set", "eth0", "up"],
    ] {
        node.ip(args).expect("underlay");
    }
    let env = [("CARACAL_IP6", "fd00:99:7::2/64")];
    let (mut child, health, _metrics, log) = start_agent_env(&cp, &node, "ip6s-node", &env);
    eventually("ready", Duration::from_secs(60), &log, || {
        http_get(health, "/readyz").map(|r| r.0) == Some(200)
    });
    let v6_rules = || {
        node.exec(&["ip6tables-save", "-t", "filter"])
            .unwrap_or_default()
            .contains("crc-")
    };
    assert!(v6_rules(), "IPv6 on: the agent's ip6tables chains");
    apply_felix(&client, "default", json!({"ipv6Support": false})).await;
    eventually(
        "the agent stops to restart",
        Duration::from_secs(30),
        &log,
        || child.0.try_wait().expect("wait").is_some(),
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("IPv6 false") && text.contains("restarting to apply it"),
        "{text}"
    );
    let (_again, health, _metrics, log) = start_agent_env(&cp, &node, "ip6s-node", &env);
    eventually("ready again", Duration::from_secs(60), &log, || {
        http_get(health, "/readyz").map(|r| r.0) == Some(200)
    });
    eventually(
        "no IPv6 rules of the agent's",
        Duration::from_secs(20),
        &log,
        || !v6_rules(),
    );
    caracal_node::dataplane::backend("Iptables", node.exec_prefix(), true)
        .expect("backend")
        .remove_all()
        .expect("cleanup");
}
