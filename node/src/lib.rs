//! caracal-node: the per-node agent.
//!
//! [`agent`] is the loop: datastore updates (from the API server or Typha, `caracal_datastore`) are decoded
//! once on arrival and fed to the incremental calculation graph (`caracal_policy::calc::graph`); what
//! changed in the model goes to the policy data plane ([`dataplane`]), the only part with side effects on
//! policy. Beside it run the node's IPAM server ([`ipam`]), the agent side of CNI ([`cni`]), routing
//! ([`routing`]) and the typed netlink access they share ([`netlink`]).

pub mod agent;
pub mod cni;
pub mod dataplane;
pub mod felix;
pub mod ipam;
pub mod memory;
pub mod metrics;
pub mod netlink;
pub mod routing;
pub mod services;
pub mod typha;
pub mod wireguard;

/// The agent's state directory on the node (`CARACAL_STATE_DIR`, `/var/lib/caracal` when unset): IPAM's
/// journal, BIRD's configuration, the WireGuard keys, the pods' namespace cookies.
pub fn state_dir() -> std::path::PathBuf {
    std::env::var_os("CARACAL_STATE_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(
            || std::path::PathBuf::from("/var/lib/caracal"),
            std::path::PathBuf::from,
        )
}

/// Where the CNI wiring records each pod's network namespace cookie, for connect-time load balancing
/// (`dataplane::bpf::ctlb`).
pub fn netns_records_dir() -> std::path::PathBuf {
    state_dir().join("netns")
}
