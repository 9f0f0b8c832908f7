//! open+close and exec latency under BPF LSM file enforcement (issues 4
//! and 8), in the VM:
//! - A: a sandboxed process under 1,000 path rules (default allow, the file
//!   opened matched by a prefix allow; every open is resolved, hashed, looked
//!   up and recorded);
//! - B: an unsandboxed process while the programs are attached (one sandbox
//!   lookup per hook);
//! - C: no agent (no program attached);
//! - D: a sandboxed process under an allowlist of 1,000 directory trees
//!   (files default deny), and L: the same allowlist under Landlock through
//!   `landlock_run` (no agent attached), the peer;
//! - exec: spawn+exec+wait of /bin/true under D, L and C.
//!
//! Interleaved in one VM run: each round measures (C, L) pairs with nothing
//! attached, loads the programs and installs both sandboxes, measures
//! (A, B, D) pairs, then unloads. Each sample is the mean of a batch of
//! operations in a worker process (so process start is never timed);
//! p50/p99 are over batches. QEMU TCG emulates the CPU: absolute times are
//! inflated (about 10x), and ratios are distorted too, because emulated
//! helper calls and map lookups do not cost what they do on hardware. The
//! guest keeps the TSC as its clock (`tsc=reliable`, set by the harness):
//! on the emulated HPET it falls back to otherwise, every clock read (one
//! per record, two per program run with `bpf_stats`) costs microseconds.
//!
//! `cargo xtask bench` (name `vm_*`: run in the VM), or in the guest:
//! `vm_files-HASH [--quick]`.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use pep_agent::{
    compiler,
    enforcer::{Enforcer, LoadOptions, SandboxSpec},
    kernel::cgroup::{Cgroup, cgroup2_root},
    policy::{LoadContext, Policy, load_str},
};
use pep_common::sandbox::{MODE_ENFORCE, SandboxConfig};
use pep_tests::Scratch;

const RULES: usize = 1000;

fn policy_text(dir: &Path) -> String {
    let mut s = format!(
        "apiVersion: pep/v1\nfiles:\n  default: allow\n  rules:\n    - allow: {{ path: \"{}/**\", access: [read, write] }}\n",
        dir.display()
    );
    for i in 1..RULES {
        s.push_str(&format!(
            "    - deny: {{ path: \"/srv/secret{i}/**\", access: [read, write] }}\n"
        ));
    }
    s
}

/// The allowlist of D and L: what the worker needs to start (its binary,
/// the loader and libraries, /etc/ld.so.cache), then directory trees up to
/// `RULES`, one of which holds the file opened.
fn allowlist(trees: &Path) -> Vec<PathBuf> {
    let exe = std::env::current_exe().expect("exe");
    let mut dirs = vec![
        PathBuf::from("/usr"),
        PathBuf::from("/etc"),
        exe.parent().expect("exe dir").to_path_buf(),
    ];
    for i in 0..RULES - dirs.len() {
        let d = trees.join(format!("tree{i}"));
        std::fs::create_dir_all(&d).expect("tree");
        dirs.push(d);
    }
    dirs
}

fn allowlist_policy(dirs: &[PathBuf]) -> String {
    let mut s = String::from("apiVersion: pep/v1\nfiles:\n  default: deny\n  rules:\n");
    for d in dirs {
        s.push_str(&format!(
            "    - allow: {{ path: \"{}/**\", access: [read, write] }}\n",
            d.display()
        ));
    }
    s
}

/// Worker mode: `--worker FILE BATCHES PER_BATCH`: prints the mean ns of an
/// open+close per batch, one per line; `--worker-exec - BATCHES PER_BATCH`:
/// the same for a spawn+exec+wait of /bin/true.
fn worker_exec(args: &[String]) {
    let batches: usize = args[1].parse().expect("batches");
    let per: u32 = args[2].parse().expect("per batch");
    let spawn = || {
        let st = Command::new("/bin/true")
            .stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .status()
            .expect("spawn /bin/true");
        assert!(st.success(), "/bin/true: {st}");
    };
    // Warm up the page cache and the code paths.
    for _ in 0..5 {
        spawn();
    }
    let mut out = String::new();
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..per {
            spawn();
        }
        out.push_str(&format!("{}\n", t.elapsed().as_nanos() / u128::from(per)));
    }
    print!("{out}");
}

