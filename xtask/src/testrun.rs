//! `cargo xtask test`: every test, in phases, with one closing line.
//!
//! 0. lint: rustfmt, clippy (userspace and eBPF);
//! 1. unit: every library/binary unit test, run as an unprivileged user;
//! 2. host: `pep-tests` binaries named `host_*`, as root on the host kernel;
//! 3. vm: the harness self-test, then `pep-tests` binaries named `vm_*`, as
//!    root inside the Debian kernel in QEMU, where BPF LSM works. They run
//!    a release `pep-agent`: under TCG a debug build takes about a minute
//!    to load its programs, at every `run` and daemon start.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, vm, vm_selftest};

pub struct Options {
    pub vm: bool,
    pub only: Option<String>,
}

/// One test executable as cargo built it.
#[derive(Debug, Clone)]
struct TestBin {
    package: String,
    name: String,
    kind: String,
    exe: PathBuf,
    manifest_dir: PathBuf,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    passed: usize,
    failed: usize,
    skipped: usize,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.skipped += o.skipped;
    }
}

/// Sums libtest's `test result:` lines; collects the names of failed and
/// ignored tests with their reasons.
fn parse_libtest(output: &str) -> (Counts, Vec<String>, Vec<String>) {
    let mut c = Counts::default();
    let mut failures = Vec::new();
    let mut ignored = Vec::new();
    for line in output.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut it = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (it.next(), it.next()) else {
                    continue;
                };
                let n: usize = n.parse().unwrap_or(0);
                match what {
                    "passed" => c.passed += n,
                    "failed" => c.failed += n,
                    "ignored" => c.skipped += n,
                    _ => {}
                }
            }
        } else if line.starts_with("test ") && line.ends_with("... FAILED") {
            failures.push(
                line.trim_start_matches("test ")
                    .trim_end_matches(" ... FAILED")
                    .to_string(),
            );
        } else if line.starts_with("test ") && line.contains("... ignored") {
            ignored.push(line.trim_start_matches("test ").to_string());
        }
    }
    (c, failures, ignored)
}

/// `cargo build --release -p pep-agent`: the binary the VM tests run.
fn build_release(root: &Path) -> Result<PathBuf> {
    let st = Command::new("cargo")
        .args(["build", "--release", "--package", "pep-agent"])
        .current_dir(root)
        .status()?;
    if !st.success() {
        bail!("cargo build --release -p pep-agent failed");
    }
    Ok(root.join("target/release/pep-agent"))
}

