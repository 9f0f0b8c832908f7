//! The client side of the daemon's control socket: `pep-agent sandbox ...`,
//! `status`, and `run` through the daemon (an ordinary user gets a sandbox
//! without root).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::{net::UnixStream, process::CommandExt as _},
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

/// `sandbox list` as a table.
pub fn list_table(data: &serde_json::Value) -> Option<String> {
    let list: Vec<SandboxInfo> = serde_json::from_value(data.clone()).ok()?;
    let mut out = format!("{:<24} {:<8} {:<24} {:>6} {:<10} {}\n", "NAME", "OWNER", "POLICY", "PIDS", "GEN", "CGROUP");
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
    let cmd0 = opts.cmd.first().ok_or_else(|| anyhow::anyhow!("no command given after --"))?;
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
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .take(40)
            .collect();
        format!("{stem}-{}", std::process::id())
    });
    let (gate_r, gate_w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (rfd, wfd) = (gate_r.as_raw_fd(), gate_w.as_raw_fd());
    let mut command = std::process::Command::new(cmd0);
    command.arg0(cmd0).args(&opts.cmd[1..]);
    // SAFETY: only close(2), read(2) and _exit(2) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Our copy of the write end would keep the gate open forever
            // if the client died.
            libc::close(wfd);
            let mut b = [0u8; 1];
            if libc::read(rfd, b.as_mut_ptr().cast(), 1) != 1 {
                // The client went away without releasing us: never exec.
                libc::_exit(126);
            }
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(command)
        .spawn()
        .map_err(|e| anyhow::anyhow!("{cmd0}: {e}"))?;
    drop(gate_r);
    let pid = child.id().ok_or_else(|| anyhow::anyhow!("the child has no pid"))?;
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
        let _ = child.wait().await;
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
        st = child.wait() => st.ok(),
        _ = term.recv() => None,
        _ = int.recv() => None,
        _ = hup.recv() => None,
    };
    let socket = opts.socket.clone();
    let del = Request::Delete { name };
    let _ = tokio::task::spawn_blocking(move || call(&socket, &del)).await;
    let code = match status {
        Some(s) => {
            use std::os::unix::process::ExitStatusExt as _;
            s.code().or_else(|| s.signal().map(|n| 128 + n)).unwrap_or(1)
        }
        None => {
            let _ = child.wait().await;
            143
        }
    };
    Ok(code)
}
