//! Kernel + cluster tier: Caracal IPAM under stress.
//! - 200 concurrent ADD/DEL through the real plugin on one node, with the agent killed by SIGKILL in the
//!   middle and restarted: no address is ever held by two live pods, every live pod's address is recorded
//!   under its own handle, and after pods vanish without a DEL, GC leaves zero leaked addresses.
//! - Two nodes' IPAM servers racing for the only block of a pool never share an address; the loser borrows
//!   from the winner's block, and with strict affinity it gets nothing instead.
//! - A burst claims blocks ahead with the reserve written into them as they are created: memory and the
//!   API's blocks agree on every address, and a restarted server finds the same reserve.
//!
//! Needs root.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use caracal_crds::ipam::{IPAMBlock, IPAMConfiguration, IPAMConfigurationSpec};
use caracal_crds::ippool::EncapMode;
use caracal_e2e::cluster::TestCluster;
use caracal_e2e::cni::{self, Invocation};
use caracal_e2e::netns::NetNs;
use caracal_node::ipam::block::Block;
use caracal_node::ipam::node::{self, NodeIpam};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

async fn pool(client: &kube::Client, name: &str, cidr: &str) {
    caracal_e2e::objects::ippool(client, name, cidr, EncapMode::Never, EncapMode::Never, false)
        .await
        .expect("pool");
}

/// Every held address in the API: address -> (handle, attributes).
async fn held_in_api(client: &kube::Client) -> BTreeMap<IpAddr, (String, BTreeMap<String, String>)> {
    let mut out = BTreeMap::new();
    for b in Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("blocks")
    {
        let block = Block::from_spec(&b.spec).expect("consistent block");
        for (ip, handle) in block.allocated() {
            let attrs = block
                .attributes_of(ip)
                .map(|a| a.secondary.clone())
                .unwrap_or_default();
            assert!(out.insert(ip, (handle, attrs)).is_none(), "{ip} in two blocks");
        }
    }
    out
}

