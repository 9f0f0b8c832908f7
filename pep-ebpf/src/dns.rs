//! DNS-aware network policy (issue 7), kernel side.
//!
//! - Steering: `net.rs` calls `steer` for every connect or send to port 53
//!   from a sandbox that has a `DNS_STEER` entry. The destination is
//!   rewritten to the agent's resolver for that sandbox (one loopback port per
//!   sandbox, so the port tells the resolver who asks), and the server the
//!   application asked is kept in `DNS_ORIG` under the socket's cookie.
//!   `dns_recvmsg4/6` (UDP replies) and `dns_getpeername4/6` (TCP) put that
//!   server back, so the application sees the answer come from whom it asked
//!   (glibc drops UDP replies from another address). The rewrite happens
//!   before any packet exists: nothing a sandbox sends to port 53 ever leaves
//!   the host, whatever server its resolv.conf names.
//! - Learned addresses: `learned` looks the destination up in `DNS_LEARNED`,
//!   written by the resolver before it answers; an expired entry is ignored
//!   (userspace removes it later). `net.rs` consults it only where no CIDR rule
//!   matched, so a CIDR deny always beats an address a DNS answer supplied
//!   (no DNS rebinding into denied ranges).
//!
//! Failure policy: fail closed. A steered socket whose `DNS_ORIG` entry was
//! evicted (LRU) gets its reply reported from the resolver's address, which
//! glibc ignores (the lookup times out and is retried); a full `DNS_ORIG`
//! never lets a query out. A missing or expired learned entry is no allow.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
};
use pep_common::{
    dns::{DnsOrig, DnsSteer, LearnedEntry, LearnedKey, MAX_LEARNED_RULES},
    event::{AF_INET, AF_INET6, VERDICT_ALLOW, VERDICT_DENY},
    net::PROTO_ANY,
};

use crate::sandbox;

/// Steered sandboxes, by sandbox id.
#[map]
static DNS_STEER: HashMap<u32, DnsSteer> = HashMap::with_max_entries(4096, 0);

/// The server each steered socket asked, by socket cookie. LRU: bounded, and
/// an eviction only costs a retried lookup (see the failure policy).
#[map]
static DNS_ORIG: LruHashMap<u64, DnsOrig> = LruHashMap::with_max_entries(16384, 0);

/// Addresses learned from allowed answers. LRU: a flood of distinct names
/// evicts the least recently used entries instead of exhausting memory; an
/// evicted address is reachable again after a new lookup.
#[map]
static DNS_LEARNED: LruHashMap<LearnedKey, LearnedEntry> = LruHashMap::with_max_entries(65536, 0);

/// Rewrites a port-53 destination to the sandbox's resolver, if the sandbox
/// is steered. `family` is the socket's; `mapped` is true for an AF_INET6
/// socket sending to an IPv4-mapped address. Returns whether it steered.
#[inline(always)]
pub fn steer(ctx: &SockAddrContext, sandbox_id: u32, family: u32, daddr: &[u8; 16], mapped: bool) -> bool {
    // SAFETY: plain data written whole by userspace.
    let Some(target) = (unsafe { DNS_STEER.get(sandbox_id) }) else {
        return false;
    };
    // SAFETY: the sock_addr context is a valid helper argument.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    let orig = DnsOrig {
        addr: *daddr,
        port: u32::from(pep_common::dns::DNS_PORT),
        family,
    };
    // An LRU insert only fails on a kernel error; then the reply cannot be
    // restored and is dropped by the application: still nothing leaves.
    let _ = DNS_ORIG.insert(cookie, orig, 0);
    let port_be = u32::from((target.port as u16).to_be());
    // SAFETY: the context pointer is valid for the program's run, and the
    // user address and port are writable in connect and sendmsg programs.
    let sa = unsafe { &mut *ctx.sock_addr };
    if family == AF_INET {
        sa.user_ip4 = u32::from_ne_bytes(target.addr4);
    } else if mapped {
        let a = target.addr4;
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        sa.user_ip6[3] = u32::from_ne_bytes(a);
    } else {
        let a = target.addr6;
        sa.user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        sa.user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
        sa.user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
        sa.user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    }
    sa.user_port = port_be;
    true
}

