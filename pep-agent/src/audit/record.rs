//! SPEC's audit record: one JSON object per line, numbered by `seq` and
//! chained by `prev` (the SHA-256 of the previous line).

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    clock::{BootClock, Rfc3339Cache},
    decode::{Decision, ExecOp, Header, Mode, NetOp, SelfOp, Source, Verdict},
};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cgroup_id: u64,
    /// `<pid>:<start>` (start: ns since boot): unique across the boot, so
    /// every record of one process correlates even after its pid is reused.
    #[serde(default)]
    pub key: String,
    /// The parent first, up to four generations.
    #[serde(default)]
    pub ancestors: Vec<Ancestor>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ancestor {
    pub pid: u32,
    pub comm: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Net {
    pub family: String,
    pub protocol: String,
    pub daddr: String,
    pub dport: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct File {
    pub path: Option<String>,
    pub access: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Exec {
    pub path: Option<String>,
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub ts: String,
    pub seq: u64,
    pub id: String,
    pub sandbox: String,
    pub action: String,
    pub verdict: Option<Verdict>,
    pub mode: Option<Mode>,
    pub source: Option<Source>,
    pub rule: Option<String>,
    pub process: Option<Process>,
    pub net: Option<Net>,
    pub file: Option<File>,
    pub exec: Option<Exec>,
    pub pdp: Option<serde_json::Value>,
    /// For `audit.lost`: how many decisions are missing from the stream at
    /// this point. On a decision: how many identical decisions this one
    /// record stands for (coalescing); absent means one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// For `audit.lost`: where they were lost (`kernel`, `agent`, `decode`,
    /// `tailer`, `upgrade`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What this sandbox does not enforce (e.g. files without BPF LSM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    pub policy_revision: String,
    pub prev: String,
}

/// The `prev` of the first record of a chain.
pub const GENESIS: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// `sha256:<hex>` of one serialized line (without its newline).
pub fn line_hash(line: &str) -> String {
    let mut s = String::with_capacity(7 + 64);
    write_line_hash(&mut s, line);
    s
}

/// Appends `sha256:<hex>` of `line` to `out`.
pub fn write_line_hash(out: &mut String, line: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // sha2 picks the SHA-NI/AVX2 backend at run time (cpufeatures).
    let d = Sha256::digest(line.as_bytes());
    out.push_str("sha256:");
    // Per record, on the audit hot path: no `format!` per byte.
    for b in d {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

/// What the records of one sandbox share.
#[derive(Debug, Clone)]
pub struct SandboxContext {
    pub name: String,
    pub policy_revision: String,
    pub degraded: Option<String>,
}

/// Numbers and chains records; owns `seq` and `prev`.
#[derive(Debug)]
pub struct Chain {
    next_seq: u64,
    prev: String,
    clock: BootClock,
    ts: Rfc3339Cache,
}

impl Default for Chain {
    fn default() -> Self {
        Self::new(1, GENESIS.to_string())
    }
}

impl Chain {
    pub fn new(next_seq: u64, prev: String) -> Self {
        Self {
            next_seq,
            prev,
            clock: BootClock::new(),
            ts: Rfc3339Cache::default(),
        }
    }

    /// The record for `d`, serialized as one line, and chained.
    pub fn record(&mut self, d: &Decision, ctx: &SandboxContext) -> (Record, String) {
        let exe = read_exe(d.header().pid);
        let mut rec = Record::default();
        self.fill(&mut rec, d, ctx, exe.as_deref());
        self.seal(rec)
    }

    /// Overwrites `rec` with the unsealed record of `d`, reusing its
    /// buffers (the pipeline keeps one record for all decisions).
    pub fn fill(&mut self, rec: &mut Record, d: &Decision, ctx: &SandboxContext, exe: Option<&str>) {
        fill(rec, &mut self.ts, &self.clock, d, ctx, exe);
    }

    /// An in-band `audit.lost` record for `count` events the kernel could
    /// not deliver.
    pub fn lost(&mut self, count: u64, ctx: &SandboxContext) -> (Record, String) {
        self.lost_because(count, "kernel", ctx)
    }

    /// An in-band `audit.lost` record for `count` decisions lost at `reason`.
    pub fn lost_because(&mut self, count: u64, reason: &str, ctx: &SandboxContext) -> (Record, String) {
        self.seal(lost_record(count, reason, ctx))
    }

    /// Numbers and chains a built record; returns it with its line.
    pub fn seal(&mut self, mut rec: Record) -> (Record, String) {
        let mut line = String::with_capacity(1024);
        self.seal_into(&mut rec, &mut line);
        (rec, line)
    }

    /// Numbers and chains `rec` in place and writes its line into `line`
    /// (cleared first): no allocation once the buffers have grown.
    pub fn seal_into(&mut self, rec: &mut Record, line: &mut String) {
        rec.seq = self.next_seq;
        set(&mut rec.prev, &self.prev);
        line.clear();
        super::line::write_record(line, rec);
        self.prev.clear();
        write_line_hash(&mut self.prev, line);
        self.next_seq += 1;
    }

    /// The `seq` the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Converts kernel boot time to wall-clock time.
    pub fn clock(&self) -> &BootClock {
        &self.clock
    }
}

/// An unsealed `audit.lost` record.
pub fn lost_record(count: u64, reason: &str, ctx: &SandboxContext) -> Record {
    let mut rec = Record::default();
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    fill_base(&mut rec, &mut Rfc3339Cache::default(), now, ctx);
    rec.action = "audit.lost".into();
    rec.count = Some(count);
    rec.reason = Some(reason.into());
    rec
}

/// `/proc/<pid>/exe`, best effort: the process may be gone by the time its
/// event is read.
pub fn read_exe(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string())
}

/// The unsealed record of decision `d` (`seq` and `prev` are set by
/// `Chain::seal`).
pub fn build(clock: &BootClock, d: &Decision, ctx: &SandboxContext, exe: Option<String>) -> Record {
    let mut rec = Record::default();
    fill(
        &mut rec,
        &mut Rfc3339Cache::default(),
        clock,
        d,
        ctx,
        exe.as_deref(),
    );
    rec
}

/// `s = v`, keeping `s`'s buffer.
fn set(s: &mut String, v: &str) {
    s.clear();
    s.push_str(v);
}

/// `o = v`, keeping `o`'s buffer when both are there.
fn set_opt(o: &mut Option<String>, v: Option<&str>) {
    match (o.as_mut(), v) {
        (Some(s), Some(v)) => set(s, v),
        (None, Some(v)) => *o = Some(v.to_owned()),
        (_, None) => *o = None,
    }
}

/// `<section>.rules[<i>]`, or none.
fn set_rule(o: &mut Option<String>, section: &str, i: Option<u32>) {
    let Some(i) = i else {
        *o = None;
        return;
    };
    let s = o.get_or_insert_default();
    s.clear();
    s.push_str(section);
    s.push_str(".rules[");
    super::line::write_u64(s, i.into());
    s.push(']');
}

/// Overwrites every field of `rec` but `seq` and `prev` with the record of
/// decision `d`, reusing `rec`'s buffers.
pub fn fill(
    rec: &mut Record,
    ts: &mut Rfc3339Cache,
    clock: &BootClock,
    d: &Decision,
    ctx: &SandboxContext,
    exe: Option<&str>,
) {
    let h = d.header();
    fill_base(rec, ts, clock.to_unix_ns(h.ts_boot_ns), ctx);
    rec.verdict = Some(h.verdict);
    rec.mode = Some(h.mode);
    rec.source = Some(h.source);
    fill_process(rec.process.get_or_insert_default(), h, exe);
    let mut file: Option<(Option<&str>, bool, bool)> = None;
    match d {
        Decision::Net {
            op,
            protocol,
            daddr,
            dport,
            header,
        } => {
            set(
                &mut rec.action,
                match op {
                    NetOp::Connect => "net.connect",
                    NetOp::Send => "net.send",
                },
            );
            set_rule(&mut rec.rule, "network", header.rule_idx);
            let net = rec.net.get_or_insert_default();
            set(&mut net.family, if daddr.is_ipv4() { "inet" } else { "inet6" });
            set_protocol(&mut net.protocol, *protocol);
            net.daddr.clear();
            super::line::write_ip(&mut net.daddr, *daddr);
            net.dport = *dport;
            net.domain = None;
        }
        Decision::File {
            read,
            write,
            path,
            header,
        } => {
            set(&mut rec.action, if *write { "file.write" } else { "file.open" });
            set_rule(&mut rec.rule, "files", header.rule_idx);
            file = Some((path.as_deref(), *read, *write));
        }
        Decision::Exec {
            header,
            op,
            path,
            argv,
        } => {
            set(&mut rec.action, "exec");
            set_rule(&mut rec.rule, "exec", header.rule_idx);
            rec.exec = Some(Exec {
                path: path.clone(),
                argv: argv.clone(),
            });
            // How the program was about to run, when not by execve.
            rec.reason = match op {
                ExecOp::Exec => None,
                ExecOp::Mmap => Some("mmap PROT_EXEC".into()),
                ExecOp::Mprotect => Some("mprotect PROT_EXEC".into()),
            };
        }
        Decision::SelfProtect {
            op,
            target_pid,
            arg,
            path,
            ..
        } => {
            set(&mut rec.action, op.action());
            rec.rule = Some("self-protection".into());
            if path.is_some() || matches!(op, SelfOp::Cgroup | SelfOp::Bpffs) {
                file = Some((path.as_deref(), false, true));
            }
            rec.reason = Some(match (op, target_pid) {
                (SelfOp::Signal, Some(pid)) => format!("signal {arg} to protected process {pid}"),
                (SelfOp::Ptrace, Some(pid)) => format!("ptrace (mode {arg:#x}) of protected process {pid}"),
                (SelfOp::Bpf, _) => format!("bpf command {arg}"),
                (SelfOp::Module, _) if path.is_some() => format!("kernel module/image load (id {arg})"),
                (SelfOp::Module, _) => format!("kernel module/image load from memory (id {arg})"),
                (SelfOp::Cgroup, _) if path.is_none() => {
                    format!("clone into another cgroup (flags {arg:#x})")
                }
                (SelfOp::Cgroup, _) => "write to a cgroup file system".into(),
                (SelfOp::Bpffs, _) => "write to a BPF file system".into(),
                (SelfOp::Mount, _) => {
                    "change to the mount tree or the root (mount, umount, move_mount, pivot_root, chroot)"
                        .into()
                }
                (SelfOp::Signal | SelfOp::Ptrace, None) => "protected process".into(),
            });
        }
    }
    if !matches!(d, Decision::Net { .. }) {
        rec.net = None;
    }
    if !matches!(d, Decision::Exec { .. }) {
        rec.exec = None;
    }
    match file {
        Some((path, read, write)) => {
            let f = rec.file.get_or_insert_default();
            set_opt(&mut f.path, path);
            f.access.clear();
            if read {
                f.access.push("read".to_string());
            }
            if write {
                f.access.push("write".to_string());
            }
        }
        None => rec.file = None,
    }
}

/// The fields every record has, for time `unix_ns`.
fn fill_base(rec: &mut Record, ts: &mut Rfc3339Cache, unix_ns: i128, ctx: &SandboxContext) {
    rec.ts.clear();
    ts.write(&mut rec.ts, unix_ns);
    rec.seq = 0;
    let mut id = [0u8; ulid::ULID_LEN];
    set(&mut rec.id, ulid::Ulid::new().array_to_str(&mut id));
    set(&mut rec.sandbox, &ctx.name);
    rec.action.clear();
    rec.verdict = None;
    rec.mode = None;
    rec.source = None;
    // `rule`, `process`, `net`, `file` and `exec` are `fill`'s, which reuses
    // their buffers.
    rec.pdp = None;
    rec.count = None;
    rec.reason = None;
    set_opt(&mut rec.degraded, ctx.degraded.as_deref());
    set(&mut rec.policy_revision, &ctx.policy_revision);
    rec.prev.clear();
}

fn fill_process(p: &mut Process, h: &Header, exe: Option<&str>) {
    p.pid = h.pid;
    p.tid = h.tid;
    p.ppid = h.ppid;
    p.uid = h.uid;
    p.gid = h.gid;
    set(&mut p.comm, &h.comm);
    set_opt(&mut p.exe, exe);
    p.cgroup_id = h.cgroup_id;
    p.key.clear();
    write_process_key(&mut p.key, h.pid, h.start_ns);
    p.ancestors.truncate(h.ancestors.len());
    for (i, (pid, comm)) in h.ancestors.iter().enumerate() {
        match p.ancestors.get_mut(i) {
            Some(a) => {
                a.pid = *pid;
                set(&mut a.comm, comm);
            }
            None => p.ancestors.push(Ancestor {
                pid: *pid,
                comm: comm.clone(),
            }),
        }
    }
}

/// `<pid>:<start ns since boot>`.
pub fn process_key(pid: u32, start_ns: u64) -> String {
    let mut s = String::with_capacity(32);
    write_process_key(&mut s, pid, start_ns);
    s
}

fn write_process_key(out: &mut String, pid: u32, start_ns: u64) {
    super::line::write_u64(out, pid.into());
    out.push(':');
    super::line::write_u64(out, start_ns);
}

fn set_protocol(s: &mut String, p: u8) {
    match p {
        6 => set(s, "tcp"),
        17 => set(s, "udp"),
        1 => set(s, "icmp"),
        58 => set(s, "icmpv6"),
        n => {
            s.clear();
            super::line::write_u64(s, n.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::decode::Header;

    fn header(verdict: Verdict) -> Header {
        Header {
            verdict,
            mode: Mode::Enforce,
            source: Source::Rule,
            rule_idx: Some(1),
            sandbox_id: 1,
            ts_boot_ns: 1,
            cgroup_id: 9,
            pid: u32::MAX - 1,
            tid: u32::MAX - 1,
            ppid: 1,
            uid: 0,
            gid: 0,
            comm: "curl".into(),
            start_ns: 5,
            exe: Default::default(),
            ancestors: vec![(1, "init".into())],
        }
    }

    #[test]
    fn seq_rises_and_prev_chains() {
        let ctx = SandboxContext {
            name: "t".into(),
            policy_revision: "sha256:x".into(),
            degraded: None,
        };
        let mut chain = Chain::default();
        let d = Decision::Net {
            header: header(Verdict::Deny),
            op: NetOp::Connect,
            protocol: 6,
            daddr: "169.254.169.254".parse().unwrap(),
            dport: 80,
        };
        let (r1, l1) = chain.record(&d, &ctx);
        let (r2, _) = chain.record(&d, &ctx);
        let (r3, _) = chain.lost(5, &ctx);
        assert_eq!((r1.seq, r2.seq, r3.seq), (1, 2, 3));
        assert_eq!(r1.prev, GENESIS);
        assert_eq!(r2.prev, line_hash(&l1));
        assert_eq!(r1.rule.as_deref(), Some("network.rules[1]"));
        assert_eq!(r3.action, "audit.lost");
        assert_eq!(r3.count, Some(5));
        let v: serde_json::Value = serde_json::from_str(&l1).unwrap();
        assert_eq!(v["net"]["daddr"], "169.254.169.254");
        assert_eq!(v["verdict"], "deny");
        assert_eq!(v["file"], serde_json::Value::Null);
        assert_eq!(v["process"]["key"], format!("{}:5", u32::MAX - 1));
        assert_eq!(v["process"]["ancestors"][0]["comm"], "init");
        assert_eq!(v["process"]["gid"], 0);
    }
}
