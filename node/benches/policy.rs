//! `make bench` figures for policy, written to `target/bench/policy.json`, all through the production path:
//! the release `caracal-node` binary in a node namespace against the real API server, its datastore written
//! through the API (namespaces, pods with `spec.nodeName` and `status.podIP`, Calico NetworkPolicies).
//!
//! - `agent_scaling`: the agent of `node-0` (100 local pods in 50 namespaces, 200 policies there) with only
//!   that in the datastore, then with the cluster grown to 10,000 pods (the other 9,900 on 99 other nodes),
//!   2,000 policies and 500 namespaces. For each: resident memory at ready and after the operations, and the
//!   agent's CPU (its threads, plus the iptables / ipset processes it runs) and the change -> programmed
//!   latency per policy edit (a policy selecting local pods gets another rule peer) and per pod ADD (a local
//!   pod is created, then its `status.podIP` set). Each operation waits until the agent's
//!   `caracal_node_dataplane_programs` counter moves; the CPU of polling `/metrics` is measured and taken
//!   out. The ratios large / small and the memory per pod beyond the small datastore are the issue's goals.
//! - `iptables` and `bpf`: 1,000 local endpoints (100 namespaces x 10 pods) each selected by the 10 policies
//!   of its namespace, with each data plane: start -> ready and the first program, single policy edits, pod
//!   ADDs (BPF), a restart that adopts what is in place, the periodic full read-back
//!   (`CARACAL_REFRESH_SECONDS`), the agent's memory and (BPF) the maps' bytes per endpoint.
//! - `dataplanes`: iperf3 throughput and new TCP connections per second between two pods wired to a node
//!   namespace, iptables and BPF, with no policy and with 1,000 and 10,000 rules that do not match the flow,
//!   each sample paired with one on the no-policy path taken right after it (the server relabelled out of the
//!   rules' selector)
//!   (`CARACAL_BENCH_PARTS=dataplanes` runs only this part, `endpoints` only the 1,000 endpoints, `endpoints-bpf` only their BPF half).
//!
//! `CARACAL_BENCH_AGENT_BIN` measures another agent binary in the scaling part (a worktree's build, or a
//! script that runs the release agent under a heap profiler); `CARACAL_BENCH_PARTS=scaling` runs only that
//! part. Timings are reported, never asserted. Needs root and the release binary (`make bench` builds it first).

#![expect(
    clippy::expect_used,
    reason = "a benchmark that cannot go on stops with the reason"
)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use caracal_e2e::cluster::TestCluster;
use caracal_e2e::controlplane::workspace_root;
use caracal_e2e::measure::{ProcessCpu, process_cpu, status_kib, summary_ms};
use caracal_e2e::netns::{self, NetNs};
use caracal_e2e::probe::http_get;
use caracal_node::cni::host_iface;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use serde_json::{Value, json};

/// The large datastore: namespaces x pods x policies.
const NAMESPACES: usize = 500;
const PODS_PER_NS: usize = 20;
const POLICIES_PER_NS: usize = 4;
/// `node-0`'s pods: the first `LOCAL_PER_NS` pods of the first `LOCAL_NS` namespaces. The small datastore
/// is exactly these namespaces, their policies and these pods.
const LOCAL_NS: usize = 50;
const LOCAL_PER_NS: usize = 2;
/// The other pods run on `node-1` .. `node-99`.
const REMOTE_NODES: usize = 99;
/// Policy edits and pod ADDs measured per datastore.
const OPS: usize = 40;
/// Concurrent API writes while the datastore is built.
const WRITERS: usize = 32;
/// How long one operation may take to be programmed before the benchmark gives up.
const DEADLINE: Duration = Duration::from_secs(60);
/// The refresh interval of the agent that measures the periodic full read-back.
const REFRESH_S: u64 = 10;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ----- the agent from outside: metrics, CPU, memory -----

#[derive(Clone, Copy, Debug, Default)]
struct Metrics {
    programs: u64,
    last_program_s: f64,
    /// From the change reaching the agent's engine to programmed (the agent's own measure).
    change_s: f64,
    repairs: u64,
    failures: u64,
}

/// One scrape of the agent's `/metrics` (served on the health port too).
fn scrape(port: u16) -> Option<Metrics> {
    let (code, body) = http_get(port, "/metrics")?;
    if code != 200 {
        return None;
    }
    let value = |name: &str| {
        body.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            if k == name {
                v.trim().parse::<f64>().ok()
            } else {
                None
            }
        })
    };
    Some(Metrics {
        programs: value("caracal_node_dataplane_programs_total")? as u64,
        last_program_s: value("caracal_node_dataplane_last_program_seconds")?,
        change_s: value("caracal_node_dataplane_last_change_to_programmed_seconds").unwrap_or(0.0),
        repairs: value("caracal_node_dataplane_repairs_total").unwrap_or(0.0) as u64,
        failures: value("caracal_node_dataplane_failures_total").unwrap_or(0.0) as u64,
    })
}

/// The BPF programs' dropped packets so far, every interface and direction (0 with the iptables backend).
fn bpf_dropped(port: u16) -> f64 {
    let Some((200, body)) = http_get(port, "/metrics") else {
        return 0.0;
    };
    body.lines()
        .filter(|l| l.starts_with("caracal_node_bpf_packets_dropped_total"))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum()
}

/// A running agent as the benchmark sees it.
struct Agent {
    pid: u32,
    port: u16,
    /// Scrapes so far (each costs the agent some CPU, taken out of the figures).
    polls: u64,
    /// The programs counter when last seen.
    programs: u64,
    ready_s: f64,
    /// Its log (the tail goes into a failure's message).
    log: std::path::PathBuf,
}

/// CPU and scrapes at the start of a measured window.
struct Window {
    cpu: ProcessCpu,
    polls: u64,
}

impl Agent {
    /// Starts node `i`'s agent and waits until it reports ready.
    async fn start(c: &mut TestCluster, i: usize) -> Agent {
        let t = Instant::now();
        c.start_agent(i).expect("start the agent");
        c.wait_ready(i).await.expect("the agent becomes ready");
        let ready_s = t.elapsed().as_secs_f64();
        let mut a = Agent {
            pid: c.nodes[i]
                .agent
                .as_ref()
                .and_then(caracal_e2e::process::Supervised::pid)
                .expect("agent pid"),
            port: c.nodes[i].health,
            polls: 0,
            programs: 0,
            ready_s,
            log: c.nodes[i].log.clone(),
        };
        a.programs = a.scrape().programs;
        a
    }

