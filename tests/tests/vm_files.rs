//! File enforcement with BPF LSM, in the VM (the host kernel refuses LSM
//! programs). `pep-agent run` end to end: the file_open program reads the
//! rules userspace compiled into its map, denies with EPERM, and the audit
//! record carries the path and access. Each deny is attacked through the
//! kernel-resolved path: symlinks, `..`, `/proc/self/root`, `/proc/self/fd`.

use std::{os::unix::fs::symlink, path::Path};

use pep_tests::*;

fn setup_tree(s: &Scratch) {
    let d = &s.dir;
    std::fs::create_dir_all(d.join("ws/sub")).expect("mkdir");
    std::fs::create_dir_all(d.join("secret")).expect("mkdir");
    std::fs::write(d.join("ws/notes.txt"), "hello").expect("write");
    std::fs::write(d.join("ws/sub/.env"), "KEY=1").expect("write");
    std::fs::write(d.join("ws/.env"), "KEY=1").expect("write");
    std::fs::write(d.join("secret/key"), "k").expect("write");
    std::fs::write(d.join("readonly.txt"), "r").expect("write");
    symlink(d.join("secret/key"), d.join("ws/link-to-key")).expect("symlink");
}

fn policy(s: &Scratch) -> std::path::PathBuf {
    let d = s.dir.display();
    s.write(
        "p.yaml",
        &format!(
            "apiVersion: pep/v1\nname: files\nvars:\n  root: {d}\nfiles:\n  default: allow\n  rules:\n\
             \x20   - allow: {{ path: \"${{root}}/ws/**\", access: [read, write] }}\n\
             \x20   - deny: {{ path: \"${{root}}/secret/**\", access: [read, write] }}\n\
             \x20   - deny: {{ name: \".env\", access: [read, write] }}\n\
             \x20   - deny: {{ path: \"${{root}}/readonly.txt\", access: [write] }}\n"
        ),
    )
}

#[test]
fn reads_and_writes_follow_the_rules() {
    assert!(
        pep_agent::kernel::features::lsm_loadable(),
        "this test runs where BPF LSM loads (the VM)"
    );
    let s = Scratch::new("files");
    setup_tree(&s);
    let p = policy(&s);
    let d = &s.dir;
    let log = d.join("audit.jsonl");
    let (res, out) = file_probes(
        &p,
        &["--audit", log.to_str().expect("utf8")],
        &[
            ("read", &d.join("ws/notes.txt")),
            ("write", &d.join("ws/notes.txt")),
            ("read", &d.join("secret/key")),
            ("read", &d.join("ws/.env")),
            ("read", &d.join("ws/sub/.env")),
            ("read", &d.join("readonly.txt")),
            ("write", &d.join("readonly.txt")),
            ("trunc", &d.join("readonly.txt")),
            ("creat", &d.join("secret/new")),
        ],
    );
    assert_eq!(
        res,
        [
            "OK", "OK", "EPERM", "EPERM", "EPERM", "OK", "EPERM", "EPERM", "EPERM"
        ],
        "{}",
        describe(&out)
    );
    assert_eq!(
        std::fs::read_to_string(d.join("readonly.txt")).expect("read"),
        "r",
        "truncate must not happen"
    );
    let recs = read_audit(&log);
    let key = d.join("secret/key").display().to_string();
    let deny = recs
        .iter()
        .find(|r| r["file"]["path"] == key.as_str())
        .unwrap_or_else(|| panic!("no record for {key}: {recs:#?}"));
    assert_eq!(deny["action"], "file.open");
    assert_eq!(deny["verdict"], "deny");
    assert_eq!(deny["rule"], "files.rules[1]");
    assert_eq!(deny["file"]["access"], serde_json::json!(["read"]));
    assert!(
        deny["process"]["comm"]
            .as_str()
            .is_some_and(|c| c.starts_with("python"))
    );
    let env = d.join("ws/sub/.env").display().to_string();
    let env_rec = recs
        .iter()
        .find(|r| r["file"]["path"] == env.as_str())
        .expect("record for .env");
    assert_eq!(
        env_rec["rule"], "files.rules[2]",
        "the name deny beats the /ws/** allow"
    );
    let w = recs
        .iter()
        .find(|r| {
            r["file"]["path"] == d.join("readonly.txt").display().to_string().as_str()
                && r["action"] == "file.write"
        })
        .expect("write record");
    assert_eq!(w["verdict"], "deny");
}

