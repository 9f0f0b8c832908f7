//! Start-up and footprint of `pep-agent run`, against the same command
//! without it, interleaved:
//! - time from `run` to the child's exec (the child prints CLOCK_REALTIME);
//! - policy load (parse, compile, load the object, install) at 10,000 rules;
//! - agent peak RSS (VmHWM) idle and under a flood of denied sends.
//!
//! `cargo bench -p pep-tests --bench run_startup [-- --quick]`

use std::{
    path::{Path, PathBuf},
    process::Command,
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

/// Peak RSS in KiB of `pep-agent run` while its child runs `cmd`.
fn peak_rss(policy: &Path, cmd: &[&str]) -> u64 {
    let mut child = Command::new(pep_agent_bin())
        .args(["run", "--policy"])
        .arg(policy)
        .args(["--audit", "/dev/null", "--"])
        .args(cmd)
        .spawn()
        .expect("spawn");
    let status_path = PathBuf::from(format!("/proc/{}/status", child.id()));
    let mut peak = 0;
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
        if child.try_wait().expect("wait").is_some() {
            return peak;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
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
        "note": "baseline: spawning the same command directly"}),
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

    // 3. agent peak RSS idle and under a flood.
    let idle = peak_rss(&p10k, &["sleep", "1"]);
    let flood = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/flood");
    let flood = if flood.exists() {
        flood
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/flood")
    };
    let n = if quick { "200000" } else { "1000000" };
    let under = peak_rss(&p10k, &[flood.to_str().expect("utf8"), "10.0.0.1", "9", n, "udp"]);
    rows.push(serde_json::json!({"scenario": "pep-agent run peak RSS, idle (10,000 rules)", "value": idle, "unit": "KiB"}));
    rows.push(serde_json::json!({"scenario": format!("pep-agent run peak RSS, flood of {n} denied sends"), "value": under, "unit": "KiB"}));

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
