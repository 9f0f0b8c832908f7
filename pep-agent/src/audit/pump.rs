//! The pump: the one task that reads the kernel's ring buffer into a
//! `Pipeline`, for `run` and the daemon's audit task alike. It waits for
//! the ring buffer's wakeup, drains it at least every `DRAIN_EVERY`, and
//! waits `COALESCE` after draining it empty so that records trickling in
//! cost one kernel wakeup per window.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use super::pipeline::{KernelCounters, Pipeline, boot_ns};

/// Most events handled before the task yields (tailers share the thread).
const BATCH: usize = 4096;

/// Longest wait for the ring buffer before the pump drains it anyway: it
/// bounds how late `stop` and closed coalescing windows are noticed, and how
/// late a record is seen should a wakeup be missed.
const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// How long the pump waits after draining the ring buffer empty before it
/// drains again. The kernel wakes the consumer for the first record it
/// submits after the consumer has caught up (an irq_work, then an IPI to
/// the consumer's CPU, paid by the process whose call made the record), and
/// for none submitted while that one is unread. A consumer that drains at
/// once on every wakeup stays caught up, so a sandboxed process that opens
/// files in a loop pays a wakeup per open; waiting first turns that into one
/// wakeup per window. The cost is this much delay for a live tailer. (The
/// ring buffer holds about 18,000 file records, tens of milliseconds of the
/// fastest flood measured, so the window risks no loss.)
pub const COALESCE: Duration = Duration::from_millis(1);

/// Reads the ring buffer into `pipeline` until `stop` is set, then drains
/// what is left. SIGUSR1 reopens the file sink. Returns the pipeline for
/// `finish`.
pub async fn pump(
    events: RingBuf<MapData>,
    counters: Option<Arc<KernelCounters>>,
    mut pipeline: Pipeline,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Pipeline> {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds
    // it, and it is never swapped for another resource (`get_mut` is used
    // only to read from it).
    let mut fd = unsafe { AsyncFd::register(events) }?;
    let mut usr1 = tokio::signal::unix::signal(SignalKind::user_defined1()).ok();
    // A drain without a wakeup stopped at BATCH: more is waiting.
    let mut backlog = false;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let wait = if backlog { Duration::ZERO } else { DRAIN_EVERY };
        tokio::select! {
            r = tokio::time::timeout(wait, fd.readable_mut()) => match r {
                Ok(guard) => {
                    let mut guard = guard?;
                    let more = drain(guard.get_inner_mut(), &mut pipeline, BATCH)?;
                    if !more {
                        guard.clear_ready();
                    }
                    backlog = false;
                    if !more && !stopping {
                        tokio::time::sleep(COALESCE).await;
                    }
                }
                // No wakeup: records submitted without one may be waiting.
                Err(_) => backlog = drain(fd.get_mut(), &mut pipeline, BATCH)?,
            },
            _ = recv(&mut usr1) => {
                tracing::info!("SIGUSR1: reopening the audit file");
                pipeline.flush()?;
                pipeline.reopen()?;
            }
        }
        if let Some(c) = &counters {
            pipeline.kernel_lost(c.losses())?;
        }
        pipeline.tick(boot_ns())?;
        pipeline.flush()?;
        if stopping {
            while drain(fd.get_mut(), &mut pipeline, usize::MAX)? {}
            return Ok(pipeline);
        }
        tokio::task::yield_now().await;
    }
}

async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// Handles up to `max` events; true when it stopped at `max` (more may wait).
fn drain(rb: &mut RingBuf<MapData>, pipeline: &mut Pipeline, max: usize) -> std::io::Result<bool> {
    let mut n = 0usize;
    while n < max {
        let Some(item) = rb.next() else {
            return Ok(false);
        };
        pipeline.ingest(&item)?;
        n += 1;
    }
    Ok(true)
}