fn worker(args: &[String]) {
    let file = &args[0];
    let batches: usize = args[1].parse().expect("batches");
    let per: u32 = args[2].parse().expect("per batch");
    let c = std::ffi::CString::new(file.as_str()).expect("path");
    // Warm up the dentry cache and the code paths.
    for _ in 0..100 {
        // SAFETY: valid C string; the descriptor is closed at once.
        unsafe { libc::close(libc::open(c.as_ptr(), libc::O_RDONLY)) };
    }
    let mut out = String::new();
    for _ in 0..batches {
        let t = Instant::now();
        for _ in 0..per {
            // SAFETY: as above.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY) };
            assert!(fd >= 0, "open {file}");
            // SAFETY: our descriptor.
            unsafe { libc::close(fd) };
        }
        out.push_str(&format!("{}\n", t.elapsed().as_nanos() / u128::from(per)));
    }
    print!("{out}");
}

/// Where a worker runs.
#[derive(Clone, Copy)]
enum Via<'a> {
    /// Outside any sandbox.
    Plain,
    /// Inside this sandbox cgroup (joined between fork and exec).
    Cgroup(&'a Path),
    /// Under `landlock_run --allow-from FILE`.
    Landlock(&'a Path),
}

/// What a worker times.
#[derive(Clone, Copy)]
enum Op {
    Open,
    Exec,
}

/// The worker command for `op` on `file`, run as `via` says.
fn worker_cmd(op: Op, file: &Path, via: Via, batches: usize, per: u32) -> Command {
    let me = std::env::current_exe().expect("exe");
    let mut cmd = match via {
        Via::Landlock(list) => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_landlock_run"));
            c.arg("--allow-from").arg(list).arg("--").arg(me);
            c
        }
        Via::Plain | Via::Cgroup(_) => Command::new(me),
    };
    cmd.arg(match op {
        Op::Open => "--worker",
        Op::Exec => "--worker-exec",
    })
    .arg(file)
    .arg(batches.to_string())
    .arg(per.to_string());
    if let Via::Cgroup(cg) = via {
        let procs = std::ffi::CString::new(cg.join("cgroup.procs").display().to_string()).expect("path");
        // SAFETY: open/write/close only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            })
        };
    }
    cmd
}

/// Runs the worker as `via` says; returns its batch means.
fn measure_op(op: Op, file: &Path, via: Via, batches: usize, per: u32) -> Vec<u128> {
    let out = worker_cmd(op, file, via, batches, per).output().expect("worker");
    assert!(out.status.success(), "worker: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse().expect("ns"))
        .collect()
}

/// Checks that `via` enforces: the worker's open of `outside` (a file in no
/// allowed tree) must fail, so the figures are of a sandbox that works.
fn assert_denied(outside: &Path, via: Via) {
    let out = worker_cmd(Op::Open, outside, via, 1, 1).output().expect("worker");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("open"),
        "{} was opened outside the allowlist: {out:?}",
        outside.display()
    );
}

/// Runs the open+close worker, inside `cgroup` when given; returns its batch
/// means.
fn measure(file: &Path, cgroup: Option<&Path>, batches: usize, per: u32) -> Vec<u128> {
    let via = cgroup.map_or(Via::Plain, Via::Cgroup);
    measure_op(Op::Open, file, via, batches, per)
}

