//! Caracal IPAM: blocks (default /26) carved from IPPools, affine to a node, stored as `IPAMBlock` objects
//! with compare-and-swap on resourceVersion. Today: the allocation logic inside a block ([`block`]); the
//! agent's allocator, affinity claims, borrowing and garbage collection arrive with the CNI issue.

pub mod allocator;
pub mod block;
pub mod report;
