//! The PDP task of `pep-agent run` and of the host daemon: reads misses from the kernel's `ASKS`
//! ring buffer, asks the PDP, writes the verdict into `VERDICT_CACHE`, then
//! releases (allow) or destroys (deny) a held connect, and hands one audit
//! record per ask to the audit pipeline.
//!
//! Latency: the misses are read by a real-time thread of their own that
//! blocks on the ring buffer; an embedded engine decides right there on the
//! query struct (`Pdp::decide_now`), so a verdict is in the map without a
//! thread hop or a JSON document; a remote one is asked on tokio. Each ask
//! is timed by stage (`AskTiming`).
//!
//! Many sandboxes: each asks with its own settings (engine, TTL,
//! `on_unavailable`), found by the miss's sandbox id; `pep-agent run` has
//! one, the host daemon one per asking sandbox generation (`AskTask::serve`,
//! `AskTask::retain`). A miss of a sandbox id without settings (its
//! generation just retired) is denied: fail closed.
//!
//! Reload: `AskTask::reload` swaps the engine and bumps the verdict cache's
//! revision stamp when the PDP's answers may have changed (`revision`).
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
//! connect; `deny` for a UDP send or connect, or an exec, that missed (it
//! failed with EPERM; the answer, in `pdp.answer`, serves the next
//! attempts). An exec miss arrives as the exec record the kernel would have
//! written (`ExecAskEvent`), and its record is an exec record.

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use pep_common::ask::{APPLIED_PDP_LEN, AppliedAnswer, AppliedKey};
use pep_common::{
    ask::{ACTION_NET_CONNECT, ASK_ALLOWED_NOW, ASK_DENIED_NOW, ASK_HELD, AskEvent, AskSandbox, VerdictKey},
    event::{VERDICT_ALLOW, VERDICT_DENY},
    net::PROTO_TCP,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    Pdp, PdpDecision, PdpError,
    acks::Acks,
    cache::{boot_ns, key_addr},
    kernel::AskMaps,
    miss::{Miss, decode_exec},
    origins::{Origin, OriginKey},
    query::{Context, Query, Resource, Subject},
    sockdiag,
    warm::{Streak, WARM_EVERY_MS, boost_priority, thread_cpu_ns, warm_up},
};
use crate::{
    audit::decode::{Decision, ExecOp, Header, NetOp, Source, Verdict},
    audit::exe::{Acting, ExeCache},
    audit::ring::CommitRing,
    policy::OnUnavailable,
};

/// How a run asks.
#[derive(Clone)]
pub struct AskSettings {
    pub pdp: Arc<dyn Pdp>,
    pub sandbox_id: u32,
    pub sandbox_name: String,
    pub policy_revision: String,
    /// What the PDP's answers depend on (`super::revision::fingerprint`): a
    /// reload that changes it bumps `revision`.
    pub fingerprint: String,
    /// The kernel-side revision stamp of verdicts written now; set by the
    /// task on reload.
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
    /// For `Acks::written`, once the record is in the log (host daemon).
    pub token: Option<u64>,
}

pub use super::origins::CacheOrigins;

/// The running task's shared state.
pub(super) struct Shared {
    /// By sandbox id. Each is replaced whole on reload; an ask works with
    /// the snapshot it started with, so a verdict is stamped with the
    /// revision of the engine that gave it.
    settings: RwLock<HashMap<u32, Arc<AskSettings>>>,
    maps: Mutex<AskMaps>,
    origins: CacheOrigins,
    records: mpsc::UnboundedSender<AskRecord>,
    timings: Mutex<Vec<AskTiming>>,
    /// Keep-warm decisions made (`keep_warm`), and the thread CPU time they
    /// took, in ns.
    warmed: AtomicU64,
    warm_cpu_ns: AtomicU64,
    /// The thread reads no miss until this is set (`AskTask::resume`).
    reading: AtomicBool,
    /// Told of every record sent, so that the daemon writes it at once
    /// rather than at its next ring-buffer wakeup.
    wake: Option<Arc<tokio::sync::Notify>>,
    /// The host daemon's: misses are given back to the ring only once
    /// their records are written (`pdp::acks`).
    pub(super) acks: Option<Arc<Acks>>,
}

/// Where the time of one ask went, in ns, each stage from the end of the
/// previous one: the kernel's miss (its event timestamp; both ends on the
/// boot clock) to the event's receipt in userspace, building the query,
/// the engine, and writing the verdict into the map (and releasing or
/// destroying a held connect).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AskTiming {
    pub to_receipt: u64,
    pub query: u64,
    pub engine: u64,
    pub to_map: u64,
}

