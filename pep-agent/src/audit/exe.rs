//! The `exe` of a decision: the path of the program image the acting
//! process ran, for audit records and PDP queries (`subject.exe`), without
//! a `/proc/PID/exe` read per event.
//!
//! The kernel sends with every decision the identity of the image
//! (`ExeIdentity`: the exec generation `self_exec_id`, and the device and
//! inode of `mm->exe_file`); with the process key (pid and the process's
//! start time) it names one image of one process. A name is found once per
//! image and cached under that whole key, so:
//! - an exec, even of another name of the same file (a hard link), is a
//!   new exec generation: a new key, named afresh. Records after an exec
//!   without a fork (`env`, `setpriv`, a shell's `exec`) name the new
//!   program;
//! - a pid reused by another process has another start time;
//! - `PR_SET_MM_EXE_FILE` changes the inode.
//!
//! Where a name comes from, first that fits:
//! 1. an exec the stream recorded and let through (`exec_seen`): the path
//!    the kernel resolved names the process's next generation (for a
//!    script the hook decides the script, then its interpreter: the last
//!    one is the image, as `/proc/PID/exe` says);
//! 2. the parent's image, for a forked child that has not exec'd: a child
//!    starts with its parent's image and exec generation;
//! 3. `/proc/PID/exe`, read now.
//!
//! Each candidate is checked against the event's device and inode, so a
//! name is never that of another program: by the time userspace reads
//! `/proc` the process may have exec'd, or exited and its pid been reused,
//! and an exec'd path may have been replaced. A candidate that does not
//! match names nothing (`None`). A name is what it was when found: a file
//! renamed later keeps its old name here.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _, path::Path};

use pep_common::event::ExeIdentity;

use crate::{audit::record::read_exe, compiler::files::inode_id};

/// The cache key: process (pid, start time) and image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    pid: u32,
    start_ns: u64,
    image: ExeIdentity,
}

/// Paths of executable images, by process and image.
#[derive(Debug, Default)]
pub struct ExeCache {
    names: HashMap<Key, String>,
    /// Paths exec'd (`exec_seen`), by process and the generation they start.
    execs: HashMap<(u32, u64, u64), String>,
    /// The name of each (pid, image), whatever the start time: where a
    /// forked child finds its parent's (`Header::ppid` has no start time;
    /// the image, generation included, must match all the same).
    by_pid: HashMap<(u32, ExeIdentity), String>,
}

/// Bounds each map; entries of processes that exited are never asked for
/// again, so a full map is simply emptied.
const MAX_ENTRIES: usize = 4096;

/// The process that acted, as an event header names it.
#[derive(Debug, Clone, Copy)]
pub struct Acting<'a> {
    pub pid: u32,
    pub start_ns: u64,
    pub ppid: u32,
    pub image: &'a ExeIdentity,
}

impl ExeCache {
    /// The path of the image `image` of process `pid` (started at
    /// `start_ns`, child of `ppid`); `None` when no candidate is that image.
    pub fn name(&mut self, who: Acting<'_>) -> Option<String> {
        let Acting {
            pid,
            start_ns,
            ppid,
            image,
        } = who;
        if image.ino == 0 || start_ns == 0 {
            // No identity to check against: as read now.
            return read_exe(pid);
        }
        let key = Key {
            pid,
            start_ns,
            image: *image,
        };
        if let Some(name) = self.names.get(&key) {
            return Some(name.clone());
        }
        let is_image =
            |path: &Path| std::fs::metadata(path).is_ok_and(|m| inode_id(&m) == (image.dev, image.ino));
        let exec = self
            .execs
            .get(&(pid, start_ns, image.exec_id))
            .filter(|p| is_image(Path::new(p)))
            .cloned();
        let name = exec
            .or_else(|| self.by_pid.get(&(ppid, *image)).cloned())
            .or_else(|| {
                let name = read_exe(pid)?;
                let now = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
                if inode_id(&now) != (image.dev, image.ino) {
                    tracing::debug!(
                        "pid {pid}: /proc/{pid}/exe is {name} (inode {}), not the image that acted",
                        now.ino()
                    );
                    return None;
                }
                Some(name)
            })?;
        bounded_insert(&mut self.names, key, name.clone());
        bounded_insert(&mut self.by_pid, (pid, *image), name.clone());
        Some(name)
    }