/// ADD (retried while the agent answers "try again", as a runtime does), then for odd pods DEL.
fn add_then_maybe_del(
    plugin: &Path,
    prefix: &[String],
    socket: &Path,
    i: usize,
    netns: &str,
) -> Option<IpAddr> {
    let conf = cni::caracal_conf(socket);
    let name = format!("s{i}");
    let cid = format!("stress{i:04}");
    let inv = |command| Invocation {
        command,
        container_id: &cid,
        netns,
        ifname: "eth0",
        pod: Some(("stress", &name)),
    };
    let start = Instant::now();
    let ip = loop {
        let (code, out) = cni::invoke(plugin, prefix, &inv("ADD"), &conf).expect("plugin");
        if code == 0 {
            break out["ips"][0]["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<IpAddr>().ok())
                .expect("address in result");
        }
        assert_eq!(
            out["code"], 11,
            "only 'try again later' is expected while the agent restarts: {out}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "ADD s{i} never succeeded: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    if i % 2 == 1 {
        loop {
            let (code, out) = cni::invoke(plugin, prefix, &inv("DEL"), &conf).expect("plugin");
            if code == 0 {
                return None;
            }
            assert_eq!(out["code"], 11, "DEL: {out}");
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "DEL s{i} never succeeded: {out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Some(ip)
}

#[tokio::test]
async fn concurrent_add_del_with_an_agent_sigkill_leaves_no_duplicate_and_after_gc_no_leak() {
    assert!(nix::unistd::geteuid().is_root(), "needs root (CI runs as root)");
    let mut c = TestCluster::new(
        1,
        Path::new(env!("CARGO_BIN_EXE_caracal-node")),
        &caracal_e2e::controlplane::workspace_bin("caracal-cni"),
    )
    .await
    .expect("cluster");
    c.agent_env.push(("CARACAL_REFRESH_SECONDS".into(), "2".into()));
    c.agent_env
        .push(("CARACAL_IPAM_GC_GRACE_SECONDS".into(), "3".into()));
    pool(&c.client, "stress", "10.70.0.0/22").await;
    caracal_e2e::objects::namespace(&c.client, "stress", json!({}))
        .await
        .expect("namespace");
    for i in 0..200 {
        caracal_e2e::objects::scheduled_pod(&c.client, "stress", &format!("s{i}"), json!({}), "node-0")
            .await
            .expect("pod");
    }
    let pod_ns: Vec<NetNs> = (0..200)
        .map(|_| NetNs::new("st").expect("pod namespace"))
        .collect();
    c.start_agents().await.expect("agent");

    let done = Arc::new(AtomicUsize::new(0));
    let plugin = c.plugin_bin.clone();
    let prefix = c.nodes[0].ns.exec_prefix();
    let socket: PathBuf = c.nodes[0].socket.clone();
    let tasks: Vec<_> = pod_ns
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let (plugin, prefix, socket, done) =
                (plugin.clone(), prefix.clone(), socket.clone(), done.clone());
            let path = format!("/run/netns/{}", ns.name());
            tokio::task::spawn_blocking(move || {
                let r = add_then_maybe_del(&plugin, &prefix, &socket, i, &path);
                done.fetch_add(1, Ordering::Relaxed);
                r
            })
        })
        .collect();
    // SIGKILL the agent once a quarter of the pods are through, then start it again.
    while done.load(Ordering::Relaxed) < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.nodes[0].agent.as_mut().expect("agent").kill_now();
    c.start_agent(0).expect("restart");
    let mut live: BTreeMap<String, IpAddr> = BTreeMap::new();
    for (i, t) in tasks.into_iter().enumerate() {
        if let Some(ip) = t.await.expect("task") {
            live.insert(format!("s{i}"), ip);
        }
    }
    assert_eq!(live.len(), 100);
    let distinct: BTreeSet<&IpAddr> = live.values().collect();
    assert_eq!(
        distinct.len(),
        live.len(),
        "an address was handed to two live pods"
    );

    // Once committed, the API records each live pod's address under its own handle, and nothing else for
    // pods (the restarted agent replayed its journal).
    let start = Instant::now();
    loop {
        let api = held_in_api(&c.client).await;
        let pods: BTreeMap<String, IpAddr> = api
            .iter()
            .filter_map(|(ip, (_, a))| Some((a.get("pod")?.clone(), *ip)))
            .collect();
        if pods == live {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "API and live pods differ:\nAPI: {pods:?}\nlive: {live:?}\n{}",
            c.agent_log(0, 30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Each live pod's namespace has its address.
    for (name, ip) in live.iter().take(10) {
        let i: usize = name[1..].parse().expect("index");
        let addr = pod_ns[i].ip(&["-o", "addr", "show", "eth0"]).expect("addr");
        assert!(addr.contains(&format!("{ip}/32")), "{name}: {addr}");
    }

    // Pods vanish without a DEL (a node restart, a lost runtime): GC releases their addresses after the
    // grace period, and every address left belongs to a pod that exists.
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "stress");
    let vanished: Vec<String> = live.keys().take(20).cloned().collect();
    for (i, _) in (0..200).map(|i| (i, ())) {
        let name = format!("s{i}");
        if i % 2 == 1 || vanished.contains(&name) {
            pods.delete(&name, &DeleteParams::default().grace_period(0))
                .await
                .expect("delete pod");
        }
    }
    let start = Instant::now();
    loop {
        let api = held_in_api(&c.client).await;
        let leaked: Vec<String> = api
            .values()
            .filter_map(|(_, a)| a.get("pod").cloned())
            .filter(|p| !live.contains_key(p) || vanished.contains(p))
            .collect();
        let held_pods = api.values().filter(|(_, a)| a.contains_key("pod")).count();
        if leaked.is_empty() && held_pods == live.len() - vanished.len() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "leaked after GC: {leaked:?} ({held_pods} pod addresses held)\n{}",
            c.agent_log(0, 30)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn two_nodes_racing_for_the_only_block_never_share_an_address_and_strict_affinity_stops_borrowing() {
    let (cp, client) = caracal_e2e::crds::control_plane().await.expect("control plane");
    pool(&client, "tiny", "10.71.0.0/26").await;
    let start = |node: &str| {
        let mut cfg = node::Config::new(node, cp.dir().join(node));
        cfg.reserve = 8;
        NodeIpam::start(client.clone(), cfg)
    };
    let (a, b) = tokio::join!(start("race-a"), start("race-b"));
    let (a, b) = (a.expect("ipam a"), b.expect("ipam b"));
    let assign = |ipam: NodeIpam, prefix: &'static str| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..40 {
                let attrs = BTreeMap::from([("pod".to_owned(), format!("{prefix}{i}"))]);
                if let Ok(ips) = ipam.assign(&format!("{prefix}-{i}"), attrs).await {
                    got.extend(ips);
                }
            }
            got
        })
    };
    let (ga, gb) = tokio::join!(assign(a.clone(), "a"), assign(b.clone(), "b"));
    let (ga, gb) = (ga.expect("a"), gb.expect("b"));
    let all: Vec<IpAddr> = ga.iter().chain(&gb).copied().collect();
    let distinct: BTreeSet<IpAddr> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a: {ga:?}\nb: {gb:?}");
    assert!(
        all.len() <= 64 && all.len() >= 40,
        "{} addresses handed out",
        all.len()
    );
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("blocks");
    assert_eq!(
        blocks.items.len(),
        1,
        "exactly one block exists, claimed by one node"
    );
    let owner = blocks.items[0].spec.affinity.clone().expect("affinity");
    let (winner, loser) = if owner == "host:race-a" {
        (&ga, &gb)
    } else {
        (&gb, &ga)
    };
    assert!(!winner.is_empty());
    assert!(
        !loser.is_empty(),
        "the loser borrows from the winner's block when not strict"
    );

    // Strict affinity: a third node gets nothing from the block it does not own.
    Api::<IPAMConfiguration>::all(client.clone())
        .create(
            &PostParams::default(),
            &IPAMConfiguration::new(
                "default",
                IPAMConfigurationSpec {
                    strict_affinity: Some(true),
                    ..Default::default()
                },
            ),
        )
        .await
        .expect("ipam configuration");
    // Free some addresses first so that only strictness can refuse.
    for i in 0..5 {
        let _ = a.release(&format!("a-{i}")).await;
        let _ = b.release(&format!("b-{i}")).await;
    }
    let start_wait = Instant::now();
    while !(a.settled().await && b.settled().await) {
        assert!(
            start_wait.elapsed() < Duration::from_secs(30),
            "commits never settled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = start("race-c").await.expect("ipam c");
    let refused = c
        .assign("c-0", BTreeMap::from([("pod".to_owned(), "c0".to_owned())]))
        .await;
    assert!(
        refused.is_err(),
        "strict affinity must refuse borrowing, got {refused:?}"
    );
    assert!(
        refused
            .expect_err("refused")
            .to_string()
            .contains("no free address")
    );
    drop(cp);
}

#[tokio::test]
async fn blocks_left_with_only_the_reserve_are_released_and_addresses_stay_unique() {
    let (cp, client) = caracal_e2e::crds::control_plane().await.expect("control plane");
    pool(&client, "rel", "10.72.0.0/24").await;
    let mut cfg = node::Config::new("rel", cp.dir().join("rel"));
    cfg.reserve = 8;
    let ipam = NodeIpam::start(client.clone(), cfg).await.expect("ipam");
    let attrs = |i: usize| BTreeMap::from([("pod".to_owned(), format!("r{i}"))]);
    let mut kept = BTreeSet::new();
    for i in 0..130 {
        let ips = ipam.assign(&format!("r-{i}"), attrs(i)).await.expect("assign");
        if i < 2 {
            kept.extend(ips);
        }
    }
    let own_blocks = || async {
        Api::<IPAMBlock>::all(client.clone())
            .list(&ListParams::default())
            .await
            .expect("blocks")
            .items
            .into_iter()
            .filter(|b| b.spec.affinity.as_deref() == Some("host:rel"))
            .count()
    };
    assert!(
        own_blocks().await >= 3,
        "130 addresses and a reserve need three /26 blocks"
    );
    for i in 2..130 {
        ipam.release(&format!("r-{i}")).await.expect("release");
    }
    let start = Instant::now();
    while !ipam.settled().await {
        assert!(start.elapsed() < Duration::from_secs(30), "never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let released = ipam.release_empty_blocks().await.expect("release blocks");
    assert!(!released.is_empty(), "no block was released");
    assert_eq!(
        own_blocks().await,
        1,
        "only the block holding the two live pods remains"
    );
    let affinities = Api::<caracal_crds::ipam::BlockAffinity>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("affinities");
    assert_eq!(affinities.items.len(), 1);
    // A second pass releases nothing more (no churn), and new addresses never collide with the kept ones.
    assert!(ipam.release_empty_blocks().await.expect("again").is_empty());
    for i in 200..220 {
        for ip in ipam.assign(&format!("r-{i}"), attrs(i)).await.expect("assign") {
            assert!(kept.insert(ip), "{ip} handed out twice");
        }
    }
    drop(cp);
}

/// A burst claims its blocks ahead, several at once, with the reserve's addresses written into the blocks as
/// they are created: every address the IPAM server hands out or keeps in reserve is recorded in the API
/// under the right handle, and a restarted server finds the same reserve.
#[tokio::test]
async fn a_burst_claims_blocks_ahead_and_every_reserved_address_is_recorded_in_the_blocks() {
    let (cp, client) = caracal_e2e::crds::control_plane().await.expect("control plane");
    pool(&client, "burst", "10.73.0.0/23").await;
    let state = cp.dir().join("burst");
    let cfg = node::Config::new("burst", &state);
    let ipam = NodeIpam::start(client.clone(), cfg.clone()).await.expect("ipam");
    let attrs = |i: usize| BTreeMap::from([("pod".to_owned(), format!("b{i}"))]);
    let tasks: Vec<_> = (0..160)
        .map(|i| {
            let ipam = ipam.clone();
            tokio::spawn(async move { ipam.assign(&format!("b-{i}"), attrs(i)).await })
        })
        .collect();
    let mut handed = BTreeSet::new();
    for t in tasks {
        for ip in t.await.expect("task").expect("assign") {
            assert!(handed.insert(ip), "{ip} handed out twice");
        }
    }
    let start = Instant::now();
    while !ipam.settled().await {
        assert!(start.elapsed() < Duration::from_secs(30), "never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("blocks");
    assert!(blocks.items.len() >= 3, "160 pods need three /26 blocks");
    let affinities = Api::<caracal_crds::ipam::BlockAffinity>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("affinities");
    for b in &blocks {
        assert!(
            affinities.iter().any(|a| a.spec.cidr.0 == b.spec.cidr.0
                && a.spec.node == "burst"
                && a.spec.state == caracal_crds::ipam::AffinityState::Confirmed),
            "block {} has no confirmed BlockAffinity",
            b.spec.cidr.0
        );
    }
    let api = held_in_api(&client).await;
    let reserve = NodeIpam::reserve_handle("burst");
    for (handle, held) in ipam.held().await {
        for ip in &held.ips {
            assert_eq!(
                api.get(ip).map(|(h, _)| h.as_str()),
                Some(handle.as_str()),
                "{ip} of {handle} is not recorded under it"
            );
        }
    }
    let reserved_in_api = api.values().filter(|(h, _)| *h == reserve).count();
    assert_eq!(
        reserved_in_api,
        ipam.reserved().await,
        "the reserve in memory and in the blocks differ"
    );
    assert!(
        api.keys().all(|ip| handed.contains(ip) || api[ip].0 == reserve),
        "an address is recorded under neither a pod nor the reserve"
    );
    // A restarted server (same journal and blocks) has the same reserve and hands out none of the held.
    drop(ipam);
    let again = NodeIpam::start(client.clone(), cfg).await.expect("restart");
    assert_eq!(again.reserved().await, reserved_in_api);
    for i in 200..210 {
        for ip in again.assign(&format!("b-{i}"), attrs(i)).await.expect("assign") {
            assert!(handed.insert(ip), "{ip} handed out twice after the restart");
        }
    }
    drop(cp);
}
