//! Following the audit stream while it is written: `events tail -f` across
//! rotations, and a tailer on the live socket that stops reading.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use pep_tests::*;

fn deny_all_policy(s: &Scratch) -> std::path::PathBuf {
    s.write(
        "policy.yaml",
        "apiVersion: pep/v1\nname: live\nnetwork:\n  default: deny\n",
    )
}

/// Every record of the log at `path`, rotated files first.
fn all_records(path: &Path) -> Vec<serde_json::Value> {
    pep_agent::audit::verify::expand(&[path.to_path_buf()])
        .iter()
        .flat_map(|f| read_audit(f))
        .collect()
}

fn seqs(records: &[serde_json::Value]) -> Vec<u64> {
    records.iter().map(|r| r["seq"].as_u64().expect("seq")).collect()
}

/// `pep-agent run` of a flood of `n` denied UDP sends at `pace` per ms.
fn flood_run(policy: &Path, extra: &[&str], n: u64, pace: u64) -> Command {
    let mut c = Command::new(pep_agent_bin());
    c.args(["run", "--policy"])
        .arg(policy)
        .args(extra)
        .args(["--", env!("CARGO_BIN_EXE_flood"), "127.0.0.1", "9"])
        .args([n.to_string(), "udp".into(), pace.to_string()]);
    c
}

#[test]
fn tail_follows_the_file_across_rotations_without_loss_or_duplicates() {
    const N: u64 = 20_000;
    let s = Scratch::new("tailrot");
    let policy = deny_all_policy(&s);
    let log = s.dir.join("live.jsonl");
    // The tailer follows the file from before the first record: the run
    // appends to it.
    std::fs::write(&log, "").expect("create log");
    let mut tailer = Command::new(pep_agent_bin())
        .args(["events", "tail", "-f", "--file"])
        .arg(&log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tailer");
    let (tx, rx) = mpsc::channel::<String>();
    let out = tailer.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    // About 290 records per file: some 70 rotations while the tailer reads,
    // at a pace the debug build keeps up with (so every decision is a record).
    let run = flood_run(
        &policy,
        &[
            "--audit",
            log.to_str().expect("utf8"),
            "--audit-max-bytes",
            "262144",
            "--audit-max-files",
            "1000",
        ],
        N,
        10,
    )
    .output()
    .expect("run");
    assert!(run.status.success(), "{}", describe(&run));
    let files = pep_agent::audit::verify::expand(std::slice::from_ref(&log));
    assert!(files.len() >= 20, "rotated many times: {} files", files.len());
    let written = all_records(&log);
    let want = seqs(&written);
    assert_eq!(want.len() as u64, N, "every decision is a record at this pace");
    assert_eq!(want, (1..=N).collect::<Vec<_>>());

    // The tailer prints what was written, in order, once each.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
                got.push(v["seq"].as_u64().expect("seq"));
            }
            Err(_) => break,
        }
    }
    let _ = tailer.kill();
    let _ = tailer.wait();
    // Nothing more than that either.
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
        got.push(
            serde_json::from_str::<serde_json::Value>(&l).expect("json")["seq"]
                .as_u64()
                .expect("seq"),
        );
    }
    let first_gap = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!(
        got.len(),
        want.len(),
        "the tailer saw {} of {} records; first difference at index {first_gap:?}",
        got.len(),
        want.len()
    );
    assert_eq!(got, want, "first difference at index {first_gap:?}");
}

