//! Ring buffer -> decisions -> records -> sinks, shared by `run` and the
//! host daemon.
//!
//! One task reads the kernel's ring buffer and does all of the work in line:
//! decode, coalesce, build the record, chain it (`seq`, `prev`), write it to
//! the file/stdout sink, offer it to the live tailers. There is no queue of
//! its own between the ring buffer and the file sink: when the pipeline falls
//! behind, the ring buffer fills and the kernel counts what it could not
//! reserve (`COUNTER_LOST`). After every drained batch the pipeline reads
//! that counter and writes the increase as an `audit.lost` record, so every
//! decision the kernel counted (`COUNTER_DECISIONS`) is either a record (or
//! part of a coalesced record's `count`) or part of an `audit.lost` count.
//! Tailers have bounded queues of their own and are told in-band what they
//! missed (see `hub`).

use std::{collections::HashMap, net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use aya::maps::{MapData, PerCpuArray};
use pep_common::event::{COUNTER_ASK_UNRECORDED, COUNTER_DECISIONS, COUNTER_LOST};

use super::{
    decode::{Decision, ExecOp, Mode, NetOp, Verdict},
    exe::{Acting, ExeCache},
    hub::Hub,
    record::{self, Chain, Record, SandboxContext},
    sink::Sink,
};

/// How the audit stream of a run or daemon is set up.
#[derive(Debug, Clone, Default)]
pub struct AuditOptions {
    /// Identical denials of one process within this window after the first
    /// are folded into one record with a `count`. Zero: off.
    pub coalesce: Duration,
    /// Unix socket for live tailers.
    pub socket: Option<PathBuf>,
    /// Per-tailer queue length (records); 0: `hub::DEFAULT_TAILER_QUEUE`.
    pub tailer_queue: usize,
    pub rotation: super::sink::Rotation,
}

/// The kernel's per-CPU counters, summed.
pub struct KernelCounters {
    arr: PerCpuArray<MapData, u64>,
}

impl KernelCounters {
    /// A handle on `enforcer`'s `COUNTERS` map, independent of the enforcer's
    /// own (so the pump task can own it).
    pub fn of(enforcer: &crate::enforcer::Enforcer) -> anyhow::Result<Self> {
        match enforcer.ebpf.map("COUNTERS") {
            Some(aya::maps::Map::PerCpuArray(data)) => Self::from_map(data),
            _ => anyhow::bail!("map COUNTERS is missing from the eBPF object"),
        }
    }

    /// A second handle on a `COUNTERS` map.
    pub fn from_map(map: &MapData) -> anyhow::Result<Self> {
        use std::os::fd::AsFd as _;
        let fd = map.fd().as_fd().try_clone_to_owned()?;
        let data = MapData::from_fd(fd)?;
        let arr = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
        Ok(Self { arr })
    }

    fn sum(&self, i: u32) -> u64 {
        self.arr
            .get(&i, 0)
            .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
            .unwrap_or(0)
    }

    /// Decisions the kernel made.
    pub fn decisions(&self) -> u64 {
        self.sum(COUNTER_DECISIONS)
    }

    /// Events the ring buffer had no room for.
    pub fn lost(&self) -> u64 {
        self.sum(COUNTER_LOST)
    }

    /// Both kinds of decisions the kernel could not deliver.
    pub fn losses(&self) -> Losses {
        Losses {
            ring: self.lost(),
            ask: self.sum(COUNTER_ASK_UNRECORDED),
        }
    }
}

/// Decisions the kernel counted but could not deliver, as its counters read
/// (totals since the counters were created).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Losses {
    /// The audit ring had no room (`audit.lost`, reason `kernel`).
    pub ring: u64,
    /// The `ASKS` ring had no room for a network miss, whose ask is its
    /// record (`audit.lost`, reason `ask`).
    pub ask: u64,
}

