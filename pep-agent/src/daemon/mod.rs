//! `pep-agent daemon`: the privileged host daemon.
//!
//! It loads the programs with everything pinned in bpffs (`enforcer::pinned`),
//! so sandboxes stay enforced through its own death and a restarted daemon
//! adopts them; serves the control socket (`control`, `protocol`); writes the
//! audit stream (`audit`); reloads without a gap (`reload`); and speaks to
//! the operator through systemd (`notify`) and Prometheus (`metrics`).
//! Every task hears one shutdown signal (a watch channel).

pub mod audit;
pub mod authz;
pub mod config;
pub mod control;
pub mod metrics;
pub mod notify;
pub mod pin;
pub mod protocol;
pub mod reload;
pub mod sandboxes;
pub mod state;

use std::{
    collections::HashMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Mutex, mpsc, watch},
};

use self::{
    config::{Config, LsmMode},
    metrics::Metrics,
    sandboxes::Core,
    state::State,
};
use crate::{
    audit::{
        pipeline::{AuditOptions, KernelCounters, Losses, Pipeline},
        record::SandboxContext,
        sink::{Rotation, Sink},
    },
    enforcer::{Enforcer, EnforcerError, LoadOptions, attach::Op, pinned, upgrade},
};

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    })
}

fn load_enforcer(cfg: &Config) -> anyhow::Result<(Enforcer, pinned::Origin)> {
    let listed = std::fs::read_to_string("/sys/kernel/security/lsm")
        .unwrap_or_default()
        .trim()
        .split(',')
        .any(|l| l == "bpf");
    let try_lsm = match cfg.lsm {
        LsmMode::Off => false,
        LsmMode::On => true,
        LsmMode::Auto => listed,
    };
    if cfg.lsm == LsmMode::Auto && !listed {
        tracing::warn!(
            "BPF LSM is not in the kernel's LSM list: files/exec rules and self-protection are off"
        );
    }
    let pinned_before = cfg.pin_dir.join("progs/connect4").exists();
    match Enforcer::load_pinned(&cfg.pin_dir, LoadOptions { lsm: try_lsm }) {
        Ok(r) => Ok(r),
        Err(pinned::PinnedError::Enforcer(EnforcerError::LsmUnavailable { reason }))
            if cfg.lsm == LsmMode::Auto =>
        {
            tracing::warn!("BPF LSM unavailable ({reason}): files/exec rules and self-protection are off");
            // The first attempt pinned the network programs before the LSM
            // ones failed: that is still this start's fresh load.
            let (e, origin) = Enforcer::load_pinned(&cfg.pin_dir, LoadOptions { lsm: false })?;
            Ok((
                e,
                if pinned_before {
                    origin
                } else {
                    pinned::Origin::Fresh
                },
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Is a daemon answering on `socket`?
fn answering(socket: &Path) -> bool {
    crate::client::Client::connect(socket, Duration::from_secs(2))
        .and_then(|mut c| c.request(&protocol::Request::Ping))
        .is_ok_and(|r| r.ok)
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = load_config(config_path.as_deref())?;
    let metrics = Metrics::new();
    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut tasks = Vec::new();

    // Health first, so /healthz answers and /readyz says "not ready" while
    // the programs load.
    if let Some(addr) = &cfg.metrics.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("metrics.listen {addr}: {e}"))?;
        tracing::info!("metrics on http://{}", l.local_addr()?);
        tasks.push(tokio::spawn(metrics::serve(l, metrics.clone(), shutdown.clone())));
    }
    if answering(&cfg.socket) {
        anyhow::bail!("a daemon is already answering on {}", cfg.socket.display());
    }
    if cfg.startup_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(cfg.startup_delay_ms)).await;
    }

    pin::ensure_bpffs(&cfg.pin_dir)?;
    std::fs::create_dir_all(&cfg.state_dir)?;
    // Another build's pins move aside first: they enforce until this
    // build has installed every sandbox again (`enforcer::upgrade`).
    let retired = upgrade::retire_foreign(&cfg.pin_dir)
        .map_err(|e| anyhow::anyhow!("{}: retiring another build's pins: {e}", cfg.pin_dir.display()))?;
    let (mut enforcer, mut origin) = load_enforcer(&cfg)?;
    if origin == pinned::Origin::Fresh && !retired.is_empty() {
        origin = pinned::Origin::Replaced;
    }
    upgrade::write_stamp(&cfg.pin_dir)
        .map_err(|e| anyhow::anyhow!("{}: writing the build stamp: {e}", cfg.pin_dir.display()))?;
    tracing::info!("programs {origin:?} at {}", cfg.pin_dir.display());
    if enforcer.lsm_enforced()
        && let Err(e) = enforcer.protect_only(std::process::id())
    {
        tracing::warn!("self-protection of the daemon: {e}");
    }
    let state = State::load(&cfg.state_dir)?;

    // The audit stream continues the log's chain and the kernel's counts.
    if cfg.audit.path != "-"
        && let Some(dir) = Path::new(&cfg.audit.path).parent()
    {
        std::fs::create_dir_all(dir)?;
    }
    if cfg.audit.path != "-" {
        // A daemon killed mid-write leaves a partial last line. What it held
        // was not given back to the ring buffers (that waits for a whole
        // flush), so the next batch writes it again: the torn line goes.
        match crate::audit::sink::drop_torn_tail(Path::new(&cfg.audit.path)) {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                "audit.path {}: dropped a partial last line ({n} bytes) left by a killed daemon",
                cfg.audit.path
            ),
            Err(e) => tracing::warn!("audit.path {}: checking the last line: {e}", cfg.audit.path),
        }
    }
    let sink = Sink::open_rotating(
        &cfg.audit.path,
        Rotation {
            max_bytes: cfg.audit.max_bytes,
            max_files: cfg.audit.max_files,
        },
    )
    .map_err(|e| anyhow::anyhow!("audit.path {}: {e}", cfg.audit.path))?;
    let contexts: audit::Contexts = Arc::new(RwLock::new(HashMap::new()));
    let lookup = contexts.clone();
    let audit_opts = AuditOptions {
        coalesce: Duration::from_millis(cfg.audit.coalesce_ms),
        socket: cfg.audit.socket.clone(),
        tailer_queue: 0,
        rotation: Rotation::default(),
    };
    let mut pipeline = Pipeline::new(
        sink,
        SandboxContext {
            name: "pep-agent".into(),
            policy_revision: String::new(),
            degraded: None,
        },
        &audit_opts,
    )?
    .with_contexts(Arc::new(move |id| {
        lookup.read().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }));
    // The saved count is of the pinned counter it was read from: freshly
    // loaded maps count from zero.
    let lost_reported = state::load_lost_reported(&cfg.state_dir);
    let fresh_counters = origin != pinned::Origin::Adopted;
    pipeline.set_kernel_lost_seen(if fresh_counters {
        Losses::default()
    } else {
        lost_reported
    });
    let cgroups: Vec<PathBuf> = state.sandboxes.iter().map(|r| r.cgroup.clone()).collect();
    let events = crate::audit::ring::CommitRing::new(enforcer.take_events_map()?)?;
    let counters = KernelCounters::of(&enforcer)?;
    let (audit_tx, audit_rx) = mpsc::unbounded_channel();
    // One ask thread for every sandbox whose policy asks a PDP; it serves
    // none until `Core` installs or adopts them. Misses the kernel queued
    // while no daemon ran are answered first, if their connects still wait.
    let (ask_maps, asks) = enforcer.take_ask()?;
    let (ask_tx, ask_rx) = mpsc::unbounded_channel();
    let origins = crate::pdp::task::CacheOrigins::default();
    pipeline.set_pdp_feed(crate::pdp::task::PdpFeed {
        records: ask_rx,
        origins: origins.clone(),
    });
    let ask_stop = Arc::new(AtomicBool::new(false));
    let pdp_wake = Arc::new(tokio::sync::Notify::new());
    let ask = crate::pdp::task::spawn_paused(
        ask_maps,
        asks,
        ask_tx,
        pdp_wake.clone(),
        origins,
        ask_stop.clone(),
    )?;

    let acks = ask.acks();
    let mut core = Core::new(
        cfg.clone(),
        config_path.clone(),
        enforcer,
        state,
        origin,
        contexts,
        metrics.clone(),
        audit_tx,
        ask,
    )?;
    core.adopt()?;
    core.resume_asking();
    // This build enforces every sandbox now: the old one can go, once what
    // it left unreported is in the log.
    let left = match upgrade::detach_and_count(&retired, &cgroups, lost_reported) {
        Ok(left) => Some(left),
        // Both builds go on enforcing (stricter, never looser); the next
        // start tries again, and `status` lists what is still retired.
        Err(e) => {
            tracing::error!("detaching the retired build's programs: {e}");
            None
        }
    };
    if let Some(left) = left {
        if left.held > 0 {
            tracing::warn!(
                "{} connects held by the retired build for its PDP stay held until their SYN retries run out (ETIMEDOUT)",
                left.held
            );
        }
        if left.undecoded > 0 {
            pipeline.lost(left.undecoded, "upgrade")?;
        }
        if left.kernel_lost.ring > 0 {
            pipeline.lost(left.kernel_lost.ring, "kernel")?;
        }
        if left.kernel_lost.ask > 0 {
            pipeline.ask_lost(left.kernel_lost.ask)?;
        }
    }
    if fresh_counters {
        // The saved count was of the counter that is gone.
        pipeline.flush()?;
        state::save_lost_reported(&cfg.state_dir, Losses::default())?;
    }
    if left.is_some()
        && let Err(e) = upgrade::remove(&retired)
    {
        tracing::error!("removing the retired build's pins: {e}");
    }
    let core = Arc::new(Mutex::new(core));
    metrics.watch_counters(&cfg.pin_dir);
    let audit_task = tokio::spawn(
        audit::AuditTask {
            events,
            counters,
            pipeline,
            records: audit_rx,
            pdp_wake,
            acks,
            shutdown: shutdown.clone(),
            metrics: metrics.clone(),
            state_dir: cfg.state_dir.clone(),
        }
        .run(),
    );

    // The control socket: any user may connect; each request is judged by
    // the caller's credentials.
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    let listener = tokio::net::UnixListener::bind(&cfg.socket)
        .map_err(|e| anyhow::anyhow!("socket {}: {e}", cfg.socket.display()))?;
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(cfg.socket_mode))?;
    let server = Arc::new(control::Server {
        core: core.clone(),
        timeout: Duration::from_millis(cfg.client_timeout_ms),
        max_request: cfg.max_request_bytes,
    });
    tasks.push(tokio::spawn(server.serve(listener, shutdown.clone())));

    metrics.ready.store(true, Ordering::SeqCst);
    notify::notify("READY=1");
    tracing::info!("ready: control socket {}", cfg.socket.display());

    if let Some(every) = notify::watchdog_interval() {
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = t.tick() => notify::notify("WATCHDOG=1"),
                    _ = stop.changed() => return,
                }
            }
        }));
    }
    {
        let core = core.clone();
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = t.tick() => {
                        let mut c = core.lock().await;
                        tokio::task::block_in_place(|| c.reap());
                    }
                    _ = stop.changed() => return,
                }
            }
        }));
    }

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                notify::reloading();
                let root = authz::Peer { uid: 0, gid: 0, pid: std::process::id() };
                let mut c = core.lock().await;
                let resp = tokio::task::block_in_place(|| c.handle(protocol::Request::Reload { name: None }, &root));
                drop(c);
                if resp.ok {
                    tracing::info!("SIGHUP: reloaded");
                } else {
                    tracing::error!("SIGHUP: reload refused, the running policies stay: {}", resp.error.unwrap_or_default());
                }
                notify::notify("READY=1");
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Stopping the daemon stops nothing in the kernel: the sandboxes stay
    // enforced; the next daemon adopts them.
    notify::notify("STOPPING=1");
    metrics.ready.store(false, Ordering::SeqCst);
    // The ask thread first: the records of what it answered reach the
    // audit task before that stops.
    {
        let mut c = core.lock().await;
        tokio::task::block_in_place(|| c.stop_asking(&ask_stop));
    }
    let _ = shutdown_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(10), audit_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!("audit stream: {e:#}"),
        Ok(Err(e)) => tracing::error!("audit task: {e}"),
        Err(_) => tracing::error!("audit stream did not finish in 10 s"),
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

