//! `cargo xtask bench [--quick]`: every benchmark of the project in one run,
//! one table.
//!
//! Benchmarks are the `[[bench]]` programs of the `pep-tests` crate. Each
//! measures its scenarios against a baseline interleaved in the same run
//! (A B A B ...) and writes `$PEP_BENCH_OUT/<name>[-quick].json` with rows
//! of p50/p99 (ns) and ratios, or a value and a unit. Names starting with
//! `vm_` need BPF LSM and run inside the VM. This task builds them, runs
//! them, and writes `bench/results/summary[-quick].{json,md}` with a
//! description of the machine.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, vm};

/// The pep-agent binary every benchmark runs (`PEP_AGENT_BIN`).
const AGENT_BIN: &str = "target/release/pep-agent";

struct Bench {
    name: String,
    exe: PathBuf,
}

fn build(root: &Path) -> Result<Vec<Bench>> {
    // The flood generator is a bin of pep-tests that some benches drive.
    let st = Command::new("cargo")
        .args(["build", "--release", "--package", "pep-tests", "--bins"])
        .current_dir(root)
        .status()?;
    if !st.success() {
        bail!("building the bench helpers failed");
    }
    // The benchmarks measure the binary users run: the release build.
    let st = Command::new("cargo")
        .args(["build", "--release", "--package", "pep-agent"])
        .current_dir(root)
        .status()?;
    if !st.success() {
        bail!("building pep-agent failed");
    }
    let out = Command::new("cargo")
        .args([
            "bench",
            "--package",
            "pep-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("cargo bench --no-run")?;
    if !out.status.success() {
        bail!("building the benchmarks failed");
    }
    let mut benches = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" || v["target"]["kind"][0] != "bench" {
            continue;
        }
        if let Some(exe) = v["executable"].as_str() {
            benches.push(Bench {
                name: v["target"]["name"].as_str().unwrap_or_default().to_string(),
                exe: PathBuf::from(exe),
            });
        }
    }
    benches.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(benches)
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .unwrap_or("")
        .to_string();
    let uname = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    serde_json::json!({
        "kernel": uname.unwrap_or_default(),
        "cpu": model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": mem.split_whitespace().skip(1).collect::<Vec<_>>().join(" "),
        "vm_kernel": "Debian 6.1 in QEMU TCG (software emulation) for vm_* benchmarks",
    })
}

fn fmt_ns(v: &serde_json::Value) -> String {
    match v.as_f64() {
        Some(ns) if ns >= 1e6 => format!("{:.2} ms", ns / 1e6),
        Some(ns) if ns >= 1e3 => format!("{:.1} us", ns / 1e3),
        Some(ns) => format!("{ns:.0} ns"),
        None => "-".into(),
    }
}

fn fmt_ratio(v: &serde_json::Value) -> String {
    v.as_f64()
        .map(|r| format!("{r:.3}x"))
        .unwrap_or_else(|| "-".into())
}