    fn scrape(&mut self) -> Metrics {
        self.polls += 1;
        scrape(self.port).unwrap_or_default()
    }

    /// Waits until the agent has programmed once more than when last seen; returns how long that took.
    async fn programmed(&mut self, started: Instant, what: &str) -> (Duration, Metrics) {
        loop {
            let m = self.scrape();
            if m.programs > self.programs {
                self.programs = m.programs;
                return (started.elapsed(), m);
            }
            if started.elapsed() > DEADLINE {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "{what}: not programmed within {DEADLINE:?} ({m:?}); the agent's log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn window(&self) -> Window {
        Window {
            cpu: process_cpu(self.pid),
            polls: self.polls,
        }
    }

    /// The agent's CPU per operation over `w` (`n` operations), without what `poll_s` per scrape cost.
    fn cpu_per_op(&self, w: &Window, n: usize, poll_s: f64) -> Value {
        let now = process_cpu(self.pid);
        let polls = (self.polls - w.polls) as f64;
        let own = (now.own_since(&w.cpu) - polls * poll_s).max(0.0) / n as f64 * 1e3;
        let tools = now.children_since(&w.cpu) / n as f64 * 1e3;
        json!({"agent_ms": own, "tools_ms": tools, "total_ms": own + tools})
    }

    /// The agent's CPU per `/metrics` scrape, in seconds (measured over 200 scrapes at the cadence the
    /// waits use).
    async fn calibrate(&mut self) -> f64 {
        let w = self.window();
        for _ in 0..200 {
            self.scrape();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let per = process_cpu(self.pid).own_since(&w.cpu) / 200.0;
        self.programs = self.scrape().programs;
        per
    }

    fn memory(&self) -> Value {
        let pid = self.pid.to_string();
        json!({
            "rss_kib": status_kib(&pid, "VmRSS"),
            "rss_anon_kib": status_kib(&pid, "RssAnon"),
            "peak_rss_kib": status_kib(&pid, "VmHWM"),
            "threads": process_cpu(self.pid).threads_ns.len(),
        })
    }
}

fn stop_agent(c: &mut TestCluster, i: usize) {
    if let Some(mut a) = c.nodes[i].agent.take() {
        a.stop(Duration::from_secs(10));
    }
}

// ----- the datastore, written through the API -----

/// Runs `f` on every item, `WRITERS` at a time, printing progress.
async fn concurrently<T, F, Fut>(what: &str, items: Vec<T>, f: F)
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<(), kube::Error>>,
{
    let n = items.len();
    let start = Instant::now();
    let mut results = futures::stream::iter(items).map(f).buffer_unordered(WRITERS);
    let mut done = 0;
    while let Some(r) = results.next().await {
        r.unwrap_or_else(|e| panic!("{what}: {e}"));
        done += 1;
        if done % 2000 == 0 || done == n {
            eprintln!(
                "  {what}: {done}/{n} ({:.0}/s)",
                done as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
}

fn ns_labels(ns: &str, ops: bool) -> Value {
    if ops {
        json!({"name": ns, "team": "ops"})
    } else {
        json!({"name": ns})
    }
}

/// Labels of the `i`th pod of a namespace (the shapes of `caracal_policy::synth`).
fn pod_labels(i: usize) -> Value {
    let mut l = json!({"app": format!("app-{}", i % 8), "tier": format!("t{}", i % 3)});
    if i.is_multiple_of(7) {
        l["monitored"] = "true".into();
    }
    l
}

/// Creates pod `ns/name` bound to `node` with a container port named `http`; with `ip`, also sets its
/// `status.podIP` (as the kubelet does after the CNI ADD).
async fn put_pod(
    client: &Client,
    ns: &str,
    name: &str,
    labels: Value,
    node: &str,
    ip: Option<Ipv4Addr>,
) -> Result<(), kube::Error> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "pause",
                 "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]}
    }))
    .map_err(kube::Error::SerdeError)?;
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &pod).await?;
    if let Some(ip) = ip {
        set_pod_ip(client, ns, name, ip).await?;
    }
    Ok(())
}

async fn set_pod_ip(client: &Client, ns: &str, name: &str, ip: Ipv4Addr) -> Result<(), kube::Error> {
    let status = json!({"status": {"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// The Calico NetworkPolicy resource (found once: `resource_for` generates every CRD's schema).
static POLICY: std::sync::LazyLock<ApiResource> = std::sync::LazyLock::new(|| {
    caracal_e2e::crds::resource_for("caracal.dev/v1", "NetworkPolicy")
        .expect("the policy CRD")
        .0
});

fn policy_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &*POLICY)
}

/// The ingress of `caracal_policy::synth::app_policy`: TCP 8080 / `http` from `app-FROM` pods of the
/// namespace and from monitored pods of namespaces labelled `team: ops`.
fn app_ingress(from_app: usize) -> Value {
    json!([
        {"action": "Allow", "protocol": "TCP", "source": {"selector": format!("app == 'app-{from_app}'")},
         "destination": {"ports": [8080, "http"]}},
        {"action": "Allow", "protocol": "TCP",
         "source": {"selector": "has(monitored)", "namespaceSelector": "team == 'ops'"},
         "destination": {"ports": [8080, "http"]}},
    ])
}

async fn put_policy(
    client: &Client,
    ns: &str,
    name: &str,
    order: f64,
    selector: &str,
    ingress: Value,
) -> Result<(), kube::Error> {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "caracal.dev/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"order": order, "selector": selector, "types": ["Ingress"], "ingress": ingress},
    }))
    .map_err(kube::Error::SerdeError)?;
    policy_api(client, ns)
        .create(&PostParams::default(), &obj)
        .await?;
    Ok(())
}

async fn set_ingress(client: &Client, ns: &str, name: &str, ingress: Value) -> Result<(), kube::Error> {
    policy_api(client, ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ingress": ingress}})),
        )
        .await?;
    Ok(())
}

// ----- agent scaling: 100 pods vs 10,000 -----

/// The address of pod `i` of namespace `n` (cluster-wide unique).
fn scale_ip(n: usize, i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + u32::try_from(n * PODS_PER_NS + i).unwrap_or(0))
}

