//! clippy on userspace (stable) and, separately, on the eBPF crate (nightly,
//! bpfel-unknown-none), and rustfmt.

use std::process::Command;

use anyhow::Result;

use crate::vm::workspace_root;

/// Runs each check; returns (passed, failed).
pub fn run() -> Result<(usize, usize)> {
    let root = workspace_root();
    let checks: Vec<(&str, Command)> = vec![
        ("rustfmt", {
            let mut c = Command::new("cargo");
            c.args(["fmt", "--all", "--check"]);
            c
        }),
        ("clippy userspace", {
            let mut c = Command::new("cargo");
            c.args([
                "clippy",
                "--workspace",
                "--exclude",
                "pep-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]);
            c
        }),
        ("clippy eBPF", {
            let mut c = Command::new("cargo");
            c.args([
                "+nightly",
                "clippy",
                "--package",
                "pep-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]);
            // The eBPF crate has its own target dir so the two toolchains
            // never invalidate each other's builds.
            c.env("CARGO_TARGET_DIR", root.join("target/ebpf-clippy"));
            c.env("RUSTUP_TOOLCHAIN", "nightly");
            c
        }),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, mut cmd) in checks {
        cmd.current_dir(&root);
        let st = cmd.status()?;
        if st.success() {
            println!("lint: {name} ... ok");
            passed += 1;
        } else {
            println!("lint: {name} ... FAILED");
            failed += 1;
        }
    }
    Ok((passed, failed))
}
