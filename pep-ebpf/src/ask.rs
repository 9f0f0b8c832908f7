//! Asking the PDP: the verdict cache, and holding a TCP connect while
//! userspace decides (see `pep_common::ask`).
//!
//! A held connect: `connect4/6` (in `net.rs`) find no rule and no live cache
//! entry, store an `AskEvent` in `PENDING` under the socket's cookie and let
//! the connect proceed. `ask_sock_ops` then, at `TIMEOUT_INIT` (the SYN is
//! being built, the local address exists), sets a 1-jiffy SYN timeout and a
//! bounded `TCP_SYNCNT`, and sends the event to userspace once.
//! `ask_egress` drops every packet of a pending socket: TCP treats the drop
//! as a loss and retransmits the SYN a jiffy later, so a blocking connect
//! simply waits. Userspace writes the verdict into `VERDICT_CACHE`, then
//! either deletes the `PENDING` entry (allow: the next retransmit leaves) or
//! destroys the socket with SOCK_DESTROY (deny: the application sees
//! ECONNABORTED). If no verdict ever comes, the SYN retries run out and the
//! connect fails with ETIMEDOUT: nothing waits without bound.
//!
//! An exec miss (`exec.default: ask`, see `on_exec_miss`) cannot be held:
//! `bprm_check_security` must answer now. The attempt fails (goes ahead in
//! audit mode) and the PDP is asked; the answer, cached under the file's
//! inode identity, serves the next exec of that file.
//!
//! `PENDING` is a plain hash map, never an LRU: an eviction would release a
//! held SYN. Entries of sockets that close while pending are removed at
//! `STATE_CB` (enabled for held sockets only).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TIMEOUT_INIT,
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_setsockopt},
    macros::{cgroup_skb, map, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
};
use pep_common::{
    ask::{
        ACTION_EXEC, ACTION_NET_CONNECT, ASK_ALLOWED_NOW, ASK_DENIED_NOW, ASK_FLAG_EXEC, ASK_FLAG_NET,
        ASK_HELD, AppliedAnswer, AppliedKey, AskEvent, AskSandbox, ExecAskEvent, KIND_ASK, KIND_ASK_EXEC,
        VerdictEntry, VerdictKey,
    },
    event::{
        ARGV_LEN, COUNTER_ASK_LOST, COUNTER_ASK_UNRECORDED, COUNTER_CACHE_HIT, COUNTER_CACHE_MISS,
        EXEC_OP_EXEC, PATH_MAX_LEN, RULE_NONE, SOURCE_PDP, VERDICT_DENY,
    },
    net::PROTO_TCP,
    sandbox::MODE_AUDIT,
};

use crate::{audit, sandbox::Sandbox, vfs};

/// Cached PDP verdicts. LRU: the size is bounded and an evicted verdict is
/// only asked again.
#[map]
static VERDICT_CACHE: LruHashMap<VerdictKey, VerdictEntry> = LruHashMap::with_max_entries(65536, 0);

/// Sandboxes that ask, by sandbox id.
#[map]
static ASK_SANDBOXES: HashMap<u32, AskSandbox> = HashMap::with_max_entries(4096, 0);

/// Held connects by socket cookie.
#[map]
static PENDING: HashMap<u64, AskEvent> = HashMap::with_max_entries(16384, 0);

/// Misses for userspace to ask about. Separate from the audit stream so
/// asking never waits behind audit records.
#[map]
static ASKS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Wake the reader for every ask: a held connect waits on it, so no
/// batching of wakeups.
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Answers the host daemon has applied whose records may not be in its log
/// yet (`pep_common::ask::AppliedAnswer`). Userspace alone reads and writes
/// it; pinned, it outlives a daemon killed in between.
#[map]
static ASK_APPLIED: HashMap<AppliedKey, AppliedAnswer> = HashMap::with_max_entries(16384, 0);

/// Scratch space for building an event off the 512-byte stack.
#[map]
static ASK_SCRATCH: PerCpuArray<AskEvent> = PerCpuArray::with_max_entries(1, 0);

/// The key of an exec miss, built off the stack (`bprm_check_security` is
/// near its limit).
#[map]
static EXEC_ASK_KEY: PerCpuArray<VerdictKey> = PerCpuArray::with_max_entries(1, 0);

