//! The `network:` section: CIDR and domain rules with ports and protocol.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use pep_common::net::{PROTO_TCP, PROTO_UDP};

use super::de::{checked_map, scalar};
use super::dns::DnsSettings;
use super::domain::DomainPattern;
use super::expand::expand_vars;
use super::rule::{Rule, Verdict};

/// `network:`. A policy without this section does not restrict the network:
/// `default` is `allow` and there are no rules. Within the section, an omitted
/// `default` is `allow` too (the rules then only carve out denials).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkSection {
    pub default: NetDefault,
    pub rules: Vec<NetRule>,
    /// `dns:`: the resolver that decides `domain` rules (issue 7).
    pub dns: DnsSettings,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            default: NetDefault::Allow,
            rules: Vec::new(),
            dns: DnsSettings::default(),
        }
    }
}

/// `network.default`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetDefault {
    Deny,
    Allow,
    /// Consult the PDP.
    Ask,
}

/// One `network.rules[i]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetRule {
    /// Position in `network.rules`, as audit records name it.
    pub index: usize,
    pub verdict: Verdict,
    pub target: NetTarget,
    /// Destination ports; empty means every port.
    pub ports: Vec<PortRange>,
    /// `None` means any protocol.
    pub protocol: Option<Protocol>,
}

impl NetRule {
    /// `network.rules[i]`, the audit record's `rule` field.
    pub fn name(&self) -> String {
        format!("network.rules[{}]", self.index)
    }

    /// Whether `port` is one of the rule's ports (all ports when none given).
    pub fn covers_port(&self, port: u16) -> bool {
        self.ports.is_empty() || self.ports.iter().any(|r| r.contains(port))
    }

    /// Whether the rule applies to IP protocol number `proto`.
    pub fn covers_protocol(&self, proto: u8) -> bool {
        self.protocol.is_none_or(|p| p.number() == proto)
    }
}

/// What a network rule matches on: exactly one of `cidr` and `domain`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetTarget {
    /// Host bits are zero (checked at load).
    Cidr(IpNet),
    Domain(DomainPattern),
}

/// An inclusive port range; a single port has `lo == hi`. Never contains 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// `protocol:`; absent means any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number (`pep_common::net::PROTO_*`).
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSection {
    #[serde(default)]
    default: Option<NetDefault>,
    #[serde(default)]
    rules: Option<Vec<Rule<NetMatch>>>,
    #[serde(default)]
    dns: Option<DnsSettings>,
}

impl<'de> Deserialize<'de> for NetworkSection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(d, "the `network` section", |raw: RawSection| {
            let rules = raw.rules.unwrap_or_default();
            Ok(Self {
                default: raw.default.unwrap_or(NetDefault::Allow),
                rules: rules
                    .into_iter()
                    .enumerate()
                    .map(|(index, rule)| NetRule {
                        index,
                        verdict: rule.verdict,
                        target: rule.body.target,
                        ports: rule.body.ports,
                        protocol: rule.body.protocol,
                    })
                    .collect(),
                dns: raw.dns.unwrap_or_default(),
            })
        })
    }
}

/// A rule's body, before the section numbers it.
struct NetMatch {
    target: NetTarget,
    ports: Vec<PortRange>,
    protocol: Option<Protocol>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    cidr: Option<Cidr>,
    #[serde(default)]
    domain: Option<DomainPattern>,
    #[serde(default)]
    ports: Option<Ports>,
    #[serde(default)]
    protocol: Option<Protocol>,
}

impl<'de> Deserialize<'de> for NetMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_map(
            d,
            "a network rule: `{cidr|domain, ports, protocol}`",
            |raw: RawMatch| {
                let target = match (raw.cidr, raw.domain) {
                    (Some(Cidr(net)), None) => NetTarget::Cidr(net),
                    (None, Some(domain)) => NetTarget::Domain(domain),
                    (None, None) => return Err("a network rule needs `cidr` or `domain`".into()),
                    (Some(_), Some(_)) => {
                        return Err(
                            "a network rule has either `cidr` or `domain`, not both; write two rules".into(),
                        );
                    }
                };
                Ok(Self {
                    target,
                    ports: raw.ports.map(|p| p.0).unwrap_or_default(),
                    protocol: raw.protocol,
                })
            },
        )
    }
}

