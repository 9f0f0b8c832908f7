//! Exec enforcement: BPF LSM `bprm_check_security` (execve/execveat),
//! `mmap_file` and `file_mprotect` (code mapped executable by the dynamic
//! loader: `ld.so /usr/bin/nc` execs only ld.so).
//!
//! The path is the executed file's resolved path (`bpf_d_path` on
//! `bprm->file`; for a script, the hook runs once for the script and once for
//! its interpreter, and both must pass). `EXEC_RULES` holds `KIND_PREFIX`
//! (`dir/**`) and `KIND_EXACT` keys hashed like file rules; the longest match
//! decides, else the sandbox's `exec_default`. `INODE_RULES` (kind
//! `INODE_KIND_EXEC`) holds the inodes of denied binaries, so a hard link
//! does not escape a deny; under an allowlist (default deny) a symlink
//! resolves to the real path, and a copy or a hard link elsewhere has a path
//! that no allow rule names.
//!
//! `mmap_file`/`file_mprotect` with PROT_EXEC apply only the rules that deny
//! explicitly (by path or inode), not the default: every shared library is
//! mapped executable, and under an allowlist that would need every library
//! allowed. Under an allowlist, running ld.so directly is itself an exec that
//! the default denies unless the policy allows ld.so's path. Only denials are
//! recorded there (library mappings are too many to record).
//!
//! argv: at `bprm_check_security` the new program's arguments are already
//! copied into the new mm, which the task cannot read yet; the syscall's own
//! arguments are still in the task's user registers (`bpf_task_pt_regs`), and
//! its old mm is still current, so argv is read from the caller's memory
//! (execve: `si`, execveat: `dx`, x86_64 native syscalls only; a 32-bit
//! caller's record has no argv). This is for the record only: the decision
//! never depends on user memory. A concurrent thread could change the strings
//! between the copy and this read; the record would then show what it wrote.
//!
//! `exec.default: ask` (`ask::on_exec_miss`): where the default would
//! decide a resolved path, the verdict cache decides by the file's inode
//! identity; on a miss the exec fails (goes ahead in audit mode) and the PDP
//! is asked for the next one. An exec cannot be held like a SYN.
//!
//! Failure policy: an unsandboxed task is never denied. A sandboxed exec whose
//! path cannot be resolved or is too long is denied (fail closed) and recorded.

use aya_ebpf::{
    bindings::path,
    helpers::{
        bpf_probe_read_user,
        generated::{bpf_d_path, bpf_get_current_task_btf, bpf_probe_read_user_str, bpf_task_pt_regs},
    },
    macros::{lsm, map},
    maps::{HashMap, PerCpuArray},
    programs::LsmContext,
};
use pep_common::{
    event::{
        ARGV_LEN, ARGV_MAX_ARGS, EXEC_OP_EXEC, EXEC_OP_MMAP, EXEC_OP_MPROTECT, ExecEvent, KIND_EXEC,
        PATH_MAX_LEN, RULE_NONE, SOURCE_CACHE, SOURCE_DEFAULT, SOURCE_RULE, VERDICT_ALLOW, VERDICT_DENY,
    },
    file::{ExecRuleValue, FileRuleKey, INODE_KIND_EXEC, InodeKey},
};

use crate::{
    ask::{self, ExecMiss},
    audit,
    file::{BEST, EPERM, INODE_RULES, PATH_SCRATCH, answer, walk_keys},
    kernel, sandbox, typed, vfs,
};

#[map]
static EXEC_RULES: HashMap<FileRuleKey, ExecRuleValue> = HashMap::with_max_entries(16384, 0);

/// argv as NUL-separated strings; twice `ARGV_LEN` so that each string read
/// (up to `ARGV_LEN` bytes at an offset below `ARGV_LEN`) stays inside.
#[map]
static ARGV_SCRATCH: PerCpuArray<[[u8; ARGV_LEN]; 2]> = PerCpuArray::with_max_entries(1, 0);

/// `offsetof(struct linux_binprm, file)`.
#[unsafe(no_mangle)]
static BPRM_FILE: u64 = 0;
/// `offsetof(struct vm_area_struct, vm_file)`.
#[unsafe(no_mangle)]
static VMA_VM_FILE: u64 = 0;
/// `offsetof(struct pt_regs, orig_ax)`.
#[unsafe(no_mangle)]
static PT_REGS_ORIG_AX: u64 = 0;
/// `offsetof(struct pt_regs, si)`.
#[unsafe(no_mangle)]
static PT_REGS_SI: u64 = 0;
/// `offsetof(struct pt_regs, dx)`.
#[unsafe(no_mangle)]
static PT_REGS_DX: u64 = 0;

