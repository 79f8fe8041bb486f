//! caracal-cni: the CNI plugin a container runtime starts for every pod, and the protocol it shares with the
//! node agent. This crate holds only what the plugin needs (serde and the CNI and agent-socket types): no
//! async runtime, Kubernetes client, TLS, HTTP server or netlink stack, so the plugin starts fast.
//!
//! The CNI protocol (spec 1.1.0, answering 0.3.0 to 1.1.0): the command and its environment, the network
//! configuration on stdin, results and errors as JSON, with the spec's error codes. Pure: the plugin binary
//! reads the environment and stdin and hands them here.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The IPv4 gateway every pod routes through: a link-local address the host side answers by proxy ARP.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway: the host side's EUI-64 link-local address (from [`HOST_MAC`]).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// The host side's MAC address, the same on every pod's veth.
pub const HOST_MAC: [u8; 6] = [0xee; 6];

/// The gateway of a pod address's family.
pub fn gateway(ip: &ipnet::IpNet) -> IpAddr {
    match ip {
        ipnet::IpNet::V4(_) => IpAddr::V4(GATEWAY),
        ipnet::IpNet::V6(_) => IpAddr::V6(GATEWAY_V6),
    }
}

/// Versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version results are written in when the configuration does not say.
pub const LATEST: &str = "1.1.0";

/// The spec's well-known error codes (and Caracal's, from 100).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// 1: incompatible CNI version.
    IncompatibleVersion = 1,
    /// 2: unsupported field in the network configuration.
    UnsupportedField = 2,
    /// 3: container unknown or does not exist.
    UnknownContainer = 3,
    /// 4: invalid necessary environment variables.
    InvalidEnvironment = 4,
    /// 5: I/O failure.
    IoFailure = 5,
    /// 6: failed to decode content.
    DecodeFailure = 6,
    /// 7: invalid network configuration.
    InvalidNetworkConfig = 7,
    /// 11: try again later (the node agent is not ready).
    TryAgainLater = 11,
    /// 50: the plugin is not available (STATUS: no addresses, or the agent is not ready).
    NotAvailable = 50,
    /// 100: the node agent refused the request.
    AgentRefused = 100,
}

impl Code {
    /// The code for a number received from the agent (unknown numbers become [`Code::AgentRefused`]).
    pub fn from_u32(n: u32) -> Self {
        [
            Code::IncompatibleVersion,
            Code::UnsupportedField,
            Code::UnknownContainer,
            Code::InvalidEnvironment,
            Code::IoFailure,
            Code::DecodeFailure,
            Code::InvalidNetworkConfig,
            Code::TryAgainLater,
            Code::NotAvailable,
        ]
        .into_iter()
        .find(|c| *c as u32 == n)
        .unwrap_or(Code::AgentRefused)
    }
}

/// A CNI error, written to stdout as the spec's error object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    /// The code.
    pub code: Code,
    /// A short message.
    pub msg: String,
    /// What was wrong and what to change.
    pub details: String,
}

impl CniError {
    /// A new error.
    pub fn new(code: Code, msg: &str, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.to_owned(),
            details: details.into(),
        }
    }

    /// The spec's error JSON for `version`.
    pub fn to_json(&self, version: &str) -> Value {
        serde_json::json!({"cniVersion": version, "code": self.code as u32, "msg": self.msg, "details": self.details})
    }
}

/// The operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Attach the container to the network.
    Add,
    /// Detach it (idempotent).
    Del,
    /// Verify the attachment.
    Check,
    /// Is the plugin ready to ADD?
    Status,
    /// Remove stale attachments not in the valid list.
    Gc,
    /// Which versions are supported.
    Version,
}

