//! What keeps the ask thread quick: real-time priority, a warm-up before
//! the first miss, and keeping the embedded engine warm while a sandbox is
//! missing.
//!
//! A decision made right after the ask thread has slept runs on cold
//! caches: here, where an idle vCPU halts (a VM exit), several times its
//! warm time (the interpreter: about 4.5 us warm, 17-50 us at the median
//! cold). So while misses come in a stream (`Streak`: the last two decided
//! by an embedded engine less than `WARM_FOR` apart, the last less than
//! `WARM_FOR` ago), a wait for misses that ends without one makes a
//! throwaway decision and a verdict-cache lookup every `WARM_EVERY_MS`
//! (`task::keep_warm`), which keeps what the next miss touches cached.
//! Bounded: at most `WARM_FOR / WARM_EVERY_MS` of them after each miss of a
//! stream, none after a lone miss (the first after a quiet spell: warming
//! after it cost about 2.8 ms of CPU per lone miss, for a next miss that
//! mostly came after the window, cold anyway), none once the sandbox stops
//! missing (an idle sandbox costs nothing), none for a remote engine.
//! Their CPU time is counted and logged at exit with the miss timings.

use std::time::{Duration, Instant};

use pep_common::net::PROTO_TCP;

use super::{
    query::{Context, Query, Resource, Subject},
    task::AskSettings,
};

/// How often, in ms, while warm.
pub const WARM_EVERY_MS: i32 = 1;
/// How long after a miss.
pub const WARM_FOR: Duration = Duration::from_millis(100);

/// The recent misses decided by an embedded engine: whether to keep warm.
#[derive(Debug, Default)]
pub(super) struct Streak {
    last: Option<Instant>,
    prev: Option<Instant>,
}

impl Streak {
    /// A miss was decided at `at`.
    pub(super) fn missed(&mut self, at: Instant) {
        self.prev = self.last.replace(at);
    }

    /// Whether, at `now`, misses are coming in a stream.
    pub(super) fn warming(&self, now: Instant) -> bool {
        match (self.prev, self.last) {
            (Some(prev), Some(last)) => {
                last.duration_since(prev) < WARM_FOR && now.saturating_duration_since(last) < WARM_FOR
            }
            _ => false,
        }
    }
}

/// This thread's CPU time, in ns.
pub fn thread_cpu_ns() -> u64 {
    super::cache::clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// A held connect waits on this thread: it should run the moment a miss
/// wakes it, even when every CPU is busy (without this, a busy machine
/// adds a scheduler tick, 4 ms at HZ=250, to some asks). So: SCHED_FIFO at
/// the lowest real-time priority where allowed, else nice -20. Its work per
/// miss is one embedded decision (microseconds) or handing a remote one to
/// tokio; under a flood of misses the kernel's real-time throttling
/// (`sched_rt_runtime_us`, 95% of each second by default) still leaves the
/// CPU to others, and a full ring buffer drops asks (counted, fail closed).
pub(super) fn boost_priority() {
    // SAFETY: plain system calls on this thread (tid 0: the caller).
    unsafe {
        if libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, ASK_NICE) != 0 {
            tracing::debug!(
                "setpriority on the ask thread: {}",
                std::io::Error::last_os_error()
            );
        }
        let p = libc::sched_param {
            sched_priority: ASK_RT_PRIORITY,
        };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) != 0 {
            tracing::debug!(
                "SCHED_FIFO for the ask thread: {} (nice {ASK_NICE} instead)",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The ask thread's nice value, if it cannot be real-time.
const ASK_NICE: i32 = -20;
/// Its SCHED_FIFO priority: the lowest.
const ASK_RT_PRIORITY: i32 = 1;

/// One throwaway decision before the first miss, so the first held
/// connect does not pay for paging the engine in (a first evaluation takes
/// several times longer than the next). Embedded engines only: they are
/// pure functions of the query.
pub(super) fn warm_up(s: &AskSettings) {
    let q = Query {
        subject: Subject {
            sandbox: s.sandbox_name.clone(),
            pid: 0,
            uid: 0,
            comm: String::new(),
            exe: None,
            labels: Default::default(),
        },
        action: "net.connect".into(),
        resource: Resource::net(std::net::Ipv4Addr::UNSPECIFIED.into(), 0, PROTO_TCP),
        context: Context::now(&s.policy_revision),
    };
    let _ = s.pdp.decide_now(&q);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stream_of_misses_keeps_warm() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut s = Streak::default();
        assert!(!s.warming(t0), "no miss yet");
        s.missed(t0);
        assert!(!s.warming(ms(1)), "a lone miss");
        s.missed(ms(8));
        assert!(s.warming(ms(9)), "a second miss 8 ms after the first");
        assert!(s.warming(ms(107)));
        assert!(!s.warming(ms(108)), "WARM_FOR after the last miss");
        // A miss long after the stream is lone again.
        s.missed(ms(500));
        assert!(!s.warming(ms(501)));
    }
}
