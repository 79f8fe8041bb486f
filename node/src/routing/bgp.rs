//! BGP through BIRD 2: the agent renders BIRD's configuration from the datastore ([`render`], pure here) and
//! runs Debian's `bird` for its node ([`super::bird::Bird`]), reconfiguring it (`birdc configure`) when the
//! configuration changes.
//!
//! What BIRD does: announce this node's blocks (a static blackhole route per block, exported to peers only),
//! peer with every other node (node-to-node mesh, unless `BGPConfiguration.nodeToNodeMeshEnabled` is false)
//! and with the peers `BGPPeer`s give it (explicit `peerIP`s, or the nodes a `peerSelector` picks, with
//! route-reflector clusters), and write only what it learns over BGP into the kernel. The static routes
//! never reach the kernel: the agent programs its own blackholes.
//!
//! IPv6, when the node has an IPv6 address: the same again over IPv6 sessions between the nodes' IPv6
//! addresses (as Calico's bird6 does), announcing the node's IPv6 blocks; one BIRD carries both.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use caracal_crds::selector;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::Value;

/// Node annotation naming the route-reflector cluster a node reflects for (Calico's
/// `routeReflectorClusterID`).
pub const RR_CLUSTER_ANNOTATION: &str = "caracal.dev/route-reflector-cluster-id";
/// Calico's default AS number.
pub const DEFAULT_AS: u32 = 64512;
/// BGP's port.
pub const DEFAULT_PORT: u16 = 179;

/// One BGP session this node wants.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// Protocol name in BIRD (unique, derived from the address).
    pub name: String,
    /// The peer's address (IPv6 for an IPv6 session).
    pub ip: IpAddr,
    /// The peer's port.
    pub port: u16,
    /// The peer's AS.
    pub asn: u32,
    /// The peer is a route-reflector client of this node (`rr client`).
    pub rr_client: bool,
    /// The peer is on this node's subnet (a direct session; otherwise multihop).
    pub direct: bool,
    /// The session's MD5 password, when its BGPPeer names one.
    pub password: Option<Password>,
}

/// A session's MD5 password: the Secret key it comes from (`BGPPeer.password.secretKeyRef`, in the agent's
/// namespace) and, once [`resolve_passwords`] read it, the text. Its `Debug` never shows the text.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Password {
    /// The BGPPeer naming it.
    pub peer: String,
    /// The Secret.
    pub secret: String,
    /// The key in the Secret.
    pub key: String,
    /// The password.
    pub value: Option<String>,
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Password")
            .field("peer", &self.peer)
            .field("secret", &self.secret)
            .field("key", &self.key)
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The Secrets the sessions of `input` take passwords from.
pub fn secret_names(input: &BgpInput) -> BTreeSet<String> {
    input
        .peers
        .iter()
        .chain(input.v6.iter().flat_map(|v6| v6.peers.iter()))
        .filter_map(|p| p.password.as_ref().map(|pw| pw.secret.clone()))
        .collect()
}

/// Reads every session's password with `lookup(secret, key)`. A session whose password cannot be read is
/// left out (never configured without the password its BGPPeer asks for); the returned list names each
/// (its peer address) with a warning that says why.
pub fn resolve_passwords(
    input: &mut BgpInput,
    lookup: impl Fn(&str, &str) -> Result<String, String>,
) -> Vec<(IpAddr, String)> {
    let mut warnings = Vec::new();
    let mut resolve = |peers: &mut Vec<Peer>| {
        peers.retain_mut(|p| {
            let Some(pw) = p.password.as_mut() else { return true };
            match lookup(&pw.secret, &pw.key) {
                Ok(v) => {
                    pw.value = Some(v);
                    true
                }
                Err(why) => {
                    warnings.push((
                        p.ip,
                        format!(
                            "BGPPeer {}: the session with {} is not configured until its password can be read: {why}",
                            pw.peer, p.ip
                        ),
                    ));
                    false
                }
            }
        });
    };
    resolve(&mut input.peers);
    if let Some(v6) = input.v6.as_mut() {
        resolve(&mut v6.peers);
    }
    warnings
}