#[test]
fn resolved_paths_defeat_bypasses() {
    let s = Scratch::new("bypass");
    setup_tree(&s);
    let p = policy(&s);
    let d = &s.dir;
    let dotdot = d.join("ws/sub/../../secret/key");
    let proc_root = Path::new("/proc/self/root").join(d.join("secret/key").strip_prefix("/").expect("abs"));
    let (res, out) = file_probes(
        &p,
        &[],
        &[
            ("read", &d.join("ws/link-to-key")),
            ("read", &dotdot),
            ("read", &proc_root),
            ("opath-reopen", &d.join("secret/key")),
            ("opath-reopen", &d.join("ws/notes.txt")),
        ],
    );
    assert_eq!(
        res,
        ["EPERM", "EPERM", "EPERM", "EPERM", "OK"],
        "{}",
        describe(&out)
    );
}

#[test]
fn unsandboxed_processes_are_unaffected() {
    let s = Scratch::new("outside");
    setup_tree(&s);
    let p = policy(&s);
    let key = s.dir.join("secret/key");
    let stop = s.dir.join("stop");
    // While a sandbox holds the deny, this process (outside it) reads the file.
    let child = idle_sandbox(&p, &stop);
    for _ in 0..10 {
        assert_eq!(std::fs::read_to_string(&key).expect("outside read works"), "k");
    }
    std::fs::write(&stop, "").expect("stop");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", describe(&out));
}

/// A policy with a read-only tree, a writable tree, an exact deny, and the
/// secret prefix, for the write and hard-link tests.
fn write_policy(s: &Scratch) -> std::path::PathBuf {
    let d = s.dir.display();
    s.write(
        "pw.yaml",
        &format!(
            "apiVersion: pep/v1\nname: writes\nvars:\n  root: {d}\nfiles:\n  default: allow\n  rules:\n\
             \x20   - allow: {{ path: \"${{root}}/ws/**\", access: [read, write] }}\n\
             \x20   - deny: {{ path: \"${{root}}/ro/**\", access: [write] }}\n\
             \x20   - deny: {{ path: \"${{root}}/secret/**\", access: [read, write] }}\n\
             \x20   - deny: {{ path: \"${{root}}/exact.txt\" }}\n"
        ),
    )
}

fn setup_write_tree(s: &Scratch) {
    let d = &s.dir;
    for dir in ["ws", "ro/emptydir", "ro/sub", "secret"] {
        std::fs::create_dir_all(d.join(dir)).expect("mkdir");
    }
    for f in [
        "ro/f",
        "ro/g",
        "ws/f",
        "ws/moveme",
        "ws/a",
        "ws/b",
        "ws/c",
        "ws/d",
    ] {
        std::fs::write(d.join(f), "data").expect("write");
    }
    std::fs::create_dir(d.join("ws/emptydir")).expect("mkdir");
}