fn scale_node(n: usize, i: usize) -> String {
    if n < LOCAL_NS && i < LOCAL_PER_NS {
        "node-0".into()
    } else {
        format!("node-{}", 1 + (n * PODS_PER_NS + i) % REMOTE_NODES)
    }
}

/// Writes namespaces `ns` (with their default ServiceAccount and `POLICIES_PER_NS` policies: policy `p-j`
/// selects `app-j` and admits `app-(j+1)`) and the pods `(n, i)` of `pods`.
async fn write_scale(client: &Client, namespaces: std::ops::Range<usize>, pods: Vec<(usize, usize)>) {
    let c = client.clone();
    concurrently("namespaces", namespaces.clone().collect(), |n| {
        let c = c.clone();
        async move {
            let name = format!("ns-{n}");
            caracal_e2e::objects::namespace(&c, &name, ns_labels(&name, n.is_multiple_of(10))).await
        }
    })
    .await;
    let policies: Vec<(usize, usize)> = namespaces
        .flat_map(|n| (0..POLICIES_PER_NS).map(move |j| (n, j)))
        .collect();
    concurrently("policies", policies, |(n, j)| {
        let c = c.clone();
        async move {
            let sel = format!("app == 'app-{j}'");
            put_policy(
                &c,
                &format!("ns-{n}"),
                &format!("p-{j}"),
                100.0 + j as f64,
                &sel,
                app_ingress((j + 1) % 8),
            )
            .await
        }
    })
    .await;
    concurrently("pods (create + status.podIP)", pods, |(n, i)| {
        let c = c.clone();
        async move {
            put_pod(
                &c,
                &format!("ns-{n}"),
                &format!("pod-{i}"),
                pod_labels(i),
                &scale_node(n, i),
                Some(scale_ip(n, i)),
            )
            .await
        }
    })
    .await;
}

/// Each edited policy's current `app-FROM` peer.
type Peers = BTreeMap<(usize, usize), usize>;

/// Measures `node-0`'s agent on the datastore as it is now.
async fn measure_node0(c: &mut TestCluster, peers: &mut Peers, datastore: Value) -> Value {
    c.agent_env = vec![("CARACAL_REFRESH_SECONDS".into(), "3600".into())];
    let mut a = Agent::start(c, 0).await;
    let startup = process_cpu(a.pid);
    eprintln!("  ready in {:.1} s", a.ready_s);
    // Let it finish whatever followed the first program.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let memory_at_ready = a.memory();
    let poll_s = a.calibrate().await;

    eprintln!("  {OPS} policy edits");
    let (mut latency, mut program, mut in_agent) = (Vec::new(), Vec::new(), Vec::new());
    let w = a.window();
    for e in 0..OPS {
        // Policies p-0 and p-1 of the local namespaces select local pods.
        let key = (e % LOCAL_NS, e / LOCAL_NS % LOCAL_PER_NS);
        let peer = peers.entry(key).or_insert((key.1 + 1) % 8);
        *peer = (*peer + 1) % 8;
        let t = Instant::now();
        set_ingress(
            &c.client,
            &format!("ns-{}", key.0),
            &format!("p-{}", key.1),
            app_ingress(*peer),
        )
        .await
        .expect("edit the policy");
        let (d, m) = a.programmed(t, "policy edit").await;
        latency.push(ms(d));
        program.push(m.last_program_s * 1e3);
        in_agent.push(m.change_s * 1e3);
    }
    let edit = json!({
        "n": OPS,
        "cpu_per_op": a.cpu_per_op(&w, OPS, poll_s),
        "edit_to_programmed": summary_ms(latency),
        "program_duration": summary_ms(program),
    });

    eprintln!("  {OPS} pod ADDs");
    let (mut latency, mut program) = (Vec::new(), Vec::new());
    let w = a.window();
    for m in 0..OPS {
        let (ns, name) = (format!("ns-{}", m % LOCAL_NS), format!("add-{m}"));
        put_pod(
            &c.client,
            &ns,
            &name,
            pod_labels(m % LOCAL_PER_NS),
            "node-0",
            None,
        )
        .await
        .expect("create the pod");
        let t = Instant::now();
        set_pod_ip(
            &c.client,
            &ns,
            &name,
            Ipv4Addr::from(0x0ac9_0001 + u32::try_from(m).unwrap_or(0)),
        )
        .await
        .expect("set status.podIP");
        let (d, met) = a.programmed(t, "pod ADD").await;
        latency.push(ms(d));
        program.push(met.last_program_s * 1e3);
    }
    let add = json!({
        "n": OPS,
        "cpu_per_op": a.cpu_per_op(&w, OPS, poll_s),
        "status_to_programmed": summary_ms(latency),
        "program_duration": summary_ms(program),
    });
    let last = a.scrape();
    let out = json!({
        "datastore": datastore,
        "start_to_ready_s": a.ready_s,
        "cpu_start_to_ready_s": {"agent": startup.own_s, "tools": startup.children_s},
        "memory_at_ready": memory_at_ready,
        "memory_after_ops": a.memory(),
        "metrics_scrape_agent_cpu_us": poll_s * 1e6,
        "policy_edit": edit,
        "pod_add": add,
        "program_failures": last.failures,
    });
    stop_agent(c, 0);
    // The next datastore starts from the same local pods.
    let client = c.client.clone();
    concurrently("deleting the ADDed pods", (0..OPS).collect(), |m| {
        let client = client.clone();
        async move {
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            Api::<Pod>::namespaced(client, &format!("ns-{}", m % LOCAL_NS))
                .delete(&format!("add-{m}"), &dp)
                .await
                .map(|_| ())
        }
    })
    .await;
    out
}

/// CPU per operation `op` of a run: `total_ms` (the agent and its tools) or `agent_ms` (its process alone).
fn per_op(run: &Value, op: &str, part: &str) -> f64 {
    run[op]["cpu_per_op"][part].as_f64().unwrap_or(f64::NAN)
}

/// The agent binary measured: `CARACAL_BENCH_AGENT_BIN` when set (another build, or a wrapper that runs it
/// under a heap profiler), the release build otherwise.
fn agent_bin() -> std::path::PathBuf {
    caracal_e2e::controlplane::binary_from_env(
        "CARACAL_BENCH_AGENT_BIN",
        workspace_root().join("target/release/caracal-node"),
    )
}

