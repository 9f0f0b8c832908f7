//! Compiled network rules: LPM trie keys and the rule sets stored under them.
//!
//! The trie finds the longest stored prefix that holds the destination. Its
//! value lists, in order of precedence, every rule whose CIDR holds that prefix
//! (its own rules first, then those of shorter prefixes), so the first entry
//! whose port and protocol match decides. The compiler in userspace builds that
//! order: longest prefix first and, within one prefix, deny before allow.

/// Most rules one prefix may carry, inherited ones included. A policy that
/// needs more is rejected at compile time rather than matched wrongly.
pub const MAX_RULES_PER_PREFIX: usize = 24;

/// Protocol wildcard.
pub const PROTO_ANY: u8 = 0;
/// IPPROTO_TCP.
pub const PROTO_TCP: u8 = 6;
/// IPPROTO_UDP.
pub const PROTO_UDP: u8 = 17;

/// Key data of the IPv4 trie: sandbox id then address, both in network order,
/// so the prefix length counts 32 bits of sandbox id plus the CIDR's bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetKeyV4 {
    pub sandbox_id: [u8; 4],
    pub addr: [u8; 4],
}

/// Key data of the IPv6 trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NetKeyV6 {
    pub sandbox_id: [u8; 4],
    pub addr: [u8; 16],
}

/// Bits of sandbox id in front of the address in a trie key.
pub const SANDBOX_PREFIX_BITS: u32 = 32;

/// One rule: a port range, a protocol and a verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRule {
    /// First port, host order.
    pub port_lo: u16,
    /// Last port, host order, inclusive.
    pub port_hi: u16,
    /// `PROTO_*`.
    pub protocol: u8,
    /// `crate::event::VERDICT_ALLOW` or `VERDICT_DENY`.
    pub verdict: u8,
    /// Index in the policy's `network.rules`, for the audit record.
    pub rule_idx: u16,
}

/// The value stored under a trie key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetRuleSet {
    /// How many entries of `rules` are in use.
    pub count: u32,
    pub _pad: u32,
    pub rules: [NetRule; MAX_RULES_PER_PREFIX],
}

impl Default for NetRuleSet {
    fn default() -> Self {
        Self {
            count: 0,
            _pad: 0,
            rules: [NetRule::default(); MAX_RULES_PER_PREFIX],
        }
    }
}
