//! The per-file verdict cache of `file_open`, attacked (in the VM: BPF LSM).
//! A cached decision must never outlive the path it was made for: renames
//! of the file or of a directory above it (by the sandbox or by anyone
//! else), a second name (hard link), another mount of the same file. And the
//! mount tree itself, which decides what a path names, cannot be changed
//! from a sandbox nor reached around (another namespace's tree, a detached
//! mount).

use std::{path::Path, process::Command, time::Duration};

use pep_tests::*;

/// `ws/**` is readable and writable; `ws/locked/**` is not readable (but
/// writable, through `ws/**`, so the sandbox itself can move files in).
fn policy(s: &Scratch) -> std::path::PathBuf {
    let d = s.dir.display();
    s.write(
        "p.yaml",
        &format!(
            "apiVersion: pep/v1\nname: cache\nvars:\n  root: {d}\nfiles:\n  default: allow\n  rules:\n\
             \x20   - allow: {{ path: \"${{root}}/ws/**\", access: [read, write] }}\n\
             \x20   - deny: {{ path: \"${{root}}/ws/locked/**\", access: [read] }}\n\
             \x20   - deny: {{ path: \"${{root}}/secret/**\", access: [read, write] }}\n"
        ),
    )
}

fn tree(s: &Scratch) {
    let d = &s.dir;
    for dir in ["ws/dir", "ws/locked", "ws/mnt", "secret"] {
        std::fs::create_dir_all(d.join(dir)).expect("mkdir");
    }
    for f in ["ws/dir/f", "ws/g", "ws/h", "ws/notes", "secret/key"] {
        std::fs::write(d.join(f), "data").expect("write");
    }
}

fn records_for<'a>(recs: &'a [serde_json::Value], path: &Path) -> Vec<&'a serde_json::Value> {
    let p = path.display().to_string();
    recs.iter().filter(|r| r["file"]["path"] == p.as_str()).collect()
}

#[test]
fn cached_decisions_follow_renames_and_links() {
    assert!(
        pep_agent::kernel::features::lsm_loadable(),
        "this test runs where BPF LSM loads (the VM)"
    );
    let s = Scratch::new("fcache");
    tree(&s);
    let p = policy(&s);
    let d = &s.dir;
    let log = d.join("audit.jsonl");
    let f = |x: &str| d.join(x).display().to_string();
    let j = |a: &str, b: &str| format!("{}|{}", f(a), f(b));
    let ops: Vec<(&str, String)> = vec![
        // Read twice: the second open is answered from the cache.
        ("read", f("ws/dir/f")),
        ("read", f("ws/dir/f")),
        // The directory moves under the read deny: its file must follow.
        ("rename", j("ws/dir", "ws/locked/dir")),
        ("read", f("ws/locked/dir/f")),
        // The file itself moves.
        ("read", f("ws/g")),
        ("read", f("ws/g")),
        ("rename", j("ws/g", "ws/locked/g")),
        ("read", f("ws/locked/g")),
        // A second name: the file is not decided by its first any more.
        ("read", f("ws/h")),
        ("link", j("ws/h", "ws/locked/h2")),
        ("read", f("ws/locked/h2")),
        ("read", f("ws/h")),
    ];
    let (res, out) = probes(&p, &["--audit", log.to_str().expect("utf8")], &ops);
    assert_eq!(
        res,
        [
            "OK", "OK", "OK", "EPERM", "OK", "OK", "OK", "EPERM", "OK", "OK", "EPERM", "OK"
        ],
        "{}",
        describe(&out)
    );
    let recs = read_audit(&log);
    // Every open is recorded, cached or not, with its path.
    let twice = records_for(&recs, &d.join("ws/dir/f"));
    assert_eq!(
        twice.iter().filter(|r| r["action"] == "file.open").count(),
        2,
        "{twice:#?}"
    );
    assert!(
        twice
            .iter()
            .all(|r| r["verdict"] == "allow" && r["rule"] == "files.rules[0]")
    );
    for moved in ["ws/locked/dir/f", "ws/locked/g", "ws/locked/h2"] {
        let r = records_for(&recs, &d.join(moved));
        let deny = r
            .iter()
            .find(|r| r["verdict"] == "deny")
            .unwrap_or_else(|| panic!("no deny record for {moved}: {recs:#?}"));
        assert_eq!(deny["rule"], "files.rules[1]", "{deny}");
    }
}

