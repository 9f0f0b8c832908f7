//! The daemon's audit log accounts for every decision the kernel made, even
//! when the daemon is killed with SIGKILL in the middle of a flood: each is
//! a record (or part of one's `count`) or part of an `audit.lost` count. A
//! killed daemon may leave its last batch to be written again by the next
//! one, never unwritten.

use std::time::Duration;

use pep_tests::{daemon::*, *};

/// Most events a daemon reads before it writes them and moves the ring
/// buffer's position (the audit task's batch).
const BATCH: u64 = 4096;

#[test]
fn sigkill_mid_flood_loses_no_decision_from_the_log() {
    let denied = tcp_server("127.0.0.1:0");
    let policy = format!(
        "apiVersion: pep/v1\nname: flood\nnetwork:\n  default: allow\n  rules:\n    - deny: {{ cidr: 127.0.0.1/32, ports: [{}] }}\n",
        denied.port()
    );
    let mut d = TestDaemon::new("daudit", &[("flood", &policy)], "", false);
    d.start();
    let r = d.request(r#"{"op":"create","name":"flood","policy":"flood"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let cg = d.cgroup("flood");
    let probes = [format!("tcp:{denied}")];
    let h = Hammer::start(&d.scratch.dir, "flood", &cg, &probes);

    // Killed while it writes a flood it cannot keep up with: mid-batch.
    let kills = 4;
    for i in 0..kills {
        std::thread::sleep(Duration::from_millis(300 + 150 * i));
        d.kill9();
        std::thread::sleep(Duration::from_millis(200));
        d.start();
    }
    std::thread::sleep(Duration::from_millis(300));
    let counts = h.finish();
    assert_eq!(count(&counts, &probes[0], "OK"), 0, "{counts}");
    // Caught up, then stopped (SIGTERM writes everything it read).
    std::thread::sleep(Duration::from_millis(1500));
    d.stop();

    let counters = d.counters();
    let (decisions, dropped) = (counters.decisions(), counters.lost());
    let recs = read_audit(&d.audit);
    let recorded: u64 = recs
        .iter()
        .filter(|r| r["sandbox"] == "flood" && r["action"] == "net.connect")
        .map(|r| r["count"].as_u64().unwrap_or(1))
        .sum();
    let lost = |reason: &str| -> u64 {
        recs.iter()
            .filter(|r| r["action"] == "audit.lost" && r["reason"] == reason)
            .map(|r| r["count"].as_u64().expect("count"))
            .sum()
    };
    let (kernel, decode) = (lost("kernel"), lost("decode"));
    assert_eq!(kernel, dropped, "every drop reported once");
    assert_eq!(decode, 0, "events that did not decode");
    let accounted = recorded + kernel;
    assert!(
        decisions > 10 * BATCH,
        "the flood was too small to test anything: {decisions} decisions"
    );
    assert!(
        accounted >= decisions,
        "decisions missing from the log: the kernel made {decisions}, the log accounts for {accounted} \
         ({recorded} recorded, {kernel} dropped); {} missing",
        decisions - accounted
    );
    // Written twice at most: the batch a killed daemon had written but not
    // yet given back.
    assert!(
        accounted <= decisions + kills * BATCH,
        "{accounted} accounted for {decisions} decisions"
    );
    let v = d.cli(None, &["events", "verify", d.audit.to_str().expect("utf8")]);
    assert!(v.status.success(), "{}", describe(&v));
}
