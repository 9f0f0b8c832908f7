//! Policies that ask a PDP (`network.default: ask`) served by the host
//! daemon: a held connect waits for the PDP's answer as under `pep-agent
//! run`, the verdict is cached in the pinned `VERDICT_CACHE`, and the cache
//! outlives the daemon. Killed with SIGKILL, the daemon leaves every cached
//! verdict enforced and a connect nobody can answer fails within the SYN
//! retries instead of hanging or going through; restarted, it adopts the
//! sandbox and asks again; a reload keeps the verdicts it cannot have
//! changed and drops the ones it can; `pep-agent run` through the daemon
//! asks in a sandbox of its own.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pep_tests::{daemon::*, pdp::PdpServer, *};
use serde_json::Value;

/// Longest a probe process may run. A held connect nobody answers ends
/// when its SYN retries run out (about 2 s); a probe still running after
/// this is a connect that hangs.
const PROBE_LIMIT: Duration = Duration::from_secs(20);

/// Longest a connect nobody can answer may take to fail: the SYN retries
/// (`TCP_SYNCNT` 8 with a 1-jiffy RTO, about 2 s), with room for a slow
/// machine.
const UNANSWERED_BOUND_MS: u64 = 10_000;

/// Longer than any answer from a live PDP on loopback takes, shorter than
/// the SYN retries (about 2 s) and the OPA timeout (2 s): a connect that
/// took less was answered, not timed out.
const PROMPT_MS: u64 = 1_500;

fn probe_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pdp_probe.py")
}

