//! Compiled file rules: hash-map keys and values.
//!
//! The kernel resolves a path, then walks it once, hashing it byte by byte; at
//! every `/` boundary it looks up the prefix seen so far as a `KIND_PREFIX` key,
//! and at the end the whole path as `KIND_EXACT`. The last (longest) match
//! decides. Hashes are FNV-1a 64 (`fnv1a`), the same on both sides.

pub const KIND_PREFIX: u32 = 1;
pub const KIND_EXACT: u32 = 2;
pub const KIND_NAME: u32 = 3;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileRuleKey {
    pub sandbox_id: u32,
    pub kind: u32,
    pub hash: u64,
}

/// Verdicts per access at one key; 0 means "no rule here for that access".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileRuleValue {
    pub read_verdict: u32,
    pub write_verdict: u32,
    pub read_rule: u32,
    pub write_rule: u32,
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `bytes`.
pub const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(FNV_PRIME);
        i += 1;
    }
    h
}

/// Key of `INODE_RULES`: a file by identity, so a hard link (another path to
/// the same inode) cannot escape a deny that names the file by path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub sandbox_id: u32,
    /// `INODE_KIND_*`.
    pub kind: u32,
    /// `super_block.s_dev` in the kernel's encoding: `major << 20 | minor`.
    pub dev: u64,
    pub ino: u64,
}

/// `InodeKey::kind` for file rules; the value is a `FileRuleValue` holding
/// only denials.
pub const INODE_KIND_FILE: u32 = 1;
/// `InodeKey::kind` for exec rules; the value is a `FileRuleValue` whose
/// `read_verdict`/`read_rule` hold the exec deny (one map, one value type).
pub const INODE_KIND_EXEC: u32 = 2;

/// The kernel's `MKDEV(major, minor)`, which `super_block.s_dev` holds.
pub const fn kernel_dev(major: u32, minor: u32) -> u64 {
    ((major as u64) << 20) | (minor as u64 & 0xf_ffff)
}

/// Value of `EXEC_RULES` (keyed by `FileRuleKey` with `KIND_PREFIX` or
/// `KIND_EXACT`, hashed as for file rules).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecRuleValue {
    /// `crate::event::VERDICT_*`.
    pub verdict: u32,
    /// Index in the policy's `exec.rules`.
    pub rule: u32,
}

/// Value of the kernel's per-file verdict cache (`FILE_CACHE`, keyed by the
/// `struct inode` address; kernel-only, never written by userspace).
///
/// A file's decision depends on its resolved path, so the entry keeps what
/// the path was resolved from and is used only when all of it still holds:
/// the same sandbox generation (a reload gives a sandbox a new id), the same
/// inode identity (device, number, generation: the address may be reused
/// after the inode is freed), a single link, the same mount, the same task
/// root, and no rename of a directory or change to the mount tree since
/// (`epoch`). The rule matches themselves are kept, not a verdict, so one
/// entry answers every access.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FileCacheValue {
    pub sandbox_id: u32,
    /// `inode.i_generation`.
    pub generation: u32,
    /// The tree epoch read before the path was resolved.
    pub epoch: u64,
    pub dev: u64,
    pub ino: u64,
    /// The `struct vfsmount` the file was opened through.
    pub mnt: u64,
    /// The opening task's root, mount and dentry (paths are relative to it).
    pub root_mnt: u64,
    pub root: u64,
    /// The longest prefix/exact match per access (0: none).
    pub best: FileRuleValue,
    /// The `name` rule on the last component (0: none).
    pub name: FileRuleValue,
    /// The denials recorded for the inode itself (`INODE_RULES`).
    pub inode: FileRuleValue,
    /// Bytes of `path` in use, NUL excluded; `u32::MAX` when unresolved.
    pub path_len: u32,
    /// `inode.i_nlink` when the entry was made (always 1 in the cache).
    pub nlink: u32,
    pub path: [u8; crate::event::PATH_MAX_LEN],
}

// pep-ebpf copies a path from this value into a `FileEvent` a word at a
// time (`vfs::copy_path`): both buffers start on 8-byte boundaries.
const _: () = assert!(core::mem::offset_of!(FileCacheValue, path) % 8 == 0);
const _: () = assert!(core::mem::offset_of!(crate::event::FileEvent, path) % 8 == 0);
