//! Kernel struct field offsets, resolved by userspace from the running kernel's
//! BTF and set as read-only globals before load (Rust has no CO-RE relocations
//! yet). The verifier sees constants and checks every dereference against the
//! real layout, so a wrong offset fails the load instead of reading garbage.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use pep_common::event::{Ancestor, COMM_LEN, EventHeader, ExeIdentity, MAX_ANCESTORS};

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

/// `offsetof(struct task_struct, tgid)`.
#[inline(always)]
pub fn task_tgid_offset() -> usize {
    global(&TASK_TGID) as usize
}

/// `offsetof(struct task_struct, comm)`.
#[inline(always)]
pub fn task_comm() -> usize {
    global(&TASK_COMM) as usize
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

/// A process's lineage as first read: process key, ppid, ancestors.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Lineage {
    /// `bpf_get_current_pid_tgid()` of the thread it was read for: a task
    /// struct reused by another thread does not match.
    pid_tgid: u64,
    start_ns: u64,
    /// The image the thread ran when this was read: an exec (a new
    /// `exec_id`) reads the entry afresh.
    exe: ExeIdentity,
    n_ancestors: u32,
    _pad: u32,
    ancestors: [Ancestor; MAX_ANCESTORS],
}

/// Lineage per thread, keyed by the task pointer. Walking the parent chain
/// with probe reads costs about 400 ns a decision on the development machines;
/// a hit here costs one lookup. The chain is the one seen at the thread's first
/// decision: a process reparented later keeps reporting its original parent,
/// as process caches of peers do. LRU: bounded, and an evicted entry is only
/// re-read.
#[map]
static LINEAGE: LruHashMap<u64, Lineage> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU scratch to build a Lineage (too big for comfort on the stack).
#[map]
static LINEAGE_SCRATCH: PerCpuArray<Lineage> = PerCpuArray::with_max_entries(1, 0);

/// Fills the process key (`start_ns`), the image (`exe`), `ppid` and the
/// bounded ancestry chain of an event header from the current task (`task`:
/// its address; `pid_tgid` and `exec_id`: its ids, `audit::Actor`). Fields
/// it cannot read stay 0.
#[inline(always)]
pub fn fill_lineage(h: &mut EventHeader, task: u64, pid_tgid: u64, exec_id: u64) {
    // SAFETY: plain data written whole by this program.
    if let Some(l) = unsafe { LINEAGE.get(task) }
        && l.pid_tgid == pid_tgid
        && l.exe.exec_id == exec_id
    {
        copy_lineage(h, l);
        return;
    }
    let Some(l) = LINEAGE_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch, valid for this run.
    let l = unsafe { &mut *l };
    read_lineage(task as *const u8, l);
    l.pid_tgid = pid_tgid;
    let (dev, ino) = exe_file_id(task as *const u8);
    l.exe = ExeIdentity { exec_id, dev, ino };
    // By reference: a copy would put 104 more bytes on the 512-byte stack.
    let l: &Lineage = l;
    let _ = LINEAGE.insert(task, l, 0);
    copy_lineage(h, l);
}

#[inline(always)]
fn copy_lineage(h: &mut EventHeader, l: &Lineage) {
    h.start_ns = l.start_ns;
    h.exe = l.exe;
    h.n_ancestors = l.n_ancestors;
    h._pad2 = 0;
    h.ancestors = l.ancestors;
    h.ppid = l.ancestors[0].pid;
}

/// Walks the parent chain of `task` with probe reads.
#[inline(always)]
fn read_lineage(task: *const u8, l: &mut Lineage) {
    l.start_ns = 0;
    l.n_ancestors = 0;
    l._pad = 0;
    // Zeroed first: the scratch is reused and must not leak old bytes.
    let mut i = 0;
    while i < MAX_ANCESTORS {
        l.ancestors[i].pid = 0;
        l.ancestors[i].comm = [0; COMM_LEN];
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
        // The process's start, not the thread's: every thread of a process
        // shares one key.
        if let Ok(leader) = bpf_probe_read_kernel(task.add(off_leader as usize) as *const *const u8) {
            l.start_ns = bpf_probe_read_kernel(leader.add(off_start as usize) as *const u64).unwrap_or(0);
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
            l.ancestors[n].pid = pid;
            l.ancestors[n].comm =
                bpf_probe_read_kernel(parent.add(off_comm as usize) as *const [u8; COMM_LEN])
                    .unwrap_or([0; COMM_LEN]);
            n += 1;
            if pid == 1 {
                break;
            }
            t = parent;
        }
        l.n_ancestors = n as u32;
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

/// `offsetof(struct task_struct, mm)`.
#[unsafe(no_mangle)]
static TASK_MM: u64 = 0;
/// `offsetof(struct mm_struct, exe_file)`.
#[unsafe(no_mangle)]
static MM_EXE_FILE: u64 = 0;
/// `offsetof(struct task_struct, self_exec_id)` (a u64 since 5.7).
#[unsafe(no_mangle)]
static TASK_SELF_EXEC_ID: u64 = 0;

/// `task->self_exec_id` (probe-read), 0 when unreadable.
#[inline(always)]
pub fn task_exec_id(task: *const u8) -> u64 {
    crate::vfs::read_val::<u64>(task, global(&TASK_SELF_EXEC_ID) as usize)
}

/// `offsetof(struct task_struct, self_exec_id)`, for typed loads.
#[inline(always)]
pub fn task_exec_id_offset() -> usize {
    global(&TASK_SELF_EXEC_ID) as usize
}

/// (`s_dev`, `i_ino`) of `task->mm->exe_file` (probe-read), zeros when it
/// cannot be read (a kernel thread has no mm).
#[inline(always)]
fn exe_file_id(task: *const u8) -> (u64, u64) {
    let (off_mm, off_exe) = (global(&TASK_MM), global(&MM_EXE_FILE));
    if off_mm == 0 || off_exe == 0 {
        return (0, 0);
    }
    let mm = crate::vfs::read_ptr(task, off_mm as usize);
    let file = crate::vfs::read_ptr(mm, off_exe as usize);
    crate::vfs::inode_id(crate::vfs::file_inode(file))
}
