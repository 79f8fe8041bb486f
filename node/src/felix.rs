//! FelixConfiguration as the agent honours it, typed: the `default` object and this node's `node.<name>`,
//! the per-node one winning field by field (Calico's precedence between the two), over the agent's own
//! defaults (Calico's, or the environment the DaemonSet gives). [`Felix::effective`] is pure; the agent
//! computes it again whenever either object changes and hands each part to what it configures.
//!
//! What each field does, and when a change takes effect (docs/node.md, "FelixConfiguration"):
//! - `vxlanEnabled`, `ipipEnabled` (override what the pools decide), `vxlanVNI`, `vxlanPort`, `vxlanMTU`,
//!   `vxlanMTUV6`, `ipipMTU`, `mtuIfacePattern`: routing, at its next sync;
//! - `natOutgoingAddress`, `defaultEndpointToHostAction`: the policy data plane, at its next program;
//! - `routeRefreshInterval`, `iptablesRefreshInterval`: the schedules of the full read-backs, at once;
//! - `healthEnabled`/`Host`/`Port`, `prometheusMetricsEnabled`/`Host`/`Port`: the listeners move at once;
//! - `logSeverityScreen`: at once;
//! - `bpfEnabled`, `ipv6Support`, `bpfConnectTimeLoadBalancing`: the agent restarts to apply them, as Felix
//!   does.

use std::net::IpAddr;
use std::time::Duration;

use caracal_crds::felix::{
    BpfConnectTimeLoadBalancing, EndpointToHostAction, FelixConfigurationSpec, LogSeverity,
};
use serde_json::Value;

/// Calico's default `mtuIfacePattern`: the interfaces whose smallest MTU is the host's.
pub const DEFAULT_MTU_IFACE_PATTERN: &str = "^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)";

/// Where a server listens, and whether it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    /// It runs.
    pub enabled: bool,
    /// The address (a name like `localhost` is resolved when binding; empty: every address).
    pub host: String,
    /// The port.
    pub port: u16,
}

impl Listen {
    /// The socket addresses to bind: `host:port`, every address for an empty host.
    pub fn addrs(&self) -> Vec<std::net::SocketAddr> {
        use std::net::ToSocketAddrs as _;
        let host = match self.host.as_str() {
            "" => "0.0.0.0",
            h => h,
        };
        (host, self.port)
            .to_socket_addrs()
            .map(Iterator::collect)
            .unwrap_or_default()
    }
}

/// The agent's defaults where FelixConfiguration says nothing (from its environment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Defaults {
    /// The health server.
    pub health: Listen,
    /// The metrics server.
    pub metrics: Listen,
    /// Both refresh intervals.
    pub refresh: Duration,
    /// The data plane (`CARACAL_DATAPLANE`).
    pub bpf: bool,
    /// IPv6 (an IPv6 autodetection method is set).
    pub ipv6: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            health: Listen {
                enabled: true,
                host: "localhost".into(),
                port: 9099,
            },
            metrics: Listen {
                enabled: true,
                host: String::new(),
                port: 9091,
            },
            refresh: Duration::from_secs(90),
            bpf: false,
            ipv6: false,
        }
    }
}

/// The settings in effect.
#[derive(Clone, Debug, PartialEq)]
pub struct Felix {
    /// The eBPF data plane.
    pub bpf: bool,
    /// In BPF mode, TCP Service connections get their backend at connect() (`bpfConnectTimeLoadBalancing`
    /// TCP, the default; false: Disabled).
    pub connect_time_lb: bool,
    /// IPv6 on.
    pub ipv6: bool,
    /// The IPv4 VXLAN device regardless of the pools (Some), or as they decide (None).
    pub vxlan_enabled: Option<bool>,
    /// `tunl0` regardless of the pools (Some), or as they decide (None).
    pub ipip_enabled: Option<bool>,
    /// The VNI.
    pub vxlan_vni: u32,
    /// The VXLAN port.
    pub vxlan_port: u16,
    /// The IPv4 VXLAN MTU (None: the host's less 50).
    pub vxlan_mtu: Option<u32>,
    /// The IPv6 VXLAN MTU (None: the host's less 70).
    pub vxlan_mtu_v6: Option<u32>,
    /// The IPIP MTU (None: the host's less 20).
    pub ipip_mtu: Option<u32>,
    /// Interfaces whose smallest MTU is the host MTU.
    pub mtu_iface_pattern: String,
    /// What happens to a pod's traffic to its own host.
    pub endpoint_to_host: EndpointToHostAction,
    /// The lowest severity logged.
    pub log_severity: LogSeverity,
    /// `/healthz`, `/readyz`.
    pub health: Listen,
    /// `/metrics`.
    pub metrics: Listen,
    /// Routing's full read-back.
    pub route_refresh: Duration,
    /// The policy data plane's full read-back.
    pub iptables_refresh: Duration,
    /// natOutgoing's source address instead of the interface's.
    pub nat_outgoing_address: Option<IpAddr>,
    /// WireGuard: IPv4 (`wireguardEnabled`, ...) and IPv6 (`wireguardEnabledV6`, ...).
    pub wireguard: [Wireguard; 2],
}

