//! File enforcement: BPF LSM `file_open` and the `path_*` hooks that change
//! the tree (unlink, rename both ends, mkdir, rmdir, mknod (which is how
//! `open(O_CREAT)` of a new file reaches the LSM), truncate, link, symlink,
//! chmod, chown). Every one of these but `file_open` is "write" (SPEC).
//!
//! The path is what the kernel resolved, never user memory: `bpf_d_path` on
//! `file->f_path` in `file_open` (allowed there), a bounded dentry walk in the
//! `path_*` hooks (`vfs::dentry_path`; 6.1 refuses `bpf_d_path` there). So
//! symlinks, `..`, `/proc/self/root`, `/proc/self/fd/N` and openat2's RESOLVE
//! flags reach the rules as the real path. The path is walked once: at each `/`
//! the prefix so far is looked up as a `KIND_PREFIX` rule, at the end the whole
//! path as `KIND_EXACT`; the longest match per access decides; a `KIND_NAME`
//! deny on the last component beats every allow. Then the file's identity
//! (`s_dev`, `i_ino`) is looked up in `INODE_RULES`: userspace records there the
//! inodes of denied files (exact-path denies, and files with more than one link
//! under denied prefixes), so a hard link made before the sandbox started
//! cannot reach a denied file by another name.
//!
//! `file_open` keeps what it resolved and matched per file in a verdict cache
//! (`filecache.rs`), so reopening a file skips the resolution and the walk;
//! the cache answers only while the path it was resolved from still holds.
//! Every decision, cached or not, is recorded with its path.
//!
//! Self-protection comes first: a write to, or a change in, a cgroup or BPF
//! file system (recognised by the superblock's magic, not by path, so another
//! mount of it is caught too) is denied whatever the policy (`protect.rs`).
//!
//! Failure policy: a task outside every sandbox is never denied (fail open for
//! the host; one array read and one hash lookup). For a sandboxed task, a path
//! that cannot be resolved or is longer than `PATH_MAX_LEN` (NUL included) is
//! denied (fail closed) and recorded with `path_len = u32::MAX`.

use aya_ebpf::{
    bindings::path,
    helpers::generated::bpf_d_path,
    macros::{lsm, map},
    maps::{HashMap, PerCpuArray},
    programs::LsmContext,
};
use pep_common::{
    event::{
        ACCESS_READ, ACCESS_WRITE, COUNTER_FILE_CACHE_HIT, COUNTER_FILE_CACHE_MISS, FileEvent, KIND_FILE,
        PATH_MAX_LEN, RULE_NONE, SELF_BPFFS, SELF_CGROUP, SOURCE_DEFAULT, SOURCE_RULE, VERDICT_ALLOW,
        VERDICT_DENY,
    },
    file::{
        FNV_OFFSET, FNV_PRIME, FileCacheValue, FileRuleKey, FileRuleValue, INODE_KIND_FILE, InodeKey,
        KIND_EXACT, KIND_NAME, KIND_PREFIX,
    },
    sandbox::MODE_AUDIT,
};

use crate::{audit, filecache, kernel, protect, sandbox, typed, vfs};

#[map]
static FILE_RULES: HashMap<FileRuleKey, FileRuleValue> = HashMap::with_max_entries(65536, 0);

/// Denials by inode identity (`INODE_KIND_FILE`: `FileRuleValue`;
/// `INODE_KIND_EXEC`: `ExecRuleValue`, read by `exec.rs`).
#[map]
pub static INODE_RULES: HashMap<InodeKey, FileRuleValue> = HashMap::with_max_entries(65536, 0);

/// The longest match so far per access (0: none), kept in a map rather than
/// in registers: the verifier then sees one state per loop iteration instead
/// of one per combination of matches so far.
#[map]
pub static BEST: PerCpuArray<FileRuleValue> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch for the resolved path: too big for the 512-byte stack.
#[map]
pub static PATH_SCRATCH: PerCpuArray<[u8; PATH_MAX_LEN]> = PerCpuArray::with_max_entries(1, 0);

const FMODE_READ: u32 = 0x1;
const FMODE_WRITE: u32 = 0x2;
pub const EPERM: i32 = 1;

