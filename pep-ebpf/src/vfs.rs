//! VFS helpers for the LSM hooks: the path of a `(vfsmount, dentry)` pair
//! built by walking the dentry and mount chains, a file's inode identity, and
//! its file system's magic.
//!
//! Why a walk: on 6.1, `bpf_d_path` is allowed only in hooks the kernel counts
//! as sleepable (`file_open`, `bprm_check_security`, `mmap_file`, ...), not in
//! the `path_*` hooks that change the tree. The walk does what the kernel's
//! `prepend_path` does: from the dentry up through `d_parent`, crossing a mount
//! at its root to the `mnt_mountpoint` in `mnt_parent`, until the calling
//! task's root (`current->fs->root`, so a chrooted task sees its own view, as
//! with `bpf_d_path`) or the global root. Every pointer is read with
//! `bpf_probe_read_kernel` at offsets resolved from the running kernel's BTF.
//!
//! Limits (fail closed: the caller denies a sandboxed access it cannot name):
//! `PATH_MAX_LEN` bytes NUL included, and `MAX_WALK_STEPS` steps (components
//! plus mount crossings). The walk takes no lock: a concurrent rename may
//! give a path that mixes old and new names, which is what the kernel's own
//! lockless d_path would retry; here the hooks run with the parent directory
//! locked (`path_*`), so the last component is stable.

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel, generated},
    macros::map,
    maps::PerCpuArray,
};
use pep_common::event::PATH_MAX_LEN;

/// `offsetof(struct path, mnt)`.
#[unsafe(no_mangle)]
pub(crate) static PATH_MNT: u64 = 0;
/// `offsetof(struct path, dentry)`.
#[unsafe(no_mangle)]
pub(crate) static PATH_DENTRY: u64 = 0;
/// `offsetof(struct dentry, d_parent)`.
#[unsafe(no_mangle)]
static DENTRY_D_PARENT: u64 = 0;
/// `offsetof(struct dentry, d_name)`.
#[unsafe(no_mangle)]
static DENTRY_D_NAME: u64 = 0;
/// `offsetof(struct dentry, d_inode)`.
#[unsafe(no_mangle)]
static DENTRY_D_INODE: u64 = 0;
/// `offsetof(struct dentry, d_sb)`.
#[unsafe(no_mangle)]
static DENTRY_D_SB: u64 = 0;
/// `offsetof(struct qstr, len)`.
#[unsafe(no_mangle)]
static QSTR_LEN: u64 = 0;
/// `offsetof(struct qstr, name)`.
#[unsafe(no_mangle)]
static QSTR_NAME: u64 = 0;
/// `offsetof(struct vfsmount, mnt_root)`.
#[unsafe(no_mangle)]
static VFSMOUNT_MNT_ROOT: u64 = 0;
/// `offsetof(struct mount, mnt)`: `real_mount()` is `container_of` this.
#[unsafe(no_mangle)]
static MOUNT_MNT: u64 = 0;
/// `offsetof(struct mount, mnt_parent)`.
#[unsafe(no_mangle)]
static MOUNT_MNT_PARENT: u64 = 0;
/// `offsetof(struct mount, mnt_mountpoint)`.
#[unsafe(no_mangle)]
static MOUNT_MNT_MOUNTPOINT: u64 = 0;
/// `offsetof(struct task_struct, fs)`.
#[unsafe(no_mangle)]
pub(crate) static TASK_FS: u64 = 0;
/// `offsetof(struct fs_struct, root)`.
#[unsafe(no_mangle)]
pub(crate) static FS_ROOT: u64 = 0;
/// `offsetof(struct file, f_inode)`.
#[unsafe(no_mangle)]
pub(crate) static FILE_F_INODE: u64 = 0;
/// `offsetof(struct inode, i_ino)`.
#[unsafe(no_mangle)]
pub(crate) static INODE_I_INO: u64 = 0;
/// `offsetof(struct inode, i_sb)`.
#[unsafe(no_mangle)]
pub(crate) static INODE_I_SB: u64 = 0;
/// `offsetof(struct super_block, s_dev)`.
#[unsafe(no_mangle)]
pub(crate) static SB_S_DEV: u64 = 0;
/// `offsetof(struct super_block, s_magic)`.
#[unsafe(no_mangle)]
static SB_S_MAGIC: u64 = 0;