fn build_tests(root: &Path) -> Result<Vec<TestBin>> {
    let st = Command::new("cargo")
        .args(["build", "--package", "pep-agent"])
        .current_dir(root)
        .status()?;
    if !st.success() {
        bail!("cargo build -p pep-agent failed");
    }
    let out = Command::new("cargo")
        .args([
            "test",
            "--workspace",
            "--exclude",
            "pep-ebpf",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = v["executable"].as_str() else {
            continue;
        };
        let manifest = PathBuf::from(v["manifest_path"].as_str().unwrap_or_default());
        bins.push(TestBin {
            package: package_name(v["package_id"].as_str().unwrap_or_default()),
            name: v["target"]["name"].as_str().unwrap_or_default().to_string(),
            kind: v["target"]["kind"][0].as_str().unwrap_or_default().to_string(),
            exe: PathBuf::from(exe),
            manifest_dir: manifest.parent().map(Path::to_path_buf).unwrap_or_default(),
        });
    }
    bins.sort_by(|a, b| (&a.package, &a.name).cmp(&(&b.package, &b.name)));
    Ok(bins)
}

/// The package name in a cargo package id: `path+file:///w/tests#pep-tests@0.1.0`
/// names `pep-tests`; `path+file:///w/xtask#0.1.0` names `xtask`.
fn package_name(id: &str) -> String {
    let tail = id.rsplit('/').next().unwrap_or_default();
    match tail.split_once('#') {
        Some((dir, rest)) => match rest.split_once('@') {
            Some((name, _)) => name.to_string(),
            None => dir.to_string(),
        },
        None => tail.split('@').next().unwrap_or_default().to_string(),
    }
}

/// Runs one test binary on the host, streaming nothing, returning output.
fn run_bin(bin: &TestBin, unprivileged: bool, pep_agent: &Path) -> Result<(Counts, String)> {
    let mut cmd = if unprivileged {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&bin.exe);
        c
    } else {
        Command::new(&bin.exe)
    };
    cmd.current_dir(&bin.manifest_dir)
        .env("PEP_AGENT_BIN", pep_agent)
        .env("RUST_BACKTRACE", "1");
    let out = cmd
        .output()
        .with_context(|| format!("running {}", bin.exe.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut c, _, _) = parse_libtest(&text);
    if !out.status.success() && c.failed == 0 {
        // A crash or a harness failure with no summary is still a failure.
        c.failed += 1;
    }
    Ok((c, text))
}

fn report(phase: &str, label: &str, c: Counts, text: &str, ok: bool) {
    let (_, failures, ignored) = parse_libtest(text);
    println!(
        "{phase}: {label}: {} passed, {} failed{}",
        c.passed,
        c.failed,
        if c.skipped > 0 {
            format!(", {} skipped", c.skipped)
        } else {
            String::new()
        }
    );
    for i in ignored {
        println!("  skipped: {i}");
    }
    if !ok || c.failed > 0 {
        for f in &failures {
            println!("  FAILED: {f}");
        }
        println!("----- output of {label} -----\n{text}\n----- end of {label} -----");
    }
}

pub fn run(opts: Options) -> Result<()> {
    let started = Instant::now();
    setup::setup()?;
    let root = vm::workspace_root();
    let mut total = Counts::default();
    let selected = |b: &TestBin| {
        opts.only
            .as_ref()
            .is_none_or(|o| b.name.contains(o.as_str()) || b.package.contains(o.as_str()))
    };

    // 0. lint
    if opts.only.is_none() {
        let (p, f) = crate::lint::run()?;
        println!("phase lint: {p} passed, {f} failed");
        total.add(Counts {
            passed: p,
            failed: f,
            skipped: 0,
        });
    }

    let bins = build_tests(&root)?;
    let pep_agent = root.join("target/debug/pep-agent");
    let is_it = |b: &TestBin, prefix: &str| {
        b.package == "pep-tests" && b.kind == "test" && b.name.starts_with(prefix)
    };

    // a. unit tests, unprivileged
    let mut phase = Counts::default();
    for b in bins
        .iter()
        .filter(|b| !is_it(b, "host_") && !is_it(b, "vm_"))
        .filter(|b| selected(b))
    {
        let (c, text) = run_bin(b, true, &pep_agent)?;
        report(
            "unit",
            &format!("{}::{}", b.package, b.name),
            c,
            &text,
            c.failed == 0,
        );
        phase.add(c);
    }
    println!("phase unit: {} passed, {} failed", phase.passed, phase.failed);
    total.add(phase);

    // b. host integration, as root
    let mut phase = Counts::default();
    for b in bins.iter().filter(|b| is_it(b, "host_")).filter(|b| selected(b)) {
        let (c, text) = run_bin(b, false, &pep_agent)?;
        report("host", &b.name, c, &text, c.failed == 0);
        phase.add(c);
    }
    println!("phase host: {} passed, {} failed", phase.passed, phase.failed);
    total.add(phase);

    // c. VM integration
    if opts.vm {
        let mut phase = Counts::default();
        match vm_selftest::selftest() {
            Ok((p, f)) => phase.add(Counts {
                passed: p,
                failed: f,
                skipped: 0,
            }),
            Err(e) => {
                println!("vm: harness self-test could not run: {e:#}");
                phase.failed += 1;
            }
        }
        let vm_bins: Vec<&TestBin> = bins
            .iter()
            .filter(|b| is_it(b, "vm_"))
            .filter(|b| selected(b))
            .collect();
        let pep_agent = if vm_bins.is_empty() {
            pep_agent.clone()
        } else {
            build_release(&root)?
        };
        let cmds: Vec<vm::VmCommand> = vm_bins
            .iter()
            .map(|b| {
                // One test at a time in the guest: concurrent loads of the LSM
                // programs (trampoline updates) were seen to soft-lock the
                // 6.1 guest's two emulated CPUs under TCG.
                let mut c = vm::VmCommand::new(
                    b.name.clone(),
                    [b.exe.display().to_string(), "--test-threads=1".to_string()],
                );
                c.cwd = b.manifest_dir.clone();
                c.env
                    .push(("PEP_AGENT_BIN".into(), pep_agent.display().to_string()));
                c.env.push(("RUST_BACKTRACE".into(), "1".into()));
                c
            })
            .collect();
        if !cmds.is_empty() {
            // TCG's speed depends on the host: the phase has taken from 8
            // minutes to more than 25 on machines of the same kind.
            match vm::run_in_vm(&cmds, Duration::from_secs(45 * 60)) {
                Ok(results) => {
                    for r in results {
                        let (mut c, _, _) = parse_libtest(&r.output);
                        let ok = r.exit_code == Some(0);
                        if !ok && c.failed == 0 {
                            c.failed += 1;
                        }
                        report("vm", &r.name, c, &r.output, ok);
                        phase.add(c);
                    }
                }
                Err(e) => {
                    println!("vm: the guest could not run the tests: {e:#}");
                    phase.failed += cmds.len();
                }
            }
        }
        println!("phase vm: {} passed, {} failed", phase.passed, phase.failed);
        total.add(phase);
    } else {
        println!("phase vm: not run (--no-vm)");
    }

    println!("took {:.0}s", started.elapsed().as_secs_f64());
    if total.skipped > 0 {
        println!(
            "{} passed, {} failed, {} skipped",
            total.passed, total.failed, total.skipped
        );
    } else {
        println!("{} passed, {} failed", total.passed, total.failed);
    }
    if total.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_from_ids() {
        assert_eq!(package_name("path+file:///w/tests#pep-tests@0.1.0"), "pep-tests");
        assert_eq!(package_name("path+file:///w/xtask#0.1.0"), "xtask");
        assert_eq!(
            package_name("registry+https://github.com/rust-lang/crates.io-index#serde@1.0.0"),
            "serde"
        );
    }

    #[test]
    fn sums_libtest_summaries() {
        let out = "running 3 tests\ntest a ... ok\ntest b ... FAILED\ntest c ... ignored, needs x\n\
                   test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\
                   test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s\n";
        let (c, failures, ignored) = parse_libtest(out);
        assert_eq!((c.passed, c.failed, c.skipped), (5, 1, 1));
        assert_eq!(failures, ["b"]);
        assert_eq!(ignored, ["c ... ignored, needs x"]);
    }
}