impl AskTiming {
    /// Kernel miss to verdict in the map.
    pub fn total(&self) -> u64 {
        self.to_receipt + self.query + self.engine + self.to_map
    }
}

/// A handle on the running task.
pub struct AskTask {
    pub join: std::thread::JoinHandle<()>,
    pub origins: CacheOrigins,
    shared: Arc<Shared>,
}

impl AskTask {
    /// Swaps in `new` (a reloaded policy's engine and settings). If its
    /// fingerprint differs from the running one, the revision is bumped,
    /// in the task first (verdicts decided from now on carry the new stamp)
    /// and then in the kernel: from then on every verdict cached under an
    /// older revision is a miss, counted as one, and asked again; entries
    /// are not removed (the LRU recycles them). An unchanged fingerprint
    /// keeps every cached verdict. Returns the revision now in force.
    pub fn reload(&self, new: AskSettings) -> Result<u32, aya::maps::MapError> {
        let revision = {
            let mut all = self.shared.settings.write().unwrap_or_else(|e| e.into_inner());
            let sandbox_id = new.sandbox_id;
            let (cur_fp, cur_rev) = all
                .get(&sandbox_id)
                .map_or((None, 0), |c| (Some(c.fingerprint.clone()), c.revision));
            let mut new = new;
            new.revision = if cur_fp.as_deref() == Some(new.fingerprint.as_str()) {
                cur_rev
            } else {
                // Never 0: a zeroed entry must not match.
                cur_rev.wrapping_add(1).max(1)
            };
            let bumped = new.revision != cur_rev;
            let revision = new.revision;
            self.shared.origins.set_engine(sandbox_id, new.pdp.engine());
            all.insert(sandbox_id, Arc::new(new));
            if !bumped {
                return Ok(revision);
            }
            let mut maps = self.shared.maps.lock().unwrap_or_else(|e| e.into_inner());
            let mut cfg = maps.sandboxes.get(&sandbox_id, 0)?;
            cfg.revision = revision;
            maps.sandboxes.insert(sandbox_id, cfg, 0)?;
            revision
        };
        tracing::info!("pdp: reloaded; verdict cache revision {revision}");
        Ok(revision)
    }

    /// Starts asking for sandbox `settings.sandbox_id` about `flags`
    /// (`ASK_FLAG_*`): its settings first, then its `ASK_SANDBOXES` entry,
    /// from which on its misses are held and asked. The revision stamp is
    /// the one its kernel entry has (a restarted daemon keeps every cached
    /// verdict) or 1. With `carry_from`, the generation this one replaces:
    /// if the PDP's answers cannot have changed (same fingerprint), its
    /// live cached verdicts are copied to this generation, so that a reload
    /// which changes nothing the PDP answers from asks nothing again.
    /// Returns the revision and how many verdicts were carried over.
    pub fn serve(
        &self,
        settings: AskSettings,
        flags: u32,
        syncnt: u32,
        carry_from: Option<u32>,
    ) -> Result<(u32, usize), aya::maps::MapError> {
        let id = settings.sandbox_id;
        let mut all = self.shared.settings.write().unwrap_or_else(|e| e.into_inner());
        let mut maps = self.shared.maps.lock().unwrap_or_else(|e| e.into_inner());
        let kernel = maps.sandboxes.get(&id, 0).ok();
        let revision = kernel.map_or(1, |k| k.revision.max(1));
        let mut settings = settings;
        settings.revision = revision;
        let carried = match carry_from.and_then(|old| all.get(&old).map(|s| (old, s.clone()))) {
            Some((old, prev)) if prev.fingerprint == settings.fingerprint => {
                let n = maps.carry(old, prev.revision, id, revision);
                self.shared.origins.carry(old, id);
                n
            }
            _ => 0,
        };
        self.shared.origins.set_engine(id, settings.pdp.engine());
        all.insert(id, Arc::new(settings));
        maps.sandboxes.insert(
            id,
            AskSandbox {
                revision,
                flags,
                syncnt,
                _pad: 0,
            },
            0,
        )?;
        Ok((revision, carried))
    }

