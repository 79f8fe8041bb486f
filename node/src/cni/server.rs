//! The node agent's CNI server: `caracal-cni` forwards each invocation over a unix socket (one JSON line
//! each way) and the agent does the work: IPAM from memory, the veth wiring over netlink, and the endpoint
//! becomes known to the policy loop at once.
//!
//! A pod is fail-closed from its first packet: until the policy loop has written its chains, the dispatch
//! chains' final rule drops traffic of any `crc…` interface they do not know. So ADD does not wait for an
//! iptables write (which would put tens of milliseconds into every pod start); it returns once the address
//! is journalled, the interface exists and the agent holds the endpoint.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixListener;
use tracing::{debug, warn};

use super::host_iface;
use super::spec::{self, AgentRequest, AgentResponse, Attachment, CniError, Code};
use super::wire::{self, PodWiring, Wirer};
use crate::ipam::node::{NodeIpam, attr};
use crate::netlink::{Netlink, PROTO_CARACAL};

/// How many threads wire pods ([`wire::Wirer`]): the kernel serializes most of a pod's wiring under its
/// RTNL lock, so a few threads keep it busy and the rest of the pods wait in order.
const WIRING_THREADS: usize = 4;

/// The handle of a container's allocation (Calico's `k8s-pod-network.<id>` form).
pub fn handle_of(container_id: &str) -> String {
    format!("caracal.{container_id}")
}

/// What the server works with.
#[derive(Clone)]
pub struct CniServer {
    /// IPAM.
    pub ipam: NodeIpam,
    /// Netlink in the node's namespace.
    pub node: Netlink,
    /// The pod MTU the agent computed (used when the configuration says 0).
    pub mtu: Arc<AtomicU32>,
    /// The agent's status: STATUS answers ready once it has programmed from a complete view.
    pub status: Arc<crate::agent::Status>,
    /// Where each pod's network namespace cookie is recorded when it is wired (and forgotten when it is
    /// removed), in every data plane mode, for the BPF data plane's connect-time load balancing
    /// (`dataplane::bpf::ctlb`). None: not recorded.
    pub netns_records: Option<PathBuf>,
}

/// The first bytes of a request and the network namespace the plugin passed beside them (`SCM_RIGHTS`, see
/// [`caracal_cni::AgentRequest::netns_fd`]), if any.
#[expect(
    unsafe_code,
    reason = "a descriptor received with SCM_RIGHTS becomes an OwnedFd: no safe constructor exists for one"
)]
async fn read_with_fd(
    stream: &tokio::net::UnixStream,
) -> std::io::Result<(Vec<u8>, Option<caracal_cni::NetnsFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let mut buf = vec![0u8; 64 * 1024];
    let (n, fd) = stream
        .async_io(tokio::io::Interest::READABLE, || {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fd = None;
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for raw in fds {
                        // SAFETY: the kernel just installed `raw` in this process for this message; nothing
                        // else owns it. Only the first is kept; any other is closed when dropped here.
                        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                        if fd.is_none() {
                            fd = Some(owned);
                        }
                    }
                }
            }
            Ok((msg.bytes, fd))
        })
        .await?;
    buf.truncate(n);
    Ok((buf, fd.map(|f| caracal_cni::NetnsFd(Arc::new(f)))))
}

fn refused(msg: &str, details: impl Into<String>) -> CniError {
    CniError::new(Code::AgentRefused, msg, details)
}

