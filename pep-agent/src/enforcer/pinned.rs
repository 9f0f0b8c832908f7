//! The object loaded with every map, program and LSM link pinned in a bpffs
//! directory, so that enforcement outlives the process that loaded it (the
//! host daemon): a daemon killed with SIGKILL leaves every sandbox enforced,
//! and a restarted daemon adopts what is pinned instead of loading anew.
//!
//! Layout under the pin directory:
//! - `maps/<NAME>`: every map of the object (not the `.rodata`-style data
//!   maps, which the programs hold);
//! - `progs/<NAME>`: the loaded programs; the cgroup hooks are attached and
//!   detached through these, so a restarted daemon never attaches a second
//!   copy and can still detach what an earlier one attached;
//! - `links/<NAME>`: the LSM links, which keep the LSM programs attached.

use std::{
    collections::HashSet,
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{
        Array, HashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupSockAddr, Lsm, links::FdLink},
};
use pep_common::{
    file::{ExecRuleValue, FileRuleKey, FileRuleValue, InodeKey},
    net::{NetKeyV4, NetKeyV6, NetRuleSet},
    sandbox::SandboxConfig,
};

use super::{
    Enforcer, EnforcerError, LoadOptions, attach,
    loader::{LSM_PROGRAMS, NET_PROGRAMS},
};
use crate::kernel::btf::{self, KernelBtf};
use crate::pdp::kernel::ASK_PROGRAMS;

