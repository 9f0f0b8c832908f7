//! Start-up and footprint of `pep-agent run`, against the same command
//! without it, interleaved:
//! - time from `run` to the child's exec (the child prints CLOCK_REALTIME);
//! - policy load (parse, compile, load the object, install) at 10,000 rules;
//! - agent peak RSS (VmHWM) and CPU idle and under a flood of denied sends
//!   (every one recorded or counted lost).
//!
//! `cargo bench -p pep-tests --bench run_startup [-- --quick]`

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use pep_agent::{
    compiler,
    enforcer::{Enforcer, LoadOptions, SandboxSpec},
    kernel::cgroup::{Cgroup, cgroup2_root},
    policy::{LoadContext, load_str},
};
use pep_common::sandbox::{MODE_ENFORCE, SandboxConfig};
use pep_tests::{Scratch, pep_agent_bin};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos()
}

/// ns from spawning `cmd` to its `date +%s%N`.
fn to_exec(prefix: &[&str]) -> u128 {
    let t0 = now_ns();
    let out = Command::new(prefix[0])
        .args(&prefix[1..])
        .args(["date", "+%s%N"])
        .output()
        .expect("spawn");
    assert!(out.status.success(), "{out:?}");
    let t1: u128 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("date output");
    t1.saturating_sub(t0)
}

fn pct(v: &mut [u128], p: f64) -> u128 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn policy_text(n: usize) -> String {
    let mut s = String::from(
        "apiVersion: pep/v1\nnetwork:\n  default: deny\n  rules:\n    - allow: { cidr: 127.0.0.1/32 }\n",
    );
    for i in 1..n {
        s.push_str(&format!(
            "    - deny: {{ cidr: 10.{}.{}.0/24, ports: [{}] }}\n",
            (i >> 8) & 0xff,
            i & 0xff,
            1 + i % 60000
        ));
    }
    s
}

/// CPU time (ns) of every thread of `pid` so far (schedstat: ns on a CPU).
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut sum = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        sum += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(sum)
}

/// What `pep-agent run` cost while its child ran.
struct Usage {
    /// Peak RSS (VmHWM), KiB.
    peak_kib: u64,
    /// CPU of the agent (all threads) from the child's start to its end, in
    /// % of one CPU.
    cpu_pct: f64,
    /// The child's stdout after its `up` line.
    child_out: String,
    /// Seconds from the child's start until pep-agent exited.
    secs_to_exit: f64,
}