/// `pep-agent daemon --uninstall`: removes every sandbox (cgroups the
/// daemon created are killed and removed; adopted ones are released) and
/// all pinned state. Refuses while a daemon answers on the socket.
pub fn uninstall(config_path: Option<&Path>) -> anyhow::Result<()> {
    let cfg = load_config(config_path)?;
    if answering(&cfg.socket) {
        anyhow::bail!("a daemon is answering on {}: stop it first", cfg.socket.display());
    }
    let state = State::load(&cfg.state_dir)?;
    let root = crate::kernel::cgroup::cgroup2_root()?;
    for rec in &state.sandboxes {
        if rec.created {
            if let Ok(mut cg) = crate::kernel::cgroup::Cgroup::open(&root, &rec.cgroup)
                && let Err(e) = cg.destroy()
            {
                eprintln!("pep-agent: sandbox {}: {e}", rec.name);
            }
        } else if rec.cgroup.exists() {
            if let Err(e) = Enforcer::cgroup_op_pinned(&cfg.pin_dir, &rec.cgroup, Op::Detach) {
                eprintln!("pep-agent: sandbox {}: {e}", rec.name);
            }
            if let Err(e) = Enforcer::ask_op_pinned(&cfg.pin_dir, &rec.cgroup, Op::Detach) {
                eprintln!("pep-agent: sandbox {}: {e}", rec.name);
            }
            for r in upgrade::retired(&cfg.pin_dir).unwrap_or_default() {
                if let Err(e) = upgrade::detach_all(&r, &rec.cgroup) {
                    eprintln!("pep-agent: sandbox {} ({}): {e}", rec.name, r.display());
                }
            }
        }
    }
    pinned::remove_pins(&cfg.pin_dir).map_err(|e| anyhow::anyhow!("{}: {e}", cfg.pin_dir.display()))?;
    for f in ["state.json", "audit-lost-reported"] {
        let _ = std::fs::remove_file(cfg.state_dir.join(f));
    }
    let parent = root.join(&cfg.cgroup_parent);
    let _ = std::fs::remove_dir(parent);
    Ok(())
}
