//! Property: the kernel's algorithm over the compiled entries decides what the
//! SPEC says, for random overlapping rule lists and destinations.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;

use pep_common::event::{RULE_NONE, VERDICT_ALLOW, VERDICT_DENY};
use pep_common::net::{PROTO_TCP, PROTO_UDP};

use super::net::{compile_network, lookup, reference_decide};
use crate::policy::{
    DomainPattern, NetDefault, NetRule, NetTarget, NetworkSection, PortRange, Protocol, Verdict,
};

/// Ports the rules and the queries share, so that ranges' edges get hit.
const PORTS: &[u16] = &[1, 22, 53, 80, 443, 8080, 9000, 9100, 65535];

/// IPv4 addresses from a small space (10.0-2.0-2.0-2) so that CIDRs nest,
/// overlap and hold the queried addresses; now and then anything.
fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        9 => (0..3u8, 0..3u8, 0..3u8).prop_map(|(b, c, d)| Ipv4Addr::new(10, b, c, d)),
        1 => any::<u32>().prop_map(Ipv4Addr::from),
    ]
}

fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
    prop_oneof![
        9 => (0..3u16, 0..3u16, 0..3u16)
            .prop_map(|(b, c, d)| Ipv6Addr::new(0x2001, 0xdb8, b, c, 0, 0, 0, d)),
        1 => any::<u128>().prop_map(Ipv6Addr::from),
    ]
}

fn v4_len() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(0u8),
        Just(8),
        Just(16),
        Just(24),
        Just(30),
        Just(32),
        0..=32u8
    ]
}

fn v6_len() -> impl Strategy<Value = u8> {
    prop_oneof![
        Just(0u8),
        Just(32),
        Just(48),
        Just(64),
        Just(126),
        Just(128),
        0..=128u8
    ]
}

fn cidr() -> impl Strategy<Value = IpNet> {
    let v4 = || (v4_addr(), v4_len()).prop_map(|(a, l)| Ipv4Net::new(a, l).unwrap().trunc());
    prop_oneof![
        4 => v4().prop_map(IpNet::V4),
        3 => (v6_addr(), v6_len())
            .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(a, l).unwrap().trunc())),
        // The same IPv4 networks, written IPv4-mapped.
        2 => v4().prop_map(|n| {
            IpNet::V6(Ipv6Net::new(n.network().to_ipv6_mapped(), n.prefix_len() + 96).unwrap())
        }),
        // IPv6 networks around the mapped range.
        1 => prop_oneof![Just("::/0"), Just("::/64"), Just("::ffff:0:0/95"), Just("::ffff:0:0/96")]
            .prop_map(|s| s.parse().unwrap()),
    ]
}

fn port_range() -> impl Strategy<Value = PortRange> {
    // Ports next to the shared ones too, so that ranges abut, overlap or
    // leave one-port gaps.
    let port = || {
        prop_oneof![
            4 => prop::sample::select(PORTS),
            2 => (prop::sample::select(PORTS), prop_oneof![Just(-1i32), Just(1)])
                .prop_map(|(p, d)| (i32::from(p) + d).clamp(1, 65535) as u16),
            // A narrow band where ranges pile up and shadow one another.
            3 => 78..=84u16,
            1 => 1..=u16::MAX,
        ]
    };
    prop_oneof![
        port().prop_map(|p| PortRange { lo: p, hi: p }),
        (port(), port()).prop_map(|(a, b)| PortRange {
            lo: a.min(b),
            hi: a.max(b)
        }),
    ]
}

fn rule() -> impl Strategy<Value = (Verdict, NetTarget, Vec<PortRange>, Option<Protocol>)> {
    let target = prop_oneof![
        19 => cidr().prop_map(NetTarget::Cidr),
        1 => Just(NetTarget::Domain(DomainPattern::parse("*.example.com").unwrap())),
    ];
    let ports = prop_oneof![
        1 => Just(Vec::new()),
        2 => prop::collection::vec(port_range(), 1..=3),
    ];
    let protocol = prop_oneof![Just(None), Just(Some(Protocol::Tcp)), Just(Some(Protocol::Udp))];
    let verdict = prop_oneof![Just(Verdict::Allow), Just(Verdict::Deny)];
    (verdict, target, ports, protocol)
}

/// At most 8 rules of at most 3 port ranges: never more entries than fit.
fn section() -> impl Strategy<Value = NetworkSection> {
    let default = prop_oneof![Just(NetDefault::Allow), Just(NetDefault::Deny)];
    (default, prop::collection::vec(rule(), 0..=8)).prop_map(|(default, rules)| NetworkSection {
        default,
        dns: Default::default(),
        rules: rules
            .into_iter()
            .enumerate()
            .map(|(index, (verdict, target, ports, protocol))| NetRule {
                index,
                verdict,
                target,
                ports,
                protocol,
            })
            .collect(),
    })
}

fn query() -> impl Strategy<Value = (IpAddr, u16, u8)> {
    let addr = prop_oneof![
        4 => v4_addr().prop_map(IpAddr::V4),
        3 => v6_addr().prop_map(IpAddr::V6),
        3 => v4_addr().prop_map(|a| IpAddr::V6(a.to_ipv6_mapped())),
    ];
    let port = prop_oneof![
        3 => prop::sample::select(PORTS),
        3 => 77..=85u16,
        2 => prop::sample::select(PORTS).prop_map(|p| p.wrapping_add(1)),
        2 => prop::sample::select(PORTS).prop_map(|p| p.wrapping_sub(1)),
        1 => any::<u16>(),
    ];
    let proto = prop_oneof![Just(PROTO_TCP), Just(PROTO_UDP), Just(1u8)];
    (addr, port, proto)
}

/// The prefix length of `rule`'s CIDR in the reference's unified IPv6 space.
fn unified_len(rule: &NetRule) -> u8 {
    match rule.target {
        NetTarget::Cidr(IpNet::V4(n)) => n.prefix_len() + 96,
        NetTarget::Cidr(IpNet::V6(n)) => n.prefix_len(),
        NetTarget::Domain(_) => unreachable!("domain rules never decide"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn compiled_lookup_matches_the_spec(
        net in section(),
        queries in prop::collection::vec(query(), 1..=16),
        sandbox_id in any::<u32>(),
    ) {
        let compiled = compile_network(&net, sandbox_id).expect("within the entry limit");
        let default = match net.default {
            NetDefault::Allow => VERDICT_ALLOW,
            _ => VERDICT_DENY,
        };
        prop_assert_eq!(compiled.default_verdict, default);
        for (addr, port, proto) in queries {
            let (verdict, rule_idx) = lookup(&compiled, addr, port, proto);
            let (want, want_rule) = reference_decide(&net.rules, default, addr, port, proto);
            prop_assert_eq!(verdict, want, "{} {}/{}", addr, port, proto);
            match want_rule {
                None => prop_assert_eq!(rule_idx, RULE_NONE),
                Some(want_rule) => {
                    // The contract: the deciding rule matches and is as
                    // specific as the reference's. (Ties between rules of one
                    // verdict could go to any of them.)
                    prop_assert_ne!(rule_idx, RULE_NONE);
                    let got = &net.rules[rule_idx as usize];
                    let want = &net.rules[want_rule as usize];
                    let alone = reference_decide(std::slice::from_ref(got), 0, addr, port, proto);
                    prop_assert_eq!(alone, (got.verdict.to_kernel(), Some(rule_idx)));
                    prop_assert_eq!(unified_len(got), unified_len(want));
                    // And what this compiler actually does: ties by file order.
                    prop_assert_eq!(rule_idx, want_rule);
                }
            }
        }
    }
}
