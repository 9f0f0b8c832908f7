//! The kernel side as userspace drives it: load the embedded object with the
//! running kernel's offsets, attach the hooks, write sandboxes and compiled
//! rules into the maps.

pub(crate) mod attach;
mod held;
mod loader;
mod maps;
/// Pinned in bpffs, for the host daemon: enforcement outlives the process.
pub mod pinned;
/// Taking over from pins of another build without a gap in enforcement.
pub mod upgrade;

pub use loader::{Enforcer, EnforcerError, LoadOptions, probe_lsm};
pub use maps::SandboxSpec;
