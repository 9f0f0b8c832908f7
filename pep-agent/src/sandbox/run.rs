//! `pep-agent run`: standalone, as root. Creates the sandbox cgroup, loads and
//! attaches the programs, installs the compiled policy, starts the command
//! inside the cgroup, streams the audit records, and tears everything down
//! whatever way the command or pep-agent ends.

use std::{
    os::unix::process::{CommandExt as _, ExitStatusExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use pep_common::sandbox::SandboxConfig;
use tokio::signal::unix::SignalKind;

use super::child::ChildSetup;
use crate::{
    audit::{
        pipeline::{AuditOptions, KernelCounters, Pipeline},
        pump,
        record::SandboxContext,
        sink::Sink,
    },
    compiler,
    enforcer::{Enforcer, SandboxSpec},
    kernel::{cgroup, features::ENABLE_BPF_LSM},
    policy::{self, Policy},
};

/// The sandbox id of a standalone run: it is alone in its maps.
const STANDALONE_SANDBOX_ID: u32 = 1;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub policy: PathBuf,
    pub name: Option<String>,
    pub mode: Option<policy::Mode>,
    pub audit: Option<String>,
    pub user: Option<String>,
    pub allow_degraded: bool,
    pub cmd: Vec<String>,
    /// Rotation, live socket, coalescing.
    pub audit_opts: AuditOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Exit 1: bad input.
    #[error("{0}")]
    BadInput(String),
    /// Exit 2: the kernel or the host lacks what is needed.
    #[error("{0}")]
    Unsupported(String),
    /// Exit 127: the command was not found.
    #[error("{0}: command not found")]
    NotFound(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::BadInput(_) | RunError::Other(_) => 1,
            RunError::Unsupported(_) => 2,
            RunError::NotFound(_) => 127,
        }
    }
}

