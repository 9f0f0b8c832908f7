//! The client side of the daemon's control socket: `pep-agent sandbox ...`,
//! `status`, and `run` through the daemon (an ordinary user gets a sandbox
//! without root).

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, net::UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use crate::daemon::{
    config::DEFAULT_SOCKET,
    protocol::{Request, Response, SandboxInfo},
};

/// `$PEP_AGENT_SOCKET`, else the default control socket.
pub fn default_socket() -> PathBuf {
    std::env::var_os("PEP_AGENT_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_SOCKET.into())
}

pub struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Self> {
        let w = UnixStream::connect(path)?;
        w.set_read_timeout(Some(timeout))?;
        w.set_write_timeout(Some(timeout))?;
        let r = BufReader::new(w.try_clone()?);
        Ok(Self { w, r })
    }

    pub fn request(&mut self, req: &Request) -> std::io::Result<Response> {
        let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.w.write_all(&line)?;
        let mut resp = String::new();
        if self.r.read_line(&mut resp)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed the connection",
            ));
        }
        serde_json::from_str(&resp).map_err(std::io::Error::other)
    }
}

/// One request on a fresh connection.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    // Reloads of large policies and deletes (which wait for the sandbox's
    // processes to die) may take a while.
    let mut c = Client::connect(socket, Duration::from_secs(60))
        .map_err(|e| anyhow::anyhow!("no daemon at {}: {e}", socket.display()))?;
    Ok(c.request(req)?)
}

/// Whether a daemon answers on `socket`.
pub fn daemon_answers(socket: &Path) -> bool {
    socket.exists()
        && Client::connect(socket, Duration::from_secs(2))
            .and_then(|mut c| c.request(&Request::Ping))
            .is_ok_and(|r| r.ok)
}

/// Prints a response: data as JSON (or through `human`), an error as
/// `pep-agent: <code>: <error>`. Returns the exit status.
pub fn report(resp: &Response, human: impl FnOnce(&serde_json::Value) -> Option<String>) -> i32 {
    if resp.ok {
        match human(&resp.data) {
            Some(s) => print!("{s}"),
            None => println!(
                "{}",
                serde_json::to_string_pretty(&resp.data).expect("values always serialize")
            ),
        }
        0
    } else {
        eprintln!(
            "pep-agent: {}: {}",
            resp.code.as_deref().unwrap_or("error"),
            resp.error.as_deref().unwrap_or("")
        );
        1
    }
}

/// Waits for process `pid`; its status as a shell reports it.
fn wait_pid(pid: u32) -> i32 {
    let mut st = 0;
    loop {
        // SAFETY: waitpid(2) on our own child.
        let rc = unsafe { libc::waitpid(pid as i32, &mut st, 0) };
        if rc == pid as i32 {
            break;
        }
        if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return 1;
        }
    }
    if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else if libc::WIFSIGNALED(st) {
        128 + libc::WTERMSIG(st)
    } else {
        1
    }
}

