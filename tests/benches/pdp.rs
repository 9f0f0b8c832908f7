//! PDP figures (issue 9), printed as a table and written to
//! `bench/results/pdp.txt`:
//! 1. decision latency, p50/p99: the embedded Rego engine on an indexed
//!    rule (on regorus' VM, as a miss is decided, and on its interpreter,
//!    interleaved), and the remote engine (`pep-agent pdp serve` over loopback,
//!    one kept-alive connection);
//! 2. a cold embedded decision, p50/p99: one decision after the thread
//!    slept, spun (busy-waited) or evicted 16 MB of data cache, against a
//!    warm one, interleaved, on the agent's CPU;
//! 3. connect latency, interleaved in one run (A B C A B C ...): a cache hit
//!    (a PDP verdict in `VERDICT_CACHE`), a compiled-rule hit, and no agent
//!    (this process, outside any sandbox);
//! 4. kernel miss to verdict in the map, p50/p99, embedded engine (the
//!    run's own measurement, logged at exit, with where the time went:
//!    kernel to receipt, building the query, the engine, writing the map),
//!    with pinned processes in two placements (`Placement`), each with the
//!    default idle states and latency-tuned (`/dev/cpu_dma_latency` 0);
//!    then with `pdp.busy_poll_us` (the ask thread spins for the next miss
//!    on a CPU of its own), with the held connects' own latency;
//! 5. the kernel programs' own run time (`kernel.bpf_stats_enabled`, on for
//!    that run only): `connect4`, `ask_sock_ops` and `ask_egress` per run on
//!    misses of a stream and on cache hits back to back.
//!
//! `cargo bench -p pep-tests --bench pdp [-- --quick]` (as root).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pep_agent::pdp::{
    Pdp,
    opa::Opa,
    query::{Context, Query, Resource, Subject},
    rego::Rego,
};
use pep_tests::{Scratch, pep_agent_bin, tcp_server};
use serde_json::json;

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn worker(cpu: Option<usize>) {
    if let Some(c) = cpu {
        pin(c).expect("pin the worker");
    }
    // "N ADDR [GAP_MS]" -> N connect latencies in ns, GAP_MS apart.
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line.expect("stdin");
        let mut it = line.split_whitespace();
        let (Some(n), Some(addr)) = (it.next(), it.next()) else {
            break;
        };
        let n: usize = n.parse().expect("n");
        let gap = Duration::from_millis(it.next().map_or(0, |g| g.parse().expect("gap")));
        let addrs: Vec<SocketAddr> = addr.split(',').map(|a| a.parse().expect("addr")).collect();
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let a = addrs[i % addrs.len()];
            std::thread::sleep(gap);
            let t = Instant::now();
            let s = TcpStream::connect(a);
            lat.push(t.elapsed().as_nanos() as u64);
            if let Err(e) = s {
                lat.pop();
                lat.push(u64::MAX);
                eprintln!("worker: {a}: {e}");
            }
        }
        let text: Vec<String> = lat.iter().map(u64::to_string).collect();
        writeln!(out, "{}", text.join(" ")).expect("stdout");
        out.flush().expect("flush");
    }
}

