//! open+close latency under BPF LSM file enforcement (issue 4), in the VM:
//! - A: a sandboxed process under 1,000 path rules (default allow, the file
//!   opened matched by a prefix allow; every open is resolved, hashed, looked
//!   up and recorded);
//! - B: an unsandboxed process while the programs are attached (one sandbox
//!   lookup per hook);
//! - C: no agent (no program attached).
//!
//! Interleaved in one VM run: each round measures C, loads the programs and
//! installs the sandbox, measures A B A B ..., then unloads. Each sample is
//! the mean of a batch of open+close pairs in a worker process (so process
//! start is never timed); p50/p99 are over batches. QEMU TCG emulates the
//! CPU: absolute times are inflated (about 10x), and ratios are distorted
//! too, because emulated helper calls and map lookups do not cost what they
//! do on hardware.
//!
//! `cargo xtask bench` (name `vm_*`: run in the VM), or in the guest:
//! `vm_files-HASH [--quick]`.

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::Command,
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
    policy::{LoadContext, load_str},
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

/// Worker mode: `--worker FILE BATCHES PER_BATCH`: prints the mean ns of an
/// open+close per batch, one per line.
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

/// Runs the worker, inside `cgroup` when given; returns its batch means.
fn measure(file: &Path, cgroup: Option<&Path>, batches: usize, per: u32) -> Vec<u128> {
    let mut cmd = Command::new(std::env::current_exe().expect("exe"));
    cmd.arg("--worker")
        .arg(file)
        .arg(batches.to_string())
        .arg(per.to_string());
    if let Some(cg) = cgroup {
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
    let out = cmd.output().expect("worker");
    assert!(out.status.success(), "worker: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.parse().expect("ns"))
        .collect()
}

fn pct(v: &[u128], p: f64) -> u128 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker") {
        worker(&args[2..]);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let (rounds, pairs, batches, per) = if quick { (2, 3, 10, 200) } else { (4, 5, 20, 500) };
    let s = Scratch::new("bench-files");
    let file = s.write("target.txt", "x");
    let text = policy_text(&s.dir);
    let pol = load_str(&text, "p.yaml", &LoadContext::new("/root")).expect("policy");
    let files = compiler::files::compile_files(&pol.files, 1);
    let net = compiler::net::compile_network(&pol.network, 1).expect("compile");
    let root = cgroup2_root().expect("cgroup2");
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        c.extend(measure(&file, None, batches, per));
        let mut e = Enforcer::load(LoadOptions { lsm: true }).expect("load with BPF LSM");
        let mut cg = Cgroup::create(
            &root,
            Path::new(&format!("pep-agent/bench-files{round}.{}", std::process::id())),
        )
        .expect("cgroup");
        let spec = SandboxSpec {
            cgroup_id: cg.id(),
            cgroup_level: cg.level(),
            config: SandboxConfig {
                sandbox_id: 1,
                mode: MODE_ENFORCE,
                net_default: pep_common::event::VERDICT_ALLOW,
                file_default: pol.files.default.to_kernel(),
                exec_default: pol.exec.default.to_kernel(),
                flags: 0,
            },
        };
        e.install_sandbox(&spec, &net, &files).expect("install");
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
        for _ in 0..pairs {
            a.extend(measure(&file, Some(cg.path()), batches, per));
            b.extend(measure(&file, None, batches, per));
        }
        stop.store(true, Ordering::Relaxed);
        let drained = drain.join().expect("drain");
        let (_, lost) = e.counters().expect("counters");
        eprintln!("round {round}: {drained} events drained, {lost} lost");
        drop(e);
        let _ = cg.destroy();
    }
    let (c50, c99) = (pct(&c, 0.5), pct(&c, 0.99));
    let row = |scenario: &str, v: &[u128], note: &str| {
        let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
        serde_json::json!({"scenario": scenario, "p50_ns": p50, "p99_ns": p99,
            "baseline_p50_ns": c50, "baseline_p99_ns": c99,
            "ratio_p50": p50 as f64 / c50 as f64, "ratio_p99": p99 as f64 / c99 as f64, "note": note})
    };
    let rows = vec![
        row(
            "open+close, sandboxed, 1,000 path rules",
            &a,
            "resolve (bpf_d_path) + hash walk + lookups + record, no verdict cache",
        ),
        row(
            "open+close, unsandboxed, agent running",
            &b,
            "one sandbox lookup per LSM hook",
        ),
    ];
    let mut md = String::from(
        "| scenario | p50 | p99 | no agent p50 | no agent p99 | ratio p50 | ratio p99 |\n|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
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
        "method": "per round: C (no agent), then load + install 1,000 rules, then (A sandboxed, B unsandboxed) x pairs, then unload; samples are batch means of open+close in a worker process; QEMU TCG",
        "rows": rows,
    });
    println!("PEP_BENCH_JSON {doc}");
}
