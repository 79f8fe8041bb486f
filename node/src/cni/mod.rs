//! The CNI side of a node: the protocol ([`spec`]), the agent's server that the `caracal-cni` plugin
//! forwards to ([`server`]), the netlink wiring of a pod ([`wire`]), and how a pod's host-side interface
//! is named ([`host_iface`]), which the policy loop uses to find each local pod's interface.

pub mod server;
pub use caracal_cni as spec;
pub mod wire;

use sha2::{Digest, Sha256};

/// The host-side veth of pod `namespace/pod`: `crc` and 11 hex digits of a hash of `namespace.pod`
/// (14 characters, inside Linux's 15), as Calico names its `cali…` interfaces.
pub fn host_iface(namespace: &str, pod: &str) -> String {
    let digest = Sha256::digest(format!("{namespace}.{pod}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("crc{}", &hex[..11])
}

#[cfg(test)]
mod tests {
    use super::host_iface;

    #[test]
    fn names_are_stable_prefixed_and_fit_linux() {
        let a = host_iface("default", "web-0");
        assert_eq!(a, host_iface("default", "web-0"));
        assert!(a.starts_with("crc") && a.len() == 14);
        assert_ne!(a, host_iface("default", "web-1"));
        assert_ne!(
            host_iface("a", "b.c"),
            host_iface("a.b", "c").replace('x', "y") + "z"
        );
    }
}