#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error(transparent)]
    Enforcer(#[from] EnforcerError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("parsing the embedded eBPF object: {0}")]
    Parse(String),
    #[error("pinning {what}: {source}")]
    Pin {
        what: String,
        source: aya::pin::PinError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinnedError + '_ {
    move |source| PinnedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How `load_pinned` came by its programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Loaded now and pinned.
    Fresh,
    /// Found pinned by an earlier daemon and adopted as they are.
    Adopted,
    /// Loaded now and pinned, taking over from another build's pins
    /// (`upgrade`), which enforce until every sandbox is installed again.
    Replaced,
}

/// The maps of the object by name, without the data maps (`.rodata`, `.bss`).
fn map_names() -> Result<Vec<String>, PinnedError> {
    let obj = aya_obj::Object::parse(crate::ebpf::OBJECT).map_err(|e| PinnedError::Parse(e.to_string()))?;
    let mut names: Vec<String> = obj.maps.keys().filter(|n| !n.starts_with('.')).cloned().collect();
    names.sort();
    Ok(names)
}

fn pinned(dir: &Path, kind: &str, name: &str) -> PathBuf {
    dir.join(kind).join(name)
}

/// Whether the network programs, and the LSM links when `lsm`, are pinned.
fn programs_pinned(dir: &Path, lsm: bool) -> bool {
    NET_PROGRAMS.iter().all(|n| pinned(dir, "progs", n).exists())
        && (!lsm || LSM_PROGRAMS.iter().all(|(n, _)| pinned(dir, "links", n).exists()))
}

fn lsm_pinned(dir: &Path) -> bool {
    LSM_PROGRAMS.iter().all(|(n, _)| pinned(dir, "links", n).exists())
}

impl Enforcer {
    /// Loads the object with its maps pinned under `dir` (reusing maps that
    /// are pinned there already). When the programs are pinned there too,
    /// they are adopted as they are: nothing is loaded or attached again, so
    /// there is no moment without enforcement. Otherwise the network
    /// programs are loaded and pinned, and with `opts.lsm` the LSM programs
    /// are loaded, attached and their links pinned.
    pub fn load_pinned(dir: &Path, opts: LoadOptions) -> Result<(Self, Origin), PinnedError> {
        for sub in ["maps", "progs", "links"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let names = map_names()?;
        let paths: Vec<PathBuf> = names.iter().map(|n| pinned(dir, "maps", n)).collect();
        let kbtf = KernelBtf::load().map_err(EnforcerError::from)?;
        let offsets = btf::program_offsets(&kbtf).map_err(EnforcerError::from)?;
        let mut loader = EbpfLoader::new();
        for (name, value) in &offsets {
            loader.override_global(name, value, true);
        }
        for (name, path) in names.iter().zip(&paths) {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        let ebpf = loader.load(crate::ebpf::OBJECT).map_err(EnforcerError::from)?;
        let mut this = Self::from_parts(ebpf, false);
        let mut lsm = false;

        let origin = if programs_pinned(dir, false) {
            Origin::Adopted
        } else {
            // Stale pins of a half-finished earlier load would never match
            // what we attach now.
            for n in NET_PROGRAMS {
                let _ = fs::remove_file(pinned(dir, "progs", n));
            }
            for name in NET_PROGRAMS {
                let prog: &mut CgroupSockAddr = program(&mut this, name)?;
                prog.load()
                    .map_err(|source| EnforcerError::Program { name, source })?;
                prog.pin(pinned(dir, "progs", name))
                    .map_err(|source| PinnedError::Pin {
                        what: name.into(),
                        source,
                    })?;
            }
            Origin::Fresh
        };
        this.load_ask_pinned(dir)?;
        if lsm_pinned(dir) {
            lsm = true;
        } else if opts.lsm {
            this.load_lsm_pinned(dir)?;
            lsm = true;
        }
        Ok((Self::from_parts(this.ebpf, lsm), origin))
    }

    /// The programs that hold a connect while the PDP is asked
    /// (`pdp::kernel`), pinned beside the network programs and attached
    /// only to the cgroups of sandboxes that ask (`ask_op_pinned`).
    fn load_ask_pinned(&mut self, dir: &Path) -> Result<(), PinnedError> {
        if ASK_PROGRAMS.iter().all(|(n, _)| pinned(dir, "progs", n).exists()) {
            return Ok(());
        }
        for (name, _) in ASK_PROGRAMS {
            let _ = fs::remove_file(pinned(dir, "progs", name));
        }
        self.load_ask()?;
        for (name, _) in ASK_PROGRAMS {
            let prog = self.ebpf.program_mut(name).ok_or(EnforcerError::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?;
            prog.pin(pinned(dir, "progs", name))
                .map_err(|source| PinnedError::Pin {
                    what: name.into(),
                    source,
                })?;
        }
        Ok(())
    }

    fn load_lsm_pinned(&mut self, dir: &Path) -> Result<(), PinnedError> {
        let lsm_list = fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
        if !lsm_list.trim().split(',').any(|l| l == "bpf") {
            return Err(EnforcerError::LsmUnavailable {
                reason: format!("the kernel's LSM list is `{}`, without bpf", lsm_list.trim()),
            }
            .into());
        }
        let aya_btf = aya::Btf::from_sys_fs().map_err(|e| EnforcerError::LsmUnavailable {
            reason: e.to_string(),
        })?;
        for (name, hook) in LSM_PROGRAMS {
            let _ = fs::remove_file(pinned(dir, "links", name));
            let prog: &mut Lsm = program(self, name)?;
            prog.load(hook, &aya_btf)
                .map_err(|e| EnforcerError::LsmUnavailable {
                    reason: format!("the kernel refused to load LSM program {name}: {e}"),
                })?;
            let id = prog
                .attach()
                .map_err(|source| EnforcerError::Program { name, source })?;
            let link = prog
                .take_link(id)
                .map_err(|source| EnforcerError::Program { name, source })?;
            let link = FdLink::from(link);
            // The pin, not our fd, keeps the program attached from now on.
            link.pin(pinned(dir, "links", name))
                .map_err(|source| PinnedError::Pin {
                    what: format!("link {name}"),
                    source,
                })?;
        }
        Ok(())
    }

    /// Attaches (or detaches) the pinned network programs to the cgroup at
    /// `cgroup_path`. Attaching what is attached already is not an error, so
    /// a restarted daemon may re-assert its sandboxes without doubling them.
    pub fn cgroup_op_pinned(dir: &Path, cgroup_path: &Path, op: attach::Op) -> Result<(), PinnedError> {
        let net: Vec<(&str, u32)> = NET_PROGRAMS
            .iter()
            .copied()
            .zip(attach::NET_ATTACH_TYPES)
            .collect();
        op_pinned(dir, cgroup_path, op, &net)
    }

    /// Attaches (or detaches) the pinned programs that hold connects to the
    /// cgroup of a sandbox that asks; attach before its network programs,
    /// so that a connect they hold is held. As idempotent as
    /// `cgroup_op_pinned`.
    pub fn ask_op_pinned(dir: &Path, cgroup_path: &Path, op: attach::Op) -> Result<(), PinnedError> {
        op_pinned(dir, cgroup_path, op, &ASK_PROGRAMS)
    }
}

fn op_pinned(
    dir: &Path,
    cgroup_path: &Path,
    op: attach::Op,
    programs: &[(&str, u32)],
) -> Result<(), PinnedError> {
    let cg = fs::File::open(cgroup_path).map_err(io_err(cgroup_path))?;
    for &(name, attach_type) in programs {
        let path = pinned(dir, "progs", name);
        let fd = obj_get(&path).map_err(io_err(&path))?;
        if matches!(op, attach::Op::Attach) {
            // The kernel refuses a second copy of one program (EINVAL on
            // recent kernels, EEXIST on older ones): ask what is there.
            let id = prog_id(fd.as_fd()).map_err(io_err(&path))?;
            if attached_ids(cg.as_fd(), attach_type)
                .map_err(io_err(cgroup_path))?
                .contains(&id)
            {
                continue;
            }
        }
        match attach::cgroup(op, cg.as_fd(), fd.as_fd(), attach_type) {
            Ok(()) => {}
            Err(e) if matches!(op, attach::Op::Attach) && e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) if matches!(op, attach::Op::Detach) && e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                return Err(PinnedError::Io {
                    path: PathBuf::from(format!("{} ({name}, {op:?})", cgroup_path.display())),
                    source: e,
                });
            }
        }
    }
    Ok(())
}

impl Enforcer {
    /// The sandbox entries in `SANDBOXES`.
    pub fn sandbox_entries(&self) -> Result<Vec<(u64, SandboxConfig)>, EnforcerError> {
        let map = self
            .ebpf
            .map("SANDBOXES")
            .ok_or(EnforcerError::NoMap("SANDBOXES"))?;
        let sb: HashMap<&MapData, u64, SandboxConfig> =
            HashMap::try_from(map).map_err(map_err("SANDBOXES"))?;
        Ok(sb.iter().filter_map(Result::ok).collect())
    }

    /// Removes the sandbox entry of cgroup `cgroup_id`: from the next hook on,
    /// its processes are outside every sandbox.
    pub fn remove_sandbox_entry(&mut self, cgroup_id: u64) -> Result<(), EnforcerError> {
        let map = self
            .ebpf
            .map_mut("SANDBOXES")
            .ok_or(EnforcerError::NoMap("SANDBOXES"))?;
        let mut sb: HashMap<&mut MapData, u64, SandboxConfig> =
            HashMap::try_from(map).map_err(map_err("SANDBOXES"))?;
        match sb.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err("SANDBOXES")(e)),
        }
    }

    /// Sets the bit mask of cgroup levels that hold a sandbox root.
    pub fn set_sandbox_levels(&mut self, mask: u64) -> Result<(), EnforcerError> {
        let map = self
            .ebpf
            .map_mut("SANDBOX_LEVELS")
            .ok_or(EnforcerError::NoMap("SANDBOX_LEVELS"))?;
        let mut levels: Array<&mut MapData, u64> = Array::try_from(map).map_err(map_err("SANDBOX_LEVELS"))?;
        levels.set(0, mask, 0).map_err(map_err("SANDBOX_LEVELS"))
    }

    /// Deletes every rule whose sandbox id is not in `live`: what earlier
    /// generations of a reloaded policy, and deleted sandboxes, left behind.
    /// Returns how many entries went.
    pub fn gc_rules(&mut self, live: &HashSet<u32>) -> Result<usize, EnforcerError> {
        let mut n = 0;
        if let Some(map) = self.ebpf.map_mut("NET_V4") {
            let mut m: LpmTrie<&mut MapData, NetKeyV4, NetRuleSet> =
                LpmTrie::try_from(map).map_err(map_err("NET_V4"))?;
            let dead: Vec<Key<NetKeyV4>> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !live.contains(&u32::from_be_bytes(k.data().sandbox_id)))
                .collect();
            for k in dead {
                n += usize::from(m.remove(&k).is_ok());
            }
        }
        if let Some(map) = self.ebpf.map_mut("NET_V6") {
            let mut m: LpmTrie<&mut MapData, NetKeyV6, NetRuleSet> =
                LpmTrie::try_from(map).map_err(map_err("NET_V6"))?;
            let dead: Vec<Key<NetKeyV6>> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !live.contains(&u32::from_be_bytes(k.data().sandbox_id)))
                .collect();
            for k in dead {
                n += usize::from(m.remove(&k).is_ok());
            }
        }
        n += gc_hash::<FileRuleKey, FileRuleValue>(self, "FILE_RULES", live, |k| k.sandbox_id)?;
        n += gc_hash::<FileRuleKey, ExecRuleValue>(self, "EXEC_RULES", live, |k| k.sandbox_id)?;
        n += gc_hash::<InodeKey, FileRuleValue>(self, "INODE_RULES", live, |k| k.sandbox_id)?;
        Ok(n)
    }
}

