//! The plugin is started for every pod, so the caracal-cni package depends on what the plugin needs and
//! nothing more: no async runtime, Kubernetes client, TLS, HTTP (client or server) or netlink stack, however
//! deep in its dependencies. Read from `cargo tree`, as the build resolves it.

#![expect(
    clippy::expect_used,
    reason = "a test helper that cannot go on fails the test with the reason"
)]

use std::collections::BTreeSet;
use std::process::Command;

/// Crate names (and every crate whose name starts with `name-` or `name_`) the plugin must not link.
const FORBIDDEN: [&str; 11] = [
    "tokio",
    "kube",
    "k8s-openapi",
    "rustls",
    "openssl",
    "native-tls",
    "hyper",
    "h2",
    "axum",
    "netlink",
    "rtnetlink",
];

fn forbidden(name: &str) -> bool {
    FORBIDDEN.iter().any(|f| {
        name == *f
            || name
                .strip_prefix(f)
                .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('_'))
    })
}

/// The names of the crates `caracal-cni` links: its normal dependencies, transitively, itself included.
fn normal_dependencies() -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--locked",
            "-p",
            "caracal-cni",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("running cargo tree");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_plugin_links_no_async_runtime_kubernetes_client_tls_http_or_netlink() {
    let crates = normal_dependencies();
    assert!(
        crates.contains("caracal-cni") && crates.contains("serde_json") && crates.contains("ipnet"),
        "cargo tree did not list the plugin's own dependencies: {crates:?}"
    );
    let bad: Vec<&String> = crates.iter().filter(|c| forbidden(c)).collect();
    assert!(
        bad.is_empty(),
        "caracal-cni links {bad:?}; its dependencies are: {crates:?}"
    );
}

#[test]
fn the_forbidden_list_matches_families_not_lookalikes() {
    for name in [
        "tokio",
        "tokio-util",
        "kube-client",
        "rustls-pemfile",
        "hyper-util",
        "netlink-sys",
        "netlink-packet-route",
        "rtnetlink",
        "h2",
    ] {
        assert!(forbidden(name), "{name}");
    }
    for name in ["serde", "ipnet", "thiserror", "kubeish", "h20", "memchr"] {
        assert!(!forbidden(name), "{name}");
    }
}
