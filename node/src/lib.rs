//! caracal-node: the per-node agent (datastore watch, calculation graph, data plane backends, routing,
//! IPAM server), and the caracal-cni, caracal-typha and caracalctl binaries.
//!
//! Its capabilities arrive with the CNI/IPAM, policy and Typha issues; the API it reads lives in
//! `caracal-crds`.