/// `SOL_TCP`, `TCP_SYNCNT`, `TCP_BPF_IW` (linux/tcp.h).
const SOL_TCP: i32 = 6;
const TCP_SYNCNT: i32 = 7;
const TCP_BPF_IW: i32 = 1001;
/// The kernel's default initial congestion window, restored after a hold
/// (more than one SYN retransmit makes the kernel start with 1).
const INITIAL_CWND: i32 = 10;
/// `TCP_CLOSE` in `enum tcp_state`.
const TCP_CLOSE: u32 = 7;

/// What became of an attempt that no compiled rule decided.
pub enum Miss {
    /// The sandbox does not ask: its default decides.
    NotAsked,
    /// A live cached verdict (`VERDICT_*`) decides.
    Cached(u32),
    /// The attempt goes ahead now: a held connect, or audit mode.
    Proceed,
    /// The attempt fails now; the PDP is asked, and the PDP task writes
    /// the attempt's record (or, if the ask could not be sent, the kernel
    /// counts it in `COUNTER_ASK_UNRECORDED`).
    Reject,
    /// Too many connects are held: this one fails now, unasked, and the
    /// caller records it (fail closed).
    Full,
}

/// Consults the cache for the destination (`family`, `daddr`: canonical,
/// IPv4-mapped IPv6 given as IPv4) and, on a miss, holds or asks. The key
/// and the event are built in per-CPU scratch, not on the stack (connect4/6
/// are near its limit).
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is looked up where it lies in scratch; by value it would be copied onto the full stack"
)]
pub fn on_miss(
    ctx: &SockAddrContext,
    sb: &Sandbox,
    op: u32,
    protocol: u32,
    port: u16,
    family: u32,
    daddr: &[u8; 16],
) -> Miss {
    // SAFETY: plain data written whole by userspace.
    let Some(cfg) = (unsafe { ASK_SANDBOXES.get(sb.config.sandbox_id) }) else {
        return Miss::NotAsked;
    };
    if cfg.flags & ASK_FLAG_NET == 0 {
        return Miss::NotAsked;
    }
    let Some(ev) = ASK_SCRATCH.get_ptr_mut(0) else {
        // Unreachable (a per-CPU slot always exists): fail closed, counted.
        audit::bump(COUNTER_ASK_LOST);
        return Miss::Full;
    };
    // SAFETY: this CPU's scratch slot, used only within this program run.
    let ev = unsafe { &mut *ev };
    let key = &mut ev.key;
    key.sandbox_id = sb.config.sandbox_id;
    key.action = op;
    key.protocol = protocol;
    key.dport = u32::from(port);
    key._pad = 0;
    key.family = family;
    key.daddr = *daddr;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: plain data written whole by userspace.
    if let Some(entry) = unsafe { VERDICT_CACHE.get(&ev.key) }
        && entry.revision == cfg.revision
        && now < entry.expires_ns
    {
        audit::bump(COUNTER_CACHE_HIT);
        return Miss::Cached(entry.verdict);
    }
    audit::bump(COUNTER_CACHE_MISS);
    let audit_mode = sb.config.mode == MODE_AUDIT;
    let hold = protocol == u32::from(PROTO_TCP) && op == ACTION_NET_CONNECT && !audit_mode;
    audit::fill_header(
        &mut ev.header,
        KIND_ASK,
        sb,
        VERDICT_DENY,
        SOURCE_PDP,
        RULE_NONE,
        &audit::Helpers::current(),
    );
    ev.saddr = [0; 16];
    ev.sport = 0;
    ev.sent = 0;
    ev.sock_family = ev.key.family;
    if hold {
        // SAFETY: the sock_addr context is a valid helper argument.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
        ev.cookie = cookie;
        ev.disposition = ASK_HELD;
        if PENDING.insert(cookie, ev, 0).is_err() {
            // Too many held connects: fail closed, now.
            audit::bump(COUNTER_ASK_LOST);
            return Miss::Full;
        }
        return Miss::Proceed;
    }
    ev.cookie = 0;
    ev.disposition = if audit_mode {
        ASK_ALLOWED_NOW
    } else {
        ASK_DENIED_NOW
    };
    if ASKS.output::<AskEvent>(&*ev, BPF_RB_FORCE_WAKEUP).is_err() {
        audit::bump(COUNTER_ASK_LOST);
        audit::bump(COUNTER_ASK_UNRECORDED);
    }
    if audit_mode { Miss::Proceed } else { Miss::Reject }
}

