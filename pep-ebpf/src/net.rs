//! Network enforcement: cgroup sock_addr hooks on connect and on sendmsg of
//! unconnected datagram sockets, attached to each sandbox's cgroup.
//!
//! Verdicts come from two LPM tries (IPv4, IPv6) keyed by sandbox id and
//! destination. The longest stored prefix holding the destination carries, in
//! precedence order, every rule that can apply to it; the first entry whose
//! port range and protocol match decides, else the sandbox's default does.
//! IPv4-mapped IPv6 destinations are looked up in the IPv4 trie, so an IPv6
//! socket cannot reach what IPv4 rules deny.
//!
//! Failure policy: fail closed. These programs run only in sandbox cgroups, so
//! a task with no sandbox entry here is one whose sandbox is being set up or
//! torn down, and it is denied.

use aya_ebpf::{
    macros::{cgroup_sock_addr, map},
    maps::{LpmTrie, lpm_trie::Key},
    programs::SockAddrContext,
};
use pep_common::{
    event::{
        AF_INET, AF_INET6, KIND_NET, NET_OP_CONNECT, NET_OP_SENDMSG, NetEvent, RULE_NONE, SOURCE_CACHE,
        SOURCE_DEFAULT, SOURCE_RULE, VERDICT_ALLOW, VERDICT_DENY,
    },
    net::{MAX_RULES_PER_PREFIX, NetKeyV4, NetKeyV6, NetRuleSet, PROTO_ANY, SANDBOX_PREFIX_BITS},
    sandbox::MODE_AUDIT,
};

use crate::{
    ask::{self, Miss},
    audit, dns, sandbox,
};

#[map]
static NET_V4: LpmTrie<NetKeyV4, NetRuleSet> = LpmTrie::with_max_entries(65536, 0);

#[map]
static NET_V6: LpmTrie<NetKeyV6, NetRuleSet> = LpmTrie::with_max_entries(65536, 0);

/// Return values of cgroup sock_addr programs.
const REJECT: i32 = 0;
const PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    on_v4(&ctx, NET_OP_CONNECT)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    on_v4(&ctx, NET_OP_SENDMSG)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    on_v6(&ctx, NET_OP_CONNECT)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    on_v6(&ctx, NET_OP_SENDMSG)
}

#[inline(always)]
fn on_v4(ctx: &SockAddrContext, op: u32) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    let addr = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let mut daddr = [0u8; 16];
    daddr[..4].copy_from_slice(&addr);
    decide(ctx, AF_INET, op, sa.protocol, daddr, port, Dest::V4(addr))
}

#[inline(always)]
fn on_v6(ctx: &SockAddrContext, op: u32) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    let ip = sa.user_ip6;
    let mut daddr = [0u8; 16];
    daddr[0..4].copy_from_slice(&ip[0].to_ne_bytes());
    daddr[4..8].copy_from_slice(&ip[1].to_ne_bytes());
    daddr[8..12].copy_from_slice(&ip[2].to_ne_bytes());
    daddr[12..16].copy_from_slice(&ip[3].to_ne_bytes());
    let port = u16::from_be(sa.user_port as u16);
    // ::ffff:a.b.c.d reaches a.b.c.d: IPv4 rules decide.
    let mapped = daddr[..10].iter().all(|b| *b == 0) && daddr[10] == 0xff && daddr[11] == 0xff;
    let dest = if mapped {
        Dest::V4([daddr[12], daddr[13], daddr[14], daddr[15]])
    } else {
        Dest::V6(daddr)
    };
    decide(ctx, AF_INET6, op, sa.protocol, daddr, port, dest)
}

enum Dest {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[inline(always)]
fn decide(
    ctx: &SockAddrContext,
    family: u32,
    op: u32,
    protocol: u32,
    daddr: [u8; 16],
    port: u16,
    dest: Dest,
) -> i32 {
    let Some(sb) = sandbox::current() else {
        return REJECT;
    };
    // DNS of a steered sandbox goes to the agent's resolver, which decides
    // and records each name (issue 7, `dns.rs`).
    if port == pep_common::dns::DNS_PORT
        && dns::steer(
            ctx,
            sb.config.sandbox_id,
            family,
            &daddr,
            family == AF_INET6 && matches!(dest, Dest::V4(_)),
        )
    {
        return PROCEED;
    }
    let sandbox_id = sb.config.sandbox_id.to_be_bytes();
    // The canonical destination: IPv4-mapped IPv6 is IPv4 (the DNS and PDP
    // caches key on it). The PDP's key is built in per-CPU scratch by
    // `ask::on_miss`: the 6.1 verifier's 512-byte stack is nearly used here.
    let (canon_family, canon) = match &dest {
        Dest::V4(a) => (
            AF_INET,
            [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        Dest::V6(a) => (AF_INET6, *a),
    };
    let rules = match dest {
        Dest::V4(addr) => NET_V4.get(Key::new(SANDBOX_PREFIX_BITS + 32, NetKeyV4 { sandbox_id, addr })),
        Dest::V6(addr) => NET_V6.get(Key::new(SANDBOX_PREFIX_BITS + 128, NetKeyV6 { sandbox_id, addr })),
    };
    let (verdict, source, rule_idx) = match rules
        .and_then(|set| first_match(set, port, protocol as u8))
        // Addresses the resolver learned from allowed names decide where no
        // CIDR rule matched (a CIDR deny beats a DNS answer; `dns.rs`).
        .or_else(|| dns::learned(sb.config.sandbox_id, canon_family, &canon, port, protocol as u8))
    {
        Some((verdict, idx)) => (verdict, SOURCE_RULE, idx),
        // `network.default: ask`: the verdict cache, else the PDP.
        None => match ask::on_miss(ctx, &sb, op, protocol, port, canon_family, &canon) {
            Miss::NotAsked => (sb.config.net_default, SOURCE_DEFAULT, RULE_NONE),
            Miss::Cached(verdict) => (verdict, SOURCE_CACHE, RULE_NONE),
            // The PDP task in userspace writes this attempt's record.
            Miss::Proceed => return PROCEED,
            Miss::Reject => return REJECT,
            // Could not be held: denied unasked, recorded here.
            Miss::Full => (VERDICT_DENY, SOURCE_DEFAULT, RULE_NONE),
        },
    };
    audit::emit(|ev: &mut NetEvent| {
        audit::fill_header(
            &mut ev.header,
            KIND_NET,
            &sb,
            verdict,
            source,
            rule_idx,
            &audit::Helpers::current(),
        );
        ev.family = family;
        ev.op = op;
        ev.protocol = protocol;
        ev.dport = u32::from(port);
        ev.daddr = daddr;
    });
    if verdict == VERDICT_ALLOW || sb.config.mode == MODE_AUDIT {
        PROCEED
    } else {
        REJECT
    }
}

/// The first rule of `set` that matches, as (verdict, rule index).
#[inline(always)]
fn first_match(set: &NetRuleSet, port: u16, protocol: u8) -> Option<(u32, u32)> {
    let count = set.count as usize;
    let mut i = 0;
    // Bounded by MAX_RULES_PER_PREFIX.
    while i < MAX_RULES_PER_PREFIX {
        if i >= count {
            break;
        }
        let r = &set.rules[i];
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
