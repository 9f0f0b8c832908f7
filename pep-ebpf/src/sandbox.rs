//! Which sandbox the current task belongs to.
//!
//! A sandbox is a cgroup v2 subtree: `SANDBOXES` maps the id of the sandbox's
//! root cgroup to its configuration. A task belongs to the sandbox whose root
//! is one of its cgroup ancestors, so a child cgroup made inside a sandbox stays
//! in it. `SANDBOX_LEVELS` holds a bit per cgroup level at which some sandbox
//! root sits; a task outside every sandbox therefore costs one array read plus
//! one hash lookup per level in use (one, in practice); levels deeper than
//! the deepest one in use are never visited.

use aya_ebpf::{
    helpers::generated::bpf_get_current_ancestor_cgroup_id,
    macros::map,
    maps::{Array, HashMap},
};
use pep_common::sandbox::{MAX_CGROUP_LEVEL, SandboxConfig};

#[map]
static SANDBOXES: HashMap<u64, SandboxConfig> = HashMap::with_max_entries(4096, 0);

/// `[0]`: bit L set when some sandbox root sits at cgroup level L.
#[map]
static SANDBOX_LEVELS: Array<u64> = Array::with_max_entries(1, 0);

/// A sandbox the current task is in.
pub struct Sandbox {
    pub config: &'static SandboxConfig,
}

/// The sandbox of the current task, or `None` when it is in none.
#[inline(always)]
pub fn current() -> Option<Sandbox> {
    let levels = *SANDBOX_LEVELS.get(0)?;
    if levels == 0 {
        return None;
    }
    let mut level = 0u32;
    // Bounded: MAX_CGROUP_LEVEL iterations at most, and none past the
    // deepest level in use (a task outside every sandbox, which every hook
    // sees first, stops there).
    while level < MAX_CGROUP_LEVEL && levels >> level != 0 {
        if levels & (1u64 << level) != 0 {
            // SAFETY: plain helper call.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
            if id != 0 {
                // SAFETY: the value is plain data that userspace writes whole.
                if let Some(config) = unsafe { SANDBOXES.get(id) } {
                    return Some(Sandbox { config });
                }
            }
        }
        level += 1;
    }
    None
}
