//! Asking in `pep-agent run`: what the run does, in order, when the policy's
//! `network.default` or `exec.default` is `ask`. What a policy asks about
//! and the settings of its PDP (`asks`, `ask_flags`, `settings`, `budget`)
//! are the daemon's too (`daemon::reload`).

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use pep_common::ask::{ASK_FLAG_EXEC, ASK_FLAG_NET, AskSandbox, DEFAULT_HOLD_SYNCNT};
use tokio::sync::mpsc;

use super::{
    Pdp,
    task::{self, AskSettings, AskTask, CacheOrigins, PdpFeed},
};
use crate::{
    audit::pipeline::Pipeline,
    enforcer::{Enforcer, EnforcerError},
    policy::{Engine, NetDefault, Policy},
};

/// The verdict-cache revision of a standalone run: its maps are its own.
pub const STANDALONE_REVISION: u32 = 1;

/// Whether the policy asks the PDP.
pub fn asks(policy: &Policy) -> bool {
    ask_flags(policy) != 0
}

/// What the policy asks about: `ASK_FLAG_*`.
pub fn ask_flags(policy: &Policy) -> u32 {
    let mut flags = 0;
    if policy.network.default == NetDefault::Ask {
        flags |= ASK_FLAG_NET;
    }
    if policy.exec.ask {
        flags |= ASK_FLAG_EXEC;
    }
    flags
}

/// Longest wait for one answer: the OPA timeout (which covers its retries)
/// plus a margin; a second for the embedded engines.
pub fn budget(policy: &Policy) -> Duration {
    match (policy.pdp.engine, &policy.pdp.opa) {
        (Engine::Opa, Some(o)) => Duration::from_millis(o.timeout_ms + 50),
        _ => Duration::from_secs(1),
    }
}

/// After loading, before the sandbox entry is written: loads the holding
/// programs and marks the sandbox as asking about network misses.
pub fn prepare(enforcer: &mut Enforcer, sandbox_id: u32) -> Result<(), EnforcerError> {
    prepare_flags(enforcer, sandbox_id, ASK_FLAG_NET)
}

/// `prepare`, asking about what `policy` asks about (`ask_flags`).
pub fn prepare_for(enforcer: &mut Enforcer, policy: &Policy, sandbox_id: u32) -> Result<(), EnforcerError> {
    prepare_flags(enforcer, sandbox_id, ask_flags(policy))
}

fn prepare_flags(enforcer: &mut Enforcer, sandbox_id: u32, flags: u32) -> Result<(), EnforcerError> {
    enforcer.load_ask()?;
    enforcer.set_ask_sandbox(
        sandbox_id,
        AskSandbox {
            revision: STANDALONE_REVISION,
            flags,
            syncnt: DEFAULT_HOLD_SYNCNT,
            _pad: 0,
        },
    )
}

/// Why the PDP task could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Enforcer(#[from] EnforcerError),
    #[error("starting the ask thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("no sandbox is marked as asking (`prepare` first)")]
    NotPrepared,
}

/// Once the audit pipeline exists: takes the maps, starts the PDP task and
/// feeds its records to the pipeline.
pub fn start(
    enforcer: &mut Enforcer,
    pdp: Arc<dyn Pdp>,
    policy: &Policy,
    sandbox_name: &str,
    pipeline: &mut Pipeline,
    stop: Arc<AtomicBool>,
) -> Result<AskTask, StartError> {
    let (maps, asks) = enforcer.take_ask()?;
    // The one sandbox `prepare` marked: a standalone run's maps are its own.
    let sandbox_id = maps
        .sandboxes
        .keys()
        .find_map(Result::ok)
        .ok_or(StartError::NotPrepared)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let origins = CacheOrigins::default();
    pipeline.set_pdp_feed(PdpFeed {
        records: rx,
        origins: origins.clone(),
    });
    let mut settings = settings(pdp, policy, sandbox_id, sandbox_name);
    settings.revision = STANDALONE_REVISION;
    Ok(task::spawn(Some(settings), maps, asks, tx, origins, stop)?)
}

