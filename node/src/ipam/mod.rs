//! Caracal IPAM: blocks (default /26) carved from IPPools, affine to a node, stored as `IPAMBlock` objects
//! with compare-and-swap on resourceVersion.
//!
//! - [`block`]: allocation inside one block (pure);
//! - [`allocator`]: allocation against the API (claiming blocks by atomic create, CAS writes);
//! - [`node`]: the agent's IPAM server: answers CNI requests from memory (a reserve recorded in the API plus
//!   a journal), commits to the API in the background, borrows, and garbage-collects;
//! - [`report`]: what `caracalctl ipam show` prints.

pub mod allocator;
pub mod block;
pub mod node;
pub mod report;
