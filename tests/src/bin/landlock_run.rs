//! The Landlock peer of the file benchmarks: restricts itself to an
//! allowlist of directory trees, then execs a command.
//!
//! `landlock_run [--allow DIR]... [--allow-from FILE] -- CMD [ARG]...`
//!
//! Every filesystem right Landlock ABI v2 knows (Linux 5.19+: execute,
//! read, write, create, remove, rename across directories) is handled, and
//! granted only beneath the listed directories (`--allow-from`: one per
//! line). Fails (exit 2) rather than running the command unrestricted if
//! the kernel cannot enforce all of it.
//!
//! The directories stay open (`O_PATH`) across the exec: a Landlock rule
//! names an inode, and 9p without a cache (the test VM's view of the host)
//! makes a new inode on every lookup of a path nobody holds, so an allowed
//! tree there would stop matching once the launcher let go of it (checked:
//! `cat /etc/hostname` is then refused under `--allow /etc`). 9p reports
//! the host's file system type to statfs, so all are kept, and the soft
//! limit on open files raised to the hard one to make room.

use std::{
    ffi::CString,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use landlock::{
    ABI, Access as _, AccessFs, CompatLevel, Compatible as _, PathBeneath, Ruleset, RulesetAttr as _,
    RulesetCreatedAttr as _, RulesetStatus,
};

struct Args {
    allow: Vec<PathBuf>,
    cmd: Vec<String>,
}

fn parse(argv: &[String]) -> Result<Args> {
    let mut allow = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--allow" => allow.push(PathBuf::from(it.next().context("--allow needs a directory")?)),
            "--allow-from" => {
                let f = it.next().context("--allow-from needs a file")?;
                let text = std::fs::read_to_string(f).with_context(|| format!("--allow-from {f}"))?;
                allow.extend(text.lines().filter(|l| !l.trim().is_empty()).map(PathBuf::from));
            }
            "--" => {
                let cmd: Vec<String> = it.cloned().collect();
                ensure!(!cmd.is_empty(), "no command after --");
                return Ok(Args { allow, cmd });
            }
            other => bail!("unknown argument {other}"),
        }
    }
    bail!("usage: landlock_run [--allow DIR]... [--allow-from FILE] -- CMD [ARG]...")
}

/// `O_PATH` without `O_CLOEXEC`: the descriptor can outlive the exec.
fn open_kept(dir: &Path) -> Result<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: a valid C string; the result is checked before use.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("{}", dir.display()));
    }
    // SAFETY: a descriptor we just opened and own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn restrict(allow: &[PathBuf]) -> Result<Vec<OwnedFd>> {
    let abi = ABI::V2;
    let access = AccessFs::from_all(abi);
    let fds = allow.iter().map(|d| open_kept(d)).collect::<Result<Vec<_>>>()?;
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(access)?
        .create()?
        .add_rules(
            fds.iter()
                .map(|fd| Ok::<_, landlock::RulesetError>(PathBeneath::new(fd, access))),
        )?
        .restrict_self()?;
    ensure!(
        status.ruleset == RulesetStatus::FullyEnforced,
        "Landlock is not fully enforced: {status:?}"
    );
    Ok(fds)
}

/// Raises the soft limit on open files to the hard one: the kept directories
/// must not leave the command short of descriptors.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer, then the same struct back.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("landlock_run: {e:#}");
            std::process::exit(1);
        }
    };
    raise_nofile();
    let _kept = match restrict(&args.allow) {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("landlock_run: {e:#}");
            std::process::exit(2);
        }
    };
    let err = Command::new(&args.cmd[0]).args(&args.cmd[1..]).exec();
    eprintln!("landlock_run: {}: {err}", args.cmd[0]);
    std::process::exit(127);
}
