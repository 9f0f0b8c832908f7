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
        let (Some(op), Some(n), Some(addr)) = (it.next(), it.next(), it.next()) else {
            break;
        };
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

/// The rules of a policy with `n` rules: the allow the workload hits, then
/// denies scattered over 10.0.0.0/8 (with a port) and fd00::/8, so the maps
/// (and the peer's sets) are really that big.
fn rules(n: usize, port: u16) -> (Vec<(String, u16)>, Vec<String>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    let mut x: u32 = 0x1234_5678;
    for i in 1..n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        if i % 2 == 0 {
            let a = (x & 0x00ff_ff00) | 0x0a00_0000;
            let cidr = format!("{}.{}.{}.0/24", a >> 24, (a >> 16) & 0xff, (a >> 8) & 0xff);
            let p = 1 + (x >> 16) % 60000;
            if !v4.iter().any(|(c, q)| *c == cidr && u32::from(*q) == p) && p != u32::from(port) {
                v4.push((cidr, p as u16));
            }
        } else {
            let c = format!("fd00:{:x}:{:x}::/48", x >> 16, x & 0xffff);
            if !v6.contains(&c) {
                v6.push(c);
            }
        }
    }
    (v4, v6)
}

fn policy(n: usize, port: u16, udp_port: u16) -> String {
    let (v4, v6) = rules(n, port);
    let mut s = format!(
        "apiVersion: pep/v1\nnetwork:\n  default: deny\n  rules:\n    - allow: {{ cidr: 127.0.0.1/32, ports: [{port}, {udp_port}] }}\n"
    );
    for (c, p) in &v4 {
        s.push_str(&format!("    - deny: {{ cidr: {c}, ports: [{p}] }}\n"));
    }
    for c in &v6 {
        s.push_str(&format!("    - deny: {{ cidr: \"{c}\" }}\n"));
    }
    s
}

/// The same rules as an nftables ruleset matching the peer's cgroup with
/// `socket cgroupv2`: nftables sees packets, not connect(), so it can filter
/// the TCP SYN but has nothing to evaluate on a UDP connect().
fn nft_ruleset(table: &str, cg_rel: &str, level: u32, n: usize, port: u16, udp_port: u16) -> String {
    let (v4, v6) = rules(n, port);
    let el4: Vec<String> = v4.iter().map(|(c, p)| format!("{c} . {p}")).collect();
    let mut s = format!("table inet {table} {{\n");
    if !el4.is_empty() {
        s.push_str(&format!(
            "  set deny4 {{ type ipv4_addr . inet_service; flags interval; elements = {{ {} }} }}\n",
            el4.join(", ")
        ));
    }
    if !v6.is_empty() {
        s.push_str(&format!(
            "  set deny6 {{ type ipv6_addr; flags interval; elements = {{ {} }} }}\n",
            v6.join(", ")
        ));
    }
    s.push_str(&format!(
        "  chain out {{ type filter hook output priority 0; policy accept; socket cgroupv2 level {level} \"{cg_rel}\" jump sandbox; }}\n  chain sandbox {{\n    ip daddr 127.0.0.1 tcp dport {{ {port}, {udp_port} }} accept\n    ip daddr 127.0.0.1 udp dport {{ {port}, {udp_port} }} accept\n"
    ));
    if !el4.is_empty() {
        s.push_str("    ip daddr . tcp dport @deny4 reject\n");
    }
    if !v6.is_empty() {
        s.push_str("    ip6 daddr @deny6 reject\n");
    }
    s.push_str("    reject\n  }\n}\n");
    s
}

fn nft(script: &str) {
    let mut c = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft (cargo xtask setup installs it)");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("nft stdin");
    assert!(c.wait().expect("nft").success(), "nft rejected the ruleset");
}

struct Row {
    scenario: String,
    p50: u64,
    p99: u64,
    base_p50: u64,
    base_p99: u64,
    note: &'static str,
}

/// Interleaves `workers` (the last one is the baseline) over `rounds`.
fn interleave(
    workers: &mut [&mut Worker],
    op: &str,
    addr: SocketAddr,
    rounds: usize,
    batch: usize,
) -> Vec<Vec<u64>> {
    let mut out = vec![Vec::new(); workers.len()];
    for w in workers.iter_mut() {
        w.batch(op, batch, addr);
    }
    for _ in 0..rounds {
        for (i, w) in workers.iter_mut().enumerate() {
            out[i].extend(w.batch(op, batch, addr));
        }
    }
    out
}

