//! DNS-aware network policy (issue 7): `domain` rules are decided when the
//! name is resolved, by the agent's own resolver, and the addresses of an
//! allowed answer become reachable for that sandbox only, for the answer's
//! TTL.
//!
//! - Steering (kernel, `pep-ebpf/src/dns.rs`): every connect and send to port
//!   53 from a sandbox whose policy has `domain` rules goes to that sandbox's
//!   resolver port on 127.0.0.1 / ::1, whatever server the application asked
//!   (its resolv.conf is the host's); replies and getpeername report the
//!   server it asked. The rewrite happens at connect/sendmsg, before any
//!   packet exists, so no DNS packet from a sandbox leaves the host.
//! - Which sandbox asks: one resolver port per sandbox; the kernel steers
//!   each sandbox to its own. The original server is kept by socket cookie
//!   (`DNS_ORIG`); the resolver finds the client socket's cookie, inode and
//!   owner with NETLINK_SOCK_DIAG and the process in the sandbox cgroup that
//!   holds it, for the record.
//! - Deciding (`rules`, `server`): see `server`'s doc.
//! - Learned addresses (`kernel`): `DNS_LEARNED`, an LRU hash of (sandbox,
//!   family, address) -> (expiry, the name's rule entries). Consulted by the
//!   connect/sendmsg hooks only where no CIDR rule matched: a CIDR rule,
//!   allow or deny, always decides first, so an answer can never open a
//!   range the policy denies by CIDR (DNS rebinding to 169.254.169.254 or
//!   127.0.0.1), and a learned address beats only the default (and `ask`).
//!   TTLs are clamped to [`min_ttl_s`, `max_ttl_s`] (`network.dns`); the
//!   kernel ignores expired entries and the resolver removes them each
//!   second.
//! - Records: one `dns.query` per query; later `net.*` records to a learned
//!   address carry `net.domain` (`DnsFeed::annotate`).

pub mod kernel;
pub mod peer;
pub mod rules;
pub mod server;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{
    audit::{decode::Decision, pipeline::Pipeline, record::Record},
    enforcer::{Enforcer, EnforcerError, attach::Op},
    policy::Policy,
};

pub use rules::{DomainRules, NameDecision};
pub use server::SandboxDns;

/// Boot-clock nanoseconds (the kernel's `bpf_ktime_get_boot_ns`).
pub fn boot_ns() -> u64 {
    crate::audit::pipeline::boot_ns()
}

/// Whether the policy needs the resolver: it has `domain` rules.
pub fn wanted(policy: &Policy) -> bool {
    !DomainRules::new(&policy.network.rules).is_empty()
}

/// The upstream: the policy's `network.dns.upstream`, else the first
/// `nameserver` of `/etc/resolv.conf`.
pub fn upstream(policy: &Policy) -> Result<SocketAddr, String> {
    if let Some(u) = policy.network.dns.upstream {
        return Ok(u);
    }
    let conf = std::fs::read_to_string("/etc/resolv.conf")
        .map_err(|e| format!("no `network.dns.upstream` and /etc/resolv.conf: {e}"))?;
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
        .ok_or_else(|| "no `network.dns.upstream` and no nameserver in /etc/resolv.conf".into())
}

/// Most (sandbox, address) -> name pairs remembered for `net.domain`.
const MAX_NAMES: usize = 65536;

/// The names the learned addresses came from, for `net.domain`. Kept past
/// an entry's expiry, so the record of a connect denied after the TTL
/// still names it.
#[derive(Clone, Default)]
pub struct DomainNames {
    inner: Arc<Mutex<HashMap<(u32, IpAddr), String>>>,
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

impl DomainNames {
    pub fn insert(&self, sandbox_id: u32, addr: IpAddr, name: &str) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_NAMES {
            m.clear();
        }
        m.insert((sandbox_id, canonical(addr)), name.to_owned());
    }

    pub fn get(&self, sandbox_id: u32, addr: IpAddr) -> Option<String> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&(sandbox_id, canonical(addr))).cloned()
    }
}

