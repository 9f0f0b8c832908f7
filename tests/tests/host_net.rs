//! Network enforcement through `pep-agent run`, on the host kernel, with
//! real clients (python3 sockets, curl) against real loopback servers.
//! Every deny is attacked: IPv6, IPv4-mapped IPv6, UDP connect and sendto,
//! children that fork, exec, setsid and double fork.

use pep_tests::*;

fn policy(scratch: &Scratch, body: &str) -> std::path::PathBuf {
    scratch.write(
        "policy.yaml",
        &format!("apiVersion: pep/v1\nname: nettest\n{body}"),
    )
}

fn probe(
    policy: &std::path::Path,
    extra: &[&str],
    probes: &[(&str, String, u16)],
) -> (Vec<String>, std::process::Output) {
    let script = net_probe();
    let mut cmd: Vec<String> = vec!["python3".into(), script.display().to_string()];
    for (op, host, port) in probes {
        cmd.extend([op.to_string(), host.clone(), port.to_string()]);
    }
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let out = pep_run(policy, extra, &cmd);
    (probe_results(&out), out)
}

#[test]
fn tcp_allowed_and_denied_over_v4_v6_and_mapped() {
    let s = Scratch::new("tcp");
    let allowed4 = tcp_server("127.0.0.1:0");
    let denied4 = tcp_server("127.0.0.1:0");
    let allowed6 = tcp_server("[::1]:0");
    let denied6 = tcp_server("[::1]:0");
    let p = policy(
        &s,
        &format!(
            "network:\n  default: deny\n  rules:\n\
             \x20   - allow: {{ cidr: 127.0.0.1/32, ports: [{}], protocol: tcp }}\n\
             \x20   - allow: {{ cidr: \"::1/128\", ports: [{}], protocol: tcp }}\n",
            allowed4.port(),
            allowed6.port()
        ),
    );
    let (res, out) = probe(
        &p,
        &[],
        &[
            ("tcp", "127.0.0.1".into(), allowed4.port()),
            ("tcp", "127.0.0.1".into(), denied4.port()),
            ("tcp", "::1".into(), allowed6.port()),
            ("tcp", "::1".into(), denied6.port()),
            // An IPv6 socket to ::ffff:127.0.0.1 reaches 127.0.0.1: the IPv4
            // rules decide, both ways.
            ("tcp", "::ffff:127.0.0.1".into(), allowed4.port()),
            ("tcp", "::ffff:127.0.0.1".into(), denied4.port()),
        ],
    );
    assert_eq!(
        res,
        ["OK", "EPERM", "OK", "EPERM", "OK", "EPERM"],
        "{}",
        describe(&out)
    );
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn udp_connect_and_sendto_are_enforced() {
    let s = Scratch::new("udp");
    let ok = udp_server("127.0.0.1:0");
    let bad = udp_server("127.0.0.1:0");
    let bad6 = udp_server("[::1]:0");
    let p = policy(
        &s,
        &format!(
            "network:\n  default: deny\n  rules:\n\
             \x20   - allow: {{ cidr: 127.0.0.0/8, ports: [{}], protocol: udp }}\n",
            ok.port()
        ),
    );
    let (res, out) = probe(
        &p,
        &[],
        &[
            ("udp-connect", "127.0.0.1".into(), ok.port()),
            ("udp-send", "127.0.0.1".into(), ok.port()),
            ("udp-connect", "127.0.0.1".into(), bad.port()),
            ("udp-send", "127.0.0.1".into(), bad.port()),
            ("udp-send", "::1".into(), bad6.port()),
            ("udp-send", "::ffff:127.0.0.1".into(), bad.port()),
            ("udp-send", "::ffff:127.0.0.1".into(), ok.port()),
            // The rule is UDP-only: TCP to the same port is not allowed.
            ("tcp", "127.0.0.1".into(), ok.port()),
        ],
    );
    assert_eq!(
        res,
        ["OK", "OK", "EPERM", "EPERM", "EPERM", "EPERM", "OK", "EPERM"],
        "{}",
        describe(&out)
    );
}

#[test]
fn port_ranges_and_most_specific_wins() {
    let s = Scratch::new("ranges");
    // Bind a few servers and build a range that covers the first two only.
    let a = tcp_server("127.0.0.1:0").port();
    let b = tcp_server("127.0.0.1:0").port();
    let c = tcp_server("127.0.0.1:0").port();
    let (lo, hi) = (a.min(b), a.max(b));
    // allow 127.0.0.0/8 on [lo, hi]; deny 127.0.0.2/32 on every port.
    let p = policy(
        &s,
        &format!(
            "network:\n  default: deny\n  rules:\n\
             \x20   - allow: {{ cidr: 127.0.0.0/8, ports: [\"{lo}-{hi}\"] }}\n\
             \x20   - deny: {{ cidr: 127.0.0.2/32 }}\n"
        ),
    );
    let outside = if c < lo || c > hi { c } else { hi.wrapping_add(1) };
    let (res, out) = probe(
        &p,
        &[],
        &[
            ("tcp", "127.0.0.1".into(), lo),
            ("tcp", "127.0.0.1".into(), hi),
            ("tcp", "127.0.0.1".into(), outside),
            // The more specific deny wins over the broader allow.
            ("tcp", "127.0.0.2".into(), lo),
        ],
    );
    assert_eq!(res[0], "OK", "{}", describe(&out));
    assert_eq!(res[1], "OK", "{}", describe(&out));
    assert_eq!(res[2], "EPERM", "{}", describe(&out));
    assert_eq!(res[3], "EPERM", "{}", describe(&out));
}

#[test]
fn curl_is_denied_and_allowed() {
    let s = Scratch::new("curl");
    let ok = tcp_server("127.0.0.1:0");
    let bad = tcp_server("127.0.0.1:0");
    let p = policy(
        &s,
        &format!(
            "network:\n  default: deny\n  rules:\n    - allow: {{ cidr: 127.0.0.1/32, ports: [{}] }}\n",
            ok.port()
        ),
    );
    let good = pep_run(
        &p,
        &[],
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{ok}/"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&good.stdout),
        "200",
        "{}",
        describe(&good)
    );
    let denied = pep_run(
        &p,
        &[],
        &["curl", "-sS", "-o", "/dev/null", &format!("http://{bad}/")],
    );
    // curl exit 7: failed to connect.
    assert_eq!(denied.status.code(), Some(7), "{}", describe(&denied));
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Operation not permitted")
            || String::from_utf8_lossy(&denied.stderr).contains("Couldn't connect"),
        "{}",
        describe(&denied)
    );
}

