//! A `pep-agent daemon` of a test's own: its own config, socket, pin
//! directory (`/sys/fs/bpf/pep-test-<pid>-<n>`), state and audit files in a
//! scratch directory and its own cgroup parent, so daemon tests run in
//! parallel with every other test and clean up after themselves.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{Scratch, pep_agent_bin};

static N: AtomicU32 = AtomicU32::new(0);

pub struct TestDaemon {
    pub scratch: Scratch,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub audit: PathBuf,
    pub cgroup_parent: String,
    pub metrics: Option<String>,
    pub child: Option<Child>,
    pub extra_env: Vec<(String, String)>,
    starts: u32,
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl TestDaemon {
    /// A daemon config with `policies` (name, YAML text) written beside it,
    /// `extra` appended to the config (YAML), and metrics on a free port
    /// when `metrics`. Not started.
    pub fn new(tag: &str, policies: &[(&str, &str)], extra: &str, metrics: bool) -> Self {
        let scratch = Scratch::new(tag);
        // Readable by the ordinary users some tests run clients as.
        let _ = std::fs::set_permissions(&scratch.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755));
        let n = N.fetch_add(1, Ordering::SeqCst);
        let id = format!("pep-test-{}-{n}", std::process::id());
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{id}"));
        let socket = scratch.dir.join("agent.sock");
        let audit = scratch.dir.join("audit.jsonl");
        let metrics = metrics.then(|| format!("127.0.0.1:{}", free_port()));
        let mut cfg = format!(
            "socket: {}\npin_dir: {}\nstate_dir: {}\ncgroup_parent: {id}\naudit:\n  path: {}\n",
            socket.display(),
            pin_dir.display(),
            scratch.dir.join("state").display(),
            audit.display()
        );
        if let Some(m) = &metrics {
            cfg.push_str(&format!("metrics:\n  listen: \"{m}\"\n"));
        }
        if !policies.is_empty() {
            cfg.push_str("policies:\n");
            for (name, text) in policies {
                let p = scratch.write(&format!("{name}.yaml"), text);
                cfg.push_str(&format!("  {name}: {}\n", p.display()));
            }
        }
        cfg.push_str(extra);
        let config = scratch.write("config.yaml", &cfg);
        Self {
            scratch,
            config,
            socket,
            pin_dir,
            audit,
            cgroup_parent: id,
            metrics,
            child: None,
            extra_env: Vec::new(),
            starts: 0,
        }
    }

    /// The policy file of a named policy.
    pub fn policy_path(&self, name: &str) -> PathBuf {
        self.scratch.dir.join(format!("{name}.yaml"))
    }

    /// Starts the daemon without waiting for it.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.scratch.dir.join(format!("daemon.{}.log", self.starts)))
            .expect("daemon log");
        self.starts += 1;
        let mut cmd = Command::new(pep_agent_bin());
        cmd.args(["daemon", "--config"])
            .arg(&self.config)
            .env("PEP_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        // Its own process group: a test's signals go to the daemon alone.
        cmd.process_group(0);
        // A test killed by a timeout leaves no daemon behind (the thread
        // that spawns it lives as long as the test).
        // SAFETY: prctl(2) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("spawn pep-agent daemon"));
    }