/// What the audit pipeline takes from the resolver.
pub struct DnsFeed {
    pub records: mpsc::UnboundedReceiver<Record>,
    pub names: DomainNames,
}

impl DnsFeed {
    pub fn try_next(&mut self) -> Option<Record> {
        self.records.try_recv().ok()
    }

    /// Sets `net.domain` of a network record whose address a sandbox
    /// learned from a DNS answer.
    pub fn annotate(&self, d: &Decision, rec: &mut Record) {
        if let (Decision::Net { header, daddr, .. }, Some(net)) = (d, rec.net.as_mut())
            && net.domain.is_none()
        {
            net.domain = self.names.get(header.sandbox_id, *daddr);
        }
    }
}

/// The resolver of a `pep-agent run`, between `prepare` and `start`.
pub struct Prepared {
    bound: server::Bound,
}

/// After `Enforcer::load`, before the sandbox entry is written: binds the
/// resolver's sockets, loads the restoring programs and steers the sandbox.
pub fn prepare(enforcer: &mut Enforcer, sandbox_id: u32) -> Result<Prepared, EnforcerError> {
    let bound = server::bind().map_err(|source| EnforcerError::Cgroup {
        path: "DNS resolver sockets on 127.0.0.1/::1".into(),
        source,
    })?;
    kernel::load(enforcer)?;
    kernel::set_steer(enforcer, sandbox_id, bound.port)?;
    Ok(Prepared { bound })
}

/// Attaches (or detaches) the restoring programs to the sandbox cgroup.
pub fn attach(enforcer: &mut Enforcer, cgroup: &Path, op: Op) -> Result<(), EnforcerError> {
    kernel::attach(enforcer, cgroup, op)
}

/// The running resolver.
pub struct DnsService {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub port: u16,
}

impl DnsService {
    /// Stops serving (the sandbox is gone).
    pub fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Once the audit pipeline exists and before the command starts: takes the
/// maps, feeds the records to the pipeline, and serves.
pub fn start(
    prepared: Prepared,
    enforcer: &mut Enforcer,
    cfg: SandboxDns,
    pipeline: &mut Pipeline,
) -> anyhow::Result<DnsService> {
    let maps = Arc::new(Mutex::new(kernel::take_maps(enforcer)?));
    let names = DomainNames::default();
    let (tx, rx) = mpsc::unbounded_channel();
    pipeline.set_dns_feed(DnsFeed {
        records: rx,
        names: names.clone(),
    });
    let port = prepared.bound.port;
    let shared = Arc::new(server::Shared::new(cfg, maps.clone(), names, tx));
    let mut tasks = server::serve(prepared.bound, shared)?;
    // Expired entries: the kernel already ignores them; free the room.
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let n = maps.lock().unwrap_or_else(|e| e.into_inner()).sweep(boot_ns());
            if n > 0 {
                tracing::debug!("DNS: {n} expired addresses removed");
            }
        }
    }));
    Ok(DnsService { tasks, port })
}

/// The resolver settings of a `pep-agent run` sandbox.
pub fn standalone_config(
    policy: &Policy,
    sandbox_id: u32,
    name: &str,
    cgroup: &Path,
    mode: crate::policy::Mode,
    degraded: Option<String>,
) -> Result<SandboxDns, String> {
    let pdp = if policy.network.default == crate::policy::NetDefault::Ask {
        Some(crate::pdp::build_engine(policy)?)
    } else {
        None
    };
    Ok(SandboxDns {
        sandbox_id,
        name: name.to_owned(),
        cgroup: cgroup.to_path_buf(),
        mode,
        policy_revision: policy.revision().to_owned(),
        degraded,
        rules: DomainRules::new(&policy.network.rules),
        default: policy.network.default,
        pdp,
        pdp_budget: crate::pdp::standalone::budget(policy),
        upstream: upstream(policy)?,
        min_ttl_s: policy.network.dns.min_ttl_s,
        max_ttl_s: policy.network.dns.max_ttl_s,
    })
}
