//! Connect latency under the network hooks, as ratios against the same work
//! unsandboxed, measured interleaved in one run (A B A B ...).
//!
//! Workers are this same binary started with `--worker`: one inside a
//! sandbox cgroup carrying the programs and N compiled rules, one in a sibling
//! cgroup without programs (the baseline), and one outside the sandbox while
//! the agent is loaded. The parent asks each in turn for a batch of timed
//! operations against a loopback server, round after round.
//!
//! `cargo bench -p pep-tests --bench net_connect [-- --quick]`

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Instant,
};

use pep_agent::{
    compiler,
    enforcer::{Enforcer, LoadOptions, SandboxSpec},
    kernel::cgroup::{Cgroup, cgroup2_root},
    policy::{LoadContext, load_str},
};
use pep_common::sandbox::{MODE_ENFORCE, SandboxConfig};

fn worker() {
    // Protocol: one line "OP N ADDR" -> one line of N latencies in ns.
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        let mut it = line.split_whitespace();
        let (Some(op), Some(n), Some(addr)) = (it.next(), it.next(), it.next()) else { break };
        let n: usize = n.parse().expect("n");
        let addr: SocketAddr = addr.parse().expect("addr");
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            match op {
                "tcp" => {
                    let s = TcpStream::connect(addr).expect("tcp connect");
                    drop(s);
                }
                "udp" => {
                    let s = UdpSocket::bind("127.0.0.1:0").expect("udp bind");
                    s.connect(addr).expect("udp connect");
                    drop(s);
                }
                _ => panic!("op {op}"),
            }
            lat.push(t.elapsed().as_nanos() as u64);
        }
        let text: Vec<String> = lat.iter().map(u64::to_string).collect();
        writeln!(out, "{}", text.join(" ")).expect("stdout");
        out.flush().expect("flush");
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    fn spawn(cgroup: &Path, cpu: usize) -> Worker {
        let procs = cgroup.join("cgroup.procs");
        let mut cmd = Command::new(std::env::current_exe().expect("exe"));
        cmd.arg("--worker").stdin(Stdio::piped()).stdout(Stdio::piped());
        // SAFETY: write(2) and sched_setaffinity(2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                std::fs::write(&procs, "0")?;
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn worker");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Worker { child, stdin, stdout }
    }

    fn batch(&mut self, op: &str, n: usize, addr: SocketAddr) -> Vec<u64> {
        writeln!(self.stdin, "{op} {n} {addr}").expect("to worker");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("from worker");
        line.split_whitespace().map(|x| x.parse().expect("ns")).collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A policy with `n` rules: denies scattered over 10.0.0.0/8 and fd00::/8
/// (so the tries are really that big) plus the allow the workload hits.
fn policy(n: usize, port: u16) -> String {
    let mut s = format!(
        "apiVersion: pep/v1\nnetwork:\n  default: deny\n  rules:\n    - allow: {{ cidr: 127.0.0.1/32, ports: [{port}] }}\n"
    );
    let mut x: u32 = 0x1234_5678;
    for i in 1..n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        if i % 2 == 0 {
            let a = (x & 0x00ff_ff00) | 0x0a00_0000;
            s.push_str(&format!(
                "    - deny: {{ cidr: {}.{}.{}.0/24, ports: [{}] }}\n",
                a >> 24,
                (a >> 16) & 0xff,
                (a >> 8) & 0xff,
                1 + (x >> 16) % 60000
            ));
        } else {
            s.push_str(&format!("    - deny: {{ cidr: \"fd00:{:x}:{:x}::/48\" }}\n", x >> 16, x & 0xffff));
        }
    }
    s
}

struct Row {
    scenario: String,
    p50: u64,
    p99: u64,
    base_p50: u64,
    base_p99: u64,
}

