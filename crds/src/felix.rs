//! `FelixConfiguration`: the node agent's settings. `default` applies to every node; `node.<name>` to one.
//!
//! The operator owns a few of these fields (by server-side apply, field manager `caracal-operator`); every
//! other field is the user's and stays as the user set it. The agent honours every field it accepts
//! (`caracal_node::felix`); Calico's fields Caracal does not implement stay in the schema only to be refused,
//! by a rule naming the field and why, whatever field validation the client asks for (an unknown field would
//! be pruned silently for a client that does not ask for strict validation).

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use serde_with::skip_serializing_none;

use crate::schema::{Duration, mtu_schema, port_number_schema};

/// A host port the agent keeps open whatever the policy says.
#[skip_serializing_none]
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
pub struct ProtoPort {
    /// `TCP`, `UDP` or `SCTP`.
    #[x_kube(validation = Rule::new("self in ['TCP', 'UDP', 'SCTP']").message("protocol must be TCP, UDP or SCTP"))]
    pub protocol: String,
    /// The port number.
    #[schemars(schema_with = "port_number_schema")]
    pub port: u16,
    /// Limit the exception to this network (a CIDR).
    pub net: Option<crate::schema::Cidr>,
}

/// What happens to traffic from a workload to its own host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum EndpointToHostAction {
    /// Drop it (Calico's default).
    Drop,
    /// Hand it to the host's own INPUT rules.
    Return,
    /// Accept it.
    Accept,
}

/// Log levels, as Calico names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum LogSeverity {
    /// Everything.
    Debug,
    /// Normal operation.
    Info,
    /// Warnings and worse.
    Warning,
    /// Errors and worse.
    Error,
    /// Fatal errors only.
    Fatal,
}

/// Which iptables backend to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum IptablesBackend {
    /// Legacy (x_tables) iptables.
    Legacy,
    /// iptables-nft.
    NFT,
    /// Detect from the host.
    Auto,
}

/// Whether rules are inserted before or appended after other software's rules in the built-in chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ChainInsertMode {
    /// Insert Caracal's jump first.
    Insert,
    /// Append Caracal's jump last.
    Append,
}

/// The nftables data plane switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum NftablesMode {
    /// Use nftables.
    Enabled,
    /// Do not use nftables.
    Disabled,
    /// Use nftables when the host's iptables is iptables-nft.
    Auto,
}

/// Where the BPF data plane gives a Service connection its backend (Calico's `bpfConnectTimeLoadBalancing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum BpfConnectTimeLoadBalancing {
    /// TCP connections at `connect()` (the socket gets the backend; no per-packet translation), UDP per
    /// packet. The default.
    TCP,
    /// TCP and UDP at `connect()`/`sendmsg()`: refused (not implemented).
    Enabled,
    /// Every Service connection translated per packet by the interface programs.
    Disabled,
}