#[test]
fn renames_by_other_processes_invalidate() {
    let s = Scratch::new("fcache-other");
    tree(&s);
    let p = policy(&s);
    let d = s.dir.clone();
    let f = |x: &str| d.join(x).display().to_string();
    let (ready, go) = (d.join("ws/ready"), d.join("ws/go"));
    // Outside the sandbox, once the sandbox has cached its decisions: a
    // directory rename and a file rename.
    let mover = {
        let d = d.clone();
        let (ready, go) = (ready.clone(), go.clone());
        std::thread::spawn(move || {
            // The run loads the programs first: about a minute for a debug
            // build in the emulated guest.
            let deadline = std::time::Instant::now() + Duration::from_secs(180);
            while !ready.exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(ready.exists(), "the sandbox never got ready");
            std::fs::rename(d.join("ws/dir"), d.join("ws/locked/dir")).expect("rename dir outside");
            std::fs::rename(d.join("ws/g"), d.join("ws/locked/g")).expect("rename file outside");
            std::fs::write(&go, "").expect("go");
        })
    };
    let ops: Vec<(&str, String)> = vec![
        ("read", f("ws/dir/f")),
        ("read", f("ws/g")),
        ("creat", ready.display().to_string()),
        ("wait", go.display().to_string()),
        ("read", f("ws/locked/dir/f")),
        ("read", f("ws/locked/g")),
    ];
    let (res, out) = probes(&p, &[], &ops);
    mover.join().expect("mover");
    assert_eq!(
        res,
        ["OK", "OK", "OK", "OK", "EPERM", "EPERM"],
        "{}",
        describe(&out)
    );
}

/// Another mount namespace in which `secret` is bound under `ws`: its tree is
/// reachable from the sandbox only through `/proc/PID/root`.
struct OtherNamespace {
    child: std::process::Child,
}

impl OtherNamespace {
    fn start(d: &Path) -> Self {
        let ready = d.join("ns-ready");
        let child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind {secret} {mnt} && touch {ready} && exec sleep 600",
                secret = d.join("secret").display(),
                mnt = d.join("ws/mnt").display(),
                ready = ready.display()
            ))
            .spawn()
            .expect("unshare");
        for _ in 0..3000 {
            if ready.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(ready.exists(), "the other namespace did not come up");
        Self { child }
    }
}

impl Drop for OtherNamespace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_mount_tree_cannot_be_changed_or_reached_around() {
    let s = Scratch::new("fcache-mounts");
    tree(&s);
    let d = &s.dir;
    let p = policy(&s);
    let f = |x: &str| d.join(x).display().to_string();
    let j = |a: &str, b: &str| format!("{}|{}", f(a), f(b));
    // A mount made outside, for the sandbox to try to remove.
    std::fs::create_dir_all(d.join("ws/tm")).expect("mkdir");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(d.join("ws/tm"))
        .status()
        .expect("mount");
    assert!(st.success(), "an unsandboxed mount works");
    let other = OtherNamespace::start(d);
    let through_other = format!("/proc/{}/root{}", other.child.id(), f("ws/mnt/key"));
    let log = d.join("audit.jsonl");
    let ops: Vec<(&str, String)> = vec![
        ("mount-bind", j("secret", "ws/mnt")),
        ("move-mount", j("secret", "ws/mnt")),
        ("umount", f("ws/tm")),
        ("chroot", f("ws")),
        // The file is reached by a path that names an allowed place.
        ("open-tree-read", format!("{}|key", f("secret"))),
        ("read", through_other),
        // Control: an allowed file.
        ("read", f("ws/notes")),
    ];
    let (res, out) = probes(&p, &["--audit", log.to_str().expect("utf8")], &ops);
    drop(other);
    let _ = Command::new("umount").arg(d.join("ws/tm")).status();
    assert_eq!(
        res,
        ["EPERM", "EPERM", "EPERM", "EPERM", "EPERM", "EPERM", "OK"],
        "{}",
        describe(&out)
    );
    let recs = read_audit(&log);
    let mounts: Vec<_> = recs.iter().filter(|r| r["action"] == "self.mount").collect();
    assert_eq!(
        mounts.len(),
        4,
        "mount, move_mount, umount and chroot are each recorded: {recs:#?}"
    );
    assert!(
        mounts
            .iter()
            .all(|r| r["verdict"] == "deny" && r["rule"] == "self-protection")
    );
    // The two reads around the tree are denied as unresolvable (fail
    // closed), not by a rule that a path happened to match.
    let unresolved: Vec<_> = recs
        .iter()
        .filter(|r| r["action"] == "file.open" && r["verdict"] == "deny" && r["file"]["path"].is_null())
        .collect();
    assert_eq!(unresolved.len(), 2, "{recs:#?}");
    assert!(
        Command::new("mountpoint")
            .arg("-q")
            .arg(d.join("ws/mnt"))
            .status()
            .is_ok_and(|s| !s.success()),
        "nothing was mounted on ws/mnt"
    );
}

