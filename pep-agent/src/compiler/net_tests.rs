//! `compile_network` and `lookup` on hand-written policies.

use std::net::IpAddr;

use pep_common::event::{RULE_NONE, VERDICT_ALLOW, VERDICT_DENY};
use pep_common::net::{MAX_RULES_PER_PREFIX, NetRule as KernelRule, PROTO_ANY, PROTO_TCP, PROTO_UDP};

use super::CompileError;
use super::net::{CompiledNet, compile_network, lookup, reference_decide};
use crate::policy::{LoadContext, NetworkSection, load_str};

const ALLOW: u32 = VERDICT_ALLOW;
const DENY: u32 = VERDICT_DENY;
const ICMP: u8 = 1;

/// The `network:` section of a policy whose body is `yaml`.
fn section(yaml: &str) -> NetworkSection {
    let text = format!("apiVersion: pep/v1\n{yaml}");
    load_str(&text, "t.yaml", &LoadContext::new("/home/t"))
        .unwrap_or_else(|e| panic!("{e}"))
        .network
}

fn compile(yaml: &str) -> (NetworkSection, CompiledNet) {
    let net = section(yaml);
    let compiled = compile_network(&net, 7).unwrap_or_else(|e| panic!("{e}"));
    (net, compiled)
}

/// Asserts `lookup` gives `expected` and agrees with the reference.
fn check(net: &NetworkSection, c: &CompiledNet, addr: &str, port: u16, proto: u8, expected: (u32, u32)) {
    let addr: IpAddr = addr.parse().unwrap();
    let got = lookup(c, addr, port, proto);
    assert_eq!(got, expected, "{addr} {port}/{proto}");
    let (verdict, rule) = reference_decide(&net.rules, c.default_verdict, addr, port, proto);
    assert_eq!(
        (verdict, rule.unwrap_or(RULE_NONE)),
        got,
        "reference for {addr} {port}/{proto}"
    );
}

fn rules_of(set: &pep_common::net::NetRuleSet) -> Vec<(u16, u16, u8, u32, u16)> {
    set.rules[..set.count as usize]
        .iter()
        .map(|r: &KernelRule| (r.port_lo, r.port_hi, r.protocol, u32::from(r.verdict), r.rule_idx))
        .collect()
}

#[test]
fn longer_deny_beats_shorter_allow() {
    let (net, c) = compile(
        "network:
  default: deny
  rules:
    - allow: { cidr: 10.0.0.0/8, ports: [443] }
    - deny: { cidr: 10.1.0.0/16 }
",
    );
    assert_eq!(c.default_verdict, DENY);
    assert_eq!(c.sandbox_id, 7);
    assert!(c.v6.is_empty());
    // Longest prefix first in the output; prefix lengths count the sandbox id.
    let keys: Vec<_> =
        c.v4.iter()
            .map(|(len, k, _)| (*len, k.sandbox_id, k.addr))
            .collect();
    assert_eq!(
        keys,
        [
            (48, [0, 0, 0, 7], [10, 1, 0, 0]),
            (40, [0, 0, 0, 7], [10, 0, 0, 0])
        ]
    );
    // Under 10.1/16 the inherited allow can never be reached: pruned.
    assert_eq!(rules_of(&c.v4[0].2), [(0, 65535, PROTO_ANY, DENY, 1)]);
    assert_eq!(rules_of(&c.v4[1].2), [(443, 443, PROTO_ANY, ALLOW, 0)]);

    check(&net, &c, "10.2.3.4", 443, PROTO_TCP, (ALLOW, 0));
    check(&net, &c, "10.1.2.3", 443, PROTO_TCP, (DENY, 1));
    check(&net, &c, "10.1.2.3", 80, PROTO_UDP, (DENY, 1));
    check(&net, &c, "10.2.3.4", 80, PROTO_TCP, (DENY, RULE_NONE));
    check(&net, &c, "11.0.0.1", 443, PROTO_TCP, (DENY, RULE_NONE));
    check(&net, &c, "::ffff:10.1.0.9", 443, PROTO_TCP, (DENY, 1));
    check(&net, &c, "::ffff:10.9.0.9", 443, PROTO_TCP, (ALLOW, 0));
}

