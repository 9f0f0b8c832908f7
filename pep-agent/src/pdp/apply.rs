//! One miss, from its decoding to its record: the query asked about it
//! (`Ask`), and what is done with the answer (`finish`): the verdict cached,
//! a held connect released or destroyed, `on_unavailable` when the PDP gave
//! no answer, and the audit record handed to the pipeline.

use std::{sync::Arc, time::Duration};

use pep_common::{
    ask::{
        ACTION_NET_CONNECT, APPLIED_PDP_LEN, ASK_ALLOWED_NOW, ASK_DENIED_NOW, ASK_HELD, AppliedAnswer,
        AppliedKey, AskEvent, VerdictKey,
    },
    event::{VERDICT_ALLOW, VERDICT_DENY},
    net::PROTO_TCP,
};
use serde_json::{Value, json};

use super::{
    PdpDecision, PdpError,
    cache::{boot_ns, key_addr},
    kernel::AskMaps,
    miss::{Miss, decode_exec},
    origins::{Origin, OriginKey},
    query::{Context, Query, Resource, Subject},
    sockdiag,
    task::{AskRecord, AskSettings, AskTiming, Shared},
};
use crate::{
    audit::decode::{Decision, ExecOp, Header, NetOp, Source, Verdict},
    audit::exe::{Acting, ExeCache},
    policy::OnUnavailable,
};

/// What was decided for one ask.
struct Outcome {
    allow: bool,
    source: Source,
    pdp: Value,
    /// Cache it for this long.
    cache_ttl_s: Option<u64>,
}

/// What a miss was about, beyond its cache key.
pub(super) enum Target {
    /// A connect or send to `daddr`.
    Net {
        ev: Box<AskEvent>,
        daddr: std::net::IpAddr,
    },
    /// An exec of `path`.
    Exec { path: String, argv: Vec<String> },
}

/// A miss decoded: everything but the query.
pub(super) struct Parts {
    pub(super) key: VerdictKey,
    /// `ASK_*`.
    pub(super) disposition: u32,
    /// The kernel's miss, on the boot clock.
    pub(super) ts_boot_ns: u64,
    pub(super) header: Header,
    pub(super) target: Target,
}

impl Parts {
    /// The parts, and the query's action and resource.
    pub(super) fn of(miss: Miss) -> Option<(Self, &'static str, Resource)> {
        let (key, disposition, ts_boot_ns, header, target, action, resource) = match miss {
            Miss::Net(ev) => {
                let Some(daddr) = key_addr(&ev.key) else {
                    tracing::error!("ask event with family {}", ev.key.family);
                    return None;
                };
                let header = match Header::try_from(&ev.header) {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::error!("bad ask event header: {e}");
                        return None;
                    }
                };
                let action = if ev.key.action == ACTION_NET_CONNECT {
                    "net.connect"
                } else {
                    "net.send"
                };
                let resource = Resource::net(daddr, ev.key.dport as u16, ev.key.protocol as u8);
                let (key, disposition, ts) = (ev.key, ev.disposition, ev.header.ts_boot_ns);
                let target = Target::Net { ev, daddr };
                (key, disposition, ts, header, target, action, resource)
            }
            Miss::Exec(ev) => {
                let (header, path, argv) = decode_exec(&ev.exec)?;
                let resource = Resource::Exec { path: path.clone() };
                let target = Target::Exec { path, argv };
                let ts = ev.exec.header.ts_boot_ns;
                (ev.key, ev.disposition, ts, header, target, "exec", resource)
            }
        };
        Some((
            Self {
                key,
                disposition,
                ts_boot_ns,
                header,
                target,
            },
            action,
            resource,
        ))
    }
}

/// One miss being asked about.
pub(super) struct Ask {
    /// As they were when the miss was read.
    pub(super) settings: Arc<AskSettings>,
    parts: Parts,
    pub(super) query: Query,
    received_ns: u64,
    /// `ASK_APPLIED`'s key for it.
    applied_key: AppliedKey,
    /// For `Acks::written` (host daemon).
    pub(super) token: Option<u64>,
}

impl Ask {
    /// The query for a miss. The executable is named from `exes` by the
    /// image the kernel saw (`ExeCache`): `/proc` is read once per image.
    pub(super) fn new(
        s: Arc<AskSettings>,
        miss: Miss,
        received_ns: u64,
        exes: &mut ExeCache,
    ) -> Option<Self> {
        let applied_key = miss.applied_key();
        let (parts, action, resource) = Parts::of(miss)?;
        let header = &parts.header;
        let exe = exes.name(Acting {
            pid: header.pid,
            start_ns: header.start_ns,
            ppid: header.ppid,
            image: &header.exe,
        });
        let context = Context::now(&s.policy_revision);
        let query = Query {
            subject: Subject {
                sandbox: s.sandbox_name.clone(),
                pid: header.pid,
                uid: header.uid,
                comm: header.comm.clone(),
                exe,
                labels: Default::default(),
            },
            action: action.into(),
            resource,
            context,
        };
        Some(Self {
            settings: s,
            parts,
            query,
            received_ns,
            applied_key,
            token: None,
        })
    }