#[inline(always)]
pub fn global(v: &'static u64) -> usize {
    // SAFETY: a valid static; the volatile read stops the compiler folding the
    // zero it was compiled with.
    unsafe { core::ptr::read_volatile(v) as usize }
}

/// `*(base + off)` as a pointer, or null when it cannot be read.
#[inline(always)]
pub fn read_ptr(base: *const u8, off: usize) -> *const u8 {
    if base.is_null() {
        return core::ptr::null();
    }
    // SAFETY: probe reads tolerate any address; a bad one yields an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off) as *const *const u8) }.unwrap_or(core::ptr::null())
}

/// `*(base + off)` as a `T`, or `T::default()` when it cannot be read.
#[inline(always)]
pub fn read_val<T: Copy + Default>(base: *const u8, off: usize) -> T {
    if base.is_null() {
        return T::default();
    }
    // SAFETY: as `read_ptr`.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off) as *const T) }.unwrap_or_default()
}

/// `path->mnt` and `path->dentry`.
#[inline(always)]
pub fn path_parts(path: *const u8) -> (*const u8, *const u8) {
    (
        read_ptr(path, global(&PATH_MNT)),
        read_ptr(path, global(&PATH_DENTRY)),
    )
}

/// The calling task's root (`current->fs->root`): mount and dentry, null
/// when they cannot be read. Paths are relative to it.
#[inline(always)]
pub fn task_root() -> (*const u8, *const u8) {
    // SAFETY: plain helper call; the task pointer is only probe-read.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let fs = read_ptr(task, global(&TASK_FS));
    if fs.is_null() {
        return (core::ptr::null(), core::ptr::null());
    }
    path_parts(fs.wrapping_add(global(&FS_ROOT)))
}

/// `file->f_inode`.
#[inline(always)]
pub fn file_inode(file: *const u8) -> *const u8 {
    read_ptr(file, global(&FILE_F_INODE))
}

/// `dentry->d_inode` (null for a negative dentry: a name being created).
#[inline(always)]
pub fn dentry_inode(dentry: *const u8) -> *const u8 {
    read_ptr(dentry, global(&DENTRY_D_INODE))
}

/// `dentry->d_sb`.
#[inline(always)]
pub fn dentry_sb(dentry: *const u8) -> *const u8 {
    read_ptr(dentry, global(&DENTRY_D_SB))
}

/// `inode->i_sb`.
#[inline(always)]
pub fn inode_sb(inode: *const u8) -> *const u8 {
    read_ptr(inode, global(&INODE_I_SB))
}

/// (`s_dev`, `i_ino`) of an inode: its identity across hard links and bind
/// mounts. (0, 0) when it cannot be read.
#[inline(always)]
pub fn inode_id(inode: *const u8) -> (u64, u64) {
    if inode.is_null() {
        return (0, 0);
    }
    let ino: u64 = read_val(inode, global(&INODE_I_INO));
    let dev: u32 = read_val(inode_sb(inode), global(&SB_S_DEV));
    (u64::from(dev), ino)
}

/// `sb->s_magic`: which file system.
#[inline(always)]
pub fn sb_magic(sb: *const u8) -> u64 {
    read_val(sb, global(&SB_S_MAGIC))
}

/// `CGROUP2_SUPER_MAGIC`.
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;
/// `CGROUP_SUPER_MAGIC` (v1 hierarchies).
pub const CGROUP_SUPER_MAGIC: u64 = 0x0027_e0eb;
/// `BPF_FS_MAGIC`.
pub const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// Most steps of the walk: path components plus mount crossings. A path of
/// `PATH_MAX_LEN` bytes has at most `PATH_MAX_LEN / 2` components.
pub const MAX_WALK_STEPS: u32 = (PATH_MAX_LEN / 2) as u32 + 8;

