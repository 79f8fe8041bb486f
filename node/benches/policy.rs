//! `make bench` figures for policy, written to `target/bench/policy.json`:
//! - engine: 10,000 pods, 2,000 policies, 500 namespaces: full computation time and memory, and the cost of
//!   one pod label change and one policy edit (incremental graph);
//! - iptables: time to program 1,000 endpoints each selected by 10 policies, and one policy edit on top
//!   (real iptables-restore / ipset in a namespace);
//! - throughput between two pods (iperf3): no policy vs 1,000 rules that do not match the flow.
//!
//! Timings are reported, never asserted. The iptables and iperf3 parts need root.

#![expect(
    clippy::expect_used,
    reason = "a benchmark that cannot go on stops with the reason"
)]

use std::time::{Duration, Instant};

use caracal_e2e::netns;
use caracal_node::dataplane::iptables::{apply::Iptables, render};
use caracal_node::dataplane::{Changes, LocalEndpoint};
use caracal_policy::calc::compute;
use caracal_policy::ir::{Action, EntityMatch, Policy, Rule, Scope};
use caracal_policy::synth::{self, app_policy};
use serde_json::json;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// 100 namespaces x 10 local pods; 10 policies per namespace, each selecting every pod of its namespace.
fn thousand_endpoints(edit: u64) -> (caracal_policy::world::World, Vec<LocalEndpoint>) {
    let mut w = synth::world(7, 100, 10, 0);
    let mut policies = Vec::new();
    for ns in 0..100 {
        for p in 0..10 {
            let mut pol = app_policy(ns, p, 0, (p as u64 + edit) % 8);
            pol.selector = caracal_crds::selector::Expr::All;
            policies.push(pol);
        }
    }
    w.tiers[0].policies = policies;
    let local = w
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| LocalEndpoint {
            key: e.key(),
            iface: format!("crc{i:06}"),
            ips: e.ips.clone(),
        })
        .collect();
    (w, local)
}

fn iptables() -> serde_json::Value {
    let node = netns::node("bench").expect("node namespace (needs root)");
    let mut backend = Iptables::new(node.exec_prefix());
    let (w, local) = thousand_endpoints(0);
    let t = Instant::now();
    let model = compute(&w, &local);
    let d = render::render(&model);
    let render_ms = ms(t.elapsed());
    let rules: usize = d.chains.values().map(Vec::len).sum();
    let t = Instant::now();
    let stats = backend.apply(&d).expect("apply");
    let apply_ms = ms(t.elapsed());
    // One policy edit on top: ns-3's policy 0 now allows a different app.
    let mut w2 = w.clone();
    let mut changed = app_policy(3, 0, 0, 5);
    changed.selector = caracal_crds::selector::Expr::All;
    w2.tiers[0]
        .policies
        .iter_mut()
        .filter(|p| p.name == changed.name)
        .for_each(|p| *p = changed.clone());
    let t = Instant::now();
    let d2 = render::render(&compute(&w2, &local));
    let edit_render_ms = ms(t.elapsed());
    let t = Instant::now();
    let changes = Changes {
        policies: [changed.name.clone()].into(),
        ..Changes::default()
    };
    let edit_stats = backend
        .apply_changes(&compute(&w2, &local), &changes)
        .expect("apply edit");
    let t2 = Instant::now();
    let full_stats = backend.apply(&d2).expect("full read-back");
    let full_readback_ms = ms(t2.elapsed());
    let edit_apply_ms = ms(t.elapsed());
    backend.remove_all().expect("cleanup");
    json!({
        "endpoints": local.len(), "policies_per_endpoint": 10,
        "chains": d.chains.len(), "rules": rules, "ipsets": d.sets.len(),
        "first_program": {"compute_render_ms": render_ms, "apply_ms": apply_ms, "chains_written": stats.chains_written, "sets_written": stats.sets_written},
        "one_policy_edit": {"compute_render_ms": edit_render_ms, "apply_ms": edit_apply_ms, "chains_written": edit_stats.chains_written, "sets_written": edit_stats.sets_written},
        "periodic_full_readback": {"ms": full_readback_ms, "found_drift": !full_stats.is_noop()},
    })
}

fn iperf(client: &netns::NetNs, server_ip: std::net::Ipv4Addr) -> f64 {
    let out = client
        .exec(&["iperf3", "-c", &server_ip.to_string(), "-t", "4", "-J"])
        .expect("iperf3 client");
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
}