fn gc_hash<K: aya::Pod, V: aya::Pod>(
    e: &mut Enforcer,
    name: &'static str,
    live: &HashSet<u32>,
    id: impl Fn(&K) -> u32,
) -> Result<usize, EnforcerError> {
    let Some(map) = e.ebpf.map_mut(name) else {
        return Ok(0);
    };
    let mut m: HashMap<&mut MapData, K, V> = HashMap::try_from(map).map_err(map_err(name))?;
    let dead: Vec<K> = m
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !live.contains(&id(k)))
        .collect();
    let mut n = 0;
    for k in dead {
        n += usize::from(m.remove(&k).is_ok());
    }
    Ok(n)
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EnforcerError {
    move |source| EnforcerError::Map { name, source }
}

fn program<'a, T>(e: &'a mut Enforcer, name: &'static str) -> Result<&'a mut T, EnforcerError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = e.ebpf.program_mut(name).ok_or(EnforcerError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into()
        .map_err(|source| EnforcerError::Program { name, source })
}

pub(super) fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a valid, fully initialised attr of the given size;
    // every pointer inside it points at memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as libc::c_uint) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The kernel id of a program.
pub fn prog_id(prog: std::os::fd::BorrowedFd<'_>) -> io::Result<u32> {
    // `struct bpf_prog_info` starts with `type`, then `id`.
    let mut info = [0u32; 2];
    obj_info(prog, &mut info)?;
    Ok(info[1])
}