/// Where the walk builds the path backwards, from offset `PATH_MAX_LEN` down.
/// Twice the path size so that every masked write stays inside.
const WALK_LEN: usize = 2 * PATH_MAX_LEN;
const _: () = assert!(PATH_MAX_LEN.is_power_of_two());

/// `PATH_MAX_LEN - 1`, read through `mask()`. LLVM drops an `& MASK` that it
/// can prove redundant from earlier comparisons, but the verifier may not have
/// kept the same facts; a value loaded from a static stays opaque to LLVM and
/// is a known constant to the verifier (read-only data), so the `and` stays
/// and bounds every offset.
static PATH_MASK: usize = PATH_MAX_LEN - 1;

#[inline(always)]
fn mask() -> usize {
    // SAFETY: a valid static.
    unsafe { core::ptr::read_volatile(&PATH_MASK) }
}

#[map]
static WALK_SCRATCH: PerCpuArray<[u8; WALK_LEN]> = PerCpuArray::with_max_entries(1, 0);

/// Copies `n` bytes from `src` to `dst` with one helper call. A plain array
/// assignment may compile to a byte loop, which the verifier then walks once
/// per state that reaches it.
#[inline(always)]
pub fn copy(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: callers pass a destination of at least `n` bytes; the source is
    // probe-read.
    unsafe { generated::bpf_probe_read_kernel(dst as *mut _, n as u32, src as *const _) };
}

/// Copies the first `n` bytes of the path buffer `src` into `dst`, rounded
/// up to whole 8-byte words, with plain loads and stores: for the record
/// of every open, where `copy`'s helper call (a fault-tolerant copy) costs
/// more than the bytes. Both are buffers the verifier knows (a map value,
/// ring-buffer memory), so every access is checked at load; the loop is
/// bounded by the buffer's size. The bytes after the NUL up to the word's
/// end are whatever `src` held there: userspace reads `n - 1` bytes.
#[inline(always)]
pub fn copy_path(dst: &mut [u8; PATH_MAX_LEN], src: &[u8; PATH_MAX_LEN], n: usize) {
    const WORDS: usize = PATH_MAX_LEN / 8;
    let words = n.div_ceil(8);
    let (dst, src) = (dst.as_mut_ptr() as *mut u64, src.as_ptr() as *const u64);
    let mut i = 0;
    while i < WORDS && i < words {
        // SAFETY: `i < WORDS`: inside both buffers, which callers keep
        // 8-byte aligned (their offsets in `FileEvent` and `FileCacheValue`
        // are multiples of 8, asserted in pep-common).
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
        i += 1;
    }
}

/// The walk's state between `bpf_loop` steps (per CPU: a program runs to
/// completion on one CPU).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WalkState {
    // Kernel addresses, held as integers (a map value type must be `Sync`).
    d: usize,
    vfsmnt: usize,
    mount: usize,
    root_mnt: usize,
    root_dentry: usize,
    /// The path so far occupies `WALK_SCRATCH[pos..PATH_MAX_LEN]`.
    pos: usize,
    /// `WALK_RUNNING`, `WALK_DONE` or `WALK_FAILED`.
    status: u64,
}

const WALK_RUNNING: u64 = 0;
const WALK_DONE: u64 = 1;
const WALK_FAILED: u64 = 2;

#[map]
static WALK_STATE: PerCpuArray<WalkState> = PerCpuArray::with_max_entries(1, 0);