/// One blocking TCP connect to 127.0.0.1:`port` by a process placed in
/// cgroup `cg` before its first instruction: its result (`OK` or an errno
/// name) and how long the connect took, in ms.
fn connect(cg: &Path, port: u16) -> (String, u64) {
    let procs = cg.join("cgroup.procs");
    let mut cmd = Command::new("python3");
    cmd.arg(probe_script())
        .args(["tcp", "127.0.0.1", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: a write(2) to a cgroup file between fork and exec.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, "0"));
    }
    let mut child = cmd.spawn().expect("spawn probe");
    // A deadline rather than `output()`: a connect that hangs must fail the
    // test, not hang it.
    let deadline = Instant::now() + PROBE_LIMIT;
    while child.try_wait().expect("wait probe").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("probe output");
            panic!(
                "the connect to {port} was still running after {PROBE_LIMIT:?}: it hangs\n{}",
                describe(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("probe output");
    assert!(out.status.success(), "probe: {}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // "tcp RESULT MS"
    let line: Vec<&str> = stdout.split_whitespace().collect();
    match line[..] {
        ["tcp", res, ms] => (res.to_owned(), ms.parse().expect("ms")),
        _ => panic!("probe output: {}", describe(&out)),
    }
}

/// `rego` allowing exactly `ports` (no `ttl_s`: `cache_ttl_s` applies).
fn allow_only(ports: &[u16]) -> String {
    let set: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "package pep\n\
         default decision := false\n\
         decision := {{\"allow\": true, \"reason\": \"listed\"}} if input.resource.dport in {{{}}}\n",
        set.join(", ")
    )
}

/// A record's `ts` as a key that sorts as time does: RFC 3339 with the
/// fraction's trailing zeros dropped (or no fraction) does not.
fn ts_key(r: &Value) -> String {
    let ts = r["ts"].as_str().unwrap_or_else(|| panic!("no ts: {r}"));
    let ts = ts.strip_suffix('Z').unwrap_or_else(|| panic!("ts not UTC: {ts}"));
    let (secs, frac) = ts.split_once('.').unwrap_or((ts, ""));
    format!("{secs}.{frac:0<9}")
}

/// The `net.connect` records of sandbox `sandbox` to port `port`, in the
/// order of the attempts (the kernel's timestamps: a record from the PDP
/// task and one from the kernel's ring buffer may be written in either
/// order).
fn connects(recs: &[Value], sandbox: &str, port: u16) -> Vec<Value> {
    let mut v: Vec<Value> = recs
        .iter()
        .filter(|r| r["sandbox"] == sandbox && r["action"] == "net.connect" && r["net"]["dport"] == port)
        .cloned()
        .collect();
    v.sort_by_key(ts_key);
    v
}

/// (source, verdict) of each record.
fn outcomes(recs: &[Value]) -> Vec<(String, String)> {
    recs.iter()
        .map(|r| {
            (
                r["source"].as_str().unwrap_or("?").to_owned(),
                r["verdict"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect()
}

fn want(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(s, x)| ((*s).to_owned(), (*x).to_owned()))
        .collect()
}

/// Every record of an ask: `source: pdp` with the engine (and, from OPA,
/// the decision id).
fn assert_asked_by(recs: &[Value], engine: &str) {
    for r in recs.iter().filter(|r| r["source"] == "pdp") {
        assert_eq!(r["pdp"]["engine"], engine, "{r:#}");
        if engine == "opa" {
            assert!(r["pdp"]["decision_id"].is_string(), "no decision id: {r:#}");
        }
    }
}

/// The sandbox's cgroup is gone once it is deleted.
fn delete(d: &TestDaemon, name: &str) {
    let r = d.request(&format!(r#"{{"op":"delete","name":"{name}"}}"#));
    assert_eq!(r["ok"], true, "delete {name}: {r}\n{}", d.logs());
    assert!(!d.cgroup(name).exists(), "cgroup of {name} left");
    let list = d.request(r#"{"op":"list"}"#);
    assert_eq!(list["data"], serde_json::json!([]), "{list}");
}

/// The audit chain is whole: `events verify` passes and `seq` has no holes.
fn assert_chain(d: &TestDaemon) -> Vec<Value> {
    let v = d.cli(None, &["events", "verify", d.audit.to_str().expect("utf8")]);
    assert!(v.status.success(), "{}", describe(&v));
    let recs = read_audit(&d.audit);
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().expect("seq")).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "seq has holes: {seqs:?}"
    );
    recs
}

/// A daemon sandbox asking a remote PDP (`pdp serve`, engine `opa`), its
/// request counter as the witness of every ask:
/// - with the daemon up, an allowed connect succeeds on the first try
///   (asked once), a denied one fails promptly with ECONNABORTED (asked
///   once), and repeating either asks nothing (allow from the cache, deny
///   with EPERM at once);
/// - with the daemon killed by SIGKILL, both cached verdicts are still
///   enforced without asking, and a connect to a destination never asked
///   (one the PDP would allow) is neither let through nor left hanging: it
///   fails within the SYN retries;
/// - restarted, the daemon adopts the sandbox; the PDP is asked about the
///   two destinations it has no verdict for, once each, and about nothing
///   cached before the kill;
/// - a reload with nothing changed keeps every cached verdict;
/// - a deleted sandbox's verdicts are not served to a new sandbox of the
///   same name, and delete and `--uninstall` leave nothing behind.
///
/// The audit log says the same: the ask's record is `source: pdp` with the
/// engine and decision id, each cache hit's `source: cache`, including the
/// hits made while no daemon ran.
#[test]
fn opa_verdicts_outlive_sigkill_restart_and_reload() {
    let allowed = tcp_server("127.0.0.1:0").port();
    let denied = tcp_server("127.0.0.1:0").port();
    // First tried while the daemon is down; the PDP would allow it.
    let unasked = tcp_server("127.0.0.1:0").port();
    // First tried after the restart.
    let fresh = tcp_server("127.0.0.1:0").port();
    let s = Scratch::new("dask-pdp");
    let rego = s.write("decision.rego", &allow_only(&[allowed, unasked, fresh]));
    let pdp = PdpServer::start(&rego);
    // A generous OPA timeout and a long TTL: on a busy machine the PDP is
    // never "unavailable" and nothing expires mid-test.
    let policy = format!(
        "apiVersion: pep/v1\nname: ask\nnetwork:\n  default: ask\n\
         pdp:\n  engine: opa\n  opa: {{ url: \"{}\", timeout_ms: 2000 }}\n  cache_ttl_s: 300\n",
        pdp.url()
    );
    let mut d = TestDaemon::new("dask", &[("ask", &policy)], "", false);
    d.start();
    let r = d.request(r#"{"op":"create","name":"asker","policy":"ask"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let cg = d.cgroup("asker");

    // One connect; its result must be one of `want`, and the PDP must have
    // been asked `asks` times meanwhile. Returns how long it took.
    let step = |d: &TestDaemon, what: &str, port: u16, want: &[&str], asks: u64| -> u64 {
        let before = pdp.requests();
        let (res, ms) = connect(&cg, port);
        let after = pdp.requests();
        assert!(
            want.contains(&res.as_str()),
            "{what}: the connect to {port} gave {res} after {ms} ms, want {want:?}\n{}",
            d.logs()
        );
        assert_eq!(
            after - before,
            asks,
            "{what}: PDP requests during the connect to {port}\n{}",
            d.logs()
        );
        ms
    };

    // 1. The daemon asks, as `run` does.
    step(&d, "first, allowed", allowed, &["OK"], 1);
    step(&d, "again, allowed", allowed, &["OK"], 0);
    let ms = step(&d, "first, denied", denied, &["ECONNABORTED"], 1);
    assert!(ms < PROMPT_MS, "the deny took {ms} ms: not the PDP's answer");
    step(&d, "again, denied", denied, &["EPERM"], 0);

    // 2. SIGKILL: the kernel goes on alone.
    d.kill9();
    let before_kill = pdp.requests();
    step(&d, "daemon down, cached allow", allowed, &["OK"], 0);
    let ms = step(&d, "daemon down, cached deny", denied, &["EPERM"], 0);
    assert!(ms < PROMPT_MS, "a cached deny took {ms} ms");
    let ms = step(
        &d,
        "daemon down, never asked",
        unasked,
        &["ETIMEDOUT", "ECONNABORTED"],
        0,
    );
    assert!(
        ms < UNANSWERED_BOUND_MS,
        "a connect nobody can answer took {ms} ms to fail"
    );

    // 3. Restarted: adopts the sandbox and asks again.
    d.start();
    let status = d.request(r#"{"op":"status"}"#);
    assert_eq!(status["data"]["origin"], "adopted", "{status}\n{}", d.logs());
    // Served again before any miss was read.
    assert_eq!(
        status["data"]["sandboxes"][0]["asks_pdp"],
        true,
        "{status}\n{}",
        d.logs()
    );
    for (what, port) in [
        ("after restart, new", fresh),
        ("after restart, unanswered before", unasked),
    ] {
        let (res, ms) = connect(&cg, port);
        assert_eq!(
            res,
            "OK",
            "{what}: the connect to {port} after {ms} ms\n{}",
            d.logs()
        );
    }
    // Counted over both, from before the restart: the ask the kernel sent
    // for the connect made while the daemon was down may be answered by the
    // next daemon, in which case the later connect is a cache hit. Either
    // way each destination is asked about once.
    assert_eq!(
        pdp.requests() - before_kill,
        2,
        "one ask per destination without a verdict\n{}",
        d.logs()
    );
    step(&d, "after restart, cached allow", allowed, &["OK"], 0);
    step(&d, "after restart, cached deny", denied, &["EPERM"], 0);

    // 4. A reload with nothing changed keeps the verdicts.
    let r = d.request(r#"{"op":"reload"}"#);
    assert_eq!(r["ok"], true, "reload: {r}\n{}", d.logs());
    for port in [allowed, fresh, unasked] {
        step(&d, "after an unchanged reload", port, &["OK"], 0);
    }
    step(&d, "after an unchanged reload", denied, &["EPERM"], 0);

    // 5. Delete: a new sandbox of the same name starts with no verdicts.
    delete(&d, "asker");
    let r = d.request(r#"{"op":"create","name":"asker","policy":"ask"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    step(&d, "a new sandbox of the same name", allowed, &["OK"], 1);
    delete(&d, "asker");

    d.stop();
    let recs = assert_chain(&d);
    let a = connects(&recs, "asker", allowed);
    assert_eq!(
        outcomes(&a),
        want(&[
            ("pdp", "allow"),   // 1. asked
            ("cache", "allow"), // 1.
            ("cache", "allow"), // 2. no daemon
            ("cache", "allow"), // 3. restarted
            ("cache", "allow"), // 4. reloaded
            ("pdp", "allow"),   // 5. the new sandbox
        ]),
        "{a:#?}"
    );
    let x = connects(&recs, "asker", denied);
    assert_eq!(
        outcomes(&x),
        want(&[
            ("pdp", "deny"),
            ("cache", "deny"),
            ("cache", "deny"),
            ("cache", "deny"),
            ("cache", "deny"),
        ]),
        "{x:#?}"
    );
    let f = connects(&recs, "asker", fresh);
    assert_eq!(
        outcomes(&f),
        want(&[("pdp", "allow"), ("cache", "allow")]),
        "{f:#?}"
    );
    // Asked once (while down, or after); its last connect a cache hit.
    let u = connects(&recs, "asker", unasked);
    let asked: Vec<&Value> = u.iter().filter(|r| r["source"] == "pdp").collect();
    assert_eq!(asked.len(), 1, "{u:#?}");
    assert_eq!(outcomes(&u[u.len() - 1..]), want(&[("cache", "allow")]), "{u:#?}");
    for recs in [&a, &x, &f, &u] {
        assert_asked_by(recs, "opa");
    }

    d.uninstall();
    assert!(!cg.exists(), "cgroup left");
}

/// An embedded engine (`rego`) whose module changes under a running daemon:
/// a reload that changes nothing the PDP answers from (the control op)
/// keeps the cached allow; one that changes the module (SIGHUP) makes it a
/// miss, so the next connect is asked again and denied (ECONNABORTED, then
/// EPERM from the cache): the old allow is never served. The audit log is
/// the witness of each ask (`source: pdp`, engine `rego`) and hit
/// (`source: cache`).
#[test]
fn a_reload_that_changes_the_rego_asks_again() {
    let a = tcp_server("127.0.0.1:0").port();
    let b = tcp_server("127.0.0.1:0").port();
    let s = Scratch::new("dask-rego");
    let rego = s.write("decision.rego", &allow_only(&[a]));
    let policy = format!(
        "apiVersion: pep/v1\nname: embedded\nnetwork:\n  default: ask\n\
         pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n  cache_ttl_s: 300\n",
        rego.display()
    );
    let mut d = TestDaemon::new("dask-rego", &[("embedded", &policy)], "", true);
    d.start();
    let r = d.request(r#"{"op":"create","name":"embedded","policy":"embedded"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let cg = d.cgroup("embedded");
    let expect = |what: &str, port: u16, want: &str| -> u64 {
        let (res, ms) = connect(&cg, port);
        assert_eq!(
            res,
            want,
            "{what}: the connect to {port} after {ms} ms\n{}",
            d.logs()
        );
        ms
    };

    expect("first", a, "OK");
    expect("cached", a, "OK");
    let r = d.request(r#"{"op":"reload"}"#);
    assert_eq!(r["ok"], true, "reload: {r}\n{}", d.logs());
    expect("after an unchanged reload", a, "OK");

    // The module now allows b only; SIGHUP reloads it.
    std::fs::write(&rego, allow_only(&[b])).expect("write rego");
    let reloads = |result: &str| -> u64 {
        let (code, body) = d.http_get("/metrics").expect("metrics");
        assert_eq!(code, 200, "{body}");
        let series = format!("pep_reloads_total{{result=\"{result}\"}}");
        parse_exposition(&body)
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .find(|(name, _)| *name == series)
            .map_or(0, |(_, v)| *v as u64)
    };
    assert_eq!(reloads("ok"), 1, "the control op's reload");
    d.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while reloads("ok") < 2 {
        assert_eq!(reloads("error"), 0, "SIGHUP reload refused\n{}", d.logs());
        assert!(Instant::now() < deadline, "SIGHUP did not reload\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    let ms = expect("after the module changed", a, "ECONNABORTED");
    assert!(ms < PROMPT_MS, "the deny took {ms} ms: not the PDP's answer");
    expect("the new deny, cached", a, "EPERM");
    expect("newly allowed", b, "OK");

    // `pep-agent run` through the daemon: the same policy in a sandbox of
    // its own, a generation with nothing cached, asks for each destination
    // (separated by `;`: one process, two connects, then the cache).
    let script = probe_script();
    let (ps, pa, pb) = (script.to_str().expect("utf8"), a.to_string(), b.to_string());
    let out = d.cli(
        None,
        &[
            "run",
            "--policy",
            "embedded",
            "--name",
            "job",
            "--",
            "python3",
            ps,
            "tcp",
            "127.0.0.1",
            &pb,
            ";",
            "tcp",
            "127.0.0.1",
            &pa,
            ";",
            "tcp",
            "127.0.0.1",
            &pa,
        ],
    );
    assert!(out.status.success(), "{}\n{}", describe(&out), d.logs());
    // "tcp RESULT MS" per connect.
    let results: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    assert_eq!(
        results,
        ["OK", "ECONNABORTED", "EPERM"],
        "{}\n{}",
        describe(&out),
        d.logs()
    );

    delete(&d, "embedded");
    d.stop();
    let recs = assert_chain(&d);
    let job_a = connects(&recs, "job", a);
    assert_eq!(
        outcomes(&job_a),
        want(&[("pdp", "deny"), ("cache", "deny")]),
        "{job_a:#?}"
    );
    assert_eq!(outcomes(&connects(&recs, "job", b)), want(&[("pdp", "allow")]));
    let ra = connects(&recs, "embedded", a);
    assert_eq!(
        outcomes(&ra),
        want(&[
            ("pdp", "allow"),
            ("cache", "allow"),
            ("cache", "allow"), // an unchanged reload
            ("pdp", "deny"),    // the module changed: asked again
            ("cache", "deny"),
        ]),
        "{ra:#?}"
    );
    let rb = connects(&recs, "embedded", b);
    assert_eq!(outcomes(&rb), want(&[("pdp", "allow")]), "{rb:#?}");
    assert_asked_by(&ra, "rego");
    assert_asked_by(&rb, "rego");

    d.uninstall();
    assert!(!cg.exists(), "cgroup left");
}

/// The kernel's verdict-cache misses and asks it could not send, summed
/// over CPUs, from the pinned `COUNTERS`.
fn ask_counts(d: &TestDaemon) -> (u64, u64) {
    use pep_agent::pdp::kernel::AskCounters;
    let path = d.pin_dir.join("maps/COUNTERS");
    let data = aya::maps::MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let AskCounters { misses, lost, .. } = AskCounters::from_map(&aya::maps::Map::PerCpuArray(data))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (misses, lost)
}

/// When a held connect sends its last SYN, in ms after the miss: the
/// retransmits back off from one jiffy (4 ms at HZ=250: 4, 8, ... 512 ms,
/// eight of them). An answer later than this cannot let it through. Set a
/// little under it, for a faster HZ.
const LAST_SYN_MS: u64 = 900;

/// Allows a destination whose address ends in an even number.
const EVEN_ADDRESSES: &str = "package pep\n\
    default decision := false\n\
    decision := {\"allow\": true} if {\n\
    \tparts := split(input.resource.daddr, \".\")\n\
    \tto_number(parts[3]) % 2 == 0\n\
    }\n";

/// The daemon is killed with SIGKILL again and again while sandboxed
/// processes connect, each connect to a destination never asked before (so
/// each is held and asked), and while a flood of compiled-rule denials
/// keeps its audit task busy (so an answer's record waits to be written).
/// Every connect ends as its PDP answer says, or, if no daemon was there
/// to answer within the SYN retries, fails; and every connect has a record
/// in the log whose verdict is what happened to it, never lost: written by
/// the daemon that answered, and by a later one (`pdp.recovered`, from
/// what the answering one kept) if that was killed before the ring buffer
/// was given back, without asking again.
#[test]
fn sigkill_while_asking_loses_no_answer_and_no_record() {
    const STREAMS: usize = 6;
    const PER_STREAM: usize = 400;
    const KILLS: usize = 5;
    let port = tcp_server("0.0.0.0:0").port();
    let flood_port = tcp_server("127.0.0.1:0").port();
    let s = Scratch::new("dask-kill");
    let rego = s.write("even.rego", EVEN_ADDRESSES);
    let policy = format!(
        "apiVersion: pep/v1\nname: asker\nnetwork:\n  default: ask\n  rules:\n    \
         - deny: {{ cidr: 127.0.0.1/32, ports: [{flood_port}] }}\n\
         pdp:\n  engine: rego\n  rego: {{ files: [{}] }}\n  cache_ttl_s: 300\n",
        rego.display()
    );
    let mut d = TestDaemon::new("dask-kill", &[("asker", &policy)], "", false);
    d.start();
    let r = d.request(r#"{"op":"create","name":"asker","policy":"asker"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let cg = d.cgroup("asker");
    let flood = Hammer::start(
        &d.scratch.dir,
        "flood",
        &cg,
        &[format!("tcp:127.0.0.1:{flood_port}")],
    );
    let (misses0, lost0) = ask_counts(&d);

    // Stream k connects to 127.(k+1).i/256.i%256: distinct destinations.
    let target = |k: usize, i: usize| format!("127.{}.{}.{}", k + 1, i / 256, i % 256);
    let procs = cg.join("cgroup.procs");
    let mut streams: Vec<std::process::Child> = (0..STREAMS)
        .map(|k| {
            let mut cmd = Command::new("python3");
            cmd.arg(probe_script());
            for i in 1..=PER_STREAM {
                cmd.args(["tcp", &target(k, i), &port.to_string(), ";"]);
            }
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            let procs = procs.clone();
            // SAFETY: a write(2) to a cgroup file between fork and exec.
            unsafe {
                cmd.pre_exec(move || std::fs::write(&procs, "0"));
            }
            cmd.spawn().expect("spawn stream")
        })
        .collect();
    // Each daemon is killed once it has written to the log (its first
    // batch, so what it read first is given back), at a moment that falls
    // anywhere in its asking.
    let log_len = |d: &TestDaemon| std::fs::metadata(&d.audit).map_or(0, |m| m.len());
    let mut kills_while_asking = 0;
    for k in 0..KILLS {
        let before = log_len(&d);
        let deadline = Instant::now() + Duration::from_secs(30);
        while log_len(&d) == before {
            assert!(
                Instant::now() < deadline,
                "daemon {k} wrote nothing\n{}",
                d.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(40 + 37 * k as u64));
        let asking = streams
            .iter_mut()
            .any(|c| c.try_wait().expect("wait stream").is_none());
        d.kill9();
        kills_while_asking += usize::from(asking);
        d.start();
    }
    let mut outputs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for mut c in streams {
        while c.try_wait().expect("wait stream").is_none() {
            assert!(
                Instant::now() < deadline,
                "a stream of connects hangs\n{}",
                d.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = c.wait_with_output().expect("stream output");
        assert!(out.status.success(), "stream: {}", describe(&out));
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let flooded = flood.finish();
    assert!(
        count(&flooded, &format!("tcp:127.0.0.1:{flood_port}"), "EPERM") > 0,
        "the flood ran: {flooded}"
    );
    let (misses, lost) = ask_counts(&d);
    d.stop();
    let recs = assert_chain(&d);

    // The asked connects' records by destination (the flood's are many).
    let mut by_addr: std::collections::HashMap<&str, Vec<&Value>> = std::collections::HashMap::new();
    for r in recs
        .iter()
        .filter(|r| r["sandbox"] == "asker" && r["source"] != "rule")
    {
        if let Some(a) = r["net"]["daddr"].as_str() {
            by_addr.entry(a).or_default().push(r);
        }
    }
    let mut seen = 0;
    let mut late = 0;
    let mut recovered = 0;
    let mut twice = 0;
    for (k, out) in outputs.iter().enumerate() {
        let results: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().nth(1)).collect();
        assert_eq!(results.len(), PER_STREAM, "stream {k}: {out}");
        for (n, res) in results.iter().enumerate() {
            let addr = target(k, n + 1);
            let even = (n + 1) % 256 % 2 == 0;
            // What the PDP answers, or no answer in time.
            let expected: &[&str] = if even {
                &["OK", "ETIMEDOUT"]
            } else {
                &["ECONNABORTED", "ETIMEDOUT"]
            };
            assert!(expected.contains(res), "{addr}: {res}, want one of {expected:?}");
            let mine: &[&Value] = by_addr.get(addr.as_str()).map_or(&[], Vec::as_slice);
            assert!(
                !mine.is_empty(),
                "{addr} ({res}): no record; {} records in all",
                recs.len()
            );
            // Written once by the daemon that answered, and again by each
            // later one that read the miss before the ring was given back
            // (marked `recovered`).
            let fresh = mine.iter().filter(|r| r["pdp"]["recovered"] != true).count();
            assert!(fresh <= 1, "{addr}: {fresh} records not recovered: {mine:#?}");
            assert!(
                mine.len() <= 1 + KILLS,
                "{addr}: {} records: {mine:#?}",
                mine.len()
            );
            let verdict = if *res == "OK" { "allow" } else { "deny" };
            for r in mine {
                assert_eq!(r["source"], "pdp", "{addr}: {r:#}");
                let held_ms = r["pdp"]["held_ms"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no held_ms: {r:#}"));
                if *res == "ETIMEDOUT" && r["verdict"] == "allow" {
                    // Released after its last SYN retry had gone: too late.
                    assert!(
                        held_ms >= LAST_SYN_MS,
                        "{addr} ended {res} after {held_ms} ms held: {r:#}"
                    );
                    late += 1;
                    continue;
                }
                assert_eq!(r["verdict"], verdict, "{addr} ended {res}: {r:#}");
                if *res == "ETIMEDOUT" {
                    assert_eq!(r["pdp"]["attempt"], "held, ended before the answer", "{r:#}");
                }
            }
            seen += 1;
            twice += usize::from(mine.len() > 1);
            recovered += mine.iter().filter(|r| r["pdp"]["recovered"] == true).count();
        }
    }
    assert_eq!(seen, STREAMS * PER_STREAM);
    assert!(
        kills_while_asking >= 3,
        "only {kills_while_asking} of {KILLS} kills came while connects were being asked"
    );
    // Every connect missed the cache once, and every miss went to be asked
    // about.
    assert_eq!(
        (misses - misses0, lost - lost0),
        (seen as u64, 0),
        "cache misses, asks lost"
    );
    let torn = d.logs().matches("dropped a partial last line").count();
    eprintln!(
        "{seen} connects asked through {kills_while_asking} kills: {recovered} records written after a restart, {twice} connects with more than one, {late} answers too late, {torn} partial lines cut"
    );
    d.uninstall();
}

/// A daemon killed in the middle of a write leaves a partial last line in
/// the log (here made by hand, as a kill mid-write would). The next daemon
/// cuts it off before it appends, so the chain it continues verifies; a
/// line that is whole is never cut.
#[test]
fn a_partial_line_left_by_a_killed_daemon_is_cut() {
    let allowed = tcp_server("127.0.0.1:0").port();
    let policy = format!(
        "apiVersion: pep/v1\nname: torn\nnetwork:\n  default: deny\n  rules:\n    \
         - allow: {{ cidr: 127.0.0.1/32, ports: [{allowed}] }}\n"
    );
    let mut d = TestDaemon::new("dtorn", &[("torn", &policy)], "", false);
    d.start();
    let r = d.request(r#"{"op":"create","name":"torn","policy":"torn"}"#);
    assert_eq!(r["ok"], true, "{r}\n{}", d.logs());
    let cg = d.cgroup("torn");
    assert_eq!(connect(&cg, allowed).0, "OK");
    // Written out: the daemon flushes within its poll interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    while read_audit(&d.audit).iter().all(|r| r["net"]["dport"] != allowed) {
        assert!(Instant::now() < deadline, "no record\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    d.kill9();
    let whole = std::fs::read_to_string(&d.audit).expect("log");
    let partial = r#"{"seq":9999,"action":"net.con"#;
    std::fs::write(&d.audit, format!("{whole}{partial}")).expect("tear the log");

    d.start();
    assert_eq!(connect(&cg, allowed).0, "OK");
    assert_eq!(connect(&cg, allowed + 1).0, "EPERM");
    delete(&d, "torn");
    d.stop();
    let text = std::fs::read_to_string(&d.audit).expect("log");
    assert!(text.starts_with(&whole), "a whole line was cut");
    assert!(!text.contains(partial), "the partial line is still there");
    let recs = assert_chain(&d);
    assert!(
        recs.iter()
            .any(|r| r["net"]["dport"] == allowed + 1 && r["verdict"] == "deny"),
        "the next daemon's records follow"
    );
    assert!(d.logs().contains("dropped a partial last line"), "{}", d.logs());
    d.uninstall();
}
