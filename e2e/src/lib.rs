//! Caracal's end-to-end support: the real upstream control plane on loopback for cluster-tier tests and
//! the lab, started from the binaries `make controlplane` builds out of `e2e/controlplane/`.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let cp = caracal_e2e::controlplane::ControlPlane::start(Default::default()).await?;
//! let client = cp.client().await?;
//! # Ok(()) }
//! ```

pub mod capture;
pub mod cluster;
pub mod cni;
pub mod controlplane;
pub mod crds;
pub mod kubelet;
pub mod kubeproxy;
pub mod lab;
pub mod measure;
pub mod netns;
pub mod objects;
pub mod oci;
pub mod olm;
pub mod pki;
pub mod podspec;
pub mod probe;
pub mod process;
pub mod realnode;
