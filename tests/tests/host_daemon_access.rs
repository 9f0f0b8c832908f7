//! Who may do what through the daemon's control socket, and what bad
//! clients cannot do to it; its metrics and health endpoints; systemd's
//! readiness protocol.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::{UnixDatagram, UnixStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pep_tests::{daemon::*, *};

const NOBODY: (u32, u32) = (65534, 65534);
/// A uid without an account: another ordinary user.
const OTHER: (u32, u32) = (65533, 65533);

fn policy(port: u16) -> String {
    format!(
        "apiVersion: pep/v1\nname: agent\nnetwork:\n  default: allow\n  rules:\n    - deny: {{ cidr: 127.0.0.1/32, ports: [{port}] }}\n"
    )
}

#[test]
fn an_ordinary_user_gets_a_sandbox_and_others_cannot_touch_it() {
    let denied = tcp_server("127.0.0.1:0");
    let allowed = tcp_server("127.0.0.1:0");
    let grants = "grants:\n  - users: [\"65534\"]\n    policies: [agent]\n";
    let mut d = TestDaemon::new(
        "dusers",
        &[("agent", &policy(denied.port())), ("root-only", &policy(1))],
        grants,
        false,
    );
    d.start();
    // nobody must be able to read the probe wherever the checkout lives.
    let probe = d.scratch.dir.join("net_probe.py");
    std::fs::copy(net_probe(), &probe).expect("copy probe");

    // `run` through the daemon, as nobody, with the granted policy.
    let out = d.cli(
        Some(NOBODY),
        &[
            "run",
            "--policy",
            "agent",
            "--name",
            "job1",
            "--",
            "python3",
            probe.to_str().expect("utf8"),
            "tcp",
            "127.0.0.1",
            &denied.port().to_string(),
            "tcp",
            "127.0.0.1",
            &allowed.port().to_string(),
        ],
    );
    assert!(out.status.success(), "{}\n{}", describe(&out), d.logs());
    assert_eq!(probe_results(&out), ["EPERM", "OK"], "{}", describe(&out));

    // A long-lived sandbox of nobody's.
    // A directory nobody may write to, for the marker.
    let wdir = d.scratch.dir.join("w");
    std::fs::create_dir(&wdir).expect("mkdir");
    std::fs::set_permissions(&wdir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let marker = wdir.join("started");
    let mut job = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(pep_agent_bin())
        .args(["run", "--policy", "agent", "--name", "job2", "--", "sh", "-c"])
        .arg(format!("touch {}; sleep 60", marker.display()))
        .env("PEP_AGENT_SOCKET", &d.socket)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "job2 did not start:\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    let list = d.cli(Some(NOBODY), &["sandbox", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).expect("list json");
    assert_eq!(v[0]["name"], "job2", "{v}");
    assert_eq!(v[0]["owner_uid"], 65534);

    // Another user can neither see, delete, nor join it.
    let other_list = d.cli(Some(OTHER), &["sandbox", "list", "--json"]);
    assert_eq!(String::from_utf8_lossy(&other_list.stdout).trim(), "[]");
    let del = d.cli(Some(OTHER), &["sandbox", "delete", "job2"]);
    assert_eq!(del.status.code(), Some(1), "{}", describe(&del));
    assert!(
        String::from_utf8_lossy(&del.stderr).contains("denied"),
        "{}",
        describe(&del)
    );
    let mut own = Command::new("setpriv")
        .args([
            "--reuid=65533",
            "--regid=65533",
            "--clear-groups",
            "--",
            "sleep",
            "30",
        ])
        .spawn()
        .expect("spawn other's process");
    let att = d.cli(
        Some(OTHER),
        &["sandbox", "attach", "job2", "--pid", &own.id().to_string()],
    );
    assert_eq!(att.status.code(), Some(1), "{}", describe(&att));
    assert!(
        String::from_utf8_lossy(&att.stderr).contains("denied"),
        "{}",
        describe(&att)
    );
    // Nor start a sandbox under a policy not granted to them.
    let cr = d.cli(Some(OTHER), &["sandbox", "create", "x", "--policy", "agent"]);
    assert!(
        String::from_utf8_lossy(&cr.stderr).contains("denied"),
        "{}",
        describe(&cr)
    );
    // nobody: not a policy outside its grants, not someone else's process.
    let cr = d.cli(Some(NOBODY), &["sandbox", "create", "y", "--policy", "root-only"]);
    assert!(
        String::from_utf8_lossy(&cr.stderr).contains("denied"),
        "{}",
        describe(&cr)
    );
    let cr = d.cli(
        Some(NOBODY),
        &[
            "sandbox",
            "create",
            "z",
            "--policy",
            "agent",
            "--pid",
            &own.id().to_string(),
        ],
    );
    assert!(
        String::from_utf8_lossy(&cr.stderr).contains("denied"),
        "{}",
        describe(&cr)
    );
    let cr = d.cli(
        Some(NOBODY),
        &["sandbox", "attach", "w", "--policy", "agent", "--pid", "1"],
    );
    assert!(
        String::from_utf8_lossy(&cr.stderr).contains("denied"),
        "{}",
        describe(&cr)
    );
    let _ = own.kill();
    let _ = own.wait();

    // The owner may delete it: the sandbox's processes end with it.
    let del = d.cli(Some(NOBODY), &["sandbox", "delete", "job2"]);
    assert!(del.status.success(), "{}", describe(&del));
    let _ = job.wait();
    assert!(!d.cgroup("job2").exists());

    // Refusals are recorded, with who asked.
    d.stop();
    let recs = read_audit(&d.audit);
    let refused: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| r["action"].as_str().is_some_and(|a| a.starts_with("control.")))
        .collect();
    assert!(refused.len() >= 6, "{refused:?}");
    assert!(
        refused
            .iter()
            .any(|r| r["process"]["uid"] == 65533 && r["action"] == "control.delete")
    );
    assert!(refused.iter().all(|r| r["verdict"] == "deny"));
    let v = d.cli(None, &["events", "verify", d.audit.to_str().expect("utf8")]);
    assert!(v.status.success(), "{}", describe(&v));
}