/// Totals of one pipeline's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Records written (decisions, coalesced summaries, `audit.lost`).
    pub records: u64,
    /// Decisions the records stand for (a coalesced record counts `count`).
    pub decisions_recorded: u64,
    /// Decisions reported as `audit.lost`, by the kernel or the decoder.
    pub lost_reported: u64,
    /// Of `lost_reported`, what the kernel counted.
    pub kernel_lost_reported: u64,
    /// Network misses whose ask (their record) the kernel could not send.
    /// Not in `lost_reported`: an ask is not among the kernel's counted
    /// audit-ring decisions.
    pub ask_lost_reported: u64,
}

/// Identity of a repeated denial: the same process doing the same thing
/// and being denied by the same rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CoalesceKey {
    pid: u32,
    start_ns: u64,
    action: u8,
    target: Target,
    rule: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Target {
    Net(IpAddr, u16, u8),
    File(Option<String>, bool, bool),
}

struct Window {
    opened_ns: u64,
    /// Repeats since the first (which was recorded at once).
    suppressed: u64,
    last: Decision,
}

/// Bounds the coalescer's memory: beyond this many open windows, new keys
/// are recorded one by one.
const MAX_WINDOWS: usize = 4096;

fn coalesce_key(d: &Decision) -> Option<CoalesceKey> {
    let h = d.header();
    if h.verdict != Verdict::Deny {
        return None;
    }
    // `if let`, not `match`: decision kinds added later are simply not
    // coalesced.
    let (action, target) = if let Decision::Net {
        op,
        protocol,
        daddr,
        dport,
        ..
    } = d
    {
        let op = match op {
            NetOp::Connect => 1,
            NetOp::Send => 2,
        };
        (op, Target::Net(*daddr, *dport, *protocol))
    } else if let Decision::File {
        read, write, path, ..
    } = d
    {
        (3, Target::File(path.clone(), *read, *write))
    } else {
        return None;
    };
    Some(CoalesceKey {
        pid: h.pid,
        start_ns: h.start_ns,
        action,
        target,
        rule: h.rule_idx,
    })
}

/// Looks a sandbox id up: the name and policy revision its records carry.
pub type ContextFn = Arc<dyn Fn(u32) -> Option<SandboxContext> + Send + Sync>;

/// The synchronous core: feed it raw events and counter readings.
pub struct Pipeline {
    chain: Chain,
    sctx: SandboxContext,
    sink: Sink,
    hub: Option<Hub>,
    coalesce_ns: u64,
    windows: HashMap<CoalesceKey, Window>,
    /// The `exe` of records (`audit::exe`).
    exes: ExeCache,
    kernel_lost_seen: Losses,
    totals: Totals,
    /// The host daemon's sandboxes share one stream: the context of each
    /// record comes from its sandbox id (`with_contexts`), else `sctx`.
    contexts: Option<ContextFn>,
    /// Records of PDP asks, and the origin of cached verdicts (issue 9).
    pdp_feed: Option<crate::pdp::task::PdpFeed>,
    /// Tokens of the PDP records written since `take_pdp_tokens`.
    pdp_tokens: Vec<u64>,
    /// The resolver's `dns.query` records, and the names of the addresses
    /// it learned, for `net.domain` (issue 7).
    dns_feed: Option<crate::dns::DnsFeed>,
    /// The record being written and its line: reused, so that a decision
    /// costs no allocation once they have grown.
    scratch: Record,
    line: String,
}