    /// Stops asking for every sandbox id not in `live`: their kernel
    /// entries go first (their misses fall back to the sandbox default),
    /// then their settings. Returns how many went.
    pub fn retain(&self, live: &HashSet<u32>) -> usize {
        let mut maps = self.shared.maps.lock().unwrap_or_else(|e| e.into_inner());
        let dead: Vec<u32> = maps
            .sandboxes
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !live.contains(id))
            .collect();
        for id in &dead {
            let _ = maps.sandboxes.remove(id);
        }
        drop(maps);
        let mut all = self.shared.settings.write().unwrap_or_else(|e| e.into_inner());
        let before = all.len();
        all.retain(|id, _| live.contains(id));
        dead.len().max(before - all.len())
    }

    /// The sandbox ids asking now.
    pub fn serving(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .shared
            .settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }

    /// What the audit task hands written records' tokens back to (host
    /// daemon).
    pub fn acks(&self) -> Option<Arc<Acks>> {
        self.shared.acks.clone()
    }

    /// Lets a paused task (`spawn_paused`) read misses.
    pub fn resume(&self) {
        self.shared.reading.store(true, Ordering::SeqCst);
        self.join.thread().unpark();
    }

    /// Asks no longer: the thread ends within `POLL_MS`.
    pub fn stop(self, stop: &AtomicBool) {
        stop.store(true, Ordering::SeqCst);
        self.join.thread().unpark();
        let _ = self.join.join();
    }

    /// The revision stamp verdicts are written with now.
    /// (Of the first sandbox: `pep-agent run` has one.)
    pub fn revision(&self) -> u32 {
        self.shared
            .settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .next()
            .map_or(0, |s| s.revision)
    }

    /// Keep-warm decisions made so far, and the CPU time they took (ns).
    pub fn keep_warm_cost(&self) -> (u64, u64) {
        (
            self.shared.warmed.load(Ordering::Relaxed),
            self.shared.warm_cpu_ns.load(Ordering::Relaxed),
        )
    }

    /// The timings of the asks answered so far.
    pub fn timings(&self) -> Vec<AskTiming> {
        self.shared
            .timings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Starts the task; it runs until `stop` is set. Misses are read on a
/// thread of their own that blocks on the ring buffer: an embedded engine
/// decides right there (the verdict is in the map before anything else is
/// scheduled); a remote one is asked concurrently on the caller's tokio
/// runtime.
pub fn spawn(
    settings: Option<AskSettings>,
    mut maps: AskMaps,
    asks: CommitRing,
    records: mpsc::UnboundedSender<AskRecord>,
    origins: CacheOrigins,
    stop: Arc<AtomicBool>,
) -> std::io::Result<AskTask> {
    // The ring dies with the run: each miss is given back as it is read.
    maps.applied = None;
    spawn_inner(settings, maps, asks, (records, None), origins, stop, false)
}

/// `spawn`, but the thread reads no miss until `AskTask::resume`: the host
/// daemon first serves every sandbox it adopts, so that the misses the
/// kernel queued while no daemon ran find their settings.
/// Each record sent is announced on `wake`, and its miss given back to the
/// ring only once the audit task has written it (`AskTask::acks`).
pub fn spawn_paused(
    maps: AskMaps,
    asks: CommitRing,
    records: mpsc::UnboundedSender<AskRecord>,
    wake: Arc<tokio::sync::Notify>,
    origins: CacheOrigins,
    stop: Arc<AtomicBool>,
) -> std::io::Result<AskTask> {
    spawn_inner(None, maps, asks, (records, Some(wake)), origins, stop, true)
}

fn spawn_inner(
    settings: Option<AskSettings>,
    mut maps: AskMaps,
    asks: CommitRing,
    (records, wake): (mpsc::UnboundedSender<AskRecord>, Option<Arc<tokio::sync::Notify>>),
    origins: CacheOrigins,
    stop: Arc<AtomicBool>,
    paused: bool,
) -> std::io::Result<AskTask> {
    let mut all = HashMap::new();
    if let Some(s) = settings {
        origins.set_engine(s.sandbox_id, s.pdp.engine());
        all.insert(s.sandbox_id, Arc::new(s));
    }
    let acks = maps
        .applied
        .take()
        .map(|applied| Arc::new(Acks::new(asks.committer(), applied)));
    let shared = Arc::new(Shared {
        settings: RwLock::new(all),
        maps: Mutex::new(maps),
        origins: origins.clone(),
        records,
        timings: Mutex::new(Vec::new()),
        warmed: AtomicU64::new(0),
        warm_cpu_ns: AtomicU64::new(0),
        reading: AtomicBool::new(!paused),
        wake,
        acks,
    });
    let rt = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
    let s = shared.clone();
    let join = std::thread::Builder::new()
        .name("pep-pdp-asks".into())
        .spawn(move || read_asks(&s, asks, &stop, &rt))?;
    Ok(AskTask {
        join,
        origins,
        shared,
    })
}

impl Shared {
    fn settings_of(&self, sandbox_id: u32) -> Option<Arc<AskSettings>> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sandbox_id)
            .cloned()
    }

    fn any_settings(&self) -> Option<Arc<AskSettings>> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .next()
            .cloned()
    }
}