/// One family's WireGuard settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wireguard {
    /// Encrypt this family's pod traffic between nodes.
    pub enabled: bool,
    /// The device's name.
    pub iface: String,
    /// Its UDP port.
    pub port: u16,
    /// Its MTU (None: the host's less 60 for IPv4, 80 for IPv6).
    pub mtu: Option<u32>,
}

/// The WireGuard devices' default names: Calico's `wireguard.cali` made Caracal's would be
/// `wireguard.caracal`, two characters over the kernel's 15-character limit on interface names, so the
/// devices are named as the VXLAN ones are (`vxlan.caracal`, `vxlan6.caracal`).
pub const WIREGUARD_IFACE: [&str; 2] = ["wg.caracal", "wg6.caracal"];
/// Calico's default WireGuard ports.
pub const WIREGUARD_PORT: [u16; 2] = [51820, 51821];

/// A FelixConfiguration that does not parse (the webhook and the CRD's schema refuse these; a value that
/// gets past them is reported and the field keeps its default).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("FelixConfiguration: {message}")]
pub struct FelixError {
    /// What is wrong, naming the field.
    pub message: String,
}

/// Parses a Go-style duration (`90s`, `1m30s`, `500ms`, `1.5h`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[u..];
    }
    Duration::try_from_secs_f64(total).ok()
}

