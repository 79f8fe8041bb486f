//! The node's own underlay addresses, one per family, found by Calico's autodetection methods
//! (`first-found`, `interface=REGEX`, `skip-interface=REGEX`, `cidr=NET,...`, `kubernetes-internal-ip`, or a
//! fixed address), and the VTEP MACs derived from the node name.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};

use crate::netlink::{Netlink, NetlinkError};

/// How to find the node's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    /// The first global address of the family on the first interface that is not Caracal's or loopback.
    FirstFound,
    /// The first interface whose name matches.
    Interface(String),
    /// The first interface whose name does not match.
    SkipInterface(String),
    /// The first address inside one of these networks.
    Cidrs(Vec<IpNet>),
    /// The Node object's InternalIP (the caller passes it in).
    KubernetesInternalIp,
    /// Exactly this address (the `CARACAL_IP` / `CARACAL_IP6` override).
    Fixed(IpNet),
}

/// Errors choosing an address.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    /// The method text is not understood.
    #[error(
        "CARACAL_IPV4_AUTODETECTION / CARACAL_IPV6_AUTODETECTION {0:?} is not a method: use first-found, interface=REGEX, skip-interface=REGEX, cidr=NET[,NET], kubernetes-internal-ip or can-reach=ADDR"
    )]
    Method(String),
    /// A regular expression does not compile.
    #[error("CARACAL_IPV4_AUTODETECTION / CARACAL_IPV6_AUTODETECTION: {0}")]
    Regex(#[from] regex::Error),
    /// Nothing matched.
    #[error("no IPv{1} address matches autodetection method {0:?}")]
    NotFound(String, u8),
    /// Reading links failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

/// Parses Calico's method syntax. `can-reach` is treated as first-found (this agent does not resolve the
/// route to a reachability target); `none` and the empty string mean first-found.
pub fn parse(text: &str) -> Result<Method, AddressError> {
    let text = text.trim();
    Ok(match text.split_once('=') {
        None if text.is_empty() || text == "first-found" || text == "none" => Method::FirstFound,
        None if text == "kubernetes-internal-ip" => Method::KubernetesInternalIp,
        Some(("interface", r)) => Method::Interface(r.to_owned()),
        Some(("skip-interface", r)) => Method::SkipInterface(r.to_owned()),
        Some(("cidr", list)) => Method::Cidrs(
            list.split(',')
                .map(|c| {
                    c.trim()
                        .parse()
                        .map_err(|_| AddressError::Method(text.to_owned()))
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(("can-reach", _)) => Method::FirstFound,
        _ => return Err(AddressError::Method(text.to_owned())),
    })
}

fn ours(name: &str) -> bool {
    name == "lo"
        || name == "tunl0"
        || name.starts_with("crc")
        || name.starts_with("vxlan.caracal")
        || name.starts_with("vxlan6.caracal")
        || name.starts_with("wg.caracal")
}

/// The chosen address with its prefix, and the interface holding it (index, MTU). `Chosen<Ipv6Net>` is the
/// node's IPv6 address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen<N = Ipv4Net> {
    /// Address and prefix.
    pub ip: N,
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Interface MTU.
    pub mtu: u32,
}

/// Finds the node's IPv4 address by `method` among the links of `nl`'s namespace; `internal_ip` is the
/// Node object's InternalIP for [`Method::KubernetesInternalIp`].
pub async fn detect(
    nl: &Netlink,
    method: &Method,
    internal_ip: Option<IpAddr>,
) -> Result<Chosen, AddressError> {
    let c = detect_family(nl, method, internal_ip, true).await?;
    match c.ip {
        IpNet::V4(ip) => Ok(Chosen {
            ip,
            index: c.index,
            name: c.name,
            mtu: c.mtu,
        }),
        IpNet::V6(_) => Err(AddressError::NotFound(format!("{method:?}"), 4)),
    }
}

/// Finds the node's IPv6 address by `method` (global addresses only: never link-local).
pub async fn detect_v6(
    nl: &Netlink,
    method: &Method,
    internal_ip: Option<IpAddr>,
) -> Result<Chosen<Ipv6Net>, AddressError> {
    let c = detect_family(nl, method, internal_ip, false).await?;
    match c.ip {
        IpNet::V6(ip) => Ok(Chosen {
            ip,
            index: c.index,
            name: c.name,
            mtu: c.mtu,
        }),
        IpNet::V4(_) => Err(AddressError::NotFound(format!("{method:?}"), 6)),
    }
}

fn global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
    }
}

async fn detect_family(
    nl: &Netlink,
    method: &Method,
    internal_ip: Option<IpAddr>,
    v4: bool,
) -> Result<Chosen<IpNet>, AddressError> {
    let (include, exclude) = match method {
        Method::Interface(r) => (Some(regex::Regex::new(&format!("^(?:{r})$"))?), None),
        Method::SkipInterface(r) => (None, Some(regex::Regex::new(&format!("^(?:{r})$"))?)),
        _ => (None, None),
    };
    let mut links = nl.links().await?;
    links.sort();
    for (index, name) in links {
        if ours(&name)
            || include.as_ref().is_some_and(|r| !r.is_match(&name))
            || exclude.as_ref().is_some_and(|r| r.is_match(&name))
        {
            continue;
        }
        for addr in nl.addrs(index).await? {
            if addr.addr().is_ipv4() != v4 || !global(addr.addr()) {
                continue;
            }
            let wanted = match method {
                Method::Cidrs(nets) => nets.iter().any(|n| n.contains(&addr.addr())),
                Method::KubernetesInternalIp => Some(addr.addr()) == internal_ip,
                Method::Fixed(f) => f.addr() == addr.addr(),
                _ => true,
            };
            if wanted {
                let mtu = nl
                    .link(&name)
                    .await?
                    .as_ref()
                    .and_then(crate::netlink::link_mtu)
                    .unwrap_or(1500);
                let ip = match method {
                    Method::Fixed(f) => *f,
                    _ => addr,
                };
                return Ok(Chosen { ip, index, name, mtu });
            }
        }
    }
    Err(AddressError::NotFound(
        format!("{method:?}"),
        if v4 { 4 } else { 6 },
    ))
}

/// The node's VTEP MAC: locally administered, unicast, stable for the node name.
pub fn vtep_mac(node: &str) -> [u8; 6] {
    let d = Sha256::digest(format!("vxlan.caracal/{node}").as_bytes());
    [0x66, d[0], d[1], d[2], d[3], d[4]]
}

/// The node's IPv6 VTEP MAC (`vxlan6.caracal`), distinct from the IPv4 one.
pub fn vtep_mac_v6(node: &str) -> [u8; 6] {
    let d = Sha256::digest(format!("vxlan6.caracal/{node}").as_bytes());
    [0x66, d[0], d[1], d[2], d[3], d[4]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_and_bad_ones_name_the_variable() {
        assert_eq!(parse("first-found").unwrap(), Method::FirstFound);
        assert_eq!(
            parse("interface=eth.*").unwrap(),
            Method::Interface("eth.*".into())
        );
        assert_eq!(
            parse("cidr=10.0.0.0/8, 192.168.0.0/16").unwrap(),
            Method::Cidrs(vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.168.0.0/16".parse().unwrap()
            ])
        );
        let e = parse("bogus=1").unwrap_err().to_string();
        assert!(
            e.contains("CARACAL_IPV4_AUTODETECTION") && e.contains("first-found"),
            "{e}"
        );
        assert!(parse("cidr=nope").is_err());
    }

    #[test]
    fn vtep_macs_are_stable_local_unicast_and_distinct() {
        let a = vtep_mac("node-a");
        assert_eq!(a, vtep_mac("node-a"));
        assert_ne!(a, vtep_mac("node-b"));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered, unicast");
    }
}
