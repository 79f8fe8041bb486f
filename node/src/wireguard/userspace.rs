//! The userspace WireGuard backend: boringtun's device (`boringtun::device`) in the agent's process, on a
//! TUN interface it creates, with worker threads of its own. The agent drives it over the WireGuard UAPI
//! protocol through one end of a socket pair (boringtun's `uapi_fd`), so several nodes' agents on one machine
//! (the lab) never share a control socket path; closing that end stops the device and removes its interface.
//!
//! The device lives as long as the agent: a restarted agent creates it again (the peers handshake again;
//! connections through it see a pause of about a handshake, not a reset). The kernel backend, where there is
//! one, keeps the device across restarts.

use std::os::fd::IntoRawFd as _;
use std::os::unix::net::UnixStream;

use super::uapi::{self, DeviceState, Peer, Settings};
use super::{Device, DeviceFactory, WgError};

/// boringtun's device, and the agent's end of its UAPI socket pair.
pub struct Userspace {
    name: String,
    uapi: UnixStream,
    /// Dropped last: stops the device's threads.
    _handle: boringtun::device::DeviceHandle,
}

impl std::fmt::Debug for Userspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Userspace")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Worker threads per device: the lab's machines have two CPUs.
const THREADS: usize = 2;

impl Userspace {
    /// Creates the device `name` (its TUN interface appears, down, with no address) in the calling thread's
    /// network namespace; its worker threads are started from this thread, so they stay in it.
    pub fn create(name: &str) -> Result<Self, WgError> {
        let create = |reason: String| WgError::Create {
            name: name.to_owned(),
            reason,
        };
        let (ours, theirs) = UnixStream::pair().map_err(|e| create(format!("a socket pair: {e}")))?;
        let config = boringtun::device::DeviceConfig {
            n_threads: THREADS,
            use_connected_socket: true,
            use_multi_queue: true,
            // boringtun owns this end from here on.
            uapi_fd: theirs.into_raw_fd(),
        };
        let handle =
            boringtun::device::DeviceHandle::new(name, config).map_err(|e| create(format!("{e:?}")))?;
        Ok(Self {
            name: name.to_owned(),
            uapi: ours,
            _handle: handle,
        })
    }
}

impl Device for Userspace {
    fn name(&self) -> &str {
        &self.name
    }

    fn state(&mut self) -> Result<DeviceState, WgError> {
        let text = uapi::exchange(&mut self.uapi, "get=1\n\n")?;
        Ok(uapi::parse_get(&text)?)
    }

    fn configure(&mut self, settings: &Settings, peers: &[Peer]) -> Result<usize, WgError> {
        let have = self.state()?;
        let requests = uapi::plan(&have, settings, peers);
        for r in &requests {
            uapi::exchange(&mut self.uapi, r)?;
        }
        Ok(requests.len())
    }
}

/// Makes [`Userspace`] devices, in the network namespace `netns` names (None: the agent's own).
#[derive(Debug, Default)]
pub struct UserspaceFactory {
    /// A named network namespace (`/run/netns/NAME`), for an agent that programs another namespace.
    pub netns: Option<std::path::PathBuf>,
}

impl DeviceFactory for UserspaceFactory {
    fn create(&mut self, name: &str) -> Result<Box<dyn Device>, WgError> {
        let name = name.to_owned();
        super::in_netns(self.netns.clone(), move || Userspace::create(&name))
            .map(|d| Box::new(d) as Box<dyn Device>)
    }
}
