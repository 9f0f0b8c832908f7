//! What the kernel does with a miss it cannot ask about, in a daemon's
//! sandbox whose policy asks a PDP: every miss is still denied, and every
//! miss is either recorded or counted in-band, never silently gone.
//!
//! Two limits, both reached while the daemon is down (nothing reads the
//! `ASKS` ring and no PDP answers, so nothing is freed):
//! - the `ASKS` ring (1 MiB): a network miss's ask is its record, so a miss
//!   that finds it full is reported as `audit.lost` with `reason: ask`;
//! - the table of held connects (`PENDING`, 16,384): a connect that finds it
//!   full fails at once with EPERM and is recorded through the audit ring,
//!   `source: default`.

use std::{
    collections::HashMap,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pep_tests::{daemon::*, *};
use serde_json::Value;

/// The kernel's table of held connects (`PENDING` in `pep-ebpf/src/ask.rs`).
const PENDING_ENTRIES: u64 = 16_384;
const TCP_FROM: u16 = 20_000;
/// Past the table, so that some connects cannot be held.
const TCP_N: u64 = PENDING_ENTRIES + 300;
const UDP_FROM: u16 = 40_000;
const UDP_N: u64 = 1_500;

#[test]
fn a_miss_the_kernel_cannot_ask_about_is_denied_and_recorded_or_counted() {
    let s = Scratch::new("dask-full");
    let rego = s.write(
        "deny.rego",
        "package pep\ndefault decision := {\"allow\": false, \"reason\": \"nothing is allowed\"}\n",
    );
    let policy = format!(
        "apiVersion: pep/v1\nname: flood\nnetwork:\n  default: ask\n\
         pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n",
        rego.display()
    );
    let mut d = TestDaemon::new("dask-full", &[("flood", &policy)], "", false);
    d.start();
    let r = d.request(r#"{"op":"create","name":"flood","policy":"flood"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let cg = d.cgroup("flood");
    let lost_before = d.counters().losses();

    d.kill9();
    let flood = flood(&cg);
    let tcp = &flood["tcp"];
    let held = tcp["EINPROGRESS"].as_u64().unwrap_or(0);
    let refused = tcp["EPERM"].as_u64().unwrap_or(0);
    assert_eq!(held + refused, TCP_N, "only held or refused: {tcp}");
    assert!(
        refused > 0 && held <= PENDING_ENTRIES,
        "the table of held connects did not fill: {tcp}"
    );
    assert_eq!(flood["udp"], serde_json::json!({"EPERM": UDP_N}), "{flood}");
    let lost = d.counters().losses();
    let ask_lost = lost.ask - lost_before.ask;
    assert!(ask_lost > 0, "the ASKS ring did not fill: {lost:?}");
    // The UDP sends came after the ring was full.
    assert!(ask_lost >= UDP_N, "{ask_lost} asks lost");

    // Restarted, the daemon answers what the ring holds and reports the
    // rest.
    d.start();
    caught_up(&d);
    d.stop();
    let recs = read_audit(&d.audit);
    let v = d.cli(None, &["events", "verify", d.audit.to_str().expect("utf8")]);
    assert!(v.status.success(), "{}", describe(&v));

    let counted: u64 = recs
        .iter()
        .filter(|r| r["action"] == "audit.lost" && r["reason"] == "ask")
        .map(|r| r["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(counted, ask_lost, "reported once, all of them");
    // One record per port at most, and every one a deny.
    let mut by_port: HashMap<u64, Vec<&Value>> = HashMap::new();
    for r in recs
        .iter()
        .filter(|r| r["sandbox"] == "flood" && (r["action"] == "net.connect" || r["action"] == "net.send"))
    {
        by_port
            .entry(r["net"]["dport"].as_u64().expect("dport"))
            .or_default()
            .push(r);
    }
    for (port, rs) in &by_port {
        assert_eq!(rs.len(), 1, "port {port}: {rs:#?}");
        assert_eq!(rs[0]["verdict"], "deny", "{:#}", rs[0]);
    }
    // The connects that could not be held: recorded by the kernel.
    for port in flood["tcp_failed_ports"].as_array().expect("ports") {
        let rs = by_port
            .get(&port.as_u64().expect("port"))
            .unwrap_or_else(|| panic!("no record of the refused connect to {port}"));
        assert_eq!(
            (rs[0]["action"].as_str(), rs[0]["source"].as_str()),
            (Some("net.connect"), Some("default")),
            "{:#}",
            rs[0]
        );
    }
    // Every miss is a record or part of the count.
    let in_flood = |p: u64| {
        (u64::from(TCP_FROM)..u64::from(TCP_FROM) + TCP_N).contains(&p)
            || (u64::from(UDP_FROM)..u64::from(UDP_FROM) + UDP_N).contains(&p)
    };
    let recorded = by_port.keys().filter(|p| in_flood(**p)).count() as u64;
    eprintln!(
        "{TCP_N} connects ({held} held, {refused} refused at once) and {UDP_N} sends: \
         {recorded} recorded, {counted} counted lost (reason ask)"
    );
    assert_eq!(
        recorded + counted,
        TCP_N + UDP_N,
        "{recorded} misses recorded, {counted} counted lost"
    );
    d.uninstall();
}

/// Runs `tests/scripts/ask_flood.py` in cgroup `cg`; its JSON report.
fn flood(cg: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ask_flood.py");
    let procs = cg.join("cgroup.procs");
    let mut cmd = Command::new("python3");
    cmd.arg(script)
        .args([
            "127.0.0.1".to_owned(),
            TCP_FROM.to_string(),
            TCP_N.to_string(),
            UDP_FROM.to_string(),
            UDP_N.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: a write(2) to a cgroup file between fork and exec.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, "0"));
    }
    let out = cmd.output().expect("flood");
    assert!(out.status.success(), "flood: {}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("flood output: {e}\n{}", describe(&out)))
}

/// Waits for the restarted daemon to write what the ring held and the
/// `audit.lost` count: the record count unchanged for a second.
fn caught_up(d: &TestDaemon) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = 0;
    let mut still_since = Instant::now();
    loop {
        // The line being written may be partial: whole lines only.
        let text = std::fs::read_to_string(&d.audit).unwrap_or_default();
        let recs: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let reported = recs
            .iter()
            .any(|r| r["action"] == "audit.lost" && r["reason"] == "ask");
        if recs.len() != last {
            last = recs.len();
            still_since = Instant::now();
        } else if reported && still_since.elapsed() > Duration::from_secs(1) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not catch up: {last} records\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
