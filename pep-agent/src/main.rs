//! The `pep-agent` command line. Exit status: 0 success; 1 bad input; 2 the
//! kernel or host lacks what the request needs; otherwise the sandboxed
//! command's own status.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use pep_agent::{
    audit::tail::{self, Filter, Output},
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
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
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
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy; errors print as FILE:LINE:COL: message.
    Check { file: PathBuf },
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
        /// The audit file to read.
        #[arg(long)]
        file: PathBuf,
    },
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
            cmd,
        } => {
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
                },
        } => {
            let filter = Filter {
                sandbox,
                verdict,
                action,
            };
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            match tail::tail(&file, &filter, output, follow, &mut out, &|| false) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("pep-agent: {e:#}");
                    1
                }
            }
        }
        Cmd::Doctor => doctor(),
    };
    ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1))
}

fn policy_check(file: &std::path::Path) -> i32 {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    match policy::load_file(file, &policy::LoadContext::new(home)) {
        Ok(p) => match pep_agent::compiler::net::compile_network(&p.network, 1) {
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