/// Settings of the node agent (Felix in Calico).
#[skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "caracal.dev",
    version = "v1",
    kind = "FelixConfiguration",
    shortname = "felixconfig",
    category = "caracal",
    derive = "PartialEq",
    printcolumn(name = "BPF", type_ = "boolean", json_path = ".spec.bpfEnabled"),
    printcolumn(name = "WireGuard", type_ = "boolean", json_path = ".spec.wireguardEnabled"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct FelixConfigurationSpec {
    /// Use the eBPF data plane instead of iptables.
    pub bpf_enabled: Option<bool>,
    /// Calico's nftables data plane switch: refused (not implemented).
    #[x_kube(validation = Rule::new("false").message("nftablesMode is not implemented by Caracal (this release has no nftables data plane): remove it"))]
    pub nftables_mode: Option<NftablesMode>,
    /// BPF mode: where Service connections get their backend (TCP when unset: TCP connections at connect(),
    /// the rest per packet). The agent restarts to apply a change.
    #[x_kube(validation = Rule::new("self != 'Enabled'").message("bpfConnectTimeLoadBalancing: Enabled (TCP and UDP at connect time) is not implemented by Caracal (UDP Service traffic is translated per packet): set TCP or Disabled"))]
    pub bpf_connect_time_load_balancing: Option<BpfConnectTimeLoadBalancing>,
    /// Calico's BPF program log level: refused (not implemented).
    #[schemars(length(max = 8))]
    #[x_kube(validation = Rule::new("false").message("bpfLogLevel is not implemented by Caracal (the BPF programs have no log output to set): remove it"))]
    pub bpf_log_level: Option<String>,
    /// Calico's pattern of host interfaces for BPF programs: refused (not implemented).
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("false").message("bpfDataIfacePattern is not implemented by Caracal (the BPF data plane finds the node's interface by its address): remove it"))]
    pub bpf_data_iface_pattern: Option<String>,
    /// Calico's choice of iptables: refused (not implemented).
    #[x_kube(validation = Rule::new("false").message("iptablesBackend is not implemented by Caracal (Caracal drives the host's iptables command as it is): remove it"))]
    pub iptables_backend: Option<IptablesBackend>,
    /// Calico's insert-or-append of its hooks: refused (not implemented).
    #[x_kube(validation = Rule::new("false").message("chainInsertMode is not implemented by Caracal (Caracal always inserts its hooks first): remove it"))]
    pub chain_insert_mode: Option<ChainInsertMode>,
    /// Calico's pod interface prefix: refused (not implemented).
    #[schemars(length(max = 8))]
    #[x_kube(validation = Rule::new("false").message("interfacePrefix is not implemented by Caracal (pod interfaces are always named crc followed by a hash): remove it"))]
    pub interface_prefix: Option<String>,
    /// Encrypt IPv4 pod traffic between nodes with WireGuard (the userspace device where the kernel has no
    /// WireGuard module).
    pub wireguard_enabled: Option<bool>,
    /// Encrypt IPv6 pod traffic between nodes with WireGuard.
    #[serde(rename = "wireguardEnabledV6")]
    pub wireguard_enabled_v6: Option<bool>,
    /// WireGuard IPv4 interface name.
    #[schemars(length(max = 15))]
    pub wireguard_interface_name: Option<String>,
    /// WireGuard IPv6 interface name.
    #[serde(rename = "wireguardInterfaceNameV6")]
    #[schemars(length(max = 15))]
    pub wireguard_interface_name_v6: Option<String>,
    /// WireGuard IPv4 UDP port (51820 when unset).
    #[serde(default)]
    #[schemars(schema_with = "port_number_schema")]
    pub wireguard_listening_port: Option<u16>,
    /// WireGuard IPv6 UDP port (51821 when unset).
    #[serde(rename = "wireguardListeningPortV6")]
    #[serde(default)]
    #[schemars(schema_with = "port_number_schema")]
    pub wireguard_listening_port_v6: Option<u16>,
    /// WireGuard IPv4 MTU; detected when unset.
    #[serde(rename = "wireguardMTU")]
    #[serde(default)]
    #[schemars(schema_with = "mtu_schema")]
    pub wireguard_mtu: Option<i32>,
    /// WireGuard IPv6 MTU; detected when unset.
    #[serde(rename = "wireguardMTUV6")]
    #[serde(default)]
    #[schemars(schema_with = "mtu_schema")]
    pub wireguard_mtu_v6: Option<i32>,
    /// Program VXLAN (otherwise derived from the IP pools).
    pub vxlan_enabled: Option<bool>,
    /// VXLAN network identifier (4096 when unset).
    #[serde(rename = "vxlanVNI")]
    #[schemars(range(min = 1, max = 16_777_215))]
    pub vxlan_vni: Option<u32>,
    /// VXLAN UDP port (4789 when unset).
    #[serde(default)]
    #[schemars(schema_with = "port_number_schema")]
    pub vxlan_port: Option<u16>,
    /// VXLAN IPv4 device MTU; detected when unset.
    #[serde(rename = "vxlanMTU")]
    #[serde(default)]
    #[schemars(schema_with = "mtu_schema")]
    pub vxlan_mtu: Option<i32>,
    /// VXLAN IPv6 device MTU; detected when unset.
    #[serde(rename = "vxlanMTUV6")]
    #[serde(default)]
    #[schemars(schema_with = "mtu_schema")]
    pub vxlan_mtu_v6: Option<i32>,
    /// Program IPIP (otherwise derived from the IP pools).
    pub ipip_enabled: Option<bool>,
    /// IPIP device MTU; detected when unset.
    #[serde(rename = "ipipMTU")]
    #[serde(default)]
    #[schemars(schema_with = "mtu_schema")]
    pub ipip_mtu: Option<i32>,
    /// Regular expression of host interfaces whose MTU the agent reads to compute pod MTUs.
    #[serde(rename = "mtuIfacePattern")]
    #[schemars(length(max = 256))]
    pub mtu_iface_pattern: Option<String>,
    /// Calico's inbound failsafe ports: refused (not implemented).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("false").message("failsafeInboundHostPorts is not implemented by Caracal (Caracal has no host endpoint policy for failsafe ports to open): remove it"))]
    pub failsafe_inbound_host_ports: Option<Vec<ProtoPort>>,
    /// Calico's outbound failsafe ports: refused (not implemented).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("false").message("failsafeOutboundHostPorts is not implemented by Caracal (Caracal has no host endpoint policy for failsafe ports to open): remove it"))]
    pub failsafe_outbound_host_ports: Option<Vec<ProtoPort>>,
    /// Workload-to-host traffic handling.
    pub default_endpoint_to_host_action: Option<EndpointToHostAction>,
    /// Lowest severity the agent logs.
    pub log_severity_screen: Option<LogSeverity>,
    /// Serve /healthz and /readyz.
    pub health_enabled: Option<bool>,
    /// Address the health server listens on.
    #[schemars(length(max = 64))]
    pub health_host: Option<String>,
    /// Port of the health server (9099 when unset).
    #[serde(default)]
    #[schemars(schema_with = "port_number_schema")]
    pub health_port: Option<u16>,
    /// Serve Prometheus /metrics.
    pub prometheus_metrics_enabled: Option<bool>,
    /// Address the metrics server listens on (every address when unset, so Prometheus can scrape it from
    /// off the node).
    #[schemars(length(max = 64))]
    pub prometheus_metrics_host: Option<String>,
    /// Port of the metrics server (9091 when unset).
    #[serde(default)]
    #[schemars(schema_with = "port_number_schema")]
    pub prometheus_metrics_port: Option<u16>,
    /// How often routes are re-read and repaired.
    pub route_refresh_interval: Option<Duration>,
    /// How often iptables is re-read and repaired.
    pub iptables_refresh_interval: Option<Duration>,
    /// Calico's ipsets refresh: refused (not implemented; sets are read back with the rules).
    #[x_kube(validation = Rule::new("false").message("ipsetsRefreshInterval is not implemented by Caracal (sets are read back with the rules, on iptablesRefreshInterval): remove it"))]
    pub ipsets_refresh_interval: Option<Duration>,
    /// Calico's status reporting interval: refused (not implemented).
    #[x_kube(validation = Rule::new("false").message("reportingInterval is not implemented by Caracal (the agent reports through its metrics and events, not a status object): remove it"))]
    pub reporting_interval: Option<Duration>,
    /// Source address for natOutgoing traffic instead of the node's.
    #[serde(rename = "natOutgoingAddress")]
    #[schemars(length(max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("natOutgoingAddress must be an IP address"))]
    pub nat_outgoing_address: Option<String>,
    /// Program IPv6 rules and routes.
    #[serde(rename = "ipv6Support")]
    pub ipv6_support: Option<bool>,
}
