//! `make bench` figures for pod networking, written to `target/bench/cni.json`: one node namespace running
//! the real `caracal-node` (release build) against the real API server, pods ADDed and DELeted through the
//! real `caracal-cni` binary exactly as a runtime calls it (a process per call, configuration on stdin):
//! - ADD and DEL latency p50 / p99 with 1 and with 20 concurrent requests;
//! - pods per second sustained until 500 pods exist (20 concurrent), with that phase's ADD p50 / p99;
//! - ADD -> the pod's policy chains programmed (fail-closed until then), p50 / p99.
//!
//! Pod namespaces and Pod objects are created beforehand (a runtime has the sandbox before it calls CNI).
//! With `CARACAL_BENCH_DUAL_STACK=1` the node is dual-stack (an IPv6 pool too, IPv6 on: every pod gets two
//! addresses and ip6tables is programmed beside iptables) and the figures go to `cni-dual-stack.json`.
//! Timings are reported, never asserted.

#![expect(
    clippy::expect_used,
    reason = "a benchmark that cannot go on stops with the reason"
)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use caracal_crds::ippool::EncapMode;
use caracal_e2e::cluster::TestCluster;
use caracal_e2e::cni::{self, Invocation};
use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::measure::{machine_busy_seconds, process_cpu_seconds, summary_ms as summary};
use caracal_e2e::netns::NetNs;
use serde_json::json;

const PODS: usize = 500;

struct Ctx {
    plugin: PathBuf,
    socket: PathBuf,
}

/// One plugin call; returns its duration in ms. Panics on failure (a benchmark that cannot go on stops).
fn call(ctx: &Ctx, command: &str, i: usize, netns: &str) -> f64 {
    let name = format!("b{i}");
    let cid = format!("bench{i:05}");
    let inv = Invocation {
        command,
        container_id: &cid,
        netns,
        ifname: "eth0",
        pod: Some(("bench", &name)),
    };
    let start = Instant::now();
    let (code, out) = cni::invoke(&ctx.plugin, &[], &inv, &cni::caracal_conf(&ctx.socket)).expect("plugin");
    let ms = start.elapsed().as_secs_f64() * 1e3;
    assert_eq!(code, 0, "{command} {name}: {out}");
    ms
}

/// Runs `command` for pods `range` with `workers` concurrent callers; returns each call's latency.
async fn phase(
    ctx: &std::sync::Arc<Ctx>,
    ns: &std::sync::Arc<Vec<String>>,
    command: &'static str,
    range: std::ops::Range<usize>,
    workers: usize,
) -> Vec<f64> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(range.start));
    let end = range.end;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (ctx, ns, next) = (ctx.clone(), ns.clone(), next.clone());
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= end {
                        return out;
                    }
                    out.push(call(&ctx, command, i, &ns[i]));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("worker"));
    }
    all
}

