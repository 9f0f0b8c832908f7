//! Kernel struct field offsets, resolved by userspace from the running kernel's
//! BTF and set as read-only globals before load (Rust has no CO-RE relocations
//! yet). The verifier sees constants and checks every dereference against the
//! real layout, so a wrong offset fails the load instead of reading garbage.

use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

/// `offsetof(struct task_struct, real_parent)`.
#[unsafe(no_mangle)]
static TASK_REAL_PARENT: u64 = 0;
/// `offsetof(struct task_struct, tgid)`.
#[unsafe(no_mangle)]
static TASK_TGID: u64 = 0;
/// `offsetof(struct file, f_path)`.
#[unsafe(no_mangle)]
static FILE_F_PATH: u64 = 0;

#[inline(always)]
fn global(v: &'static u64) -> u64 {
    // SAFETY: a valid static; the volatile read stops the compiler folding the
    // zero it was compiled with.
    unsafe { core::ptr::read_volatile(v) }
}

/// Offset of `f_path` inside `struct file`.
#[inline(always)]
pub fn file_f_path() -> u64 {
    global(&FILE_F_PATH)
}

/// `offsetof(struct file, f_mode)`.
#[unsafe(no_mangle)]
static FILE_F_MODE: u64 = 0;

/// Offset of `f_mode` inside `struct file`.
#[inline(always)]
pub fn file_f_mode() -> u64 {
    global(&FILE_F_MODE)
}

/// `offsetof(struct task_struct, group_leader)`.
#[unsafe(no_mangle)]
static TASK_GROUP_LEADER: u64 = 0;
/// `offsetof(struct task_struct, start_boottime)`.
#[unsafe(no_mangle)]
static TASK_START_BOOTTIME: u64 = 0;
/// `offsetof(struct task_struct, comm)`.
#[unsafe(no_mangle)]
static TASK_COMM: u64 = 0;

/// Fills the process key (`start_ns`), `ppid` and the bounded ancestry chain
/// of an event header from the current task. Fields it cannot read stay 0.
#[inline(always)]
pub fn fill_lineage(h: &mut pep_common::event::EventHeader) {
    use pep_common::event::{COMM_LEN, MAX_ANCESTORS};

    h.start_ns = 0;
    h.ppid = 0;
    h.n_ancestors = 0;
    h._pad2 = 0;
    // Zeroed first: the ring buffer memory is reused and must not leak old bytes.
    let mut i = 0;
    while i < MAX_ANCESTORS {
        h.ancestors[i].pid = 0;
        h.ancestors[i].comm = [0; COMM_LEN];
        i += 1;
    }
    let off_parent = global(&TASK_REAL_PARENT);
    let off_tgid = global(&TASK_TGID);
    let off_leader = global(&TASK_GROUP_LEADER);
    let off_start = global(&TASK_START_BOOTTIME);
    let off_comm = global(&TASK_COMM);
    if off_parent == 0 || off_tgid == 0 || off_leader == 0 || off_start == 0 || off_comm == 0 {
        return;
    }
    // SAFETY: probe reads tolerate any address; a bad one yields an error.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        // The process's start, not the thread's: every thread of a process
        // shares one key.
        if let Ok(leader) = bpf_probe_read_kernel(task.add(off_leader as usize) as *const *const u8) {
            h.start_ns = bpf_probe_read_kernel(leader.add(off_start as usize) as *const u64).unwrap_or(0);
        }
        let mut t = task;
        let mut n = 0;
        // Bounded by MAX_ANCESTORS; stops at init (pid 1) or an unreadable link.
        while n < MAX_ANCESTORS {
            let parent: *const u8 = match bpf_probe_read_kernel(t.add(off_parent as usize) as *const *const u8)
            {
                Ok(p) if !p.is_null() && p != t => p,
                _ => break,
            };
            let pid: u32 = bpf_probe_read_kernel(parent.add(off_tgid as usize) as *const u32).unwrap_or(0);
            if pid == 0 {
                break;
            }
            h.ancestors[n].pid = pid;
            h.ancestors[n].comm =
                bpf_probe_read_kernel(parent.add(off_comm as usize) as *const [u8; COMM_LEN])
                    .unwrap_or([0; COMM_LEN]);
            n += 1;
            if pid == 1 {
                break;
            }
            t = parent;
        }
        h.n_ancestors = n as u32;
        h.ppid = h.ancestors[0].pid;
    }
}

/// `task->tgid`, or 0 when it cannot be read.
#[inline(always)]
pub fn task_tgid(task: *const u8) -> u32 {
    let off_tgid = global(&TASK_TGID);
    if task.is_null() || off_tgid == 0 {
        return 0;
    }
    // SAFETY: probe reads tolerate any address; a bad one yields an error.
    unsafe { bpf_probe_read_kernel(task.add(off_tgid as usize) as *const u32) }.unwrap_or(0)
}
