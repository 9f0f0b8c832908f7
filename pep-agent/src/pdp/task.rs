//! The PDP task of `pep-agent run`: reads misses from the kernel's `ASKS`
//! ring buffer, asks the PDP, writes the verdict into `VERDICT_CACHE`, then
//! releases (allow) or destroys (deny) a held connect, and hands one audit
//! record per ask to the audit pipeline.
//!
//! Bounds: each ask is given `budget` (the OPA timeout, retries included,
//! plus a margin; a second for the embedded engines); past it the PDP is
//! unavailable and `on_unavailable` decides. A held connect that never gets
//! an answer (pep-agent killed) fails when the SYN retries the kernel was
//! given run out. Answers given by `on_unavailable` are not cached, so the
//! PDP is asked again once it is back.
//!
//! Records: `source: pdp` (asked now) or `cache` (`on_unavailable: stale`
//! served an expired verdict); `pdp` holds `{engine, decision_id,
//! latency_us, answer, attempt, ...}`. The record's `verdict` is what
//! happened to this attempt in enforce mode: the answer for a held TCP
//! connect; `deny` for a UDP send or connect that missed (it failed with
//! EPERM; the answer, in `pdp.answer`, serves the next attempts).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use pep_common::{
    ask::{ACTION_NET_CONNECT, ASK_ALLOWED_NOW, ASK_DENIED_NOW, ASK_HELD, AskEvent, KIND_ASK, VerdictKey},
    event::{NET_OP_CONNECT, VERDICT_ALLOW},
    net::PROTO_TCP,
};
use serde_json::{Value, json};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{
    Pdp, PdpError,
    cache::{boot_ns, key_addr, net_key},
    kernel::AskMaps,
    query::{Context, Query, Resource, Subject},
    sockdiag,
};
use crate::{
    audit::decode::{Decision, Header, NetOp, Source, Verdict},
    policy::OnUnavailable,
};

/// How a run asks.
#[derive(Clone)]
pub struct AskSettings {
    pub pdp: Arc<dyn Pdp>,
    pub sandbox_name: String,
    pub policy_revision: String,
    /// The kernel-side revision stamp of verdicts written now.
    pub revision: u32,
    pub cache_ttl_s: u64,
    pub on_unavailable: OnUnavailable,
    pub stale_window_s: u64,
    /// Longest wait for one answer.
    pub budget: Duration,
}

/// One audit record produced by the PDP task.
#[derive(Debug, Clone)]
pub struct AskRecord {
    pub decision: Decision,
    pub pdp: Value,
}

/// What cache-hit records need from the PDP task: the `pdp` object of the
/// decision each cached verdict came from.
#[derive(Clone, Default)]
pub struct CacheOrigins {
    inner: Arc<Mutex<HashMap<VerdictKey, Value>>>,
}

/// Most origins remembered (the kernel cache holds 65536 entries; a record
/// for an older one says `pdp: {engine}` only).
const MAX_ORIGINS: usize = 65536;

impl CacheOrigins {
    fn insert(&self, key: VerdictKey, v: Value) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= MAX_ORIGINS {
            m.clear();
        }
        m.insert(key, v);
    }

    /// The `pdp` object of a `source: cache` decision, from the kernel.
    pub fn annotate(&self, d: &Decision, engine: &str) -> Option<Value> {
        let Decision::Net {
            header,
            op,
            protocol,
            daddr,
            dport,
        } = d
        else {
            return None;
        };
        if header.source != Source::Cache {
            return None;
        }
        let op = match op {
            NetOp::Connect => NET_OP_CONNECT,
            NetOp::Send => pep_common::event::NET_OP_SENDMSG,
        };
        let key = net_key(header.sandbox_id, op, *daddr, *dport, *protocol);
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Some(
            m.get(&key)
                .cloned()
                .unwrap_or_else(|| json!({ "engine": engine })),
        )
    }
}

/// The running task's shared state.
struct Shared {
    settings: AskSettings,
    maps: Mutex<AskMaps>,
    origins: CacheOrigins,
    records: mpsc::UnboundedSender<AskRecord>,
    /// (kernel miss, event received) to verdict written, µs, for
    /// `pep-agent` to report.
    verdict_latencies: Mutex<Vec<(u64, u64)>>,
}

/// A handle on the running task.
pub struct AskTask {
    pub join: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub origins: CacheOrigins,
    shared: Arc<Shared>,
}