async fn agent_scaling() -> Value {
    let release = workspace_root().join("target/release");
    let mut c = TestCluster::new(1, &agent_bin(), &release.join("caracal-cni"))
        .await
        .expect("cluster (make bench builds the release binary first)");
    let local: Vec<(usize, usize)> = (0..LOCAL_NS)
        .flat_map(|n| (0..LOCAL_PER_NS).map(move |i| (n, i)))
        .collect();
    eprintln!(
        "small datastore: {} pods, {} policies, {LOCAL_NS} namespaces",
        local.len(),
        LOCAL_NS * POLICIES_PER_NS
    );
    write_scale(&c.client, 0..LOCAL_NS, local.clone()).await;
    let mut peers = Peers::new();
    let small_ds = json!({"pods": local.len(), "policies": LOCAL_NS * POLICIES_PER_NS,
                          "namespaces": LOCAL_NS, "local_pods": local.len()});
    eprintln!("measuring node-0 (small datastore)");
    let small = measure_node0(&mut c, &mut peers, small_ds).await;

    let remote: Vec<(usize, usize)> = (0..NAMESPACES)
        .flat_map(|n| (0..PODS_PER_NS).map(move |i| (n, i)))
        .filter(|(n, i)| !(*n < LOCAL_NS && *i < LOCAL_PER_NS))
        .collect();
    let pods = local.len() + remote.len();
    eprintln!(
        "growing to {pods} pods, {} policies, {NAMESPACES} namespaces",
        NAMESPACES * POLICIES_PER_NS
    );
    let t = Instant::now();
    write_scale(&c.client, LOCAL_NS..NAMESPACES, remote).await;
    let grow_s = t.elapsed().as_secs_f64();
    let large_ds = json!({"pods": pods, "policies": NAMESPACES * POLICIES_PER_NS,
                          "namespaces": NAMESPACES, "local_pods": local.len(), "written_in_s": grow_s});
    eprintln!("measuring node-0 (large datastore)");
    let large = measure_node0(&mut c, &mut peers, large_ds).await;

    let rss = |r: &Value| r["memory_at_ready"]["rss_kib"].as_f64().unwrap_or(f64::NAN);
    let rss_after = |r: &Value| r["memory_after_ops"]["rss_kib"].as_f64().unwrap_or(f64::NAN);
    let extra_pods = (pods - local.len()) as f64;
    let kib_per_pod = (rss(&large) - rss(&small)) / extra_pods;
    let ratio = |op: &str, part: &str| per_op(&large, op, part) / per_op(&small, op, part);
    let (edit_ratio, add_ratio) = (ratio("policy_edit", "total_ms"), ratio("pod_add", "total_ms"));
    let p = |r: &Value, op: &str, lat: &str, q: &str| r[op][lat][q].as_f64().unwrap_or(f64::NAN);
    json!({
        "small": small,
        "large": large,
        "large_over_small": {
            "cpu_per_policy_edit": edit_ratio,
            "cpu_per_pod_add": add_ratio,
            "agent_process_cpu_per_policy_edit": ratio("policy_edit", "agent_ms"),
            "agent_process_cpu_per_pod_add": ratio("pod_add", "agent_ms"),
            "policy_edit_p50": p(&large, "policy_edit", "edit_to_programmed", "p50_ms") / p(&small, "policy_edit", "edit_to_programmed", "p50_ms"),
            "pod_add_p50": p(&large, "pod_add", "status_to_programmed", "p50_ms") / p(&small, "pod_add", "status_to_programmed", "p50_ms"),
        },
        "rss_kib_per_pod_beyond_baseline": {
            "at_ready": kib_per_pod,
            "after_ops": (rss_after(&large) - rss_after(&small)) / extra_pods,
            "note": "(RSS with the large datastore - RSS with the small one) / the 9,900 extra pods; the extra 1,800 policies and 450 namespaces are counted in it",
        },
        "goals": {
            "cpu_per_policy_edit_ratio_at_most_2": edit_ratio <= 2.0,
            "cpu_per_pod_add_ratio_at_most_2": add_ratio <= 2.0,
            "agent_process_alone_cpu_per_policy_edit_ratio_at_most_2": ratio("policy_edit", "agent_ms") <= 2.0,
            "agent_process_alone_cpu_per_pod_add_ratio_at_most_2": ratio("pod_add", "agent_ms") <= 2.0,
            "kib_per_pod_at_most_5": kib_per_pod <= 5.0,
            "reference": "Cilium's agent adds about 10.5 KiB per pod",
        },
        "note": "CPU per operation is the agent process's (its threads, ns precision) plus the iptables-restore / ipset / iptables processes it runs (with `ip netns exec`, as CARACAL_NETNS makes it); the agent's CPU to serve the benchmark's /metrics scrapes is measured and taken out. Latency: from the API write returning to the programs counter moving (20 ms debounce included), scraped every 5 ms.",
    })
}

// ----- iptables: 1,000 endpoints x 10 policies -----

const IPT_NS: usize = 100;
const IPT_PODS: usize = 10;
const IPT_POLICIES: usize = 10;

/// Chains, rules and sets of Caracal's in node namespace `ns`.
fn kernel_counts(ns: &NetNs) -> Value {
    let save = ns
        .exec(&["iptables-save", "-t", "filter"])
        .expect("iptables-save");
    let sets = ns.exec(&["ipset", "list", "-n"]).expect("ipset list");
    json!({
        "chains": save.lines().filter(|l| l.starts_with(":crc-")).count(),
        "rules": save.lines().filter(|l| l.starts_with("-A crc-")).count(),
        "ipsets": sets.lines().filter(|l| l.starts_with("crc")).count(),
    })
}

