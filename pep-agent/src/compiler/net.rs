//! `network.rules` to LPM trie entries (see `pep_common::net`).
//!
//! SPEC: among the rules that match a destination (its CIDR holds the
//! address, the port is one of its ports, the protocol is its protocol), the
//! longest prefix wins and on a tie deny wins; no match means the default.
//!
//! The kernel does one LPM lookup and then scans a short list, so for every
//! distinct CIDR the compiler stores the rules of that CIDR *and of every
//! shorter CIDR that holds it*, longest first and deny before allow. Whatever
//! address the lookup lands on, the longest stored prefix that holds it is
//! `P`, and the rules whose CIDR holds the address are exactly those stored
//! under `P`; the first whose port and protocol match is the SPEC's winner.
//!
//! IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is IPv4: the kernel looks such
//! destinations up in the IPv4 trie, and a CIDR inside `::ffff:0:0/96` is
//! compiled as the IPv4 CIDR it spells. IPv6 CIDRs shorter than /96 (`::/0`)
//! therefore do not apply to IPv4 destinations in either form.
//!
//! `domain` rules are not compiled here: their addresses are only known once
//! the name resolves. They keep their index, so rule numbers stay those of
//! the file.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use pep_common::event::{RULE_NONE, VERDICT_ALLOW, VERDICT_DENY};
use pep_common::net::{
    MAX_RULES_PER_PREFIX, NetKeyV4, NetKeyV6, NetRule as KernelRule, NetRuleSet, PROTO_ANY,
    SANDBOX_PREFIX_BITS,
};

use super::CompileError;
use crate::policy::{NetDefault, NetRule, NetTarget, NetworkSection, Verdict};

/// Trie entries of one sandbox's network rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompiledNet {
    pub sandbox_id: u32,
    /// `(prefix_len, key, value)`; `prefix_len` counts the 32 sandbox bits.
    pub v4: Vec<(u32, NetKeyV4, NetRuleSet)>,
    pub v6: Vec<(u32, NetKeyV6, NetRuleSet)>,
    /// `VERDICT_*` when no entry matches. `network.default: ask` compiles to
    /// `VERDICT_DENY`: the kernel fails closed, and whoever wires the PDP
    /// reads `NetworkSection::default` to know it should ask.
    pub default_verdict: u32,
}

/// One rule's CIDR in the family the kernel looks it up in. Addresses are
/// kept as the high bits of a `u128` whose low `128 - width` bits are zero,
/// so both families share the prefix arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Prefix {
    v6: bool,
    len: u8,
    bits: u128,
}

impl Prefix {
    fn of(net: IpNet) -> Self {
        match canonical(net) {
            IpNet::V4(n) => Self {
                v6: false,
                len: n.prefix_len(),
                bits: u128::from(u32::from(n.network())) << 96,
            },
            IpNet::V6(n) => Self {
                v6: true,
                len: n.prefix_len(),
                bits: u128::from(n.network()),
            },
        }
    }

    /// Whether `self` holds `other` (both in the same family).
    fn holds(&self, other: &Self) -> bool {
        self.v6 == other.v6 && self.len <= other.len && mask(other.bits, self.len) == self.bits
    }

    fn net(&self) -> IpNet {
        if self.v6 {
            IpNet::V6(Ipv6Net::new(Ipv6Addr::from(self.bits), self.len).expect("len <= 128"))
        } else {
            let addr = Ipv4Addr::from((self.bits >> 96) as u32);
            IpNet::V4(Ipv4Net::new(addr, self.len).expect("len <= 32"))
        }
    }
}

fn mask(bits: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        l => bits & (u128::MAX << (128 - u32::from(l))),
    }
}

/// An IPv4-mapped IPv6 CIDR (inside `::ffff:0:0/96`) as its IPv4 CIDR.
fn canonical(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net
        && n.prefix_len() >= 96
        && let Some(v4) = n.network().to_ipv4_mapped()
    {
        return IpNet::V4(Ipv4Net::new(v4, n.prefix_len() - 96).expect("len <= 32"));
    }
    net.trunc()
}

/// One kernel entry with the prefix of the rule it came from.
#[derive(Clone, Copy, Debug)]
struct Entry {
    prefix: Prefix,
    rule: KernelRule,
}

/// Compiles the CIDR rules of `net` for sandbox `sandbox_id`.
pub fn compile_network(net: &NetworkSection, sandbox_id: u32) -> Result<CompiledNet, CompileError> {
    let entries = entries(&net.rules)?;
    let mut prefixes: Vec<Prefix> = entries.iter().map(|e| e.prefix).collect();
    // Longest first, so the output reads in precedence order.
    prefixes.sort_by_key(|p| (p.v6, Reverse(p.len), p.bits));
    prefixes.dedup();

    let mut out = CompiledNet {
        sandbox_id,
        v4: Vec::new(),
        v6: Vec::new(),
        default_verdict: match net.default {
            NetDefault::Allow => VERDICT_ALLOW,
            NetDefault::Deny | NetDefault::Ask => VERDICT_DENY,
        },
    };
    let groups = Groups::new(&entries);
    let sandbox = sandbox_id.to_be_bytes();
    for prefix in prefixes {
        let set = rule_set(prefix, &groups)?;
        let prefix_len = SANDBOX_PREFIX_BITS + u32::from(prefix.len);
        if prefix.v6 {
            let addr = prefix.bits.to_be_bytes();
            out.v6.push((
                prefix_len,
                NetKeyV6 {
                    sandbox_id: sandbox,
                    addr,
                },
                set,
            ));
        } else {
            let addr = ((prefix.bits >> 96) as u32).to_be_bytes();
            out.v4.push((
                prefix_len,
                NetKeyV4 {
                    sandbox_id: sandbox,
                    addr,
                },
                set,
            ));
        }
    }
    Ok(out)
}

