//! The bpffs directory that holds the pinned state.

use std::path::Path;

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i128 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| i128::from(s.filesystem_type().0) == BPF_FS_MAGIC)
}

/// Makes sure `pin_dir` can be created on a bpffs: when its nearest
/// existing ancestor is not one and is `/sys/fs/bpf`, mounts bpffs there.
pub fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let mut existing = pin_dir;
    while !existing.exists() {
        existing = existing
            .parent()
            .ok_or_else(|| anyhow::anyhow!("{}: no existing parent", pin_dir.display()))?;
    }
    if is_bpffs(existing) {
        return Ok(());
    }
    let bpf = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(bpf) && bpf.exists() {
        // SAFETY: mount(2) with valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            anyhow::bail!(
                "mounting bpffs at /sys/fs/bpf: {}",
                std::io::Error::last_os_error()
            );
        }
        tracing::info!("mounted bpffs at /sys/fs/bpf");
        return Ok(());
    }
    anyhow::bail!(
        "pin_dir {} is not on a BPF file system (mount one: `mount -t bpf bpf /sys/fs/bpf`)",
        pin_dir.display()
    )
}
