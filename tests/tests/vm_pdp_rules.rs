//! The rules query, in the VM (file rules need BPF LSM): a Rego policy
//! produces the sandbox's `files` section (`pdp.rules: data.pep.rules`), the
//! compiler compiles it, and the kernel enforces it. The YAML file itself
//! has no file rules at all: the PDP is the single source of truth. The
//! file's `vars` expand in the Rego-produced rules as in its own.

use pep_tests::*;

#[test]
fn rego_produced_file_rules_enforce() {
    assert!(
        pep_agent::kernel::features::lsm_loadable(),
        "this test runs where BPF LSM loads (the VM)"
    );
    let s = Scratch::new("pdp-rules");
    let d = &s.dir;
    std::fs::create_dir_all(d.join("ws")).expect("mkdir");
    std::fs::create_dir_all(d.join("secret")).expect("mkdir");
    std::fs::write(d.join("ws/notes.txt"), "hello").expect("write");
    std::fs::write(d.join("secret/key"), "k").expect("write");
    let root = d.display();
    let rego = s.write(
        "rules.rego",
        &format!(
            "package pep\n\
             # The sandbox's file rules, per sandbox name.\n\
             rules := {{\"files\": {{\"default\": \"allow\", \"rules\": [\n\
             \x20 {{\"allow\": {{\"path\": \"{root}/ws/**\", \"access\": [\"read\", \"write\"]}}}},\n\
             \x20 {{\"deny\": {{\"path\": \"${{secrets}}/**\", \"access\": [\"read\", \"write\"]}}}}\n\
             ]}}}} if input.sandbox.name == \"rulesbox\"\n\
             decision := false\n"
        ),
    );
    let p = s.write(
        "p.yaml",
        &format!(
            "apiVersion: pep/v1\nname: rulesbox\nvars:\n  secrets: {root}/secret\n\
             pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n  rules: data.pep.rules\n",
            rego.display()
        ),
    );
    let log = d.join("audit.jsonl");
    let (res, out) = file_probes(
        &p,
        &["--audit", log.to_str().expect("utf8")],
        &[
            ("read", &d.join("ws/notes.txt")),
            ("write", &d.join("ws/notes.txt")),
            ("read", &d.join("secret/key")),
            ("write", &d.join("secret/key")),
        ],
    );
    assert_eq!(res, ["OK", "OK", "EPERM", "EPERM"], "{}", describe(&out));
    let recs = read_audit(&log);
    let key = d.join("secret/key").display().to_string();
    let deny = recs
        .iter()
        .find(|r| r["file"]["path"] == key.as_str() && r["verdict"] == "deny")
        .unwrap_or_else(|| panic!("no deny record for {key}: {recs:#?}"));
    assert_eq!(deny["rule"], "files.rules[1]", "{deny:#}");

    // Another sandbox name: the query is undefined, and load refuses.
    let other = s.write(
        "other.yaml",
        &format!(
            "apiVersion: pep/v1\nname: otherbox\npdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n  rules: data.pep.rules\n",
            rego.display()
        ),
    );
    let out = pep_run(&other, &[], &["true"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("undefined"),
        "{}",
        describe(&out)
    );
}
