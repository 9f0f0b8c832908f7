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
        OffsetDateTime::from_unix_timestamp_nanos(self.to_unix_ns(boot_ns))
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// Boot-clock nanoseconds to Unix-epoch nanoseconds.
    pub fn to_unix_ns(&self, boot_ns: u64) -> i128 {
        i128::from(boot_ns) + self.offset_ns
    }
}

/// Writes `rfc3339` timestamps without the calendar arithmetic per call:
/// records come in bursts within one second, so the `YYYY-MM-DDTHH:MM:SS`
/// part is kept for the second it was made for and only the fraction is
/// written each time.
#[derive(Debug, Default, Clone)]
pub struct Rfc3339Cache {
    second: Option<i64>,
    prefix: String,
}

impl Rfc3339Cache {
    /// Appends the time `unix_ns` (ns since the Unix epoch), exactly as
    /// `rfc3339` writes it: nanoseconds without trailing zeros, no fraction
    /// when it is zero, `Z`.
    pub fn write(&mut self, out: &mut String, unix_ns: i128) {
        let Ok(secs) = i64::try_from(unix_ns.div_euclid(1_000_000_000)) else {
            out.push_str(&rfc3339(OffsetDateTime::UNIX_EPOCH));
            return;
        };
        let nanos = u32::try_from(unix_ns.rem_euclid(1_000_000_000)).unwrap_or(0);
        if self.second != Some(secs) {
            let Ok(t) = OffsetDateTime::from_unix_timestamp(secs) else {
                out.push_str(&rfc3339(OffsetDateTime::UNIX_EPOCH));
                return;
            };
            let full = rfc3339(t);
            // Whole seconds: `...SSZ`; keep all but the `Z`.
            self.prefix.clear();
            self.prefix.push_str(full.strip_suffix('Z').unwrap_or(&full));
            self.second = Some(secs);
        }
        out.push_str(&self.prefix);
        if nanos != 0 {
            let mut digits = [b'0'; 9];
            let mut n = nanos;
            for d in digits.iter_mut().rev() {
                *d = b'0' + (n % 10) as u8;
                n /= 10;
            }
            let len = 9 - digits.iter().rev().take_while(|d| **d == b'0').count();
            out.push('.');
            for d in &digits[..len] {
                out.push(char::from(*d));
            }
        }
        out.push('Z');
    }
}

/// RFC 3339 with nanoseconds, UTC: `2026-11-25T16:20:20.123456789Z`.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

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

    proptest! {
        /// The cache writes what `rfc3339` writes, across second, day and
        /// year boundaries and for fractions with trailing zeros (the
        /// strategy favours round values), whatever was cached before.
        #[test]
        fn cache_writes_what_rfc3339_writes(
            times in proptest::collection::vec(
                (0i64..4_102_444_800, prop_oneof![
                    0u32..1_000_000_000,
                    (0u32..1000).prop_map(|n| n * 1_000_000),
                    (0u32..10).prop_map(|n| n * 100_000_000),
                    Just(0u32),
                ]),
                1..20,
            ),
        ) {
            let mut cache = Rfc3339Cache::default();
            for (i, (secs, nanos)) in times.iter().enumerate() {
                // Every other one in the same second as the previous.
                let secs = if i % 2 == 1 { times[i - 1].0 } else { *secs };
                let ns = i128::from(secs) * 1_000_000_000 + i128::from(*nanos);
                let want = rfc3339(OffsetDateTime::from_unix_timestamp_nanos(ns).expect("in range"));
                let mut got = String::new();
                cache.write(&mut got, ns);
                prop_assert_eq!(got, want);
            }
        }
    }
}
