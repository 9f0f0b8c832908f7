//! The PDP task of `pep-agent run` and of the host daemon: reads misses
//! from the kernel's `ASKS` ring buffer, asks the PDP, and has the answer
//! applied (`apply`: the verdict into `VERDICT_CACHE`, a held connect
//! released or destroyed, one audit record per ask to the audit pipeline).
//!
//! Latency: the misses are read by a real-time thread of their own that
//! blocks on the ring buffer (or spins on it for `pdp.busy_poll_us` after
//! a miss, `spin`); an embedded engine decides right there on the
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

use pep_common::ask::{AskSandbox, VerdictKey};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    Pdp, PdpDecision, PdpError,
    acks::Acks,
    apply::{Ask, finish},
    cache::boot_ns,
    kernel::AskMaps,
    miss::Miss,
    spin::{BusyPoll, Waited},
    warm::{Streak, WARM_EVERY_MS, boost_priority, thread_cpu_ns, warm_up},
};
use crate::{audit::decode::Decision, audit::exe::ExeCache, audit::ring::CommitRing, policy::OnUnavailable};

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
    /// `pdp.busy_poll_us`: how long after a miss the thread spins for the
    /// next (`spin`).
    pub busy_poll: Duration,
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
    pub(super) settings: RwLock<HashMap<u32, Arc<AskSettings>>>,
    pub(super) maps: Mutex<AskMaps>,
    pub(super) origins: CacheOrigins,
    pub(super) records: mpsc::UnboundedSender<AskRecord>,
    pub(super) timings: Mutex<Vec<AskTiming>>,
    /// Keep-warm decisions made (`keep_warm`), and the thread CPU time they
    /// took, in ns.
    pub(super) warmed: AtomicU64,
    pub(super) warm_cpu_ns: AtomicU64,
    /// The thread CPU time spent busy-polling (`spin`), in ns.
    pub(super) spun_ns: AtomicU64,
    /// The thread reads no miss until this is set (`AskTask::resume`).
    pub(super) reading: AtomicBool,
    /// Told of every record sent, so that the daemon writes it at once
    /// rather than at its next ring-buffer wakeup.
    pub(super) wake: Option<Arc<tokio::sync::Notify>>,
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
    /// Of `to_receipt`, the kernel's connect path from the miss to the ask
    /// leaving the kernel (a held connect's is sent once its SYN is built,
    /// `AskEvent::sent`); 0 for a miss sent where it happened. The rest of
    /// `to_receipt` is the wakeup of this thread and the read.
    pub in_kernel: u64,
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

    /// The thread CPU time spent busy-polling so far (ns).
    pub fn busy_poll_cost(&self) -> u64 {
        self.shared.spun_ns.load(Ordering::Relaxed)
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
        spun_ns: AtomicU64::new(0),
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
    // Only misses already in the ring now can have been answered by an
    // earlier daemon: later ones skip the `ASK_APPLIED` lookup.
    let replay_until = asks.produced();
    // Records written from answers an earlier daemon kept: one line says
    // how many, once the ring is read past them.
    let mut replayed = 0u64;
    let mut replay_told = false;
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
    // The last network miss as the ring carried it: what the keep-warm
    // takes through a miss's path (the buffer is reused).
    let mut last_net: Vec<u8> = Vec::new();
    let mut busy = BusyPoll::default();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        let warming = streak.warming(now);
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
        let mut cpu = thread_cpu_ns();
        let window = busy.window(now);
        let rc = match window {
            Some(until) if timeout > 0 => {
                let deadline = until.min(now + Duration::from_millis(timeout as u64));
                let (waited, spun) = busy.spin(&asks, deadline, stop);
                shared.spun_ns.fetch_add(spun, Ordering::Relaxed);
                // The keep-warm counts its own time only.
                cpu += spun;
                i32::from(waited == Waited::Record)
            }
            _ => {
                if window.is_none() {
                    busy.rest();
                }
                // SAFETY: one valid pollfd; the ring buffer keeps its fd open.
                unsafe { libc::poll(&mut pfd, 1, timeout) }
            }
        };
        if rc == 0
            && warming
            && let Some(s) = &last_asked
        {
            keep_warm(shared, s, &last_net, &mut exes, cpu);
        }
        if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            tracing::error!("poll on the ask ring: {}", std::io::Error::last_os_error());
            std::thread::sleep(Duration::from_millis(POLL_MS as u64));
        }
        loop {
            let (miss, end) = {
                let Some(item) = asks.next_record() else { break };
                let miss = Miss::read(item);
                if let Some(Miss::Net(_)) = &miss {
                    last_net.clear();
                    last_net.extend_from_slice(item);
                }
                (miss, asks.position())
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
                && end <= replay_until
                && let Some(answer) = a.applied_answer(&miss.applied_key())
            {
                super::recovered::replay(shared, miss, &answer, t);
                replayed += 1;
                continue;
            }
            let Some(settings) = shared.settings_of(miss.sandbox_id()) else {
                super::recovered::orphan(shared, miss, token);
                continue;
            };
            busy.missed(Instant::now(), settings.busy_poll);
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
        if !replay_told && asks.position() >= replay_until {
            replay_told = true;
            if replayed > 0 {
                tracing::info!(
                    "pdp: wrote the records of {replayed} answers an earlier daemon applied before it stopped (pdp.recovered)"
                );
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

/// The path a miss takes in this thread, on the last network miss
/// (`last_net`, as the ring carried it) without its effects: decoded, its
/// query built (the subject named from `exes`, where it is cached), decided
/// and thrown away, and the two maps its answer goes to read, not written.
/// Without a network miss yet (a stream of exec misses): one throwaway
/// decision (`warm_up`) and a verdict-cache lookup. The code and data of
/// each stage stay cached, not only the engine's: the stages before and
/// after the decision took as long as it cold. Its cost is the thread's
/// CPU time since `cpu_before` (taken before the wait, so the timed-out
/// wait's wakeup counts too).
fn keep_warm(
    shared: &Shared,
    settings: &Arc<AskSettings>,
    last_net: &[u8],
    exes: &mut ExeCache,
    cpu_before: u64,
) {
    let ask = Miss::read(last_net).and_then(|m| Ask::new(settings.clone(), m, boot_ns(), exes));
    match ask {
        Some(ask) => {
            let _ = settings.pdp.decide_now(&ask.query);
            let maps = shared.maps.lock().unwrap_or_else(|e| e.into_inner());
            let _ = maps.get(&ask.key());
            let _ = maps.pending.get(&ask.cookie(), 0);
        }
        None => {
            warm_up(settings);
            let _ = shared
                .maps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&VerdictKey::default());
        }
    }
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