    /// Its verdict-cache key.
    pub(super) fn key(&self) -> VerdictKey {
        self.parts.key
    }

    /// The held socket's cookie (0 when nothing is held).
    pub(super) fn cookie(&self) -> u64 {
        match &self.parts.target {
            Target::Net { ev, .. } => ev.cookie,
            Target::Exec { .. } => 0,
        }
    }

    /// What the cached verdict is remembered by for `source: cache` records.
    fn origin_key(&self) -> OriginKey {
        let key = self.parts.key;
        match &self.parts.target {
            Target::Net { .. } => OriginKey::Net(key),
            Target::Exec { path, .. } => OriginKey::Exec(key.sandbox_id, path.clone()),
        }
    }
}

/// Writes the verdict (cache first, then the held connect's release or
/// destruction), then hands the ask's record to the audit pipeline.
pub(super) fn finish(
    shared: &Shared,
    ask: Ask,
    result: Result<PdpDecision, PdpError>,
    took: Duration,
    query_ns: u64,
) {
    let engine_done_ns = boot_ns();
    let origin_key = ask.origin_key();
    let Ask {
        settings: s,
        parts:
            Parts {
                key,
                disposition,
                ts_boot_ns,
                header,
                target,
            },
        received_ns,
        applied_key,
        token,
        ..
    } = ask;
    let latency_us = took.as_micros() as u64;
    let engine = s.pdp.engine();
    // What happens first; the record's `pdp` object is built once the
    // verdict is in place.
    let (out, answered) = match result {
        Ok(d) => (
            Outcome {
                allow: d.answer.allow,
                source: Source::Pdp,
                pdp: Value::Null,
                cache_ttl_s: Some(d.answer.ttl_s.unwrap_or(s.cache_ttl_s)),
            },
            Some(d),
        ),
        Err(e) => (unavailable(shared, &s, &key, engine, latency_us, &e), None),
    };
    let cache_ttl = out.cache_ttl_s.filter(|t| *t > 0);
    if cache_ttl.is_some() {
        // Known before the verdict can be hit, so a hit's record can name it.
        shared.origins.insert(
            origin_key,
            Origin {
                engine,
                decision_id: answered.as_ref().and_then(|d| d.decision_id.clone()),
                latency_us,
            },
        );
    }
    let is_tcp_connect = key.action == ACTION_NET_CONNECT && key.protocol == u32::from(PROTO_TCP);
    // The record: what happened to the attempt, and the `pdp` object.
    let record = |ended: bool| -> (bool, Value) {
        let (verdict, attempt) = match disposition {
            ASK_HELD if ended => (false, "held, ended before the answer"),
            ASK_HELD => (out.allow, "held"),
            ASK_DENIED_NOW => (false, "denied while asking"),
            ASK_ALLOWED_NOW => (out.allow && is_tcp_connect, "allowed (audit mode) while asking"),
            _ => (false, "unknown"),
        };
        let mut pdp = match &answered {
            Some(d) => answered_pdp(engine, d, latency_us),
            None => out.pdp.clone(),
        };
        pdp["answer"] = json!(if out.allow { "allow" } else { "deny" });
        pdp["attempt"] = json!(attempt);
        if disposition == ASK_HELD {
            // How long the connect had waited: an answer after its last SYN
            // retry (about 1 s) comes too late to let it through.
            pdp["held_ms"] = json!(boot_ns().saturating_sub(ts_boot_ns) / 1_000_000);
        }
        (verdict, pdp)
    };
    // The verdict goes into the cache before the connect is released, so
    // the retransmitted SYN, and every later connect, sees it.
    let (ended, early) = {
        let mut maps = shared.maps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ttl) = cache_ttl
            && let Err(e) = maps.put(&key, out.allow, s.revision, ttl)
        {
            tracing::error!("writing the verdict cache: {e}");
        }
        // Its mark goes when the socket closes: a held connect without one
        // gave up (its SYN retries ran out, say while no daemon ran) or was
        // closed before this answer.
        let held = match &target {
            Target::Net { ev, daddr } if disposition == ASK_HELD => Some((ev, *daddr)),
            _ => None,
        };
        // The host daemon keeps the record before anything is applied:
        // killed before writing it, the next daemon writes it from this,
        // so it looks the mark up first. A run learns it from the release
        // itself: one system call fewer before the answer is in force.
        let gone_before =
            shared.acks.is_some() && held.is_some_and(|(ev, _)| maps.pending.get(&ev.cookie, 0).is_err());
        let early = shared.acks.as_ref().map(|a| {
            let (verdict, pdp) = record(gone_before);
            if let Err(e) = a.applied(applied_key, &applied_answer(verdict, &pdp)) {
                tracing::error!("keeping an applied answer: {e}");
            }
            (verdict, pdp)
        });
        let ended = match held {
            Some((ev, daddr)) if !gone_before => {
                release_or_destroy(&mut maps, ev, out.allow, daddr) == Hold::Gone
            }
            _ => gone_before,
        };
        drop(maps);
        (ended, early)
    };
    // The answer is in force: the rest is the record.
    let written_ns = boot_ns();
    let (verdict, pdp) = early.unwrap_or_else(|| record(ended));
    let in_kernel = match &target {
        Target::Net { ev, .. } if disposition == ASK_HELD => u64::from(ev.sent),
        _ => 0,
    };
    shared
        .timings
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(AskTiming {
            to_receipt: received_ns.saturating_sub(ts_boot_ns),
            in_kernel,
            query: query_ns.saturating_sub(received_ns),
            engine: engine_done_ns.saturating_sub(query_ns),
            to_map: written_ns.saturating_sub(engine_done_ns),
        });
    let decision = decision_of(header, out.source, verdict, &key, target);
    send(shared, AskRecord { decision, pdp, token });
}

