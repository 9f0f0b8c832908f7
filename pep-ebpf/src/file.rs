//! File enforcement: BPF LSM `file_open`.
//!
//! The path is what the kernel resolved (`bpf_d_path` on `file->f_path`),
//! never user memory, so symlinks, `..` and `/proc/self/fd` tricks reach the
//! rules as the real path. The path is walked once: at each `/` the prefix so
//! far is looked up as a `KIND_PREFIX` rule, at the end the whole path as
//! `KIND_EXACT`; the longest match per access decides; a `KIND_NAME` deny on
//! the last component beats every allow.
//!
//! Failure policy: a task outside every sandbox is never denied (fail open for
//! the host). For a sandboxed task, a path that cannot be resolved or is longer
//! than `PATH_MAX_LEN` is denied (fail closed) and recorded.

use aya_ebpf::{
    bindings::path,
    helpers::{bpf_probe_read_kernel, generated::bpf_d_path},
    macros::{lsm, map},
    maps::{HashMap, PerCpuArray},
    programs::LsmContext,
};
use pep_common::{
    event::{
        ACCESS_READ, ACCESS_WRITE, FileEvent, KIND_FILE, PATH_MAX_LEN, RULE_NONE, SOURCE_DEFAULT,
        SOURCE_RULE, VERDICT_ALLOW, VERDICT_DENY,
    },
    file::{FNV_OFFSET, FNV_PRIME, FileRuleKey, FileRuleValue, KIND_EXACT, KIND_NAME, KIND_PREFIX},
    sandbox::MODE_AUDIT,
};

use crate::{audit, kernel, sandbox};

#[map]
static FILE_RULES: HashMap<FileRuleKey, FileRuleValue> = HashMap::with_max_entries(65536, 0);

/// Per-CPU scratch for the resolved path: too big for the 512-byte stack.
#[map]
static PATH_SCRATCH: PerCpuArray<[u8; PATH_MAX_LEN]> = PerCpuArray::with_max_entries(1, 0);

const FMODE_READ: u32 = 0x1;
const FMODE_WRITE: u32 = 0x2;
const EPERM: i32 = 1;

#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    // LSM hygiene: an earlier program's denial stands.
    let retval: i32 = ctx.arg(1);
    if retval != 0 {
        return retval;
    }
    try_file_open(&ctx)
}

#[inline(always)]
fn try_file_open(ctx: &LsmContext) -> i32 {
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let file: *const u8 = ctx.arg(0);
    // SAFETY: `file` is the hook's trusted argument; the offset comes from BTF.
    let f_mode: u32 =
        unsafe { bpf_probe_read_kernel(file.add(kernel::file_f_mode() as usize) as *const u32) }.unwrap_or(0);
    let mut access = 0;
    if f_mode & FMODE_READ != 0 {
        access |= ACCESS_READ;
    }
    if f_mode & FMODE_WRITE != 0 {
        access |= ACCESS_WRITE;
    }
    // SAFETY: as above; `f_path` is a `struct path` member of `struct file`.
    let f_path = unsafe { file.add(kernel::file_f_path() as usize) } as *mut path;
    decide(&sb, f_path, access)
}

/// Decides `access` to the file at `p` for sandbox `sb`, records it, and
/// returns the hook's answer.
#[inline(always)]
fn decide(sb: &sandbox::Sandbox, p: *mut path, access: u32) -> i32 {
    let Some(buf) = PATH_SCRATCH.get_ptr_mut(0) else {
        return -EPERM;
    };
    // SAFETY: per-CPU scratch, valid for this run.
    let buf = unsafe { &mut *buf };
    // SAFETY: `p` points into the hook's `struct file`.
    let len = unsafe { bpf_d_path(p, buf.as_mut_ptr() as *mut _, PATH_MAX_LEN as u32) };
    let (verdict, source, rule) = if len <= 0 {
        // Unresolvable or longer than PATH_MAX_LEN: fail closed.
        (VERDICT_DENY, SOURCE_DEFAULT, RULE_NONE)
    } else {
        match_path(sb, buf, access)
    };
    let path_len = if len > 0 { (len - 1) as u32 } else { u32::MAX };
    audit::emit(|ev: &mut FileEvent| {
        audit::fill_header(&mut ev.header, KIND_FILE, sb, verdict, source, rule);
        ev.access = access;
        ev.path_len = path_len;
        ev.path = *buf;
    });
    if verdict == VERDICT_DENY && sb.config.mode != MODE_AUDIT {
        -EPERM
    } else {
        0
    }
}

