//! caracal-policy: what Caracal's policy means, with no runtime, Kubernetes client or kernel dependency.
//!
//! - [`ir`]: the rule IR every backend consumes; [`convert`] turns Kubernetes NetworkPolicy and Caracal
//!   (Global)NetworkPolicy into it; [`load`] reads manifests (the same decoding the agent uses).
//! - [`world`]: what policy is evaluated over (namespaces, endpoints, service accounts, network sets, tiers).
//! - [`eval`]: the contract evaluator behind `caracalctl policy matrix / explain`, with its scenario table
//!   ([`contract`]) that every data plane backend is tested against; [`matrix`] and [`synth`] build on it.
//! - [`calc`]: the calculation graph, from the world and one node's endpoints to the [`model`] the node's
//!   data plane backends converge the kernel to. Backends depend on [`model`]; nothing here knows a backend.
//! - [`classify`]: one endpoint's tiers as a first-match list and the pieces of its lookup tables (the BPF
//!   data plane's policy as data).

pub mod calc;
pub mod classify;
pub mod contract;
pub mod convert;
pub mod decode;
pub mod eval;
pub mod ir;
pub mod labels;
pub mod load;
pub mod matrix;
pub mod model;
pub mod synth;
pub mod world;