/// The 1,000 endpoints' datastore: 100 namespaces of 10 pods, each namespace with 10 policies.
async fn write_endpoints_1000(c: &mut TestCluster) {
    let node = c.nodes[0].name.clone();
    let client = c.client.clone();
    concurrently("namespaces", (0..IPT_NS).collect(), |n| {
        let client = client.clone();
        async move {
            let name = format!("ipt-{n}");
            caracal_e2e::objects::namespace(&client, &name, ns_labels(&name, n.is_multiple_of(10))).await
        }
    })
    .await;
    let policies: Vec<(usize, usize)> = (0..IPT_NS)
        .flat_map(|n| (0..IPT_POLICIES).map(move |j| (n, j)))
        .collect();
    concurrently("policies", policies, |(n, j)| {
        let client = client.clone();
        async move {
            put_policy(
                &client,
                &format!("ipt-{n}"),
                &format!("p-{j}"),
                100.0 + j as f64,
                "all()",
                app_ingress(j % 8),
            )
            .await
        }
    })
    .await;
    let pods: Vec<(usize, usize)> = (0..IPT_NS)
        .flat_map(|n| (0..IPT_PODS).map(move |i| (n, i)))
        .collect();
    concurrently("pods", pods, |(n, i)| {
        let (client, node) = (client.clone(), node.clone());
        async move {
            let ip = Ipv4Addr::from(0x0a5a_0000 + u32::try_from(n * IPT_PODS + i + 1).unwrap_or(0));
            put_pod(
                &client,
                &format!("ipt-{n}"),
                &format!("pod-{i}"),
                pod_labels(i),
                &node,
                Some(ip),
            )
            .await
        }
    })
    .await;
}

/// Interfaces named as the CNI plugin names the host sides of `pods` (namespace, pod), in `ns`: veth pairs
/// whose other ends stay in `ns` too (this kernel has no dummy interfaces). The BPF data plane attaches to an
/// endpoint's interface, so each endpoint needs one (the iptables backend names interfaces in rules and
/// needs none). With `delete`, removes them instead.
fn endpoint_interfaces(ns: &NetNs, pods: impl Iterator<Item = (String, String)>, delete: bool) {
    let batch: String = pods
        .enumerate()
        .map(|(i, (n, p))| {
            let name = host_iface(&n, &p);
            if delete {
                format!("link del {name}\n")
            } else {
                format!("link add {name} type veth peer name bp{i}-{}\n", &name[3..8])
            }
        })
        .collect();
    let path = std::env::temp_dir().join(format!("caracal-bench-ifaces-{}", std::process::id()));
    std::fs::write(&path, batch).expect("batch file");
    ns.exec(&["ip", "-force", "-batch", &path.to_string_lossy()])
        .expect("endpoint interfaces");
    let _ = std::fs::remove_file(path);
}

/// The 1,000 endpoints as (namespace, pod).
fn bench_pods() -> impl Iterator<Item = (String, String)> {
    (0..IPT_NS).flat_map(|n| (0..IPT_PODS).map(move |i| (format!("ipt-{n}"), format!("pod-{i}"))))
}

/// The bytes the BPF maps pinned under `dir` lock in the kernel (`bpftool map show pinned`).
fn bpf_map_bytes(dir: &std::path::Path) -> Value {
    let mut total = 0u64;
    let mut by_map = serde_json::Map::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = e.path();
        if !path.is_file() {
            continue;
        }
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output();
        let Ok(out) = out else { continue };
        let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) else {
            continue;
        };
        let bytes = v["bytes_memlock"].as_u64().unwrap_or(0);
        total += bytes;
        by_map.insert(e.file_name().to_string_lossy().into_owned(), json!(bytes));
    }
    json!({"total_bytes": total, "by_map": by_map})
}