/// How long a wait for misses lasts before `stop` is looked at again.
const POLL_MS: i32 = 50;

fn read_asks(shared: &Arc<Shared>, mut asks: CommitRing, stop: &AtomicBool, rt: &tokio::runtime::Handle) {
    while !shared.reading.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
        std::thread::park_timeout(Duration::from_millis(POLL_MS as u64));
    }
    boost_priority();
    if let Some(s) = shared.any_settings() {
        warm_up(&s);
    }
    let fd = asks.as_raw_fd();
    let mut last_sweep = Instant::now();
    let mut exes = ExeCache::default();
    // The misses decided by an embedded engine, and the sandbox of the
    // last one (what the keep-warm decides for).
    let mut streak = Streak::default();
    let mut last_asked: Option<Arc<AskSettings>> = None;
    while !stop.load(Ordering::SeqCst) {
        let warming = streak.warming(Instant::now());
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // Misses already there are read without waiting: a wakeup may not
        // come for them (the kernel wakes a reader for a record submitted
        // at the consumer position, which the daemon moves behind reading).
        let timeout = if asks.has_unread() {
            0
        } else if warming {
            WARM_EVERY_MS
        } else {
            POLL_MS
        };
        let cpu = thread_cpu_ns();
        // SAFETY: one valid pollfd; the ring buffer keeps its fd open.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if rc == 0
            && warming
            && let Some(s) = &last_asked
        {
            keep_warm(shared, s, cpu);
        }
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            tracing::error!("poll on the ask ring: {}", std::io::Error::last_os_error());
            std::thread::sleep(Duration::from_millis(POLL_MS as u64));
        }
        loop {
            let (miss, end) = {
                let Some(item) = asks.next_record() else { break };
                (Miss::read(item), asks.position())
            };
            let received_ns = boot_ns();
            // What the record will hand back (the daemon), or the miss is
            // given back now (a run).
            let token = match &shared.acks {
                Some(a) => Some(a.read(end, miss.as_ref().map(Miss::applied_key).unwrap_or_default())),
                None => {
                    asks.commit();
                    None
                }
            };
            let Some(miss) = miss else {
                no_record(shared, token);
                continue;
            };
            if let (Some(a), Some(t)) = (&shared.acks, token)
                && let Some(answer) = a.applied_answer(&miss.applied_key())
            {
                super::recovered::replay(shared, miss, &answer, t);
                continue;
            }
            let Some(settings) = shared.settings_of(miss.sandbox_id()) else {
                super::recovered::orphan(shared, miss, token);
                continue;
            };
            let Some(mut ask) = Ask::new(settings, miss, received_ns, &mut exes) else {
                no_record(shared, token);
                continue;
            };
            ask.token = token;
            let query_ns = boot_ns();
            let started = Instant::now();
            match ask.settings.pdp.decide_now(&ask.query) {
                Some(result) => {
                    last_asked = Some(ask.settings.clone());
                    finish(shared, ask, result, started.elapsed(), query_ns);
                    streak.missed(Instant::now());
                }
                None => {
                    // A remote answer takes a round trip: ask concurrently.
                    let shared = shared.clone();
                    rt.spawn(async move {
                        let s = ask.settings.clone();
                        let input = ask.query.to_input();
                        let result = match tokio::time::timeout(s.budget, s.pdp.decide(&input)).await {
                            Ok(r) => r,
                            Err(_) => Err(PdpError::Timeout(s.budget)),
                        };
                        finish(&shared, ask, result, started.elapsed(), query_ns);
                    });
                }
            }
        }
        if last_sweep.elapsed() > Duration::from_secs(1) {
            last_sweep = Instant::now();
            sweep_pending(shared);
        }
    }
}

/// Finishes a miss whose settings are made up on the spot
/// (`recovered::orphan`), with `result` as the PDP's.
pub(super) fn finish_orphan(
    shared: &Shared,
    settings: Arc<AskSettings>,
    miss: Miss,
    token: Option<u64>,
    result: Result<PdpDecision, PdpError>,
) {
    let received_ns = boot_ns();
    let Some(mut ask) = Ask::new(settings, miss, received_ns, &mut ExeCache::default()) else {
        no_record(shared, token);
        return;
    };
    ask.token = token;
    finish(shared, ask, result, Duration::ZERO, received_ns);
}

