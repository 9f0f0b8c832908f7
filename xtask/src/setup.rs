//! `cargo xtask setup`: the idempotent bootstrap of a fresh Debian 12 machine.
//!
//! Each step first checks cheaply whether its result is already there, so a second run
//! takes well under a second. What it provides: `rust-src` for the nightly toolchain,
//! `bpf-linker` built against the nightly's own libLLVM, the Debian packages the tests
//! use, a Debian 6.1 kernel unpacked in the cache, and the initramfs that boots it in QEMU
//! (see `vm_image.rs`).

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};

use crate::vm_image::{ensure_kernel, prepare_image};

/// The static busybox from Debian's busybox-static: the initramfs's only program.
pub(crate) const BUSYBOX: &str = "/bin/busybox";

const BPF_LINKER_VERSION: &str = "0.13.0";

const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "dnsmasq-base",
    "nftables",
    "bpftool",
    "iproute2",
    "curl",
    "python3",
    "strace",
    "xz-utils",
];

/// `$XDG_CACHE_HOME/pep-agent`, else `$HOME/.cache/pep-agent`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(xdg) => PathBuf::from(xdg).join("pep-agent"),
        None => home_dir().join(".cache/pep-agent"),
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

pub fn setup() -> Result<()> {
    let started = Instant::now();
    let mut done = 0;
    done += usize::from(ensure_rust_src()?);
    done += usize::from(ensure_bpf_linker()?);
    done += usize::from(ensure_apt_packages()?);
    let (release, downloaded) = ensure_kernel()?;
    done += usize::from(downloaded);
    done += usize::from(prepare_image()?.1);
    println!(
        "setup: ok ({done} step(s) performed, guest kernel {release}, {:.1}s)",
        started.elapsed().as_secs_f32()
    );
    Ok(())
}

/// Runs `cmd`, returning its stdout; the error names `what` and quotes stderr's last line.
pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<String> {
    run_bytes(cmd, what).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// [`run`] for binary output.
pub(crate) fn run_bytes(cmd: &mut Command, what: &str) -> Result<Vec<u8>> {
    let out: Output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        bail!("{what}: {:?} failed ({}): {last}", cmd.get_program(), out.status);
    }
    Ok(out.stdout)
}

/// Like `which`: the first executable `name` in `PATH`.
pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
}

fn is_root() -> bool {
    // /proc/self belongs to the effective uid; avoids an unsafe geteuid call.
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = run(
        Command::new("rustc").args(["+nightly", "--print", "sysroot"]),
        "the nightly toolchain (rustup toolchain install nightly)",
    )?;
    Ok(PathBuf::from(out.trim()))
}

fn ensure_rust_src() -> Result<bool> {
    let src = nightly_sysroot()?.join("lib/rustlib/src/rust/library");
    if src.is_dir() {
        return Ok(false);
    }
    println!("setup: rust-src: adding it to the nightly toolchain");
    run(
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        "rust-src for nightly",
    )?;
    Ok(true)
}

fn bpf_linker_path() -> PathBuf {
    find_in_path("bpf-linker").unwrap_or_else(|| {
        let cargo_home =
            std::env::var_os("CARGO_HOME").map_or_else(|| home_dir().join(".cargo"), PathBuf::from);
        cargo_home.join("bin/bpf-linker")
    })
}

fn bpf_linker_ok() -> bool {
    Command::new(bpf_linker_path())
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

/// `llvm-22` from `rustc -vV` output (line `LLVM version: 22.1.4`).
pub(crate) fn llvm_feature(rustc_vv: &str) -> Option<String> {
    let version = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))?
        .trim();
    let major = version.split('.').next()?;
    major.parse::<u32>().ok().map(|m| format!("llvm-{m}"))
}