/// Runs the command; returns its exit status as a shell reports it.
pub async fn run(opts: RunOptions) -> Result<i32, RunError> {
    let user = match &opts.user {
        Some(name) => Some(
            nix::unistd::User::from_name(name)
                .map_err(|e| RunError::BadInput(format!("--user {name}: {e}")))?
                .ok_or_else(|| RunError::BadInput(format!("--user {name}: no such user")))?,
        ),
        None => None,
    };
    let home = match &user {
        Some(u) => u.dir.clone(),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/root".into()),
    };
    let ctx = policy::LoadContext::new(home);
    let mut policy = policy::load_file(&opts.policy, &ctx).map_err(|e| RunError::BadInput(e.to_string()))?;
    // The PDP part (issue 9): Rego must parse; a rules query's sections
    // replace the file's before anything is compiled.
    crate::pdp::check_policy(&mut policy, &ctx.home)
        .map_err(|e| RunError::BadInput(format!("{}: {e}", opts.policy.display())))?;
    let asks = crate::pdp::standalone::asks(&policy);
    let pdp_engine = if asks {
        Some(crate::pdp::build_engine(&policy).map_err(RunError::BadInput)?)
    } else {
        None
    };
    let mode = opts.mode.unwrap_or(policy.mode);
    let name = opts
        .name
        .clone()
        .or_else(|| policy.name.clone())
        .unwrap_or_else(|| "sandbox".into());
    let net = compiler::net::compile_network(&policy.network, STANDALONE_SANDBOX_ID)
        .map_err(|e| RunError::BadInput(format!("{}: {e}", opts.policy.display())))?;

    if !nix::unistd::geteuid().is_root() {
        return Err(RunError::Unsupported(
            "pep-agent run needs root to load eBPF programs (run it with sudo, or start `pep-agent daemon` and run through it)"
                .into(),
        ));
    }
    let cg_root = cgroup::cgroup2_root().map_err(|e| RunError::Unsupported(e.to_string()))?;
    let cmd0 = opts
        .cmd
        .first()
        .ok_or_else(|| RunError::BadInput("no command given after --".into()))?;
    let program = resolve_program(cmd0).ok_or_else(|| RunError::NotFound(cmd0.clone()))?;

    let needs_lsm = needs_lsm(&policy);
    // The LSM programs also carry self-protection (no bpf(), no cgroup
    // writes, no signals to pep-agent...), which is on for every sandbox
    // whatever its policy, so they are loaded whenever the kernel allows.
    // One load whatever the outcome: the object is parsed, relocated and
    // verified once, and the LSM part dropped if the kernel refuses it.
    let (mut enforcer, lsm_missing) = Enforcer::load_lsm_if_available()
        .map_err(|e| RunError::Unsupported(format!("cannot load the eBPF programs: {e}")))?;
    let mut degraded = None;
    match lsm_missing {
        None => {}
        Some(reason) if !needs_lsm => {
            tracing::warn!("BPF LSM is unavailable ({reason}): self-protection is not enforced");
        }
        Some(reason) if opts.allow_degraded => {
            let msg = format!("files and exec rules are NOT enforced: {reason}");
            tracing::warn!("--allow-degraded: {msg}");
            eprintln!("pep-agent: WARNING: {msg}");
            degraded = Some(msg);
        }
        Some(reason) => {
            return Err(RunError::Unsupported(format!(
                "the policy has files/exec rules, which need BPF LSM: {reason}. To enable it: {ENABLE_BPF_LSM}; or pass --allow-degraded to enforce the network part only"
            )));
        }
    }

    sweep_stale(&cg_root);
    let rel = Path::new(CGROUP_PARENT).join(format!("{name}.{}", std::process::id()));
    let mut cg = cgroup::Cgroup::create(&cg_root, &rel).map_err(|e| RunError::Unsupported(e.to_string()))?;
    let files = compiler::files::compile_files(&policy.files, STANDALONE_SANDBOX_ID);
    let spec = SandboxSpec {
        cgroup_id: cg.id(),
        cgroup_level: cg.level(),
        config: SandboxConfig {
            sandbox_id: STANDALONE_SANDBOX_ID,
            mode: mode.to_kernel(),
            net_default: net.default_verdict,
            file_default: policy.files.default.to_kernel(),
            exec_default: policy.exec.default.to_kernel(),
            flags: 0,
        },
    };
    let exec = compiler::exec::compile_exec(&policy.exec, STANDALONE_SANDBOX_ID);
    // Inode identity of denied files and binaries (hard links), stat'ed now.
    let mut inodes = compiler::files::inode_denies(&policy.files, &files, STANDALONE_SANDBOX_ID);
    inodes.extend(compiler::exec::inode_denies(
        &policy.exec,
        &exec,
        STANDALONE_SANDBOX_ID,
    ));
    enforcer
        .install_exec_and_inode_rules(&exec, &inodes)
        .map_err(|e| RunError::Other(e.into()))?;
    if asks {
        crate::pdp::standalone::prepare_for(&mut enforcer, &policy, STANDALONE_SANDBOX_ID)
            .map_err(|e| RunError::Unsupported(format!("cannot load the PDP programs: {e}")))?;
    }
    // DNS-aware policy (issue 7): the resolver's port must be in the kernel
    // before the sandbox entry is published, and the upstream known.
    let dns_prepared = if crate::dns::wanted(&policy) {
        crate::dns::upstream(&policy).map_err(RunError::BadInput)?;
        Some(
            crate::dns::prepare(&mut enforcer, STANDALONE_SANDBOX_ID)
                .map_err(|e| RunError::Unsupported(format!("cannot start the DNS resolver: {e}")))?,
        )
    } else {
        None
    };
    enforcer
        .install_sandbox(&spec, &net, &files)
        .map_err(|e| RunError::Other(e.into()))?;
    if dns_prepared.is_some() {
        crate::dns::attach(&mut enforcer, cg.path(), crate::enforcer::attach::Op::Attach)
            .map_err(|e| RunError::Other(e.into()))?;
    }
    if asks {
        // Before the connect hooks: a connect they hold must be held.
        enforcer
            .attach_ask(cg.path())
            .map_err(|e| RunError::Other(e.into()))?;
    }
    enforcer
        .attach_net(cg.path())
        .map_err(|e| RunError::Other(e.into()))?;

    let sink = match &opts.audit {
        Some(t) => Sink::open_rotating(t, opts.audit_opts.rotation)
            .map_err(|e| RunError::BadInput(format!("--audit {t}: {e}")))?,
        None => Sink::null(),
    };
    let sctx = SandboxContext {
        name: name.clone(),
        policy_revision: policy.revision().to_string(),
        degraded,
    };
    let dns_cfg = match &dns_prepared {
        Some(_) => Some(
            crate::dns::standalone_config(
                &policy,
                STANDALONE_SANDBOX_ID,
                &name,
                cg.path(),
                mode,
                sctx.degraded.clone(),
            )
            .map_err(RunError::BadInput)?,
        ),
        None => None,
    };
    let events = enforcer.take_events().map_err(|e| RunError::Other(e.into()))?;
    let counters = Arc::new(KernelCounters::of(&enforcer)?);
    let mut pipeline =
        Pipeline::new(sink, sctx, &opts.audit_opts).map_err(|e| RunError::BadInput(format!("{e:#}")))?;
    let stop = Arc::new(AtomicBool::new(false));
    let ask_task = match pdp_engine {
        Some(engine) => Some(
            crate::pdp::standalone::start(&mut enforcer, engine, &policy, &name, &mut pipeline, stop.clone())
                .map_err(|e| RunError::Other(e.into()))?,
        ),
        None => None,
    };
    // Serving before the command starts: its first lookup is answered.
    let dns = match (dns_prepared, dns_cfg) {
        (Some(prepared), Some(cfg)) => Some(crate::dns::start(prepared, &mut enforcer, cfg, &mut pipeline)?),
        _ => None,
    };
    let pump = tokio::spawn(pump::pump(events, Some(counters.clone()), pipeline, stop.clone()));
    let pump = Pump { task: pump, counters };

    let setup = ChildSetup::new(cg.path(), user.as_ref()).map_err(|e| RunError::Other(e.into()))?;
    let mut command = std::process::Command::new(&program);
    command.arg0(cmd0).args(&opts.cmd[1..]);
    if let Some(u) = &user {
        command
            .env("HOME", &u.dir)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name);
    }
    // SAFETY: `apply` makes only async-signal-safe system calls.
    unsafe { command.pre_exec(move || setup.apply()) };
    let mut child = tokio::process::Command::from(command);
    let status = match child.spawn() {
        Ok(mut child) => wait_or_signal(&mut child, &cg).await,
        Err(e) => {
            teardown(&mut enforcer, &mut cg, &stop, pump).await;
            if let Some(d) = dns {
                d.stop();
            }
            return Err(if e.kind() == std::io::ErrorKind::NotFound {
                RunError::NotFound(cmd0.clone())
            } else {
                RunError::Other(anyhow::anyhow!("{cmd0}: {e}"))
            });
        }
    };
    teardown(&mut enforcer, &mut cg, &stop, pump).await;
    if let Some(t) = &ask_task {
        crate::pdp::standalone::report(t);
    }
    // After the sandbox is gone: nothing is left to ask.
    if let Some(d) = dns {
        d.stop();
    }
    Ok(status)
}

