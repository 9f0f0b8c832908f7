//! Raw ring-buffer events to typed decisions. Each kind is checked for its
//! exact size and every raw integer converted with `TryFrom`; anything else is
//! an error, never a guess.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pep_common::event::{
    ACCESS_READ, ACCESS_WRITE, AF_INET, AF_INET6, EventHeader, FileEvent, KIND_FILE, KIND_NET,
    NET_OP_CONNECT, NET_OP_SENDMSG, NetEvent, RULE_NONE, SOURCE_DEFAULT, SOURCE_RULE, VERDICT_ALLOW,
    VERDICT_DENY,
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
}

impl Decision {
    pub fn header(&self) -> &Header {
        match self {
            Decision::Net { header, .. } | Decision::File { header, .. } => header,
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
            v => {
                return Err(DecodeError::Field {
                    field: "source",
                    value: v,
                });
            }
        };
        let end = h.comm.iter().position(|b| *b == 0).unwrap_or(h.comm.len());
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
            comm: String::from_utf8_lossy(&h.comm[..end]).into_owned(),
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
        assert_eq!(op, NetOp::Connect);
        assert_eq!(daddr, "169.254.169.254".parse::<IpAddr>().unwrap());
        assert_eq!((dport, protocol), (80, 6));
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
        let raw = raw_net(VERDICT_ALLOW, AF_INET);
        assert!(matches!(
            Decision::try_from(&raw[..raw.len() - 1]),
            Err(DecodeError::Size { .. })
        ));
    }
}
