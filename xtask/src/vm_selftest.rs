//! A self-test of the VM harness itself, in one guest boot: before trusting what tests
//! report from inside the guest, check that a passing command is reported as passing, a
//! failing one as failing, and that the guest kernel has what the project relies on.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::vm::{self, VmCommand, VmResult};

const MARKER: &str = "pep-vm-selftest-marker";

type Check = fn(&VmResult) -> Result<(), String>;

/// Boots once and runs the harness checks; prints `harness: <name> ... ok|FAILED` for each
/// and returns (passed, failed). An error means the guest could not be run at all.
pub fn selftest() -> Result<(usize, usize)> {
    let mut echo = VmCommand::new(
        "exit 0 with marker, env and cwd",
        [
            "sh",
            "-c",
            "echo \"$0\"; echo \"var=$PEP_SELFTEST_VAR\"; pwd; touch \"$PEP_VM_RESULTS/written-by-guest\" && echo results-writable",
            MARKER,
        ],
    );
    echo.env.push(("PEP_SELFTEST_VAR".into(), "it's set".into()));
    echo.cwd = "/usr/share".into();
    let cmds = vec![
        echo,
        VmCommand::new(
            "exit 3 is reported as failure",
            ["sh", "-c", "echo failing on purpose; exit 3"],
        ),
        VmCommand::new(
            "bpf LSM and cgroup2 present",
            [
                "sh",
                "-c",
                "cat /sys/kernel/security/lsm; echo; \
                 grep -qw bpf /sys/kernel/security/lsm || { echo 'bpf is not an active LSM'; exit 1; }; \
                 test -e /sys/fs/cgroup/cgroup.controllers || { echo 'no cgroup2 at /sys/fs/cgroup'; exit 1; }; \
                 test -e /sys/kernel/btf/vmlinux || { echo 'no BTF'; exit 1; }",
            ],
        ),
    ];
    let checks: [Check; 3] = [check_echo, check_exit3, check_kernel];

    let started = Instant::now();
    let results = vm::run_in_vm(&cmds, Duration::from_secs(120))?;
    let elapsed = started.elapsed();
    let (mut passed, mut failed) = (0, 0);
    for ((cmd, result), check) in cmds.iter().zip(&results).zip(checks) {
        match check(result) {
            Ok(()) => {
                passed += 1;
                println!("harness: {} ... ok", cmd.name);
            }
            Err(why) => {
                failed += 1;
                println!(
                    "harness: {} ... FAILED: {why}\n{}",
                    cmd.name,
                    indent(&result.output)
                );
            }
        }
    }
    println!(
        "harness: {passed} passed, {failed} failed, one boot in {:.1}s",
        elapsed.as_secs_f32()
    );
    Ok((passed, failed))
}

fn check_echo(r: &VmResult) -> Result<(), String> {
    if !r.success() {
        return Err(format!("exit {:?}, expected Some(0)", r.exit_code));
    }
    for want in [MARKER, "var=it's set", "/usr/share", "results-writable"] {
        if !r.output.contains(want) {
            return Err(format!("output lacks {want:?}"));
        }
    }
    Ok(())
}

fn check_exit3(r: &VmResult) -> Result<(), String> {
    match r.exit_code {
        Some(3) if r.output.contains("failing on purpose") => Ok(()),
        other => Err(format!(
            "exit {other:?}, expected Some(3) and the command's output"
        )),
    }
}

fn check_kernel(r: &VmResult) -> Result<(), String> {
    if r.success() {
        Ok(())
    } else {
        Err(format!("exit {:?}", r.exit_code))
    }
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