impl Pipeline {
    /// A pipeline writing to `sink`, continuing the sink's chain.
    pub fn new(sink: Sink, sctx: SandboxContext, opts: &AuditOptions) -> anyhow::Result<Self> {
        let (next, prev) = sink.resume();
        let hub = match &opts.socket {
            Some(p) => {
                let queue = if opts.tailer_queue == 0 {
                    super::hub::DEFAULT_TAILER_QUEUE
                } else {
                    opts.tailer_queue
                };
                Some(
                    Hub::bind(p, queue, sctx.clone())
                        .map_err(|e| anyhow::anyhow!("audit socket {}: {e}", p.display()))?,
                )
            }
            None => None,
        };
        Ok(Self {
            chain: Chain::new(next, prev),
            sctx,
            sink,
            hub,
            coalesce_ns: u64::try_from(opts.coalesce.as_nanos()).unwrap_or(u64::MAX),
            windows: HashMap::new(),
            exes: ExeCache::default(),
            kernel_lost_seen: Losses::default(),
            totals: Totals::default(),
            contexts: None,
            pdp_feed: None,
            pdp_tokens: Vec::new(),
            dns_feed: None,
            scratch: Record::default(),
            line: String::with_capacity(4096),
        })
    }

    /// Takes the PDP task's records (written at each `tick`) and annotates
    /// `source: cache` decisions with the PDP decision they came from.
    pub fn set_pdp_feed(&mut self, feed: crate::pdp::task::PdpFeed) {
        self.pdp_feed = Some(feed);
    }

