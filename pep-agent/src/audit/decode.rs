//! Raw ring-buffer events to typed decisions. Each kind is checked for its
//! exact size and every raw integer converted with `TryFrom`; anything else is
//! an error, never a guess.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pep_common::event::{
    ACCESS_READ, ACCESS_WRITE, AF_INET, AF_INET6, EventHeader, FileEvent, KIND_FILE, KIND_NET, MAX_ANCESTORS,
    NET_OP_CONNECT, NET_OP_SENDMSG, NetEvent, RULE_NONE, SOURCE_DEFAULT, SOURCE_RULE, VERDICT_ALLOW,
    VERDICT_DENY,
};
use pep_common::event::{
    EXEC_OP_EXEC, EXEC_OP_MMAP, EXEC_OP_MPROTECT, ExeIdentity, ExecEvent, KIND_EXEC, KIND_SELF, SELF_BPF,
    SELF_BPFFS, SELF_CGROUP, SELF_MODULE, SELF_MOUNT, SELF_PTRACE, SELF_SIGNAL, SelfEvent,
};
use pep_common::sandbox::{MODE_AUDIT, MODE_ENFORCE};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event of {0} bytes is too short for a header")]
    Short(usize),
    #[error("event kind {kind} should be {want} bytes, got {got}")]
    Size { kind: u32, want: usize, got: usize },
    #[error("unknown event kind {0}")]
    Kind(u32),
    #[error("bad {field} value {value}")]
    Field { field: &'static str, value: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Rule,
    Cache,
    Pdp,
    Default,
}

/// The header fields, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub verdict: Verdict,
    pub mode: Mode,
    pub source: Source,
    pub rule_idx: Option<u32>,
    pub sandbox_id: u32,
    pub ts_boot_ns: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    /// Process start, ns since boot; with `pid`, unique across the boot.
    pub start_ns: u64,
    /// The program image that acted (`audit::exe` names it).
    pub exe: ExeIdentity,
    /// Parent first; at most `MAX_ANCESTORS`.
    pub ancestors: Vec<(u32, String)>,
}

fn comm_str(c: &[u8]) -> String {
    let end = c.iter().position(|b| *b == 0).unwrap_or(c.len());
    String::from_utf8_lossy(&c[..end]).into_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetOp {
    Connect,
    Send,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Net {
        header: Header,
        op: NetOp,
        protocol: u8,
        daddr: IpAddr,
        dport: u16,
    },
    File {
        header: Header,
        read: bool,
        write: bool,
        path: Option<String>,
    },
    /// An exec decision (`exec.rules`).
    Exec {
        header: Header,
        op: ExecOp,
        /// `None` when the path was too long or could not be resolved.
        path: Option<String>,
        argv: Vec<String>,
    },
    /// A self-protection denial: always on, whatever the policy.
    SelfProtect {
        header: Header,
        op: SelfOp,
        /// The target's pid for `Signal` and `Ptrace`.
        target_pid: Option<u32>,
        /// The signal, the bpf command, the ptrace mode, the module read id
        /// or the clone flags (see `pep_common::event::SelfEvent::arg`).
        arg: u64,
        /// The file (cgroup, bpffs, module) or the module name, when known.
        path: Option<String>,
    },
}

/// How an exec decision was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecOp {
    /// execve/execveat.
    Exec,
    /// mmap of the file with PROT_EXEC (e.g. through ld.so).
    Mmap,
    /// mprotect of a mapping of the file to PROT_EXEC.
    Mprotect,
}

/// Which self-protection denied; `action()` is the record's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfOp {
    Bpf,
    Cgroup,
    Signal,
    Ptrace,
    Module,
    Bpffs,
    Mount,
}

impl SelfOp {
    /// The audit record's `action`.
    pub fn action(self) -> &'static str {
        match self {
            SelfOp::Bpf => "self.bpf",
            SelfOp::Cgroup => "self.cgroup",
            SelfOp::Signal => "self.signal",
            SelfOp::Ptrace => "self.ptrace",
            SelfOp::Module => "self.module",
            SelfOp::Bpffs => "self.bpffs",
            SelfOp::Mount => "self.mount",
        }
    }
}

