//! The node's own underlay addresses, one per family, found by Calico's autodetection methods
//! (`first-found`, `interface=REGEX`, `skip-interface=REGEX`, `cidr=NET,...`, `kubernetes-internal-ip`, or a
//! fixed address), and the VTEP MACs derived from the node name.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};

use super::kernel::Interface;
use crate::netlink::NetlinkError;

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

/// Finds the node's IPv4 address by `method` among `interfaces` (the namespace's, from
/// [`Kernel::interfaces`](super::kernel::Kernel::interfaces)); `internal_ip` is the Node object's InternalIP
/// for [`Method::KubernetesInternalIp`].
pub fn detect(
    interfaces: &[Interface],
    method: &Method,
    internal_ip: Option<IpAddr>,
) -> Result<Chosen, AddressError> {
    let c = detect_family(interfaces, method, internal_ip, true)?;
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
pub fn detect_v6(
    interfaces: &[Interface],
    method: &Method,
    internal_ip: Option<IpAddr>,
) -> Result<Chosen<Ipv6Net>, AddressError> {
    let c = detect_family(interfaces, method, internal_ip, false)?;
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

fn detect_family(
    interfaces: &[Interface],
    method: &Method,
    internal_ip: Option<IpAddr>,
    v4: bool,
) -> Result<Chosen<IpNet>, AddressError> {
    let (include, exclude) = match method {
        Method::Interface(r) => (Some(regex::Regex::new(&format!("^(?:{r})$"))?), None),
        Method::SkipInterface(r) => (None, Some(regex::Regex::new(&format!("^(?:{r})$"))?)),
        _ => (None, None),
    };
    let mut sorted: Vec<&Interface> = interfaces.iter().collect();
    sorted.sort_by_key(|i| i.index);
    for i in sorted {
        if ours(&i.name)
            || include.as_ref().is_some_and(|r| !r.is_match(&i.name))
            || exclude.as_ref().is_some_and(|r| r.is_match(&i.name))
        {
            continue;
        }
        for addr in &i.addrs {
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
                let ip = match method {
                    Method::Fixed(f) => *f,
                    _ => *addr,
                };
                return Ok(Chosen {
                    ip,
                    index: i.index,
                    name: i.name.clone(),
                    mtu: i.mtu,
                });
            }
        }
    }
    Err(AddressError::NotFound(
        format!("{method:?}"),
        if v4 { 4 } else { 6 },
    ))
}

/// The node's underlay addresses as last found, and why IPv6 has none when it is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detected {
    /// The IPv4 address and its link.
    pub chosen: Chosen,
    /// The IPv6 address and its link, when IPv6 is on and the node has one.
    pub chosen6: Option<Chosen<Ipv6Net>>,
    /// Why IPv6 is on without an address.
    pub warning: Option<String>,
    /// The host MTU: the smallest MTU of the interfaces `mtuIfacePattern` matches (None: none matches, and
    /// each family's underlay link's MTU is the host's).
    pub host_mtu: Option<u32>,
}

impl Detected {
    /// The host MTU for the IPv4 (`v6` false) or IPv6 underlay.
    pub fn host_mtu(&self, v6: bool) -> u32 {
        let link = match (&self.chosen6, v6) {
            (Some(c6), true) => c6.mtu,
            _ => self.chosen.mtu,
        };
        self.host_mtu.unwrap_or(link)
    }
}

/// The address manager: finds the node's underlay address of each family (and turns forwarding on) at the
/// first sync and every forced one: finding them dumps every link and address, and with hundreds of pods that
/// is most of a sync's cost, so the other syncs reuse what it found.
#[derive(Debug)]
pub struct AddressManager {
    method: Method,
    method6: Option<Method>,
    /// What was found, and with which `mtuIfacePattern`.
    last: Option<(Detected, String)>,
}

impl AddressManager {
    /// Finds the IPv4 address by `method` and, when IPv6 is on, the IPv6 one by `method6`.
    pub fn new(method: Method, method6: Option<Method>) -> Self {
        Self {
            method,
            method6,
            last: None,
        }
    }

    /// The addresses: found again when `force`, never found or `mtu_pattern` (Felix's `mtuIfacePattern`)
    /// changed, else the last ones. `internal` is the Node's InternalIP of each family (for
    /// `kubernetes-internal-ip`).
    pub async fn detect<K: super::kernel::Kernel>(
        &mut self,
        k: &K,
        internal: (Option<IpAddr>, Option<IpAddr>),
        mtu_pattern: &str,
        force: bool,
    ) -> Result<Detected, super::RoutingError> {
        if let (Some((d, pattern)), false) = (&self.last, force)
            && pattern == mtu_pattern
        {
            return Ok(d.clone());
        }
        let mut forwarding = vec![("net.ipv4.ip_forward".to_owned(), "1".to_owned())];
        if self.method6.is_some() {
            forwarding.push(("net.ipv6.conf.all.forwarding".to_owned(), "1".to_owned()));
        }
        k.sysctls(forwarding).await?;
        let interfaces = k.interfaces().await?;
        let chosen = detect(&interfaces, &self.method, internal.0)?;
        let (chosen6, warning) = match &self.method6 {
            Some(m) => match detect_v6(&interfaces, m, internal.1) {
                Ok(c) => (Some(c), None),
                Err(e) => (
                    None,
                    Some(format!("IPv6 is on but the node has no IPv6 address: {e}")),
                ),
            },
            None => (None, None),
        };
        let mut warning = warning;
        let host_mtu = match regex::Regex::new(mtu_pattern) {
            Ok(r) => interfaces
                .iter()
                .filter(|i| r.is_match(&i.name))
                .map(|i| i.mtu)
                .min(),
            Err(e) => {
                warning = Some(format!(
                    "FelixConfiguration mtuIfacePattern {mtu_pattern:?} is not a regular expression ({e}): the underlay link's MTU is used"
                ));
                None
            }
        };
        let d = Detected {
            chosen,
            chosen6,
            warning,
            host_mtu,
        };
        self.last = Some((d.clone(), mtu_pattern.to_owned()));
        Ok(d)
    }

