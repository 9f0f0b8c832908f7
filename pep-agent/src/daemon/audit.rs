//! The daemon's audit stream: the pinned ring buffer -> `audit::pipeline`
//! -> the configured sink, plus records of refused control requests, in one
//! task that alone owns the chain (`seq`, `prev`).
//!
//! The chain resumes from the last record of the log (`Sink::resume`), so a
//! restarted daemon continues it; events the kernel made while no daemon was
//! running waited in the pinned ring buffer and are read first; what did not
//! fit was counted in the pinned `COUNTERS` and is reported as `audit.lost`
//! (the count already reported is kept in the state directory).
//!
//! The ring buffer's consumer position moves only once what was read is in
//! the log (`audit::ring::CommitRing`): a daemon killed with SIGKILL leaves
//! the events it had not written for the next one. So that nothing read is
//! held unwritten when it moves, coalescing windows also close then.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use super::{metrics::Metrics, state};
use crate::audit::{
    decode::{Decision, Verdict},
    pipeline::{KernelCounters, Pipeline},
    pump,
    record::{Record, SandboxContext},
    ring::CommitRing,
};

/// Sandbox id -> what its records carry; shared with the control side.
pub type Contexts = Arc<RwLock<std::collections::HashMap<u32, SandboxContext>>>;

/// Most events handled before the task yields.
const BATCH: usize = 4096;

pub struct AuditTask {
    pub events: CommitRing,
    pub counters: KernelCounters,
    pub pipeline: Pipeline,
    pub records: mpsc::UnboundedReceiver<Record>,
    /// The ask thread has sent a record (`pdp::task::spawn_paused`): it is
    /// written now, not at the next ring-buffer wakeup, so that the window
    /// in which a SIGKILL could lose an answered ask's record stays short.
    pub pdp_wake: Arc<tokio::sync::Notify>,
    /// Told which PDP records are in the log, so the ask ring buffer gives
    /// their misses back (`pdp::acks`).
    pub acks: Option<Arc<crate::pdp::acks::Acks>>,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    pub state_dir: PathBuf,
}

fn action(d: &Decision) -> &'static str {
    // `if let`, not `match`: decision kinds added later count as "other".
    if let Decision::Net { op, .. } = d {
        match op {
            crate::audit::decode::NetOp::Connect => "net.connect",
            crate::audit::decode::NetOp::Send => "net.send",
        }
    } else if let Decision::File { write, .. } = d {
        if *write { "file.write" } else { "file.open" }
    } else if matches!(d, Decision::Exec { .. }) {
        "exec"
    } else {
        "other"
    }
}

impl AuditTask {
    pub async fn run(mut self) -> anyhow::Result<()> {
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd
        // holds it, and it is never swapped for another resource.
        let mut fd = unsafe { AsyncFd::register(self.events) }?;
        let mut lost_saved = self.pipeline.kernel_lost_seen();
        loop {
            let stopping = *self.shutdown.borrow();
            // The kernel wakes a reader only for a record submitted where the
            // consumer position stood, and ours moves at commit, behind the
            // reading: what came in since is read without waiting for a
            // wakeup that does not come.
            let backlog = fd.get_ref().has_unread();
            tokio::select! {
                () = std::future::ready(()), if backlog => {
                    drain(fd.get_mut(), &mut self.pipeline, &self.metrics, BATCH)?;
                }
                r = tokio::time::timeout(Duration::from_millis(50), fd.readable_mut()), if !backlog => {
                    if let Ok(guard) = r {
                        let mut guard = guard?;
                        let more = drain(guard.get_inner_mut(), &mut self.pipeline, &self.metrics, BATCH)?;
                        if !more {
                            guard.clear_ready();
                            if !stopping {
                                tokio::time::sleep(pump::COALESCE).await;
                            }
                        }
                    }
                }
                Some(rec) = self.records.recv() => self.pipeline.record(rec)?,
                () = self.pdp_wake.notified() => {}
                _ = self.shutdown.changed() => {}
            }
            self.pipeline.kernel_lost(self.counters.losses())?;
            // Every window closes: what was read is written before the
            // ring's position moves past it.
            self.pipeline.tick(0)?;
            self.pipeline.flush()?;
            fd.get_mut().commit();
            ack_pdp(&mut self.pipeline, self.acks.as_deref());
            // Saved only once its `audit.lost` record is written: a daemon
            // killed in between reports the drops again rather than never.
            let seen = self.pipeline.kernel_lost_seen();
            if seen != lost_saved {
                if let Err(e) = state::save_lost_reported(&self.state_dir, seen) {
                    tracing::warn!("saving the lost count: {e}");
                }
                lost_saved = seen;
            }
            if stopping {
                while drain(fd.get_mut(), &mut self.pipeline, &self.metrics, usize::MAX)? {}
                self.pipeline.flush()?;
                fd.get_mut().commit();
                while let Ok(rec) = self.records.try_recv() {
                    self.pipeline.record(rec)?;
                }
                self.pipeline.tick(0)?;
                self.pipeline.flush()?;
                ack_pdp(&mut self.pipeline, self.acks.as_deref());
                // Not `finish(Some(counters))`: the pinned decision counter
                // spans every daemon run, this pipeline only its own.
                self.pipeline.finish(None).await?;
                return Ok(());
            }
            tokio::task::yield_now().await;
        }
    }
}

/// After a flush: the PDP records written are in the log.
fn ack_pdp(p: &mut Pipeline, acks: Option<&crate::pdp::acks::Acks>) {
    let tokens = p.take_pdp_tokens();
    if let Some(a) = acks {
        a.written(&tokens);
    }
}

fn drain(rb: &mut CommitRing, p: &mut Pipeline, m: &Metrics, max: usize) -> std::io::Result<bool> {
    let mut n = 0usize;
    while n < max {
        let Some(item) = rb.next_record() else {
            return Ok(false);
        };
        match Decision::try_from(item) {
            Ok(d) => {
                m.decisions
                    .get_or_create(&super::metrics::DecisionLabels {
                        action: action(&d).into(),
                        verdict: match d.header().verdict {
                            Verdict::Allow => "allow",
                            Verdict::Deny => "deny",
                        }
                        .into(),
                    })
                    .inc();
                p.decision(d)?;
            }
            Err(e) => {
                tracing::error!("undecodable kernel event: {e}");
                p.lost(1, "decode")?;
            }
        }
        n += 1;
    }
    Ok(true)
}

/// A record of a control request the daemon refused (unsealed: the audit
/// task numbers and chains it).
pub fn refusal(op: &str, peer: &super::authz::Peer, reason: &str) -> Record {
    let ctx = SandboxContext {
        name: String::new(),
        policy_revision: String::new(),
        degraded: None,
    };
    let mut rec = crate::audit::record::lost_record(0, reason, &ctx);
    rec.action = format!("control.{op}");
    rec.count = None;
    rec.verdict = Some(Verdict::Deny);
    rec.process = Some(crate::audit::record::Process {
        pid: peer.pid,
        tid: peer.pid,
        ppid: 0,
        uid: peer.uid,
        gid: peer.gid,
        comm: std::fs::read_to_string(format!("/proc/{}/comm", peer.pid))
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        exe: crate::audit::record::read_exe(peer.pid),
        cgroup_id: 0,
        key: String::new(),
        ancestors: Vec::new(),
    });
    rec
}
