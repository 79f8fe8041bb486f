//! The policy data plane: backends that converge the kernel to one node's [`DataplaneModel`] (computed by
//! `caracal_policy`, which knows no backend). A backend is told what changed ([`Changes`]) and rewrites only
//! that, is idempotent and diff-based, repairs drift on a full converge, and touches only kernel objects that
//! carry Caracal's prefix.

pub mod bpf;
pub mod iptables;
pub mod nat;

/// The prefix of every kernel object Caracal owns (chains, ipsets, interfaces).
pub const PREFIX: &str = "crc";

pub use caracal_policy::calc::graph::Changes;
pub use caracal_policy::model::{
    DataplaneModel, EndpointTiers, Family, LocalEndpoint, NatOutgoing, SetKey, SetMembers, TierRef,
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
    /// Removes everything the backend created, reporting every error, except natOutgoing: its objects are
    /// the same whichever backend runs, so the backend taking over from another keeps them ([`TakeOver`]).
    fn remove_all(&mut self) -> Result<(), Vec<DataplaneError>>;
    /// What this backend must do, before its objects go, for the one taking over from it to see every flow
    /// as the kernel would (`model` is what the new one converged to).
    fn hand_over(&mut self, _model: &DataplaneModel) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Removes natOutgoing's objects (the agent's full teardown).
    fn remove_nat(&mut self) -> Vec<DataplaneError> {
        Vec::new()
    }
    /// Work that can wait until no change is pending (the iptables backend reads back what it wrote, for
    /// drift detection). The engine calls it once it has been idle a moment after a program.
    fn idle(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
}

/// natOutgoing as a backend programs it ([`nat`]): both families when IPv6 is on. A converge reads the
/// kernel back and repairs drift; an update rewrites only when the model's natOutgoing changed.
#[derive(Debug)]
pub struct NatProgram {
    exec_prefix: Vec<String>,
    families: Vec<Family>,
    last: Option<NatOutgoing>,
}

impl NatProgram {
    /// natOutgoing behind `exec_prefix`, IPv6 too when `ipv6`.
    pub fn new(exec_prefix: Vec<String>, ipv6: bool) -> Self {
        let mut families = vec![Family::V4];
        if ipv6 {
            families.push(Family::V6);
        }
        Self {
            exec_prefix,
            families,
            last: None,
        }
    }

    /// Converges the nat table to `nat` (read back); whether anything changed.
    pub fn converge(&mut self, nat: &NatOutgoing) -> Result<bool, iptables::apply::IptablesError> {
        self.last = None;
        let mut changed = false;
        for f in &self.families {
            changed |= nat::apply(&self.exec_prefix, *f, nat)?;
        }
        self.last = Some(nat.clone());
        Ok(changed)
    }

    /// Converges when `nat` differs from what was last programmed.
    pub fn update(&mut self, nat: &NatOutgoing) -> Result<bool, iptables::apply::IptablesError> {
        if self.last.as_ref() == Some(nat) {
            return Ok(false);
        }
        self.converge(nat)
    }

    /// Removes the chains and sets of every family, reporting every error.
    pub fn remove(&mut self) -> Vec<DataplaneError> {
        self.last = None;
        self.families
            .iter()
            .flat_map(|f| nat::remove(&self.exec_prefix, *f))
            .map(DataplaneError::from)
            .collect()
    }
}

/// The iptables backend of both families: `iptables` always, `ip6tables` when IPv6 is on (Felix's
/// `ipv6Support`). Each family keeps its rendering and converges on its own; the stats add up.
pub struct DualStack {
    families: Vec<iptables::apply::Iptables>,
    nat: Option<NatProgram>,
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
        Self { families, nat: None }
    }

    /// Programs natOutgoing too (what an agent's backend does; kernel tests of policy alone leave it out).
    pub fn with_nat(mut self, nat: NatProgram) -> Self {
        self.nat = Some(nat);
        self
    }
}

impl PolicyDataplane for DualStack {
    fn converge(&mut self, model: &DataplaneModel) -> Result<ApplyStats, DataplaneError> {
        let mut stats = ApplyStats::default();
        for f in &mut self.families {
            let desired = iptables::render::render_family(model, f.family());
            stats.add(&f.apply(&desired)?);
        }
        if let Some(n) = &mut self.nat {
            n.converge(&model.nat_outgoing)?;
        }
        Ok(stats)
    }

    fn update(&mut self, model: &DataplaneModel, changes: &Changes) -> Result<ApplyStats, DataplaneError> {
        let mut stats = ApplyStats::default();
        for f in &mut self.families {
            stats.add(&f.apply_changes(model, changes)?);
        }
        if let Some(n) = &mut self.nat
            && changes.nat
        {
            n.update(&model.nat_outgoing)?;
        }
        Ok(stats)
    }

    fn idle(&mut self) -> Result<(), DataplaneError> {
        for f in &mut self.families {
            f.remember()?;
        }
        Ok(())
    }