const PROT_EXEC: u64 = 0x4;
const NR_EXECVE: u64 = 59;
const NR_EXECVEAT: u64 = 322;
const ARGV_MASK: usize = ARGV_LEN - 1;
const _: () = assert!(ARGV_LEN.is_power_of_two());

/// `bprm_check_security(struct linux_binprm *bprm)`.
#[lsm(hook = "bprm_check_security")]
pub fn bprm_check_security(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(1);
    if retval != 0 {
        return retval;
    }
    try_bprm_check(&ctx)
}

#[inline(always)]
fn try_bprm_check(ctx: &LsmContext) -> i32 {
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let bprm: *const u8 = ctx.arg(0);
    // A direct load (not a probe read): the verifier types the result as
    // `struct file *`, which bpf_d_path requires.
    // SAFETY: `bprm` is the hook's trusted argument; the offset is from BTF.
    let file: *const u8 = unsafe { *(bprm.add(vfs::global(&BPRM_FILE)) as *const *const u8) };
    if file.is_null() {
        return -EPERM;
    }
    let Some(buf) = PATH_SCRATCH.get_ptr_mut(0) else {
        return -EPERM;
    };
    // SAFETY: per-CPU scratch, valid for this run.
    let buf = unsafe { &mut *buf };
    // SAFETY: `f_path` is a `struct path` member of the exec'd file.
    let len = unsafe {
        bpf_d_path(
            file.add(kernel::file_f_path() as usize) as *mut path,
            buf.as_mut_ptr() as *mut _,
            PATH_MAX_LEN as u32,
        )
    };
    let path_len = if len > 0 { Some((len - 1) as u32) } else { None };
    let inode = vfs::file_inode(file);
    let d = decide_exec(&sb, path_len, buf, inode, true);
    // Opaque for the same reason as the decision below: read_argv's loop
    // ends with a different (argc, length) at each iteration.
    let (argc, argv_len) = read_argv();
    let [argc, argv_len, _, _] = vfs::opaque([argc.into(), argv_len.into(), 0, 0]).map(|x| x as u32);
    let Some(argv) = ARGV_SCRATCH.get_ptr_mut(0) else {
        return answer(&sb, d.verdict);
    };
    // SAFETY: per-CPU scratch, valid for this run.
    let argv = unsafe { &*argv };
    let [verdict, source, rule, path_len] = vfs::opaque([
        d.verdict.into(),
        d.source.into(),
        d.rule.into(),
        d.path_len.into(),
    ])
    .map(|x| x as u32);
    let mut d = ExecDecision {
        verdict,
        source,
        rule,
        path_len,
    };
    // `exec.default: ask`: the default decided a resolved path.
    if d.source == SOURCE_DEFAULT && d.path_len != u32::MAX {
        match ask::on_exec_miss(
            &sb,
            inode,
            buf.as_ptr(),
            d.path_len,
            argv[0].as_ptr(),
            argc,
            argv_len,
        ) {
            ExecMiss::NotAsked | ExecMiss::Lost => {}
            ExecMiss::Cached(verdict) => (d.verdict, d.source) = (verdict, SOURCE_CACHE),
            // The PDP task writes this attempt's record.
            ExecMiss::Asked => return answer(&sb, VERDICT_DENY),
        }
    }
    audit::emit(|ev: &mut ExecEvent| {
        audit::fill_header(
            &mut ev.header,
            KIND_EXEC,
            &sb,
            d.verdict,
            d.source,
            d.rule,
            &typed::Task::current(),
        );
        ev.op = EXEC_OP_EXEC;
        ev.path_len = d.path_len;
        ev.argc = argc;
        ev.argv_len = argv_len;
        vfs::copy(ev.path.as_mut_ptr(), buf.as_ptr(), PATH_MAX_LEN);
        vfs::copy(ev.argv.as_mut_ptr(), argv[0].as_ptr(), ARGV_LEN);
    });
    answer(&sb, d.verdict)
}