impl AskTask {
    /// Times to the verdict in the map so far, in µs, from the kernel's
    /// miss (its event timestamp; both on the boot clock) and from the
    /// event's arrival in userspace.
    pub fn verdict_latencies_us(&self) -> Vec<(u64, u64)> {
        self.shared
            .verdict_latencies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Starts the task; it runs until `stop` is set.
pub fn spawn(
    settings: AskSettings,
    maps: AskMaps,
    asks: RingBuf<MapData>,
    records: mpsc::UnboundedSender<AskRecord>,
    origins: CacheOrigins,
    stop: Arc<AtomicBool>,
) -> AskTask {
    let shared = Arc::new(Shared {
        settings,
        maps: Mutex::new(maps),
        origins: origins.clone(),
        records,
        verdict_latencies: Mutex::new(Vec::new()),
    });
    let join = tokio::spawn(run(shared.clone(), asks, stop));
    AskTask {
        join,
        origins,
        shared,
    }
}

async fn run(shared: Arc<Shared>, asks: RingBuf<MapData>, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds
    // it, and it is never swapped for another resource.
    let mut fd = unsafe { AsyncFd::register(asks) }?;
    let mut last_sweep = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        if let Ok(guard) = tokio::time::timeout(Duration::from_millis(50), fd.readable_mut()).await {
            let mut guard = guard?;
            let rb = guard.get_inner_mut();
            while let Some(item) = rb.next() {
                if item.len() < size_of::<AskEvent>() {
                    tracing::error!("short ask event: {} bytes", item.len());
                    continue;
                }
                // SAFETY: length checked; AskEvent is plain old data.
                let ev: AskEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                if ev.header.kind != KIND_ASK {
                    tracing::error!("unexpected event kind {} on the ask ring", ev.header.kind);
                    continue;
                }
                if shared.settings.pdp.engine() == "opa" {
                    // A remote answer takes a round trip: ask concurrently.
                    tokio::spawn(handle(shared.clone(), ev));
                } else {
                    // The embedded engines answer in microseconds: answering
                    // right here saves a task switch per miss.
                    handle(shared.clone(), ev).await;
                }
            }
            guard.clear_ready();
        }
        if last_sweep.elapsed() > Duration::from_secs(1) {
            last_sweep = Instant::now();
            sweep_pending(&shared);
        }
    }
    Ok(())
}

/// Removes `PENDING` entries of connects that never reached the SYN (the
/// connect failed before it, so no event and no close callback came).
fn sweep_pending(shared: &Shared) {
    let now = boot_ns();
    let mut maps = shared.maps.lock().unwrap_or_else(|e| e.into_inner());
    let stale: Vec<u64> = maps
        .pending
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, ev)| ev.sent == 0 && now.saturating_sub(ev.header.ts_boot_ns) > 10_000_000_000)
        .map(|(cookie, _)| cookie)
        .collect();
    for cookie in stale {
        let _ = maps.pending.remove(&cookie);
    }
}

/// What was decided for one ask.
struct Outcome {
    allow: bool,
    source: Source,
    pdp: Value,
    /// Cache it for this long.
    cache_ttl_s: Option<u64>,
}

async fn handle(shared: Arc<Shared>, ev: AskEvent) {
    let received_ns = boot_ns();
    let s = &shared.settings;
    let Some(daddr) = key_addr(&ev.key) else {
        tracing::error!("ask event with family {}", ev.key.family);
        return;
    };
    let header = match Header::try_from(&ev.header) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("bad ask event header: {e}");
            return;
        }
    };
    let dport = ev.key.dport as u16;
    let protocol = ev.key.protocol as u8;
    let action = if ev.key.action == ACTION_NET_CONNECT {
        "net.connect"
    } else {
        "net.send"
    };
    let query = Query {
        subject: Subject {
            sandbox: s.sandbox_name.clone(),
            pid: header.pid,
            uid: header.uid,
            comm: header.comm.clone(),
            exe: crate::audit::record::read_exe(header.pid),
            labels: Default::default(),
        },
        action: action.into(),
        resource: Resource::net(daddr, dport, protocol),
        context: Context::now(&s.policy_revision),
    };
    let input = query.to_input();
    let started = Instant::now();
    let result = match tokio::time::timeout(s.budget, s.pdp.decide(&input)).await {
        Ok(r) => r,
        Err(_) => Err(PdpError::Timeout(s.budget)),
    };
    let latency_us = started.elapsed().as_micros() as u64;
    let engine = s.pdp.engine();
    let out = match result {
        Ok(d) => {
            let a = &d.answer;
            let mut pdp = json!({
                "engine": engine,
                "decision_id": d.decision_id,
                "latency_us": latency_us,
            });
            if let Some(r) = &a.reason {
                pdp["reason"] = json!(r);
            }
            if let Some(t) = a.ttl_s {
                pdp["ttl_s"] = json!(t);
            }
            if let Some(e) = &a.error {
                pdp["error"] = json!(e);
            }
            Outcome {
                allow: a.allow,
                source: Source::Pdp,
                pdp,
                cache_ttl_s: Some(a.ttl_s.unwrap_or(s.cache_ttl_s)),
            }
        }
        Err(e) => unavailable(&shared, &ev.key, engine, latency_us, &e),
    };

    // The verdict goes into the cache before the connect is released, so
    // the retransmitted SYN, and every later connect, sees it.
    {
        let mut maps = shared.maps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ttl) = out.cache_ttl_s.filter(|t| *t > 0) {
            if let Err(e) = maps.put(&ev.key, out.allow, s.revision, ttl) {
                tracing::error!("writing the verdict cache: {e}");
            }
            let mut origin = json!({"engine": engine, "latency_us": latency_us});
            origin["decision_id"] = out.pdp["decision_id"].clone();
            shared.origins.insert(ev.key, origin);
        }
        if ev.disposition == ASK_HELD {
            release_or_destroy(&mut maps, &ev, out.allow, daddr);
        }
    }
    let written_ns = boot_ns();
    shared
        .verdict_latencies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((
            written_ns.saturating_sub(ev.header.ts_boot_ns) / 1000,
            written_ns.saturating_sub(received_ns) / 1000,
        ));

    let is_tcp_connect = ev.key.action == ACTION_NET_CONNECT && ev.key.protocol == u32::from(PROTO_TCP);
    let (verdict, attempt) = match ev.disposition {
        ASK_HELD => (out.allow, "held"),
        ASK_DENIED_NOW => (false, "denied while asking"),
        ASK_ALLOWED_NOW => (out.allow && is_tcp_connect, "allowed (audit mode) while asking"),
        _ => (false, "unknown"),
    };
    let mut pdp = out.pdp;
    pdp["answer"] = json!(if out.allow { "allow" } else { "deny" });
    pdp["attempt"] = json!(attempt);
    let mut header = header;
    header.source = out.source;
    header.verdict = if verdict { Verdict::Allow } else { Verdict::Deny };
    let decision = Decision::Net {
        header,
        op: if ev.key.action == ACTION_NET_CONNECT {
            NetOp::Connect
        } else {
            NetOp::Send
        },
        protocol,
        daddr,
        dport,
    };
    let _ = shared.records.send(AskRecord { decision, pdp });
}

