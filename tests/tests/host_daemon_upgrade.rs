//! A daemon started over pins another build left (an upgrade, a downgrade,
//! or a build from before build stamps) does not adopt them: it loads its
//! own programs, installs every sandbox again and only then removes the old
//! build's, so a sandboxed process hammering a denied port never gets
//! through, the old programs are gone from the cgroup and the kernel, and
//! the old ring buffer's undecodable records are counted in the audit log.

use std::{os::fd::AsFd as _, path::Path, time::Duration};

use pep_agent::enforcer::pinned::{obj_get, prog_id};
use pep_tests::{daemon::*, *};

fn policy(denied: u16) -> String {
    format!(
        "apiVersion: pep/v1\nname: hammer\nnetwork:\n  default: allow\n  rules:\n    - deny: {{ cidr: 127.0.0.1/32, ports: [{denied}] }}\n"
    )
}

/// The network programs: attached to every sandbox's cgroup (the holding
/// programs, pinned beside them, only to sandboxes that ask a PDP).
const NET_PROGRAMS: [&str; 4] = ["connect4", "connect6", "sendmsg4", "sendmsg6"];

/// The ids of the programs pinned under `pin_dir/progs`, all of them or
/// the network programs only.
fn pinned_ids(pin_dir: &Path, net_only: bool) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(pin_dir.join("progs"))
        .expect("progs")
        .flatten()
        .filter(|e| !net_only || NET_PROGRAMS.iter().any(|n| e.file_name() == *n))
        .map(|e| {
            let fd = obj_get(&e.path()).unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            prog_id(fd.as_fd()).expect("prog id")
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// The ids of the programs attached to `cg`, every hook.
fn attached(cg: &Path) -> Vec<u32> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cg)
        .output()
        .expect("bpftool");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    let mut ids: Vec<u32> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["id"].as_u64().expect("id") as u32)
        .collect();
    ids.sort_unstable();
    ids
}

fn prog_exists(id: u32) -> bool {
    std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool")
        .status
        .success()
}

/// The stamps in `pin_dir`.
fn stamps(pin_dir: &Path) -> Vec<String> {
    std::fs::read_dir(pin_dir)
        .expect("pin dir")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("build-").map(str::to_owned))
        .collect()
}

/// Makes the pins look like another build's: a different stamp, or none.
fn foreign(pin_dir: &Path, stamp: Option<&str>) {
    for s in stamps(pin_dir) {
        std::fs::remove_dir(pin_dir.join(format!("build-{s}"))).expect("unstamp");
    }
    if let Some(s) = stamp {
        std::fs::create_dir(pin_dir.join(format!("build-{s}"))).expect("stamp");
    }
}

