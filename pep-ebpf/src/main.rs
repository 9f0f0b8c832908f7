//! pep-agent's kernel side. One module per subsystem, maps beside the probe
//! that owns them:
//! - `sandbox`: which sandbox (if any) the current task belongs to;
//! - `audit`: the ring buffer of decisions and the counters;
//! - `net`: cgroup sock_addr hooks (connect, sendmsg) over LPM tries of rules;
//! - `file`: BPF LSM hooks on file opens and on changes to the tree;
//! - `exec`: BPF LSM hooks on exec and executable mappings;
//! - `protect`: self-protection hooks, always on for sandboxed processes;
//! - `vfs`: dentry-walk paths, inode identity, file system magic;
//! - `ask`: the PDP verdict cache and held TCP connects (sock_ops, cgroup_skb);
//! - `dns`: steering DNS to the agent's resolver, and the addresses it learned.
#![no_std]
#![no_main]
// `atomic_xadd` for the audit counters: `core::sync::atomic` offers no
// read-modify-write on bpfel, and the crate is built with nightly anyway.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics, for BPF atomic add")]

mod ask;
mod audit;
mod dns;
mod exec;
mod file;
mod filecache;
mod kernel;
mod mount;
mod net;
mod protect;
mod sandbox;
mod typed;
mod vfs;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach a panic, so this is never
    // executed; it exists to satisfy `no_std`.
    loop {}
}

/// LSM programs and the `bpf_d_path`/`bpf_probe_read_kernel` helpers require a
/// GPL-compatible license.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
