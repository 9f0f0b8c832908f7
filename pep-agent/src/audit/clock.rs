//! Kernel timestamps (`bpf_ktime_get_boot_ns`) to wall-clock time.

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Converts boot-clock nanoseconds to wall-clock time, with the offset
/// measured once when created.
#[derive(Debug, Clone, Copy)]
pub struct BootClock {
    offset_ns: i128,
}

impl Default for BootClock {
    fn default() -> Self {
        Self::new()
    }
}

impl BootClock {
    pub fn new() -> Self {
        Self {
            offset_ns: clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_BOOTTIME),
        }
    }

    pub fn to_wall(&self, boot_ns: u64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(boot_ns) + self.offset_ns)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// RFC 3339 with nanoseconds, UTC: `2026-11-25T16:20:20.123456789Z`.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_zero_is_in_the_past() {
        let c = BootClock::new();
        let now = OffsetDateTime::now_utc();
        let boot = c.to_wall(0);
        assert!(boot < now, "boot {boot} should precede now {now}");
        let s = rfc3339(c.to_wall(1_000_000_123));
        assert!(s.ends_with('Z') && s.contains('T'), "{s}");
    }
}