#[test]
fn spec_example_network_rules() {
    let (net, c) = compile(
        r#"network:
  default: deny
  rules:
    - allow: { cidr: 127.0.0.0/8, ports: [8080, "9000-9100"], protocol: tcp }
    - deny:  { cidr: 169.254.169.254/32 }
    - allow: { domain: "*.github.com", ports: [443] }
"#,
    );
    assert_eq!(c.v4.len(), 2, "the domain rule is not compiled");
    check(&net, &c, "127.0.0.1", 8080, PROTO_TCP, (ALLOW, 0));
    check(&net, &c, "127.0.0.1", 9000, PROTO_TCP, (ALLOW, 0));
    check(&net, &c, "127.1.2.3", 9100, PROTO_TCP, (ALLOW, 0));
    check(&net, &c, "127.0.0.1", 9101, PROTO_TCP, (DENY, RULE_NONE));
    check(&net, &c, "127.0.0.1", 8999, PROTO_TCP, (DENY, RULE_NONE));
    check(&net, &c, "127.0.0.1", 8080, PROTO_UDP, (DENY, RULE_NONE));
    check(&net, &c, "169.254.169.254", 80, PROTO_TCP, (DENY, 1));
    check(&net, &c, "::ffff:169.254.169.254", 80, PROTO_TCP, (DENY, 1));
    check(&net, &c, "140.82.112.3", 443, PROTO_TCP, (DENY, RULE_NONE));
}

#[test]
fn protocol_specific_rules() {
    let (net, c) = compile(
        "network:
  default: deny
  rules:
    - allow: { cidr: 0.0.0.0/0 }
    - deny: { cidr: 0.0.0.0/0, ports: [53], protocol: udp }
    - allow: { cidr: 8.8.8.8/32, ports: [53], protocol: udp }
",
    );
    check(&net, &c, "1.1.1.1", 53, PROTO_UDP, (DENY, 1));
    check(&net, &c, "1.1.1.1", 53, PROTO_TCP, (ALLOW, 0));
    check(&net, &c, "1.1.1.1", 53, ICMP, (ALLOW, 0));
    check(&net, &c, "8.8.8.8", 53, PROTO_UDP, (ALLOW, 2));
    check(&net, &c, "8.8.8.8", 54, PROTO_UDP, (ALLOW, 0));
    // /0 is stored with prefix length 32: it matches every address of the sandbox.
    assert!(c.v4.iter().any(|(len, k, _)| *len == 32 && k.addr == [0; 4]));
}

#[test]
fn ties_go_to_deny() {
    let (net, c) = compile(
        "network:
  rules:
    - allow: { cidr: 192.0.2.0/24, ports: [80, 443] }
    - deny: { cidr: 192.0.2.0/24, ports: [443, 8443] }
    - allow: { cidr: 192.0.2.0/24 }
",
    );
    assert_eq!(c.default_verdict, ALLOW);
    check(&net, &c, "192.0.2.1", 443, PROTO_TCP, (DENY, 1));
    check(&net, &c, "192.0.2.1", 8443, PROTO_TCP, (DENY, 1));
    check(&net, &c, "192.0.2.1", 80, PROTO_TCP, (ALLOW, 0));
    check(&net, &c, "192.0.2.1", 22, PROTO_TCP, (ALLOW, 2));
    // allow 443 (rule 0) is behind deny 443: pruned. Deny first, then allows.
    assert_eq!(
        rules_of(&c.v4[0].2),
        [
            (443, 443, PROTO_ANY, DENY, 1),
            (8443, 8443, PROTO_ANY, DENY, 1),
            (80, 80, PROTO_ANY, ALLOW, 0),
            (0, 65535, PROTO_ANY, ALLOW, 2),
        ]
    );
}

#[test]
fn pruning_uses_the_union_of_earlier_entries() {
    let (net, c) = compile(
        "network:
  rules:
    - deny: { cidr: 10.0.0.0/16, ports: ['1-100'], protocol: tcp }
    - deny: { cidr: 10.0.0.0/16, ports: ['101-65535'], protocol: tcp }
    - allow: { cidr: 10.0.0.0/8, ports: ['1-65535'], protocol: tcp }
    - allow: { cidr: 10.0.0.0/8, ports: ['50-60'] }
",
    );
    let inner = &c.v4.iter().find(|(len, _, _)| *len == 48).unwrap().2;
    // Rule 2 (tcp 1-65535) is covered by rules 0 and 1 together; rule 3 is
    // any-protocol, which the tcp entries do not cover.
    assert_eq!(
        rules_of(inner),
        [
            (1, 100, PROTO_TCP, DENY, 0),
            (101, 65535, PROTO_TCP, DENY, 1),
            (50, 60, PROTO_ANY, ALLOW, 3),
        ]
    );
    check(&net, &c, "10.0.1.1", 55, PROTO_TCP, (DENY, 0));
    check(&net, &c, "10.0.1.1", 55, PROTO_UDP, (ALLOW, 3));
    check(&net, &c, "10.0.1.1", 0, PROTO_TCP, (ALLOW, RULE_NONE));
    check(&net, &c, "10.1.1.1", 0, PROTO_TCP, (ALLOW, RULE_NONE));
    check(&net, &c, "10.1.1.1", 55, PROTO_TCP, (ALLOW, 2));
}

