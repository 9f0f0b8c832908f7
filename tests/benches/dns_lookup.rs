//! Lookup latency through the agent's resolver against the upstream
//! directly, measured interleaved (agent, direct, agent, direct ...) by one
//! process inside one sandbox, with dnsmasq on loopback as the upstream.
//!
//! The agent's path: the kernel steers the query (sent to resolv.conf's
//! server, port 53) to the resolver, which identifies the client (sock_diag,
//! /proc), decides the name, forwards it to dnsmasq, learns the answer's
//! address into the kernel map and replies; the reply's source is restored.
//! The direct path: the same query to dnsmasq's address and port (allowed by
//! a CIDR rule, not steered).
//!
//! `cargo bench -p pep-tests --bench dns_lookup [-- --quick]`; writes
//! bench/results/dns_lookup.md.

use std::{
    net::UdpSocket,
    path::Path,
    process::{Command, Stdio},
};

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 200 } else { 2000 };
    let dns_addr = "127.0.1.53";
    let port = UdpSocket::bind((dns_addr, 0))
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    let mut dnsmasq = Command::new("dnsmasq")
        .args([
            "-k",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--pid-file=",
            &format!("--listen-address={dns_addr}"),
            &format!("--port={port}"),
            "--local-ttl=300",
            "--host-record=bench.dns.test,127.0.0.9",
        ])
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dnsmasq");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let dir = std::env::temp_dir().join(format!("pep-bench-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "apiVersion: pep/v1\nname: dnsbench\nnetwork:\n  default: deny\n  dns:\n    upstream: \"{dns_addr}:{port}\"\n  rules:\n\
             \x20   - allow: {{ domain: bench.dns.test, ports: [443] }}\n\
             \x20   - allow: {{ cidr: {dns_addr}/32, ports: [{port}], protocol: udp }}\n"
        ),
    )
    .expect("policy");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dns_bench.py");
    let out = Command::new(pep_tests::pep_agent_bin())
        .args(["run", "--policy"])
        .arg(&policy)
        .args(["--", "python3"])
        .arg(&script)
        .args(["bench.dns.test", dns_addr, &port.to_string(), &rounds.to_string()])
        .output()
        .expect("pep-agent run");
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "bench run failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut agent = Vec::new();
    let mut direct = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut it = line.split_whitespace().map(|v| v.parse::<u64>().expect("ns"));
        if let (Some(a), Some(d)) = (it.next(), it.next()) {
            agent.push(a);
            direct.push(d);
        }
    }
    assert_eq!(agent.len(), rounds, "every round measured");
    // The first rounds warm caches on both paths.
    let warm = rounds / 20;
    let (mut a, mut d) = (agent[warm..].to_vec(), direct[warm..].to_vec());
    a.sort_unstable();
    d.sort_unstable();
    let row = |name: &str, v: &[u64]| {
        format!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99),
            v.iter().sum::<u64>() as f64 / v.len() as f64 / 1000.0
        )
    };
    let table = format!(
        "# DNS lookup latency (µs), {} interleaved rounds after {warm} warm-up\n\n\
         One A query per lookup over UDP from python3 inside a sandbox; upstream dnsmasq on loopback.\n\n\
         | path | p50 | p90 | p99 | mean |\n|---|---|---|---|---|\n{}\n{}\n\n\
         Added by the agent at p50: {:.1} µs\n",
        a.len(),
        row("through the agent's resolver", &a),
        row("upstream directly", &d),
        percentile(&a, 0.5) - percentile(&d, 0.5)
    );
    println!("{table}");
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    let name = if quick {
        "dns_lookup-quick.md"
    } else {
        "dns_lookup.md"
    };
    if std::fs::create_dir_all(&results).is_ok() {
        let _ = std::fs::write(results.join(name), &table);
    }
    // The document `cargo xtask bench` collects.
    let (a50, a99, d50, d99) = (
        percentile(&a, 0.5),
        percentile(&a, 0.99),
        percentile(&d, 0.5),
        percentile(&d, 0.99),
    );
    let doc = serde_json::json!({"benchmark": "dns_lookup", "quick": quick, "rows": [
        {"scenario": "DNS lookup through the agent's resolver (UDP, python3 in a sandbox)",
         "p50_ns": a50 * 1000.0, "p99_ns": a99 * 1000.0, "baseline_p50_ns": d50 * 1000.0, "baseline_p99_ns": d99 * 1000.0,
         "ratio_p50": a50 / d50, "ratio_p99": a99 / d99, "note": "baseline: the upstream dnsmasq directly, interleaved"}]});
    println!("PEP_BENCH_JSON {doc}");
    let out = std::env::var_os("PEP_BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or(results);
    let file = if quick {
        "dns_lookup-quick.json"
    } else {
        "dns_lookup.json"
    };
    let _ = std::fs::write(
        out.join(file),
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    );
}