#[test]
fn writes_outside_writable_paths_fail() {
    let s = Scratch::new("writes");
    setup_write_tree(&s);
    let p = write_policy(&s);
    let d = &s.dir;
    let log = d.join("audit.jsonl");
    let j = |a: &str, b: &str| format!("{}|{}", d.join(a).display(), d.join(b).display());
    let ro_new = d.join("ro/new");
    let ops: Vec<(&str, String)> = vec![
        ("write", d.join("ro/f").display().to_string()),
        ("creat", ro_new.display().to_string()),
        ("trunc", d.join("ro/f").display().to_string()),
        ("truncate", d.join("ro/f").display().to_string()),
        ("unlink", d.join("ro/f").display().to_string()),
        ("rename", j("ro/g", "ws/g-out")),
        ("rename", j("ws/moveme", "ro/moved-in")),
        ("mkdir", d.join("ro/newdir").display().to_string()),
        ("rmdir", d.join("ro/emptydir").display().to_string()),
        ("link", j("ws/a", "ro/hardlink")),
        ("symlink", j("ws/a", "ro/symlink")),
        ("mknod", d.join("ro/fifo").display().to_string()),
        ("chmod", d.join("ro/f").display().to_string()),
        ("chown", d.join("ro/f").display().to_string()),
        // The same operations where writing is allowed: they work.
        ("write", d.join("ws/f").display().to_string()),
        ("creat", d.join("ws/new").display().to_string()),
        ("truncate", d.join("ws/f").display().to_string()),
        ("rename", j("ws/b", "ws/b2")),
        ("mkdir", d.join("ws/newdir").display().to_string()),
        ("rmdir", d.join("ws/emptydir").display().to_string()),
        ("link", j("ws/c", "ws/c-link")),
        ("symlink", j("ws/c", "ws/c-sym")),
        ("mknod", d.join("ws/fifo").display().to_string()),
        ("chmod", d.join("ws/c").display().to_string()),
        ("unlink", d.join("ws/d").display().to_string()),
    ];
    let (res, out) = probes(&p, &["--audit", log.to_str().expect("utf8")], &ops);
    let denied = 14;
    assert_eq!(
        res,
        [vec!["EPERM"; denied], vec!["OK"; ops.len() - denied]].concat(),
        "{}",
        describe(&out)
    );
    // Nothing happened in the read-only tree.
    assert!(!ro_new.exists(), "a denied O_CREAT must not create the file");
    for gone in [
        "ro/newdir",
        "ro/hardlink",
        "ro/symlink",
        "ro/fifo",
        "ro/moved-in",
        "ws/g-out",
    ] {
        assert!(
            std::fs::symlink_metadata(d.join(gone)).is_err(),
            "{gone} must not exist"
        );
    }
    assert!(d.join("ro/emptydir").is_dir() && d.join("ws/moveme").exists() && d.join("ro/g").exists());
    assert_eq!(std::fs::read_to_string(d.join("ro/f")).expect("read"), "data");
    // Each denial is recorded as a write with the resolved path and the rule.
    let recs = read_audit(&log);
    for path in [
        d.join("ro/newdir"),
        d.join("ro/emptydir"),
        ro_new.clone(),
        d.join("ro/f"),
    ] {
        let path = path.display().to_string();
        let r = recs
            .iter()
            .find(|r| r["file"]["path"] == path.as_str() && r["verdict"] == "deny")
            .unwrap_or_else(|| panic!("no deny record for {path}: {recs:#?}"));
        assert_eq!(r["action"], "file.write", "{r}");
        assert_eq!(r["rule"], "files.rules[1]", "{r}");
    }
}

#[test]
fn hard_links_made_before_the_sandbox_are_denied() {
    let s = Scratch::new("hardlinks");
    setup_write_tree(&s);
    let d = &s.dir;
    std::fs::write(d.join("secret/key"), "k").expect("write");
    std::fs::write(d.join("exact.txt"), "e").expect("write");
    std::fs::hard_link(d.join("secret/key"), d.join("ws/key-link")).expect("link");
    std::fs::hard_link(d.join("exact.txt"), d.join("ws/exact-link")).expect("link");
    std::fs::hard_link(d.join("ws/a"), d.join("ws/a-link")).expect("link");
    let p = write_policy(&s);
    let log = d.join("audit.jsonl");
    let (res, out) = probes(
        &p,
        &["--audit", log.to_str().expect("utf8")],
        &[
            ("read", d.join("ws/key-link").display().to_string()),
            ("write", d.join("ws/key-link").display().to_string()),
            ("read", d.join("ws/exact-link").display().to_string()),
            // A link made inside the sandbox to a denied file: refused.
            (
                "link",
                format!(
                    "{}|{}",
                    d.join("secret/key").display(),
                    d.join("ws/new-link").display()
                ),
            ),
            // Control: a hard link to an allowed file.
            ("read", d.join("ws/a-link").display().to_string()),
        ],
    );
    assert_eq!(
        res,
        ["EPERM", "EPERM", "EPERM", "EPERM", "OK"],
        "{}",
        describe(&out)
    );
    let recs = read_audit(&log);
    let link = d.join("ws/key-link").display().to_string();
    let r = recs
        .iter()
        .find(|r| r["file"]["path"] == link.as_str())
        .unwrap_or_else(|| panic!("no record for {link}: {recs:#?}"));
    assert_eq!(
        (&r["verdict"], &r["rule"]),
        (&serde_json::json!("deny"), &serde_json::json!("files.rules[2]")),
        "denied by the rule that denies the file's own path: {r}"
    );
}