/// The agent on 1,000 local endpoints x 10 policies with `dataplane`: start -> ready and the first program,
/// single policy edits, pod ADDs (BPF), a restart that adopts what is in place, and (iptables) the periodic
/// full read-back.
async fn endpoints_1000(c: &mut TestCluster, dataplane: &str) -> Value {
    eprintln!(
        "{dataplane}: {} local endpoints x {IPT_POLICIES} policies",
        IPT_NS * IPT_PODS
    );
    let bpf = dataplane == "BPF";
    let endpoints = IPT_NS * IPT_PODS;
    let pins = caracal_node::dataplane::bpf::backend::pin_dir(&c.nodes[0].ns.exec_prefix());
    if bpf {
        endpoint_interfaces(&c.nodes[0].ns, bench_pods(), false);
    }
    // The maps' bytes with nothing in them (the same object loaded under a directory of its own).
    let maps_empty = if bpf {
        let _ = caracal_node::dataplane::bpf::remove_all(&pins);
        let empty =
            std::path::PathBuf::from(format!("/sys/fs/bpf/caracal-bench-empty-{}", std::process::id()));
        let loaded = caracal_node::dataplane::bpf::Loaded::load(&empty).expect("load the programs");
        let bytes = bpf_map_bytes(&empty);
        drop(loaded);
        caracal_node::dataplane::bpf::remove_all(&empty).expect("remove");
        bytes
    } else {
        Value::Null
    };
    c.agent_env = vec![
        ("CARACAL_REFRESH_SECONDS".into(), "3600".into()),
        ("CARACAL_DATAPLANE".into(), dataplane.into()),
    ];
    if let Ok(filter) = std::env::var("CARACAL_BENCH_AGENT_LOG") {
        c.agent_env.push(("RUST_LOG".into(), filter));
    }
    let mut a = Agent::start(c, 0).await;
    let first = a.scrape();
    let counts = if bpf {
        bpf_map_bytes(&pins)
    } else {
        kernel_counts(&c.nodes[0].ns)
    };
    let startup = process_cpu(a.pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let poll_s = a.calibrate().await;
    let (mut latency, mut program, mut in_agent) = (Vec::new(), Vec::new(), Vec::new());
    let edits = 20;
    // Each half edits the same policies, so each writes rules of its own: an edit to what the policy already
    // says is no change at all (the API server bumps nothing and watches see nothing), which is what made
    // the BPF half wait forever after the iptables half.
    let first_app = if bpf { 1 } else { 5 };
    let w = a.window();
    for e in 0..edits {
        // One edit at a time: a change within the agent's debounce (20 ms) of its last program waits for
        // it by design (a burst costs one program), which would be measured as latency here.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        set_ingress(
            &c.client,
            &format!("ipt-{}", (3 + 17 * e) % IPT_NS),
            "p-0",
            app_ingress(first_app + e % 3),
        )
        .await
        .expect("edit");
        let (d, m) = a.programmed(t, "policy edit").await;
        latency.push(ms(d));
        program.push(m.last_program_s * 1e3);
        in_agent.push(m.change_s * 1e3);
    }
    let edit_cpu = a.cpu_per_op(&w, edits, poll_s);
    // Pod ADD -> its policy enforced: the interface exists (the CNI plugin made it), the pod appears with
    // its address; the endpoint is enforced when the agent has programmed it.
    let (mut add, mut add_in_agent, mut attach) = (Vec::new(), Vec::new(), Vec::new());
    if bpf {
        for i in 0..20 {
            let (ns, name) = ("ipt-0".to_owned(), format!("new-{i}"));
            endpoint_interfaces(&c.nodes[0].ns, std::iter::once((ns.clone(), name.clone())), false);
            // The CNI wiring closes the interface with the policy programs (the same call) before the pod
            // side is up; the pod's address reaches the API after the ADD.
            let (iface, dir) = (host_iface(&ns, &name), pins.clone());
            let took = c.nodes[0]
                .ns
                .enter(move || {
                    let index = nix::net::if_::if_nametoindex(iface.as_str()).expect("index");
                    let t = Instant::now();
                    let attached = caracal_node::dataplane::bpf::attach_pinned(&dir, &iface, index)
                        .expect("attach the pinned programs");
                    assert!(attached, "the agent in BPF mode has its programs pinned");
                    t.elapsed()
                })
                .expect("enter the node");
            attach.push(ms(took));
            let ip = Ipv4Addr::from(0x0a5b_0000 + i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let t = Instant::now();
            put_pod(
                &c.client,
                &ns,
                &name,
                pod_labels(i as usize),
                &c.nodes[0].name,
                Some(ip),
            )
            .await
            .expect("pod");
            let (d, m) = a.programmed(t, "pod ADD").await;
            add.push(ms(d));
            add_in_agent.push(m.change_s * 1e3);
        }
    }
    let memory = a.memory();
    let maps_full = if bpf { bpf_map_bytes(&pins) } else { Value::Null };
    stop_agent(c, 0);

    // A restarted agent adopts what is in place; its refresh converges in full with a read-back.
    eprintln!("  restart, then {REFRESH_S} s refreshes");
    c.agent_env = vec![
        ("CARACAL_REFRESH_SECONDS".into(), REFRESH_S.to_string()),
        ("CARACAL_DATAPLANE".into(), dataplane.into()),
    ];
    let mut b = Agent::start(c, 0).await;
    let adopt = b.scrape();
    let poll_b = b.calibrate().await;
    let (mut refresh, mut refresh_cpu) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let w = b.window();
        let t = Instant::now();
        let (_, m) = b.programmed(t, "periodic refresh").await;
        refresh.push(m.last_program_s * 1e3);
        refresh_cpu.push(b.cpu_per_op(&w, 1, poll_b));
    }
    let repairs = b.scrape().repairs;
    stop_agent(c, 0);
    if bpf {
        caracal_node::dataplane::bpf::remove_all(&pins).expect("remove the BPF pins");
        let added = (0..20).map(|i| ("ipt-0".to_owned(), format!("new-{i}")));
        endpoint_interfaces(&c.nodes[0].ns, bench_pods().chain(added), true);
    }
    let per_endpoint = counts["total_bytes"]
        .as_u64()
        .zip(maps_empty["total_bytes"].as_u64())
        .map(|(at_ready, empty)| at_ready.saturating_sub(empty) as f64 / endpoints as f64);
    json!({
        "dataplane": dataplane,
        "endpoints": endpoints,
        "policies_per_endpoint": IPT_POLICIES,
        "kernel": counts,
        "first_program": {
            "start_to_ready_s": a.ready_s,
            "program_s": (first.programs == 1).then_some(first.last_program_s),
            "programs_before_ready_read": first.programs,
            "agent_cpu_start_to_ready_s": startup.own_s,
            "tools_cpu_start_to_ready_s": startup.children_s,
        },
        "one_policy_edit": {
            "n": edits,
            "edit_to_programmed": summary_ms(latency),
            "change_at_agent_to_programmed": summary_ms(in_agent),
            "program_duration": summary_ms(program),
            "cpu_per_op": edit_cpu,
        },
        "pod_add_cni_attach": if attach.is_empty() { Value::Null } else { summary_ms(attach) },
        "pod_add_to_programmed": if add.is_empty() { Value::Null } else { summary_ms(add) },
        "pod_add_at_agent_to_programmed": if add_in_agent.is_empty() { Value::Null } else { summary_ms(add_in_agent) },
        "restart_adopts": {
            "start_to_ready_s": b.ready_s,
            "program_s": (adopt.programs == 1).then_some(adopt.last_program_s),
        },
        "periodic_full_readback": {
            "program_duration": summary_ms(refresh),
            "agent_cpu_per_refresh_period": refresh_cpu,
            "found_drift": repairs > 0,
        },
        "memory": memory,
        "bpf_maps_after_the_edits_and_adds": maps_full,
        "bpf_maps_empty": maps_empty,
        "bpf_map_bytes_per_endpoint": per_endpoint,
        "note": "edit_to_programmed is from the API write (the API server and etcd included) to the agent's programs counter moving; change_at_agent_to_programmed is the agent's own measure from the change reaching its policy engine to the program's end: for BPF the tables are in the maps and the endpoint entries flipped, so new flows see the edit; program_* is the agent's own timing of one data plane program; pod_add_cni_attach is the CNI wiring's attachment of the pinned programs to a new pod's interface (bpf::attach_pinned, before the pod side is up: the interface is closed from then on), and pod_add_to_programmed / pod_add_at_agent_to_programmed run from the pod's address reaching the API / the agent to its endpoint entry written (its policy enforced); the per-refresh CPU covers one whole refresh period (the read-back, the forced routing sync, IPAM GC)",
    })
}

// ----- the data planes side by side: throughput and new connections per second -----

fn iperf(client: &NetNs, server_ip: Ipv4Addr) -> f64 {
    let out = client
        // Client on CPU 0, server on CPU 1: left to the scheduler, one stream's rate moved by 10% between
        // samples a few seconds apart.
        .exec(&[
            "iperf3",
            "-c",
            &server_ip.to_string(),
            "-t",
            "3",
            "-A",
            "0,1",
            "-J",
        ])
        .expect("iperf3 client");
    let v: Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
}

/// A server in `ns` on `ip:port` answering each connection's one-byte request with one byte, then closing
/// (the server closes first, so the client side keeps no TIME_WAIT). Runs until the process ends.
fn request_server(ns: &NetNs, ip: Ipv4Addr, port: u16) {
    let listener = ns
        .enter(move || std::net::TcpListener::bind((ip, port)))
        .expect("enter")
        .expect("bind");
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut b = [0u8; 1];
            if c.read_exact(&mut b).is_ok() {
                let _ = c.write_all(&b);
            }
        }
    });
}

