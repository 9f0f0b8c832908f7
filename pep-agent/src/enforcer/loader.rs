//! Loading and attaching the eBPF programs.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{CgroupSockAddr, Lsm, ProgramError},
};
use pep_common::event::{COUNTER_DECISIONS, COUNTER_LOST};

use super::attach;
use crate::kernel::btf::{self, KernelBtf};

#[derive(Debug, thiserror::Error)]
pub enum EnforcerError {
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("BPF LSM is not available: {reason}; {hint}", hint = crate::kernel::features::ENABLE_BPF_LSM)]
    LsmUnavailable { reason: String },
    #[error("map {0} is missing from the eBPF object")]
    NoMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: String, source: std::io::Error },
    #[error("mapping ring buffer {name}: {source}")]
    Ring {
        name: &'static str,
        source: std::io::Error,
    },
}

/// The network hooks, attached to each sandbox's cgroup.
pub const NET_PROGRAMS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];
/// The LSM hooks, attached globally and scoped by cgroup in the programs.
/// (program name, hook): files (`file.rs`), exec (`exec.rs`),
/// self-protection (`protect.rs`) and the mount tree (`mount.rs`).
pub const LSM_PROGRAMS: [(&str, &str); 26] = [
    ("file_open", "file_open"),
    ("path_unlink", "path_unlink"),
    ("path_mkdir", "path_mkdir"),
    ("path_rmdir", "path_rmdir"),
    ("path_mknod", "path_mknod"),
    ("path_symlink", "path_symlink"),
    ("path_truncate", "path_truncate"),
    ("path_chmod", "path_chmod"),
    ("path_chown", "path_chown"),
    ("path_link", "path_link"),
    ("path_rename", "path_rename"),
    ("bprm_check_security", "bprm_check_security"),
    ("mmap_file", "mmap_file"),
    ("file_mprotect", "file_mprotect"),
    ("bpf", "bpf"),
    ("task_kill", "task_kill"),
    ("ptrace_access_check", "ptrace_access_check"),
    ("kernel_read_file", "kernel_read_file"),
    ("kernel_load_data", "kernel_load_data"),
    ("kernel_module_request", "kernel_module_request"),
    ("task_alloc", "task_alloc"),
    ("sb_mount", "sb_mount"),
    ("sb_umount", "sb_umount"),
    ("move_mount", "move_mount"),
    ("sb_pivotroot", "sb_pivotroot"),
    ("path_chroot", "path_chroot"),
];

/// What to load.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Load and attach the BPF LSM programs (files, exec).
    pub lsm: bool,
}

/// The loaded object: programs, maps, and the links that keep them attached.
/// Dropping it detaches everything and frees the maps.
pub struct Enforcer {
    pub(crate) ebpf: Ebpf,
    lsm: bool,
}

impl Enforcer {
    /// Loads the embedded object and the network programs; with `opts.lsm`,
    /// also loads and attaches the LSM programs.
    pub fn load(opts: LoadOptions) -> Result<Self, EnforcerError> {
        let mut this = Self::load_net()?;
        if opts.lsm {
            this.load_lsm()?;
        }
        Ok(this)
    }

    /// Loads the object and the network programs, then tries the LSM
    /// programs. If the kernel cannot run them, returns the network-only
    /// enforcer with the reason, instead of an error: the object is parsed,
    /// relocated and verified once, not once per attempt (which doubled the
    /// start-up of `run` on kernels without BPF LSM).
    pub fn load_lsm_if_available() -> Result<(Self, Option<String>), EnforcerError> {
        let mut this = Self::load_net()?;
        match this.load_lsm() {
            Ok(()) => Ok((this, None)),
            Err(EnforcerError::LsmUnavailable { reason }) => Ok((this, Some(reason))),
            Err(e) => Err(e),
        }
    }

