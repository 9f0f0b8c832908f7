//! Plain loads through BTF-typed kernel pointers, for `file_open`'s cached
//! path, which runs on every open of a sandboxed process.
//!
//! An LSM program's arguments are typed by the kernel's BTF (`struct file *`
//! in `file_open`), as is `bpf_get_current_task_btf()`. Through such a
//! pointer the verifier allows an ordinary load at a constant offset: it
//! checks the offset against the type's layout, gives a pointer field its
//! BTF type in turn, and guards the load with an exception-table entry (a
//! bad address reads as 0). The offsets are globals in read-only data that
//! userspace sets from BTF before the load and aya freezes, so the verifier
//! knows them as constants. One load instead of one `bpf_probe_read_kernel`
//! call per field: the cache hit reads about ten fields.
//!
//! Only pointers that came from a typed pointer by these loads may be used
//! here: a pointer read with `bpf_probe_read_kernel` (or held in a map) is
//! a plain number to the verifier, which then refuses the program at load.
//! The offsets come from the BTF the verifier checks against, and a
//! pointer field must be read whole at its own offset to stay typed, so a
//! wrong pointer offset fails the load rather than reading garbage.

use aya_ebpf::helpers::generated::bpf_get_current_task_btf;
use pep_common::event::COMM_LEN;

use crate::{
    audit::Actor,
    kernel,
    vfs::{self, global},
};

/// `offsetof(struct task_struct, pid)`.
#[unsafe(no_mangle)]
static TASK_PID: u64 = 0;
/// `offsetof(struct task_struct, cred)`.
#[unsafe(no_mangle)]
static TASK_CRED: u64 = 0;
/// `offsetof(struct cred, uid)` and `gid` (`kuid_t`/`kgid_t`: one u32 each).
#[unsafe(no_mangle)]
static CRED_UID: u64 = 0;
#[unsafe(no_mangle)]
static CRED_GID: u64 = 0;
/// `offsetof(struct task_struct, cgroups)`.
#[unsafe(no_mangle)]
static TASK_CGROUPS: u64 = 0;
/// `offsetof(struct css_set, dfl_cgrp)`.
#[unsafe(no_mangle)]
static CSS_SET_DFL_CGRP: u64 = 0;
/// `offsetof(struct cgroup, kn)`.
#[unsafe(no_mangle)]
static CGROUP_KN: u64 = 0;
/// `offsetof(struct kernfs_node, id)`: a cgroup's id is its node's.
#[unsafe(no_mangle)]
static KERNFS_NODE_ID: u64 = 0;

/// `*(base + off)`, a pointer field of a typed struct.
#[inline(always)]
fn load_ptr(base: *const u8, off: usize) -> *const u8 {
    if base.is_null() {
        return core::ptr::null();
    }
    // SAFETY: `base` is typed (see the module comment); the verifier checks
    // the field and the kernel's exception table guards the load.
    unsafe { core::ptr::read_volatile(base.wrapping_add(off) as *const *const u8) }
}

/// `*(base + off)`, a scalar field of type `T` of a typed struct (0 for a
/// null `base`).
#[inline(always)]
fn load_val<T: Copy + Default>(base: *const u8, off: usize) -> T {
    if base.is_null() {
        return T::default();
    }
    // SAFETY: as `load_ptr`.
    unsafe { core::ptr::read_volatile(base.wrapping_add(off) as *const T) }
}

/// `file->f_mode`.
#[inline(always)]
pub fn file_mode(file: *const u8) -> u32 {
    load_val(file, kernel::file_f_mode() as usize)
}

/// `file->f_inode`.
#[inline(always)]
pub fn file_inode(file: *const u8) -> *const u8 {
    load_ptr(file, global(&vfs::FILE_F_INODE))
}

/// `file->f_path.mnt`.
#[inline(always)]
pub fn file_mnt(file: *const u8) -> *const u8 {
    load_ptr(file, kernel::file_f_path() as usize + global(&vfs::PATH_MNT))
}