/// The in-use bytes of a kernel path buffer, or `None` (`u32::MAX` or out of
/// range: too long or unresolvable).
fn path_str(buf: &[u8], len: u32) -> Option<String> {
    usize::try_from(len)
        .ok()
        .filter(|l| *l <= buf.len())
        .map(|l| String::from_utf8_lossy(&buf[..l]).into_owned())
}

fn decode_exec(ev: &ExecEvent) -> Result<Decision, DecodeError> {
    let header = Header::try_from(&ev.header)?;
    let op = match ev.op {
        EXEC_OP_EXEC => ExecOp::Exec,
        EXEC_OP_MMAP => ExecOp::Mmap,
        EXEC_OP_MPROTECT => ExecOp::Mprotect,
        v => {
            return Err(DecodeError::Field {
                field: "exec op",
                value: v,
            });
        }
    };
    let used = usize::try_from(ev.argv_len)
        .ok()
        .filter(|l| *l <= ev.argv.len())
        .ok_or(DecodeError::Field {
            field: "argv_len",
            value: ev.argv_len,
        })?;
    let argv = ev.argv[..used]
        .split(|b| *b == 0)
        .take(ev.argc as usize)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Ok(Decision::Exec {
        header,
        op,
        path: path_str(&ev.path, ev.path_len),
        argv,
    })
}

fn decode_self(ev: &SelfEvent) -> Result<Decision, DecodeError> {
    let header = Header::try_from(&ev.header)?;
    let op = match ev.op {
        SELF_BPF => SelfOp::Bpf,
        SELF_CGROUP => SelfOp::Cgroup,
        SELF_SIGNAL => SelfOp::Signal,
        SELF_PTRACE => SelfOp::Ptrace,
        SELF_MODULE => SelfOp::Module,
        SELF_BPFFS => SelfOp::Bpffs,
        SELF_MOUNT => SelfOp::Mount,
        v => {
            return Err(DecodeError::Field {
                field: "self op",
                value: v,
            });
        }
    };
    Ok(Decision::SelfProtect {
        header,
        op,
        target_pid: (ev.target_pid != 0).then_some(ev.target_pid),
        arg: ev.arg,
        path: path_str(&ev.path, ev.path_len),
    })
}

impl Decision {
    pub fn header(&self) -> &Header {
        match self {
            Decision::Net { header, .. }
            | Decision::File { header, .. }
            | Decision::Exec { header, .. }
            | Decision::SelfProtect { header, .. } => header,
        }
    }
}

