//! Deciding a name against the policy's `domain` rules.
//!
//! Among the domain rules whose pattern matches the name, the most specific
//! comes first: an exact name before any wildcard, a longer wildcard suffix
//! before a shorter one; at equal specificity deny before allow, then file
//! order. Each rule becomes one kernel entry per port range, in that order,
//! and the kernel's first match on (port, protocol) decides a connect to an
//! address the name resolved to. The name itself is allowed (forwarded and
//! its addresses learned) when at least one allow entry can still decide
//! some port and protocol; otherwise it is denied (NXDOMAIN).

use std::cmp::Reverse;

use pep_common::{
    dns::MAX_LEARNED_RULES,
    event::VERDICT_DENY,
    net::{NetRule as KernelRule, PROTO_ANY},
};

use crate::policy::{DomainPattern, NetRule, NetTarget, Verdict};

/// The domain rules of one policy.
#[derive(Debug, Clone, Default)]
pub struct DomainRules {
    rules: Vec<(DomainPattern, NetRule)>,
}

/// What the domain rules say about a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameDecision {
    /// Forward, and learn the answer's addresses with these entries.
    Allow {
        /// The most specific allow rule's index (the record's `rule`).
        rule_idx: u32,
        entries: Vec<KernelRule>,
    },
    /// NXDOMAIN; the most specific matching rule's index.
    Deny { rule_idx: u32 },
    /// No domain rule matches: `network.default` decides.
    NoMatch,
}

impl DomainRules {
    pub fn new(rules: &[NetRule]) -> Self {
        Self {
            rules: rules
                .iter()
                .filter_map(|r| match &r.target {
                    NetTarget::Domain(d) => Some((d.clone(), r.clone())),
                    NetTarget::Cidr(_) => None,
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides `name` (any case, trailing dot or not).
    pub fn decide(&self, name: &str) -> NameDecision {
        let mut matching: Vec<&(DomainPattern, NetRule)> =
            self.rules.iter().filter(|(p, _)| p.matches(name)).collect();
        if matching.is_empty() {
            return NameDecision::NoMatch;
        }
        matching.sort_by_key(|(p, r)| {
            (
                Reverse((!p.wildcard, p.suffix.len())),
                r.verdict != Verdict::Deny,
                r.index,
            )
        });
        let mut kept: Vec<KernelRule> = Vec::new();
        for (_, rule) in &matching {
            let base = KernelRule {
                port_lo: 1,
                port_hi: u16::MAX,
                protocol: rule.protocol.map_or(PROTO_ANY, |p| p.number()),
                verdict: rule.verdict.to_kernel() as u8,
                rule_idx: u16::try_from(rule.index).unwrap_or(u16::MAX),
            };
            let ranges: Vec<(u16, u16)> = if rule.ports.is_empty() {
                vec![(0, u16::MAX)]
            } else {
                rule.ports.iter().map(|p| (p.lo, p.hi)).collect()
            };
            for (lo, hi) in ranges {
                let e = KernelRule {
                    port_lo: lo,
                    port_hi: hi,
                    ..base
                };
                if !shadowed(&e, &kept) {
                    kept.push(e);
                }
            }
        }
        match kept.iter().find(|e| u32::from(e.verdict) != VERDICT_DENY) {
            Some(first_allow) => {
                let rule_idx = u32::from(first_allow.rule_idx);
                if kept.len() > MAX_LEARNED_RULES {
                    tracing::warn!(
                        "{name}: {} kernel entries, only the first {MAX_LEARNED_RULES} are kept",
                        kept.len()
                    );
                    kept.truncate(MAX_LEARNED_RULES);
                }
                NameDecision::Allow {
                    rule_idx,
                    entries: kept,
                }
            }
            None => NameDecision::Deny {
                rule_idx: matching[0].1.index as u32,
            },
        }
    }
}

/// Whether every (port, protocol) `rule` matches is matched by an entry of
/// `earlier` (the kernel's first-match scan never reaches it). An
/// any-protocol entry is covered only by earlier any-protocol entries.
fn shadowed(rule: &KernelRule, earlier: &[KernelRule]) -> bool {
    let mut ranges: Vec<(u16, u16)> = earlier
        .iter()
        .filter(|e| e.protocol == PROTO_ANY || e.protocol == rule.protocol)
        .map(|e| (e.port_lo, e.port_hi))
        .collect();
    ranges.sort_unstable();
    let mut next = u32::from(rule.port_lo);
    for (lo, hi) in ranges {
        if u32::from(lo) > next {
            break;
        }
        next = next.max(u32::from(hi) + 1);
    }
    next > u32::from(rule.port_hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LoadContext, load_str};

    fn rules(yaml: &str) -> DomainRules {
        let p = load_str(
            &format!("apiVersion: pep/v1\nnetwork:\n  default: deny\n  rules:\n{yaml}"),
            "t.yaml",
            &LoadContext::new("/root"),
        )
        .expect("policy");
        DomainRules::new(&p.network.rules)
    }

    #[test]
    fn exact_beats_wildcard_and_deny_wins_ties() {
        let r = rules(
            "    - allow: { domain: \"*.example.com\", ports: [443] }\n\
             \x20   - deny: { domain: \"bad.example.com\" }\n\
             \x20   - allow: { cidr: 10.0.0.0/8 }\n\
             \x20   - allow: { domain: \"API.example.com.\", ports: [80, 443], protocol: tcp }\n",
        );
        assert_eq!(r.decide("bad.example.com"), NameDecision::Deny { rule_idx: 1 });
        assert_eq!(r.decide("example.com"), NameDecision::NoMatch);
        let NameDecision::Allow { rule_idx, entries } = r.decide("api.EXAMPLE.com.") else {
            panic!("api allowed");
        };
        assert_eq!(rule_idx, 3);
        // Exact rule's two ports first, then the wildcard's 443 for UDP too.
        let ports: Vec<(u16, u16, u8)> = entries
            .iter()
            .map(|e| (e.port_lo, e.rule_idx, e.protocol))
            .collect();
        assert_eq!(ports, vec![(80, 3, 6), (443, 3, 6), (443, 0, 0)]);
        let NameDecision::Allow { rule_idx, .. } = r.decide("x.y.example.com") else {
            panic!("wildcard allowed");
        };
        assert_eq!(rule_idx, 0);
    }

    #[test]
    fn deny_shadowing_every_allow_denies_the_name() {
        let r = rules(
            "    - allow: { domain: \"*.example.com\", ports: [443] }\n\
             \x20   - deny: { domain: \"*.example.com\" }\n",
        );
        assert_eq!(r.decide("a.example.com"), NameDecision::Deny { rule_idx: 1 });
    }
}