/// What became of an exec that no compiled rule decided.
pub enum ExecMiss {
    /// The sandbox does not ask: `exec.default` decides.
    NotAsked,
    /// A live cached verdict (`VERDICT_*`) decides.
    Cached(u32),
    /// The attempt fails now (goes ahead in audit mode); the PDP is asked
    /// and the PDP task writes this attempt's record.
    Asked,
    /// No room to ask: `exec.default` (deny) decides and records it.
    Lost,
}

/// `exec.default: ask`: consults the cache for the executed file (by its
/// `inode`'s identity: a hard link shares the verdict) and, on a miss, sends the exec's
/// record (`path`, `argv`: the scratch buffers the audit record is copied
/// from) to userspace to ask about.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the key is looked up where it lies in scratch; by value it would be copied onto the full stack"
)]
pub fn on_exec_miss(
    sb: &Sandbox,
    inode: *const u8,
    path: *const u8,
    path_len: u32,
    argv: *const u8,
    argc: u32,
    argv_len: u32,
) -> ExecMiss {
    // SAFETY: plain data written whole by userspace.
    let Some(cfg) = (unsafe { ASK_SANDBOXES.get(sb.config.sandbox_id) }) else {
        return ExecMiss::NotAsked;
    };
    if cfg.flags & ASK_FLAG_EXEC == 0 {
        return ExecMiss::NotAsked;
    }
    let revision = cfg.revision;
    if inode.is_null() {
        // No identity to cache under: the default (deny) decides.
        return ExecMiss::Lost;
    }
    let (dev, ino) = vfs::inode_id(inode);
    let Some(key) = EXEC_ASK_KEY.get_ptr_mut(0) else {
        audit::bump(COUNTER_ASK_LOST);
        return ExecMiss::Lost;
    };
    // SAFETY: this CPU's scratch slot, used only within this program run.
    let key = unsafe { &mut *key };
    key.sandbox_id = sb.config.sandbox_id;
    key.action = ACTION_EXEC;
    key.family = 0;
    key.protocol = 0;
    key.dport = 0;
    key._pad = 0;
    // SAFETY: 16 bytes, written as two unaligned u64s.
    unsafe {
        core::ptr::write_unaligned(key.daddr.as_mut_ptr() as *mut u64, dev.to_le());
        core::ptr::write_unaligned(key.daddr.as_mut_ptr().add(8) as *mut u64, ino.to_le());
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: plain data written whole by userspace.
    if let Some(entry) = unsafe { VERDICT_CACHE.get(&*key) }
        && entry.revision == revision
        && now < entry.expires_ns
    {
        audit::bump(COUNTER_CACHE_HIT);
        return ExecMiss::Cached(entry.verdict);
    }
    audit::bump(COUNTER_CACHE_MISS);
    let Some(mut entry) = ASKS.reserve::<ExecAskEvent>(0) else {
        audit::bump(COUNTER_ASK_LOST);
        return ExecMiss::Lost;
    };
    // SAFETY: every field is written below before submit (plain integers).
    let ev = unsafe { &mut *entry.as_mut_ptr() };
    audit::fill_header(
        &mut ev.exec.header,
        KIND_ASK_EXEC,
        sb,
        VERDICT_DENY,
        SOURCE_PDP,
        RULE_NONE,
        &audit::Helpers::current(),
    );
    ev.exec.op = EXEC_OP_EXEC;
    ev.exec.path_len = path_len;
    ev.exec.argc = argc;
    ev.exec.argv_len = argv_len;
    vfs::copy(ev.exec.path.as_mut_ptr(), path, PATH_MAX_LEN);
    vfs::copy(ev.exec.argv.as_mut_ptr(), argv, ARGV_LEN);
    vfs::copy(
        (&mut ev.key as *mut VerdictKey).cast(),
        (key as *const VerdictKey).cast(),
        size_of::<VerdictKey>(),
    );
    ev.disposition = if sb.config.mode == MODE_AUDIT {
        ASK_ALLOWED_NOW
    } else {
        ASK_DENIED_NOW
    };
    ev._pad = 0;
    // Still the image that execs: the new one replaces it only later.
    entry.submit(BPF_RB_FORCE_WAKEUP);
    ExecMiss::Asked
}

#[sock_ops]
pub fn ask_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TIMEOUT_INIT => on_timeout_init(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == TCP_CLOSE {
                let cookie = cookie_of_ops(&ctx);
                let _ = PENDING.remove(cookie);
            }
            1
        }
        _ => 1,
    }
}

