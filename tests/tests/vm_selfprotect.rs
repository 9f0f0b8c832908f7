//! Self-protection, in the VM: whatever its policy (here a network-only one,
//! and audit mode), a sandboxed root process can neither call bpf(), nor
//! write cgroup files (moving processes) or clone into another cgroup, nor
//! signal or ptrace pep-agent, nor write to bpffs, nor load kernel modules.
//! Each attempt fails and is recorded; the same attempts from outside the
//! sandbox, at the same time, are not affected.

use std::path::PathBuf;

use pep_tests::*;

/// The bpffs mount (the VM mounts one at /sys/fs/bpf).
fn bpffs() -> PathBuf {
    PathBuf::from("/sys/fs/bpf")
}

/// Some module file to hand to finit_module (any file: the hook runs first).
fn a_module_file() -> String {
    "/etc/hostname".into()
}

/// AF_APPLETALK: a socket family provided by a module that is not loaded,
/// so the kernel asks to load it on behalf of the caller.
const AF_APPLETALK: &str = "5";

#[test]
fn sandboxed_root_cannot_disable_enforcement() {
    assert!(nix::unistd::geteuid().is_root(), "runs as root");
    let s = Scratch::new("selfprot");
    let d = &s.dir;
    let cg = cgroup2_root();
    let outside_cg = cg.join(format!("pep-test-outside-{}", std::process::id()));
    std::fs::create_dir_all(&outside_cg).expect("mkdir cgroup");
    // Network only, audit mode: self-protection does not depend on either.
    let p = s.write(
        "p.yaml",
        "apiVersion: pep/v1\nname: selfprot\nmode: audit\nnetwork:\n  default: allow\n",
    );
    let log = d.join("audit.jsonl");
    let procs = outside_cg.join("cgroup.procs").display().to_string();
    let new_cg = cg.join(format!("pep-test-new-{}", std::process::id()));
    let bpf_dir = bpffs().join(format!("pep-test-{}", std::process::id()));
    let ops: Vec<(&str, String)> = vec![
        ("bpf", "-".into()),
        ("cgroup-write", procs.clone()),
        ("mkdir", new_cg.display().to_string()),
        ("clone-into-cgroup", outside_cg.display().to_string()),
        ("kill-parent", "15".into()),
        ("ptrace-parent", "-".into()),
        ("mkdir", bpf_dir.display().to_string()),
        ("init-module", "-".into()),
        ("finit-module", a_module_file()),
        ("autoload", AF_APPLETALK.into()),
    ];
    let (res, out) = probes(&p, &["--audit", log.to_str().expect("utf8")], &ops);
    assert!(out.status.success(), "pep-agent survived: {}", describe(&out));
    assert_eq!(
        res,
        [
            "EPERM",
            "EPERM",
            "EPERM",
            "EPERM",
            "EPERM",
            "EPERM",
            "EPERM",
            "EPERM",
            "EPERM",
            "EAFNOSUPPORT"
        ],
        "{}",
        describe(&out)
    );
    assert!(!new_cg.exists() && !bpf_dir.exists(), "nothing was created");
    assert_eq!(
        std::fs::read_to_string(&procs).expect("read"),
        "",
        "no process moved into the outside cgroup"
    );
    let recs = read_audit(&log);
    let count = |action: &str| {
        recs.iter()
            .filter(|r| r["action"] == action && r["verdict"] == "deny" && r["rule"] == "self-protection")
            .count()
    };
    assert!(count("self.bpf") >= 1, "{recs:#?}");
    assert!(count("self.cgroup") >= 3, "write, mkdir, clone3: {recs:#?}");
    assert!(count("self.signal") >= 1, "{recs:#?}");
    assert!(count("self.ptrace") >= 1, "{recs:#?}");
    assert!(count("self.bpffs") >= 1, "{recs:#?}");
    assert!(count("self.module") >= 3, "init, finit, autoload: {recs:#?}");
    let write = recs
        .iter()
        .find(|r| r["action"] == "self.cgroup" && r["file"]["path"] == procs.as_str())
        .unwrap_or_else(|| panic!("cgroup write record names the file: {recs:#?}"));
    assert_eq!(write["mode"], "audit", "recorded in audit mode, and still denied");
    assert!(
        recs.iter()
            .any(|r| r["action"] == "self.module" && r["file"]["path"] == "net-pf-5"),
        "the autoload request names the module: {recs:#?}"
    );
    let _ = std::fs::remove_dir(&outside_cg);
}

#[test]
fn the_same_attempts_from_outside_are_unaffected() {
    let s = Scratch::new("selfprot-out");
    let d = &s.dir;
    let p = s.write(
        "p.yaml",
        "apiVersion: pep/v1\nname: idle\nnetwork:\n  default: allow\nfiles:\n  default: allow\n",
    );
    let stop = d.join("stop");
    let child = idle_sandbox(&p, &stop);
    let cg = cgroup2_root().join(format!("pep-test-out-{}", std::process::id()));
    let bpf_dir = bpffs().join(format!("pep-test-out-{}", std::process::id()));
    let out = std::process::Command::new("python3")
        .arg(file_probe())
        .args(["bpf", "-", "mkdir"])
        .arg(&cg)
        .args(["rmdir"])
        .arg(&cg)
        .args(["mkdir"])
        .arg(&bpf_dir)
        .args(["rmdir"])
        .arg(&bpf_dir)
        .args(["init-module", "-"])
        .output()
        .expect("probe");
    std::fs::write(&stop, "").expect("stop");
    let res = probe_results(&out);
    assert_eq!(res[..5], ["OK", "OK", "OK", "OK", "OK"], "{}", describe(&out));
    assert_ne!(
        res[5],
        "EPERM",
        "init_module reaches the module loader: {}",
        describe(&out)
    );
    let st = child.wait_with_output().expect("wait");
    assert!(st.status.success(), "{}", describe(&st));
}