    /// The tokens (`pdp::acks`) of the PDP records written since the last
    /// call: once the sink is flushed, they are in the log.
    pub fn take_pdp_tokens(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pdp_tokens)
    }

    /// Takes the resolver's `dns.query` records (written at each `tick`,
    /// like the PDP's) and names the learned addresses in `net` records.
    pub fn set_dns_feed(&mut self, feed: crate::dns::DnsFeed) {
        self.dns_feed = Some(feed);
    }

    /// Writes the resolver's pending records; like the PDP's, they are not
    /// kernel decisions and stay out of the decisions accounting.
    fn drain_dns(&mut self) -> std::io::Result<()> {
        let mut recs = Vec::new();
        if let Some(feed) = &mut self.dns_feed {
            while let Some(r) = feed.try_next() {
                recs.push(r);
            }
        }
        for r in recs {
            self.write(r)?;
        }
        Ok(())
    }

    /// Writes the PDP task's pending records. They are not kernel decision
    /// events (the kernel counts the miss, not a decision), so they do not
    /// enter the decisions accounting.
    fn drain_pdp(&mut self) -> std::io::Result<()> {
        let mut recs = Vec::new();
        if let Some(feed) = &mut self.pdp_feed {
            while let Some(r) = feed.try_next() {
                recs.push(r);
            }
        }
        for r in recs {
            let h = r.decision.header();
            let exe = self.exes.name(Acting {
                pid: h.pid,
                start_ns: h.start_ns,
                ppid: h.ppid,
                image: &h.exe,
            });
            // The daemon's records name their own sandbox, as decisions do.
            let ctx = self.contexts.as_ref().and_then(|f| f(h.sandbox_id));
            let mut rec = record::build(
                self.chain.clock(),
                &r.decision,
                ctx.as_ref().unwrap_or(&self.sctx),
                exe,
            );
            rec.pdp = Some(r.pdp);
            if let Some(feed) = &self.dns_feed {
                feed.annotate(&r.decision, &mut rec);
            }
            self.write(rec)?;
            if let Some(t) = r.token {
                self.pdp_tokens.push(t);
            }
        }
        Ok(())
    }

    /// Records of sandbox id `n` carry `f(n)` when it answers (the host
    /// daemon: many sandboxes, one stream).
    pub fn with_contexts(mut self, f: ContextFn) -> Self {
        self.contexts = Some(f);
        self
    }

    /// The kernel losses already reported before this pipeline started (a
    /// restarted daemon reads the same pinned counter).
    pub fn set_kernel_lost_seen(&mut self, n: Losses) {
        self.kernel_lost_seen = n;
    }

    /// The kernel losses reported so far, baseline included.
    pub fn kernel_lost_seen(&self) -> Losses {
        self.kernel_lost_seen
    }

    /// Numbers, chains and writes a record built elsewhere (the daemon's
    /// records of refused control requests).
    pub fn record(&mut self, rec: Record) -> std::io::Result<()> {
        self.write(rec)
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Decodes and records one raw ring-buffer event.
    pub fn ingest(&mut self, raw: &[u8]) -> std::io::Result<()> {
        match Decision::try_from(raw) {
            Ok(d) => self.decision(d),
            Err(e) => {
                // A malformed kernel event is reported, never silently dropped.
                tracing::error!("undecodable kernel event: {e}");
                self.lost(1, "decode")
            }
        }
    }

    /// Records one decision (or folds it into an open window).
    pub fn decision(&mut self, d: Decision) -> std::io::Result<()> {
        // PDP answers written before this event (a cache hit may follow its
        // own PDP decision within microseconds) keep their order.
        self.drain_pdp()?;
        // So do the resolver's: a lookup comes before its connect.
        self.drain_dns()?;
        if self.coalesce_ns > 0
            && let Some(key) = coalesce_key(&d)
        {
            let now = d.header().ts_boot_ns;
            if let Some(w) = self.windows.get_mut(&key) {
                if now.saturating_sub(w.opened_ns) < self.coalesce_ns {
                    w.suppressed += 1;
                    w.last = d;
                    return Ok(());
                }
                let w = self.windows.remove(&key).expect("present");
                self.close_window(w)?;
            }
            if self.windows.len() >= MAX_WINDOWS {
                self.tick(now)?;
            }
            if self.windows.len() < MAX_WINDOWS {
                self.windows.insert(
                    key,
                    Window {
                        opened_ns: now,
                        suppressed: 0,
                        last: d.clone(),
                    },
                );
            }
        }
        self.emit(&d, None)
    }

    fn emit(&mut self, d: &Decision, count: Option<u64>) -> std::io::Result<()> {
        let h = d.header();
        let exe = self.exes.name(Acting {
            pid: h.pid,
            start_ns: h.start_ns,
            ppid: h.ppid,
            image: &h.exe,
        });
        // An exec that went ahead names the process's next image (after
        // this record, which names the image that exec'd).
        if let Decision::Exec {
            op: ExecOp::Exec,
            path: Some(path),
            ..
        } = d
            && (h.verdict == Verdict::Allow || h.mode == Mode::Audit)
        {
            self.exes.exec_seen(h.pid, h.start_ns, h.exe.exec_id, path);
        }
        let exe = exe.as_deref();
        let ctx = self.contexts.as_ref().and_then(|f| f(h.sandbox_id));
        // One record for every decision: its buffers are reused.
        let mut rec = std::mem::take(&mut self.scratch);
        self.chain
            .fill(&mut rec, d, ctx.as_ref().unwrap_or(&self.sctx), exe);
        rec.count = count;
        if let Some(feed) = &self.pdp_feed {
            rec.pdp = feed.annotate(d);
        }
        if let Some(feed) = &self.dns_feed {
            feed.annotate(d, &mut rec);
        }
        self.totals.decisions_recorded += count.unwrap_or(1);
        let r = self.write_ref(&mut rec);
        self.scratch = rec;
        r
    }

    fn close_window(&mut self, w: Window) -> std::io::Result<()> {
        if w.suppressed > 0 {
            self.emit(&w.last, Some(w.suppressed))?;
        }
        Ok(())
    }

    /// Closes the coalescing windows older than the window length at boot
    /// time `now_ns` (0 closes them all).
    pub fn tick(&mut self, now_ns: u64) -> std::io::Result<()> {
        self.drain_pdp()?;
        self.drain_dns()?;
        if self.windows.is_empty() {
            return Ok(());
        }
        let window = self.coalesce_ns;
        let mut due: Vec<(CoalesceKey, u64)> = self
            .windows
            .iter()
            .filter(|(_, w)| now_ns == 0 || now_ns.saturating_sub(w.opened_ns) >= window)
            .map(|(k, w)| (k.clone(), w.last.header().ts_boot_ns))
            .collect();
        // In the order the last folded decisions happened.
        due.sort_by_key(|(_, ts)| *ts);
        for (k, _) in due {
            if let Some(w) = self.windows.remove(&k) {
                self.close_window(w)?;
            }
        }
        Ok(())
    }

    /// An `audit.lost` record for `count` decisions lost at `reason`.
    pub fn lost(&mut self, count: u64, reason: &str) -> std::io::Result<()> {
        self.totals.lost_reported += count;
        self.write(record::lost_record(count, reason, &self.sctx))
    }

    /// The kernel's lost counters now read `total`: records the increase.
    pub fn kernel_lost(&mut self, total: Losses) -> std::io::Result<()> {
        if total.ring > self.kernel_lost_seen.ring {
            let n = total.ring - self.kernel_lost_seen.ring;
            self.kernel_lost_seen.ring = total.ring;
            self.totals.kernel_lost_reported += n;
            self.lost(n, "kernel")?;
        }
        if total.ask > self.kernel_lost_seen.ask {
            let n = total.ask - self.kernel_lost_seen.ask;
            self.kernel_lost_seen.ask = total.ask;
            self.ask_lost(n)?;
        }
        Ok(())
    }

    /// An `audit.lost` record for `count` network misses whose ask, their
    /// record, the kernel could not send.
    pub fn ask_lost(&mut self, count: u64) -> std::io::Result<()> {
        self.totals.ask_lost_reported += count;
        self.write(record::lost_record(count, "ask", &self.sctx))
    }

    fn write(&mut self, mut rec: Record) -> std::io::Result<()> {
        self.write_ref(&mut rec)
    }

    /// Numbers and chains `rec`, writes its line (built in the reused line
    /// buffer) and offers it to the tailers.
    fn write_ref(&mut self, rec: &mut Record) -> std::io::Result<()> {
        self.chain.seal_into(rec, &mut self.line);
        self.totals.records += 1;
        self.sink.write_line(&self.line)?;
        if let Some(hub) = &self.hub {
            hub.publish(rec, &self.line);
        }
        Ok(())
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.sink.flush()
    }

    /// Reopens the file sink (SIGUSR1).
    pub fn reopen(&mut self) -> std::io::Result<()> {
        self.sink.reopen()
    }

    /// Closes every window, records the kernel's final loss count, flushes,
    /// and ends the live streams.
    pub async fn finish(mut self, counters: Option<&KernelCounters>) -> anyhow::Result<Totals> {
        self.tick(0)?;
        if let Some(c) = counters {
            self.kernel_lost(c.losses())?;
            let decisions = c.decisions();
            let t = self.totals;
            let accounted = t.decisions_recorded + t.lost_reported;
            tracing::info!(
                "audit totals: decisions={decisions} records={} recorded={} lost={} kernel_lost={} ask_lost={}",
                t.records,
                t.decisions_recorded,
                t.lost_reported,
                t.kernel_lost_reported,
                t.ask_lost_reported
            );
            if accounted != decisions {
                // Events still in flight (a program running while the sandbox
                // died): say so rather than pretend.
                let missing = decisions.saturating_sub(accounted);
                if missing > 0 {
                    self.lost(missing, "agent")?;
                }
                tracing::warn!(
                    "audit: kernel counted {decisions} decisions, stream accounts for {accounted}"
                );
            }
        }
        self.sink.flush()?;
        if let Some(hub) = self.hub.take() {
            hub.close(Duration::from_secs(5)).await;
        }
        Ok(self.totals)
    }
}

