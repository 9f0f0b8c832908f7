//! The kernel side of the resolver: the programs that restore the server a
//! steered socket asked (recvmsg, getpeername), the steering entry, and the
//! learned-address map with its userspace mirror (merging, expiry, bounds).

use std::{collections::HashMap, fs::File, net::IpAddr, os::fd::AsFd as _, path::Path};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::CgroupSockAddr,
};
use pep_common::{
    dns::{DnsOrig, DnsSteer, LearnedEntry, LearnedKey, MAX_LEARNED_RULES},
    event::{AF_INET, AF_INET6},
    net::NetRule as KernelRule,
};

use crate::enforcer::{
    Enforcer, EnforcerError,
    attach::{self, Op},
};

/// (program, `enum bpf_attach_type`): UDP4/6_RECVMSG, INET4/6_GETPEERNAME.
pub const DNS_PROGRAMS: [(&str, u32); 4] = [
    ("dns_recvmsg4", 19),
    ("dns_recvmsg6", 20),
    ("dns_getpeername4", 29),
    ("dns_getpeername6", 30),
];

/// Most learned addresses the mirror (and so the kernel map) holds; the
/// kernel map is an LRU of the same size, so it never fills either.
pub const MAX_LEARNED: usize = 65536;

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EnforcerError {
    move |source| EnforcerError::Map { name, source }
}

fn program<'a>(
    enforcer: &'a mut Enforcer,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, EnforcerError> {
    let prog = enforcer.ebpf.program_mut(name).ok_or(EnforcerError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into()
        .map_err(|source| EnforcerError::Program { name, source })
}

/// Loads the restoring programs (after `Enforcer::load`).
pub fn load(enforcer: &mut Enforcer) -> Result<(), EnforcerError> {
    for (name, _) in DNS_PROGRAMS {
        program(enforcer, name)?
            .load()
            .map_err(|source| EnforcerError::Program { name, source })?;
    }
    Ok(())
}

/// Attaches (or detaches) the restoring programs to a sandbox cgroup. Like
/// the network hooks, the cgroup holds them (legacy attach, multi mode).
pub fn attach(enforcer: &mut Enforcer, cgroup_path: &Path, op: Op) -> Result<(), EnforcerError> {
    let file = File::open(cgroup_path).map_err(|source| EnforcerError::Cgroup {
        path: cgroup_path.display().to_string(),
        source,
    })?;
    for (name, attach_type) in DNS_PROGRAMS {
        let prog = program(enforcer, name)?;
        let fd = prog
            .fd()
            .map_err(|source| EnforcerError::Program { name, source })?;
        attach::cgroup(op, file.as_fd(), fd.as_fd(), attach_type).map_err(|source| {
            EnforcerError::Cgroup {
                path: format!("{} ({name}, {op:?})", cgroup_path.display()),
                source,
            }
        })?;
    }
    Ok(())
}

/// Steers `sandbox_id`'s port-53 traffic to the resolver at `port` on
/// 127.0.0.1 and ::1. Write it before the sandbox entry is published.
pub fn set_steer(enforcer: &mut Enforcer, sandbox_id: u32, port: u16) -> Result<(), EnforcerError> {
    let map = enforcer
        .ebpf
        .map_mut("DNS_STEER")
        .ok_or(EnforcerError::NoMap("DNS_STEER"))?;
    let mut m: BpfHashMap<&mut MapData, u32, DnsSteer> =
        BpfHashMap::try_from(map).map_err(map_err("DNS_STEER"))?;
    let steer = DnsSteer {
        port: u32::from(port),
        addr4: [127, 0, 0, 1],
        addr6: std::net::Ipv6Addr::LOCALHOST.octets(),
    };
    m.insert(sandbox_id, steer, 0).map_err(map_err("DNS_STEER"))
}

/// The maps the resolver writes and reads while it runs.
pub struct DnsMaps {
    learned: BpfHashMap<MapData, LearnedKey, LearnedEntry>,
    orig: BpfHashMap<MapData, u64, DnsOrig>,
    /// What userspace wrote into `learned`, for merging and expiry.
    mirror: HashMap<LearnedKey, LearnedEntry>,
}

