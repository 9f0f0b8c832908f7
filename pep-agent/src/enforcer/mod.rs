//! The kernel side as userspace drives it: load the embedded object with the
//! running kernel's offsets, attach the hooks, write sandboxes and compiled
//! rules into the maps.

mod attach;
mod loader;
mod maps;

pub use loader::{Enforcer, EnforcerError, LoadOptions, probe_lsm};
pub use maps::SandboxSpec;
