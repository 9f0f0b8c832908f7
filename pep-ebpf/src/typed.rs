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

use crate::{
    kernel,
    vfs::{self, global},
};

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

/// The calling task's root (`current->fs->root`), as `vfs::task_root`.
#[inline(always)]
pub fn task_root() -> (*const u8, *const u8) {
    // SAFETY: plain helper call; it returns the typed current task.
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    let fs = load_ptr(task, global(&vfs::TASK_FS));
    let root = global(&vfs::FS_ROOT);
    (
        load_ptr(fs, root + global(&vfs::PATH_MNT)),
        load_ptr(fs, root + global(&vfs::PATH_DENTRY)),
    )
}
