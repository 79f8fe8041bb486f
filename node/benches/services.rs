//! `make bench` figures for Services, written to `target/bench/services.json`: the lab (3 nodes, the VXLAN
//! Installation) with 1,000 Services in the cluster, measured first with the real kube-proxy in iptables mode
//! and Caracal's iptables data plane, then, on the same lab, after the documented switch to Caracal's BPF
//! data plane without kube-proxy (the API server's address given to the operator, kube-proxy stopped, the
//! Installation changed; the agents remove kube-proxy's rules), then after the switch back (kube-proxy started
//! again, the Installation back to Iptables) with kube-proxy again, so that what else the machine does over
//! the run weighs on both sides alike:
//!
//! - connections per second through one ClusterIP (a client pod and the Service's two backends on `lab-node-0`;
//!   each connection: connect, one request and its answer, close with a reset so no TIME_WAIT piles up),
//!   `CLIENTS` client threads at once (each sequential) so the node's CPUs set the rate, and then one client
//!   thread alone, so each connection's round trips set it (both are reported), `SAMPLES` samples of
//!   `SAMPLE_SECONDS` each, the kernel's connection table flushed before
//!   each; with the latency of each connection (p50 / p99), the failed connections by what failed, and the
//!   packets the node's stack forwarded per connection;
//! - endpoint change -> new connections reach the new backend: `FLIPS` times a Service's selector moves from
//!   one pod to the other (a label added to the new one, removed from the old); the time from that API write
//!   until a new connection is first answered by the new pod, p50 / p99.
//!
//! The figure the issue asks for is `bpf_over_kube_proxy_connections_per_second`: the median of BPF's samples
//! over the median of kube-proxy's (both rounds) (goal: at least 1.2), with the CPUs setting the rate;
//! `..._one_client` is the same ratio for the single client. In BPF mode the client's TCP connections get
//! their backend at connect() (connect-time load balancing, the default); the tracker's per-packet
//! translations after each sample are reported to show it. Before that, still in BPF mode, lab-node-0's agent
//! runs with `bpfConnectTimeLoadBalancing: Disabled` (its own FelixConfiguration) and is measured: every
//! connection translated per packet, so the run also says what connect-time load balancing is worth. Timings are reported, never asserted. Needs
//! root and the workspace's binaries (`make bench` runs the release build, through `CARACAL_LAB_BIN_DIR`).

#![expect(
    clippy::expect_used,
    reason = "a benchmark that cannot go on stops with the reason"
)]

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::lab::{Lab, LabOptions};
use caracal_e2e::measure::{percentile, summary_ms};
use caracal_e2e::netns::NetNs;
use caracal_e2e::probe;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const SERVICES: usize = 1000;
const SAMPLES: usize = 5;
const SAMPLE_SECONDS: f64 = 4.0;
const FLIPS: usize = 20;
/// Client threads connecting at once.
const CLIENTS: usize = 4;

/// One connection through the Service: connect, ask, read the answer, reset. The answering pod's address.
fn one(addr: SocketAddr) -> Option<String> {
    attempt(addr).ok()
}

/// The tracker entries of the first connections whose connect timed out (their client port on either side),
/// read at the timeout, while the connecting socket still holds the port.
static TIMED_OUT: std::sync::Mutex<Vec<Value>> = std::sync::Mutex::new(Vec::new());
/// Where the BPF maps are pinned, once the BPF data plane runs.
static PINS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// As [`one`], with what failed: `connect` (refused or reset), `connect timeout`, `request`, `answer`
/// (nothing came back in time, or the connection was reset). A timed-out connect's port goes to
/// [`TIMED_OUT_PORTS`].
fn attempt(addr: SocketAddr) -> Result<String, &'static str> {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).map_err(|_| "connect")?;
    if let Err(e) = socket.connect_timeout(&addr.into(), Duration::from_millis(500)) {
        if e.kind() != std::io::ErrorKind::TimedOut {
            return Err("connect");
        }
        // Still in SYN_SENT: its local address is the port the kernel chose, and nothing else takes it yet.
        if let (Some(port), Some(pins)) = (
            socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .map(|a| a.port()),
            PINS.get(),
        ) {
            let mut seen = TIMED_OUT
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if seen.len() < 8 {
                seen.push(entries_of_port(pins, port));
            }
        }
        return Err("connect timeout");
    }
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|_| "request")?;
    s.set_nodelay(true).map_err(|_| "request")?;
    s.write_all(probe::WHOAMI).map_err(|_| "request")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).map_err(|_| "answer")?;
    // SO_LINGER 0: closed with a reset, no TIME_WAIT on either side.
    let _ = nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
}