/// The hook's answer for a decision: in audit mode a deny is only recorded.
#[inline(always)]
pub fn answer(sb: &sandbox::Sandbox, verdict: u32) -> i32 {
    if verdict == VERDICT_DENY && sb.config.mode != MODE_AUDIT {
        -EPERM
    } else {
        0
    }
}

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
    // Typed: the fields on the way to a cache hit are plain loads (`typed.rs`).
    let file: *const u8 = ctx.arg(0);
    let f_mode = typed::file_mode(file);
    let mut access = 0;
    if f_mode & FMODE_READ != 0 {
        access |= ACCESS_READ;
    }
    if f_mode & FMODE_WRITE != 0 {
        access |= ACCESS_WRITE;
    }
    let inode = typed::file_inode(file);
    let mnt = typed::file_mnt(file);
    if access & ACCESS_WRITE != 0
        && let Some(op) = protected_fs(typed::inode_sb(inode))
    {
        return protect::deny_path(&sb, op, mnt, typed::file_dentry(file), 0);
    }
    let Some(v) = filecache::CACHE_SCRATCH.get_ptr_mut(0) else {
        return -EPERM;
    };
    // SAFETY: per-CPU scratch, valid for this run.
    let v = unsafe { &mut *v };
    let task = typed::Task::current();
    // Identity (and the tree epoch) first, before anything is resolved.
    filecache::identify(v, inode, mnt, task);
    if let Some(cached) = filecache::lookup(v, inode as u64, sb.config.sandbox_id) {
        audit::bump(COUNTER_FILE_CACHE_HIT);
        return record(&sb, cached, access, task);
    }
    audit::bump(COUNTER_FILE_CACHE_MISS);
    // SAFETY: `f_path` points into the hook's `struct file`; the offset
    // comes from BTF.
    let f_path = unsafe { file.add(kernel::file_f_path() as usize) } as *mut path;
    // SAFETY: `f_path` is the hook's `struct path`.
    let len = unsafe { bpf_d_path(f_path, v.path.as_mut_ptr() as *mut _, PATH_MAX_LEN as u32) };
    // A file in a mount the task's root does not reach has no path that
    // means anything here (`vfs::mount_reachable`). Through `opaque`: one
    // state onwards, whichever way the loop in `mount_reachable` ended.
    let [len, reachable, _, _] = vfs::opaque([len as u64, u64::from(vfs::mount_reachable(mnt)), 0, 0]);
    let len = len as i64;
    // bpf_d_path counts the NUL.
    let path_len = if len > 0 && reachable != 0 {
        Some((len - 1) as u32)
    } else {
        None
    };
    resolve(&sb, path_len, v, inode);
    filecache::insert(v, inode as u64, sb.config.sandbox_id);
    record(&sb, v, access, task)
}

/// Which self-protection applies to writes on the file system of `sb_ptr`.
#[inline(always)]
pub fn protected_fs(sb_ptr: *const u8) -> Option<u32> {
    match vfs::sb_magic(sb_ptr) {
        vfs::CGROUP2_SUPER_MAGIC | vfs::CGROUP_SUPER_MAGIC => Some(SELF_CGROUP),
        vfs::BPF_FS_MAGIC => Some(SELF_BPFFS),
        _ => None,
    }
}

/// Decides a change to the tree at `dentry` in mount `mnt` (write access).
#[inline(always)]
fn decide_dentry(sb: &sandbox::Sandbox, mnt: *const u8, dentry: *const u8, access: u32) -> i32 {
    if let Some(op) = protected_fs(vfs::dentry_sb(dentry)) {
        return protect::deny_path(sb, op, mnt, dentry, 0);
    }
    let Some(v) = filecache::CACHE_SCRATCH.get_ptr_mut(0) else {
        return -EPERM;
    };
    // SAFETY: per-CPU scratch, valid for this run.
    let v = unsafe { &mut *v };
    let path_len = vfs::dentry_path(mnt, dentry, &mut v.path);
    resolve(sb, path_len, v, vfs::dentry_inode(dentry));
    record(sb, v, access, typed::Task::current())
}