/// Everything the configuration depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpInput {
    /// This node's address (router id and session source).
    pub router_id: Ipv4Addr,
    /// This node's subnet.
    pub subnet: Ipv4Net,
    /// This node's AS.
    pub asn: u32,
    /// The port BIRD listens on and peers use.
    pub port: u16,
    /// Blocks this node announces.
    pub blocks: BTreeSet<Ipv4Net>,
    /// The sessions.
    pub peers: Vec<Peer>,
    /// This node's route-reflector cluster id, when it is a reflector.
    pub rr_cluster: Option<Ipv4Addr>,
    /// IPv6, when the node has an IPv6 address.
    pub v6: Option<BgpV6>,
}

/// The IPv6 side of a node's BGP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpV6 {
    /// The session source.
    pub local: Ipv6Addr,
    /// IPv6 blocks this node announces.
    pub blocks: BTreeSet<Ipv6Net>,
    /// The IPv6 sessions.
    pub peers: Vec<Peer>,
}

fn labels(node: &Value) -> BTreeMap<String, String> {
    node["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
        .collect()
}

fn node_ip(node: &Value, v6: bool) -> Option<IpAddr> {
    let key = if v6 {
        super::model::annotation::IPV6_ADDRESS
    } else {
        super::model::annotation::IPV4_ADDRESS
    };
    let a = node["metadata"]["annotations"][key].as_str()?;
    a.parse::<IpNet>().ok().map(|n| n.addr())
}

/// A `BGPPeer.peerIP`: `10.0.0.1`, `10.0.0.1:179`, `fd00::1` or `[fd00::1]:179`.
fn peer_address(text: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (ip, port) = rest.split_once("]:")?;
        return Some((ip.parse().ok()?, port.parse().ok()));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some((ip, None));
    }
    let (ip, port) = text.rsplit_once(':')?;
    Some((IpAddr::V4(ip.parse().ok()?), port.parse().ok()))
}

/// The BIRD protocol name of a session (`node_10_0_0_3`, `peer_fd00__1`).
fn protocol_name(prefix: &str, ip: IpAddr) -> String {
    format!("{prefix}_{}", ip.to_string().replace(['.', ':'], "_"))
}

fn rr_cluster(node: &Value) -> Option<Ipv4Addr> {
    node["metadata"]["annotations"][RR_CLUSTER_ANNOTATION]
        .as_str()?
        .parse()
        .ok()
}

fn selects(sel: &Value, labels: &BTreeMap<String, String>) -> bool {
    match sel.as_str() {
        None => false,
        Some(text) => selector::parse(text).is_ok_and(|e| e.matches(labels)),
    }
}

/// The BGP input for node `me` from the datastore: its addresses (IPv6 when it has one), the Nodes (with
/// their published addresses), `BGPConfiguration "default"`, every `BGPPeer`, and the blocks it announces
/// (both families).
pub fn input(
    me: &str,
    my_ip: Ipv4Net,
    my_ip6: Option<Ipv6Net>,
    nodes: &BTreeMap<String, Value>,
    bgp_config: &Value,
    peers: &[Value],
    blocks: BTreeSet<IpNet>,
) -> BgpInput {
    let router_id = my_ip.addr();
    let subnet = my_ip.trunc();
    let v4_sessions = sessions(me, IpNet::V4(subnet), nodes, bgp_config, peers);
    let v6 = my_ip6.map(|ip6| BgpV6 {
        local: ip6.addr(),
        blocks: blocks
            .iter()
            .filter_map(|b| match b {
                IpNet::V6(b) => Some(*b),
                IpNet::V4(_) => None,
            })
            .collect(),
        peers: sessions(me, IpNet::V6(ip6.trunc()), nodes, bgp_config, peers).peers,
    });
    BgpInput {
        router_id,
        subnet,
        blocks: blocks
            .iter()
            .filter_map(|b| match b {
                IpNet::V4(b) => Some(*b),
                IpNet::V6(_) => None,
            })
            .collect(),
        v6,
        ..v4_sessions
    }
}

