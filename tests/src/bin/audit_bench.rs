//! Audit pipeline benchmark (run as root, release build):
//!
//! ```sh
//! cargo build --release -p pep-agent -p pep-tests --bins
//! sudo target/release/audit_bench [OUT_DIR]
//! ```
//!
//! Measures, with a sandboxed `flood` process making denied calls on one
//! core and pep-agent's pipeline on the other:
//! 1. the kernel-side rate of denied UDP sends, unpaced, and how much of it
//!    the pipeline recorded;
//! 2. the highest sustained rate written as JSON lines with zero loss
//!    (paced floods, bisected);
//! 3. the p99 latency of a denied TCP connect with the pipeline idle, with
//!    it saturated, and outside any sandbox.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

struct Flood {
    calls: u64,
    ns: u64,
    p50: u64,
    p99: u64,
}

struct Run {
    flood: Flood,
    recorded: u64,
    lost: u64,
    records: u64,
    secs: f64,
}

fn beside(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().expect("dir").join(name)
}

fn parse_flood(out: &str) -> Flood {
    let line = out
        .lines()
        .find(|l| l.starts_with("calls "))
        .unwrap_or_else(|| panic!("flood said: {out}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let get = |k: &str| -> u64 {
        f.iter()
            .position(|w| *w == k)
            .and_then(|i| f.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    Flood {
        calls: get("calls"),
        ns: get("ns"),
        p50: get("p50_ns"),
        p99: get("p99_ns"),
    }
}

fn run(dir: &Path, policy: &Path, flood_args: &[String]) -> Run {
    let log = dir.join("bench.jsonl");
    let _ = std::fs::remove_file(&log);
    let t0 = Instant::now();
    let out = Command::new(beside("pep-agent"))
        .args(["run", "--policy"])
        .arg(policy)
        .arg("--audit")
        .arg(&log)
        .arg("--")
        .arg(beside("flood"))
        .args(flood_args)
        .output()
        .expect("spawn pep-agent");
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "pep-agent: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flood = parse_flood(&String::from_utf8_lossy(&out.stdout));
    let (mut recorded, mut lost, mut records) = (0, 0, 0);
    for l in std::fs::read_to_string(&log).expect("log").lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("record");
        records += 1;
        let c = v["count"].as_u64();
        if v["action"] == "audit.lost" {
            lost += c.unwrap_or(0);
        } else {
            recorded += c.unwrap_or(1);
        }
    }
    Run {
        flood,
        recorded,
        lost,
        records,
        secs,
    }
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("pep-audit-bench"));
    std::fs::create_dir_all(&dir).expect("out dir");
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: pep/v1\nname: bench\nnetwork:\n  default: deny\n",
    )
    .expect("policy");
    let mut report = String::new();
    let mut say = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    say(format!(
        "audit_bench: {} cores, kernel {}",
        cores,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    ));

    // 1. Unpaced.
    let n = 2_000_000u64;
    let r = run(&dir, &policy, &[s("127.0.0.1"), s("9"), n.to_string(), s("udp")]);
    let rate = r.flood.calls as f64 / (r.flood.ns as f64 / 1e9);
    say(format!(
        "unpaced: {} denied sendto in {:.2} s = {:.0}/s (kernel side); recorded {} ({:.1}%), lost {} (in-band), {} lines",
        r.flood.calls,
        r.flood.ns as f64 / 1e9,
        rate,
        r.recorded,
        100.0 * r.recorded as f64 / n as f64,
        r.lost,
        r.records
    ));
    assert_eq!(r.recorded + r.lost, n, "accounting");

    // 2. Highest zero-loss pace, calls per ms, bisected; 3 s per try.
    let (mut lo, mut hi) = (10u64, (rate / 1000.0).ceil() as u64 + 1);
    let mut best: Option<(u64, f64)> = None;
    while hi - lo > hi / 20 + 1 {
        let mid = (lo + hi) / 2;
        let calls = mid * 3000;
        let r = run(
            &dir,
            &policy,
            &[
                s("127.0.0.1"),
                s("9"),
                calls.to_string(),
                s("udp"),
                mid.to_string(),
            ],
        );
        let achieved = r.flood.calls as f64 / (r.flood.ns as f64 / 1e9);
        say(format!(
            "  paced {mid}/ms: {:.0} calls/s, lost {}, run {:.1} s",
            achieved, r.lost, r.secs
        ));
        if r.lost == 0 {
            lo = mid;
            best = Some((mid, achieved));
        } else {
            hi = mid;
        }
    }
    match best {
        Some((pace, achieved)) => say(format!(
            "sustained with zero loss: {achieved:.0} records/s written as JSON lines ({pace} per ms)"
        )),
        None => say("sustained with zero loss: below 10 per ms".into()),
    }

    // 3. Denied connect latency.
    // Every 64th call is a timed denied TCP connect; the others are UDP
    // sends, paced low (pipeline idle) or unpaced (pipeline saturated).
    let idle = run(
        &dir,
        &policy,
        &[s("127.0.0.1"), s("9"), s("320000"), s("mixed"), s("100")],
    );
    let sat = run(&dir, &policy, &[s("127.0.0.1"), s("9"), s("2000000"), s("mixed")]);
    let bare = Command::new(beside("flood"))
        .args(["127.0.0.1", "9", "200000", "tcp"])
        .output()
        .expect("flood");
    let bare = parse_flood(&String::from_utf8_lossy(&bare.stdout));
    say(format!(
        "denied connect (socket+connect+close) latency: pipeline keeping up (100 calls/ms) p50 {} ns p99 {} ns; \
         pipeline saturated ({:.0} calls/s, lost {}) p50 {} ns p99 {} ns: p99 gain {} ns; unsandboxed (refused) \
         p50 {} ns p99 {} ns",
        idle.flood.p50,
        idle.flood.p99,
        sat.flood.calls as f64 / (sat.flood.ns as f64 / 1e9),
        sat.lost,
        sat.flood.p50,
        sat.flood.p99,
        sat.flood.p99 as i64 - idle.flood.p99 as i64,
        bare.p50,
        bare.p99
    ));
    let _ = std::fs::write(dir.join("audit_bench.txt"), &report);
}

fn s(x: &str) -> String {
    x.to_string()
}