/// Fills `v` for the file whose resolved path is in `v.path` (its length
/// `path_len`, `None` when it could not be resolved) and whose inode is
/// `inode` (may be null: a name being created): the rule matches of the
/// path and the denials of the inode. The length comes from the resolver,
/// not from the hashing walk: a length the verifier knows exactly per loop
/// exit would make it verify everything after the loop once per exit.
#[inline(always)]
fn resolve(sb: &sandbox::Sandbox, path_len: Option<u32>, v: &mut FileCacheValue, inode: *const u8) {
    v.best = FileRuleValue::default();
    v.name = FileRuleValue::default();
    v.inode = FileRuleValue::default();
    // Unresolvable, or longer than PATH_MAX_LEN: `record` fails closed.
    v.path_len = u32::MAX;
    let Some(len) = path_len else {
        return;
    };
    if !match_path(sb, v) {
        return;
    }
    if !inode.is_null() {
        let (dev, ino) = vfs::inode_id(inode);
        let key = InodeKey {
            sandbox_id: sb.config.sandbox_id,
            kind: INODE_KIND_FILE,
            dev,
            ino,
        };
        // SAFETY: plain data written whole by userspace.
        if let Some(d) = unsafe { INODE_RULES.get(key) } {
            v.inode = *d;
        }
    }
    v.path_len = len;
}

/// Decides `access` from the matches in `v`, records the decision with
/// `v`'s path, and returns the hook's answer. The header's task fields are
/// loads through the typed `task` (this runs on every open).
#[inline(always)]
fn record(sb: &sandbox::Sandbox, v: &FileCacheValue, access: u32, task: typed::Task) -> i32 {
    let (verdict, source, rule) = combine(sb, v, access);
    let [verdict, source, rule, path_len] =
        vfs::opaque([verdict.into(), source.into(), rule.into(), v.path_len.into()]).map(|x| x as u32);
    // The path and its NUL only, not the whole buffer: this runs on every
    // open, and most paths are a fraction of PATH_MAX_LEN. The rest of the
    // record's buffer is not written (userspace reads `path_len` bytes).
    let copy_len = if path_len < PATH_MAX_LEN as u32 {
        path_len as usize + 1
    } else {
        0
    };
    audit::emit(|ev: &mut FileEvent| {
        audit::fill_header(&mut ev.header, KIND_FILE, sb, verdict, source, rule, &task);
        ev.access = access;
        ev.path_len = path_len;
        vfs::copy_path(&mut ev.path, &v.path, copy_len);
    });
    answer(sb, verdict)
}

/// (verdict, source, rule index) for `access` from the matches in `v`. Read
/// and write are decided separately, each by its own longest match; the
/// access is allowed only when both allow. A `name` deny beats every allow;
/// an inode denial applies whatever the path.
#[inline(always)]
fn combine(sb: &sandbox::Sandbox, v: &FileCacheValue, access: u32) -> (u32, u32, u32) {
    if v.path_len == u32::MAX {
        // Fail closed.
        return (VERDICT_DENY, SOURCE_DEFAULT, RULE_NONE);
    }
    let (want_r, want_w) = (access & ACCESS_READ != 0, access & ACCESS_WRITE != 0);
    if want_r && v.name.read_verdict == VERDICT_DENY {
        return (VERDICT_DENY, SOURCE_RULE, v.name.read_rule);
    }
    if want_w && v.name.write_verdict == VERDICT_DENY {
        return (VERDICT_DENY, SOURCE_RULE, v.name.write_rule);
    }
    let default = sb.config.file_default;
    let (rv, rr, rs) = match v.best.read_verdict {
        0 => (default, RULE_NONE, SOURCE_DEFAULT),
        x => (x, v.best.read_rule, SOURCE_RULE),
    };
    let (wv, wr, ws) = match v.best.write_verdict {
        0 => (default, RULE_NONE, SOURCE_DEFAULT),
        x => (x, v.best.write_rule, SOURCE_RULE),
    };
    let by_path = if want_w && wv == VERDICT_DENY {
        (wv, ws, wr)
    } else if want_r && rv == VERDICT_DENY {
        (rv, rs, rr)
    } else if want_w {
        (wv, ws, wr)
    } else if want_r {
        (rv, rs, rr)
    } else {
        // Neither read nor write (e.g. O_PATH-like opens): nothing to decide.
        (VERDICT_ALLOW, SOURCE_DEFAULT, RULE_NONE)
    };
    if want_r && v.inode.read_verdict == VERDICT_DENY {
        return (VERDICT_DENY, SOURCE_RULE, v.inode.read_rule);
    }
    if want_w && v.inode.write_verdict == VERDICT_DENY {
        return (VERDICT_DENY, SOURCE_RULE, v.inode.write_rule);
    }
    by_path
}

