//! The decision stream: every decision becomes one ring-buffer event, and the
//! per-CPU counters account for each one, including those the ring buffer had
//! no room for, so userspace can report losses in-band.

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, generated::bpf_ktime_get_boot_ns,
    },
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use pep_common::event::{COMM_LEN, COUNTER_DECISIONS, COUNTER_LOST, COUNTER_MAX, EventHeader};

use crate::{kernel, sandbox::Sandbox};

/// 8 MiB: about 100,000 network events between two userspace drains.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_MAX, 0);

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Atomic, not `+=`: on a preemptible kernel two tasks on one CPU can
        // both be inside a program, and a lost increment would break the
        // exact accounting (records + lost == decisions) userspace relies on.
        // (`core::sync::atomic` has no read-modify-write ops on this target;
        // the intrinsic compiles to BPF's atomic add.)
        // SAFETY: `slot` points at this CPU's live, 8-byte aligned u64.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(slot, 1)
        };
    }
}

/// The acting task's fields that a header records, from one of two
/// sources: the helpers (`Helpers`, every program type), or plain loads
/// through the BTF-typed current task (`typed::Task`, LSM programs only:
/// cgroup programs have no typed task). Under emulation each of these
/// helper calls measured about 150 ns of `file_open`'s run time; a load is
/// one instruction.
pub trait Actor {
    /// The `task_struct` address: the lineage cache's key.
    fn task(&self) -> u64;
    /// `tgid << 32 | pid`, as `bpf_get_current_pid_tgid()`.
    fn pid_tgid(&self) -> u64;
    /// `gid << 32 | uid` in the initial user namespace, as
    /// `bpf_get_current_uid_gid()`.
    fn uid_gid(&self) -> u64;
    /// The id of the task's cgroup v2 cgroup.
    fn cgroup_id(&self) -> u64;
    fn comm(&self) -> [u8; COMM_LEN];
    /// `self_exec_id`: the exec generation (0 when it cannot be read).
    fn exec_id(&self) -> u64;
}

/// The helpers' view of the current task (its address asked once: the
/// lineage key and the exec generation's probe read both need it). For the
/// cgroup programs; the LSM programs use `typed::Task`.
pub struct Helpers(u64);

impl Helpers {
    #[inline(always)]
    pub fn current() -> Self {
        // SAFETY: plain helper call.
        Self(unsafe { bpf_get_current_task() })
    }
}

impl Actor for Helpers {
    #[inline(always)]
    fn task(&self) -> u64 {
        self.0
    }

    #[inline(always)]
    fn pid_tgid(&self) -> u64 {
        bpf_get_current_pid_tgid()
    }

    #[inline(always)]
    fn uid_gid(&self) -> u64 {
        bpf_get_current_uid_gid()
    }

    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        // SAFETY: plain helper call.
        unsafe { bpf_get_current_cgroup_id() }
    }

    #[inline(always)]
    fn comm(&self) -> [u8; COMM_LEN] {
        bpf_get_current_comm().unwrap_or_default()
    }

    #[inline(always)]
    fn exec_id(&self) -> u64 {
        // The task pointer is only probe-read.
        kernel::task_exec_id(self.0 as *const u8)
    }
}

/// Fills the common header of an event, the acting task's fields from
/// `actor`.
#[inline(always)]
pub fn fill_header(
    h: &mut EventHeader,
    kind: u32,
    sandbox: &Sandbox,
    verdict: u32,
    source: u32,
    rule_idx: u32,
    actor: &impl Actor,
) {
    let pid_tgid = actor.pid_tgid();
    let uid_gid = actor.uid_gid();
    h.kind = kind;
    h.verdict = verdict;
    h.mode = sandbox.config.mode;
    h.source = source;
    h.rule_idx = rule_idx;
    h.sandbox_id = sandbox.config.sandbox_id;
    // SAFETY: plain helper call.
    h.ts_boot_ns = unsafe { bpf_ktime_get_boot_ns() };
    h.cgroup_id = actor.cgroup_id();
    h.pid = (pid_tgid >> 32) as u32;
    h.tid = pid_tgid as u32;
    h.uid = uid_gid as u32;
    h.gid = (uid_gid >> 32) as u32;
    h._pad = 0;
    h.comm = actor.comm();
    // The process key, its image, ppid and the ancestry chain.
    kernel::fill_lineage(h, actor.task(), pid_tgid, actor.exec_id());
}

/// Reserves room for one event of type `T`, counting the decision and, when
/// the ring buffer is full, the loss. `fill` writes the whole event.
///
/// Submitted with the kernel's default wakeup: the consumer is woken for
/// the first record after it has caught up, and it waits a moment after each
/// drain (`audit::pump::COALESCE`) so that a stream of records costs a
/// wakeup per window, not per record. (Allows were once submitted with
/// `BPF_RB_NO_WAKEUP`, left to the consumer's 10 ms timer; that measured
/// slower in the Debian 6.1 guest, so every event wakes as the kernel
/// decides.)
#[inline(always)]
pub fn emit<T: 'static>(fill: impl FnOnce(&mut T)) {
    bump(COUNTER_DECISIONS);
    match EVENTS.reserve::<T>(0) {
        Some(mut entry) => {
            // SAFETY: `fill` writes every field of `T` (all plain integers)
            // that userspace reads; a path buffer may be written only up to
            // its length (`file::record`). The rest holds what the ring held
            // before, bytes of earlier records that only the agent reads.
            let ev = unsafe { &mut *entry.as_mut_ptr() };
            fill(ev);
            entry.submit(0);
        }
        None => bump(COUNTER_LOST),
    }
}