#[test]
fn pins_of_another_build_are_replaced_without_a_gap() {
    let allowed = tcp_server("127.0.0.1:0");
    let denied = tcp_server("127.0.0.1:0");
    let mut d = TestDaemon::new("dupg", &[("hammer", &policy(denied.port()))], "", false);
    d.start();
    let r = d.request(r#"{"op":"create","name":"hammer","policy":"hammer"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let cg = d.cgroup("hammer");
    let probes = [format!("tcp:{denied}"), format!("tcp:{allowed}")];
    let status = d.request(r#"{"op":"status"}"#);
    let build = status["data"]["build"].as_str().expect("build").to_owned();
    assert!(build.starts_with("sha256:"), "{status}");
    assert_eq!(stamps(&d.pin_dir), std::slice::from_ref(&build));

    for (round, stamp) in [Some("sha256:0000-another-build"), None].into_iter().enumerate() {
        let h = Hammer::start(&d.scratch.dir, &format!("h{round}"), &cg, &probes);
        let old = pinned_ids(&d.pin_dir, false);
        assert_eq!(old.len(), 6, "network and holding programs: {old:?}");
        assert_eq!(
            attached(&cg),
            pinned_ids(&d.pin_dir, true),
            "before round {round}"
        );
        std::thread::sleep(Duration::from_millis(200));
        d.kill9();
        // Denied connects go on being denied, and recorded into the ring
        // buffer that no one reads while the daemon is down.
        std::thread::sleep(Duration::from_millis(500));
        foreign(&d.pin_dir, stamp);
        d.start();
        std::thread::sleep(Duration::from_millis(300));
        let counts = h.finish();

        assert_eq!(
            count(&counts, &probes[0], "OK"),
            0,
            "round {round}: a denied connect succeeded: {counts}\n{}",
            d.logs()
        );
        assert!(count(&counts, &probes[0], "EPERM") > 0, "{counts}");
        assert!(count(&counts, &probes[1], "OK") > 0, "{counts}");
        assert_eq!(count(&counts, &probes[1], "EPERM"), 0, "{counts}");

        let status = d.request(r#"{"op":"status"}"#);
        assert_eq!(
            status["data"]["origin"],
            "replaced",
            "round {round}: {status}\n{}",
            d.logs()
        );
        assert_eq!(status["data"]["build"], build.as_str(), "{status}");
        assert_eq!(status["data"]["retired"], serde_json::json!([]), "{status}");
        assert_eq!(stamps(&d.pin_dir), std::slice::from_ref(&build));
        // The new programs, and only they, are on the cgroup; the old ones
        // are gone from the kernel.
        let new = pinned_ids(&d.pin_dir, false);
        assert_eq!(new.len(), 6, "{new:?}");
        assert!(new.iter().all(|id| !old.contains(id)), "old {old:?} new {new:?}");
        assert_eq!(attached(&cg), pinned_ids(&d.pin_dir, true), "round {round}");
        for id in &old {
            assert!(!prog_exists(*id), "round {round}: old program {id} still loaded");
        }
        let leftovers: Vec<String> = std::fs::read_dir(&d.pin_dir)
            .expect("pin dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("retired-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    // Still the same sandbox, enforced by the new build.
    let list = d.request(r#"{"op":"list"}"#);
    assert_eq!(list["data"][0]["name"], "hammer", "{list}");
    let h = Hammer::start(&d.scratch.dir, "after", &cg, &probes);
    let counts = h.finish();
    assert_eq!(count(&counts, &probes[0], "OK"), 0, "{counts}");
    assert!(count(&counts, &probes[0], "EPERM") > 0, "{counts}");

    // The old ring buffers' records could not be decoded: they are counted,
    // in the chain, once per switch-over.
    d.stop();
    let v = d.cli(None, &["events", "verify", d.audit.to_str().expect("utf8")]);
    assert!(v.status.success(), "{}", describe(&v));
    let recs = read_audit(&d.audit);
    let upgrades: Vec<u64> = recs
        .iter()
        .filter(|r| r["action"] == "audit.lost" && r["reason"] == "upgrade")
        .map(|r| r["count"].as_u64().expect("count"))
        .collect();
    assert_eq!(upgrades.len(), 2, "{upgrades:?}");
    assert!(upgrades.iter().all(|n| *n > 0), "{upgrades:?}");
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().expect("seq")).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "seq has holes");

    d.uninstall();
}

/// Kills the daemon and keeps it down, a sandboxed process hammering, until
/// the ring buffer has overflowed: the drops the kernel counts. The hammer
/// stops before the daemon comes back, so the daemon catches up and every
/// drop it reports is in its log before the next kill.
fn down_until_drops(d: &mut TestDaemon, cg: &Path, probes: &[String], what: &str) -> u64 {
    let before = d.counters().lost();
    d.kill9();
    let h = Hammer::start(&d.scratch.dir, what, cg, probes);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while d.counters().lost() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: the ring buffer never overflowed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // More, so that the drops are not all at the edge.
    std::thread::sleep(Duration::from_millis(200));
    let counts = h.finish();
    assert_eq!(count(&counts, &probes[0], "OK"), 0, "{what}: {counts}");
    assert!(count(&counts, &probes[0], "EPERM") > 0, "{what}: {counts}");
    d.counters().lost() - before
}

/// Starts the daemon and waits until it has drained the ring buffer.
fn start_and_catch_up(d: &mut TestDaemon) {
    d.start();
    std::thread::sleep(Duration::from_millis(1500));
}

#[test]
fn kernel_drops_are_reported_once_each_across_adoption_and_replacement() {
    let denied = tcp_server("127.0.0.1:0");
    let mut d = TestDaemon::new("dlost", &[("hammer", &policy(denied.port()))], "", false);
    d.start();
    let r = d.request(r#"{"op":"create","name":"hammer","policy":"hammer"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let cg = d.cgroup("hammer");
    let probes = [format!("tcp:{denied}")];

    // Drops while down, reported by the daemon that adopts the pins.
    let first = down_until_drops(&mut d, &cg, &probes, "first");
    start_and_catch_up(&mut d);
    // Drops while down again, now over pins that look like another build's:
    // the replacing daemon reports what the old counter holds beyond the
    // first report, and its own fresh counter starts from zero.
    let second = down_until_drops(&mut d, &cg, &probes, "second");
    let old_total = d.counters().lost();
    foreign(&d.pin_dir, Some("sha256:0000-another-build"));
    start_and_catch_up(&mut d);
    assert_eq!(d.request(r#"{"op":"status"}"#)["data"]["origin"], "replaced");
    // Drops in the new build's counter: a baseline kept from the old
    // counter would hide as many.
    let third = down_until_drops(&mut d, &cg, &probes, "third");
    start_and_catch_up(&mut d);
    d.stop();
    let new_total = d.counters().lost();

    let recs = read_audit(&d.audit);
    let reported: Vec<u64> = recs
        .iter()
        .filter(|r| r["action"] == "audit.lost" && r["reason"] == "kernel")
        .map(|r| r["count"].as_u64().expect("count"))
        .collect();
    assert!(first > 0 && second > 0 && third > 0, "{first} {second} {third}");
    assert_eq!(new_total, third, "drops while the daemon ran");
    assert_eq!(
        reported,
        [first, second, third],
        "kernel drops: old counter {old_total}, new counter {new_total}\n{}",
        d.logs()
    );
    assert_eq!(old_total, first + second);
    let v = d.cli(None, &["events", "verify", d.audit.to_str().expect("utf8")]);
    assert!(v.status.success(), "{}", describe(&v));
}

/// A connect the old build holds while its PDP decides: its SYNs are
/// dropped by the old build's egress program. Detaching that program at
/// the switch-over must not let the next SYN retransmit leave with no
/// decision made. The new build takes the held connects over, so a storm
/// of connects to a port the PDP denies, started while no daemon runs and
/// going on across the switch-over, never gets one through.
#[test]
fn a_connect_held_by_the_old_build_is_not_released_by_the_switch_over() {
    let denied = tcp_server("127.0.0.1:0");
    let s = Scratch::new("dupg-held");
    let rego = s.write(
        "deny.rego",
        "package pep\ndefault decision := {\"allow\": false, \"reason\": \"nothing is allowed\"}\n",
    );
    let policy = format!(
        "apiVersion: pep/v1\nname: asking\nnetwork:\n  default: ask\n\
         pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n",
        rego.display()
    );
    let mut d = TestDaemon::new("dupg-held", &[("asking", &policy)], "", false);
    d.start();
    let r = d.request(r#"{"op":"create","name":"asking","policy":"asking"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let cg = d.cgroup("asking");

    d.kill9();
    foreign(&d.pin_dir, Some("sha256:0000-another-build"));
    // Every 10 ms a new connect, held by the old build (no daemon answers);
    // once the new build's programs are attached, by both; after the
    // switch-over, by the new build alone, which answers.
    let stop = s.dir.join("storm.stop");
    let ready = s.dir.join("storm.ready");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/held_storm.py");
    let procs = cg.join("cgroup.procs");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(script)
        .arg(&stop)
        .arg(&ready)
        .args(["127.0.0.1", &denied.port().to_string(), "10"])
        .stdout(std::process::Stdio::piped());
    // SAFETY: a write(2) to a cgroup file between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || std::fs::write(&procs, "0"));
    }
    let storm = cmd.spawn().expect("spawn storm");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        assert!(std::time::Instant::now() < deadline, "the storm did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Connects held for a while by the old build alone.
    std::thread::sleep(Duration::from_millis(400));
    d.start();
    std::thread::sleep(Duration::from_millis(1_000));
    std::fs::write(&stop, "").expect("stop");
    let out = storm.wait_with_output().expect("storm");
    assert!(out.status.success(), "{}", describe(&out));
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout).expect("storm json");

    assert_eq!(
        counts.get("OK"),
        None,
        "a connect the PDP denies got through the switch-over: {counts}\n{}",
        d.logs()
    );
    assert_eq!(counts.get("STILL_WAITING"), None, "{counts}");
    // Held across it: the old build's, taken over, ran out of SYN retries.
    assert!(counts["ETIMEDOUT"].as_u64().unwrap_or(0) > 0, "{counts}");
    // Answered by the new daemon.
    assert!(counts["ECONNABORTED"].as_u64().unwrap_or(0) > 0, "{counts}");
    let logs = d.logs();
    let taken: u64 = logs
        .lines()
        .find_map(|l| {
            let (before, _) = l.split_once(" connects held by the retired build")?;
            before.rsplit(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no held connect was taken over: {counts}\n{logs}"));
    assert!(taken > 0, "{logs}");
    let status = d.request(r#"{"op":"status"}"#);
    assert_eq!(status["data"]["origin"], "replaced", "{status}");
    assert_eq!(status["data"]["retired"], serde_json::json!([]), "{status}");

    // Their asks were in the old ring: counted, never silently gone.
    d.stop();
    let recs = read_audit(&d.audit);
    let upgrade: u64 = recs
        .iter()
        .filter(|r| r["action"] == "audit.lost" && r["reason"] == "upgrade")
        .map(|r| r["count"].as_u64().expect("count"))
        .sum();
    assert!(
        upgrade >= taken,
        "{taken} held connects taken over, {upgrade} records counted lost at the upgrade"
    );
    d.uninstall();
}