/// New connections per second from `ns` to `ip:port` for `secs`: connect, one request, its answer, close;
/// one at a time. Returns (rate, connections that failed).
fn connection_rate(ns: &NetNs, ip: Ipv4Addr, port: u16, secs: f64) -> (f64, u64) {
    ns.enter(move || {
        use std::io::{Read, Write};
        let t = Instant::now();
        let (mut ok, mut failed) = (0u64, 0u64);
        while t.elapsed().as_secs_f64() < secs {
            let done = std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(1))
                .and_then(|mut c| {
                    c.set_read_timeout(Some(Duration::from_secs(1)))?;
                    c.write_all(b"r")?;
                    let mut b = [0u8; 1];
                    c.read_exact(&mut b)?;
                    let _ = c.read(&mut b); // the server's close
                    Ok(())
                });
            if done.is_ok() {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        (ok as f64 / t.elapsed().as_secs_f64(), failed)
    })
    .expect("enter")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Rule counts the data planes are measured at.
const RULE_COUNTS: [usize; 3] = [0, 1000, 10_000];

/// Rules per policy (the CRD's limit is 1,024 per direction).
const RULES_PER_POLICY: usize = 1000;

/// Policies selecting the server that hold `n` Deny rules for TCP sources that are not the client, 1,000 per
/// policy, the last ending in Allow: a new flow to the server meets all of them first. (name, order, rules)
fn rule_policies(n: usize) -> Vec<(String, f64, Value)> {
    let all: Vec<Value> = (0..n as u32)
        .map(|i| {
            json!({"action": "Deny", "protocol": "TCP",
                   "source": {"nets": [format!("{}/32", Ipv4Addr::from(0xac10_0000 + i))]}})
        })
        .collect();
    let chunks: Vec<&[Value]> = all.chunks(RULES_PER_POLICY).collect();
    let last = chunks.len().saturating_sub(1);
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut rules = c.to_vec();
            if i == last {
                rules.push(json!({"action": "Allow"}));
            }
            (format!("many-{i}"), 1.0 + i as f64, Value::Array(rules))
        })
        .collect()
}

impl Agent {
    /// Waits until the agent has programmed and then stayed idle for `quiet` (several writes, however
    /// they were batched, all programmed); returns when the first program was seen and the last one's
    /// duration.
    async fn settled(&mut self, started: Instant, quiet: Duration, what: &str) -> (Duration, f64) {
        let (first, mut m) = self.programmed(started, what).await;
        let mut last = Instant::now();
        while last.elapsed() < quiet {
            let now = self.scrape();
            if now.programs > self.programs {
                self.programs = now.programs;
                m = now;
                last = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (first, m.last_program_s)
    }
}

/// Pairs of samples per rule count.
const PAIRS: usize = 7;

/// One side of a row's pairs: throughput and connection-rate samples, and connections that failed.
#[derive(Default)]
struct Sample {
    tput: Vec<f64>,
    rates: Vec<f64>,
    failed: u64,
    /// Packets the BPF programs dropped during the samples (the flows are all allowed: this must stay 0).
    dropped: f64,
}

impl Sample {
    /// One throughput and one connection-rate sample from `client` to the server at `ip` in `server`.
    fn measure(&mut self, node: &NetNs, client: &NetNs, server: &NetNs, ip: Ipv4Addr, port: &mut u16) {
        self.tput.push(iperf(client, ip));
        // The node's kernel conntrack table keeps each closed connection for 120 s (TIME_WAIT): the 30,000
        // connections of a sample, 42 samples a data plane, fill its 262,144 entries and the kernel then
        // drops new connections' first packets ("nf_conntrack: table full"), which the connection rate
        // measured as seconds of failures. Each sample starts from an empty table.
        node.exec(&["conntrack", "-F"])
            .expect("flush the node's conntrack table");
        *port += 1;
        request_server(server, ip, *port);
        let (r, f) = connection_rate(client, ip, *port, 3.0);
        self.rates.push(r);
        self.failed += f;
    }
}

/// Relabels pod `tput/b` from `pod: from` to `pod: to` and waits until the agent has programmed it.
async fn relabel(c: &TestCluster, agent: &mut Agent, from: &str, to: &str) {
    let t = Instant::now();
    Api::<Pod>::namespaced(c.client.clone(), "tput")
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"pod": to}}})),
        )
        .await
        .expect("relabel the server pod");
    agent
        .settled(t, Duration::from_secs(1), &format!("relabel {from} -> {to}"))
        .await;
}