/// `BPF_OBJ_GET_INFO_BY_FD`: the first `info.len()` words of the object's
/// info struct (`bpf_prog_info`, `bpf_map_info`, ...).
pub(super) fn obj_info(obj: std::os::fd::BorrowedFd<'_>, info: &mut [u32]) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: obj.as_raw_fd() as u32,
        info_len: size_of_val(info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(())
}

/// Ids of the programs attached to a cgroup for `attach_type` (`BPF_PROG_QUERY`).
pub fn attached_ids(cgroup: std::os::fd::BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_QUERY: libc::c_long = 16;
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt.min(64) as usize);
    Ok(ids)
}

/// `BPF_OBJ_GET`: a new fd on the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: bpf(2) with a valid, fully initialised attr of the given size;
    // `c` outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjAttr,
            size_of::<ObjAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// Removes everything pinned under `dir`, retired builds' pins included,
/// and the directory itself.
pub fn remove_pins(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for r in super::upgrade::retired(dir)? {
        remove_pins(&r)?;
    }
    for sub in ["links", "progs", "maps"] {
        let p = dir.join(sub);
        if let Ok(rd) = fs::read_dir(&p) {
            for e in rd.flatten() {
                fs::remove_file(e.path())?;
            }
        }
        match fs::remove_dir(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    super::upgrade::remove_stamps(dir, None)?;
    fs::remove_dir(dir)
}
