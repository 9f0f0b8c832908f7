//! Per-sandbox configuration, keyed by the sandbox's cgroup id.

/// Enforce: a deny fails the syscall with EPERM.
pub const MODE_ENFORCE: u32 = 0;
/// Audit: a deny is recorded as such, but the syscall goes ahead.
pub const MODE_AUDIT: u32 = 1;

/// A sandbox as the kernel sees it: `SANDBOXES[cgroup_id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Small integer naming the sandbox in rule keys and events.
    pub sandbox_id: u32,
    /// `MODE_ENFORCE` or `MODE_AUDIT`.
    pub mode: u32,
    /// Verdict (`crate::event::VERDICT_*`) when no network rule matches.
    pub net_default: u32,
    /// Verdict when no file rule matches.
    pub file_default: u32,
    /// Verdict when no exec rule matches.
    pub exec_default: u32,
    /// Reserved, zero.
    pub flags: u32,
}

/// Deepest cgroup level at which a sandbox may sit. Bounds the ancestor walk
/// that finds the sandbox of a process in a nested child cgroup.
pub const MAX_CGROUP_LEVEL: u32 = 32;
