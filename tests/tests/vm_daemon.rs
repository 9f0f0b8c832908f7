//! In the VM (BPF LSM): SIGKILL of the daemon while a sandboxed process
//! hammers denied and allowed opens and connects lets no denied action
//! through; the restarted daemon adopts the pinned LSM links and the
//! sandbox, and the audit chain verifies across the restart.

use std::time::Duration;

use pep_tests::{daemon::*, *};

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
    let policy = format!(
        "apiVersion: pep/v1\nname: vm\nnetwork:\n  default: allow\n  rules:\n    - deny: {{ cidr: 127.0.0.1/32, ports: [{}] }}\n\
         files:\n  default: allow\n  rules:\n    - deny: {{ path: \"{}\", access: [read, write] }}\n",
        denied.port(),
        secret.display()
    );
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