    /// Starts the daemon and waits until it answers.
    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    pub fn wait_ready(&mut self) {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(180);
        loop {
            if self
                .try_request(r#"{"op":"ping"}"#)
                .is_some_and(|r| r["ok"] == true)
            {
                eprintln!("daemon ready after {:?}", started.elapsed());
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!(
                    "the daemon exited with {st} before it was ready:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not get ready:\n{}\n{}",
                self.logs(),
                self.where_it_waits()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where each of the daemon's threads waits in the kernel, for the
    /// message of a daemon that hangs.
    fn where_it_waits(&self) -> String {
        let Some(c) = self.child.as_ref() else {
            return String::new();
        };
        let tasks = format!("/proc/{}/task", c.id());
        let mut out = String::new();
        for t in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
            out.push_str(&format!(
                "--- thread {} {} wchan {}\n{}",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan"),
                read("stack")
            ));
        }
        out
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait().expect("wait daemon");
            assert!(st.success(), "daemon exit {st}:\n{}", self.logs());
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Every log of every start of the daemon.
    pub fn logs(&self) -> String {
        (0..self.starts)
            .map(|i| {
                let p = self.scratch.dir.join(format!("daemon.{i}.log"));
                format!(
                    "--- daemon log {i}\n{}",
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// One request line; the response as JSON, or None when no daemon answered.
    pub fn try_request(&self, line: &str) -> Option<serde_json::Value> {
        let s = UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        let mut w = s.try_clone().ok()?;
        w.write_all(format!("{line}\n").as_bytes()).ok()?;
        let mut r = BufReader::new(s);
        let mut out = String::new();
        r.read_line(&mut out).ok()?;
        serde_json::from_str(&out).ok()
    }

    pub fn request(&self, line: &str) -> serde_json::Value {
        self.try_request(line)
            .unwrap_or_else(|| panic!("no answer to {line}:\n{}", self.logs()))
    }

    /// `pep-agent <args>` against this daemon's socket, as uid:gid when given.
    pub fn cli(&self, as_user: Option<(u32, u32)>, args: &[&str]) -> std::process::Output {
        let mut cmd = match as_user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={gid}"),
                    "--clear-groups",
                    "--",
                ])
                .arg(pep_agent_bin());
                c
            }
            None => Command::new(pep_agent_bin()),
        };
        cmd.args(args).env("PEP_AGENT_SOCKET", &self.socket);
        cmd.output().expect("run pep-agent")
    }

    /// The cgroup directory of sandbox `name` created by this daemon.
    pub fn cgroup(&self, name: &str) -> PathBuf {
        crate::cgroup2_root().join(&self.cgroup_parent).join(name)
    }

    /// `GET path` on the metrics listener: (status, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let addr = self.metrics.as_ref().expect("metrics enabled");
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((status, body))
    }
}

impl TestDaemon {
    /// The kernel counters pinned in its `pin_dir` (they outlive the daemon).
    pub fn counters(&self) -> pep_agent::audit::pipeline::KernelCounters {
        let path = self.pin_dir.join("maps/COUNTERS");
        let data = aya::maps::MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        pep_agent::audit::pipeline::KernelCounters::from_map(&data)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// `pep-agent daemon --uninstall`, which must succeed and leave no pins.
    pub fn uninstall(&self) {
        let u = self.cli(
            None,
            &[
                "daemon",
                "--uninstall",
                "--config",
                self.config.to_str().expect("utf8"),
            ],
        );
        assert!(u.status.success(), "{}", crate::describe(&u));
        assert!(!self.pin_dir.exists(), "pins left at {}", self.pin_dir.display());
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(pep_agent_bin())
            .args(["daemon", "--uninstall", "--config"])
            .arg(&self.config)
            .output();
        let parent = crate::cgroup2_root().join(&self.cgroup_parent);
        if parent.exists() {
            let _ = pep_agent::kernel::cgroup::Cgroup::open(&crate::cgroup2_root(), &parent)
                .map(|mut c| c.destroy());
        }
        let _ = pep_agent::enforcer::pinned::remove_pins(&self.pin_dir);
    }
}

/// How many times a hammer's `probe` came out as `outcome` (`OK`, `EPERM`...).
pub fn count(v: &serde_json::Value, probe: &str, outcome: &str) -> u64 {
    v[probe][outcome].as_u64().unwrap_or(0)
}

/// A process that runs `tests/scripts/daemon_hammer.py` over `probes`
/// inside cgroup `cg`, from before its first instruction.
pub struct Hammer {
    child: Child,
    stop: PathBuf,
    ready: PathBuf,
}

impl Hammer {
    pub fn start(dir: &Path, tag: &str, cg: &Path, probes: &[String]) -> Self {
        let stop = dir.join(format!("{tag}.stop"));
        let ready = dir.join(format!("{tag}.ready"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/daemon_hammer.py");
        let procs = cg.join("cgroup.procs");
        let mut cmd = Command::new("python3");
        cmd.arg(script)
            .arg(&stop)
            .arg(&ready)
            .args(probes)
            .stdout(Stdio::piped());
        // SAFETY: a write(2) to a cgroup file between fork and exec.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, "0"));
        }
        let child = cmd.spawn().expect("spawn hammer");
        let h = Self { child, stop, ready };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !h.ready.exists() {
            assert!(Instant::now() < deadline, "the hammer did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        h
    }

    /// Stops it; the counts per probe and outcome.
    pub fn finish(mut self) -> serde_json::Value {
        std::fs::write(&self.stop, "").expect("stop file");
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("read hammer");
        let _ = self.child.wait();
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("hammer output {out:?}: {e}"))
    }
}

/// Parses a Prometheus/OpenMetrics text exposition: every sample line is
/// `name{labels} value`, every value a number, `# TYPE`/`# HELP` well formed.
/// Returns (name with labels, value) pairs.
pub fn parse_exposition(text: &str) -> Result<Vec<(String, f64)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let ctx = |m: &str| format!("line {}: {m}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut parts = rest.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("EOF") => continue,
                Some("TYPE") => {
                    let _name = parts.next().ok_or_else(|| ctx("TYPE without a name"))?;
                    let kind = parts.next().ok_or_else(|| ctx("TYPE without a type"))?;
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "unknown",
                        "info",
                        "stateset",
                        "gaugehistogram",
                    ]
                    .contains(&kind)
                    {
                        return Err(ctx("unknown metric type"));
                    }
                }
                Some("HELP") | Some("UNIT") => {
                    parts.next().ok_or_else(|| ctx("HELP without a name"))?;
                }
                _ => return Err(ctx("unknown comment")),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| ctx("no value"))?;
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(ctx("bad metric name"));
        }
        if name_end < series.len() && !series.ends_with('}') {
            return Err(ctx("unterminated labels"));
        }
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| ctx("value is not a number"))?,
        };
        out.push((series.to_string(), v));
    }
    Ok(out)
}
