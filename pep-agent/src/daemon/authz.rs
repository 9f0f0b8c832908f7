//! Who is asking (SO_PEERCRED) and what they may touch: root may do
//! anything; an ordinary user only their own processes, cgroups and
//! sandboxes, under the policies the config grants them.

use std::path::{Path, PathBuf};

/// The credentials of the process at the other end of the socket, as the
/// kernel recorded them when it connected.
#[derive(Debug, Clone)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Peer {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// The user's name (or its uid when it has none).
    pub fn user_name(&self) -> String {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.uid))
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| self.uid.to_string())
    }

    /// The user's home, for `~` in policies.
    pub fn home(&self) -> PathBuf {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.uid))
            .ok()
            .flatten()
            .map(|u| u.dir)
            .unwrap_or_else(|| "/".into())
    }

    /// The primary group and the supplementary groups of the user's
    /// account, (name, gid).
    pub fn groups(&self) -> Vec<(String, u32)> {
        let mut gids = vec![self.gid];
        if let Ok(Some(u)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.uid))
            && let Ok(name) = std::ffi::CString::new(u.name)
            && let Ok(list) = nix::unistd::getgrouplist(&name, u.gid)
        {
            gids.extend(list.iter().map(|g| g.as_raw()));
        }
        gids.sort();
        gids.dedup();
        gids.into_iter()
            .map(|g| {
                let name = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(g))
                    .ok()
                    .flatten()
                    .map(|g| g.name)
                    .unwrap_or_else(|| g.to_string());
                (name, g)
            })
            .collect()
    }
}

/// The real and effective uid of process `pid`, from /proc.
pub fn pid_uids(pid: u32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    let mut it = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok());
    Some((it.next()?, it.next()?))
}

/// Whether `peer` may act on process `pid`: root, or both of its real and
/// effective uids are the caller's.
pub fn owns_pid(peer: &Peer, pid: u32) -> Result<(), String> {
    if pid == 0 {
        return Err("pid 0 is not a process".into());
    }
    match pid_uids(pid) {
        None => Err(format!("no process {pid}")),
        Some(_) if peer.is_root() => Ok(()),
        Some((r, e)) if r == peer.uid && e == peer.uid => Ok(()),
        Some(_) => Err(format!("process {pid} does not belong to uid {}", peer.uid)),
    }
}

/// The cgroup v2 path of process `pid` under the hierarchy mounted at `root`.
pub fn pid_cgroup(root: &Path, pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(rel.trim_start_matches('/')))
}

/// Whether `peer` may adopt the cgroup at `path`: root, or the directory is
/// the caller's and every process in it is too.
pub fn owns_cgroup(peer: &Peer, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if peer.is_root() {
        return Ok(());
    }
    if meta.uid() != peer.uid {
        return Err(format!(
            "cgroup {} does not belong to uid {}",
            path.display(),
            peer.uid
        ));
    }
    let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        owns_pid(peer, pid).map_err(|e| format!("cgroup {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Sandbox names: short, and safe as a cgroup directory name.
pub fn valid_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad sandbox name {name:?}: 1 to 64 of [A-Za-z0-9._-], not starting with a dot"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("agent-1.x_y").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(valid_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_process_is_owned() {
        let me = Peer {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            pid: std::process::id(),
        };
        assert!(owns_pid(&me, std::process::id()).is_ok());
        assert!(owns_pid(&me, 0).is_err());
    }
}
