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