/// `mmap_file(struct file *file, unsigned long reqprot, unsigned long prot,
/// unsigned long flags)`; `file` is NULL for anonymous memory.
#[lsm(hook = "mmap_file")]
pub fn mmap_file(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(4);
    if retval != 0 {
        return retval;
    }
    let prot: u64 = ctx.arg(2);
    if prot & PROT_EXEC == 0 {
        return 0;
    }
    let file: *const u8 = ctx.arg(0);
    if file.is_null() {
        return 0;
    }
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let Some(buf) = PATH_SCRATCH.get_ptr_mut(0) else {
        return -EPERM;
    };
    // SAFETY: per-CPU scratch, valid for this run.
    let buf = unsafe { &mut *buf };
    // SAFETY: `file` is the hook's argument (checked non-NULL).
    let len = unsafe {
        bpf_d_path(
            file.add(kernel::file_f_path() as usize) as *mut path,
            buf.as_mut_ptr() as *mut _,
            PATH_MAX_LEN as u32,
        )
    };
    let path_len = if len > 0 { Some((len - 1) as u32) } else { None };
    let d = decide_exec(&sb, path_len, buf, vfs::file_inode(file), false);
    deny_mapping(&sb, &d, buf, EXEC_OP_MMAP)
}

/// `file_mprotect(struct vm_area_struct *vma, unsigned long reqprot,
/// unsigned long prot)`: mapping a file readable, then making it
/// executable, passes `mmap_file`. No `bpf_d_path` here on 6.1: the path
/// comes from the dentry walk.
#[lsm(hook = "file_mprotect")]
pub fn file_mprotect(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    let prot: u64 = ctx.arg(2);
    if prot & PROT_EXEC == 0 {
        return 0;
    }
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let vma: *const u8 = ctx.arg(0);
    let file = vfs::read_ptr(vma, vfs::global(&VMA_VM_FILE));
    if file.is_null() {
        return 0;
    }
    let Some(buf) = PATH_SCRATCH.get_ptr_mut(0) else {
        return -EPERM;
    };
    // SAFETY: per-CPU scratch, valid for this run.
    let buf = unsafe { &mut *buf };
    let (mnt, dentry) = vfs::path_parts(file.wrapping_add(kernel::file_f_path() as usize));
    let path_len = vfs::dentry_path(mnt, dentry, buf);
    let d = decide_exec(&sb, path_len, buf, vfs::file_inode(file), false);
    deny_mapping(&sb, &d, buf, EXEC_OP_MPROTECT)
}

/// Records and answers an executable mapping that an explicit rule denies;
/// anything else passes unrecorded.
#[inline(always)]
fn deny_mapping(sb: &sandbox::Sandbox, d: &ExecDecision, buf: &[u8; PATH_MAX_LEN], op: u32) -> i32 {
    if d.verdict != VERDICT_DENY {
        return 0;
    }
    let [source, rule, path_len, _] =
        vfs::opaque([d.source.into(), d.rule.into(), d.path_len.into(), 0]).map(|x| x as u32);
    let d = ExecDecision {
        verdict: VERDICT_DENY,
        source,
        rule,
        path_len,
    };
    audit::emit(|ev: &mut ExecEvent| {
        audit::fill_header(
            &mut ev.header,
            KIND_EXEC,
            sb,
            d.verdict,
            d.source,
            d.rule,
            &typed::Task::current(),
        );
        ev.op = op;
        ev.path_len = d.path_len;
        ev.argc = 0;
        ev.argv_len = 0;
        vfs::copy(ev.path.as_mut_ptr(), buf.as_ptr(), PATH_MAX_LEN);
        // Stale bytes: `argv_len` is 0, so userspace reads none of them.
        if let Some(argv) = ARGV_SCRATCH.get_ptr_mut(0) {
            vfs::copy(ev.argv.as_mut_ptr(), argv as *const u8, ARGV_LEN);
        }
    });
    answer(sb, d.verdict)
}

struct ExecDecision {
    verdict: u32,
    source: u32,
    rule: u32,
    path_len: u32,
}

