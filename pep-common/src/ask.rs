//! Asking the Policy Decision Point: the verdict cache, held connects, and
//! the events that tell userspace what to ask.
//!
//! When a sandbox's `network.default` is `ask` and no compiled rule matches,
//! the kernel looks the destination up in `VERDICT_CACHE` (an LRU hash keyed
//! by `VerdictKey`). A live entry (not expired, stamped with the sandbox's
//! current PDP revision) decides in the kernel. Otherwise the attempt is a
//! miss: a TCP connect is held (`ASK_HELD`) until userspace writes a verdict;
//! anything else fails now (`ASK_DENIED_NOW`, or goes ahead in audit mode,
//! `ASK_ALLOWED_NOW`) and the answer is cached for the next attempt.

pub use crate::event::ExeIdentity;
use crate::event::{EventHeader, ExecEvent};

/// Event kind of an `AskEvent` (sent through the `ASKS` ring buffer, not
/// the audit stream's, so it never collides with the audit kinds).
pub const KIND_ASK: u32 = 100;
/// Event kind of an `ExecAskEvent` (an exec miss), on the same ring buffer.
pub const KIND_ASK_EXEC: u32 = 101;

/// Cache key actions. The network ones equal `event::NET_OP_*`.
pub const ACTION_NET_CONNECT: u32 = 1;
pub const ACTION_NET_SEND: u32 = 2;
pub const ACTION_EXEC: u32 = 6;

/// What the kernel did with the attempt that missed.
/// A TCP connect held until userspace writes the verdict.
pub const ASK_HELD: u32 = 1;
/// The attempt failed (EPERM); the answer serves later attempts.
pub const ASK_DENIED_NOW: u32 = 2;
/// Audit mode: the attempt went ahead; the answer is recorded and cached.
pub const ASK_ALLOWED_NOW: u32 = 3;

/// `AskSandbox::flags`: network misses are asked.
pub const ASK_FLAG_NET: u32 = 1;
/// `AskSandbox::flags`: exec misses are asked (`exec.default: ask`).
pub const ASK_FLAG_EXEC: u32 = 2;

/// SYN retransmits allowed while a connect is held (`TCP_SYNCNT`) when
/// userspace gives none: bounds the hold if no verdict ever comes.
pub const DEFAULT_HOLD_SYNCNT: u32 = 8;

/// `VERDICT_CACHE` key: sandbox, action, resource.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    pub sandbox_id: u32,
    /// `ACTION_*`.
    pub action: u32,
    /// `event::AF_INET` or `AF_INET6`; IPv4-mapped IPv6 is `AF_INET`.
    pub family: u32,
    /// IP protocol number.
    pub protocol: u32,
    /// Destination port, host order.
    pub dport: u32,
    pub _pad: u32,
    /// Network order; IPv4 fills the first 4 bytes, the rest zero. For
    /// `ACTION_EXEC` (family, protocol and port 0): the executed file's
    /// device (`s_dev`) then inode number, each a little-endian u64, so a
    /// hard link shares its verdict.
    pub daddr: [u8; 16],
}

/// `VERDICT_CACHE` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEntry {
    /// `event::VERDICT_*`.
    pub verdict: u32,
    /// `AskSandbox::revision` the verdict was given under; another value
    /// makes the entry stale (a miss).
    pub revision: u32,
    /// `bpf_ktime_get_boot_ns()` after which the entry is a miss.
    pub expires_ns: u64,
}

/// `ASK_SANDBOXES[sandbox_id]`: a sandbox that asks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AskSandbox {
    /// Current PDP revision; bumped when a reload changes the PDP's answers.
    pub revision: u32,
    /// `ASK_FLAG_*`.
    pub flags: u32,
    /// `TCP_SYNCNT` while held.
    pub syncnt: u32,
    pub _pad: u32,
}

/// One miss, as userspace receives it. For a held connect it also sits in
/// `PENDING` (keyed by socket cookie) until the verdict is written.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AskEvent {
    pub header: EventHeader,
    pub key: VerdictKey,
    /// `bpf_get_socket_cookie`; 0 when not held.
    pub cookie: u64,
    /// Local address and port of a held connect (network order address,
    /// host order port), known once the SYN is built; what SOCK_DESTROY
    /// needs with the destination.
    pub saddr: [u8; 16],
    pub sport: u32,
    /// `ASK_*`.
    pub disposition: u32,
    /// Held connects: 0 until the event went to userspace; then how long,
    /// in ns, the kernel's connect path took from the miss (`connect4/6`)
    /// to the event leaving (`TIMEOUT_INIT`), at least 1 and saturated at
    /// `u32::MAX`. It splits a miss's time to receipt in userspace into
    /// the kernel's own part and the wakeup's.
    pub sent: u32,
    /// The socket's own family (an IPv6 socket may reach an IPv4 peer).
    pub sock_family: u32,
}

/// An exec miss, as userspace receives it: the exec record the kernel would
/// have written (`exec.header.kind` is `KIND_ASK_EXEC`; its verdict is what
/// happened to the attempt in enforce mode, deny), and the cache key to
/// write the PDP's answer under.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecAskEvent {
    pub exec: ExecEvent,
    pub key: VerdictKey,
    /// `ASK_DENIED_NOW`, or `ASK_ALLOWED_NOW` in audit mode.
    pub disposition: u32,
    pub _pad: u32,
}

/// `ASK_APPLIED` key: one miss as the ring buffer carries it, its kernel
/// timestamp and the socket cookie (a held or sent connect) or the pid and
/// tid (an exec).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AppliedKey {
    pub ts_boot_ns: u64,
    pub id: u64,
}

/// Bytes of `AppliedAnswer::pdp`.
pub const APPLIED_PDP_LEN: usize = 1016;

/// `ASK_APPLIED` value, written by the host daemon (never by a program)
/// before it applies an answer, and removed once the answer's record is in
/// the log: what a daemon that restarts in between needs to write that
/// record without asking again.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AppliedAnswer {
    /// `event::VERDICT_*` of the record.
    pub verdict: u32,
    /// Bytes used in `pdp`.
    pub len: u32,
    /// The record's `pdp` object, JSON.
    pub pdp: [u8; APPLIED_PDP_LEN],
}
