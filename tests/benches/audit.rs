//! The audit pipeline's figures (issue 5). Writes
//! `$PEP_BENCH_OUT/audit[-quick].json`.
//!
//! `cargo bench -p pep-tests --bench audit [-- --quick]` (or `cargo xtask
//! bench`); run as root. `-- --pipeline-only N` runs only the in-process
//! scenario, N events (for `perf record`); `-- --pin` pins the agent to CPU 0
//! and the flood to CPU 1.
//!
//! Rows:
//! - the pipeline's own cost per record, in process: raw kernel events ->
//!   decode -> record -> chain -> JSON line in a file (no kernel, no flood);
//! - end to end, with `pep-agent run` (this build's pipeline, release) and
//!   a sandboxed `flood` making denied UDP sends on the other core: the
//!   kernel-side rate unpaced, and the highest rate written as JSON lines
//!   with zero loss (paced floods, bisected);
//! - the p99 latency of a denied TCP connect while the pipeline is saturated
//!   (an unpaced flood of denied sends around it), against the same connect
//!   with the pipeline keeping up (paced), interleaved run by run.

#[path = "audit/e2e.rs"]
mod e2e;

use std::{path::Path, time::Instant};

use pep_agent::audit::{
    pipeline::{AuditOptions, Pipeline},
    record::SandboxContext,
    sink::Sink,
};
use pep_common::event::{
    AF_INET, COMM_LEN, EventHeader, KIND_NET, NET_OP_SENDMSG, NetEvent, RULE_NONE, SOURCE_DEFAULT,
    VERDICT_DENY,
};

/// One raw denied-send event as the kernel writes it.
fn raw_event(i: u64) -> Vec<u8> {
    // SAFETY: plain-old-data structs; all-zero is a valid value.
    let mut ev: NetEvent = unsafe { std::mem::zeroed() };
    let h: &mut EventHeader = &mut ev.header;
    h.kind = KIND_NET;
    h.verdict = VERDICT_DENY;
    h.mode = pep_common::sandbox::MODE_ENFORCE;
    h.source = SOURCE_DEFAULT;
    h.rule_idx = RULE_NONE;
    h.sandbox_id = 1;
    h.ts_boot_ns = 1_000_000_000_000 + i * 2_500;
    h.cgroup_id = 4242;
    h.pid = std::process::id();
    h.tid = h.pid;
    h.ppid = 1;
    let comm = b"flood";
    h.comm[..comm.len()].copy_from_slice(comm);
    h.start_ns = 123_456_789;
    h.ancestors[0].pid = 1;
    h.ancestors[0].comm[..4].copy_from_slice(b"init");
    h.n_ancestors = 1;
    debug_assert!(comm.len() < COMM_LEN);
    ev.family = AF_INET;
    ev.op = NET_OP_SENDMSG;
    ev.protocol = 17;
    ev.dport = 9;
    ev.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    // SAFETY: reading the bytes of a repr(C) value.
    unsafe { std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<NetEvent>()) }.to_vec()
}

/// ns per record through `Pipeline::ingest` into a file, `n` events.
pub fn pipeline_ns_per_record(dir: &Path, n: u64) -> f64 {
    let path = dir.join("pipeline.jsonl");
    let _ = std::fs::remove_file(&path);
    let sink = Sink::open(path.to_str().expect("utf8")).expect("sink");
    let ctx = SandboxContext {
        name: "bench".into(),
        policy_revision: "sha256:5f1d0c4cbd3b7f3e8a1f7d6b3c2a1908f7e6d5c4b3a29180f7e6d5c4b3a29180".into(),
        degraded: None,
    };
    let mut p = Pipeline::new(sink, ctx, &AuditOptions::default()).expect("pipeline");
    let events: Vec<Vec<u8>> = (0..4096).map(raw_event).collect();
    let t = Instant::now();
    for i in 0..n {
        p.ingest(&events[(i % 4096) as usize]).expect("ingest");
        if i % 4096 == 4095 {
            p.flush().expect("flush");
        }
    }
    p.flush().expect("flush");
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    assert_eq!(p.totals().records, n, "every event became a record");
    let _ = std::fs::remove_file(&path);
    ns
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let dir = std::env::temp_dir().join(format!("pep-audit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");
    if let Some(i) = args.iter().position(|a| a == "--pipeline-only") {
        let n = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(2_000_000);
        let ns = pipeline_ns_per_record(&dir, n);
        println!("pipeline: {ns:.0} ns/record = {:.0} records/s", 1e9 / ns);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let pin = args.iter().any(|a| a == "--pin");
    let rows = e2e::run_all(&dir, quick, pin, pipeline_ns_per_record);
    let doc = serde_json::json!({
        "benchmark": "audit",
        "method": "in-process pipeline: median of 5 passes. End to end: pep_agent::sandbox::run in the \
                   bench process (optimized) of a sandboxed flood of denied calls on a 2-core machine \
                   (placement left to the scheduler unless --pin); zero-loss rate bisected over paced \
                   runs; connect latency: every 64th call of the flood is a timed denied TCP connect, \
                   saturated and paced runs interleaved",
        "quick": quick,
        "rows": rows,
    });
    let text = serde_json::to_string_pretty(&doc).expect("json");
    println!("{text}");
    println!("PEP_BENCH_JSON {}", serde_json::to_string(&doc).expect("json"));
    if let Some(out) = std::env::var_os("PEP_BENCH_OUT") {
        let suffix = if quick { "-quick" } else { "" };
        std::fs::write(Path::new(&out).join(format!("audit{suffix}.json")), &text).expect("write results");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
