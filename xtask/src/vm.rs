//! One QEMU guest boot that runs a list of commands on a real Debian 6.1 kernel (BPF LSM,
//! fentry and kprobes work there; the host kernel refuses them).
//!
//! The guest sees the host's whole filesystem read-only over 9p and chroots into it, so it
//! runs the very binaries built on the host. A second, writable 9p export is a fresh
//! per-run results directory: the host writes the command script (`run.sh`) into it before
//! boot, the guest writes each command's output and exit status back. That keeps the
//! initramfs independent of the commands, so it is built once by `setup`.
//!
//! Layout of a run directory (`target/vm-runs/<id>/`):
//! `run.sh` (the generated script), `ready` (the guest came up), `<i>.out` (stdout+stderr
//! of command i), `<i>.rc` (its exit status, written when it finished), `console.log`
//! (the serial console), `qemu.log` (QEMU's own stdout/stderr).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::setup;
use crate::vm_image::{self, GuestImage};

/// Every line the guest's own scripts write to the serial console starts with this, so it
/// stands apart from firmware banners and kernel messages.
pub const CONSOLE_PREFIX: &str = "[pep-vm]";

/// How many run directories to keep under `vm-runs/` (older ones are removed).
const KEEP_RUNS: usize = 20;

/// One command to run in the guest, chrooted into the host's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCommand {
    /// Label used in reports and on the console.
    pub name: String,
    /// Program and arguments; the program is looked up in the guest's `PATH`.
    pub argv: Vec<String>,
    /// Added to (and overriding) the guest's base environment, see [`run_in_vm`].
    pub env: Vec<(String, String)>,
    /// Working directory, a host path (visible read-only in the guest).
    pub cwd: PathBuf,
}

impl VmCommand {
    /// A command with no extra environment, run from the workspace root.
    pub fn new<S: Into<String>>(name: impl Into<String>, argv: impl IntoIterator<Item = S>) -> Self {
        VmCommand {
            name: name.into(),
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: workspace_root(),
        }
    }
}

/// What became of one [`VmCommand`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmResult {
    pub name: String,
    /// The exit status (128+N when killed by signal N); `None` when the command never
    /// finished (timeout, or the guest died).
    pub exit_code: Option<i32>,
    /// stdout and stderr, interleaved. For a command that did not finish, followed by a
    /// note saying why and the tail of the serial console.
    pub output: String,
}

impl VmResult {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// Says what is missing for [`run_in_vm`], or Ok.
pub fn vm_available() -> Result<()> {
    let mut missing = Vec::new();
    if setup::find_in_path("qemu-system-x86_64").is_none() {
        missing.push("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)".to_owned());
    }
    if let Err(e) = vm_image::guest_kernel() {
        missing.push(format!("{e:#}"));
    }
    if !Path::new(setup::BUSYBOX).is_file() {
        missing.push(format!(
            "{} is missing (Debian package busybox-static)",
            setup::BUSYBOX
        ));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        bail!(
            "cannot run a QEMU guest: {}; run `cargo xtask setup`",
            missing.join("; ")
        )
    }
}

/// Boots the guest once, runs `cmds` in order, powers it off, and reports each command.
///
/// Each command runs as root, chrooted into the host's root (read-only), with: proc, sysfs,
/// devtmpfs (+devpts, /dev/shm), tmpfs on `/tmp` and `/run`, securityfs, bpffs at
/// `/sys/fs/bpf`, cgroup2 at `/sys/fs/cgroup`, debugfs and tracefs mounted; loopback up;
/// kernel module autoloading working (e.g. nf_tables, veth). Its base environment is
/// `HOME` (the host's), `PATH`, `USER`, `LOGNAME`, `LANG=C.UTF-8`, `TERM=dumb`, `PEP_VM=1`,
/// `PEP_VM_RESULTS` (the run directory, writable from the guest at that same path) and
/// `PEP_VM_KERNEL` (the guest's kernel release); `cmd.env` comes on top.
///
/// `timeout` covers the whole boot (about 2 s of it is the guest coming up). After it QEMU
/// is killed; commands that did not finish get `exit_code: None`.
/// An error means the guest could not be run at all (no QEMU, no kernel, it did not boot).
pub fn run_in_vm(cmds: &[VmCommand], timeout: Duration) -> Result<Vec<VmResult>> {
    vm_available()?;
    let image = vm_image::guest_image()?;
    let run_dir = new_run_dir()?;
    let script = run_script(cmds, &run_dir, &base_env(&run_dir, &image.release))?;
    fs::write(run_dir.join("run.sh"), script).context("cannot write run.sh")?;

    let qemu_log = fs::File::create(run_dir.join("qemu.log")).context("cannot create qemu.log")?;
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(qemu_args(&image, &run_dir))
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone()?)
        .stderr(qemu_log)
        .spawn()
        .context("cannot start qemu-system-x86_64")?;

