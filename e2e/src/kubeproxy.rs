//! The real upstream kube-proxy (built by `make controlplane` from the pinned release) on a lab node, as a
//! cluster in Calico's iptables data plane runs it: one per node, in the node's network namespace, watching
//! Services and EndpointSlices and writing its own rules (iptables, or nftables as an option) beside
//! Caracal's. Caracal's policy sees a Service's traffic after kube-proxy's DNAT, so it judges the backend pod.
//!
//! A node in BPF mode runs none: Caracal's BPF programs handle Services there, and the agent removes what a
//! kube-proxy left behind.

use std::path::Path;

use crate::controlplane::{ControlPlaneError, bin_dir, binary_from_env};
use crate::netns::NetNs;
use crate::process::{Lifetime, Supervised};

/// Which of kube-proxy's data planes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `mode: iptables` (what Calico's iptables data plane runs beside).
    Iptables,
    /// `mode: nftables`.
    Nftables,
}

impl Mode {
    /// As `KubeProxyConfiguration.mode` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "iptables" => Ok(Mode::Iptables),
            "nftables" => Ok(Mode::Nftables),
            other => Err(format!(
                "unknown kube-proxy mode {other:?}: use iptables or nftables"
            )),
        }
    }
}

/// The kube-proxy binary (`CARACAL_KUBE_PROXY` overrides).
pub fn binary() -> std::path::PathBuf {
    binary_from_env("CARACAL_KUBE_PROXY", bin_dir().join("kube-proxy"))
}

/// Its `KubeProxyConfiguration`: the node's name (so it finds its Node and address), the pods' CIDR (what
/// it treats as local traffic), and no conntrack sysctls (they are the machine's, not the node's).
fn config(node: &str, kubeconfig: &Path, cluster_cidr: &str, mode: Mode) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {node}
mode: {mode}
clusterCIDR: {cluster_cidr}
bindAddress: 0.0.0.0
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
iptables:
  minSyncPeriod: 0s
  syncPeriod: 30s
nftables:
  minSyncPeriod: 0s
  syncPeriod: 30s
"#,
        kubeconfig = kubeconfig.display(),
        mode = mode.as_str(),
    )
}

/// Starts kube-proxy for Node `node` inside `ns`, its configuration and log in `dir`.
pub fn start(
    ns: &NetNs,
    node: &str,
    kubeconfig: &Path,
    cluster_cidr: &str,
    mode: Mode,
    dir: &Path,
) -> Result<Supervised, ControlPlaneError> {
    std::fs::create_dir_all(dir).map_err(|source| ControlPlaneError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    let conf = dir.join("kube-proxy.yaml");
    std::fs::write(&conf, config(node, kubeconfig, cluster_cidr, mode)).map_err(|source| {
        ControlPlaneError::Io {
            what: format!("writing {}", conf.display()),
            source,
        }
    })?;
    let bin = binary();
    if !bin.exists() {
        return Err(crate::process::ProcessError::Missing { program: bin }.into());
    }
    let args = [
        "netns".into(),
        "exec".into(),
        ns.name().to_owned(),
        bin.display().to_string(),
        format!("--config={}", conf.display()),
        "--v=1".into(),
    ];
    Ok(Supervised::spawn(
        &format!("kube-proxy/{node}"),
        &crate::kubelet::host::ip_tool(),
        &args,
        &dir.join("kube-proxy.log"),
        Lifetime::Attached,
    )?)
}
