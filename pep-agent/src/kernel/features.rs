//! Kernel feature detection for `doctor` and for the exit-2 messages.

use std::{fs, path::Path};

/// What the running kernel offers that pep-agent uses.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Features {
    pub btf: bool,
    pub bpf_lsm: bool,
    pub cgroup2: Option<String>,
    pub ring_buffer: bool,
    pub is_root: bool,
    pub lsm_list: String,
}

impl Features {
    pub fn detect() -> Self {
        let lsm_list = fs::read_to_string("/sys/kernel/security/lsm")
            .unwrap_or_default()
            .trim()
            .to_string();
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Self {
            btf: Path::new(super::btf::VMLINUX_BTF).exists(),
            bpf_lsm: lsm_list.split(',').any(|l| l == "bpf"),
            cgroup2: super::cgroup::cgroup2_root()
                .ok()
                .map(|p| p.display().to_string()),
            ring_buffer: kernel_at_least(&release, 5, 8),
            is_root: nix::unistd::geteuid().is_root(),
            lsm_list,
        }
    }
}

/// Whether a `uname -r` string is at least `major.minor`.
pub fn kernel_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let ma: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mi: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (ma, mi) >= (major, minor)
}

/// How to enable BPF LSM, for error messages.
pub const ENABLE_BPF_LSM: &str = "add `bpf` to the kernel's LSM list: boot with lsm=<current list>,bpf (see /sys/kernel/security/lsm) on a kernel built with CONFIG_BPF_LSM=y";

/// Whether this kernel accepts pep-agent's BPF LSM programs: the LSM list
/// names bpf AND a load actually succeeds (some kernels refuse trampolines).
pub fn lsm_loadable() -> bool {
    crate::enforcer::probe_lsm().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release() {
        assert!(kernel_at_least("6.18.44-fc-v657", 5, 8));
        assert!(kernel_at_least("5.8.0", 5, 8));
        assert!(!kernel_at_least("5.4.0-100-generic", 5, 8));
    }
}