fn main() {
    if std::env::args().any(|a| a == "--worker") {
        worker();
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, batch) = if quick { (10, 200) } else { (40, 500) };
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark loads eBPF programs: run as root"
    );

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
    let nft_cg = Cgroup::create(&root, Path::new(&format!("pep-agent/bench-nft.{pid}"))).expect("cgroup");
    // nft resolves `socket cgroupv2` paths under /sys/fs/cgroup whatever the
    // cgroup2 mount is (hybrid hosts mount it at /sys/fs/cgroup/unified).
    let nft_rel = nft_cg
        .path()
        .strip_prefix("/sys/fs/cgroup")
        .expect("cgroup2 under /sys/fs/cgroup")
        .display()
        .to_string();
    let table = format!("pepbench{pid}");
    let mut rows = Vec::new();
    for &n in &[10usize, 1_000, 10_000] {
        let p = load_str(
            &policy(n, tcp_addr.port(), udp_addr.port()),
            "bench.yaml",
            &LoadContext::new("/root"),
        )
        .expect("policy");
        let net = compiler::net::compile_network(&p.network, 1).expect("compile");
        let mut enforcer = Enforcer::load(LoadOptions::default()).expect("load");
        let mut cg = Cgroup::create(&root, Path::new(&format!("pep-agent/bench-{n}.{pid}"))).expect("cgroup");
        let spec = SandboxSpec {
            cgroup_id: cg.id(),
            cgroup_level: cg.level(),
            config: SandboxConfig {
                sandbox_id: 1,
                mode: MODE_ENFORCE,
                net_default: net.default_verdict,
                file_default: 1,
                exec_default: 1,
                flags: 0,
            },
        };
        enforcer.install_sandbox(&spec, &net, &[]).expect("install");
        enforcer.attach_net(cg.path()).expect("attach");
        nft(&format!(
            "{}\n",
            nft_ruleset(
                &table,
                &nft_rel,
                nft_cg.level(),
                n,
                tcp_addr.port(),
                udp_addr.port()
            )
        ));
        // Drain the ring buffer as the agent does, so it never fills.
        let mut events = enforcer.take_events().expect("events");
        let mut sandboxed = Worker::spawn(cg.path(), 1);
        let mut peer = Worker::spawn(nft_cg.path(), 1);
        let mut baseline = Worker::spawn(base_cg.path(), 1);
        for (op, addr) in [("tcp", tcp_addr), ("udp", udp_addr)] {
            let mut v = std::thread::scope(|sc| {
                let h = sc.spawn(|| {
                    interleave(
                        &mut [&mut sandboxed, &mut peer, &mut baseline],
                        op,
                        addr,
                        rounds,
                        batch,
                    )
                });
                while !h.is_finished() {
                    while events.next().is_some() {}
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                h.join().expect("bench thread")
            });
            let (mut b, mut pe, mut s) = (v.pop().expect("b"), v.pop().expect("p"), v.pop().expect("s"));
            let (b50, b99) = (pct(&mut b, 0.5), pct(&mut b, 0.99));
            rows.push(Row {
                scenario: format!("{op} connect, sandboxed, {n} rules"),
                p50: pct(&mut s, 0.5),
                p99: pct(&mut s, 0.99),
                base_p50: b50,
                base_p99: b99,
                note: "",
            });
            rows.push(Row {
                scenario: format!("{op} connect, nftables peer (socket cgroupv2), {n} rules"),
                p50: pct(&mut pe, 0.5),
                p99: pct(&mut pe, 0.99),
                base_p50: b50,
                base_p99: b99,
                note: if op == "udp" {
                    "peer cannot express it: nftables sees no packet on a UDP connect()"
                } else {
                    ""
                },
            });
        }
        if n == 10_000 {
            // A process outside the sandbox while the agent runs: its cgroup
            // has no programs, so the hooks never run for it.
            let mut outside = Worker::spawn(base_cg.path(), 1);
            for (op, addr) in [("tcp", tcp_addr), ("udp", udp_addr)] {
                let mut v = interleave(&mut [&mut outside, &mut baseline], op, addr, rounds, batch);
                let (mut b, mut o) = (v.pop().expect("b"), v.pop().expect("o"));
                rows.push(Row {
                    scenario: format!("{op} connect, outside the sandbox, agent loaded"),
                    p50: pct(&mut o, 0.5),
                    p99: pct(&mut o, 0.99),
                    base_p50: pct(&mut b, 0.5),
                    base_p99: pct(&mut b, 0.99),
                    note: "",
                });
            }
        }
        drop((sandboxed, peer, baseline));
        nft(&format!("delete table inet {table}\n"));
        enforcer.detach_net(cg.path()).expect("detach");
        cg.destroy().expect("cgroup");
    }
    write_results("net_connect", quick, rounds, batch, &rows);
}

fn write_results(name: &str, quick: bool, rounds: usize, batch: usize, rows: &[Row]) {
    let mut md = String::from(
        "| scenario | p50 ns | p99 ns | baseline p50 | baseline p99 | ratio p50 | ratio p99 | note |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut json = Vec::new();
    for r in rows {
        let (r50, r99) = (r.p50 as f64 / r.base_p50 as f64, r.p99 as f64 / r.base_p99 as f64);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.3} | {} |\n",
            r.scenario, r.p50, r.p99, r.base_p50, r.base_p99, r50, r99, r.note
        ));
        json.push(
            serde_json::json!({"scenario": r.scenario, "p50_ns": r.p50, "p99_ns": r.p99,
            "baseline_p50_ns": r.base_p50, "baseline_p99_ns": r.base_p99, "ratio_p50": r50, "ratio_p99": r99,
            "note": r.note}),
        );
    }
    print!("{md}");
    let dir = std::env::var_os("PEP_BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results"));
    std::fs::create_dir_all(&dir).expect("results dir");
    let doc = serde_json::json!({
        "benchmark": name, "quick": quick, "rounds": rounds, "batch": batch,
        "method": "interleaved batches (sandboxed, nftables peer, baseline) round after round, workers pinned to CPU 1; per-op wall time of socket+connect+close",
        "rows": json,
    });
    let file = if quick {
        format!("{name}-quick")
    } else {
        name.to_string()
    };
    // The VM harness cannot read files the guest writes here: the marker
    // line carries the document to `cargo xtask bench` from either place.
    println!("PEP_BENCH_JSON {doc}");
    std::fs::write(
        dir.join(format!("{file}.json")),
        serde_json::to_string_pretty(&doc).expect("json"),
    )
    .expect("write");
}