fn read<T: Copy>(bytes: &[u8]) -> T {
    debug_assert!(bytes.len() >= size_of::<T>());
    // SAFETY: the caller checked the length; T is plain old data and
    // read_unaligned tolerates the ring buffer's 8-byte alignment.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

impl TryFrom<&EventHeader> for Header {
    type Error = DecodeError;

    fn try_from(h: &EventHeader) -> Result<Self, DecodeError> {
        let verdict = match h.verdict {
            VERDICT_ALLOW => Verdict::Allow,
            VERDICT_DENY => Verdict::Deny,
            v => {
                return Err(DecodeError::Field {
                    field: "verdict",
                    value: v,
                });
            }
        };
        let mode = match h.mode {
            MODE_ENFORCE => Mode::Enforce,
            MODE_AUDIT => Mode::Audit,
            v => {
                return Err(DecodeError::Field {
                    field: "mode",
                    value: v,
                });
            }
        };
        let source = match h.source {
            SOURCE_RULE => Source::Rule,
            SOURCE_DEFAULT => Source::Default,
            pep_common::event::SOURCE_CACHE => Source::Cache,
            pep_common::event::SOURCE_PDP => Source::Pdp,
            v => {
                return Err(DecodeError::Field {
                    field: "source",
                    value: v,
                });
            }
        };
        let n = usize::try_from(h.n_ancestors)
            .ok()
            .filter(|n| *n <= MAX_ANCESTORS)
            .ok_or(DecodeError::Field {
                field: "n_ancestors",
                value: h.n_ancestors,
            })?;
        Ok(Header {
            verdict,
            mode,
            source,
            rule_idx: (h.rule_idx != RULE_NONE).then_some(h.rule_idx),
            sandbox_id: h.sandbox_id,
            ts_boot_ns: h.ts_boot_ns,
            cgroup_id: h.cgroup_id,
            pid: h.pid,
            tid: h.tid,
            ppid: h.ppid,
            uid: h.uid,
            gid: h.gid,
            comm: comm_str(&h.comm),
            start_ns: h.start_ns,
            exe: h.exe,
            ancestors: h.ancestors[..n]
                .iter()
                .map(|a| (a.pid, comm_str(&a.comm)))
                .collect(),
        })
    }
}

impl TryFrom<&[u8]> for Decision {
    type Error = DecodeError;

    fn try_from(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < size_of::<EventHeader>() {
            return Err(DecodeError::Short(bytes.len()));
        }
        let kind: u32 = read(bytes);
        let want = match kind {
            KIND_NET => size_of::<NetEvent>(),
            KIND_FILE => size_of::<FileEvent>(),
            KIND_EXEC => size_of::<ExecEvent>(),
            KIND_SELF => size_of::<SelfEvent>(),
            k => return Err(DecodeError::Kind(k)),
        };
        if bytes.len() < want {
            return Err(DecodeError::Size {
                kind,
                want,
                got: bytes.len(),
            });
        }
        match kind {
            KIND_NET => {
                let ev: NetEvent = read(bytes);
                let header = Header::try_from(&ev.header)?;
                let op = match ev.op {
                    NET_OP_CONNECT => NetOp::Connect,
                    NET_OP_SENDMSG => NetOp::Send,
                    v => {
                        return Err(DecodeError::Field {
                            field: "op",
                            value: v,
                        });
                    }
                };
                let daddr = match ev.family {
                    AF_INET => IpAddr::V4(Ipv4Addr::new(ev.daddr[0], ev.daddr[1], ev.daddr[2], ev.daddr[3])),
                    AF_INET6 => IpAddr::V6(Ipv6Addr::from(ev.daddr)),
                    v => {
                        return Err(DecodeError::Field {
                            field: "family",
                            value: v,
                        });
                    }
                };
                let protocol = u8::try_from(ev.protocol).map_err(|_| DecodeError::Field {
                    field: "protocol",
                    value: ev.protocol,
                })?;
                let dport = u16::try_from(ev.dport).map_err(|_| DecodeError::Field {
                    field: "dport",
                    value: ev.dport,
                })?;
                Ok(Decision::Net {
                    header,
                    op,
                    protocol,
                    daddr,
                    dport,
                })
            }
            KIND_EXEC => decode_exec(&read::<ExecEvent>(bytes)),
            KIND_SELF => decode_self(&read::<SelfEvent>(bytes)),
            _ => {
                let ev: FileEvent = read(bytes);
                let header = Header::try_from(&ev.header)?;
                let path = usize::try_from(ev.path_len)
                    .ok()
                    .filter(|l| *l <= ev.path.len())
                    .map(|l| String::from_utf8_lossy(&ev.path[..l]).into_owned());
                Ok(Decision::File {
                    header,
                    read: ev.access & ACCESS_READ != 0,
                    write: ev.access & ACCESS_WRITE != 0,
                    path,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_net(verdict: u32, family: u32) -> Vec<u8> {
        let mut ev: NetEvent = unsafe { std::mem::zeroed() };
        ev.header.kind = KIND_NET;
        ev.header.verdict = verdict;
        ev.header.mode = MODE_ENFORCE;
        ev.header.source = SOURCE_RULE;
        ev.header.rule_idx = 1;
        ev.header.pid = 42;
        ev.header.comm[..4].copy_from_slice(b"curl");
        ev.header.start_ns = 77;
        ev.header.n_ancestors = 2;
        ev.header.ancestors[0].pid = 41;
        ev.header.ancestors[0].comm[..4].copy_from_slice(b"bash");
        ev.header.ancestors[1].pid = 1;
        ev.header.ancestors[1].comm[..7].copy_from_slice(b"systemd");
        ev.family = family;
        ev.op = NET_OP_CONNECT;
        ev.protocol = 6;
        ev.dport = 80;
        ev.daddr[..4].copy_from_slice(&[169, 254, 169, 254]);
        // SAFETY: NetEvent is plain data.
        unsafe { std::slice::from_raw_parts((&ev as *const NetEvent).cast::<u8>(), size_of::<NetEvent>()) }
            .to_vec()
    }

    #[test]
    fn decodes_a_net_event() {
        let d = Decision::try_from(raw_net(VERDICT_DENY, AF_INET).as_slice()).unwrap();
        let Decision::Net {
            header,
            op,
            daddr,
            dport,
            protocol,
        } = d
        else {
            panic!("not net: {d:?}")
        };
        assert_eq!(header.verdict, Verdict::Deny);
        assert_eq!(header.comm, "curl");
        assert_eq!(header.rule_idx, Some(1));
        assert_eq!(header.start_ns, 77);
        assert_eq!(
            header.ancestors,
            vec![(41, "bash".to_string()), (1, "systemd".to_string())]
        );
        assert_eq!(op, NetOp::Connect);
        assert_eq!(daddr, "169.254.169.254".parse::<IpAddr>().unwrap());
        assert_eq!((dport, protocol), (80, 6));
    }

    #[test]
    fn decodes_exec_and_self_events() {
        // SAFETY: plain data.
        let mut ev: ExecEvent = unsafe { std::mem::zeroed() };
        ev.header.kind = KIND_EXEC;
        ev.header.verdict = VERDICT_DENY;
        ev.header.mode = MODE_ENFORCE;
        ev.header.source = SOURCE_RULE;
        ev.op = EXEC_OP_EXEC;
        ev.path[..11].copy_from_slice(b"/usr/bin/nc");
        ev.path_len = 11;
        ev.argv[..12].copy_from_slice(b"nc\0-l\0cut-of");
        ev.argc = 3;
        ev.argv_len = 12;
        // SAFETY: plain data.
        let raw = unsafe {
            std::slice::from_raw_parts((&ev as *const ExecEvent).cast::<u8>(), size_of::<ExecEvent>())
        };
        let Decision::Exec { op, path, argv, .. } = Decision::try_from(raw).unwrap() else {
            panic!("not exec")
        };
        assert_eq!((op, path.as_deref()), (ExecOp::Exec, Some("/usr/bin/nc")));
        assert_eq!(argv, ["nc", "-l", "cut-of"], "the last argument may be cut short");
        // SAFETY: plain data.
        let mut sev: SelfEvent = unsafe { std::mem::zeroed() };
        sev.header.kind = KIND_SELF;
        sev.header.verdict = VERDICT_DENY;
        sev.header.source = SOURCE_DEFAULT;
        sev.op = SELF_SIGNAL;
        sev.target_pid = 7;
        sev.arg = 15;
        sev.path_len = u32::MAX;
        // SAFETY: plain data.
        let raw = unsafe {
            std::slice::from_raw_parts((&sev as *const SelfEvent).cast::<u8>(), size_of::<SelfEvent>())
        };
        let Decision::SelfProtect {
            op,
            target_pid,
            arg,
            path,
            ..
        } = Decision::try_from(raw).unwrap()
        else {
            panic!("not self")
        };
        assert_eq!(
            (op.action(), target_pid, arg, path),
            ("self.signal", Some(7), 15, None)
        );
        sev.op = 99;
        // SAFETY: plain data.
        let raw = unsafe {
            std::slice::from_raw_parts((&sev as *const SelfEvent).cast::<u8>(), size_of::<SelfEvent>())
        };
        assert!(matches!(
            Decision::try_from(raw),
            Err(DecodeError::Field {
                field: "self op",
                value: 99
            })
        ));
    }

    #[test]
    fn rejects_bad_events() {
        assert_eq!(Decision::try_from(&[0u8; 8][..]), Err(DecodeError::Short(8)));
        assert!(matches!(
            Decision::try_from(raw_net(7, AF_INET).as_slice()),
            Err(DecodeError::Field {
                field: "verdict",
                value: 7
            })
        ));
        assert!(matches!(
            Decision::try_from(raw_net(VERDICT_ALLOW, 99).as_slice()),
            Err(DecodeError::Field {
                field: "family",
                value: 99
            })
        ));
        let mut raw = raw_net(VERDICT_ALLOW, AF_INET);
        // n_ancestors beyond the array is rejected, never read out of bounds.
        let off = std::mem::offset_of!(EventHeader, n_ancestors);
        raw[off..off + 4].copy_from_slice(&5u32.to_ne_bytes());
        assert!(matches!(
            Decision::try_from(raw.as_slice()),
            Err(DecodeError::Field {
                field: "n_ancestors",
                value: 5
            })
        ));
        let raw = raw_net(VERDICT_ALLOW, AF_INET);
        assert!(matches!(
            Decision::try_from(&raw[..raw.len() - 1]),
            Err(DecodeError::Size { .. })
        ));
    }
}