impl CniServer {
    /// Serves on `socket` from a thread of its own, at the wiring threads' priority, with a runtime of its
    /// own: under a burst of ADDs, the agent's shared runtime is busy with the API watches and the IPAM's
    /// writes, and every request read and answer written there waited for it (accept to answer took p50
    /// 25-31 ms where the address and the wiring took 10). The IPAM's and the API client's work still runs
    /// on the runtime that started them.
    pub fn spawn(self, socket: PathBuf) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("cni".into()).spawn(move || {
            super::wire::raise_priority();
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "the CNI server cannot start its runtime");
                    return;
                }
            };
            if let Err(e) = runtime.block_on(self.serve(socket.clone())) {
                tracing::error!(error = %e, socket = %socket.display(), "the CNI server stopped");
            }
        })
    }

    /// Serves on `socket` until the task is dropped (a stale socket file is replaced).
    pub async fn serve(self, socket: PathBuf) -> std::io::Result<()> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        let wirer = Wirer::start(self.node.netns(), WIRING_THREADS);
        loop {
            let (stream, _) = listener.accept().await?;
            let me = self.clone();
            let wirer = wirer.clone();
            tokio::spawn(async move {
                let Ok((first, netns_fd)) = read_with_fd(&stream).await else {
                    return;
                };
                let (read, mut write) = stream.into_split();
                let mut line = first;
                if !line.contains(&b'\n') && BufReader::new(read).read_until(b'\n', &mut line).await.is_err()
                {
                    return;
                }
                let response = match serde_json::from_slice::<AgentRequest>(&line) {
                    Ok(mut req) => {
                        req.netns_fd = netns_fd;
                        me.handle(&wirer, req).await
                    }
                    Err(e) => CniError::new(
                        Code::DecodeFailure,
                        "invalid request from the plugin",
                        e.to_string(),
                    )
                    .into(),
                };
                let mut out = serde_json::to_vec(&response).unwrap_or_default();
                out.push(b'\n');
                if let Err(e) = write.write_all(&out).await {
                    debug!(error = %e, "the plugin went away before the answer");
                }
            });
        }
    }

    /// Answers one request.
    pub async fn handle(&self, wirer: &Wirer, req: AgentRequest) -> AgentResponse {
        let result = match req.command.as_str() {
            "ADD" => {
                let start = std::time::Instant::now();
                let r = self.add(wirer, &req).await;
                self.status.cni_add.0.observe(start.elapsed().as_secs_f64());
                r
            }
            "DEL" => self.del(&req).await.map(|()| Value::Null),
            "CHECK" => self.check(wirer, &req).await.map(|()| Value::Null),
            "STATUS" => self.status().await.map(|()| Value::Null),
            "GC" => self.gc(&req).await.map(|()| Value::Null),
            other => Err(CniError::new(
                Code::InvalidEnvironment,
                "invalid CNI_COMMAND",
                format!("the agent does not handle {other:?}"),
            )),
        };
        match result {
            Ok(v) => AgentResponse::Ok(v),
            // A runtime asks STATUS every few hundred milliseconds while the network is not ready (containerd's
            // CRI does, to report the node's NetworkReady condition, which carries the message): not a warning.
            Err(e) if req.command == "STATUS" => {
                debug!(container = %req.container_id, error = %e, "CNI STATUS: not ready");
                e.into()
            }
            Err(e) => {
                warn!(command = %req.command, container = %req.container_id, error = %e, "CNI request failed");
                e.into()
            }
        }
    }

    fn pod_of(req: &AgentRequest) -> Result<(String, String), CniError> {
        match (req.args.get("K8S_POD_NAMESPACE"), req.args.get("K8S_POD_NAME")) {
            (Some(ns), Some(pod)) if !ns.is_empty() && !pod.is_empty() => Ok((ns.clone(), pod.clone())),
            _ => Err(CniError::new(
                Code::InvalidEnvironment,
                "missing pod identity",
                "CNI_ARGS must carry K8S_POD_NAMESPACE and K8S_POD_NAME (the kubelet sets them)",
            )),
        }
    }

    fn wiring(&self, req: &AgentRequest, ns: &str, pod: &str, ips: &[IpAddr], mtu: u32) -> PodWiring {
        PodWiring {
            host_iface: host_iface(ns, pod),
            netns: PathBuf::from(&req.netns),
            netns_fd: req.netns_fd.clone(),
            ifname: req.ifname.clone(),
            ips: ips
                .iter()
                .filter_map(|ip| ipnet::IpNet::new(*ip, if ip.is_ipv4() { 32 } else { 128 }).ok())
                .collect(),
            mtu,
            bpf_pins: self.status.bpf_pins.get().cloned(),
            netns_records: self.netns_records.clone(),
        }
    }

    async fn add(&self, wirer: &Wirer, req: &AgentRequest) -> Result<Value, CniError> {
        let conf = spec::net_conf(req.conf.to_string().as_bytes())?;
        let (ns, pod) = Self::pod_of(req)?;
        if req.netns_fd.is_none() && !Path::new(&req.netns).exists() {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                "CNI_NETNS does not exist",
                format!("CNI_NETNS {} is not a network namespace on this node", req.netns),
            ));
        }
        let handle = handle_of(&req.container_id);
        let attrs = BTreeMap::from([
            (attr::NAMESPACE.to_owned(), ns.clone()),
            (attr::POD.to_owned(), pod.clone()),
            ("containerID".to_owned(), req.container_id.clone()),
        ]);
        let t0 = std::time::Instant::now();
        let ips =
            self.ipam.assign(&handle, attrs).await.map_err(|e| {
                CniError::new(Code::TryAgainLater, "no address available", format!("IPAM: {e}"))
            })?;
        let mtu = if conf.mtu != 0 {
            conf.mtu
        } else {
            self.mtu.load(Ordering::Relaxed)
        };
        let w = self.wiring(req, &ns, &pod, &ips, mtu);
        let t1 = std::time::Instant::now();
        let wired = match wirer.add(&w).await {
            Ok(x) => x,
            Err(e) => {
                // Nothing half-done stays behind: the interface goes, the address is given back.
                let _ = wire::del(&self.node, &w.host_iface).await;
                let _ = self.ipam.release(&handle).await;
                return Err(refused("wiring the pod failed", e.to_string()));
            }
        };
        self.ipam.wired(&w.host_iface);
        debug!(
            pod = %format!("{ns}/{pod}"),
            ipam_us = (t1 - t0).as_micros() as u64,
            wire_us = t1.elapsed().as_micros() as u64,
            "ADD"
        );
        let ours = spec::result_json(
            &Attachment {
                host_iface: w.host_iface.clone(),
                host_mac: wired.host_mac,
                ifname: w.ifname.clone(),
                mac: wired.pod_mac,
                sandbox: req.netns.clone(),
                ips: w.ips.clone(),
            },
            &conf.cni_version,
        );
        Ok(match conf.prev_result {
            Some(prev) => chain(prev, ours),
            None => ours,
        })
    }

    async fn del(&self, req: &AgentRequest) -> Result<(), CniError> {
        let handle = handle_of(&req.container_id);
        // The pod's identity from what IPAM recorded, or from CNI_ARGS.
        let held = self.ipam.get(&handle).await;
        let pod = held
            .as_ref()
            .and_then(|h| {
                Some((
                    h.attrs.get(attr::NAMESPACE)?.clone(),
                    h.attrs.get(attr::POD)?.clone(),
                ))
            })
            .or_else(|| Self::pod_of(req).ok());
        if let Some((ns, pod)) = pod {
            let iface = host_iface(&ns, &pod);
            if self.serves_another_sandbox(&handle, &ns, &pod, &iface).await {
                debug!(
                    pod = %format!("{ns}/{pod}"),
                    container = %req.container_id,
                    "DEL leaves the pod's interface: it carries another sandbox's address"
                );
            } else {
                wire::del(&self.node, &iface)
                    .await
                    .map_err(|e| refused("removing the pod interface failed", e.to_string()))?;
                if let Some(dir) = &self.netns_records
                    && let Err(e) = crate::dataplane::bpf::ctlb::forget(dir, &iface)
                {
                    warn!(%iface, error = %e, "forgetting the pod's namespace cookie");
                }
            }
        }
        self.ipam
            .release(&handle)
            .await
            .map_err(|e| refused("releasing the address failed", e.to_string()))?;
        Ok(())
    }

    /// True when the interface named for pod `ns/pod` routes an address that another handle than `handle`
    /// holds for the same pod: it belongs to another sandbox of the pod, which a DEL for this one must leave.
    /// Interface names come from the pod's name, and the runtime tears sandboxes down late: the kubelet
    /// removes a sandbox whose ADD failed (or one a restarted runtime found) after the pod's next sandbox was
    /// wired, with a DEL for the old container. When the interface cannot be read, it is left (an interface
    /// left over is replaced by the pod's next ADD; one removed under a running pod cuts it off).
    async fn serves_another_sandbox(&self, handle: &str, ns: &str, pod: &str, iface: &str) -> bool {
        let others: Vec<IpAddr> = self
            .ipam
            .held()
            .await
            .into_iter()
            .filter(|(h, x)| {
                h != handle
                    && x.attrs.get(attr::NAMESPACE).map(String::as_str) == Some(ns)
                    && x.attrs.get(attr::POD).map(String::as_str) == Some(pod)
            })
            .flat_map(|(_, x)| x.ips)
            .collect();
        if others.is_empty() {
            return false;
        }
        let (link, routes) = match (self.node.link(iface).await, self.node.routes(PROTO_CARACAL).await) {
            (Ok(Some(link)), Ok(routes)) => (link, routes),
            (Ok(None), _) => return false,
            (Err(e), _) | (_, Err(e)) => {
                warn!(iface, error = %e, "DEL cannot tell whose the pod's interface is: it is left");
                return true;
            }
        };
        others
            .iter()
            .any(|ip| routes.contains(&wire::pod_route(*ip, link.header.index)))
    }

    async fn check(&self, wirer: &Wirer, req: &AgentRequest) -> Result<(), CniError> {
        let (ns, pod) = Self::pod_of(req)?;
        let handle = handle_of(&req.container_id);
        let Some(held) = self.ipam.get(&handle).await else {
            return Err(refused(
                "CHECK failed",
                format!("container {} holds no address", req.container_id),
            ));
        };
        let w = self.wiring(req, &ns, &pod, &held.ips, 0);
        match wirer.check(&w).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(refused(
                "CHECK failed",
                format!(
                    "{} or the pod's {} is missing or lacks its addresses",
                    w.host_iface, w.ifname
                ),
            )),
            Err(e) => Err(refused("CHECK failed", e.to_string())),
        }
    }

    async fn status(&self) -> Result<(), CniError> {
        if !self.status.ready.load(Ordering::Relaxed) {
            return Err(CniError::new(
                Code::NotAvailable,
                "node agent not ready",
                "caracal-node has not programmed its data plane from a complete datastore view yet",
            ));
        }
        if !self.ipam.ready().await {
            return Err(CniError::new(
                Code::NotAvailable,
                "no addresses",
                "every IPPool this node may use is exhausted: add a pool or free addresses",
            ));
        }
        Ok(())
    }

    /// CNI GC: releases every pod allocation on this node whose container is not in
    /// `cni.dev/valid-attachments`, and removes its interface.
    async fn gc(&self, req: &AgentRequest) -> Result<(), CniError> {
        let Some(valid) = req
            .conf
            .get("cni.dev/valid-attachments")
            .and_then(Value::as_array)
        else {
            return Err(CniError::new(
                Code::InvalidNetworkConfig,
                "invalid GC request",
                "cni.dev/valid-attachments must be a list of {containerID, ifname}",
            ));
        };
        let valid: std::collections::BTreeSet<String> = valid
            .iter()
            .filter_map(|a| a.get("containerID").and_then(Value::as_str))
            .map(handle_of)
            .collect();
        for (handle, h) in self.ipam.held().await {
            if !handle.starts_with("caracal.") || valid.contains(&handle) {
                continue;
            }
            if let (Some(ns), Some(pod)) = (h.attrs.get(attr::NAMESPACE), h.attrs.get(attr::POD)) {
                let _ = wire::del(&self.node, &host_iface(ns, pod)).await;
            }
            self.ipam
                .release(&handle)
                .await
                .map_err(|e| refused("GC: releasing an address failed", e.to_string()))?;
        }
        Ok(())
    }
}

