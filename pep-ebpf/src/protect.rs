//! Self-protection: what a sandboxed process may never do, whatever its
//! policy (and in audit mode too: these are not policy decisions, and each
//! one could switch enforcement off). Every denial is recorded as a
//! `SelfEvent`:
//!
//! | op | hook | denied |
//! |---|---|---|
//! | `SELF_BPF` | `bpf` | every bpf(2) call: no loading, detaching, or map writes |
//! | `SELF_CGROUP` | `file_open` (write), `path_*` on a cgroup fs; `task_alloc` | writing cgroup files (so no moving a process out of, or into, a sandbox), creating/removing cgroups; `clone3(CLONE_INTO_CGROUP)` |
//! | `SELF_BPFFS` | `file_open` (write), `path_*` on a bpf fs | writing, unlinking, renaming pins |
//! | `SELF_SIGNAL` | `task_kill` | any signal but 0 to a protected process (pep-agent) |
//! | `SELF_PTRACE` | `ptrace_access_check` | ptrace, /proc/PID/mem, process_vm_* of a protected process |
//! | `SELF_MODULE` | `kernel_read_file`, `kernel_load_data`, `kernel_module_request` | init_module, finit_module, kexec, and module autoloading on its behalf (firmware loads pass) |
//!
//! File systems are recognised by their superblock magic, not by path: a
//! second mount of cgroup2 or bpffs is as protected as the first.
//!
//! Failure policy: outside every sandbox, nothing is denied (fail open for the
//! host); inside, the protections do not depend on anything that can fail but
//! the event reservation (a lost event is counted and reported in-band).

use aya_ebpf::{
    helpers::generated::bpf_probe_read_kernel_str,
    macros::{lsm, map},
    maps::HashMap,
    programs::LsmContext,
};
use pep_common::event::{
    KIND_SELF, PATH_MAX_LEN, RULE_NONE, SELF_BPF, SELF_CGROUP, SELF_MODULE, SELF_PTRACE, SELF_SIGNAL,
    SOURCE_DEFAULT, SelfEvent, VERDICT_DENY,
};

use crate::{
    audit,
    file::{EPERM, PATH_SCRATCH},
    kernel, sandbox, typed, vfs,
};

/// Protected processes by tgid (pep-agent itself): no signals, no ptrace
/// from a sandbox. Userspace writes its own tgid at load.
#[map]
static PROTECTED: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

/// Number of parameters of the `bpf` LSM hook in the running kernel: 3 on 6.1
/// (`cmd, attr, size`), 4 from 6.9 (`..., kernel`). The return value of an
/// earlier program follows them. Set by userspace from BTF; a read-only
/// global, so the verifier sees a constant and drops the other branch.
#[unsafe(no_mangle)]
static BPF_HOOK_NARGS: u64 = 3;

/// `CLONE_INTO_CGROUP`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// `READING_FIRMWARE` / `LOADING_FIRMWARE`: drivers load firmware on behalf of
/// whichever task touched the device; not a way to run code in the kernel.
const READING_FIRMWARE: u32 = 1;

/// Records a self-protection denial and returns the hook's answer (always
/// EPERM: self-protection does not follow audit mode). `path_len` is
/// `u32::MAX` when `PATH_SCRATCH` holds no path for this event (its bytes
/// are then stale and ignored by userspace).
#[inline(always)]
fn deny(sb: &sandbox::Sandbox, op: u32, target_pid: u32, arg: u64, path_len: u32) -> i32 {
    let Some(buf) = PATH_SCRATCH.get_ptr_mut(0) else {
        return -EPERM;
    };
    let [op, target_pid, arg, path_len] = vfs::opaque([op.into(), target_pid.into(), arg, path_len.into()]);
    let (op, target_pid, path_len) = (op as u32, target_pid as u32, path_len as u32);
    audit::emit(|ev: &mut SelfEvent| {
        audit::fill_header(
            &mut ev.header,
            KIND_SELF,
            sb,
            VERDICT_DENY,
            SOURCE_DEFAULT,
            RULE_NONE,
            &typed::Task::current(),
        );
        ev.op = op;
        ev.target_pid = target_pid;
        ev.arg = arg;
        ev._pad = 0;
        ev.path_len = path_len;
        vfs::copy(ev.path.as_mut_ptr(), buf as *const u8, PATH_MAX_LEN);
    });
    -EPERM
}

/// Denies a change at `dentry` in mount `mnt` on a protected file system,
/// recording its path when the walk can name it.
#[inline(always)]
pub fn deny_path(sb: &sandbox::Sandbox, op: u32, mnt: *const u8, dentry: *const u8, arg: u64) -> i32 {
    let buf = match PATH_SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU scratch, valid for this run.
        Some(b) => unsafe { &mut *b },
        None => return -EPERM,
    };
    let len = vfs::dentry_path(mnt, dentry, buf).unwrap_or(u32::MAX);
    deny(sb, op, 0, arg, len)
}