#[test]
fn a_tailer_that_stops_reading_gets_lost_markers_and_slows_nothing() {
    const N: u64 = 20_000;
    let s = Scratch::new("slowtail");
    let policy = deny_all_policy(&s);
    let log = s.dir.join("slow.jsonl");
    let sock = s.dir.join("audit.sock");
    let go = s.dir.join("go");
    // The flood starts once the tailer is subscribed.
    let flood = format!(
        "while [ ! -e {go} ]; do sleep 0.02; done; exec {flood} 127.0.0.1 9 {N} udp 10",
        go = go.display(),
        flood = env!("CARGO_BIN_EXE_flood"),
    );
    let mut run = Command::new(pep_agent_bin())
        .args(["run", "--policy"])
        .arg(&policy)
        .arg("--audit")
        .arg(&log)
        .arg("--audit-socket")
        .arg(&sock)
        .args(["--tailer-queue", "64", "--", "sh", "-c", &flood])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                assert!(run.try_wait().expect("try_wait").is_none(), "run exited: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{}: {e}", sock.display()),
        }
    };
    (&stream).write_all(b"{}\n").expect("filter");
    let mut rd = BufReader::new(&stream);
    let mut first = String::new();
    rd.read_line(&mut first).expect("subscribed line");
    assert_eq!(first.trim(), r#"{"subscribed":true}"#);
    // Subscribed: now the tailer stops reading while the flood runs.
    std::fs::write(&go, "").expect("go");
    let mut stdout = BufReader::new(run.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.starts_with("calls ") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).expect("run stdout") > 0,
            "the flood reported nothing"
        );
    }
    assert!(line.contains(&format!("eperm {N} other 0")), "{line}");
    // The flood is done; the tailer reads what it was sent, to the end:
    // records (their seq) and markers (their count), in order.
    let mut stream_items: Vec<Result<u64, u64>> = Vec::new();
    for l in rd.lines() {
        let l = l.expect("read stream");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"));
        if v["action"] == "audit.lost" && v["reason"] == "tailer" {
            assert_eq!(v["seq"], 0, "markers are outside the chain: {v}");
            stream_items.push(Err(v["count"].as_u64().expect("count")));
        } else {
            stream_items.push(Ok(v["seq"].as_u64().expect("seq")));
        }
    }
    let out = run.wait_with_output().expect("run");
    assert!(out.status.success(), "{}", describe(&out));

    // The file sink has every record, seq without holes, nothing lost:
    // the stuck tailer slowed neither it nor enforcement.
    let written = all_records(&log);
    let want = seqs(&written);
    assert_eq!(
        want,
        (1..=written.len() as u64).collect::<Vec<_>>(),
        "seq continuous"
    );
    let lost: u64 = written
        .iter()
        .filter(|r| r["action"] == "audit.lost")
        .map(|r| r["count"].as_u64().expect("count"))
        .sum();
    assert_eq!(lost, 0, "the pipeline lost nothing");
    assert_eq!(written.len() as u64, N, "one record per decision");
    pep_agent::audit::verify::verify(std::slice::from_ref(&log)).unwrap_or_else(|b| panic!("{b}"));

    // The tailer lost records, and was told exactly how many, in-band, at
    // the place they went missing: the markers since its last record add
    // up to the records it missed since then.
    let markers = stream_items.iter().filter(|i| i.is_err()).count();
    let received = stream_items.iter().filter(|i| i.is_ok()).count();
    assert!(markers > 0, "a tailer that does not read loses records");
    assert!(received < written.len(), "it did not get everything");
    let (mut prev, mut owed) = (0u64, 0u64);
    for item in &stream_items {
        match item {
            Err(count) => {
                assert!(*count > 0, "an empty marker");
                owed += count;
            }
            Ok(seq) => {
                assert!(*seq > prev, "in order: {seq} after {prev}");
                assert_eq!(
                    seq - prev - 1,
                    owed,
                    "markers before seq {seq} count what it missed"
                );
                (prev, owed) = (*seq, 0);
            }
        }
    }
    assert_eq!(
        written.len() as u64 - prev,
        owed,
        "the last markers count the records missed at the end"
    );
}

#[test]
fn sigusr1_reopens_the_file_and_the_chain_continues() {
    const N: u64 = 20_000;
    let s = Scratch::new("usr1");
    let policy = deny_all_policy(&s);
    let log = s.dir.join("a.jsonl");
    let moved = s.dir.join("a.jsonl.moved");
    let mut run = flood_run(&policy, &["--audit", log.to_str().expect("utf8")], N, 10)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    // An outside rotator: once records are being written, move the file
    // away and tell pep-agent.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "no records written");
        assert!(run.try_wait().expect("try_wait").is_none(), "run exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::rename(&log, &moved).expect("move the log");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(run.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).expect("SIGUSR1");
    let out = run.wait_with_output().expect("run");
    assert!(out.status.success(), "{}", describe(&out));
    let (before, after) = (read_audit(&moved), read_audit(&log));
    assert!(
        !before.is_empty() && !after.is_empty(),
        "records on both sides of the reopen"
    );
    let all: Vec<u64> = seqs(&before).into_iter().chain(seqs(&after)).collect();
    assert_eq!(
        all,
        (1..=N).collect::<Vec<_>>(),
        "nothing lost or repeated across the reopen"
    );
    // One chain across the two files, in that order.
    let v = pep_agent::audit::verify::verify(&[moved.clone(), log.clone()]).unwrap_or_else(|b| panic!("{b}"));
    assert_eq!(v.records, N);
}
