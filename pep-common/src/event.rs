//! Events sent through the ring buffer, one per decision.

pub const VERDICT_ALLOW: u32 = 1;
pub const VERDICT_DENY: u32 = 2;

/// The decision came from a compiled rule.
pub const SOURCE_RULE: u32 = 1;
/// No rule matched: the policy's default decided.
pub const SOURCE_DEFAULT: u32 = 2;

/// `rule_idx` when no rule decided.
pub const RULE_NONE: u32 = u32::MAX;

pub const KIND_NET: u32 = 1;
pub const KIND_FILE: u32 = 2;
pub const KIND_EXEC: u32 = 3;

/// Network operation: connect(2).
pub const NET_OP_CONNECT: u32 = 1;
/// Network operation: sendto/sendmsg on an unconnected socket.
pub const NET_OP_SENDMSG: u32 = 2;

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

pub const COMM_LEN: usize = 16;

/// Fields every event starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// `KIND_*`: which struct this header starts.
    pub kind: u32,
    /// `VERDICT_*` as the policy decided it (in audit mode, the syscall was
    /// allowed whatever this says).
    pub verdict: u32,
    /// `crate::sandbox::MODE_*` in force.
    pub mode: u32,
    /// `SOURCE_*`.
    pub source: u32,
    /// Rule index within its policy section, or `RULE_NONE`.
    pub rule_idx: u32,
    pub sandbox_id: u32,
    /// `bpf_ktime_get_boot_ns()`.
    pub ts_boot_ns: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub _pad: u32,
    pub comm: [u8; COMM_LEN],
}

/// A network decision.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetEvent {
    pub header: EventHeader,
    /// `AF_INET` or `AF_INET6` of the socket.
    pub family: u32,
    /// `NET_OP_*`.
    pub op: u32,
    /// `crate::net::PROTO_*`.
    pub protocol: u32,
    /// Destination port, host order.
    pub dport: u32,
    /// Destination, network order; an IPv4 address fills the first 4 bytes.
    pub daddr: [u8; 16],
}

/// Indexes of the per-CPU counter array `COUNTERS`.
pub const COUNTER_DECISIONS: u32 = 0;
/// Events that could not be reserved in the ring buffer.
pub const COUNTER_LOST: u32 = 1;
pub const COUNTER_MAX: u32 = 8;

/// Offsets into kernel structs, resolved from the running kernel's BTF by
/// userspace and set as read-only globals before load.
pub const OFFSETS_UNSET: u64 = u64::MAX;

/// Longest path, NUL included, that the file hooks resolve. A sandboxed access
/// to a longer path is denied (fail closed) with a record.
pub const PATH_MAX_LEN: usize = 256;

/// File access bits.
pub const ACCESS_READ: u32 = 1;
pub const ACCESS_WRITE: u32 = 2;

/// A file decision.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileEvent {
    pub header: EventHeader,
    /// `ACCESS_*` bits requested.
    pub access: u32,
    /// Bytes of `path` in use, NUL excluded; `u32::MAX` when the path was
    /// longer than `PATH_MAX_LEN` or could not be resolved.
    pub path_len: u32,
    pub path: [u8; PATH_MAX_LEN],
}