/// The exec verdict for the file at the resolved path in `buf` with inode
/// `inode`. With `use_default` false, only an explicit deny denies (and an
/// unresolvable path passes: the mapping is of a file that was opened, which
/// `file_open` already decided).
#[inline(always)]
fn decide_exec(
    sb: &sandbox::Sandbox,
    path_len: Option<u32>,
    buf: &[u8; PATH_MAX_LEN],
    inode: *const u8,
    use_default: bool,
) -> ExecDecision {
    let sandbox_id = sb.config.sandbox_id;
    let Some(slot) = BEST.get_ptr_mut(0) else {
        return ExecDecision {
            verdict: VERDICT_DENY,
            source: SOURCE_DEFAULT,
            rule: RULE_NONE,
            path_len: u32::MAX,
        };
    };
    // SAFETY: per-CPU scratch, valid for this run. The longest match is kept
    // there (in `read_*`), not in registers: see `BEST`.
    let slot = unsafe { &mut *slot };
    slot.read_verdict = 0;
    let walked = if path_len.is_some() {
        walk_keys(buf, |kind, hash| {
            // SAFETY: plain data written whole by userspace.
            if let Some(v) = unsafe {
                EXEC_RULES.get(FileRuleKey {
                    sandbox_id,
                    kind,
                    hash,
                })
            } {
                (slot.read_verdict, slot.read_rule) = (v.verdict, v.rule);
            }
        })
    } else {
        None
    };
    let best = (slot.read_verdict != 0).then_some((slot.read_verdict, slot.read_rule));
    let path_len = if walked.is_some() {
        path_len.unwrap_or(u32::MAX)
    } else {
        u32::MAX
    };
    if let Some((verdict, rule)) = best
        && verdict == VERDICT_DENY
    {
        return ExecDecision {
            verdict,
            source: SOURCE_RULE,
            rule,
            path_len,
        };
    }
    if !inode.is_null() {
        let (dev, ino) = vfs::inode_id(inode);
        let key = InodeKey {
            sandbox_id,
            kind: INODE_KIND_EXEC,
            dev,
            ino,
        };
        // SAFETY: plain data written whole by userspace.
        if let Some(v) = unsafe { INODE_RULES.get(key) }
            && v.read_verdict == VERDICT_DENY
        {
            return ExecDecision {
                verdict: VERDICT_DENY,
                source: SOURCE_RULE,
                rule: v.read_rule,
                path_len,
            };
        }
    }
    if !use_default {
        return ExecDecision {
            verdict: VERDICT_ALLOW,
            source: SOURCE_DEFAULT,
            rule: RULE_NONE,
            path_len,
        };
    }
    if walked.is_none() {
        // Unresolvable or too long: fail closed.
        return ExecDecision {
            verdict: VERDICT_DENY,
            source: SOURCE_DEFAULT,
            rule: RULE_NONE,
            path_len,
        };
    }
    match best {
        Some((verdict, rule)) => ExecDecision {
            verdict,
            source: SOURCE_RULE,
            rule,
            path_len,
        },
        None => ExecDecision {
            verdict: sb.config.exec_default,
            source: SOURCE_DEFAULT,
            rule: RULE_NONE,
            path_len,
        },
    }
}

/// Reads the exec syscall's argv from the caller's memory into
/// `ARGV_SCRATCH[0]`; returns (argc, bytes).
#[inline(always)]
fn read_argv() -> (u32, u32) {
    let Some(scratch) = ARGV_SCRATCH.get_ptr_mut(0) else {
        return (0, 0);
    };
    let out = scratch as *mut u8;
    // SAFETY: plain helper calls; `regs` is only probe-read.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    let nr: u64 = vfs::read_val(regs, vfs::global(&PT_REGS_ORIG_AX));
    let argv: *const *const u8 = match nr {
        NR_EXECVE => vfs::read_ptr(regs, vfs::global(&PT_REGS_SI)) as *const *const u8,
        NR_EXECVEAT => vfs::read_ptr(regs, vfs::global(&PT_REGS_DX)) as *const *const u8,
        _ => core::ptr::null(),
    };
    if argv.is_null() {
        return (0, 0);
    }
    let mut off = 0usize;
    let mut argc = 0u32;
    // Bounded: ARGV_MAX_ARGS iterations.
    while argc < ARGV_MAX_ARGS && off < ARGV_LEN {
        // SAFETY: probe reads tolerate any user address.
        let Ok(arg) = (unsafe { bpf_probe_read_user(argv.wrapping_add(argc as usize)) }) else {
            break;
        };
        if arg.is_null() {
            break;
        }
        // SAFETY: at most ARGV_LEN bytes at an offset below ARGV_LEN, inside
        // the 2 * ARGV_LEN scratch.
        let n = unsafe {
            bpf_probe_read_user_str(
                out.add(off & ARGV_MASK) as *mut _,
                ARGV_LEN as u32,
                arg as *const _,
            )
        };
        if n <= 0 {
            break;
        }
        off += n as usize;
        argc += 1;
    }
    (argc, off.min(ARGV_LEN) as u32)
}