/// Parent of every standalone sandbox cgroup, under the cgroup2 root.
pub const CGROUP_PARENT: &str = "pep-agent";

fn needs_lsm(p: &Policy) -> bool {
    !p.files.rules.is_empty()
        || !p.exec.rules.is_empty()
        || p.files.default == policy::Verdict::Deny
        || p.exec.default == policy::Verdict::Deny
}

fn resolve_program(cmd: &str) -> Option<PathBuf> {
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// Waits for the child; on SIGINT or SIGTERM to pep-agent, kills the whole
/// sandbox. Returns the shell-style status (128+N for a signal).
async fn wait_or_signal(child: &mut tokio::process::Child, cg: &cgroup::Cgroup) -> i32 {
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).ok();
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).ok();
    let mut hup = tokio::signal::unix::signal(SignalKind::hangup()).ok();
    let got = tokio::select! {
        st = child.wait() => return status_code(st.ok()),
        _ = recv(&mut int) => libc::SIGINT,
        _ = recv(&mut term) => libc::SIGTERM,
        _ = recv(&mut hup) => libc::SIGHUP,
    };
    tracing::info!("signal {got}: stopping the sandbox");
    kill_cgroup(cg.path());
    let _ = child.wait().await;
    128 + got
}

async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

fn status_code(st: Option<std::process::ExitStatus>) -> i32 {
    match st {
        Some(s) => s.code().or_else(|| s.signal().map(|n| 128 + n)).unwrap_or(1),
        None => 1,
    }
}

fn kill_cgroup(path: &Path) {
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
}

/// The audit task of a run and the counters it accounts against.
struct Pump {
    task: tokio::task::JoinHandle<anyhow::Result<Pipeline>>,
    counters: Arc<KernelCounters>,
}

/// Waits (up to 2 s) until no process is left in the cgroup, so no program
/// is still running for it when the audit stream is drained and counted.
async fn wait_empty(path: &Path) {
    for _ in 0..200 {
        match std::fs::read_to_string(path.join("cgroup.events")) {
            Ok(ev) if ev.lines().any(|l| l == "populated 0") => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(_) => return,
        }
    }
}

/// Stops the rest of the sandbox, drains the audit stream, detaches and
/// removes everything.
async fn teardown(enforcer: &mut Enforcer, cg: &mut cgroup::Cgroup, stop: &AtomicBool, pump: Pump) {
    // Descendants that outlived the command are part of the sandbox's run.
    kill_cgroup(cg.path());
    wait_empty(cg.path()).await;
    stop.store(true, Ordering::SeqCst);
    match pump.task.await {
        Ok(Ok(pipeline)) => {
            if let Err(e) = pipeline.finish(Some(&pump.counters)).await {
                eprintln!("pep-agent: audit stream: {e:#}");
            }
        }
        Ok(Err(e)) => eprintln!("pep-agent: audit stream: {e:#}"),
        Err(e) => eprintln!("pep-agent: audit task: {e}"),
    }
    if let Err(e) = enforcer.detach_net(cg.path()) {
        tracing::debug!("detach: {e}");
    }
    // Attached only when the policy asks; otherwise this fails harmlessly.
    let _ = enforcer.detach_ask(cg.path());
    // Attached only when the policy has domain rules (issue 7); likewise.
    let _ = crate::dns::attach(enforcer, cg.path(), crate::enforcer::attach::Op::Detach);
    if let Err(e) = cg.destroy() {
        eprintln!("pep-agent: cleanup: {e}");
    }
}

/// Removes sandbox cgroups left by standalone runs whose pep-agent died
/// (their name ends in the dead process's pid).
fn sweep_stale(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root.join(CGROUP_PARENT)) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.rsplit('.').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(mut cg) = cgroup::Cgroup::open(root, &e.path()) {
            tracing::info!("removing stale sandbox cgroup {}", e.path().display());
            let _ = cg.destroy();
        }
    }
}
