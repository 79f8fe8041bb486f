//! Connectivity matrices and decision explanations over a [`World`], for `caracalctl policy`.

use std::fmt::Write as _;

use serde::Serialize;

use super::eval::{Decision, Packet, evaluate};
use super::world::{Endpoint, World};

/// A port and protocol to probe, written `80/TCP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbePort {
    /// The port.
    pub port: u16,
    /// 6 (TCP), 17 (UDP) or 132 (SCTP).
    pub protocol: u8,
}

impl ProbePort {
    /// The protocol's name.
    pub fn protocol_name(&self) -> &'static str {
        match self.protocol {
            17 => "UDP",
            132 => "SCTP",
            _ => "TCP",
        }
    }
}

impl std::str::FromStr for ProbePort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
        let port = port
            .parse()
            .map_err(|_| format!("{s:?}: the port must be a number 1-65535, as in 80/TCP"))?;
        let protocol = match proto.to_ascii_uppercase().as_str() {
            "TCP" => 6,
            "UDP" => 17,
            "SCTP" => 132,
            other => return Err(format!("{s:?}: protocol {other:?} is not TCP, UDP or SCTP")),
        };
        Ok(ProbePort { port, protocol })
    }
}

/// One cell of the matrix, serialized as `caracalctl policy matrix --output json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// `NS/POD` of the client.
    pub from: String,
    /// `NS/POD` of the server.
    pub to: String,
    /// Destination port.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: &'static str,
    /// Whether a new connection is allowed.
    pub allowed: bool,
}

/// The packet a new connection from `from` to `to` on `port` starts with (same address family).
pub fn packet(from: &Endpoint, to: &Endpoint, port: ProbePort) -> Option<Packet> {
    let dst = *to.ips.first()?;
    let src = *from.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4())?;
    Some(Packet {
        src,
        dst,
        protocol: port.protocol,
        src_port: Some(40000),
        dst_port: Some(port.port),
        icmp: None,
    })
}

/// Every ordered pair of distinct endpoints, for every port.
pub fn matrix(world: &World, ports: &[ProbePort]) -> Vec<Cell> {
    cells(world, ports, false)
}

/// [`matrix`], with each endpoint's cells to itself when `with_self` (what a pod reaching itself through its
/// own Service is judged by: its egress policy and its ingress policy).
pub fn cells(world: &World, ports: &[ProbePort], with_self: bool) -> Vec<Cell> {
    let mut out = Vec::new();
    for port in ports {
        for a in &world.endpoints {
            for b in &world.endpoints {
                if a.key() == b.key() && !with_self {
                    continue;
                }
                let Some(pkt) = packet(a, b, *port) else { continue };
                out.push(Cell {
                    from: a.key(),
                    to: b.key(),
                    port: port.port,
                    protocol: port.protocol_name(),
                    allowed: evaluate(world, &pkt).allowed(),
                });
            }
        }
    }
    out
}

/// One truth table per port, as the upstream Kubernetes netpol e2e suite prints them: rows are clients,
/// columns servers, `.` allowed, `X` denied, `-` the pod itself.
pub fn table(world: &World, cells: &[Cell], ports: &[ProbePort]) -> String {
    let names: Vec<String> = world.endpoints.iter().map(Endpoint::key).collect();
    let mut out = String::new();
    for port in ports {
        let _ = writeln!(out, "{}/{}:", port.port, port.protocol_name());
        let _ = writeln!(out, "-\t{}", names.join("\t"));
        for from in &names {
            let row: Vec<&str> = names
                .iter()
                .map(|to| {
                    if from == to {
                        return "-";
                    }
                    match cells.iter().find(|c| {
                        &c.from == from
                            && &c.to == to
                            && c.port == port.port
                            && c.protocol == port.protocol_name()
                    }) {
                        Some(c) if c.allowed => ".",
                        Some(_) => "X",
                        None => "?",
                    }
                })
                .collect();
            let _ = writeln!(out, "{from}\t{}", row.join("\t"));
        }
        out.push('\n');
    }
    out
}

/// The decision path of one connection, for a person.
pub fn explain(decision: &Decision) -> String {
    let mut out = String::new();
    for (label, side) in [
        ("egress (client side)", &decision.egress),
        ("ingress (server side)", &decision.ingress),
    ] {
        let _ = writeln!(
            out,
            "{label}: {}",
            side.endpoint.as_deref().unwrap_or("not an endpoint")
        );
        for s in &side.steps {
            let _ = writeln!(out, "  tier {}: policy {}: {}", s.tier, s.policy, s.what);
        }
        let _ = writeln!(
            out,
            "  => {} ({})",
            if side.allowed { "ALLOW" } else { "DENY" },
            side.reason
        );
    }
    let _ = writeln!(
        out,
        "verdict: {}",
        if decision.allowed() { "ALLOWED" } else { "DENIED" }
    );
    out
}