/// A miss that gets no record (unreadable) is given back at once.
fn no_record(shared: &Shared, token: Option<u64>) {
    if let (Some(a), Some(t)) = (&shared.acks, token) {
        a.written(&[t]);
    }
}

/// One throwaway decision (`warm_up`) and a verdict-cache lookup, the
/// paths a miss takes. Its cost is the thread's CPU time since `cpu_before`
/// (taken before the wait, so the timed-out wait's wakeup counts too).
fn keep_warm(shared: &Shared, settings: &AskSettings, cpu_before: u64) {
    warm_up(settings);
    let _ = shared
        .maps
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&VerdictKey::default());
    shared.warmed.fetch_add(1, Ordering::Relaxed);
    shared
        .warm_cpu_ns
        .fetch_add(thread_cpu_ns().saturating_sub(cpu_before), Ordering::Relaxed);
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
    drop(maps);
    if let Some(a) = &shared.acks {
        // A minute is far longer than a record takes to be written.
        let n = a.expire(now.saturating_sub(60_000_000_000));
        if n > 0 {
            tracing::debug!("removed {n} applied answers left by an earlier daemon");
        }
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
    pub(super) ts_boot_ns: u64,
    pub(super) header: Header,
    pub(super) target: Target,
    action: &'static str,
    resource: Resource,
}

impl Parts {
    pub(super) fn of(miss: Miss) -> Option<Self> {
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
        Some(Self {
            key,
            disposition,
            ts_boot_ns,
            header,
            target,
            action,
            resource,
        })
    }
}

/// One miss being asked about.
pub(super) struct Ask {
    /// As they were when the miss was read.
    pub(super) settings: Arc<AskSettings>,
    key: VerdictKey,
    /// `ASK_*`.
    disposition: u32,
    /// The kernel's miss, on the boot clock.
    ts_boot_ns: u64,
    header: Header,
    target: Target,
    query: Query,
    received_ns: u64,
    /// `ASK_APPLIED`'s key for it.
    applied_key: AppliedKey,
    /// For `Acks::written` (host daemon).
    token: Option<u64>,
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
        let Parts {
            key,
            disposition,
            ts_boot_ns,
            header,
            target,
            action,
            resource,
        } = Parts::of(miss)?;
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
            key,
            disposition,
            ts_boot_ns,
            header,
            target,
            query,
            received_ns,
            applied_key,
            token: None,
        })
    }

    /// What the cached verdict is remembered by for `source: cache` records.
    fn origin_key(&self) -> OriginKey {
        match &self.target {
            Target::Net { .. } => OriginKey::Net(self.key),
            Target::Exec { path, .. } => OriginKey::Exec(self.key.sandbox_id, path.clone()),
        }
    }
}

/// Writes the verdict (cache first, then the held connect's release or
/// destruction), then hands the ask's record to the audit pipeline.
fn finish(shared: &Shared, ask: Ask, result: Result<PdpDecision, PdpError>, took: Duration, query_ns: u64) {
    let engine_done_ns = boot_ns();
    let origin_key = ask.origin_key();
    let Ask {
        settings: s,
        key,
        disposition,
        ts_boot_ns,
        header,
        target,
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
    let (verdict, pdp) = {
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
        let ended = held.is_some_and(|(ev, _)| maps.pending.get(&ev.cookie, 0).is_err());
        // The host daemon keeps the record before anything is applied:
        // killed before writing it, the next daemon writes it from this.
        let early = shared.acks.as_ref().map(|a| {
            let (verdict, pdp) = record(ended);
            if let Err(e) = a.applied(applied_key, &applied_answer(verdict, &pdp)) {
                tracing::error!("keeping an applied answer: {e}");
            }
            (verdict, pdp)
        });
        if let Some((ev, daddr)) = held
            && !ended
        {
            release_or_destroy(&mut maps, ev, out.allow, daddr);
        }
        drop(maps);
        early.unwrap_or_else(|| record(ended))
    };
    let written_ns = boot_ns();
    shared
        .timings
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(AskTiming {
            to_receipt: received_ns.saturating_sub(ts_boot_ns),
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
}

impl PdpFeed {
    pub fn try_next(&mut self) -> Option<AskRecord> {
        self.records.try_recv().ok()
    }

    /// The `pdp` object of a `source: cache` decision (`None` otherwise).
    pub fn annotate(&self, d: &Decision) -> Option<Value> {
        self.origins.annotate(d)
    }
}
