//! The agent's `/readyz` and `/metrics` (served by `caracal_datastore::http`): readiness is
//! [`Status::ready`]; every metric has a bounded label set (`kind` is one of the policy kinds).

use std::sync::atomic::Ordering;

use caracal_datastore::http::Health;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::agent::Status;

impl Health for Status {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("caracal_node");
        r.register(
            "ready",
            "1 once the first program from a complete datastore view applied every valid object",
            ConstGauge::new(i64::from(self.ready())),
        );
        let counters = [
            ("dataplane_programs", "Data plane programs", &self.programs),
            (
                "dataplane_repairs",
                "Full read-backs that repaired drift",
                &self.repairs,
            ),
            (
                "dataplane_failures",
                "Data plane programs that failed",
                &self.failures,
            ),
            (
                "routing_changes",
                "Routing syncs that changed the kernel after the first",
                &self.routing_changes,
            ),
            (
                "routing_failures",
                "Routing syncs that failed",
                &self.routing_failures,
            ),
        ];
        for (name, help, value) in counters {
            r.register(name, help, ConstCounter::new(value.load(Ordering::Relaxed)));
        }
        r.register(
            "cni_add_seconds",
            "How long CNI ADDs took in the agent (the address and the wiring), from the plugin's request to the answer",
            self.cni_add.0.clone(),
        );
        r.register(
            "dataplane_last_program_seconds",
            "How long the last data plane program took",
            ConstGauge::new(self.last_program_us.load(Ordering::Relaxed) as f64 / 1e6),
        );
        r.register(
            "dataplane_last_change_to_programmed_seconds",
            "From a datastore change reaching the policy engine to the incremental program that applied it (the last one)",
            ConstGauge::new(self.last_change_us.load(Ordering::Relaxed) as f64 / 1e6),
        );
        if let Some(svc) = self.services.get() {
            r.register(
                "services_frontends",
                "Service frontends (ClusterIP and NodePort ports) the BPF data plane serves",
                ConstGauge::new(svc.frontends.load(Ordering::Relaxed) as i64),
            );
            r.register(
                "services_syncs",
                "Times the Service maps were brought up to date with the Services and EndpointSlices",
                ConstCounter::new(svc.syncs.load(Ordering::Relaxed)),
            );
        }
        if let Some(wg) = self.wireguard.get() {
            let reports = wg
                .lock()
                .map(|r| r.clone())
                .unwrap_or_else(|e| e.into_inner().clone());
            for (family, report) in ["ipv4", "ipv6"].iter().zip(reports.iter()) {
                for (state, nodes) in [
                    ("encrypted", &report.encrypted),
                    ("unencrypted", &report.unencrypted),
                ] {
                    r.sub_registry_with_label(("family".into(), (*family).into()))
                        .sub_registry_with_label(("state".into(), state.into()))
                        .register(
                            "wireguard_peers",
                            "Other nodes holding pod addresses, by whether WireGuard encrypts this node's pod traffic with them (unencrypted: WireGuard is on here and the node publishes no key)",
                            ConstGauge::new(nodes.len() as i64),
                        );
                }
                for node in &report.unencrypted {
                    r.sub_registry_with_label(("family".into(), (*family).into()))
                        .sub_registry_with_label(("node".into(), node.clone().into()))
                        .register(
                            "wireguard_unencrypted_peer",
                            "A node this node's pod traffic goes to unencrypted although WireGuard is on here",
                            ConstGauge::new(1),
                        );
                }
            }
        }
        if let Some(left) = self.bgp_left_out.get() {
            let left = left
                .lock()
                .map(|l| l.clone())
                .unwrap_or_else(|e| e.into_inner().clone());
            for (peer, _) in left {
                r.sub_registry_with_label(("peer".into(), peer.into())).register(
                    "bgp_session_left_out",
                    "A BGP session a BGPPeer asks for that BIRD is not given, because its password Secret cannot be read (the agent's log says why)",
                    ConstGauge::new(1),
                );
            }
        }
        if let Some(ct) = self.bpf_conntrack.get() {
            r.register(
                "bpf_conntrack_entries",
                "Entries in the BPF connection tracker at its last sweep",
                ConstGauge::new(ct.entries.load(Ordering::Relaxed) as i64),
            );
            r.register(
                "bpf_conntrack_removed",
                "BPF connection tracker entries the sweeper removed (flows closed or idle past their limit)",
                ConstCounter::new(ct.removed.load(Ordering::Relaxed)),
            );
            r.register(
                "bpf_conntrack_sweeps",
                "Sweeps of the BPF connection tracker",
                ConstCounter::new(ct.sweeps.load(Ordering::Relaxed)),
            );
            r.register(
                "bpf_conntrack_sweep_failures",
                "Sweeps of the BPF connection tracker that failed (the agent's log says why)",
                ConstCounter::new(ct.failures.load(Ordering::Relaxed)),
            );
            r.register(
                "bpf_conntrack_last_sweep_seconds",
                "How long the last sweep of the BPF connection tracker took",
                ConstGauge::new(ct.last_us.load(Ordering::Relaxed) as f64 / 1e6),
            );
        }
        if let Some(rows) = self.bpf_counter_rows() {
            for (iface, from, to) in rows.iter() {
                for (direction, c) in [("from_pod", from), ("to_pod", to)] {
                    let r = r
                        .sub_registry_with_label(("interface".into(), iface.clone().into()))
                        .sub_registry_with_label(("direction".into(), direction.into()));
                    r.register(
                        "bpf_packets_allowed",
                        "Packets the BPF programs passed, per endpoint interface and direction",
                        ConstCounter::new(c.allowed),
                    );
                    r.register(
                        "bpf_packets_dropped",
                        "Packets the BPF programs dropped, per endpoint interface and direction",
                        ConstCounter::new(c.dropped),
                    );
                }
            }
        }
        for (kind, n) in self.conversion_failures() {
            r.sub_registry_with_label(("kind".into(), kind.into())).register(
                "conversion_failures",
                "Objects that failed to decode or convert (their last good version, or a fail-closed form, stays enforced)",
                ConstCounter::new(n),
            );
        }
    }
}

