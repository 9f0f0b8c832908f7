//! `run` and `policy check` on bad input: clear errors, the documented exit
//! codes, and nothing left behind.

use std::process::Command;

use pep_tests::*;

#[test]
fn invalid_policy_exits_1_with_location_and_loads_nothing() {
    let s = Scratch::new("badpol");
    let p = s.write(
        "p.yaml",
        "apiVersion: pep/v1\nnetwork:\n  default: deny\n  rules:\n    - allow: { cidr: 10.0.0.300/8 }\n",
    );
    let out = pep_run(&p, &[], &["true"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:5:", p.display())), "location in: {err}");
    let check = Command::new(pep_agent_bin())
        .args(["policy", "check"])
        .arg(&p)
        .output()
        .expect("check");
    assert_eq!(check.status.code(), Some(1), "{}", describe(&check));
    let msg = String::from_utf8_lossy(&check.stderr);
    let first = msg.lines().next().unwrap_or_default();
    let prefix = format!("{}:5:", p.display());
    assert!(
        first.starts_with(&prefix),
        "FILE:LINE:COL: message, got {first:?}"
    );
}

#[test]
fn unknown_key_is_rejected() {
    let s = Scratch::new("unk");
    let p = s.write(
        "p.yaml",
        "apiVersion: pep/v1\nnetwork:\n  default: deny\n  colour: blue\n",
    );
    let check = Command::new(pep_agent_bin())
        .args(["policy", "check"])
        .arg(&p)
        .output()
        .expect("check");
    assert_eq!(check.status.code(), Some(1), "{}", describe(&check));
    let msg = String::from_utf8_lossy(&check.stderr);
    assert!(
        msg.starts_with(&format!("{}:4:", p.display())) && msg.contains("colour"),
        "{msg}"
    );
}

#[test]
fn valid_policy_checks_ok() {
    let s = Scratch::new("okpol");
    let p = s.write(
        "p.yaml",
        "apiVersion: pep/v1\nname: a\nvars:\n  ws: /srv/w\nnetwork:\n  default: deny\n  rules:\n    - allow: { cidr: 127.0.0.0/8, ports: [8080, \"9000-9100\"], protocol: tcp }\nfiles:\n  default: deny\n  rules:\n    - allow: { path: \"${ws}/**\", access: [read, write] }\n    - deny: { path: \"~/.ssh/**\" }\n",
    );
    let check = Command::new(pep_agent_bin())
        .args(["policy", "check"])
        .arg(&p)
        .output()
        .expect("check");
    assert_eq!(check.status.code(), Some(0), "{}", describe(&check));
}

#[test]
fn command_not_found_exits_127_and_leaves_nothing() {
    let s = Scratch::new("nf");
    let p = s.write("p.yaml", "apiVersion: pep/v1\nnetwork:\n  default: deny\n");
    let child = Command::new(pep_agent_bin())
        .args(["run", "--policy"])
        .arg(&p)
        .args(["--", "/nonexistent/definitely-not-here"])
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(127));
    assert!(leftover_cgroups(pid).is_empty(), "{:?}", leftover_cgroups(pid));
}

#[test]
fn not_root_exits_2_saying_what_is_missing() {
    let s = Scratch::new("noroot");
    let p = s.write("p.yaml", "apiVersion: pep/v1\nnetwork:\n  default: deny\n");
    // The policy must be readable by nobody.
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(&s.dir).status();
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(pep_agent_bin())
        .args(["run", "--policy"])
        .arg(&p)
        .args(["--", "true"])
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("root"),
        "{}",
        describe(&out)
    );
}

#[test]
fn files_rules_without_bpf_lsm_exit_2_or_degrade_loudly() {
    // On a kernel where BPF LSM loads, this policy runs; elsewhere it must
    // exit 2 naming the lsm= parameter, and --allow-degraded must say so.
    let s = Scratch::new("lsm");
    let p = s.write(
        "p.yaml",
        "apiVersion: pep/v1\nfiles:\n  default: allow\n  rules:\n    - deny: { path: /etc/shadow }\n",
    );
    let out = pep_run(&p, &[], &["true"]);
    if pep_agent::kernel::features::lsm_loadable() {
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lsm="),
        "{}",
        describe(&out)
    );
    let log = s.dir.join("a.jsonl");
    let probe_srv = tcp_server("127.0.0.1:0");
    let out = pep_run(
        &p,
        &["--allow-degraded", "--audit", log.to_str().expect("utf8")],
        &[
            "python3",
            net_probe().to_str().expect("utf8"),
            "tcp",
            "127.0.0.1",
            &probe_srv.port().to_string(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NOT enforced"),
        "{}",
        describe(&out)
    );
    let recs = read_audit(&log);
    assert!(!recs.is_empty());
    assert!(
        recs.iter()
            .all(|r| r["degraded"].as_str().is_some_and(|d| d.contains("NOT enforced"))),
        "{recs:#?}"
    );
}