    fn load_net() -> Result<Self, EnforcerError> {
        let kbtf = KernelBtf::load()?;
        let offsets = btf::program_offsets(&kbtf)?;
        let mut loader = EbpfLoader::new();
        for (name, value) in &offsets {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(crate::ebpf::OBJECT)?;
        for name in NET_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| EnforcerError::Program { name, source })?;
        }
        Ok(Self { ebpf, lsm: false })
    }

    /// Loads and attaches every LSM program, or none: on a failure, the ones
    /// already attached are unloaded, so the enforcer stays network-only.
    fn load_lsm(&mut self) -> Result<(), EnforcerError> {
        let lsm_list = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
        if !lsm_list.trim().split(',').any(|l| l == "bpf") {
            return Err(EnforcerError::LsmUnavailable {
                reason: format!("the kernel's LSM list is `{}`, without bpf", lsm_list.trim()),
            });
        }
        let aya_btf = aya::Btf::from_sys_fs().map_err(|e| EnforcerError::LsmUnavailable {
            reason: e.to_string(),
        })?;
        for (i, (name, hook)) in LSM_PROGRAMS.into_iter().enumerate() {
            let prog: &mut Lsm = program(&mut self.ebpf, name)?;
            let res = prog
                .load(hook, &aya_btf)
                .map_err(|e| EnforcerError::LsmUnavailable {
                    reason: format!("the kernel refused to load LSM program {name}: {e}"),
                })
                .and_then(|()| {
                    prog.attach()
                        .map(drop)
                        .map_err(|source| EnforcerError::Program { name, source })
                });
            if let Err(e) = res {
                self.unload_lsm(&LSM_PROGRAMS[..=i]);
                return Err(e);
            }
        }
        // Self-protection: no signal or ptrace from a sandbox reaches us.
        if let Err(e) = self.protect_pid(std::process::id()) {
            self.unload_lsm(&LSM_PROGRAMS);
            return Err(e);
        }
        self.lsm = true;
        Ok(())
    }

    /// Detaches and unloads `progs` (best effort: a program that never
    /// loaded has nothing to unload).
    fn unload_lsm(&mut self, progs: &[(&'static str, &'static str)]) {
        for (name, _) in progs {
            if let Ok(prog) = program::<Lsm>(&mut self.ebpf, name) {
                let _ = prog.unload();
            }
        }
    }

    /// The `PROTECTED` map: processes that sandboxed processes may neither
    /// signal nor ptrace (read by pep-ebpf `protect.rs`).
    fn protected(&mut self) -> Result<aya::maps::HashMap<&mut MapData, u32, u32>, EnforcerError> {
        let map = self
            .ebpf
            .map_mut("PROTECTED")
            .ok_or(EnforcerError::NoMap("PROTECTED"))?;
        aya::maps::HashMap::try_from(map).map_err(protected_err)
    }

    /// Adds `tgid` to `PROTECTED`.
    pub fn protect_pid(&mut self, tgid: u32) -> Result<(), EnforcerError> {
        self.protected()?.insert(tgid, 1, 0).map_err(protected_err)
    }

    /// Makes `tgid` the only process in `PROTECTED`: for the host daemon,
    /// whose pinned map outlives it. A dead daemon's pid stays protected
    /// otherwise, whichever process the kernel gives it next, and the map
    /// (64 entries) would refuse a new daemon after enough restarts. (One
    /// daemon runs at a time; each `run` has maps of its own.)
    pub fn protect_only(&mut self, tgid: u32) -> Result<(), EnforcerError> {
        let mut m = self.protected()?;
        let stale: Vec<u32> = m.keys().filter_map(Result::ok).filter(|k| *k != tgid).collect();
        for k in stale {
            m.remove(&k).map_err(protected_err)?;
        }
        m.insert(tgid, 1, 0).map_err(protected_err)
    }

    /// An enforcer around an object loaded by `pinned` (the host daemon).
    pub(super) fn from_parts(ebpf: Ebpf, lsm: bool) -> Self {
        Self { ebpf, lsm }
    }

    /// Whether the LSM programs are attached.
    pub fn lsm_enforced(&self) -> bool {
        self.lsm
    }

    /// Attaches the network programs to the cgroup at `cgroup_path`.
    ///
    /// The attachment is held by the cgroup, not by this process (legacy
    /// `BPF_PROG_ATTACH`, not a bpf_link): if pep-agent dies, the sandbox
    /// stays enforced (fail closed) until its cgroup is removed. Multi mode:
    /// other programs on the same cgroups, and nested sandboxes, all run; the
    /// connect proceeds only if all allow.
    pub fn attach_net(&mut self, cgroup_path: &Path) -> Result<(), EnforcerError> {
        self.net_attach_op(cgroup_path, attach::Op::Attach)
    }

    /// Detaches what `attach_net` attached to `cgroup_path`.
    pub fn detach_net(&mut self, cgroup_path: &Path) -> Result<(), EnforcerError> {
        self.net_attach_op(cgroup_path, attach::Op::Detach)
    }

    fn net_attach_op(&mut self, cgroup_path: &Path, op: attach::Op) -> Result<(), EnforcerError> {
        let file = File::open(cgroup_path).map_err(|source| EnforcerError::Cgroup {
            path: cgroup_path.display().to_string(),
            source,
        })?;
        for (name, attach_type) in NET_PROGRAMS.iter().zip(attach::NET_ATTACH_TYPES) {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            let fd = prog
                .fd()
                .map_err(|source| EnforcerError::Program { name, source })?;
            attach::cgroup(op, file.as_fd(), fd.as_fd(), attach_type).map_err(|source| {
                EnforcerError::Cgroup {
                    path: format!("{} ({name}, {op:?})", cgroup_path.display()),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// The ring buffer of decisions. Can be taken once.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, EnforcerError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(EnforcerError::NoMap("EVENTS"))?;
        RingBuf::try_from(map).map_err(|source| EnforcerError::Map {
            name: "EVENTS",
            source,
        })
    }

    /// The `EVENTS` ring buffer map itself, for a reader of its own
    /// (`audit::ring::CommitRing`).
    pub fn take_events_map(&mut self) -> Result<MapData, EnforcerError> {
        match self.ebpf.take_map("EVENTS") {
            Some(aya::maps::Map::RingBuf(data)) => Ok(data),
            _ => Err(EnforcerError::NoMap("EVENTS")),
        }
    }

    /// (decisions, lost) counted by the kernel, summed over CPUs.
    pub fn counters(&self) -> Result<(u64, u64), EnforcerError> {
        let map = self
            .ebpf
            .map("COUNTERS")
            .ok_or(EnforcerError::NoMap("COUNTERS"))?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| EnforcerError::Map {
                name: "COUNTERS",
                source,
            })?;
        let sum = |i: u32| -> Result<u64, EnforcerError> {
            Ok(arr
                .get(&i, 0)
                .map_err(|source| EnforcerError::Map {
                    name: "COUNTERS",
                    source,
                })?
                .iter()
                .sum())
        };
        Ok((sum(COUNTER_DECISIONS)?, sum(COUNTER_LOST)?))
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EnforcerError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(EnforcerError::Program {
        name,
        source: ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into()
        .map_err(|source| EnforcerError::Program { name, source })
}

/// Loads (without attaching) the LSM programs, to learn whether this kernel
/// accepts them.
pub fn probe_lsm() -> Result<(), EnforcerError> {
    let kbtf = KernelBtf::load()?;
    let offsets = btf::program_offsets(&kbtf)?;
    let mut loader = EbpfLoader::new();
    for (name, value) in &offsets {
        loader.override_global(name, value, true);
    }
    let mut ebpf = loader.load(crate::ebpf::OBJECT)?;
    let aya_btf = aya::Btf::from_sys_fs().map_err(|e| EnforcerError::LsmUnavailable {
        reason: e.to_string(),
    })?;
    for (name, hook) in LSM_PROGRAMS {
        let prog: &mut Lsm = program(&mut ebpf, name)?;
        prog.load(hook, &aya_btf)
            .map_err(|e| EnforcerError::LsmUnavailable {
                reason: format!("the kernel refused to load LSM program {name}: {e}"),
            })?;
    }
    Ok(())
}

fn protected_err(source: aya::maps::MapError) -> EnforcerError {
    EnforcerError::Map {
        name: "PROTECTED",
        source,
    }
}
