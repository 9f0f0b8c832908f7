//! Developer tasks. `cargo xtask setup` bootstraps a fresh machine,
//! `cargo xtask test` runs every test (unit, host kernel as root, VM kernel
//! with BPF LSM), `cargo xtask demo` runs the main job on an embedded default.

mod bench;
mod demo;
mod lint;
mod setup;
mod testrun;
mod vm;
mod vm_image;
mod vm_selftest;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the build and the tests need (idempotent).
    Setup,
    /// Run every test: lint, unit, host integration (root), VM integration.
    Test {
        /// Skip the VM phase (for quick local iterations; CI never skips).
        #[arg(long)]
        no_vm: bool,
        /// Only run test binaries whose name contains this.
        #[arg(long)]
        only: Option<String>,
    },
    /// clippy (userspace and eBPF) and rustfmt checks.
    Lint,
    /// Run the demo: an example policy enforced on real clients.
    Demo,
    /// Run every benchmark; one table in bench/results/summary.md.
    Bench {
        /// A short run (under 5 minutes).
        #[arg(long)]
        quick: bool,
    },
    /// Run a command inside the VM (debugging aid).
    VmRun {
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Check the VM harness itself.
    VmSelftest,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Test { no_vm, only } => testrun::run(testrun::Options { vm: !no_vm, only }),
        Cmd::Lint => lint::run().map(|_| ()),
        Cmd::Demo => demo::run(),
        Cmd::Bench { quick } => bench::run(quick),
        Cmd::VmRun { timeout, argv } => {
            setup::setup()?;
            let cmd = vm::VmCommand::new("vm-run", argv);
            let results = vm::run_in_vm(&[cmd], std::time::Duration::from_secs(timeout))?;
            let mut code = 0;
            for r in results {
                print!("{}", r.output);
                println!("exit: {:?}", r.exit_code);
                code = r.exit_code.unwrap_or(124);
            }
            std::process::exit(code)
        }
        Cmd::VmSelftest => {
            setup::setup()?;
            match vm_selftest::selftest()? {
                (_, 0) => Ok(()),
                (_, failed) => anyhow::bail!("{failed} harness check(s) failed"),
            }
        }
    }
}
