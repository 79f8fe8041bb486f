//! Value types that carry their own OpenAPI schema and CEL rules.
//!
//! A field typed `Cidr`, `Net`, `Selector`, `Port` or `Protocol` is validated by the API server at apply time
//! wherever it appears, so a rule is written once here rather than at every field that holds such a value.
//! Each rule's message names what was wrong and what to write instead; the API server prefixes it with the
//! field path (`spec.ingress[0].destination.ports[1]: Invalid value: ...`).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest textual IPv6 CIDR (`ffff:...:ffff/128`); bounds CEL cost estimates for CIDR fields.
pub const MAX_CIDR_LEN: u64 = 43;
/// Longest selector expression Caracal accepts.
pub const MAX_SELECTOR_LEN: u64 = 1024;

/// An IP network in CIDR notation, validated as such by the API server (`isCIDR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(pub IpNet);

impl Cidr {
    /// True for an IPv4 network.
    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }
    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Cidr {
    type Err = ipnet::AddrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Cidr)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        s.parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a CIDR such as 10.0.0.0/16")))
    }
}

impl JsonSchema for Cidr {
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": MAX_CIDR_LEN,
            "x-kubernetes-validations": [{
                "rule": "isCIDR(self)",
                "messageExpression": "'\"' + self + '\" is not a CIDR: write an address and a prefix length, such as 10.0.0.0/16 or fd00::/48'"
            }]
        })
    }
}

/// A network in a policy or network set: a CIDR, or a single address meaning its /32 or /128.
///
/// A bare address is written back bare, so what a user applied reads back unchanged. Equality, hashing and
/// ordering look at the network only: `10.1.2.3` and `10.1.2.3/32` are the same net.
#[derive(Clone, Copy, Debug)]
pub struct Net {
    net: IpNet,
    bare: bool,
}

impl Net {
    /// The network.
    pub fn net(&self) -> IpNet {
        self.net
    }
}

impl From<IpNet> for Net {
    fn from(net: IpNet) -> Self {
        Net { net, bare: false }
    }
}

impl PartialEq for Net {
    fn eq(&self, other: &Self) -> bool {
        self.net == other.net
    }
}
impl Eq for Net {}
impl std::hash::Hash for Net {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.net.hash(h);
    }
}
impl PartialOrd for Net {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Net {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.net.cmp(&other.net)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.bare {
            self.net.addr().fmt(f)
        } else {
            self.net.fmt(f)
        }
    }
}

impl FromStr for Net {
    type Err = ipnet::AddrParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<IpNet>() {
            Ok(net) => Ok(Net { net, bare: false }),
            Err(e) => s
                .parse::<std::net::IpAddr>()
                .map(|a| Net {
                    net: IpNet::from(a),
                    bare: true,
                })
                .map_err(|_| e),
        }
    }
}

impl Serialize for Net {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        s.parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a CIDR or an IP address")))
    }
}

impl JsonSchema for Net {
    fn schema_name() -> Cow<'static, str> {
        "Net".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": MAX_CIDR_LEN,
            "x-kubernetes-validations": [{
                "rule": "isCIDR(self) || isIP(self)",
                "messageExpression": "'\"' + self + '\" is not a CIDR or an IP address: write, for example, 10.0.0.0/8 or 10.1.2.3'"
            }]
        })
    }
}

/// Defines a selector string newtype; `allow_global` says whether `global()` may appear in it.
macro_rules! selector_type {
    ($(#[$doc:meta])* $name:ident, allow_global = $allow:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// The selector expression as written.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                if $allow {
                    json_schema!({ "type": "string", "maxLength": MAX_SELECTOR_LEN })
                } else {
                    json_schema!({
                        "type": "string",
                        "maxLength": MAX_SELECTOR_LEN,
                        "x-kubernetes-validations": [{
                            "rule": "!self.contains('global(')",
                            "message": "global() selects non-namespaced resources and is allowed only in a namespaceSelector: remove it from this selector"
                        }]
                    })
                }
            }
        }
    };
}

selector_type!(
    /// A label selector in Caracal's selector language (`app == "web" && has(tier)`); `global()` is not allowed.
    Selector,
    allow_global = false
);
selector_type!(
    /// A namespace selector: the selector language plus `global()` for non-namespaced entities.
    NamespaceSelector,
    allow_global = true
);

/// The IANA protocol names a rule may use, as Calico spells them.
pub const PROTOCOL_NAMES: [&str; 6] = ["TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "UDPLite"];

/// An IP protocol: a name from [`PROTOCOL_NAMES`] or a number 1..=255.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Protocol {
    /// A protocol number.
    Number(u8),
    /// A protocol name.
    Name(String),
}

impl Protocol {
    /// The IANA protocol number, when the name is one Caracal knows.
    pub fn number(&self) -> Option<u8> {
        match self {
            Protocol::Number(n) => Some(*n),
            Protocol::Name(n) => match n.as_str() {
                "TCP" => Some(6),
                "UDP" => Some(17),
                "ICMP" => Some(1),
                "ICMPv6" => Some(58),
                "SCTP" => Some(132),
                "UDPLite" => Some(136),
                _ => None,
            },
        }
    }
    /// True for protocols that have ports (TCP, UDP, SCTP).
    pub fn has_ports(&self) -> bool {
        matches!(self.number(), Some(6 | 17 | 132))
    }
}

impl JsonSchema for Protocol {
    fn schema_name() -> Cow<'static, str> {
        "Protocol".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "anyOf": [{ "type": "integer" }, { "type": "string" }],
            "maxLength": 7,
            "x-kubernetes-validations": [{
                "rule": "type(self) == int ? (self >= 1 && self <= 255) : self in ['TCP', 'UDP', 'ICMP', 'ICMPv6', 'SCTP', 'UDPLite']",
                "message": "unsupported protocol: use TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or a number from 1 to 255"
            }]
        })
    }
}