/// Walks the NUL-terminated path in `buf` once, calling `visit(kind, hash)`
/// for every rule key that can match it, shortest first: the prefix before
/// each `/` (at the leading `/` that is "", which is how `/**` is stored), then
/// the whole path as `KIND_PREFIX` (a `dir/**` rule covers `dir` itself) and
/// as `KIND_EXACT` (more specific still). Returns the hash of the last
/// component, or `None` when `buf` holds no NUL. (Not the length: see
/// `decide`.)
#[inline(always)]
pub fn walk_keys(buf: &[u8; PATH_MAX_LEN], mut visit: impl FnMut(u32, u64)) -> Option<u64> {
    let mut h = FNV_OFFSET;
    let mut name_h = FNV_OFFSET;
    let mut i = 0;
    let mut terminated = false;
    // Bounded by PATH_MAX_LEN.
    while i < PATH_MAX_LEN {
        let c = buf[i];
        if c == 0 {
            terminated = true;
            break;
        }
        if c == b'/' {
            visit(KIND_PREFIX, h);
            name_h = FNV_OFFSET;
        } else {
            name_h = (name_h ^ u64::from(c)).wrapping_mul(FNV_PRIME);
        }
        h = (h ^ u64::from(c)).wrapping_mul(FNV_PRIME);
        i += 1;
    }
    if !terminated {
        return None;
    }
    visit(KIND_PREFIX, h);
    visit(KIND_EXACT, h);
    Some(name_h)
}

/// Matches the NUL-terminated path in `v.path` against the sandbox's rules:
/// the longest prefix/exact match per access into `v.best`, the `name` rule
/// of the last component into `v.name`. Returns false when the path holds no
/// NUL (then nothing may be decided from it).
#[inline(always)]
fn match_path(sb: &sandbox::Sandbox, v: &mut FileCacheValue) -> bool {
    let sandbox_id = sb.config.sandbox_id;
    let best = &mut v.best;
    let Some(name_h) = walk_keys(&v.path, |kind, hash| {
        // SAFETY: plain data written whole by userspace.
        if let Some(r) = unsafe {
            FILE_RULES.get(FileRuleKey {
                sandbox_id,
                kind,
                hash,
            })
        } {
            if r.read_verdict != 0 {
                (best.read_verdict, best.read_rule) = (r.read_verdict, r.read_rule);
            }
            if r.write_verdict != 0 {
                (best.write_verdict, best.write_rule) = (r.write_verdict, r.write_rule);
            }
        }
    }) else {
        return false;
    };
    // SAFETY: plain data written whole by userspace.
    if let Some(r) = unsafe {
        FILE_RULES.get(FileRuleKey {
            sandbox_id,
            kind: KIND_NAME,
            hash: name_h,
        })
    } {
        v.name = *r;
    }
    true
}

// The hooks that change the tree. Each one: an earlier program's denial
// stands; an unsandboxed task is never denied; a sandboxed one needs write
// access to every path the operation changes. `dir` arguments are `struct
// path *` (for the mount), `dentry` the entry in it.

/// `path_unlink(const struct path *dir, struct dentry *dentry)`.
#[lsm(hook = "path_unlink")]
pub fn path_unlink(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(2);
    if retval != 0 {
        return retval;
    }
    let dentry: *const u8 = ctx.arg(1);
    filecache::name_removed(dentry);
    dir_entry(&ctx, 0, 1)
}

/// `path_mkdir(const struct path *dir, struct dentry *dentry, umode_t mode)`.
#[lsm(hook = "path_mkdir")]
pub fn path_mkdir(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    dir_entry(&ctx, 0, 1)
}

/// `path_rmdir(const struct path *dir, struct dentry *dentry)`.
#[lsm(hook = "path_rmdir")]
pub fn path_rmdir(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(2);
    if retval != 0 {
        return retval;
    }
    let dentry: *const u8 = ctx.arg(1);
    filecache::name_removed(dentry);
    dir_entry(&ctx, 0, 1)
}