/// How sandbox `sandbox_id` asks under `policy` (revision left 0: the
/// task sets it).
pub fn settings(pdp: Arc<dyn Pdp>, policy: &Policy, sandbox_id: u32, sandbox_name: &str) -> AskSettings {
    AskSettings {
        pdp,
        sandbox_id,
        sandbox_name: sandbox_name.to_owned(),
        policy_revision: policy.revision().to_owned(),
        fingerprint: super::revision::fingerprint(policy),
        revision: 0,
        cache_ttl_s: policy.pdp.cache_ttl_s,
        on_unavailable: policy.pdp.on_unavailable,
        stale_window_s: policy.pdp.stale_window_s,
        budget: budget(policy),
        busy_poll: Duration::from_micros(policy.pdp.busy_poll_us),
    }
}

/// Reloads a running task with `policy` (already loaded and checked,
/// `check_policy` included): its engine is built here, and a failure
/// leaves the running one in force. Returns the verdict-cache revision now
/// in force (bumped only if the PDP's answers may have changed).
pub fn reload(task: &AskTask, policy: &Policy, sandbox_id: u32, sandbox_name: &str) -> anyhow::Result<u32> {
    let pdp = super::build_engine(policy).map_err(anyhow::Error::msg)?;
    Ok(task.reload(settings(pdp, policy, sandbox_id, sandbox_name))?)
}

/// Logs (info) where the time from a kernel miss to the verdict in the map
/// went during a run: n, then p50/p99/max in µs of the whole and of each
/// stage (see `AskTiming`). `PEP_LOG=info` shows it; the PDP benchmark
/// reads it.
pub fn report(task: &AskTask) {
    let all = task.timings();
    if all.is_empty() {
        report_keep_warm(task, 0);
        return;
    }
    let stats = |f: &dyn Fn(&task::AskTiming) -> u64| {
        let mut v: Vec<u64> = all.iter().map(|t| f(t) / 1000).collect();
        v.sort_unstable();
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        (q(0.5), q(0.99), v[v.len() - 1])
    };
    let (k50, k99, kmax) = stats(&|t| t.total());
    let stage = |name: &str, f: &dyn Fn(&task::AskTiming) -> u64| {
        let (a, b, c) = stats(f);
        format!("{name} {a}/{b}/{c}")
    };
    tracing::info!(
        "pdp: miss-to-verdict n={} p50_us={k50} p99_us={k99} max_us={kmax}; stages p50/p99/max us: {}, {}, {}, {}",
        all.len(),
        format!(
            "{} ({}, {})",
            stage("kernel-to-receipt", &|t| t.to_receipt),
            stage("in the kernel's connect path", &|t| t.in_kernel),
            stage("then to receipt", &|t| t.to_receipt.saturating_sub(t.in_kernel)),
        ),
        stage("query", &|t| t.query),
        stage("engine", &|t| t.engine),
        stage("to-map", &|t| t.to_map),
    );
    report_keep_warm(task, all.len());
}

/// Logs (info) the keep-warm's decisions and CPU time (`warm.rs`), also for
/// a run without misses (then none).
fn report_keep_warm(task: &AskTask, misses: usize) {
    let (warmed, cpu_ns) = task.keep_warm_cost();
    let spun_ns = task.busy_poll_cost();
    let per_miss = |ns: u64| ns as f64 / 1000.0 / misses.max(1) as f64;
    tracing::info!(
        "pdp: keep-warm decisions={warmed} cpu_us={} ({:.1} us per miss); busy-poll cpu_us={} ({:.1} us per miss)",
        cpu_ns / 1000,
        per_miss(cpu_ns),
        spun_ns / 1000,
        per_miss(spun_ns)
    );
}
