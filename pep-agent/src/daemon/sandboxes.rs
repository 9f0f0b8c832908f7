//! The daemon's sandboxes: create, attach, delete, list, and adoption of
//! what an earlier daemon left pinned. Every change to the kernel maps goes
//! through here, serialised by the one lock around `Core`.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use pep_common::ask::DEFAULT_HOLD_SYNCNT;

use super::{
    audit::Contexts,
    authz::{self, Peer},
    config::Config,
    metrics::Metrics,
    protocol::{self as proto, Request, Response, SandboxInfo},
    reload::{self, AskPlan, Compiled},
    state::{PolicySource, SandboxRecord, State},
};
use crate::{
    audit::record::{Record, SandboxContext},
    enforcer::{Enforcer, attach::Op, pinned::Origin},
    kernel::cgroup,
    pdp::task::AskTask,
    policy::Mode,
};

/// A refused or failed request: an error code and why.
#[derive(Debug)]
pub struct Fail {
    pub code: &'static str,
    pub msg: String,
}

impl Fail {
    pub fn new(code: &'static str, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
        }
    }
}

fn denied(msg: impl Into<String>) -> Fail {
    Fail::new(proto::DENIED, msg)
}

fn failed(e: impl std::fmt::Display) -> Fail {
    Fail::new(proto::FAILED, e.to_string())
}

pub struct Core {
    pub cfg: Config,
    pub config_path: Option<PathBuf>,
    pub enforcer: Enforcer,
    pub state: State,
    pub origin: Origin,
    cg_root: PathBuf,
    contexts: Contexts,
    metrics: Arc<Metrics>,
    audit: mpsc::UnboundedSender<Record>,
    /// Asks the PDPs of the sandboxes whose policies ask; `None` once
    /// stopped.
    ask: Option<AskTask>,
    started: Instant,
}

fn parse_mode(m: &Option<String>) -> Result<Option<Mode>, Fail> {
    match m.as_deref() {
        None => Ok(None),
        Some("enforce") => Ok(Some(Mode::Enforce)),
        Some("audit") => Ok(Some(Mode::Audit)),
        Some(o) => Err(Fail::new(
            proto::BAD_REQUEST,
            format!("mode {o:?}: enforce or audit"),
        )),
    }
}

