//! In the VM (BPF LSM): SIGKILL of the daemon while a sandboxed process
//! hammers denied and allowed opens and connects lets no denied action
//! through; the restarted daemon adopts the pinned LSM links and the
//! sandbox, and the audit chain verifies across the restart. Over another
//! build's pins, a daemon replaces the LSM links the same way, with no
//! moment where a denied open gets through.

use std::time::Duration;

use pep_tests::{daemon::*, *};

/// Denies connects to `port` on 127.0.0.1 and reads and writes of `secret`.
fn policy(port: u16, secret: &std::path::Path) -> String {
    format!(
        "apiVersion: pep/v1\nname: vm\nnetwork:\n  default: allow\n  rules:\n    - deny: {{ cidr: 127.0.0.1/32, ports: [{port}] }}\n\
         files:\n  default: allow\n  rules:\n    - deny: {{ path: \"{}\", access: [read, write] }}\n",
        secret.display()
    )
}

#[test]
fn sigkill_keeps_file_and_network_rules_enforced() {
    // The daemon itself (`lsm: on`) says why, if the LSM programs do not load.
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    assert!(
        lsms.split(',').any(|l| l.trim() == "bpf"),
        "this test runs where BPF LSM is enabled (the VM); LSM list: {lsms}"
    );
    let allowed = tcp_server("127.0.0.1:0");
    let denied = tcp_server("127.0.0.1:0");
    let files = Scratch::new("vmdaemon-files");
    let secret = files.write("secret.txt", "s");
    let open = files.write("open.txt", "o");
    let policy = policy(denied.port(), &secret);
    let mut d = TestDaemon::new("vmdaemon", &[("vm", &policy)], "lsm: on\n", false);
    d.start();
    let r = d.request(r#"{"op":"create","name":"vm","policy":"vm"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let probes = [
        format!("tcp:{denied}"),
        format!("tcp:{allowed}"),
        format!("open:{}", secret.display()),
        format!("open:{}", open.display()),
    ];
    let h = Hammer::start(&d.scratch.dir, "vm1", &d.cgroup("vm"), &probes);
    std::thread::sleep(Duration::from_millis(500));
    d.kill9();
    std::thread::sleep(Duration::from_millis(2000));
    d.start();
    std::thread::sleep(Duration::from_millis(500));
    let counts = h.finish();
    let n = |p: &str, o: &str| counts[p][o].as_u64().unwrap_or(0);
    assert_eq!(n(&probes[0], "OK"), 0, "a denied connect succeeded: {counts}");
    assert_eq!(n(&probes[2], "OK"), 0, "a denied open succeeded: {counts}");
    assert!(
        n(&probes[0], "EPERM") > 0 && n(&probes[2], "EPERM") > 0,
        "{counts}"
    );
    assert!(n(&probes[1], "OK") > 0 && n(&probes[3], "OK") > 0, "{counts}");

    let status = d.request(r#"{"op":"status"}"#);
    assert_eq!(status["data"]["origin"], "adopted", "{status}");
    // The killed daemon's pid is protected no longer (the kernel may give
    // it to any process); the new one is.
    assert_eq!(protected_pids(&d), vec![d.pid()], "PROTECTED after a restart");
    assert_eq!(status["data"]["lsm"], true, "{status}");
    let list = d.request(r#"{"op":"list"}"#);
    assert_eq!(list["data"][0]["name"], "vm", "{list}");
    let h = Hammer::start(&d.scratch.dir, "vm2", &d.cgroup("vm"), &probes);
    let counts = h.finish();
    assert_eq!(counts[&probes[2]]["OK"].as_u64().unwrap_or(0), 0, "{counts}");

    d.stop();
    let v = d.cli(None, &["events", "verify", d.audit.to_str().expect("utf8")]);
    assert!(v.status.success(), "{}", describe(&v));
    let recs = read_audit(&d.audit);
    assert!(
        recs.iter()
            .any(|r| r["action"] == "file.open" && r["verdict"] == "deny" && r["sandbox"] == "vm"),
        "no file deny recorded"
    );
}

#[test]
fn another_builds_lsm_links_are_replaced_without_a_gap() {
    let denied = tcp_server("127.0.0.1:0");
    let files = Scratch::new("vmupgrade-files");
    let secret = files.write("secret.txt", "s");
    let open = files.write("open.txt", "o");
    let policy = policy(denied.port(), &secret);
    let mut d = TestDaemon::new("vmupgrade", &[("vm", &policy)], "lsm: on\n", false);
    d.start();
    let r = d.request(r#"{"op":"create","name":"vm","policy":"vm"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let old = link_ids(&d);
    assert!(!old.is_empty(), "no LSM links pinned");
    let probes = [
        format!("tcp:{denied}"),
        format!("open:{}", secret.display()),
        format!("open:{}", open.display()),
    ];
    let h = Hammer::start(&d.scratch.dir, "up1", &d.cgroup("vm"), &probes);
    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    std::thread::sleep(Duration::from_millis(500));
    // Pins of another build: a stamp that is not this build's.
    let stamps: Vec<_> = std::fs::read_dir(&d.pin_dir)
        .expect("pin dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("build-"))
        .collect();
    assert_eq!(stamps.len(), 1, "one build stamp");
    std::fs::remove_dir(stamps[0].path()).expect("unstamp");
    std::fs::create_dir(d.pin_dir.join("build-sha256:another")).expect("stamp");
    d.start();
    std::thread::sleep(Duration::from_millis(500));
    let counts = h.finish();
    let n = |p: &str, o: &str| counts[p][o].as_u64().unwrap_or(0);
    assert_eq!(n(&probes[0], "OK"), 0, "a denied connect succeeded: {counts}");
    assert_eq!(n(&probes[1], "OK"), 0, "a denied open succeeded: {counts}");
    assert!(n(&probes[1], "EPERM") > 0, "{counts}");
    assert!(n(&probes[2], "OK") > 0, "{counts}");
    assert_eq!(n(&probes[2], "EPERM"), 0, "{counts}");

    let status = d.request(r#"{"op":"status"}"#);
    assert_eq!(status["data"]["origin"], "replaced", "{status}\n{}", d.logs());
    assert_eq!(status["data"]["lsm"], true, "{status}");
    assert_eq!(status["data"]["retired"], serde_json::json!([]), "{status}");
    assert_eq!(
        protected_pids(&d),
        vec![d.pid()],
        "PROTECTED after the switch-over"
    );
    let new = link_ids(&d);
    assert_eq!(new.len(), old.len(), "old {old:?} new {new:?}");
    for id in &old {
        assert!(!new.contains(id), "old link {id} pinned again");
        let gone = std::process::Command::new("bpftool")
            .args(["link", "show", "id", &id.to_string()])
            .output()
            .expect("bpftool");
        assert!(!gone.status.success(), "old LSM link {id} still exists");
    }
    let h = Hammer::start(&d.scratch.dir, "up2", &d.cgroup("vm"), &probes);
    let counts = h.finish();
    assert_eq!(counts[&probes[1]]["OK"].as_u64().unwrap_or(0), 0, "{counts}");
    assert!(counts[&probes[1]]["EPERM"].as_u64().unwrap_or(0) > 0, "{counts}");
    d.stop();
    let v = d.cli(None, &["events", "verify", d.audit.to_str().expect("utf8")]);
    assert!(v.status.success(), "{}", describe(&v));
}

/// The ids of the LSM links pinned under the daemon's `links/`.
fn link_ids(d: &TestDaemon) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(d.pin_dir.join("links"))
        .expect("links")
        .flatten()
        .map(|e| {
            let out = std::process::Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(e.path())
                .output()
                .expect("bpftool");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|err| panic!("{}: {err}: {}", e.path().display(), describe(&out)));
            v["id"].as_u64().expect("link id") as u32
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// The tgids in the daemon's pinned `PROTECTED` map.
fn protected_pids(d: &TestDaemon) -> Vec<u32> {
    let path = d.pin_dir.join("maps/PROTECTED");
    let data = aya::maps::MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map = aya::maps::HashMap::<_, u32, u32>::try_from(aya::maps::Map::HashMap(data))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut pids: Vec<u32> = map.keys().map(|k| k.expect("key")).collect();
    pids.sort_unstable();
    pids
}