/// A `cidr:` value. A bare address is a one-address network.
struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a CIDR such as `10.0.0.0/8` or `2001:db8::/32`", |text| {
            parse_cidr(&expand_vars(text)?).map(Cidr)
        })
    }
}

/// Parses a CIDR, rejecting host bits: `10.0.0.1/8` is more likely a typo
/// than a way of writing `10.0.0.0/8`, and a security policy should not guess.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net = if text.contains('/') {
        text.parse::<IpNet>()
            .map_err(|_| format!("bad CIDR `{text}`: expected e.g. `10.0.0.0/8` or `2001:db8::/32`"))?
    } else {
        let addr = text
            .parse::<IpAddr>()
            .map_err(|_| format!("bad CIDR `{text}`: expected e.g. `10.0.0.0/8` or `2001:db8::/32`"))?;
        IpNet::from(addr)
    };
    if net.trunc() != net {
        return Err(format!(
            "bad CIDR `{text}`: host bits are set; did you mean `{}`?",
            net.trunc()
        ));
    }
    Ok(net)
}

/// `ports:`: a list of ports and `"lo-hi"` ranges, or a single one of them.
struct Ports(Vec<PortRange>);

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortsVisitor)
    }
}

struct PortsVisitor;

impl<'de> Visitor<'de> for PortsVisitor {
    type Value = Ports;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of ports (`443`) and port ranges (`\"9000-9100\"`)")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ports, A::Error> {
        let mut ports = Vec::new();
        while let Some(range) = seq.next_element::<PortRange>()? {
            ports.push(range);
        }
        if ports.is_empty() {
            return Err(de::Error::custom(
                "`ports: []` matches nothing; leave `ports` out to match every port",
            ));
        }
        Ok(Ports(ports))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ports, E> {
        PortRangeVisitor.visit_u64(v).map(|r| Ports(vec![r]))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ports, E> {
        PortRangeVisitor.visit_i64(v).map(|r| Ports(vec![r]))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Ports, E> {
        PortRangeVisitor.visit_str(v).map(|r| Ports(vec![r]))
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortRangeVisitor)
    }
}

struct PortRangeVisitor;

fn port(value: u64, text: &dyn fmt::Display) -> Result<u16, String> {
    match u16::try_from(value) {
        Ok(0) => Err(format!("bad port `{text}`: ports are 1-65535")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("bad port `{text}`: ports are 1-65535")),
    }
}

fn parse_port_text(text: &str) -> Result<u16, String> {
    let t = text.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad port `{t}`: expected a number 1-65535"));
    }
    // All digits: a parse failure can only be an overflow.
    port(t.parse::<u64>().unwrap_or(u64::MAX), &t)
}

impl Visitor<'_> for PortRangeVisitor {
    type Value = PortRange;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a port (`443`) or a port range (`\"9000-9100\"`)")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
        let p = port(v, &v).map_err(E::custom)?;
        Ok(PortRange { lo: p, hi: p })
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!("bad port `{v}`: ports are 1-65535"))),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
        let range = match v.split_once('-') {
            None => {
                let p = parse_port_text(v).map_err(E::custom)?;
                PortRange { lo: p, hi: p }
            }
            Some((lo, hi)) => PortRange {
                lo: parse_port_text(lo).map_err(E::custom)?,
                hi: parse_port_text(hi).map_err(E::custom)?,
            },
        };
        if range.lo > range.hi {
            return Err(E::custom(format!(
                "bad port range `{v}`: the first port is above the last"
            )));
        }
        Ok(range)
    }
}
