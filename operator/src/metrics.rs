//! The operator's Prometheus metrics. Label values are bounded (kinds and reasons from fixed sets), never
//! error text.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The object kind.
    pub kind: String,
}

/// A `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A CamelCase reason from a fixed set.
    pub reason: String,
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    reconciles: Counter,
    failures: Family<ReasonLabel, Counter>,
    duration: Histogram,
    applied: Family<KindLabel, Counter>,
    deleted: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            applied: Family::default(),
            deleted: Family::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric under the `caracal_operator` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("caracal_operator");
        r.register(
            "reconciles",
            "Reconciles of the Installation",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_failures",
            "Reconciles that ended Degraded or in error, by reason",
            self.failures.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            self.duration.clone(),
        );
        r.register(
            "objects_applied",
            "Objects written by server-side apply, by kind",
            self.applied.clone(),
        );
        r.register(
            "objects_deleted",
            "Objects pruned or removed, by kind",
            self.deleted.clone(),
        );
    }

    /// Counts one reconcile and its duration.
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts a failed or Degraded reconcile.
    pub fn failed(&self, reason: &str) {
        self.failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts one apply.
    pub fn object_applied(&self, kind: &str) {
        self.applied
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts one deletion.
    pub fn object_deleted(&self, kind: &str) {
        self.deleted
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .inc();
    }
}