/// Every CIDR rule as kernel entries (one per port range), in precedence
/// order: longest prefix first, deny before allow, then file order.
fn entries(rules: &[NetRule]) -> Result<Vec<Entry>, CompileError> {
    let mut out = Vec::new();
    for rule in rules {
        let NetTarget::Cidr(cidr) = rule.target else {
            continue;
        };
        let rule_idx = u16::try_from(rule.index).map_err(|_| CompileError::TooManyRules {
            rule: rule.name(),
            max: usize::from(u16::MAX) + 1,
        })?;
        let base = KernelRule {
            port_lo: 0,
            port_hi: u16::MAX,
            protocol: rule.protocol.map_or(PROTO_ANY, |p| p.number()),
            verdict: rule.verdict.to_kernel() as u8,
            rule_idx,
        };
        let prefix = Prefix::of(cidr);
        if rule.ports.is_empty() {
            out.push(Entry { prefix, rule: base });
        }
        for ports in &rule.ports {
            let rule = KernelRule {
                port_lo: ports.lo,
                port_hi: ports.hi,
                ..base
            };
            out.push(Entry { prefix, rule });
        }
    }
    // Stable: a rule's port ranges stay in file order.
    out.sort_by_key(|e| {
        (
            Reverse(e.prefix.len),
            e.rule.verdict != VERDICT_DENY as u8,
            e.rule.rule_idx,
        )
    });
    Ok(out)
}

/// The entries grouped by their own prefix, so that the entries holding a
/// prefix are found with one lookup per prefix length in use (at most 33
/// for IPv4, 129 for IPv6) rather than a scan of every entry: compiling
/// stays linear in the rules for each length, not quadratic.
struct Groups {
    /// Each group in precedence order (`entries` is sorted).
    by_prefix: HashMap<Prefix, Vec<Entry>>,
    /// The prefix lengths in use, per family (`[v4, v6]`), longest first.
    lens: [Vec<u8>; 2],
}

impl Groups {
    fn new(entries: &[Entry]) -> Self {
        let mut by_prefix: HashMap<Prefix, Vec<Entry>> = HashMap::new();
        let mut lens: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        for e in entries {
            by_prefix.entry(e.prefix).or_default().push(*e);
            lens[usize::from(e.prefix.v6)].push(e.prefix.len);
        }
        for l in &mut lens {
            l.sort_unstable_by_key(|len| Reverse(*len));
            l.dedup();
        }
        Self { by_prefix, lens }
    }

    /// The entries of every prefix holding `prefix`, in precedence order:
    /// longest holder first (two holders of one length would be the same
    /// prefix), each group in its own order.
    fn holding(&self, prefix: Prefix) -> impl Iterator<Item = &Entry> {
        self.lens[usize::from(prefix.v6)]
            .iter()
            .filter(move |len| **len <= prefix.len)
            .filter_map(move |len| {
                self.by_prefix.get(&Prefix {
                    v6: prefix.v6,
                    len: *len,
                    bits: mask(prefix.bits, *len),
                })
            })
            .flatten()
    }
}

/// The value stored under `prefix`: the entries of every rule whose CIDR
/// holds it, in precedence order, without those no lookup can reach.
fn rule_set(prefix: Prefix, groups: &Groups) -> Result<NetRuleSet, CompileError> {
    let mut kept: Vec<KernelRule> = Vec::new();
    for entry in groups.holding(prefix) {
        debug_assert!(entry.prefix.holds(&prefix));
        if !shadowed(&entry.rule, &kept) {
            kept.push(entry.rule);
        }
    }
    if kept.len() > MAX_RULES_PER_PREFIX {
        // The first entry is one of the prefix's own rules: it sorts first.
        return Err(CompileError::TooManyNetEntries {
            rule: format!("network.rules[{}]", kept[0].rule_idx),
            cidr: prefix.net(),
            entries: kept.len(),
            max: MAX_RULES_PER_PREFIX,
        });
    }
    let mut set = NetRuleSet {
        count: kept.len() as u32,
        ..NetRuleSet::default()
    };
    set.rules[..kept.len()].copy_from_slice(&kept);
    Ok(set)
}

