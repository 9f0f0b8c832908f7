//! cgroup v2: finding the mount, creating and removing sandbox cgroups.
//!
//! The cgroup2 hierarchy is found from `/proc/self/mountinfo`, never assumed:
//! hosts with the hybrid layout mount it at `/sys/fs/cgroup/unified`.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted (mount one: `mount -t cgroup2 none /sys/fs/cgroup`, or boot with systemd.unified_cgroup_hierarchy=1)"
    )]
    NoCgroup2,
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cgroup {0} still has processes after kill")]
    Busy(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The mount point of the cgroup2 hierarchy, from a mountinfo text.
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 35 0:30 / /sys/fs/cgroup/unified rw,... shared:9 - cgroup2 cgroup2 rw"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mount of this host.
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").map_err(io_err(Path::new("/proc/self/mountinfo")))?;
    find_cgroup2_mount(&info).ok_or(CgroupError::NoCgroup2)
}

/// A cgroup directory we created and remove on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    id: u64,
    level: u32,
    remove_on_drop: bool,
}

impl Cgroup {
    /// Creates `root/rel` (parents too). `rel` must be relative.
    pub fn create(root: &Path, rel: &Path) -> Result<Self, CgroupError> {
        let path = root.join(rel);
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        let id = fs::metadata(&path).map_err(io_err(&path))?.ino();
        let level = rel.components().count() as u32;
        Ok(Self {
            path,
            id,
            level,
            remove_on_drop: true,
        })
    }

    /// An existing cgroup, not removed on drop.
    pub fn open(root: &Path, path: &Path) -> Result<Self, CgroupError> {
        let id = fs::metadata(path).map_err(io_err(path))?.ino();
        let rel = path.strip_prefix(root).map_err(|_| CgroupError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not under the cgroup2 mount"),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            id,
            level: rel.components().count() as u32,
            remove_on_drop: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id: the inode number of its directory.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Depth below the hierarchy's root (the root is level 0).
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Moves process `pid` (0: the caller) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        write_file(&self.path.join("cgroup.procs"), &pid.to_string())
    }

    /// Kills every process in the subtree and removes it, deepest first.
    pub fn destroy(&mut self) -> Result<(), CgroupError> {
        self.remove_on_drop = false;
        kill_and_remove(&self.path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if self.remove_on_drop {
            self.remove_on_drop = false;
            if let Err(e) = kill_and_remove(&self.path) {
                tracing::warn!("cleanup: {e}");
            }
        }
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(value.as_bytes()).map_err(io_err(path))
}

/// Whether any process is left in the subtree at `path`.
fn populated(path: &Path) -> bool {
    fs::read_to_string(path.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

fn kill_and_remove(path: &Path) -> Result<(), CgroupError> {
    if !path.exists() {
        return Ok(());
    }
    if populated(path) {
        // cgroup.kill (5.14+) SIGKILLs the whole subtree at once, so nothing
        // can fork its way out of the sweep.
        if write_file(&path.join("cgroup.kill"), "1").is_err() {
            kill_procs_fallback(path);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while populated(path) {
            if Instant::now() > deadline {
                return Err(CgroupError::Busy(path.to_path_buf()));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
    remove_tree(path)
}

fn kill_procs_fallback(path: &Path) {
    for _ in 0..100 {
        let Ok(procs) = fs::read_to_string(path.join("cgroup.procs")) else {
            return;
        };
        let pids: Vec<i32> = procs.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: plain syscall.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(5));
    }
    if let Ok(rd) = fs::read_dir(path) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_procs_fallback(&e.path());
            }
        }
    }
}

/// Removes a cgroup directory and its child cgroups, deepest first.
fn remove_tree(path: &Path) -> Result<(), CgroupError> {
    if let Ok(rd) = fs::read_dir(path) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path())?;
            }
        }
    }
    // A just-emptied cgroup can report EBUSY for a moment.
    let mut last = None;
    for _ in 0..200 {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        thread::sleep(Duration::from_millis(5));
    }
    Err(CgroupError::Io {
        path: path.to_path_buf(),
        source: last.unwrap_or_else(|| io::Error::other("rmdir")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_mount() {
        let info = "24 29 0:22 / /sys rw,nosuid - sysfs sysfs rw\n\
                    30 24 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n\
                    31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            find_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_is_none() {
        let info = "30 24 0:26 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(find_cgroup2_mount(info), None);
    }

    #[test]
    fn unescapes_spaces() {
        let info = "31 30 0:27 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2_mount(info), Some(PathBuf::from("/mnt/with space")));
    }
}
