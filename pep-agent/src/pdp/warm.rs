//! Keeping the embedded engine warm while a sandbox is missing.
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