pub fn run(quick: bool) -> Result<()> {
    let started = Instant::now();
    setup::setup()?;
    let root = vm::workspace_root();
    let benches = build(&root)?;
    let results = root.join("bench/results");
    std::fs::create_dir_all(&results)?;
    let suffix = if quick { "-quick" } else { "" };
    let mut docs = Vec::new();
    let mut failed = Vec::new();
    for b in benches.iter().filter(|b| !b.name.starts_with("vm_")) {
        println!("bench: {} (host)", b.name);
        let mut cmd = Command::new(&b.exe);
        if quick {
            cmd.arg("--quick");
        }
        cmd.env("PEP_BENCH_OUT", &results)
            .env("PEP_AGENT_BIN", root.join(AGENT_BIN));
        if !cmd.current_dir(root.join("tests")).status()?.success() {
            failed.push(b.name.clone());
            continue;
        }
        match read_doc(&results, &b.name, suffix) {
            Ok(doc) => docs.push(doc),
            Err(e) => {
                println!("bench: {}: {e:#}", b.name);
                failed.push(b.name.clone());
            }
        }
    }
    let vm_benches: Vec<&Bench> = benches.iter().filter(|b| b.name.starts_with("vm_")).collect();
    if !vm_benches.is_empty() {
        let cmds: Vec<vm::VmCommand> = vm_benches
            .iter()
            .map(|b| {
                let mut argv = vec![b.exe.display().to_string()];
                if quick {
                    argv.push("--quick".into());
                }
                let mut c = vm::VmCommand::new(b.name.clone(), argv);
                c.cwd = root.join("tests");
                c.env
                    .push(("PEP_AGENT_BIN".into(), root.join(AGENT_BIN).display().to_string()));
                // The guest writes into the run's writable export; the
                // harness sets PEP_VM_RESULTS there.
                c.env.push(("PEP_BENCH_OUT_IN_VM".into(), "1".into()));
                c
            })
            .collect();
        let timeout = Duration::from_secs(if quick { 240 } else { 1500 });
        for (b, r) in vm_benches.iter().zip(vm::run_in_vm(&cmds, timeout)?) {
            println!("bench: {} (vm)\n{}", b.name, r.output);
            if !r.success() {
                failed.push(b.name.clone());
                continue;
            }
            // The bench printed its JSON document after a marker line.
            match r
                .output
                .split("PEP_BENCH_JSON ")
                .nth(1)
                .and_then(|t| t.lines().next())
            {
                Some(json) => {
                    let doc: serde_json::Value = serde_json::from_str(json).context("vm bench json")?;
                    std::fs::write(
                        results.join(format!("{}{suffix}.json", b.name)),
                        serde_json::to_string_pretty(&doc)?,
                    )?;
                    docs.push(doc);
                }
                None => failed.push(format!("{} (no results printed)", b.name)),
            }
        }
    }
    let summary = serde_json::json!({
        "quick": quick,
        "date": Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default(),
        "machine": machine(),
        "benchmarks": docs,
        "failed": failed,
        "took_s": started.elapsed().as_secs(),
    });
    std::fs::write(
        results.join(format!("summary{suffix}.json")),
        serde_json::to_string_pretty(&summary)?,
    )?;
    let md = markdown(&summary);
    std::fs::write(results.join(format!("summary{suffix}.md")), &md)?;
    print!("{md}");
    println!(
        "bench: took {:.0}s; results in {}",
        started.elapsed().as_secs_f64(),
        results.display()
    );
    if !failed.is_empty() {
        bail!("benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}

fn read_doc(dir: &Path, name: &str, suffix: &str) -> Result<serde_json::Value> {
    let p = dir.join(format!("{name}{suffix}.json"));
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("{} did not write {}", name, p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// One table of every row of every benchmark.
pub fn markdown(summary: &serde_json::Value) -> String {
    let m = &summary["machine"];
    let mut md = format!(
        "# Benchmarks{}\n\n{} UTC. Machine: {} ({} CPUs, {}), kernel {}; `vm_*` rows: {}.\n\n\
         Every ratio is against a baseline measured interleaved in the same run.\n\n\
         | benchmark | scenario | p50 | p99 | baseline p50 | baseline p99 | ratio p50 | ratio p99 | note |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        if summary["quick"] == true { " (quick)" } else { "" },
        summary["date"].as_str().unwrap_or(""),
        m["cpu"].as_str().unwrap_or(""),
        m["cpus"],
        m["memory"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["vm_kernel"].as_str().unwrap_or(""),
    );
    for doc in summary["benchmarks"].as_array().into_iter().flatten() {
        let name = doc["benchmark"].as_str().unwrap_or("?");
        for r in doc["rows"].as_array().into_iter().flatten() {
            let (p50, p99) = if r.get("value").is_some() {
                (
                    format!("{} {}", r["value"], r["unit"].as_str().unwrap_or("")),
                    "-".into(),
                )
            } else {
                (fmt_ns(&r["p50_ns"]), fmt_ns(&r["p99_ns"]))
            };
            md.push_str(&format!(
                "| {name} | {} | {p50} | {p99} | {} | {} | {} | {} | {} |\n",
                r["scenario"].as_str().unwrap_or(""),
                fmt_ns(&r["baseline_p50_ns"]),
                fmt_ns(&r["baseline_p99_ns"]),
                fmt_ratio(&r["ratio_p50"]),
                fmt_ratio(&r["ratio_p99"]),
                r["note"].as_str().unwrap_or(""),
            ));
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_scenario() {
        let s = serde_json::json!({"quick": true, "date": "d", "machine": {"cpu": "c", "cpus": 2, "memory": "1 kB", "kernel": "k", "vm_kernel": "v"},
            "benchmarks": [{"benchmark": "b", "rows": [
                {"scenario": "s1", "p50_ns": 1500, "p99_ns": 2_000_000, "baseline_p50_ns": 1000, "baseline_p99_ns": 1000, "ratio_p50": 1.5, "ratio_p99": 2000.0},
                {"scenario": "s2", "value": 42, "unit": "KiB"}]}]});
        let md = markdown(&s);
        assert!(
            md.contains("| b | s1 | 1.5 us | 2.00 ms | 1.0 us | 1.0 us | 1.500x | 2000.000x |"),
            "{md}"
        );
        assert!(md.contains("| b | s2 | 42 KiB | - |"), "{md}");
    }
}