/// The tracker entries (every interface) with TCP port `port` on either side, as JSON.
fn entries_of_port(pins: &std::path::Path, port: u16) -> Value {
    let now = caracal_node::dataplane::bpf::sweep::monotonic_ns();
    let ip = |a: &[u8; 16]| Ipv4Addr::new(a[12], a[13], a[14], a[15]).to_string();
    let list: Vec<Value> = caracal_node::dataplane::bpf::sweep::entries(pins)
        .unwrap_or_default()
        .iter()
        .filter(|(k, _)| k.proto == 6 && (k.sport == port || k.dport == port))
        .map(|(k, v)| {
            json!({
                "ifindex": k.ifindex,
                "key": format!("{}:{} -> {}:{}", ip(&k.src), k.sport, ip(&k.dst), k.dport),
                "nat": v.nat,
                "flags": v.flags,
                "nat_to": format!("{}:{}", Ipv4Addr::from(v.nat_addr), v.nat_port),
                "age_ms": now.saturating_sub(v.last_seen_ns) / 1_000_000,
            })
        })
        .collect();
    json!({"port": port, "entries": list})
}

/// Connections per second and their latencies over `SAMPLES` samples, from inside `client`.
fn rate(
    node: &NetNs,
    client: &NetNs,
    addr: SocketAddr,
    clients: usize,
    pins: &std::path::Path,
    pods: &[String],
) -> Value {
    let _ = PINS.set(pins.to_path_buf());
    let mut rates = Vec::new();
    let (mut tracker, mut translated) = (Vec::new(), Vec::new());
    let mut lat = Vec::new();
    // Failed connections by what failed.
    let mut failed: std::collections::BTreeMap<&'static str, usize> = std::collections::BTreeMap::new();
    let mut forwarded = 0u64;
    let (mut bpf_dropped, mut softnet_dropped) = (0u64, 0u64);
    let mut tcp: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for _ in 0..SAMPLES {
        let (bpf_before, softnet_before) = (bpf_drops(pins), softnet_drops());
        let tcp_before = tcp_counters(pods);
        let _ = node.exec(&["conntrack", "-F"]);
        let forwarded_before = forwarded_datagrams(node);
        // CLIENTS connections at a time (each thread sequential), so the node's CPUs, not one client's
        // round trips, set the rate: what each connection costs the data plane is what is compared.
        let runs: Vec<(usize, Vec<&'static str>, Vec<f64>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..clients)
                .map(|_| {
                    let ns = NetNs::existing(client.name());
                    scope.spawn(move || {
                        ns.enter(move || {
                            let (mut n, mut f, mut l) = (0usize, Vec::new(), Vec::new());
                            let t = Instant::now();
                            while t.elapsed().as_secs_f64() < SAMPLE_SECONDS {
                                let c = Instant::now();
                                match attempt(addr) {
                                    Ok(_) => {
                                        n += 1;
                                        l.push(c.elapsed().as_secs_f64() * 1e3);
                                    }
                                    Err(what) => f.push(what),
                                }
                            }
                            (n, f, l)
                        })
                        .expect("enter the client")
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect()
        });
        let mut n = 0;
        for (n2, f2, l2) in runs {
            n += n2;
            for what in f2 {
                *failed.entry(what).or_insert(0usize) += 1;
            }
            lat.extend(l2);
        }
        rates.push(n as f64 / SAMPLE_SECONDS);
        let entries = caracal_node::dataplane::bpf::sweep::entries(pins).unwrap_or_default();
        tracker.push(entries.len());
        translated.push(entries.iter().filter(|(_, v)| v.nat != 0).count());
        forwarded += forwarded_datagrams(node).saturating_sub(forwarded_before);
        bpf_dropped += bpf_drops(pins).saturating_sub(bpf_before);
        softnet_dropped += softnet_drops().saturating_sub(softnet_before);
        for (k, v) in tcp_counters(pods) {
            let d = v.saturating_sub(tcp_before.get(&k).copied().unwrap_or(0));
            if d > 0 {
                *tcp.entry(k).or_default() += d;
            }
        }
    }
    let mut sorted = rates.clone();
    sorted.sort_by(f64::total_cmp);
    let connections = lat.len().max(1) as f64;
    json!({
        "connections_per_second": percentile(&sorted, 0.5),
        "samples_in_order": rates,
        "failed": failed,
        "latency": summary_ms(lat),
        // Packets the node's IP stack forwarded (its `Ip: ForwDatagrams`), per connection: what the data
        // plane sends through the stack between the client and the backends.
        "node_stack_forwarded_per_connection": forwarded as f64 / connections,
        // Packets the BPF programs dropped on the node's pod interfaces (their counters; 0 without them), and
        // packets the machine's per-CPU backlog queues dropped (`/proc/net/softnet_stat`), over the samples.
        "bpf_dropped_packets": bpf_dropped,
        "softnet_dropped_packets": softnet_dropped,
        // The pods' own IP and TCP counters that moved over the samples (client and backends; the names are
        // /proc/net/snmp's and /proc/net/netstat's): where a lost handshake shows up in a pod's stack.
        "pod_stack_counters": tcp,
        // Entries in the BPF connection tracker after each sample (0 without BPF; its map holds 524,288).
        "bpf_tracker_entries_after_samples": tracker,
        // Of those, the entries of flows the TC programs translate per packet (a Service's forward and
        // reverse entries): with connect-time load balancing a TCP connection through the ClusterIP has
        // none, its socket having been given the backend at connect().
        "bpf_translated_entries_after_samples": translated,
        // The tracker's entries of the first timed-out connections' client ports, read at each timeout
        // (empty without BPF).
        "bpf_entries_of_timed_out_ports": std::mem::take(
            &mut *TIMED_OUT.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
        ),
    })
}

/// The error and drop counters of `/proc/net/snmp` and `/proc/net/netstat` (Ip, Tcp, TcpExt) summed over
/// the network namespaces `pods`.
fn tcp_counters(pods: &[String]) -> std::collections::BTreeMap<String, u64> {
    const WANTED: [&str; 16] = [
        "Ip:InAddrErrors",
        "Ip:InDiscards",
        "Ip:InHdrErrors",
        "Ip:OutNoRoutes",
        "Tcp:AttemptFails",
        "Tcp:EstabResets",
        "Tcp:InErrs",
        "Tcp:OutRsts",
        "Tcp:RetransSegs",
        "TcpExt:ListenDrops",
        "TcpExt:ListenOverflows",
        "TcpExt:TCPBacklogDrop",
        "TcpExt:TCPSynRetrans",
        "TcpExt:TCPTimeouts",
        "TcpExt:PAWSEstab",
        "TcpExt:TCPAbortOnData",
    ];
    let mut out = std::collections::BTreeMap::new();
    for pod in pods {
        let ns = NetNs::existing(pod);
        for file in ["/proc/net/snmp", "/proc/net/netstat"] {
            let text = ns.exec(&["cat", file]).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            for pair in lines.chunks(2) {
                let [names, values] = pair else { continue };
                let mut n = names.split_whitespace();
                let mut v = values.split_whitespace();
                let Some(group) = n.next() else { continue };
                v.next();
                for (name, value) in n.zip(v) {
                    let key = format!("{group}{name}");
                    if WANTED.contains(&key.as_str()) {
                        *out.entry(key).or_default() += value.parse::<u64>().unwrap_or(0);
                    }
                }
            }
        }
    }
    out
}

/// Packets the BPF programs pinned under `pins` dropped, every endpoint and direction (0 when none are).
fn bpf_drops(pins: &std::path::Path) -> u64 {
    caracal_node::dataplane::bpf::pinned_counters(pins)
        .unwrap_or_default()
        .iter()
        .map(|(_, from, to)| from.dropped + to.dropped)
        .sum()
}

/// The machine's backlog drops (`/proc/net/softnet_stat`, second column, every CPU).
fn softnet_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|d| u64::from_str_radix(d, 16).ok())
        .sum()
}

/// The node namespace's `Ip: ForwDatagrams` counter (`/proc/net/snmp` as a process in it reads it).
fn forwarded_datagrams(node: &NetNs) -> u64 {
    let text = node.exec(&["cat", "/proc/net/snmp"]).unwrap_or_default();
    let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
    let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ForwDatagrams")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Moves the `flip` Service from one pod to the other `FLIPS` times; each time, the ms from the API write
/// until a new connection is first answered by the new pod.
async fn flips(lab: &Lab, client: &NetNs, addr: SocketAddr, pods: [(&str, &str); 2]) -> Value {
    let api: Api<Pod> = Api::namespaced(lab.client.clone(), "svcbench");
    let label = |on: bool| json!({"metadata": {"labels": {"flip": if on { Some("on") } else { None }}}});
    let mut ms = Vec::new();
    for i in 0..FLIPS {
        let (old, new) = if i % 2 == 0 {
            (pods[0], pods[1])
        } else {
            (pods[1], pods[0])
        };
        let t = Instant::now();
        api.patch(new.0, &PatchParams::default(), &Patch::Merge(&label(true)))
            .await
            .expect("label the new pod");
        api.patch(old.0, &PatchParams::default(), &Patch::Merge(&label(false)))
            .await
            .expect("unlabel the old pod");
        let want = new.1.to_owned();
        let ns = NetNs::existing(client.name());
        let took = tokio::task::spawn_blocking(move || {
            ns.enter(move || {
                loop {
                    let started = t.elapsed();
                    if one(addr).as_deref() == Some(want.as_str()) {
                        return Some(started);
                    }
                    if t.elapsed() > Duration::from_secs(30) {
                        return None;
                    }
                }
            })
            .expect("enter")
        })
        .await
        .expect("join")
        .expect("the new backend was never used");
        ms.push(took.as_secs_f64() * 1e3);
        // Settled: only the new pod answers.
        let (ns, want) = (NetNs::existing(client.name()), new.1.to_owned());
        tokio::task::spawn_blocking(move || {
            ns.enter(move || {
                let mut in_a_row = 0;
                let t = Instant::now();
                while in_a_row < 10 && t.elapsed() < Duration::from_secs(30) {
                    in_a_row = if one(addr).as_deref() == Some(want.as_str()) {
                        in_a_row + 1
                    } else {
                        0
                    };
                }
            })
        })
        .await
        .expect("join")
        .expect("enter");
    }
    summary_ms(ms)
}

async fn wait_rolled(lab: &Lab) {
    let ds: Api<DaemonSet> = Api::namespaced(lab.client.clone(), "caracal-system");
    let t = Instant::now();
    loop {
        let d = ds.get("caracal-node").await.expect("ds");
        let (g, s) = (d.metadata.generation, d.status.unwrap_or_default());
        if s.observed_generation >= g
            && s.updated_number_scheduled == Some(s.desired_number_scheduled)
            && s.number_ready == s.desired_number_scheduled
        {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(300), "the agents never rolled");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let installation = workspace_root().join("examples/installation-vxlan.yaml");
    let lab = Lab::up(&LabOptions::new(3, installation.clone()))
        .await
        .expect("lab up (make bench builds the workspace first)");
    let dir = lab.cp.dir().to_path_buf();
    let pods = dir.join("svcbench.yaml");
    let mut text = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: svcbench}\n");
    for (name, labels) in [
        ("client", "{app: client}"),
        ("b0", "{app: backend, flip: \"on\"}"),
        ("b1", "{app: backend}"),
    ] {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: svcbench, labels: {labels}}}\nspec:\n  nodeName: lab-node-0\n  containers: [{{name: c, image: lab/echo, ports: [{{containerPort: 8080}}]}}]\n"
        ));
    }
    std::fs::write(&pods, text).expect("write");
    lab.apply(&pods).expect("pods");
    lab.wait_pods(&["svcbench"]).await.expect("pods");
    // 1,000 Services in front of the two backends (the measured one among them), and `flip`.
    let svcs: Api<Service> = Api::namespaced(lab.client.clone(), "svcbench");
    let t = Instant::now();
    for i in 0..=SERVICES {
        let (name, selector) = if i == SERVICES {
            ("flip".to_owned(), json!({"flip": "on"}))
        } else {
            (format!("s{i:04}"), json!({"app": "backend"}))
        };
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"selector": selector, "ports": [{"port": 80, "targetPort": 8080}]}
        }))
        .expect("service");
        svcs.create(&PostParams::default(), &svc)
            .await
            .expect("create a Service");
    }
    println!(
        "==> {} Services created in {:.1} s",
        SERVICES + 1,
        t.elapsed().as_secs_f64()
    );
    let vip = |name: &str| {
        let svcs = svcs.clone();
        let name = name.to_owned();
        async move {
            svcs.get(&name)
                .await
                .expect("service")
                .spec
                .and_then(|s| s.cluster_ip)
                .expect("ClusterIP")
                .parse::<Ipv4Addr>()
                .expect("IPv4")
        }
    };
    let measured: SocketAddr = (vip("s0500").await, 80).into();
    let flip: SocketAddr = (vip("flip").await, 80).into();
    let recorded = lab.record_pods().await.expect("record");
    let find = |name: &str, field: &str| {
        recorded
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["pod"] == name)
            .and_then(|p| p[field].as_str().map(str::to_owned))
            .expect("recorded pod")
    };
    let client = NetNs::existing(&find("svcbench/client", "netns"));
    let node = NetNs::existing(lab.nodes[0].1.name());
    let (b0, b1) = (find("svcbench/b0", "ip"), find("svcbench/b1", "ip"));
    let pod_namespaces: Vec<String> = ["svcbench/client", "svcbench/b0", "svcbench/b1"]
        .iter()
        .map(|p| find(p, "netns"))
        .collect();
    let ready = |addr: SocketAddr| {
        let ns = NetNs::existing(client.name());
        async move {
            let t = Instant::now();
            loop {
                let ns2 = NetNs::existing(ns.name());
                if tokio::task::spawn_blocking(move || ns2.enter(move || one(addr)).ok().flatten())
                    .await
                    .expect("join")
                    .is_some()
                {
                    return;
                }
                assert!(t.elapsed() < Duration::from_secs(180), "{addr} never answered");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    ready(measured).await;
    ready(flip).await;

    // kube-proxy, then BPF, then kube-proxy again: the machine's drift over the run (other work in the lab)
    // falls on both sides alike.
    let measure = || {
        let (n, c) = (NetNs::existing(node.name()), NetNs::existing(client.name()));
        let pod_namespaces = pod_namespaces.clone();
        let pins = caracal_e2e::lab::lab_dir()
            .join("nodes")
            .join(&lab.nodes[0].0)
            .join("sys/fs/bpf/caracal");
        tokio::task::spawn_blocking(move || {
            let busy = rate(&n, &c, measured, CLIENTS, &pins, &pod_namespaces);
            let single = rate(&n, &c, measured, 1, &pins, &pod_namespaces);
            (busy, single)
        })
    };
    println!("==> kube-proxy (iptables mode)");
    let (kube_proxy, kube_proxy_one) = measure().await.expect("join");
    let kube_proxy_flips = flips(&lab, &client, flip, [("b0", &b0), ("b1", &b1)]).await;

    // In BPF mode lab-node-0's agent is measured twice: first with `bpfConnectTimeLoadBalancing: Disabled`
    // (its own FelixConfiguration, which the operator does not manage), every connection translated per
    // packet by the pod's program; then with `TCP` (the default), each TCP connection given its backend at
    // connect(). The agent restarts to apply each.
    let ctlb = |value: &str| {
        let file = dir.join(format!("felix-node-0-ctlb-{value}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: caracal.dev/v1\nkind: FelixConfiguration\nmetadata: {{name: node.{}}}\nspec: {{bpfConnectTimeLoadBalancing: {value}}}\n",
                lab.nodes[0].0
            ),
        )
        .expect("write");
        lab.apply(&file).expect("FelixConfiguration");
    };
    let link = caracal_e2e::lab::lab_dir()
        .join("nodes")
        .join(&lab.nodes[0].0)
        .join("sys/fs/bpf/caracal")
        .join(caracal_node::dataplane::bpf::ctlb::LINKS)
        .join(caracal_node::dataplane::bpf::ctlb::SOCKET_HOOKS[0].0);
    let until_link = |attached: bool| {
        let link = link.clone();
        async move {
            let t = Instant::now();
            while link.exists() != attached {
                assert!(
                    t.elapsed() < Duration::from_secs(120),
                    "the socket programs never became attached: {attached}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    ctlb("Disabled");

    println!("==> switching to the BPF data plane (kube-proxy stopped)");
    lab.give_api_server_address().await.expect("ConfigMap");
    lab.stop_kube_proxy();
    let original = std::fs::read_to_string(&installation).expect("installation");
    let bpf_inst = dir.join("installation-bpf.yaml");
    std::fs::write(
        &bpf_inst,
        original.replace("linuxDataplane: Iptables", "linuxDataplane: BPF"),
    )
    .expect("write");
    lab.apply(&bpf_inst).expect("BPF");
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_rolled(&lab).await;
    let t = Instant::now();
    while lab.nodes[0]
        .1
        .exec(&["iptables-save", "-t", "nat"])
        .unwrap_or_default()
        .contains("KUBE-SERVICES")
    {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "kube-proxy's rules stayed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    until_link(false).await;
    ready(measured).await;
    println!("==> Caracal BPF, bpfConnectTimeLoadBalancing: Disabled");
    let (per_packet, per_packet_one) = measure().await.expect("join");

    ctlb("TCP");
    until_link(true).await;
    ready(measured).await;
    ready(flip).await;
    println!("==> Caracal BPF (bpfConnectTimeLoadBalancing: TCP, the default)");
    let (bpf, bpf_one) = measure().await.expect("join");
    let bpf_flips = flips(&lab, &client, flip, [("b0", &b0), ("b1", &b1)]).await;

    println!("==> back to kube-proxy and the iptables data plane");
    lab.start_kube_proxy(caracal_e2e::kubeproxy::Mode::Iptables)
        .expect("kube-proxy again");
    lab.wait_kube_proxy(caracal_e2e::kubeproxy::Mode::Iptables)
        .await
        .expect("kube-proxy programs again");
    let ipt_inst = dir.join("installation-iptables.yaml");
    std::fs::write(&ipt_inst, &original).expect("write");
    lab.apply(&ipt_inst).expect("Iptables");
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_rolled(&lab).await;
    ready(measured).await;
    println!("==> kube-proxy (iptables mode), again");
    let (kube_proxy_again, kube_proxy_again_one) = measure().await.expect("join");

    // Each side's rate: the median of all its samples.
    let median = |runs: &[&Value]| {
        let mut all: Vec<f64> = runs
            .iter()
            .flat_map(|r| r["samples_in_order"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v.as_f64())
            .collect();
        all.sort_by(f64::total_cmp);
        percentile(&all, 0.5)
    };
    let kube_proxy_rate = median(&[&kube_proxy, &kube_proxy_again]);
    let bpf_rate = median(&[&bpf]);
    let kube_proxy_one_rate = median(&[&kube_proxy_one, &kube_proxy_again_one]);
    let bpf_one_rate = median(&[&bpf_one]);
    let per_packet_rate = median(&[&per_packet]);
    let per_packet_one_rate = median(&[&per_packet_one]);
    let figures = json!({
        "services_in_cluster": SERVICES + 1,
        "kube_proxy_iptables": {
            "connections_per_second": kube_proxy_rate,
            "through_cluster_ip": kube_proxy,
            "through_cluster_ip_again": kube_proxy_again,
            "one_client": {
                "connections_per_second": kube_proxy_one_rate,
                "through_cluster_ip": kube_proxy_one,
                "through_cluster_ip_again": kube_proxy_again_one,
            },
            "endpoint_change_to_new_backend_ms": kube_proxy_flips,
        },
        "bpf": {
            "connections_per_second": bpf_rate,
            "through_cluster_ip": bpf,
            "one_client": {
                "connections_per_second": bpf_one_rate,
                "through_cluster_ip": bpf_one,
            },
            "endpoint_change_to_new_backend_ms": bpf_flips,
        },
        // BPF with bpfConnectTimeLoadBalancing: Disabled on lab-node-0: every TCP connection translated per
        // packet in the client pod's program (the BPF side of earlier runs).
        "bpf_connect_time_lb_disabled": {
            "connections_per_second": per_packet_rate,
            "through_cluster_ip": per_packet,
            "one_client": {
                "connections_per_second": per_packet_one_rate,
                "through_cluster_ip": per_packet_one,
            },
        },
        "bpf_connect_time_lb_disabled_over_kube_proxy_connections_per_second": per_packet_rate / kube_proxy_rate,
        "bpf_over_kube_proxy_connections_per_second": bpf_rate / kube_proxy_rate,
        "bpf_over_kube_proxy_connections_per_second_one_client": bpf_one_rate / kube_proxy_one_rate,
        "note": "one lab: kube-proxy (iptables mode) with Caracal's iptables policy, then Caracal's BPF data plane after the documented switch, first with bpfConnectTimeLoadBalancing: Disabled on lab-node-0 (every connection translated per packet), then with TCP (the default: given its backend at connect()), then kube-proxy again after the switch back; a side's rate is the median of all its samples; client and backends on lab-node-0; 4 client threads at once, each sequential (connect, one request and answer, reset), so the CPUs set the rate; one_client: a single such thread, so each connection's round trips set it; the endpoint change is timed from the API write of the label until a new connection is first answered by the new pod",
    });
    println!("{}", serde_json::to_string_pretty(&figures).expect("json"));
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(
        out.join("services.json"),
        serde_json::to_string_pretty(&figures).expect("json"),
    )
    .expect("write");
    lab.down();
}
