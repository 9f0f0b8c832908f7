//! What keeps the ask thread quick: real-time priority, a warm-up before
//! the first miss, and keeping the embedded engine warm while a sandbox is
//! missing.
//!
//! A decision made right after the ask thread has slept runs on cold
//! caches: here, where an idle vCPU halts (a VM exit), several times its
//! warm time (the interpreter: about 4.5 us warm, 17-50 us at the median
//! cold). So while misses keep coming (the last one decided by an embedded
//! engine less than `WARM_FOR` ago), a wait for misses that ends without
//! one makes a throwaway decision and a verdict-cache lookup every
//! `WARM_EVERY_MS` (`task::keep_warm`), which keeps what the next miss
//! touches cached. Bounded: at most `WARM_FOR / WARM_EVERY_MS` of them after
//! each miss, none once the sandbox stops missing (an idle sandbox costs
//! nothing), none for a remote engine. Their CPU time is counted and
//! logged at exit with the miss timings.

use std::time::Duration;

use pep_common::net::PROTO_TCP;

use super::{
    query::{Context, Query, Resource, Subject},
    task::AskSettings,
};

/// How often, in ms, while warm.
pub const WARM_EVERY_MS: i32 = 1;
/// How long after a miss.
pub const WARM_FOR: Duration = Duration::from_millis(100);

/// This thread's CPU time, in ns.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
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