#[test]
fn openat2_resolve_flags_do_not_bypass() {
    let s = Scratch::new("openat2");
    setup_tree(&s);
    let p = policy(&s);
    let d = &s.dir;
    let key = d.join("secret/key").display().to_string();
    let link = d.join("ws/link-to-key").display().to_string();
    let notes = d.join("ws/notes.txt").display().to_string();
    let (res, out) = probes(
        &p,
        &[],
        &[
            ("openat2", format!("no-symlinks|{key}")),
            ("openat2", format!("beneath|{key}")),
            ("openat2", format!("in-root|{key}")),
            ("openat2", format!("no-magiclinks|{key}")),
            // From a descriptor on the same mount (from / it would cross
            // into /tmp's tmpfs: EXDEV before any open).
            ("openat2", format!("no-xdev|{}|secret/key", d.display())),
            ("openat2", format!("beneath|{}|ws/../secret/key", d.display())),
            ("openat2", format!("in-root|{link}")),
            ("openat2", format!("beneath|{notes}")),
        ],
    );
    assert_eq!(
        res,
        [
            "EPERM", "EPERM", "EPERM", "EPERM", "EPERM", "EPERM", "EPERM", "OK"
        ],
        "{}",
        describe(&out)
    );
}

/// Makes `base/<dirs>/<file>` whose full path is exactly `len` bytes.
fn path_of_len(base: &Path, len: usize) -> std::path::PathBuf {
    let mut p = base.to_path_buf();
    // Directories of 100 bytes until the rest fits in one file name.
    let mut n = 0;
    while len - p.as_os_str().len() - 1 > 200 {
        p = p.join(format!("{n}{}", "d".repeat(99)));
        n += 1;
    }
    std::fs::create_dir_all(&p).expect("mkdir");
    let rest = len - p.as_os_str().len() - 1;
    let f = p.join("f".repeat(rest));
    assert_eq!(f.as_os_str().len(), len);
    f
}

#[test]
fn paths_at_and_past_the_length_limit() {
    // PATH_MAX_LEN counts the NUL: 255 bytes of path are handled, 256 are
    // denied (fail closed) with a record, whatever the policy says.
    let limit = pep_common::event::PATH_MAX_LEN - 1;
    let s = Scratch::new("len");
    let d = &s.dir;
    let p = s.write(
        "p.yaml",
        "apiVersion: pep/v1\nname: len\nfiles:\n  default: allow\n  rules:\n    - deny: { path: /nonexistent/** }\n",
    );
    let at = path_of_len(&d.join("a"), limit);
    let past = path_of_len(&d.join("b"), limit + 1);
    let far = path_of_len(&d.join("c"), 600);
    for f in [&at, &past, &far] {
        std::fs::write(f, "x").expect("write");
    }
    let log = d.join("audit.jsonl");
    let mk = |f: &Path, name: &str| f.parent().expect("parent").join(name).display().to_string();
    let (res, out) = probes(
        &p,
        &["--audit", log.to_str().expect("utf8")],
        &[
            ("read", at.display().to_string()),
            ("read", past.display().to_string()),
            ("read", far.display().to_string()),
            // The dentry walk (path_* hooks) has the same limit.
            ("chmod", at.display().to_string()),
            ("chmod", past.display().to_string()),
            ("unlink", past.display().to_string()),
            ("mkdir", mk(&far, "newdir")),
            ("unlink", at.display().to_string()),
        ],
    );
    assert_eq!(
        res,
        ["OK", "EPERM", "EPERM", "OK", "EPERM", "EPERM", "EPERM", "OK"],
        "{}",
        describe(&out)
    );
    assert!(past.exists(), "the denied unlink must not happen");
    let recs = read_audit(&log);
    let too_long: Vec<_> = recs
        .iter()
        .filter(|r| r["verdict"] == "deny" && r["file"]["path"].is_null())
        .collect();
    assert!(
        too_long.len() >= 5,
        "each denial past the limit is recorded, without a path: {recs:#?}"
    );
    assert!(
        too_long
            .iter()
            .all(|r| r["source"] == "default" && r["rule"].is_null())
    );
    let at_s = at.display().to_string();
    assert!(
        recs.iter()
            .any(|r| r["file"]["path"] == at_s.as_str() && r["verdict"] == "allow"),
        "a path at the limit is resolved and recorded whole"
    );
}