impl Felix {
    /// The settings from `default` and `node` (either may be absent) over `defaults`. A field that does not
    /// parse keeps its default and is reported; the others apply.
    pub fn effective(
        default: Option<&Value>,
        node: Option<&Value>,
        defaults: &Defaults,
    ) -> (Felix, Vec<FelixError>) {
        let mut errors = Vec::new();
        // Field by field: the per-node object's fields over the default's.
        let mut merged = serde_json::Map::new();
        for obj in [default, node].into_iter().flatten() {
            for (k, v) in obj["spec"].as_object().into_iter().flatten() {
                if !v.is_null() {
                    merged.insert(k.clone(), v.clone());
                }
            }
        }
        let spec: FelixConfigurationSpec = match serde_json::from_value(Value::Object(merged.clone())) {
            Ok(s) => s,
            Err(e) => {
                errors.push(FelixError {
                    message: format!("{e}: every field keeps its default"),
                });
                FelixConfigurationSpec::default()
            }
        };
        let mtu = |v: Option<i32>| v.and_then(|m| u32::try_from(m).ok()).filter(|m| *m > 0);
        let mut duration =
            |field: &str, v: &Option<caracal_crds::schema::Duration>, default: Duration| match v {
                None => default,
                Some(d) => parse_duration(&d.0).filter(|d| !d.is_zero()).unwrap_or_else(|| {
                    errors.push(FelixError {
                        message: format!(
                            "{field}: {:?} is not a duration (write 90s, 1m30s): kept {default:?}",
                            d.0
                        ),
                    });
                    default
                }),
            };
        let route_refresh = duration(
            "routeRefreshInterval",
            &spec.route_refresh_interval,
            defaults.refresh,
        );
        let iptables_refresh = duration(
            "iptablesRefreshInterval",
            &spec.iptables_refresh_interval,
            defaults.refresh,
        );
        let nat_outgoing_address = spec
            .nat_outgoing_address
            .as_deref()
            .and_then(|a| match a.parse() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    errors.push(FelixError {
                        message: format!(
                            "natOutgoingAddress: {a:?} is not an IP address: masquerading instead"
                        ),
                    });
                    None
                }
            });
        let felix = Felix {
            bpf: spec.bpf_enabled.unwrap_or(defaults.bpf),
            connect_time_lb: spec.bpf_connect_time_load_balancing
                != Some(BpfConnectTimeLoadBalancing::Disabled),
            ipv6: spec.ipv6_support.unwrap_or(true) && defaults.ipv6,
            vxlan_enabled: spec.vxlan_enabled,
            ipip_enabled: spec.ipip_enabled,
            vxlan_vni: spec.vxlan_vni.unwrap_or(crate::routing::DEFAULT_VNI),
            vxlan_port: spec.vxlan_port.unwrap_or(crate::routing::DEFAULT_PORT),
            vxlan_mtu: mtu(spec.vxlan_mtu),
            vxlan_mtu_v6: mtu(spec.vxlan_mtu_v6),
            ipip_mtu: mtu(spec.ipip_mtu),
            mtu_iface_pattern: spec
                .mtu_iface_pattern
                .clone()
                .unwrap_or_else(|| DEFAULT_MTU_IFACE_PATTERN.to_owned()),
            endpoint_to_host: spec
                .default_endpoint_to_host_action
                .unwrap_or(EndpointToHostAction::Drop),
            log_severity: spec.log_severity_screen.unwrap_or(LogSeverity::Info),
            health: Listen {
                enabled: spec.health_enabled.unwrap_or(defaults.health.enabled),
                host: spec
                    .health_host
                    .clone()
                    .unwrap_or_else(|| defaults.health.host.clone()),
                port: spec.health_port.unwrap_or(defaults.health.port),
            },
            metrics: Listen {
                enabled: spec
                    .prometheus_metrics_enabled
                    .unwrap_or(defaults.metrics.enabled),
                host: spec
                    .prometheus_metrics_host
                    .clone()
                    .unwrap_or_else(|| defaults.metrics.host.clone()),
                port: spec.prometheus_metrics_port.unwrap_or(defaults.metrics.port),
            },
            route_refresh,
            iptables_refresh,
            nat_outgoing_address,
            wireguard: [
                Wireguard {
                    enabled: spec.wireguard_enabled.unwrap_or(false),
                    iface: spec
                        .wireguard_interface_name
                        .clone()
                        .unwrap_or_else(|| WIREGUARD_IFACE[0].to_owned()),
                    port: spec.wireguard_listening_port.unwrap_or(WIREGUARD_PORT[0]),
                    mtu: mtu(spec.wireguard_mtu),
                },
                Wireguard {
                    enabled: spec.wireguard_enabled_v6.unwrap_or(false),
                    iface: spec
                        .wireguard_interface_name_v6
                        .clone()
                        .unwrap_or_else(|| WIREGUARD_IFACE[1].to_owned()),
                    port: spec.wireguard_listening_port_v6.unwrap_or(WIREGUARD_PORT[1]),
                    mtu: mtu(spec.wireguard_mtu_v6),
                },
            ],
        };
        (felix, errors)
    }

    /// `defaultEndpointToHostAction` as the policy data plane's model has it.
    pub fn endpoint_to_host_model(&self) -> caracal_policy::model::EndpointToHost {
        use caracal_policy::model::EndpointToHost;
        match self.endpoint_to_host {
            EndpointToHostAction::Drop => EndpointToHost::Drop,
            EndpointToHostAction::Return => EndpointToHost::Return,
            EndpointToHostAction::Accept => EndpointToHost::Accept,
        }
    }

    /// What needs the agent restarted to change (Felix restarts itself for these).
    pub fn restart_key(&self) -> RestartKey {
        RestartKey {
            bpf: self.bpf,
            ipv6: self.ipv6,
            // Only the BPF data plane has it: in iptables mode a change restarts nothing.
            connect_time_lb: self.bpf && self.connect_time_lb,
        }
    }
}

/// The settings the agent applies only when it starts (see [`Felix::restart_key`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartKey {
    /// `bpfEnabled`.
    pub bpf: bool,
    /// `ipv6Support` (with an IPv6 autodetection method).
    pub ipv6: bool,
    /// BPF mode with `bpfConnectTimeLoadBalancing` not Disabled.
    pub connect_time_lb: bool,
}

