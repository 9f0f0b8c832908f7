//! Asking in `pep-agent run`: what the run does, in order, when the policy's
//! `network.default` is `ask`.

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use pep_common::ask::{ASK_FLAG_NET, AskSandbox, DEFAULT_HOLD_SYNCNT};
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
    policy.network.default == NetDefault::Ask
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
/// programs and marks the sandbox as asking.
pub fn prepare(enforcer: &mut Enforcer, sandbox_id: u32) -> Result<(), EnforcerError> {
    enforcer.load_ask()?;
    enforcer.set_ask_sandbox(
        sandbox_id,
        AskSandbox {
            revision: STANDALONE_REVISION,
            flags: ASK_FLAG_NET,
            syncnt: DEFAULT_HOLD_SYNCNT,
            _pad: 0,
        },
    )
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
) -> Result<AskTask, EnforcerError> {
    let (maps, asks) = enforcer.take_ask()?;
    let (tx, rx) = mpsc::unbounded_channel();
    let origins = CacheOrigins::default();
    pipeline.set_pdp_feed(PdpFeed {
        records: rx,
        origins: origins.clone(),
        engine: pdp.engine(),
    });
    let settings = AskSettings {
        pdp,
        sandbox_name: sandbox_name.to_owned(),
        policy_revision: policy.revision().to_owned(),
        revision: STANDALONE_REVISION,
        cache_ttl_s: policy.pdp.cache_ttl_s,
        on_unavailable: policy.pdp.on_unavailable,
        stale_window_s: policy.pdp.stale_window_s,
        budget: budget(policy),
    };
    Ok(task::spawn(settings, maps, asks, tx, origins, stop))
}

/// Logs (info) the kernel-miss-to-verdict-in-map times of a run: n, p50,
/// p99, max in µs. `PEP_LOG=info` shows it; the PDP benchmark reads it.
pub fn report(task: &AskTask) {
    let all = task.verdict_latencies_us();
    if all.is_empty() {
        return;
    }
    let stats = |mut v: Vec<u64>| {
        v.sort_unstable();
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        (q(0.5), q(0.99), v[v.len() - 1])
    };
    let (k50, k99, kmax) = stats(all.iter().map(|x| x.0).collect());
    let (u50, u99, umax) = stats(all.iter().map(|x| x.1).collect());
    tracing::info!(
        "pdp: miss-to-verdict n={} p50_us={k50} p99_us={k99} max_us={kmax}; \
         in userspace (event read to verdict written) p50_us={u50} p99_us={u99} max_us={umax}",
        all.len()
    );
}