/// Writes the path of `dentry` in mount `vfsmnt` into `out`, NUL-terminated,
/// relative to the calling task's root. Returns the length (NUL excluded), or
/// `None` when the path is longer than `PATH_MAX_LEN` (NUL included), deeper
/// than `MAX_WALK_STEPS`, or cannot be read.
///
/// The steps run under `bpf_loop` (5.17+): the verifier checks one step once,
/// with its state unknown, instead of unrolling up to `MAX_WALK_STEPS`
/// iterations times every branch of each (which exceeds its budget of one
/// million instructions in `file_open`).
#[inline(always)]
pub fn dentry_path(vfsmnt: *const u8, dentry: *const u8, out: &mut [u8; PATH_MAX_LEN]) -> Option<u32> {
    let scratch = WALK_SCRATCH.get_ptr_mut(0)? as *mut u8;
    let st = WALK_STATE.get_ptr_mut(0)?;
    if vfsmnt.is_null() || dentry.is_null() {
        return None;
    }
    let (root_mnt, root_dentry) = task_root();
    // SAFETY: per-CPU map value, ours for this run.
    unsafe {
        *st = WalkState {
            d: dentry as usize,
            vfsmnt: vfsmnt as usize,
            mount: vfsmnt.wrapping_sub(global(&MOUNT_MNT)) as usize,
            root_mnt: root_mnt as usize,
            root_dentry: root_dentry as usize,
            pos: PATH_MAX_LEN,
            status: WALK_RUNNING,
        };
        generated::bpf_loop(
            MAX_WALK_STEPS,
            walk_step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    // SAFETY: as above.
    let st = unsafe { &*st };
    if st.status != WALK_DONE {
        return None;
    }
    let mut pos = st.pos;
    if pos == 0 || pos > PATH_MAX_LEN {
        return None;
    }
    if pos == PATH_MAX_LEN {
        // The root itself.
        pos -= 1;
        // SAFETY: inside the scratch.
        unsafe { *scratch.add(pos & mask()) = b'/' };
    }
    let n = (PATH_MAX_LEN - pos) & mask();
    // SAFETY: n < PATH_MAX_LEN bytes into `out` of PATH_MAX_LEN; the source
    // is inside the scratch.
    let rc = unsafe {
        generated::bpf_probe_read_kernel(
            out.as_mut_ptr() as *mut _,
            n as u32,
            scratch.add(pos & mask()) as *const _,
        )
    };
    // SAFETY: n < PATH_MAX_LEN (a raw write: an index would need a bounds
    // check, and the verifier rejects the panic path behind it).
    unsafe { *out.as_mut_ptr().add(n) = 0 };
    if rc != 0 {
        return None;
    }
    Some(n as u32)
}

/// One step of `dentry_path`: `bpf_loop`'s callback. Returns 1 to stop.
#[inline(never)]
extern "C" fn walk_step(_index: u32, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(st) = WALK_STATE.get_ptr_mut(0) else {
        return 1;
    };
    let Some(scratch) = WALK_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    let scratch = scratch as *mut u8;
    // SAFETY: per-CPU map value, ours for this run.
    let st = unsafe { &mut *st };
    if st.d == st.root_dentry && st.vfsmnt == st.root_mnt {
        st.status = WALK_DONE;
        return 1;
    }
    let (d, vfsmnt, mount) = (st.d as *const u8, st.vfsmnt as *const u8, st.mount as *const u8);
    if d == read_ptr(vfsmnt, global(&VFSMOUNT_MNT_ROOT)) {
        // At the root of this mount: continue at its mount point.
        let parent = read_ptr(mount, global(&MOUNT_MNT_PARENT));
        if parent.is_null() || parent == mount {
            // The root of a mount tree without having passed the task's
            // root: another namespace's tree (`/proc/PID/root`), a detached
            // mount (`open_tree`, `fsmount`), or outside a chroot. The
            // kernel's d_path would name it from that tree's root, a path
            // that says nothing about where the file is: not resolvable.
            st.status = WALK_FAILED;
            return 1;
        }
        st.d = read_ptr(mount, global(&MOUNT_MNT_MOUNTPOINT)) as usize;
        st.mount = parent as usize;
        st.vfsmnt = parent.wrapping_add(global(&MOUNT_MNT)) as usize;
        return 0;
    }
    let parent = read_ptr(d, global(&DENTRY_D_PARENT));
    if parent.is_null() {
        st.status = WALK_FAILED;
        return 1;
    }
    if parent == d {
        // The root of a tree that is not mounted: as above.
        st.status = WALK_FAILED;
        return 1;
    }
    let off_name = global(&DENTRY_D_NAME);
    let len: u32 = read_val(d, off_name + global(&QSTR_LEN));
    let name = read_ptr(d, off_name + global(&QSTR_NAME));
    let len = len as usize & mask();
    let pos = st.pos & (2 * PATH_MAX_LEN - 1);
    // Room for "/" + name, and a NUL at the end: pos - len - 1 >= 1.
    if len == 0 || name.is_null() || pos > PATH_MAX_LEN || len + 2 > pos {
        st.status = WALK_FAILED;
        return 1;
    }
    let at = (pos - len) & mask();
    // SAFETY: `at` and `len` are below PATH_MAX_LEN, so the write stays
    // inside the 2 * PATH_MAX_LEN scratch; the source is probe-read.
    let rc = unsafe {
        generated::bpf_probe_read_kernel(scratch.add(at) as *mut _, (len & mask()) as u32, name as *const _)
    };
    if rc != 0 {
        st.status = WALK_FAILED;
        return 1;
    }
    let pos = pos - len - 1;
    // SAFETY: pos < PATH_MAX_LEN after the check above.
    unsafe { *scratch.add(pos & mask()) = b'/' };
    st.pos = pos;
    st.d = parent as usize;
    0
}

/// Most mounts between a file's mount and the task's root mount.
const MAX_MOUNT_DEPTH: u32 = 32;

/// Whether the mount `vfsmnt` is reachable from the calling task's root:
/// climbing the mount tree from it meets the root's mount before the top of
/// a tree. `bpf_d_path` names a file in an unreachable mount (another mount
/// namespace's tree through `/proc/PID/root`, a detached `open_tree` or
/// `fsmount` mount) from that tree's own root, a path that says nothing
/// about where the file is, so a sandboxed open through one is not
/// resolvable (fail closed). Deeper than `MAX_MOUNT_DEPTH`: unreachable.
#[inline(always)]
pub fn mount_reachable(vfsmnt: *const u8) -> bool {
    let (root_mnt, _) = task_root();
    if vfsmnt.is_null() || root_mnt.is_null() {
        return false;
    }
    let mut mount = vfsmnt.wrapping_sub(global(&MOUNT_MNT));
    let mut i = 0;
    // Bounded by MAX_MOUNT_DEPTH.
    while i < MAX_MOUNT_DEPTH {
        if mount.wrapping_add(global(&MOUNT_MNT)) == root_mnt {
            return true;
        }
        let parent = read_ptr(mount, global(&MOUNT_MNT_PARENT));
        if parent.is_null() || parent == mount {
            return false;
        }
        mount = parent;
        i += 1;
    }
    false
}

/// Per-CPU slot for `opaque`.
#[map]
static OPAQUE: PerCpuArray<[u64; 4]> = PerCpuArray::with_max_entries(1, 0);

/// Returns its arguments unchanged, but as values the verifier cannot know:
/// stored to and loaded back from a map. Decisions reach the event code with
/// different constants (verdict, source, rule); passed through here first,
/// they arrive in one state, and the verifier checks the event code (the ring
/// buffer reservation and the header with its lineage walk) once instead of
/// once per decision outcome.
#[inline(always)]
pub fn opaque(v: [u64; 4]) -> [u64; 4] {
    let Some(slot) = OPAQUE.get_ptr_mut(0) else {
        return v;
    };
    // SAFETY: per-CPU map value, ours for this run; volatile so that the
    // compiler does not forward the stored values.
    unsafe {
        core::ptr::write_volatile(slot, v);
        core::ptr::read_volatile(slot)
    }
}
