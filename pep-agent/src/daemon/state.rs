//! What a restarted daemon needs to adopt its sandboxes: names, cgroups,
//! owners, policy sources and the sandbox ids (generations) in the kernel
//! maps. One JSON file, replaced atomically (write, fsync, rename).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{audit::pipeline::Losses, policy::Mode};

/// Where a sandbox's policy comes from, so a reload can read it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    /// A policy named in the config's `policies`.
    Named(String),
    /// A file given by root.
    File(PathBuf),
}

impl std::fmt::Display for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PolicySource::Named(n) => write!(f, "{n}"),
            PolicySource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub name: String,
    /// The cgroup directory.
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub level: u32,
    /// The daemon made the cgroup (and removes it, with its processes, at
    /// delete); false for an adopted cgroup, which is only released.
    pub created: bool,
    pub owner_uid: u32,
    pub policy: PolicySource,
    /// `mode` override given at create: `enforce` or `audit`.
    pub mode: Option<String>,
    /// The current generation: the sandbox id its rules and events carry.
    pub sandbox_id: u32,
    pub revision: String,
    /// Deleted by the daemon once its cgroup is empty (`run` through the
    /// daemon).
    #[serde(default)]
    pub ephemeral: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// The next sandbox id to hand out; ids are never reused within a boot,
    /// so a late event of a retired generation is never misattributed.
    pub next_id: u32,
    pub sandboxes: Vec<SandboxRecord>,
    /// Retired generations (id, sandbox name), newest last, for events that
    /// were still in the ring buffer when their generation was replaced.
    #[serde(default)]
    pub retired: Vec<(u32, String)>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            next_id: 1,
            sandboxes: Vec::new(),
            retired: Vec::new(),
        }
    }
}

/// How many retired generations are remembered.
const MAX_RETIRED: usize = 1024;

impl State {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("state.json")
    }

    /// The saved state, or a fresh one when there is none.
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let p = Self::path(state_dir);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", p.display())),
        }
    }

    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        let p = Self::path(state_dir);
        let tmp = p.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }

    pub fn alloc_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    pub fn retire(&mut self, id: u32, name: &str) {
        self.retired.push((id, name.to_string()));
        if self.retired.len() > MAX_RETIRED {
            let cut = self.retired.len() - MAX_RETIRED;
            self.retired.drain(..cut);
        }
    }

    pub fn find(&self, name: &str) -> Option<&SandboxRecord> {
        self.sandboxes.iter().find(|s| s.name == name)
    }
}

/// The kernel's lost-decision counts already reported in the audit log,
/// kept beside the state so a restarted daemon reports only what is new:
/// `RING ASK` (a daemon before asks were counted wrote `RING` alone).
pub fn load_lost_reported(state_dir: &Path) -> Losses {
    let text = std::fs::read_to_string(state_dir.join("audit-lost-reported")).unwrap_or_default();
    let mut n = text.split_whitespace().map(|w| w.parse().unwrap_or(0));
    Losses {
        ring: n.next().unwrap_or(0),
        ask: n.next().unwrap_or(0),
    }
}

pub fn save_lost_reported(state_dir: &Path, n: Losses) -> std::io::Result<()> {
    let p = state_dir.join("audit-lost-reported");
    let tmp = state_dir.join("audit-lost-reported.tmp");
    std::fs::write(&tmp, format!("{} {}", n.ring, n.ask))?;
    std::fs::rename(tmp, p)
}

impl SandboxRecord {
    /// The `mode` override, parsed.
    pub fn mode(&self) -> Option<Mode> {
        match self.mode.as_deref() {
            Some("audit") => Some(Mode::Audit),
            Some("enforce") => Some(Mode::Enforce),
            _ => None,
        }
    }
}

/// How a mode override is stored.
pub fn mode_name(m: Option<Mode>) -> Option<String> {
    m.map(|m| match m {
        Mode::Enforce => "enforce".to_string(),
        Mode::Audit => "audit".to_string(),
    })
}

#[cfg(test)]
mod lost_tests {
    use super::*;

    #[test]
    fn both_counts_round_trip_and_an_older_single_count_reads_as_the_ring() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(load_lost_reported(d.path()), Losses::default(), "none saved");
        let n = Losses { ring: 7, ask: 3 };
        save_lost_reported(d.path(), n).expect("save");
        assert_eq!(load_lost_reported(d.path()), n);
        std::fs::write(d.path().join("audit-lost-reported"), "12").expect("write");
        assert_eq!(load_lost_reported(d.path()), Losses { ring: 12, ask: 0 });
    }
}
