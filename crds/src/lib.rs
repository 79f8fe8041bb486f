//! Caracal's API: every CustomResource type, with the schema and CEL rules the API server enforces.
//!
//! - `operator.caracal.dev/v1`: [`installation::Installation`], [`imageset::ImageSet`].
//! - `caracal.dev/v1`: [`ippool::IPPool`], [`felix::FelixConfiguration`], [`policy::GlobalNetworkPolicy`],
//!   [`policy::NetworkPolicy`], [`policy::Tier`], [`networkset::GlobalNetworkSet`],
//!   [`networkset::NetworkSet`], [`bgp::BGPConfiguration`], [`bgp::BGPPeer`], [`ipam::IPAMBlock`],
//!   [`ipam::BlockAffinity`], [`ipam::IPAMHandle`], [`ipam::IPAMConfiguration`].
//!
//! Field names follow Calico's (operator.tigera.io/v1 and projectcalico.org/v3), so a Calico manifest
//! converts by changing its apiVersion. [`crdgen`] turns the types into the committed CRD manifests.

#![expect(
    clippy::duplicated_attributes,
    reason = "kube's printcolumn(..) repeats `type_ = ` once per column, which this lint reads as a duplicate"
)]

pub mod bgp;
pub mod crdgen;
pub mod felix;
pub mod imageset;
pub mod installation;
pub mod ipam;
pub mod ippool;
pub mod networkset;
pub mod policy;
pub mod schema;
pub mod selector;
