//! The `pep-agent` command line. Exit status: 0 success; 1 bad input; 2 the
//! kernel or host lacks what the request needs; otherwise the sandboxed
//! command's own status.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use pep_agent::{
    audit::{
        pipeline::AuditOptions,
        sink::Rotation,
        tail::{self, Filter, Output},
        verify,
    },
    kernel::features::Features,
    policy,
    sandbox::{self, RunOptions},
};

#[derive(Parser)]
#[command(
    name = "pep-agent",
    version,
    about = "Policy Enforcement Point for AI agents: eBPF-enforced sandboxes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run CMD in a new sandbox under a policy; exits with CMD's status.
    Run {
        #[arg(long)]
        policy: PathBuf,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_enum)]
        mode: Option<ModeArg>,
        /// Audit log: a file path, or `-` for standard output.
        #[arg(long)]
        audit: Option<String>,
        /// Run CMD as this user.
        #[arg(long)]
        user: Option<String>,
        /// Without BPF LSM, enforce the network part only (and say so).
        #[arg(long)]
        allow_degraded: bool,
        #[command(flatten)]
        audit_opts: AuditArgs,
        /// The daemon's control socket (default: $PEP_AGENT_SOCKET, else
        /// /run/pep-agent/agent.sock). When a daemon answers there, the
        /// sandbox is made through it (no root needed).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Never go through a running daemon.
        #[arg(long)]
        standalone: bool,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// The privileged host daemon: pinned programs, control socket, audit
    /// stream, metrics; SIGHUP reloads (see docs/DAEMON.md).
    Daemon {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Remove every sandbox and all pinned state, then exit.
        #[arg(long)]
        uninstall: bool,
    },
    /// Manage sandboxes in a running daemon.
    Sandbox {
        #[arg(long, global = true)]
        socket: Option<PathBuf>,
        #[command(subcommand)]
        cmd: pep_agent::client::SandboxCmd,
    },
    /// What the daemon has loaded, its sandboxes and counters.
    Status {
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// The audit stream.
    Events {
        #[command(subcommand)]
        cmd: EventsCmd,
    },
    /// Which kernel features are present, and what each enables.
    Doctor,
    /// Policy Decision Point tools.
    Pdp {
        #[command(subcommand)]
        cmd: PdpCmd,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy; errors print as FILE:LINE:COL: message.
    Check { file: PathBuf },
    /// Ask the PDP that FILE configures (a policy's `pdp:` section, or a
    /// .rego file) one question; prints the decision as JSON.
    Eval {
        file: PathBuf,
        /// The decision query's input: JSON, @FILE, or - for stdin.
        #[arg(long)]
        input: String,
        /// For a .rego FILE: the rule to evaluate (default data.pep.decision).
        #[arg(long)]
        query: Option<String>,
    },
}

#[derive(Subcommand)]
enum PdpCmd {
    /// Serve an OPA-compatible Data API backed by the embedded Rego engine.
    Serve {
        /// Rego modules (repeatable).
        #[arg(long, required = true)]
        policy: Vec<PathBuf>,
        /// Address to listen on, e.g. 127.0.0.1:8181.
        #[arg(long, default_value = "127.0.0.1:8181")]
        listen: String,
    },
}

#[derive(Subcommand)]
enum EventsCmd {
    /// Print an audit log, filtered; -f follows it as it grows.
    Tail {
        #[arg(short = 'f', long)]
        follow: bool,
        #[arg(short = 'o', long, value_enum, default_value = "json")]
        output: Output,
        #[arg(long)]
        sandbox: Option<String>,
        #[arg(long, value_parser = ["allow", "deny"])]
        verdict: Option<String>,
        #[arg(long)]
        action: Option<String>,
        /// The audit file to read (-f follows it across rotations).
        #[arg(long, required_unless_present = "socket", conflicts_with = "socket")]
        file: Option<PathBuf>,
        /// The live stream of a running pep-agent (`run --audit-socket`).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Check the seq numbering and hash chain of an audit log (a live file
    /// and its rotated siblings, or files given oldest first); names the
    /// first broken record. Exit 0 intact, 1 broken.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// How the audit stream is written (see docs/AUDIT.md).
#[derive(clap::Args)]
struct AuditArgs {
    /// Rotate the --audit file when it would exceed this many bytes (0: never).
    #[arg(long, default_value_t = 0)]
    audit_max_bytes: u64,
    /// Rotated files kept (<path>.1 ... <path>.N).
    #[arg(long, default_value_t = 5)]
    audit_max_files: u32,
    /// Serve the live stream on this unix socket (`events tail --socket`).
    #[arg(long)]
    audit_socket: Option<PathBuf>,
    /// Records a slow tailer may have queued before it gets a lost marker.
    #[arg(long, default_value_t = pep_agent::audit::hub::DEFAULT_TAILER_QUEUE)]
    tailer_queue: usize,
    /// Fold identical denials of one process within this many ms after the
    /// first into one record with a count (0: off).
    #[arg(long, default_value_t = 0)]
    coalesce_ms: u64,
}

impl AuditArgs {
    fn options(&self) -> AuditOptions {
        AuditOptions {
            coalesce: std::time::Duration::from_millis(self.coalesce_ms),
            socket: self.audit_socket.clone(),
            tailer_queue: self.tailer_queue,
            rotation: Rotation {
                max_bytes: self.audit_max_bytes,
                max_files: self.audit_max_files,
            },
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Enforce,
    Audit,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PEP_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run {
            policy,
            name,
            mode,
            audit,
            user,
            allow_degraded,
            audit_opts,
            socket,
            standalone,
            cmd,
        } => {
            let socket = socket.unwrap_or_else(pep_agent::client::default_socket);
            // Through the daemon when one answers, unless asked otherwise
            // or when root asks for what only a standalone run does.
            let root_only = nix::unistd::geteuid().is_root() && (audit.is_some() || user.is_some());
            if !standalone && !root_only && pep_agent::client::daemon_answers(&socket) {
                if audit.is_some() {
                    eprintln!("pep-agent: note: through the daemon, records go to the daemon's audit log");
                }
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("pep-agent: {e}");
                        return ExitCode::from(1);
                    }
                };
                let run = pep_agent::client::DaemonRun {
                    socket,
                    policy: policy.display().to_string(),
                    name,
                    mode: mode.map(|m| match m {
                        ModeArg::Enforce => "enforce".to_string(),
                        ModeArg::Audit => "audit".to_string(),
                    }),
                    cmd,
                };
                let code = match rt.block_on(pep_agent::client::run_via_daemon(run)) {
                    Ok(status) => status,
                    Err(e) => {
                        eprintln!("pep-agent: {e:#}");
                        1
                    }
                };
                return ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1));
            }
            let opts = RunOptions {
                policy,
                name,
                mode: mode.map(|m| match m {
                    ModeArg::Enforce => policy::Mode::Enforce,
                    ModeArg::Audit => policy::Mode::Audit,
                }),
                audit,
                user,
                allow_degraded,
                cmd,
                audit_opts: audit_opts.options(),
            };
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("pep-agent: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(sandbox::run(opts)) {
                Ok(status) => status,
                Err(e) => {
                    eprintln!("pep-agent: {e}");
                    e.exit_code()
                }
            }
        }
        Cmd::Policy {
            cmd: PolicyCmd::Check { file },
        } => policy_check(&file),
        Cmd::Events {
            cmd:
                EventsCmd::Tail {
                    follow,
                    output,
                    sandbox,
                    verdict,
                    action,
                    file,
                    socket,
                },
        } => {
            let filter = Filter {
                sandbox,
                verdict,
                action,
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            let res = match (&socket, &file) {
                (Some(sock), _) => tail::tail_socket(
                    sock,
                    &filter,
                    output,
                    std::time::Duration::from_secs(if follow { 30 } else { 5 }),
                    &mut out,
                ),
                (None, Some(file)) => tail::tail(file, &filter, output, follow, &mut out, &|| false),
                (None, None) => Err(anyhow::anyhow!("--file or --socket is required")),
            };
            match res {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("pep-agent: {e:#}");
                    1
                }
            }
        }
        Cmd::Events {
            cmd: EventsCmd::Verify { files },
        } => {
            let stdout = std::io::stdout();
            match verify::run(&files, &mut stdout.lock()) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("pep-agent: {e:#}");
                    1
                }
            }
        }
        Cmd::Doctor => doctor(),
        Cmd::Daemon { config, uninstall } => pep_agent::client::daemon_main(config, uninstall),
        Cmd::Sandbox { socket, cmd } => {
            pep_agent::client::sandbox_main(&socket.unwrap_or_else(pep_agent::client::default_socket), cmd)
        }
        Cmd::Status { socket } => {
            pep_agent::client::status_main(&socket.unwrap_or_else(pep_agent::client::default_socket))
        }
        Cmd::Policy {
            cmd: PolicyCmd::Eval { file, input, query },
        } => policy_eval(&file, &input, query.as_deref()),
        Cmd::Pdp {
            cmd: PdpCmd::Serve { policy, listen },
        } => pdp_serve(&policy, &listen),
    };
    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
}

