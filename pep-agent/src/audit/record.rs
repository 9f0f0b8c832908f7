//! SPEC's audit record: one JSON object per line, numbered by `seq` and
//! chained by `prev` (the SHA-256 of the previous line).

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    clock::{BootClock, rfc3339},
    decode::{Decision, ExecOp, Header, Mode, NetOp, SelfOp, Source, Verdict},
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ancestor {
    pub pid: u32,
    pub comm: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Net {
    pub family: String,
    pub protocol: String,
    pub daddr: String,
    pub dport: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct File {
    pub path: Option<String>,
    pub access: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exec {
    pub path: Option<String>,
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// `tailer`).
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let d = Sha256::digest(line.as_bytes());
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    // Per record, on the audit hot path: no `format!` per byte.
    for b in d {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
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
        }
    }

    /// The record for `d`, serialized as one line, and chained.
    pub fn record(&mut self, d: &Decision, ctx: &SandboxContext) -> (Record, String) {
        let exe = read_exe(d.header().pid);
        let rec = build(&self.clock, d, ctx, exe);
        self.seal(rec)
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
        rec.seq = self.next_seq;
        rec.prev = std::mem::take(&mut self.prev);
        let line = serde_json::to_string(&rec).expect("records always serialize");
        self.prev = line_hash(&line);
        self.next_seq += 1;
        (rec, line)
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
    let mut rec = base(time::OffsetDateTime::now_utc(), ctx);
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
    let h = d.header();
    let mut rec = base(clock.to_wall(h.ts_boot_ns), ctx);
    rec.verdict = Some(h.verdict);
    rec.mode = Some(h.mode);
    rec.source = Some(h.source);
    rec.process = Some(process(h, exe));
    match d {
        Decision::Net {
            op,
            protocol,
            daddr,
            dport,
            header,
        } => {
            rec.action = match op {
                NetOp::Connect => "net.connect",
                NetOp::Send => "net.send",
            }
            .into();
            rec.rule = header.rule_idx.map(|i| format!("network.rules[{i}]"));
            rec.net = Some(Net {
                family: if daddr.is_ipv4() { "inet" } else { "inet6" }.into(),
                protocol: protocol_name(*protocol),
                daddr: daddr.to_string(),
                dport: *dport,
                domain: None,
            });
        }
        Decision::File {
            read,
            write,
            path,
            header,
        } => {
            rec.action = if *write { "file.write" } else { "file.open" }.into();
            rec.rule = header.rule_idx.map(|i| format!("files.rules[{i}]"));
            let mut access = Vec::new();
            if *read {
                access.push("read".to_string());
            }
            if *write {
                access.push("write".to_string());
            }
            rec.file = Some(File {
                path: path.clone(),
                access,
            });
        }
        Decision::Exec {
            header,
            op,
            path,
            argv,
        } => {
            rec.action = "exec".into();
            rec.rule = header.rule_idx.map(|i| format!("exec.rules[{i}]"));
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
            rec.action = op.action().into();
            rec.rule = Some("self-protection".into());
            if path.is_some() || matches!(op, SelfOp::Cgroup | SelfOp::Bpffs) {
                rec.file = Some(File {
                    path: path.clone(),
                    access: vec!["write".into()],
                });
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
                (SelfOp::Signal | SelfOp::Ptrace, None) => "protected process".into(),
            });
        }
    }
    rec
}

fn base(ts: time::OffsetDateTime, ctx: &SandboxContext) -> Record {
    Record {
        ts: rfc3339(ts),
        seq: 0,
        id: ulid::Ulid::new().to_string(),
        sandbox: ctx.name.clone(),
        action: String::new(),
        verdict: None,
        mode: None,
        source: None,
        rule: None,
        process: None,
        net: None,
        file: None,
        exec: None,
        pdp: None,
        count: None,
        reason: None,
        degraded: ctx.degraded.clone(),
        policy_revision: ctx.policy_revision.clone(),
        prev: String::new(),
    }
}

fn process(h: &Header, exe: Option<String>) -> Process {
    Process {
        pid: h.pid,
        tid: h.tid,
        ppid: h.ppid,
        uid: h.uid,
        gid: h.gid,
        comm: h.comm.clone(),
        exe,
        cgroup_id: h.cgroup_id,
        key: process_key(h.pid, h.start_ns),
        ancestors: h
            .ancestors
            .iter()
            .map(|(pid, comm)| Ancestor {
                pid: *pid,
                comm: comm.clone(),
            })
            .collect(),
    }
}

/// `<pid>:<start ns since boot>`.
pub fn process_key(pid: u32, start_ns: u64) -> String {
    format!("{pid}:{start_ns}")
}

fn protocol_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        n => n.to_string(),
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