fn resolve_program(cmd: &str) -> Option<PathBuf> {
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// `sandbox list` as a table.
pub fn list_table(data: &serde_json::Value) -> Option<String> {
    let list: Vec<SandboxInfo> = serde_json::from_value(data.clone()).ok()?;
    let mut out = format!(
        "{:<24} {:<8} {:<24} {:>6} {:<10} {}\n",
        "NAME", "OWNER", "POLICY", "PIDS", "GEN", "CGROUP"
    );
    for s in list {
        out.push_str(&format!(
            "{:<24} {:<8} {:<24} {:>6} {:<10} {}\n",
            s.name,
            s.owner_uid,
            s.policy,
            s.pids.len(),
            s.sandbox_id,
            s.cgroup.display()
        ));
    }
    Some(out)
}

/// What `run` needs to go through the daemon.
#[derive(Debug, Clone)]
pub struct DaemonRun {
    pub socket: PathBuf,
    /// A policy file (sent as its absolute path) or a policy name.
    pub policy: String,
    pub name: Option<String>,
    pub mode: Option<String>,
    pub cmd: Vec<String>,
}

/// `run` through the daemon: the command is forked first and waits on a
/// pipe; the daemon creates the sandbox and moves it in (checking that it
/// is the caller's own process); only then is it released to exec, so it
/// never runs a single instruction outside the sandbox. On exit the sandbox
/// is deleted (the daemon also removes it by itself once empty). Returns
/// the command's exit status as a shell reports it.
pub async fn run_via_daemon(opts: DaemonRun) -> anyhow::Result<i32> {
    let cmd0 = opts
        .cmd
        .first()
        .ok_or_else(|| anyhow::anyhow!("no command given after --"))?;
    let policy = match std::fs::canonicalize(&opts.policy) {
        Ok(p) if p.is_file() => p.display().to_string(),
        _ => opts.policy.clone(),
    };
    let name = opts.name.clone().unwrap_or_else(|| {
        let stem = Path::new(&opts.policy)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "run".into());
        let stem: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        format!("{stem}-{}", std::process::id())
    });
    let program = resolve_program(cmd0).ok_or_else(|| anyhow::anyhow!("{cmd0}: command not found"))?;
    let (gate_r, gate_w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (rfd, wfd) = (gate_r.as_raw_fd(), gate_w.as_raw_fd());
    // Prepared before fork: the child makes only async-signal-safe calls.
    let path = CString::new(program.as_os_str().as_bytes())?;
    let argv: Vec<CString> = opts
        .cmd
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    // Not `Command::spawn`: it returns only once the child has exec'd, and
    // ours must not exec before the daemon has placed it.
    // SAFETY: fork(2); the child only calls close, read, execv and _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        anyhow::bail!("fork: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: async-signal-safe calls on buffers prepared before fork.
        unsafe {
            // Our copy of the write end would keep the gate open forever
            // if the client died.
            libc::close(wfd);
            let mut b = [0u8; 1];
            if libc::read(rfd, b.as_mut_ptr().cast(), 1) != 1 {
                // The client went away without releasing us: never exec.
                libc::_exit(126);
            }
            libc::close(rfd);
            libc::execv(path.as_ptr(), argv_ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    drop(gate_r);
    let pid = pid as u32;
    let mut child = tokio::task::spawn_blocking(move || wait_pid(pid));
    let socket = opts.socket.clone();
    let req = Request::Create {
        name: name.clone(),
        policy,
        pid: Some(pid),
        mode: opts.mode.clone(),
        ephemeral: true,
    };
    let resp = tokio::task::spawn_blocking(move || call(&socket, &req)).await??;
    if !resp.ok {
        drop(gate_w); // the child sees EOF and exits without exec
        let _ = child.await;
        anyhow::bail!(
            "the daemon refused the sandbox: {}: {}",
            resp.code.unwrap_or_default(),
            resp.error.unwrap_or_default()
        );
    }
    nix::unistd::write(&gate_w, b"1")?;
    drop(gate_w);
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let status = tokio::select! {
        st = &mut child => st.ok(),
        _ = term.recv() => None,
        _ = int.recv() => None,
        _ = hup.recv() => None,
    };
    let socket = opts.socket.clone();
    let del = Request::Delete { name };
    // Deleting the sandbox kills what is left in it.
    let _ = tokio::task::spawn_blocking(move || call(&socket, &del)).await;
    let code = match status {
        Some(code) => code,
        None => {
            let _ = child.await;
            143
        }
    };
    Ok(code)
}

/// `pep-agent sandbox ...`.
#[derive(Debug, clap::Subcommand)]
pub enum SandboxCmd {
    /// A new sandbox cgroup under a policy (a configured name, or for root a
    /// file); with --pid, moves that process (yours) into it.
    Create {
        name: String,
        #[arg(long)]
        policy: String,
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, value_parser = ["enforce", "audit"])]
        mode: Option<String>,
    },
    /// Adopts an existing cgroup (--cgroup, e.g. a systemd unit's, or the
    /// cgroup of --pid) as a sandbox; or moves --pid into sandbox NAME.
    Attach {
        name: String,
        #[arg(long)]
        policy: Option<String>,
        #[arg(long, conflicts_with = "pid")]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long, value_parser = ["enforce", "audit"])]
        mode: Option<String>,
    },
    /// The sandboxes you may see (root: all).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Removes a sandbox (a created cgroup is killed and removed; an
    /// adopted one released).
    Delete { name: String },
    /// Reads the policies again and replaces them atomically (one sandbox,
    /// or the config and all of them).
    Reload { name: Option<String> },
}

fn policy_arg(p: String) -> String {
    // A file is sent as its absolute path (the daemon has another cwd).
    match std::fs::canonicalize(&p) {
        Ok(abs) if abs.is_file() => abs.display().to_string(),
        _ => p,
    }
}

/// Runs a `sandbox` subcommand against the daemon; returns the exit status.
pub fn sandbox_main(socket: &Path, cmd: SandboxCmd) -> i32 {
    let mut table = false;
    let req = match cmd {
        SandboxCmd::Create {
            name,
            policy,
            pid,
            mode,
        } => Request::Create {
            name,
            policy: policy_arg(policy),
            pid,
            mode,
            ephemeral: false,
        },
        SandboxCmd::Attach {
            name,
            policy,
            cgroup,
            pid,
            mode,
        } => Request::Attach {
            name,
            policy: policy.map(policy_arg),
            cgroup: cgroup.map(|c| std::fs::canonicalize(&c).unwrap_or(c)),
            pid,
            mode,
        },
        SandboxCmd::List { json } => {
            table = !json;
            Request::List
        }
        SandboxCmd::Delete { name } => Request::Delete { name },
        SandboxCmd::Reload { name } => Request::Reload { name },
    };
    match call(socket, &req) {
        Ok(resp) => report(&resp, |d| if table { list_table(d) } else { None }),
        Err(e) => {
            eprintln!("pep-agent: {e:#}");
            2
        }
    }
}

/// `pep-agent status`: what the daemon has loaded, its sandboxes, counters.
pub fn status_main(socket: &Path) -> i32 {
    match call(socket, &Request::Status) {
        Ok(resp) => report(&resp, |_| None),
        Err(e) => {
            eprintln!("pep-agent: {e:#}");
            2
        }
    }
}

/// `pep-agent daemon [--config FILE] [--uninstall]`.
pub fn daemon_main(config: Option<PathBuf>, uninstall: bool) -> i32 {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("pep-agent: the daemon needs root (it loads eBPF programs)");
        return 2;
    }
    if uninstall {
        return match crate::daemon::uninstall(config.as_deref()) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("pep-agent: {e:#}");
                1
            }
        };
    }
    // Multi-threaded: requests run their short blocking kernel calls in
    // place while the audit, metrics and other clients' tasks go on.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pep-agent: {e}");
            return 1;
        }
    };
    match rt.block_on(crate::daemon::run(config)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pep-agent: daemon: {e:#}");
            1
        }
    }
}
