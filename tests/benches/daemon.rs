//! The host daemon's costs: time from start to ready (fresh load, and
//! adopting pinned programs after SIGKILL), reload time of a policy of
//! 10,000 rules, and the daemon's RSS and CPU idle and under a flood of
//! denied calls. Writes `$PEP_BENCH_OUT/daemon[-quick].json`.
//!
//! `cargo bench -p pep-tests --bench daemon [-- --quick]` (or `cargo xtask bench`).

use std::time::{Duration, Instant};

use pep_tests::daemon::TestDaemon;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (ns) of every thread of `pid` so far (schedstat: ns on a CPU).
fn cpu_ns(pid: u32) -> u64 {
    let mut sum = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        sum += std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    sum
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A policy of `n` network rules (distinct /32s, each with a port).
fn big_policy(n: usize, port: u16) -> String {
    let mut p = String::from("apiVersion: pep/v1\nname: big\nnetwork:\n  default: allow\n  rules:\n");
    for i in 0..n {
        let (a, b) = (i / 250, i % 250);
        p.push_str(&format!(
            "    - deny: {{ cidr: 10.{}.{a}.{b}/32, ports: [{port}] }}\n",
            1 + (i % 7)
        ));
    }
    p
}

fn row(scenario: &str, value: f64, unit: &str, note: &str) -> serde_json::Value {
    serde_json::json!({"scenario": scenario, "value": (value * 10.0).round() / 10.0, "unit": unit, "note": note})
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 3 } else { 7 };
    let rules = 10_000;
    let mut rows = Vec::new();

    let mut d = TestDaemon::new("bench-daemon", &[("big", &big_policy(rules, 443))], "", false);
    let mut fresh = Vec::new();
    let mut adopt = Vec::new();
    for i in 0..runs {
        if i > 0 {
            // Fresh: nothing pinned.
            let _ = pep_agent::enforcer::pinned::remove_pins(&d.pin_dir);
            let _ = std::fs::remove_dir_all(d.scratch.dir.join("state"));
        }
        let t = Instant::now();
        d.start();
        fresh.push(t.elapsed().as_secs_f64() * 1000.0);
        d.kill9();
        let t = Instant::now();
        d.start();
        adopt.push(t.elapsed().as_secs_f64() * 1000.0);
        d.stop();
    }
    let bin = pep_tests::pep_agent_bin();
    let note = format!("binary {}", bin.display());
    rows.push(row(
        "daemon start to ready, fresh load",
        median(fresh),
        "ms",
        &note,
    ));
    rows.push(row(
        "daemon start to ready, adopting pinned state after SIGKILL",
        median(adopt),
        "ms",
        &note,
    ));

    d.start();
    let idle = rss_kib(d.pid());
    let r = d.request(r#"{"op":"create","name":"big","policy":"big"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let mut reloads = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let r = d.request(r#"{"op":"reload","name":"big"}"#);
        assert_eq!(r["ok"], true, "{r}");
        reloads.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    rows.push(row(
        &format!("reload of a {rules}-rule policy (read, compile, write new generation, flip, delete old)"),
        median(reloads),
        "ms",
        "",
    ));
    let with_rules = rss_kib(d.pid());
    // Idle CPU: a window with the sandbox installed and nothing running.
    let window = Duration::from_secs(if quick { 1 } else { 3 });
    let (t, c) = (Instant::now(), cpu_ns(d.pid()));
    std::thread::sleep(window);
    let idle_cpu = 100.0 * (cpu_ns(d.pid()) - c) as f64 / 1e9 / t.elapsed().as_secs_f64();
    rows.push(row("daemon RSS idle", idle as f64 / 1024.0, "MiB", "no sandbox"));
    rows.push(row(
        "daemon RSS with a 10,000-rule sandbox",
        with_rules as f64 / 1024.0,
        "MiB",
        "",
    ));

    // Flood: a sandboxed process making denied UDP sends as fast as it can;
    // every one is an audit record the daemon writes.
    let port = 443u16;
    let procs = d.cgroup("big").join("cgroup.procs");
    let count = if quick { 200_000 } else { 1_000_000 };
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_flood"));
    cmd.args(["10.1.0.0", &port.to_string(), &count.to_string(), "udp"]);
    // SAFETY: a write(2) to a cgroup file between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || std::fs::write(&procs, "0"));
    }
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().expect("flood");
    let mut peak = 0;
    let (t, c) = (Instant::now(), cpu_ns(d.pid()));
    while child.try_wait().expect("wait").is_none() {
        peak = peak.max(rss_kib(d.pid()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = t.elapsed().as_secs_f64();
    let flood_cpu = 100.0 * (cpu_ns(d.pid()) - c) as f64 / 1e9 / secs;
    let mut flood_out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut flood_out)
        .expect("flood output");
    let flood_out = flood_out.trim().to_string();
    std::thread::sleep(Duration::from_millis(500));
    peak = peak.max(rss_kib(d.pid()));
    rows.push(row(
        "daemon RSS peak under a flood of denied sends",
        peak as f64 / 1024.0,
        "MiB",
        &format!("{count} denied sendto in {secs:.1} s, each an audit record (flood: {flood_out})"),
    ));
    rows.push(row(
        "daemon CPU idle, 10,000-rule sandbox",
        idle_cpu,
        "% of a CPU",
        &format!("all threads, over {} s", window.as_secs()),
    ));
    rows.push(row(
        "daemon CPU under a flood of denied sends",
        flood_cpu,
        "% of a CPU",
        &format!("all threads, while {count} denied sendto ran ({secs:.1} s)"),
    ));
    d.stop();

    let doc = serde_json::json!({
        "benchmark": "daemon",
        "method": format!("median of {runs} runs; start-to-ready is spawn until the control socket answers ping"),
        "quick": quick,
        "rows": rows,
    });
    let text = serde_json::to_string_pretty(&doc).expect("json");
    println!("{text}");
    if let Some(dir) = std::env::var_os("PEP_BENCH_OUT") {
        let suffix = if quick { "-quick" } else { "" };
        std::fs::write(
            std::path::Path::new(&dir).join(format!("daemon{suffix}.json")),
            &text,
        )
        .expect("write results");
    }
}
