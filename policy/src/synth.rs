//! Synthetic clusters for tests and benchmarks: namespaces, pods and policies in the shapes real clusters
//! have (per-namespace default deny, app-to-app allows, a few global policies), from a seed.

use caracal_crds::selector::Expr;

use super::convert::{DEFAULT_TIER, DEFAULT_TIER_ORDER};
use super::ir::{Action, EntityMatch, Policy, PortMatch, Rule, Scope, Tier, TierDefault};
use super::world::{Endpoint, Labels, NamedPort, World};

/// A small deterministic generator (xorshift), so a failing sequence can be replayed from its seed.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// A pod `ns/pod-i` with app/tier labels and a named port.
pub fn pod(ns: usize, i: usize, app: u64, tier: u64) -> Endpoint {
    let namespace = format!("ns-{ns}");
    let mut labels: Labels = [
        ("app".to_owned(), format!("app-{app}")),
        ("tier".to_owned(), format!("t{tier}")),
        ("projectcalico.org/namespace".to_owned(), namespace.clone()),
        ("projectcalico.org/orchestrator".to_owned(), "k8s".to_owned()),
    ]
    .into_iter()
    .collect();
    if i.is_multiple_of(7) {
        labels.insert("monitored", "true");
    }
    let n = u32::try_from(ns * 100_000 + i).unwrap_or(0);
    Endpoint {
        name: format!("pod-{i}"),
        ips: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n))],
        labels,
        service_account: "default".into(),
        ports: vec![NamedPort {
            name: "http".into(),
            protocol: 6,
            port: 8080,
        }],
        node: None,
        namespace,
    }
}

/// A namespaced policy: pods of `app` take TCP on 8080 / `http` from pods of `from_app` (same namespace) and
/// from monitored pods in namespaces labelled `team: ops`.
pub fn app_policy(ns: usize, idx: usize, app: u64, from_app: u64) -> Policy {
    let namespace = format!("ns-{ns}");
    let mut from_ops = EntityMatch::any(Scope::Selector(Expr::Eq("team".into(), "ops".into())));
    from_ops.scoped = true;
    from_ops.selector = Some(Expr::Has("monitored".into()));
    let mut to_http = EntityMatch::any(Scope::Namespace(namespace.clone()));
    to_http.ports = vec![PortMatch::Range(8080, 8080), PortMatch::Named("http".into())];
    let mut from_app_m = EntityMatch::any(Scope::Namespace(namespace.clone()));
    from_app_m.selector = Some(Expr::Eq("app".into(), format!("app-{from_app}")));
    let allow = |source: EntityMatch| Rule {
        action: Action::Allow,
        ip_version: None,
        protocol: Some(6),
        not_protocol: None,
        icmp: None,
        not_icmp: None,
        source,
        destination: to_http.clone(),
    };
    Policy {
        name: format!("{namespace}/p-{idx}"),
        namespace: Some(namespace),
        order: Some(100.0 + idx as f64),
        selector: Expr::Eq("app".into(), format!("app-{app}")),
        namespace_selector: None,
        service_account_selector: None,
        ingress: Some(vec![allow(from_app_m), allow(from_ops)]),
        egress: None,
        everywhere: false,
    }
}

/// A world of `namespaces` x `pods_per_ns` pods and `policies_per_ns` policies per namespace; every tenth
/// namespace is labelled `team: ops`.
pub fn world(seed: u64, namespaces: usize, pods_per_ns: usize, policies_per_ns: usize) -> World {
    let mut rng = Rng(seed | 1);
    let mut w = World::default();
    let mut policies = Vec::new();
    for ns in 0..namespaces {
        let mut labels: Labels = [("name", format!("ns-{ns}"))].into_iter().collect();
        if ns.is_multiple_of(10) {
            labels.insert("team", "ops");
        }
        w.namespaces.insert(format!("ns-{ns}"), labels);
        for i in 0..pods_per_ns {
            w.endpoints.push(pod(ns, i, rng.below(8), rng.below(3)));
        }
        for p in 0..policies_per_ns {
            policies.push(std::sync::Arc::new(app_policy(ns, p, rng.below(8), rng.below(8))));
        }
    }
    w.tiers = vec![Tier {
        name: DEFAULT_TIER.into(),
        order: Some(DEFAULT_TIER_ORDER),
        default_action: TierDefault::Deny,
        policies,
    }];
    w
}