#[test]
fn malformed_requests_and_stalled_clients_do_not_disturb_the_daemon() {
    let mut d = TestDaemon::new(
        "dbad",
        &[("p", &policy(1))],
        "client_timeout_ms: 1000\nmax_request_bytes: 4096\n",
        false,
    );
    d.start();
    // Stalled clients: one silent, one half a line.
    let _silent = UnixStream::connect(&d.socket).expect("connect");
    let mut half = UnixStream::connect(&d.socket).expect("connect");
    half.write_all(br#"{"op":"pi"#).expect("write");
    let t = Instant::now();
    assert_eq!(d.request(r#"{"op":"ping"}"#)["ok"], true);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "a stalled client blocked another"
    );

    let s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let mut r = BufReader::new(s);
    let mut ask = |line: &[u8]| -> serde_json::Value {
        w.write_all(line).expect("write");
        let mut out = String::new();
        r.read_line(&mut out).expect("read");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("reply {out:?}: {e}"))
    };
    for bad in [
        &b"not json\n"[..],
        b"{\"op\":\"nope\"}\n",
        b"{\"op\":\"delete\"}\n",
        b"{\"op\":\"create\",\"name\":\"../x\",\"policy\":\"p\"}\n",
        b"{\"op\":\"create\",\"name\":\"a\",\"policy\":\"p\",\"bogus\":1}\n",
        b"[1,2,3]\n",
        b"\xff\xfe\x00garbage\n",
        b"{\"op\":\"delete\",\"name\":\"absent\"}\n",
    ] {
        let v = ask(bad);
        assert_eq!(v["ok"], false, "{} -> {v}", String::from_utf8_lossy(bad));
        assert!(v["error"].is_string(), "{v}");
    }
    // The same connection still works after errors.
    assert_eq!(ask(b"{\"op\":\"ping\"}\n")["ok"], true);
    // Too long a line: an error, then the connection closes.
    let mut big = vec![b'x'; 10_000];
    big.push(b'\n');
    let v = ask(&big);
    assert_eq!(v["code"], "bad_request", "{v}");

    // An idle client is disconnected after client_timeout_ms.
    let mut idle = UnixStream::connect(&d.socket).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let t = Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(idle.read(&mut buf).expect("eof"), 0);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(d.request(r#"{"op":"ping"}"#)["ok"], true, "still serving");
    d.stop();
}

#[test]
fn metrics_health_readiness_and_sd_notify() {
    let mut d = TestDaemon::new("dmetrics", &[("p", &policy(9))], "startup_delay_ms: 1500\n", true);
    let notify_path = d.scratch.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    d.extra_env
        .push(("NOTIFY_SOCKET".into(), notify_path.display().to_string()));
    d.spawn();

    // Health answers at once; readiness only after the load.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(r) = d.http_get("/readyz") {
            break r;
        }
        assert!(Instant::now() < deadline, "no metrics listener:\n{}", d.logs());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(first.0, 503, "ready before the programs were loaded: {first:?}");
    assert_eq!(d.http_get("/healthz").map(|r| r.0), Some(200));
    assert!(
        d.try_request(r#"{"op":"ping"}"#).is_none(),
        "control socket before ready"
    );
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1");
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(d.http_get("/readyz").map(|r| r.0), Some(200));
    assert!(
        d.pin_dir.join("progs/connect4").exists(),
        "ready means attached programs"
    );
    assert_eq!(d.request(r#"{"op":"ping"}"#)["ok"], true);

    // Some decisions, then the exposition parses and carries them.
    assert_eq!(
        d.request(r#"{"op":"create","name":"m","policy":"p"}"#)["ok"],
        true
    );
    let procs = d.cgroup("m").join("cgroup.procs");
    let mut cmd = Command::new("python3");
    cmd.arg(net_probe()).args(["tcp", "127.0.0.1", "9"]);
    // SAFETY: a write(2) to a cgroup file between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || std::fs::write(&procs, "0"));
    }
    assert_eq!(probe_results(&cmd.output().expect("probe")), ["EPERM"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let samples = loop {
        let (status, body) = d.http_get("/metrics").expect("metrics");
        assert_eq!(status, 200);
        let samples = parse_exposition(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        if samples
            .iter()
            .any(|(k, v)| k.starts_with("pep_decisions_total{") && k.contains("deny") && *v >= 1.0)
        {
            break samples;
        }
        assert!(Instant::now() < deadline, "no decision counted:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let get = |name: &str| samples.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    assert_eq!(get("pep_sandboxes"), Some(1.0));
    assert!(get("pep_ringbuf_lost_total").is_some());
    assert!(get("pep_cache_hits_total").is_some());
    assert!(get("pep_kernel_decisions_total").is_some_and(|v| v >= 1.0));
    assert!(
        samples
            .iter()
            .any(|(k, _)| k.starts_with("pep_pdp_latency_seconds_bucket"))
    );

    // SIGHUP: RELOADING=1, then READY=1 again.
    d.signal(libc::SIGHUP);
    let n = notify.recv(&mut buf).expect("RELOADING");
    assert!(
        buf[..n].starts_with(b"RELOADING=1\nMONOTONIC_USEC="),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let n = notify.recv(&mut buf).expect("READY again");
    assert_eq!(&buf[..n], b"READY=1");
    d.stop();
    let n = notify.recv(&mut buf).expect("STOPPING");
    assert_eq!(&buf[..n], b"STOPPING=1");
}