/// The sessions of node `me` in the family of `subnet` (its own subnet: peers in it are direct).
fn sessions(
    me: &str,
    subnet: IpNet,
    nodes: &BTreeMap<String, Value>,
    bgp_config: &Value,
    peers: &[Value],
) -> BgpInput {
    let v6 = subnet.addr().is_ipv6();
    let spec = &bgp_config["spec"];
    let asn = spec["asNumber"]
        .as_u64()
        .and_then(|a| u32::try_from(a).ok())
        .unwrap_or(DEFAULT_AS);
    let port = spec["listenPort"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(DEFAULT_PORT);
    let mesh = spec["nodeToNodeMeshEnabled"].as_bool().unwrap_or(true);
    let my = nodes.get(me).cloned().unwrap_or(Value::Null);
    let my_labels = labels(&my);
    let my_rr = rr_cluster(&my);
    let mut out: BTreeMap<IpAddr, Peer> = BTreeMap::new();
    let add_node =
        |name: &str, node: &Value, password: Option<Password>, out: &mut BTreeMap<IpAddr, Peer>| {
            if name == me {
                return;
            }
            let Some(ip) = node_ip(node, v6) else { return };
            let theirs = rr_cluster(node);
            // A reflector treats a peer outside its cluster as its client.
            let rr_client = my_rr.is_some() && theirs != my_rr;
            out.insert(
                ip,
                Peer {
                    name: protocol_name("node", ip),
                    ip,
                    port,
                    asn,
                    rr_client,
                    direct: subnet.contains(&ip),
                    password,
                },
            );
        };
    if mesh {
        for (name, node) in nodes {
            add_node(name, node, None, &mut out);
        }
    }
    for p in peers {
        let s = &p["spec"];
        let r = &s["password"]["secretKeyRef"];
        let password = match (r["name"].as_str(), r["key"].as_str()) {
            (Some(secret), Some(key)) => Some(Password {
                peer: p["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
                secret: secret.to_owned(),
                key: key.to_owned(),
                value: None,
            }),
            _ => None,
        };
        let applies_to = |name: &str, labels: &BTreeMap<String, String>| -> bool {
            match (s["node"].as_str(), s["nodeSelector"].is_string()) {
                (Some(n), _) => n == name,
                (None, true) => selects(&s["nodeSelector"], labels),
                (None, false) => true,
            }
        };
        if let Some(addr) = s["peerIP"].as_str() {
            if !applies_to(me, &my_labels) {
                continue;
            }
            let Some((ip, peer_port)) = peer_address(addr) else {
                continue;
            };
            if ip.is_ipv6() != v6 {
                continue;
            }
            out.insert(
                ip,
                Peer {
                    name: protocol_name("peer", ip),
                    ip,
                    port: peer_port.unwrap_or(DEFAULT_PORT),
                    asn: s["asNumber"]
                        .as_u64()
                        .and_then(|a| u32::try_from(a).ok())
                        .unwrap_or(asn),
                    rr_client: false,
                    direct: subnet.contains(&ip),
                    password,
                },
            );
        } else if s["peerSelector"].is_string() {
            // Sessions are symmetric: this node peers with the nodes the selector picks when the BGPPeer
            // applies to it, and with the nodes the BGPPeer applies to when the selector picks it.
            for (name, node) in nodes {
                let l = labels(node);
                let forward = applies_to(me, &my_labels) && selects(&s["peerSelector"], &l);
                let backward = selects(&s["peerSelector"], &my_labels) && applies_to(name, &l);
                if forward || backward {
                    add_node(name, node, password.clone(), &mut out);
                }
            }
        }
    }
    BgpInput {
        router_id: Ipv4Addr::UNSPECIFIED,
        subnet: Ipv4Net::default(),
        asn,
        port,
        blocks: BTreeSet::new(),
        peers: out.into_values().collect(),
        rr_cluster: my_rr,
        v6: None,
    }
}

/// One family's kernel protocol (exports only BGP-learned routes) and static blocks (`suffix` "" or "6").
fn kernel_and_blocks(c: &mut String, suffix: &str, channel: &str, blocks: impl Iterator<Item = String>) {
    c.push_str(&format!(
        "protocol kernel caracal_kernel{suffix} {{\n  learn off;\n  persist;\n  scan time 10;\n  merge paths on;\n"
    ));
    c.push_str(&format!("  {channel} {{\n    import none;\n    export filter {{\n      if source = RTS_BGP then accept;\n      reject;\n    }};\n  }};\n}}\n\n"));
    c.push_str(&format!(
        "protocol static caracal_blocks{suffix} {{\n  {channel};\n"
    ));
    for b in blocks {
        c.push_str(&format!("  route {b} blackhole;\n"));
    }
    c.push_str("}\n\n");
}

/// One family's session template (`suffix` "" or "6"), sourced from `local`.
fn template(c: &mut String, suffix: &str, channel: &str, local: &str, input: &BgpInput) {
    c.push_str(&format!("template bgp caracal_peer{suffix} {{\n"));
    c.push_str(&format!(
        "  local {local} port {} as {};\n",
        input.port, input.asn
    ));
    // Graceful restart: when an agent restarts (and its BIRD with it), peers keep its routes until it is back.
    c.push_str("  connect retry time 5;\n  error wait time 5, 30;\n  graceful restart on;\n");
    if let Some(id) = input.rr_cluster {
        c.push_str(&format!("  rr cluster id {id};\n"));
    }
    c.push_str(&format!(
        "  {channel} {{\n    import all;\n    export filter caracal_export;\n    next hop self;\n  }};\n}}\n"
    ));
}

/// BIRD 2's configuration for `input`.
pub fn render(input: &BgpInput) -> String {
    let mut c = String::new();
    c.push_str("# Written by caracal-node; changes are overwritten.\n");
    c.push_str(&format!("router id {};\n", input.router_id));
    c.push_str("log stderr all;\n\n");
    c.push_str("protocol device {\n  scan time 10;\n}\n\n");
    // Only what BGP learned goes to the kernel; the static blocks stay in BIRD.
    kernel_and_blocks(&mut c, "", "ipv4", input.blocks.iter().map(ToString::to_string));
    if let Some(v6) = &input.v6 {
        kernel_and_blocks(&mut c, "6", "ipv6", v6.blocks.iter().map(ToString::to_string));
    }
    c.push_str("filter caracal_export {\n  if proto = \"caracal_blocks\" then accept;\n");
    if input.v6.is_some() {
        c.push_str("  if proto = \"caracal_blocks6\" then accept;\n");
    }
    if input.rr_cluster.is_some() {
        // A reflector passes on what it learned.
        c.push_str("  if source = RTS_BGP then accept;\n");
    }
    c.push_str("  reject;\n}\n\n");
    template(&mut c, "", "ipv4", &input.router_id.to_string(), input);
    if let Some(v6) = &input.v6 {
        c.push('\n');
        template(&mut c, "6", "ipv6", &v6.local.to_string(), input);
    }
    let v6_peers = input.v6.iter().flat_map(|v6| v6.peers.iter());
    for p in input.peers.iter().chain(v6_peers) {
        let template = if p.ip.is_ipv6() {
            "caracal_peer6"
        } else {
            "caracal_peer"
        };
        c.push_str(&format!(
            "\nprotocol bgp {} from {template} {{\n  neighbor {} port {} as {};\n",
            p.name, p.ip, p.port, p.asn
        ));
        // On the node's subnet the peer is the next hop itself; beyond it, BGP needs multihop (and a route).
        c.push_str(if p.direct { "  direct;\n" } else { "  multihop;\n" });
        if p.rr_client {
            c.push_str("  rr client;\n");
        }
        // TCP MD5 signatures (RFC 2385) on the session's segments, both ways; the kernel drops segments
        // without a valid one. `secrets::password` vetted the text for BIRD's quoting.
        if let Some(pw) = p.password.as_ref().and_then(|pw| pw.value.as_ref()) {
            c.push_str(&format!("  password \"{pw}\";\n"));
        }
        c.push_str("}\n");
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn node(name: &str, ip: &str, labels: Value, rr: Option<&str>) -> (String, Value) {
        let last = ip.rsplit('.').next().unwrap_or("1");
        let mut ann = json!({
            "caracal.dev/IPv4Address": format!("{ip}/24"),
            "caracal.dev/IPv6Address": format!("fd00::{last}/64"),
        });
        if let Some(id) = rr {
            ann[RR_CLUSTER_ANNOTATION] = id.into();
        }
        (
            name.into(),
            json!({"metadata": {"name": name, "labels": labels, "annotations": ann}}),
        )
    }

    fn nodes() -> BTreeMap<String, Value> {
        BTreeMap::from([
            node("a", "10.0.0.2", json!({"rack": "1"}), None),
            node("b", "10.0.0.3", json!({"rack": "1"}), None),
            node(
                "rr",
                "10.0.0.9",
                json!({"route-reflector": "true"}),
                Some("1.0.0.1"),
            ),
        ])
    }

    fn blocks() -> BTreeSet<IpNet> {
        BTreeSet::from(["10.244.0.0/26".parse().unwrap()])
    }

    /// The IPv4-only input of node `me` at `ip` among [`nodes`], announcing [`blocks`].
    fn ipv4_input(me: &str, ip: &str, cfg: &Value, peers: &[Value]) -> BgpInput {
        input(me, ip.parse().unwrap(), None, &nodes(), cfg, peers, blocks())
    }

    #[test]
    fn the_mesh_peers_every_other_node_with_the_default_as_and_port() {
        let i = ipv4_input("a", "10.0.0.2/24", &Value::Null, &[]);
        assert_eq!(i.asn, 64512);
        let ips: Vec<String> = i.peers.iter().map(|p| p.ip.to_string()).collect();
        assert_eq!(ips, ["10.0.0.3", "10.0.0.9"]);
        assert!(
            i.peers
                .iter()
                .all(|p| p.port == 179 && p.asn == 64512 && !p.rr_client)
        );
    }

    #[test]
    fn route_reflectors_replace_the_mesh_symmetrically() {
        let cfg = json!({"spec": {"nodeToNodeMeshEnabled": false, "asNumber": 65001, "listenPort": 1790}});
        let peer = json!({"spec": {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}});
        let client = ipv4_input("a", "10.0.0.2/24", &cfg, std::slice::from_ref(&peer));
        assert_eq!(
            client.peers.len(),
            1,
            "a client peers only with the reflector: {:?}",
            client.peers
        );
        assert_eq!(
            (client.peers[0].ip.to_string(), client.peers[0].rr_client),
            ("10.0.0.9".into(), false)
        );
        assert_eq!((client.asn, client.port), (65001, 1790));
        let rr = ipv4_input("rr", "10.0.0.9/24", &cfg, &[peer]);
        assert_eq!(
            rr.peers.len(),
            2,
            "the reflector peers with every client: {:?}",
            rr.peers
        );
        assert!(rr.peers.iter().all(|p| p.rr_client));
        let text = render(&rr);
        assert!(
            text.contains("rr cluster id 1.0.0.1;") && text.contains("rr client;"),
            "{text}"
        );
    }

    #[test]
    fn explicit_peers_apply_to_their_nodes_with_their_as_and_port() {
        let peer = json!({"spec": {"node": "b", "peerIP": "10.0.0.100:1179", "asNumber": 65100}});
        let a = ipv4_input("a", "10.0.0.2/24", &Value::Null, std::slice::from_ref(&peer));
        assert!(a.peers.iter().all(|p| p.ip.to_string() != "10.0.0.100"));
        let b = ipv4_input("b", "10.0.0.3/24", &Value::Null, &[peer]);
        let ext = b
            .peers
            .iter()
            .find(|p| p.ip.to_string() == "10.0.0.100")
            .expect("peer");
        assert_eq!((ext.port, ext.asn), (1179, 65100));
    }

    #[test]
    fn ipv6_sessions_run_between_the_nodes_ipv6_addresses_and_announce_ipv6_blocks() {
        let mut blocks = blocks();
        blocks.insert("fd10::/122".parse().unwrap());
        let peer = json!({"spec": {"node": "a", "peerIP": "[fd00:1::100]:1179", "asNumber": 65100}});
        let i = input(
            "a",
            "10.0.0.2/24".parse().unwrap(),
            Some("fd00::2/64".parse().unwrap()),
            &nodes(),
            &Value::Null,
            &[peer],
            blocks,
        );
        assert_eq!(i.blocks.len(), 1, "IPv4 blocks only on the IPv4 side");
        let v6 = i.v6.as_ref().expect("IPv6 side");
        let ips: Vec<String> = v6.peers.iter().map(|p| p.ip.to_string()).collect();
        assert_eq!(ips, ["fd00::3", "fd00::9", "fd00:1::100"]);
        assert!(v6.peers.iter().take(2).all(|p| p.direct && p.port == 179));
        assert!(!v6.peers[2].direct && v6.peers[2].port == 1179 && v6.peers[2].asn == 65100);
        assert!(i.peers.iter().all(|p| p.ip.is_ipv4()));
        let text = render(&i);
        for want in [
            "protocol static caracal_blocks6 {\n  ipv6;\n  route fd10::/122 blackhole;",
            "if proto = \"caracal_blocks6\" then accept;",
            "template bgp caracal_peer6 {\n  local fd00::2 port 179 as 64512;",
            "protocol bgp node_fd00__3 from caracal_peer6 {\n  neighbor fd00::3 port 179 as 64512;\n  direct;",
            "protocol bgp peer_fd00_1__100 from caracal_peer6 {\n  neighbor fd00:1::100 port 1179 as 65100;\n  multihop;",
            "protocol kernel caracal_kernel6",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn a_peers_password_comes_from_its_secret_and_an_unreadable_one_leaves_the_session_out() {
        let peer = |name: &str, ip: &str, secret: &str, key: &str| {
            json!({"metadata": {"name": name}, "spec": {"peerIP": ip, "asNumber": 65100,
                "password": {"secretKeyRef": {"name": secret, "key": key}}}})
        };
        let peers = [
            peer("tor", "10.0.0.100", "bgp", "tor"),
            peer("tor2", "10.0.0.101", "absent", "x"),
        ];
        let mut i = ipv4_input("a", "10.0.0.2/24", &Value::Null, &peers);
        assert_eq!(
            secret_names(&i),
            BTreeSet::from(["absent".to_owned(), "bgp".to_owned()])
        );
        let warnings = resolve_passwords(&mut i, |s, k| match (s, k) {
            ("bgp", "tor") => Ok("s3cret".into()),
            _ => Err("Secret caracal-system/absent does not exist".into()),
        });
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].0.to_string(), "10.0.0.101");
        assert!(warnings[0].1.contains("BGPPeer tor2"), "{warnings:?}");
        let text = render(&i);
        assert!(
            text.contains("protocol bgp peer_10_0_0_100 from caracal_peer {\n  neighbor 10.0.0.100 port 179 as 65100;\n  direct;\n  password \"s3cret\";\n}"),
            "{text}"
        );
        assert!(!text.contains("10.0.0.101"), "{text}");
        assert_eq!(
            text.matches("password").count(),
            1,
            "mesh sessions have none: {text}"
        );
        assert!(!format!("{i:?}").contains("s3cret"), "Debug shows the password");
    }

    #[test]
    fn a_peer_selector_session_takes_its_password_on_both_sides() {
        let cfg = json!({"spec": {"nodeToNodeMeshEnabled": false}});
        let peer = json!({"metadata": {"name": "rr"}, "spec": {"nodeSelector": "all()",
            "peerSelector": "route-reflector == 'true'", "password": {"secretKeyRef": {"name": "bgp", "key": "rr"}}}});
        for (me, ip) in [("a", "10.0.0.2/24"), ("rr", "10.0.0.9/24")] {
            let mut i = ipv4_input(me, ip, &cfg, std::slice::from_ref(&peer));
            assert!(resolve_passwords(&mut i, |_, _| Ok("pw".into())).is_empty());
            assert!(!i.peers.is_empty());
            assert!(
                i.peers
                    .iter()
                    .all(|p| p.password.as_ref().and_then(|p| p.value.as_deref()) == Some("pw")),
                "{me}: {:?}",
                i.peers
            );
        }
    }

    /// The rendered configuration, pinned by a golden file (regenerate with CARACAL_UPDATE_GOLDEN=1 and
    /// review the diff).
    #[test]
    fn the_rendered_configuration_matches_its_golden_file() {
        let i = ipv4_input("a", "10.0.0.2/24", &Value::Null, &[]);
        let text = render(&i);
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/routing/testdata/bird-mesh.conf");
        if std::env::var("CARACAL_UPDATE_GOLDEN").is_ok() {
            std::fs::write(&path, &text).unwrap();
        }
        assert_eq!(text, std::fs::read_to_string(&path).unwrap());
    }
}
