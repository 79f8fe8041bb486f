//! A readable dump of what the BPF data plane holds for an endpoint (`caracal-node bpf dump`): its entry,
//! its two tables (each entry's action, the fields each chunk looks up), its counters and its flows, and,
//! given a packet, each table's verdict with the entry that decided, so a person can see why a packet was
//! dropped. Read from the pinned maps of a running node.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use caracal_policy::eval::Packet;

use super::tables::{self, Image};
use super::{BpfError, CtKey, Loaded};

/// Parses `PROTO SRC DST [SPORT DPORT | TYPE CODE]` (protocol `tcp`, `udp`, `sctp`, `icmp` or a number).
pub fn parse_packet(args: &[String]) -> Result<Packet, String> {
    let usage = "a packet is PROTO SRC DST [SPORT DPORT | TYPE CODE], e.g. tcp 10.0.0.1 10.0.0.2 40000 80";
    let [proto, src, dst, rest @ ..] = args else {
        return Err(usage.into());
    };
    let protocol: u8 = match proto.as_str() {
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        "icmp" => 1,
        "icmpv6" => 58,
        n => n.parse().map_err(|_| format!("protocol {n:?}: {usage}"))?,
    };
    let ip = |s: &str| s.parse::<IpAddr>().map_err(|e| format!("{s:?}: {e}"));
    let (src, dst) = (ip(src)?, ip(dst)?);
    let two = |what: &str| -> Result<Option<(u16, u16)>, String> {
        match rest {
            [] => Ok(None),
            [a, b] => Ok(Some((
                a.parse().map_err(|_| format!("{what} {a:?}: {usage}"))?,
                b.parse().map_err(|_| format!("{what} {b:?}: {usage}"))?,
            ))),
            _ => Err(usage.into()),
        }
    };
    let mut pkt = Packet {
        src,
        dst,
        protocol,
        src_port: None,
        dst_port: None,
        icmp: None,
    };
    if matches!(protocol, 6 | 17 | 132) {
        let (s, d) = two("port")?.ok_or(usage)?;
        pkt.src_port = Some(s);
        pkt.dst_port = Some(d);
    } else if matches!(protocol, 1 | 58) {
        let (t, c) = two("ICMP type/code")?.unwrap_or((8, 0));
        pkt.icmp = Some((
            u8::try_from(t).map_err(|_| usage.to_owned())?,
            u8::try_from(c).map_err(|_| usage.to_owned())?,
        ));
    }
    Ok(pkt)
}

fn addr(a: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(a);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// One flow, readable.
pub fn flow_text(k: &CtKey) -> String {
    let proto = match k.proto {
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        132 => "sctp".to_owned(),
        1 => "icmp".to_owned(),
        58 => "icmpv6".to_owned(),
        n => n.to_string(),
    };
    if matches!(k.proto, 6 | 17 | 132) {
        format!(
            "{proto} {}:{} -> {}:{}",
            addr(k.src),
            k.sport,
            addr(k.dst),
            k.dport
        )
    } else {
        format!("{proto} {} -> {}", addr(k.src), addr(k.dst))
    }
}

/// Runs of equal actions: `0-41 Deny`.
fn action_runs(image: &Image) -> Vec<String> {
    let actions = image.actions();
    let mut out = Vec::new();
    let mut i = 0;
    while i < actions.len() {
        let mut j = i;
        while j + 1 < actions.len() && actions[j + 1] == actions[i] && !actions[i].starts_with("Pass") {
            j += 1;
        }
        out.push(if i == j {
            format!("{i} {}", actions[i])
        } else {
            format!("{i}-{j} {}", actions[i])
        });
        i = j + 1;
    }
    out
}

fn fields_text(fields: u32) -> String {
    let names = [
        (tables::F_PROTO, "protocol"),
        (tables::F_ICMP, "icmp"),
        (tables::F_SADDR, "source address"),
        (tables::F_DADDR, "destination address"),
        (tables::F_SPORT, "source port"),
        (tables::F_DPORT, "destination port"),
        (tables::F_SERVICE, "service"),
    ];
    let list: Vec<&str> = names
        .iter()
        .filter(|(f, _)| fields & f != 0)
        .map(|(_, n)| *n)
        .collect();
    if list.is_empty() {
        "none (every entry matches everything)".into()
    } else {
        list.join(", ")
    }
}

/// The dump of endpoint interface `iface` (by name, in the calling thread's namespace) from the maps
/// pinned under `dir`, with the verdicts for `packet` when given.
pub fn dump(dir: &Path, iface: &str, packet: Option<&Packet>) -> Result<String, BpfError> {
    let mut loaded = Loaded::load(dir)?;
    let ifindex = nix::net::if_::if_nametoindex(iface).map_err(|e| BpfError::Attach {
        what: "finding the interface",
        iface: iface.to_owned(),
        reason: e.to_string(),
    })?;
    let mut out = String::new();
    let Some(ep) = loaded.endpoint_entries()?.get(&ifindex).copied() else {
        let _ = writeln!(
            out,
            "{iface} (ifindex {ifindex}): no endpoint entry: every packet is dropped (not programmed yet, or not a pod's interface)"
        );
        return Ok(out);
    };
    let _ = writeln!(out, "{iface} (ifindex {ifindex})");
    for (i, what) in ["egress (what the pod sends)", "ingress (what the pod receives)"]
        .iter()
        .enumerate()
    {
        let id = ep.table[i];
        let Some(image) = loaded.read_table(id)? else {
            let _ = writeln!(out, "  {what}: table {id} is missing: new flows are dropped");
            continue;
        };
        let _ = writeln!(
            out,
            "  {what}: table {id}, {} entries in {} chunk(s)",
            image.entries,
            image.chunks.len()
        );
        for (c, ch) in image.chunks.iter().enumerate() {
            let _ = writeln!(out, "    chunk {c} looks up: {}", fields_text(ch.fields));
        }
        let _ = writeln!(out, "    entries: {}", action_runs(&image).join(", "));
        if let Some(p) = packet {
            let (allowed, by, passed) = image.explain(p);
            let verdict = if allowed { "allowed" } else { "dropped" };
            let why = match by {
                Some(e) => format!("by entry {e}"),
                None => "the table is incomplete".to_owned(),
            };
            let via = if passed.is_empty() {
                String::new()
            } else {
                format!(" after passing at {passed:?}")
            };
            let _ = writeln!(out, "    packet: {verdict} {why}{via}");
        }
    }
    let (from, to) = loaded.counters(ifindex)?;
    let _ = writeln!(
        out,
        "  counters: from the pod {} allowed, {} dropped; to the pod {} allowed, {} dropped",
        from.allowed, from.dropped, to.allowed, to.dropped
    );
    let flows = loaded.flows(Some(ifindex))?;
    let _ = writeln!(out, "  flows ({}):", flows.len());
    for (k, v) in flows {
        let by = if v.table == 0 {
            "the host's own traffic".to_owned()
        } else {
            format!("table {}", v.table)
        };
        let _ = writeln!(out, "    {} (allowed by {by})", flow_text(&k));
    }
    Ok(out)
}