/// A record's process ids: pid, tid, ppid, uid, gid, cgroup id.
fn ids(r: &serde_json::Value) -> [u64; 6] {
    let pr = &r["process"];
    ["pid", "tid", "ppid", "uid", "gid", "cgroup_id"]
        .map(|f| pr[f].as_u64().unwrap_or_else(|| panic!("{f} missing in {r}")))
}

/// A file record names who opened the file, read from the task (`typed::Task`
/// in pep-ebpf, plain loads rather than helper calls): pid and tid of a
/// second thread, uid and gid after a change of credentials, comm, the
/// cgroup, the parent, and the program (`exe`) after an exec without a
/// fork. Checked against what the process says of itself, for
/// a decision made by resolving the path and for one answered by the cache;
/// and the exec record of that exec, which names the process before it.
#[test]
fn records_name_the_acting_process() {
    let s = Scratch::new("fcache-who");
    tree(&s);
    let p = policy(&s);
    let target = s.dir.join("ws/notes");
    let log = s.dir.join("audit.jsonl");
    let script = format!(
        "import os, threading\n\
         def opn():\n    os.close(os.open({t:?}, os.O_RDONLY))\n\
         opn(); opn()\n\
         tid = []\n\
         th = threading.Thread(target=lambda: (tid.append(threading.get_native_id()), opn()))\n\
         th.start(); th.join()\n\
         cg = open('/proc/self/cgroup').read().strip().split('::')[-1]\n\
         print('WHO', os.getpid(), tid[0], os.getppid(), os.getuid(), os.getgid(), \
         os.stat('/sys/fs/cgroup' + cg).st_ino)\n\
         import sys; print('EXE', os.path.realpath(sys.executable))\n",
        t = target.display().to_string()
    );
    let out = pep_run(
        &p,
        &["--audit", log.to_str().expect("utf8")],
        &[
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65533",
            "--clear-groups",
            "python3",
            "-c",
            &script,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let who: Vec<u64> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("WHO "))
        .unwrap_or_else(|| panic!("no WHO line: {}", describe(&out)))
        .split_whitespace()
        .map(|x| x.parse().expect("number"))
        .collect();
    let [pid, tid, ppid, uid, gid, cgroup_id] = who[..] else {
        panic!("WHO line: {who:?}");
    };
    assert_ne!(pid, tid, "the second thread has a tid of its own");
    // The image after setpriv's exec (the exec without a fork), named from
    // the exec records the stream carried.
    let exe = stdout
        .lines()
        .find_map(|l| l.strip_prefix("EXE "))
        .unwrap_or_else(|| panic!("no EXE line: {}", describe(&out)));
    let recs = read_audit(&log);
    let mine = records_for(&recs, &target);
    assert_eq!(
        mine.len(),
        3,
        "two opens by the main thread, one by the other: {mine:#?}"
    );
    for (r, want_tid) in mine.iter().zip([pid, pid, tid]) {
        let pr = &r["process"];
        assert_eq!(ids(r), [pid, want_tid, ppid, uid, gid, cgroup_id], "record: {r}");
        assert_eq!(pr["comm"], "python3", "{r}");
        assert_eq!(pr["exe"], exe, "{r}");
        assert_eq!(r["verdict"], "allow", "{r}");
    }
    assert_eq!((uid, gid), (65534, 65533), "setpriv changed the credentials");
    // The exec record of python3 names the process that made the exec:
    // setpriv, the same pid, its credentials already changed, its comm not
    // yet replaced (`bprm_check_security` runs before the exec commits).
    let execs: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| r["action"] == "exec" && r["exec"]["path"] == exe)
        .collect();
    assert_eq!(execs.len(), 1, "one exec of {exe}: {execs:#?}");
    let pr = &execs[0]["process"];
    assert_eq!(
        ids(execs[0]),
        [pid, pid, ppid, uid, gid, cgroup_id],
        "exec record: {}",
        execs[0]
    );
    assert_eq!(pr["comm"], "setpriv", "{}", execs[0]);
}
