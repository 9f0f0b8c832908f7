//! `input.subject.exe` without a `/proc/PID/exe` read per ask.
//!
//! The kernel sends with each miss the identity of the image the process
//! runs (`ExeIdentity`: its exec generation `self_exec_id` and
//! `mm->exe_file`'s inode); with the process key (pid and the process's
//! start time) it names one image of one process. The path is read from
//! `/proc` once per image and cached under that whole key, so:
//! - an exec, even of another name of the same file (a hard link), is a
//!   new exec generation: a new key, read afresh;
//! - a pid reused by another process has another start time;
//! - `PR_SET_MM_EXE_FILE` changes the inode.
//!
//! A read can race with the process: by the time userspace reads `/proc`,
//! the process may have exec'd, or exited and its pid been reused. The name
//! read is used only if `/proc/PID/exe` is still the miss's file (its
//! device and inode); otherwise `exe` is unknown (`None`), not the name of
//! another program. Should the process exec another name of the same file
//! between the miss and the read, that name is cached under the old
//! image's key, which no later miss carries (exec generations only grow).
//! A name is what `/proc` said when it was read: a file renamed later
//! keeps its old name here.

use std::{collections::HashMap, os::unix::fs::MetadataExt as _};

use pep_common::ask::ExeIdentity;

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
}

/// Bounds the cache; entries of processes that exited are never asked for
/// again, so a full cache is simply emptied.
const MAX_ENTRIES: usize = 4096;

impl ExeCache {
    /// The path of the image `image` of process `pid` (started at
    /// `start_ns`, the event header's process key); `None` when it cannot
    /// be read or is no longer that image.
    pub fn name(&mut self, pid: u32, start_ns: u64, image: &ExeIdentity) -> Option<String> {
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
        let name = read_exe(pid)?;
        let now = std::fs::metadata(format!("/proc/{pid}/exe")).ok()?;
        if inode_id(&now) != (image.dev, image.ino) {
            tracing::debug!(
                "pid {pid}: /proc/{pid}/exe is {name} (inode {}), not the image that missed",
                now.ino()
            );
            return None;
        }
        if self.names.len() >= MAX_ENTRIES {
            self.names.clear();
        }
        self.names.insert(key, name.clone());
        Some(name)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        process::{Command, Stdio},
    };

    use super::*;

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
        assert_eq!(cache.name(pid, start_ns, &first).as_deref(), a.to_str());
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
        assert_eq!(cache.name(pid, start_ns, &second).as_deref(), b.to_str());
        // A miss that says the image is another file than /proc shows (the
        // process exec'd since, or its pid was reused) names nothing.
        let other = ExeIdentity {
            exec_id: 9,
            ino: second.ino + 1,
            ..second
        };
        assert_eq!(cache.name(pid, start_ns, &other), None);
        assert_eq!(cache.len(), 2, "a mismatch is not cached");
        writeln!(stdin, "done").expect("to b");
        child.wait().expect("wait");
        // Gone: read afresh, nothing to name.
        let gone = ExeIdentity {
            exec_id: 10,
            ..second
        };
        assert_eq!(cache.name(pid, start_ns, &gone), None);
    }
}