    let ready = run_dir.join("ready");
    let mut booted = None;
    let exit = loop {
        if booted.is_none() && ready.exists() {
            booted = Some(started.elapsed());
        }
        if let Some(status) = child.try_wait().context("waiting for qemu")? {
            break Some(status);
        }
        if started.elapsed() >= timeout {
            // Killing is the point here; an error only means it already exited.
            let _ = child.kill();
            child.wait().context("waiting for the killed qemu")?;
            break None;
        }
        sleep(Duration::from_millis(20));
    };
    let total = started.elapsed();
    if booted.is_none() && ready.exists() {
        booted = Some(total);
    }

    let console = fs::read(run_dir.join("console.log")).unwrap_or_default();
    let tail = console_tail(&String::from_utf8_lossy(&console), 40);
    let Some(booted) = booted else {
        let qemu_out = fs::read_to_string(run_dir.join("qemu.log")).unwrap_or_default();
        let how = match exit {
            Some(status) => format!("qemu exited ({status})"),
            None => format!("timed out after {}s", timeout.as_secs_f32()),
        };
        bail!(
            "the QEMU guest did not come up: {how} (run directory {}){}\n--- serial console tail ---\n{tail}",
            run_dir.display(),
            if qemu_out.trim().is_empty() {
                String::new()
            } else {
                format!("\n--- qemu ---\n{}", qemu_out.trim())
            },
        );
    };
    let why_unfinished = match exit {
        None => format!(
            "timed out after {:.1}s and QEMU was killed",
            timeout.as_secs_f32()
        ),
        Some(_) => "the guest stopped before this command finished".to_owned(),
    };
    let results = collect_results(cmds, &run_dir, &why_unfinished, &tail);
    let finished = results.iter().filter(|r| r.exit_code.is_some()).count();
    eprintln!(
        "vm: guest up in {:.1}s, {finished}/{} commands finished, {:.1}s in all ({})",
        booted.as_secs_f32(),
        cmds.len(),
        total.as_secs_f32(),
        run_dir.display()
    );
    Ok(results)
}

/// Reads what the guest wrote for each command.
fn collect_results(
    cmds: &[VmCommand],
    run_dir: &Path,
    why_unfinished: &str,
    console_tail: &str,
) -> Vec<VmResult> {
    cmds.iter()
        .enumerate()
        .map(|(i, cmd)| {
            let mut output = fs::read(run_dir.join(format!("{i}.out")))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            let exit_code = fs::read_to_string(run_dir.join(format!("{i}.rc")))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            if exit_code.is_none() {
                if !output.is_empty() && !output.ends_with('\n') {
                    output.push('\n');
                }
                let _ = writeln!(
                    output,
                    "{CONSOLE_PREFIX} {why_unfinished} ({})\n--- serial console tail ---\n{console_tail}",
                    run_dir.display()
                );
            }
            VmResult {
                name: cmd.name.clone(),
                exit_code,
                output,
            }
        })
        .collect()
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Where run directories go: the cargo target directory, unless that is under /tmp (the
/// guest mounts its own tmpfs there, so it would not see it), then the cache.
pub fn runs_root() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| workspace_root().join("target"));
    if target.starts_with("/tmp") {
        setup::cache_dir().join("vm-runs")
    } else {
        target.join("vm-runs")
    }
}

