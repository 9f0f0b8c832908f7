//! A policy compiled for one generation (sandbox id), and its installation.
//!
//! Reload without a gap: the new rules are written under a new sandbox id
//! while the kernel still reads the old ones; then the sandbox's
//! `SANDBOXES` entry is replaced in one map update (atomic for every hook:
//! each sees either the old config with the old rules or the new config
//! with the new rules); then the old id's rules are deleted. An action
//! denied by both policies is denied at every instant.

use std::path::{Path, PathBuf};

use pep_common::{
    file::{ExecRuleValue, FileRuleKey, FileRuleValue, InodeKey},
    sandbox::SandboxConfig,
};

use super::{config::Config, state::PolicySource};
use crate::{
    compiler::{self, net::CompiledNet},
    enforcer::{Enforcer, EnforcerError, SandboxSpec},
    pdp::{standalone, task::AskSettings},
    policy::{self, Mode, Policy},
};

pub struct Compiled {
    pub revision: String,
    /// How the sandbox asks its PDP, if its policy asks.
    pub ask: Option<AskPlan>,
    pub config: SandboxConfig,
    pub net: CompiledNet,
    pub files: Vec<(FileRuleKey, FileRuleValue)>,
    pub exec: Vec<(FileRuleKey, ExecRuleValue)>,
    pub inodes: Vec<(InodeKey, FileRuleValue)>,
}

/// How a sandbox whose policy asks a PDP (`network.default: ask`,
/// `exec.default: ask`) asks it: served by the daemon's one ask task
/// (`pdp::task::AskTask::serve`) under the generation's sandbox id.
#[derive(Clone)]
pub struct AskPlan {
    /// The sandbox's name is left empty: the caller knows it.
    pub settings: AskSettings,
    /// `ASK_FLAG_*`.
    pub flags: u32,
}

fn needs_lsm(p: &Policy) -> bool {
    !p.files.rules.is_empty()
        || !p.exec.rules.is_empty()
        || p.files.default == policy::Verdict::Deny
        || p.exec.default == policy::Verdict::Deny
}

/// Reads and validates the policy of `source` (its PDP part included: the
/// engine builds, a rules query's sections replace the file's).
fn load(cfg: &Config, source: &PolicySource, home: &Path) -> Result<(PathBuf, Policy), String> {
    let path = match source {
        PolicySource::Named(n) => cfg
            .policies
            .get(n)
            .ok_or_else(|| format!("no policy named {n} in the config"))?
            .clone(),
        PolicySource::File(p) => p.clone(),
    };
    let ctx = policy::LoadContext::new(home.to_path_buf());
    let mut policy = policy::load_file(&path, &ctx).map_err(|e| e.to_string())?;
    crate::pdp::check_policy(&mut policy, &ctx.home).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, policy))
}

fn ask_plan(path: &Path, policy: &Policy, id: u32) -> Result<Option<AskPlan>, String> {
    if !standalone::asks(policy) {
        return Ok(None);
    }
    let pdp = crate::pdp::build_engine(policy).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(AskPlan {
        settings: standalone::settings(pdp, policy, id, ""),
        flags: standalone::ask_flags(policy),
    }))
}

/// The ask plan of the policy of `source` for sandbox id `id`, without
/// compiling its rules: a restarted daemon that adopted the sandbox's
/// rules as they are pinned still has to ask for it.
pub fn plan_only(
    cfg: &Config,
    source: &PolicySource,
    home: &Path,
    id: u32,
) -> Result<Option<AskPlan>, String> {
    let (path, policy) = load(cfg, source, home)?;
    ask_plan(&path, &policy, id)
}

/// Reads, validates and compiles the policy of `source` for sandbox id `id`.
pub fn compile(
    cfg: &Config,
    source: &PolicySource,
    home: &Path,
    mode: Option<Mode>,
    id: u32,
    lsm: bool,
) -> Result<Compiled, String> {
    let (path, policy) = load(cfg, source, home)?;
    let ask = ask_plan(&path, &policy, id)?;
    if needs_lsm(&policy) && !lsm {
        return Err(format!(
            "{}: files/exec rules need BPF LSM, which this daemon has not loaded ({})",
            path.display(),
            crate::kernel::features::ENABLE_BPF_LSM
        ));
    }
    let net = compiler::net::compile_network(&policy.network, id)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let files = compiler::files::compile_files(&policy.files, id);
    let exec = compiler::exec::compile_exec(&policy.exec, id);
    let mut inodes = compiler::files::inode_denies(&policy.files, &files, id);
    inodes.extend(compiler::exec::inode_denies(&policy.exec, &exec, id));
    let mode = mode.unwrap_or(policy.mode);
    Ok(Compiled {
        revision: policy.revision().to_string(),
        ask,
        config: SandboxConfig {
            sandbox_id: id,
            mode: mode.to_kernel(),
            net_default: net.default_verdict,
            file_default: policy.files.default.to_kernel(),
            exec_default: policy.exec.default.to_kernel(),
            flags: 0,
        },
        net,
        files,
        exec,
        inodes,
    })
}

/// Writes the rules of `c`, then (last, one update) the sandbox entry.
pub fn install(e: &mut Enforcer, cgroup_id: u64, level: u32, c: &Compiled) -> Result<(), EnforcerError> {
    e.install_exec_and_inode_rules(&c.exec, &c.inodes)?;
    e.install_sandbox(
        &SandboxSpec {
            cgroup_id,
            cgroup_level: level,
            config: c.config,
        },
        &c.net,
        &c.files,
    )
}