/// `path_mknod(const struct path *dir, struct dentry *dentry, umode_t mode,
/// unsigned int dev)`: also called for `open(O_CREAT)` of a new regular file
/// (`may_o_create`), before the file exists, so a denied create leaves
/// nothing behind.
#[lsm(hook = "path_mknod")]
pub fn path_mknod(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(4);
    if retval != 0 {
        return retval;
    }
    dir_entry(&ctx, 0, 1)
}

/// `path_symlink(const struct path *dir, struct dentry *dentry, const char
/// *old_name)`: the new name is written; the target text matters only when
/// something opens through it, and then the resolved path is checked.
#[lsm(hook = "path_symlink")]
pub fn path_symlink(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    dir_entry(&ctx, 0, 1)
}

/// `path_truncate(const struct path *path)`.
#[lsm(hook = "path_truncate")]
pub fn path_truncate(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(1);
    if retval != 0 {
        return retval;
    }
    whole_path(&ctx, 0)
}

/// `path_chmod(const struct path *path, umode_t mode)`: a change to the
/// file, so "write".
#[lsm(hook = "path_chmod")]
pub fn path_chmod(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(2);
    if retval != 0 {
        return retval;
    }
    whole_path(&ctx, 0)
}

/// `path_chown(const struct path *path, kuid_t uid, kgid_t gid)`.
#[lsm(hook = "path_chown")]
pub fn path_chown(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    whole_path(&ctx, 0)
}

/// `path_link(struct dentry *old_dentry, const struct path *new_dir, struct
/// dentry *new_dentry)`. The new name is written. The source must be
/// readable and writable too: a new name in a writable place would otherwise
/// expose a file that its own path protects. Both are in the same mount (the
/// kernel refuses cross-mount links with EXDEV before this hook).
#[lsm(hook = "path_link")]
pub fn path_link(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(3);
    if retval != 0 {
        return retval;
    }
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let old_dentry: *const u8 = ctx.arg(0);
    let new_dir: *const u8 = ctx.arg(1);
    let new_dentry: *const u8 = ctx.arg(2);
    let (mnt, _) = vfs::path_parts(new_dir);
    let rc = decide_dentry(&sb, mnt, old_dentry, ACCESS_READ | ACCESS_WRITE);
    if rc != 0 {
        return rc;
    }
    decide_dentry(&sb, mnt, new_dentry, ACCESS_WRITE)
}

/// `path_rename(const struct path *old_dir, struct dentry *old_dentry, const
/// struct path *new_dir, struct dentry *new_dentry, unsigned int flags)`:
/// both ends are written (with RENAME_EXCHANGE, both are moved).
#[lsm(hook = "path_rename")]
pub fn path_rename(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(5);
    if retval != 0 {
        return retval;
    }
    let old_dir: *const u8 = ctx.arg(0);
    let old_dentry: *const u8 = ctx.arg(1);
    let new_dir: *const u8 = ctx.arg(2);
    let new_dentry: *const u8 = ctx.arg(3);
    // For every process: the names change (the target, if any, is replaced
    // or, with RENAME_EXCHANGE, moved too).
    filecache::name_moves(old_dentry);
    filecache::name_moves(new_dentry);
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let (old_mnt, _) = vfs::path_parts(old_dir);
    let rc = decide_dentry(&sb, old_mnt, old_dentry, ACCESS_WRITE);
    if rc != 0 {
        return rc;
    }
    let (new_mnt, _) = vfs::path_parts(new_dir);
    decide_dentry(&sb, new_mnt, new_dentry, ACCESS_WRITE)
}

/// A hook whose arguments `dir_arg` (a `struct path *`) and `dentry_arg` name
/// the entry it changes.
#[inline(always)]
fn dir_entry(ctx: &LsmContext, dir_arg: usize, dentry_arg: usize) -> i32 {
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let dir: *const u8 = ctx.arg(dir_arg);
    let dentry: *const u8 = ctx.arg(dentry_arg);
    let (mnt, _) = vfs::path_parts(dir);
    decide_dentry(&sb, mnt, dentry, ACCESS_WRITE)
}

/// A hook whose argument `path_arg` (a `struct path *`) names the file.
#[inline(always)]
fn whole_path(ctx: &LsmContext, path_arg: usize) -> i32 {
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let p: *const u8 = ctx.arg(path_arg);
    let (mnt, dentry) = vfs::path_parts(p);
    decide_dentry(&sb, mnt, dentry, ACCESS_WRITE)
}