impl Core {
    #[expect(clippy::too_many_arguments, reason = "built once, at start")]
    pub fn new(
        cfg: Config,
        config_path: Option<PathBuf>,
        enforcer: Enforcer,
        state: State,
        origin: Origin,
        contexts: Contexts,
        metrics: Arc<Metrics>,
        audit: mpsc::UnboundedSender<Record>,
        ask: AskTask,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            cfg,
            config_path,
            enforcer,
            state,
            origin,
            cg_root: cgroup::cgroup2_root()?,
            contexts,
            metrics,
            audit,
            ask: Some(ask),
            started: Instant::now(),
        })
    }

    /// Once every adopted sandbox is served: the ask thread reads misses.
    pub fn resume_asking(&self) {
        if let Some(t) = &self.ask {
            t.resume();
        }
    }

    /// Stops the ask thread (daemon shutdown): what it has answered is
    /// already in the maps and its records with the audit task.
    pub fn stop_asking(&mut self, stop: &AtomicBool) {
        if let Some(t) = self.ask.take() {
            t.stop(stop);
        }
    }

    /// Before generation `id` of sandbox `name` is installed: if its policy
    /// asks (`plan`), the ask task serves the generation's sandbox id
    /// (`carry_from`: the generation it replaces, whose cached verdicts it
    /// keeps if the PDP's answers cannot have changed) and the holding
    /// programs are attached to its cgroup, so that its first miss is held
    /// and asked.
    fn serve_ask(
        &self,
        name: &str,
        cgroup: &Path,
        id: u32,
        plan: Option<&AskPlan>,
        carry_from: Option<u32>,
    ) -> Result<(), Fail> {
        let (Some(plan), Some(task)) = (plan, &self.ask) else {
            return Ok(());
        };
        let mut settings = plan.settings.clone();
        settings.sandbox_name = name.to_owned();
        settings.sandbox_id = id;
        let (revision, carried) = task
            .serve(settings, plan.flags, DEFAULT_HOLD_SYNCNT, carry_from)
            .map_err(failed)?;
        Enforcer::ask_op_pinned(self.pin_dir(), cgroup, Op::Attach).map_err(failed)?;
        tracing::info!(
            "sandbox {name}: asking {} for sandbox id {} (verdict cache revision {revision}, {carried} verdicts carried over)",
            plan.settings.pdp.engine(),
            id
        );
        Ok(())
    }

    fn pin_dir(&self) -> &Path {
        &self.cfg.pin_dir
    }

    fn save(&self) -> Result<(), Fail> {
        self.state.save(&self.cfg.state_dir).map_err(failed)
    }

    fn set_context(&self, rec: &SandboxRecord) {
        let mut c = self.contexts.write().unwrap_or_else(|e| e.into_inner());
        c.insert(
            rec.sandbox_id,
            SandboxContext {
                name: rec.name.clone(),
                policy_revision: rec.revision.clone(),
                degraded: None,
            },
        );
    }

    fn live_ids(&self) -> HashSet<u32> {
        self.state.sandboxes.iter().map(|s| s.sandbox_id).collect()
    }

    fn sync_levels(&mut self) -> Result<(), Fail> {
        let mask = self
            .state
            .sandboxes
            .iter()
            .fold(0u64, |m, s| m | (1u64 << s.level.min(63)));
        self.enforcer.set_sandbox_levels(mask).map_err(failed)?;
        self.metrics.sandboxes.set(self.state.sandboxes.len() as i64);
        Ok(())
    }

    fn gc(&mut self) {
        let live = self.live_ids();
        if let Some(t) = &self.ask {
            let n = t.retain(&live);
            if n > 0 {
                tracing::debug!("stopped asking for {n} retired generations");
            }
        }
        match self.enforcer.gc_rules(&live) {
            Ok(n) if n > 0 => tracing::debug!("removed {n} rules of retired generations"),
            Ok(_) => {}
            Err(e) => tracing::warn!("rule cleanup: {e}"),
        }
    }

    /// After (re)start: re-asserts every sandbox of the state file. With
    /// adopted pins nothing is detached or rewritten; the attach is
    /// idempotent and only repairs a cgroup that lost its programs. With
    /// fresh pins (the pinned state was removed), policies are installed
    /// again from their sources.
    pub fn adopt(&mut self) -> anyhow::Result<()> {
        let records = std::mem::take(&mut self.state.sandboxes);
        let kernel: HashSet<u64> = self
            .enforcer
            .sandbox_entries()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        for mut rec in records {
            let alive = std::fs::metadata(&rec.cgroup)
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m) == rec.cgroup_id)
                .unwrap_or(false);
            if !alive {
                tracing::warn!(
                    "sandbox {}: cgroup {} is gone; dropping it",
                    rec.name,
                    rec.cgroup.display()
                );
                let _ = self.enforcer.remove_sandbox_entry(rec.cgroup_id);
                continue;
            }
            if self.origin != Origin::Adopted || !kernel.contains(&rec.cgroup_id) {
                let id = self.state.alloc_id();
                let owner = Peer {
                    uid: rec.owner_uid,
                    gid: 0,
                    pid: 0,
                };
                match reload::compile(
                    &self.cfg,
                    &rec.policy,
                    &owner.home(),
                    rec.mode(),
                    id,
                    self.enforcer.lsm_enforced(),
                ) {
                    Ok(c) => {
                        self.serve_ask(&rec.name, &rec.cgroup, id, c.ask.as_ref(), None)
                            .map_err(|f| anyhow::anyhow!(f.msg))?;
                        reload::install(&mut self.enforcer, rec.cgroup_id, rec.level, &c)?;
                        rec.sandbox_id = id;
                        rec.revision = c.revision.clone();
                    }
                    Err(e) => {
                        // Fail closed: the cgroup's processes stay where they
                        // are, but nothing would enforce them; kill them.
                        tracing::error!("sandbox {}: {e}; stopping its processes", rec.name);
                        let _ = std::fs::write(rec.cgroup.join("cgroup.kill"), "1");
                        continue;
                    }
                }
            } else {
                self.adopt_ask(&rec);
            }
            Enforcer::cgroup_op_pinned(&self.cfg.pin_dir, &rec.cgroup, Op::Attach)?;
            self.set_context(&rec);
            self.state.sandboxes.push(rec);
        }
        for (id, name) in self.state.retired.clone() {
            let mut c = self.contexts.write().unwrap_or_else(|e| e.into_inner());
            c.entry(id).or_insert_with(|| SandboxContext {
                name,
                policy_revision: String::new(),
                degraded: None,
            });
        }
        self.sync_levels().map_err(|f| anyhow::anyhow!(f.msg))?;
        self.gc();
        self.state.save(&self.cfg.state_dir)?;
        Ok(())
    }

    /// A sandbox adopted with its rules as they are pinned: if its policy
    /// asks, the ask task serves it again, keeping the pinned revision (and
    /// so every verdict cached before the restart). If its policy no longer
    /// loads, nothing asks for it: its misses are denied (its held connects
    /// destroyed) until a reload installs a good one.
    fn adopt_ask(&self, rec: &SandboxRecord) {
        let home = Peer {
            uid: rec.owner_uid,
            gid: 0,
            pid: 0,
        }
        .home();
        let plan = match reload::plan_only(&self.cfg, &rec.policy, &home, rec.sandbox_id) {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => {
                tracing::error!("sandbox {}: {e}; its PDP misses are denied", rec.name);
                return;
            }
        };
        if let Err(f) = self.serve_ask(&rec.name, &rec.cgroup, rec.sandbox_id, Some(&plan), None) {
            tracing::error!("sandbox {}: asking its PDP: {}", rec.name, f.msg);
        }
    }

    /// Handles one request from `peer`.
    pub fn handle(&mut self, req: Request, peer: &Peer) -> Response {
        let op = req.op();
        let res = match req {
            Request::Ping => Ok(json!({"pid": std::process::id()})),
            Request::Status => Ok(self.status()),
            Request::List => Ok(json!(self.list(peer))),
            Request::Create {
                name,
                policy,
                pid,
                mode,
                ephemeral,
            } => parse_mode(&mode).and_then(|m| self.create(peer, &name, &policy, pid, m, ephemeral)),
            Request::Attach {
                name,
                policy,
                cgroup,
                pid,
                mode,
            } => parse_mode(&mode).and_then(|m| self.attach(peer, &name, policy.as_deref(), cgroup, pid, m)),
            Request::Delete { name } => self.delete(peer, &name),
            Request::Reload { name } => self.reload(peer, name.as_deref()),
        };
        self.metrics.count_request(op, res.is_ok());
        match res {
            Ok(v) => Response::ok(v),
            Err(f) => {
                if f.code == proto::DENIED {
                    tracing::warn!("refused {op} from uid {} pid {}: {}", peer.uid, peer.pid, f.msg);
                    let _ = self.audit.send(super::audit::refusal(op, peer, &f.msg));
                }
                Response::err(f.code, f.msg)
            }
        }
    }

    /// Which policy `arg` names, if `peer` may use it: a name under the
    /// config's `policies` granted to the caller; or, for root, any policy
    /// file. An ordinary user may also give the path of a granted policy.
    fn resolve_policy(&self, peer: &Peer, arg: &str) -> Result<PolicySource, Fail> {
        let granted = || {
            if peer.is_root() {
                return None;
            }
            Some(self.cfg.granted(&peer.user_name(), peer.uid, &peer.groups()))
        };
        if self.cfg.policies.contains_key(arg) {
            if let Some(g) = granted()
                && !g.iter().any(|n| n == arg)
            {
                return Err(denied(format!("policy {arg} is not granted to uid {}", peer.uid)));
            }
            return Ok(PolicySource::Named(arg.to_string()));
        }
        let path = Path::new(arg);
        if path.is_absolute() {
            let canon = std::fs::canonicalize(path)
                .map_err(|e| Fail::new(proto::INVALID_POLICY, format!("{arg}: {e}")))?;
            if peer.is_root() {
                return Ok(PolicySource::File(canon));
            }
            let g = granted().unwrap_or_default();
            for (name, p) in &self.cfg.policies {
                if std::fs::canonicalize(p).is_ok_and(|c| c == canon) && g.iter().any(|n| n == name) {
                    return Ok(PolicySource::Named(name.clone()));
                }
            }
            return Err(denied(format!(
                "policy file {arg} is not granted to uid {}",
                peer.uid
            )));
        }
        Err(Fail::new(proto::NOT_FOUND, format!("no policy named {arg}")))
    }

    fn compile(
        &mut self,
        source: &PolicySource,
        owner_uid: u32,
        mode: Option<Mode>,
    ) -> Result<Compiled, Fail> {
        let id = self.state.alloc_id();
        let home = Peer {
            uid: owner_uid,
            gid: 0,
            pid: 0,
        }
        .home();
        reload::compile(&self.cfg, source, &home, mode, id, self.enforcer.lsm_enforced())
            .map_err(|e| Fail::new(proto::INVALID_POLICY, e))
    }

    /// Installs `c` for the new record and attaches; on failure undoes what
    /// it did and removes the record.
    fn install_new(&mut self, rec: SandboxRecord, c: &Compiled, pid: Option<u32>) -> Result<Value, Fail> {
        self.state.sandboxes.push(rec.clone());
        // Saved first: a daemon that dies halfway still knows the sandbox.
        self.save()?;
        let res = (|| -> Result<(), Fail> {
            self.serve_ask(&rec.name, &rec.cgroup, c.config.sandbox_id, c.ask.as_ref(), None)?;
            reload::install(&mut self.enforcer, rec.cgroup_id, rec.level, c).map_err(failed)?;
            Enforcer::cgroup_op_pinned(self.pin_dir(), &rec.cgroup, Op::Attach).map_err(failed)?;
            if let Some(pid) = pid {
                std::fs::write(rec.cgroup.join("cgroup.procs"), pid.to_string())
                    .map_err(|e| failed(format!("moving pid {pid} into {}: {e}", rec.cgroup.display())))?;
            }
            Ok(())
        })();
        if let Err(f) = res {
            let _ = self.remove(&rec.name);
            return Err(f);
        }
        self.set_context(&rec);
        self.sync_levels()?;
        Ok(json!(self.info(&rec)))
    }

    fn create(
        &mut self,
        peer: &Peer,
        name: &str,
        policy: &str,
        pid: Option<u32>,
        mode: Option<Mode>,
        ephemeral: bool,
    ) -> Result<Value, Fail> {
        authz::valid_name(name).map_err(|e| Fail::new(proto::BAD_REQUEST, e))?;
        if self.state.find(name).is_some() {
            return Err(Fail::new(proto::EXISTS, format!("sandbox {name} exists")));
        }
        let source = self.resolve_policy(peer, policy)?;
        if let Some(pid) = pid {
            authz::owns_pid(peer, pid).map_err(denied)?;
        }
        // Validated and compiled fully before anything changes.
        let c = self.compile(&source, peer.uid, mode)?;
        let rel = self.cfg.cgroup_parent.join(name);
        let path = self.cg_root.join(&rel);
        if path.exists() {
            return Err(Fail::new(
                proto::EXISTS,
                format!("cgroup {} exists", path.display()),
            ));
        }
        std::fs::create_dir_all(&path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
        let cg = cgroup::Cgroup::open(&self.cg_root, &path).map_err(failed)?;
        let rec = SandboxRecord {
            name: name.to_string(),
            cgroup: path,
            cgroup_id: cg.id(),
            level: cg.level(),
            created: true,
            owner_uid: peer.uid,
            policy: source,
            mode: super::state::mode_name(mode),
            sandbox_id: c.config.sandbox_id,
            revision: c.revision.clone(),
            ephemeral: ephemeral && pid.is_some(),
        };
        self.install_new(rec, &c, pid)
    }

    fn attach(
        &mut self,
        peer: &Peer,
        name: &str,
        policy: Option<&str>,
        cgroup_path: Option<PathBuf>,
        pid: Option<u32>,
        mode: Option<Mode>,
    ) -> Result<Value, Fail> {
        authz::valid_name(name).map_err(|e| Fail::new(proto::BAD_REQUEST, e))?;
        if let Some(rec) = self.state.find(name).cloned() {
            // Joining an existing sandbox: its owner's (or root's) processes.
            if !peer.is_root() && rec.owner_uid != peer.uid {
                return Err(denied(format!("sandbox {name} belongs to uid {}", rec.owner_uid)));
            }
            let pid = pid.ok_or_else(|| {
                Fail::new(
                    proto::EXISTS,
                    format!("sandbox {name} exists; give a pid to move into it"),
                )
            })?;
            authz::owns_pid(peer, pid).map_err(denied)?;
            std::fs::write(rec.cgroup.join("cgroup.procs"), pid.to_string())
                .map_err(|e| failed(format!("moving pid {pid}: {e}")))?;
            return Ok(json!(self.info(&rec)));
        }
        let policy =
            policy.ok_or_else(|| Fail::new(proto::BAD_REQUEST, "attach to a new sandbox needs a policy"))?;
        let target = match (&cgroup_path, pid) {
            (Some(p), _) => {
                let p = if p.is_absolute() {
                    p.clone()
                } else {
                    self.cg_root.join(p)
                };
                std::fs::canonicalize(&p)
                    .map_err(|e| Fail::new(proto::NOT_FOUND, format!("{}: {e}", p.display())))?
            }
            (None, Some(pid)) => {
                authz::owns_pid(peer, pid).map_err(denied)?;
                authz::pid_cgroup(&self.cg_root, pid)
                    .ok_or_else(|| Fail::new(proto::NOT_FOUND, format!("no cgroup v2 for pid {pid}")))?
            }
            (None, None) => return Err(Fail::new(proto::BAD_REQUEST, "attach needs a cgroup or a pid")),
        };
        if !target.starts_with(&self.cg_root) || target == self.cg_root {
            return Err(denied(format!(
                "{} is not a cgroup below the cgroup2 root {}",
                target.display(),
                self.cg_root.display()
            )));
        }
        if let Some(s) = self
            .state
            .sandboxes
            .iter()
            .find(|s| target.starts_with(&s.cgroup))
        {
            return Err(Fail::new(
                proto::EXISTS,
                format!("{} is inside sandbox {}", target.display(), s.name),
            ));
        }
        if self.state.sandboxes.iter().any(|s| s.cgroup.starts_with(&target)) {
            return Err(Fail::new(
                proto::EXISTS,
                format!("{} holds a sandbox", target.display()),
            ));
        }
        authz::owns_cgroup(peer, &target).map_err(denied)?;
        let source = self.resolve_policy(peer, policy)?;
        let c = self.compile(&source, peer.uid, mode)?;
        let cg = cgroup::Cgroup::open(&self.cg_root, &target).map_err(failed)?;
        let rec = SandboxRecord {
            name: name.to_string(),
            cgroup: target,
            cgroup_id: cg.id(),
            level: cg.level(),
            created: false,
            owner_uid: peer.uid,
            policy: source,
            mode: super::state::mode_name(mode),
            sandbox_id: c.config.sandbox_id,
            revision: c.revision.clone(),
            ephemeral: false,
        };
        self.install_new(rec, &c, None)
    }

    fn delete(&mut self, peer: &Peer, name: &str) -> Result<Value, Fail> {
        let rec = self
            .state
            .find(name)
            .cloned()
            .ok_or_else(|| Fail::new(proto::NOT_FOUND, format!("no sandbox named {name}")))?;
        if !peer.is_root() && rec.owner_uid != peer.uid {
            return Err(denied(format!("sandbox {name} belongs to uid {}", rec.owner_uid)));
        }
        self.remove(name)?;
        Ok(json!({"name": name}))
    }

    /// Tears sandbox `name` down. A created cgroup's processes are killed
    /// before anything stops enforcing them.
    pub fn remove(&mut self, name: &str) -> Result<(), Fail> {
        let Some(idx) = self.state.sandboxes.iter().position(|s| s.name == name) else {
            return Ok(());
        };
        let rec = self.state.sandboxes[idx].clone();
        if rec.created {
            let _ = std::fs::write(rec.cgroup.join("cgroup.kill"), "1");
            wait_empty(&rec.cgroup);
        }
        if rec.cgroup.exists() {
            if let Err(e) = Enforcer::cgroup_op_pinned(self.pin_dir(), &rec.cgroup, Op::Detach) {
                tracing::warn!("sandbox {name}: detach: {e}");
            }
            // Attached only if it ever asked: not attached is no error.
            if let Err(e) = Enforcer::ask_op_pinned(self.pin_dir(), &rec.cgroup, Op::Detach) {
                tracing::warn!("sandbox {name}: detach: {e}");
            }
        }
        self.enforcer
            .remove_sandbox_entry(rec.cgroup_id)
            .map_err(failed)?;
        self.state.sandboxes.remove(idx);
        self.state.retire(rec.sandbox_id, &rec.name);
        self.save()?;
        self.sync_levels()?;
        self.gc();
        if rec.created
            && let Ok(mut cg) = cgroup::Cgroup::open(&self.cg_root, &rec.cgroup)
            && let Err(e) = cg.destroy()
        {
            tracing::warn!("sandbox {name}: removing its cgroup: {e}");
        }
        Ok(())
    }

    fn reload(&mut self, peer: &Peer, name: Option<&str>) -> Result<Value, Fail> {
        let started = Instant::now();
        let res = self.reload_inner(peer, name);
        let label = if res.is_ok() { "ok" } else { "error" };
        self.metrics
            .reloads
            .get_or_create(&super::metrics::ResultLabels { result: label.into() })
            .inc();
        self.metrics
            .reload_seconds
            .observe(started.elapsed().as_secs_f64());
        res.map(|mut v| {
            v["seconds"] = json!(started.elapsed().as_secs_f64());
            v
        })
    }

    /// Every new policy is read, validated and compiled before anything
    /// changes; then each sandbox flips to its new generation with one
    /// update of its `SANDBOXES` entry, and the old generation's rules go.
    fn reload_inner(&mut self, peer: &Peer, name: Option<&str>) -> Result<Value, Fail> {
        let cfg = match name {
            None => {
                if !peer.is_root() {
                    return Err(denied("reloading every sandbox needs root"));
                }
                match &self.config_path {
                    Some(p) => {
                        Config::load(p).map_err(|e| Fail::new(proto::INVALID_POLICY, e.to_string()))?
                    }
                    None => self.cfg.clone(),
                }
            }
            Some(n) => {
                let rec = self
                    .state
                    .find(n)
                    .ok_or_else(|| Fail::new(proto::NOT_FOUND, format!("no sandbox named {n}")))?;
                if !peer.is_root() && rec.owner_uid != peer.uid {
                    return Err(denied(format!("sandbox {n} belongs to uid {}", rec.owner_uid)));
                }
                self.cfg.clone()
            }
        };
        let lsm = self.enforcer.lsm_enforced();
        let mut compiled = Vec::new();
        for (i, rec) in self.state.sandboxes.iter().enumerate() {
            if name.is_some_and(|n| n != rec.name) {
                continue;
            }
            let home = Peer {
                uid: rec.owner_uid,
                gid: 0,
                pid: 0,
            }
            .home();
            let id = self.state.next_id.wrapping_add(compiled.len() as u32).max(1);
            let c = reload::compile(&cfg, &rec.policy, &home, rec.mode(), id, lsm)
                .map_err(|e| Fail::new(proto::INVALID_POLICY, format!("sandbox {}: {e}", rec.name)))?;
            compiled.push((i, c));
        }
        // Every policy is good: commit.
        for _ in &compiled {
            self.state.alloc_id();
        }
        self.cfg = cfg;
        let mut out = Vec::new();
        for (i, c) in &compiled {
            let r = &self.state.sandboxes[*i];
            let (cg_id, level) = (r.cgroup_id, r.level);
            let (name, cgroup, old) = (r.name.clone(), r.cgroup.clone(), r.sandbox_id);
            self.serve_ask(&name, &cgroup, c.config.sandbox_id, c.ask.as_ref(), Some(old))?;
            reload::install(&mut self.enforcer, cg_id, level, c).map_err(failed)?;
            let rec = &mut self.state.sandboxes[*i];
            let old = rec.sandbox_id;
            rec.sandbox_id = c.config.sandbox_id;
            rec.revision = c.revision.clone();
            let rec = rec.clone();
            self.state.retire(old, &rec.name);
            self.set_context(&rec);
            out.push(json!({"name": rec.name, "revision": rec.revision, "sandbox_id": rec.sandbox_id}));
        }
        self.save()?;
        self.gc();
        Ok(json!({"reloaded": out}))
    }

    fn info(&self, rec: &SandboxRecord) -> SandboxInfo {
        let pids = std::fs::read_to_string(rec.cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        SandboxInfo {
            name: rec.name.clone(),
            cgroup: rec.cgroup.clone(),
            cgroup_id: rec.cgroup_id,
            owner_uid: rec.owner_uid,
            policy: rec.policy.to_string(),
            revision: rec.revision.clone(),
            sandbox_id: rec.sandbox_id,
            created: rec.created,
            ephemeral: rec.ephemeral,
            pids,
        }
    }

    pub fn list(&self, peer: &Peer) -> Vec<SandboxInfo> {
        self.state
            .sandboxes
            .iter()
            .filter(|s| peer.is_root() || s.owner_uid == peer.uid)
            .map(|s| self.info(s))
            .collect()
    }

    fn status(&self) -> Value {
        let progs: Vec<String> = ["progs", "links"]
            .iter()
            .flat_map(|d| {
                std::fs::read_dir(self.cfg.pin_dir.join(d))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let (decisions, lost) = self.enforcer.counters().unwrap_or((0, 0));
        let asking = self.ask.as_ref().map(AskTask::serving).unwrap_or_default();
        json!({
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "origin": format!("{:?}", self.origin).to_lowercase(),
            "build": crate::enforcer::upgrade::build_stamp(),
            "retired": crate::enforcer::upgrade::retired(&self.cfg.pin_dir).unwrap_or_default(),
            "lsm": self.enforcer.lsm_enforced(),
            "pin_dir": self.cfg.pin_dir,
            "programs": progs,
            "sandboxes": self.state.sandboxes.iter().map(|s| json!({
                "name": s.name, "policy": s.policy.to_string(), "revision": s.revision,
                "sandbox_id": s.sandbox_id, "owner_uid": s.owner_uid,
                "asks_pdp": asking.contains(&s.sandbox_id),
            })).collect::<Vec<_>>(),
            "counters": {"decisions": decisions, "lost": lost},
            "ready": self.metrics.ready.load(std::sync::atomic::Ordering::SeqCst),
        })
    }

    /// Ephemeral sandboxes whose last process has exited.
    pub fn reap(&mut self) {
        let done: Vec<String> = self
            .state
            .sandboxes
            .iter()
            .filter(|s| s.ephemeral && !populated(&s.cgroup))
            .map(|s| s.name.clone())
            .collect();
        for name in done {
            tracing::info!("sandbox {name}: empty, removing");
            if let Err(f) = self.remove(&name) {
                tracing::warn!("sandbox {name}: {}", f.msg);
            }
        }
    }
}

fn populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// Waits (up to 5 s) until no process is left in the cgroup.
fn wait_empty(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while populated(path) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}