/// Boot-clock nanoseconds now (the clock of the kernel's timestamps).
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::decode::{Header, Mode, Source};

    fn deny(pid: u32, ts: u64, dport: u16) -> Decision {
        Decision::Net {
            header: Header {
                verdict: Verdict::Deny,
                mode: Mode::Enforce,
                source: Source::Default,
                rule_idx: None,
                sandbox_id: 1,
                ts_boot_ns: ts,
                cgroup_id: 1,
                pid,
                tid: pid,
                ppid: 1,
                uid: 0,
                gid: 0,
                comm: "flood".into(),
                start_ns: 9,
                exe: Default::default(),
                ancestors: vec![],
            },
            op: NetOp::Send,
            protocol: 17,
            daddr: "127.0.0.1".parse().expect("ip"),
            dport,
        }
    }

    fn pipeline(dir: &std::path::Path, coalesce_ms: u64) -> (Pipeline, PathBuf) {
        let path = dir.join("a.jsonl");
        let sink = Sink::open(path.to_str().expect("utf8")).expect("sink");
        let ctx = SandboxContext {
            name: "t".into(),
            policy_revision: "sha256:x".into(),
            degraded: None,
        };
        let opts = AuditOptions {
            coalesce: Duration::from_millis(coalesce_ms),
            ..AuditOptions::default()
        };
        (Pipeline::new(sink, ctx, &opts).expect("pipeline"), path)
    }

    fn records(path: &std::path::Path) -> Vec<Record> {
        std::fs::read_to_string(path)
            .expect("read")
            .lines()
            .map(|l| serde_json::from_str(l).expect("record"))
            .collect()
    }

    #[tokio::test]
    async fn coalesces_repeats_within_the_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut p, path) = pipeline(dir.path(), 100);
        let ms = 1_000_000;
        // Same process, same target: first recorded at once, 4 repeats folded.
        for i in 0..5 {
            p.decision(deny(7, 1000 * ms + i * ms, 53)).expect("ok");
        }
        // Another target is not folded into it.
        p.decision(deny(7, 1000 * ms, 54)).expect("ok");
        // After the window: the fold is written, a new window opens.
        p.decision(deny(7, 1200 * ms, 53)).expect("ok");
        let t = p.finish(None).await.expect("finish");
        let recs = records(&path);
        let counts: Vec<(u16, Option<u64>)> = recs
            .iter()
            .map(|r| (r.net.as_ref().expect("net").dport, r.count))
            .collect();
        assert_eq!(counts, vec![(53, None), (54, None), (53, Some(4)), (53, None)]);
        assert_eq!(t.decisions_recorded, 7, "every decision is accounted for: {t:?}");
        let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn off_by_default_and_lost_is_in_band() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut p, path) = pipeline(dir.path(), 0);
        for i in 0..3 {
            p.decision(deny(7, i, 53)).expect("ok");
        }
        let losses = |ring, ask| Losses { ring, ask };
        p.kernel_lost(losses(10, 0)).expect("ok");
        p.kernel_lost(losses(10, 0)).expect("ok");
        p.decision(deny(7, 5, 53)).expect("ok");
        p.kernel_lost(losses(12, 0)).expect("ok");
        p.ingest(&[1, 2, 3]).expect("ok");
        // Asks the kernel could not send: counted apart, reported once.
        p.kernel_lost(losses(12, 4)).expect("ok");
        p.kernel_lost(losses(12, 4)).expect("ok");
        let t = p.finish(None).await.expect("finish");
        let recs = records(&path);
        let actions: Vec<(&str, Option<u64>)> = recs.iter().map(|r| (r.action.as_str(), r.count)).collect();
        assert_eq!(
            actions,
            vec![
                ("net.send", None),
                ("net.send", None),
                ("net.send", None),
                ("audit.lost", Some(10)),
                ("net.send", None),
                ("audit.lost", Some(2)),
                ("audit.lost", Some(1)),
                ("audit.lost", Some(4)),
            ]
        );
        let reasons: Vec<Option<&str>> = recs[3..].iter().map(|r| r.reason.as_deref()).collect();
        assert_eq!(
            reasons,
            [Some("kernel"), None, Some("kernel"), Some("decode"), Some("ask")]
        );
        assert_eq!((t.decisions_recorded, t.lost_reported), (4, 13));
        assert_eq!((t.kernel_lost_reported, t.ask_lost_reported), (12, 4));
    }
}
