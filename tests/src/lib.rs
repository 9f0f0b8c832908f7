//! Helpers shared by the integration tests: the pep-agent binary, policy
//! files, loopback servers, probes, and audit logs.

/// A test's own `pep-agent daemon` (issue 6).
pub mod daemon;
/// A `pep-agent pdp serve` of a test's own (the remote PDP).
pub mod pdp;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

/// The `pep-agent` binary: `$PEP_AGENT_BIN`, or the one beside this test's
/// target directory (xtask builds it before running the tests).
pub fn pep_agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PEP_AGENT_BIN") {
        return PathBuf::from(p);
    }
    // target/debug/deps/<test> -> target/debug/pep-agent
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("pep-agent");
    assert!(
        bin.exists(),
        "{} missing: build pep-agent first (cargo build -p pep-agent)",
        bin.display()
    );
    bin
}

/// The network probe script.
pub fn net_probe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/net_probe.py")
}

/// A fresh scratch directory, removed on drop. Not under /tmp when running
/// in the VM is the caller's concern: the guest's /tmp is a fresh tmpfs,
/// which is fine for scratch files.
pub struct Scratch {
    pub dir: PathBuf,
}

static SCRATCH_N: AtomicU32 = AtomicU32::new(0);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let n = SCRATCH_N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("pep-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self { dir }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write scratch file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP server on `addr` (port 0 picks one) answering every connection
/// with a minimal HTTP 200, in a background thread, for the test's life.
pub fn tcp_server(addr: &str) -> SocketAddr {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let local = l.local_addr().expect("local_addr");
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 1024];
                let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(200)));
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
            });
        }
    });
    local
}

/// A UDP socket bound on `addr`, kept open for the test's life.
pub fn udp_server(addr: &str) -> SocketAddr {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let local = s.local_addr().expect("local_addr");
    thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while s.recv_from(&mut buf).is_ok() {}
    });
    local
}

/// `pep-agent run --policy <policy> <extra...> -- <cmd...>`.
pub fn pep_run(policy: &Path, extra: &[&str], cmd: &[&str]) -> Output {
    Command::new(pep_agent_bin())
        .arg("run")
        .arg("--policy")
        .arg(policy)
        .args(extra)
        .arg("--")
        .args(cmd)
        .output()
        .expect("spawn pep-agent")
}

/// Probe results: one "OP HOST PORT RESULT" line each, as a list of RESULT.
pub fn probe_results(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.rsplit(' ').next().map(String::from))
        .collect()
}

/// The records of an audit log.
pub fn read_audit(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad record {l}: {e}")))
        .collect()
}

/// Context for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The cgroup2 mount.
pub fn cgroup2_root() -> PathBuf {
    pep_agent::kernel::cgroup::cgroup2_root().expect("cgroup2 mounted")
}

/// Sandbox cgroups that standalone runs of process `pid` left behind.
pub fn leftover_cgroups(pid: u32) -> Vec<PathBuf> {
    let parent = cgroup2_root().join("pep-agent");
    std::fs::read_dir(&parent)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == pid.to_string().as_str()))
                .collect()
        })
        .unwrap_or_default()
}

/// The file probe script.
pub fn file_probe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/file_probe.py")
}

/// Runs the file probe under `policy` with (op, argument) pairs; returns one
/// RESULT per probe.
pub fn probes(policy: &Path, extra: &[&str], ops: &[(&str, String)]) -> (Vec<String>, Output) {
    let mut cmd: Vec<String> = vec!["python3".into(), file_probe().display().to_string()];
    for (op, a) in ops {
        cmd.extend([op.to_string(), a.clone()]);
    }
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = pep_run(policy, extra, &cmd);
    (probe_results(&out), out)
}

/// As `probes`, with paths as the arguments.
pub fn file_probes(policy: &Path, extra: &[&str], ops: &[(&str, &Path)]) -> (Vec<String>, Output) {
    let ops: Vec<(&str, String)> = ops.iter().map(|(op, p)| (*op, p.display().to_string())).collect();
    probes(policy, extra, &ops)
}

/// Starts `pep-agent run` under `policy` with a shell that idles until
/// `stop` exists, and gives the programs half a second to attach: a sandbox
/// held open while the test acts from outside it.
pub fn idle_sandbox(policy: &Path, stop: &Path) -> std::process::Child {
    let child = std::process::Command::new(pep_agent_bin())
        .args(["run", "--policy"])
        .arg(policy)
        .args(["--", "sh", "-c"])
        .arg(format!("while [ ! -e {} ]; do sleep 0.05; done", stop.display()))
        .spawn()
        .expect("spawn pep-agent run");
    std::thread::sleep(std::time::Duration::from_millis(500));
    child
}
