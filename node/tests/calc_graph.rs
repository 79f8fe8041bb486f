//! The incremental calculation graph always equals the full computation, through a long seeded sequence of
//! pod, label, policy and namespace changes.

use caracal_node::calc::{compute, graph::CalcGraph};
use caracal_node::dataplane::LocalEndpoint;
use caracal_node::policy::synth::{Rng, app_policy, pod, world};

fn locals(w: &caracal_node::policy::model::World, every: usize) -> Vec<LocalEndpoint> {
    w.endpoints
        .iter()
        .step_by(every)
        .enumerate()
        .map(|(i, e)| LocalEndpoint {
            key: e.key(),
            iface: format!("crc{i:06}"),
            ips: e.ips.clone(),
        })
        .collect()
}

#[test]
fn incremental_updates_equal_a_full_computation_after_every_change() {
    for seed in [1u64, 7, 42] {
        let w = world(seed, 12, 15, 4);
        let local = locals(&w, 5);
        let mut g = CalcGraph::full(w, &local);
        assert_eq!(g.model(), &compute(g.world(), &local), "seed {seed}: initial");
        let mut rng = Rng(seed * 1_000_003 + 1);
        for step in 0..300 {
            let ns = rng.below(12) as usize;
            match rng.below(6) {
                0 => g.upsert_endpoint(pod(ns, rng.below(15) as usize, rng.below(8), rng.below(3))),
                1 => g.upsert_endpoint(pod(ns, 100 + rng.below(5) as usize, rng.below(8), rng.below(3))),
                2 => g.remove_endpoint(&format!("ns-{ns}/pod-{}", 100 + rng.below(5))),
                3 => g.upsert_policy(
                    "default",
                    app_policy(ns, rng.below(6) as usize, rng.below(8), rng.below(8)),
                ),
                4 => g.remove_policy(&format!("ns-{ns}/p-{}", rng.below(6))),
                _ => {
                    let mut labels =
                        std::collections::BTreeMap::from([("name".to_owned(), format!("ns-{ns}"))]);
                    if rng.below(2) == 0 {
                        labels.insert("team".into(), "ops".into());
                    }
                    g.set_namespace_labels(&format!("ns-{ns}"), labels);
                }
            }
            let full = compute(g.world(), &local);
            assert_eq!(
                g.model(),
                &full,
                "seed {seed}, step {step}: the graph diverged from a full computation"
            );
        }
        assert!(
            !g.model().policies.is_empty() && !g.model().sets.is_empty(),
            "the sequence exercised policies and sets"
        );
    }
}
