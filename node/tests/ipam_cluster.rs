//! Cluster tier: the IPAM allocator against the real kube-apiserver never hands out an address twice, under
//! concurrent allocations on one node and when two nodes race for the last block of a pool.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::collections::{BTreeMap, BTreeSet};

use caracal_crds::ipam::{AffinityState, BlockAffinity, IPAMBlock};
use caracal_crds::ippool::{EncapMode, IPPool};
use caracal_node::ipam::allocator::{AllocError, Allocator};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

async fn pool(client: &Client, name: &str, cidr: &str) {
    caracal_e2e::objects::ippool(client, name, cidr, EncapMode::Never, EncapMode::Never, false)
        .await
        .expect("pool");
}

fn attrs(i: usize) -> BTreeMap<String, String> {
    BTreeMap::from([("pod".to_owned(), format!("p{i}"))])
}

#[tokio::test]
async fn concurrent_allocations_and_racing_nodes_never_share_an_address_or_a_block() {
    let (cp, client) = caracal_e2e::crds::control_plane()
        .await
        .expect("control plane with CRDs");
    let labels = BTreeMap::new();

    // 100 concurrent allocations on one node from a pool of four /26 blocks.
    pool(&client, "many", "10.50.0.0/24").await;
    let a = Allocator::new(client.clone(), "node-a");
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let a = a.clone();
            let labels = labels.clone();
            tokio::spawn(async move { a.assign(&format!("h{i}"), attrs(i), true, &labels).await })
        })
        .collect();
    let mut ips = BTreeSet::new();
    for t in tasks {
        let ip = t.await.expect("task").expect("assign");
        assert!(ips.insert(ip), "{ip} handed out twice");
    }
    assert_eq!(ips.len(), 100);
    let blocks = Api::<IPAMBlock>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("blocks");
    assert_eq!(blocks.items.len(), 2, "100 addresses fill two /26 blocks");
    assert!(
        blocks
            .iter()
            .all(|b| b.spec.affinity.as_deref() == Some("host:node-a"))
    );
    let stored: usize = blocks
        .iter()
        .map(|b| b.spec.allocations.iter().filter(|a| a.is_some()).count())
        .sum();
    assert_eq!(stored, 100, "the stored blocks hold exactly what was handed out");

    // `caracalctl ipam show` reports the pool and its two blocks, as a person would see them.
    let out = std::process::Command::new(caracal_e2e::controlplane::workspace_bin("caracalctl"))
        .env("KUBECONFIG", cp.kubeconfig())
        .args(["ipam", "show"])
        .output()
        .expect("caracalctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = text
        .lines()
        .find(|l| l.starts_with("many "))
        .expect("the pool line");
    assert_eq!(
        line.split_whitespace().collect::<Vec<_>>(),
        ["many", "10.50.0.0/24", "/26", "2", "100", "256"],
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("host:node-a")).count(),
        2,
        "{text}"
    );

    // Releasing is idempotent, and the address can be handed out again.
    let some = *ips.iter().next().expect("an address");
    assert!(a.release(some).await.expect("release"));
    assert!(!a.release(some).await.expect("release again"));

    // Two nodes race for a pool's only block, ten times over (the first pool is gone, so the race pool is
    // the only one with a free block).
    Api::<IPPool>::all(client.clone())
        .delete("many", &Default::default())
        .await
        .expect("delete pool");
    for round in 0..10 {
        let cidr = format!("10.60.{round}.0/26");
        pool(&client, &format!("race-{round}"), &cidr).await;
        let (b, c) = (
            Allocator::new(client.clone(), &format!("b{round}")),
            Allocator::new(client.clone(), &format!("c{round}")),
        );
        let (rb, rc) = tokio::join!(
            b.assign("hb", attrs(1), true, &labels),
            c.assign("hc", attrs(2), true, &labels)
        );
        let block = Api::<IPAMBlock>::all(client.clone())
            .list(&ListParams::default())
            .await
            .expect("blocks")
            .into_iter()
            .find(|blk| blk.spec.cidr.to_string() == cidr)
            .expect("the race block was created");
        let owner = block.spec.affinity.clone().expect("affinity");
        let (winner, loser) = if owner == format!("host:b{round}") {
            (&rb, &rc)
        } else {
            (&rc, &rb)
        };
        assert!(
            winner
                .as_ref()
                .is_ok_and(|ip| cidr.parse::<ipnet::IpNet>().expect("cidr").contains(ip)),
            "round {round}: the owner got an address from it: {winner:?}"
        );
        assert!(
            matches!(loser, Err(AllocError::Exhausted { .. })),
            "round {round}: the other node must not get one (no borrowing yet): {loser:?}"
        );
        let confirmed: Vec<String> = Api::<BlockAffinity>::all(client.clone())
            .list(&ListParams::default())
            .await
            .expect("affinities")
            .into_iter()
            .filter(|a| a.spec.cidr.to_string() == cidr && a.spec.state == AffinityState::Confirmed)
            .map(|a| a.spec.node.clone())
            .collect();
        assert_eq!(
            confirmed,
            vec![owner.trim_start_matches("host:").to_owned()],
            "round {round}: exactly the owner holds a confirmed affinity"
        );
        // Leave the next round a clean field: this pool is full for everyone else now.
        Api::<IPPool>::all(client.clone())
            .delete(&format!("race-{round}"), &Default::default())
            .await
            .expect("delete pool");
        let _ = block.name_any();
    }
}
