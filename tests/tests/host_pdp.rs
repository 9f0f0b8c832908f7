//! `network.default: ask` on the host kernel: a held TCP connect waits for
//! a remote PDP (`pep-agent pdp serve` as a separate process, or a fake OPA
//! server in this test that answers whatever shape it is told to), the
//! verdict is cached in the kernel, the PDP's failures go to
//! `on_unavailable`.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use pep_tests::{pdp::PdpServer, *};

/// A fake OPA: answers `POST` with the body `answer(dport)` chooses (after
/// `delay`), keeping connections alive as OPA does. Counts requests.
struct FakeOpa {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

fn fake_opa(delay: Duration, answer: impl Fn(u64) -> String + Send + Sync + 'static) -> FakeOpa {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind fake opa");
    let addr = l.local_addr().expect("addr");
    let requests = Arc::new(AtomicU64::new(0));
    let answer = Arc::new(answer);
    let count = requests.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let answer = answer.clone();
            let count = count.clone();
            thread::spawn(move || serve_conn(s, delay, &*answer, &count));
        }
    });
    FakeOpa { addr, requests }
}

fn serve_conn(s: TcpStream, delay: Duration, answer: &dyn Fn(u64) -> String, count: &AtomicU64) {
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    let mut w = s;
    loop {
        let mut len = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if first && line.trim().is_empty() {
                continue;
            }
            first = false;
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        count.fetch_add(1, Ordering::SeqCst);
        let input: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let dport = input["input"]["resource"]["dport"].as_u64().unwrap_or(0);
        thread::sleep(delay);
        let out = answer(dport);
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{out}",
            out.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

/// A port nobody listens on.
fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn probe_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pdp_probe.py")
}

/// Runs the probe commands in a sandbox under `policy`; returns
/// `(results, elapsed_ms)` per command and the run's output.
fn probe(policy: &Path, audit: &Path, cmds: &[Vec<String>]) -> (Vec<(String, u64)>, Output) {
    let mut argv: Vec<String> = vec!["python3".into(), probe_script().display().to_string()];
    for c in cmds {
        argv.extend(c.iter().cloned());
        argv.push(";".into());
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let audit_arg = audit.display().to_string();
    let out = pep_run(policy, &["--audit", &audit_arg], &argv);
    let res = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let (_, r, ms) = (it.next()?, it.next()?, it.next()?);
            Some((r.to_string(), ms.parse().ok()?))
        })
        .collect();
    (res, out)
}