/// A port in a rule: a number, a range `"low:high"`, or the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Port {
    /// One port number.
    Number(u16),
    /// A range `"low:high"` or a named port; see [`Port::parse`].
    Text(String),
}

/// A [`Port`] with its text form interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec<'a> {
    /// Ports `low..=high` (a single port has `low == high`).
    Range(u16, u16),
    /// A named container port.
    Named(&'a str),
}

impl Port {
    /// Interprets the port; `None` when the text is neither a number, a range nor a port name.
    pub fn parse(&self) -> Option<PortSpec<'_>> {
        match self {
            Port::Number(n) => Some(PortSpec::Range(*n, *n)),
            Port::Text(t) => {
                if let Some((lo, hi)) = t.split_once(':') {
                    let (lo, hi) = (lo.parse().ok()?, hi.parse().ok()?);
                    (lo <= hi).then_some(PortSpec::Range(lo, hi))
                } else if let Ok(n) = t.parse() {
                    Some(PortSpec::Range(n, n))
                } else if !t.is_empty() && t.len() <= 15 {
                    Some(PortSpec::Named(t))
                } else {
                    None
                }
            }
        }
    }
}

impl JsonSchema for Port {
    fn schema_name() -> Cow<'static, str> {
        "Port".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "anyOf": [{ "type": "integer" }, { "type": "string" }],
            "maxLength": 15,
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == string || (self >= 0 && self <= 65535)",
                    "message": "port out of range: use a number from 0 to 65535"
                },
                {
                    "rule": "type(self) == int || self.matches('^([0-9]+(:[0-9]+)?|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$')",
                    "messageExpression": "'\"' + string(self) + '\" is not a port: write a number, a range \"low:high\", or a container port name (lowercase letters, digits and -, at most 15 characters)'"
                },
                {
                    "rule": "type(self) == int || !self.matches('^[0-9]+$') || int(self) <= 65535",
                    "messageExpression": "'\"' + string(self) + '\" is out of range: ports go from 0 to 65535'"
                },
                {
                    "rule": "type(self) == int || !self.matches('^[0-9]+:[0-9]+$') || (int(self.substring(0, self.indexOf(':'))) <= int(self.substring(self.indexOf(':') + 1)) && int(self.substring(self.indexOf(':') + 1)) <= 65535)",
                    "messageExpression": "'port range \"' + string(self) + '\" is not low:high with low <= high <= 65535: write the lower port first'"
                }
            ]
        })
    }
}

/// A duration as Kubernetes and Calico write it: `90s`, `1m30s`, `500ms`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(pub String);

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 32,
            "x-kubernetes-validations": [{
                "rule": "self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$')",
                "messageExpression": "'\"' + self + '\" is not a duration: write, for example, 90s, 1m30s or 500ms'"
            }]
        })
    }
}

/// An MTU: 576 (the IPv4 minimum) to 9000 (jumbo frames). Absent means "detect".
pub fn mtu_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "format": "int32", "minimum": 576, "maximum": 9000 })
}

/// A TCP/UDP port number 1..=65535 as a plain integer field (listening ports).
pub fn port_number_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "integer", "format": "int32", "minimum": 1, "maximum": 65535 })
}

/// Removes every `default` keyword from a schema tree.
///
/// Caracal never lets the API server write defaults into a stored object: defaults are the operator's and the
/// agent's business (the operator reports them in `status.computed`), so a GitOps tool comparing what it
/// applied with what is stored sees no drift the system made.
pub fn strip_defaults(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("default");
            m.values_mut().for_each(strip_defaults);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_defaults),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_accepts_bare_addresses_as_host_networks() {
        let n: Net = "10.1.2.3".parse().unwrap();
        assert_eq!(n.net().to_string(), "10.1.2.3/32");
        assert_eq!(n.to_string(), "10.1.2.3", "written back as the user wrote it");
        assert_eq!(n, "10.1.2.3/32".parse().unwrap());
        let n: Net = "fd00::1".parse().unwrap();
        assert_eq!(n.net().to_string(), "fd00::1/128");
        assert!("10.1.2.300".parse::<Net>().is_err());
    }

    #[test]
    fn port_text_forms_parse_into_ranges_and_names() {
        assert_eq!(Port::Number(80).parse(), Some(PortSpec::Range(80, 80)));
        assert_eq!(Port::Text("80:90".into()).parse(), Some(PortSpec::Range(80, 90)));
        assert_eq!(Port::Text("90:80".into()).parse(), None);
        assert_eq!(Port::Text("http".into()).parse(), Some(PortSpec::Named("http")));
        assert_eq!(
            Port::Text("8080".into()).parse(),
            Some(PortSpec::Range(8080, 8080))
        );
    }

    #[test]
    fn protocol_names_map_to_numbers_and_port_capability() {
        assert_eq!(Protocol::Name("TCP".into()).number(), Some(6));
        assert!(Protocol::Number(132).has_ports());
        assert!(!Protocol::Name("ICMP".into()).has_ports());
        assert_eq!(Protocol::Name("tcpx".into()).number(), None);
    }

    #[test]
    fn strip_defaults_removes_nested_default_keys() {
        let mut v =
            serde_json::json!({"default": 1, "properties": {"a": {"default": "x", "type": "string"}}});
        strip_defaults(&mut v);
        assert_eq!(v, serde_json::json!({"properties": {"a": {"type": "string"}}}));
    }
}
