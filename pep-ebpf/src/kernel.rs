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

/// The tgid of the current task's parent, or 0 when it cannot be read.
#[inline(always)]
pub fn current_ppid() -> u32 {
    let off_parent = global(&TASK_REAL_PARENT);
    let off_tgid = global(&TASK_TGID);
    if off_parent == 0 || off_tgid == 0 {
        return 0;
    }
    // SAFETY: probe reads tolerate any address; a bad one yields an error.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let parent: *const u8 = match bpf_probe_read_kernel(task.add(off_parent as usize) as *const *const u8)
        {
            Ok(p) => p,
            Err(_) => return 0,
        };
        bpf_probe_read_kernel(parent.add(off_tgid as usize) as *const u32).unwrap_or(0)
    }
}

/// `offsetof(struct file, f_mode)`.
#[unsafe(no_mangle)]
static FILE_F_MODE: u64 = 0;

/// Offset of `f_mode` inside `struct file`.
#[inline(always)]
pub fn file_f_mode() -> u64 {
    global(&FILE_F_MODE)
}