/// Walks the NUL-terminated path in `buf` once and returns (verdict, source,
/// rule index) for `access`. Read and write are decided separately, each by
/// its own longest match; the access is allowed only when both allow.
#[inline(always)]
fn match_path(sb: &sandbox::Sandbox, buf: &[u8; PATH_MAX_LEN], access: u32) -> (u32, u32, u32) {
    let sandbox_id = sb.config.sandbox_id;
    let mut h = FNV_OFFSET;
    let mut name_h = FNV_OFFSET;
    let mut best = Best::default();
    let mut i = 0;
    // Bounded by PATH_MAX_LEN.
    while i < PATH_MAX_LEN {
        let c = buf[i];
        if c == 0 {
            break;
        }
        if c == b'/' {
            // The prefix before this `/`; at i == 0 it is "", which is how
            // the compiler stores `/**`.
            best.update(&FileRuleKey {
                sandbox_id,
                kind: KIND_PREFIX,
                hash: h,
            });
            name_h = FNV_OFFSET;
        } else {
            name_h = (name_h ^ u64::from(c)).wrapping_mul(FNV_PRIME);
        }
        h = (h ^ u64::from(c)).wrapping_mul(FNV_PRIME);
        i += 1;
    }
    // The whole path: a `dir/**` rule covers `dir` itself; an exact rule is
    // more specific still, so it is looked up last.
    best.update(&FileRuleKey {
        sandbox_id,
        kind: KIND_PREFIX,
        hash: h,
    });
    best.update(&FileRuleKey {
        sandbox_id,
        kind: KIND_EXACT,
        hash: h,
    });
    // A `name` deny beats every allow.
    // SAFETY: plain data written whole by userspace.
    if let Some(v) = unsafe {
        FILE_RULES.get(FileRuleKey {
            sandbox_id,
            kind: KIND_NAME,
            hash: name_h,
        })
    } {
        if access & ACCESS_READ != 0 && v.read_verdict == VERDICT_DENY {
            return (VERDICT_DENY, SOURCE_RULE, v.read_rule);
        }
        if access & ACCESS_WRITE != 0 && v.write_verdict == VERDICT_DENY {
            return (VERDICT_DENY, SOURCE_RULE, v.write_rule);
        }
    }
    let default = sb.config.file_default;
    let (rv, rr, rs) = best
        .read
        .map_or((default, RULE_NONE, SOURCE_DEFAULT), |(v, r)| (v, r, SOURCE_RULE));
    let (wv, wr, ws) = best
        .write
        .map_or((default, RULE_NONE, SOURCE_DEFAULT), |(v, r)| (v, r, SOURCE_RULE));
    let (want_r, want_w) = (access & ACCESS_READ != 0, access & ACCESS_WRITE != 0);
    if want_w && wv == VERDICT_DENY {
        return (wv, ws, wr);
    }
    if want_r && rv == VERDICT_DENY {
        return (rv, rs, rr);
    }
    if want_w {
        return (wv, ws, wr);
    }
    if want_r {
        return (rv, rs, rr);
    }
    // Neither read nor write (e.g. O_PATH-like opens): nothing to decide.
    (VERDICT_ALLOW, SOURCE_DEFAULT, RULE_NONE)
}

/// Longest match so far, per access, as (verdict, rule index).
#[derive(Default)]
struct Best {
    read: Option<(u32, u32)>,
    write: Option<(u32, u32)>,
}

impl Best {
    #[inline(always)]
    fn update(&mut self, key: &FileRuleKey) {
        // SAFETY: plain data written whole by userspace.
        if let Some(v) = unsafe { FILE_RULES.get(key) } {
            if v.read_verdict != 0 {
                self.read = Some((v.read_verdict, v.read_rule));
            }
            if v.write_verdict != 0 {
                self.write = Some((v.write_verdict, v.write_rule));
            }
        }
    }
}
