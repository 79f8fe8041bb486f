//! caracal-node: the per-node agent and the tools that run beside it.
//!
//! Today: [`policy`], the rule IR, its conversions from Kubernetes and Caracal policies, and the offline
//! contract evaluator behind `caracalctl policy matrix` / `explain`. The agent's datastore, calculation graph,
//! data plane backends, routing, IPAM, CNI plugin and Typha arrive with their issues.

pub mod agent;
pub mod calc;
pub mod cni;
pub mod dataplane;
pub mod datastore;
pub mod http;
pub mod ipam;
pub mod netlink;
pub mod policy;
pub mod routing;
pub mod typha;