/// `file->f_path.dentry`.
#[inline(always)]
pub fn file_dentry(file: *const u8) -> *const u8 {
    load_ptr(file, kernel::file_f_path() as usize + global(&vfs::PATH_DENTRY))
}

/// `inode->i_sb`.
#[inline(always)]
pub fn inode_sb(inode: *const u8) -> *const u8 {
    load_ptr(inode, global(&vfs::INODE_I_SB))
}

/// (`s_dev`, `i_ino`) of an inode, as `vfs::inode_id`.
#[inline(always)]
pub fn inode_id(inode: *const u8) -> (u64, u64) {
    let ino: u64 = load_val(inode, global(&vfs::INODE_I_INO));
    let dev: u32 = load_val(inode_sb(inode), global(&vfs::SB_S_DEV));
    (u64::from(dev), ino)
}

/// `inode->i_generation` and `inode->i_nlink`.
#[inline(always)]
pub fn inode_generation_nlink(inode: *const u8, generation_off: usize, nlink_off: usize) -> (u32, u32) {
    (load_val(inode, generation_off), load_val(inode, nlink_off))
}

/// The calling task, typed (`bpf_get_current_task_btf()`).
#[derive(Clone, Copy)]
pub struct Task(*const u8);

impl Task {
    #[inline(always)]
    pub fn current() -> Self {
        // SAFETY: plain helper call; it returns the typed current task.
        Self(unsafe { bpf_get_current_task_btf() } as *const u8)
    }
}

/// What `audit::Helpers` reads with helper calls, as loads. The values are
/// the helpers' own: `pid`/`tgid` as the kernel numbers them, `uid`/`gid`
/// raw from `current->cred` (the initial namespace's view, where ids map to
/// themselves), the default hierarchy's cgroup through `current->cgroups`
/// (stable while the task runs in a hook), and `comm` as stored (the
/// kernel pads it with NULs; the last byte is forced to NUL all the same,
/// as a concurrent rename could tear it).
impl Actor for Task {
    #[inline(always)]
    fn task(&self) -> u64 {
        self.0 as u64
    }

    #[inline(always)]
    fn pid_tgid(&self) -> u64 {
        let pid: u32 = load_val(self.0, global(&TASK_PID));
        let tgid: u32 = load_val(self.0, kernel::task_tgid_offset());
        (u64::from(tgid) << 32) | u64::from(pid)
    }

    #[inline(always)]
    fn uid_gid(&self) -> u64 {
        let cred = load_ptr(self.0, global(&TASK_CRED));
        let uid: u32 = load_val(cred, global(&CRED_UID));
        let gid: u32 = load_val(cred, global(&CRED_GID));
        (u64::from(gid) << 32) | u64::from(uid)
    }

    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        let cset = load_ptr(self.0, global(&TASK_CGROUPS));
        let cgrp = load_ptr(cset, global(&CSS_SET_DFL_CGRP));
        load_val(load_ptr(cgrp, global(&CGROUP_KN)), global(&KERNFS_NODE_ID))
    }

    #[inline(always)]
    fn comm(&self) -> [u8; COMM_LEN] {
        let off = kernel::task_comm();
        let lo: u64 = load_val(self.0, off);
        let hi: u64 = load_val(self.0, off + 8);
        let mut c = [0u8; COMM_LEN];
        c[..8].copy_from_slice(&lo.to_ne_bytes());
        c[8..].copy_from_slice(&hi.to_ne_bytes());
        c[COMM_LEN - 1] = 0;
        c
    }

    #[inline(always)]
    fn exec_id(&self) -> u64 {
        load_val(self.0, kernel::task_exec_id_offset())
    }
}

/// The task's root (`task->fs->root`), as `vfs::task_root`.
#[inline(always)]
pub fn task_root(task: Task) -> (*const u8, *const u8) {
    let fs = load_ptr(task.0, global(&vfs::TASK_FS));
    let root = global(&vfs::FS_ROOT);
    (
        load_ptr(fs, root + global(&vfs::PATH_MNT)),
        load_ptr(fs, root + global(&vfs::PATH_DENTRY)),
    )
}
