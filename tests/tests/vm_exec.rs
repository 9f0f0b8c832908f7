//! Exec enforcement with BPF LSM, in the VM: `bprm_check_security` decides
//! by the executed file's resolved path and inode; `mmap_file` and
//! `file_mprotect` stop code mapped executable by other means (ld.so). Each
//! deny is attacked with a symlink, a hard link, a copy and the dynamic
//! loader, and exec records carry argv.

use std::{os::unix::fs::symlink, path::Path};

use pep_tests::*;

/// Copies `src` to `dst` with the execute bit.
fn copy_exe(src: &str, dst: &Path) {
    std::fs::copy(src, dst).unwrap_or_else(|e| panic!("copy {src}: {e}"));
}

/// `true(1)`'s resolved path: the program the tests copy and link.
const TRUE: &str = "/usr/bin/true";

#[test]
fn denylist_holds_through_symlink_hard_link_and_ldso() {
    let s = Scratch::new("exec-deny");
    let d = &s.dir;
    std::fs::create_dir_all(d.join("bin")).expect("mkdir");
    copy_exe(TRUE, &d.join("bin/denied"));
    copy_exe(TRUE, &d.join("bin/fine"));
    symlink(d.join("bin/denied"), d.join("sym")).expect("symlink");
    std::fs::hard_link(d.join("bin/denied"), d.join("hardlink")).expect("link");
    let p = s.write(
        "p.yaml",
        &format!(
            "apiVersion: pep/v1\nname: exec\nexec:\n  default: allow\n  rules:\n\
             \x20   - deny: {{ path: {} }}\n",
            d.join("bin/denied").display()
        ),
    );
    let log = d.join("audit.jsonl");
    let denied = d.join("bin/denied").display().to_string();
    let (res, out) = probes(
        &p,
        &["--audit", log.to_str().expect("utf8")],
        &[
            ("exec", denied.clone()),
            ("exec", d.join("sym").display().to_string()),
            ("exec", d.join("hardlink").display().to_string()),
            ("ldso", denied.clone()),
            ("mprotect-exec", denied.clone()),
            ("exec-args", format!("{denied} first second")),
            // Controls: another program, and ld.so itself on it.
            ("exec", d.join("bin/fine").display().to_string()),
            ("ldso", d.join("bin/fine").display().to_string()),
            ("mprotect-exec", d.join("bin/fine").display().to_string()),
        ],
    );
    assert_eq!(res[..3], ["EPERM", "EPERM", "EPERM"], "{}", describe(&out));
    assert!(
        res[3].starts_with("EXIT"),
        "ld.so cannot map the denied program: {}",
        describe(&out)
    );
    assert_eq!(
        res[4..],
        ["EPERM", "EPERM", "OK", "OK", "OK"],
        "{}",
        describe(&out)
    );

    let recs = read_audit(&log);
    let execs: Vec<_> = recs.iter().filter(|r| r["action"] == "exec").collect();
    let with_args = execs
        .iter()
        .find(|r| r["exec"]["argv"] == serde_json::json!([denied.as_str(), "first", "second"]))
        .unwrap_or_else(|| panic!("no exec record with argv: {execs:#?}"));
    assert_eq!(with_args["verdict"], "deny");
    assert_eq!(with_args["rule"], "exec.rules[0]");
    assert_eq!(with_args["exec"]["path"], denied.as_str());
    // The symlink is recorded (and denied) as the file it resolves to; the
    // hard link by its own path, denied by the inode of the denied file.
    let hl = d.join("hardlink").display().to_string();
    let r = execs
        .iter()
        .find(|r| r["exec"]["path"] == hl.as_str())
        .unwrap_or_else(|| panic!("no record for {hl}: {execs:#?}"));
    assert_eq!(
        (&r["verdict"], &r["rule"]),
        (&"deny".into(), &"exec.rules[0]".into())
    );
    assert!(
        execs.iter().any(|r| r["verdict"] == "deny"
            && r["reason"] == "mmap PROT_EXEC"
            && r["exec"]["path"] == denied.as_str()),
        "the ld.so mapping is recorded: {execs:#?}"
    );
    let fine = d.join("bin/fine").display().to_string();
    assert!(
        execs
            .iter()
            .any(|r| r["verdict"] == "allow" && r["exec"]["path"] == fine.as_str()),
        "allowed execs are recorded too"
    );
}

#[test]
fn allowlist_holds_against_copy_symlink_and_hard_link() {
    let s = Scratch::new("exec-allow");
    let d = &s.dir;
    std::fs::create_dir_all(d.join("allowed")).expect("mkdir");
    copy_exe(TRUE, &d.join("allowed/prog"));
    copy_exe(TRUE, &d.join("allowed/denied"));
    copy_exe(TRUE, &d.join("copy"));
    // A hard link to a denied program inside an allowed directory, made
    // before the sandbox starts.
    std::fs::hard_link(d.join("allowed/denied"), d.join("allowed/innocent")).expect("link");
    std::fs::hard_link(d.join("allowed/prog"), d.join("outside-link")).expect("link");
    symlink(TRUE, d.join("allowed/sym-to-usr")).expect("symlink");
    symlink(d.join("copy"), d.join("allowed/sym-to-copy")).expect("symlink");
    let p = s.write(
        "p.yaml",
        &format!(
            "apiVersion: pep/v1\nname: exec-allow\nvars:\n  root: {}\nexec:\n  default: deny\n  rules:\n\
             \x20   - allow: {{ path: \"/usr/**\" }}\n\
             \x20   - allow: {{ path: \"${{root}}/allowed/**\" }}\n\
             \x20   - deny: {{ path: \"${{root}}/allowed/denied\" }}\n",
            d.display()
        ),
    );
    let (res, out) = probes(
        &p,
        &[],
        &[
            ("exec", TRUE.into()),
            ("exec", d.join("allowed/prog").display().to_string()),
            ("exec", d.join("allowed/sym-to-usr").display().to_string()),
            ("exec", d.join("copy").display().to_string()),
            ("exec", d.join("allowed/sym-to-copy").display().to_string()),
            ("exec", d.join("allowed/denied").display().to_string()),
            ("exec", d.join("allowed/innocent").display().to_string()),
            ("exec", d.join("outside-link").display().to_string()),
        ],
    );
    assert_eq!(
        res,
        ["OK", "OK", "OK", "EPERM", "EPERM", "EPERM", "EPERM", "EPERM"],
        "{}",
        describe(&out)
    );
}

#[test]
fn unsandboxed_exec_is_unaffected() {
    let s = Scratch::new("exec-outside");
    let d = &s.dir;
    copy_exe(TRUE, &d.join("denied"));
    let p = s.write(
        "p.yaml",
        &format!(
            "apiVersion: pep/v1\nname: exec-out\nexec:\n  default: deny\n  rules:\n\
             \x20   - allow: {{ path: \"/usr/**\" }}\n\
             \x20   - deny: {{ path: {} }}\n",
            d.join("denied").display()
        ),
    );
    let stop = d.join("stop");
    let child = idle_sandbox(&p, &stop);
    for _ in 0..5 {
        let st = std::process::Command::new(d.join("denied"))
            .status()
            .expect("outside the sandbox the denied program runs");
        assert!(st.success());
    }
    std::fs::write(&stop, "").expect("stop");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", describe(&out));
}
