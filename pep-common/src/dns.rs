//! DNS-aware network policy (issue 7): steering a sandbox's DNS to the
//! agent's resolver, and the addresses that resolver learned from allowed
//! answers.
//!
//! - `DNS_STEER[sandbox_id]`: where that sandbox's port-53 traffic goes (the
//!   agent's resolver for that sandbox, on loopback). A sandbox without an
//!   entry is not steered.
//! - `DNS_ORIG[socket cookie]`: the server a steered socket asked, so replies
//!   (recvmsg) and getpeername report it rather than the resolver.
//! - `DNS_LEARNED[(sandbox, family, address)]`: what the sandbox may reach at
//!   an address an allowed name resolved to, until `expires_ns`.

use crate::net::NetRule;

/// The DNS port: every connect or send to it from a steered sandbox goes to
/// the resolver.
pub const DNS_PORT: u16 = 53;

/// Most rule entries one learned address carries (one per port range of each
/// matching domain rule). The resolver keeps the first ones, in precedence
/// order, and logs what it had to drop.
pub const MAX_LEARNED_RULES: usize = 8;

/// `DNS_STEER` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsSteer {
    /// The resolver's port, host order.
    pub port: u32,
    /// The resolver's IPv4 address, network order (for AF_INET sockets and
    /// IPv4-mapped destinations of AF_INET6 sockets).
    pub addr4: [u8; 4],
    /// The resolver's IPv6 address, network order (for AF_INET6 sockets).
    pub addr6: [u8; 16],
}

/// `DNS_ORIG` value: the destination a steered socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsOrig {
    /// Network order; for an AF_INET socket the first 4 bytes.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u32,
    /// `event::AF_INET` or `AF_INET6`: the socket's family.
    pub family: u32,
}

/// `DNS_LEARNED` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKey {
    pub sandbox_id: u32,
    /// `event::AF_INET` (IPv4 and IPv4-mapped) or `AF_INET6`.
    pub family: u32,
    /// Network order; IPv4 fills the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
}

/// `DNS_LEARNED` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedEntry {
    /// `bpf_ktime_get_boot_ns()` from which the entry no longer counts.
    pub expires_ns: u64,
    /// Entries of `rules` in use.
    pub count: u32,
    /// The resolver's id of the name (for `bpftool map dump`; the audit
    /// record's `net.domain` comes from the resolver's own table).
    pub domain_id: u32,
    /// In precedence order; the first whose port and protocol match decides.
    pub rules: [NetRule; MAX_LEARNED_RULES],
}
