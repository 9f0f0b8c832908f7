//! The host daemon keeps sandboxes enforced whatever happens to it: SIGKILL
//! while a sandboxed process hammers denied and allowed connects lets no
//! denied connect through, a restarted daemon adopts the same sandboxes
//! and continues the audit chain; a reload swaps policies with no window
//! where an action both deny gets through; a bad policy changes nothing.

use std::time::Duration;

use pep_tests::{daemon::*, *};

fn deny_policy(port: u16, extra_deny: Option<u16>) -> String {
    let mut p = format!(
        "apiVersion: pep/v1\nname: hammer\nnetwork:\n  default: allow\n  rules:\n    - deny: {{ cidr: 127.0.0.1/32, ports: [{port}] }}\n"
    );
    if let Some(x) = extra_deny {
        p.push_str(&format!("    - deny: {{ cidr: 127.0.0.0/8, ports: [{x}] }}\n"));
    }
    p
}

#[test]
fn sigkill_leaves_sandboxes_enforced_and_a_restart_adopts_them() {
    let allowed = tcp_server("127.0.0.1:0");
    let denied = tcp_server("127.0.0.1:0");
    let mut d = TestDaemon::new(
        "dkill",
        &[("hammer", &deny_policy(denied.port(), None))],
        "",
        false,
    );
    d.start();
    let r = d.request(r#"{"op":"create","name":"hammer","policy":"hammer"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let cg = d.cgroup("hammer");
    let probes = [format!("tcp:{denied}"), format!("tcp:{allowed}")];
    let h = Hammer::start(&d.scratch.dir, "h1", &cg, &probes);

    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    // The daemon is dead: the hammer goes on, and so does enforcement.
    std::thread::sleep(Duration::from_millis(1500));
    d.start();
    std::thread::sleep(Duration::from_millis(300));
    let counts = h.finish();

    assert_eq!(
        count(&counts, &probes[0], "OK"),
        0,
        "a denied connect succeeded: {counts}"
    );
    assert!(count(&counts, &probes[0], "EPERM") > 0, "{counts}");
    assert!(count(&counts, &probes[1], "OK") > 0, "{counts}");
    assert_eq!(count(&counts, &probes[1], "EPERM"), 0, "{counts}");

    // The same sandbox, adopted, still enforced.
    let list = d.request(r#"{"op":"list"}"#);
    let names: Vec<&str> = list["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["hammer"], "{list}");
    let status = d.request(r#"{"op":"status"}"#);
    assert_eq!(status["data"]["origin"], "adopted", "{status}");
    let h = Hammer::start(&d.scratch.dir, "h2", &cg, &probes);
    let counts = h.finish();
    assert_eq!(count(&counts, &probes[0], "OK"), 0, "{counts}");

    // One programme copy per hook on the cgroup, not two.
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&cg)
        .output()
        .expect("bpftool");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    assert_eq!(progs.as_array().map(Vec::len), Some(4), "{progs}");

    // The audit chain runs unbroken across the restart.
    d.stop();
    let v = d.cli(None, &["events", "verify", d.audit.to_str().expect("utf8")]);
    assert!(v.status.success(), "{}", describe(&v));
    let recs = read_audit(&d.audit);
    assert!(
        recs.iter()
            .any(|r| r["sandbox"] == "hammer" && r["verdict"] == "deny")
    );
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().expect("seq")).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "seq has holes");

    // Uninstall removes all pinned state and the sandbox.
    d.uninstall();
    assert!(!cg.exists(), "cgroup left");
}

#[test]
fn reload_race_lets_nothing_through_that_both_policies_deny() {
    let denied = tcp_server("127.0.0.1:0");
    let other = tcp_server("127.0.0.1:0");
    let a = deny_policy(denied.port(), None);
    let b = deny_policy(denied.port(), Some(other.port()));
    let mut d = TestDaemon::new("dreload", &[("p", &a)], "", false);
    d.start();
    assert_eq!(
        d.request(r#"{"op":"create","name":"race","policy":"p"}"#)["ok"],
        true,
        "{}",
        d.logs()
    );
    let probes = [format!("tcp:{denied}")];
    let h = Hammer::start(&d.scratch.dir, "race", &d.cgroup("race"), &probes);
    let mut ids = std::collections::HashSet::new();
    for i in 0..100 {
        std::fs::write(d.policy_path("p"), if i % 2 == 0 { &b } else { &a }).expect("write policy");
        let r = d.request(r#"{"op":"reload","name":"race"}"#);
        assert_eq!(r["ok"], true, "reload {i}: {r}");
        ids.insert(r["data"]["reloaded"][0]["sandbox_id"].as_u64().expect("id"));
    }
    let counts = h.finish();
    assert_eq!(
        count(&counts, &probes[0], "OK"),
        0,
        "a connect denied by both got through: {counts}"
    );
    assert!(count(&counts, &probes[0], "EPERM") > 100, "{counts}");
    assert_eq!(ids.len(), 100, "every reload is a new generation");

    // A bad policy leaves the running one in force and says why.
    let before = d.request(r#"{"op":"list"}"#)["data"][0]["revision"].clone();
    std::fs::write(
        d.policy_path("p"),
        "apiVersion: pep/v1\nnetwork:\n  default: nope\n",
    )
    .expect("write");
    let r = d.request(r#"{"op":"reload","name":"race"}"#);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["code"], "invalid_policy", "{r}");
    assert!(r["error"].as_str().unwrap_or_default().contains("p.yaml"), "{r}");
    assert_eq!(d.request(r#"{"op":"list"}"#)["data"][0]["revision"], before);
    let h = Hammer::start(&d.scratch.dir, "after", &d.cgroup("race"), &probes);
    assert_eq!(count(&h.finish(), &probes[0], "OK"), 0);

    // SIGHUP reloads everything (here: back to a good policy).
    std::fs::write(d.policy_path("p"), &b).expect("write");
    d.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while d.request(r#"{"op":"list"}"#)["data"][0]["revision"] == before {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let probe = std::process::Command::new("python3")
        .arg(net_probe())
        .args(["tcp", "127.0.0.1", &other.port().to_string()])
        .output()
        .expect("probe");
    assert_eq!(
        probe_results(&probe),
        ["OK"],
        "outside the sandbox nothing changes"
    );
    d.stop();
}
