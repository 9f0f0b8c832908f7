//! The verdict cache as userspace writes it: keys from events, expiries on
//! the kernel's clock (`CLOCK_BOOTTIME`, what `bpf_ktime_get_boot_ns`
//! reads), revision stamps.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pep_common::{
    ask::{VerdictEntry, VerdictKey},
    event::{AF_INET, AF_INET6, VERDICT_ALLOW, VERDICT_DENY},
};

use super::kernel::AskMaps;

/// Now, in the kernel's `bpf_ktime_get_boot_ns` time base.
pub fn boot_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

/// `clock`'s reading, in ns.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The destination a key names.
pub fn key_addr(key: &VerdictKey) -> Option<IpAddr> {
    match key.family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(
            key.daddr[0],
            key.daddr[1],
            key.daddr[2],
            key.daddr[3],
        ))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(key.daddr))),
        _ => None,
    }
}

/// The key the kernel builds for a connect (`op` = `NET_OP_*`) to `addr`.
pub fn net_key(sandbox_id: u32, op: u32, addr: IpAddr, dport: u16, protocol: u8) -> VerdictKey {
    let mut k = VerdictKey {
        sandbox_id,
        action: op,
        protocol: u32::from(protocol),
        dport: u32::from(dport),
        ..VerdictKey::default()
    };
    let addr = match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
        a => a,
    };
    match addr {
        IpAddr::V4(a) => {
            k.family = AF_INET;
            k.daddr[..4].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            k.family = AF_INET6;
            k.daddr = a.octets();
        }
    }
    k
}

impl AskMaps {
    /// Caches `allow` for `key` until `ttl_s` from now, under `revision`.
    pub fn put(
        &mut self,
        key: &VerdictKey,
        allow: bool,
        revision: u32,
        ttl_s: u64,
    ) -> Result<(), aya::maps::MapError> {
        let entry = VerdictEntry {
            verdict: if allow { VERDICT_ALLOW } else { VERDICT_DENY },
            revision,
            expires_ns: boot_ns().saturating_add(ttl_s.saturating_mul(1_000_000_000)),
        };
        self.cache.insert(key, entry, 0)
    }

    /// Copies the live verdicts of sandbox id `from` stamped `from_revision`
    /// to sandbox id `to`, stamped `to_revision`, with their expiry: a new
    /// generation of a sandbox whose PDP answers alike. Returns how many.
    pub fn carry(&mut self, from: u32, from_revision: u32, to: u32, to_revision: u32) -> usize {
        let now = boot_ns();
        let live: Vec<(VerdictKey, VerdictEntry)> = self
            .cache
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| k.sandbox_id == from && v.revision == from_revision && v.expires_ns > now)
            .collect();
        let mut n = 0;
        for (mut k, mut v) in live {
            k.sandbox_id = to;
            v.revision = to_revision;
            n += usize::from(self.cache.insert(k, v, 0).is_ok());
        }
        n
    }

    /// The entry for `key`, live or not.
    pub fn get(&self, key: &VerdictKey) -> Option<VerdictEntry> {
        self.cache.get(key, 0).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_share_the_ipv4_key() {
        let a = net_key(1, 1, "127.0.0.1".parse().unwrap(), 80, 6);
        let b = net_key(1, 1, "::ffff:127.0.0.1".parse().unwrap(), 80, 6);
        assert_eq!(a, b);
        assert_eq!(key_addr(&a), Some("127.0.0.1".parse().unwrap()));
        let c = net_key(1, 1, "::1".parse().unwrap(), 80, 6);
        assert_eq!((c.family, key_addr(&c)), (AF_INET6, Some("::1".parse().unwrap())));
        assert!(boot_ns() > 0);
    }
}
