//! The policy data plane: backends that converge the kernel to one node's [`DataplaneModel`] (computed by
//! `caracal_policy`, which knows no backend). A backend is told what changed ([`Changes`]) and rewrites only
//! that, is idempotent and diff-based, repairs drift on a full converge, and touches only kernel objects that
//! carry Caracal's prefix.

pub mod bpf;
pub mod iptables;

/// The prefix of every kernel object Caracal owns (chains, ipsets, interfaces).
pub const PREFIX: &str = "crc";

pub use caracal_policy::calc::graph::Changes;
pub use caracal_policy::model::{
    DataplaneModel, EndpointTiers, Family, LocalEndpoint, SetKey, SetMembers, TierRef,
};

/// What a backend reports about one convergence.
pub use iptables::apply::ApplyStats;

/// Errors of a policy data plane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The iptables backend failed.
    #[error(transparent)]
    Iptables(#[from] iptables::apply::IptablesError),
    /// The BPF backend failed.
    #[error(transparent)]
    Bpf(#[from] bpf::BpfError),
    /// The configured data plane is not one this build provides.
    #[error("data plane {0:?} is not available in this Caracal release: use Iptables")]
    Unsupported(String),
    /// The task programming the data plane died (a panic in a backend).
    #[error("{0}")]
    Internal(String),
}

/// A policy data plane: converges the kernel to the desired model. Implementations are idempotent,
/// diff-based, and touch only objects with Caracal's prefix.
pub trait PolicyDataplane: Send {
    /// Converges to the whole `model` after reading the kernel's state back: adopts what matches, repairs
    /// drift. At start and periodically.
    fn converge(&mut self, model: &DataplaneModel) -> Result<ApplyStats, DataplaneError>;
    /// Applies what `changes` says changed in `model` since the last converge or update, without a
    /// read-back: the fast path. After a failed call the next one converges in full.
    fn update(&mut self, model: &DataplaneModel, changes: &Changes) -> Result<ApplyStats, DataplaneError>;
    /// Removes everything the backend created, reporting every error.
    fn remove_all(&mut self) -> Result<(), Vec<DataplaneError>>;
    /// Work that can wait until no change is pending (the iptables backend reads back what it wrote, for
    /// drift detection). The engine calls it once it has been idle a moment after a program.
    fn idle(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

/// The iptables backend of both families: `iptables` always, `ip6tables` when IPv6 is on (Felix's
/// `ipv6Support`). Each family keeps its rendering and converges on its own; the stats add up.
pub struct DualStack {
    families: Vec<iptables::apply::Iptables>,
}

impl DualStack {
    /// Both families behind `exec_prefix` (IPv6 only when `ipv6`).
    pub fn new(exec_prefix: Vec<String>, ipv6: bool) -> Self {
        let mut families = vec![iptables::apply::Iptables::for_family(
            exec_prefix.clone(),
            Family::V4,
        )];
        if ipv6 {
            families.push(iptables::apply::Iptables::for_family(exec_prefix, Family::V6));
        }
        Self { families }
    }
}

impl PolicyDataplane for DualStack {
    fn converge(&mut self, model: &DataplaneModel) -> Result<ApplyStats, DataplaneError> {
        let mut stats = ApplyStats::default();
        for f in &mut self.families {
            let desired = iptables::render::render_family(model, f.family());
            stats.add(&f.apply(&desired)?);
        }
        Ok(stats)
    }

    fn update(&mut self, model: &DataplaneModel, changes: &Changes) -> Result<ApplyStats, DataplaneError> {
        let mut stats = ApplyStats::default();
        for f in &mut self.families {
            stats.add(&f.apply_changes(model, changes)?);
        }
        Ok(stats)
    }

    fn idle(&mut self) -> Result<(), DataplaneError> {
        for f in &mut self.families {
            f.remember()?;
        }
        Ok(())
    }

    fn remove_all(&mut self) -> Result<(), Vec<DataplaneError>> {
        let mut errors: Vec<DataplaneError> = Vec::new();
        for f in &mut self.families {
            if let Err(es) = f.remove_all() {
                errors.extend(es.into_iter().map(DataplaneError::from));
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

/// The backend for the configured data plane (`CARACAL_DATAPLANE`, as the operator renders it), enforcing
/// IPv6 too when `ipv6`. `exec_prefix` runs the kernel tools elsewhere (a namespace, in tests); empty on a
/// node. The other backend's objects, left by an agent that ran the other data plane on this node (a live
/// switch), are removed once the chosen one has converged ([`TakeOver`]).
pub fn backend(
    dataplane: &str,
    exec_prefix: Vec<String>,
    ipv6: bool,
) -> Result<Box<dyn PolicyDataplane>, DataplaneError> {
    let iptables = || Box::new(DualStack::new(exec_prefix.clone(), ipv6));
    let bpf = || Box::new(bpf::backend::BpfDataplane::for_node(&exec_prefix));
    match dataplane {
        "Iptables" | "" => Ok(Box::new(TakeOver::new(iptables(), bpf()))),
        "BPF" => Ok(Box::new(TakeOver::new(bpf(), iptables()))),
        other => Err(DataplaneError::Unsupported(other.to_owned())),
    }
}

/// One backend taking over from the other: the new one converges first (both enforce for that moment, so no
/// packet meets a node without policy), then everything the old one left is removed, once. Until the removal
/// succeeds it is tried again after every converge.
pub struct TakeOver {
    new: Box<dyn PolicyDataplane>,
    old: Option<Box<dyn PolicyDataplane>>,
}

impl TakeOver {
    /// `new` replacing whatever `old` left.
    pub fn new(new: Box<dyn PolicyDataplane>, old: Box<dyn PolicyDataplane>) -> Self {
        Self { new, old: Some(old) }
    }

    fn retire_old(&mut self) {
        if let Some(mut old) = self.old.take()
            && let Err(errors) = old.remove_all()
        {
            for e in &errors {
                tracing::warn!(error = %e, "removing the other data plane's objects; trying again after the next converge");
            }
            self.old = Some(old);
        }
    }
}

impl PolicyDataplane for TakeOver {
    fn converge(&mut self, model: &DataplaneModel) -> Result<ApplyStats, DataplaneError> {
        let stats = self.new.converge(model)?;
        self.retire_old();
        Ok(stats)
    }

    fn update(&mut self, model: &DataplaneModel, changes: &Changes) -> Result<ApplyStats, DataplaneError> {
        if self.old.is_some() {
            return self.converge(model);
        }
        self.new.update(model, changes)
    }

    fn idle(&mut self) -> Result<(), DataplaneError> {
        self.new.idle()
    }

    fn remove_all(&mut self) -> Result<(), Vec<DataplaneError>> {
        self.retire_old();
        self.new.remove_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_is_chosen_from_configuration() {
        assert!(backend("Iptables", vec![], true).is_ok());
        assert!(backend("BPF", vec![], true).is_ok());
        let err = backend("VPP", vec![], true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("\"VPP\" is not available") && err.contains("use Iptables"),
            "{err}"
        );
    }
}