/// The invocation's environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// The operation.
    pub command: Command,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS` (may be empty for DEL of a vanished namespace).
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, ...).
    pub args: BTreeMap<String, String>,
}

/// Reads the environment (`get` looks a variable up), naming the variable at fault.
pub fn invocation(get: impl Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
    let command = match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("STATUS") => Command::Status,
        Some("GC") => Command::Gc,
        Some("VERSION") => Command::Version,
        other => {
            return Err(CniError::new(
                Code::InvalidEnvironment,
                "invalid CNI_COMMAND",
                format!("CNI_COMMAND is {other:?}: it must be ADD, DEL, CHECK, STATUS, GC or VERSION"),
            ));
        }
    };
    let need = |name: &str| -> Result<String, CniError> {
        get(name).filter(|v| !v.is_empty()).ok_or_else(|| {
            CniError::new(
                Code::InvalidEnvironment,
                &format!("missing {name}"),
                format!("{name} is required for {command:?}: the container runtime sets it"),
            )
        })
    };
    let per_container = matches!(command, Command::Add | Command::Del | Command::Check);
    let container_id = if per_container {
        need("CNI_CONTAINERID")?
    } else {
        get("CNI_CONTAINERID").unwrap_or_default()
    };
    let ifname = if per_container {
        need("CNI_IFNAME")?
    } else {
        get("CNI_IFNAME").unwrap_or_default()
    };
    // DEL must succeed when the namespace is already gone, so CNI_NETNS may be missing there.
    let netns = if matches!(command, Command::Add | Command::Check) {
        need("CNI_NETNS")?
    } else {
        get("CNI_NETNS").unwrap_or_default()
    };
    let mut args = BTreeMap::new();
    for pair in get("CNI_ARGS")
        .unwrap_or_default()
        .split(';')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                Code::InvalidEnvironment,
                "invalid CNI_ARGS",
                format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
            )
        })?;
        args.insert(k.to_owned(), v.to_owned());
    }
    Ok(Invocation {
        command,
        container_id,
        netns,
        ifname,
        args,
    })
}

/// The IPAM section of Caracal's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamConfig {
    /// Must be `caracal`.
    #[serde(rename = "type")]
    pub type_: String,
}

/// Caracal's network configuration (one plugin entry of a conflist, with the list's name and version).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetConf {
    /// The CNI version results are written in.
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Network name.
    pub name: String,
    /// Must be `caracal`.
    #[serde(rename = "type")]
    pub type_: String,
    /// Pod MTU; 0 means the MTU the node agent computed.
    #[serde(default)]
    pub mtu: u32,
    /// The node agent's socket.
    #[serde(default = "default_socket")]
    pub agent_socket: String,
    /// Log level.
    #[serde(default)]
    pub log_level: Option<String>,
    /// IPAM.
    pub ipam: Option<IpamConfig>,
    /// The previous plugin's result, when chained.
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
}

fn default_socket() -> String {
    "/var/run/caracal/cni.sock".into()
}

/// Parses and checks the configuration on stdin; errors name the field and what to write instead.
pub fn net_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin)
        .map_err(|e| CniError::new(Code::DecodeFailure, "invalid JSON on stdin", e.to_string()))?;
    let version = v["cniVersion"].as_str().unwrap_or_default();
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            "incompatible CNI version",
            format!(
                "cniVersion {version:?} is not supported: use one of {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let conf: NetConf = serde_json::from_value(v).map_err(|e| {
        CniError::new(
            Code::InvalidNetworkConfig,
            "invalid network configuration",
            e.to_string(),
        )
    })?;
    if conf.type_ != "caracal" {
        return Err(CniError::new(
            Code::InvalidNetworkConfig,
            "invalid network configuration",
            format!("type is {:?}: this plugin is \"caracal\"", conf.type_),
        ));
    }
    if conf.mtu != 0 && !(576..=9000).contains(&conf.mtu) {
        return Err(CniError::new(
            Code::InvalidNetworkConfig,
            "invalid network configuration",
            format!(
                "mtu {} is out of range: use 576 to 9000, or 0 for the MTU the node agent computed",
                conf.mtu
            ),
        ));
    }
    if let Some(ipam) = &conf.ipam
        && ipam.type_ != "caracal"
    {
        return Err(CniError::new(
            Code::UnsupportedField,
            "unsupported IPAM",
            format!(
                "ipam.type is {:?}: Caracal's plugin allocates with Caracal IPAM (\"caracal\")",
                ipam.type_
            ),
        ));
    }
    Ok(conf)
}

/// What the plugin sends the node agent: the invocation and the configuration, one JSON line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentRequest {
    /// `ADD`, `DEL`, `CHECK`, `STATUS` or `GC`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: BTreeMap<String, String>,
    /// The network configuration as given on stdin.
    pub conf: Value,
    /// The pod's network namespace, opened by the plugin where the runtime called it and passed beside the
    /// request line (`SCM_RIGHTS`): the agent may run in another mount namespace (as a container it does),
    /// where the runtime's `CNI_NETNS` path does not exist. None for a DEL or STATUS, or a plugin that sent
    /// none (the agent then opens `netns`).
    #[serde(skip)]
    pub netns_fd: Option<NetnsFd>,
}

/// An open network namespace passed with a request (shared: the request is cloned into the wiring).
#[derive(Clone, Debug)]
pub struct NetnsFd(pub std::sync::Arc<std::os::fd::OwnedFd>);

impl PartialEq for NetnsFd {
    fn eq(&self, other: &Self) -> bool {
        use std::os::fd::AsRawFd as _;
        self.0.as_raw_fd() == other.0.as_raw_fd()
    }
}

impl AgentRequest {
    /// The request for an invocation and its stdin.
    pub fn new(inv: &Invocation, conf: Value) -> Self {
        let command = match inv.command {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        };
        Self {
            command: command.into(),
            container_id: inv.container_id.clone(),
            netns: inv.netns.clone(),
            ifname: inv.ifname.clone(),
            args: inv.args.clone(),
            conf,
            netns_fd: None,
        }
    }
}

/// The agent's answer: a result (possibly empty) or a CNI error, one JSON line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AgentResponse {
    /// Success; the value is printed as the plugin's result (null prints nothing).
    Ok(Value),
    /// Failure with the spec's error fields.
    Error {
        /// The code.
        code: u32,
        /// Short message.
        msg: String,
        /// Details.
        details: String,
    },
}

impl From<CniError> for AgentResponse {
    fn from(e: CniError) -> Self {
        AgentResponse::Error {
            code: e.code as u32,
            msg: e.msg,
            details: e.details,
        }
    }
}

/// The `VERSION` answer.
pub fn version_json() -> Value {
    serde_json::json!({"cniVersion": LATEST, "supportedVersions": SUPPORTED_VERSIONS})
}

/// What ADD produced: the pod interface, its addresses and routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Host-side interface name.
    pub host_iface: String,
    /// Host-side MAC.
    pub host_mac: String,
    /// Container interface name.
    pub ifname: String,
    /// Container interface MAC.
    pub mac: String,
    /// The network namespace path.
    pub sandbox: String,
    /// Addresses (`10.0.0.5/32`, `fd00::5/128`).
    pub ips: Vec<ipnet::IpNet>,
}

/// The ADD result in `version`'s shape (0.3.x/0.4.0 carry `version` per IP; 1.x does not).
pub fn result_json(a: &Attachment, version: &str) -> Value {
    let legacy = version.starts_with("0.");
    let ips: Vec<Value> = a
        .ips
        .iter()
        .map(|ip| {
            let gateway = gateway(ip).to_string();
            let mut v = serde_json::json!({"address": ip.to_string(), "gateway": gateway, "interface": 1});
            if legacy {
                v["version"] = if ip.addr().is_ipv4() { "4" } else { "6" }.into();
            }
            v
        })
        .collect();
    // One default route per family, via that family's gateway.
    let mut routes = Vec::new();
    for (dst, v6) in [("0.0.0.0/0", false), ("::/0", true)] {
        if let Some(ip) = a.ips.iter().find(|i| i.addr().is_ipv6() == v6) {
            routes.push(serde_json::json!({"dst": dst, "gw": gateway(ip).to_string()}));
        }
    }
    serde_json::json!({
        "cniVersion": version,
        "interfaces": [
            {"name": a.host_iface, "mac": a.host_mac},
            {"name": a.ifname, "mac": a.mac, "sandbox": a.sandbox}
        ],
        "ips": ips,
        "routes": routes,
        "dns": {}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn the_environment_is_read_and_missing_variables_are_named() {
        let inv = invocation(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=web;K8S_POD_NAME=api-0",
            ),
        ]))
        .unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.args["K8S_POD_NAME"], "api-0");
        let err = invocation(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
        ]))
        .unwrap_err();
        assert_eq!(err.code, Code::InvalidEnvironment);
        assert!(err.details.contains("CNI_NETNS is required for Add"), "{err}");
        // DEL of a vanished namespace: no CNI_NETNS is fine.
        assert!(
            invocation(env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "abc"),
                ("CNI_IFNAME", "eth0")
            ]))
            .is_ok()
        );
        assert!(invocation(env(&[("CNI_COMMAND", "VERSION")])).is_ok());
        assert!(
            invocation(env(&[("CNI_COMMAND", "PATCH")]))
                .unwrap_err()
                .details
                .contains("ADD, DEL, CHECK, STATUS, GC or VERSION")
        );
        assert_eq!(
            invocation(env(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "a"),
                ("CNI_IFNAME", "e"),
                ("CNI_ARGS", "oops")
            ]))
            .unwrap_err()
            .code,
            Code::InvalidEnvironment
        );
    }

    #[test]
    fn configuration_errors_carry_the_spec_code_and_name_the_field() {
        let ok = br#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"caracal","mtu":0,"ipam":{"type":"caracal"}}"#;
        let conf = net_conf(ok).unwrap();
        assert_eq!(conf.agent_socket, "/var/run/caracal/cni.sock");
        let cases: [(&[u8], Code, &str); 5] = [
            (b"{not json", Code::DecodeFailure, "key must be a string"),
            (
                br#"{"cniVersion":"9.9.9","name":"n","type":"caracal"}"#,
                Code::IncompatibleVersion,
                "cniVersion \"9.9.9\" is not supported",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#,
                Code::InvalidNetworkConfig,
                "type is \"bridge\"",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","type":"caracal","mtu":100}"#,
                Code::InvalidNetworkConfig,
                "mtu 100 is out of range",
            ),
            (
                br#"{"cniVersion":"0.4.0","name":"n","type":"caracal","ipam":{"type":"host-local"}}"#,
                Code::UnsupportedField,
                "ipam.type is \"host-local\"",
            ),
        ];
        for (input, code, words) in cases {
            let err = net_conf(input).unwrap_err();
            assert_eq!(err.code, code, "{err}");
            assert!(err.details.contains(words), "{err}");
            let json = err.to_json("1.1.0");
            assert_eq!(json["code"], code as u32);
            assert!(json["msg"].is_string() && json["details"].is_string());
        }
    }

    #[test]
    fn results_take_the_shape_of_the_requested_version() {
        let a = Attachment {
            host_iface: "crc0123456789a".into(),
            host_mac: "ee:ee:ee:ee:ee:ee".into(),
            ifname: "eth0".into(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
            sandbox: "/var/run/netns/x".into(),
            ips: vec!["10.0.0.5/32".parse().unwrap(), "fd00::5/128".parse().unwrap()],
        };
        let v1 = result_json(&a, "1.1.0");
        assert_eq!(
            v1["ips"][0],
            serde_json::json!({"address": "10.0.0.5/32", "gateway": "169.254.1.1", "interface": 1})
        );
        assert_eq!(
            v1["ips"][1]["gateway"], "fe80::ecee:eeff:feee:eeee",
            "the IPv6 gateway is the host side's link-local address"
        );
        assert_eq!(
            v1["routes"][1],
            serde_json::json!({"dst": "::/0", "gw": "fe80::ecee:eeff:feee:eeee"})
        );
        assert_eq!(v1["routes"].as_array().unwrap().len(), 2);
        let v03 = result_json(&a, "0.3.1");
        assert_eq!(v03["ips"][1]["version"], "6");
        assert_eq!(version_json()["supportedVersions"].as_array().unwrap().len(), 5);
    }
}