fn policy_check(file: &std::path::Path) -> i32 {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    match policy::load_file(file, &policy::LoadContext::new(home.clone())) {
        // The PDP part: Rego must parse, a rules query must give valid sections.
        Ok(mut p) => match pep_agent::pdp::check_policy(&mut p, &home).and_then(|()| {
            pep_agent::compiler::net::compile_network(&p.network, 1).map_err(|e| e.to_string())
        }) {
            Ok(_) => {
                println!("{}: ok ({})", file.display(), p.revision());
                0
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                1
            }
        },
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

fn policy_eval(file: &std::path::Path, input: &str, query: Option<&str>) -> i32 {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    let input = match pep_agent::pdp::eval::read_input(input) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("pep-agent: {e}");
            return 1;
        }
    };
    let pdp = match pep_agent::pdp::eval::engine_for(file, query, &home) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pep-agent: {e}");
            return 1;
        }
    };
    match rt.block_on(pep_agent::pdp::eval::eval(pdp.as_ref(), &input)) {
        Ok(out) => {
            println!("{out}");
            0
        }
        Err(e) => {
            eprintln!("pep-agent: {e}");
            1
        }
    }
}

fn pdp_serve(files: &[PathBuf], listen: &str) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pep-agent: {e}");
            return 1;
        }
    };
    match rt.block_on(pep_agent::pdp::serve::serve(files, listen)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pep-agent: {e:#}");
            1
        }
    }
}

fn doctor() -> i32 {
    let f = Features::detect();
    let yes = |b: bool| if b { "yes" } else { "NO" };
    println!("root:           {}", yes(f.is_root));
    println!("BTF:            {}  (needed to load any program)", yes(f.btf));
    println!(
        "cgroup v2:      {}  (sandboxes; network enforcement)",
        f.cgroup2.as_deref().unwrap_or("NO")
    );
    println!("ring buffer:    {}  (audit stream)", yes(f.ring_buffer));
    println!(
        "BPF LSM:        {}  (files and exec rules; LSM list: {})",
        yes(f.bpf_lsm),
        f.lsm_list
    );
    if !f.bpf_lsm {
        println!("  to enable: {}", pep_agent::kernel::features::ENABLE_BPF_LSM);
    }
    if f.btf && f.cgroup2.is_some() && f.ring_buffer {
        0
    } else {
        2
    }
}
