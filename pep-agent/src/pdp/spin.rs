//! `pdp.busy_poll_us`: after a miss, the ask thread waits for the next one
//! by spinning on the ring's producer position instead of sleeping in
//! `poll`, for that long.
//!
//! Why: a sleeping thread is woken by the kernel's ring-buffer wakeup,
//! which here (an idle vCPU halts: a VM exit) takes 25-55 µs at the median
//! and more than 100 µs at the 99th percentile, half of a miss's time. A
//! spinning thread sees the record as soon as it is written; and on a CPU
//! of its own the verdict is often in the map before the held connect's
//! SYN reaches the egress hook, so the connect does not wait for a SYN
//! retransmit at all. The price is one CPU busy for the window after each
//! miss (counted, logged at exit with the keep-warm's cost), which is why
//! it is off unless asked for, like the kernel's own `net.core.busy_poll`.
//!
//! Bounded: the window starts at a miss and ends `busy_poll_us` later (at
//! most `MAX_BUSY_POLL_US`), so an idle sandbox costs nothing and a lone
//! miss costs one window. While it spins the thread is an ordinary one
//! (`SCHED_OTHER`, nice 0) that yields the CPU every `YIELD_EVERY`: a
//! real-time spinner would starve whatever shares its CPU until the
//! kernel's real-time throttling stopped it, and then stall itself. Give it
//! a CPU the sandbox does not use (`taskset`, a cpuset) to get the figures
//! in docs/PDP.md; on a shared CPU it still works, at the cost of sharing.
//! Once the window ends the thread is real-time again (`warm::boost_priority`).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use super::warm::{boost_priority, thread_cpu_ns};
use crate::audit::ring::CommitRing;

/// How long the thread spins between two `sched_yield`s: what another task
/// woken on its CPU waits at most before it runs.
const YIELD_EVERY: Duration = Duration::from_micros(20);

/// The window after the last miss, and whether the thread is spinning.
#[derive(Debug, Default)]
pub(super) struct BusyPoll {
    until: Option<Instant>,
    spinning: bool,
}

/// How a wait ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Waited {
    /// A record is in the ring.
    Record,
    /// The deadline came first (or `stop` was set).
    Timeout,
}

impl BusyPoll {
    /// A miss of a sandbox with `busy_poll` was read at `at`: the window
    /// runs to `at + busy_poll`, or further if already set so.
    pub(super) fn missed(&mut self, at: Instant, busy_poll: Duration) {
        if busy_poll.is_zero() {
            return;
        }
        let end = at + busy_poll;
        if self.until.is_none_or(|u| u < end) {
            self.until = Some(end);
        }
    }

    /// The end of the window, if it is open at `now`.
    pub(super) fn window(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|u| *u > now)
    }

    /// Spins until a record is in `asks`, `deadline` passes, or `stop` is
    /// set. Returns how it ended and the thread CPU time it took (ns).
    pub(super) fn spin(&mut self, asks: &CommitRing, deadline: Instant, stop: &AtomicBool) -> (Waited, u64) {
        let cpu = thread_cpu_ns();
        if !self.spinning {
            self.spinning = true;
            ordinary_priority();
        }
        let mut slice = Instant::now() + YIELD_EVERY;
        let waited = loop {
            if asks.has_unread() {
                break Waited::Record;
            }
            let now = Instant::now();
            if now >= deadline || stop.load(Ordering::Relaxed) {
                break Waited::Timeout;
            }
            if now >= slice {
                // SAFETY: no arguments.
                unsafe { libc::sched_yield() };
                slice = Instant::now() + YIELD_EVERY;
            } else {
                std::hint::spin_loop();
            }
        };
        (waited, thread_cpu_ns().saturating_sub(cpu))
    }

    /// The window is over (or was never open): a spinning thread becomes
    /// real-time again, to sleep in `poll`.
    pub(super) fn rest(&mut self) {
        if self.spinning {
            self.spinning = false;
            boost_priority();
        }
    }
}

/// `SCHED_OTHER` at nice 0, for spinning (see the module's comment).
fn ordinary_priority() {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system calls on this thread (0: the caller).
    unsafe {
        if libc::sched_setscheduler(0, libc::SCHED_OTHER, &p) != 0 {
            tracing::debug!(
                "SCHED_OTHER for busy-polling: {}",
                std::io::Error::last_os_error()
            );
        }
        if libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 0) != 0 {
            tracing::debug!("nice 0 for busy-polling: {}", std::io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_follows_the_last_miss_of_a_busy_polling_sandbox() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut b = BusyPoll::default();
        assert_eq!(b.window(t0), None, "no miss yet");
        b.missed(t0, Duration::ZERO);
        assert_eq!(b.window(t0), None, "a sandbox that does not busy-poll opens none");
        b.missed(ms(10), Duration::from_millis(50));
        assert_eq!(b.window(ms(20)), Some(ms(60)));
        assert_eq!(b.window(ms(60)), None, "closed at its end");
        b.missed(ms(30), Duration::from_millis(100));
        assert_eq!(b.window(ms(60)), Some(ms(130)), "a later miss extends it");
        b.missed(ms(40), Duration::from_millis(10));
        assert_eq!(
            b.window(ms(60)),
            Some(ms(130)),
            "a shorter window never shortens it"
        );
    }
}