/// `bpf(int cmd, union bpf_attr *attr, unsigned int size[, bool kernel])`.
#[lsm(hook = "bpf")]
pub fn bpf(ctx: LsmContext) -> i32 {
    let retval: i32 = if vfs::global(&BPF_HOOK_NARGS) == 4 {
        bpf_retval_after_4(&ctx)
    } else {
        bpf_retval_after_3(&ctx)
    };
    if retval != 0 {
        return retval;
    }
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let cmd: i32 = ctx.arg(0);
    deny(&sb, SELF_BPF, 0, cmd as u64, u32::MAX)
}

/// The previous program's return value of the `bpf` hook with 3 parameters.
/// Two functions, not one expression: LLVM would merge the two context reads
/// into one at a computed offset, which the verifier refuses; this way the
/// branch that does not apply to the running kernel is never verified.
#[inline(never)]
fn bpf_retval_after_3(ctx: &LsmContext) -> i32 {
    ctx.arg(3)
}

/// As `bpf_retval_after_3`, for the 6.9+ hook with 4 parameters.
#[inline(never)]
fn bpf_retval_after_4(ctx: &LsmContext) -> i32 {
    ctx.arg(4)
}

/// `task_kill(struct task_struct *p, struct kernel_siginfo *info, int sig,
/// const struct cred *cred)`. Signal 0 (does it exist?) passes: it changes
/// nothing.
#[lsm(hook = "task_kill")]
pub fn task_kill(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(4);
    if retval != 0 {
        return retval;
    }
    let sig: i32 = ctx.arg(2);
    if sig == 0 {
        return 0;
    }
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let target = kernel::task_tgid(ctx.arg(0));
    // SAFETY: plain data.
    if unsafe { PROTECTED.get(target) }.is_some() {
        return deny(&sb, SELF_SIGNAL, target, sig as u64, u32::MAX);
    }
    0
}

/// `ptrace_access_check(struct task_struct *child, unsigned int mode)`:
/// PTRACE_ATTACH/SEIZE, /proc/PID/mem and process_vm_readv/writev all ask.
#[lsm(hook = "ptrace_access_check")]
pub fn ptrace_access_check(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(2);
    if retval != 0 {
        return retval;
    }
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let target = kernel::task_tgid(ctx.arg(0));
    // SAFETY: plain data.
    if unsafe { PROTECTED.get(target) }.is_some() {
        let mode: u32 = ctx.arg(1);
        return deny(&sb, SELF_PTRACE, target, u64::from(mode), u32::MAX);
    }
    0
}

/// `kernel_read_file(struct file *file, enum kernel_read_file_id id, bool
/// contents)`: finit_module, kexec_file_load, IMA policy, certificates.
#[lsm(hook = "kernel_read_file")]
pub fn kernel_read_file(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    let id: u32 = ctx.arg(1);
    if id == READING_FIRMWARE {
        return 0;
    }
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let file: *const u8 = ctx.arg(0);
    let f_path = file.wrapping_add(kernel::file_f_path() as usize);
    let (mnt, dentry) = vfs::path_parts(f_path);
    deny_path(&sb, SELF_MODULE, mnt, dentry, u64::from(id))
}

/// `kernel_load_data(enum kernel_load_data_id id, bool contents)`:
/// init_module from memory, kexec_load.
#[lsm(hook = "kernel_load_data")]
pub fn kernel_load_data(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(2);
    if retval != 0 {
        return retval;
    }
    let id: u32 = ctx.arg(0);
    if id == READING_FIRMWARE {
        return 0;
    }
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    deny(&sb, SELF_MODULE, 0, u64::from(id), u32::MAX)
}

/// `kernel_module_request(char *kmod_name)`: the kernel is about to run
/// modprobe because this task asked for something a module provides (a
/// socket family, a device, a crypto algorithm...). Denied: the operation
/// fails as if the module did not exist.
#[lsm(hook = "kernel_module_request")]
pub fn kernel_module_request(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(1);
    if retval != 0 {
        return retval;
    }
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let name: *const u8 = ctx.arg(0);
    let buf = match PATH_SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU scratch, valid for this run.
        Some(b) => unsafe { &mut *b },
        None => return -EPERM,
    };
    // SAFETY: reads at most PATH_MAX_LEN bytes into the scratch.
    let n = unsafe {
        bpf_probe_read_kernel_str(buf.as_mut_ptr() as *mut _, PATH_MAX_LEN as u32, name as *const _)
    };
    deny(
        &sb,
        SELF_MODULE,
        0,
        0,
        if n > 0 { (n - 1) as u32 } else { u32::MAX },
    )
}

/// `task_alloc(struct task_struct *task, unsigned long clone_flags)`:
/// `clone3(CLONE_INTO_CGROUP)` places the child in another cgroup without
/// writing any cgroup file.
#[lsm(hook = "task_alloc")]
pub fn task_alloc(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(2);
    if retval != 0 {
        return retval;
    }
    let flags: u64 = ctx.arg(1);
    if flags & CLONE_INTO_CGROUP == 0 {
        return 0;
    }
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    deny(&sb, SELF_CGROUP, 0, flags, u32::MAX)
}