/// The learned entry's verdict for a destination no CIDR rule matched, as
/// (verdict, rule index). `family`/`addr` as in `VerdictKey` (IPv4-mapped is
/// `AF_INET`). `None`: nothing learned, or expired.
#[inline(always)]
pub fn learned(sandbox_id: u32, family: u32, addr: &[u8; 16], port: u16, protocol: u8) -> Option<(u32, u32)> {
    let key = LearnedKey {
        sandbox_id,
        family,
        addr: *addr,
    };
    // SAFETY: plain data written whole by userspace.
    let entry = unsafe { DNS_LEARNED.get(key) }?;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if now >= entry.expires_ns {
        return None;
    }
    let count = entry.count as usize;
    let mut i = 0;
    // Bounded by MAX_LEARNED_RULES.
    while i < MAX_LEARNED_RULES {
        if i >= count {
            break;
        }
        let r = &entry.rules[i];
        if port >= r.port_lo && port <= r.port_hi && (r.protocol == PROTO_ANY || r.protocol == protocol) {
            let verdict = if u32::from(r.verdict) == VERDICT_DENY {
                VERDICT_DENY
            } else {
                VERDICT_ALLOW
            };
            return Some((verdict, u32::from(r.rule_idx)));
        }
        i += 1;
    }
    None
}

/// Return value of recvmsg and getpeername programs (they may not refuse).
const DONE: i32 = 1;

#[cgroup_sock_addr(recvmsg4)]
pub fn dns_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, AF_INET);
    DONE
}

#[cgroup_sock_addr(recvmsg6)]
pub fn dns_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, AF_INET6);
    DONE
}

#[cgroup_sock_addr(getpeername4)]
pub fn dns_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, AF_INET);
    DONE
}

#[cgroup_sock_addr(getpeername6)]
pub fn dns_getpeername6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, AF_INET6);
    DONE
}

/// If the peer address being reported is the sandbox's resolver and the
/// socket was steered, reports the server the application asked instead.
#[inline(always)]
fn restore(ctx: &SockAddrContext, family: u32) {
    let Some(sb) = sandbox::current() else {
        return;
    };
    // SAFETY: plain data written whole by userspace.
    let Some(target) = (unsafe { DNS_STEER.get(sb.config.sandbox_id) }) else {
        return;
    };
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.user_port != u32::from((target.port as u16).to_be()) {
        return;
    }
    let from_resolver = if family == AF_INET {
        sa.user_ip4 == u32::from_ne_bytes(target.addr4)
    } else {
        let a = target.addr6;
        let is6 = sa.user_ip6[0] == u32::from_ne_bytes([a[0], a[1], a[2], a[3]])
            && sa.user_ip6[1] == u32::from_ne_bytes([a[4], a[5], a[6], a[7]])
            && sa.user_ip6[2] == u32::from_ne_bytes([a[8], a[9], a[10], a[11]])
            && sa.user_ip6[3] == u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
        let is_mapped4 = sa.user_ip6[0] == 0
            && sa.user_ip6[1] == 0
            && sa.user_ip6[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
            && sa.user_ip6[3] == u32::from_ne_bytes(target.addr4);
        is6 || is_mapped4
    };
    if !from_resolver {
        return;
    }
    // SAFETY: the sock_addr context is a valid helper argument.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    // SAFETY: plain data written whole by `steer`.
    let Some(orig) = (unsafe { DNS_ORIG.get(cookie) }) else {
        return;
    };
    if orig.family != family {
        return;
    }
    let a = orig.addr;
    if family == AF_INET {
        sa.user_ip4 = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
    } else {
        sa.user_ip6[0] = u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
        sa.user_ip6[1] = u32::from_ne_bytes([a[4], a[5], a[6], a[7]]);
        sa.user_ip6[2] = u32::from_ne_bytes([a[8], a[9], a[10], a[11]]);
        sa.user_ip6[3] = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
    }
    sa.user_port = u32::from((orig.port as u16).to_be());
}