fn connect_batch(n: usize, addr: SocketAddr) -> Vec<u64> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let _s = TcpStream::connect(addr).expect("connect");
            t.elapsed().as_nanos() as u64
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--worker") {
        worker(args.get(i + 1).and_then(|c| c.parse().ok()));
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let n_dec = if quick { 500 } else { 5000 };
    let rounds = if quick { 10 } else { 40 };
    let batch = 50;
    // Enough for a p99 to be more than the run's second-worst: 400 misses
    // (each holds its connect about 8 ms) take about 4 s.
    let n_miss = if quick { 400 } else { 2000 };
    let s = Scratch::new("bench-pdp");
    let mut report = String::new();
    let mut say = |line: String| {
        println!("{line}");
        report.push_str(&line);
        report.push('\n');
    };

    // 1. Decision latency.
    let rego = s.write(
        "p.rego",
        "package pep\n\
         default decision := false\n\
         decision := {\"allow\": true, \"ttl_s\": 600} if input.resource.dport == 443\n\
         decision := {\"allow\": true, \"ttl_s\": 600} if input.action == \"net.connect\"\n",
    );
    let input = json!({
        "subject": {"sandbox": "b", "pid": 1, "uid": 0, "comm": "x", "exe": "/x", "labels": {}},
        "action": "net.connect",
        "resource": {"daddr": "127.0.0.1", "dport": 443, "protocol": "tcp"},
        "context": {"time": "2026-11-25T16:20:20Z", "host": "h", "policy_revision": "sha256:x"}
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let embedded = Rego::load(&[&rego], "data.pep.decision").expect("rego");
    assert!(
        embedded.compiled(),
        "the bench's rule must compile to regorus' VM"
    );
    let interpreted = Rego::load(&[&rego], "data.pep.decision")
        .expect("rego")
        .interpreter_only();
    // What the agent does on a miss: the query as a struct, straight into
    // regorus (`decide_now`), no JSON in between.
    let query = Query {
        subject: Subject {
            sandbox: "b".into(),
            pid: 1,
            uid: 0,
            comm: "x".into(),
            exe: Some("/x".into()),
            labels: Default::default(),
        },
        action: "net.connect".into(),
        resource: Resource::net("127.0.0.1".parse().expect("addr"), 443, 6),
        context: Context {
            time: "2026-11-25T16:20:20Z".into(),
            host: "h".into(),
            policy_revision: "sha256:x".into(),
        },
    };
    let (mut emb, mut interp) = (Vec::new(), Vec::new());
    for i in 0..n_dec {
        for vm in [i % 2 == 0, i % 2 == 1] {
            let (engine, out) = if vm {
                (&embedded, &mut emb)
            } else {
                (&interpreted, &mut interp)
            };
            let t = Instant::now();
            let d = engine.decide_now(&query).expect("embedded").expect("decide");
            out.push(t.elapsed().as_nanos() as u64);
            assert!(d.answer.allow);
        }
    }
    let mut server = Command::new(pep_agent_bin())
        .args(["pdp", "serve", "--listen", "127.0.0.1:0", "--policy"])
        .arg(&rego)
        .stderr(Stdio::piped())
        .spawn()
        .expect("pdp serve");
    let mut lines = BufReader::new(server.stderr.take().expect("stderr")).lines();
    let addr: SocketAddr = loop {
        let l = lines.next().expect("pdp serve exited").expect("line");
        if let Some(a) = l.split("listening on http://").nth(1) {
            break a.trim().parse().expect("addr");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let url = format!("http://{addr}/v1/data/pep/decision");
    let remote = Opa::with_url(&url, Duration::from_secs(2)).expect("opa");
    let mut rem = Vec::new();
    for _ in 0..n_dec {
        let t = Instant::now();
        let d = rt.block_on(remote.decide(&input)).expect("decide");
        rem.push(t.elapsed().as_nanos() as u64);
        assert!(d.answer.allow);
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    let (emb50, emb99) = (pct(&mut emb, 0.5), pct(&mut emb, 0.99));
    let (int50, int99) = (pct(&mut interp, 0.5), pct(&mut interp, 0.99));
    let (rem50, rem99) = (pct(&mut rem, 0.5), pct(&mut rem, 0.99));
    say(format!("decision latency (n={n_dec} each)"));
    say(format!(
        "  embedded rego:          p50 {:8.1} us   p99 {:8.1} us   (regorus' VM)",
        us(emb50),
        us(emb99)
    ));
    say(format!(
        "  embedded, interpreter:  p50 {:8.1} us   p99 {:8.1} us   (VM / interpreter p50 {:.2})",
        us(int50),
        us(int99),
        emb50 as f64 / int50 as f64
    ));
    say(format!(
        "  remote (loopback HTTP): p50 {:8.1} us   p99 {:8.1} us",
        us(rem50),
        us(rem99)
    ));
    let _ = server.kill();
    let _ = server.wait();

    // 2. Cold embedded decision: why a miss decided after a quiet spell is
    // slow. On its own thread, pinned where the agent runs (the goal's
    // placement), so the rest of the bench keeps its affinity.
    let plans = Placement::plans();
    let cold_cpu = plans[0].1.agent;
    let n_cold = if quick { 20 } else { 60 };
    let cold = std::thread::scope(|sc| {
        sc.spawn(|| cold_decisions(&embedded, &query, cold_cpu, n_cold))
            .join()
            .expect("cold decisions")
    });
    let cold_where = cold_cpu.map_or("unpinned".to_string(), |c| format!("CPU {c}"));
    say(format!(
        "cold embedded decision (one decision after each preparation, interleaved, n={n_cold} each, {cold_where})"
    ));
    let (warm50, warm99) = (cold[0].p50, cold[0].p99);
    for (prep, c) in COLD.iter().zip(&cold) {
        say(format!(
            "  {:24} p50 {:8.1} us   p99 {:8.1} us   p50 / warm p50 {:5.2}   preparation p50 {:6.2} ms",
            prep.label(),
            us(c.p50),
            us(c.p99),
            c.p50 as f64 / warm50 as f64,
            c.prep as f64 / 1e6
        ));
    }

    // 3 and 4: one sandbox under `default: ask` with the embedded engine.
    let rule_port = tcp_server("127.0.0.1:0").port();
    let cache_port = tcp_server("127.0.0.1:0").port();
    // Misses: many loopback addresses, one listener on all of them.
    let miss_l = TcpListener::bind("0.0.0.0:0").expect("bind");
    let miss_port = miss_l.local_addr().expect("addr").port();
    std::thread::spawn(move || for _c in miss_l.incoming() {});
    let policy_text = format!(
        "apiVersion: pep/v1\nname: bench\nnetwork:\n  default: ask\n  rules:\n\
         \x20   - allow: {{ cidr: 127.0.0.1/32, ports: [{rule_port}], protocol: tcp }}\n\
         pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n  cache_ttl_s: 600\n",
        rego.display()
    );
    let policy = s.write("p.yaml", &policy_text);
    let busy_policy = s.write(
        "busy.yaml",
        &format!("{policy_text}  busy_poll_us: {}\n", BUSY_POLL.as_micros()),
    );
    let cpus = plans[0].1;
    say(format!("placement: {}", cpus.describe()));
    let rule_addr = format!("127.0.0.1:{rule_port}");
    let cache_addr = format!("127.0.0.1:{cache_port}");
    // Misses: distinct destinations, each asked once (embedded engine).
    let miss_addrs: Vec<String> = (0..n_miss)
        .map(|i| format!("127.0.{}.{}:{miss_port}", 1 + i / 250, 1 + i % 250))
        .collect();
    let miss_addrs = miss_addrs.join(",");

    // Run 1, the machine's default idle states: the misses, then the
    // interleaved connect latencies.
    let mut agent = Agent::start(&policy, cpus);
    let miss_lat = agent.ask(n_miss, &miss_addrs);
    let miss_failed = miss_lat.iter().filter(|l| **l == u64::MAX).count();
    let miss_lat: Vec<u64> = miss_lat.into_iter().filter(|l| *l != u64::MAX).collect();
    agent.ask(1, &cache_addr); // warm the cache
    let (mut hit, mut rule, mut none) = (Vec::new(), Vec::new(), Vec::new());
    let plain: SocketAddr = format!("127.0.0.1:{rule_port}").parse().expect("addr");
    for _ in 0..rounds {
        hit.extend(agent.ask(batch, &cache_addr));
        rule.extend(agent.ask(batch, &rule_addr));
        none.extend(connect_batch(batch, plain));
    }
    let stderr = agent.finish();
    let (p50h, p50r, p50n) = (pct(&mut hit, 0.5), pct(&mut rule, 0.5), pct(&mut none, 0.5));
    say(format!(
        "connect latency, interleaved ({rounds} rounds x {batch})"
    ));
    say(format!(
        "  cache hit:          p50 {:7.1} us  p99 {:7.1} us",
        us(p50h),
        us(pct(&mut hit, 0.99))
    ));
    say(format!(
        "  compiled-rule hit:  p50 {:7.1} us  p99 {:7.1} us",
        us(p50r),
        us(pct(&mut rule, 0.99))
    ));
    say(format!(
        "  no agent:           p50 {:7.1} us  p99 {:7.1} us",
        us(p50n),
        us(pct(&mut none, 0.99))
    ));
    say(format!(
        "  cache hit / compiled-rule hit (p50): {:.3}",
        p50h as f64 / p50r as f64
    ));
    let mut miss_ms: Vec<u64> = miss_lat.clone();
    say(format!(
        "held connect on a miss (embedded engine, n={n_miss}): p50 {:.1} ms  p99 {:.1} ms",
        pct(&mut miss_ms, 0.5) as f64 / 1e6,
        pct(&mut miss_ms, 0.99) as f64 / 1e6
    ));
    if miss_failed > 0 {
        say(format!(
            "  {miss_failed} of {n_miss} missed connects FAILED (see stderr)"
        ));
    }
    // The run's own measurement, logged at its exit: kernel miss (the
    // event's timestamp) to the verdict written into VERDICT_CACHE.
    let idle = MissLine::parse(&stderr);
    say(format!(
        "kernel miss to verdict in map, default idle: {}",
        idle.text
    ));

    // Then the same misses latency-tuned: /dev/cpu_dma_latency held at 0,
    // as a latency-sensitive deployment (or cyclictest) does: the CPUs poll
    // instead of entering idle states (here, a halt is a VM exit). And both
    // again with the other placement.
    let mut miss_rows = vec![(plans[0].0, cpus, false, idle)];
    for (i, (label, p)) in plans.iter().enumerate() {
        for tuned in [false, true] {
            if i == 0 && !tuned {
                continue; // run 1 above
            }
            let (m, _) = miss_run(&policy, *p, n_miss, &miss_addrs, tuned);
            say(format!(
                "kernel miss to verdict in map, {}{}: {}",
                if tuned {
                    "latency-tuned (cpu_dma_latency 0)"
                } else {
                    "default idle"
                },
                if i == 0 {
                    String::new()
                } else {
                    format!(", {label} ({})", p.describe())
                },
                m.text
            ));
            miss_rows.push((*label, *p, tuned, m));
        }
    }
    // Lone misses: far enough apart that the keep-warm after each (100 ms,
    // `pdp/warm.rs`) has stopped, so every decision starts cold, as the
    // first miss after a quiet spell does. Same placement as the goal row.
    let n_lone = if quick { 100 } else { 300 };
    let mut agent = Agent::start(&policy, plans[0].1);
    let lone_addrs: Vec<String> = (0..n_lone)
        .map(|i| format!("127.2.{}.{}:{miss_port}", 1 + i / 250, 1 + i % 250))
        .collect();
    let lone_failed = agent
        .ask_spaced(n_lone, &lone_addrs.join(","), LONE_GAP_MS)
        .iter()
        .filter(|l| **l == u64::MAX)
        .count();
    let mut lone = MissLine::parse(&agent.finish());
    if lone_failed > 0 {
        lone.text
            .push_str(&format!(" ({lone_failed} of {n_lone} missed connects FAILED)"));
    }
    say(format!(
        "kernel miss to verdict in map, lone misses {LONE_GAP_MS} ms apart (keep-warm expired), default idle: {}",
        lone.text
    ));
    // 4b. `pdp.busy_poll_us`: the ask thread spins for the next miss for
    // BUSY_POLL after each one instead of sleeping, on a CPU of its own
    // (the worker elsewhere), so no wakeup stands between the kernel's ask
    // and its receipt; and the verdict can be in the map before the held
    // connect's SYN reaches the egress hook, so the connect is not held
    // for a retransmit. Its CPU time is in the line.
    let busy = match Placement::own_cpu() {
        Some(p) => {
            let (m, lat) = miss_run(&busy_policy, p, n_miss, &miss_addrs, false);
            let mut lat: Vec<u64> = lat.into_iter().filter(|l| *l != u64::MAX).collect();
            let held = (!lat.is_empty()).then(|| (pct(&mut lat, 0.5), pct(&mut lat, 0.99)));
            say(format!(
                "kernel miss to verdict in map, busy-poll {} ms (pdp.busy_poll_us), default idle, {}: {}",
                BUSY_POLL.as_millis(),
                p.describe(),
                m.text
            ));
            if let Some((h50, h99)) = held {
                say(format!(
                    "held connect on a miss, busy-poll: p50 {:.2} ms  p99 {:.2} ms (without: p50 {:.1} ms)",
                    h50 as f64 / 1e6,
                    h99 as f64 / 1e6,
                    pct(&mut miss_lat.clone(), 0.5) as f64 / 1e6
                ));
            }
            Some((p, m, held))
        }
        None => {
            say("busy-poll: not measured: it needs a CPU of its own, and this machine has one".into());
            None
        }
    };
    // 5. What the kernel programs themselves take per run, on misses of a
    // stream and on cache hits back to back (the kernel's run-time
    // statistics, on only for this run): the kernel part of a miss's time
    // before the ask leaves is mostly connect4's own run, cold.
    let mut agent = Agent::start(&policy, plans[0].1);
    let n_cost = n_miss / 4;
    let cost_addrs: Vec<String> = (0..n_cost)
        .map(|i| format!("127.3.{}.{}:{miss_port}", 1 + i / 250, 1 + i % 250))
        .collect();
    agent.ask(1, &cache_addr); // the verdict the hits find
    let cost = match BpfStats::enable() {
        Ok(stats) => {
            say(format!(
                "kernel programs' run time (kernel.bpf_stats_enabled), {n_cost} misses of a stream, then {n_cost} cache hits back to back, then {n_cost} 8 ms apart, {}",
                plans[0].1.describe()
            ));
            let s0 = prog_stats();
            agent.ask(n_cost, &cost_addrs.join(","));
            let s1 = prog_stats();
            agent.ask(n_cost, &cache_addr);
            let s2 = prog_stats();
            // Hits as far apart as the misses: what is cold, not what a
            // miss does more.
            agent.ask_spaced(n_cost, &cache_addr, 8);
            let s3 = prog_stats();
            drop(stats);
            PROGS
                .iter()
                .map(|name| {
                    let per = |a: &ProgStats, b: &ProgStats| {
                        let (t0, c0) = a.get(*name).copied().unwrap_or_default();
                        let (t1, c1) = b.get(*name).copied().unwrap_or_default();
                        (c1 > c0).then(|| ((t1 - t0) / (c1 - c0), c1 - c0))
                    };
                    let text = |r: Option<(u64, u64)>| {
                        r.map_or("-".to_string(), |(ns, n)| format!("{:.2} us x{n}", ns as f64 / 1e3))
                    };
                    let (m, h, spaced) = (per(&s0, &s1), per(&s1, &s2), per(&s2, &s3));
                    say(format!(
                        "  {name:13} per run: misses {:>16}   cache hits {:>16}   cache hits 8 ms apart {:>16}",
                        text(m),
                        text(h),
                        text(spaced)
                    ));
                    (*name, m, h)
                })
                .collect::<Vec<_>>()
        }
        Err(e) => {
            say(format!("  not measured: kernel.bpf_stats_enabled: {e}"));
            Vec::new()
        }
    };
    let _ = agent.finish();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("pdp.txt"), &report);
    // The document `cargo xtask bench` collects: the connect rows, with the
    // whole text report beside them.
    let (p99h, p99r, p99n) = (pct(&mut hit, 0.99), pct(&mut rule, 0.99), pct(&mut none, 0.99));
    let doc = serde_json::json!({"benchmark": "pdp", "quick": quick, "rows": [
        {"scenario": "connect, verdict-cache hit", "p50_ns": p50h, "p99_ns": p99h,
         "baseline_p50_ns": p50r, "baseline_p99_ns": p99r,
         "ratio_p50": p50h as f64 / p50r as f64, "ratio_p99": p99h as f64 / p99r as f64,
         "note": "baseline: compiled-rule hit"},
        {"scenario": "connect, compiled-rule hit", "p50_ns": p50r, "p99_ns": p99r,
         "baseline_p50_ns": p50n, "baseline_p99_ns": p99n,
         "ratio_p50": p50r as f64 / p50n as f64, "ratio_p99": p99r as f64 / p99n as f64,
         "note": "baseline: no agent"},
        {"scenario": "decision, embedded rego (indexed rule)", "p50_ns": emb50, "p99_ns": emb99,
         "note": "goal: p50 <= 10 us; on regorus' VM, as a miss is decided"},
        {"scenario": "decision, embedded rego (indexed rule), VM against interpreter",
         "p50_ns": emb50, "p99_ns": emb99, "baseline_p50_ns": int50, "baseline_p99_ns": int99,
         "ratio_p50": emb50 as f64 / int50 as f64, "ratio_p99": emb99 as f64 / int99 as f64,
         "note": "baseline: the same rule on regorus' interpreter, interleaved"},
        {"scenario": "decision, remote pdp serve over loopback", "p50_ns": rem50, "p99_ns": rem99,
         "note": "one kept-alive HTTP connection"},
        ],
        "report": report});
    let mut doc = doc;
    for (prep, c) in COLD.iter().zip(&cold) {
        let (p50, p99) = (c.p50, c.p99);
        let scenario = format!("decision, embedded rego, {}", prep.label());
        let row = if matches!(prep, Prep::Warm) {
            serde_json::json!({"scenario": scenario, "p50_ns": p50, "p99_ns": p99,
                "note": format!("one decision right after others; baseline of the cold rows; {cold_where}")})
        } else {
            serde_json::json!({"scenario": scenario, "p50_ns": p50, "p99_ns": p99,
                "baseline_p50_ns": warm50, "baseline_p99_ns": warm99,
                "ratio_p50": p50 as f64 / warm50 as f64, "ratio_p99": p99 as f64 / warm99 as f64,
                "note": format!("one decision after the preparation (p50 {:.2} ms); baseline: warm; {cold_where}",
                    c.prep as f64 / 1e6)})
        };
        doc["rows"].as_array_mut().expect("rows").push(row);
    }
    for (i, (label, p, tuned, m)) in miss_rows.iter().enumerate() {
        let mut scenario = "kernel miss to verdict in map, embedded rego".to_string();
        if *tuned {
            scenario.push_str(", latency-tuned");
        }
        if i >= 2 {
            scenario.push_str(&format!(", {label}"));
        }
        let note = format!(
            "{}{}; {}",
            if i == 0 {
                "goal: p99 <= 100 us (this row: without busy-polling; see the busy-poll row); "
            } else {
                ""
            },
            if *tuned {
                "/dev/cpu_dma_latency held at 0"
            } else {
                "default idle states"
            },
            p.describe()
        );
        doc["rows"].as_array_mut().expect("rows").push(serde_json::json!({
            "scenario": scenario, "p50_ns": m.p50.map(|u| u * 1000),
            "p99_ns": m.p99.map(|u| u * 1000), "note": note}));
    }
    doc["rows"].as_array_mut().expect("rows").push(serde_json::json!({
        "scenario": "kernel miss to verdict in map, embedded rego, lone misses",
        "p50_ns": lone.p50.map(|u| u * 1000), "p99_ns": lone.p99.map(|u| u * 1000),
        "note": format!("{LONE_GAP_MS} ms apart: every decision after the keep-warm stopped; default idle states; {}",
            plans[0].1.describe())}));
    if let Some((p, m, held)) = &busy {
        let rows = doc["rows"].as_array_mut().expect("rows");
        rows.push(serde_json::json!({
            "scenario": "kernel miss to verdict in map, embedded rego, busy-poll",
            "p50_ns": m.p50.map(|u| u * 1000), "p99_ns": m.p99.map(|u| u * 1000),
            "note": format!("goal: p99 <= 100 us; pdp.busy_poll_us: {}; default idle states; {}", BUSY_POLL.as_micros(), p.describe())}));
        if let Some((h50, h99)) = held {
            let mut base = miss_lat.clone();
            let (b50, b99) = (pct(&mut base, 0.5), pct(&mut base, 0.99));
            rows.push(serde_json::json!({
                "scenario": "held connect on a miss, embedded rego, busy-poll",
                "p50_ns": h50, "p99_ns": h99, "baseline_p50_ns": b50, "baseline_p99_ns": b99,
                "ratio_p50": *h50 as f64 / b50 as f64, "ratio_p99": *h99 as f64 / b99 as f64,
                "note": format!("baseline: the held connects of run 1 (no busy-poll; {})", plans[0].1.describe())}));
        }
    }
    for (name, m, h) in &cost {
        if let (Some((m_ns, _)), Some((h_ns, _))) = (m, h) {
            doc["rows"].as_array_mut().expect("rows").push(serde_json::json!({
                "scenario": format!("kernel program {name}, run time on a miss of a stream"),
                "p50_ns": m_ns, "baseline_p50_ns": h_ns, "ratio_p50": *m_ns as f64 / *h_ns as f64,
                "note": "mean per run (kernel.bpf_stats_enabled); baseline: the same program on cache hits back to back"}));
        }
    }
    println!("PEP_BENCH_JSON {doc}");
    let out = std::env::var_os("PEP_BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or(dir);
    let file = if quick { "pdp-quick.json" } else { "pdp.json" };
    let _ = std::fs::write(
        out.join(file),
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    );
}

/// What precedes one timed decision in the cold section.
#[derive(Clone, Copy)]
enum Prep {
    /// Nothing: the decision right after others.
    Warm,
    /// `thread::sleep`: the vCPU may halt (a VM exit).
    Sleep(u64),
    /// A busy-wait: the thread never leaves its CPU, which never halts, so
    /// whatever is lost is lost to elapsed time alone.
    Spin(u64),
    /// One byte written per 64-byte line of `EVICT_MB`, no wait: the data
    /// cache evicted, hardly any time passed.
    Evict,
    /// One byte written per 4 KiB page of `EVICT_MB`: the TLB swept, a
    /// sixteenth of the lines touched (an eighth of L2).
    Pages,
    /// A round trip through a pipe to another process on this CPU (`cat`):
    /// what precedes a miss of the stream, whose application ran there.
    Switch,
}

/// The cold section's scenarios, measured round robin (one sample of each
/// per round) so that the host's noise hits them alike; the first is the
/// baseline.
const COLD: [Prep; 8] = [
    Prep::Warm,
    Prep::Sleep(150),
    Prep::Spin(150),
    Prep::Sleep(5),
    Prep::Spin(5),
    Prep::Evict,
    Prep::Pages,
    Prep::Switch,
];

/// Eight times the development VM's L2 (2 MiB), half its L3 (32 MiB): a
/// larger one takes milliseconds to write, which mixes elapsed time in.
const EVICT_MB: usize = 16;

impl Prep {
    fn label(self) -> String {
        match self {
            Self::Warm => "warm (back-to-back)".into(),
            Self::Sleep(ms) => format!("after {ms} ms asleep"),
            Self::Spin(ms) => format!("after {ms} ms spinning"),
            Self::Evict => format!("after evicting {EVICT_MB} MB"),
            Self::Pages => format!("after a page each of {EVICT_MB} MB"),
            Self::Switch => "after another process ran".into(),
        }
    }

    fn run(self, buf: &mut [u8], peer: &mut Peer) {
        match self {
            Self::Warm => {}
            Self::Sleep(ms) => std::thread::sleep(Duration::from_millis(ms)),
            Self::Spin(ms) => {
                let t = Instant::now();
                while t.elapsed() < Duration::from_millis(ms) {
                    std::hint::spin_loop();
                }
            }
            Self::Evict => touch(buf),
            Self::Pages => {
                for b in buf.iter_mut().step_by(4096) {
                    *b = b.wrapping_add(1);
                }
                std::hint::black_box(buf);
            }
            Self::Switch => peer.round_trip(),
        }
    }
}

/// A process pinned to the decisions' CPU that echoes what it is sent.
struct Peer {
    child: std::process::Child,
}

impl Peer {
    fn start(cpu: Option<usize>) -> Self {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new("cat");
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        if let Some(c) = cpu {
            // SAFETY: only sched_setaffinity between fork and exec.
            unsafe {
                cmd.pre_exec(move || pin(c));
            }
        }
        Self {
            child: cmd.spawn().expect("cat"),
        }
    }

    fn round_trip(&mut self) {
        use std::io::Read as _;
        let (Some(i), Some(o)) = (self.child.stdin.as_mut(), self.child.stdout.as_mut()) else {
            panic!("cat's pipes");
        };
        i.write_all(b"x").expect("to cat");
        let mut b = [0u8; 1];
        o.read_exact(&mut b).expect("from cat");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes one byte per 64-byte cache line of `buf`.
fn touch(buf: &mut [u8]) {
    for b in buf.iter_mut().step_by(64) {
        *b = b.wrapping_add(1);
    }
    // Otherwise the stores, never read, may be dropped.
    std::hint::black_box(buf);
}

/// One scenario of the cold section, in ns.
struct Cold {
    p50: u64,
    p99: u64,
    /// The preparation's own p50: the elapsed time the decision follows.
    prep: u64,
}

/// `n` samples of one decision after each of `COLD`'s preparations, on
/// `cpu`, per scenario.
fn cold_decisions(engine: &Rego, query: &Query, cpu: Option<usize>, n: usize) -> Vec<Cold> {
    if let Some(c) = cpu {
        pin(c).expect("pin the cold decisions");
    }
    let decide = || {
        let t = Instant::now();
        let d = engine.decide_now(query).expect("embedded").expect("decide");
        let ns = t.elapsed().as_nanos() as u64;
        assert!(d.answer.allow, "cold decision denied");
        ns
    };
    let mut buf = vec![0u8; EVICT_MB << 20];
    // Its pages faulted in now, so that an eviction does not fault.
    touch(&mut buf);
    let mut peer = Peer::start(cpu);
    peer.round_trip();
    let mut lat = vec![(Vec::with_capacity(n), Vec::with_capacity(n)); COLD.len()];
    for _ in 0..n {
        for (prep, (lat, took)) in COLD.iter().zip(&mut lat) {
            // Every preparation starts from the same warm state.
            for _ in 0..10 {
                decide();
            }
            let t = Instant::now();
            prep.run(&mut buf, &mut peer);
            took.push(t.elapsed().as_nanos() as u64);
            lat.push(decide());
        }
    }
    lat.into_iter()
        .map(|(mut lat, mut took)| Cold {
            p50: pct(&mut lat, 0.5),
            p99: pct(&mut lat, 0.99),
            prep: pct(&mut took, 0.5),
        })
        .collect()
}

/// Pins the calling thread (and what it starts later) to `cpu`.
fn pin(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays in bounds
    // for any CPU below CPU_SETSIZE, which sched_setaffinity checks.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Where the miss measurement runs: pep-agent (all its threads, the ask
/// thread among them) on one CPU, the connecting worker on one CPU.
///
/// Two placements are measured, the first giving the goal's figure:
/// - same CPU (the last): the miss's wakeup preempts the worker's connect
///   on its own CPU (the ask thread is real-time), as on a machine whose
///   CPUs are all busy with the application;
/// - apart (agent on the last CPU, worker on CPU 0): the wakeup crosses to
///   an idle CPU. Here every vCPU halt is a VM exit (cpuidle haltpoll,
///   `guest_halt_poll_ns` 0), so this measures mostly the hypervisor's
///   wakeup of an idle vCPU; the latency-tuned runs show it without.
///
/// `PEP_BENCH_PDP_CPUS=AGENT,WORKER` measures that placement only; `none`:
/// unpinned.
#[derive(Clone, Copy)]
struct Placement {
    agent: Option<usize>,
    worker: Option<usize>,
}

impl Placement {
    fn plans() -> Vec<(&'static str, Self)> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        let at = |agent, worker| Self {
            agent: Some(agent),
            worker: Some(worker),
        };
        match std::env::var("PEP_BENCH_PDP_CPUS").ok().as_deref() {
            Some("none") => vec![(
                "unpinned",
                Self {
                    agent: None,
                    worker: None,
                },
            )],
            Some(v) => {
                let c: Vec<usize> = v
                    .split(',')
                    .map(|c| c.trim().parse().expect("PEP_BENCH_PDP_CPUS: AGENT,WORKER"))
                    .collect();
                assert!(c.len() == 2, "PEP_BENCH_PDP_CPUS: AGENT,WORKER");
                vec![("as given", at(c[0], c[1]))]
            }
            None if n >= 2 => vec![("same CPU", at(n - 1, n - 1)), ("apart", at(n - 1, 0))],
            None => vec![("same CPU", at(0, 0))],
        }
    }

    /// Where the busy-poll run goes: the ask thread on a CPU the worker
    /// does not use. `PEP_BENCH_PDP_CPUS` decides if given (even one CPU
    /// for both: the cost of sharing); else the last CPU and CPU 0; with
    /// one CPU, nowhere.
    fn own_cpu() -> Option<Self> {
        let plans = Self::plans();
        match plans.as_slice() {
            [(_, p)] if std::env::var_os("PEP_BENCH_PDP_CPUS").is_some() => Some(*p),
            _ => plans.iter().find(|(l, _)| *l == "apart").map(|(_, p)| *p),
        }
    }

    fn describe(&self) -> String {
        let cpu = |c: Option<usize>| c.map_or("unpinned".to_string(), |c| format!("CPU {c}"));
        format!(
            "pep-agent and its ask thread on {}, connecting worker on {}",
            cpu(self.agent),
            cpu(self.worker)
        )
    }
}

/// `pdp.busy_poll_us` of the busy-poll run: the keep-warm's window.
const BUSY_POLL: Duration = Duration::from_millis(100);

/// How far apart lone misses are: past the keep-warm's 100 ms.
const LONE_GAP_MS: u64 = 150;

/// One `pep-agent run` that only misses (`n` distinct destinations), with
/// `/dev/cpu_dma_latency` held at 0 if `tuned`; and the connects' own
/// latencies (ns, `u64::MAX`: failed).
fn miss_run(policy: &Path, cpus: Placement, n: usize, addrs: &str, tuned: bool) -> (MissLine, Vec<u64>) {
    let held = if tuned {
        match DmaLatency::hold() {
            Ok(h) => Some(h),
            Err(e) => {
                let m = MissLine {
                    text: format!("not measured: /dev/cpu_dma_latency: {e}"),
                    p50: None,
                    p99: None,
                };
                return (m, Vec::new());
            }
        }
    } else {
        None
    };
    let mut agent = Agent::start(policy, cpus);
    let lat = agent.ask(n, addrs);
    let failed = lat.iter().filter(|l| **l == u64::MAX).count();
    let mut m = MissLine::parse(&agent.finish());
    drop(held);
    if failed > 0 {
        m.text
            .push_str(&format!(" ({failed} of {n} missed connects FAILED)"));
    }
    (m, lat)
}

/// `pep-agent run` of the bench policy around a worker that connects on
/// request.
struct Agent {
    run: std::process::Child,
    win: std::process::ChildStdin,
    wout: BufReader<std::process::ChildStdout>,
    err_thread: std::thread::JoinHandle<String>,
}

impl Agent {
    fn start(policy: &Path, cpus: Placement) -> Self {
        use std::os::unix::process::CommandExt as _;
        let me = std::env::current_exe().expect("exe");
        let mut cmd = Command::new(pep_agent_bin());
        cmd.args(["run", "--policy"])
            .arg(policy)
            .arg("--")
            .arg(&me)
            .arg("--worker")
            .args(cpus.worker.map(|c| c.to_string()))
            .env("PEP_LOG", "warn,pep_agent::pdp=info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(c) = cpus.agent {
            // SAFETY: only sched_setaffinity, async-signal-safe, between fork
            // and exec.
            unsafe {
                cmd.pre_exec(move || pin(c));
            }
        }
        let mut run = cmd.spawn().expect("pep-agent run");
        // Drained as it comes: a full pipe would stall pep-agent's logging.
        let err_pipe = run.stderr.take().expect("stderr");
        let err_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(err_pipe), &mut s);
            s
        });
        let win = run.stdin.take().expect("stdin");
        let wout = BufReader::new(run.stdout.take().expect("stdout"));
        Self {
            run,
            win,
            wout,
            err_thread,
        }
    }

    /// `n` connects, round robin over `addrs`: their latencies in ns
    /// (`u64::MAX`: failed).
    fn ask(&mut self, n: usize, addrs: &str) -> Vec<u64> {
        self.ask_spaced(n, addrs, 0)
    }

    /// As `ask`, with `gap_ms` before each connect.
    fn ask_spaced(&mut self, n: usize, addrs: &str, gap_ms: u64) -> Vec<u64> {
        writeln!(self.win, "{n} {addrs} {gap_ms}").expect("to worker");
        self.win.flush().expect("flush");
        let mut line = String::new();
        self.wout.read_line(&mut line).expect("from worker");
        line.split_whitespace().map(|x| x.parse().expect("ns")).collect()
    }

    /// Ends the run; its stderr.
    fn finish(self) -> String {
        let Self {
            mut run,
            win,
            err_thread,
            ..
        } = self;
        drop(win);
        let _ = run.wait().expect("run");
        let stderr = err_thread.join().unwrap_or_default();
        for l in stderr
            .lines()
            .filter(|l| l.contains("worker:") || l.contains("ERROR"))
            .take(5)
        {
            eprintln!("{l}");
        }
        stderr
    }
}

/// The programs whose run time section 5 reports.
const PROGS: [&str; 3] = ["connect4", "ask_sock_ops", "ask_egress"];

/// Run time (ns) and count of the loaded programs by name, summed.
type ProgStats = std::collections::HashMap<String, (u64, u64)>;

/// `bpftool prog show` (installed by `cargo xtask setup`).
fn prog_stats() -> ProgStats {
    let out = Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .expect("bpftool prog show");
    let progs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("bpftool json");
    let mut by_name = ProgStats::new();
    for p in progs {
        let (Some(name), Some(t), Some(n)) = (
            p["name"].as_str(),
            p["run_time_ns"].as_u64(),
            p["run_cnt"].as_u64(),
        ) else {
            continue;
        };
        let e = by_name.entry(name.to_string()).or_default();
        e.0 += t;
        e.1 += n;
    }
    by_name
}

/// The kernel's BPF run-time statistics on while this lives (the sysctl as
/// it was, after).
struct BpfStats {
    was: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> std::io::Result<Self> {
        let was = std::fs::read_to_string(BPF_STATS)?;
        std::fs::write(BPF_STATS, "1")?;
        Ok(Self { was })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.was.trim());
    }
}

/// The run's `pdp: miss-to-verdict` log line.
struct MissLine {
    text: String,
    p50: Option<u64>,
    p99: Option<u64>,
}

impl MissLine {
    fn parse(stderr: &str) -> Self {
        let Some(line) = stderr
            .lines()
            .find_map(|l| l.split("pdp: miss-to-verdict ").nth(1))
        else {
            return Self {
                text: format!("not reported; stderr:\n{stderr}"),
                p50: None,
                p99: None,
            };
        };
        let field = |name: &str| -> Option<u64> {
            line.split([' ', ';'])
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        };
        // What keeping the engine warm between misses cost (its own line).
        let warm = stderr
            .lines()
            .find_map(|l| l.split("pdp: keep-warm ").nth(1))
            .map_or(String::new(), |w| format!("; keep-warm {w}"));
        Self {
            text: format!("{line}{warm}"),
            p50: field("p50_us"),
            p99: field("p99_us"),
        }
    }
}

/// `/dev/cpu_dma_latency` held at 0 µs while this lives (the kernel's PM QoS
/// request ends when the file is closed).
struct DmaLatency {
    _held: std::fs::File,
}

impl DmaLatency {
    fn hold() -> std::io::Result<Self> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/cpu_dma_latency")?;
        f.write_all(&0i32.to_ne_bytes())?;
        Ok(Self { _held: f })
    }
}