/// `on_unavailable`.
fn unavailable(shared: &Shared, key: &VerdictKey, engine: &str, latency_us: u64, e: &PdpError) -> Outcome {
    let s = &shared.settings;
    let mut pdp = json!({
        "engine": engine,
        "decision_id": null,
        "latency_us": latency_us,
        "error": e.to_string(),
    });
    let (allow, source) = match s.on_unavailable {
        OnUnavailable::Deny => (false, Source::Pdp),
        OnUnavailable::Allow => (true, Source::Pdp),
        OnUnavailable::Stale => {
            let maps = shared.maps.lock().unwrap_or_else(|e| e.into_inner());
            let window = s.stale_window_s.saturating_mul(1_000_000_000);
            match maps.get(key) {
                Some(entry) if entry.expires_ns.saturating_add(window) >= boot_ns() => {
                    pdp["stale"] = json!(true);
                    (entry.verdict == VERDICT_ALLOW, Source::Cache)
                }
                _ => (false, Source::Pdp),
            }
        }
    };
    pdp["on_unavailable"] = json!(match s.on_unavailable {
        OnUnavailable::Deny => "deny",
        OnUnavailable::Allow => "allow",
        OnUnavailable::Stale => "stale",
    });
    Outcome {
        allow,
        source,
        pdp,
        cache_ttl_s: None,
    }
}

/// Allow: clear the pending mark, so the next SYN retransmit leaves.
/// Deny: abort the socket (ECONNABORTED). If that fails for any reason but
/// the socket being gone, the mark stays: the SYN never leaves and the
/// connect times out (fail closed).
fn release_or_destroy(maps: &mut AskMaps, ev: &AskEvent, allow: bool, daddr: std::net::IpAddr) {
    if allow {
        let _ = maps.pending.remove(&ev.cookie);
        return;
    }
    let family = ev.sock_family as u8;
    let local = match i32::from(family) {
        libc::AF_INET => std::net::IpAddr::from([ev.saddr[0], ev.saddr[1], ev.saddr[2], ev.saddr[3]]),
        _ => std::net::IpAddr::from(ev.saddr),
    };
    let t = sockdiag::Tcp4Tuple {
        family,
        local,
        sport: ev.sport as u16,
        remote: daddr,
        dport: ev.key.dport as u16,
        cookie: ev.cookie,
    };
    match sockdiag::destroy(&t) {
        Ok(()) => {
            let _ = maps.pending.remove(&ev.cookie);
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            let _ = maps.pending.remove(&ev.cookie);
        }
        Err(e) => tracing::error!("SOCK_DESTROY {t:?}: {e} (the connect will time out)"),
    }
}

/// What the audit pipeline takes from the PDP task.
pub struct PdpFeed {
    pub records: mpsc::UnboundedReceiver<AskRecord>,
    pub origins: CacheOrigins,
    pub engine: &'static str,
}

impl PdpFeed {
    pub fn try_next(&mut self) -> Option<AskRecord> {
        self.records.try_recv().ok()
    }

    /// The `pdp` object of a `source: cache` decision (`None` otherwise).
    pub fn annotate(&self, d: &Decision) -> Option<Value> {
        self.origins.annotate(d, self.engine)
    }
}