fn cmd(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn tcp(host: &str, port: u16) -> Vec<String> {
    cmd(&["tcp", host, &port.to_string()])
}

fn policy_for(s: &Scratch, url: &str, extra_pdp: &str, allow_port: Option<u16>) -> PathBuf {
    let allow = allow_port.map_or(String::new(), |p| {
        format!("  rules:\n    - allow: {{ cidr: 127.0.0.1/32, ports: [{p}], protocol: tcp }}\n")
    });
    s.write(
        "policy.yaml",
        &format!(
            "apiVersion: pep/v1\nname: pdptest\nnetwork:\n  default: ask\n{allow}\
             pdp:\n  engine: opa\n  opa: {{ url: \"{url}\", timeout_ms: 200 }}\n{extra_pdp}"
        ),
    )
}

fn results(r: &[(String, u64)]) -> Vec<&str> {
    r.iter().map(|(x, _)| x.as_str()).collect()
}

#[test]
fn ask_mode_with_a_remote_pdp_serve() {
    let s = Scratch::new("pdp-ask");
    let allowed = tcp_server("127.0.0.1:0").port();
    let denied = tcp_server("127.0.0.1:0").port();
    let allowed6 = tcp_server("[::1]:0").port();
    let rego = s.write(
        "policy.rego",
        &format!(
            "package pep\n\
             default decision := false\n\
             decision := {{\"allow\": true, \"ttl_s\": 2, \"reason\": \"listed\"}} if input.resource.dport in {{{allowed}, {allowed6}}}\n"
        ),
    );
    let pdp = PdpServer::start(&rego);
    // The probe reads the PDP's counter itself, so the PDP's own port is
    // allowed by a compiled rule (and never asked about).
    let p = policy_for(&s, &pdp.url(), "  cache_ttl_s: 60\n", Some(pdp.addr.port()));
    let audit = s.dir.join("audit.jsonl");
    let m = cmd(&["metrics", "127.0.0.1", &pdp.addr.port().to_string()]);
    let (res, out) = probe(
        &p,
        &audit,
        &[
            m.clone(),                                     // 0: n0
            tcp("127.0.0.1", allowed),                     // 1: asked, allowed, first try
            m.clone(),                                     // 2: n0 + 1
            tcp("127.0.0.1", allowed),                     // 3: from the cache
            m.clone(),                                     // 4: unchanged
            tcp("127.0.0.1", denied),                      // 5: asked, denied
            m.clone(),                                     // 6: + 1
            tcp("127.0.0.1", denied),                      // 7: cached deny: EPERM at once
            cmd(&["tcpnb", "::1", &allowed6.to_string()]), // 8: IPv6, non-blocking, asked
            m.clone(),                                     // 9: + 1
            cmd(&["sleep", "2.3"]),                        // 10: past ttl_s 2
            tcp("127.0.0.1", allowed),                     // 11: asked again
            m.clone(),                                     // 12: + 1
        ],
    );
    let ctx = describe(&out);
    assert_eq!(res.len(), 13, "{ctx}");
    let r = results(&res);
    let n = |i: usize| -> u64 {
        r[i].parse()
            .unwrap_or_else(|_| panic!("metric {i}: {}\n{ctx}", r[i]))
    };
    assert_eq!(r[1], "OK", "allowed connect must succeed first try\n{ctx}");
    assert_eq!(n(2), n(0) + 1, "one query for the first connect\n{ctx}");
    assert_eq!(r[3], "OK", "{ctx}");
    assert_eq!(n(4), n(2), "the second connect is served from the cache\n{ctx}");
    assert_eq!(
        r[5], "ECONNABORTED",
        "denied connect fails with ECONNABORTED\n{ctx}"
    );
    assert!(res[5].1 < 1000, "deny must be prompt: {} ms\n{ctx}", res[5].1);
    assert_eq!(r[7], "EPERM", "a cached deny fails at once\n{ctx}");
    assert_eq!(r[8], "INPROGRESS_OK", "IPv6 non-blocking connect allowed\n{ctx}");
    assert_eq!(n(9), n(6) + 1, "{ctx}");
    assert_eq!(r[11], "OK", "{ctx}");
    assert_eq!(n(12), n(9) + 1, "after the TTL a new query is made\n{ctx}");
    assert_eq!(pdp.requests(), n(12), "{ctx}");

    // The records: source pdp with the engine and the decision id, then cache.
    let recs = read_audit(&audit);
    let for_port = |port: u16| -> Vec<&serde_json::Value> {
        recs.iter()
            .filter(|r| r["net"]["dport"] == port && r["action"] == "net.connect")
            .collect()
    };
    let a = for_port(allowed);
    let sources: Vec<&str> = a.iter().filter_map(|r| r["source"].as_str()).collect();
    assert_eq!(sources, ["pdp", "cache", "pdp"], "{a:#?}");
    assert_eq!(a[0]["verdict"], "allow");
    assert_eq!(a[0]["pdp"]["engine"], "opa");
    assert!(a[0]["pdp"]["decision_id"].is_string(), "{:#}", a[0]);
    assert!(a[0]["pdp"]["latency_us"].is_u64(), "{:#}", a[0]);
    assert_eq!(
        a[1]["pdp"]["decision_id"], a[0]["pdp"]["decision_id"],
        "a cache hit names its decision"
    );
    let d = for_port(denied);
    let dv: Vec<(&str, &str)> = d
        .iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap_or(""),
                r["verdict"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(dv, [("pdp", "deny"), ("cache", "deny")], "{d:#?}");
}

#[test]
fn pdp_killed_each_on_unavailable_mode() {
    let s = Scratch::new("pdp-down");
    let port_a = tcp_server("127.0.0.1:0").port();
    let port_b = tcp_server("127.0.0.1:0").port();
    let dead = format!("http://127.0.0.1:{}/v1/data/pep/decision", dead_port());
    let audit = s.dir.join("audit.jsonl");

    let p = policy_for(&s, &dead, "  on_unavailable: deny\n", None);
    let (res, out) = probe(&p, &audit, &[tcp("127.0.0.1", port_a)]);
    assert_eq!(results(&res), ["ECONNABORTED"], "deny\n{}", describe(&out));
    assert!(res[0].1 < 1500, "no hang: {} ms", res[0].1);

    let p = policy_for(&s, &dead, "  on_unavailable: allow\n", None);
    let (res, out) = probe(&p, &audit, &[tcp("127.0.0.1", port_a)]);
    assert_eq!(results(&res), ["OK"], "allow\n{}", describe(&out));
    assert!(res[0].1 < 1500, "no hang: {} ms", res[0].1);

    // stale: a verdict cached while the PDP was up is served after its TTL
    // once the PDP is killed; a destination never asked is denied.
    let rego = s.write(
        "p.rego",
        "package pep\ndecision := {\"allow\": true, \"ttl_s\": 1}\n",
    );
    let pdp = PdpServer::start(&rego);
    let p = policy_for(
        &s,
        &pdp.url(),
        "  on_unavailable: stale\n  stale_window_s: 60\n",
        None,
    );
    let _ = std::fs::remove_file(&audit);
    let (res, out) = probe(
        &p,
        &audit,
        &[
            tcp("127.0.0.1", port_a),
            cmd(&["kill", &pdp.pid().to_string()]),
            cmd(&["sleep", "1.3"]),
            tcp("127.0.0.1", port_a),
            tcp("127.0.0.1", port_b),
        ],
    );
    let ctx = describe(&out);
    assert_eq!(
        results(&res),
        ["OK", "OK", "OK", "OK", "ECONNABORTED"],
        "stale\n{ctx}"
    );
    let recs = read_audit(&audit);
    let stale = recs
        .iter()
        .filter(|r| r["net"]["dport"] == port_a)
        .nth(1)
        .unwrap_or_else(|| panic!("no second record for port a: {recs:#?}"));
    assert_eq!(stale["source"], "cache", "{stale:#}");
    assert_eq!(stale["pdp"]["stale"], true, "{stale:#}");
}

#[test]
fn pdp_slower_than_its_timeout_does_not_hang() {
    let s = Scratch::new("pdp-slow");
    let port = tcp_server("127.0.0.1:0").port();
    let slow = fake_opa(Duration::from_secs(3), |_| r#"{"result": true}"#.into());
    let url = format!("http://{}/v1/data/pep/decision", slow.addr);
    let audit = s.dir.join("audit.jsonl");
    for (mode, want) in [("deny", "ECONNABORTED"), ("allow", "OK")] {
        let p = policy_for(&s, &url, &format!("  on_unavailable: {mode}\n"), None);
        let (res, out) = probe(
            &p,
            &audit,
            &[
                tcp("127.0.0.1", port),
                cmd(&["tcpnb", "127.0.0.1", &port.to_string()]),
            ],
        );
        let ctx = describe(&out);
        let r = results(&res);
        assert_eq!(r[0], want, "{mode}\n{ctx}");
        let nb_want = if want == "OK" { "INPROGRESS_OK" } else { want };
        assert_eq!(r[1], nb_want, "{mode}, non-blocking\n{ctx}");
        for (x, ms) in &res {
            // timeout_ms is 200: the connect ends well before the PDP answers.
            assert!(*ms < 1500, "{mode}: {x} took {ms} ms\n{ctx}");
        }
    }
    assert!(slow.requests.load(Ordering::SeqCst) >= 1);
}

/// A held connect whose socket closes before the PDP answers: the answer
/// is cached for the next connect, nothing is released or destroyed, and
/// the record says the attempt ended (a deny, whatever the answer). In a
/// run the release itself finds the hold gone (no lookup before it).
#[test]
fn a_connect_closed_before_its_answer_is_recorded_as_ended() {
    let s = Scratch::new("pdp-gone");
    let allowed = tcp_server("127.0.0.1:0").port();
    let denied = tcp_server("127.0.0.1:0").port();
    // Answers after the probe has closed its socket.
    let slow = fake_opa(Duration::from_millis(400), move |dport| {
        format!(r#"{{"result": {}}}"#, dport == u64::from(allowed))
    });
    let url = format!("http://{}/v1/data/pep/decision", slow.addr);
    let p = s.write(
        "policy.yaml",
        &format!(
            "apiVersion: pep/v1\nname: pdptest\nnetwork:\n  default: ask\n\
             pdp:\n  engine: opa\n  opa: {{ url: \"{url}\", timeout_ms: 3000 }}\n  cache_ttl_s: 60\n"
        ),
    );
    let audit = s.dir.join("audit.jsonl");
    let (res, out) = probe(
        &p,
        &audit,
        &[
            cmd(&["tcpgone", "127.0.0.1", &allowed.to_string()]), // 0: held, closed
            cmd(&["tcpgone", "127.0.0.1", &denied.to_string()]),  // 1: held, closed
            cmd(&["sleep", "1.2"]),                               // 2: both answered
            tcp("127.0.0.1", allowed),                            // 3: the cached allow
            tcp("127.0.0.1", denied),                             // 4: the cached deny
        ],
    );
    let ctx = describe(&out);
    assert_eq!(
        results(&res),
        ["OK", "OK", "OK", "OK", "EPERM"],
        "the answers given after the close serve the next connects\n{ctx}"
    );
    assert_eq!(
        slow.requests.load(Ordering::SeqCst),
        2,
        "one ask per destination\n{ctx}"
    );
    let recs = read_audit(&audit);
    for (port, answer) in [(allowed, "allow"), (denied, "deny")] {
        let mine: Vec<&serde_json::Value> = recs
            .iter()
            .filter(|r| r["net"]["dport"] == port && r["action"] == "net.connect")
            .collect();
        assert_eq!(mine.len(), 2, "{port}: {mine:#?}");
        let r = mine[0];
        assert_eq!(r["source"], "pdp", "{r:#}");
        assert_eq!(
            r["verdict"], "deny",
            "an ended attempt was not let through: {r:#}"
        );
        assert_eq!(r["pdp"]["answer"], answer, "{r:#}");
        assert_eq!(r["pdp"]["attempt"], "held, ended before the answer", "{r:#}");
        assert!(r["pdp"]["held_ms"].as_u64().is_some_and(|ms| ms >= 300), "{r:#}");
        assert_eq!(mine[1]["source"], "cache", "{:#}", mine[1]);
        assert_eq!(mine[1]["verdict"], answer, "{:#}", mine[1]);
    }
}

#[test]
fn opa_answer_shapes() {
    let s = Scratch::new("pdp-shapes");
    let ports: Vec<u16> = (0..5).map(|_| tcp_server("127.0.0.1:0").port()).collect();
    let bodies: HashMap<u64, String> = [
        r#"{"result": true, "decision_id": "d-bool"}"#,
        r#"{"result": {"allow": true, "ttl_s": 30, "reason": "ok"}, "decision_id": "d-obj"}"#,
        r#"{}"#,
        r#"{"result": {"allow": false, "reason": "nope"}}"#,
        r#"{"result": "yes"}"#,
    ]
    .iter()
    .zip(&ports)
    .map(|(b, p)| (u64::from(*p), b.to_string()))
    .collect();
    let bodies = Mutex::new(bodies);
    let opa = fake_opa(Duration::ZERO, move |dport| {
        bodies
            .lock()
            .expect("lock")
            .get(&dport)
            .cloned()
            .unwrap_or_else(|| "{}".into())
    });
    let url = format!("http://{}/v1/data/pep/decision", opa.addr);
    let p = policy_for(&s, &url, "", None);
    let audit = s.dir.join("audit.jsonl");
    let cmds: Vec<Vec<String>> = ports.iter().map(|p| tcp("127.0.0.1", *p)).collect();
    let (res, out) = probe(&p, &audit, &cmds);
    let ctx = describe(&out);
    assert_eq!(
        results(&res),
        ["OK", "OK", "ECONNABORTED", "ECONNABORTED", "ECONNABORTED"],
        "boolean, object, undefined, object deny, bad shape\n{ctx}"
    );
    let recs = read_audit(&audit);
    let rec = |port: u16| {
        recs.iter()
            .find(|r| r["net"]["dport"] == port)
            .unwrap_or_else(|| panic!("no record for {port}: {recs:#?}"))
    };
    assert_eq!(rec(ports[0])["pdp"]["decision_id"], "d-bool");
    assert_eq!(rec(ports[1])["pdp"]["ttl_s"], 30);
    assert!(
        rec(ports[2])["pdp"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("undefined")),
        "{:#}",
        rec(ports[2])
    );
    assert_eq!(rec(ports[3])["pdp"]["reason"], "nope");
    let bad = rec(ports[4]);
    assert_eq!(bad["verdict"], "deny");
    assert!(
        bad["pdp"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("a string")),
        "says why: {bad:#}"
    );
}

#[test]
fn udp_miss_fails_now_then_the_answer_is_cached() {
    let s = Scratch::new("pdp-udp");
    let port = udp_server("127.0.0.1:0").port();
    let opa = fake_opa(Duration::ZERO, |_| r#"{"result": true}"#.into());
    let url = format!("http://{}/v1/data/pep/decision", opa.addr);
    let p = policy_for(&s, &url, "", None);
    let audit = s.dir.join("audit.jsonl");
    let u = cmd(&["udp", "127.0.0.1", &port.to_string()]);
    let (res, out) = probe(&p, &audit, &[u.clone(), cmd(&["sleep", "0.3"]), u.clone(), u]);
    assert_eq!(results(&res), ["EPERM", "OK", "OK", "OK"], "{}", describe(&out));
    assert_eq!(opa.requests.load(Ordering::SeqCst), 1, "asked once");
}

#[test]
fn policy_eval_and_check() {
    let s = Scratch::new("pdp-eval");
    let rego = s.write(
        "p.rego",
        "package pep\ndefault decision := false\ndecision if input.resource.dport == 443\n",
    );
    let eval = |file: &Path, input: &str| {
        Command::new(pep_agent_bin())
            .args(["policy", "eval"])
            .arg(file)
            .args(["--input", input])
            .output()
            .expect("policy eval")
    };
    let out = eval(&rego, r#"{"action": "net.connect", "resource": {"dport": 443}}"#);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (v["allow"].clone(), v["engine"].clone()),
        (true.into(), "rego".into()),
        "{v}"
    );
    let yaml = s.write(
        "p.yaml",
        &format!(
            "apiVersion: pep/v1\nnetwork:\n  default: ask\npdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n",
            rego.display()
        ),
    );
    let out = eval(&yaml, r#"{"action": "net.connect", "resource": {"dport": 22}}"#);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["allow"], false, "{v}");

    // Invalid Rego: rejected with its location by `policy check`.
    let bad = s.write("bad.rego", "package pep\n\ndecision if { input.x == == 1 }\n");
    let yaml = s.write(
        "bad.yaml",
        &format!(
            "apiVersion: pep/v1\nnetwork:\n  default: ask\npdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n",
            bad.display()
        ),
    );
    let out = Command::new(pep_agent_bin())
        .args(["policy", "check"])
        .arg(&yaml)
        .output()
        .expect("policy check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(err.contains("bad.rego:3:"), "location: {err}");

    // A rules query of the wrong shape: rejected, located in the value.
    let rules = s.write(
        "rules.rego",
        "package pep\nrules := {\"files\": {\"rules\": [{\"allow\": {\"pth\": \"/x\"}}]}}\ndecision := true\n",
    );
    let yaml = s.write(
        "rules.yaml",
        &format!(
            "apiVersion: pep/v1\npdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n  rules: data.pep.rules\n",
            rules.display()
        ),
    );
    let out = Command::new(pep_agent_bin())
        .args(["policy", "check"])
        .arg(&yaml)
        .output()
        .expect("policy check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        err.contains("rules.rego:2:1") && err.contains("files.rules[0].allow"),
        "{err}"
    );
}

#[test]
fn audit_mode_misses_go_ahead_and_are_asked() {
    let s = Scratch::new("pdp-audit");
    let tport = tcp_server("127.0.0.1:0").port();
    let uport = udp_server("127.0.0.1:0").port();
    let opa = fake_opa(Duration::ZERO, |_| r#"{"result": false}"#.into());
    let p = s.write(
        "policy.yaml",
        &format!(
            "apiVersion: pep/v1\nname: pdpaudit\nmode: audit\nnetwork:\n  default: ask\n\
             pdp:\n  engine: opa\n  opa: {{ url: \"http://{}/v1/data/pep/decision\", timeout_ms: 200 }}\n",
            opa.addr
        ),
    );
    let audit = s.dir.join("audit.jsonl");
    let u = cmd(&["udp", "127.0.0.1", &uport.to_string()]);
    let t = tcp("127.0.0.1", tport);
    let (res, out) = probe(&p, &audit, &[u.clone(), t.clone(), cmd(&["sleep", "0.3"]), u, t]);
    let ctx = describe(&out);
    assert_eq!(
        results(&res),
        ["OK", "OK", "OK", "OK", "OK"],
        "audit mode neither holds nor fails\n{ctx}"
    );
    for (r, ms) in &res {
        assert!(
            *ms < 1000,
            "{r} took {ms} ms: a miss is not held in audit mode\n{ctx}"
        );
    }
    assert_eq!(
        opa.requests.load(Ordering::SeqCst),
        2,
        "one ask each; then the cache"
    );
    let recs = read_audit(&audit);
    for port in [uport, tport] {
        let seen: Vec<(&str, &str, &str)> = recs
            .iter()
            .filter(|r| r["net"]["dport"] == port)
            .map(|r| {
                (
                    r["source"].as_str().unwrap_or(""),
                    r["verdict"].as_str().unwrap_or(""),
                    r["mode"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [("pdp", "deny", "audit"), ("cache", "deny", "audit")],
            "what enforce would have done, for port {port}: {recs:#?}"
        );
    }
}

/// `subject.exe` follows an exec under the same pid, even of a hard link to
/// the same file (same inode, another name): a process runs `a`, connects
/// (the PDP denies `a`), execs `b` and connects again (the PDP allows `b`).
/// A name cached by pid, or by pid and inode, would still say `a`.
#[test]
fn subject_exe_follows_an_exec_under_the_same_pid() {
    let s = Scratch::new("pdp-exe");
    let (a, b) = (s.dir.join("a"), s.dir.join("b"));
    std::fs::copy("/bin/bash", &a).expect("copy bash");
    std::fs::hard_link(&a, &b).expect("hard link");
    let (first, second) = (tcp_server("127.0.0.1:0").port(), tcp_server("127.0.0.1:0").port());
    let rego = s.write(
        "exe.rego",
        "package pep\n\
         default decision := false\n\
         decision := {\"allow\": true, \"ttl_s\": 60} if endswith(input.subject.exe, \"/b\")\n",
    );
    let policy = s.write(
        "policy.yaml",
        &format!(
            "apiVersion: pep/v1\nname: pdpexe\nnetwork:\n  default: ask\n\
             pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n",
            rego.display()
        ),
    );
    // A brace group, not a subshell: the connect is made by the shell's
    // own process, whose pid it prints.
    let connect = |port: u16, name: &str| {
        format!(
            "{{ echo {name}-allowed $$; }} 2>/dev/null 3<>/dev/tcp/127.0.0.1/{port} || echo {name}-denied $$"
        )
    };
    let script = format!(
        "{}; exec {} -c '{}'",
        connect(first, "a"),
        b.display(),
        connect(second, "b")
    );
    let audit = s.dir.join("audit.jsonl");
    let audit_arg = audit.display().to_string();
    let out = pep_run(
        &policy,
        &["--audit", &audit_arg],
        &[a.to_str().expect("utf-8"), "-c", &script],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<(&str, &str)> = stdout.lines().filter_map(|l| l.split_once(' ')).collect();
    let results: Vec<&str> = lines.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        results,
        ["a-denied", "b-allowed"],
        "stdout: {stdout}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines[0].1, lines[1].1, "one pid for both connects: {stdout}");
}

/// The keep-warm after a miss (`pdp/warm.rs`) is bounded: some warm-ups
/// while misses come in a stream, at most one per ms for 100 ms after the
/// last one, none after a lone miss, and none at all in a run without
/// misses.
#[test]
fn keep_warm_is_bounded_and_idle_without_misses() {
    let s = Scratch::new("pdp-warm");
    let port = tcp_server("127.0.0.1:0").port();
    let port2 = tcp_server("127.0.0.1:0").port();
    let rego = s.write(
        "allow.rego",
        "package pep\ndefault decision := {\"allow\": true, \"ttl_s\": 60}\n",
    );
    let policy = s.write(
        "policy.yaml",
        &format!(
            "apiVersion: pep/v1\nname: pdpwarm\nnetwork:\n  default: ask\n\
             pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n",
            rego.display()
        ),
    );
    let warmed = |script: &str| -> u64 {
        let audit = s.dir.join("audit.jsonl");
        let audit_arg = audit.display().to_string();
        let out = std::process::Command::new(pep_agent_bin())
            .env("PEP_LOG", "warn,pep_agent::pdp=info")
            .args(["run", "--policy"])
            .arg(&policy)
            .args(["--audit", &audit_arg, "--", "bash", "-c", script])
            .output()
            .expect("spawn pep-agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{script}: {err}");
        err.lines()
            .find_map(|l| l.split("pdp: keep-warm decisions=").nth(1))
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no keep-warm line in: {err}"))
    };
    // Two misses (two destinations), then 400 ms without any: the warm-ups
    // stop 100 ms after the second.
    let n = warmed(&format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && exec 4<>/dev/tcp/127.0.0.1/{port2} && sleep 0.4"
    ));
    assert!((1..=101).contains(&n), "{n} keep-warm decisions after two misses");
    let n = warmed(&format!("exec 3<>/dev/tcp/127.0.0.1/{port} && sleep 0.3"));
    assert_eq!(n, 0, "keep-warm decisions after a lone miss");
    assert_eq!(warmed("sleep 0.3"), 0, "keep-warm decisions without a miss");
}

/// `pdp.busy_poll_us` (`pdp/spin.rs`): the ask thread spins for the next
/// miss for that long after each, and only then; the answers are the same
/// as without it. A run of two misses then 700 ms without any spins at
/// least a quarter of its 200 ms window and no longer than the window (a
/// thread that kept spinning would take about 700 ms of CPU); a run
/// without the setting spins not at all.
#[test]
fn busy_poll_spins_only_in_the_window_after_a_miss() {
    let s = Scratch::new("pdp-busy");
    let port = tcp_server("127.0.0.1:0").port();
    let denied = tcp_server("127.0.0.1:0").port();
    let rego = s.write(
        "p.rego",
        &format!(
            "package pep\ndefault decision := {{\"allow\": true, \"ttl_s\": 60}}\n\
             decision := {{\"allow\": false, \"ttl_s\": 60}} if input.resource.dport == {denied}\n"
        ),
    );
    let run = |busy_poll_us: u64| -> (String, u64) {
        let policy = s.write(
            "policy.yaml",
            &format!(
                "apiVersion: pep/v1\nname: pdpbusy\nnetwork:\n  default: ask\n\
                 pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n  busy_poll_us: {busy_poll_us}\n",
                rego.display()
            ),
        );
        let audit = s.dir.join("audit.jsonl");
        let audit_arg = audit.display().to_string();
        let script = format!(
            "(exec 3<>/dev/tcp/127.0.0.1/{port}) && echo allowed-ok; \
             (exec 3<>/dev/tcp/127.0.0.1/{denied}) 2>/dev/null || echo denied-failed; sleep 0.7"
        );
        let out = std::process::Command::new(pep_agent_bin())
            .env("PEP_LOG", "warn,pep_agent::pdp=info")
            .args(["run", "--policy"])
            .arg(&policy)
            .args(["--audit", &audit_arg, "--", "bash", "-c", &script])
            .output()
            .expect("spawn pep-agent");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "busy_poll_us {busy_poll_us}: {err}");
        let spun_us = err
            .lines()
            .find_map(|l| l.split("busy-poll cpu_us=").nth(1))
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no busy-poll figure in: {err}"));
        (String::from_utf8_lossy(&out.stdout).into_owned(), spun_us)
    };
    let (stdout, spun_us) = run(200_000);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["allowed-ok", "denied-failed"],
        "busy-polling changes no answer"
    );
    assert!(
        (50_000..=260_000).contains(&spun_us),
        "{spun_us} us of CPU spent busy-polling a 200 ms window after two misses (then 700 ms without)"
    );
    let (stdout, spun_us) = run(0);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["allowed-ok", "denied-failed"]
    );
    assert_eq!(spun_us, 0, "busy-polling without busy_poll_us");
}