/// Pod -> pod throughput (iperf3, one stream) and new TCP connections per second between two pods on one
/// node, for each data plane, with 0, 1,000 and 10,000 rules selecting the server that the flow does not
/// match; each data plane's figures against its own with no policy.
async fn dataplanes(c: &mut TestCluster) -> Value {
    let node = c.nodes[1].name.clone();
    caracal_e2e::objects::namespace(&c.client, "tput", json!({}))
        .await
        .expect("namespace");
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 2));
    let a = netns::wire_pod(&c.nodes[1].ns, "tpa", &host_iface("tput", "a"), ip_a).expect("pod a");
    let b = netns::wire_pod(&c.nodes[1].ns, "tpb", &host_iface("tput", "b"), ip_b).expect("pod b");
    for (name, ip) in [("a", ip_a), ("b", ip_b)] {
        put_pod(&c.client, "tput", name, json!({"pod": name}), &node, Some(ip))
            .await
            .expect("pod");
    }
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", b.ns.name(), "iperf3", "-s", "-B", "10.77.0.2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    let mut port = 7000u16;
    let mut out = serde_json::Map::new();
    // `CARACAL_BENCH_DATAPLANES=BPF` measures one data plane alone.
    let only = std::env::var("CARACAL_BENCH_DATAPLANES").unwrap_or_default();
    for dataplane in ["Iptables", "BPF"] {
        if !only.is_empty() && !only.split(',').any(|d| d == dataplane) {
            continue;
        }
        eprintln!("{dataplane}: throughput and connections per second at {RULE_COUNTS:?} rules");
        c.agent_env = vec![
            ("CARACAL_REFRESH_SECONDS".into(), "3600".into()),
            ("CARACAL_DATAPLANE".into(), dataplane.into()),
        ];
        let mut agent = Agent::start(c, 1).await;
        // Paired samples: one with the rules selecting the server, one with the server relabelled so that
        // nothing selects it (its path is the no-policy one); each ratio is of one pair, seconds apart, and
        // the figure is the median ratio. On this machine one stream's rate drifts by several percent over a
        // run, which comparing blocks measured minutes apart mistook for the rules' cost.
        let mut cells = serde_json::Map::new();
        for n in RULE_COUNTS {
            let policies = rule_policies(n);
            let mut programming = Value::Null;
            if n > 0 {
                let t = Instant::now();
                for (name, order, rules) in &policies {
                    put_policy(&c.client, "tput", name, *order, "pod == 'b'", rules.clone())
                        .await
                        .expect("policy");
                }
                let (d, last) = agent.settled(t, Duration::from_secs(2), "the rules").await;
                programming = json!({"writes_to_first_program_ms": ms(d), "last_program_ms": last * 1e3});
            }
            // Pairs alternate their order (with, without; without, with; ...), so a drift over the row
            // weighs on both halves alike; the server is relabelled only when the next sample needs it.
            let (mut with, mut without): (Sample, Sample) = Default::default();
            let mut selected = true;
            for i in 0..PAIRS {
                for want in [i % 2 == 0, i % 2 == 1] {
                    if n > 0 && want != selected {
                        let (from, to) = if want { ("b-idle", "b") } else { ("b", "b-idle") };
                        relabel(c, &mut agent, from, to).await;
                        selected = want;
                    }
                    let half = if want { &mut with } else { &mut without };
                    let before = bpf_dropped(agent.port);
                    half.measure(&c.nodes[1].ns, &a.ns, &b.ns, ip_b, &mut port);
                    half.dropped += bpf_dropped(agent.port) - before;
                }
            }
            // The rules select the server again before they go, so their removal is a change to program.
            if !selected {
                relabel(c, &mut agent, "b-idle", "b").await;
            }
            let ratio =
                |x: &[f64], y: &[f64]| median(&x.iter().zip(y).map(|(a, b)| a / b).collect::<Vec<_>>());
            cells.insert(
                format!("rules_{n}"),
                json!({
                    "gbit_s": median(&with.tput) / 1e9,
                    "no_policy_gbit_s": median(&without.tput) / 1e9,
                    "throughput_ratio_to_no_policy": ratio(&with.tput, &without.tput),
                    "connections_per_s": median(&with.rates),
                    "no_policy_connections_per_s": median(&without.rates),
                    "connections_ratio_to_no_policy": ratio(&with.rates, &without.rates),
                    "connections_failed": with.failed + without.failed,
                    "bpf_packets_dropped": with.dropped + without.dropped,
                    "samples_gbit_s": with.tput.iter().map(|x| x / 1e9).collect::<Vec<_>>(),
                    "samples_no_policy_gbit_s": without.tput.iter().map(|x| x / 1e9).collect::<Vec<_>>(),
                    "samples_connections_per_s": with.rates,
                    "samples_no_policy_connections_per_s": without.rates,
                    "programming": programming,
                }),
            );
            if n > 0 {
                let t = Instant::now();
                for (name, _, _) in &policies {
                    policy_api(&c.client, "tput")
                        .delete(name, &DeleteParams::default())
                        .await
                        .expect("delete the policy");
                }
                agent.settled(t, Duration::from_secs(2), "policy removal").await;
            }
        }
        stop_agent(c, 1);
        if dataplane == "BPF" {
            let pins = caracal_node::dataplane::bpf::backend::pin_dir(&c.nodes[1].ns.exec_prefix());
            caracal_node::dataplane::bpf::remove_all(&pins).expect("remove the BPF pins");
        }
        out.insert(dataplane.to_owned(), Value::Object(cells));
    }
    let _ = server.kill();
    let _ = server.wait();
    out.insert(
        "note".into(),
        json!(format!("one TCP stream, 3 s per iperf3 sample; connections: connect, one byte each way, close, one at a time, 3 s per sample; {PAIRS} pairs per row, each a sample with the rules selecting the server and one with the server relabelled so that nothing selects it (the no-policy path), in alternating order (with, without; without, with; ...); iperf3 client and server pinned to CPUs 0 and 1; ratios are the median of the pairs' ratios, rates the median of their samples; rules_0 is no policy at all in both halves (its ratio shows the noise); the rules are Deny for TCP sources other than the client, then Allow, written through the API and programmed by caracal-node; each data plane starts from a fresh agent on the same pods")),
    );
    Value::Object(out)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::main]
async fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the policy benchmark needs root"
    );
    let start = Instant::now();
    let load_before = load_average();
    let parts = std::env::var("CARACAL_BENCH_PARTS").unwrap_or_default();
    let scaling = if parts.is_empty() || parts == "scaling" {
        agent_scaling().await
    } else {
        Value::Null
    };
    // `CARACAL_BENCH_PARTS=scaling` stops after the scaling part (memory and CPU per operation);
    // `dataplanes` runs only the data planes side by side.
    let (ipt, bpf, planes) = if parts == "scaling" {
        (Value::Null, Value::Null, Value::Null)
    } else {
        let release = workspace_root().join("target/release");
        let mut c = TestCluster::new(2, &release.join("caracal-node"), &release.join("caracal-cni"))
            .await
            .expect("cluster");
        let planes = if parts.is_empty() || parts == "dataplanes" {
            dataplanes(&mut c).await
        } else {
            Value::Null
        };
        if parts.is_empty() || parts == "endpoints" || parts == "endpoints-bpf" {
            write_endpoints_1000(&mut c).await;
            let ipt = if parts == "endpoints-bpf" {
                Value::Null
            } else {
                endpoints_1000(&mut c, "Iptables").await
            };
            let bpf = endpoints_1000(&mut c, "BPF").await;
            (ipt, bpf, planes)
        } else {
            (Value::Null, Value::Null, planes)
        }
    };
    let report = json!({
        "benchmark": "policy",
        "machine": format!("{} cores; load average {load_before} at the start, {} at the end",
                           std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), load_average()),
        "seconds": start.elapsed().as_secs_f64(),
        "agent_scaling": scaling,
        "iptables": ipt,
        "bpf": bpf,
        "dataplanes": planes,
    });
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let text = serde_json::to_string_pretty(&report).expect("json");
    std::fs::write(dir.join("policy.json"), &text).expect("write");
    println!("{text}");
}