/// Runs `cmd` under `pep-agent run` (extra arguments `extra`); samples the
/// agent from the moment the child prints `up` (set-up done) until it ends.
fn usage(policy: &Path, extra: &[&str], cmd: &[&str]) -> Usage {
    let mut child = Command::new(pep_agent_bin())
        .args(["run", "--policy"])
        .arg(policy)
        .args(extra)
        .args(["--", "sh", "-c", "echo up; exec \"$@\"", "sh"])
        .args(cmd)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("child's first line");
    assert_eq!(line.trim(), "up", "child said {line:?}");
    let (t0, c0) = (Instant::now(), cpu_ns(pid).expect("agent cpu"));
    // The rest of the child's output, read as it comes.
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let status_path = PathBuf::from(format!("/proc/{pid}/status"));
    let (mut peak, mut last) = (0, (t0, c0));
    loop {
        if let Ok(s) = std::fs::read_to_string(&status_path)
            && let Some(l) = s.lines().find(|l| l.starts_with("VmHWM:"))
        {
            peak = peak.max(
                l.split_whitespace()
                    .nth(1)
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0),
            );
        }
        // Sampled while the child runs (its stdout is open): the agent's
        // own teardown is not part of the idle or flood figure.
        if !reader.is_finished()
            && let Some(c) = cpu_ns(pid)
        {
            last = (Instant::now(), c);
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let secs_to_exit = t0.elapsed().as_secs_f64();
    let secs = last.0.duration_since(t0).as_secs_f64().max(1e-3);
    Usage {
        peak_kib: peak,
        cpu_pct: 100.0 * (last.1 - c0) as f64 / 1e9 / secs,
        child_out: reader.join().unwrap_or_default(),
        secs_to_exit,
    }
}

/// (records, lost) in an audit log: `audit.lost` records count the lost.
fn audit_counts(log: &Path) -> (u64, u64) {
    let (mut recorded, mut lost) = (0, 0);
    for l in std::fs::read_to_string(log).expect("audit log").lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("record");
        let n = v["count"].as_u64();
        if v["action"] == "audit.lost" {
            lost += n.unwrap_or(0);
        } else {
            recorded += n.unwrap_or(1);
        }
    }
    (recorded, lost)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 8 } else { 30 };
    let s = Scratch::new("bench-startup");
    let p10k = s.write("p10k.yaml", &policy_text(10_000));
    let bin = pep_agent_bin();
    let bin = bin.to_str().expect("utf8");
    let p = p10k.to_str().expect("utf8");
    let mut rows = Vec::new();

    // 1. run -> child's exec, interleaved with a plain spawn.
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    to_exec(&[bin, "run", "--policy", p, "--"]);
    for _ in 0..rounds {
        ours.push(to_exec(&[bin, "run", "--policy", p, "--"]));
        base.push(to_exec(&["env"]));
    }
    let (o50, o99, b50, b99) = (
        pct(&mut ours, 0.5),
        pct(&mut ours, 0.99),
        pct(&mut base, 0.5),
        pct(&mut base, 0.99),
    );
    rows.push(
        serde_json::json!({"scenario": "time from `pep-agent run` to the child's exec (10,000 rules)",
        "p50_ns": o50, "p99_ns": o99, "baseline_p50_ns": b50, "baseline_p99_ns": b99,
        "ratio_p50": o50 as f64 / b50 as f64, "ratio_p99": o99 as f64 / b99 as f64,
        "note": format!("baseline: spawning the same command directly; {bin}")}),
    );

    // 2. policy load at 10,000 rules, in process.
    let root = cgroup2_root().expect("cgroup2");
    let text = policy_text(10_000);
    let mut loads = Vec::new();
    let mut parse = Vec::new();
    for i in 0..rounds.min(10) {
        let t = Instant::now();
        let pol = load_str(&text, "p.yaml", &LoadContext::new("/root")).expect("policy");
        let net = compiler::net::compile_network(&pol.network, 1).expect("compile");
        parse.push(t.elapsed().as_nanos());
        let mut e = Enforcer::load(LoadOptions::default()).expect("load");
        let mut cg = Cgroup::create(
            &root,
            Path::new(&format!("pep-agent/bench-load{i}.{}", std::process::id())),
        )
        .expect("cgroup");
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
        e.install_sandbox(&spec, &net, &[]).expect("install");
        e.attach_net(cg.path()).expect("attach");
        loads.push(t.elapsed().as_nanos());
        e.detach_net(cg.path()).expect("detach");
        cg.destroy().expect("cgroup");
    }
    let (l50, l99) = (pct(&mut loads, 0.5), pct(&mut loads, 0.99));
    let (q50, q99) = (pct(&mut parse, 0.5), pct(&mut parse, 0.99));
    rows.push(
        serde_json::json!({"scenario": "policy parse + compile, 10,000 rules", "p50_ns": q50, "p99_ns": q99}),
    );
    rows.push(serde_json::json!({"scenario": "policy load: parse, compile, load programs, write maps, attach (10,000 rules)", "p50_ns": l50, "p99_ns": l99}));

    // 3. agent peak RSS and CPU, idle and under a flood.
    let idle_s = if quick { "1" } else { "3" };
    let idle = usage(&p10k, &["--audit", "/dev/null"], &["sleep", idle_s]);
    let flood = Path::new(env!("CARGO_BIN_EXE_flood"));
    let n = if quick { "200000" } else { "1000000" };
    let log = s.dir.join("flood.jsonl");
    let log_s = log.to_str().expect("utf8");
    let under = usage(
        &p10k,
        &["--audit", log_s],
        &[flood.to_str().expect("utf8"), "10.0.0.1", "9", n, "udp"],
    );
    let (recorded, lost) = audit_counts(&log);
    // flood prints `calls N eperm N other N ns N ...`.
    let words: Vec<&str> = under.child_out.split_whitespace().collect();
    let field = |k: &str| -> u64 {
        words
            .iter()
            .position(|w| *w == k)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in flood output {:?}", under.child_out))
    };
    let (calls, flood_ns) = (field("calls"), field("ns"));
    assert_eq!(
        recorded + lost,
        calls,
        "every denied send is recorded or counted lost"
    );
    rows.push(serde_json::json!({"scenario": "pep-agent run peak RSS, idle (10,000 rules)", "value": idle.peak_kib, "unit": "KiB"}));
    rows.push(serde_json::json!({"scenario": format!("pep-agent run peak RSS, flood of {n} denied sends"), "value": under.peak_kib, "unit": "KiB"}));
    let pct1 = |x: f64| (x * 10.0).round() / 10.0;
    rows.push(
        serde_json::json!({"scenario": "pep-agent run CPU, idle (10,000 rules)", "value": pct1(idle.cpu_pct),
        "unit": "% of a CPU", "note": format!("all threads, over the child's {idle_s} s sleep")}),
    );
    rows.push(serde_json::json!({"scenario": format!("pep-agent run CPU, flood of {n} denied sends"), "value": pct1(under.cpu_pct),
        "unit": "% of a CPU", "note": format!("all threads, while the flood runs ({:.2} s); ring buffer to JSON lines in a file: \
        {recorded} records, {lost} counted lost in-band, all written {:.2} s after the flood's start (audit throughput: the audit benchmark)",
        flood_ns as f64 / 1e9, under.secs_to_exit)}));

    for r in &rows {
        println!("{r}");
    }
    let dir = std::env::var_os("PEP_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results"));
    std::fs::create_dir_all(&dir).expect("dir");
    let doc = serde_json::json!({"benchmark": "run_startup", "quick": quick, "rounds": rounds,
        "method": "interleaved: run, then plain spawn, round after round", "rows": rows});
    let file = if quick { "run_startup-quick" } else { "run_startup" };
    // The VM harness cannot read files the guest writes here: the marker
    // line carries the document to `cargo xtask bench` from either place.
    println!("PEP_BENCH_JSON {doc}");
    std::fs::write(
        dir.join(format!("{file}.json")),
        serde_json::to_string_pretty(&doc).expect("json"),
    )
    .expect("write");
}
