//! Events sent through the ring buffer, one per decision.

pub const VERDICT_ALLOW: u32 = 1;
pub const VERDICT_DENY: u32 = 2;

/// The decision came from a compiled rule.
pub const SOURCE_RULE: u32 = 1;
/// No rule matched: the policy's default decided.
pub const SOURCE_DEFAULT: u32 = 2;
/// An earlier PDP answer cached in `VERDICT_CACHE` decided (see `crate::ask`).
pub const SOURCE_CACHE: u32 = 3;
/// The PDP was asked for this decision.
pub const SOURCE_PDP: u32 = 4;

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
    /// When the process (its thread group leader) started, ns since boot
    /// (`task_struct.start_boottime`): with `pid`, a key unique across the boot.
    pub start_ns: u64,
    /// The program image that acted: with `pid` and `start_ns`, what names
    /// the record's `exe`.
    pub exe: ExeIdentity,
    /// The parent first, then its parent, ...; `n_ancestors` entries in use.
    pub ancestors: [Ancestor; MAX_ANCESTORS],
    pub n_ancestors: u32,
    pub _pad2: u32,
}

/// Which executable image a process is running, read by the kernel with
/// each decision, so that userspace can name the record's `exe` (and a PDP
/// query's `subject.exe`) from a cache instead of reading `/proc/PID/exe`
/// for every event. With the process key (the event
/// header's `pid` and `start_ns`) it names one image: `exec_id` changes
/// with every exec, (`dev`, `ino`) with a `PR_SET_MM_EXE_FILE`. All zero
/// when it could not be read (then nothing is cached).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExeIdentity {
    /// `current->self_exec_id`: bumped by every exec, copied by fork.
    pub exec_id: u64,
    /// `current->mm->exe_file->f_inode`: `i_sb->s_dev` (the kernel's
    /// encoding) and `i_ino`.
    pub dev: u64,
    pub ino: u64,
}

/// How many ancestors an event carries (bounded: the chain is read in-kernel).
pub const MAX_ANCESTORS: usize = 4;

/// One ancestor of the acting process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Ancestor {
    pub pid: u32,
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
/// Verdict cache hits (`crate::ask`).
pub const COUNTER_CACHE_HIT: u32 = 2;
/// Verdict cache misses: the PDP was asked.
pub const COUNTER_CACHE_MISS: u32 = 3;
/// Asks that could not be sent (ring buffer full or too many held connects).
pub const COUNTER_ASK_LOST: u32 = 4;
/// Of those, the asks whose decision has no record: a network miss's ask is
/// its record (the PDP task writes it), so when the `ASKS` ring has no room
/// the decision is reported only as this count (`audit.lost`, reason `ask`).
/// A miss that could not be held, and an exec miss, are recorded through the
/// audit ring instead.
pub const COUNTER_ASK_UNRECORDED: u32 = 7;
/// `file_open` decisions answered from the per-file verdict cache.
pub const COUNTER_FILE_CACHE_HIT: u32 = 5;
/// `file_open` decisions that resolved and matched the path.
pub const COUNTER_FILE_CACHE_MISS: u32 = 6;

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

/// Self-protection decision (always on for sandboxed processes, whatever the
/// policy): `SelfEvent`.
pub const KIND_SELF: u32 = 4;

/// `SelfEvent::op`: a bpf(2) call.
pub const SELF_BPF: u32 = 1;
/// A write to, or a change in, a cgroup file system, or a clone into another
/// cgroup (`CLONE_INTO_CGROUP`).
pub const SELF_CGROUP: u32 = 2;
/// A signal to a protected process (pep-agent).
pub const SELF_SIGNAL: u32 = 3;
/// ptrace (or /proc/PID/mem, process_vm_*) of a protected process.
pub const SELF_PTRACE: u32 = 4;
/// Loading a kernel module or a kexec image, or asking the kernel to.
pub const SELF_MODULE: u32 = 5;
/// A write to, or a change in, a BPF file system.
pub const SELF_BPFFS: u32 = 6;
/// A change to the file-system namespace: mount, umount, move_mount,
/// pivot_root or chroot (each would change what a path names).
pub const SELF_MOUNT: u32 = 7;

/// A self-protection decision. Always a deny.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SelfEvent {
    pub header: EventHeader,
    /// `SELF_*`.
    pub op: u32,
    /// The target's tgid for `SELF_SIGNAL` and `SELF_PTRACE`, else 0.
    pub target_pid: u32,
    /// The signal (`SELF_SIGNAL`), the bpf command (`SELF_BPF`), the
    /// kernel_read_file/kernel_load_data id or 0 (`SELF_MODULE`), the clone
    /// flags (`SELF_CGROUP` without a path).
    pub arg: u64,
    /// Bytes of `path` in use, NUL excluded; `u32::MAX` when there is none
    /// (for `SELF_MODULE` from `request_module`, `path` holds the module name).
    pub path_len: u32,
    pub _pad: u32,
    pub path: [u8; PATH_MAX_LEN],
}

/// Bytes of argv an exec record carries: the arguments, each NUL-terminated,
/// cut at this size.
pub const ARGV_LEN: usize = 256;
/// Most arguments an exec record carries.
pub const ARGV_MAX_ARGS: u32 = 16;

/// `ExecEvent::op`: execve/execveat of the file (`bprm_check_security`).
pub const EXEC_OP_EXEC: u32 = 1;
/// mmap of the file with PROT_EXEC (e.g. `ld.so /usr/bin/nc`).
pub const EXEC_OP_MMAP: u32 = 2;
/// mprotect of a mapping of the file to PROT_EXEC.
pub const EXEC_OP_MPROTECT: u32 = 3;

/// An exec decision.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// `EXEC_OP_*`.
    pub op: u32,
    /// Bytes of `path` in use, NUL excluded; `u32::MAX` when the path was too
    /// long or could not be resolved.
    pub path_len: u32,
    /// Arguments in `argv` (at most `ARGV_MAX_ARGS`).
    pub argc: u32,
    /// Bytes of `argv` in use.
    pub argv_len: u32,
    pub path: [u8; PATH_MAX_LEN],
    /// `argc` NUL-terminated strings, the last possibly cut short.
    pub argv: [u8; ARGV_LEN],
}