#[test]
fn ipv6() {
    let (net, c) = compile(
        "network:
  default: allow
  rules:
    - deny: { cidr: '2001:db8::/32' }
    - allow: { cidr: '2001:db8:1::/48', ports: [443], protocol: tcp }
    - deny: { cidr: '::/0', ports: [25] }
",
    );
    assert!(c.v4.is_empty());
    let keys: Vec<_> = c.v6.iter().map(|(len, k, _)| (*len, k.addr)).collect();
    let mut a48 = [0u8; 16];
    a48[..6].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1]);
    let mut a32 = [0u8; 16];
    a32[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    assert_eq!(keys, [(80, a48), (64, a32), (32, [0; 16])]);
    check(&net, &c, "2001:db8:1::1", 443, PROTO_TCP, (ALLOW, 1));
    check(&net, &c, "2001:db8:1::1", 443, PROTO_UDP, (DENY, 0));
    check(&net, &c, "2001:db8:2::1", 443, PROTO_TCP, (DENY, 0));
    check(&net, &c, "2001:db9::1", 25, PROTO_TCP, (DENY, 2));
    check(&net, &c, "2001:db9::1", 443, PROTO_TCP, (ALLOW, RULE_NONE));
    // An IPv4 destination, in either form, is not matched by `::/0`.
    check(&net, &c, "192.0.2.1", 25, PROTO_TCP, (ALLOW, RULE_NONE));
    check(&net, &c, "::ffff:192.0.2.1", 25, PROTO_TCP, (ALLOW, RULE_NONE));
}

#[test]
fn ipv4_mapped_cidrs_go_to_the_ipv4_trie() {
    let (net, c) = compile(
        "network:
  default: deny
  rules:
    - allow: { cidr: '::ffff:10.0.0.0/104' }
    - deny: { cidr: 10.1.0.0/16 }
    - allow: { cidr: '::ffff:0:0/96', ports: [53] }
",
    );
    assert!(c.v6.is_empty());
    let keys: Vec<_> = c.v4.iter().map(|(len, k, _)| (*len, k.addr)).collect();
    assert_eq!(keys, [(48, [10, 1, 0, 0]), (40, [10, 0, 0, 0]), (32, [0; 4])]);
    check(&net, &c, "10.2.0.1", 80, PROTO_TCP, (ALLOW, 0));
    check(&net, &c, "::ffff:10.2.0.1", 80, PROTO_TCP, (ALLOW, 0));
    check(&net, &c, "::ffff:10.1.0.1", 80, PROTO_TCP, (DENY, 1));
    check(&net, &c, "9.9.9.9", 53, PROTO_UDP, (ALLOW, 2));
    check(&net, &c, "9.9.9.9", 54, PROTO_UDP, (DENY, RULE_NONE));
    // Not IPv4-mapped (IPv4-compatible): an IPv6 destination, no v6 rules.
    check(&net, &c, "::10.2.0.1", 80, PROTO_TCP, (DENY, RULE_NONE));
}

#[test]
fn ask_compiles_to_deny_and_sandboxes_are_keyed_apart() {
    let (net, c) = compile("network:\n  default: ask\n  rules:\n    - allow: { cidr: 10.0.0.0/8 }\n");
    assert_eq!(c.default_verdict, DENY);
    let other = compile_network(&net, 0x0102_0304).unwrap();
    assert_eq!(other.v4[0].1.sandbox_id, [1, 2, 3, 4]);
    assert_eq!(
        lookup(&other, "10.0.0.1".parse().unwrap(), 1, PROTO_TCP),
        (ALLOW, 0)
    );
    // A set compiled for sandbox 7 never answers for another sandbox's key.
    let mut foreign = c.clone();
    foreign.sandbox_id = 8;
    assert_eq!(
        lookup(&foreign, "10.0.0.1".parse().unwrap(), 1, PROTO_TCP),
        (DENY, RULE_NONE)
    );
}

#[test]
fn too_many_entries_is_an_error_naming_the_rule() {
    let ports: Vec<String> = (1..=MAX_RULES_PER_PREFIX).map(|p| p.to_string()).collect();
    let ok = format!(
        "network:\n  rules:\n    - allow: {{ cidr: 10.0.0.0/8, ports: [{}] }}\n",
        ports.join(", ")
    );
    compile(&ok);
    let too_many = format!("{ok}    - deny: {{ cidr: 10.1.0.0/16, ports: [1000] }}\n");
    let err = compile_network(&section(&too_many), 1).unwrap_err();
    assert!(
        matches!(err, CompileError::TooManyNetEntries { entries: 25, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with("network.rules[1] (10.1.0.0/16): "),
        "{err}"
    );
    // Shadowed entries do not count against the limit.
    let shadowing = format!("{ok}    - deny: {{ cidr: 10.1.0.0/16 }}\n");
    let (net, c) = compile(&shadowing);
    check(&net, &c, "10.1.0.1", 5, PROTO_TCP, (DENY, 1));
}
