//! The child side of `run`: moved into the sandbox cgroup and, when asked,
//! dropped to an ordinary user, between fork and exec. The command therefore
//! never runs a single instruction outside the sandbox.

use std::{ffi::CString, io, os::unix::ffi::OsStrExt as _, path::Path};

/// What the child does between fork and exec, prepared in the parent so that
/// the child only makes async-signal-safe system calls.
#[derive(Debug, Clone)]
pub struct ChildSetup {
    cgroup_procs: CString,
    user: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
}

impl ChildSetup {
    pub fn new(cgroup_dir: &Path, user: Option<&nix::unistd::User>) -> io::Result<Self> {
        let procs = cgroup_dir.join("cgroup.procs");
        let cgroup_procs = CString::new(procs.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let user = match user {
            Some(u) => {
                let name = CString::new(u.name.as_bytes()).map_err(io::Error::other)?;
                // Resolved here: reading /etc/group is not async-signal-safe.
                let groups = nix::unistd::getgrouplist(&name, u.gid).map_err(io::Error::other)?;
                Some((
                    u.uid.as_raw(),
                    u.gid.as_raw(),
                    groups.iter().map(|g| g.as_raw()).collect(),
                ))
            }
            None => None,
        };
        Ok(Self { cgroup_procs, user })
    }

    /// Runs in the forked child. Async-signal-safe calls only.
    pub fn apply(&self) -> io::Result<()> {
        // SAFETY: raw syscalls on valid, NUL-terminated buffers prepared
        // before fork; no allocation happens here.
        unsafe {
            let fd = libc::open(self.cgroup_procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            if let Some((uid, gid, groups)) = &self.user {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setgid(*gid) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::setuid(*uid) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // If pep-agent dies, the command dies with it (set after the
            // credential change, which would clear it). Its descendants stay
            // enforced: the hooks are attached to the cgroup itself.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