/// Appends Caracal's interfaces and addresses to a previous plugin's result (chaining).
fn chain(mut prev: Value, ours: Value) -> Value {
    let offset = prev["interfaces"].as_array().map_or(0, Vec::len);
    if let Some(list) = ours["interfaces"].as_array() {
        let target = prev["interfaces"].as_array_mut();
        match target {
            Some(t) => t.extend(list.iter().cloned()),
            None => prev["interfaces"] = Value::Array(list.clone()),
        }
    }
    let mut ips: Vec<Value> = ours["ips"].as_array().cloned().unwrap_or_default();
    for ip in &mut ips {
        if let Some(i) = ip["interface"].as_u64() {
            ip["interface"] = (i + offset as u64).into();
        }
    }
    match prev["ips"].as_array_mut() {
        Some(t) => t.extend(ips),
        None => prev["ips"] = Value::Array(ips),
    }
    if let Some(routes) = ours["routes"].as_array() {
        match prev["routes"].as_array_mut() {
            Some(t) => t.extend(routes.iter().cloned()),
            None => prev["routes"] = Value::Array(routes.clone()),
        }
    }
    prev["cniVersion"] = ours["cniVersion"].clone();
    prev
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[test]
    fn chaining_appends_interfaces_and_shifts_ip_interface_indexes() {
        let prev = serde_json::json!({"cniVersion": "1.0.0", "interfaces": [{"name": "x"}], "ips": [{"address": "10.9.0.1/24", "interface": 0}]});
        let ours = serde_json::json!({"cniVersion": "1.0.0", "interfaces": [{"name": "crc1"}, {"name": "eth0"}], "ips": [{"address": "10.0.0.5/32", "interface": 1}], "routes": [{"dst": "0.0.0.0/0"}]});
        let got = chain(prev, ours);
        assert_eq!(got["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(got["ips"][1]["interface"], 2);
        assert_eq!(got["ips"][0]["address"], "10.9.0.1/24");
        assert_eq!(got["routes"][0]["dst"], "0.0.0.0/0");
    }
}
