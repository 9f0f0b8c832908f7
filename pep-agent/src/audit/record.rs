//! SPEC's audit record: one JSON object per line, numbered by `seq` and
//! chained by `prev` (the SHA-256 of the previous line).

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    clock::{BootClock, rfc3339},
    decode::{Decision, Header, Mode, NetOp, Source, Verdict},
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
    /// For `audit.lost`: how many events the kernel could not deliver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
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
    let d = Sha256::digest(line.as_bytes());
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
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
        let h = d.header();
        let mut rec = base(self.clock.to_wall(h.ts_boot_ns), ctx);
        rec.verdict = Some(h.verdict);
        rec.mode = Some(h.mode);
        rec.source = Some(h.source);
        rec.process = Some(process(h));
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
        }
        self.seal(rec)
    }

    /// An in-band `audit.lost` record for `count` events the kernel could
    /// not deliver.
    pub fn lost(&mut self, count: u64, ctx: &SandboxContext) -> (Record, String) {
        let mut rec = base(time::OffsetDateTime::now_utc(), ctx);
        rec.action = "audit.lost".into();
        rec.count = Some(count);
        self.seal(rec)
    }

    fn seal(&mut self, mut rec: Record) -> (Record, String) {
        rec.seq = self.next_seq;
        rec.prev = std::mem::take(&mut self.prev);
        let line = serde_json::to_string(&rec).expect("records always serialize");
        self.prev = line_hash(&line);
        self.next_seq += 1;
        (rec, line)
    }
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
        degraded: ctx.degraded.clone(),
        policy_revision: ctx.policy_revision.clone(),
        prev: String::new(),
    }
}

fn process(h: &Header) -> Process {
    Process {
        pid: h.pid,
        tid: h.tid,
        ppid: h.ppid,
        uid: h.uid,
        gid: h.gid,
        comm: h.comm.clone(),
        // Best effort: the process may be gone by the time the event is read.
        exe: std::fs::read_link(format!("/proc/{}/exe", h.pid))
            .ok()
            .map(|p| p.display().to_string()),
        cgroup_id: h.cgroup_id,
    }
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
    }
}
