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
    let child = std::process::Command::new(pep_agent_bin())
        .args(["run", "--policy"])
        .arg(&p)
        .args(["--", "sh", "-c"])
        .arg(format!("while [ ! -e {} ]; do sleep 0.05; done", stop.display()))
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(500));
    for _ in 0..10 {
        assert_eq!(std::fs::read_to_string(&key).expect("outside read works"), "k");
    }
    std::fs::write(&stop, "").expect("stop");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", describe(&out));
}