#[inline(always)]
fn cookie_of_ops(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the sock_ops context is a valid helper argument.
    unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) }
}

#[inline(always)]
fn set_tcp_opt(ctx: &SockOpsContext, opt: i32, value: i32) {
    let mut v = value;
    // SAFETY: `v` lives across the call; 4 bytes as the option expects.
    unsafe {
        bpf_setsockopt(
            ctx.ops as *mut c_void,
            SOL_TCP,
            opt,
            (&mut v as *mut i32).cast(),
            4,
        )
    };
}

#[inline(always)]
fn on_timeout_init(ctx: &SockOpsContext) -> u32 {
    let cookie = cookie_of_ops(ctx);
    let Some(ev) = PENDING.get_ptr_mut(cookie) else {
        return 1;
    };
    // SAFETY: the map value stays valid for the program's run.
    let ev = unsafe { &mut *ev };
    // SAFETY: plain data written whole by userspace.
    let syncnt = match unsafe { ASK_SANDBOXES.get(ev.key.sandbox_id) } {
        Some(cfg) if cfg.syncnt > 0 => cfg.syncnt,
        _ => pep_common::ask::DEFAULT_HOLD_SYNCNT,
    };
    // Retransmit the SYN a jiffy after each drop, a bounded number of times.
    ctx.set_reply(1);
    set_tcp_opt(ctx, TCP_SYNCNT, syncnt as i32);
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    if ev.sent == 0 {
        // SAFETY: plain helper call.
        let took = unsafe { bpf_ktime_get_boot_ns() }.saturating_sub(ev.header.ts_boot_ns);
        ev.sent = if took >= u64::from(u32::MAX) {
            u32::MAX
        } else {
            (took as u32).max(1)
        };
        ev.sock_family = ctx.family();
        if ctx.family() == pep_common::event::AF_INET {
            ev.saddr = [0; 16];
            let l = ctx.local_ip4().to_ne_bytes();
            ev.saddr[0] = l[0];
            ev.saddr[1] = l[1];
            ev.saddr[2] = l[2];
            ev.saddr[3] = l[3];
        } else {
            let l = ctx.local_ip6();
            let mut i = 0;
            while i < 4 {
                let b = l[i].to_ne_bytes();
                ev.saddr[i * 4] = b[0];
                ev.saddr[i * 4 + 1] = b[1];
                ev.saddr[i * 4 + 2] = b[2];
                ev.saddr[i * 4 + 3] = b[3];
                i += 1;
            }
        }
        // local_port is in host order in bpf_sock_ops.
        ev.sport = ctx.local_port();
        if ASKS.output::<AskEvent>(&*ev, BPF_RB_FORCE_WAKEUP).is_err() {
            // Nobody will answer: the hold ends when the SYN retries run
            // out, and the decision is reported only as this count.
            audit::bump(COUNTER_ASK_LOST);
            audit::bump(COUNTER_ASK_UNRECORDED);
        }
    }
    // 1: the kernel uses the reply.
    1
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) -> u32 {
    // SAFETY: reading a field of the valid context.
    let cwnd = unsafe { (*ctx.ops).snd_cwnd };
    if cwnd < INITIAL_CWND as u32 {
        set_tcp_opt(ctx, TCP_BPF_IW, INITIAL_CWND);
    }
    1
}

/// Drops the packets of held sockets (their SYNs); everything else passes.
#[cgroup_skb(egress)]
pub fn ask_egress(ctx: SkBuffContext) -> i32 {
    // SAFETY: the skb context is a valid helper argument.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
    // SAFETY: only presence is read.
    if unsafe { PENDING.get(cookie) }.is_some() {
        0
    } else {
        1
    }
}