/// Whether every (port, protocol) that `rule` matches is matched by some
/// entry of `earlier`, so the kernel's first-match scan never reaches it.
///
/// A protocol-specific entry is covered by earlier entries of that protocol
/// or of any protocol. An any-protocol entry also matches protocols that no
/// specific entry names (the hooks may see others than TCP and UDP), so only
/// earlier any-protocol entries cover it.
fn shadowed(rule: &KernelRule, earlier: &[KernelRule]) -> bool {
    let mut ranges: Vec<(u16, u16)> = earlier
        .iter()
        .filter(|e| e.protocol == PROTO_ANY || e.protocol == rule.protocol)
        .map(|e| (e.port_lo, e.port_hi))
        .collect();
    ranges.sort_unstable();
    // Sweep: `next` is the lowest port of the rule not yet covered.
    let mut next = u32::from(rule.port_lo);
    for (lo, hi) in ranges {
        if u32::from(lo) > next {
            break;
        }
        next = next.max(u32::from(hi) + 1);
    }
    next > u32::from(rule.port_hi)
}

/// What the kernel program decides for a destination, done the way it does
/// it: IPv4-mapped addresses in the IPv4 trie, longest matching key, first
/// entry whose port range and protocol match, else the default.
/// Returns `(VERDICT_*, rule_idx or RULE_NONE)`.
pub fn lookup(compiled: &CompiledNet, addr: IpAddr, port: u16, proto: u8) -> (u32, u32) {
    let sandbox = compiled.sandbox_id.to_be_bytes();
    let set = match addr {
        IpAddr::V4(a) => lpm_v4(compiled, sandbox, a),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(a) => lpm_v4(compiled, sandbox, a),
            None => {
                let mut key = [0u8; 20];
                key[..4].copy_from_slice(&sandbox);
                key[4..].copy_from_slice(&a.octets());
                compiled
                    .v6
                    .iter()
                    .filter(|(len, k, _)| key_matches(&[&k.sandbox_id[..], &k.addr].concat(), &key, *len))
                    .max_by_key(|(len, _, _)| *len)
                    .map(|(_, _, set)| set)
            }
        },
    };
    let Some(set) = set else {
        return (compiled.default_verdict, RULE_NONE);
    };
    set.rules[..set.count as usize]
        .iter()
        .find(|r| (r.port_lo..=r.port_hi).contains(&port) && (r.protocol == PROTO_ANY || r.protocol == proto))
        .map_or((compiled.default_verdict, RULE_NONE), |r| {
            (u32::from(r.verdict), u32::from(r.rule_idx))
        })
}

fn lpm_v4(compiled: &CompiledNet, sandbox: [u8; 4], addr: Ipv4Addr) -> Option<&NetRuleSet> {
    let mut key = [0u8; 8];
    key[..4].copy_from_slice(&sandbox);
    key[4..].copy_from_slice(&addr.octets());
    compiled
        .v4
        .iter()
        .filter(|(len, k, _)| key_matches(&[k.sandbox_id, k.addr].concat(), &key, *len))
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, _, set)| set)
}

/// Whether the first `prefix_len` bits of `stored` and `query` are equal.
fn key_matches(stored: &[u8], query: &[u8], prefix_len: u32) -> bool {
    let full = (prefix_len / 8) as usize;
    let rest = prefix_len % 8;
    if stored[..full] != query[..full] {
        return false;
    }
    rest == 0 || (stored[full] ^ query[full]) & (0xffu8 << (8 - rest)) == 0
}

/// SPEC's network decision, written from its words rather than from the
/// kernel's algorithm, to check `lookup(compile_network(..))` against.
///
/// Every address is put in IPv6 space (`a.b.c.d` as `::ffff:a.b.c.d`, an IPv4
/// `/n` as `/96+n`). An IPv4 destination, in either form, is matched by IPv4
/// rules only, in either form. Returns `(VERDICT_*, index of the deciding
/// rule)`; among equally specific matching rules of the same verdict the
/// lowest index.
pub fn reference_decide(
    rules: &[NetRule],
    default_verdict: u32,
    addr: IpAddr,
    port: u16,
    proto: u8,
) -> (u32, Option<u32>) {
    let ipv4_space = Ipv6Net::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96).expect("96");
    let dest = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    let dest_is_v4 = ipv4_space.contains(&dest);
    let winner = rules
        .iter()
        .filter_map(|rule| {
            let NetTarget::Cidr(cidr) = rule.target else {
                return None;
            };
            let net = match cidr {
                IpNet::V4(n) => {
                    Ipv6Net::new(n.network().to_ipv6_mapped(), n.prefix_len() + 96).expect("<=128")
                }
                IpNet::V6(n) => n,
            };
            let rule_is_v4 = ipv4_space.contains(&net);
            let matches = net.contains(&dest)
                && (!dest_is_v4 || rule_is_v4)
                && rule.covers_port(port)
                && rule.covers_protocol(proto);
            matches.then_some((net.prefix_len(), rule.verdict == Verdict::Deny, rule))
        })
        .max_by_key(|(len, deny, rule)| (*len, *deny, Reverse(rule.index)));
    match winner {
        Some((_, _, rule)) => (rule.verdict.to_kernel(), Some(rule.index as u32)),
        None => (default_verdict, None),
    }
}
