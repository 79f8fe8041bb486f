//! WireGuard devices: the node's encryption backend (docs/wireguard.md). [`routing::wireguard`] decides what
//! a device should hold (the key, the port, the peers and their allowed IPs) and the routes and rule around
//! it; a [`Device`] holds it. Two implementations, chosen at runtime ([`kernel::AutoFactory`]): the kernel's
//! WireGuard ([`kernel::KernelDevice`], over generic netlink, where the `wireguard` module exists) and a
//! userspace one ([`userspace::Userspace`]: boringtun's device in the agent's process, on a TUN interface),
//! which is what this machine runs, since its kernel has no WireGuard module.
//!
//! [`routing::wireguard`]: crate::routing::wireguard

pub mod kernel;
pub mod keys;
pub mod uapi;
pub mod userspace;

use uapi::{DeviceState, Peer, Settings};

/// Errors of a WireGuard device.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    /// The device could not be created.
    #[error("creating the WireGuard device {name}: {reason}")]
    Create {
        /// Its name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Talking to it failed.
    #[error(transparent)]
    Uapi(#[from] uapi::UapiError),
    /// The key file.
    #[error(transparent)]
    Key(#[from] keys::KeyError),
}

/// A WireGuard device, as the WireGuard manager drives it.
pub trait Device: Send + Sync {
    /// Its interface's name.
    fn name(&self) -> &str;
    /// What it holds now.
    fn state(&mut self) -> Result<DeviceState, WgError>;
    /// Brings it to `settings` and `peers`, touching only what differs (an unchanged peer keeps its
    /// session); returns the number of changes sent.
    fn configure(&mut self, settings: &Settings, peers: &[Peer]) -> Result<usize, WgError>;
}

/// Makes devices: the manager asks for one when WireGuard is on and its interface is missing.
pub trait DeviceFactory: Send + Sync {
    /// A device named `name`, in the agent's network namespace.
    fn create(&mut self, name: &str) -> Result<Box<dyn Device>, WgError>;
}

/// Runs `f` on a thread of its own in the network namespace `netns` (`/run/netns/NAME`), or on the calling
/// thread when None. A device's worker threads and netlink sockets made there stay in that namespace.
pub(crate) fn in_netns<T: Send + 'static>(
    netns: Option<std::path::PathBuf>,
    f: impl FnOnce() -> Result<T, WgError> + Send + 'static,
) -> Result<T, WgError> {
    let Some(ns) = netns else { return f() };
    let failed = |reason: String| WgError::Create {
        name: "wireguard".to_owned(),
        reason,
    };
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).map_err(|e| failed(format!("opening {}: {e}", ns.display())))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| failed(format!("entering {}: {e}", ns.display())))?;
        f()
    })
    .join()
    .map_err(|_| failed("the thread making the device panicked".to_owned()))?
}