/// bpf-linker has no prebuilt binary and Debian's LLVM is too old: build it against the
/// nightly toolchain's own libLLVM, whose major version matches what rustc emits. The
/// binary's rpath points into `cache_dir()/llvm/lib`, so that prefix must stay put.
fn ensure_bpf_linker() -> Result<bool> {
    if bpf_linker_ok() {
        return Ok(false);
    }
    println!(
        "setup: bpf-linker: building {BPF_LINKER_VERSION} against the nightly's libLLVM (about a minute)"
    );
    let vv = run(
        Command::new("rustc").args(["+nightly", "-vV"]),
        "bpf-linker: nightly rustc",
    )?;
    let feature =
        llvm_feature(&vv).ok_or_else(|| anyhow!("bpf-linker: no `LLVM version:` in `rustc +nightly -vV`"))?;
    let nightly_lib = nightly_sysroot()?.join("lib");
    let so = fs::read_dir(&nightly_lib)
        .with_context(|| format!("bpf-linker: cannot list {}", nightly_lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .ok_or_else(|| anyhow!("bpf-linker: no libLLVM.so.* in {}", nightly_lib.display()))?;
    let prefix = cache_dir().join("llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("bpf-linker: cannot create {}", lib.display()))?;
    // libLLVM.so for the build to link against; the soname for the binary's rpath.
    for name in ["libLLVM.so", so.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(nightly_lib.join(&so), &link)
            .with_context(|| format!("bpf-linker: cannot link {}", link.display()))?;
    }
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
            "--no-default-features",
        ])
        .args(["--features", &feature])
        .env("LLVM_PREFIX", &prefix)
        .current_dir(cache_dir())
        .stdin(Stdio::null())
        .status()
        .context("bpf-linker: cannot run cargo install")?;
    if !status.success() {
        bail!("bpf-linker: `cargo install bpf-linker --version {BPF_LINKER_VERSION}` failed ({status})");
    }
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker: installed, but `{} --version` does not run",
            bpf_linker_path().display()
        );
    }
    Ok(true)
}

/// Packages from `wanted` that `dpkg-query -W -f '${Package} ${db:Status-Abbrev}\n'`
/// does not list as installed (`ii`).
pub(crate) fn missing_packages<'a>(dpkg_out: &str, wanted: &[&'a str]) -> Vec<&'a str> {
    let installed: Vec<&str> = dpkg_out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            (f.next()? == "ii").then(|| name.split(':').next().unwrap_or(name))
        })
        .collect();
    wanted
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect()
}

/// Runs an apt command as root, through `sudo` when not root.
pub(crate) fn apt(args: &[&str], what: &str) -> Result<String> {
    let mut cmd = if is_root() {
        Command::new(args[0])
    } else if find_in_path("sudo").is_some() {
        let mut c = Command::new("sudo");
        c.arg("-n").arg(args[0]);
        c
    } else {
        bail!("{what}: needs root (run as root, or install sudo)");
    };
    run(
        cmd.args(&args[1..]).env("DEBIAN_FRONTEND", "noninteractive"),
        what,
    )
}

fn ensure_apt_packages() -> Result<bool> {
    // dpkg-query exits 1 when a package is unknown, but still lists the others.
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Abbrev}\\n"])
        .args(APT_PACKAGES)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("Debian packages: cannot run dpkg-query (setup supports Debian only)")?;
    let missing = missing_packages(&String::from_utf8_lossy(&out.stdout), APT_PACKAGES);
    if missing.is_empty() {
        return Ok(false);
    }
    println!("setup: apt: installing {}", missing.join(" "));
    apt(&["apt-get", "update", "-q"], "apt-get update")?;
    let mut args = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args, &format!("Debian packages {}", missing.join(" ")))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_feature_from_rustc() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_feature(vv).as_deref(), Some("llvm-22"));
        assert_eq!(llvm_feature("rustc 1.0\n"), None);
    }

    #[test]
    fn missing_packages_from_dpkg_query() {
        let out = "curl ii \npython3:amd64 ii \nstrace un \n";
        assert_eq!(
            missing_packages(out, &["curl", "python3", "strace", "cpio"]),
            vec!["strace", "cpio"]
        );
    }
}
