//! After `run` ends, whichever way, no sandbox cgroup and no attached program
//! remains. Tests here run one at a time: they count loaded programs.

use std::{
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use pep_tests::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Loaded programs named like our network hooks, from `bpftool prog show`.
fn our_programs() -> usize {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool (cargo xtask setup installs it)");
    assert!(out.status.success(), "bpftool: {}", describe(&out));
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    progs
        .as_array()
        .expect("array")
        .iter()
        .filter(|p| {
            matches!(
                p["name"].as_str(),
                Some("connect4" | "connect6" | "sendmsg4" | "sendmsg6")
            )
        })
        .count()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `run` with a command that sleeps, waits until the sandbox exists,
/// lets `end` end it, then checks that everything is gone.
fn check_cleanup(end: impl FnOnce(u32, &std::path::Path, &std::path::Path), expect_code: Option<i32>) {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = Scratch::new("cleanup");
    let p = s.write("p.yaml", "apiVersion: pep/v1\nnetwork:\n  default: deny\n");
    let before = our_programs();
    let marker = s.dir.join("started");
    let stop = s.dir.join("stop");
    let child = Command::new(pep_agent_bin())
        .args(["run", "--policy"])
        .arg(&p)
        .args(["--", "sh", "-c"])
        .arg(format!(
            "touch {}; sleep 30 & while [ ! -e {} ]; do sleep 0.02; done; exit 0",
            marker.display(),
            stop.display()
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    wait_until("the sandboxed command starts", || marker.exists());
    let cgs = leftover_cgroups(pid);
    assert_eq!(cgs.len(), 1, "one sandbox cgroup while running: {cgs:?}");
    assert_eq!(our_programs(), before + 4, "four network programs while running");
    end(pid, &cgs[0], &stop);
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), expect_code, "{}", describe(&out));
    assert!(
        leftover_cgroups(pid).is_empty(),
        "cgroup left: {:?}",
        leftover_cgroups(pid)
    );
    assert!(!cgs[0].exists());
    wait_until("programs unloaded", || our_programs() == before);
}

#[test]
fn after_normal_exit() {
    // The command exits 0 by itself, leaving a background child behind in
    // the sandbox: that child is killed too.
    check_cleanup(
        |_, _, stop| {
            std::fs::write(stop, "").expect("stop file");
        },
        Some(0),
    );
}

#[test]
fn after_sigkill_of_cmd() {
    check_cleanup(
        |_, cg, _| {
            let procs = std::fs::read_to_string(cg.join("cgroup.procs")).expect("procs");
            let first = procs.lines().next().expect("a pid");
            let _ = Command::new("kill").args(["-KILL", first]).status();
        },
        Some(137),
    );
}

#[test]
fn after_sigterm_of_pep_agent() {
    check_cleanup(
        |pid, _, _| {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        },
        Some(143),
    );
}

#[test]
fn after_sigint_of_pep_agent() {
    check_cleanup(
        |pid, _, _| {
            let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
        },
        Some(130),
    );
}