fn pct(v: &[u128], p: f64) -> u128 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// A sandbox of `sandbox_id` in a fresh cgroup, with `pol`'s file rules.
fn sandbox(e: &mut Enforcer, root: &Path, name: &str, sandbox_id: u32, pol: &Policy) -> Cgroup {
    let cg = Cgroup::create(
        root,
        Path::new(&format!("pep-agent/{name}.{}", std::process::id())),
    )
    .expect("cgroup");
    let files = compiler::files::compile_files(&pol.files, sandbox_id);
    let net = compiler::net::compile_network(&pol.network, sandbox_id).expect("compile");
    let spec = SandboxSpec {
        cgroup_id: cg.id(),
        cgroup_level: cg.level(),
        config: SandboxConfig {
            sandbox_id,
            mode: MODE_ENFORCE,
            net_default: pep_common::event::VERDICT_ALLOW,
            file_default: pol.files.default.to_kernel(),
            exec_default: pol.exec.default.to_kernel(),
            flags: 0,
        },
    };
    e.install_sandbox(&spec, &net, &files).expect("install");
    cg
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--worker") => return worker(&args[2..]),
        Some("--worker-exec") => return worker_exec(&args[2..]),
        _ => {}
    }
    let quick = args.iter().any(|a| a == "--quick");
    let (rounds, pairs, batches, per) = if quick { (2, 3, 10, 200) } else { (4, 5, 20, 500) };
    // spawn+exec+wait costs thousands of open+close pairs in TCG (50-150
    // ms): measured in the first `epairs` pairs of a round only.
    let (epairs, ebatches, eper) = if quick { (1, 3, 8) } else { (2, 8, 8) };
    let s = Scratch::new("bench-files");
    let file = s.write("target.txt", "x");
    let text = policy_text(&s.dir);
    let pol = load_str(&text, "p.yaml", &LoadContext::new("/root")).expect("policy");
    let root = cgroup2_root().expect("cgroup2");
    // D and L: the allowlist, the file opened in one of its trees.
    let dirs = allowlist(&s.dir.join("trees"));
    let allowed = dirs[RULES / 2].join("target.txt");
    std::fs::write(&allowed, "x").expect("allowed file");
    let list = s.write(
        "allowlist.txt",
        &dirs
            .iter()
            .map(|d| format!("{}\n", d.display()))
            .collect::<String>(),
    );
    let allow_pol = load_str(&allowlist_policy(&dirs), "allow.yaml", &LoadContext::new("/root"))
        .expect("allowlist policy");
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    let (mut d, mut l) = (Vec::new(), Vec::new());
    let (mut dx, mut lx, mut cx) = (Vec::new(), Vec::new(), Vec::new());
    assert_denied(&file, Via::Landlock(&list));
    for round in 0..rounds {
        // Nothing attached: no agent, and the Landlock peer.
        let t = Instant::now();
        for pair in 0..pairs {
            c.extend(measure(&file, None, batches, per));
            l.extend(measure_op(Op::Open, &allowed, Via::Landlock(&list), batches, per));
            if pair < epairs {
                cx.extend(measure_op(Op::Exec, &allowed, Via::Plain, ebatches, eper));
                lx.extend(measure_op(
                    Op::Exec,
                    &allowed,
                    Via::Landlock(&list),
                    ebatches,
                    eper,
                ));
            }
        }
        let unloaded_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut e = Enforcer::load(LoadOptions { lsm: true }).expect("load with BPF LSM");
        let load_s = t.elapsed().as_secs_f64();
        let mut cg = sandbox(&mut e, &root, &format!("bench-files{round}"), 1, &pol);
        let mut cg_allow = sandbox(&mut e, &root, &format!("bench-allow{round}"), 2, &allow_pol);
        if round == 0 {
            assert_denied(&file, Via::Cgroup(cg_allow.path()));
        }
        // Drain the ring buffer as the agent does, so every sandboxed open
        // pays for a real event.
        let mut events = e.take_events().expect("events");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let drain = std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                while events.next().is_some() {
                    n += 1;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            n
        });
        let t = Instant::now();
        for pair in 0..pairs {
            a.extend(measure(&file, Some(cg.path()), batches, per));
            b.extend(measure(&file, None, batches, per));
            d.extend(measure_op(
                Op::Open,
                &allowed,
                Via::Cgroup(cg_allow.path()),
                batches,
                per,
            ));
            if pair < epairs {
                dx.extend(measure_op(
                    Op::Exec,
                    &allowed,
                    Via::Cgroup(cg_allow.path()),
                    ebatches,
                    eper,
                ));
            }
        }
        let loaded_s = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let drained = drain.join().expect("drain");
        let (_, lost) = e.counters().expect("counters");
        eprintln!(
            "round {round}: {drained} events drained, {lost} lost; nothing attached {unloaded_s:.1} s, \
             load {load_s:.1} s, attached {loaded_s:.1} s"
        );
        drop(e);
        let _ = cg.destroy();
        let _ = cg_allow.destroy();
    }
    let vs = |scenario: &str, v: &[u128], base: &[u128], note: &str| {
        let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
        let (b50, b99) = (pct(base, 0.5), pct(base, 0.99));
        serde_json::json!({"scenario": scenario, "p50_ns": p50, "p99_ns": p99,
            "baseline_p50_ns": b50, "baseline_p99_ns": b99,
            "ratio_p50": p50 as f64 / b50 as f64, "ratio_p99": p99 as f64 / b99 as f64, "note": note})
    };
    let row = |scenario: &str, v: &[u128], note: &str| vs(scenario, v, &c, note);
    let rows = vec![
        row(
            "open+close, sandboxed, 1,000 path rules",
            &a,
            "per-file verdict cache hit (identity reads + LRU lookup) + a record per open",
        ),
        serde_json::json!({"scenario": "open+close, 1,000 path rules (default allow, 999 deny prefixes), Landlock peer",
            "note": "peer cannot express it: Landlock only grants rights beneath directories (no default allow, no deny inside an allowed tree, no name rules)"}),
        row(
            "open+close, unsandboxed, agent running",
            &b,
            "one sandbox lookup per LSM hook",
        ),
        row(
            "open+close, sandboxed, allowlist of 1,000 trees (default deny)",
            &d,
            "baseline: no agent",
        ),
        row(
            "open+close, Landlock peer, the same 1,000 trees",
            &l,
            "baseline: no agent; landlock_run, ABI v2 rights, 1,000 path_beneath rules",
        ),
        vs(
            "open+close, allowlist of 1,000 trees: pep-agent / Landlock",
            &d,
            &l,
            "baseline: Landlock",
        ),
        vs(
            "spawn+exec+wait of /bin/true, sandboxed, allowlist of 1,000 trees",
            &dx,
            &cx,
            "baseline: no agent; exec hook + file_open/mmap of the binary and its libraries",
        ),
        vs(
            "spawn+exec+wait of /bin/true, Landlock peer, the same 1,000 trees",
            &lx,
            &cx,
            "baseline: no agent",
        ),
        vs(
            "spawn+exec+wait of /bin/true: pep-agent / Landlock",
            &dx,
            &lx,
            "baseline: Landlock",
        ),
    ];
    let mut md = String::from(
        "| scenario | p50 | p99 | baseline p50 | baseline p99 | ratio p50 | ratio p99 |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows.iter().filter(|r| r.get("p50_ns").is_some()) {
        md.push_str(&format!(
            "| {} | {} ns | {} ns | {} ns | {} ns | {:.2} | {:.2} |\n",
            r["scenario"].as_str().unwrap_or(""),
            r["p50_ns"],
            r["p99_ns"],
            r["baseline_p50_ns"],
            r["baseline_p99_ns"],
            r["ratio_p50"].as_f64().unwrap_or(0.0),
            r["ratio_p99"].as_f64().unwrap_or(0.0)
        ));
    }
    print!("{md}");
    let doc = serde_json::json!({
        "benchmark": "vm_files", "quick": quick, "rounds": rounds,
        "method": "per round: (C no agent, L Landlock, exec under C and L) x pairs with nothing attached, then load + install both sandboxes, then (A sandboxed, B unsandboxed, D allowlist, exec under D) x pairs, then unload; exec only in the first pairs of a round; samples are batch means in a worker process; QEMU TCG",
        "rows": rows,
    });
    println!("PEP_BENCH_JSON {doc}");
}
