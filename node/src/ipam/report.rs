//! `caracalctl ipam show`: pools, their blocks, and how full they are.

use std::fmt::Write as _;

use caracal_crds::ipam::IPAMBlock;
use caracal_crds::ippool::IPPool;
use kube::ResourceExt;

fn count(cidr: ipnet::IpNet) -> u128 {
    1u128 << (cidr.max_prefix_len() - cidr.prefix_len())
}

/// The report text.
pub fn report(pools: &[IPPool], blocks: &[IPAMBlock]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<20} {:>5} {:>7} {:>10} {:>10}",
        "POOL", "CIDR", "BLOCK", "BLOCKS", "IN USE", "ADDRESSES"
    );
    let mut pools: Vec<&IPPool> = pools.iter().collect();
    pools.sort_by_key(|p| p.name_any());
    let used_in = |b: &IPAMBlock| b.spec.allocations.iter().filter(|a| a.is_some()).count();
    for p in &pools {
        let cidr = p.spec.cidr.0;
        let inside: Vec<&IPAMBlock> = blocks
            .iter()
            .filter(|b| cidr.contains(&b.spec.cidr.0.network()))
            .collect();
        let used: usize = inside.iter().map(|b| used_in(b)).sum();
        let block = p
            .spec
            .block_size
            .unwrap_or(if p.spec.cidr.is_ipv4() { 26 } else { 122 });
        let _ = writeln!(
            out,
            "{:<24} {:<20} {:>5} {:>7} {:>10} {:>10}",
            p.name_any(),
            cidr.to_string(),
            format!("/{block}"),
            inside.len(),
            used,
            count(cidr)
        );
    }
    // A node agent's reserve (addresses it holds to answer ADDs from memory) is shown apart from pods.
    let reserved_in = |b: &IPAMBlock| {
        b.spec
            .allocations
            .iter()
            .flatten()
            .filter(|i| {
                b.spec.attributes.get(**i as usize).is_some_and(|a| {
                    a.handle_id
                        .as_deref()
                        .is_some_and(|h| h.starts_with("caracal-reserve."))
                })
            })
            .count()
    };
    let _ = writeln!(
        out,
        "\n{:<24} {:<24} {:>10} {:>9}",
        "BLOCK", "AFFINITY", "IN USE", "RESERVED"
    );
    let mut sorted: Vec<&IPAMBlock> = blocks.iter().collect();
    sorted.sort_by_key(|b| b.spec.cidr);
    for b in sorted {
        let _ = writeln!(
            out,
            "{:<24} {:<24} {:>10} {:>9}",
            b.spec.cidr.to_string(),
            b.spec.affinity.clone().unwrap_or_else(|| "-".into()),
            format!("{}/{}", used_in(b), b.spec.allocations.len()),
            reserved_in(b)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::block::{Block, block_name};

    #[test]
    fn the_report_counts_blocks_and_addresses_per_pool() {
        let pool = IPPool::new(
            "default-ipv4-ippool",
            caracal_crds::ippool::IPPoolSpec {
                cidr: "10.244.0.0/16".parse().unwrap(),
                block_size: Some(26),
                vxlan_mode: None,
                ipip_mode: None,
                nat_outgoing: None,
                disabled: None,
                disable_bgp_export: None,
                node_selector: None,
                allowed_uses: vec![],
                assignment_mode: None,
            },
        );
        let mut b = Block::new("10.244.0.0/26".parse().unwrap(), Some("host:n1".into()));
        b.assign(3, "h", Default::default()).unwrap();
        b.assign(2, "caracal-reserve.n1", Default::default()).unwrap();
        let block = IPAMBlock::new(&block_name(b.cidr), b.to_spec());
        let text = report(&[pool], &[block]);
        let pool_line = text.lines().nth(1).unwrap();
        assert!(
            pool_line.starts_with("default-ipv4-ippool")
                && pool_line.contains("/26")
                && pool_line.trim_end().ends_with("65536"),
            "{text}"
        );
        assert!(
            pool_line.split_whitespace().collect::<Vec<_>>()[3..5] == ["1", "5"],
            "{text}"
        );
        let block_line = text.lines().find(|l| l.starts_with("10.244.0.0/26")).unwrap();
        assert_eq!(
            block_line.split_whitespace().collect::<Vec<_>>(),
            ["10.244.0.0/26", "host:n1", "5/64", "2"],
            "{text}"
        );
    }
}