#[test]
fn descendants_stay_sandboxed_and_outsiders_are_not() {
    let s = Scratch::new("desc");
    let bad = tcp_server("127.0.0.1:0");
    let p = policy(&s, "network:\n  default: deny\n");
    let probe = net_probe();
    let one = format!("python3 {} tcp 127.0.0.1 {}", probe.display(), bad.port());
    // A child, a grandchild through setsid, and a double-forked daemon-like
    // process whose parent exits first.
    let script =
        format!("{one}; sh -c '{one}'; setsid sh -c '{one}'; (sh -c '({one}) &' ; sleep 0.5); sleep 1; wait");
    // Meanwhile a process outside the sandbox connects to the same server.
    let outside = std::thread::spawn(move || {
        let mut ok = 0;
        for _ in 0..20 {
            if std::net::TcpStream::connect(bad).is_ok() {
                ok += 1;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        ok
    });
    let out = pep_run(&p, &[], &["sh", "-c", &script]);
    let res = probe_results(&out);
    assert_eq!(res, ["EPERM", "EPERM", "EPERM", "EPERM"], "{}", describe(&out));
    assert_eq!(
        outside.join().expect("outside thread"),
        20,
        "outside connects must all succeed"
    );
}

#[test]
fn audit_records_one_per_decision_with_fields() {
    let s = Scratch::new("audit");
    let ok = tcp_server("127.0.0.1:0");
    let bad = tcp_server("127.0.0.1:0");
    let p = policy(
        &s,
        &format!(
            "network:\n  default: deny\n  rules:\n\
             \x20   - allow: {{ cidr: 127.0.0.1/32, ports: [{}] }}\n\
             \x20   - deny: {{ cidr: 127.0.0.1/32, ports: [{}] }}\n",
            ok.port(),
            bad.port()
        ),
    );
    let log = s.dir.join("audit.jsonl");
    let (res, out) = probe(
        &p,
        &["--audit", log.to_str().expect("utf8"), "--name", "agent-1"],
        &[
            ("tcp", "127.0.0.1".into(), ok.port()),
            ("tcp", "127.0.0.1".into(), bad.port()),
        ],
    );
    assert_eq!(res, ["OK", "EPERM"], "{}", describe(&out));
    let recs = read_audit(&log);
    let net: Vec<_> = recs.iter().filter(|r| r["action"] == "net.connect").collect();
    // python3 makes exactly these two connects.
    assert_eq!(net.len(), 2, "records: {recs:#?}");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1, "seq must rise by one: {recs:#?}");
    }
    let (allow, deny) = (net[0], net[1]);
    assert_eq!(allow["verdict"], "allow");
    assert_eq!(allow["rule"], "network.rules[0]");
    assert_eq!(deny["verdict"], "deny");
    assert_eq!(deny["mode"], "enforce");
    assert_eq!(deny["source"], "rule");
    assert_eq!(deny["rule"], "network.rules[1]");
    assert_eq!(deny["sandbox"], "agent-1");
    assert_eq!(deny["net"]["family"], "inet");
    assert_eq!(deny["net"]["protocol"], "tcp");
    assert_eq!(deny["net"]["daddr"], "127.0.0.1");
    assert_eq!(deny["net"]["dport"], bad.port());
    let proc_ = &deny["process"];
    assert!(
        proc_["comm"].as_str().is_some_and(|c| c.starts_with("python")),
        "{proc_}"
    );
    assert!(proc_["pid"].as_u64().is_some_and(|p| p > 1), "{proc_}");
    assert_eq!(proc_["pid"], proc_["tid"], "single-threaded probe");
    assert!(
        proc_["ppid"].as_u64().is_some_and(|p| p > 0),
        "ppid from the kernel: {proc_}"
    );
    assert_eq!(proc_["uid"], 0);
    assert!(proc_["cgroup_id"].as_u64().is_some_and(|c| c > 1), "{proc_}");
    assert!(
        deny["policy_revision"]
            .as_str()
            .is_some_and(|r| r.starts_with("sha256:"))
    );
    assert!(deny["ts"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(deny["file"], serde_json::Value::Null);
    // The chain: each prev is the hash of the previous line.
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<&str> = text.lines().collect();
    for w in lines.windows(2) {
        let prev: serde_json::Value = serde_json::from_str(w[1]).expect("json");
        assert_eq!(prev["prev"], pep_agent::audit::record::line_hash(w[0]));
    }

    // events tail: filters and the compact form.
    let tail = std::process::Command::new(pep_agent_bin())
        .args([
            "events",
            "tail",
            "--file",
            log.to_str().expect("utf8"),
            "-o",
            "compact",
            "--verdict",
            "deny",
        ])
        .output()
        .expect("tail");
    let text = String::from_utf8_lossy(&tail.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{}", describe(&tail));
    let want = format!(
        "DENY net.connect agent-1 python3({}) -> 127.0.0.1:{}/tcp [network.rules[1]]",
        proc_["pid"],
        bad.port()
    );
    assert!(
        lines[0].ends_with(&want),
        "compact line {:?} should end with {want:?}",
        lines[0]
    );
    assert!(
        lines[0].as_bytes()[2] == b':' && lines[0].as_bytes()[8] == b'.',
        "HH:MM:SS.mmm prefix: {}",
        lines[0]
    );
    let json = std::process::Command::new(pep_agent_bin())
        .args([
            "events",
            "tail",
            "--file",
            log.to_str().expect("utf8"),
            "--action",
            "net.connect",
            "--verdict",
            "allow",
        ])
        .output()
        .expect("tail");
    let recs: Vec<serde_json::Value> = String::from_utf8_lossy(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(recs.len(), 1, "{}", describe(&json));
    assert_eq!(recs[0]["verdict"], "allow");
}

#[test]
fn audit_mode_allows_and_records_deny() {
    let s = Scratch::new("auditmode");
    let bad = tcp_server("127.0.0.1:0");
    let p = policy(&s, "network:\n  default: deny\n");
    let log = s.dir.join("audit.jsonl");
    let (res, out) = probe(
        &p,
        &["--mode", "audit", "--audit", log.to_str().expect("utf8")],
        &[("tcp", "127.0.0.1".into(), bad.port())],
    );
    assert_eq!(
        res,
        ["OK"],
        "audit mode lets the connect through: {}",
        describe(&out)
    );
    let recs = read_audit(&log);
    let r = recs
        .iter()
        .find(|r| r["action"] == "net.connect")
        .unwrap_or_else(|| panic!("{recs:#?}"));
    assert_eq!(r["verdict"], "deny");
    assert_eq!(r["mode"], "audit");
    assert_eq!(r["source"], "default");
}

#[test]
fn exit_status_is_the_commands() {
    let s = Scratch::new("status");
    let p = policy(&s, "network:\n  default: deny\n");
    let out = pep_run(&p, &[], &["sh", "-c", "exit 42"]);
    assert_eq!(out.status.code(), Some(42), "{}", describe(&out));
    let out = pep_run(&p, &[], &["sh", "-c", "kill -KILL $$"]);
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
}

#[test]
fn drops_to_user() {
    let s = Scratch::new("user");
    let p = policy(&s, "network:\n  default: deny\n");
    let out = pep_run(&p, &["--user", "nobody"], &["id", "-u"]);
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("lookup")
        .expect("nobody exists")
        .uid;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        nobody.to_string(),
        "{}",
        describe(&out)
    );
}
