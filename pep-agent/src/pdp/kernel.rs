//! The kernel programs and maps of asking (`pep-ebpf/src/ask.rs`): loading,
//! attaching to a sandbox's cgroup, and handing the maps to the PDP task.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{CgroupSkb, ProgramError, SockOps},
};
use pep_common::{
    ask::{AppliedAnswer, AppliedKey, AskEvent, AskSandbox, VerdictEntry, VerdictKey},
    event::{COUNTER_ASK_LOST, COUNTER_CACHE_HIT, COUNTER_CACHE_MISS},
};

use crate::{
    audit::ring::CommitRing,
    enforcer::{Enforcer, EnforcerError, attach},
};

pub const SOCK_OPS_PROGRAM: &str = "ask_sock_ops";
pub const EGRESS_PROGRAM: &str = "ask_egress";
/// `enum bpf_attach_type`: BPF_CGROUP_INET_EGRESS, BPF_CGROUP_SOCK_OPS.
const ATTACH_EGRESS: u32 = 1;
const ATTACH_SOCK_OPS: u32 = 3;
/// The programs that hold a connect, with their attach types: the sock_ops
/// program first (`enforcer::pinned` loads them in this order).
pub const ASK_PROGRAMS: [(&str, u32); 2] = [
    (SOCK_OPS_PROGRAM, ATTACH_SOCK_OPS),
    (EGRESS_PROGRAM, ATTACH_EGRESS),
];

/// The maps the PDP task owns.
pub struct AskMaps {
    pub cache: HashMap<MapData, VerdictKey, VerdictEntry>,
    pub pending: HashMap<MapData, u64, AskEvent>,
    pub sandboxes: HashMap<MapData, u32, AskSandbox>,
    /// `ASK_APPLIED`: the host daemon's (`pdp::acks`); `pep-agent run`
    /// leaves it.
    pub applied: Option<HashMap<MapData, AppliedKey, AppliedAnswer>>,
}

/// Verdict-cache counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AskCounters {
    pub hits: u64,
    pub misses: u64,
    pub lost: u64,
}

impl AskCounters {
    /// Read from a `COUNTERS` map (the enforcer's, or a pinned one).
    pub fn from_map(map: &aya::maps::Map) -> Result<Self, EnforcerError> {
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err("COUNTERS"))?;
        let sum = |i: u32| -> Result<u64, EnforcerError> {
            Ok(arr.get(&i, 0).map_err(map_err("COUNTERS"))?.iter().sum())
        };
        Ok(Self {
            hits: sum(COUNTER_CACHE_HIT)?,
            misses: sum(COUNTER_CACHE_MISS)?,
            lost: sum(COUNTER_ASK_LOST)?,
        })
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> EnforcerError {
    move |source| EnforcerError::Program { name, source }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EnforcerError {
    move |source| EnforcerError::Map { name, source }
}

impl Enforcer {
    /// Loads the sock_ops and cgroup_skb programs that hold connects.
    pub fn load_ask(&mut self) -> Result<(), EnforcerError> {
        let p: &mut SockOps = self
            .ebpf
            .program_mut(SOCK_OPS_PROGRAM)
            .ok_or(EnforcerError::Program {
                name: SOCK_OPS_PROGRAM,
                source: ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(prog_err(SOCK_OPS_PROGRAM))?;
        p.load().map_err(prog_err(SOCK_OPS_PROGRAM))?;
        let p: &mut CgroupSkb = self
            .ebpf
            .program_mut(EGRESS_PROGRAM)
            .ok_or(EnforcerError::Program {
                name: EGRESS_PROGRAM,
                source: ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(prog_err(EGRESS_PROGRAM))?;
        p.load().map_err(prog_err(EGRESS_PROGRAM))?;
        Ok(())
    }

    /// Attaches the asking programs to a sandbox cgroup (held by the cgroup,
    /// like the network hooks). Attach these before the connect hooks: a
    /// connect held without them would not be held at all.
    pub fn attach_ask(&mut self, cgroup_path: &Path) -> Result<(), EnforcerError> {
        self.ask_attach_op(cgroup_path, attach::Op::Attach)
    }

    pub fn detach_ask(&mut self, cgroup_path: &Path) -> Result<(), EnforcerError> {
        self.ask_attach_op(cgroup_path, attach::Op::Detach)
    }

    fn ask_attach_op(&mut self, cgroup_path: &Path, op: attach::Op) -> Result<(), EnforcerError> {
        let file = File::open(cgroup_path).map_err(|source| EnforcerError::Cgroup {
            path: cgroup_path.display().to_string(),
            source,
        })?;
        for (name, attach_type) in ASK_PROGRAMS {
            let prog = self.ebpf.program(name).ok_or(EnforcerError::Program {
                name,
                source: ProgramError::UnexpectedProgramType,
            })?;
            let fd = prog.fd().map_err(prog_err(name))?;
            attach::cgroup(op, file.as_fd(), fd.as_fd(), attach_type).map_err(|source| {
                EnforcerError::Cgroup {
                    path: format!("{} ({name}, {op:?})", cgroup_path.display()),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Marks sandbox `sandbox_id` as asking (write before the sandbox entry,
    /// so its first connect already asks).
    pub fn set_ask_sandbox(&mut self, sandbox_id: u32, cfg: AskSandbox) -> Result<(), EnforcerError> {
        let map = self
            .ebpf
            .map_mut("ASK_SANDBOXES")
            .ok_or(EnforcerError::NoMap("ASK_SANDBOXES"))?;
        let mut m: HashMap<&mut MapData, u32, AskSandbox> =
            HashMap::try_from(map).map_err(map_err("ASK_SANDBOXES"))?;
        m.insert(sandbox_id, cfg, 0).map_err(map_err("ASK_SANDBOXES"))
    }

    /// The maps and ring buffer of asking. Can be taken once.
    pub fn take_ask(&mut self) -> Result<(AskMaps, CommitRing), EnforcerError> {
        let mut take = |name: &'static str| self.ebpf.take_map(name).ok_or(EnforcerError::NoMap(name));
        let cache = HashMap::try_from(take("VERDICT_CACHE")?).map_err(map_err("VERDICT_CACHE"))?;
        let pending = HashMap::try_from(take("PENDING")?).map_err(map_err("PENDING"))?;
        let sandboxes = HashMap::try_from(take("ASK_SANDBOXES")?).map_err(map_err("ASK_SANDBOXES"))?;
        let applied = HashMap::try_from(take("ASK_APPLIED")?).map_err(map_err("ASK_APPLIED"))?;
        let asks = match take("ASKS")? {
            aya::maps::Map::RingBuf(data) => {
                CommitRing::new(data).map_err(|source| EnforcerError::Ring { name: "ASKS", source })?
            }
            _ => return Err(EnforcerError::NoMap("ASKS")),
        };
        Ok((
            AskMaps {
                cache,
                pending,
                sandboxes,
                applied: Some(applied),
            },
            asks,
        ))
    }

    /// Verdict-cache hits, misses and lost asks counted by the kernel.
    pub fn ask_counters(&self) -> Result<AskCounters, EnforcerError> {
        let map = self
            .ebpf
            .map("COUNTERS")
            .ok_or(EnforcerError::NoMap("COUNTERS"))?;
        AskCounters::from_map(map)
    }
}
