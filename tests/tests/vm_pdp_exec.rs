//! `exec.default: ask`, in the VM (exec enforcement needs BPF LSM): an exec
//! that no rule decides cannot be held like a SYN, so the first exec of a
//! file fails (EPERM) while the embedded Rego PDP is asked; its answer,
//! cached under the file's inode identity, decides the next exec of that
//! file and of every hard link to it.

use pep_tests::*;

/// Runs `ops` in order inside the sandbox, one result line each:
/// `exec PATH` tries once; `until-ok PATH` retries (bounded) until the exec
/// succeeds, which is the sign that the PDP's verdict is in the cache.
const PROBE: &str = r#"
import os, subprocess, sys, time
args = sys.argv[1:]
for op, path in zip(args[::2], args[1::2]):
    deadline = time.monotonic() + 20
    tries = 0
    while True:
        tries += 1
        try:
            subprocess.run([path], check=True)
            res = "OK"
        except PermissionError:
            res = "EPERM"
        except Exception as e:
            res = "ERR:" + type(e).__name__
        if op != "until-ok" or res == "OK" or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    print(op, path, tries, res, flush=True)
"#;

#[test]
fn exec_misses_are_denied_asked_and_cached() {
    assert!(
        pep_agent::kernel::features::lsm_loadable(),
        "this test runs where BPF LSM loads (the VM)"
    );
    let s = Scratch::new("pdp-exec");
    let d = &s.dir;
    std::fs::create_dir_all(d.join("bin")).expect("mkdir");
    for (src, dst) in [("/usr/bin/true", "bin/ok"), ("/usr/bin/true", "bin/no")] {
        std::fs::copy(src, d.join(dst)).unwrap_or_else(|e| panic!("copy {src}: {e}"));
    }
    // Made before the run: it shares `ok`'s inode, so its verdict.
    std::fs::hard_link(d.join("bin/ok"), d.join("alias")).expect("link");
    let ok = d.join("bin/ok").display().to_string();
    let no = d.join("bin/no").display().to_string();
    let alias = d.join("alias").display().to_string();
    let rego = s.write(
        "exec.rego",
        &format!(
            "package pep\n\
             decision := {{\"allow\": true, \"ttl_s\": 60}} if {{\n\
             \x20 input.action == \"exec\"\n  input.resource.path == \"{ok}\"\n}}\n\
             decision := {{\"allow\": false, \"ttl_s\": 60, \"reason\": \"not this one\"}} if {{\n\
             \x20 input.action == \"exec\"\n  input.resource.path == \"{no}\"\n}}\n"
        ),
    );
    // The probe's interpreter is exec'd in the sandbox too: a rule allows it.
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    let p = s.write(
        "p.yaml",
        &format!(
            "apiVersion: pep/v1\nname: execask\nexec:\n  default: ask\n  rules:\n\
             \x20   - allow: {{ path: {} }}\n\
             pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n",
            python.display(),
            rego.display()
        ),
    );
    let probe = s.write("probe.py", PROBE);
    let log = d.join("audit.jsonl");
    let out = pep_run(
        &p,
        &["--audit", log.to_str().expect("utf8")],
        &[
            "python3",
            probe.to_str().expect("utf8"),
            "exec",
            &no,
            "exec",
            &ok,
            // The ask thread answers in order: once `ok` passes, `no`'s
            // deny is cached too.
            "until-ok",
            &ok,
            "exec",
            &no,
            "exec",
            &alias,
        ],
    );
    let res = probe_results(&out);
    assert_eq!(res, ["EPERM", "EPERM", "OK", "EPERM", "OK"], "{}", describe(&out));

    let recs = read_audit(&log);
    let execs: Vec<_> = recs.iter().filter(|r| r["action"] == "exec").collect();
    let find = |path: &str, source: &str, verdict: &str| {
        execs
            .iter()
            .find(|r| r["exec"]["path"] == path && r["source"] == source && r["verdict"] == verdict)
            .unwrap_or_else(|| panic!("no {source} {verdict} record for {path}: {execs:#?}"))
    };
    // The misses: denied now, the PDP's answer recorded.
    let asked = find(&ok, "pdp", "deny");
    assert_eq!(asked["pdp"]["answer"], "allow", "{asked:#}");
    assert_eq!(asked["pdp"]["attempt"], "denied while asking", "{asked:#}");
    assert_eq!(asked["pdp"]["engine"], "rego", "{asked:#}");
    assert!(asked["pdp"]["latency_us"].is_u64(), "{asked:#}");
    assert_eq!(asked["exec"]["argv"][0], ok.as_str(), "{asked:#}");
    let asked = find(&no, "pdp", "deny");
    assert_eq!(asked["pdp"]["answer"], "deny", "{asked:#}");
    assert_eq!(asked["pdp"]["reason"], "not this one", "{asked:#}");
    // The cache decides from then on, through the hard link too.
    let hit = find(&ok, "cache", "allow");
    assert_eq!(hit["pdp"]["engine"], "rego", "{hit:#}");
    find(&no, "cache", "deny");
    find(&alias, "cache", "allow");
    // The interpreter, allowed by a rule, was never asked about.
    assert!(
        execs
            .iter()
            .all(|r| r["source"] != "pdp" || r["exec"]["path"] != python.to_str().unwrap()),
        "{execs:#?}"
    );
}