    fn remove_nat(&mut self) -> Vec<DataplaneError> {
        self.nat.as_mut().map(NatProgram::remove).unwrap_or_default()
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

/// What an agent that ran IPv6 left once IPv6 is off (`ipv6Support: false`, a restart): its `ip6tables`
/// chains and sets and IPv6 natOutgoing. Left in place they would go on judging IPv6 traffic by rules nobody
/// updates. Converging does nothing; removal is all it is for.
pub struct Ipv6Leftovers {
    exec_prefix: Vec<String>,
}

impl PolicyDataplane for Ipv6Leftovers {
    fn converge(&mut self, _model: &DataplaneModel) -> Result<ApplyStats, DataplaneError> {
        Ok(ApplyStats::default())
    }

    fn update(&mut self, _model: &DataplaneModel, _changes: &Changes) -> Result<ApplyStats, DataplaneError> {
        Ok(ApplyStats::default())
    }

    fn remove_all(&mut self) -> Result<(), Vec<DataplaneError>> {
        let mut errors: Vec<DataplaneError> =
            iptables::apply::Iptables::for_family(self.exec_prefix.clone(), Family::V6)
                .remove_all()
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(DataplaneError::from)
                .collect();
        errors.extend(
            nat::remove(&self.exec_prefix, Family::V6)
                .into_iter()
                .map(DataplaneError::from),
        );
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

/// The backend for the configured data plane (`CARACAL_DATAPLANE`, as the operator renders it), enforcing
/// IPv6 too when `ipv6`. `exec_prefix` runs the kernel tools elsewhere (a namespace, in tests); empty on a
/// node. The other backend's objects, left by an agent that ran the other data plane on this node (a live
/// switch), and without `ipv6` the IPv6 rules an agent that ran IPv6 left, are removed once the chosen one
/// has converged ([`TakeOver`]).
pub fn backend(
    dataplane: &str,
    exec_prefix: Vec<String>,
    ipv6: bool,
) -> Result<Box<dyn PolicyDataplane>, DataplaneError> {
    let nat = || NatProgram::new(exec_prefix.clone(), ipv6);
    let iptables = || Box::new(DualStack::new(exec_prefix.clone(), ipv6).with_nat(nat()));
    let bpf = || {
        Box::new(
            bpf::backend::BpfDataplane::for_node(&exec_prefix)
                .with_nat(nat())
                .with_netns_records(crate::netns_records_dir()),
        )
    };
    let mut taken_over = match dataplane {
        "Iptables" | "" => TakeOver::new(iptables(), bpf()),
        "BPF" => TakeOver::new(bpf(), iptables()),
        other => return Err(DataplaneError::Unsupported(other.to_owned())),
    };
    if !ipv6 {
        taken_over.old.push(Box::new(Ipv6Leftovers { exec_prefix }));
    }
    Ok(Box::new(taken_over))
}

/// One backend taking over from the other: the new one converges first (both enforce for that moment, so no
/// packet meets a node without policy), then everything the old one left is removed, once. Until the removal
/// succeeds it is tried again after every converge.
pub struct TakeOver {
    new: Box<dyn PolicyDataplane>,
    /// What is still to be retired, in order.
    old: Vec<Box<dyn PolicyDataplane>>,
}

impl TakeOver {
    /// `new` replacing whatever `old` left.
    pub fn new(new: Box<dyn PolicyDataplane>, old: Box<dyn PolicyDataplane>) -> Self {
        Self { new, old: vec![old] }
    }

    fn retire_old(&mut self, model: Option<&DataplaneModel>) {
        let mut kept = Vec::new();
        for mut old in std::mem::take(&mut self.old) {
            if let Some(model) = model
                && let Err(e) = old.hand_over(model)
            {
                tracing::warn!(error = %e, "handing over from the other data plane; trying again after the next converge");
                kept.push(old);
                continue;
            }
            if let Err(errors) = old.remove_all() {
                for e in &errors {
                    tracing::warn!(error = %e, "removing objects of a data plane no longer in use; trying again after the next converge");
                }
                kept.push(old);
            }
        }
        self.old = kept;
    }
}

impl PolicyDataplane for TakeOver {
    fn converge(&mut self, model: &DataplaneModel) -> Result<ApplyStats, DataplaneError> {
        let stats = self.new.converge(model)?;
        self.retire_old(Some(model));
        Ok(stats)
    }

    fn update(&mut self, model: &DataplaneModel, changes: &Changes) -> Result<ApplyStats, DataplaneError> {
        if !self.old.is_empty() {
            return self.converge(model);
        }
        self.new.update(model, changes)
    }

    fn idle(&mut self) -> Result<(), DataplaneError> {
        self.new.idle()
    }

    fn remove_all(&mut self) -> Result<(), Vec<DataplaneError>> {
        self.retire_old(None);
        self.new.remove_all()
    }

    fn remove_nat(&mut self) -> Vec<DataplaneError> {
        self.new.remove_nat()
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
