//! Helpers shared by the multi-node tests.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use caracal_node::ipam::block::Block;
use kube::api::{Api, ListParams};

/// Waits until no IPAMBlock holds `ip` any more (its pod's address was released); fails after `deadline`.
pub async fn wait_released(client: &kube::Client, ip: IpAddr, deadline: Duration) {
    let blocks = Api::<caracal_crds::ipam::IPAMBlock>::all(client.clone());
    let start = Instant::now();
    loop {
        // A failed read counts as still held: the deadline decides.
        let held = blocks.list(&ListParams::default()).await.map_or(true, |list| {
            list.items
                .iter()
                .any(|b| Block::from_spec(&b.spec).is_ok_and(|blk| blk.holder(ip).is_some()))
        });
        if !held {
            return;
        }
        assert!(
            start.elapsed() < deadline,
            "{ip} is still held after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