fn main() {
    if std::env::args().any(|a| a == "--worker") {
        worker();
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, batch) = if quick { (10, 200) } else { (30, 500) };
    assert!(nix::unistd::geteuid().is_root(), "the benchmark loads eBPF programs: run as root");

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let tcp_addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let udp_addr = udp.local_addr().expect("addr");

    let root = cgroup2_root().expect("cgroup2");
    let pid = std::process::id();
    let base_cg = Cgroup::create(&root, Path::new(&format!("pep-agent/bench-base.{pid}"))).expect("cgroup");
    let mut rows = Vec::new();
    for &n in &[10usize, 1_000, 10_000] {
        let p = load_str(&policy(n, tcp_addr.port()), "bench.yaml", &LoadContext::new("/root")).expect("policy");
        let mut net = compiler::net::compile_network(&p.network, 1).expect("compile");
        // The UDP workload's destination is allowed too.
        let p2 = load_str(
            &format!("apiVersion: pep/v1\nnetwork:\n  rules:\n    - allow: {{ cidr: 127.0.0.1/32, ports: [{}] }}\n", udp_addr.port()),
            "udp.yaml",
            &LoadContext::new("/root"),
        )
        .expect("policy");
        let _ = p2;
        net.default_verdict = pep_common::event::VERDICT_ALLOW;
        let mut enforcer = Enforcer::load(LoadOptions::default()).expect("load");
        let mut cg = Cgroup::create(&root, Path::new(&format!("pep-agent/bench-{n}.{pid}"))).expect("cgroup");
        let spec = SandboxSpec {
            cgroup_id: cg.id(),
            cgroup_level: cg.level(),
            config: SandboxConfig { sandbox_id: 1, mode: MODE_ENFORCE, net_default: net.default_verdict, file_default: 1, exec_default: 1, flags: 0 },
        };
        enforcer.install_sandbox(&spec, &net, &[]).expect("install");
        enforcer.attach_net(cg.path()).expect("attach");
        // Drain the ring buffer as the agent would, so it never fills.
        let mut events = enforcer.take_events().expect("events");
        let mut sandboxed = Worker::spawn(cg.path(), 1);
        let mut baseline = Worker::spawn(base_cg.path(), 1);
        for (op, addr) in [("tcp", tcp_addr), ("udp", udp_addr)] {
            let (mut s, mut b) = (Vec::new(), Vec::new());
            // Warm-up, then A B A B ...
            sandboxed.batch(op, batch, addr);
            baseline.batch(op, batch, addr);
            for _ in 0..rounds {
                s.extend(sandboxed.batch(op, batch, addr));
                while events.next().is_some() {}
                b.extend(baseline.batch(op, batch, addr));
            }
            rows.push(Row {
                scenario: format!("{op} connect, sandboxed, {n} rules"),
                p50: pct(&mut s, 0.5),
                p99: pct(&mut s, 0.99),
                base_p50: pct(&mut b, 0.5),
                base_p99: pct(&mut b, 0.99),
            });
        }
        if n == 10_000 {
            // A process outside the sandbox while the agent runs: its cgroup
            // has no programs, so the hooks never run for it.
            let mut outside = Worker::spawn(base_cg.path(), 1);
            let mut none = Worker::spawn(base_cg.path(), 1);
            for (op, addr) in [("tcp", tcp_addr), ("udp", udp_addr)] {
                let (mut o, mut b) = (Vec::new(), Vec::new());
                outside.batch(op, batch, addr);
                none.batch(op, batch, addr);
                for _ in 0..rounds {
                    o.extend(outside.batch(op, batch, addr));
                    b.extend(none.batch(op, batch, addr));
                }
                rows.push(Row {
                    scenario: format!("{op} connect, outside the sandbox, agent loaded"),
                    p50: pct(&mut o, 0.5),
                    p99: pct(&mut o, 0.99),
                    base_p50: pct(&mut b, 0.5),
                    base_p99: pct(&mut b, 0.99),
                });
            }
        }
        drop(sandboxed);
        drop(baseline);
        enforcer.detach_net(cg.path()).expect("detach");
        cg.destroy().expect("cgroup");
    }
    let mut md = String::from("| scenario | p50 ns | p99 ns | baseline p50 | baseline p99 | ratio p50 | ratio p99 |\n|---|---|---|---|---|---|---|\n");
    let mut json = Vec::new();
    for r in &rows {
        let (r50, r99) = (r.p50 as f64 / r.base_p50 as f64, r.p99 as f64 / r.base_p99 as f64);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.3} |\n",
            r.scenario, r.p50, r.p99, r.base_p50, r.base_p99, r50, r99
        ));
        json.push(serde_json::json!({"scenario": r.scenario, "p50_ns": r.p50, "p99_ns": r.p99,
            "baseline_p50_ns": r.base_p50, "baseline_p99_ns": r.base_p99, "ratio_p50": r50, "ratio_p99": r99}));
    }
    print!("{md}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    std::fs::create_dir_all(&dir).expect("results dir");
    let kernel = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let doc = serde_json::json!({
        "benchmark": "net_connect", "quick": quick, "rounds": rounds, "batch": batch,
        "machine": {"kernel": kernel, "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)},
        "method": "interleaved batches (sandboxed, baseline), workers pinned to CPU 1, per-op wall time of connect+close",
        "rows": json,
    });
    let name = if quick { "net_connect-quick" } else { "net_connect" };
    std::fs::write(dir.join(format!("{name}.json")), serde_json::to_string_pretty(&doc).expect("json")).expect("write");
    std::fs::write(dir.join(format!("{name}.md")), format!("# net_connect (kernel {kernel})\n\n{md}")).expect("write");
}