fn new_run_dir() -> Result<PathBuf> {
    let root = runs_root();
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    prune_runs(&root);
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let base = format!(
        "{}-{:09}-{}",
        stamp.as_secs(),
        stamp.subsec_nanos(),
        std::process::id()
    );
    let dir = root.join(base);
    fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // The guest sees this path through the host root export, so it must be canonical.
    dir.canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))
}

/// Removes all but the newest [`KEEP_RUNS`] run directories (names sort by time).
fn prune_runs(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(KEEP_RUNS - 1);
    for dir in &dirs[..excess] {
        // Best effort: a directory that cannot be removed does no harm.
        let _ = fs::remove_dir_all(dir);
    }
}

/// The environment every guest command starts from.
fn base_env(run_dir: &Path, release: &str) -> Vec<(String, String)> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".to_owned());
    let path = format!("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{home}/.cargo/bin");
    [
        ("HOME", home.as_str()),
        ("PATH", path.as_str()),
        ("USER", "root"),
        ("LOGNAME", "root"),
        ("LANG", "C.UTF-8"),
        ("TERM", "dumb"),
        ("PEP_VM", "1"),
        ("PEP_VM_RESULTS", &run_dir.to_string_lossy()),
        ("PEP_VM_KERNEL", release),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn qemu_args(image: &GuestImage, run_dir: &Path) -> Vec<String> {
    // QEMU option values are comma-separated; a literal comma is written twice.
    let opt_path = |p: &Path| p.to_string_lossy().replace(',', ",,");
    let mut args: Vec<String> = [
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "2048",
        "-smp",
        "2",
        // No default NIC, VGA, floppy...: fewer devices to probe and no option ROM banner.
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend([
        "-chardev".to_owned(),
        format!("file,id=console,path={}", opt_path(&run_dir.join("console.log"))),
        "-serial".to_owned(),
        "chardev:console".to_owned(),
        "-kernel".to_owned(),
        image.kernel.to_string_lossy().into_owned(),
        "-initrd".to_owned(),
        image.initrd.to_string_lossy().into_owned(),
        "-append".to_owned(),
        // softlockup_panic: a guest kernel that locks up stops at once (the
        // harness reports the command as unfinished, with the console tail)
        // instead of burning the whole timeout. tsc=reliable: under TCG the
        // guest otherwise drops the TSC (its watchdog sees emulation jitter)
        // and falls back to the HPET, where every clock read, the kernel's
        // and the vDSO's, is an emulated device access costing microseconds:
        // a distortion of every timed path that hardware does not have.
        "console=ttyS0 panic=-1 softlockup_panic=1 quiet rdinit=/init tsc=reliable".to_owned(),
        // The host root spans several devices: remap inode numbers so they stay unique.
        "-fsdev".to_owned(),
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap".to_owned(),
        "-device".to_owned(),
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot".to_owned(),
        "-fsdev".to_owned(),
        format!(
            "local,id=results,path={},security_model=none,multidevs=remap",
            opt_path(run_dir)
        ),
        "-device".to_owned(),
        "virtio-9p-pci,fsdev=results,mount_tag=results".to_owned(),
    ]);
    args
}

/// Quotes `s` for a POSIX shell.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The per-run script, sourced by the guest's `/init` (busybox sh, outside the chroot)
/// once the host root is mounted at `/host` and the results export at `/results`.
pub(crate) fn run_script(
    cmds: &[VmCommand],
    run_dir: &Path,
    base_env: &[(String, String)],
) -> Result<String> {
    let host_cwd = std::env::current_dir().unwrap_or_else(|_| workspace_root());
    let run_dir = run_dir.to_string_lossy();
    let mut s = String::new();
    s.push_str("# Generated by xtask (vm.rs) for one guest boot; sourced by the guest's /init.\n");
    // Bind the writable export over the run directory's own path, so commands can write
    // there under the same path the host sees.
    let _ = writeln!(
        s,
        "mount --bind /results {} || say 'cannot bind the results export'",
        sh_quote(&format!("/host{run_dir}"))
    );
    s.push_str(": > /results/ready\n");
    let n = cmds.len();
    for (i, cmd) in cmds.iter().enumerate() {
        if cmd.argv.is_empty() {
            bail!("VM command {:?} has an empty argv", cmd.name);
        }
        let mut env = String::new();
        for (k, v) in base_env.iter().chain(&cmd.env) {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                bail!("VM command {:?}: bad environment variable name {k:?}", cmd.name);
            }
            env.push(' ');
            env.push_str(&sh_quote(&format!("{k}={v}")));
        }
        let cwd = host_cwd.join(&cmd.cwd);
        let argv: Vec<String> = cmd.argv.iter().map(|a| sh_quote(a)).collect();
        let label = format!("{}/{n} {}", i + 1, cmd.name);
        let _ = write!(
            s,
            "say {start}\n\
             env -i{env} chroot /host /bin/sh -c 'cd \"$1\" || exit 127; shift; exec \"$@\"' pep-vm {cwd} {argv} \
             </dev/null >/results/{i}.out 2>&1\n\
             rc=$?; echo $rc > /results/{i}.rc\n\
             say {end} \"$rc\"\n",
            start = sh_quote(&format!("start {label}")),
            end = sh_quote(&format!("end {label}: exit")),
            cwd = sh_quote(&cwd.to_string_lossy()),
            argv = argv.join(" "),
        );
    }
    Ok(s)
}

/// The last `lines` lines of the console log, without terminal escape sequences and
/// carriage returns (QEMU's firmware and resets put them there).
pub(crate) fn console_tail(log: &str, lines: usize) -> String {
    let clean = strip_escapes(log);
    let all: Vec<&str> = clean
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ params final-byte; other escapes: ESC + one char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn run_script_has_one_block_per_command() {
        let cmds = vec![
            VmCommand {
                name: "first".into(),
                argv: vec!["echo".into(), "it's".into()],
                env: vec![("X".into(), "1 2".into())],
                cwd: "/work".into(),
            },
            VmCommand {
                name: "second".into(),
                argv: vec!["false".into()],
                env: vec![],
                cwd: "/".into(),
            },
        ];
        let base = vec![("PATH".to_owned(), "/bin".to_owned())];
        let s = run_script(&cmds, Path::new("/w/target/vm-runs/1"), &base).unwrap();
        assert!(
            s.contains("mount --bind /results '/host/w/target/vm-runs/1'"),
            "{s}"
        );
        assert!(s.contains("env -i 'PATH=/bin' 'X=1 2' chroot /host"), "{s}");
        assert!(
            s.contains(r"pep-vm '/work' 'echo' 'it'\''s' </dev/null >/results/0.out 2>&1"),
            "{s}"
        );
        assert!(s.contains("echo $rc > /results/1.rc"), "{s}");
        assert!(s.contains("say 'start 2/2 second'"), "{s}");
        // The ready marker comes before any command.
        assert!(s.find(": > /results/ready").unwrap() < s.find("say 'start").unwrap());
    }

    #[test]
    fn run_script_rejects_bad_input() {
        let empty = VmCommand {
            name: "e".into(),
            argv: vec![],
            env: vec![],
            cwd: "/".into(),
        };
        assert!(run_script(&[empty], Path::new("/r"), &[]).is_err());
        let bad_env = VmCommand {
            name: "b".into(),
            argv: vec!["true".into()],
            env: vec![("A=B".into(), "c".into())],
            cwd: "/".into(),
        };
        assert!(run_script(&[bad_env], Path::new("/r"), &[]).is_err());
    }

    #[test]
    fn console_tail_drops_escapes() {
        let log =
            "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\nBooting from ROM..[pep-vm] init\r\n\r\nline2\nline3\n";
        assert_eq!(console_tail(log, 2), "line2\nline3");
        assert_eq!(
            console_tail(log, 10),
            "SeaBIOS\nBooting from ROM..[pep-vm] init\nline2\nline3"
        );
    }
}