/// The tracing filter directive for a severity (`Fatal` logs errors: Rust has no level above).
pub fn log_directive(s: LogSeverity) -> &'static str {
    match s {
        LogSeverity::Debug => "debug",
        LogSeverity::Info => "info",
        LogSeverity::Warning => "warn",
        LogSeverity::Error | LogSeverity::Fatal => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn durations_parse_as_go_writes_them() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("5d"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn nothing_set_gives_calicos_defaults_and_the_environments() {
        let d = Defaults {
            bpf: true,
            ipv6: true,
            ..Defaults::default()
        };
        let (f, errors) = Felix::effective(None, None, &d);
        assert!(errors.is_empty());
        assert!(f.bpf && f.ipv6);
        assert_eq!((f.vxlan_vni, f.vxlan_port), (4096, 4789));
        assert_eq!(f.endpoint_to_host, EndpointToHostAction::Drop);
        assert_eq!(f.log_severity, LogSeverity::Info);
        assert_eq!(f.health, d.health);
        assert_eq!(f.metrics.port, 9091);
        assert_eq!(
            f.metrics.host, "",
            "metrics on every address: scraped from off the node"
        );
        assert_eq!(f.route_refresh, Duration::from_secs(90));
        assert_eq!(f.mtu_iface_pattern, DEFAULT_MTU_IFACE_PATTERN);
        assert!(f.connect_time_lb, "bpfConnectTimeLoadBalancing: TCP by default");
    }

    #[test]
    fn connect_time_load_balancing_restarts_the_agent_only_in_bpf_mode() {
        let off = json!({"spec": {"bpfConnectTimeLoadBalancing": "Disabled"}});
        let tcp = json!({"spec": {"bpfConnectTimeLoadBalancing": "TCP"}});
        for bpf in [false, true] {
            let d = Defaults {
                bpf,
                ..Defaults::default()
            };
            let (f_off, errors) = Felix::effective(Some(&off), None, &d);
            assert!(errors.is_empty() && !f_off.connect_time_lb);
            let (f_tcp, _) = Felix::effective(Some(&tcp), None, &d);
            assert!(f_tcp.connect_time_lb);
            assert_eq!(
                f_off.restart_key() != f_tcp.restart_key(),
                bpf,
                "bpf {bpf}: a change restarts the agent only where it applies"
            );
        }
    }

    #[test]
    fn the_node_object_wins_field_by_field_over_default() {
        let default = json!({"spec": {
            "vxlanVNI": 5000, "prometheusMetricsPort": 9191, "logSeverityScreen": "Debug",
            "routeRefreshInterval": "30s", "natOutgoingAddress": "192.0.2.9", "ipv6Support": false
        }});
        let node = json!({"spec": {"prometheusMetricsPort": 9292, "defaultEndpointToHostAction": "Accept", "iptablesRefreshInterval": "1m"}});
        let d = Defaults {
            ipv6: true,
            ..Defaults::default()
        };
        let (f, errors) = Felix::effective(Some(&default), Some(&node), &d);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(f.vxlan_vni, 5000, "from default");
        assert_eq!(f.metrics.port, 9292, "the node's wins");
        assert_eq!(f.endpoint_to_host, EndpointToHostAction::Accept);
        assert_eq!(f.log_severity, LogSeverity::Debug);
        assert_eq!(f.route_refresh, Duration::from_secs(30));
        assert_eq!(f.iptables_refresh, Duration::from_secs(60));
        assert_eq!(f.nat_outgoing_address, Some("192.0.2.9".parse().unwrap()));
        assert!(!f.ipv6, "ipv6Support false turns IPv6 off");
        assert_ne!(f.restart_key(), Felix::effective(None, None, &d).0.restart_key());
    }

    #[test]
    fn a_value_past_the_schema_that_does_not_parse_keeps_its_default_and_is_reported() {
        let default =
            json!({"spec": {"routeRefreshInterval": "soon", "natOutgoingAddress": "nope", "vxlanVNI": 7}});
        let (f, errors) = Felix::effective(Some(&default), None, &Defaults::default());
        assert_eq!(f.route_refresh, Duration::from_secs(90));
        assert_eq!(f.nat_outgoing_address, None);
        assert_eq!(f.vxlan_vni, 7, "the other fields apply");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().any(|e| e.contains("routeRefreshInterval")),
            "{text:?}"
        );
        assert!(text.iter().any(|e| e.contains("natOutgoingAddress")), "{text:?}");
    }
}