/// The decision a record is built from.
pub(super) fn decision_of(
    mut header: Header,
    source: Source,
    verdict: bool,
    key: &VerdictKey,
    target: Target,
) -> Decision {
    header.source = source;
    header.verdict = if verdict { Verdict::Allow } else { Verdict::Deny };
    match target {
        Target::Net { daddr, .. } => Decision::Net {
            header,
            op: if key.action == ACTION_NET_CONNECT {
                NetOp::Connect
            } else {
                NetOp::Send
            },
            protocol: key.protocol as u8,
            daddr,
            dport: key.dport as u16,
        },
        Target::Exec { path, argv } => Decision::Exec {
            header,
            op: ExecOp::Exec,
            path: Some(path),
            argv,
        },
    }
}

/// Hands a record to the audit pipeline (and wakes the daemon's).
pub(super) fn send(shared: &Shared, rec: AskRecord) {
    let _ = shared.records.send(rec);
    if let Some(w) = &shared.wake {
        w.notify_one();
    }
}

/// What `ASK_APPLIED` keeps of a record: its verdict and its `pdp` object
/// (a longer object than fits loses its `reason`, then all but its answer).
fn applied_answer(verdict: bool, pdp: &Value) -> AppliedAnswer {
    let mut out = AppliedAnswer {
        verdict: if verdict { VERDICT_ALLOW } else { VERDICT_DENY },
        len: 0,
        pdp: [0; APPLIED_PDP_LEN],
    };
    let mut text = pdp.to_string();
    if text.len() > APPLIED_PDP_LEN {
        let mut short = pdp.clone();
        if let Some(o) = short.as_object_mut() {
            o.remove("reason");
            o.remove("error");
        }
        text = short.to_string();
    }
    if text.len() > APPLIED_PDP_LEN {
        text =
            json!({"answer": pdp["answer"], "attempt": pdp["attempt"], "engine": pdp["engine"]}).to_string();
    }
    let n = text.len().min(APPLIED_PDP_LEN);
    out.pdp[..n].copy_from_slice(&text.as_bytes()[..n]);
    out.len = n as u32;
    out
}

/// The record's `pdp` object for an answer.
fn answered_pdp(engine: &str, d: &PdpDecision, latency_us: u64) -> Value {
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
    pdp
}

/// `on_unavailable`.
fn unavailable(
    shared: &Shared,
    s: &AskSettings,
    key: &VerdictKey,
    engine: &str,
    latency_us: u64,
    e: &PdpError,
) -> Outcome {
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
                // Only a verdict of the PDP in force: one given before a
                // reload that changed it is no verdict at all.
                Some(entry)
                    if entry.revision == s.revision
                        && entry.expires_ns.saturating_add(window) >= boot_ns() =>
                {
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

/// What `release_or_destroy` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hold {
    /// The connect was held, and the answer is applied to it (or, for a
    /// deny that could not be applied, it stays held until it times out).
    Applied,
    /// Nothing was held any more: the socket had closed (or timed out)
    /// before the answer.
    Gone,
}

/// Allow: clear the pending mark, so the next SYN retransmit leaves.
/// Deny: abort the socket (ECONNABORTED). If that fails for any reason but
/// the socket being gone, the mark stays: the SYN never leaves and the
/// connect times out (fail closed).
pub(super) fn release_or_destroy(
    maps: &mut AskMaps,
    ev: &AskEvent,
    allow: bool,
    daddr: std::net::IpAddr,
) -> Hold {
    if allow {
        return match maps.pending.remove(&ev.cookie) {
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Hold::Gone
            }
            _ => Hold::Applied,
        };
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
            Hold::Applied
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            let _ = maps.pending.remove(&ev.cookie);
            Hold::Gone
        }
        Err(e) => {
            tracing::error!("SOCK_DESTROY {t:?}: {e} (the connect will time out)");
            Hold::Applied
        }
    }
}
