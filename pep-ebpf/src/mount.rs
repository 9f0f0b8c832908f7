//! Changes to the file-system namespace: mount, umount, move_mount,
//! pivot_root and chroot.
//!
//! Each one changes what a path names, so for a sandboxed process (root
//! included) each is self-protection (`SELF_MOUNT`, denied whatever the
//! policy): a bind mount of a denied directory under an allowed one, or a
//! chroot into a directory, would otherwise give a denied file an allowed
//! path. For every process, a change to the mount tree invalidates the file
//! verdict cache (`filecache.rs`), whose entries hold paths.
//!
//! Failure policy: outside every sandbox nothing is denied (fail open for the
//! host); inside, the denial depends on nothing that can fail.

use aya_ebpf::{macros::lsm, programs::LsmContext};
use pep_common::event::SELF_MOUNT;

use crate::{filecache, protect, sandbox, vfs};

/// Denies the change for a sandboxed task, recording the path it concerns
/// (`path`, a `struct path *`, may be null); 0 for everyone else.
#[inline(always)]
fn deny_sandboxed(path: *const u8) -> i32 {
    let Some(sb) = sandbox::current() else {
        return 0;
    };
    let (mnt, dentry) = vfs::path_parts(path);
    protect::deny_path(&sb, SELF_MOUNT, mnt, dentry, 0)
}

/// `sb_mount(const char *dev_name, const struct path *path, const char
/// *type, unsigned long flags, void *data)`: every mount(2), bind mounts and
/// remounts included.
#[lsm(hook = "sb_mount")]
pub fn sb_mount(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(5);
    if retval != 0 {
        return retval;
    }
    filecache::bump_epoch();
    deny_sandboxed(ctx.arg(1))
}

/// `sb_umount(struct vfsmount *mnt, int flags)`.
#[lsm(hook = "sb_umount")]
pub fn sb_umount(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(2);
    if retval != 0 {
        return retval;
    }
    filecache::bump_epoch();
    deny_sandboxed(core::ptr::null())
}

/// `move_mount(const struct path *from_path, const struct path *to_path)`:
/// also how `open_tree(OPEN_TREE_CLONE)` and `fsmount()` mounts are attached.
#[lsm(hook = "move_mount")]
pub fn move_mount(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(2);
    if retval != 0 {
        return retval;
    }
    filecache::bump_epoch();
    deny_sandboxed(ctx.arg(1))
}

/// `sb_pivotroot(const struct path *old_path, const struct path *new_path)`.
#[lsm(hook = "sb_pivotroot")]
pub fn sb_pivotroot(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(2);
    if retval != 0 {
        return retval;
    }
    filecache::bump_epoch();
    deny_sandboxed(ctx.arg(1))
}

/// `path_chroot(const struct path *path)`. The cache compares the task's
/// root on every hit, so a chroot outside a sandbox needs no invalidation.
#[lsm(hook = "path_chroot")]
pub fn path_chroot(ctx: LsmContext) -> i32 {
    let retval: i32 = ctx.arg(1);
    if retval != 0 {
        return retval;
    }
    deny_sandboxed(ctx.arg(0))
}