impl Status {
    /// The BPF data plane's per-endpoint counters, read at most every
    /// [`crate::agent::BPF_COUNTERS_MAX_AGE`]; None when the BPF data plane is not running.
    fn bpf_counter_rows(&self) -> Option<std::sync::Arc<crate::agent::BpfCounterRows>> {
        let dir = self.bpf_pins.get()?;
        let mut cache = self
            .bpf_counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, rows)) = cache.as_ref()
            && at.elapsed() < crate::agent::BPF_COUNTERS_MAX_AGE
        {
            return Some(rows.clone());
        }
        let rows = match crate::dataplane::bpf::pinned_counters(dir) {
            Ok(all) => all
                .into_iter()
                .map(|(ifindex, from, to)| {
                    let iface = nix::net::if_::if_indextoname(ifindex)
                        .ok()
                        .and_then(|n| n.into_string().ok())
                        .unwrap_or_else(|| ifindex.to_string());
                    (iface, from, to)
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading the BPF counters for /metrics");
                Vec::new()
            }
        };
        let rows = std::sync::Arc::new(rows);
        *cache = Some((std::time::Instant::now(), rows.clone()));
        Some(rows)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn text(status: &Status) -> String {
        let mut r = Registry::default();
        status.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encode");
        out
    }

    #[test]
    fn wireguard_peers_and_the_tracker_sweeper_are_on_metrics_when_they_run() {
        let status = Status::default();
        assert!(
            !text(&status).contains("wireguard"),
            "nothing before routing runs"
        );
        let report = crate::routing::wireguard::Report {
            encrypted: vec!["b".into()],
            unencrypted: vec!["c".into(), "d".into()],
            new_key: false,
        };
        let _ = status
            .wireguard
            .set(Arc::new(std::sync::Mutex::new([report, Default::default()])));
        let sweeper = Arc::new(crate::dataplane::bpf::sweep::SweepStats::default());
        sweeper.entries.store(7, Ordering::Relaxed);
        sweeper.removed.store(3, Ordering::Relaxed);
        let _ = status.bpf_conntrack.set(sweeper);
        let t = text(&status);
        for line in [
            "caracal_node_wireguard_peers{family=\"ipv4\",state=\"encrypted\"} 1",
            "caracal_node_wireguard_peers{family=\"ipv4\",state=\"unencrypted\"} 2",
            "caracal_node_wireguard_peers{family=\"ipv6\",state=\"unencrypted\"} 0",
            "caracal_node_wireguard_unencrypted_peer{family=\"ipv4\",node=\"c\"} 1",
            "caracal_node_wireguard_unencrypted_peer{family=\"ipv4\",node=\"d\"} 1",
            "caracal_node_bpf_conntrack_entries 7",
            "caracal_node_bpf_conntrack_removed_total 3",
        ] {
            assert!(t.contains(line), "{line} missing from:\n{t}");
        }
    }
}