/// The same through the host daemon, across a SIGKILL: the cached exec
/// verdicts stay enforced while no daemon runs; an exec of a file never
/// asked about is denied then (nobody answers) and its miss waits in the
/// ring; the restarted daemon answers it, so the file's next exec follows
/// the PDP. Every miss has its record, with the sandbox's name.
#[test]
fn exec_asks_through_the_daemon_outlive_sigkill() {
    use pep_tests::daemon::TestDaemon;
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    assert!(
        lsms.split(',').any(|l| l.trim() == "bpf"),
        "this test runs where BPF LSM is enabled (the VM); LSM list: {lsms}"
    );
    let s = Scratch::new("dpdp-exec");
    let d = &s.dir;
    std::fs::create_dir_all(d.join("bin")).expect("mkdir");
    for name in ["ok", "no", "later"] {
        std::fs::copy("/usr/bin/true", d.join("bin").join(name)).expect("copy true");
    }
    let path = |name: &str| d.join("bin").join(name).display().to_string();
    let (ok, no, later) = (path("ok"), path("no"), path("later"));
    let rego = s.write(
        "exec.rego",
        &format!(
            "package pep\n\
             default decision := {{\"allow\": false, \"reason\": \"not listed\"}}\n\
             decision := {{\"allow\": true, \"ttl_s\": 300}} if {{\n\
             \x20 input.action == \"exec\"\n  input.resource.path in {{\"{ok}\", \"{later}\"}}\n}}\n"
        ),
    );
    let python = std::fs::canonicalize("/usr/bin/python3").expect("python3");
    let policy = format!(
        "apiVersion: pep/v1\nname: execask\nexec:\n  default: ask\n  rules:\n\
         \x20   - allow: {{ path: {} }}\n\
         pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n  cache_ttl_s: 300\n",
        python.display(),
        rego.display()
    );
    let mut daemon = TestDaemon::new("dpdp-exec", &[("execask", &policy)], "lsm: on\n", false);
    daemon.start();
    let r = daemon.request(r#"{"op":"create","name":"execask","policy":"execask"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", daemon.logs());
    let cg = daemon.cgroup("execask");
    let probe = s.write("probe.py", PROBE);
    let run = |ops: &[&str]| -> Vec<String> {
        use std::os::unix::process::CommandExt as _;
        let procs = cg.join("cgroup.procs");
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(&probe).args(ops);
        // SAFETY: a write(2) to a cgroup file between fork and exec.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, "0"));
        }
        let out = cmd.output().expect("probe");
        assert!(out.status.success(), "{}", describe(&out));
        probe_results(&out)
    };

    assert_eq!(
        run(&["exec", &no, "until-ok", &ok, "exec", &no]),
        ["EPERM", "OK", "EPERM"],
        "asked, then from the cache\n{}",
        daemon.logs()
    );
    daemon.kill9();
    assert_eq!(
        run(&["exec", &ok, "exec", &no, "exec", &later, "exec", &later]),
        ["OK", "EPERM", "EPERM", "EPERM"],
        "with no daemon: the cache decides, a new file is denied"
    );
    daemon.start();
    assert_eq!(
        run(&["until-ok", &later, "exec", &no]),
        ["OK", "EPERM"],
        "the restarted daemon answered the miss\n{}",
        daemon.logs()
    );
    daemon.stop();
    let v = daemon.cli(None, &["events", "verify", daemon.audit.to_str().expect("utf8")]);
    assert!(v.status.success(), "{}", describe(&v));

    let recs = read_audit(&daemon.audit);
    let execs: Vec<_> = recs
        .iter()
        .filter(|r| r["action"] == "exec" && r["sandbox"] == "execask")
        .collect();
    let of = |p: &str, source: &str| -> Vec<&serde_json::Value> {
        execs
            .iter()
            .filter(|r| r["exec"]["path"] == p && r["source"] == source)
            .copied()
            .collect()
    };
    // One record per miss: `no` once (then cached), `ok` until its answer
    // was cached, `later` twice while no daemon ran (both misses waited in
    // the ring) and until the restarted daemon's answer was cached.
    let asked = |p: &str| of(p, "pdp").len();
    assert_eq!(asked(&no), 1, "{execs:#?}");
    assert!(asked(&ok) >= 1 && asked(&later) >= 2, "{execs:#?}");
    for r in of(&later, "pdp") {
        assert_eq!(r["verdict"], "deny", "denied while asking: {r:#}");
        assert_eq!(r["pdp"]["answer"], "allow", "{r:#}");
        assert_eq!(r["pdp"]["engine"], "rego", "{r:#}");
    }
    assert!(
        of(&ok, "cache").iter().any(|r| r["verdict"] == "allow"),
        "{execs:#?}"
    );
    assert!(of(&no, "cache").len() >= 2, "{execs:#?}");
    assert!(
        of(&later, "cache").iter().any(|r| r["verdict"] == "allow"),
        "{execs:#?}"
    );
    daemon.uninstall();
}