/// Takes the learned and original-destination maps out of the enforcer.
pub fn take_maps(enforcer: &mut Enforcer) -> Result<DnsMaps, EnforcerError> {
    let learned = enforcer
        .ebpf
        .take_map("DNS_LEARNED")
        .ok_or(EnforcerError::NoMap("DNS_LEARNED"))?;
    let orig = enforcer
        .ebpf
        .take_map("DNS_ORIG")
        .ok_or(EnforcerError::NoMap("DNS_ORIG"))?;
    Ok(DnsMaps {
        learned: BpfHashMap::try_from(learned).map_err(map_err("DNS_LEARNED"))?,
        orig: BpfHashMap::try_from(orig).map_err(map_err("DNS_ORIG"))?,
        mirror: HashMap::new(),
    })
}

/// The learned-map key of `addr` (IPv4-mapped IPv6 is IPv4, as the kernel
/// looks it up).
pub fn learned_key(sandbox_id: u32, addr: IpAddr) -> LearnedKey {
    let mut key = LearnedKey {
        sandbox_id,
        family: AF_INET6,
        addr: [0; 16],
    };
    let v4 = match addr {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    match (v4, addr) {
        (Some(a), _) => {
            key.family = AF_INET;
            key.addr[..4].copy_from_slice(&a.octets());
        }
        (None, IpAddr::V6(a)) => key.addr = a.octets(),
        (None, IpAddr::V4(_)) => unreachable!("an IPv4 address is always Some above"),
    }
    key
}

impl DnsMaps {
    /// Makes `addr` reachable for `sandbox_id` with `entries` until
    /// `expires_ns`, merged with what is still live there (the later expiry;
    /// the earlier entries first, then new ones not already present).
    /// Returns once the kernel map holds it.
    pub fn learn(
        &mut self,
        sandbox_id: u32,
        addr: IpAddr,
        entries: &[KernelRule],
        expires_ns: u64,
        domain_id: u32,
        now_ns: u64,
    ) -> Result<(), aya::maps::MapError> {
        let key = learned_key(sandbox_id, addr);
        let mut entry = LearnedEntry {
            expires_ns,
            count: 0,
            domain_id,
            rules: [KernelRule::default(); MAX_LEARNED_RULES],
        };
        let mut rules: Vec<KernelRule> = Vec::new();
        if let Some(old) = self.mirror.get(&key).filter(|o| o.expires_ns > now_ns) {
            rules.extend_from_slice(&old.rules[..old.count as usize]);
            entry.expires_ns = entry.expires_ns.max(old.expires_ns);
        }
        for e in entries {
            if !rules.contains(e) {
                rules.push(*e);
            }
        }
        rules.truncate(MAX_LEARNED_RULES);
        entry.count = rules.len() as u32;
        entry.rules[..rules.len()].copy_from_slice(&rules);
        if self.mirror.len() >= MAX_LEARNED && !self.mirror.contains_key(&key) {
            self.evict_soonest();
        }
        self.learned.insert(key, entry, 0)?;
        self.mirror.insert(key, entry);
        Ok(())
    }

    /// Removes the mirror entry that expires first (the kernel's LRU would
    /// evict something anyway; this keeps the two in step).
    fn evict_soonest(&mut self) {
        if let Some(key) = self
            .mirror
            .iter()
            .min_by_key(|(_, e)| e.expires_ns)
            .map(|(k, _)| *k)
        {
            self.mirror.remove(&key);
            let _ = self.learned.remove(&key);
        }
    }

    /// Removes expired entries from the kernel map and the mirror. The
    /// kernel already ignores them; this frees the room.
    pub fn sweep(&mut self, now_ns: u64) -> usize {
        let expired: Vec<LearnedKey> = self
            .mirror
            .iter()
            .filter(|(_, e)| e.expires_ns <= now_ns)
            .map(|(k, _)| *k)
            .collect();
        for k in &expired {
            self.mirror.remove(k);
            let _ = self.learned.remove(k);
        }
        expired.len()
    }

    /// The server a steered socket asked (`DNS_ORIG[cookie]`), if known.
    pub fn orig(&self, cookie: u64) -> Option<(IpAddr, u16)> {
        let o = self.orig.get(&cookie, 0).ok()?;
        let addr = match o.family {
            AF_INET => IpAddr::from([o.addr[0], o.addr[1], o.addr[2], o.addr[3]]),
            _ => {
                let a = std::net::Ipv6Addr::from(o.addr);
                a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)
            }
        };
        Some((addr, o.port as u16))
    }

    /// Live entries in the mirror (for tests and status).
    pub fn len(&self) -> usize {
        self.mirror.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mirror.is_empty()
    }
}