    /// An exec of `path` by process `pid` (started at `start_ns`), at exec
    /// generation `exec_id`, went ahead: if it succeeds, the process's next
    /// image is `path`. (If it fails, no event carries that generation;
    /// the next exec that goes ahead replaces the entry.)
    pub fn exec_seen(&mut self, pid: u32, start_ns: u64, exec_id: u64, path: &str) {
        bounded_insert(&mut self.execs, (pid, start_ns, exec_id + 1), path.to_owned());
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

fn bounded_insert<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>, k: K, v: V) {
    if m.len() >= MAX_ENTRIES && !m.contains_key(&k) {
        m.clear();
    }
    m.insert(k, v);
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        process::{Command, Stdio},
    };

    use super::*;

    fn acting(pid: u32, start_ns: u64, image: &ExeIdentity) -> Acting<'_> {
        Acting {
            pid,
            start_ns,
            ppid: 1,
            image,
        }
    }

    fn image_of(pid: u32, exec_id: u64) -> ExeIdentity {
        let (dev, ino) = inode_id(&std::fs::metadata(format!("/proc/{pid}/exe")).expect("stat"));
        ExeIdentity { exec_id, dev, ino }
    }

    /// A process that runs `a`, then execs `b`, a hard link to the same
    /// file, under the same pid: the new image is named `b`, though the
    /// process and the inode are the same.
    #[test]
    fn an_exec_of_a_hard_link_under_the_same_pid_is_named_afresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::copy("/bin/sh", &a).expect("copy sh");
        std::fs::hard_link(&a, &b).expect("link");
        // `a` waits for a line, then execs `b`, which says so and waits.
        let script = format!("read x; exec {} -c 'echo execd; read y'", b.display());
        let mut child = Command::new(&a)
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let pid = child.id();
        let start_ns = 1; // any process key: the pid is the same process throughout
        let mut cache = ExeCache::default();
        let first = image_of(pid, 7);
        assert_eq!(cache.name(acting(pid, start_ns, &first)).as_deref(), a.to_str());
        assert_eq!(cache.len(), 1);
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "go").expect("to a");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("from b");
        assert_eq!(line.trim(), "execd");
        // The kernel's exec generation moved on; the file did not.
        let second = image_of(pid, 8);
        assert_eq!((second.dev, second.ino), (first.dev, first.ino));
        assert_eq!(cache.name(acting(pid, start_ns, &second)).as_deref(), b.to_str());
        // A miss that says the image is another file than /proc shows (the
        // process exec'd since, or its pid was reused) names nothing.
        let other = ExeIdentity {
            exec_id: 9,
            ino: second.ino + 1,
            ..second
        };
        assert_eq!(cache.name(acting(pid, start_ns, &other)), None);
        assert_eq!(cache.len(), 2, "a mismatch is not cached");
        writeln!(stdin, "done").expect("to b");
        child.wait().expect("wait");
        // Gone: read afresh, nothing to name.
        let gone = ExeIdentity {
            exec_id: 10,
            ..second
        };
        assert_eq!(cache.name(acting(pid, start_ns, &gone)), None);
    }

    /// Candidates other than `/proc`: an exec the stream saw names the next
    /// generation, a parent's image names its forked child's; each only
    /// when it is the image the event names (its device and inode). The
    /// pids are ones no process has, so `/proc` names nothing here.
    #[test]
    fn execs_seen_and_parents_name_images_only_when_they_match() {
        let sh = std::fs::canonicalize("/bin/sh").expect("sh");
        let (dev, ino) = inode_id(&std::fs::metadata(&sh).expect("stat"));
        let image = ExeIdentity { exec_id: 5, dev, ino };
        let (pid, child, start) = (u32::MAX - 5, u32::MAX - 6, 77);
        let who = |pid, ppid, image| Acting {
            pid,
            start_ns: start,
            ppid,
            image,
        };
        let mut cache = ExeCache::default();
        assert_eq!(cache.name(who(pid, 1, &image)), None, "nothing seen yet");
        // An exec of another file at generation 4 does not name this image.
        cache.exec_seen(pid, start, 4, "/proc/self/exe");
        assert_eq!(cache.name(who(pid, 1, &image)), None);
        cache.exec_seen(pid, start, 4, sh.to_str().expect("utf8"));
        assert_eq!(cache.name(who(pid, 1, &image)).as_deref(), sh.to_str());
        // Generation 6 of the same file was not seen.
        let later = ExeIdentity { exec_id: 6, ..image };
        assert_eq!(cache.name(who(pid, 1, &later)), None);
        // A forked child of `pid` runs its image, generation included.
        assert_eq!(cache.name(who(child, pid, &image)).as_deref(), sh.to_str());
        assert_eq!(cache.name(who(child, pid, &later)), None);
        assert_eq!(cache.name(who(child, 1, &later)), None, "not a child of pid");
    }
}