fn throughput() -> serde_json::Value {
    let node = netns::node("tput").expect("node");
    let a = netns::wire_pod(&node, "tpa", "crctputa", "10.77.0.1".parse().expect("ip")).expect("pod a");
    let b = netns::wire_pod(&node, "tpb", "crctputb", "10.77.0.2".parse().expect("ip")).expect("pod b");
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", b.ns.name(), "iperf3", "-s", "-B", "10.77.0.2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    let mut backend = Iptables::new(node.exec_prefix());
    let ep = |p: &netns::Pod, key: &str| LocalEndpoint {
        key: key.into(),
        iface: p.iface.clone(),
        ips: vec![p.ip.into()],
    };
    let mut w = caracal_policy::world::World::default();
    for (name, ip) in [("a", "10.77.0.1"), ("b", "10.77.0.2")] {
        w.endpoints.push(caracal_policy::world::Endpoint {
            namespace: "t".into(),
            name: name.into(),
            ips: vec![ip.parse().expect("ip")],
            labels: [("pod".to_owned(), name.to_owned())].into(),
            service_account: "default".into(),
            ports: vec![],
            node: None,
        });
    }
    let local = [ep(&a, "t/a"), ep(&b, "t/b")];
    // 1,000 Deny rules for addresses that are not the client's, then Allow: every new flow walks them all.
    let mut rules: Vec<Rule> = (0..1000u32)
        .map(|i| {
            let mut src = EntityMatch::any(Scope::Any);
            src.nets = vec![ipnet::IpNet::from(std::net::IpAddr::V4(
                std::net::Ipv4Addr::from(0xc000_0200 + i),
            ))];
            Rule {
                action: Action::Deny,
                ip_version: None,
                protocol: Some(6),
                not_protocol: None,
                icmp: None,
                not_icmp: None,
                source: src,
                destination: EntityMatch::any(Scope::Any),
            }
        })
        .collect();
    rules.push(Rule {
        action: Action::Allow,
        ip_version: None,
        protocol: None,
        not_protocol: None,
        icmp: None,
        not_icmp: None,
        source: EntityMatch::any(Scope::Any),
        destination: EntityMatch::any(Scope::Any),
    });
    let policy = Policy {
        name: "t/many".into(),
        namespace: Some("t".into()),
        order: Some(1.0),
        selector: caracal_crds::selector::Expr::Eq("pod".into(), "b".into()),
        namespace_selector: None,
        service_account_selector: None,
        ingress: Some(rules),
        egress: None,
        everywhere: false,
    };
    let mut samples_none = Vec::new();
    let mut samples_many = Vec::new();
    for _ in 0..3 {
        let mut w0 = w.clone();
        w0.tiers = caracal_policy::convert::build_tiers(&[], vec![]);
        backend
            .apply(&render::render(&compute(&w0, &local)))
            .expect("apply");
        samples_none.push(iperf(&a.ns, b.ip));
        let mut w1 = w.clone();
        w1.tiers = caracal_policy::convert::build_tiers(&[], vec![("default".into(), policy.clone())]);
        backend
            .apply(&render::render(&compute(&w1, &local)))
            .expect("apply");
        samples_many.push(iperf(&a.ns, b.ip));
    }
    let _ = server.kill();
    let _ = server.wait();
    backend.remove_all().expect("cleanup");
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (none, many) = (med(samples_none.clone()), med(samples_many.clone()));
    json!({
        "no_policy_gbit_s": none / 1e9, "rules_1000_gbit_s": many / 1e9, "ratio": many / none,
        "samples_no_policy_gbit_s": samples_none.iter().map(|x| x / 1e9).collect::<Vec<_>>(),
        "samples_1000_rules_gbit_s": samples_many.iter().map(|x| x / 1e9).collect::<Vec<_>>(),
        "note": "one TCP stream, 4 s per sample, median of 3; both sides run through Caracal's chains, where established packets are accepted by the first rule"
    })
}

fn main() {
    let report = json!({
        "benchmark": "policy",
        "machine": "2 cores, 24 GiB; iptables 1.8.9 (nf_tables), ipset 7.17",
        "iptables": iptables(),
        "throughput": throughput(),
    });
    let dir = caracal_e2e::controlplane::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let text = serde_json::to_string_pretty(&report).expect("json");
    std::fs::write(dir.join("policy.json"), &text).expect("write");
    println!("{text}");
}
