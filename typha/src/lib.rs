//! caracal-typha: one watch on the API server, fanned out to many node agents. The snapshot plus delta log
//! ([`log`]) and the mutual-TLS server ([`server`]); the wire protocol and the client agents use live in
//! `caracal_datastore::typha`, beside the direct API watch they stand in for.

pub mod log;
pub mod server;

use std::sync::atomic::Ordering;

use caracal_datastore::http::Health;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

impl Health for server::Server {
    fn ready(&self) -> bool {
        server::Server::ready(self)
    }
    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("caracal_typha");
        let s = &self.stats;
        r.register(
            "connections",
            "Connected node agents",
            ConstGauge::new(s.connections.load(Ordering::Relaxed)),
        );
        r.register(
            "refused",
            "Clients refused (identity, protocol version)",
            ConstCounter::new(s.refused.load(Ordering::Relaxed)),
        );
        r.register(
            "dropped_clients",
            "Clients dropped for being too slow or silent",
            ConstCounter::new(s.dropped.load(Ordering::Relaxed)),
        );
        r.register(
            "updates",
            "Updates fanned out",
            ConstCounter::new(s.updates.load(Ordering::Relaxed)),
        );
        r.register(
            "snapshot_size",
            "Objects in the snapshot",
            ConstGauge::new(i64::try_from(s.snapshot.load(Ordering::Relaxed)).unwrap_or(i64::MAX)),
        );
    }
}