    /// Whether IPv6 is on.
    pub fn ipv6(&self) -> bool {
        self.method6.is_some()
    }
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

    fn iface(index: u32, name: &str, mtu: u32, addrs: &[&str]) -> Interface {
        Interface {
            index,
            name: name.into(),
            mtu,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    fn interfaces() -> Vec<Interface> {
        vec![
            iface(1, "lo", 65536, &["127.0.0.1/8", "::1/128"]),
            iface(5, "eth1", 9000, &["192.168.7.2/24", "fe80::1/64", "fd00:7::2/64"]),
            iface(2, "eth0", 1500, &["10.99.0.2/24"]),
            iface(3, "vxlan.caracal", 1450, &["10.244.0.0/32"]),
            iface(4, "crc0123456789a", 1500, &["169.254.1.1/32"]),
        ]
    }

    #[test]
    fn each_method_finds_its_address_in_link_order_never_caracals_own_or_loopback() {
        let ifs = interfaces();
        let c = detect(&ifs, &Method::FirstFound, None).unwrap();
        assert_eq!(
            (c.ip.to_string(), c.name.as_str(), c.mtu),
            ("10.99.0.2/24".into(), "eth0", 1500)
        );
        let c = detect(&ifs, &Method::Interface("eth1".into()), None).unwrap();
        assert_eq!((c.ip.to_string(), c.mtu), ("192.168.7.2/24".into(), 9000));
        let c = detect(&ifs, &Method::SkipInterface("eth0".into()), None).unwrap();
        assert_eq!(c.name, "eth1");
        let c = detect(
            &ifs,
            &Method::Cidrs(vec!["192.168.0.0/16".parse().unwrap()]),
            None,
        )
        .unwrap();
        assert_eq!(c.name, "eth1");
        let c = detect(
            &ifs,
            &Method::KubernetesInternalIp,
            Some("192.168.7.2".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(c.name, "eth1");
        let fixed: IpNet = "10.99.0.2/16".parse().unwrap();
        let c = detect(&ifs, &Method::Fixed(fixed), None).unwrap();
        assert_eq!(
            (c.ip.to_string(), c.name.as_str()),
            ("10.99.0.2/16".into(), "eth0"),
            "the fixed prefix wins"
        );
        // IPv6: global addresses only.
        let c6 = detect_v6(&ifs, &Method::FirstFound, None).unwrap();
        assert_eq!(c6.ip.to_string(), "fd00:7::2/64");
        let e = detect(&ifs, &Method::Interface("vxlan.*".into()), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no IPv4 address matches"), "{e}");
    }

    #[tokio::test]
    async fn the_manager_turns_forwarding_on_and_finds_again_only_when_forced() {
        use crate::routing::kernel::fake::FakeKernel;
        let k = FakeKernel::with_underlay("eth0", 1500, &["10.99.0.2/24"]);
        let mut m = AddressManager::new(Method::FirstFound, Some(Method::FirstFound));
        let d = m.detect(&k, (None, None), "^eth", false).await.unwrap();
        assert_eq!(d.chosen.ip.to_string(), "10.99.0.2/24");
        assert!(
            d.chosen6.is_none()
                && d.warning
                    .as_deref()
                    .is_some_and(|w| w.contains("no IPv6 address"))
        );
        assert_eq!(
            k.state().sysctls.get("net.ipv4.ip_forward").map(String::as_str),
            Some("1")
        );
        assert_eq!(
            k.state()
                .sysctls
                .get("net.ipv6.conf.all.forwarding")
                .map(String::as_str),
            Some("1")
        );
        // The address changes: an unforced sync keeps what it found, a forced one finds the new one.
        k.state().links.get_mut("eth0").unwrap().addrs = ["10.99.0.7/24".parse().unwrap()].into();
        assert_eq!(m.detect(&k, (None, None), "^eth", false).await.unwrap(), d);
        let again = m.detect(&k, (None, None), "^eth", true).await.unwrap();
        assert_eq!(again.chosen.ip.to_string(), "10.99.0.7/24");
        // mtuIfacePattern: the smallest MTU of the interfaces it matches is the host's; a new pattern is
        // applied at once, without waiting for a forced sync.
        assert_eq!(again.host_mtu, Some(1500));
        k.state().links.get_mut("eth0").unwrap().mtu = 9000;
        k.add_link("eth1");
        let both = m.detect(&k, (None, None), "^eth[01]$", false).await.unwrap();
        assert_eq!(
            (both.host_mtu, both.host_mtu(false)),
            (Some(1500), 1500),
            "eth1's 1500 under eth0's 9000"
        );
        let none = m.detect(&k, (None, None), "^wlan", false).await.unwrap();
        assert_eq!(
            (none.host_mtu, none.host_mtu(false)),
            (None, 9000),
            "nothing matches: the underlay link's"
        );
    }
}