#[tokio::main]
async fn main() {
    let release = workspace_root().join("target/release");
    let mut c = TestCluster::new(1, &release.join("caracal-node"), &release.join("caracal-cni"))
        .await
        .expect("cluster (make bench builds the release binaries first)");
    caracal_e2e::objects::ippool(
        &c.client,
        "bench",
        "10.80.0.0/16",
        EncapMode::Never,
        EncapMode::Never,
        false,
    )
    .await
    .expect("pool");
    let dual = std::env::var("CARACAL_BENCH_DUAL_STACK").is_ok_and(|v| v == "1");
    if dual {
        c.enable_ipv6("fd00:80::/64").expect("IPv6 underlay");
        caracal_e2e::objects::ippool(
            &c.client,
            "bench6",
            "fd10:80::/48",
            EncapMode::Never,
            EncapMode::Never,
            false,
        )
        .await
        .expect("IPv6 pool");
    }
    caracal_e2e::objects::namespace(&c.client, "bench", json!({}))
        .await
        .expect("namespace");
    let total = PODS + 400;
    eprintln!("creating {total} Pod objects and network namespaces");
    for i in 0..total {
        caracal_e2e::objects::scheduled_pod(
            &c.client,
            "bench",
            &format!("b{i}"),
            json!({"app": "bench"}),
            "node-0",
        )
        .await
        .expect("pod");
    }
    let namespaces: Vec<NetNs> = (0..total).map(|_| NetNs::new("bp").expect("netns")).collect();
    let paths = std::sync::Arc::new(
        namespaces
            .iter()
            .map(|n| format!("/run/netns/{}", n.name()))
            .collect::<Vec<_>>(),
    );
    c.agent_env.push((
        "RUST_LOG".into(),
        "info,caracal_node::cni=debug,caracal_node::ipam=debug".into(),
    ));
    if let Ok(r) = std::env::var("CARACAL_BENCH_IPAM_RESERVE") {
        c.agent_env.push(("CARACAL_IPAM_RESERVE".into(), r));
    }
    c.start_agents().await.expect("agent");
    // Let the agent fill its address reserve, as it does right after start on a real node.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ctx = std::sync::Arc::new(Ctx {
        plugin: c.plugin_bin.clone(),
        socket: c.nodes[0].socket.clone(),
    });

    eprintln!("ADD/DEL, one at a time");
    let add_1 = phase(&ctx, &paths, "ADD", 0..100, 1).await;
    let del_1 = phase(&ctx, &paths, "DEL", 0..100, 1).await;
    eprintln!("ADD/DEL, 20 concurrent");
    let add_20 = phase(&ctx, &paths, "ADD", 100..300, 20).await;
    let del_20 = phase(&ctx, &paths, "DEL", 100..300, 20).await;

    eprintln!("sustained: {PODS} pods, 20 concurrent");
    let start = Instant::now();
    let busy = machine_busy_seconds();
    let agent_before = process_cpu_seconds(&["caracal-node"]);
    let api_before = process_cpu_seconds(&["kube-apiserver", "etcd"]);
    let sustained = phase(&ctx, &paths, "ADD", 400..400 + PODS, 20).await;
    let secs = start.elapsed().as_secs_f64();
    // The agent keeps programming what the burst left behind: let it finish before reading its CPU.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let per_add = |x: f64| x / PODS as f64 * 1e3;
    let cpu_per_add_ms = per_add(machine_busy_seconds() - busy);
    let agent_after = process_cpu_seconds(&["caracal-node"]);
    let api_after = process_cpu_seconds(&["kube-apiserver", "etcd"]);
    let breakdown = json!({
        "agent_ms": per_add(agent_after.0 - agent_before.0),
        "agent_tools_ms (iptables, ipset: the agent's children)": per_add(agent_after.1 - agent_before.1),
        "api_server_and_etcd_ms": per_add(api_after.0 - api_before.0),
        "rest_ms (plugin processes, kernel, this benchmark)": cpu_per_add_ms
            - per_add(agent_after.0 - agent_before.0 + agent_after.1 - agent_before.1 + api_after.0 - api_before.0),
    });

    // ADD -> policy programmed: the pod's interface appears in the dispatch chain.
    eprintln!("ADD -> policy programmed");
    let mut programmed = Vec::new();
    for i in 300..330 {
        let iface = caracal_node::cni::host_iface("bench", &format!("b{i}"));
        let t = Instant::now();
        call(&ctx, "ADD", i, &paths[i]);
        loop {
            let rules = c.nodes[0]
                .ns
                .exec(&["iptables", "-S", "crc-to-wl-dispatch"])
                .unwrap_or_default();
            if rules.contains(&iface) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "{iface} never programmed");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        programmed.push(t.elapsed().as_secs_f64() * 1e3);
    }

    let figures = json!({
        "add_1_concurrent": summary(add_1),
        "del_1_concurrent": summary(del_1),
        "add_20_concurrent": summary(add_20),
        "del_20_concurrent": summary(del_20),
        "sustained": {
            "pods": PODS,
            "concurrency": 20,
            "seconds": secs,
            "pods_per_second": PODS as f64 / secs,
            "add": summary(sustained),
            "machine_cpu_ms_per_add": cpu_per_add_ms,
            "machine_cpu_per_add_breakdown": breakdown,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        },
        "add_to_policy_programmed": summary(programmed),
        "dual_stack": dual,
        "goal": "ADD p50 <= 10 ms and p99 <= 50 ms at 20 concurrent",
        "note": "each call is a caracal-cni process, as a runtime runs it; pods' namespaces exist beforehand",
    });
    println!("{}", serde_json::to_string_pretty(&figures).expect("json"));
    let _ = std::fs::write(
        workspace_root().join("target/bench/cni-agent.log"),
        c.agent_log(0, 1_000_000),
    );
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(
        out.join(if dual { "cni-dual-stack.json" } else { "cni.json" }),
        serde_json::to_string_pretty(&figures).expect("json"),
    )
    .expect("write");
    drop(namespaces);
}
