//! The BPF programs driven through their maps directly, for the kernel-tier BPF tests: loading them in a node
//! namespace, tables that allow or deny everything, endpoint entries.

use std::path::Path;

use caracal_e2e::netns::NetNs;
use caracal_node::dataplane::bpf::tables::{Image, image};
use caracal_node::dataplane::bpf::{Endpoint, Loaded};
use caracal_policy::classify::{Entry, EntryAction, compile};
use caracal_policy::model::DataplaneModel;

/// The index of `iface` in `node`.
pub fn ifindex(node: &NetNs, iface: &str) -> u32 {
    let out = node.ip(&["-o", "link", "show", iface]).expect("link");
    out.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .expect("ifindex")
}

/// Runs `f` with the programs loaded in `node`'s namespace (a fresh load each time: maps and links are
/// found through their pins, as a restarted agent finds them).
pub fn with_loaded<T: Send + 'static>(
    node: &NetNs,
    dir: &Path,
    f: impl FnOnce(&mut Loaded) -> T + Send + 'static,
) -> T {
    let dir = dir.to_path_buf();
    node.enter(move || {
        let mut loaded = Loaded::load(&dir).expect("the verifier accepts the programs");
        f(&mut loaded)
    })
    .expect("enter the node")
}

/// A table that allows everything (no policy: the final Allow alone) or denies everything (a tier whose
/// default is Deny ahead of it).
pub fn table(allow: bool) -> Image {
    let mut entries = vec![Entry {
        rule: None,
        action: EntryAction::Allow,
        policy: None,
        tier: None,
    }];
    if !allow {
        entries.insert(
            0,
            Entry {
                rule: None,
                action: EntryAction::Deny,
                policy: None,
                tier: Some("default"),
            },
        );
    }
    image(&entries, &compile(&entries, &DataplaneModel::default())).expect("lays out")
}

/// An endpoint entry: egress and ingress tables (1 allows, 2 denies).
pub fn entry(egress: u32, ingress: u32) -> Endpoint {
    Endpoint {
        flags: 0,
        table: [egress, ingress],
        pad: 0,
    }
}
