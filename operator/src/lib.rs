//! caracal-operator: reconciles the `Installation` named `default` into CRDs, the caracal-node DaemonSet,
//! the caracal-typha Deployment, FelixConfiguration and IPPools, and reports status.
//!
//! - [`render`] is pure: [`render::compute`] fills defaults and checks what needs context,
//!   [`render::render`] turns the computed Installation and the cluster facts into objects.
//! - The controller (effects: server-side apply, pruning, status) builds on it.

pub mod apply;
pub mod certs;
pub mod controller;
pub mod crds;
pub mod http;
pub mod install;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod status;
pub mod validate;
pub mod webhook;
