//! Running a command in a sandbox: a cgroup v2 child with the policy's
//! verdicts installed and the hooks attached before the command executes.

mod child;
mod run;

pub use run::{RunError, RunOptions, run};
