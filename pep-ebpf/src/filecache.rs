//! The per-file verdict cache of `file_open`: resolving and matching a path
//! costs far more than the open itself, and a sandboxed agent opens the same
//! files again and again.
//!
//! An entry is keyed by the `struct inode` address and holds the resolved
//! path and the rule matches for it (`FileCacheValue`). A path is a function
//! of more than the inode, so an entry is used only when everything the path
//! was resolved from still holds (checked on every hit):
//! - the sandbox generation: a reload gives the sandbox a new id, so an entry
//!   from an older policy never matches (it ages out of the LRU);
//! - the inode's identity (device, number, generation): the address may be
//!   reused once the inode is freed;
//! - exactly one link: a file with two names has two paths and is never
//!   cached (a link made later makes an existing entry unusable);
//! - the mount it was opened through, and the task's root: the same file
//!   seen through a bind mount or from a chroot has another path;
//! - the tree epoch: any rename of a directory and any change to the mount
//!   tree, by any process, moves whole subtrees, and bumps it. A rename or
//!   unlink of a file forgets that file's entry.
//!
//! The epoch is read before the path is resolved and stored with the entry,
//! so a change that races with a miss leaves an entry that is already stale.
//! The invalidating hooks run before the change (LSM hooks are checks): an
//! open racing with a rename may cache the old path, which gives that task
//! what an open file descriptor taken a moment earlier would have given it.
//!
//! Failure policy: the cache can only answer with a decision the rules made;
//! when anything cannot be read the entry does not match and the path is
//! resolved and matched again (fail to the slow path, never open).

use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
};
use pep_common::file::FileCacheValue;

use crate::{
    typed,
    vfs::{self, global, read_val},
};

/// 8,192 entries of about 350 bytes: under 3 MiB, preallocated.
#[map]
static FILE_CACHE: LruHashMap<u64, FileCacheValue> = LruHashMap::with_max_entries(8192, 0);

/// The tree epoch: bumped by every directory rename and mount-tree change.
#[map]
static TREE_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// Per-CPU working copy of an entry (too big for the stack): a miss resolves
/// and matches into it, then inserts it.
#[map]
pub static CACHE_SCRATCH: PerCpuArray<FileCacheValue> = PerCpuArray::with_max_entries(1, 0);

/// `offsetof(struct inode, i_generation)`.
#[unsafe(no_mangle)]
static INODE_I_GENERATION: u64 = 0;
/// `offsetof(struct inode, i_nlink)`.
#[unsafe(no_mangle)]
static INODE_I_NLINK: u64 = 0;
/// `offsetof(struct inode, i_mode)`.
#[unsafe(no_mangle)]
static INODE_I_MODE: u64 = 0;
const S_IFMT: u16 = 0o170_000;
const S_IFDIR: u16 = 0o040_000;

/// Reads into the working entry `v` what a cached entry must agree with,
/// for `inode` opened through `mnt` by `task`, the current task. The epoch is read
/// first, before the caller resolves anything. `inode` and `mnt` are typed
/// pointers (`typed.rs`): `file_open`'s own.
///
/// The identity lives in the per-CPU map value, not on the stack: values
/// loaded back from a map are unknown to the verifier, so the rest of the
/// program is verified once, not once per combination of reads that failed
/// (a failed read yields 0, which the verifier would track as a constant).
#[inline(always)]
pub fn identify(v: &mut FileCacheValue, inode: *const u8, mnt: *const u8, task: typed::Task) {
    v.epoch = epoch();
    let (dev, ino) = typed::inode_id(inode);
    let (root_mnt, root) = typed::task_root(task);
    let (generation, nlink) =
        typed::inode_generation_nlink(inode, global(&INODE_I_GENERATION), global(&INODE_I_NLINK));
    v.dev = dev;
    v.ino = ino;
    v.generation = generation;
    v.nlink = nlink;
    v.mnt = mnt as u64;
    v.root_mnt = root_mnt as u64;
    v.root = root as u64;
}

/// Whether a decision about the file identified in `v` may be cached: one
/// name, and an identity that could be read.
#[inline(always)]
fn cacheable(v: &FileCacheValue, inode: u64) -> bool {
    v.nlink == 1 && inode != 0 && v.mnt != 0 && v.root_mnt != 0 && v.root != 0
}

/// The current tree epoch.
#[inline(always)]
fn epoch() -> u64 {
    TREE_EPOCH.get(0).copied().unwrap_or(0)
}

/// Invalidates every entry: a directory moved or the mount tree changed.
#[inline(always)]
pub fn bump_epoch() {
    if let Some(slot) = TREE_EPOCH.get_ptr_mut(0) {
        // SAFETY: the array's live, 8-byte aligned u64 (atomic: every CPU
        // bumps the same slot).
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(slot, 1)
        };
    }
}

/// The entry for `inode` in sandbox `sandbox_id`, when it agrees with the
/// identity read into `id` (`identify`).
#[inline(always)]
pub fn lookup(id: &FileCacheValue, inode: u64, sandbox_id: u32) -> Option<&'static FileCacheValue> {
    if !cacheable(id, inode) {
        return None;
    }
    // SAFETY: kernel-written plain data; LRU values stay valid for the
    // program's run (RCU).
    let v = unsafe { FILE_CACHE.get(inode) }?;
    (v.sandbox_id == sandbox_id
        && v.epoch == id.epoch
        && v.dev == id.dev
        && v.ino == id.ino
        && v.generation == id.generation
        && v.mnt == id.mnt
        && v.root_mnt == id.root_mnt
        && v.root == id.root
        && v.path_len != u32::MAX)
        .then_some(v)
}

/// Inserts the working entry `v` (identified, resolved and matched for
/// sandbox `sandbox_id`) for `inode`, when the file may be cached.
#[inline(always)]
pub fn insert(v: &mut FileCacheValue, inode: u64, sandbox_id: u32) {
    if !cacheable(v, inode) || v.path_len == u32::MAX {
        return;
    }
    v.sandbox_id = sandbox_id;
    // A full LRU evicts; an error leaves the file uncached, which is safe.
    let _ = FILE_CACHE.insert(inode, v, 0);
}

/// Called by the hooks that remove a name (unlink, rmdir), for any process:
/// the entry of what it named is forgotten (its inode number may then be
/// reused). No other path changes.
#[inline(always)]
pub fn name_removed(dentry: *const u8) {
    let inode = vfs::dentry_inode(dentry);
    if !inode.is_null() {
        let _ = FILE_CACHE.remove(inode as u64);
    }
}

/// Called by the rename hook for both ends, for any process: moving a
/// directory moves a subtree (every entry goes); a file's own entry is
/// forgotten.
#[inline(always)]
pub fn name_moves(dentry: *const u8) {
    let inode = vfs::dentry_inode(dentry);
    if inode.is_null() {
        return;
    }
    let mode: u16 = read_val(inode, global(&INODE_I_MODE));
    if mode & S_IFMT == S_IFDIR {
        bump_epoch();
    } else {
        let _ = FILE_CACHE.remove(inode as u64);
    }
}
